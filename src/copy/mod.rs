//! Copy engines: how one exact source version (a snapshot) becomes a blob in the backup account.
//!
//! The worker decides *whether* to copy (idempotency, staleness, keeping the previous backup
//! version); an engine only performs the copy it is given and reports how it went.

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::model::Etag;

/// One copy to perform: exactly `source_snapshot` of the source blob into the backup account.
#[derive(Clone, Debug)]
pub struct CopyJob {
    pub source_container: String,
    pub source_blob: String,
    /// Snapshot id of the version to copy; engines never read the live base blob.
    pub source_snapshot: String,
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
    _settings: &crate::settings::Settings,
    _clients: &crate::storage::Clients,
) -> Result<std::sync::Arc<dyn CopyEngine>, crate::storage::StorageError> {
    Err(crate::storage::StorageError::Permanent {
        what: "LAKEGUARD_COPY_ENGINE=datafactory".into(),
        detail: "the Data Factory engine is not wired in yet".into(),
    })
}

#[async_trait]
pub trait CopyEngine: Send + Sync {
    fn name(&self) -> &'static str;
    async fn copy(&self, job: &CopyJob) -> Result<CopyOutcome, CopyError>;
}
