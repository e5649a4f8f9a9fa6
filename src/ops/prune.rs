//! `lakeguard prune`, the `Prune` timer and the admin `POST /api/prune`: the retention policy
//! (`core::retention`) carried out. Plan first (what goes, why, bytes), then delete.
//!
//! - **Plan**: per container, the backup's and the source's histories are read together
//!   ([`HistoryStream`]) and each name's rows go through `retention::plan_name`; the actions are
//!   spooled to a temporary file (memory: a page per listing). lakeguard's own bookkeeping is
//!   planned too: restores older than `LAKEGUARD_UNDO_RETENTION` (their status, plan chunks,
//!   records and undo copies in `lakeguard-restores/<id>/`, and the undo snapshots they took in
//!   the source, `lakeguard_restore_undo`), and request batch and producer run records older
//!   than a week (`lakeguard-state/requests/`, `producer-runs/`).
//! - **Check**: a plan that deletes more than `--max-delete` (default
//!   `LAKEGUARD_PRUNE_MAX_DELETE_PERCENT` of the rows listed; bookkeeping not counted) is
//!   refused whole: nothing is deleted (the lesson of rclone's `--max-delete`).
//! - **Delete**: every delete is conditional — a snapshot by its exact id (snapshots are
//!   immutable), a base blob or record `If-Match` its listed ETag. A row gone already counts as
//!   gone; one that changed since the listing is left; one under an immutability policy or legal
//!   hold (`BlobImmutableDueTo…`) is left and reported as locked, never a failure of the run.
//! - **Budget** (timer, HTTP): a run over all containers hands each container to a continuation
//!   message (`{"v":1,"kind":"prune","run_id","container","checkpoint","hop"}`); a hop plans until
//!   its budget, checks and carries out what it planned, and hands the rest over from its
//!   listing checkpoint. The bookkeeping is a hop of its own (`"bookkeeping": {listing, marker}`),
//!   a page at least per hop. A killed hop is redelivered; its deletions are idempotent and the
//!   next plan does not list what is gone.
//!
//! Pruning is the only operation that deletes backup data: it is meant to run under an identity
//! that has that right (an operator's CLI, or a deployment that grants it), unlike the worker.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{stream, StreamExt};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tracing::{info, warn};

use super::history_stream::{HistoryStream, Sides, StreamCheckpoint};
use super::{BlobFailure, OpError, Progress, MAX_REPORTED_FAILURES};
use crate::app::App;
use crate::core::retention::{self, Policy, PruneAction};
use crate::model::Etag;
use crate::settings::{RESTORES_CONTAINER, STATE_CONTAINER};
use crate::storage::blob::ListOptions;
use crate::storage::StorageError;

/// The continuation message's `kind`.
pub const MESSAGE_KIND: &str = "prune";

/// Request batch and producer run records are useless after this (markers older than the
/// pending TTL are not trusted anyway; runs are finished or dead).
const RECORD_RETENTION: Duration = Duration::from_secs(7 * 86_400);

#[derive(Clone, Debug, Default)]
pub struct PruneOptions {
    /// One container, or every covered one.
    pub container: Option<String>,
    pub dry_run: bool,
    /// Refuse a plan deleting more than this (rows); `None`: the configured percentage.
    pub max_delete: Option<u64>,
    /// `None`: `Settings::retention`.
    pub policy: Option<Policy>,
}

/// Counts of one kind of deletion.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counts {
    pub backup_snapshots: u64,
    pub backup_names: u64,
    pub source_snapshots: u64,
    /// lakeguard's own records and restore undo data.
    pub bookkeeping: u64,
    pub bytes: u64,
}

impl Counts {
    fn add(&mut self, w: &Work) {
        self.bytes += w.bytes();
        match w {
            Work::Retention { action, .. } => match action {
                PruneAction::BackupSnapshot { .. } => self.backup_snapshots += 1,
                PruneAction::BackupName { .. } => self.backup_names += 1,
                PruneAction::SourceSnapshot { .. } => self.source_snapshots += 1,
            },
            Work::Record { .. } | Work::UndoSnapshot { .. } => self.bookkeeping += 1,
        }
    }

