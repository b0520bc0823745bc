//! A replica move (scale-out, issue 21): one persisted, resumable operation that takes a shard's
//! replica off one storage node and onto another while the shard keeps serving.
//!
//! Not wired into the running cluster yet: the metadata group will persist each `MoveRecord` and
//! run `advance` against the shard's consensus group. What is here is the protocol, and the proof
//! that it is safe to crash in: `advance` performs one step, then returns the record to persist;
//! after a crash anywhere (before the step, during it, after it but before the record was
//! persisted) the driver runs `advance` again on the last persisted record, so every step is
//! written to be idempotent — it checks the group's state and does only what is missing.
//!
//! The steps, from the spec: add the new replica as a learner; let it catch up; move the
//! leadership to another voter if the leaving replica leads (a transfer, so clients see one
//! short hand-over instead of an election); change the voters (the group's own joint consensus:
//! the old and the new set both must agree until the change commits; the set never has fewer
//! than its voters); remove the old replica from the group's nodes; delete its data. Until the
//! voter change a move can be rolled back (the learner is removed, nothing else changed); after
//! it, only forward.

use std::collections::BTreeSet;

pub type NodeId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    AddLearner,
    CatchUp,
    MoveLeadership,
    ChangeVoters,
    RemoveOld,
    DeleteData,
    Done,
    /// Given up before the voters changed (the target died, or an operator cancelled): the
    /// learner is being removed.
    RollingBack,
    RolledBack,
}

/// What the metadata group persists for a move in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MoveRecord {
    pub shard: u16,
    pub from: NodeId,
    pub to: NodeId,
    pub step: Step,
}

/// What a move needs from the shard's consensus group and the nodes. Every call may fail (a node
/// down, no leader, a timeout): the step is then tried again later from the same record.
pub trait ShardGroup {
    type Error: std::fmt::Display;
    fn voters(&self, shard: u16) -> Result<BTreeSet<NodeId>, Self::Error>;
    fn learners(&self, shard: u16) -> Result<BTreeSet<NodeId>, Self::Error>;
    fn add_learner(&mut self, shard: u16, node: NodeId) -> Result<(), Self::Error>;
    fn remove_learner(&mut self, shard: u16, node: NodeId) -> Result<(), Self::Error>;
    /// Whether `node`'s log reached the leader's commit index (a learner caught up).
    fn caught_up(&self, shard: u16, node: NodeId) -> Result<bool, Self::Error>;
    /// Replaces the voters (joint consensus inside); returns once the final set committed.
    fn set_voters(&mut self, shard: u16, voters: BTreeSet<NodeId>) -> Result<(), Self::Error>;
    fn leader(&self, shard: u16) -> Result<Option<NodeId>, Self::Error>;
    fn transfer_leadership(&mut self, shard: u16, to: NodeId) -> Result<(), Self::Error>;
    /// Whether `node` still keeps the shard's data (its replica's log and state).
    fn holds_data(&self, shard: u16, node: NodeId) -> Result<bool, Self::Error>;
    fn delete_data(&mut self, shard: u16, node: NodeId) -> Result<(), Self::Error>;
}

/// What one call of `advance` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Advanced {
    /// The step is done: persist this record (the next step), then call again.
    Next(MoveRecord),
    /// Not yet (a learner still catching up): call again later with the same record.
    Wait,
}

/// Performs the record's step if it is not done yet and says what to persist next. Idempotent:
/// calling it again with the same record after a crash finds the step done (or does the rest).
pub fn advance<G: ShardGroup>(group: &mut G, record: MoveRecord) -> Result<Advanced, G::Error> {
    let MoveRecord { shard, from, to, step } = record;
    let next = |step| Ok(Advanced::Next(MoveRecord { step, ..record }));
    match step {
        Step::AddLearner => {
            if !group.learners(shard)?.contains(&to) && !group.voters(shard)?.contains(&to) {
                group.add_learner(shard, to)?;
            }
            next(Step::CatchUp)
        }
        Step::CatchUp => {
            if group.voters(shard)?.contains(&to) || group.caught_up(shard, to)? {
                next(Step::MoveLeadership)
            } else {
                Ok(Advanced::Wait)
            }
        }
        Step::MoveLeadership => {
            hand_leadership_away(group, shard, from)?;
            next(Step::ChangeVoters)
        }
        Step::ChangeVoters => {
            let voters = group.voters(shard)?;
            if voters.contains(&to) && !voters.contains(&from) {
                return next(Step::RemoveOld);
            }
            // Leadership may have come back to the leaving replica by an election since.
            hand_leadership_away(group, shard, from)?;
            let mut wanted = voters;
            wanted.remove(&from);
            wanted.insert(to);
            group.set_voters(shard, wanted)?;
            next(Step::RemoveOld)
        }
        Step::RemoveOld => {
            if group.learners(shard)?.contains(&from) {
                group.remove_learner(shard, from)?;
            }
            next(Step::DeleteData)
        }
        Step::DeleteData => {
            if group.holds_data(shard, from)? {
                group.delete_data(shard, from)?;
            }
            next(Step::Done)
        }
        Step::RollingBack => {
            if group.learners(shard)?.contains(&to) {
                group.remove_learner(shard, to)?;
            }
            if group.holds_data(shard, to)? {
                group.delete_data(shard, to)?;
            }
            next(Step::RolledBack)
        }
        Step::Done | Step::RolledBack => Ok(Advanced::Wait),
    }
}

/// If `from` leads the shard, hands the leadership to another voter (the lowest id: any voter
/// will do, and a fixed choice keeps the plan deterministic).
fn hand_leadership_away<G: ShardGroup>(group: &mut G, shard: u16, from: NodeId) -> Result<(), G::Error> {
    if group.leader(shard)? != Some(from) {
        return Ok(());
    }
    if let Some(other) = group.voters(shard)?.into_iter().find(|voter| *voter != from) {
        group.transfer_leadership(shard, other)?;
    }
    Ok(())
}

/// The record that gives a move up, if it still can be: only before the voters change.
pub fn roll_back(record: MoveRecord) -> Option<MoveRecord> {
    matches!(
        record.step,
        Step::AddLearner | Step::CatchUp | Step::MoveLeadership | Step::RollingBack
    )
    .then_some(MoveRecord {
        step: Step::RollingBack,
        ..record
    })
}

#[cfg(test)]
mod tests;
