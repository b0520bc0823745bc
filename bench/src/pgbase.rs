//! The "traditional design" baseline: every append is one `INSERT` into Postgres that takes the
//! next per-session seq from a sessions row (row lock), committed synchronously — the design
//! FleetLM's WAL-first architecture argues against. Runs in a database of its own, dropped after.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use tokio_postgres::NoTls;

use crate::wswrite::{WriteRun, WsWriteOptions};

pub async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .context("connecting to Postgres")?;
    tokio::spawn(connection);
    Ok(client)
}

pub fn with_database(url: &str, name: &str) -> String {
    let (base, _) = url.rsplit_once('/').unwrap_or((url, ""));
    format!("{base}/{name}")
}

/// Runs the baseline with `options.sessions × options.depth` concurrent writers, capped at
/// `connections` connections (each writer keeps one request in flight on its own connection).
pub async fn drive(admin_url: &str, options: &WsWriteOptions, connections: usize) -> anyhow::Result<WriteRun> {
    let name = format!("fleetlm_bench_{}", std::process::id());
    let admin = connect(admin_url).await?;
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name}")).await?;
    admin.batch_execute(&format!("CREATE DATABASE {name}")).await?;
    let url = with_database(admin_url, &name);
    let result = run(&url, options, connections).await;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await?;
    result
}

async fn run(url: &str, options: &WsWriteOptions, connections: usize) -> anyhow::Result<WriteRun> {
    let setup = connect(url).await?;
    setup
        .batch_execute(
            "CREATE TABLE sessions (id TEXT PRIMARY KEY, last_seq BIGINT NOT NULL DEFAULT 0);
             CREATE TABLE messages (session_id TEXT NOT NULL, seq BIGINT NOT NULL, content TEXT NOT NULL,
                PRIMARY KEY (session_id, seq));",
        )
        .await?;
    for s in 0..options.sessions {
        setup
            .execute("INSERT INTO sessions (id) VALUES ($1)", &[&format!("s{s}")])
            .await?;
    }
    let content = Arc::new(format!(r#"{{"text":"{}"}}"#, "x".repeat(options.message_bytes)));
    let start = Instant::now();
    let (measure_from, stop_at) = (
        start + Duration::from_secs(1),
        start + Duration::from_secs(1 + options.seconds),
    );
    let writers = (options.sessions * options.depth).min(connections);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let client = connect(url).await?;
        let (session, content) = (format!("s{}", w % options.sessions), content.clone());
        tasks.push(tokio::spawn(async move {
            let statement = client
                .prepare(
                    "WITH next AS (UPDATE sessions SET last_seq = last_seq + 1 WHERE id = $1 RETURNING last_seq)
                     INSERT INTO messages (session_id, seq, content) SELECT $1, last_seq, $2 FROM next",
                )
                .await
                .expect("prepare");
            let mut latencies = Histogram::<u64>::new(3).expect("histogram");
            while Instant::now() < stop_at {
                let sent = Instant::now();
                if client.execute(&statement, &[&session, &*content]).await.is_err() {
                    break;
                }
                if sent >= measure_from {
                    latencies.record(sent.elapsed().as_micros() as u64).ok();
                }
            }
            latencies
        }));
    }
    let mut latencies = Histogram::<u64>::new(3)?;
    for task in tasks {
        latencies.add(task.await?)?;
    }
    Ok(WriteRun {
        acked_per_sec: latencies.len() as f64 / options.seconds as f64,
        latencies,
        errors: 0,
    })
}