    /// Deletions of user data (the max-delete check's measure).
    pub fn data(&self) -> u64 {
        self.backup_snapshots + self.backup_names + self.source_snapshots
    }

    fn merge(&mut self, o: &Counts) {
        self.backup_snapshots += o.backup_snapshots;
        self.backup_names += o.backup_names;
        self.source_snapshots += o.source_snapshots;
        self.bookkeeping += o.bookkeeping;
        self.bytes += o.bytes;
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PruneReport {
    pub run_id: String,
    pub dry_run: bool,
    /// The policies applied, as text.
    pub policy: String,
    pub containers: u64,
    pub names_scanned: u64,
    /// Backup and source rows listed (base blobs and snapshots).
    pub rows_scanned: u64,
    pub planned: Counts,
    pub deleted: Counts,
    /// Source snapshots the policy does not need, kept because the backup does not (provably)
    /// hold their version.
    pub kept_not_in_backup: u64,
    /// Names left alone: rows that cannot be placed in time.
    pub unplaceable: u64,
    /// Under an immutability policy or legal hold: left, reported.
    pub locked: u64,
    /// Gone already, or changed since the listing: left.
    pub already_gone: u64,
    pub changed: u64,
    pub failed: u64,
    pub failures: Vec<BlobFailure>,
    /// The largest number of data deletions this run accepts.
    pub max_delete: u64,
    /// Why nothing was deleted (the plan exceeded `max_delete`).
    pub refused: Option<String>,
    pub continuations_queued: u64,
    pub elapsed_ms: u128,
}

impl PruneReport {
    pub fn is_complete(&self) -> bool {
        self.refused.is_none() && self.failed == 0
    }

    fn merge(&mut self, o: &PruneReport) {
        self.containers += o.containers;
        self.names_scanned += o.names_scanned;
        self.rows_scanned += o.rows_scanned;
        self.planned.merge(&o.planned);
        self.deleted.merge(&o.deleted);
        self.kept_not_in_backup += o.kept_not_in_backup;
        self.unplaceable += o.unplaceable;
        self.locked += o.locked;
        self.already_gone += o.already_gone;
        self.changed += o.changed;
        self.failed += o.failed;
        for f in &o.failures {
            if self.failures.len() < MAX_REPORTED_FAILURES {
                self.failures.push(f.clone());
            }
        }
        self.max_delete += o.max_delete;
        if self.refused.is_none() {
            self.refused = o.refused.clone();
        }
        self.continuations_queued += o.continuations_queued;
    }
}

/// One planned deletion.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "work")]
enum Work {
    Retention {
        container: String,
        action: PruneAction,
    },
    /// A bookkeeping blob of the backup account (`If-Match`).
    Record {
        container: String,
        blob: String,
        etag: Etag,
        bytes: u64,
    },
    /// An undo snapshot a restore took in the source before an overwrite.
    UndoSnapshot {
        container: String,
        blob: String,
        snapshot: String,
        bytes: u64,
    },
}

impl Work {
    fn bytes(&self) -> u64 {
        match self {
            Work::Retention { action, .. } => action.bytes(),
            Work::Record { bytes, .. } | Work::UndoSnapshot { bytes, .. } => *bytes,
        }
    }
    fn label(&self) -> String {
        match self {
            Work::Retention { container, action } => format!("{container}/{}", action.name()),
            Work::Record {
                container, blob, ..
            }
            | Work::UndoSnapshot {
                container, blob, ..
            } => format!("{container}/{blob}"),
        }
    }
}

/// The planned work, one JSON line each, in a temporary file removed on drop.
struct Spool {
    path: PathBuf,
    writer: Option<BufWriter<File>>,
    count: u64,
}

fn spool_error(e: std::io::Error) -> OpError {
    OpError::Storage(StorageError::Permanent {
        what: "prune plan spool (temporary file)".into(),
        detail: e.to_string(),
    })
}

impl Spool {
    fn new(id: &str) -> Result<Spool, OpError> {
        let path = std::env::temp_dir().join(format!(
            "lakeguard-prune-{id}-{:016x}.jsonl",
            super::restore::random_u64()
        ));
        let file = File::create(&path).map_err(spool_error)?;
        Ok(Spool {
            path,
            writer: Some(BufWriter::new(file)),
            count: 0,
        })
    }

    fn push(&mut self, w: &Work) -> Result<(), OpError> {
        let out = self.writer.as_mut().expect("open spool");
        serde_json::to_writer(&mut *out, w).map_err(|e| spool_error(e.into()))?;
        out.write_all(b"\n").map_err(spool_error)?;
        self.count += 1;
        Ok(())
    }

    fn read(&mut self) -> Result<impl Iterator<Item = Result<Work, OpError>>, OpError> {
        if let Some(mut w) = self.writer.take() {
            w.flush().map_err(spool_error)?;
        }
        let lines = BufReader::new(File::open(&self.path).map_err(spool_error)?).lines();
        Ok(lines.map(|l| {
            l.map_err(spool_error)
                .and_then(|l| serde_json::from_str(&l).map_err(|e| spool_error(e.into())))
        }))
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.writer.take();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Restore ids begin with their UTC start (`yyyymmddThhmmssz-…`, see `restore::new_id`); batch
/// ids too (`yyyymmddThhmmss-…`).
fn id_time(id: &str) -> Option<OffsetDateTime> {
    let d = id.get(..15)?;
    let fmt = time::macros::format_description!("[year][month][day]t[hour][minute][second]");
    time::PrimitiveDateTime::parse(d, &fmt)
        .ok()
        .map(|t| t.assume_utc())
}

fn expired(id: &str, retention: Duration, now: OffsetDateTime) -> bool {
    id_time(id).is_some_and(|t| {
        t + time::Duration::try_from(retention).unwrap_or(time::Duration::MAX) <= now
    })
}

/// Plans one container from `from` until the listing ends or `deadline` passes (checked between
/// batches, after at least one).
async fn plan_container(
    app: &App,
    container: &str,
    policy: &Policy,
    from: &StreamCheckpoint,
    deadline: Option<Instant>,
    spool: &mut Spool,
    report: &mut PruneReport,
) -> Result<Option<StreamCheckpoint>, OpError> {
    let now = OffsetDateTime::now_utc();
    let mut stream = HistoryStream::resume(
        app,
        container,
        None,
        Sides {
            backup: Some(true),
            source: Some(true),
            missing_is_empty: true,
        },
        from,
    );
    report.containers += 1;
    while let Some(batch) = stream.next_batch().await? {
        for rows in batch {
            report.names_scanned += 1;
            report.rows_scanned += (rows.backup.len() + rows.source.len()) as u64;
            let plan = retention::plan_name(&rows.backup, &rows.source, policy, now);
            report.unplaceable += u64::from(plan.unplaceable);
            report.kept_not_in_backup += plan.kept_not_in_backup;
            for action in plan.actions {
                let w = Work::Retention {
                    container: container.to_owned(),
                    action,
                };
                report.planned.add(&w);
                spool.push(&w)?;
            }
            // Undo snapshots restores took in the source, past the undo retention.
            for r in rows.source.iter().filter(|r| r.snapshot.is_some()) {
                if let Some(id) = r.meta(super::restore::RESTORE_UNDO) {
                    if expired(id, app.settings.undo_retention, now) {
                        let w = Work::UndoSnapshot {
                            container: container.to_owned(),
                            blob: r.name.clone(),
                            snapshot: r.snapshot.clone().unwrap_or_default(),
                            bytes: r.content_length,
                        };
                        report.planned.add(&w);
                        spool.push(&w)?;
                    }
                }
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let cp = stream.checkpoint();
            let over = matches!(
                (&cp.backup, &cp.source),
                (
                    super::history_stream::SideCursor::End,
                    super::history_stream::SideCursor::End
                )
            );
            if !over {
                return Ok(Some(cp));
            }
        }
    }
    Ok(None)
}

/// Where a bookkeeping plan goes on: the index of the next of [`BOOKKEEPING`]'s listings and
/// the marker within it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookkeepingCursor {
    pub listing: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marker: Option<String>,
}

/// lakeguard's bookkeeping: (container, prefix, how long it is kept). The names begin with the
/// id's UTC start, so each listing gives the oldest first.
fn bookkeeping(app: &App) -> [(&'static str, Option<&'static str>, Duration); 3] {
    [
        (RESTORES_CONTAINER, None, app.settings.undo_retention),
        (STATE_CONTAINER, Some("requests/"), RECORD_RETENTION),
        (STATE_CONTAINER, Some("producer-runs/"), RECORD_RETENTION),
    ]
}

/// Plans the bookkeeping of the reserved containers from `from`, a page at a time, until the
/// listings end (`None`) or `deadline` passes after a page (where the next hop goes on).
async fn plan_bookkeeping(
    app: &App,
    from: &BookkeepingCursor,
    deadline: Option<Instant>,
    spool: &mut Spool,
    report: &mut PruneReport,
) -> Result<Option<BookkeepingCursor>, OpError> {
    let now = OffsetDateTime::now_utc();
    let targets = bookkeeping(app);
    let mut cursor = from.clone();
    while let Some(&(container, prefix, retention)) = targets.get(cursor.listing) {
        let opts = ListOptions {
            prefix: prefix.map(str::to_owned),
            snapshots: false,
            metadata: false,
            max_results: app.settings.list_page_size,
        };
        let next_marker = match app
            .backup
            .list_page(container, &opts, cursor.marker.take())
            .await
        {
            Ok(page) => {
                for e in page.entries {
                    let id = e
                        .name
                        .strip_prefix(prefix.unwrap_or(""))
                        .unwrap_or(&e.name)
                        .split('/')
                        .next()
                        .unwrap_or("");
                    if expired(id, retention, now) {
                        let w = Work::Record {
                            container: container.to_owned(),
                            blob: e.name.clone(),
                            etag: e.etag.clone(),
                            bytes: e.content_length,
                        };
                        report.planned.add(&w);
                        spool.push(&w)?;
                    }
                }
                page.next_marker
            }
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(e.into()),
        };
        cursor = match next_marker {
            Some(marker) => BookkeepingCursor {
                listing: cursor.listing,
                marker: Some(marker),
            },
            None => BookkeepingCursor {
                listing: cursor.listing + 1,
                marker: None,
            },
        };
        if cursor.listing >= targets.len() {
            return Ok(None);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(Some(cursor));
        }
    }
    Ok(None)
}

enum Done {
    Deleted,
    Gone,
    Changed,
    Locked(String),
    Failed(String),
}

fn classify(r: Result<(), StorageError>) -> Done {
    match r {
        Ok(()) => Done::Deleted,
        Err(e) if e.is_not_found() => Done::Gone,
        Err(e) if e.is_precondition_failed() => Done::Changed,
        // Version-level WORM, a time-based retention policy, a legal hold.
        Err(e) if e.code().contains("Immutable") || e.code().contains("LegalHold") => {
            Done::Locked(e.to_string())
        }
        Err(e) => Done::Failed(e.to_string()),
    }
}

async fn delete(app: &App, w: &Work) -> Done {
    classify(match w {
        Work::Retention { container, action } => match action {
            PruneAction::BackupSnapshot { name, snapshot, .. } => {
                app.backup
                    .delete(container, name, Some(snapshot), None, false)
                    .await
            }
            // The whole history of the name: the base If-Match, with its snapshots.
            PruneAction::BackupName {
                name, base_etag, ..
            } => {
                app.backup
                    .delete(container, name, None, Some(base_etag), true)
                    .await
            }
            PruneAction::SourceSnapshot { name, snapshot, .. } => {
                app.source
                    .delete(container, name, Some(snapshot), None, false)
                    .await
            }
        },
        Work::Record {
            container,
            blob,
            etag,
            ..
        } => {
            app.backup
                .delete(container, blob, None, Some(etag), false)
                .await
        }
        Work::UndoSnapshot {
            container,
            blob,
            snapshot,
            ..
        } => {
            app.source
                .delete(container, blob, Some(snapshot), None, false)
                .await
        }
    })
}

/// Carries out the spooled work with bounded concurrency.
async fn execute(
    app: &App,
    spool: &mut Spool,
    report: &mut PruneReport,
    progress: &Arc<dyn Progress>,
) -> Result<(), OpError> {
    progress.add_total(spool.count);
    progress.message("pruning");
    let mut reader = spool.read()?;
    loop {
        let mut batch = Vec::new();
        for w in reader.by_ref().take(512) {
            batch.push(w?);
        }
        if batch.is_empty() {
            return Ok(());
        }
        let results: Vec<(Work, Done)> = stream::iter(batch)
            .map(|w| async move {
                let done = delete(app, &w).await;
                (w, done)
            })
            .buffer_unordered(app.settings.concurrency.max(1))
            .collect()
            .await;
        for (w, done) in results {
            progress.inc(1);
            match done {
                Done::Deleted => report.deleted.add(&w),
                Done::Gone => report.already_gone += 1,
                Done::Changed => report.changed += 1,
                Done::Locked(why) => {
                    info!(blob = %w.label(), %why, "locked by an immutability policy or legal hold; left");
                    report.locked += 1;
                }
                Done::Failed(error) => {
                    warn!(blob = %w.label(), %error, "prune delete failed");
                    report.failed += 1;
                    if report.failures.len() < MAX_REPORTED_FAILURES {
                        report.failures.push(BlobFailure {
                            blob: w.label(),
                            error,
                        });
                    }
                }
            }
        }
    }
}

/// The max-delete check: refuses when the planned data deletions exceed the limit.
fn check(report: &mut PruneReport, max_delete: Option<u64>, percent: u32) -> bool {
    report.max_delete = max_delete.unwrap_or(report.rows_scanned * u64::from(percent) / 100);
    if report.planned.data() > report.max_delete {
        report.refused = Some(format!(
            "the plan deletes {} backup or source rows of {} listed, more than the limit of {} ({}); nothing was deleted. Check the policy, then run `lakeguard prune --max-delete {}` to accept it",
            report.planned.data(),
            report.rows_scanned,
            report.max_delete,
            if max_delete.is_some() { "--max-delete".to_owned() } else { format!("LAKEGUARD_PRUNE_MAX_DELETE_PERCENT={percent}%") },
            report.planned.data()
        ));
        return false;
    }
    true
}

fn new_report(app: &App, policy: &Policy, dry_run: bool) -> PruneReport {
    PruneReport {
        run_id: super::restore::new_id(),
        dry_run,
        policy: format!(
            "backup {}; source snapshots {}; tombstones {}; undo data {} s",
            policy.backup,
            policy.source_snapshots,
            policy
                .tombstone_retention
                .map_or("kept".into(), |d| format!("{} s", d.as_secs())),
            app.settings.undo_retention.as_secs()
        ),
        ..Default::default()
    }
}

async fn containers(app: &App, one: Option<&str>) -> Result<Vec<String>, OpError> {
    match one {
        Some(c) => {
            crate::settings::validate_container_name(c).map_err(OpError::InvalidInput)?;
            if crate::settings::is_reserved_container(c) {
                return Err(OpError::InvalidInput(format!(
                    "`{c}` is lakeguard's own bookkeeping; it is pruned with every run"
                )));
            }
            Ok(vec![c.to_owned()])
        }
        None => Ok(super::reconcile::covered_containers(app).await?),
    }
}

/// `lakeguard prune`: the whole plan, the check, then the deletions, in this process.
pub async fn run(
    app: &App,
    opts: &PruneOptions,
    progress: Arc<dyn Progress>,
) -> Result<PruneReport, OpError> {
    let started = Instant::now();
    let policy = opts
        .policy
        .clone()
        .unwrap_or_else(|| app.settings.retention.clone());
    let mut report = new_report(app, &policy, opts.dry_run);
    let mut spool = Spool::new(&report.run_id)?;
    progress.message("planning");
    for c in containers(app, opts.container.as_deref()).await? {
        plan_container(
            app,
            &c,
            &policy,
            &StreamCheckpoint::default(),
            None,
            &mut spool,
            &mut report,
        )
        .await?;
    }
    plan_bookkeeping(
        app,
        &BookkeepingCursor::default(),
        None,
        &mut spool,
        &mut report,
    )
    .await?;
    if check(
        &mut report,
        opts.max_delete,
        app.settings.prune_max_delete_percent,
    ) && !opts.dry_run
    {
        execute(app, &mut spool, &mut report, &progress).await?;
    }
    report.elapsed_ms = started.elapsed().as_millis();
    log(&report);
    Ok(report)
}

fn log(r: &PruneReport) {
    info!(
        run_id = %r.run_id,
        dry_run = r.dry_run,
        names = r.names_scanned,
        planned = r.planned.data(),
        deleted = r.deleted.data(),
        bookkeeping = r.deleted.bookkeeping,
        bytes_freed = r.deleted.bytes,
        locked = r.locked,
        failed = r.failed,
        refused = r.refused.is_some(),
        "prune finished"
    );
}

/// A prune hop on the continuation queue.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Continuation {
    pub v: u32,
    pub kind: String,
    pub run_id: String,
    pub container: String,
    #[serde(default)]
    pub checkpoint: StreamCheckpoint,
    pub hop: u32,
    /// Set on the hop that prunes lakeguard's own bookkeeping (its listings are not a
    /// container's history): where it goes on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bookkeeping: Option<BookkeepingCursor>,
}

async fn send(app: &App, c: &Continuation) -> Result<(), StorageError> {
    let queue = super::reconcile::reconcile_queue(app)?;
    queue.ensure_exists().await?;
    queue
        .send_text(&serde_json::to_string(c).expect("a continuation serialises"))
        .await
}

/// The `Prune` timer: does nothing unless a retention policy is configured; otherwise
/// [`start`] over every covered container.
pub async fn run_timer(app: &App) -> Result<PruneReport, OpError> {
    if !app.settings.retention_set {
        let mut report = new_report(app, &app.settings.retention, false);
        report.refused = Some(
            "no retention policy is configured (LAKEGUARD_RETENTION_BACKUP, LAKEGUARD_RETENTION_SOURCE_SNAPSHOTS or LAKEGUARD_TOMBSTONE_RETENTION): nothing pruned".into(),
        );
        info!("prune timer: no retention policy configured; nothing to do");
        return Ok(report);
    }
    start(app, None).await
}

/// Prunes the bookkeeping, then hands each container (one, or every covered one) to a
/// continuation hop, carried out in parallel on any instance.
pub async fn start(app: &App, container: Option<&str>) -> Result<PruneReport, OpError> {
    let started = Instant::now();
    let policy = app.settings.retention.clone();
    let mut report = new_report(app, &policy, false);
    let names = containers(app, container).await?;
    let first = |container: String, bookkeeping: Option<BookkeepingCursor>| Continuation {
        v: 1,
        kind: MESSAGE_KIND.into(),
        run_id: report.run_id.clone(),
        container,
        checkpoint: StreamCheckpoint::default(),
        hop: 0,
        bookkeeping,
    };
    let hops: Vec<Continuation> = names
        .into_iter()
        .map(|c| first(c, None))
        .chain([first(
            RESTORES_CONTAINER.into(),
            Some(BookkeepingCursor::default()),
        )])
        .collect();
    for c in &hops {
        send(app, c).await?;
        report.continuations_queued += 1;
    }
    report.elapsed_ms = started.elapsed().as_millis();
    Ok(report)
}

/// What a hop did.
pub enum Hop {
    Done(Box<PruneReport>),
    Malformed(String),
    Retry(String),
}

/// One container hop: plans until the budget, checks this hop's plan, carries it out, and
/// hands the rest over.
pub async fn run_hop(app: &App, text: &str) -> Hop {
    let started = Instant::now();
    let c: Continuation = match serde_json::from_str(text.trim()) {
        Ok(c) => c,
        Err(e) => return Hop::Malformed(format!("not a prune continuation: {e}")),
    };
    if c.v != 1 || c.kind != MESSAGE_KIND {
        return Hop::Malformed(format!("unsupported prune continuation: {text}"));
    }
    if let Err(e) = crate::settings::validate_container_name(&c.container) {
        return Hop::Malformed(e);
    }
    let policy = app.settings.retention.clone();
    let mut report = new_report(app, &policy, false);
    report.run_id = c.run_id.clone();
    let mut spool = match Spool::new(&report.run_id) {
        Ok(s) => s,
        Err(e) => return Hop::Retry(e.to_string()),
    };
    if let Some(from) = &c.bookkeeping {
        return bookkeeping_hop(app, &c, from, started, spool, report).await;
    }
    let deadline = started + app.settings.reconcile_budget.max(Duration::from_secs(1));
    let rest = match plan_container(
        app,
        &c.container,
        &policy,
        &c.checkpoint,
        Some(deadline),
        &mut spool,
        &mut report,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => return Hop::Retry(format!("planning: {e}")),
    };
    if check(&mut report, None, app.settings.prune_max_delete_percent) {
        if let Err(e) = execute(app, &mut spool, &mut report, &super::no_progress()).await {
            return Hop::Retry(format!("pruning: {e}"));
        }
    } else {
        warn!(container = %c.container, refused = ?report.refused, "prune hop refused by the max-delete check");
    }
    let next = rest.map(|checkpoint| Continuation {
        checkpoint,
        hop: c.hop + 1,
        ..c.clone()
    });
    hand_over(app, next, started, report).await
}

/// A hop's end: queues the next hop (if any), then reports.
async fn hand_over(
    app: &App,
    next: Option<Continuation>,
    started: Instant,
    mut report: PruneReport,
) -> Hop {
    if let Some(next) = next {
        if let Err(e) = send(app, &next).await {
            return Hop::Retry(format!("queueing the next hop: {e}"));
        }
        report.continuations_queued = 1;
    }
    report.elapsed_ms = started.elapsed().as_millis();
    log(&report);
    Hop::Done(Box::new(report))
}

/// The bookkeeping hop: plans a page at least, then until the budget; deletes what it planned
/// (not subject to the max-delete check, which guards data); hands the rest over.
async fn bookkeeping_hop(
    app: &App,
    c: &Continuation,
    from: &BookkeepingCursor,
    started: Instant,
    mut spool: Spool,
    mut report: PruneReport,
) -> Hop {
    let deadline = started + app.settings.reconcile_budget;
    let rest = match plan_bookkeeping(app, from, Some(deadline), &mut spool, &mut report).await {
        Ok(r) => r,
        Err(e) => return Hop::Retry(format!("planning the bookkeeping: {e}")),
    };
    if let Err(e) = execute(app, &mut spool, &mut report, &super::no_progress()).await {
        return Hop::Retry(format!("pruning the bookkeeping: {e}"));
    }
    let next = rest.map(|cursor| Continuation {
        bookkeeping: Some(cursor),
        hop: c.hop + 1,
        ..c.clone()
    });
    hand_over(app, next, started, report).await
}

/// Merges hop reports (the CLI's `reconcile --continuations` drain).
pub fn merge(total: &mut PruneReport, r: &PruneReport) {
    total.merge(r);
}
