//! One stream's state in the embedded engine: its entries, id generator and consumer groups, with
//! Redis Streams semantics. Pure and synchronous: the caller holds the stream's lock and passes
//! the current time, so every rule here is testable without a runtime or a clock.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::backend::{
    BackendError, ClaimPage, ConsumerInfo, Delivery, Direction, GroupBatch, GroupCursor, GroupInfo,
    GroupRead, GroupStart, PendingEntry, PendingQuery, RangeQuery, StreamInfo, StreamStats, Trim,
};
use crate::model::{ConsumerName, Entry, EntryId, GroupName};

/// Field/value pairs of one entry, shared (not copied) by every read of it.
pub type Fields = std::sync::Arc<[(Bytes, Bytes)]>;

/// The clock readings an operation needs: wall milliseconds for new ids, and monotonic
/// milliseconds (since the engine started; signed, so an idle time can be set further back than
/// the engine's age) for idle times.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub wall_ms: u64,
    pub mono_ms: i64,
}

fn idle_since(then_ms: i64, now_ms: i64) -> Duration {
    Duration::from_millis(now_ms.saturating_sub(then_ms).max(0) as u64)
}

#[derive(Debug)]
struct PendingInfo {
    consumer: ConsumerName,
    delivered_at: i64,
    deliveries: u64,
}

#[derive(Debug)]
struct Consumer {
    seen_at: i64,
    pending: BTreeSet<EntryId>,
}

#[derive(Debug)]
struct Group {
    last_delivered: EntryId,
    pending: BTreeMap<EntryId, PendingInfo>,
    consumers: BTreeMap<ConsumerName, Consumer>,
}

impl Group {
    fn consumer(&mut self, name: &ConsumerName, now: i64) -> &mut Consumer {
        let consumer = self
            .consumers
            .entry(name.clone())
            .or_insert_with(|| Consumer {
                seen_at: now,
                pending: BTreeSet::new(),
            });
        consumer.seen_at = now;
        consumer
    }

    /// Removes an entry from the pending list and its owner's set; whether it was pending.
    fn forget(&mut self, id: EntryId) -> bool {
        match self.pending.remove(&id) {
            Some(info) => {
                if let Some(owner) = self.consumers.get_mut(&info.consumer) {
                    owner.pending.remove(&id);
                }
                true
            }
            None => false,
        }
    }
}

/// A stream: ordered entries and its groups.
#[derive(Debug, Default)]
pub struct StreamState {
    /// Whether the stream exists. A state may exist without a stream (readers wait on it).
    pub exists: bool,
    entries: BTreeMap<EntryId, Fields>,
    last_id: EntryId,
    entries_added: u64,
    groups: BTreeMap<GroupName, Group>,
    /// When the stream is deleted for want of writes (`idle_ttl`).
    pub expires_at: Option<Instant>,
}

fn entry(id: EntryId, fields: &Fields) -> Entry {
    Entry {
        id,
        fields: fields.to_vec(),
    }
}

impl StreamState {
    /// Forgets everything: the stream no longer exists (its readers keep waiting).
    pub fn clear(&mut self) {
        *self = StreamState::default();
    }

    /// Deletes the stream if its idle time to live has passed.
    pub fn expire(&mut self, now: Instant) {
        if self.expires_at.is_some_and(|at| at <= now) {
            self.clear();
        }
    }

    /// Appends an entry with the given id, or the next id by the clock (never going backwards).
    pub fn append(
        &mut self,
        id: Option<EntryId>,
        fields: Fields,
        now: Now,
    ) -> Result<EntryId, BackendError> {
        let id = match id {
            Some(id) if id == EntryId::MIN => {
                return Err(BackendError::InvalidId(
                    "the id must be greater than 0-0".into(),
                ));
            }
            Some(id) if id <= self.last_id => {
                return Err(BackendError::InvalidId(format!(
                    "the id {id} is equal or smaller than the stream's last id {}",
                    self.last_id
                )));
            }
            Some(id) => id,
            None if now.wall_ms > self.last_id.ms => EntryId::new(now.wall_ms, 0),
            None => self.last_id.successor().ok_or_else(|| {
                BackendError::InvalidId("the stream has exhausted its ids".into())
            })?,
        };
        self.entries.insert(id, fields);
        self.last_id = id;
        self.entries_added += 1;
        self.exists = true;
        Ok(id)
    }

