//! Reconcile planning: what the backup lacks, decided from two flat listings.
//!
//! Cost model (issue 4): a reconcile that finds nothing to do must cost the two flat base-blob
//! listings and nothing else. So [`ReconcileJoin`] decides everything it can from one row per name
//! per side (the source's base blob, the backup's base blob with its `lakeguard_*` metadata), and
//! only the names it reports as [`Action::NeedsBackup`] are worth a per-blob snapshot listing, fed
//! to [`decide_snapshot`]. Memory is bounded by one page per side: the join asks for the next page
//! of a side only when that side's queue is empty.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::join::{join_step, JoinError, JoinStep, NameOrder, SortedInput};
use crate::model::metadata::{self, DELETED_AT, REQUESTED_AT, SOURCE_ETAG};
use crate::model::{BlobEntry, Etag};

/// Why a source blob needs a backup request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackupReason {
    /// The backup has no blob of that name.
    Missing,
    /// The backup holds another version (its `lakeguard_source_etag` differs).
    Changed,
    /// The backup holds a tombstone: the blob was deleted and has come back. The new version is
    /// backed up over the tombstone (the tombstoned state is kept as a backup snapshot first).
    Recreated,
    /// The backup blob carries no `lakeguard_source_etag`: not written by lakeguard (or damaged),
    /// so nothing proves it holds the current version.
    Unmarked,
}

/// The one thing to do for one name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// The backup's `lakeguard_source_etag` equals the source blob's ETag.
    InSync { name: String },
    /// The backup lacks the source's current version. Look at this blob's snapshots with
    /// [`decide_snapshot`] before enqueueing anything.
    NeedsBackup {
        source: BlobEntry,
        backup: Option<BlobEntry>,
        reason: BackupReason,
    },
    /// The backup holds a live (not tombstoned) blob whose source is not listed. The caller must
    /// confirm the source is gone (a HEAD answering 404, nothing else) before writing the
    /// tombstone, conditional on `backup.etag`: listings are not a point-in-time view, so a blob
    /// created (and backed up) while the two listings ran can look deleted here.
    Tombstone { backup: BlobEntry },
    /// Source gone, backup already marked: nothing to do.
    AlreadyTombstoned { name: String },
    /// A directory placeholder (`hdi_isfolder=true`) on either side with nothing to back up:
    /// directories are not data, and a hierarchical-namespace backup account creates its own.
    SkipPlaceholder { name: String },
}

impl Action {
    pub fn name(&self) -> &str {
        match self {
            Action::InSync { name }
            | Action::AlreadyTombstoned { name }
            | Action::SkipPlaceholder { name } => name,
            Action::NeedsBackup { source, .. } => &source.name,
            Action::Tombstone { backup } => &backup.name,
        }
    }
}

/// The per-name decision, from the base rows of both sides (either may be missing).
///
/// Placeholders count as absent on both sides: a source directory placeholder is not data, and a
/// backup placeholder (made by a hierarchical-namespace backup account) is not a backup of
/// anything. A source placeholder over a live backup blob therefore tombstones it: the file of
/// that name is gone (e.g. replaced by a directory).
pub fn classify(source: Option<BlobEntry>, backup: Option<BlobEntry>) -> Option<Action> {
    let name = source.as_ref().or(backup.as_ref())?.name.clone();
    let source = source.filter(|s| !s.is_directory_placeholder());
    let backup = backup.filter(|b| !b.is_directory_placeholder());
    Some(match (source, backup) {
        (None, None) => Action::SkipPlaceholder { name },
        (Some(source), None) => Action::NeedsBackup {
            source,
            backup: None,
            reason: BackupReason::Missing,
        },
        (None, Some(backup)) => {
            if backup.meta(DELETED_AT).is_some() {
                Action::AlreadyTombstoned { name }
            } else {
                Action::Tombstone { backup }
            }
        }
        (Some(source), Some(backup)) => {
            let reason = if backup.meta(DELETED_AT).is_some() {
                BackupReason::Recreated
            } else {
                match backup.meta(SOURCE_ETAG) {
                    None => BackupReason::Unmarked,
                    Some(e) if Etag::new(e) == source.etag => return Some(Action::InSync { name }),
                    Some(_) => BackupReason::Changed,
                }
            };
            Action::NeedsBackup {
                source,
                backup: Some(backup),
                reason,
            }
        }
    })
}

