//! The domain vocabulary shared by every layer: stream names, entry ids, entries and how an entry
//! becomes a message body. Parsed newtypes ("parse, don't validate"): once a value of these types
//! exists it is valid. Nothing here knows about HTTP or Redis.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use serde::Serialize;

/// Names starting with this prefix belong to streamgate itself (the probe stream, idempotency
/// records) and are hidden from listings unless asked for.
pub const INTERNAL_PREFIX: &str = "streamgate:";

/// Longest stream, group or consumer name accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// The entry field that holds a payload published through streamgate, as the JSON text received.
pub const DATA_FIELD: &str = "data";

/// The entry field that holds a message's expiry (Unix milliseconds) when it was published with a
/// `ttl`.
pub const EXPIRES_FIELD: &str = "exp";

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {MAX_NAME_BYTES} bytes, got {0}")]
    TooLong(usize),
    #[error("must not contain control characters")]
    ControlCharacter,
}

fn check_name(name: &str, max_bytes: usize) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > max_bytes {
        return Err(NameError::TooLong(name.len()));
    }
    if name.chars().any(char::is_control) {
        return Err(NameError::ControlCharacter);
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Parses a name: 1–256 bytes of UTF-8 without control characters.
            pub fn parse(name: impl Into<String>) -> Result<Self, NameError> {
                let name = name.into();
                check_name(&name, MAX_NAME_BYTES)?;
                Ok(Self(name))
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// Wraps a name read back from the backend. What exists is shown as it is, even when
            /// somebody else created it with a name streamgate would refuse.
            pub fn from_backend(name: String) -> Self {
                Self(name)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// The name of a stream (a Redis stream key).
    StreamName
);
name_type!(
    /// The name of a consumer group within a stream.
    GroupName
);
name_type!(
    /// The name of one consumer within a consumer group.
    ConsumerName
);

impl StreamName {
    /// The name of this stream's dead-letter stream, `{stream}:dlq`. It may exceed the length limit
    /// by its suffix, as the specification allows.
    pub fn dead_letter(&self) -> StreamName {
        StreamName(format!("{}:dlq", self.0))
    }

    /// Whether this stream belongs to streamgate itself.
    pub fn is_internal(&self) -> bool {
        self.0.starts_with(INTERNAL_PREFIX)
    }
}

/// A stream entry id, `<milliseconds>-<sequence>`. Ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct EntryId {
    pub ms: u64,
    pub seq: u64,
}

/// Why an entry id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{0}` is not a stream entry id (expected <milliseconds>-<sequence>, e.g. 1700000000000-0)"
)]
pub struct EntryIdError(pub String);

impl EntryId {
    /// The smallest id, `0-0`.
    pub const MIN: EntryId = EntryId { ms: 0, seq: 0 };
    /// The largest id.
    pub const MAX: EntryId = EntryId {
        ms: u64::MAX,
        seq: u64::MAX,
    };

    pub const fn new(ms: u64, seq: u64) -> Self {
        Self { ms, seq }
    }

    /// The id that comes right after this one, if any.
    pub fn successor(self) -> Option<EntryId> {
        if self.seq < u64::MAX {
            Some(EntryId::new(self.ms, self.seq + 1))
        } else if self.ms < u64::MAX {
            Some(EntryId::new(self.ms + 1, 0))
        } else {
            None
        }
    }

    /// The id that comes right before this one, if any.
    pub fn predecessor(self) -> Option<EntryId> {
        if self.seq > 0 {
            Some(EntryId::new(self.ms, self.seq - 1))
        } else if self.ms > 0 {
            Some(EntryId::new(self.ms - 1, u64::MAX))
        } else {
            None
        }
    }

    /// Parses a range bound as Redis does: a full id, or milliseconds alone, which means the first
    /// id of that millisecond for a start bound and the last for an end bound.
    pub fn parse_bound(text: &str, is_end: bool) -> Result<EntryId, EntryIdError> {
        match text.split_once('-') {
            Some(_) => text.parse(),
            None => {
                let error = || EntryIdError(text.to_owned());
                if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(error());
                }
                let ms = text.parse().map_err(|_| error())?;
                Ok(EntryId::new(ms, if is_end { u64::MAX } else { 0 }))
            }
        }
    }
}

