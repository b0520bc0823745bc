//! A dispatch's turn: the turn it answers (resumed as it started, or recorded in the log before
//! the agent is called) and the history it sends, on the current branch.

use std::time::Duration;

use serde_json::{Value, json};

use super::{DispatchJob, backoff};
use crate::agents::EngineContext;
use crate::ids::TurnId;
use crate::model::{Agent, HistoryMode, OpenTurn, SessionView};
use crate::shard::ShardError;

/// History for `entire` mode is capped at the newest this many messages.
const ENTIRE_HISTORY_CAP: u64 = 10_000;
const HISTORY_PAGE: usize = 1000;

/// Messages read beyond the history window so that `regenerate` messages and the replies they
/// supersede, left out of the history, do not shrink it.
const BRANCH_LOOKBACK: u64 = 64;

/// What a dispatch sends and answers.
pub(super) struct History {
    /// The messages the agent gets, oldest first.
    pub(super) messages: Vec<Value>,
    /// The newest user message read (the dispatch answers through it).
    pub(super) last_user_seq: Option<u64>,
    /// The message the reply replaces, when the newest user message is a `regenerate`.
    pub(super) replaces: Option<String>,
    /// The agent's messages after the newest user message: `(seq, dispatch_id)` from their
    /// metadata (a reply of a turn whose start is no longer in the log; `open_turn`).
    pub(super) replies_after_user: Vec<(u64, Option<String>)>,
}

/// Why a dispatch did not open a turn.
pub(super) enum NotOpened {
    /// The log owes no reply (a stale request).
    NothingOwed,
    /// Cluster: this node no longer leads the session's shard.
    Superseded,
    Cancelled,
    Failed(String),
}

/// How often a dispatch tries to record its turn's start while the shard cannot take it.
const START_ATTEMPTS: u32 = 5;

/// The turn this dispatch answers and the history it sends. A turn the log shows started and
/// not finished (a crash, a leader change, a retry) is resumed as it started: the same id, the
/// same history, so a reply cut after some of its messages is completed, not asked for twice.
/// Otherwise the turn is recorded in the log (`Op::DispatchStarted`) before the agent is
/// called.
pub(super) async fn open_turn(
    context: &EngineContext,
    job: &DispatchJob,
    view: &SessionView,
    agent: &Agent,
) -> Result<(OpenTurn, History), NotOpened> {
    let unavailable = |error: ShardError| {
        tracing::warn!(session_id = %job.session_id, %error, "could not read the history for a dispatch");
        NotOpened::Failed("history unavailable".into())
    };
    if let Some(open) = view.dispatch.open_turn() {
        let found = history(context, &job.session_id, view, agent, open.history_seq).await;
        return Ok((open, found.map_err(unavailable)?));
    }
    let found = history(context, &job.session_id, view, agent, view.last_seq)
        .await
        .map_err(unavailable)?;
    let through_seq = found.last_user_seq.unwrap_or(view.dispatch.last_user_seq);
    let id = TurnId::derive(&view.record.id, view.record.inserted_at.0, through_seq);
    // A turn whose start left the log with the archive (the session was loaded from there) has
    // the same id; if part of its reply is stored, its history ends before that reply, as it
    // did when the turn started.
    let id_text = id.to_string();
    let resumed_reply = found
        .replies_after_user
        .iter()
        .find(|(_, dispatch_id)| dispatch_id.as_deref() == Some(id_text.as_str()))
        .map(|(seq, _)| *seq);
    let (found, history_seq) = match resumed_reply {
        Some(seq) => {
            let bounded = history(context, &job.session_id, view, agent, seq - 1).await;
            (bounded.map_err(unavailable)?, seq - 1)
        }
        None => (found, view.last_seq),
    };
    let turn = OpenTurn {
        id,
        through_seq,
        history_seq,
    };
    let mut attempt = 1;
    let opened = loop {
        if job.control.is_cancelled() {
            return Err(NotOpened::Cancelled);
        }
        match context
            .shards
            .start_dispatch(&job.session_id, turn, job.leader_term)
            .await
        {
            Ok(opened) => break opened,
            Err(ShardError::Superseded) => return Err(NotOpened::Superseded),
            Err(
                error @ (ShardError::NoLeader(_)
                | ShardError::NotLeader { .. }
                | ShardError::Overloaded
                | ShardError::Unavailable(_)
                | ShardError::Archive(_)),
            ) if attempt < START_ATTEMPTS => {
                tracing::info!(session_id = %job.session_id, %error, attempt, "could not record a dispatch's start yet");
                if job.leader_term.is_some() && context.shards.dispatch_term(&job.session_id) != Some(job.leader_term) {
                    return Err(NotOpened::Superseded);
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff(attempt, Some(Duration::from_millis(500)))) => {}
                    () = job.control.cancelled() => return Err(NotOpened::Cancelled),
                }
                attempt += 1;
            }
            Err(error) => {
                tracing::warn!(session_id = %job.session_id, %error, "could not record a dispatch's start");
                return Err(NotOpened::Failed("could not record the dispatch".into()));
            }
        }
    };
    match opened {
        None => Err(NotOpened::NothingOwed),
        Some(opened) if opened == turn => Ok((turn, found)),
        // Another dispatch started a turn meanwhile (a stale request racing it): resume that one.
        Some(opened) => {
            let found = history(context, &job.session_id, view, agent, opened.history_seq).await;
            Ok((opened, found.map_err(unavailable)?))
        }
    }
}

