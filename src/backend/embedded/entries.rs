//! Where one stream's entries live: in a map in memory (`--in-memory`), or on disk, read through
//! the store's caches. [`StreamState`](super::stream::StreamState) reads entries only through
//! this type and writes them only by recording changes, so its rules are the same for both.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::disk::Disk;
use super::stream::{Changes, Fields};
use crate::backend::{BackendError, Direction};
use crate::model::{Entry, EntryId};

/// Keys for in-memory streams; they only tell one life of a stream from the next.
static NEXT_MEMORY_KEY: AtomicU64 = AtomicU64::new(1);

pub enum Entries {
    Memory {
        key: u64,
        map: BTreeMap<EntryId, Fields>,
    },
    /// On disk under `key`, a number of this life of the stream (entries of a deleted stream are
    /// removed in the background, while a new life already writes under a new key).
    Disk { disk: Arc<Disk>, key: u64 },
}

impl fmt::Debug for Entries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Entries::Memory { key, map } => write!(f, "Memory(key {key}, {} entries)", map.len()),
            Entries::Disk { key, .. } => write!(f, "Disk(key {key})"),
        }
    }
}

fn entry(id: EntryId, fields: &Fields) -> Entry {
    Entry {
        id,
        fields: fields.to_vec(),
    }
}

impl Entries {
    /// An empty stream in memory.
    pub fn memory() -> Entries {
        Entries::Memory {
            key: NEXT_MEMORY_KEY.fetch_add(1, Ordering::Relaxed),
            map: BTreeMap::new(),
        }
    }

    /// An empty stream on disk under a new key.
    pub fn disk(disk: &Arc<Disk>) -> Entries {
        Entries::Disk {
            disk: disk.clone(),
            key: disk.new_key(),
        }
    }

    /// The key this life of the stream is stored under.
    pub fn key(&self) -> u64 {
        match self {
            Entries::Memory { key, .. } | Entries::Disk { key, .. } => *key,
        }
    }

    /// Empty entries of the same kind, for the stream's next life.
    pub fn fresh(&self) -> Entries {
        match self {
            Entries::Memory { .. } => Entries::memory(),
            Entries::Disk { disk, .. } => Entries::disk(disk),
        }
    }

    pub fn get(&self, id: EntryId) -> Result<Option<Entry>, BackendError> {
        match self {
            Entries::Memory { map, .. } => Ok(map.get(&id).map(|fields| entry(id, fields))),
            Entries::Disk { disk, key } => disk.entry(*key, id),
        }
    }

    pub fn contains(&self, id: EntryId) -> Result<bool, BackendError> {
        match self {
            Entries::Memory { map, .. } => Ok(map.contains_key(&id)),
            Entries::Disk { disk, key } => disk.contains_entry(*key, id),
        }
    }

    /// Entries between two inclusive ids, at most `count`.
    pub fn range(
        &self,
        start: EntryId,
        end: EntryId,
        count: usize,
        direction: Direction,
    ) -> Result<Vec<Entry>, BackendError> {
        match self {
            Entries::Memory { map, .. } => {
                let range = map.range(start..=end);
                let take = |iter: &mut dyn Iterator<Item = (&EntryId, &Fields)>| {
                    iter.take(count)
                        .map(|(id, fields)| entry(*id, fields))
                        .collect()
                };
                Ok(match direction {
                    Direction::Forward => take(&mut range.into_iter()),
                    Direction::Backward => take(&mut range.rev()),
                })
            }
            Entries::Disk { disk, key } => disk.entries(*key, start, end, count, direction),
        }
    }

    /// The ids of the oldest entries: the first `count`, and beyond them those older than
    /// `below`; at most `limit` in all.
    pub fn oldest(
        &self,
        count: usize,
        below: Option<EntryId>,
        limit: usize,
    ) -> Result<Vec<EntryId>, BackendError> {
        if count == 0 && below.is_none() {
            return Ok(Vec::new());
        }
        let wanted = |index: usize, id: EntryId| index < count || below.is_some_and(|b| id < b);
        match self {
            Entries::Memory { map, .. } => Ok(map
                .keys()
                .enumerate()
                .take(limit)
                .take_while(|(index, id)| wanted(*index, **id))
                .map(|(_, id)| *id)
                .collect()),
            Entries::Disk { disk, key } => disk.oldest_ids(*key, limit, wanted),
        }
    }

    /// How many entries have an id greater than `id`.
    pub fn count_after(&self, id: EntryId) -> Result<u64, BackendError> {
        let Some(start) = id.successor() else {
            return Ok(0);
        };
        match self {
            Entries::Memory { map, .. } => Ok(map.range(start..).count() as u64),
            Entries::Disk { disk, key } => disk.count_entries(*key, start),
        }
    }

    /// Applies the entries written or removed in `changes` (in memory; on disk the store does it
    /// when it stores the changes).
    pub fn apply(&mut self, changes: &Changes) {
        let Entries::Memory { key, map } = self else {
            return;
        };
        for change in changes.entries.iter().filter(|change| change.key == *key) {
            match &change.fields {
                Some(fields) => map.insert(change.id, fields.clone()),
                None => map.remove(&change.id),
            };
        }
    }
}
