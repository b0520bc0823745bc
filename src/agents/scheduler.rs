//! When to call the agent: per-session debounce (reset by each user message, capped at
//! `max(4 × window, 2 s)` after the first pending one), one dispatch in flight per session with a
//! follow-up for messages that arrived meanwhile, and bounded concurrency per agent and per node.
//!
//! The scheduler is one task fed by a bounded queue of events. The shard writers tell it about
//! user messages after they are durable, without ever waiting: if the queue is full the event is
//! dropped and a rescan of the log (shards and archive) recovers it. The same rescan runs at
//! start, so sessions owing a reply after a crash are dispatched again.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::cancel::{DispatchControl, Ending};
use super::webhook::{self, DispatchJob, DispatchResult};
use super::{EngineContext, status};

const EVENT_QUEUE_DEPTH: usize = 16_384;
const RESCAN_ARCHIVE_LIMIT: usize = 100_000;
const DEFAULT_DEBOUNCE_MS: u64 = 500;

enum Event {
    UserMessage {
        session_id: Arc<str>,
        agent_id: String,
        seq: u64,
    },
    Done {
        session_id: Arc<str>,
        agent_id: String,
        /// The user messages up to here are answered; `None`: released unanswered (this
        /// cluster member does not lead the session's shard).
        through_seq: Option<u64>,
        /// Whether it counted against the concurrency bounds (a cancel of a turn no dispatch
        /// was running for does not).
        counted: bool,
    },
    Cancel(CancelRequest),
}

/// The session's user cancels its turn (`EngineHandle::cancel`).
struct CancelRequest {
    session_id: Arc<str>,
    /// Cancel only this dispatch.
    dispatch_id: Option<String>,
    /// The session's latest user message when the cancel came, and whether the log owed a
    /// reply for it then.
    last_user_seq: u64,
    owed: bool,
    reply: CancelReply,
}

type CancelReply = oneshot::Sender<Result<Option<Arc<str>>, crate::shard::ShardError>>;

/// The API's side: cancels turns.
#[derive(Clone)]
pub struct EngineHandle {
    events: mpsc::Sender<Event>,
}

