//! Ordered appends (`AppendOrder`) against a real shard writer, WAL and SQLite archive, with
//! the interleavings that used to let a later send overtake an earlier one.

use std::sync::Arc;

use serde_json::value::RawValue;
use tokio::sync::mpsc;

use super::writer::{Command, ShardWriter};
use super::{AppendOrder, AppendRequest, ShardState, Shards, Writer};
use crate::archive::Archive;
use crate::clock::SystemClock;
use crate::model::{SessionRecord, Timestamp};
use crate::wal::{Wal, WalOptions};

/// One shard, its writer running, over a temporary directory (kept alive by the result).
async fn one_shard() -> (Shards, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = WalOptions {
        lanes: 1,
        shard_count: 1,
        segment_bytes: 1024 * 1024,
        max_batch_bytes: 256 * 1024,
        queue_depth: 64,
    };
    let (wal, _) = Wal::open(&dir.path().join("wal"), options).expect("wal opens");
    let wal = Arc::new(wal);
    let archive = Archive::open_sqlite(&dir.path().join("archive.sqlite3")).expect("archive opens");
    archive.migrate().await.expect("migrate");
    let (sender, receiver) = mpsc::channel::<Command>(64);
    let writer_state = Arc::new(Writer::default());
    let writer = ShardWriter {
        shard: 0,
        wal: wal.clone(),
        archive: archive.clone(),
        clock: Arc::new(SystemClock),
        state: ShardState::new(0),
        refusal: None,
        refused_for_lane: false,
        rebuild_cause: None,
        losses: Vec::new(),
        max_op_bytes: wal.max_entry_bytes() / 2,
        last_inserted_at: 0,
        flush_wakeup: Arc::new(tokio::sync::Notify::new()),
        flush_threshold_bytes: usize::MAX,
        unflushed_bytes: 0,
        wal_budget_bytes: u64::MAX,
        entry_soft_limit_bytes: wal.max_entry_bytes() / 2,
        writer_state: writer_state.clone(),
        hub: crate::hub::Hub::new(1),
        user_messages: Arc::new(super::NoAgentEngine),
        cluster: None,
    };
    tokio::spawn(async move {
        let mut receiver = receiver;
        writer.run(&mut receiver, &mut None).await;
    });
    // Recovery replaces the state (a new epoch): an install read before it would be dropped.
    while !writer_state.recovered.load(std::sync::atomic::Ordering::Acquire) {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let shards = Shards::new(vec![sender], vec![writer_state], wal, archive, None);
    (shards, dir)
}

fn raw(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_string()).expect("valid json")
}

fn send(session_id: &str, n: u64, client_id: Option<&str>) -> AppendRequest {
    AppendRequest {
        session_id: session_id.to_string(),
        sender_id: "u".into(),
        sender_is_user: true,
        kind: "text".into(),
        content: raw(&format!("{{\"n\":{n}}}")),
        metadata: raw("{}"),
        client_id: client_id.map(str::to_owned),
        expected_seq: None,
        fingerprint: n,
        archive_checked_below: None,
        leader_term: None,
    }
}

/// A session the archive has and the writer does not hold (as after an eviction).
async fn archived_session(shards: &Shards, id: &str) {
    let record = SessionRecord {
        id: Arc::from(id),
        user_id: "u".into(),
        agent_id: "a".into(),
        metadata: raw("{}"),
        inserted_at: Timestamp(1),
    };
    shards.archive().record_session(&record).await.expect("session row");
}

/// How the session load lands between the two sends.
#[derive(Clone, Copy)]
enum Interleaving {
    /// The writer runs between them: it has answered the first before the second is submitted.
    WriterRunsBetween,
    /// Nothing runs in between (a single-threaded runtime, nothing awaited that waits): the
    /// writer finds the first send, the install and the second in its queue together.
    AllQueuedTogether,
}

