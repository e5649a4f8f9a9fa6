//! `BlobStore`: the blob operations lakeguard needs, over the official `azure_storage_blob` clients,
//! returning our model types and classified errors.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use azure_core::credentials::TokenCredential;
use azure_core::http::policies::Policy;
use azure_core::http::{ClientMethodOptions, ClientOptions, Context, RequestContent};
use azure_storage_blob::models::{
    BlobClientAcquireLeaseOptions, BlobClientAcquireLeaseResultHeaders,
    BlobClientCreateSnapshotOptions, BlobClientCreateSnapshotResultHeaders,
    BlobClientDeleteOptions, BlobClientGetPropertiesOptions, BlobClientGetPropertiesResultHeaders,
    BlobClientReleaseLeaseOptions, BlobClientRenewLeaseOptions, BlobClientSetMetadataOptions,
    BlobClientStartCopyFromUrlOptions, BlobClientStartCopyFromUrlResultHeaders,
    BlobContainerClientListBlobsOptions, BlobItem, BlobServiceClientListContainersOptions,
    BlockBlobClientCommitBlockListOptions, BlockBlobClientCommitBlockListResultHeaders,
    BlockBlobClientStageBlockFromUrlOptions, BlockBlobClientUploadOptions, BlockLookupList,
    HttpRange, ListBlobsIncludeItem,
};
use azure_storage_blob::{
    BlobClient, BlobClientOptions, BlobContainerClient, BlobContainerClientOptions,
    BlobServiceClient, BlobServiceClientOptions,
};
use futures::TryStreamExt;
use time::OffsetDateTime;
use url::Url;

use super::connection::Connection;
use super::error::StorageError;
use super::{Clients, ExtraHeaders};
use crate::model::{BlobEntry, Etag};

/// One page of a listing. Memory is bounded by the page, never by the container.
#[derive(Debug, Default)]
pub struct ListPage {
    pub entries: Vec<BlobEntry>,
    pub next_marker: Option<String>,
    /// The service's `Date` on the response: its clock, which also sets Last-Modified.
    pub served_at: Option<OffsetDateTime>,
}

#[derive(Clone, Debug, Default)]
pub struct ListOptions {
    pub prefix: Option<String>,
    pub snapshots: bool,
    pub metadata: bool,
    pub max_results: Option<u32>,
}

/// Properties of one blob or snapshot, from a HEAD.
#[derive(Clone, Debug)]
pub struct BlobProperties {
    pub etag: Etag,
    pub last_modified: OffsetDateTime,
    pub content_length: u64,
    pub content_type: Option<String>,
    pub content_md5: Option<Vec<u8>>,
    pub metadata: BTreeMap<String, String>,
}

/// The standard HTTP headers stored with a blob: what Copy Blob From URL copies from its source
/// and what Put Block List must be given explicitly (`x-ms-blob-content-*`, `x-ms-blob-cache-control`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContentHeaders {
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub content_language: Option<String>,
    pub content_disposition: Option<String>,
    pub cache_control: Option<String>,
    pub content_md5: Option<Vec<u8>>,
}

/// A snapshot just made: its id (`x-ms-snapshot`) and, when the service sent one, its ETag, which
/// lets a later copy read it with `x-ms-source-if-match` without a HEAD first.
#[derive(Clone, Debug)]
pub struct SnapshotTaken {
    pub id: String,
    pub etag: Option<Etag>,
}

/// A block blob's size limit for one synchronous Copy Blob From URL.
pub const SYNC_COPY_MAX: u64 = 256 * 1024 * 1024;

#[derive(Clone)]
pub struct BlobStore {
    account: String,
    endpoint: Url,
    credential: Option<Arc<dyn TokenCredential>>,
    options: ClientOptions,
    /// SAS from a connection string, appended to every URL we build.
    sas: Option<String>,
    connection: Connection,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlobStore({})", self.account)
    }
}

fn ctx_with(extra: ExtraHeaders) -> ClientMethodOptions<'static> {
    ClientMethodOptions {
        context: Context::new().with_value(extra),
    }
}

