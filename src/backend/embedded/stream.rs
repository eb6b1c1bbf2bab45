//! One stream's state in the embedded engine: its id generator, counters and consumer groups, with
//! Redis Streams semantics. Pure and synchronous: the caller holds the stream's lock and passes
//! the current time, entries are read through [`Entries`], and every change is recorded in a
//! [`Changes`] for the caller to store, so every rule here is testable without a runtime, a clock
//! or a disk.
//!
//! Rule: within one operation, entries are read before any entry is written (writes reach the
//! entries only when the caller stores the changes), so the in-memory and on-disk engines behave
//! alike.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;

use super::entries::Entries;
use crate::backend::{
    BackendError, ClaimPage, ConsumerInfo, Delivery, Direction, GroupBatch, GroupCursor, GroupInfo,
    GroupRead, GroupStart, PendingEntry, PendingQuery, RangeQuery, StreamInfo, StreamStats, Trim,
};
use crate::model::{ConsumerName, Entry, EntryId, GroupName};

/// Field/value pairs of one entry, shared (not copied) by every read of it.
pub type Fields = std::sync::Arc<[(Bytes, Bytes)]>;

/// Most existing entries one append removes for retention, so that a newly configured, much
/// smaller limit is reached over several appends instead of in one long write (retention is
/// approximate, as Redis's `MAXLEN ~` is).
const RETENTION_STEP: usize = 1_000;

fn idle_since(then_ms: i64, now_ms: i64) -> Duration {
    Duration::from_millis(now_ms.saturating_sub(then_ms).max(0) as u64)
}

/// One entry of a group's pending list. Times are wall-clock milliseconds, as Redis keeps them,
/// so that idle times survive a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingInfo {
    pub consumer: ConsumerName,
    pub delivered_at: i64,
    pub deliveries: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Consumer {
    pub seen_at: i64,
    pub pending: BTreeSet<EntryId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub last_delivered: EntryId,
    /// Entries in the stream after `last_delivered`, kept up to date by every change (counting
    /// them on demand would read the whole backlog from disk).
    pub lag: u64,
    pub pending: BTreeMap<EntryId, PendingInfo>,
    pub consumers: BTreeMap<ConsumerName, Consumer>,
}