/// What [`ReconcileJoin::step`] needs or produced.
#[derive(Debug)]
pub enum Step {
    Action(Action),
    /// Push the next source page ([`ReconcileJoin::push_source`]) or end the source.
    NeedSource,
    /// Push the next backup page or end the backup.
    NeedBackup,
    Done,
}

/// Streaming merge-join of the source's flat base-blob listing and the backup container's flat
/// listing, both with metadata and both in the order `order` (the order the service lists in).
///
/// Push-driven so the async I/O layer can feed pages as they arrive:
/// ```text
/// loop { match join.step() {
///     Step::Action(a) => handle(a),
///     Step::NeedSource => match source_pages.next().await { Some(p) => join.push_source(p?)?, None => join.end_source() },
///     Step::NeedBackup => match backup_pages.next().await { Some(p) => join.push_backup(p?)?, None => join.end_backup() },
///     Step::Done => break,
/// } }
/// ```
/// Out-of-order input (wrong [`NameOrder`], duplicates) is detected at the first adjacent pair
/// out of order, including across pages, and the push fails. Actions already emitted were paired
/// on a prefix that looked sorted: harmless for `NeedsBackup` (the worker is idempotent) and safe
/// for `Tombstone` because the caller confirms absence before writing (see [`Action::Tombstone`]).
#[derive(Debug)]
pub struct ReconcileJoin {
    order: NameOrder,
    source: SortedInput<BlobEntry>,
    backup: SortedInput<BlobEntry>,
}

impl ReconcileJoin {
    pub fn new(order: NameOrder) -> Self {
        ReconcileJoin {
            order,
            source: SortedInput::new("source"),
            backup: SortedInput::new("backup"),
        }
    }

    /// Adds a page of the source's base blobs (a listing without snapshots).
    pub fn push_source(&mut self, page: impl IntoIterator<Item = BlobEntry>) -> Result<(), JoinError> {
        let rows = base_rows("source", page)?;
        self.source.push(self.order, rows)
    }

    /// Adds a page of the backup container's base blobs (a listing without snapshots).
    pub fn push_backup(&mut self, page: impl IntoIterator<Item = BlobEntry>) -> Result<(), JoinError> {
        let rows = base_rows("backup", page)?;
        self.backup.push(self.order, rows)
    }

    pub fn end_source(&mut self) {
        self.source.end();
    }

    pub fn end_backup(&mut self) {
        self.backup.end();
    }

    /// Rows received so far: (source, backup). Blobs scanned, for the run report.
    pub fn scanned(&self) -> (u64, u64) {
        (self.source.pushed(), self.backup.pushed())
    }

    pub fn step(&mut self) -> Step {
        match join_step(self.order, &mut self.source, &mut self.backup) {
            JoinStep::Pair(s, b) => match classify(s, b) {
                Some(a) => Step::Action(a),
                None => unreachable!("join_step never yields an empty pair"),
            },
            JoinStep::NeedLeft => Step::NeedSource,
            JoinStep::NeedRight => Step::NeedBackup,
            JoinStep::Done => Step::Done,
        }
    }
}

fn base_rows(
    input: &'static str,
    page: impl IntoIterator<Item = BlobEntry>,
) -> Result<Vec<BlobEntry>, JoinError> {
    page.into_iter()
        .map(|e| match &e.snapshot {
            Some(s) => Err(JoinError::UnexpectedSnapshot {
                input,
                name: e.name.clone(),
                snapshot: s.clone(),
            }),
            None => Ok(e),
        })
        .collect()
}

/// Sync adapter over [`ReconcileJoin`] for in-memory or blocking listings: yields one action per
/// name, or the first error and then nothing.
pub fn merge_join<S, B>(order: NameOrder, source: S, backup: B) -> MergeJoin<S::IntoIter, B::IntoIter>
where
    S: IntoIterator<Item = BlobEntry>,
    B: IntoIterator<Item = BlobEntry>,
{
    MergeJoin {
        join: ReconcileJoin::new(order),
        source: source.into_iter(),
        backup: backup.into_iter(),
        failed: false,
    }
}

