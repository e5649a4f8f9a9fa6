//! Point-in-time restore end to end against a real Azurite: a history is built with the real
//! producer and worker (and tombstones written the documented way) over "simulated time", the
//! test keeps its own record of the truth at each point, and every restore is compared with it
//! through the independent REST oracle.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;

use lakeguard::app::App;
use lakeguard::core::restore::{HistoryFrom, PlanItem};
use lakeguard::model::metadata;
use lakeguard::ops::restore::{self, RestoreRequest, TargetSpec, RESERVED_CONTAINER};
use lakeguard::ops::{self, no_progress};
use serde_json::{json, Value};
use support::app::{cycle, mark};
use support::host::forwarded_http;
use support::{run_cli, unique_name, Mode, Stack, StorageRest};
use time::OffsetDateTime;

type Truth = BTreeMap<String, Vec<u8>>;

/// Producer then worker as `lakeguard snapshot` and `lakeguard backup --drain`.
async fn cycle_cli(env: &[(String, String)], container: &str) {
    for args in [
        vec!["snapshot", "--container", container],
        vec!["backup", "--drain"],
    ] {
        let out = run_cli(&args, env).await;
        assert!(
            out.status.success(),
            "{args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The real Reconcile over one container: it tombstones the backups of deleted sources (after
/// keeping their current version as a backup snapshot) and must find nothing else to do here.
async fn reconcile(app: &App, container: &str) -> u64 {
    let opts = ops::reconcile::RunOptions {
        container: Some(container.to_owned()),
        ..Default::default()
    };
    let r = ops::reconcile::run(app, &opts, no_progress())
        .await
        .expect("reconcile");
    assert_eq!(r.errors, 0, "{r:?}");
    assert_eq!(r.requests_enqueued, 0, "{r:?}");
    r.tombstones_written
}

async fn put(src: &StorageRest, c: &str, name: &str, data: &[u8], truth: &mut Truth) {
    src.put_blob(c, name, data, &[("owner", "team-a")])
        .await
        .ok("put blob");
    truth.insert(name.to_owned(), data.to_vec());
}

async fn del(src: &StorageRest, c: &str, name: &str, truth: &mut Truth) {
    src.delete_blob(c, name).await.ok("delete blob");
    truth.remove(name);
}

/// The base blobs of a container and their contents (REST oracle). Reserved names excluded.
async fn contents(rest: &StorageRest, c: &str) -> Truth {
    let mut out = Truth::new();
    for b in rest.list_blobs(c, None).await {
        if b.snapshot.is_none() {
            let body = rest.get_blob(c, &b.name, None).await.ok("get blob").body;
            out.insert(b.name, body);
        }
    }
    out
}

/// Three points in time over one container:
/// T1: a=v1, b=v1, c=v1, "a.txt.bak"=v1 (a name that extends another)
/// T2: a=v2, b deleted (tombstoned), c=v1, d=v1 (new), a.txt.bak unchanged
/// T3: a=v3, c=v2, d=v1, b re-created (v2)
struct History {
    container: String,
    points: Vec<(OffsetDateTime, Truth)>,
}

async fn build_history(stack: &Stack, app: &App) -> History {
    let src = stack.source();
    let c = unique_name("lake");
    src.create_container(&c).await.ok("create container");
    let mut truth = Truth::new();
    let mut points = Vec::new();

    put(&src, &c, "a.txt", b"a version 1", &mut truth).await;
    put(&src, &c, "a.txt.bak", b"bak version 1", &mut truth).await;
    put(&src, &c, "dir/b b.csv", b"b version 1", &mut truth).await;
    put(&src, &c, "c.json", b"{\"c\":1}", &mut truth).await;
    cycle(app, &c).await;
    points.push((mark().await, truth.clone()));

    put(&src, &c, "a.txt", b"a version 2, longer", &mut truth).await;
    del(&src, &c, "dir/b b.csv", &mut truth).await;
    put(&src, &c, "d.txt", b"d version 1", &mut truth).await;
    cycle(app, &c).await;
    assert_eq!(reconcile(app, &c).await, 1, "the deletion is tombstoned");
    points.push((mark().await, truth.clone()));

    put(&src, &c, "a.txt", b"a3", &mut truth).await;
    put(&src, &c, "c.json", b"{\"c\":2}", &mut truth).await;
    put(
        &src,
        &c,
        "dir/b b.csv",
        b"b version 2 (re-created)",
        &mut truth,
    )
    .await;
    cycle(app, &c).await;
    points.push((mark().await, truth.clone()));
    History {
        container: c,
        points,
    }
}

fn elsewhere(app: &App, container: &str, at: OffsetDateTime, target: &str) -> RestoreRequest {
    let mut req = RestoreRequest::new(container, at);
    req.to = Some(TargetSpec {
        store: app.backup.clone(),
        container: target.to_owned(),
    });
    req
}

#[tokio::test]
async fn restore_to_points_in_time_elsewhere_and_in_place() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let env = stack.env();
    let app = support::app(&env);
    let h = build_history(&stack, &app).await;
    let c = &h.container;

    // Into another account (the backup account, new containers), at every point.
    for (i, (t, truth)) in h.points.iter().enumerate() {
        let target = unique_name(&format!("dr{i}"));
        let report = restore::run(&app, &elsewhere(&app, c, *t, &target), no_progress())
            .await
            .expect("restore");
        assert!(report.is_complete(), "T{}: {report:#?}", i + 1);
        assert_eq!(report.plan.restore, truth.len() as u64, "{report:#?}");
        assert_eq!(report.plan.overwrite + report.plan.delete, 0);
        assert_eq!(
            contents(&stack.backup(), &target).await,
            *truth,
            "T{}",
            i + 1
        );
        // Restored blobs carry the marker, the version's user metadata and its content type.
        let listed = stack.backup().list_blobs(&target, None).await;
        for b in listed.iter().filter(|b| b.snapshot.is_none()) {
            assert!(
                b.metadata.contains_key("lakeguard_restored_from_etag"),
                "{b:?}"
            );
            assert_eq!(b.metadata.get("owner").map(String::as_str), Some("team-a"));
            assert!(!b.metadata.contains_key("lakeguard_backed_up_at"), "{b:?}");
        }
    }

    // A prefix is a plain string prefix: `a.txt` selects `a.txt` and `a.txt.bak`, nothing else.
    let target = unique_name("prefix");
    let mut req = elsewhere(&app, c, h.points[1].0, &target);
    req.prefix = Some("a.txt".into());
    let report = restore::run(&app, &req, no_progress()).await.unwrap();
    assert!(report.is_complete(), "{report:#?}");
    let expected: Truth = h.points[1]
        .1
        .iter()
        .filter(|(n, _)| n.starts_with("a.txt"))
        .map(|(n, d)| (n.clone(), d.clone()))
        .collect();
    assert_eq!(expected.len(), 2);
    assert_eq!(contents(&stack.backup(), &target).await, expected);

    // The CLI into another account given by connection string (never echoed).
    let (t2, truth2) = &h.points[1];
    let target = unique_name("cs");
    let backup_cs = stack.azurite.connection_string(support::BACKUP_ACCOUNT);
    let out = run_cli(
        &[
            "restore",
            "--container",
            c,
            "--at",
            &metadata::format_time(*t2),
            "--to-account",
            &backup_cs,
            "--to-container",
            &target,
        ],
        &env,
    )
    .await;
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{printed}");
    assert!(
        printed.contains("restore ") && printed.contains("plan: restore"),
        "{printed}"
    );
    stack.assert_no_secrets_in(&printed);
    assert_eq!(contents(&stack.backup(), &target).await, *truth2);

    // Before the first version: nothing existed as far as the backup knows.
    let early = h.points[0].0 - time::Duration::hours(1);
    let report = restore::run(
        &app,
        &elsewhere(&app, c, early, &unique_name("early")),
        no_progress(),
    )
    .await
    .unwrap();
    assert_eq!(report.plan.restore, 0, "{report:#?}");

    // In place without --force: refused, nothing written (CLI, exit code 3).
    let (t1, truth1) = &h.points[0];
    let at = metadata::format_time(*t1);
    let out = run_cli(&["restore", "--container", c, "--at", &at], &env).await;
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("REFUSED"));
    assert_eq!(contents(&stack.source(), c).await, h.points[2].1);

    // Dry run: the plan only.
    let out = run_cli(
        &[
            "restore",
            "--container",
            c,
            "--at",
            &at,
            "--dry-run",
            "--force",
            "--output",
            "json",
        ],
        &env,
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["executed"], false);
    assert_eq!(
        plan["plan"]["delete"], 1,
        "d.txt did not exist at T1: {plan:#}"
    );
    assert_eq!(plan["plan"]["overwrite"], 3, "a, b, c changed: {plan:#}");
    assert_eq!(plan["plan"]["unchanged"], 1, "a.txt.bak: {plan:#}");
    assert_eq!(contents(&stack.source(), c).await, h.points[2].1);

    // In place with --force.
    let out = run_cli(
        &[
            "restore",
            "--container",
            c,
            "--at",
            &at,
            "--force",
            "--output",
            "json",
        ],
        &env,
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = r["id"].as_str().unwrap().to_owned();
    assert_eq!(r["execution"]["restored"], 3, "{r:#}");
    assert_eq!(r["execution"]["deleted"], 1, "{r:#}");
    assert_eq!(r["execution"]["undo_snapshots"], 3, "{r:#}");
    assert_eq!(contents(&stack.source(), c).await, *truth1);
    // Undo: the overwritten states are snapshots of the target, the deleted blob is kept in
    // the backup account.
    let listing = stack.source().list_blobs(c, None).await;
    let undo: Vec<_> = listing
        .iter()
        .filter(|b| b.metadata.get(restore::RESTORE_UNDO) == Some(&id))
        .collect();
    assert_eq!(undo.len(), 3, "{listing:#?}");
    let a_undo = undo.iter().find(|b| b.name == "a.txt").unwrap();
    let body = stack
        .source()
        .get_blob(c, "a.txt", a_undo.snapshot.as_deref())
        .await
        .ok("undo snapshot")
        .body;
    assert_eq!(body, b"a3");
    let kept = stack
        .backup()
        .get_blob(RESERVED_CONTAINER, &format!("{id}/undo/{c}/d.txt"), None)
        .await
        .ok("undo copy of the deleted blob")
        .body;
    assert_eq!(kept, b"d version 1");

    // Again: nothing to do, nothing done twice.
    let again = restore::run(
        &app,
        &{
            let mut r = RestoreRequest::new(c.as_str(), *t1);
            r.force = true;
            r
        },
        no_progress(),
    )
    .await
    .unwrap();
    assert_eq!(again.plan.restore + again.plan.delete, 0, "{again:#?}");
    assert!(again.is_complete());
    assert_eq!(contents(&stack.source(), c).await, *truth1);

    // Forward again, in place, to T2: `dir/b b.csv` was deleted before T2 and goes again,
    // `d.txt` (deleted by the previous restore) comes back, `c.json` already holds its T2
    // version (restored from it: the marker says so) and is not copied again.
    let (t2, truth2) = &h.points[1];
    let mut req = RestoreRequest::new(c.as_str(), *t2);
    req.force = true;
    let r2 = restore::run(&app, &req, no_progress()).await.unwrap();
    assert!(r2.is_complete(), "{r2:#?}");
    assert_eq!(r2.plan.delete, 1, "{r2:#?}");
    assert_eq!(r2.plan.restore, 2, "a.txt and d.txt: {r2:#?}");
    assert_eq!(r2.plan.unchanged, 2, "c.json and a.txt.bak: {r2:#?}");
    assert_eq!(contents(&stack.source(), c).await, *truth2);
}

#[tokio::test]
async fn interrupted_restore_finishes_and_changed_targets_are_not_overwritten() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let env = stack.env();
    let app = support::app(&env);
    let h = build_history(&stack, &app).await;
    let c = &h.container;
    let (t2, truth2) = &h.points[1];

    // Interrupted after one item (a batch limit), then run again.
    let target = unique_name("resume");
    let mut req = elsewhere(&app, c, *t2, &target);
    req.limit = Some(1);
    let first = restore::run(&app, &req, no_progress()).await.unwrap();
    let e1 = first.execution.clone().unwrap();
    assert_eq!(e1.restored, 1, "{first:#?}");
    assert_eq!(e1.not_attempted, truth2.len() as u64 - 1);
    assert!(!first.is_complete());
    req.limit = None;
    let second = restore::run(&app, &req, no_progress()).await.unwrap();
    assert!(second.is_complete(), "{second:#?}");
    assert_eq!(
        second.plan.unchanged, 1,
        "the first run's blob is recognised"
    );
    assert_eq!(second.plan.overwrite, 0, "no --force needed to finish");
    assert_eq!(
        second.execution.unwrap().restored,
        truth2.len() as u64 - 1,
        "nothing done twice"
    );
    assert_eq!(contents(&stack.backup(), &target).await, *truth2);

    // A non-empty target that would be overwritten: refused without force.
    let (t1, truth1) = &h.points[0];
    let mut req = elsewhere(&app, c, *t1, &target);
    let refused = restore::run(&app, &req, no_progress()).await.unwrap();
    assert!(refused.refused.is_some(), "{refused:#?}");
    assert!(!refused.executed);
    assert_eq!(contents(&stack.backup(), &target).await, *truth2);

    // With force, but one target blob changes between plan and execution: it is left as is.
    req.force = true;
    let mut plan = restore::plan(&app, &req).await.unwrap();
    assert!(plan.summary.overwrite >= 1, "{:?}", plan.summary);
    stack
        .backup()
        .put_blob(&target, "a.txt", b"written meanwhile", &[])
        .await
        .ok("concurrent write");
    let exec = restore::execute(&app, &req, &mut plan, no_progress())
        .await
        .unwrap();
    assert_eq!(exec.changed_since_plan, 1, "{exec:#?}");
    assert_eq!(exec.changed, vec!["a.txt".to_string()]);
    let now = contents(&stack.backup(), &target).await;
    assert_eq!(now["a.txt"], b"written meanwhile");
    for (name, data) in truth1.iter().filter(|(n, _)| *n != "a.txt") {
        assert_eq!(&now[name], data, "{name}");
    }
    // d.txt did not exist at T1: elsewhere it is left alone, never deleted.
    assert_eq!(now["d.txt"], b"d version 1");

    // The history row a plan copies from changes before execution (here: the backup base blob
    // of `d.txt`'s current version gets new metadata, so a new ETag): the copy's source
    // condition fails, nothing is written, and a rerun plans from the new row and succeeds.
    let (t3, truth3) = &h.points[2];
    let target = unique_name("srcmoved");
    let req = elsewhere(&app, c, *t3, &target);
    let mut plan = restore::plan(&app, &req).await.unwrap();
    let p = app.backup.properties(c, "d.txt", None).await.unwrap();
    let mut meta = p.metadata.clone();
    meta.insert("touched".into(), "yes".into());
    app.backup
        .set_metadata(c, "d.txt", &meta, &p.etag)
        .await
        .unwrap();
    let exec = restore::execute(&app, &req, &mut plan, no_progress())
        .await
        .unwrap();
    assert_eq!(exec.failed, 1, "{exec:#?}");
    assert_eq!(exec.failures[0].blob, "d.txt");
    assert!(
        exec.failures[0].error.contains("history changed"),
        "{exec:#?}"
    );
    assert_eq!(exec.changed_since_plan, 0, "{exec:#?}");
    assert!(!contents(&stack.backup(), &target)
        .await
        .contains_key("d.txt"));
    let rerun = restore::run(&app, &req, no_progress()).await.unwrap();
    assert!(rerun.is_complete(), "{rerun:#?}");
    assert_eq!(rerun.execution.unwrap().restored, 1);
    assert_eq!(contents(&stack.backup(), &target).await, *truth3);
}

#[tokio::test]
async fn restore_from_source_snapshots_and_unavailable_versions() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let env = stack.env();
    let app = support::app(&env);
    let h = build_history(&stack, &app).await;
    let c = &h.container;

    // The source's own snapshots (the producer's), into another container of the source.
    let (t2, truth2) = &h.points[1];
    let target = unique_name("fromsnap");
    let mut req = RestoreRequest::new(c.as_str(), *t2);
    req.from = HistoryFrom::SourceSnapshots;
    req.to = Some(TargetSpec {
        store: app.source.clone(),
        container: target.clone(),
    });
    let report = restore::run(&app, &req, no_progress()).await.unwrap();
    // `dir/b b.csv` was deleted (with its snapshots: Azure deletes a blob's snapshots with it)
    // and re-created after T2: its only snapshot is of the new version, so at T2 it is absent.
    assert!(report.is_complete(), "{report:#?}");
    assert_eq!(report.plan.restore, truth2.len() as u64, "{report:#?}");
    assert_eq!(contents(&stack.source(), &target).await, *truth2);

    // The CLI spelling of the same choice.
    let out = run_cli(
        &[
            "restore",
            "--container",
            c,
            "--at",
            &metadata::format_time(*t2),
            "--from",
            "snapshots",
            "--dry-run",
            "--output",
            "json",
        ],
        &env,
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["request"]["from"], "source_snapshots", "{r:#}");
    assert_eq!(r["request"]["in_place"], true);
    assert_eq!(r["executed"], false);

    // In place from the source's snapshots to T1 (each version copied from a snapshot onto its
    // own base blob). `dir/b b.csv` version 1 went with its snapshots when it was deleted, so the
    // source alone cannot bring it back (the backup can: see the first test): it is deleted as a
    // blob that did not exist at T1 as far as this history knows.
    let (t1, truth1) = &h.points[0];
    let mut req = RestoreRequest::new(c.as_str(), *t1);
    req.from = HistoryFrom::SourceSnapshots;
    req.force = true;
    let report = restore::run(&app, &req, no_progress()).await.unwrap();
    assert!(report.is_complete(), "{report:#?}");
    let mut expected = truth1.clone();
    expected.remove("dir/b b.csv");
    expected.remove("d.txt");
    assert!(!truth1.contains_key("d.txt"));
    assert_eq!(contents(&stack.source(), c).await, expected);

    // A version whose copy never completed (no lakeguard_backed_up_at) is not in the backup.
    // The backup alone cannot restore it: unavailable, not guessed.
    let p = app.backup.properties(c, "c.json", None).await.unwrap();
    let mut meta = p.metadata.clone();
    meta.remove(metadata::BACKED_UP_AT);
    app.backup
        .set_metadata(c, "c.json", &meta, &p.etag)
        .await
        .unwrap();
    let (t3, truth3) = &h.points[2];
    let mut req = elsewhere(&app, c, *t3, &unique_name("unavail"));
    req.from = HistoryFrom::BackupOnly;
    let report = restore::run(&app, &req, no_progress()).await.unwrap();
    assert_eq!(report.plan.unavailable, 1, "{report:#?}");
    assert!(report
        .items
        .iter()
        .any(|i| matches!(i, PlanItem::Unavailable { name, .. } if name == "c.json")));
    assert!(!report.is_complete());
    // With the source's rows (the default), the version is still held by its source snapshot
    // and restored from there.
    let target = unique_name("fallback");
    let report = restore::run(&app, &elsewhere(&app, c, *t3, &target), no_progress())
        .await
        .unwrap();
    assert!(report.is_complete(), "{report:#?}");
    assert!(report.items.iter().any(|i| matches!(i,
        PlanItem::Restore { name, version, .. } if name == "c.json"
            && version.content.as_ref().is_some_and(|c| c.side == lakeguard::core::restore::Side::Source))));
    assert_eq!(contents(&stack.backup(), &target).await, *truth3);
}

