//! The agent registry in memory: every agent, loaded from the archive at start and updated by
//! the API after each write, so scheduling never waits on a query and a change takes effect
//! for the next dispatch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use crate::archive::{Archive, ArchiveError};
use crate::model::Agent;

/// Told of each agent this node records (cluster mode: so the other members learn it).
pub type AgentChanged = Box<dyn Fn(&Agent) + Send + Sync>;

pub struct AgentRegistry {
    agents: RwLock<HashMap<String, Arc<Agent>>>,
    /// Cluster mode: told of every agent this node writes, so the other nodes learn it.
    on_change: std::sync::OnceLock<AgentChanged>,
    /// The agents were read from the archive (see `not_loaded`).
    loaded: AtomicBool,
}

impl AgentRegistry {
    pub async fn load(archive: &Archive) -> Result<AgentRegistry, ArchiveError> {
        let agents = archive.list_agents(None).await?;
        let map = agents
            .into_iter()
            .map(|agent| (agent.id.clone(), Arc::new(agent)))
            .collect();
        Ok(AgentRegistry {
            agents: RwLock::new(map),
            on_change: std::sync::OnceLock::new(),
            loaded: AtomicBool::new(true),
        })
    }

    /// A registry whose agents are not known yet (a cluster member started while the archive
    /// was unreachable): `reload` fills it.
    pub fn not_loaded() -> AgentRegistry {
        AgentRegistry {
            agents: RwLock::new(HashMap::new()),
            on_change: std::sync::OnceLock::new(),
            loaded: AtomicBool::new(false),
        }
    }

    /// Whether the agents were read from the archive at least once (an agent missing from a
    /// registry not loaded may exist).
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Cluster mode: `notify` is called with every agent `put` records.
    pub fn notify_changes(&self, notify: AgentChanged) {
        let _ = self.on_change.set(notify);
    }

    /// Records an agent another node wrote (newer than what is here, by `updated_at`).
    pub fn install(&self, agent: Agent) {
        let mut agents = self.agents.write().expect("agent registry lock");
        if agents
            .get(&agent.id)
            .is_none_or(|known| known.updated_at <= agent.updated_at)
        {
            agents.insert(agent.id.clone(), Arc::new(agent));
        }
    }

    /// Re-reads every agent from the archive (the cluster's safety net for a missed change).
    pub async fn reload(&self, archive: &Archive) -> Result<(), ArchiveError> {
        for agent in archive.list_agents(None).await? {
            self.install(agent);
        }
        self.loaded.store(true, Ordering::Release);
        Ok(())
    }

    pub fn get(&self, id: &str) -> Option<Arc<Agent>> {
        self.agents.read().expect("agent registry lock").get(id).cloned()
    }

    /// Records an agent the archive now holds (created, updated or disabled).
    pub fn put(&self, agent: Agent) {
        if let Some(notify) = self.on_change.get() {
            notify(&agent);
        }
        self.agents
            .write()
            .expect("agent registry lock")
            .insert(agent.id.clone(), Arc::new(agent));
    }
}
