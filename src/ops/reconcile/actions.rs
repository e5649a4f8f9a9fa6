//! Reconcile's actions: what one page's `NeedsBackup`, `Tombstone`, `SecurityChanged` and
//! `BackupDirectory` rows make happen (snapshot + request, tombstone, security record, directory
//! backup), carried out with bounded concurrency and tallied. The walk that produces them is in
//! the parent module.

use futures::{stream, StreamExt};
use time::OffsetDateTime;
use tracing::{info, warn, Instrument};

use super::{Ctx, ReconcileReport};
use crate::app::App;
use crate::core::reconcile::{
    decide_snapshot, snapshot_version_etag, Action, ReconcileTally, SnapshotDecision,
};
use crate::model::metadata::{self, DELETED_AT, SOURCE_ETAG};
use crate::model::BlobEntry;
use crate::ops::snapshot::{self, Delivered};
use crate::storage::{BlobStore, StorageError};

/// Outcome of one action.
pub(crate) enum Done {
    Pending,
    Enqueued(Delivered),
    /// A request for the live version (no snapshot made).
    EnqueuedLive,
    /// Snapshot made but the request could not be queued: removed again, or (`true`) left
    /// behind as an orphaned marker.
    EnqueueFailed(String, bool),
    Tombstoned,
    /// Hierarchical source: a new security state recorded on the backup version (no copy).
    SecurityRecorded,
    /// Hierarchical source: a directory backed up (or its new security state recorded).
    DirectoryBackedUp,
    WouldEnqueue,
    WouldTombstone,
    Skipped(&'static str),
    Failed(String),
}

/// Carries out one page's actions with bounded concurrency and records the outcomes.
pub(super) async fn execute(
    ctx: &Ctx<'_>,
    container: &str,
    batch: Vec<Action>,
    source_served_at: Option<OffsetDateTime>,
    tally: &mut ReconcileTally,
    report: &mut ReconcileReport,
) {
    if batch.is_empty() {
        return;
    }
    let observed = crate::storage::dfs::observed_at(source_served_at);
    // The page's requests form one batch, recorded once they are all queued (see
    // `state::record_batch`): that record is what makes their markers trustworthy.
    let request_batch = crate::ops::state::new_batch_id();
    let request_batch = request_batch.as_str();
    let results: Vec<(String, Option<SnapshotDecision>, Done)> = stream::iter(batch)
        .map(|action| {
            let name = action.name().to_owned();
            let span = tracing::info_span!("reconcile_blob", container, blob = %name);
            async move {
                let (decision, done) = match action {
                    Action::NeedsBackup { source, backup, .. } => {
                        needs_backup(ctx, container, source, backup.is_none(), request_batch).await
                    }
                    Action::Tombstone { backup } => (None, tombstone(ctx, container, backup).await),
                    Action::SecurityChanged { source, backup } => {
                        let done = security_changed(ctx, container, source, backup, observed);
                        (None, done.await)
                    }
                    Action::BackupDirectory { source, backup } => {
                        let done = directory(ctx, container, source, backup, observed);
                        (None, done.await)
                    }
                    _ => (None, Done::Skipped("nothing to do")),
                };
                (name, decision, done)
            }
            .instrument(span)
        })
        .buffer_unordered(ctx.app.settings.concurrency)
        .collect()
        .await;
    let count = |d: Delivered| {
        results
            .iter()
            .filter(|(_, _, x)| matches!(x, Done::Enqueued(y) if *y == d))
            .count() as u64
    };
    let orphans = results
        .iter()
        .filter(|(_, _, d)| matches!(d, Done::EnqueueFailed(_, true)))
        .count() as u64;
    snapshot::record_batch_unless_handed_off(
        ctx.app,
        request_batch,
        count(Delivered::Queued),
        orphans,
        count(Delivered::HandedOff),
    )
    .await;
    for (name, decision, done) in results {
        if let Some(d) = &decision {
            tally.record_decision(d);
        }
        match done {
            Done::Pending => report.already_pending += 1,
            Done::Enqueued(_) => {
                report.snapshots_made += 1;
                report.requests_enqueued += 1;
            }
            Done::EnqueuedLive => report.requests_enqueued += 1,
            Done::EnqueueFailed(e, _) => report.error(container, Some(&name), e),
            Done::Tombstoned => report.tombstones_written += 1,
            Done::SecurityRecorded => report.security_recorded += 1,
            Done::DirectoryBackedUp => report.directories_backed_up += 1,
            Done::WouldEnqueue => report.would_enqueue += 1,
            Done::WouldTombstone => report.would_tombstone += 1,
            Done::Skipped(why) => {
                info!(container, blob = %name, why, "left for the next run");
                report.skipped += 1;
            }
            Done::Failed(e) => {
                warn!(container, blob = %name, error = %e, "reconcile action failed");
                report.error(container, Some(&name), e);
            }
        }
    }
}

/// This blob's snapshots of the current version (exact name; any order; every page).
async fn current_version_snapshots(
    store: &BlobStore,
    container: &str,
    source: &BlobEntry,
) -> Result<Vec<BlobEntry>, StorageError> {
    Ok(store
        .list_versions(container, &source.name)
        .await?
        .into_iter()
        .filter(|e| e.snapshot.is_some() && snapshot_version_etag(e) == source.etag)
        .collect())
}

async fn needs_backup(
    ctx: &Ctx<'_>,
    container: &str,
    source: BlobEntry,
    backup_absent: bool,
    batch: &str,
) -> (Option<SnapshotDecision>, Done) {
    let app = ctx.app;
    // With an empty queue nothing can be pending and the decision does not depend on the
    // snapshots: no per-blob listing then (a repair of N lost backups costs N snapshots, not N
    // listings more).
    let snapshots = if ctx.pending_ttl.is_zero() {
        Vec::new()
    } else {
        match current_version_snapshots(&app.source, container, &source).await {
            Ok(s) => s,
            Err(e) => return (None, Done::Failed(format!("listing snapshots: {e}"))),
        }
    };
    ctx.batches
        .fetch(app, &crate::core::reconcile::marker_batches(&snapshots))
        .await;
    let decision = decide_snapshot(
        &source,
        &snapshots,
        OffsetDateTime::now_utc(),
        ctx.pending_ttl,
        &|id| ctx.batches.get(id),
    );
    let done = match &decision {
        SnapshotDecision::Pending { .. } => Done::Pending,
        SnapshotDecision::SnapshotAndEnqueue { .. } if ctx.dry_run => Done::WouldEnqueue,
        SnapshotDecision::SnapshotAndEnqueue { .. } => {
            if let Err(e) = app.ensure_queue().await {
                return (Some(decision), Done::Failed(format!("backup queue: {e}")));
            }
            // A lost backup of an unchanged blob, with nothing pending: the version needs no new
            // snapshot (see `snapshot::enqueue_live`). With requests queued, the snapshot's
            // `lakeguard_requested_at` is what keeps the next run from asking twice: take one.
            if backup_absent && ctx.pending_ttl.is_zero() && app.engine.copies_live_source() {
                let done = match snapshot::enqueue_live(app, container, &source).await {
                    Ok(()) => Done::EnqueuedLive,
                    Err(e) => Done::Failed(e),
                };
                return (Some(decision), done);
            }
            match snapshot::snapshot_current(&app.source, container, source, Some(batch)).await {
                Ok(Some((taken, blob))) => {
                    match snapshot::enqueue(app, container, &blob, &taken, backup_absent).await {
                        Ok(delivered) => Done::Enqueued(delivered),
                        Err(e) => Done::EnqueueFailed(e.message, e.orphaned),
                    }
                }
                Ok(None) => Done::Skipped("deleted since the listing"),
                Err(e) => Done::Failed(format!("snapshot: {e}")),
            }
        }
    };
    (Some(decision), done)
}

/// Records a file's new security state on the backup version holding its content (hierarchical
/// source; no copy, no source snapshot): the listing rows of both sides say everything.
async fn security_changed(
    ctx: &Ctx<'_>,
    container: &str,
    source: BlobEntry,
    backup: BlobEntry,
    observed: OffsetDateTime,
) -> Done {
    let Some(sec) = &source.security else {
        return Done::Skipped("no security state listed");
    };
    if ctx.dry_run {
        return Done::WouldEnqueue;
    }
    match crate::ops::security::record(
        &ctx.app.backup,
        container,
        &source.name,
        &backup.etag,
        &backup.metadata,
        sec,
        observed,
    )
    .await
    {
        Ok(crate::ops::security::Recorded::Recorded) => Done::SecurityRecorded,
        Ok(crate::ops::security::Recorded::Current) => {
            Done::Skipped("security state already recorded")
        }
        Err(e) if e.is_precondition_failed() || e.is_not_found() => Done::Skipped(BACKUP_CHANGED),
        Err(e) => Done::Failed(format!("recording the security state: {e}")),
    }
}

/// Backs up a source directory (hierarchical source) as lakeguard's directory blob.
async fn directory(
    ctx: &Ctx<'_>,
    container: &str,
    source: BlobEntry,
    backup: Option<BlobEntry>,
    observed: OffsetDateTime,
) -> Done {
    if ctx.dry_run {
        return Done::WouldEnqueue;
    }
    if let Err(e) = ctx.app.ensure_backup_container(container).await {
        return Done::Failed(format!("backup container: {e}"));
    }
    match crate::ops::security::back_up_directory(
        &ctx.app.backup,
        container,
        &source,
        backup.as_ref(),
        observed,
    )
    .await
    {
        Ok(crate::ops::security::Recorded::Recorded) => Done::DirectoryBackedUp,
        Ok(crate::ops::security::Recorded::Current) => Done::Skipped("directory already backed up"),
        Err(e) if e.is_precondition_failed() || matches!(e, StorageError::Conflict { .. }) => {
            Done::Skipped(BACKUP_CHANGED)
        }
        Err(e) => Done::Failed(format!("backing up the directory: {e}")),
    }
}

async fn tombstone(ctx: &Ctx<'_>, container: &str, backup: BlobEntry) -> Done {
    tombstone_with(ctx.app, ctx.dry_run, container, backup).await
}

/// Why a tombstone was not written: the backup blob changed between its read and the write (its
/// conditions failed). The caller that must not lose the deletion tries again.
pub const BACKUP_CHANGED: &str = "backup changed since the listing";

/// Records that `backup`'s source is gone (after a HEAD of the source: only a real 404 counts):
/// the backup's current version is kept as a snapshot, then `lakeguard_deleted_at` is set, both
/// `If-Match`. Shared by reconcile and the event path.
pub(crate) async fn tombstone_with(
    app: &App,
    dry_run: bool,
    container: &str,
    backup: BlobEntry,
) -> Done {
    if backup.meta(SOURCE_ETAG).is_none() {
        return Done::Skipped("backup blob not written by lakeguard");
    }
    // Listings are not a point-in-time view: confirm the source is gone. Only a real 404 counts.
    match app.source.properties(container, &backup.name, None).await {
        Ok(_) => return Done::Skipped("source exists (created after the listing)"),
        Err(e) if e.is_not_found() => {}
        Err(e) => return Done::Failed(format!("confirming the deletion: {e}")),
    }
    if dry_run {
        return Done::WouldTombstone;
    }
    // Keep the backup's current version before its metadata changes: history stays complete.
    match app
        .backup
        .create_snapshot(container, &backup.name, &backup.etag, &backup.metadata)
        .await
    {
        Ok(_) => {}
        Err(e) if e.is_precondition_failed() || e.is_not_found() => {
            return Done::Skipped(BACKUP_CHANGED)
        }
        Err(e) => return Done::Failed(format!("keeping the backup version: {e}")),
    }
    let mut meta = backup.metadata.clone();
    meta.insert(
        DELETED_AT.into(),
        metadata::format_time(OffsetDateTime::now_utc()),
    );
    match app
        .backup
        .set_metadata(container, &backup.name, &meta, &backup.etag)
        .await
    {
        Ok(()) => {
            info!(container, blob = %backup.name, "source gone: backup tombstoned");
            Done::Tombstoned
        }
        // A worker wrote a new version meanwhile (the blob came back): the extra snapshot is just
        // one more kept version.
        Err(e) if e.is_precondition_failed() || e.is_not_found() => Done::Skipped(BACKUP_CHANGED),
        Err(e) => Done::Failed(format!("writing the tombstone: {e}")),
    }
}