/// `GET /api/restore/{id}` (must answer 200).
async fn status_of(port: u16, id: &str) -> Value {
    let r = forwarded_http(
        port,
        "GET",
        &format!("/api/restore/{id}"),
        &[("x-functions-key", "admin-key")],
        None,
    )
    .await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.body);
    r.json()
}

/// The HTTP function: without `confirm` it only plans; with it, 202 and a status to follow.
#[tokio::test]
async fn restore_http_function_plans_and_runs_with_confirm() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let env = stack.env();
    let app = support::app(&env);
    let h = build_history(&stack, &app).await;
    let c = &h.container;
    let (t1, truth1) = &h.points[0];
    let handler = stack.handler().await;
    let port = handler.port();
    let call = |body: Value| async move {
        let r = forwarded_http(
            port,
            "POST",
            "/api/restore",
            &[
                ("x-functions-key", "admin-key"),
                ("content-type", "application/json"),
            ],
            Some(serde_json::to_vec(&body).unwrap()),
        )
        .await;
        (r.status.as_u16(), r.json())
    };
    let at = metadata::format_time(*t1);

    // In place without confirm: a plan, nothing written.
    let (status, body) = call(json!({"container": c, "at": at, "force": true})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["executed"], false);
    assert_eq!(body["plan"]["delete"], 1, "{body}");
    assert_eq!(contents(&stack.source(), c).await, h.points[2].1);

    // confirm without force, in place: refused.
    let (status, body) = call(json!({"container": c, "at": at, "confirm": true})).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["refused"].is_string(), "{body}");
    assert_eq!(contents(&stack.source(), c).await, h.points[2].1);

    // Into another container of the backup account, confirmed: 202 + status.
    let target = unique_name("http");
    let (status, body) = call(json!({
        "container": c, "at": at, "to_account": "BackupStorage", "to_container": target,
        "confirm": true
    }))
    .await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    assert_eq!(body["status_url"], format!("/api/restore/{id}"));
    // Durable: nothing ran after the answer; the chunks are on the continuation queue.
    let last = status_of(port, &id).await;
    assert_eq!(last["state"], "running", "{last:#}");
    assert_eq!(last["done"], 0, "{last:#}");
    let queues = stack.queues();
    let rq = format!("{}-reconcile", stack.queue);
    let chunks = support::QueueTrigger::reconcile_worker(&queues, port, &rq)
        .drain(50)
        .await;
    assert_eq!((chunks.failed, chunks.poisoned), (0, 0), "{chunks:#?}");
    let last = status_of(port, &id).await;
    assert_eq!(last["state"], "succeeded", "{last:#}");
    assert_eq!(last["total"], truth1.len() as u64, "{last:#}");
    assert_eq!(last["done"], last["total"]);
    assert_eq!(last["report"]["execution"]["restored"], truth1.len() as u64);
    assert_eq!(contents(&stack.backup(), &target).await, *truth1);

    // In place, confirmed and forced: runs; the deleted blob's undo copy is in the backup.
    let (status, body) =
        call(json!({"container": c, "at": at, "confirm": true, "force": true})).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    let queues = stack.queues();
    let rq = format!("{}-reconcile", stack.queue);
    let chunks = support::QueueTrigger::reconcile_worker(&queues, port, &rq)
        .drain(50)
        .await;
    assert_eq!((chunks.failed, chunks.poisoned), (0, 0), "{chunks:#?}");
    let last = status_of(port, &id).await;
    assert_eq!(last["state"], "succeeded", "{last:#}");
    assert_eq!(contents(&stack.source(), c).await, *truth1);
    stack
        .backup()
        .get_blob(RESERVED_CONTAINER, &format!("{id}/undo/{c}/d.txt"), None)
        .await
        .ok("undo copy");

    // Bad requests: 400 with a reason, nothing planned.
    let other = unique_name("other");
    stack.source().create_container(&other).await.ok("create");
    for bad in [
        json!({"container": c}),
        json!({"container": c, "at": "yesterday"}),
        json!({"container": c, "at": at, "from": "tape"}),
        json!({"container": c, "at": at, "to_account": "AccountKey=abc;AccountName=x"}),
        json!({"container": c, "at": at, "to_container": RESERVED_CONTAINER}),
        json!({"container": c, "at": at, "unknown": 1}),
        // Another source container's history in the backup account: never a target.
        json!({"container": c, "at": at, "to_account": "BackupStorage", "to_container": other}),
        // The backup's own container is the history being read: never a target.
        json!({"container": c, "at": at, "to_account": "BackupStorage", "confirm": true, "force": true}),
    ] {
        let (status, body) = call(bad.clone()).await;
        assert_eq!(status, 400, "{bad} -> {body}");
        assert!(body["error"].is_string(), "{body}");
    }

    // Unknown ids are 404.
    let r = forwarded_http(
        port,
        "GET",
        "/api/restore/no-such-restore",
        &[("x-functions-key", "admin-key")],
        None,
    )
    .await;
    assert_eq!(r.status.as_u16(), 404);
    stack.assert_no_secrets_in(&handler.logs());
}

