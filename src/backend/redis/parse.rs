//! Turns Redis replies (RESP2 values) into model types. Every unexpected shape is an
//! `Internal` error naming what was expected, never a panic.

use std::time::Duration;

use bytes::Bytes;
use redis::Value;

use crate::backend::{
    BackendError, ClaimPage, ConsumerInfo, Delivery, GroupInfo, PendingEntry, StreamInfo,
};
use crate::model::{ConsumerName, Entry, EntryId, GroupName, StreamName};

fn unexpected(expected: &str, value: &Value) -> BackendError {
    BackendError::Internal(format!(
        "unexpected Redis reply: expected {expected}, got {value:?}"
    ))
}

/// A bulk or simple string as text.
pub fn text(value: Value) -> Result<String, BackendError> {
    match value {
        Value::BulkString(bytes) => {
            String::from_utf8(bytes).map_err(|error| BackendError::Internal(error.to_string()))
        }
        Value::SimpleString(text) => Ok(text),
        Value::Okay => Ok("OK".to_owned()),
        Value::ServerError(error) => Err(super::map_error(error.into())),
        other => Err(unexpected("a string", &other)),
    }
}

/// An integer (Redis sometimes sends numbers as strings).
pub fn integer(value: Value) -> Result<u64, BackendError> {
    match value {
        Value::Int(n) => {
            u64::try_from(n).map_err(|_| unexpected("a non-negative integer", &Value::Int(n)))
        }
        Value::ServerError(error) => Err(super::map_error(error.into())),
        other => text(other.clone())?
            .parse()
            .map_err(|_| unexpected("an integer", &other)),
    }
}

/// An entry id.
pub fn entry_id(value: Value) -> Result<EntryId, BackendError> {
    let text = text(value)?;
    text.parse()
        .map_err(|error: crate::model::EntryIdError| BackendError::Internal(error.to_string()))
}

fn bytes(value: Value) -> Result<Bytes, BackendError> {
    match value {
        Value::BulkString(bytes) => Ok(Bytes::from(bytes)),
        Value::SimpleString(text) => Ok(Bytes::from(text)),
        other => Err(unexpected("a bulk string", &other)),
    }
}

fn array(value: Value) -> Result<Vec<Value>, BackendError> {
    match value {
        Value::Array(items) => Ok(items),
        Value::ServerError(error) => Err(super::map_error(error.into())),
        other => Err(unexpected("an array", &other)),
    }
}

/// One `[id, [field, value, …]]` entry.
pub fn entry(value: Value) -> Result<Entry, BackendError> {
    let mut parts = array(value)?.into_iter();
    let (Some(id), Some(fields)) = (parts.next(), parts.next()) else {
        return Err(BackendError::Internal(
            "unexpected Redis reply: short stream entry".into(),
        ));
    };
    let mut flat = array(fields)?.into_iter();
    let mut pairs = Vec::with_capacity(flat.len() / 2);
    while let (Some(field), Some(value)) = (flat.next(), flat.next()) {
        pairs.push((bytes(field)?, bytes(value)?));
    }
    Ok(Entry {
        id: entry_id(id)?,
        fields: pairs,
    })
}

/// A list of entries (an `XRANGE` reply).
pub fn entries(value: Value) -> Result<Vec<Entry>, BackendError> {
    array(value)?.into_iter().map(entry).collect()
}

/// A flat `[key, value, key, value, …]` reply as pairs with text keys.
fn flat_map(value: Value) -> Result<Vec<(String, Value)>, BackendError> {
    let mut flat = array(value)?.into_iter();
    let mut pairs = Vec::new();
    while let (Some(key), Some(value)) = (flat.next(), flat.next()) {
        pairs.push((text(key)?, value));
    }
    Ok(pairs)
}

fn optional_integer(value: Value) -> Result<Option<u64>, BackendError> {
    match value {
        Value::Nil => Ok(None),
        other => integer(other).map(Some),
    }
}

/// An `XINFO GROUPS` reply.
pub fn groups(value: Value) -> Result<Vec<GroupInfo>, BackendError> {
    array(value)?.into_iter().map(group).collect()
}

fn group(value: Value) -> Result<GroupInfo, BackendError> {
    let (mut name, mut consumers, mut pending, mut last_delivered_id, mut lag) =
        (None, 0, 0, EntryId::MIN, None);
    for (key, value) in flat_map(value)? {
        match key.as_str() {
            "name" => name = Some(text(value)?),
            "consumers" => consumers = integer(value)?,
            "pending" => pending = integer(value)?,
            "last-delivered-id" => last_delivered_id = entry_id(value)?,
            "lag" => lag = optional_integer(value)?,
            _ => {}
        }
    }
    let name = name.ok_or_else(|| unexpected("a group name", &Value::Nil))?;
    Ok(GroupInfo {
        name: GroupName::from_backend(name),
        consumers,
        pending,
        last_delivered_id,
        lag,
    })
}

