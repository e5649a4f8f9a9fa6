//! Reconcile against a real Azurite: the safety net finds what the event path missed, costs only
//! listings when there is nothing to do, tombstones deleted sources (keeping the last version),
//! never enqueues a pending version twice, and splits large runs into continuations that finish
//! the job. Driven through the real binary: `lakeguard reconcile` (CLI), `lakeguard serve` with the
//! host's timer payloads (`POST /Reconcile`), the forwarded `ReconcileNow`, and the queue-triggered
//! `ReconcileWorker`.

mod support;

use std::collections::BTreeMap;

use serde_json::{json, Value};
use support::host::{self, forwarded_http, QueueTrigger};
use support::rest::ListedBlob;
use support::{run_cli, unique_name, Handler, Mode, Stack, StorageRest};

/// Flat listings are paged with this page size in every test (LAKEGUARD_LIST_PAGE_SIZE), so the
/// join is exercised across page boundaries; snapshot listings keep the default page size
/// (Azurite loses snapshot rows at page boundaries).
const PAGE: &str = "2";

fn env(stack: &Stack, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut o: Vec<(&str, &str)> = vec![("LAKEGUARD_LIST_PAGE_SIZE", PAGE)];
    o.extend_from_slice(extra);
    stack.env_with(&o)
}

async fn put(rest: &StorageRest, container: &str, name: &str, data: &[u8]) {
    rest.put_blob(container, name, data, &[("owner", "team-7")])
        .await
        .ok(&format!("put {name}"));
}

async fn seed(stack: &Stack, container: &str, blobs: &BTreeMap<String, Vec<u8>>) {
    let src = stack.source();
    src.create_container(container).await.ok("create container");
    for (name, data) in blobs {
        put(&src, container, name, data).await;
    }
}

fn files(names: &[&str]) -> BTreeMap<String, Vec<u8>> {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.to_string(), format!("v1 #{i} of {n}").into_bytes()))
        .collect()
}

/// `lakeguard reconcile --output json <args>`; returns (exit success, report).
async fn reconcile_cli(env: &[(String, String)], args: &[&str]) -> (bool, Value) {
    let mut all = vec!["reconcile", "--output", "json"];
    all.extend_from_slice(args);
    let out = run_cli(&all, env).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "reconcile printed no JSON report ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), report)
}

async fn producer(port: u16, container: &str) {
    let r = forwarded_http(
        port,
        "POST",
        &format!("/api/snapshot?container={container}"),
        &[("x-functions-key", "k")],
        None,
    )
    .await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.body);
}

/// Delivers every backup request to BackupWorker the way the host's queue trigger does.
async fn drain_backups(stack: &Stack, handler: &Handler) -> usize {
    let queues = stack.queues();
    let report = stack.trigger(&queues, handler.port()).drain(200).await;
    assert_eq!(
        report.succeeded,
        report.invocations,
        "{report:#?}\n{}",
        handler.logs()
    );
    report.succeeded
}

fn n(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("report has no number `{key}`: {v:#}"))
}

/// The backup's base blobs (and their snapshots) of one container, by name.
async fn backup_state(
    stack: &Stack,
    container: &str,
) -> (
    BTreeMap<String, ListedBlob>,
    BTreeMap<String, Vec<ListedBlob>>,
) {
    let mut bases = BTreeMap::new();
    let mut snaps: BTreeMap<String, Vec<ListedBlob>> = BTreeMap::new();
    for b in stack.backup().list_blobs(container, None).await {
        match &b.snapshot {
            Some(_) => snaps.entry(b.name.clone()).or_default().push(b),
            None => {
                bases.insert(b.name.clone(), b);
            }
        }
    }
    (bases, snaps)
}

/// Every live source blob is in the backup with the same content and names its ETag; every
/// backup base blob without a source is tombstoned.
async fn assert_full_coverage(stack: &Stack, container: &str) {
    let src = stack.source();
    let sources: BTreeMap<String, ListedBlob> = src
        .list_blobs(container, None)
        .await
        .into_iter()
        .filter(|b| b.snapshot.is_none())
        .map(|b| (b.name.clone(), b))
        .collect();
    let (bases, _) = backup_state(stack, container).await;
    for (name, s) in &sources {
        let b = bases
            .get(name)
            .unwrap_or_else(|| panic!("{name} has no backup"));
        assert_eq!(
            b.metadata
                .get("lakeguard_source_etag")
                .map(|e| e.trim_matches('"')),
            Some(s.etag.trim_matches('"')),
            "{name}: backup names another version"
        );
        assert!(!b.metadata.contains_key("lakeguard_deleted_at"), "{name}");
        let want = src.get_blob(container, name, None).await.ok("get source");
        let got = stack
            .backup()
            .get_blob(container, name, None)
            .await
            .ok("get backup");
        assert_eq!(got.body, want.body, "{name}: content differs");
    }
    for (name, b) in &bases {
        if !sources.contains_key(name) {
            assert!(
                b.metadata.contains_key("lakeguard_deleted_at"),
                "{name}: source gone but backup not tombstoned"
            );
        }
    }
}

/// Names that page and sort awkwardly: prefixes of each other, spaces, unicode beyond the BMP.
const NAMES: &[&str] = &[
    "a.txt",
    "a.txt.bak",
    "a/b c.csv",
    "b-1.json",
    "dir/ünï.txt",
    "dir/😀.bin",
    // U+FF5E sorts after the emoji in UTF-8 byte order but before it in UTF-16 unit order (the
    // emoji is a surrogate pair): the listing order the join relies on is really checked.
    "dir/～.txt",
    "z",
];

