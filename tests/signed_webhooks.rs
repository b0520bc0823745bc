//! Signed webhooks (Standard Webhooks) against a real server and a real HTTP agent on
//! 127.0.0.1, once on the embedded SQLite archive and once on a real Postgres database: every
//! call verifies under the agent's secret, computed here independently from the standard's
//! definition; a rotation signs with both secrets for its grace period and with the new one
//! only after; secrets survive restarts, are never shown again, and a database from before
//! signatures is migrated. The Standard Webhooks reference library (`standardwebhooks` on npm,
//! tests/js) verifies the calls too.

#[macro_use]
mod support;

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use support::agent::{Behavior, Call, TestAgent};
use support::{Store, TestServer, restart};

on_both_stores!(
    calls_are_signed_rotations_overlap_and_secrets_stay_hidden,
    rotation_and_secret_fields_are_validated,
);

/// The signature of a call as the Standard Webhooks specification defines it, computed here
/// and not by the server: `v1,` + base64(HMAC-SHA256(key = base64-decoded secret after
/// `whsec_`, message = "{webhook-id}.{webhook-timestamp}.{body}")).
fn expected_signature(secret: &str, webhook_id: &str, timestamp: &str, body: &str) -> String {
    let key = STANDARD
        .decode(secret.strip_prefix("whsec_").expect("a secret starts with whsec_"))
        .expect("a secret is base64 after its prefix");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{webhook_id}.{timestamp}.{body}").as_bytes());
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

fn header<'a>(call: &'a Call, name: &str) -> Option<&'a str> {
    call.headers.get(name).map(|value| value.to_str().unwrap())
}

/// The signatures a call carries (space-separated in `webhook-signature`).
fn signatures(call: &Call) -> Vec<String> {
    header(call, "webhook-signature")
        .map(|value| value.split(' ').map(str::to_string).collect())
        .unwrap_or_default()
}

/// Whether a receiver holding `secret` accepts the call, as a Standard Webhooks library checks
/// it: one of its signatures is the one computed over the exact body bytes, and its timestamp
/// is within five minutes of now.
fn verifies(call: &Call, secret: &str) -> bool {
    let (Some(id), Some(timestamp)) = (header(call, "webhook-id"), header(call, "webhook-timestamp")) else {
        return false;
    };
    let sent_at: i64 = timestamp.parse().expect("the timestamp is integer seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    if (now - sent_at).abs() > 300 {
        return false;
    }
    let expected = expected_signature(secret, id, timestamp, &call.raw_body);
    signatures(call).contains(&expected)
}