impl FromStr for EntryId {
    type Err = EntryIdError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = || EntryIdError(text.to_owned());
        let (ms, seq) = text.split_once('-').ok_or_else(error)?;
        let digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return Err(error());
        }
        Ok(EntryId {
            ms: ms.parse().map_err(|_| error())?,
            seq: seq.parse().map_err(|_| error())?,
        })
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl Serialize for EntryId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A stream entry as stored: its id and its field/value pairs, in stored order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: EntryId,
    pub fields: Vec<(Bytes, Bytes)>,
}

impl Entry {
    fn field(&self, name: &str) -> Option<&Bytes> {
        self.fields
            .iter()
            .find(|(key, _)| key.as_ref() == name.as_bytes())
            .map(|(_, value)| value)
    }

    /// When the message stops being deliverable (Unix milliseconds), if it was published with a
    /// `ttl`.
    pub fn expires_at_ms(&self) -> Option<u64> {
        let text = std::str::from_utf8(self.field(EXPIRES_FIELD)?).ok()?;
        text.parse().ok()
    }

    /// Whether the message has expired at `now_ms`.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms().is_some_and(|expiry| expiry <= now_ms)
    }

    /// The message body as JSON text, following the specification's rules: the `data` field as
    /// received when it holds valid JSON; the `data` field as a JSON string when it does not; the
    /// whole field map as a JSON object when there is no `data` field (entries written by other
    /// Redis clients). Valid bodies are returned without re-encoding, so number precision and key
    /// order survive.
    pub fn body_json(&self) -> Bytes {
        match self.field(DATA_FIELD) {
            Some(data) if is_valid_json(data) => data.clone(),
            Some(data) => Bytes::from(json_string(data)),
            None => Bytes::from(json_object(self.fields.iter())),
        }
    }

    /// Fields beside the body, when the body is the `data` field: the extra fields of entries
    /// written by other clients, or a dead letter's `original_id`, `stream`, `group` and
    /// `deliveries`. streamgate's own `exp` is left out. None when there is no `data` field (the
    /// field map is then the body itself).
    fn extras(&self) -> impl Iterator<Item = &(Bytes, Bytes)> {
        let has_data = self.field(DATA_FIELD).is_some();
        self.fields.iter().filter(move |(key, _)| {
            has_data
                && key.as_ref() != DATA_FIELD.as_bytes()
                && key.as_ref() != EXPIRES_FIELD.as_bytes()
        })
    }

    /// The extra fields (see [`Entry::extras`]) as text.
    pub fn extra_fields(&self) -> Vec<(String, String)> {
        self.extras()
            .map(|(key, value)| {
                (
                    String::from_utf8_lossy(key).into_owned(),
                    String::from_utf8_lossy(value).into_owned(),
                )
            })
            .collect()
    }

    /// The extra fields as one JSON object of strings, as every transport shows them beside the
    /// body (`"fields":{…}`); `None` when there are none, as for every message published through
    /// streamgate.
    pub fn extra_fields_json(&self) -> Option<Vec<u8>> {
        let mut extras = self.extras().peekable();
        extras.peek()?;
        Some(json_object(extras))
    }
}

/// `fields` as one JSON object of strings.
fn json_object<'a>(fields: impl Iterator<Item = &'a (Bytes, Bytes)>) -> Vec<u8> {
    let mut out = vec![b'{'];
    for (index, (key, value)) in fields.enumerate() {
        if index > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&json_string(key));
        out.push(b':');
        out.extend_from_slice(&json_string(value));
    }
    out.push(b'}');
    out
}

/// Whether `bytes` is one complete JSON value.
pub fn is_valid_json(bytes: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
}

/// `bytes` as a JSON string literal (invalid UTF-8 is replaced, as it cannot be represented).
fn json_string(bytes: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(bytes);
    // Serializing a string cannot fail.
    serde_json::to_vec(&text).unwrap_or_default()
}

/// A message to append: the payload's JSON text exactly as received, and an optional expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    /// An explicit id (validated as Redis does), or `None` for the next one by the clock.
    pub id: Option<EntryId>,
    pub data: Bytes,
    pub expires_at_ms: Option<u64>,
}

