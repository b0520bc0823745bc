//! The current branch of a session after `regenerate` messages, a pure function of the log
//! (docs/API.md, "Regenerate"):
//!
//! - a `regenerate` message of the session's user at seq r supersedes every message of the
//!   agent after the latest user message of another kind before r (the replies being redone);
//! - the reply dispatched for r says which message it replaces: the `message_id` r names, else
//!   the first message of the agent after the latest user message (of any kind) before r — the
//!   reply shown when the user asked — if there is one.
//!
//! The agent's webhook history leaves out superseded messages and `regenerate` messages, so it
//! sees the current branch ending in the user's turn.

use std::collections::HashSet;

use crate::model::Message;

pub const REGENERATE: &str = "regenerate";

#[derive(Debug, Default, PartialEq)]
pub struct Branch {
    /// Seqs not on the current branch: superseded replies and the `regenerate` messages.
    pub hidden: HashSet<u64>,
    /// If the newest user message is a `regenerate`, the id its reply replaces.
    pub replaces: Option<String>,
}

/// `messages`: a window of the session, oldest first (the rule looks back only within it).
pub fn current_branch(messages: &[&Message], user_id: &str) -> Branch {
    let mut branch = Branch::default();
    // Agent messages since the latest user message of another kind than `regenerate`, and
    // since the latest user message of any kind (ids).
    let mut since_turn: Vec<u64> = Vec::new();
    let mut since_user: Option<&str> = None;
    for message in messages {
        if message.sender_id != user_id {
            since_turn.push(message.seq);
            if since_user.is_none() {
                since_user = Some(&message.id);
            }
            continue;
        }
        if message.kind != REGENERATE {
            since_turn.clear();
            since_user = None;
            branch.replaces = None;
            continue;
        }
        branch.hidden.insert(message.seq);
        branch.hidden.extend(since_turn.iter().copied());
        let named = serde_json::from_str::<serde_json::Value>(message.content.get())
            .ok()
            .and_then(|content| content.get("message_id")?.as_str().map(str::to_string));
        branch.replaces = named.or_else(|| since_user.map(str::to_string));
        since_user = None;
    }
    branch
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::value::RawValue;

    use super::*;
    use crate::model::Timestamp;

    fn message(seq: u64, sender: &str, kind: &str, content: &str) -> Message {
        Message {
            id: format!("id{seq}"),
            session_id: Arc::from("s"),
            seq,
            sender_id: sender.into(),
            kind: kind.into(),
            content: RawValue::from_string(content.into()).unwrap(),
            metadata: RawValue::from_string("{}".into()).unwrap(),
            inserted_at: Timestamp(0),
        }
    }

    fn branch(log: &[Message]) -> Branch {
        current_branch(&log.iter().collect::<Vec<_>>(), "u")
    }

    #[test]
    fn no_regenerate_hides_nothing() {
        let log = [message(1, "u", "text", "{}"), message(2, "a", "assistant", "{}")];
        assert_eq!(branch(&log), Branch::default());
    }

    #[test]
    fn a_regenerate_supersedes_the_replies_to_the_turn_and_names_the_shown_one() {
        let log = [
            message(1, "u", "text", "{}"),
            message(2, "a", "assistant", "{}"),
            message(3, "u", "regenerate", "{}"),
        ];
        let found = branch(&log);
        assert_eq!(found.hidden, HashSet::from([2, 3]));
        assert_eq!(found.replaces.as_deref(), Some("id2"));
        // Its reply came; a second regenerate supersedes both replies and replaces the second.
        let log = [
            message(1, "u", "text", "{}"),
            message(2, "a", "assistant", "{}"),
            message(3, "u", "regenerate", "{}"),
            message(4, "a", "assistant", "{}"),
            message(5, "u", "regenerate", "{}"),
        ];
        let found = branch(&log);
        assert_eq!(found.hidden, HashSet::from([2, 3, 4, 5]));
        assert_eq!(found.replaces.as_deref(), Some("id4"));
    }

    #[test]
    fn a_named_message_wins_and_a_later_turn_ends_the_regenerate() {
        let log = [
            message(1, "u", "text", "{}"),
            message(2, "a", "assistant", "{}"),
            message(3, "u", "regenerate", r#"{"message_id":"other"}"#),
        ];
        assert_eq!(branch(&log).replaces.as_deref(), Some("other"));
        let log = [
            message(1, "u", "text", "{}"),
            message(2, "a", "assistant", "{}"),
            message(3, "u", "regenerate", "{}"),
            message(4, "a", "assistant", "{}"),
            message(5, "u", "text", "{}"),
        ];
        let found = branch(&log);
        assert_eq!(found.hidden, HashSet::from([2, 3]));
        assert_eq!(found.replaces, None);
    }

    #[test]
    fn a_regenerate_with_no_reply_yet_replaces_nothing() {
        let log = [message(1, "u", "text", "{}"), message(2, "u", "regenerate", "{}")];
        let found = branch(&log);
        assert_eq!(found.hidden, HashSet::from([2]));
        assert_eq!(found.replaces, None);
    }
}
