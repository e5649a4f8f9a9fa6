//! Read access for server-side copy sources: the one place that knows how a copy source is
//! authorised.
//!
//! Copy Blob From URL and Put Block From URL read the source with the *source URL's* own
//! authorisation, never with the destination request's. Every SAS made here grants read (`sp=r`)
//! of exactly one blob or one snapshot, for at most [`MAX_LIFETIME`] (`se - st`), over https only
//! unless the endpoint itself is plain http (the emulator in Shared Key mode): a leaked copy
//! source URL reads that one version for minutes, nothing else. Long copies do not need a long
//! SAS: the block path asks for a fresh one per Put Block From URL.
//!
//! - Account key (connection strings): a *service* SAS signed by hand (`azure_storage_sas` builds
//!   only user-delegation SAS), `sr=b` for a base blob, `sr=bs` + the snapshot time for a
//!   snapshot (REST "Create a service SAS", version 2020-12-06 layout).
//! - Managed identity: a user-delegation SAS from `azure_storage_sas`, signed with a key the
//!   service hands out for the identity (cached, see [`DelegationKeyCache`]): `sr=bs` for a
//!   snapshot on a real (host-style) endpoint, the documented scope. On a path-style *emulator*
//!   endpoint (`http(s)://127.0.0.1:port/account`, `localhost`) a snapshot gets the blob scope
//!   `sr=b` instead, because Azurite's user-delegation check leaves the snapshot slot of its
//!   string-to-sign empty, so a correctly signed `sr=bs` never verifies there. Still one blob,
//!   read only; the real service never sees that shape.
//! - A SAS from a connection string (`SharedAccessSignature=`) is used as given: we cannot narrow
//!   what we were handed.
//!
//! The tokens are never logged (they only ever travel inside request URLs).

use std::sync::Arc;

use azure_core::credentials::Secret;
use azure_core::http::{RequestContent, XmlFormat};
use azure_storage_blob::models::KeyInfo;
use azure_storage_common::models::UserDelegationKey;
use azure_storage_sas::{SasBuilder, SasProtocol};
use time::{Duration, OffsetDateTime};
use tokio::sync::Mutex;
use url::Url;

use super::connection::Credential;
use super::error::StorageError;
use super::BlobStore;

const SAS_VERSION: &str = "2021-08-06";

/// Longest validity of a copy-source SAS, `se - st`. The start lies [`CLOCK_SKEW`] in the past,
/// so a SAS is usable for at most 25 minutes from now: far more than one Copy Blob From URL (at
/// most 256 MiB) or one Put Block From URL (one block) takes.
pub const MAX_LIFETIME: Duration = Duration::minutes(30);

/// How far in the past a SAS starts: the service rejects a SAS whose start is ahead of its clock.
const CLOCK_SKEW: Duration = Duration::minutes(5);

/// Caches a user-delegation key: one key request per hour, not per copy. The key is remembered
/// with its account, so a cache handed a store of another account fetches that account's key
/// instead of signing with the wrong one.
#[derive(Clone, Default)]
pub struct DelegationKeyCache(Arc<Mutex<Option<(String, UserDelegationKey, OffsetDateTime)>>>);

/// A query string granting read access to exactly one blob (`snapshot: None`) or one snapshot
/// of `store`, valid for `valid_for` from now but never longer than [`MAX_LIFETIME`] in all.
/// Append it to the URL of that blob or snapshot with [`with_sas`].
pub async fn read_sas(
    store: &BlobStore,
    cache: &DelegationKeyCache,
    container: &str,
    blob: &str,
    snapshot: Option<&str>,
    valid_for: Duration,
) -> Result<String, StorageError> {
    let now = OffsetDateTime::now_utc();
    let (start, expiry) = validity(now, valid_for);
    let endpoint = store.endpoint();
    let https_only = endpoint.scheme() == "https";
    match &store.connection().credential {
        Credential::SharedKey { account, key } => service_sas(
            key,
            &ServiceSas {
                account,
                container,
                blob,
                snapshot,
                start,
                expiry,
                https_only,
            },
        ),
        Credential::Sas { token } => Ok(token.secret().to_owned()),
        Credential::ManagedIdentity { .. } | Credential::AzureCli => {
            let key = delegation_key(store, cache, now, expiry).await?;
            let scope = if is_path_style_emulator(endpoint, store.account()) {
                DelegationScope::BlobOnEmulator
            } else {
                DelegationScope::Exact
            };
            delegation_sas(
                &key,
                store.account(),
                container,
                blob,
                snapshot,
                start,
                expiry,
                https_only,
                scope,
            )
        }
    }
}

