//! SnapshotProducer: snapshot every new or changed blob of a container and queue one backup
//! request per snapshot.
//!
//! Two ways to find them. Without a usable watermark, the listing includes snapshots and
//! [`ChangeDetector`] compares each base blob with its newest snapshot: exact, but the listing
//! grows with the snapshot history. With one ([`crate::core::watermark`], kept by
//! [`super::watermark`]), only base blobs are listed and Last-Modified decides. Only a run that
//! handled every blob it listed may leave a watermark; any failure removes it, so a blob whose
//! snapshot or request failed is found again by the next (full) run.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use futures::{stream, StreamExt};
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tracing::{debug, info, warn, Instrument};

pub mod run_state;

use super::{watermark, BlobFailure, OpError, Progress, MAX_REPORTED_FAILURES};
use crate::app::App;
use crate::core::changes::{ChangeDetector, Decision, Verdict};
use crate::core::watermark::{Since, StateBuilder};
use crate::model::{metadata, BackupRequest, BlobEntry, Etag, VersionProps};
use crate::storage::blob::{ListOptions, SnapshotTaken, TargetCondition};
use crate::storage::{BlobStore, Lister, StorageError};
use run_state::RunState;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SnapshotReport {
    pub container: String,
    pub prefix: Option<String>,
    /// Base blobs examined.
    pub scanned: u64,
    pub snapshotted: u64,
    /// Requests made (queued, or handed to the drain in this process).
    pub enqueued: u64,
    /// Of those, handed to the drain in this process (`--drain`) instead of queued.
    #[serde(default)]
    pub handed_off: u64,
    pub unchanged: u64,
    /// Directory placeholders, and blobs deleted between listing and snapshot.
    pub skipped: u64,
    pub failed: u64,
    pub failures: Vec<BlobFailure>,
    /// `since the previous complete run` (base blobs only, against the watermark) or
    /// `full (<why>)` (every snapshot listed).
    pub listing: String,
    /// The watermark's `from` when one was used.
    #[serde(with = "time::serde::rfc3339::option")]
    pub since: Option<OffsetDateTime>,
    /// What became of the watermark for the next run.
    pub state: String,
    /// The run ran out of its time budget and continues through a continuation message (the
    /// counts are those so far); `run_id` names it.
    #[serde(default)]
    pub continued: bool,
    #[serde(default)]
    pub run_id: Option<String>,
    /// Invocations the run took (0 or 1: one).
    #[serde(default)]
    pub hops: u32,
    pub elapsed_ms: u128,
}

impl SnapshotReport {
    pub fn is_complete(&self) -> bool {
        self.failed == 0
    }
}

/// Outcome for one blob.
enum One {
    /// The version snapshotted and requested (it may be newer than the listed one): queued, or
    /// handed to the drain in this process.
    Enqueued(Etag, OffsetDateTime, Delivered),
    Skipped,
    /// With whether a marked snapshot without a request was left behind.
    Failed(String, bool),
}

/// Attempts at snapshotting a blob that keeps changing under us before giving up on it for this
/// run (the next run, or reconcile, finds it again).
const SNAPSHOT_ATTEMPTS: usize = 3;

pub async fn run(
    app: &App,
    container: &str,
    prefix: Option<&str>,
    progress: Arc<dyn Progress>,
) -> Result<SnapshotReport, OpError> {
    run_with(app, container, prefix, false, progress).await
}

/// The whole run in this process (the CLI). `full`: list every snapshot even when a usable
/// watermark exists (the operator's `--full`).
pub async fn run_with(
    app: &App,
    container: &str,
    prefix: Option<&str>,
    full: bool,
    progress: Arc<dyn Progress>,
) -> Result<SnapshotReport, OpError> {
    let started = Instant::now();
    let (mut run, since, mut next) = begin(app, container, prefix, full).await?;
    segment(app, &mut run, since.as_ref(), &mut next, None, &progress).await?;
    Ok(finish(app, run, next, started).await)
}