impl BlobStore {
    pub fn new(clients: &Clients, conn: &Connection) -> Result<Self, StorageError> {
        let endpoint = conn
            .blob_endpoint()
            .map_err(|e| StorageError::Permanent {
                what: conn.name.clone(),
                detail: e.to_string(),
            })?
            .clone();
        let (credential, per_try, sas): (_, Vec<Arc<dyn Policy>>, _) = clients.auth_for(conn)?;
        Ok(BlobStore {
            account: conn.account.clone(),
            endpoint,
            credential,
            options: clients.client_options(per_try),
            sas,
            connection: conn.clone(),
        })
    }

    pub fn account(&self) -> &str {
        &self.account
    }

    /// The blob service endpoint (`https://<account>.blob.core.windows.net/`, or a path-style
    /// emulator endpoint ending in the account).
    pub fn endpoint(&self) -> &Url {
        &self.endpoint
    }

    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// URL of a blob or snapshot, refused for a name a URL cannot address exactly
    /// ([`crate::model::check_addressable`]: `.` / `..` segments would be normalised onto
    /// another blob). Every blob request goes through this.
    pub fn blob_url(
        &self,
        container: &str,
        blob: &str,
        snapshot: Option<&str>,
    ) -> Result<Url, StorageError> {
        crate::model::check_addressable(blob).map_err(|detail| StorageError::Permanent {
            what: format!("blob {container}/{blob}"),
            detail,
        })?;
        Ok(self.url(container, Some(blob), snapshot))
    }

    /// URL of a container, or of a blob (each `/`-separated part of the name is one path
    /// segment, percent-encoded: `#`, `?`, `%` and spaces in names are safe), or of a snapshot.
    /// Blob URLs for requests come from [`blob_url`](Self::blob_url), which refuses names with
    /// dot segments (this function would silently drop them).
    pub fn url(&self, container: &str, blob: Option<&str>, snapshot: Option<&str>) -> Url {
        let mut url = self.endpoint.clone();
        {
            let mut segs = url
                .path_segments_mut()
                .expect("validated endpoint is a base URL");
            segs.pop_if_empty();
            segs.push(container);
            if let Some(name) = blob {
                for part in name.split('/') {
                    segs.push(part);
                }
            }
        }
        let mut query = Vec::new();
        if let Some(s) = snapshot {
            query.push(format!(
                "snapshot={}",
                percent_encoding::utf8_percent_encode(s, QUERY)
            ));
        }
        if let Some(sas) = &self.sas {
            query.push(sas.clone());
        }
        if !query.is_empty() {
            url.set_query(Some(&query.join("&")));
        }
        url
    }

    pub(crate) fn service_client(&self) -> Result<BlobServiceClient, StorageError> {
        let mut url = self.endpoint.clone();
        if let Some(sas) = &self.sas {
            url.set_query(Some(sas));
        }
        BlobServiceClient::new(
            url,
            self.credential.clone(),
            Some(BlobServiceClientOptions {
                client_options: self.options.clone(),
                ..Default::default()
            }),
        )
        .map_err(|e| StorageError::from_azure("blob service client", e))
    }

    fn container(&self, container: &str) -> Result<BlobContainerClient, StorageError> {
        BlobContainerClient::new(
            self.url(container, None, None),
            self.credential.clone(),
            Some(BlobContainerClientOptions {
                client_options: self.options.clone(),
                ..Default::default()
            }),
        )
        .map_err(|e| StorageError::from_azure(format!("container {container}"), e))
    }

    pub fn blob(
        &self,
        container: &str,
        blob: &str,
        snapshot: Option<&str>,
    ) -> Result<BlobClient, StorageError> {
        BlobClient::new(
            self.blob_url(container, blob, snapshot)?,
            self.credential.clone(),
            Some(BlobClientOptions {
                client_options: self.options.clone(),
                ..Default::default()
            }),
        )
        .map_err(|e| StorageError::from_azure(format!("blob {container}/{blob}"), e))
    }

