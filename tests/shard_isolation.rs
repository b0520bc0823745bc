//! One degraded shard against the real `fleetlm` process: its lane's other shards, and the other
//! lane, keep writing past what the whole WAL's budget would have allowed (the degraded shard's
//! segments do not count against them), its files stay untouched, and disk stays bounded.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{NO_FLUSH, ServerProcess, call, create_sessions as create};

const SEGMENT_BYTES: u64 = 64 * 1024;

async fn append(base: &str, client: &reqwest::Client, session: &str, text: String) -> support::Reply {
    call(
        client,
        "POST",
        &format!("{base}/api/sessions/{session}/messages"),
        Some(json!({"user_id": "u", "content": {"text": text}})),
    )
    .await
}

/// A message of about 6 KB whose text starts with `label`.
fn big(label: &str) -> String {
    format!("{label}:{}", "x".repeat(6000))
}

fn segment_files(data_dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for lane in std::fs::read_dir(data_dir.join("wal")).unwrap() {
        let lane = lane.unwrap().path();
        if !lane.is_dir() || !lane.file_name().unwrap().to_string_lossy().starts_with("lane-") {
            continue;
        }
        for segment in std::fs::read_dir(&lane).unwrap() {
            let path = segment.unwrap().path();
            if path.extension().is_some_and(|ext| ext == "wal") {
                found.push(path);
            }
        }
    }
    found
}

fn holding(data_dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    segment_files(data_dir)
        .into_iter()
        .filter(|path| std::fs::read(path).unwrap().windows(needle.len()).any(|w| w == needle))
        .collect()
}

fn wal_disk_bytes(data_dir: &Path) -> u64 {
    segment_files(data_dir)
        .iter()
        .map(|path| std::fs::metadata(path).unwrap().len())
        .sum()
}

/// Appends until it is acknowledged, waiting out `overloaded` (the archive catching up) for at
/// most 10 s.
async fn append_acknowledged(base: &str, client: &reqwest::Client, session: &str, text: String) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = append(base, client, session, text.clone()).await;
        if reply.status == 200 {
            return reply.body;
        }
        assert!(
            reply.status == 503 && reply.body["code"] == "overloaded" && Instant::now() < deadline,
            "{session}: {} {}",
            reply.status,
            reply.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_degraded_shard_does_not_push_the_others_into_overloaded() {
    let dir = tempfile::tempdir().unwrap();
    let victim = "victim";
    let victim_shard = fleetlm::ids::shard_for_session(victim, 8);
    let shard_of = |id: &str| fleetlm::ids::shard_for_session(id, 8);
    let neighbour = (0..)
        .map(|n| format!("neighbour-{n}"))
        .find(|id| shard_of(id) != victim_shard && shard_of(id) % 2 == victim_shard % 2)
        .unwrap();
    let other_lane = (0..)
        .map(|n| format!("other-{n}"))
        .find(|id| shard_of(id) % 2 != victim_shard % 2)
        .unwrap();
    let small_segments = ["--wal-segment-bytes", "65536", "--max-message-bytes", "8192"];
    let mut server = ServerProcess::start(dir.path(), None, &[NO_FLUSH, &small_segments[..]].concat());
    let client = reqwest::Client::new();
    create(&server.base, &client, &[victim, &neighbour, &other_lane]).await;
    // The victim's records spread over many segments of its lane, interleaved with its
    // neighbour's; the archive has none of them yet.
    for n in 1..=40 {
        assert_eq!(
            append(&server.base, &client, victim, big(&format!("victim-{n:02}")))
                .await
                .status,
            200
        );
        assert_eq!(
            append(&server.base, &client, &neighbour, big("before")).await.status,
            200
        );
    }
    server.kill9();
    let needle = b"victim-03";
    let damaged = holding(dir.path(), needle);
    assert_eq!(damaged.len(), 1);
    let mut bytes = std::fs::read(&damaged[0]).unwrap();
    let at = bytes.windows(needle.len()).position(|w| w == needle).unwrap();
    bytes[at + 12] ^= 0x04;
    std::fs::write(&damaged[0], &bytes).unwrap();
    let victim_files: Vec<(PathBuf, Vec<u8>)> = holding(dir.path(), b"victim-")
        .into_iter()
        .map(|path| {
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    let pinned = victim_files.len() as u64 * SEGMENT_BYTES;
    // The budget is smaller than what the degraded shard's files alone take: counted over the
    // whole WAL, every shard would answer `overloaded` for good.
    let budget = 3 * SEGMENT_BYTES;
    assert!(
        pinned > budget,
        "{} segments hold the victim's records",
        victim_files.len()
    );

    let budget_text = budget.to_string();
    let flags = [
        &small_segments[..],
        &["--flush-interval-ms", "50", "--wal-budget-bytes", &budget_text],
    ]
    .concat();
    let server = ServerProcess::start(dir.path(), None, &flags);
    let refused = append(&server.base, &client, victim, big("after")).await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.body["code"], "shard_degraded");

    // Far more than the budget, in both lanes.
    let mut highest = 0;
    for n in 1..=60 {
        for session in [&neighbour, &other_lane] {
            let body = append_acknowledged(&server.base, &client, session, big(&format!("after-{n}"))).await;
            highest = highest.max(body["message"]["seq"].as_u64().unwrap());
        }
        assert!(
            wal_disk_bytes(dir.path()) <= pinned + budget + 4 * SEGMENT_BYTES,
            "disk stays bounded: {} bytes",
            wal_disk_bytes(dir.path())
        );
    }
    assert_eq!(highest, 100, "the neighbour's 40 earlier messages and 60 new ones");
    for (path, before) in &victim_files {
        let now = std::fs::read(path).expect("a file holding the degraded shard's records is kept");
        // The newest may have been written on after its end (zeros before).
        let used = before.iter().rposition(|b| *b != 0).map_or(0, |last| last + 1);
        assert_eq!(&now[..used], &before[..used], "{} is not overwritten", path.display());
    }
}