/// A run that stops at `budget` (the HTTP producer: the host answers within 230 s), saves its
/// place and continues through a continuation message ([`run_state`]); the report then says
/// `continued` and carries the `run_id`.
pub async fn run_budgeted(
    app: &App,
    container: &str,
    prefix: Option<&str>,
    full: bool,
    budget: std::time::Duration,
) -> Result<SnapshotReport, OpError> {
    let started = Instant::now();
    let (mut run, since, mut next) = begin(app, container, prefix, full).await?;
    let stopped = segment(
        app,
        &mut run,
        since.as_ref(),
        &mut next,
        Some(started + budget),
        &super::no_progress(),
    )
    .await?;
    if !stopped {
        return Ok(finish(app, run, next, started).await);
    }
    hand_over(app, &mut run, &next, &TargetCondition::Absent, started)
        .await
        .map_err(OpError::from)?;
    Ok(run.report)
}

/// What a continuation hop did.
pub enum Hop {
    /// The hop ran (finished the run, or handed the rest over), or had nothing to do.
    Done(Box<SnapshotReport>),
    /// Can never succeed: poison it.
    Malformed(String),
    /// Try again later (the host retries, then poisons).
    Retry(String),
}

/// One hop of a producer run continued from the reconcile continuation queue.
pub async fn continue_run(app: &App, text: &str) -> Hop {
    let started = Instant::now();
    let c = match run_state::Continuation::parse(text) {
        Ok(c) => c,
        Err(e) => return Hop::Malformed(e),
    };
    let (mut run, etag) = match run_state::load(app, &c.run_id).await {
        Ok(Some(r)) => r,
        // The hop that queued this message saves its place right after: not yet, or it failed
        // (then the host retries that hop, which queues this one again).
        Ok(None) => return Hop::Retry(format!("producer run {} has no saved place yet", c.run_id)),
        Err(e) => return Hop::Retry(format!("reading the producer run: {e}")),
    };
    if run.container != c.container {
        return Hop::Malformed(format!(
            "run {} belongs to container {}, not {}",
            c.run_id, run.container, c.container
        ));
    }
    if run.finished || run.hop > c.hop {
        info!(run_id = %c.run_id, hop = c.hop, "this hop is done already; acknowledged");
        return Hop::Done(Box::new(run.report));
    }
    if run.hop < c.hop {
        return Hop::Retry(format!(
            "producer run {} is at hop {}; hop {} has not saved its place yet",
            c.run_id, run.hop, c.hop
        ));
    }
    let span = tracing::info_span!("snapshot_hop", run_id = %run.run_id, container = %run.container, hop = run.hop);
    async {
        let prefix = run.prefix.clone();
        let since = match &run.watermark {
            None => None,
            Some(expected) => {
                let loaded = watermark::load(app, &run.container, prefix.as_deref(), OffsetDateTime::now_utc()).await;
                match (loaded.since, loaded.etag) {
                    (Some(since), Some(e)) if &e == expected => Some(since),
                    _ => {
                        // Only a complete run replaces a watermark, and it listed everything
                        // this one has left; a removed one means the next run lists in full.
                        run.finished = true;
                        run.report.state = "the watermark was replaced or removed by another run meanwhile; that run (or the next full one) covers what this one had left".into();
                        run.updated_at = OffsetDateTime::now_utc();
                        return match run_state::save(app, &run, &TargetCondition::Matches(etag)).await {
                            Ok(_) => Hop::Done(Box::new(run.report)),
                            Err(e) => Hop::Retry(format!("saving the producer run: {e}")),
                        };
                    }
                }
            }
        };
        let mut next = StateBuilder::resume(&run.container, prefix.as_deref(), run.next_from, run.next_state.take())
            .unwrap_or_else(|_| StateBuilder::resume(&run.container, prefix.as_deref(), run.next_from, None).expect("an empty checkpoint"));
        let deadline = Some(started + app.settings.reconcile_budget.max(std::time::Duration::from_secs(1)));
        let stopped = match segment(app, &mut run, since.as_ref(), &mut next, deadline, &super::no_progress()).await {
            Ok(s) => s,
            Err(e) => return Hop::Retry(format!("listing: {e}")),
        };
        if stopped {
            return match hand_over(app, &mut run, &next, &TargetCondition::Matches(etag), started).await {
                Ok(()) => Hop::Done(Box::new(run.report)),
                Err(e) => Hop::Retry(format!("handing the run over: {e}")),
            };
        }
        let report = finish(app, run.clone(), next, started).await;
        run.report = report.clone();
        run.finished = true;
        run.updated_at = OffsetDateTime::now_utc();
        if let Err(e) = run_state::save(app, &run, &TargetCondition::Matches(etag)).await {
            warn!(error = %e, "could not mark the producer run finished; a redelivery finds its work done");
        }
        Hop::Done(Box::new(report))
    }
    .instrument(span)
    .await
}

