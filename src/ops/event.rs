//! EventBackup: Blob Storage events (Event Grid, delivered to a storage queue) to backups within
//! seconds of a change, instead of at the next producer or reconcile run.
//!
//! Every step is conditional and idempotent, because duplicates and out-of-order events are
//! normal (Event Grid delivers at least once, in no promised order):
//! - **BlobCreated** names the version (`eTag`) the blob had. If the backup holds it: done. Else
//!   the blob is snapshotted **`If-Match` that ETag** and the snapshot copied through the worker's
//!   path (`backup::process_request`). A blob that has changed since is a newer version with an
//!   event of its own (or the next run finds it); the old version is backed up only if a snapshot
//!   of it exists (the worker looks), else reported superseded. A blob gone is superseded (its
//!   BlobDeleted event follows).
//! - **BlobDeleted**: the source is checked (only a real 404 counts: a re-created blob is left),
//!   then the backup is tombstoned the way reconcile does it (its current version kept as a
//!   snapshot, `lakeguard_deleted_at` set, both `If-Match`).
//! - **BlobRenamed** (ADLS Gen2): the new name is backed up like a BlobCreated of its current
//!   version, the old name tombstoned like a BlobDeleted. **DirectoryRenamed**: a producer run
//!   over the new directory requests its paths; the old directory's backups are tombstoned once
//!   their sources are gone. **DirectoryDeleted**: the directory's backups are tombstoned.
//! - Events of another account, a container reconcile does not cover, or outside
//!   `LAKEGUARD_EVENT_PREFIXES` are acknowledged and counted; other event types are ignored.
//!
//! A message that is not an event goes to `<queue>-poison` with the reason.

use serde::Serialize;
use time::OffsetDateTime;
use tracing::{info, warn, Instrument};

use super::backup::{self, Retry};
use super::reconcile::{tombstone_with, Done};
use crate::app::App;
use crate::model::event::{self, BlobEvent, EventKind};
use crate::model::{metadata, BackupRequest, BlobEntry, Etag, VersionProps};
use crate::storage::blob::{BlobProperties, ListOptions};
use crate::storage::{BackupQueue, StorageError};

/// What became of one event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventOutcome {
    /// The worker's outcome for the version the event named.
    Backup {
        outcome: backup::Outcome,
    },
    Tombstoned {
        container: String,
        blob: String,
    },
    /// A deletion event that did not lead to a tombstone (the blob exists again, has no
    /// backup, is tombstoned already, …).
    NotTombstoned {
        container: String,
        blob: String,
        why: String,
    },
    /// Paths of a renamed directory requested, and backups of its old paths tombstoned.
    Directory {
        container: String,
        requested: u64,
        tombstoned: u64,
    },
    OutOfScope {
        why: String,
    },
    Ignored {
        event_type: String,
    },
}

impl EventOutcome {
    pub fn describe(&self) -> String {
        match self {
            EventOutcome::Backup { outcome } => outcome.describe(),
            EventOutcome::Tombstoned { container, blob } => {
                format!("{container}/{blob}: source gone, backup tombstoned")
            }
            EventOutcome::NotTombstoned {
                container,
                blob,
                why,
            } => format!("{container}/{blob}: not tombstoned: {why}"),
            EventOutcome::Directory {
                container,
                requested,
                tombstoned,
            } => format!(
                "{container}: directory change: {requested} requested, {tombstoned} tombstoned"
            ),
            EventOutcome::OutOfScope { why } => format!("out of scope: {why}"),
            EventOutcome::Ignored { event_type } => format!("{event_type}: ignored"),
        }
    }
}

fn entry(name: &str, p: BlobProperties) -> BlobEntry {
    BlobEntry {
        name: name.to_owned(),
        snapshot: None,
        etag: p.etag,
        last_modified: p.last_modified,
        content_length: p.content_length,
        content_type: p.content_type,
        content_md5: p.content_md5,
        metadata: p.metadata,
        security: None,
    }
}

