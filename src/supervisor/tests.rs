//! A part that panics restarts from the durable log: shard writer, WAL lane, flusher and
//! dispatcher, each made to panic through a test-only crash point in a real in-process server.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::*;
use crate::config::{ByteSize, Settings};

#[test]
fn backoff_doubles_up_to_the_cap_and_resets_after_a_healthy_run() {
    let mut backoff = Backoff::default();
    let short = Duration::from_millis(1);
    assert_eq!(backoff.after_failure(short), Duration::from_millis(50));
    assert_eq!(backoff.after_failure(short), Duration::from_millis(100));
    for _ in 0..10 {
        backoff.after_failure(short);
    }
    assert_eq!(backoff.after_failure(short), MAX_BACKOFF);
    assert_eq!(backoff.after_failure(HEALTHY_AFTER), FIRST_BACKOFF);
}

#[test]
fn panic_messages_are_read_from_literals_and_formatted_strings() {
    let literal = std::panic::catch_unwind(|| panic!("plain")).unwrap_err();
    assert_eq!(panic_message(literal.as_ref()), "plain");
    let formatted = std::panic::catch_unwind(|| panic!("shard {}", 3)).unwrap_err();
    assert_eq!(panic_message(formatted.as_ref()), "shard 3");
}

/// Crash points and the restart record are process-wide: the server tests run one at a time
/// (under `cargo test`, which runs tests as threads of one process).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Server {
    _serial: tokio::sync::MutexGuard<'static, ()>,
    base: String,
    client: reqwest::Client,
    data_dir: tempfile::TempDir,
    server: Option<crate::server::RunningServer>,
}

struct Reply {
    status: u16,
    body: Value,
}

