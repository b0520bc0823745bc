//! Replies that continue a stored message. With the AI SDK, an agent given the conversation
//! (`originalMessages`) continues its last assistant message: after a tool approval, the reply's
//! `start` names that message's id and goes on with the outcome of a tool call the message made.
//! FleetLM assembles such a reply from the stored message, as the SDK does on the client, and
//! stores the whole message again, marked `"continuation": "whole"` in its metadata, so a reader
//! takes it in place of the earlier copies (`historyToUIMessages` in `@fleetlm/ai-sdk`).
//!
//! Architecture invariant: pure; the history is what the dispatch sent the agent.

use std::collections::HashMap;

use serde_json::{Map, Value};

/// The metadata key and value of a stored message that holds all of a continued message.
pub const CONTINUATION_KEY: &str = "continuation";
pub const WHOLE: &str = "whole";

/// The message of a history a reply may continue: the one the user's newest message answers
/// with tool results or approvals (a `tool_result` naming it), the only case in which the AI SDK
/// continues a message. Its parts are as a chat holds them: the copies of the message joined in
/// order (a later whole copy replaces the earlier ones; a tool part of a call an earlier copy
/// made updates that part), and the user's tool results and approvals folded in. A reply to a
/// new user message that reuses an old message id starts a new message, as before.
#[derive(Default)]
pub struct Continuable {
    messages: HashMap<String, Vec<Map<String, Value>>>,
    /// The message the newest `tool_result` names, unless a message of another kind (a user's
    /// text, a `regenerate`, the agent's own text) came after it.
    answered: Option<String>,
}

fn is_tool_part(part: &Map<String, Value>) -> bool {
    part.get("toolCallId").and_then(Value::as_str).is_some()
        && part
            .get("type")
            .and_then(Value::as_str)
            .is_some_and(|kind| kind.starts_with("tool-") || kind == "dynamic-tool")
}

fn tool_call_id(part: &Map<String, Value>) -> Option<&str> {
    is_tool_part(part)
        .then(|| part.get("toolCallId").and_then(Value::as_str))
        .flatten()
}

fn object_parts(parts: Option<&Value>) -> Vec<Map<String, Value>> {
    parts
        .and_then(Value::as_array)
        .map(|parts| parts.iter().filter_map(|part| part.as_object().cloned()).collect())
        .unwrap_or_default()
}

impl Continuable {
    /// From the history sent to the agent (oldest first, as `turn.rs` builds it).
    pub fn from_history(history: &[Value]) -> Continuable {
        let mut found = Continuable::default();
        for message in history {
            let content = &message["content"];
            match message["kind"].as_str() {
                Some("assistant") => {
                    let Some(id) = content["id"].as_str().filter(|id| !id.is_empty()) else {
                        continue;
                    };
                    let parts = object_parts(content.get("parts"));
                    let whole = message["metadata"][CONTINUATION_KEY].as_str() == Some(WHOLE);
                    match found.messages.get_mut(id) {
                        Some(held) if !whole => join(held, parts),
                        _ => {
                            found.messages.insert(id.to_string(), parts);
                        }
                    }
                }
                Some("tool_result") => {
                    let target = content["message_id"].as_str();
                    found.answered = target.map(str::to_string);
                    let Some(held) = target.and_then(|id| found.messages.get_mut(id)) else {
                        continue;
                    };
                    for update in object_parts(content.get("parts")) {
                        let Some(call) = tool_call_id(&update) else { continue };
                        if let Some(part) = held.iter_mut().find(|part| tool_call_id(part) == Some(call)) {
                            *part = update;
                        }
                    }
                }
                // A user's message, or text the agent wrote by REST: a new turn or message.
                _ => found.answered = None,
            }
        }
        found
    }

    /// The parts of the message with this id, if the user's newest message answers it.
    pub fn parts(&self, id: &str) -> Option<&[Map<String, Value>]> {
        if self.answered.as_deref() != Some(id) {
            return None;
        }
        self.messages.get(id).map(Vec::as_slice)
    }
}