/// An `XINFO STREAM` reply, with the groups read alongside it.
pub fn stream_info(value: Value, groups: Vec<GroupInfo>) -> Result<StreamInfo, BackendError> {
    let mut info = StreamInfo {
        length: 0,
        first_entry: None,
        last_entry: None,
        last_generated_id: EntryId::MIN,
        entries_added: 0,
        max_deleted_id: EntryId::MIN,
        groups,
    };
    for (key, value) in flat_map(value)? {
        match key.as_str() {
            "length" => info.length = integer(value)?,
            "last-generated-id" => info.last_generated_id = entry_id(value)?,
            "entries-added" => info.entries_added = integer(value)?,
            "max-deleted-entry-id" => info.max_deleted_id = entry_id(value)?,
            "first-entry" if value != Value::Nil => info.first_entry = Some(entry(value)?),
            "last-entry" if value != Value::Nil => info.last_entry = Some(entry(value)?),
            _ => {}
        }
    }
    Ok(info)
}

/// An `XREAD` reply: nil (nothing arrived) or `[[stream, entries], …]`.
pub fn streams(value: Value) -> Result<Vec<(StreamName, Vec<Entry>)>, BackendError> {
    if value == Value::Nil {
        return Ok(Vec::new());
    }
    array(value)?
        .into_iter()
        .map(|item| {
            let mut parts = array(item)?.into_iter();
            let (Some(name), Some(entries_value)) = (parts.next(), parts.next()) else {
                return Err(unexpected("[stream, entries]", &Value::Nil));
            };
            Ok((
                StreamName::from_backend(text(name)?),
                entries(entries_value)?,
            ))
        })
        .collect()
}

/// Entries of one stream from a group read: `None` for a pending entry deleted from the stream.
type GroupEntries = Vec<(EntryId, Option<Entry>)>;

/// An `XREADGROUP` reply, where a pending entry deleted from the stream comes back as
/// `[id, nil]`.
pub fn group_streams(value: Value) -> Result<Vec<(StreamName, GroupEntries)>, BackendError> {
    if value == Value::Nil {
        return Ok(Vec::new());
    }
    array(value)?
        .into_iter()
        .map(|item| {
            let mut parts = array(item)?.into_iter();
            let (Some(name), Some(entries_value)) = (parts.next(), parts.next()) else {
                return Err(unexpected("[stream, entries]", &Value::Nil));
            };
            let entries = array(entries_value)?
                .into_iter()
                .map(|raw| match raw {
                    // `[id, nil]`: deleted from the stream while pending.
                    Value::Array(mut parts) if matches!(parts.as_slice(), [_, Value::Nil]) => {
                        parts.truncate(1);
                        let id = parts.pop().unwrap_or(Value::Nil);
                        Ok((entry_id(id)?, None))
                    }
                    raw => entry(raw).map(|entry| (entry.id, Some(entry))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok((StreamName::from_backend(text(name)?), entries))
        })
        .collect()
}

/// An extended `XPENDING` reply: `[[id, consumer, idle ms, deliveries], …]`.
pub fn pending(value: Value) -> Result<Vec<PendingEntry>, BackendError> {
    array(value)?
        .into_iter()
        .map(|item| {
            let mut parts = array(item)?.into_iter();
            let (Some(id), Some(consumer), Some(idle), Some(deliveries)) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(unexpected("[id, consumer, idle, deliveries]", &Value::Nil));
            };
            Ok(PendingEntry {
                id: entry_id(id)?,
                consumer: ConsumerName::from_backend(text(consumer)?),
                idle: Duration::from_millis(integer(idle)?),
                deliveries: integer(deliveries)?,
            })
        })
        .collect()
}

/// An `XINFO CONSUMERS` reply.
pub fn consumers(value: Value) -> Result<Vec<ConsumerInfo>, BackendError> {
    array(value)?
        .into_iter()
        .map(|item| {
            let (mut name, mut pending, mut idle) = (None, 0, 0);
            for (key, value) in flat_map(item)? {
                match key.as_str() {
                    "name" => name = Some(text(value)?),
                    "pending" => pending = integer(value)?,
                    "idle" => idle = integer(value)?,
                    _ => {}
                }
            }
            let name = name.ok_or_else(|| unexpected("a consumer name", &Value::Nil))?;
            Ok(ConsumerInfo {
                name: ConsumerName::from_backend(name),
                pending,
                idle: Duration::from_millis(idle),
            })
        })
        .collect()
}

/// The claim script's reply: `[next cursor, claimed entries, deleted ids, delivery counts]`.
pub fn claim_page(value: Value) -> Result<ClaimPage, BackendError> {
    let mut parts = array(value)?.into_iter();
    let (Some(cursor), Some(claimed), Some(deleted), Some(counts)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(unexpected(
            "[cursor, claimed, deleted, counts]",
            &Value::Nil,
        ));
    };
    let cursor = entry_id(cursor)?;
    let counts = array(counts)?
        .into_iter()
        .map(integer)
        .collect::<Result<Vec<_>, _>>()?;
    let claimed = entries(claimed)?
        .into_iter()
        .zip(counts.into_iter().chain(std::iter::repeat(1)))
        .map(|(entry, deliveries)| Delivery { entry, deliveries })
        .collect();
    Ok(ClaimPage {
        next_cursor: (cursor != EntryId::MIN).then_some(cursor),
        claimed,
        deleted: array(deleted)?
            .into_iter()
            .map(entry_id)
            .collect::<Result<_, _>>()?,
    })
}
