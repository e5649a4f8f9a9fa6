//! SnapshotProducer end to end: `lakeguard serve` driven over HTTP exactly as the Functions host
//! forwards it, against a real Azurite, in both authentication modes; results read back with the
//! harness's independent REST oracle.

mod support;

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine as _;
use serde_json::{json, Value};
use support::host::forwarded_http;
use support::{unique_name, Mode, Stack};

/// Names that break naive code: spaces, `%`, `#`, `?`, `+`, quotes, unicode, nesting, prefixes of
/// each other, and the 1024-character maximum.
fn odd_names() -> Vec<String> {
    let mut names: Vec<String> = [
        "plain.csv",
        "dir/sub dir/with space.csv",
        "dir/100% sure.txt",
        "dir/#hash.txt",
        "dir/what?.txt",
        "dir/a+b=c.txt",
        "dir/\"quoted\" 'name'.txt",
        "ünïcødé/données €/😀.json",
        "a.txt",
        "a.txt.bak",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let long = format!("deep/{}", "x".repeat(1024 - "deep/".len()));
    assert_eq!(long.chars().count(), 1024);
    names.push(long);
    names
}

async fn seed(stack: &Stack, container: &str, names: &[String]) {
    let src = stack.source();
    src.create_container(container).await.ok("create container");
    for (i, n) in names.iter().enumerate() {
        src.put_blob(
            container,
            n,
            format!("content {i} of {n}").as_bytes(),
            &[("owner", "pipeline-7")],
        )
        .await
        .ok("put blob");
    }
    // An HNS directory placeholder: not data.
    src.put_blob(container, "dir", b"", &[("hdi_isfolder", "true")])
        .await
        .ok("put placeholder");
}

async fn call(port: u16, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let r = forwarded_http(
        port,
        method,
        path,
        &[
            ("x-functions-key", "test-key"),
            ("content-type", "application/json"),
        ],
        body.map(|b| serde_json::to_vec(&b).unwrap()),
    )
    .await;
    (r.status.as_u16(), r.json())
}

fn decode_message(raw: &str) -> Value {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(raw.trim())
        .expect("queue message must be base64");
    serde_json::from_slice(&bytes).expect("queue message must be JSON")
}

async fn producer_end_to_end(mode: Mode) {
    let stack = Stack::start(mode).await;
    let container = unique_name("raw");
    let names = odd_names();
    seed(&stack, &container, &names).await;
    let handler = stack.handler().await;
    let port = handler.port();

    let (status, body) = call(
        port,
        "POST",
        "/api/snapshot?code=abc",
        Some(json!({"container": container})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let r = &body["report"];
    assert_eq!(r["scanned"], names.len() as u64 + 1);
    assert_eq!(r["snapshotted"], names.len() as u64);
    assert_eq!(r["enqueued"], names.len() as u64);
    assert_eq!(r["skipped"], 1, "the directory placeholder is skipped");
    assert_eq!(r["failed"], 0);

    // Exactly one snapshot per data blob, none for the placeholder.
    let listing = stack.source().list_blobs(&container, None).await;
    let mut snapshots: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut bases: BTreeMap<String, String> = BTreeMap::new();
    for b in &listing {
        match &b.snapshot {
            Some(s) => snapshots.entry(b.name.clone()).or_default().push((
                s.clone(),
                b.metadata
                    .get("lakeguard_source_etag")
                    .cloned()
                    .unwrap_or_default(),
            )),
            None => {
                bases.insert(b.name.clone(), b.etag.trim_matches('"').to_string());
            }
        }
    }
    assert!(!snapshots.contains_key("dir"));
    for n in &names {
        let snaps = &snapshots[n];
        assert_eq!(snaps.len(), 1, "{n}");
        assert_eq!(
            snaps[0].1.trim_matches('"'),
            bases[n],
            "snapshot metadata names the version"
        );
    }

    // One base64 JSON message per snapshot, built by serde, naming exactly that snapshot.
    let messages = stack.queues().peek_messages(&stack.queue).await;
    assert_eq!(messages.len(), names.len());
    let mut seen = BTreeSet::new();
    for m in &messages {
        let v = decode_message(&m.text);
        assert_eq!(v["v"], 1);
        assert_eq!(v["container"], container.as_str());
        let blob = v["blob"].as_str().unwrap().to_string();
        assert_eq!(v["etag"].as_str().unwrap().trim_matches('"'), bases[&blob]);
        assert_eq!(v["snapshot"].as_str().unwrap(), snapshots[&blob][0].0);
        seen.insert(blob);
    }
    assert_eq!(seen, names.iter().cloned().collect());

    // Nothing changed: nothing to do.
    let (status, body) = call(
        port,
        "GET",
        &format!("/api/snapshot?container={container}&code=abc"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["report"]["enqueued"], 0);
    assert_eq!(body["report"]["unchanged"], names.len() as u64);

    // One blob changes, under a prefix: exactly that one is found.
    stack
        .source()
        .put_blob(&container, "dir/#hash.txt", b"new content", &[])
        .await
        .ok("rewrite");
    let (status, body) = call(
        port,
        "POST",
        "/api/snapshot",
        Some(json!({"container": container, "prefix": "dir/"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["report"]["enqueued"], 1);
    assert_eq!(
        stack.queues().peek_messages(&stack.queue).await.len(),
        names.len() + 1
    );

    if mode == Mode::OAuthHttps {
        let id = stack.identity.as_ref().unwrap();
        assert!(
            id.requests_for("https://storage.azure.com") >= 1,
            "bearer tokens came from the managed identity endpoint"
        );
        assert!(id.violations().is_empty(), "{:?}", id.violations());
    }
    stack.assert_no_secrets_in(&handler.logs());
}

#[tokio::test]
async fn producer_end_to_end_shared_key() {
    producer_end_to_end(Mode::SharedKeyHttp).await;
}

#[tokio::test]
async fn producer_end_to_end_managed_identity() {
    producer_end_to_end(Mode::OAuthHttps).await;
}

#[tokio::test]
async fn producer_rejects_bad_input_clearly() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let handler = stack.handler().await;
    let port = handler.port();
    let (status, body) = call(port, "GET", "/api/snapshot", None).await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("container"),
        "{body}"
    );
    let (status, body) = call(port, "GET", "/api/snapshot?container=Bad_Name!", None).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("not a valid container name"),
        "{body}"
    );
    let (status, body) = call(
        port,
        "GET",
        "/api/snapshot?container=no-such-container",
        None,
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let r = forwarded_http(
        port,
        "POST",
        "/api/snapshot",
        &[],
        Some(b"container=raw".to_vec()),
    )
    .await;
    assert_eq!(r.status.as_u16(), 400, "{}", r.body);
    // The handler is still healthy.
    assert_eq!(
        forwarded_http(port, "GET", "/", &[], None)
            .await
            .status
            .as_u16(),
        200
    );
}

#[tokio::test]
async fn producer_on_an_empty_container() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let container = unique_name("empty");
    stack
        .source()
        .create_container(&container)
        .await
        .ok("create");
    let handler = stack.handler().await;
    let (status, body) = call(
        handler.port(),
        "GET",
        &format!("/api/snapshot?container={container}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["report"]["scanned"], 0);
    assert_eq!(body["report"]["enqueued"], 0);
}

/// A blob rewritten between the listing and the snapshot: the conditional snapshot fails with 412
/// and the producer snapshots the new version instead; the message names what the snapshot holds.
#[tokio::test]
async fn blob_rewritten_between_listing_and_snapshot() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let container = unique_name("race");
    stack
        .source()
        .create_container(&container)
        .await
        .ok("create");
    stack
        .source()
        .put_blob(&container, "x.csv", b"version 1", &[])
        .await
        .ok("put");
    let app = support::app(&stack.env());
    let listed = app
        .source
        .list_page(
            &container,
            &lakeguard::storage::blob::ListOptions {
                metadata: true,
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap()
        .entries
        .remove(0);
    stack
        .source()
        .put_blob(&container, "x.csv", b"version 2", &[])
        .await
        .ok("rewrite");
    let (snapshot, taken) =
        lakeguard::ops::snapshot::snapshot_current(&app.source, &container, listed.clone(), None)
            .await
            .unwrap()
            .expect("the blob still exists");
    assert_ne!(taken.etag, listed.etag, "the new version was taken");
    let content = app
        .source
        .download(&container, "x.csv", Some(&snapshot.id))
        .await
        .unwrap();
    assert_eq!(content, b"version 2");
    let props = app
        .source
        .properties(&container, "x.csv", Some(&snapshot.id))
        .await
        .unwrap();
    assert_eq!(
        props.metadata["lakeguard_source_etag"].trim_matches('"'),
        taken.etag.as_str()
    );
}

/// The queue service is unreachable: the run fails before snapshotting anything (503, clear
/// message), so nothing is half done.
#[tokio::test]
async fn unreachable_queue_fails_before_any_snapshot() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let container = unique_name("enq");
    seed(&stack, &container, &["a.csv".to_string()]).await;
    let dead = format!(
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={};BlobEndpoint=http://127.0.0.1:9/devstoreaccount1;QueueEndpoint=http://127.0.0.1:{}/devstoreaccount1",
        support::DEV_KEY,
        support::free_port()
    );
    let broken = support::Handler::spawn(&stack.env_with(&[("AzureWebJobsStorage", &dead)])).await;
    let (status, body) = call(
        broken.port(),
        "GET",
        &format!("/api/snapshot?container={container}"),
        None,
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains("queue"), "{body}");
    assert!(stack
        .source()
        .list_blobs(&container, None)
        .await
        .iter()
        .all(|b| b.snapshot.is_none()));
    stack.assert_no_secrets_in(&broken.logs());
}

/// The enqueue fails after the snapshot was taken (the queue vanished): the run reports a partial
/// failure, removes the snapshots it could not announce and the watermark of the previous run (so
/// that the next run lists in full), and the next run finds the same blobs again. Nothing is lost.
#[tokio::test]
async fn failed_enqueue_is_found_again_by_the_next_run() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let container = unique_name("enq");
    let names = ["a.csv".to_string(), "b/c.csv".to_string()];
    seed(&stack, &container, &names).await;
    let handler = stack.handler().await;
    // A complete first run creates the queue (once per process) and leaves a watermark...
    let (status, body) = call(
        handler.port(),
        "GET",
        &format!("/api/snapshot?container={container}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["report"]["state"], "saved");
    let state = lakeguard::ops::watermark::blob_name(&container, None);
    assert_eq!(
        stack
            .backup()
            .get_blob("lakeguard-state", &state, None)
            .await
            .status,
        200
    );
    for n in &names {
        stack
            .source()
            .put_blob(&container, n, b"version 2", &[])
            .await
            .ok("rewrite");
    }
    // ...then the queue disappears.
    stack
        .queues()
        .delete_queue(&stack.queue)
        .await
        .ok("delete queue");
    let (status, body) = call(
        handler.port(),
        "GET",
        &format!("/api/snapshot?container={container}"),
        None,
    )
    .await;
    assert_eq!(
        status, 500,
        "a partial failure fails the pipeline activity visibly: {body}"
    );
    assert_eq!(body["status"], "partial_failure");
    assert_eq!(body["report"]["failed"], 2);
    assert_eq!(body["report"]["enqueued"], 0);
    assert_eq!(
        snapshots_per_name(&stack.source().list_blobs(&container, None).await),
        names.iter().map(|n| (n.clone(), 1)).collect(),
        "unannounced snapshots were removed; the first run's remain"
    );
    // Replaced by a discard marker, not deleted: the function needs no delete right on the
    // backup account.
    let kept = stack
        .backup()
        .get_blob("lakeguard-state", &state, None)
        .await;
    assert!(
        kept.text().contains("\"discarded\""),
        "a run with failures discards the watermark: {} / {}",
        body["report"]["state"],
        kept.text()
    );

    stack
        .queues()
        .create_queue(&stack.queue)
        .await
        .ok("create queue");
    let (status, body) = call(
        handler.port(),
        "GET",
        &format!("/api/snapshot?container={container}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["report"]["listing"]
            .as_str()
            .unwrap()
            .starts_with("full (the previous run discarded its state"),
        "{body}"
    );
    assert_eq!(body["report"]["enqueued"], 2);
    assert_eq!(stack.queues().peek_messages(&stack.queue).await.len(), 2);
}

fn snapshots_per_name(listing: &[support::rest::ListedBlob]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for b in listing.iter().filter(|b| b.snapshot.is_some()) {
        *out.entry(b.name.clone()).or_insert(0) += 1;
    }
    out
}

/// After a complete run, the next run lists base blobs only (no snapshot rows) and decides by
/// Last-Modified against the watermark, plus the set of versions handled inside its window: every
/// rewrite and every new blob is found (odd names included), and a version already handled is
/// never taken twice, even though every blob here was written within the window.
#[tokio::test]
async fn the_watermark_lists_base_blobs_only_and_misses_nothing() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let container = unique_name("mark");
    let names = odd_names();
    seed(&stack, &container, &names).await;
    let proxy = stack.blob_proxy();
    let app = support::app(&stack.env_via_proxy(&proxy));
    let run = |full: bool| {
        let app = app.clone();
        let container = container.clone();
        async move {
            lakeguard::ops::snapshot::run_with(
                &app,
                &container,
                None,
                full,
                lakeguard::ops::no_progress(),
            )
            .await
            .expect("run")
        }
    };
    let listings_with_snapshots = |proxy: &support::CountingProxy| {
        proxy
            .requests()
            .iter()
            .filter(|r| r.is_list_blobs())
            .map(|r| r.query("include").unwrap_or_default().contains("snapshots"))
            .collect::<Vec<bool>>()
    };

    let first = run(false).await;
    assert!(first.listing.starts_with("full (no state"), "{first:?}");
    assert_eq!(first.state, "saved", "{first:?}");
    assert_eq!(first.enqueued, names.len() as u64);
    assert_eq!(listings_with_snapshots(&proxy), vec![true]);
    let state_name = lakeguard::ops::watermark::blob_name(&container, None);
    let state = stack
        .backup()
        .get_blob("lakeguard-state", &state_name, None)
        .await
        .ok("the state is kept in the backup account");
    let state: Value = serde_json::from_slice(state.body.as_ref()).unwrap();
    assert_eq!(state["container"], container.as_str());
    assert_eq!(
        state["handled"].as_array().unwrap().len(),
        names.len(),
        "every version written inside the window is remembered: {state}"
    );

    // Nothing changed: base blobs only, nothing per blob, nothing enqueued.
    proxy.reset();
    let second = run(false).await;
    assert_eq!(
        second.listing, "since the previous complete run",
        "{second:?}"
    );
    assert!(second.since.is_some());
    assert_eq!(second.enqueued, 0, "{second:?}");
    assert_eq!(second.unchanged, names.len() as u64);
    assert_eq!(second.skipped, 1, "the placeholder");
    assert_eq!(listings_with_snapshots(&proxy), vec![false]);
    let per_blob: Vec<_> = proxy
        .requests()
        .into_iter()
        .filter(|r| !r.is_list_blobs() && !r.target.contains("lakeguard-state"))
        .filter(|r| !(r.restype().as_deref() == Some("container") && r.method == "GET"))
        .collect();
    assert!(per_blob.is_empty(), "{per_blob:#?}");

    // A rewrite of an odd name, a metadata-only change and a new blob: exactly those three.
    let src = stack.source();
    src.put_blob(&container, "dir/#hash.txt", b"v2", &[])
        .await
        .ok("rewrite");
    src.put_blob(
        &container,
        "ünïcødé/données €/😀.json",
        b"v2",
        &[("owner", "someone-else")],
    )
    .await
    .ok("rewrite with metadata");
    src.put_blob(&container, "new/100% fresh?.csv", b"new", &[])
        .await
        .ok("new blob");
    proxy.reset();
    let third = run(false).await;
    assert_eq!(third.listing, "since the previous complete run");
    assert_eq!(third.enqueued, 3, "{third:?}");
    assert_eq!(third.failed, 0);
    assert_eq!(listings_with_snapshots(&proxy), vec![false]);
    let snaps = snapshots_per_name(&src.list_blobs(&container, None).await);
    assert_eq!(snaps["dir/#hash.txt"], 2);
    assert_eq!(snaps["ünïcødé/données €/😀.json"], 2);
    assert_eq!(snaps["new/100% fresh?.csv"], 1);
    assert_eq!(snaps["plain.csv"], 1);

    // Again nothing: the three new versions are in the handled set, not taken again.
    let fourth = run(false).await;
    assert_eq!(fourth.enqueued, 0, "{fourth:?}");
    // A full listing, asked for, agrees with the watermark.
    proxy.reset();
    let full = run(true).await;
    assert_eq!(full.listing, "full (asked for)");
    assert_eq!(full.enqueued, 0, "{full:?}");
    assert_eq!(listings_with_snapshots(&proxy), vec![true]);
    assert_eq!(
        stack.queues().peek_messages(&stack.queue).await.len(),
        names.len() + 3,
        "one request per version, no duplicates"
    );
}

/// A state that cannot be read is never trusted (the run lists in full) and is replaced; one
/// scoped to another prefix is not used for this one.
#[tokio::test]
async fn a_damaged_or_foreign_watermark_means_a_full_listing() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let container = unique_name("bad");
    seed(
        &stack,
        &container,
        &["a.csv".to_string(), "p/b.csv".to_string()],
    )
    .await;
    let app = support::app(&stack.env());
    let name = lakeguard::ops::watermark::blob_name(&container, None);
    stack.backup().create_container("lakeguard-state").await;
    stack
        .backup()
        .put_blob("lakeguard-state", &name, b"{not json", &[])
        .await
        .ok("damage");
    let r = lakeguard::ops::snapshot::run(&app, &container, None, lakeguard::ops::no_progress())
        .await
        .unwrap();
    assert!(
        r.listing.starts_with("full (the state is not readable"),
        "{r:?}"
    );
    assert_eq!(r.enqueued, 2);
    assert_eq!(
        r.state, "saved",
        "replaced under If-Match on the damaged blob"
    );

    // The whole-container state does not serve a prefix run: it lists in full, finds nothing new.
    let p =
        lakeguard::ops::snapshot::run(&app, &container, Some("p/"), lakeguard::ops::no_progress())
            .await
            .unwrap();
    assert!(p.listing.starts_with("full (no state"), "{p:?}");
    assert_eq!(p.enqueued, 0);
    let again =
        lakeguard::ops::snapshot::run(&app, &container, Some("p/"), lakeguard::ops::no_progress())
            .await
            .unwrap();
    assert_eq!(again.listing, "since the previous complete run");
    assert_eq!(again.enqueued, 0);
}

/// A watermark that cannot be read (the service is busy) is neither used nor replaced: the run
/// lists in full, and the state stays exactly as it was (it is sound, only older).
#[tokio::test]
async fn an_unreadable_watermark_is_neither_used_nor_replaced() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let container = unique_name("busy");
    seed(&stack, &container, &["a.csv".to_string()]).await;
    let first = lakeguard::ops::snapshot::run(
        &support::app(&stack.env()),
        &container,
        None,
        lakeguard::ops::no_progress(),
    )
    .await
    .unwrap();
    assert_eq!(first.state, "saved");
    let name = lakeguard::ops::watermark::blob_name(&container, None);
    let before = state_etag(&stack, &name).await;

    let proxy = stack.blob_proxy();
    let mut env = stack.env_via_proxy(&proxy);
    env.push(("LAKEGUARD_MAX_RETRIES".into(), "0".into()));
    let state_path = format!("/backupacct/lakeguard-state/{name}");
    proxy.fail_next(1, move |method, target| {
        method == "GET" && target.split('?').next() == Some(state_path.as_str())
    });
    let r = lakeguard::ops::snapshot::run(
        &support::app(&env),
        &container,
        None,
        lakeguard::ops::no_progress(),
    )
    .await
    .unwrap();
    assert!(
        r.listing.starts_with("full (reading the state failed"),
        "{r:?}"
    );
    assert_eq!(
        r.enqueued, 0,
        "a full listing finds a.csv snapshotted: {r:?}"
    );
    assert_eq!(
        r.state,
        "not saved: the state this run could not read is kept"
    );
    assert_eq!(state_etag(&stack, &name).await, before);
    assert_eq!(
        proxy.requests().iter().filter(|q| q.status == 503).count(),
        1,
        "{:#?}",
        proxy.summary()
    );
}

async fn state_etag(stack: &Stack, name: &str) -> Option<String> {
    stack
        .backup()
        .blob_properties("lakeguard-state", name, None)
        .await
        .ok("state")
        .header("etag")
}

/// Two runs overlap: the one that saves second finds the state changed since it read it, and
/// keeps the other's (If-Match), which is as valid as its own.
#[tokio::test]
async fn a_watermark_saved_meanwhile_by_another_run_is_kept() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let container = unique_name("race");
    seed(&stack, &container, &["a.csv".to_string()]).await;
    let app = support::app(&stack.env());
    let first =
        lakeguard::ops::snapshot::run(&app, &container, None, lakeguard::ops::no_progress())
            .await
            .unwrap();
    assert_eq!(first.state, "saved");
    let now = time::OffsetDateTime::now_utc();
    let loaded = lakeguard::ops::watermark::load(&app, &container, None, now).await;
    assert!(loaded.since.is_some() && loaded.etag.is_some());
    // The other run saves first.
    let other = lakeguard::core::watermark::StateBuilder::new(&container, None, now)
        .finish()
        .unwrap();
    let other_saved = lakeguard::ops::watermark::save(&app, &loaded, &other).await;
    assert_eq!(other_saved, "saved");
    let ours = lakeguard::core::watermark::StateBuilder::new(&container, None, now)
        .finish()
        .unwrap();
    let outcome = lakeguard::ops::watermark::save(&app, &loaded, &ours).await;
    assert_eq!(outcome, "kept the state another run saved meanwhile");
    // A first state raced the same way (If-None-Match: *).
    let fresh = lakeguard::ops::watermark::load(&app, &container, Some("x/"), now).await;
    assert!(fresh.etag.is_none());
    assert_eq!(
        lakeguard::ops::watermark::save(&app, &fresh, &ours).await,
        "saved"
    );
    assert_eq!(
        lakeguard::ops::watermark::save(&app, &fresh, &ours).await,
        "kept the state another run saved meanwhile"
    );
    // Discarding is conditional too: a newer state is not removed.
    assert_eq!(
        lakeguard::ops::watermark::discard(&app, &loaded).await,
        "kept the state another run saved meanwhile"
    );
}

/// Issue 15, defect 5 (and issue 16 item 4): the HTTP producer has a time budget (the host
/// answers HTTP within 230 s). Past it, the run saves its place and continues through the
/// continuation queue, hop by hop, on any instance; the answer says so. Every blob is
/// snapshotted and requested exactly once, also when a hop's message is delivered twice, and
/// the run leaves its watermark only at the end.
#[tokio::test]
async fn an_http_producer_over_budget_continues_through_the_queue_exactly_once() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let c = unique_name("budget");
    let names = odd_names();
    seed(&stack, &c, &names).await;
    let env = stack.env_with(&[
        ("LAKEGUARD_PRODUCER_BUDGET_SECS", "0"),
        ("LAKEGUARD_PRODUCER_PAGE_SIZE", "3"),
    ]);
    let handler = support::Handler::spawn(&env).await;
    let (status, body) = call(
        handler.port(),
        "POST",
        &format!("/api/snapshot?container={c}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body:#}");
    assert_eq!(body["status"], "continued", "{body:#}");
    let run_id = body["run_id"].as_str().expect("run id").to_owned();
    assert!(body["report"]["scanned"].as_u64().unwrap() <= 3, "{body:#}");
    let queues = stack.queues();
    let rq = format!("{}-reconcile", stack.queue);
    let first_hop = queues.peek_messages(&rq).await;
    assert_eq!(first_hop.len(), 1);
    let hop_text = first_hop[0].decoded_text().unwrap_or_default();
    assert!(hop_text.contains("\"kind\":\"snapshot\""), "{hop_text}");
    // Any instance continues it: here the ReconcileWorker code from a terminal.
    let out = support::run_cli(&["reconcile", "--continuations", "--output", "json"], &env).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(queues.message_count(&rq).await, 0);
    // Exactly one request per blob (the placeholder is skipped), one snapshot each.
    assert_eq!(queues.message_count(&stack.queue).await, names.len());
    let listed = stack.source().list_blobs(&c, None).await;
    for n in &names {
        let snaps = listed
            .iter()
            .filter(|b| &b.name == n && b.snapshot.is_some())
            .count();
        assert_eq!(snaps, 1, "{n}");
    }
    // The run is finished and left its watermark for the next run.
    let app = support::app(&env);
    let (run, _) = lakeguard::ops::snapshot::run_state::load(&app, &run_id)
        .await
        .unwrap()
        .expect("run document");
    assert!(run.finished, "{run:?}");
    assert!(
        run.report.hops > 1 && run.report.is_complete(),
        "{:?}",
        run.report
    );
    assert_eq!(run.report.scanned as usize, names.len() + 1);
    assert!(
        run.report.state.starts_with("saved"),
        "{}",
        run.report.state
    );
    // A hop delivered again after it ran is acknowledged without work.
    queues
        .send_message(
            &rq,
            &base64::engine::general_purpose::STANDARD.encode(&hop_text),
        )
        .await
        .ok("redeliver");
    let out = support::run_cli(&["reconcile", "--continuations", "--output", "json"], &env).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(queues.message_count(&stack.queue).await, names.len());
    // The next run decides by the watermark (base blobs only) and finds nothing new.
    let (status, body) = call(
        handler.port(),
        "POST",
        &format!("/api/snapshot?container={c}&full=false"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body:#}");
    let out = support::run_cli(&["reconcile", "--continuations", "--output", "json"], &env).await;
    assert!(out.status.success());
    assert_eq!(queues.message_count(&stack.queue).await, names.len());
    stack.assert_no_secrets_in(&handler.logs());
}

/// `snapshot --drain` hands its requests to the drain in the same process (no Put, Get and Delete
/// Message per blob of a first backup) and leaves those pages' request batches unrecorded: a
/// record vouches that every marker of its batch has a request on the queue, which a handed-off
/// request does not have, and reconcile would trust it for the whole pending TTL.
#[tokio::test]
async fn snapshot_drain_hands_requests_over_in_process_and_vouches_for_none() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let container = unique_name("hand");
    let names: Vec<String> = (0..7).map(|i| format!("d/{i} x.csv")).collect();
    seed(&stack, &container, &names).await;
    let records = |stack: &Stack| {
        let backup = stack.backup();
        async move {
            backup
                .list_blobs("lakeguard-state", Some("requests/"))
                .await
                .len()
        }
    };

    let out = support::handler::run_cli(
        &[
            "snapshot",
            "--container",
            &container,
            "--drain",
            "--output",
            "json",
        ],
        &stack.env(),
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["snapshot"]["enqueued"], 7, "{r:#}");
    assert_eq!(r["snapshot"]["handed_off"], 7, "{r:#}");
    assert_eq!(r["backup"]["backed_up"], 7, "{r:#}");
    let backed: BTreeSet<String> = stack
        .backup()
        .list_blobs(&container, None)
        .await
        .into_iter()
        .map(|b| b.name)
        .collect();
    assert_eq!(backed, names.iter().cloned().collect());
    assert_eq!(
        records(&stack).await,
        0,
        "no batch vouches for handed-off requests"
    );

    // Without a drain the requests go on the queue, and their batch is recorded.
    stack
        .source()
        .put_blob(&container, &names[0], b"version 2", &[])
        .await
        .ok("rewrite");
    let out = support::handler::run_cli(
        &["snapshot", "--container", &container, "--output", "json"],
        &stack.env(),
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (r["enqueued"].as_u64(), r["handed_off"].as_u64()),
        (Some(1), Some(0)),
        "{r:#}"
    );
    assert_eq!(stack.queues().peek_messages(&stack.queue).await.len(), 1);
    assert_eq!(records(&stack).await, 1);
}

/// A drain whose queue cannot be read any more (a permanent error) must not leave its producer
/// waiting for backlog room only the drain would free: a request that failed in process went
/// onto the queue and keeps its slot until that copy is done, which this drain will never see.
/// The run ends with the error, and every request is on the queue.
#[tokio::test]
async fn snapshot_drain_ends_with_the_error_when_its_queue_cannot_be_read() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let container = unique_name("deadq");
    let names: Vec<String> = (0..40).map(|i| format!("f{i:02}.csv")).collect();
    seed(&stack, &container, &names).await;
    let blobs = stack.blob_proxy();
    // Every write to the backup account is busy: each copy handed over fails, and is queued.
    let backup_path = format!("/{}/", support::azurite::BACKUP_ACCOUNT);
    blobs.fail_next(usize::MAX, move |m, t| {
        m == "PUT" && t.starts_with(&backup_path)
    });
    // Every receive is refused, as after a lost role assignment.
    let queues = support::CountingProxy::start(stack.azurite.queue_port());
    queues.answer_next(
        usize::MAX,
        axum::http::StatusCode::FORBIDDEN,
        "AuthorizationPermissionMismatch",
        |m, t| m == "GET" && t.contains("/messages"),
    );
    let dev = support::azurite::DEV_ACCOUNT;
    let jobs = format!(
        "DefaultEndpointsProtocol=http;AccountName={dev};AccountKey={};QueueEndpoint={};",
        stack.azurite.account_key(dev),
        queues.endpoint(dev),
    );
    let mut env = stack.env_via_proxy(&blobs);
    env.retain(|(k, _)| k != "AzureWebJobsStorage" && k != "LAKEGUARD_MAX_RETRIES");
    env.extend(
        [
            ("AzureWebJobsStorage", jobs.as_str()),
            // The producer may run 32 requests ahead of the drain.
            ("LAKEGUARD_CONCURRENCY", "1"),
            ("LAKEGUARD_MAX_RETRIES", "0"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let args = [
        "snapshot",
        "--container",
        &container,
        "--drain",
        "--output",
        "json",
    ];
    let run = support::handler::run_cli(&args, &env);
    let out = tokio::time::timeout(std::time::Duration::from_secs(120), run)
        .await
        .expect("the drain hung: its producer waits for backlog room");
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("AuthorizationPermissionMismatch"),
        "{stderr}"
    );
    assert_eq!(
        stack.queues().message_count(&stack.queue).await,
        names.len(),
        "every request failed in process is on the queue"
    );
}
