use std::sync::Arc;

use serde_json::value::RawValue;

use super::*;
use crate::model::{DispatchProgress, LastActivity, Message, SessionStatus};

fn raw(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_string()).unwrap()
}

fn message(session: &str, seq: u64, client_id: Option<&str>) -> Op {
    Op::MessageAppended(MessageRecord {
        message: Message {
            id: format!("0192f4c8-8b1e-7cc0-9c5e-{seq:012}"),
            session_id: Arc::from(session),
            seq,
            sender_id: "user-1".into(),
            kind: "text".into(),
            content: raw(r#"{"text":"héllo \"there\" \u0000"}"#),
            metadata: raw("{}"),
            inserted_at: Timestamp(1_765_000_000_123_456),
        },
        client_id: client_id.map(str::to_string),
        fingerprint: 0xDEAD_BEEF_0000_0001,
        nonuser_through: seq / 2,
        from_user: seq.is_multiple_of(2),
    })
}

/// One of every operation, with edge values (zero, the largest numbers, negative times).
fn every_op() -> Vec<Op> {
    let session = SessionRecord {
        id: Arc::from("s-1"),
        user_id: "u".into(),
        agent_id: "a".into(),
        metadata: raw(r#"{"plan":[1,2,{"x":null}]}"#),
        inserted_at: Timestamp(-1),
    };
    vec![
        Op::SessionCreated(session.clone()),
        message("s-1", 1, Some("c-1")),
        message("s-1", u64::MAX, None),
        message("s-2", 0, Some("")),
        message("nul\0session", 3, Some("nul\0client")),
        Op::ReadCursorMoved {
            session_id: "s-1".into(),
            cursor: ReadCursor {
                read_seq: 127,
                nonuser_through: 128,
            },
            at: Timestamp(i64::MIN),
        },
        Op::SessionArchived {
            session_id: "s\u{1}\"x".into(),
            at: Timestamp(i64::MAX),
        },
        Op::SessionEvicted {
            session_id: "s-2".into(),
        },
        Op::DispatchStarted {
            session_id: "s".into(),
            turn_id: crate::ids::TurnId::derive("s", 1, 3),
            through_seq: 3,
            history_seq: 4,
            at: Timestamp(1),
        },
        Op::DispatchFinished {
            session_id: "s".into(),
            dispatch_id: "d".into(),
            through_seq: 3,
            error: Some("boom".into()),
            at: Timestamp(2),
            cancelled: true,
        },
        Op::SeqsSkipped {
            session_id: "s".into(),
            from_seq: 4,
            through_seq: 9,
            at: Timestamp(3),
        },
        Op::SessionLoaded {
            view: SessionView {
                record: session,
                status: SessionStatus::Active,
                last_seq: 9,
                nonuser_count: 2,
                read_cursor: ReadCursor::default(),
                last_activity: LastActivity::default(),
                updated_at: Timestamp(5),
                dispatch: DispatchProgress::default(),
            },
            gaps: vec![(4, 9)],
        },
    ]
}

/// Ops compared through their debug form: every field, timestamps as their microseconds.
fn described(ops: &[Op]) -> String {
    format!("{ops:?}")
}

#[test]
fn every_operation_comes_back_as_it_was_written() {
    let ops = every_op();
    let bytes = encode_entry(&ops);
    assert_eq!(bytes[0], binary::ENTRY_MARKER);
    let decoded = decode_entry(&bytes).unwrap();
    assert_eq!(described(&decoded), described(&ops));
    assert_eq!(
        encode_entry(&decoded),
        bytes,
        "decoding and encoding again changes nothing"
    );
}

#[test]
fn an_entry_as_the_format_1_encoder_wrote_it_is_still_read() {
    // Bytes as the format-1 encoder wrote them, from before `from_user` and `cancelled` existed.
    let written = br#"{"v":1,"ops":[{"session_created":{"id":"s-1","user_id":"u","agent_id":"a","metadata":{"k":[1]},"inserted_at":"2026-12-07T10:00:00.000001Z"}},{"message_appended":{"message":{"id":"m1","session_id":"s-1","seq":1,"sender_id":"u","kind":"text","content":{"text":"h\u00e9"},"metadata":{},"inserted_at":"2026-12-07T10:00:00.000002Z"},"fingerprint":7,"nonuser_through":0}},{"dispatch_finished":{"session_id":"s-1","dispatch_id":"d","through_seq":1,"error":null,"at":"2026-12-07T10:00:00.000003Z"}}]}"#;
    let ops = decode_entry(written).unwrap();
    let [
        Op::SessionCreated(session),
        Op::MessageAppended(record),
        Op::DispatchFinished { cancelled, .. },
    ] = &ops[..]
    else {
        panic!("three operations: {ops:?}");
    };
    assert_eq!((&*session.id, session.metadata.get()), ("s-1", r#"{"k":[1]}"#));
    assert_eq!(
        session.inserted_at,
        Timestamp::parse("2026-12-07T10:00:00.000001Z").unwrap()
    );
    assert_eq!(
        (record.message.seq, record.message.content.get()),
        (1, r#"{"text":"h\u00e9"}"#)
    );
    assert_eq!(
        (record.client_id.as_deref(), record.fingerprint, record.from_user),
        (None, 7, false)
    );
    assert!(!cancelled);
    // Written again, they are format 2 and read back the same.
    assert_eq!(described(&decode_entry(&encode_entry(&ops)).unwrap()), described(&ops));
}

#[test]
fn entries_written_in_format_1_are_still_read() {
    let ops = every_op();
    let format_1 = serde_json::to_vec(&serde_json::json!({"v": 1, "ops": &ops})).unwrap();
    // Compared as JSON: format 1 cannot hold times outside years 0–9999 (written as 1970).
    let as_json = |ops: &[Op]| serde_json::to_value(ops).unwrap();
    assert_eq!(as_json(&decode_entry(&format_1).unwrap()), as_json(&ops));
    let future = br#"{"v":3,"ops":[]}"#;
    assert!(matches!(decode_entry(future), Err(DecodeError::Version(3))));
}

#[test]
fn the_incremental_encoder_knows_its_size_and_refuses_an_operation_over_the_limit() {
    let ops = every_op();
    let mut encoder = EntryEncoder::default();
    assert!(encoder.is_empty());
    assert_eq!(encoder.len(), encode_entry(&[]).len(), "an empty entry's size");
    encoder.push(&ops[0]);
    encoder.clear();
    assert!(encoder.is_empty());
    assert_eq!(
        encoder.len(),
        encode_entry(&[]).len(),
        "cleared, the entry is empty again"
    );
    for op in &ops {
        let before = encoder.len();
        encoder.push(op);
        let added = encoder.len() - before;
        let mut alone = EntryEncoder::default();
        alone.push(op);
        assert_eq!(
            added,
            alone.len() - 2,
            "an operation adds the same bytes wherever it is"
        );
    }
    let len = encoder.len();
    let big = message("s-1", 2, None);
    let refused = encoder.try_push(&big, 10).expect_err("over the limit");
    assert!(refused > 10);
    assert_eq!(encoder.len(), len, "a refused operation leaves the entry as it was");
    let bytes = encoder.finish();
    assert_eq!(bytes.len(), len);
    assert_eq!(bytes, encode_entry(&ops));
    assert!(encoder.is_empty());
    assert_eq!(encoder.finish(), encode_entry(&[]));
    assert!(decode_entry(&encode_entry(&[])).unwrap().is_empty());
}

#[test]
fn a_batch_of_one_session_shares_one_session_id() {
    let bytes = encode_entry(&[message("s-9", 1, None), message("s-9", 2, None)]);
    let decoded = decode_entry(&bytes).unwrap();
    let [Op::MessageAppended(first), Op::MessageAppended(second)] = &decoded[..] else {
        panic!("two messages");
    };
    assert!(Arc::ptr_eq(&first.message.session_id, &second.message.session_id));
}

#[test]
fn user_text_cannot_write_a_run_of_zero_bytes() {
    // A torn WAL write shows as a whole sector of zeros; no entry may look like one.
    let nul_text = "\0".repeat(600);
    let op = Op::MessageAppended(MessageRecord {
        message: Message {
            id: nul_text.clone(),
            session_id: Arc::from(nul_text.as_str()),
            seq: 0,
            sender_id: nul_text.clone(),
            kind: nul_text.clone(),
            content: raw("{}"),
            metadata: raw("{}"),
            inserted_at: Timestamp(0),
        },
        client_id: Some(nul_text.clone()),
        fingerprint: 0,
        nonuser_through: 0,
        from_user: false,
    });
    let bytes = encode_entry(&[op.clone(), op]);
    let longest_zero_run = bytes.split(|b| *b != 0).map(<[u8]>::len).max().unwrap_or(0);
    assert!(longest_zero_run <= 16, "a run of {longest_zero_run} zero bytes");
    assert_ne!(bytes.last(), Some(&0), "an entry never ends in a zero byte");
    let decoded = decode_entry(&bytes).unwrap();
    let Op::MessageAppended(record) = &decoded[1] else {
        panic!("a message")
    };
    assert_eq!(record.message.kind, nul_text);
    assert_eq!(&*record.message.session_id, nul_text);
    assert_eq!(record.client_id.as_deref(), Some(nul_text.as_str()));
}

#[test]
fn damaged_entries_are_refused_with_a_reason_and_never_panic() {
    let bytes = encode_entry(&every_op());
    // Every truncation: an entry cut anywhere lacks its end byte (or, where a cut leaves a byte
    // that reads as one, an operation cut short).
    for len in 0..bytes.len() {
        let error = decode_entry(&bytes[..len]).expect_err("a cut entry").to_string();
        assert!(error.contains("not valid") || error.contains("empty"), "{error}");
    }
    // Every single-bit flip: decodes to something or is refused, never a panic.
    let mut refused = 0;
    for bit in 8..bytes.len() * 8 {
        let mut flipped = bytes.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        refused += usize::from(decode_entry(&flipped).is_err());
    }
    assert!(refused > 0);
    // Lengths that promise more than the entry holds are refused without allocating them.
    // (Tag 4 is `session_archived`, tag 5 `session_evicted`: each begins with a text length.)
    let entry_of = |tag: u8, varint: &[u8]| [&[binary::ENTRY_MARKER, tag], varint, &[binary::ENTRY_END]].concat();
    let nine_continued = [0xFF; 9];
    let huge = entry_of(4, &[&nine_continued[..], &[0x01]].concat());
    assert!(decode_entry(&huge).unwrap_err().to_string().contains("bytes wanted"));
    let overflow = entry_of(5, &[&nine_continued[..], &[0x7F]].concat());
    assert!(decode_entry(&overflow).unwrap_err().to_string().contains("overflows"));
}

#[test]
fn entries_of_other_kinds_are_told_apart() {
    assert!(matches!(decode_entry(&[]), Err(DecodeError::Empty)));
    // Consensus records start with their tag (0–5): never mistaken for an entry.
    for tag in 0..=5u8 {
        assert!(matches!(decode_entry(&[tag, 1, 2]), Err(DecodeError::Format(t)) if t == tag));
    }
    let unknown_op = [binary::ENTRY_MARKER, 0x42, binary::ENTRY_END];
    assert!(
        decode_entry(&unknown_op)
            .unwrap_err()
            .to_string()
            .contains("unknown operation tag")
    );
}

#[test]
fn the_smallest_message_takes_at_least_the_bound() {
    // Every text empty, one-byte JSON values, every number zero: the fewest bytes a message
    // can take, which seq skips after lost entries are computed from.
    let smallest = Op::MessageAppended(MessageRecord {
        message: Message {
            id: String::new(),
            session_id: Arc::from(""),
            seq: 0,
            sender_id: String::new(),
            kind: String::new(),
            content: raw("1"),
            metadata: raw("1"),
            inserted_at: Timestamp(0),
        },
        client_id: None,
        fingerprint: 0,
        nonuser_through: 0,
        from_user: false,
    });
    let added = encode_entry(std::slice::from_ref(&smallest)).len() - encode_entry(&[]).len();
    assert_eq!(added as u64, MIN_MESSAGE_OP_BYTES);
    let format_1 = serde_json::to_vec(&smallest).unwrap();
    assert!(format_1.len() as u64 > MIN_MESSAGE_OP_BYTES);
}
