//! A shard's state: its sessions, as a pure fold over its log operations.
//!
//! Architecture invariant: `apply` is the only way state changes, live or in recovery, so the
//! state after a restart equals the state before it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ops::Op;
use super::session::{SessionState, WalPosition};
use crate::archive::LoadedSession;
use crate::model::SessionStatus;

pub struct ShardState {
    pub sessions: HashMap<Arc<str>, SessionState>,
    /// Log index of the newest entry this state includes.
    pub applied_index: u64,
    /// Log index up to which the archive holds everything.
    pub archived_index: u64,
}

impl ShardState {
    pub fn new(archived_index: u64) -> ShardState {
        ShardState {
            sessions: HashMap::new(),
            applied_index: archived_index,
            archived_index,
        }
    }

    /// Applies one operation of the entry at `log_index`. Operations already reflected (a
    /// message at or below the session's last seq, loaded from the archive) are skipped.
    pub fn apply(&mut self, op: &Op, log_index: u64, op_position: u32, now: Instant) {
        match op {
            Op::SessionCreated(record) => {
                let state = self
                    .sessions
                    .entry(record.id.clone())
                    .or_insert_with(|| SessionState::new(record.clone(), now));
                state.last_log_index = state.last_log_index.max(log_index);
            }
            Op::MessageAppended(record) => {
                let Some(state) = self.sessions.get_mut(&*record.message.session_id) else {
                    return;
                };
                if record.message.seq <= state.last_seq {
                    return;
                }
                if record.message.seq > state.last_seq + 1 {
                    // Only after an accepted loss: the seqs in between were in the lost entries.
                    state.skip_seqs(record.message.seq - 1, record.message.inserted_at);
                }
                let position = WalPosition {
                    seq: record.message.seq,
                    log_index,
                    op_position,
                };
                state.apply_message(Arc::new(record.clone()), Some(position));
                state.last_used = now;
            }
            Op::SessionArchived { session_id, at } => {
                let Some(state) = self.sessions.get_mut(session_id.as_str()) else {
                    return;
                };
                state.status = SessionStatus::Archived;
                state.updated_at = *at;
                state.last_log_index = state.last_log_index.max(log_index);
            }
            Op::DispatchFinished {
                session_id,
                through_seq,
                ..
            } => {
                let Some(state) = self.sessions.get_mut(session_id.as_str()) else {
                    return;
                };
                state.dispatch.answered_through = state.dispatch.answered_through.max(*through_seq);
                if state.dispatch.open_turn().is_none() {
                    state.dispatch.turn = None;
                }
                state.last_log_index = state.last_log_index.max(log_index);
            }
            Op::DispatchStarted {
                session_id,
                turn_id,
                through_seq,
                history_seq,
                ..
            } => {
                let Some(state) = self.sessions.get_mut(session_id.as_str()) else {
                    return;
                };
                if *through_seq > state.dispatch.answered_through {
                    state.dispatch.turn = Some(crate::model::OpenTurn {
                        id: *turn_id,
                        through_seq: *through_seq,
                        history_seq: *history_seq,
                    });
                }
                state.last_log_index = state.last_log_index.max(log_index);
            }
            Op::SeqsSkipped {
                session_id,
                through_seq,
                at,
                ..
            } => {
                let Some(state) = self.sessions.get_mut(session_id.as_str()) else {
                    return;
                };
                state.skip_seqs(*through_seq, *at);
                state.last_log_index = state.last_log_index.max(log_index);
            }
            Op::SessionLoaded { view, gaps } => {
                if !self.sessions.contains_key(&view.record.id) {
                    self.install(LoadedSession::summary(view.clone(), gaps.clone()), now);
                }
                if let Some(state) = self.sessions.get_mut(&view.record.id) {
                    state.last_log_index = state.last_log_index.max(log_index);
                }
            }
            Op::SessionEvicted { session_id } => {
                self.sessions.remove(session_id.as_str());
            }
            Op::ReadCursorMoved { session_id, cursor, .. } => {
                let Some(state) = self.sessions.get_mut(session_id.as_str()) else {
                    return;
                };
                if cursor.read_seq > state.read_cursor.read_seq {
                    state.read_cursor = *cursor;
                }
                state.last_log_index = state.last_log_index.max(log_index);
            }
        }
        self.applied_index = self.applied_index.max(log_index);
    }