#[tokio::test]
async fn noop_reconcile_costs_only_flat_listings() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let container = unique_name("noop");
    let blobs = files(NAMES);
    seed(&stack, &container, &blobs).await;
    let handler = stack.handler().await;
    producer(handler.port(), &container).await;
    assert_eq!(drain_backups(&stack, &handler).await, NAMES.len());

    // Everything is backed up: reconcile finds nothing to do.
    let proxy = stack.blob_proxy();
    let via_proxy: Vec<(String, String)> = {
        let mut e = stack.env_via_proxy(&proxy);
        e.push(("LAKEGUARD_LIST_PAGE_SIZE".into(), PAGE.into()));
        e
    };
    let (ok, r) = reconcile_cli(&via_proxy, &[]).await;
    assert!(ok, "{r:#}");
    assert_eq!(n(&r, "containers"), 1, "{r:#}");
    assert_eq!(n(&r, "source_scanned"), NAMES.len() as u64);
    assert_eq!(n(&r, "backup_scanned"), NAMES.len() as u64);
    assert_eq!(n(&r, "in_sync"), NAMES.len() as u64, "{r:#}");
    for k in [
        "needs_backup",
        "snapshots_made",
        "requests_enqueued",
        "tombstones",
        "tombstones_written",
        "errors",
        "continuations_queued",
        "rpo_lag_secs",
    ] {
        assert_eq!(n(&r, k), 0, "{k}: {r:#}");
    }
    assert_eq!(r["complete"], true);

    // The cost: list containers on both accounts, then the flat listing pages of both sides
    // (7 names, 2 per page: 4 pages each), and NOTHING per blob.
    let requests = proxy.requests();
    let pages = NAMES.len().div_ceil(2);
    let list_containers = requests
        .iter()
        .filter(|r| {
            r.method == "GET" && r.comp().as_deref() == Some("list") && r.restype().is_none()
        })
        .count();
    let list_blobs: Vec<_> = requests.iter().filter(|r| r.is_list_blobs()).collect();
    assert_eq!(list_containers, 2, "{:#?}", proxy.summary());
    assert_eq!(list_blobs.len(), 2 * pages, "{:#?}", proxy.summary());
    assert_eq!(
        requests.len(),
        list_containers + list_blobs.len(),
        "a no-op reconcile made requests other than listings: {:#?}",
        proxy.summary()
    );
    for r in &list_blobs {
        let include = r.query("include").unwrap_or_default();
        assert!(
            !include.contains("snapshots"),
            "flat listings only: {}",
            r.target
        );
        assert!(include.contains("metadata"), "{}", r.target);
        assert_eq!(r.query("maxresults").as_deref(), Some(PAGE), "{}", r.target);
    }

    // Declaring the wrong order is detected at the first pair out of order, reported, and
    // nothing after it is acted upon (no tombstone, no request).
    let mut wrong = via_proxy.clone();
    wrong.push(("LAKEGUARD_NAME_ORDER".into(), "utf8".into()));
    let (ok, r) = reconcile_cli(&wrong, &[]).await;
    assert!(!ok, "{r:#}");
    assert_eq!(n(&r, "errors"), 1, "{r:#}");
    assert!(
        r["error_list"][0]["error"]
            .as_str()
            .unwrap()
            .contains("LAKEGUARD_NAME_ORDER"),
        "{r:#}"
    );
    assert_eq!(n(&r, "tombstones_written") + n(&r, "requests_enqueued"), 0);
    assert_eq!(r["complete"], false);
    stack.assert_no_secrets_in(&handler.logs());
}

/// A container of `NAMES`, fully backed up by the producer and the worker, whose backups of
/// `lost` were then deleted.
async fn backed_up_then_lost(stack: &Stack, prefix: &str, lost: &[&str]) -> String {
    let container = unique_name(prefix);
    seed(stack, &container, &files(NAMES)).await;
    let handler = stack.handler().await;
    producer(handler.port(), &container).await;
    assert_eq!(drain_backups(stack, &handler).await, NAMES.len());
    for name in lost {
        assert!(NAMES.contains(name));
        stack
            .backup()
            .delete_blob(&container, name)
            .await
            .ok("delete backup");
    }
    container
}

/// Put Message requests in Azurite's queue access log after its first `from` entries.
async fn messages_sent_since(stack: &Stack, from: usize) -> usize {
    stack.azurite.queue_requests().await[from..]
        .iter()
        .filter(|r| r.method == "POST" && r.path().ends_with("/messages"))
        .count()
}

/// Lost backups with an empty queue: nothing can be pending, so reconcile does not list each
/// blob's snapshots, and an unchanged blob needs no new snapshot (its version is live, and the
/// copy reads it under `source-if-match`): the repair costs the two flat listings plus one copy
/// per lost backup. `reconcile --drain` copies them in the same command, and hands them to its
/// drain in process: such a request has no marker and is derived from the listings alone, so the
/// queue (send, receive, delete) is not used at all.
#[tokio::test]
async fn repair_with_an_empty_queue_lists_no_snapshots_per_blob() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let lost = ["a/b c.csv", "z"];
    let container = backed_up_then_lost(&stack, "repair", &lost).await;

    let proxy = stack.blob_proxy();
    let mut via_proxy = stack.env_via_proxy(&proxy);
    via_proxy.push(("LAKEGUARD_LIST_PAGE_SIZE".into(), PAGE.into()));
    let queue_log_before = stack.azurite.queue_requests().await.len();
    // `--drain`: the repair is copied by the same command.
    let (ok, both) = reconcile_cli(&via_proxy, &["--drain"]).await;
    assert!(ok, "{both:#}");
    let r = &both["reconcile"];
    assert_eq!(n(r, "requests_enqueued"), lost.len() as u64, "{r:#}");
    assert_eq!(n(r, "snapshots_made"), 0, "{r:#}");
    assert_eq!(
        n(&both["backup"], "backed_up"),
        lost.len() as u64,
        "{both:#}"
    );
    let requests = proxy.requests();
    let per_name: Vec<_> = requests
        .iter()
        .filter(|r| r.is_list_blobs() && r.query("prefix").is_some())
        .collect();
    assert!(per_name.is_empty(), "per-blob listings: {per_name:#?}");
    let snapshots = requests
        .iter()
        .filter(|r| r.method == "PUT" && r.comp().as_deref() == Some("snapshot"))
        .count();
    assert_eq!(snapshots, 0, "{:#?}", proxy.summary());
    let copies = requests
        .iter()
        .filter(|r| {
            r.method == "PUT"
                && r.query("restype").is_none()
                && !r.is_azurite_self()
                && r.target.starts_with("/backupacct/")
        })
        .count();
    assert_eq!(
        copies,
        lost.len(),
        "one write per repair: {:#?}",
        proxy.summary()
    );
    assert!(stack.queues().peek_messages(&stack.queue).await.is_empty());
    assert_eq!(
        messages_sent_since(&stack, queue_log_before).await,
        0,
        "live repairs go to the drain in process"
    );
    assert_eq!(n(&both["backup"], "unqueued"), 0);
    assert_full_coverage(&stack, &container).await;
}

