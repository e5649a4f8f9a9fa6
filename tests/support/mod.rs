//! Shared integration-test harness (every `tests/*.rs` file does `mod support;`).
//!
//! Real components only: a real Azurite per test (`azurite`), a managed-identity endpoint
//! stand-in (`identity`), the real `lakeguard` binary (`handler`), the Functions host's exact
//! wire protocol (`host`), a request-counting proxy (`counting_proxy`) and a raw REST oracle
//! (`rest`) that checks results independently of lakeguard's own storage code.
//! Every test gets its own processes and unique names, so tests run in parallel safely.
//!
//! Not every test file uses every item, hence the blanket `allow`s.
#![allow(dead_code, unused_imports)]

pub mod app;
pub mod azurite;
pub mod certs;
pub mod counting_proxy;
pub mod fault_proxy;
pub mod handler;
pub mod hns;
pub mod host;
pub mod identity;
pub mod rest;

use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

pub use app::app;
pub use azurite::{
    free_port, AccessLogEntry, Azurite, Mode, Persistence, Stop, BACKUP_ACCOUNT, BACKUP_KEY,
    DEV_ACCOUNT, DEV_KEY,
};
pub use certs::TestPki;
pub use counting_proxy::CountingProxy;
pub use fault_proxy::FaultProxy;
pub use handler::{assert_free_of, run_cli, Handler};
pub use host::{QueueAccess, QueueTrigger};
pub use identity::IdentityServer;
pub use rest::{Auth, StorageRest};

/// A fresh pseudo-random u64 (std's randomly keyed SipHash over a counter; enough for names).
pub fn random_u64() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(N.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish()
}

/// 12 lowercase hex characters.
pub fn unique_suffix() -> String {
    format!("{:012x}", random_u64() & 0xffff_ffff_ffff)
}

/// A name valid for a container or a queue (lowercase letters, digits, single hyphens, 3-63
/// characters) and unique per call: `<prefix>-<12 hex>`. The prefix is cut to leave room for a
/// `-poison` suffix.
pub fn unique_name(prefix: &str) -> String {
    let clean: String = prefix
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let mut clean = clean
        .split('-')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    clean.truncate(30);
    let clean = clean.trim_end_matches('-');
    if clean.is_empty() {
        format!("t{}", unique_suffix())
    } else {
        format!("{clean}-{}", unique_suffix())
    }
}