/// The user writes `text` in `session`; waits until it is the agent's `call_number`th call
/// and its reply is stored, and returns that call.
async fn turn(server: &TestServer, agent: &TestAgent, session: &str, text: &str, call_number: usize) -> Call {
    let sent = server
        .post(
            &format!("/api/sessions/{session}/messages"),
            json!({"user_id": "u", "content": {"text": text}}),
        )
        .await;
    assert_eq!(sent.status, 200, "{}", sent.body);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let page = server
            .get(&format!("/api/sessions/{session}/messages?limit=1000"))
            .await;
        let replies = page.body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["kind"] == "assistant")
            .count();
        if replies >= call_number && agent.calls().len() >= call_number {
            return agent.calls()[call_number - 1].clone();
        }
        assert!(Instant::now() < deadline, "no reply to {text:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// No answer to a read or a list shows any of `secrets`, or any secret at all.
async fn assert_secrets_hidden(server: &TestServer, secrets: &[&str]) {
    for path in ["/api/agents/signed", "/api/agents", "/api/agents?status=enabled"] {
        let reply = server.get(path).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let text = reply.body.to_string();
        assert!(!text.contains("whsec_"), "{path} shows a secret: {text}");
        for secret in secrets {
            assert!(!text.contains(&secret["whsec_".len()..]), "{path} shows a secret");
        }
    }
}

async fn rotate(server: &TestServer, body: Value) -> (String, Value) {
    let rotated = server.post("/api/agents/signed/signing-secret/rotate", body).await;
    assert_eq!(rotated.status, 200, "{}", rotated.body);
    let secret = rotated.body["signing_secret"].as_str().unwrap().to_string();
    assert!(
        !rotated.body["agent"].to_string().contains("whsec_"),
        "the agent's form holds no secret"
    );
    (secret, rotated.body)
}

async fn drop_signing_columns(data_dir: &std::path::Path, database: Option<&support::TestDatabase>) {
    let columns = [
        "signing_secret",
        "signing_secret_created_at",
        "previous_signing_secret",
        "previous_signing_secret_expires_at",
    ];
    match database {
        Some(database) => {
            let (client, connection) = tokio_postgres::connect(&database.url, tokio_postgres::NoTls)
                .await
                .unwrap();
            let connection = tokio::spawn(connection);
            for column in columns {
                client
                    .batch_execute(&format!("ALTER TABLE agents DROP COLUMN {column}"))
                    .await
                    .unwrap();
            }
            drop(client);
            connection.await.unwrap().unwrap();
        }
        None => {
            let sqlite = rusqlite::Connection::open(data_dir.join("archive.sqlite3")).unwrap();
            for column in columns {
                sqlite
                    .execute_batch(&format!("ALTER TABLE agents DROP COLUMN {column}"))
                    .unwrap();
            }
        }
    }
}

async fn calls_are_signed_rotations_overlap_and_secrets_stay_hidden(store: Store) {
    let server = TestServer::start(store).await;
    let agent = TestAgent::start(Behavior::EchoJsonl).await;
    let created = server
        .post(
            "/api/agents",
            json!({"agent": {"id": "signed", "name": "Signed", "origin_url": agent.url, "debounce_window_ms": 0}}),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let first = created.body["signing_secret"].as_str().unwrap().to_string();
    assert_eq!(
        STANDARD.decode(first.strip_prefix("whsec_").unwrap()).unwrap().len(),
        32,
        "whsec_ and the base64 of 32 random bytes"
    );
    assert!(!created.body["agent"].to_string().contains("whsec_"));
    assert!(created.body["agent"]["signing"]["secret_created_at"].is_string());
    assert_secrets_hidden(&server, &[&first]).await;
    let session = json!({"id": "signed-s", "user_id": "u", "agent_id": "signed"});
    assert_eq!(server.post("/api/sessions", session).await.status, 201);

    // Every call carries the three headers; the id is the turn's, as idempotency-key.
    let call = turn(&server, &agent, "signed-s", "one", 1).await;
    let webhook_id = header(&call, "webhook-id").unwrap();
    assert_eq!(webhook_id, call.body["dispatch_id"].as_str().unwrap());
    assert_eq!(Some(webhook_id), header(&call, "idempotency-key"));
    let signatures_sent = signatures(&call);
    assert_eq!(signatures_sent.len(), 1, "one secret, one signature");
    assert_eq!(
        signatures_sent[0],
        expected_signature(
            &first,
            webhook_id,
            header(&call, "webhook-timestamp").unwrap(),
            &call.raw_body
        )
    );
    assert!(verifies(&call, &first));
    let tampered = Call {
        raw_body: call.raw_body.replace("one", "eno"),
        ..call.clone()
    };
    assert!(!verifies(&tampered, &first), "the signature covers the body");

    // A rotation: both secrets sign during the grace period, the new one first.
    let rotated_at = Instant::now();
    let (second, rotated) = rotate(&server, json!({"grace_period_ms": 3000})).await;
    assert_ne!(second, first);
    let expires = rotated["previous_secret_expires_at"].as_str().unwrap();
    assert_eq!(rotated["agent"]["signing"]["previous_secret_expires_at"], expires);
    assert_secrets_hidden(&server, &[&first, &second]).await;
    let call = turn(&server, &agent, "signed-s", "two", 2).await;
    assert_eq!(signatures(&call).len(), 2, "{:?}", signatures(&call));
    assert!(verifies(&call, &second) && verifies(&call, &first));
    let only_new = Call {
        headers: {
            let mut headers = call.headers.clone();
            let newest = signatures(&call)[0].clone();
            headers.insert("webhook-signature", newest.parse().unwrap());
            headers
        },
        ..call.clone()
    };
    assert!(
        verifies(&only_new, &second),
        "the current secret's signature comes first"
    );

    // After it, only the new secret signs.
    tokio::time::sleep((rotated_at + Duration::from_millis(3100)).saturating_duration_since(Instant::now())).await;
    let call = turn(&server, &agent, "signed-s", "three", 3).await;
    assert_eq!(signatures(&call).len(), 1);
    assert!(verifies(&call, &second) && !verifies(&call, &first));

    // Editing the agent keeps its secret; a restart finds it in the archive.
    let renamed = server
        .patch("/api/agents/signed", json!({"agent": {"name": "Signed 2"}}))
        .await;
    assert_eq!(renamed.status, 200);
    assert!(!renamed.body.to_string().contains("whsec_"));
    let call = turn(&server, &agent, "signed-s", "four", 4).await;
    assert!(verifies(&call, &second) && !verifies(&call, &first));
    let (data_dir, database) = server.stop().await;
    let server = restart(store, data_dir, database).await;
    assert_secrets_hidden(&server, &[&first, &second]).await;
    let call = turn(&server, &agent, "signed-s", "five", 5).await;
    assert!(verifies(&call, &second) && !verifies(&call, &first));

    // A rotation without a grace period: the old secret stops at once.
    let (third, rotated) = rotate(&server, json!({"grace_period_ms": 0})).await;
    assert_eq!(rotated["previous_secret_expires_at"], Value::Null);
    let call = turn(&server, &agent, "signed-s", "six", 6).await;
    assert_eq!(signatures(&call).len(), 1);
    assert!(verifies(&call, &third) && !verifies(&call, &second));

    // A database from before signatures: the next start adds the columns; the agent has no
    // secret (its calls carry the id and timestamp, unsigned) until a rotation makes one.
    let (data_dir, database) = server.stop().await;
    drop_signing_columns(data_dir.path(), database.as_ref()).await;
    let server = restart(store, data_dir, database).await;
    let shown = server.get("/api/agents/signed").await;
    assert_eq!(shown.status, 200, "{}", shown.body);
    assert_eq!(shown.body["agent"]["signing"]["secret_created_at"], Value::Null);
    let call = turn(&server, &agent, "signed-s", "seven", 7).await;
    assert_eq!(header(&call, "webhook-signature"), None);
    assert_eq!(header(&call, "webhook-id"), call.body["dispatch_id"].as_str());
    assert!(header(&call, "webhook-timestamp").is_some());
    let (fourth, rotated) = rotate(&server, json!({})).await;
    assert_eq!(rotated["previous_secret_expires_at"], Value::Null, "no secret to keep");
    let call = turn(&server, &agent, "signed-s", "eight", 8).await;
    assert_eq!(signatures(&call).len(), 1);
    assert!(verifies(&call, &fourth));
    server.stop().await;
}

/// Posts `body` as is (not necessarily JSON).
async fn post_raw(server: &TestServer, path: &str, body: &'static str) -> support::Reply {
    let response = server.client.post(server.url(path)).body(body).send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    support::Reply { status, body, headers }
}

async fn rotation_and_secret_fields_are_validated(store: Store) {
    let server = TestServer::start(store).await;
    let created = server
        .post(
            "/api/agents",
            json!({"agent": {"id": "signed", "name": "Signed", "origin_url": "http://127.0.0.1:9"}}),
        )
        .await;
    assert_eq!(created.status, 201);
    let created_at = created.body["agent"]["signing"]["secret_created_at"].clone();

    let unknown = server.post("/api/agents/ghost/signing-secret/rotate", json!({})).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(
        unknown.body,
        json!({"error": "agent ghost not found", "code": "agent_not_found"})
    );

    for (body, field, message) in [
        (
            json!({"grace_period_ms": -1}),
            "grace_period_ms",
            "must be an integer between 0 and 604800000",
        ),
        (
            json!({"grace_period_ms": "1000"}),
            "grace_period_ms",
            "must be an integer between 0 and 604800000",
        ),
        (
            json!({"grace_period_ms": 1.5}),
            "grace_period_ms",
            "must be an integer between 0 and 604800000",
        ),
        (
            json!({"grace_period_ms": 604_800_001u64}),
            "grace_period_ms",
            "must be an integer between 0 and 604800000",
        ),
        (
            json!({"grace_period_s": 60}),
            "grace_period_s",
            "is not a field of a rotation (only grace_period_ms is)",
        ),
    ] {
        let refused = server
            .post("/api/agents/signed/signing-secret/rotate", body.clone())
            .await;
        assert_eq!(refused.status, 422, "{body}: {}", refused.body);
        assert_eq!(refused.body["code"], "validation_failed");
        assert_eq!(refused.body["errors"], json!({field: [message]}), "{body}");
    }
    for body in ["not json", "[]", "{\"grace_period_ms\": 1"] {
        let refused = post_raw(&server, "/api/agents/signed/signing-secret/rotate", body).await;
        assert_eq!(
            (refused.status, refused.body["code"].as_str()),
            (400, Some("invalid_json")),
            "{body}"
        );
    }
    let wrong_method = server.get("/api/agents/signed/signing-secret/rotate").await;
    assert_eq!(
        (wrong_method.status, wrong_method.body["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
    let shown = server.get("/api/agents/signed").await;
    assert_eq!(
        shown.body["agent"]["signing"]["secret_created_at"], created_at,
        "no refused rotation changed the secret"
    );

    // The secret is FleetLM's to make; the signature headers are FleetLM's to send.
    let chosen = server
        .post(
            "/api/agents",
            json!({"agent": {"id": "chooser", "name": "C", "origin_url": "http://127.0.0.1:9",
                "signing_secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}}),
        )
        .await;
    assert_eq!(chosen.status, 422);
    assert_eq!(
        chosen.body["errors"],
        json!({"signing_secret": ["is made by FleetLM; rotate it with POST /api/agents/{id}/signing-secret/rotate"]})
    );
    assert!(
        !chosen.body.to_string().contains("MfKQ9r8"),
        "an error never repeats a secret"
    );
    let patched = server
        .patch(
            "/api/agents/signed",
            json!({"agent": {"signing_secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}}),
        )
        .await;
    assert_eq!(
        (patched.status, patched.body["code"].as_str()),
        (422, Some("validation_failed"))
    );
    assert!(patched.body["errors"]["signing_secret"].is_array());
    let spoofing = server
        .patch(
            "/api/agents/signed",
            json!({"agent": {"headers": {"Webhook-Signature": "v1,forged"}}}),
        )
        .await;
    assert_eq!(spoofing.status, 422);
    assert_eq!(
        spoofing.body["errors"],
        json!({"headers": ["Webhook-Signature is set by FleetLM on every call (the webhook's signature)"]})
    );
    server.stop().await;
}

/// Verifies `calls` under `secret` with the `standardwebhooks` npm package (tests/js): for
/// each, `true`, or the library's reason for refusing it.
async fn verify_with_the_npm_library(secret: &str, calls: &[Call]) -> Vec<Value> {
    let js_dir = support::js_dir_with("standardwebhooks");
    let calls: Vec<Value> = calls
        .iter()
        .map(|call| {
            let headers: serde_json::Map<String, Value> = call
                .headers
                .iter()
                .map(|(name, value)| (name.to_string(), json!(value.to_str().unwrap())))
                .collect();
            json!({"headers": headers, "body": call.raw_body})
        })
        .collect();
    let input = json!({"secret": secret, "calls": calls}).to_string();
    let output = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut node = std::process::Command::new("node")
            .arg("verify_signed_calls.mjs")
            .current_dir(js_dir)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("node must be installed (Node 20)");
        node.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        node.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stdout));
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The Standard Webhooks reference library accepts FleetLM's calls under the agent's secret,
/// both secrets during a rotation's grace period, and refuses a tampered body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standard_webhooks_npm_library_verifies_the_calls() {
    let server = TestServer::start(Store::Sqlite).await;
    let agent = TestAgent::start(Behavior::EchoJsonl).await;
    let created = server
        .post(
            "/api/agents",
            json!({"agent": {"id": "signed", "name": "Signed", "origin_url": agent.url, "debounce_window_ms": 0}}),
        )
        .await;
    let first = created.body["signing_secret"].as_str().unwrap().to_string();
    let session = json!({"id": "signed-s", "user_id": "u", "agent_id": "signed"});
    assert_eq!(server.post("/api/sessions", session).await.status, 201);
    let before = turn(&server, &agent, "signed-s", "one", 1).await;
    let (second, _) = rotate(&server, json!({"grace_period_ms": 600_000})).await;
    let during = turn(&server, &agent, "signed-s", "two", 2).await;
    let tampered = Call {
        raw_body: during.raw_body.replace("two", "owt"),
        ..during.clone()
    };
    let calls = [before, during, tampered];
    let under_first = verify_with_the_npm_library(&first, &calls).await;
    assert_eq!(&under_first[..2], &[json!(true), json!(true)], "{under_first:?}");
    assert!(
        under_first[2].is_string(),
        "a tampered body is refused: {under_first:?}"
    );
    let under_second = verify_with_the_npm_library(&second, &calls).await;
    assert!(
        under_second[0].is_string(),
        "a call before the rotation is not the new secret's"
    );
    assert_eq!(under_second[1], json!(true));
    assert!(under_second[2].is_string());
    server.stop().await;
}

/// In token mode only the API key manages agents: a user's token cannot rotate a secret, nor
/// read one anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_token_mode_only_the_api_key_rotates_a_secret() {
    const SECRET: &str = "a-test-secret-of-some-length";
    let server = TestServer::start_with(Store::Sqlite, |s| {
        s.auth_secret = Some(SECRET.into());
        s.api_key = Some("admin-key".into());
    })
    .await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + 600;
    let alice = fleetlm::auth::mint(
        SECRET.as_bytes(),
        &fleetlm::auth::Claims {
            sub: "alice".into(),
            exp,
        },
    );
    let post = |path: &str, bearer: &str, body: Value| {
        let request = server.client.post(server.url(path)).bearer_auth(bearer).json(&body);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let agent = json!({"agent": {"id": "signed", "name": "S", "origin_url": "http://127.0.0.1:9"}});
    let (status, created) = post("/api/agents", "admin-key", agent).await;
    assert_eq!(status, 201);
    assert!(created["signing_secret"].as_str().unwrap().starts_with("whsec_"));
    let rotate_path = "/api/agents/signed/signing-secret/rotate";
    let (status, refused) = post(rotate_path, &alice, json!({})).await;
    assert_eq!((status, refused["code"].as_str()), (403, Some("forbidden")));
    assert!(!refused.to_string().contains("whsec_"));
    let (status, _) = post(rotate_path, "not-a-token", json!({})).await;
    assert_eq!(status, 401);
    let (status, rotated) = post(rotate_path, "admin-key", json!({})).await;
    assert_eq!(status, 200);
    assert_ne!(rotated["signing_secret"], created["signing_secret"]);
    server.stop().await;
}
