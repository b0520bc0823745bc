//! History pages are bounded in bytes as well as in count: one `limit=1000` read of large
//! messages must not allocate hundreds of MB. A page ends once its messages weigh
//! [`MAX_PAGE_BYTES`] ([`crate::archive::message_bytes`]); the message that crosses the bound
//! is still in it, so a page always holds at least one message (each is at most
//! `max_message_bytes`) and paging always moves on.

use std::sync::Arc;

use crate::archive::message_bytes;
use crate::model::MessageRecord;

/// What a history page may weigh (a page stops after the message that reaches it).
pub const MAX_PAGE_BYTES: usize = 4 * 1024 * 1024;

/// A page being filled from the archive, the WAL and the hot tail, in seq order.
pub struct PageBudget {
    budget: usize,
    used: usize,
    /// Messages of the plan were left out: the page has more after it.
    cut: bool,
}

impl PageBudget {
    pub fn new(budget: usize) -> PageBudget {
        PageBudget {
            budget,
            used: 0,
            cut: false,
        }
    }

    /// Bytes left (what the archive may return at most, but for the message that crosses it).
    pub fn left(&self) -> usize {
        self.budget.saturating_sub(self.used).max(1)
    }

    pub fn is_full(&self) -> bool {
        self.used >= self.budget
    }

    /// Whether the page left out messages of the plan (`has_more`).
    pub fn was_cut(&self) -> bool {
        self.cut
    }

    /// Some of the plan's messages could not be read into this page.
    pub fn cut_short(&mut self) {
        self.cut = true;
    }

    /// The archive's answer for `from..=to`, already bounded by [`Self::left`]: all of it;
    /// the page is cut if the answer stopped at the bound before `to`.
    pub fn take_archived(&mut self, archived: &[Arc<MessageRecord>], to: u64, page: &mut Vec<Arc<MessageRecord>>) {
        self.used += archived.iter().map(|record| message_bytes(record)).sum::<usize>();
        page.extend(archived.iter().cloned());
        if self.is_full() && archived.last().is_some_and(|last| last.message.seq < to) {
            self.cut = true;
        }
    }

    /// Messages in seq order, while the budget lasts (the first of a page always).
    pub fn take(&mut self, records: impl IntoIterator<Item = Arc<MessageRecord>>, page: &mut Vec<Arc<MessageRecord>>) {
        for record in records {
            if self.is_full() && !page.is_empty() {
                self.cut = true;
                return;
            }
            self.used += message_bytes(&record);
            page.push(record);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Message, Timestamp};
    use serde_json::value::RawValue;

    fn record(seq: u64, content_bytes: usize) -> Arc<MessageRecord> {
        let text = "x".repeat(content_bytes.saturating_sub(2));
        Arc::new(MessageRecord {
            message: Message {
                id: format!("m{seq}"),
                session_id: Arc::from("s"),
                seq,
                sender_id: "u".into(),
                kind: "text".into(),
                content: RawValue::from_string(format!("\"{text}\"")).unwrap(),
                metadata: RawValue::from_string("{}".into()).unwrap(),
                inserted_at: Timestamp(0),
            },
            client_id: None,
            fingerprint: 0,
            nonuser_through: 0,
            from_user: true,
        })
    }

    #[test]
    fn a_page_stops_after_the_message_that_reaches_the_budget() {
        let mut budget = PageBudget::new(10_000);
        let mut page = Vec::new();
        budget.take((1..=10).map(|seq| record(seq, 3000)), &mut page);
        // 3258 bytes each: the fourth reaches 10 000.
        assert_eq!(page.len(), 4);
        assert!(budget.was_cut() && budget.is_full());
    }

    #[test]
    fn the_first_message_is_always_taken_even_over_the_budget() {
        let mut budget = PageBudget::new(100);
        let mut page = Vec::new();
        budget.take([record(1, 5000), record(2, 10)], &mut page);
        assert_eq!(page.len(), 1);
        assert!(budget.was_cut());
        let mut whole = PageBudget::new(100_000);
        let mut page = Vec::new();
        whole.take([record(1, 5000), record(2, 10)], &mut page);
        assert_eq!(page.len(), 2);
        assert!(!whole.was_cut(), "nothing left out");
    }

    #[test]
    fn an_archive_answer_cut_at_the_bound_cuts_the_page() {
        let mut budget = PageBudget::new(1000);
        let mut page = Vec::new();
        budget.take_archived(&[record(1, 600), record(2, 600)], 5, &mut page);
        assert!(budget.was_cut(), "seqs 3..=5 were left out");
        let mut exact = PageBudget::new(1000);
        let mut page = Vec::new();
        exact.take_archived(&[record(1, 600), record(2, 600)], 2, &mut page);
        assert!(!exact.was_cut(), "the range ended there");
        assert!(exact.is_full());
        exact.take([record(3, 10)], &mut page);
        assert!(exact.was_cut(), "full: later parts wait for the next page");
    }
}
