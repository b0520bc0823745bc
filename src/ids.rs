//! Identifiers: generated ids (UUIDv7 as 22-char URL-safe base64) and the rules for ids that
//! clients choose (agents, sessions), plus the stable session → shard hash.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// A new time-ordered id: UUIDv7 rendered as 22 URL-safe base64 characters without padding.
pub fn generate_id() -> String {
    URL_SAFE_NO_PAD.encode(uuid::Uuid::now_v7().as_bytes())
}

/// A turn's id (`OpenTurn`, docs/AGENTS.md `idempotency-key`): the same for every attempt and
/// every leader that dispatches the turn. Derived, not random, from what identifies the turn
/// (the session, when it was created, and the newest user message the turn answers), so that
/// even a node that lost the record of the turn's start (its log entry archived and purged)
/// finds the same id again. 16 bytes, shown like generated ids (22 URL-safe base64 chars).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TurnId([u8; 16]);

impl TurnId {
    pub fn derive(session_id: &str, session_inserted_at: i64, through_seq: u64) -> TurnId {
        let mut input = Vec::with_capacity(session_id.len() + 24);
        input.extend_from_slice(b"fleetlm-turn\0");
        input.extend_from_slice(session_id.as_bytes());
        input.push(0);
        input.extend_from_slice(&session_inserted_at.to_be_bytes());
        input.extend_from_slice(&through_seq.to_be_bytes());
        TurnId(xxhash_rust::xxh3::xxh3_128(&input).to_be_bytes())
    }

    pub fn parse(text: &str) -> Option<TurnId> {
        let mut bytes = [0u8; 16];
        match URL_SAFE_NO_PAD.decode_slice(text, &mut bytes) {
            Ok(16) => Some(TurnId(bytes)),
            _ => None,
        }
    }
}

impl std::fmt::Display for TurnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&URL_SAFE_NO_PAD.encode(self.0))
    }
}

impl serde::Serialize for TurnId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for TurnId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<TurnId, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        TurnId::parse(&text).ok_or_else(|| serde::de::Error::custom("a turn id is 22 URL-safe base64 characters"))
    }
}

/// The id of message `ordinal` of a turn's reply when the agent names none (its `start` chunk
/// has no `messageId`): derived from the turn and the ordinal, so every attempt and every
/// leader that streams the turn forwards, and stores, the same id. Shown like generated ids.
pub fn reply_message_id(turn_id: &str, ordinal: u64) -> String {
    let mut input = Vec::with_capacity(turn_id.len() + 24);
    input.extend_from_slice(b"fleetlm-reply\0");
    input.extend_from_slice(turn_id.as_bytes());
    input.push(0);
    input.extend_from_slice(&ordinal.to_be_bytes());
    URL_SAFE_NO_PAD.encode(xxhash_rust::xxh3::xxh3_128(&input).to_be_bytes())
}

/// Client-chosen ids: 1–255 characters of `[A-Za-z0-9._:@-]`.
pub fn is_valid_client_chosen_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 255
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-'))
}

/// The shard that owns a session: xxh3-64 of the id's bytes modulo the shard count. Fixed by
/// the format (never Rust's randomly seeded hasher) so every node and every restart agrees.
pub fn shard_for_session(session_id: &str, shard_count: u16) -> u16 {
    (xxhash_rust::xxh3::xxh3_64(session_id.as_bytes()) % u64::from(shard_count)) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_22_url_safe_chars_and_time_ordered() {
        let first = generate_id();
        let second = generate_id();
        assert_eq!(first.len(), 22);
        assert!(is_valid_client_chosen_id(&first.replace(['_', '-'], "a")));
        assert!(
            first
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_ne!(first, second);
    }

    #[test]
    fn turn_ids_are_stable_per_turn_and_round_trip() {
        let id = TurnId::derive("s", 7, 3);
        assert_eq!(id, TurnId::derive("s", 7, 3), "the same turn, the same id");
        assert_ne!(id, TurnId::derive("s", 7, 4));
        assert_ne!(id, TurnId::derive("s", 8, 3), "a session made again is another session");
        assert_ne!(id, TurnId::derive("t", 7, 3));
        let text = id.to_string();
        assert_eq!(text.len(), 22);
        assert_eq!(TurnId::parse(&text), Some(id));
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<TurnId>(&json).unwrap(), id);
        assert!(TurnId::parse("short").is_none());
        assert!(serde_json::from_str::<TurnId>("\"not an id at all, no\"").is_err());
    }

    #[test]
    fn reply_message_ids_are_stable_per_turn_and_ordinal() {
        let id = reply_message_id("turn", 0);
        assert_eq!(id, reply_message_id("turn", 0));
        assert_ne!(id, reply_message_id("turn", 1));
        assert_ne!(id, reply_message_id("other", 0));
        assert_eq!(id.len(), 22);
    }

    #[test]
    fn client_chosen_ids_follow_the_rules() {
        assert!(is_valid_client_chosen_id("agent-1.v2:prod@eu_x"));
        assert!(!is_valid_client_chosen_id(""));
        assert!(!is_valid_client_chosen_id("has space"));
        assert!(!is_valid_client_chosen_id(&"a".repeat(256)));
    }

    #[test]
    fn the_shard_hash_is_fixed() {
        // Pinned values: a different hash would move existing sessions to other shards.
        let ids = ["session-1", "s", "AZrGz1oYc1y8kqj0Jr7h9Q"];
        let pinned: Vec<u16> = ids.iter().map(|id| shard_for_session(id, 64)).collect();
        assert_eq!(pinned, vec![5, 19, 33]);
    }
}
