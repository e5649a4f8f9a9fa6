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
    queue_ready: Arc<tokio::sync::OnceCell<()>>,
    /// Backup containers this process created or saw: Create Container once, not per message.
    backup_containers: Arc<tokio::sync::Mutex<std::collections::HashSet<String>>>,
    /// Set only when a producer and a drain share this process (`--drain`): the producer runs
    /// at most this many requests ahead of the worker. A deeper queue gains nothing (the worker
    /// is the bottleneck then) and makes every queue operation dearer (on the emulator each one
    /// scans the queue).
    backlog: Option<Arc<tokio::sync::Semaphore>>,
    /// Set only for `reconcile --drain`: requests for live versions go straight to the drain in
    /// this process instead of through the queue ([`App::hand_off`]).
    handoff: Option<Arc<Handoff>>,
}

/// The in-process path from reconcile to the drain beside it.
#[derive(Default)]
struct Handoff {
    tx: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedSender<String>>>,
    rx: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<String>>>,
}

impl App {
    pub fn new(settings: Settings) -> Result<Self, StorageError> {
        let clients = Clients::new(&settings)?;
        let source = clients.blob_store(&settings.source)?;
        let backup = clients.blob_store(&settings.backup)?;
        let queue = clients.backup_queue(&settings.jobs, &settings.backup_queue)?;
        let source_keys = DelegationKeyCache::default();
        let engine: Arc<dyn CopyEngine> = match settings.copy_engine {
            CopyEngineKind::Direct => Arc::new(
                crate::copy::direct::DirectCopy::new(
                    source.clone(),
                    backup.clone(),
                    source_keys.clone(),
                    settings.concurrency,
                )
                .with_blocks(settings.copy_block_threshold, settings.copy_block_size),
            ),
            CopyEngineKind::DataFactory => crate::copy::datafactory_engine(&settings, &clients)?,
        };
        Ok(App {
            settings: Arc::new(settings),
            clients,
            source,
            backup,
            queue,
            source_keys,
            engine,
            queue_ready: Default::default(),
            backup_containers: Default::default(),
            backlog: None,
            handoff: None,
        })
    }

    /// This app with a backlog limit (see the field); for a producer drained in the same process.
    pub fn with_backlog_limit(mut self, requests: usize) -> Self {
        self.backlog = Some(Arc::new(tokio::sync::Semaphore::new(requests.max(1))));
        self
    }

    /// This app with an in-process handoff for live-version requests; for `reconcile --drain`.
    ///
    /// Such a request carries no pending marker and is derived from the two listings alone, so if
    /// this process dies before the copy, the next reconcile derives it again: nothing is lost,
    /// and the queue round trip (send, receive, delete) would buy nothing. A request that fails
    /// here is put on the queue (see `ops::backup`), where retries and the poison queue apply.
    pub fn with_handoff(mut self) -> Self {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.handoff = Some(Arc::new(Handoff {
            tx: std::sync::Mutex::new(Some(tx)),
            rx: std::sync::Mutex::new(Some(rx)),
        }));
        self
    }

    /// Gives a request to the drain in this process; `Err` hands the text back (no handoff, or
    /// the drain is gone): queue it instead. Bounded by the backlog like a queued request.
    pub fn hand_off(&self, text: String) -> Result<(), String> {
        let Some(h) = &self.handoff else {
            return Err(text);
        };
        match h.tx.lock().expect("poisoned").as_ref() {
            Some(tx) => tx.send(text).map_err(|e| e.0),
            None => Err(text),
        }
    }

    /// The receiving end, for the drain (once).
    pub(crate) fn take_handoff(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<String>> {
        self.handoff
            .as_ref()
            .and_then(|h| h.rx.lock().expect("poisoned").take())
    }

    /// The producer is done: no more handoffs (the drain's stream of them ends).
    pub(crate) fn close_handoff(&self) {
        if let Some(h) = &self.handoff {
            h.tx.lock().expect("poisoned").take();
        }
    }

    /// Waits for room in the backlog before a request is enqueued (no-op without a limit).
    pub async fn backlog_reserve(&self) {
        if let Some(gate) = &self.backlog {
            // Closed (the drain ended): no limit any more.
            if let Ok(permit) = gate.acquire().await {
                permit.forget();
            }
        }
    }

    /// A request left the backlog (processed, or never enqueued after all).
    pub fn backlog_release(&self) {
        if let Some(gate) = &self.backlog {
            gate.add_permits(1);
        }
    }

    /// The drain is over: a producer must never wait for it again.
    pub fn backlog_close(&self) {
        if let Some(gate) = &self.backlog {
            gate.close();
        }
    }

    /// Creates the backup container unless this process already knows it exists.
    pub async fn ensure_backup_container(&self, container: &str) -> Result<(), StorageError> {
        // Held across the create: the first messages of a batch arrive together, and one Create
        // Container is enough for all of them.
        let mut known = self.backup_containers.lock().await;
        if known.contains(container) {
            return Ok(());
        }
        self.backup.ensure_container(container).await?;
        known.insert(container.to_owned());
        Ok(())
    }

    /// Forgets a backup container (after a failed copy: it may have been deleted meanwhile).
    pub async fn forget_backup_container(&self, container: &str) {
        self.backup_containers.lock().await.remove(container);
    }

    /// How long a `lakeguard_requested_at` marker counts as a queued request.
    ///
    /// A marker cannot tell "queued" from "copied, and then the backup was lost". But when the
    /// backup queue holds no message at all (its approximate count includes invisible, in-flight
    /// messages, and is never lower than the truth), nothing can be pending, so markers count for
    /// nothing and lost backups are re-requested at once instead of after the TTL. One queue
    /// properties call per run; any doubt (an error other than a missing queue) keeps the TTL.
    pub async fn pending_ttl(&self) -> std::time::Duration {
        match self.queue.approximate_count().await {
            Ok(0) => std::time::Duration::ZERO,
            Err(e) if e.is_not_found() => std::time::Duration::ZERO,
            _ => self.settings.pending_ttl,
        }
    }

    /// Creates the backup queue (and its poison queue) once per process: the first producer run
    /// on a fresh account must not fail for want of a queue.
    pub async fn ensure_queue(&self) -> Result<(), StorageError> {
        self.queue_ready
            .get_or_try_init(|| self.queue.ensure_exists())
            .await
            .map(|_| ())
    }
}
