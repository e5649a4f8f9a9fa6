//! BackupWorker: one backup request -> exactly that version in the backup account.
//!
//! Order of checks, and why:
//! 1. Parse. A malformed message can never succeed: it goes to `<queue>-poison` at once with the
//!    reason, and is acknowledged (not after five useless retries). Nothing else is dropped.
//! 2. Idempotency: the backup blob already holds this version (`lakeguard_source_etag`) -> done.
//! 3. Resolve the source version: the named snapshot (immutable, the point-in-time copy, backed
//!    up even when the live blob moved on or was deleted). Only a real 404 means "gone".
//! 4. Keep the backup's current version (snapshot it in the backup account), then copy
//!    conditionally on the backup ETag just seen, with the configured engine.
//!
//! Retryable failures answer non-2xx so the host retries; on the last delivery the worker poisons
//! the message itself, with the error, so that the reason is never lost.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{stream, StreamExt};
use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::Notify;
use tracing::{error, info, warn, Instrument};

use super::Progress;
use crate::app::App;
use crate::copy::{lease, CopyError, CopyJob};
use crate::core::reconcile::snapshot_version_etag as snapshot_version;
use crate::model::{metadata, BackupRequest, Etag};
use crate::storage::blob::BlobProperties;
use crate::storage::{BackupQueue, StorageError};

/// What became of one message. Every variant except `Retry` acknowledges (deletes) it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    BackedUp {
        container: String,
        blob: String,
        etag: String,
    },
    AlreadyBackedUp {
        container: String,
        blob: String,
        etag: String,
    },
    /// The backup already held the content; only a new security state (hierarchical source)
    /// was recorded on it, without a copy.
    SecurityRecorded {
        container: String,
        blob: String,
        etag: String,
    },
    /// The requested version cannot be copied any more and a newer request covers the blob.
    Superseded {
        container: String,
        blob: String,
        etag: String,
        why: String,
    },
    /// Sent to the poison queue with the reason (malformed, permanent failure, or out of retries).
    Poisoned { reason: String },
}

/// The message stays on the queue and comes back (host retry, then poison).
#[derive(Clone, Debug, thiserror::Error)]
#[error("{0}")]
pub struct Retry(pub String);

impl Outcome {
    pub fn describe(&self) -> String {
        match self {
            Outcome::BackedUp {
                container,
                blob,
                etag,
            } => format!("backed up {container}/{blob} version {etag}"),
            Outcome::AlreadyBackedUp {
                container,
                blob,
                etag,
            } => {
                format!("{container}/{blob} version {etag} is already in the backup; nothing to do")
            }
            Outcome::SecurityRecorded {
                container,
                blob,
                etag,
            } => format!(
                "{container}/{blob} version {etag}: new owner/group/permissions/ACL recorded (no copy)"
            ),
            Outcome::Superseded {
                container,
                blob,
                etag,
                why,
            } => format!("{container}/{blob} version {etag} superseded: {why}"),
            Outcome::Poisoned { reason } => format!("poisoned: {reason}"),
        }
    }
}

/// Processes one message text. `dequeue_count` is the host's (1 = first delivery).
pub async fn process_message(app: &App, text: &str, dequeue_count: u32) -> Result<Outcome, Retry> {
    let request = match BackupRequest::parse(text) {
        Ok(r) => r,
        Err(e) => {
            return poison(
                &app.queue,
                text,
                &format!("malformed backup request: {e}"),
                dequeue_count,
            )
            .await
        }
    };
    process_request(app, &app.queue, text, &request, dequeue_count).await
}

/// Backs up `request` (parsed from `text`, a message of `queue`): the worker's path, shared with
/// the event path. Permanent failures, and retryable ones on the last delivery, go to
/// `<queue>-poison` with `text` and the reason.
pub async fn process_request(
    app: &App,
    queue: &BackupQueue,
    text: &str,
    request: &BackupRequest,
    dequeue_count: u32,
) -> Result<Outcome, Retry> {
    let span = tracing::info_span!("backup", container = %request.container, blob = %request.blob, etag = %request.etag);
    let result = back_up(app, request, dequeue_count).instrument(span).await;
    match result {
        Ok(outcome) => Ok(outcome),
        Err(Failure::Permanent(e)) => {
            poison(
                queue,
                text,
                &format!("permanent failure: {e}"),
                dequeue_count,
            )
            .await
        }
        Err(Failure::Retryable(e)) if dequeue_count >= app.settings.max_dequeue_count => {
            poison(
                queue,
                text,
                &format!("failed on all {dequeue_count} deliveries; last error: {e}"),
                dequeue_count,
            )
            .await
        }
        Err(Failure::Retryable(e)) => Err(Retry(e)),
    }
}

