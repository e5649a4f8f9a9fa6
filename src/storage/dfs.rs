//! ADLS Gen2 (hierarchical namespace) requests that no Rust crate offers.
//!
//! `azure_storage_blob` 1.1 has no `ListBlobsIncludeItem::Permissions` and its `BlobItem` has no
//! Owner / Group / Permissions / Acl / ResourceType, and there is no maintained Rust crate for the
//! Data Lake (dfs) endpoint. So four small requests are written here by hand, sent through the
//! connection's own pipeline ([`BlobStore::raw_pipeline`]: same transport, retries, Shared Key or
//! bearer token, SAS):
//! - List Blobs with `include=permissions` (service version 2020-06-12 or later): one page, parsed
//!   twice — by the SDK's own `ListBlobsResponse` model for every standard field (names,
//!   properties, metadata, snapshots) and by a small model here for the five HNS fields, matched
//!   by position in the page. Memory stays one page.
//! - Path Get Properties `action=getAccessControl` (HEAD), Path Update
//!   `action=setAccessControl` (PATCH; `x-ms-permissions` and `x-ms-acl` are mutually exclusive,
//!   the ACL carries the owner's, the owning group's and the others' permissions), and Path
//!   Create `resource=directory` (PUT).

use azure_core::http::{Context, Method, Request};
use serde::Deserialize;
use time::OffsetDateTime;
use url::Url;

use super::blob::{entry_from_item, ListOptions, ListPage};
use super::{BlobStore, StorageError};
use crate::model::metadata::HDI_ISFOLDER;
use crate::model::{Etag, Security};

/// The service version of the hand-written requests: `include=permissions` needs 2020-06-12 or
/// later; this is the one the SDK's clients send.
pub const HNS_API_VERSION: &str = "2026-04-06";

#[derive(Debug, Default, Deserialize)]
struct HnsEnumeration {
    #[serde(rename = "Blobs", default)]
    blobs: HnsBlobs,
}

#[derive(Debug, Default, Deserialize)]
struct HnsBlobs {
    #[serde(rename = "Blob", default)]
    blob: Vec<HnsBlob>,
}

#[derive(Debug, Default, Deserialize)]
struct HnsBlob {
    #[serde(rename = "Properties", default)]
    properties: HnsProperties,
}

#[derive(Debug, Default, Deserialize)]
struct HnsProperties {
    #[serde(rename = "Owner")]
    owner: Option<String>,
    #[serde(rename = "Group")]
    group: Option<String>,
    #[serde(rename = "Permissions")]
    permissions: Option<String>,
    #[serde(rename = "Acl")]
    acl: Option<String>,
    #[serde(rename = "ResourceType")]
    resource_type: Option<String>,
}

fn security_of(p: &HnsProperties) -> Option<Security> {
    // Owner, group and permissions come together; an ACL-less answer is an empty ACL.
    Some(Security {
        owner: p.owner.clone()?,
        group: p.group.clone()?,
        permissions: p.permissions.clone()?,
        acl: p.acl.clone().unwrap_or_default(),
    })
}

