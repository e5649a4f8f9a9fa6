//! The `datafactory` copy engine and the shipped pipeline, against the Data Factory stand-in.
//!
//! Tokens come from a real `ManagedIdentityCredential` talking to a local App Service identity
//! endpoint (`IDENTITY_ENDPOINT`/`IDENTITY_HEADER`), so the stand-in sees real bearer tokens and the
//! tests can count identity requests.

mod support;

#[path = "support/datafactory.rs"]
mod standin;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use azure_identity::{ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId};
use base64::Engine as _;
use lakeguard::copy::datafactory::{DataFactoryConfig, DataFactoryEngine};
use lakeguard::copy::{CopyEngine, CopyError, CopyJob, CopyOutcome};
use lakeguard::model::Etag;
use serde_json::{json, Value};
use standin::*;
use url::Url;

const SUB: &str = "00000000-1111-2222-3333-444444444444";
const RG: &str = "rg-lakeguard";
const FACTORY: &str = "adf-lakeguard";
const SRC: &str = "https://srcacct.blob.core.windows.net";
const BAK: &str = "https://bakacct.blob.core.windows.net";

// ---------------------------------------------------------------------------------------------
// A local App Service managed identity endpoint, one per test process
// ---------------------------------------------------------------------------------------------

struct Identity {
    /// (client_id, resource) per request served.
    requests: Mutex<Vec<(String, String)>>,
    /// Every token issued, to prove none reaches a log.
    issued: Mutex<Vec<String>>,
}

fn unsigned_jwt(claims: &Value) -> String {
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(claims)
    )
}

/// Starts the identity endpoint once and points the process environment at it. Every test calls
/// this first, so the environment is written before any other thread reads it.
fn identity() -> &'static Identity {
    static ID: OnceLock<&'static Identity> = OnceLock::new();
    ID.get_or_init(|| {
        let id: &'static Identity = Box::leak(Box::new(Identity {
            requests: Mutex::default(),
            issued: Mutex::default(),
        }));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                use axum::extract::Query;
                use axum::http::HeaderMap;
                let app = axum::Router::new().route(
                    "/msi/token",
                    axum::routing::get(
                        move |Query(q): Query<BTreeMap<String, String>>, headers: HeaderMap| async move {
                            if headers.get("x-identity-header").and_then(|v| v.to_str().ok()) != Some("test-secret") {
                                return (axum::http::StatusCode::UNAUTHORIZED, "bad header".to_owned());
                            }
                            if q.get("api-version").map(String::as_str) != Some("2019-08-01") {
                                return (axum::http::StatusCode::BAD_REQUEST, "api-version".to_owned());
                            }
                            let resource = q.get("resource").cloned().unwrap_or_default();
                            let client = q.get("client_id").cloned().unwrap_or_default();
                            let now = time::OffsetDateTime::now_utc().unix_timestamp();
                            // Claims as the harness mints them (Azurite needs oid/tid for
                            // user delegation keys).
                            let subject = if client.is_empty() { "system-assigned" } else { client.as_str() };
                            let token = support::identity::mint_token(&resource, subject, Duration::from_secs(3600));
                            id.requests.lock().unwrap().push((client.clone(), resource.clone()));
                            id.issued.lock().unwrap().push(token.clone());
                            let body = json!({
                                "access_token": token, "expires_on": (now + 3600).to_string(),
                                "resource": resource, "token_type": "Bearer", "client_id": client,
                            });
                            (axum::http::StatusCode::OK, body.to_string())
                        },
                    ),
                );
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        let addr = rx.recv().unwrap();
        let buf = LOG.get_or_init(Buf::default).clone();
        tracing::subscriber::set_global_default(
            tracing_subscriber::fmt()
                .with_max_level(tracing::Level::DEBUG)
                .with_ansi(false)
                .with_writer(buf)
                .finish(),
        )
        .unwrap();
        // SAFETY-relevant: done once, while every other test thread waits on this OnceLock.
        std::env::set_var("IDENTITY_ENDPOINT", format!("http://{addr}/msi/token"));
        std::env::set_var("IDENTITY_HEADER", "test-secret");
        id
    })
}

/// Everything the tests of this binary log (DEBUG and up, our crate and the Azure crates).
#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buf {
    type Writer = Buf;
    fn make_writer(&'a self) -> Buf {
        self.clone()
    }
}

static LOG: OnceLock<Buf> = OnceLock::new();

static CLIENT_SEQ: AtomicUsize = AtomicUsize::new(0);

/// A managed identity credential with its own client id (so that requests can be counted per
/// credential) and its own token cache.
fn credential() -> (Arc<dyn TokenCredential>, String) {
    identity();
    let client = format!("client-{}", CLIENT_SEQ.fetch_add(1, Ordering::SeqCst));
    let cred = ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
        user_assigned_id: Some(UserAssignedId::ClientId(client.clone())),
        ..Default::default()
    }))
    .unwrap();
    (cred, client)
}

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

struct Fixture {
    adf: DataFactoryStandIn,
    storage: Arc<MemoryStorage>,
    client: String,
    cred: Arc<dyn TokenCredential>,
}

async fn fixture() -> Fixture {
    let (cred, client) = credential();
    let storage = MemoryStorage::new(SRC, BAK);
    let adf = DataFactoryStandIn::start(SUB, RG, FACTORY, storage.clone()).await;
    Fixture {
        adf,
        storage,
        client,
        cred,
    }
}

impl Fixture {
    fn config(&self) -> DataFactoryConfig {
        let mut c = DataFactoryConfig::new(
            SUB,
            RG,
            FACTORY,
            Url::parse(SRC).unwrap(),
            Url::parse(&format!("{BAK}/")).unwrap(),
        );
        c.arm_endpoint = Url::parse(&self.adf.base_url).unwrap();
        c.poll_interval = Duration::from_millis(20);
        c.run_timeout = Duration::from_secs(10);
        c.max_retries = 3;
        c.retry_base_delay = Duration::from_millis(10);
        c.request_timeout = Duration::from_secs(5);
        c
    }

    fn engine(&self) -> DataFactoryEngine {
        self.engine_with(self.config())
    }

    fn engine_with(&self, c: DataFactoryConfig) -> DataFactoryEngine {
        DataFactoryEngine::new(
            c,
            self.adf.http_client(),
            self.cred.clone(),
            self.storage.clone(),
            self.storage.clone(),
        )
    }

    fn identity_requests(&self, resource_prefix: &str) -> usize {
        identity()
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(c, r)| *c == self.client && r.starts_with(resource_prefix))
            .count()
    }
}

const SNAP: &str = "2026-11-22T03:08:15.1234567Z";

fn job(blob: &str, etag: &str, content_len: u64) -> CopyJob {
    let mut metadata = BTreeMap::new();
    metadata.insert("owner".to_owned(), "team a".to_owned());
    metadata.insert("lakeguard_source_etag".to_owned(), Etag::new(etag).quoted());
    CopyJob {
        source_container: "raw".into(),
        source_blob: blob.into(),
        source_snapshot: Some(SNAP.into()),
        source_etag: Etag::new(etag),
        snapshot_etag: Some(Etag::new(etag)),
        target_container: "raw".into(),
        target_blob: blob.into(),
        content_type: Some("text/csv".into()),
        content_length: content_len,
        expected_target: None,
        metadata,
        attempt: 1,
    }
}

fn seed(f: &Fixture, blob: &str, etag: &str, content: &[u8]) -> CopyJob {
    f.storage.add_snapshot("raw", blob, SNAP, etag, content);
    // The live blob has moved on: a copy of the live blob would show up as this content.
    f.storage.set_live(
        "raw",
        blob,
        "\"0xLIVE\"",
        b"live content, newer than the snapshot",
    );
    job(blob, etag, content.len() as u64)
}

// ---------------------------------------------------------------------------------------------
// The shipped pipeline: wiring
// ---------------------------------------------------------------------------------------------

fn strings(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    all_strings(v, &mut out);
    out
}

