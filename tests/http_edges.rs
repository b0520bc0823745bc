//! HTTP behaviour shared by every route: unknown routes and methods, malformed and oversized
//! bodies, CORS, request ids, health, metrics, and token mode.

mod support;

use serde_json::json;
use support::{Store, TestServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_bodies_cors_and_request_ids() {
    let server = TestServer::start(Store::Sqlite).await;
    let unknown = server.get("/api/nothing-here").await;
    assert_eq!(
        (unknown.status, unknown.body["code"].as_str()),
        (404, Some("not_found"))
    );
    let wrong_method = server.put("/api/sessions", json!({})).await;
    assert_eq!(wrong_method.status, 405);
    assert_eq!(wrong_method.body["code"], "method_not_allowed");

    let raw = server
        .client
        .post(server.url("/api/agents"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 400);
    let body: serde_json::Value = raw.json().await.unwrap();
    assert_eq!(body["code"], "invalid_json");
    let array = server
        .client
        .post(server.url("/api/sessions"))
        .body("[1]")
        .send()
        .await
        .unwrap();
    assert_eq!(array.status(), 400);
    // Its own client: the server closes a connection whose body it refused mid-upload.
    let big = reqwest::Client::new()
        .post(server.url("/api/agents"))
        .body(vec![b' '; 2 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 413);

    let preflight = server
        .client
        .request(reqwest::Method::OPTIONS, server.url("/api/sessions"))
        .header("origin", "http://localhost:3000")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type, authorization")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 204);
    let headers = preflight.headers();
    assert_eq!(headers["access-control-allow-origin"], "http://localhost:3000");
    assert_eq!(headers["access-control-allow-headers"], "content-type, authorization");
    assert_eq!(headers["access-control-max-age"], "600");
    assert!(
        headers["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("POST")
    );

    let with_origin = server
        .client
        .get(server.url("/health/live"))
        .header("origin", "http://localhost:3000")
        .send()
        .await
        .unwrap();
    assert_eq!(
        with_origin.headers()["access-control-allow-origin"],
        "http://localhost:3000"
    );
    assert_eq!(with_origin.headers()["x-request-id"].len(), 22);
    let echoed = server
        .client
        .get(server.url("/health/live"))
        .header("x-request-id", "trace-42")
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.headers()["x-request-id"], "trace-42");

    assert_eq!(server.get("/health/ready").await.status, 200);
    server.agent_and_session("a", "u", "s").await;
    server
        .post("/api/sessions/s/messages", json!({"user_id": "u", "content": {}}))
        .await;
    let metrics = server
        .client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "fleetlm_appends_total",
        "fleetlm_wal_fsync_seconds",
        "fleetlm_wal_fsync_batch_records",
        "fleetlm_process_rss_bytes",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_allow_list_refuses_other_origins() {
    let server = TestServer::start_with(Store::Sqlite, |s| {
        s.allowed_origins = Some("https://good.example".into())
    })
    .await;
    let other = server
        .client
        .get(server.url("/health/live"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 403);
    assert!(other.headers().get("access-control-allow-origin").is_none());
    let refused =
        support::WsClient::connect_with_origin(&server.base, "user_id=u&vsn=2.0.0", "https://evil.example").await;
    assert!(matches!(refused, Err(support::WsError::Refused(403))));
    let accepted =
        support::WsClient::connect_with_origin(&server.base, "user_id=u&vsn=2.0.0", "https://good.example").await;
    assert!(accepted.is_ok());
    let good = server
        .client
        .get(server.url("/health/live"))
        .header("origin", "https://good.example")
        .send()
        .await
        .unwrap();
    assert_eq!(good.headers()["access-control-allow-origin"], "https://good.example");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_mode_serves_only_loopback_pages() {
    let server = TestServer::start(Store::Sqlite).await;
    server.agent_and_session("a", "u", "s").await;
    let from_page = |origin: &'static str| {
        server
            .client
            .post(server.url("/api/sessions/s/messages"))
            .header("origin", origin)
            .header("content-type", "text/plain")
            .body(r#"{"user_id": "u", "content": {"text": "from a page"}}"#)
            .send()
    };
    let evil = from_page("https://evil.example").await.unwrap();
    assert_eq!(evil.status(), 403, "a foreign page may not write");
    let body: serde_json::Value = evil.json().await.unwrap();
    assert_eq!(body["code"], "origin_not_allowed");
    let local = from_page("http://localhost:5173").await.unwrap();
    assert_eq!(local.status(), 200);
    assert_eq!(local.headers()["access-control-allow-origin"], "http://localhost:5173");
    let history = server.get("/api/sessions/s/messages").await;
    assert_eq!(
        history.body["messages"].as_array().unwrap().len(),
        1,
        "only the local page wrote"
    );

    let refused =
        support::WsClient::connect_with_origin(&server.base, "user_id=u&vsn=2.0.0", "https://evil.example").await;
    assert!(matches!(refused, Err(support::WsError::Refused(403))));
    let local =
        support::WsClient::connect_with_origin(&server.base, "user_id=u&vsn=2.0.0", "http://127.0.0.1:3000").await;
    assert!(local.is_ok());
    assert!(
        support::WsClient::connect(&server.base, "user_id=u&vsn=2.0.0")
            .await
            .is_ok(),
        "no Origin: not a browser"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_mode_separates_admins_users_and_strangers() {
    const SECRET: &str = "a-test-secret-of-some-length";
    let server = TestServer::start_with(Store::Sqlite, |s| {
        s.auth_secret = Some(SECRET.into());
        s.api_key = Some("admin-key".into());
    })
    .await;
    let token = |sub: &str| {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            + 600;
        fleetlm::auth::mint(SECRET.as_bytes(), &fleetlm::auth::Claims { sub: sub.into(), exp })
    };
    let send = |method: reqwest::Method, path: &str, bearer: Option<String>, body: Option<serde_json::Value>| {
        let mut request = server.client.request(method, server.url(path));
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    let agent = json!({"agent": {"id": "a", "name": "A", "origin_url": "http://a"}});
    assert_eq!(
        send(reqwest::Method::POST, "/api/agents", None, Some(agent.clone())).await,
        401
    );
    assert_eq!(
        send(
            reqwest::Method::POST,
            "/api/agents",
            Some("garbage".into()),
            Some(agent.clone())
        )
        .await,
        401
    );
    assert_eq!(
        send(
            reqwest::Method::POST,
            "/api/agents",
            Some(token("alice")),
            Some(agent.clone())
        )
        .await,
        403
    );
    assert_eq!(
        send(
            reqwest::Method::POST,
            "/api/agents",
            Some("admin-key".into()),
            Some(agent)
        )
        .await,
        201
    );

    let session = json!({"user_id": "alice", "agent_id": "a", "id": "s"});
    assert_eq!(
        send(
            reqwest::Method::POST,
            "/api/sessions",
            Some(token("bob")),
            Some(session.clone())
        )
        .await,
        403
    );
    assert_eq!(
        send(
            reqwest::Method::POST,
            "/api/sessions",
            Some(token("alice")),
            Some(session)
        )
        .await,
        201
    );
    let message = json!({"user_id": "alice", "content": {}});
    assert_eq!(
        send(
            reqwest::Method::POST,
            "/api/sessions/s/messages",
            Some(token("bob")),
            Some(message.clone())
        )
        .await,
        403
    );
    assert_eq!(
        send(
            reqwest::Method::POST,
            "/api/sessions/s/messages",
            Some(token("alice")),
            Some(message)
        )
        .await,
        200
    );
    let reply = json!({"agent_id": "a", "content": {}});
    assert_eq!(
        send(
            reqwest::Method::POST,
            "/api/sessions/s/messages",
            Some(token("a")),
            Some(reply)
        )
        .await,
        200
    );
    assert_eq!(
        send(
            reqwest::Method::GET,
            "/api/sessions/s/messages",
            Some(token("bob")),
            None
        )
        .await,
        403
    );
    assert_eq!(
        send(
            reqwest::Method::GET,
            "/api/sessions/s/messages",
            Some(token("alice")),
            None
        )
        .await,
        200
    );
    assert_eq!(
        send(reqwest::Method::GET, "/api/users/alice/inbox", Some(token("bob")), None).await,
        403
    );
    assert_eq!(
        send(
            reqwest::Method::GET,
            "/api/users/alice/inbox",
            Some(token("alice")),
            None
        )
        .await,
        200
    );
    assert_eq!(
        send(
            reqwest::Method::GET,
            "/api/sessions?user_id=alice",
            Some(token("bob")),
            None
        )
        .await,
        403
    );
    assert_eq!(send(reqwest::Method::GET, "/health/live", None, None).await, 200);
    assert_eq!(send(reqwest::Method::GET, "/metrics", None, None).await, 401);
    assert_eq!(
        send(reqwest::Method::GET, "/metrics", Some(token("alice")), None).await,
        403
    );
    let metrics = server
        .client
        .get(server.url("/metrics"))
        .bearer_auth("admin-key")
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.unwrap();
    assert!(text.contains("# HELP fleetlm_appends_total"), "{text}");
    server.stop().await;
}

#[test]
fn invalid_configuration_exits_2_with_one_line() {
    let output = std::process::Command::new(support::binary())
        .args(["serve", "--wal-lanes", "0"])
        .output()
        .expect("run fleetlm");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("wal_lanes"), "{stderr}");
}

/// The cluster flags are spelled as docs/OPERATIONS.md says; a cluster without a shared Postgres
/// is a configuration error, and until shard writes are replicated a node refuses cluster mode
/// rather than acknowledge writes only its own disk holds. Neither error shows the secret.
#[test]
fn cluster_flags_are_checked_and_a_data_dir_keeps_its_cluster_identity() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = |node: &str, extra: &[&str]| {
        let mut command = std::process::Command::new(support::binary());
        command
            .args(["serve", "--http-addr", "127.0.0.1:0", "--node-id", node])
            .args(["--cluster-peers", "1=127.0.0.1:4101,2=127.0.0.1:4102,3=127.0.0.1:4103"])
            .args(["--cluster-secret", "a-cluster-secret-for-tests"])
            .arg("--data-dir")
            .arg(dir.path())
            .args(extra)
            .env_remove("DATABASE_URL");
        command.output().expect("run fleetlm")
    };
    let without_database = cluster("1", &[]);
    assert_eq!(without_database.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&without_database.stderr);
    assert!(stderr.contains("database_url") && stderr.contains("shared"), "{stderr}");
    assert!(!stderr.contains("a-cluster-secret-for-tests"), "{stderr}");

    // A single node's data directory cannot become a cluster member (its log is not a
    // replica of anything), and a member's directory stays that member's.
    let database = support::TestDatabase::create();
    let mut single = support::ServerProcess::start(dir.path(), Some(&database.url), &[]);
    single.kill9();
    let refused = cluster("1", &["--database-url", &database.url]);
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("single node") && stderr.contains("empty data_dir"),
        "{stderr}"
    );
    assert!(!stderr.contains("a-cluster-secret-for-tests"), "{stderr}");

    let member_dir = tempfile::tempdir().unwrap();
    std::fs::write(
        member_dir.path().join("fleetlm.json"),
        r#"{"format":1,"shards":8,"archive":"postgres","node_id":2}"#,
    )
    .unwrap();
    let other_member = std::process::Command::new(support::binary())
        .args(["serve", "--http-addr", "127.0.0.1:0", "--node-id", "1"])
        .args(["--cluster-peers", "1=127.0.0.1:4101,2=127.0.0.1:4102,3=127.0.0.1:4103"])
        .args([
            "--cluster-secret",
            "a-cluster-secret-for-tests",
            "--database-url",
            &database.url,
        ])
        .arg("--data-dir")
        .arg(member_dir.path())
        .output()
        .expect("run fleetlm");
    assert_eq!(other_member.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&other_member.stderr);
    assert!(stderr.contains("belongs to cluster member 2, not 1"), "{stderr}");
    let as_single = std::process::Command::new(support::binary())
        .args(["serve", "--http-addr", "127.0.0.1:0", "--database-url", &database.url])
        .arg("--data-dir")
        .arg(member_dir.path())
        .output()
        .expect("run fleetlm");
    assert_eq!(as_single.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&as_single.stderr);
    assert!(stderr.contains("belongs to cluster member 2"), "{stderr}");
}

#[test]
fn a_second_process_cannot_open_the_same_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let _first = support::ServerProcess::start(dir.path(), None, &[]);
    let second = std::process::Command::new(support::binary())
        .args(["serve", "--http-addr", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .expect("run fleetlm");
    assert_ne!(second.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&second.stderr).contains("in use by another fleetlm process"));
}

#[test]
fn a_config_file_is_read_and_its_errors_name_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fleetlm.toml");
    std::fs::write(&file, "log_format = \"yaml\"\n").unwrap();
    let output = std::process::Command::new(support::binary())
        .args(["serve", "--config"])
        .arg(&file)
        .output()
        .expect("run fleetlm");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("log_format"));
    // A flag wins over the file.
    let output = std::process::Command::new(support::binary())
        .args(["serve", "--log-format", "json", "--wal-lanes", "99", "--config"])
        .arg(&file)
        .output()
        .expect("run fleetlm");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("wal_lanes") && !stderr.contains("log_format"),
        "{stderr}"
    );
}

/// An outsider's history read is refused on the session alone: it reads no history, so it
/// neither waits for nor learns from the archive (here: unreachable, which insiders see as 503).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outsiders_are_refused_before_any_history_is_read() {
    const SECRET: &str = "a-test-secret-of-some-length";
    let database = support::TestDatabase::create();
    let (proxy, proxied_url) = support::CuttableProxy::to_database(&database).await;
    let server = TestServer::start_with(Store::Sqlite, |s| {
        s.database_url = Some(proxied_url);
        s.auth_secret = Some(SECRET.into());
        s.api_key = Some("admin-key".into());
    })
    .await;
    let token = |sub: &str| {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            + 600;
        fleetlm::auth::mint(SECRET.as_bytes(), &fleetlm::auth::Claims { sub: sub.into(), exp })
    };
    let admin = |method: reqwest::Method, path: &str, body: serde_json::Value| {
        server
            .client
            .request(method, server.url(path))
            .bearer_auth("admin-key")
            .json(&body)
            .send()
    };
    let agent = json!({"agent": {"id": "a", "name": "A", "origin_url": "http://127.0.0.1:9"}});
    assert_eq!(
        admin(reqwest::Method::POST, "/api/agents", agent)
            .await
            .unwrap()
            .status(),
        201
    );
    let session = json!({"user_id": "alice", "agent_id": "a", "id": "s"});
    assert_eq!(
        admin(reqwest::Method::POST, "/api/sessions", session)
            .await
            .unwrap()
            .status(),
        201
    );
    for n in 0..200 {
        let message = json!({"user_id": "alice", "content": {"n": n}});
        let reply = admin(reqwest::Method::POST, "/api/sessions/s/messages", message)
            .await
            .unwrap();
        assert_eq!(reply.status(), 200);
    }
    // Wait until the oldest messages are read from the archive only.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let (db, connection) = tokio_postgres::connect(&database.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    while db
        .query_one("SELECT count(*) FROM messages", &[])
        .await
        .unwrap()
        .get::<_, i64>(0)
        < 200
    {
        assert!(std::time::Instant::now() < deadline, "the archive did not catch up");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    proxy.cut();
    let read = |sub: &'static str| {
        server
            .client
            .get(server.url("/api/sessions/s/messages?after_seq=0&limit=10"))
            .bearer_auth(token(sub))
            .send()
    };
    assert_eq!(
        read("alice").await.unwrap().status(),
        503,
        "the old history is in the archive only"
    );
    let outsider = read("mallory").await.unwrap();
    assert_eq!(outsider.status(), 403);
    let body: serde_json::Value = outsider.json().await.unwrap();
    assert_eq!(body["code"], "forbidden");
    proxy.restore();
    server.stop().await;
}

#[test]
fn the_command_line_is_kind_to_newcomers() {
    let run = |args: &[&str]| {
        std::process::Command::new(support::binary())
            .args(args)
            .output()
            .expect("run fleetlm")
    };
    let help = run(&["serve", "--help"]);
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        text.contains("[default: 127.0.0.1:4000]") && text.contains("[default: 128MiB]"),
        "{text}"
    );
    let short_secret = run(&["token", "--sub", "alice", "--auth-secret", "short"]);
    assert_eq!(short_secret.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&short_secret.stderr).contains("at least 16 bytes"));
    let no_lifetime = run(&[
        "token",
        "--sub",
        "alice",
        "--auth-secret",
        "0123456789abcdef",
        "--ttl-secs",
        "0",
    ]);
    assert_eq!(no_lifetime.status.code(), Some(2));
    let token = run(&["token", "--sub", "alice", "--auth-secret", "0123456789abcdef"]);
    assert!(token.status.success());
    assert_eq!(String::from_utf8_lossy(&token.stdout).trim().split('.').count(), 3);
}

