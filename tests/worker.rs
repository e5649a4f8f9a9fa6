//! BackupWorker end to end: producer -> real queue -> the host's queue trigger (emulated by the
//! harness, exact payloads) -> `lakeguard serve` -> backup account, read back with the REST oracle.

mod support;

use std::collections::BTreeMap;

use base64::Engine as _;
use serde_json::{json, Value};
use support::host::forwarded_http;
use support::{unique_name, Mode, Stack, StorageRest};

async fn produce(port: u16, container: &str) -> Value {
    let r = forwarded_http(
        port,
        "GET",
        &format!("/api/snapshot?container={container}"),
        &[],
        None,
    )
    .await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.body);
    r.json()["report"].clone()
}

async fn content(
    rest: &StorageRest,
    container: &str,
    name: &str,
    snapshot: Option<&str>,
) -> Vec<u8> {
    rest.get_blob(container, name, snapshot)
        .await
        .ok("get blob")
        .body
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s.as_bytes())
}

/// Every version is backed up from its snapshot, with content type and user metadata kept plus
/// the lakeguard_* metadata, and an overwritten backup version is kept as a backup snapshot.
async fn full_flow(mode: Mode) {
    let stack = Stack::start(mode).await;
    let c = unique_name("lake");
    let src = stack.source();
    src.create_container(&c).await.ok("create");
    let names = [
        "a.csv",
        "dir/with space #1?.txt",
        "ünï/€ 100%.json",
        "a.csv.bak",
    ];
    for n in names {
        src.put_blob(
            &c,
            n,
            format!("v1 of {n}").as_bytes(),
            &[("owner", "team-x")],
        )
        .await
        .ok("put");
    }
    let handler = stack.handler().await;
    assert_eq!(produce(handler.port(), &c).await["enqueued"], 4);
    let queues = stack.queues();
    let trigger = stack.trigger(&queues, handler.port());
    let report = trigger.drain(20).await;
    assert_eq!(
        (report.succeeded, report.failed, report.poisoned),
        (4, 0, 0),
        "{:?}",
        report.deliveries
    );

    let backup = stack.backup();
    let listing = src.list_blobs(&c, None).await;
    let outcomes = format!("{:?}", report.deliveries);
    assert_eq!(
        outcomes
            .matches("\\\"outcome\\\":\\\"backed_up\\\"")
            .count(),
        4,
        "{outcomes}"
    );
    for n in names {
        let snap = listing
            .iter()
            .find(|b| b.name == n && b.snapshot.is_some())
            .unwrap();
        assert_eq!(
            content(&backup, &c, n, None).await,
            content(&src, &c, n, snap.snapshot.as_deref()).await,
            "{n}"
        );
        let props = backup.blob_properties(&c, n, None).await.ok("head backup");
        let meta = |k: &str| {
            props
                .header(&format!("x-ms-meta-{k}"))
                .unwrap_or_else(|| panic!("{n}: no {k}"))
        };
        assert_eq!(meta("owner"), "team-x", "user metadata kept");
        assert_eq!(
            meta("lakeguard_source_etag").trim_matches('"'),
            snap.metadata["lakeguard_source_etag"].trim_matches('"')
        );
        assert_eq!(
            &meta("lakeguard_source_snapshot"),
            snap.snapshot.as_ref().unwrap()
        );
        assert!(time::OffsetDateTime::parse(
            &meta("lakeguard_source_last_modified"),
            &time::format_description::well_known::Rfc3339
        )
        .is_ok());
        assert!(time::OffsetDateTime::parse(
            &meta("lakeguard_backed_up_at"),
            &time::format_description::well_known::Rfc3339
        )
        .is_ok());
        assert_eq!(
            props.header("content-type").as_deref(),
            Some("application/octet-stream"),
            "content type kept"
        );
    }

    // A new version: the backup's previous version is kept as a backup snapshot.
    src.put_blob(&c, "a.csv", b"v2 of a.csv", &[("owner", "team-x")])
        .await
        .ok("rewrite");
    assert_eq!(produce(handler.port(), &c).await["enqueued"], 1);
    let report = trigger.drain(10).await;
    assert_eq!(report.succeeded, 1);
    assert_eq!(content(&backup, &c, "a.csv", None).await, b"v2 of a.csv");
    let history: Vec<_> = backup
        .list_blobs(&c, Some("a.csv"))
        .await
        .into_iter()
        .filter(|b| b.name == "a.csv" && b.snapshot.is_some())
        .collect();
    assert_eq!(history.len(), 1, "the older backup version is kept");
    assert_eq!(
        content(&backup, &c, "a.csv", history[0].snapshot.as_deref()).await,
        b"v1 of a.csv"
    );

    if mode == Mode::OAuthHttps {
        let id = stack.identity.as_ref().unwrap();
        assert!(id.violations().is_empty(), "{:?}", id.violations());
    }
    stack.assert_no_secrets_in(&handler.logs());
}