impl Group {
    fn consumer(&mut self, name: &ConsumerName, now: i64) -> &mut Consumer {
        let consumer = self.consumers.entry(name.clone()).or_default();
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

/// What one group's change touched.
#[derive(Debug)]
pub struct GroupChanges {
    pub name: GroupName,
    /// The group itself (its position) changed, or it was created or destroyed.
    pub record: bool,
    /// Pending entries added, changed or removed.
    pub pending: Vec<EntryId>,
    /// Consumers added, changed or removed.
    pub consumers: Vec<ConsumerName>,
}

/// An entry written or removed: the stream's storage key (see [`Entries::key`]), its id, and its
/// fields when written.
#[derive(Debug)]
pub struct EntryChange {
    pub key: u64,
    pub id: EntryId,
    pub fields: Option<Fields>,
}

/// Everything one operation changed in a stream: which records to store again (their new values
/// are read from the state when storing) and the entries written or removed.
#[derive(Debug, Default)]
pub struct Changes {
    /// Whether records are tracked (they are stored on disk; in memory only entries matter).
    pub records: bool,
    pub entries: Vec<EntryChange>,
    /// The stream's own record (ids, counters, expiry, existence).
    pub meta: bool,
    pub groups: Vec<GroupChanges>,
    /// Storage keys of earlier lives of the stream that were deleted: everything under them goes.
    pub dropped: Vec<u64>,
    /// An idempotency record to store with these changes (so a retry never writes twice).
    pub remember: Option<Remember>,
}

/// The ids an idempotent append wrote, remembered under its key until `expires_at` (ms).
#[derive(Debug)]
pub struct Remember {
    pub key: String,
    pub ids: Vec<crate::model::EntryId>,
    pub expires_at: u64,
}

impl Changes {
    /// Changes to be stored: with their records on disk, entries only in memory.
    pub fn new(records: bool) -> Changes {
        Changes {
            records,
            ..Changes::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
            && !self.meta
            && self.groups.is_empty()
            && self.dropped.is_empty()
            && self.remember.is_none()
    }

    fn group(&mut self, name: &GroupName) -> &mut GroupChanges {
        // A handful of groups per stream at most: a linear search beats a map.
        match self.groups.iter().position(|changes| changes.name == *name) {
            Some(index) => &mut self.groups[index],
            None => {
                self.groups.push(GroupChanges {
                    name: name.clone(),
                    record: false,
                    pending: Vec::new(),
                    consumers: Vec::new(),
                });
                self.groups.last_mut().expect("just pushed")
            }
        }
    }

    fn group_record(&mut self, name: &GroupName) {
        if self.records {
            self.group(name).record = true;
        }
    }

    fn pending(&mut self, name: &GroupName, id: EntryId) {
        if self.records {
            self.group(name).pending.push(id);
        }
    }

    fn consumer(&mut self, name: &GroupName, consumer: &ConsumerName) {
        if !self.records {
            return;
        }
        let changes = self.group(name);
        if !changes.consumers.contains(consumer) {
            changes.consumers.push(consumer.clone());
        }
    }
}

/// A stream: counters, groups, and where its entries are.
#[derive(Debug)]
pub struct StreamState {
    /// Whether the stream exists. A state may exist without a stream (readers wait on it).
    pub exists: bool,
    pub entries: Entries,
    pub length: u64,
    pub last_id: EntryId,
    pub entries_added: u64,
    /// The largest id removed by a deletion (not by trimming), as Redis reports it.
    pub max_deleted_id: EntryId,
    pub groups: BTreeMap<GroupName, Group>,
    /// When the stream is deleted for want of writes (`idle_ttl`), in wall-clock milliseconds.
    pub expires_at: Option<u64>,
}

/// The time an operation runs at, in wall-clock milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub ms: u64,
}

impl Now {
    fn signed(self) -> i64 {
        i64::try_from(self.ms).unwrap_or(i64::MAX)
    }
}

/// Which idle pending entries a claim looks at: from `cursor`, those idle for `min_idle`, at
/// most `count` of them.
#[derive(Debug, Clone, Copy)]
pub struct ClaimScan {
    pub min_idle: Duration,
    pub cursor: EntryId,
    pub count: usize,
}

/// The entries a retention trim removes: how many of the oldest, and those older than an id.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrimRule {
    pub max_len: Option<u64>,
    pub min_id: Option<EntryId>,
}

impl StreamState {
    /// A stream that does not exist yet, whose entries will live in `entries`.
    pub fn new(entries: Entries) -> StreamState {
        StreamState {
            exists: false,
            entries,
            length: 0,
            last_id: EntryId::MIN,
            entries_added: 0,
            max_deleted_id: EntryId::MIN,
            groups: BTreeMap::new(),
            expires_at: None,
        }
    }

    /// Forgets everything: the stream no longer exists (its readers keep waiting). Its entries
    /// and records are removed when the changes are stored; a new life starts under a new key.
    pub fn clear(&mut self, changes: &mut Changes) {
        if self.exists || !self.groups.is_empty() {
            changes.dropped.push(self.entries.key());
            changes.meta = true;
        }
        *self = StreamState::new(self.entries.fresh());
    }

    /// Deletes the stream if its idle time to live has passed.
    pub fn expire(&mut self, now: Now, changes: &mut Changes) {
        if self.expires_at.is_some_and(|at| at <= now.ms) {
            self.clear(changes);
        }
    }

