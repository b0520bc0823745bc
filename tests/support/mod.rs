//! Test support: real servers on 127.0.0.1:0 (in-process or as a child process), real
//! Postgres databases created and dropped per test, and a small HTTP client.

#![allow(dead_code)]

pub mod agent;
pub mod cluster;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleetlm::config::{Config, Settings};
use serde_json::{Value, json};

/// Declares each named `async fn name(store: Store)` as two tests, `sqlite::name` and
/// `postgres::name` (a test file that uses it declares `#[macro_use] mod support;`).
#[allow(unused_macros)]
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Store::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Store::Postgres).await })*
        }
    };
}

pub fn database_admin_url() -> String {
    std::env::var("FLEETLM_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A Postgres database of its own, dropped when this value is.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
}

fn with_database_name(admin_url: &str, name: &str) -> String {
    let (base, _) = admin_url.rsplit_once('/').expect("database url has a path");
    format!("{base}/{name}")
}

fn run_admin_sql(sql: String) {
    // Its own thread and runtime: this runs from Drop, possibly inside another runtime.
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let (client, connection) = tokio_postgres::connect(&database_admin_url(), tokio_postgres::NoTls)
                .await
                .expect("Postgres must be reachable at FLEETLM_TEST_DATABASE_URL for the tests");
            tokio::spawn(connection);
            client.batch_execute(&sql).await.expect("admin sql");
        });
    })
    .join()
    .expect("admin sql thread");
}

impl TestDatabase {
    pub fn create() -> TestDatabase {
        let name = format!("fleetlm_test_{}", uuid::Uuid::now_v7().simple());
        run_admin_sql(format!("CREATE DATABASE {name}"));
        let url = with_database_name(&database_admin_url(), &name);
        TestDatabase { name, url }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        run_admin_sql(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    Sqlite,
    Postgres,
}

pub fn test_settings(data_dir: &Path, database_url: Option<&str>) -> Settings {
    Settings {
        http_addr: Some("127.0.0.1:0".into()),
        data_dir: Some(data_dir.to_path_buf()),
        database_url: database_url.map(str::to_owned),
        shards: Some(8),
        wal_lanes: Some(2),
        wal_segment_bytes: Some(fleetlm::config::ByteSize(1024 * 1024)),
        max_message_bytes: Some(fleetlm::config::ByteSize(64 * 1024)),
        flush_interval_ms: Some(50),
        ..Settings::default()
    }
}

/// A server running inside the test process.
pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    pub data_dir: tempfile::TempDir,
    pub database: Option<TestDatabase>,
    server: Option<fleetlm::server::RunningServer>,
}

impl TestServer {
    pub async fn start(store: Store) -> TestServer {
        Self::start_with(store, |_| {}).await
    }

