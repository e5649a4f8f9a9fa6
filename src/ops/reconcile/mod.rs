//! Reconcile: the timed safety net. Finds what the event path (producer -> queue -> worker)
//! missed, at the cost of two flat listings per container.
//!
//! # Cost
//! Per covered container, the source's flat base-blob listing and the backup container's flat
//! listing (both with metadata, no snapshots) are fed page by page to the pure
//! [`ReconcileJoin`](crate::core::reconcile::ReconcileJoin). A blob whose backup carries
//! `lakeguard_source_etag` equal to its ETag costs nothing more, so a no-op run costs the list
//! containers calls (source and backup accounts) plus the listing pages. Only names the join
//! reports as needing work get requests of their own:
//! - `NeedsBackup`: one listing of that blob's snapshots (`prefix` = the exact name, filtered by
//!   equality: `a.txt.bak` is not `a.txt`), then [`decide_snapshot`]: a fresh
//!   `lakeguard_requested_at` on a snapshot of the current version means a request is already
//!   queued (counted, not enqueued again); otherwise a conditional snapshot (If-Match the listed
//!   ETag; on 412 the new version is taken, as the producer does) and a request, whose failed
//!   enqueue removes the snapshot again ([`snapshot::enqueue`]). With an empty backup queue the
//!   listing is skipped, and a blob whose backup is missing gets a request for its live version
//!   instead of a new snapshot ([`snapshot::enqueue_live`]; engines that copy the live blob under
//!   `source-if-match` only): no marker then, so a run overlapping that request asks once more.
//! - `Tombstone`: a HEAD of the source (only a real 404 counts as gone; any other error is an
//!   error, never "deleted"), then the backup's current version is kept as a backup snapshot
//!   (If-Match its listed ETag) and `lakeguard_deleted_at` is added to its metadata (If-Match
//!   again, the other metadata kept). Backup blobs not written by lakeguard (no
//!   `lakeguard_source_etag`) are left alone.
//!
//! Memory is one page per side plus that page's pending actions: the actions of a page are
//! carried out (bounded concurrency) before the next page is fetched.
//!
//! # Splitting work: checkpoints and continuations
//! A listing marker is opaque and names the *next* page, while the join may still hold rows of
//! the current page. So a checkpoint is `(after_name, source cursor, backup cursor)` where
//! `after_name` is the last name whose action is done and each cursor is the marker of the page
//! holding that side's first unprocessed row (the marker that fetched the side's current page,
//! or the next marker when the side's queue is empty). Resuming lists from both cursors and drops
//! rows not after `after_name` in the configured [`NameOrder`]: exact, whatever the marker encodes,
//! at the price of re-reading at most one page per side. A cursor is `start`, a marker, or `end`.
//!
//! One invocation works until its budget ([`Settings::reconcile_budget`], 420 s by default for the
//! 10-minute Consumption limit; 150 s at most for the HTTP function, whose answer must come within
//! 230 s) is spent. The budget is checked only between pages, after the page's actions are done,
//! and only once the invocation has handled at least one name, so every invocation makes progress
//! even with a zero budget. What remains is handed over as continuation messages on a queue of
//! its own (`LAKEGUARD_RECONCILE_QUEUE`, default `<backup queue>-reconcile`; base64 JSON, schema
//! [`Continuation`]): one for the interrupted container at its checkpoint, and one `start`
//! message per container not yet begun, so the queue-triggered `ReconcileWorker` function fans
//! them out over as many instances as the host scales to. A worker that runs out of budget queues
//! the next hop of its container's chain. Within one container the chain is sequential (listings
//! cannot be split by name without an opaque marker for that name); containers run in parallel.
//!
//! # Failure and overlap
//! Every write is conditional or idempotent (If-Match snapshots and metadata, pending markers,
//! an idempotent worker), so a run killed halfway loses nothing: its unsent continuation is simply
//! redone by the next timer run, and a retried worker message redoes its range. Two overlapping
//! runs at worst make a duplicate snapshot and a duplicate request, which the worker
//! acknowledges as already backed up. A container-level failure in the timer run is handed over as
//! a continuation (the worker's retries and poison queue apply); in the worker it fails the
//! invocation so that the host retries the message, then poisons it.

mod actions;

use std::sync::Arc;

use actions::execute;
pub(crate) use actions::{tombstone_with, Done, BACKUP_CHANGED};
use std::time::{Duration, Instant};