    /// Installs a session loaded from the archive, unless it is already in memory.
    pub fn install(&mut self, loaded: LoadedSession, now: Instant) {
        let id = loaded.view.record.id.clone();
        if self.sessions.contains_key(&id) {
            return;
        }
        let view = loaded.view;
        let mut state = SessionState::new(view.record, now);
        state.status = view.status;
        state.read_cursor = view.read_cursor;
        state.updated_at = view.updated_at;
        state.last_activity = view.last_activity;
        let first_tail_seq = loaded.tail.first().map_or(view.last_seq + 1, |m| m.message.seq);
        state.last_seq = first_tail_seq - 1;
        state.archived_seq = state.last_seq;
        state.nonuser_count = view.nonuser_count;
        state.gaps = loaded.gaps;
        // The client ids older than the tail first (the tail adds its own): kept ascending.
        let window = loaded.client_ids;
        for (seq, client_id, fingerprint) in window.ids.iter().filter(|(seq, ..)| *seq < first_tail_seq) {
            state.remember_client_id(client_id, *seq, *fingerprint, 0);
        }
        for record in loaded.tail {
            // A hole in the archive's tail is a gap (seqs skipped after an accepted loss).
            if record.message.seq > state.last_seq + 1 {
                state.skip_seqs(record.message.seq - 1, record.message.inserted_at);
            }
            state.apply_message(Arc::new(record), None);
        }
        if view.last_seq > state.last_seq {
            state.skip_seqs(view.last_seq, view.updated_at);
        }
        state.gaps.sort_unstable();
        state.gaps.dedup();
        state.last_seq = view.last_seq;
        state.nonuser_count = view.nonuser_count;
        state.dispatch = view.dispatch;
        state.client_ids_complete_from = window.complete_from.min(first_tail_seq);
        self.sessions.insert(id, state);
    }

    pub fn mark_archived_through(&mut self, log_index: u64) {
        if log_index <= self.archived_index {
            return;
        }
        self.archived_index = log_index;
        for state in self.sessions.values_mut() {
            if !state.unarchived.is_empty() || state.client_ids.len() > super::session::CLIENT_ID_WINDOW {
                state.mark_archived_through(log_index);
            }
        }
    }

    /// Sessions `evict_idle` would forget now (oldest first is not promised).
    pub fn idle_sessions(&self, idle_for: Duration, now: Instant) -> impl Iterator<Item = &Arc<str>> {
        let archived_index = self.archived_index;
        self.sessions
            .iter()
            .filter(move |(_, state)| {
                state.last_log_index <= archived_index && now.duration_since(state.last_used) >= idle_for
            })
            .map(|(id, _)| id)
    }

    /// Forgets sessions unused for `idle_for` whose every record is archived; they are reloaded
    /// from the archive on demand.
    pub fn evict_idle(&mut self, idle_for: Duration, now: Instant) -> usize {
        let archived_index = self.archived_index;
        let before = self.sessions.len();
        self.sessions
            .retain(|_, state| state.last_log_index > archived_index || now.duration_since(state.last_used) < idle_for);
        before - self.sessions.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Message, MessageRecord, SessionRecord, Timestamp};
    use serde_json::value::RawValue;

    fn session(id: &str) -> Op {
        Op::SessionCreated(SessionRecord {
            id: Arc::from(id),
            user_id: "u".into(),
            agent_id: "a".into(),
            metadata: RawValue::from_string("{}".into()).unwrap(),
            inserted_at: Timestamp(1),
        })
    }

    fn message(id: &str, seq: u64) -> Op {
        Op::MessageAppended(MessageRecord {
            message: Message {
                id: format!("m{seq}"),
                session_id: Arc::from(id),
                seq,
                sender_id: "u".into(),
                kind: "text".into(),
                content: RawValue::from_string("{}".into()).unwrap(),
                metadata: RawValue::from_string("{}".into()).unwrap(),
                inserted_at: Timestamp(seq as i64),
            },
            client_id: Some(format!("c{seq}")),
            fingerprint: seq,
            nonuser_through: 0,
            from_user: true,
        })
    }

