//! Format 2 of a log entry: one marker byte, the operations one after the other (each a tag
//! byte and its fields), and one end byte. The operations every write makes (`message_appended`,
//! `session_created`, `read_cursor_moved`, `session_archived`, `session_evicted`) have fields
//! of their own; the rare ones (a dispatch's start and end, skipped seqs, a session loaded in a
//! cluster) are carried as their JSON (tag `JSON_OP`), so they need no code here.
//!
//! Fields: unsigned numbers as LEB128 varints, timestamps as zigzag varints, the fingerprint as
//! 8 little-endian bytes, a flag as one byte, text as a varint `len << 1 | escaped` and its
//! bytes. Text holding a NUL character is written as its JSON string literal (`escaped`), so an
//! entry never holds long runs of zero bytes: WAL recovery reads a whole zero sector inside a
//! batch as a write that never reached the disk (`wal::recovery`), and user text must not be
//! able to imitate one. Message content and metadata are the JSON the client sent, stored as
//! is (valid JSON never holds a NUL byte).

use std::sync::Arc;

use serde_json::value::RawValue;

use super::Op;
use crate::model::{Message, MessageRecord, ReadCursor, SessionRecord, Timestamp};

/// First byte of a format-2 entry: neither `{` (format 1, JSON) nor a consensus record tag.
pub const ENTRY_MARKER: u8 = 0xB2;
/// Last byte of a format-2 entry. Not zero: WAL recovery reads a bad last batch ending in a
/// zero byte as a write cut short, so an entry must not end like one (operations often do).
pub const ENTRY_END: u8 = 0xE2;

const TAG_MESSAGE_APPENDED: u8 = 1;
const TAG_SESSION_CREATED: u8 = 2;
const TAG_READ_CURSOR_MOVED: u8 = 3;
const TAG_SESSION_ARCHIVED: u8 = 4;
const TAG_SESSION_EVICTED: u8 = 5;
const TAG_JSON_OP: u8 = 0x7F;

/// Appends `op`'s encoding to `out`.
pub fn write_op(out: &mut Vec<u8>, op: &Op) {
    match op {
        Op::MessageAppended(record) => {
            let message = &record.message;
            out.push(TAG_MESSAGE_APPENDED);
            write_text(out, &message.session_id);
            write_varint(out, message.seq);
            write_text(out, &message.id);
            write_text(out, &message.sender_id);
            write_text(out, &message.kind);
            write_json(out, &message.content);
            write_json(out, &message.metadata);
            write_timestamp(out, message.inserted_at);
            match &record.client_id {
                Some(client_id) => {
                    out.push(1);
                    write_text(out, client_id);
                }
                None => out.push(0),
            }
            out.extend_from_slice(&record.fingerprint.to_le_bytes());
            write_varint(out, record.nonuser_through);
            out.push(u8::from(record.from_user));
        }
        Op::SessionCreated(session) => {
            out.push(TAG_SESSION_CREATED);
            write_text(out, &session.id);
            write_text(out, &session.user_id);
            write_text(out, &session.agent_id);
            write_json(out, &session.metadata);
            write_timestamp(out, session.inserted_at);
        }
        Op::ReadCursorMoved { session_id, cursor, at } => {
            out.push(TAG_READ_CURSOR_MOVED);
            write_text(out, session_id);
            write_varint(out, cursor.read_seq);
            write_varint(out, cursor.nonuser_through);
            write_timestamp(out, *at);
        }
        Op::SessionArchived { session_id, at } => {
            out.push(TAG_SESSION_ARCHIVED);
            write_text(out, session_id);
            write_timestamp(out, *at);
        }
        Op::SessionEvicted { session_id } => {
            out.push(TAG_SESSION_EVICTED);
            write_text(out, session_id);
        }
        Op::DispatchStarted { .. }
        | Op::DispatchFinished { .. }
        | Op::SeqsSkipped { .. }
        | Op::SessionLoaded { .. } => {
            let json = serde_json::to_vec(op).expect("ops always serialize");
            out.push(TAG_JSON_OP);
            write_varint(out, json.len() as u64);
            out.extend_from_slice(&json);
        }
    }
}

/// The operations of a format-2 entry's body (what lies between its marker and end bytes).
pub fn read_ops(body: &[u8]) -> Result<Vec<Op>, String> {
    let mut reader = Reader {
        bytes: body,
        at: 0,
        last_session: None,
    };
    let mut ops = Vec::new();
    while reader.at < body.len() {
        let tag_at = reader.at;
        let op = reader
            .op()
            .map_err(|error| format!("operation {} (byte {tag_at}): {error}", ops.len()))?;
        ops.push(op);
    }
    Ok(ops)
}

fn write_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn write_timestamp(out: &mut Vec<u8>, at: Timestamp) {
    write_varint(out, ((at.0 << 1) ^ (at.0 >> 63)) as u64);
}