    /// Appends every entry, or none of them when one id is refused.
    pub fn append_all(
        &mut self,
        entries: impl IntoIterator<Item = (Option<EntryId>, Fields)>,
        now: Now,
    ) -> Result<Vec<EntryId>, BackendError> {
        let (last_id, entries_added, existed) = (self.last_id, self.entries_added, self.exists);
        let mut ids = Vec::new();
        for (id, fields) in entries {
            match self.append(id, fields, now) {
                Ok(id) => ids.push(id),
                Err(error) => {
                    for id in &ids {
                        self.entries.remove(id);
                    }
                    (self.last_id, self.entries_added, self.exists) =
                        (last_id, entries_added, existed);
                    return Err(error);
                }
            }
        }
        Ok(ids)
    }

    /// Removes entries (exactly); returns how many were removed.
    pub fn trim(&mut self, trim: Trim) -> u64 {
        let remove = match trim {
            Trim::MaxLen(max_len) => self.entries.len().saturating_sub(max_len as usize),
            Trim::MinId(min_id) => self.entries.range(..min_id).count(),
        };
        for _ in 0..remove {
            self.entries.pop_first();
        }
        remove as u64
    }

    pub fn delete(&mut self, ids: &[EntryId]) -> u64 {
        ids.iter()
            .filter(|id| self.entries.remove(id).is_some())
            .count() as u64
    }

    pub fn range(&self, query: RangeQuery) -> Vec<Entry> {
        if query.start > query.end {
            return Vec::new();
        }
        let range = self.entries.range(query.start..=query.end);
        let take = |iter: &mut dyn Iterator<Item = (&EntryId, &Fields)>| {
            iter.take(query.count)
                .map(|(id, fields)| entry(*id, fields))
                .collect()
        };
        match query.direction {
            Direction::Forward => take(&mut range.into_iter()),
            Direction::Backward => take(&mut range.rev()),
        }
    }

    /// Entries after `id`, oldest first.
    pub fn after(&self, id: EntryId, count: usize) -> Vec<Entry> {
        let Some(start) = id.successor() else {
            return Vec::new();
        };
        self.entries
            .range(start..)
            .take(count)
            .map(|(id, fields)| entry(*id, fields))
            .collect()
    }

    fn group_info(&self, name: &GroupName, group: &Group) -> GroupInfo {
        let lag = match group.last_delivered.successor() {
            Some(next) => self.entries.range(next..).count() as u64,
            None => 0,
        };
        GroupInfo {
            name: name.clone(),
            consumers: group.consumers.len() as u64,
            pending: group.pending.len() as u64,
            last_delivered_id: group.last_delivered,
            lag: Some(lag),
        }
    }

    pub fn stats(&self) -> StreamStats {
        StreamStats {
            length: self.entries.len() as u64,
            groups: self
                .groups
                .iter()
                .map(|(name, group)| self.group_info(name, group))
                .collect(),
        }
    }

    pub fn info(&self) -> StreamInfo {
        StreamInfo {
            length: self.entries.len() as u64,
            first_entry: self
                .entries
                .first_key_value()
                .map(|(id, fields)| entry(*id, fields)),
            last_entry: self
                .entries
                .last_key_value()
                .map(|(id, fields)| entry(*id, fields)),
            last_generated_id: self.last_id,
            entries_added: self.entries_added,
            groups: self.stats().groups,
        }
    }

    fn start_id(&self, start: GroupStart) -> EntryId {
        match start {
            GroupStart::After(id) => id,
            GroupStart::Latest => self.last_id,
        }
    }

    /// Creates a group (the stream too); false when it existed.
    pub fn create_group(&mut self, name: &GroupName, start: GroupStart) -> bool {
        self.exists = true;
        if self.groups.contains_key(name) {
            return false;
        }
        let last_delivered = self.start_id(start);
        self.groups.insert(
            name.clone(),
            Group {
                last_delivered,
                pending: BTreeMap::new(),
                consumers: BTreeMap::new(),
            },
        );
        true
    }

    pub fn destroy_group(&mut self, name: &GroupName) -> bool {
        self.groups.remove(name).is_some()
    }

    fn group_mut(&mut self, name: &GroupName) -> Result<&mut Group, BackendError> {
        self.groups.get_mut(name).ok_or(BackendError::GroupNotFound)
    }

    fn group(&self, name: &GroupName) -> Result<&Group, BackendError> {
        self.groups.get(name).ok_or(BackendError::GroupNotFound)
    }

    pub fn set_group_position(
        &mut self,
        name: &GroupName,
        start: GroupStart,
    ) -> Result<(), BackendError> {
        let id = self.start_id(start);
        self.group_mut(name)?.last_delivered = id;
        Ok(())
    }

