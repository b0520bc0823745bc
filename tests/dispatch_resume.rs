//! A reply of several messages cut by a crash is completed once, on a real `fleetlm serve`
//! process killed with SIGKILL after some of the reply's messages were stored: after the
//! restart the turn is resumed with the same idempotency key, and the stored reply is complete,
//! each message exactly once, in order.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::ServerProcess;
use support::agent::{Behavior, TestAgent};

const AGENT: &str = "parts";
const SESSION: &str = "parts-s";
const MESSAGES: usize = 3;

async fn post(client: &reqwest::Client, base: &str, path: &str, body: Value) -> support::Reply {
    support::call(client, "POST", &format!("{base}{path}"), Some(body)).await
}

/// The agent's messages in the session, as the server shows them now.
async fn replies(client: &reqwest::Client, base: &str) -> Vec<Value> {
    let page = support::call(
        client,
        "GET",
        &format!("{base}/api/sessions/{SESSION}/messages?limit=1000"),
        None,
    )
    .await;
    assert_eq!(page.status, 200, "{}", page.body);
    page.body["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter(|m| m["sender_id"] == AGENT)
        .cloned()
        .collect()
}

/// Waits (up to 20 s) until the agent has `count` messages stored; returns them.
async fn wait_for_replies(client: &reqwest::Client, base: &str, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = replies(client, base).await;
        if found.len() >= count {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "expected {count} stored reply messages, have {}: {found:?}",
            found.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn text_of(message: &Value) -> String {
    message["content"]["parts"]
        .as_array()
        .expect("parts")
        .iter()
        .filter_map(|p| p["text"].as_str())
        .collect()
}

/// Kills the server after the first `stored` messages of a 3-message reply were stored, restarts
/// it on the same data directory, and checks that the reply is completed once.
async fn reply_cut_after(stored: usize) {
    let agent = TestAgent::start(Behavior::Parts {
        messages: MESSAGES,
        hold_after: stored,
    })
    .await;
    let data_dir = tempfile::tempdir().expect("tempdir");
    let client = reqwest::Client::new();
    let mut server = ServerProcess::start(data_dir.path(), None, &[]);
    let registered = post(
        &client,
        &server.base,
        "/api/agents",
        json!({"agent": {"id": AGENT, "name": AGENT, "origin_url": agent.url, "debounce_window_ms": 0}}),
    )
    .await;
    assert_eq!(registered.status, 201, "{}", registered.body);
    let created = post(
        &client,
        &server.base,
        "/api/sessions",
        json!({"id": SESSION, "user_id": "u", "agent_id": AGENT}),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let said = post(
        &client,
        &server.base,
        &format!("/api/sessions/{SESSION}/messages"),
        json!({"user_id": "u", "content": {"text": "go"}}),
    )
    .await;
    assert_eq!(said.status, 200, "{}", said.body);

    // The first `stored` messages are in the log; the agent holds the rest of its reply.
    let before = wait_for_replies(&client, &server.base, stored).await;
    assert_eq!(before.len(), stored, "{before:?}");
    server.kill9();

    let server = ServerProcess::start(data_dir.path(), None, &[]);
    let after = wait_for_replies(&client, &server.base, MESSAGES).await;
    // Nothing more arrives (no second copy of the reply, no further call).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let after_wait = replies(&client, &server.base).await;
    assert_eq!(after_wait.len(), MESSAGES, "each message exactly once: {after_wait:?}");
    let texts: Vec<String> = after.iter().map(text_of).collect();
    let wanted: Vec<String> = (0..MESSAGES).map(|n| format!("part {n}")).collect();
    assert_eq!(texts, wanted, "the whole reply, in order");
    for (before, after) in before.iter().zip(&after) {
        assert_eq!(before["seq"], after["seq"], "the stored messages stay as they were");
        assert_eq!(before["id"], after["id"]);
    }
    for message in &after {
        assert_eq!(message["metadata"]["termination"], "finish", "{message}");
        assert_eq!(message["metadata"]["answers_seq"], 1, "{message}");
    }

    let calls = agent.calls();
    assert_eq!(calls.len(), 2, "the turn is asked for again once, after the restart");
    let keys: Vec<&str> = calls
        .iter()
        .map(|call| call.headers["idempotency-key"].to_str().expect("ascii"))
        .collect();
    assert_eq!(keys[0], keys[1], "the resumed turn keeps its idempotency key");
    assert_eq!(calls[0].body["dispatch_id"], keys[0]);
    assert_eq!(calls[1].body["dispatch_id"], keys[0]);
    assert_eq!(
        calls[0].body["messages"], calls[1].body["messages"],
        "the resumed turn sends the history it started with"
    );
    for message in &after {
        assert_eq!(message["metadata"]["dispatch_id"], keys[0], "{message}");
    }

    // The turn is answered: the next user message is a new turn with a new key.
    let said = post(
        &client,
        &server.base,
        &format!("/api/sessions/{SESSION}/messages"),
        json!({"user_id": "u", "content": {"text": "again"}}),
    )
    .await;
    assert_eq!(said.status, 200, "{}", said.body);
    wait_for_replies(&client, &server.base, 2 * MESSAGES).await;
    let calls = agent.calls();
    assert_eq!(calls.len(), 3);
    assert_ne!(calls[2].headers["idempotency-key"], keys[0], "a new turn, a new key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_cut_by_a_crash_after_one_message_is_completed_once() {
    reply_cut_after(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_cut_by_a_crash_after_two_messages_is_completed_once() {
    reply_cut_after(2).await;
}
