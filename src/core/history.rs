//! The time machine: what one name held at any instant, rebuilt from the rows that hold its
//! versions. Pure: rows in, answers out; time is a parameter.
//!
//! Rows come from two places. In the backup account the base blob and its snapshots (before a
//! backup blob is overwritten or tombstoned it is snapshotted, so base + snapshots = every version
//! the backup received). In the source account the base blob (the live version) and its
//! snapshots (lakeguard's name their version in metadata; anybody's snapshot holds the version
//! its base had when it was taken). A restore from the backup reads both when it can, so that a
//! version still waiting in the backup queue (held only by its source snapshot) is not invisible.
//!
//! # What a row proves, and the rules built on it
//! - **A version starts at its Last-Modified `L`, to the second.** The service gives Last-Modified
//!   with one-second precision, so a version with `L = 03:00:00` became current at some instant in
//!   `[03:00:00, 03:00:01)`.
//! - **A snapshot time proves currency.** A snapshot is taken while its version is current (the
//!   producer snapshots `If-Match` the version), so its id `S` is an instant at which the version
//!   was current: the version started at or before `S`. The backup records the source snapshot it
//!   copied from (`lakeguard_source_snapshot`); the live blob is current at the listing time.
//! - Hence each version became current within a window `[current_from, current_by]`:
//!   `current_by = min(L + 1 s, first S)` and `current_from = max(L, the previous version's last
//!   S)`. Versions are ordered by their first proof instant (proofs are facts, and versions'
//!   lifetimes do not overlap), by `L` where a version has none; this is what breaks ties between
//!   two versions written within one second.
//! - **At T, a version is current when it certainly started by T** (`current_by <= T`) and no
//!   later version may have started by T (`current_from > T`). A T inside a version's window is
//!   reported unknown with the window, never guessed: restore at `current_by` or later to include
//!   that version, before `current_from` to exclude it.
//! - A path whose `L` is contradicted by a proof (a version proven current after a later `L`: an
//!   ADLS rename onto the path or an undelete brings back an old Last-Modified) starts after the
//!   previous version's last proof, and is only certain from its own first proof.
//! - **Absent needs evidence**: a tombstone (`lakeguard_deleted_at`: the source was observed gone
//!   at that time) covering T, or T before every known version of the name while lakeguard's
//!   coverage of the container had begun (`coverage`: the start of its first complete pass). A
//!   name known nowhere, or T before the first version without coverage, is unknown: a version
//!   the backup never received (a request still queued, or poisoned) may have been current.
//! - A deletion is dated by its observation: between the last sighting and the tombstone a version
//!   counts as present, so a restore errs toward bringing data back, never toward deleting it.
//! - Rows that cannot be placed in time (no or unreadable `lakeguard_*` metadata on a backup row)
//!   leave a hole of unknown position: no time is answered for that name.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use super::reconcile::snapshot_version_etag;
use crate::model::metadata::{
    self, BACKED_UP_AT, DELETED_AT, SOURCE_ETAG, SOURCE_LAST_MODIFIED, SOURCE_SNAPSHOT,
};
use crate::model::{BlobEntry, Etag, Security};

/// Which account a row (and so a version's content) is in.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    #[default]
    Backup,
    Source,
}

/// Where a version's content can be read. Copy from it with a source `If-Match: etag`, so that a
/// base blob replaced since the listing is not copied in place of the version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentRef {
    #[serde(default)]
    pub side: Side,
    pub name: String,
    /// `None`: the base blob (mutable); a snapshot id otherwise (immutable, preferred).
    pub snapshot: Option<String>,
    pub etag: Etag,
    /// The container holding it when it is not the restored container's namesake: an undo
    /// copy in `lakeguard-restores`, which `restore --undo` copies back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

/// One version of one name, as it was in the source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// The source ETag of the version: what a restored blob records as
    /// `lakeguard_restored_from_etag`, and what an untouched source blob still carries.
    pub source_etag: Etag,
    /// The version's Last-Modified in the source, as recorded (one-second precision).
    #[serde(with = "time::serde::rfc3339")]
    pub source_last_modified: OffsetDateTime,
    /// The version became current at some instant in `[current_from, current_by]`; `current_by`
    /// `None`: no upper bound is known (see the module docs).
    #[serde(with = "time::serde::rfc3339")]
    pub current_from: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub current_by: Option<OffsetDateTime>,
    /// First and last instants at which the version is known to have been current.
    #[serde(with = "time::serde::rfc3339::option")]
    pub seen_first: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub seen_last: Option<OffsetDateTime>,
    /// When the source was observed without this version's blob (tombstone); the real deletion
    /// happened at or before this time.
    #[serde(with = "time::serde::rfc3339::option")]
    pub deleted_at: Option<OffsetDateTime>,
    /// `None`: the version is known but its content is not held (a copy that never finished).
    pub content: Option<ContentRef>,
    /// The backup account holds the version's content (a proven copy: `lakeguard_backed_up_at`).
    #[serde(default)]
    pub in_backup: bool,
    pub content_length: u64,
    pub content_type: Option<String>,
    pub content_md5: Option<Vec<u8>>,
    /// The source's user metadata of the version (`lakeguard_*` keys removed).
    pub user_metadata: BTreeMap<String, String>,
    /// Hierarchical source: the path is a directory (restored by creating it, never by a copy).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub directory: bool,
    /// Hierarchical source: the security states recorded for this content version, each with
    /// when it was observed ([`Version::security_at`] picks the one current at T).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security: Vec<SecurityState>,
}