#[test]
fn every_parameter_is_wired() {
    identity();
    let def = FactoryDefinition::shipped();
    let pipeline = def
        .pipeline("lakeguard-backup-copy")
        .expect("pipeline lakeguard-backup-copy is shipped");
    let declared = declared_parameters(pipeline);
    for required in [
        "sourceContainer",
        "sourceBlob",
        "sourceSnapshot",
        "sourceEtag",
        "targetContainer",
        "targetBlob",
    ] {
        assert!(
            declared.contains_key(required),
            "pipeline lacks parameter {required}"
        );
    }
    // Every pipeline parameter is used by some activity expression.
    let activity_text = strings(&pipeline["properties"]["activities"]).join("\n");
    for name in declared.keys() {
        assert!(
            activity_text.contains(&format!("pipeline().parameters.{name}")),
            "pipeline parameter {name} is declared but never used"
        );
    }
    // Every dataset reference (anywhere in the pipeline) feeds every declared dataset parameter,
    // from the pipeline.
    fn refs<'a>(v: &'a Value, ty: &str, out: &mut Vec<&'a Value>) {
        match v {
            Value::Object(m) => {
                if m.get("type").and_then(Value::as_str) == Some(ty) {
                    out.push(v);
                }
                m.values().for_each(|x| refs(x, ty, out));
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, ty, out)),
            _ => {}
        }
    }
    let mut ds_refs = Vec::new();
    refs(
        &pipeline["properties"]["activities"],
        "DatasetReference",
        &mut ds_refs,
    );
    assert!(!ds_refs.is_empty(), "the pipeline uses no dataset");
    for r in &ds_refs {
        let name = r["referenceName"].as_str().unwrap();
        let ds = def
            .datasets
            .get(name)
            .unwrap_or_else(|| panic!("dataset {name} is not shipped"));
        for (p, (_, default)) in declared_parameters(ds) {
            let fed = &r["parameters"][&p];
            assert!(
                !fed.is_null() || default.is_some(),
                "dataset {name} parameter {p} is not fed by the pipeline"
            );
            let fed_text = strings(fed).join(" ");
            assert!(
                fed_text.contains("pipeline().parameters."),
                "dataset {name} parameter {p} is not fed from a pipeline parameter: {fed}"
            );
        }
    }
    // Every dataset parameter is used by the dataset; every linked service parameter is fed by
    // the dataset and used by the linked service.
    for (name, ds) in &def.datasets {
        let text = strings(&ds["properties"]).join("\n");
        for p in declared_parameters(ds).keys() {
            assert!(
                text.contains(&format!("dataset().{p}")),
                "dataset {name} parameter {p} is never used"
            );
        }
        let ls_ref = &ds["properties"]["linkedServiceName"];
        let ls_name = ls_ref["referenceName"].as_str().unwrap();
        let ls = def
            .linked_services
            .get(ls_name)
            .unwrap_or_else(|| panic!("linked service {ls_name} is not shipped"));
        for (p, (_, default)) in declared_parameters(ls) {
            assert!(
                !ls_ref["parameters"][&p].is_null() || default.is_some(),
                "dataset {name} does not feed {ls_name}.{p}"
            );
            let ls_text = strings(&ls["properties"]["typeProperties"]).join("\n");
            assert!(
                ls_text.contains(&format!("linkedService().{p}")),
                "linked service {ls_name} parameter {p} is never used"
            );
        }
    }
    // Retries on every activity that touches storage, nested ones included.
    for a in all_activities(pipeline) {
        if matches!(
            a["type"].as_str(),
            Some("WebActivity" | "GetMetadata" | "Copy")
        ) {
            assert!(
                a["policy"]["retry"].as_u64().unwrap_or(0) > 0,
                "activity {} has no retry",
                a["name"]
            );
        }
    }
}

