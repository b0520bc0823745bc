//! The web console is served from the binary at `/` and `/assets/*` and never shadows the API.

mod support;

use support::{Store, TestServer};

#[tokio::test]
async fn the_console_is_served_and_the_api_keeps_its_routes() {
    let server = TestServer::start(Store::Sqlite).await;
    let index = server.client.get(server.url("/")).send().await.unwrap();
    assert_eq!(index.status(), 200);
    assert!(
        index.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(index.headers().contains_key("content-security-policy"));
    let etag = index.headers()["etag"].clone();
    let html = index.text().await.unwrap();
    assert!(html.contains("/assets/app.js") && html.contains("/assets/app.css"));
    let again = server
        .client
        .get(server.url("/"))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);
    let script = server.client.get(server.url("/assets/app.js")).send().await.unwrap();
    assert_eq!(script.status(), 200);
    assert!(
        script.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );

    for path in ["/assets/nope.js", "/api/nope", "/agents", "/index.html", "/healthz"] {
        let reply = server.get(path).await;
        assert_eq!(reply.status, 404, "{path}");
        assert_eq!(reply.body["code"], "not_found", "{path}");
    }
    assert_eq!(server.get("/api/agents").await.body["agents"], serde_json::json!([]));
    assert_eq!(server.get("/health/ready").await.body["status"], "ready");
    assert_eq!(server.get("/health/live").await.body["status"], "live");
    let metrics = server.client.get(server.url("/metrics")).send().await.unwrap();
    assert!(
        metrics.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let socket = server
        .client
        .get(server.url("/socket/websocket?vsn=2.0.0&user_id=u"))
        .send()
        .await
        .unwrap();
    assert!(!socket.headers()["content-type"].to_str().unwrap_or("").contains("html"));
    server.stop().await;
}

const SECRET: &str = "console-routes-secret-0123";

/// What the console relies on besides the client API: tokens minted with the API key (so it can
/// join sockets as any user in token mode) and the agents' recent dispatches.
#[tokio::test]
async fn the_api_key_mints_socket_tokens_and_agents_list_recent_dispatches() {
    let server = TestServer::start_with(Store::Sqlite, |s| {
        s.auth_secret = Some(SECRET.into());
        s.api_key = Some("k3y".into());
    })
    .await;
    let mint = |key: Option<&'static str>, body: serde_json::Value| {
        let mut request = server.client.post(server.url("/api/tokens")).json(&body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    let minted = mint(Some("k3y"), serde_json::json!({"sub": "carol", "ttl_seconds": 60}))
        .await
        .unwrap();
    assert_eq!(minted.status(), 201);
    let body: serde_json::Value = minted.json().await.unwrap();
    let token = body["token"].as_str().unwrap();
    let rules = fleetlm::auth::TokenRules::new(SECRET.as_bytes(), None, None);
    let claims = fleetlm::auth::verify(&rules, token, 0).unwrap();
    assert_eq!(claims.sub, "carol");
    assert_eq!(
        mint(None, serde_json::json!({"sub": "carol"})).await.unwrap().status(),
        401
    );
    let as_user = server
        .client
        .post(server.url("/api/tokens"))
        .bearer_auth(token)
        .json(&serde_json::json!({"sub": "dave"}))
        .send()
        .await
        .unwrap();
    assert_eq!(as_user.status(), 403);
    for bad in [
        serde_json::json!({}),
        serde_json::json!({"sub": ""}),
        serde_json::json!({"sub": "x", "ttl_seconds": 0}),
        serde_json::json!({"sub": "x", "ttl_seconds": 86401}),
    ] {
        let reply = mint(Some("k3y"), bad.clone()).await.unwrap();
        assert_eq!(reply.status(), 422, "{bad}");
    }

    let agent = server
        .client
        .post(server.url("/api/agents"))
        .bearer_auth("k3y")
        .json(&serde_json::json!({"agent": {"id": "a", "name": "A", "origin_url": "http://127.0.0.1:9"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(agent.status(), 201);
    let dispatches = server
        .client
        .get(server.url("/api/agents/a/dispatches"))
        .bearer_auth("k3y")
        .send()
        .await
        .unwrap();
    assert_eq!(dispatches.status(), 200);
    let body: serde_json::Value = dispatches.json().await.unwrap();
    assert_eq!(body["dispatches"], serde_json::json!([]));
    let unknown = server
        .client
        .get(server.url("/api/agents/nope/dispatches"))
        .bearer_auth("k3y")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    server.stop().await;

    let open = TestServer::start(Store::Sqlite).await;
    let reply = open.post("/api/tokens", serde_json::json!({"sub": "carol"})).await;
    assert_eq!(reply.status, 409);
    assert_eq!(reply.body["code"], "open_mode");
    open.stop().await;
}

/// `GET /api/agents/:id/deliveries` (API key only): one entry per webhook HTTP attempt, newest
/// first, with the agent's status, latency and error, and never its URL or header secrets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_recent_deliveries_list_each_attempt_without_its_secrets() {
    use support::agent::{Behavior, TestAgent};
    let server = TestServer::start_with(Store::Sqlite, |s| {
        s.auth_secret = Some(SECRET.into());
        s.api_key = Some("k3y".into());
    })
    .await;
    // Answers 503 once, then the reply: two deliveries for one dispatch.
    let agent = TestAgent::start(Behavior::Flaky(1)).await;
    let admin =
        |method: reqwest::Method, path: &str| server.client.request(method, server.url(path)).bearer_auth("k3y");
    let created = admin(reqwest::Method::POST, "/api/agents")
        .json(
            &serde_json::json!({"agent": {"id": "flaky", "name": "Flaky", "origin_url": agent.url,
            "debounce_window_ms": 0, "headers": {"x-agent-secret": "s3cret-header"}}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let session = admin(reqwest::Method::POST, "/api/sessions")
        .json(&serde_json::json!({"id": "d-1", "user_id": "u", "agent_id": "flaky"}))
        .send()
        .await
        .unwrap();
    assert_eq!(session.status(), 201);
    let sent = admin(reqwest::Method::POST, "/api/sessions/d-1/messages")
        .json(&serde_json::json!({"user_id": "u", "content": {"text": "hello"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 200);

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let (text, deliveries) = loop {
        let reply = admin(reqwest::Method::GET, "/api/agents/flaky/deliveries")
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), 200);
        let text = reply.text().await.unwrap();
        let body: serde_json::Value = serde_json::from_str(&text).unwrap();
        let list = body["deliveries"].as_array().unwrap().clone();
        if list.len() >= 2 {
            break (text, list);
        }
        assert!(std::time::Instant::now() < deadline, "two deliveries expected: {text}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(deliveries.len(), 2, "{text}");
    let (newest, first) = (&deliveries[0], &deliveries[1]);
    assert_eq!(first["attempt"], 1);
    assert_eq!(first["outcome"], "retried");
    assert_eq!(first["http_status"], 503);
    assert_eq!(first["error"], "HTTP 503");
    assert_eq!(newest["attempt"], 2);
    assert_eq!(newest["outcome"], "ok");
    assert_eq!(newest["http_status"], 200);
    assert!(newest.get("error").is_none(), "{newest}");
    assert_eq!(first["dispatch_id"], newest["dispatch_id"]);
    assert_eq!(newest["session_id"], "d-1");
    assert!(newest["latency_ms"].is_u64() && newest["finished_at"].is_string());
    let port = agent.url.rsplit(':').next().unwrap().trim_end_matches('/');
    assert!(
        !text.contains("s3cret-header") && !text.contains("127.0.0.1") && !text.contains(&format!(":{port}")),
        "no secret or address: {text}"
    );

    // Admin only: a user's token is refused; an unknown agent is 404.
    let minted: serde_json::Value = admin(reqwest::Method::POST, "/api/tokens")
        .json(&serde_json::json!({"sub": "u"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let as_user = server
        .client
        .get(server.url("/api/agents/flaky/deliveries"))
        .bearer_auth(minted["token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(as_user.status(), 403);
    let anonymous = server
        .client
        .get(server.url("/api/agents/flaky/deliveries"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let unknown = admin(reqwest::Method::GET, "/api/agents/nope/deliveries")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    server.stop().await;
}
