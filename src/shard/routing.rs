//! Cluster mode: every request for a session runs on the leader of the session's shard.
//!
//! The router asks consensus who leads the shard. This node: the request runs here, but only
//! while this node holds its leadership lease (no quorum heard within it: a read-index barrier
//! first, which a cut-off leader fails), so whatever it answers from its own state — a read, a
//! listing's overlay, a read cursor that did not move, a duplicate — reflects every write
//! acknowledged anywhere before the request started.
//! Another node: the request goes there over the peer connection as a `ShardCall` and its answer
//! comes back; the client's connection stays where it is. No leader (an election, or this node is
//! cut off): the router waits a little for one, then answers `NoLeader` (503 `no_leader`).
//!
//! A request is sent again only when it surely did not run (the leader refused it as not leading,
//! or it never reached the peer) or when it only reads. A write whose outcome is unknown (the
//! peer went silent after it was sent) is answered `NoLeader` with an "outcome unknown" sentence:
//! the client retries it with its `client_id`, which the new leader deduplicates.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{AppendRequest, AppendResult, MessagePage, ShardError, Shards};
use crate::consensus::{Consensus, PeerError};
use crate::model::{MessageRecord, SessionRecord, SessionView};

/// How long a forwarded request may take (longer than a proposal's own timeout, so the leader
/// answers first when it can).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(6);

/// What the router needs of the cluster.
pub struct ClusterRouting {
    pub consensus: Arc<Consensus>,
    /// How long a request waits for its shard to have a leader before `no_leader`.
    pub leader_patience: Duration,
}

/// One request for a session's shard, as it travels to the shard's leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ShardCall {
    Create {
        session: SessionRecord,
    },
    View {
        session_id: String,
    },
    ArchiveSession {
        session_id: String,
    },
    Append {
        request: AppendRequest,
    },
    /// A socket's sends, to be queued at the writer in this order (`forward_lane`).
    AppendMany {
        requests: Vec<AppendRequest>,
    },
    MoveReadCursor {
        session_id: String,
        user_id: String,
        read_seq: u64,
    },
    ReadMessages {
        session_id: String,
        after_seq: u64,
        limit: usize,
    },
    Overlay {
        shard: u16,
        views: Vec<SessionView>,
    },
    FinishDispatch {
        session_id: String,
        dispatch_id: String,
        through_seq: u64,
        error: Option<String>,
        cancelled: bool,
        #[serde(default)]
        leader_term: Option<u64>,
    },
    CancelOwedTurn {
        session_id: String,
        dispatch_id: String,
        through_seq: u64,
    },
    StartDispatch {
        session_id: String,
        turn: crate::model::OpenTurn,
        leader_term: Option<u64>,
    },
    /// A part of a copy of the shard's state (`super::copy_transfer`): a new copy when
    /// `copy_id` is `None`.
    CopyPart {
        shard: u16,
        copy_id: Option<u64>,
        offset: u64,
    },
}

/// What a forwarded listing overlay may carry (its views travel there and back): a listing's
/// views for one shard are sent in parts of at most this many bytes, so neither the request nor
/// the answer ever nears the peer answer limit, whatever the sessions' metadata weighs.
const MAX_OVERLAY_PART_BYTES: usize = 2 * 1024 * 1024;

/// A view's weight on the wire, over-estimated: its metadata (the only unbounded part, up to a
/// request body) and its preview, plus the bounded fields.
fn view_bytes(view: &SessionView) -> usize {
    let preview = view.last_activity.preview.as_ref().map_or(0, String::len);
    view.record.metadata.get().len() + preview + 1024
}

