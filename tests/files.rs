//! Session files (attachments) against a real server: uploads stored in the archive (SQLite and
//! Postgres) and served back byte for byte, the limits and validation, authorization in token
//! mode, and agents fetching a message's file through the signed URL their dispatch carries.

#[macro_use]
mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::agent::{Behavior, TestAgent};
use support::{Store, TestServer, restart};

on_both_stores!(
    a_file_round_trips_byte_for_byte_and_survives_a_restart,
    a_file_is_served_in_ranges_and_not_sent_again_to_a_client_that_holds_it,
);

const SECRET: &str = "files-test-secret-0123456789";

async fn upload(
    server: &TestServer,
    session: &str,
    bytes: Vec<u8>,
    content_type: Option<&str>,
    query: &str,
    bearer: Option<&str>,
) -> (u16, Value) {
    let mut request = server
        .client
        .post(server.url(&format!("/api/sessions/{session}/files{query}")))
        .body(bytes);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    if let Some(bearer) = bearer {
        request = request.bearer_auth(bearer);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Bytes that are not UTF-8 and not all alike (every byte value, then a pattern).
fn sample(len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 7919) % 256) as u8).collect()
}

async fn a_file_round_trips_byte_for_byte_and_survives_a_restart(store: Store) {
    let server = TestServer::start(store).await;
    server.agent_and_session("a", "u", "s1").await;
    let bytes = sample(3 * 1024 * 1024 + 17);
    let (status, body) = upload(
        &server,
        "s1",
        bytes.clone(),
        Some("image/png"),
        "?filename=photo%201.png",
        None,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let file = &body["file"];
    let id = file["id"].as_str().unwrap();
    assert_eq!(file["session_id"], "s1");
    assert_eq!(file["media_type"], "image/png");
    assert_eq!(file["filename"], "photo 1.png");
    assert_eq!(file["size"], bytes.len());
    assert_eq!(file["url"], format!("/api/sessions/s1/files/{id}"));
    assert_eq!(file["sha256"].as_str().unwrap().len(), 64);
    let url = server.url(file["url"].as_str().unwrap());

    let fetch = |url: String| {
        let client = server.client.clone();
        async move { client.get(url).send().await.unwrap() }
    };
    let response = fetch(url.clone()).await;
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "image/png");
    assert_eq!(headers["content-disposition"], "inline; filename*=UTF-8''photo%201.png");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert!(
        headers["content-security-policy"]
            .to_str()
            .unwrap()
            .starts_with("sandbox")
    );
    assert_eq!(response.bytes().await.unwrap().as_ref(), &bytes[..]);

    // Anything a browser could run is served as a download.
    let (status, body) = upload(
        &server,
        "s1",
        b"<script>alert(1)</script>".to_vec(),
        Some("text/html"),
        "",
        None,
    )
    .await;
    assert_eq!(status, 201);
    let html = fetch(server.url(body["file"]["url"].as_str().unwrap())).await;
    assert_eq!(html.headers()["content-disposition"], "attachment");

    // Not another session's file, not an unknown one.
    server
        .post("/api/sessions", json!({"id": "s2", "user_id": "u", "agent_id": "a"}))
        .await;
    let elsewhere = fetch(server.url(&format!("/api/sessions/s2/files/{id}"))).await;
    assert_eq!(elsewhere.status(), 404);
    let body: Value = elsewhere.json().await.unwrap();
    assert_eq!(body["code"], "file_not_found");
    assert_eq!(fetch(server.url("/api/sessions/s1/files/nope")).await.status(), 404);

    // Durable: the archive holds it across a restart.
    let (data_dir, database) = server.stop().await;
    let server = restart(store, data_dir, database).await;
    let again = server
        .client
        .get(server.url(&format!("/api/sessions/s1/files/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(again.bytes().await.unwrap().as_ref(), &bytes[..]);
    server.stop().await;
}

/// Downloads are read from the archive in 1 MiB slices: a range across a slice boundary, the
/// last bytes, a range past the end; a client holding the file (its tag) gets `304` and no
/// bytes; a range of a file the client's tag no longer names gets the whole file.
async fn a_file_is_served_in_ranges_and_not_sent_again_to_a_client_that_holds_it(store: Store) {
    let server = TestServer::start(store).await;
    server.agent_and_session("a", "u", "s1").await;
    let bytes = sample(2 * 1024 * 1024 + 100);
    let size = bytes.len();
    let (status, body) = upload(&server, "s1", bytes.clone(), Some("application/pdf"), "", None).await;
    assert_eq!(status, 201, "{body}");
    let url = server.url(body["file"]["url"].as_str().unwrap());
    let etag = format!("\"{}\"", body["file"]["sha256"].as_str().unwrap());
    let get = |headers: Vec<(&'static str, String)>| {
        let mut request = server.client.get(url.clone());
        for (name, value) in headers {
            request = request.header(name, value);
        }
        async move { request.send().await.unwrap() }
    };

    let whole = get(vec![]).await;
    assert_eq!(whole.status(), 200);
    assert_eq!(whole.headers()["etag"].to_str().unwrap(), etag);
    assert_eq!(whole.headers()["accept-ranges"], "bytes");
    assert_eq!(whole.headers()["content-length"].to_str().unwrap(), size.to_string());
    assert_eq!(whole.bytes().await.unwrap().as_ref(), &bytes[..]);

    let held = get(vec![("if-none-match", etag.clone())]).await;
    assert_eq!(held.status(), 304);
    assert_eq!(held.headers()["etag"].to_str().unwrap(), etag);
    assert!(held.bytes().await.unwrap().is_empty());
    let other = get(vec![("if-none-match", "\"something-else\"".to_string())]).await;
    assert_eq!(other.status(), 200);
    assert_eq!(other.bytes().await.unwrap().len(), size);

    // Across the first slice's end.
    let (from, to) = (1024 * 1024 - 1000, 1024 * 1024 + 999);
    let part = get(vec![("range", format!("bytes={from}-{to}"))]).await;
    assert_eq!(part.status(), 206);
    assert_eq!(
        part.headers()["content-range"].to_str().unwrap(),
        format!("bytes {from}-{to}/{size}")
    );
    assert_eq!(part.headers()["content-length"], "2000");
    assert_eq!(part.bytes().await.unwrap().as_ref(), &bytes[from..=to]);

    let tail = get(vec![("range", "bytes=-10".to_string()), ("if-range", etag.clone())]).await;
    assert_eq!(tail.status(), 206);
    assert_eq!(tail.bytes().await.unwrap().as_ref(), &bytes[size - 10..]);

    let from_the_middle = get(vec![("range", format!("bytes={}-", size / 2))]).await;
    assert_eq!(from_the_middle.status(), 206);
    assert_eq!(from_the_middle.bytes().await.unwrap().as_ref(), &bytes[size / 2..]);

    let past_the_end = get(vec![("range", format!("bytes={size}-"))]).await;
    assert_eq!(past_the_end.status(), 416);
    assert_eq!(
        past_the_end.headers()["content-range"].to_str().unwrap(),
        format!("bytes */{size}")
    );
    let body: Value = past_the_end.json().await.unwrap();
    assert_eq!(body["code"], "range_not_satisfiable");

    let changed = get(vec![
        ("range", "bytes=0-9".to_string()),
        ("if-range", "\"an-older-file\"".to_string()),
    ])
    .await;
    assert_eq!(changed.status(), 200);
    assert_eq!(changed.bytes().await.unwrap().as_ref(), &bytes[..]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_validated_and_limited_with_clear_errors() {
    let server = TestServer::start_with(Store::Sqlite, |s| {
        s.max_file_bytes = Some(fleetlm::config::ByteSize(1024));
        s.max_session_file_bytes = Some(fleetlm::config::ByteSize(2048));
    })
    .await;
    server.agent_and_session("a", "u", "s1").await;
    server.agent_and_session("a", "u", "full").await;
    // A session's files have a quota in all (2 KiB here): the upload that would pass it is
    // refused and stores nothing; another session is not affected.
    for _ in 0..2 {
        let (status, body) = upload(&server, "full", sample(1000), Some("image/png"), "", None).await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, body) = upload(&server, "full", sample(100), Some("image/png"), "", None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (413, Some("session_file_quota")),
        "{body}"
    );
    assert!(body["error"].as_str().unwrap().contains("2000 bytes used"), "{body}");
    let (status, _) = upload(&server, "full", sample(48), Some("image/png"), "", None).await;
    assert_eq!(status, 201, "exactly at the quota is fine");
    let (status, body) = upload(&server, "full", sample(1), Some("image/png"), "", None).await;
    assert_eq!((status, body["code"].as_str()), (413, Some("session_file_quota")));
    let refused = [
        (sample(1025), Some("image/png"), "", 413, "file_too_large"),
        (Vec::new(), Some("image/png"), "", 422, "invalid_file"),
        (sample(10), Some("not a type"), "", 422, "invalid_file"),
        (sample(10), Some("image/png"), "?filename=a%2Fb", 422, "invalid_file"),
        (sample(10), Some("image/png"), "?filename=a%0Ab", 422, "invalid_file"),
    ];
    for (bytes, content_type, query, status, code) in refused {
        let (got, body) = upload(&server, "s1", bytes, content_type, query, None).await;
        assert_eq!((got, body["code"].as_str()), (status, Some(code)), "{query}: {body}");
    }
    // A refusal before the body was read closes the connection: a client reusing it for its
    // next request would otherwise have that request fail.
    let refused = server
        .client
        .post(server.url("/api/sessions/s1/files"))
        .body(sample(4096))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 413);
    assert_eq!(refused.headers()["connection"], "close");
    let (status, body) = upload(&server, "missing", sample(10), Some("image/png"), "", None).await;
    assert_eq!((status, body["code"].as_str()), (404, Some("session_not_found")));
    // Without a content type it is stored as bytes; exactly at the limit is fine.
    let (status, body) = upload(&server, "s1", sample(1024), None, "", None).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["file"]["media_type"], "application/octet-stream");
    // An archived session takes no files.
    assert_eq!(server.delete("/api/sessions/s1").await.status, 204);
    let (status, body) = upload(&server, "s1", sample(10), Some("image/png"), "", None).await;
    assert_eq!((status, body["code"].as_str()), (409, Some("session_archived")));
    // A half-valid signed URL is a clear 400, a wrong one 403.
    let file_url = server.url(body_url(&server).await.as_str());
    for (query, status) in [
        ("?expires=1", 400),
        ("?signature=x", 400),
        ("?expires=9999999999&signature=AAAA", 403),
    ] {
        let response = server.client.get(format!("{file_url}{query}")).send().await.unwrap();
        assert_eq!(response.status(), status, "{query}");
    }
    server.stop().await;
}

/// A file of a fresh session, for checks that need one.
async fn body_url(server: &TestServer) -> String {
    server
        .post("/api/sessions", json!({"id": "s3", "user_id": "u", "agent_id": "a"}))
        .await;
    let (status, body) = upload(server, "s3", sample(10), Some("image/png"), "", None).await;
    assert_eq!(status, 201);
    body["file"]["url"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_token_mode_only_the_sessions_participants_upload_and_read_its_files() {
    let server = TestServer::start_with(Store::Sqlite, |s| {
        s.auth_secret = Some(SECRET.into());
        s.api_key = Some("k3y".into());
    })
    .await;
    let token = |sub: &str| {
        let rules = fleetlm::auth::TokenRules::new(SECRET.as_bytes(), None, None);
        rules.mint(sub, i64::MAX / 2)
    };
    let (alice, mallory) = (token("alice"), token("mallory"));
    let created = server
        .client
        .post(server.url("/api/agents"))
        .bearer_auth("k3y")
        .json(&json!({"agent": {"id": "a", "name": "a", "origin_url": "http://127.0.0.1:9"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let session = server
        .client
        .post(server.url("/api/sessions"))
        .bearer_auth(&alice)
        .json(&json!({"id": "s1", "user_id": "alice", "agent_id": "a"}))
        .send()
        .await
        .unwrap();
    assert_eq!(session.status(), 201);
    let (status, _) = upload(&server, "s1", sample(10), Some("image/png"), "", None).await;
    assert_eq!(status, 401, "no credentials");
    let (status, body) = upload(&server, "s1", sample(10), Some("image/png"), "", Some(&mallory)).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")), "{body}");
    let (status, body) = upload(&server, "s1", sample(10), Some("image/png"), "", Some(&alice)).await;
    assert_eq!(status, 201, "{body}");
    let url = server.url(body["file"]["url"].as_str().unwrap());
    let get = |bearer: Option<String>| {
        let mut request = server.client.get(url.clone());
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        request.send()
    };
    assert_eq!(get(None).await.unwrap().status(), 401);
    assert_eq!(get(Some(mallory.clone())).await.unwrap().status(), 403);
    assert_eq!(get(Some(alice.clone())).await.unwrap().status(), 200);
    assert_eq!(
        get(Some("k3y".into())).await.unwrap().status(),
        200,
        "the API key reads any"
    );
    server.stop().await;
}

/// The agent gets the user's file part as an absolute signed URL it can fetch without any
/// credentials; the signature covers that file only, and the agent's reply is stored as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_fetches_a_messages_file_through_the_signed_url_of_its_dispatch() {
    let server = TestServer::start_with(Store::Sqlite, |s| {
        s.auth_secret = Some(SECRET.into());
        s.api_key = Some("k3y".into());
    })
    .await;
    let agent = TestAgent::start(Behavior::EchoJsonl).await;
    let admin = |method: reqwest::Method, path: &str, body: Value| {
        server
            .client
            .request(method, server.url(path))
            .bearer_auth("k3y")
            .json(&body)
            .send()
    };
    let created = admin(
        reqwest::Method::POST,
        "/api/agents",
        json!({"agent": {"id": "a", "name": "a", "origin_url": agent.url, "debounce_window_ms": 0}}),
    )
    .await
    .unwrap();
    assert_eq!(created.status(), 201);
    for session in ["s1", "s2"] {
        let reply = admin(
            reqwest::Method::POST,
            "/api/sessions",
            json!({"id": session, "user_id": "u", "agent_id": "a"}),
        )
        .await
        .unwrap();
        assert_eq!(reply.status(), 201);
    }
    let bytes = sample(40_000);
    let (status, body) = upload(&server, "s1", bytes.clone(), Some("image/png"), "", Some("k3y")).await;
    assert_eq!(status, 201);
    let path = body["file"]["url"].as_str().unwrap().to_string();
    let (_, other) = upload(&server, "s2", sample(5), Some("image/png"), "", Some("k3y")).await;
    let other_path = other["file"]["url"].as_str().unwrap().to_string();
    let sent = admin(
        reqwest::Method::POST,
        "/api/sessions/s1/messages",
        json!({"user_id": "u", "content": {"text": "look", "parts": [
            {"type": "text", "text": "look"},
            {"type": "file", "mediaType": "image/png", "url": path},
            {"type": "file", "mediaType": "image/png", "url": other_path},
        ]}}),
    )
    .await
    .unwrap();
    assert_eq!(sent.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.calls().is_empty() {
        assert!(Instant::now() < deadline, "the agent was not called");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let call = agent.calls()[0].body.clone();
    let parts = &call["messages"][0]["content"]["parts"];
    let signed = parts[1]["url"].as_str().unwrap();
    assert!(
        signed.starts_with(&format!("{}{path}?expires=", server.base)),
        "an absolute signed URL on the server: {signed}"
    );
    assert_eq!(
        parts[2]["url"],
        other_path.as_str(),
        "another session's file is not signed"
    );
    // Fetched as an agent (or a model provider) would: no credentials at all.
    let fetched = reqwest::get(signed).await.unwrap();
    assert_eq!(fetched.status(), 200);
    assert_eq!(fetched.bytes().await.unwrap().as_ref(), &bytes[..]);
    // The signature is for that file only.
    let query = signed.split_once('?').unwrap().1;
    let misused = reqwest::get(format!("{}{other_path}?{query}", server.base))
        .await
        .unwrap();
    assert_eq!(misused.status(), 403);
    let tampered = reqwest::get(signed.replace("expires=", "expires=1")).await.unwrap();
    assert_eq!(tampered.status(), 403);
    // The stored message keeps the path (signatures are made per dispatch, never stored).
    let history: Value = admin(reqwest::Method::GET, "/api/sessions/s1/messages", Value::Null)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(history["messages"][0]["content"]["parts"][1]["url"], path.as_str());
    server.stop().await;
}

/// Uploads in progress are bounded per node (each holds its body in memory until stored): with
/// one more upload held open than the bound, exactly one is refused at once with 503
/// `overloaded`, the others complete once their bodies do, and the bound frees up after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_in_progress_are_bounded_and_the_next_one_is_told_to_retry() {
    let server = TestServer::start(Store::Sqlite).await;
    server.agent_and_session("a", "u", "s1").await;
    let bound = fleetlm::file_urls::MAX_CONCURRENT_UPLOADS;
    // `bound + 1` uploads whose bodies stay open until released.
    let mut senders = Vec::new();
    let mut pending = Vec::new();
    for _ in 0..=bound {
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
        sender.send(Ok(sample(100))).await.unwrap();
        let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|chunk| (chunk, receiver))
        });
        let request = server
            .client
            .post(server.url("/api/sessions/s1/files"))
            .header("content-type", "image/png")
            .body(reqwest::Body::wrap_stream(stream))
            .send();
        pending.push(tokio::spawn(async move {
            let response = request.await.unwrap();
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (status, body)
        }));
        senders.push(sender);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pending.iter().any(|p| p.is_finished()) {
        assert!(Instant::now() < deadline, "no upload past the bound was refused");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Give a second refusal, if there were one, the time to show.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ended, held): (Vec<_>, Vec<_>) = pending.into_iter().partition(|p| p.is_finished());
    assert_eq!(
        (ended.len(), held.len()),
        (1, bound),
        "exactly the one past the bound is refused"
    );
    let (status, body) = ended.into_iter().next().unwrap().await.unwrap();
    assert_eq!((status, body["code"].as_str()), (503, Some("overloaded")), "{body}");
    drop(senders);
    for request in held {
        let (status, body) = request.await.unwrap();
        assert_eq!(status, 201, "{body}");
    }
    let (status, _) = upload(&server, "s1", sample(10), Some("image/png"), "", None).await;
    assert_eq!(status, 201, "the bound frees up once the uploads end");
    server.stop().await;
}
