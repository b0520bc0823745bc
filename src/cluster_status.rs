//! `fleetlm cluster status --url <any member>`: fetches `/api/admin/cluster` and prints the
//! members, each shard's leader and term, and how far each member is behind, as tables.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::Value;

/// Fetches the status from a member's HTTP address.
pub async fn fetch(url: &str, api_key: Option<&str>) -> anyhow::Result<Value> {
    let endpoint = format!("{}/api/admin/cluster", url.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()?;
    answer_of(url, client.get(&endpoint), api_key).await
}

/// Sends an admin request to the member at `url` and returns its JSON answer, or why not.
async fn answer_of(url: &str, mut request: reqwest::RequestBuilder, api_key: Option<&str>) -> anyhow::Result<Value> {
    if let Some(key) = api_key {
        request = request.bearer_auth(key);
    }
    let response = request
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach {url}: {}", e.without_url()))?;
    let status = response.status();
    let bytes = response
        .bytes()
        .await
        .map_err(|e| anyhow::anyhow!("{url} did not answer: {}", e.without_url()))?;
    let body: Value =
        serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("{url} did not answer with JSON: {e}"))?;
    if !status.is_success() {
        let reason = body["error"].as_str().unwrap_or("no reason given");
        anyhow::bail!("{url} answered {status}: {reason}");
    }
    Ok(body)
}

/// One member's status: its own, or the one it answered through the member asked.
fn member_views(status: &Value) -> BTreeMap<u64, Result<&Value, String>> {
    let mut views = BTreeMap::new();
    if let Some(id) = status["node_id"].as_u64() {
        views.insert(id, Ok(status));
    }
    if let Some(peers) = status["peers"].as_object() {
        for (id, view) in peers {
            let Ok(id) = id.parse::<u64>() else { continue };
            let view = match view["error"].as_str() {
                Some(error) => Err(error.to_string()),
                None => Ok(view),
            };
            views.insert(id, view);
        }
    }
    views
}

