//! Dispatches across a leader change, on three real `fleetlm serve` processes sharing one
//! Postgres: the shard's leader is killed with SIGKILL after message k of an n-message reply was
//! stored, for every k; the new leader resumes the turn with the same idempotency key, and the
//! stored reply is complete, each message once, on every node and in the archive.

mod support;

use support::cluster::serial;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::agent::{Behavior, TestAgent};
use support::cluster::{ARCHIVE, Cluster, ClusterOptions, collect_histories};

const SHARDS: u16 = 4;
const MESSAGES: usize = 3;

/// The agent's messages in `session` as node `base` shows them now (empty if it does not
/// answer).
async fn replies(client: &reqwest::Client, base: &str, session: &str, agent_id: &str) -> Vec<Value> {
    let page = support::call(
        client,
        "GET",
        &format!("{base}/api/sessions/{session}/messages?limit=1000"),
        None,
    )
    .await;
    page.body["messages"]
        .as_array()
        .map(|messages| {
            messages
                .iter()
                .filter(|m| m["sender_id"] == agent_id)
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// Waits (up to `limit`) until node `base` shows `count` agent messages in `session`.
async fn wait_for_replies(
    client: &reqwest::Client,
    base: &str,
    session: &str,
    agent_id: &str,
    count: usize,
    limit: Duration,
    cluster: &Cluster,
) -> Vec<Value> {
    let deadline = Instant::now() + limit;
    loop {
        let found = replies(client, base, session, agent_id).await;
        if found.len() >= count {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "{session}: expected {count} stored reply messages, have {}: {found:?}\n{}",
            found.len(),
            cluster.all_logs_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn texts(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| {
            m["content"]["parts"]
                .as_array()
                .map(|parts| parts.iter().filter_map(|p| p["text"].as_str()).collect())
                .unwrap_or_default()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_leader_killed_mid_reply_the_new_leader_completes_it_once() {
    let _serial = serial();
    let scenario = async {
        let mut cluster = Cluster::start(
            3,
            ClusterOptions {
                shards: SHARDS,
                ..ClusterOptions::default()
            },
        )
        .await;
        let client = reqwest::Client::new();
        let wanted: Vec<String> = (0..MESSAGES).map(|n| format!("part {n}")).collect();
        let mut agents = Vec::new();
        for cut_after in 1..MESSAGES {
            let agent = TestAgent::start(Behavior::Parts {
                messages: MESSAGES,
                hold_after: cut_after,
            })
            .await;
            let agent_id = format!("p{cut_after}");
            let created = support::call(
                &client,
                "POST",
                &format!("{}/api/agents", cluster.node(1)),
                Some(json!({"agent": {"id": agent_id, "name": agent_id, "origin_url": agent.url, "debounce_window_ms": 0}})),
            )
            .await;
            assert_eq!(created.status, 201, "{}", created.body);
            agents.push((cut_after, agent_id, agent));
        }
        let mut sessions = Vec::new();
        for (cut_after, agent_id, agent) in &agents {
            let session = format!("{agent_id}-s");
            let shard = fleetlm::ids::shard_for_session(&session, SHARDS);
            let leader = cluster.leader_of(shard).await;
            let other = cluster.ids().into_iter().find(|id| *id != leader).expect("a follower");
            let created = support::call(
                &client,
                "POST",
                &format!("{}/api/sessions", cluster.node(other)),
                Some(json!({"id": session, "user_id": "u", "agent_id": agent_id})),
            )
            .await;
            assert_eq!(created.status, 201, "{}", created.body);
            let said = support::call(
                &client,
                "POST",
                &format!("{}/api/sessions/{session}/messages", cluster.node(other)),
                Some(json!({"user_id": "u", "content": {"text": "go"}})),
            )
            .await;
            assert_eq!(said.status, 200, "{}", said.body);

            // The leader stored the first `cut_after` messages; the agent holds the rest.
            let before = wait_for_replies(
                &client,
                &cluster.node(leader),
                &session,
                agent_id,
                *cut_after,
                Duration::from_secs(20),
                &cluster,
            )
            .await;
            assert_eq!(before.len(), *cut_after, "{before:?}");
            assert_eq!(agent.calls().len(), 1);
            cluster.kill9(leader);

            // The new leader resumes the turn: the reply is completed, each message once.
            let after = wait_for_replies(
                &client,
                &cluster.node(other),
                &session,
                agent_id,
                MESSAGES,
                Duration::from_secs(30),
                &cluster,
            )
            .await;
            assert_eq!(texts(&after), wanted, "{session}: the whole reply, in order");
            for (before, after) in before.iter().zip(&after) {
                assert_eq!(
                    before["id"], after["id"],
                    "{session}: stored messages stay as they were"
                );
            }
            let calls = agent.calls();
            assert_eq!(calls.len(), 2, "{session}: the new leader asks again, once");
            let keys: Vec<String> = calls
                .iter()
                .map(|call| call.headers["idempotency-key"].to_str().expect("ascii").to_string())
                .collect();
            assert_eq!(keys[0], keys[1], "{session}: one idempotency key for the turn");
            assert_eq!(calls[1].body["dispatch_id"], keys[0].as_str());
            assert_eq!(
                calls[0].body["messages"], calls[1].body["messages"],
                "{session}: the resumed turn sends the history it started with"
            );
            for message in &after {
                assert_eq!(message["metadata"]["dispatch_id"], keys[0].as_str(), "{message}");
            }

            cluster.restart(leader);
            cluster.wait_ready(leader).await;
            sessions.push((session, keys[0].clone()));
        }

        // Every node and the archive hold the user's message and the whole reply, once.
        let names: Vec<String> = sessions.iter().map(|(session, _)| session.clone()).collect();
        let histories = collect_histories(&cluster, &names).await;
        assert!(histories.read_problems.is_empty(), "{:?}", histories.read_problems);
        for (source, per_session) in &histories.sources {
            for (session, key) in &sessions {
                let stored = per_session.get(session).cloned().unwrap_or_default();
                let seqs: Vec<u64> = stored.iter().map(|m| m.seq).collect();
                assert_eq!(seqs, vec![1, 2, 3, 4], "{source}: {session}: {stored:?}");
                let contents: Vec<Value> = stored[1..].iter().map(|m| json!({"content": m.content})).collect();
                assert_eq!(texts(&contents), wanted, "{source}: {session}");
                if source == ARCHIVE {
                    let client_ids: Vec<Option<String>> = stored[1..].iter().map(|m| m.client_id.clone()).collect();
                    let expected: Vec<Option<String>> =
                        (0..MESSAGES).map(|n| Some(format!("turn:{key}:{n}"))).collect();
                    assert_eq!(client_ids, expected, "{session}: keyed by turn and ordinal");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        for (_, _, agent) in &agents {
            assert_eq!(agent.calls().len(), 2, "no further call once the turn is answered");
        }
    };
    if tokio::time::timeout(Duration::from_secs(240), scenario).await.is_err() {
        panic!("the scenario did not finish within 240 s");
    }
}