/// Queues the next hop, then saves the run's place for it. In this order: a hop whose message
/// arrives before its place is saved is retried by the host until it is; a save that fails
/// fails this invocation, whose redelivery redoes it (the extra message finds its hop done).
async fn hand_over(
    app: &App,
    run: &mut RunState,
    next: &StateBuilder,
    cond: &TargetCondition,
    started: Instant,
) -> Result<(), StorageError> {
    run.next_state = next.checkpoint();
    run.hop += 1;
    run.report.elapsed_ms += started.elapsed().as_millis();
    run.report.hops = run.hop;
    run.report.continued = true;
    run.report.run_id = Some(run.run_id.clone());
    run.report.state = format!("continued by hop {} of run {}", run.hop, run.run_id);
    run.updated_at = OffsetDateTime::now_utc();
    send_continuation(app, run).await?;
    if run_state::save(app, run, cond).await?.is_none() {
        // Another invocation of this hop saved first: it owns the run from here.
        run.report.state = "another invocation continues this run".into();
        return Ok(());
    }
    info!(run_id = %run.run_id, container = %run.container, hop = run.hop, scanned = run.report.scanned, "producer run out of budget; continued through the queue");
    Ok(())
}

async fn send_continuation(app: &App, run: &RunState) -> Result<(), StorageError> {
    let queue = super::reconcile::reconcile_queue(app)?;
    queue.ensure_exists().await?;
    let msg = run_state::Continuation {
        v: 1,
        kind: run_state::MESSAGE_KIND.into(),
        run_id: run.run_id.clone(),
        container: run.container.clone(),
        hop: run.hop,
    };
    queue.send_text(&msg.to_json()).await
}

/// Validates, loads the watermark and starts the run's state.
async fn begin(
    app: &App,
    container: &str,
    prefix: Option<&str>,
    full: bool,
) -> Result<(RunState, Option<Since>, StateBuilder), OpError> {
    crate::settings::validate_container_name(container).map_err(OpError::InvalidInput)?;
    if !app.source.container_exists(container).await? {
        return Err(OpError::ContainerNotFound(container.to_owned()));
    }
    app.ensure_queue().await?;
    let mut report = SnapshotReport {
        container: container.to_owned(),
        prefix: prefix.map(str::to_owned),
        ..Default::default()
    };
    let mut loaded = watermark::load(app, container, prefix, OffsetDateTime::now_utc()).await;
    if full {
        loaded.since = None;
        loaded.why_full = Some("asked for".into());
    } else if app.source.connection().hns && loaded.since.is_some() {
        // An ACL change leaves Last-Modified alone (README "ADLS Gen2 fidelity"): only a full
        // listing (with the newest snapshot of each path) sees it.
        loaded.since = None;
        loaded.why_full = Some("hierarchical source: ACL changes need the full listing".into());
    }
    report.since = loaded.since.as_ref().map(|s| s.from());
    report.listing = match &loaded.why_full {
        None => "since the previous complete run".into(),
        Some(why) => format!("full ({why})"),
    };
    let listing_started = OffsetDateTime::now_utc();
    let next = StateBuilder::new(container, prefix, listing_started);
    let run = RunState {
        schema: 1,
        run_id: super::restore::new_id(),
        container: container.to_owned(),
        prefix: prefix.map(str::to_owned),
        watermark: loaded.since.as_ref().and(loaded.etag.clone()),
        state_etag: loaded.etag.clone(),
        state_unread: loaded.unread,
        why_full: loaded.why_full.clone(),
        listing_started,
        listing_served: None,
        cursor: None,
        resume_name: None,
        next_state: None,
        next_from: listing_started,
        report,
        hop: 0,
        finished: false,
        updated_at: listing_started,
    };
    Ok((run, loaded.since, next))
}

