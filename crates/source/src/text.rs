//! PostgreSQL text-format values to typed contract values.
//!
//! The walsender renders column values with the type's output function under the session's
//! settings; scoresync pins `DateStyle=ISO` and `TimeZone=UTC` on both its replication and its
//! snapshot sessions ([`SESSION_OPTIONS`]), so one parser serves both. Mapping by type OID:
//!
//! | PostgreSQL                    | contract value                                  |
//! |-------------------------------|-------------------------------------------------|
//! | boolean                       | `boolean`                                       |
//! | smallint, integer, bigint     | `int`                                           |
//! | real, double precision        | `float` (NaN and ±Infinity included)            |
//! | timestamptz, timestamp        | `timestamp_us`, microseconds since 1970 UTC; `infinity` and `-infinity` map to `i64::MAX` and `i64::MIN` |
//! | anything else (text, numeric, uuid, json, date, ...) | `text`, PostgreSQL's own text form |
//!
//! A value that does not parse as its declared type is an error naming the type and the text
//! (never a silent NULL): it would mean the session settings are not what scoresync pinned.

use scoresync_event::Value;

/// Startup options of every scoresync session: ISO dates, UTC, shortest exact floats.
pub const SESSION_OPTIONS: &str = "-c datestyle=ISO -c timezone=UTC -c extra_float_digits=1";

/// Type OIDs scoresync maps to non-text values.
pub mod oid {
    /// boolean
    pub const BOOL: u32 = 16;
    /// bigint
    pub const INT8: u32 = 20;
    /// smallint
    pub const INT2: u32 = 21;
    /// integer
    pub const INT4: u32 = 23;
    /// text
    pub const TEXT: u32 = 25;
    /// real
    pub const FLOAT4: u32 = 700;
    /// double precision
    pub const FLOAT8: u32 = 701;
    /// timestamp without time zone
    pub const TIMESTAMP: u32 = 1114;
    /// timestamp with time zone
    pub const TIMESTAMPTZ: u32 = 1184;
}

/// A text value that does not parse as its column type.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("value {text:?} is not a valid {type_name}")]
pub struct ValueError {
    /// The type it should have been.
    pub type_name: &'static str,
    /// The text (truncated to 64 characters).
    pub text: String,
}

fn error(type_name: &'static str, text: &str) -> ValueError {
    ValueError { type_name, text: text.chars().take(64).collect() }
}

/// Maps the text form of a value of type `type_oid` to a contract value.
pub fn typed_value(type_oid: u32, text: &str) -> Result<Value, ValueError> {
    match type_oid {
        // `t`/`f` from the output function (the stream), `true`/`false` from a `::text` cast.
        oid::BOOL => match text {
            "t" | "true" => Ok(Value::boolean(true)),
            "f" | "false" => Ok(Value::boolean(false)),
            _ => Err(error("boolean", text)),
        },
        oid::INT2 | oid::INT4 | oid::INT8 => {
            text.parse().map(Value::int).map_err(|_| error("integer", text))
        }
        oid::FLOAT4 | oid::FLOAT8 => {
            parse_float(text).map(Value::float).ok_or_else(|| error("float", text))
        }
        oid::TIMESTAMPTZ | oid::TIMESTAMP => parse_timestamp_us(text)
            .map(Value::timestamp_us)
            .ok_or_else(|| error("timestamp", text)),
        _ => Ok(Value::text(text)),
    }
}

fn parse_float(text: &str) -> Option<f64> {
    match text {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ => text.parse().ok(),
    }
}

/// Parses an ISO-style PostgreSQL timestamp (`2024-03-05 12:34:56.789012+00`, optional fraction,
/// optional `+HH[:MM[:SS]]` offset, optional ` BC`, years past 9999) to Unix microseconds.
pub fn parse_timestamp_us(text: &str) -> Option<i64> {
    match text {
        "infinity" => return Some(i64::MAX),
        "-infinity" => return Some(i64::MIN),
        _ => {}
    }
    let (body, bc) = match text.strip_suffix(" BC") {
        Some(body) => (body, true),
        None => (text, false),
    };
    let (date, time) = body.split_once(' ')?;
    let mut date_parts = date.splitn(3, '-');
    let year: i64 = date_parts.next()?.parse().ok()?;
    let month: u32 = date_parts.next()?.parse().ok()?;
    let day: u32 = date_parts.next()?.parse().ok()?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || year < 1 {
        return None;
    }
    let year = if bc { 1 - year } else { year };

    // Split the clock from the offset: the offset starts at the first '+' or '-' in the time.
    let (clock, offset_secs) = match time.find(['+', '-']) {
        Some(at) => (&time[..at], parse_offset(&time[at..])?),
        None => (time, 0),
    };
    let (hms, fraction) = match clock.split_once('.') {
        Some((hms, f)) => (hms, f),
        None => (clock, ""),
    };
    let mut hms_parts = hms.splitn(3, ':');
    let hour: i64 = hms_parts.next()?.parse().ok()?;
    let minute: i64 = hms_parts.next()?.parse().ok()?;
    let second: i64 = hms_parts.next()?.parse().ok()?;
    if hour > 24 || minute > 59 || second > 60 || fraction.len() > 6 {
        return None;
    }
    if !fraction.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let micros: i64 = if fraction.is_empty() {
        0
    } else {
        fraction.parse::<i64>().ok()? * 10_i64.pow(6 - fraction.len() as u32)
    };
    let days = days_from_civil(year, month, day);
    let seconds = days
        .checked_mul(86_400)?
        .checked_add(hour * 3_600 + minute * 60 + second)?
        .checked_sub(offset_secs)?;
    seconds.checked_mul(1_000_000)?.checked_add(micros)
}