fn write_text(out: &mut Vec<u8>, text: &str) {
    if text.as_bytes().contains(&0) {
        let literal = serde_json::to_string(text).expect("strings serialize");
        write_varint(out, ((literal.len() as u64) << 1) | 1);
        out.extend_from_slice(literal.as_bytes());
    } else {
        write_varint(out, (text.len() as u64) << 1);
        out.extend_from_slice(text.as_bytes());
    }
}

fn write_json(out: &mut Vec<u8>, json: &RawValue) {
    write_varint(out, json.get().len() as u64);
    out.extend_from_slice(json.get().as_bytes());
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    /// The session id of the operation before, shared with the next one naming the same.
    last_session: Option<Arc<str>>,
}

impl<'a> Reader<'a> {
    fn op(&mut self) -> Result<Op, String> {
        Ok(match self.byte()? {
            TAG_MESSAGE_APPENDED => {
                let session_id = self.session_id()?;
                let seq = self.varint()?;
                let id = self.text()?;
                let sender_id = self.text()?;
                let kind = self.text()?;
                let content = self.json()?;
                let metadata = self.json()?;
                let inserted_at = self.timestamp()?;
                let client_id = match self.byte()? {
                    0 => None,
                    1 => Some(self.text()?),
                    other => return Err(format!("client id flag {other}")),
                };
                let fingerprint = u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes"));
                let nonuser_through = self.varint()?;
                let from_user = self.flag()?;
                Op::MessageAppended(MessageRecord {
                    message: Message {
                        id,
                        session_id,
                        seq,
                        sender_id,
                        kind,
                        content,
                        metadata,
                        inserted_at,
                    },
                    client_id,
                    fingerprint,
                    nonuser_through,
                    from_user,
                })
            }
            TAG_SESSION_CREATED => Op::SessionCreated(SessionRecord {
                id: self.session_id()?,
                user_id: self.text()?,
                agent_id: self.text()?,
                metadata: self.json()?,
                inserted_at: self.timestamp()?,
            }),
            TAG_READ_CURSOR_MOVED => Op::ReadCursorMoved {
                session_id: self.text()?,
                cursor: ReadCursor {
                    read_seq: self.varint()?,
                    nonuser_through: self.varint()?,
                },
                at: self.timestamp()?,
            },
            TAG_SESSION_ARCHIVED => Op::SessionArchived {
                session_id: self.text()?,
                at: self.timestamp()?,
            },
            TAG_SESSION_EVICTED => Op::SessionEvicted {
                session_id: self.text()?,
            },
            TAG_JSON_OP => {
                let len = self.len()?;
                serde_json::from_slice(self.take(len)?).map_err(|error| format!("JSON operation: {error}"))?
            }
            other => return Err(format!("unknown operation tag {other}")),
        })
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(len)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| format!("{len} bytes wanted, {} left", self.bytes.len() - self.at))?;
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn flag(&mut self) -> Result<bool, String> {
        match self.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(format!("flag {other}")),
        }
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            let bits = u64::from(byte & 0x7F);
            if shift == 63 && bits > 1 {
                return Err("varint overflows 64 bits".into());
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn len(&mut self) -> Result<usize, String> {
        usize::try_from(self.varint()?).map_err(|_| "length overflows".to_string())
    }

    fn timestamp(&mut self) -> Result<Timestamp, String> {
        let zigzag = self.varint()?;
        Ok(Timestamp((zigzag >> 1) as i64 ^ -((zigzag & 1) as i64)))
    }

    /// Text as written by `write_text`, borrowed from the entry when it was not escaped.
    fn text_bytes(&mut self) -> Result<std::borrow::Cow<'a, str>, String> {
        let header = self.varint()?;
        let len = usize::try_from(header >> 1).map_err(|_| "length overflows".to_string())?;
        let bytes = self.take(len)?;
        if header & 1 == 1 {
            return serde_json::from_slice::<String>(bytes)
                .map(std::borrow::Cow::Owned)
                .map_err(|error| format!("escaped text: {error}"));
        }
        std::str::from_utf8(bytes)
            .map(std::borrow::Cow::Borrowed)
            .map_err(|_| "text is not UTF-8".to_string())
    }

    fn text(&mut self) -> Result<String, String> {
        Ok(self.text_bytes()?.into_owned())
    }

    /// A session id, sharing one allocation with the operation before when it names the same
    /// session (a batch's operations mostly do).
    fn session_id(&mut self) -> Result<Arc<str>, String> {
        let text = self.text_bytes()?;
        if let Some(last) = &self.last_session
            && **last == *text
        {
            return Ok(last.clone());
        }
        let id: Arc<str> = Arc::from(&*text);
        self.last_session = Some(id.clone());
        Ok(id)
    }

    fn json(&mut self) -> Result<Box<RawValue>, String> {
        let len = self.len()?;
        let bytes = self.take(len)?;
        let text = std::str::from_utf8(bytes).map_err(|_| "JSON is not UTF-8".to_string())?;
        // Checks the JSON is whole: an entry is under a checksum, but a decoder that trusts its
        // input is one bug away from serving broken JSON.
        let raw: &RawValue = serde_json::from_str(text).map_err(|error| format!("JSON value: {error}"))?;
        Ok(raw.to_owned())
    }
}
