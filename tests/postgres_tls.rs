//! Postgres over TLS, chosen by `sslmode` in `database_url`: the real test Postgres
//! (FLEETLM_TEST_DATABASE_URL) behind a TLS-terminating proxy written here, which speaks the
//! SSLRequest handshake (answers `S` and does TLS with a certificate of a test CA, or answers
//! `N` like a server without TLS) and pipes plaintext to Postgres.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use support::agent::TestCa;
use support::{Store, TestServer, database_admin_url};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The SSLRequest message: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// `host:port` of the test Postgres.
fn postgres_address() -> String {
    database_admin_url()
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("FLEETLM_TEST_DATABASE_URL is postgres://user@host:port/db")
        .to_string()
}

struct Proxy {
    port: u16,
    /// Connections that completed the TLS handshake.
    tls_sessions: Arc<AtomicUsize>,
}

/// A proxy in front of the test Postgres: with `tls`, answers an SSLRequest with `S` and
/// terminates TLS with it; without, answers `N` (a server without TLS) and goes on in plaintext.
async fn start_proxy(tls: Option<rustls::ServerConfig>) -> Proxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let tls_sessions = Arc::new(AtomicUsize::new(0));
    let acceptor = tls.map(|config| tokio_rustls::TlsAcceptor::from(Arc::new(config)));
    let counted = tls_sessions.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let (acceptor, counted) = (acceptor.clone(), counted.clone());
            tokio::spawn(async move {
                let mut first = [0u8; 8];
                if inbound.read_exact(&mut first).await.is_err() {
                    return;
                }
                let Ok(mut postgres) = tokio::net::TcpStream::connect(postgres_address()).await else {
                    return;
                };
                if first != SSL_REQUEST {
                    // A plaintext startup: pass it on as it came.
                    if postgres.write_all(&first).await.is_ok() {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut postgres).await;
                    }
                    return;
                }
                match acceptor {
                    Some(acceptor) => {
                        if inbound.write_all(b"S").await.is_err() {
                            return;
                        }
                        let Ok(mut tls) = acceptor.accept(inbound).await else {
                            return;
                        };
                        counted.fetch_add(1, Ordering::SeqCst);
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut postgres).await;
                    }
                    None => {
                        if inbound.write_all(b"N").await.is_err() {
                            return;
                        }
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut postgres).await;
                    }
                }
            });
        }
    });
    Proxy { port, tls_sessions }
}

/// `url` (to the test Postgres) pointed at the proxy, with `query` added.
fn through_proxy(url: &str, proxy: &Proxy, query: &str) -> String {
    let url = url.replacen(&postgres_address(), &format!("127.0.0.1:{}", proxy.port), 1);
    format!("{url}?{query}")
}

/// Starts a server on `database_url`; its error if it refuses to start (within 30 s).
async fn start_error(database_url: String) -> String {
    let dir = tempfile::tempdir().unwrap();
    let config = support::test_settings(dir.path(), Some(&database_url))
        .validate()
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(30), fleetlm::server::start(config)).await {
        Ok(Ok(server)) => {
            server.shutdown().await.unwrap();
            panic!("the server started on {database_url}")
        }
        Ok(Err(error)) => {
            eprintln!("refused to start: {error:#}");
            format!("{error:#}")
        }
        Err(_) => panic!("the server neither started nor gave up within 30 s (waiting on {database_url})"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_the_ca_appends_and_archives_over_tls() {
    let ca = TestCa::new();
    let proxy = start_proxy(Some(ca.server_config(&[]))).await;
    let query = format!("sslmode=verify-full&sslrootcert={}", ca.pem_file.display());
    let server = TestServer::start_with(Store::Postgres, |settings| {
        let direct = settings.database_url.clone().unwrap();
        settings.database_url = Some(through_proxy(&direct, &proxy, &query));
    })
    .await;
    assert!(
        proxy.tls_sessions.load(Ordering::SeqCst) > 0,
        "the archive connected over TLS"
    );
    server.agent_and_session("a", "u", "s1").await;
    let reply = server
        .post(
            "/api/sessions/s1/messages",
            json!({"user_id": "u", "content": {"text": "over tls"}}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);

    // The flusher archives it, through the proxy (checked directly in Postgres).
    let direct = server.database.as_ref().unwrap().url.clone();
    let (client, connection) = tokio_postgres::connect(&direct, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = client
            .query("SELECT seq FROM messages WHERE session_id = 's1'", &[])
            .await
            .unwrap();
        if rows.len() == 1 {
            assert_eq!(rows[0].get::<_, i64>(0), 1);
            break;
        }
        assert!(Instant::now() < deadline, "the message was not archived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let page = server.get("/api/sessions/s1/messages").await;
    assert_eq!(page.body["messages"][0]["content"]["text"], "over tls");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_another_ca_refuses_to_start_with_a_clear_error() {
    let (served, trusted) = (TestCa::new(), TestCa::new());
    let proxy = start_proxy(Some(served.server_config(&[]))).await;
    let database = support::TestDatabase::create();
    let url = through_proxy(
        &database.url.replacen("postgres@", "postgres:hunter2@", 1),
        &proxy,
        &format!("sslmode=verify-full&sslrootcert={}", trusted.pem_file.display()),
    );
    let error = start_error(url).await;
    assert!(
        error.contains("TLS") && error.contains("sslmode=verify-full"),
        "{error}"
    );
    assert!(error.contains("certificate"), "says what was refused: {error}");
    assert!(!error.contains("hunter2"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_against_a_server_without_tls_refuses_to_start_with_a_clear_error() {
    let proxy = start_proxy(None).await;
    let database = support::TestDatabase::create();
    let error = start_error(through_proxy(&database.url, &proxy, "sslmode=require")).await;
    assert!(
        error.contains("sslmode=require") && error.contains("does not support TLS"),
        "{error}"
    );
    assert_eq!(proxy.tls_sessions.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_falls_back_to_plaintext_and_disable_never_asks() {
    let proxy = start_proxy(None).await;
    for mode in ["prefer", "disable"] {
        let server = TestServer::start_with(Store::Postgres, |settings| {
            let direct = settings.database_url.clone().unwrap();
            settings.database_url = Some(through_proxy(&direct, &proxy, &format!("sslmode={mode}")));
        })
        .await;
        server.agent_and_session("a", "u", "s1").await;
        server.stop().await;
    }
}