    /// The id an append gets: the one asked for, checked as Redis checks it, or the next by the
    /// clock (never going backwards).
    fn next_id(last_id: EntryId, id: Option<EntryId>, now: Now) -> Result<EntryId, BackendError> {
        match id {
            Some(id) if id == EntryId::MIN => Err(BackendError::InvalidId(
                "the id must be greater than 0-0".into(),
            )),
            Some(id) if id <= last_id => Err(BackendError::InvalidId(format!(
                "the id {id} is equal or smaller than the stream's last id {last_id}"
            ))),
            Some(id) => Ok(id),
            None if now.ms > last_id.ms => Ok(EntryId::new(now.ms, 0)),
            None => last_id
                .successor()
                .ok_or_else(|| BackendError::InvalidId("the stream has exhausted its ids".into())),
        }
    }

    /// Appends every entry, or none of them when one id is refused, then trims by `trim`: the
    /// oldest existing entries go first, and a new entry that would be trimmed at once is not
    /// stored at all (it still takes its id). Entries added count every appended entry.
    pub fn append_all(
        &mut self,
        entries: impl IntoIterator<Item = (Option<EntryId>, Fields)>,
        trim: TrimRule,
        now: Now,
        changes: &mut Changes,
    ) -> Result<Vec<EntryId>, BackendError> {
        let mut last_id = self.last_id;
        let mut fresh = Vec::new();
        for (id, fields) in entries {
            last_id = Self::next_id(last_id, id, now)?;
            fresh.push((last_id, fields));
        }
        let ids: Vec<EntryId> = fresh.iter().map(|(id, _)| *id).collect();

        // What the trim takes: a prefix of (existing ++ fresh), as long as the longer of the two
        // rules asks, the existing part read before anything is written.
        let total = self.length + fresh.len() as u64;
        let by_length = trim
            .max_len
            .map_or(0, |max_len| total.saturating_sub(max_len));
        let existing_by_length = by_length.min(self.length) as usize;
        let doomed = self.entries.oldest(
            existing_by_length.min(RETENTION_STEP),
            trim.min_id,
            RETENTION_STEP,
        )?;
        let fresh_by_length = by_length.saturating_sub(self.length) as usize;
        let fresh_by_age = trim.min_id.map_or(0, |min_id| {
            fresh.iter().filter(|(id, _)| *id < min_id).count()
        });
        let skipped = if doomed.len() as u64 == self.length {
            fresh_by_length.max(fresh_by_age)
        } else {
            0
        };

        self.remove_entries(&doomed, changes);
        for (index, (id, fields)) in fresh.into_iter().enumerate() {
            self.entries_added += 1;
            self.last_id = id;
            if index < skipped {
                continue;
            }
            self.length += 1;
            for group in self.groups.values_mut() {
                if id > group.last_delivered {
                    group.lag += 1;
                }
            }
            changes.entries.push(EntryChange {
                key: self.entries.key(),
                id,
                fields: Some(fields),
            });
        }
        self.exists = true;
        changes.meta = true;
        Ok(ids)
    }

    /// Removes entries known to exist, keeping the counters and every group's lag right.
    fn remove_entries(&mut self, ids: &[EntryId], changes: &mut Changes) {
        for &id in ids {
            self.length -= 1;
            for group in self.groups.values_mut() {
                if id > group.last_delivered {
                    group.lag -= 1;
                }
            }
            changes.entries.push(EntryChange {
                key: self.entries.key(),
                id,
                fields: None,
            });
        }
        if !ids.is_empty() {
            changes.meta = true;
        }
    }

    /// Removes at most `step` entries by the rule; returns how many were removed and whether
    /// more remain to be removed.
    pub fn trim(
        &mut self,
        trim: Trim,
        step: usize,
        changes: &mut Changes,
    ) -> Result<(u64, bool), BackendError> {
        let doomed = match trim {
            Trim::MaxLen(max_len) => {
                let excess = self.length.saturating_sub(max_len);
                self.entries
                    .oldest(excess.min(step as u64) as usize, None, step)?
            }
            Trim::MinId(min_id) => self.entries.oldest(0, Some(min_id), step)?,
        };
        let more = doomed.len() == step;
        self.remove_entries(&doomed, changes);
        Ok((doomed.len() as u64, more))
    }