/// Managed identity end to end: producer, worker and restore all with bearer tokens; every copy
/// source (source snapshots for the worker, backup snapshots and base blobs for the restore) is
/// authorised by a user-delegation SAS.
#[tokio::test]
async fn restore_with_managed_identity() {
    let stack = Stack::start(Mode::OAuthHttps).await;
    // In-process clients would not see IDENTITY_ENDPOINT (azure_identity reads the process
    // environment): producer and worker run as the CLI, like the restore.
    let env = stack.env();
    let src = stack.source();
    let c = unique_name("milake");
    src.create_container(&c).await.ok("create");
    let mut truth = Truth::new();
    put(&src, &c, "x/one.txt", b"one", &mut truth).await;
    put(&src, &c, "two.txt", b"two", &mut truth).await;
    cycle_cli(&env, &c).await;
    let t1 = mark().await;
    let truth1 = truth.clone();
    put(&src, &c, "two.txt", b"two, second version", &mut truth).await;
    put(&src, &c, "three.txt", b"three", &mut truth).await;
    del(&src, &c, "x/one.txt", &mut truth).await;
    cycle_cli(&env, &c).await;
    let out = run_cli(&["reconcile", "--container", &c, "--output", "json"], &env).await;
    assert!(out.status.success(), "{out:?}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["tombstones_written"], 1, "{r:#}");
    let t2 = mark().await;

    for (t, expected) in [(t1, &truth1), (t2, &truth)] {
        let target = unique_name("mi");
        let out = run_cli(
            &[
                "restore",
                "--container",
                &c,
                "--at",
                &metadata::format_time(t),
                "--to-account",
                "BackupStorage",
                "--to-container",
                &target,
                "--output",
                "json",
            ],
            &env,
        )
        .await;
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(contents(&stack.backup(), &target).await, *expected);
        stack.assert_no_secrets_in(&String::from_utf8_lossy(&out.stderr));
    }

    // Verify and the drill with bearer tokens too.
    for args in [
        vec!["verify", "--container", c.as_str(), "--deep"],
        vec!["verify", "--restore-drill", "--container", c.as_str()],
    ] {
        let out = run_cli(&args, &env).await;
        assert!(
            out.status.success(),
            "{args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
        stack.assert_no_secrets_in(&String::from_utf8_lossy(&out.stderr));
    }
}

/// A version above the single-copy threshold goes through Put Block From URL + Put Block List,
/// with its content type and user metadata.
#[tokio::test]
async fn large_versions_restore_through_blocks() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let env = stack.env_with(&[
        ("LAKEGUARD_COPY_BLOCK_THRESHOLD_BYTES", "1048576"),
        ("LAKEGUARD_COPY_BLOCK_SIZE_BYTES", "1048576"),
    ]);
    let app = support::app(&env);
    let src = stack.source();
    let c = unique_name("big");
    src.create_container(&c).await.ok("create");
    let big: Vec<u8> = (0..(2 * 1024 * 1024 + 12345u32))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let mut truth = Truth::new();
    put(&src, &c, "big.parquet", &big, &mut truth).await;
    cycle(&app, &c).await;
    let t = mark().await;
    put(&src, &c, "big.parquet", b"small now", &mut Truth::new()).await;
    cycle(&app, &c).await;

    let target = unique_name("bigdr");
    let report = restore::run(&app, &elsewhere(&app, &c, t, &target), no_progress())
        .await
        .unwrap();
    assert!(report.is_complete(), "{report:#?}");
    assert_eq!(contents(&stack.backup(), &target).await, truth);
    let head = stack
        .backup()
        .blob_properties(&target, "big.parquet", None)
        .await
        .ok("head");
    assert_eq!(
        head.header("content-type").as_deref(),
        Some("application/octet-stream")
    );
    assert_eq!(head.header("x-ms-meta-owner").as_deref(), Some("team-a"));
    assert!(head
        .header("x-ms-meta-lakeguard_restored_from_etag")
        .is_some());
}

/// A real interruption: the CLI is killed in the middle of a restore, then run again. The rerun
/// recognises every blob the first run wrote (`unchanged`) and copies only the rest.
#[tokio::test]
async fn killed_restore_resumes_without_doing_anything_twice() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let env = stack.env_with(&[("LAKEGUARD_CONCURRENCY", "1")]);
    let app = support::app(&stack.env());
    let src = stack.source();
    let c = unique_name("kill");
    src.create_container(&c).await.ok("create");
    let mut truth = Truth::new();
    const N: usize = 120;
    for i in 0..N {
        let name = format!("part-{i:03}.csv");
        put(&src, &c, &name, format!("row {i}\n").as_bytes(), &mut truth).await;
    }
    cycle(&app, &c).await;
    let t = mark().await;
    let target = unique_name("killed");
    let at = metadata::format_time(t);
    let args = [
        "restore",
        "--container",
        c.as_str(),
        "--at",
        at.as_str(),
        "--to-account",
        "BackupStorage",
        "--to-container",
        target.as_str(),
        "--output",
        "json",
    ];
    let mut child = tokio::process::Command::new(support::handler::lakeguard_bin())
        .args(args)
        .env_clear()
        .envs(support::azurite::base_env())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn lakeguard restore");
    let backup = stack.backup();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n = app
            .backup
            .list_page(&target, &Default::default(), None)
            .await
            .map(|p| p.entries.len())
            .unwrap_or(0);
        if n >= 5 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the restore finished before it could be interrupted"
        );
        assert!(std::time::Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().await.expect("kill");
    // Let a copy that was already on the wire land before counting.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let done_before = backup
        .list_blobs(&target, None)
        .await
        .iter()
        .filter(|b| b.snapshot.is_none())
        .count();
    assert!(
        done_before < N,
        "interrupted too late ({done_before} of {N})"
    );

    let out = run_cli(&args, &env).await;
    assert!(out.status.success(), "{out:?}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["plan"]["unchanged"], done_before as u64, "{}", r["plan"]);
    assert_eq!(r["plan"]["overwrite"], 0, "{}", r["plan"]);
    assert_eq!(
        r["execution"]["restored"],
        (N - done_before) as u64,
        "{}",
        r["execution"]
    );
    assert_eq!(contents(&backup, &target).await, truth);
}

/// Issue 15, defect 1: v1 snapshotted with its backup request still queued, v2 (corrupt)
/// written after T. The old in-place restore saw no backup row at T, called the blob absent
/// and deleted it *with the snapshot holding v1*. Now the source snapshot is history too (v1 is
/// restored from it), a blob is deleted only when proven absent, and a deleted blob's snapshots
/// whose versions the backup does not hold are copied to the undo area first.
#[tokio::test]
async fn in_place_restore_never_destroys_a_version_the_backup_lacks() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let env = stack.env();
    let app = support::app(&env);
    let src = stack.source();
    let c = unique_name("backlog");
    src.create_container(&c).await.ok("create container");
    let mut truth = Truth::new();
    put(&src, &c, "f.csv", b"version 1, good", &mut truth).await;
    // The producer snapshots and queues; nobody drains: v1 is only in its source snapshot.
    let r = ops::snapshot::run(&app, &c, None, no_progress())
        .await
        .unwrap();
    assert_eq!(r.enqueued, 1, "{r:?}");
    let t = mark().await;
    put(&src, &c, "f.csv", b"version 2, CORRUPT", &mut truth).await;
    // Created after T: one never seen by lakeguard, one snapshotted (its request queued too).
    put(&src, &c, "new.csv", b"garbage", &mut truth).await;
    put(&src, &c, "snapped.csv", b"garbage, snapshotted", &mut truth).await;
    let r = ops::snapshot::run(&app, &c, Some("snapped"), no_progress())
        .await
        .unwrap();
    assert_eq!(r.enqueued, 1, "{r:?}");
    let snapshots_of = |rows: &[support::rest::ListedBlob], name: &str| {
        rows.iter()
            .filter(|b| b.name == name && b.snapshot.is_some())
            .count()
    };
    let before = src.list_blobs(&c, None).await;
    assert_eq!(snapshots_of(&before, "f.csv"), 1);

    // Without a coverage record nothing proves the new blobs absent at T: they are left alone.
    app.backup
        .delete(
            lakeguard::settings::STATE_CONTAINER,
            &format!("coverage/{c}.json"),
            None,
            None,
            false,
        )
        .await
        .expect("remove the coverage record");
    let mut req = RestoreRequest::new(c.as_str(), t);
    req.force = true;
    req.dry_run = true;
    let plan = restore::run(&app, &req, no_progress()).await.unwrap();
    assert_eq!(
        (plan.plan.restore, plan.plan.delete, plan.plan.unavailable),
        (1, 0, 2),
        "{plan:#?}"
    );
    assert!(plan.history.coverage_since.is_none());

    // With coverage (a complete producer pass before T), the new blobs are proven absent.
    lakeguard::ops::state::record_coverage(&app, &c, t - time::Duration::minutes(5))
        .await
        .unwrap();
    req.dry_run = false;
    let report = restore::run(&app, &req, no_progress()).await.unwrap();
    assert!(report.is_complete(), "{report:#?}");
    let exec = report.execution.as_ref().unwrap();
    assert_eq!((exec.restored, exec.deleted), (1, 2), "{report:#?}");
    assert_eq!(exec.undo_snapshot_copies, 1, "{report:#?}");
    // f.csv holds v1 again, read from the source snapshot; that snapshot still exists.
    let f = src.get_blob(&c, "f.csv", None).await.ok("get f").body;
    assert_eq!(f, b"version 1, good");
    let after = src.list_blobs(&c, None).await;
    assert!(snapshots_of(&after, "f.csv") >= 1, "{after:?}");
    assert!(after
        .iter()
        .all(|b| b.name != "new.csv" && b.name != "snapped.csv"));
    // The deleted blobs and the snapshot holding a version the backup lacked were copied first.
    let undo = stack.backup().list_blobs(RESERVED_CONTAINER, None).await;
    let kept = |part: &str| {
        undo.iter()
            .filter(|b| b.name.starts_with(&report.id) && b.name.contains(part))
            .count()
    };
    assert_eq!(kept(&format!("/undo/{c}/new.csv")), 1, "{undo:?}");
    assert_eq!(kept(&format!("/undo/{c}/snapped.csv")), 1, "{undo:?}");
    assert_eq!(kept("/undo-snapshots/"), 1, "{undo:?}");
    let copy = undo
        .iter()
        .find(|b| b.name.contains("/undo-snapshots/"))
        .unwrap();
    assert_eq!(
        stack
            .backup()
            .get_blob(RESERVED_CONTAINER, &copy.name, None)
            .await
            .ok("undo snapshot copy")
            .body,
        b"garbage, snapshotted"
    );
    // The queued requests still run: v1's is kept in the backup's history.
    let d = ops::backup::drain(&app, &app.queue, no_progress())
        .await
        .unwrap();
    assert_eq!(d.poisoned, 0, "{d:?}");
}

#[tokio::test]
async fn restore_times_in_the_future_or_unwritable_are_invalid_input() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let env = stack.env();
    let c = unique_name("times");
    stack.source().create_container(&c).await.ok("create");
    let future = metadata::format_time(OffsetDateTime::now_utc() + time::Duration::hours(1));
    for at in [future.as_str(), "0000-01-01T00:00:00+01:00"] {
        let out = run_cli(
            &["restore", "--container", &c, "--at", at, "--dry-run"],
            &env,
        )
        .await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{at}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            stderr.contains("future") || stderr.contains("years 1-9999"),
            "{at}: {stderr}"
        );
    }
}

