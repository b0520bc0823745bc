//! A shard writer's part in a cluster: whether it leads its shard, and what it does with the
//! shard's committed log (the consensus feed).
//!
//! Every member holds the shard's state, not only its leader:
//! - **Follower**: applies every committed entry to its own copy of the state (the same fold the
//!   leader's writer uses; the leader logs the sessions it loads from the archive and the ones
//!   it forgets, so every copy holds the same sessions) and publishes its messages to this
//!   node's listeners, in log order; requests are answered `NotLeader` (the router forwards them
//!   to the leader). A copy that cannot be kept by the fold (a writer restart, a snapshot
//!   installed, an entry naming a session it does not hold) is rebuilt from the archive plus the
//!   committed log, in the background of the feed.
//! - **Taking over**: this node was elected. Once a quorum confirmed it and the feed delivered an
//!   entry of its own term (its blank entry: everything before it is committed and applied), it
//!   starts writing from the state it holds: no archive read on the way. Only a member whose copy
//!   is not current rebuilds first, from the archive plus the log, as a restart does.
//! - **Leader**: validates, stamps and applies as a single node does, and hands each batch to
//!   consensus (`Consensus::enqueue`, conditional on its term) instead of the WAL; it answers once
//!   the entry is committed. The feed then repeats its own entries, which it skips. A proposal
//!   that fails (its outcome unknown) throws the state away (it may hold operations that never
//!   committed) and rebuilds it from the archive and the committed log; losing leadership with
//!   nothing in flight keeps it (everything in it committed).

use std::sync::Arc;

use super::ShardError;
use super::copy::ShardCopy;
use crate::consensus::{Applied, Consensus, Leadership};

/// Where this writer stands in its shard's group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Follower,
    /// Elected in `term`; writes once a quorum has confirmed the leadership (`confirmed`: then
    /// `through` includes the read index, so everything committed anywhere, and so everything
    /// the archive may hold) and the feed has delivered every entry through `through` and one
    /// of `term`. Without the confirmation a leader that was cut off (or stopped) and still
    /// believes it leads would rebuild from a log the others have moved past.
    TakingOver {
        term: u64,
        through: u64,
        confirmed: bool,
    },
    Leader {
        term: u64,
    },
}

/// What a shard writer keeps of its group.
pub struct ClusterLink {
    pub consensus: Arc<Consensus>,
    pub role: Role,
    /// The last shard log index the feed delivered, and its term.
    pub applied_through: u64,
    pub applied_term: u64,
    /// Entries through this index were published to this node's listeners.
    pub published_through: u64,
    /// The state must be rebuilt once the batches in flight have settled (leadership was lost
    /// while they were in flight, or the log index moved under them); no new batch meanwhile.
    pub resync: bool,
    /// A term this writer was elected in but could not lead (its log failed to recover): it
    /// handed the leadership over and does not try again in that term.
    pub gave_up_term: Option<u64>,
    /// The quorum's confirmation of a takeover: `(term, read index)`.
    pub confirmation: Option<tokio::sync::oneshot::Receiver<(u64, u64)>>,
    /// Takeovers of the current role that failed (the archive did not answer), and when to try
    /// again (also: when to repeat the hand-over of a term given up).
    pub takeover_failures: u32,
    pub takeover_retry_at: Option<tokio::time::Instant>,
    /// When this writer last offered the leadership to another member because it could not
    /// take over without the archive (kept across terms: see `may_hand_over`).
    pub handed_over_at: Option<tokio::time::Instant>,
    /// The writer's state is the fold of the committed log through `applied_through` (plus the
    /// leader's own batches in flight): kept up by applying each delivered entry. When false the
    /// state is rebuilt from the archive and the log before it is used.
    pub replica_current: bool,
    /// The term this writer last led in (its proposals all carry it).
    pub led_term: u64,
    /// The first index of a proposal that failed (its outcome unknown), until the rebuild.
    pub failed_from: Option<u64>,
    /// A committed index differed from the one the writer counted, until the rebuild.
    pub index_moved: bool,
    /// Proposals whose outcome is unknown, which the state includes (see `Unsure`).
    pub unsure: Option<Unsure>,
    /// Whether consensus was last told this writer may lead at once (`sync_standing`).
    pub standing: Option<bool>,
    /// Copies of the state asked of this (leading) writer, answered once no batch is in flight.
    pub exports_waiting: Vec<tokio::sync::oneshot::Sender<Result<Box<ShardCopy>, ShardError>>>,
    /// Fetching a copy of the state from the leader (see `super::copy`).
    pub copy: CopyFetch,
}

/// A follower's fetch of a copy of the shard's state from its leader.
#[derive(Default)]
pub struct CopyFetch {
    /// Where fetches are asked for (the router's copy service); `None`: never fetched.
    pub requests: Option<tokio::sync::mpsc::UnboundedSender<u16>>,
    /// A fetch is under way since then.
    pub requested_at: Option<tokio::time::Instant>,
    /// A copy that arrived, waiting for this member's log to reach it.
    pub pending: Option<(Box<ShardCopy>, tokio::time::Instant)>,
    /// Fetches that failed in a row, and when the next may be asked for.
    pub failures: u32,
    pub next_at: Option<tokio::time::Instant>,
}

/// A former leader's proposals whose outcome is unknown (leadership lost, no quorum in time):
/// entries `from..=through`, all of `term`, which its state already includes. They commit or not
/// as the log decides: if the feed delivers every one of them in `term`, they committed and the
/// state is kept; an index delivered in another term means they were replaced, and the state is
/// rebuilt. Either way no archive read is needed in the common case of a leader change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsure {
    pub from: u64,
    pub through: u64,
    pub term: u64,
}

