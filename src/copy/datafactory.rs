//! The `datafactory` copy engine: one Data Factory pipeline run per copy, through the ARM REST API.
//!
//! The engine starts the shipped pipeline `lakeguard-backup-copy` (folder `datafactory/`, see its
//! README for why a Web activity), whose Web activity does a server-side Put Blob From URL from the
//! source **snapshot** into the backup blob with `x-ms-source-if-match` and a condition on the
//! backup blob (`If-Match` the version the worker kept, or `If-None-Match: *`), then waits for the
//! run's outcome. What it guarantees:
//!
//! * **The run's outcome decides.** `Succeeded` is the only success; `Failed`/`Cancelled` become
//!   [`CopyError::Retryable`] carrying the run's own message, so the worker retries and finally
//!   poisons the request *with that message*. (The reference implementation inverted the
//!   createRun status check, ignored the runId and never looked at the outcome.)
//! * **Never two runs for one version.** A redelivered request (`attempt > 1`) first looks for a
//!   run of this pipeline whose parameters name the same snapshot and target: an active run is
//!   polled instead of starting another, a succeeded one is the answer. A createRun whose answer
//!   was lost (timeout, 5xx) is checked the same way before it is sent again, because ARM may have
//!   accepted it.
//! * **Throttling is honoured.** 408, 429 and 5xx are retried a bounded number of times, waiting
//!   `Retry-After` (seconds or HTTP date) when the service sends it; a wait longer than the budget
//!   gives up with a retryable error instead of blocking the invocation.
//! * **The backup gets its metadata from the engine**, after the run succeeded: Put Blob From URL
//!   in a Web activity cannot set metadata whose names are only known at run time, so the pipeline
//!   writes a marker (`lakeguard_copy_run` = runId) and the engine then replaces the metadata
//!   with the job's, `If-Match` on the ETag of the blob that carries *its* run's marker. A backup
//!   overwritten meanwhile is never stamped with this version's metadata.
//! * **The source is read with a SAS for that one snapshot**, read only, short-lived
//!   ([`crate::storage::sas::read_sas`]: a user-delegation SAS with managed identity), passed as the
//!   SecureString parameter `sourceSas` and appended to `x-ms-copy-source` by the pipeline. The
//!   function's own storage token never leaves the process: a leaked run parameter reads one
//!   version for minutes, not every account the identity can reach for an hour.
//! * **The empty answer of Put Blob From URL is tolerated.** Data Factory documents that a Web
//!   activity's endpoint must answer JSON; Put Blob From URL answers `201` with no body. Observed
//!   factories accept that (output `Response: ""`), but should one fail the activity after the
//!   write, the run fails although the copy landed: the engine then reads the backup, and a blob
//!   carrying *this run's* marker with the version's length is the version (Put Blob From URL is
//!   atomic and was conditional on the snapshot's ETag), so the copy counts as done.
//! * **Tokens come from one credential** (azure_identity caches per scope), never one per message,
//!   and never reach a log: tracing fields are runId, container, blob and ETag only, and a run's
//!   message is passed on with any SAS signature (`sig=`) redacted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use azure_core::credentials::TokenCredential;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use time::OffsetDateTime;
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};
use url::Url;

use super::{CopyEngine, CopyError, CopyJob, CopyOutcome};
use crate::model::{metadata, Etag};
use crate::settings::Settings;
use crate::storage::blob::BlobStore;
use crate::storage::sas::{self, DelegationKeyCache};
use crate::storage::{Clients, StorageError};

/// Data Factory REST API version of every call (Pipelines - Create Run, Pipeline Runs - Get,
/// Pipeline Runs - Query By Factory).
pub const API_VERSION: &str = "2018-06-01";
/// Token scope for Azure Resource Manager.
pub const ARM_SCOPE: &str = "https://management.azure.com/.default";
/// Name of the shipped pipeline (`datafactory/pipeline/lakeguard-backup-copy.json`).
pub const DEFAULT_PIPELINE: &str = "lakeguard-backup-copy";
/// Metadata marker the pipeline's copy activity writes on the backup blob: the runId.
pub const RUN_MARKER: &str = "lakeguard_copy_run";
/// Put Blob From URL accepts sources up to 5000 MiB; bigger blobs need the `direct` engine
/// (Put Block From URL in blocks), which this pipeline does not do.
pub const MAX_COPY_BYTES: u64 = 5000 * 1024 * 1024;

/// What the engine reads of a backup blob after a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupBlobInfo {
    pub etag: Etag,
    /// Keys lower-cased.
    pub metadata: BTreeMap<String, String>,
    pub content_length: u64,
}

/// The backup account as the engine needs it after a run: read the blob the run wrote and stamp
/// its metadata. Implemented for [`BlobStore`]; tests supply their own.
#[async_trait]
pub trait BackupBlobs: Send + Sync + std::fmt::Debug {
    /// A backup blob's ETag, metadata and length; `Ok(None)` only for a real 404.
    async fn head(&self, container: &str, blob: &str) -> Result<Option<BackupBlobInfo>, CopyError>;
    /// Replaces the metadata, only while the blob still has `if_match`.
    async fn set_metadata(
        &self,
        container: &str,
        blob: &str,
        metadata: &BTreeMap<String, String>,
        if_match: &Etag,
    ) -> Result<(), CopyError>;
}

