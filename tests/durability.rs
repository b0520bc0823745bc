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

/// A data directory keeps the WAL lanes it was made with: each shard's records live in lane
/// `shard % lanes`, so a restart that took another count (the default changed from 2 to 1 in
/// issue 23) would not find the records of the shards that moved, and would hand their seqs out
/// again. A count given explicitly that differs is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_keeps_the_wal_lanes_it_was_made_with() {
    const SHARDS: u16 = 8;
    let dir = tempfile::tempdir().unwrap();
    // No archive flush while the test runs: every message is only in the WAL at the kill.
    let quiet = ["--wal-lanes", "3", "--flush-interval-ms", "3600000"];
    let mut server = ServerProcess::start(dir.path(), None, &quiet);
    let client = reqwest::Client::new();
    let agent = json!({"agent": {"id": "a", "name": "A", "origin_url": "http://127.0.0.1:9"}});
    let created = call(&client, "POST", &format!("{}/api/agents", server.base), Some(agent)).await;
    assert_eq!(created.status, 201);
    let sessions: Vec<String> = (0..24).map(|n| format!("lanes-{n}")).collect();
    let lanes_used: std::collections::BTreeSet<u16> = sessions
        .iter()
        .map(|session| fleetlm::ids::shard_for_session(session, SHARDS) % 3)
        .collect();
    assert_eq!(lanes_used.len(), 3, "the sessions' shards lie in every lane");
    for session in &sessions {
        let body = json!({"user_id": "u", "agent_id": "a", "id": session});
        assert_eq!(
            call(&client, "POST", &format!("{}/api/sessions", server.base), Some(body))
                .await
                .status,
            201
        );
        let message = json!({"user_id": "u", "content": {"text": session}});
        let url = format!("{}/api/sessions/{session}/messages", server.base);
        assert_eq!(call(&client, "POST", &url, Some(message)).await.status, 200);
    }
    server.kill9();

    // Restarted without a lane count: the WAL's own three lanes, every message is there.
    let server = ServerProcess::start_without_defaults(
        dir.path(),
        None,
        &["--flush-interval-ms", "3600000"],
        &[],
        &["--wal-lanes"],
    );
    for session in &sessions {
        let page = call(
            &client,
            "GET",
            &format!("{}/api/sessions/{session}/messages", server.base),
            None,
        )
        .await;
        assert_eq!(page.status, 200);
        let texts: Vec<&str> = page.body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["content"]["text"].as_str())
            .collect();
        assert_eq!(texts, [session.as_str()], "{session} kept its message");
        let message = json!({"user_id": "u", "content": {"text": "after"}});
        let url = format!("{}/api/sessions/{session}/messages", server.base);
        let reply = call(&client, "POST", &url, Some(message)).await;
        assert_eq!(reply.body["message"]["seq"], 2, "{session} continues after its message");
    }
    drop(server);

    // Asked for another count: refused, the directory untouched.
    let mut refused = std::process::Command::new(support::binary())
        .args([
            "serve",
            "--http-addr",
            "127.0.0.1:0",
            "--shards",
            "8",
            "--wal-lanes",
            "2",
            "--data-dir",
        ])
        .arg(dir.path())
        .env_remove("DATABASE_URL")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = refused.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            refused.kill().unwrap();
            panic!("a server asked for another lane count started");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut refused.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("wal_lanes") && stderr.contains("has 3 lanes"),
        "{stderr}"
    );
    assert!(!dir.path().join("wal/lane-03").exists() && dir.path().join("wal/lane-02").exists());
}
