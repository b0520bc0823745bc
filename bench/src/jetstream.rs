//! The "log engine users might pick instead" baseline: NATS JetStream, started by the bench on a
//! free port with `sync_interval: always` (every stored message fsync'd before its ack, the same
//! promise as FleetLM's). One subject per session, one connection per session, `depth`
//! publishes in flight on each; latency is publish → PubAck.
//!
//! `sync_interval` exists from nats-server 2.10; an older server refuses the configuration and
//! the bench says so rather than run a less durable baseline.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use hdrhistogram::Histogram;

use crate::wswrite::{WriteRun, WsWriteOptions};

/// A nats-server child process with JetStream in a temporary directory; killed on drop.
struct NatsServer {
    child: tokio::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    async fn start(binary: &Path) -> anyhow::Result<NatsServer> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let config = dir.path().join("nats.conf");
        let store = dir.path().join("jetstream");
        std::fs::write(
            &config,
            format!(
                "listen: \"127.0.0.1:{port}\"\njetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n",
                store.display()
            ),
        )?;
        let mut child = tokio::process::Command::new(binary)
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let url = format!("nats://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait()? {
                let mut stderr = String::new();
                if let Some(mut pipe) = child.stderr.take() {
                    use tokio::io::AsyncReadExt;
                    pipe.read_to_string(&mut stderr).await.ok();
                }
                bail!(
                    "{} exited ({status}) before listening; JetStream with `sync_interval: always` needs \
                     nats-server 2.10 or later (bench/install-nats.sh installs one):\n{stderr}",
                    binary.display()
                );
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!("{} did not listen on port {port} within 10 s", binary.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(NatsServer { child, url, _dir: dir })
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Publishes `options.sessions × options.depth` in flight for `options.seconds` (after 1 s of
/// warm-up) and reports PubAcks/s and publish → ack latency.
pub async fn drive(binary: &Path, options: &WsWriteOptions) -> anyhow::Result<WriteRun> {
    let server = NatsServer::start(binary).await?;
    let setup = jetstream::new(async_nats::connect(&server.url).await?);
    setup
        .create_stream(jetstream::stream::Config {
            name: "BENCH".into(),
            subjects: vec!["session.>".into()],
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .context("creating the JetStream stream")?;
    let payload = bytes::Bytes::from(format!(r#"{{"text":"{}"}}"#, "x".repeat(options.message_bytes)));
    let start = Instant::now();
    let (measure_from, stop_at) = (
        start + Duration::from_secs(1),
        start + Duration::from_secs(1 + options.seconds),
    );
    let mut tasks = Vec::new();
    for session in 0..options.sessions {
        let context = jetstream::new(async_nats::connect(&server.url).await?);
        let (payload, depth, subject) = (payload.clone(), options.depth, format!("session.s{session}"));
        tasks.push(tokio::spawn(async move {
            let mut latencies = Histogram::<u64>::new(3).expect("histogram");
            let mut in_flight = FuturesUnordered::new();
            loop {
                while Instant::now() < stop_at && in_flight.len() < depth {
                    let sent = Instant::now();
                    let ack = context.publish(subject.clone(), payload.clone()).await?;
                    in_flight.push(async move { (sent, ack.await) });
                }
                let Some((sent, ack)) = in_flight.next().await else {
                    break;
                };
                ack.context("JetStream refused a publish")?;
                if sent >= measure_from && sent < stop_at {
                    latencies.record(sent.elapsed().as_micros() as u64).ok();
                }
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Histogram::<u64>::new(3)?;
    for task in tasks {
        latencies.add(task.await??)?;
    }
    drop(server);
    Ok(WriteRun {
        acked_per_sec: latencies.len() as f64 / options.seconds as f64,
        latencies,
        errors: 0,
    })
}
