//! The `direct` engine: server-side copy by the storage service, from the source snapshot into
//! the backup account. No blob content passes through the function.
//!
//! Up to the block threshold (default 256 MiB, the service's limit for one Copy Blob From URL)
//! one synchronous copy; above it, Put Block From URL in parallel blocks and one Put Block List.
//! Every read of the source is `source-if-match` the snapshot's ETag, and the write is
//! conditional on the backup blob the worker saw, so a concurrent writer makes the copy fail
//! rather than mix versions.

use std::collections::BTreeMap;

use async_trait::async_trait;
use futures::{stream, TryStreamExt};
use time::Duration;

use super::{CopyEngine, CopyError, CopyJob, CopyOutcome};
use crate::storage::blob::TargetCondition;
use crate::storage::sas::{self, DelegationKeyCache};
use crate::storage::{BlobStore, StorageError};

pub const DEFAULT_BLOCK_THRESHOLD: u64 = 256 * 1024 * 1024;
pub const DEFAULT_BLOCK_SIZE: u64 = 100 * 1024 * 1024;

pub struct DirectCopy {
    source: BlobStore,
    backup: BlobStore,
    keys: DelegationKeyCache,
    concurrency: usize,
    block_threshold: u64,
    block_size: u64,
}

impl DirectCopy {
    pub fn new(source: BlobStore, backup: BlobStore, keys: DelegationKeyCache, concurrency: usize) -> Self {
        DirectCopy {
            source,
            backup,
            keys,
            concurrency: concurrency.clamp(1, 16),
            block_threshold: DEFAULT_BLOCK_THRESHOLD,
            block_size: DEFAULT_BLOCK_SIZE,
        }
    }

    /// Overrides the single-copy threshold and the block size (both at least 1 MiB).
    pub fn with_blocks(mut self, threshold: u64, block_size: u64) -> Self {
        self.block_threshold = threshold.max(1 << 20);
        self.block_size = block_size.max(1 << 20);
        self
    }

    async fn copy_in_blocks(
        &self,
        job: &CopyJob,
        source_url: &url::Url,
        condition: TargetCondition,
    ) -> Result<crate::model::Etag, StorageError> {
        let n = job.content_length.div_ceil(self.block_size);
        // Fixed-width ids: the service requires all ids of a blob to have the same length.
        let ids: Vec<Vec<u8>> = (0..n).map(|i| format!("lakeguard-{i:08}").into_bytes()).collect();
        stream::iter(ids.iter().enumerate().map(Ok::<_, StorageError>))
            .try_for_each_concurrent(self.concurrency, |(i, id)| {
                let offset = i as u64 * self.block_size;
                let len = self.block_size.min(job.content_length - offset);
                async move {
                    self.backup
                        .stage_block_from_url(
                            &job.target_container,
                            &job.target_blob,
                            id,
                            source_url,
                            offset,
                            len,
                            job.snapshot_etag.as_ref(),
                            None,
                        )
                        .await
                }
            })
            .await?;
        self.backup
            .commit_blocks(&job.target_container, &job.target_blob, ids, job.content_type.as_deref(), &job.metadata, condition)
            .await
    }
}

#[async_trait]
impl CopyEngine for DirectCopy {
    fn name(&self) -> &'static str {
        "direct"
    }

    async fn copy(&self, job: &CopyJob) -> Result<CopyOutcome, CopyError> {
        // Long enough for the largest copy at a slow rate; read-only, one snapshot only.
        let valid = Duration::minutes(60) + Duration::seconds((job.content_length / (1 << 20)) as i64);
        let sas = sas::read_sas(&self.source, &self.keys, &job.source_container, &job.source_blob, Some(&job.source_snapshot), valid)
            .await
            .map_err(classify)?;
        let source_url = sas::with_sas(self.source.url(&job.source_container, Some(&job.source_blob), Some(&job.source_snapshot)), &sas);
        let condition = match &job.expected_target {
            Some(e) => TargetCondition::Matches(e.clone()),
            None => TargetCondition::Absent,
        };
        let etag = if job.content_length <= self.block_threshold {
            let meta: BTreeMap<String, String> = job.metadata.clone();
            self.backup
                .copy_from_url(&job.target_container, &job.target_blob, &source_url, job.snapshot_etag.as_ref(), condition, &meta, None)
                .await
        } else {
            self.copy_in_blocks(job, &source_url, condition).await
        }
        .map_err(classify)?;
        Ok(CopyOutcome::Copied { target_etag: Some(etag) })
    }
}

fn classify(e: StorageError) -> CopyError {
    match &e {
        StorageError::NotFound { code, .. } if code == "BlobNotFound" || code == "CannotVerifyCopySource" => {
            CopyError::SourceGone(e.to_string())
        }
        // 412 on the target: another worker wrote the backup meanwhile; retrying re-evaluates.
        StorageError::PreconditionFailed { .. } | StorageError::Conflict { .. } | StorageError::Retryable { .. } => {
            CopyError::Retryable(e.to_string())
        }
        _ => CopyError::Permanent(e.to_string()),
    }
}
