//! Keeping one caller's appends in the order it submitted them (`AppendOrder`): each append's
//! placement (`Placement`, shared through a `PlacementCell`), the link to the one before it, and
//! the `OrderTicket` the writer checks. The router's ordered submission is in `append.rs`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use tokio::sync::Notify;

use super::{AppendOutcome, forward_lane};

/// An ordered append's link to its stream while it settles.
pub(super) struct Ordered {
    pub(super) placement: PlacementHandle,
    pub(super) previous: Option<OrderLink>,
}

impl Ordered {
    pub(super) fn ticket(&self) -> OrderTicket {
        OrderTicket {
            own: self.placement.0.clone(),
            after: self.previous.as_ref().map(|p| p.cell.clone()),
        }
    }

    /// Records the writer's answer; on a bounce, waits until the append before this one is
    /// placed, so this one's retry cannot overtake it.
    pub(super) async fn on_answer(&mut self, outcome: &AppendOutcome) {
        match outcome {
            AppendOutcome::Appended(_) | AppendOutcome::Duplicate { .. } => {
                self.placement.set(Placement::Placed);
            }
            AppendOutcome::NotLoaded(_) | AppendOutcome::CheckClientIdInArchive { .. } | AppendOutcome::Behind(_) => {
                self.placement.set(Placement::Bounced);
                if let Some(previous) = self.previous.as_ref() {
                    previous.cell.wait_until(|p| p == Placement::Placed).await;
                }
            }
        }
    }
}

/// Where one append of an ordered stream (a socket's sends) stands. An append whose
/// [`PlacementHandle`] is dropped counts as `Placed`: it has ended one way or another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Placement {
    /// Not handed to the writer yet.
    Waiting = 0,
    /// In the writer's queue, no answer handled yet.
    Submitted = 1,
    /// The writer sent it back for a round trip (load the session, look up the client id).
    Bounced = 2,
    /// Has its seq (or its final refusal): nothing sent later can be stored before it.
    Placed = 3,
}

/// One ordered append's placement, read by the append after it. Cheap on the hot path: an
/// atomic, and a wake-up only when the next append is actually waiting (rare: a round trip).
#[derive(Default)]
pub(super) struct PlacementCell {
    state: AtomicU8,
    /// Set by a waiter before it reads `state`, so `set` knows whether to wake anyone.
    watched: AtomicBool,
    changed: Notify,
}

impl PlacementCell {
    pub(super) fn get(&self) -> Placement {
        match self.state.load(Ordering::SeqCst) {
            0 => Placement::Waiting,
            1 => Placement::Submitted,
            2 => Placement::Bounced,
            _ => Placement::Placed,
        }
    }

    fn set(&self, placement: Placement) {
        self.state.store(placement as u8, Ordering::SeqCst);
        // Both sides use SeqCst: either this sees `watched`, or the waiter sees the new state.
        if self.watched.load(Ordering::SeqCst) {
            self.changed.notify_waiters();
        }
    }

    /// `Bounced`, unless it is placed already (its future ended: nothing will place it again).
    fn bounce(&self) {
        let changed = self
            .state
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |state| {
                (state != Placement::Placed as u8).then_some(Placement::Bounced as u8)
            })
            .is_ok();
        if changed && self.watched.load(Ordering::SeqCst) {
            self.changed.notify_waiters();
        }
    }

    pub(super) async fn wait_until(&self, done: impl Fn(Placement) -> bool) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.watched.store(true, Ordering::SeqCst);
            if done(self.get()) {
                return;
            }
            notified.await;
        }
    }
}

/// An append's own end of its placement: marks it `Placed` when dropped, however it ended
/// (stored, refused, or its future dropped with the socket).
pub(super) struct PlacementHandle(pub(super) Arc<PlacementCell>);

impl PlacementHandle {
    pub(super) fn set(&self, placement: Placement) {
        self.0.set(placement);
    }
}

impl Drop for PlacementHandle {
    fn drop(&mut self) {
        self.0.set(Placement::Placed);
    }
}

pub(super) struct OrderLink {
    pub(super) cell: Arc<PlacementCell>,
    pub(super) has_client_id: bool,
}

/// What an ordered append carries to its writer: its own placement and the one before's. The
/// writer marks a bounce at once (the append's future learns of it only after the batch's
/// fsync), and sends an append back while the one before it is bounced: a session load queued
/// between two pipelined sends would otherwise let the second be stored while the first is on
/// its round trip.
pub struct OrderTicket {
    own: Arc<PlacementCell>,
    after: Option<Arc<PlacementCell>>,
}

impl OrderTicket {
    /// The append before this one was sent back and is not placed yet.
    pub(crate) fn behind_a_bounce(&self) -> bool {
        self.after.as_ref().is_some_and(|cell| cell.get() == Placement::Bounced)
    }

    /// Called by the writer when it sends this append back.
    pub(crate) fn mark_bounced(&self) {
        self.own.bounce();
    }
}

impl OrderLink {
    /// Whether an append (with a client id or not) may be handed to the writer now, with this
    /// one before it: once this one is in the writer's queue, the writer takes the next one
    /// after it — unless this one may be sent back for an archive look-up (it has a client id)
    /// that the next one would not need (it has none); then only once this one is placed.
    pub(super) fn lets_through(&self, placement: Placement, has_client_id: bool) -> bool {
        if self.has_client_id && !has_client_id {
            placement == Placement::Placed
        } else {
            matches!(placement, Placement::Submitted | Placement::Placed)
        }
    }
}

/// Keeps one caller's appends in the order it submitted them, even when one needs a round
/// trip to the archive first (its session was not loaded, or its client id is older than the
/// in-memory window): appends after it are not handed to the writer, or handed again, before
/// it is placed. In the common case each append is queued at its shard at once, in the
/// caller's task, exactly as an unordered submission is (pipelined, no extra hop). The caller
/// polls the returned futures from the task that submits (as a socket does), so an append's
/// placement cannot move while the next one is being queued.
#[derive(Default)]
pub struct AppendOrder {
    pub(super) last: Option<OrderLink>,
    /// Cluster mode: the sends forwarded to another node's leader.
    pub(super) lane: Option<Arc<forward_lane::ForwardLane>>,
}
