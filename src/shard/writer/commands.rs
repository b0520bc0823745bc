//! The leader's write path: each command validated against the state and turned into
//! operations of the batch being built, and the reads answered from it.

use super::*;

impl ShardWriter {
    pub(super) fn handle(&mut self, command: Command, batch: &mut Batch, now: Instant) {
        let command = match command {
            Command::CopyArrived { copy } => return self.on_copy_arrived(copy),
            Command::ExportCopy { reply } if self.cluster.as_ref().is_some_and(|l| l.leading_term().is_some()) => {
                // Answered once the batches in flight (this one included) are committed.
                return self.cluster.as_mut().expect("cluster mode").exports_waiting.push(reply);
            }
            Command::ExportCopy { reply } if self.cluster.is_none() => {
                let _ = reply.send(Err(ShardError::Unavailable("a single node has no replicas".into())));
                return;
            }
            command => command,
        };
        if let Some(link) = &self.cluster
            && link.leading_term().is_none()
        {
            match command {
                // A follower's copy of the state learns what the archive holds, as the leader's.
                Command::Archived { through_index } => self.state.mark_archived_through(through_index),
                Command::ArchiveRegressed { reason } => self.refuse_for_regressed_archive(reason),
                command => refuse_as_follower(command, link.known_leader(self.shard)),
            }
            return;
        }
        match command {
            Command::Install { loaded, epoch } => {
                if epoch != self.epoch() {
                    // Read before the state changed: possibly stale. The request that asked
                    // for it finds the session still missing and loads it again.
                    metrics::counter!("fleetlm_stale_session_loads_total").increment(1);
                    return;
                }
                let session_id = loaded.view.record.id.clone();
                self.state.install(*loaded, now);
                if self.cluster.is_some() {
                    self.log_session_loaded(&session_id, batch, now);
                }
                if !self.losses.is_empty() {
                    self.skip_for_losses(&session_id, batch, now);
                }
            }
            Command::Archived { through_index } => self.state.mark_archived_through(through_index),
            Command::ArchiveRegressed { reason } => self.refuse_for_regressed_archive(reason),
            Command::Sweep { idle_for } => {
                let evicted = match self.cluster {
                    Some(_) => self.log_evictions(idle_for, batch, now),
                    None => self.state.evict_idle(idle_for, now),
                };
                if evicted > 0 {
                    self.writer_state
                        .epoch
                        .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                    metrics::counter!("fleetlm_sessions_evicted_total").increment(evicted as u64);
                }
                metrics::gauge!("fleetlm_active_sessions", "shard" => self.shard.to_string())
                    .set(self.state.sessions.len() as f64);
            }
            Command::Overlay { session_ids, reply } => {
                let views = session_ids
                    .iter()
                    .map(|id| self.state.sessions.get(id).map(SessionState::view))
                    .collect();
                // Views of state that failed to become durable are never shown.
                batch.replies.push(Box::new(move |failure| {
                    let views = match failure {
                        Some(_) => vec![None; session_ids.len()],
                        None => views,
                    };
                    let _ = reply.send(views);
                }));
            }
            Command::View { session_id, reply } => {
                let result = self.session(&session_id, now).map(|s| s.view());
                batch.replies.push(defer(reply, result));
            }
            Command::PlanRead {
                session_id,
                after_seq,
                limit,
                reply,
            } => {
                let result = self
                    .session(&session_id, now)
                    .and_then(|s| plan_read(s, after_seq, limit));
                batch.replies.push(defer(reply, result));
            }
            Command::Create {
                session,
                known_absent,
                reply,
            } => {
                let result = self.create(session, known_absent, batch, now);
                batch.replies.push(defer(reply, result));
            }
            Command::Append { request, order, reply } => {
                let result = match &order {
                    // Storing it would overtake the one before, which is on a round trip.
                    Some(ticket) if ticket.behind_a_bounce() => Ok(AppendOutcome::Behind(request)),
                    _ => self.append(request, batch, now),
                };
                if let (Some(ticket), Ok(outcome)) = (&order, &result)
                    && outcome.is_bounce()
                {
                    ticket.mark_bounced();
                }
                batch.replies.push(defer(reply, result));
            }
            Command::Archive { session_id, reply } => {
                let result = self.archive_session(&session_id, batch, now);
                batch.replies.push(defer(reply, result));
            }
            Command::FinishDispatch {
                session_id,
                dispatch_id,
                through_seq,
                error,
                cancelled,
                only_if_owed,
                leader_term,
                reply,
            } => {
                let end = DispatchEnd {
                    dispatch_id,
                    through_seq,
                    error,
                    cancelled,
                    only_if_owed,
                    leader_term,
                };
                let result = self.finish_dispatch(session_id, end, batch, now);
                batch.replies.push(defer(reply, result));
            }
            Command::StartDispatch {
                session_id,
                turn,
                leader_term,
                reply,
            } => {
                let result = self.start_dispatch(session_id, turn, leader_term, batch, now);
                batch.replies.push(defer(reply, result));
            }
            Command::PendingDispatches { reply } => {
                let owing = self
                    .state
                    .sessions
                    .values()
                    .filter(|s| s.dispatch.is_pending() && s.status == SessionStatus::Active)
                    .map(|s| (s.record.id.clone(), s.record.agent_id.clone(), s.dispatch.last_user_seq))
                    .collect();
                batch.replies.push(Box::new(move |failure| {
                    let _ = reply.send(if failure.is_some() { Vec::new() } else { owing });
                }));
            }
            // Taken care of above.
            Command::ExportCopy { .. } | Command::CopyArrived { .. } => {}
            Command::MoveReadCursor {
                session_id,
                user_id,
                read_seq,
                known,
                reply,
            } => {
                let result = self.move_read_cursor(&session_id, &user_id, read_seq, known, batch, now);
                batch.replies.push(defer(reply, result));
            }
        }
    }

