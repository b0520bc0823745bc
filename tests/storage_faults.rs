//! The storage promise on the unhappy path, against the real `fleetlm` process and real files:
//! bit rot in an acknowledged record, a failing fdatasync (an `LD_PRELOAD` shim), a full disk
//! (a small tmpfs), and a row the archive refuses (a real Postgres constraint).

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{NO_FLUSH, ServerProcess, TestDatabase, call, counter, create_sessions as create, segments_containing};

async fn append(
    base: &str,
    client: &reqwest::Client,
    session: &str,
    content: Value,
    client_id: Option<&str>,
) -> support::Reply {
    let mut body = json!({"user_id": "u", "content": content});
    if let Some(client_id) = client_id {
        body["client_id"] = json!(client_id);
    }
    call(
        client,
        "POST",
        &format!("{base}/api/sessions/{session}/messages"),
        Some(body),
    )
    .await
}

async fn history(base: &str, client: &reqwest::Client, session: &str) -> Vec<Value> {
    let reply = call(
        client,
        "GET",
        &format!("{base}/api/sessions/{session}/messages?after_seq=0&limit=500"),
        None,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.body["messages"].as_array().unwrap().clone()
}

fn seqs(messages: &[Value]) -> Vec<u64> {
    messages.iter().map(|m| m["seq"].as_u64().unwrap()).collect()
}

/// Waits until the server has recovered every shard (ready or not, but no longer recovering).
async fn settled_readiness(base: &str, client: &reqwest::Client) -> support::Reply {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = call(client, "GET", &format!("{base}/health/ready"), None).await;
        if !ready.body.to_string().contains("recovering") {
            return ready;
        }
        assert!(Instant::now() < deadline, "recovery did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The scenario of issue 9, item 1: one byte flipped inside the third of ten acknowledged
/// messages. It must never be taken for a torn tail (which would drop messages 3..10 and hand
/// out seq 3 again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bit_rot_in_an_acknowledged_record_degrades_its_shard_and_no_seq_is_reused() {
    let dir = tempfile::tempdir().unwrap();
    let victim = "victim";
    let victim_shard = fleetlm::ids::shard_for_session(victim, 8);
    // A bystander in the same lane (2 lanes: shard % 2) but another shard.
    let bystander = (0..)
        .map(|n| format!("bystander-{n}"))
        .find(|id| {
            let shard = fleetlm::ids::shard_for_session(id, 8);
            shard != victim_shard && shard % 2 == victim_shard % 2
        })
        .unwrap();
    // A session of the damaged shard written before the damage only: it is in the archive (not
    // in memory) when the repaired shard starts, and must skip seqs when it is loaded.
    let quiet = (0..)
        .map(|n| format!("quiet-{n}"))
        .find(|id| fleetlm::ids::shard_for_session(id, 8) == victim_shard)
        .unwrap();
    let mut server = ServerProcess::start(dir.path(), None, NO_FLUSH);
    let client = reqwest::Client::new();
    create(&server.base, &client, &[victim, &bystander, &quiet]).await;
    for n in 1..=2 {
        let reply = append(
            &server.base,
            &client,
            &quiet,
            json!({"text": format!("quiet {n}")}),
            None,
        )
        .await;
        assert_eq!(reply.status, 200);
    }
    for n in 1..=10 {
        let reply = append(
            &server.base,
            &client,
            victim,
            json!({"text": format!("message-{n:02}-of-ten")}),
            None,
        )
        .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let reply = append(
            &server.base,
            &client,
            &bystander,
            json!({"text": format!("bystander {n}")}),
            None,
        )
        .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    server.kill9();

    let needle = b"message-03-of-ten";
    let damaged = segments_containing(dir.path(), needle);
    assert_eq!(damaged.len(), 1);
    let mut bytes = std::fs::read(&damaged[0]).unwrap();
    let at = bytes.windows(needle.len()).position(|w| w == needle).unwrap();
    bytes[at + 8] ^= 0x04;
    std::fs::write(&damaged[0], &bytes).unwrap();
    let damaged_len = bytes.len();

    // `wal inspect` names the damaged entry without changing a byte.
    let inspect = std::process::Command::new(support::binary())
        .args(["wal", "inspect", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&inspect.stdout);
    assert_eq!(inspect.status.code(), Some(1), "damage found: exit 1\n{report}");
    assert!(
        report.contains(&format!("shard {victim_shard}")) && report.contains("DAMAGED"),
        "{report}"
    );
    assert_eq!(std::fs::read(&damaged[0]).unwrap(), bytes, "inspect writes nothing");

    // Restarted with the flusher running: it archives what it can but deletes nothing of the
    // damaged shard's files.
    let server = ServerProcess::start(dir.path(), None, &["--flush-interval-ms", "50"]);
    let ready = settled_readiness(&server.base, &client).await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    let named = ready.body["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["shard"] == victim_shard && r["reason"].as_str().unwrap().contains("damaged"));
    assert!(named, "readiness names the damaged shard: {}", ready.body);

    let served = history(&server.base, &client, victim).await;
    assert_eq!(seqs(&served), vec![1, 2], "intact records before the damage are served");
    assert_eq!(served[1]["content"]["text"], "message-02-of-ten");

    for _ in 0..3 {
        let refused = append(&server.base, &client, victim, json!({"text": "new"}), None).await;
        assert_eq!(refused.status, 503, "{}", refused.body);
        assert_eq!(refused.body["code"], "shard_degraded");
    }
    let fine = append(&server.base, &client, &bystander, json!({"text": "after"}), None).await;
    assert_eq!(fine.status, 200, "the lane's other shards keep working: {}", fine.body);
    assert_eq!(fine.body["message"]["seq"], 11);

    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        std::fs::metadata(&damaged[0]).map(|m| m.len() as usize).ok(),
        Some(damaged_len),
        "the segment holding the damaged shard's records is neither deleted nor truncated"
    );
    let now = std::fs::read(&damaged[0]).unwrap();
    assert_eq!(
        &now[at..at + needle.len()],
        &bytes[at..at + needle.len()],
        "nor overwritten"
    );

    // The operator accepts the loss of the damaged entry. The server must be stopped first.
    let repair = |dir: &Path| {
        std::process::Command::new(support::binary())
            .args(["wal", "repair", "--data-dir"])
            .arg(dir)
            .args(["--shard", &victim_shard.to_string()])
            .output()
            .unwrap()
    };
    let refused = repair(dir.path());
    assert_eq!(
        refused.status.code(),
        Some(2),
        "a running server holds the data directory"
    );
    drop(server);
    let repaired = repair(dir.path());
    assert!(
        repaired.status.success(),
        "{}",
        String::from_utf8_lossy(&repaired.stderr)
    );
    assert!(String::from_utf8_lossy(&repaired.stdout).contains("accepted the loss"));

    let mut server = ServerProcess::start(dir.path(), None, &["--flush-interval-ms", "50"]);
    let ready = settled_readiness(&server.base, &client).await;
    assert_eq!(ready.status, 200, "the repaired shard serves again: {}", ready.body);
    // Every intact record is served, across the hole the lost message left.
    let served = history(&server.base, &client, victim).await;
    assert_eq!(seqs(&served), vec![1, 2, 4, 5, 6, 7, 8, 9, 10]);
    assert_eq!(served[2]["content"]["text"], "message-04-of-ten");
    let page_url = format!("{}/api/sessions/{victim}/messages?after_seq=2&limit=1", server.base);
    let page = call(&client, "GET", &page_url, None).await;
    assert_eq!(seqs(page.body["messages"].as_array().unwrap()), vec![4]);
    // New messages skip the seqs the lost entry could have held: never 3 again, nor 11.
    let next = append(&server.base, &client, victim, json!({"text": "after repair"}), None).await;
    assert_eq!(next.status, 200, "{}", next.body);
    let next_seq = next.body["message"]["seq"].as_u64().unwrap();
    assert!(next_seq > 11, "the lost entry may have held more seqs: got {next_seq}");
    let bystander_next = append(&server.base, &client, &bystander, json!({"text": "after repair"}), None).await;
    assert_eq!(
        bystander_next.body["message"]["seq"], 12,
        "another shard of the lane lost nothing and skips nothing"
    );
    let quiet_next = append(&server.base, &client, &quiet, json!({"text": "after repair"}), None).await;
    let quiet_seq = quiet_next.body["message"]["seq"].as_u64().unwrap();
    assert!(
        quiet_seq > 3,
        "a session loaded from the archive skips too: {}",
        quiet_next.body
    );
    assert_eq!(
        seqs(&history(&server.base, &client, &quiet).await),
        vec![1, 2, quiet_seq]
    );

    // Another crash after the archive caught up: the skip happened once, everything is still
    // served (now from the archive too), and seqs continue.
    tokio::time::sleep(Duration::from_millis(400)).await;
    server.kill9();
    let server = ServerProcess::start(dir.path(), None, &["--flush-interval-ms", "50"]);
    assert_eq!(settled_readiness(&server.base, &client).await.status, 200);
    let again = append(&server.base, &client, victim, json!({"text": "after restart"}), None).await;
    assert_eq!(
        again.body["message"]["seq"].as_u64().unwrap(),
        next_seq + 1,
        "{}",
        again.body
    );
    assert_eq!(
        seqs(&history(&server.base, &client, victim).await),
        vec![1, 2, 4, 5, 6, 7, 8, 9, 10, next_seq, next_seq + 1]
    );
    let quiet_again = append(&server.base, &client, &quiet, json!({"text": "again"}), None).await;
    assert_eq!(quiet_again.body["message"]["seq"].as_u64().unwrap(), quiet_seq + 1);
}

/// Bit rot in the very last batch a lane wrote (an acknowledged message, then the process
/// stopped): the batch was written whole, so it is corruption, not a torn write. Before, it was
/// dropped as a torn tail and its seq handed out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bit_rot_in_the_newest_batch_degrades_its_shard_and_its_seq_is_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(dir.path(), None, NO_FLUSH);
    let client = reqwest::Client::new();
    create(&server.base, &client, &["newest"]).await;
    for n in 1..=3 {
        // Sent as the agent: no dispatch is recorded after it, so it stays the lane's last batch.
        let body = json!({"agent_id": "a", "content": {"text": format!("newest-batch-{n}")}});
        let url = format!("{}/api/sessions/newest/messages", server.base);
        let reply = call(&client, "POST", &url, Some(body)).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    server.kill9();
    let needle = b"newest-batch-3";
    let damaged = segments_containing(dir.path(), needle);
    assert_eq!(damaged.len(), 1);
    let mut bytes = std::fs::read(&damaged[0]).unwrap();
    let at = bytes.windows(needle.len()).position(|w| w == needle).unwrap();
    bytes[at + 2] ^= 0x01;
    std::fs::write(&damaged[0], &bytes).unwrap();

    let server = ServerProcess::start(dir.path(), None, NO_FLUSH);
    let ready = settled_readiness(&server.base, &client).await;
    assert_eq!(
        ready.status, 503,
        "taken for corruption, not a torn tail: {}",
        ready.body
    );
    let refused = append(&server.base, &client, "newest", json!({"text": "again"}), None).await;
    assert_eq!(
        refused.body["code"], "shard_degraded",
        "seq 3 is never handed out again: {}",
        refused.body
    );
    assert_eq!(seqs(&history(&server.base, &client, "newest").await), vec![1, 2]);
    assert!(
        std::fs::read(&damaged[0]).unwrap()[at..at + needle.len()] == bytes[at..at + needle.len()],
        "the damaged batch is neither zeroed nor overwritten"
    );
    let saved = std::fs::read_dir(damaged[0].parent().unwrap())
        .unwrap()
        .any(|entry| entry.unwrap().file_name().to_string_lossy().starts_with("torn-"));
    assert!(!saved, "not set aside as a torn tail");
}

/// `wal repair` on a shard holding many sessions: every one of them skips the seqs the lost
/// entry could have held. Written as one entry, those skips exceed the WAL's entry limit (64 KiB
/// segments: about 32 KiB) and the shard stayed unavailable at every start; they must be split.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_of_a_shard_with_many_sessions_writes_its_seq_skips_in_entries_that_fit() {
    let dir = tempfile::tempdir().unwrap();
    let victim = "victim";
    let victim_shard = fleetlm::ids::shard_for_session(victim, 8);
    // ~150 bytes of skip per session: 400 sessions need about 60 KiB.
    let many: Vec<String> = (0..)
        .map(|n| format!("crowd-{n:05}-with-an-id-long-enough-to-matter"))
        .filter(|id| fleetlm::ids::shard_for_session(id, 8) == victim_shard)
        .take(400)
        .collect();
    let mut flags = NO_FLUSH.to_vec();
    flags.extend(["--wal-segment-bytes", "65536", "--max-message-bytes", "8192"]);
    let mut server = ServerProcess::start(dir.path(), None, &flags);
    let client = reqwest::Client::new();
    let mut ids: Vec<&str> = many.iter().map(String::as_str).collect();
    ids.push(victim);
    create(&server.base, &client, &ids).await;
    for n in 1..=3 {
        let text = format!("crowded-{n:02}-message");
        let reply = append(&server.base, &client, victim, json!({ "text": text }), None).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    server.kill9();

    let needle = b"crowded-02-message";
    let damaged = segments_containing(dir.path(), needle);
    assert_eq!(damaged.len(), 1);
    let mut bytes = std::fs::read(&damaged[0]).unwrap();
    let at = bytes.windows(needle.len()).position(|w| w == needle).unwrap();
    bytes[at + 3] ^= 0x02;
    std::fs::write(&damaged[0], &bytes).unwrap();

    let repaired = std::process::Command::new(support::binary())
        .args(["wal", "repair", "--data-dir"])
        .arg(dir.path())
        .args(["--shard", &victim_shard.to_string()])
        .output()
        .unwrap();
    assert!(
        repaired.status.success(),
        "{}",
        String::from_utf8_lossy(&repaired.stderr)
    );

    for restart in 0..2 {
        let mut server = ServerProcess::start(dir.path(), None, &flags);
        let ready = settled_readiness(&server.base, &client).await;
        assert_eq!(
            ready.status, 200,
            "the repaired shard serves again (start {restart}): {}",
            ready.body
        );
        let next = append(&server.base, &client, &many[0], json!({"text": "after"}), None).await;
        assert_eq!(next.status, 200, "{}", next.body);
        let seq = next.body["message"]["seq"].as_u64().unwrap();
        if restart == 0 {
            assert!(seq > 1, "the session skipped the seqs the lost entry could have held");
        }
        let last = append(&server.base, &client, &many[399], json!({"text": "after"}), None).await;
        assert!(
            last.body["message"]["seq"].as_u64().unwrap() > 1,
            "every session skipped: {}",
            last.body
        );
        server.kill9();
    }
}

/// One unreadable sector (EIO on every read touching it, through an `LD_PRELOAD` shim) in the
/// middle of an acknowledged message: the node starts anyway, exactly the shard whose record
/// the sector holds is degraded (the lane's other shard serves and writes), `wal inspect`
/// names the unreadable region with its exact position, and `wal repair` works on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_sector_degrades_only_its_shard_and_the_node_still_starts() {
    let dir = tempfile::tempdir().unwrap();
    let tools = tempfile::tempdir().unwrap();
    let shim = support::build_fault_shim(tools.path());
    let control = tools.path().join("unreadable");
    let victim = "victim";
    let victim_shard = fleetlm::ids::shard_for_session(victim, 8);
    let bystander = (0..)
        .map(|n| format!("bystander-{n}"))
        .find(|id| {
            let shard = fleetlm::ids::shard_for_session(id, 8);
            shard != victim_shard && shard % 2 == victim_shard % 2
        })
        .unwrap();
    let mut server = ServerProcess::start(dir.path(), None, NO_FLUSH);
    let client = reqwest::Client::new();
    create(&server.base, &client, &[victim, &bystander]).await;
    let big = format!("big-message-{}", "x".repeat(3000));
    for text in ["before", big.as_str(), "after"] {
        let reply = append(&server.base, &client, victim, json!({ "text": text }), None).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let reply = append(&server.base, &client, &bystander, json!({ "text": text }), None).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    server.kill9();

    // The first sector wholly inside the victim's big message: it touches no other record.
    let needle = b"big-message-xxxx";
    let segments = segments_containing(dir.path(), needle);
    let segment = &segments[0];
    let bytes = std::fs::read(segment).unwrap();
    let mut at = 0;
    while let Some(found) = bytes[at..].windows(needle.len()).position(|w| w == needle) {
        let start = at + found;
        let sector = start.next_multiple_of(512);
        if sector + 512 <= start + 3000 {
            at = sector;
            break;
        }
        at = start + 1;
    }
    assert!(at > 0 && at % 512 == 0);
    std::fs::write(&control, format!("{} {} {}", segment.display(), at, at + 512)).unwrap();
    let env = [
        ("LD_PRELOAD", shim.as_path()),
        ("FLEETLM_FAULT_UNREADABLE", control.as_path()),
    ];
    let cli = |args: &[&str]| {
        let mut command = std::process::Command::new(support::binary());
        command.args(args).arg("--data-dir").arg(dir.path());
        for (name, value) in env {
            command.env(name, value);
        }
        command.output().unwrap()
    };

    let inspect = cli(&["wal", "inspect"]);
    let report = String::from_utf8_lossy(&inspect.stdout);
    assert_eq!(
        inspect.status.code(),
        Some(1),
        "{report}{}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    let segment_no: u64 = segment.file_stem().unwrap().to_string_lossy().parse().unwrap();
    assert!(
        report.contains(&format!("UNREADABLE at segment {segment_no} offset {at} (512 bytes)")),
        "{report}"
    );
    assert!(
        report.contains(&format!("of shard {victim_shard}")) && report.contains("DAMAGED"),
        "{report}"
    );
    let bystander_shard = fleetlm::ids::shard_for_session(&bystander, 8);
    let bystander_line = report
        .lines()
        .find(|line| line.starts_with(&format!("  shard {bystander_shard}:")))
        .unwrap();
    assert!(bystander_line.ends_with("; ok"), "{report}");

    let server = ServerProcess::start_with_env(dir.path(), None, NO_FLUSH, &env);
    let ready = settled_readiness(&server.base, &client).await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    let reasons = ready.body["reasons"].as_array().unwrap();
    assert!(reasons.iter().any(|r| r["shard"] == victim_shard), "{}", ready.body);
    assert!(reasons.iter().all(|r| r["shard"] != bystander_shard), "{}", ready.body);
    assert_eq!(seqs(&history(&server.base, &client, victim).await), vec![1]);
    assert_eq!(seqs(&history(&server.base, &client, &bystander).await), vec![1, 2, 3]);
    let fine = append(&server.base, &client, &bystander, json!({"text": "more"}), None).await;
    assert_eq!(fine.status, 200, "{}", fine.body);
    let refused = append(&server.base, &client, victim, json!({"text": "more"}), None).await;
    assert_eq!(refused.body["code"], "shard_degraded", "{}", refused.body);
    drop(server);

    let repaired = cli(&["wal", "repair", "--shard", &victim_shard.to_string()]);
    assert!(
        repaired.status.success(),
        "{}",
        String::from_utf8_lossy(&repaired.stderr)
    );
    let server = ServerProcess::start_with_env(dir.path(), None, NO_FLUSH, &env);
    let ready = settled_readiness(&server.base, &client).await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(seqs(&history(&server.base, &client, victim).await), vec![1, 3]);
    let next = append(&server.base, &client, victim, json!({"text": "after repair"}), None).await;
    assert!(next.body["message"]["seq"].as_u64().unwrap() > 3, "{}", next.body);
}

/// A failed fdatasync: the append gets `503 storage_failed`, the message is never visible (no
/// read, no dedupe), and the lane takes no writes while the disk keeps failing. Once the disk
/// behaves again the lane heals by itself, without a restart (it seals the failed segment and
/// writes to a new one, never fsyncing the failed data again): writes and readiness come back,
/// the failed write is still absent, and a retry with its client_id stores it exactly once. A
/// restart (kill -9) then recovers the same history from what is on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fdatasync_shows_nothing_and_the_lane_heals_once_the_disk_does() {
    let dir = tempfile::tempdir().unwrap();
    let tools = tempfile::tempdir().unwrap();
    let shim = support::build_fault_shim(tools.path());
    let control = tools.path().join("fail-fsync");
    let mut server = ServerProcess::start_with_env(
        dir.path(),
        None,
        NO_FLUSH,
        &[("LD_PRELOAD", &shim), ("FLEETLM_FAULT_CONTROL", &control)],
    );
    let client = reqwest::Client::new();
    create(&server.base, &client, &["s"]).await;
    let first = append(&server.base, &client, "s", json!({"text": "one"}), Some("c1")).await;
    assert_eq!(first.status, 200, "{}", first.body);

    std::fs::write(&control, b"eio").unwrap();
    let failed = append(&server.base, &client, "s", json!({"text": "two"}), Some("c2")).await;
    assert_eq!(failed.status, 503, "{}", failed.body);
    assert_eq!(failed.body["code"], "storage_failed");
    assert!(
        !failed.body["error"].as_str().unwrap().contains("/wal/"),
        "no internal paths for end users: {}",
        failed.body
    );
    assert_eq!(
        seqs(&history(&server.base, &client, "s").await),
        vec![1],
        "what failed to become durable is not served"
    );
    let retry = append(&server.base, &client, "s", json!({"text": "two"}), Some("c2")).await;
    assert_eq!(
        retry.status, 503,
        "a retry is not 'deduplicated' against a write that is not on disk: {}",
        retry.body
    );

    let ready = settled_readiness(&server.base, &client).await;
    assert_eq!(ready.status, 503);
    assert!(ready.body.to_string().contains("fdatasync"), "{}", ready.body);

    // While the disk keeps failing, the lane's attempts to heal fail too (its first comes
    // after a second): writes are still refused.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let still = append(&server.base, &client, "s", json!({"text": "three"}), Some("c3")).await;
    assert_eq!(still.status, 503, "no write while the disk fails: {}", still.body);
    assert_eq!(still.body["code"], "storage_failed");

    std::fs::remove_file(&control).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(45);
    let healed = loop {
        let attempt = append(&server.base, &client, "s", json!({"text": "two"}), Some("c2")).await;
        if attempt.status == 200 {
            break attempt;
        }
        assert_eq!(attempt.body["code"], "storage_failed", "{}", attempt.body);
        assert!(
            std::time::Instant::now() < deadline,
            "the lane did not heal once the disk behaved: {}",
            attempt.body
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(
        healed.body["message"]["seq"], 2,
        "the failed write left no seq behind: {}",
        healed.body
    );
    let ready = settled_readiness(&server.base, &client).await;
    assert_eq!(ready.status, 200, "ready again without a restart: {}", ready.body);
    let after = append(&server.base, &client, "s", json!({"text": "four"}), Some("c4")).await;
    assert_eq!(after.status, 200, "{}", after.body);
    let expected = vec!["one", "two", "four"];
    let texts = |messages: &[Value]| -> Vec<String> {
        messages
            .iter()
            .map(|m| m["content"]["text"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let messages = history(&server.base, &client, "s").await;
    assert_eq!(texts(&messages), expected);
    assert_eq!(seqs(&messages), vec![1, 2, 3]);
    server.kill9();

    // A restart recovers exactly that from the disk: the sealed-off failed write never
    // comes back, nothing is duplicated or reused.
    let server = ServerProcess::start(dir.path(), None, NO_FLUSH);
    let messages = history(&server.base, &client, "s").await;
    assert_eq!(texts(&messages), expected);
    let retry = append(&server.base, &client, "s", json!({"text": "two"}), Some("c2")).await;
    assert_eq!(retry.status, 200, "{}", retry.body);
    assert_eq!(retry.body["deduplicated"], true, "{}", retry.body);
    let next = append(&server.base, &client, "s", json!({"text": "five"}), Some("c5")).await;
    assert_eq!(next.body["message"]["seq"], 4, "{}", next.body);
}

/// A mounted tmpfs, unmounted when dropped.
struct SmallDisk {
    mount_point: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(megabytes: u32) -> SmallDisk {
        let mount_point = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(mount_point.path())
            .status()
            .expect("mount(8)");
        assert!(
            status.success(),
            "mounting a small tmpfs failed: this test needs root (as CI has) to fill a real disk"
        );
        SmallDisk { mount_point }
    }

    fn path(&self) -> &Path {
        self.mount_point.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.mount_point.path())
            .status();
    }
}

/// A full disk: appends get `507 insufficient_storage` with the usual error body (never a
/// dropped connection, never 500), nothing acknowledged is lost, and writes resume by themselves
/// once space is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_507_and_writes_resume_when_space_returns() {
    let disk = SmallDisk::mount(8);
    let data_dir = disk.path().join("data");
    let mut flags = NO_FLUSH.to_vec();
    flags.extend(["--wal-segment-bytes", "1048576"]);
    let mut server = ServerProcess::start(&data_dir, None, &flags);
    let client = reqwest::Client::new();
    create(&server.base, &client, &["s"]).await;
    // Leave about 1.5 MiB: a few more batches fit, the next 1 MiB segments do not both fit.
    let free = fs_free_bytes(disk.path());
    let filler = disk.path().join("filler");
    std::fs::write(&filler, vec![1u8; (free - 1536 * 1024) as usize]).unwrap();

    let pad = "p".repeat(50_000);
    let mut acked = 0u64;
    let mut refused = None;
    for n in 0..200 {
        let reply = append(
            &server.base,
            &client,
            "s",
            json!({"n": n, "pad": pad}),
            Some(&format!("c{n}")),
        )
        .await;
        match reply.status {
            200 => acked += 1,
            507 => {
                refused = Some((n, reply));
                break;
            }
            other => panic!("unexpected status {other}: {}", reply.body),
        }
    }
    let (refused_n, refused) = refused.expect("the disk filled up");
    assert_eq!(refused.body["code"], "insufficient_storage", "{}", refused.body);
    assert!(refused.body["error"].is_string());
    assert!(acked > 0);
    // Still full: still 507, and nothing of the refused requests is visible.
    let again = append(
        &server.base,
        &client,
        "s",
        json!({"n": refused_n, "pad": pad}),
        Some(&format!("c{refused_n}")),
    )
    .await;
    assert_eq!(again.status, 507, "{}", again.body);
    assert_eq!(seqs(&history(&server.base, &client, "s").await).len() as u64, acked);

    std::fs::remove_file(&filler).unwrap();
    let resumed = append(
        &server.base,
        &client,
        "s",
        json!({"n": refused_n, "pad": pad}),
        Some(&format!("c{refused_n}")),
    )
    .await;
    assert_eq!(resumed.status, 200, "writes resume by themselves: {}", resumed.body);
    assert_eq!(
        resumed.body["message"]["seq"],
        acked + 1,
        "the refused request took no seq"
    );
    let messages = history(&server.base, &client, "s").await;
    assert_eq!(seqs(&messages), (1..=acked + 1).collect::<Vec<_>>());

    // And nothing is corrupted: a restart recovers every acknowledged message.
    server.kill9();
    let server = ServerProcess::start(&data_dir, None, &flags);
    let ready = settled_readiness(&server.base, &client).await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(
        seqs(&history(&server.base, &client, "s").await),
        (1..=acked + 1).collect::<Vec<_>>()
    );
    drop(server);
}

/// Each write refused for space undoes only what it changed: the shard is not replayed as a
/// whole (no full rebuild is counted, a partial one is), and its state is exactly the durable
/// log's afterwards: no phantom seq, the next append gets the right seq, dedupe answers only
/// durable client_ids, and another session of the shard is as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_refused_for_space_undoes_only_its_sessions_without_a_full_replay() {
    let disk = SmallDisk::mount(8);
    let data_dir = disk.path().join("data");
    let mut flags = NO_FLUSH.to_vec();
    flags.extend(["--wal-segment-bytes", "1048576"]);
    let server = ServerProcess::start(&data_dir, None, &flags);
    let client = reqwest::Client::new();
    let neighbour = (0..)
        .map(|n| format!("neighbour-{n}"))
        .find(|id| fleetlm::ids::shard_for_session(id, 8) == fleetlm::ids::shard_for_session("s", 8))
        .unwrap();
    create(&server.base, &client, &["s", &neighbour]).await;
    for n in 0..3 {
        let reply = append(
            &server.base,
            &client,
            &neighbour,
            json!({"n": n}),
            Some(&format!("n{n}")),
        )
        .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    let free = fs_free_bytes(disk.path());
    let filler = disk.path().join("filler");
    std::fs::write(&filler, vec![1u8; (free - 1536 * 1024) as usize]).unwrap();

    let pad = "p".repeat(50_000);
    let mut acked = 0u64;
    let mut refused_n = None;
    for n in 0..200 {
        let reply = append(
            &server.base,
            &client,
            "s",
            json!({"n": n, "pad": pad}),
            Some(&format!("c{n}")),
        )
        .await;
        match reply.status {
            200 => acked += 1,
            507 => {
                refused_n = Some(n);
                break;
            }
            other => panic!("unexpected status {other}: {}", reply.body),
        }
    }
    let refused_n = refused_n.expect("the disk filled up");
    for _ in 0..3 {
        let again = append(
            &server.base,
            &client,
            "s",
            json!({"n": refused_n, "pad": pad}),
            Some(&format!("c{refused_n}")),
        )
        .await;
        assert_eq!(
            again.status, 507,
            "a refused client_id is never 'deduplicated': {}",
            again.body
        );
    }
    assert_eq!(
        counter(&server.base, "fleetlm_shard_rebuilds_total").await,
        0.0,
        "no write refused for space replays the whole shard"
    );
    assert!(counter(&server.base, "fleetlm_shard_partial_rebuilds_total").await >= 1.0);
    // A durable client_id is still recognised; the state shows nothing of the refused writes.
    let duplicate = append(&server.base, &client, "s", json!({"n": 0, "pad": pad}), Some("c0")).await;
    assert_eq!(duplicate.status, 200, "{}", duplicate.body);
    assert_eq!(duplicate.body["message"]["seq"], 1, "{}", duplicate.body);
    assert_eq!(
        seqs(&history(&server.base, &client, "s").await),
        (1..=acked).collect::<Vec<_>>()
    );

    std::fs::remove_file(&filler).unwrap();
    let resumed = append(
        &server.base,
        &client,
        "s",
        json!({"n": refused_n, "pad": pad}),
        Some(&format!("c{refused_n}")),
    )
    .await;
    assert_eq!(resumed.status, 200, "{}", resumed.body);
    assert_eq!(resumed.body["message"]["seq"], acked + 1, "no phantom seq");
    let neighbour_next = append(&server.base, &client, &neighbour, json!({"n": 3}), Some("n3")).await;
    assert_eq!(neighbour_next.body["message"]["seq"], 4, "{}", neighbour_next.body);
    let neighbour_duplicate = append(&server.base, &client, &neighbour, json!({"n": 1}), Some("n1")).await;
    assert_eq!(
        neighbour_duplicate.body["message"]["seq"], 2,
        "{}",
        neighbour_duplicate.body
    );
    assert_eq!(
        seqs(&history(&server.base, &client, "s").await),
        (1..=acked + 1).collect::<Vec<_>>()
    );
    assert_eq!(counter(&server.base, "fleetlm_shard_rebuilds_total").await, 0.0);
    drop(server);
}

fn fs_free_bytes(path: &Path) -> u64 {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) }, 0);
    stat.f_bavail as u64 * stat.f_frsize as u64
}

async fn postgres(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// A row the archive refuses is set aside as a dead letter with the archive's own error; every
/// other row (other sessions and the same session) keeps flowing; the refused message is still
/// served, also after a restart; and a NUL in message text is archived fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_archive_refuses_is_dead_lettered_and_the_flush_goes_on() {
    let database = TestDatabase::create();
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(dir.path(), Some(&database.url), &["--flush-interval-ms", "50"]);
    let client = reqwest::Client::new();
    create(&server.base, &client, &["victim", "other"]).await;
    let db = postgres(&database.url).await;
    // A real refusal by the real archive: a constraint the rows of one message violate.
    db.batch_execute("ALTER TABLE messages ADD CONSTRAINT no_poison CHECK (content NOT LIKE '%POISON%')")
        .await
        .unwrap();

    let base = &server.base;
    assert_eq!(
        append(base, &client, "victim", json!({"text": "before"}), Some("v1"))
            .await
            .status,
        200
    );
    assert_eq!(
        append(base, &client, "victim", json!({"text": "POISON"}), Some("v2"))
            .await
            .status,
        200
    );
    assert_eq!(
        append(base, &client, "victim", json!({"text": "after"}), Some("v3"))
            .await
            .status,
        200
    );
    let nul = append(base, &client, "other", json!({"text": "a\u{0}b"}), Some("o1")).await;
    assert_eq!(nul.status, 200, "{}", nul.body);
    assert_eq!(
        append(base, &client, "other", json!({"text": "fine"}), Some("o2"))
            .await
            .status,
        200
    );

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let archived: i64 = db.query_one("SELECT count(*) FROM messages", &[]).await.unwrap().get(0);
        if archived == 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the flush did not go on ({archived} rows archived)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let last_seq: i64 = db
        .query_one("SELECT last_seq FROM sessions WHERE id = 'victim'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        last_seq, 3,
        "the session's last seq is archived although one of its rows was refused"
    );

    let listed = call(&client, "GET", &format!("{base}/api/admin/dead_letters"), None).await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    let letters = listed.body["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 1, "{}", listed.body);
    assert_eq!(letters[0]["kind"], "message");
    assert_eq!(letters[0]["session_id"], "victim");
    assert_eq!(letters[0]["seq"], 2);
    assert!(
        letters[0]["error"].as_str().unwrap().contains("no_poison"),
        "the archive's own error: {}",
        letters[0]
    );

    // Still served, also from the archive after a restart (the hot tail comes from it).
    assert_eq!(seqs(&history(base, &client, "victim").await), vec![1, 2, 3]);
    server.kill9();
    let server = ServerProcess::start(dir.path(), Some(&database.url), &["--flush-interval-ms", "50"]);
    let base = &server.base;
    let messages = history(base, &client, "victim").await;
    assert_eq!(seqs(&messages), vec![1, 2, 3]);
    assert_eq!(messages[1]["content"]["text"], "POISON");
    let retry = append(base, &client, "victim", json!({"text": "POISON"}), Some("v2")).await;
    assert_eq!(retry.status, 200);
    assert_eq!(retry.body["deduplicated"], true, "{}", retry.body);
    assert_eq!(retry.body["message"]["seq"], 2);
    let next = append(base, &client, "victim", json!({"text": "next"}), None).await;
    assert_eq!(next.body["message"]["seq"], 4);
    let other = history(base, &client, "other").await;
    assert_eq!(other[0]["content"]["text"], "a\u{0}b");
}
