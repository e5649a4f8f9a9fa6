//! Read access for server-side copy sources: the one place that knows how a copy source is
//! authorised.
//!
//! Copy Blob From URL and Put Block From URL read the source with the *source URL's* own
//! authorisation, never with the destination request's. With an account key (connection
//! strings) we sign an account SAS by hand (`azure_storage_sas` builds only user-delegation
//! SAS); with managed identity we ask the service for a user-delegation key and let
//! `azure_storage_sas` sign a read-only SAS for exactly that snapshot (`sr=bs`). Both are short
//! lived, read-only, and never logged (they only ever travel inside request URLs).

use std::sync::Arc;

use azure_core::credentials::Secret;
use azure_core::http::{RequestContent, XmlFormat};
use azure_storage_blob::models::KeyInfo;
use azure_storage_common::models::UserDelegationKey;
use azure_storage_sas::SasBuilder;
use time::{Duration, OffsetDateTime};
use tokio::sync::Mutex;

use super::connection::Credential;
use super::error::StorageError;
use super::BlobStore;

const SAS_VERSION: &str = "2021-08-06";

/// Caches a user-delegation key: one key request per hour, not per copy. The key is remembered
/// with its account, so a cache handed a store of another account fetches that account's key
/// instead of signing with the wrong one.
#[derive(Clone, Default)]
pub struct DelegationKeyCache(Arc<Mutex<Option<(String, UserDelegationKey, OffsetDateTime)>>>);

/// A query string granting read access to one blob or snapshot of `store`.
pub async fn read_sas(
    store: &BlobStore,
    cache: &DelegationKeyCache,
    container: &str,
    blob: &str,
    snapshot: Option<&str>,
    valid_for: Duration,
) -> Result<String, StorageError> {
    let now = OffsetDateTime::now_utc();
    // Start a little in the past: the service rejects a SAS whose start is ahead of its clock.
    let start = now - Duration::minutes(5);
    let expiry = now + valid_for;
    match &store.connection().credential {
        Credential::SharedKey { account, key } => account_sas(account, key, start, expiry),
        Credential::Sas { token } => Ok(token.secret().to_owned()),
        Credential::ManagedIdentity { .. } => {
            // Container scope (`sr=c`, read only, short lived) rather than `sr=bs`: it reads the
            // snapshot on the real service as well, and the emulator's user-delegation check
            // leaves the signed-snapshot-time field empty, so a snapshot-scoped SAS never
            // verifies there. The blob and snapshot are named by the URL the SAS is appended to.
            let _ = (blob, snapshot);
            let key = delegation_key(store, cache, now, expiry).await?;
            let builder = SasBuilder::new(store.account(), &key, expiry)
                .map_err(|e| StorageError::from_azure("user delegation SAS", e))?
                .start(start)
                .container(container)
                .read();
            Ok(builder.build())
        }
    }
}

async fn delegation_key(
    store: &BlobStore,
    cache: &DelegationKeyCache,
    now: OffsetDateTime,
    needed_until: OffsetDateTime,
) -> Result<UserDelegationKey, StorageError> {
    let mut guard = cache.0.lock().await;
    if let Some((account, key, expiry)) = guard.as_ref() {
        if account == store.account() && *expiry > needed_until {
            return Ok(key.clone());
        }
    }
    let expiry = now + Duration::hours(2).max(needed_until - now + Duration::minutes(10));
    let info = KeyInfo {
        start: Some(now - Duration::minutes(5)),
        expiry: Some(expiry),
        ..Default::default()
    };
    let content: RequestContent<KeyInfo, XmlFormat> = info
        .try_into()
        .map_err(|e| StorageError::from_azure("user delegation key", e))?;
    let key = store
        .service_client()?
        .get_user_delegation_key(content, None)
        .await
        .map_err(|e| StorageError::from_azure("get user delegation key", e))?
        .into_model()
        .map_err(|e| StorageError::from_azure("user delegation key", e))?;
    *guard = Some((store.account().to_owned(), key.clone(), expiry));
    Ok(key)
}

/// Account SAS (blob service, object level, read only).
fn account_sas(
    account: &str,
    key: &Secret,
    start: OffsetDateTime,
    expiry: OffsetDateTime,
) -> Result<String, StorageError> {
    let st = sas_time(start);
    let se = sas_time(expiry);
    let (sp, ss, srt, spr) = ("r", "b", "o", "https,http");
    // String-to-sign of an account SAS for versions 2020-12-06 and later (encryption scope empty).
    let string_to_sign =
        format!("{account}\n{sp}\n{ss}\n{srt}\n{st}\n{se}\n\n{spr}\n{SAS_VERSION}\n\n");
    let sig = azure_core::hmac::hmac_sha256(&string_to_sign, key)
        .map_err(|e| StorageError::from_azure("account SAS", e))?;
    let enc = |s: &str| percent_encoding::utf8_percent_encode(s, UNRESERVED).to_string();
    Ok(format!(
        "sv={SAS_VERSION}&ss={ss}&srt={srt}&sp={sp}&st={}&se={}&spr={}&sig={}",
        enc(&st),
        enc(&se),
        enc(spr),
        enc(&sig)
    ))
}

/// Everything but RFC 3986 unreserved characters is percent-encoded in SAS query values.
const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn sas_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Appends a SAS query to a URL that may already carry `?snapshot=`.
pub fn with_sas(mut url: url::Url, sas: &str) -> url::Url {
    let q = match url.query() {
        Some(q) if !q.is_empty() => format!("{q}&{sas}"),
        _ => sas.to_owned(),
    };
    url.set_query(Some(&q));
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_sas_shape() {
        let t = time::macros::datetime!(2026-11-22 03:00:00 UTC);
        let sas = account_sas("acct", &Secret::new("YWJjZA=="), t, t + Duration::hours(1)).unwrap();
        assert!(sas.starts_with("sv=2021-08-06&ss=b&srt=o&sp=r&st=2026-11-22T03%3A00%3A00Z&se=2026-11-22T04%3A00%3A00Z&spr=https%2Chttp&sig="), "{sas}");
    }

    #[test]
    fn sas_is_appended_after_snapshot() {
        let url =
            url::Url::parse("http://h/acct/c/b?snapshot=2026-01-01T00:00:00.0000000Z").unwrap();
        assert_eq!(
            with_sas(url, "sv=1&sig=x").query().unwrap(),
            "snapshot=2026-01-01T00:00:00.0000000Z&sv=1&sig=x"
        );
    }
}