/// One recorded security state of a version (owner, group, permissions, ACL) and when it was
/// observed in the source (`None`: a record without a time; taken as the oldest).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecurityState {
    #[serde(with = "time::serde::rfc3339::option")]
    pub at: Option<OffsetDateTime>,
    pub state: Security,
}

impl Version {
    /// The security state current at `t`: the last one observed at or before `t`, else the
    /// first recorded (see [`crate::model::security::state_at`]). `None` on flat sources.
    pub fn security_at(&self, t: OffsetDateTime) -> Option<&Security> {
        let states: Vec<(Option<OffsetDateTime>, Security)> = self
            .security
            .iter()
            .map(|s| (s.at, s.state.clone()))
            .collect();
        let found = crate::model::security::state_at(&states, t)?.clone();
        self.security
            .iter()
            .map(|s| &s.state)
            .find(|s| **s == found)
    }
}

/// The version key of a directory: its ETag is not a content version (it may change with its
/// children), so all rows of one directory are one version whose security states accumulate.
pub const DIRECTORY_VERSION: &str = "lakeguard-directory";

/// Whether a row stands for a directory of a hierarchical source: lakeguard's directory blob in
/// the backup, or a directory listed with its security state in the source.
fn is_hns_directory(row: &BlobEntry) -> bool {
    row.is_directory_placeholder()
        && (row.meta(crate::model::security::DIRECTORY).is_some() || row.security.is_some())
}

/// The security state a row records (metadata) or was listed with, and when it was observed.
fn security_of(row: &BlobEntry, seen: Option<OffsetDateTime>) -> Option<SecurityState> {
    if let Some(state) = Security::from_metadata(&row.metadata) {
        let at = Security::observed_at(&row.metadata).or(seen);
        return Some(SecurityState { at, state });
    }
    row.security
        .clone()
        .map(|state| SecurityState { at: seen, state })
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
    /// One per source ETag, in the order they were current (see the module docs).
    pub versions: Vec<Version>,
    pub unknown: Vec<UnknownSpan>,
}

impl History {
    /// Source ETags of the versions whose content the backup account holds.
    pub fn backed_up(&self) -> Vec<Etag> {
        self.versions
            .iter()
            .filter(|v| v.in_backup)
            .map(|v| v.source_etag.clone())
            .collect()
    }
}

/// The instant by which a version with this Last-Modified had certainly started, if its
/// Last-Modified is truthful: the end of its second (a fractional value is taken as exact).
pub fn start_by(last_modified: OffsetDateTime) -> OffsetDateTime {
    if last_modified.nanosecond() == 0 {
        last_modified + Duration::SECOND
    } else {
        last_modified
    }
}

/// Which of two versions of one name is the later, from their Last-Modified and (when known)
/// the snapshot time that proves each current. Within one second of Last-Modified only two
/// proofs decide; `None` means the records cannot tell.
pub fn later_of(
    a: (OffsetDateTime, Option<OffsetDateTime>),
    b: (OffsetDateTime, Option<OffsetDateTime>),
) -> Option<std::cmp::Ordering> {
    use std::cmp::Ordering;
    match a.0.cmp(&b.0) {
        Ordering::Equal => match (a.1, b.1) {
            (Some(x), Some(y)) => Some(x.cmp(&y)),
            _ => None,
        },
        other => Some(other),
    }
}

/// One row's reading, before rows holding the same ETag are merged.
struct Observation {
    etag: Etag,
    last_modified: OffsetDateTime,
    /// An instant at which the version was current (a snapshot time; the listing time for the
    /// live blob).
    seen: Option<OffsetDateTime>,
    deleted_at: Option<OffsetDateTime>,
    has_content: bool,
    side: Side,
    /// The source's base blob: the live version.
    live: bool,
    row: BlobEntry,
}

impl Observation {
    /// Order in which states were received: the backup's snapshots by time, its base last, then
    /// the source's. Decides which tombstone state counts and breaks ties.
    fn received(&self) -> (Side, bool, Option<String>) {
        (
            self.side,
            self.row.snapshot.is_none(),
            self.row.snapshot.clone(),
        )
    }

    /// Preference as the content to restore from: the backup's immutable snapshots, its base, the
    /// source's snapshots, the live blob.
    fn content_rank(&self) -> u8 {
        match (self.side, self.row.snapshot.is_some()) {
            (Side::Backup, true) => 0,
            (Side::Backup, false) => 1,
            (Side::Source, true) => 2,
            (Side::Source, false) => 3,
        }
    }
}