    /// Deletes entries by id (`XDEL`); returns how many existed.
    pub fn delete(&mut self, ids: &[EntryId], changes: &mut Changes) -> Result<u64, BackendError> {
        let unique: BTreeSet<EntryId> = ids.iter().copied().collect();
        let mut existing = Vec::new();
        for id in unique {
            if self.entries.contains(id)? {
                existing.push(id);
            }
        }
        if let Some(newest) = existing.last() {
            self.max_deleted_id = self.max_deleted_id.max(*newest);
        }
        self.remove_entries(&existing, changes);
        Ok(existing.len() as u64)
    }

    pub fn range(&self, query: RangeQuery) -> Result<Vec<Entry>, BackendError> {
        if query.start > query.end || query.count == 0 {
            return Ok(Vec::new());
        }
        self.entries
            .range(query.start, query.end, query.count, query.direction)
    }

    /// Entries after `id`, oldest first.
    pub fn after(&self, id: EntryId, count: usize) -> Result<Vec<Entry>, BackendError> {
        match id.successor() {
            // Nothing was appended after the last id: no need to look.
            Some(start) if id < self.last_id => {
                self.entries
                    .range(start, EntryId::MAX, count, Direction::Forward)
            }
            _ => Ok(Vec::new()),
        }
    }

    fn group_info(name: &GroupName, group: &Group) -> GroupInfo {
        GroupInfo {
            name: name.clone(),
            consumers: group.consumers.len() as u64,
            pending: group.pending.len() as u64,
            last_delivered_id: group.last_delivered,
            lag: Some(group.lag),
        }
    }

    pub fn stats(&self) -> StreamStats {
        StreamStats {
            length: self.length,
            groups: self
                .groups
                .iter()
                .map(|(name, group)| Self::group_info(name, group))
                .collect(),
        }
    }

    pub fn info(&self) -> Result<StreamInfo, BackendError> {
        let end = |direction| {
            self.entries
                .range(EntryId::MIN, EntryId::MAX, 1, direction)
                .map(|mut entries| entries.pop())
        };
        Ok(StreamInfo {
            length: self.length,
            first_entry: end(Direction::Forward)?,
            last_entry: end(Direction::Backward)?,
            last_generated_id: self.last_id,
            entries_added: self.entries_added,
            max_deleted_id: self.max_deleted_id,
            groups: self.stats().groups,
        })
    }

    /// A group's position and the number of entries after it.
    fn position(&self, start: GroupStart) -> Result<(EntryId, u64), BackendError> {
        Ok(match start {
            GroupStart::Latest => (self.last_id, 0),
            GroupStart::After(EntryId::MIN) => (EntryId::MIN, self.length),
            GroupStart::After(id) => (id, self.entries.count_after(id)?),
        })
    }

    /// Creates a group (the stream too); false when it existed.
    pub fn create_group(
        &mut self,
        name: &GroupName,
        start: GroupStart,
        changes: &mut Changes,
    ) -> Result<bool, BackendError> {
        if !self.exists {
            self.exists = true;
            changes.meta = true;
        }
        if self.groups.contains_key(name) {
            return Ok(false);
        }
        let (last_delivered, lag) = self.position(start)?;
        self.groups.insert(
            name.clone(),
            Group {
                last_delivered,
                lag,
                pending: BTreeMap::new(),
                consumers: BTreeMap::new(),
            },
        );
        changes.group_record(name);
        Ok(true)
    }

    pub fn destroy_group(&mut self, name: &GroupName, changes: &mut Changes) -> bool {
        let existed = self.groups.remove(name).is_some();
        if existed {
            changes.group_record(name);
        }
        existed
    }

