//! Durability as users meet it: SIGKILL the real server process while clients append, restart
//! it, and check every acknowledged message; cut the Postgres archive off while appending.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use serde_json::{Value, json};
use support::{CuttableProxy, ServerProcess, TestDatabase, call};

const SESSIONS: usize = 6;
const WRITERS: usize = 12;

/// Every acknowledged message by session and seq.
type Acked = Arc<Mutex<BTreeMap<(String, u64), Value>>>;

async fn setup(base: &str, client: &reqwest::Client) {
    let agent = json!({"agent": {"id": "a", "name": "A", "origin_url": "http://127.0.0.1:9"}});
    assert_eq!(
        call(client, "POST", &format!("{base}/api/agents"), Some(agent))
            .await
            .status,
        201
    );
    for n in 0..SESSIONS {
        let session = json!({"user_id": "u", "agent_id": "a", "id": format!("s{n}")});
        assert_eq!(
            call(client, "POST", &format!("{base}/api/sessions"), Some(session))
                .await
                .status,
            201
        );
    }
}

/// Appends until the server stops answering; records what was acknowledged.
async fn append_until_error(base: String, writer: usize, acked: Acked) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut n = 0u64;
    loop {
        let session = format!("s{}", (writer + n as usize) % SESSIONS);
        let body =
            json!({"user_id": "u", "content": {"writer": writer, "n": n, "pad": "x".repeat((n % 7) as usize * 50)}});
        let Ok(response) = client
            .post(format!("{base}/api/sessions/{session}/messages"))
            .json(&body)
            .send()
            .await
        else {
            return;
        };
        if response.status() != 200 {
            return;
        }
        let Ok(reply) = response.json::<Value>().await else {
            return;
        };
        let message = reply["message"].clone();
        let seq = message["seq"].as_u64().unwrap();
        let previous = acked.lock().unwrap().insert((session, seq), message);
        assert!(previous.is_none(), "a seq was acknowledged twice");
        n += 1;
    }
}

async fn verify(base: &str, acked: &Acked) -> BTreeMap<String, u64> {
    let client = reqwest::Client::new();
    let acked = acked.lock().unwrap().clone();
    let mut last_seqs = BTreeMap::new();
    for n in 0..SESSIONS {
        let session = format!("s{n}");
        let mut stored = Vec::new();
        let mut after = 0;
        loop {
            let page = call(
                &client,
                "GET",
                &format!("{base}/api/sessions/{session}/messages?after_seq={after}&limit=1000"),
                None,
            )
            .await;
            assert_eq!(page.status, 200, "{}", page.body);
            let messages = page.body["messages"].as_array().unwrap().clone();
            after += messages.len() as u64;
            stored.extend(messages);
            if page.body["has_more"] != true {
                break;
            }
        }
        for (index, message) in stored.iter().enumerate() {
            assert_eq!(
                message["seq"].as_u64(),
                Some(index as u64 + 1),
                "seqs of {session} have no gap"
            );
        }
        for ((acked_session, seq), message) in acked.range((session.clone(), 0)..(session.clone(), u64::MAX)) {
            assert_eq!(acked_session, &session);
            let found = stored
                .get(*seq as usize - 1)
                .unwrap_or_else(|| panic!("acked {session}/{seq} lost"));
            assert_eq!(found, message, "acked {session}/{seq} changed");
        }
        last_seqs.insert(session, stored.len() as u64);
    }
    last_seqs
}