use futures::{stream, StreamExt};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tracing::info;

use super::{OpError, Progress, MAX_REPORTED_FAILURES};
use crate::app::App;
use crate::core::join::{JoinError, NameOrder};
use crate::core::reconcile::{Action, ReconcileJoin, ReconcileTally, Step};
use crate::model::BlobEntry;
use crate::storage::blob::ListOptions;
use crate::storage::{BackupQueue, BlobStore, Lister, StorageError};

/// `kind` of a continuation message.
pub const MESSAGE_KIND: &str = "reconcile";

/// Longest budget of an HTTP-triggered run: the host must answer within 230 s.
pub const HTTP_BUDGET: Duration = Duration::from_secs(150);

/// Where a listing resumes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "at", content = "marker")]
pub enum Cursor {
    /// From the first page.
    #[default]
    Start,
    /// From the page this (opaque) marker names.
    Marker(String),
    /// The listing is exhausted.
    End,
}

impl Cursor {
    fn marker(&self) -> Option<String> {
        match self {
            Cursor::Marker(m) => Some(m.clone()),
            _ => None,
        }
    }
}

/// A continuation message (`LAKEGUARD_RECONCILE_QUEUE`, base64 of this JSON):
/// ```json
/// {"v":1,"kind":"reconcile","run_id":"...","container":"raw",
///  "source":{"at":"marker","marker":"..."},"backup":{"at":"start"},"after_name":"dir/x.csv",
///  "hop":2,"tally":{...}}
/// ```
/// `after_name` null and both cursors `start` = the whole container. `tally` carries the chain's
/// counts so far so that the last hop can log the container's totals.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Continuation {
    pub v: u32,
    pub kind: String,
    pub run_id: String,
    pub container: String,
    pub source: Cursor,
    pub backup: Cursor,
    pub after_name: Option<String>,
    /// How many invocations of this container's chain came before this one.
    pub hop: u32,
    #[serde(default)]
    pub tally: ReconcileTally,
}

impl Continuation {
    pub fn start(run_id: &str, container: &str) -> Self {
        Continuation {
            v: 1,
            kind: MESSAGE_KIND.into(),
            run_id: run_id.into(),
            container: container.into(),
            source: Cursor::Start,
            backup: Cursor::Start,
            after_name: None,
            hop: 0,
            tally: ReconcileTally::default(),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a continuation always serialises")
    }

    /// Parses and validates a message text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let c: Continuation = serde_json::from_str(text.trim())
            .map_err(|e| format!("not a reconcile continuation: {e}"))?;
        if c.v != 1 || c.kind != MESSAGE_KIND {
            return Err(format!(
                "unsupported continuation (v {}, kind {:?}); this worker understands v1 `{MESSAGE_KIND}`",
                c.v, c.kind
            ));
        }
        crate::settings::validate_container_name(&c.container)?;
        Ok(c)
    }
}

/// What a run covers and how.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// One container (operator's choice, include/exclude lists not applied), or all covered ones.
    pub container: Option<String>,
    /// Plan and count, write nothing (no snapshot, request, tombstone or continuation).
    pub dry_run: bool,
    /// Work budget; `None` = run to completion in this process (the CLI).
    pub budget: Option<Duration>,
}

/// One error, for the bounded list in the report.
#[derive(Clone, Debug, Serialize)]
pub struct ReconcileFailure {
    pub container: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blob: Option<String>,
    pub error: String,
}

/// The report of one invocation (JSON answer, CLI output, and one log line).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReconcileReport {
    pub run_id: String,
    pub dry_run: bool,
    /// Containers this invocation worked on.
    pub containers: u64,
    /// Of those, finished here (the others continue elsewhere or failed).
    pub containers_finished: u64,
    /// The planner's counts: rows scanned per side, in sync, needing backup (by reason), already
    /// pending, to enqueue, tombstone candidates, placeholders, oldest unbacked change.
    #[serde(flatten)]
    pub tally: ReconcileTally,
    pub snapshots_made: u64,
    pub requests_enqueued: u64,
    /// A fresh request for the current version was already queued.
    pub already_pending: u64,
    pub tombstones_written: u64,
    /// Hierarchical source: files whose new security state was recorded without a copy.
    #[serde(default)]
    pub security_recorded: u64,
    /// Hierarchical source: directories backed up or given their new security state.
    #[serde(default)]
    pub directories_backed_up: u64,
    /// Dry run: what a real run would do.
    pub would_enqueue: u64,
    pub would_tombstone: u64,
    /// Left for the next run: changed or deleted between listing and action, source re-created,
    /// or a backup blob lakeguard did not write.
    pub skipped: u64,
    pub errors: u64,
    pub error_list: Vec<ReconcileFailure>,
    pub continuations_queued: u64,
    /// Age of the oldest source change not yet in the backup (pending ones included), seconds.
    pub rpo_lag_secs: u64,
    pub elapsed_ms: u128,
    /// Everything in scope was reconciled by this invocation (nothing handed over or failed).
    pub complete: bool,
}

