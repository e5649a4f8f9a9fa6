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

use std::collections::BTreeMap;
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
use crate::core::join::{JoinError, NameGroups};
use crate::core::restore::{
    name_state, HistoryFrom, PlanItem, PlanOptions, PlanStep, PlanSummary, RestorePlanner,
    RestoreTarget,
};
use crate::model::{metadata, Etag};
use crate::storage::blob::{ListOptions, ListPage, TargetCondition};
use crate::storage::sas::DelegationKeyCache;
use crate::storage::{BlobStore, Lister, StorageError};

/// Container of the backup account reserved for restore bookkeeping: status documents
/// (`<id>/status.json`) and undo copies of deleted blobs (`<id>/undo/<container>/<name>`).
/// A source container of this name would collide with it; lakeguard refuses to restore into it.
pub const RESERVED_CONTAINER: &str = crate::settings::RESTORES_CONTAINER;

/// Metadata on the undo snapshot taken before an overwrite: the id of the restore that took it.
pub const RESTORE_UNDO: &str = "lakeguard_restore_undo";

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
    /// Target blobs that changed between plan and execution: left untouched.
    pub changed_since_plan: u64,
    pub changed: Vec<String>,
    pub failed: u64,
    pub failures: Vec<BlobFailure>,
    /// Actionable items beyond `limit`, left for the next run.
    pub not_attempted: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestoreReport {
    pub id: String,
    pub request: RequestInfo,
    pub plan: PlanSummary,
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

/// The stores and containers of one restore.
struct Ends<'a> {
    history: &'a BlobStore,
    history_keys: DelegationKeyCache,
    target: &'a BlobStore,
    target_container: &'a str,
    in_place: bool,
}

fn ends<'a>(app: &'a App, req: &'a RestoreRequest) -> Result<Ends<'a>, OpError> {
    crate::settings::validate_container_name(&req.container).map_err(OpError::InvalidInput)?;
    let (history, history_keys) = match req.from {
        HistoryFrom::Backup => (&app.backup, DelegationKeyCache::default()),
        HistoryFrom::SourceSnapshots => (&app.source, app.source_keys.clone()),
    };
    let (target, target_container, in_place) = match &req.to {
        None => (&app.source, req.container.as_str(), true),
        Some(t) => {
            crate::settings::validate_container_name(&t.container)
                .map_err(OpError::InvalidInput)?;
            let same = same_account;
            // Drills restore into their own scratch containers (sample-only requests).
            if crate::settings::is_reserved_container(&t.container)
                && !(req.sample.is_some()
                    && t.container
                        .starts_with(crate::settings::DRILL_CONTAINER_PREFIX))
            {
                return Err(OpError::InvalidInput(format!(
                    "`{}` is reserved for lakeguard's own bookkeeping",
                    t.container
                )));
            }
            if same(&t.store, &app.source) && t.container == req.container {
                (&app.source, req.container.as_str(), true)
            } else {
                if same(&t.store, history) && t.container == req.container {
                    return Err(OpError::InvalidInput(format!(
                        "the target `{}` is the history being restored from; choose another container",
                        t.container
                    )));
                }
                (&t.store, t.container.as_str(), false)
            }
        }
    };
    Ok(Ends {
        history,
        history_keys,
        target,
        target_container,
        in_place,
    })
}

/// Whether two stores address the same account (same endpoint; credentials may differ).
fn same_account(a: &BlobStore, b: &BlobStore) -> bool {
    let (ua, ub) = (a.url("x", None, None), b.url("x", None, None));
    ua.host_str() == ub.host_str()
        && ua.port_or_known_default() == ub.port_or_known_default()
        && ua.path() == ub.path()
}

