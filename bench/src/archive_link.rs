//! A TCP link from one node to the archive (Postgres) that the scenario can cut: while cut,
//! every connection through it is closed and new ones are closed at once (the archive is down
//! for that node); restored, it forwards again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct ArchiveLink {
    pub port: u16,
    cut: Arc<AtomicBool>,
    /// Bumped at each cut: open connections watch it and close.
    cuts: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl ArchiveLink {
    pub async fn start(target: String) -> anyhow::Result<ArchiveLink> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let cut = Arc::new(AtomicBool::new(false));
        let (cuts, _) = watch::channel(0u64);
        let task = {
            let (cut, cuts) = (cut.clone(), cuts.clone());
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if cut.load(Ordering::Acquire) {
                        drop(inbound);
                        continue;
                    }
                    let target = target.clone();
                    let mut cut_seen = cuts.subscribe();
                    tokio::spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(&target).await else {
                            return;
                        };
                        tokio::select! {
                            _ = copy_bidirectional(&mut inbound, &mut outbound) => {}
                            _ = cut_seen.changed() => {}
                        }
                    });
                }
            })
        };
        Ok(ArchiveLink { port, cut, cuts, task })
    }

    /// Closes every connection through the link and refuses new ones until `restore`.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Release);
        self.cuts.send_modify(|n| *n += 1);
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::Release);
    }
}

impl Drop for ArchiveLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `url` with its host and port replaced by 127.0.0.1:`port`, and the original `host:port`.
pub fn through_port(url: &str, port: u16) -> anyhow::Result<(String, String)> {
    let parsed = url::Url::parse(url)?;
    let host = parsed.host_str().unwrap_or("127.0.0.1").to_string();
    let target = format!("{host}:{}", parsed.port().unwrap_or(5432));
    let mut rewritten = parsed.clone();
    rewritten
        .set_host(Some("127.0.0.1"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    rewritten
        .set_port(Some(port))
        .map_err(|_| anyhow::anyhow!("cannot set the port"))?;
    Ok((rewritten.to_string(), target))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_url_goes_through_the_link() {
        let (url, target) = super::through_port("postgres://postgres@127.0.0.1:5432/db_x", 40001).unwrap();
        assert_eq!(url, "postgres://postgres@127.0.0.1:40001/db_x");
        assert_eq!(target, "127.0.0.1:5432");
    }
}