/// `views` in consecutive parts of at most `MAX_OVERLAY_PART_BYTES` each (a view heavier than
/// that travels alone).
pub(super) fn overlay_parts(views: Vec<SessionView>) -> Vec<Vec<SessionView>> {
    let mut parts: Vec<Vec<SessionView>> = Vec::new();
    let mut part_bytes = 0;
    for view in views {
        let bytes = view_bytes(&view);
        match parts.last_mut() {
            Some(part) if part_bytes + bytes <= MAX_OVERLAY_PART_BYTES => {
                part_bytes += bytes;
                part.push(view);
            }
            _ => {
                part_bytes = bytes;
                parts.push(vec![view]);
            }
        }
    }
    parts
}

/// The leader's answer to a `ShardCall`.
#[derive(Debug, Serialize, Deserialize)]
pub enum ShardAnswer {
    View(SessionView),
    Appended {
        record: MessageRecord,
        deduplicated: bool,
    },
    Page {
        messages: Vec<MessageRecord>,
        has_more: bool,
        session: SessionView,
    },
    Views(Vec<SessionView>),
    Done,
    Flag(bool),
    /// Each append of an `AppendMany`, in its order.
    AppendedMany(Vec<Result<(MessageRecord, bool), ShardError>>),
    /// The session's open turn (`StartDispatch`).
    Turn(Option<crate::model::OpenTurn>),
    CopyPart(super::copy_transfer::CopyPart),
}

impl ShardCall {
    fn shard(&self, shards: &Shards) -> u16 {
        match self {
            ShardCall::Create { session } => shards.shard_of(&session.id),
            ShardCall::Append { request } => shards.shard_of(&request.session_id),
            ShardCall::AppendMany { requests } => requests.first().map_or(0, |r| shards.shard_of(&r.session_id)),
            ShardCall::Overlay { shard, .. } | ShardCall::CopyPart { shard, .. } => *shard,
            ShardCall::View { session_id }
            | ShardCall::ArchiveSession { session_id }
            | ShardCall::MoveReadCursor { session_id, .. }
            | ShardCall::ReadMessages { session_id, .. }
            | ShardCall::FinishDispatch { session_id, .. }
            | ShardCall::CancelOwedTurn { session_id, .. }
            | ShardCall::StartDispatch { session_id, .. } => shards.shard_of(session_id),
        }
    }

    /// Reads change nothing: they may be sent again whatever happened to an earlier attempt.
    fn is_read(&self) -> bool {
        matches!(
            self,
            ShardCall::View { .. }
                | ShardCall::ReadMessages { .. }
                | ShardCall::Overlay { .. }
                | ShardCall::CopyPart { .. }
        )
    }
}

/// An answer that crosses the peer connection: the error's archive detail stays on the leader.
pub(crate) fn for_the_wire<T>(result: Result<T, ShardError>) -> Result<T, ShardError> {
    result.map_err(|error| match error {
        ShardError::Archive(detail) => {
            tracing::warn!(%detail, "archive error serving a forwarded request");
            ShardError::Unavailable("the archive is unavailable; try again shortly".into())
        }
        other => other,
    })
}

fn unexpected() -> ShardError {
    ShardError::Unavailable("the leader answered the wrong kind of reply".into())
}

impl ShardAnswer {
    pub fn view(self) -> Result<SessionView, ShardError> {
        match self {
            ShardAnswer::View(view) => Ok(view),
            _ => Err(unexpected()),
        }
    }

    pub fn appended(self) -> Result<AppendResult, ShardError> {
        match self {
            ShardAnswer::Appended { record, deduplicated } => Ok(AppendResult {
                record: Arc::new(record),
                deduplicated,
            }),
            _ => Err(unexpected()),
        }
    }

    /// The answers of an `AppendMany` of `count` appends (each the batch's error if the answer
    /// is of the wrong kind or length).
    pub fn appended_many(self, count: usize) -> Vec<Result<AppendResult, ShardError>> {
        match self {
            ShardAnswer::AppendedMany(answers) if answers.len() == count => answers
                .into_iter()
                .map(|answer| {
                    answer.map(|(record, deduplicated)| AppendResult {
                        record: Arc::new(record),
                        deduplicated,
                    })
                })
                .collect(),
            _ => (0..count).map(|_| Err(unexpected())).collect(),
        }
    }