/// What the feed delivered, as the writer must act on it.
pub enum Delivered {
    /// Entry `index`: its command (`None` for consensus' own entries), and whether this node
    /// still has to publish it to its listeners.
    Entry {
        index: u64,
        term: u64,
        command: Option<Vec<u8>>,
        publish: bool,
    },
    /// A snapshot was installed: the log before it is not here; the state must be rebuilt.
    Reload,
}

impl ClusterLink {
    pub fn new(
        consensus: Arc<Consensus>,
        copy_requests: Option<tokio::sync::mpsc::UnboundedSender<u16>>,
    ) -> ClusterLink {
        ClusterLink {
            consensus,
            role: Role::Follower,
            applied_through: 0,
            applied_term: 0,
            published_through: 0,
            resync: false,
            gave_up_term: None,
            confirmation: None,
            takeover_failures: 0,
            takeover_retry_at: None,
            handed_over_at: None,
            replica_current: false,
            led_term: 0,
            failed_from: None,
            index_moved: false,
            unsure: None,
            standing: None,
            exports_waiting: Vec::new(),
            copy: CopyFetch {
                requests: copy_requests,
                ..CopyFetch::default()
            },
        }
    }

    pub fn leading_term(&self) -> Option<u64> {
        match self.role {
            Role::Leader { term } => Some(term),
            _ => None,
        }
    }

    /// The leader to send requests to, as far as this node knows.
    pub fn known_leader(&self, shard: u16) -> Option<u64> {
        self.consensus.leader(shard)
    }

    /// Moves the role on after a leadership change this node observed. Returns whether the
    /// writer must throw its state away (it led and no longer does, or leads in a new term).
    pub fn on_leadership(&mut self, now: Leadership) -> bool {
        match self.role {
            Role::Leader { term } if now.leading && now.term == term => false,
            Role::Leader { .. } => {
                self.role = Role::Follower;
                self.start_taking_over(now);
                true
            }
            Role::TakingOver { term, .. } if now.leading && now.term == term => false,
            Role::TakingOver { .. } | Role::Follower => {
                self.role = Role::Follower;
                self.start_taking_over(now);
                false
            }
        }
    }

    /// This node is still elected in a term whose leadership it gave up (see `gave_up_term`).
    pub fn still_leads_a_term_it_gave_up(&self, shard: u16) -> bool {
        let Some(given_up) = self.gave_up_term else {
            return false;
        };
        let now = self.consensus.watch(shard).now();
        now.leading && now.term == given_up
    }

    fn start_taking_over(&mut self, now: Leadership) {
        // A confirmation asked for in another role is dropped (its task stops).
        self.confirmation = None;
        self.takeover_failures = 0;
        self.takeover_retry_at = None;
        if now.leading {
            self.role = Role::TakingOver {
                term: now.term,
                through: now.last_log,
                confirmed: false,
            };
        }
    }

    /// Asks a quorum to confirm the leadership being taken over, once (retried until it is
    /// confirmed or the role changes).
    pub fn request_confirmation(&mut self, shard: u16) {
        let Role::TakingOver {
            term, confirmed: false, ..
        } = self.role
        else {
            return;
        };
        if self.confirmation.is_some() || self.gave_up_term == Some(term) {
            return;
        }
        let (answer, confirmation) = tokio::sync::oneshot::channel();
        self.confirmation = Some(confirmation);
        let consensus = self.consensus.clone();
        tokio::spawn(async move {
            while !answer.is_closed() {
                match consensus.confirm_leadership(shard, term).await {
                    Ok(index) => {
                        let _ = answer.send((term, index));
                        return;
                    }
                    Err(error) => {
                        tracing::debug!(shard, term, %error, "leadership not confirmed yet");
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    }
                }
            }
        });
    }

    /// A quorum confirmed the leadership of `term` with this read index.
    pub fn on_confirmed(&mut self, confirmed_term: u64, read_index: u64) {
        self.confirmation = None;
        if let Role::TakingOver { term, through, .. } = self.role
            && term == confirmed_term
        {
            self.role = Role::TakingOver {
                term,
                through: through.max(read_index),
                confirmed: true,
            };
        }
    }

    /// Whether a writer taking over has its leadership confirmed and has seen enough of the
    /// feed to rebuild and write.
    pub fn ready_to_take_over(&self) -> Option<(u64, u64)> {
        match self.role {
            Role::TakingOver {
                term,
                through,
                confirmed: true,
            } if self.applied_term == term && self.applied_through >= through && self.gave_up_term != Some(term) => {
                Some((term, self.applied_through))
            }
            _ => None,
        }
    }

    /// Records a delivered entry. A leader published its own entries when they committed: the
    /// writer completes a batch (which sets `published_through`) before the feed can repeat its
    /// entry, since the commit is reported before the entry is applied and the writer polls its
    /// batches first. Any other entry (a former leader's, or one of its own whose proposal timed
    /// out and committed later) is published from here, whatever the role.
    pub fn on_applied(&mut self, applied: Applied) -> Delivered {
        match applied {
            Applied::Entry { index, term, command } => {
                self.applied_through = index;
                self.applied_term = term;
                let publish = index > self.published_through;
                self.published_through = self.published_through.max(index);
                Delivered::Entry {
                    index,
                    term,
                    command,
                    publish,
                }
            }
            Applied::Reload { through } => {
                // Only a follower installs a snapshot; listeners that missed entries see a seq
                // gap and rejoin from the archive.
                self.applied_through = self.applied_through.max(through);
                self.published_through = self.published_through.max(through);
                Delivered::Reload
            }
        }
    }
}