fn user_metadata(row: &BlobEntry) -> BTreeMap<String, String> {
    row.metadata
        .iter()
        .filter(|(k, _)| !metadata::is_lakeguard_key(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
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

fn backup_observations(
    name: &str,
    rows: &[BlobEntry],
    obs: &mut Vec<Observation>,
    unknown: &mut Vec<UnknownSpan>,
) {
    for row in rows
        .iter()
        .filter(|r| r.name == name && (!r.is_directory_placeholder() || is_hns_directory(r)))
    {
        if let Some(id) = &row.snapshot {
            if metadata::parse_time(id).is_none() {
                unknown.push(unplaced(row, "has an unreadable snapshot id"));
                continue;
            }
        }
        let Some(mut etag) = row.meta(SOURCE_ETAG).map(Etag::new) else {
            unknown.push(unplaced(row, "has no lakeguard_source_etag"));
            continue;
        };
        let Some(last_modified) = row
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
        if is_hns_directory(row) {
            etag = Etag::new(DIRECTORY_VERSION);
        }
        obs.push(Observation {
            etag,
            last_modified,
            // The source snapshot the copy was made from was taken while the version was
            // current. An unreadable value only loses a proof, it places nothing wrongly.
            seen: row.meta(SOURCE_SNAPSHOT).and_then(metadata::parse_time),
            deleted_at,
            has_content: row.meta(BACKED_UP_AT).is_some(),
            side: Side::Backup,
            live: false,
            row: row.clone(),
        });
    }
}

/// Source rows: snapshots (lakeguard's name their version and its Last-Modified in metadata;
/// others carry their base's ETag and Last-Modified) and the live base blob, current at
/// `listed_at` when given. Returns whether the name has a base blob.
fn source_observations(
    name: &str,
    rows: &[BlobEntry],
    listed_at: Option<OffsetDateTime>,
    obs: &mut Vec<Observation>,
    unknown: &mut Vec<UnknownSpan>,
) -> (bool, Option<OffsetDateTime>) {
    let mut has_base = false;
    let mut last_seen: Option<OffsetDateTime> = None;
    for row in rows
        .iter()
        .filter(|r| r.name == name && (!r.is_directory_placeholder() || is_hns_directory(r)))
    {
        let (mut etag, last_modified, seen) = match &row.snapshot {
            None => {
                has_base = true;
                (row.etag.clone(), row.last_modified, listed_at)
            }
            Some(id) => {
                let Some(t) = metadata::parse_time(id) else {
                    unknown.push(unplaced(row, "has an unreadable snapshot id"));
                    continue;
                };
                last_seen = last_seen.max(Some(t));
                let lm = row
                    .meta(SOURCE_LAST_MODIFIED)
                    .and_then(metadata::parse_time)
                    .unwrap_or(row.last_modified);
                (snapshot_version_etag(row), lm, Some(t))
            }
        };
        if is_hns_directory(row) {
            etag = Etag::new(DIRECTORY_VERSION);
        }
        obs.push(Observation {
            etag,
            last_modified,
            seen,
            deleted_at: None,
            has_content: true,
            side: Side::Source,
            live: row.snapshot.is_none(),
            row: row.clone(),
        });
    }
    (has_base, last_seen)
}

/// Merges observations of the same ETag into versions, orders them and computes their windows.
fn build_versions(name: &str, mut obs: Vec<Observation>) -> Vec<Version> {
    obs.sort_by_key(Observation::received);
    struct Merged {
        v: Version,
        first_received: usize,
        rank: u8,
        /// The latest backup state decides the tombstone; the live blob undoes it.
        live: bool,
    }
    let mut index: BTreeMap<Etag, usize> = BTreeMap::new();
    let mut merged: Vec<Merged> = Vec::new();
    for (i, o) in obs.into_iter().enumerate() {
        let content = o.has_content.then(|| ContentRef {
            side: o.side,
            name: name.to_owned(),
            snapshot: o.row.snapshot.clone(),
            etag: o.row.etag.clone(),
            container: None,
        });
        let in_backup = o.side == Side::Backup && o.has_content;
        let rank = o.content_rank();
        match index.get(&o.etag) {
            None => {
                index.insert(o.etag.clone(), merged.len());
                merged.push(Merged {
                    v: Version {
                        source_etag: o.etag,
                        source_last_modified: o.last_modified,
                        current_from: o.last_modified,
                        current_by: None,
                        seen_first: o.seen,
                        seen_last: o.seen,
                        deleted_at: o.deleted_at,
                        content,
                        in_backup,
                        content_length: o.row.content_length,
                        content_type: o.row.content_type.clone(),
                        content_md5: o.row.content_md5.clone(),
                        user_metadata: user_metadata(&o.row),
                        directory: is_hns_directory(&o.row),
                        security: security_of(&o.row, o.seen).into_iter().collect(),
                    },
                    first_received: i,
                    rank,
                    live: o.live,
                });
            }
            Some(&k) => {
                let m = &mut merged[k];
                let v = &mut m.v;
                v.source_last_modified = v.source_last_modified.min(o.last_modified);
                if let Some(s) = o.seen {
                    v.seen_first = Some(v.seen_first.map_or(s, |f| f.min(s)));
                    v.seen_last = Some(v.seen_last.map_or(s, |l| l.max(s)));
                }
                // The latest backup state received decides: a tombstone followed by a live state
                // of the same ETag was a tombstone written in error, and is undone.
                if o.side == Side::Backup {
                    v.deleted_at = o.deleted_at;
                }
                m.live |= o.live;
                v.in_backup |= in_backup;
                if let Some(sec) = security_of(&o.row, o.seen) {
                    if !v.security.contains(&sec) {
                        v.security.push(sec);
                    }
                }
                if content.is_some() && (v.content.is_none() || rank < m.rank) {
                    m.rank = rank;
                    v.content = content;
                    v.content_length = o.row.content_length;
                    v.content_type = o.row.content_type.clone();
                    v.content_md5 = o.row.content_md5.clone();
                    v.user_metadata = user_metadata(&o.row);
                }
            }
        }
    }
    for m in &mut merged {
        // The version is the live blob now: it is not deleted, whatever a tombstone said.
        if m.live {
            m.v.deleted_at = None;
        }
    }
    // Proof instants order versions truly; Last-Modified stands in where there is none.
    merged.sort_by(|a, b| {
        let key = |m: &Merged| m.v.seen_first.unwrap_or(m.v.source_last_modified);
        key(a)
            .cmp(&key(b))
            .then(a.first_received.cmp(&b.first_received))
    });
    let mut floor: Option<OffsetDateTime> = None;
    let mut out = Vec::with_capacity(merged.len());
    for m in merged {
        let mut v = m.v;
        let l = v.source_last_modified;
        let contradicted = floor.is_some_and(|f| start_by(l) <= f);
        v.current_from = floor.map_or(l, |f| f.max(l));
        let by_lm = (!contradicted).then(|| start_by(l));
        v.current_by = match (by_lm, v.seen_first) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // The next version started after this one had started and after its last proof.
        floor = Some(
            floor
                .into_iter()
                .chain([v.current_from])
                .chain(v.seen_last)
                .max()
                .unwrap_or(l),
        );
        out.push(v);
    }
    out
}

/// The history of `name` from backup rows alone (base + snapshots, any order). Rows of other
/// names are ignored (exact comparison: `a.txt.bak` is not `a.txt`), as are directory
/// placeholders.
pub fn history_from_backup(name: &str, rows: &[BlobEntry]) -> History {
    history_from(name, rows, &[], None)
}

/// The history of `name` from the source's rows alone: the `--from snapshots` mode. Without a
/// base blob the name was deleted at a time no row records: unknown after the last snapshot (the
/// last moment it provably existed).
pub fn history_from_source_snapshots(
    name: &str,
    rows: &[BlobEntry],
    listed_at: Option<OffsetDateTime>,
) -> History {
    let mut obs = Vec::new();
    let mut unknown = Vec::new();
    let (has_base, last_seen) = source_observations(name, rows, listed_at, &mut obs, &mut unknown);
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

/// The history of `name` from the backup's rows and the source's (snapshots and the live blob,
/// current at `listed_at`): the default `--from backup`, where the source fills in versions the
/// backup has not received yet. Source rows only add versions: a deletion is the backup's to
/// record (tombstone).
pub fn history_from(
    name: &str,
    backup_rows: &[BlobEntry],
    source_rows: &[BlobEntry],
    listed_at: Option<OffsetDateTime>,
) -> History {
    let mut obs = Vec::new();
    let mut unknown = Vec::new();
    backup_observations(name, backup_rows, &mut obs, &mut unknown);
    source_observations(name, source_rows, listed_at, &mut obs, &mut unknown);
    History {
        name: name.to_owned(),
        versions: build_versions(name, obs),
        unknown,
    }
}

/// The state of one name at one time.
// One per name, consumed at once: boxing the version would only add an allocation per name.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum AtT {
    Present {
        version: Version,
    },
    /// Proven absent: a tombstone covers T, or T is before every version while covered.
    Absent,
    /// The history cannot tell; never guessed.
    Unknown {
        why: String,
    },
}

/// The state at `t` of a name no history knows, or of one before its first version: absent when
/// lakeguard was covering the container at `t` (`coverage` = start of its first complete pass),
/// else unknown.
pub fn before_history(name: &str, t: OffsetDateTime, coverage: Option<OffsetDateTime>) -> AtT {
    match coverage {
        Some(c) if c <= t => AtT::Absent,
        Some(c) => AtT::Unknown {
            why: format!(
                "no version of {name:?} is known at {}, which is before lakeguard's coverage of the container began ({}): a version never backed up may have been current",
                metadata::format_time(t),
                metadata::format_time(c)
            ),
        },
        None => AtT::Unknown {
            why: format!(
                "no version of {name:?} is known at {}, and no complete lakeguard pass over the container is recorded: a version never backed up may have been current",
                metadata::format_time(t)
            ),
        },
    }
}

/// What was current at `t` (rules: module docs).
pub fn state_at(history: &History, t: OffsetDateTime, coverage: Option<OffsetDateTime>) -> AtT {
    if let Some(span) = history.unknown.iter().find(|s| s.contains(t)) {
        return AtT::Unknown {
            why: span.why.clone(),
        };
    }
    let started = history
        .versions
        .iter()
        .rposition(|v| v.current_by.is_some_and(|b| b <= t));
    let after = started.map_or(0, |i| i + 1);
    if let Some(v) = history.versions[after..]
        .iter()
        .find(|v| v.current_from <= t)
    {
        return AtT::Unknown {
            why: format!(
                "version {} of {:?} became current at an unknown instant between {} and {} (Last-Modified has one-second precision; a snapshot time proves it current): {} falls in that window; restore at {} or later to include it, or before {} to exclude it",
                v.source_etag,
                history.name,
                metadata::format_time(v.current_from),
                v.current_by.map_or_else(|| "an unknown time".into(), metadata::format_time),
                metadata::format_time(t),
                v.current_by.map_or_else(|| "a later time".into(), metadata::format_time),
                metadata::format_time(v.current_from),
            ),
        };
    }
    let Some(i) = started else {
        return before_history(&history.name, t, coverage);
    };
    let v = &history.versions[i];
    if v.deleted_at.is_some_and(|d| d <= t) {
        return AtT::Absent;
    }
    if v.content.is_none() {
        return AtT::Unknown {
            why: format!(
                "version {} of {:?} was current but its content is not held (copy never completed)",
                v.source_etag, history.name
            ),
        };
    }
    AtT::Present { version: v.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::testutil::*;

    fn at(h: &History, t: i64) -> String {
        at_cov(h, t, Some(ts(0)))
    }

    fn at_cov(h: &History, t: i64, coverage: Option<OffsetDateTime>) -> String {
        match state_at(h, ts(t), coverage) {
            AtT::Present { version } => version.source_etag.as_str().to_owned(),
            AtT::Absent => "absent".into(),
            AtT::Unknown { .. } => "unknown".into(),
        }
    }

    /// A backup row whose copy came from source snapshot taken at `snap` (a proof instant), in
    /// tenths of a second after `ts(0)`.
    fn proven(name: &str, b: &str, v: &str, lm: i64, snap_tenths: i64) -> BlobEntry {
        let t = ts(0) + Duration::milliseconds(100 * snap_tenths);
        with_meta(
            backup_row(name, b, v, lm),
            SOURCE_SNAPSHOT,
            &metadata::format_time(t),
        )
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
        assert_eq!(h.backed_up().len(), 3);
        for (t, want) in [
            (9, "absent"),   // before the first version, coverage since 0
            (10, "unknown"), // inside v1's second: it may not have started yet
            (11, "v1"),      // v1 certainly started (end of its Last-Modified second)
            (15, "v1"),
            (20, "unknown"),
            (21, "v2"),
            (29, "v2"),
            (30, "absent"), // exactly at the tombstone
            (35, "absent"), // after the delete
            (41, "v3"),     // re-created
            (1000, "v3"),
        ] {
            assert_eq!(at(&h, t), want, "t={t}");
        }
    }

    #[test]
    fn before_the_first_version_is_absent_only_under_coverage() {
        let h = history_from_backup("a.txt", &overwrite_delete_recreate());
        assert_eq!(at_cov(&h, 5, None), "unknown");
        assert_eq!(at_cov(&h, 5, Some(ts(6))), "unknown");
        assert_eq!(at_cov(&h, 5, Some(ts(5))), "absent");
        // The tombstone is evidence by itself.
        assert_eq!(at_cov(&h, 35, None), "absent");
        let unknown = history_from_backup("nothing", &[]);
        assert_eq!(at_cov(&unknown, 5, None), "unknown");
        assert_eq!(at_cov(&unknown, 5, Some(ts(1))), "absent");
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
        let none = history_from_backup("a", &overwrite_delete_recreate());
        assert!(none.versions.is_empty());
        assert_eq!(at(&none, 100), "absent");
    }

    #[test]
    fn tombstoned_base_alone_still_holds_its_content() {
        let rows = vec![with_time(backup_row("f", "bt", "v1", 10), DELETED_AT, 20)];
        let h = history_from_backup("f", &rows);
        assert_eq!(at(&h, 15), "v1");
        assert_eq!(at(&h, 20), "absent");
        assert_eq!(
            h.versions[0].content.as_ref().unwrap().etag,
            Etag::new("bt")
        );
    }

    #[test]
    fn a_tombstone_undone_later_does_not_count() {
        let rows = vec![
            snapshot(
                with_time(backup_row("f", "bt", "v1", 10), DELETED_AT, 20),
                25,
            ),
            backup_row("f", "b1", "v1", 10),
        ];
        let h = history_from_backup("f", &rows);
        assert_eq!(h.versions.len(), 1);
        assert_eq!(at(&h, 22), "v1");
        // The live blob of that version undoes a tombstone too.
        let rows = [with_time(backup_row("f", "bt", "v1", 10), DELETED_AT, 20)];
        let h = history_from("f", &rows, &[entry("f", "v1", 10)], Some(ts(50)));
        assert_eq!(at(&h, 22), "v1");
    }

    #[test]
    fn content_not_held_is_unknown_not_guessed() {
        let mut v2 = backup_row("f", "b2", "v2", 20);
        v2.metadata.remove(BACKED_UP_AT);
        let rows = vec![snapshot(backup_row("f", "b1", "v1", 10), 21), v2];
        let h = history_from_backup("f", &rows);
        assert_eq!(at(&h, 15), "v1");
        assert_eq!(at(&h, 25), "unknown");
        assert_eq!(h.backed_up(), vec![Etag::new("v1")]);
    }

    #[test]
    fn unplaceable_rows_make_the_name_unknown() {
        let rows = vec![
            backup_row("f", "b1", "v1", 10),
            snapshot(entry("f", "foreign", 5), 7),
        ];
        let h = history_from_backup("f", &rows);
        assert_eq!(h.unknown.len(), 1);
        assert_eq!(at(&h, 15), "unknown");
        assert_eq!(at(&h, 1), "unknown");
        let bad_time = with_meta(backup_row("g", "b1", "v1", 10), DELETED_AT, "soon");
        assert_eq!(at(&history_from_backup("g", &[bad_time]), 15), "unknown");
        let h = history_from_backup("d", &[placeholder("d")]);
        assert_eq!(
            h,
            History {
                name: "d".into(),
                ..Default::default()
            }
        );
    }

    /// Issue 15, defect 3: two versions within one second, the older one received last.
    #[test]
    fn same_second_versions_are_ordered_by_their_snapshot_times() {
        // v1 snapshotted at 10.3, v2 at 10.6; both Last-Modified 10. The backup received v2
        // first (it is the older backup snapshot) and v1 last (its base).
        let rows = vec![
            snapshot(proven("f", "b2", "v2", 10, 106), 12),
            proven("f", "b1", "v1", 10, 103),
        ];
        let h = history_from_backup("f", &rows);
        let etags: Vec<_> = h.versions.iter().map(|v| v.source_etag.as_str()).collect();
        assert_eq!(etags, ["v1", "v2"]);
        assert_eq!(at(&h, 11), "v2");
        assert_eq!(at(&h, 1000), "v2");
        // Without proofs, the order received stands in (the worker keeps the newer on top).
        let rows = vec![
            snapshot(backup_row("f", "b1", "v1", 10), 11),
            backup_row("f", "b2", "v2", 10),
        ];
        assert_eq!(at(&history_from_backup("f", &rows), 11), "v2");
    }

    /// Issue 15, defect 6: a write at 10.7 has Last-Modified 10; T = 10 is before it.
    #[test]
    fn the_second_of_a_write_is_ambiguous_until_a_snapshot_proves_it() {
        let rows = vec![
            snapshot(proven("f", "b1", "v1", 5, 52), 12),
            proven("f", "b2", "v2", 10, 108),
        ];
        let h = history_from_backup("f", &rows);
        assert_eq!(h.versions[1].current_from, ts(10));
        assert_eq!(
            h.versions[1].current_by,
            Some(ts(10) + Duration::milliseconds(800))
        );
        assert_eq!(at(&h, 9), "v1");
        let AtT::Unknown { why } = state_at(&h, ts(10), None) else {
            panic!("T inside v2's second must be unknown")
        };
        assert!(why.contains("one-second precision"), "{why}");
        // From its snapshot time v2 is proven current.
        let t = ts(10) + Duration::milliseconds(800);
        assert!(
            matches!(state_at(&h, t, None), AtT::Present { version } if version.source_etag == Etag::new("v2"))
        );
        // A fractional Last-Modified (another producer) is taken as exact.
        let mut exact = backup_row("g", "b", "v1", 0);
        exact.metadata.insert(
            SOURCE_LAST_MODIFIED.into(),
            metadata::format_time(ts(10) + Duration::milliseconds(700)),
        );
        let h = history_from_backup("g", &[exact]);
        assert_eq!(at(&h, 10), "absent");
        assert!(matches!(
            state_at(&h, ts(10) + Duration::milliseconds(700), Some(ts(0))),
            AtT::Present { .. }
        ));
    }

    #[test]
    fn a_backlog_version_only_in_the_source_is_seen() {
        // v1 written at 10 and snapshotted (its request still queued: not in the backup); v2
        // written at 20 and backed up. The source still holds v1's snapshot.
        let backup = [proven("f", "b2", "v2", 20, 205)];
        let source = [
            snapshot(
                with_time(
                    with_meta(entry("f", "s1", 10), SOURCE_ETAG, "v1"),
                    SOURCE_LAST_MODIFIED,
                    10,
                ),
                12,
            ),
            entry("f", "v2", 20),
        ];
        let h = history_from("f", &backup, &source, Some(ts(100)));
        let etags: Vec<_> = h.versions.iter().map(|v| v.source_etag.as_str()).collect();
        assert_eq!(etags, ["v1", "v2"]);
        let AtT::Present { version } = state_at(&h, ts(15), None) else {
            panic!("v1 is current at 15")
        };
        assert_eq!(version.source_etag, Etag::new("v1"));
        assert!(!version.in_backup);
        assert_eq!(version.content.unwrap().side, Side::Source);
        // v2's content is read from the backup, not the live blob.
        let AtT::Present { version } = state_at(&h, ts(30), None) else {
            panic!()
        };
        assert_eq!(version.content.unwrap().side, Side::Backup);
        // From the backup alone, 15 is before everything it knows: not provable without coverage.
        let h = history_from_backup("f", &backup);
        assert_eq!(at_cov(&h, 15, None), "unknown");
    }

    #[test]
    fn a_path_renamed_onto_or_undeleted_is_current_only_from_its_proof() {
        // v2 written at 20 (snapshot at 21); at about 30 a rename brings back content with
        // Last-Modified 5 (v9), snapshotted by the producer at 32, and live at 100.
        let backup = [
            snapshot(proven("p", "b2", "v2", 20, 210), 33),
            proven("p", "b9", "v9", 5, 320),
        ];
        let h = history_from("p", &backup, &[entry("p", "v9", 5)], Some(ts(100)));
        let etags: Vec<_> = h.versions.iter().map(|v| v.source_etag.as_str()).collect();
        assert_eq!(etags, ["v2", "v9"]);
        // v9 arrived at an unknown instant between v2's last proof (21) and its own first (32).
        assert_eq!(h.versions[1].current_from, ts(21));
        assert_eq!(h.versions[1].current_by, Some(ts(32)));
        assert_eq!(at(&h, 25), "unknown");
        assert_eq!(at(&h, 33), "v9");
        // v9's old Last-Modified does not place it before v2.
        assert_eq!(at(&h, 10), "absent");
        assert_eq!(at(&h, 19), "absent");
    }

    /// Issue 18: the security state of one content version changes over time (ACL-only
    /// changes); state at T picks the state observed last by T; directories are one version.
    #[test]
    fn security_state_at_t_within_one_version() {
        use crate::model::security::DIRECTORY;
        let sec = |acl: &str| Security {
            owner: "o".into(),
            group: "g".into(),
            permissions: "rw-r-----".into(),
            acl: acl.into(),
        };
        let with_sec = |mut e: BlobEntry, acl: &str, at: i64| {
            sec(acl).write_metadata(&mut e.metadata, ts(at));
            e
        };
        // v1 backed up at 10 with ACL a; ACL changed to b at 20 (base re-recorded, the old
        // state kept as a backup snapshot); then c at 30.
        let snap1 = with_sec(proven("f", "b1", "v1", 5, 100), "user::r--", 10);
        let mut snap1 = snap1;
        snap1.snapshot = Some(metadata::format_time(ts(20)));
        let mut snap2 = with_sec(proven("f", "b1", "v1", 5, 100), "user::rw-", 20);
        snap2.snapshot = Some(metadata::format_time(ts(30)));
        let base = with_sec(proven("f", "b1", "v1", 5, 100), "user::rwx", 30);
        let h = history_from_backup("f", &[base, snap2, snap1]);
        assert_eq!(h.versions.len(), 1, "{h:?}");
        let v = &h.versions[0];
        let acl_at = |t: i64| v.security_at(ts(t)).map(|s| s.acl.clone());
        assert_eq!(acl_at(11).as_deref(), Some("user::r--"));
        assert_eq!(acl_at(25).as_deref(), Some("user::rw-"));
        assert_eq!(acl_at(31).as_deref(), Some("user::rwx"));
        assert_eq!(
            acl_at(0).as_deref(),
            Some("user::r--"),
            "before the first record"
        );

        // A directory: zero length, ours, its ETag is not a version.
        let mut d1 = with_meta(
            with_meta(
                proven("d", "bd", "0xDIR1", 5, 100),
                metadata::HDI_ISFOLDER,
                "true",
            ),
            DIRECTORY,
            "true",
        );
        d1.content_length = 0;
        let d1 = with_sec(d1, "user::rwx,default:user::rwx", 10);
        let mut d0 = d1.clone();
        d0.snapshot = Some(metadata::format_time(ts(40)));
        d0.metadata.insert(SOURCE_ETAG.into(), "\"0xDIR0\"".into());
        let h = history_from_backup("d", &[d1, d0]);
        assert_eq!(h.versions.len(), 1, "{h:?}");
        assert!(h.versions[0].directory);
        match state_at(&h, ts(50), Some(ts(0))) {
            AtT::Present { version } => {
                assert!(version.security_at(ts(50)).unwrap().has_default_acl())
            }
            other => panic!("{other:?}"),
        }
        // Flat: no security, not a directory.
        let h = history_from_backup("x", &[proven("x", "b", "v", 5, 100)]);
        assert!(h.versions[0].security.is_empty() && !h.versions[0].directory);
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
        let h = history_from_source_snapshots("f", &rows, None);
        let etags: Vec<_> = h.versions.iter().map(|v| v.source_etag.as_str()).collect();
        assert_eq!(etags, ["v1", "v2", "v3"]);
        assert_eq!(
            (at(&h, 5), at(&h, 11), at(&h, 25), at(&h, 31)),
            ("absent".into(), "v1".into(), "v2".into(), "v3".into())
        );
        assert_eq!(h.versions[2].content.as_ref().unwrap().snapshot, None);
        // A snapshot of the current version is preferred to the live base as content.
        let same = snapshot(entry("f", "v3", 30), 35);
        let h = history_from_source_snapshots("f", &[base, same], None);
        assert_eq!(h.versions.len(), 1);
        assert_eq!(
            h.versions[0].content.as_ref().unwrap().snapshot,
            Some(snap_id(35))
        );
        // Base gone: deleted at an unknown time after the last snapshot.
        let h = history_from_source_snapshots("f", &[foreign, lg], None);
        assert_eq!(at(&h, 21), "v2");
        assert_eq!(at(&h, 22), "unknown");
        assert_eq!(at(&h, 100), "unknown");
    }
}

#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;
    use crate::core::testutil::*;

    /// A simulated life of one blob: (tenths of a second since the previous event, write or
    /// delete). Gaps below ten put several writes in one second.
    fn events() -> impl Strategy<Value = Vec<(i64, bool)>> {
        prop::collection::vec((1i64..40, prop::bool::weighted(0.7)), 0..12)
    }

    fn shuffle<T>(v: &mut [T], mut seed: u64) {
        for i in (1..v.len()).rev() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            v.swap(i, (seed % (i as u64 + 1)) as usize);
        }
    }

    fn tenths(t: i64) -> OffsetDateTime {
        ts(0) + Duration::milliseconds(100 * t)
    }

    /// Half a tenth after event `t`: when the producer snapshots a write, or reconcile observes
    /// a deletion (before any next event).
    fn soon_after(t: i64) -> OffsetDateTime {
        tenths(t) + Duration::milliseconds(50)
    }

    /// Runs the events against a model of the source and of the backup protocol: every write is
    /// snapshotted soon after by the producer (the proof instant), the backup keeps its base as a
    /// snapshot before every overwrite or tombstone, and a deletion is observed soon after.
    /// Returns the backup rows, the source rows and the truth (instant in tenths, version).
    #[allow(clippy::type_complexity)]
    fn simulate(
        name: &str,
        evs: &[(i64, bool)],
    ) -> (Vec<BlobEntry>, Vec<BlobEntry>, Vec<(i64, Option<String>)>) {
        let mut base: Option<BlobEntry> = None;
        let mut rows = Vec::new();
        let mut src = Vec::new();
        let mut src_base: Option<BlobEntry> = None;
        let mut truth: Vec<(i64, Option<String>)> = Vec::new();
        let mut t = 0;
        for (n, &(gap, write)) in evs.iter().enumerate() {
            t += gap;
            let present = truth.last().is_some_and(|(_, s)| s.is_some());
            let lm = t.div_euclid(10); // Last-Modified: the second
            if write {
                let v = format!("v{n}");
                let snap = metadata::format_time(soon_after(t));
                if let Some(b) = base.take() {
                    let mut kept = b;
                    kept.snapshot = Some(metadata::format_time(soon_after(t)));
                    rows.push(kept);
                }
                base = Some(with_meta(
                    backup_row(name, &format!("b{n}"), &v, lm),
                    SOURCE_SNAPSHOT,
                    &snap,
                ));
                let mut s = with_time(
                    with_meta(entry(name, &format!("s{n}"), lm), SOURCE_ETAG, &v),
                    SOURCE_LAST_MODIFIED,
                    lm,
                );
                s.snapshot = Some(snap);
                src.push(s);
                src_base = Some(entry(name, &v, lm));
                truth.push((t, Some(v)));
            } else if present {
                let b = base.take().expect("a present blob has been backed up");
                let mut kept = b.clone();
                kept.snapshot = Some(metadata::format_time(soon_after(t)));
                rows.push(kept);
                let mut tomb = with_meta(b, DELETED_AT, &metadata::format_time(soon_after(t)));
                tomb.etag = Etag::new(format!("b{n}t"));
                base = Some(tomb);
                src_base = None;
                truth.push((t, None));
            }
        }
        rows.extend(base);
        src.extend(src_base);
        (rows, src, truth)
    }

    fn truth_at(truth: &[(i64, Option<String>)], t: i64) -> String {
        truth
            .iter()
            .rev()
            .find(|(at, _)| *at <= t)
            .and_then(|(_, s)| s.clone())
            .unwrap_or_else(|| "absent".into())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Whatever the row order and however close the writes: every answer is the truth or an
        /// honest "unknown", and "unknown" only within a second of a write or before the
        /// observation of a deletion.
        #[test]
        fn answers_are_true_or_unknown_never_wrong(
            evs in events(), seed in any::<u64>(), with_source in any::<bool>(),
        ) {
            let (mut rows, mut src, truth) = simulate("d/f", &evs);
            rows.push(backup_row("d/f.bak", "x", "v1", 1));
            shuffle(&mut rows, seed | 1);
            shuffle(&mut src, seed.rotate_left(7) | 1);
            let end = truth.last().map_or(0, |(t, _)| *t);
            let listed = tenths(end + 20);
            let h = if with_source {
                history_from("d/f", &rows, &src, Some(listed))
            } else {
                history_from_backup("d/f", &rows)
            };
            prop_assert!(h.unknown.is_empty());
            for t in -10..=end + 30 {
                // Between a deletion and its observation the version still counts as present.
                if truth.iter().any(|(at, v)| v.is_none() && *at == t) {
                    continue;
                }
                let got = match state_at(&h, tenths(t), Some(tenths(-20))) {
                    AtT::Present { version } => version.source_etag.as_str().to_owned(),
                    AtT::Absent => "absent".into(),
                    AtT::Unknown { .. } => {
                        // Only within the second of a write, up to its proof.
                        let near = truth.iter().any(|(at, v)| {
                            let s = at.div_euclid(10) * 10;
                            v.is_some() && (s..=*at).contains(&t)
                        });
                        prop_assert!(near, "unknown far from any event at t={}", t);
                        continue;
                    }
                };
                prop_assert_eq!(got, truth_at(&truth, t), "t={}", t);
            }
        }
    }
}
