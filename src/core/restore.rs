//! Restore planning: each name's state at T (from [`super::history`]) joined with the target
//! container's listing into a plan.
//!
//! What a restore may do, by construction of the plan:
//! - write a version only over a blob whose ETag it checked (the overwritten state is kept as an
//!   undo snapshot by the I/O layer);
//! - delete only when the history proves the name absent at T (a tombstone covering T, or T
//!   before every version while lakeguard's coverage of the container had begun) — never because
//!   the history is silent;
//! - skip a blob as "unchanged" on its Last-Modified alone only where the history says nothing
//!   against it (an ADLS rename onto a path or an undelete brings back an old Last-Modified).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

pub use super::history::{
    before_history, history_from, history_from_backup, history_from_source_snapshots, start_by,
    state_at, AtT, ContentRef, History, Side, UnknownSpan, Version,
};
use super::join::{join_step, JoinError, JoinStep, NameOrder, Named, SortedInput};
use crate::model::metadata::RESTORED_FROM_ETAG;
use crate::model::{BlobEntry, Etag, Security};

/// One name's state at the restore point: the planner's left input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameState {
    pub name: String,
    pub state: AtT,
    /// Every source ETag the history knows for the name.
    pub known: Vec<Etag>,
    /// Of those, the versions whose content the backup account holds (proven copies): what a
    /// delete may let go of without keeping an undo copy.
    pub backed_up: Vec<Etag>,
}

impl NameState {
    /// A state with no history behind it (tests, and names only the target knows).
    pub fn bare(name: impl Into<String>, state: AtT) -> Self {
        NameState {
            name: name.into(),
            state,
            known: Vec::new(),
            backed_up: Vec::new(),
        }
    }
}

impl Named for NameState {
    fn name(&self) -> &str {
        &self.name
    }
}

/// Which accounts' rows a history is built from (`--from backup|backup-only|snapshots`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryFrom {
    /// The backup account, with the source's snapshots and live blobs filling in what the backup
    /// has not received yet (a backlog): the default.
    #[default]
    Backup,
    /// The backup account alone (the source account is lost or unreachable).
    BackupOnly,
    /// The source account's own snapshots (fast, same account; blind to blobs deleted together
    /// with their snapshots).
    SourceSnapshots,
}

impl HistoryFrom {
    pub fn reads_backup(self) -> bool {
        self != HistoryFrom::SourceSnapshots
    }
    pub fn reads_source(self) -> bool {
        self != HistoryFrom::BackupOnly
    }
}

/// What a name's state is computed against.
#[derive(Clone, Copy, Debug)]
pub struct StateContext {
    pub at: OffsetDateTime,
    /// Start of lakeguard's first complete pass over the container, when recorded.
    pub coverage: Option<OffsetDateTime>,
    /// When the source listing was taken: its live blobs were current then.
    pub listed_at: Option<OffsetDateTime>,
}

/// One name's rows from the backup and the source (any order, either may be empty) to the
/// planner's input. `None` when both are empty.
pub fn name_state(
    from: HistoryFrom,
    backup: &[BlobEntry],
    source: &[BlobEntry],
    ctx: &StateContext,
) -> Option<NameState> {
    let name = backup.first().or(source.first())?.name.clone();
    let history = match from {
        HistoryFrom::Backup => history_from(&name, backup, source, ctx.listed_at),
        HistoryFrom::BackupOnly => history_from_backup(&name, backup),
        HistoryFrom::SourceSnapshots => history_from_source_snapshots(&name, source, ctx.listed_at),
    };
    Some(NameState {
        state: state_at(&history, ctx.at, ctx.coverage),
        known: history
            .versions
            .iter()
            .map(|v| v.source_etag.clone())
            .collect(),
        backed_up: history.backed_up(),
        name,
    })
}

/// Where the restore writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestoreTarget {
    /// The original container in the source account. Blobs proven absent at T are deleted.
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
    /// Start of lakeguard's first complete pass over the container (see [`before_history`]), for
    /// names no history knows.
    pub coverage: Option<OffsetDateTime>,
}

