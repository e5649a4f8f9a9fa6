//! The Azure CLI's logged-in identity for an operator's terminal (`X__credential=azurecli`).
//!
//! `azure_identity::AzureCliCredential` runs `az account get-access-token` on every call and
//! caches nothing, and every storage client lakeguard builds asks its credential for a token: a
//! prune or restore would start `az` (a Python process, about a second) per container client.
//! This wrapper keeps each scope's token until shortly before it expires, so a run starts `az`
//! once per scope.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use azure_core::time::{Duration, OffsetDateTime};
use azure_identity::AzureCliCredential;
use tokio::sync::Mutex;

/// A cached token is renewed this long before it expires (a long copy must not start with a
/// token about to lapse; Entra tokens live 60-90 minutes).
const RENEW_BEFORE: Duration = Duration::minutes(5);

#[derive(Debug)]
pub struct CachedCliCredential {
    inner: Arc<AzureCliCredential>,
    /// Scopes (joined) → token. The async lock is held across the `az` call so that concurrent
    /// first requests start `az` once, not once each.
    tokens: Mutex<HashMap<String, AccessToken>>,
}

impl CachedCliCredential {
    pub fn new() -> azure_core::Result<Self> {
        Ok(CachedCliCredential {
            inner: AzureCliCredential::new(None)?,
            tokens: Mutex::new(HashMap::new()),
        })
    }
}

#[async_trait]
impl TokenCredential for CachedCliCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let key = scopes.join(" ");
        let mut tokens = self.tokens.lock().await;
        if let Some(t) = tokens.get(&key) {
            if t.expires_on - RENEW_BEFORE > OffsetDateTime::now_utc() {
                return Ok(t.clone());
            }
        }
        let token = self.inner.get_token(scopes, options).await?;
        tokens.insert(key, token.clone());
        Ok(token)
    }
}