/// The status as two tables: members, then shards (each member's lag behind the commit index
/// its leader reports); then the cluster's id.
pub fn render(status: &Value) -> String {
    let views = member_views(status);
    let asked = status["node_id"].as_u64().unwrap_or_default();
    let joined: Vec<u64> = status["joined"]
        .as_array()
        .map(|ids| ids.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    let voter_of = |id: u64| {
        status["shards"]
            .as_array()
            .map_or(0, |shards| shards.iter().filter(|s| is_voter(s, id)).count())
    };
    let shard_count = status["shards"].as_array().map_or(0, Vec::len);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<8}{:<14}{:<8}{:<8}{:<10}NOTE",
        "MEMBER", "STATE", "LEADS", "JOINED", "VOTER IN"
    );
    for (id, view) in &views {
        let (state, leads, note) = match view {
            Ok(view) => {
                let leads = view["shards"]
                    .as_array()
                    .map_or(0, |shards| shards.iter().filter(|s| s["role"] == "leader").count());
                let note = view["refusal"].as_str().unwrap_or_default().to_string();
                let state = if *id == asked { "up (asked)" } else { "up" };
                (state.to_string(), leads.to_string(), note)
            }
            Err(error) => ("unreachable".to_string(), "-".to_string(), error.clone()),
        };
        let joined = if joined.contains(id) { "yes" } else { "no" };
        let voter = format!("{}/{shard_count}", voter_of(*id));
        let row = format!("{id:<8}{state:<14}{leads:<8}{joined:<8}{voter:<10}{note}");
        let _ = writeln!(out, "{}", row.trim_end());
    }
    let _ = writeln!(out);
    let mut header = format!("{:<7}{:<8}{:<7}{:<11}", "SHARD", "LEADER", "TERM", "COMMITTED");
    for id in views.keys() {
        let _ = write!(header, "{:<9}", format!("LAG({id})"));
    }
    let _ = writeln!(out, "{}", header.trim_end());
    for shard in 0..shard_count {
        let of = |view: &Value| view["shards"][shard].clone();
        let mine = of(status);
        let leader = mine["leader"].as_u64();
        // The leader's own view has the cluster's commit index; else the asked member's.
        let leader_view = leader
            .and_then(|id| views.get(&id))
            .and_then(|view| view.as_ref().ok())
            .map(|view| of(view))
            .unwrap_or_else(|| mine.clone());
        let committed = leader_view["committed"].as_u64().unwrap_or_default();
        let mut line = format!(
            "{:<7}{:<8}{:<7}{:<11}",
            shard,
            leader.map_or("none".to_string(), |id| id.to_string()),
            leader_view["term"].as_u64().unwrap_or_default(),
            committed
        );
        for view in views.values() {
            let lag = match view {
                Ok(view) => of(view)["applied"]
                    .as_u64()
                    .map_or("?".to_string(), |applied| committed.saturating_sub(applied).to_string()),
                Err(_) => "-".to_string(),
            };
            let _ = write!(line, "{lag:<9}");
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    let _ = writeln!(out);
    let cluster_id = status["cluster_id"].as_str().unwrap_or("not recorded yet");
    let _ = writeln!(out, "CLUSTER ID  {cluster_id}");
    out
}

/// Whether a shard's group (as the asked member has it) counts `id` as a voter. A status
/// without the field (an older member) counts every member.
fn is_voter(shard: &Value, id: u64) -> bool {
    match shard["voters"].as_array() {
        Some(voters) => voters.iter().any(|v| v.as_u64() == Some(id)),
        None => true,
    }
}

/// Every member answered, every shard has a leader, and every member is a voter of every shard
/// (not in the middle of being replaced).
pub fn healthy(status: &Value) -> bool {
    let views = member_views(status);
    let members_up = views.values().all(Result::is_ok);
    let shards = status["shards"].as_array();
    let led = shards.is_some_and(|shards| shards.iter().all(|shard| shard["leader"].is_u64()));
    let full = shards.is_some_and(|shards| shards.iter().all(|shard| views.keys().all(|id| is_voter(shard, *id))));
    members_up && led && full
}

/// `fleetlm cluster forget-node` / `add-node`: asks a member to carry out a step of replacing
/// `node` (`step` is `forget` or `add`) and returns its answer.
pub async fn change_member(url: &str, api_key: Option<&str>, node: u64, step: &str) -> anyhow::Result<Value> {
    let endpoint = format!("{}/api/admin/cluster/members/{node}/{step}", url.trim_end_matches('/'));
    // Adding waits until the member has every shard's log.
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(15 * 60))
        .build()?;
    answer_of(url, client.post(&endpoint), api_key).await
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{healthy, render};

    #[test]
    fn renders_members_and_shards_with_lag() {
        let status = json!({
            "node_id": 1, "cluster_id": "0198c6d2-7f3a-7b51-9f0e-2b7f4f1d9a10", "members": [1, 2, 3],
            "joined": [1, 2, 3], "refusal": null,
            "shards": [
                {"shard": 0, "role": "leader", "term": 4, "leader": 1, "committed": 10, "applied": 10,
                 "voters": [1, 2, 3]},
                {"shard": 1, "role": "follower", "term": 2, "leader": 2, "committed": 7, "applied": 5,
                 "voters": [1, 2]},
            ],
            "peers": {
                "2": {"node_id": 2, "shards": [
                    {"shard": 0, "role": "follower", "term": 4, "leader": 1, "committed": 10, "applied": 9},
                    {"shard": 1, "role": "leader", "term": 2, "leader": 2, "committed": 8, "applied": 8},
                ]},
                "3": {"error": "node 3 is unreachable: connection refused"},
            }
        });
        let text = render(&status);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            ["MEMBER", "STATE", "LEADS", "JOINED", "VOTER", "IN", "NOTE"]
        );
        assert!(lines[1].starts_with("1") && lines[1].contains("up (asked)"), "{text}");
        assert!(lines[1].contains("2/2") && lines[3].contains("1/2"), "{text}");
        assert!(lines[3].starts_with("3") && lines[3].contains("unreachable"), "{text}");
        // Shard 1: node 2 leads with commit 8; node 1 applied 5 (lag 3), node 2 8 (lag 0).
        assert_eq!(lines[4], "");
        let columns = |line: &str| line.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        assert_eq!(
            columns(lines[5]),
            ["SHARD", "LEADER", "TERM", "COMMITTED", "LAG(1)", "LAG(2)", "LAG(3)"]
        );
        // Shard 0: node 1 leads with commit 10; node 2 applied 9.
        assert_eq!(columns(lines[6]), ["0", "1", "4", "10", "0", "1", "-"], "{text}");
        // Shard 1: node 2 leads with commit 8; node 1 applied 5 (lag 3).
        assert_eq!(columns(lines[7]), ["1", "2", "2", "8", "3", "0", "-"], "{text}");
        assert_eq!(lines[8], "");
        assert_eq!(
            columns(lines[9]),
            ["CLUSTER", "ID", "0198c6d2-7f3a-7b51-9f0e-2b7f4f1d9a10"]
        );
        assert!(text.lines().all(|line| line == line.trim_end()), "{text:?}");
    }

    #[test]
    fn healthy_needs_every_member_up_leading_shards_and_voting_everywhere() {
        let view = |voters: serde_json::Value| {
            json!({"node_id": 1, "shards": [{"shard": 0, "leader": 1, "voters": voters}],
                   "peers": {"2": {"node_id": 2, "shards": []}, "3": {"node_id": 3, "shards": []}}})
        };
        assert!(healthy(&view(json!([1, 2, 3]))));
        assert!(!healthy(&view(json!([1, 2]))), "node 3 is being replaced");
        let mut leaderless = view(json!([1, 2, 3]));
        leaderless["shards"][0]["leader"] = json!(null);
        assert!(!healthy(&leaderless));
        let mut down = view(json!([1, 2, 3]));
        down["peers"]["3"] = json!({"error": "unreachable"});
        assert!(!healthy(&down));
    }
}
