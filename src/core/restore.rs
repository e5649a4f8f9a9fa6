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
    obs.sort_by_key(|o| o.received);
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
    merged.sort_by_key(|m| (m.0.source_last_modified, m.1));
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
        let Some(became_current) = row
            .meta(SOURCE_LAST_MODIFIED)
            .and_then(metadata::parse_time)
        else {
            unknown.push(unplaced(
                row,
                "has no readable lakeguard_source_last_modified",
            ));
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
    Present {
        version: Version,
    },
    Absent,
    /// The history cannot tell; never guessed.
    Unknown {
        why: String,
    },
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

/// Which account's rows a history is built from (`--from backup|snapshots`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryFrom {
    #[default]
    Backup,
    SourceSnapshots,
}

/// One group from [`super::join::NameGroups`] (all rows of one name, any order) to the planner's
/// input: the name's state at `at`. `None` for an empty group.
pub fn name_state(from: HistoryFrom, group: &[BlobEntry], at: OffsetDateTime) -> Option<NameState> {
    let name = group.first()?.name.clone();
    let history = match from {
        HistoryFrom::Backup => history_from_backup(&name, group),
        HistoryFrom::SourceSnapshots => history_from_source_snapshots(&name, group),
    };
    Some(NameState {
        state: state_at(&history, at),
        name,
    })
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
    let target = target
        .filter(|t| !t.is_directory_placeholder() || matches!(state, Some(AtT::Present { .. })));
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
            // The marker survives metadata-preserving rewrites of the blob, so it only counts
            // when length and (where both are known) MD5 agree with the version too.
            let restored_here = t.meta(RESTORED_FROM_ETAG).map(Etag::new).as_ref()
                == Some(&version.source_etag)
                && t.content_length == version.content_length
                && match (&t.content_md5, &version.content_md5) {
                    (Some(a), Some(b)) => a == b,
                    _ => true,
                };
            if t.etag == version.source_etag || restored_here {
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
// Returned by value once per name and consumed at once: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
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

    pub fn push_states(
        &mut self,
        states: impl IntoIterator<Item = NameState>,
    ) -> Result<(), JoinError> {
        let rows: Vec<_> = states
            .into_iter()
            .filter(|s| self.in_prefix(&s.name))
            .collect();
        self.states.push(self.opts.order, rows)
    }

    pub fn end_states(&mut self) {
        self.states.end();
    }

    /// Adds a page of the target's base blobs (a listing without snapshots).
    pub fn push_target(
        &mut self,
        page: impl IntoIterator<Item = BlobEntry>,
    ) -> Result<(), JoinError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::testutil::*;
    use crate::core::NameGroups;
    use crate::model::metadata::HDI_ISFOLDER;

    /// Backup rows of "a.txt" for: v1 at 10, overwritten by v2 at 20, deleted (observed) at 30,
    /// re-created as v3 at 40. Snapshot ids are the times the backup kept each state.
    fn overwrite_delete_recreate() -> Vec<BlobEntry> {
        vec![
            // v1 kept when v2 arrived.
            snapshot(backup_row("a.txt", "b1", "v1", 10), 21),
            // v2 kept before the tombstone was written.
            snapshot(backup_row("a.txt", "b2", "v2", 20), 31),
            // the tombstoned state of v2, kept when v3 arrived.
            snapshot(
                with_time(backup_row("a.txt", "b2t", "v2", 20), DELETED_AT, 30),
                41,
            ),
            // the base: v3.
            backup_row("a.txt", "b3", "v3", 40),
            // a name that is a prefix-extension must not leak in.
            backup_row("a.txt.bak", "x", "other", 15),
        ]
    }

    fn etag_at(h: &History, t: i64) -> String {
        match state_at(h, ts(t)) {
            AtT::Present { version } => version.source_etag.as_str().to_owned(),
            AtT::Absent => "absent".into(),
            AtT::Unknown { .. } => "unknown".into(),
        }
    }

    #[test]
    fn history_with_overwrite_delete_recreate() {
        let h = history_from_backup("a.txt", &overwrite_delete_recreate());
        assert!(h.unknown.is_empty());
        let etags: Vec<_> = h.versions.iter().map(|v| v.source_etag.as_str()).collect();
        assert_eq!(etags, ["v1", "v2", "v3"]);
        assert_eq!(h.versions[1].deleted_at, Some(ts(30)));
        assert_eq!(h.versions[2].deleted_at, None);
        // Content comes from immutable snapshots where there is one.
        assert_eq!(
            h.versions[1].content.as_ref().unwrap().snapshot,
            Some(snap_id(31))
        );
        assert_eq!(h.versions[2].content.as_ref().unwrap().snapshot, None);
        for (t, want) in [
            (9, "absent"), // before the first version
            (10, "v1"),    // exactly at a version's time
            (15, "v1"),    // between versions
            (20, "v2"),
            (29, "v2"),
            (30, "absent"), // exactly at the tombstone
            (35, "absent"), // after the delete
            (40, "v3"),     // re-created
            (1000, "v3"),
        ] {
            assert_eq!(etag_at(&h, t), want, "t={t}");
        }
    }

    #[test]
    fn history_ignores_row_order() {
        let mut rows = overwrite_delete_recreate();
        let h = history_from_backup("a.txt", &rows);
        rows.reverse();
        assert_eq!(history_from_backup("a.txt", &rows), h);
        rows.swap(0, 2);
        assert_eq!(history_from_backup("a.txt", &rows), h);
    }

    #[test]
    fn names_are_exact() {
        let h = history_from_backup("a.txt.bak", &overwrite_delete_recreate());
        assert_eq!(h.versions.len(), 1);
        assert_eq!(h.versions[0].source_etag, Etag::new("other"));
        assert!(history_from_backup("a", &overwrite_delete_recreate())
            .versions
            .is_empty());
        assert_eq!(
            etag_at(&history_from_backup("a", &overwrite_delete_recreate()), 100),
            "absent"
        );
    }

    #[test]
    fn tombstoned_base_alone_still_holds_its_content() {
        // The tombstone's pre-tombstone snapshot was lost: the tombstoned base still has the bytes.
        let rows = vec![with_time(backup_row("f", "bt", "v1", 10), DELETED_AT, 20)];
        let h = history_from_backup("f", &rows);
        assert_eq!(etag_at(&h, 15), "v1");
        assert_eq!(etag_at(&h, 20), "absent");
        assert_eq!(
            h.versions[0].content.as_ref().unwrap().etag,
            Etag::new("bt")
        );
    }

    #[test]
    fn a_tombstone_undone_later_does_not_count() {
        // Tombstoned in error (the blob was there all along), then backed up again unchanged.
        let rows = vec![
            snapshot(
                with_time(backup_row("f", "bt", "v1", 10), DELETED_AT, 20),
                25,
            ),
            backup_row("f", "b1", "v1", 10),
        ];
        let h = history_from_backup("f", &rows);
        assert_eq!(h.versions.len(), 1);
        assert_eq!(etag_at(&h, 22), "v1");
    }

    #[test]
    fn content_not_held_is_unknown_not_guessed() {
        // v2's copy never completed: metadata but no lakeguard_backed_up_at.
        let mut v2 = backup_row("f", "b2", "v2", 20);
        v2.metadata.remove(BACKED_UP_AT);
        let rows = vec![snapshot(backup_row("f", "b1", "v1", 10), 21), v2];
        let h = history_from_backup("f", &rows);
        assert_eq!(etag_at(&h, 15), "v1");
        assert_eq!(etag_at(&h, 25), "unknown");
    }

    #[test]
    fn unplaceable_rows_make_the_name_unknown() {
        let rows = vec![
            backup_row("f", "b1", "v1", 10),
            snapshot(entry("f", "foreign", 5), 7),
        ];
        let h = history_from_backup("f", &rows);
        assert_eq!(h.unknown.len(), 1);
        assert_eq!(etag_at(&h, 15), "unknown");
        assert_eq!(etag_at(&h, 1), "unknown");
        let bad_time = with_meta(backup_row("g", "b1", "v1", 10), DELETED_AT, "soon");
        assert_eq!(
            etag_at(&history_from_backup("g", &[bad_time]), 15),
            "unknown"
        );
        // Directory placeholders are not versions.
        let h = history_from_backup("d", &[crate::core::testutil::placeholder("d")]);
        assert_eq!(
            h,
            History {
                name: "d".into(),
                ..Default::default()
            }
        );
    }

    #[test]
    fn equal_times_keep_the_order_received() {
        // Two writes within one second: same Last-Modified; the later-received one is current.
        let rows = vec![
            snapshot(backup_row("f", "b1", "v1", 10), 11),
            backup_row("f", "b2", "v2", 10),
        ];
        assert_eq!(etag_at(&history_from_backup("f", &rows), 10), "v2");
    }

    #[test]
    fn user_metadata_is_kept_without_lakeguard_keys() {
        let rows = vec![with_meta(backup_row("f", "b1", "v1", 10), "owner", "me")];
        let v = &history_from_backup("f", &rows).versions[0];
        assert_eq!(v.user_metadata.len(), 1);
        assert_eq!(v.user_metadata["owner"], "me");
    }

    #[test]
    fn history_from_source_snapshots_modes() {
        let lg = snapshot(
            with_time(
                with_meta(entry("f", "snap-own", 99), SOURCE_ETAG, "v1"),
                SOURCE_LAST_MODIFIED,
                10,
            ),
            12,
        );
        let foreign = snapshot(entry("f", "v2", 20), 22);
        let base = entry("f", "v3", 30);
        let rows = vec![
            base.clone(),
            foreign.clone(),
            lg.clone(),
            entry("f.bak", "zz", 1),
        ];
        let h = history_from_source_snapshots("f", &rows);
        let etags: Vec<_> = h.versions.iter().map(|v| v.source_etag.as_str()).collect();
        assert_eq!(etags, ["v1", "v2", "v3"]);
        assert_eq!(
            (
                etag_at(&h, 5),
                etag_at(&h, 11),
                etag_at(&h, 25),
                etag_at(&h, 31)
            ),
            ("absent".into(), "v1".into(), "v2".into(), "v3".into())
        );
        assert_eq!(h.versions[2].content.as_ref().unwrap().snapshot, None);
        // A snapshot of the current version is preferred to the live base as content.
        let same = snapshot(entry("f", "v3", 30), 35);
        let h = history_from_source_snapshots("f", &[base, same]);
        assert_eq!(h.versions.len(), 1);
        assert_eq!(
            h.versions[0].content.as_ref().unwrap().snapshot,
            Some(snap_id(35))
        );
        // Base gone: deleted at an unknown time after the last snapshot.
        let h = history_from_source_snapshots("f", &[foreign, lg]);
        assert_eq!(etag_at(&h, 21), "v2");
        assert_eq!(etag_at(&h, 22), "unknown");
        assert_eq!(etag_at(&h, 100), "unknown");
    }

    fn opts(target: RestoreTarget, at: i64) -> PlanOptions {
        PlanOptions {
            at: ts(at),
            target,
            prefix: None,
            order: NameOrder::Utf16Units,
        }
    }

    fn present(name: &str, etag: &str, lm: i64) -> NameState {
        let h = history_from_backup(name, &[backup_row(name, "b", etag, lm)]);
        NameState {
            name: name.into(),
            state: state_at(&h, ts(lm)),
        }
    }

    fn short(items: &[PlanItem]) -> Vec<String> {
        items
            .iter()
            .map(|i| match i {
                PlanItem::Restore {
                    name,
                    target_etag: None,
                    ..
                } => format!("{name}:restore"),
                PlanItem::Restore {
                    name,
                    target_etag: Some(_),
                    ..
                } => format!("{name}:overwrite"),
                PlanItem::Delete { name, .. } => format!("{name}:delete"),
                PlanItem::Unchanged { name } => format!("{name}:unchanged"),
                PlanItem::LeftAlone { name, .. } => format!("{name}:left_alone"),
                PlanItem::Unavailable { name, .. } => format!("{name}:unavailable"),
            })
            .collect()
    }

    #[test]
    fn plan_in_place_and_elsewhere() {
        let states = vec![
            present("keep", "k1", 10),
            present("new", "n1", 10),
            NameState {
                name: "old".into(),
                state: AtT::Absent,
            },
            present("over", "o1", 10),
            present("restored", "r1", 10),
            NameState {
                name: "unk".into(),
                state: AtT::Unknown { why: "gap".into() },
            },
            NameState {
                name: "unk-untouched".into(),
                state: AtT::Unknown { why: "gap".into() },
            },
        ];
        let target = vec![
            entry("created-after", "c", 60),
            entry("keep", "k1", 60),
            entry("old", "x", 70),
            entry("over", "o2", 70),
            with_meta(entry("restored", "r9", 80), RESTORED_FROM_ETAG, "\"r1\""),
            entry("unk", "u", 70),
            entry("unk-untouched", "u", 40),
        ];
        let in_place = plan_restore(
            opts(RestoreTarget::InPlace, 50),
            states.clone(),
            target.clone(),
        )
        .unwrap();
        assert_eq!(
            short(&in_place),
            [
                "created-after:delete",
                "keep:unchanged",
                "new:restore",
                "old:delete",
                "over:overwrite",
                "restored:unchanged",
                "unk:unavailable",
                "unk-untouched:unchanged",
            ]
        );
        let elsewhere = plan_restore(opts(RestoreTarget::Elsewhere, 50), states, target).unwrap();
        assert_eq!(
            short(&elsewhere),
            [
                "created-after:left_alone",
                "keep:unchanged",
                "new:restore",
                "old:left_alone",
                "over:overwrite",
                "restored:unchanged",
                "unk:unavailable",
                "unk-untouched:unavailable",
            ]
        );
        let mut s = PlanSummary::default();
        in_place.iter().for_each(|i| s.record(i));
        assert_eq!(
            (
                s.restore,
                s.overwrite,
                s.delete,
                s.unchanged,
                s.unavailable,
                s.restore_bytes
            ),
            (2, 1, 2, 3, 1, 20)
        );
        assert_eq!(s.destructive(), 3);
        assert!(in_place.iter().filter(|i| i.is_destructive()).count() == 3);
        let json = serde_json::to_value(&in_place[4]).unwrap();
        assert_eq!(json["kind"], "restore");
        assert_eq!(json["target_etag"], "\"o2\"");
        assert_eq!(serde_json::to_value(&s).unwrap()["delete"], 2);
    }

    #[test]
    fn plan_into_an_empty_container_restores_everything_present() {
        let states = vec![
            present("a", "1", 1),
            NameState {
                name: "b".into(),
                state: AtT::Absent,
            },
            present("c", "3", 1),
        ];
        let plan = plan_restore(opts(RestoreTarget::Elsewhere, 5), states, vec![]).unwrap();
        assert_eq!(short(&plan), ["a:restore", "c:restore"]);
        assert!(plan.iter().all(|i| !i.is_destructive()));
    }

    #[test]
    fn prefix_is_a_plain_string_prefix() {
        let states = vec![
            present("a", "1", 1),
            present("a.txt", "1", 1),
            present("a/b", "1", 1),
            present("b", "1", 1),
        ];
        let target = vec![
            entry("a-x", "z", 9),
            entry("ab", "z", 9),
            entry("b/c", "z", 9),
        ];
        let o = PlanOptions {
            prefix: Some("a".into()),
            ..opts(RestoreTarget::InPlace, 5)
        };
        let plan = plan_restore(o, states.clone(), target.clone()).unwrap();
        assert_eq!(
            short(&plan),
            [
                "a:restore",
                "a-x:delete",
                "a.txt:restore",
                "a/b:restore",
                "ab:delete"
            ]
        );
        let o = PlanOptions {
            prefix: Some("a/".into()),
            ..opts(RestoreTarget::InPlace, 5)
        };
        assert_eq!(
            short(&plan_restore(o, states, target).unwrap()),
            ["a/b:restore"]
        );
    }

    #[test]
    fn placeholders_in_the_target() {
        let mut dir = with_meta(entry("d", "dir", 70), HDI_ISFOLDER, "true");
        dir.content_length = 0;
        // Not data: never deleted.
        let plan =
            plan_restore(opts(RestoreTarget::InPlace, 50), vec![], vec![dir.clone()]).unwrap();
        assert!(plan.is_empty());
        // A file of that name at T: overwrite (the I/O layer may fail on a real directory).
        let plan = plan_restore(
            opts(RestoreTarget::InPlace, 50),
            vec![present("d", "f1", 10)],
            vec![dir],
        )
        .unwrap();
        assert_eq!(short(&plan), ["d:overwrite"]);
    }

    #[test]
    fn planner_refuses_disorder_and_snapshots() {
        let r = plan_restore(
            opts(RestoreTarget::InPlace, 5),
            vec![present("b", "1", 1), present("a", "1", 1)],
            vec![],
        );
        assert!(matches!(
            r,
            Err(JoinError::OutOfOrder {
                input: "history",
                ..
            })
        ));
        let r = plan_restore(
            opts(RestoreTarget::InPlace, 5),
            vec![],
            vec![snapshot(entry("a", "1", 1), 3)],
        );
        assert!(matches!(
            r,
            Err(JoinError::UnexpectedSnapshot {
                input: "target",
                ..
            })
        ));
    }

    #[test]
    fn rerun_after_a_partial_restore_does_nothing_twice() {
        // Elsewhere: first run restored "a" (target records restored_from), was killed before "b".
        let states = vec![present("a", "va", 1), present("b", "vb", 1)];
        let target = vec![with_meta(
            entry("a", "new-etag", 90),
            RESTORED_FROM_ETAG,
            "va",
        )];
        let plan = plan_restore(opts(RestoreTarget::Elsewhere, 5), states.clone(), target).unwrap();
        assert_eq!(short(&plan), ["a:unchanged", "b:restore"]);
        // The marker kept by a metadata-preserving rewrite with other content does not count.
        let mut rewritten = with_meta(entry("a", "newer", 95), RESTORED_FROM_ETAG, "va");
        rewritten.content_length = 11;
        let plan = plan_restore(
            opts(RestoreTarget::Elsewhere, 5),
            states.clone(),
            [rewritten.clone()],
        )
        .unwrap();
        assert_eq!(short(&plan), ["a:overwrite", "b:restore"]);
        rewritten.content_length = 10;
        rewritten.content_md5 = Some(vec![1; 16]);
        let mut states = states;
        if let AtT::Present { version } = &mut states[0].state {
            version.content_md5 = Some(vec![2; 16]);
        }
        let plan = plan_restore(opts(RestoreTarget::Elsewhere, 5), states, [rewritten]).unwrap();
        assert_eq!(short(&plan), ["a:overwrite", "b:restore"]);
    }

    #[test]
    fn grouping_across_pages_feeds_the_histories() {
        let mut rows = overwrite_delete_recreate();
        rows.insert(0, backup_row("a", "q", "va", 1));
        let mut g = NameGroups::new(NameOrder::Utf16Units, "backup");
        g.push(rows[..2].to_vec()).unwrap();
        assert_eq!(g.pop().map(|v| v.len()), Some(1)); // "a" complete once "a.txt" started
        assert_eq!(g.pop(), None); // "a.txt" may continue on the next page
        g.push(rows[2..].to_vec()).unwrap();
        let a_txt = g.pop().unwrap();
        assert_eq!(history_from_backup("a.txt", &a_txt).versions.len(), 3);
        g.end();
        assert_eq!(g.pop().unwrap()[0].name, "a.txt.bak");
        assert!(g.is_finished());
        assert_eq!(
            name_state(HistoryFrom::Backup, &a_txt, ts(35)).map(|s| s.state),
            Some(AtT::Absent)
        );
        assert_eq!(name_state(HistoryFrom::Backup, &[], ts(35)), None);
        // A name seen again after another one: the listing is not in the declared order.
        let mut g = NameGroups::new(NameOrder::Utf16Units, "backup");
        assert!(g
            .push([entry("a", "1", 0), entry("b", "1", 0), entry("a", "2", 0)])
            .is_err());
    }
}

#[cfg(test)]
mod props {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::core::testutil::*;

    /// A simulated life of one blob: (seconds since the previous event, write or delete).
    fn events() -> impl Strategy<Value = Vec<(i64, bool)>> {
        prop::collection::vec((1i64..5, prop::bool::weighted(0.7)), 0..12)
    }

    fn shuffle<T>(v: &mut [T], mut seed: u64) {
        for i in (1..v.len()).rev() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            v.swap(i, (seed % (i as u64 + 1)) as usize);
        }
    }

    /// Runs the events against a model of the source and of the backup protocol (snapshot the
    /// backup base before every overwrite or tombstone). Returns the backup rows, the source rows
    /// (base + one lakeguard snapshot per version, as the producer makes them) and the truth.
    #[allow(clippy::type_complexity)]
    fn simulate(
        name: &str,
        evs: &[(i64, bool)],
    ) -> (Vec<BlobEntry>, Vec<BlobEntry>, Vec<(i64, Option<String>)>) {
        let mut base: Option<BlobEntry> = None;
        let mut rows = Vec::new();
        let mut src_snaps = Vec::new();
        let mut src_base: Option<BlobEntry> = None;
        let mut truth: Vec<(i64, Option<String>)> = Vec::new();
        let mut t = 0;
        for (n, &(gap, write)) in evs.iter().enumerate() {
            t += gap;
            let present = truth.last().is_some_and(|(_, s)| s.is_some());
            if write {
                let v = format!("v{t}");
                if let Some(b) = &base {
                    rows.push(snapshot(b.clone(), t));
                }
                base = Some(backup_row(name, &format!("b{n}"), &v, t));
                let live = entry(name, &v, t);
                src_snaps.push(snapshot(
                    with_time(
                        with_meta(entry(name, &format!("s{n}"), t), SOURCE_ETAG, &v),
                        SOURCE_LAST_MODIFIED,
                        t,
                    ),
                    t,
                ));
                src_base = Some(live);
                truth.push((t, Some(v)));
            } else if present {
                let b = base.take().expect("a present blob has been backed up");
                rows.push(snapshot(b.clone(), t));
                let mut tomb = with_time(b, DELETED_AT, t);
                tomb.etag = Etag::new(format!("b{n}t"));
                base = Some(tomb);
                truth.push((t, None));
            }
        }
        rows.extend(base);
        src_snaps.extend(src_base);
        (rows, src_snaps, truth)
    }

    fn truth_at(truth: &[(i64, Option<String>)], t: i64) -> String {
        truth
            .iter()
            .rev()
            .find(|(at, _)| *at <= t)
            .and_then(|(_, s)| s.clone())
            .unwrap_or_else(|| "absent".into())
    }

    fn answer(h: &History, t: i64) -> String {
        match state_at(h, ts(t)) {
            AtT::Present { version } => {
                assert!(version.content.is_some());
                version.source_etag.as_str().to_owned()
            }
            AtT::Absent => "absent".into(),
            AtT::Unknown { why } => format!("unknown: {why}"),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn backup_history_answers_the_truth_at_every_time(evs in events(), seed in any::<u64>()) {
            let (mut rows, _, truth) = simulate("d/f", &evs);
            // Rows of neighbouring names, in any order: never mixed in.
            rows.push(backup_row("d/f.bak", "x", "v1", 1));
            rows.push(backup_row("d", "y", "v2", 2));
            shuffle(&mut rows, seed | 1);
            let h = history_from_backup("d/f", &rows);
            prop_assert!(h.unknown.is_empty());
            let end = truth.last().map_or(0, |(t, _)| *t);
            for t in -1..=end + 2 {
                prop_assert_eq!(answer(&h, t), truth_at(&truth, t), "t={}", t);
            }
        }

        #[test]
        fn source_snapshot_history_answers_the_truth_while_the_blob_lives(
            gaps in prop::collection::vec(1i64..5, 0..10), seed in any::<u64>(),
        ) {
            let evs: Vec<(i64, bool)> = gaps.into_iter().map(|g| (g, true)).collect();
            let (_, mut rows, truth) = simulate("f", &evs);
            shuffle(&mut rows, seed | 1);
            let h = history_from_source_snapshots("f", &rows);
            let end = truth.last().map_or(0, |(t, _)| *t);
            for t in -1..=end + 2 {
                prop_assert_eq!(answer(&h, t), truth_at(&truth, t), "t={}", t);
            }
        }
    }

    const PIECES: &[&str] = &["a", "b", "/", ".", "é", "\u{FF5E}", "\u{1F600}"];

    #[derive(Clone, Debug)]
    enum St {
        Present(u8),
        Absent,
        Unknown,
    }

    #[derive(Clone, Debug)]
    struct Tg {
        etag: u8,
        lm: i64,
        restored_from: Option<u8>,
    }

    fn world() -> impl Strategy<Value = BTreeMap<String, (Option<St>, Option<Tg>)>> {
        let name =
            prop::collection::vec(prop::sample::select(PIECES), 1..4).prop_map(|p| p.concat());
        let st = prop_oneof![
            (0u8..3).prop_map(St::Present),
            Just(St::Absent),
            Just(St::Unknown)
        ];
        let tg =
            (0u8..3, 0i64..100, prop::option::of(0u8..3)).prop_map(|(etag, lm, restored_from)| {
                Tg {
                    etag,
                    lm,
                    restored_from,
                }
            });
        prop::collection::btree_map(name, (prop::option::of(st), prop::option::of(tg)), 0..30)
    }

    fn oracle(o: &PlanOptions, w: &BTreeMap<String, (Option<St>, Option<Tg>)>) -> Vec<String> {
        let mut out: Vec<(String, String)> = Vec::new();
        for (n, (st, tg)) in w {
            if o.prefix.as_deref().is_some_and(|p| !n.starts_with(p)) {
                continue;
            }
            let st = st.clone().unwrap_or(St::Absent);
            let what = match (st, tg) {
                (St::Absent, None) => continue,
                (St::Present(_), None) => "restore",
                (St::Unknown, None) => "unavailable",
                (_, Some(t)) if o.target == RestoreTarget::InPlace && ts(t.lm) <= o.at => {
                    "unchanged"
                }
                (St::Present(e), Some(t)) if t.etag == e || t.restored_from == Some(e) => {
                    "unchanged"
                }
                (St::Present(_), Some(_)) => "overwrite",
                (St::Absent, Some(_)) if o.target == RestoreTarget::InPlace => "delete",
                (St::Absent, Some(_)) => "left_alone",
                (St::Unknown, Some(_)) => "unavailable",
            };
            out.push((n.clone(), what.to_owned()));
        }
        out.sort_by(|a, b| o.order.cmp(&a.0, &b.0));
        out.into_iter().map(|(n, w)| format!("{n}:{w}")).collect()
    }

    fn inputs(
        o: &PlanOptions,
        w: &BTreeMap<String, (Option<St>, Option<Tg>)>,
    ) -> (Vec<NameState>, Vec<BlobEntry>) {
        let mut states = Vec::new();
        let mut target = Vec::new();
        for (n, (st, tg)) in w {
            if let Some(st) = st {
                let state = match st {
                    St::Present(e) => {
                        let h = history_from_backup(n, &[backup_row(n, "b", &format!("e{e}"), 0)]);
                        state_at(&h, ts(0))
                    }
                    St::Absent => AtT::Absent,
                    St::Unknown => AtT::Unknown { why: "test".into() },
                };
                states.push(NameState {
                    name: n.clone(),
                    state,
                });
            }
            if let Some(t) = tg {
                let mut e = entry(n, &format!("e{}", t.etag), t.lm);
                if let Some(r) = t.restored_from {
                    e = with_meta(e, RESTORED_FROM_ETAG, &format!("e{r}"));
                }
                target.push(e);
            }
        }
        o.order.sort_by_name(&mut states, |s| &s.name);
        o.order.sort_by_name(&mut target, |e| &e.name);
        (states, target)
    }

    fn short(i: &PlanItem) -> String {
        let what = match i {
            PlanItem::Restore {
                target_etag: None, ..
            } => "restore",
            PlanItem::Restore {
                target_etag: Some(_),
                ..
            } => "overwrite",
            PlanItem::Delete { .. } => "delete",
            PlanItem::Unchanged { .. } => "unchanged",
            PlanItem::LeftAlone { .. } => "left_alone",
            PlanItem::Unavailable { .. } => "unavailable",
        };
        format!("{}:{what}", i.name())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn plan_equals_oracle_for_any_paging(
            w in world(),
            in_place in any::<bool>(),
            at in 0i64..100,
            prefix in prop::option::of(prop::sample::select(vec!["a", "a/", "é", "\u{1F600}"])),
            order in prop::sample::select(vec![NameOrder::Utf8Bytes, NameOrder::Utf16Units, NameOrder::Hierarchical]),
            page in 1usize..5,
        ) {
            let o = PlanOptions {
                at: ts(at),
                target: if in_place { RestoreTarget::InPlace } else { RestoreTarget::Elsewhere },
                prefix: prefix.map(str::to_owned),
                order,
            };
            let (states, target) = inputs(&o, &w);
            let expected = oracle(&o, &w);
            let got: Vec<String> = plan_restore(o.clone(), states.clone(), target.clone()).unwrap().iter().map(short).collect();
            prop_assert_eq!(&got, &expected);
            // Pages of `page` rows on both sides.
            let mut sp = states.chunks(page).map(<[NameState]>::to_vec);
            let mut tp = target.chunks(page).map(<[BlobEntry]>::to_vec);
            let mut p = RestorePlanner::new(o);
            let mut paged = Vec::new();
            loop {
                match p.step() {
                    PlanStep::Item(i) => paged.push(short(&i)),
                    PlanStep::NeedStates => match sp.next() { Some(x) => p.push_states(x).unwrap(), None => p.end_states() },
                    PlanStep::NeedTarget => match tp.next() { Some(x) => p.push_target(x).unwrap(), None => p.end_target() },
                    PlanStep::Done => break,
                }
            }
            prop_assert_eq!(&paged, &expected);
        }
    }
}
