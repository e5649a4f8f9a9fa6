//! Operations: the pure core's plans carried out against storage. Each one is used by both the
//! custom handler and the CLI.

pub mod backup;
pub mod demo;
pub mod event;
pub mod history_stream;
pub mod prune;
pub mod reconcile;
pub mod restore;
pub mod security;
pub mod snapshot;
pub mod state;
pub mod usage;
pub mod verify;
pub mod watermark;

use std::sync::Arc;

/// Progress reporting: a progress bar on a terminal, nothing in the handler.
pub trait Progress: Send + Sync {
    fn add_total(&self, _n: u64) {}
    fn inc(&self, _n: u64) {}
    fn message(&self, _msg: &str) {}
}

pub struct NoProgress;
impl Progress for NoProgress {}

pub fn no_progress() -> Arc<dyn Progress> {
    Arc::new(NoProgress)
}

/// Errors of an operation as a whole (per-blob failures are counted in reports instead).
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// Bad input from the caller: HTTP 400, exit code 2.
    #[error("{0}")]
    InvalidInput(String),
    /// The named container does not exist: HTTP 404.
    #[error("container `{0}` does not exist")]
    ContainerNotFound(String),
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
}

/// Keeps at most this many per-blob failures in a report; the counts stay exact.
pub const MAX_REPORTED_FAILURES: usize = 50;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct BlobFailure {
    pub blob: String,
    pub error: String,
}