/// A repair handed over in process that fails (the service is busy) is not dropped: it goes onto
/// the queue, and the same drain copies it from there.
#[tokio::test]
async fn a_failed_in_process_repair_is_queued_not_dropped() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let container = backed_up_then_lost(&stack, "busy", &["z"]).await;
    let proxy = stack.blob_proxy();
    let mut via_proxy = stack.env_via_proxy(&proxy);
    via_proxy.push(("LAKEGUARD_MAX_RETRIES".into(), "0".into()));
    let copy_of_z = format!("/backupacct/{container}/z");
    proxy.fail_next(1, move |method, target| {
        method == "PUT" && target.split('?').next() == Some(copy_of_z.as_str())
    });
    let queue_log_before = stack.azurite.queue_requests().await.len();
    let (ok, both) = reconcile_cli(&via_proxy, &["--drain"]).await;
    assert!(ok, "{both:#}");
    let b = &both["backup"];
    assert_eq!(n(b, "retried"), 1, "{both:#}");
    assert_eq!(n(b, "backed_up"), 1, "copied from the queue: {both:#}");
    assert_eq!(n(b, "unqueued"), 0);
    assert_eq!(
        messages_sent_since(&stack, queue_log_before).await,
        1,
        "exactly the failed repair went onto the queue"
    );
    assert!(stack.queues().peek_messages(&stack.queue).await.is_empty());
    assert_full_coverage(&stack, &container).await;
}

#[tokio::test]
async fn one_reconcile_and_drain_restore_full_coverage_and_tombstone_deletions() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let container = unique_name("heal");
    let blobs = files(NAMES);
    seed(&stack, &container, &blobs).await;
    let handler = stack.handler().await;
    producer(handler.port(), &container).await;
    drain_backups(&stack, &handler).await;
    // A version requested less than LAKEGUARD_PENDING_TTL_SECS ago counts as pending even when
    // its backup was lost right after the copy (the marker cannot tell "queued" from "done and
    // lost"): it is healed once the marker is older than the TTL. A 1 s TTL plays "the producer
    // ran hours ago"; the default TTL case is asserted at the end.
    let env = env(&stack, &[("LAKEGUARD_PENDING_TTL_SECS", "1")]);
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;

    let src = stack.source();
    let bk = stack.backup();
    // What the event path misses (the producer is not run afterwards):
    bk.delete_blob(&container, "a.txt")
        .await
        .ok("lose a backup");
    put(&src, &container, "a/b c.csv", b"v2 changed").await;
    put(&src, &container, "new/never-produced.txt", b"brand new").await;
    src.delete_blob(&container, "dir/ünï.txt")
        .await
        .ok("delete source");
    src.delete_blob(&container, "z").await.ok("delete source");
    let before_tombstone = bk.get_blob(&container, "z", None).await.ok("backup of z");

    let (ok, r) = reconcile_cli(&env, &[]).await;
    assert!(ok, "{r:#}");
    assert_eq!(n(&r, "missing"), 2, "a.txt and the new blob: {r:#}");
    assert_eq!(n(&r, "changed"), 1, "{r:#}");
    // Only the changed blob is snapshotted: a.txt (backup lost) and the new blob are live
    // versions with nothing queued, copied from the base blob under `source-if-match`.
    assert_eq!(n(&r, "snapshots_made"), 1, "{r:#}");
    assert_eq!(n(&r, "requests_enqueued"), 3, "{r:#}");
    assert_eq!(n(&r, "tombstones_written"), 2, "{r:#}");
    assert_eq!(n(&r, "in_sync"), 4, "{r:#}");
    assert_eq!(n(&r, "errors"), 0, "{r:#}");
    assert!(n(&r, "rpo_lag_secs") < 600, "{r:#}");
    assert!(r["oldest_unbacked_change"].is_string(), "{r:#}");
    assert_eq!(stack.queues().peek_messages(&stack.queue).await.len(), 3);

    assert_eq!(drain_backups(&stack, &handler).await, 3);
    assert_full_coverage(&stack, &container).await;

    // The tombstone kept the last version: the backup base is marked, and a backup snapshot holds
    // the pre-tombstone state (same content, no deletion mark).
    let (bases, snaps) = backup_state(&stack, &container).await;
    let z = &bases["z"];
    let deleted_at = &z.metadata["lakeguard_deleted_at"];
    assert!(
        time::OffsetDateTime::parse(deleted_at, &time::format_description::well_known::Rfc3339)
            .is_ok(),
        "{deleted_at}"
    );
    assert_eq!(z.metadata.get("owner").map(String::as_str), Some("team-7"));
    let kept: Vec<_> = snaps["z"]
        .iter()
        .filter(|s| !s.metadata.contains_key("lakeguard_deleted_at"))
        .collect();
    assert_eq!(kept.len(), 1, "{:#?}", snaps["z"]);
    let kept_body = bk
        .get_blob(&container, "z", kept[0].snapshot.as_deref())
        .await
        .ok("kept version");
    assert_eq!(kept_body.body, before_tombstone.body);
    assert_eq!(
        kept[0].metadata.get("lakeguard_source_etag"),
        z.metadata.get("lakeguard_source_etag")
    );

    // Healed: the next run has nothing to do.
    let (ok, r) = reconcile_cli(&env, &[]).await;
    assert!(ok, "{r:#}");
    assert_eq!(n(&r, "needs_backup"), 0, "{r:#}");
    assert_eq!(n(&r, "tombstones"), 0, "{r:#}");
    assert_eq!(n(&r, "already_tombstoned"), 2, "{r:#}");
    assert_eq!(n(&r, "rpo_lag_secs"), 0, "{r:#}");

    // A deleted blob comes back: backed up again as a new version, the tombstoned state kept.
    put(&src, &container, "z", b"z is back").await;
    let (ok, r) = reconcile_cli(&env, &[]).await;
    assert!(ok, "{r:#}");
    assert_eq!(n(&r, "recreated"), 1, "{r:#}");
    assert_eq!(n(&r, "requests_enqueued"), 1, "{r:#}");
    assert_eq!(drain_backups(&stack, &handler).await, 1);
    assert_full_coverage(&stack, &container).await;
    let (bases, snaps) = backup_state(&stack, &container).await;
    assert!(!bases["z"].metadata.contains_key("lakeguard_deleted_at"));
    assert!(
        snaps["z"]
            .iter()
            .any(|s| s.metadata.contains_key("lakeguard_deleted_at")),
        "the tombstoned state is kept as a backup snapshot: {:#?}",
        snaps["z"]
    );
    assert_eq!(
        bk.get_blob(&container, "z", None).await.ok("z").body,
        b"z is back"
    );
    // A backup lost right after its (recent) request. While the backup queue holds messages, the
    // fresh marker counts as a queued request (the TTL applies)...
    bk.delete_blob(&container, "z").await.ok("lose a backup");
    let queues = stack.queues();
    queues
        .send_message(&stack.queue, "b3RoZXIgd29yaw==")
        .await
        .ok("some other queued work");
    let (ok, r) = reconcile_cli(&stack.env_with(&[]), &[]).await;
    assert!(ok, "{r:#}");
    assert_eq!(n(&r, "missing"), 1, "{r:#}");
    assert_eq!(n(&r, "already_pending"), 1, "{r:#}");
    assert_eq!(n(&r, "requests_enqueued"), 0, "{r:#}");
    assert!(
        r["oldest_unbacked_change"].is_string(),
        "it counts in the RPO lag: {r:#}"
    );
    // ...but once the queue is empty nothing can be pending: it is re-requested at once.
    for m in queues.receive_messages(&stack.queue, 32, 60).await {
        queues
            .delete_message(&stack.queue, &m.id, &m.pop_receipt)
            .await
            .ok("clear");
    }
    let (ok, r) = reconcile_cli(&stack.env_with(&[]), &[]).await;
    assert!(ok, "{r:#}");
    assert_eq!(n(&r, "already_pending"), 0, "{r:#}");
    assert_eq!(n(&r, "requests_enqueued"), 1, "{r:#}");
    assert_eq!(drain_backups(&stack, &handler).await, 1);
    assert_full_coverage(&stack, &container).await;
    stack.assert_no_secrets_in(&handler.logs());
}