impl ReconcileReport {
    fn error(&mut self, container: &str, blob: Option<&str>, error: String) {
        self.errors += 1;
        if self.error_list.len() < MAX_REPORTED_FAILURES {
            self.error_list.push(ReconcileFailure {
                container: container.into(),
                blob: blob.map(str::to_owned),
                error,
            });
        }
    }

    /// One human line (the CLI's text output and the Functions log line).
    pub fn summary(&self) -> String {
        let t = &self.tally;
        format!(
            "reconcile {}{}: {} containers ({} finished), scanned {} source / {} backup, in sync {}, snapshots {}, enqueued {}, already pending {}, tombstones {}{}, skipped {}, errors {}, continuations {}, RPO lag {} s, {} ms",
            self.run_id,
            if self.dry_run { " (dry run)" } else { "" },
            self.containers,
            self.containers_finished,
            t.source_scanned,
            t.backup_scanned,
            t.in_sync,
            self.snapshots_made,
            self.requests_enqueued,
            self.already_pending,
            self.tombstones_written,
            if self.dry_run {
                format!(", would enqueue {}, would tombstone {}", self.would_enqueue, self.would_tombstone)
            } else {
                String::new()
            },
            self.skipped,
            self.errors,
            self.continuations_queued,
            self.rpo_lag_secs,
            self.elapsed_ms,
        )
    }

    fn log(&self) {
        let t = &self.tally;
        info!(
            run_id = %self.run_id,
            dry_run = self.dry_run,
            containers = self.containers,
            containers_finished = self.containers_finished,
            source_scanned = t.source_scanned,
            backup_scanned = t.backup_scanned,
            in_sync = t.in_sync,
            snapshots_made = self.snapshots_made,
            requests_enqueued = self.requests_enqueued,
            already_pending = self.already_pending,
            tombstones = self.tombstones_written,
            skipped = self.skipped,
            errors = self.errors,
            continuations = self.continuations_queued,
            rpo_lag_secs = self.rpo_lag_secs,
            elapsed_ms = self.elapsed_ms as u64,
            "{}",
            self.summary()
        );
    }

    fn finish(&mut self, started: Instant) {
        self.rpo_lag_secs = self.tally.rpo_lag(OffsetDateTime::now_utc()).as_secs();
        self.elapsed_ms = started.elapsed().as_millis();
        self.log();
    }
}

/// A run id for logs and continuation chains: time-based, unique enough per account.
fn new_run_id() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let now = OffsetDateTime::now_utc();
    format!(
        "{}-{:04x}",
        now.unix_timestamp_nanos() / 1_000_000,
        (N.fetch_add(1, Ordering::Relaxed) ^ std::process::id()) & 0xffff
    )
}

/// Shared state of one invocation.
struct Ctx<'a> {
    app: &'a App,
    dry_run: bool,
    order: NameOrder,
    deadline: Option<Instant>,
    progress: Arc<dyn Progress>,
    /// See [`App::pending_ttl`]: zero when the backup queue is empty.
    pending_ttl: Duration,
    /// Request batch records read so far (a marker is trusted by its batch's record).
    batches: crate::ops::state::BatchRecords,
}

impl Ctx<'_> {
    fn out_of_budget(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}

/// How one container's walk ended.
enum Walk {
    Finished,
    /// Budget spent: continue from here.
    OutOfBudget(Checkpoint),
    /// Listing failed (or the listing is not in the declared order): `resume` is the last
    /// checkpoint, `retryable` whether trying again may help.
    Failed {
        error: String,
        resume: Checkpoint,
        retryable: bool,
    },
}

#[derive(Clone, Debug, Default)]
struct Checkpoint {
    source: Cursor,
    backup: Cursor,
    after_name: Option<String>,
}

