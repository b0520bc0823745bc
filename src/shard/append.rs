//! Appends: the request as the edge hands it to a shard, the writer's answers, and the
//! router's append path — submitted alone or in a caller's order (`AppendOrder`), settled by
//! loading the session or checking the archive where the writer sends it back.

use std::sync::Arc;

use serde_json::value::RawValue;
use tokio::sync::oneshot;

use super::order::{OrderLink, Ordered, Placement, PlacementCell, PlacementHandle};
use super::writer::Command;
use super::{AppendOrder, MAX_ROUNDS, ShardError, Shards, routing, writer_restarted, writer_stopped};
use crate::archive::ArchiveError;
use crate::model::MessageRecord;

/// A validated append, as the edge hands it to the shard.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AppendRequest {
    pub session_id: String,
    pub sender_id: String,
    pub sender_is_user: bool,
    pub kind: String,
    pub content: Box<RawValue>,
    pub metadata: Box<RawValue>,
    pub client_id: Option<String>,
    pub expected_seq: Option<u64>,
    pub fingerprint: u64,
    /// The archive was searched for `client_id` among messages below this seq.
    pub archive_checked_below: Option<u64>,
    /// Cluster: store it only if the shard's leader is still the one of this term (an agent's
    /// reply, dispatched by that leader); refused `Superseded` otherwise.
    #[serde(default)]
    pub leader_term: Option<u64>,
}

impl AppendRequest {
    /// Roughly what it weighs on the wire (content, metadata, ids).
    pub(super) fn approximate_bytes(&self) -> usize {
        self.content.get().len() + self.metadata.get().len() + self.session_id.len() + self.sender_id.len() + 128
    }
}

pub enum AppendOutcome {
    Appended(Arc<MessageRecord>),
    /// Same `client_id`, same body: the original message at `seq`.
    Duplicate {
        seq: u64,
    },
    /// The writer does not hold the session: load it and send the request again.
    NotLoaded(Box<AppendRequest>),
    /// Client ids of messages below `below` are only in the archive: look there, then retry.
    CheckClientIdInArchive {
        below: u64,
        request: Box<AppendRequest>,
    },
    /// The append before this one in its ordered stream was sent back for a round trip and is
    /// not placed yet: send this one again once it is (storing it now would overtake it).
    Behind(Box<AppendRequest>),
}

impl AppendOutcome {
    /// Whether the writer sent the request back instead of answering it.
    pub(super) fn is_bounce(&self) -> bool {
        matches!(
            self,
            AppendOutcome::NotLoaded(_) | AppendOutcome::CheckClientIdInArchive { .. } | AppendOutcome::Behind(_)
        )
    }
}

pub struct AppendResult {
    pub record: Arc<MessageRecord>,
    pub deduplicated: bool,
}

/// The outcome of a submitted append, resolved once it is durable or refused.
pub type PendingAppend = std::pin::Pin<Box<dyn std::future::Future<Output = Result<AppendResult, ShardError>> + Send>>;

impl Shards {
    /// Appends and waits until the message is durable (or refused).
    pub async fn append(&self, request: AppendRequest) -> Result<AppendResult, ShardError> {
        self.submit_append(request).await?.await
    }

    /// Queues the append at its shard and returns the future of its outcome. Appends submitted
    /// one after another by the same caller are assigned seqs in that order, so a socket can
    /// keep many sends in flight and still have them stored in the order it sent them.
    pub async fn submit_append(&self, request: AppendRequest) -> Result<PendingAppend, ShardError> {
        if self.clustered() {
            let shards = self.clone();
            return Ok(Box::pin(async move {
                shards.routed(routing::ShardCall::Append { request }).await?.appended()
            }));
        }
        self.submit_append_here(request).await
    }

    pub(super) async fn submit_append_here(&self, request: AppendRequest) -> Result<PendingAppend, ShardError> {
        let session_id = request.session_id.clone();
        let shard = self.shard_of(&session_id);
        let (reply, answer) = oneshot::channel();
        let command = Command::Append {
            request: Box::new(request),
            order: None,
            reply,
        };
        self.inner.senders[shard as usize]
            .send(command)
            .await
            .map_err(|_| writer_stopped())?;
        let shards = self.clone();
        Ok(Box::pin(async move {
            let outcome = answer.await.map_err(|_| writer_restarted())??;
            shards.settle_append(&session_id, shard, outcome, None).await
        }))
    }