fn storage_error(e: StorageError) -> CopyError {
    match e {
        // 412: the backup changed after the run wrote it; the worker re-evaluates on retry.
        StorageError::PreconditionFailed { .. }
        | StorageError::Conflict { .. }
        | StorageError::Retryable { .. }
        | StorageError::NotFound { .. } => CopyError::Retryable(e.to_string()),
        StorageError::Permanent { .. } => CopyError::Permanent(e.to_string()),
    }
}

#[async_trait]
impl BackupBlobs for BlobStore {
    async fn head(&self, container: &str, blob: &str) -> Result<Option<BackupBlobInfo>, CopyError> {
        match self.properties(container, blob, None).await {
            Ok(p) => Ok(Some(BackupBlobInfo {
                etag: p.etag,
                metadata: p.metadata,
                content_length: p.content_length,
            })),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(storage_error(e)),
        }
    }

    async fn set_metadata(
        &self,
        container: &str,
        blob: &str,
        metadata: &BTreeMap<String, String>,
        if_match: &Etag,
    ) -> Result<(), CopyError> {
        BlobStore::set_metadata(self, container, blob, metadata, if_match)
            .await
            .map_err(storage_error)
    }
}

/// Read access to the source for one run: a SAS query string (no leading `?`) that reads exactly
/// one snapshot. Implemented by [`SourceSnapshotSas`]; tests supply their own.
#[async_trait]
pub trait SourceAuthorizer: Send + Sync + std::fmt::Debug {
    /// Never log the result.
    async fn snapshot_sas(
        &self,
        container: &str,
        blob: &str,
        snapshot: &str,
        valid_for: time::Duration,
    ) -> Result<String, CopyError>;
}

/// [`SourceAuthorizer`] of the source account: [`sas::read_sas`], so a user-delegation SAS
/// (`sr=bs`, `sp=r`) signed with a key of the function's managed identity, or a service SAS with
/// an account key; at most [`sas::MAX_LIFETIME`] in all.
pub struct SourceSnapshotSas {
    store: BlobStore,
    keys: DelegationKeyCache,
}

impl SourceSnapshotSas {
    pub fn new(store: BlobStore, keys: DelegationKeyCache) -> Self {
        SourceSnapshotSas { store, keys }
    }
}

impl std::fmt::Debug for SourceSnapshotSas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceSnapshotSas")
            .field("account", &self.store.account())
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl SourceAuthorizer for SourceSnapshotSas {
    async fn snapshot_sas(
        &self,
        container: &str,
        blob: &str,
        snapshot: &str,
        valid_for: time::Duration,
    ) -> Result<String, CopyError> {
        sas::read_sas(
            &self.store,
            &self.keys,
            container,
            blob,
            Some(snapshot),
            valid_for,
        )
        .await
        .map_err(|e| match e {
            // Getting a user delegation key can be throttled like any storage call.
            StorageError::Permanent { .. } => CopyError::Permanent(format!("copy-source SAS: {e}")),
            other => CopyError::Retryable(format!("copy-source SAS: {other}")),
        })
    }
}

/// Builds the engine from the settings (`LAKEGUARD_COPY_ENGINE=datafactory`). The ARM token comes
/// from the managed identity of the source connection (system-assigned unless
/// `SourceStorage__clientId`), which needs a role on the factory; the copy-source SAS is signed
/// with that identity's user delegation key of the source account (Storage Blob Data Reader
/// includes `generateUserDelegationKey`), or with the source's account key.
pub fn from_settings(
    settings: &Settings,
    clients: &Clients,
) -> Result<Arc<dyn CopyEngine>, StorageError> {
    let permanent = |detail: String| StorageError::Permanent {
        what: "LAKEGUARD_COPY_ENGINE=datafactory".into(),
        detail,
    };
    let df = settings.datafactory.as_ref().ok_or_else(|| {
        permanent(
            "LAKEGUARD_DATAFACTORY_SUBSCRIPTION_ID, _RESOURCE_GROUP and _NAME are required".into(),
        )
    })?;
    let source = settings
        .source
        .blob_endpoint()
        .map_err(|e| permanent(e.to_string()))?;
    let backup_endpoint = settings
        .backup
        .blob_endpoint()
        .map_err(|e| permanent(e.to_string()))?;
    // ARM tokens come from the source connection's identity (its managed identity, or the
    // operator's Azure CLI login); a key-based source still starts runs as the system identity.
    let arm_credential = match clients.token_credential(&settings.source.credential)? {
        Some(c) => c,
        None => clients.credential(None)?,
    };
    let mut config = DataFactoryConfig::new(
        df.subscription_id.clone(),
        df.resource_group.clone(),
        df.factory_name.clone(),
        source.clone(),
        backup_endpoint.clone(),
    );
    config.arm_endpoint = df.arm_endpoint.clone();
    config.pipeline_name = df.pipeline_name.clone();
    config.max_retries = settings.max_retries;
    Ok(Arc::new(DataFactoryEngine::new(
        config,
        clients.http().clone(),
        arm_credential,
        Arc::new(clients.blob_store(&settings.backup)?),
        Arc::new(SourceSnapshotSas::new(
            clients.blob_store(&settings.source)?,
            DelegationKeyCache::default(),
        )),
    )))
}

