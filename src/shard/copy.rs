//! A replica's copy of its shard's state, taken from the member that leads the shard (cluster
//! mode): what lets a member whose copy is not current (restarted, or its fold broken off) hold
//! one again without the archive.
//!
//! A copy is the leader's state at a committed log index `through`, exactly as the fold left it,
//! except the hot tails (messages are read from the WAL while unarchived, from the archive after):
//! every session in memory with its summary, the WAL positions of its unarchived messages and its
//! client-id window. Log indexes and operation positions are the same on every member (Raft's log
//! matching), so the positions are valid in the recipient's own log once that log reaches
//! `through`. The recipient then replays its own committed entries past `through` (no archive
//! read: the copy holds every session those entries name, or they bring it themselves).
//!
//! It travels as JSON (`encode`), in parts of at most `PART_BYTES`, so no peer answer nears the
//! peer answer limit however large the shard's unarchived backlog.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::session::{ClientIdEntry, SessionState, WalPosition};
use super::state::ShardState;
use crate::archive::ShardLoss;
use crate::model::{SessionView, Timestamp};

/// Bytes of an encoded copy one peer answer carries (base64 makes them 4/3 as many on the wire,
/// still far below the peer answer limit).
pub const PART_BYTES: usize = 2 * 1024 * 1024;

