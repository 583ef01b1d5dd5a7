//! A serde `with` module that writes a `u64` as a decimal string: JSON numbers are doubles to
//! most readers, so a JSON number cannot carry every `u64` (system identifiers, row version
//! bases). Use it as `#[serde(with = "scoresync_event::u64_as_string")]`.

use serde::{Deserialize, Deserializer, Serializer};

/// Writes `v` as a decimal string.
pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// Reads a decimal string into a `u64`.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Holder {
        #[serde(with = "super")]
        n: u64,
    }

    #[test]
    fn every_u64_round_trips_as_a_string() {
        let json = serde_json::to_string(&Holder { n: u64::MAX }).expect("serialises");
        assert_eq!(json, r#"{"n":"18446744073709551615"}"#);
        assert_eq!(serde_json::from_str::<Holder>(&json).expect("parses"), Holder { n: u64::MAX });
        assert!(serde_json::from_str::<Holder>(r#"{"n":7}"#).is_err(), "a number is refused");
        assert!(serde_json::from_str::<Holder>(r#"{"n":"-1"}"#).is_err());
    }
}
