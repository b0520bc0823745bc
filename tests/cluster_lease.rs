//! Leadership is a lease confirmed by a quorum: a leader cut off from the others stops calling
//! agents once its lease has run out (the new leader answers the turn), and never serves a read
//! from its own, stale state — listings, inboxes and read cursors included. Three real
//! `fleetlm serve` processes sharing one Postgres, the peer links through black-holing proxies,
//! real HTTP agents (tests/support).

mod support;

use support::cluster::bounded;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::agent::{Behavior, TestAgent};
use support::cluster::{Cluster, ClusterOptions, create_sessions, free_port, retry_503};

const SHARDS: u16 = 2;
/// The cluster's election timeout (its minimum; the maximum is 1.5 times it). The lease is
/// shorter than this, so a cut-off leader stops within one election timeout.
const ELECTION_MS: u64 = 300;

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// Messages of `session` as node `id` serves them (retrying 503s).
async fn messages(cluster: &Cluster, id: usize, session: &str) -> Vec<Value> {
    let url = format!("{}/api/sessions/{session}/messages", cluster.node(id));
    let (status, body) = retry_503(&client(), "GET", &url, None).await;
    assert_eq!(status, 200, "node {id}: {body}");
    body["messages"].as_array().cloned().unwrap_or_default()
}

