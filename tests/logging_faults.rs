//! Logging never fails anything, and SIGTERM always ends the process in time, against the real
//! `fleetlm` process: its log on a small tmpfs that fills up (with its data), its log a pipe
//! nobody reads any more, a request that never ends, an archive that cannot take the last flush.

mod support;

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{NO_FLUSH, create_sessions};

/// The drain deadline these tests give the server, and how long past it the process may take
/// (`EXIT_GRACE` in main.rs) plus slack for a loaded machine.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(3);
const EXIT_BOUND: Duration = Duration::from_secs(3 + 2 + 3);

/// Where the server's stderr goes.
enum Log<'a> {
    File(&'a Path),
    Pipe,
}

/// `fleetlm serve` on `data_dir`, with its stderr sent where the test says.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(data_dir: &Path, log: Log, rust_log: &str, extra: &[&str]) -> Server {
        let deadline_ms = SHUTDOWN_DEADLINE.as_millis().to_string();
        // FLEETLM_TEST_BINARY runs these tests against another build (the code before a fix).
        let binary = std::env::var_os("FLEETLM_TEST_BINARY").map_or_else(support::binary, PathBuf::from);
        let mut command = Command::new(binary);
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--http-addr", "127.0.0.1:0", "--shards", "8", "--wal-lanes", "2"])
            .args(["--wal-segment-bytes", "1048576", "--max-message-bytes", "65536"])
            .args(["--shutdown-deadline-ms", &deadline_ms])
            .args(extra)
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::piped());
        match log {
            Log::File(path) => command.stderr(std::fs::File::create(path).expect("log file")),
            Log::Pipe => command.stderr(Stdio::piped()),
        };
        let mut child = command.spawn().expect("spawn fleetlm");
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("listening line");
        let address = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_string();
        Server {
            child,
            base: format!("http://{address}"),
        }
    }

    /// SIGTERM, then the exit status and how long it took (None: still running at the bound).
    fn terminate(&mut self) -> (Option<ExitStatus>, Duration) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let started = Instant::now();
        while started.elapsed() < EXIT_BOUND {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return (Some(status), started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (None, started.elapsed())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A request's status and body, or why it got none (a lost connection).
async fn request(
    client: &reqwest::Client,
    method: &str,
    url: &str,
    body: Option<Value>,
) -> Result<(u16, Value), String> {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = client.request(method, url).timeout(Duration::from_secs(10));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.map_err(|error| format!("no answer: {error:?}"))?;
    let status = response.status().as_u16();
    let text = response.text().await.map_err(|error| format!("body cut: {error:?}"))?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
}

async fn append(client: &reqwest::Client, base: &str, session: &str, n: usize) -> Result<(u16, Value), String> {
    let body = json!({"user_id": "u", "content": {"n": n}, "client_id": format!("c{n}")});
    request(
        client,
        "POST",
        &format!("{base}/api/sessions/{session}/messages"),
        Some(body),
    )
    .await
}

/// An append of about 50 KB, to fill WAL segments quickly.
async fn append_padded(client: &reqwest::Client, base: &str, session: &str, n: usize) -> Result<(u16, Value), String> {
    let body = json!({"user_id": "u", "content": {"n": n, "pad": "p".repeat(50_000)}, "client_id": format!("c{n}")});
    request(
        client,
        "POST",
        &format!("{base}/api/sessions/{session}/messages"),
        Some(body),
    )
    .await
}

/// Waits (up to 10 s) until `/metrics` counts at least `lines` dropped log lines (the log's
/// writer thread counts them as it gets to them); false if it never does.
async fn log_lines_dropped_reach(client: &reqwest::Client, base: &str, lines: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if log_lines_dropped(client, base).await >= lines {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `fleetlm_log_lines_dropped_total` as `/metrics` shows it.
async fn log_lines_dropped(client: &reqwest::Client, base: &str) -> u64 {
    let response = client.get(format!("{base}/metrics")).send().await.expect("metrics");
    let text = response.text().await.expect("metrics body");
    text.lines()
        .find_map(|line| line.strip_prefix("fleetlm_log_lines_dropped_total "))
        .unwrap_or_else(|| panic!("no fleetlm_log_lines_dropped_total in /metrics:\n{text}"))
        .trim()
        .parse::<f64>()
        .expect("a number") as u64
}

/// A mounted tmpfs, unmounted when dropped; None (the test is skipped, saying so) when this
/// process may not mount.
struct SmallDisk {
    mount_point: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(megabytes: u32) -> Option<SmallDisk> {
        let mount_point = tempfile::tempdir().unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(mount_point.path())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !mounted {
            eprintln!("SKIPPED: mounting a small tmpfs is not permitted here (needs root, as CI has)");
            return None;
        }
        Some(SmallDisk { mount_point })
    }

    fn path(&self) -> &Path {
        self.mount_point.path()
    }

    /// Takes every free byte with one file; returns its path.
    fn fill(&self) -> PathBuf {
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![1u8; 64 * 1024];
        loop {
            match file.write(&chunk) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        // The last partial page too.
        while file.write(&[1u8]).is_ok_and(|written| written == 1) {}
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.mount_point.path()).status();
    }
}

/// The scene: the log on the same (small) disk as the data. The disk fills; appends are
/// refused with 507 while every log line about it fails to be written. That kills nothing:
/// once space is back the same shard takes writes again, the log says how many lines it lost,
/// and SIGTERM ends the process within its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_log_kills_nothing_and_sigterm_still_exits() {
    let Some(disk) = SmallDisk::mount(8) else { return };
    let data_dir = disk.path().join("data");
    let log_path = disk.path().join("fleetlm.log");
    let mut server = Server::start(&data_dir, Log::File(&log_path), "info", NO_FLUSH);
    let client = reqwest::Client::new();
    create_sessions(&server.base, &client, &["s"]).await;
    assert_eq!(append(&client, &server.base, "s", 0).await.unwrap().0, 200);

    let filler = disk.fill();
    // The current WAL segment may still have room: fill it until a write is refused, then
    // a few more refusals, each logged while the log cannot be written.
    let mut n = 1;
    let mut refused = 0;
    while refused < 5 {
        let (status, body) = append_padded(&client, &server.base, "s", n)
            .await
            .unwrap_or_else(|error| panic!("append {n} on a full disk: {error}"));
        match status {
            200 => assert!(
                refused == 0 && n < 100,
                "append {n} acknowledged on a full disk: {body}"
            ),
            507 => {
                assert_eq!(body["code"], "insufficient_storage", "{body}");
                refused += 1;
            }
            other => panic!("append {n} on a full disk: {other} {body}"),
        }
        n += 1;
    }
    assert!(
        log_lines_dropped_reach(&client, &server.base, 1).await,
        "the log did fail while the disk was full"
    );

    std::fs::remove_file(&filler).unwrap();
    for n in n..n + 3 {
        let (status, body) = append(&client, &server.base, "s", n)
            .await
            .unwrap_or_else(|error| panic!("append {n} once space is back: {error}"));
        assert_eq!(status, 200, "the same shard takes writes again: {body}");
    }

    let (status, took) = server.terminate();
    let status = status.unwrap_or_else(|| panic!("no exit within {EXIT_BOUND:?} of SIGTERM"));
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(took < EXIT_BOUND, "{took:?}");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("log lines were dropped"),
        "the log says it lost lines:\n{log}"
    );
}

/// stderr a pipe whose reader went away (EPIPE on every write) while every request logs a
/// line: the requests are all answered, and SIGTERM ends the process within its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_log_pipe_kills_nothing_and_sigterm_still_exits() {
    let data_dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(data_dir.path(), Log::Pipe, "info,fleetlm::api=debug", &[]);
    drop(server.child.stderr.take());
    let client = reqwest::Client::new();
    create_sessions(&server.base, &client, &["s", "t"]).await;
    for n in 0..20 {
        for session in ["s", "t"] {
            let (status, body) = append(&client, &server.base, session, n)
                .await
                .unwrap_or_else(|error| panic!("append {n} to {session}: {error}"));
            assert_eq!(status, 200, "{body}");
        }
    }
    assert!(log_lines_dropped_reach(&client, &server.base, 40).await);

    let (status, took) = server.terminate();
    let status = status.unwrap_or_else(|| panic!("no exit within {EXIT_BOUND:?} of SIGTERM"));
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(took < EXIT_BOUND, "{took:?}");
}

/// A request whose body never arrives would keep the HTTP drain waiting forever: it is cut off
/// at the shutdown deadline, and the process exits (0, the orderly path finished) in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_never_ends_does_not_hold_the_shutdown() {
    let data_dir = tempfile::tempdir().unwrap();
    let log_path = data_dir.path().join("fleetlm.log");
    let mut server = Server::start(&data_dir.path().join("data"), Log::File(&log_path), "info", &[]);
    let client = reqwest::Client::new();
    create_sessions(&server.base, &client, &["s"]).await;
    let address = server.base.trim_start_matches("http://").to_string();
    let mut stuck = std::net::TcpStream::connect(&address).unwrap();
    write!(
        stuck,
        "POST /api/sessions/s/messages HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"user_id\""
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let (status, took) = server.terminate();
    let status = status.unwrap_or_else(|| panic!("no exit within {EXIT_BOUND:?} of SIGTERM"));
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(took >= SHUTDOWN_DEADLINE - Duration::from_millis(500), "{took:?}");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("cut off"), "the log says what was cut off:\n{log}");
    drop(stuck);
}

