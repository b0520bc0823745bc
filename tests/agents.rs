//! The agent engine against real HTTP agents on 127.0.0.1: dispatch, streaming, retries,
//! debounce, one dispatch in flight per session, and recovery after a crash.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::agent::{Behavior, TestAgent, TestCa, Transport};
use support::{Store, TestServer};

async fn register(server: &TestServer, agent: &TestAgent, id: &str, extra: Value) {
    let mut fields = json!({"id": id, "name": id, "origin_url": agent.url, "debounce_window_ms": 0,
        "headers": {"x-agent-secret": "s3cret"}});
    for (key, value) in extra.as_object().unwrap() {
        fields[key] = value.clone();
    }
    let reply = server.post("/api/agents", json!({"agent": fields})).await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    let session = server
        .post(
            "/api/sessions",
            json!({"id": format!("{id}-s"), "user_id": "u", "agent_id": id}),
        )
        .await;
    assert_eq!(session.status, 201);
}

async fn say(server: &TestServer, session: &str, text: &str) {
    let reply = server
        .post(
            &format!("/api/sessions/{session}/messages"),
            json!({"user_id": "u", "content": {"text": text}}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
}

/// Waits until the session holds `count` messages from the agent and returns them.
async fn agent_messages(server: &TestServer, session: &str, agent_id: &str, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let page = server
            .get(&format!("/api/sessions/{session}/messages?limit=1000"))
            .await;
        let found: Vec<Value> = page.body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["sender_id"] == agent_id)
            .cloned()
            .collect();
        if found.len() >= count {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "expected {count} agent messages, have {}",
            found.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A socket of user `u` joined to `session`.
async fn join_as_user(server: &TestServer, session: &str) -> support::WsClient {
    let mut ws = support::WsClient::connect(&server.base, "user_id=u&vsn=2.0.0")
        .await
        .ok()
        .unwrap();
    ws.send(format!(r#"["1","1","session:{session}","phx_join",{{}}]"#))
        .await;
    assert_eq!(ws.next().await[4]["status"], "ok");
    ws
}

/// Waits for an `agent_status` `failed` push and returns its payload.
async fn wait_for_failure(ws: &mut support::WsClient) -> Value {
    loop {
        let frame = ws.next_any().await;
        if frame[3] == "agent_status" && frame[4]["status"] == "failed" {
            return frame[4].clone();
        }
    }
}

/// Waits until the agent has been called `count` times.
async fn wait_for_calls(agent: &TestAgent, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.calls().len() < count {
        assert!(Instant::now() < deadline, "the agent was not called");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn reply_text(message: &Value) -> String {
    message["content"]["parts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["text"].as_str())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echo_agent_answers_and_the_reply_is_stored_as_an_assistant_message() {
    let server = TestServer::start(Store::Sqlite).await;
    for (id, behavior) in [("jsonl", Behavior::EchoJsonl), ("sse", Behavior::EchoSse)] {
        let agent = TestAgent::start(behavior).await;
        register(&server, &agent, id, json!({})).await;
        say(&server, &format!("{id}-s"), "hello").await;
        let replies = agent_messages(&server, &format!("{id}-s"), id, 1).await;
        let reply = &replies[0];
        assert_eq!(reply["kind"], "assistant");
        assert_eq!(reply["seq"], 2);
        assert_eq!(reply["content"]["role"], "assistant");
        assert_eq!(reply["content"]["id"], "reply-1");
        assert_eq!(reply_text(reply), "echo: hello");
        assert_eq!(reply["metadata"]["termination"], "finish");

        let calls = agent.calls();
        assert_eq!(calls.len(), 1);
        let call = &calls[0];
        assert_eq!(call.body["session_id"], format!("{id}-s"));
        assert_eq!(
            (call.body["agent_id"].as_str(), call.body["user_id"].as_str()),
            (Some(id), Some("u"))
        );
        assert_eq!(call.body["attempt"], 1);
        assert_eq!(call.body["messages"].as_array().unwrap().len(), 1);
        assert_eq!(call.body["messages"][0]["content"], json!({"text": "hello"}));
        assert_eq!(
            call.headers["idempotency-key"].to_str().unwrap(),
            call.body["dispatch_id"].as_str().unwrap()
        );
        assert_eq!(call.headers["x-agent-secret"], "s3cret");
        assert_eq!(call.headers["content-type"], "application/json");
        assert!(call.headers["accept"].to_str().unwrap().contains("text/event-stream"));
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_lines_and_replies_without_finish_are_stored() {
    let server = TestServer::start(Store::Sqlite).await;
    let legacy = TestAgent::start(Behavior::Legacy).await;
    register(&server, &legacy, "legacy", json!({})).await;
    say(&server, "legacy-s", "yo").await;
    let reply = &agent_messages(&server, "legacy-s", "legacy", 1).await[0];
    assert_eq!(
        (reply["kind"].as_str(), reply["content"]["text"].as_str()),
        (Some("text"), Some("legacy: yo"))
    );

    let cut = TestAgent::start(Behavior::NoFinish).await;
    register(&server, &cut, "cut", json!({})).await;
    say(&server, "cut-s", "abc").await;
    let reply = &agent_messages(&server, "cut-s", "cut", 1).await[0];
    assert_eq!(reply["metadata"]["termination"], "incomplete");
    assert_eq!(reply_text(reply), "echo: abc");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_messages_are_debounced_into_one_webhook() {
    let server = TestServer::start(Store::Sqlite).await;
    let agent = TestAgent::start(Behavior::EchoJsonl).await;
    register(&server, &agent, "deb", json!({"debounce_window_ms": 400})).await;
    for n in 0..5 {
        say(&server, "deb-s", &format!("m{n}")).await;
    }
    agent_messages(&server, "deb-s", "deb", 1).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let calls = agent.calls();
    assert_eq!(calls.len(), 1, "five quick messages, one webhook");
    let texts: Vec<&str> = calls[0].body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, vec!["m0", "m1", "m2", "m3", "m4"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_dispatch_in_flight_per_session_with_a_follow_up() {
    let server = TestServer::start(Store::Sqlite).await;
    let agent = TestAgent::start(Behavior::Slow(Duration::from_millis(1000))).await;
    register(&server, &agent, "slow", json!({})).await;
    say(&server, "slow-s", "first").await;
    wait_for_calls(&agent, 1).await;
    say(&server, "slow-s", "second").await;
    say(&server, "slow-s", "third").await;
    let replies = agent_messages(&server, "slow-s", "slow", 2).await;
    assert_eq!(reply_text(&replies[0]), "echo: first");
    assert_eq!(reply_text(&replies[1]), "echo: third");
    let calls = agent.calls();
    assert_eq!(
        calls.len(),
        2,
        "one dispatch, then one follow-up for both later messages"
    );
    assert_eq!(agent.max_concurrent(), 1);
    let follow_up: Vec<&str> = calls[1].body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["content"]["text"].as_str())
        .collect();
    assert!(follow_up.contains(&"second") && follow_up.contains(&"third"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flaky_agent_is_retried_and_answers_once() {
    let server = TestServer::start(Store::Sqlite).await;
    let agent = TestAgent::start(Behavior::Flaky(2)).await;
    register(&server, &agent, "flaky", json!({})).await;
    say(&server, "flaky-s", "again").await;
    agent_messages(&server, "flaky-s", "flaky", 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let attempts: Vec<u64> = agent
        .calls()
        .iter()
        .map(|c| c.body["attempt"].as_u64().unwrap())
        .collect();
    assert_eq!(attempts, vec![1, 2, 3]);
    let ids: Vec<String> = agent
        .calls()
        .iter()
        .map(|c| c.body["dispatch_id"].as_str().unwrap().to_string())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "retries keep the dispatch id");
    assert_eq!(
        agent_messages(&server, "flaky-s", "flaky", 1).await.len(),
        1,
        "exactly one reply"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_malformed_replies_fail_without_retry_and_say_so_live() {
    let server = TestServer::start(Store::Sqlite).await;
    for (id, behavior) in [("refuse", Behavior::Refuse), ("garbled", Behavior::Malformed)] {
        let agent = TestAgent::start(behavior).await;
        register(&server, &agent, id, json!({})).await;
        let mut ws = support::WsClient::connect(&server.base, "user_id=u&vsn=2.0.0")
            .await
            .ok()
            .unwrap();
        ws.send(format!(r#"["1","1","session:{id}-s","phx_join",{{}}]"#)).await;
        assert_eq!(ws.next().await[4]["status"], "ok");
        say(&server, &format!("{id}-s"), "hi").await;
        let mut statuses = Vec::new();
        while statuses.last().map(String::as_str) != Some("failed") {
            let frame = ws.next_any().await;
            if frame[3] == "agent_status" {
                statuses.push(frame[4]["status"].as_str().unwrap().to_string());
                if frame[4]["status"] == "failed" {
                    assert!(frame[4]["error"].as_str().unwrap().len() > 3, "{frame}");
                }
            }
        }
        assert_eq!(statuses.first().map(String::as_str), Some("queued"));
        assert!(statuses.contains(&"dispatching".to_string()));
        assert_eq!(agent.calls().len(), 1, "{id}: not retried");
    }
    server.stop().await;
}

/// A redirect is not followed: the agent's secret headers (and the conversation) never reach
/// the host it points to, and the turn fails once, clearly, without a retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirecting_agent_fails_and_its_headers_never_reach_the_redirect_target() {
    let server = TestServer::start(Store::Sqlite).await;
    let elsewhere = TestAgent::start(Behavior::EchoJsonl).await;
    let redirecting = TestAgent::start(Behavior::Redirect(format!("{}/webhook", elsewhere.url))).await;
    register(&server, &redirecting, "moved", json!({})).await;
    let mut ws = join_as_user(&server, "moved-s").await;
    say(&server, "moved-s", "hi").await;
    let failure = wait_for_failure(&mut ws).await;
    assert_eq!(failure["error"], "agent answered a redirect (HTTP 307)", "{failure}");
    assert!(!failure.to_string().contains("127.0.0.1"), "{failure}");
    assert_eq!(redirecting.calls().len(), 1, "not retried");
    assert_eq!(
        redirecting.calls()[0]
            .headers
            .get("x-agent-secret")
            .map(|v| v.to_str().unwrap()),
        Some("s3cret"),
        "the registered origin gets its headers"
    );
    // Give a follower the time to have followed, then check nothing arrived there.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        elsewhere.calls().is_empty(),
        "the redirect target was called (headers: {:?})",
        elsewhere.calls().iter().map(|c| c.headers.clone()).collect::<Vec<_>>()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_see_chunks_live_then_the_stored_message() {
    let server = TestServer::start(Store::Sqlite).await;
    let agent = TestAgent::start(Behavior::EchoJsonl).await;
    register(&server, &agent, "live", json!({})).await;
    let mut ws = join_as_user(&server, "live-s").await;
    say(&server, "live-s", "stream me").await;
    let mut events = Vec::new();
    let mut chunk_types = Vec::new();
    loop {
        let frame = ws.next_any().await;
        let event = frame[3].as_str().unwrap().to_string();
        if event == "stream_chunk" {
            assert_eq!(frame[4]["agent_id"], "live");
            chunk_types.push(frame[4]["chunk"]["type"].as_str().unwrap().to_string());
        }
        if event == "agent_status" {
            events.push(format!("status:{}", frame[4]["status"].as_str().unwrap()));
        } else {
            events.push(event.clone());
        }
        if event == "agent_status" && frame[4]["status"] == "idle" {
            break;
        }
    }
    assert_eq!(chunk_types.len(), 8, "every chunk is forwarded: {chunk_types:?}");
    let position = |name: &str| {
        events
            .iter()
            .position(|e| e == name)
            .unwrap_or_else(|| panic!("{name} in {events:?}"))
    };
    assert!(position("status:queued") < position("status:dispatching"));
    assert!(position("status:dispatching") < position("status:streaming"));
    assert!(position("status:streaming") < position("stream_chunk"));
    let stored = events.iter().rposition(|e| e == "message").unwrap();
    assert!(
        stored > position("stream_chunk") && stored < position("status:idle"),
        "{events:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_modes_send_the_newest_messages() {
    let server = TestServer::start(Store::Sqlite).await;
    let tail = TestAgent::start(Behavior::EchoJsonl).await;
    register(
        &server,
        &tail,
        "tail",
        json!({"message_history_limit": 2, "debounce_window_ms": 300}),
    )
    .await;
    for n in 0..4 {
        say(&server, "tail-s", &format!("t{n}")).await;
    }
    agent_messages(&server, "tail-s", "tail", 1).await;
    let calls = tail.calls();
    let texts: Vec<&str> = calls[0].body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, vec!["t2", "t3"], "tail = the newest N, oldest first");

    let last = TestAgent::start(Behavior::EchoJsonl).await;
    register(
        &server,
        &last,
        "last",
        json!({"message_history_mode": "last", "debounce_window_ms": 300}),
    )
    .await;
    say(&server, "last-s", "a").await;
    say(&server, "last-s", "b").await;
    agent_messages(&server, "last-s", "last", 1).await;
    assert_eq!(last.calls()[0].body["messages"].as_array().unwrap().len(), 1);
    assert_eq!(last.calls()[0].body["messages"][0]["content"]["text"], "b");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_gets_a_snapshot_then_only_the_rest() {
    let server = TestServer::start(Store::Sqlite).await;
    let agent = TestAgent::start(Behavior::Dribble).await;
    register(&server, &agent, "drip", json!({})).await;
    say(&server, "drip-s", "go").await;
    wait_for_calls(&agent, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut ws = join_as_user(&server, "drip-s").await;
    let snapshot = ws.next().await;
    assert_eq!(snapshot[3], "stream_snapshot", "{snapshot}");
    assert_eq!(snapshot[4]["agent_id"], "drip");
    let parts = snapshot[4]["message"]["parts"].as_array().unwrap();
    let mut text: String = parts.iter().filter_map(|p| p["text"].as_str()).collect();
    assert!(
        !text.is_empty() && text.len() < "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 ".len(),
        "{text:?}"
    );
    loop {
        let frame = ws.next().await;
        if frame[3] == "message" {
            break;
        }
        if frame[3] == "stream_chunk" && frame[4]["chunk"]["type"] == "text-delta" {
            text.push_str(frame[4]["chunk"]["delta"].as_str().unwrap());
        }
    }
    let expected: String = (0..20).map(|n| format!("{n} ")).collect();
    assert_eq!(
        text, expected,
        "snapshot + later chunks = the whole reply, nothing twice"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_agent_is_not_called() {
    let server = TestServer::start(Store::Sqlite).await;
    let agent = TestAgent::start(Behavior::EchoJsonl).await;
    register(&server, &agent, "off", json!({})).await;
    assert_eq!(server.delete("/api/agents/off").await.status, 200);
    let mut ws = join_as_user(&server, "off-s").await;
    say(&server, "off-s", "anyone?").await;
    let failed = wait_for_failure(&mut ws).await;
    assert_eq!(failed["error"], "agent_disabled");
    assert!(agent.calls().is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatch_owed_at_a_crash_is_made_after_restart() {
    // Reserve a port for an agent that is down when the user writes.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let mut server = support::ServerProcess::start(dir.path(), None, &[]);
    let client = reqwest::Client::new();
    let agent = json!({"agent": {"id": "late", "name": "late", "origin_url": format!("http://127.0.0.1:{port}"),
        "debounce_window_ms": 0}});
    assert_eq!(
        support::call(&client, "POST", &format!("{}/api/agents", server.base), Some(agent))
            .await
            .status,
        201
    );
    let session = json!({"id": "late-s", "user_id": "u", "agent_id": "late"});
    assert_eq!(
        support::call(&client, "POST", &format!("{}/api/sessions", server.base), Some(session))
            .await
            .status,
        201
    );
    let message = json!({"user_id": "u", "content": {"text": "are you there"}});
    let sent = support::call(
        &client,
        "POST",
        &format!("{}/api/sessions/late-s/messages", server.base),
        Some(message),
    )
    .await;
    assert_eq!(sent.status, 200);
    server.kill9();

    let agent = TestAgent::start_on(&format!("127.0.0.1:{port}"), Behavior::EchoJsonl).await;
    let server = support::ServerProcess::start(dir.path(), None, &[]);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let page = support::call(
            &client,
            "GET",
            &format!("{}/api/sessions/late-s/messages", server.base),
            None,
        )
        .await;
        let messages = page.body["messages"].as_array().unwrap().clone();
        if let Some(reply) = messages.iter().find(|m| m["sender_id"] == "late") {
            assert_eq!(reply_text(reply), "echo: are you there");
            break;
        }
        assert!(Instant::now() < deadline, "the owed dispatch was never made");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(agent.calls().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overlong_reply_line_fails_the_dispatch_without_retry() {
    let server = TestServer::start(Store::Sqlite).await;
    let agent = TestAgent::start(Behavior::HugeLine).await;
    register(&server, &agent, "huge", json!({})).await;
    let mut ws = join_as_user(&server, "huge-s").await;
    say(&server, "huge-s", "hi").await;
    let failed = wait_for_failure(&mut ws).await;
    assert!(failed["error"].as_str().unwrap().contains("longer than"), "{failed}");
    assert_eq!(agent.calls().len(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_dispatch_ends_at_the_deadline_and_frees_the_session() {
    let server = TestServer::start_with(Store::Sqlite, |s| s.dispatch_deadline_secs = Some(1)).await;
    let agent = TestAgent::start(Behavior::Slow(Duration::from_secs(30))).await;
    register(&server, &agent, "hung", json!({"message_history_mode": "entire"})).await;
    let mut ws = join_as_user(&server, "hung-s").await;
    say(&server, "hung-s", "one").await;
    let started = Instant::now();
    let failed = wait_for_failure(&mut ws).await;
    assert_eq!(failed["error"], "dispatch deadline exceeded");
    assert!(started.elapsed() < Duration::from_secs(5));
    // The session is free: the next user message dispatches again, with the entire history.
    say(&server, "hung-s", "two").await;
    wait_for_calls(&agent, 2).await;
    assert_eq!(agent.calls()[1].body["messages"].as_array().unwrap().len(), 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_agent_shows_the_cause_without_its_url_or_key() {
    let server = TestServer::start_with(Store::Sqlite, |s| s.agent_max_attempts = Some(2)).await;
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let agent = json!({"agent": {"id": "down", "name": "down", "debounce_window_ms": 0,
        "origin_url": format!("http://127.0.0.1:{closed_port}"), "webhook_path": "/hook?key=TOPSECRET"}});
    assert_eq!(server.post("/api/agents", agent).await.status, 201);
    let session = json!({"id": "down-s", "user_id": "u", "agent_id": "down"});
    assert_eq!(server.post("/api/sessions", session).await.status, 201);
    let mut ws = join_as_user(&server, "down-s").await;
    say(&server, "down-s", "hello?").await;
    let failure = wait_for_failure(&mut ws).await;
    assert_eq!(failure["error"], "connection refused", "{failure}");
    let shown = server.get("/api/sessions/down-s").await;
    assert_eq!(shown.status, 200);
    let status = &shown.body["session"]["agent_status"];
    assert_eq!(status["status"], "failed", "{}", shown.body);
    assert_eq!(status["error"], "connection refused");
    for text in [failure.to_string(), shown.body.to_string()] {
        assert!(!text.contains("TOPSECRET") && !text.contains("127.0.0.1"), "{text}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_shows_the_agent_status_of_a_session() {
    let server = TestServer::start(Store::Sqlite).await;
    let agent = TestAgent::start(Behavior::EchoJsonl).await;
    register(&server, &agent, "shown", json!({})).await;
    let idle = server.get("/api/sessions/shown-s").await;
    assert_eq!(idle.body["session"]["agent_status"]["status"], "idle", "{}", idle.body);
    say(&server, "shown-s", "hi").await;
    agent_messages(&server, "shown-s", "shown", 1).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let shown = server.get("/api/sessions/shown-s").await;
        if shown.body["session"]["agent_status"]["status"] == "idle" {
            break;
        }
        assert!(Instant::now() < deadline, "{}", shown.body);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_over_the_size_cap_ends_the_turn_with_a_clear_error() {
    let server = TestServer::start_with(Store::Sqlite, |s| {
        s.agent_max_reply_bytes = Some(fleetlm::config::ByteSize(2048))
    })
    .await;
    let agent = TestAgent::start(Behavior::EchoJsonl).await;
    register(&server, &agent, "big", json!({})).await;
    let mut ws = join_as_user(&server, "big-s").await;
    say(&server, "big-s", &"x".repeat(3000)).await;
    let failure = wait_for_failure(&mut ws).await;
    assert_eq!(failure["error"], "reply too large: over 2048 bytes", "{failure}");
    assert_eq!(agent.calls().len(), 1, "not retried");
    say(&server, "big-s", "short").await;
    let replies = agent_messages(&server, "big-s", "big", 1).await;
    assert_eq!(reply_text(&replies[0]), "echo: short", "the next turn works");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_json_reply_is_stored_as_one_message() {
    let server = TestServer::start(Store::Sqlite).await;
    let agent = TestAgent::start(Behavior::PlainJson).await;
    register(&server, &agent, "plain", json!({})).await;
    say(&server, "plain-s", "hi").await;
    let replies = agent_messages(&server, "plain-s", "plain", 1).await;
    assert_eq!(replies[0]["kind"], "assistant");
    assert_eq!(reply_text(&replies[0]), "plain: hi");
    assert_eq!(replies[0]["metadata"]["termination"], "finish");
    server.stop().await;
}

/// Many hand-written handlers stream JSON lines while declaring `application/json`: the body
/// is read as lines (streamed live), not refused as a JSON document with trailing characters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_declared_as_application_json_stream_live_and_are_stored() {
    let server = TestServer::start(Store::Sqlite).await;
    let agent = TestAgent::start(Behavior::JsonlDeclaredJson).await;
    register(&server, &agent, "jl", json!({})).await;
    let mut ws = join_as_user(&server, "jl-s").await;
    say(&server, "jl-s", "lines").await;
    let (live, stored_after_chunks) = live_reply(&mut ws).await;
    assert_eq!(live, "echo: lines", "the deltas came live");
    assert!(stored_after_chunks);
    let replies = agent_messages(&server, "jl-s", "jl", 1).await;
    assert_eq!(replies.len(), 1);
    assert_eq!(reply_text(&replies[0]), "echo: lines");
    assert_eq!(replies[0]["content"]["id"], "reply-1");
    assert_eq!(replies[0]["metadata"]["termination"], "finish");
    server.stop().await;
}

/// An AI SDK agent's `start` chunk often names no `messageId`: FleetLM puts the id it stores the
/// reply under into the `start` chunk it forwards, so the chat holds the id the log holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_chunk_without_a_message_id_is_forwarded_with_the_stored_id() {
    let server = TestServer::start(Store::Sqlite).await;
    let agent = TestAgent::start(Behavior::EchoWithoutMessageId).await;
    register(&server, &agent, "anon", json!({})).await;
    let mut ws = join_as_user(&server, "anon-s").await;
    let mut ids = Vec::new();
    for (turn, text) in ["one", "two"].into_iter().enumerate() {
        say(&server, "anon-s", text).await;
        let (mut forwarded, mut pushed) = (None, None);
        loop {
            let frame = ws.next_any().await;
            match frame[3].as_str().unwrap() {
                "stream_chunk" if frame[4]["chunk"]["type"] == "start" => {
                    forwarded = Some(frame[4]["chunk"]["messageId"].clone());
                }
                "message" if frame[4]["kind"] == "assistant" => pushed = Some(frame[4]["content"]["id"].clone()),
                "agent_status" if frame[4]["status"] == "failed" => panic!("dispatch failed: {frame}"),
                "agent_status" if frame[4]["status"] == "idle" => break,
                _ => {}
            }
        }
        let forwarded = forwarded.expect("the start chunk was forwarded");
        let id = forwarded.as_str().expect("the forwarded start chunk names a messageId");
        assert_eq!(id.len(), 22, "{forwarded}");
        assert_eq!(
            pushed.as_ref(),
            Some(&forwarded),
            "the pushed message has the forwarded id"
        );
        let stored = agent_messages(&server, "anon-s", "anon", turn + 1).await;
        assert_eq!(
            stored[turn]["content"]["id"], forwarded,
            "the log holds the forwarded id"
        );
        assert_eq!(reply_text(&stored[turn]), format!("echo: {text}"));
        ids.push(id.to_string());
    }
    assert_ne!(ids[0], ids[1], "each reply has its own id");
    server.stop().await;
}

/// The rescan at start snapshots every session owing a reply, then feeds them to the scheduler
/// (slowly, here: a thousand sessions to load from the archive after this one, whose id sorts
/// first). A session whose reply is made
/// meanwhile by a fresh message must not be dispatched again by the stale snapshot: whether a
/// reply is owed is read from the log when the dispatch starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_rescan_does_not_call_the_agent_twice() {
    let server = TestServer::start(Store::Sqlite).await;
    let agent = TestAgent::start(Behavior::EchoJsonl).await;
    register(&server, &agent, "a0twice", json!({"debounce_window_ms": 60_000})).await;
    let filler = json!({"agent": {"id": "filler", "name": "filler", "origin_url": "http://127.0.0.1:9",
        "debounce_window_ms": 60_000}});
    assert_eq!(server.post("/api/agents", filler).await.status, 201);
    say(&server, "a0twice-s", "first").await;
    const FILLERS: usize = 1000;
    let server_ref = &server;
    for batch in (0..FILLERS).collect::<Vec<_>>().chunks(50) {
        let requests = batch.iter().map(|&n| async move {
            let server = server_ref;
            let session = json!({"id": format!("f{n}"), "user_id": "u", "agent_id": "filler"});
            assert_eq!(server.post("/api/sessions", session).await.status, 201);
            say(server, &format!("f{n}"), "waiting").await;
        });
        futures_util::future::join_all(requests).await;
    }
    let patch = server
        .patch("/api/agents/a0twice", json!({"agent": {"debounce_window_ms": 0}}))
        .await;
    assert_eq!(patch.status, 200);
    let (data_dir, _) = server.stop().await;
    assert!(agent.calls().is_empty());

    let path = data_dir.path().to_path_buf();
    let mut server = TestServer::start_with(Store::Sqlite, |s| s.data_dir = Some(path)).await;
    say(&server, "a0twice-s", "second").await;
    agent_messages(&server, "a0twice-s", "a0twice", 1).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Each call answers a newer user message than the one before; a stale rescan entry would
    // call again for messages already answered.
    let answered: Vec<String> = agent.calls().iter().map(|call| last_user_text(&call.body)).collect();
    let mut distinct = answered.clone();
    distinct.dedup();
    assert_eq!(answered, distinct, "the agent was called twice for the same messages");
    server.data_dir = data_dir;
    server.stop().await;
}

fn last_user_text(body: &Value) -> String {
    let user = body["user_id"].as_str().unwrap_or_default();
    body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["sender_id"] == user))
        .and_then(|m| m["content"]["text"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// Follows one dispatch on `ws` until the agent is idle again: the text of the `stream_chunk`
/// deltas that came live, and whether the stored `message` came after them.
async fn live_reply(ws: &mut support::WsClient) -> (String, bool) {
    let (mut text, mut stored_after_chunks) = (String::new(), false);
    loop {
        let frame = ws.next_any().await;
        match frame[3].as_str().unwrap() {
            "stream_chunk" if frame[4]["chunk"]["type"] == "text-delta" => {
                text.push_str(frame[4]["chunk"]["delta"].as_str().unwrap());
            }
            "message" if frame[4]["kind"] == "assistant" => stored_after_chunks = !text.is_empty(),
            "agent_status" if frame[4]["status"] == "failed" => panic!("dispatch failed: {frame}"),
            "agent_status" if frame[4]["status"] == "idle" => return (text, stored_after_chunks),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_agent_gets_the_webhook_over_http2_and_its_reply_streams_live() {
    let server = TestServer::start(Store::Sqlite).await;
    let agent = TestAgent::serve(Behavior::Dribble, Transport::H2c).await;
    register(&server, &agent, "h2c", json!({"http2": true})).await;
    let shown = server.get("/api/agents/h2c").await;
    assert_eq!(shown.body["agent"]["http2"], true, "{}", shown.body);
    let mut ws = join_as_user(&server, "h2c-s").await;
    say(&server, "h2c-s", "over h2").await;
    let (live, stored_after_chunks) = live_reply(&mut ws).await;
    let expected: String = (0..20).map(|n| format!("{n} ")).collect();
    assert_eq!(live, expected, "every delta came live over HTTP/2");
    assert!(stored_after_chunks);
    let stored = agent_messages(&server, "h2c-s", "h2c", 1).await;
    assert_eq!(reply_text(&stored[0]), expected);
    assert_eq!(stored[0]["metadata"]["termination"], "finish");

    // A second session's dispatch reuses the pooled HTTP/2 connection.
    let session = json!({"id": "h2c-s2", "user_id": "u", "agent_id": "h2c"});
    assert_eq!(server.post("/api/sessions", session).await.status, 201);
    say(&server, "h2c-s2", "again").await;
    agent_messages(&server, "h2c-s2", "h2c", 1).await;
    let calls = agent.calls();
    assert_eq!(calls.len(), 2);
    for call in &calls {
        assert_eq!(call.version, axum::http::Version::HTTP_2);
        assert_eq!(call.headers["x-agent-secret"], "s3cret");
        assert_eq!(
            call.headers["idempotency-key"].to_str().unwrap(),
            call.body["dispatch_id"].as_str().unwrap()
        );
    }
    assert_eq!(agent.connections(), 1, "one pooled connection for both dispatches");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_only_agent_registered_with_http2_fails_with_a_clear_error() {
    let server = TestServer::start(Store::Sqlite).await;
    let agent = TestAgent::serve(Behavior::EchoJsonl, Transport::Http1Only).await;
    register(
        &server,
        &agent,
        "h1",
        json!({"http2": true, "webhook_path": "/webhook?key=TOPSECRET"}),
    )
    .await;
    let mut ws = join_as_user(&server, "h1-s").await;
    let started = Instant::now();
    say(&server, "h1-s", "hello?").await;
    let failure = wait_for_failure(&mut ws).await;
    assert_eq!(
        failure["error"], "the agent does not speak HTTP/2 (it is registered with http2: true)",
        "{failure}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a protocol mismatch is not retried: {:?}",
        started.elapsed()
    );
    let shown = server.get("/api/sessions/h1-s").await;
    assert_eq!(shown.body["session"]["agent_status"]["error"], failure["error"]);
    for text in [failure.to_string(), shown.body.to_string()] {
        assert!(!text.contains("TOPSECRET") && !text.contains("127.0.0.1"), "{text}");
    }
    assert!(agent.calls().is_empty(), "the HTTP/1.1 server never saw a request");

    // Registered as it is (HTTP/1.1), the same agent answers.
    let fixed = server.put("/api/agents/h1", json!({"agent": {"http2": false}})).await;
    assert_eq!((fixed.status, &fixed.body["agent"]["http2"]), (200, &json!(false)));
    say(&server, "h1-s", "and now?").await;
    let replies = agent_messages(&server, "h1-s", "h1", 1).await;
    assert_eq!(reply_text(&replies[0]), "echo: and now?");
    assert_eq!(agent.calls()[0].version, axum::http::Version::HTTP_11);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_agent_negotiates_http2_by_alpn_and_falls_back_to_http1() {
    let ca = TestCa::new();
    let ca_file = ca.pem_file.clone();
    let server = TestServer::start_with(Store::Sqlite, |s| s.agent_ca_file = Some(ca_file)).await;
    let h2 = TestAgent::serve(
        Behavior::EchoJsonl,
        Transport::Tls {
            ca: ca.clone(),
            alpn: vec!["h2", "http/1.1"],
        },
    )
    .await;
    let h1 = TestAgent::serve(
        Behavior::EchoJsonl,
        Transport::Tls {
            ca: ca.clone(),
            alpn: vec!["http/1.1"],
        },
    )
    .await;
    assert!(h2.url.starts_with("https://127.0.0.1:"), "{}", h2.url);
    // `http2` does not matter over TLS: ALPN decides.
    register(&server, &h2, "tls-h2", json!({})).await;
    register(&server, &h1, "tls-h1", json!({"http2": true})).await;
    let mut ws = join_as_user(&server, "tls-h2-s").await;
    say(&server, "tls-h2-s", "secure").await;
    let (live, _) = live_reply(&mut ws).await;
    assert_eq!(live, "echo: secure");
    say(&server, "tls-h1-s", "old school").await;
    let replies = agent_messages(&server, "tls-h1-s", "tls-h1", 1).await;
    assert_eq!(reply_text(&replies[0]), "echo: old school");
    assert_eq!(
        reply_text(&agent_messages(&server, "tls-h2-s", "tls-h2", 1).await[0]),
        "echo: secure"
    );
    assert_eq!(h2.calls()[0].version, axum::http::Version::HTTP_2);
    assert_eq!(h1.calls()[0].version, axum::http::Version::HTTP_11);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_agent_whose_ca_is_not_trusted_fails_without_its_address() {
    let ca = TestCa::new();
    let server = TestServer::start_with(Store::Sqlite, |s| s.agent_max_attempts = Some(1)).await;
    let agent = TestAgent::serve(
        Behavior::EchoJsonl,
        Transport::Tls {
            ca,
            alpn: vec!["h2", "http/1.1"],
        },
    )
    .await;
    register(&server, &agent, "untrusted", json!({})).await;
    let mut ws = join_as_user(&server, "untrusted-s").await;
    say(&server, "untrusted-s", "hi").await;
    let failure = wait_for_failure(&mut ws).await;
    assert_eq!(failure["error"], "TLS handshake failed", "{failure}");
    assert!(!failure.to_string().contains("127.0.0.1"));
    assert!(agent.calls().is_empty());
    server.stop().await;
}

/// `examples/echo-agent/server.mjs` (Node's HTTP/1.1 server, which answers HTTP/2's connection
/// preface with `400 Bad Request`) registered with `http2: true`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_example_agent_registered_with_http2_fails_clearly_and_answers_without() {
    struct Node(std::process::Child);
    impl Drop for Node {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/echo-agent/server.mjs");
    let _node = Node(
        std::process::Command::new("node")
            .arg(script)
            .env("PORT", port.to_string())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("node runs"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "the Node agent did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let server = TestServer::start(Store::Sqlite).await;
    let agent = json!({"agent": {"id": "node", "name": "node", "origin_url": format!("http://127.0.0.1:{port}"),
        "debounce_window_ms": 0, "http2": true}});
    assert_eq!(server.post("/api/agents", agent).await.status, 201);
    let session = json!({"id": "node-s", "user_id": "u", "agent_id": "node"});
    assert_eq!(server.post("/api/sessions", session).await.status, 201);
    let mut ws = join_as_user(&server, "node-s").await;
    say(&server, "node-s", "hello").await;
    let failure = wait_for_failure(&mut ws).await;
    assert_eq!(
        failure["error"], "the agent does not speak HTTP/2 (it is registered with http2: true)",
        "{failure}"
    );
    assert!(!failure.to_string().contains("127.0.0.1"));
    let fixed = server
        .patch("/api/agents/node", json!({"agent": {"http2": false}}))
        .await;
    assert_eq!(fixed.status, 200);
    say(&server, "node-s", "again").await;
    let replies = agent_messages(&server, "node-s", "node", 1).await;
    assert_eq!(reply_text(&replies[0]), "echo: again");
    server.stop().await;
}

/// A turn is answered only by the record of its dispatch's end, never because a message
/// saying `finish` is stored after the user's message (issue 20: a reply of several messages cut
/// after the first was taken for answered, and silently truncated). Here such a message, written
/// through the API, does not answer the turn: the agent is asked, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_finish_message_does_not_answer_the_turn() {
    let server = TestServer::start(Store::Sqlite).await;
    let agent = TestAgent::start(Behavior::EchoJsonl).await;
    register(&server, &agent, "once", json!({"debounce_window_ms": 1500})).await;
    say(&server, "once-s", "first").await;
    let stored = server
        .post(
            "/api/sessions/once-s/messages",
            json!({"agent_id": "once", "kind": "assistant",
                "content": {"id": "m1", "role": "assistant", "parts": [{"type": "text", "text": "already"}]},
                "metadata": {"termination": "finish", "dispatch_id": "earlier", "answers_seq": 1}}),
        )
        .await;
    assert_eq!(stored.status, 200, "{}", stored.body);
    let replies = agent_messages(&server, "once-s", "once", 2).await;
    assert_eq!(reply_text(&replies[1]), "echo: first");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(agent.calls().len(), 1, "the turn is asked for once");
    // The next message is a new turn, dispatched once.
    say(&server, "once-s", "second").await;
    let replies = agent_messages(&server, "once-s", "once", 3).await;
    assert_eq!(reply_text(&replies[2]), "echo: second");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(agent.calls().len(), 2);
    server.stop().await;
}
