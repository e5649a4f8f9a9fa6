//! Recording a path's security state (ADLS Gen2 owner / group / permissions / ACL) on the backup
//! version that holds its content, without copying the content again. Shared by the worker (a
//! request whose content the backup already holds) and reconcile (a listing that shows only the
//! security changed), and used for the directories reconcile backs up.

use std::collections::BTreeMap;

use time::OffsetDateTime;
use tracing::info;

use crate::model::metadata::{self, HDI_ISFOLDER};
use crate::model::security::{self, Security};
use crate::model::{BlobEntry, Etag};
use crate::storage::blob::TargetCondition;
use crate::storage::{BlobStore, StorageError};

/// What recording did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// The new state is on the backup base; the previous one (if any) kept as a backup snapshot.
    Recorded,
    /// The backup already records this state (or a newer observation): nothing written.
    Current,
}

/// Records `sec`, observed at `at`, on the backup base `c/b` whose ETag is `etag` and metadata
/// `meta` (from a listing or a HEAD): if the base records another state, it is kept first as a
/// backup snapshot (`If-Match`), then the base's metadata is replaced (`If-Match`) with the same
/// metadata and the new state. A 412 is returned as is (the caller's next round re-reads).
pub async fn record(
    backup: &BlobStore,
    c: &str,
    b: &str,
    etag: &Etag,
    meta: &BTreeMap<String, String>,
    sec: &Security,
    at: OffsetDateTime,
) -> Result<Recorded, StorageError> {
    let recorded = Security::from_metadata(meta);
    if !security::should_record(recorded.as_ref(), Security::observed_at(meta), sec, at) {
        return Ok(Recorded::Current);
    }
    if recorded.is_some() {
        backup.create_snapshot(c, b, etag, meta).await?;
    }
    let mut next = meta.clone();
    sec.write_metadata(&mut next, at);
    backup.set_metadata(c, b, &next, etag).await?;
    info!(
        container = c,
        blob = b,
        "security state recorded without a copy"
    );
    Ok(Recorded::Recorded)
}

/// The metadata of the backup blob that stands for source directory `dir`.
pub fn directory_metadata(
    dir: &BlobEntry,
    sec: &Security,
    at: OffsetDateTime,
) -> BTreeMap<String, String> {
    let mut m: BTreeMap<String, String> = dir
        .metadata
        .iter()
        .filter(|(k, _)| !metadata::is_lakeguard_key(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    m.insert(HDI_ISFOLDER.into(), "true".into());
    m.insert(security::DIRECTORY.into(), "true".into());
    m.insert(metadata::SOURCE_ETAG.into(), dir.etag.quoted());
    m.insert(
        metadata::SOURCE_LAST_MODIFIED.into(),
        metadata::format_time(dir.last_modified),
    );
    m.insert(
        metadata::BACKED_UP_AT.into(),
        metadata::format_time(OffsetDateTime::now_utc()),
    );
    sec.write_metadata(&mut m, at);
    m
}

/// Backs up source directory `dir` (listed with its security state) over the backup row
/// `backup` (`None`: nothing there): a new zero-length directory blob (`If-None-Match: *`), or the
/// directory metadata put on a row without it (a directory the backup account made itself for
/// a child), or the new security state recorded on ours.
pub async fn back_up_directory(
    store: &BlobStore,
    c: &str,
    dir: &BlobEntry,
    backup: Option<&BlobEntry>,
    at: OffsetDateTime,
) -> Result<Recorded, StorageError> {
    let Some(sec) = &dir.security else {
        return Ok(Recorded::Current);
    };
    match backup {
        None => {
            let created = store
                .upload_if(
                    c,
                    &dir.name,
                    Vec::new(),
                    None,
                    &directory_metadata(dir, sec, at),
                    &TargetCondition::Absent,
                )
                .await;
            match created {
                Ok(_) => Ok(Recorded::Recorded),
                // A hierarchical backup account made the directory meanwhile, for a child
                // backed up at the same time: mark that one (If-Match what it is now).
                Err(e)
                    if e.is_precondition_failed() || matches!(e, StorageError::Conflict { .. }) =>
                {
                    let now = store.properties(c, &dir.name, None).await?;
                    let row = BlobEntry {
                        name: dir.name.clone(),
                        snapshot: None,
                        etag: now.etag,
                        last_modified: now.last_modified,
                        content_length: now.content_length,
                        content_type: now.content_type,
                        content_md5: now.content_md5,
                        metadata: now.metadata,
                        security: None,
                    };
                    Box::pin(back_up_directory(store, c, dir, Some(&row), at)).await
                }
                Err(e) => Err(e),
            }
        }
        // A file of that name (the source replaced it by a directory): kept as a backup
        // snapshot, then replaced by the directory blob.
        Some(row) if !row.is_directory_placeholder() => {
            store
                .create_snapshot(c, &dir.name, &row.etag, &row.metadata)
                .await?;
            store
                .upload_if(
                    c,
                    &dir.name,
                    Vec::new(),
                    None,
                    &directory_metadata(dir, sec, at),
                    &TargetCondition::Matches(row.etag.clone()),
                )
                .await?;
            Ok(Recorded::Recorded)
        }
        Some(row)
            if row.meta(security::DIRECTORY).is_none()
                || row.meta(metadata::DELETED_AT).is_some() =>
        {
            // A directory made by the backup account (for a child), or one whose tombstone is
            // being lifted: keep what it held as a snapshot when it was ours, then mark it.
            if row.meta(metadata::SOURCE_ETAG).is_some() {
                store
                    .create_snapshot(c, &dir.name, &row.etag, &row.metadata)
                    .await?;
            }
            let mut m = row.metadata.clone();
            m.remove(metadata::DELETED_AT);
            m.extend(directory_metadata(dir, sec, at));
            store.set_metadata(c, &dir.name, &m, &row.etag).await?;
            Ok(Recorded::Recorded)
        }
        Some(row) => record(store, c, &dir.name, &row.etag, &row.metadata, sec, at).await,
    }
}