impl EngineHandle {
    /// Cancels the session's turn: the running dispatch (if `dispatch_id` is given, only that
    /// one), or, if none runs, the reply the log owes for user messages up to
    /// `last_user_seq`. Returns the id of the dispatch cancelled, `None` if there was nothing
    /// to cancel (so a repeated cancel answers `None`).
    pub async fn cancel(
        &self,
        session_id: Arc<str>,
        dispatch_id: Option<String>,
        progress: crate::model::DispatchProgress,
    ) -> Result<Option<Arc<str>>, crate::shard::ShardError> {
        let (reply, answer) = oneshot::channel();
        let request = CancelRequest {
            session_id,
            dispatch_id,
            last_user_seq: progress.last_user_seq,
            owed: progress.is_pending(),
            reply,
        };
        let stopped = || crate::shard::ShardError::Unavailable("the agent engine is stopping".into());
        self.events.send(Event::Cancel(request)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// The shard writers' side of the queue (`crate::shard::UserMessageSink`): reports durable
/// user messages, never waits.
struct EngineSink {
    events: mpsc::Sender<Event>,
    overflowed: Arc<AtomicBool>,
}

impl crate::shard::UserMessageSink for EngineSink {
    fn user_message(&self, session_id: &Arc<str>, agent_id: &str, seq: u64) {
        let event = Event::UserMessage {
            session_id: session_id.clone(),
            agent_id: agent_id.to_string(),
            seq,
        };
        if self.events.try_send(event).is_err() {
            self.overflowed.store(true, Ordering::Release);
        }
    }

    fn rescan(&self) {
        self.overflowed.store(true, Ordering::Release);
    }
}

/// The scheduler's side of the queue, until the engine starts.
pub struct EngineInbox {
    events: mpsc::Receiver<Event>,
    sender: mpsc::Sender<Event>,
    overflowed: Arc<AtomicBool>,
}

impl EngineInbox {
    pub fn handle(&self) -> EngineHandle {
        EngineHandle {
            events: self.sender.clone(),
        }
    }
}

/// The engine's queue: the shard writers' side (shared by them all) and the scheduler's.
pub fn channel() -> (crate::shard::UserMessages, EngineInbox) {
    let (sender, events) = mpsc::channel(EVENT_QUEUE_DEPTH);
    let overflowed = Arc::new(AtomicBool::new(false));
    let sink = EngineSink {
        events: sender.clone(),
        overflowed: overflowed.clone(),
    };
    (
        Arc::new(sink),
        EngineInbox {
            events,
            sender,
            overflowed,
        },
    )
}

#[derive(Default)]
struct SessionSchedule {
    agent_id: String,
    latest_user_seq: u64,
    /// User messages up to here are covered by a finished or running dispatch.
    covered_through: u64,
    first_pending_at: Option<Instant>,
    due_at: Option<Instant>,
    in_flight: bool,
    /// The running dispatch (or cancel record): its id and its control.
    running: Option<(Arc<str>, Arc<DispatchControl>)>,
    /// The cancel that stopped the running dispatch, answered once it has ended (its aborted
    /// message stored, its end recorded).
    cancelled_by: Option<CancelReply>,
    /// A user message was reported while a dispatch ran (cluster: this node may have started
    /// leading the shard meanwhile, and owes it even if the running dispatch did not answer).
    renotified: bool,
}

pub struct Engine;

impl Engine {
    /// Starts the scheduler; it stops when `shutdown` turns true (dispatches in flight end with
    /// the process; their sessions still owe a reply in the log and are dispatched again).
    ///
    /// Supervised (`crate::supervisor`): a scheduler that panics is replaced by a fresh one on
    /// the same queue, whose rescan of the log finds every session owing a reply.
    pub fn start(context: Arc<EngineContext>, inbox: EngineInbox, shutdown: watch::Receiver<bool>) {
        let EngineInbox {
            mut events,
            sender,
            overflowed,
        } = inbox;
        // Shared by every scheduler the supervisor starts: a rescan still running from a
        // scheduler that panicked is not doubled by its successor's.
        let rescans_running: Arc<AtomicBool> = Arc::default();
        let make_scheduler = move || Scheduler {
            context: context.clone(),
            sender: sender.clone(),
            overflowed: overflowed.clone(),
            rescans: RescanGate {
                running: rescans_running.clone(),
            },
            sessions: HashMap::new(),
            timers: BTreeSet::new(),
            ready: VecDeque::new(),
            in_flight_by_agent: HashMap::new(),
            in_flight: 0,
        };
        let supervisor_shutdown = shutdown.clone();
        tokio::spawn(crate::supervisor::supervise(
            "dispatcher",
            "dispatcher".into(),
            Some(supervisor_shutdown),
            async move || {
                make_scheduler().run(&mut events, shutdown.clone()).await;
                // It returns only when stopping (or when every sender is gone).
                crate::supervisor::Ended::Finished
            },
        ));
    }
}

struct Scheduler {
    context: Arc<EngineContext>,
    sender: mpsc::Sender<Event>,
    overflowed: Arc<AtomicBool>,
    rescans: RescanGate,
    sessions: HashMap<Arc<str>, SessionSchedule>,
    timers: BTreeSet<(Instant, Arc<str>)>,
    ready: VecDeque<Arc<str>>,
    in_flight_by_agent: HashMap<String, usize>,
    in_flight: usize,
}

impl Scheduler {
    async fn run(mut self, events: &mut mpsc::Receiver<Event>, mut shutdown: watch::Receiver<bool>) {
        // The rescan at start (sessions owing a reply after a crash).
        self.overflowed.store(true, Ordering::Release);
        self.start_rescan_if_asked();
        let mut rescan_check = tokio::time::interval(Duration::from_secs(1));
        loop {
            let next_timer = self.timers.first().map(|(at, _)| *at);
            let sleep = async {
                match next_timer {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                event = events.recv() => match event {
                    Some(Event::UserMessage { session_id, agent_id, seq }) => self.on_user_message(session_id, agent_id, seq),
                    Some(Event::Done { session_id, agent_id, through_seq, counted }) => self.on_done(session_id, &agent_id, through_seq, counted),
                    Some(Event::Cancel(request)) => self.on_cancel(request),
                    None => return,
                },
                () = sleep => self.fire_due_timers(),
                _ = rescan_check.tick() => self.start_rescan_if_asked(),
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        return;
                    }
                }
            }
            metrics::gauge!("fleetlm_dispatch_queue_length").set((self.timers.len() + self.ready.len()) as f64);
        }
    }

    /// Starts a rescan if one was asked for and none is running (coalesced: see [`RescanGate`]).
    fn start_rescan_if_asked(&self) {
        if let Some(running) = self.rescans.try_start(&self.overflowed) {
            self.spawn_rescan(running);
        }
    }

    /// Finds every session owing a reply (in the shards' memory and in the archive) and feeds
    /// them in as user messages. `running` is held until the rescan ends (or panics).
    fn spawn_rescan(&self, running: RescanRunning) {
        let (context, sender) = (self.context.clone(), self.sender.clone());
        tokio::spawn(async move {
            let _running = running;
            let mut owing = context.shards.pending_dispatches().await;
            let known: std::collections::HashSet<Arc<str>> = owing.iter().map(|(id, _, _)| id.clone()).collect();
            match context
                .shards
                .archive()
                .sessions_owing_a_reply(RESCAN_ARCHIVE_LIMIT)
                .await
            {
                Ok(ids) => {
                    // A cluster member dispatches only for the shards it leads.
                    let ids = ids
                        .into_iter()
                        .filter(|id| !known.contains(id.as_str()) && context.shards.dispatch_term(id).is_some());
                    for id in ids {
                        if let Ok(view) = context.shards.view(&id).await
                            && view.dispatch.is_pending()
                            && view.status == crate::model::SessionStatus::Active
                        {
                            owing.push((
                                view.record.id.clone(),
                                view.record.agent_id.clone(),
                                view.dispatch.last_user_seq,
                            ));
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "could not list sessions owing a reply; will retry on the next rescan")
                }
            }
            if !owing.is_empty() {
                tracing::info!(sessions = owing.len(), "dispatching sessions that owe a reply");
            }
            for (session_id, agent_id, seq) in owing {
                if sender
                    .send(Event::UserMessage {
                        session_id,
                        agent_id,
                        seq,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
    }

    fn debounce(&self, agent_id: &str) -> Duration {
        let ms = self
            .context
            .registry
            .get(agent_id)
            .map_or(DEFAULT_DEBOUNCE_MS, |a| u64::from(a.debounce_window_ms));
        Duration::from_millis(ms)
    }

    fn on_user_message(&mut self, session_id: Arc<str>, agent_id: String, seq: u64) {
        let schedule = self.sessions.entry(session_id.clone()).or_default();
        schedule.agent_id = agent_id;
        if seq <= schedule.covered_through {
            return;
        }
        schedule.renotified |= schedule.in_flight;
        schedule.latest_user_seq = schedule.latest_user_seq.max(seq);
        if !schedule.in_flight {
            self.arm(&session_id);
        }
    }

    /// (Re)sets the session's due time: the debounce window from now, but no later than the cap
    /// after its first pending message.
    fn arm(&mut self, session_id: &Arc<str>) {
        let now = Instant::now();
        let agent_id = self.sessions[session_id].agent_id.clone();
        let window = self.debounce(&agent_id);
        let cap = (window * 4).max(Duration::from_secs(2));
        let schedule = self.sessions.get_mut(session_id).expect("scheduled");
        let newly_pending = schedule.first_pending_at.is_none();
        let first = *schedule.first_pending_at.get_or_insert(now);
        let due = (now + window).min(first + cap);
        if let Some(old) = schedule.due_at.replace(due) {
            self.timers.remove(&(old, session_id.clone()));
        }
        self.timers.insert((due, session_id.clone()));
        if newly_pending {
            status(&self.context, session_id, "queued", None, None);
        }
    }

    fn fire_due_timers(&mut self) {
        let now = Instant::now();
        while let Some((at, session_id)) = self.timers.first().cloned() {
            if at > now {
                break;
            }
            self.timers.remove(&(at, session_id.clone()));
            let Some(schedule) = self.sessions.get_mut(&session_id) else {
                continue;
            };
            schedule.due_at = None;
            if !schedule.in_flight {
                self.ready.push_back(session_id);
            }
        }
        self.start_ready();
    }

    fn start_ready(&mut self) {
        let mut waiting = VecDeque::new();
        while let Some(session_id) = self.ready.pop_front() {
            if self.in_flight >= self.context.config.max_in_flight {
                waiting.push_back(session_id);
                break;
            }
            let Some(schedule) = self.sessions.get(&session_id) else {
                continue;
            };
            if schedule.in_flight {
                continue;
            }
            let agent_count = self.in_flight_by_agent.get(&schedule.agent_id).copied().unwrap_or(0);
            if agent_count >= self.context.config.max_in_flight_per_agent {
                waiting.push_back(session_id);
                continue;
            }
            self.start(session_id);
        }
        waiting.extend(self.ready.drain(..));
        self.ready = waiting;
    }

    fn start(&mut self, session_id: Arc<str>) {
        let schedule = self.sessions.get_mut(&session_id).expect("scheduled");
        schedule.in_flight = true;
        schedule.first_pending_at = None;
        let covered_hint = schedule.latest_user_seq;
        let agent_id = schedule.agent_id.clone();
        let dispatch_id: Arc<str> = Arc::from(crate::ids::generate_id());
        let control = Arc::new(DispatchControl::default());
        schedule.running = Some((dispatch_id.clone(), control.clone()));
        *self.in_flight_by_agent.entry(agent_id.clone()).or_insert(0) += 1;
        self.in_flight += 1;
        let (context, sender, overflowed) = (self.context.clone(), self.sender.clone(), self.overflowed.clone());
        tokio::spawn(async move {
            let Some(leader_term) = context.shards.dispatch_term(&session_id) else {
                // A cluster member that does not lead the session's shard: its leader dispatches.
                dispatch_released(&sender, session_id, agent_id).await;
                return;
            };
            if let Some(term) = leader_term
                && let Some(ended) = context.shards.lease_ended(&session_id, term)
            {
                // Stops the dispatch (and its stream to sockets) as soon as this node loses the
                // shard or its lease: the shard's leader answers the turn.
                let control = control.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        () = ended => {
                            control.supersede();
                        }
                        () = control.settled() => {}
                    }
                });
            }
            let job = DispatchJob {
                session_id: session_id.clone(),
                agent_id: agent_id.clone(),
                dispatch_id,
                control,
                leader_term,
            };
            let started = std::time::Instant::now();
            let mut result = run_bounded(&context, &job).await;
            let ending = job.control.end();
            // Cancelled before it ended: whatever it stored, the turn is answered through the
            // user messages written when the cancel came, and it is not reported as failed.
            let cancelled = match ending {
                Ending::Cancelled(through) => Some(through),
                Ending::Completed | Ending::Superseded => None,
            };
            if let Some(cancelled_through) = cancelled {
                result.error = None;
                result.nothing_owed = false;
                result.through_seq = result.through_seq.max(cancelled_through);
            }
            // The turn's own bound when it has one: a resumed turn answers what it answered
            // when it started, not messages written since (a follow-up answers those).
            let through_seq = if result.through_seq == 0 {
                covered_hint
            } else {
                result.through_seq
            };
            // The turn's id once the dispatch opened its turn (`webhook::dispatch`).
            let dispatch_id = job.control.turn_id().unwrap_or_else(|| job.dispatch_id.clone());
            if result.superseded || ending == Ending::Superseded {
                tracing::info!(session_id = %job.session_id, %dispatch_id, "dispatch ended: the shard's new leader answers the turn");
                dispatch_released(&sender, session_id.clone(), agent_id.clone()).await;
                if let Some(term) = job.leader_term {
                    resume_after_lease(&context, &sender, &overflowed, session_id, agent_id, term, through_seq).await;
                }
                return;
            }
            if result.nothing_owed {
                // A stale request: the log shows every user message answered. Nothing was
                // called or recorded; clear the `queued` shown when it was scheduled.
                status(&context, &job.session_id, "idle", None, None);
                dispatch_ended(&sender, session_id, agent_id, result.through_seq).await;
                return;
            }
            let outcome = match (&result.error, cancelled) {
                (Some(_), _) => "failed",
                (None, Some(_)) => "cancelled",
                (None, None) => "ok",
            };
            metrics::counter!("fleetlm_dispatches_total", "outcome" => outcome).increment(1);
            context.recent.record(
                &job.agent_id,
                super::recent::FinishedDispatch {
                    dispatch_id: dispatch_id.to_string(),
                    session_id: job.session_id.to_string(),
                    outcome,
                    error: result.error.clone(),
                    duration_ms: started.elapsed().as_millis() as u64,
                    finished_at: crate::model::Timestamp(context.clock.now_micros()),
                },
            );
            if let Err(error) = context
                .shards
                .finish_dispatch(
                    &job.session_id,
                    &dispatch_id,
                    through_seq,
                    result.error.clone(),
                    cancelled.is_some(),
                    job.leader_term,
                )
                .await
            {
                tracing::warn!(session_id = %job.session_id, %error, "could not record the end of a dispatch");
            }
            match &result.error {
                Some(error) => {
                    tracing::warn!(session_id = %job.session_id, %dispatch_id, %error, "dispatch failed");
                    status(&context, &job.session_id, "failed", Some(&dispatch_id), Some(error));
                }
                None if cancelled.is_some() => {
                    status(&context, &job.session_id, "cancelled", Some(&dispatch_id), None);
                }
                None => status(&context, &job.session_id, "idle", Some(&dispatch_id), None),
            }
            dispatch_ended(&sender, session_id, agent_id, through_seq).await;
        });
    }

    /// The session's user cancels its turn. A running dispatch is cancelled through its
    /// control (it closes its request, stores what it has as aborted and records the end);
    /// otherwise a reply the log owes (debouncing, waiting for capacity, or not rescanned yet)
    /// is recorded as cancelled without calling the agent. Either way the turn is answered
    /// through the user messages written when the cancel came, durably, so nothing dispatches
    /// for them again, not even after a restart.
    fn on_cancel(&mut self, request: CancelRequest) {
        let CancelRequest {
            session_id,
            dispatch_id,
            last_user_seq,
            owed,
            reply,
        } = request;
        if let Some(schedule) = self.sessions.get_mut(&session_id)
            && schedule.in_flight
        {
            let Some((running_id, control)) = schedule.running.clone() else {
                let _ = reply.send(Ok(None));
                return;
            };
            // Named by its turn's id once it has one (the id its statuses and chunks carry).
            let running_id = control.turn_id().unwrap_or(running_id);
            let wanted = dispatch_id.as_deref().is_none_or(|id| id == &*running_id);
            if wanted && control.cancel(last_user_seq) {
                // Messages written up to the cancel are answered: no follow-up for them. The
                // answer waits for the dispatch's end, so what the client writes next (e.g. a
                // `regenerate`) comes after the aborted message in the log.
                schedule.covered_through = schedule.covered_through.max(last_user_seq);
                schedule.cancelled_by = Some(reply);
            } else {
                let _ = reply.send(Ok(None));
            }
            return;
        }
        if dispatch_id.is_some() || !owed {
            // Nothing runs: a named dispatch has ended already, and nothing is owed.
            let _ = reply.send(Ok(None));
            return;
        }
        let schedule = self.sessions.entry(session_id.clone()).or_default();
        if let Some(due) = schedule.due_at.take() {
            self.timers.remove(&(due, session_id.clone()));
        }
        schedule.first_pending_at = None;
        schedule.in_flight = true;
        let dispatch_id: Arc<str> = Arc::from(crate::ids::generate_id());
        let control = Arc::new(DispatchControl::default());
        control.cancel(last_user_seq);
        schedule.running = Some((dispatch_id.clone(), control));
        let agent_id = schedule.agent_id.clone();
        let (context, sender) = (self.context.clone(), self.sender.clone());
        tokio::spawn(async move {
            let recorded = context
                .shards
                .cancel_owed_turn(&session_id, &dispatch_id, last_user_seq)
                .await;
            match &recorded {
                Ok(true) => status(&context, &session_id, "cancelled", Some(&dispatch_id), None),
                Ok(false) => {}
                Err(error) => tracing::warn!(%session_id, %error, "could not record a cancelled turn"),
            }
            // Covered only if recorded: if the log could not take it, the turn is still owed
            // and is dispatched as usual.
            let through_seq = if matches!(recorded, Ok(true)) { last_user_seq } else { 0 };
            let _ = reply.send(recorded.map(|done| done.then_some(dispatch_id)));
            let _ = sender
                .send(Event::Done {
                    session_id,
                    agent_id,
                    through_seq: Some(through_seq),
                    counted: false,
                })
                .await;
        });
    }

    fn on_done(&mut self, session_id: Arc<str>, agent_id: &str, through_seq: Option<u64>, counted: bool) {
        if counted {
            self.in_flight = self.in_flight.saturating_sub(1);
            if let Some(count) = self.in_flight_by_agent.get_mut(agent_id) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    self.in_flight_by_agent.remove(agent_id);
                }
            }
        }
        if let Some(schedule) = self.sessions.get_mut(&session_id) {
            schedule.in_flight = false;
            let running = schedule.running.take();
            if let (Some(reply), Some((dispatch_id, control))) = (schedule.cancelled_by.take(), running) {
                let _ = reply.send(Ok(Some(control.turn_id().unwrap_or(dispatch_id))));
            }
            let renotified = std::mem::take(&mut schedule.renotified);
            let through_seq = match through_seq {
                Some(through_seq) => through_seq,
                // Ended without answering (this node does not lead the shard): the session is
                // dropped unless it was reported again meanwhile (it may lead it now).
                None if renotified => schedule.covered_through,
                None => schedule.latest_user_seq,
            };
            schedule.covered_through = schedule.covered_through.max(through_seq);
            if schedule.latest_user_seq > schedule.covered_through {
                self.arm(&session_id);
            } else {
                self.sessions.remove(&session_id);
            }
        }
        self.start_ready();
    }
}

/// How long a dispatch stopped by a lapsed lease waits for it to come back before the turn is
/// left to a rescan.
const LEASE_RESUME_PATIENCE: Duration = Duration::from_secs(60);

/// A dispatch stopped because this node's lease lapsed while it still leads the shard in the
/// same term (cut off from the quorum, or a hiccup): if another member is elected it answers
/// the turn; if the lease comes back in this term, nobody else will, so the turn is scheduled
/// here again. Past the patience a rescan finds it.
async fn resume_after_lease(
    context: &EngineContext,
    sender: &mpsc::Sender<Event>,
    overflowed: &AtomicBool,
    session_id: Arc<str>,
    agent_id: String,
    term: u64,
    through_seq: u64,
) {
    if context.shards.dispatch_term(&session_id) != Some(Some(term)) {
        return;
    }
    let Some(regained) = context.shards.lease_regained(&session_id, term, LEASE_RESUME_PATIENCE) else {
        return;
    };
    if regained.await {
        let event = Event::UserMessage {
            session_id,
            agent_id,
            seq: through_seq.max(1),
        };
        let _ = sender.send(event).await;
    } else if context.shards.dispatch_term(&session_id) == Some(Some(term)) {
        overflowed.store(true, Ordering::Release);
    }
}

/// Tells the scheduler a dispatch it started has ended, covering user messages up to
/// `through_seq`.
async fn dispatch_ended(sender: &mpsc::Sender<Event>, session_id: Arc<str>, agent_id: String, through_seq: u64) {
    send_done(sender, session_id, agent_id, Some(through_seq)).await;
}

/// Tells the scheduler a dispatch ended without answering anything: this cluster member does
/// not lead (or no longer leads) the session's shard, whose leader answers the turn.
async fn dispatch_released(sender: &mpsc::Sender<Event>, session_id: Arc<str>, agent_id: String) {
    send_done(sender, session_id, agent_id, None).await;
}

async fn send_done(sender: &mpsc::Sender<Event>, session_id: Arc<str>, agent_id: String, through_seq: Option<u64>) {
    let _ = sender
        .send(Event::Done {
            session_id,
            agent_id,
            through_seq,
            counted: true,
        })
        .await;
}

/// At most one rescan runs at a time. A rescan asked for while one runs stays asked for (the
/// `overflowed` flag is not taken) and starts once the running one has ended; however many
/// times it was asked meanwhile, that is one rescan. A rescan slower than the 1 s check (a big
/// archive) thus never piles up: at most one running and one pending.
#[derive(Default)]
struct RescanGate {
    running: Arc<AtomicBool>,
}

impl RescanGate {
    /// Takes the request in `asked` and returns the running rescan's guard, if a rescan was
    /// asked for and none runs. Called only from the scheduler's task.
    fn try_start(&self, asked: &AtomicBool) -> Option<RescanRunning> {
        if self.running.load(Ordering::Acquire) || !asked.swap(false, Ordering::AcqRel) {
            return None;
        }
        self.running.store(true, Ordering::Release);
        Some(RescanRunning(self.running.clone()))
    }
}

/// Held by the running rescan; dropping it (the rescan ended, or its task panicked) lets the
/// next one start.
struct RescanRunning(Arc<AtomicBool>);

impl Drop for RescanRunning {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// A dispatch that panics or outlives the deadline still ends, as a failure.
async fn run_bounded(context: &Arc<EngineContext>, job: &DispatchJob) -> DispatchResult {
    let task_context = context.clone();
    let task_job = DispatchJob {
        session_id: job.session_id.clone(),
        agent_id: job.agent_id.clone(),
        dispatch_id: job.dispatch_id.clone(),
        control: job.control.clone(),
        leader_term: job.leader_term,
    };
    let task = tokio::spawn(async move { webhook::dispatch(&task_context, &task_job).await });
    let abort = task.abort_handle();
    let result = match tokio::time::timeout(context.config.dispatch_deadline, task).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => DispatchResult::failed("dispatch crashed"),
        Err(_) => {
            abort.abort();
            DispatchResult::failed("dispatch deadline exceeded")
        }
    };
    context.streams.end(&job.session_id);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slow rescan asked for again and again while it runs (every writer overflow, every
    /// takeover, every 1 s check) is followed by one rescan, not one per request: at most two
    /// run in all, never two at once.
    #[test]
    fn rescans_asked_for_during_a_slow_rescan_coalesce_into_one() {
        let gate = RescanGate::default();
        let asked = AtomicBool::new(true);
        // While one rescan runs, any number of requests make exactly one more, after it.
        let first = gate.try_start(&asked).expect("asked for, none running");
        let mut during = 0;
        for _ in 0..1000 {
            asked.store(true, Ordering::Release);
            during += usize::from(gate.try_start(&asked).is_some());
        }
        assert_eq!(during, 0, "none starts while one runs");
        drop(first);
        let second = gate.try_start(&asked);
        assert!(second.is_some(), "the pending one runs after it");
        drop(second);
        assert!(
            gate.try_start(&asked).is_none(),
            "and only one: nothing was asked since"
        );
    }

    /// A rescan whose task panics still lets the next one start.
    #[tokio::test]
    async fn a_panicking_rescan_does_not_block_later_ones() {
        let gate = RescanGate::default();
        let asked = AtomicBool::new(true);
        let running = gate.try_start(&asked).unwrap();
        let crashed = tokio::spawn(async move {
            let _running = running;
            panic!("rescan crashed");
        });
        assert!(crashed.await.is_err());
        asked.store(true, Ordering::Release);
        assert!(gate.try_start(&asked).is_some());
    }
}