#[tokio::test]
async fn full_flow_shared_key() {
    full_flow(Mode::SharedKeyHttp).await;
}

#[tokio::test]
async fn full_flow_managed_identity() {
    full_flow(Mode::OAuthHttps).await;
}

/// A redelivered message does no work twice; a reference-style message (no snapshot) works too.
#[tokio::test]
async fn redelivery_is_idempotent_and_legacy_messages_work() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let c = unique_name("redo");
    let src = stack.source();
    src.create_container(&c).await.ok("create");
    src.put_blob(&c, "x.bin", b"payload", &[]).await.ok("put");
    let handler = stack.handler().await;
    produce(handler.port(), &c).await;
    let queues = stack.queues();
    let msg = queues.peek_messages(&stack.queue).await.remove(0);
    // The same message delivered twice (e.g. the host lost the first acknowledgement).
    queues
        .send_message(&stack.queue, &msg.text)
        .await
        .ok("duplicate");
    let trigger = stack.trigger(&queues, handler.port());
    let report = trigger.drain(10).await;
    assert_eq!(report.succeeded, 2);
    let outcomes: Vec<String> = report.deliveries.iter().map(|d| format!("{d:?}")).collect();
    assert!(
        outcomes.iter().any(|o| o.contains("already_backed_up")),
        "{outcomes:?}"
    );
    let versions = stack.backup().list_blobs(&c, None).await;
    assert_eq!(
        versions.len(),
        1,
        "no second copy, no extra history: {versions:?}"
    );

    // The reference implementation's schema: {"container","blob_name","etag"}.
    src.put_blob(&c, "legacy.csv", b"legacy", &[])
        .await
        .ok("put");
    let etag = src
        .blob_properties(&c, "legacy.csv", None)
        .await
        .ok("head")
        .header("etag")
        .unwrap();
    let legacy = json!({"container": c, "blob_name": "legacy.csv", "etag": etag}).to_string();
    queues
        .send_message(&stack.queue, &b64(&legacy))
        .await
        .ok("send legacy");
    let report = trigger.drain(5).await;
    assert_eq!(report.succeeded, 1, "{:?}", report.deliveries);
    assert_eq!(
        content(&stack.backup(), &c, "legacy.csv", None).await,
        b"legacy"
    );
}

/// Malformed messages go to the poison queue at once, with the reason, and are acknowledged.
#[tokio::test]
async fn malformed_messages_are_poisoned_at_once_with_the_reason() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let handler = stack.handler().await;
    let queues = stack.queues();
    queues.create_queue(&stack.queue).await.ok("create queue");
    let huge = json!({"v": 1, "container": "raw", "blob": "n".repeat(2000), "etag": "\"0x1\""})
        .to_string();
    let bad = [
        ("not json", "not JSON".to_string()),
        (
            r#"{"v":1,"container":"raw","etag":"\"0x1\""}"#,
            "blob".to_string(),
        ),
        (
            r#"{"v":1,"container":"Not Valid","blob":"a","etag":"x"}"#,
            "container".to_string(),
        ),
        (
            r#"{"v":7,"container":"raw","blob":"a","etag":"x"}"#,
            "version 7".to_string(),
        ),
        (huge.as_str(), "2000 characters".to_string()),
    ];
    for (text, _) in &bad {
        queues
            .send_message(&stack.queue, &b64(text))
            .await
            .ok("send");
    }
    let trigger = stack.trigger(&queues, handler.port());
    let report = trigger.drain(bad.len()).await;
    assert_eq!(report.invocations, bad.len(), "one delivery each, not five");
    assert_eq!(report.succeeded, bad.len(), "acknowledged");
    let poisoned = queues
        .peek_messages(&format!("{}-poison", stack.queue))
        .await;
    assert_eq!(poisoned.len(), bad.len());
    let records: Vec<Value> = poisoned
        .iter()
        .map(|m| serde_json::from_str(&m.decoded_text().unwrap()).unwrap())
        .collect();
    for (text, needle) in &bad {
        let r = records
            .iter()
            .find(|r| r["original"].as_str() == Some(text))
            .unwrap_or_else(|| panic!("{text} not poisoned"));
        assert!(
            r["reason"].as_str().unwrap().contains(needle.as_str()),
            "{r}"
        );
    }
    assert_eq!(queues.message_count(&stack.queue).await, 0);
}

