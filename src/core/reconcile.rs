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
use crate::model::metadata::{self, DELETED_AT, REQUESTED_AT, REQUEST_BATCH, SOURCE_ETAG};
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
    /// Hierarchical source: the backup holds this content version, but the path's security
    /// state (owner, group, permissions, ACL) differs from the one recorded, or none is: record
    /// it on the backup version without a copy (`ops::security::record`).
    SecurityChanged {
        source: BlobEntry,
        backup: BlobEntry,
    },
    /// Hierarchical source: a directory (with its access and default ACLs) that the backup does
    /// not hold as lakeguard's directory blob with this security state.
    BackupDirectory {
        source: BlobEntry,
        backup: Option<BlobEntry>,
    },
}

impl Action {
    pub fn name(&self) -> &str {
        match self {
            Action::InSync { name }
            | Action::AlreadyTombstoned { name }
            | Action::SkipPlaceholder { name } => name,
            Action::NeedsBackup { source, .. }
            | Action::SecurityChanged { source, .. }
            | Action::BackupDirectory { source, .. } => &source.name,
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
///
/// Hierarchical source (its rows carry a security state): a directory is data, backed up as
/// lakeguard's directory blob (zero length, `hdi_isfolder=true`, `lakeguard_directory=true`, its
/// security state); such a backup row is a backup like any other (tombstoned when the directory
/// goes); a file whose content the backup holds but whose security state differs from the
/// recorded one is [`Action::SecurityChanged`]. Flat sources: exactly as before.
pub fn classify(source: Option<BlobEntry>, backup: Option<BlobEntry>) -> Option<Action> {
    let name = source.as_ref().or(backup.as_ref())?.name.clone();
    let ours_dir = |b: &BlobEntry| b.meta(crate::model::security::DIRECTORY).is_some();
    if let Some(dir) = source
        .as_ref()
        .filter(|s| s.is_directory_placeholder() && s.security.is_some())
    {
        match &backup {
            Some(b)
                if ours_dir(b)
                    && b.meta(DELETED_AT).is_none()
                    && crate::model::Security::from_metadata(&b.metadata)
                        .is_some_and(|r| dir.security.as_ref().is_some_and(|s| s.same_as(&r))) =>
            {
                return Some(Action::InSync { name })
            }
            _ => {
                return Some(Action::BackupDirectory {
                    source: dir.clone(),
                    backup,
                })
            }
        }
    }
    let source = source.filter(|s| !s.is_directory_placeholder());
    let backup = backup.filter(|b| !b.is_directory_placeholder() || ours_dir(b));
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
                    Some(e) if Etag::new(e) == source.etag => {
                        let recorded = crate::model::Security::from_metadata(&backup.metadata);
                        return Some(match &source.security {
                            Some(s) if !recorded.is_some_and(|r| r.same_as(s)) => {
                                Action::SecurityChanged { source, backup }
                            }
                            _ => Action::InSync { name },
                        });
                    }
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
// Returned by value once per name and consumed at once: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
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
    pub fn push_source(
        &mut self,
        page: impl IntoIterator<Item = BlobEntry>,
    ) -> Result<(), JoinError> {
        let rows = base_rows("source", page)?;
        self.source.push(self.order, rows)
    }

    /// Adds a page of the backup container's base blobs (a listing without snapshots).
    pub fn push_backup(
        &mut self,
        page: impl IntoIterator<Item = BlobEntry>,
    ) -> Result<(), JoinError> {
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
pub fn merge_join<S, B>(
    order: NameOrder,
    source: S,
    backup: B,
) -> MergeJoin<S::IntoIter, B::IntoIter>
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
    /// The backup queue is empty, so no request can be pending whatever the snapshots say (the
    /// snapshots were not even listed).
    NothingQueued,
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

/// What is known of the batch a pending marker belongs to (`lakeguard_request_batch`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchRecord {
    /// Recorded: every request of the batch was queued (or its snapshot removed again).
    Complete,
    /// Recorded with snapshots whose enqueue failed and whose removal failed too: its markers
    /// vouch for nothing.
    Incomplete,
    /// No record (yet): the batch may still be enqueueing, or its producer was killed.
    Missing,
}

/// How long a marker whose batch has no record counts as pending: longer than any batch takes
/// to queue its requests (one listing page's snapshots), so a running producer is not asked
/// twice, and short enough that a producer killed between Snapshot Blob and Put Message costs
/// at most this plus one reconcile period.
pub const UNRECORDED_GRACE: Duration = Duration::from_secs(15 * 60);

/// The batches named by the pending markers among `snapshots` (the records a decision needs).
pub fn marker_batches(snapshots: &[BlobEntry]) -> Vec<String> {
    let mut ids: Vec<String> = snapshots
        .iter()
        .filter(|s| s.meta(REQUESTED_AT).is_some())
        .filter_map(|s| s.meta(REQUEST_BATCH).map(str::to_owned))
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// The time of `snap`'s pending marker if it is trusted at `now`: fresh (within `ttl` on either
/// side) and either recorded complete, or unrecorded and younger than [`UNRECORDED_GRACE`].
pub fn trusted_marker(
    snap: &BlobEntry,
    now: OffsetDateTime,
    ttl: Duration,
    records: &dyn Fn(&str) -> BatchRecord,
) -> Option<OffsetDateTime> {
    let at = snap.meta(REQUESTED_AT).and_then(metadata::parse_time)?;
    let age = (now - at).unsigned_abs();
    if age >= ttl {
        return None;
    }
    let record = snap
        .meta(REQUEST_BATCH)
        .map_or(BatchRecord::Missing, records);
    match record {
        BatchRecord::Complete => Some(at),
        BatchRecord::Incomplete => None,
        BatchRecord::Missing => (age < UNRECORDED_GRACE).then_some(at),
    }
}

/// Decides, from the blob's own snapshots, whether a request for `source`'s current version is
/// already pending (a trusted marker, see [`trusted_marker`]). `snapshots` may contain any rows of a prefix listing with snapshots: only
/// snapshots of exactly `source.name` count, in any order. A marker counts as fresh when it lies
/// within `ttl` of `now` on either side (a marker from a clock slightly ahead still counts; one
/// absurdly far in the future does not suppress requests forever).
pub fn decide_snapshot(
    source: &BlobEntry,
    snapshots: &[BlobEntry],
    now: OffsetDateTime,
    ttl: Duration,
    records: &dyn Fn(&str) -> BatchRecord,
) -> SnapshotDecision {
    if ttl.is_zero() {
        return SnapshotDecision::SnapshotAndEnqueue {
            if_match: source.etag.clone(),
            why: SnapshotWhy::NothingQueued,
        };
    }
    let mut stale: Option<&BlobEntry> = None;
    let mut fresh: Option<(&BlobEntry, OffsetDateTime)> = None;
    for snap in snapshots
        .iter()
        .filter(|s| s.name == source.name && s.snapshot.is_some())
        .filter(|s| snapshot_version_etag(s) == source.etag)
    {
        match trusted_marker(snap, now, ttl, records) {
            Some(at) => {
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
    /// Hierarchical source: files whose security state changed with the same content.
    #[serde(default)]
    pub security_changed: u64,
    /// Hierarchical source: directories to back up (new, or with a new security state).
    #[serde(default)]
    pub directories: u64,
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
            Action::SecurityChanged { .. } => self.security_changed += 1,
            Action::BackupDirectory { .. } => self.directories += 1,
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
        self.security_changed += o.security_changed;
        self.directories += o.directories;
        self.oldest_unbacked_change = match (self.oldest_unbacked_change, o.oldest_unbacked_change)
        {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::testutil::*;
    use crate::model::metadata::{HDI_ISFOLDER, SOURCE_LAST_MODIFIED};

    fn run(order: NameOrder, src: Vec<BlobEntry>, bk: Vec<BlobEntry>) -> Vec<Action> {
        merge_join(order, src, bk)
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn bk(name: &str, src_etag: &str) -> BlobEntry {
        backup_row(name, &format!("b-{src_etag}"), src_etag, 0)
    }

    #[test]
    fn every_case_once() {
        let src = vec![
            entry("changed", "s2", 5),
            placeholder("dir"),
            placeholder("dir-over-file"),
            entry("missing", "s1", 7),
            entry("recreated", "s9", 9),
            entry("same", "s1", 1),
            entry("unmarked", "s1", 3),
        ];
        let bkrows = vec![
            entry("changed", "b", 0),
            placeholder("dir"),
            bk("dir-over-file", "s0"),
            with_time(bk("gone", "s1"), DELETED_AT, 3),
            bk("live-gone", "s1"),
            with_time(bk("recreated", "s1"), DELETED_AT, 4),
            bk("same", "s1"),
            entry("unmarked", "b", 0),
        ];
        let bkrows: Vec<_> = bkrows
            .into_iter()
            .map(|e| {
                if e.name == "changed" {
                    with_meta(e, SOURCE_ETAG, "s1")
                } else {
                    e
                }
            })
            .collect();
        let got = run(NameOrder::Utf16Units, src, bkrows);
        let summary: Vec<String> = got
            .iter()
            .map(|a| match a {
                Action::InSync { name } => format!("{name}:in_sync"),
                Action::NeedsBackup { source, reason, .. } => format!("{}:{reason:?}", source.name),
                Action::Tombstone { backup } => format!("{}:tombstone", backup.name),
                Action::AlreadyTombstoned { name } => format!("{name}:already"),
                Action::SkipPlaceholder { name } => format!("{name}:placeholder"),
                other => format!("{}:hns", other.name()),
            })
            .collect();
        assert_eq!(
            summary,
            [
                "changed:Changed",
                "dir:placeholder",
                "dir-over-file:tombstone",
                "gone:already",
                "live-gone:tombstone",
                "missing:Missing",
                "recreated:Recreated",
                "same:in_sync",
                "unmarked:Unmarked",
            ]
        );
        let mut tally = ReconcileTally::default();
        got.iter().for_each(|a| tally.record(a));
        assert_eq!(tally.needs_backup, 4);
        assert_eq!(
            (
                tally.tombstones,
                tally.already_tombstoned,
                tally.placeholders
            ),
            (2, 1, 1)
        );
        // Oldest unbacked change: "unmarked" at 3 (changed 5, missing 7, recreated 9).
        assert_eq!(tally.oldest_unbacked_change, Some(ts(3)));
        assert_eq!(tally.rpo_lag(ts(63)), Duration::from_secs(60));
        assert_eq!(tally.rpo_lag(ts(0)), Duration::ZERO);
    }

    #[test]
    fn names_that_are_prefixes_are_distinct() {
        let src = vec![
            entry("a", "s1", 0),
            entry("a.txt", "s1", 0),
            entry("a/b", "s1", 0),
        ];
        let bkrows = vec![bk("a.txt", "s1"), bk("a.txt.bak", "s1"), bk("a/b", "s2")];
        let got = run(NameOrder::Utf16Units, src, bkrows);
        let names: Vec<_> = got.iter().map(|a| a.name().to_owned()).collect();
        assert_eq!(names, ["a", "a.txt", "a.txt.bak", "a/b"]);
        assert!(matches!(
            &got[0],
            Action::NeedsBackup {
                reason: BackupReason::Missing,
                ..
            }
        ));
        assert!(matches!(&got[1], Action::InSync { .. }));
        assert!(matches!(&got[2], Action::Tombstone { .. }));
        assert!(matches!(
            &got[3],
            Action::NeedsBackup {
                reason: BackupReason::Changed,
                ..
            }
        ));
    }

    #[test]
    fn out_of_order_across_pages_is_an_error() {
        let mut j = ReconcileJoin::new(NameOrder::Utf16Units);
        j.push_source([entry("a", "1", 0), entry("c", "1", 0)])
            .unwrap();
        let err = j.push_source([entry("b", "1", 0)]).unwrap_err();
        assert!(
            matches!(
                err,
                JoinError::OutOfOrder {
                    input: "source",
                    ..
                }
            ),
            "{err}"
        );
        // Duplicates are out of order too.
        let mut j = ReconcileJoin::new(NameOrder::Utf16Units);
        j.push_backup([entry("a", "1", 0)]).unwrap();
        assert!(j.push_backup([entry("a", "1", 0)]).is_err());
        // Astral vs high BMP: sorted for UTF-8, not for UTF-16.
        let utf8_sorted = vec![entry("\u{FF5E}", "1", 0), entry("\u{1F600}", "1", 0)];
        let r: Result<Vec<_>, _> =
            merge_join(NameOrder::Utf16Units, utf8_sorted.clone(), vec![]).collect();
        assert!(r.is_err());
        let r: Result<Vec<_>, _> = merge_join(NameOrder::Utf8Bytes, utf8_sorted, vec![]).collect();
        assert_eq!(r.unwrap().len(), 2);
    }

    #[test]
    fn snapshots_and_late_pages_are_refused() {
        let mut j = ReconcileJoin::new(NameOrder::Utf16Units);
        let err = j
            .push_source([snapshot(entry("a", "1", 0), 5)])
            .unwrap_err();
        assert!(matches!(err, JoinError::UnexpectedSnapshot { .. }));
        j.end_backup();
        assert_eq!(
            j.push_backup([entry("a", "1", 0)]),
            Err(JoinError::PushAfterEnd { input: "backup" })
        );
    }

    #[test]
    fn asks_for_a_page_only_when_its_queue_is_empty() {
        let mut j = ReconcileJoin::new(NameOrder::Utf16Units);
        assert!(matches!(j.step(), Step::NeedSource));
        j.push_source([entry("a", "1", 0), entry("b", "1", 0)])
            .unwrap();
        assert!(matches!(j.step(), Step::NeedBackup));
        j.push_backup([bk("a", "1")]).unwrap();
        assert!(matches!(j.step(), Step::Action(Action::InSync { .. })));
        // Backup queue empty again: "b" cannot be decided before the backup says more.
        assert!(matches!(j.step(), Step::NeedBackup));
        j.end_backup();
        assert!(matches!(j.step(), Step::Action(Action::NeedsBackup { .. })));
        assert!(matches!(j.step(), Step::NeedSource));
        j.end_source();
        assert!(matches!(j.step(), Step::Done));
        assert_eq!(j.scanned(), (2, 1));
    }

    fn lg_snap(name: &str, etag: &str, id: i64, requested: Option<i64>) -> BlobEntry {
        let e = snapshot(
            with_meta(entry(name, "snap-etag", 0), SOURCE_ETAG, etag),
            id,
        );
        let e = with_time(e, SOURCE_LAST_MODIFIED, 0);
        match requested {
            Some(r) => with_time(e, REQUESTED_AT, r),
            None => e,
        }
    }

    /// Issue 15, defect 5: a marker vouches for a queued request only once its batch recorded
    /// that every request was queued; an unrecorded one (a producer killed between Snapshot Blob
    /// and Put Message) only for the grace period, not for the whole TTL.
    #[test]
    fn markers_are_trusted_by_their_batch_record() {
        let src = entry("a", "cur", 0);
        let ttl = Duration::from_secs(6 * 3600);
        let now = ts(100_000);
        let marked = |age: i64, batch: Option<&str>| {
            let e = lg_snap("a", "cur", 100_000 - age, Some(100_000 - age));
            match batch {
                Some(b) => with_meta(e, REQUEST_BATCH, b),
                None => e,
            }
        };
        let pending = |snap: BlobEntry, record: BatchRecord| {
            matches!(
                decide_snapshot(&src, &[snap], now, ttl, &|_| record),
                SnapshotDecision::Pending { .. }
            )
        };
        let hour = 3600;
        // Recorded complete: trusted for the whole TTL.
        assert!(pending(marked(hour, Some("b1")), BatchRecord::Complete));
        // Unrecorded: only within the grace period (the batch may still be enqueueing).
        assert!(pending(marked(60, Some("b1")), BatchRecord::Missing));
        assert!(!pending(marked(hour, Some("b1")), BatchRecord::Missing));
        // Recorded with orphans: never.
        assert!(!pending(marked(60, Some("b1")), BatchRecord::Incomplete));
        // A marker without a batch (an older lakeguard) counts as unrecorded.
        assert!(pending(marked(60, None), BatchRecord::Complete));
        assert!(!pending(marked(hour, None), BatchRecord::Complete));
        // Stale beyond the TTL whatever the record says.
        assert!(!pending(
            marked(7 * hour, Some("b1")),
            BatchRecord::Complete
        ));
        assert_eq!(
            marker_batches(&[
                marked(1, Some("b2")),
                marked(2, Some("b1")),
                marked(3, Some("b2"))
            ]),
            ["b1", "b2"]
        );
    }

    #[test]
    fn snapshot_decisions() {
        let src = entry("a", "cur", 0);
        let ttl = Duration::from_secs(100);
        let now = ts(1000);
        let decide =
            |snaps: &[BlobEntry]| decide_snapshot(&src, snaps, now, ttl, &|_| BatchRecord::Missing);
        assert_eq!(
            decide(&[]),
            SnapshotDecision::SnapshotAndEnqueue {
                if_match: Etag::new("cur"),
                why: SnapshotWhy::NoSnapshot
            }
        );
        // Fresh marker on the current version: pending.
        let fresh = lg_snap("a", "cur", 950, Some(950));
        assert!(
            matches!(decide(std::slice::from_ref(&fresh)), SnapshotDecision::Pending { requested_at, .. } if requested_at == ts(950))
        );
        // Stale marker, or marker on another version, or another name's snapshot: not pending.
        let stale = lg_snap("a", "cur", 800, Some(800));
        assert!(matches!(
            decide(std::slice::from_ref(&stale)),
            SnapshotDecision::SnapshotAndEnqueue {
                why: SnapshotWhy::MarkerStale { .. },
                ..
            }
        ));
        assert!(matches!(
            decide(&[lg_snap("a", "old", 990, Some(990))]),
            SnapshotDecision::SnapshotAndEnqueue {
                why: SnapshotWhy::NoSnapshot,
                ..
            }
        ));
        assert!(matches!(
            decide(&[lg_snap("a.bak", "cur", 990, Some(990))]),
            SnapshotDecision::SnapshotAndEnqueue {
                why: SnapshotWhy::NoSnapshot,
                ..
            }
        ));
        // Any order: the fresh one wins over a stale one.
        assert!(matches!(
            decide(&[fresh.clone(), stale.clone()]),
            SnapshotDecision::Pending { .. }
        ));
        assert!(matches!(
            decide(&[stale, fresh]),
            SnapshotDecision::Pending { .. }
        ));
        // A snapshot made by someone else: its own ETag names the version, no marker.
        let foreign = snapshot(entry("a", "cur", 0), 990);
        assert!(matches!(
            decide(&[foreign]),
            SnapshotDecision::SnapshotAndEnqueue {
                why: SnapshotWhy::MarkerStale { .. },
                ..
            }
        ));
        // Unreadable or absurdly future markers do not suppress requests.
        let garbage = with_meta(lg_snap("a", "cur", 990, None), REQUESTED_AT, "yesterday");
        assert!(matches!(
            decide(&[garbage]),
            SnapshotDecision::SnapshotAndEnqueue { .. }
        ));
        assert!(matches!(
            decide(&[lg_snap("a", "cur", 990, Some(5000))]),
            SnapshotDecision::SnapshotAndEnqueue { .. }
        ));
        // Slightly ahead (clock skew) still counts.
        assert!(matches!(
            decide(&[lg_snap("a", "cur", 990, Some(1010))]),
            SnapshotDecision::Pending { .. }
        ));
        // The base row in a prefix listing is not a snapshot.
        assert!(matches!(
            decide(&[with_time(entry("a", "cur", 0), REQUESTED_AT, 999)]),
            SnapshotDecision::SnapshotAndEnqueue {
                why: SnapshotWhy::NoSnapshot,
                ..
            }
        ));
        // An empty queue: even a fresh marker stands for nothing (the backup was lost after
        // the copy), so the version is requested again.
        assert_eq!(
            decide_snapshot(
                &src,
                &[lg_snap("a", "cur", 950, Some(950))],
                now,
                Duration::ZERO,
                &|_| BatchRecord::Complete
            ),
            SnapshotDecision::SnapshotAndEnqueue {
                if_match: Etag::new("cur"),
                why: SnapshotWhy::NothingQueued
            }
        );
    }

    #[test]
    fn placeholder_case_insensitive_value() {
        let mut p = with_meta(entry("d", "1", 0), HDI_ISFOLDER, "True");
        p.content_length = 0;
        assert!(matches!(
            classify(Some(p), None),
            Some(Action::SkipPlaceholder { .. })
        ));
    }

    /// Issue 18: on a hierarchical source directories are data and security-only changes are
    /// actions; rows without a security state (flat source) classify exactly as before.
    #[test]
    fn hierarchical_source_directories_and_security() {
        use crate::model::security::{Security, DIRECTORY};
        let sec = |acl: &str| Security {
            owner: "o".into(),
            group: "g".into(),
            permissions: "rwxr-x---".into(),
            acl: acl.into(),
        };
        let t0 = time::macros::datetime!(2026-12-01 00:00 UTC);
        let mut dir = placeholder("d");
        dir.security = Some(sec("user::rwx,default:user::rwx"));
        let mut ours = placeholder("d");
        ours.metadata.insert(DIRECTORY.into(), "true".into());
        ours.metadata.insert(SOURCE_ETAG.into(), "\"0xD\"".into());
        sec("user::rwx,default:user::rwx").write_metadata(&mut ours.metadata, t0);
        let kind = |a: Option<Action>| match a.unwrap() {
            Action::InSync { .. } => "in_sync",
            Action::BackupDirectory { backup: None, .. } => "dir_new",
            Action::BackupDirectory {
                backup: Some(_), ..
            } => "dir_update",
            Action::SecurityChanged { .. } => "security",
            Action::Tombstone { .. } => "tombstone",
            Action::SkipPlaceholder { .. } => "skip",
            Action::NeedsBackup { .. } => "needs_backup",
            Action::AlreadyTombstoned { .. } => "already",
        };
        assert_eq!(kind(classify(Some(dir.clone()), None)), "dir_new");
        assert_eq!(
            kind(classify(Some(dir.clone()), Some(placeholder("d")))),
            "dir_update",
            "made by the backup account"
        );
        assert_eq!(
            kind(classify(Some(dir.clone()), Some(ours.clone()))),
            "in_sync"
        );
        let mut changed = dir.clone();
        changed.security = Some(sec("user::rwx"));
        assert_eq!(
            kind(classify(Some(changed), Some(ours.clone()))),
            "dir_update"
        );
        assert_eq!(
            kind(classify(None, Some(ours.clone()))),
            "tombstone",
            "our directory blob is a backup"
        );
        assert_eq!(kind(classify(None, Some(placeholder("d")))), "skip");
        // A file replaced by a directory (a HEAD of the path finds the directory, so no
        // tombstone): the directory is backed up over it, the file kept as a snapshot.
        let file_row = with_meta(entry("d", "0xB", 1), SOURCE_ETAG, "\"0xF\"");
        assert_eq!(
            kind(classify(Some(dir.clone()), Some(file_row))),
            "dir_update"
        );
        assert_eq!(
            kind(classify(Some(placeholder("d")), None)),
            "skip",
            "flat source: as before"
        );

        let mut file = entry("f", "0x1", 1);
        let backup = with_meta(entry("f", "0xB", 1), SOURCE_ETAG, "\"0x1\"");
        assert_eq!(
            kind(classify(Some(file.clone()), Some(backup.clone()))),
            "in_sync",
            "flat"
        );
        file.security = Some(sec("user::rw-"));
        assert_eq!(
            kind(classify(Some(file.clone()), Some(backup.clone()))),
            "security",
            "none recorded"
        );
        let mut recorded = backup.clone();
        sec("user::rw-").write_metadata(&mut recorded.metadata, t0);
        assert_eq!(
            kind(classify(Some(file.clone()), Some(recorded.clone()))),
            "in_sync"
        );
        file.security = Some(sec("user::rw-,user:x:r--"));
        assert_eq!(
            kind(classify(Some(file.clone()), Some(recorded))),
            "security"
        );
        file.etag = Etag::new("0x2");
        assert_eq!(kind(classify(Some(file), Some(backup))), "needs_backup");
    }

    #[test]
    fn tally_merge_and_serde() {
        let mut a = ReconcileTally {
            in_sync: 2,
            oldest_unbacked_change: Some(ts(5)),
            ..Default::default()
        };
        let b = ReconcileTally {
            in_sync: 1,
            oldest_unbacked_change: Some(ts(3)),
            ..Default::default()
        };
        a.merge(&b);
        assert_eq!((a.in_sync, a.oldest_unbacked_change), (3, Some(ts(3))));
        let json = serde_json::to_value(&a).unwrap();
        assert_eq!(json["in_sync"], 3);
        let back: ReconcileTally = serde_json::from_value(json).unwrap();
        assert_eq!(back, a);
    }
}

#[cfg(test)]
mod props {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::core::testutil::*;

    /// Pieces chosen so that names collide, are prefixes of each other, and hit every order
    /// difference: `/` vs `-`/`.`, a high BMP character vs an astral one.
    const PIECES: &[&str] = &[
        "a",
        "b",
        "/",
        ".",
        "-",
        "é",
        "\u{FF5E}",
        "\u{1F600}",
        "A",
        "\u{E000}",
    ];

    fn name() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(PIECES), 1..4).prop_map(|p| p.concat())
    }

    #[derive(Clone, Debug)]
    struct Src {
        etag: u8,
        placeholder: bool,
        lm: i64,
    }
    #[derive(Clone, Debug)]
    struct Bk {
        source_etag: Option<u8>,
        tombstoned: bool,
        placeholder: bool,
    }

    fn world() -> impl Strategy<Value = (BTreeMap<String, Src>, BTreeMap<String, Bk>)> {
        let src =
            (0u8..3, prop::bool::weighted(0.1), 0i64..1000).prop_map(|(etag, placeholder, lm)| {
                Src {
                    etag,
                    placeholder,
                    lm,
                }
            });
        let bk = (
            prop::option::weighted(0.9, 0u8..3),
            prop::bool::weighted(0.3),
            prop::bool::weighted(0.1),
        )
            .prop_map(|(source_etag, tombstoned, placeholder)| Bk {
                source_etag,
                tombstoned,
                placeholder,
            });
        prop::collection::vec((name(), prop::option::of(src), prop::option::of(bk)), 0..40)
            .prop_map(|rows| {
                let mut s = BTreeMap::new();
                let mut b = BTreeMap::new();
                for (n, src, bk) in rows {
                    if let Some(x) = src {
                        s.insert(n.clone(), x);
                    }
                    if let Some(x) = bk {
                        b.insert(n, x);
                    }
                }
                (s, b)
            })
    }

    fn rows(
        order: NameOrder,
        s: &BTreeMap<String, Src>,
        b: &BTreeMap<String, Bk>,
    ) -> (Vec<BlobEntry>, Vec<BlobEntry>) {
        let mut src: Vec<_> = s
            .iter()
            .map(|(n, x)| {
                let e = entry(n, &format!("s{}", x.etag), x.lm);
                if x.placeholder {
                    let mut p = with_meta(e, crate::model::metadata::HDI_ISFOLDER, "true");
                    p.content_length = 0;
                    p
                } else {
                    e
                }
            })
            .collect();
        let mut bk: Vec<_> = b
            .iter()
            .map(|(n, x)| {
                let mut e = entry(n, "backup", 0);
                if let Some(se) = x.source_etag {
                    e = with_meta(e, SOURCE_ETAG, &format!("s{se}"));
                }
                if x.tombstoned {
                    e = with_time(e, DELETED_AT, 1);
                }
                if x.placeholder {
                    e = with_meta(e, crate::model::metadata::HDI_ISFOLDER, "true");
                    e.content_length = 0;
                }
                e
            })
            .collect();
        order.sort_by_name(&mut src, |e| &e.name);
        order.sort_by_name(&mut bk, |e| &e.name);
        (src, bk)
    }

    /// The naive oracle: look every name up in the two maps.
    fn oracle(
        order: NameOrder,
        s: &BTreeMap<String, Src>,
        b: &BTreeMap<String, Bk>,
    ) -> Vec<String> {
        let mut names: Vec<&String> = s.keys().chain(b.keys()).collect();
        names.sort_by(|x, y| order.cmp(x, y));
        names.dedup();
        names
            .into_iter()
            .map(|n| {
                let src = s.get(n).filter(|x| !x.placeholder);
                let bk = b.get(n).filter(|x| !x.placeholder);
                let what = match (src, bk) {
                    (None, None) => "placeholder".to_owned(),
                    (Some(_), None) => "backup:Missing".to_owned(),
                    (None, Some(k)) if k.tombstoned => "already".to_owned(),
                    (None, Some(_)) => "tombstone".to_owned(),
                    (Some(_), Some(k)) if k.tombstoned => "backup:Recreated".to_owned(),
                    (
                        Some(_),
                        Some(Bk {
                            source_etag: None, ..
                        }),
                    ) => "backup:Unmarked".to_owned(),
                    (
                        Some(x),
                        Some(Bk {
                            source_etag: Some(e),
                            ..
                        }),
                    ) if *e == x.etag => "in_sync".to_owned(),
                    (Some(_), Some(_)) => "backup:Changed".to_owned(),
                };
                format!("{n}={what}")
            })
            .collect()
    }

    fn describe(a: &Action) -> String {
        let what = match a {
            Action::InSync { .. } => "in_sync".to_owned(),
            Action::NeedsBackup { reason, .. } => format!("backup:{reason:?}"),
            Action::Tombstone { .. } => "tombstone".to_owned(),
            Action::AlreadyTombstoned { .. } => "already".to_owned(),
            Action::SkipPlaceholder { .. } => "placeholder".to_owned(),
            Action::SecurityChanged { .. } => "security".to_owned(),
            Action::BackupDirectory { .. } => "directory".to_owned(),
        };
        format!("{}={what}", a.name())
    }

    fn order() -> impl Strategy<Value = NameOrder> {
        prop::sample::select(vec![
            NameOrder::Utf8Bytes,
            NameOrder::Utf16Units,
            NameOrder::Hierarchical,
        ])
    }

    /// Splits `rows` into pages at the given cut points.
    fn pages(rows: Vec<BlobEntry>, cuts: &[usize]) -> Vec<Vec<BlobEntry>> {
        let mut out = vec![Vec::new()];
        for (i, r) in rows.into_iter().enumerate() {
            if cuts.contains(&i) {
                out.push(Vec::new());
            }
            out.last_mut().unwrap().push(r);
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn join_equals_oracle_for_any_paging(
            (s, b) in world(),
            order in order(),
            cuts_s in prop::collection::vec(0usize..40, 0..6),
            cuts_b in prop::collection::vec(0usize..40, 0..6),
        ) {
            let (src, bk) = rows(order, &s, &b);
            let expected = oracle(order, &s, &b);
            // One row at a time.
            let got: Vec<String> = merge_join(order, src.clone(), bk.clone())
                .map(|a| describe(&a.unwrap()))
                .collect();
            prop_assert_eq!(&got, &expected);
            // Pages of any size, including empty ones.
            let mut sp = pages(src, &cuts_s).into_iter();
            let mut bp = pages(bk, &cuts_b).into_iter();
            let mut j = ReconcileJoin::new(order);
            let mut paged = Vec::new();
            loop {
                match j.step() {
                    Step::Action(a) => paged.push(describe(&a)),
                    Step::NeedSource => match sp.next() { Some(p) => j.push_source(p).unwrap(), None => j.end_source() },
                    Step::NeedBackup => match bp.next() { Some(p) => j.push_backup(p).unwrap(), None => j.end_backup() },
                    Step::Done => break,
                }
            }
            prop_assert_eq!(&paged, &expected);
            prop_assert_eq!(j.scanned(), (s.len() as u64, b.len() as u64));
        }

        #[test]
        fn pending_iff_a_fresh_marker_names_the_current_version(
            snaps in prop::collection::vec(
                (prop::sample::select(vec!["f", "f.bak", "f/g"]), 0u8..3, any::<bool>(), prop::option::of(0i64..400)),
                0..8,
            ),
        ) {
            let now = ts(1000);
            let ttl = Duration::from_secs(200);
            let source = entry("f", "s0", 0);
            let rows: Vec<BlobEntry> = snaps
                .iter()
                .enumerate()
                .map(|(i, (name, version, by_lakeguard, age))| {
                    let mut e = if *by_lakeguard {
                        with_meta(entry(name, "own", 0), SOURCE_ETAG, &format!("s{version}"))
                    } else {
                        entry(name, &format!("s{version}"), 0)
                    };
                    if let Some(age) = age {
                        e = with_time(e, REQUESTED_AT, 1000 - age);
                    }
                    snapshot(e, i as i64)
                })
                .collect();
            let fresh = snaps.iter().any(|(name, version, _, age)| {
                *name == "f" && *version == 0 && age.is_some_and(|a| a < 200)
            });
            match decide_snapshot(&source, &rows, now, ttl, &|_| BatchRecord::Missing) {
                SnapshotDecision::Pending { .. } => prop_assert!(fresh),
                SnapshotDecision::SnapshotAndEnqueue { if_match, .. } => {
                    prop_assert!(!fresh);
                    prop_assert_eq!(if_match, Etag::new("s0"));
                }
            }
        }

        #[test]
        fn wrong_order_is_detected_never_silently_joined(
            (s, b) in world(),
            listed in order(),
            assumed in order(),
        ) {
            let (src, bk) = rows(listed, &s, &b);
            let sorted_for = |v: &[BlobEntry]| v.windows(2).all(|w| assumed.cmp(&w[0].name, &w[1].name).is_lt());
            let consistent = sorted_for(&src) && sorted_for(&bk);
            let r: Result<Vec<Action>, JoinError> = merge_join(assumed, src, bk).collect();
            match r {
                Ok(actions) => {
                    prop_assert!(consistent);
                    let got: Vec<String> = actions.iter().map(describe).collect();
                    prop_assert_eq!(got, oracle(assumed, &s, &b));
                }
                Err(JoinError::OutOfOrder { .. }) => prop_assert!(!consistent),
                Err(e) => prop_assert!(false, "unexpected {}", e),
            }
        }
    }
}