    #[test]
    fn the_hot_tail_is_bounded_and_unarchived_sessions_are_never_evicted() {
        let now = Instant::now();
        let mut state = ShardState::new(0);
        state.apply(&session("s"), 1, 0, now);
        for seq in 1..=200u64 {
            state.apply(&message("s", seq), seq + 1, 0, now);
        }
        let s = &state.sessions["s"];
        assert_eq!(s.hot_tail.len(), super::super::session::HOT_TAIL_LEN);
        assert_eq!(s.hot_tail_start(), 73);
        assert_eq!(s.unarchived.len(), 200);

        let later = now + Duration::from_secs(3600);
        assert_eq!(
            state.evict_idle(Duration::from_secs(60), later),
            0,
            "unarchived records pin the session"
        );
        state.mark_archived_through(100);
        assert_eq!(state.sessions["s"].archived_seq, 99);
        assert_eq!(state.evict_idle(Duration::from_secs(60), later), 0);
        state.mark_archived_through(201);
        assert!(state.sessions["s"].unarchived.is_empty());
        assert_eq!(
            state.evict_idle(Duration::from_secs(60), now),
            0,
            "recently used sessions stay"
        );
        assert_eq!(
            state.evict_idle(Duration::from_secs(60), later),
            1,
            "idle and archived: evicted"
        );
    }

    #[test]
    fn a_session_loaded_from_the_archive_knows_its_newest_client_ids() {
        use crate::archive::{ClientIdWindow, LoadedSession};
        use crate::shard::session::{CLIENT_ID_WINDOW, HOT_TAIL_LEN};
        let now = Instant::now();
        let last_seq = 2000u64;
        let Op::SessionCreated(record) = session("s") else {
            unreachable!()
        };
        let mut view = SessionState::new(record, now).view();
        view.last_seq = last_seq;
        let first_tail = last_seq - HOT_TAIL_LEN as u64 + 1;
        let tail = (first_tail..=last_seq)
            .map(|seq| match message("s", seq) {
                Op::MessageAppended(record) => record,
                _ => unreachable!(),
            })
            .collect();
        let window_from = last_seq - CLIENT_ID_WINDOW as u64 + 1;
        let ids = (window_from..=last_seq)
            .map(|seq| (seq, format!("c{seq}"), seq))
            .collect();
        let loaded = LoadedSession {
            view,
            tail,
            gaps: Vec::new(),
            client_ids: ClientIdWindow {
                ids,
                complete_from: window_from,
            },
        };
        let mut state = ShardState::new(0);
        state.install(loaded, now);
        let s = &state.sessions["s"];
        assert_eq!(s.client_ids_complete_from, window_from, "older ones need the archive");
        assert_eq!(s.client_ids.len(), CLIENT_ID_WINDOW);
        assert_eq!(
            s.client_ids["c1000"].seq, 1000,
            "beyond the hot tail, known from memory"
        );
        assert!(!s.client_ids.contains_key("c976"));
        let order: Vec<u64> = s.client_id_order.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(
            order,
            (window_from..=last_seq).collect::<Vec<_>>(),
            "ascending, each once"
        );
        assert_eq!(s.hot_tail_start(), first_tail);
    }

    #[test]
    fn a_started_turn_stays_open_until_its_dispatch_finishes() {
        let now = Instant::now();
        let mut state = ShardState::new(0);
        state.apply(&session("s"), 1, 0, now);
        state.apply(&message("s", 1), 2, 0, now);
        let turn_id = crate::ids::TurnId::derive("s", 1, 1);
        let started = Op::DispatchStarted {
            session_id: "s".into(),
            turn_id,
            through_seq: 1,
            history_seq: 1,
            at: Timestamp(2),
        };
        state.apply(&started, 3, 0, now);
        state.apply(&message("s", 2), 4, 0, now);
        let open = state.sessions["s"].dispatch.open_turn().expect("open");
        assert_eq!((open.id, open.through_seq, open.history_seq), (turn_id, 1, 1));
        let finished = Op::DispatchFinished {
            session_id: "s".into(),
            dispatch_id: turn_id.to_string(),
            through_seq: 1,
            error: None,
            at: Timestamp(3),
            cancelled: false,
        };
        state.apply(&finished, 5, 0, now);
        let dispatch = state.sessions["s"].dispatch;
        assert_eq!(dispatch.turn, None, "finished: nothing to resume");
        assert!(dispatch.is_pending(), "the message written meanwhile is still owed");
        // A start replayed after its turn finished (or an older start) opens nothing.
        state.apply(&started, 6, 0, now);
        assert_eq!(state.sessions["s"].dispatch.turn, None);
    }

