//! Reading an agent's reply body: a stream of lines, each an AI SDK UI message chunk (as JSONL
//! or as Server-Sent Events `data:` frames) or a legacy FleetLM `{kind, content, metadata}` line.
//!
//! Architecture invariant: pure; bytes in, parsed lines out, every malformed line an error value.

use serde_json::Value;

/// One meaningful line of a reply.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyLine {
    /// An AI SDK UI message chunk (a JSON object with a string `type`).
    Chunk(Value),
    /// A legacy line: appended as one message as it arrives.
    Legacy {
        kind: String,
        content: Value,
        metadata: Value,
    },
    /// SSE `data: [DONE]`: the stream is complete.
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("reply line longer than {max} bytes")]
    TooLong { max: usize },
    #[error("reply line is not valid UTF-8")]
    NotUtf8,
    #[error("reply line is not valid JSON: {0}")]
    InvalidJson(String),
    #[error(
        "reply line is neither a UI message chunk (string \"type\") nor a legacy line (\"kind\" and object \"content\")"
    )]
    Unrecognized,
}

/// Splits a byte stream into lines (`\n` or `\r\n`), refusing lines over `max_line_bytes`.
pub struct LineSplitter {
    buffer: Vec<u8>,
    max_line_bytes: usize,
}

impl LineSplitter {
    pub fn new(max_line_bytes: usize) -> LineSplitter {
        LineSplitter {
            buffer: Vec::new(),
            max_line_bytes,
        }
    }

    /// Feeds bytes; returns the complete lines they finish.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<String>, LineError> {
        let mut lines = Vec::new();
        for &byte in bytes {
            if byte == b'\n' {
                lines.push(self.take_line()?);
            } else {
                if self.buffer.len() >= self.max_line_bytes {
                    return Err(LineError::TooLong {
                        max: self.max_line_bytes,
                    });
                }
                self.buffer.push(byte);
            }
        }
        Ok(lines)
    }

    /// The last line when the body ends without a newline.
    pub fn finish(&mut self) -> Result<Option<String>, LineError> {
        if self.buffer.is_empty() {
            Ok(None)
        } else {
            self.take_line().map(Some)
        }
    }

    fn take_line(&mut self) -> Result<String, LineError> {
        let mut line = std::mem::take(&mut self.buffer);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        String::from_utf8(line).map_err(|_| LineError::NotUtf8)
    }
}

/// Parses one line. `Ok(None)` for lines that carry nothing: blank lines, SSE comments and
/// SSE fields other than `data`.
pub fn parse_line(line: &str) -> Result<Option<ReplyLine>, LineError> {
    let line = line.trim();
    if line.is_empty() || line.starts_with(':') {
        return Ok(None);
    }
    let json = match line.strip_prefix("data:") {
        Some(data) => {
            let data = data.trim_start();
            if data == "[DONE]" {
                return Ok(Some(ReplyLine::Done));
            }
            data
        }
        None if ["event:", "id:", "retry:"].iter().any(|field| line.starts_with(field)) => {
            return Ok(None);
        }
        None => line,
    };
    let value: Value = serde_json::from_str(json).map_err(|e| LineError::InvalidJson(e.to_string()))?;
    let Value::Object(object) = &value else {
        return Err(LineError::Unrecognized);
    };
    if object.get("type").is_some_and(Value::is_string) {
        return Ok(Some(ReplyLine::Chunk(value)));
    }
    match (object.get("kind"), object.get("content")) {
        (Some(Value::String(kind)), Some(content @ Value::Object(_))) => {
            let metadata = match object.get("metadata") {
                Some(metadata @ Value::Object(_)) => metadata.clone(),
                _ => Value::Object(Default::default()),
            };
            Ok(Some(ReplyLine::Legacy {
                kind: kind.clone(),
                content: content.clone(),
                metadata,
            }))
        }
        _ => Err(LineError::Unrecognized),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn jsonl_sse_and_legacy_lines() {
        assert_eq!(
            parse_line(r#"{"type":"text-delta","id":"t","delta":"hi"}"#).unwrap(),
            Some(ReplyLine::Chunk(
                json!({"type": "text-delta", "id": "t", "delta": "hi"})
            ))
        );
        assert_eq!(
            parse_line(r#"data: {"type":"start"}"#).unwrap(),
            Some(ReplyLine::Chunk(json!({"type": "start"})))
        );
        assert_eq!(parse_line("data: [DONE]").unwrap(), Some(ReplyLine::Done));
        assert_eq!(parse_line(": keep-alive").unwrap(), None);
        assert_eq!(parse_line("event: message").unwrap(), None);
        assert_eq!(parse_line("   ").unwrap(), None);
        assert_eq!(
            parse_line(r#"{"kind":"text","content":{"text":"hi"}}"#).unwrap(),
            Some(ReplyLine::Legacy {
                kind: "text".into(),
                content: json!({"text": "hi"}),
                metadata: json!({})
            })
        );
        assert!(matches!(parse_line("{not json"), Err(LineError::InvalidJson(_))));
        assert_eq!(parse_line("[1,2]"), Err(LineError::Unrecognized));
        assert_eq!(
            parse_line(r#"{"kind":"text","content":"flat"}"#),
            Err(LineError::Unrecognized)
        );
    }

    #[test]
    fn lines_split_on_lf_and_crlf_across_reads() {
        let mut splitter = LineSplitter::new(64);
        assert_eq!(splitter.feed(b"one\r\ntw").unwrap(), vec!["one".to_string()]);
        assert_eq!(
            splitter.feed(b"o\n\nthree").unwrap(),
            vec!["two".to_string(), String::new()]
        );
        assert_eq!(splitter.finish().unwrap(), Some("three".to_string()));
        assert_eq!(splitter.finish().unwrap(), None);
    }

    #[test]
    fn an_overlong_line_is_refused() {
        let mut splitter = LineSplitter::new(8);
        assert_eq!(splitter.feed(b"0123456789"), Err(LineError::TooLong { max: 8 }));
    }
}