    pub fn read_group(
        &mut self,
        name: &GroupName,
        consumer: &ConsumerName,
        read: GroupRead,
        now: i64,
    ) -> Result<GroupBatch, BackendError> {
        let entries = &self.entries;
        let group = self
            .groups
            .get_mut(name)
            .ok_or(BackendError::GroupNotFound)?;
        let mut batch = GroupBatch::default();
        match read.cursor {
            GroupCursor::New => {
                group.consumer(consumer, now);
                let start = match group.last_delivered.successor() {
                    Some(start) => start,
                    None => return Ok(batch),
                };
                let fresh: Vec<(EntryId, Fields)> = entries
                    .range(start..)
                    .take(read.count)
                    .map(|(id, fields)| (*id, fields.clone()))
                    .collect();
                for (id, fields) in fresh {
                    group.last_delivered = id;
                    if !read.no_ack {
                        group.pending.insert(
                            id,
                            PendingInfo {
                                consumer: consumer.clone(),
                                delivered_at: now,
                                deliveries: 1,
                            },
                        );
                        group.consumer(consumer, now).pending.insert(id);
                    }
                    batch.deliveries.push(Delivery {
                        entry: entry(id, &fields),
                        deliveries: 1,
                    });
                }
            }
            GroupCursor::PendingAfter(after) => {
                let owned: Vec<EntryId> = match after.successor() {
                    Some(start) => group
                        .consumer(consumer, now)
                        .pending
                        .range(start..)
                        .take(read.count)
                        .copied()
                        .collect(),
                    None => Vec::new(),
                };
                for id in owned {
                    match entries.get(&id) {
                        Some(fields) => {
                            let info = group
                                .pending
                                .get_mut(&id)
                                .expect("owned entries are pending");
                            info.deliveries += 1;
                            info.delivered_at = now;
                            batch.deliveries.push(Delivery {
                                entry: entry(id, fields),
                                deliveries: info.deliveries,
                            });
                        }
                        None => batch.deleted.push(id),
                    }
                }
            }
        }
        Ok(batch)
    }

    /// Acknowledges; with `delete` also removes the entries. Returns how many were pending (0 for
    /// a missing group, as Redis answers).
    pub fn ack(&mut self, name: &GroupName, ids: &[EntryId], delete: bool) -> u64 {
        let Some(group) = self.groups.get_mut(name) else {
            return 0;
        };
        let acked: Vec<EntryId> = ids.iter().copied().filter(|id| group.forget(*id)).collect();
        if delete {
            self.delete(&acked);
        }
        acked.len() as u64
    }

    /// `XAUTOCLAIM`: scans at most `count * 10` pending entries from `cursor`.
    pub fn claim_idle(
        &mut self,
        name: &GroupName,
        consumer: &ConsumerName,
        min_idle: Duration,
        cursor: EntryId,
        count: usize,
        now: i64,
    ) -> Result<ClaimPage, BackendError> {
        let entries = &self.entries;
        let group = self
            .groups
            .get_mut(name)
            .ok_or(BackendError::GroupNotFound)?;
        group.consumer(consumer, now);
        let mut page = ClaimPage::default();
        let scan: Vec<EntryId> = group
            .pending
            .range(cursor..)
            .map(|(id, _)| *id)
            .take(count * 10 + 1)
            .collect();
        for (scanned, id) in scan.iter().enumerate() {
            if page.claimed.len() >= count || scanned >= count * 10 {
                page.next_cursor = Some(*id);
                break;
            }
            let Some(fields) = entries.get(id) else {
                group.forget(*id);
                page.deleted.push(*id);
                continue;
            };
            let info = group
                .pending
                .get_mut(id)
                .expect("scanned from the pending list");
            if idle_since(info.delivered_at, now) < min_idle {
                continue;
            }
            let previous = std::mem::replace(&mut info.consumer, consumer.clone());
            info.deliveries += 1;
            info.delivered_at = now;
            let deliveries = info.deliveries;
            if let Some(owner) = group.consumers.get_mut(&previous) {
                owner.pending.remove(id);
            }
            group.consumer(consumer, now).pending.insert(*id);
            page.claimed.push(Delivery {
                entry: entry(*id, fields),
                deliveries,
            });
        }
        Ok(page)
    }

    pub fn set_pending_idle(
        &mut self,
        name: &GroupName,
        id: EntryId,
        idle: Duration,
        now: i64,
    ) -> Result<bool, BackendError> {
        let group = self.group_mut(name)?;
        Ok(match group.pending.get_mut(&id) {
            Some(info) => {
                let idle_ms = i64::try_from(idle.as_millis()).unwrap_or(i64::MAX);
                info.delivered_at = now.saturating_sub(idle_ms);
                true
            }
            None => false,
        })
    }

