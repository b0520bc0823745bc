//! The server under test: an external URL, or `fleetlm serve` started from the binary beside
//! this one on a free port with a temporary data directory (killed on drop).

use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{Context, bail};
use tokio::io::AsyncBufReadExt;

pub struct Target {
    pub base: String,
    child: Option<tokio::process::Child>,
    _data_dir: Option<tempfile::TempDir>,
    extra_args: String,
}

impl Target {
    pub fn external(base: String) -> Target {
        Target {
            base,
            child: None,
            _data_dir: None,
            extra_args: String::new(),
        }
    }

    pub async fn spawn(extra_args: &str) -> anyhow::Result<Target> {
        let data_dir = tempfile::tempdir()?;
        let (base, child) = start_server(data_dir.path(), extra_args).await?;
        Ok(Target {
            base,
            child: Some(child),
            _data_dir: Some(data_dir),
            extra_args: extra_args.to_string(),
        })
    }

    /// The process id of a server this tool started.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref()?.id()
    }

    /// Whether this tool started the server (and so can restart it).
    pub fn is_own(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the server (SIGKILL) and starts it again on the same data directory, so sessions
    /// must come back from the archive. Only for servers this tool started.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let (Some(child), Some(data_dir)) = (&mut self.child, &self._data_dir) else {
            bail!("cannot restart a server this tool did not start");
        };
        child.kill().await?;
        let (base, child) = start_server(data_dir.path(), &self.extra_args).await?;
        self.base = base;
        self.child = Some(child);
        Ok(())
    }

    /// Registers agent `id` calling `origin_url`; `extra` adds or overrides fields.
    pub async fn register_agent(
        &self,
        client: &reqwest::Client,
        id: &str,
        origin_url: &str,
        extra: serde_json::Value,
    ) -> anyhow::Result<()> {
        let mut agent = serde_json::json!({"id": id, "name": id, "origin_url": origin_url});
        for (key, value) in extra.as_object().into_iter().flatten() {
            agent[key] = value.clone();
        }
        let status = client
            .post(format!("{}/api/agents", self.base))
            .json(&serde_json::json!({ "agent": agent }))
            .send()
            .await?
            .status();
        anyhow::ensure!(
            status.is_success() || status.as_u16() == 422,
            "agent registration failed: {status}"
        );
        Ok(())
    }

    pub async fn create_session(
        &self,
        client: &reqwest::Client,
        id: &str,
        user_id: &str,
        agent_id: &str,
    ) -> anyhow::Result<()> {
        let body = serde_json::json!({"id": id, "user_id": user_id, "agent_id": agent_id});
        let status = client
            .post(format!("{}/api/sessions", self.base))
            .json(&body)
            .send()
            .await?
            .status();
        anyhow::ensure!(status.as_u16() == 201, "session create failed: {status}");
        Ok(())
    }

    /// Sum of a Prometheus counter or histogram series (all label sets) from `/metrics`.
    pub async fn metric(&self, client: &reqwest::Client, name: &str) -> anyhow::Result<f64> {
        let text = client
            .get(format!("{}/metrics", self.base))
            .send()
            .await?
            .text()
            .await?;
        Ok(text
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter(|line| line.split(['{', ' ']).next() == Some(name))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.start_kill();
        }
    }
}

async fn start_server(data_dir: &std::path::Path, extra_args: &str) -> anyhow::Result<(String, tokio::process::Child)> {
    let binary: PathBuf = std::env::current_exe()?.with_file_name("fleetlm");
    if !binary.exists() {
        bail!(
            "{} not found: build it with `cargo build --release` first",
            binary.display()
        );
    }
    let mut child = tokio::process::Command::new(&binary)
        .args(["serve", "--http-addr", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(extra_args.split_whitespace())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let stdout = child.stdout.take().context("server stdout")?;
    let mut line = String::new();
    tokio::io::BufReader::new(stdout).read_line(&mut line).await?;
    let address = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .with_context(|| format!("unexpected server output {line:?}"))?;
    Ok((format!("http://{address}"), child))
}