    fn group(&self, name: &GroupName) -> Result<&Group, BackendError> {
        self.groups.get(name).ok_or(BackendError::GroupNotFound)
    }

    fn group_mut(&mut self, name: &GroupName) -> Result<&mut Group, BackendError> {
        self.groups.get_mut(name).ok_or(BackendError::GroupNotFound)
    }

    pub fn set_group_position(
        &mut self,
        name: &GroupName,
        start: GroupStart,
        changes: &mut Changes,
    ) -> Result<(), BackendError> {
        self.group(name)?;
        let (last_delivered, lag) = self.position(start)?;
        let group = self.group_mut(name)?;
        (group.last_delivered, group.lag) = (last_delivered, lag);
        changes.group_record(name);
        Ok(())
    }

    pub fn read_group(
        &mut self,
        name: &GroupName,
        consumer: &ConsumerName,
        read: GroupRead,
        now: Now,
        changes: &mut Changes,
    ) -> Result<GroupBatch, BackendError> {
        let now = now.signed();
        let last_delivered = self.group(name)?.last_delivered;
        let mut batch = GroupBatch::default();
        match read.cursor {
            GroupCursor::New => {
                let fresh = self.after(last_delivered, read.count)?;
                let group = self.group_mut(name)?;
                group.consumer(consumer, now);
                changes.consumer(name, consumer);
                if fresh.is_empty() {
                    return Ok(batch);
                }
                for entry in fresh {
                    let id = entry.id;
                    group.last_delivered = id;
                    group.lag -= 1;
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
                        changes.pending(name, id);
                    }
                    batch.deliveries.push(Delivery {
                        entry,
                        deliveries: 1,
                    });
                }
                changes.group_record(name);
            }
            GroupCursor::PendingAfter(after) => {
                let owned: Vec<EntryId> = match after.successor() {
                    Some(start) => self
                        .group(name)?
                        .consumers
                        .get(consumer)
                        .map(|state| {
                            state
                                .pending
                                .range(start..)
                                .take(read.count)
                                .copied()
                                .collect()
                        })
                        .unwrap_or_default(),
                    None => Vec::new(),
                };
                let mut found = Vec::with_capacity(owned.len());
                for id in owned {
                    found.push((id, self.entries.get(id)?));
                }
                let group = self.group_mut(name)?;
                group.consumer(consumer, now);
                changes.consumer(name, consumer);
                for (id, entry) in found {
                    let Some(entry) = entry else {
                        batch.deleted.push(id);
                        continue;
                    };
                    let Some(info) = group.pending.get_mut(&id) else {
                        continue;
                    };
                    info.deliveries += 1;
                    info.delivered_at = now;
                    changes.pending(name, id);
                    batch.deliveries.push(Delivery {
                        entry,
                        deliveries: info.deliveries,
                    });
                }
            }
        }
        Ok(batch)
    }

    /// Acknowledges; with `delete` also removes the entries. Returns how many were pending (0 for
    /// a missing group, as Redis answers).
    pub fn ack(
        &mut self,
        name: &GroupName,
        ids: &[EntryId],
        delete: bool,
        changes: &mut Changes,
    ) -> Result<u64, BackendError> {
        let Some(group) = self.groups.get_mut(name) else {
            return Ok(0);
        };
        let acked: Vec<EntryId> = ids.iter().copied().filter(|id| group.forget(*id)).collect();
        for id in &acked {
            changes.pending(name, *id);
        }
        if delete {
            self.delete(&acked, changes)?;
        }
        Ok(acked.len() as u64)
    }

