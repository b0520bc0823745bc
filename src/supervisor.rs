//! Supervision: a long-lived part (shard writer, WAL lane, flusher, dispatcher, sweeper, cluster
//! relay) that panics or stops when it should not is restarted from the durable log, after a
//! backoff, counted in `fleetlm_task_restarts_total{task}` and logged with the panic message.
//!
//! A part that keeps failing (restarting now, or restarted `FAILING_RESTARTS` times within
//! `FAILING_WINDOW`) is named by `/health/ready` (`failing_parts`).
//!
//! The record of failures is process-wide, like the metrics: one server runs per process.

use std::any::Any;
use std::collections::{BTreeMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::sync::watch;

/// The first restart waits this long; each further one in a row waits twice as long, up to
/// `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A run that lasted this long counts as healthy: the next failure waits `FIRST_BACKOFF` again.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);
/// A part restarted this many times within `FAILING_WINDOW` makes the node not ready.
const FAILING_RESTARTS: usize = 3;
const FAILING_WINDOW: Duration = Duration::from_secs(60);

/// How one run of a supervised part ended without panicking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Its work is over (shutdown, its queue closed): not restarted.
    Finished,
    /// It returned while it still had work: restarted like a panic.
    Stopped,
}

/// The delay before each restart: doubling while the part keeps failing, reset after a
/// healthy run.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff { next: FIRST_BACKOFF }
    }
}

impl Backoff {
    /// The wait before restarting a part whose last run lasted `ran_for`.
    pub fn after_failure(&mut self, ran_for: Duration) -> Duration {
        if ran_for >= HEALTHY_AFTER {
            self.next = FIRST_BACKOFF;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        delay
    }
}

/// What is remembered of one part's failures.
struct PartRecord {
    /// When it was restarted, newest last (at most `FAILING_RESTARTS` kept).
    restarts: VecDeque<Instant>,
    /// Failed and not yet running again.
    restarting: bool,
    last_failure: String,
}

/// One entry per part that ever failed (parts are a fixed set: shards, lanes and a few tasks).
fn records() -> &'static Mutex<BTreeMap<String, PartRecord>> {
    static RECORDS: OnceLock<Mutex<BTreeMap<String, PartRecord>>> = OnceLock::new();
    RECORDS.get_or_init(Mutex::default)
}

fn lock_records() -> std::sync::MutexGuard<'static, BTreeMap<String, PartRecord>> {
    // The lock guards plain data that every update leaves whole: a poisoned lock is still usable.
    records().lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Records that `part` (of kind `task`) failed and is restarted after `delay`: metric, log line
/// and readiness.
pub fn record_failure(task: &'static str, part: &str, reason: &str, delay: Duration) {
    metrics::counter!("fleetlm_task_restarts_total", "task" => task).increment(1);
    tracing::error!(
        task,
        part,
        reason,
        restart_in_ms = delay.as_millis() as u64,
        "a part of the server failed; it restarts from the durable log"
    );
    let mut records = lock_records();
    let record = records.entry(part.to_string()).or_insert_with(|| PartRecord {
        restarts: VecDeque::with_capacity(FAILING_RESTARTS),
        restarting: false,
        last_failure: String::new(),
    });
    if record.restarts.len() == FAILING_RESTARTS {
        record.restarts.pop_front();
    }
    record.restarts.push_back(Instant::now());
    record.restarting = true;
    record.last_failure = reason.to_string();
}

/// Records that `part` runs again after a failure.
pub fn record_restarted(part: &str) {
    if let Some(record) = lock_records().get_mut(part) {
        record.restarting = false;
    }
}

/// Forgets every failure (tests that run servers one after another in one process).
#[cfg(test)]
pub fn forget_failures() {
    lock_records().clear();
}

/// A part that keeps failing, for `/health/ready`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailingPart {
    pub part: String,
    pub reason: String,
}

/// Parts restarting now or restarted `FAILING_RESTARTS` times within `FAILING_WINDOW`.
pub fn failing_parts() -> Vec<FailingPart> {
    let now = Instant::now();
    lock_records()
        .iter()
        .filter_map(|(part, record)| {
            let recent = record
                .restarts
                .iter()
                .filter(|at| now.duration_since(**at) < FAILING_WINDOW)
                .count();
            let reason = if record.restarting {
                format!("restarting after: {}", record.last_failure)
            } else if recent >= FAILING_RESTARTS {
                format!(
                    "restarted {recent} times within a minute; last: {}",
                    record.last_failure
                )
            } else {
                return None;
            };
            Some(FailingPart {
                part: part.clone(),
                reason,
            })
        })
        .collect()
}

/// The message a panic carried (`panic!` with a literal or a formatted string).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(message) = payload.downcast_ref::<&str>() {
        (*message).to_string()
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// Runs a part until it finishes: `run` makes and runs one instance (from the durable log,
/// as at start); a panic or an unexpected return (`Ended::Stopped`) restarts it after the
/// backoff. Once `shutdown` is set a failure is logged and not restarted.
pub async fn supervise(
    task: &'static str,
    part: String,
    shutdown: Option<watch::Receiver<bool>>,
    mut run: impl AsyncFnMut() -> Ended,
) {
    let mut backoff = Backoff::default();
    loop {
        let started = Instant::now();
        let outcome = AssertUnwindSafe(crash::crashable(&part, run())).catch_unwind().await;
        let reason = match outcome {
            Ok(Ended::Finished) => return,
            Ok(Ended::Stopped) => "it stopped while it still had work".to_string(),
            Err(payload) => format!("panicked: {}", panic_message(payload.as_ref())),
        };
        if shutdown.as_ref().is_some_and(|shutdown| *shutdown.borrow()) {
            tracing::error!(task, part, reason, "a part of the server failed while shutting down");
            return;
        }
        let delay = backoff.after_failure(started.elapsed());
        record_failure(task, &part, &reason, delay);
        tokio::time::sleep(delay).await;
        record_restarted(&part);
    }
}

/// Test-only crash points: a test arms a part by name and the part panics at its next poll
/// (or, for a WAL lane, its next commit). Compiled out of every other build.
pub mod crash {
    #[cfg(test)]
    use std::collections::HashSet;
    use std::future::Future;
    #[cfg(test)]
    use std::sync::Mutex;

    #[cfg(test)]
    static ARMED: Mutex<Option<HashSet<String>>> = Mutex::new(None);

    /// Makes `part` panic once, at its next crash point.
    #[cfg(test)]
    pub fn arm(part: &str) {
        ARMED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_or_insert_with(HashSet::new)
            .insert(part.to_string());
    }

    /// Whether `part` is armed (disarming it).
    #[cfg(test)]
    pub fn take(part: &str) -> bool {
        ARMED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_mut()
            .is_some_and(|armed| armed.remove(part))
    }

    /// Panics if `part` is armed.
    #[cfg(test)]
    pub fn point(part: &str) {
        if take(part) {
            panic!("crash point of {part} (test)");
        }
    }

    #[cfg(not(test))]
    #[inline(always)]
    pub fn point(_part: &str) {}

    /// `future`, which panics after a poll (its work of that poll done) once `part` is armed.
    #[cfg(test)]
    pub fn crashable<F: Future>(part: &str, future: F) -> impl Future<Output = F::Output> {
        let mut future = Box::pin(future);
        std::future::poll_fn(move |context| {
            let polled = future.as_mut().poll(context);
            if polled.is_pending() {
                point(part);
            }
            polled
        })
    }

    #[cfg(not(test))]
    #[inline(always)]
    pub fn crashable<F: Future>(_part: &str, future: F) -> F {
        future
    }
}

#[cfg(test)]
mod tests;
