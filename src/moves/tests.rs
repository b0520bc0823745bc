//! The move protocol against a simulated shard group that crashes the driver at every possible
//! point (before or after each action takes effect, and between a step and its record being
//! persisted), with elections moving the leadership between steps. After every action the
//! group's invariants are checked: always `factor` voters, every voter caught up, no replica's
//! data deleted while it is a member, a leader only among the voters.

use super::*;

const FACTOR: usize = 3;

#[derive(Debug)]
struct Crash;

impl std::fmt::Display for Crash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the driver crashed")
    }
}

/// xorshift64*: a small seeded generator (the test prints the seed).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

struct Sim {
    voters: BTreeSet<NodeId>,
    learners: BTreeSet<NodeId>,
    leader: Option<NodeId>,
    data: BTreeSet<NodeId>,
    caught_up: BTreeSet<NodeId>,
    /// Polls of `caught_up` a new learner needs before it has caught up.
    catch_up_polls: u64,
    polls: u64,
    /// Crash points: the n-th action (counting persists) fails; `true`: after taking effect.
    crashes: Vec<(u64, bool)>,
    actions: u64,
    violations: Vec<String>,
}

impl Sim {
    fn new(catch_up_polls: u64) -> Sim {
        let voters: BTreeSet<NodeId> = [1, 2, 3].into();
        Sim {
            leader: Some(1),
            data: voters.clone(),
            caught_up: voters.clone(),
            voters,
            learners: BTreeSet::new(),
            catch_up_polls,
            polls: 0,
            crashes: Vec::new(),
            actions: 0,
            violations: Vec::new(),
        }
    }

    /// Counts an action; `Err` if the driver crashes here (before or after `effect`).
    fn act(&mut self, effect: impl FnOnce(&mut Sim)) -> Result<(), Crash> {
        let at = self.actions;
        self.actions += 1;
        let crash = self.crashes.iter().find(|(n, _)| *n == at).map(|(_, after)| *after);
        if crash == Some(false) {
            return Err(Crash);
        }
        effect(self);
        self.check();
        if crash == Some(true) { Err(Crash) } else { Ok(()) }
    }

    fn check(&mut self) {
        if self.voters.len() != FACTOR {
            self.violations
                .push(format!("{} voters: {:?}", self.voters.len(), self.voters));
        }
        for voter in &self.voters {
            if !self.caught_up.contains(voter) || !self.data.contains(voter) {
                self.violations.push(format!("voter {voter} is not caught up"));
            }
        }
        if let Some(leader) = self.leader
            && !self.voters.contains(&leader)
        {
            self.violations.push(format!("leader {leader} is not a voter"));
        }
    }

    /// An election: the leadership moves to any voter (the leaving one included).
    fn elect(&mut self, rng: &mut Rng) {
        let voters: Vec<NodeId> = self.voters.iter().copied().collect();
        self.leader = Some(voters[rng.below(voters.len() as u64) as usize]);
    }
}

impl ShardGroup for Sim {
    type Error = Crash;

    fn voters(&self, _: u16) -> Result<BTreeSet<NodeId>, Crash> {
        Ok(self.voters.clone())
    }

    fn learners(&self, _: u16) -> Result<BTreeSet<NodeId>, Crash> {
        Ok(self.learners.clone())
    }

    fn add_learner(&mut self, _: u16, node: NodeId) -> Result<(), Crash> {
        self.act(|sim| {
            sim.learners.insert(node);
            sim.data.insert(node);
        })
    }

    fn remove_learner(&mut self, _: u16, node: NodeId) -> Result<(), Crash> {
        self.act(|sim| {
            sim.learners.remove(&node);
        })
    }

    fn caught_up(&self, _: u16, node: NodeId) -> Result<bool, Crash> {
        Ok(self.caught_up.contains(&node))
    }

    fn set_voters(&mut self, _: u16, voters: BTreeSet<NodeId>) -> Result<(), Crash> {
        self.act(|sim| {
            for voter in &voters {
                if !sim.caught_up.contains(voter) {
                    sim.violations.push(format!("{voter} made a voter before it caught up"));
                }
            }
            // The leaving voters stay as learners (removed by a later step).
            let leaving: Vec<NodeId> = sim.voters.difference(&voters).copied().collect();
            sim.learners.extend(leaving);
            for voter in &voters {
                sim.learners.remove(voter);
            }
            sim.voters = voters;
            if sim.leader.is_some_and(|leader| !sim.voters.contains(&leader)) {
                // A removed leader steps down; an election among the voters follows.
                sim.leader = sim.voters.iter().next().copied();
            }
        })
    }

    fn leader(&self, _: u16) -> Result<Option<NodeId>, Crash> {
        Ok(self.leader)
    }

    fn transfer_leadership(&mut self, _: u16, to: NodeId) -> Result<(), Crash> {
        self.act(|sim| {
            if !sim.voters.contains(&to) {
                sim.violations.push(format!("leadership transferred to non-voter {to}"));
            }
            sim.leader = Some(to);
        })
    }