/// The archive cannot take the final flush (another process holds SQLite's write lock): the
/// process still exits within its deadline, and its log names the shards whose entries only
/// the WAL holds (archived at the next start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_with_a_blocked_archive_says_which_shards_were_not_archived() {
    let data_dir = tempfile::tempdir().unwrap();
    let log_path = data_dir.path().join("fleetlm.log");
    let data = data_dir.path().join("data");
    let mut server = Server::start(&data, Log::File(&log_path), "info", NO_FLUSH);
    let client = reqwest::Client::new();
    create_sessions(&server.base, &client, &["s"]).await;
    for n in 0..3 {
        assert_eq!(append(&client, &server.base, "s", n).await.unwrap().0, 200);
    }
    let archive = rusqlite::Connection::open(data.join("archive.sqlite3")).unwrap();
    archive.execute_batch("BEGIN EXCLUSIVE;").unwrap();

    let (status, took) = server.terminate();
    let status = status.unwrap_or_else(|| panic!("no exit within {EXIT_BOUND:?} of SIGTERM"));
    assert!(took < EXIT_BOUND, "{took:?}");
    assert_eq!(status.code(), Some(0), "{status}");
    let log = std::fs::read_to_string(&log_path).unwrap();
    let line = log
        .lines()
        .find(|line| line.contains("unarchived_shards"))
        .unwrap_or_else(|| panic!("no line naming the unarchived shards:\n{log}"));
    assert!(line.contains("entries)"), "{line}");
    drop(archive);
}