async fn kill_and_recover_rounds(database: Option<&TestDatabase>, rounds: usize) {
    let dir = tempfile::tempdir().unwrap();
    let url = database.map(|d| d.url.as_str());
    let acked: Acked = Arc::default();
    let mut server = ServerProcess::start(dir.path(), url, &[]);
    let client = reqwest::Client::new();
    setup(&server.base, &client).await;
    for round in 0..rounds {
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| tokio::spawn(append_until_error(server.base.clone(), w, acked.clone())))
            .collect();
        let run_for = Duration::from_millis(rand::rng().random_range(150..900));
        tokio::time::sleep(run_for).await;
        server.kill9();
        for writer in writers {
            writer.await.unwrap();
        }
        server = ServerProcess::start(dir.path(), url, &[]);
        let last_seqs = verify(&server.base, &acked).await;
        let total: u64 = last_seqs.values().sum();
        assert!(total > 0, "round {round}: some appends were acknowledged");
        eprintln!("round {round}: killed after {run_for:?}; {total} messages verified");
        // New appends continue right after the recovered last seq.
        for (session, last) in &last_seqs {
            let reply = call(
                &client,
                "POST",
                &format!("{}/api/sessions/{session}/messages", server.base),
                Some(json!({"user_id": "u", "content": {"after_crash": round}})),
            )
            .await;
            assert_eq!(reply.status, 200);
            assert_eq!(
                reply.body["message"]["seq"].as_u64(),
                Some(last + 1),
                "{session} continues at last + 1"
            );
            acked
                .lock()
                .unwrap()
                .insert((session.clone(), last + 1), reply.body["message"].clone());
        }
    }
    verify(&server.base, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_appends_loses_no_acknowledged_message_sqlite() {
    kill_and_recover_rounds(None, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_appends_loses_no_acknowledged_message_postgres() {
    let database = TestDatabase::create();
    kill_and_recover_rounds(Some(&database), 3).await;
}

async fn archived_message_count(database: &TestDatabase) -> i64 {
    let (client, connection) = tokio_postgres::connect(&database.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .query_one("SELECT count(*) FROM messages", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_outage_loses_nothing_and_flush_catches_up() {
    let database = TestDatabase::create();
    let (proxy, proxied_url) = CuttableProxy::to_database(&database).await;
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), Some(&proxied_url), &["--archive-grace-secs", "2"]);
    let client = reqwest::Client::new();
    setup(&server.base, &client).await;
    let base = server.base.clone();
    let append = |n: u64| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            call(
                &client,
                "POST",
                &format!("{base}/api/sessions/s0/messages"),
                Some(json!({"user_id": "u", "content": {"n": n}})),
            )
            .await
        }
    };
    for n in 0..20 {
        assert_eq!(append(n).await.status, 200);
    }

    proxy.cut();
    for n in 20..220 {
        let reply = append(n).await;
        assert_eq!(
            reply.status, 200,
            "appends go on while the archive is down: {}",
            reply.body
        );
        assert_eq!(reply.body["message"]["seq"], n + 1);
    }
    let history = call(
        &client,
        "GET",
        &format!("{base}/api/sessions/s0/messages?after_seq=20&limit=1000"),
        None,
    )
    .await;
    assert_eq!(
        history.status, 200,
        "what was written during the outage is read from memory and the WAL: {}",
        history.body
    );
    assert_eq!(history.body["messages"].as_array().unwrap().len(), 200);
    // Ready, with a warning, within the grace period; not ready once it is over.
    let ready = call(&client, "GET", &format!("{base}/health/ready"), None).await;
    assert_eq!(
        ready.status, 200,
        "ready within the archive grace period: {}",
        ready.body
    );
    assert!(
        ready.body["warnings"]
            .as_array()
            .is_some_and(|w| w.iter().any(|w| w["component"] == "archive")),
        "{}",
        ready.body
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ready = call(&client, "GET", &format!("{base}/health/ready"), None).await;
    assert_eq!(
        ready.status, 503,
        "not ready once the archive was unreachable past the grace period"
    );
    let outage = ready.body["reasons"]
        .as_array()
        .and_then(|reasons| reasons.iter().find_map(|r| r["down_for_ms"].as_u64()));
    assert!(outage.is_some_and(|ms| ms >= 2000), "{}", ready.body);

    proxy.restore();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if archived_message_count(&database).await == 220 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the flusher did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready = call(&client, "GET", &format!("{base}/health/ready"), None).await;
    assert_eq!(ready.status, 200);
    drop(server);
}