/// Where the factory is and how patiently to talk to it. The lead maps `Settings` into this:
/// `LAKEGUARD_ARM_ENDPOINT`, `LAKEGUARD_DATAFACTORY_SUBSCRIPTION_ID`, `_RESOURCE_GROUP`, `_NAME`,
/// `_PIPELINE`, and the blob endpoints of `SourceStorage` / `BackupStorage`.
#[derive(Clone, Debug)]
pub struct DataFactoryConfig {
    /// Azure Resource Manager; `https://management.azure.com` unless a sovereign cloud or a test.
    pub arm_endpoint: Url,
    pub subscription_id: String,
    pub resource_group: String,
    pub factory_name: String,
    pub pipeline_name: String,
    /// Blob endpoint of the source account as the factory must reach it (pipeline parameter
    /// `sourceBlobEndpoint`), e.g. `https://src.blob.core.windows.net`.
    pub source_blob_endpoint: Url,
    /// Blob endpoint of the backup account (pipeline parameter `backupBlobEndpoint`).
    pub backup_blob_endpoint: Url,
    /// Longest pause between two `pipelineruns/{runId}` polls. The first poll comes after
    /// 1 s (or this, if shorter) and the pause doubles up to this: a short copy is seen quickly,
    /// a long one costs few ARM reads (ARM throttles reads per subscription).
    pub poll_interval: Duration,
    /// How long one invocation waits for a run. A run still active after this is left running and
    /// the copy reports Retryable: the redelivered message finds the run and keeps polling it.
    pub run_timeout: Duration,
    /// Retries of one ARM call on 408/429/5xx/timeouts (0 = one attempt only).
    pub max_retries: u32,
    /// First backoff when the service gives no Retry-After; doubles per retry, capped at 30 s.
    pub retry_base_delay: Duration,
    /// Longest single Retry-After the engine is willing to sleep; longer = give up (Retryable).
    pub max_retry_after: Duration,
    /// Timeout of one HTTP request to ARM.
    pub request_timeout: Duration,
    /// How far back a redelivery looks for an earlier run of the same version. Queue messages live
    /// 7 days, so by default so does the search.
    pub run_lookback: Duration,
    /// Validity of the copy-source SAS from createRun on (capped by [`sas::MAX_LIFETIME`], whose
    /// start lies 5 minutes back: at most 25 minutes ahead). Put Blob From URL authorises its
    /// source read when the request starts, so the SAS must last until the Web activity's last
    /// attempt starts (a queued run plus three retries 30 s apart take minutes); a run that
    /// starts its copy later fails with the service's 403, the request is redelivered and the
    /// next delivery starts a new run with a fresh SAS (a failed run is never adopted).
    pub source_sas_lifetime: time::Duration,
}

impl DataFactoryConfig {
    /// A configuration with the documented defaults (public ARM endpoint, pipeline
    /// `lakeguard-backup-copy`, 10 s polls, 4 min per invocation, 4 retries).
    pub fn new(
        subscription_id: impl Into<String>,
        resource_group: impl Into<String>,
        factory_name: impl Into<String>,
        source_blob_endpoint: Url,
        backup_blob_endpoint: Url,
    ) -> Self {
        DataFactoryConfig {
            arm_endpoint: Url::parse("https://management.azure.com").expect("static url"),
            subscription_id: subscription_id.into(),
            resource_group: resource_group.into(),
            factory_name: factory_name.into(),
            pipeline_name: DEFAULT_PIPELINE.to_owned(),
            source_blob_endpoint,
            backup_blob_endpoint,
            poll_interval: Duration::from_secs(10),
            run_timeout: Duration::from_secs(240),
            max_retries: 4,
            retry_base_delay: Duration::from_secs(1),
            max_retry_after: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            run_lookback: Duration::from_secs(7 * 24 * 3600),
            source_sas_lifetime: sas::MAX_LIFETIME,
        }
    }

    /// `.../factories/{factory}` with every segment percent-encoded.
    fn factory_url(&self, tail: &[&str]) -> Url {
        let mut url = self.arm_endpoint.clone();
        {
            let mut segs = url.path_segments_mut().expect("ARM endpoint is a base URL");
            segs.pop_if_empty();
            segs.extend([
                "subscriptions",
                &self.subscription_id,
                "resourceGroups",
                &self.resource_group,
                "providers",
                "Microsoft.DataFactory",
                "factories",
                &self.factory_name,
            ]);
            segs.extend(tail);
        }
        url.query_pairs_mut()
            .append_pair("api-version", API_VERSION);
        url
    }
}

/// Pipeline run status as Data Factory reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunStatus {
    Queued,
    InProgress,
    Canceling,
    Succeeded,
    Failed,
    Cancelled,
    Other(String),
}

impl RunStatus {
    fn parse(s: &str) -> Self {
        match s {
            "Queued" => RunStatus::Queued,
            "InProgress" => RunStatus::InProgress,
            "Canceling" => RunStatus::Canceling,
            "Succeeded" => RunStatus::Succeeded,
            "Failed" => RunStatus::Failed,
            "Cancelled" => RunStatus::Cancelled,
            other => RunStatus::Other(other.to_owned()),
        }
    }

