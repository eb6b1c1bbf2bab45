//! Resume positions covering several streams: one opaque token (used as the SSE `id:` of a
//! multi-stream subscription) from which each stream resumes exactly where it was.
//!
//! Format: `c1.` followed by the unpadded base64url encoding of a JSON object mapping each stream
//! name to the last id delivered from it. Opaque to clients, safe in headers and URLs, and any
//! stream name fits.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::model::{EntryId, StreamName};

const PREFIX: &str = "c1.";

/// Why a cursor was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a stream cursor from this server")]
pub struct CursorError(pub String);

/// Where each of several streams is, as a subscription advances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Positions(Vec<(StreamName, EntryId)>);

impl Positions {
    pub fn new(positions: Vec<(StreamName, EntryId)>) -> Positions {
        Positions(positions)
    }

    /// Records that `stream` has delivered up to `id`.
    pub fn advance(&mut self, stream: &StreamName, id: EntryId) {
        if let Some((_, position)) = self.0.iter_mut().find(|(name, _)| name == stream) {
            *position = id;
        }
    }

    /// The stream at `index`.
    pub fn stream(&self, index: usize) -> &StreamName {
        &self.0[index].0
    }

    /// Records that the stream at `index` has delivered up to `id`.
    pub fn advance_at(&mut self, index: usize, id: EntryId) {
        self.0[index].1 = id;
    }

    /// The token for these positions.
    pub fn encode(&self) -> String {
        encode(
            &self
                .0
                .iter()
                .map(|(stream, id)| (stream, *id))
                .collect::<Vec<_>>(),
        )
    }
}

/// The token for these positions.
pub fn encode(positions: &[(&StreamName, EntryId)]) -> String {
    let map: BTreeMap<&str, String> = positions
        .iter()
        .map(|(stream, id)| (stream.as_str(), id.to_string()))
        .collect();
    // Serializing a map of strings cannot fail.
    let json = serde_json::to_vec(&map).unwrap_or_default();
    format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
}

/// The positions in a token.
pub fn decode(token: &str) -> Result<Vec<(StreamName, EntryId)>, CursorError> {
    let error = || CursorError(token.chars().take(64).collect());
    let encoded = token.strip_prefix(PREFIX).ok_or_else(error)?;
    let json = URL_SAFE_NO_PAD.decode(encoded).map_err(|_| error())?;
    let map: BTreeMap<String, String> = serde_json::from_slice(&json).map_err(|_| error())?;
    map.into_iter()
        .map(|(stream, id)| {
            Ok((
                StreamName::parse(stream).map_err(|_| error())?,
                id.parse().map_err(|_| error())?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let (a, b) = (
            StreamName::parse("a,b:c").unwrap(),
            StreamName::parse("ü").unwrap(),
        );
        let token = encode(&[(&a, EntryId::new(5, 1)), (&b, EntryId::MIN)]);
        assert!(
            token
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || b"-_.".contains(&byte))
        );
        assert_eq!(
            decode(&token).unwrap(),
            vec![(a, EntryId::new(5, 1)), (b, EntryId::MIN)]
        );
        for bad in ["", "c1.", "c1.!!", "1-0", "c2.e30", "c1.eyJhIjoieCJ9"] {
            assert!(
                decode(bad).is_err() || decode(bad).unwrap().is_empty(),
                "{bad}"
            );
        }
        assert!(decode("c1.eyJhIjoieCJ9").is_err(), "a bad id inside");
    }
}
