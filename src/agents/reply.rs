//! Reading an agent's reply body: a stream of lines, each an AI SDK UI message chunk (as JSONL
//! or as Server-Sent Events `data:` frames) or a legacy FleetLM `{kind, content, metadata}` line;
//! or one JSON value (a UI message, an array of chunks or lines, one chunk or line). Which of the
//! two a body is comes from the body itself (`ReplyBody`), never from its declared content type:
//! many handlers stream JSON lines as `application/json`.
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

/// A reply body as it arrives: lines, handed on as they complete, or one JSON value, held whole
/// (at most `max_line_bytes`) until the body ends. The first line that is not blank decides:
/// one that reads as a reply line (a chunk, a legacy line, an SSE field or comment) makes the
/// body lines; anything else (the first line of a formatted document, a UI message or an array
/// on one line) makes it one value. A body that ends before a first whole line is one value.
/// A value that does not parse is read as lines after all, if every line reads as one.
pub struct ReplyBody {
    splitter: LineSplitter,
    shape: BodyShape,
    /// The body so far while its shape is undecided or it is one value.
    held: Vec<u8>,
    max_line_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyShape {
    Undecided,
    Lines,
    Value,
}

/// What is left of a body once it ended.
#[derive(Debug, Clone, PartialEq)]
pub enum BodyEnd {
    /// Lines not handed on yet (the last one, unterminated; or all of them when the body was
    /// read as lines only at its end).
    Lines(Vec<String>),
    /// The body was one JSON value.
    Value(Value),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Line(#[from] LineError),
    #[error("reply longer than {max} bytes")]
    TooLong { max: usize },
    #[error("malformed reply: not JSON ({0})")]
    NotJson(String),
    /// JSON values one after the other, one of them not a reply line.
    #[error("malformed reply line: {0}")]
    BadLine(LineError),
}

impl ReplyBody {
    pub fn new(max_line_bytes: usize) -> ReplyBody {
        ReplyBody {
            splitter: LineSplitter::new(max_line_bytes),
            shape: BodyShape::Undecided,
            held: Vec::new(),
            max_line_bytes,
        }
    }

    /// Feeds bytes; returns the lines they complete (none while the body is, or may be, one
    /// value).
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<String>, BodyError> {
        match self.shape {
            BodyShape::Lines => return Ok(self.splitter.feed(bytes)?),
            BodyShape::Value => {
                self.hold(bytes)?;
                return Ok(Vec::new());
            }
            BodyShape::Undecided => {}
        }
        let decided_before = self.held.len();
        self.held.extend_from_slice(bytes);
        self.shape = first_line_shape(&self.held, decided_before);
        match self.shape {
            BodyShape::Lines => {
                let held = std::mem::take(&mut self.held);
                Ok(self.splitter.feed(&held)?)
            }
            BodyShape::Value => {
                self.check_held_size()?;
                Ok(Vec::new())
            }
            BodyShape::Undecided => {
                if self.held.len() > self.max_line_bytes {
                    return Err(LineError::TooLong {
                        max: self.max_line_bytes,
                    }
                    .into());
                }
                Ok(Vec::new())
            }
        }
    }

    /// The body ended: what is left of it.
    pub fn finish(&mut self) -> Result<BodyEnd, BodyError> {
        if self.shape == BodyShape::Lines {
            return Ok(BodyEnd::Lines(self.splitter.finish()?.into_iter().collect()));
        }
        let held = std::mem::take(&mut self.held);
        if held.iter().all(u8::is_ascii_whitespace) {
            return Ok(BodyEnd::Lines(Vec::new()));
        }
        let not_one_value = match serde_json::from_slice::<Value>(&held) {
            Ok(value) => return Ok(BodyEnd::Value(value)),
            Err(error) => error.to_string(),
        };
        let mut splitter = LineSplitter::new(self.max_line_bytes);
        let lines: Vec<String> = match (splitter.feed(&held), splitter.finish()) {
            (Ok(mut lines), Ok(last)) => {
                lines.extend(last);
                lines
            }
            _ => return Err(BodyError::NotJson(not_one_value)),
        };
        let Some(bad_line) = lines.iter().find_map(|line| parse_line(line).err()) else {
            return Ok(BodyEnd::Lines(lines));
        };
        // Several JSON values one after the other were meant as lines: the bad line says more
        // than "trailing characters".
        let several_values = serde_json::Deserializer::from_slice(&held)
            .into_iter::<Value>()
            .take(2)
            .all(|value| value.is_ok());
        if several_values {
            Err(BodyError::BadLine(bad_line))
        } else {
            Err(BodyError::NotJson(not_one_value))
        }
    }

    fn hold(&mut self, bytes: &[u8]) -> Result<(), BodyError> {
        self.held.extend_from_slice(bytes);
        self.check_held_size()
    }