impl Server {
    async fn start() -> Server {
        let serial = SERIAL.lock().await;
        forget_failures();
        let data_dir = tempfile::tempdir().expect("tempdir");
        let settings = Settings {
            http_addr: Some("127.0.0.1:0".into()),
            data_dir: Some(data_dir.path().to_path_buf()),
            shards: Some(1),
            wal_lanes: Some(1),
            wal_segment_bytes: Some(ByteSize(1024 * 1024)),
            max_message_bytes: Some(ByteSize(64 * 1024)),
            flush_interval_ms: Some(50),
            ..Settings::default()
        };
        let server = crate::server::start(settings.validate().expect("valid config"))
            .await
            .expect("server starts");
        let server = Server {
            _serial: serial,
            base: format!("http://{}", server.local_addr),
            client: reqwest::Client::new(),
            data_dir,
            server: Some(server),
        };
        server
            .wait_until(|s| async move { s.get("/health/ready").await.status == 200 })
            .await;
        server
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Reply {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .timeout(Duration::from_secs(20));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request sent");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Reply { status, body }
    }

    async fn get(&self, path: &str) -> Reply {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> Reply {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    /// Waits (at most 20 s) until `check` holds.
    async fn wait_until<'a, F, Fut>(&'a self, check: F)
    where
        F: Fn(&'a Server) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !check(self).await {
            assert!(Instant::now() < deadline, "condition not reached in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn create_session(&self, id: &str, origin_url: &str) {
        let agent = json!({"agent": {"id": "a", "name": "A", "origin_url": origin_url}});
        assert!(self.post("/api/agents", agent).await.status < 300);
        let reply = self
            .post("/api/sessions", json!({"user_id": "u", "agent_id": "a", "id": id}))
            .await;
        assert_eq!(reply.status, 201, "{}", reply.body);
    }

    /// Appends with the text as its client_id; a stored message answers 201 (200 when a
    /// retry found it stored already).
    async fn append(&self, session: &str, text: &str) -> Reply {
        let mut reply = self
            .post(
                &format!("/api/sessions/{session}/messages"),
                json!({"user_id": "u", "content": {"text": text}, "client_id": text}),
            )
            .await;
        if reply.status == 200 {
            reply.status = 201;
        }
        reply
    }

    async fn seqs(&self, session: &str) -> Vec<(u64, String)> {
        let reply = self
            .get(&format!("/api/sessions/{session}/messages?after_seq=0&limit=500"))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        reply.body["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| {
                (
                    m["seq"].as_u64().expect("seq"),
                    m["content"]["text"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    async fn restarts(&self, task: &str) -> u64 {
        let text = self.get("/metrics").await.body;
        let text = text.as_str().expect("prometheus text");
        let prefix = format!("fleetlm_task_restarts_total{{task=\"{task}\"}} ");
        text.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .map_or(0, |value| value.trim().parse().expect("counter"))
    }

    async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(30), server.shutdown())
                .await
                .expect("shutdown in time")
                .expect("clean shutdown");
        }
    }
}

/// Acknowledged messages keep their seqs, and no seq is handed out twice.
fn assert_history_intact(history: &[(u64, String)], acked: &[(u64, String)]) {
    for entry in acked {
        assert!(history.contains(entry), "acknowledged {entry:?} lost: {history:?}");
    }
    let seqs: Vec<u64> = history.iter().map(|(seq, _)| *seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "seqs not increasing: {seqs:?}");
}

/// A writer that panics with a batch handed to the WAL: that request gets a clear, retryable
/// error, the shard serves again with its history intact, and the restart is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_writer_that_panics_mid_batch_restarts_from_the_log() {
    let server = Server::start().await;
    server.create_session("s1", "http://127.0.0.1:9").await;
    let mut acked = Vec::new();
    for i in 0..5 {
        let text = format!("before-{i}");
        let reply = server.append("s1", &text).await;
        assert_eq!(reply.status, 201, "{}", reply.body);
        acked.push((reply.body["message"]["seq"].as_u64().expect("seq"), text));
    }
    let restarts_before = server.restarts("shard_writer").await;

    crash::arm("shard_writer/0");
    let in_doubt = server.append("s1", "in-doubt").await;
    match in_doubt.status {
        // The entry was handed to the WAL, then the writer panicked before answering.
        503 => assert!(
            in_doubt.body.to_string().contains("shard writer restarted"),
            "{}",
            in_doubt.body
        ),
        // The fsync won the race with the crash point: answered before the panic.
        201 => acked.push((
            in_doubt.body["message"]["seq"].as_u64().expect("seq"),
            "in-doubt".into(),
        )),
        other => panic!("unexpected {other}: {}", in_doubt.body),
    }
    server
        .wait_until(|s| async move { s.restarts("shard_writer").await > restarts_before })
        .await;

    let after = server.append("s1", "after").await;
    assert_eq!(after.status, 201, "the shard serves again: {}", after.body);
    acked.push((after.body["message"]["seq"].as_u64().expect("seq"), "after".into()));
    let history = server.seqs("s1").await;
    assert_history_intact(&history, &acked);
    // The request in doubt was durable (it reached the WAL): a retry with its client_id
    // answers with the same message, not a second one.
    let retried = server.append("s1", "in-doubt").await;
    assert_eq!(retried.status, 201, "{}", retried.body);
    let history = server.seqs("s1").await;
    assert_eq!(
        history.iter().filter(|(_, text)| text == "in-doubt").count(),
        1,
        "{history:?}"
    );
    server.stop().await;
}

/// A lane that panics in a commit answers that commit's appends with an error and restarts
/// from the segments on disk; the shard's writer rebuilds and writes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wal_lane_that_panics_restarts_from_disk() {
    let server = Server::start().await;
    server.create_session("s1", "http://127.0.0.1:9").await;
    let mut acked = Vec::new();
    for i in 0..3 {
        let text = format!("before-{i}");
        let reply = server.append("s1", &text).await;
        assert_eq!(reply.status, 201, "{}", reply.body);
        acked.push((reply.body["message"]["seq"].as_u64().expect("seq"), text));
    }
    let lane = server.data_dir.path().join("wal").join("lane-00");
    crash::arm(&format!("wal_lane/{}", lane.display()));
    let in_doubt = server.append("s1", "in-doubt").await;
    // The armed commit is the lane's next one: usually this append's, but a flush's purge mark
    // may take that commit first; then this append lands after the restart and is acknowledged
    // like any other (and must then be in the history).
    match in_doubt.status {
        201 => acked.push((
            in_doubt.body["message"]["seq"].as_u64().expect("seq"),
            "in-doubt".into(),
        )),
        status => assert!(status >= 500, "neither acknowledged nor refused: {}", in_doubt.body),
    }
    server
        .wait_until(|s| async move { s.restarts("wal_lane").await >= 1 })
        .await;

    // The writer rebuilds from the durable log (which holds the entry written before the panic).
    let mut after = server.append("s1", "after").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while after.status != 201 {
        assert!(
            Instant::now() < deadline,
            "the shard did not write again: {}",
            after.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = server.append("s1", "after").await;
    }
    acked.push((after.body["message"]["seq"].as_u64().expect("seq"), "after".into()));
    let history = server.seqs("s1").await;
    assert_history_intact(&history, &acked);
    server.stop().await;
}

/// The archive's watermark of shard 0, read through a connection of its own.
async fn archived_through(server: &Server) -> u64 {
    let archive = crate::archive::Archive::open_sqlite(&server.data_dir.path().join("archive.sqlite3"))
        .expect("open the archive");
    archive.watermark(0).await.expect("watermark")
}

/// A flusher that keeps panicking is restarted each time (readiness names it meanwhile), and
/// archiving resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flusher_that_keeps_panicking_is_named_by_readiness_and_archiving_resumes() {
    let server = Server::start().await;
    server.create_session("s1", "http://127.0.0.1:9").await;
    for round in 1..=3 {
        crash::arm("flusher");
        server
            .wait_until(|s| async move { s.restarts("flusher").await >= round })
            .await;
    }
    let ready = server.get("/health/ready").await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    let named = ready.body["reasons"]
        .as_array()
        .expect("reasons")
        .iter()
        .any(|reason| reason["component"] == "supervisor" && reason["part"] == "flusher");
    assert!(named, "{}", ready.body);

    let reply = server.append("s1", "archived after the restarts").await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    let before = archived_through(&server).await;
    let appended = server.append("s1", "more").await;
    assert_eq!(appended.status, 201, "{}", appended.body);
    let deadline = Instant::now() + Duration::from_secs(20);
    while archived_through(&server).await <= before {
        assert!(Instant::now() < deadline, "archiving did not resume");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}

/// A dispatcher that panics on the event of a user message loses that event; its restart
/// rescans the log and dispatches the turn owed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_that_panics_dispatches_the_owed_turn_after_its_restart() {
    let webhook = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let origin = format!("http://{}", webhook.local_addr().expect("address"));
    let server = Server::start().await;
    server.create_session("s1", &origin).await;
    let restarts_before = server.restarts("dispatcher").await;
    crash::arm("dispatcher");
    let reply = server.append("s1", "hello agent").await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    server
        .wait_until(|s| async move { s.restarts("dispatcher").await > restarts_before })
        .await;
    // The agent is called (the connection is all this test needs to see).
    let called = tokio::time::timeout(Duration::from_secs(20), webhook.accept()).await;
    assert!(called.is_ok(), "the owed turn was not dispatched after the restart");
    server.stop().await;
}
