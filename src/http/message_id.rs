//! The opaque `message_id` of seed 004's API (WebSocket, long-poll, `/api/v1/ack`): it names the
//! stream, the group (if any) and the entry id, so an acknowledgement works on any instance
//! without shared state.
//!
//! Format: `m1.` + base64url(JSON `[stream, group or null, id]`) + `.` + base64url of the first
//! six bytes of its SHA-256. The checksum makes a garbled token a 400 instead of an
//! acknowledgement of some other message. It is not a signature: a client that can consume a
//! stream can name any of its entries anyway (the explicit finish route takes plain ids).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use crate::model::{EntryId, GroupName, StreamName};

const PREFIX: &str = "m1.";

/// What a `message_id` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRef {
    pub stream: StreamName,
    pub group: Option<GroupName>,
    pub id: EntryId,
}

fn checksum(payload: &str) -> String {
    URL_SAFE_NO_PAD.encode(&Sha256::digest(payload.as_bytes())[..6])
}

impl MessageRef {
    pub fn encode(&self) -> String {
        let fields = (
            self.stream.as_str(),
            self.group.as_ref().map(GroupName::as_str),
            self.id.to_string(),
        );
        // Serializing strings cannot fail.
        let json = serde_json::to_vec(&fields).unwrap_or_default();
        let payload = URL_SAFE_NO_PAD.encode(json);
        let sum = checksum(&payload);
        format!("{PREFIX}{payload}.{sum}")
    }

    /// The reference in a token; `None` for anything this server did not make.
    pub fn decode(token: &str) -> Option<MessageRef> {
        let (payload, sum) = token.strip_prefix(PREFIX)?.split_once('.')?;
        if checksum(payload) != sum {
            return None;
        }
        let json = URL_SAFE_NO_PAD.decode(payload).ok()?;
        let (stream, group, id): (String, Option<String>, String) =
            serde_json::from_slice(&json).ok()?;
        Some(MessageRef {
            stream: StreamName::parse(stream).ok()?,
            group: group.map(GroupName::parse).transpose().ok()?,
            id: id.parse().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_garbage_is_refused() {
        let reference = MessageRef {
            stream: StreamName::parse("orders/eu").unwrap(),
            group: Some(GroupName::parse("billing").unwrap()),
            id: EntryId::new(1_700_000_000_000, 3),
        };
        let token = reference.encode();
        assert_eq!(MessageRef::decode(&token), Some(reference.clone()));
        let broadcast = MessageRef {
            group: None,
            ..reference
        };
        assert_eq!(MessageRef::decode(&broadcast.encode()), Some(broadcast));
        // Flipping any one character is caught.
        for index in PREFIX.len()..token.len() {
            let mut garbled = token.clone().into_bytes();
            garbled[index] = if garbled[index] == b'A' { b'B' } else { b'A' };
            let garbled = String::from_utf8(garbled).unwrap();
            assert_eq!(MessageRef::decode(&garbled), None, "{garbled}");
        }
        for junk in [
            "",
            "m1.",
            "m1..",
            "1700000000000-0",
            "m2.abc.def",
            "m1.%%%.x",
        ] {
            assert_eq!(MessageRef::decode(junk), None, "{junk}");
        }
    }
}