#[test]
fn insecure_open_is_a_plain_switch_and_sizes_take_units() {
    let dir = tempfile::tempdir().unwrap();
    let server = support::ServerProcess::start(
        dir.path(),
        None,
        &[
            "--insecure-open",
            "--wal-segment-bytes",
            "1MiB",
            "--http-addr",
            "localhost:0",
        ],
    );
    assert!(server.base.starts_with("http://127.0.0.1:"), "{}", server.base);
}

#[test]
fn a_missing_postgres_database_is_named_with_how_to_create_it() {
    let dir = tempfile::tempdir().unwrap();
    let admin = support::database_admin_url();
    let (base, _) = admin.rsplit_once('/').unwrap();
    let output = std::process::Command::new(support::binary())
        .args(["serve", "--http-addr", "127.0.0.1:0", "--database-url"])
        .arg(format!("{base}/fleetlm_no_such_database"))
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .expect("run fleetlm");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("\"fleetlm_no_such_database\" does not exist") && stderr.contains("createdb"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_archive_at_start_is_waited_for() {
    let database = support::TestDatabase::create();
    let (proxy, url) = support::CuttableProxy::to_database(&database).await;
    proxy.cut();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let starting = tokio::task::spawn_blocking(move || support::ServerProcess::start(&path, Some(&url), &[]));
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert!(
        !starting.is_finished(),
        "the server waits for the archive instead of exiting"
    );
    proxy.restore();
    let server = tokio::time::timeout(std::time::Duration::from_secs(20), starting)
        .await
        .expect("started once the archive is back")
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let url = format!("{}/health/ready", server.base);
        let ready = support::call(&reqwest::Client::new(), "GET", &url, None).await;
        if ready.status == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not ready: {}", ready.body);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    drop(server);
}

#[test]
fn a_data_directory_keeps_its_archive_kind() {
    let dir = tempfile::tempdir().unwrap();
    drop(support::ServerProcess::start(dir.path(), None, &[]));
    let database = support::TestDatabase::create();
    let output = std::process::Command::new(support::binary())
        .args([
            "serve",
            "--http-addr",
            "127.0.0.1:0",
            "--database-url",
            &database.url,
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .expect("run fleetlm");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("belongs to a sqlite archive and cannot be used with postgres"),
        "{stderr}"
    );
}

/// Logs piped to a file carry no colour codes; with `--log-format json` the startup line on
/// stdout is JSON too.
#[test]
fn logs_fit_pipes_and_json_includes_the_startup_line() {
    use std::io::BufRead;
    for format in ["text", "json"] {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(support::binary())
            .args([
                "serve",
                "--http-addr",
                "127.0.0.1:0",
                "--log-format",
                format,
                "--data-dir",
            ])
            .arg(dir.path())
            .env("RUST_LOG", "info")
            .env_remove("DATABASE_URL")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn fleetlm");
        let mut first = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        if format == "json" {
            let line: serde_json::Value = serde_json::from_str(&first).expect("a JSON startup line");
            assert!(
                line["url"].as_str().unwrap().starts_with("http://127.0.0.1:"),
                "{first}"
            );
        } else {
            assert!(first.starts_with("fleetlm listening on http://"), "{first}");
        }
        // SAFETY: signalling the child we started.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("shutting down"), "{stderr}");
        assert!(!stderr.contains('\u{1b}'), "no colour codes in a pipe: {stderr:?}");
    }
}