/// Appends a later copy's parts; a tool part for a call already held updates that part.
fn join(held: &mut Vec<Map<String, Value>>, later: Vec<Map<String, Value>>) {
    let earlier: HashMap<String, usize> = held
        .iter()
        .enumerate()
        .filter_map(|(index, part)| tool_call_id(part).map(|id| (id.to_string(), index)))
        .collect();
    for part in later {
        match tool_call_id(&part).and_then(|id| earlier.get(id)) {
            Some(&index) => {
                for (key, value) in part {
                    held[index].insert(key, value);
                }
            }
            None => held.push(part),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn ids(parts: &[Map<String, Value>]) -> Vec<String> {
        parts
            .iter()
            .map(|part| {
                format!(
                    "{}:{}",
                    part["type"].as_str().unwrap(),
                    part.get("state").and_then(Value::as_str).unwrap_or("-")
                )
            })
            .collect()
    }

    #[test]
    fn a_message_is_held_as_a_chat_holds_it() {
        let history = vec![
            json!({"kind": "text", "content": {"text": "delete /tmp/x"}}),
            json!({"kind": "assistant", "metadata": {}, "content": {"id": "m1", "parts": [
                {"type": "step-start"},
                {"type": "tool-deleteFile", "toolCallId": "c1", "state": "approval-requested", "input": {"path": "/tmp/x"}, "approval": {"id": "a1"}}
            ]}}),
            json!({"kind": "tool_result", "content": {"message_id": "m1", "parts": [
                {"type": "tool-deleteFile", "toolCallId": "c1", "state": "approval-responded", "input": {"path": "/tmp/x"}, "approval": {"id": "a1", "approved": true}}
            ]}}),
        ];
        let found = Continuable::from_history(&history);
        let parts = found.parts("m1").unwrap();
        assert_eq!(ids(parts), ["step-start:-", "tool-deleteFile:approval-responded"]);
        assert_eq!(parts[1]["approval"]["approved"], true);
        assert!(found.parts("nope").is_none());
    }

    #[test]
    fn only_a_message_the_newest_tool_result_answers_is_continued() {
        let reply = |id: &str, text: &str| json!({"kind": "assistant", "metadata": {}, "content": {"id": id, "parts": [{"type": "text", "text": text}]}});
        let user = |text: &str| json!({"kind": "text", "content": {"text": text}});
        let answer = |id: &str| json!({"kind": "tool_result", "content": {"message_id": id, "parts": []}});
        // An agent that gives every reply the same id: a new question is not a continuation,
        // whether it came before the previous reply was stored or after.
        let history = vec![user("first"), reply("same", "echo: first"), user("second")];
        assert!(Continuable::from_history(&history).parts("same").is_none());
        let history = vec![user("first"), user("second"), reply("same", "echo: first")];
        assert!(Continuable::from_history(&history).parts("same").is_none());
        let history = vec![user("q"), reply("m1", "a"), reply("m2", "b"), answer("m1")];
        let found = Continuable::from_history(&history);
        assert!(found.parts("m1").is_some());
        assert!(found.parts("m2").is_none());
        let history = vec![user("q"), reply("m1", "a"), answer("m1"), user("and then?")];
        assert!(Continuable::from_history(&history).parts("m1").is_none());
    }

    #[test]
    fn copies_join_and_a_whole_copy_replaces_them() {
        let tool = |state: &str| json!({"type": "tool-x", "toolCallId": "c", "state": state});
        // The user answers the message again (a second tool call of the same message).
        let answered = json!({"kind": "tool_result", "content": {"message_id": "m", "parts": []}});
        let older = vec![
            json!({"kind": "assistant", "content": {"id": "m", "parts": [tool("approval-requested")]}}),
            // A continuation stored before FleetLM assembled whole ones: only its own parts.
            json!({"kind": "assistant", "content": {"id": "m", "parts": [tool("output-available"), {"type": "text", "text": "done"}]}}),
            answered.clone(),
        ];
        assert_eq!(
            ids(Continuable::from_history(&older).parts("m").unwrap()),
            ["tool-x:output-available", "text:-"]
        );
        let mut newer = older[..2].to_vec();
        newer.push(json!({"kind": "assistant", "metadata": {"continuation": "whole"}, "content": {"id": "m", "parts": [{"type": "text", "text": "all"}]}}));
        newer.push(answered);
        assert_eq!(ids(Continuable::from_history(&newer).parts("m").unwrap()), ["text:-"]);
    }
}
