//! The time machine and restore planning (issue 5).
//!
//! A name's history is rebuilt from the rows that hold its versions: in the backup account the
//! base blob and its snapshots (before a backup blob is overwritten or tombstoned it is
//! snapshotted, so base + snapshots = every version received), or in the source account the base
//! blob and its snapshots. [`state_at`] answers "what was current at T" for one name, and
//! [`RestorePlanner`] joins those answers with the target container's listing into a plan.
//!
//! What can and cannot be proven. A row says: version `E` became current at
//! `lakeguard_source_last_modified` (L), was observed deleted at `lakeguard_deleted_at` (D), and
//! its content was copied (`lakeguard_backed_up_at` present). Nothing records a version's
//! predecessor, so versions the backup never received are invisible; the version current at T is
//! the latest one received with L <= T, as in every backup catalogue. What *is* provable and
//! therefore reported as unknown instead of guessed:
//! - a version that was current at T whose content the backup does not hold (a row with the
//!   version's metadata but no `lakeguard_backed_up_at`: a copy that never finished);
//! - a row that cannot be placed in time (no or unreadable `lakeguard_*` metadata): the name's
//!   history has a hole of unknown position, so no time is answered for that name;
//! - from source snapshots: a blob whose base is gone was deleted at an unknown time after its
//!   last snapshot.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::join::{join_step, JoinError, JoinStep, NameOrder, Named, SortedInput};
use super::reconcile::snapshot_version_etag;
use crate::model::metadata::{
    self, BACKED_UP_AT, DELETED_AT, RESTORED_FROM_ETAG, SOURCE_ETAG, SOURCE_LAST_MODIFIED,
};
use crate::model::{BlobEntry, Etag};

/// Where a version's content can be read: a blob (base or snapshot) of the backup account for
/// `history_from_backup`, of the source account for `history_from_source_snapshots`. Copy from it
/// with a source `If-Match: etag`, so that a base blob replaced since the listing is not copied
/// in place of the version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentRef {
    pub name: String,
    /// `None`: the base blob (mutable); a snapshot id otherwise (immutable, preferred).
    pub snapshot: Option<String>,
    pub etag: Etag,
}

/// One version of one name, as it was in the source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// The source ETag of the version: what a restored blob records as
    /// `lakeguard_restored_from_etag`, and what an untouched source blob still carries.
    pub source_etag: Etag,
    /// When the version became current in the source (its Last-Modified there).
    #[serde(with = "time::serde::rfc3339")]
    pub source_last_modified: OffsetDateTime,
    /// When the source was observed without this version's blob (tombstone); the real deletion
    /// happened at or before this time.
    #[serde(with = "time::serde::rfc3339::option")]
    pub deleted_at: Option<OffsetDateTime>,
    /// `None`: the version is known but its content is not held (see the module docs).
    pub content: Option<ContentRef>,
    pub content_length: u64,
    pub content_type: Option<String>,
    pub content_md5: Option<Vec<u8>>,
    /// The source's user metadata of the version (`lakeguard_*` keys removed).
    pub user_metadata: BTreeMap<String, String>,
}

/// A time range in which the history cannot tell what was current. Bounds are inclusive; `None`
/// is unbounded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnknownSpan {
    #[serde(with = "time::serde::rfc3339::option")]
    pub from: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub until: Option<OffsetDateTime>,
    pub why: String,
}

impl UnknownSpan {
    fn contains(&self, t: OffsetDateTime) -> bool {
        self.from.is_none_or(|f| f <= t) && self.until.is_none_or(|u| t <= u)
    }
}

/// Everything known about one name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    pub name: String,
    /// One per source ETag, ordered by `source_last_modified` (ties: in the order received).
    pub versions: Vec<Version>,
    pub unknown: Vec<UnknownSpan>,
}

/// One row's reading, before versions holding the same ETag are merged.
struct Observation {
    etag: Etag,
    became_current: OffsetDateTime,
    deleted_at: Option<OffsetDateTime>,
    has_content: bool,
    /// Order in which the backup received the states: snapshot time, the base blob last.
    received: (bool, Option<OffsetDateTime>),
    row: BlobEntry,
}