/// `+HH`, `+HH:MM` or `+HH:MM:SS` (or `-`) to seconds east of UTC.
fn parse_offset(text: &str) -> Option<i64> {
    let sign = match text.as_bytes().first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let mut secs = 0;
    for (i, part) in text[1..].split(':').enumerate() {
        if i > 2 || part.len() != 2 {
            return None;
        }
        let n: i64 = part.parse().ok()?;
        secs += n * [3_600, 60, 1][i];
    }
    Some(sign * secs)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (astronomical years: 0 = 1 BC).
/// Howard Hinnant's `days_from_civil`.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_match_known_instants() {
        assert_eq!(parse_timestamp_us("1970-01-01 00:00:00+00"), Some(0));
        assert_eq!(parse_timestamp_us("2000-01-01 00:00:00+00"), Some(946_684_800_000_000));
        assert_eq!(
            parse_timestamp_us("2024-03-05 12:34:56.789012+00"),
            Some(1_709_642_096_789_012)
        );
        assert_eq!(parse_timestamp_us("2024-03-05 12:34:56.5+00"), Some(1_709_642_096_500_000));
        assert_eq!(parse_timestamp_us("2024-03-05 14:34:56+02"), Some(1_709_642_096_000_000));
        assert_eq!(parse_timestamp_us("2024-03-05 07:04:56-05:30"), Some(1_709_642_096_000_000));
        assert_eq!(parse_timestamp_us("1969-12-31 23:59:59+00"), Some(-1_000_000));
        assert_eq!(parse_timestamp_us("1960-06-15 08:00:00+00"), Some(-301_248_000_000_000));
        // Without time zone (timestamp): read as UTC.
        assert_eq!(parse_timestamp_us("1970-01-02 00:00:00"), Some(86_400_000_000));
        assert_eq!(parse_timestamp_us("infinity"), Some(i64::MAX));
        assert_eq!(parse_timestamp_us("-infinity"), Some(i64::MIN));
        // 1 BC is astronomical year 0; 0001-01-01 is day -719162.
        assert_eq!(parse_timestamp_us("0001-01-01 00:00:00+00"), Some(-719_162 * 86_400_000_000));
        assert_eq!(
            parse_timestamp_us("0001-12-31 00:00:00+00 BC"),
            Some((-719_162 - 1) * 86_400_000_000)
        );
        assert_eq!(parse_timestamp_us("10000-01-01 00:00:00+00"), Some(253_402_300_800_000_000));
    }

    #[test]
    fn malformed_timestamps_are_rejected() {
        for bad in [
            "",
            "2024-03-05",
            "2024-13-05 00:00:00+00",
            "2024-03-05 00:00+00",
            "2024-03-05 00:00:00.1234567+00",
            "2024-03-05 00:00:00+0",
            "2024-03-05 00:00:00.x+00",
            "2024-03-05T00:00:00+00",
        ] {
            assert_eq!(parse_timestamp_us(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn typed_values_follow_the_column_type() {
        assert_eq!(typed_value(oid::BOOL, "t"), Ok(Value::boolean(true)));
        assert_eq!(typed_value(oid::INT4, "-42"), Ok(Value::int(-42)));
        assert_eq!(typed_value(oid::FLOAT8, "1.5"), Ok(Value::float(1.5)));
        assert!(typed_value(oid::FLOAT8, "NaN").expect("nan").as_float().is_some_and(f64::is_nan));
        assert_eq!(typed_value(oid::TEXT, "hello"), Ok(Value::text("hello")));
        assert_eq!(typed_value(1700, "12.50"), Ok(Value::text("12.50")));
        assert_eq!(
            typed_value(oid::TIMESTAMPTZ, "1970-01-01 00:00:01+00"),
            Ok(Value::timestamp_us(1_000_000))
        );
        assert_eq!(typed_value(oid::BOOL, "false"), Ok(Value::boolean(false)));
        assert!(typed_value(oid::BOOL, "yes").is_err());
        assert!(typed_value(oid::INT2, "1.0").is_err());
        let err = typed_value(oid::TIMESTAMPTZ, "garbage").expect_err("invalid");
        assert!(err.to_string().contains("timestamp"));
    }
}