async fn head(
    store: &crate::storage::BlobStore,
    c: &str,
    b: &str,
) -> Result<Option<BlobProperties>, StorageError> {
    match store.properties(c, b, None).await {
        Ok(p) => Ok(Some(p)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Why an event is out of lakeguard's scope, if it is.
fn out_of_scope(app: &App, e: &BlobEvent) -> Option<String> {
    if !e.account.eq_ignore_ascii_case(app.source.account()) {
        return Some(format!(
            "an event of account {}, not the source account {}",
            e.account,
            app.source.account()
        ));
    }
    if !app.settings.covers_container(&e.container) {
        return Some(format!("container {} is not covered", e.container));
    }
    let prefixes = &app.settings.event_prefixes;
    // A rename touches two paths and a directory event a whole subtree: each is judged on its
    // own, and the event is out of scope only when none of them is in.
    let touches = match &e.kind {
        EventKind::BlobRenamed { from } => in_scope(prefixes, &e.name) || in_scope(prefixes, from),
        EventKind::DirectoryRenamed { from } => {
            !subtree_scopes(prefixes, &e.name).is_empty()
                || !subtree_scopes(prefixes, from).is_empty()
        }
        EventKind::DirectoryDeleted => !subtree_scopes(prefixes, &e.name).is_empty(),
        _ => in_scope(prefixes, &e.name),
    };
    if !touches {
        return Some(format!(
            "{}/{} is outside LAKEGUARD_EVENT_PREFIXES",
            e.container, e.name
        ));
    }
    None
}

/// Whether `name` is under one of `prefixes` (none: everything is).
fn in_scope(prefixes: &[String], name: &str) -> bool {
    prefixes.is_empty() || prefixes.iter().any(|p| name.starts_with(p.as_str()))
}

/// The listing prefixes that cover exactly the in-scope part of directory `dir`'s subtree:
/// `dir/` when a prefix holds all of it, else the prefixes that lie inside it; none when the
/// subtree and the prefixes do not meet.
fn subtree_scopes(prefixes: &[String], dir: &str) -> Vec<String> {
    let subtree = format!("{}/", dir.trim_end_matches('/'));
    if in_scope(prefixes, &subtree) {
        return vec![subtree];
    }
    let mut inside: Vec<String> = prefixes
        .iter()
        .filter(|p| p.starts_with(&subtree))
        .cloned()
        .collect();
    inside.sort();
    // A prefix inside another one adds nothing (and would request its paths twice).
    let mut out: Vec<String> = Vec::new();
    for p in inside {
        if !out.iter().any(|o| p.starts_with(o.as_str())) {
            out.push(p);
        }
    }
    out
}

/// One event queue message (one event, or an array of them). `dequeue_count` is the host's.
pub async fn process_message(
    app: &App,
    queue: &BackupQueue,
    text: &str,
    dequeue_count: u32,
) -> Result<Vec<EventOutcome>, Retry> {
    let events = match event::parse(text) {
        Ok(e) => e,
        Err(e) => {
            let reason = format!("not a Blob Storage event: {e}");
            return backup::poison(queue, text, &reason, dequeue_count)
                .await
                .map(|_| Vec::new());
        }
    };
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        let span =
            tracing::info_span!("event", id = %e.id, container = %e.container, blob = %e.name);
        if let Some(why) = out_of_scope(app, &e) {
            span.in_scope(|| info!(%why, "event out of scope; acknowledged"));
            out.push(EventOutcome::OutOfScope { why });
            continue;
        }
        let result = one(app, queue, text, &e, dequeue_count, &mut out)
            .instrument(span)
            .await;
        match result {
            Ok(()) => {}
            // The whole message is retried: every step is idempotent.
            Err(Retry(err)) if dequeue_count >= app.settings.max_dequeue_count => {
                let reason = format!("failed on all {dequeue_count} deliveries; last error: {err}");
                backup::poison(queue, text, &reason, dequeue_count).await?;
                return Ok(out);
            }
            Err(r) => return Err(r),
        }
    }
    Ok(out)
}

async fn one(
    app: &App,
    queue: &BackupQueue,
    text: &str,
    e: &BlobEvent,
    dequeue_count: u32,
    out: &mut Vec<EventOutcome>,
) -> Result<(), Retry> {
    let o = match &e.kind {
        EventKind::BlobCreated { etag } => {
            created(
                app,
                queue,
                text,
                &e.container,
                &e.name,
                etag.as_ref(),
                dequeue_count,
            )
            .await?
        }
        EventKind::BlobDeleted => deleted(app, &e.container, &e.name).await?,
        EventKind::BlobRenamed { from } => {
            let prefixes = &app.settings.event_prefixes;
            let new_side = in_scope(prefixes, &e.name);
            if new_side {
                let o = created(app, queue, text, &e.container, &e.name, None, dequeue_count);
                out.push(o.await?);
            }
            if in_scope(prefixes, from) {
                deleted(app, &e.container, from).await?
            } else {
                EventOutcome::NotTombstoned {
                    container: e.container.clone(),
                    blob: from.clone(),
                    why: "the old name is outside LAKEGUARD_EVENT_PREFIXES".into(),
                }
            }
        }
        EventKind::DirectoryRenamed { from } => {
            directory(app, &e.container, Some(&e.name), from).await?
        }
        EventKind::DirectoryDeleted => directory(app, &e.container, None, &e.name).await?,
        EventKind::Other(t) => EventOutcome::Ignored {
            event_type: t.clone(),
        },
    };
    info!("{}", o.describe());
    out.push(o);
    Ok(())
}

fn retry(e: StorageError) -> Retry {
    Retry(e.to_string())
}

/// BlobCreated (or a rename's new name, `etag` None = its current version).
async fn created(
    app: &App,
    queue: &BackupQueue,
    text: &str,
    c: &str,
    name: &str,
    etag: Option<&Etag>,
    dequeue_count: u32,
) -> Result<EventOutcome, Retry> {
    let live = head(&app.source, c, name).await.map_err(retry)?;
    let Some(live) = live else {
        return Ok(EventOutcome::Backup {
            outcome: backup::Outcome::Superseded {
                container: c.into(),
                blob: name.into(),
                etag: etag.map(Etag::quoted).unwrap_or_default(),
                why: "the blob is gone; its deletion has an event of its own".into(),
            },
        });
    };
    let version = etag.cloned().unwrap_or_else(|| live.etag.clone());
    // A duplicate event, or the producer was faster: nothing to do.
    if let Some(b) = head(&app.backup, c, name).await.map_err(retry)? {
        if b.metadata
            .get(metadata::SOURCE_ETAG)
            .map(Etag::new)
            .as_ref()
            == Some(&version)
            && !b.metadata.contains_key(metadata::DELETED_AT)
        {
            return Ok(EventOutcome::Backup {
                outcome: backup::Outcome::AlreadyBackedUp {
                    container: c.into(),
                    blob: name.into(),
                    etag: version.quoted(),
                },
            });
        }
    }
    let request = if live.etag == version {
        // Snapshot exactly that version: If-Match the event's ETag.
        let now = OffsetDateTime::now_utc();
        let mut meta = super::snapshot::snapshot_metadata(
            &live.metadata,
            &live.etag,
            live.last_modified,
            now,
            None,
        );
        // Hierarchical source: an event carries no ACL; one Get Access Control (a read) records
        // the path's security state with the version. If it fails, the version is backed up
        // without it and the next producer or reconcile run records it (it sees none recorded).
        let security = if app.source.connection().hns {
            match app.source.get_access_control(c, name).await {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "could not read the access control; recorded by the next full run");
                    None
                }
            }
        } else {
            None
        };
        if let Some(s) = &security {
            s.write_metadata(&mut meta, now);
        }
        match app.source.create_snapshot(c, name, &version, &meta).await {
            Ok(taken) => {
                let mut r = BackupRequest::new(c, name, &version, &taken.id);
                if let Some(se) = taken.etag {
                    r = r.with_props(VersionProps {
                        snapshot_etag: se,
                        length: live.content_length,
                        content_type: live.content_type.clone(),
                        last_modified: live.last_modified,
                        metadata: live
                            .metadata
                            .iter()
                            .filter(|(k, _)| !metadata::is_lakeguard_key(k))
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect(),
                        security,
                    });
                }
                r
            }
            // Changed since the HEAD: the worker looks for a snapshot of the version.
            Err(e) if e.is_precondition_failed() || e.is_not_found() => {
                BackupRequest::version(c, name, &version)
            }
            Err(e) => return Err(retry(e)),
        }
    } else {
        // Overwritten since the event: backed up only if a snapshot of it exists.
        BackupRequest::version(c, name, &version)
    };
    let outcome = backup::process_request(app, queue, text, &request, dequeue_count).await?;
    Ok(EventOutcome::Backup { outcome })
}