/// The live blob is rewritten after the request was queued (and during the copy): the backup holds
/// exactly the requested version, copied from its snapshot, never the live content.
#[tokio::test]
async fn rewrite_after_request_backs_up_exactly_the_requested_version() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let c = unique_name("race");
    let src = stack.source();
    src.create_container(&c).await.ok("create");
    src.put_blob(&c, "f.txt", b"version one", &[])
        .await
        .ok("put");
    let handler = stack.handler().await;
    produce(handler.port(), &c).await;
    let v1 = src
        .blob_properties(&c, "f.txt", None)
        .await
        .ok("head")
        .header("etag")
        .unwrap();
    src.put_blob(&c, "f.txt", b"version two", &[])
        .await
        .ok("rewrite");
    let queues = stack.queues();
    let trigger = stack.trigger(&queues, handler.port());
    assert_eq!(trigger.drain(5).await.succeeded, 1);
    let backup = stack.backup();
    assert_eq!(content(&backup, &c, "f.txt", None).await, b"version one");
    let props = backup.blob_properties(&c, "f.txt", None).await.ok("head");
    assert_eq!(
        props
            .header("x-ms-meta-lakeguard_source_etag")
            .unwrap()
            .trim_matches('"'),
        v1.trim_matches('"')
    );
    // The next producer run requests version two; afterwards both versions are in the backup.
    assert_eq!(produce(handler.port(), &c).await["enqueued"], 1);
    assert_eq!(trigger.drain(5).await.succeeded, 1);
    assert_eq!(content(&backup, &c, "f.txt", None).await, b"version two");
    let snaps: Vec<_> = backup
        .list_blobs(&c, None)
        .await
        .into_iter()
        .filter(|b| b.snapshot.is_some())
        .collect();
    assert_eq!(snaps.len(), 1);
    assert_eq!(
        content(&backup, &c, "f.txt", snaps[0].snapshot.as_deref()).await,
        b"version one"
    );
}

/// A version whose snapshot and blob are both gone is superseded (acknowledged, explained).
#[tokio::test]
async fn vanished_version_is_superseded_not_retried() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let c = unique_name("gone");
    let src = stack.source();
    src.create_container(&c).await.ok("create");
    src.put_blob(&c, "g.txt", b"short lived", &[])
        .await
        .ok("put");
    let handler = stack.handler().await;
    produce(handler.port(), &c).await;
    // Delete the blob with its snapshots.
    src.send(
        reqwest::Method::DELETE,
        &format!("/{c}/g.txt"),
        &[],
        &[("x-ms-delete-snapshots", "include")],
        vec![],
    )
    .await
    .ok("delete");
    let queues = stack.queues();
    let report = stack.trigger(&queues, handler.port()).drain(5).await;
    assert_eq!((report.succeeded, report.failed), (1, 0));
    assert!(format!("{:?}", report.deliveries).contains("superseded"));
}

/// A failure that persists (backup account unreachable) is retried by the host and, on the last
/// delivery, poisoned by the worker itself with the error: never swallowed.
#[tokio::test]
async fn persistent_failure_is_retried_then_poisoned_with_the_error() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let c = unique_name("fail");
    let src = stack.source();
    src.create_container(&c).await.ok("create");
    src.put_blob(&c, "h.txt", b"data", &[]).await.ok("put");
    let good = stack.handler().await;
    produce(good.port(), &c).await;
    drop(good);
    let dead_backup = format!(
        "DefaultEndpointsProtocol=http;AccountName=backupacct;AccountKey={};BlobEndpoint=http://127.0.0.1:{}/backupacct",
        support::BACKUP_KEY,
        support::free_port()
    );
    let handler =
        support::Handler::spawn(&stack.env_with(&[("BackupStorage", &dead_backup)])).await;
    let queues = stack.queues();
    let report = stack.trigger(&queues, handler.port()).drain(10).await;
    assert_eq!(report.invocations, 5, "maxDequeueCount deliveries");
    assert_eq!(report.failed, 4, "non-2xx so that the host retries");
    assert_eq!(
        report.succeeded, 1,
        "the last delivery is poisoned by the worker and acknowledged"
    );
    let poisoned = queues
        .peek_messages(&format!("{}-poison", stack.queue))
        .await;
    assert_eq!(poisoned.len(), 1);
    let record: Value = serde_json::from_str(&poisoned[0].decoded_text().unwrap()).unwrap();
    assert!(
        record["reason"]
            .as_str()
            .unwrap()
            .contains("failed on all 5 deliveries"),
        "{record}"
    );
    assert_eq!(record["dequeue_count"], 5);
    stack.assert_no_secrets_in(&handler.logs());
}