    /// A pipeline for requests the SDK has no method for (List Blobs `include=permissions`,
    /// the dfs endpoint's access control and directory operations): the same transport, retry
    /// policy and authorisation as every SDK client of this connection (Shared Key signing among
    /// the per-try policies, or a bearer token for `https://storage.azure.com`).
    pub(crate) fn raw_pipeline(&self) -> azure_core::http::Pipeline {
        let mut per_try: Vec<Arc<dyn Policy>> = Vec::new();
        if let Some(cred) = &self.credential {
            per_try.push(Arc::new(
                azure_core::http::policies::auth::BearerTokenAuthorizationPolicy::new(
                    cred.clone(),
                    vec!["https://storage.azure.com/.default"],
                ),
            ));
        }
        azure_core::http::Pipeline::new(
            option_env!("CARGO_PKG_NAME"),
            option_env!("CARGO_PKG_VERSION"),
            self.options.clone(),
            Vec::new(),
            per_try,
            None,
        )
    }

    /// The SAS of a SAS connection (appended to every URL we build).
    pub(crate) fn sas(&self) -> Option<&str> {
        self.sas.as_deref()
    }

    /// One page of a container listing, starting at `marker`. On a hierarchical-namespace
    /// account the listing also carries each path's security state and directories
    /// ([`super::dfs`]).
    pub async fn list_page(
        &self,
        container: &str,
        opts: &ListOptions,
        marker: Option<String>,
    ) -> Result<ListPage, StorageError> {
        if self.connection.hns {
            return super::dfs::list_page_with_permissions(self, container, opts, marker).await;
        }
        let mut include = Vec::new();
        if opts.snapshots {
            include.push(ListBlobsIncludeItem::Snapshots);
        }
        if opts.metadata {
            include.push(ListBlobsIncludeItem::Metadata);
        }
        let options = BlobContainerClientListBlobsOptions {
            include: (!include.is_empty()).then_some(include),
            marker,
            maxresults: opts.max_results.map(|n| n as i32),
            prefix: opts.prefix.clone(),
            ..Default::default()
        };
        let what = format!("list {container}");
        let mut pages = self
            .container(container)?
            .list_blobs(Some(options))
            .map_err(|e| StorageError::from_azure(&what, e))?
            .into_pages();
        let page = pages
            .try_next()
            .await
            .map_err(|e| StorageError::from_azure(&what, e))?;
        let Some(page) = page else {
            return Ok(ListPage::default());
        };
        let served_at = page
            .headers()
            .get_optional_str(&azure_core::http::headers::HeaderName::from_static("date"))
            .and_then(|d| azure_core::time::parse_rfc7231(d).ok());
        let body = page
            .into_model()
            .map_err(|e| StorageError::from_azure(&what, e))?;
        let mut entries = Vec::with_capacity(body.blob_items.len());
        for item in body.blob_items {
            entries.push(
                entry_from_item(item).map_err(|detail| StorageError::Permanent {
                    what: what.clone(),
                    detail,
                })?,
            );
        }
        Ok(ListPage {
            entries,
            next_marker: body.next_marker.filter(|m| !m.is_empty()),
            served_at,
        })
    }

    /// Every row (base blob and snapshots, with metadata) of exactly `name`, any order.
    ///
    /// A prefix listing also returns longer names (`a.txt.bak` for `a.txt`), so rows are filtered
    /// by equality; and since the exact name sorts before every longer name with that prefix in
    /// every order, the listing stops at the first other name. Default page size: Azurite loses
    /// snapshot rows at page boundaries inside one name.
    pub async fn list_versions(
        &self,
        container: &str,
        name: &str,
    ) -> Result<Vec<BlobEntry>, StorageError> {
        let opts = ListOptions {
            prefix: Some(name.to_owned()),
            snapshots: true,
            metadata: true,
            max_results: None,
        };
        let mut out = Vec::new();
        let mut marker = None;
        loop {
            let page = self.list_page(container, &opts, marker.take()).await?;
            let mut past = false;
            for e in page.entries {
                if e.name == name {
                    out.push(e);
                } else {
                    past = true;
                }
            }
            match page.next_marker {
                Some(m) if !past => marker = Some(m),
                _ => return Ok(out),
            }
        }
    }