#[tokio::test]
async fn a_pending_request_is_not_enqueued_twice_and_dry_run_writes_nothing() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let container = unique_name("pending");
    let blobs = files(&["one.csv", "two.csv", "sub/three.csv"]);
    seed(&stack, &container, &blobs).await;
    let env = env(&stack, &[]);

    // A dry run plans the work and writes nothing: no snapshot, no message, no queue.
    let (ok, r) = reconcile_cli(&env, &["--dry-run", "--container", &container]).await;
    assert!(ok, "{r:#}");
    assert_eq!(r["dry_run"], true);
    assert_eq!(n(&r, "would_enqueue"), 3, "{r:#}");
    assert_eq!(n(&r, "requests_enqueued"), 0, "{r:#}");
    assert!(stack
        .source()
        .list_blobs(&container, None)
        .await
        .iter()
        .all(|b| b.snapshot.is_none()));
    assert_eq!(stack.queues().message_count(&stack.queue).await, 0);

    let (ok, r) = reconcile_cli(&env, &[]).await;
    assert!(ok, "{r:#}");
    assert_eq!(n(&r, "requests_enqueued"), 3, "{r:#}");
    // The queue was empty and the blobs unchanged: requests for the live versions, no snapshot,
    // so no pending marker either. The worker has not run: the second run (queue not empty)
    // requests each once more, this time with a marked snapshot...
    assert_eq!(n(&r, "snapshots_made"), 0, "{r:#}");
    let (ok, r) = reconcile_cli(&env, &[]).await;
    assert!(ok, "{r:#}");
    assert_eq!(n(&r, "already_pending"), 0, "{r:#}");
    assert_eq!(n(&r, "requests_enqueued"), 3, "{r:#}");
    assert_eq!(n(&r, "snapshots_made"), 3, "{r:#}");
    // ...and every later run sees the fresh pending markers: at most two requests per version.
    for _ in 0..2 {
        let (ok, r) = reconcile_cli(&env, &[]).await;
        assert!(ok, "{r:#}");
        assert_eq!(n(&r, "already_pending"), 3, "{r:#}");
        assert_eq!(n(&r, "pending"), 3, "{r:#}");
        assert_eq!(n(&r, "requests_enqueued"), 0, "{r:#}");
        assert_eq!(n(&r, "snapshots_made"), 0, "{r:#}");
        assert!(
            n(&r, "rpo_lag_secs") < 600,
            "pending changes count in the RPO lag"
        );
    }
    assert_eq!(stack.queues().peek_messages(&stack.queue).await.len(), 6);
    let snaps = stack
        .source()
        .list_blobs(&container, None)
        .await
        .into_iter()
        .filter(|b| b.snapshot.is_some())
        .count();
    assert_eq!(snaps, 3, "one snapshot per blob, not one per run");

    // A stale marker (the request it stood for may have been lost) is re-requested, once: the
    // old snapshot cannot be refreshed, so a new one with a fresh marker is made.
    let app = support::app(&env);
    let listed = app
        .source
        .properties(&container, "four.csv", None)
        .await
        .err()
        .map(|e| e.is_not_found());
    assert_eq!(listed, Some(true));
    put(&stack.source(), &container, "four.csv", b"four").await;
    let props = app
        .source
        .properties(&container, "four.csv", None)
        .await
        .unwrap();
    let mut meta = BTreeMap::new();
    meta.insert("lakeguard_source_etag".to_string(), props.etag.quoted());
    meta.insert(
        "lakeguard_requested_at".to_string(),
        lakeguard::model::metadata::format_time(
            time::OffsetDateTime::now_utc() - time::Duration::hours(7),
        ),
    );
    app.source
        .create_snapshot(&container, "four.csv", &props.etag, &meta)
        .await
        .unwrap();
    let (ok, r) = reconcile_cli(&env, &[]).await;
    assert!(ok, "{r:#}");
    assert_eq!(n(&r, "requests_enqueued"), 1, "the stale one: {r:#}");
    assert_eq!(n(&r, "already_pending"), 3, "{r:#}");
    let (ok, r) = reconcile_cli(&env, &[]).await;
    assert!(ok, "{r:#}");
    assert_eq!(n(&r, "requests_enqueued"), 0, "{r:#}");
    assert_eq!(n(&r, "already_pending"), 4, "{r:#}");
    assert_eq!(stack.queues().peek_messages(&stack.queue).await.len(), 7);
}