    #[test]
    fn replaying_an_archived_message_changes_nothing() {
        let now = Instant::now();
        let mut state = ShardState::new(0);
        state.apply(&session("s"), 1, 0, now);
        state.apply(&message("s", 1), 2, 0, now);
        state.apply(&message("s", 1), 3, 0, now);
        assert_eq!(state.sessions["s"].last_seq, 1);
        assert_eq!(state.sessions["s"].hot_tail.len(), 1);
    }

    /// A replica that applies the leader's log (session loads and evictions included) holds the
    /// same sessions with the same counters as the leader, though the archive gave it nothing.
    #[test]
    fn a_replica_folding_the_log_holds_what_the_leader_holds() {
        use crate::archive::{ClientIdWindow, LoadedSession};
        let now = Instant::now();
        let Op::SessionCreated(record) = session("old") else {
            unreachable!()
        };
        // The leader loads "old" from the archive (40 messages, a turn answered through 38).
        let mut view = SessionState::new(record, now).view();
        view.last_seq = 40;
        view.nonuser_count = 19;
        view.dispatch.last_user_seq = 39;
        view.dispatch.answered_through = 38;
        let tail = (1..=40)
            .map(|seq| match message("old", seq) {
                Op::MessageAppended(record) => record,
                _ => unreachable!(),
            })
            .collect();
        let loaded = LoadedSession {
            view,
            tail,
            gaps: vec![(5, 6)],
            client_ids: ClientIdWindow {
                ids: Vec::new(),
                complete_from: 1,
            },
        };
        let mut leader = ShardState::new(10);
        leader.install(loaded, now);
        let summary = &leader.sessions["old"];
        let log = [
            (
                11,
                Op::SessionLoaded {
                    view: summary.view(),
                    gaps: summary.gaps.clone(),
                },
            ),
            (12, message("old", 41)),
            (13, session("new")),
            (14, message("new", 1)),
        ];
        let mut replica = ShardState::new(10);
        for (index, op) in &log {
            if !matches!(op, Op::SessionLoaded { .. }) {
                leader.apply(op, *index, 0, now);
            }
            replica.apply(op, *index, 0, now);
        }
        for id in ["old", "new"] {
            let (l, r) = (&leader.sessions[id], &replica.sessions[id]);
            assert_eq!(l.last_seq, r.last_seq, "{id}");
            assert_eq!(l.dispatch, r.dispatch, "{id}");
            assert_eq!(l.nonuser_count, r.nonuser_count, "{id}");
            assert_eq!(l.gaps, r.gaps, "{id}");
            assert_eq!(l.status, r.status, "{id}");
        }
        let old = &replica.sessions["old"];
        assert_eq!(old.last_seq, 41);
        assert_eq!(old.archived_seq, 40, "what the archive held, read from it on demand");
        assert_eq!(old.hot_tail_start(), 41, "only what the replica applied is in memory");
        assert_eq!(old.client_ids_complete_from, 41, "older client ids are the archive's");
        assert!(old.client_ids.contains_key("c41"));
        assert_eq!(replica.applied_index, 14);

        let evicted = Op::SessionEvicted {
            session_id: "old".into(),
        };
        leader.apply(&evicted, 15, 0, now);
        replica.apply(&evicted, 15, 0, now);
        assert!(!leader.sessions.contains_key("old") && !replica.sessions.contains_key("old"));
        assert!(replica.sessions.contains_key("new"));
    }
}
