//! Reaching the Postgres archive at start: waiting for it (a single node, a new member), or
//! starting without it (a member that took part before) and checking it once it answers.

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;

use crate::archive::Archive;
use crate::wal::Wal;

/// Connects to the Postgres archive and prepares its schema. A server that is down or
/// unreachable is waited for with backoff (capped at 5 s; the process is not listening, so not
/// ready, meanwhile); a problem that waiting cannot fix (no such database, bad credentials, a
/// malformed URL) ends the start with a sentence saying what to do.
pub(crate) async fn connect_postgres_waiting(url: &str) -> anyhow::Result<Archive> {
    let target = describe_postgres_url(url);
    let mut delay = Duration::from_millis(250);
    loop {
        let connected = match Archive::connect_postgres(url).await {
            Ok(archive) => archive.migrate().await.map(|()| archive),
            Err(error) => Err(error),
        };
        let error = match connected {
            Ok(archive) => return Ok(archive),
            Err(crate::archive::ArchiveError::Unavailable(error)) => error,
            Err(error) => bail!("cannot use the Postgres archive at {target}: {error}"),
        };
        if let Some(advice) = postgres_advice(url).await {
            bail!("cannot use the Postgres archive at {target}: {advice}");
        }
        tracing::warn!(archive = %target, %error, retry_in_ms = delay.as_millis() as u64, "the Postgres archive is unreachable; waiting for it");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// One attempt to connect to (and migrate) the Postgres archive: `None` if it is unreachable
/// (waiting may help), an error if it refuses this server for good.
pub(crate) async fn connect_postgres_once(url: &str) -> anyhow::Result<Option<Archive>> {
    let target = describe_postgres_url(url);
    let connected = match Archive::connect_postgres(url).await {
        Ok(archive) => archive.migrate().await.map(|()| archive),
        Err(error) => Err(error),
    };
    match connected {
        Ok(archive) => Ok(Some(archive)),
        Err(crate::archive::ArchiveError::Unavailable(_)) => match postgres_advice(url).await {
            Some(advice) => bail!("cannot use the Postgres archive at {target}: {advice}"),
            None => Ok(None),
        },
        Err(error) => bail!("cannot use the Postgres archive at {target}: {error}"),
    }
}

/// A member that started without its archive (`connect_postgres_once` found it unreachable):
/// once the archive answers, migrates it and checks it is this member's cluster's
/// (`cluster_identity::check_at_start`), then lets the member use it (`Archive::open_gate`).
/// Until then nothing is read from or written to it. An archive that turns out to be another
/// cluster's (or none) stops the process with exit code 2, as the same check does at start.
pub(crate) fn check_archive_later(
    url: String,
    archive: Archive,
    wal: Arc<Wal>,
    node_id: u64,
    recorded: Option<String>,
    data_dir: std::path::PathBuf,
) {
    tokio::spawn(async move {
        let checker = loop {
            match connect_postgres_once(&url).await {
                Ok(Some(checker)) => break checker,
                Ok(None) => tokio::time::sleep(Duration::from_secs(1)).await,
                Err(error) => {
                    tracing::error!(%error, "the archive refuses this member; stopping");
                    exit_refused();
                }
            }
        };
        match crate::cluster_identity::check_at_start(&checker, &wal, node_id, recorded.as_deref(), &data_dir).await {
            Ok(()) => {
                archive.open_gate();
                tracing::info!("the archive answers and is this cluster's; this member uses it again");
            }
            Err(error) => {
                tracing::error!(%error, "this member cannot use the archive; stopping");
                exit_refused();
            }
        }
    });
}

/// Stops the process with exit code 2 once the log has taken the line that says why (the log
/// is written by its own thread, which `exit` would not wait for).
fn exit_refused() -> ! {
    crate::logging::flush(Duration::from_secs(1));
    std::process::exit(2);
}

/// `host:port/database` of a Postgres URL, without credentials.
pub(crate) fn describe_postgres_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(parsed) => format!(
            "{}:{}{}",
            parsed.host_str().unwrap_or("localhost"),
            parsed.port().unwrap_or(5432),
            parsed.path()
        ),
        Err(_) => "the configured database_url".to_string(),
    }
}

/// What to do about a Postgres problem that waiting will not fix (asked of the server with a
/// connection of its own, whose error carries the SQLSTATE); `None` when waiting may help.
async fn postgres_advice(url: &str) -> Option<String> {
    use tokio_postgres::error::SqlState;
    let target = match crate::archive::postgres_tls::parse_database_url(url) {
        Ok(target) => target,
        Err(problem) => return Some(problem),
    };
    let config = &target.config;
    let error = match tokio::time::timeout(Duration::from_secs(5), config.connect(target.tls.clone())).await {
        Ok(Err(error)) => error,
        Ok(Ok(_)) | Err(_) => return None,
    };
    if crate::archive::postgres_tls::is_tls_failure(&error) {
        // A certificate refused, or no TLS where it is required: waiting will not fix it.
        let sslmode = target.sslmode;
        let error = crate::archive::postgres_tls::with_causes(&error);
        return Some(format!(
            "the TLS connection failed with sslmode={sslmode} ({error}); check sslmode and sslrootcert in database_url and the server's ssl settings"
        ));
    }
    let database = config.get_dbname().unwrap_or("postgres");
    match error.code() {
        Some(code) if *code == SqlState::INVALID_CATALOG_NAME => Some(format!(
            "the database \"{database}\" does not exist; create it (`createdb {database}`, or `CREATE DATABASE \"{database}\";` in psql) or point database_url at an existing database"
        )),
        Some(code) if *code == SqlState::INVALID_PASSWORD || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION => {
            Some("the server refused the user or password in database_url; check them".into())
        }
        _ => None,
    }
}
