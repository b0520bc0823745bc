//! Cluster mode: a socket's sends for a shard another node leads, forwarded in order without
//! waiting for each one's answer before sending the next.
//!
//! One batch per socket is in flight at a time; the sends that arrive meanwhile make up the next
//! batch. A batch travels as one `ShardCall::AppendMany`, and the leader queues its appends at the
//! shard's writer in the batch's order (`Shards::serve_call`), so a socket's sends keep their
//! order across the forward exactly as they do when its node leads: each batch is sent only
//! once the one before it was answered, and inside a batch the leader keeps the order.
//!
//! Each send still gets its own answer. When the leader changes under a batch, the appends it
//! had not taken answer `NotLeader` (the client resends them, `no_leader`); a batch that surely
//! never reached the leader goes to the new one, whole.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::order::{OrderLink, Placement, PlacementHandle};
use super::routing::ShardCall;
use super::{AppendRequest, AppendResult, ShardError, Shards};

/// Most appends one forwarded batch carries, and the most bytes of content (the batch must fit
/// one peer frame with room to spare; a larger send travels alone).
const MAX_BATCH_APPENDS: usize = 64;
const MAX_BATCH_BYTES: usize = 512 * 1024;

/// One socket's forwarded sends, waiting or in flight.
#[derive(Default)]
pub(super) struct ForwardLane {
    state: Mutex<LaneState>,
}

#[derive(Default)]
struct LaneState {
    waiting: VecDeque<LaneItem>,
    /// A task is sending this lane's batches.
    sending: bool,
}

struct LaneItem {
    request: AppendRequest,
    /// The append submitted before this one (by another path, e.g. while this node led).
    previous: Option<OrderLink>,
    placement: PlacementHandle,
    answer: oneshot::Sender<Result<AppendResult, ShardError>>,
}

impl ForwardLane {
    /// Queues a send; it is forwarded in order with the lane's others. Resolves with its answer.
    pub(super) fn submit(
        self: &Arc<Self>,
        shards: &Shards,
        request: AppendRequest,
        previous: Option<OrderLink>,
        placement: PlacementHandle,
    ) -> oneshot::Receiver<Result<AppendResult, ShardError>> {
        let (answer, answered) = oneshot::channel();
        let start = {
            let mut state = self.state.lock().expect("lane lock");
            state.waiting.push_back(LaneItem {
                request,
                previous,
                placement,
                answer,
            });
            !std::mem::replace(&mut state.sending, true)
        };
        if start {
            let (lane, shards) = (self.clone(), shards.clone());
            tokio::spawn(async move { lane.send_batches(shards).await });
        }
        answered
    }

    /// Sends the waiting appends, a batch at a time, until none wait.
    async fn send_batches(self: Arc<Self>, shards: Shards) {
        loop {
            let batch = {
                let mut state = self.state.lock().expect("lane lock");
                let batch = next_batch(&shards, &mut state.waiting);
                if batch.is_empty() {
                    state.sending = false;
                    return;
                }
                batch
            };
            // An append submitted before the lane's first (locally, while this node led) must
            // be placed before anything after it is sent.
            if let Some(previous) = batch.first().and_then(|item| item.previous.as_ref()) {
                previous.cell.wait_until(|p| p == Placement::Placed).await;
            }
            let answers = shards.forward_batch(&batch).await;
            for (item, answer) in batch.into_iter().zip(answers) {
                drop(item.placement);
                let _ = item.answer.send(answer);
            }
        }
    }
}

impl Shards {
    /// Sends one batch to its shard's leader and returns each append's answer. A batch the
    /// leader refused whole (its writer was not writing yet: nothing stored) is sent again, as a
    /// single forwarded call is, for as long as the router waits for a leader.
    async fn forward_batch(&self, batch: &[LaneItem]) -> Vec<Result<AppendResult, ShardError>> {
        let patience = self
            .inner
            .cluster
            .as_ref()
            .map(|c| c.leader_patience)
            .unwrap_or_default();
        let deadline = tokio::time::Instant::now() + patience;
        let mut pause = std::time::Duration::from_millis(10);
        loop {
            let requests: Vec<AppendRequest> = batch.iter().map(|item| item.request.clone()).collect();
            let answers = match self.routed(ShardCall::AppendMany { requests }).await {
                Ok(answer) => answer.appended_many(batch.len()),
                Err(error) => (0..batch.len()).map(|_| Err(error.clone())).collect(),
            };
            let refused_whole = answers
                .iter()
                .all(|answer| matches!(answer, Err(ShardError::NotLeader { .. })));
            if !refused_whole || tokio::time::Instant::now() >= deadline {
                return answers;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_millis(100));
        }
    }
}

/// The longest run of waiting appends for one shard, within the batch bounds (at least one).
fn next_batch(shards: &Shards, waiting: &mut VecDeque<LaneItem>) -> Vec<LaneItem> {
    let Some(first) = waiting.front() else {
        return Vec::new();
    };
    let shard = shards.shard_of(&first.request.session_id);
    let mut bytes = 0;
    let mut take = 0;
    for item in waiting.iter() {
        let size = item.request.approximate_bytes();
        if take == MAX_BATCH_APPENDS
            || shards.shard_of(&item.request.session_id) != shard
            || (take > 0 && bytes + size > MAX_BATCH_BYTES)
        {
            break;
        }
        bytes += size;
        take += 1;
    }
    waiting.drain(..take).collect()
}
