//! The cluster settings: all of them or none, checked together (`ClusterConfig`).

use std::time::Duration;

use super::validate::parse_listen_address;
use super::{ClusterConfig, ConfigError, Settings, invalid};

/// Members a cluster may have: a majority survives the loss of one (3) or two (5) nodes.
const CLUSTER_SIZES: [usize; 2] = [3, 5];
/// How often, unless set, each member evens out leadership (`consensus::balance`).
const DEFAULT_LEADER_BALANCE_SECS: u64 = 5;

impl Settings {
    pub(super) fn cluster(&self, database_url: Option<&str>) -> Result<Option<ClusterConfig>, ConfigError> {
        let given = [
            ("node_id", self.node_id.is_some()),
            (
                "cluster_peers",
                self.cluster_peers.as_deref().is_some_and(|p| !p.trim().is_empty()),
            ),
            (
                "cluster_secret",
                self.cluster_secret.as_deref().is_some_and(|s| !s.is_empty()),
            ),
        ];
        if given.iter().all(|(_, set)| !set) {
            if self.peer_listen_addr.is_some() {
                return Err(invalid(
                    "peer_listen_addr",
                    "is only used in cluster mode (set cluster_peers)",
                ));
            }
            return Ok(None);
        }
        if let Some((missing, _)) = given.iter().find(|(_, set)| !set) {
            return Err(invalid(
                missing,
                "cluster mode needs node_id, cluster_peers and cluster_secret together",
            ));
        }
        let node_id = self.node_id.expect("checked above");
        let mut peers = std::collections::BTreeMap::new();
        for pair in self
            .cluster_peers
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
        {
            let (id, address) = pair.split_once('=').ok_or_else(|| {
                invalid(
                    "cluster_peers",
                    format!("expected id=host:port pairs separated by commas, got {pair:?}"),
                )
            })?;
            let id: u64 = id
                .trim()
                .parse()
                .ok()
                .filter(|id| *id > 0)
                .ok_or_else(|| invalid("cluster_peers", format!("node ids are positive integers, got {id:?}")))?;
            let address = address.trim();
            // Only the form is checked: a peer's name may resolve only once it is up.
            let well_formed = address
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
            if !well_formed {
                return Err(invalid(
                    "cluster_peers",
                    format!("node {id}: expected host:port, got {address:?}"),
                ));
            }
            if peers.insert(id, address.to_string()).is_some() {
                return Err(invalid("cluster_peers", format!("node {id} is listed twice")));
            }
        }
        if !CLUSTER_SIZES.contains(&peers.len()) {
            return Err(invalid(
                "cluster_peers",
                format!("a cluster has 3 or 5 members, got {}", peers.len()),
            ));
        }
        let Some(own) = peers.get(&node_id) else {
            return Err(invalid("node_id", format!("node {node_id} is not in cluster_peers")));
        };
        let secret = self.cluster_secret.clone().unwrap_or_default();
        if secret.len() < 16 {
            return Err(invalid("cluster_secret", "must be at least 16 bytes"));
        }
        if database_url.is_none() {
            return Err(invalid(
                "database_url",
                "cluster mode archives to one Postgres shared by every node: set database_url",
            ));
        }
        let listen_text = self.peer_listen_addr.as_deref().unwrap_or(own);
        let peer_listen_addr = parse_listen_address(listen_text)
            .ok_or_else(|| invalid("peer_listen_addr", format!("expected host:port, got {listen_text:?}")))?;
        let election_timeout_ms = self.election_timeout_ms.unwrap_or(500);
        if !(100..=60_000).contains(&election_timeout_ms) {
            return Err(invalid("election_timeout_ms", "must be between 100 and 60000"));
        }
        let leader_balance_secs = self.leader_balance_secs.unwrap_or(DEFAULT_LEADER_BALANCE_SECS);
        if leader_balance_secs > 3600 {
            return Err(invalid("leader_balance_secs", "must be between 0 (never) and 3600"));
        }
        Ok(Some(ClusterConfig {
            node_id,
            peers,
            secret,
            peer_listen_addr,
            election_timeout: Duration::from_millis(election_timeout_ms),
            leader_balance_every: (leader_balance_secs > 0).then(|| Duration::from_secs(leader_balance_secs)),
        }))
    }
}