    /// `XAUTOCLAIM`: scans at most `count * 10` pending entries from `cursor`. An entry's idle
    /// time is looked at before its stream entry is read, so a scan reads from the entries only
    /// what it may claim; a deleted entry is dropped from the list once it is idle enough.
    pub fn claim_idle(
        &mut self,
        name: &GroupName,
        consumer: &ConsumerName,
        scan: ClaimScan,
        now: Now,
        changes: &mut Changes,
    ) -> Result<ClaimPage, BackendError> {
        let now = now.signed();
        let ClaimScan {
            min_idle,
            cursor,
            count,
        } = scan;
        let group = self.group(name)?;
        let scan: Vec<(EntryId, bool)> = group
            .pending
            .range(cursor..)
            .take(count * 10 + 1)
            .map(|(id, info)| (*id, idle_since(info.delivered_at, now) >= min_idle))
            .collect();
        let mut page = ClaimPage::default();
        let mut claimable = Vec::new();
        for (scanned, (id, idle)) in scan.iter().enumerate() {
            if claimable.len() >= count || scanned >= count * 10 {
                page.next_cursor = Some(*id);
                break;
            }
            if *idle {
                claimable.push((*id, self.entries.get(*id)?));
            }
        }
        let group = self.group_mut(name)?;
        group.consumer(consumer, now);
        changes.consumer(name, consumer);
        for (id, entry) in claimable {
            changes.pending(name, id);
            let Some(entry) = entry else {
                group.forget(id);
                page.deleted.push(id);
                continue;
            };
            let Some(info) = group.pending.get_mut(&id) else {
                continue;
            };
            let previous = std::mem::replace(&mut info.consumer, consumer.clone());
            info.deliveries += 1;
            info.delivered_at = now;
            let deliveries = info.deliveries;
            // The previous owner's record holds only its last-seen time; the pending records
            // say who owns what.
            if previous != *consumer
                && let Some(owner) = group.consumers.get_mut(&previous)
            {
                owner.pending.remove(&id);
            }
            group.consumer(consumer, now).pending.insert(id);
            page.claimed.push(Delivery { entry, deliveries });
        }
        Ok(page)
    }

    pub fn set_pending_idle(
        &mut self,
        name: &GroupName,
        id: EntryId,
        idle: Duration,
        now: Now,
        changes: &mut Changes,
    ) -> Result<bool, BackendError> {
        let group = self.group_mut(name)?;
        let Some(info) = group.pending.get_mut(&id) else {
            return Ok(false);
        };
        let idle_ms = i64::try_from(idle.as_millis()).unwrap_or(i64::MAX);
        info.delivered_at = now.signed().saturating_sub(idle_ms);
        changes.pending(name, id);
        Ok(true)
    }

    /// Puts entries in the pending list as they were elsewhere (a copy between backends): owner,
    /// delivery count and idle time. Entries missing from the stream are left out, as Redis's
    /// `XCLAIM … FORCE` leaves them out. Returns how many were restored.
    pub fn restore_pending(
        &mut self,
        name: &GroupName,
        pending: &[PendingEntry],
        now: Now,
        changes: &mut Changes,
    ) -> Result<u64, BackendError> {
        self.group(name)?;
        let mut present = Vec::with_capacity(pending.len());
        for entry in pending {
            if self.entries.contains(entry.id)? {
                present.push(entry);
            }
        }
        let now = now.signed();
        let group = self.group_mut(name)?;
        for entry in &present {
            group.forget(entry.id);
            let idle_ms = i64::try_from(entry.idle.as_millis()).unwrap_or(i64::MAX);
            group.pending.insert(
                entry.id,
                PendingInfo {
                    consumer: entry.consumer.clone(),
                    delivered_at: now.saturating_sub(idle_ms),
                    deliveries: entry.deliveries,
                },
            );
            let owner = group.consumers.entry(entry.consumer.clone()).or_default();
            if owner.pending.is_empty() && owner.seen_at == 0 {
                owner.seen_at = now.saturating_sub(idle_ms);
            }
            owner.pending.insert(entry.id);
            changes.pending(name, entry.id);
            changes.consumer(name, &entry.consumer);
        }
        Ok(present.len() as u64)
    }

