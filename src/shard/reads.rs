//! Reads through the router: a page of a session's messages (the writer's plan completed from
//! the hot tail, the WAL and the archive, merged by seq, bounded in bytes), and the in-memory
//! views that overlay a listing's archived ones.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::session::WalPosition;
use super::writer::Command;
use super::{MAX_ROUNDS, ShardError, Shards, ops, page_budget, routing};
use crate::model::{MessageRecord, SessionView};

pub struct ReadPlan {
    pub hot: Vec<Arc<MessageRecord>>,
    pub wal: Vec<WalPosition>,
    pub archive_range: Option<(u64, u64)>,
    pub has_more: bool,
    pub last_seq: u64,
    pub session: SessionView,
    /// The session's gaps as the writer knows them (older ones may only be in the archive).
    pub gaps: Vec<(u64, u64)>,
}

pub struct MessagePage {
    pub messages: Vec<Arc<MessageRecord>>,
    pub has_more: bool,
    pub session: SessionView,
}

impl Shards {
    pub(super) async fn read_one(&self, session_id: &str, seq: u64) -> Result<Arc<MessageRecord>, ShardError> {
        let page = self.read_messages_here(session_id, seq - 1, 1).await?;
        page.messages
            .into_iter()
            .next()
            .ok_or_else(|| ShardError::Unavailable(format!("message {seq} is missing")))
    }

