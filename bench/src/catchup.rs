//! Catch-up storm: C clients join one session with `last_seq = 0` at once and each receives the
//! replay. Run with the session hot (just written, in memory) and archived (the server restarted,
//! so it comes back from the archive on the first join).

use std::time::Instant;

use clap::Args;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::phx::PhxClient;
use crate::server::Target;

#[derive(Args, Clone)]
pub struct CatchUpOptions {
    /// Clients joining at once.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// Messages in the session (a join replays at most 100; clients page the rest over REST).
    #[arg(long, default_value_t = 200)]
    pub messages: usize,
}

struct Storm {
    all_joined_ms: f64,
    join_ms: Histogram<u64>,
}

async fn storm(base: &str, topic: &str, clients: usize) -> anyhow::Result<Storm> {
    let mut sockets = Vec::with_capacity(clients);
    for _ in 0..clients {
        sockets.push(PhxClient::connect(base, "user_id=bench-user").await?);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for mut socket in sockets {
        let topic = topic.to_string();
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let reply = socket.join(&topic, r#"{"last_seq":0}"#).await?;
            anyhow::ensure!(
                reply["messages"].as_array().is_some_and(|m| !m.is_empty()),
                "empty replay"
            );
            Ok::<_, anyhow::Error>((sent.elapsed(), socket))
        }));
    }
    let mut join_ms = Histogram::<u64>::new(3)?;
    let mut keep = Vec::new();
    for task in tasks {
        let (elapsed, socket) = task.await??;
        join_ms.record(elapsed.as_micros() as u64).ok();
        keep.push(socket);
    }
    Ok(Storm {
        all_joined_ms: started.elapsed().as_secs_f64() * 1000.0,
        join_ms,
    })
}

pub async fn catch_up(target: &mut Target, options: &CatchUpOptions) -> anyhow::Result<Value> {
    let client = reqwest::Client::new();
    target
        .register_agent(&client, "bench-agent", "http://127.0.0.1:9", json!({}))
        .await?;
    let session = format!("catchup-{}", std::process::id());
    target
        .create_session(&client, &session, "bench-user", "bench-agent")
        .await?;
    for n in 0..options.messages {
        let body = json!({"agent_id": "bench-agent", "content": {"text": format!("message {n}")}});
        let status = client
            .post(format!("{}/api/sessions/{session}/messages", target.base))
            .json(&body)
            .send()
            .await?
            .status();
        anyhow::ensure!(status == 200, "append failed: {status}");
    }
    let topic = format!("session:{session}");
    let hot = storm(&target.base, &topic, options.clients).await?;
    // Give the flusher time to archive everything, then restart so the session is cold (only a
    // server this tool started can be restarted; with --url the archived storm is left out).
    let cold = if target.is_own() {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        target.restart().await?;
        Some(storm(&target.base, &topic, options.clients).await?)
    } else {
        println!("catch-up: the archived storm needs a server this tool starts (no --url); skipped");
        None
    };
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "scenario                  catch-up ({} clients, {} messages, 100 per join)",
        options.clients, options.messages
    );
    println!("                          all joined ms   join p50 ms   join p99 ms");
    let mut runs = vec![("hot (in memory)", &hot)];
    if let Some(cold) = &cold {
        runs.push(("archived (after restart)", cold));
    }
    for (name, run) in runs {
        println!(
            "{name:<26}{:>13.1}   {:>11.2}   {:>11.2}",
            run.all_joined_ms,
            ms(&run.join_ms, 0.5),
            ms(&run.join_ms, 0.99)
        );
    }
    let report = |run: &Storm| {
        json!({"all_joined_ms": run.all_joined_ms,
        "join_ms": {"p50": ms(&run.join_ms, 0.5), "p99": ms(&run.join_ms, 0.99)}})
    };
    Ok(
        json!({"scenario": "catch-up", "clients": options.clients, "messages": options.messages,
        "hot": report(&hot), "archived": cold.as_ref().map(report)}),
    )
}
