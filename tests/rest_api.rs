//! Black-box tests of every REST route and error of rest.md, against a real server on
//! 127.0.0.1:0, once on the embedded SQLite archive and once on a real Postgres database.

#[macro_use]
mod support;

use serde_json::{Value, json};
use support::{Store, TestServer, restart};

on_both_stores!(
    agents_crud_and_validation,
    agents_http2_round_trips_survives_restarts_and_migrates,
    sessions_create_list_show_archive,
    append_validation_errors_in_order,
    idempotency_and_expected_seq,
    read_cursor_and_inbox,
    reads_merge_memory_wal_and_archive_across_restarts,
    history_pages_are_bounded_in_bytes_and_paging_reaches_the_end,
);

fn error_code(body: &Value) -> &str {
    body["code"].as_str().unwrap_or_default()
}

async fn agents_crud_and_validation(store: Store) {
    let server = TestServer::start(store).await;
    let created = server
        .post(
            "/api/agents",
            json!({"agent": {"id": "bot-1", "name": "Bot", "origin_url": "https://agent.example/x",
                "headers": {"Authorization": "Bearer s3cret"}, "debounce_window_ms": 0}}),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let agent = &created.body["agent"];
    assert_eq!(
        agent["headers"],
        json!({"authorization": "***"}),
        "header values are never echoed"
    );
    assert_eq!(agent["webhook_path"], "/webhook");
    assert_eq!(agent["debounce_window_ms"], 0);
    assert!(agent["inserted_at"].as_str().unwrap().ends_with('Z'));

    let duplicate = server
        .post(
            "/api/agents",
            json!({"agent": {"id": "bot-1", "name": "B", "origin_url": "http://x"}}),
        )
        .await;
    assert_eq!(duplicate.status, 422);
    assert_eq!(duplicate.body["errors"]["id"], json!(["has already been taken"]));

    let invalid = server
        .post(
            "/api/agents",
            json!({"agent": {"id": "bad id", "origin_url": "not a url", "message_history_mode": "all"}}),
        )
        .await;
    assert_eq!(invalid.status, 422);
    for field in ["id", "name", "origin_url", "message_history_mode"] {
        assert!(
            invalid.body["errors"][field].is_array(),
            "{field} reported: {}",
            invalid.body
        );
    }

    server
        .post(
            "/api/agents",
            json!({"agent": {"id": "alpha", "name": "Alpha", "origin_url": "http://a"}}),
        )
        .await;
    let list = server.get("/api/agents").await;
    let names: Vec<&str> = list.body["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["Alpha", "Bot"], "ordered by name");

    let updated = server
        .patch(
            "/api/agents/bot-1",
            json!({"agent": {"name": "Bot 2", "timeout_ms": 5000}}),
        )
        .await;
    assert_eq!(updated.status, 200, "{}", updated.body);
    assert_eq!(updated.body["agent"]["name"], "Bot 2");
    assert_eq!(
        updated.body["agent"]["origin_url"], "https://agent.example/x",
        "unchanged fields stay"
    );
    let renamed = server.put("/api/agents/bot-1", json!({"agent": {"id": "other"}})).await;
    assert_eq!(renamed.status, 422);
    assert_eq!(renamed.body["errors"]["id"], json!(["cannot be changed"]));
    assert_eq!(
        server
            .put("/api/agents/nope", json!({"agent": {"name": "x"}}))
            .await
            .status,
        404
    );

    let disabled = server.delete("/api/agents/bot-1").await;
    assert_eq!(disabled.status, 200);
    assert_eq!(disabled.body["message"], "Agent disabled");
    assert_eq!(disabled.body["agent"]["status"], "disabled");
    let only_enabled = server.get("/api/agents?status=enabled").await;
    assert_eq!(only_enabled.body["agents"].as_array().unwrap().len(), 1);
    assert_eq!(server.get("/api/agents?status=weird").await.status, 400);
    let missing = server.get("/api/agents/ghost").await;
    assert_eq!((missing.status, error_code(&missing.body)), (404, "agent_not_found"));
    assert_eq!(server.delete("/api/agents/ghost").await.status, 404);
    server.stop().await;
}

async fn agents_http2_round_trips_survives_restarts_and_migrates(store: Store) {
    let server = TestServer::start(store).await;
    let created = server
        .post(
            "/api/agents",
            json!({"agent": {"id": "fast", "name": "Fast", "origin_url": "http://a", "http2": true}}),
        )
        .await;
    assert_eq!((created.status, &created.body["agent"]["http2"]), (201, &json!(true)));
    let plain = server
        .post(
            "/api/agents",
            json!({"agent": {"id": "plain", "name": "Plain", "origin_url": "http://b"}}),
        )
        .await;
    assert_eq!(plain.body["agent"]["http2"], false, "off by default");
    for bad in [json!("yes"), json!(1), json!({})] {
        let invalid = server
            .post(
                "/api/agents",
                json!({"agent": {"id": "x", "name": "X", "origin_url": "http://x", "http2": bad}}),
            )
            .await;
        assert_eq!(invalid.status, 422, "{}", invalid.body);
        assert_eq!(error_code(&invalid.body), "validation_failed");
        assert_eq!(invalid.body["errors"], json!({"http2": ["must be a boolean"]}));
        let update = server.patch("/api/agents/fast", json!({"agent": {"http2": bad}})).await;
        assert_eq!(update.status, 422);
        assert_eq!(update.body["errors"]["http2"], json!(["must be a boolean"]));
    }
    let renamed = server
        .patch("/api/agents/fast", json!({"agent": {"name": "Fast 2"}}))
        .await;
    assert_eq!(renamed.body["agent"]["http2"], true, "kept when not given");
    let turned_on = server.put("/api/agents/plain", json!({"agent": {"http2": true}})).await;
    assert_eq!(turned_on.body["agent"]["http2"], true);
    let turned_off = server
        .put("/api/agents/plain", json!({"agent": {"http2": false}}))
        .await;
    assert_eq!(turned_off.body["agent"]["http2"], false);

    let (data_dir, database) = server.stop().await;
    let server = restart(store, data_dir, database).await;
    let http2_of = |body: &Value| -> Vec<(String, Value)> {
        body["agents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| (a["id"].as_str().unwrap().to_string(), a["http2"].clone()))
            .collect()
    };
    let listed = server.get("/api/agents").await;
    assert_eq!(
        http2_of(&listed.body),
        vec![("fast".to_string(), json!(true)), ("plain".to_string(), json!(false))]
    );
    assert_eq!(server.get("/api/agents/fast").await.body["agent"]["http2"], true);

    // A database from before the column: the next start adds it (off) and keeps the agents.
    let (data_dir, database) = server.stop().await;
    match &database {
        Some(database) => {
            let (client, connection) = tokio_postgres::connect(&database.url, tokio_postgres::NoTls)
                .await
                .unwrap();
            let connection = tokio::spawn(connection);
            client
                .batch_execute("ALTER TABLE agents DROP COLUMN http2")
                .await
                .unwrap();
            drop(client);
            connection.await.unwrap().unwrap();
        }
        None => {
            let sqlite = rusqlite::Connection::open(data_dir.path().join("archive.sqlite3")).unwrap();
            sqlite.execute_batch("ALTER TABLE agents DROP COLUMN http2").unwrap();
        }
    }
    let server = restart(store, data_dir, database).await;
    let listed = server.get("/api/agents").await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert_eq!(
        http2_of(&listed.body),
        vec![("fast".to_string(), json!(false)), ("plain".to_string(), json!(false))]
    );
    let on_again = server
        .patch("/api/agents/fast", json!({"agent": {"http2": true}}))
        .await;
    assert_eq!((on_again.status, &on_again.body["agent"]["http2"]), (200, &json!(true)));
    let (data_dir, database) = server.stop().await;
    let server = restart(store, data_dir, database).await;
    assert_eq!(server.get("/api/agents/fast").await.body["agent"]["http2"], true);
    server.stop().await;
}

async fn sessions_create_list_show_archive(store: Store) {
    let server = TestServer::start(store).await;
    server
        .post(
            "/api/agents",
            json!({"agent": {"id": "a", "name": "A", "origin_url": "http://a"}}),
        )
        .await;

    let missing = server.post("/api/sessions", json!({"user_id": "u"})).await;
    assert_eq!(missing.status, 422);
    assert_eq!(missing.body["error"], "user_id and agent_id are required");
    let unknown_agent = server
        .post("/api/sessions", json!({"user_id": "u", "agent_id": "zzz"}))
        .await;
    assert_eq!(
        (unknown_agent.status, error_code(&unknown_agent.body)),
        (422, "agent_not_found")
    );

    let mut ids = Vec::new();
    for n in 0..5 {
        let created = server
            .post(
                "/api/sessions",
                json!({"session": {"user_id": "u", "agent_id": "a", "metadata": {"n": n}}}),
            )
            .await;
        assert_eq!(created.status, 201, "{}", created.body);
        let session = &created.body["session"];
        assert_eq!(
            session["id"].as_str().unwrap().len(),
            22,
            "generated ids are 22-char base64"
        );
        assert_eq!(session["last_seq"], 0);
        assert_eq!(session["status"], "active");
        ids.push(session["id"].as_str().unwrap().to_string());
    }
    let chosen = server
        .post(
            "/api/sessions",
            json!({"user_id": "v", "agent_id": "a", "id": "chosen-1"}),
        )
        .await;
    assert_eq!(chosen.status, 201);
    let again = server
        .post(
            "/api/sessions",
            json!({"user_id": "v", "agent_id": "a", "id": "chosen-1"}),
        )
        .await;
    assert_eq!((again.status, error_code(&again.body)), (409, "session_exists"));
    let bad_id = server
        .post(
            "/api/sessions",
            json!({"user_id": "v", "agent_id": "a", "id": "no spaces"}),
        )
        .await;
    assert_eq!(bad_id.status, 422);

    // Newest first, paged with next_cursor, immediately visible.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/sessions?user_id=u&limit=2&cursor={c}"),
            None => "/api/sessions?user_id=u&limit=2".to_string(),
        };
        let page = server.get(&path).await;
        assert_eq!(page.status, 200, "{}", page.body);
        for session in page.body["sessions"].as_array().unwrap() {
            seen.push(session["id"].as_str().unwrap().to_string());
        }
        match page.body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);
    assert_eq!(server.get("/api/sessions?limit=abc").await.status, 400);
    assert_eq!(server.get("/api/sessions?cursor=%%%").await.status, 400);

    let shown = server.get(&format!("/api/sessions/{}", ids[0])).await;
    assert_eq!(shown.body["session"]["metadata"], json!({"n": 0}));
    let not_found = server.get("/api/sessions/nope").await;
    assert_eq!(
        (not_found.status, error_code(&not_found.body)),
        (404, "session_not_found")
    );

    assert_eq!(server.delete(&format!("/api/sessions/{}", ids[0])).await.status, 204);
    let archived = server.get(&format!("/api/sessions/{}", ids[0])).await;
    assert_eq!(archived.body["session"]["status"], "archived");
    let refused = server
        .post(
            &format!("/api/sessions/{}/messages", ids[0]),
            json!({"user_id": "u", "content": {}}),
        )
        .await;
    assert_eq!((refused.status, error_code(&refused.body)), (409, "session_archived"));
    let history = server.get(&format!("/api/sessions/{}/messages", ids[0])).await;
    assert_eq!(history.status, 200, "reads still work after archiving");
    let archived_only = server.get("/api/sessions?status=archived").await;
    assert_eq!(archived_only.body["sessions"].as_array().unwrap().len(), 1);
    assert_eq!(server.delete("/api/sessions/nope").await.status, 404);
    server.stop().await;
}

async fn append_validation_errors_in_order(store: Store) {
    let server = TestServer::start(store).await;
    server.agent_and_session("a", "u", "s").await;
    let cases = [
        (
            json!({"user_id": "u", "agent_id": "a", "content": {}}),
            422,
            "Provide either user_id or agent_id when sending a message, not both",
        ),
        (
            json!({"sender_id": "u", "content": {}}),
            422,
            "sender_id is deprecated; use user_id or agent_id to identify the sender",
        ),
        (json!({"content": {}}), 422, "user_id or agent_id is required"),
        (
            json!({"user_id": "u", "kind": "", "content": {}}),
            422,
            "kind must be a non-empty string",
        ),
        (
            json!({"user_id": "u", "kind": 5, "content": {}}),
            422,
            "kind must be a non-empty string",
        ),
        (json!({"user_id": "u"}), 422, "content is required"),
        (json!({"user_id": "u", "content": "hi"}), 422, "content must be a map"),
        (
            json!({"user_id": "u", "content": {}, "metadata": [1]}),
            422,
            "metadata must be a map",
        ),
        (
            json!({"user_id": "u", "content": {}, "expected_seq": -1}),
            422,
            "expected_seq must be a non-negative integer",
        ),
    ];
    for (body, status, sentence) in cases {
        let reply = server.post("/api/sessions/s/messages", body.clone()).await;
        assert_eq!(reply.status, status, "{body}: {}", reply.body);
        assert_eq!(reply.body["error"], sentence, "{body}");
        assert_eq!(error_code(&reply.body), "invalid_message_format");
    }
    let stranger = server
        .post("/api/sessions/s/messages", json!({"user_id": "mallory", "content": {}}))
        .await;
    assert_eq!(
        (stranger.status, error_code(&stranger.body)),
        (403, "not_a_participant")
    );
    let unknown = server
        .post("/api/sessions/nope/messages", json!({"user_id": "u", "content": {}}))
        .await;
    assert_eq!((unknown.status, error_code(&unknown.body)), (404, "session_not_found"));
    let huge = server
        .post(
            "/api/sessions/s/messages",
            json!({"user_id": "u", "content": {"t": "x".repeat(70_000)}}),
        )
        .await;
    assert_eq!((huge.status, error_code(&huge.body)), (413, "message_too_large"));
    let deep = (0..40).fold(json!(1), |inner, _| json!({"d": inner}));
    let too_deep = server
        .post(
            "/api/sessions/s/messages",
            json!({"user_id": "u", "content": {}, "metadata": deep}),
        )
        .await;
    assert_eq!(too_deep.status, 422);

    // None of the refusals wrote anything.
    let history = server.get("/api/sessions/s/messages").await;
    assert_eq!(history.body["messages"], json!([]));
    let ok = server
        .post(
            "/api/sessions/s/messages",
            json!({"agent_id": "a", "kind": "assistant", "content": {"text": "hi"}}),
        )
        .await;
    assert_eq!(ok.status, 200);
    let message = &ok.body["message"];
    assert_eq!(
        (message["seq"].as_u64(), message["sender_id"].as_str()),
        (Some(1), Some("a"))
    );
    assert_eq!(message["metadata"], json!({}));

    for (path, code) in [
        ("/api/sessions/s/messages?after_seq=-1", 400),
        ("/api/sessions/s/messages?limit=x", 400),
        ("/api/sessions/s/messages?before_seq=0", 400),
        ("/api/sessions/s/messages?before_seq=-3", 400),
        ("/api/sessions/s/messages?before_seq=2&after_seq=1", 400),
        ("/api/sessions/nope/messages?before_seq=5", 404),
        ("/api/sessions/nope/messages", 404),
    ] {
        assert_eq!(server.get(path).await.status, code, "{path}");
    }
    server.stop().await;
}

async fn idempotency_and_expected_seq(store: Store) {
    let server = TestServer::start(store).await;
    server.agent_and_session("a", "u", "s").await;
    let first = server
        .post(
            "/api/sessions/s/messages",
            json!({"user_id": "u", "content": {"a": 1, "b": 2}, "client_id": "k1"}),
        )
        .await;
    assert_eq!(first.status, 200);
    assert!(first.body.get("deduplicated").is_none());
    // Same body with keys in another order: the same message, deduplicated.
    let retry = server
        .post(
            "/api/sessions/s/messages",
            json!({"content": {"b": 2, "a": 1}, "client_id": "k1", "user_id": "u"}),
        )
        .await;
    assert_eq!(retry.status, 200);
    assert_eq!(retry.body["deduplicated"], true);
    assert_eq!(retry.body["message"], first.body["message"]);
    let conflict = server
        .post(
            "/api/sessions/s/messages",
            json!({"user_id": "u", "content": {"a": 2}, "client_id": "k1"}),
        )
        .await;
    assert_eq!(
        (conflict.status, error_code(&conflict.body)),
        (409, "client_id_conflict")
    );

    let wrong_seq = server
        .post(
            "/api/sessions/s/messages",
            json!({"user_id": "u", "content": {}, "expected_seq": 0}),
        )
        .await;
    assert_eq!((wrong_seq.status, error_code(&wrong_seq.body)), (409, "seq_conflict"));
    assert_eq!(wrong_seq.body["last_seq"], 1);
    let right_seq = server
        .post(
            "/api/sessions/s/messages",
            json!({"user_id": "u", "content": {}, "expected_seq": 1}),
        )
        .await;
    assert_eq!(right_seq.body["message"]["seq"], 2);

    // After a restart (state rebuilt from the WAL or the archive) a retry is still recognised.
    let (data_dir, database) = server.stop().await;
    let server = restart(store, data_dir, database).await;
    let retry = server
        .post(
            "/api/sessions/s/messages",
            json!({"user_id": "u", "content": {"a": 1, "b": 2}, "client_id": "k1"}),
        )
        .await;
    assert_eq!(retry.body["deduplicated"], true, "{}", retry.body);
    assert_eq!(retry.body["message"]["seq"], 1);
    server.stop().await;
}

async fn read_cursor_and_inbox(store: Store) {
    let server = TestServer::start(store).await;
    server.agent_and_session("a", "u", "s1").await;
    server
        .post("/api/sessions", json!({"user_id": "u", "agent_id": "a", "id": "s2"}))
        .await;
    server
        .post(
            "/api/sessions/s1/messages",
            json!({"user_id": "u", "content": {"text": "question"}}),
        )
        .await;
    for n in 0..3 {
        server
            .post(
                "/api/sessions/s1/messages",
                json!({"agent_id": "a", "content": {"text": format!("answer {n}")}}),
            )
            .await;
    }
    let inbox = server.get("/api/users/u/inbox").await;
    assert_eq!(inbox.status, 200);
    let entries = inbox.body["inbox"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "a new session appears in the inbox");
    assert_eq!(entries[0]["session_id"], "s1", "newest activity first");
    assert_eq!(entries[0]["unread_count"], 3, "the user's own message is not unread");
    assert_eq!(entries[0]["last_seq"], 4);
    assert_eq!(entries[0]["last_sender_id"], "a");
    assert_eq!(entries[0]["last_message_preview"], "answer 2");

    let read = server
        .post("/api/sessions/s1/read", json!({"user_id": "u", "last_seq": 2}))
        .await;
    assert_eq!(read.status, 200, "{}", read.body);
    assert_eq!(read.body["read_seq"], 2);
    let backwards = server
        .post("/api/sessions/s1/read", json!({"user_id": "u", "last_seq": 1}))
        .await;
    assert_eq!(backwards.body["read_seq"], 2, "the cursor never moves back");
    let beyond = server
        .post("/api/sessions/s1/read", json!({"user_id": "u", "last_seq": 99}))
        .await;
    assert_eq!(beyond.body["read_seq"], 4, "capped at last seq");
    let inbox = server.get("/api/users/u/inbox").await;
    assert_eq!(inbox.body["inbox"][0]["unread_count"], 0);

    assert_eq!(
        server
            .post("/api/sessions/s1/read", json!({"user_id": "x", "last_seq": 1}))
            .await
            .status,
        403
    );
    assert_eq!(
        server
            .post("/api/sessions/none/read", json!({"user_id": "u", "last_seq": 1}))
            .await
            .status,
        404
    );
    assert_eq!(
        server
            .post("/api/sessions/s1/read", json!({"user_id": "u", "last_seq": "a"}))
            .await
            .status,
        422
    );
    server.stop().await;
}

/// 300 messages: after the flusher has archived them and after restarts, every page of every
/// `after_seq` is gap-free and identical to what the appends returned.
async fn reads_merge_memory_wal_and_archive_across_restarts(store: Store) {
    let server = TestServer::start(store).await;
    server.agent_and_session("a", "u", "s").await;
    let mut appended = Vec::new();
    for n in 0..300 {
        let reply = server
            .post("/api/sessions/s/messages", json!({"user_id": "u", "content": {"n": n}}))
            .await;
        assert_eq!(reply.status, 200);
        appended.push(reply.body["message"].clone());
    }
    check_history(&server, &appended).await;
    let (data_dir, database) = server.stop().await;
    let server = restart(store, data_dir, database).await;
    check_history(&server, &appended).await;
    let next = server
        .post("/api/sessions/s/messages", json!({"user_id": "u", "content": {}}))
        .await;
    assert_eq!(next.body["message"]["seq"], 301, "appends continue at last seq + 1");
    server.stop().await;
}

async fn check_history(server: &TestServer, appended: &[Value]) {
    check_backward_pages(server, appended).await;
    for (after, limit) in [(0u64, 1000usize), (0, 7), (150, 50), (299, 10), (300, 5), (10, 200)] {
        let page = server
            .get(&format!("/api/sessions/s/messages?after_seq={after}&limit={limit}"))
            .await;
        assert_eq!(page.status, 200, "{}", page.body);
        let got = page.body["messages"].as_array().unwrap();
        let want: Vec<&Value> = appended.iter().skip(after as usize).take(limit).collect();
        assert_eq!(got.len(), want.len(), "after {after} limit {limit}");
        for (got, want) in got.iter().zip(want) {
            assert_eq!(got, want);
        }
        assert_eq!(page.body["has_more"], (after as usize + limit) < appended.len());
    }
}

/// Paging back from the newest message (`before_seq` past the last seq) with several page
/// sizes: every message exactly once, each page ascending and the newest below its bound.
async fn check_backward_pages(server: &TestServer, appended: &[Value]) {
    for limit in [1000usize, 7, 50] {
        let mut before = u64::MAX;
        let mut pages: Vec<Vec<Value>> = Vec::new();
        loop {
            let page = server
                .get(&format!("/api/sessions/s/messages?before_seq={before}&limit={limit}"))
                .await;
            assert_eq!(page.status, 200, "{}", page.body);
            let messages = page.body["messages"].as_array().unwrap().clone();
            assert!(messages.len() <= limit);
            if let Some(first) = messages.first() {
                assert!(first["seq"].as_u64().unwrap() < before);
            }
            pages.push(messages);
            match page.body["next_before_seq"].as_u64() {
                Some(next) => {
                    assert_eq!(page.body["has_more"], true);
                    before = next;
                }
                None => {
                    assert_eq!(page.body["has_more"], false);
                    break;
                }
            }
            assert!(pages.len() <= appended.len(), "paging back ends");
        }
        assert_eq!(
            pages[0].len(),
            limit.min(appended.len()),
            "the first page is the newest {limit}"
        );
        let all: Vec<Value> = pages.into_iter().rev().flatten().collect();
        assert_eq!(all.as_slice(), appended, "limit {limit}: every message once, in order");
    }
}

/// A page stops at its byte bound (4 MiB, docs/API.md) whatever `limit` says, says `has_more`,
/// and paging by the last seq reaches the end with every message once: right after the writes
/// (WAL and memory) and again once the flusher has archived them (archive and memory).
async fn history_pages_are_bounded_in_bytes_and_paging_reaches_the_end(store: Store) {
    const PAGE_BYTES: usize = 4 * 1024 * 1024;
    const MESSAGES: u64 = 150;
    let server = TestServer::start(store).await;
    server.agent_and_session("a", "u", "big").await;
    let text = "x".repeat(60 * 1024);
    for n in 1..=MESSAGES {
        let reply = server
            .post(
                "/api/sessions/big/messages",
                json!({"user_id": "u", "content": {"text": text, "n": n}}),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    for pass in ["fresh", "archived"] {
        if pass == "archived" {
            // The test flusher runs every 50 ms.
            tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        }
        let (mut after, mut seen, mut pages) = (0u64, Vec::new(), 0);
        loop {
            let page = server
                .get(&format!("/api/sessions/big/messages?after_seq={after}&limit=1000"))
                .await;
            assert_eq!(page.status, 200, "{}", page.body);
            let messages = page.body["messages"].as_array().unwrap();
            assert!(!messages.is_empty(), "{pass}: a page after seq {after} is empty");
            let bytes: usize = messages.iter().map(|m| m.to_string().len()).sum();
            // The message that crosses the bound is in the page, no more.
            assert!(
                bytes <= PAGE_BYTES + 64 * 1024,
                "{pass}: a page of {} messages weighs {bytes} bytes",
                messages.len()
            );
            seen.extend(messages.iter().map(|m| m["seq"].as_u64().unwrap()));
            assert_eq!(messages[0]["content"]["n"], json!(after + 1));
            after = *seen.last().unwrap();
            pages += 1;
            if page.body["has_more"] != json!(true) {
                break;
            }
            assert!(
                (messages.len() as u64) < MESSAGES,
                "{pass}: has_more on a page that holds everything"
            );
        }
        assert_eq!(
            seen,
            (1..=MESSAGES).collect::<Vec<_>>(),
            "{pass}: every message once, in order"
        );
        assert!(
            pages >= 3,
            "{pass}: ~9 MiB of history in {pages} page(s) of at most 4 MiB"
        );
        // Backwards: a page is the newest part of its window that fits the bound, so paging
        // on below each page's first seq leaves no hole.
        let (mut before, mut seen_back, mut pages_back) = (u64::MAX, Vec::new(), 0);
        loop {
            let page = server
                .get(&format!("/api/sessions/big/messages?before_seq={before}&limit=1000"))
                .await;
            assert_eq!(page.status, 200, "{}", page.body);
            let messages = page.body["messages"].as_array().unwrap();
            let bytes: usize = messages.iter().map(|m| m.to_string().len()).sum();
            assert!(
                bytes <= PAGE_BYTES + 64 * 1024,
                "{pass}: a page back weighs {bytes} bytes"
            );
            let seqs: Vec<u64> = messages.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
            if pages_back == 0 {
                assert_eq!(
                    seqs.last(),
                    Some(&MESSAGES),
                    "{pass}: the first page back ends at the newest"
                );
            }
            seen_back.splice(0..0, seqs);
            pages_back += 1;
            match page.body["next_before_seq"].as_u64() {
                Some(next) => before = next,
                None => break,
            }
            assert!(pages_back <= MESSAGES, "{pass}: paging back ends");
        }
        assert_eq!(
            seen_back,
            (1..=MESSAGES).collect::<Vec<_>>(),
            "{pass}: paging back sees every message once"
        );
        assert!(pages_back >= 3, "{pass}: {pages_back} page(s) back");
    }
    server.stop().await;
}
