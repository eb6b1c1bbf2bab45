//! `streamgate copy`: moves streams with their entry ids and fields, consumer groups with their
//! positions, and pending entries with owner, delivery count and idle time, between two stores
//! (a data directory and Redis, either way), through the `Backend` trait alone.
//!
//! Safe to re-run: a target stream that holds a copy of the source's first entries (an earlier
//! run, finished or interrupted) is continued after its last entry; groups and pending entries
//! are set again, which changes nothing the second time. A target stream with other content is
//! refused unless `--overwrite`.
//!
//! Must not: know about HTTP; copy idempotency records or consumers that hold nothing (they
//! come back when their clients connect). The source is opened as streamgate opens it (a stream
//! whose idle time to live has run out is removed, as the server would).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use crate::backend::embedded::{DiskOptions, EmbeddedBackend, FsyncPolicy};
use crate::backend::redis::RedisBackend;
use crate::backend::{
    AnyBackend, Backend, BackendError, Direction, GroupStart, PendingEntry, PendingQuery,
    RangeQuery, StreamInfo,
};
use crate::config::{CopyEnd, CopyPlan};
use crate::model::{EntryId, GroupName, StreamName};

/// Entries (and pending entries) read and written per step.
const PAGE: usize = 1_000;

/// What happened to one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Copied {
        /// Entries written now.
        entries: u64,
        /// Entries the target held already (an earlier run).
        already: u64,
        groups: usize,
        pending: u64,
    },
    /// Not touched, and why.
    Refused(String),
    /// Failed part-way; a re-run continues.
    Failed(String),
}

/// The result of a copy, stream by stream.
#[derive(Debug, Default)]
pub struct Report {
    pub streams: Vec<(StreamName, Outcome)>,
    pub elapsed: Duration,
}

impl Report {
    /// Whether every stream was copied.
    pub fn complete(&self) -> bool {
        self.streams
            .iter()
            .all(|(_, outcome)| matches!(outcome, Outcome::Copied { .. }))
    }

    /// A table, one stream a line, and a summary.
    pub fn render(&self) -> String {
        let width = self
            .streams
            .iter()
            .map(|(name, _)| name.as_str().chars().count())
            .chain([6])
            .max()
            .unwrap_or(6);
        let mut out = format!(
            "{:<width$}  {:>9}  {:>9}  {:>6}  {:>8}  result\n",
            "stream", "copied", "already", "groups", "pending"
        );
        let mut total = 0;
        for (name, outcome) in &self.streams {
            let line = match outcome {
                Outcome::Copied {
                    entries,
                    already,
                    groups,
                    pending,
                } => {
                    total += entries;
                    format!("{entries:>9}  {already:>9}  {groups:>6}  {pending:>8}  copied")
                }
                Outcome::Refused(why) => format!(
                    "{:>9}  {:>9}  {:>6}  {:>8}  refused: {why}",
                    "-", "-", "-", "-"
                ),
                Outcome::Failed(why) => format!(
                    "{:>9}  {:>9}  {:>6}  {:>8}  FAILED: {why}",
                    "-", "-", "-", "-"
                ),
            };
            out.push_str(&format!("{:<width$}  {line}\n", name.as_str()));
        }
        let copied = self
            .streams
            .iter()
            .filter(|(_, outcome)| matches!(outcome, Outcome::Copied { .. }))
            .count();
        out.push_str(&format!(
            "{copied} of {} streams copied, {total} entries written, in {:.1} s\n",
            self.streams.len(),
            self.elapsed.as_secs_f64()
        ));
        out
    }
}

/// Opens one end of the copy. A data directory that is the source must exist.
async fn open(
    end: &CopyEnd,
    source: bool,
    shutdown: &CancellationToken,
) -> anyhow::Result<AnyBackend> {
    match end {
        CopyEnd::Directory(path) => {
            if source && !path.exists() {
                anyhow::bail!("there is no data directory at {}", path.display());
            }
            // Opening a directory without one would make it a data directory: not for a source.
            if source && !path.join("FORMAT").exists() {
                anyhow::bail!("{} is not a streamgate data directory", path.display());
            }
            let options = DiskOptions {
                path: path.clone(),
                // Bulk writes; everything is fsynced when the copy closes the directory.
                fsync: FsyncPolicy::EverySec,
                cache_size: 64 << 20,
            };
            let shutdown = shutdown.clone();
            let backend =
                tokio::task::spawn_blocking(move || EmbeddedBackend::open(&options, shutdown))
                    .await
                    .context("opening the data directory")??;
            Ok(AnyBackend::Embedded(backend))
        }
        CopyEnd::Redis(options) => {
            let backend = RedisBackend::connect(options, shutdown.clone())
                .await
                .with_context(|| {
                    format!("cannot connect to Redis at {}", options.display_address)
                })?;
            Ok(AnyBackend::Redis(backend))
        }
    }
}

