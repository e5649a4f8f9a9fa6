//! Point-in-time restore: the pure time machine and planner of `core::restore` driven over real
//! listings, then carried out with server-side copies.
//!
//! Phases, and why they are separate:
//! 1. **Plan** (streaming). The history account (the backup account, or with `--from snapshots`
//!    the source account's own snapshots) is listed with snapshots and metadata, grouped by exact
//!    name ([`NameGroups`]), turned into each name's state at T ([`name_state`]) and merge-joined
//!    with the target container's flat listing ([`RestorePlanner`]). Memory is bounded by one
//!    listing page per side: the actionable items (restores and deletes) are spooled to a
//!    temporary file, not kept in memory, and only the first [`MAX_LISTED_ITEMS`] items are kept
//!    for display.
//! 2. **Check intent**. Nothing is written before the whole plan is known: in place needs
//!    `force`; another target needs `force` only when the plan overwrites something there.
//! 3. **Execute** the spooled plan with bounded concurrency. Every write is conditional on what
//!    the plan saw: an overwrite is `If-Match` the planned ETag, a new blob `If-None-Match: *`, a
//!    delete `If-Match`. A target that changed between plan and execution is left as it is and
//!    reported (`changed_since_plan`), never overwritten. The copy source is read
//!    `source-if-match` the ETag of the history row, so a version cannot be swapped underneath.
//!
//! Undo. Before an overwrite, the target blob is snapshotted in place (snapshot metadata
//! `lakeguard_restore_undo` = the restore id), so the restore itself can be undone from the
//! target's own snapshots. A delete cannot keep an in-place snapshot: Azure refuses to delete a
//! base blob that has snapshots unless they are deleted with it (`x-ms-delete-snapshots:
//! include`). So before a delete the blob's current content is copied (server-side, `source
//! if-match`) into the backup account under `lakeguard-restores/<id>/undo/<container>/<name>`,
//! and only then is the blob deleted; if it has snapshots they go with it (they hold versions
//! newer than T; those the worker received are in the backup account's history anyway).
//!
//! Resumable. A restored blob carries `lakeguard_restored_from_etag` (plus the version's user
//! metadata and content type), which the planner recognises as "already done": running the same
//! restore again finishes what is left and does nothing twice. Deletes are naturally idempotent.
//! The one thing a rerun may repeat is an undo snapshot: a run stopped between the undo snapshot
//! and the copy of an overwrite leaves a snapshot of a state that the rerun snapshots again
//! (each run has its own id; a duplicate undo snapshot is harmless and cheap).

use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use futures::{stream, StreamExt};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tracing::{info, warn};

use super::{BlobFailure, OpError, Progress, MAX_REPORTED_FAILURES};
use crate::app::App;
use crate::copy::direct::{server_side_copy, BlockOptions, CopyFrom, CopyTo};
use crate::core::join::JoinError;
use crate::core::restore::{
    name_state, HistoryFrom, PlanItem, PlanOptions, PlanStep, PlanSummary, RestorePlanner,
    RestoreTarget,
};
use crate::model::{metadata, Etag};
use crate::storage::blob::{ListOptions, TargetCondition};
use crate::storage::sas::DelegationKeyCache;
use crate::storage::{BlobStore, Lister, StorageError};

/// Container of the backup account reserved for restore bookkeeping: status documents
/// (`<id>/status.json`) and undo copies of deleted blobs (`<id>/undo/<container>/<name>`).
/// A source container of this name would collide with it; lakeguard refuses to restore into it.
pub const RESERVED_CONTAINER: &str = crate::settings::RESTORES_CONTAINER;

/// Metadata on the undo snapshot taken before an overwrite: the id of the restore that took it.
pub const RESTORE_UNDO: &str = "lakeguard_restore_undo";

/// Metadata on an undo copy of a snapshot of a deleted blob: the snapshot it was.
pub const UNDO_OF_SNAPSHOT: &str = "lakeguard_undo_of_snapshot";

/// Plan items kept for display (table, JSON, HTTP); counts stay exact beyond it.
pub const MAX_LISTED_ITEMS: usize = 1000;