    fn check_held_size(&self) -> Result<(), BodyError> {
        if self.held.len() > self.max_line_bytes {
            return Err(BodyError::TooLong {
                max: self.max_line_bytes,
            });
        }
        Ok(())
    }
}

/// The shape the first non-blank whole line of `held` gives the body (`Undecided` while there
/// is none). Lines ending before `scanned_up_to` were seen already (all blank).
fn first_line_shape(held: &[u8], scanned_up_to: usize) -> BodyShape {
    let start = held[..scanned_up_to]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |newline| newline + 1);
    let mut rest = &held[start..];
    while let Some(end) = rest.iter().position(|&b| b == b'\n') {
        let line = &rest[..end];
        rest = &rest[end + 1..];
        let Ok(text) = std::str::from_utf8(line) else {
            return BodyShape::Value;
        };
        if text.trim().is_empty() {
            continue;
        }
        return match parse_line(text) {
            Ok(_) => BodyShape::Lines,
            Err(_) => BodyShape::Value,
        };
    }
    BodyShape::Undecided
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

    /// Feeds `body` in pieces of `piece` bytes; the lines handed on as they came, and the end.
    fn read(body: &str, piece: usize) -> (Vec<String>, Result<BodyEnd, BodyError>) {
        let mut reader = ReplyBody::new(64);
        let mut lines = Vec::new();
        for bytes in body.as_bytes().chunks(piece) {
            match reader.feed(bytes) {
                Ok(more) => lines.extend(more),
                Err(error) => return (lines, Err(error)),
            }
        }
        (lines, reader.finish())
    }

    /// A name, a body, the lines handed on as it arrives, and what is left when it ends.
    type BodyCase<'a> = (&'a str, String, Vec<&'a str>, Result<BodyEnd, BodyError>);

    #[test]
    fn a_body_is_lines_or_one_value_by_its_first_line() {
        let start = r#"{"type":"start"}"#;
        let finish = r#"{"type":"finish"}"#;
        let data_start = format!("data: {start}");
        let cases: Vec<BodyCase> = vec![
            (
                "json lines stream as they come",
                format!("{start}\n{finish}\n"),
                vec![start, finish],
                Ok(BodyEnd::Lines(vec![])),
            ),
            (
                "blank lines first, no final newline",
                format!("\r\n\n{start}\r\n{finish}"),
                vec!["", "", start],
                Ok(BodyEnd::Lines(vec![finish.into()])),
            ),
            (
                "sse",
                format!(": hi\ndata: {start}\n\ndata: [DONE]\n"),
                vec![": hi", &data_start, "", "data: [DONE]"],
                Ok(BodyEnd::Lines(vec![])),
            ),
            (
                "a formatted document is one value",
                "{\n  \"role\": \"assistant\",\n  \"parts\": []\n}\n".into(),
                vec![],
                Ok(BodyEnd::Value(json!({"role": "assistant", "parts": []}))),
            ),
            (
                "a message on one line is one value",
                "{\"role\":\"assistant\",\"parts\":[]}\n".into(),
                vec![],
                Ok(BodyEnd::Value(json!({"role": "assistant", "parts": []}))),
            ),
            (
                "an array on one line is one value",
                format!("[{start},{finish}]\n"),
                vec![],
                Ok(BodyEnd::Value(json!([{"type": "start"}, {"type": "finish"}]))),
            ),
            (
                "one chunk without a newline is one value",
                start.into(),
                vec![],
                Ok(BodyEnd::Value(json!({"type": "start"}))),
            ),
            (
                "an empty body is no lines",
                " \n".into(),
                vec![],
                Ok(BodyEnd::Lines(vec![])),
            ),
            (
                "neither",
                "{\n  \"role\": \n".into(),
                vec![],
                Err(BodyError::NotJson(String::new())),
            ),
            (
                "json lines whose first is no reply line",
                format!("{{\"role\":\"assistant\",\"parts\":[]}}\n{finish}\n"),
                vec![],
                Err(BodyError::BadLine(LineError::Unrecognized)),
            ),
            (
                "a bad line after good ones is the line's to report",
                format!("{start}\nnot json\n"),
                vec![start, "not json"],
                Ok(BodyEnd::Lines(vec![])),
            ),
            (
                "a value over the limit",
                format!("[\n{}]", "1,".repeat(40)),
                vec![],
                Err(BodyError::TooLong { max: 64 }),
            ),
            (
                "a first line over the limit",
                "x".repeat(65),
                vec![],
                Err(BodyError::Line(LineError::TooLong { max: 64 })),
            ),
        ];
        for (name, body, lines, end) in cases {
            for piece in [1, 3, body.len().max(1)] {
                let (got_lines, mut got_end) = read(&body, piece);
                if let Err(BodyError::NotJson(reason)) = &mut got_end {
                    assert!(!reason.is_empty());
                    reason.clear();
                }
                assert_eq!(got_lines, lines, "{name} (pieces of {piece})");
                assert_eq!(got_end, end, "{name} (pieces of {piece})");
            }
        }
    }

    #[test]
    fn an_overlong_line_is_refused() {
        let mut splitter = LineSplitter::new(8);
        assert_eq!(splitter.feed(b"0123456789"), Err(LineError::TooLong { max: 8 }));
    }
}
