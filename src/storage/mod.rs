//! All I/O against Azure Storage: how clients are built (transport, retries, authorisation) and
//! the small typed operations the rest of lakeguard uses.

pub mod blob;
pub mod cli_credential;
pub mod connection;
pub mod dfs;
pub mod error;
pub mod listing;
pub mod queue;
pub mod sas;
pub mod shared_key;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use azure_core::credentials::TokenCredential;
use azure_core::http::policies::{Policy, PolicyResult};
use azure_core::http::{
    ClientOptions, Context, ExponentialRetryOptions, Request, RetryOptions, Transport,
};
use azure_identity::{ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId};

pub use blob::BlobStore;
pub use connection::{Connection, Credential};
pub use error::StorageError;
pub use listing::Lister;
pub use queue::BackupQueue;

use crate::settings::Settings;

/// Managed identity credentials by client id (`None` = system-assigned).
type CredentialMap = HashMap<Option<String>, Arc<dyn TokenCredential>>;

/// How one connection is authorised: bearer credential, per-try policies (Shared Key), SAS.
pub(crate) type Auth = (
    Option<Arc<dyn TokenCredential>>,
    Vec<Arc<dyn Policy>>,
    Option<String>,
);

/// Process-wide pieces shared by every client: one HTTP connection pool, one credential per
/// identity (azure_identity caches tokens per scope inside it, so a token is fetched once, not per
/// message), and the retry policy.
#[derive(Clone)]
pub struct Clients {
    http: reqwest::Client,
    credentials: Arc<Mutex<CredentialMap>>,
    /// The Azure CLI credential, built on first use (operators' terminals only).
    cli: Arc<Mutex<Option<Arc<dyn TokenCredential>>>>,
    max_retries: u32,
}

impl Clients {
    pub fn new(settings: &Settings) -> Result<Self, StorageError> {
        let http = http_client(settings.ca_cert_pem.as_deref())?;
        Ok(Clients {
            http,
            credentials: Default::default(),
            cli: Default::default(),
            max_retries: settings.max_retries,
        })
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The managed identity credential for `client_id` (None = system-assigned), built once.
    pub fn credential(
        &self,
        client_id: Option<&str>,
    ) -> Result<Arc<dyn TokenCredential>, StorageError> {
        let mut map = self.credentials.lock().expect("credential map poisoned");
        if let Some(c) = map.get(&client_id.map(str::to_owned)) {
            return Ok(c.clone());
        }
        let options = ManagedIdentityCredentialOptions {
            user_assigned_id: client_id.map(|id| UserAssignedId::ClientId(id.to_owned())),
            client_options: self.client_options(vec![]),
        };
        let cred: Arc<dyn TokenCredential> = ManagedIdentityCredential::new(Some(options))
            .map_err(|e| StorageError::from_azure("managed identity credential", e))?;
        map.insert(client_id.map(str::to_owned), cred.clone());
        Ok(cred)
    }

    /// The bearer-token credential of a connection: its managed identity or the Azure CLI's
    /// login; `None` for key and SAS connections.
    pub fn token_credential(
        &self,
        credential: &Credential,
    ) -> Result<Option<Arc<dyn TokenCredential>>, StorageError> {
        match credential {
            Credential::ManagedIdentity { client_id } => {
                self.credential(client_id.as_deref()).map(Some)
            }
            Credential::AzureCli => {
                let mut cli = self.cli.lock().expect("credential map poisoned");
                if let Some(c) = cli.as_ref() {
                    return Ok(Some(c.clone()));
                }
                let c: Arc<dyn TokenCredential> = Arc::new(
                    cli_credential::CachedCliCredential::new()
                        .map_err(|e| StorageError::from_azure("Azure CLI credential", e))?,
                );
                *cli = Some(c.clone());
                Ok(Some(c))
            }
            Credential::SharedKey { .. } | Credential::Sas { .. } => Ok(None),
        }
    }

    /// Client options for an SDK client: our transport, our retry policy, and `per_try` policies
    /// (Shared Key signing must be last so that it signs final headers).
    pub fn client_options(&self, per_try: Vec<Arc<dyn Policy>>) -> ClientOptions {
        let mut per_try_policies: Vec<Arc<dyn Policy>> = vec![Arc::new(ExtraHeadersPolicy)];
        per_try_policies.extend(per_try);
        ClientOptions {
            per_try_policies,
            retry: RetryOptions::exponential(ExponentialRetryOptions {
                initial_delay: azure_core::time::Duration::milliseconds(200),
                max_retries: self.max_retries,
                max_total_elapsed: azure_core::time::Duration::seconds(90),
                max_delay: azure_core::time::Duration::seconds(20),
            }),
            transport: Some(Transport::new(Arc::new(self.http.clone()))),
            ..Default::default()
        }
    }

    /// The blob store of one connection.
    pub fn blob_store(&self, conn: &Connection) -> Result<BlobStore, StorageError> {
        BlobStore::new(self, conn)
    }

    pub fn backup_queue(&self, conn: &Connection, name: &str) -> Result<BackupQueue, StorageError> {
        BackupQueue::new(self, conn, name)
    }

    /// Authorisation of one connection: (credential for bearer tokens, extra per-try policies,
    /// SAS to append to URLs).
    pub(crate) fn auth_for(&self, conn: &Connection) -> Result<Auth, StorageError> {
        Ok(match &conn.credential {
            Credential::SharedKey { account, key } => (
                None,
                vec![Arc::new(shared_key::SharedKeyPolicy::new(
                    account.clone(),
                    key.clone(),
                ))],
                None,
            ),
            Credential::Sas { token } => (None, vec![], Some(token.secret().to_owned())),
            Credential::ManagedIdentity { .. } | Credential::AzureCli => {
                (self.token_credential(&conn.credential)?, vec![], None)
            }
        })
    }
}

/// One HTTP stack for everything (the SDK's reqwest 0.13), with explicit timeouts: the SDK's
/// default client has none, and a hung connection would hold a queue message until the host
/// times the whole invocation out.
fn http_client(ca_pem: Option<&[u8]>) -> Result<reqwest::Client, StorageError> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(300))
        .pool_idle_timeout(Duration::from_secs(60));
    if let Some(pem) = ca_pem {
        let certs =
            reqwest::Certificate::from_pem_bundle(pem).map_err(|e| StorageError::Permanent {
                what: "LAKEGUARD_CA_CERT".into(),
                detail: format!("not a PEM certificate bundle: {e}"),
            })?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(|e| StorageError::Permanent {
        what: "HTTP client".into(),
        detail: e.to_string(),
    })
}

/// Headers that the SDK has no option for (`x-ms-requires-sync` turns Start Copy into the
/// synchronous Copy Blob From URL; `x-ms-copy-source-authorization` on it), passed per call
/// through the request `Context`. Runs before Shared Key signing so they are signed.
#[derive(Clone, Debug, Default)]
pub struct ExtraHeaders(pub Vec<(&'static str, String)>);

#[derive(Debug)]
struct ExtraHeadersPolicy;

#[async_trait]
impl Policy for ExtraHeadersPolicy {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        if let Some(extra) = ctx.value::<ExtraHeaders>() {
            for (k, v) in &extra.0 {
                request.insert_header(*k, v.clone());
            }
        }
        next[0].send(ctx, request, &next[1..]).await
    }
}