    /// Messages with `seq > after_seq`, ascending, at most `limit`: hot tail, WAL and archive
    /// merged by seq. A WAL segment deleted between plan and read (the archive has it by then)
    /// makes the plan stale; it is then made again.
    pub async fn read_messages(
        &self,
        session_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<MessagePage, ShardError> {
        if self.clustered() {
            let call = routing::ShardCall::ReadMessages {
                session_id: session_id.to_string(),
                after_seq,
                limit,
            };
            return self.routed(call).await?.page();
        }
        self.read_messages_here(session_id, after_seq, limit).await
    }

    pub(super) async fn read_messages_here(
        &self,
        session_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<MessagePage, ShardError> {
        let mut last_problem = String::new();
        for _ in 0..MAX_ROUNDS {
            let plan = self
                .with_session(session_id, |reply| Command::PlanRead {
                    session_id: session_id.to_string(),
                    after_seq,
                    limit,
                    reply,
                })
                .await?;
            match self.execute_plan(session_id, plan).await {
                Ok(page) => return Ok(page),
                Err(problem) => last_problem = problem,
            }
        }
        Err(ShardError::Unavailable(format!(
            "could not read messages: {last_problem}"
        )))
    }

    async fn execute_plan(&self, session_id: &str, plan: ReadPlan) -> Result<MessagePage, String> {
        // Bounded in bytes as well as in count: a page ends at `MAX_PAGE_BYTES` and the rest
        // comes with the next request (`has_more`).
        let mut page = page_budget::PageBudget::new(page_budget::MAX_PAGE_BYTES);
        let mut messages: Vec<Arc<MessageRecord>> = Vec::new();
        if let Some((from, to)) = plan.archive_range {
            let archived = self
                .inner
                .archive_reads
                .read(&self.inner.archive, session_id, from, to, page.left())
                .await?;
            page.take_archived(&archived, to, &mut messages);
        }
        if page.is_full() && !(plan.wal.is_empty() && plan.hot.is_empty()) {
            page.cut_short();
        } else {
            if !plan.wal.is_empty() {
                let (from_wal, complete) = self.read_from_wal(session_id, &plan.wal).await?;
                page.take(from_wal, &mut messages);
                if !complete {
                    // The WAL's own read budget stopped short.
                    page.cut_short();
                }
            }
            if !page.was_cut() {
                page.take(plan.hot, &mut messages);
            }
        }
        let mut gaps = plan.gaps;
        let mut asked_archive = false;
        for pair in messages.windows(2) {
            let (before, after) = (pair[0].message.seq, pair[1].message.seq);
            if after == before + 1 {
                continue;
            }
            // Only seqs skipped after an accepted loss may be missing.
            let covered = |gaps: &[(u64, u64)]| {
                gaps.iter()
                    .any(|(from, through)| *from <= before + 1 && after - 1 <= *through)
            };
            if !covered(&gaps) && !asked_archive {
                asked_archive = true;
                gaps.extend(
                    self.inner
                        .archive
                        .session_gaps(session_id)
                        .await
                        .map_err(|e| e.to_string())?,
                );
            }
            if !covered(&gaps) {
                return Err(format!("gap between seq {before} and {after}"));
            }
        }
        Ok(MessagePage {
            messages,
            has_more: plan.has_more || page.was_cut(),
            session: plan.session,
        })
    }

    async fn read_from_wal(
        &self,
        session_id: &str,
        positions: &[WalPosition],
    ) -> Result<(Vec<Arc<MessageRecord>>, bool), String> {
        let shard = self.shard_of(session_id);
        let wal = self.inner.wal.clone();
        let positions = positions.to_vec();
        let tagged = self.clustered();
        tokio::task::spawn_blocking(move || {
            // Only the entries that hold the wanted messages, each once (runs of neighbouring
            // indexes read together), never everything between the first and the last.
            let mut ranges: Vec<crate::wal::EntryRange> = Vec::new();
            for index in positions.iter().map(|p| p.log_index) {
                match ranges.last_mut() {
                    Some(range) if range.from_index + range.max_entries as u64 == index => range.max_entries += 1,
                    Some(range) if range.from_index + range.max_entries as u64 > index => {}
                    _ => ranges.push(crate::wal::EntryRange {
                        shard,
                        from_index: index,
                        max_entries: 1,
                    }),
                }
            }
            let mut entries: BTreeMap<u64, Vec<ops::Op>> = BTreeMap::new();
            for run in wal.read_ranges(&ranges).map_err(|e| e.to_string())? {
                for (log_id, body) in run {
                    let command = match tagged {
                        true => match crate::consensus::command_in_record(&body)? {
                            Some(command) => command,
                            None => continue,
                        },
                        false => &body[..],
                    };
                    entries.insert(log_id.index, ops::decode_entry(command).map_err(|e| e.to_string())?);
                }
            }
            // The WAL's read budget may stop short: the page then ends at the last entry read.
            let read_through = entries.keys().next_back().copied().unwrap_or(0);
            let mut records = Vec::with_capacity(positions.len());
            for position in positions.iter().take_while(|p| p.log_index <= read_through) {
                match entries
                    .get(&position.log_index)
                    .and_then(|ops| ops.get(position.op_position as usize))
                {
                    Some(ops::Op::MessageAppended(record)) if record.message.seq == position.seq => {
                        records.push(Arc::new(record.clone()));
                    }
                    _ => {
                        return Err(format!(
                            "wal entry {} no longer holds seq {}",
                            position.log_index, position.seq
                        ));
                    }
                }
            }
            if records.is_empty() {
                return Err("the wal returned none of the entries asked for".to_string());
            }
            let complete = records.len() == positions.len();
            Ok((records, complete))
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Replaces archive views with the shards' in-memory views where a shard holds the session
    /// (the archive may lag; a session not in memory has nothing unarchived). In a cluster each
    /// shard's part is answered by its leader under its lease: when no leader can answer for a
    /// shard, the listing fails (`NoLeader`) rather than show the archive's possibly stale views.
    pub async fn overlay(&self, views: Vec<SessionView>) -> Result<Vec<SessionView>, ShardError> {
        let mut by_shard: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
        for (position, view) in views.iter().enumerate() {
            by_shard
                .entry(self.shard_of(&view.record.id))
                .or_default()
                .push(position);
        }
        let mut views = views;
        for (shard, positions) in by_shard {
            let part: Vec<SessionView> = positions.iter().map(|p| views[*p].clone()).collect();
            let fresh = if self.clustered() {
                // In parts bounded in bytes (they travel to the leader and back). A part no
                // leader can answer fails the listing (`no_leader`): the archive's views may be
                // stale, and every read is linearizable.
                let mut fresh = Vec::with_capacity(part.len());
                for part in routing::overlay_parts(part) {
                    let views = self
                        .routed(routing::ShardCall::Overlay { shard, views: part })
                        .await?
                        .views()?;
                    fresh.extend(views);
                }
                fresh
            } else {
                self.overlay_here(shard, part).await
            };
            if fresh.len() != positions.len() {
                return Err(ShardError::Unavailable(
                    "the leader answered a listing with the wrong number of sessions".into(),
                ));
            }
            for (position, fresh) in positions.into_iter().zip(fresh) {
                views[position] = fresh;
            }
        }
        Ok(views)
    }

    /// `views` (all of `shard`) with the shard writer's in-memory view where it has one.
    pub(super) async fn overlay_here(&self, shard: u16, views: Vec<SessionView>) -> Vec<SessionView> {
        let session_ids = views.iter().map(|view| view.record.id.clone()).collect();
        let (reply, answer) = oneshot::channel();
        if self.inner.senders[shard as usize]
            .send(Command::Overlay { session_ids, reply })
            .await
            .is_err()
        {
            return views;
        }
        let Ok(fresh) = answer.await else { return views };
        views
            .into_iter()
            .zip(fresh)
            .map(|(archived, fresh)| fresh.unwrap_or(archived))
            .collect()
    }
}
