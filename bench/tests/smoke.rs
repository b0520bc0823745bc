//! The harness itself works: each scenario runs end to end against a real server (started by
//! the harness from the same build) and writes its JSON. Numbers are not checked here —
//! benchmarks are not tests.

use std::process::Command;

fn run(args: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("result.json");
    let output = Command::new(env!("CARGO_BIN_EXE_fleetlm-bench"))
        .args(args)
        .arg("--json")
        .arg(&json_path)
        .output()
        .expect("run fleetlm-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&std::fs::read(&json_path).expect("json written")).expect("valid json")
}

#[test]
fn every_scenario_runs_and_reports() {
    // The JetStream baseline needs nats-server 2.10+ (`.ci/run` installs one with
    // bench/install-nats.sh and names it here); without it that baseline is left out.
    let nats_server = std::env::var("FLEETLM_BENCH_NATS_SERVER").unwrap_or_else(|_| "none".into());
    let write = run(&[
        "ws-write",
        "--seconds",
        "1",
        "--sessions",
        "4",
        "--depth",
        "2",
        "--baseline-jetstream",
        &nats_server,
    ]);
    assert!(write["fleetlm"]["acked_per_sec"].as_f64().unwrap() > 0.0, "{write}");
    assert!(write["echo"]["acked_per_sec"].as_f64().unwrap() > 0.0, "{write}");
    assert!(write["postgres"]["acked_per_sec"].as_f64().unwrap() > 0.0, "{write}");
    if nats_server != "none" {
        assert!(write["jetstream"]["acked_per_sec"].as_f64().unwrap() > 0.0, "{write}");
    }
    let rest = run(&["rest-write", "--seconds", "1", "--sessions", "4", "--depth", "1"]);
    assert!(rest["acked_per_sec"].as_f64().unwrap() > 0.0, "{rest}");
    let fanout = run(&["fanout", "--seconds", "1", "--subscribers", "3"]);
    assert!(fanout["deliveries_per_sec"].as_f64().unwrap() > 0.0, "{fanout}");
    let idle = run(&["idle-sockets", "--sockets", "20"]);
    assert_eq!(idle["sockets"], 20);
    let catch_up = run(&["catch-up", "--clients", "10", "--messages", "20"]);
    assert!(
        catch_up["archived"]["all_joined_ms"].as_f64().unwrap() > 0.0,
        "{catch_up}"
    );
    let half = run(&[
        "ws-write",
        "--seconds",
        "1",
        "--sessions",
        "2",
        "--depth",
        "1",
        "--half-load",
        "--baseline-postgres",
        "none",
        "--baseline-jetstream",
        "none",
    ]);
    assert!(half["half_load"]["rate"].as_u64().unwrap() > 0, "{half}");
    let turns = run(&["agent-turns", "--seconds", "1", "--sessions", "2"]);
    assert!(turns["turns_per_sec"].as_f64().unwrap() > 0.0, "{turns}");
}

/// The cluster scenarios, each at the smallest size that still exercises it: a 3-node cluster
/// and a single node on fresh Postgres databases (needs Postgres on 127.0.0.1, as above).
#[test]
fn cluster_scenarios_run_and_report() {
    let write = run(&[
        "cluster-write",
        "--seconds",
        "1",
        "--sessions",
        "6",
        "--depth",
        "1",
        "--shards",
        "8",
    ]);
    let round = &write["rounds"][0];
    assert!(round["cluster"]["acked_per_sec"].as_f64().unwrap() > 0.0, "{write}");
    assert!(round["single"]["acked_per_sec"].as_f64().unwrap() > 0.0, "{write}");
    assert!(round["cluster"]["appends_per_entry"].as_f64().unwrap() > 0.0, "{write}");
    let failover = run(&[
        "failover",
        "--kills",
        "1",
        "--shards",
        "8",
        "--load-rate",
        "50",
        "--steady-secs",
        "0.2",
    ]);
    assert_eq!(failover["unrecovered"], 0, "{failover}");
    assert!(
        failover["writable_after_ms"]["max"].as_f64().unwrap() > 0.0,
        "{failover}"
    );
    let idle = run(&["cluster-idle", "--settle-secs", "0", "--seconds", "1", "--shards", "8"]);
    assert_eq!(idle["cluster"]["processes"].as_array().unwrap().len(), 3, "{idle}");
}
