//! Wire compatibility: runs the unmodified `phoenix` npm client (tests/js) under Node against
//! real servers (open mode, and token mode for `authToken`).

mod support;

use std::process::Command;

use support::{Store, TestServer};

const SECRET: &str = "phoenix-js-test-secret";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_phoenix_npm_client_works_against_fleetlm() {
    let js_dir = support::js_dir_with("phoenix");
    let open = TestServer::start(Store::Sqlite).await;
    let token_server = TestServer::start_with(Store::Sqlite, |s| s.auth_secret = Some(SECRET.into())).await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + 600;
    let token = fleetlm::auth::mint(
        SECRET.as_bytes(),
        &fleetlm::auth::Claims {
            sub: "dave".into(),
            exp,
        },
    );
    let (base, token_base) = (open.base.clone(), token_server.base.clone());
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .args(["--test", "--test-reporter=spec"])
            .current_dir(js_dir)
            .env("FLEETLM_URL", base)
            .env("FLEETLM_TOKEN_URL", token_base)
            .env("FLEETLM_TOKEN", token)
            .output()
            .expect("node must be installed (Node 20)")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "phoenix client tests failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("pass 6"), "expected 6 passing client tests:\n{stdout}");
    open.stop().await;
    token_server.stop().await;
}
