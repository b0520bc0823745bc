//! Cancelling a dispatch: one `DispatchControl` per running dispatch, shared by the scheduler
//! (which cancels it for the session's user) and the dispatch (which watches it at every wait:
//! the webhook request, the reply's body, the backoff before a retry).
//!
//! Exactly one of "cancelled" and "ended" wins, under one lock: a cancel that comes after the
//! dispatch ended changes nothing (`cancel` answers false), and a dispatch that ends after a
//! cancel reports itself cancelled, whatever it stored before it noticed.

use std::sync::Mutex;

use tokio::sync::watch;

enum Phase {
    Running,
    /// Cancelled; the user messages up to this seq were written when the cancel came, and the
    /// turn counts as answered through them.
    Cancelled(u64),
    Ended,
}

pub struct DispatchControl {
    phase: Mutex<Phase>,
    signal: watch::Sender<bool>,
}

impl Default for DispatchControl {
    fn default() -> Self {
        DispatchControl {
            phase: Mutex::new(Phase::Running),
            signal: watch::Sender::new(false),
        }
    }
}

impl DispatchControl {
    /// Cancels the dispatch if it is still running; `through_seq` is the session's latest user
    /// message when the cancel came. Returns whether this call cancelled it.
    pub fn cancel(&self, through_seq: u64) -> bool {
        let mut phase = self.phase.lock().expect("dispatch phase lock");
        if !matches!(*phase, Phase::Running) {
            return false;
        }
        *phase = Phase::Cancelled(through_seq);
        self.signal.send_replace(true);
        true
    }

    /// Whether a cancel came (the dispatch should stop at its next wait).
    pub fn is_cancelled(&self) -> bool {
        *self.signal.borrow()
    }

    /// Resolves once the dispatch is cancelled (never, if it is not).
    pub async fn cancelled(&self) {
        let mut receiver = self.signal.subscribe();
        let _ = receiver.wait_for(|cancelled| *cancelled).await;
    }

    /// The dispatch ends: from now on a cancel changes nothing. Returns `Some(through_seq)` if
    /// it was cancelled before it ended.
    pub fn end(&self) -> Option<u64> {
        let mut phase = self.phase.lock().expect("dispatch phase lock");
        match *phase {
            Phase::Cancelled(through_seq) => Some(through_seq),
            Phase::Running | Phase::Ended => {
                *phase = Phase::Ended;
                None
            }
        }
    }
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
        assert_eq!(cancelled_first.end(), Some(7));

        let ended_first = DispatchControl::default();
        assert_eq!(ended_first.end(), None);
        assert!(!ended_first.cancel(3), "a cancel after the end changes nothing");
        assert!(!ended_first.is_cancelled());
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