/// Issue 15, defect 5: a producer killed between Snapshot Blob and Put Message leaves a marked
/// snapshot and no request. With other requests queued, reconcile used to trust that marker for
/// the whole pending TTL (6 h). A marker is now trusted only when its batch's record says every
/// request of the batch was queued; an unrecorded one only for a short grace period.
#[tokio::test]
async fn a_marker_left_by_a_killed_producer_is_not_trusted_past_the_grace() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let container = unique_name("killed");
    seed(&stack, &container, &files(&["done.csv", "killed.csv"])).await;
    let env = env(&stack, &[]);
    let app = support::app(&env);
    // A complete producer run for done.csv (its request is queued, nobody drains): its batch
    // is recorded, so its marker is trusted while the request waits.
    let r = lakeguard::ops::snapshot::run(
        &app,
        &container,
        Some("done"),
        lakeguard::ops::no_progress(),
    )
    .await
    .unwrap();
    assert_eq!(r.enqueued, 1, "{r:?}");
    let records = stack
        .backup()
        .list_blobs(lakeguard::settings::STATE_CONTAINER, Some("requests/"))
        .await;
    assert_eq!(records.len(), 1, "one batch record: {records:?}");
    // killed.csv: snapshotted by a producer that died before Put Message, 20 minutes ago.
    let props = app
        .source
        .properties(&container, "killed.csv", None)
        .await
        .unwrap();
    let mut meta = lakeguard::ops::snapshot::snapshot_metadata(
        &props.metadata,
        &props.etag,
        props.last_modified,
        time::OffsetDateTime::now_utc() - time::Duration::minutes(20),
        Some("20261203t000000-dead"),
    );
    meta.insert("owner".into(), "team-7".into());
    app.source
        .create_snapshot(&container, "killed.csv", &props.etag, &meta)
        .await
        .unwrap();
    // The queue is not empty (done.csv's request): markers matter.
    let (ok, r) = reconcile_cli(&env, &["--container", &container]).await;
    assert!(ok, "{r:#}");
    assert_eq!(n(&r, "already_pending"), 1, "done.csv: {r:#}");
    assert_eq!(
        n(&r, "requests_enqueued"),
        1,
        "killed.csv is asked again: {r:#}"
    );
    // Afterwards everything is backed up.
    let (ok, d) = {
        let out = run_cli(&["backup", "--drain", "--output", "json"], &env).await;
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    assert!(ok, "{d}");
    assert_full_coverage(&stack, &container).await;
}

fn fixture(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

#[tokio::test]
async fn timer_payloads_drive_reconcile_on_serve() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let container = unique_name("timer");
    seed(&stack, &container, &files(&["x.csv", "y.csv"])).await;
    let handler = Handler::spawn(&env(&stack, &[])).await;
    assert_eq!(
        host::trigger_binding("Reconcile"),
        lakeguard::handler::reconcile::TIMER_BINDING
    );

    let mut runs = 0;
    for name in [
        "timer_first_run.json",
        "timer_status_null.json",
        "timer_past_due.json",
    ] {
        let payload = fixture(name);
        assert_eq!(payload["Metadata"]["sys"]["MethodName"], "Reconcile");
        let r = host::invoke_raw(handler.port(), "Reconcile", &payload).await;
        assert!(
            r.host_succeeded(),
            "{name}: {} {}\n{}",
            r.status,
            r.body,
            handler.logs()
        );
        let body = r.json();
        let report = &body["ReturnValue"];
        assert_eq!(n(report, "containers"), 1, "{name}: {body:#}");
        assert!(
            r.logs().iter().any(|l| l.contains("reconcile")),
            "{name}: {body:#}"
        );
        if runs < 2 {
            // The first run requests the live versions (no marker); the second, with requests
            // queued, requests them once more with marked snapshots.
            assert_eq!(n(report, "requests_enqueued"), 2, "{name}: {body:#}");
            runs += 1;
        } else {
            assert_eq!(n(report, "already_pending"), 2, "{name}: {body:#}");
            assert_eq!(n(report, "requests_enqueued"), 0, "{name}: {body:#}");
        }
    }
    // A payload built by the harness (same shapes), and garbage.
    let r = host::invoke_raw(
        handler.port(),
        "Reconcile",
        &host::timer_invocation(true, None),
    )
    .await;
    assert!(r.host_succeeded(), "{}", r.body);
    let r = host::invoke_raw(handler.port(), "Reconcile", &json!("not an invocation")).await;
    assert_eq!(r.status.as_u16(), 400, "{}", r.body);
    assert!(
        handler.logs().contains("past_due=true"),
        "the timer's state is logged"
    );
    stack.assert_no_secrets_in(&handler.logs());
}

