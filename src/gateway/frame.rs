//! Phoenix Channels frames: V2 arrays `[join_ref, ref, topic, event, payload]` and V1 objects
//! `{"topic","event","payload","ref"}`. Refs are kept as the raw JSON the client sent so they
//! are echoed back exactly, type included.

use serde::Deserialize;
use serde_json::value::RawValue;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vsn {
    V1,
    V2,
}

impl Vsn {
    /// `2.x` → V2; missing or `1.x` → V1; anything else is refused.
    pub fn from_param(vsn: Option<&str>) -> Option<Vsn> {
        match vsn {
            None => Some(Vsn::V1),
            Some(v) if v.starts_with("2.") || v == "2" => Some(Vsn::V2),
            Some(v) if v.starts_with("1.") || v == "1" => Some(Vsn::V1),
            Some(_) => None,
        }
    }
}

/// A frame from the client. `join_ref` and `reference` are raw JSON (`null` when absent).
#[derive(Debug)]
pub struct InFrame {
    pub join_ref: String,
    pub reference: String,
    pub topic: String,
    pub event: String,
    pub payload: Box<RawValue>,
}

/// Why a frame could not be used, with the ref to answer to when one could be read.
#[derive(Debug, PartialEq, Eq)]
pub struct BadFrame {
    pub topic: Option<String>,
    pub reference: Option<String>,
    pub join_ref: Option<String>,
    pub reason: &'static str,
}

const NULL: &str = "null";

#[derive(Deserialize)]
struct V1Frame<'a> {
    #[serde(borrow)]
    topic: Option<&'a RawValue>,
    #[serde(borrow)]
    event: Option<&'a RawValue>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    #[serde(borrow, rename = "ref")]
    reference: Option<&'a RawValue>,
    #[serde(borrow)]
    join_ref: Option<&'a RawValue>,
}

fn as_string(raw: Option<&RawValue>) -> Option<String> {
    serde_json::from_str::<String>(raw?.get()).ok()
}

pub fn parse(text: &str, vsn: Vsn) -> Result<InFrame, BadFrame> {
    let unreadable = BadFrame {
        topic: None,
        reference: None,
        join_ref: None,
        reason: "malformed frame",
    };
    let (join_ref, reference, topic, event, payload) = match vsn {
        Vsn::V2 => {
            let parts: Vec<&RawValue> = serde_json::from_str(text).map_err(|_| unreadable)?;
            let [join_ref, reference, topic, event, payload] = parts[..] else {
                return Err(BadFrame {
                    topic: None,
                    reference: None,
                    join_ref: None,
                    reason: "malformed frame",
                });
            };
            (Some(join_ref), Some(reference), Some(topic), Some(event), Some(payload))
        }
        Vsn::V1 => {
            let frame: V1Frame<'_> = serde_json::from_str(text).map_err(|_| unreadable)?;
            (frame.join_ref, frame.reference, frame.topic, frame.event, frame.payload)
        }
    };
    let raw_or_null = |raw: Option<&RawValue>| raw.map_or_else(|| NULL.to_string(), |r| r.get().to_string());
    let join_ref = raw_or_null(join_ref);
    let reference = raw_or_null(reference);
    let topic = as_string(topic);
    let bad = |reason| BadFrame {
        topic: topic.clone(),
        reference: Some(reference.clone()),
        join_ref: Some(join_ref.clone()),
        reason,
    };
    let Some(event) = as_string(event) else {
        return Err(bad("event must be a string"));
    };
    let Some(topic_text) = topic.clone() else {
        return Err(bad("topic must be a string"));
    };
    let payload = match payload {
        Some(p) if p.get().starts_with('{') => p.to_owned(),
        _ => return Err(bad("payload must be an object")),
    };
    Ok(InFrame {
        join_ref,
        reference,
        topic: topic_text,
        event,
        payload,
    })
}

fn json_string(text: &str) -> String {
    serde_json::to_string(text).expect("strings serialize")
}

/// Encodes a frame whose payload is already JSON text. `join_ref` and `reference` are raw JSON.
pub fn encode(vsn: Vsn, join_ref: &str, reference: &str, topic: &str, event: &str, payload: &str) -> String {
    let (topic, event) = (json_string(topic), json_string(event));
    match vsn {
        Vsn::V2 => {
            let mut out = String::with_capacity(payload.len() + topic.len() + event.len() + join_ref.len() + 16);
            for part in [
                "[", join_ref, ",", reference, ",", &topic, ",", &event, ",", payload, "]",
            ] {
                out.push_str(part);
            }
            out
        }
        Vsn::V1 => {
            let mut out = String::with_capacity(payload.len() + topic.len() + event.len() + 48);
            for part in [
                "{\"topic\":",
                &topic,
                ",\"event\":",
                &event,
                ",\"payload\":",
                payload,
                ",\"ref\":",
                reference,
                "}",
            ] {
                out.push_str(part);
            }
            out
        }
    }
}

/// A `phx_reply` with `{"status": status, "response": response}`.
pub fn reply(vsn: Vsn, join_ref: &str, reference: &str, topic: &str, status: &str, response: &str) -> String {
    let payload = format!("{{\"status\":{},\"response\":{response}}}", json_string(status));
    encode(vsn, join_ref, reference, topic, "phx_reply", &payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_frames_keep_refs_exactly() {
        let frame = parse(r#"["1", 7, "session:a", "phx_join", {"last_seq": 3}]"#, Vsn::V2).unwrap();
        assert_eq!((frame.join_ref.as_str(), frame.reference.as_str()), ("\"1\"", "7"));
        assert_eq!((frame.topic.as_str(), frame.event.as_str()), ("session:a", "phx_join"));
        let out = reply(Vsn::V2, &frame.join_ref, &frame.reference, &frame.topic, "ok", "{}");
        assert_eq!(out, r#"["1",7,"session:a","phx_reply",{"status":"ok","response":{}}]"#);
    }

    #[test]
    fn v1_frames_are_objects_and_replies_omit_join_ref() {
        let frame = parse(
            r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"5"}"#,
            Vsn::V1,
        )
        .unwrap();
        assert_eq!(frame.join_ref, "null");
        let out = reply(Vsn::V1, &frame.join_ref, &frame.reference, &frame.topic, "ok", "{}");
        assert_eq!(
            out,
            r#"{"topic":"phoenix","event":"phx_reply","payload":{"status":"ok","response":{}},"ref":"5"}"#
        );
    }

    #[test]
    fn malformed_frames_say_what_is_wrong() {
        assert_eq!(parse("not json", Vsn::V2).unwrap_err().reason, "malformed frame");
        assert_eq!(
            parse(r#"["1","2","t","e"]"#, Vsn::V2).unwrap_err().reason,
            "malformed frame"
        );
        let bad = parse(r#"["1","2","t","e",[1]]"#, Vsn::V2).unwrap_err();
        assert_eq!(
            (bad.reason, bad.reference.as_deref()),
            ("payload must be an object", Some("\"2\""))
        );
        assert_eq!(
            parse(r#"["1","2",5,"e",{}]"#, Vsn::V2).unwrap_err().reason,
            "topic must be a string"
        );
    }

    #[test]
    fn versions_are_negotiated_from_the_param() {
        assert_eq!(Vsn::from_param(Some("2.0.0")), Some(Vsn::V2));
        assert_eq!(Vsn::from_param(Some("1.0.0")), Some(Vsn::V1));
        assert_eq!(Vsn::from_param(None), Some(Vsn::V1));
        assert_eq!(Vsn::from_param(Some("3.0.0")), None);
    }
}
