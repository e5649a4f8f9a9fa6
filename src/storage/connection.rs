//! The Azure Functions connection convention, parsed once at start-up.
//!
//! For a connection named `X` the host (and so do we) reads either `X` as a connection string, or
//! `X__blobServiceUri` / `X__queueServiceUri` / `X__accountName` (+ `X__clientId`,
//! `X__credential`) for a managed-identity connection. Using the same convention as the host means
//! the queue trigger and our own clients can never point at different accounts.

use std::collections::HashMap;
use std::fmt;

use azure_core::credentials::Secret;
use url::Url;

/// Well-known key of the storage emulator's `devstoreaccount1`; public by design.
pub const DEVSTORE_ACCOUNT: &str = "devstoreaccount1";
pub const DEVSTORE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConnectionError {
    #[error("connection `{0}` is not configured: set `{0}` (connection string) or `{0}__blobServiceUri` / `{0}__accountName` (managed identity)")]
    Missing(String),
    #[error("connection `{name}`: {problem}")]
    Invalid { name: String, problem: String },
}

/// How requests to one account are authorised.
#[derive(Clone)]
pub enum Credential {
    /// Account name + key from a connection string: requests are signed with Shared Key.
    SharedKey { account: String, key: Secret },
    /// A SAS token from a connection string (`SharedAccessSignature=`), appended to every URL.
    Sas { token: Secret },
    /// Managed identity (ManagedIdentityCredential), optionally user-assigned.
    ManagedIdentity { client_id: Option<String> },
    /// The identity logged in to the Azure CLI (`az login`): an operator's terminal, where no
    /// managed identity exists and shared-key access is (rightly) disabled on the accounts.
    AzureCli,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::SharedKey { account, .. } => {
                write!(f, "SharedKey {{ account: {account}, key: <redacted> }}")
            }
            Credential::Sas { .. } => f.write_str("Sas { token: <redacted> }"),
            Credential::ManagedIdentity { client_id } => {
                write!(f, "ManagedIdentity {{ client_id: {client_id:?} }}")
            }
            Credential::AzureCli => f.write_str("AzureCli"),
        }
    }
}

/// One configured connection: endpoints plus how to authorise.
#[derive(Clone, Debug)]
pub struct Connection {
    /// The setting name (`SourceStorage`, ...), for error messages.
    pub name: String,
    pub account: String,
    pub blob_endpoint: Option<Url>,
    pub queue_endpoint: Option<Url>,
    pub credential: Credential,
    /// The Data Lake (dfs) endpoint: `X__dfsServiceUri`, else derived from the blob endpoint
    /// (`.blob.` -> `.dfs.`) when the account has a hierarchical namespace.
    pub dfs_endpoint: Option<Url>,
    /// The account has a hierarchical namespace (ADLS Gen2): set for the source by
    /// `LAKEGUARD_SOURCE_HNS`, for any other connection by `X__dfsServiceUri` or
    /// `X__hierarchicalNamespace=true`.
    pub hns: bool,
}