    /// One page of container names.
    pub async fn list_containers_page(
        &self,
        marker: Option<String>,
    ) -> Result<(Vec<String>, Option<String>), StorageError> {
        let what = "list containers";
        let options = BlobServiceClientListContainersOptions {
            marker,
            ..Default::default()
        };
        let mut pages = self
            .service_client()?
            .list_containers(Some(options))
            .map_err(|e| StorageError::from_azure(what, e))?
            .into_pages();
        let Some(page) = pages
            .try_next()
            .await
            .map_err(|e| StorageError::from_azure(what, e))?
        else {
            return Ok((vec![], None));
        };
        let body = page
            .into_model()
            .map_err(|e| StorageError::from_azure(what, e))?;
        let names = body
            .container_items
            .into_iter()
            .filter_map(|c| c.name)
            .collect();
        Ok((names, body.next_marker.filter(|m| !m.is_empty())))
    }

    /// Whether the container exists. Only a real 404 is "no"; throttling or 403 is an error.
    pub async fn container_exists(&self, container: &str) -> Result<bool, StorageError> {
        match self.container(container)?.get_properties(None).await {
            Ok(_) => Ok(true),
            Err(e) => {
                let err = StorageError::from_azure(format!("container {container}"), e);
                if err.is_not_found() {
                    Ok(false)
                } else {
                    Err(err)
                }
            }
        }
    }