    /// Sets the id generator and counters as they were elsewhere (`XSETID`): ids continue after
    /// `last_id`, which may not be below the newest entry.
    pub fn set_id(
        &mut self,
        last_id: EntryId,
        entries_added: u64,
        max_deleted_id: EntryId,
        changes: &mut Changes,
    ) -> Result<(), BackendError> {
        let newest = self
            .entries
            .range(EntryId::MIN, EntryId::MAX, 1, Direction::Backward)?;
        if newest.first().is_some_and(|entry| entry.id > last_id) {
            return Err(BackendError::InvalidId(format!(
                "the id {last_id} is smaller than the stream's newest entry"
            )));
        }
        self.last_id = last_id;
        self.entries_added = entries_added.max(self.length);
        self.max_deleted_id = max_deleted_id;
        self.exists = true;
        changes.meta = true;
        Ok(())
    }

    pub fn pending(
        &self,
        name: &GroupName,
        query: &PendingQuery,
        now: Now,
    ) -> Result<Vec<PendingEntry>, BackendError> {
        if query.start > query.end {
            return Ok(Vec::new());
        }
        let now = now.signed();
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

    pub fn consumers(&self, name: &GroupName, now: Now) -> Result<Vec<ConsumerInfo>, BackendError> {
        let group = self.group(name)?;
        Ok(group
            .consumers
            .iter()
            .map(|(name, consumer)| ConsumerInfo {
                name: name.clone(),
                pending: consumer.pending.len() as u64,
                idle: idle_since(consumer.seen_at, now.signed()),
            })
            .collect())
    }

    /// Removes the consumer if it owns nothing and has been idle for `min_idle`.
    pub fn remove_idle_consumer(
        &mut self,
        name: &GroupName,
        consumer: &ConsumerName,
        min_idle: Duration,
        now: Now,
        changes: &mut Changes,
    ) -> Result<bool, BackendError> {
        let group = self.group_mut(name)?;
        let removable = group.consumers.get(consumer).is_some_and(|state| {
            state.pending.is_empty() && idle_since(state.seen_at, now.signed()) >= min_idle
        });
        if removable {
            group.consumers.remove(consumer);
            changes.consumer(name, consumer);
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

    fn at(ms: u64) -> Now {
        Now { ms }
    }

    /// Runs an operation and stores its changes, as the engine does.
    fn stored<T>(
        stream: &mut StreamState,
        op: impl FnOnce(&mut StreamState, &mut Changes) -> T,
    ) -> T {
        let mut changes = Changes::default();
        let result = op(stream, &mut changes);
        stream.entries.apply(&changes);
        result
    }

    fn append(
        stream: &mut StreamState,
        id: Option<EntryId>,
        value: &str,
        now: Now,
    ) -> Result<EntryId, BackendError> {
        stored(stream, |stream, changes| {
            stream
                .append_all([(id, fields(value))], TrimRule::default(), now, changes)
                .map(|ids| ids[0])
        })
    }

    #[test]
    fn ids_never_go_backwards_when_the_clock_does() {
        let mut stream = StreamState::new(Entries::memory());
        assert_eq!(
            append(&mut stream, None, "a", at(1000)).unwrap(),
            EntryId::new(1000, 0)
        );
        assert_eq!(
            append(&mut stream, None, "b", at(1000)).unwrap(),
            EntryId::new(1000, 1)
        );
        assert_eq!(
            append(&mut stream, None, "c", at(400)).unwrap(),
            EntryId::new(1000, 2)
        );
        assert_eq!(
            append(&mut stream, None, "d", at(1001)).unwrap(),
            EntryId::new(1001, 0)
        );
        assert!(append(&mut stream, Some(EntryId::new(1001, 0)), "e", at(1)).is_err());
        assert!(append(&mut stream, Some(EntryId::MIN), "e", at(1)).is_err());
        assert_eq!(
            append(&mut stream, Some(EntryId::new(5000, 3)), "e", at(1)).unwrap(),
            EntryId::new(5000, 3)
        );
        assert_eq!(
            append(&mut stream, None, "f", at(1)).unwrap(),
            EntryId::new(5000, 4)
        );
    }

    #[test]
    fn lag_follows_appends_reads_deletions_and_trims() {
        let group = GroupName::parse("g").unwrap();
        let alice = ConsumerName::parse("alice").unwrap();
        let mut stream = StreamState::new(Entries::memory());
        let ids: Vec<EntryId> = (0..10)
            .map(|n| append(&mut stream, None, &n.to_string(), at(1)).unwrap())
            .collect();
        stored(&mut stream, |stream, changes| {
            stream.create_group(&group, GroupStart::After(ids[3]), changes)
        })
        .unwrap();
        let lag = |stream: &StreamState| stream.stats().groups[0].lag;
        assert_eq!(lag(&stream), Some(6));
        let read = GroupRead {
            cursor: GroupCursor::New,
            count: 2,
            no_ack: false,
        };
        stored(&mut stream, |stream, changes| {
            stream.read_group(&group, &alice, read, at(1), changes)
        })
        .unwrap();
        assert_eq!(lag(&stream), Some(4));
        stored(&mut stream, |stream, changes| {
            stream.delete(&[ids[0], ids[9], ids[9]], changes)
        })
        .unwrap();
        assert_eq!(lag(&stream), Some(3));
        stored(&mut stream, |stream, changes| {
            stream.trim(Trim::MaxLen(2), 100, changes)
        })
        .unwrap();
        assert_eq!((stream.length, lag(&stream)), (2, Some(2)));
        append(&mut stream, None, "x", at(1)).unwrap();
        assert_eq!(lag(&stream), Some(3));
    }

    #[test]
    fn retention_skips_new_entries_it_would_remove_at_once() {
        let mut stream = StreamState::new(Entries::memory());
        append(&mut stream, None, "old", at(1)).unwrap();
        let batch = (0..5).map(|n| (None, fields(&n.to_string())));
        let trim = TrimRule {
            max_len: Some(2),
            min_id: None,
        };
        let ids = stored(&mut stream, |stream, changes| {
            stream.append_all(batch, trim, at(2), changes)
        })
        .unwrap();
        assert_eq!(ids.len(), 5);
        assert_eq!((stream.length, stream.entries_added), (2, 6));
        let kept = stream
            .range(RangeQuery {
                start: EntryId::MIN,
                end: EntryId::MAX,
                count: 10,
                direction: Direction::Forward,
            })
            .unwrap();
        assert_eq!(
            kept.iter().map(|entry| entry.id).collect::<Vec<_>>(),
            ids[3..]
        );
    }

    #[test]
    fn claim_walks_the_pending_list_in_pages() {
        let group = GroupName::parse("g").unwrap();
        let (alice, bob) = (
            ConsumerName::parse("alice").unwrap(),
            ConsumerName::parse("bob").unwrap(),
        );
        let mut stream = StreamState::new(Entries::memory());
        for n in 0..25 {
            append(&mut stream, None, &n.to_string(), at(1)).unwrap();
        }
        stored(&mut stream, |stream, changes| {
            stream.create_group(&group, GroupStart::After(EntryId::MIN), changes)
        })
        .unwrap();
        let read = GroupRead {
            cursor: GroupCursor::New,
            count: 100,
            no_ack: false,
        };
        let delivered = stored(&mut stream, |stream, changes| {
            stream.read_group(&group, &alice, read, at(1_000), changes)
        })
        .unwrap();
        assert_eq!(delivered.deliveries.len(), 25);
        let later = at(11_000);
        let mut cursor = EntryId::MIN;
        let mut claimed = 0;
        loop {
            let page = stored(&mut stream, |stream, changes| {
                let scan = ClaimScan {
                    min_idle: Duration::from_secs(5),
                    cursor,
                    count: 10,
                };
                stream.claim_idle(&group, &bob, scan, later, changes)
            })
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
