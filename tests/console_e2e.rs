//! The web console in a real browser: runs `console/e2e` (Node's test runner, playwright-core
//! driving Debian's headless Chromium) against the built `fleetlm` binary and the example echo
//! agent. Needs Node 20, `/usr/bin/chromium` (`apt-get install chromium`; `.ci/run` installs
//! it; CHROMIUM names another executable) and the `sqlite3` CLI (`apt-get install sqlite3`), with
//! which the dead-letter test makes the archive refuse a row. On failure the screenshots are in
//! FLEETLM_CONSOLE_ARTIFACTS (default: the temp dir's `fleetlm-console-e2e/`).

#[path = "support/node_tests.rs"]
mod node_tests;

use std::path::PathBuf;
use std::process::Command;

fn console_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("console")
}

fn ensure_node_modules() {
    if console_dir().join("node_modules/playwright-core").exists() {
        return;
    }
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(console_dir())
        .status()
        .expect("npm must be installed (Node 20) to run the console tests");
    assert!(status.success(), "npm ci failed in console/");
}

#[test]
fn the_console_works_in_a_real_browser() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "the console tests need Chromium at {chromium}: apt-get install -y chromium (or set CHROMIUM)"
    );
    ensure_node_modules();
    let stdout = node_tests::run(
        &console_dir(),
        &[],
        &["e2e/"],
        &[("CHROMIUM", chromium.as_str())],
        "console browser",
    );
    assert!(
        stdout.contains("ℹ pass 16"),
        "expected 16 passing console tests:\n{stdout}"
    );
}