    /// Cluster: records that the leader installed a session from the archive, so every replica
    /// holds it too (`Op::SessionLoaded`). A replica that misses it (the op did not fit) rebuilds
    /// its copy when the session's next operation arrives.
    pub(super) fn log_session_loaded(&mut self, session_id: &Arc<str>, batch: &mut Batch, now: Instant) {
        let Some(session) = self.state.sessions.get(session_id) else {
            return;
        };
        let op = Op::SessionLoaded {
            view: session.view(),
            gaps: session.gaps.clone(),
        };
        if let Err(error) = self.push_op(op, batch, now) {
            tracing::warn!(shard = self.shard, %session_id, %error, "could not record a session load for the replicas");
        }
    }

    /// Cluster: forgets idle sessions whose records are all archived, through the log
    /// (`Op::SessionEvicted`), so every replica forgets the same ones. At most what fits the
    /// batch; the rest at the next sweep. Returns how many.
    pub(super) fn log_evictions(&mut self, idle_for: Duration, batch: &mut Batch, now: Instant) -> usize {
        let idle: Vec<Arc<str>> = self.state.idle_sessions(idle_for, now).cloned().collect();
        let mut evicted = 0;
        for session_id in idle {
            if batch.encoder.len() >= self.entry_soft_limit_bytes {
                break;
            }
            let op = Op::SessionEvicted {
                session_id: session_id.to_string(),
            };
            if self.push_op(op, batch, now).is_err() {
                break;
            }
            evicted += 1;
        }
        evicted
    }

    pub(super) fn session(&mut self, session_id: &str, now: Instant) -> Result<&mut SessionState, ShardError> {
        let state = self.state.sessions.get_mut(session_id).ok_or(ShardError::NotLoaded)?;
        state.last_used = now;
        Ok(state)
    }

    pub(super) fn writable(&self) -> Result<(), ShardError> {
        if let Some(refusal) = &self.refusal {
            return Err(refusal.clone());
        }
        // Segments kept only for degraded or archive-stalled shards do not count against a
        // flowing shard (`Wal::budget_bytes`, docs/OPERATIONS.md "WAL budget").
        if self.wal.budget_bytes(self.shard) > self.wal_budget_bytes {
            return Err(ShardError::Overloaded);
        }
        Ok(())
    }

    pub(super) fn next_timestamp(&mut self) -> crate::model::Timestamp {
        let now = self.clock.now_micros().max(self.last_inserted_at);
        self.last_inserted_at = now;
        crate::model::Timestamp(now)
    }

    pub(super) fn create(
        &mut self,
        mut session: SessionRecord,
        known_absent: Option<u64>,
        batch: &mut Batch,
        now: Instant,
    ) -> Result<SessionView, ShardError> {
        if self.state.sessions.contains_key(&session.id) {
            return Err(ShardError::SessionExists);
        }
        if known_absent != Some(self.epoch()) {
            // Not looked up in the archive, or looked up before the state changed.
            return Err(ShardError::NotLoaded);
        }
        self.writable()?;
        session.inserted_at = self.next_timestamp();
        let id = session.id.clone();
        self.push_op(Op::SessionCreated(session), batch, now)?;
        Ok(self.state.sessions[&id].view())
    }