/// Parses one List Blobs page of a hierarchical account (for [`list_page_with_permissions`] and
/// unit tests): SDK model for the standard fields, ours for the HNS ones.
pub fn parse_hns_page(
    body: &[u8],
    what: &str,
) -> Result<(Vec<crate::model::BlobEntry>, Option<String>), StorageError> {
    let bad = |detail: String| StorageError::Permanent {
        what: what.to_owned(),
        detail,
    };
    let sdk: azure_storage_blob::models::ListBlobsResponse =
        azure_core::xml::from_xml(body).map_err(|e| bad(format!("listing XML: {e}")))?;
    let ours: HnsEnumeration =
        azure_core::xml::from_xml(body).map_err(|e| bad(format!("listing XML: {e}")))?;
    if ours.blobs.blob.len() != sdk.blob_items.len() {
        return Err(bad(format!(
            "listing XML: {} rows, {} with properties",
            sdk.blob_items.len(),
            ours.blobs.blob.len()
        )));
    }
    let mut entries = Vec::with_capacity(sdk.blob_items.len());
    for (item, hns) in sdk.blob_items.into_iter().zip(ours.blobs.blob) {
        let mut entry = entry_from_item(item).map_err(bad)?;
        entry.security = security_of(&hns.properties);
        let is_dir = hns
            .properties
            .resource_type
            .as_deref()
            .is_some_and(|t| t.eq_ignore_ascii_case("directory"));
        if is_dir {
            // One marker for directories everywhere in lakeguard: `hdi_isfolder=true`, zero length.
            entry.metadata.insert(HDI_ISFOLDER.into(), "true".into());
            entry.content_length = 0;
        }
        entries.push(entry);
    }
    Ok((entries, sdk.next_marker.filter(|m| !m.is_empty())))
}

/// One page of a container listing with `include=permissions` (plus snapshots / metadata as
/// `opts` asks), hand-written (see the module doc).
pub async fn list_page_with_permissions(
    store: &BlobStore,
    container: &str,
    opts: &ListOptions,
    marker: Option<String>,
) -> Result<ListPage, StorageError> {
    let what = format!("list {container}");
    let mut url = store.url(container, None, None);
    {
        let mut include = Vec::new();
        if opts.snapshots {
            include.push("snapshots");
        }
        if opts.metadata {
            include.push("metadata");
        }
        include.push("permissions");
        let sas = url.query().map(str::to_owned);
        url.set_query(None);
        let mut q = url.query_pairs_mut();
        q.append_pair("restype", "container");
        q.append_pair("comp", "list");
        q.append_pair("include", &include.join(","));
        if let Some(p) = &opts.prefix {
            q.append_pair("prefix", p);
        }
        if let Some(m) = &marker {
            q.append_pair("marker", m);
        }
        if let Some(n) = opts.max_results {
            q.append_pair("maxresults", &n.to_string());
        }
        drop(q);
        if let Some(sas) = sas {
            let full = format!("{}&{sas}", url.query().unwrap_or_default());
            url.set_query(Some(&full));
        }
    }
    let rsp = send(store, url, Method::Get, &[], &what).await?;
    let served_at = rsp
        .headers()
        .get_optional_str(&azure_core::http::headers::HeaderName::from_static("date"))
        .and_then(|d| azure_core::time::parse_rfc7231(d).ok());
    let (entries, next_marker) = parse_hns_page(rsp.body(), &what)?;
    Ok(ListPage {
        entries,
        next_marker,
        served_at,
    })
}