/// Two pipelined sends to an unloaded session with a session load queued between them: the
/// first is sent back (not loaded), the load lands, and the second must not be stored before
/// the first comes back.
async fn load_between_pipelined_sends(client_ids: [Option<&str>; 2], interleaving: Interleaving) {
    let (shards, _dir) = one_shard().await;
    archived_session(&shards, "s").await;
    let mut order = AppendOrder::default();
    let (first, second) = match interleaving {
        Interleaving::WriterRunsBetween => {
            let first = shards
                .submit_append_in_order(&mut order, send("s", 1, client_ids[0]))
                .await;
            // Another request (a REST read, another socket) loads the session now: its install
            // is queued behind the first send.
            shards.load(0, "s").await.expect("load").expect("session exists");
            let second = shards
                .submit_append_in_order(&mut order, send("s", 2, client_ids[1]))
                .await;
            (first, second)
        }
        Interleaving::AllQueuedTogether => {
            // Another request's archive read finished; its install is queued right after the
            // first send, before the writer runs.
            let epoch = shards.inner.writers[0].epoch.load(std::sync::atomic::Ordering::Acquire);
            let loaded = shards.archive().load_session("s").await.expect("read").expect("exists");
            let first = shards
                .submit_append_in_order(&mut order, send("s", 1, client_ids[0]))
                .await;
            let install = Command::Install {
                loaded: Box::new(loaded),
                epoch,
            };
            assert!(shards.inner.senders[0].try_send(install).is_ok());
            let second = shards
                .submit_append_in_order(&mut order, send("s", 2, client_ids[1]))
                .await;
            (first, second)
        }
    };
    let (first, second) = tokio::join!(first, second);
    let (first, second) = (first.expect("first stored"), second.expect("second stored"));
    assert_eq!(
        (first.record.message.seq, second.record.message.seq),
        (1, 2),
        "stored in the order sent"
    );
    let page = shards.read_messages("s", 0, 10).await.expect("history");
    let contents: Vec<&str> = page.messages.iter().map(|m| m.message.content.get()).collect();
    assert_eq!(contents, [r#"{"n":1}"#, r#"{"n":2}"#]);
}

#[tokio::test]
async fn a_session_load_between_pipelined_sends_keeps_their_order() {
    load_between_pipelined_sends([None, None], Interleaving::WriterRunsBetween).await;
    load_between_pipelined_sends([None, None], Interleaving::AllQueuedTogether).await;
}

#[tokio::test]
async fn a_session_load_between_pipelined_sends_with_client_ids_keeps_their_order() {
    load_between_pipelined_sends([Some("c1"), Some("c2")], Interleaving::WriterRunsBetween).await;
    load_between_pipelined_sends([Some("c1"), Some("c2")], Interleaving::AllQueuedTogether).await;
}

/// A chain: the first bounces, the load lands, and every later send waits its turn.
#[tokio::test]
async fn a_load_between_a_bounced_send_and_many_pipelined_ones_keeps_their_order() {
    let (shards, _dir) = one_shard().await;
    archived_session(&shards, "s").await;
    let mut order = AppendOrder::default();
    let epoch = shards.inner.writers[0].epoch.load(std::sync::atomic::Ordering::Acquire);
    let loaded = shards.archive().load_session("s").await.expect("read").expect("exists");
    let mut pending = vec![shards.submit_append_in_order(&mut order, send("s", 1, None)).await];
    let install = Command::Install {
        loaded: Box::new(loaded),
        epoch,
    };
    assert!(shards.inner.senders[0].try_send(install).is_ok());
    for n in 2..=20 {
        let client_id = format!("c{n}");
        let client_id = (n % 3 == 0).then_some(client_id.as_str());
        pending.push(shards.submit_append_in_order(&mut order, send("s", n, client_id)).await);
    }
    let results = futures_util::future::join_all(pending).await;
    for (n, result) in (1..).zip(results) {
        let stored = result.expect("stored");
        assert_eq!(stored.record.message.seq, n, "send {n} stored in the order sent");
    }
}