fn user_metadata(row: &BlobEntry) -> BTreeMap<String, String> {
    row.metadata
        .iter()
        .filter(|(k, _)| !metadata::is_lakeguard_key(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Merges observations of the same ETag into versions and orders them.
fn build_versions(name: &str, mut obs: Vec<Observation>) -> Vec<Version> {
    obs.sort_by(|a, b| a.received.cmp(&b.received));
    // ETag -> index of the version, keeping first-received order for ties of L.
    let mut index: BTreeMap<Etag, usize> = BTreeMap::new();
    let mut merged: Vec<(Version, usize, bool)> = Vec::new(); // (version, first received, content from snapshot)
    for (i, o) in obs.into_iter().enumerate() {
        let content = o.has_content.then(|| ContentRef {
            name: name.to_owned(),
            snapshot: o.row.snapshot.clone(),
            etag: o.row.etag.clone(),
        });
        match index.get(&o.etag) {
            None => {
                index.insert(o.etag.clone(), merged.len());
                let from_snapshot = o.row.snapshot.is_some();
                merged.push((
                    Version {
                        source_etag: o.etag,
                        source_last_modified: o.became_current,
                        deleted_at: o.deleted_at,
                        content,
                        content_length: o.row.content_length,
                        content_type: o.row.content_type.clone(),
                        content_md5: o.row.content_md5.clone(),
                        user_metadata: user_metadata(&o.row),
                    },
                    i,
                    from_snapshot,
                ));
            }
            Some(&k) => {
                let (v, _, from_snapshot) = &mut merged[k];
                v.source_last_modified = v.source_last_modified.min(o.became_current);
                // The latest state received decides: a tombstone followed by a live state of the
                // same ETag was a tombstone written in error, and is undone.
                v.deleted_at = o.deleted_at;
                // Prefer content in an immutable snapshot over the mutable base blob.
                if content.is_some() && (v.content.is_none() || !*from_snapshot) {
                    *from_snapshot = o.row.snapshot.is_some();
                    v.content = content;
                    v.content_length = o.row.content_length;
                    v.content_type = o.row.content_type.clone();
                    v.content_md5 = o.row.content_md5.clone();
                    v.user_metadata = user_metadata(&o.row);
                }
            }
        }
    }
    merged.sort_by(|a, b| (a.0.source_last_modified, a.1).cmp(&(b.0.source_last_modified, b.1)));
    merged.into_iter().map(|(v, _, _)| v).collect()
}

fn unplaced(row: &BlobEntry, what: &str) -> UnknownSpan {
    UnknownSpan {
        from: None,
        until: None,
        why: format!(
            "{} of {:?} {what}: a version of unknown time",
            row.snapshot
                .as_deref()
                .map_or_else(|| "base blob".to_owned(), |s| format!("snapshot {s}")),
            row.name
        ),
    }
}

/// Rebuilds the history of `name` from backup rows (base + snapshots, any order). Rows of other
/// names are ignored (exact comparison: `a.txt.bak` is not `a.txt`), as are directory placeholders.
pub fn history_from_backup(name: &str, rows: &[BlobEntry]) -> History {
    let mut obs = Vec::new();
    let mut unknown = Vec::new();
    for row in rows
        .iter()
        .filter(|r| r.name == name && !r.is_directory_placeholder())
    {
        let received = match &row.snapshot {
            None => (true, None),
            Some(id) => match metadata::parse_time(id) {
                Some(t) => (false, Some(t)),
                None => {
                    unknown.push(unplaced(row, "has an unreadable snapshot id"));
                    continue;
                }
            },
        };
        let Some(etag) = row.meta(SOURCE_ETAG).map(Etag::new) else {
            unknown.push(unplaced(row, "has no lakeguard_source_etag"));
            continue;
        };
        let Some(became_current) = row.meta(SOURCE_LAST_MODIFIED).and_then(metadata::parse_time)
        else {
            unknown.push(unplaced(row, "has no readable lakeguard_source_last_modified"));
            continue;
        };
        let deleted_at = match row.meta(DELETED_AT) {
            None => None,
            Some(v) => match metadata::parse_time(v) {
                Some(t) => Some(t),
                None => {
                    unknown.push(unplaced(row, "has an unreadable lakeguard_deleted_at"));
                    continue;
                }
            },
        };
        obs.push(Observation {
            etag,
            became_current,
            deleted_at,
            has_content: row.meta(BACKED_UP_AT).is_some(),
            received,
            row: row.clone(),
        });
    }
    History {
        name: name.to_owned(),
        versions: build_versions(name, obs),
        unknown,
    }
}

/// Rebuilds the history of `name` from the source account's own rows (base + snapshots, any
/// order): the fast `--from snapshots` mode. Snapshots made by lakeguard name their version in
/// metadata; others are read by their own ETag and Last-Modified (a snapshot keeps its base's).
/// Without a base blob the name was deleted at a time no row records: unknown after the last
/// snapshot's creation (the last moment it provably existed).
pub fn history_from_source_snapshots(name: &str, rows: &[BlobEntry]) -> History {
    let mut obs = Vec::new();
    let mut unknown = Vec::new();
    let mut has_base = false;
    let mut last_seen: Option<OffsetDateTime> = None;
    for row in rows
        .iter()
        .filter(|r| r.name == name && !r.is_directory_placeholder())
    {
        let received = match &row.snapshot {
            None => {
                has_base = true;
                (true, None)
            }
            Some(id) => match metadata::parse_time(id) {
                Some(t) => {
                    last_seen = last_seen.max(Some(t));
                    (false, Some(t))
                }
                None => {
                    unknown.push(unplaced(row, "has an unreadable snapshot id"));
                    continue;
                }
            },
        };
        let (etag, became_current) = if row.snapshot.is_some() {
            let lm = row
                .meta(SOURCE_LAST_MODIFIED)
                .and_then(metadata::parse_time)
                .unwrap_or(row.last_modified);
            (snapshot_version_etag(row), lm)
        } else {
            (row.etag.clone(), row.last_modified)
        };
        obs.push(Observation {
            etag,
            became_current,
            deleted_at: None,
            has_content: true,
            received,
            row: row.clone(),
        });
    }
    if !has_base && !obs.is_empty() {
        unknown.push(UnknownSpan {
            from: last_seen,
            until: None,
            why: format!("{name:?} was deleted from the source at an unknown time"),
        });
    }
    History {
        name: name.to_owned(),
        versions: build_versions(name, obs),
        unknown,
    }
}

/// The state of one name at one time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum AtT {
    Present { version: Version },
    Absent,
    /// The history cannot tell; never guessed.
    Unknown { why: String },
}

/// What was current at `t`: the latest version with `source_last_modified <= t` (a version
/// counts from the instant it became current), absent before the first version and from a
/// tombstone's `deleted_at` until the next version; unknown in an [`UnknownSpan`] or when the
/// current version's content is not held.
pub fn state_at(history: &History, t: OffsetDateTime) -> AtT {
    if let Some(span) = history.unknown.iter().find(|s| s.contains(t)) {
        return AtT::Unknown {
            why: span.why.clone(),
        };
    }
    let Some(v) = history
        .versions
        .iter()
        .rev()
        .find(|v| v.source_last_modified <= t)
    else {
        return AtT::Absent;
    };
    if v.deleted_at.is_some_and(|d| d <= t) {
        return AtT::Absent;
    }
    if v.content.is_none() {
        return AtT::Unknown {
            why: format!(
                "version {} of {:?} was current but its content is not in the backup (copy never completed)",
                v.source_etag, history.name
            ),
        };
    }
    AtT::Present { version: v.clone() }
}

/// One name's state at the restore point: the planner's left input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameState {
    pub name: String,
    pub state: AtT,
}

impl Named for NameState {
    fn name(&self) -> &str {
        &self.name
    }
}

/// Where the restore writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestoreTarget {
    /// The original container in the source account. Blobs that did not exist at T are deleted,
    /// and a target blob last modified at or before T provably held its version at T.
    InPlace,
    /// Another container or account: nothing there is ours to delete.
    Elsewhere,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanOptions {
    pub at: OffsetDateTime,
    pub target: RestoreTarget,
    /// Only names starting with this string (plain string prefix, not a directory: `a` selects
    /// `a`, `a.txt` and `a/b`).
    pub prefix: Option<String>,
    pub order: NameOrder,
}

/// One line of a restore plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum PlanItem {
    /// Copy `version.content` to `name`. `target_etag: Some` = overwrites that blob (write with
    /// `If-Match` on it; refused without --force); `None` = the blob is absent (write with
    /// `If-None-Match: *`).
    Restore {
        name: String,
        version: Version,
        target_etag: Option<Etag>,
    },
    /// In place only: the blob did not exist at T. Delete conditionally on `target_etag`.
    Delete { name: String, target_etag: Etag },
    /// The target already holds the version of T: its ETag is the version's source ETag, its
    /// `lakeguard_restored_from_etag` names it (a previous, possibly interrupted run restored
    /// it), or, in place, it was last modified at or before T. This is what makes a rerun finish
    /// the job and do nothing twice.
    Unchanged { name: String },
    /// Elsewhere only: the target holds a blob that did not exist at T; not ours to delete.
    LeftAlone { name: String, target_etag: Etag },
    /// The state at T cannot be established. The target blob (if any) is not touched.
    Unavailable {
        name: String,
        why: String,
        target_etag: Option<Etag>,
    },
}