/// Lists from the run's place and handles page after page; `Ok(true)` when it stopped at
/// `deadline` with more to do (its place saved in `run`), `Ok(false)` at the listing's end.
async fn segment(
    app: &App,
    run: &mut RunState,
    since: Option<&Since>,
    next_state: &mut StateBuilder,
    deadline: Option<Instant>,
    progress: &Arc<dyn Progress>,
) -> Result<bool, OpError> {
    let container = run.container.clone();
    let order = app.settings.name_order;
    let opts = ListOptions {
        prefix: run.prefix.clone(),
        // With a watermark, Last-Modified says what changed: no snapshot rows at all.
        snapshots: since.is_none(),
        metadata: true,
        max_results: app.settings.producer_page_size,
    };
    let mut detector = ChangeDetector::new();
    let mut pages = Lister::new(&app.source, &container, opts);
    let mut marker = run.cursor.take();
    let mut resume = run.resume_name.take();
    // The name the detector holds undecided (its rows may go on), and the marker of the page
    // where it began: where a later hop must list from.
    let mut held: Option<(String, Option<String>)> = None;
    loop {
        let fetched_with = marker.take();
        let page = pages.page(fetched_with.clone()).await?;
        if run.listing_served.is_none() && run.hop == 0 {
            if let Some(date) = page.served_at {
                next_state.served_at(date);
                run.listing_served = Some(date);
            }
        }
        marker = page.next_marker;
        let mut entries = page.entries;
        if let Some(r) = resume.take() {
            entries.retain(|e| order.cmp(&e.name, &r) != std::cmp::Ordering::Less);
        }
        let ready = match since {
            Some(since) => entries
                .into_iter()
                .filter(|e| !e.is_snapshot())
                .map(|blob| since.decide(blob))
                .collect(),
            None => {
                let last_name = entries.last().map(|e| e.name.clone());
                for entry in entries {
                    detector.push(entry);
                }
                // Names sort; snapshots of one name are adjacent. Every name before the page's
                // last one is complete, so memory stays bounded by a page.
                match (&marker, &last_name) {
                    (Some(_), Some(last)) => {
                        if held.as_ref().is_none_or(|(n, _)| n != last) {
                            held = Some((last.clone(), fetched_with.clone()));
                        }
                        detector.drain_before(last)
                    }
                    _ => std::mem::take(&mut detector).finish(),
                }
            }
        };
        process(
            app,
            &container,
            ready,
            &mut run.report,
            next_state,
            progress,
        )
        .await;
        if marker.is_none() {
            return Ok(false);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            match (since, &held) {
                (Some(_), _) => {
                    run.cursor = marker;
                    run.resume_name = None;
                    return Ok(true);
                }
                // Stop only where one name is held: a later hop re-reads it from its first page.
                (None, Some((name, start))) if detector.holds_only(name) => {
                    run.cursor = start.clone();
                    run.resume_name = Some(name.clone());
                    return Ok(true);
                }
                _ => {}
            }
        }
    }
}

/// The end of a run: coverage, the watermark for the next run, the log line.
async fn finish(
    app: &App,
    run: RunState,
    next_state: StateBuilder,
    started: Instant,
) -> SnapshotReport {
    let mut report = run.report;
    let (container, prefix) = (run.container.as_str(), run.prefix.as_deref());
    let loaded = watermark::Loaded {
        name: watermark::blob_name(container, prefix),
        since: None,
        etag: run.state_etag.clone(),
        why_full: run.why_full.clone(),
        unread: run.state_unread,
    };
    // A complete full pass over the whole container starts lakeguard's coverage of it (the first
    // one counts; later ones cost one conditional write that is refused). Watermark runs rest
    // on an earlier full run, which recorded it.
    if report.failed == 0 && prefix.is_none() && run.watermark.is_none() {
        let since = run
            .listing_started
            .max(run.listing_served.unwrap_or(run.listing_started));
        if let Err(e) = super::state::record_coverage(app, container, since).await {
            warn!(error = %e, "could not record the coverage of the container; a later full run retries");
        }
    }
    // Only a run that handled everything may vouch for the versions before its `from`.
    report.state = match (report.failed, next_state.finish()) {
        (0, Some(state)) => watermark::save(app, &loaded, &state).await,
        (0, None) => format!(
            "too many recent versions to remember; {}",
            watermark::discard(app, &loaded).await
        ),
        (_, _) => format!(
            "not saved (the run had failures); {}",
            watermark::discard(app, &loaded).await
        ),
    };
    report.continued = false;
    if run.hop > 0 {
        report.run_id = Some(run.run_id.clone());
        report.hops = run.hop + 1;
    }
    report.elapsed_ms += started.elapsed().as_millis();
    info!(
        container,
        scanned = report.scanned,
        snapshotted = report.snapshotted,
        enqueued = report.enqueued,
        unchanged = report.unchanged,
        skipped = report.skipped,
        failed = report.failed,
        listing = %report.listing,
        state = %report.state,
        hops = report.hops,
        elapsed_ms = report.elapsed_ms as u64,
        "snapshot run finished"
    );
    report
}

