//! lakeguard's own small state documents in the backup account's reserved
//! [`STATE_CONTAINER`]: coverage records, producer run records (and, in `watermark.rs`, the
//! producer's watermarks). The container is created on demand; every write is conditional.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tracing::info;

use crate::app::App;
use crate::core::reconcile::BatchRecord;
use crate::model::Etag;
use crate::settings::STATE_CONTAINER;
use crate::storage::blob::TargetCondition;
use crate::storage::StorageError;

/// Writes `body` at `name` under `cond`, creating the state container on first use.
pub async fn put(
    app: &App,
    name: &str,
    body: Vec<u8>,
    cond: &TargetCondition,
) -> Result<Etag, StorageError> {
    let meta = BTreeMap::new();
    let ct = Some("application/json");
    match app
        .backup
        .upload_if(STATE_CONTAINER, name, body.clone(), ct, &meta, cond)
        .await
    {
        Err(e) if e.is_not_found() && e.code() == "ContainerNotFound" => {
            app.backup.ensure_container(STATE_CONTAINER).await?;
            app.backup
                .upload_if(STATE_CONTAINER, name, body, ct, &meta, cond)
                .await
        }
        other => other,
    }
}

/// The document at `name`; `None` only for a real 404 (of the blob or the container).
pub async fn get(app: &App, name: &str) -> Result<Option<(Vec<u8>, Etag)>, StorageError> {
    match app.backup.download_versioned(STATE_CONTAINER, name).await {
        Ok(read) => Ok(Some(read)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// A conditional write lost to another writer (412, or 409 on `If-None-Match: *`).
pub fn is_lost_race(e: &StorageError) -> bool {
    e.is_precondition_failed()
        || matches!(e, StorageError::Conflict { code, .. } if code == "BlobAlreadyExists")
}

/// Coverage: since when lakeguard watches a container, i.e. the start of its first complete pass
/// (a producer run over the whole container, or a reconcile walk of it, with no failure). From
/// then on a name lakeguard knows nothing of at T did not exist at T — what lived and died
/// between two passes unseen is within the RPO, as with any periodic backup. A restore uses it
/// to prove a name absent before its first version (`core::history::before_history`);
/// lakeguard's coverage is assumed continuous from that pass on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Coverage {
    pub schema: u32,
    pub container: String,
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
}

fn coverage_blob(container: &str) -> String {
    format!("coverage/{container}.json")
}

/// The container's coverage start, if a complete pass was recorded. A document that cannot be
/// read or parsed is an error, never "no coverage" silently turned into "absent" elsewhere: the
/// caller reports it.
pub async fn coverage(app: &App, container: &str) -> Result<Option<OffsetDateTime>, StorageError> {
    let Some((body, _)) = get(app, &coverage_blob(container)).await? else {
        return Ok(None);
    };
    let c: Coverage = serde_json::from_slice(&body).map_err(|e| StorageError::Permanent {
        what: format!("coverage record of {container}"),
        detail: e.to_string(),
    })?;
    if c.schema != 1 || c.container != container {
        return Err(StorageError::Permanent {
            what: format!("coverage record of {container}"),
            detail: "foreign or unknown schema".into(),
        });
    }
    Ok(Some(c.since))
}

/// Records a complete pass that started at `since`, unless one is recorded already (the first
/// pass is the one that counts; `If-None-Match: *`).
pub async fn record_coverage(
    app: &App,
    container: &str,
    since: OffsetDateTime,
) -> Result<(), StorageError> {
    let doc = Coverage {
        schema: 1,
        container: container.to_owned(),
        since,
    };
    let body = serde_json::to_vec(&doc).expect("a coverage record serialises");
    match put(
        app,
        &coverage_blob(container),
        body,
        &TargetCondition::Absent,
    )
    .await
    {
        Ok(_) => {
            info!(container, since = %crate::model::metadata::format_time(since), "coverage of the container recorded");
            Ok(())
        }
        Err(e) if is_lost_race(&e) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Request batches: a pending marker (`lakeguard_requested_at` on a source snapshot) is written
/// with the snapshot, before its request is queued, because snapshots are immutable. The batch
/// it names (`lakeguard_request_batch`) is recorded only after every request of the batch was
/// queued (or its snapshot removed again), so reconcile trusts a marker for the pending TTL only
/// when its batch is recorded complete (`core::reconcile::trusted_marker`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BatchDoc {
    pub schema: u32,
    pub batch: String,
    #[serde(with = "time::serde::rfc3339")]
    pub finished_at: OffsetDateTime,
    /// Requests queued.
    pub queued: u64,
    /// Snapshots whose request could not be queued and which could not be removed either: their
    /// markers vouch for nothing.
    pub orphans: u64,
}

/// A new batch id: sortable by time (a lifecycle rule on `requests/` can expire old records),
/// unique enough, safe in a blob name and in metadata.
pub fn new_batch_id() -> String {
    let now = OffsetDateTime::now_utc();
    format!(
        "{:04}{:02}{:02}t{:02}{:02}{:02}-{:016x}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        super::restore::random_u64()
    )
}

fn batch_blob(id: &str) -> String {
    format!("requests/{id}.json")
}

/// Records batch `id` as finished. A failure only costs duplicates: its markers are then trusted
/// for the grace period alone, and reconcile asks again after it.
pub async fn record_batch(
    app: &App,
    id: &str,
    queued: u64,
    orphans: u64,
) -> Result<(), StorageError> {
    let doc = BatchDoc {
        schema: 1,
        batch: id.to_owned(),
        finished_at: OffsetDateTime::now_utc(),
        queued,
        orphans,
    };
    let body = serde_json::to_vec(&doc).expect("a batch record serialises");
    match put(app, &batch_blob(id), body, &TargetCondition::Absent).await {
        Ok(_) => Ok(()),
        Err(e) if is_lost_race(&e) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The batch records one reconcile (or verify) run has read: each batch is read once.
#[derive(Default)]
pub struct BatchRecords(std::sync::Mutex<std::collections::HashMap<String, BatchRecord>>);

impl BatchRecords {
    /// Reads the records of `ids` not read yet. An unreadable record counts as missing: the
    /// marker is then trusted for the grace period only, which errs toward asking twice, never
    /// toward losing a request.
    pub async fn fetch(&self, app: &App, ids: &[String]) {
        let todo: Vec<String> = {
            let known = self.0.lock().expect("poisoned");
            ids.iter()
                .filter(|i| !known.contains_key(*i))
                .cloned()
                .collect()
        };
        for id in todo {
            let record = match get(app, &batch_blob(&id)).await {
                Ok(Some((body, _))) => match serde_json::from_slice::<BatchDoc>(&body) {
                    Ok(d) if d.batch == id && d.orphans == 0 => BatchRecord::Complete,
                    Ok(d) if d.batch == id => BatchRecord::Incomplete,
                    _ => BatchRecord::Incomplete,
                },
                Ok(None) => BatchRecord::Missing,
                Err(e) => {
                    tracing::warn!(batch = %id, error = %e, "could not read a request batch record; its markers count as unrecorded");
                    BatchRecord::Missing
                }
            };
            self.0.lock().expect("poisoned").insert(id, record);
        }
    }

    pub fn get(&self, id: &str) -> BatchRecord {
        self.0
            .lock()
            .expect("poisoned")
            .get(id)
            .copied()
            .unwrap_or(BatchRecord::Missing)
    }
}