impl Connection {
    /// Reads connection `name` from the settings map using the Functions convention.
    pub fn from_settings(
        name: &str,
        vars: &HashMap<String, String>,
    ) -> Result<Self, ConnectionError> {
        let mut conn = Self::from_settings_base(name, vars)?;
        let get = |suffix: &str| {
            vars.get(&format!("{name}__{suffix}"))
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        if let Some(dfs) = get("dfsServiceUri") {
            conn.dfs_endpoint = Some(
                endpoint(&dfs)
                    .map_err(|e| invalid(name, format!("`{name}__dfsServiceUri`: {e}")))?,
            );
            conn.hns = true;
        }
        if let Some(v) = get("hierarchicalNamespace") {
            conn.hns = match v.to_ascii_lowercase().as_str() {
                "true" | "1" => true,
                "false" | "0" => false,
                other => {
                    return Err(invalid(
                        name,
                        format!(
                            "`{name}__hierarchicalNamespace` must be true or false, not `{other}`"
                        ),
                    ))
                }
            };
        }
        Ok(conn)
    }

    /// Marks the account hierarchical and makes sure a dfs endpoint is known (given, or derived
    /// from a `<account>.blob.<suffix>` endpoint).
    pub fn enable_hns(&mut self) -> Result<(), ConnectionError> {
        self.hns = true;
        if self.dfs_endpoint.is_none() {
            let blob = self.blob_endpoint()?.clone();
            self.dfs_endpoint = Some(derive_dfs(&blob).ok_or_else(|| {
                invalid(
                    &self.name,
                    format!(
                        "cannot derive the dfs endpoint from `{blob}` (no `.blob.` in the host); set `{}__dfsServiceUri`",
                        self.name
                    ),
                )
            })?);
        }
        Ok(())
    }

    /// The dfs endpoint (only for hierarchical accounts).
    pub fn dfs_endpoint(&self) -> Result<&Url, ConnectionError> {
        self.dfs_endpoint.as_ref().ok_or_else(|| {
            invalid(
                &self.name,
                format!(
                    "no dfs endpoint configured; set `{}__dfsServiceUri`",
                    self.name
                ),
            )
        })
    }

    fn from_settings_base(
        name: &str,
        vars: &HashMap<String, String>,
    ) -> Result<Self, ConnectionError> {
        if let Some(cs) = vars.get(name).filter(|v| !v.trim().is_empty()) {
            return Self::parse_connection_string(name, cs);
        }
        let get = |suffix: &str| {
            vars.get(&format!("{name}__{suffix}"))
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let blob_uri = get("blobServiceUri");
        let queue_uri = get("queueServiceUri");
        let account_name = get("accountName");
        if blob_uri.is_none() && queue_uri.is_none() && account_name.is_none() {
            return Err(ConnectionError::Missing(name.to_owned()));
        }
        let azure_cli = match get("credential") {
            None => false,
            Some(kind) if kind.eq_ignore_ascii_case("managedidentity") => false,
            Some(kind) if kind.eq_ignore_ascii_case("azurecli") => true,
            Some(kind) => {
                return Err(invalid(
                    name,
                    format!(
                        "`{name}__credential` must be `managedidentity` or `azurecli`, not `{kind}`"
                    ),
                ))
            }
        };
        if azure_cli && get("clientId").is_some() {
            return Err(invalid(
                name,
                format!("`{name}__clientId` selects a managed identity; it cannot be combined with `{name}__credential=azurecli`"),
            ));
        }
        let parse = |what: &str, v: Option<String>| -> Result<Option<Url>, ConnectionError> {
            v.map(|s| endpoint(&s).map_err(|e| invalid(name, format!("`{name}__{what}`: {e}"))))
                .transpose()
        };
        let mut blob_endpoint = parse("blobServiceUri", blob_uri)?;
        let mut queue_endpoint = parse("queueServiceUri", queue_uri)?;
        if let Some(acct) = &account_name {
            if blob_endpoint.is_none() {
                blob_endpoint = Some(
                    endpoint(&format!("https://{acct}.blob.core.windows.net"))
                        .map_err(|e| invalid(name, e))?,
                );
            }
            if queue_endpoint.is_none() {
                queue_endpoint = Some(
                    endpoint(&format!("https://{acct}.queue.core.windows.net"))
                        .map_err(|e| invalid(name, e))?,
                );
            }
        }
        for url in blob_endpoint.iter().chain(queue_endpoint.iter()) {
            if url.scheme() != "https" {
                return Err(invalid(
                    name,
                    format!("an identity connection needs https endpoints (bearer tokens are never sent over http), got {url}"),
                ));
            }
        }
        let account = account_name
            .or_else(|| blob_endpoint.as_ref().and_then(account_from_url))
            .or_else(|| queue_endpoint.as_ref().and_then(account_from_url))
            .ok_or_else(|| invalid(name, "cannot tell the account name; set `__accountName`"))?;
        Ok(Connection {
            name: name.to_owned(),
            account,
            blob_endpoint,
            queue_endpoint,
            credential: if azure_cli {
                Credential::AzureCli
            } else {
                Credential::ManagedIdentity {
                    client_id: get("clientId"),
                }
            },
            dfs_endpoint: None,
            hns: false,
        })
    }

    /// Parses a storage connection string (`UseDevelopmentStorage=true` included).
    pub fn parse_connection_string(name: &str, cs: &str) -> Result<Self, ConnectionError> {
        let mut parts: HashMap<String, String> = HashMap::new();
        for part in cs.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            // Keys and SAS tokens contain '=': split at the first one only.
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| invalid(name, "connection string has a part without `=`"))?;
            parts.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
        if parts
            .get("usedevelopmentstorage")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        {
            let host = parts
                .get("developmentstorageproxyuri")
                .map(|s| s.trim_end_matches('/').to_owned())
                .unwrap_or_else(|| "http://127.0.0.1".to_owned());
            return Ok(Connection {
                name: name.to_owned(),
                account: DEVSTORE_ACCOUNT.to_owned(),
                blob_endpoint: Some(
                    endpoint(&format!("{host}:10000/{DEVSTORE_ACCOUNT}"))
                        .map_err(|e| invalid(name, e))?,
                ),
                queue_endpoint: Some(
                    endpoint(&format!("{host}:10001/{DEVSTORE_ACCOUNT}"))
                        .map_err(|e| invalid(name, e))?,
                ),
                credential: Credential::SharedKey {
                    account: DEVSTORE_ACCOUNT.to_owned(),
                    key: Secret::new(DEVSTORE_KEY),
                },
                dfs_endpoint: None,
                hns: false,
            });
        }
        let protocol = parts
            .get("defaultendpointsprotocol")
            .map(String::as_str)
            .unwrap_or("https");
        let suffix = parts
            .get("endpointsuffix")
            .map(String::as_str)
            .unwrap_or("core.windows.net");
        let explicit = |key: &str| -> Result<Option<Url>, ConnectionError> {
            parts
                .get(key)
                .map(|s| endpoint(s).map_err(|e| invalid(name, format!("{key}: {e}"))))
                .transpose()
        };
        let mut blob_endpoint = explicit("blobendpoint")?;
        let mut queue_endpoint = explicit("queueendpoint")?;
        let account = parts
            .get("accountname")
            .cloned()
            .or_else(|| blob_endpoint.as_ref().and_then(account_from_url))
            .or_else(|| queue_endpoint.as_ref().and_then(account_from_url));
        if let Some(acct) = &account {
            if blob_endpoint.is_none() {
                blob_endpoint = Some(
                    endpoint(&format!("{protocol}://{acct}.blob.{suffix}"))
                        .map_err(|e| invalid(name, e))?,
                );
            }
            if queue_endpoint.is_none() {
                queue_endpoint = Some(
                    endpoint(&format!("{protocol}://{acct}.queue.{suffix}"))
                        .map_err(|e| invalid(name, e))?,
                );
            }
        }
        let account = account.ok_or_else(|| {
            invalid(
                name,
                "connection string names no AccountName and no endpoint",
            )
        })?;
        let credential = if let Some(key) = parts.get("accountkey") {
            if base64_len_ok(key) {
                Credential::SharedKey {
                    account: account.clone(),
                    key: Secret::new(key.clone()),
                }
            } else {
                return Err(invalid(name, "AccountKey is not valid base64"));
            }
        } else if let Some(sas) = parts.get("sharedaccesssignature") {
            Credential::Sas {
                token: Secret::new(sas.trim_start_matches('?').to_owned()),
            }
        } else {
            return Err(invalid(
                name,
                "connection string has neither AccountKey nor SharedAccessSignature",
            ));
        };
        Ok(Connection {
            name: name.to_owned(),
            account,
            blob_endpoint,
            queue_endpoint,
            credential,
            dfs_endpoint: None,
            hns: false,
        })
    }

    pub fn blob_endpoint(&self) -> Result<&Url, ConnectionError> {
        self.blob_endpoint
            .as_ref()
            .ok_or_else(|| invalid(&self.name, "no blob endpoint configured"))
    }

    pub fn queue_endpoint(&self) -> Result<&Url, ConnectionError> {
        self.queue_endpoint
            .as_ref()
            .ok_or_else(|| invalid(&self.name, "no queue endpoint configured"))
    }
}

fn invalid(name: &str, problem: impl Into<String>) -> ConnectionError {
    ConnectionError::Invalid {
        name: name.to_owned(),
        problem: problem.into(),
    }
}

fn base64_len_ok(key: &str) -> bool {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(key)
        .is_ok()
}

/// Parses an endpoint, normalised without a trailing slash so that path segments append cleanly.
fn endpoint(s: &str) -> Result<Url, String> {
    let url = Url::parse(s.trim()).map_err(|e| format!("`{s}` is not a URL: {e}"))?;
    if url.cannot_be_a_base() || !matches!(url.scheme(), "http" | "https") {
        return Err(format!("`{s}` is not an http(s) endpoint"));
    }
    if url.query().is_some() {
        return Err(
            "an endpoint must not carry a query (put a SAS in SharedAccessSignature=)".into(),
        );
    }
    let mut url = url;
    let path = url.path().trim_end_matches('/').to_owned();
    url.set_path(&path);
    Ok(url)
}

/// `https://acct.blob.core.windows.net/` -> `https://acct.dfs.core.windows.net/` (the same
/// account's Data Lake endpoint); `None` when the host has no `.blob.` label.
pub fn derive_dfs(blob: &Url) -> Option<Url> {
    let host = blob.host_str()?;
    let (head, tail) = host.split_once(".blob.")?;
    let mut url = blob.clone();
    url.set_host(Some(&format!("{head}.dfs.{tail}"))).ok()?;
    Some(url)
}

/// `https://acct.blob.core.windows.net` -> `acct`; emulator style `http://127.0.0.1:10000/acct` -> `acct`.
fn account_from_url(url: &Url) -> Option<String> {
    let first_segment = url
        .path_segments()
        .and_then(|mut s| s.next())
        .filter(|s| !s.is_empty());
    if let Some(seg) = first_segment {
        return Some(seg.to_owned());
    }
    let host = url.host_str()?;
    if host.parse::<std::net::IpAddr>().is_ok() || host == "localhost" {
        return None;
    }
    host.split('.').next().map(str::to_owned)
}

/// True when the endpoint addresses the account in the path (emulator style), which changes how
/// Shared Key canonicalises the resource and how URLs are built.
pub fn is_path_style(url: &Url) -> bool {
    url.path_segments()
        .and_then(|mut s| s.next())
        .is_some_and(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn development_storage() {
        let c =
            Connection::from_settings("S", &vars(&[("S", "UseDevelopmentStorage=true")])).unwrap();
        assert_eq!(c.account, "devstoreaccount1");
        assert_eq!(
            c.blob_endpoint.unwrap().as_str(),
            "http://127.0.0.1:10000/devstoreaccount1"
        );
        assert!(matches!(c.credential, Credential::SharedKey { .. }));
    }

    #[test]
    fn connection_string_with_explicit_endpoints_and_key_with_equals() {
        let cs = "DefaultEndpointsProtocol=http;AccountName=backupacct;AccountKey=YWJjZA==;BlobEndpoint=http://127.0.0.1:5000/backupacct;";
        let c = Connection::parse_connection_string("B", cs).unwrap();
        assert_eq!(c.account, "backupacct");
        assert_eq!(
            c.blob_endpoint.as_ref().unwrap().as_str(),
            "http://127.0.0.1:5000/backupacct"
        );
        assert_eq!(
            c.queue_endpoint.as_ref().unwrap().as_str(),
            "http://backupacct.queue.core.windows.net/"
        );
        match c.credential {
            Credential::SharedKey { key, .. } => assert_eq!(key.secret(), "YWJjZA=="),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn public_cloud_connection_string() {
        let cs = "DefaultEndpointsProtocol=https;AccountName=lake;AccountKey=YWJjZA==;EndpointSuffix=core.windows.net";
        let c = Connection::parse_connection_string("S", cs).unwrap();
        assert_eq!(
            c.blob_endpoint.unwrap().as_str(),
            "https://lake.blob.core.windows.net/"
        );
    }

    #[test]
    fn identity_connection() {
        let v = vars(&[
            (
                "S__blobServiceUri",
                "https://127.0.0.1:1234/devstoreaccount1",
            ),
            ("S__clientId", "abc"),
        ]);
        let c = Connection::from_settings("S", &v).unwrap();
        assert_eq!(c.account, "devstoreaccount1");
        assert!(
            matches!(c.credential, Credential::ManagedIdentity { client_id: Some(ref id) } if id == "abc")
        );
        let v = vars(&[("S__accountName", "lake")]);
        let c = Connection::from_settings("S", &v).unwrap();
        assert_eq!(
            c.queue_endpoint.unwrap().as_str(),
            "https://lake.queue.core.windows.net/"
        );
        let v = vars(&[("S__accountName", "lake"), ("S__credential", "AzureCli")]);
        let c = Connection::from_settings("S", &v).unwrap();
        assert!(matches!(c.credential, Credential::AzureCli));
        let v = vars(&[
            ("S__accountName", "lake"),
            ("S__credential", "managedidentity"),
        ]);
        let c = Connection::from_settings("S", &v).unwrap();
        assert!(matches!(
            c.credential,
            Credential::ManagedIdentity { client_id: None }
        ));
    }

    #[test]
    fn rejects_bad_input_clearly() {
        assert!(matches!(
            Connection::from_settings("S", &vars(&[])),
            Err(ConnectionError::Missing(ref n)) if n == "S"
        ));
        let err = Connection::from_settings("S", &vars(&[("S__blobServiceUri", "http://x/acct")]))
            .unwrap_err();
        assert!(err.to_string().contains("https"), "{err}");
        let err = Connection::parse_connection_string("S", "AccountName=a;AccountKey=not base64!")
            .unwrap_err();
        assert!(err.to_string().contains("base64"));
        let err = Connection::from_settings(
            "S",
            &vars(&[("S__accountName", "a"), ("S__credential", "secret")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("managedidentity"));
        assert!(err.to_string().contains("azurecli"));
        let err = Connection::from_settings(
            "S",
            &vars(&[
                ("S__accountName", "a"),
                ("S__credential", "azurecli"),
                ("S__clientId", "abc"),
            ]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("S__clientId"), "{err}");
        let err = Connection::from_settings(
            "S",
            &vars(&[
                ("S__blobServiceUri", "http://127.0.0.1:1/acct"),
                ("S__credential", "azurecli"),
            ]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("https"), "{err}");
    }

    #[test]
    fn dfs_endpoint_given_or_derived() {
        let mut c = Connection::from_settings("S", &vars(&[("S__accountName", "lake")])).unwrap();
        assert!(!c.hns && c.dfs_endpoint.is_none());
        c.enable_hns().unwrap();
        assert_eq!(
            c.dfs_endpoint().unwrap().as_str(),
            "https://lake.dfs.core.windows.net/"
        );
        let v = vars(&[
            ("S", "UseDevelopmentStorage=true"),
            ("S__dfsServiceUri", "http://127.0.0.1:7777/devstoreaccount1"),
        ]);
        let c = Connection::from_settings("S", &v).unwrap();
        assert!(c.hns);
        assert_eq!(
            c.dfs_endpoint.unwrap().as_str(),
            "http://127.0.0.1:7777/devstoreaccount1"
        );
        let mut c =
            Connection::from_settings("S", &vars(&[("S", "UseDevelopmentStorage=true")])).unwrap();
        let e = c.enable_hns().unwrap_err().to_string();
        assert!(e.contains("S__dfsServiceUri"), "{e}");
        let e = Connection::from_settings(
            "S",
            &vars(&[("S__accountName", "a"), ("S__hierarchicalNamespace", "yes")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("hierarchicalNamespace"));
    }

    #[test]
    fn debug_never_shows_the_key() {
        let c = Connection::parse_connection_string("S", "AccountName=a;AccountKey=c2VjcmV0a2V5")
            .unwrap();
        assert!(!format!("{c:?}").contains("c2VjcmV0a2V5"));
    }
}
