//! Conditional and partial file downloads (RFC 9110 §13 and §14): `If-None-Match` against the
//! file's entity tag, and one `Range` of bytes, honoured only while `If-Range` (if sent) still
//! names the same file.

use axum::http::{HeaderMap, header};

/// What a download answers with, from its request headers and the file's size and entity tag.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// `304 Not Modified`: the client holds this very file.
    NotModified,
    /// `200`: the whole file.
    Whole,
    /// `206`: bytes `start..end` (end exclusive, never empty).
    Part { start: u64, end: u64 },
    /// `416`: no byte of the range is in the file.
    Unsatisfiable,
}

/// `etag` is the quoted entity tag the file is served with.
pub fn answer(headers: &HeaderMap, size: u64, etag: &str) -> Answer {
    if let Some(tags) = text(headers, header::IF_NONE_MATCH) {
        // A weak comparison (W/ prefixes ignored), as the RFC asks for this header.
        let matches = tags
            .split(',')
            .map(|tag| tag.trim().trim_start_matches("W/"))
            .any(|tag| tag == "*" || tag == etag);
        return if matches { Answer::NotModified } else { Answer::Whole };
    }
    let Some(range) = text(headers, header::RANGE) else {
        return Answer::Whole;
    };
    // A range of a file that changed since the client's copy would be mixed with other bytes:
    // then the whole file. (An `If-Range` date is never taken: a file has no validator but its
    // tag.)
    if text(headers, header::IF_RANGE).is_some_and(|tag| tag.trim() != etag) {
        return Answer::Whole;
    }
    match parse(range, size) {
        Some(Parsed::Range(start, end)) => Answer::Part { start, end },
        Some(Parsed::Unsatisfiable) => Answer::Unsatisfiable,
        // Not understood, or several ranges: a server may always answer with the whole file.
        None => Answer::Whole,
    }
}

enum Parsed {
    Range(u64, u64),
    Unsatisfiable,
}

/// `bytes=a-b`, `bytes=a-` or `bytes=-n` (one range only).
fn parse(range: &str, size: u64) -> Option<Parsed> {
    let spec = range.trim().strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (first, last) = spec.split_once('-')?;
    let number = |s: &str| -> Option<u64> {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    if first.trim().is_empty() {
        // The last n bytes.
        let suffix = number(last)?;
        if suffix == 0 || size == 0 {
            return Some(Parsed::Unsatisfiable);
        }
        return Some(Parsed::Range(size.saturating_sub(suffix), size));
    }
    let start = number(first)?;
    let end = match last.trim() {
        "" => size,
        last => {
            let last = number(last)?;
            if last < start {
                return None;
            }
            last.saturating_add(1).min(size)
        }
    };
    if start >= size {
        return Some(Parsed::Unsatisfiable);
    }
    Some(Parsed::Range(start, end))
}

fn text(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name)?.to_str().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(name.clone(), value.parse().unwrap());
        }
        headers
    }

    const TAG: &str = "\"abc\"";

    #[test]
    fn ranges_are_read_as_the_rfc_says() {
        let part = |range: &str| answer(&with(&[(header::RANGE, range)]), 1000, TAG);
        assert_eq!(part("bytes=0-99"), Answer::Part { start: 0, end: 100 });
        assert_eq!(part("bytes=900-"), Answer::Part { start: 900, end: 1000 });
        assert_eq!(part("bytes=-10"), Answer::Part { start: 990, end: 1000 });
        assert_eq!(part("bytes=-5000"), Answer::Part { start: 0, end: 1000 });
        assert_eq!(part("bytes=990-5000"), Answer::Part { start: 990, end: 1000 });
        assert_eq!(part("bytes=999-999"), Answer::Part { start: 999, end: 1000 });
        assert_eq!(part("bytes=1000-"), Answer::Unsatisfiable);
        assert_eq!(part("bytes=-0"), Answer::Unsatisfiable);
        // Not understood or several ranges: the whole file.
        for range in [
            "bytes=5-1",
            "bytes=0-1,5-9",
            "items=0-1",
            "bytes=a-b",
            "bytes=-",
            "bytes=+1-2",
        ] {
            assert_eq!(part(range), Answer::Whole, "{range}");
        }
        assert_eq!(answer(&HeaderMap::new(), 1000, TAG), Answer::Whole);
    }

    #[test]
    fn a_held_copy_is_not_sent_again_and_a_changed_one_gets_no_partial_range() {
        let held = |tags: &str| answer(&with(&[(header::IF_NONE_MATCH, tags)]), 10, TAG);
        assert_eq!(held(TAG), Answer::NotModified);
        assert_eq!(held("W/\"abc\""), Answer::NotModified);
        assert_eq!(held("\"x\", \"abc\""), Answer::NotModified);
        assert_eq!(held("*"), Answer::NotModified);
        assert_eq!(held("\"other\""), Answer::Whole);
        let if_range = |tag: &str| answer(&with(&[(header::RANGE, "bytes=0-1"), (header::IF_RANGE, tag)]), 10, TAG);
        assert_eq!(if_range(TAG), Answer::Part { start: 0, end: 2 });
        assert_eq!(if_range("\"other\""), Answer::Whole);
        assert_eq!(if_range("Tue, 15 Nov 1994 08:12:31 GMT"), Answer::Whole);
    }
}