/// The messages up to `upto` the agent gets, oldest first, as the agent's history mode asks, on
/// the current branch (`branch.rs`: no `regenerate` messages, no superseded replies).
async fn history(
    context: &EngineContext,
    session_id: &str,
    view: &SessionView,
    agent: &Agent,
    upto: u64,
) -> Result<History, ShardError> {
    let wanted = match agent.message_history_mode {
        HistoryMode::Tail => u64::from(agent.message_history_limit),
        HistoryMode::Last => 1,
        HistoryMode::Entire => ENTIRE_HISTORY_CAP,
    };
    let mut after = upto.saturating_sub(wanted + BRANCH_LOOKBACK);
    let mut records = Vec::new();
    while after < upto {
        let page = context.shards.read_messages(session_id, after, HISTORY_PAGE).await?;
        let Some(last) = page.messages.last() else {
            break;
        };
        after = last.message.seq;
        records.extend(
            page.messages
                .into_iter()
                .take_while(|record| record.message.seq <= upto),
        );
    }
    let user_id = view.record.user_id.as_str();
    let window: Vec<&crate::model::Message> = records.iter().map(|r| &r.message).collect();
    let last_user_seq = window.iter().filter(|m| m.sender_id == user_id).map(|m| m.seq).max();
    let replies_after_user = window
        .iter()
        .filter(|m| m.seq > last_user_seq.unwrap_or(0) && m.sender_id == agent.id)
        .map(|m| {
            let metadata = serde_json::from_str::<Value>(m.metadata.get()).unwrap_or_default();
            (m.seq, metadata["dispatch_id"].as_str().map(str::to_string))
        })
        .collect();
    let branch = crate::agents::branch::current_branch(&window, user_id);
    let kept: Vec<&&crate::model::Message> = window.iter().filter(|m| !branch.hidden.contains(&m.seq)).collect();
    let skip = kept.len().saturating_sub(usize::try_from(wanted).unwrap_or(usize::MAX));
    let messages = kept[skip..]
        .iter()
        .map(|m| {
            json!({
                "seq": m.seq,
                "sender_id": m.sender_id,
                "kind": m.kind,
                "content": &m.content,
                "metadata": &m.metadata,
                "inserted_at": m.inserted_at,
            })
        })
        .collect();
    Ok(History {
        messages,
        last_user_seq,
        replaces: branch.replaces,
        replies_after_user,
    })
}