/// An axum app served on `127.0.0.1:<free port>` from a dedicated thread with its own Tokio
/// runtime: it keeps answering while a test blocks its own thread (e.g. waiting for a child
/// process that calls it), and it works under any test runtime flavour. Stops on drop.
pub struct BackgroundServer {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl BackgroundServer {
    pub fn start(app: axum::Router) -> BackgroundServer {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("test-server".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                        .await
                        .expect("bind 127.0.0.1:0");
                    addr_tx.send(listener.local_addr().unwrap()).unwrap();
                    tokio::select! {
                        r = axum::serve(listener, app) => r.expect("serve"),
                        _ = shutdown_rx => {}
                    }
                });
                // Dropping the runtime here cancels every connection task.
                rt.shutdown_background();
            })
            .expect("spawn server thread");
        let addr = addr_rx.recv().expect("server address");
        BackgroundServer {
            addr,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for BackgroundServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Everything a lakeguard test needs: Azurite (+ the identity stand-in in `OAuthHttps`), a unique
/// backup queue name, and the Settings environment for the mode.
pub struct Stack {
    pub azurite: Azurite,
    pub identity: Option<IdentityServer>,
    /// `LAKEGUARD_BACKUP_QUEUE` (unique per stack; created by lakeguard or by the test).
    pub queue: String,
}

impl Stack {
    pub async fn start(mode: Mode) -> Stack {
        Self::start_with(mode, Persistence::Memory).await
    }

    /// `start` with Azurite's data in memory or on disk (`Persistence::Disk`: restartable).
    pub async fn start_with(mode: Mode, persistence: Persistence) -> Stack {
        let identity = match mode {
            Mode::OAuthHttps => Some(IdentityServer::start()),
            Mode::SharedKeyHttp => None,
        };
        let azurite = Azurite::start_with(mode, persistence).await;
        Stack {
            azurite,
            identity,
            queue: unique_name("backup"),
        }
    }

    pub fn mode(&self) -> Mode {
        self.azurite.mode()
    }

    /// The lakeguard Settings for this stack (names: docs/architecture.md).
    ///
    /// `SharedKeyHttp`: `SourceStorage`, `BackupStorage`, `AzureWebJobsStorage` as connection strings.
    /// `OAuthHttps`: the identity-based form (`X__blobServiceUri`, `X__queueServiceUri`,
    /// `X__accountName`; the account name is needed because path-style emulator URLs do not carry
    /// it in the host name), `IDENTITY_ENDPOINT`/`IDENTITY_HEADER` for ManagedIdentityCredential
    /// and `LAKEGUARD_CA_CERT` for the test CA. Always: `LAKEGUARD_MAX_RETRIES=1` (errors surface
    /// fast), the unique queue and debug logs.
    pub fn env(&self) -> Vec<(String, String)> {
        let az = &self.azurite;
        let mut env: Vec<(String, String)> = Vec::new();
        let mut set = |k: &str, v: String| env.push((k.to_string(), v));
        match self.mode() {
            Mode::SharedKeyHttp => {
                set("SourceStorage", az.connection_string(DEV_ACCOUNT));
                set("BackupStorage", az.connection_string(BACKUP_ACCOUNT));
                set("AzureWebJobsStorage", az.connection_string(DEV_ACCOUNT));
            }
            Mode::OAuthHttps => {
                let id = self.identity.as_ref().expect("identity server");
                set(
                    "SourceStorage__blobServiceUri",
                    az.blob_endpoint(DEV_ACCOUNT),
                );
                set(
                    "SourceStorage__queueServiceUri",
                    az.queue_endpoint(DEV_ACCOUNT),
                );
                set("SourceStorage__accountName", DEV_ACCOUNT.to_string());
                set(
                    "BackupStorage__blobServiceUri",
                    az.blob_endpoint(BACKUP_ACCOUNT),
                );
                set("BackupStorage__accountName", BACKUP_ACCOUNT.to_string());
                set(
                    "AzureWebJobsStorage__queueServiceUri",
                    az.queue_endpoint(DEV_ACCOUNT),
                );
                set("AzureWebJobsStorage__accountName", DEV_ACCOUNT.to_string());
                set("IDENTITY_ENDPOINT", id.endpoint());
                set("IDENTITY_HEADER", id.header_secret());
                set(
                    "LAKEGUARD_CA_CERT",
                    az.ca_cert_path()
                        .expect("CA")
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
        set("LAKEGUARD_MAX_RETRIES", "1".to_string());
        set("LAKEGUARD_BACKUP_QUEUE", self.queue.clone());
        set("LAKEGUARD_LOG", "debug".to_string());
        env
    }

    /// `env()` with some variables replaced or added (an empty value removes the variable).
    pub fn env_with(&self, overrides: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self
            .env()
            .into_iter()
            .filter(|(k, _)| !overrides.iter().any(|(o, _)| o == k))
            .collect();
        env.extend(
            overrides
                .iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        env
    }

    /// `env()` with both accounts' blob traffic routed through `proxy` (which must front this
    /// stack's blob port), so a test can count every blob request lakeguard makes. Shared Key
    /// only: the proxy speaks plain HTTP.
    pub fn env_via_proxy(&self, proxy: &CountingProxy) -> Vec<(String, String)> {
        assert_eq!(
            self.mode(),
            Mode::SharedKeyHttp,
            "the counting proxy is plain HTTP; in OAuthHttps count with Azurite's access log"
        );
        let az = &self.azurite;
        let source = az.connection_string_via(DEV_ACCOUNT, &proxy.endpoint(DEV_ACCOUNT));
        let backup = az.connection_string_via(BACKUP_ACCOUNT, &proxy.endpoint(BACKUP_ACCOUNT));
        self.env_with(&[("SourceStorage", &source), ("BackupStorage", &backup)])
    }

    /// `env()` with every blob and queue request of all three connections routed through
    /// `proxy` (which must front this stack's Azurite). Shared Key only.
    pub fn env_via_fault_proxy(&self, proxy: &FaultProxy) -> Vec<(String, String)> {
        assert_eq!(
            self.mode(),
            Mode::SharedKeyHttp,
            "the fault proxy is plain HTTP"
        );
        let cs = |account: &str| {
            format!(
                "DefaultEndpointsProtocol=http;AccountName={account};AccountKey={};BlobEndpoint={};QueueEndpoint={};",
                self.azurite.account_key(account),
                proxy.blob_endpoint(account),
                proxy.queue_endpoint(account),
            )
        };
        let (source, backup) = (cs(DEV_ACCOUNT), cs(BACKUP_ACCOUNT));
        self.env_with(&[
            ("SourceStorage", &source),
            ("BackupStorage", &backup),
            ("AzureWebJobsStorage", &source),
        ])
    }

    /// A fault proxy in front of this stack's blob and queue services (faults off until
    /// `set_rates`).
    pub fn fault_proxy(&self, seed: u64) -> FaultProxy {
        FaultProxy::start(
            self.azurite.blob_port(),
            self.azurite.queue_port(),
            self.queues(),
            seed,
        )
    }

    /// A counting proxy in front of this stack's blob service.
    pub fn blob_proxy(&self) -> CountingProxy {
        CountingProxy::start(self.azurite.blob_port())
    }

    /// `lakeguard serve` with `env()`.
    pub async fn handler(&self) -> Handler {
        Handler::spawn(&self.env()).await
    }

    /// Raw oracle on the source account's blobs (Shared Key, works in both modes).
    pub fn source(&self) -> StorageRest {
        self.azurite.blob_rest(DEV_ACCOUNT)
    }

    /// Raw oracle on the backup account's blobs.
    pub fn backup(&self) -> StorageRest {
        self.azurite.blob_rest(BACKUP_ACCOUNT)
    }

    /// Raw oracle on the queue account (`devstoreaccount1`).
    pub fn queues(&self) -> StorageRest {
        self.azurite.queue_rest(DEV_ACCOUNT)
    }

    /// Every secret lakeguard was given or obtained: account keys, the identity header and all
    /// issued tokens. Check logs with `assert_free_of(logs, &stack.secrets())`.
    pub fn secrets(&self) -> Vec<String> {
        let mut s = vec![DEV_KEY.to_string(), BACKUP_KEY.to_string()];
        if let Some(id) = &self.identity {
            s.push(id.header_secret());
            s.extend(id.issued_tokens());
        }
        s
    }

    /// Asserts that no secret (see `secrets`) nor any SAS signature (`sig=`) is in `logs`.
    pub fn assert_no_secrets_in(&self, logs: &str) {
        let secrets = self.secrets();
        let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
        assert_free_of(logs, &refs);
        for (i, _) in logs.match_indices("sig=") {
            let value: String = logs[i + 4..]
                .chars()
                .take_while(|c| !c.is_whitespace() && *c != '&' && *c != '"')
                .collect();
            // A real signature is base64 of 32 bytes (44+ characters); a redaction is short or
            // says so.
            assert!(
                value.len() < 40 || value.to_ascii_lowercase().contains("redact"),
                "a SAS signature appears in the logs (sig={}...)",
                value.chars().take(3).collect::<String>()
            );
        }
    }

    /// The BackupWorker queue trigger for a handler on `port`, reading this stack's queue.
    pub fn trigger<'a>(&'a self, access: &'a StorageRest, port: u16) -> QueueTrigger<'a> {
        QueueTrigger::backup_worker(access, port, &self.queue)
    }
}