/// The timer's (and the operator's) run: every covered container, or one.
pub async fn run(
    app: &App,
    opts: &RunOptions,
    progress: Arc<dyn Progress>,
) -> Result<ReconcileReport, OpError> {
    let started = Instant::now();
    let mut report = ReconcileReport {
        run_id: new_run_id(),
        dry_run: opts.dry_run,
        ..Default::default()
    };
    let containers = match &opts.container {
        Some(c) => {
            crate::settings::validate_container_name(c).map_err(OpError::InvalidInput)?;
            if !app.source.container_exists(c).await? && !app.backup.container_exists(c).await? {
                return Err(OpError::ContainerNotFound(c.clone()));
            }
            vec![c.clone()]
        }
        None => covered_containers(app).await?,
    };
    let ctx = Ctx {
        app,
        dry_run: opts.dry_run,
        order: app.settings.name_order,
        deadline: opts.budget.map(|b| started + b),
        progress,
        pending_ttl: app.pending_ttl().await,
        batches: Default::default(),
    };
    // Continuations go out only when a budget exists (the functions); the CLI runs to the end.
    let may_hand_over = opts.budget.is_some() && !opts.dry_run;
    let mut handover: Vec<Continuation> = Vec::new();
    let mut complete = true;
    for container in &containers {
        if ctx.out_of_budget() && report.containers > 0 {
            complete = false;
            if may_hand_over {
                handover.push(Continuation::start(&report.run_id, container));
            }
            continue;
        }
        report.containers += 1;
        let mut tally = ReconcileTally::default();
        let walk = walk_container(
            &ctx,
            container,
            Checkpoint::default(),
            &mut tally,
            &mut report,
        )
        .await;
        report.tally.merge(&tally);
        let resume = match walk {
            Walk::Finished => {
                report.containers_finished += 1;
                continue;
            }
            Walk::OutOfBudget(cp) => cp,
            Walk::Failed {
                error,
                resume,
                retryable,
            } => {
                report.error(container, None, error);
                if !retryable {
                    complete = false;
                    continue;
                }
                resume
            }
        };
        complete = false;
        if may_hand_over {
            handover.push(Continuation {
                source: resume.source,
                backup: resume.backup,
                after_name: resume.after_name,
                hop: 0,
                tally,
                ..Continuation::start(&report.run_id, container)
            });
        }
    }
    if !handover.is_empty() {
        match send_continuations(app, &handover).await {
            Ok(n) => report.continuations_queued = n,
            Err((n, e)) => {
                report.continuations_queued = n;
                // Nothing is lost: the next scheduled run covers these containers again.
                report.error("", None, format!("queueing continuations: {e}"));
            }
        }
    }
    report.complete = complete && report.errors == 0;
    report.finish(started);
    Ok(report)
}

/// What the worker does with one continuation.
#[derive(Debug)]
pub enum ContinuationOutcome {
    /// Done (finished, handed over, or the container failed permanently and was reported).
    Done(Box<ReconcileReport>),
    /// The message cannot be understood: poison it (never retried).
    Malformed(String),
    /// Try the message again later (the host retries, then poisons).
    Retry(String),
    /// A producer run's hop (the queue carries every kind of continuation).
    Producer(Box<crate::ops::snapshot::SnapshotReport>),
    /// A chunk of a restore started over HTTP.
    Restore(Box<crate::ops::restore::ExecReport>),
    /// A container hop of a prune run.
    Prune(Box<crate::ops::prune::PruneReport>),
}

