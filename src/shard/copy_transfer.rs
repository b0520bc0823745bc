//! Cluster mode: moving a copy of a shard's state (`super::copy`) from its leader to a member
//! that asked for one (its writer's copy is not current).
//!
//! - **Leader** (`copy_part_here`): the writer takes the copy once its batches in flight have
//!   committed; it is encoded once and kept here for `EXPORT_KEPT`, served in parts of
//!   `PART_BYTES` (`ShardCall::CopyPart`), and dropped once its last part is sent.
//! - **Member** (`spawn_copy_service`): one task takes its writers' requests, fetches every part
//!   from the shard's leader (at most `CONCURRENT_FETCHES` shards at a time, each bounded by
//!   `FETCH_LIMIT`) and hands the decoded copy to the writer (`Command::CopyArrived`). A
//!   leadership change in the middle makes the next part unknown to the new leader: the fetch
//!   fails and the writer asks again later.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use tokio::sync::mpsc;

use super::copy::{MAX_COPY_BYTES, PART_BYTES, ShardCopy};
use super::routing::{ShardAnswer, ShardCall};
use super::writer::Command;
use super::{ShardError, Shards};

/// How long a leader keeps an encoded copy for the parts still to be fetched.
const EXPORT_KEPT: Duration = Duration::from_secs(60);
/// One whole fetch (every part) gives up after this.
const FETCH_LIMIT: Duration = Duration::from_secs(30);
/// Shards fetching a copy at once from this node (a restarted node asks for every shard).
const CONCURRENT_FETCHES: usize = 8;

/// Encoded copies this leader is serving, by shard (a new copy of a shard replaces the last).
#[derive(Default)]
pub(super) struct Exports {
    by_shard: Mutex<HashMap<u16, Export>>,
}

struct Export {
    id: u64,
    bytes: Arc<Vec<u8>>,
    made_at: Instant,
}

/// One part of an encoded copy, as it crosses the peer connection.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct CopyPart {
    pub copy_id: u64,
    pub total: u64,
    pub offset: u64,
    /// Base64 of the part's bytes.
    pub data: String,
}

impl Exports {
    fn get(&self, shard: u16, id: u64) -> Option<Arc<Vec<u8>>> {
        let mut exports = self.by_shard.lock().expect("exports lock");
        exports.retain(|_, export| export.made_at.elapsed() < EXPORT_KEPT);
        exports
            .get(&shard)
            .filter(|export| export.id == id)
            .map(|export| export.bytes.clone())
    }

    fn put(&self, shard: u16, bytes: Arc<Vec<u8>>) -> u64 {
        let id = rand::random::<u64>();
        let export = Export {
            id,
            bytes,
            made_at: Instant::now(),
        };
        self.by_shard.lock().expect("exports lock").insert(shard, export);
        id
    }

    fn done(&self, shard: u16, id: u64) {
        let mut exports = self.by_shard.lock().expect("exports lock");
        if exports.get(&shard).is_some_and(|export| export.id == id) {
            exports.remove(&shard);
        }
    }
}

impl Shards {
    /// The leader's side of `ShardCall::CopyPart`: a new copy (`copy_id` `None`), or the next
    /// part of one being fetched.
    pub(super) async fn copy_part_here(
        &self,
        shard: u16,
        copy_id: Option<u64>,
        offset: u64,
    ) -> Result<ShardAnswer, ShardError> {
        let exports = &self.inner.exports;
        let (copy_id, bytes) = match copy_id {
            Some(id) => match exports.get(shard, id) {
                Some(bytes) => (id, bytes),
                None => {
                    return Err(ShardError::Unavailable(
                        "that copy of the shard's state is no longer kept here; ask for a new one".into(),
                    ));
                }
            },
            None => {
                let copy = self.call(shard, |reply| Command::ExportCopy { reply }).await?;
                let bytes = tokio::task::spawn_blocking(move || copy.encode())
                    .await
                    .map_err(|e| ShardError::Unavailable(format!("encoding the shard's copy failed: {e}")))?;
                let bytes = Arc::new(bytes);
                (exports.put(shard, bytes.clone()), bytes)
            }
        };
        let total = bytes.len() as u64;
        let start = offset.min(total) as usize;
        let end = (start + PART_BYTES).min(bytes.len());
        if end == bytes.len() {
            exports.done(shard, copy_id);
        }
        Ok(ShardAnswer::CopyPart(CopyPart {
            copy_id,
            total,
            offset: start as u64,
            data: base64::engine::general_purpose::STANDARD.encode(&bytes[start..end]),
        }))
    }

    /// Fetches a copy of the shard's state from its leader, part by part.
    pub async fn fetch_copy(&self, shard: u16) -> Result<Box<ShardCopy>, String> {
        let mut bytes: Vec<u8> = Vec::new();
        let mut copy_id = None;
        loop {
            let call = ShardCall::CopyPart {
                shard,
                copy_id,
                offset: bytes.len() as u64,
            };
            let part = match self.routed(call).await.map_err(|e| e.to_string())? {
                ShardAnswer::CopyPart(part) => part,
                _ => return Err("the leader answered the wrong kind of reply".into()),
            };
            if part.total as usize > MAX_COPY_BYTES {
                return Err(format!("a copy of {} bytes is over the limit", part.total));
            }
            if copy_id.is_some_and(|id| id != part.copy_id) || part.offset != bytes.len() as u64 {
                return Err("the leader answered with another copy's part".into());
            }
            copy_id = Some(part.copy_id);
            let data = base64::engine::general_purpose::STANDARD
                .decode(part.data.as_bytes())
                .map_err(|e| format!("undecodable part: {e}"))?;
            if data.is_empty() && (bytes.len() as u64) < part.total {
                return Err("the leader sent an empty part".into());
            }
            bytes.extend_from_slice(&data);
            if bytes.len() as u64 >= part.total {
                break;
            }
        }
        let copy = tokio::task::spawn_blocking(move || ShardCopy::decode(&bytes))
            .await
            .map_err(|e| e.to_string())??;
        if copy.shard != shard {
            return Err(format!("asked for shard {shard}'s copy, got shard {}'s", copy.shard));
        }
        Ok(Box::new(copy))
    }
}

/// Serves this node's writers' requests for a copy of their shard's state (see the module doc).
pub fn spawn_copy_service(shards: Shards, mut requests: mpsc::UnboundedReceiver<u16>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_FETCHES));
    tokio::spawn(async move {
        while let Some(shard) = requests.recv().await {
            let (shards, permits) = (shards.clone(), permits.clone());
            tokio::spawn(async move {
                let Ok(_permit) = permits.acquire().await else { return };
                let copy = match tokio::time::timeout(FETCH_LIMIT, shards.fetch_copy(shard)).await {
                    Ok(copy) => copy,
                    Err(_) => Err(format!("fetching the copy took over {FETCH_LIMIT:?}")),
                };
                let _ = shards.inner.senders[shard as usize]
                    .send(Command::CopyArrived { copy })
                    .await;
            });
        }
    });
}
