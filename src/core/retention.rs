//! Retention: which versions a policy needs, and what pruning may delete. Pure: rows, a policy
//! and `now` in, actions out.
//!
//! # The promise
//! A policy ([`Keep`]) promises restore points: every instant in the last `within` (e.g. 30
//! days), the ends of the last `hourly`/`daily`/`weekly`/`monthly`/`yearly` calendar periods (UTC;
//! weeks start on Monday; the end of a period is the start of the next), and now. The invariant,
//! property-tested below: **for every promised instant T, a restore at T gives exactly the same
//! state after pruning as before** (the same version, or absent, or unknown). `last` keeps the N
//! most recent versions of each name whatever their age. Unlike restic's `--keep-daily`, which
//! counts days that have snapshots, buckets here are calendar periods: "any month end in the last
//! 12" is a promise a user can check against a calendar.
//!
//! # What pruning deletes
//! - From the backup account, the snapshots holding versions no promised instant needs. A version
//!   is needed when it is current at a promised instant, may be current there (an instant inside
//!   a version's window of becoming current keeps every candidate), started inside the `within`
//!   window, is among the `last` N, or is the latest (the base blob is never deleted while the
//!   name lives). A tombstone is part of its version's rows, so a needed absence keeps it.
//! - A name whose latest state is a tombstone older than `tombstone_retention`, and which the
//!   source does not hold any more: its whole history (the one exception to the promise — a blob
//!   deleted that long ago is gone from every restore point).
//! - From the source account, lakeguard's own snapshots (`lakeguard_source_etag`) of versions the
//!   source policy does not need, **only when the backup holds the version** (a row with that
//!   source ETag, `lakeguard_backed_up_at`, the same length, and the source snapshot it was
//!   copied from recorded as a proof of currency). Nobody else's snapshots are ever touched.
//! - Names whose history has rows that cannot be placed in time are left alone (reported).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::{Date, OffsetDateTime, Time, UtcOffset};

use super::history::{
    history_from_backup, history_from_source_snapshots, state_at, AtT, History, Version,
};
use crate::model::metadata::{self, BACKED_UP_AT, DELETED_AT, SOURCE_ETAG, SOURCE_SNAPSHOT};
use crate::model::{BlobEntry, Etag};

/// A retention policy for one kind of history (the backup's, or the source's snapshots).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Keep {
    /// Every instant in this window before now.
    #[serde(default, with = "opt_secs")]
    pub within: Option<Duration>,
    pub last: u32,
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    pub yearly: u32,
}

mod opt_secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs()),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_secs))
    }
}

/// `30d`, `12h`, `90m`, `45s`, `2w`, `1y` (365 days).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 30d, 12h, 90m, 45s, 2w or 1y"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        "y" => 365 * 86_400,
        _ => return Err(format!("`{text}`: unit must be s, m, h, d, w or y")),
    };
    n.checked_mul(secs)
        .filter(|s| *s <= 100 * 365 * 86_400)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("`{text}` is longer than 100 years"))
}

