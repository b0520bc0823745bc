//! The client packages (`clients/`: `@fleetlm/client`, `@fleetlm/ai-sdk` and `@fleetlm/agent`)
//! against the real server: runs their Node test suites (`node --test`, the AI SDK's own chat
//! machinery) with FLEETLM_BIN naming the `fleetlm` binary cargo built; the suites start it on
//! 127.0.0.1:0 with temporary data dirs, and a real streaming agent. Then the example app
//! (`examples/react-chat`) in headless Chromium (playwright-core, `/usr/bin/chromium` or
//! CHROMIUM), and the example AI SDK agent (`examples/ai-sdk-agent`, the AI SDK's mock model)
//! answering through the real server. Also `@fleetlm/ai-sdk` and `@fleetlm/agent` against each
//! `ai` major they support (5, 6, 7; 6, 7), and the `npm pack` tarballs installed into a fresh
//! TypeScript app. Needs Node 20 with npm; installs a workspace (`npm ci`) when its
//! `node_modules` is missing and compiles the packages (`tsc`) first. The suites run one after
//! the other.

#[path = "support/node_tests.rs"]
mod node_tests;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The Node suites are heavy (servers, agents, a browser): one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn repo_dir(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn npm(dir: &Path, args: &[&str]) {
    let status = Command::new("npm")
        .args(args)
        .current_dir(dir)
        .status()
        .expect("npm must be installed (Node 20) to run the client tests");
    assert!(status.success(), "npm {args:?} failed in {}", dir.display());
}

#[test]
fn the_client_packages_pass_their_node_tests() {
    let _serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let clients = built_clients();
    run_node_tests(
        &clients,
        &["client/test/", "ai-sdk/test/", "agent/test/"],
        "client package",
    );
}

/// The `clients/` workspace, installed and compiled (`dist/`, which the examples link to).
fn built_clients() -> PathBuf {
    let clients = repo_dir("clients");
    if !clients.join("node_modules/ai").exists() || !clients.join("node_modules/ai5").exists() {
        npm(&clients, &["ci", "--no-audit", "--no-fund"]);
    }
    npm(&clients, &["run", "build"]);
    clients
}

/// `@fleetlm/ai-sdk` (and `@fleetlm/agent`) against each `ai` major its peer range names (5, 6, 7;
/// the agent 6, 7: npm aliases in ai-sdk's devDependencies): sources type-check, tests pass.
#[test]
fn the_ai_packages_pass_their_tests_with_each_ai_major() {
    let _serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let clients = built_clients();
    // One file runs three majors' suites in turn: its own time limit, not the default 120 s.
    node_tests::run(
        &clients,
        &["--test-concurrency=1", "--test-timeout=540000"],
        &["release/ai-majors.test.mjs"],
        &[],
        "ai major matrix",
    );
}

/// The three `npm pack` tarballs install into a fresh TypeScript app (in the temp dir), which
/// builds (tsc, NodeNext) and runs.
#[test]
fn the_client_packages_install_from_their_tarballs() {
    let _serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let clients = built_clients();
    run_node_tests(&clients, &["release/tarballs.test.mjs"], "tarball install");
}

#[test]
fn the_ai_sdk_agent_example_answers_through_a_real_server() {
    let _serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    built_clients();
    let example = repo_dir("examples/ai-sdk-agent");
    if !example.join("node_modules/ai").exists() {
        npm(&example, &["ci", "--no-audit", "--no-fund"]);
    }
    run_node_tests(&example, &["test/"], "ai-sdk-agent example");
}

#[test]
fn the_react_example_works_in_a_real_browser() {
    let _serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "the example's browser test needs Chromium at {chromium}: apt-get install -y chromium (or set CHROMIUM)"
    );
    let example = repo_dir("examples/react-chat");
    if !example.join("node_modules/playwright-core").exists() {
        npm(&example, &["ci", "--no-audit", "--no-fund"]);
    }
    run_node_tests(&example, &["e2e/"], "react-chat example");
}

fn run_node_tests(dir: &Path, paths: &[&str], what: &str) {
    node_tests::run(dir, &["--test-concurrency=1"], paths, &[], what);
}