/// BlobDeleted (or a rename's old name).
async fn deleted(app: &App, c: &str, name: &str) -> Result<EventOutcome, Retry> {
    let not = |why: &str| {
        Ok(EventOutcome::NotTombstoned {
            container: c.into(),
            blob: name.into(),
            why: why.into(),
        })
    };
    if head(&app.source, c, name).await.map_err(retry)?.is_some() {
        return not("the blob exists (re-created after the deletion)");
    }
    let Some(b) = head(&app.backup, c, name).await.map_err(retry)? else {
        return not("it has no backup");
    };
    if b.metadata.contains_key(metadata::DELETED_AT) {
        return not("tombstoned already");
    }
    match tombstone_with(app, false, c, entry(name, b)).await {
        Done::Tombstoned => Ok(EventOutcome::Tombstoned {
            container: c.into(),
            blob: name.into(),
        }),
        // Someone wrote the backup meanwhile (a copy of the last version, landing late): the
        // next delivery reads it again and tombstones what is there now.
        Done::Skipped(why) if why == super::reconcile::BACKUP_CHANGED => Err(Retry(format!(
            "tombstoning {c}/{name}: {why}; trying again"
        ))),
        Done::Skipped(why) => not(why),
        Done::Failed(e) => Err(Retry(e)),
        _ => not("nothing to do"),
    }
}

