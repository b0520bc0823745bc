//! The archive cannot silently go back in time: restore it from an older backup (here: the rows
//! and watermarks as they were, put back with SQL) and the affected shard refuses new seqs with
//! `503 archive_regressed`, `/health/ready` says why, `fleetlm archive check` reports it, and
//! after `fleetlm archive accept` writes resume with seqs never handed out before.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{ServerProcess, Store, TestDatabase, call, create_sessions};

/// The archive's tables a backup holds (and a restore puts back).
const TABLES: &[&str] = &[
    "sessions",
    "messages",
    "read_cursors",
    "archive_watermarks",
    "session_gaps",
];

/// Runs SQL against the archive of a data directory (SQLite) or a database (Postgres).
async fn sql(dir: &Path, database: Option<&TestDatabase>, statements: &str) {
    match database {
        Some(database) => {
            let (client, connection) = tokio_postgres::connect(&database.url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            client.batch_execute(statements).await.unwrap();
        }
        None => {
            let archive = rusqlite::Connection::open(dir.join("archive.sqlite3")).unwrap();
            archive.execute_batch(statements).unwrap();
        }
    }
}

async fn count(dir: &Path, database: Option<&TestDatabase>, query: &str) -> i64 {
    match database {
        Some(database) => {
            let (client, connection) = tokio_postgres::connect(&database.url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            client.query_one(query, &[]).await.unwrap().get::<_, i64>(0)
        }
        None => {
            let archive = rusqlite::Connection::open(dir.join("archive.sqlite3")).unwrap();
            archive.query_row(query, [], |r| r.get(0)).unwrap()
        }
    }
}

/// A backup: a copy of every table, as `pg_dump` would keep it.
async fn back_up(dir: &Path, database: Option<&TestDatabase>) {
    let statements: String = TABLES
        .iter()
        .map(|table| format!("CREATE TABLE backup_{table} AS SELECT * FROM {table};"))
        .collect();
    sql(dir, database, &statements).await;
}

/// Puts the backup back: newer rows and watermarks are gone.
async fn restore(dir: &Path, database: Option<&TestDatabase>) {
    let statements: String = TABLES
        .iter()
        .map(|table| format!("DELETE FROM {table}; INSERT INTO {table} SELECT * FROM backup_{table};"))
        .collect();
    sql(dir, database, &statements).await;
}

async fn append(base: &str, client: &reqwest::Client, session: &str, n: usize) -> support::Reply {
    call(
        client,
        "POST",
        &format!("{base}/api/sessions/{session}/messages"),
        Some(json!({"user_id": "u", "content": {"n": n}})),
    )
    .await
}

/// Waits until the archive holds `messages` messages of `session`.
async fn archived(dir: &Path, database: Option<&TestDatabase>, session: &str, messages: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let query = format!("SELECT count(*) FROM messages WHERE session_id = '{session}'");
    while count(dir, database, &query).await < messages {
        assert!(Instant::now() < deadline, "the archive did not get {messages} messages");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn archive_command(dir: &Path, database: Option<&TestDatabase>, args: &[&str]) -> std::process::Output {
    let mut command = std::process::Command::new(support::binary());
    command
        .arg("archive")
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .env_remove("DATABASE_URL");
    if let Some(database) = database {
        command.args(["--database-url", &database.url]);
    }
    command.output().unwrap()
}

fn stop(mut server: ServerProcess) {
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "server did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn readiness(base: &str, client: &reqwest::Client) -> support::Reply {
    call(client, "GET", &format!("{base}/health/ready"), None).await
}

/// The readiness reasons about a regressed archive, once the shards have recovered.
async fn regression_reasons(base: &str, client: &reqwest::Client, wait_for_one: bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = readiness(base, client).await;
        let reasons: Vec<Value> = ready.body["reasons"].as_array().cloned().unwrap_or_default();
        let recovering = reasons.iter().any(|r| r["reason"] == "recovering");
        let regressed: Vec<Value> = reasons
            .into_iter()
            .filter(|r| r["component"] == "archive_regressed")
            .collect();
        if !recovering && (!wait_for_one || !regressed.is_empty()) {
            return regressed;
        }
        assert!(Instant::now() < deadline, "readiness did not settle: {}", ready.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Restored from a backup taken before the last five messages, with the server stopped.
async fn restored_backup_refuses_new_seqs_until_accepted(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let database = (store == Store::Postgres).then(TestDatabase::create);
    let database = database.as_ref();
    let url = database.map(|d| d.url.as_str());
    let victim = "victim";
    let victim_shard = fleetlm::ids::shard_for_session(victim, 8);
    let bystander = (0..)
        .map(|n| format!("bystander-{n}"))
        .find(|id| fleetlm::ids::shard_for_session(id, 8) != victim_shard)
        .unwrap();
    let client = reqwest::Client::new();

    let server = ServerProcess::start(dir.path(), url, &[]);
    create_sessions(&server.base, &client, &[victim, &bystander]).await;
    for n in 1..=5 {
        assert_eq!(append(&server.base, &client, victim, n).await.status, 200);
    }
    assert_eq!(append(&server.base, &client, &bystander, 1).await.status, 200);
    archived(dir.path(), database, victim, 5).await;
    archived(dir.path(), database, &bystander, 1).await;
    back_up(dir.path(), database).await;
    for n in 6..=10 {
        let reply = append(&server.base, &client, victim, n).await;
        assert_eq!(reply.body["message"]["seq"], n, "{}", reply.body);
    }
    archived(dir.path(), database, victim, 10).await;
    // The orderly stop finishes the flush and the WAL's purge of what it archived.
    stop(server);

    restore(dir.path(), database).await;
    let checked = archive_command(dir.path(), database, &["check"]);
    let report = String::from_utf8_lossy(&checked.stdout);
    assert_eq!(
        checked.status.code(),
        Some(1),
        "{report}{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(
        report.contains(&format!("shard {victim_shard}:")) && report.contains("WENT BACK"),
        "{report}"
    );

    let server = ServerProcess::start(dir.path(), url, &[]);
    let reasons = regression_reasons(&server.base, &client, true).await;
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert_eq!(reasons[0]["shard"], victim_shard);
    assert!(reasons[0]["reason"].as_str().unwrap().contains("went back in time"));
    let refused = append(&server.base, &client, victim, 11).await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.body["code"], "archive_regressed");
    // The other shards write on.
    let other = append(&server.base, &client, &bystander, 2).await;
    assert_eq!((other.status, &other.body["message"]["seq"]), (200, &json!(2)));
    // `accept` needs the server stopped.
    assert_eq!(
        archive_command(dir.path(), database, &["accept"]).status.code(),
        Some(2)
    );
    stop(server);

    let accepted = archive_command(dir.path(), database, &["accept"]);
    assert!(
        accepted.status.success(),
        "{}",
        String::from_utf8_lossy(&accepted.stderr)
    );
    assert!(String::from_utf8_lossy(&accepted.stdout).contains("accepted the loss"));
    let checked = archive_command(dir.path(), database, &["check"]);
    assert_eq!(
        checked.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&checked.stdout)
    );

    let server = ServerProcess::start(dir.path(), url, &[]);
    assert!(regression_reasons(&server.base, &client, false).await.is_empty());
    let resumed = append(&server.base, &client, victim, 11).await;
    assert_eq!(resumed.status, 200, "{}", resumed.body);
    let seq = resumed.body["message"]["seq"].as_u64().unwrap();
    assert!(seq > 10, "seq {seq} was handed out before the archive went back");
    let again = append(&server.base, &client, victim, 12).await;
    assert_eq!(again.body["message"]["seq"].as_u64(), Some(seq + 1));
    // What the archive still has is served.
    let history = call(
        &client,
        "GET",
        &format!("{}/api/sessions/{victim}/messages?limit=3", server.base),
        None,
    )
    .await;
    assert_eq!(history.status, 200, "{}", history.body);
    let seqs: Vec<u64> = history.body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restored_from_an_older_backup_refuses_new_seqs_until_accepted() {
    restored_backup_refuses_new_seqs_until_accepted(Store::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_restored_from_an_older_backup_refuses_new_seqs_until_accepted() {
    restored_backup_refuses_new_seqs_until_accepted(Store::Sqlite).await;
}

/// The archive goes back under a running server: its next flush of the shard finds the
/// watermark below what it wrote, stops flushing the shard, and the shard refuses new seqs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_going_back_under_a_running_server_stops_the_shard() {
    let dir = tempfile::tempdir().unwrap();
    let database = TestDatabase::create();
    let client = reqwest::Client::new();
    let server = ServerProcess::start(dir.path(), Some(&database.url), &[]);
    let victim = "victim";
    create_sessions(&server.base, &client, &[victim]).await;
    for n in 1..=5 {
        assert_eq!(append(&server.base, &client, victim, n).await.status, 200);
    }
    archived(dir.path(), Some(&database), victim, 5).await;
    back_up(dir.path(), Some(&database)).await;
    for n in 6..=10 {
        assert_eq!(append(&server.base, &client, victim, n).await.status, 200);
    }
    archived(dir.path(), Some(&database), victim, 10).await;
    restore(dir.path(), Some(&database)).await;

    // The session is still in memory: its next message takes the right seq (11, never 6)...
    let next = append(&server.base, &client, victim, 11).await;
    assert_eq!(
        (next.status, &next.body["message"]["seq"]),
        (200, &json!(11)),
        "{}",
        next.body
    );
    // ...and flushing it finds the archive behind: the shard stops.
    let reasons = regression_reasons(&server.base, &client, true).await;
    assert_eq!(reasons[0]["shard"], fleetlm::ids::shard_for_session(victim, 8));
    let refused = append(&server.base, &client, victim, 12).await;
    assert_eq!(
        (refused.status, &refused.body["code"]),
        (503, &json!("archive_regressed"))
    );
    // The flusher did not move the watermark over the hole.
    let watermark = count(
        dir.path(),
        Some(&database),
        &format!(
            "SELECT coalesce(max(log_index), 0) FROM archive_watermarks WHERE shard = {}",
            fleetlm::ids::shard_for_session(victim, 8)
        ),
    )
    .await;
    let backed_up = count(
        dir.path(),
        Some(&database),
        &format!(
            "SELECT coalesce(max(log_index), 0) FROM backup_archive_watermarks WHERE shard = {}",
            fleetlm::ids::shard_for_session(victim, 8)
        ),
    )
    .await;
    assert_eq!(watermark, backed_up);
    stop(server);
}
