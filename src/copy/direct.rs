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

use super::{CopyEngine, CopyError, CopyJob, CopyOutcome};
use crate::storage::blob::{CopySource, TargetCondition};
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
    pub fn new(
        source: BlobStore,
        backup: BlobStore,
        keys: DelegationKeyCache,
        concurrency: usize,
    ) -> Self {
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

    fn blocks(&self) -> BlockOptions {
        BlockOptions {
            threshold: self.block_threshold,
            block_size: self.block_size,
            concurrency: self.concurrency,
        }
    }
}

/// How large copies are split (see the module docs).
#[derive(Clone, Copy, Debug)]
pub struct BlockOptions {
    /// Up to this size one synchronous Copy Blob From URL; above it, blocks.
    pub threshold: u64,
    pub block_size: u64,
    /// Blocks staged at once.
    pub concurrency: usize,
}

impl Default for BlockOptions {
    fn default() -> Self {
        BlockOptions {
            threshold: DEFAULT_BLOCK_THRESHOLD,
            block_size: DEFAULT_BLOCK_SIZE,
            concurrency: 8,
        }
    }
}

impl BlockOptions {
    pub fn from_settings(settings: &crate::settings::Settings) -> Self {
        BlockOptions {
            threshold: settings.copy_block_threshold.max(1 << 20),
            block_size: settings.copy_block_size.max(1 << 20),
            concurrency: settings.concurrency.clamp(1, 16),
        }
    }
}

/// The source of a server-side copy: one blob or snapshot of `store`, read with a short-lived
/// read-only SAS from [`sas::read_sas`] (the one place that knows how copy sources are
/// authorised) and only if it still has `if_match`.
pub struct CopyFrom<'a> {
    pub store: &'a BlobStore,
    pub keys: &'a DelegationKeyCache,
    pub container: &'a str,
    pub blob: &'a str,
    pub snapshot: Option<&'a str>,
    pub if_match: Option<crate::model::Etag>,
    pub content_length: u64,
    /// Used only when the source version itself has none: both paths copy the source's content
    /// headers (the single copy by the service, the block path from a HEAD of the version).
    pub content_type: Option<&'a str>,
}

/// The target of a server-side copy, written only under `condition`, with exactly `metadata`.
pub struct CopyTo<'a> {
    pub store: &'a BlobStore,
    pub container: &'a str,
    pub blob: &'a str,
    pub condition: TargetCondition,
    pub metadata: &'a BTreeMap<String, String>,
}

/// Server-side copy of one exact version between any two blob stores (same or different
/// accounts): the worker's engine and restore both use it. No content passes through this
/// process. Returns the target's new ETag.
pub async fn server_side_copy(
    from: &CopyFrom<'_>,
    to: &CopyTo<'_>,
    blocks: &BlockOptions,
) -> Result<crate::model::Etag, StorageError> {
    if from.content_length <= blocks.threshold {
        let source = copy_source(from).await?;
        to.store
            .copy_from_url(
                to.container,
                to.blob,
                &source,
                to.condition.clone(),
                to.metadata,
            )
            .await
    } else {
        copy_in_blocks(from, to, blocks).await
    }
}

/// The source URL of `from` with a fresh read-only SAS for exactly that blob or snapshot
/// ([`sas::read_sas`], at most [`sas::MAX_LIFETIME`]). Made per request: a single-shot copy
/// (at most 256 MiB) takes one, the block path one per block, so no copy needs a long SAS.
async fn copy_source(from: &CopyFrom<'_>) -> Result<CopySource, StorageError> {
    let sas = sas::read_sas(
        from.store,
        from.keys,
        from.container,
        from.blob,
        from.snapshot,
        sas::MAX_LIFETIME,
    )
    .await?;
    Ok(CopySource {
        url: sas::with_sas(
            from.store
                .blob_url(from.container, from.blob, from.snapshot)?,
            &sas,
        ),
        if_match: from.if_match.clone(),
        authorization: None,
    })
}

