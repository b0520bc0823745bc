//! The web console in a real browser: runs `console/e2e` (Node's test runner, playwright-core
//! driving Debian's headless Chromium) against the built `fleetlm` binary and the example echo
//! agent. Needs Node 20, `/usr/bin/chromium` (`apt-get install chromium`; `.ci/run` installs
//! it; CHROMIUM names another executable) and the `sqlite3` CLI (`apt-get install sqlite3`), with
//! which the dead-letter test makes the archive refuse a row. On failure the screenshots are in
//! FLEETLM_CONSOLE_ARTIFACTS (default: the temp dir's `fleetlm-console-e2e/`).

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
    let output_dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new("node")
        .args(["--test", "--test-reporter=spec", "--test-timeout=120000", "e2e/"])
        .current_dir(console_dir())
        .env("FLEETLM_BIN", env!("CARGO_BIN_EXE_fleetlm"))
        .env("CHROMIUM", &chromium)
        .stdout(std::fs::File::create(output_dir.path().join("stdout")).expect("stdout file"))
        .stderr(Stdio::inherit())
        // Its own process group, so a timeout kills the server, agent and browser it started too.
        .process_group(0)
        .spawn()
        .expect("node must be installed (Node 20)");
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for node") {
            break status;
        }
        if Instant::now() > deadline {
            // SAFETY: kill(2) on the process group made for the child above.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            panic!("the console browser tests took over 300 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = std::fs::read_to_string(output_dir.path().join("stdout")).unwrap_or_default();
    assert!(status.success(), "console browser tests failed:\n{stdout}");
    assert!(
        stdout.contains("ℹ fail 0"),
        "expected no failing console tests:\n{stdout}"
    );
    assert!(
        stdout.contains("ℹ pass 12"),
        "expected 12 passing console tests:\n{stdout}"
    );
}