/// Every activity of a pipeline, including those inside If Condition branches.
fn all_activities(pipeline: &Value) -> Vec<Value> {
    fn walk(acts: &Value, out: &mut Vec<Value>) {
        for a in acts.as_array().into_iter().flatten() {
            out.push(a.clone());
            for branch in ["ifTrueActivities", "ifFalseActivities", "activities"] {
                walk(&a["typeProperties"][branch], out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&pipeline["properties"]["activities"], &mut out);
    out
}

#[test]
fn managed_identity_only_no_secrets() {
    identity();
    let def = FactoryDefinition::shipped();
    let forbidden_props = [
        "connectionString",
        "accountKey",
        "sasUri",
        "sasToken",
        "servicePrincipalKey",
        "servicePrincipalId",
        "encryptedCredential",
        "credential",
        "password",
    ];
    for (name, ls) in &def.linked_services {
        let tp = ls["properties"]["typeProperties"].as_object().unwrap();
        for k in forbidden_props {
            assert!(
                !tp.contains_key(k),
                "linked service {name} has {k}: managed identity only"
            );
        }
        assert!(
            tp.contains_key("serviceEndpoint"),
            "linked service {name} must use serviceEndpoint (managed identity)"
        );
    }
    let all: Vec<&Value> = def
        .pipelines
        .values()
        .chain(def.datasets.values())
        .chain(def.linked_services.values())
        .collect();
    for v in all {
        for s in strings(v) {
            for needle in [
                "AccountKey=",
                "SharedAccessSignature=",
                "sig=",
                "DefaultEndpointsProtocol",
            ] {
                assert!(!s.contains(needle), "secret-looking text {needle} in {s}");
            }
        }
    }
    // Every Web activity authenticates with the factory's managed identity.
    let mut web = 0;
    for p in def.pipelines.values() {
        for a in all_activities(p) {
            if a["type"] == "WebActivity" {
                web += 1;
                assert_eq!(
                    a["typeProperties"]["authentication"]["type"], "MSI",
                    "{}",
                    a["name"]
                );
                assert_eq!(
                    a["policy"]["secureInput"], true,
                    "{} carries a token: secureInput",
                    a["name"]
                );
            }
        }
    }
    assert_eq!(web, 2, "one Web activity per target condition");
    // The source is read with a SAS, a SecureString parameter (masked by Data Factory); no bearer
    // token of the function is handed over.
    let params = declared_parameters(def.pipeline("lakeguard-backup-copy").unwrap());
    assert_eq!(params["sourceSas"].0, "SecureString");
    assert!(!params.contains_key("sourceAuthorization"));
    for a in all_activities(def.pipeline("lakeguard-backup-copy").unwrap()) {
        assert!(
            a["typeProperties"]["headers"]
                .get("x-ms-copy-source-authorization")
                .is_none(),
            "{} hands over a token",
            a["name"]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The engine against the stand-in
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn copies_exactly_the_snapshot_into_the_backup_blob() {
    let f = fixture().await;
    let blob = "dir one/a+b ü%#?.csv";
    let content = b"version X of the blob";
    let job = seed(&f, blob, "\"0x8DC1\"", content);
    let out = f.engine().copy(&job).await.expect("copy succeeds");

    // The resolved request: Put Blob From URL on the backup blob, source = the snapshot URL.
    let copies = f.storage.copies.lock().unwrap().clone();
    assert_eq!(copies.len(), 1);
    let c = &copies[0];
    // RFC 3986 unreserved characters stay, everything else is escaped.
    const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    let enc = |s: &str| percent_encoding::utf8_percent_encode(s, UNRESERVED).to_string();
    let enc_path = |s: &str| s.split('/').map(enc).collect::<Vec<_>>().join("/");
    assert_eq!(c.method, "PUT");
    assert_eq!(c.url, format!("{BAK}/raw/{}", enc_path(blob)));
    // The snapshot URL, then the SAS the engine had issued for exactly that snapshot.
    let (src_path, sas) = c
        .source_url()
        .unwrap()
        .split_once("&")
        .expect("a SAS after ?snapshot=");
    assert_eq!(
        src_path,
        format!("{SRC}/raw/{}?snapshot={}", enc_path(blob), enc(SNAP))
    );
    let issued: Vec<IssuedSas> = f
        .storage
        .issued_sas
        .lock()
        .unwrap()
        .values()
        .cloned()
        .collect();
    assert_eq!(issued.len(), 1, "one SAS per run");
    assert_eq!(issued[0].query, sas);
    assert_eq!(
        (
            issued[0].container.as_str(),
            issued[0].blob.as_str(),
            issued[0].snapshot.as_str()
        ),
        ("raw", blob, SNAP)
    );
    assert!(issued[0].expiry - issued[0].start <= time::Duration::minutes(30));
    assert!(
        issued[0].expiry - time::OffsetDateTime::now_utc() >= time::Duration::minutes(20),
        "the SAS must outlast a queued run and the activity's retries"
    );
    assert_eq!(c.header("x-ms-copy-source-authorization"), None);
    // An explicit empty body: Content-Length 0, as Put Blob From URL requires.
    assert_eq!(c.header("content-length"), Some("0"));
    assert_eq!(
        split_blob_url(c.source_url().unwrap(), SRC),
        Some(("raw".into(), blob.into(), Some(SNAP.into())))
    );
    assert_eq!(c.header("x-ms-source-if-match"), Some("\"0x8DC1\""));
    assert_eq!(c.header("x-ms-blob-type"), Some("BlockBlob"));
    assert_eq!(
        c.msi_resource.trim_end_matches('/'),
        "https://storage.azure.com"
    );
    assert!(c
        .header("x-ms-meta-lakeguard_copy_run")
        .is_some_and(|r| !r.is_empty()));

    // The backup holds the snapshot's content, not the live blob's.
    assert_eq!(
        f.storage.backup_content("raw", blob).as_deref(),
        Some(&content[..])
    );
    assert!(matches!(out, CopyOutcome::Copied { .. }));
    // New backup: written only if absent.
    assert_eq!(c.header("if-none-match"), Some("*"));
    assert_eq!(c.header("if-match"), None);
    // The engine replaced the run marker with the job's metadata.
    let stored = f.storage.backup_blob("raw", blob).unwrap();
    assert_eq!(stored.metadata, job.metadata);

    // Exactly one run, checked to completion.
    assert_eq!(f.adf.create_run_count(), 1);
    let runs = f.adf.runs();
    assert_eq!(runs[0].status, "Succeeded");
    let gets = f
        .adf
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains("/pipelineruns/"))
        .count();
    assert!(gets >= 1, "the run's outcome was never read");
    // The body carried the pipeline's parameters with the right values.
    let body = f
        .adf
        .requests()
        .into_iter()
        .find(|r| r.is_create_run())
        .unwrap()
        .body
        .unwrap();
    assert_eq!(body["sourceSnapshot"], SNAP);
    assert_eq!(body["sourceContentLength"], content.len().to_string());
    assert_eq!(
        body["sourceSas"], "<masked>",
        "the stand-in masks SecureString parameters"
    );
    assert_eq!(body["sourceBlobEndpoint"], SRC);
    assert_eq!(body["backupBlobEndpoint"], BAK);
}

#[tokio::test]
async fn a_rewritten_snapshot_etag_fails_the_run_and_writes_nothing() {
    let f = fixture().await;
    let mut job = seed(&f, "a.csv", "\"0x8DC1\"", b"x");
    job.snapshot_etag = Some(Etag::new("\"0x8DC2\"")); // not the snapshot's ETag
    let err = f.engine().copy(&job).await.unwrap_err();
    match err {
        CopyError::Retryable(m) => assert!(m.contains("412") && m.contains("Failed"), "{m}"),
        other => panic!("expected Retryable, got {other:?}"),
    }
    assert!(f.storage.backup_content("raw", "a.csv").is_none());
    // The activity's retry policy was exercised (retry 3 = 4 attempts).
    assert_eq!(f.storage.copies.lock().unwrap().len(), 4);
}

#[tokio::test]
async fn transient_copy_failures_are_retried_by_the_activity_policy() {
    let f = fixture().await;
    let job = seed(&f, "b.csv", "\"0x1\"", b"abc");
    *f.storage.fail_next.lock().unwrap() = (2, "503 ServerBusy".into());
    f.engine()
        .copy(&job)
        .await
        .expect("the activity's retries absorb two failures");
    assert_eq!(f.storage.copies.lock().unwrap().len(), 3);
    assert_eq!(f.adf.create_run_count(), 1);
}

#[tokio::test]
async fn a_backup_that_does_not_match_fails_the_run() {
    let f = fixture().await;
    let job = seed(&f, "c.csv", "\"0x1\"", b"the real content");
    *f.storage.corrupt_next.lock().unwrap() = true;
    let err = f.engine().copy(&job).await.unwrap_err();
    let CopyError::Retryable(m) = err else {
        panic!("expected Retryable")
    };
    assert!(m.contains("does not hold version"), "{m}");
}

#[tokio::test]
async fn throttling_is_retried_honouring_retry_after() {
    let f = fixture().await;
    let job = seed(&f, "d.csv", "\"0x1\"", b"abc");
    f.adf.fail_next(2, 429, Some("1"));
    let t = Instant::now();
    f.engine()
        .copy(&job)
        .await
        .expect("succeeds after throttling");
    let elapsed = t.elapsed();
    let throttled = f.adf.requests().iter().filter(|r| r.status == 429).count();
    assert_eq!(throttled, 2);
    assert!(
        elapsed >= Duration::from_millis(1900),
        "Retry-After: 1 twice, but took {elapsed:?}"
    );
    assert_eq!(f.adf.create_run_count(), 1);

    // Retry-After as an HTTP date, on a 503 during polling.
    let job2 = seed(&f, "e.csv", "\"0x2\"", b"abcd");
    let when = time::OffsetDateTime::now_utc() + time::Duration::seconds(2);
    let fmt = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    f.adf.script_next_run(RunScript {
        queued_for: Duration::from_millis(100),
        ..Default::default()
    });
    let engine = f.engine();
    let copy = tokio::spawn(async move { engine.copy(&job2).await });
    tokio::time::sleep(Duration::from_millis(30)).await;
    f.adf.fail_next(1, 503, Some(&when.format(&fmt).unwrap()));
    let t = Instant::now();
    copy.await.unwrap().expect("succeeds after a 503");
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "HTTP-date Retry-After ignored: {:?}",
        t.elapsed()
    );
    assert_eq!(
        f.adf.requests().iter().filter(|r| r.status == 503).count(),
        1
    );
}

#[tokio::test]
async fn timeouts_are_retried() {
    let f = fixture().await;
    let job = seed(&f, "t.csv", "\"0x1\"", b"abc");
    f.adf.delay_next_gets(2, Duration::from_millis(800));
    let mut c = f.config();
    c.request_timeout = Duration::from_millis(200);
    f.engine_with(c.clone())
        .copy(&job)
        .await
        .expect("polls again after timeouts");
    assert_eq!(f.adf.create_run_count(), 1);

    // Only timeouts, more than the retries: Retryable, not Permanent.
    let job2 = seed(&f, "t2.csv", "\"0x1\"", b"abc");
    f.adf.delay_next_gets(10, Duration::from_millis(800));
    c.max_retries = 1;
    let err = f.engine_with(c).copy(&job2).await.unwrap_err();
    assert!(
        matches!(err, CopyError::Retryable(ref m) if m.contains("timeout")),
        "{err:?}"
    );
}

#[tokio::test]
async fn endless_throttling_gives_up_retryable_without_a_run() {
    let f = fixture().await;
    let job = seed(&f, "f.csv", "\"0x1\"", b"abc");
    f.adf.fail_next(50, 429, Some("0"));
    let mut c = f.config();
    c.max_retries = 2;
    let err = f.engine_with(c).copy(&job).await.unwrap_err();
    assert!(
        matches!(err, CopyError::Retryable(ref m) if m.contains("429")),
        "{err:?}"
    );
    assert_eq!(
        f.adf.requests().iter().filter(|r| r.status == 429).count(),
        3,
        "1 attempt + 2 retries"
    );
    assert_eq!(f.adf.create_run_count(), 0);

    // A Retry-After longer than the engine is willing to wait: give up at once.
    let f = fixture().await;
    f.adf.fail_next(1, 429, Some("3600"));
    let t = Instant::now();
    let err = f
        .engine()
        .copy(&seed(&f, "g.csv", "\"0x1\"", b"a"))
        .await
        .unwrap_err();
    assert!(matches!(err, CopyError::Retryable(_)));
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_failed_run_is_retryable_with_the_runs_message() {
    let f = fixture().await;
    let job = seed(&f, "h.csv", "\"0x1\"", b"abc");
    f.adf.script_next_run(RunScript {
        fail_with: Some(
            "Operation on target CopySnapshotToBackup failed: the integration runtime is offline"
                .into(),
        ),
        ..Default::default()
    });
    let err = f.engine().copy(&job).await.unwrap_err();
    match err {
        CopyError::Retryable(m) => {
            assert!(m.contains("the integration runtime is offline"), "{m}");
            assert!(m.contains("Failed"), "{m}");
        }
        other => panic!("expected Retryable, got {other:?}"),
    }
}

#[tokio::test]
async fn redelivery_while_in_progress_polls_the_existing_run() {
    let f = fixture().await;
    // Another version's run first, and one run per page: the engine must follow continuationToken.
    let other = seed(&f, "other.csv", "\"0x9\"", b"zz");
    f.engine().copy(&other).await.unwrap();
    f.adf.set_page_size(1);

    let job1 = seed(&f, "i.csv", "\"0x1\"", b"slow copy");
    f.adf.script_next_run(RunScript {
        queued_for: Duration::from_millis(50),
        in_progress_for: Duration::from_millis(1500),
        fail_with: None,
    });
    let mut short = f.config();
    short.run_timeout = Duration::from_millis(300);
    let err = f.engine_with(short).copy(&job1).await.unwrap_err();
    assert!(
        matches!(err, CopyError::Retryable(ref m) if m.contains("still")),
        "{err:?}"
    );
    assert_eq!(f.adf.create_run_count(), 2);

    // The host redelivers the message while the run is still going.
    let mut job2 = job1.clone();
    job2.attempt = 2;
    let out = f
        .engine()
        .copy(&job2)
        .await
        .expect("waits for the existing run");
    assert!(matches!(out, CopyOutcome::Copied { .. }));
    assert_eq!(
        f.adf.create_run_count(),
        2,
        "a second run was started for a version in progress"
    );
    let queries: Vec<_> = f
        .adf
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/queryPipelineRuns"))
        .collect();
    assert!(
        queries.len() >= 2,
        "continuationToken not followed ({} queries)",
        queries.len()
    );
    assert!(queries
        .iter()
        .any(|q| q.body.as_ref().unwrap().get("continuationToken").is_some()));
    let q = queries[0].body.clone().unwrap();
    assert_eq!(
        q["filters"][0],
        json!({"operand": "PipelineName", "operator": "Equals", "values": ["lakeguard-backup-copy"]})
    );
    assert!(q["lastUpdatedAfter"].is_string() && q["lastUpdatedBefore"].is_string());
    assert_eq!(f.storage.copies.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn redelivery_after_success_starts_no_new_run() {
    let f = fixture().await;
    let mut job = seed(&f, "j.csv", "\"0x1\"", b"abc");
    f.engine().copy(&job).await.unwrap();
    job.attempt = 3;
    let out = f.engine().copy(&job).await.expect("already copied");
    assert!(matches!(
        out,
        CopyOutcome::Copied {
            target_etag: Some(_)
        }
    ));
    assert_eq!(f.adf.create_run_count(), 1);
    assert_eq!(f.storage.copies.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn redelivery_after_a_failed_run_starts_a_new_one() {
    let f = fixture().await;
    let mut job = seed(&f, "k.csv", "\"0x1\"", b"abc");
    f.adf.script_next_run(RunScript {
        fail_with: Some("transient".into()),
        ..Default::default()
    });
    assert!(f.engine().copy(&job).await.is_err());
    job.attempt = 2;
    f.engine().copy(&job).await.expect("a new run succeeds");
    assert_eq!(f.adf.create_run_count(), 2);
    assert_eq!(
        f.storage.backup_content("raw", "k.csv").as_deref(),
        Some(&b"abc"[..])
    );
}

/// The run parameters the shipped pipeline expects for `job`, built independently of the engine.
fn params_for(job: &CopyJob, sas: &str) -> Value {
    json!({
        "sourceBlobEndpoint": SRC, "sourceContainer": job.source_container, "sourceBlob": job.source_blob,
        "sourceSnapshot": job.source_snapshot, "sourceEtag": job.source_etag.quoted(),
        "sourceSnapshotEtag": job.snapshot_etag.as_ref().unwrap().quoted(),
        "targetIfMatch": job.expected_target.as_ref().map(Etag::quoted).unwrap_or_default(),
        "sourceContentLength": job.content_length.to_string(), "sourceSas": sas,
        "backupBlobEndpoint": BAK, "targetContainer": job.target_container, "targetBlob": job.target_blob,
    })
}

/// A copy-source SAS for `job`'s snapshot, issued by the fixture's storage like the engine's.
async fn sas_for(f: &Fixture, job: &CopyJob) -> String {
    use lakeguard::copy::datafactory::SourceAuthorizer;
    f.storage
        .snapshot_sas(
            &job.source_container,
            &job.source_blob,
            job.source_snapshot.as_deref().unwrap(),
            time::Duration::minutes(25),
        )
        .await
        .unwrap()
}

async fn raw_create_run(f: &Fixture, body: &Value) -> reqwest::Response {
    let arm = f
        .cred
        .get_token(&["https://management.azure.com/.default"], None)
        .await
        .unwrap();
    f.adf
        .http_client()
        .post(format!(
            "{}/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.DataFactory/factories/{FACTORY}/pipelines/lakeguard-backup-copy/createRun?api-version=2018-06-01",
            f.adf.base_url
        ))
        .bearer_auth(arm.token.secret())
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_lost_create_run_answer_is_not_sent_twice() {
    let f = fixture().await;
    let job = seed(&f, "l.csv", "\"0x1\"", b"abc");
    // ARM accepted a createRun for this version but the answer was lost (the engine saw a 500):
    // the run exists. The engine must find it instead of sending createRun again.
    let sas = sas_for(&f, &job).await;
    f.adf.script_next_run(RunScript {
        in_progress_for: Duration::from_millis(300),
        ..Default::default()
    });
    assert_eq!(
        raw_create_run(&f, &params_for(&job, &sas)).await.status(),
        200
    );
    f.adf.fail_next(1, 500, None);
    f.engine()
        .copy(&job)
        .await
        .expect("adopts the run that exists");
    let creates: Vec<_> = f
        .adf
        .requests()
        .into_iter()
        .filter(|r| r.is_create_run())
        .map(|r| r.status)
        .collect();
    assert_eq!(
        creates,
        vec![200, 500],
        "createRun resent after an ambiguous failure"
    );
    assert_eq!(f.storage.copies.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn tokens_are_requested_once_for_many_jobs() {
    let f = fixture().await;
    let engine = f.engine();
    for i in 0..6 {
        let job = seed(&f, &format!("many-{i}.csv"), "\"0x1\"", b"abc");
        engine.copy(&job).await.unwrap();
    }
    assert_eq!(f.adf.create_run_count(), 6);
    assert_eq!(
        f.identity_requests("https://management.azure.com"),
        1,
        "ARM token not cached"
    );
    assert_eq!(
        f.identity_requests("https://storage.azure.com"),
        0,
        "the function's storage token is never handed to the factory (a SAS per snapshot is)"
    );
    assert_eq!(
        f.storage.issued_sas.lock().unwrap().len(),
        6,
        "one SAS per run"
    );
}

#[derive(Debug)]
struct WrongAudience;

#[async_trait::async_trait]
impl TokenCredential for WrongAudience {
    async fn get_token(
        &self,
        _: &[&str],
        _: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let now = time::OffsetDateTime::now_utc();
        let t = unsigned_jwt(
            &json!({"aud": "https://storage.azure.com", "exp": now.unix_timestamp() + 600}),
        );
        Ok(AccessToken::new(t, now + time::Duration::minutes(10)))
    }
}

/// Item 9 of issue 15: bearer tokens never go over http. An http ARM endpoint stops start-up
/// with the setting's name (exit 2), and an engine configured in code with one refuses the call
/// before it even asks for a token.
#[tokio::test]
async fn an_http_arm_endpoint_is_refused() {
    let env: Vec<(String, String)> = [
        ("SourceStorage", "UseDevelopmentStorage=true"),
        ("BackupStorage", "UseDevelopmentStorage=true"),
        ("AzureWebJobsStorage", "UseDevelopmentStorage=true"),
        ("LAKEGUARD_COPY_ENGINE", "datafactory"),
        ("LAKEGUARD_ARM_ENDPOINT", "http://management.example.com"),
        ("LAKEGUARD_DATAFACTORY_SUBSCRIPTION_ID", SUB),
        ("LAKEGUARD_DATAFACTORY_RESOURCE_GROUP", RG),
        ("LAKEGUARD_DATAFACTORY_NAME", FACTORY),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let out = support::run_cli(&["backup", "--drain"], &env).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("LAKEGUARD_ARM_ENDPOINT") && stderr.contains("must be https"),
        "{stderr}"
    );

    let f = fixture().await;
    let job = seed(&f, "h.csv", "\"0x1\"", b"abc");
    let mut c = f.config();
    c.arm_endpoint = Url::parse(&f.adf.base_url.replacen("https://", "http://", 1)).unwrap();
    match f.engine_with(c).copy(&job).await.unwrap_err() {
        CopyError::Permanent(m) => assert!(m.contains("must be https"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(f.identity_requests("https://management.azure.com"), 0);
    assert!(f.adf.requests().is_empty(), "nothing was sent");
}

#[tokio::test]
async fn authorisation_and_configuration_errors_are_permanent() {
    let f = fixture().await;
    let job = seed(&f, "m.csv", "\"0x1\"", b"abc");
    let e = DataFactoryEngine::new(
        f.config(),
        f.adf.http_client(),
        Arc::new(WrongAudience),
        f.storage.clone(),
        f.storage.clone(),
    );
    match e.copy(&job).await.unwrap_err() {
        CopyError::Permanent(m) => assert!(
            m.contains("401") && m.contains("role assignment") && m.contains(FACTORY),
            "{m}"
        ),
        other => panic!("expected Permanent, got {other:?}"),
    }
    let mut c = f.config();
    c.pipeline_name = "no-such-pipeline".into();
    match f.engine_with(c).copy(&job).await.unwrap_err() {
        CopyError::Permanent(m) => {
            assert!(m.contains("404") && m.contains("no-such-pipeline"), "{m}")
        }
        other => panic!("expected Permanent, got {other:?}"),
    }
    assert_eq!(f.adf.create_run_count(), 0);
}

#[tokio::test]
async fn no_token_reaches_the_logs() {
    // Every test of this binary logs into LOG (a process-wide subscriber installed before any
    // test runs: scoped subscribers lose events to tracing's per-callsite interest cache).
    identity();
    let f = fixture().await;
    let job = seed(&f, "n.csv", "\"0x1\"", b"abc");
    f.adf.fail_next(1, 429, Some("0"));
    f.engine().copy(&job).await.unwrap();
    let mut failing = job.clone();
    failing.snapshot_etag = Some(Etag::new("0xWRONG"));
    let _ = f.engine().copy(&failing).await;
    let log = String::from_utf8(LOG.get().unwrap().0.lock().unwrap().clone()).unwrap();
    assert!(
        log.contains("started Data Factory run")
            && log.contains("run_id")
            && log.contains("datafactory_copy"),
        "nothing was logged:\n{log}"
    );
    for t in identity().issued.lock().unwrap().iter() {
        let sig_less = t.trim_end_matches('.');
        assert!(!log.contains(sig_less), "a token reached the log");
    }
    assert!(!log.contains("Bearer"), "a bearer header reached the log");
    let issued: Vec<String> = f
        .storage
        .issued_sas
        .lock()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert!(!issued.is_empty());
    for sig in issued {
        let encoded: String = url::form_urlencoded::byte_serialize(sig.as_bytes()).collect();
        assert!(
            !log.contains(&sig) && !log.contains(&encoded),
            "a SAS signature reached the log"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The stand-in enforces the contract (so the tests above can fail)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn stand_in_rejects_what_data_factory_rejects() {
    let f = fixture().await;
    let http = f.adf.http_client();
    let arm = f
        .cred
        .get_token(&["https://management.azure.com/.default"], None)
        .await
        .unwrap();
    let storage = f
        .cred
        .get_token(&["https://storage.azure.com/.default"], None)
        .await
        .unwrap();
    let base = format!(
        "{}/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.DataFactory/factories/{FACTORY}",
        f.adf.base_url
    );
    let a = job("a", "\"0x1\"", 3);
    let good = params_for(&a, &sas_for(&f, &a).await);
    let post = |url: String, token: Option<&str>, body: &Value| {
        let mut r = http.post(url).json(body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    let create = format!("{base}/pipelines/lakeguard-backup-copy/createRun");
    let arm_t = arm.token.secret();
    let st = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(
        st(post(
            format!("{create}?api-version=2018-06-01"),
            Some(arm_t),
            &good
        )
        .await
        .unwrap()),
        200
    );
    assert_eq!(
        st(post(
            format!("{create}?api-version=2017-09-01-preview"),
            Some(arm_t),
            &good
        )
        .await
        .unwrap()),
        400
    );
    assert_eq!(
        st(post(create.clone(), Some(arm_t), &good).await.unwrap()),
        400
    );
    assert_eq!(
        st(
            post(format!("{create}?api-version=2018-06-01"), None, &good)
                .await
                .unwrap()
        ),
        401
    );
    assert_eq!(
        st(post(
            format!("{create}?api-version=2018-06-01"),
            Some(storage.token.secret()),
            &good
        )
        .await
        .unwrap()),
        401,
        "a storage token must not open ARM"
    );
    let mut unknown = good.clone();
    unknown["sourceVersion"] = json!("x");
    assert_eq!(
        st(post(
            format!("{create}?api-version=2018-06-01"),
            Some(arm_t),
            &unknown
        )
        .await
        .unwrap()),
        400
    );
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("sourceSnapshot");
    assert_eq!(
        st(post(
            format!("{create}?api-version=2018-06-01"),
            Some(arm_t),
            &missing
        )
        .await
        .unwrap()),
        400
    );
    let mut wrong_type = good.clone();
    // A length is a String (see the pipeline): a number is the wrong type.
    wrong_type["sourceContentLength"] = json!(3);
    assert_eq!(
        st(post(
            format!("{create}?api-version=2018-06-01"),
            Some(arm_t),
            &wrong_type
        )
        .await
        .unwrap()),
        400
    );
    let other_factory = create.replace(FACTORY, "another-factory");
    assert_eq!(
        st(post(
            format!("{other_factory}?api-version=2018-06-01"),
            Some(arm_t),
            &good
        )
        .await
        .unwrap()),
        404
    );
    let q = json!({"lastUpdatedAfter": "2026-01-01T00:00:00Z"});
    assert_eq!(
        st(post(
            format!("{base}/queryPipelineRuns?api-version=2018-06-01"),
            Some(arm_t),
            &q
        )
        .await
        .unwrap()),
        400
    );
    // The accepted run executes the shipped pipeline; the snapshot does not exist here -> Failed
    // with the storage error as the run's message.
    f.adf.wait_idle(Duration::from_secs(5)).await;
    let run = &f.adf.runs()[0];
    assert_eq!(run.status, "Failed");
    assert!(
        run.message.contains("CopySnapshotToNewBackup") && run.message.contains("404"),
        "{}",
        run.message
    );
}

#[test]
fn expressions_evaluate_like_data_factory() {
    identity();
    let mut ctx = ExprContext {
        run_id: "r1".into(),
        ..Default::default()
    };
    ctx.pipeline_parameters
        .insert("b".into(), json!("dir/a b'c.csv"));
    ctx.pipeline_parameters.insert("n".into(), json!(3));
    let e = |s: &str| eval_string(s, &ctx).unwrap();
    assert_eq!(e("@pipeline().parameters.b"), json!("dir/a b'c.csv"));
    assert_eq!(
        e("@concat('x/', replace(uriComponent(pipeline().parameters.b), '%2F', '/'))"),
        json!("x/dir/a%20b%27c.csv")
    );
    assert_eq!(
        e("n=@{pipeline().parameters.n}, run @{pipeline().RunId}"),
        json!("n=3, run r1")
    );
    assert_eq!(e("@@literal"), json!("@literal"));
    assert_eq!(e("@equals(pipeline().parameters.n, 3)"), json!(true));
    assert_eq!(e("@concat('it''s')"), json!("it's"));
    assert!(eval_string("@pipeline().parameters.missing", &ctx).is_err());
    assert!(
        eval_string("@guid()", &ctx).is_err(),
        "unknown functions must not pass silently"
    );
}

#[tokio::test]
async fn every_write_of_the_backup_is_conditional() {
    let f = fixture().await;
    // The worker saw no backup, but one appeared meanwhile: nothing is overwritten.
    let job = seed(&f, "o.csv", "\"0x1\"", b"new version");
    let mut other = BTreeMap::new();
    other.insert("writer".to_owned(), "someone else".to_owned());
    let theirs = f
        .storage
        .put_backup("raw", "o.csv", b"their version", other.clone());
    let err = f.engine().copy(&job).await.unwrap_err();
    assert!(
        matches!(err, CopyError::Retryable(ref m) if m.contains("409")),
        "{err:?}"
    );
    let b = f.storage.backup_blob("raw", "o.csv").unwrap();
    assert_eq!(
        (b.etag.as_str(), b.content.as_slice()),
        (theirs.as_str(), &b"their version"[..])
    );

    // The worker preserved the backup it saw (ETag `theirs`): the copy replaces exactly that one.
    let mut job2 = job.clone();
    job2.attempt = 2;
    job2.expected_target = Some(Etag::new(&theirs));
    f.engine()
        .copy(&job2)
        .await
        .expect("copy over the expected backup");
    let c = f.storage.copies.lock().unwrap().last().cloned().unwrap();
    assert_eq!(c.header("if-match"), Some(theirs.as_str()));
    assert_eq!(c.header("if-none-match"), None);
    assert_eq!(
        f.storage.backup_content("raw", "o.csv").as_deref(),
        Some(&b"new version"[..])
    );

    // A stale expectation: 412, nothing written.
    let job3 = seed(&f, "p.csv", "\"0x1\"", b"v2");
    let cur = f.storage.put_backup("raw", "p.csv", b"v1", BTreeMap::new());
    let mut job3 = CopyJob {
        expected_target: Some(Etag::new("\"0xSTALE\"")),
        ..job3
    };
    job3.attempt = 1;
    let err = f.engine().copy(&job3).await.unwrap_err();
    assert!(
        matches!(err, CopyError::Retryable(ref m) if m.contains("412")),
        "{err:?}"
    );
    assert_eq!(f.storage.backup_blob("raw", "p.csv").unwrap().etag, cur);
}

#[tokio::test]
async fn a_backup_rewritten_after_the_run_is_not_stamped() {
    let f = fixture().await;
    let job = seed(&f, "q.csv", "\"0x1\"", b"abc");
    f.adf.script_next_run(RunScript {
        in_progress_for: Duration::from_millis(400),
        ..Default::default()
    });
    let engine = f.engine();
    let j = job.clone();
    let copy = tokio::spawn(async move { engine.copy(&j).await });
    for _ in 0..200 {
        if !f.storage.copies.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Another writer replaces the backup after the copy activity, before the run ends.
    f.storage
        .put_backup("raw", "q.csv", b"other", BTreeMap::new());
    let err = copy.await.unwrap().unwrap_err();
    assert!(
        matches!(err, CopyError::Retryable(ref m) if m.contains("rewritten")),
        "{err:?}"
    );
    let b = f.storage.backup_blob("raw", "q.csv").unwrap();
    assert!(
        b.metadata.is_empty(),
        "someone else's blob got this version's metadata"
    );
}

// ---------------------------------------------------------------------------------------------
// The whole path on real storage: settings -> engine -> stand-in -> shipped pipeline -> Azurite
// ---------------------------------------------------------------------------------------------

/// Performs the pipeline's resolved requests on Azurite. Azurite 3.37 lacks Put Blob From URL
/// (501), so the same request is made as Copy Blob From URL (sync), with the same source URL
/// (the snapshot and the engine's SAS: Azurite checks that SAS, a service SAS in Shared Key mode
/// and a user-delegation SAS in OAuth mode), `x-ms-source-if-match`, target condition and
/// metadata headers, and Put Blob From URL's `Content-Length: 0`.
struct AzuriteStorage {
    backup: lakeguard::storage::blob::BlobStore,
    source_endpoint: String,
    backup_endpoint: String,
}

fn storage_err(e: lakeguard::storage::StorageError) -> String {
    use lakeguard::storage::StorageError::*;
    let status = match &e {
        NotFound { .. } => "404",
        PreconditionFailed { .. } => "412",
        Conflict { .. } => "409",
        Retryable { .. } => "503",
        Permanent { .. } => "400",
    };
    format!("{status} {e}")
}

#[async_trait::async_trait]
impl StandInStorage for AzuriteStorage {
    async fn put_blob_from_url(&self, copy: &ResolvedCopy) -> Result<String, String> {
        use lakeguard::storage::blob::{CopySource, TargetCondition};
        if copy.header("content-length") != Some("0") {
            return Err("400 InvalidHeaderValue: Put Blob From URL needs Content-Length: 0".into());
        }
        let src = copy.source_url().ok_or("no x-ms-copy-source")?;
        split_blob_url(src, &self.source_endpoint).ok_or("source outside the source account")?;
        let (tc, tb, _) = split_blob_url(&copy.url, &self.backup_endpoint)
            .ok_or("target outside the backup account")?;
        let source = CopySource {
            url: Url::parse(src).map_err(|e| format!("400 bad x-ms-copy-source: {e}"))?,
            if_match: copy.header("x-ms-source-if-match").map(Etag::new),
            authorization: None,
        };
        let condition = match (copy.header("if-match"), copy.header("if-none-match")) {
            (Some(m), _) => TargetCondition::Matches(Etag::new(m)),
            (None, Some("*")) => TargetCondition::Absent,
            _ => TargetCondition::Any,
        };
        let meta: BTreeMap<String, String> = copy
            .headers
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("x-ms-meta-")
                    .map(|n| (n.to_owned(), v.clone()))
            })
            .collect();
        self.backup
            .copy_from_url(&tc, &tb, &source, condition, &meta)
            .await
            .map(|e| e.quoted())
            .map_err(storage_err)
    }

    async fn blob_size(&self, blob: &ResolvedBlob) -> Result<Option<u64>, String> {
        if blob.endpoint.trim_end_matches('/') != self.backup_endpoint {
            return Err(format!("403 {} is not the backup account", blob.endpoint));
        }
        match self
            .backup
            .properties(&blob.container, &blob.blob, None)
            .await
        {
            Ok(p) => Ok(Some(p.content_length)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(storage_err(e)),
        }
    }
}

#[tokio::test]
async fn end_to_end_on_azurite_through_the_settings() {
    end_to_end(support::Mode::SharedKeyHttp).await;
}

/// Managed identity everywhere: storage over HTTPS with bearer tokens from the local identity
/// endpoint, the source SAS of the test storage a user-delegation SAS.
#[tokio::test]
async fn end_to_end_on_azurite_with_managed_identity() {
    end_to_end(support::Mode::OAuthHttps).await;
}

/// Azurite + a stand-in factory whose storage is that Azurite, and lakeguard Settings for both
/// (`vars` without and `settings` with the datafactory engine).
struct AzFactory {
    az: support::Azurite,
    adf: DataFactoryStandIn,
    vars: std::collections::HashMap<String, String>,
    settings: lakeguard::settings::Settings,
    clients: lakeguard::storage::Clients,
    source: lakeguard::storage::blob::BlobStore,
    backup: lakeguard::storage::blob::BlobStore,
    engine: Arc<dyn CopyEngine>,
}

async fn az_factory(mode: support::Mode) -> AzFactory {
    identity();
    let az = support::Azurite::start(mode).await;
    let src_ep = az.blob_endpoint(support::DEV_ACCOUNT);
    let bak_ep = az.blob_endpoint(support::BACKUP_ACCOUNT);

    // A stand-in whose storage is Azurite; stores built from the same settings as the engine.
    let mut vars: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    match mode {
        support::Mode::SharedKeyHttp => {
            vars.insert(
                "SourceStorage".into(),
                az.connection_string(support::DEV_ACCOUNT),
            );
            vars.insert(
                "BackupStorage".into(),
                az.connection_string(support::BACKUP_ACCOUNT),
            );
            vars.insert(
                "AzureWebJobsStorage".into(),
                az.connection_string(support::DEV_ACCOUNT),
            );
        }
        support::Mode::OAuthHttps => {
            for (name, account) in [
                ("SourceStorage", support::DEV_ACCOUNT),
                ("BackupStorage", support::BACKUP_ACCOUNT),
            ] {
                vars.insert(format!("{name}__blobServiceUri"), az.blob_endpoint(account));
                vars.insert(format!("{name}__accountName"), account.into());
            }
            vars.insert(
                "AzureWebJobsStorage__queueServiceUri".into(),
                az.queue_endpoint(support::DEV_ACCOUNT),
            );
            vars.insert(
                "AzureWebJobsStorage__accountName".into(),
                support::DEV_ACCOUNT.into(),
            );
            vars.insert(
                "LAKEGUARD_CA_CERT".into(),
                az.ca_cert_path().unwrap().to_string_lossy().into_owned(),
            );
        }
    }
    // The stand-in is https (lakeguard refuses an http ARM endpoint): with Azurite's PKI in
    // OAuth mode (its CA is already LAKEGUARD_CA_CERT), a PKI of its own otherwise.
    let adf_pki = match az.pki() {
        Some(pki) => pki.clone(),
        None => {
            let dir = az.dir().join("datafactory-pki");
            std::fs::create_dir_all(&dir).unwrap();
            let pki = support::TestPki::generate(&dir);
            vars.insert(
                "LAKEGUARD_CA_CERT".into(),
                pki.ca_cert.to_string_lossy().into_owned(),
            );
            pki
        }
    };
    vars.insert("LAKEGUARD_MAX_RETRIES".into(), "1".into());
    let plain = lakeguard::settings::Settings::from_map(&vars).unwrap();
    let clients = lakeguard::storage::Clients::new(&plain).unwrap();
    let source = clients.blob_store(&plain.source).unwrap();
    let backup = clients.blob_store(&plain.backup).unwrap();
    let storage = Arc::new(AzuriteStorage {
        backup: backup.clone(),
        source_endpoint: src_ep.clone(),
        backup_endpoint: bak_ep.clone(),
    });
    let adf = DataFactoryStandIn::start_with_pki(SUB, RG, FACTORY, storage, adf_pki).await;

    vars.insert("LAKEGUARD_COPY_ENGINE".into(), "datafactory".into());
    vars.insert("LAKEGUARD_ARM_ENDPOINT".into(), adf.base_url.clone());
    vars.insert("LAKEGUARD_DATAFACTORY_SUBSCRIPTION_ID".into(), SUB.into());
    vars.insert("LAKEGUARD_DATAFACTORY_RESOURCE_GROUP".into(), RG.into());
    vars.insert("LAKEGUARD_DATAFACTORY_NAME".into(), FACTORY.into());
    let settings = lakeguard::settings::Settings::from_map(&vars).unwrap();
    let engine = lakeguard::copy::datafactory::from_settings(&settings, &clients).unwrap();
    assert_eq!(engine.name(), "datafactory");
    AzFactory {
        az,
        adf,
        vars,
        settings,
        clients,
        source,
        backup,
        engine,
    }
}

async fn end_to_end(mode: support::Mode) {
    let AzFactory {
        az: _az,
        adf,
        source,
        backup,
        engine,
        ..
    } = az_factory(mode).await;

    // Version 1 of a blob, snapshotted; then the live blob moves on to version 2.
    let c = support::unique_name("df");
    let b = "dir/a b+#1.csv";
    source.ensure_container(&c).await.unwrap();
    backup.ensure_container(&c).await.unwrap();
    let mut user = BTreeMap::new();
    user.insert("owner".to_owned(), "team-a".to_owned());
    let v1 = source
        .upload(&c, b, b"id,v\n1,one\n".to_vec(), Some("text/csv"), &user)
        .await
        .unwrap();
    let snap = source.create_snapshot(&c, b, &v1, &user).await.unwrap().id;
    let snap_props = source.properties(&c, b, Some(&snap)).await.unwrap();
    source
        .upload(
            &c,
            b,
            b"id,v\n2,two (live, not requested)\n".to_vec(),
            Some("text/csv"),
            &user,
        )
        .await
        .unwrap();

    let mut meta = user.clone();
    meta.insert("lakeguard_source_etag".into(), v1.quoted());
    meta.insert("lakeguard_source_snapshot".into(), snap.clone());
    meta.insert(
        "lakeguard_source_last_modified".into(),
        "2026-11-22T03:00:00Z".into(),
    );
    meta.insert(
        "lakeguard_backed_up_at".into(),
        "2026-11-22T03:00:01Z".into(),
    );
    let job = CopyJob {
        source_container: c.clone(),
        source_blob: b.into(),
        source_snapshot: Some(snap.clone()),
        source_etag: v1.clone(),
        snapshot_etag: Some(snap_props.etag.clone()),
        target_container: c.clone(),
        target_blob: b.into(),
        content_type: Some("text/csv".into()),
        content_length: snap_props.content_length,
        expected_target: None,
        metadata: meta.clone(),
        attempt: 1,
    };
    engine.copy(&job).await.expect("copy through the pipeline");

    let got = backup.download(&c, b, None).await.unwrap();
    assert_eq!(
        got, b"id,v\n1,one\n",
        "the backup must hold the snapshot, not the live blob"
    );
    let props = backup.properties(&c, b, None).await.unwrap();
    assert_eq!(
        props.metadata, meta,
        "metadata of the backup = the job's, marker replaced"
    );
    assert_eq!(props.content_type.as_deref(), Some("text/csv"));
    assert_eq!(adf.create_run_count(), 1);

    // Redelivery: the succeeded run is found, nothing is copied again, the backup is unchanged.
    let mut again = job.clone();
    again.attempt = 2;
    engine.copy(&again).await.unwrap();
    assert_eq!(adf.create_run_count(), 1);
    assert_eq!(
        backup.properties(&c, b, None).await.unwrap().etag,
        props.etag
    );

    // A wrong snapshot ETag: Azurite answers 412 to the source condition; the run fails and the
    // backup keeps what it had.
    let mut wrong = job.clone();
    wrong.snapshot_etag = Some(Etag::new("\"0x8D0000000000000\""));
    wrong.expected_target = Some(props.etag.clone());
    let err = engine.copy(&wrong).await.unwrap_err();
    assert!(
        matches!(err, CopyError::Retryable(ref m) if m.contains("412")),
        "{err:?}"
    );
    assert_eq!(
        backup.properties(&c, b, None).await.unwrap().etag,
        props.etag
    );
}

/// BackupWorker (in process, `ops::backup::process_message`) with the datafactory engine: two
/// versions, a redelivery, a failed run; the worker's idempotency and version keeping and the
/// engine's run handling together.
#[tokio::test]
async fn worker_with_the_datafactory_engine() {
    use lakeguard::ops::backup::{process_message, Outcome};
    let fx = az_factory(support::Mode::SharedKeyHttp).await;
    // The App as the handler builds it, with this engine (App::new builds the engine through
    // crate::copy::datafactory_engine, which the lead wires to from_settings).
    let mut direct_vars = fx.vars.clone();
    direct_vars.insert("LAKEGUARD_COPY_ENGINE".into(), "direct".into());
    let mut app =
        lakeguard::app::App::new(lakeguard::settings::Settings::from_map(&direct_vars).unwrap())
            .unwrap();
    app.engine = lakeguard::copy::datafactory::from_settings(&fx.settings, &fx.clients).unwrap();

    let c = support::unique_name("dfw");
    let b = "data/x y.csv";
    fx.source.ensure_container(&c).await.unwrap();
    let mut user = BTreeMap::new();
    user.insert("owner".to_owned(), "team-b".to_owned());
    let snapshot_of = |etag: &Etag| {
        let mut m = user.clone();
        m.insert("lakeguard_source_etag".into(), etag.quoted());
        m
    };
    let message = |etag: &Etag, snap: &str| {
        json!({"v": 1, "container": c, "blob": b, "etag": etag.quoted(), "snapshot": snap})
            .to_string()
    };

    // Version 1.
    let v1 = fx
        .source
        .upload(&c, b, b"one".to_vec(), Some("text/csv"), &user)
        .await
        .unwrap();
    let s1 = fx
        .source
        .create_snapshot(&c, b, &v1, &snapshot_of(&v1))
        .await
        .unwrap()
        .id;
    let m1 = message(&v1, &s1);
    let out = process_message(&app, &m1, 1).await.expect("backed up");
    assert!(matches!(out, Outcome::BackedUp { .. }), "{out:?}");
    let p1 = fx.backup.properties(&c, b, None).await.unwrap();
    assert_eq!(fx.backup.download(&c, b, None).await.unwrap(), b"one");
    assert_eq!(
        p1.metadata.get("lakeguard_source_etag").map(Etag::new),
        Some(v1.clone())
    );
    assert_eq!(p1.metadata.get("lakeguard_source_snapshot"), Some(&s1));
    assert_eq!(p1.metadata.get("owner").map(String::as_str), Some("team-b"));
    assert!(
        !p1.metadata.contains_key("lakeguard_copy_run"),
        "run marker left on the backup"
    );
    assert_eq!(p1.content_type.as_deref(), Some("text/csv"));
    assert_eq!(fx.adf.create_run_count(), 1);

    // Redelivery: nothing to do, no run.
    let out = process_message(&app, &m1, 2).await.expect("idempotent");
    assert!(matches!(out, Outcome::AlreadyBackedUp { .. }), "{out:?}");
    assert_eq!(fx.adf.create_run_count(), 1);

    // Version 2: the backup is replaced (If-Match on the version the worker kept) and version 1
    // stays as a backup snapshot.
    let v2 = fx
        .source
        .upload(&c, b, b"two!".to_vec(), Some("text/csv"), &user)
        .await
        .unwrap();
    let s2 = fx
        .source
        .create_snapshot(&c, b, &v2, &snapshot_of(&v2))
        .await
        .unwrap()
        .id;
    let m2 = message(&v2, &s2);
    // First delivery: the run fails (e.g. the integration runtime): retryable, with its message.
    fx.adf.script_next_run(RunScript {
        fail_with: Some(
            "Operation on target CopySnapshot failed: integration runtime unavailable".into(),
        ),
        ..Default::default()
    });
    let err = process_message(&app, &m2, 1).await.unwrap_err();
    assert!(err.0.contains("integration runtime unavailable"), "{err}");
    // Second delivery: a new run, the copy lands.
    let out = process_message(&app, &m2, 2)
        .await
        .expect("backed up on retry");
    assert!(matches!(out, Outcome::BackedUp { .. }), "{out:?}");
    assert_eq!(fx.backup.download(&c, b, None).await.unwrap(), b"two!");
    let p2 = fx.backup.properties(&c, b, None).await.unwrap();
    assert_eq!(
        p2.metadata.get("lakeguard_source_etag").map(Etag::new),
        Some(v2.clone())
    );
    assert_eq!(fx.adf.create_run_count(), 3);
    let copies: Vec<_> = fx
        .adf
        .runs()
        .into_iter()
        .filter(|r| r.status == "Succeeded")
        .map(|r| r.parameters["targetIfMatch"].clone())
        .collect();
    assert_eq!(copies.len(), 2);
    assert_eq!(copies[0], json!(""), "first backup written only if absent");
    assert_ne!(
        copies[1],
        json!(""),
        "second backup written only over the kept version"
    );
    // Version 1 is still in the backup account (a backup snapshot).
    let page = fx
        .backup
        .list_page(
            &c,
            &lakeguard::storage::blob::ListOptions {
                prefix: Some(b.to_owned()),
                snapshots: true,
                metadata: true,
                max_results: None,
            },
            None,
        )
        .await
        .unwrap();
    let kept: Vec<_> = page
        .entries
        .iter()
        .filter(|e| e.name == b && e.snapshot.is_some())
        .filter(|e| e.metadata.get("lakeguard_source_etag").map(Etag::new) == Some(v1.clone()))
        .collect();
    // (At least one: the worker keeps the backup's version before each delivery's copy attempt,
    // so the failed first delivery of version 2 kept it once already.)
    assert!(
        !kept.is_empty(),
        "version 1 not kept in the backup account: {:#?}",
        page.entries
    );
}

// ---------------------------------------------------------------------------------------------
// Issue 16: what Put Blob From URL needs, the SAS, blobs above 2 GiB
// ---------------------------------------------------------------------------------------------

/// A 3 GiB version (above 2^31 - 1, below Put Blob From URL's 5000 MiB): createRun carries its
/// length as a String, the stand-in (Int = 32-bit) accepts the body, and the pipeline's size check
/// compares it with Get Metadata's size as text, so the run succeeds.
#[tokio::test]
async fn a_3_gib_version_builds_a_valid_create_run_and_is_copied() {
    let f = fixture().await;
    let size: u64 = 3 << 30;
    f.storage.add_snapshot_sized(
        "raw",
        "big.bin",
        SNAP,
        "\"0xB1G\"",
        b"stands for 3 GiB",
        size,
    );
    let j = job("big.bin", "\"0xB1G\"", size);
    f.engine().copy(&j).await.expect("a 3 GiB copy");
    let body = f
        .adf
        .requests()
        .into_iter()
        .find(|r| r.is_create_run())
        .unwrap()
        .body
        .unwrap();
    assert_eq!(body["sourceContentLength"], json!("3221225472"));
    assert_eq!(f.storage.backup_blob("raw", "big.bin").unwrap().size, size);
    assert_eq!(f.adf.create_run_count(), 1);

    // One byte off is still caught by the size check.
    f.storage
        .add_snapshot_sized("raw", "big2.bin", SNAP, "\"0xB1G2\"", b"x", size);
    let wrong = job("big2.bin", "\"0xB1G2\"", size + 1);
    match f.engine().copy(&wrong).await.unwrap_err() {
        CopyError::Retryable(m) => assert!(m.contains("3221225473 bytes expected"), "{m}"),
        other => panic!("{other:?}"),
    }
}

/// The stand-in refuses an `Int` above 32 bits, so a pipeline that declared the length `Int`
/// (as it did) fails the 3 GiB test above at createRun.
#[test]
fn the_stand_in_treats_int_parameters_as_32_bit() {
    identity();
    let pipeline = json!({"properties": {"parameters": {"n": {"type": "Int"}}}});
    assert!(validate_run_parameters(&pipeline, &json!({"n": 2147483647})).is_ok());
    let err = validate_run_parameters(&pipeline, &json!({"n": 3221225472u64})).unwrap_err();
    assert!(err.contains("must be of type Int"), "{err}");
    assert!(validate_run_parameters(&pipeline, &json!({"n": "3"})).is_err());
    let shipped = FactoryDefinition::shipped();
    let params = declared_parameters(shipped.pipeline("lakeguard-backup-copy").unwrap());
    assert_eq!(params["sourceContentLength"].0, "String");
}

/// A factory that takes the docs literally ("the endpoint must return JSON") fails the Web
/// activity on Put Blob From URL's empty 201, after the write; its retries then meet the written
/// blob (409). The engine sees this run's marker with the version's length on the backup and
/// counts the copy as done, with the job's metadata: exactly one write, no second run.
#[tokio::test]
async fn a_factory_that_refuses_the_empty_201_still_backs_up_the_version_once() {
    let f = fixture().await;
    f.adf.set_web_response_policy(WebResponsePolicy::JsonOnly);
    let content = b"version X";
    let j = seed(&f, "e.csv", "\"0x8DE1\"", content);
    let out = f.engine().copy(&j).await.expect("the copy landed");
    assert!(matches!(out, CopyOutcome::Copied { .. }));
    let run = &f.adf.runs()[0];
    assert_eq!(run.status, "Failed", "the strict factory failed the run");
    // The last attempt's error: the retry found the blob the first attempt wrote.
    assert!(run.message.contains("409"), "{}", run.message);
    assert_eq!(
        f.storage.copies.lock().unwrap().len(),
        4,
        "first attempt + 3 retries"
    );
    let b = f.storage.backup_blob("raw", "e.csv").unwrap();
    assert_eq!(b.content, content);
    assert_eq!(b.metadata, j.metadata, "stamped with the job's metadata");
    assert_eq!(f.adf.create_run_count(), 1);

    // But a failed run whose copy did not land (412 on the source) is still a failure.
    let mut other = seed(&f, "e2.csv", "\"0x8DE2\"", content);
    other.snapshot_etag = Some(Etag::new("\"0xNOPE\""));
    assert!(matches!(
        f.engine().copy(&other).await,
        Err(CopyError::Retryable(ref m)) if m.contains("412")
    ));
    assert!(f.storage.backup_blob("raw", "e2.csv").is_none());
}

/// The Web activity contract as documented, enforced by the stand-in: `datasets` and
/// `linkedServices` are required, PUT needs a `body`, which is what goes on the wire (Put Blob
/// From URL refuses a Content-Length other than 0), and an answer that is not a JSON object is
/// refused unless it is empty (observed) — with `JsonOnly`, even then.
#[test]
fn the_web_activity_contract_is_enforced() {
    identity();
    let def = FactoryDefinition::shipped();
    let pipeline = def.pipeline("lakeguard-backup-copy").unwrap();
    let web: Vec<Value> = all_activities(pipeline)
        .into_iter()
        .filter(|a| a["type"] == "WebActivity")
        .collect();
    let j = job("w.csv", "\"0x1\"", 3);
    let mut ctx = ExprContext {
        run_id: "run-1".into(),
        ..Default::default()
    };
    let params = params_for(&j, "sv=2021-08-06&sr=bs&sp=r&sig=abc");
    ctx.pipeline_parameters = params.as_object().unwrap().clone();
    for a in &web {
        let name = a["name"].as_str().unwrap();
        let req = resolve_web_request(name, a, &ctx).unwrap();
        assert_eq!(req.header("content-length"), Some("0"), "{name}");
        assert!(req
            .source_url()
            .unwrap()
            .ends_with("&sv=2021-08-06&sr=bs&sp=r&sig=abc"));
        for (field, fragment) in [
            ("body", "'body' is required for PUT"),
            ("datasets", "'datasets' is required"),
            ("linkedServices", "'linkedServices' is required"),
        ] {
            let mut without = a.clone();
            without["typeProperties"]
                .as_object_mut()
                .unwrap()
                .remove(field);
            let err = resolve_web_request(name, &without, &ctx).unwrap_err();
            assert!(err.contains(fragment), "{err}");
        }
        let mut json_body = a.clone();
        json_body["typeProperties"]["body"] = json!("{}");
        let req = resolve_web_request(name, &json_body, &ctx).unwrap();
        assert_eq!(req.header("content-length"), Some("2"));
    }
    assert_eq!(web.len(), 2);
    use WebResponsePolicy::*;
    assert_eq!(
        web_activity_output(EmptyIsTolerated, 201, b"", "\"e\"").unwrap()["Response"],
        ""
    );
    assert!(web_activity_output(JsonOnly, 201, b"", "\"e\"").is_err());
    assert!(web_activity_output(EmptyIsTolerated, 200, b"<xml/>", "\"e\"").is_err());
    assert!(web_activity_output(EmptyIsTolerated, 200, b"[1]", "\"e\"").is_err());
    assert_eq!(
        web_activity_output(JsonOnly, 200, br#"{"a":1}"#, "\"e\"").unwrap()["a"],
        1
    );
}

/// A body other than the empty string reaches storage as a Content-Length other than 0, which
/// Put Blob From URL refuses: the run fails and nothing is written.
#[tokio::test]
async fn a_non_empty_body_fails_put_blob_from_url() {
    let f = fixture().await;
    let j = seed(&f, "nb.csv", "\"0x1\"", b"abc");
    let mut copy = ResolvedCopy {
        run_id: "r".into(),
        activity: "A".into(),
        method: "PUT".into(),
        url: format!("{BAK}/raw/nb.csv"),
        headers: BTreeMap::new(),
        msi_resource: "https://storage.azure.com/".into(),
    };
    let sas = sas_for(&f, &j).await;
    copy.headers.insert(
        "x-ms-copy-source".into(),
        format!(
            "{SRC}/raw/nb.csv?snapshot={}&{sas}",
            url::form_urlencoded::byte_serialize(SNAP.as_bytes()).collect::<String>()
        ),
    );
    copy.headers
        .insert("x-ms-blob-type".into(), "BlockBlob".into());
    copy.headers.insert("content-length".into(), "2".into());
    let err = f.storage.put_blob_from_url(&copy).await.unwrap_err();
    assert!(err.contains("Content-Length: 0"), "{err}");
    copy.headers.insert("content-length".into(), "0".into());
    f.storage
        .put_blob_from_url(&copy)
        .await
        .expect("with Content-Length 0");
    assert_eq!(
        f.storage.backup_content("raw", "nb.csv").as_deref(),
        Some(&b"abc"[..])
    );
}

/// The SAS reads exactly the snapshot it was made for: not another snapshot, not another blob, not
/// the live blob, and not once expired (the storage side of the stand-in, like the service).
#[tokio::test]
async fn the_source_sas_reads_only_its_snapshot() {
    let f = fixture().await;
    let j = seed(&f, "s.csv", "\"0x1\"", b"abc");
    f.storage.add_snapshot(
        "raw",
        "s.csv",
        "2026-11-22T03:09:00.0000000Z",
        "\"0x2\"",
        b"other",
    );
    f.storage
        .add_snapshot("raw", "t.csv", SNAP, "\"0x1\"", b"t");
    let sas = sas_for(&f, &j).await;
    let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let attempt = |source: String, target: &str| {
        let mut headers = BTreeMap::new();
        headers.insert("x-ms-copy-source".to_owned(), source);
        headers.insert("x-ms-blob-type".to_owned(), "BlockBlob".to_owned());
        headers.insert("content-length".to_owned(), "0".to_owned());
        ResolvedCopy {
            run_id: "r".into(),
            activity: "A".into(),
            method: "PUT".into(),
            url: format!("{BAK}/raw/{target}"),
            headers,
            msi_resource: "https://storage.azure.com/".into(),
        }
    };
    for (source, why) in [
        (
            format!(
                "{SRC}/raw/s.csv?snapshot={}&{sas}",
                enc("2026-11-22T03:09:00.0000000Z")
            ),
            "another snapshot",
        ),
        (
            format!("{SRC}/raw/t.csv?snapshot={}&{sas}", enc(SNAP)),
            "another blob",
        ),
        (format!("{SRC}/raw/s.csv?{sas}"), "the live blob"),
        (format!("{SRC}/raw/s.csv?snapshot={}", enc(SNAP)), "no SAS"),
    ] {
        let err = f
            .storage
            .put_blob_from_url(&attempt(source, "x.csv"))
            .await
            .unwrap_err();
        assert!(err.starts_with("403"), "{why}: {err}");
        assert!(!err.contains("sig="), "an error quotes the SAS: {err}");
    }
    let good = attempt(
        format!("{SRC}/raw/s.csv?snapshot={}&{sas}", enc(SNAP)),
        "s.csv",
    );
    f.storage
        .put_blob_from_url(&good)
        .await
        .expect("its own snapshot");
    f.storage.expire_issued_sas();
    let err = f.storage.put_blob_from_url(&good).await.unwrap_err();
    assert!(err.contains("expiry"), "{err}");
}

/// A run that starts its copy after the SAS expired (a long queue) fails with the service's 403;
/// the error is retryable, and the redelivery starts a new run with a fresh SAS (a failed run is
/// never adopted), which copies the version.
#[tokio::test]
async fn a_run_that_outlives_its_sas_is_replaced_with_a_fresh_sas() {
    let f = fixture().await;
    let mut j = seed(&f, "x.csv", "\"0x1\"", b"abc");
    f.adf.script_next_run(RunScript {
        queued_for: Duration::from_millis(400),
        ..Default::default()
    });
    let engine = f.engine();
    let jj = j.clone();
    let copy = tokio::spawn(async move { engine.copy(&jj).await });
    // The run is queued: its SAS expires before the copy starts.
    for _ in 0..200 {
        if !f.storage.issued_sas.lock().unwrap().is_empty() && f.adf.runs().len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    f.storage.expire_issued_sas();
    match copy.await.unwrap().unwrap_err() {
        CopyError::Retryable(m) => assert!(m.contains("403") && m.contains("expiry"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(f.storage.backup_blob("raw", "x.csv").is_none());
    j.attempt = 2;
    f.engine()
        .copy(&j)
        .await
        .expect("a new run with a fresh SAS");
    assert_eq!(f.adf.create_run_count(), 2);
    assert_eq!(f.storage.issued_sas.lock().unwrap().len(), 2);
    assert_eq!(
        f.storage.backup_content("raw", "x.csv").as_deref(),
        Some(&b"abc"[..])
    );
}

/// A run's message that quotes the copy-source URL never carries the SAS signature out of the
/// engine (the worker logs and poisons with this error).
#[tokio::test]
async fn a_run_message_never_carries_the_sas_signature() {
    let f = fixture().await;
    let j = seed(&f, "r.csv", "\"0x1\"", b"abc");
    f.adf.script_next_run(RunScript {
        fail_with: Some(format!(
            "Operation on target CopySnapshotToNewBackup failed: 403 for {SRC}/raw/r.csv?snapshot=x&sv=2021-08-06&sr=bs&sp=r&sig=S3cr3tSig%3D&se=2026"
        )),
        ..Default::default()
    });
    let err = f.engine().copy(&j).await.unwrap_err().to_string();
    assert!(!err.contains("S3cr3tSig"), "{err}");
    assert!(err.contains("sig=REDACTED"), "{err}");
}