async fn copy_in_blocks(
    from: &CopyFrom<'_>,
    to: &CopyTo<'_>,
    blocks: &BlockOptions,
) -> Result<crate::model::Etag, StorageError> {
    // Put Block List sets the blob's content headers from its own request, not from the blocks'
    // source: read them from exactly the version being copied (one HEAD per large blob), so the
    // backup keeps Content-Encoding, Cache-Control, ... like the single-shot copy does.
    let mut headers = from
        .store
        .content_headers(
            from.container,
            from.blob,
            from.snapshot,
            from.if_match.as_ref(),
        )
        .await?;
    if headers.content_type.is_none() {
        headers.content_type = from.content_type.map(str::to_owned);
    }
    let block_size = blocks.block_size.max(1);
    let n = from.content_length.div_ceil(block_size);
    let ids = block_ids(attempt_id(), n);
    stream::iter(ids.iter().enumerate().map(Ok::<_, StorageError>))
        .try_for_each_concurrent(blocks.concurrency.max(1), |(i, id)| {
            let offset = i as u64 * block_size;
            let len = block_size.min(from.content_length - offset);
            async move {
                let source = copy_source(from).await?;
                to.store
                    .stage_block_from_url(to.container, to.blob, id, &source, offset, len)
                    .await
            }
        })
        .await?;
    to.store
        .commit_blocks(
            to.container,
            to.blob,
            ids,
            &headers,
            to.metadata,
            to.condition.clone(),
        )
        .await
}

/// The block ids of one copy attempt: `<attempt: 12 hex><index: 6 hex>`.
///
/// Unique per attempt: a blob has one uncommitted block list, shared by every writer, and Put
/// Block List commits whatever block of each id was staged last. With ids shared by all copies,
/// two concurrent copies of different versions into one backup name (two requests of one blob,
/// two worker instances) replaced each other's blocks and the first commit mixed both versions.
/// With its own ids a commit can only ever name blocks its own attempt staged.
///
/// 18 bytes for every lakeguard copy, the length earlier versions used (`lakeguard-00000000`):
/// the service refuses a block whose id length differs from the blob's uncommitted blocks', so
/// blocks an interrupted copy left behind (kept for up to a week) must not make the next copy of
/// that blob fail. 6 hex digits cover the service's 50,000 blocks per blob.
fn block_ids(attempt: u64, blocks: u64) -> Vec<Vec<u8>> {
    let attempt = attempt & 0xffff_ffff_ffff;
    (0..blocks)
        .map(|i| format!("{attempt:012x}{i:06x}").into_bytes())
        .collect()
}

/// 48 random bits per copy attempt (std's randomly keyed SipHash over a counter and the clock):
/// uniqueness among the few copies of one blob that can overlap, not secrecy.
fn attempt_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
}

#[async_trait]
impl CopyEngine for DirectCopy {
    fn name(&self) -> &'static str {
        "direct"
    }

    fn optimistic_writes(&self) -> bool {
        true
    }

    fn copies_live_source(&self) -> bool {
        true
    }

    async fn copy(&self, job: &CopyJob) -> Result<CopyOutcome, CopyError> {
        let condition = match &job.expected_target {
            Some(e) => TargetCondition::Matches(e.clone()),
            None => TargetCondition::Absent,
        };
        let etag = server_side_copy(
            &CopyFrom {
                store: &self.source,
                keys: &self.keys,
                container: &job.source_container,
                blob: &job.source_blob,
                snapshot: job.source_snapshot.as_deref(),
                if_match: job.snapshot_etag.clone(),
                content_length: job.content_length,
                content_type: job.content_type.as_deref(),
            },
            &CopyTo {
                store: &self.backup,
                container: &job.target_container,
                blob: &job.target_blob,
                condition,
                metadata: &job.metadata,
            },
            &self.blocks(),
        )
        .await
        .map_err(classify)?;
        Ok(CopyOutcome::Copied {
            target_etag: Some(etag),
        })
    }
}

fn classify(e: StorageError) -> CopyError {
    match &e {
        // The backup container vanished after this process created it: retry re-creates it.
        StorageError::NotFound { code, .. } if code == "ContainerNotFound" => {
            CopyError::Retryable(e.to_string())
        }
        StorageError::NotFound { code, .. }
            if code == "BlobNotFound" || code == "CannotVerifyCopySource" =>
        {
            CopyError::SourceGone(e.to_string())
        }
        // 412 / 409: another worker wrote the backup meanwhile (or a hint was wrong); the worker
        // looks again and re-evaluates.
        StorageError::PreconditionFailed { .. } | StorageError::Conflict { .. } => {
            CopyError::TargetChanged(e.to_string())
        }
        StorageError::Retryable { .. } => CopyError::Retryable(e.to_string()),
        _ => CopyError::Permanent(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_ids_have_one_length_and_differ_per_attempt() {
        let a = block_ids(attempt_id(), 50_000);
        let b = block_ids(attempt_id(), 3);
        assert!(a.iter().chain(&b).all(|id| id.len() == 18));
        assert_eq!(a.len(), 50_000);
        assert_eq!(
            a.iter().collect::<std::collections::HashSet<_>>().len(),
            50_000
        );
        assert!(b.iter().all(|id| !a.contains(id)));
        assert_eq!(block_ids(0xabc, 2)[1], b"000000000abc000001".to_vec());
    }
}