async fn process(
    app: &App,
    container: &str,
    decisions: Vec<Decision>,
    report: &mut SnapshotReport,
    next_state: &mut StateBuilder,
    progress: &Arc<dyn Progress>,
) {
    report.scanned += decisions.len() as u64;
    progress.add_total(decisions.len() as u64);
    let mut todo = Vec::new();
    for d in decisions {
        match d.verdict {
            Verdict::Unchanged => {
                report.unchanged += 1;
                next_state.handled(&d.blob.name, &d.blob.etag, d.blob.last_modified);
                progress.inc(1);
            }
            Verdict::Placeholder => {
                report.skipped += 1;
                progress.inc(1);
            }
            // A blob never snapshotted before has, in all likelihood, no backup yet.
            Verdict::New => todo.push((d.blob, true)),
            // Same content, new owner / group / permissions / ACL: a new snapshot records the
            // state; the worker finds the content already in the backup and records only it.
            Verdict::SecurityChanged => todo.push((d.blob, false)),
            // A watermark run cannot tell new from changed: it claims nothing about the backup.
            Verdict::Changed { .. } | Verdict::Modified => todo.push((d.blob, false)),
        }
    }
    if todo.is_empty() {
        return;
    }
    // One batch per page: its record, written once every request of the page was queued, is
    // what makes the page's pending markers trustworthy (see `state::record_batch`).
    let batch = super::state::new_batch_id();
    let batch = batch.as_str();
    let results: Vec<(String, One)> = stream::iter(todo)
        .map(|(blob, new)| {
            let span = tracing::info_span!("snapshot_blob", container, blob = %blob.name, etag = %blob.etag);
            async move {
                let name = blob.name.clone();
                (name, snapshot_and_enqueue(app, container, blob, new, batch).await)
            }
            .instrument(span)
        })
        .buffer_unordered(app.settings.concurrency)
        .collect()
        .await;
    let count = |d: Delivered| {
        results
            .iter()
            .filter(|(_, o)| matches!(o, One::Enqueued(_, _, x) if *x == d))
            .count() as u64
    };
    let (queued, handed_off) = (count(Delivered::Queued), count(Delivered::HandedOff));
    let orphans = results
        .iter()
        .filter(|(_, o)| matches!(o, One::Failed(_, true)))
        .count() as u64;
    record_batch_unless_handed_off(app, batch, queued, orphans, handed_off).await;
    for (name, one) in results {
        progress.inc(1);
        match one {
            One::Enqueued(etag, last_modified, delivered) => {
                next_state.handled(&name, &etag, last_modified);
                report.snapshotted += 1;
                report.enqueued += 1;
                if delivered == Delivered::HandedOff {
                    report.handed_off += 1;
                }
            }
            One::Skipped => report.skipped += 1,
            One::Failed(error, _) => {
                report.failed += 1;
                if report.failures.len() < MAX_REPORTED_FAILURES {
                    report.failures.push(BlobFailure { blob: name, error });
                }
            }
        }
    }
}