    pub(super) fn append(
        &mut self,
        request: Box<AppendRequest>,
        batch: &mut Batch,
        now: Instant,
    ) -> Result<AppendOutcome, ShardError> {
        let Some(session) = self.state.sessions.get_mut(request.session_id.as_str()) else {
            return Ok(AppendOutcome::NotLoaded(request));
        };
        session.last_used = now;
        let is_user = request.sender_is_user;
        let participant = if is_user {
            session.record.user_id == request.sender_id
        } else {
            session.record.agent_id == request.sender_id
        };
        if !participant {
            return Err(ShardError::NotParticipant);
        }
        if let Some(term) = request.leader_term
            && self.cluster.as_ref().and_then(ClusterLink::leading_term) != Some(term)
        {
            return Err(ShardError::Superseded);
        }
        if let Some(client_id) = &request.client_id {
            if let Some(entry) = session.client_ids.get(client_id.as_str()) {
                return if entry.fingerprint == request.fingerprint {
                    Ok(AppendOutcome::Duplicate { seq: entry.seq })
                } else {
                    Err(ShardError::ClientIdConflict)
                };
            }
            let checked = request
                .archive_checked_below
                .is_some_and(|below| below >= session.client_ids_complete_from);
            if session.client_ids_complete_from > 1 && !checked {
                let below = session.client_ids_complete_from;
                return Ok(AppendOutcome::CheckClientIdInArchive { below, request });
            }
        }
        if session.status == SessionStatus::Archived {
            return Err(ShardError::Archived);
        }
        if let Some(expected) = request.expected_seq
            && expected != session.last_seq
        {
            return Err(ShardError::SeqConflict {
                last_seq: session.last_seq,
            });
        }
        let nonuser_through = session.nonuser_count + u64::from(!is_user);
        let seq = session.last_seq + 1;
        let session_id = session.record.id.clone();
        self.writable()?;
        let request = *request;
        let message = crate::model::Message {
            id: ids::generate_id(),
            session_id: session_id.clone(),
            seq,
            sender_id: request.sender_id,
            kind: request.kind,
            content: request.content,
            metadata: request.metadata,
            inserted_at: self.next_timestamp(),
        };
        let record = MessageRecord {
            message,
            client_id: request.client_id,
            fingerprint: request.fingerprint,
            nonuser_through,
            from_user: is_user,
        };
        self.push_op(Op::MessageAppended(record), batch, now)?;
        let stored = self.state.sessions[&session_id]
            .hot_message(seq)
            .expect("just appended")
            .clone();
        Ok(AppendOutcome::Appended(stored))
    }

    pub(super) fn finish_dispatch(
        &mut self,
        session_id: String,
        end: DispatchEnd,
        batch: &mut Batch,
        now: Instant,
    ) -> Result<bool, ShardError> {
        if let Some(term) = end.leader_term
            && self.cluster.as_ref().and_then(ClusterLink::leading_term) != Some(term)
        {
            return Err(ShardError::Superseded);
        }
        let progress = self.session(&session_id, now)?.dispatch;
        if end.only_if_owed && !(progress.is_pending() && progress.answered_through < end.through_seq) {
            return Ok(false);
        }
        self.writable()?;
        let at = self.next_timestamp();
        let error = end.error.map(|text| truncate_chars(text, MAX_DISPATCH_ERROR_CHARS));
        self.push_op(
            Op::DispatchFinished {
                session_id,
                dispatch_id: end.dispatch_id,
                through_seq: end.through_seq,
                error,
                at,
                cancelled: end.cancelled,
            },
            batch,
            now,
        )?;
        Ok(true)
    }

    pub(super) fn archive_session(
        &mut self,
        session_id: &str,
        batch: &mut Batch,
        now: Instant,
    ) -> Result<SessionView, ShardError> {
        let session = self.session(session_id, now)?;
        if session.status == SessionStatus::Archived {
            return Ok(session.view());
        }
        self.writable()?;
        let at = self.next_timestamp();
        self.push_op(
            Op::SessionArchived {
                session_id: session_id.to_string(),
                at,
            },
            batch,
            now,
        )?;
        Ok(self.state.sessions[session_id].view())
    }

    pub(super) fn move_read_cursor(
        &mut self,
        session_id: &str,
        user_id: &str,
        read_seq: u64,
        known: Option<ReadCursor>,
        batch: &mut Batch,
        now: Instant,
    ) -> Result<SessionView, ShardError> {
        let session = self.session(session_id, now)?;
        if session.record.user_id != user_id {
            return Err(ShardError::NotParticipant);
        }
        let target = read_seq.min(session.last_seq);
        if target <= session.read_cursor.read_seq {
            return Ok(session.view());
        }
        let cursor = match session.hot_message(target) {
            Some(record) => ReadCursor {
                read_seq: target,
                nonuser_through: record.nonuser_through,
            },
            None => match known {
                Some(cursor) if cursor.read_seq == target => cursor,
                _ => return Err(ShardError::NeedsCursorAt { seq: target }),
            },
        };
        self.writable()?;
        let at = self.next_timestamp();
        self.push_op(
            Op::ReadCursorMoved {
                session_id: session_id.to_string(),
                cursor,
                at,
            },
            batch,
            now,
        )?;
        Ok(self.state.sessions[session_id].view())
    }
}