async fn send(
    store: &BlobStore,
    url: Url,
    method: Method,
    headers: &[(&'static str, String)],
    what: &str,
) -> Result<azure_core::http::RawResponse, StorageError> {
    let mut req = Request::new(url, method);
    req.insert_header("x-ms-version", HNS_API_VERSION);
    for (k, v) in headers {
        req.insert_header(*k, v.clone());
    }
    store
        .raw_pipeline()
        .send(&Context::new(), &mut req, None)
        .await
        .map_err(|e| StorageError::from_azure(what, e))
}

/// What to set on a path with Path Update `action=setAccessControl`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessChange {
    pub owner: Option<String>,
    pub group: Option<String>,
    /// Exclusive with `acl` (the service refuses both).
    pub permissions: Option<String>,
    pub acl: Option<String>,
}

impl BlobStore {
    /// URL of a path on the dfs endpoint (same segment encoding as blob URLs; dot segments are
    /// refused like there).
    pub fn dfs_url(&self, filesystem: &str, path: &str, query: &str) -> Result<Url, StorageError> {
        crate::model::check_addressable(path).map_err(|detail| StorageError::Permanent {
            what: format!("path {filesystem}/{path}"),
            detail,
        })?;
        let mut url = self
            .connection()
            .dfs_endpoint()
            .map_err(|e| StorageError::Permanent {
                what: format!("path {filesystem}/{path}"),
                detail: e.to_string(),
            })?
            .clone();
        {
            let mut segs = url
                .path_segments_mut()
                .map_err(|_| StorageError::Permanent {
                    what: format!("path {filesystem}/{path}"),
                    detail: "the dfs endpoint is not a base URL".into(),
                })?;
            segs.pop_if_empty();
            segs.push(filesystem);
            for part in path.split('/') {
                segs.push(part);
            }
        }
        let mut q = query.to_owned();
        if let Some(sas) = self.sas() {
            q = format!("{q}&{sas}");
        }
        url.set_query(Some(&q));
        Ok(url)
    }

    /// Path Get Properties `action=getAccessControl`: owner, group, permissions, ACL.
    pub async fn get_access_control(
        &self,
        filesystem: &str,
        path: &str,
    ) -> Result<Security, StorageError> {
        let what = format!("get access control of {filesystem}/{path}");
        let url = self.dfs_url(filesystem, path, "action=getAccessControl&upn=false")?;
        let rsp = send(self, url, Method::Head, &[], &what).await?;
        let h = |n: &'static str| {
            rsp.headers()
                .get_optional_str(&azure_core::http::headers::HeaderName::from_static(n))
                .map(str::to_owned)
        };
        match (h("x-ms-owner"), h("x-ms-group"), h("x-ms-permissions")) {
            (Some(owner), Some(group), Some(permissions)) => Ok(Security {
                owner,
                group,
                permissions,
                acl: h("x-ms-acl").unwrap_or_default(),
            }),
            _ => Err(StorageError::Permanent {
                what,
                detail: "no x-ms-owner / x-ms-group / x-ms-permissions in the answer (is the account hierarchical?)".into(),
            }),
        }
    }

    /// Path Update `action=setAccessControl`, `If-Match` the ETag given (the path as the caller
    /// last saw it; 412 when it changed). Refuses `permissions` together with `acl` before
    /// sending (the service would answer 400). Returns the ETag the answer carries: the docs do
    /// not say whether an access-control change gives the path a new one, so the caller chains
    /// conditions on the answer, never on its own assumption.
    pub async fn set_access_control(
        &self,
        filesystem: &str,
        path: &str,
        change: &AccessChange,
        if_match: Option<&Etag>,
    ) -> Result<Option<Etag>, StorageError> {
        let what = format!("set access control of {filesystem}/{path}");
        if change.permissions.is_some() && change.acl.is_some() {
            return Err(StorageError::Permanent {
                what,
                detail: "x-ms-permissions and x-ms-acl are mutually exclusive".into(),
            });
        }
        let mut headers = Vec::new();
        for (k, v) in [
            ("x-ms-owner", &change.owner),
            ("x-ms-group", &change.group),
            ("x-ms-permissions", &change.permissions),
            ("x-ms-acl", &change.acl),
        ] {
            if let Some(v) = v {
                headers.push((k, v.clone()));
            }
        }
        if headers.is_empty() {
            return Ok(if_match.cloned());
        }
        if let Some(e) = if_match {
            headers.push(("if-match", e.quoted()));
        }
        let url = self.dfs_url(filesystem, path, "action=setAccessControl")?;
        let rsp = send(self, url, Method::Patch, &headers, &what).await?;
        Ok(etag_of(&rsp))
    }

    /// A directory at `path`, created if nothing is there (Path Create `resource=directory`,
    /// `If-None-Match: *`): its ETag. Something already there counts only if it is a directory
    /// (a file of that name is an error, never "created").
    pub async fn ensure_directory(
        &self,
        filesystem: &str,
        path: &str,
    ) -> Result<Etag, StorageError> {
        let what = format!("create directory {filesystem}/{path}");
        let url = self.dfs_url(filesystem, path, "resource=directory")?;
        match send(
            self,
            url,
            Method::Put,
            &[("if-none-match", "*".to_owned())],
            &what,
        )
        .await
        {
            Ok(rsp) => match etag_of(&rsp) {
                Some(e) => Ok(e),
                None => Ok(self.properties(filesystem, path, None).await?.etag),
            },
            Err(e) if e.is_precondition_failed() || matches!(e, StorageError::Conflict { .. }) => {
                let p = self.properties(filesystem, path, None).await?;
                if p.metadata
                    .get(HDI_ISFOLDER)
                    .is_some_and(|v| v.eq_ignore_ascii_case("true"))
                {
                    Ok(p.etag)
                } else {
                    Err(StorageError::Permanent {
                        what,
                        detail: "a file of that name is there".into(),
                    })
                }
            }
            Err(e) => Err(e),
        }
    }
}