    pub fn pending(
        &self,
        name: &GroupName,
        query: &PendingQuery,
        now: i64,
    ) -> Result<Vec<PendingEntry>, BackendError> {
        if query.start > query.end {
            return Ok(Vec::new());
        }
        let group = self.group(name)?;
        Ok(group
            .pending
            .range(query.start..=query.end)
            .map(|(id, info)| PendingEntry {
                id: *id,
                consumer: info.consumer.clone(),
                idle: idle_since(info.delivered_at, now),
                deliveries: info.deliveries,
            })
            .filter(|entry| {
                query
                    .consumer
                    .as_ref()
                    .is_none_or(|consumer| *consumer == entry.consumer)
            })
            .filter(|entry| query.min_idle.is_none_or(|min_idle| entry.idle >= min_idle))
            .take(query.count)
            .collect())
    }

    pub fn consumers(&self, name: &GroupName, now: i64) -> Result<Vec<ConsumerInfo>, BackendError> {
        let group = self.group(name)?;
        Ok(group
            .consumers
            .iter()
            .map(|(name, consumer)| ConsumerInfo {
                name: name.clone(),
                pending: consumer.pending.len() as u64,
                idle: idle_since(consumer.seen_at, now),
            })
            .collect())
    }

    /// Removes the consumer if it owns nothing and has been idle for `min_idle`.
    pub fn remove_idle_consumer(
        &mut self,
        name: &GroupName,
        consumer: &ConsumerName,
        min_idle: Duration,
        now: i64,
    ) -> Result<bool, BackendError> {
        let group = self.group_mut(name)?;
        let removable = group.consumers.get(consumer).is_some_and(|state| {
            state.pending.is_empty() && idle_since(state.seen_at, now) >= min_idle
        });
        if removable {
            group.consumers.remove(consumer);
        }
        Ok(removable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(value: &str) -> Fields {
        vec![(
            Bytes::from_static(b"data"),
            Bytes::copy_from_slice(value.as_bytes()),
        )]
        .into()
    }

    fn at(wall_ms: u64) -> Now {
        Now {
            wall_ms,
            mono_ms: 0,
        }
    }

    #[test]
    fn ids_never_go_backwards_when_the_clock_does() {
        let mut stream = StreamState::default();
        assert_eq!(
            stream.append(None, fields("a"), at(1000)).unwrap(),
            EntryId::new(1000, 0)
        );
        assert_eq!(
            stream.append(None, fields("b"), at(1000)).unwrap(),
            EntryId::new(1000, 1)
        );
        assert_eq!(
            stream.append(None, fields("c"), at(400)).unwrap(),
            EntryId::new(1000, 2)
        );
        assert_eq!(
            stream.append(None, fields("d"), at(1001)).unwrap(),
            EntryId::new(1001, 0)
        );
        assert!(
            stream
                .append(Some(EntryId::new(1001, 0)), fields("e"), at(1))
                .is_err()
        );
        assert!(
            stream
                .append(Some(EntryId::MIN), fields("e"), at(1))
                .is_err()
        );
        assert_eq!(
            stream
                .append(Some(EntryId::new(5000, 3)), fields("e"), at(1))
                .unwrap(),
            EntryId::new(5000, 3)
        );
        assert_eq!(
            stream.append(None, fields("f"), at(1)).unwrap(),
            EntryId::new(5000, 4)
        );
    }

    #[test]
    fn claim_walks_the_pending_list_in_pages() {
        let start = 0;
        let group = GroupName::parse("g").unwrap();
        let (alice, bob) = (
            ConsumerName::parse("alice").unwrap(),
            ConsumerName::parse("bob").unwrap(),
        );
        let mut stream = StreamState::default();
        for n in 0..25 {
            stream.append(None, fields(&n.to_string()), at(1)).unwrap();
        }
        stream.create_group(&group, GroupStart::After(EntryId::MIN));
        let read = GroupRead {
            cursor: GroupCursor::New,
            count: 100,
            no_ack: false,
        };
        assert_eq!(
            stream
                .read_group(&group, &alice, read, start)
                .unwrap()
                .deliveries
                .len(),
            25
        );
        let later = start + 10_000;
        let mut cursor = EntryId::MIN;
        let mut claimed = 0;
        loop {
            let page = stream
                .claim_idle(&group, &bob, Duration::from_secs(5), cursor, 10, later)
                .unwrap();
            claimed += page.claimed.len();
            assert!(page.claimed.iter().all(|delivery| delivery.deliveries == 2));
            match page.next_cursor {
                Some(next) => cursor = next,
                None => break,
            }
        }
        assert_eq!(claimed, 25);
        let consumers = stream.consumers(&group, later).unwrap();
        assert_eq!(
            consumers.iter().map(|c| c.pending).collect::<Vec<_>>(),
            [0, 25]
        );
    }
}