/// The largest copy a member accepts (a shard's sessions in memory are bounded by the WAL's
/// budget of unarchived entries; this only stops a corrupt length from exhausting memory).
pub const MAX_COPY_BYTES: usize = 4 * 1024 * 1024 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardCopy {
    pub shard: u16,
    /// The committed log index the copy is the state at.
    pub through: u64,
    /// Log index up to which the archive held everything, as the leader knew it.
    pub archived_index: u64,
    /// The newest `inserted_at` the leader handed out (a new leader's timestamps stay ahead).
    pub last_inserted_at: i64,
    /// Losses of the shard's log an operator accepted (see `ShardLoss`).
    pub losses: Vec<CopiedLoss>,
    pub sessions: Vec<CopiedSession>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct CopiedLoss {
    pub after_index: u64,
    pub skip_seqs: u64,
    pub recorded_at: Timestamp,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CopiedSession {
    pub view: SessionView,
    pub archived_seq: u64,
    pub gaps: Vec<(u64, u64)>,
    pub last_log_index: u64,
    /// `(seq, log_index, op_position)` of each unarchived message, ascending.
    pub unarchived: Vec<(u64, u64, u32)>,
    /// `(client_id, seq, fingerprint, log_index)`, ascending by seq (the window's order).
    pub client_ids: Vec<(String, u64, u64, u64)>,
    pub client_ids_complete_from: u64,
}

impl ShardCopy {
    /// The copy of `state` (which must be the committed log through `state.applied_index`).
    pub fn of(shard: u16, state: &ShardState, last_inserted_at: i64, losses: &[ShardLoss]) -> ShardCopy {
        let sessions = state
            .sessions
            .values()
            .map(|session| CopiedSession {
                view: session.view(),
                archived_seq: session.archived_seq,
                gaps: session.gaps.clone(),
                last_log_index: session.last_log_index,
                unarchived: session
                    .unarchived
                    .iter()
                    .map(|p| (p.seq, p.log_index, p.op_position))
                    .collect(),
                client_ids: session
                    .client_id_order
                    .iter()
                    // An id used again later is listed at its newest seq only.
                    .filter_map(|(seq, client_id)| {
                        let entry = session.client_ids.get(client_id)?;
                        (entry.seq == *seq).then(|| (client_id.to_string(), *seq, entry.fingerprint, entry.log_index))
                    })
                    .collect(),
                client_ids_complete_from: session.client_ids_complete_from,
            })
            .collect();
        ShardCopy {
            shard,
            through: state.applied_index,
            archived_index: state.archived_index,
            last_inserted_at,
            losses: losses
                .iter()
                .map(|loss| CopiedLoss {
                    after_index: loss.after_index,
                    skip_seqs: loss.skip_seqs,
                    recorded_at: loss.recorded_at,
                })
                .collect(),
            sessions,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a shard copy always encodes")
    }

    pub fn decode(bytes: &[u8]) -> Result<ShardCopy, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("undecodable shard copy: {e}"))
    }

    pub fn losses(&self) -> Vec<ShardLoss> {
        self.losses
            .iter()
            .map(|loss| ShardLoss {
                after_index: loss.after_index,
                skip_seqs: loss.skip_seqs,
                recorded_at: loss.recorded_at,
            })
            .collect()
    }

    /// The state the copy describes (hot tails empty).
    pub fn into_state(self, now: Instant) -> ShardState {
        let mut state = ShardState::new(self.archived_index);
        state.applied_index = self.through;
        for copied in self.sessions {
            let view = copied.view;
            let id = view.record.id.clone();
            let mut session = SessionState::new(view.record, now);
            session.status = view.status;
            session.last_seq = view.last_seq;
            session.nonuser_count = view.nonuser_count;
            session.read_cursor = view.read_cursor;
            session.last_activity = view.last_activity;
            session.updated_at = view.updated_at;
            session.dispatch = view.dispatch;
            session.archived_seq = copied.archived_seq;
            session.gaps = copied.gaps;
            session.last_log_index = copied.last_log_index;
            session.unarchived = copied
                .unarchived
                .into_iter()
                .map(|(seq, log_index, op_position)| WalPosition {
                    seq,
                    log_index,
                    op_position,
                })
                .collect::<VecDeque<_>>();
            for (client_id, seq, fingerprint, log_index) in copied.client_ids {
                let client_id: Arc<str> = Arc::from(client_id);
                session.client_ids.insert(
                    client_id.clone(),
                    ClientIdEntry {
                        seq,
                        fingerprint,
                        log_index,
                    },
                );
                session.client_id_order.push_back((seq, client_id));
            }
            session.client_ids_complete_from = copied.client_ids_complete_from;
            state.sessions.insert(id, session);
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Message, MessageRecord, SessionRecord};
    use crate::shard::ops::Op;
    use serde_json::value::RawValue;

    fn created(id: &str) -> Op {
        Op::SessionCreated(SessionRecord {
            id: Arc::from(id),
            user_id: "u".into(),
            agent_id: "a".into(),
            metadata: RawValue::from_string(r#"{"k":1}"#.into()).unwrap(),
            inserted_at: Timestamp(1_000_001),
        })
    }

    fn appended(id: &str, seq: u64, client_id: Option<&str>) -> Op {
        Op::MessageAppended(MessageRecord {
            message: Message {
                id: format!("m{seq}"),
                session_id: Arc::from(id),
                seq,
                sender_id: if seq % 2 == 1 { "u".into() } else { "agent".into() },
                kind: "text".into(),
                content: RawValue::from_string(format!(r#"{{"text":"hello {seq}"}}"#)).unwrap(),
                metadata: RawValue::from_string("{}".into()).unwrap(),
                inserted_at: Timestamp(2_000_000 + seq as i64),
            },
            client_id: client_id.map(str::to_string),
            fingerprint: seq * 7,
            nonuser_through: seq / 2,
            from_user: seq % 2 == 1,
        })
    }

    /// Everything but the hot tail, as comparable text.
    fn describe(state: &ShardState) -> Vec<String> {
        let mut sessions: Vec<String> = state
            .sessions
            .values()
            .map(|s| {
                format!(
                    "{} {:?} last={} nonuser={} cursor={:?} updated={:?} dispatch={:?} archived_seq={} gaps={:?} \
                     last_log={} unarchived={:?} ids={:?} complete_from={} activity={}",
                    s.record.id,
                    s.status,
                    s.last_seq,
                    s.nonuser_count,
                    s.read_cursor,
                    s.updated_at,
                    s.dispatch,
                    s.archived_seq,
                    s.gaps,
                    s.last_log_index,
                    s.unarchived,
                    s.client_id_order
                        .iter()
                        .map(|(seq, id)| (
                            seq,
                            id.to_string(),
                            s.client_ids[id].fingerprint,
                            s.client_ids[id].log_index
                        ))
                        .collect::<Vec<_>>(),
                    s.client_ids_complete_from,
                    serde_json::to_string(&s.view().last_activity).unwrap(),
                )
            })
            .collect();
        sessions.sort();
        sessions.push(format!(
            "applied={} archived={}",
            state.applied_index, state.archived_index
        ));
        sessions
    }

    #[test]
    fn a_copy_is_the_state_it_was_taken_of_and_folds_on_the_same() {
        let now = Instant::now();
        let mut leader = ShardState::new(0);
        let mut index = 0;
        let fold = |state: &mut ShardState, ops: Vec<Op>, index: &mut u64| {
            *index += 1;
            for (position, op) in ops.iter().enumerate() {
                state.apply(op, *index, position as u32, now);
            }
        };
        fold(&mut leader, vec![created("a"), created("b")], &mut index);
        for seq in 1..=40u64 {
            let client_id = format!("c{seq}");
            fold(
                &mut leader,
                vec![
                    appended("a", seq, (seq % 3 != 0).then_some(client_id.as_str())),
                    appended("b", seq, None),
                ],
                &mut index,
            );
        }
        leader.mark_archived_through(20);
        let copy = ShardCopy::of(3, &leader, 2_000_040, &[]);
        assert_eq!(copy.through, index);
        let decoded = ShardCopy::decode(&copy.encode()).expect("decodes");
        let mut replica = decoded.into_state(now);
        assert_eq!(describe(&replica), describe(&leader));

        // Both fold the next entries alike.
        let mut replica_index = index;
        let next = |seq: u64| vec![appended("a", seq, Some("again")), created("c")];
        fold(&mut leader, next(41), &mut index);
        fold(&mut replica, next(41), &mut replica_index);
        leader.mark_archived_through(35);
        replica.mark_archived_through(35);
        assert_eq!(describe(&replica), describe(&leader));
        assert_eq!(
            replica.sessions["a"].wal_position(30),
            leader.sessions["a"].wal_position(30)
        );
        assert!(
            replica.sessions["a"].hot_tail.len() == 1,
            "only what was applied after the copy"
        );
    }

    #[test]
    fn a_damaged_copy_is_refused() {
        let copy = ShardCopy::of(0, &ShardState::new(5), 0, &[]);
        let mut bytes = copy.encode();
        bytes.truncate(bytes.len() / 2);
        assert!(ShardCopy::decode(&bytes).is_err());
    }
}