impl PlanItem {
    pub fn name(&self) -> &str {
        match self {
            PlanItem::Restore { name, .. }
            | PlanItem::Delete { name, .. }
            | PlanItem::Unchanged { name }
            | PlanItem::LeftAlone { name, .. }
            | PlanItem::Unavailable { name, .. } => name,
        }
    }

    /// True for items that replace or remove an existing target blob (need --force).
    pub fn is_destructive(&self) -> bool {
        matches!(
            self,
            PlanItem::Restore {
                target_etag: Some(_),
                ..
            } | PlanItem::Delete { .. }
        )
    }
}

/// The per-name decision. `state` is `None` when the history source has no row for the name
/// (never existed as far as it knows: absent).
pub fn plan_name(
    opts: &PlanOptions,
    name: &str,
    state: Option<AtT>,
    target: Option<BlobEntry>,
) -> Option<PlanItem> {
    let name = name.to_owned();
    // Directory placeholders are not data: never deleted, never a reason to report anything.
    // One standing where a file must be restored is overwritten (and that write may fail).
    let target = target.filter(|t| !t.is_directory_placeholder() || matches!(state, Some(AtT::Present { .. })));
    let state = state.unwrap_or(AtT::Absent);
    let Some(t) = target else {
        return match state {
            AtT::Present { version } => Some(PlanItem::Restore {
                name,
                version,
                target_etag: None,
            }),
            AtT::Absent => None,
            AtT::Unknown { why } => Some(PlanItem::Unavailable {
                name,
                why,
                target_etag: None,
            }),
        };
    };
    // In place, a blob not modified since T already held this exact content at T, whatever the
    // backup knows (its Last-Modified would have moved with any write).
    let untouched_since_t = opts.target == RestoreTarget::InPlace
        && !t.is_directory_placeholder()
        && t.last_modified <= opts.at;
    if untouched_since_t {
        return Some(PlanItem::Unchanged { name });
    }
    Some(match state {
        AtT::Present { version } => {
            let restored_from = t.meta(RESTORED_FROM_ETAG).map(Etag::new);
            if t.etag == version.source_etag || restored_from.as_ref() == Some(&version.source_etag)
            {
                PlanItem::Unchanged { name }
            } else {
                PlanItem::Restore {
                    name,
                    version,
                    target_etag: Some(t.etag),
                }
            }
        }
        AtT::Absent => match opts.target {
            RestoreTarget::InPlace => PlanItem::Delete {
                name,
                target_etag: t.etag,
            },
            RestoreTarget::Elsewhere => PlanItem::LeftAlone {
                name,
                target_etag: t.etag,
            },
        },
        AtT::Unknown { why } => PlanItem::Unavailable {
            name,
            why,
            target_etag: Some(t.etag),
        },
    })
}