/// Above the block threshold the copy runs as parallel Put Block From URL + Put Block List; the
/// result is byte-identical. 210 MiB, threshold lowered to 64 MiB, 32 MiB blocks.
#[tokio::test]
async fn large_blob_is_copied_in_blocks() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let c = unique_name("big");
    let src = stack.source();
    src.create_container(&c).await.ok("create");
    let size = 210 * 1024 * 1024;
    let data: Vec<u8> = (0..size)
        .map(|i: usize| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    // One Put Blob of 210 MiB is more than Azurite accepts: upload in blocks with the SDK.
    support::app(&stack.env())
        .source
        .upload(&c, "big.bin", data.clone(), None, &BTreeMap::new())
        .await
        .expect("upload big");
    let env = stack.env_with(&[
        (
            "LAKEGUARD_COPY_BLOCK_THRESHOLD_BYTES",
            &(64u64 << 20).to_string(),
        ),
        (
            "LAKEGUARD_COPY_BLOCK_SIZE_BYTES",
            &(32u64 << 20).to_string(),
        ),
        ("LAKEGUARD_LOG", "info"),
    ]);
    let handler = support::Handler::spawn(&env).await;
    produce(handler.port(), &c).await;
    let queues = stack.queues();
    assert_eq!(
        stack
            .trigger(&queues, handler.port())
            .drain(5)
            .await
            .succeeded,
        1
    );
    let copied = content(&stack.backup(), &c, "big.bin", None).await;
    assert_eq!(copied.len(), data.len());
    assert!(copied == data, "block copy is byte-identical");
    let staged = stack
        .azurite
        .blob_requests()
        .await
        .iter()
        .filter(|e| {
            e.account() == support::BACKUP_ACCOUNT
                && e.comp().as_deref() == Some("block")
                && e.method == "PUT"
        })
        .count();
    assert_eq!(staged, 7, "ceil(210/32) blocks staged from URL");
}

/// Lease mode: the live source is leased for the copy and the lease is released afterwards.
#[tokio::test]
async fn lease_mode_takes_and_releases_the_source_lease() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let c = unique_name("lease");
    let src = stack.source();
    src.create_container(&c).await.ok("create");
    src.put_blob(&c, "l.txt", b"leased", &[]).await.ok("put");
    let handler =
        support::Handler::spawn(&stack.env_with(&[("LAKEGUARD_USE_LEASE", "true")])).await;
    produce(handler.port(), &c).await;
    let queues = stack.queues();
    assert_eq!(
        stack
            .trigger(&queues, handler.port())
            .drain(5)
            .await
            .succeeded,
        1
    );
    let leases: Vec<_> = stack
        .azurite
        .blob_requests()
        .await
        .into_iter()
        .filter(|e| e.comp().as_deref() == Some("lease"))
        .collect();
    assert_eq!(leases.len(), 2, "acquire then release: {leases:?}");
    let props = src.blob_properties(&c, "l.txt", None).await.ok("head");
    assert_eq!(
        props.header("x-ms-lease-state").as_deref(),
        Some("available"),
        "released"
    );
    assert_eq!(content(&stack.backup(), &c, "l.txt", None).await, b"leased");
}

/// A redelivery after an attempt that kept the backup's current version but failed to copy does
/// not keep it a second time: the history holds each received version once.
#[tokio::test]
async fn redelivery_after_partial_attempt_keeps_history_once() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let c = unique_name("hist");
    let src = stack.source();
    src.create_container(&c).await.ok("create");
    src.put_blob(&c, "k.txt", b"one", &[]).await.ok("put");
    let handler = stack.handler().await;
    produce(handler.port(), &c).await;
    let queues = stack.queues();
    assert_eq!(
        stack
            .trigger(&queues, handler.port())
            .drain(5)
            .await
            .succeeded,
        1
    );
    src.put_blob(&c, "k.txt", b"two", &[]).await.ok("rewrite");
    produce(handler.port(), &c).await;
    let msg = queues.receive_messages(&stack.queue, 1, 60).await.remove(0);
    // What a failed first attempt leaves behind: the backup's current version already kept.
    let backup = stack.backup();
    backup
        .snapshot_blob(&c, "k.txt")
        .await
        .ok("history snapshot of attempt 1");
    let payload = support::host::queue_invocation(&msg.decoded_text().unwrap(), 2);
    let (status, answer) = support::host::invoke(handler.port(), "BackupWorker", &payload).await;
    assert_eq!(status.as_u16(), 200, "{answer}");
    assert_eq!(answer["ReturnValue"]["outcome"], "backed_up", "{answer}");
    let history: Vec<_> = backup
        .list_blobs(&c, None)
        .await
        .into_iter()
        .filter(|b| b.snapshot.is_some())
        .collect();
    assert_eq!(history.len(), 1, "version one kept once: {history:?}");
    assert_eq!(content(&backup, &c, "k.txt", None).await, b"two");
}