pub struct MergeJoin<S, B> {
    join: ReconcileJoin,
    source: S,
    backup: B,
    failed: bool,
}

impl<S, B> Iterator for MergeJoin<S, B>
where
    S: Iterator<Item = BlobEntry>,
    B: Iterator<Item = BlobEntry>,
{
    type Item = Result<Action, JoinError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        loop {
            let pushed = match self.join.step() {
                Step::Action(a) => return Some(Ok(a)),
                Step::Done => return None,
                Step::NeedSource => match self.source.next() {
                    Some(e) => self.join.push_source([e]),
                    None => {
                        self.join.end_source();
                        Ok(())
                    }
                },
                Step::NeedBackup => match self.backup.next() {
                    Some(e) => self.join.push_backup([e]),
                    None => {
                        self.join.end_backup();
                        Ok(())
                    }
                },
            };
            if let Err(e) = pushed {
                self.failed = true;
                return Some(Err(e));
            }
        }
    }
}

/// The source version a source snapshot holds: lakeguard's snapshots say so in metadata
/// (`lakeguard_source_etag`), snapshots made by anyone else carry their base blob's ETag.
pub fn snapshot_version_etag(snapshot: &BlobEntry) -> Etag {
    snapshot
        .meta(SOURCE_ETAG)
        .map(Etag::new)
        .unwrap_or_else(|| snapshot.etag.clone())
}

/// Why a new snapshot is needed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum SnapshotWhy {
    /// No snapshot holds the current version.
    NoSnapshot,
    /// A snapshot holds the current version but carries no pending marker (made by someone else,
    /// or by lakeguard before the request could be recorded) or only a stale one: the request it
    /// stood for may be lost (dropped, poisoned, expired), so a new one must be made.
    MarkerStale { snapshot: String },
}

/// What to do for one blob the join reported as [`Action::NeedsBackup`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotDecision {
    /// A snapshot of the current version carries a fresh `lakeguard_requested_at`: a request is
    /// already queued. Enqueueing again would multiply a backlog by every run.
    Pending {
        snapshot: String,
        requested_at: OffsetDateTime,
    },
    /// Create a snapshot conditional on `If-Match: if_match` with metadata
    /// `lakeguard_source_etag`, `lakeguard_source_last_modified` and a fresh
    /// `lakeguard_requested_at`, then enqueue a request naming that snapshot. A 412 means the
    /// blob changed since the listing: the next run (or the producer) handles the new version.
    ///
    /// An existing snapshot of the version is never re-enqueued as is: snapshots are immutable,
    /// so its marker cannot be refreshed, and without a fresh marker every later run would
    /// enqueue it again. One extra snapshot per TTL for a stuck blob is the bounded price.
    SnapshotAndEnqueue { if_match: Etag, why: SnapshotWhy },
}

/// Decides, from the blob's own snapshots, whether a request for `source`'s current version is
/// already pending. `snapshots` may contain any rows of a prefix listing with snapshots: only
/// snapshots of exactly `source.name` count, in any order. A marker counts as fresh when it lies
/// within `ttl` of `now` on either side (a marker from a clock slightly ahead still counts; one
/// absurdly far in the future does not suppress requests forever).
pub fn decide_snapshot(
    source: &BlobEntry,
    snapshots: &[BlobEntry],
    now: OffsetDateTime,
    ttl: Duration,
) -> SnapshotDecision {
    let mut stale: Option<&BlobEntry> = None;
    let mut fresh: Option<(&BlobEntry, OffsetDateTime)> = None;
    for snap in snapshots
        .iter()
        .filter(|s| s.name == source.name && s.snapshot.is_some())
        .filter(|s| snapshot_version_etag(s) == source.etag)
    {
        let marker = snap.meta(REQUESTED_AT).and_then(metadata::parse_time);
        match marker {
            Some(at) if (now - at).unsigned_abs() < ttl => {
                if fresh.is_none_or(|(_, best)| at > best) {
                    fresh = Some((snap, at));
                }
            }
            _ => {
                if stale.is_none_or(|s| snap.snapshot > s.snapshot) {
                    stale = Some(snap);
                }
            }
        }
    }
    match (fresh, stale) {
        (Some((snap, at)), _) => SnapshotDecision::Pending {
            snapshot: snap.snapshot.clone().unwrap_or_default(),
            requested_at: at,
        },
        (None, Some(snap)) => SnapshotDecision::SnapshotAndEnqueue {
            if_match: source.etag.clone(),
            why: SnapshotWhy::MarkerStale {
                snapshot: snap.snapshot.clone().unwrap_or_default(),
            },
        },
        (None, None) => SnapshotDecision::SnapshotAndEnqueue {
            if_match: source.etag.clone(),
            why: SnapshotWhy::NoSnapshot,
        },
    }
}

