//! Runs a Node test-runner suite (`node --test`) against the `fleetlm` binary cargo built, in its
//! own process group (a timeout kills every server, agent and browser it started), and checks
//! that it passed. Shared by the console and client-package drivers.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long one Node suite may run before it is killed (the `ai` matrix runs three majors'
/// suites one after the other).
const NODE_SUITE_LIMIT_SECS: u64 = 600;

/// Runs `node --test <args> <paths>` in `dir` with `envs`; returns its output once every test
/// passed (fails the calling test otherwise, or after `NODE_SUITE_LIMIT_SECS`). `args` come after
/// the default `--test-timeout=120000` (per file and per test), so they may override it.
pub fn run(dir: &Path, args: &[&str], paths: &[&str], envs: &[(&str, &str)], what: &str) -> String {
    let output_dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new("node")
        .args(["--test", "--test-reporter=spec", "--test-timeout=120000"])
        .args(args)
        .args(paths)
        .current_dir(dir)
        .env("FLEETLM_BIN", env!("CARGO_BIN_EXE_fleetlm"))
        .envs(envs.iter().copied())
        .stdout(std::fs::File::create(output_dir.path().join("stdout")).expect("stdout file"))
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .expect("node must be installed (Node 20)");
    let deadline = Instant::now() + Duration::from_secs(NODE_SUITE_LIMIT_SECS);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for node") {
            break status;
        }
        if Instant::now() > deadline {
            // SAFETY: kill(2) on the process group made for the child above.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            panic!("the {what} tests took over {NODE_SUITE_LIMIT_SECS} s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = std::fs::read_to_string(output_dir.path().join("stdout")).unwrap_or_default();
    println!("{stdout}");
    assert!(status.success(), "{what} tests failed:\n{stdout}");
    assert!(
        stdout.contains("ℹ fail 0"),
        "expected no failing {what} tests:\n{stdout}"
    );
    stdout
}