impl Keep {
    /// Parses `within=30d,last=3,hourly=24,daily=7,weekly=4,monthly=12,yearly=10` (any subset;
    /// `none` or empty for no policy).
    pub fn parse(text: &str) -> Result<Keep, String> {
        let mut k = Keep::default();
        let t = text.trim();
        if t.is_empty() || t.eq_ignore_ascii_case("none") {
            return Ok(k);
        }
        for part in t.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}` is not key=value"))?;
            let (key, value) = (key.trim(), value.trim());
            let count = || {
                value
                    .parse::<u32>()
                    .map_err(|_| format!("`{key}={value}`: a count is a whole number"))
            };
            match key {
                "within" => k.within = Some(parse_duration(value)?),
                "last" => k.last = count()?,
                "hourly" => k.hourly = count()?,
                "daily" => k.daily = count()?,
                "weekly" => k.weekly = count()?,
                "monthly" => k.monthly = count()?,
                "yearly" => k.yearly = count()?,
                other => {
                    return Err(format!(
                    "unknown retention key `{other}` (within, last, hourly, daily, weekly, monthly, yearly)"
                ))
                }
            }
        }
        Ok(k)
    }

    /// No rule: nothing is promised beyond the latest version, and prune does nothing with it.
    pub fn is_empty(&self) -> bool {
        *self == Keep::default()
    }
}

impl std::fmt::Display for Keep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Some(w) = self.within {
            parts.push(format!("within={}s", w.as_secs()));
        }
        for (k, v) in [
            ("last", self.last),
            ("hourly", self.hourly),
            ("daily", self.daily),
            ("weekly", self.weekly),
            ("monthly", self.monthly),
            ("yearly", self.yearly),
        ] {
            if v > 0 {
                parts.push(format!("{k}={v}"));
            }
        }
        if parts.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&parts.join(","))
        }
    }
}

/// The restore points a policy promises at `now`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Promises {
    /// Every instant from here to now.
    pub window_from: Option<OffsetDateTime>,
    /// Bucket ends and now, ascending, without duplicates.
    pub instants: Vec<OffsetDateTime>,
}

impl Promises {
    pub fn covers(&self, t: OffsetDateTime, now: OffsetDateTime) -> bool {
        (self.window_from.is_some_and(|w| w <= t) && t <= now) || self.instants.contains(&t)
    }
}

fn start_of_day(d: Date) -> OffsetDateTime {
    d.with_time(Time::MIDNIGHT).assume_utc()
}

/// The start of the calendar period (`hour`, `day`, `week`, `month`, `year`) holding `t`, and
/// of the one before a period start.
fn period_start(kind: &str, t: OffsetDateTime) -> OffsetDateTime {
    let t = t.to_offset(UtcOffset::UTC);
    match kind {
        "hour" => t
            .replace_minute(0)
            .and_then(|t| t.replace_second(0))
            .and_then(|t| t.replace_nanosecond(0))
            .unwrap_or(t),
        "day" => start_of_day(t.date()),
        "week" => {
            let back = t.weekday().number_days_from_monday() as i64;
            start_of_day(t.date() - time::Duration::days(back))
        }
        "month" => start_of_day(t.date().replace_day(1).unwrap_or(t.date())),
        _ => start_of_day(
            Date::from_calendar_date(t.year(), time::Month::January, 1).unwrap_or(t.date()),
        ),
    }
}

fn previous_start(kind: &str, start: OffsetDateTime) -> OffsetDateTime {
    match kind {
        "hour" => start - time::Duration::HOUR,
        "day" => start - time::Duration::DAY,
        "week" => start - time::Duration::WEEK,
        // One instant before this start lies in the previous period.
        _ => period_start(kind, start - time::Duration::NANOSECOND),
    }
}

/// The promises of `keep` at `now`.
pub fn promises(keep: &Keep, now: OffsetDateTime) -> Promises {
    let mut instants = BTreeSet::from([now]);
    for (kind, n) in [
        ("hour", keep.hourly),
        ("day", keep.daily),
        ("week", keep.weekly),
        ("month", keep.monthly),
        ("year", keep.yearly),
    ] {
        // The end of the period before the current one is the start of the current one.
        let mut end = period_start(kind, now);
        for _ in 0..n {
            if end < OffsetDateTime::UNIX_EPOCH {
                break;
            }
            instants.insert(end);
            end = previous_start(kind, end);
        }
    }
    let window_from = keep
        .within
        .map(|w| now - time::Duration::try_from(w).unwrap_or(time::Duration::days(365 * 100)));
    Promises {
        window_from,
        instants: instants.into_iter().collect(),
    }
}

/// Why a version is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Why {
    Latest,
    Within,
    Last,
    /// Current (or possibly current) at a promised instant.
    Promised,
    /// Its proof instants place a kept version that arrived with an older Last-Modified (a
    /// rename or an undelete keeps the one it had): without it, that version would seem to
    /// start earlier, and a restore at a promised instant would change.
    Places,
}

/// The versions of `history` that `keep` needs at `now`, with the first reason found.
pub fn needed(history: &History, keep: &Keep, now: OffsetDateTime) -> BTreeMap<Etag, Why> {
    let mut out: BTreeMap<Etag, Why> = BTreeMap::new();
    let vs = &history.versions;
    let mut need = |e: &Etag, why: Why| {
        out.entry(e.clone()).or_insert(why);
    };
    if let Some(last) = vs.last() {
        need(&last.source_etag, Why::Latest);
    }
    for v in vs.iter().rev().take(keep.last as usize) {
        need(&v.source_etag, Why::Last);
    }
    let p = promises(keep, now);
    let mut points: Vec<OffsetDateTime> = p.instants.clone();
    if let Some(w) = p.window_from {
        points.push(w);
        // Every version that may have started inside the window.
        for v in vs {
            if v.current_by.is_none_or(|b| b >= w) {
                need(&v.source_etag, Why::Within);
            }
        }
    }
    for t in points {
        // The version certainly current at t, and every later one that may have started by t
        // (when t is inside a window of becoming current, all candidates stay).
        let started = vs
            .iter()
            .rposition(|v| v.current_by.is_some_and(|b| b <= t));
        if let Some(i) = started {
            need(&vs[i].source_etag, Why::Promised);
        }
        for v in &vs[started.map_or(0, |i| i + 1)..] {
            if v.current_from <= t {
                need(&v.source_etag, Why::Promised);
            }
        }
    }
    // A version's window depends on the versions before it only through their floor (see
    // `history::build_versions`): where the floor reaches its Last-Modified, it lifts its start
    // or overrules its Last-Modified. Keeping the version that sets that floor keeps the window
    // exactly as it is; walking backwards covers a kept setter whose own window was lifted.
    let floors = floors(vs);
    for (i, v) in vs.iter().enumerate().rev() {
        if !out.contains_key(&v.source_etag) {
            continue;
        }
        if let Some((floor, setter)) = floors[i] {
            if floor >= v.source_last_modified {
                out.entry(vs[setter].source_etag.clone())
                    .or_insert(Why::Places);
            }
        }
    }
    out
}

/// For each version, the floor the versions before it set (the latest instant any of them had
/// started or was proven current) and the latest version that sets it.
fn floors(vs: &[Version]) -> Vec<Option<(OffsetDateTime, usize)>> {
    let mut out = Vec::with_capacity(vs.len());
    let mut floor: Option<(OffsetDateTime, usize)> = None;
    for (j, v) in vs.iter().enumerate() {
        out.push(floor);
        let reach = v
            .seen_last
            .map_or(v.current_from, |s| s.max(v.current_from));
        if floor.is_none_or(|(f, _)| reach >= f) {
            floor = Some((reach, j));
        }
    }
    out
}

/// One deletion of a prune plan. Every delete is conditional: a snapshot is addressed by its
/// exact id (snapshots are immutable), a base blob `If-Match` its ETag.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum PruneAction {
    /// A backup snapshot holding a version no promised instant needs.
    BackupSnapshot {
        name: String,
        snapshot: String,
        version: Etag,
        bytes: u64,
    },
    /// The whole backup history of a name deleted longer ago than the tombstone retention.
    BackupName {
        name: String,
        base_etag: Etag,
        bytes: u64,
        #[serde(with = "time::serde::rfc3339")]
        deleted_at: OffsetDateTime,
    },
    /// A source snapshot lakeguard made, whose version the backup holds.
    SourceSnapshot {
        name: String,
        snapshot: String,
        version: Etag,
        bytes: u64,
    },
}

impl PruneAction {
    pub fn name(&self) -> &str {
        match self {
            PruneAction::BackupSnapshot { name, .. }
            | PruneAction::BackupName { name, .. }
            | PruneAction::SourceSnapshot { name, .. } => name,
        }
    }
    pub fn bytes(&self) -> u64 {
        match self {
            PruneAction::BackupSnapshot { bytes, .. }
            | PruneAction::BackupName { bytes, .. }
            | PruneAction::SourceSnapshot { bytes, .. } => *bytes,
        }
    }
}

/// The two policies and the tombstone retention.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub backup: Keep,
    pub source_snapshots: Keep,
    pub tombstone_retention: Option<Duration>,
}

impl Policy {
    pub fn is_empty(&self) -> bool {
        self.backup.is_empty()
            && self.source_snapshots.is_empty()
            && self.tombstone_retention.is_none()
    }
}

/// What prune found for one name: its deletions, and what it left alone and why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamePlan {
    pub actions: Vec<PruneAction>,
    /// The name's history has rows that cannot be placed in time: nothing is deleted.
    pub unplaceable: bool,
    /// Source snapshots the policy does not need but whose version the backup does not hold
    /// (or not provably, or only from a later snapshot than this one): kept.
    pub kept_not_in_backup: u64,
}

/// The prune plan of one name from its backup and source rows (any order; rows of one name). A
/// tombstoned history is kept while the source holds the name again.
pub fn plan_name(
    backup: &[BlobEntry],
    source: &[BlobEntry],
    policy: &Policy,
    now: OffsetDateTime,
) -> NamePlan {
    let mut plan = NamePlan::default();
    let name = match backup.first().or(source.first()) {
        Some(r) => r.name.clone(),
        None => return plan,
    };
    let backup_hist = history_from_backup(&name, backup);
    if !backup_hist.unknown.is_empty() {
        plan.unplaceable = true;
        return plan;
    }
    let source_has_base = source
        .iter()
        .any(|r| r.snapshot.is_none() && r.name == name);
    let base = backup
        .iter()
        .find(|r| r.snapshot.is_none() && r.meta(SOURCE_ETAG).is_some());
    // A name deleted longer ago than the retention (and not back in the source): all of it.
    if let (Some(base), Some(retention)) = (base, policy.tombstone_retention) {
        let deleted_at = base.meta(DELETED_AT).and_then(metadata::parse_time);
        if let Some(d) = deleted_at {
            let older =
                d + time::Duration::try_from(retention).unwrap_or(time::Duration::MAX) <= now;
            let all_lakeguard = backup.iter().all(|r| r.meta(SOURCE_ETAG).is_some());
            if older && !source_has_base && all_lakeguard {
                plan.actions.push(PruneAction::BackupName {
                    name: name.clone(),
                    base_etag: base.etag.clone(),
                    bytes: backup.iter().map(|r| r.content_length).sum(),
                    deleted_at: d,
                });
                return plan;
            }
        }
    }
    if !policy.backup.is_empty() {
        let keep = needed(&backup_hist, &policy.backup, now);
        for row in backup.iter().filter(|r| r.snapshot.is_some()) {
            let Some(version) = row.meta(SOURCE_ETAG).map(Etag::new) else {
                continue; // not lakeguard's
            };
            if !keep.contains_key(&version) {
                plan.actions.push(PruneAction::BackupSnapshot {
                    name: name.clone(),
                    snapshot: row.snapshot.clone().unwrap_or_default(),
                    version,
                    bytes: row.content_length,
                });
            }
        }
    }
    if !policy.source_snapshots.is_empty() {
        let source_hist = history_from_source_snapshots(&name, source, None);
        let keep = needed(&source_hist, &policy.source_snapshots, now);
        // Versions the backup provably holds: a copy with the same length, which records the
        // source snapshot it came from (so the restore's windows do not rest on this snapshot).
        // Only rows this plan keeps count: a version whose backup copies go now is not held.
        let going: BTreeSet<&str> = plan
            .actions
            .iter()
            .filter_map(|a| match a {
                PruneAction::BackupSnapshot { snapshot, .. } => Some(snapshot.as_str()),
                _ => None,
            })
            .collect();
        // Each held version maps to the earliest source snapshot a kept copy records: a source
        // snapshot taken before it proves the version current earlier than the backup can (what
        // places a renamed or undeleted version, see `needed`), so only it and later ones go.
        let mut held: BTreeMap<(Etag, u64), OffsetDateTime> = BTreeMap::new();
        for r in backup
            .iter()
            .filter(|r| r.snapshot.as_deref().is_none_or(|s| !going.contains(s)))
            .filter(|r| r.meta(BACKED_UP_AT).is_some())
        {
            let (Some(e), Some(recorded)) = (
                r.meta(SOURCE_ETAG),
                r.meta(SOURCE_SNAPSHOT).and_then(metadata::parse_time),
            ) else {
                continue;
            };
            let first = held
                .entry((Etag::new(e), r.content_length))
                .or_insert(recorded);
            *first = (*first).min(recorded);
        }
        for row in source.iter().filter(|r| r.snapshot.is_some()) {
            let Some(version) = row.meta(SOURCE_ETAG).map(Etag::new) else {
                continue; // not made by lakeguard: never touched
            };
            if keep.contains_key(&version) {
                continue;
            }
            let taken = row.snapshot.as_deref().and_then(metadata::parse_time);
            let proven = held
                .get(&(version.clone(), row.content_length))
                .is_some_and(|first| taken.is_some_and(|t| *first <= t));
            if proven {
                plan.actions.push(PruneAction::SourceSnapshot {
                    name: name.clone(),
                    snapshot: row.snapshot.clone().unwrap_or_default(),
                    version,
                    bytes: row.content_length,
                });
            } else {
                plan.kept_not_in_backup += 1;
            }
        }
    }
    plan
}

/// What remains of `rows` after `actions` (for tests and dry-run reports).
pub fn apply(rows: &[BlobEntry], actions: &[PruneAction]) -> Vec<BlobEntry> {
    rows.iter()
        .filter(|r| {
            !actions.iter().any(|a| match a {
                PruneAction::BackupSnapshot { name, snapshot, .. }
                | PruneAction::SourceSnapshot { name, snapshot, .. } => {
                    &r.name == name && r.snapshot.as_ref() == Some(snapshot)
                }
                PruneAction::BackupName { name, .. } => &r.name == name,
            })
        })
        .cloned()
        .collect()
}

/// The state kind at `t`, for comparing restores before and after.
pub fn state_key(h: &History, t: OffsetDateTime) -> String {
    match state_at(h, t, None) {
        AtT::Present { version } => version.source_etag.as_str().to_owned(),
        AtT::Absent => "absent".into(),
        AtT::Unknown { .. } => "unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::testutil::*;
    use time::macros::datetime;

    #[test]
    fn policies_parse_and_print() {
        let k = Keep::parse("within=30d, monthly=12,last=3").unwrap();
        assert_eq!(k.within, Some(Duration::from_secs(30 * 86_400)));
        assert_eq!((k.monthly, k.last), (12, 3));
        assert_eq!(k.to_string(), "within=2592000s,last=3,monthly=12");
        assert!(Keep::parse("none").unwrap().is_empty());
        for bad in [
            "weekly",
            "monthly=x",
            "within=3q",
            "forever=1",
            "within=200y",
        ] {
            assert!(Keep::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_duration("90m").unwrap(), Duration::from_secs(5400));
    }

    #[test]
    fn calendar_buckets() {
        let now = datetime!(2026-12-03 12:34:56 UTC); // a Thursday
        let p = promises(
            &Keep {
                hourly: 2,
                daily: 2,
                weekly: 2,
                monthly: 3,
                yearly: 2,
                ..Default::default()
            },
            now,
        );
        let want = [
            datetime!(2025-01-01 0:00 UTC),
            datetime!(2026-01-01 0:00 UTC),
            datetime!(2026-10-01 0:00 UTC),
            datetime!(2026-11-01 0:00 UTC),
            datetime!(2026-11-23 0:00 UTC),
            datetime!(2026-11-30 0:00 UTC),
            datetime!(2026-12-01 0:00 UTC),
            datetime!(2026-12-02 0:00 UTC),
            datetime!(2026-12-03 0:00 UTC),
            datetime!(2026-12-03 11:00 UTC),
            datetime!(2026-12-03 12:00 UTC),
            now,
        ];
        assert_eq!(p.instants, want);
        assert_eq!(p.window_from, None);
    }

    fn v(name: &str, b: &str, etag: &str, lm: i64, kept_at: Option<i64>) -> BlobEntry {
        let r = backup_row(name, b, etag, lm);
        match kept_at {
            Some(t) => snapshot(r, t),
            None => r,
        }
    }

    #[test]
    fn keeps_what_the_promises_need_and_deletes_the_rest() {
        // Versions at 100, 200, ..., 1000; the base holds the last.
        let mut rows: Vec<BlobEntry> = (1..10)
            .map(|i| {
                v(
                    "f",
                    &format!("b{i}"),
                    &format!("v{i}"),
                    i * 100,
                    Some(i * 100 + 100),
                )
            })
            .collect();
        rows.push(v("f", "b10", "v10", 1000, None));
        let now = ts(1050);
        let policy = Policy {
            backup: Keep {
                within: Some(Duration::from_secs(250)),
                last: 1,
                ..Default::default()
            },
            ..Default::default()
        };
        let plan = plan_name(&rows, &[], &policy, now);
        let gone: Vec<&str> = plan
            .actions
            .iter()
            .map(|a| match a {
                PruneAction::BackupSnapshot { version, .. } => version.as_str(),
                _ => panic!(),
            })
            .collect();
        // The window starts at 800: v7 was current then; v8, v9, v10 started inside it.
        assert_eq!(gone, ["v1", "v2", "v3", "v4", "v5", "v6"]);
        // An empty policy prunes nothing.
        assert!(plan_name(&rows, &[], &Policy::default(), now)
            .actions
            .is_empty());
    }

    /// A rename or undelete keeps an older Last-Modified: the versions before it place it (their
    /// proof instants set its floor). Pruning the version that sets the floor would make the
    /// rebuilt history start it at its Last-Modified, before the version it replaced had ended.
    #[test]
    fn keeps_the_version_that_places_a_kept_version_with_an_older_last_modified() {
        let seen =
            |r: BlobEntry, t: i64| with_meta(r, SOURCE_SNAPSHOT, &metadata::format_time(ts(t)));
        // 08:00 a1 (seen 08:00:30); 09:10 x (seen 09:50); b, renamed into place with its
        // Last-Modified of 08:30, seen 09:55. Hourly instants 08:00, 09:00 and 10:00.
        let rows = vec![
            snapshot(seen(backup_row("f", "b1", "a1", 0), 30), 4_231),
            snapshot(seen(backup_row("f", "b2", "x", 4_200), 6_600), 6_931),
            seen(backup_row("f", "b3", "b", 1_800), 6_900),
        ];
        let now = ts(9_000);
        let policy = Policy {
            backup: Keep {
                hourly: 3,
                ..Default::default()
            },
            ..Default::default()
        };
        let before = history_from_backup("f", &rows);
        assert_eq!(state_key(&before, ts(3_600)), "a1", "{before:#?}");
        let plan = plan_name(&rows, &[], &policy, now);
        let after = history_from_backup("f", &apply(&rows, &plan.actions));
        for t in promises(&policy.backup, now).instants {
            assert_eq!(
                state_key(&after, t),
                state_key(&before, t),
                "at {t}: {plan:#?}"
            );
        }
        assert!(plan.actions.is_empty(), "x places b: {plan:#?}");
        assert_eq!(
            needed(&before, &policy.backup, now).get(&Etag::new("x")),
            Some(&Why::Places)
        );
    }

    #[test]
    fn tombstones_expire_with_their_history_unless_back_in_the_source() {
        let rows = vec![
            v("g", "b1", "v1", 10, Some(20)),
            with_time(v("g", "b1t", "v1", 10, None), DELETED_AT, 100),
        ];
        let policy = Policy {
            tombstone_retention: Some(Duration::from_secs(50)),
            ..Default::default()
        };
        let plan = plan_name(&rows, &[], &policy, ts(200));
        assert!(matches!(
            &plan.actions[..],
            [PruneAction::BackupName { .. }]
        ));
        assert!(plan_name(&rows, &[], &policy, ts(140)).actions.is_empty());
        let back = [entry("g", "v2", 150)];
        assert!(plan_name(&rows, &back, &policy, ts(200)).actions.is_empty());
    }

    #[test]
    fn source_snapshots_go_only_when_the_backup_holds_their_version() {
        let src_snap = |etag: &str, at: i64| {
            snapshot(
                with_time(
                    with_meta(entry("s", &format!("snap-{etag}"), at), SOURCE_ETAG, etag),
                    metadata::SOURCE_LAST_MODIFIED,
                    at,
                ),
                at + 1,
            )
        };
        let source = vec![
            src_snap("v1", 10),
            src_snap("v2", 20),
            snapshot(entry("s", "foreign", 25), 26),
            entry("s", "v3", 30),
        ];
        let proven = |r: BlobEntry, snap: i64| {
            with_meta(r, SOURCE_SNAPSHOT, &metadata::format_time(ts(snap)))
        };
        // v1 is in the backup with its proof; v2's copy does not record its source snapshot.
        let backup = vec![
            snapshot(proven(v("s", "b1", "v1", 10, None), 11), 21),
            v("s", "b2", "v2", 20, None),
        ];
        let policy = Policy {
            source_snapshots: Keep {
                within: Some(Duration::from_secs(5)),
                ..Default::default()
            },
            ..Default::default()
        };
        let plan = plan_name(&backup, &source, &policy, ts(100));
        assert_eq!(plan.actions.len(), 1, "{plan:?}");
        assert!(
            matches!(&plan.actions[0], PruneAction::SourceSnapshot { version, .. } if version.as_str() == "v1")
        );
        assert_eq!(plan.kept_not_in_backup, 1);
        // A source snapshot taken before the one the backup's copy records (here at 11, the copy
        // records 12) proves the version earlier than the backup can: it stays.
        let later_proof = vec![
            snapshot(proven(v("s", "b1", "v1", 10, None), 12), 21),
            v("s", "b2", "v2", 20, None),
        ];
        let plan = plan_name(&later_proof, &source, &policy, ts(100));
        assert!(plan.actions.is_empty(), "{plan:?}");
        assert_eq!(plan.kept_not_in_backup, 2);
        // A version whose backup copy this same plan deletes is not held: its source snapshot
        // stays (no version ever leaves both places).
        let both = Policy {
            backup: Keep {
                last: 1,
                ..Default::default()
            },
            ..policy
        };
        let backup = vec![
            snapshot(proven(v("s", "b1", "v1", 10, None), 11), 21),
            proven(v("s", "b3", "v3", 30, None), 31),
        ];
        let plan = plan_name(&backup, &source, &both, ts(100));
        assert!(
            plan.actions
                .iter()
                .all(|a| !matches!(a, PruneAction::SourceSnapshot { .. })),
            "{plan:?}"
        );
        assert!(plan.actions.iter().any(
            |a| matches!(a, PruneAction::BackupSnapshot { version, .. } if version.as_str() == "v1")
        ));
    }
}

#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;
    use crate::core::testutil::*;

    /// A year of one blob's life: (minutes since the previous event, write or delete). Half of
    /// the gaps are whole hours, so that writes land on bucket ends (whose instant then lies
    /// inside the write's one-second window: every candidate must stay).
    fn events() -> impl Strategy<Value = Vec<(i64, bool, Option<i64>)>> {
        let gap = prop_oneof![
            1i64..40_000,
            (1i64..200).prop_map(|h| h * 60),
            1i64..90,
            (1i64..4).prop_map(|h| h * 60),
        ];
        // One write in five keeps an older Last-Modified (an ADLS rename or an undelete moves a
        // version into place with the one it had), up to a few days before its write.
        let older = prop::option::weighted(0.2, prop_oneof![1i64..90, 1i64..6_000]);
        prop::collection::vec((gap, prop::bool::weighted(0.8), older), 1..25)
    }

    fn keep() -> impl Strategy<Value = Keep> {
        (
            prop::option::of(1u64..60 * 86_400),
            0u32..3,
            0u32..30,
            0u32..10,
            0u32..6,
            0u32..14,
            0u32..3,
        )
            .prop_map(|(w, last, hourly, daily, weekly, monthly, yearly)| Keep {
                within: w.map(Duration::from_secs),
                last,
                hourly,
                daily,
                weekly,
                monthly,
                yearly,
            })
    }

    /// Backup rows of the simulated life (the worker's protocol: base = newest, the previous
    /// base kept as a snapshot before every overwrite or tombstone; each copy records the
    /// source snapshot taken 30 s after the write), and the instants of the events. A write with
    /// `older` minutes carries a Last-Modified that much before it.
    fn simulate(evs: &[(i64, bool, Option<i64>)]) -> (Vec<BlobEntry>, Vec<i64>) {
        let mut rows = Vec::new();
        let mut base: Option<BlobEntry> = None;
        let mut t = 0i64;
        let mut times = Vec::new();
        let mut present = false;
        for (n, &(gap, write, older)) in evs.iter().enumerate() {
            t += gap * 60;
            times.push(t);
            if write {
                if let Some(b) = base.take() {
                    rows.push(snapshot(b, t + 31));
                }
                let lm = t - older.unwrap_or(0) * 60;
                let r = with_meta(
                    backup_row("f", &format!("b{n}"), &format!("v{n}"), lm),
                    SOURCE_SNAPSHOT,
                    &metadata::format_time(ts(t + 30)),
                );
                base = Some(r);
                present = true;
            } else if present {
                let b = base.take().expect("present");
                rows.push(snapshot(b.clone(), t + 31));
                let mut tomb = with_time(b, DELETED_AT, t + 30);
                tomb.etag = Etag::new(format!("b{n}t"));
                base = Some(tomb);
                present = false;
            }
        }
        rows.extend(base);
        (rows, times)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// The invariant: at every instant the policy promises, a restore answers the same after
        /// pruning as before; and every version current at a bucket end is kept.
        #[test]
        fn pruning_never_changes_a_promised_restore(
            evs in events(), k in keep(),
            extra in prop_oneof![0i64..200_000, 0i64..7_200],
        ) {
            let (rows, times) = simulate(&evs);
            let end = times.last().copied().unwrap_or(0);
            let now = ts(end + extra);
            let policy = Policy { backup: k.clone(), ..Default::default() };
            let plan = plan_name(&rows, &[], &policy, now);
            let after_rows = apply(&rows, &plan.actions);
            let before = history_from_backup("f", &rows);
            let after = history_from_backup("f", &after_rows);
            let p = promises(&k, now);
            let mut checks: Vec<OffsetDateTime> = p.instants.clone();
            if let Some(w) = p.window_from {
                // The window's start, every event time inside it (and around it), and a grid.
                checks.push(w);
                for &e in &times {
                    for d in [-1, 0, 1, 30, 31, 60] {
                        let t = ts(e + d);
                        if t >= w && t <= now { checks.push(t); }
                    }
                }
                let span = (now - w).whole_seconds().max(1);
                for i in 0..50 {
                    checks.push(w + time::Duration::seconds(span * i / 50));
                }
            }
            for t in checks {
                prop_assert!(p.covers(t, now));
                prop_assert_eq!(state_key(&after, t), state_key(&before, t), "t={}", t);
            }
            // The base (latest) is never touched.
            prop_assert_eq!(
                after_rows.iter().any(|r| r.snapshot.is_none()),
                rows.iter().any(|r| r.snapshot.is_none())
            );
        }
    }
}