    /// Still running (or about to): must not be started again, must be waited for.
    /// An unknown status is treated as active: starting a second run is the one unsafe choice.
    fn is_active(&self) -> bool {
        !matches!(
            self,
            RunStatus::Succeeded | RunStatus::Failed | RunStatus::Cancelled
        )
    }
}

/// What the engine reads from a pipeline run.
#[derive(Clone, Debug)]
struct RunInfo {
    run_id: String,
    status: RunStatus,
    message: String,
    last_updated: Option<OffsetDateTime>,
}

impl RunInfo {
    fn from_json(v: &Value) -> Option<Self> {
        Some(RunInfo {
            run_id: v.get("runId")?.as_str()?.to_owned(),
            status: RunStatus::parse(v.get("status").and_then(Value::as_str).unwrap_or("")),
            message: v
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
            last_updated: v.get("lastUpdated").and_then(Value::as_str).and_then(|s| {
                OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
            }),
        })
    }
}

/// One answer from ARM that was not a success, classified.
enum CallError {
    /// 408/429/5xx/timeouts: may work later. `ambiguous` = the request may have been processed
    /// (timeouts, transport errors, 5xx), which matters for createRun.
    Transient {
        message: String,
        retry_after: Option<Duration>,
        ambiguous: bool,
    },
    /// Will fail the same way again.
    Permanent { status: StatusCode, message: String },
}

/// The `datafactory` engine. Cheap to share: hold one per process.
#[derive(Debug)]
pub struct DataFactoryEngine {
    config: DataFactoryConfig,
    http: reqwest::Client,
    credential: Arc<dyn TokenCredential>,
    backup: Arc<dyn BackupBlobs>,
    source: Arc<dyn SourceAuthorizer>,
}

impl DataFactoryEngine {
    /// `credential` is the process-wide managed identity credential (production:
    /// `ManagedIdentityCredential`); it caches tokens per scope, so calling it per copy is cheap.
    /// `backup` is the backup account (metadata of the copied blob), `source` signs the
    /// copy-source SAS of each run.
    pub fn new(
        config: DataFactoryConfig,
        http: reqwest::Client,
        credential: Arc<dyn TokenCredential>,
        backup: Arc<dyn BackupBlobs>,
        source: Arc<dyn SourceAuthorizer>,
    ) -> Self {
        DataFactoryEngine {
            config,
            http,
            credential,
            backup,
            source,
        }
    }

    pub fn config(&self) -> &DataFactoryConfig {
        &self.config
    }

    /// The pipeline parameters for `job` (names and types as declared by the shipped pipeline).
    /// `source_sas` is a SecureString parameter: never log the result.
    fn run_parameters(&self, job: &CopyJob, source_sas: &str) -> Value {
        json!({
            "sourceBlobEndpoint": endpoint_str(&self.config.source_blob_endpoint),
            "sourceContainer": job.source_container,
            "sourceBlob": job.source_blob,
            "sourceSnapshot": job.source_snapshot.as_deref().unwrap_or_default(),
            "sourceEtag": job.source_etag.quoted(),
            // The snapshot's own ETag when the worker read it; a snapshot taken by lakeguard
            // carries its base's ETag otherwise.
            "sourceSnapshotEtag": job.snapshot_etag.as_ref().unwrap_or(&job.source_etag).quoted(),
            // A String, compared with the String of Get Metadata's size: Data Factory does not
            // document the width of an `Int` parameter, and a 32-bit one would refuse a blob
            // above 2 GiB (2^31 - 1 bytes) at createRun.
            "sourceContentLength": job.content_length.to_string(),
            "sourceSas": source_sas,
            "backupBlobEndpoint": endpoint_str(&self.config.backup_blob_endpoint),
            "targetContainer": job.target_container,
            "targetBlob": job.target_blob,
            // Empty = the backup blob must not exist (If-None-Match: *).
            "targetIfMatch": job.expected_target.as_ref().map(Etag::quoted).unwrap_or_default(),
        })
    }

    async fn token(&self, scope: &str) -> Result<String, CopyError> {
        match self.credential.get_token(&[scope], None).await {
            Ok(t) => Ok(t.token.secret().to_owned()),
            // The error text of azure_identity names the endpoint and status, never a token.
            Err(e) => Err(CopyError::Retryable(format!(
                "could not get a managed identity token for {scope}: {e}"
            ))),
        }
    }