/// A directory renamed (`to` = its new path) or deleted: request the new paths, tombstone the
/// backups of the old ones whose sources are gone.
async fn directory(
    app: &App,
    c: &str,
    to: Option<&str>,
    from: &str,
) -> Result<EventOutcome, Retry> {
    let prefixes = &app.settings.event_prefixes;
    let mut requested = 0;
    for prefix in to
        .map(|to| subtree_scopes(prefixes, to))
        .unwrap_or_default()
    {
        let r = super::snapshot::run_with(app, c, Some(&prefix), true, super::no_progress())
            .await
            .map_err(|e| Retry(e.to_string()))?;
        if !r.is_complete() {
            return Err(Retry(format!(
                "requesting the renamed directory's paths: {} failed",
                r.failed
            )));
        }
        requested += r.enqueued;
    }
    let mut tombstoned = 0;
    for prefix in subtree_scopes(prefixes, from) {
        tombstoned += tombstone_under(app, c, prefix).await?;
    }
    if tombstoned > 0 || requested > 0 {
        info!(
            container = c,
            requested, tombstoned, "directory event handled"
        );
    } else {
        warn!(
            container = c,
            "directory event: nothing to request or tombstone"
        );
    }
    Ok(EventOutcome::Directory {
        container: c.into(),
        requested,
        tombstoned,
    })
}

/// Tombstones the backups under `prefix` whose sources are gone; how many.
async fn tombstone_under(app: &App, c: &str, prefix: String) -> Result<u64, Retry> {
    let opts = ListOptions {
        prefix: Some(prefix),
        snapshots: false,
        metadata: true,
        max_results: None,
    };
    let mut tombstoned = 0;
    let mut marker = None;
    loop {
        let page = match app.backup.list_page(c, &opts, marker.take()).await {
            Ok(p) => p,
            Err(e) if e.is_not_found() => break,
            Err(e) => return Err(retry(e)),
        };
        for b in page.entries {
            if b.meta(metadata::DELETED_AT).is_some() || b.meta(metadata::SOURCE_ETAG).is_none() {
                continue;
            }
            match tombstone_with(app, false, c, b).await {
                Done::Tombstoned => tombstoned += 1,
                Done::Skipped(why) if why == super::reconcile::BACKUP_CHANGED => {
                    return Err(Retry(format!("tombstoning under {c}: {why}; trying again")))
                }
                Done::Failed(e) => return Err(Retry(e)),
                _ => {}
            }
        }
        match page.next_marker {
            Some(m) => marker = Some(m),
            None => break,
        }
    }
    Ok(tombstoned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_directory_is_in_scope_where_its_subtree_meets_a_prefix() {
        assert_eq!(subtree_scopes(&[], "d"), ["d/"]);
        assert_eq!(subtree_scopes(&p(&["d/"]), "d"), ["d/"]);
        assert_eq!(subtree_scopes(&p(&["da"]), "data/x/"), ["data/x/"]);
        // A prefix deeper than the directory: only that part of the subtree.
        assert_eq!(
            subtree_scopes(
                &p(&["data/keep/", "data/keep/deeper/", "data/also/", "other/"]),
                "data"
            ),
            ["data/also/", "data/keep/"]
        );
        assert!(subtree_scopes(&p(&["other/"]), "data").is_empty());
        // `data` is not a parent of `database/`.
        assert!(subtree_scopes(&p(&["database/"]), "data").is_empty());
        assert!(in_scope(&[], "x") && in_scope(&p(&["a/"]), "a/b") && !in_scope(&p(&["a/"]), "b"));
    }
}
