//! Copy engines: how one exact source version (a snapshot, or the live blob while its ETag is
//! the version's) becomes a blob in the backup account.
//!
//! The worker decides *whether* to copy (idempotency, staleness, keeping the previous backup
//! version); an engine only performs the copy it is given and reports how it went.

pub mod datafactory;

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::model::Etag;

/// One copy to perform: exactly one version of the source blob into the backup account.
#[derive(Clone, Debug)]
pub struct CopyJob {
    pub source_container: String,
    pub source_blob: String,
    /// Snapshot id of the version to copy. `None` = the live base blob, read only under
    /// `source-if-match` = `snapshot_etag` (= the version's ETag), so a blob that changed fails the
    /// copy instead of being backed up under the wrong version. Only engines whose
    /// [`CopyEngine::copies_live_source`] is true are given such a job.
    pub source_snapshot: Option<String>,
    /// ETag of the version (the snapshot's base ETag at snapshot time).
    pub source_etag: Etag,
    /// The snapshot's own ETag as read by the worker: the copy's `source-if-match`.
    pub snapshot_etag: Option<Etag>,
    pub target_container: String,
    pub target_blob: String,
    pub content_type: Option<String>,
    pub content_length: u64,
    /// The backup blob's ETag the worker saw (and preserved as a backup snapshot) before this
    /// copy; `None` = the target must not exist. The write is conditional on it.
    pub expected_target: Option<Etag>,
    /// Complete metadata of the backup blob: the source's user metadata plus the `lakeguard_*` keys.
    pub metadata: BTreeMap<String, String>,
    /// Delivery attempt of the request (the host's DequeueCount; 1 = first delivery). Above 1 a
    /// previous attempt may already have started work that must not be started twice.
    pub attempt: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CopyOutcome {
    /// The target now holds the version; `target_etag` is the backup blob's new ETag when known.
    Copied { target_etag: Option<Etag> },
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The requested version no longer exists (snapshot deleted): nothing can ever copy it.
    #[error("source version is gone: {0}")]
    SourceGone(String),
    /// The target was not as expected (412 on its condition, or 409 because it exists): another
    /// writer got there first, or the caller's expectation came from a hint. Retry after a look.
    #[error("backup target changed: {0}")]
    TargetChanged(String),
    /// Worth another attempt later (throttling, 5xx, timeouts, a run that failed transiently).
    #[error("{0}")]
    Retryable(String),
    /// Will fail the same way every time (bad configuration, authorisation, invalid request).
    #[error("{0}")]
    Permanent(String),
}

pub mod direct;
pub mod lease;

/// Builds the Data Factory engine from settings.
pub fn datafactory_engine(
    settings: &crate::settings::Settings,
    clients: &crate::storage::Clients,
) -> Result<std::sync::Arc<dyn CopyEngine>, crate::storage::StorageError> {
    datafactory::from_settings(settings, clients)
}

#[async_trait]
pub trait CopyEngine: Send + Sync {
    fn name(&self) -> &'static str;
    /// Whether a conditional write that fails costs only one request (not a pipeline run): then
    /// the worker may write optimistically on a hint and look only if the condition fails.
    fn optimistic_writes(&self) -> bool {
        false
    }
    /// Whether the engine can copy the live base blob under a source ETag condition (a job with
    /// `source_snapshot: None`). The Data Factory pipeline copies snapshots only.
    fn copies_live_source(&self) -> bool {
        false
    }
    async fn copy(&self, job: &CopyJob) -> Result<CopyOutcome, CopyError>;
}