/// The worker creates a backup container once per process; if it disappears afterwards, the copy
/// fails retryably, the container is forgotten, and the redelivery re-creates it. Nothing is lost.
#[tokio::test]
async fn backup_container_deleted_behind_the_workers_back_is_recreated() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let c = unique_name("vanish");
    let src = stack.source();
    src.create_container(&c).await.ok("create");
    src.put_blob(&c, "v.txt", b"one", &[]).await.ok("put");
    let handler = stack.handler().await;
    produce(handler.port(), &c).await;
    let queues = stack.queues();
    let trigger = stack.trigger(&queues, handler.port());
    assert_eq!(trigger.drain(5).await.succeeded, 1);
    stack
        .backup()
        .send(
            reqwest::Method::DELETE,
            &format!("/{c}"),
            &[("restype", "container")],
            &[],
            vec![],
        )
        .await
        .ok("delete backup container");
    src.put_blob(&c, "v.txt", b"two", &[]).await.ok("rewrite");
    produce(handler.port(), &c).await;
    let report = trigger.drain(5).await;
    assert_eq!(
        (report.failed, report.succeeded),
        (1, 1),
        "{:?}",
        report.deliveries
    );
    assert_eq!(content(&stack.backup(), &c, "v.txt", None).await, b"two");
}

fn unb64(s: &str) -> Value {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s.as_bytes())
        .expect("base64 message");
    serde_json::from_slice(&bytes).expect("JSON message")
}

/// The producer's message carries what its listing knew (`props`, `backup_absent`): a first
/// delivery copies without reading the snapshot or the backup. Hints are never trusted blindly:
/// the copy is conditional on the snapshot ETag they name, so props that do not match the
/// snapshot fail that copy and the same delivery reads the source; a named snapshot that is gone
/// is replaced at once by another snapshot of the same version.
#[tokio::test]
async fn message_props_spare_the_snapshot_read_and_are_never_trusted_blindly() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let c = unique_name("props");
    let src = stack.source();
    src.create_container(&c).await.ok("create");
    let name = "p q/#1 ü%.csv";
    src.put_blob(&c, name, b"version one", &[("owner", "team-x")])
        .await
        .ok("put");
    let proxy = stack.blob_proxy();
    let handler = support::Handler::spawn(&stack.env_via_proxy(&proxy)).await;
    produce(handler.port(), &c).await;
    let queues = stack.queues();
    let msg = queues.peek_messages(&stack.queue).await.remove(0);
    let body = unb64(&msg.text);
    assert_eq!(body["props"]["length"], 11, "{body:#}");
    assert_eq!(body["props"]["metadata"]["owner"], "team-x", "{body:#}");
    assert!(body["props"]["snapshot_etag"].is_string(), "{body:#}");

    proxy.reset();
    let trigger = stack.trigger(&queues, handler.port());
    assert_eq!(trigger.drain(5).await.succeeded, 1);
    let mine: Vec<_> = proxy
        .requests()
        .into_iter()
        .filter(|r| !r.is_azurite_self())
        .collect();
    let source_reads: Vec<_> = mine
        .iter()
        .filter(|r| r.target.starts_with("/devstoreaccount1/") && r.method != "PUT")
        .collect();
    assert!(
        source_reads.is_empty(),
        "the first delivery read the source: {source_reads:#?}"
    );
    // A new blob: the request says no backup exists, so no HEAD of the backup either. Create
    // Container and the copy: nothing else.
    assert_eq!(body["backup_absent"], true, "{body:#}");
    assert_eq!(mine.len(), 2, "{mine:#?}");
    let backup = stack.backup();
    assert_eq!(content(&backup, &c, name, None).await, b"version one");
    let props = backup.blob_properties(&c, name, None).await.ok("head");
    assert_eq!(props.header("x-ms-meta-owner").as_deref(), Some("team-x"));

    // Props that lie about the snapshot ETag: no wrong backup, and the redelivery reads the
    // source and backs up the right version.
    src.put_blob(&c, name, b"version two", &[]).await.ok("v2");
    produce(handler.port(), &c).await;
    let msg = queues.peek_messages(&stack.queue).await.remove(0);
    let mut body = unb64(&msg.text);
    let real = body.clone();
    body["props"]["snapshot_etag"] = json!("\"0x8DEADBEEF\"");
    // Replace the queued message by the forged one.
    let received = queues.receive_messages(&stack.queue, 1, 1).await;
    queues
        .delete_message(&stack.queue, &received[0].id, &received[0].pop_receipt)
        .await
        .ok("delete");
    queues
        .send_message(&stack.queue, &b64(&body.to_string()))
        .await
        .ok("forged");
    let report = trigger.drain(5).await;
    assert_eq!(
        (report.succeeded, report.failed),
        (1, 0),
        "the forged props fail the conditional copy, and the same delivery reads the source: {:?}",
        report.deliveries
    );
    assert_eq!(content(&backup, &c, name, None).await, b"version two");
    let props = backup.blob_properties(&c, name, None).await.ok("head");
    assert_eq!(
        props
            .header("x-ms-meta-lakeguard_source_etag")
            .map(|e| e.trim_matches('"').to_owned()),
        real["etag"]
            .as_str()
            .map(|e| e.trim_matches('"').to_owned())
    );

    // The named snapshot deleted, another snapshot of the same version still there: backed up
    // in the first delivery, from that one.
    src.put_blob(&c, name, b"version three", &[]).await.ok("v3");
    produce(handler.port(), &c).await;
    let spare = src.snapshot_blob(&c, name).await.ok("spare snapshot");
    let spare = spare.header("x-ms-snapshot").unwrap();
    let msg = queues.peek_messages(&stack.queue).await.remove(0);
    let body = unb64(&msg.text);
    let named = body["snapshot"].as_str().unwrap().to_owned();
    assert_ne!(named, spare);
    src.send(
        reqwest::Method::DELETE,
        &format!("/{c}/{}", support::rest::encode_path(name)),
        &[("snapshot", named.as_str())],
        &[],
        vec![],
    )
    .await
    .ok("delete the named snapshot");
    let report = trigger.drain(5).await;
    assert_eq!(
        (report.succeeded, report.failed),
        (1, 0),
        "{:?}",
        report.deliveries
    );
    assert_eq!(content(&backup, &c, name, None).await, b"version three");
    let props = backup.blob_properties(&c, name, None).await.ok("head");
    assert_eq!(
        props
            .header("x-ms-meta-lakeguard_source_snapshot")
            .as_deref(),
        Some(spare.as_str())
    );
    stack.assert_no_secrets_in(&handler.logs());
}

