//! Recovery and lifecycle of the real process: orderly shutdown flushes everything, a corrupt
//! WAL record degrades only its shard, and a WAL over budget refuses appends until the archive
//! catches up.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{NO_FLUSH, ServerProcess, TestDatabase, call, create_sessions as create};

async fn append(base: &str, client: &reqwest::Client, session: &str, content: serde_json::Value) -> support::Reply {
    call(
        client,
        "POST",
        &format!("{base}/api/sessions/{session}/messages"),
        Some(json!({"user_id": "u", "content": content})),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_flushes_the_archive_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(dir.path(), None, NO_FLUSH);
    let client = reqwest::Client::new();
    create(&server.base, &client, &["s"]).await;
    for n in 0..50 {
        assert_eq!(append(&server.base, &client, "s", json!({"n": n})).await.status, 200);
    }
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "server did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    let archive = rusqlite::Connection::open(dir.path().join("archive.sqlite3")).unwrap();
    let archived: i64 = archive
        .query_row("SELECT count(*) FROM messages WHERE session_id = 's'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(archived, 50, "the final flush archived every message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_wal_record_degrades_only_its_shard_and_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Two sessions on different shards.
    let victim = "victim";
    let victim_shard = fleetlm::ids::shard_for_session(victim, 8);
    let bystander = (0..)
        .map(|n| format!("bystander-{n}"))
        .find(|id| fleetlm::ids::shard_for_session(id, 8) != victim_shard)
        .unwrap();
    let mut server = ServerProcess::start(dir.path(), None, NO_FLUSH);
    let client = reqwest::Client::new();
    create(&server.base, &client, &[victim, &bystander]).await;
    assert_eq!(
        append(&server.base, &client, victim, json!({"text": "ROT-ME-PLEASE"}))
            .await
            .status,
        200
    );
    // Enough later data in every lane that the damaged record is not in the newest segment.
    let filler = "f".repeat(60_000);
    for n in 0..40 {
        assert_eq!(
            append(&server.base, &client, victim, json!({"n": n, "pad": filler}))
                .await
                .status,
            200
        );
        assert_eq!(
            append(&server.base, &client, &bystander, json!({"n": n, "pad": filler}))
                .await
                .status,
            200
        );
    }
    server.kill9();

    let mut damaged = None;
    for lane in std::fs::read_dir(dir.path().join("wal")).unwrap() {
        let lane = lane.unwrap().path();
        for segment in std::fs::read_dir(&lane).unwrap() {
            let path = segment.unwrap().path();
            let mut bytes = std::fs::read(&path).unwrap();
            if let Some(at) = bytes.windows(13).position(|w| w == b"ROT-ME-PLEASE") {
                bytes[at] ^= 0x01;
                std::fs::write(&path, &bytes).unwrap();
                damaged = Some((path, bytes.len()));
            }
        }
    }
    let (damaged_path, damaged_len) = damaged.expect("the record is in the wal");

    let server = ServerProcess::start(dir.path(), None, NO_FLUSH);
    let ready = loop {
        let ready = call(&client, "GET", &format!("{}/health/ready", server.base), None).await;
        if !ready.body.to_string().contains("recovering") {
            break ready;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(ready.status, 503);
    let reasons = ready.body["reasons"].as_array().unwrap();
    assert!(
        reasons
            .iter()
            .any(|r| r["shard"] == victim_shard && r["reason"].as_str().unwrap().contains("degraded")),
        "{}",
        ready.body
    );
    let refused = append(&server.base, &client, victim, json!({"text": "after"})).await;
    assert_eq!(
        refused.status, 503,
        "a degraded shard takes no appends: {}",
        refused.body
    );
    let fine = append(&server.base, &client, &bystander, json!({"text": "after"})).await;
    assert_eq!(fine.status, 200);
    assert_eq!(fine.body["message"]["seq"], 41, "the other shard continues");
    assert_eq!(
        std::fs::metadata(&damaged_path).unwrap().len() as usize,
        damaged_len,
        "nothing deleted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_wal_budget_appends_get_503_until_the_archive_catches_up() {
    let database = TestDatabase::create();
    let dir = tempfile::tempdir().unwrap();
    // 2 lanes start with one 1 MiB segment each; allow two more.
    let flags = [
        "--wal-budget-bytes",
        "4194304",
        "--flush-interval-ms",
        "600000",
        "--flush-threshold-bytes",
        "1000000000",
    ];
    let server = ServerProcess::start(dir.path(), Some(&database.url), &flags);
    let client = reqwest::Client::new();
    create(&server.base, &client, &["s"]).await;
    let filler = "f".repeat(60_000);
    let mut overloaded = None;
    for n in 0..200 {
        let reply = append(&server.base, &client, "s", json!({"n": n, "pad": filler})).await;
        if reply.status == 503 {
            overloaded = Some(reply);
            break;
        }
        assert_eq!(reply.status, 200);
    }
    let overloaded = overloaded.expect("the budget was reached");
    assert_eq!(overloaded.body["code"], "overloaded");
    assert!(overloaded.headers.contains_key("retry-after"));
    drop(server);

    // With the flusher running, the backlog drains and appends are accepted again.
    let server = ServerProcess::start(dir.path(), Some(&database.url), &["--wal-budget-bytes", "4194304"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reply = append(&server.base, &client, "s", json!({"text": "again"})).await;
        if reply.status == 200 {
            break;
        }
        assert_eq!(reply.status, 503);
        assert!(Instant::now() < deadline, "appends never resumed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