/// Answers a command this cluster member cannot serve: it does not lead the shard (the router
/// sends it to the leader).
pub(super) fn refuse_as_follower(command: Command, leader: Option<u64>) {
    pub(super) fn refuse<T>(reply: Reply<T>, leader: Option<u64>) {
        let _ = reply.send(Err(ShardError::NotLeader { leader }));
    }
    match command {
        Command::Create { reply, .. } | Command::Archive { reply, .. } | Command::View { reply, .. } => {
            refuse(reply, leader)
        }
        Command::MoveReadCursor { reply, .. } => refuse(reply, leader),
        Command::Append { reply, .. } => refuse(reply, leader),
        Command::PlanRead { reply, .. } => refuse(reply, leader),
        Command::FinishDispatch { reply, .. } => refuse(reply, leader),
        Command::StartDispatch { reply, .. } => refuse(reply, leader),
        Command::ExportCopy { reply } => refuse(reply, leader),
        Command::Overlay { session_ids, reply } => {
            let _ = reply.send(vec![None; session_ids.len()]);
        }
        Command::PendingDispatches { reply } => {
            let _ = reply.send(Vec::new());
        }
        Command::Install { .. }
        | Command::Archived { .. }
        | Command::Sweep { .. }
        | Command::CopyArrived { .. }
        | Command::ArchiveRegressed { .. } => {}
    }
}

/// How a dispatch ended (`Command::FinishDispatch`).
pub(super) struct DispatchEnd {
    dispatch_id: String,
    through_seq: u64,
    error: Option<String>,
    cancelled: bool,
    only_if_owed: bool,
    leader_term: Option<u64>,
}

/// A dispatch's error text kept in the log (the full text goes to the server's log).
pub(super) const MAX_DISPATCH_ERROR_CHARS: usize = 1024;

pub(super) fn truncate_chars(text: String, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => text[..cut].to_string(),
        None => text,
    }
}

/// The first seq at or after `seq` that is not in one of the session's gaps.
pub(super) fn skip_gaps(session: &SessionState, mut seq: u64) -> u64 {
    while let Some((_, through)) = session.gap_containing(seq) {
        if through == u64::MAX {
            return u64::MAX;
        }
        seq = through + 1;
    }
    seq
}

/// Which messages of the next `limit` after `after_seq` come from memory, the WAL and the archive
/// (seqs in a gap hold no message and are not counted).
pub(super) fn plan_read(session: &SessionState, after_seq: u64, limit: usize) -> Result<ReadPlan, ShardError> {
    let last_seq = session.last_seq;
    let first = after_seq.saturating_add(1);
    let mut last = after_seq;
    let mut count = 0;
    let mut seq = skip_gaps(session, first);
    while count < limit && seq <= last_seq {
        last = seq;
        count += 1;
        seq = skip_gaps(session, seq.saturating_add(1));
    }
    let mut plan = ReadPlan {
        hot: Vec::new(),
        wal: Vec::new(),
        archive_range: None,
        has_more: skip_gaps(session, last.saturating_add(1)) <= last_seq,
        last_seq,
        session: session.view(),
        gaps: session.gaps.clone(),
    };
    if count == 0 {
        return Ok(plan);
    }
    let hot_start = session.hot_tail_start();
    let archived_end = last.min(session.archived_seq).min(hot_start.saturating_sub(1));
    if first <= archived_end {
        plan.archive_range = Some((first, archived_end));
    }
    let mut seq = skip_gaps(session, first.max(archived_end + 1));
    while seq <= last {
        let found = if seq >= hot_start {
            session.hot_message(seq).map(|record| plan.hot.push(record.clone()))
        } else {
            session.wal_position(seq).map(|position| plan.wal.push(position))
        };
        if found.is_none() {
            debug_assert!(false, "seq {seq} is neither hot, in the wal index, nor archived");
            return Err(ShardError::Unavailable(format!(
                "internal: seq {seq} of the session cannot be located"
            )));
        }
        seq = skip_gaps(session, seq.saturating_add(1));
        if seq == u64::MAX && last == u64::MAX {
            break;
        }
    }
    Ok(plan)
}
