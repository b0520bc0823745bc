//! Reads of archived history that many clients ask for at once share one archive query.
//!
//! A catch-up storm — hundreds of clients rejoining one session from `last_seq: 0` — asks the
//! archive for the same range hundreds of times; with the embedded SQLite archive those queries
//! queue on one connection. Archived messages never change (a seq, once archived, always names
//! the same message), so every concurrent request for a range can take the first request's
//! answer. Nothing is cached past the query: the entry leaves the map when the query ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};

use crate::archive::Archive;
use crate::model::MessageRecord;

type Messages = Arc<Vec<Arc<MessageRecord>>>;
type SharedQuery = Shared<BoxFuture<'static, Result<Messages, String>>>;
/// `(session_id, from_seq, to_seq, max_bytes)`
type RangeKey = (Arc<str>, u64, u64, usize);

#[derive(Default)]
pub struct SharedArchiveReads {
    in_flight: Mutex<HashMap<RangeKey, SharedQuery>>,
}

impl SharedArchiveReads {
    /// Archived messages `from..=to` of the session, bounded in bytes as
    /// [`Archive::read_messages`] says, joining a query for the same range that is already running.
    pub async fn read(
        &self,
        archive: &Archive,
        session_id: &str,
        from: u64,
        to: u64,
        max_bytes: usize,
    ) -> Result<Messages, String> {
        let key: RangeKey = (Arc::from(session_id), from, to, max_bytes);
        let query = {
            let mut in_flight = self.in_flight.lock().expect("shared reads lock");
            in_flight
                .entry(key.clone())
                .or_insert_with(|| {
                    let archive = archive.clone();
                    let session_id = key.0.clone();
                    async move {
                        let records = archive
                            .read_messages(&session_id, from, to, max_bytes)
                            .await
                            .map_err(|e| e.to_string())?;
                        Ok(Arc::new(records.into_iter().map(Arc::new).collect()))
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        // Removed when this request finishes or is cancelled (a client gone mid-join), so no
        // entry outlives its readers; a reader still waiting keeps its own handle to the query.
        let _leave = LeaveOnDrop {
            reads: self,
            key,
            query: query.clone(),
        };
        query.await
    }
}

struct LeaveOnDrop<'a> {
    reads: &'a SharedArchiveReads,
    key: RangeKey,
    query: SharedQuery,
}

impl Drop for LeaveOnDrop<'_> {
    fn drop(&mut self) {
        let mut in_flight = self.reads.in_flight.lock().expect("shared reads lock");
        // Only the query this request joined leaves the map (a newer one may have replaced it).
        if in_flight
            .get(&self.key)
            .is_some_and(|current| current.ptr_eq(&self.query))
        {
            in_flight.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::FlushRows;
    use crate::model::{Message, SessionRecord, Timestamp};
    use serde_json::value::RawValue;

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_string()).expect("valid json")
    }

    fn message(seq: u64) -> MessageRecord {
        MessageRecord {
            message: Message {
                id: format!("m{seq}"),
                session_id: Arc::from("s1"),
                seq,
                sender_id: "u1".into(),
                kind: "text".into(),
                content: raw(&format!(r#"{{"text":"message {seq}"}}"#)),
                metadata: raw("{}"),
                inserted_at: Timestamp(1_700_000_000_000_000 + seq as i64),
            },
            client_id: None,
            fingerprint: seq,
            nonuser_through: 0,
            from_user: true,
        }
    }

    /// Many concurrent readers of one range all get the archive's answer, and nothing is kept
    /// once they are done (a later read queries the archive again).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_readers_of_a_range_get_the_same_messages() {
        let dir = tempfile::tempdir().expect("tempdir");
        let archive = Archive::open_sqlite(&dir.path().join("archive.sqlite3")).expect("open");
        archive.migrate().await.expect("migrate");
        let rows = FlushRows {
            new_sessions: vec![SessionRecord {
                id: Arc::from("s1"),
                user_id: "u1".into(),
                agent_id: "a1".into(),
                metadata: raw("{}"),
                inserted_at: Timestamp(1_700_000_000_000_000),
            }],
            messages: (1..=50).map(message).collect(),
            ..FlushRows::default()
        };
        archive.flush(Arc::new(rows), vec![(0, 1)]).await.expect("flush");

        let reads = Arc::new(SharedArchiveReads::default());
        let readers: Vec<_> = (0..64)
            .map(|_| {
                let (reads, archive) = (reads.clone(), archive.clone());
                tokio::spawn(async move { reads.read(&archive, "s1", 3, 40, usize::MAX).await })
            })
            .collect();
        for reader in readers {
            let messages = reader.await.expect("join").expect("read");
            let seqs: Vec<u64> = messages.iter().map(|m| m.message.seq).collect();
            assert_eq!(seqs, (3..=40).collect::<Vec<_>>());
            assert_eq!(messages[0].message.content.get(), r#"{"text":"message 3"}"#);
        }
        assert!(
            reads.in_flight.lock().expect("lock").is_empty(),
            "nothing kept after the reads"
        );

        // A reader cancelled after its first poll leaves nothing behind either (on a fast
        // machine the query may already have answered by then; that must leave nothing too).
        tokio::select! {
            biased;
            _ = reads.read(&archive, "s1", 1, 2, usize::MAX) => {}
            () = std::future::ready(()) => {}
        }
        assert!(
            reads.in_flight.lock().expect("lock").is_empty(),
            "nothing kept after a cancel"
        );

        let other = reads.read(&archive, "s1", 45, 60, usize::MAX).await.expect("read");
        assert_eq!(
            other.iter().map(|m| m.message.seq).collect::<Vec<_>>(),
            vec![45, 46, 47, 48, 49, 50]
        );
    }
}