#[tokio::test]
async fn reconcile_now_over_forwarded_http() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let container = unique_name("now");
    let other = unique_name("other");
    seed(&stack, &container, &files(&["p.csv", "q.csv"])).await;
    seed(&stack, &other, &files(&["r.csv"])).await;
    let handler = Handler::spawn(&env(&stack, &[])).await;
    let port = handler.port();
    let admin = [("x-functions-key", "admin-key")];

    let r = forwarded_http(
        port,
        "GET",
        &format!("/api/reconcile?container={container}&dry_run=true&code=admin-key"),
        &admin,
        None,
    )
    .await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["status"], "ok");
    assert_eq!(n(&v["report"], "would_enqueue"), 2, "{v:#}");
    assert_eq!(n(&v["report"], "containers"), 1, "{v:#}");
    assert_eq!(stack.queues().message_count(&stack.queue).await, 0);

    let r = forwarded_http(
        port,
        "POST",
        "/api/reconcile",
        &[
            ("x-functions-key", "admin-key"),
            ("content-type", "application/json"),
        ],
        Some(serde_json::to_vec(&json!({"container": container})).unwrap()),
    )
    .await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.body);
    assert_eq!(n(&r.json()["report"], "requests_enqueued"), 2, "{}", r.body);

    // No container: every container of the account.
    let r = forwarded_http(port, "POST", "/api/reconcile", &admin, None).await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.body);
    let v = r.json();
    assert_eq!(n(&v["report"], "containers"), 2, "{v:#}");
    // The other container's blob, and the first container's two once more: their first
    // requests were for the live versions (no pending marker), these come with marked snapshots.
    assert_eq!(n(&v["report"], "requests_enqueued"), 3, "{v:#}");
    assert_eq!(n(&v["report"], "snapshots_made"), 3, "{v:#}");

    for (path, status) in [
        ("/api/reconcile?container=Bad_Name!", 400),
        ("/api/reconcile?container=no-such-container", 404),
        ("/api/reconcile?dry_run=perhaps", 400),
    ] {
        let r = forwarded_http(port, "GET", path, &admin, None).await;
        assert_eq!(r.status.as_u16(), status, "{path}: {}", r.body);
        assert!(r.json()["error"].is_string(), "{path}: {}", r.body);
    }
}

/// A zero budget hands over after every page: the timer run does one page and queues
/// continuations (the interrupted container at its checkpoint, the other container from the
/// start); ReconcileWorker hops, each queueing the next, finish the job exactly.
#[tokio::test]
async fn continuations_finish_what_the_budget_cut_short() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let c1 = unique_name("fan-a");
    let c2 = unique_name("fan-b");
    let names1 = ["k1", "k2", "k3", "k4", "k5", "k6", "k7"];
    let names2 = ["m1", "m2", "m3", "m4", "m5"];
    seed(&stack, &c1, &files(&names1)).await;
    seed(&stack, &c2, &files(&names2)).await;
    let reconcile_queue = format!("{}-rc", stack.queue);
    let env = env(
        &stack,
        &[
            ("LAKEGUARD_RECONCILE_BUDGET_SECS", "0"),
            ("LAKEGUARD_RECONCILE_QUEUE", &reconcile_queue),
            // The producer's requests below count as old (see the healing test).
            ("LAKEGUARD_PENDING_TTL_SECS", "1"),
        ],
    );
    let handler = Handler::spawn(&env).await;
    // Back up c1 once, then make work of every kind in it.
    producer(handler.port(), &c1).await;
    drain_backups(&stack, &handler).await;
    let src = stack.source();
    src.delete_blob(&c1, "k2").await.ok("delete");
    put(&src, &c1, "k5", b"k5 v2").await;
    stack
        .backup()
        .delete_blob(&c1, "k7")
        .await
        .ok("lose backup");
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;

    let r = host::invoke_raw(
        handler.port(),
        "Reconcile",
        &host::timer_invocation(false, None),
    )
    .await;
    assert!(r.host_succeeded(), "{}\n{}", r.body, handler.logs());
    let first = r.json()["ReturnValue"].clone();
    assert_eq!(first["complete"], false, "{first:#}");
    assert_eq!(n(&first, "containers"), 1, "{first:#}");
    assert_eq!(n(&first, "continuations_queued"), 2, "{first:#}");

    // The host's queue trigger on the continuation queue, calling ReconcileWorker.
    let queues = stack.queues();
    let worker = QueueTrigger {
        access: &queues,
        port: handler.port(),
        function: "ReconcileWorker".into(),
        binding: host::trigger_binding("ReconcileWorker"),
        queue: reconcile_queue.clone(),
        max_dequeue_count: 5,
        lease_secs: 600,
    };
    let hops = worker.drain(60).await;
    assert_eq!(
        hops.failed + hops.poisoned,
        0,
        "{hops:#?}\n{}",
        handler.logs()
    );
    // 7 + 5 names with pages of 2: several hops per container.
    assert!(hops.invocations >= 6, "{}", hops.invocations);
    let mut totals = BTreeMap::<&str, u64>::new();
    let mut finished = n(&first, "containers_finished");
    for k in [
        "source_scanned",
        "requests_enqueued",
        "already_pending",
        "tombstones_written",
        "in_sync",
    ] {
        totals.insert(k, n(&first, k));
    }
    for d in &hops.deliveries {
        let host::Delivery::Succeeded { response, .. } = d else {
            panic!("{d:?}")
        };
        let rep = &response.json()["ReturnValue"];
        assert_eq!(n(rep, "errors"), 0, "{rep:#}");
        finished += n(rep, "containers_finished");
        for (k, v) in totals.iter_mut() {
            *v += n(rep, k);
        }
    }
    assert_eq!(finished, 2, "each container's chain finished once");
    // Every name handled exactly once across the hops (re-read rows are not counted twice).
    assert_eq!(
        totals["source_scanned"],
        (names1.len() - 1 + names2.len()) as u64,
        "{totals:?}"
    );
    // k5 changed, k7's backup lost, and all of c2.
    assert_eq!(
        totals["requests_enqueued"],
        2 + names2.len() as u64,
        "{totals:?}"
    );
    assert_eq!(totals["already_pending"], 0, "{totals:?}");
    assert_eq!(totals["tombstones_written"], 1, "{totals:?}");
    assert_eq!(totals["in_sync"], 4, "{totals:?}");
    assert!(handler.logs().contains("reconcile of container finished"));

    drain_backups(&stack, &handler).await;
    assert_full_coverage(&stack, &c1).await;
    assert_full_coverage(&stack, &c2).await;

    // A malformed continuation is poisoned at once, with the reason; nothing else breaks.
    use base64::Engine as _;
    let garbage = base64::engine::general_purpose::STANDARD.encode(r#"{"v":1,"kind":"nope"}"#);
    queues
        .send_message(&reconcile_queue, &garbage)
        .await
        .ok("put");
    let d = worker.run_once().await.expect("a delivery");
    assert!(matches!(d, host::Delivery::Succeeded { .. }), "{d:?}");
    let poisoned = queues
        .peek_messages(&format!("{reconcile_queue}-poison"))
        .await;
    assert_eq!(poisoned.len(), 1);
    let record: Value = serde_json::from_str(&poisoned[0].decoded_text().unwrap()).unwrap();
    assert!(
        record["reason"]
            .as_str()
            .unwrap()
            .contains("not a reconcile continuation"),
        "{record}"
    );
    assert_eq!(record["original"], r#"{"v":1,"kind":"nope"}"#);
}

/// The CLI hands over too when given a budget, and `--continuations` drains the queue from a
/// terminal with the worker's code.
#[tokio::test]
async fn cli_budget_and_continuation_drain() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let c = unique_name("cli");
    let names = ["f1", "f2", "f3", "f4", "f5"];
    seed(&stack, &c, &files(&names)).await;
    let env = env(&stack, &[("LAKEGUARD_RECONCILE_BUDGET_SECS", "0")]);
    let (ok, r) = reconcile_cli(&env, &["--budget-secs", "0"]).await;
    assert!(ok, "{r:#}");
    assert_eq!(n(&r, "continuations_queued"), 1, "{r:#}");
    assert!(n(&r, "requests_enqueued") < names.len() as u64, "{r:#}");
    let (ok, d) = reconcile_cli(&env, &["--continuations"]).await;
    assert!(ok, "{d:#}");
    assert_eq!(
        n(&r, "requests_enqueued") + n(&d, "requests_enqueued"),
        names.len() as u64,
        "{r:#}\n{d:#}"
    );
    assert_eq!(n(&d, "containers_finished"), 1, "{d:#}");
    assert_eq!(
        stack.queues().peek_messages(&stack.queue).await.len(),
        names.len()
    );
}