/// One line of a restore plan.
// Streamed one at a time (and spooled as JSON): boxing the version would only add allocations.
#[allow(clippy::large_enum_variant)]
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
        /// Hierarchical source: the owner, group, permissions and ACL current at T, set on the
        /// target once the content (or directory) is there.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        security: Option<Security>,
    },
    /// Hierarchical source and target: the target holds the content (or directory) of T but
    /// another security state; only the security state is set (Path Update setAccessControl).
    SetSecurity {
        name: String,
        security: Security,
        /// Whether the path is a directory (for reports).
        #[serde(default)]
        directory: bool,
        /// The target's ETag when planned: the change is `If-Match` it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target_etag: Option<Etag>,
    },
    /// In place only: the blob provably did not exist at T. Delete conditionally on
    /// `target_etag`; its snapshots go with it only after each one whose version is not in
    /// `backed_up` (versions the backup account holds) has been copied to the undo area.
    Delete {
        name: String,
        target_etag: Etag,
        #[serde(default)]
        backed_up: Vec<Etag>,
    },
    /// The target already holds the version of T: its ETag is the version's source ETag, its
    /// `lakeguard_restored_from_etag` names it (a previous, possibly interrupted run restored
    /// it), or, in place, the history says nothing against it and it was certainly last modified
    /// by T. This is what makes a rerun finish the job and do nothing twice.
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
            | PlanItem::SetSecurity { name, .. }
            | PlanItem::LeftAlone { name, .. }
            | PlanItem::Unavailable { name, .. } => name,
        }
    }

    /// True for items that replace or remove an existing target blob, or replace an existing
    /// path's owner, group and ACL (`SetSecurity`: the state it replaces is not kept as undo
    /// data), so they need --force.
    pub fn is_destructive(&self) -> bool {
        matches!(
            self,
            PlanItem::Restore {
                target_etag: Some(_),
                ..
            } | PlanItem::Delete { .. }
                | PlanItem::SetSecurity { .. }
        )
    }
}