/// What [`RestorePlanner::step`] needs or produced.
#[derive(Debug)]
pub enum PlanStep {
    Item(PlanItem),
    /// Push the next states ([`RestorePlanner::push_states`]) or end them.
    NeedStates,
    /// Push the next page of the target listing or end it.
    NeedTarget,
    Done,
}

/// Streaming join of the names' states at T (one per name, in `opts.order`, e.g. built with
/// [`super::join::NameGroups`] + [`history_from_backup`] + [`state_at`]) with the target
/// container's flat base-blob listing (with metadata), in the same order. Push-driven like
/// [`super::reconcile::ReconcileJoin`]; memory bounded by what has been pushed and not consumed.
/// Rows outside `opts.prefix` are dropped on both sides.
#[derive(Debug)]
pub struct RestorePlanner {
    opts: PlanOptions,
    states: SortedInput<NameState>,
    target: SortedInput<BlobEntry>,
}

impl RestorePlanner {
    pub fn new(opts: PlanOptions) -> Self {
        RestorePlanner {
            opts,
            states: SortedInput::new("history"),
            target: SortedInput::new("target"),
        }
    }

    fn in_prefix(&self, name: &str) -> bool {
        self.opts
            .prefix
            .as_deref()
            .is_none_or(|p| name.starts_with(p))
    }