/// `lakeguard snapshot --drain`: the producer and the worker in one command, the worker taking
/// requests while the producer still lists (a small page size and concurrency make them
/// interleave), the producer never more than its backlog limit ahead. Afterwards every blob is in the backup and the queue is empty; a second run finds
/// nothing to do.
#[tokio::test]
async fn snapshot_with_drain_backs_up_a_container_in_one_command() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let c = unique_name("onecmd");
    let src = stack.source();
    src.create_container(&c).await.ok("create");
    let names: Vec<String> = (0..40)
        .map(|i| format!("d{}/f #{i} ü%.txt", i % 4))
        .collect();
    for n in &names {
        src.put_blob(&c, n, format!("data of {n}").as_bytes(), &[])
            .await
            .ok("put");
    }
    // Concurrency 1: the producer may run 32 requests ahead of the worker, so with 40 blobs it
    // really waits for the drain (and must not deadlock).
    let env = stack.env_with(&[
        ("LAKEGUARD_CONCURRENCY", "1"),
        ("LAKEGUARD_LIST_PAGE_SIZE", "5"),
    ]);
    let run = |env: Vec<(String, String)>, c: String| async move {
        let out = support::run_cli(
            &["snapshot", "--container", &c, "--drain", "--output", "json"],
            &env,
        )
        .await;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let v: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "no JSON ({e}): {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.success(), v)
    };
    let (ok, v) = run(env.clone(), c.clone()).await;
    assert!(ok, "{v:#}");
    assert_eq!(v["snapshot"]["enqueued"], 40, "{v:#}");
    assert_eq!(v["backup"]["backed_up"], 40, "{v:#}");
    let backup = stack.backup();
    for n in &names {
        assert_eq!(
            content(&backup, &c, n, None).await,
            format!("data of {n}").as_bytes()
        );
    }
    assert!(stack.queues().peek_messages(&stack.queue).await.is_empty());
    let (ok, v) = run(env, c.clone()).await;
    assert!(ok, "{v:#}");
    assert_eq!(v["snapshot"]["unchanged"], 40, "{v:#}");
    assert_eq!(v["backup"]["processed"], 0, "{v:#}");
}

/// A blob deleted and created again looks new to the producer (`backup_absent`), but its old
/// backup is still there: the optimistic copy conflicts, the same delivery reads the backup, keeps
/// the old version as history and copies the new one.
#[tokio::test]
async fn a_recreated_blob_keeps_its_old_backup_as_history() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let c = unique_name("again");
    let src = stack.source();
    src.create_container(&c).await.ok("create");
    src.put_blob(&c, "r.csv", b"first life", &[])
        .await
        .ok("put");
    let handler = stack.handler().await;
    produce(handler.port(), &c).await;
    let queues = stack.queues();
    let trigger = stack.trigger(&queues, handler.port());
    assert_eq!(trigger.drain(5).await.succeeded, 1);
    src.delete_blob(&c, "r.csv")
        .await
        .ok("delete with snapshots");
    src.put_blob(&c, "r.csv", b"second life", &[])
        .await
        .ok("again");
    // A full listing sees that no snapshot is left: new (a watermark run cannot tell, and says
    // nothing about the backup).
    let r = forwarded_http(
        handler.port(),
        "GET",
        &format!("/api/snapshot?container={c}&full=true"),
        &[],
        None,
    )
    .await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.body);
    assert_eq!(r.json()["report"]["listing"], "full (asked for)");
    let msg = queues.peek_messages(&stack.queue).await.remove(0);
    assert_eq!(unb64(&msg.text)["backup_absent"], true);
    let report = trigger.drain(5).await;
    assert_eq!(
        (report.succeeded, report.failed),
        (1, 0),
        "{:?}",
        report.deliveries
    );
    let backup = stack.backup();
    assert_eq!(content(&backup, &c, "r.csv", None).await, b"second life");
    let history: Vec<_> = backup
        .list_blobs(&c, None)
        .await
        .into_iter()
        .filter(|b| b.snapshot.is_some())
        .collect();
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(
        content(&backup, &c, "r.csv", history[0].snapshot.as_deref()).await,
        b"first life"
    );
}

