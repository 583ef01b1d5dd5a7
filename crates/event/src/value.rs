//! Constructors and readers for contract values, so callers never spell out the oneof.

use crate::v1::{Null, UnchangedToast, Value, value::Kind};

impl Value {
    /// SQL NULL.
    pub fn null() -> Value {
        Value { kind: Some(Kind::Null(Null {})) }
    }

    /// An unchanged TOAST value: unknown to this event, keep the stored one.
    pub fn unchanged_toast() -> Value {
        Value { kind: Some(Kind::UnchangedToast(UnchangedToast {})) }
    }

    /// A text value.
    pub fn text(s: impl Into<String>) -> Value {
        Value { kind: Some(Kind::Text(s.into())) }
    }

    /// An integer value.
    pub fn int(i: i64) -> Value {
        Value { kind: Some(Kind::Int(i)) }
    }

    /// A floating-point value.
    pub fn float(f: f64) -> Value {
        Value { kind: Some(Kind::Float(f)) }
    }

    /// A boolean value.
    pub fn boolean(b: bool) -> Value {
        Value { kind: Some(Kind::Boolean(b)) }
    }

    /// A timestamp, microseconds since the Unix epoch (UTC).
    pub fn timestamp_us(us: i64) -> Value {
        Value { kind: Some(Kind::TimestampUs(us)) }
    }

    /// True for SQL NULL (an absent kind counts as NULL too).
    pub fn is_null(&self) -> bool {
        matches!(self.kind, None | Some(Kind::Null(_)))
    }

    /// True for an unchanged TOAST marker.
    pub fn is_unchanged_toast(&self) -> bool {
        matches!(self.kind, Some(Kind::UnchangedToast(_)))
    }

    /// The text, if this is a text value.
    pub fn as_text(&self) -> Option<&str> {
        match &self.kind {
            Some(Kind::Text(s)) => Some(s),
            _ => None,
        }
    }

    /// The integer, if this is an integer value.
    pub fn as_int(&self) -> Option<i64> {
        match self.kind {
            Some(Kind::Int(i)) => Some(i),
            _ => None,
        }
    }

    /// The float, if this is a float value.
    pub fn as_float(&self) -> Option<f64> {
        match self.kind {
            Some(Kind::Float(f)) => Some(f),
            _ => None,
        }
    }

    /// The boolean, if this is a boolean value.
    pub fn as_bool(&self) -> Option<bool> {
        match self.kind {
            Some(Kind::Boolean(b)) => Some(b),
            _ => None,
        }
    }

    /// The timestamp in microseconds, if this is a timestamp value.
    pub fn as_timestamp_us(&self) -> Option<i64> {
        match self.kind {
            Some(Kind::TimestampUs(t)) => Some(t),
            _ => None,
        }
    }

    /// The value as plain text: a text value as it is, an integer or a timestamp (its
    /// microseconds) in decimal, a float and a boolean as Rust prints them (`1.5`, `true`).
    /// `None` for SQL NULL, an unchanged TOAST marker and an absent kind, which have no text;
    /// each caller decides how to show those. Part of the contract: change-topic message keys
    /// are made of it ([`crate::layout`]), so changing a form moves rows to new keys.
    pub fn to_text(&self) -> Option<String> {
        match &self.kind {
            Some(Kind::Text(s)) => Some(s.clone()),
            Some(Kind::Int(i) | Kind::TimestampUs(i)) => Some(i.to_string()),
            Some(Kind::Float(f)) => Some(f.to_string()),
            Some(Kind::Boolean(b)) => Some(b.to_string()),
            Some(Kind::Null(_) | Kind::UnchangedToast(_)) | None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn to_text_gives_every_value_with_a_text_form_and_nothing_for_the_rest() {
        assert_eq!(Value::text("a b").to_text().as_deref(), Some("a b"));
        assert_eq!(Value::int(-42).to_text().as_deref(), Some("-42"));
        assert_eq!(
            Value::timestamp_us(1_700_000_000_000_000).to_text().as_deref(),
            Some("1700000000000000")
        );
        assert_eq!(Value::float(1.5).to_text().as_deref(), Some("1.5"));
        assert_eq!(Value::boolean(true).to_text().as_deref(), Some("true"));
        assert_eq!(Value::null().to_text(), None);
        assert_eq!(Value::unchanged_toast().to_text(), None);
        assert_eq!(Value { kind: None }.to_text(), None);
    }
}
