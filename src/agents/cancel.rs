//! Cancelling a dispatch: one `DispatchControl` per running dispatch, shared by the scheduler
//! (which cancels it for the session's user) and the dispatch (which watches it at every wait:
//! the webhook request, the reply's body, the backoff before a retry).
//!
//! Exactly one of "cancelled" and "ended" wins, under one lock: a cancel that comes after the
//! dispatch ended changes nothing (`cancel` answers false), and a dispatch that ends after a
//! cancel reports itself cancelled, whatever it stored before it noticed.

use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::watch;

enum Phase {
    Running,
    /// Cancelled; the user messages up to this seq were written when the cancel came, and the
    /// turn counts as answered through them.
    Cancelled(u64),
    /// Cluster: this node no longer leads the session's shard; the new leader answers the turn,
    /// so the dispatch stops quietly (stores nothing more, records no end).
    Superseded,
    Ended,
}

pub struct DispatchControl {
    phase: Mutex<Phase>,
    /// Turns true on a cancel or a supersede (sent after the phase lock is released).
    stopped: watch::Sender<bool>,
    /// Turns true when the dispatch ends.
    ended: watch::Sender<bool>,
    /// The id the dispatch runs under once its turn is known (the turn's id, which a cancel
    /// may name), set once.
    turn_id: OnceLock<Arc<str>>,
}

impl Default for DispatchControl {
    fn default() -> Self {
        DispatchControl {
            phase: Mutex::new(Phase::Running),
            stopped: watch::Sender::new(false),
            ended: watch::Sender::new(false),
            turn_id: OnceLock::new(),
        }
    }
}

impl DispatchControl {
    /// Cancels the dispatch if it is still running; `through_seq` is the session's latest user
    /// message when the cancel came. Returns whether this call cancelled it.
    pub fn cancel(&self, through_seq: u64) -> bool {
        self.stop(Phase::Cancelled(through_seq))
    }

    /// The node lost the leadership the dispatch runs under: it stops at the next wait, quietly
    /// (the shard's new leader answers the turn). Returns whether this call stopped it.
    pub fn supersede(&self) -> bool {
        self.stop(Phase::Superseded)
    }

    fn stop(&self, to: Phase) -> bool {
        {
            let mut phase = self.phase.lock().expect("dispatch phase lock");
            if !matches!(*phase, Phase::Running) {
                return false;
            }
            *phase = to;
        }
        self.stopped.send_replace(true);
        true
    }

    /// The dispatch answers the turn `id` (its `dispatch_id` from now on).
    pub fn set_turn_id(&self, id: Arc<str>) {
        let _ = self.turn_id.set(id);
    }

    /// The turn's id, once the dispatch knows it.
    pub fn turn_id(&self) -> Option<Arc<str>> {
        self.turn_id.get().cloned()
    }

    pub fn is_superseded(&self) -> bool {
        matches!(*self.phase.lock().expect("dispatch phase lock"), Phase::Superseded)
    }

    /// Whether a cancel came, or the dispatch was superseded (it should stop at its next wait).
    pub fn is_cancelled(&self) -> bool {
        *self.stopped.borrow()
    }

    /// Resolves once the dispatch is cancelled or superseded (never, if it is not).
    pub async fn cancelled(&self) {
        let mut receiver = self.stopped.subscribe();
        let _ = receiver.wait_for(|stopped| *stopped).await;
    }

    /// Resolves once the dispatch was stopped or has ended.
    pub async fn settled(&self) {
        let mut ended = self.ended.subscribe();
        tokio::select! {
            () = self.cancelled() => {}
            _ = ended.wait_for(|ended| *ended) => {}
        }
    }

    /// The dispatch ends: from now on a cancel changes nothing. Returns how it ended, decided in
    /// one step with any cancel or supersede racing it.
    pub fn end(&self) -> Ending {
        let ending = {
            let mut phase = self.phase.lock().expect("dispatch phase lock");
            match *phase {
                Phase::Cancelled(through_seq) => Ending::Cancelled(through_seq),
                Phase::Superseded => Ending::Superseded,
                Phase::Running | Phase::Ended => {
                    *phase = Phase::Ended;
                    Ending::Completed
                }
            }
        };
        self.ended.send_replace(true);
        ending
    }
}

/// How a dispatch ended (`DispatchControl::end`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// On its own (answered, failed or found nothing owed).
    Completed,
    /// Cancelled; the user messages up to this seq count as answered.
    Cancelled(u64),
    /// Its node lost the shard; the new leader answers the turn.
    Superseded,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_and_end_race_with_exactly_one_winner() {
        let cancelled_first = DispatchControl::default();
        assert!(cancelled_first.cancel(7));
        assert!(!cancelled_first.cancel(8), "a second cancel changes nothing");
        assert!(cancelled_first.is_cancelled());
        assert_eq!(cancelled_first.end(), Ending::Cancelled(7));

        let ended_first = DispatchControl::default();
        assert_eq!(ended_first.end(), Ending::Completed);
        assert!(!ended_first.cancel(3), "a cancel after the end changes nothing");
        assert!(!ended_first.is_cancelled());
    }

    #[tokio::test]
    async fn a_superseded_dispatch_stops_and_its_watch_settles() {
        let control = std::sync::Arc::new(DispatchControl::default());
        let waiting = tokio::spawn({
            let control = control.clone();
            async move { control.cancelled().await }
        });
        assert!(control.supersede());
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .unwrap();
        assert!(control.is_cancelled() && control.is_superseded());
        assert!(!control.cancel(9), "a cancel after a supersede changes nothing");
        assert_eq!(
            control.end(),
            Ending::Superseded,
            "a superseded dispatch is not reported cancelled"
        );
        tokio::time::timeout(std::time::Duration::from_secs(5), control.settled())
            .await
            .expect("settled");

        let ended = DispatchControl::default();
        assert_eq!(ended.end(), Ending::Completed);
        tokio::time::timeout(std::time::Duration::from_secs(5), ended.settled())
            .await
            .expect("an ended dispatch's watch settles");
        assert!(!ended.supersede() && !ended.is_superseded());
    }

    #[tokio::test]
    async fn a_waiting_dispatch_wakes_on_cancel() {
        let control = std::sync::Arc::new(DispatchControl::default());
        let waiter = {
            let control = control.clone();
            tokio::spawn(async move { control.cancelled().await })
        };
        tokio::task::yield_now().await;
        assert!(control.cancel(1));
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .unwrap();
    }
}