/// A request that names no snapshot but carries `props` (reconcile's repair of a lost backup whose
/// version is still live) is copied from the base blob, and only while the base blob is that
/// version: no snapshot is made for it. A blob rewritten after the request is never backed up
/// under the requested version: the same delivery falls back to a snapshot of that version, or
/// reports the request superseded when none exists.
#[tokio::test]
async fn a_live_request_copies_the_base_blob_only_while_it_is_that_version() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let c = unique_name("live");
    let src = stack.source();
    let backup = stack.backup();
    let queues = stack.queues();
    src.create_container(&c).await.ok("create");
    let created = queues.create_queue(&stack.queue).await;
    assert!(created.is_success() || created.status == 409);
    let handler = stack.handler().await;
    let trigger = stack.trigger(&queues, handler.port());
    let request = |name: &str, etag: &str, len: usize| {
        json!({
            "v": 1, "container": c, "blob": name, "etag": etag, "backup_absent": true,
            "props": {"snapshot_etag": etag, "length": len,
                      "last_modified": "2026-11-30T10:00:00Z", "metadata": {"owner": "team-x"}},
        })
        .to_string()
    };
    let etag_of = |r: support::rest::RestResponse| r.header("etag").expect("etag");

    // 1. Unchanged since the request: backed up from the live blob, nothing snapshotted.
    let live = "live #1 ü%.txt";
    let e1 = etag_of(
        src.put_blob(&c, live, b"live one", &[("owner", "team-x")])
            .await
            .ok("put"),
    );
    let outcome = deliver_one(&stack, &queues, &trigger, &request(live, &e1, 8)).await;
    assert!(outcome.contains("backed_up"), "{outcome}");
    assert_eq!(content(&backup, &c, live, None).await, b"live one");
    let props = backup.blob_properties(&c, live, None).await.ok("head");
    assert_eq!(props.header("x-ms-meta-owner").as_deref(), Some("team-x"));
    assert_eq!(
        props.header("x-ms-meta-lakeguard_source_etag").as_deref(),
        Some(e1.as_str())
    );
    assert!(
        props
            .header("x-ms-meta-lakeguard_source_snapshot")
            .is_none(),
        "no snapshot was named or made"
    );
    let listed = src.list_blobs(&c, Some(live)).await;
    assert!(
        listed.iter().all(|b| b.snapshot.is_none()),
        "the live copy made a source snapshot: {listed:#?}"
    );

    // 2. Rewritten after the request, an older snapshot of the version exists: backed up from
    //    it, in the same delivery, never with the new bytes.
    let kept = "kept.txt";
    let k1 = etag_of(src.put_blob(&c, kept, b"kept one", &[]).await.ok("put"));
    let snap = src.snapshot_blob(&c, kept).await.ok("snapshot");
    let snap = snap.header("x-ms-snapshot").expect("snapshot id");
    src.put_blob(&c, kept, b"kept two, newer", &[])
        .await
        .ok("rewrite");
    let outcome = deliver_one(&stack, &queues, &trigger, &request(kept, &k1, 8)).await;
    assert!(outcome.contains("backed_up"), "{outcome}");
    assert_eq!(content(&backup, &c, kept, None).await, b"kept one");
    let props = backup.blob_properties(&c, kept, None).await.ok("head");
    assert_eq!(
        props
            .header("x-ms-meta-lakeguard_source_snapshot")
            .as_deref(),
        Some(snap.as_str())
    );

    // 3. Rewritten after the request, no snapshot of the version anywhere: superseded, and no
    //    backup is written under that version.
    let gone = "gone.txt";
    let g1 = etag_of(src.put_blob(&c, gone, b"gone one", &[]).await.ok("put"));
    src.put_blob(&c, gone, b"gone two", &[]).await.ok("rewrite");
    let outcome = deliver_one(&stack, &queues, &trigger, &request(gone, &g1, 8)).await;
    assert!(outcome.contains("superseded"), "{outcome}");
    assert_eq!(backup.blob_properties(&c, gone, None).await.status, 404);
    stack.assert_no_secrets_in(&handler.logs());
}