impl NewEntry {
    /// A message with a generated id.
    pub fn new(data: Bytes, expires_at_ms: Option<u64>) -> NewEntry {
        NewEntry {
            id: None,
            data,
            expires_at_ms,
        }
    }
}

impl NewEntry {
    /// The field/value pairs this entry is stored as.
    pub fn fields(&self) -> Vec<(Bytes, Bytes)> {
        let mut fields = vec![(Bytes::from_static(DATA_FIELD.as_bytes()), self.data.clone())];
        if let Some(expiry) = self.expires_at_ms {
            fields.push((
                Bytes::from_static(EXPIRES_FIELD.as_bytes()),
                Bytes::from(expiry.to_string()),
            ));
        }
        fields
    }
}

/// Milliseconds since the Unix epoch, by the wall clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

/// A duration in milliseconds to the microsecond, as reported in JSON (`0.069`, not the
/// `0.06917899999999999` a plain conversion prints).
pub fn millis(elapsed: std::time::Duration) -> f64 {
    (elapsed.as_secs_f64() * 1e6).round() / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fields: &[(&str, &str)]) -> Entry {
        Entry {
            id: EntryId::new(1, 0),
            fields: fields
                .iter()
                .map(|(k, v)| {
                    (
                        Bytes::copy_from_slice(k.as_bytes()),
                        Bytes::copy_from_slice(v.as_bytes()),
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn entry_ids_parse_print_and_order() {
        let id: EntryId = "1700000000000-7".parse().unwrap();
        assert_eq!(id, EntryId::new(1_700_000_000_000, 7));
        assert_eq!(id.to_string(), "1700000000000-7");
        assert!(EntryId::new(1, 9) < EntryId::new(2, 0));
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "1-2-3",
            "a-1",
            "1 -1",
            "+1-1",
            "99999999999999999999-0",
        ] {
            assert!(bad.parse::<EntryId>().is_err(), "{bad:?} parsed");
        }
        assert_eq!(
            EntryId::parse_bound("5", false).unwrap(),
            EntryId::new(5, 0)
        );
        assert_eq!(
            EntryId::parse_bound("5", true).unwrap(),
            EntryId::new(5, u64::MAX)
        );
        assert_eq!(
            EntryId::new(5, u64::MAX).successor(),
            Some(EntryId::new(6, 0))
        );
        assert_eq!(
            EntryId::new(6, 0).predecessor(),
            Some(EntryId::new(5, u64::MAX))
        );
        assert_eq!(EntryId::MIN.predecessor(), None);
    }

    #[test]
    fn names_are_checked() {
        assert!(StreamName::parse("orders").is_ok());
        assert!(StreamName::parse("a/b:c d").is_ok());
        assert_eq!(StreamName::parse(""), Err(NameError::Empty));
        assert_eq!(StreamName::parse("a\nb"), Err(NameError::ControlCharacter));
        assert_eq!(
            StreamName::parse("x".repeat(257)),
            Err(NameError::TooLong(257))
        );
        assert!(StreamName::parse("é".repeat(128)).is_ok());
        assert_eq!(
            StreamName::parse("s").unwrap().dead_letter().as_str(),
            "s:dlq"
        );
    }

    #[test]
    fn bodies_follow_the_rules() {
        let raw = r#"{"z":1,"a":12345678901234567890}"#;
        assert_eq!(entry(&[("data", raw)]).body_json(), raw.as_bytes());
        assert_eq!(
            entry(&[("data", "not json")]).body_json(),
            r#""not json""#.as_bytes()
        );
        assert_eq!(
            entry(&[("a", "1"), ("b", "x\"y")]).body_json(),
            r#"{"a":"1","b":"x\"y"}"#.as_bytes()
        );
        assert_eq!(entry(&[]).body_json(), "{}".as_bytes());
    }

    #[test]
    fn expiry_is_read_from_the_exp_field() {
        let message = NewEntry::new(Bytes::from_static(b"1"), Some(1000));
        let stored = Entry {
            id: EntryId::MIN,
            fields: message.fields(),
        };
        assert_eq!(stored.expires_at_ms(), Some(1000));
        assert!(stored.is_expired(1000));
        assert!(!stored.is_expired(999));
        assert!(!entry(&[("data", "1")]).is_expired(u64::MAX));
    }
}
