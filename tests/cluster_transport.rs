//! The peer transport under big answers: three real `fleetlm serve` processes, one session
//! holding 1000 messages of 200 KiB, its whole history read through a follower (the reads are
//! forwarded to the shard's leader, every answer several MiB) while Raft heartbeats must keep
//! flowing between the same two nodes: no shard may hold an election meanwhile.

mod support;

use support::cluster::bounded;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::cluster::{Cluster, ClusterOptions, create_sessions, spread_sessions};

const SHARDS: u16 = 4;
const MESSAGES: usize = 1000;
const MESSAGE_BYTES: usize = 200 * 1024;

/// Message `n`'s content: about 200 KiB, different for every message (so a mix-up shows).
fn content(n: usize) -> Value {
    let marker = format!("m{n:04}");
    let pad: String = marker.repeat(MESSAGE_BYTES / marker.len());
    json!({"text": marker, "pad": pad})
}

/// Every shard's term as node `id` sees it.
async fn terms(cluster: &Cluster, id: usize) -> BTreeMap<u64, u64> {
    let status = cluster.status(id).await.unwrap_or_else(|| panic!("node {id} status"));
    status["shards"]
        .as_array()
        .expect("shards")
        .iter()
        .map(|shard| (shard["shard"].as_u64().unwrap(), shard["term"].as_u64().unwrap()))
        .collect()
}

/// Appends message `n` through `base` (retrying a 503 with the same client id) and returns its
/// seq.
async fn append(client: &reqwest::Client, base: &str, session: &str, n: usize) -> u64 {
    let body = json!({"user_id": "u", "content": content(n), "client_id": format!("c{n}")});
    let url = format!("{base}/api/sessions/{session}/messages");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let last = match client.post(&url).json(&body).send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                let value: Value = response.json().await.unwrap_or(Value::Null);
                if status == 200 {
                    return value["message"]["seq"].as_u64().expect("an acked message has a seq");
                }
                assert_eq!(status, 503, "append {n}: {value}");
                format!("{status} {value}")
            }
            Err(error) => format!("{error}"),
        };
        assert!(
            Instant::now() < deadline,
            "append {n}: still failing after 60 s: {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One history page through `base`: its messages' (seq, content) and `has_more`.
async fn page(client: &reqwest::Client, base: &str, session: &str, after_seq: u64) -> (Vec<(u64, Value)>, bool) {
    let url = format!("{base}/api/sessions/{session}/messages?after_seq={after_seq}&limit=1000");
    let response = client.get(&url).send().await.expect("the page is answered");
    let status = response.status().as_u16();
    let text = response.text().await.expect("the page's body");
    assert_eq!(
        status,
        200,
        "page after {after_seq}: {status} {}",
        &text[..text.len().min(500)]
    );
    let value: Value = serde_json::from_str(&text).expect("a JSON page");
    let messages = value["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| (m["seq"].as_u64().expect("seq"), m["content"].clone()))
        .collect();
    (messages, value["has_more"].as_bool().expect("has_more"))
}

/// The whole history through `base`, page by page (`limit=1000`, each page bounded in bytes).
async fn whole_history(client: &reqwest::Client, base: &str, session: &str) -> (Vec<(u64, Value)>, usize) {
    let mut history = Vec::new();
    let mut pages = 0;
    let mut after_seq = 0;
    loop {
        let (messages, has_more) = page(client, base, session, after_seq).await;
        pages += 1;
        assert!(!messages.is_empty() || !has_more, "an empty page with more after it");
        if let Some((last, _)) = messages.last() {
            after_seq = *last;
        }
        history.extend(messages);
        if !has_more {
            return (history, pages);
        }
        assert!(pages < 2 * MESSAGES, "paging does not end");
    }
}

/// 1000 messages of 200 KiB in one session, read whole through a follower (by several readers
/// at once, every page forwarded to the leader): every message comes back once, in order, with
/// its content; a page of `limit=1000` is answered (bounded, with `has_more`); and no shard
/// holds an election while the pages are read (the heartbeats between the two nodes never wait
/// behind the pages).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_history_of_large_messages_reads_through_a_follower_without_an_election() {
    bounded(Duration::from_secs(600), async {
        let options = ClusterOptions {
            shards: SHARDS,
            extra: [
                "--max-message-bytes",
                "262144",
                "--wal-segment-bytes",
                "8388608",
            ]
            .map(String::from)
            .to_vec(),
            // The production default, not the suite's shorter one: what this checks is that
            // heartbeats never wait behind pages (a wait of seconds), not how three nodes
            // sharing two busy cores keep a 300 ms timer (CI saw one election in a run so).
            election_timeout_ms: 500,
            ..ClusterOptions::default()
        };
        let cluster = Cluster::start(3, options).await;
        let session = spread_sessions("big", SHARDS, 1).remove(0);
        let shard = fleetlm::ids::shard_for_session(&session, SHARDS);
        create_sessions(&cluster.node(1), std::slice::from_ref(&session)).await;
        let leader = cluster.leader_of(shard).await;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();

        // Written through the leader, a few at a time.
        let leader_base = cluster.node(leader);
        let written: Vec<(u64, usize)> = {
            use futures_util::StreamExt;
            futures_util::stream::iter(0..MESSAGES)
                .map(|n| {
                    let (client, base, session) = (client.clone(), leader_base.clone(), session.clone());
                    async move { (append(&client, &base, &session, n).await, n) }
                })
                .buffer_unordered(8)
                .collect()
                .await
        };
        let by_seq: BTreeMap<u64, usize> = written.into_iter().collect();
        assert_eq!(by_seq.len(), MESSAGES, "every message got its own seq");

        // Measured over the reads only: 200 MB of writes through a debug build on a small
        // machine can delay the written shard's own appends past an election timeout (a
        // replication matter, not the transport's); reads must never cost an election.
        cluster.leaders().await;
        let leader = cluster.leader_of(shard).await;
        let follower = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
        let terms_before = terms(&cluster, 1).await;
        let started = Instant::now();
        let follower_base = cluster.node(follower);
        let expected = Arc::new(by_seq);
        let readers = (0..3).map(|_| {
            let (client, base, session, expected) =
                (client.clone(), follower_base.clone(), session.clone(), expected.clone());
            async move {
                let (history, pages) = whole_history(&client, &base, &session).await;
                let seqs: Vec<u64> = history.iter().map(|(seq, _)| *seq).collect();
                let wanted: Vec<u64> = expected.keys().copied().collect();
                assert_eq!(seqs, wanted, "the history through the follower, in order, each once");
                for (seq, content) in &history {
                    assert!(
                        *content == self::content(expected[seq]),
                        "seq {seq} has another message's content"
                    );
                }
                pages
            }
        });
        let pages = futures_util::future::join_all(readers).await;
        // One page asked with limit=1000: answered, bounded, and said to continue.
        let (first, has_more) = page(&client, &follower_base, &session, 0).await;
        assert!(!first.is_empty() && has_more, "a first page of {} messages", first.len());
        assert!(first.len() < MESSAGES, "a page is bounded in bytes");
        let read_for = started.elapsed();

        // No election on any shard, as any node sees it.
        for id in cluster.ids() {
            assert_eq!(
                terms(&cluster, id).await,
                terms_before,
                "a shard's term changed on node {id} while the history was read through node {follower} (an election: Raft traffic waited behind the pages); its log:\n{}",
                cluster.log_tail(id, 30)
            );
        }
        eprintln!(
            "read {MESSAGES} messages of {MESSAGE_BYTES} bytes through node {follower} (leader {leader}) three times in {read_for:?}, {pages:?} pages each"
        );
    })
    .await;
}