/// Issue 16, item 4: a restore started over HTTP survives its instance. The plan is stored in
/// chunks and carried out from the continuation queue: kill the instance while a chunk runs,
/// start another, and the restore finishes exactly once; a chunk whose work was done but not
/// recorded (the instance died in between) is redone to the same end, not counted twice.
#[tokio::test]
async fn an_http_restore_survives_its_instance_being_killed_and_finishes_once() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let env = stack.env_with(&[("LAKEGUARD_RESTORE_CHUNK_ITEMS", "1")]);
    let app = support::app(&env);
    let h = build_history(&stack, &app).await;
    let c = &h.container;
    let (t1, truth1) = &h.points[0];
    let first = support::Handler::spawn(&env).await;
    let target = unique_name("durable");
    let r = forwarded_http(
        first.port(),
        "POST",
        "/api/restore",
        &[
            ("x-functions-key", "admin-key"),
            ("content-type", "application/json"),
        ],
        Some(
            serde_json::to_vec(&json!({
                "container": c, "at": metadata::format_time(*t1),
                "to_account": "BackupStorage", "to_container": target, "confirm": true
            }))
            .unwrap(),
        ),
    )
    .await;
    assert_eq!(r.status.as_u16(), 202, "{}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let queues = stack.queues();
    let rq = format!("{}-reconcile", stack.queue);
    assert_eq!(
        queues.message_count(&rq).await,
        truth1.len(),
        "one chunk per item"
    );

    // One chunk carried out in process, then its record lost: as if the instance died after
    // the work and before the record.
    let trigger = support::QueueTrigger::reconcile_worker(&queues, first.port(), &rq);
    let text = match trigger.run_once().await {
        Some(support::host::Delivery::Succeeded { text, .. }) => text,
        other => panic!("the chunk did not run: {other:?}"),
    };
    let chunk: Value = serde_json::from_str(&text).unwrap();
    let record = format!("{id}/done/{:06}.json", chunk["chunk"].as_u64().unwrap());
    app.backup
        .delete(RESERVED_CONTAINER, &record, None, None, false)
        .await
        .unwrap();
    queues
        .send_message(
            &rq,
            &base64::engine::general_purpose::STANDARD.encode(&text),
        )
        .await
        .ok("requeue");

    // The first instance dies while it carries out a chunk.
    let killer = async {
        tokio::time::sleep(Duration::from_millis(30)).await;
        first.kill();
    };
    let deliver_until_it_dies = async {
        while let Some(d) = trigger.run_once().await {
            if !matches!(d, support::host::Delivery::Succeeded { .. }) {
                break;
            }
        }
    };
    tokio::join!(deliver_until_it_dies, killer);
    // Another instance takes over what is left (and what the dead one held, once visible).
    let second = support::Handler::spawn(&env).await;
    let trigger = support::QueueTrigger::reconcile_worker(&queues, second.port(), &rq);
    for _ in 0..20 {
        let d = trigger.drain(50).await;
        assert_eq!(d.poisoned, 0, "{d:#?}");
        if queues.message_count(&rq).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let last = status_of(second.port(), &id).await;
    assert_eq!(last["state"], "succeeded", "{last:#}");
    assert_eq!(last["chunks_done"], truth1.len() as u64, "{last:#}");
    let exec = &last["report"]["execution"];
    assert_eq!(
        exec["restored"],
        truth1.len() as u64,
        "each item counted once: {last:#}"
    );
    assert_eq!(exec["failed"], 0, "{last:#}");
    assert_eq!(exec["changed_since_plan"], 0, "{last:#}");
    assert_eq!(contents(&stack.backup(), &target).await, *truth1);
    // The final status is stored: a second read is the same, from the document.
    assert_eq!(
        status_of(second.port(), &id).await["report"],
        last["report"]
    );
}
