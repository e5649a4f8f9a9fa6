//! lakeguard's own small state documents in the backup account's reserved
//! [`STATE_CONTAINER`]: coverage records, producer run records (and, in `watermark.rs`, the
//! producer's watermarks). The container is created on demand; every write is conditional.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tracing::info;

use crate::app::App;
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
