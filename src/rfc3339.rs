//! The one timestamp shape FleetLM writes — `YYYY-MM-DDTHH:MM:SS.ffffffZ`, microseconds, UTC —
//! encoded and decoded without a general date library.
//!
//! Every stored message carries a timestamp that is formatted when it is published and parsed
//! again when its log entry is archived, so this sits on the write path; a general formatter
//! showed up in profiles. Anything outside years 0000–9999 or not in exactly this shape returns
//! `None`, and the caller falls back to the `time` crate (which also accepts offsets, other
//! fraction lengths and leap seconds).

const SECONDS_PER_DAY: i64 = 86_400;
const MICROS_PER_SECOND: i64 = 1_000_000;
/// Length of `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
pub const FORMATTED_LEN: usize = 27;

/// Formats microseconds since the epoch, or `None` outside years 0000–9999.
pub fn format_micros(micros: i64) -> Option<[u8; FORMATTED_LEN]> {
    let seconds = micros.div_euclid(MICROS_PER_SECOND);
    let fraction = micros.rem_euclid(MICROS_PER_SECOND);
    let (year, month, day) = civil_from_days(seconds.div_euclid(SECONDS_PER_DAY));
    if !(0..=9999).contains(&year) {
        return None;
    }
    let second_of_day = seconds.rem_euclid(SECONDS_PER_DAY);
    let mut out = *b"0000-00-00T00:00:00.000000Z";
    put_digits(&mut out[0..4], year as u64);
    put_digits(&mut out[5..7], u64::from(month));
    put_digits(&mut out[8..10], u64::from(day));
    put_digits(&mut out[11..13], (second_of_day / 3600) as u64);
    put_digits(&mut out[14..16], (second_of_day / 60 % 60) as u64);
    put_digits(&mut out[17..19], (second_of_day % 60) as u64);
    put_digits(&mut out[20..26], fraction as u64);
    Some(out)
}

/// Parses exactly the shape `format_micros` writes; `None` for anything else.
pub fn parse_micros(text: &str) -> Option<i64> {
    let bytes = text.as_bytes();
    if bytes.len() != FORMATTED_LEN {
        return None;
    }
    let separators = [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (26, b'Z'),
    ];
    if separators.iter().any(|&(at, byte)| bytes[at] != byte) {
        return None;
    }
    let year = read_digits(&bytes[0..4])? as i64;
    let month = read_digits(&bytes[5..7])? as u32;
    let day = read_digits(&bytes[8..10])? as u32;
    let hour = read_digits(&bytes[11..13])? as i64;
    let minute = read_digits(&bytes[14..16])? as i64;
    let second = read_digits(&bytes[17..19])? as i64;
    let fraction = read_digits(&bytes[20..26])? as i64;
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let seconds = days * SECONDS_PER_DAY + hour * 3600 + minute * 60 + second;
    Some(seconds * MICROS_PER_SECOND + fraction)
}

fn put_digits(out: &mut [u8], mut value: u64) {
    for slot in out.iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

fn read_digits(bytes: &[u8]) -> Option<u64> {
    bytes.iter().try_fold(0u64, |value, &byte| {
        byte.is_ascii_digit().then(|| value * 10 + u64::from(byte - b'0'))
    })
}

fn is_leap_year(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if is_leap_year(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = i64::from((month + 9) % 12);
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The date of a day count since 1970-01-01 (the inverse of `days_from_civil`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const REFERENCE_FORMAT: &[time::format_description::FormatItem<'static>] =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");
    /// 0000-01-01T00:00:00Z and 9999-12-31T23:59:59.999999Z in microseconds.
    const FIRST: i64 = -62_167_219_200_000_000;
    const LAST: i64 = 253_402_300_799_999_999;

    fn reference(micros: i64) -> String {
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
            .expect("in range")
            .format(REFERENCE_FORMAT)
            .expect("formats")
    }

    #[test]
    fn edges_of_the_range_and_leap_days() {
        for micros in [FIRST, LAST, 0, -1, 951_782_400_000_000, 1_795_532_645_123_456] {
            let text = format_micros(micros).expect("in range");
            let text = std::str::from_utf8(&text).expect("ascii");
            assert_eq!(text, reference(micros));
            assert_eq!(parse_micros(text), Some(micros));
        }
        assert_eq!(format_micros(FIRST - 1), None);
        assert_eq!(format_micros(LAST + 1), None);
        assert_eq!(parse_micros("2000-02-29T00:00:00.000000Z"), Some(951_782_400_000_000));
    }

    #[test]
    fn anything_but_the_exact_shape_is_left_to_the_fallback() {
        for text in [
            "2026-11-24T15:04:05.123456+00:00",
            "2026-11-24T15:04:05Z",
            "2026-11-24T15:04:05.1234567Z",
            "2026-13-24T15:04:05.123456Z",
            "2026-02-29T15:04:05.123456Z",
            "2026-11-24T24:04:05.123456Z",
            "2026-11-24T23:59:60.000000Z",
            "2026-11-24 15:04:05.123456Z",
            "2026-1a-24T15:04:05.123456Z",
            "+026-11-24T15:04:05.123456Z",
        ] {
            assert_eq!(parse_micros(text), None, "{text}");
        }
    }

    proptest! {
        #[test]
        fn matches_the_time_crate_and_round_trips(micros in FIRST..=LAST) {
            let text = format_micros(micros).expect("in range");
            let text = std::str::from_utf8(&text).expect("ascii");
            prop_assert_eq!(text, reference(micros));
            prop_assert_eq!(parse_micros(text), Some(micros));
        }
    }
}
