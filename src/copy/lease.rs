//! Lease mode (the design's `USING_BLOB_LEASE`), done right: the lease is taken before the copy,
//! renewed while it runs, and released when it ends, success or failure. (The reference released
//! it as soon as the run started and held it only when the run failed to start.)

use std::future::Future;
use std::time::Duration;

use tracing::{info, warn};

use crate::model::Etag;
use crate::storage::{BlobStore, StorageError};

/// Lease length; renewed at a third of it.
const LEASE_SECS: i32 = 30;

/// Runs `work` while holding a lease on the live source blob, taken only if the blob still has
/// `etag` (otherwise the live blob no longer is this version, nothing to protect, and `work`
/// runs without a lease: it copies from the immutable snapshot anyway).
pub async fn with_source_lease<T, F>(store: &BlobStore, container: &str, blob: &str, etag: &Etag, work: F) -> Result<T, StorageError>
where
    F: Future<Output = T>,
{
    let lease_id = match store.acquire_lease(container, blob, LEASE_SECS, Some(etag)).await {
        Ok(id) => id,
        Err(e) if e.is_precondition_failed() || e.is_not_found() => {
            info!(blob, "live blob is no longer this version; copying the snapshot without a lease");
            return Ok(work.await);
        }
        Err(e) => return Err(e),
    };
    let renew = async {
        loop {
            tokio::time::sleep(Duration::from_secs((LEASE_SECS / 3) as u64)).await;
            if let Err(e) = store.renew_lease(container, blob, &lease_id).await {
                warn!(blob, error = %e, "lease renewal failed");
            }
        }
    };
    let out = tokio::select! {
        out = work => out,
        _ = renew => unreachable!("the renew loop never ends"),
    };
    if let Err(e) = store.release_lease(container, blob, &lease_id).await {
        // It expires by itself within LEASE_SECS; say so rather than fail the copy.
        warn!(blob, error = %e, "lease release failed; it expires in {LEASE_SECS}s");
    }
    Ok(out)
}