    pub async fn start_with(store: Store, adjust: impl FnOnce(&mut Settings)) -> TestServer {
        let data_dir = tempfile::tempdir().expect("tempdir");
        let database = (store == Store::Postgres).then(TestDatabase::create);
        let mut settings = test_settings(data_dir.path(), database.as_ref().map(|d| d.url.as_str()));
        adjust(&mut settings);
        let config: Config = settings.validate().expect("valid test config");
        let server = fleetlm::server::start(config).await.expect("server starts");
        let base = format!("http://{}", server.local_addr);
        let server = TestServer {
            base,
            client: reqwest::Client::new(),
            data_dir,
            database,
            server: Some(server),
        };
        server.wait_ready().await;
        server
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(response) = self.client.get(format!("{}/health/ready", self.base)).send().await
                && response.status() == 200
            {
                return;
            }
            assert!(Instant::now() < deadline, "server not ready in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(mut self) -> (tempfile::TempDir, Option<TestDatabase>) {
        if let Some(server) = self.server.take() {
            server.shutdown().await.expect("clean shutdown");
        }
        (self.data_dir, self.database)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }
}

/// Starts a server again on a stopped one's data directory and database (`TestServer::stop`).
pub async fn restart(store: Store, data_dir: tempfile::TempDir, database: Option<TestDatabase>) -> TestServer {
    let config_dir = data_dir.path().to_path_buf();
    let url = database.as_ref().map(|d| d.url.clone());
    let mut server = TestServer::start_with(store, |settings| {
        settings.data_dir = Some(config_dir);
        settings.database_url = url;
    })
    .await;
    // Keep the original directory and database alive for as long as the new server runs.
    server.data_dir = data_dir;
    server.database = database;
    server
}

/// The Node test helpers' directory (`tests/js`), its packages installed (`npm ci`) unless
/// `package` is there already.
pub fn js_dir_with(package: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    if !dir.join("node_modules").join(package).exists() {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .expect("npm must be installed (Node 20) to run the Node tests");
        assert!(status.success(), "npm ci failed in tests/js");
    }
    dir
}

/// A response's status and JSON body (Null when empty).
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

pub async fn call(client: &reqwest::Client, method: &str, url: &str, body: Option<Value>) -> Reply {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = client.request(method, url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("request sent");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.expect("body");
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).expect("json body")
    };
    Reply { status, body, headers }
}

impl TestServer {
    pub async fn get(&self, path: &str) -> Reply {
        call(&self.client, "GET", &self.url(path), None).await
    }
    pub async fn post(&self, path: &str, body: Value) -> Reply {
        call(&self.client, "POST", &self.url(path), Some(body)).await
    }
    pub async fn put(&self, path: &str, body: Value) -> Reply {
        call(&self.client, "PUT", &self.url(path), Some(body)).await
    }
    pub async fn patch(&self, path: &str, body: Value) -> Reply {
        call(&self.client, "PATCH", &self.url(path), Some(body)).await
    }
    pub async fn delete(&self, path: &str) -> Reply {
        call(&self.client, "DELETE", &self.url(path), None).await
    }

    /// Registers agent `id` and creates session `session_id` for `user`.
    pub async fn agent_and_session(&self, agent_id: &str, user: &str, session_id: &str) {
        let agent = self
            .post(
                "/api/agents",
                json!({"agent": {"id": agent_id, "name": agent_id, "origin_url": "http://127.0.0.1:9"}}),
            )
            .await;
        assert!(
            agent.status == 201 || agent.status == 422,
            "agent create: {}",
            agent.body
        );
        let session = self
            .post(
                "/api/sessions",
                json!({"user_id": user, "agent_id": agent_id, "id": session_id}),
            )
            .await;
        assert_eq!(session.status, 201, "session create: {}", session.body);
    }
}

/// The `fleetlm` binary running as a child process, for crash tests.
pub struct ServerProcess {
    pub child: Child,
    pub base: String,
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fleetlm"))
}

impl ServerProcess {
    /// Starts `fleetlm serve` on `data_dir` and waits for its listening line. `extra` holds
    /// `--flag value` pairs that replace the test defaults.
    pub fn start(data_dir: &Path, database_url: Option<&str>, extra: &[&str]) -> ServerProcess {
        Self::start_with_env(data_dir, database_url, extra, &[])
    }

    /// As `start`, with extra environment variables (e.g. an `LD_PRELOAD` fault shim).
    pub fn start_with_env(
        data_dir: &Path,
        database_url: Option<&str>,
        extra: &[&str],
        env: &[(&str, &Path)],
    ) -> ServerProcess {
        Self::start_without_defaults(data_dir, database_url, extra, env, &[])
    }