    pub fn push_states(&mut self, states: impl IntoIterator<Item = NameState>) -> Result<(), JoinError> {
        let rows: Vec<_> = states.into_iter().filter(|s| self.in_prefix(&s.name)).collect();
        self.states.push(self.opts.order, rows)
    }

    pub fn end_states(&mut self) {
        self.states.end();
    }

    /// Adds a page of the target's base blobs (a listing without snapshots).
    pub fn push_target(&mut self, page: impl IntoIterator<Item = BlobEntry>) -> Result<(), JoinError> {
        let mut rows = Vec::new();
        for e in page {
            if let Some(s) = &e.snapshot {
                return Err(JoinError::UnexpectedSnapshot {
                    input: "target",
                    name: e.name.clone(),
                    snapshot: s.clone(),
                });
            }
            if self.in_prefix(&e.name) {
                rows.push(e);
            }
        }
        self.target.push(self.opts.order, rows)
    }

    pub fn end_target(&mut self) {
        self.target.end();
    }

    pub fn step(&mut self) -> PlanStep {
        loop {
            match join_step(self.opts.order, &mut self.states, &mut self.target) {
                JoinStep::Pair(s, t) => {
                    let name = s
                        .as_ref()
                        .map(|s| s.name.clone())
                        .or_else(|| t.as_ref().map(|t| t.name.clone()))
                        .unwrap_or_default();
                    if let Some(item) = plan_name(&self.opts, &name, s.map(|s| s.state), t) {
                        return PlanStep::Item(item);
                    }
                }
                JoinStep::NeedLeft => return PlanStep::NeedStates,
                JoinStep::NeedRight => return PlanStep::NeedTarget,
                JoinStep::Done => return PlanStep::Done,
            }
        }
    }
}

/// Sync adapter over [`RestorePlanner`]: the plan for in-memory (or blocking) inputs, or the
/// first error.
pub fn plan_restore(
    opts: PlanOptions,
    states: impl IntoIterator<Item = NameState>,
    target: impl IntoIterator<Item = BlobEntry>,
) -> Result<Vec<PlanItem>, JoinError> {
    let mut planner = RestorePlanner::new(opts);
    let mut states = states.into_iter();
    let mut target = target.into_iter();
    let mut out = Vec::new();
    loop {
        match planner.step() {
            PlanStep::Item(i) => out.push(i),
            PlanStep::Done => return Ok(out),
            PlanStep::NeedStates => match states.next() {
                Some(s) => planner.push_states([s])?,
                None => planner.end_states(),
            },
            PlanStep::NeedTarget => match target.next() {
                Some(t) => planner.push_target([t])?,
                None => planner.end_target(),
            },
        }
    }
}

/// Counts per kind, for the table, `--output json` and the final report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanSummary {
    pub restore: u64,
    /// Of `restore`: items that overwrite an existing target blob.
    pub overwrite: u64,
    pub delete: u64,
    pub unchanged: u64,
    pub left_alone: u64,
    pub unavailable: u64,
    /// Bytes the restores will copy.
    pub restore_bytes: u64,
}

impl PlanSummary {
    pub fn record(&mut self, item: &PlanItem) {
        match item {
            PlanItem::Restore {
                version,
                target_etag,
                ..
            } => {
                self.restore += 1;
                self.restore_bytes += version.content_length;
                if target_etag.is_some() {
                    self.overwrite += 1;
                }
            }
            PlanItem::Delete { .. } => self.delete += 1,
            PlanItem::Unchanged { .. } => self.unchanged += 1,
            PlanItem::LeftAlone { .. } => self.left_alone += 1,
            PlanItem::Unavailable { .. } => self.unavailable += 1,
        }
    }

    /// Items that need --force: overwrites and deletes.
    pub fn destructive(&self) -> u64 {
        self.overwrite + self.delete
    }
}