/// Managed identity (HTTPS, bearer tokens from the local IDENTITY_ENDPOINT), and a source
/// container deleted as a whole: its backup container is still walked (it is listed in the backup
/// account) and every lakeguard backup in it is tombstoned; a backup blob lakeguard did not write
/// is left alone. The cost is counted from Azurite's access log (no proxy over HTTPS).
#[tokio::test]
async fn managed_identity_deleted_source_container_is_tombstoned() {
    let stack = Stack::start(Mode::OAuthHttps).await;
    let gone = unique_name("gone");
    let live = unique_name("live");
    let bk = stack.backup();
    // Backups as the worker writes them (made directly: this test is about reconcile).
    bk.create_container(&gone).await.ok("create");
    for name in ["g1.csv", "g2/x.csv"] {
        bk.put_blob(
            &gone,
            name,
            b"old content",
            &[
                ("lakeguard_source_etag", "\"0x8DEADBEEF\""),
                ("lakeguard_source_last_modified", "2026-11-01T00:00:00Z"),
            ],
        )
        .await
        .ok("put backup");
    }
    bk.put_blob(&gone, "foreign.txt", b"not ours", &[])
        .await
        .ok("put foreign");
    seed(&stack, &live, &files(&["l1.csv"])).await;
    let env = env(&stack, &[]);

    let (ok, r) = reconcile_cli(&env, &[]).await;
    assert!(ok, "{r:#}");
    assert_eq!(n(&r, "containers"), 2, "{r:#}");
    assert_eq!(n(&r, "tombstones_written"), 2, "{r:#}");
    assert_eq!(n(&r, "skipped"), 1, "the foreign blob: {r:#}");
    assert_eq!(n(&r, "requests_enqueued"), 1, "{r:#}");
    let (bases, snaps) = backup_state(&stack, &gone).await;
    for name in ["g1.csv", "g2/x.csv"] {
        assert!(
            bases[name].metadata.contains_key("lakeguard_deleted_at"),
            "{name}"
        );
        assert_eq!(snaps[name].len(), 1, "{name}: the last version is kept");
    }
    assert!(!bases["foreign.txt"]
        .metadata
        .contains_key("lakeguard_deleted_at"));

    // l1.csv was requested as a live version (empty queue, no marker); with that request still
    // queued the next run asks once more, with a marked snapshot.
    let (ok, r) = reconcile_cli(&env, &[]).await;
    assert!(ok, "{r:#}");
    assert_eq!(n(&r, "requests_enqueued"), 1, "{r:#}");
    assert_eq!(n(&r, "snapshots_made"), 1, "{r:#}");

    // Nothing left to do; and a no-op run only lists (access log: same account-level view).
    let before = stack.azurite.blob_requests().await.len();
    let (ok, r) = reconcile_cli(&env, &[]).await;
    assert!(ok, "{r:#}");
    assert_eq!(n(&r, "tombstones_written"), 0, "{r:#}");
    assert_eq!(n(&r, "already_tombstoned"), 2, "{r:#}");
    assert_eq!(n(&r, "already_pending"), 1, "{r:#}");
    let after = stack.azurite.blob_requests().await;
    // The only per-blob requests left are the snapshot listing of the pending blob and one read
    // of its marker's batch record (what makes the marker trustworthy).
    let batch_reads = after[before..]
        .iter()
        .filter(|e| e.method == "GET" && e.target.contains("/lakeguard-state/requests/"))
        .count();
    assert_eq!(batch_reads, 1);
    let extra: Vec<_> = after[before..]
        .iter()
        .filter(|e| !(e.method == "GET" && e.comp().as_deref() == Some("list")))
        .filter(|e| !e.target.contains("/lakeguard-state/requests/"))
        .map(|e| e.target.clone())
        .collect();
    assert!(extra.is_empty(), "requests other than listings: {extra:#?}");
    let id = stack.identity.as_ref().unwrap();
    id.assert_no_violations();
    assert!(id.requests_for(support::identity::STORAGE_RESOURCE) >= 1);
}