/// `(st, se)` of a SAS asked to last `valid_for` from `now`: starts [`CLOCK_SKEW`] ago, lasts at
/// least a minute from now and at most [`MAX_LIFETIME`] in all.
fn validity(now: OffsetDateTime, valid_for: Duration) -> (OffsetDateTime, OffsetDateTime) {
    let ahead = valid_for.clamp(Duration::minutes(1), MAX_LIFETIME - CLOCK_SKEW);
    (now - CLOCK_SKEW, now + ahead)
}

/// How a user-delegation SAS names a snapshot (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DelegationScope {
    /// `sr=bs` for a snapshot, `sr=b` for a base blob: the real service.
    Exact,
    /// `sr=b` for both: only for path-style emulator endpoints.
    BlobOnEmulator,
}

/// Whether `endpoint` is a path-style emulator endpoint of `account`: loopback or an IP literal
/// as host and the account as first path segment (`http://127.0.0.1:10000/devstoreaccount1`).
/// The real service (and private endpoints, and custom domains) name the account in the host.
fn is_path_style_emulator(endpoint: &Url, account: &str) -> bool {
    let host_is_local = match endpoint.host() {
        Some(url::Host::Ipv4(_)) | Some(url::Host::Ipv6(_)) => true,
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    };
    host_is_local
        && endpoint
            .path_segments()
            .and_then(|mut s| s.next())
            .is_some_and(|first| first == account)
}

#[allow(clippy::too_many_arguments)]
fn delegation_sas(
    key: &UserDelegationKey,
    account: &str,
    container: &str,
    blob: &str,
    snapshot: Option<&str>,
    start: OffsetDateTime,
    expiry: OffsetDateTime,
    https_only: bool,
    scope: DelegationScope,
) -> Result<String, StorageError> {
    let mut builder = SasBuilder::new(account, key, expiry)
        .map_err(|e| StorageError::from_azure("user delegation SAS", e))?
        .start(start)
        .protocol(if https_only {
            SasProtocol::Https
        } else {
            SasProtocol::HttpsAndHttp
        })
        .blob(container, blob)
        .read();
    if let (Some(s), DelegationScope::Exact) = (snapshot, scope) {
        builder = builder.snapshot(s);
    }
    // The crate also emits `snapshot=`; the URL the SAS is appended to names the snapshot
    // already, and a repeated query parameter is not ours to leave to the service's parser.
    Ok(builder
        .build()
        .split('&')
        .filter(|p| !p.starts_with("snapshot="))
        .collect::<Vec<_>>()
        .join("&"))
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

/// What a service SAS grants: read of one blob or snapshot.
struct ServiceSas<'a> {
    account: &'a str,
    container: &'a str,
    blob: &'a str,
    snapshot: Option<&'a str>,
    start: OffsetDateTime,
    expiry: OffsetDateTime,
    https_only: bool,
}

impl ServiceSas<'_> {
    fn signed_resource(&self) -> &'static str {
        if self.snapshot.is_some() {
            "bs"
        } else {
            "b"
        }
    }

    fn protocol(&self) -> &'static str {
        if self.https_only {
            "https"
        } else {
            "https,http"
        }
    }

    /// String-to-sign of a service SAS, version 2020-12-06 and later: permissions, start,
    /// expiry, canonicalized resource (`/blob/<account>/<container>/<name>`, the name as is),
    /// identifier, IP, protocol, version, resource, snapshot time, encryption scope, then the
    /// five response-header overrides (all empty here).
    fn string_to_sign(&self) -> String {
        [
            "r",
            &sas_time(self.start),
            &sas_time(self.expiry),
            &format!("/blob/{}/{}/{}", self.account, self.container, self.blob),
            "",
            "",
            self.protocol(),
            SAS_VERSION,
            self.signed_resource(),
            self.snapshot.unwrap_or(""),
            "",
            "",
            "",
            "",
            "",
            "",
        ]
        .join("\n")
    }
}