/// Queues one request text and lets the trigger deliver it: it must succeed (acknowledged) at
/// the first delivery. Returns the deliveries as text, for assertions on the outcome.
async fn deliver_one(
    stack: &Stack,
    queues: &StorageRest,
    trigger: &support::host::QueueTrigger<'_>,
    text: &str,
) -> String {
    queues
        .send_message(&stack.queue, &b64(text))
        .await
        .ok("send");
    let report = trigger.drain(5).await;
    assert_eq!(
        (report.succeeded, report.failed),
        (1, 0),
        "{:?}",
        report.deliveries
    );
    format!("{:?}", report.deliveries)
}

/// Issue 15, defect 3: two versions written within one second (the same Last-Modified), the
/// older request processed last. The newer must stay the backup's current blob, and a restore
/// must give it, whatever the order of processing.
#[tokio::test]
async fn same_second_versions_processed_in_reverse_order_keep_the_newer_on_top() {
    use lakeguard::model::BackupRequest;
    use lakeguard::ops;
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let env = stack.env();
    let app = support::app(&env);
    let c = unique_name("tie");
    let src = stack.source();
    src.create_container(&c).await.ok("create");
    // Two writes and their snapshots inside one second (retried until Azurite agrees).
    let snap = |name: String| {
        let app = &app;
        let c = &c;
        async move {
            let p = app.source.properties(c, &name, None).await.unwrap();
            let meta = lakeguard::ops::snapshot::snapshot_metadata(
                &p.metadata,
                &p.etag,
                p.last_modified,
                time::OffsetDateTime::now_utc(),
                None,
            );
            let s = app
                .source
                .create_snapshot(c, &name, &p.etag, &meta)
                .await
                .unwrap();
            (p, s.id)
        }
    };
    let mut found = None;
    for attempt in 0..10 {
        // Start early in a second, so that both writes fit in it.
        while time::OffsetDateTime::now_utc().millisecond() > 300 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let name = format!("f{attempt}.csv");
        src.put_blob(&c, &name, b"older", &[]).await.ok("v1");
        let (p1, s1) = snap(name.clone()).await;
        src.put_blob(&c, &name, b"newer", &[]).await.ok("v2");
        let (p2, s2) = snap(name.clone()).await;
        if p1.last_modified == p2.last_modified {
            found = Some((name, p1, s1, p2, s2));
            break;
        }
    }
    let (name, p1, s1, p2, s2) = found.expect("two writes within one second");
    assert!(s1 < s2);
    let newer = BackupRequest::new(&c, &name, &p2.etag, &s2).to_json();
    let older = BackupRequest::new(&c, &name, &p1.etag, &s1).to_json();
    let o = ops::backup::process_message(&app, &newer, 1).await.unwrap();
    assert!(matches!(o, ops::backup::Outcome::BackedUp { .. }), "{o:?}");
    let o = ops::backup::process_message(&app, &older, 1).await.unwrap();
    assert!(
        matches!(&o, ops::backup::Outcome::Superseded { why, .. } if why.contains("newer")),
        "{o:?}"
    );
    let backup = stack.backup();
    assert_eq!(content(&backup, &c, &name, None).await, b"newer");
    // And the restore's history agrees.
    let target = unique_name("tie-restore");
    let mut req = ops::restore::RestoreRequest::new(c.as_str(), time::OffsetDateTime::now_utc());
    req.prefix = Some(name.clone());
    req.from = lakeguard::core::restore::HistoryFrom::BackupOnly;
    req.to = Some(ops::restore::TargetSpec {
        store: app.backup.clone(),
        container: target.clone(),
    });
    let r = ops::restore::run(&app, &req, ops::no_progress())
        .await
        .unwrap();
    assert!(r.is_complete(), "{r:#?}");
    assert_eq!(content(&backup, &target, &name, None).await, b"newer");
}

/// Issue 15, item 9: `--drain` that stops with messages still invisible (held by a consumer
/// that died) says so in its report and exits 1: "back up this container now" did not finish.
#[tokio::test]
async fn a_drain_that_stops_with_invisible_messages_left_says_so_and_fails() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let queues = stack.queues();
    queues.create_queue(&stack.queue).await;
    queues
        .send_message(
            &stack.queue,
            &b64(r#"{"container":"x","blob_name":"y","etag":"1"}"#),
        )
        .await
        .ok("send");
    // A consumer takes it and dies: invisible for a minute.
    let held = queues.receive_messages(&stack.queue, 1, 60).await;
    assert_eq!(held.len(), 1);
    let env = stack.env_with(&[("LAKEGUARD_DRAIN_IDLE_SECS", "1")]);
    let out = support::run_cli(&["backup", "--drain", "--output", "json"], &env).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["left_on_queue"], 1, "{report:#}");
    assert_eq!(report["processed"], 0, "{report:#}");
}