/// A leader cut off from the others while its agent turn is retrying: once its lease has run out
/// it makes no more agent calls (each node reaches the agent through its own proxy address, so
/// the agent tells the callers apart), and the new leader dispatches the turn once; the reply
/// is stored once, on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_calls_no_agent_after_its_lease() {
    bounded(Duration::from_secs(150), async {
        // Each node's webhook calls go through `HTTP_PROXY` to an agent of its own, started
        // once the session's leader is known (the cut-off leader's always fails, so it keeps
        // retrying; the others answer).
        let ports: BTreeMap<usize, u16> = (1..=3).map(|id| (id, free_port())).collect();
        let node_env = ports
            .iter()
            .map(|(id, port)| {
                (
                    *id,
                    vec![
                        ("HTTP_PROXY".to_string(), format!("http://127.0.0.1:{port}")),
                        ("NO_PROXY".to_string(), String::new()),
                    ],
                )
            })
            .collect();
        let options = ClusterOptions {
            shards: SHARDS,
            election_timeout_ms: ELECTION_MS,
            extra: vec!["--agent-max-attempts".into(), "20".into()],
            node_env,
            ..ClusterOptions::default()
        };
        let mut cluster = Cluster::start(3, options).await;
        let session = "lease-dispatch";
        let shard = fleetlm::ids::shard_for_session(session, SHARDS);
        let leader = cluster.leader_of(shard).await;
        let others: Vec<usize> = cluster.ids().into_iter().filter(|id| *id != leader).collect();
        let mut agents = BTreeMap::new();
        for (id, port) in &ports {
            let behavior = if *id == leader {
                Behavior::Flaky(usize::MAX)
            } else {
                Behavior::EchoJsonl
            };
            agents.insert(*id, TestAgent::start_on(&format!("127.0.0.1:{port}"), behavior).await);
        }
        let client = client();
        // The registered address is never dialled: every node's calls go through its proxy.
        let agent =
            json!({"agent": {"id": "g", "name": "g", "origin_url": "http://127.0.0.1:9", "debounce_window_ms": 0}});
        let created = retry_503(
            &client,
            "POST",
            &format!("{}/api/agents", cluster.node(leader)),
            Some(agent),
        )
        .await;
        assert_eq!(created.0, 201, "{}", created.1);
        let body = json!({"id": session, "user_id": "u", "agent_id": "g"});
        let created = retry_503(
            &client,
            "POST",
            &format!("{}/api/sessions", cluster.node(leader)),
            Some(body),
        )
        .await;
        assert_eq!(created.0, 201, "{}", created.1);
        let said = retry_503(
            &client,
            "POST",
            &format!("{}/api/sessions/{session}/messages", cluster.node(leader)),
            Some(json!({"user_id": "u", "content": {"text": "hello"}})),
        )
        .await;
        assert_eq!(said.0, 200, "{}", said.1);

        // The leader is retrying the turn.
        let deadline = Instant::now() + Duration::from_secs(15);
        while agents[&leader].calls().len() < 2 {
            assert!(
                Instant::now() < deadline,
                "the leader did not call (and retry) the agent\n{}",
                cluster.all_logs_tail(20)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let cut_at = Instant::now();
        cluster.partition(leader);

        // The new leader answers the turn.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let stored = messages(&cluster, others[0], session).await;
            if stored.iter().any(|m| m["sender_id"] == "g") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no new leader answered the turn\n{}",
                cluster.all_logs_tail(20)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Long enough for the former leader's next retries (the backoff doubles from 250 ms).
        tokio::time::sleep(Duration::from_secs(6)).await;
        let lease_over = cut_at + Duration::from_millis(ELECTION_MS);
        let late: Vec<Duration> = agents[&leader]
            .calls()
            .iter()
            .filter(|call| call.at > lease_over)
            .map(|call| call.at - cut_at)
            .collect();
        assert!(
            late.is_empty(),
            "the cut-off leader called the agent {} times after its lease ran out (at {late:?} after the cut)",
            late.len()
        );
        let answered: usize = others.iter().map(|id| agents[id].calls().len()).sum();
        assert_eq!(answered, 1, "the new leader dispatches the turn once");

        // Healed: the former leader follows and calls nothing more; one reply on every node.
        cluster.heal(leader);
        tokio::time::sleep(Duration::from_secs(2)).await;
        for id in cluster.ids() {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let replies: Vec<Value> = messages(&cluster, id, session)
                    .await
                    .into_iter()
                    .filter(|m| m["sender_id"] == "g")
                    .collect();
                assert!(replies.len() < 2, "node {id} shows two replies: {replies:?}");
                if replies.len() == 1 {
                    break;
                }
                assert!(Instant::now() < deadline, "node {id}: no reply");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let late = agents[&leader]
            .calls()
            .iter()
            .filter(|call| call.at > lease_over)
            .count();
        assert_eq!(late, 0, "the former leader called the agent after the heal");
        let answered: usize = others.iter().map(|id| agents[id].calls().len()).sum();
        assert_eq!(answered, 1, "one dispatch of the turn in all");
    })
    .await;
}

/// Node `id`'s answer to `method path`, without retrying (20 s at most).
async fn answer_of(cluster: &Cluster, id: usize, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let url = format!("{}{path}", cluster.node(id));
    let reply = support::call(&client(), method, &url, body).await;
    (reply.status, reply.body)
}

/// One read: method, path, body, and where its answer shows the session's last seq.
type ReadCheck = (&'static str, String, Option<Value>, fn(&Value) -> Option<u64>);

/// A leader cut off from the others never answers a read from its own state once a new leader
/// took writes: the session, its messages, the session listing, the user's inbox and a read
/// cursor answer either `503 no_leader` or the fresh state, never the stale one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_serves_no_stale_read() {
    bounded(Duration::from_secs(150), async {
        let options = ClusterOptions {
            shards: SHARDS,
            election_timeout_ms: ELECTION_MS,
            ..ClusterOptions::default()
        };
        let mut cluster = Cluster::start(3, options).await;
        let session = "lease-read";
        let shard = fleetlm::ids::shard_for_session(session, SHARDS);
        let leader = cluster.leader_of(shard).await;
        let other = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
        create_sessions(&cluster.node(leader), &[session.to_string()]).await;
        let client = client();
        let bases: BTreeMap<usize, String> = cluster.ids().into_iter().map(|id| (id, cluster.node(id))).collect();
        let append = |node: usize, text: &str| {
            let url = format!("{}/api/sessions/{session}/messages", bases[&node]);
            let body = json!({"user_id": "u", "content": {"text": text}});
            let client = client.clone();
            async move { retry_503(&client, "POST", &url, Some(body)).await }
        };
        let first = append(leader, "before").await;
        assert_eq!(first.0, 200, "{}", first.1);
        assert_eq!(first.1["message"]["seq"], 1);
        let read = retry_503(
            &client,
            "POST",
            &format!("{}/api/sessions/{session}/read", cluster.node(leader)),
            Some(json!({"user_id": "u", "last_seq": 1})),
        )
        .await;
        assert_eq!(read.0, 200, "{}", read.1);

        cluster.partition(leader);
        let second = append(other, "after").await;
        assert_eq!(second.0, 200, "{}", second.1);
        assert_eq!(second.1["message"]["seq"], 2);

        // Every read on the cut-off node: refused, or fresh.
        let session_path = format!("/api/sessions/{session}");
        let checks: Vec<ReadCheck> = vec![
            ("GET", session_path.clone(), None, |b| b["session"]["last_seq"].as_u64()),
            ("GET", format!("{session_path}/messages"), None, |b| {
                b["messages"].as_array()?.iter().filter_map(|m| m["seq"].as_u64()).max()
            }),
            ("GET", "/api/sessions?user_id=u".to_string(), None, |b| {
                b["sessions"].as_array()?.first()?["last_seq"].as_u64()
            }),
            ("GET", "/api/users/u/inbox".to_string(), None, |b| {
                b["inbox"].as_array()?.first()?["last_seq"].as_u64()
            }),
            (
                "POST",
                format!("{session_path}/read"),
                Some(json!({"user_id": "u", "last_seq": 1})),
                |b| b["session"]["last_seq"].as_u64(),
            ),
        ];
        let mut stale = Vec::new();
        for (method, path, body, last_seq) in &checks {
            let (status, answer) = answer_of(&cluster, leader, method, path, body.clone()).await;
            match status {
                503 => assert_eq!(answer["code"], "no_leader", "{method} {path}: {answer}"),
                200 if last_seq(&answer) >= Some(2) => {}
                _ => stale.push(format!("{method} {path}: {status} {answer}")),
            }
        }
        assert!(
            stale.is_empty(),
            "the cut-off leader served stale reads:\n{}",
            stale.join("\n")
        );

        // Healed: the former leader serves the fresh state (through the new leader).
        cluster.heal(leader);
        for (method, path, body, last_seq) in &checks {
            let url = format!("{}{path}", cluster.node(leader));
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let (status, answer) = retry_503(&client, method, &url, body.clone()).await;
                assert_eq!(status, 200, "{method} {path}: {answer}");
                if last_seq(&answer) >= Some(2) {
                    break;
                }
                assert!(Instant::now() < deadline, "{method} {path} after the heal: {answer}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    })
    .await;
}
