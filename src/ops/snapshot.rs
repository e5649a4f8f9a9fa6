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
use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tracing::{info, warn, Instrument};

use super::{watermark, BlobFailure, OpError, Progress, MAX_REPORTED_FAILURES};
use crate::app::App;
use crate::core::changes::{ChangeDetector, Decision, Verdict};
use crate::core::watermark::StateBuilder;
use crate::model::{metadata, BackupRequest, BlobEntry, Etag, VersionProps};
use crate::storage::blob::{ListOptions, SnapshotTaken};
use crate::storage::{BlobStore, Lister, StorageError};

#[derive(Clone, Debug, Default, Serialize)]
pub struct SnapshotReport {
    pub container: String,
    pub prefix: Option<String>,
    /// Base blobs examined.
    pub scanned: u64,
    pub snapshotted: u64,
    pub enqueued: u64,
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
    pub elapsed_ms: u128,
}

impl SnapshotReport {
    pub fn is_complete(&self) -> bool {
        self.failed == 0
    }
}

/// Outcome for one blob.
enum One {
    /// The version snapshotted and queued (it may be newer than the listed one).
    Enqueued(Etag, OffsetDateTime),
    Skipped,
    Failed(String),
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

/// `full`: list every snapshot even when a usable watermark exists (the operator's `--full`).
pub async fn run_with(
    app: &App,
    container: &str,
    prefix: Option<&str>,
    full: bool,
    progress: Arc<dyn Progress>,
) -> Result<SnapshotReport, OpError> {
    let started = Instant::now();
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
    }
    report.since = loaded.since.as_ref().map(|s| s.from());
    report.listing = match &loaded.why_full {
        None => "since the previous complete run".into(),
        Some(why) => format!("full ({why})"),
    };
    let opts = ListOptions {
        prefix: prefix.map(str::to_owned),
        // With a watermark, Last-Modified says what changed: no snapshot rows at all.
        snapshots: loaded.since.is_none(),
        metadata: true,
        max_results: None,
    };
    let mut next_state = StateBuilder::new(container, prefix, OffsetDateTime::now_utc());
    let mut detector = ChangeDetector::new();
    let mut pages = Lister::new(&app.source, container, opts);
    let mut marker = None;
    let mut first = true;
    loop {
        let page = pages.page(marker.take()).await?;
        if std::mem::take(&mut first) {
            if let Some(date) = page.served_at {
                next_state.served_at(date);
            }
        }
        marker = page.next_marker;
        let ready = match &loaded.since {
            Some(since) => page
                .entries
                .into_iter()
                .filter(|e| !e.is_snapshot())
                .map(|blob| since.decide(blob))
                .collect(),
            None => {
                let last_name = page.entries.last().map(|e| e.name.clone());
                for entry in page.entries {
                    detector.push(entry);
                }
                // Names sort; snapshots of one name are adjacent. Every name before the page's
                // last one is complete, so memory stays bounded by a page.
                match (&marker, &last_name) {
                    (Some(_), Some(last)) => detector.drain_before(last),
                    _ => std::mem::take(&mut detector).finish(),
                }
            }
        };
        process(
            app,
            container,
            ready,
            &mut report,
            &mut next_state,
            &progress,
        )
        .await;
        if marker.is_none() {
            break;
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
    report.elapsed_ms = started.elapsed().as_millis();
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
        elapsed_ms = report.elapsed_ms as u64,
        "snapshot run finished"
    );
    Ok(report)
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
            // A watermark run cannot tell new from changed: it claims nothing about the backup.
            Verdict::Changed { .. } | Verdict::Modified => todo.push((d.blob, false)),
        }
    }
    let results: Vec<(String, One)> = stream::iter(todo)
        .map(|(blob, new)| {
            let span = tracing::info_span!("snapshot_blob", container, blob = %blob.name, etag = %blob.etag);
            async move {
                let name = blob.name.clone();
                (name, snapshot_and_enqueue(app, container, blob, new).await)
            }
            .instrument(span)
        })
        .buffer_unordered(app.settings.concurrency)
        .collect()
        .await;
    for (name, one) in results {
        progress.inc(1);
        match one {
            One::Enqueued(etag, last_modified) => {
                next_state.handled(&name, &etag, last_modified);
                report.snapshotted += 1;
                report.enqueued += 1;
            }
            One::Skipped => report.skipped += 1,
            One::Failed(error) => {
                report.failed += 1;
                if report.failures.len() < MAX_REPORTED_FAILURES {
                    report.failures.push(BlobFailure { blob: name, error });
                }
            }
        }
    }
}

/// The snapshot's metadata: the blob's own user metadata (so the snapshot is a faithful copy of
/// the version) plus lakeguard's markers.
pub fn snapshot_metadata(
    user: &BTreeMap<String, String>,
    etag: &Etag,
    last_modified: OffsetDateTime,
    now: OffsetDateTime,
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
    m
}

/// Snapshots exactly the listed version (If-Match); on 412 the blob changed after the listing,
/// so the new version is read and snapshotted instead — a change is never lost.
pub async fn snapshot_current(
    store: &BlobStore,
    container: &str,
    mut blob: BlobEntry,
) -> Result<Option<(SnapshotTaken, BlobEntry)>, StorageError> {
    for attempt in 1..=SNAPSHOT_ATTEMPTS {
        let meta = snapshot_metadata(
            &blob.metadata,
            &blob.etag,
            blob.last_modified,
            OffsetDateTime::now_utc(),
        );
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

async fn snapshot_and_enqueue(app: &App, container: &str, blob: BlobEntry, new: bool) -> One {
    let (snapshot, blob) = match snapshot_current(&app.source, container, blob).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            info!("blob deleted since listing; nothing to back up");
            return One::Skipped;
        }
        Err(e) => return One::Failed(format!("snapshot: {e}")),
    };
    match enqueue(app, container, &blob, &snapshot, new).await {
        Ok(()) => One::Enqueued(blob.etag, blob.last_modified),
        Err(e) => One::Failed(e),
    }
}

/// Queues the request for a snapshot just made. If that fails, the snapshot is deleted again so
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
) -> Result<(), String> {
    let mut request = BackupRequest::new(container, &blob.name, &blob.etag, &snapshot.id)
        .with_backup_absent(backup_absent);
    if let Some(etag) = &snapshot.etag {
        request = request.with_props(version_props(blob, etag));
    }
    app.backlog_reserve().await;
    match app.queue.send_text(&request.to_json()).await {
        Ok(()) => Ok(()),
        Err(e) => {
            app.backlog_release();
            warn!(error = %e, "enqueue failed; removing the snapshot so the change is found again");
            match app
                .source
                .delete(container, &blob.name, Some(&snapshot.id), None, false)
                .await
            {
                Ok(()) => Err(format!("enqueue: {e} (snapshot removed; the next run retries)")),
                Err(d) => Err(format!("enqueue: {e}; removing the snapshot failed too ({d}); reconcile will re-request it")),
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