/// One listing page (fetched ahead by `pages`); a missing history container is an error that
/// names the account (the target's lister lists a missing container as empty).
async fn next_page(
    pages: &mut Lister,
    store: &BlobStore,
    container: &str,
    marker: Option<String>,
) -> Result<ListPage, OpError> {
    match pages.page(marker).await {
        Ok(p) => Ok(p),
        Err(e) if e.is_not_found() => Err(OpError::ContainerNotFound(format!(
            "{container}` in account `{}",
            store.account()
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Phase 1: the plan, streaming over both listings.
pub async fn plan(app: &App, req: &RestoreRequest) -> Result<Plan, OpError> {
    let ends = ends(app, req)?;
    // A container of the backup account named like a source container is that container's
    // history: restoring anything over it would rewrite backups.
    if !ends.in_place
        && same_account(ends.target, &app.backup)
        && app.source.container_exists(ends.target_container).await?
    {
        return Err(OpError::InvalidInput(format!(
            "container `{}` of the backup account holds the backup history of the source container of that name; choose another target container",
            ends.target_container
        )));
    }
    let id = req.id.clone().unwrap_or_else(new_id);
    if !is_valid_id(&id) {
        return Err(OpError::InvalidInput(format!("invalid restore id `{id}`")));
    }
    let info = RequestInfo {
        container: req.container.clone(),
        prefix: req.prefix.clone(),
        at: req.at,
        from: req.from,
        in_place: ends.in_place,
        target_account: ends.target.account().to_owned(),
        target_container: ends.target_container.to_owned(),
        dry_run: req.dry_run,
        force: req.force,
    };
    let order = app.settings.name_order;
    let mut planner = RestorePlanner::new(PlanOptions {
        at: req.at,
        target: if ends.in_place {
            RestoreTarget::InPlace
        } else {
            RestoreTarget::Elsewhere
        },
        prefix: req.prefix.clone(),
        order,
    });
    let history_opts = ListOptions {
        prefix: req.prefix.clone(),
        snapshots: true,
        metadata: true,
        max_results: None,
    };
    let target_opts = ListOptions {
        prefix: req.prefix.clone(),
        snapshots: false,
        metadata: true,
        max_results: None,
    };
    let mut groups = NameGroups::new(order, "history");
    let mut history_pages = Lister::new(ends.history, &req.container, history_opts);
    let mut target_pages =
        Lister::new(ends.target, ends.target_container, target_opts).missing_is_empty();
    history_pages.prefetch(None);
    target_pages.prefetch(None);
    let mut history_marker: Option<String> = None;
    let mut target_marker: Option<String> = None;
    let mut spool = Spool::new(&id).map_err(spool_error)?;
    let mut summary = PlanSummary::default();
    let mut items = Vec::new();
    let mut items_truncated = false;
    let mut reservoir: Vec<PlanItem> = Vec::new();
    let mut restores_seen = 0u64;
    loop {
        match planner.step() {
            PlanStep::Item(item) => {
                summary.record(&item);
                if !matches!(item, PlanItem::Unchanged { .. }) {
                    if items.len() < MAX_LISTED_ITEMS {
                        items.push(item.clone());
                    } else {
                        items_truncated = true;
                    }
                }
                match (&item, req.sample) {
                    (PlanItem::Restore { .. }, Some(n)) => {
                        // Reservoir sampling: every restore equally likely, memory n items.
                        restores_seen += 1;
                        if reservoir.len() < n {
                            reservoir.push(item);
                        } else {
                            let j = random_u64() % restores_seen;
                            if (j as usize) < n {
                                reservoir[j as usize] = item;
                            }
                        }
                    }
                    (_, Some(_)) => {}
                    (PlanItem::Restore { .. } | PlanItem::Delete { .. }, None) => {
                        spool.push(&item).map_err(spool_error)?
                    }
                    _ => {}
                }
            }
            PlanStep::NeedStates => {
                let page = next_page(
                    &mut history_pages,
                    ends.history,
                    &req.container,
                    history_marker.take(),
                )
                .await?;
                groups.push(page.entries).map_err(plan_error)?;
                let last = page.next_marker.is_none();
                if last {
                    groups.end();
                } else {
                    history_marker = page.next_marker;
                }
                let mut states = Vec::new();
                while let Some(g) = groups.pop() {
                    states.extend(name_state(req.from, &g, req.at));
                }
                planner.push_states(states).map_err(plan_error)?;
                if last {
                    planner.end_states();
                }
            }
            PlanStep::NeedTarget => {
                let page = next_page(
                    &mut target_pages,
                    ends.target,
                    ends.target_container,
                    target_marker.take(),
                )
                .await?;
                let last = page.next_marker.is_none();
                planner.push_target(page.entries).map_err(plan_error)?;
                if last {
                    planner.end_target();
                } else {
                    target_marker = page.next_marker;
                }
            }
            PlanStep::Done => break,
        }
    }
    for item in &reservoir {
        spool.push(item).map_err(spool_error)?;
    }
    Ok(Plan {
        id,
        info,
        summary,
        items,
        items_truncated,
        spool,
    })
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

enum Outcome {
    Restored { overwrote: bool, undo: bool },
    Deleted,
    Changed(String),
    Failed(String),
}

/// Phase 3: carries out the spooled items with bounded concurrency.
pub async fn execute(
    app: &App,
    req: &RestoreRequest,
    plan: &mut Plan,
    progress: Arc<dyn Progress>,
) -> Result<ExecReport, OpError> {
    let ends = ends(app, req)?;
    let mut report = ExecReport::default();
    let total = plan.spool.count;
    let limit = req.limit.unwrap_or(u64::MAX);
    let to_do = total.min(limit);
    report.not_attempted = total - to_do;
    if to_do == 0 {
        return Ok(report);
    }
    progress.add_total(to_do);
    progress.message("restoring");
    ends.target.ensure_container(ends.target_container).await?;
    if plan.summary.delete > 0 {
        app.backup.ensure_container(RESERVED_CONTAINER).await?;
    }
    let blocks = BlockOptions::from_settings(&app.settings);
    let ctx = Exec {
        app,
        req,
        ends: &ends,
        id: &plan.id,
        blocks,
    };
    let mut reader = plan.spool.reader().map_err(spool_error)?;
    let mut done = 0u64;
    const BATCH: u64 = 512;
    while done < to_do {
        let mut batch = Vec::new();
        while (batch.len() as u64) < BATCH.min(to_do - done) {
            match reader.next() {
                Some(item) => batch.push(item.map_err(spool_error)?),
                None => break,
            }
        }
        if batch.is_empty() {
            break;
        }
        done += batch.len() as u64;
        let results: Vec<(String, Outcome)> = stream::iter(batch)
            .map(|item| {
                let ctx = &ctx;
                async move {
                    let name = item.name().to_owned();
                    (name, ctx.item(item).await)
                }
            })
            .buffer_unordered(app.settings.concurrency.max(1))
            .collect()
            .await;
        for (name, outcome) in results {
            progress.inc(1);
            match outcome {
                Outcome::Restored { overwrote, undo } => {
                    report.restored += 1;
                    report.overwritten += u64::from(overwrote);
                    report.undo_snapshots += u64::from(undo);
                }
                Outcome::Deleted => {
                    report.deleted += 1;
                    report.undo_copies += 1;
                }
                Outcome::Changed(why) => {
                    info!(blob = %name, %why, "target changed since the plan; left as it is");
                    report.changed_since_plan += 1;
                    if report.changed.len() < MAX_REPORTED_FAILURES {
                        report.changed.push(name);
                    }
                }
                Outcome::Failed(error) => {
                    warn!(blob = %name, %error, "restore of one blob failed");
                    report.failed += 1;
                    if report.failures.len() < MAX_REPORTED_FAILURES {
                        report.failures.push(BlobFailure { blob: name, error });
                    }
                }
            }
        }
    }
    Ok(report)
}

struct Exec<'a> {
    app: &'a App,
    req: &'a RestoreRequest,
    ends: &'a Ends<'a>,
    id: &'a str,
    blocks: BlockOptions,
}

/// A 412/409 on a conditional copy: the target's or the source's condition? The service names
/// source conditions (`SourceConditionNotMet`), the emulator does not, so when the code does not
/// say, the target is looked at again: if it still is as planned, the source moved.
async fn source_moved(
    e: &StorageError,
    target: &BlobStore,
    c: &str,
    name: &str,
    planned: Option<&Etag>,
) -> bool {
    if e.code().to_ascii_lowercase().contains("source") {
        return true;
    }
    match target.properties(c, name, None).await {
        Ok(p) => planned == Some(&p.etag),
        Err(err) if err.is_not_found() => planned.is_none(),
        Err(_) => false,
    }
}

fn is_condition_failure(e: &StorageError) -> bool {
    e.is_precondition_failed()
        || matches!(e, StorageError::Conflict { code, .. } if code == "BlobAlreadyExists")
}

impl Exec<'_> {
    async fn item(&self, item: PlanItem) -> Outcome {
        match item {
            PlanItem::Restore {
                name,
                version,
                target_etag,
            } => self.restore(&name, &version, target_etag).await,
            PlanItem::Delete { name, target_etag } => self.delete(&name, &target_etag).await,
            other => Outcome::Failed(format!("not an actionable item: {other:?}")),
        }
    }

    /// HEAD of the target; `Err(Outcome)` when it no longer has the planned ETag.
    async fn current(
        &self,
        name: &str,
        planned: &Etag,
    ) -> Result<crate::storage::blob::BlobProperties, Outcome> {
        match self
            .ends
            .target
            .properties(self.ends.target_container, name, None)
            .await
        {
            Ok(p) if &p.etag == planned => Ok(p),
            Ok(p) => Err(Outcome::Changed(format!(
                "now {} (planned {planned})",
                p.etag
            ))),
            Err(e) if e.is_not_found() => Err(Outcome::Changed("deleted since the plan".into())),
            Err(e) => Err(Outcome::Failed(e.to_string())),
        }
    }

    async fn restore(
        &self,
        name: &str,
        version: &crate::core::restore::Version,
        target_etag: Option<Etag>,
    ) -> Outcome {
        let Some(content) = &version.content else {
            return Outcome::Failed("the version's content is not held (planner bug)".into());
        };
        let mut undo = false;
        let condition = match &target_etag {
            None => TargetCondition::Absent,
            Some(planned) => {
                let props = match self.current(name, planned).await {
                    Ok(p) => p,
                    Err(o) => return o,
                };
                // Keep the state being replaced, so that this restore can be undone.
                let mut meta = props.metadata.clone();
                meta.insert(RESTORE_UNDO.into(), self.id.to_owned());
                match self
                    .ends
                    .target
                    .create_snapshot(self.ends.target_container, name, planned, &meta)
                    .await
                {
                    Ok(_) => undo = true,
                    Err(e) if e.is_precondition_failed() || e.is_not_found() => {
                        return Outcome::Changed(format!("changed before its undo snapshot: {e}"))
                    }
                    Err(e) => return Outcome::Failed(format!("undo snapshot: {e}")),
                }
                TargetCondition::Matches(planned.clone())
            }
        };
        let mut meta = version.user_metadata.clone();
        meta.insert(
            metadata::RESTORED_FROM_ETAG.into(),
            version.source_etag.quoted(),
        );
        let from = CopyFrom {
            store: self.ends.history,
            keys: &self.ends.history_keys,
            container: &self.req.container,
            blob: &content.name,
            snapshot: content.snapshot.as_deref(),
            if_match: Some(content.etag.clone()),
            content_length: version.content_length,
            content_type: version.content_type.as_deref(),
        };
        let to = CopyTo {
            store: self.ends.target,
            container: self.ends.target_container,
            blob: name,
            condition,
            metadata: &meta,
        };
        match server_side_copy(&from, &to, &self.blocks).await {
            Ok(_) => Outcome::Restored {
                overwrote: target_etag.is_some(),
                undo,
            },
            Err(e) if is_condition_failure(&e) => {
                let t = self.ends.target;
                if source_moved(
                    &e,
                    t,
                    self.ends.target_container,
                    name,
                    target_etag.as_ref(),
                )
                .await
                {
                    Outcome::Failed(format!(
                        "the version's row in the history changed since the plan (run the restore again): {e}"
                    ))
                } else {
                    Outcome::Changed(e.to_string())
                }
            }
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }

    async fn delete(&self, name: &str, planned: &Etag) -> Outcome {
        let props = match self.current(name, planned).await {
            Ok(p) => p,
            Err(o) => return o,
        };
        // Keep the state being deleted in the backup account (see the module docs).
        let undo_name = format!("{}/undo/{}/{}", self.id, self.ends.target_container, name);
        if undo_name.chars().count() > 1024 {
            return Outcome::Failed(
                "the name is too long to keep an undo copy under lakeguard-restores/; not deleted"
                    .into(),
            );
        }
        let mut meta = props.metadata.clone();
        meta.insert(RESTORE_UNDO.into(), self.id.to_owned());
        let from = CopyFrom {
            store: self.ends.target,
            keys: &self.app.source_keys,
            container: self.ends.target_container,
            blob: name,
            snapshot: None,
            if_match: Some(planned.clone()),
            content_length: props.content_length,
            content_type: props.content_type.as_deref(),
        };
        let to = CopyTo {
            store: &self.app.backup,
            container: RESERVED_CONTAINER,
            blob: &undo_name,
            condition: TargetCondition::Any,
            metadata: &meta,
        };
        match server_side_copy(&from, &to, &self.blocks).await {
            Ok(_) => {}
            Err(e) if is_condition_failure(&e) || e.is_not_found() => {
                return Outcome::Changed(format!("changed before its undo copy: {e}"))
            }
            Err(e) => return Outcome::Failed(format!("undo copy: {e}")),
        }
        let target = self.ends.target;
        let c = self.ends.target_container;
        let result = match target.delete(c, name, None, Some(planned), false).await {
            Err(e) if e.code() == "SnapshotsPresent" => {
                target.delete(c, name, None, Some(planned), true).await
            }
            other => other,
        };
        match result {
            Ok(()) => Outcome::Deleted,
            Err(e) if e.is_precondition_failed() || e.is_not_found() => {
                Outcome::Changed(e.to_string())
            }
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }
}

/// The state of a restore started over HTTP, kept as `lakeguard-restores/<id>/status.json` in
/// the backup account so that any instance can answer `GET /api/restore/{id}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestoreStatus {
    pub id: String,
    /// `running`, `succeeded` (complete), `incomplete` (done, but something failed, changed or
    /// was unavailable: see the report), `failed` (the operation itself failed: see `error`).
    pub state: String,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    /// A `running` status whose `updated_at` stops moving belongs to a process that died: run
    /// the same restore again, it continues where that one stopped.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    pub request: RequestInfo,
    pub plan: PlanSummary,
    /// Actionable items carried out so far (updated every few seconds while running) and in all.
    pub done: u64,
    pub total: u64,
    pub report: Option<RestoreReport>,
    pub error: Option<String>,
}

/// Counts items for the status document of a background restore.
#[derive(Default)]
struct Counter {
    total: std::sync::atomic::AtomicU64,
    done: std::sync::atomic::AtomicU64,
}

impl Progress for Counter {
    fn add_total(&self, n: u64) {
        self.total
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
    fn inc(&self, n: u64) {
        self.done.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How often a background restore refreshes its status document.
const STATUS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

fn status_blob(id: &str) -> String {
    format!("{id}/status.json")
}

pub async fn write_status(app: &App, status: &RestoreStatus) -> Result<(), StorageError> {
    app.backup.ensure_container(RESERVED_CONTAINER).await?;
    let body = serde_json::to_vec_pretty(status).map_err(|e| StorageError::Permanent {
        what: "restore status".into(),
        detail: e.to_string(),
    })?;
    app.backup
        .upload(
            RESERVED_CONTAINER,
            &status_blob(&status.id),
            body,
            Some("application/json"),
            &BTreeMap::new(),
        )
        .await?;
    Ok(())
}

/// The status of restore `id`; `None` when there is no such restore (a real 404 only).
pub async fn read_status(app: &App, id: &str) -> Result<Option<RestoreStatus>, StorageError> {
    if !is_valid_id(id) {
        return Ok(None);
    }
    match app
        .backup
        .download(RESERVED_CONTAINER, &status_blob(id), None)
        .await
    {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| StorageError::Permanent {
                    what: format!("restore status {id}"),
                    detail: e.to_string(),
                })
        }
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Starts executing an already computed, already authorised plan in the background (HTTP
/// `Restore` with `confirm`), recording its progress in the status document. Returns the
/// initial status once it is stored.
pub async fn start_background(
    app: App,
    req: RestoreRequest,
    mut plan: Plan,
) -> Result<RestoreStatus, StorageError> {
    let now = OffsetDateTime::now_utc();
    let status = RestoreStatus {
        id: plan.id.clone(),
        state: "running".into(),
        started_at: now,
        updated_at: now,
        request: plan.info.clone(),
        plan: plan.summary.clone(),
        done: 0,
        total: 0,
        report: None,
        error: None,
    };
    write_status(&app, &status).await?;
    let initial = status.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let mut status = status;
        let counter = Arc::new(Counter::default());
        let result = {
            let run = execute(&app, &req, &mut plan, counter.clone());
            tokio::pin!(run);
            let mut tick = tokio::time::interval(STATUS_EVERY);
            tick.tick().await;
            loop {
                tokio::select! {
                    r = &mut run => break r,
                    _ = tick.tick() => {
                        status.done = counter.done.load(std::sync::atomic::Ordering::Relaxed);
                        status.total = counter.total.load(std::sync::atomic::Ordering::Relaxed);
                        status.updated_at = OffsetDateTime::now_utc();
                        if let Err(e) = write_status(&app, &status).await {
                            warn!(id = %status.id, error = %e, "could not update the restore status");
                        }
                    }
                }
            }
        };
        status.done = counter.done.load(std::sync::atomic::Ordering::Relaxed);
        status.total = counter.total.load(std::sync::atomic::Ordering::Relaxed);
        match result {
            Ok(exec) => {
                let report = RestoreReport {
                    id: plan.id.clone(),
                    request: plan.info.clone(),
                    plan: plan.summary.clone(),
                    items: std::mem::take(&mut plan.items),
                    items_truncated: plan.items_truncated,
                    executed: true,
                    refused: None,
                    execution: Some(exec),
                    elapsed_ms: started.elapsed().as_millis(),
                };
                status.state = if report.is_complete() {
                    "succeeded"
                } else {
                    "incomplete"
                }
                .into();
                status.report = Some(report);
            }
            Err(e) => {
                status.state = "failed".into();
                status.error = Some(e.to_string());
            }
        }
        status.updated_at = OffsetDateTime::now_utc();
        if let Err(e) = write_status(&app, &status).await {
            warn!(id = %status.id, error = %e, "could not store the final restore status");
        }
    });
    Ok(initial)
}

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
