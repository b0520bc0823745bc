//! Bulk background work — the archive flush — on one thread at a lower CPU priority.
//!
//! A flush cycle decodes and writes a whole interval's traffic in one go (tens of milliseconds
//! of CPU at high load). On the runtime's workers, or on a blocking-pool thread of equal
//! priority, that burst takes a core away from sockets and shard writers and shows up directly
//! as ack latency (docs/BENCHMARKS.md measures it). At nice 10 the scheduler gives the hot path
//! the CPU first; the flush still gets a share under full load, so the archive keeps up.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::OnceLock;
use std::sync::mpsc;

use tokio::sync::oneshot;

/// Nice value of the background thread (0 is normal; higher yields the CPU more readily).
const BACKGROUND_NICE: i32 = 10;

type Job = Box<dyn FnOnce() + Send>;

/// Unbounded in type, bounded in use: its callers (the flusher and the SQLite archive's flush)
/// await each job before sending the next, so it holds at most a job or two.
fn queue() -> &'static mpsc::Sender<Job> {
    static QUEUE: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    QUEUE.get_or_init(|| {
        let (sender, jobs) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("fleetlm-background".into())
            .spawn(move || {
                lower_own_priority();
                for job in jobs {
                    job();
                }
            })
            .expect("spawn the background thread");
        sender
    })
}

/// On Linux a thread has its own nice value; this changes only the calling thread's.
/// Never raises it: a process already started at a higher nice value keeps that.
fn lower_own_priority() {
    // SAFETY: getpriority and setpriority have no memory-safety preconditions; `0` names the
    // calling thread.
    let current = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, current.max(BACKGROUND_NICE)) };
    if result != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "background thread keeps normal priority");
    }
}

/// Runs `work` on the background thread and waits for its result. A panic in `work` comes back
/// as an error (the thread itself carries on with the next job).
pub async fn run<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    let (done, result) = oneshot::channel();
    let job: Job = Box::new(move || {
        let outcome = catch_unwind(AssertUnwindSafe(work)).map_err(|_| "background job panicked".to_string());
        let _ = done.send(outcome);
    });
    queue().send(job).map_err(|_| "background thread stopped".to_string())?;
    result.await.map_err(|_| "background thread stopped".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_jobs_in_order_at_lower_priority_and_survives_a_panic() {
        let nice = run(|| {
            // SAFETY: getpriority has no memory-safety preconditions.
            unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
        })
        .await
        .expect("ran");
        assert!(nice >= BACKGROUND_NICE, "nice {nice}");
        let failed = run(|| -> u32 { panic!("a failing job") }).await;
        assert!(failed.is_err());
        assert_eq!(run(|| 41 + 1).await, Ok(42), "the thread carries on");
    }
}