    /// One HTTP exchange with ARM, classified. Success = 2xx with a JSON body.
    async fn call_once(
        &self,
        method: Method,
        url: &Url,
        body: Option<&Value>,
    ) -> Result<Value, CallError> {
        // Settings refuse such an endpoint at start-up; a config built in code is checked here,
        // before a token is even fetched.
        if url.scheme() != "https" {
            return Err(CallError::Permanent {
                status: StatusCode::BAD_REQUEST,
                message: format!(
                    "refusing to send a bearer token to {} over {} (the ARM endpoint must be https)",
                    url.host_str().unwrap_or("?"),
                    url.scheme()
                ),
            });
        }
        let token = match self.token(ARM_SCOPE).await {
            Ok(t) => t,
            Err(e) => {
                return Err(CallError::Transient {
                    message: e.to_string(),
                    retry_after: None,
                    ambiguous: false,
                })
            }
        };
        let mut req = self
            .http
            .request(method, url.clone())
            .bearer_auth(token)
            .timeout(self.config.request_timeout);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                return Err(CallError::Transient {
                    // reqwest errors carry the URL (no secrets in ours) but never headers.
                    message: format!("request to Data Factory failed: {}", without_url(&e)),
                    retry_after: None,
                    ambiguous: true,
                });
            }
        };
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = match resp.text().await {
            Ok(t) => t,
            Err(e) => {
                return Err(CallError::Transient {
                    message: format!("reading Data Factory's answer failed: {}", without_url(&e)),
                    retry_after: None,
                    ambiguous: true,
                })
            }
        };
        if status.is_success() {
            return serde_json::from_str(&text).map_err(|e| CallError::Transient {
                message: format!(
                    "Data Factory answered {status} with a body that is not JSON: {e}"
                ),
                retry_after: None,
                ambiguous: true,
            });
        }
        let detail = arm_error_detail(&text);
        if status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
            || status.is_server_error()
        {
            return Err(CallError::Transient {
                message: format!("Data Factory answered {status}{detail}"),
                retry_after: retry_after(&headers),
                // A 429 was refused before any work; a 5xx/408 may have been processed.
                ambiguous: status != StatusCode::TOO_MANY_REQUESTS,
            });
        }
        let message = if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            format!(
                "Data Factory refused the request ({status}{detail}): the function app's managed identity needs a role assignment on factory '{}' (resource group '{}') that allows pipelines/createRun and reading pipeline runs, e.g. 'Data Factory Contributor'",
                self.config.factory_name, self.config.resource_group
            )
        } else {
            format!("Data Factory answered {status}{detail}")
        };
        Err(CallError::Permanent { status, message })
    }

    /// Sleeps before retry `attempt` (0-based). Returns false when the wait would exceed the
    /// budget: the caller gives up with a retryable error rather than hold the invocation.
    async fn backoff(
        &self,
        attempt: u32,
        retry_after: Option<Duration>,
        deadline: Option<Instant>,
    ) -> bool {
        let wait = match retry_after {
            Some(d) if d > self.config.max_retry_after => return false,
            Some(d) => d,
            None => {
                let exp = self
                    .config
                    .retry_base_delay
                    .saturating_mul(1u32 << attempt.min(16));
                exp.min(Duration::from_secs(30))
            }
        };
        if let Some(deadline) = deadline {
            if Instant::now() + wait > deadline {
                return false;
            }
        }
        tokio::time::sleep(wait).await;
        true
    }

    /// An idempotent call (GET, or the read-only query POSTs) with bounded retries.
    async fn call(
        &self,
        what: &str,
        method: Method,
        url: &Url,
        body: Option<&Value>,
    ) -> Result<Value, CopyError> {
        self.call_raw(what, method, url, body, None)
            .await
            .map_err(|(_, e)| e)
    }

    /// Like [`Self::call`], also giving the status of a permanent failure; no retry wait ends
    /// after `deadline`.
    async fn call_raw(
        &self,
        what: &str,
        method: Method,
        url: &Url,
        body: Option<&Value>,
        deadline: Option<Instant>,
    ) -> Result<Value, (Option<StatusCode>, CopyError)> {
        let mut attempt = 0;
        loop {
            match self.call_once(method.clone(), url, body).await {
                Ok(v) => return Ok(v),
                Err(CallError::Permanent { status, message }) => {
                    return Err((
                        Some(status),
                        CopyError::Permanent(format!("{what}: {message}")),
                    ))
                }
                Err(CallError::Transient {
                    message,
                    retry_after,
                    ..
                }) => {
                    if attempt >= self.config.max_retries
                        || !self.backoff(attempt, retry_after, deadline).await
                    {
                        return Err((
                            None,
                            CopyError::Retryable(format!(
                                "{what}: {message} (gave up after {} attempts)",
                                attempt + 1
                            )),
                        ));
                    }
                    debug!(attempt, "retrying {what} after: {message}");
                    attempt += 1;
                }
            }
        }
    }

    /// Starts a run and returns its id. A lost answer (timeout, 5xx) may hide a run that ARM did
    /// start, so before sending again the engine looks for it and adopts it if found.
    async fn create_run(&self, job: &CopyJob) -> Result<String, CopyError> {
        let url = self
            .config
            .factory_url(&["pipelines", &self.config.pipeline_name, "createRun"]);
        let snapshot = job.source_snapshot.as_deref().ok_or_else(|| {
            CopyError::Permanent("the Data Factory engine copies source snapshots only".into())
        })?;
        let source_sas = self
            .source
            .snapshot_sas(
                &job.source_container,
                &job.source_blob,
                snapshot,
                self.config.source_sas_lifetime,
            )
            .await?;
        let body = self.run_parameters(job, &source_sas);
        let mut attempt = 0;
        loop {
            let outcome = self.call_once(Method::POST, &url, Some(&body)).await;
            match outcome {
                Ok(v) => {
                    let run_id = v
                        .get("runId")
                        .and_then(Value::as_str)
                        .filter(|s| !s.is_empty())
                        .ok_or_else(|| {
                            CopyError::Retryable(
                                "Data Factory accepted createRun but returned no runId".to_owned(),
                            )
                        })?;
                    return Ok(run_id.to_owned());
                }
                Err(CallError::Permanent { status, message }) => {
                    let message = if status == StatusCode::NOT_FOUND {
                        format!(
                            "{message}: factory '{}' or pipeline '{}' does not exist (deploy datafactory/ and check LAKEGUARD_DATAFACTORY_*)",
                            self.config.factory_name, self.config.pipeline_name
                        )
                    } else {
                        message
                    };
                    return Err(CopyError::Permanent(format!("createRun: {message}")));
                }
                Err(CallError::Transient {
                    message,
                    retry_after,
                    ambiguous,
                }) => {
                    if ambiguous {
                        if let Some(run) = self.find_existing_run(job).await? {
                            if run.status != RunStatus::Failed && run.status != RunStatus::Cancelled
                            {
                                info!(run_id = %run.run_id, "createRun answer was lost; adopting the run it started");
                                return Ok(run.run_id);
                            }
                        }
                    }
                    if attempt >= self.config.max_retries
                        || !self.backoff(attempt, retry_after, None).await
                    {
                        return Err(CopyError::Retryable(format!(
                            "createRun: {message} (gave up after {} attempts)",
                            attempt + 1
                        )));
                    }
                    debug!(attempt, "retrying createRun after: {message}");
                    attempt += 1;
                }
            }
        }
    }

    async fn get_run(&self, run_id: &str, deadline: Instant) -> Result<RunInfo, CopyError> {
        let url = self.config.factory_url(&["pipelineruns", run_id]);
        let v = match self
            .call_raw("get pipeline run", Method::GET, &url, None, Some(deadline))
            .await
        {
            Ok(v) => v,
            // Right after createRun the run may not be readable yet; a 404 is not a verdict.
            Err((Some(StatusCode::NOT_FOUND), _)) => {
                return Ok(RunInfo {
                    run_id: run_id.to_owned(),
                    status: RunStatus::Queued,
                    message: String::new(),
                    last_updated: None,
                })
            }
            Err((_, e)) => return Err(e),
        };
        RunInfo::from_json(&v).ok_or_else(|| {
            CopyError::Retryable(format!(
                "pipeline run {run_id}: answer without runId/status"
            ))
        })
    }

    /// Polls until the run is terminal or `deadline` passes.
    async fn wait_for_run(&self, run_id: &str, deadline: Instant) -> Result<RunInfo, CopyError> {
        let mut pause = self.config.poll_interval.min(Duration::from_secs(1));
        loop {
            let run = self.get_run(run_id, deadline).await?;
            if !run.status.is_active() {
                return Ok(run);
            }
            if Instant::now() + pause > deadline {
                return Err(CopyError::Retryable(format!(
                    "Data Factory run {run_id} still {:?} after {:?}; the redelivered request will keep waiting for it",
                    run.status, self.config.run_timeout
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(self.config.poll_interval);
        }
    }

    /// Runs of this pipeline (Pipeline Runs - Query By Factory) whose parameters name this job's
    /// version and target. Prefers a succeeded run, then the most recent active one. Failed and
    /// cancelled runs are ignored: a new run may replace them.
    async fn find_existing_run(&self, job: &CopyJob) -> Result<Option<RunInfo>, CopyError> {
        let url = self.config.factory_url(&["queryPipelineRuns"]);
        let now = OffsetDateTime::now_utc();
        let after = now - self.config.run_lookback;
        let before = now + time::Duration::hours(1);
        let fmt = &time::format_description::well_known::Rfc3339;
        let mut body = json!({
            "lastUpdatedAfter": after.format(fmt).expect("rfc3339"),
            "lastUpdatedBefore": before.format(fmt).expect("rfc3339"),
            "filters": [{
                "operand": "PipelineName",
                "operator": "Equals",
                "values": [self.config.pipeline_name],
            }],
        });
        let mut best: Option<RunInfo> = None;
        for _page in 0..1000 {
            let v = self
                .call("query pipeline runs", Method::POST, &url, Some(&body))
                .await?;
            for run in v
                .get("value")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if !run_matches(run, job) {
                    continue;
                }
                let Some(info) = RunInfo::from_json(run) else {
                    continue;
                };
                best = Some(match best {
                    None => info,
                    Some(cur) => better_run(cur, info),
                });
            }
            match v.get("continuationToken").and_then(Value::as_str) {
                Some(tok) if !tok.is_empty() => body["continuationToken"] = json!(tok),
                _ => break,
            }
        }
        Ok(best.filter(|r| r.status == RunStatus::Succeeded || r.status.is_active()))
    }

    /// After a succeeded run: give the backup blob the job's metadata, but only if it is the blob
    /// that run wrote (its marker) and only while it still is (If-Match).
    async fn stamp_metadata(&self, job: &CopyJob, run_id: &str) -> Result<CopyOutcome, CopyError> {
        let (c, b) = (&job.target_container, &job.target_blob);
        let Some(BackupBlobInfo {
            etag,
            metadata: meta,
            ..
        }) = self.backup.head(c, b).await?
        else {
            return Err(CopyError::Retryable(format!(
                "Data Factory run {run_id} succeeded but the backup blob does not exist"
            )));
        };
        let marker = meta.get(RUN_MARKER).map(String::as_str);
        if marker == Some(run_id) {
            self.backup.set_metadata(c, b, &job.metadata, &etag).await?;
            return Ok(CopyOutcome::Copied { target_etag: None });
        }
        // Same test as the worker's idempotency check.
        let stamped =
            meta.get(metadata::SOURCE_ETAG).map(Etag::new) == Some(job.source_etag.clone());
        if stamped {
            // An earlier delivery finished the job, metadata included.
            return Ok(CopyOutcome::Copied {
                target_etag: Some(etag),
            });
        }
        Err(CopyError::Retryable(format!(
            "the backup blob was rewritten after Data Factory run {run_id} (marker {marker:?}); the request will be re-evaluated"
        )))
    }

    /// Whether a failed run's Put Blob From URL nevertheless wrote the backup: the blob carries
    /// this run's marker (only that request writes it, atomically, under `x-ms-source-if-match`
    /// on the snapshot's ETag) and has the version's length. Then the failure came after the
    /// write, e.g. from a factory that refuses the empty `201` answer, or from an activity retry
    /// that found the blob already written (409/412).
    async fn copy_landed(&self, job: &CopyJob, run_id: &str) -> Result<bool, CopyError> {
        Ok(self
            .backup
            .head(&job.target_container, &job.target_blob)
            .await?
            .is_some_and(|b| {
                b.metadata.get(RUN_MARKER).map(String::as_str) == Some(run_id)
                    && b.content_length == job.content_length
            }))
    }

    async fn copy_inner(&self, job: &CopyJob) -> Result<CopyOutcome, CopyError> {
        if job.content_length > MAX_COPY_BYTES {
            return Err(CopyError::Permanent(format!(
                "{} bytes is more than Put Blob From URL accepts ({MAX_COPY_BYTES}); use LAKEGUARD_COPY_ENGINE=direct for blobs this large",
                job.content_length
            )));
        }
        let deadline = Instant::now() + self.config.run_timeout;
        let mut existing = None;
        if job.attempt > 1 {
            if let Some(run) = self.find_existing_run(job).await? {
                info!(run_id = %run.run_id, status = ?run.status, "redelivery: found the earlier run of this version");
                existing = Some(run);
            }
        }
        let run = match existing {
            Some(run) if run.status == RunStatus::Succeeded => run,
            Some(run) => self.wait_for_run(&run.run_id, deadline).await?,
            None => {
                let run_id = self.create_run(job).await?;
                info!(run_id = %run_id, "started Data Factory run");
                self.wait_for_run(&run_id, deadline).await?
            }
        };
        match run.status {
            RunStatus::Succeeded => {
                info!(run_id = %run.run_id, "Data Factory run succeeded");
                self.stamp_metadata(job, &run.run_id).await
            }
            RunStatus::Failed if self.copy_landed(job, &run.run_id).await? => {
                warn!(run_id = %run.run_id, "Data Factory run failed after its copy landed (the backup carries this run's marker and the version's length); counting the copy as done");
                self.stamp_metadata(job, &run.run_id).await
            }
            status => {
                warn!(run_id = %run.run_id, ?status, "Data Factory run did not succeed");
                let message = if run.message.is_empty() {
                    "no message".to_owned()
                } else {
                    redact_sas(&run.message)
                };
                Err(CopyError::Retryable(format!(
                    "Data Factory run {} {:?}: {}",
                    run.run_id, status, message
                )))
            }
        }
    }
}

#[async_trait]
impl CopyEngine for DataFactoryEngine {
    fn name(&self) -> &'static str {
        "datafactory"
    }

    async fn copy(&self, job: &CopyJob) -> Result<CopyOutcome, CopyError> {
        let span = tracing::info_span!(
            "datafactory_copy",
            container = %job.source_container,
            blob = %job.source_blob,
            etag = %job.source_etag.as_str(),
        );
        if job.source_snapshot.is_none() {
            // `copies_live_source` is false, so the worker never builds such a job for this engine.
            return Err(CopyError::Permanent(
                "the Data Factory engine copies source snapshots only".into(),
            ));
        }
        self.copy_inner(job).instrument(span).await
    }
}

/// Endpoint without a trailing slash: the pipeline appends `/{container}/{blob}`.
fn endpoint_str(u: &Url) -> String {
    u.as_str().trim_end_matches('/').to_owned()
}

fn param<'a>(run: &'a Value, name: &str) -> Option<&'a str> {
    run.get("parameters")?.get(name)?.as_str()
}