/// Service SAS (read only, one blob or snapshot), signed with the account key.
fn service_sas(key: &Secret, sas: &ServiceSas<'_>) -> Result<String, StorageError> {
    let sig = azure_core::hmac::hmac_sha256(&sas.string_to_sign(), key)
        .map_err(|e| StorageError::from_azure("service SAS", e))?;
    let enc = |s: &str| percent_encoding::utf8_percent_encode(s, UNRESERVED).to_string();
    Ok(format!(
        "sv={SAS_VERSION}&sr={}&sp=r&st={}&se={}&spr={}&sig={}",
        sas.signed_resource(),
        enc(&sas_time(sas.start)),
        enc(&sas_time(sas.expiry)),
        enc(sas.protocol()),
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

/// Appends a SAS query to a URL that may already carry `?snapshot=` (or, for a connection
/// string's SAS, the token itself): parameters the URL already has are not repeated.
pub fn with_sas(mut url: url::Url, sas: &str) -> url::Url {
    let have: Vec<String> = url
        .query_pairs()
        .map(|(k, _)| k.to_ascii_lowercase())
        .collect();
    let added = sas.split('&').filter(|p| {
        let key = p.split('=').next().unwrap_or_default().to_ascii_lowercase();
        !p.is_empty() && !have.contains(&key)
    });
    let q = url
        .query()
        .into_iter()
        .filter(|q| !q.is_empty())
        .chain(added)
        .collect::<Vec<_>>()
        .join("&");
    url.set_query((!q.is_empty()).then_some(q.as_str()));
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(sas: &str) -> std::collections::BTreeMap<String, String> {
        url::form_urlencoded::parse(sas.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }

    fn lifetime(q: &std::collections::BTreeMap<String, String>) -> Duration {
        let t = |k: &str| {
            OffsetDateTime::parse(&q[k], &time::format_description::well_known::Rfc3339).unwrap()
        };
        t("se") - t("st")
    }

    const T: OffsetDateTime = time::macros::datetime!(2026-11-22 03:00:00 UTC);
    const SNAP: &str = "2026-11-22T02:59:00.1234567Z";

    fn service(snapshot: Option<&'static str>, https_only: bool) -> ServiceSas<'static> {
        ServiceSas {
            account: "acct",
            container: "raw",
            blob: "dir/a b.csv",
            snapshot,
            start: T,
            expiry: T + Duration::minutes(30),
            https_only,
        }
    }

    #[test]
    fn lifetime_is_capped() {
        for asked in [
            Duration::seconds(1),
            Duration::minutes(10),
            Duration::days(30),
        ] {
            let (st, se) = validity(T, asked);
            assert!(st < T && se > T);
            assert!(se - st <= MAX_LIFETIME, "{asked}");
        }
        let (_, se) = validity(T, Duration::minutes(10));
        assert_eq!(se - T, Duration::minutes(10));
    }

    /// The documented layout (REST "Create a service SAS", 2020-12-06 and later), field by field.
    #[test]
    fn service_sas_string_to_sign_follows_the_documented_layout() {
        assert_eq!(
            service(Some(SNAP), true).string_to_sign(),
            "r\n2026-11-22T03:00:00Z\n2026-11-22T03:30:00Z\n/blob/acct/raw/dir/a b.csv\n\n\n\
             https\n2021-08-06\nbs\n2026-11-22T02:59:00.1234567Z\n\n\n\n\n\n"
        );
        assert_eq!(
            service(None, false).string_to_sign(),
            "r\n2026-11-22T03:00:00Z\n2026-11-22T03:30:00Z\n/blob/acct/raw/dir/a b.csv\n\n\n\
             https,http\n2021-08-06\nb\n\n\n\n\n\n\n"
        );
    }

    #[test]
    fn service_sas_reads_one_snapshot_over_https_only() {
        let sas = service_sas(&Secret::new("YWJjZA=="), &service(Some(SNAP), true)).unwrap();
        let q = query(&sas);
        assert_eq!(q["sr"], "bs");
        assert_eq!(q["sp"], "r");
        assert_eq!(q["spr"], "https");
        assert_eq!(q["sv"], SAS_VERSION);
        assert!(lifetime(&q) <= MAX_LIFETIME);
        // HMAC-SHA256 of the string-to-sign above with key "abcd", computed independently.
        assert_eq!(q["sig"], "TEdtmsnf6mL7GPhtZrBUAr7qHmUNeRquozngwfmlWMg=");
        for broad in ["ss", "srt", "snapshot", "si"] {
            assert!(!q.contains_key(broad), "{broad} in {sas}");
        }
    }

    #[test]
    fn service_sas_for_a_base_blob_and_an_http_endpoint() {
        let q = query(&service_sas(&Secret::new("YWJjZA=="), &service(None, false)).unwrap());
        assert_eq!(q["sr"], "b");
        assert_eq!(q["spr"], "https,http");
    }

    fn udk() -> UserDelegationKey {
        UserDelegationKey {
            signed_delegated_user_tid: None,
            signed_oid: Some("oid".into()),
            signed_tid: Some("tid".into()),
            signed_start: Some(T - Duration::hours(1)),
            signed_expiry: Some(T + Duration::hours(2)),
            signed_service: Some("b".into()),
            signed_version: Some("2025-11-05".into()),
            value: Some(b"testkey".to_vec()),
        }
    }

    fn delegation(snapshot: Option<&str>, https_only: bool, scope: DelegationScope) -> String {
        delegation_sas(
            &udk(),
            "acct",
            "raw",
            "dir/a b.csv",
            snapshot,
            T,
            T + Duration::minutes(30),
            https_only,
            scope,
        )
        .unwrap()
    }

    #[test]
    fn delegation_sas_names_the_snapshot_on_the_real_service() {
        let sas = delegation(Some(SNAP), true, DelegationScope::Exact);
        let q = query(&sas);
        assert_eq!(q["sr"], "bs");
        assert_eq!(q["sp"], "r");
        assert_eq!(q["spr"], "https");
        assert!(lifetime(&q) <= MAX_LIFETIME);
        assert!(!q.contains_key("snapshot"), "the URL carries it: {sas}");
        // The snapshot time is signed: a SAS for another snapshot has another signature.
        let other = query(&delegation(
            Some("2026-11-22T02:59:01.0000000Z"),
            true,
            DelegationScope::Exact,
        ));
        assert_ne!(q["sig"], other["sig"]);
        let base = query(&delegation(None, true, DelegationScope::Exact));
        assert_eq!(base["sr"], "b");
    }

    #[test]
    fn delegation_sas_on_the_emulator_is_blob_scoped() {
        let q = query(&delegation(
            Some(SNAP),
            false,
            DelegationScope::BlobOnEmulator,
        ));
        assert_eq!(q["sr"], "b");
        assert_eq!(q["spr"], "https,http");
        assert!(!q.contains_key("snapshot"));
    }

    #[test]
    fn only_path_style_loopback_endpoints_count_as_the_emulator() {
        let u = |s: &str| Url::parse(s).unwrap();
        assert!(is_path_style_emulator(
            &u("https://127.0.0.1:10000/devstoreaccount1"),
            "devstoreaccount1"
        ));
        assert!(is_path_style_emulator(
            &u("http://localhost:10000/acct/"),
            "acct"
        ));
        assert!(!is_path_style_emulator(
            &u("https://acct.blob.core.windows.net/"),
            "acct"
        ));
        assert!(!is_path_style_emulator(
            &u("https://acct.privatelink.blob.core.windows.net/acct"),
            "acct"
        ));
        assert!(!is_path_style_emulator(
            &u("https://127.0.0.1:10000/other"),
            "acct"
        ));
    }

    #[test]
    fn sas_is_appended_after_snapshot() {
        let url =
            url::Url::parse("http://h/acct/c/b?snapshot=2026-01-01T00:00:00.0000000Z").unwrap();
        assert_eq!(
            with_sas(url, "sv=1&sig=x").query().unwrap(),
            "snapshot=2026-01-01T00:00:00.0000000Z&sv=1&sig=x"
        );
        let url = url::Url::parse("http://h/acct/c/b?snapshot=s1&sv=1&sig=x").unwrap();
        assert_eq!(
            with_sas(url, "sv=1&sig=x&snapshot=s1").query().unwrap(),
            "snapshot=s1&sv=1&sig=x",
            "nothing twice"
        );
        let url = url::Url::parse("http://h/acct/c/b").unwrap();
        assert_eq!(with_sas(url, "sv=1&sig=x").query().unwrap(), "sv=1&sig=x");
    }
}