/// `ReconcileWorker`: one hop of a container's chain, within the configured budget.
pub async fn run_continuation(app: &App, text: &str) -> ContinuationOutcome {
    let kind = crate::ops::snapshot::run_state::kind_of(text);
    if kind.as_deref() == Some(crate::ops::restore::status_kind()) {
        return match crate::ops::restore::run_chunk(app, text).await {
            crate::ops::restore::ChunkOutcome::Done(r) => ContinuationOutcome::Restore(r),
            crate::ops::restore::ChunkOutcome::Malformed(e) => ContinuationOutcome::Malformed(e),
            crate::ops::restore::ChunkOutcome::Retry(e) => ContinuationOutcome::Retry(e),
        };
    }
    if kind.as_deref() == Some(crate::ops::prune::MESSAGE_KIND) {
        return match crate::ops::prune::run_hop(app, text).await {
            crate::ops::prune::Hop::Done(r) => ContinuationOutcome::Prune(r),
            crate::ops::prune::Hop::Malformed(e) => ContinuationOutcome::Malformed(e),
            crate::ops::prune::Hop::Retry(e) => ContinuationOutcome::Retry(e),
        };
    }
    if kind.as_deref() == Some(crate::ops::snapshot::run_state::MESSAGE_KIND) {
        return match crate::ops::snapshot::continue_run(app, text).await {
            crate::ops::snapshot::Hop::Done(r) => ContinuationOutcome::Producer(r),
            crate::ops::snapshot::Hop::Malformed(e) => ContinuationOutcome::Malformed(e),
            crate::ops::snapshot::Hop::Retry(e) => ContinuationOutcome::Retry(e),
        };
    }
    let started = Instant::now();
    let cont = match Continuation::parse(text) {
        Ok(c) => c,
        Err(e) => return ContinuationOutcome::Malformed(e),
    };
    let mut report = ReconcileReport {
        run_id: cont.run_id.clone(),
        containers: 1,
        ..Default::default()
    };
    let ctx = Ctx {
        app,
        dry_run: false,
        order: app.settings.name_order,
        deadline: Some(started + app.settings.reconcile_budget),
        progress: super::no_progress(),
        pending_ttl: app.pending_ttl().await,
        batches: Default::default(),
    };
    let from = Checkpoint {
        source: cont.source.clone(),
        backup: cont.backup.clone(),
        after_name: cont.after_name.clone(),
    };
    let mut tally = ReconcileTally::default();
    let walk = walk_container(&ctx, &cont.container, from, &mut tally, &mut report).await;
    report.tally.merge(&tally);
    let mut chain = cont.tally.clone();
    chain.merge(&tally);
    match walk {
        Walk::Finished => {
            report.containers_finished = 1;
            report.complete = report.errors == 0;
            info!(
                run_id = %cont.run_id,
                container = %cont.container,
                hops = cont.hop + 1,
                source_scanned = chain.source_scanned,
                backup_scanned = chain.backup_scanned,
                in_sync = chain.in_sync,
                needs_backup = chain.needs_backup,
                pending = chain.pending,
                tombstones = chain.tombstones,
                rpo_lag_secs = chain.rpo_lag(OffsetDateTime::now_utc()).as_secs(),
                "reconcile of container finished"
            );
        }
        Walk::OutOfBudget(cp) => {
            let next = Continuation {
                source: cp.source,
                backup: cp.backup,
                after_name: cp.after_name,
                hop: cont.hop + 1,
                tally: chain,
                ..cont.clone()
            };
            if let Err((_, e)) = send_continuations(app, std::slice::from_ref(&next)).await {
                // Fail the invocation: the host redelivers this message and the range is redone.
                return ContinuationOutcome::Retry(format!("queueing the next continuation: {e}"));
            }
            report.continuations_queued = 1;
        }
        Walk::Failed {
            error, retryable, ..
        } => {
            if retryable {
                return ContinuationOutcome::Retry(error);
            }
            report.error(&cont.container, None, error);
        }
    }
    report.finish(started);
    ContinuationOutcome::Done(Box::new(report))
}

/// Covered containers of both accounts (a container that exists only in the backup had its
/// source container deleted: its blobs are tombstoned), sorted, without duplicates.
pub(crate) async fn covered_containers(app: &App) -> Result<Vec<String>, StorageError> {
    let mut names = std::collections::BTreeSet::new();
    for store in [&app.source, &app.backup] {
        let mut marker = None;
        loop {
            let (page, next) = store.list_containers_page(marker.take()).await?;
            names.extend(
                page.into_iter()
                    .filter(|c| app.settings.covers_container(c)),
            );
            match next {
                Some(m) => marker = Some(m),
                None => break,
            }
        }
    }
    Ok(names.into_iter().collect())
}

/// Sends continuations; on failure, how many went out before it.
async fn send_continuations(app: &App, items: &[Continuation]) -> Result<u64, (u64, StorageError)> {
    let queue = reconcile_queue(app).map_err(|e| (0, e))?;
    queue.ensure_exists().await.map_err(|e| (0, e))?;
    // Concurrently: a run over thousands of containers hands over thousands of messages, and
    // that must fit in what is left of the invocation after the budget.
    let texts: Vec<String> = items.iter().map(Continuation::to_json).collect();
    let queue = &queue;
    let results: Vec<Result<(), StorageError>> = stream::iter(texts)
        .map(|text| async move { queue.send_text(&text).await })
        .buffer_unordered(app.settings.concurrency)
        .collect()
        .await;
    let sent = results.iter().filter(|r| r.is_ok()).count() as u64;
    if let Some(e) = results.into_iter().find_map(Result::err) {
        return Err((sent, e));
    }
    info!(
        count = sent,
        queue = queue.name(),
        "reconcile continuations queued"
    );
    Ok(sent)
}