/// A run is "this version" when it names the same snapshot and target. Data Factory returns
/// parameter values as strings.
fn run_matches(run: &Value, job: &CopyJob) -> bool {
    let same = param(run, "sourceContainer") == Some(job.source_container.as_str())
        && param(run, "sourceBlob") == Some(job.source_blob.as_str())
        && param(run, "sourceSnapshot") == job.source_snapshot.as_deref()
        && param(run, "targetContainer") == Some(job.target_container.as_str())
        && param(run, "targetBlob") == Some(job.target_blob.as_str());
    same && param(run, "sourceEtag").is_none_or(|e| Etag::new(e) == job.source_etag)
}

fn better_run(a: RunInfo, b: RunInfo) -> RunInfo {
    fn rank(r: &RunInfo) -> u8 {
        match r.status {
            RunStatus::Succeeded => 2,
            ref s if s.is_active() => 1,
            _ => 0,
        }
    }
    match rank(&a).cmp(&rank(&b)) {
        std::cmp::Ordering::Greater => a,
        std::cmp::Ordering::Less => b,
        std::cmp::Ordering::Equal => {
            if b.last_updated > a.last_updated {
                b
            } else {
                a
            }
        }
    }
}

/// `Retry-After` as delta-seconds or HTTP date (RFC 9110 §10.2.3).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let raw = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = raw.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let fmt = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let at = time::PrimitiveDateTime::parse(raw, &fmt).ok()?.assume_utc();
    let delta = at - OffsetDateTime::now_utc();
    Some(Duration::try_from(delta).unwrap_or(Duration::ZERO))
}