/// The per-name decision. `state` is `None` when no history has a row for the name: then it is
/// absent only under coverage ([`before_history`]).
pub fn plan_name(
    opts: &PlanOptions,
    name: &str,
    state: Option<NameState>,
    target: Option<BlobEntry>,
) -> Option<PlanItem> {
    let name = name.to_owned();
    let state = state.unwrap_or_else(|| {
        NameState::bare(name.clone(), before_history(&name, opts.at, opts.coverage))
    });
    // Directory placeholders are not data: never deleted, never a reason to report anything.
    // One standing where a file must be restored is overwritten (and that write may fail).
    let target = target
        .filter(|t| !t.is_directory_placeholder() || matches!(state.state, AtT::Present { .. }));
    let Some(t) = target else {
        return match state.state {
            AtT::Present { version } => Some(PlanItem::Restore {
                name,
                security: version.security_at(opts.at).cloned(),
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
    // In place, a blob certainly last written by T held this content at T — unless the history
    // knows better: an ADLS rename onto the path or an undelete brings back an old Last-Modified,
    // so Last-Modified decides only for names whose history says nothing (unknown), and a
    // history that does not know the blob's version cannot prove it absent.
    let untouched_since_t = opts.target == RestoreTarget::InPlace
        && !t.is_directory_placeholder()
        && start_by(t.last_modified) <= opts.at;
    let version_known = state.known.contains(&t.etag);
    // The security state of T, where the target's listing shows another (hierarchical
    // target); `None` where it matches or cannot be compared.
    let security_to_set = |version: &Version| {
        let want = version.security_at(opts.at)?;
        let have = t.security.as_ref()?;
        (!have.same_as(want)).then(|| want.clone())
    };
    Some(match state.state {
        AtT::Present { version } if version.directory => {
            if !t.is_directory_placeholder() {
                PlanItem::Unavailable {
                    why: format!(
                        "{name:?} was a directory at T; a file (version {}) is there now, left as it is",
                        t.etag
                    ),
                    name,
                    target_etag: Some(t.etag),
                }
            } else {
                match security_to_set(&version) {
                    Some(security) => PlanItem::SetSecurity {
                        name,
                        security,
                        directory: true,
                        target_etag: Some(t.etag),
                    },
                    None => PlanItem::Unchanged { name },
                }
            }
        }
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
                match security_to_set(&version) {
                    Some(security) => PlanItem::SetSecurity {
                        name,
                        security,
                        directory: false,
                        target_etag: Some(t.etag),
                    },
                    None => PlanItem::Unchanged { name },
                }
            } else {
                PlanItem::Restore {
                    name,
                    security: version.security_at(opts.at).cloned(),
                    version,
                    target_etag: Some(t.etag),
                }
            }
        }
        AtT::Absent => match opts.target {
            RestoreTarget::InPlace if untouched_since_t && !version_known => {
                PlanItem::Unavailable {
                    why: format!(
                        "the history says {name:?} was absent at T, but the blob (version {}, not in the history) was last modified by {}, before T: renamed onto the path or undeleted? Left as it is",
                        t.etag,
                        crate::model::metadata::format_time(t.last_modified)
                    ),
                    name,
                    target_etag: Some(t.etag),
                }
            }
            RestoreTarget::InPlace => PlanItem::Delete {
                name,
                target_etag: t.etag,
                backed_up: state.backed_up,
            },
            RestoreTarget::Elsewhere => PlanItem::LeftAlone {
                name,
                target_etag: t.etag,
            },
        },
        AtT::Unknown { .. } if untouched_since_t && !version_known => PlanItem::Unchanged { name },
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
                    if let Some(item) = plan_name(&self.opts, &name, s, t) {
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
    /// Hierarchical target: paths whose content is as at T but whose security state is not.
    #[serde(default)]
    pub set_security: u64,
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
            PlanItem::SetSecurity { .. } => self.set_security += 1,
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

    fn opts(target: RestoreTarget, at: i64) -> PlanOptions {
        PlanOptions {
            at: ts(at),
            target,
            prefix: None,
            order: NameOrder::Utf16Units,
            coverage: Some(ts(0)),
        }
    }

    fn present(name: &str, etag: &str, lm: i64) -> NameState {
        let h = history_from_backup(name, &[backup_row(name, "b", etag, lm)]);
        NameState {
            name: name.into(),
            state: state_at(&h, ts(lm + 1), None),
            known: vec![Etag::new(etag)],
            backed_up: vec![Etag::new(etag)],
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
                PlanItem::SetSecurity { name, .. } => format!("{name}:security"),
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
            NameState::bare("old", AtT::Absent),
            present("over", "o1", 10),
            present("restored", "r1", 10),
            NameState::bare("unk", AtT::Unknown { why: "gap".into() }),
            NameState::bare("unk-untouched", AtT::Unknown { why: "gap".into() }),
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

    /// Issue 15, defect 4: in place, Last-Modified at or before T does not overrule a history
    /// that knows the version at T (an ADLS rename or an undelete brings back old content with
    /// an old Last-Modified).
    #[test]
    fn in_place_last_modified_does_not_overrule_the_history() {
        let o = opts(RestoreTarget::InPlace, 50);
        let one = |state: NameState, target: BlobEntry| {
            short(&plan_restore(o.clone(), vec![state], vec![target]).unwrap())
        };
        // The history says v1 at T; the blob is another version, last modified long before T.
        assert_eq!(
            one(present("f", "v1", 10), entry("f", "old", 5)),
            ["f:overwrite"]
        );
        // Proven absent at T, but the blob's own version is unknown to the history and its
        // Last-Modified says it existed then: a contradiction, reported, nothing deleted.
        let absent = |known: &[&str]| NameState {
            known: known.iter().map(Etag::new).collect(),
            ..NameState::bare("f", AtT::Absent)
        };
        assert_eq!(one(absent(&[]), entry("f", "x", 5)), ["f:unavailable"]);
        // The history knows that version (it arrived after T): deleted.
        assert_eq!(one(absent(&["x"]), entry("f", "x", 5)), ["f:delete"]);
        // Unknown: Last-Modified decides only for a version the history does not know.
        let unknown = |known: &[&str]| NameState {
            known: known.iter().map(Etag::new).collect(),
            ..NameState::bare("f", AtT::Unknown { why: "gap".into() })
        };
        assert_eq!(one(unknown(&[]), entry("f", "x", 5)), ["f:unchanged"]);
        assert_eq!(one(unknown(&["x"]), entry("f", "x", 5)), ["f:unavailable"]);
        // Last-Modified counts to the end of its second: 50 is not after a write at 50.x.
        assert_eq!(one(unknown(&[]), entry("f", "x", 50)), ["f:unavailable"]);
    }

    /// Issue 15, defect 1 (pure part): a name no history knows is deleted in place only under
    /// coverage; without it, it is unavailable.
    #[test]
    fn names_without_history_are_deleted_only_under_coverage() {
        let covered = opts(RestoreTarget::InPlace, 50);
        let uncovered = PlanOptions {
            coverage: None,
            ..covered.clone()
        };
        let late = [entry("late", "x", 70)];
        assert_eq!(
            short(&plan_restore(covered, vec![], late.clone()).unwrap()),
            ["late:delete"]
        );
        let plan = plan_restore(uncovered, vec![], late).unwrap();
        assert_eq!(short(&plan), ["late:unavailable"]);
        assert!(!plan[0].is_destructive());
    }

    #[test]
    fn plan_into_an_empty_container_restores_everything_present() {
        let states = vec![
            present("a", "1", 1),
            NameState::bare("b", AtT::Absent),
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

    /// Issue 18: the security state of T travels with a restore; content already as at T but
    /// another security state on a hierarchical target is `SetSecurity`; a directory of T is
    /// never overwritten, only given its security state.
    #[test]
    fn security_and_directories_in_the_plan() {
        use crate::model::security::{Security, DIRECTORY};
        let sec = |acl: &str| Security {
            owner: "o".into(),
            group: "g".into(),
            permissions: "rw-r-----".into(),
            acl: acl.into(),
        };
        let with_states = |mut st: NameState, states: &[(i64, &str)], dir: bool| {
            if let AtT::Present { version } = &mut st.state {
                version.directory = dir;
                version.security = states
                    .iter()
                    .map(|(at, acl)| crate::core::history::SecurityState {
                        at: Some(ts(*at)),
                        state: sec(acl),
                    })
                    .collect();
            }
            st
        };
        let file = with_states(
            present("f", "f1", 10),
            &[(20, "user::r--"), (40, "user::rw-")],
            false,
        );
        let dir = with_states(
            present("d", "lakeguard-directory", 10),
            &[(20, "user::rwx")],
            true,
        );
        let listed = |e: BlobEntry, acl: &str| BlobEntry {
            security: Some(sec(acl)),
            ..e
        };
        let mut dir_row = with_meta(entry("d", "0xD", 5), HDI_ISFOLDER, "true");
        dir_row.content_length = 0;
        dir_row.metadata.insert(DIRECTORY.into(), "true".into());
        let plan_at = |t: i64, states: Vec<NameState>, target: Vec<BlobEntry>| {
            plan_restore(opts(RestoreTarget::InPlace, t), states, target).unwrap()
        };
        // Absent targets: restored with the state of T.
        let plan = plan_at(30, vec![dir.clone(), file.clone()], vec![]);
        match &plan[1] {
            PlanItem::Restore { security, .. } => {
                assert_eq!(security.as_ref().unwrap().acl, "user::r--")
            }
            other => panic!("{other:?}"),
        }
        let plan = plan_at(50, vec![file.clone()], vec![]);
        assert!(
            matches!(&plan[0], PlanItem::Restore { security: Some(s), .. } if s.acl == "user::rw-")
        );
        // Same content, other ACL: only the security step; same ACL: unchanged.
        let target = vec![
            listed(dir_row.clone(), "user::---"),
            listed(entry("f", "f1", 10), "user::rw-"),
        ];
        let plan = plan_at(30, vec![dir.clone(), file.clone()], target.clone());
        assert_eq!(short(&plan), ["d:security", "f:security"]);
        let plan = plan_at(50, vec![dir.clone(), file.clone()], target);
        assert_eq!(short(&plan), ["d:security", "f:unchanged"]);
        // A flat target listing (no security) cannot be compared: unchanged.
        let plan = plan_at(30, vec![file.clone()], vec![entry("f", "f1", 10)]);
        assert_eq!(short(&plan), ["f:unchanged"]);
        // A file where the directory was: left alone, reported.
        let plan = plan_at(
            30,
            vec![dir],
            vec![listed(entry("d", "0xF", 5), "user::rw-")],
        );
        assert_eq!(short(&plan), ["d:unavailable"]);
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
        let ctx = StateContext {
            at: ts(35),
            coverage: None,
            listed_at: None,
        };
        let state = name_state(HistoryFrom::Backup, &a_txt, &[], &ctx).unwrap();
        assert_eq!(state.state, AtT::Absent);
        assert_eq!(state.known.len(), 3);
        assert_eq!(name_state(HistoryFrom::Backup, &[], &[], &ctx), None);
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
            let in_place = o.target == RestoreTarget::InPlace;
            // Certainly last written by T, and a version the history does not know.
            let untouched = |t: &Tg| {
                in_place && ts(t.lm + 1) <= o.at && !matches!(st, St::Present(e) if e == t.etag)
            };
            let what = match (&st, tg) {
                (St::Absent, None) => continue,
                (St::Present(_), None) => "restore",
                (St::Unknown, None) => "unavailable",
                (St::Present(e), Some(t)) if t.etag == *e || t.restored_from == Some(*e) => {
                    "unchanged"
                }
                (St::Present(_), Some(_)) => "overwrite",
                (St::Absent, Some(t)) if untouched(t) => "unavailable",
                (St::Absent, Some(_)) if in_place => "delete",
                (St::Absent, Some(_)) => "left_alone",
                (St::Unknown, Some(t)) if untouched(t) => "unchanged",
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
                let (state, known) = match st {
                    St::Present(e) => {
                        let h = history_from_backup(n, &[backup_row(n, "b", &format!("e{e}"), 0)]);
                        (state_at(&h, ts(1), None), vec![Etag::new(format!("e{e}"))])
                    }
                    St::Absent => (AtT::Absent, vec![]),
                    St::Unknown => (AtT::Unknown { why: "test".into() }, vec![]),
                };
                states.push(NameState {
                    name: n.clone(),
                    state,
                    backed_up: known.clone(),
                    known,
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
            PlanItem::SetSecurity { .. } => "security",
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
                coverage: Some(ts(0)),
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