    fn holds_data(&self, _: u16, node: NodeId) -> Result<bool, Crash> {
        Ok(self.data.contains(&node))
    }

    fn delete_data(&mut self, _: u16, node: NodeId) -> Result<(), Crash> {
        self.act(|sim| {
            if sim.voters.contains(&node) || sim.learners.contains(&node) {
                sim.violations.push(format!("data of member {node} deleted"));
            }
            sim.data.remove(&node);
            sim.caught_up.remove(&node);
        })
    }
}

/// Runs a move to its end as the metadata group's driver would: persist each record `advance`
/// returns, start again from the last persisted one after any error (a crash). `rng` adds
/// elections between calls and lets a learner catch up after some polls; `give_up_at`: request
/// a rollback after that many calls (it happens only if the move still allows it).
fn drive(sim: &mut Sim, rng: &mut Rng, give_up_at: Option<u64>) -> MoveRecord {
    let mut persisted = MoveRecord {
        shard: 0,
        from: 1,
        to: 4,
        step: Step::AddLearner,
    };
    for call in 0..10_000u64 {
        if matches!(persisted.step, Step::Done | Step::RolledBack) {
            return persisted;
        }
        if give_up_at == Some(call)
            && let Some(rolling_back) = roll_back(persisted)
        {
            persisted = rolling_back;
        }
        if rng.below(4) == 0 {
            sim.elect(rng);
        }
        if sim.learners.contains(&4) {
            sim.polls += 1;
            if sim.polls >= sim.catch_up_polls {
                sim.caught_up.insert(4);
            }
        }
        match advance(sim, persisted) {
            Ok(Advanced::Next(record)) => {
                // Persisting is an action too: a crash here loses the step's record.
                if sim.act(|_| {}).is_ok() {
                    persisted = record;
                }
            }
            Ok(Advanced::Wait) | Err(Crash) => {}
        }
    }
    panic!("the move never ended: {persisted:?}");
}

fn check_end(sim: &Sim, end: MoveRecord, what: &str) {
    assert!(sim.violations.is_empty(), "{what}: {:?}", sim.violations);
    assert!(sim.learners.is_empty(), "{what}: learners left {:?}", sim.learners);
    match end.step {
        Step::Done => {
            assert_eq!(sim.voters, [2, 3, 4].into(), "{what}");
            assert_eq!(sim.data, sim.voters, "{what}: the old replica's data is gone");
        }
        Step::RolledBack => {
            assert_eq!(sim.voters, [1, 2, 3].into(), "{what}");
            assert_eq!(sim.data, sim.voters, "{what}: the learner's data is gone");
        }
        other => panic!("{what}: ended at {other:?}"),
    }
}

#[test]
fn a_move_survives_a_crash_at_every_point() {
    // A clean run first, to count the actions a crash can hit.
    let mut clean = Sim::new(3);
    let end = drive(&mut clean, &mut Rng(7), None);
    check_end(&clean, end, "clean run");
    let actions = clean.actions;
    assert!(actions >= 6, "{actions} actions");
    for at in 0..actions + 2 {
        for after in [false, true] {
            let mut sim = Sim::new(3);
            sim.crashes = vec![(at, after)];
            let end = drive(&mut sim, &mut Rng(7), None);
            check_end(&sim, end, &format!("crash at action {at} (after: {after})"));
        }
    }
}

#[test]
fn seeded_schedules_of_crashes_elections_and_rollbacks_keep_every_invariant() {
    let seeds: Vec<u64> = match std::env::var("FLEETLM_MOVE_SEEDS") {
        Ok(list) => list.split(',').filter_map(|s| s.trim().parse().ok()).collect(),
        Err(_) => (1..=300).collect(),
    };
    let (mut done, mut rolled_back) = (0, 0);
    for seed in seeds {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut sim = Sim::new(1 + rng.below(6));
        sim.crashes = (0..rng.below(4)).map(|_| (rng.below(30), rng.below(2) == 0)).collect();
        let give_up_at = (rng.below(3) == 0).then(|| rng.below(12));
        let end = drive(&mut sim, &mut rng, give_up_at);
        check_end(&sim, end, &format!("seed {seed} (replay: FLEETLM_MOVE_SEEDS={seed})"));
        match end.step {
            Step::Done => done += 1,
            _ => rolled_back += 1,
        }
    }
    // Both outcomes were exercised.
    assert!(done > 0 && rolled_back > 0, "{done} done, {rolled_back} rolled back");
}

#[test]
fn a_move_past_the_voter_change_cannot_be_rolled_back() {
    let record = |step| MoveRecord {
        shard: 0,
        from: 1,
        to: 4,
        step,
    };
    assert!(roll_back(record(Step::CatchUp)).is_some());
    for step in [Step::ChangeVoters, Step::RemoveOld, Step::DeleteData, Step::Done] {
        assert_eq!(roll_back(record(step)), None, "{step:?}");
    }
}