/// `text` with the value of every `sig=` query parameter replaced: a run's message (or an ARM
/// error that echoes a parameter) may quote the copy-source URL, and the worker logs errors.
pub fn redact_sas(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.to_ascii_lowercase().find("sig=") {
        // Only a query parameter: at the start or after `?`, `&` or a separator.
        let boundary = i == 0
            || matches!(
                rest.as_bytes()[i - 1],
                b'?' | b'&' | b' ' | b'"' | b'\'' | b'(' | b'\n'
            );
        out.push_str(&rest[..i + 4]);
        rest = &rest[i + 4..];
        if boundary {
            let end = rest
                .find(|c: char| {
                    c == '&' || c == '"' || c == '\'' || c.is_whitespace() || c == ')' || c == '<'
                })
                .unwrap_or(rest.len());
            out.push_str("REDACTED");
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    out
}

/// `: Code: message` from an ARM error body (`{"error":{"code","message"}}`), or nothing.
fn arm_error_detail(body: &str) -> String {
    let Ok(v) = serde_json::from_str::<Value>(body) else {
        return String::new();
    };
    let err = v.get("error").unwrap_or(&v);
    let code = err.get("code").and_then(Value::as_str).unwrap_or("");
    let msg = err.get("message").and_then(Value::as_str).unwrap_or("");
    let msg = redact_sas(msg);
    match (code.is_empty(), msg.is_empty()) {
        (true, true) => String::new(),
        (false, true) => format!(": {code}"),
        (true, false) => format!(": {msg}"),
        (false, false) => format!(": {code}: {msg}"),
    }
}

/// reqwest's Display includes the URL; ours hold no secret, but keep messages short and stable.
fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "transport error"
    };
    let mut source = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}: {detail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_and_date() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        let future = OffsetDateTime::now_utc() + time::Duration::seconds(30);
        let fmt = time::macros::format_description!(
            "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
        );
        h.insert(RETRY_AFTER, future.format(&fmt).unwrap().parse().unwrap());
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(25) && d <= Duration::from_secs(30),
            "{d:?}"
        );
        h.insert(
            RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert(RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn factory_url_encodes_segments() {
        let mut c = DataFactoryConfig::new(
            "sub",
            "rg 1",
            "f",
            Url::parse("https://s.blob.core.windows.net").unwrap(),
            Url::parse("https://b.blob.core.windows.net/").unwrap(),
        );
        c.arm_endpoint = Url::parse("http://127.0.0.1:9/").unwrap();
        let u = c.factory_url(&["pipelines", "p", "createRun"]);
        assert_eq!(
            u.as_str(),
            "http://127.0.0.1:9/subscriptions/sub/resourceGroups/rg%201/providers/Microsoft.DataFactory/factories/f/pipelines/p/createRun?api-version=2018-06-01"
        );
        assert_eq!(
            endpoint_str(&c.backup_blob_endpoint),
            "https://b.blob.core.windows.net"
        );
    }

    #[test]
    fn sas_signatures_are_redacted() {
        let m = "Operation on target Copy failed: 403 for https://a.blob.core.windows.net/c/b?snapshot=s&sv=2021-08-06&sr=bs&sig=abc%2Bdef%3D&se=x, see \"sig=QQ\" and SIG=zz";
        let r = redact_sas(m);
        for secret in ["abc%2Bdef%3D", "QQ", "zz"] {
            assert!(!r.contains(secret), "{r}");
        }
        assert!(r.contains("sr=bs&sig=REDACTED&se=x"), "{r}");
        // Not a query parameter: left alone.
        assert_eq!(redact_sas("design=ok"), "design=ok");
        assert_eq!(redact_sas("no secret here"), "no secret here");
    }

    #[test]
    fn arm_error_detail_reads_code_and_message() {
        assert_eq!(
            arm_error_detail(r#"{"error":{"code":"AuthorizationFailed","message":"no"}}"#),
            ": AuthorizationFailed: no"
        );
        assert_eq!(arm_error_detail("not json"), "");
    }

    #[test]
    fn succeeded_beats_active_beats_failed() {
        let mk = |id: &str, s: RunStatus| RunInfo {
            run_id: id.into(),
            status: s,
            message: String::new(),
            last_updated: None,
        };
        let r = better_run(mk("a", RunStatus::Failed), mk("b", RunStatus::InProgress));
        assert_eq!(r.run_id, "b");
        let r = better_run(
            mk("c", RunStatus::Succeeded),
            mk("b", RunStatus::InProgress),
        );
        assert_eq!(r.run_id, "c");
    }
}
