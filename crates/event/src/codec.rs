//! Encoding and decoding of change events on the bus.
//!
//! Decoding is strict about what it cannot interpret: an unknown contract version or an
//! unspecified operation is an error (the sink dead-letters it), never a guess. Contract-1 events
//! (no `version` field) are still read: decoding stamps their legacy version, so nothing after
//! the decoder needs to know contract 1 existed.

use prost::Message;

use crate::v1::{ChangeEvent, Operation};
use crate::version::RowVersion;

/// The contract version this build writes (it also reads [`LEGACY_CONTRACT_VERSION`]).
pub const CONTRACT_VERSION: u32 = 2;
/// The contract before events carried their own `version`.
pub const LEGACY_CONTRACT_VERSION: u32 = 1;

/// Why bytes from the bus are not a usable change event.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not a protobuf ChangeEvent.
    #[error("not a protobuf change event")]
    Protobuf(#[source] prost::DecodeError),
    /// The event was written for a contract version this build does not know.
    #[error(
        "change event has contract version {0}, this build reads versions \
         {LEGACY_CONTRACT_VERSION} and {CONTRACT_VERSION}"
    )]
    UnknownVersion(u32),
    /// The operation field is missing or not one this build knows.
    #[error("change event has unknown operation {0}")]
    UnknownOperation(i32),
}

/// Encodes an event for the bus.
pub fn encode(event: &ChangeEvent) -> Vec<u8> {
    event.encode_to_vec()
}

/// Decodes an event from the bus, refusing versions and operations this build does not know.
pub fn decode(bytes: &[u8]) -> Result<ChangeEvent, DecodeError> {
    let mut event = ChangeEvent::decode(bytes).map_err(DecodeError::Protobuf)?;
    match Operation::try_from(event.op) {
        Ok(Operation::Unspecified) | Err(_) => return Err(DecodeError::UnknownOperation(event.op)),
        Ok(_) => {}
    }
    match event.contract_version {
        CONTRACT_VERSION => Ok(event),
        LEGACY_CONTRACT_VERSION => {
            event.version = RowVersion::of_legacy_event(&event).0;
            Ok(event)
        }
        other => Err(DecodeError::UnknownVersion(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_every_field() {
        let event = ChangeEvent {
            contract_version: CONTRACT_VERSION,
            system_id: 7,
            schema: "director".into(),
            table: "scores".into(),
            op: Operation::Update as i32,
            commit_lsn: 42,
            change_lsn: 40,
            seq_in_tx: 3,
            commit_time_us: -5,
            xid: 9,
            version: 77,
            ..Default::default()
        };
        assert_eq!(decode(&encode(&event)).expect("decodes"), event);
    }

    #[test]
    fn a_contract_1_event_gets_its_legacy_version() {
        let old = ChangeEvent { contract_version: 1, op: 2, commit_lsn: 500, ..Default::default() };
        assert_eq!(decode(&encode(&old)).expect("decodes").version, 500);
    }

    #[test]
    fn rejects_garbage_unknown_version_and_unknown_operation() {
        assert!(matches!(decode(b"\xff\xff\xff"), Err(DecodeError::Protobuf(_))));
        let future = ChangeEvent { contract_version: 3, op: 1, ..Default::default() };
        assert!(matches!(decode(&encode(&future)), Err(DecodeError::UnknownVersion(3))));
        let unspecified = ChangeEvent { contract_version: 1, op: 0, ..Default::default() };
        assert!(matches!(decode(&encode(&unspecified)), Err(DecodeError::UnknownOperation(0))));
        let unknown = ChangeEvent { contract_version: 1, op: 99, ..Default::default() };
        assert!(matches!(decode(&encode(&unknown)), Err(DecodeError::UnknownOperation(99))));
    }
}