/// Runs the copy, showing progress on standard error when it is a terminal.
pub async fn run(plan: &CopyPlan) -> anyhow::Result<Report> {
    let started = Instant::now();
    let shutdown = CancellationToken::new();
    let source = open(&plan.from, true, &shutdown)
        .await
        .with_context(|| format!("source {}", plan.from.describe()))?;
    let target = open(&plan.to, false, &shutdown)
        .await
        .with_context(|| format!("target {}", plan.to.describe()))?;
    let streams: Vec<StreamName> = source
        .list_streams()
        .await
        .context("listing the source's streams")?
        .into_iter()
        .filter(|name| match &plan.streams {
            Some(pattern) => pattern.matches(name.as_str()),
            None => !name.is_internal(),
        })
        .collect();
    let mut infos = Vec::with_capacity(streams.len());
    for name in streams {
        match source.stream_info(&name).await {
            Ok(info) => infos.push((name, info)),
            // Deleted since it was listed.
            Err(BackendError::StreamNotFound) => {}
            Err(error) => return Err(error).with_context(|| format!("reading {name}")),
        }
    }
    let progress = ProgressBar::new(infos.iter().map(|(_, info)| info.length).sum());
    progress.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg:20!} [{bar:40}] {pos}/{len} entries ({per_sec}, {eta} left)",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut report = Report::default();
    for (name, info) in infos {
        progress.set_message(name.to_string());
        let outcome = copy_stream(&source, &target, &name, &info, plan.overwrite, &progress)
            .await
            .unwrap_or_else(|error| Outcome::Failed(error.to_string()));
        report.streams.push((name, outcome));
    }
    progress.finish_and_clear();
    shutdown.cancel();
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Where a copy into `existing` continues: after the target's last entry when the target holds
/// the source's first entries (an earlier run); `None` when it holds something else.
async fn resume_after(
    source: &AnyBackend,
    name: &StreamName,
    info: &StreamInfo,
    existing: &StreamInfo,
) -> Result<Option<EntryId>, BackendError> {
    let (Some(first), Some(last)) = (&existing.first_entry, &existing.last_entry) else {
        // Empty: an earlier run that copied an empty stream, or a stream nobody wrote to (with
        // no groups of its own).
        let untouched = existing.last_generated_id == info.last_generated_id
            || (existing.last_generated_id == EntryId::MIN && existing.groups.is_empty());
        return Ok(untouched.then_some(EntryId::MIN));
    };
    if info.first_entry.as_ref() != Some(first) || existing.length > info.length {
        return Ok(None);
    }
    let at_last = RangeQuery {
        start: last.id,
        end: last.id,
        count: 1,
        direction: Direction::Forward,
    };
    let same = source.range(name, at_last).await?.first() == Some(last);
    Ok(same.then_some(last.id))
}

/// A group's whole pending list, in pages.
async fn pages(
    backend: &AnyBackend,
    name: &StreamName,
    group: &GroupName,
) -> Result<Vec<Vec<PendingEntry>>, BackendError> {
    let mut pages = Vec::new();
    let mut cursor = EntryId::MIN;
    loop {
        let query = PendingQuery {
            start: cursor,
            ..PendingQuery::all(PAGE)
        };
        let page = backend.pending(name, group, query).await?;
        let next = page.last().and_then(|last| last.id.successor());
        let full = page.len() == PAGE;
        if !page.is_empty() {
            pages.push(page);
        }
        match next {
            Some(next) if full => cursor = next,
            _ => return Ok(pages),
        }
    }
}

async fn copy_stream(
    source: &AnyBackend,
    target: &AnyBackend,
    name: &StreamName,
    info: &StreamInfo,
    overwrite: bool,
    progress: &ProgressBar,
) -> Result<Outcome, BackendError> {
    let (mut after, already) = match target.stream_info(name).await {
        Err(BackendError::StreamNotFound) => (EntryId::MIN, 0),
        Err(error) => return Err(error),
        Ok(existing) => match resume_after(source, name, info, &existing).await? {
            Some(after) => (after, existing.length),
            None if overwrite => {
                target.delete_stream(name).await?;
                (EntryId::MIN, 0)
            }
            None => {
                return Ok(Outcome::Refused(
                    "the target has a stream of this name with other content (--overwrite replaces it)"
                        .into(),
                ));
            }
        },
    };
    progress.inc(already);
    let mut entries = 0;
    // Up to the last id the source had when it was read: entries written to a live source
    // meanwhile are left for the next run (they would follow the id set below).
    while let Some(start) = after
        .successor()
        .filter(|start| *start <= info.last_generated_id)
    {
        let page = source
            .range(
                name,
                RangeQuery {
                    start,
                    end: info.last_generated_id,
                    count: PAGE,
                    direction: Direction::Forward,
                },
            )
            .await?;
        let Some(last) = page.last() else { break };
        after = last.id;
        let count = page.len() as u64;
        target.import(name, page).await?;
        entries += count;
        progress.inc(count);
    }
    target
        .set_last_id(
            name,
            info.last_generated_id,
            info.entries_added,
            info.max_deleted_id,
        )
        .await?;
    let mut pending = 0;
    for group in &info.groups {
        let position = GroupStart::After(group.last_delivered_id);
        if !target.create_group(name, &group.name, position).await? {
            target
                .set_group_position(name, &group.name, position)
                .await?;
        }
        let mut in_source = HashSet::new();
        for page in pages(source, name, &group.name).await? {
            in_source.extend(page.iter().map(|entry| entry.id));
            pending += target.restore_pending(name, &group.name, &page).await?;
        }
        // What the target holds that the source no longer does (finished since an earlier run)
        // is finished there too: the target's pending list becomes the source's.
        let finished: Vec<EntryId> = pages(target, name, &group.name)
            .await?
            .into_iter()
            .flatten()
            .map(|entry| entry.id)
            .filter(|id| !in_source.contains(id))
            .collect();
        for chunk in finished.chunks(PAGE) {
            target.ack(name, &group.name, chunk, false).await?;
        }
    }
    Ok(Outcome::Copied {
        entries,
        already,
        groups: info.groups.len(),
        pending,
    })
}
