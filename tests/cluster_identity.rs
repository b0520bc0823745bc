//! The cluster's identity (spec cluster.md, "Operating it"): made when the cluster forms, kept in
//! its log, in the shared Postgres and in every member's data directory, so that no combination
//! of wiped disks starts a second history beside the first. Real `fleetlm serve` processes, one
//! real Postgres, kill -9 and wiped data directories (tests/support/cluster.rs).
//!
//! The scenarios run one at a time with tests/cluster.rs's (the same lock file).

mod support;

use support::cluster::bounded;

use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::TestDatabase;
use support::cluster::{
    Cluster, ClusterOptions, Load, LoadOptions, Started, check_history, create_sessions, spread_sessions,
};

const SHARDS: u16 = 4;

fn options() -> ClusterOptions {
    ClusterOptions {
        shards: SHARDS,
        ..ClusterOptions::default()
    }
}

/// Runs `fleetlm <args>` (the operator's commands) and returns its exit status and output.
async fn operator(args: &[&str]) -> (ExitStatus, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let output = tokio::task::spawn_blocking(move || Command::new(support::binary()).args(&args).output().unwrap())
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status, text)
}

/// Waits until every member is recorded as joined and the cluster's id is recorded, and every
/// running member wrote it into its data directory; returns it.
async fn wait_identity(cluster: &Cluster, members: &[usize]) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = cluster.status(1).await.unwrap_or(Value::Null);
        let id = status["cluster_id"].as_str().map(str::to_string);
        let joined = status["joined"] == json!(members);
        if let Some(id) = id
            && joined
            && members
                .iter()
                .all(|m| recorded_id(cluster.data_dir(*m)).as_deref() == Some(id.as_str()))
        {
            return id;
        }
        assert!(
            Instant::now() < deadline,
            "no cluster id recorded everywhere in 20 s: {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The cluster id a data directory's `fleetlm.json` records.
fn recorded_id(data_dir: &Path) -> Option<String> {
    let layout: Value = serde_json::from_slice(&std::fs::read(data_dir.join("fleetlm.json")).ok()?).ok()?;
    layout["cluster_id"].as_str().map(str::to_string)
}

async fn postgres(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// The cluster id the database records.
async fn shared_id(url: &str) -> Option<String> {
    postgres(url)
        .await
        .query_opt("SELECT cluster_id FROM cluster_identity", &[])
        .await
        .unwrap()
        .map(|row| row.get(0))
}

/// Starts node `id`, which must refuse: exit 2 with a sentence naming it a member that held
/// the log. Returns its log.
fn expect_refused_as_wiped(cluster: &mut Cluster, id: usize) -> String {
    match cluster.spawn(id) {
        Started::Exited(status) => {
            let log = cluster.log_tail(id, 20);
            assert_eq!(
                status.code(),
                Some(2),
                "node {id} exited with {status}; its log:\n{log}"
            );
            assert!(
                log.contains("recorded it as a member that held the log") && log.contains("forget-node"),
                "node {id} refused without saying why; its log:\n{log}"
            );
            log
        }
        Started::Listening => {
            let log = cluster.log_tail(id, 30);
            cluster.kill9(id);
            panic!("node {id}, wiped after it took part, started; its log:\n{log}");
        }
    }
}

/// Per shard, node `id`'s (last log index, committed index).
async fn positions(cluster: &Cluster, id: usize) -> Vec<(u64, u64)> {
    let status = cluster.status(id).await.expect("node status");
    status["shards"]
        .as_array()
        .expect("shards")
        .iter()
        .map(|s| (s["last_log"].as_u64().unwrap(), s["committed"].as_u64().unwrap()))
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The double disk loss during a documented replacement (docs/OPERATIONS.md, "Replacing a
/// node"): node 3's disk is lost, the operator forgets it and starts the replacement; before it
/// is added, node 2's disk is lost too. Node 2, empty, must not count the empty replacement as
/// a fresh majority and start a second history: it is refused (exit 2, saying why), node 1's
/// log stays whole, nothing forms. With node 2's disk restored the replacement finishes and
/// every acknowledged message is on every node and in the archive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_disk_loss_during_a_replacement_is_refused_and_truncates_nothing() {
    bounded(Duration::from_secs(240), async {
        let mut cluster = Cluster::start(3, options()).await;
        let sessions = spread_sessions("s", SHARDS, 2);
        create_sessions(&cluster.node(1), &sessions).await;
        let id = wait_identity(&cluster, &[1, 2, 3]).await;
        assert_eq!(shared_id(&cluster.database.url).await.as_deref(), Some(id.as_str()));
        let (status, text) = operator(&["cluster", "status", "--url", &cluster.node(2)]).await;
        assert!(status.success() && text.contains(&id), "cluster status shows no id: {text}");

        let load = Load::start(
            &cluster,
            &sessions,
            LoadOptions {
                sockets: 0,
                ..LoadOptions::default()
            },
        );
        tokio::time::sleep(Duration::from_secs(1)).await;

        // The first disk loss, and the documented replacement, half done.
        load.routing.exclude(3);
        cluster.kill9(3);
        cluster.wipe(3);
        expect_refused_as_wiped(&mut cluster, 3);
        let (status, text) = operator(&["cluster", "forget-node", "--url", &cluster.node(1), "--node-id", "3"]).await;
        assert!(status.success(), "forget-node failed: {status}: {text}");
        match cluster.spawn(3) {
            Started::Listening => {}
            Started::Exited(status) => panic!(
                "the forgotten node 3 exited with {status} on empty storage; its log:\n{}",
                cluster.log_tail(3, 30)
            ),
        }
        // It asks the leader of shard 0, learns it never joined, and waits to be added.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!cluster.is_ready(3).await, "node 3 is ready before it was added");
        let recorded = load.finish().await;
        assert!(recorded.acked() > 0, "the load got no ack: {}", recorded.summary());
        let before = positions(&cluster, 1).await;

        // The second disk loss, before the replacement is added (its disk is kept aside).
        cluster.kill9(2);
        let kept = tempfile::tempdir().unwrap();
        copy_dir(cluster.data_dir(2), kept.path());
        cluster.wipe(2);
        expect_refused_as_wiped(&mut cluster, 2);

        // No second history: node 1 keeps running with its whole log, nothing forms.
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            assert!(
                cluster.is_running(1),
                "node 1 stopped; its log:\n{}",
                cluster.log_tail(1, 40)
            );
            assert!(!cluster.is_ready(3).await, "node 3 is ready without a quorum");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let after = positions(&cluster, 1).await;
        for (shard, ((last_before, committed_before), (last_after, committed_after))) in
            before.iter().zip(&after).enumerate()
        {
            assert!(
                last_after >= last_before && committed_after >= committed_before,
                "shard {shard}: node 1's log went back from (last {last_before}, committed {committed_before}) to (last {last_after}, committed {committed_after})"
            );
        }
        assert_eq!(shared_id(&cluster.database.url).await.as_deref(), Some(id.as_str()));

        // Node 2's disk restored (over what its refused start left): the cluster has its quorum
        // back and the replacement finishes.
        cluster.wipe(2);
        copy_dir(kept.path(), cluster.data_dir(2));
        cluster.restart(2);
        let (status, text) = operator(&["cluster", "add-node", "--url", &cluster.node(1), "--node-id", "3"]).await;
        assert!(
            status.success(),
            "add-node failed: {status}: {text}\nnode 3:\n{}",
            cluster.log_tail(3, 30)
        );
        cluster.wait_all_ready().await;
        check_history(&recorded, &cluster).await;
        assert_eq!(wait_identity(&cluster, &[1, 2, 3]).await, id);
    })
    .await;
}

/// Runs `fleetlm <args>` by hand until it exits (at most 30 s); returns its status and output.
fn run_until_exit(args: &[String]) -> (ExitStatus, String) {
    let mut child = Command::new(support::binary())
        .args(args)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let output = child.wait_with_output().unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            return (status, text);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "fleetlm {} did not exit within 30 s:\n{}{}",
                args.join(" "),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `args` with the value of `--database-url` replaced.
fn with_database(mut args: Vec<String>, url: &str) -> Vec<String> {
    let at = args
        .iter()
        .position(|a| a == "--database-url")
        .expect("--database-url given");
    args[at + 1] = url.to_string();
    args
}

/// A member of one cluster pointed at a database without a cluster, or at another cluster's,
/// refuses to start (exit 2, saying which ids differ). A cluster whose every disk is lost does
/// not form again beside its archive: each member is refused as one that held the log; and as
/// members the archive does not know (a fresh cluster against another cluster's database),
/// they wait for that cluster and never form one of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_never_forms_twice_over_one_database() {
    bounded(Duration::from_secs(180), async {
        let mut cluster = Cluster::start(3, options()).await;
        let sessions = spread_sessions("s", SHARDS, 2);
        create_sessions(&cluster.node(1), &sessions).await;
        let id = wait_identity(&cluster, &[1, 2, 3]).await;

        // Node 1 against a database of no cluster, then of another cluster.
        cluster.kill9(1);
        let other = TestDatabase::create();
        let args = with_database(cluster.serve_arguments(1), &other.url);
        let (status, text) = tokio::task::spawn_blocking({
            let args = args.clone();
            move || run_until_exit(&args)
        })
        .await
        .unwrap();
        assert_eq!(status.code(), Some(2), "{text}");
        assert!(
            text.contains(&format!("belongs to cluster {id}")) && text.contains("records no cluster"),
            "{text}"
        );
        let foreign = "0198c6d2-0000-7000-8000-00000000beef";
        postgres(&other.url)
            .await
            .execute(
                "INSERT INTO cluster_identity (id, cluster_id, formed_at) VALUES (1, $1, 0)",
                &[&foreign],
            )
            .await
            .unwrap();
        let (status, text) = tokio::task::spawn_blocking(move || run_until_exit(&args))
            .await
            .unwrap();
        assert_eq!(status.code(), Some(2), "{text}");
        assert!(
            text.contains(&format!("belongs to cluster {id}"))
                && text.contains(&format!("belongs to cluster {foreign}")),
            "{text}"
        );

        // Every disk lost: each member is refused.
        cluster.kill9(2);
        cluster.kill9(3);
        for node in 1..=3 {
            cluster.wipe(node);
        }
        for node in 1..=3 {
            expect_refused_as_wiped(&mut cluster, node);
        }

        // Members the archive does not know, on empty storage: they never form a cluster.
        postgres(&cluster.database.url)
            .await
            .execute("DELETE FROM cluster_members", &[])
            .await
            .unwrap();
        for node in 1..=3 {
            cluster.restart(node);
        }
        let until = Instant::now() + Duration::from_secs(8);
        while Instant::now() < until {
            for node in 1..=3 {
                assert!(!cluster.is_ready(node).await, "node {node} formed a second cluster");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        for node in 1..=3 {
            let status = cluster.status(node).await.expect("node status");
            assert!(
                status["shards"][0]["leader"].is_null() && status["cluster_id"].is_null(),
                "node {node} has a leader or an id: {status}"
            );
        }
        let waiting = cluster.log_lines_matching(1, "does not form a cluster");
        assert!(
            !waiting.is_empty(),
            "node 1 does not say why it waits:\n{}",
            cluster.log_tail(1, 20)
        );
        assert_eq!(shared_id(&cluster.database.url).await.as_deref(), Some(id.as_str()));
        for node in 1..=3 {
            cluster.kill9(node);
        }
    })
    .await;
}

/// A member restarted while the archive is unreachable starts (it holds the log) with the
/// archive gated; when the archive answers, it checks the identity before using it, as at start
/// — and an archive that now records another cluster stops it with exit code 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_started_without_its_archive_checks_the_identity_when_the_archive_returns() {
    bounded(Duration::from_secs(120), async {
        let mut cluster = Cluster::start(3, options()).await;
        let sessions = spread_sessions("s", SHARDS, 2);
        create_sessions(&cluster.node(1), &sessions).await;
        let id = wait_identity(&cluster, &[1, 2, 3]).await;
        // Written into node 1's data directory once it held the log: it may start without the
        // archive from now on.
        let deadline = Instant::now() + Duration::from_secs(20);
        while recorded_id(cluster.data_dir(1)).as_deref() != Some(id.as_str()) {
            assert!(Instant::now() < deadline, "node 1 never recorded the cluster id");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        cluster.kill9(1);
        cluster.cut_archive(1, true);
        cluster.restart(1);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            cluster.is_running(1),
            "node 1 did not start without its archive: {}",
            cluster.log_tail(1, 20)
        );

        // Meanwhile the database comes to record another cluster (the other members, which
        // would refuse it too, are stopped first).
        cluster.kill9(2);
        cluster.kill9(3);
        let foreign = "0198c6d2-0000-7000-8000-00000000cafe";
        postgres(&cluster.database.url)
            .await
            .execute("UPDATE cluster_identity SET cluster_id = $1", &[&foreign])
            .await
            .unwrap();
        assert!(cluster.is_running(1), "node 1 stopped before its archive answered");
        cluster.cut_archive(1, false);
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = cluster.exited(1) {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "node 1 kept running on another cluster's archive; its log:\n{}",
                cluster.log_tail(1, 20)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let log = cluster.log_tail(1, 20);
        assert_eq!(status.code(), Some(2), "node 1 exited with {status}; its log:\n{log}");
        assert!(
            log.contains("cannot use the archive") && log.contains(foreign),
            "node 1 stopped without saying why; its log:\n{log}"
        );
    })
    .await;
}