/// Where a restore writes, when not in place.
#[derive(Clone, Debug)]
pub struct TargetSpec {
    pub store: BlobStore,
    pub container: String,
}

#[derive(Clone, Debug)]
pub struct RestoreRequest {
    pub container: String,
    pub prefix: Option<String>,
    pub at: OffsetDateTime,
    pub from: HistoryFrom,
    /// `None`: in place (the source container itself).
    pub to: Option<TargetSpec>,
    pub dry_run: bool,
    pub force: bool,
    /// Carry out at most this many actionable items (restores in batches; the rest is reported
    /// as `not_attempted` and a rerun continues).
    pub limit: Option<u64>,
    /// Carry out only a random sample of at most this many restores (restore drill).
    pub sample: Option<usize>,
    /// Restore id (status document, undo copies); generated when `None`.
    pub id: Option<String>,
}

impl RestoreRequest {
    pub fn new(container: impl Into<String>, at: OffsetDateTime) -> Self {
        RestoreRequest {
            container: container.into(),
            prefix: None,
            at,
            from: HistoryFrom::Backup,
            to: None,
            dry_run: false,
            force: false,
            limit: None,
            sample: None,
            id: None,
        }
    }
}

/// The request as reported (no credentials: accounts by name only).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RequestInfo {
    pub container: String,
    pub prefix: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub from: HistoryFrom,
    pub in_place: bool,
    pub target_account: String,
    pub target_container: String,
    pub dry_run: bool,
    pub force: bool,
}

/// What happened when the plan was carried out.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ExecReport {
    /// Blobs written with their version at T (new and overwritten).
    pub restored: u64,
    /// Of `restored`: blobs that replaced an existing target blob.
    pub overwritten: u64,
    pub deleted: u64,
    /// Snapshots of target blobs taken before overwriting them.
    pub undo_snapshots: u64,
    /// Copies of deleted blobs kept under `lakeguard-restores/<id>/undo/`.
    pub undo_copies: u64,
    /// Copies of the snapshots of deleted blobs whose versions the backup did not hold, kept
    /// under `lakeguard-restores/<id>/undo-snapshots/` before the snapshots went with their blob.
    #[serde(default)]
    pub undo_snapshot_copies: u64,
    /// Items carried out whose undo record (in place: `lakeguard-restores/<id>/written/`) could
    /// not be written: `restore --undo` cannot prove them unchanged and leaves them.
    #[serde(default)]
    pub undo_records_failed: u64,
    /// Target blobs that changed between plan and execution: left untouched.
    pub changed_since_plan: u64,
    pub changed: Vec<String>,
    pub failed: u64,
    pub failures: Vec<BlobFailure>,
    /// Hierarchical restores: directories recreated.
    #[serde(default)]
    pub directories: u64,
    /// Hierarchical restores: paths given their owner, group, permissions and ACL of T.
    #[serde(default)]
    pub security_set: u64,
    /// Of `failed`: paths whose content is restored but whose security state could not be set
    /// (listed in `failures`).
    #[serde(default)]
    pub security_failed: u64,
    /// Actionable items beyond `limit`, left for the next run.
    pub not_attempted: u64,
}

/// What the plan's history was read from, and what it cannot see.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HistoryInfo {
    pub backup_read: bool,
    /// The source's own rows (snapshots, live blobs) were read: versions still waiting in the
    /// backup queue are restorable from them.
    pub source_read: bool,
    /// Start of lakeguard's first complete pass over the container: names are proven absent
    /// before their first version only from then on.
    #[serde(with = "time::serde::rfc3339::option")]
    pub coverage_since: Option<OffsetDateTime>,
    /// `--from snapshots`: names the backup account knows that have no row left in the source
    /// (deleted together with their snapshots), invisible to that mode.
    pub only_in_backup: Option<u64>,
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestoreReport {
    pub id: String,
    pub request: RequestInfo,
    pub plan: PlanSummary,
    #[serde(default)]
    pub history: HistoryInfo,
    /// The plan's items except `unchanged` ones, at most [`MAX_LISTED_ITEMS`].
    pub items: Vec<PlanItem>,
    pub items_truncated: bool,
    /// True once the plan was carried out (false for a dry run or a refusal).
    pub executed: bool,
    /// Why the plan was not carried out (missing `force`).
    pub refused: Option<String>,
    pub execution: Option<ExecReport>,
    pub elapsed_ms: u128,
}