/// A hop whose listing fails (the backup account is unreachable) fails the invocation: the host
/// redelivers the message and finally moves it to the poison queue; nothing is acknowledged
/// blindly. The timer fails visibly too.
#[tokio::test]
async fn failing_hops_are_retried_then_poisoned() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let c = unique_name("dead");
    seed(&stack, &c, &files(&["d1"])).await;
    let dead_backup = format!(
        "DefaultEndpointsProtocol=http;AccountName={};AccountKey={};BlobEndpoint=http://127.0.0.1:{}/{}",
        support::BACKUP_ACCOUNT,
        support::BACKUP_KEY,
        support::free_port(),
        support::BACKUP_ACCOUNT
    );
    let reconcile_queue = format!("{}-reconcile", stack.queue);
    let handler = Handler::spawn(&env(&stack, &[("BackupStorage", &dead_backup)])).await;

    let r = host::invoke_raw(
        handler.port(),
        "Reconcile",
        &host::timer_invocation(false, None),
    )
    .await;
    assert!(!r.host_succeeded(), "{}", r.body);
    assert!(
        r.logs().iter().any(|l| l.contains("reconcile failed")),
        "{}",
        r.body
    );

    use base64::Engine as _;
    let start = lakeguard::ops::reconcile::Continuation::start("test-run", &c).to_json();
    let queues = stack.queues();
    queues.create_queue(&reconcile_queue).await;
    queues
        .send_message(
            &reconcile_queue,
            &base64::engine::general_purpose::STANDARD.encode(start.as_bytes()),
        )
        .await
        .ok("put");
    let worker = QueueTrigger {
        access: &queues,
        port: handler.port(),
        function: "ReconcileWorker".into(),
        binding: host::trigger_binding("ReconcileWorker"),
        queue: reconcile_queue.clone(),
        max_dequeue_count: 3,
        lease_secs: 600,
    };
    let report = worker.drain(10).await;
    assert_eq!(
        (report.failed, report.poisoned),
        (2, 1),
        "{report:#?}\n{}",
        handler.logs()
    );
    let host::Delivery::Failed { response, .. } = &report.deliveries[0] else {
        panic!("{report:#?}")
    };
    assert!(
        response
            .logs()
            .iter()
            .any(|l| l.contains("retryable failure") && l.contains("backup")),
        "{response:?}"
    );
    let poisoned = queues
        .peek_messages(&format!("{reconcile_queue}-poison"))
        .await;
    assert_eq!(poisoned[0].decoded_text().unwrap(), start);
    stack.assert_no_secrets_in(&handler.logs());
}

/// Reconcile and the producer read listings through `Lister`, which asks for page k+1 while page
/// k is being worked on: the pages must be exactly the service's, each fetched once, and a page
/// asked for out of turn must still be the right one.
#[tokio::test]
async fn a_listing_fetched_ahead_returns_the_service_pages_each_fetched_once() {
    use lakeguard::storage::blob::ListOptions;
    use lakeguard::storage::Lister;

    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let container = unique_name("pages");
    let names = [
        "a b.txt", "a#.txt", "a%.txt", "b/ü.txt", "c?.txt", "d.txt", "e.txt",
    ];
    seed(&stack, &container, &files(&names)).await;
    let proxy = stack.blob_proxy();
    let app = support::app(&stack.env_via_proxy(&proxy));
    let opts = ListOptions {
        metadata: true,
        max_results: Some(2),
        ..Default::default()
    };
    let page_names = |p: &lakeguard::storage::blob::ListPage| {
        p.entries.iter().map(|e| e.name.clone()).collect::<Vec<_>>()
    };

    // The service's pages, one after the other.
    let mut expected = Vec::new();
    let mut marker = None;
    loop {
        let p = app
            .source
            .list_page(&container, &opts, marker.clone())
            .await
            .unwrap();
        expected.push((marker.take(), page_names(&p), p.next_marker.clone()));
        match p.next_marker {
            Some(m) => marker = Some(m),
            None => break,
        }
    }
    assert_eq!(expected.len(), 4, "{expected:?}");

    proxy.reset();
    let mut lister = Lister::new(&app.source, &container, opts.clone());
    let mut got = Vec::new();
    let mut marker = None;
    loop {
        let p = lister.page(marker.clone()).await.unwrap();
        got.push((marker.take(), page_names(&p), p.next_marker.clone()));
        match p.next_marker {
            Some(m) => marker = Some(m),
            None => break,
        }
    }
    assert_eq!(got, expected);
    let lists = proxy
        .requests()
        .iter()
        .filter(|r| r.is_list_blobs())
        .count();
    assert_eq!(
        lists,
        4,
        "each page once, nothing fetched past the last: {:#?}",
        proxy.summary()
    );

    // Out of turn: page 3 while page 2 is on its way.
    let mut lister = Lister::new(&app.source, &container, opts.clone());
    let first = lister.page(None).await.unwrap();
    assert_eq!(page_names(&first), expected[0].1);
    let third = lister.page(expected[2].0.clone()).await.unwrap();
    assert_eq!(page_names(&third), expected[2].1);
    let first_again = lister.page(None).await.unwrap();
    assert_eq!(page_names(&first_again), expected[0].1);

    // A container that does not exist: an error, or empty where the caller says so.
    let mut gone = Lister::new(&app.source, "no-such-container", opts.clone());
    assert!(gone.page(None).await.unwrap_err().is_not_found());
    let mut gone = Lister::new(&app.source, "no-such-container", opts).missing_is_empty();
    let empty = gone.page(None).await.unwrap();
    assert!(empty.entries.is_empty() && empty.next_marker.is_none());
}