    /// Like [`Shards::submit_append`], for one of a stream of appends that must be stored in
    /// the order submitted (see [`AppendOrder`]). When the append before it is already in its
    /// shard's queue (or placed), this one is queued now, before this returns, as
    /// `submit_append` does; otherwise it is handed to its shard by the returned future (when
    /// polled) once the one before may no longer land after it.
    pub async fn submit_append_in_order(&self, order: &mut AppendOrder, request: AppendRequest) -> PendingAppend {
        let has_client_id = request.client_id.is_some();
        let cell = Arc::new(PlacementCell::default());
        let previous = order.last.replace(OrderLink {
            cell: cell.clone(),
            has_client_id,
        });
        let placement = PlacementHandle(cell);
        // A placed predecessor can no longer be overtaken: nothing to wait for, ever.
        let previous = previous.filter(|p| p.cell.get() != Placement::Placed);
        if let Some(cluster) = &self.inner.cluster
            && !cluster.consensus.is_leader(self.shard_of(&request.session_id))
        {
            // Another node leads: the stream goes there in batches, in order (`forward_lane`).
            // Where this node leads, the stream is pipelined into the local writer as on a
            // single node; a writer that is not writing (yet, or any more) answers `NotLeader`
            // with nothing stored, and the client resends (`no_leader`).
            let lane = order.lane.get_or_insert_with(Default::default).clone();
            let answered = lane.submit(self, request, previous, placement);
            return Box::pin(async move { answered.await.map_err(|_| writer_stopped())? });
        }
        let session_id = request.session_id.clone();
        let shard = self.shard_of(&session_id);
        let shards = self.clone();
        let clear_now = previous
            .as_ref()
            .is_none_or(|p| p.lets_through(p.cell.get(), has_client_id));
        if clear_now {
            // The common case. The one before cannot change state meanwhile, except that its
            // writer may mark it bounced, which this one's writer then sees (`OrderTicket`).
            let (reply, answer) = oneshot::channel();
            let order = Ordered { placement, previous };
            // Submitted before it is queued: the writer may mark it bounced at once.
            order.placement.set(Placement::Submitted);
            let command = Command::Append {
                request: Box::new(request),
                order: Some(order.ticket()),
                reply,
            };
            if self.inner.senders[shard as usize].send(command).await.is_err() {
                return Box::pin(std::future::ready(Err(writer_stopped())));
            }
            return Box::pin(async move {
                let outcome = answer.await.map_err(|_| writer_restarted())??;
                shards.settle_append(&session_id, shard, outcome, Some(order)).await
            });
        }
        Box::pin(async move {
            if let Some(previous) = previous.as_ref() {
                previous
                    .cell
                    .wait_until(|p| previous.lets_through(p, has_client_id))
                    .await;
            }
            let (reply, answer) = oneshot::channel();
            let order = Ordered { placement, previous };
            order.placement.set(Placement::Submitted);
            let command = Command::Append {
                request: Box::new(request),
                order: Some(order.ticket()),
                reply,
            };
            shards.inner.senders[shard as usize]
                .send(command)
                .await
                .map_err(|_| writer_stopped())?;
            let outcome = answer.await.map_err(|_| writer_restarted())??;
            shards.settle_append(&session_id, shard, outcome, Some(order)).await
        })
    }

    /// Turns the writer's answer into a result, loading the session or checking the archive and
    /// asking again where the writer needs that first.
    async fn settle_append(
        &self,
        session_id: &str,
        shard: u16,
        mut outcome: AppendOutcome,
        mut order: Option<Ordered>,
    ) -> Result<AppendResult, ShardError> {
        for _ in 0..MAX_ROUNDS {
            if let Some(order) = order.as_mut() {
                order.on_answer(&outcome).await;
            }
            let request = match outcome {
                AppendOutcome::Appended(record) => {
                    return Ok(AppendResult {
                        record,
                        deduplicated: false,
                    });
                }
                AppendOutcome::Duplicate { seq } => {
                    // Known from memory; its body is read back (from the archive only when it
                    // is older than the hot tail and the WAL): nothing is stored twice either way.
                    let record = self.read_one(session_id, seq).await.map_err(|error| {
                        tracing::debug!(session_id, seq, %error, "a deduplicated message could not be read back");
                        ShardError::Unavailable(
                            "the message this client_id was first sent with cannot be read now; retry later".into(),
                        )
                    })?;
                    return Ok(AppendResult {
                        record,
                        deduplicated: true,
                    });
                }
                AppendOutcome::NotLoaded(returned) => {
                    if self.load(shard, session_id).await?.is_none() {
                        return Err(ShardError::NotFound);
                    }
                    returned
                }
                AppendOutcome::CheckClientIdInArchive {
                    below,
                    request: mut returned,
                } => {
                    let client_id = returned.client_id.as_deref().unwrap_or_default();
                    match self.inner.archive.find_by_client_id(session_id, client_id).await {
                        Ok(Some(original)) => {
                            return if original.fingerprint == returned.fingerprint {
                                Ok(AppendResult {
                                    record: Arc::new(original),
                                    deduplicated: true,
                                })
                            } else {
                                Err(ShardError::ClientIdConflict)
                            };
                        }
                        Ok(None) => {}
                        Err(ArchiveError::Unavailable(error)) => {
                            // An archive outage only makes the archive lag: the client id is
                            // not among the session's newest `CLIENT_ID_WINDOW` nor unarchived,
                            // so it is taken as new (docs/API.md, "Idempotency").
                            metrics::counter!("fleetlm_client_id_unchecked_total").increment(1);
                            tracing::debug!(session_id, %error, "archive unreachable: an older client_id is taken as new");
                        }
                        Err(other) => return Err(other.into()),
                    }
                    returned.archive_checked_below = Some(below);
                    returned
                }
                // The one before is placed now (`on_answer` waited): just send it again.
                AppendOutcome::Behind(returned) => returned,
            };
            let ticket = order.as_ref().map(Ordered::ticket);
            outcome = self
                .call(shard, |reply| Command::Append {
                    request,
                    order: ticket,
                    reply,
                })
                .await?;
        }
        Err(ShardError::Unavailable("append could not be completed".into()))
    }
}
