//! Idle sockets: K sockets, each joined to its own session, then nothing. Reports the server's
//! resident memory per socket (RSS from `/metrics` before and after).

use std::time::Duration;

use clap::Args;
use serde_json::{Value, json};

use crate::phx::PhxClient;
use crate::server::Target;

#[derive(Args, Clone)]
pub struct IdleOptions {
    /// Sockets to open.
    #[arg(long, default_value_t = 10_000)]
    pub sockets: usize,
}

pub async fn idle_sockets(target: &Target, options: &IdleOptions) -> anyhow::Result<Value> {
    let client = reqwest::Client::new();
    target
        .register_agent(&client, "bench-agent", "http://127.0.0.1:9", json!({}))
        .await?;
    let run = std::process::id();
    for i in 0..options.sockets {
        target
            .create_session(&client, &format!("idle-{run}-{i}"), &format!("idle-{i}"), "bench-agent")
            .await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = target.metric(&client, "fleetlm_process_rss_bytes").await?;
    let mut sockets = Vec::with_capacity(options.sockets);
    for i in 0..options.sockets {
        let mut socket = PhxClient::connect(&target.base, &format!("user_id=idle-{i}")).await?;
        socket.join(&format!("session:idle-{run}-{i}"), "{}").await?;
        sockets.push(socket);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = target.metric(&client, "fleetlm_process_rss_bytes").await?;
    let per_socket = (rss_after - rss_before) / options.sockets as f64;
    println!("scenario                 idle-sockets");
    println!("joined sockets           {}", options.sockets);
    println!(
        "server RSS before/after  {:.1} / {:.1} MiB",
        rss_before / 1048576.0,
        rss_after / 1048576.0
    );
    println!("RSS per idle socket      {:.2} KiB", per_socket / 1024.0);
    drop(sockets);
    Ok(json!({
        "scenario": "idle-sockets",
        "sockets": options.sockets,
        "rss_before_bytes": rss_before,
        "rss_after_bytes": rss_after,
        "rss_per_socket_bytes": per_socket,
    }))
}