    /// As `start_with_env`, leaving out the test defaults named in `omitted` (the server's own
    /// defaults apply to them).
    pub fn start_without_defaults(
        data_dir: &Path,
        database_url: Option<&str>,
        extra: &[&str],
        env: &[(&str, &Path)],
        omitted: &[&str],
    ) -> ServerProcess {
        let defaults = [
            ("--http-addr", "127.0.0.1:0"),
            ("--shards", "8"),
            ("--wal-lanes", "2"),
            ("--wal-segment-bytes", "1048576"),
            ("--max-message-bytes", "65536"),
            ("--flush-interval-ms", "50"),
        ];
        let mut command = Command::new(binary());
        command.arg("serve").arg("--data-dir").arg(data_dir);
        for (flag, value) in defaults {
            if !extra.contains(&flag) && !omitted.contains(&flag) {
                command.args([flag, value]);
            }
        }
        command
            .args(extra)
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(url) = database_url {
            command.args(["--database-url", url]);
        }
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().expect("spawn fleetlm");
        let stdout = child.stdout.take().expect("stdout");
        let mut reader = std::io::BufReader::new(stdout);
        let mut line = String::new();
        std::io::BufRead::read_line(&mut reader, &mut line).expect("listening line");
        let address = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_string();
        ServerProcess {
            child,
            base: format!("http://{address}"),
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A raw WebSocket client speaking Phoenix frames as text, for frame-exact tests.
pub struct WsClient {
    pub stream: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
}

pub enum WsError {
    Refused(u16),
}

impl WsClient {
    /// Connects to `/socket/websocket?{query}`; `Err(status)` if the upgrade is refused.
    pub async fn connect(base: &str, query: &str) -> Result<WsClient, WsError> {
        let url = format!("{}/socket/websocket?{query}", base.replacen("http://", "ws://", 1));
        match tokio_tungstenite::connect_async(url).await {
            Ok((stream, _)) => Ok(WsClient { stream }),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                Err(WsError::Refused(response.status().as_u16()))
            }
            Err(error) => panic!("websocket connect failed: {error}"),
        }
    }

    /// Connects as a browser page of `origin` would (with an `Origin` header).
    pub async fn connect_with_origin(base: &str, query: &str, origin: &str) -> Result<WsClient, WsError> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = format!("{}/socket/websocket?{query}", base.replacen("http://", "ws://", 1));
        let mut request = url.into_client_request().expect("request");
        request
            .headers_mut()
            .insert("origin", origin.parse().expect("origin header"));
        match tokio_tungstenite::connect_async(request).await {
            Ok((stream, _)) => Ok(WsClient { stream }),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                Err(WsError::Refused(response.status().as_u16()))
            }
            Err(error) => panic!("websocket connect failed: {error}"),
        }
    }

    /// Sends several frames in one write (the server reads them together).
    pub async fn send_batch(&mut self, texts: Vec<String>) {
        use futures_util::SinkExt;
        for text in texts {
            let message = tokio_tungstenite::tungstenite::Message::text(text);
            self.stream.feed(message).await.expect("ws feed");
        }
        self.stream.flush().await.expect("ws flush");
    }

    pub async fn send(&mut self, text: impl Into<String>) {
        use futures_util::SinkExt;
        let message = tokio_tungstenite::tungstenite::Message::text(text.into());
        self.stream.send(message).await.expect("ws send");
    }

    /// The next text frame, parsed, within 5 s, skipping `agent_status` pushes: sessions in
    /// these tests have agents that cannot be reached, and their dispatch status is not what
    /// the tests are about (the agent engine tests use `next_any`).
    pub async fn next(&mut self) -> Value {
        loop {
            let frame = self.next_any().await;
            let event = frame.get(3).or_else(|| frame.get("event")).and_then(Value::as_str);
            if event != Some("agent_status") {
                return frame;
            }
        }
    }