/// The continuation queue (and its `-poison` queue) on the AzureWebJobsStorage account.
pub fn reconcile_queue(app: &App) -> Result<BackupQueue, StorageError> {
    app.clients
        .backup_queue(&app.settings.jobs, &app.settings.reconcile_queue)
}

/// One side of the join: where its next page is and where its current page started.
struct Side {
    next: Cursor,
    page_start: Cursor,
    /// Rows of earlier pages (all handled).
    earlier: u64,
    /// Names of the current page's rows (sorted): rows after the checkpoint are re-read by the
    /// next hop, so only those up to it count as scanned here (hops never count a row twice).
    names: Vec<String>,
}

impl Side {
    fn new(at: &Cursor) -> Self {
        Side {
            next: at.clone(),
            page_start: at.clone(),
            earlier: 0,
            names: Vec::new(),
        }
    }

    fn scanned(&self, order: NameOrder, done: Option<&str>) -> u64 {
        let current = match done {
            None => 0,
            Some(d) => self.names.partition_point(|n| order.cmp(n, d).is_le()),
        };
        self.earlier + current as u64
    }
}

/// A side's listing: flat, base blobs with metadata, the next page fetched ahead. A missing
/// container lists as empty: a source container that is gone means its blobs are gone (each is
/// still confirmed by a HEAD before a tombstone), and a backup container that does not exist yet
/// holds nothing (the worker creates it on its first copy).
fn lister(store: &BlobStore, container: &str, page_size: Option<u32>) -> Lister {
    let opts = ListOptions {
        prefix: None,
        snapshots: false,
        metadata: true,
        max_results: page_size,
    };
    Lister::new(store, container, opts).missing_is_empty()
}

