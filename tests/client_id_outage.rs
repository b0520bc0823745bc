//! `client_id` sends during an archive outage: a long session loaded from the archive keeps
//! taking sends with client ids (acknowledged into the WAL), recognises retries of its recent
//! client ids from memory, and is archived whole once the archive is back.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{CuttableProxy, ServerProcess, TestDatabase, call, create_sessions};

const SESSION_LENGTH: u64 = 500;

async fn query_one(database: &TestDatabase, sql: &str) -> tokio_postgres::Row {
    let (client, connection) = tokio_postgres::connect(&database.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client.query_one(sql, &[]).await.unwrap()
}

async fn archived_messages(database: &TestDatabase) -> i64 {
    query_one(database, "SELECT count(*) FROM messages WHERE session_id = 's'")
        .await
        .get(0)
}

async fn wait_archived(database: &TestDatabase, count: i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while archived_messages(database).await != count {
        assert!(
            Instant::now() < deadline,
            "the flusher did not archive {count} messages"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An agent reply (no dispatch follows it) with a client id.
async fn send(client: &reqwest::Client, base: &str, client_id: &str, n: u64) -> support::Reply {
    let body = json!({"agent_id": "a", "content": {"text": format!("reply {n}")}, "client_id": client_id});
    call(client, "POST", &format!("{base}/api/sessions/s/messages"), Some(body)).await
}

async fn wait_ready(client: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while call(client, "GET", &format!("{base}/health/ready"), None).await.status != 200 {
        assert!(Instant::now() < deadline, "server not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_id_sends_to_a_reloaded_long_session_go_on_during_an_archive_outage() {
    let database = TestDatabase::create();
    let (proxy, proxied_url) = CuttableProxy::to_database(&database).await;
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();

    // A 500-message session, every message with a client id, all archived.
    let mut server = ServerProcess::start(dir.path(), Some(&proxied_url), &[]);
    create_sessions(&server.base, &client, &["s"]).await;
    for n in 1..=SESSION_LENGTH {
        let reply = send(&client, &server.base, &format!("c{n}"), n).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.body["message"]["seq"], n);
    }
    wait_archived(&database, SESSION_LENGTH as i64).await;

    // A restart: the session is no longer in memory and is loaded from the archive.
    server.kill9();
    drop(server);
    let server = ServerProcess::start(dir.path(), Some(&proxied_url), &[]);
    let base = server.base.clone();
    wait_ready(&client, &base).await;
    let view = call(&client, "GET", &format!("{base}/api/sessions/s"), None).await;
    assert_eq!(view.status, 200, "{}", view.body);
    assert_eq!(view.body["session"]["last_seq"], SESSION_LENGTH, "{}", view.body);

    proxy.cut();
    // New client ids: acknowledged into the WAL although the archive cannot be asked.
    for n in 1..=20u64 {
        let reply = send(&client, &base, &format!("new{n}"), 1000 + n).await;
        assert_eq!(
            reply.status, 200,
            "a send with a new client_id is acknowledged during the outage: {}",
            reply.body
        );
        assert_eq!(reply.body["message"]["seq"], SESSION_LENGTH + n);
        assert!(reply.body.get("deduplicated").is_none());
    }
    // Retries of recent client ids are recognised from memory: one sent during the outage,
    // one from before it.
    let retry = send(&client, &base, "new5", 1005).await;
    assert_eq!(retry.status, 200, "{}", retry.body);
    assert_eq!(retry.body["deduplicated"], true, "{}", retry.body);
    assert_eq!(retry.body["message"]["seq"], SESSION_LENGTH + 5);
    let retry = send(&client, &base, "c480", 480).await;
    assert_eq!(retry.status, 200, "{}", retry.body);
    assert_eq!(retry.body["deduplicated"], true, "{}", retry.body);
    assert_eq!(retry.body["message"]["seq"], 480);
    // Older than the hot tail but within the client-id window: known without the archive.
    let reused = send(&client, &base, "c300", 999_999).await;
    assert_eq!(
        reused.status, 409,
        "a client id reused with another body: {}",
        reused.body
    );
    assert_eq!(reused.body["code"], "client_id_conflict", "{}", reused.body);
    // Its exact retry is known to be a duplicate (never stored twice), but the original's body
    // is only in the archive: refused for now.
    let retry = send(&client, &base, "c300", 300).await;
    assert_eq!(retry.status, 503, "{}", retry.body);
    let next = send(&client, &base, "new21", 1021).await;
    assert_eq!(next.status, 200, "{}", next.body);
    assert_eq!(
        next.body["message"]["seq"],
        SESSION_LENGTH + 21,
        "nothing was stored for the retry"
    );

    // The archive returns: everything is archived, once, in order.
    proxy.restore();
    let total = SESSION_LENGTH + 21;
    wait_archived(&database, total as i64).await;
    let row = query_one(
        &database,
        "SELECT min(seq), max(seq), count(DISTINCT seq), count(DISTINCT client_id) FROM messages WHERE session_id = 's'",
    )
    .await;
    let (min, max, seqs, client_ids): (i64, i64, i64, i64) = (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(
        (min, max, seqs, client_ids),
        (1, total as i64, total as i64, total as i64)
    );
    let dead: i64 = query_one(&database, "SELECT count(*) FROM dead_letters").await.get(0);
    assert_eq!(dead, 0);
    let retry = send(&client, &base, "c300", 300).await;
    assert_eq!(retry.status, 200, "{}", retry.body);
    assert_eq!(retry.body["deduplicated"], true);
    assert_eq!(retry.body["message"]["seq"], 300);
    let mut seqs: Vec<u64> = Vec::new();
    loop {
        let after = seqs.last().copied().unwrap_or(0);
        let page = call(
            &client,
            "GET",
            &format!("{base}/api/sessions/s/messages?after_seq={after}&limit=100"),
            None,
        )
        .await;
        assert_eq!(page.status, 200, "{}", page.body);
        seqs.extend(
            page.body["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m: &Value| m["seq"].as_u64().unwrap()),
        );
        if page.body["has_more"] != true {
            break;
        }
    }
    assert_eq!(seqs, (1..=total).collect::<Vec<_>>());
    drop(server);
}

/// Beyond the window, during an outage: a retry of a client id older than the session's newest
/// 1024 is taken as new (stored, not refused); when the archive returns, that second copy cannot
/// take the client id and is set aside as a dead letter, still served: no hole in the history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_older_than_the_window_during_an_outage_is_stored_and_later_dead_lettered() {
    const LENGTH: u64 = 1100;
    let database = TestDatabase::create();
    let (proxy, proxied_url) = CuttableProxy::to_database(&database).await;
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let mut server = ServerProcess::start(dir.path(), Some(&proxied_url), &[]);
    create_sessions(&server.base, &client, &["s"]).await;
    for n in 1..=LENGTH {
        let reply = send(&client, &server.base, &format!("c{n}"), n).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    wait_archived(&database, LENGTH as i64).await;
    server.kill9();
    drop(server);
    let server = ServerProcess::start(dir.path(), Some(&proxied_url), &[]);
    let base = server.base.clone();
    wait_ready(&client, &base).await;
    assert_eq!(
        call(&client, "GET", &format!("{base}/api/sessions/s"), None)
            .await
            .status,
        200
    );

    proxy.cut();
    let retry = send(&client, &base, "c5", 5).await;
    assert_eq!(retry.status, 200, "taken as new, not refused: {}", retry.body);
    assert_eq!(retry.body["message"]["seq"], LENGTH + 1);
    assert!(retry.body.get("deduplicated").is_none());
    let fresh = send(&client, &base, "fresh", 0).await;
    assert_eq!(fresh.status, 200, "{}", fresh.body);

    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let dead: i64 = query_one(&database, "SELECT count(*) FROM dead_letters WHERE kind = 'message'")
            .await
            .get(0);
        if dead == 1 && archived_messages(&database).await == LENGTH as i64 + 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the flusher did not set the copy aside");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let page = call(
        &client,
        "GET",
        &format!("{base}/api/sessions/s/messages?after_seq={}&limit=10", LENGTH - 1),
        None,
    )
    .await;
    assert_eq!(page.status, 200, "{}", page.body);
    let seqs: Vec<u64> = page.body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m: &Value| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        [LENGTH, LENGTH + 1, LENGTH + 2],
        "the copy is served from its dead letter"
    );
    let retry = send(&client, &base, "c5", 5).await;
    assert_eq!(retry.status, 200, "{}", retry.body);
    assert_eq!(
        retry.body["deduplicated"], true,
        "not stored a third time: {}",
        retry.body
    );
    let next = send(&client, &base, "after", 1).await;
    assert_eq!(next.body["message"]["seq"], LENGTH + 3);
    drop(server);
}
