//! The Phoenix Channels gateway against a real server on 127.0.0.1:0, frame by frame.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Store, TestServer, WsClient, WsError};

async fn client(server: &TestServer, query: &str) -> WsClient {
    match WsClient::connect(&server.base, query).await {
        Ok(client) => client,
        Err(WsError::Refused(status)) => panic!("upgrade refused with {status}"),
    }
}

async fn append(server: &TestServer, session: &str, sender: Value) -> Value {
    let reply = server.post(&format!("/api/sessions/{session}/messages"), sender).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.body["message"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_join_replay_push_send_and_leave_frame_by_frame() {
    let server = TestServer::start(Store::Sqlite).await;
    server.agent_and_session("a", "u", "s").await;
    let first = append(&server, "s", json!({"user_id": "u", "content": {"text": "one"}})).await;
    let second = append(&server, "s", json!({"agent_id": "a", "content": {"text": "two"}})).await;

    let mut ws = client(&server, "user_id=u&vsn=2.0.0").await;
    ws.send(r#"[null,"1","phoenix","heartbeat",{}]"#).await;
    assert_eq!(
        ws.next().await,
        json!([null, "1", "phoenix", "phx_reply", {"status": "ok", "response": {}}])
    );

    ws.send(r#"["3","3","session:s","phx_join",{"last_seq":1}]"#).await;
    let joined = ws.next().await;
    assert_eq!(
        joined.as_array().unwrap()[..4],
        json!(["3", "3", "session:s", "phx_reply"]).as_array().unwrap()[..]
    );
    let response = &joined[4]["response"];
    assert_eq!(joined[4]["status"], "ok");
    assert_eq!(response["session_id"], "s");
    assert_eq!(
        response["messages"],
        json!([second]),
        "replay holds exactly what was stored after last_seq"
    );
    assert_eq!(
        (response["has_more"].clone(), response["last_seq"].clone()),
        (json!(false), json!(2))
    );
    let _ = first;

    let third = append(&server, "s", json!({"agent_id": "a", "content": {"text": "three"}})).await;
    assert_eq!(
        ws.next().await,
        json!(["3", null, "session:s", "message", third]),
        "the push is the stored message"
    );

    ws.send(r#"["3","4","session:s","send",{"content":{"kind":"text","content":{"text":"four"}},"client_id":"c-4"}]"#)
        .await;
    let mut frames = [ws.next().await, ws.next().await];
    frames.sort_by_key(|f| f[3].as_str().unwrap().to_string());
    assert_eq!(frames[0][3], "message", "the sender gets its own message too");
    assert_eq!(frames[0][4]["seq"], 4);
    assert_eq!(frames[0][4]["sender_id"], "u");
    assert_eq!(
        frames[1],
        json!(["3", "4", "session:s", "phx_reply", {"status": "ok", "response": {"seq": 4}}])
    );
    let stored = server.get("/api/sessions/s/messages?after_seq=3").await;
    assert_eq!(stored.body["messages"][0], frames[0][4], "live push and REST agree");

    ws.send(r#"["3","5","session:s","send",{"content":{"content":{"text":"four"}},"client_id":"c-4"}]"#)
        .await;
    assert_eq!(
        ws.next().await[4],
        json!({"status": "ok", "response": {"seq": 4, "deduplicated": true}})
    );

    ws.send(r#"["3","6","session:s","phx_leave",{}]"#).await;
    assert_eq!(
        ws.next().await,
        json!(["3", "6", "session:s", "phx_reply", {"status": "ok", "response": {}}])
    );
    assert_eq!(ws.next().await, json!(["3", "3", "session:s", "phx_close", {}]));
    append(&server, "s", json!({"agent_id": "a", "content": {}})).await;
    assert!(ws.silent_for(Duration::from_millis(300)).await, "no pushes after leave");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_replies_and_the_socket_survives() {
    let server = TestServer::start_with(Store::Sqlite, |s| {
        s.ws_max_frame_bytes = Some(fleetlm::config::ByteSize(4096))
    })
    .await;
    server.agent_and_session("a", "u", "s").await;
    server
        .post(
            "/api/sessions",
            json!({"user_id": "other", "agent_id": "a", "id": "theirs"}),
        )
        .await;
    let mut ws = client(&server, "user_id=u&vsn=2.0.0").await;
    let cases = [
        (
            r#"["1","1","rooms:x","phx_join",{}]"#,
            json!({"reason": "unmatched topic"}),
        ),
        (
            r#"["1","2","session:nope","phx_join",{}]"#,
            json!({"reason": "not found"}),
        ),
        (
            r#"["1","3","session:theirs","phx_join",{}]"#,
            json!({"reason": "unauthorized"}),
        ),
        (
            r#"["1","4","inbox:other","phx_join",{}]"#,
            json!({"reason": "unauthorized"}),
        ),
        (
            r#"[null,"5","session:s","send",{"content":{"content":{}}}]"#,
            json!({"reason": "unmatched topic"}),
        ),
        (
            r#"["1","6","session:s","phx_join",{"last_seq":"x"}]"#,
            json!({"reason": "last_seq must be a non-negative integer"}),
        ),
    ];
    for (frame, response) in cases {
        ws.send(frame).await;
        let reply = ws.next().await;
        assert_eq!(reply[4], json!({"status": "error", "response": response}), "{frame}");
    }
    ws.send(r#"["7","7","session:s","phx_join",{}]"#).await;
    assert_eq!(ws.next().await[4]["status"], "ok");
    ws.send(r#"["7","8","session:s","dance",{}]"#).await;
    assert_eq!(
        ws.next().await[4],
        json!({"status": "error", "response": {"reason": "unknown_event"}})
    );
    ws.send(r#"["7","9","session:s","send",{"content":{"content":"text"}}]"#)
        .await;
    assert_eq!(
        ws.next().await[4],
        json!({"status": "error", "response": {"error": "invalid_message_format", "details": "content must be a map"}})
    );
    ws.send(r#"["7","10","session:s","send",{"content":{"content":{}},"expected_seq":5}]"#)
        .await;
    let conflict = ws.next().await;
    assert_eq!(conflict[4]["response"]["error"], "seq_conflict");
    assert_eq!(conflict[4]["response"]["last_seq"], 0);
    ws.send(r#"["7","11","session:s","send",[1,2]]"#).await;
    assert_eq!(
        ws.next().await[4],
        json!({"status": "error", "response": {"reason": "payload must be an object"}})
    );
    ws.send("this is not json").await;
    ws.send(r#"["only","four","parts","here"]"#).await;
    ws.send(r#"[null,"12","phoenix","heartbeat",{}]"#).await;
    assert_eq!(
        ws.next().await[1],
        "12",
        "malformed frames are ignored and the socket stays up"
    );

    ws.send(format!(
        r#"[null,"13","phoenix","heartbeat",{{"pad":"{}"}}]"#,
        "x".repeat(5000)
    ))
    .await;
    assert_eq!(ws.closed_with().await, 1009, "an oversized frame closes with 1009");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_object_frames_work_and_replies_omit_join_ref() {
    let server = TestServer::start(Store::Sqlite).await;
    server.agent_and_session("a", "u", "s").await;
    let mut ws = client(&server, "user_id=u").await;
    ws.send(r#"{"topic":"session:s","event":"phx_join","payload":{},"ref":"1","join_ref":"1"}"#)
        .await;
    let reply = ws.next().await;
    assert_eq!(reply["event"], "phx_reply");
    assert_eq!(reply["ref"], "1");
    assert!(reply.get("join_ref").is_none());
    assert_eq!(reply["payload"]["status"], "ok");
    let message = append(&server, "s", json!({"agent_id": "a", "content": {"text": "hi"}})).await;
    let push = ws.next().await;
    assert_eq!(
        push,
        json!({"topic": "session:s", "event": "message", "payload": message, "ref": null})
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_refused_without_identity_or_with_a_bad_vsn() {
    let server = TestServer::start(Store::Sqlite).await;
    assert!(matches!(
        WsClient::connect(&server.base, "vsn=2.0.0").await,
        Err(WsError::Refused(403))
    ));
    assert!(matches!(
        WsClient::connect(&server.base, "user_id=u&vsn=3.0.0").await,
        Err(WsError::Refused(400))
    ));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_mode_needs_a_matching_token() {
    const SECRET: &str = "socket-secret-long-enough";
    let server = TestServer::start_with(Store::Sqlite, |s| s.auth_secret = Some(SECRET.into())).await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + 600;
    let token = fleetlm::auth::mint(SECRET.as_bytes(), &fleetlm::auth::Claims { sub: "u".into(), exp });
    assert!(matches!(
        WsClient::connect(&server.base, "user_id=u&vsn=2.0.0").await,
        Err(WsError::Refused(403))
    ));
    assert!(matches!(
        WsClient::connect(&server.base, "token=junk&vsn=2.0.0").await,
        Err(WsError::Refused(403))
    ));
    let query = format!("token={token}&user_id=someone-else&vsn=2.0.0");
    assert!(matches!(
        WsClient::connect(&server.base, &query).await,
        Err(WsError::Refused(403))
    ));
    let mut ws = client(&server, &format!("token={token}&vsn=2.0.0")).await;
    ws.send(r#"[null,"1","phoenix","heartbeat",{}]"#).await;
    assert_eq!(ws.next().await[4]["status"], "ok");

    // A token that expires closes the socket with 4001 after a token_expired push.
    let soon = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + 2;
    let short = fleetlm::auth::mint(
        SECRET.as_bytes(),
        &fleetlm::auth::Claims {
            sub: "u".into(),
            exp: soon,
        },
    );
    let mut ws = client(&server, &format!("token={short}&vsn=2.0.0")).await;
    assert_eq!(ws.next().await, json!([null, null, "phoenix", "token_expired", {}]));
    assert_eq!(ws.closed_with().await, 4001);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_reaches_the_other_members_only() {
    let server = TestServer::start(Store::Sqlite).await;
    server.agent_and_session("a", "u", "s").await;
    let mut user = client(&server, "user_id=u&vsn=2.0.0").await;
    let mut agent = client(&server, "agent_id=a&vsn=2.0.0").await;
    for ws in [&mut user, &mut agent] {
        ws.send(r#"["1","1","session:s","phx_join",{}]"#).await;
        assert_eq!(
            ws.next().await[4]["status"],
            "ok",
            "both the user and the agent may join"
        );
    }
    user.send(r#"["1","2","session:s","typing",{"typing":true}]"#).await;
    assert_eq!(user.next().await[4]["status"], "ok");
    assert_eq!(
        agent.next().await,
        json!(["1", null, "session:s", "typing", {"user_id": "u", "typing": true}])
    );
    assert!(
        user.silent_for(Duration::from_millis(200)).await,
        "the typist does not hear itself"
    );
    let stored = server.get("/api/sessions/s/messages").await;
    assert_eq!(stored.body["messages"], json!([]), "typing is never stored");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_during_heavy_appends_sees_every_seq_exactly_once_in_order() {
    let server = TestServer::start(Store::Sqlite).await;
    server.agent_and_session("a", "u", "s").await;
    const TOTAL: u64 = 600;
    let writer_server_base = server.base.clone();
    let writer = tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut tasks = Vec::new();
        for lane in 0..4u64 {
            let (client, base) = (client.clone(), writer_server_base.clone());
            tasks.push(tokio::spawn(async move {
                for n in 0..TOTAL / 4 {
                    let body = json!({"agent_id": "a", "content": {"lane": lane, "n": n}});
                    let reply = client
                        .post(format!("{base}/api/sessions/s/messages"))
                        .json(&body)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(reply.status(), 200);
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
    });
    // Join while the appends run.
    loop {
        let page = server.get("/api/sessions/s").await;
        if page.body["session"]["last_seq"].as_u64().unwrap() >= 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut ws = client(&server, "user_id=u&vsn=2.0.0").await;
    ws.send(r#"["1","1","session:s","phx_join",{"last_seq":0}]"#).await;
    let joined = ws.next().await;
    let replay = joined[4]["response"]["messages"].as_array().unwrap().clone();
    assert_eq!(
        joined[4]["response"]["has_more"], false,
        "joined early enough for one page"
    );
    let mut seqs: Vec<u64> = replay.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    while seqs.len() < TOTAL as usize {
        let frame = ws.next().await;
        assert_eq!(frame[3], "message", "{frame}");
        seqs.push(frame[4]["seq"].as_u64().unwrap());
    }
    writer.await.unwrap();
    let expected: Vec<u64> = (1..=TOTAL).collect();
    assert_eq!(seqs, expected, "replay + live = every seq exactly once, in order");
    assert!(
        ws.silent_for(Duration::from_millis(200)).await,
        "no duplicates after the last one"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_snapshot_then_coalesced_deltas_with_only_changed_entries() {
    let server = TestServer::start_with(Store::Sqlite, |s| s.inbox_push_interval_ms = Some(400)).await;
    server.agent_and_session("a", "u", "s1").await;
    server
        .post("/api/sessions", json!({"user_id": "u", "agent_id": "a", "id": "s2"}))
        .await;
    let mut ws = client(&server, "user_id=u&vsn=2.0.0").await;
    ws.send(r#"["1","1","inbox:u","phx_join",{}]"#).await;
    let snapshot = ws.next().await;
    let entries = snapshot[4]["response"]["inbox"].as_array().unwrap();
    assert_eq!(entries.len(), 2);

    for n in 0..10 {
        append(
            &server,
            "s1",
            json!({"agent_id": "a", "content": {"text": format!("m{n}")}}),
        )
        .await;
    }
    let mut deltas = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    while tokio::time::Instant::now() < deadline {
        if let Ok(frame) = tokio::time::timeout(Duration::from_millis(100), ws.next()).await {
            assert_eq!(frame[3], "inbox_delta");
            deltas.push(frame[4]["inbox"].clone());
        }
    }
    assert!(
        !deltas.is_empty() && deltas.len() <= 3,
        "bursts are coalesced: {} pushes",
        deltas.len()
    );
    for delta in &deltas {
        for entry in delta.as_array().unwrap() {
            assert_eq!(entry["session_id"], "s1", "only the changed session is sent");
        }
    }
    let last = deltas.last().unwrap()[0].clone();
    assert_eq!(last["unread_count"], 10);
    assert_eq!(last["last_message_preview"], "m9");

    // A new session for the user appears as an entry.
    server
        .post("/api/sessions", json!({"user_id": "u", "agent_id": "a", "id": "s3"}))
        .await;
    let frame = ws.next().await;
    assert_eq!(frame[3], "inbox_delta");
    assert_eq!(frame[4]["inbox"][0]["session_id"], "s3");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_sockets_with_1012() {
    let server = TestServer::start(Store::Sqlite).await;
    let mut ws = client(&server, "user_id=u&vsn=2.0.0").await;
    let stopping = tokio::spawn(server.stop());
    assert_eq!(ws.closed_with().await, 1012);
    stopping.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_stops_reading_slows_no_one_and_is_resynced_or_closed() {
    let server = TestServer::start_with(Store::Sqlite, |s| s.ws_outbound_queue = Some(16)).await;
    server.agent_and_session("a", "u", "s").await;
    let mut slow = client(&server, "user_id=u&vsn=2.0.0").await;
    let mut fast = client(&server, "agent_id=a&vsn=2.0.0").await;
    for ws in [&mut slow, &mut fast] {
        ws.send(r#"["1","1","session:s","phx_join",{}]"#).await;
        assert_eq!(ws.next().await[4]["status"], "ok");
    }
    const TOTAL: u64 = 1500;
    let base = server.base.clone();
    let writer = tokio::spawn(async move {
        let client = reqwest::Client::new();
        let pad = "p".repeat(4000);
        for n in 0..TOTAL {
            let body = json!({"user_id": "u", "content": {"n": n, "pad": pad}});
            let reply = client
                .post(format!("{base}/api/sessions/s/messages"))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(reply.status(), 200, "appends are never held up by a slow socket");
        }
    });
    // The fast socket gets every message in order while the slow one reads nothing.
    for seq in 1..=TOTAL {
        let frame = fast.next().await;
        assert_eq!(frame[4]["seq"], seq);
    }
    writer.await.unwrap();
    // The slow socket finally reads: it is told to resync, or was closed with 1013 — or, when
    // even the close frame could not get past the bytes it never read, the server gave up on
    // the connection (it ends without a close handshake once the buffered frames are read).
    let mut outcome = None;
    while outcome.is_none() {
        use futures_util::StreamExt;
        let next = tokio::time::timeout(Duration::from_secs(5), slow.stream.next())
            .await
            .expect("a frame within 5 s");
        match next {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame[3] == "resync" {
                    outcome = Some(format!("resync from {}", frame[4]["last_seq"]));
                }
            }
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(close)))) => {
                assert_eq!(u16::from(close.code), 1013);
                outcome = Some("closed 1013".into());
            }
            Some(Ok(
                tokio_tungstenite::tungstenite::Message::Ping(_) | tokio_tungstenite::tungstenite::Message::Pong(_),
            )) => {}
            Some(Err(tokio_tungstenite::tungstenite::Error::Protocol(
                tokio_tungstenite::tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
            )))
            | None => outcome = Some("dropped by the server".into()),
            other => panic!("unexpected {other:?}"),
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_sends_are_stored_and_answered_in_the_order_sent() {
    let server = TestServer::start(Store::Sqlite).await;
    server.agent_and_session("a", "u", "s").await;
    let mut ws = client(&server, "user_id=u&vsn=2.0.0").await;
    ws.send(r#"["1","j","session:s","phx_join",{}]"#).await;
    assert_eq!(ws.next().await[4]["status"], "ok");
    const SENDS: u64 = 200;
    for n in 0..SENDS {
        ws.send(format!(
            r#"["1","r{n}","session:s","send",{{"content":{{"content":{{"n":{n}}}}}}}]"#
        ))
        .await;
    }
    let mut replies = Vec::new();
    let mut pushes = Vec::new();
    while replies.len() < SENDS as usize || pushes.len() < SENDS as usize {
        let frame = ws.next().await;
        match frame[3].as_str().unwrap() {
            "phx_reply" => replies.push((
                frame[1].as_str().unwrap().to_string(),
                frame[4]["response"]["seq"].as_u64().unwrap(),
            )),
            "message" => pushes.push((
                frame[4]["seq"].as_u64().unwrap(),
                frame[4]["content"]["n"].as_u64().unwrap(),
            )),
            other => panic!("unexpected {other}"),
        }
    }
    for (n, (reference, seq)) in replies.iter().enumerate() {
        assert_eq!(reference, &format!("r{n}"), "replies come in the order of the sends");
        assert_eq!(*seq, n as u64 + 1, "send n is stored as seq n + 1");
    }
    for (seq, n) in pushes {
        assert_eq!(seq, n + 1);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_join_replaces_the_first_and_idle_sockets_are_closed() {
    let server = TestServer::start_with(Store::Sqlite, |s| s.ws_idle_timeout_secs = Some(1)).await;
    server.agent_and_session("a", "u", "s").await;
    let mut ws = client(&server, "user_id=u&vsn=2.0.0").await;
    ws.send(r#"["1","1","session:s","phx_join",{}]"#).await;
    assert_eq!(ws.next().await[4]["status"], "ok");
    ws.send(r#"["2","2","session:s","phx_join",{}]"#).await;
    assert_eq!(
        ws.next().await,
        json!(["1", "1", "session:s", "phx_close", {}]),
        "the old membership is closed first"
    );
    let rejoined = ws.next().await;
    assert_eq!(
        (rejoined[0].clone(), rejoined[1].clone(), rejoined[4]["status"].clone()),
        (json!("2"), json!("2"), json!("ok"))
    );
    let message = append(&server, "s", json!({"agent_id": "a", "content": {}})).await;
    assert_eq!(
        ws.next().await,
        json!(["2", null, "session:s", "message", message]),
        "pushes carry the new join_ref, once"
    );
    assert_eq!(
        ws.closed_with().await,
        1000,
        "a socket silent for the idle timeout is closed"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_an_error_reply_plus_a_backpressure_push() {
    let server = TestServer::start_with(Store::Sqlite, |s| {
        s.wal_budget_bytes = Some(fleetlm::config::ByteSize(3 * 1024 * 1024));
        s.flush_interval_ms = Some(600_000);
        s.flush_threshold_bytes = Some(fleetlm::config::ByteSize(1 << 40));
    })
    .await;
    server.agent_and_session("a", "u", "s").await;
    let mut ws = client(&server, "user_id=u&vsn=2.0.0").await;
    ws.send(r#"["1","1","session:s","phx_join",{}]"#).await;
    assert_eq!(ws.next().await[4]["status"], "ok");
    let pad = "x".repeat(60_000);
    let mut n = 0;
    let refusal = loop {
        n += 1;
        assert!(n < 200, "the WAL budget was never reached");
        ws.send(format!(
            r#"["1","{n}","session:s","send",{{"content":{{"content":{{"pad":"{pad}"}}}}}}]"#
        ))
        .await;
        let reply = ws.next_skipping(&["message"]).await;
        if reply[4]["status"] == "error" {
            break reply;
        }
    };
    let response = &refusal[4]["response"];
    assert_eq!(response["error"], "overloaded");
    assert_eq!(response["retry_after_ms"], 1000);
    let push = ws.next_skipping(&["message"]).await;
    assert_eq!(
        push,
        json!(["1", null, "session:s", "backpressure", {"reason": "overloaded", "retry_after_ms": 1000}])
    );
    server.stop().await;
}

/// Messages (each with a client id) of the sessions reloaded below: more than `CLIENT_ID_WINDOW`.
const RELOADED: u64 = 1100;

/// A send that must first look its client id up in the archive (the session was reloaded with
/// more client ids than the in-memory window) is still stored before the sends after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_sends_stay_in_order_when_one_needs_the_archive() {
    let server = TestServer::start(Store::Sqlite).await;
    server.agent_and_session("a", "u", "s").await;
    // More client ids than a loaded session keeps in memory: a fresh one needs the archive.
    for n in 0..RELOADED {
        append(
            &server,
            "s",
            json!({"user_id": "u", "content": {"n": n}, "client_id": format!("old{n}")}),
        )
        .await;
    }
    let (data_dir, _) = server.stop().await;
    let path = data_dir.path().to_path_buf();
    let mut server = TestServer::start_with(Store::Sqlite, |s| s.data_dir = Some(path)).await;
    let mut ws = client(&server, "user_id=u&vsn=2.0.0").await;
    ws.send(r#"["1","j","session:s","phx_join",{"last_seq":1100}]"#).await;
    assert_eq!(ws.next().await[4]["status"], "ok");
    ws.send_batch(vec![
        r#"["1","a","session:s","send",{"content":{"content":{"text":"A"}},"client_id":"fresh-a"}]"#.into(),
        r#"["1","b","session:s","send",{"content":{"content":{"text":"B"}}}]"#.into(),
    ])
    .await;
    let mut stored = Vec::new();
    while stored.len() < 2 {
        let frame = ws.next().await;
        if frame[3] == "phx_reply" {
            assert_eq!(frame[4]["status"], "ok", "{frame}");
            stored.push((
                frame[1].as_str().unwrap().to_string(),
                frame[4]["response"]["seq"].as_u64().unwrap(),
            ));
        }
    }
    assert_eq!(
        stored,
        vec![("a".to_string(), RELOADED + 1), ("b".to_string(), RELOADED + 2)],
        "stored in the order sent"
    );
    server.data_dir = data_dir;
    server.stop().await;
}

/// A longer pipelined mix after a reload: sends with fresh client ids (each needs the archive
/// look-up) and without, interleaved, then more sends once those settle. Every send is stored in
/// the order sent, and the socket goes back to queueing sends at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_mix_of_archive_checks_and_plain_sends_keeps_the_order_sent() {
    let server = TestServer::start(Store::Sqlite).await;
    server.agent_and_session("a", "u", "s").await;
    // More client ids than a loaded session keeps in memory: a fresh one needs the archive.
    for n in 0..RELOADED {
        append(
            &server,
            "s",
            json!({"user_id": "u", "content": {"n": n}, "client_id": format!("old{n}")}),
        )
        .await;
    }
    let (data_dir, _) = server.stop().await;
    let path = data_dir.path().to_path_buf();
    let mut server = TestServer::start_with(Store::Sqlite, |s| s.data_dir = Some(path)).await;
    let mut ws = client(&server, "user_id=u&vsn=2.0.0").await;
    ws.send(r#"["1","j","session:s","phx_join",{"last_seq":1100}]"#).await;
    assert_eq!(ws.next().await[4]["status"], "ok");
    let frame = |n: usize| {
        let client_id = if n.is_multiple_of(3) {
            format!(r#","client_id":"fresh-{n}""#)
        } else {
            String::new()
        };
        format!(r#"["1","r{n}","session:s","send",{{"content":{{"content":{{"n":{n}}}}}{client_id}}}]"#)
    };
    let mut expected = Vec::new();
    for round in 0..2 {
        let sends: Vec<usize> = (round * 12..round * 12 + 12).collect();
        ws.send_batch(sends.iter().map(|n| frame(*n)).collect()).await;
        let mut stored = Vec::new();
        while stored.len() < sends.len() {
            let frame = ws.next().await;
            if frame[3] == "phx_reply" {
                assert_eq!(frame[4]["status"], "ok", "{frame}");
                stored.push((
                    frame[1].as_str().unwrap().to_string(),
                    frame[4]["response"]["seq"].as_u64().unwrap(),
                ));
            }
        }
        expected.extend(sends.iter().map(|n| (format!("r{n}"), RELOADED + 1 + *n as u64)));
        assert_eq!(stored, expected[round * 12..], "stored and answered in the order sent");
    }
    let page = server.get("/api/sessions/s/messages?after_seq=1100&limit=100").await;
    let order: Vec<u64> = page.body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(order, (0..24).collect::<Vec<u64>>());
    server.data_dir = data_dir;
    server.stop().await;
}

/// Shutdown answers every send it stored before closing with 1012: a client never has to
/// guess whether a send it saw no reply for was kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_the_sends_in_flight_before_closing() {
    const SOCKETS: usize = 8;
    const SENDS: usize = 64;
    let server = TestServer::start(Store::Sqlite).await;
    let mut sockets = Vec::new();
    for n in 0..SOCKETS {
        server.agent_and_session("a", &format!("u{n}"), &format!("s{n}")).await;
        let mut ws = client(&server, &format!("user_id=u{n}&vsn=2.0.0")).await;
        ws.send(format!(r#"["1","j","session:s{n}","phx_join",{{}}]"#)).await;
        assert_eq!(ws.next().await[4]["status"], "ok");
        sockets.push(ws);
    }
    for (n, ws) in sockets.iter_mut().enumerate() {
        let sends = (0..SENDS)
            .map(|i| format!(r#"["1","r{i}","session:s{n}","send",{{"content":{{"content":{{"i":{i}}}}}}}]"#))
            .collect();
        ws.send_batch(sends).await;
    }
    let stopping = tokio::spawn(server.stop());
    let mut answered = Vec::new();
    for ws in &mut sockets {
        let mut count = 0u64;
        loop {
            match ws.next_message().await {
                tokio_tungstenite::tungstenite::Message::Text(text) => {
                    let frame: Value = serde_json::from_str(&text).unwrap();
                    if frame[3] == "phx_reply" {
                        assert_eq!(frame[4]["status"], "ok", "{frame}");
                        count += 1;
                    }
                }
                tokio_tungstenite::tungstenite::Message::Close(Some(close)) => {
                    assert_eq!(u16::from(close.code), 1012);
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        answered.push(count);
    }
    let (data_dir, _) = stopping.await.unwrap();
    let path = data_dir.path().to_path_buf();
    let server = TestServer::start_with(Store::Sqlite, |s| s.data_dir = Some(path)).await;
    for (n, answered) in answered.into_iter().enumerate() {
        let session = server.get(&format!("/api/sessions/s{n}")).await;
        let stored = session.body["session"]["last_seq"].as_u64().unwrap();
        assert_eq!(
            stored, answered,
            "session s{n}: every stored send was answered before the close"
        );
    }
    server.stop().await;
    drop(data_dir);
}

/// SIGTERM: every socket gets its 1012 close frame before the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_every_socket_with_1012() {
    let dir = tempfile::tempdir().unwrap();
    let mut process = support::ServerProcess::start(dir.path(), None, &[]);
    let mut sockets = Vec::new();
    for n in 0..200 {
        let query = format!("user_id=u{n}&vsn=2.0.0");
        match WsClient::connect(&process.base, &query).await {
            Ok(ws) => sockets.push(ws),
            Err(WsError::Refused(status)) => panic!("refused {status}"),
        }
    }
    // SAFETY: sending a signal to the child we started.
    unsafe { libc::kill(process.child.id() as i32, libc::SIGTERM) };
    for ws in &mut sockets {
        assert_eq!(ws.closed_with().await, 1012);
    }
    let status = process.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// A client may claim any u64 as its last seq: the join answers, and live messages follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_claiming_the_largest_last_seq_works() {
    let server = TestServer::start(Store::Sqlite).await;
    server.agent_and_session("a", "u", "s").await;
    append(&server, "s", json!({"user_id": "u", "content": {"n": 1}})).await;
    let mut ws = client(&server, "user_id=u&vsn=2.0.0").await;
    ws.send(format!(
        r#"["1","j","session:s","phx_join",{{"last_seq":{}}}]"#,
        u64::MAX
    ))
    .await;
    let reply = ws.next().await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    assert_eq!(reply[4]["response"]["messages"], json!([]));
    append(&server, "s", json!({"user_id": "u", "content": {"n": 2}})).await;
    let live = ws.next().await;
    assert_eq!(
        (live[3].as_str(), live[4]["seq"].as_u64()),
        (Some("message"), Some(2)),
        "{live}"
    );
    server.stop().await;
}