/// Walks one container from `from`, carrying out actions page by page.
async fn walk_container(
    ctx: &Ctx<'_>,
    container: &str,
    from: Checkpoint,
    tally: &mut ReconcileTally,
    report: &mut ReconcileReport,
) -> Walk {
    ctx.progress.message(container);
    let order = ctx.order;
    let page_size = ctx.app.settings.list_page_size;
    let mut join = ReconcileJoin::new(order);
    let mut source = Side::new(&from.source);
    let mut backup = Side::new(&from.backup);
    let mut source_pages = lister(&ctx.app.source, container, page_size);
    let mut backup_pages = lister(&ctx.app.backup, container, page_size);
    for (side, pages) in [(&source, &mut source_pages), (&backup, &mut backup_pages)] {
        if side.next != Cursor::End {
            pages.prefetch(side.next.marker());
        }
    }
    if source.next == Cursor::End {
        join.end_source();
    }
    if backup.next == Cursor::End {
        join.end_backup();
    }
    let floor = from.after_name.clone();
    // Rows at or before the checkpoint were handled by an earlier invocation.
    let keep = |e: &BlobEntry| {
        floor
            .as_deref()
            .is_none_or(|f| order.cmp(&e.name, f).is_gt())
    };
    let mut done_name = from.after_name.clone();
    let mut handled_any = false;
    // When the source page whose rows are in the join was served: a batch is carried out before
    // the next source page is fetched, so its security states were observed then (not when they
    // are recorded, which may be minutes later).
    let mut source_served_at: Option<OffsetDateTime> = None;
    let mut batch: Vec<Action> = Vec::new();
    let checkpoint =
        |asking_source: Option<bool>, source: &Side, backup: &Side, done: &Option<String>| {
            // The side that asked for a page has an empty queue: it resumes at its next page.
            Checkpoint {
                source: if asking_source == Some(true) {
                    source.next.clone()
                } else {
                    source.page_start.clone()
                },
                backup: if asking_source == Some(false) {
                    backup.next.clone()
                } else {
                    backup.page_start.clone()
                },
                after_name: done.clone(),
            }
        };
    loop {
        let step = join.step();
        let asking_source = match step {
            Step::Action(action) => {
                tally.record(&action);
                handled_any = true;
                done_name = Some(action.name().to_owned());
                ctx.progress.inc(1);
                if matches!(
                    action,
                    Action::NeedsBackup { .. }
                        | Action::Tombstone { .. }
                        | Action::SecurityChanged { .. }
                        | Action::BackupDirectory { .. }
                ) {
                    batch.push(action);
                }
                continue;
            }
            Step::Done => {
                let batch = std::mem::take(&mut batch);
                execute(ctx, container, batch, source_served_at, tally, report).await;
                record_scanned(tally, order, &source, &backup, &done_name);
                return Walk::Finished;
            }
            Step::NeedSource => true,
            Step::NeedBackup => false,
        };
        let actions = std::mem::take(&mut batch);
        execute(ctx, container, actions, source_served_at, tally, report).await;
        if handled_any && ctx.out_of_budget() {
            record_scanned(tally, order, &source, &backup, &done_name);
            return Walk::OutOfBudget(checkpoint(
                Some(asking_source),
                &source,
                &backup,
                &done_name,
            ));
        }
        let (side, pages) = if asking_source {
            (&mut source, &mut source_pages)
        } else {
            (&mut backup, &mut backup_pages)
        };
        let page = match pages.page(side.next.marker()).await {
            Ok(p) => p,
            Err(e) => {
                record_scanned(tally, order, &source, &backup, &done_name);
                return Walk::Failed {
                    retryable: e.is_retryable(),
                    error: format!(
                        "listing the {} container: {e}",
                        if asking_source { "source" } else { "backup" }
                    ),
                    resume: checkpoint(Some(asking_source), &source, &backup, &done_name),
                };
            }
        };
        if asking_source {
            source_served_at = page.served_at;
        }
        side.page_start = side.next.clone();
        side.next = page.next_marker.map(Cursor::Marker).unwrap_or(Cursor::End);
        let ended = side.next == Cursor::End;
        let rows: Vec<BlobEntry> = page.entries.into_iter().filter(|e| keep(e)).collect();
        side.earlier += side.names.len() as u64;
        side.names = rows.iter().map(|e| e.name.clone()).collect();
        let pushed = if asking_source {
            join.push_source(rows)
        } else {
            join.push_backup(rows)
        };
        if let Err(e) = pushed {
            record_scanned(tally, order, &source, &backup, &done_name);
            return Walk::Failed {
                error: join_error(e),
                // The side's page was not consumed: resume from its start.
                resume: checkpoint(None, &source, &backup, &done_name),
                retryable: false,
            };
        }
        if ended {
            if asking_source {
                join.end_source();
            } else {
                join.end_backup();
            }
        }
    }
}

fn record_scanned(
    tally: &mut ReconcileTally,
    order: NameOrder,
    source: &Side,
    backup: &Side,
    done: &Option<String>,
) {
    tally.source_scanned = source.scanned(order, done.as_deref());
    tally.backup_scanned = backup.scanned(order, done.as_deref());
}

fn join_error(e: JoinError) -> String {
    match e {
        JoinError::OutOfOrder { .. } => format!(
            "{e}; the listing order differs from LAKEGUARD_NAME_ORDER (utf16 for flat accounts and Azurite, hierarchical for ADLS Gen2); nothing after this point was reconciled"
        ),
        other => other.to_string(),
    }
}