impl RestoreReport {
    /// True when the target now holds exactly the state at T (as far as the history knows):
    /// executed, nothing failed, changed, left for later or unavailable.
    pub fn is_complete(&self) -> bool {
        self.executed
            && self.plan.unavailable == 0
            && self
                .execution
                .as_ref()
                .is_some_and(|e| e.failed == 0 && e.changed_since_plan == 0 && e.not_attempted == 0)
    }
}

/// A restore id: sortable by time, unique enough (random suffix), safe in blob paths and URLs.
pub fn new_id() -> String {
    let now = OffsetDateTime::now_utc();
    format!(
        "{:04}{:02}{:02}t{:02}{:02}{:02}z-{:08x}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        random_u64() as u32
    )
}

/// Ids accepted from callers (HTTP route): what [`new_id`] makes, nothing that could escape the
/// reserved container's `<id>/` folder.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

pub(crate) fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
}

fn plan_error(e: JoinError) -> OpError {
    OpError::Storage(StorageError::Permanent {
        what: "restore plan".into(),
        detail: e.to_string(),
    })
}

fn spool_error(e: std::io::Error) -> OpError {
    OpError::Storage(StorageError::Permanent {
        what: "restore plan spool (temporary file)".into(),
        detail: e.to_string(),
    })
}

/// The actionable items of a plan, one JSON line each, in a temporary file removed on drop.
struct Spool {
    path: PathBuf,
    writer: Option<BufWriter<File>>,
    count: u64,
}

impl Spool {
    fn new(id: &str) -> std::io::Result<Spool> {
        let path = std::env::temp_dir().join(format!(
            "lakeguard-restore-{id}-{:016x}.jsonl",
            random_u64()
        ));
        let file = File::create(&path)?;
        Ok(Spool {
            path,
            writer: Some(BufWriter::new(file)),
            count: 0,
        })
    }

    fn push(&mut self, item: &PlanItem) -> std::io::Result<()> {
        let w = self
            .writer
            .as_mut()
            .ok_or_else(|| std::io::Error::other("spool already closed"))?;
        serde_json::to_writer(&mut *w, item)?;
        w.write_all(b"\n")?;
        self.count += 1;
        Ok(())
    }

