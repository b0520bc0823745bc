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
        let known = agents.get(&agent.id);
        if known.is_none_or(|known| known.updated_at <= agent.updated_at) {
            let agent = keep_newest_signing(known, agent);
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

    /// Records an agent the archive now holds (created, updated, disabled, or its signing
    /// secret rotated).
    pub fn put(&self, agent: Agent) {
        let agent = {
            let mut agents = self.agents.write().expect("agent registry lock");
            let agent = Arc::new(keep_newest_signing(agents.get(&agent.id), agent));
            agents.insert(agent.id.clone(), agent.clone());
            agent
        };
        if let Some(notify) = self.on_change.get() {
            notify(&agent);
        }
    }
}

/// An update read the agent before a rotation and wrote it after (the archive keeps the
/// rotated secret: `Archive::update_agent` never writes secrets); what is recorded here keeps
/// the newest secrets too, so a call is never signed with a secret a rotation replaced.
fn keep_newest_signing(known: Option<&Arc<Agent>>, mut agent: Agent) -> Agent {
    if let Some(known) = known
        && known.signing.created_at > agent.signing.created_at
    {
        agent.signing = known.signing.clone();
    }
    agent
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::signing::SigningKeys;
    use crate::model::{AgentStatus, HistoryMode, Timestamp};

    fn agent(updated_at: i64, signing: SigningKeys) -> Agent {
        Agent {
            id: "a".into(),
            name: "a".into(),
            origin_url: "http://127.0.0.1:9".into(),
            webhook_path: "/webhook".into(),
            message_history_mode: HistoryMode::Tail,
            message_history_limit: 50,
            timeout_ms: 1000,
            debounce_window_ms: 0,
            headers: Default::default(),
            http2: false,
            status: AgentStatus::Enabled,
            inserted_at: Timestamp(0),
            updated_at: Timestamp(updated_at),
            signing,
        }
    }

    /// An update that read the agent before a rotation, recorded after it, here or relayed by
    /// another node, keeps the rotated secrets.
    #[test]
    fn a_write_never_brings_back_a_rotated_secret() {
        let registry = AgentRegistry::not_loaded();
        let created = SigningKeys::fresh(Timestamp(1));
        let rotated = created.rotated(Timestamp(2), 0);
        registry.put(agent(1, created.clone()));
        registry.put(agent(2, rotated.clone()));
        let mut renamed = agent(3, created.clone());
        renamed.name = "renamed".into();
        registry.put(renamed);
        let recorded = registry.get("a").unwrap();
        assert_eq!((recorded.name.as_str(), &recorded.signing), ("renamed", &rotated));
        registry.install(agent(4, created));
        assert_eq!(registry.get("a").unwrap().signing, rotated);
        assert_eq!(registry.get("a").unwrap().updated_at, Timestamp(4));
    }

    /// Agents travel between members as JSON (`cluster.rs`): the secrets with them, and an
    /// agent from a member that predates signatures has none.
    #[test]
    fn agents_keep_their_secrets_across_the_peer_encoding() {
        let original = agent(1, SigningKeys::fresh(Timestamp(1)).rotated(Timestamp(2), 1000));
        let decoded: Agent = serde_json::from_slice(&serde_json::to_vec(&original).unwrap()).unwrap();
        assert_eq!(decoded.signing, original.signing);
        let mut older = serde_json::to_value(&original).unwrap();
        older.as_object_mut().unwrap().remove("signing");
        let decoded: Agent = serde_json::from_value(older).unwrap();
        assert_eq!(decoded.signing, SigningKeys::default());
        let mut damaged = serde_json::to_value(&original).unwrap();
        damaged["signing"]["current"] = "not a secret".into();
        assert!(serde_json::from_value::<Agent>(damaged).is_err());
    }
}