/// The snapshot's metadata: the blob's own user metadata (so the snapshot is a faithful copy of
/// the version) plus lakeguard's markers. `batch`: the request batch whose record will vouch for
/// the pending marker (`None` where no request follows the snapshot, e.g. the worker's own).
pub fn snapshot_metadata(
    user: &BTreeMap<String, String>,
    etag: &Etag,
    last_modified: OffsetDateTime,
    now: OffsetDateTime,
    batch: Option<&str>,
) -> BTreeMap<String, String> {
    let mut m: BTreeMap<String, String> = user
        .iter()
        .filter(|(k, _)| !metadata::is_lakeguard_key(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    m.insert(metadata::SOURCE_ETAG.into(), etag.quoted());
    m.insert(
        metadata::SOURCE_LAST_MODIFIED.into(),
        last_modified.format(&Rfc3339).unwrap_or_default(),
    );
    m.insert(
        metadata::REQUESTED_AT.into(),
        now.format(&Rfc3339).unwrap_or_default(),
    );
    if let Some(b) = batch {
        m.insert(metadata::REQUEST_BATCH.into(), b.to_owned());
    }
    m
}

/// Snapshots exactly the listed version (If-Match); on 412 the blob changed after the listing,
/// so the new version is read and snapshotted instead — a change is never lost.
pub async fn snapshot_current(
    store: &BlobStore,
    container: &str,
    mut blob: BlobEntry,
    batch: Option<&str>,
) -> Result<Option<(SnapshotTaken, BlobEntry)>, StorageError> {
    for attempt in 1..=SNAPSHOT_ATTEMPTS {
        let now = OffsetDateTime::now_utc();
        let mut meta =
            snapshot_metadata(&blob.metadata, &blob.etag, blob.last_modified, now, batch);
        // Hierarchical source: the snapshot records the path's security state as listed, which
        // the worker carries onto the backup version (and the producer compares next time).
        if let Some(sec) = &blob.security {
            sec.write_metadata(&mut meta, now);
        }
        match store
            .create_snapshot(container, &blob.name, &blob.etag, &meta)
            .await
        {
            Ok(taken) => return Ok(Some((taken, blob))),
            Err(e) if e.is_precondition_failed() && attempt < SNAPSHOT_ATTEMPTS => {
                let props = match store.properties(container, &blob.name, None).await {
                    Ok(p) => p,
                    Err(e) if e.is_not_found() => return Ok(None),
                    Err(e) => return Err(e),
                };
                info!(blob = %blob.name, old = %blob.etag, new = %props.etag, "blob changed since listing; snapshotting the new version");
                blob.etag = props.etag;
                blob.last_modified = props.last_modified;
                blob.metadata = props.metadata;
                blob.content_length = props.content_length;
                blob.content_type = props.content_type;
            }
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    unreachable!("the last attempt returns")
}

async fn snapshot_and_enqueue(
    app: &App,
    container: &str,
    blob: BlobEntry,
    new: bool,
    batch: &str,
) -> One {
    let (snapshot, blob) = match snapshot_current(&app.source, container, blob, Some(batch)).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            info!("blob deleted since listing; nothing to back up");
            return One::Skipped;
        }
        Err(e) => return One::Failed(format!("snapshot: {e}"), false),
    };
    match enqueue(app, container, &blob, &snapshot, new).await {
        Ok(delivered) => One::Enqueued(blob.etag, blob.last_modified, delivered),
        Err(e) => One::Failed(e.to_string(), e.orphaned),
    }
}

/// A request that could not be queued.
#[derive(Debug)]
pub struct EnqueueFailed {
    pub message: String,
    /// The snapshot could not be removed either: a marker with no request behind it (its batch
    /// is then recorded incomplete, so reconcile does not trust it).
    pub orphaned: bool,
}

impl std::fmt::Display for EnqueueFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Where a request went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivered {
    /// On the backup queue.
    Queued,
    /// To the drain in this process (`snapshot --drain`, `reconcile --drain`: `App::with_handoff`).
    HandedOff,
}

/// Records a page's request batch (`state::record_batch`), unless some of its requests were
/// handed off in process. A record vouches that every marker of the batch has a request *on the
/// queue*, which reconcile then trusts for the whole pending TTL; a handed-off request lives only
/// in this process, so its batch stays unrecorded: its markers count as pending for the grace
/// period alone, and if the process dies before the copy, the next reconcile after the grace asks
/// again (a duplicate of a request that did finish is harmless: the worker finds the version
/// already backed up).
pub(crate) async fn record_batch_unless_handed_off(
    app: &App,
    batch: &str,
    queued: u64,
    orphans: u64,
    handed_off: u64,
) {
    // A batch with orphans is recorded even so: "incomplete" makes reconcile trust none of its
    // markers (at worst it asks again for a handed-off request that did finish).
    if handed_off > 0 && orphans == 0 {
        debug!(
            batch,
            handed_off, "requests handed off in process: the batch stays unrecorded"
        );
        return;
    }
    if queued + orphans > 0 {
        if let Err(e) = super::state::record_batch(app, batch, queued, orphans).await {
            warn!(batch, error = %e, "could not record the request batch; its markers count as unrecorded (reconcile may ask again)");
        }
    }
}

/// Requests the backup of a snapshot just made: handed to the drain in this process when there
/// is one (it saves the queue's send, receive and delete per blob of a first backup), otherwise
/// queued. If queueing fails, the snapshot is deleted again so
/// that the next run sees the blob as changed and retries: snapshot-then-enqueue is not atomic,
/// and a snapshot without a request would otherwise look "done" (the reference lost such
/// requests silently). If even the delete fails, reconcile (which compares with the backup)
/// heals it; the failure is reported either way.
pub async fn enqueue(
    app: &App,
    container: &str,
    blob: &BlobEntry,
    snapshot: &SnapshotTaken,
    backup_absent: bool,
) -> Result<Delivered, EnqueueFailed> {
    let mut request = BackupRequest::new(container, &blob.name, &blob.etag, &snapshot.id)
        .with_backup_absent(backup_absent);
    if let Some(etag) = &snapshot.etag {
        request = request.with_props(version_props(blob, etag));
    }
    app.backlog_reserve().await;
    let Err(text) = app.hand_off(request.to_json()) else {
        return Ok(Delivered::HandedOff);
    };
    match app.queue.send_text(&text).await {
        Ok(()) => Ok(Delivered::Queued),
        Err(e) => {
            app.backlog_release();
            warn!(error = %e, "enqueue failed; removing the snapshot so the change is found again");
            match app
                .source
                .delete(container, &blob.name, Some(&snapshot.id), None, false)
                .await
            {
                Ok(()) => Err(EnqueueFailed {
                    message: format!("enqueue: {e} (snapshot removed; the next run retries)"),
                    orphaned: false,
                }),
                Err(d) => Err(EnqueueFailed {
                    message: format!("enqueue: {e}; removing the snapshot failed too ({d}); reconcile will re-request it"),
                    orphaned: true,
                }),
            }
        }
    }
}

/// What the listing knew of the version, for the worker's first delivery (`props`);
/// `copy_etag` is what the copy reads under `source-if-match`: the snapshot's ETag, or for a live
/// request the blob's own.
fn version_props(blob: &BlobEntry, copy_etag: &Etag) -> VersionProps {
    VersionProps {
        snapshot_etag: copy_etag.clone(),
        length: blob.content_length,
        content_type: blob.content_type.clone(),
        last_modified: blob.last_modified,
        metadata: blob
            .metadata
            .iter()
            .filter(|(k, _)| !metadata::is_lakeguard_key(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        security: blob.security.clone(),
    }
}

/// Queues a request for the live version `blob` (no snapshot of it is made): the worker copies
/// the base blob with `source-if-match` on the listed ETag. For reconcile's repair of a backup
/// that is gone while its source is unchanged, where the version is in all likelihood already
/// kept by the snapshot its first backup was made from, and a new snapshot would only add a
/// duplicate to the source's history. If the blob changes before the copy, the worker falls back
/// to that older snapshot (or reports the request superseded: the new version is a change, which
/// the producer or the next reconcile requests).
pub async fn enqueue_live(app: &App, container: &str, blob: &BlobEntry) -> Result<(), String> {
    // A request the worker would refuse (poison) on arrival, run after run: report it here.
    crate::model::check_addressable(&blob.name)?;
    let request = BackupRequest::live(container, &blob.name, &blob.etag)
        .with_backup_absent(true)
        .with_props(version_props(blob, &blob.etag));
    app.backlog_reserve().await;
    // In `reconcile --drain`, straight to the drain beside us (see `App::with_handoff`).
    let Err(text) = app.hand_off(request.to_json()) else {
        return Ok(());
    };
    app.queue.send_text(&text).await.map_err(|e| {
        app.backlog_release();
        format!("enqueue: {e}")
    })
}