    pub fn page(self) -> Result<MessagePage, ShardError> {
        match self {
            ShardAnswer::Page {
                messages,
                has_more,
                session,
            } => Ok(MessagePage {
                messages: messages.into_iter().map(Arc::new).collect(),
                has_more,
                session,
            }),
            _ => Err(unexpected()),
        }
    }

    pub fn views(self) -> Result<Vec<SessionView>, ShardError> {
        match self {
            ShardAnswer::Views(views) => Ok(views),
            _ => Err(unexpected()),
        }
    }

    pub fn turn(self) -> Result<Option<crate::model::OpenTurn>, ShardError> {
        match self {
            ShardAnswer::Turn(turn) => Ok(turn),
            _ => Err(unexpected()),
        }
    }

    pub fn flag(self) -> Result<bool, ShardError> {
        match self {
            ShardAnswer::Flag(flag) => Ok(flag),
            ShardAnswer::Done => Ok(true),
            _ => Err(unexpected()),
        }
    }
}

impl Shards {
    /// Runs `call` on the leader of its shard (here or on a peer), waiting a little for one.
    pub(super) async fn routed(&self, call: ShardCall) -> Result<ShardAnswer, ShardError> {
        let cluster = self.inner.cluster.as_ref().expect("routed calls are for cluster mode");
        let shard = call.shard(self);
        let deadline = Instant::now() + cluster.leader_patience;
        let mut pause = Duration::from_millis(10);
        loop {
            let outcome = match cluster.consensus.leader(shard) {
                Some(leader) if leader == cluster.consensus.node_id() => self.serve_call(call.clone()).await,
                Some(leader) => self.forward(cluster, leader, &call).await,
                None => Err(ShardError::NotLeader { leader: None }),
            };
            match outcome {
                Err(ShardError::NotLeader { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                Err(ShardError::NotLeader { .. }) => {
                    metrics::counter!("fleetlm_cluster_no_leader_total").increment(1);
                    return Err(ShardError::NoLeader(
                        "the session's shard has no leader right now (an election is under way, or this node cannot reach a majority); retry shortly".into(),
                    ));
                }
                other => return other,
            }
        }
    }

    /// Runs a call here, as the shard's leader (`NotLeader` if this node does not lead it).
    /// Every call first makes sure this node still leads: its lease holds (no round trip), or a
    /// quorum confirms it now. Reads, listings' overlays and the answers a writer gives from its
    /// state without writing (a cursor already there, a duplicate) are thus linearizable.
    pub async fn serve_call(&self, call: ShardCall) -> Result<ShardAnswer, ShardError> {
        let cluster = self.inner.cluster.as_ref().expect("served calls are for cluster mode");
        let shard = call.shard(self);
        if !cluster.consensus.is_leader(shard) {
            return Err(ShardError::NotLeader {
                leader: cluster.consensus.leader(shard),
            });
        }
        {
            use crate::consensus::ProposeError;
            match cluster.consensus.confirm_lease(shard).await {
                Ok(()) => {}
                Err(ProposeError::NotLeader { leader }) => return Err(ShardError::NotLeader { leader }),
                Err(ProposeError::Unknown(_)) => return Err(ShardError::NotLeader { leader: None }),
                Err(other) => return Err(ShardError::from_propose(other)),
            }
        }
        let result = match call {
            ShardCall::Create { session } => self.create_session_here(session).await.map(ShardAnswer::View),
            ShardCall::CopyPart { shard, copy_id, offset } => self.copy_part_here(shard, copy_id, offset).await,
            ShardCall::View { session_id } => self.view_here(&session_id).await.map(ShardAnswer::View),
            ShardCall::ArchiveSession { session_id } => {
                self.archive_session_here(&session_id).await.map(ShardAnswer::View)
            }
            ShardCall::Append { request } => match self.submit_append_here(request).await {
                Ok(pending) => pending.await.map(|result| ShardAnswer::Appended {
                    record: Arc::unwrap_or_clone(result.record),
                    deduplicated: result.deduplicated,
                }),
                Err(error) => Err(error),
            },
            ShardCall::AppendMany { requests } => {
                // Queued at the writer in the batch's order before any answer is awaited.
                let mut order = super::AppendOrder::default();
                let mut pending = Vec::with_capacity(requests.len());
                for request in requests {
                    pending.push(self.submit_append_in_order(&mut order, request).await);
                }
                let answers = futures_util::future::join_all(pending).await;
                Ok(ShardAnswer::AppendedMany(
                    answers
                        .into_iter()
                        .map(|answer| {
                            for_the_wire(answer)
                                .map(|result| (Arc::unwrap_or_clone(result.record), result.deduplicated))
                        })
                        .collect(),
                ))
            }
            ShardCall::MoveReadCursor {
                session_id,
                user_id,
                read_seq,
            } => self
                .move_read_cursor_here(&session_id, &user_id, read_seq)
                .await
                .map(ShardAnswer::View),
            ShardCall::ReadMessages {
                session_id,
                after_seq,
                limit,
            } => self
                .read_messages_here(&session_id, after_seq, limit)
                .await
                .map(|page| ShardAnswer::Page {
                    messages: page.messages.into_iter().map(Arc::unwrap_or_clone).collect(),
                    has_more: page.has_more,
                    session: page.session,
                }),
            ShardCall::Overlay { shard, views } => Ok(ShardAnswer::Views(self.overlay_here(shard, views).await)),
            ShardCall::FinishDispatch {
                session_id,
                dispatch_id,
                through_seq,
                error,
                cancelled,
                leader_term,
            } => self
                .finish_dispatch_here(&session_id, &dispatch_id, through_seq, error, cancelled, leader_term)
                .await
                .map(|()| ShardAnswer::Done),
            ShardCall::CancelOwedTurn {
                session_id,
                dispatch_id,
                through_seq,
            } => self
                .cancel_owed_turn_here(&session_id, &dispatch_id, through_seq)
                .await
                .map(ShardAnswer::Flag),
            ShardCall::StartDispatch {
                session_id,
                turn,
                leader_term,
            } => self
                .start_dispatch_here(&session_id, turn, leader_term)
                .await
                .map(ShardAnswer::Turn),
        };
        for_the_wire(result)
    }

    async fn forward(
        &self,
        cluster: &ClusterRouting,
        leader: u64,
        call: &ShardCall,
    ) -> Result<ShardAnswer, ShardError> {
        metrics::counter!("fleetlm_cluster_forwarded_total").increment(1);
        let request = super::wire::encode_shard_call(call);
        match cluster.consensus.call(leader, request, FORWARD_TIMEOUT).await {
            Ok(answer) => super::wire::decode_shard_answer(&answer),
            Err(error @ PeerError::AnswerTooLarge(..)) => {
                // It ran, and asking again would get the same answer: fail this request alone.
                // (Pages and batches are bounded well below the limit, so this is a bug.)
                tracing::error!(leader, %error, "a forwarded call's answer is over the peer answer limit");
                Err(ShardError::Unavailable(
                    "the shard's leader could not send its answer to this node (too large)".into(),
                ))
            }
            Err(error) if error.surely_not_delivered() || call.is_read() => {
                tracing::debug!(leader, %error, "forwarding failed; trying again");
                Err(ShardError::NotLeader { leader: None })
            }
            Err(error) => {
                tracing::warn!(leader, %error, "a forwarded write's outcome is unknown");
                Err(ShardError::NoLeader(
                    "the shard's leader stopped answering while the write was in flight; its outcome is unknown: retry it (with the same client_id)".into(),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LastActivity, Message, ReadCursor, SessionStatus, Timestamp};
    use serde_json::value::RawValue;

    /// The largest content a message may have (`max_message_bytes` is at most 1 MiB).
    const LARGEST_MESSAGE: usize = 1024 * 1024;

    fn record(seq: u64, content_bytes: usize) -> Arc<MessageRecord> {
        // Every character escaped in the client's JSON: the stored text is what travels.
        let text = "\\n".repeat(content_bytes / 2 - 1);
        Arc::new(MessageRecord {
            message: Message {
                id: format!("msg_{seq:026}"),
                session_id: Arc::from("s".repeat(255)),
                seq,
                sender_id: "u".repeat(255),
                kind: "k".repeat(64),
                content: RawValue::from_string(format!("\"{text}\"")).unwrap(),
                metadata: RawValue::from_string("{}".into()).unwrap(),
                inserted_at: Timestamp(0),
            },
            client_id: Some("c".repeat(128)),
            fingerprint: u64::MAX,
            nonuser_through: u64::MAX,
            from_user: true,
        })
    }

    fn view(metadata_bytes: usize) -> SessionView {
        SessionView {
            record: SessionRecord {
                id: Arc::from("s"),
                user_id: "u".into(),
                agent_id: "a".into(),
                metadata: RawValue::from_string(format!("{{\"m\":\"{}\"}}", "x".repeat(metadata_bytes))).unwrap(),
                inserted_at: Timestamp(0),
            },
            status: SessionStatus::Active,
            last_seq: 0,
            nonuser_count: 0,
            read_cursor: ReadCursor::default(),
            last_activity: LastActivity::default(),
            updated_at: Timestamp(0),
            dispatch: Default::default(),
        }
    }

    /// The bytes a page takes in a forwarded answer (JSON, as `cluster` sends it).
    fn wire_bytes(page: Vec<Arc<MessageRecord>>) -> usize {
        let answer: Result<ShardAnswer, ShardError> = Ok(ShardAnswer::Page {
            messages: page.into_iter().map(Arc::unwrap_or_clone).collect(),
            has_more: true,
            session: view(0),
        });
        serde_json::to_vec(&answer).unwrap().len()
    }

    /// The largest history page the leader makes (of the largest messages, or of `limit` tiny
    /// ones with every field at its longest) travels back in one peer answer with room to spare.
    #[test]
    fn the_largest_history_page_fits_one_peer_answer() {
        use crate::shard::page_budget::{MAX_PAGE_BYTES, PageBudget};
        let margin = 1024 * 1024;
        for content_bytes in [LARGEST_MESSAGE, LARGEST_MESSAGE / 2 + 1, 200 * 1024, 16] {
            let mut budget = PageBudget::new(MAX_PAGE_BYTES);
            let mut page = Vec::new();
            budget.take((1..=1000).map(|seq| record(seq, content_bytes)), &mut page);
            let bytes = wire_bytes(page);
            assert!(
                bytes + margin <= crate::consensus::MAX_ANSWER_BYTES,
                "a page of {content_bytes}-byte messages takes {bytes} bytes"
            );
        }
    }

    #[test]
    fn a_listing_overlay_travels_in_parts_bounded_in_bytes() {
        let views: Vec<SessionView> = (0..500).map(|_| view(100 * 1024)).collect();
        let parts = overlay_parts(views);
        assert!(parts.len() > 1);
        assert_eq!(
            parts.iter().map(Vec::len).sum::<usize>(),
            500,
            "every view, once, in order"
        );
        for part in &parts {
            let bytes = serde_json::to_vec(part).unwrap().len();
            assert!(bytes <= MAX_OVERLAY_PART_BYTES, "{bytes}");
        }
        // One view heavier than a part travels alone; small ones share a part.
        let parts = overlay_parts(vec![view(10), view(3 * 1024 * 1024), view(10), view(10)]);
        assert_eq!(parts.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 1, 2]);
    }
}