    /// The next text frame, parsed, within 5 s.
    pub async fn next_any(&mut self) -> Value {
        match self.next_message().await {
            tokio_tungstenite::tungstenite::Message::Text(text) => serde_json::from_str(&text).expect("json frame"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    pub async fn next_message(&mut self) -> tokio_tungstenite::tungstenite::Message {
        use futures_util::StreamExt;
        loop {
            let message = tokio::time::timeout(Duration::from_secs(5), self.stream.next())
                .await
                .expect("a frame within 5 s")
                .expect("stream open")
                .expect("frame");
            if !matches!(
                message,
                tokio_tungstenite::tungstenite::Message::Ping(_) | tokio_tungstenite::tungstenite::Message::Pong(_)
            ) {
                return message;
            }
        }
    }

    /// The next frame that is not one of `skip_events` (e.g. pushes the test does not check).
    pub async fn next_skipping(&mut self, skip_events: &[&str]) -> Value {
        loop {
            let frame = self.next().await;
            let event = frame.get(3).and_then(Value::as_str).unwrap_or_default();
            if !skip_events.contains(&event) {
                return frame;
            }
        }
    }

    /// Waits for the close frame and returns its code.
    pub async fn closed_with(&mut self) -> u16 {
        loop {
            match self.next_message().await {
                tokio_tungstenite::tungstenite::Message::Close(Some(frame)) => {
                    return frame.code.into();
                }
                tokio_tungstenite::tungstenite::Message::Close(None) => return 1005,
                _ => continue,
            }
        }
    }

    /// Asserts nothing arrives within `wait`.
    pub async fn silent_for(&mut self, wait: Duration) -> bool {
        use futures_util::StreamExt;
        tokio::time::timeout(wait, self.stream.next()).await.is_err()
    }
}

/// Builds `tests/support/fault_shim.c` into `dir` with the system C compiler; returns the
/// shared object's path (for `LD_PRELOAD`).
pub fn build_fault_shim(dir: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/fault_shim.c");
    let output = dir.join("fault_shim.so");
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&output)
        .arg(&source)
        .arg("-ldl")
        .status()
        .expect("a C compiler (cc) is needed to build the fault shim");
    assert!(status.success(), "building the fault shim failed");
    output
}

/// A TCP forwarder to Postgres that can be cut (every connection dropped, new ones refused)
/// and restored, to play an archive outage.
pub struct CuttableProxy {
    pub port: u16,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    connections: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl CuttableProxy {
    pub async fn start(target: String) -> CuttableProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let connections: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = std::sync::Arc::default();
        let (accept_up, accept_connections) = (up.clone(), connections.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !accept_up.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                accept_connections.lock().unwrap().push(task.abort_handle());
            }
        });
        CuttableProxy { port, up, connections }
    }

    pub fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    pub fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl CuttableProxy {
    /// A proxy to the test Postgres server and the URL of `database` through it.
    pub async fn to_database(database: &TestDatabase) -> (CuttableProxy, String) {
        let admin = database_admin_url();
        let host_port = admin
            .split('@')
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .unwrap()
            .to_string();
        let proxy = CuttableProxy::start(host_port).await;
        let url = format!("postgres://postgres@127.0.0.1:{}/{}", proxy.port, database.name);
        (proxy, url)
    }
}

/// `fleetlm serve` flags that keep everything in the WAL (the flusher would archive and purge).
pub const NO_FLUSH: &[&str] = &["--flush-interval-ms", "600000", "--flush-threshold-bytes", "1000000000"];

/// Registers agent `a` and creates each session for user `u` (201 expected).
pub async fn create_sessions(base: &str, client: &reqwest::Client, sessions: &[&str]) {
    let agent = json!({"agent": {"id": "a", "name": "A", "origin_url": "http://127.0.0.1:9"}});
    call(client, "POST", &format!("{base}/api/agents"), Some(agent)).await;
    for id in sessions {
        let reply = call(
            client,
            "POST",
            &format!("{base}/api/sessions"),
            Some(json!({"user_id": "u", "agent_id": "a", "id": id})),
        )
        .await;
        assert_eq!(reply.status, 201, "{}", reply.body);
    }
}

/// A counter of the server at `base` (its `/metrics`), summed over its labels; 0 if absent.
pub async fn counter(base: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|line| line.starts_with(name))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Every WAL segment file under `data_dir` whose bytes contain `needle`.
pub fn segments_containing(data_dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for lane in std::fs::read_dir(data_dir.join("wal")).unwrap() {
        let lane = lane.unwrap().path();
        if !lane.is_dir() || !lane.file_name().unwrap().to_string_lossy().starts_with("lane-") {
            continue;
        }
        for segment in std::fs::read_dir(&lane).unwrap() {
            let path = segment.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            if bytes.windows(needle.len()).any(|w| w == needle) {
                found.push(path);
            }
        }
    }
    found
}