pub(crate) async fn poison(
    queue: &BackupQueue,
    text: &str,
    reason: &str,
    dequeue_count: u32,
) -> Result<Outcome, Retry> {
    warn!(reason, "sending message to the poison queue");
    match queue.poison(text, reason, dequeue_count).await {
        Ok(()) => Ok(Outcome::Poisoned {
            reason: reason.to_owned(),
        }),
        // Could not poison: keep the message (the host poisons it after maxDequeueCount anyway).
        Err(e) => Err(Retry(format!("{reason}; and the poison queue failed: {e}"))),
    }
}

enum Failure {
    Retryable(String),
    Permanent(String),
}

impl From<StorageError> for Failure {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Permanent { .. } => Failure::Permanent(e.to_string()),
            // 404s that reach here are unexpected (the expected ones are handled where they can
            // occur); retry rather than guess.
            _ => Failure::Retryable(e.to_string()),
        }
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// HEAD that maps a real 404 to `None` and keeps every other error an error.
async fn head(
    store: &crate::storage::BlobStore,
    c: &str,
    b: &str,
    snap: Option<&str>,
) -> Result<Option<BlobProperties>, StorageError> {
    match store.properties(c, b, snap).await {
        Ok(p) => Ok(Some(p)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

async fn back_up(app: &App, req: &BackupRequest, dequeue_count: u32) -> Result<Outcome, Failure> {
    let (c, b) = (req.container.as_str(), req.blob.as_str());
    let done = |etag: &Etag| Outcome::AlreadyBackedUp {
        container: c.into(),
        blob: b.into(),
        etag: etag.quoted(),
    };
    let superseded = |why: String| Outcome::Superseded {
        container: c.into(),
        blob: b.into(),
        etag: req.etag.quoted(),
        why,
    };

    // On a first delivery the message's hints stand in for reads: `props` for a HEAD of the
    // snapshot (the copy is conditional on the snapshot ETag they carry), `backup_absent` for a
    // HEAD of the backup (the copy is conditional on there being none). A hint that turns out
    // wrong fails its condition, and the loop goes round once more reading both sides; any
    // redelivery reads them from the start.
    let mut trust_hints = dequeue_count <= 1;
    let mut history_kept_for: Option<Etag> = None;
    loop {
        let skip_target_read = trust_hints && req.backup_absent && app.engine.optimistic_writes();
        let hinted = trust_hints && (skip_target_read || req.props.is_some());

        // 2. Idempotency against the backup.
        let target = if skip_target_read {
            None
        } else {
            head(&app.backup, c, b, None).await?
        };
        if let Some(t) = &target {
            if t.metadata
                .get(metadata::SOURCE_ETAG)
                .map(Etag::new)
                .as_ref()
                == Some(&req.etag)
                && !t.metadata.contains_key(metadata::DELETED_AT)
            {
                // Hierarchical source: the request may carry a new security state of the same
                // content (an ACL-only change): recorded on the backup version, no copy.
                if app.source.connection().hns {
                    if let Some((sec, at)) = requested_security(app, req, trust_hints).await? {
                        match super::security::record(
                            &app.backup,
                            c,
                            b,
                            &t.etag,
                            &t.metadata,
                            &sec,
                            at,
                        )
                        .await
                        {
                            Ok(super::security::Recorded::Recorded) => {
                                return Ok(Outcome::SecurityRecorded {
                                    container: c.into(),
                                    blob: b.into(),
                                    etag: req.etag.quoted(),
                                })
                            }
                            Ok(super::security::Recorded::Current) => {}
                            // The backup changed since the HEAD: read it again.
                            Err(e) if e.is_precondition_failed() => {
                                trust_hints = false;
                                continue;
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
                info!("already backed up");
                return Ok(done(&req.etag));
            }
        }

        // 3. The source version.
        let Some((snapshot, snap_props)) = resolve_snapshot(app, req, trust_hints).await? else {
            let live = head(&app.source, c, b, None).await?;
            let why = match live {
                Some(p) => format!(
                    "the version's snapshot is gone and the blob is now {}; a request for that version exists or the next reconcile makes one",
                    p.etag
                ),
                None => "the blob and the version's snapshot are gone; reconcile records the deletion".into(),
            };
            info!(%why, "superseded");
            return Ok(superseded(why));
        };
        let version_time = snap_props
            .metadata
            .get(metadata::SOURCE_LAST_MODIFIED)
            .and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok())
            .unwrap_or(snap_props.last_modified);

        // A newer version already in the backup must stay on top: the backup base is what
        // reconcile compares with. The older version remains in the source snapshot.
        // Last-Modified has one-second precision: within a second the snapshot times decide
        // (each was taken while its version was current); without both, the live blob does.
        if let Some(t) = target
            .as_ref()
            .filter(|t| !t.metadata.contains_key(metadata::DELETED_AT))
        {
            let parse = |k: &str| t.metadata.get(k).and_then(|s| metadata::parse_time(s));
            let ours = (
                version_time,
                snapshot.as_deref().and_then(metadata::parse_time),
            );
            let held = parse(metadata::SOURCE_LAST_MODIFIED)
                .map(|l| (l, parse(metadata::SOURCE_SNAPSHOT)));
            let held_etag = t.metadata.get(metadata::SOURCE_ETAG).map(Etag::new);
            let backup_is_newer = match held.map(|h| crate::core::history::later_of(h, ours)) {
                None | Some(Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal)) => false,
                Some(Some(std::cmp::Ordering::Greater)) => true,
                // A live request copies the current version: it is the newest.
                Some(None) if snapshot.is_none() => false,
                Some(None) => match head(&app.source, c, b, None).await? {
                    Some(live) if live.etag == req.etag => false,
                    Some(live) if Some(&live.etag) == held_etag.as_ref() => true,
                    // Neither is current: their order is unknown; keep what the backup has.
                    _ => {
                        return Ok(superseded(format!(
                            "the backup holds version {} from the same second and neither is current, so their order is unknown; this one stays in source snapshot {}",
                            held_etag.map(|e| e.quoted()).unwrap_or_else(|| "?".into()),
                            snapshot.as_deref().unwrap_or("(none)")
                        )))
                    }
                },
            };
            if backup_is_newer {
                return Ok(superseded(format!(
                    "the backup already holds a newer version ({}); this one stays in source snapshot {}",
                    t.metadata.get(metadata::SOURCE_ETAG).map(String::as_str).unwrap_or("?"),
                    snapshot.as_deref().unwrap_or("(none: it was live)")
                )));
            }
        }

        // 4. Keep the backup's current version before it is overwritten (once per version).
        app.ensure_backup_container(c).await?;
        let expected_target = match &target {
            None => None,
            Some(t) => {
                if history_kept_for.as_ref() != Some(&t.etag)
                    && needs_history_snapshot(app, c, b, t, dequeue_count).await?
                {
                    app.backup
                        .create_snapshot(c, b, &t.etag, &t.metadata)
                        .await?;
                }
                history_kept_for = Some(t.etag.clone());
                Some(t.etag.clone())
            }
        };
        match copy_version(
            app,
            req,
            snapshot.as_deref(),
            &snap_props,
            version_time,
            expected_target,
            dequeue_count,
        )
        .await
        {
            Ok(_) => {
                info!(
                    engine = app.engine.name(),
                    snapshot = snapshot.as_deref().unwrap_or("live"),
                    "backed up"
                );
                return Ok(Outcome::BackedUp {
                    container: c.into(),
                    blob: b.into(),
                    etag: req.etag.quoted(),
                });
            }
            Err(CopyError::SourceGone(e) | CopyError::TargetChanged(e)) if hinted => {
                info!(snapshot = snapshot.as_deref().unwrap_or("live"), error = %e, "a hint of the request did not hold; reading source and backup");
                trust_hints = false;
            }
            Err(CopyError::SourceGone(e)) => {
                return Ok(superseded(format!(
                    "the source snapshot disappeared during the copy: {e}"
                )))
            }
            // Another writer got there first: the next delivery re-evaluates.
            Err(CopyError::TargetChanged(e)) => return Err(Failure::Retryable(e)),
            Err(CopyError::Retryable(e)) => {
                app.forget_backup_container(c).await;
                return Err(Failure::Retryable(e));
            }
            Err(CopyError::Permanent(e)) => return Err(Failure::Permanent(e)),
        }
    }
}

/// The security state a request carries and when it was observed: the hint (observed when its
/// snapshot was taken; a live request: now), else the named snapshot's recorded state.
async fn requested_security(
    app: &App,
    req: &BackupRequest,
    trust_hints: bool,
) -> Result<Option<(crate::model::Security, OffsetDateTime)>, StorageError> {
    let snap_time = req.snapshot.as_deref().and_then(metadata::parse_time);
    if trust_hints {
        if let Some(sec) = req.props.as_ref().and_then(|p| p.security.clone()) {
            return Ok(Some((
                sec,
                snap_time.unwrap_or_else(OffsetDateTime::now_utc),
            )));
        }
    }
    let Some(s) = &req.snapshot else {
        return Ok(None);
    };
    let Some(p) = head(&app.source, &req.container, &req.blob, Some(s)).await? else {
        return Ok(None);
    };
    Ok(
        crate::model::Security::from_metadata(&p.metadata).map(|sec| {
            let at = crate::model::Security::observed_at(&p.metadata)
                .or(snap_time)
                .unwrap_or(p.last_modified);
            (sec, at)
        }),
    )
}

/// Copies the resolved snapshot over the backup blob with the version's metadata.
async fn copy_version(
    app: &App,
    req: &BackupRequest,
    snapshot: Option<&str>,
    snap_props: &BlobProperties,
    version_time: OffsetDateTime,
    expected_target: Option<Etag>,
    dequeue_count: u32,
) -> Result<crate::copy::CopyOutcome, CopyError> {
    let (c, b) = (req.container.as_str(), req.blob.as_str());
    let mut meta: BTreeMap<String, String> = snap_props
        .metadata
        .iter()
        .filter(|(k, _)| !metadata::is_lakeguard_key(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    meta.insert(metadata::SOURCE_ETAG.into(), req.etag.quoted());
    if let Some(s) = snapshot {
        meta.insert(metadata::SOURCE_SNAPSHOT.into(), s.to_owned());
    }
    // Hierarchical source: the security state the snapshot recorded goes with the version.
    crate::model::Security::copy_keys(&snap_props.metadata, &mut meta);
    meta.insert(metadata::SOURCE_LAST_MODIFIED.into(), rfc3339(version_time));
    meta.insert(
        metadata::BACKED_UP_AT.into(),
        rfc3339(OffsetDateTime::now_utc()),
    );
    let job = CopyJob {
        source_container: c.into(),
        source_blob: b.into(),
        source_snapshot: snapshot.map(str::to_owned),
        source_etag: req.etag.clone(),
        snapshot_etag: Some(snap_props.etag.clone()),
        target_container: c.into(),
        target_blob: b.into(),
        content_type: snap_props.content_type.clone(),
        content_length: snap_props.content_length,
        expected_target,
        metadata: meta,
        attempt: dequeue_count,
    };
    let copy = app.engine.copy(&job);
    if app.settings.use_lease {
        match lease::with_source_lease(&app.source, c, b, &req.etag, copy).await {
            Ok(r) => r,
            Err(e @ StorageError::Permanent { .. }) => Err(CopyError::Permanent(e.to_string())),
            Err(e) => Err(CopyError::Retryable(e.to_string())),
        }
    } else {
        copy.await
    }
}

/// Whether the backup's current blob must be kept as a snapshot before it is overwritten.
///
/// Always on a first delivery. On a redelivery an earlier attempt may already have kept it (and
/// then failed to copy): one listing of that name's backup snapshots avoids a duplicate. An
/// unfinished Data Factory copy (run marker, no version metadata) holds no version: nothing to keep.
async fn needs_history_snapshot(
    app: &App,
    c: &str,
    b: &str,
    current: &BlobProperties,
    dequeue_count: u32,
) -> Result<bool, StorageError> {
    if !current.metadata.contains_key(metadata::SOURCE_ETAG)
        && current.metadata.contains_key("lakeguard_copy_run")
    {
        return Ok(false);
    }
    if dequeue_count <= 1 {
        return Ok(true);
    }
    let newest = app
        .backup
        .list_versions(c, b)
        .await?
        .into_iter()
        .filter(|e| e.snapshot.is_some())
        .max_by(|x, y| x.snapshot.cmp(&y.snapshot));
    let same = |k: &str| {
        newest.as_ref().and_then(|n| n.meta(k)) == current.metadata.get(k).map(String::as_str)
    };
    Ok(!(newest.is_some() && same(metadata::SOURCE_ETAG) && same(metadata::DELETED_AT)))
}

/// Finds the source snapshot holding exactly the requested version; `Some((None, _))` = the live
/// blob, trusted from a request that names no snapshot but carries `props` (reconcile's repair of
/// a lost backup whose version is still live): the copy reads it with `source-if-match` on the
/// version's ETag, and if it has changed the next round reads the snapshots instead.
async fn resolve_snapshot(
    app: &App,
    req: &BackupRequest,
    trust_props: bool,
) -> Result<Option<(Option<String>, BlobProperties)>, StorageError> {
    let (c, b) = (req.container.as_str(), req.blob.as_str());
    let live_ok = req.snapshot.is_some() || app.engine.copies_live_source();
    if let (true, true, Some(p)) = (trust_props, live_ok, &req.props) {
        let mut metadata = p.metadata.clone();
        metadata.insert(metadata::SOURCE_ETAG.into(), req.etag.quoted());
        if let Some(sec) = &p.security {
            let at = req
                .snapshot
                .as_deref()
                .and_then(metadata::parse_time)
                .unwrap_or_else(OffsetDateTime::now_utc);
            sec.write_metadata(&mut metadata, at);
        }
        return Ok(Some((
            req.snapshot.clone(),
            BlobProperties {
                etag: p.snapshot_etag.clone(),
                last_modified: p.last_modified,
                content_length: p.length,
                content_type: p.content_type.clone(),
                content_md5: None,
                metadata,
            },
        )));
    }
    if let Some(s) = &req.snapshot {
        if let Some(p) = head(&app.source, c, b, Some(s)).await? {
            let version = p
                .metadata
                .get(metadata::SOURCE_ETAG)
                .map(Etag::new)
                .unwrap_or_else(|| p.etag.clone());
            if version == req.etag {
                return Ok(Some((Some(s.clone()), p)));
            }
            warn!(snapshot = %s, holds = %version, "the named snapshot holds another version; looking for the right one");
        }
    }
    // Legacy message, or the named snapshot is gone: another snapshot of the version, listed by
    // exact name (a prefix listing also returns `a.txt.bak` for `a.txt`: filter by equality).
    let mut best: Option<String> = None;
    let mut live_matches = false;
    for e in app.source.list_versions(c, b).await? {
        match &e.snapshot {
            Some(s) if snapshot_version(&e) == req.etag && best.as_ref().is_none_or(|x| s > x) => {
                best = Some(s.clone())
            }
            None if e.etag == req.etag => live_matches = true,
            _ => {}
        }
    }
    if let Some(s) = best {
        let p = head(&app.source, c, b, Some(&s)).await?;
        return Ok(p.map(|p| (Some(s), p)));
    }
    if live_matches {
        // The version is still live but has no snapshot: make one, conditionally.
        let Some(props) = head(&app.source, c, b, None).await? else {
            return Ok(None);
        };
        if props.etag != req.etag {
            return Ok(None);
        }
        let meta = super::snapshot::snapshot_metadata(
            &props.metadata,
            &props.etag,
            props.last_modified,
            OffsetDateTime::now_utc(),
            // This delivery copies it at once: no request stands behind the marker.
            None,
        );
        match app.source.create_snapshot(c, b, &req.etag, &meta).await {
            Ok(taken) => {
                let p = head(&app.source, c, b, Some(&taken.id)).await?;
                return Ok(p.map(|p| (Some(taken.id), p)));
            }
            Err(e) if e.is_precondition_failed() || e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct DrainReport {
    pub queue: String,
    pub processed: u64,
    pub backed_up: u64,
    pub already_backed_up: u64,
    /// Requests whose content the backup held, for which only a new security state was recorded.
    pub security_recorded: u64,
    pub superseded: u64,
    pub poisoned: u64,
    /// Deliveries that failed and were put back for another attempt (a request handed over in
    /// process that failed is put on the queue: counted here).
    pub retried: u64,
    /// Requests handed over in process that failed and could not be queued either (logged as
    /// errors; the next reconcile requests them again).
    pub unqueued: u64,
    /// Messages still on the queue when the drain stopped because none became visible for
    /// `LAKEGUARD_DRAIN_IDLE_SECS` (held by a consumer that died, or another worker): the queue
    /// was not emptied, so "back up this container now" did not finish.
    pub left_on_queue: u64,
    pub elapsed_ms: u128,
}

impl DrainReport {
    /// Everything taken was settled and the queue was left empty.
    pub fn is_complete(&self) -> bool {
        self.poisoned == 0 && self.unqueued == 0 && self.left_on_queue == 0
    }
}

/// `lakeguard backup --drain`: the worker's code over the queue from a terminal, until it is
/// empty. Messages are hidden while processed; a retryable failure puts the message back with a
/// short backoff (its dequeue count rises, so it is poisoned after the last attempt, like the host
/// would).
pub async fn drain(
    app: &App,
    queue: &BackupQueue,
    progress: Arc<dyn Progress>,
) -> Result<DrainReport, StorageError> {
    drain_until(app, queue, progress, None, None).await
}

/// Runs `producer` (a snapshot or reconcile run) and drains the queue at the same time, the way
/// the queue trigger consumes while the producer works: copies start with the first request
/// instead of after the last, and with [`App::with_backlog_limit`] the queue never holds more
/// than that many of the producer's requests. The drain ends once the producer has finished and
/// the queue is empty.
pub async fn drain_alongside<F: std::future::Future>(
    app: &App,
    queue: &BackupQueue,
    progress: Arc<dyn Progress>,
    producer: F,
) -> (F::Output, Result<DrainReport, StorageError>) {
    let producing = Producing {
        running: AtomicBool::new(true),
        done: Notify::new(),
    };
    let local = app.take_handoff();
    let produce = async {
        let out = producer.await;
        app.close_handoff();
        producing.running.store(false, Ordering::SeqCst);
        producing.done.notify_one();
        out
    };
    let drain = async {
        let report = drain_until(app, queue, progress, Some(&producing), local).await;
        app.backlog_close();
        report
    };
    tokio::join!(produce, drain)
}

/// A producer running beside the drain. `done` holds a permit once it has finished, so the drain's
/// back-off between empty receives ends the moment the producer does (a no-op run would otherwise
/// wait out up to one back-off step after its last listing page).
struct Producing {
    running: AtomicBool,
    done: Notify,
}

/// One unit of the drain's work: a queue message, or a request handed over in process.
enum Work {
    Queued(crate::storage::queue::Received),
    Local(String),
}

/// How a unit of work that did not finish ended.
enum Unsettled {
    Retried,
    /// A handed-over request now on the queue: it stays in the backlog until that copy is done.
    Requeued,
    Unqueued,
}

async fn drain_until(
    app: &App,
    queue: &BackupQueue,
    progress: Arc<dyn Progress>,
    producing: Option<&Producing>,
    local: Option<tokio::sync::mpsc::UnboundedReceiver<String>>,
) -> Result<DrainReport, StorageError> {
    let started = Instant::now();
    let mut report = DrainReport {
        queue: queue.name().to_owned(),
        ..Default::default()
    };
    if queue.name() == app.queue.name() {
        // Once per process: `--drain` has its producer create the same queue.
        app.ensure_queue().await?;
    } else {
        queue.ensure_exists().await?;
    }
    if producing.is_none() {
        progress.add_total(queue.approximate_count().await?);
    }
    let receive_error: std::sync::Mutex<Option<StorageError>> = Default::default();
    let left_on_queue = std::sync::atomic::AtomicU64::new(0);
    let idle_limit = app.settings.drain_idle;
    // Messages received and not yet acknowledged or put back; `settled` wakes the receiver when
    // one of them is (a stored permit, so no wake-up is lost).
    let outstanding = AtomicUsize::new(0);
    let settled = Notify::new();
    // Every request handed over in process has been taken (and counted as outstanding): until
    // then, "nothing outstanding and the queue is empty" does not mean done, because a handed-over
    // request that fails goes onto the queue after the receiver has looked at it.
    let handoffs_taken = AtomicBool::new(local.is_none());
    let local_work = local.is_some();
    // Batches are received as workers free up, so the next receive overlaps with the end of the
    // previous batch. While our own messages are in flight an empty receive waits for one of them
    // to finish (no polling); the stream ends when nothing is ours, the producer is done and the
    // queue is empty (its count includes invisible messages), or when nothing became visible for
    // two minutes (another consumer holds them).
    let batches = stream::unfold(
        (None::<Instant>, 0u32),
        |(mut idle_since, mut empty_polls)| {
            let (receive_error, progress, left_on_queue) =
                (&receive_error, &progress, &left_on_queue);
            let (outstanding, settled, handoffs_taken) = (&outstanding, &settled, &handoffs_taken);
            async move {
                loop {
                    // The receiver stops for good: requests requeued from here on keep their
                    // backlog slots, and no receive will ever free them, so a producer must not
                    // wait for room any more (it would hang the run).
                    let fail = |e: StorageError| {
                        *receive_error.lock().expect("poisoned") = Some(e);
                        app.backlog_close();
                    };
                    match queue.receive(32, 300).await {
                        Ok(batch) if !batch.is_empty() => {
                            outstanding.fetch_add(batch.len(), Ordering::SeqCst);
                            if producing.is_some() {
                                progress.add_total(batch.len() as u64);
                            }
                            return Some((batch, (None, 0)));
                        }
                        Ok(_) => {}
                        Err(e) => {
                            fail(e);
                            return None;
                        }
                    }
                    if outstanding.load(Ordering::SeqCst) > 0 && local_work {
                        // Requests handed over in process keep work outstanding for the whole
                        // run while the queue stays empty (it only gets what is put back):
                        // waking on every settled copy would cost a receive per copy (7,459
                        // empty receives in a 20k-blob first backup). Poll with a back-off,
                        // 0.25 s -> 2 s, cut short only when nothing is outstanding any more.
                        let wait = Duration::from_millis(250 << empty_polls.min(3));
                        empty_polls += 1;
                        let deadline = Instant::now() + wait;
                        while outstanding.load(Ordering::SeqCst) > 0 {
                            let left = deadline.saturating_duration_since(Instant::now());
                            if left.is_zero() {
                                break;
                            }
                            let _ = tokio::time::timeout(left, settled.notified()).await;
                        }
                        continue;
                    }
                    if outstanding.load(Ordering::SeqCst) > 0 {
                        let _ =
                            tokio::time::timeout(Duration::from_millis(500), settled.notified())
                                .await;
                        continue;
                    }
                    if let Some(p) = producing.filter(|p| p.running.load(Ordering::SeqCst)) {
                        // Nothing queued yet (a no-op run finds nothing): back off 0.1 s -> 0.4 s,
                        // or less if the producer finishes meanwhile.
                        let wait = Duration::from_millis(100 << empty_polls.min(2));
                        empty_polls += 1;
                        let _ = tokio::time::timeout(wait, p.done.notified()).await;
                        continue;
                    }
                    // The producer is done (read before the count: everything it enqueued
                    // counts). Then, in this order: every handed-over request taken (each counted
                    // as outstanding before the flag is set), none outstanding (one put onto the
                    // queue was sent before it stopped being outstanding), so the count that
                    // follows includes every requeued one.
                    if !handoffs_taken.load(Ordering::SeqCst) {
                        let _ =
                            tokio::time::timeout(Duration::from_millis(500), settled.notified())
                                .await;
                        continue;
                    }
                    if outstanding.load(Ordering::SeqCst) > 0 {
                        continue;
                    }
                    let count = match queue.approximate_count().await {
                        Ok(0) => return None,
                        Ok(n) => n,
                        Err(e) => {
                            fail(e);
                            return None;
                        }
                    };
                    // Messages in backoff become visible again shortly.
                    let idle = idle_since.get_or_insert_with(Instant::now);
                    if idle.elapsed() > idle_limit {
                        warn!(left_on_queue = count, "messages remain invisible (held by another consumer, or one that died?); stopping with the queue not empty");
                        left_on_queue.store(count, Ordering::SeqCst);
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        },
    );
    // Requests handed over in process count as outstanding from the moment they are taken, so
    // the queue's receiver waits for them instead of polling.
    let handed_over = stream::unfold(local, |rx| {
        let (outstanding, progress) = (&outstanding, &progress);
        let (settled, handoffs_taken) = (&settled, &handoffs_taken);
        async move {
            let mut rx = rx?;
            let Some(text) = rx.recv().await else {
                handoffs_taken.store(true, Ordering::SeqCst);
                settled.notify_one();
                return None;
            };
            outstanding.fetch_add(1, Ordering::SeqCst);
            progress.add_total(1);
            Some((vec![Work::Local(text)], Some(rx)))
        }
    });
    let queued = batches.map(|b| b.into_iter().map(Work::Queued).collect::<Vec<_>>());
    // Each message is acknowledged (or put back) as soon as it is done, inside its own task.
    let results = stream::select(queued, handed_over)
        .flat_map(stream::iter)
        .map(|work| {
            let (outstanding, settled) = (&outstanding, &settled);
            async move {
                let result = match work {
                    Work::Queued(msg) => {
                        match process_message(app, &msg.text, msg.dequeue_count).await {
                            Ok(outcome) => {
                                if let Err(e) = queue.delete(&msg).await {
                                    // Already deleted or taken over: the next delivery is
                                    // idempotent.
                                    warn!(error = %e, "could not delete a processed message");
                                }
                                Ok(outcome)
                            }
                            Err(Retry(e)) => {
                                warn!(error = %e, dequeue_count = msg.dequeue_count, "will retry");
                                let backoff = 2i32.pow(msg.dequeue_count.min(4));
                                let _ = queue.extend(&msg, backoff).await;
                                Err(Unsettled::Retried)
                            }
                        }
                    }
                    Work::Local(text) => match process_message(app, &text, 1).await {
                        Ok(outcome) => Ok(outcome),
                        // Onto the queue, where the retries and the poison queue apply.
                        Err(Retry(e)) => match queue.send_text(&text).await {
                            Ok(()) => {
                                warn!(error = %e, "failed in process; queued for another attempt");
                                Err(Unsettled::Requeued)
                            }
                            Err(q) => {
                                error!(error = %e, queue_error = %q, "failed in process and could not be queued; the next reconcile requests it again");
                                Err(Unsettled::Unqueued)
                            }
                        },
                    },
                };
                outstanding.fetch_sub(1, Ordering::SeqCst);
                settled.notify_one();
                if !matches!(result, Err(Unsettled::Requeued)) {
                    app.backlog_release();
                }
                result
            }
        })
        .buffer_unordered(app.settings.concurrency);
    let mut results = std::pin::pin!(results);
    while let Some(r) = results.next().await {
        report.processed += 1;
        match r {
            Ok(outcome) => {
                match outcome {
                    Outcome::BackedUp { .. } => report.backed_up += 1,
                    Outcome::AlreadyBackedUp { .. } => report.already_backed_up += 1,
                    Outcome::SecurityRecorded { .. } => report.security_recorded += 1,
                    Outcome::Superseded { .. } => report.superseded += 1,
                    Outcome::Poisoned { .. } => report.poisoned += 1,
                }
                progress.inc(1);
            }
            Err(Unsettled::Retried | Unsettled::Requeued) => report.retried += 1,
            Err(Unsettled::Unqueued) => report.unqueued += 1,
        }
    }
    let failed = receive_error.lock().expect("poisoned").take();
    if let Some(e) = failed {
        return Err(e);
    }
    report.left_on_queue = left_on_queue.load(Ordering::SeqCst);
    report.elapsed_ms = started.elapsed().as_millis();
    Ok(report)
}