fn etag_of(rsp: &azure_core::http::RawResponse) -> Option<Etag> {
    rsp.headers()
        .get_optional_str(&azure_core::http::headers::HeaderName::from_static("etag"))
        .map(Etag::new)
}

/// The time a listing page was served, or now: when a security state was observed.
pub fn observed_at(served_at: Option<OffsetDateTime>) -> OffsetDateTime {
    served_at.unwrap_or_else(OffsetDateTime::now_utc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hns_fields_and_directories() {
        let xml = r#"<?xml version="1.0" encoding="utf-8"?>
<EnumerationResults ServiceEndpoint="https://lake.blob.core.windows.net/" ContainerName="raw">
  <Blobs>
    <Blob>
      <Name>dir</Name>
      <Properties>
        <Last-Modified>Tue, 01 Dec 2026 10:00:00 GMT</Last-Modified>
        <Etag>0x8D1</Etag>
        <Content-Length>0</Content-Length>
        <Owner>alice</Owner><Group>staff</Group><Permissions>rwxr-x---+</Permissions>
        <Acl>user::rwx,group::r-x,other::---,default:user::rwx</Acl>
        <ResourceType>directory</ResourceType>
      </Properties>
      <Metadata />
    </Blob>
    <Blob>
      <Name>dir/a b.csv</Name>
      <Properties>
        <Last-Modified>Tue, 01 Dec 2026 10:00:01 GMT</Last-Modified>
        <Etag>0x8D2</Etag>
        <Content-Length>5</Content-Length>
        <Content-Type>text/csv</Content-Type>
        <Owner>bob</Owner><Group>staff</Group><Permissions>rw-r-----</Permissions>
        <Acl>user::rw-,group::r--,other::---</Acl>
        <ResourceType>file</ResourceType>
      </Properties>
      <Metadata><k>v</k></Metadata>
    </Blob>
    <Blob>
      <Name>plain</Name>
      <Properties>
        <Last-Modified>Tue, 01 Dec 2026 10:00:01 GMT</Last-Modified>
        <Etag>0x8D3</Etag>
        <Content-Length>1</Content-Length>
      </Properties>
    </Blob>
  </Blobs>
  <NextMarker>abc</NextMarker>
</EnumerationResults>"#;
        let (entries, next) = parse_hns_page(xml.as_bytes(), "list raw").unwrap();
        assert_eq!(next.as_deref(), Some("abc"));
        assert_eq!(entries.len(), 3);
        assert!(entries[0].is_directory_placeholder());
        let s = entries[0].security.as_ref().unwrap();
        assert_eq!(s.owner, "alice");
        assert!(s.has_default_acl());
        assert_eq!(entries[1].name, "dir/a b.csv");
        assert!(!entries[1].is_directory_placeholder());
        assert_eq!(entries[1].security.as_ref().unwrap().owner, "bob");
        assert_eq!(entries[1].meta("k"), Some("v"));
        assert_eq!(entries[2].security, None, "no owner: no security state");
    }
}