    /// Creates the container unless it exists (409 ContainerAlreadyExists is success).
    pub async fn ensure_container(&self, container: &str) -> Result<(), StorageError> {
        match self.container(container)?.create(None).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let err = StorageError::from_azure(format!("create container {container}"), e);
                match &err {
                    StorageError::Conflict { code, .. } if code == "ContainerAlreadyExists" => {
                        Ok(())
                    }
                    _ => Err(err),
                }
            }
        }
    }

    pub async fn delete_container(&self, container: &str) -> Result<(), StorageError> {
        match self.container(container)?.delete(None).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let err = StorageError::from_azure(format!("delete container {container}"), e);
                if err.is_not_found() {
                    Ok(())
                } else {
                    Err(err)
                }
            }
        }
    }

    /// HEAD of a blob or snapshot.
    pub async fn properties(
        &self,
        container: &str,
        blob: &str,
        snapshot: Option<&str>,
    ) -> Result<BlobProperties, StorageError> {
        let what = format!("properties of {container}/{blob}");
        let rsp = self
            .blob(container, blob, snapshot)?
            .get_properties(Some(BlobClientGetPropertiesOptions::default()))
            .await
            .map_err(|e| StorageError::from_azure(&what, e))?;
        let bad = |detail: String| StorageError::Permanent {
            what: what.clone(),
            detail,
        };
        Ok(BlobProperties {
            etag: rsp
                .etag()
                .map_err(|e| bad(e.to_string()))?
                .map(|e| Etag::new(&e))
                .ok_or_else(|| bad("no ETag".into()))?,
            last_modified: rsp
                .last_modified()
                .map_err(|e| bad(e.to_string()))?
                .ok_or_else(|| bad("no Last-Modified".into()))?,
            content_length: rsp
                .content_length()
                .map_err(|e| bad(e.to_string()))?
                .unwrap_or(0),
            content_type: rsp.content_type().map_err(|e| bad(e.to_string()))?,
            content_md5: rsp.content_md5().map_err(|e| bad(e.to_string()))?,
            metadata: lower_keys(rsp.metadata().map_err(|e| bad(e.to_string()))?),
        })
    }

    /// The content headers of exactly the version `if_match` of a blob or snapshot (a HEAD
    /// `If-Match` it). A version that is no longer there answers 412, reported with the code
    /// `SourceConditionNotMet` like a failed `x-ms-source-if-match` of a copy, because this is
    /// read as a copy's source.
    pub async fn content_headers(
        &self,
        container: &str,
        blob: &str,
        snapshot: Option<&str>,
        if_match: Option<&Etag>,
    ) -> Result<ContentHeaders, StorageError> {
        let what = format!("properties of {container}/{blob}");
        let rsp = self
            .blob(container, blob, snapshot)?
            .get_properties(Some(BlobClientGetPropertiesOptions {
                if_match: if_match.map(|e| e.quoted().into()),
                ..Default::default()
            }))
            .await
            .map_err(|e| match StorageError::from_azure(&what, e) {
                StorageError::PreconditionFailed { what, .. } => StorageError::PreconditionFailed {
                    what,
                    code: "SourceConditionNotMet".into(),
                },
                other => other,
            })?;
        let bad = |e: azure_core::Error| StorageError::Permanent {
            what: what.clone(),
            detail: e.to_string(),
        };
        Ok(ContentHeaders {
            content_type: rsp.content_type().map_err(bad)?,
            content_encoding: rsp.content_encoding().map_err(bad)?,
            content_language: rsp.content_language().map_err(bad)?,
            content_disposition: rsp.content_disposition().map_err(bad)?,
            cache_control: rsp.cache_control().map_err(bad)?,
            content_md5: rsp.content_md5().map_err(bad)?,
        })
    }

    /// Snapshots a blob only if it still has `if_match`: the snapshot is then exactly the version
    /// that was listed (the reference implementation snapshotted unconditionally and could name
    /// version X in the message while the snapshot held Y). `metadata` replaces the snapshot's
    /// metadata (callers pass the base blob's user metadata plus lakeguard's markers).
    pub async fn create_snapshot(
        &self,
        container: &str,
        blob: &str,
        if_match: &Etag,
        metadata: &BTreeMap<String, String>,
    ) -> Result<SnapshotTaken, StorageError> {
        let what = format!("snapshot {container}/{blob}");
        let options = BlobClientCreateSnapshotOptions {
            if_match: Some(if_match.quoted().into()),
            metadata: Some(
                metadata
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
            ..Default::default()
        };
        let rsp = self
            .blob(container, blob, None)?
            .create_snapshot(Some(options))
            .await
            .map_err(|e| StorageError::from_azure(&what, e))?;
        let id = rsp
            .snapshot()
            .map_err(|e| StorageError::Permanent {
                what: what.clone(),
                detail: e.to_string(),
            })?
            .ok_or(StorageError::Permanent {
                what,
                detail: "no x-ms-snapshot in the answer".into(),
            })?;
        let etag = rsp.etag().ok().flatten().map(|e| Etag::new(&e));
        Ok(SnapshotTaken { id, etag })
    }

    /// Replaces a blob's metadata, conditionally on its ETag.
    pub async fn set_metadata(
        &self,
        container: &str,
        blob: &str,
        metadata: &BTreeMap<String, String>,
        if_match: &Etag,
    ) -> Result<(), StorageError> {
        let what = format!("set metadata of {container}/{blob}");
        let options = BlobClientSetMetadataOptions {
            if_match: Some(if_match.quoted().into()),
            ..Default::default()
        };
        self.blob(container, blob, None)?
            .set_metadata(
                &metadata
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<HashMap<_, _>>(),
                Some(options),
            )
            .await
            .map_err(|e| StorageError::from_azure(&what, e))?;
        Ok(())
    }

    /// Deletes a blob (with its snapshots when `include_snapshots`) or one snapshot, conditionally.
    pub async fn delete(
        &self,
        container: &str,
        blob: &str,
        snapshot: Option<&str>,
        if_match: Option<&Etag>,
        include_snapshots: bool,
    ) -> Result<(), StorageError> {
        let what = format!("delete {container}/{blob}");
        let options = BlobClientDeleteOptions {
            if_match: if_match.map(|e| e.quoted().into()),
            delete_snapshots: include_snapshots
                .then_some(azure_storage_blob::models::DeleteSnapshotsOptionType::Include),
            ..Default::default()
        };
        self.blob(container, blob, snapshot)?
            .delete(Some(options))
            .await
            .map_err(|e| StorageError::from_azure(&what, e))?;
        Ok(())
    }

    /// Uploads a small blob in one request (demo data, tests, restore markers).
    pub async fn upload(
        &self,
        container: &str,
        blob: &str,
        data: Vec<u8>,
        content_type: Option<&str>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Etag, StorageError> {
        self.upload_if(
            container,
            blob,
            data,
            content_type,
            metadata,
            &TargetCondition::Any,
        )
        .await
    }

    /// [`upload`](Self::upload) under a condition on the blob it replaces.
    pub async fn upload_if(
        &self,
        container: &str,
        blob: &str,
        data: Vec<u8>,
        content_type: Option<&str>,
        metadata: &BTreeMap<String, String>,
        cond: &TargetCondition,
    ) -> Result<Etag, StorageError> {
        let what = format!("upload {container}/{blob}");
        let (if_match, if_none_match) = cond.headers();
        let options = BlockBlobClientUploadOptions {
            if_match,
            if_none_match,
            blob_content_type: content_type.map(str::to_owned),
            metadata: Some(
                metadata
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
            ..Default::default()
        };
        let rsp = self
            .blob(container, blob, None)?
            .block_blob_client()
            .upload(RequestContent::from(data), Some(options))
            .await
            .map_err(|e| StorageError::from_azure(&what, e))?;
        rsp.etag
            .map(|e| Etag::new(&e))
            .ok_or(StorageError::Permanent {
                what,
                detail: "no ETag".into(),
            })
    }

    /// Downloads a whole blob or snapshot into memory (small blobs only: tests, demo).
    pub async fn download(
        &self,
        container: &str,
        blob: &str,
        snapshot: Option<&str>,
    ) -> Result<Vec<u8>, StorageError> {
        let what = format!("download {container}/{blob}");
        let rsp = self
            .blob(container, blob, snapshot)?
            .download(None)
            .await
            .map_err(|e| StorageError::from_azure(&what, e))?;
        let body = rsp
            .body
            .collect()
            .await
            .map_err(|e| StorageError::from_azure(&what, e))?;
        Ok(body.to_vec())
    }

    /// Downloads a small blob with the ETag of what was read (for a later If-Match write).
    pub async fn download_versioned(
        &self,
        container: &str,
        blob: &str,
    ) -> Result<(Vec<u8>, Etag), StorageError> {
        let what = format!("download {container}/{blob}");
        let rsp = self
            .blob(container, blob, None)?
            .download(None)
            .await
            .map_err(|e| StorageError::from_azure(&what, e))?;
        let etag =
            rsp.properties
                .etag
                .as_ref()
                .map(Etag::new)
                .ok_or_else(|| StorageError::Permanent {
                    what: what.clone(),
                    detail: "no ETag".into(),
                })?;
        let body = rsp
            .body
            .collect()
            .await
            .map_err(|e| StorageError::from_azure(&what, e))?;
        Ok((body.to_vec(), etag))
    }

    /// Streams a blob or snapshot through `sink` chunk by chunk (bounded memory), e.g. to hash it.
    pub async fn download_with(
        &self,
        container: &str,
        blob: &str,
        snapshot: Option<&str>,
        sink: impl FnMut(&[u8]),
    ) -> Result<u64, StorageError> {
        self.download_with_if(container, blob, snapshot, None, sink)
            .await
    }

    /// [`download_with`](Self::download_with) only while the blob or snapshot has `if_match`
    /// (412 otherwise).
    pub async fn download_with_if(
        &self,
        container: &str,
        blob: &str,
        snapshot: Option<&str>,
        if_match: Option<&Etag>,
        mut sink: impl FnMut(&[u8]),
    ) -> Result<u64, StorageError> {
        let what = format!("download {container}/{blob}");
        let options = azure_storage_blob::models::BlobClientDownloadOptions {
            if_match: if_match.map(|e| e.quoted().into()),
            ..Default::default()
        };
        let rsp = self
            .blob(container, blob, snapshot)?
            .download(Some(options))
            .await
            .map_err(|e| StorageError::from_azure(&what, e))?;
        let mut body = rsp.body;
        let mut total = 0u64;
        while let Some(chunk) = body
            .try_next()
            .await
            .map_err(|e| StorageError::from_azure(&what, e))?
        {
            total += chunk.len() as u64;
            sink(&chunk);
        }
        Ok(total)
    }

    /// Synchronous server-side copy (Copy Blob From URL, up to 256 MiB): the content never passes
    /// through this process, and `source_if_match` guarantees the copied version. `target_if`
    /// makes the write conditional on the target (`Some(None)` = must not exist).
    pub async fn copy_from_url(
        &self,
        container: &str,
        blob: &str,
        source: &CopySource,
        target_condition: TargetCondition,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Etag, StorageError> {
        let what = format!("copy into {container}/{blob}");
        let mut extra = vec![("x-ms-requires-sync", "true".to_owned())];
        if let Some(auth) = &source.authorization {
            extra.push(("x-ms-copy-source-authorization", auth.clone()));
        }
        let (if_match, if_none_match) = target_condition.headers();
        let options = BlobClientStartCopyFromUrlOptions {
            source_if_match: source.if_match.as_ref().map(|e| e.quoted().into()),
            if_match,
            if_none_match,
            metadata: Some(
                metadata
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
            method_options: ctx_with(ExtraHeaders(extra)),
            ..Default::default()
        };
        let rsp = self
            .blob(container, blob, None)?
            .start_copy_from_url(source.url.to_string(), Some(options))
            .await
            .map_err(|e| StorageError::from_azure(&what, e))?;
        let status = rsp.copy_status().ok().flatten();
        if let Some(s) = status {
            if s != azure_storage_blob::models::CopyStatus::Success {
                return Err(StorageError::Retryable {
                    what,
                    detail: format!("copy status {s:?}, expected success"),
                });
            }
        }
        rsp.etag()
            .ok()
            .flatten()
            .map(|e| Etag::new(&e))
            .ok_or(StorageError::Permanent {
                what,
                detail: "no ETag".into(),
            })
    }

    /// Put Block From URL: stages `range` of the source as block `block_id` of the target.
    pub async fn stage_block_from_url(
        &self,
        container: &str,
        blob: &str,
        block_id: &[u8],
        source: &CopySource,
        offset: u64,
        length: u64,
    ) -> Result<(), StorageError> {
        let what = format!("stage block of {container}/{blob} at {offset}");
        let options = BlockBlobClientStageBlockFromUrlOptions {
            source_if_match: source.if_match.as_ref().map(|e| e.quoted().into()),
            source_range: Some(HttpRange::new(offset, length)),
            copy_source_authorization: source.authorization.clone(),
            ..Default::default()
        };
        self.blob(container, blob, None)?
            .block_blob_client()
            .stage_block_from_url(block_id, 0, source.url.to_string(), Some(options))
            .await
            .map_err(|e| StorageError::from_azure(&what, e))?;
        Ok(())
    }

    /// Put Block List: commits staged blocks in order, with the content headers and metadata.
    pub async fn commit_blocks(
        &self,
        container: &str,
        blob: &str,
        block_ids: Vec<Vec<u8>>,
        headers: &ContentHeaders,
        metadata: &BTreeMap<String, String>,
        target_condition: TargetCondition,
    ) -> Result<Etag, StorageError> {
        let what = format!("commit blocks of {container}/{blob}");
        let list = BlockLookupList {
            latest: Some(block_ids),
            ..Default::default()
        };
        let (if_match, if_none_match) = target_condition.headers();
        let options = BlockBlobClientCommitBlockListOptions {
            blob_content_type: headers.content_type.clone(),
            blob_content_encoding: headers.content_encoding.clone(),
            blob_content_language: headers.content_language.clone(),
            blob_content_disposition: headers.content_disposition.clone(),
            blob_cache_control: headers.cache_control.clone(),
            blob_content_md5: headers.content_md5.clone(),
            metadata: Some(
                metadata
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
            if_match,
            if_none_match,
            ..Default::default()
        };
        let content: RequestContent<BlockLookupList, azure_core::http::XmlFormat> = list
            .try_into()
            .map_err(|e| StorageError::from_azure(&what, e))?;
        let rsp = self
            .blob(container, blob, None)?
            .block_blob_client()
            .commit_block_list(content, Some(options))
            .await
            .map_err(|e| StorageError::from_azure(&what, e))?;
        rsp.etag()
            .ok()
            .flatten()
            .map(|e| Etag::new(&e))
            .ok_or(StorageError::Permanent {
                what,
                detail: "no ETag".into(),
            })
    }

    /// Acquires a lease (`duration_secs` 15..=60) on a blob, conditionally on its ETag.
    pub async fn acquire_lease(
        &self,
        container: &str,
        blob: &str,
        duration_secs: i32,
        if_match: Option<&Etag>,
    ) -> Result<String, StorageError> {
        let what = format!("lease {container}/{blob}");
        let options = BlobClientAcquireLeaseOptions {
            if_match: if_match.map(|e| e.quoted().into()),
            ..Default::default()
        };
        let rsp = self
            .blob(container, blob, None)?
            .acquire_lease(duration_secs, Some(options))
            .await
            .map_err(|e| StorageError::from_azure(&what, e))?;
        rsp.lease_id()
            .ok()
            .flatten()
            .ok_or(StorageError::Permanent {
                what,
                detail: "no lease id".into(),
            })
    }

    pub async fn renew_lease(
        &self,
        container: &str,
        blob: &str,
        lease_id: &str,
    ) -> Result<(), StorageError> {
        self.blob(container, blob, None)?
            .renew_lease(
                lease_id.to_owned(),
                Some(BlobClientRenewLeaseOptions::default()),
            )
            .await
            .map_err(|e| StorageError::from_azure(format!("renew lease {container}/{blob}"), e))?;
        Ok(())
    }

    pub async fn release_lease(
        &self,
        container: &str,
        blob: &str,
        lease_id: &str,
    ) -> Result<(), StorageError> {
        self.blob(container, blob, None)?
            .release_lease(
                lease_id.to_owned(),
                Some(BlobClientReleaseLeaseOptions::default()),
            )
            .await
            .map_err(|e| {
                StorageError::from_azure(format!("release lease {container}/{blob}"), e)
            })?;
        Ok(())
    }
}

/// The source of a server-side copy: a URL that carries its own read authorisation (SAS), the
/// ETag it must still have, and optionally `x-ms-copy-source-authorization`.
#[derive(Clone)]
pub struct CopySource {
    pub url: Url,
    pub if_match: Option<Etag>,
    pub authorization: Option<String>,
}

impl std::fmt::Debug for CopySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL carries a SAS: never print it.
        write!(
            f,
            "CopySource {{ path: {}, if_match: {:?} }}",
            self.url.path(),
            self.if_match
        )
    }
}

/// A condition on the target of a write.
#[derive(Clone, Debug)]
pub enum TargetCondition {
    /// Unconditional (only where the caller has another guarantee, e.g. a lease).
    Any,
    /// The target must not exist (`If-None-Match: *`).
    Absent,
    /// The target must still have this ETag.
    Matches(Etag),
}

impl TargetCondition {
    fn headers(
        &self,
    ) -> (
        Option<azure_core::http::Etag>,
        Option<azure_core::http::Etag>,
    ) {
        match self {
            TargetCondition::Any => (None, None),
            TargetCondition::Absent => (None, Some("*".into())),
            TargetCondition::Matches(e) => (Some(e.quoted().into()), None),
        }
    }
}

/// Characters percent-encoded in a query value (snapshot ids hold `:` and `.`, which are fine,
/// but be strict).
const QUERY: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b':');

fn lower_keys(m: HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect()
}

pub(crate) fn entry_from_item(item: BlobItem) -> Result<BlobEntry, String> {
    let name = item.name.ok_or("listing entry without a name")?;
    let props = item
        .properties
        .ok_or_else(|| format!("listing entry {name} without properties"))?;
    let etag = props
        .etag
        .map(|e| Etag::new(&e))
        .ok_or_else(|| format!("listing entry {name} without ETag"))?;
    let last_modified = props
        .last_modified
        .ok_or_else(|| format!("listing entry {name} without Last-Modified"))?;
    let metadata = item
        .metadata
        .and_then(|m| m.values)
        .map(lower_keys)
        .unwrap_or_default();
    Ok(BlobEntry {
        name,
        snapshot: item.snapshot.filter(|s| !s.is_empty()),
        etag,
        last_modified,
        content_length: props.content_length.unwrap_or(0),
        content_type: props.content_type,
        content_md5: props.content_md5,
        metadata,
        security: None,
    })
}