    fn reader(&mut self) -> std::io::Result<impl Iterator<Item = std::io::Result<PlanItem>>> {
        if let Some(mut w) = self.writer.take() {
            w.flush()?;
        }
        let lines = BufReader::new(File::open(&self.path)?).lines();
        Ok(lines.map(|l| l.and_then(|l| serde_json::from_str(&l).map_err(std::io::Error::from))))
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.writer.take();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A computed plan, ready to be reported or carried out.
pub struct Plan {
    pub id: String,
    pub info: RequestInfo,
    pub summary: PlanSummary,
    pub history: HistoryInfo,
    pub items: Vec<PlanItem>,
    pub items_truncated: bool,
    spool: Spool,
}

impl Plan {
    /// The actionable items (restores and deletes; for a sampled plan, the sample), read back
    /// from the spool.
    pub fn actionable(&mut self) -> Result<Vec<PlanItem>, OpError> {
        self.spool
            .reader()
            .map_err(spool_error)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(spool_error)
    }
}

/// Why a plan may not be carried out as asked, if it may not.
pub fn refusal(plan: &Plan, force: bool) -> Option<String> {
    if force {
        return None;
    }
    if plan.info.in_place {
        return Some(format!(
            "restoring container `{}` in place overwrites {} and deletes {} blob(s); it needs --force (HTTP: \"force\": true)",
            plan.info.container, plan.summary.overwrite, plan.summary.delete
        ));
    }
    if plan.summary.destructive() > 0 {
        return Some(format!(
            "the target `{}` in account `{}` is not empty: the plan overwrites {} existing blob(s); it needs --force (HTTP: \"force\": true)",
            plan.info.target_container, plan.info.target_account, plan.summary.overwrite
        ));
    }
    None
}

/// Plans, checks intent and (unless a dry run or refused) executes: `lakeguard restore`.
pub async fn run(
    app: &App,
    req: &RestoreRequest,
    progress: Arc<dyn Progress>,
) -> Result<RestoreReport, OpError> {
    let started = Instant::now();
    progress.message("planning");
    let mut plan = plan(app, req).await?;
    let mut report = RestoreReport {
        id: plan.id.clone(),
        request: plan.info.clone(),
        plan: plan.summary.clone(),
        history: plan.history.clone(),
        items: plan.items.clone(),
        items_truncated: plan.items_truncated,
        executed: false,
        refused: None,
        execution: None,
        elapsed_ms: 0,
    };
    if !req.dry_run {
        report.refused = refusal(&plan, req.force);
        if report.refused.is_none() {
            report.execution = Some(execute(app, req, &mut plan, progress).await?);
            report.executed = true;
        }
    }
    report.elapsed_ms = started.elapsed().as_millis();
    info!(
        id = %report.id,
        container = %req.container,
        at = %metadata::format_time(req.at),
        restore = report.plan.restore,
        delete = report.plan.delete,
        unavailable = report.plan.unavailable,
        executed = report.executed,
        "restore finished"
    );
    Ok(report)
}

mod execute;
mod plan;
mod status;
pub mod undo;

pub use execute::execute;
use execute::execute_items;
pub use plan::plan;

/// The continuation-message kind of restore chunks.
pub fn status_kind() -> &'static str {
    status::MESSAGE_KIND
}
pub use status::{
    read_status, run_chunk, start_durable, write_status, ChunkOutcome, RestoreSpec, RestoreStatus,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Etag;

    fn plan_with(in_place: bool, summary: PlanSummary) -> Plan {
        let id = new_id();
        Plan {
            info: RequestInfo {
                container: "c".into(),
                prefix: None,
                at: OffsetDateTime::UNIX_EPOCH,
                from: HistoryFrom::Backup,
                in_place,
                target_account: "acct".into(),
                target_container: "d".into(),
                dry_run: false,
                force: false,
            },
            summary,
            history: HistoryInfo::default(),
            items: vec![],
            items_truncated: false,
            spool: Spool::new(&id).unwrap(),
            id,
        }
    }

    #[test]
    fn intent_rules() {
        let empty = PlanSummary::default();
        let overwrite = PlanSummary {
            restore: 2,
            overwrite: 1,
            ..Default::default()
        };
        let fresh = PlanSummary {
            restore: 2,
            unchanged: 3,
            left_alone: 1,
            ..Default::default()
        };
        // In place always needs force, even when nothing would be destroyed.
        assert!(refusal(&plan_with(true, empty.clone()), false).is_some());
        assert!(refusal(&plan_with(true, empty), true).is_none());
        // Elsewhere: only overwrites need it; left-alone blobs do not.
        assert!(refusal(&plan_with(false, fresh), false).is_none());
        assert!(refusal(&plan_with(false, overwrite.clone()), false).is_some());
        assert!(refusal(&plan_with(false, overwrite), true).is_none());
    }

    #[test]
    fn spool_round_trips_and_is_removed() {
        let mut plan = plan_with(false, PlanSummary::default());
        let items = vec![
            PlanItem::Delete {
                name: "a \"b\"/ü.txt".into(),
                target_etag: Etag::new("0x1"),
                backed_up: vec![Etag::new("v1")],
            },
            PlanItem::Unchanged { name: "x".into() },
        ];
        for i in &items {
            plan.spool.push(i).unwrap();
        }
        let path = plan.spool.path.clone();
        assert_eq!(plan.actionable().unwrap(), items);
        assert!(path.exists());
        drop(plan);
        assert!(!path.exists(), "the spool is removed with the plan");
    }

    #[test]
    fn ids_are_safe_path_segments() {
        let id = new_id();
        assert!(is_valid_id(&id), "{id}");
        for bad in ["", "../x", "a/b", "A", "x".repeat(65).as_str(), "a b"] {
            assert!(!is_valid_id(bad), "{bad:?}");
        }
    }
}