/// Counts for the run report. The I/O layer adds what only it knows (snapshots made, requests
/// enqueued, errors, elapsed); [`ReconcileTally::merge`] combines tallies of split runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileTally {
    pub source_scanned: u64,
    pub backup_scanned: u64,
    pub in_sync: u64,
    pub needs_backup: u64,
    pub missing: u64,
    pub changed: u64,
    pub recreated: u64,
    pub unmarked: u64,
    /// Of `needs_backup`: a fresh request was already pending.
    pub pending: u64,
    /// Of `needs_backup`: a snapshot + request is due.
    pub to_enqueue: u64,
    pub tombstones: u64,
    pub already_tombstoned: u64,
    pub placeholders: u64,
    /// Last-modified time of the oldest source change not yet in the backup (pending included).
    /// Deletions are not dated: the listing cannot tell when a blob disappeared.
    #[serde(with = "time::serde::rfc3339::option")]
    pub oldest_unbacked_change: Option<OffsetDateTime>,
}

impl ReconcileTally {
    pub fn record(&mut self, action: &Action) {
        match action {
            Action::InSync { .. } => self.in_sync += 1,
            Action::NeedsBackup { source, reason, .. } => {
                self.needs_backup += 1;
                match reason {
                    BackupReason::Missing => self.missing += 1,
                    BackupReason::Changed => self.changed += 1,
                    BackupReason::Recreated => self.recreated += 1,
                    BackupReason::Unmarked => self.unmarked += 1,
                }
                if self
                    .oldest_unbacked_change
                    .is_none_or(|t| source.last_modified < t)
                {
                    self.oldest_unbacked_change = Some(source.last_modified);
                }
            }
            Action::Tombstone { .. } => self.tombstones += 1,
            Action::AlreadyTombstoned { .. } => self.already_tombstoned += 1,
            Action::SkipPlaceholder { .. } => self.placeholders += 1,
        }
    }

    pub fn record_decision(&mut self, decision: &SnapshotDecision) {
        match decision {
            SnapshotDecision::Pending { .. } => self.pending += 1,
            SnapshotDecision::SnapshotAndEnqueue { .. } => self.to_enqueue += 1,
        }
    }

    /// Copies the row counts of a finished (or interrupted) join.
    pub fn record_scanned(&mut self, join: &ReconcileJoin) {
        (self.source_scanned, self.backup_scanned) = join.scanned();
    }

    /// RPO lag: how far behind the backup is, as the age of the oldest change it lacks. Zero
    /// when nothing is missing; never negative (a source clock ahead of ours counts as zero).
    pub fn rpo_lag(&self, now: OffsetDateTime) -> Duration {
        self.oldest_unbacked_change
            .map(|t| (now - t).try_into().unwrap_or(Duration::ZERO))
            .unwrap_or(Duration::ZERO)
    }

    pub fn merge(&mut self, o: &ReconcileTally) {
        self.source_scanned += o.source_scanned;
        self.backup_scanned += o.backup_scanned;
        self.in_sync += o.in_sync;
        self.needs_backup += o.needs_backup;
        self.missing += o.missing;
        self.changed += o.changed;
        self.recreated += o.recreated;
        self.unmarked += o.unmarked;
        self.pending += o.pending;
        self.to_enqueue += o.to_enqueue;
        self.tombstones += o.tombstones;
        self.already_tombstoned += o.already_tombstoned;
        self.placeholders += o.placeholders;
        self.oldest_unbacked_change = match (self.oldest_unbacked_change, o.oldest_unbacked_change) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}
