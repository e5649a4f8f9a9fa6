//! The application context: settings plus the clients built from them, once per process and
//! shared by the handler and the CLI.

use std::sync::Arc;

use crate::copy::CopyEngine;
use crate::settings::{CopyEngineKind, Settings};
use crate::storage::sas::DelegationKeyCache;
use crate::storage::{BackupQueue, BlobStore, Clients, StorageError};

#[derive(Clone)]
pub struct App {
    pub settings: Arc<Settings>,
    pub clients: Clients,
    pub source: BlobStore,
    pub backup: BlobStore,
    pub queue: BackupQueue,
    /// User-delegation key of the source account (managed identity copy sources).
    pub source_keys: DelegationKeyCache,
    pub engine: Arc<dyn CopyEngine>,
}

impl App {
    pub fn new(settings: Settings) -> Result<Self, StorageError> {
        let clients = Clients::new(&settings)?;
        let source = clients.blob_store(&settings.source)?;
        let backup = clients.blob_store(&settings.backup)?;
        let queue = clients.backup_queue(&settings.jobs, &settings.backup_queue)?;
        let source_keys = DelegationKeyCache::default();
        let engine: Arc<dyn CopyEngine> = match settings.copy_engine {
            CopyEngineKind::Direct => Arc::new(crate::copy::direct::DirectCopy::new(
                source.clone(),
                backup.clone(),
                source_keys.clone(),
                settings.concurrency,
            )),
            CopyEngineKind::DataFactory => crate::copy::datafactory_engine(&settings, &clients)?,
        };
        Ok(App { settings: Arc::new(settings), clients, source, backup, queue, source_keys, engine })
    }
}