/// `lakeguard reconcile --continuations`: the ReconcileWorker's code over the continuation queue
/// from a terminal, until it is empty.
pub async fn drain_continuations(app: &App) -> Result<ReconcileReport, StorageError> {
    let started = Instant::now();
    let queue = reconcile_queue(app)?;
    queue.ensure_exists().await?;
    let mut total = ReconcileReport {
        run_id: "continuations".into(),
        ..Default::default()
    };
    let mut complete = true;
    loop {
        let batch = queue
            .receive(
                1,
                app.settings.reconcile_budget.as_secs().max(30) as i32 + 120,
            )
            .await?;
        let Some(msg) = batch.into_iter().next() else {
            break;
        };
        match run_continuation(app, &msg.text).await {
            ContinuationOutcome::Done(r) => {
                merge_report(&mut total, &r);
                complete &= r.complete || r.continuations_queued > 0;
                queue.delete(&msg).await?;
            }
            ContinuationOutcome::Restore(r) => {
                complete &= r.failed == 0;
                queue.delete(&msg).await?;
            }
            ContinuationOutcome::Prune(r) => {
                complete &= r.is_complete();
                for f in &r.failures {
                    total.error("", Some(&f.blob), f.error.clone());
                }
                queue.delete(&msg).await?;
            }
            ContinuationOutcome::Producer(r) => {
                total.snapshots_made += r.snapshotted;
                total.requests_enqueued += r.enqueued;
                for f in &r.failures {
                    total.error(&r.container, Some(&f.blob), f.error.clone());
                }
                complete &= r.is_complete();
                queue.delete(&msg).await?;
            }
            ContinuationOutcome::Malformed(reason) => {
                queue.poison(&msg.text, &reason, msg.dequeue_count).await?;
                queue.delete(&msg).await?;
                total.error("", None, reason);
                complete = false;
            }
            ContinuationOutcome::Retry(e) => {
                // Leave it for a later attempt (or the Functions worker) and stop here.
                queue.extend(&msg, 5).await?;
                total.error("", None, e);
                complete = false;
                break;
            }
        }
    }
    total.complete = complete && total.errors == 0;
    total.finish(started);
    Ok(total)
}

fn merge_report(total: &mut ReconcileReport, r: &ReconcileReport) {
    total.containers += r.containers;
    total.containers_finished += r.containers_finished;
    total.tally.merge(&r.tally);
    total.snapshots_made += r.snapshots_made;
    total.requests_enqueued += r.requests_enqueued;
    total.already_pending += r.already_pending;
    total.tombstones_written += r.tombstones_written;
    total.security_recorded += r.security_recorded;
    total.directories_backed_up += r.directories_backed_up;
    total.would_enqueue += r.would_enqueue;
    total.would_tombstone += r.would_tombstone;
    total.skipped += r.skipped;
    total.continuations_queued += r.continuations_queued;
    for f in &r.error_list {
        if total.error_list.len() < MAX_REPORTED_FAILURES {
            total.error_list.push(f.clone());
        }
    }
    total.errors += r.errors;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continuation_round_trip_and_validation() {
        let mut c = Continuation::start("run-1", "raw-data");
        c.source = Cursor::Marker("2!abc\"quoted\\".into());
        c.backup = Cursor::End;
        c.after_name = Some("dir/ünï \"x\".csv".into());
        c.hop = 3;
        let text = c.to_json();
        assert_eq!(Continuation::parse(&text).unwrap(), c);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["v"], 1);
        assert_eq!(v["kind"], "reconcile");
        assert_eq!(v["source"]["at"], "marker");
        assert_eq!(v["backup"]["at"], "end");
        assert_eq!(
            serde_json::to_value(Cursor::Start).unwrap(),
            serde_json::json!({"at": "start"})
        );
        for bad in [
            "",
            "{}",
            r#"{"v":2,"kind":"reconcile","run_id":"r","container":"raw","source":{"at":"start"},"backup":{"at":"start"},"after_name":null,"hop":0}"#,
            r#"{"v":1,"kind":"backup","run_id":"r","container":"raw","source":{"at":"start"},"backup":{"at":"start"},"after_name":null,"hop":0}"#,
            r#"{"v":1,"kind":"reconcile","run_id":"r","container":"Bad_Name","source":{"at":"start"},"backup":{"at":"start"},"after_name":null,"hop":0}"#,
        ] {
            assert!(Continuation::parse(bad).is_err(), "{bad}");
        }
        // The tally is optional (older or hand-written messages).
        let minimal = r#"{"v":1,"kind":"reconcile","run_id":"r","container":"raw","source":{"at":"start"},"backup":{"at":"start"},"after_name":null,"hop":0}"#;
        assert_eq!(
            Continuation::parse(minimal).unwrap(),
            Continuation::start("r", "raw")
        );
    }

    #[test]
    fn report_json_has_the_documented_fields() {
        let r = ReconcileReport::default();
        let v = serde_json::to_value(&r).unwrap();
        for k in [
            "run_id",
            "containers",
            "source_scanned",
            "backup_scanned",
            "in_sync",
            "snapshots_made",
            "requests_enqueued",
            "already_pending",
            "tombstones_written",
            "errors",
            "error_list",
            "elapsed_ms",
            "rpo_lag_secs",
            "oldest_unbacked_change",
            "continuations_queued",
            "complete",
        ] {
            assert!(v.get(k).is_some(), "{k} missing from {v}");
        }
    }
}
