//! Identifiers: generated ids (UUIDv7 as 22-char URL-safe base64) and the rules for ids that
//! clients choose (agents, sessions), plus the stable session → shard hash.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// A new time-ordered id: UUIDv7 rendered as 22 URL-safe base64 characters without padding.
pub fn generate_id() -> String {
    URL_SAFE_NO_PAD.encode(uuid::Uuid::now_v7().as_bytes())
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
