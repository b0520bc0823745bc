//! The agent registry in memory: every agent, loaded from the archive at start and updated by
//! the API after each write, so scheduling never waits on a query and a change takes effect
//! for the next dispatch.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::archive::{Archive, ArchiveError};
use crate::model::Agent;

#[derive(Default)]
pub struct AgentRegistry {
    agents: RwLock<HashMap<String, Arc<Agent>>>,
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
        })
    }

    pub fn get(&self, id: &str) -> Option<Arc<Agent>> {
        self.agents.read().expect("agent registry lock").get(id).cloned()
    }

    /// Records an agent the archive now holds (created, updated or disabled).
    pub fn put(&self, agent: Agent) {
        self.agents
            .write()
            .expect("agent registry lock")
            .insert(agent.id.clone(), Arc::new(agent));
    }
}
