//! The user steering the agent's turn, against real HTTP agents on 127.0.0.1: chunk indexes and
//! resuming a streaming reply from its first chunk, cancelling a turn (the agent's request
//! really closed, idempotent, racing the reply's end, never retried, not redone after a
//! restart), regenerating a reply, and client-side tool results.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::agent::{Behavior, TestAgent};
use support::{Store, TestServer, WsClient};

async fn register(server: &TestServer, agent: &TestAgent, id: &str, extra: Value) {
    let mut fields = json!({"id": id, "name": id, "origin_url": agent.url, "debounce_window_ms": 0});
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

async fn say(server: &TestServer, session: &str, text: &str) -> Value {
    let reply = server
        .post(
            &format!("/api/sessions/{session}/messages"),
            json!({"user_id": "u", "content": {"text": text}}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.body["message"].clone()
}

async fn messages(server: &TestServer, session: &str) -> Vec<Value> {
    let page = server
        .get(&format!("/api/sessions/{session}/messages?limit=1000"))
        .await;
    page.body["messages"].as_array().unwrap().clone()
}

/// Waits until the session holds `count` messages from the agent and returns them.
async fn agent_messages(server: &TestServer, session: &str, agent_id: &str, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let found: Vec<Value> = messages(server, session)
            .await
            .into_iter()
            .filter(|m| m["sender_id"] == agent_id)
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

/// A socket of `identity` joined to `session`; returns it and the join reply's response.
async fn join(server: &TestServer, identity: &str, session: &str) -> (WsClient, Value) {
    let mut ws = WsClient::connect(&server.base, &format!("user_id={identity}&vsn=2.0.0"))
        .await
        .ok()
        .unwrap();
    ws.send(format!(r#"["1","1","session:{session}","phx_join",{{}}]"#))
        .await;
    let reply = ws.next().await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    (ws, reply[4]["response"].clone())
}

/// Sends `event` with `payload` on the joined `session` channel and returns the reply's
/// `[status, response]`, skipping pushes that arrive meanwhile (they are returned too).
async fn request(
    ws: &mut WsClient,
    session: &str,
    reference: &str,
    event: &str,
    payload: Value,
) -> (Value, Vec<Value>) {
    ws.send(json!(["1", reference, format!("session:{session}"), event, payload]).to_string())
        .await;
    let mut pushes = Vec::new();
    loop {
        let frame = ws.next_any().await;
        if frame[3] == "phx_reply" && frame[1] == reference {
            return (frame[4].clone(), pushes);
        }
        pushes.push(frame);
    }
}

/// Pushes until (and including) the first for which `last` holds.
async fn pushes_until(ws: &mut WsClient, mut pending: Vec<Value>, last: impl Fn(&Value) -> bool) -> Vec<Value> {
    if pending.iter().any(&last) {
        return pending;
    }
    loop {
        let frame = ws.next_any().await;
        let done = last(&frame);
        pending.push(frame);
        if done {
            return pending;
        }
    }
}

fn is_status(frame: &Value, status: &str) -> bool {
    frame[3] == "agent_status" && frame[4]["status"] == status
}

fn text_of(parts: &Value) -> String {
    parts
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["text"].as_str())
        .collect()
}

/// Collects `stream_chunk` pushes until one has `index`.
async fn chunks_through(ws: &mut WsClient, index: u64) -> Vec<Value> {
    let mut chunks = Vec::new();
    loop {
        let frame = ws.next_any().await;
        if frame[3] != "stream_chunk" {
            continue;
        }
        let at = frame[4]["index"].as_u64().expect("stream chunks carry an index");
        chunks.push(frame[4].clone());
        if at >= index {
            return chunks;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_resumes_from_the_first_chunk_with_no_gap_and_no_duplicate() {
    let server = TestServer::start(Store::Sqlite).await;
    let agent = TestAgent::start(Behavior::Gated { before: 5, after: 5 }).await;
    register(&server, &agent, "resume", json!({})).await;
    let (mut early, joined) = join(&server, "u", "resume-s").await;
    assert_eq!(joined["stream"], Value::Null, "nothing streams yet: {joined}");
    say(&server, "resume-s", "go").await;
    // start, text-start and five deltas: indexes 0..=6, then the agent holds the reply.
    let first = chunks_through(&mut early, 6).await;
    let indexes: Vec<u64> = first.iter().map(|c| c["index"].as_u64().unwrap()).collect();
    assert_eq!(indexes, (0..=6).collect::<Vec<_>>());
    let dispatch_id = first[0]["dispatch_id"].as_str().unwrap().to_string();

    let (mut late, joined) = join(&server, "u", "resume-s").await;
    assert_eq!(
        joined["stream"],
        json!({"dispatch_id": dispatch_id, "agent_id": "resume"})
    );
    let snapshot = late.next_any().await;
    assert_eq!(
        snapshot[3], "stream_snapshot",
        "the snapshot comes right after the join reply: {snapshot}"
    );
    let snapshot = &snapshot[4];
    assert_eq!(snapshot["dispatch_id"], dispatch_id.as_str());
    assert_eq!(snapshot["next_index"], 7);
    let chunks = snapshot["chunks"].as_array().unwrap();
    assert_eq!(chunks.len(), 7, "every chunk of the message from its start: {snapshot}");
    assert_eq!(chunks[0], json!({"type": "start", "messageId": "reply-1"}));
    assert_eq!(text_of(&snapshot["message"]["parts"]), "0 1 2 3 4 ");

    agent.release();
    let rest = chunks_through(&mut late, 13).await;
    let indexes: Vec<u64> = rest.iter().map(|c| c["index"].as_u64().unwrap()).collect();
    assert_eq!(
        indexes,
        (7..=13).collect::<Vec<_>>(),
        "live chunks continue right after the snapshot"
    );
    let mut text: String = chunks
        .iter()
        .chain(rest.iter().map(|c| &c["chunk"]))
        .filter(|c| c["type"] == "text-delta")
        .map(|c| c["delta"].as_str().unwrap())
        .collect();
    assert_eq!(text, "0 1 2 3 4 5 6 7 8 9 ");
    assert_eq!(rest.last().unwrap()["chunk"]["type"], "finish");
    let early_rest = chunks_through(&mut early, 13).await;
    assert_eq!(early_rest.len(), 7, "the first socket got each chunk once");
    text.clear();
    let stored = agent_messages(&server, "resume-s", "resume", 1).await;
    assert_eq!(text_of(&stored[0]["content"]["parts"]), "0 1 2 3 4 5 6 7 8 9 ");
    // Once the reply is stored, a joiner gets no stream.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, joined) = join(&server, "u", "resume-s").await;
    assert_eq!(joined["stream"], Value::Null);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_dispatch_closes_the_cut_message_and_its_indexes_go_on() {
    let server = TestServer::start(Store::Sqlite).await;
    let agent = TestAgent::start(Behavior::CutOnce).await;
    register(&server, &agent, "cut", json!({})).await;
    let (mut ws, _) = join(&server, "u", "cut-s").await;
    say(&server, "cut-s", "again").await;
    // Attempt 1: start, text-start, one delta, then the connection breaks: the open message
    // is closed with an abort chunk. Attempt 2 streams the reply afresh (8 chunks).
    let chunks = chunks_through(&mut ws, 11).await;
    let indexes: Vec<u64> = chunks.iter().map(|c| c["index"].as_u64().unwrap()).collect();
    assert_eq!(indexes, (0..=11).collect::<Vec<_>>());
    let types: Vec<&str> = chunks.iter().map(|c| c["chunk"]["type"].as_str().unwrap()).collect();
    assert_eq!(&types[..5], ["start", "text-start", "text-delta", "abort", "start"]);
    assert_eq!(types[11], "finish");
    let dispatch_ids: std::collections::HashSet<&str> =
        chunks.iter().map(|c| c["dispatch_id"].as_str().unwrap()).collect();
    assert_eq!(dispatch_ids.len(), 1, "one dispatch, two attempts");
    let stored = agent_messages(&server, "cut-s", "cut", 1).await;
    assert_eq!(text_of(&stored[0]["content"]["parts"]), "echo: again");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(agent_messages(&server, "cut-s", "cut", 1).await.len(), 1);
    assert_eq!(agent.calls().len(), 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_closes_the_agents_request_stores_the_partial_reply_and_is_idempotent() {
    let server = TestServer::start(Store::Sqlite).await;
    let agent = TestAgent::start(Behavior::Gated { before: 3, after: 3 }).await;
    register(&server, &agent, "stop", json!({})).await;
    let (mut ws, _) = join(&server, "u", "stop-s").await;
    say(&server, "stop-s", "go").await;
    let streamed = chunks_through(&mut ws, 4).await;
    let dispatch_id = streamed[0]["dispatch_id"].as_str().unwrap().to_string();

    // Only the session's user may cancel: not its agent.
    let (mut agent_socket, _) = join(&server, "stop", "stop-s").await;
    let (refused, _) = request(&mut agent_socket, "stop-s", "9", "cancel", json!({})).await;
    assert_eq!(refused["status"], "error");
    assert_eq!(refused["response"]["error"], "forbidden");
    // A cancel naming another dispatch cancels nothing.
    let (other, _) = request(&mut ws, "stop-s", "2", "cancel", json!({"dispatch_id": "not-this-one"})).await;
    assert_eq!(other["response"], json!({"cancelled": false}));
    let (bad, _) = request(&mut ws, "stop-s", "3", "cancel", json!({"dispatch_id": 7})).await;
    assert_eq!(bad["status"], "error");
    assert_eq!(bad["response"]["error"], "invalid_cancel");

    let (cancelled, pending) = request(&mut ws, "stop-s", "4", "cancel", json!({"dispatch_id": dispatch_id})).await;
    assert_eq!(cancelled["status"], "ok");
    assert_eq!(
        cancelled["response"],
        json!({"cancelled": true, "dispatch_id": dispatch_id})
    );
    agent.wait_aborted(1).await;
    let frames = pushes_until(&mut ws, pending, |f| is_status(f, "cancelled")).await;
    let position = |test: &dyn Fn(&Value) -> bool| frames.iter().position(test);
    let abort = position(&|f| f[3] == "stream_chunk" && f[4]["chunk"]["type"] == "abort").expect("an abort chunk");
    assert_eq!(frames[abort][4]["index"], 5);
    assert_eq!(frames[abort][4]["dispatch_id"], dispatch_id.as_str());
    let stored = position(&|f| f[3] == "message").expect("the partial reply is stored");
    let status = position(&|f| is_status(f, "cancelled")).unwrap();
    assert!(abort < stored && stored < status, "{frames:?}");
    assert_eq!(frames[status][4]["dispatch_id"], dispatch_id.as_str());
    let reply = &frames[stored][4];
    assert_eq!(reply["kind"], "assistant");
    assert_eq!(reply["metadata"]["termination"], "abort");
    assert_eq!(reply["metadata"]["dispatch_id"], dispatch_id.as_str());
    assert_eq!(text_of(&reply["content"]["parts"]), "0 1 2 ");

    // Idempotent, over the socket and REST alike; REST shows the status.
    let (again, _) = request(&mut ws, "stop-s", "5", "cancel", json!({})).await;
    assert_eq!(again["response"], json!({"cancelled": false}));
    let again = server.post("/api/sessions/stop-s/cancel", json!({})).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.body, json!({"cancelled": false}));
    let shown = server.get("/api/sessions/stop-s").await;
    assert_eq!(
        shown.body["session"]["agent_status"],
        json!({"status": "cancelled", "dispatch_id": dispatch_id})
    );
    // Never retried; one message stored.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(agent.calls().len(), 1);
    assert_eq!(agent_messages(&server, "stop-s", "stop", 1).await.len(), 1);

    // The next user message dispatches normally.
    agent.release();
    say(&server, "stop-s", "again").await;
    let replies = agent_messages(&server, "stop-s", "stop", 2).await;
    assert_eq!(replies[1]["metadata"]["termination"], "finish");
    assert_eq!(agent.calls().len(), 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_drops_the_follow_up_queued_behind_the_running_dispatch() {
    let server = TestServer::start(Store::Sqlite).await;
    let agent = TestAgent::start(Behavior::Gated { before: 1, after: 0 }).await;
    register(&server, &agent, "follow", json!({})).await;
    let (mut ws, _) = join(&server, "u", "follow-s").await;
    say(&server, "follow-s", "one").await;
    chunks_through(&mut ws, 2).await;
    // Written while the dispatch runs: it would be answered by a follow-up call.
    say(&server, "follow-s", "two").await;
    say(&server, "follow-s", "three").await;
    let (answer, pending) = request(&mut ws, "follow-s", "2", "cancel", json!({})).await;
    assert_eq!(answer["response"]["cancelled"], true, "{answer}");
    pushes_until(&mut ws, pending, |f| is_status(f, "cancelled")).await;
    agent.wait_aborted(1).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(agent.calls().len(), 1, "the follow-up for two and three was dropped");
    let shown = server.get("/api/sessions/follow-s").await;
    assert_eq!(shown.body["session"]["agent_status"]["status"], "cancelled");
    // A message written after the cancel is answered, with the whole history.
    agent.release();
    say(&server, "follow-s", "four").await;
    let replies = agent_messages(&server, "follow-s", "follow", 2).await;
    assert_eq!(replies[1]["metadata"]["termination"], "finish");
    let texts: Vec<String> = agent.calls()[1].body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["sender_id"] == "u")
        .map(|m| m["content"]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(texts, ["one", "two", "three", "four"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_before_the_agent_answers_closes_the_request_and_stores_nothing() {
    let server = TestServer::start(Store::Sqlite).await;
    let agent = TestAgent::start(Behavior::Slow(Duration::from_secs(3))).await;
    register(&server, &agent, "slow", json!({})).await;
    let (mut ws, _) = join(&server, "u", "slow-s").await;
    say(&server, "slow-s", "take your time").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.calls().is_empty() {
        assert!(Instant::now() < deadline, "the agent was not called");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    let (answer, pending) = request(&mut ws, "slow-s", "2", "cancel", json!({})).await;
    assert_eq!(answer["response"]["cancelled"], true, "{answer}");
    let frames = pushes_until(&mut ws, pending, |f| is_status(f, "cancelled")).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the dispatch did not wait for the agent's answer"
    );
    assert!(
        !frames
            .iter()
            .any(|f| f[3] == "stream_chunk" || (f[3] == "message" && f[4]["sender_id"] == "slow")),
        "nothing streamed, nothing stored: {frames:?}"
    );
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let stored: Vec<Value> = messages(&server, "slow-s")
        .await
        .into_iter()
        .filter(|m| m["sender_id"] == "slow")
        .collect();
    assert!(stored.is_empty(), "{stored:?}");
    assert_eq!(agent.calls().len(), 1, "not retried");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_racing_the_end_of_the_reply_stores_exactly_one_of_finish_and_abort() {
    let server = TestServer::start(Store::Sqlite).await;
    let agent = TestAgent::start(Behavior::Gated { before: 2, after: 0 }).await;
    register(&server, &agent, "race", json!({})).await;
    let (mut ws, _) = join(&server, "u", "race-s").await;
    for round in 1..=6usize {
        say(&server, "race-s", &format!("round {round}")).await;
        // start, text-start, two deltas: the agent holds the reply before text-end.
        let streamed = chunks_through(&mut ws, 3).await;
        let dispatch_id = streamed[0]["dispatch_id"].as_str().unwrap().to_string();
        // The reply's end and the cancel, at once; each goes first by a varying head start,
        // so both outcomes occur.
        let head_start = Duration::from_micros(800 * (round as u64 / 2));
        let (release_delay, cancel_delay) = if round % 2 == 0 {
            (Duration::ZERO, head_start)
        } else {
            (head_start, Duration::ZERO)
        };
        let release = async {
            tokio::time::sleep(release_delay).await;
            agent.release();
        };
        let cancel = async {
            tokio::time::sleep(cancel_delay).await;
            server.post("/api/sessions/race-s/cancel", json!({})).await
        };
        let ((), cancel) = tokio::join!(release, cancel);
        assert_eq!(cancel.status, 200, "{}", cancel.body);
        let cancelled = cancel.body["cancelled"] == true;
        let end = pushes_until(&mut ws, Vec::new(), |f| {
            f[3] == "agent_status" && f[4]["dispatch_id"] == dispatch_id.as_str() && f[4]["status"] != "streaming"
        })
        .await;
        let status = end.last().unwrap()[4]["status"].as_str().unwrap().to_string();
        assert_eq!(status, if cancelled { "cancelled" } else { "idle" }, "{end:?}");
        let replies: Vec<Value> = messages(&server, "race-s")
            .await
            .into_iter()
            .filter(|m| m["metadata"]["dispatch_id"] == dispatch_id.as_str())
            .collect();
        assert_eq!(
            replies.len(),
            1,
            "exactly one of finish and abort is stored: {replies:?}"
        );
        let termination = replies[0]["metadata"]["termination"].as_str().unwrap();
        assert!(termination == "finish" || termination == "abort", "{termination}");
        if !cancelled {
            assert_eq!(termination, "finish");
        }
        // A gate permit the closed request never took would let the next round run through.
        agent.drain_permits();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(agent.calls().len(), 6, "one call per round, none retried");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_turn_is_not_dispatched_again_after_a_restart() {
    let server = TestServer::start(Store::Sqlite).await;
    let running = TestAgent::start(Behavior::Gated { before: 1, after: 1 }).await;
    register(&server, &running, "run", json!({})).await;
    let queued = TestAgent::start(Behavior::EchoJsonl).await;
    register(&server, &queued, "wait", json!({"debounce_window_ms": 1500})).await;

    // A running dispatch, cancelled over REST.
    let (mut ws, _) = join(&server, "u", "run-s").await;
    say(&server, "run-s", "go").await;
    chunks_through(&mut ws, 2).await;
    let cancel = server.post("/api/sessions/run-s/cancel", json!({})).await;
    assert_eq!(cancel.body["cancelled"], true, "{}", cancel.body);
    running.wait_aborted(1).await;
    pushes_until(&mut ws, Vec::new(), |f| is_status(f, "cancelled")).await;

    // A turn still in its debounce window: cancelled before the agent is ever called (an
    // empty body is fine too).
    say(&server, "wait-s", "never mind").await;
    let response = server
        .client
        .post(server.url("/api/sessions/wait-s/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["cancelled"], true, "{body}");
    assert!(body["dispatch_id"].is_string());
    let again = server.post("/api/sessions/wait-s/cancel", json!({})).await;
    assert_eq!(again.body, json!({"cancelled": false}));
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert!(queued.calls().is_empty(), "a cancelled queued turn is not dispatched");
    assert_eq!(
        server.get("/api/sessions/wait-s").await.body["session"]["agent_status"]["status"],
        "cancelled"
    );

    // Restart: the log says both turns are answered.
    let (data_dir, _) = server.stop().await;
    let path = data_dir.path().to_path_buf();
    let mut server = TestServer::start_with(Store::Sqlite, |s| s.data_dir = Some(path)).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        running.calls().len(),
        1,
        "a cancelled dispatch is not redone after a restart"
    );
    assert!(
        queued.calls().is_empty(),
        "a cancelled queued turn is not dispatched after a restart"
    );
    for session in ["run-s", "wait-s"] {
        let shown = server.get(&format!("/api/sessions/{session}")).await;
        assert_eq!(shown.body["session"]["agent_status"]["status"], "idle", "{session}");
    }
    // Later messages dispatch normally.
    say(&server, "wait-s", "now answer").await;
    let replies = agent_messages(&server, "wait-s", "wait", 1).await;
    assert_eq!(text_of(&replies[0]["content"]["parts"]), "echo: now answer");
    assert_eq!(queued.calls().len(), 1);
    // Nothing owed: a cancel answers false; unknown sessions are 404.
    assert_eq!(
        server.post("/api/sessions/wait-s/cancel", json!({})).await.body,
        json!({"cancelled": false})
    );
    assert_eq!(server.post("/api/sessions/nope/cancel", json!({})).await.status, 404);
    let bad = server
        .post("/api/sessions/wait-s/cancel", json!({"dispatch_id": ""}))
        .await;
    assert_eq!(bad.status, 422);
    assert_eq!(bad.body["code"], "invalid_cancel");
    server.data_dir = data_dir;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regenerate_redoes_the_reply_on_the_current_branch() {
    let server = TestServer::start(Store::Sqlite).await;
    let agent = TestAgent::start(Behavior::EchoJsonl).await;
    register(&server, &agent, "again", json!({})).await;
    say(&server, "again-s", "hello").await;
    let first = agent_messages(&server, "again-s", "again", 1).await.remove(0);

    // REST: an empty body regenerates the latest reply.
    let regenerated = server.post("/api/sessions/again-s/regenerate", json!({})).await;
    assert_eq!(regenerated.status, 200, "{}", regenerated.body);
    assert_eq!(regenerated.body["seq"], 3);
    assert_eq!(regenerated.body["message"]["kind"], "regenerate");
    assert_eq!(regenerated.body["message"]["sender_id"], "u");
    let replies = agent_messages(&server, "again-s", "again", 2).await;
    assert_eq!(replies[1]["metadata"]["replaces"], first["id"]);
    assert_eq!(text_of(&replies[1]["content"]["parts"]), "echo: hello");
    // The agent saw the current branch: the user's turn, without the old reply or the
    // regenerate message.
    let history = agent.calls()[1].body["messages"].clone();
    let kinds: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["text"], "{history}");

    // Socket: the `regenerate` event, naming the message to replace; answered like a send.
    let (mut ws, _) = join(&server, "u", "again-s").await;
    let (answer, _) = request(
        &mut ws,
        "again-s",
        "2",
        "regenerate",
        json!({"message_id": replies[1]["id"]}),
    )
    .await;
    assert_eq!(answer["status"], "ok", "{answer}");
    assert_eq!(answer["response"], json!({"seq": 5}));
    let replies = agent_messages(&server, "again-s", "again", 3).await;
    assert_eq!(replies[2]["metadata"]["replaces"], replies[1]["id"]);
    assert_eq!(agent.calls()[2].body["messages"].as_array().unwrap().len(), 1);
    // A new turn after it: the history is the branch (hello, the latest reply, the new text).
    say(&server, "again-s", "next").await;
    let replies = agent_messages(&server, "again-s", "again", 4).await;
    assert!(replies[3]["metadata"].get("replaces").is_none());
    let seqs: Vec<u64> = agent.calls()[3].body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 6, 7]);

    // Validation: a regenerate is the user's, with an optional string message_id.
    let (mut agent_socket, _) = join(&server, "again", "again-s").await;
    let (refused, _) = request(&mut agent_socket, "again-s", "3", "regenerate", json!({})).await;
    assert_eq!(refused["response"]["error"], "forbidden");
    let bad = server
        .post("/api/sessions/again-s/regenerate", json!({"message_id": 5}))
        .await;
    assert_eq!(bad.status, 422);
    assert_eq!(bad.body["code"], "invalid_message_format");
    let as_agent = server
        .post(
            "/api/sessions/again-s/messages",
            json!({"agent_id": "again", "kind": "regenerate", "content": {}}),
        )
        .await;
    assert_eq!(as_agent.status, 422);
    assert_eq!(
        as_agent.body["error"],
        "kind regenerate may only be sent by the session's user"
    );
    let empty_id = server
        .post(
            "/api/sessions/again-s/messages",
            json!({"user_id": "u", "kind": "regenerate", "content": {"message_id": ""}}),
        )
        .await;
    assert_eq!(empty_id.status, 422);
    assert_eq!(
        server.post("/api/sessions/nope/regenerate", json!({})).await.status,
        404
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_then_regenerate_replaces_the_aborted_reply() {
    let server = TestServer::start(Store::Sqlite).await;
    let agent = TestAgent::start(Behavior::Gated { before: 2, after: 0 }).await;
    register(&server, &agent, "redo", json!({})).await;
    let (mut ws, _) = join(&server, "u", "redo-s").await;
    say(&server, "redo-s", "hello").await;
    chunks_through(&mut ws, 3).await;
    // The cancel answers once the aborted reply is stored, so a regenerate written after the
    // answer comes after it in the log and supersedes it.
    let (cancelled, _) = request(&mut ws, "redo-s", "2", "cancel", json!({})).await;
    assert_eq!(cancelled["response"]["cancelled"], true, "{cancelled}");
    let (regenerated, _) = request(&mut ws, "redo-s", "3", "regenerate", json!({})).await;
    assert_eq!(regenerated["response"], json!({"seq": 3}), "{regenerated}");
    agent.release();
    let stored = agent_messages(&server, "redo-s", "redo", 2).await;
    assert_eq!(stored[0]["seq"], 2);
    assert_eq!(stored[0]["metadata"]["termination"], "abort");
    assert_eq!(stored[1]["metadata"]["termination"], "finish");
    assert_eq!(stored[1]["metadata"]["replaces"], stored[0]["id"]);
    let history = agent.calls()[1].body["messages"].clone();
    assert_eq!(history.as_array().unwrap().len(), 1, "{history}");
    server.stop().await;
}

/// After an approval the AI SDK continues the same message with the tool's outcome, without
/// naming the tool call again: FleetLM assembles the continuation from the stored message (as
/// the SDK does on the client) and stores the whole message, marked so, instead of refusing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_continuing_a_message_after_an_approval_is_stored_whole() {
    let server = TestServer::start(Store::Sqlite).await;
    let agent = TestAgent::start(Behavior::ApprovalThenContinue).await;
    register(&server, &agent, "approver", json!({})).await;
    say(&server, "approver-s", "delete /tmp/x").await;
    let asked = agent_messages(&server, "approver-s", "approver", 1).await;
    assert_eq!(
        asked[0]["content"]["parts"][1]["state"], "approval-requested",
        "{}",
        asked[0]
    );
    let approval = json!({"message_id": "m1", "parts": [
        {"type": "tool-deleteFile", "toolCallId": "c1", "state": "approval-responded",
         "input": {"path": "/tmp/x"}, "approval": {"id": "a1", "approved": true}}
    ]});
    let sent = server
        .post(
            "/api/sessions/approver-s/messages",
            json!({"user_id": "u", "kind": "tool_result", "content": approval}),
        )
        .await;
    assert_eq!(sent.status, 200, "{}", sent.body);
    let stored = agent_messages(&server, "approver-s", "approver", 2).await;
    let continued = &stored[1];
    assert_eq!(continued["metadata"]["termination"], "finish", "{continued}");
    assert!(continued["metadata"].get("error").is_none(), "not refused: {continued}");
    assert_eq!(continued["metadata"]["continuation"], "whole", "{continued}");
    assert_eq!(continued["content"]["id"], "m1");
    let parts = continued["content"]["parts"].as_array().unwrap();
    let shape: Vec<(String, String)> = parts
        .iter()
        .map(|part| {
            (
                part["type"].as_str().unwrap().to_string(),
                part["state"].as_str().unwrap_or("-").to_string(),
            )
        })
        .collect();
    // As the AI SDK's own assembly gives it: the stored parts, the tool part updated in place,
    // then a step start for each of the continuation's steps and its text.
    let expected: Vec<(String, String)> = [
        ("step-start", "-"),
        ("tool-deleteFile", "output-available"),
        ("step-start", "-"),
        ("step-start", "-"),
        ("text", "done"),
    ]
    .iter()
    .map(|(kind, state)| (kind.to_string(), state.to_string()))
    .collect();
    assert_eq!(shape, expected, "{continued}");
    assert_eq!(parts[1]["output"], json!({"deleted": true}));
    assert_eq!(
        parts[1]["approval"]["approved"], true,
        "the approval folded in: {continued}"
    );
    assert_eq!(parts[4]["text"], "Deleted.");
    // The first message stays as it was stored: a reader takes the whole copy in its place.
    assert!(stored[0]["metadata"].get("continuation").is_none());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_results_reach_the_agent_as_sent_and_trigger_a_dispatch() {
    let server = TestServer::start(Store::Sqlite).await;
    let agent = TestAgent::start(Behavior::EchoJsonl).await;
    register(&server, &agent, "tools", json!({})).await;
    say(&server, "tools-s", "weather?").await;
    agent_messages(&server, "tools-s", "tools", 1).await;
    let content = json!({"message_id": "reply-1", "parts": [
        {"type": "tool-weather", "toolCallId": "c1", "state": "output-available",
         "input": {"city": "Oslo"}, "output": {"celsius": 3}},
        {"type": "tool-delete", "toolCallId": "c2", "state": "approval-responded",
         "input": {}, "approval": {"id": "a1", "approved": false, "reason": "not now"}},
        {"type": "dynamic-tool", "toolName": "lookup", "toolCallId": "c3", "state": "output-error",
         "input": {}, "errorText": "offline"}
    ]});
    let sent = server
        .post(
            "/api/sessions/tools-s/messages",
            json!({"user_id": "u", "kind": "tool_result", "content": content}),
        )
        .await;
    assert_eq!(sent.status, 200, "{}", sent.body);
    agent_messages(&server, "tools-s", "tools", 2).await;
    let history = agent.calls()[1].body["messages"].clone();
    let last = history.as_array().unwrap().last().unwrap();
    assert_eq!(last["kind"], "tool_result");
    assert_eq!(last["content"], content);

    let invalid = [
        (
            json!({"parts": content["parts"]}),
            "tool_result content.message_id must be a non-empty string of at most 255 characters",
        ),
        (
            json!({"message_id": "reply-1", "parts": []}),
            "tool_result content.parts must be a non-empty array of tool parts",
        ),
        (
            json!({"message_id": "reply-1", "parts": [{"type": "tool-x", "toolCallId": "c", "state": "input-available"}]}),
            "tool_result content.parts[0]: state must be output-available, output-error or approval-responded",
        ),
        (
            json!({"message_id": "reply-1", "parts": [{"type": "text", "text": "hi"}]}),
            "tool_result content.parts[0]: type must be \"tool-<name>\" or \"dynamic-tool\"",
        ),
        (
            json!({"message_id": "reply-1", "parts": [{"type": "tool-x", "toolCallId": "c", "state": "approval-responded", "approval": {"id": "a"}}]}),
            "tool_result content.parts[0]: an approval-responded part needs approval {id (a string), approved (a boolean), reason?}",
        ),
    ];
    for (content, sentence) in invalid {
        let refused = server
            .post(
                "/api/sessions/tools-s/messages",
                json!({"user_id": "u", "kind": "tool_result", "content": content}),
            )
            .await;
        assert_eq!(refused.status, 422, "{content}");
        assert_eq!(refused.body["code"], "invalid_message_format");
        assert_eq!(refused.body["error"], sentence);
    }
    // Over the socket the same validation answers with the sentence.
    let (mut ws, _) = join(&server, "u", "tools-s").await;
    let (refused, _) = request(
        &mut ws,
        "tools-s",
        "2",
        "send",
        json!({"content": {"kind": "tool_result", "content": {"message_id": "m", "parts": [1]}}}),
    )
    .await;
    assert_eq!(refused["status"], "error");
    assert_eq!(
        refused["response"]["details"],
        "tool_result content.parts[0]: must be an object"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(agent.calls().len(), 2, "refused tool results dispatch nothing");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_token_mode_only_the_user_or_the_api_key_may_cancel_or_regenerate() {
    const SECRET: &str = "a-test-secret-of-some-length";
    let server = TestServer::start_with(Store::Sqlite, |s| {
        s.auth_secret = Some(SECRET.into());
        s.api_key = Some("admin-key".into());
    })
    .await;
    let token = |sub: &str| {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            + 600;
        fleetlm::auth::mint(SECRET.as_bytes(), &fleetlm::auth::Claims { sub: sub.into(), exp })
    };
    let post = |path: &str, bearer: String| {
        let request = server
            .client
            .post(server.url(path))
            .bearer_auth(bearer)
            .json(&json!({}));
        async move { request.send().await.unwrap().status().as_u16() }
    };
    let agent = json!({"agent": {"id": "a", "name": "A", "origin_url": "http://127.0.0.1:9",
        "debounce_window_ms": 60000}});
    let created = server
        .client
        .post(server.url("/api/agents"))
        .bearer_auth("admin-key")
        .json(&agent)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let session = server
        .client
        .post(server.url("/api/sessions"))
        .bearer_auth(token("alice"))
        .json(&json!({"user_id": "alice", "agent_id": "a", "id": "s"}))
        .send()
        .await
        .unwrap();
    assert_eq!(session.status(), 201);
    for path in ["/api/sessions/s/cancel", "/api/sessions/s/regenerate"] {
        assert_eq!(post(path, token("bob")).await, 403, "{path}: a stranger");
        assert_eq!(post(path, token("a")).await, 403, "{path}: the session's agent");
        assert_eq!(post(path, token("alice")).await, 200, "{path}: the user");
        assert_eq!(post(path, "admin-key".into()).await, 200, "{path}: the API key");
    }
    server.stop().await;
}
