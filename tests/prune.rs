//! Retention and pruning against a real Azurite: histories built by the real producer and
//! worker, pruned by `lakeguard prune` with small policies, checked through the REST oracle and
//! by restores at the instants the policy promises.

mod support;

use std::time::Duration;

use lakeguard::app::App;
use lakeguard::ops::{self, no_progress};
use serde_json::Value;
use support::app::{cycle, mark};
use support::{run_cli, unique_name, Mode, Stack, StorageRest};
use time::OffsetDateTime;

fn snapshots(rows: &[support::rest::ListedBlob], name: &str) -> usize {
    rows.iter()
        .filter(|b| b.name == name && b.snapshot.is_some())
        .count()
}

async fn prune(env: &[(String, String)], args: &[&str]) -> (Option<i32>, Value) {
    let mut all = vec!["prune", "--output", "json"];
    all.extend_from_slice(args);
    let out = run_cli(&all, env).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "prune printed no JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), v)
}

async fn restore_at(
    stack: &Stack,
    env: &[(String, String)],
    c: &str,
    at: OffsetDateTime,
) -> (Option<i32>, Vec<u8>) {
    let target = unique_name("pr");
    let out = run_cli(
        &[
            "restore",
            "--container",
            c,
            "--at",
            &lakeguard::model::metadata::format_time(at),
            "--to-container",
            &target,
            "--from",
            "backup-only",
            "--output",
            "json",
        ],
        env,
    )
    .await;
    let body = stack.source().get_blob(&target, "f.csv", None).await.body;
    (out.status.code(), body)
}

/// Five versions of `f.csv` (and a foreign snapshot nobody may touch), each backed up, with
/// the instant after each; plus `g.csv`, whose second version's backup is lost.
async fn history(stack: &Stack, app: &App) -> (String, Vec<OffsetDateTime>) {
    let src = stack.source();
    let c = unique_name("prune");
    src.create_container(&c).await.ok("create");
    let mut points = Vec::new();
    for i in 0..5 {
        src.put_blob(&c, "f.csv", format!("version {i}").as_bytes(), &[])
            .await
            .ok("put");
        if i == 0 {
            src.put_blob(&c, "g.csv", b"g version 0", &[])
                .await
                .ok("put g");
        }
        if i == 3 {
            src.put_blob(&c, "g.csv", b"g version 1", &[])
                .await
                .ok("put g");
        }
        cycle(app, &c).await;
        points.push(mark().await);
    }
    // Someone else's snapshot of f.csv: never touched.
    src.snapshot_blob(&c, "f.csv").await.ok("foreign snapshot");
    (c, points)
}

#[tokio::test]
async fn prune_keeps_what_the_policy_promises_and_nothing_else() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let env = stack.env();
    let app = support::app(&env);
    let (c, points) = history(&stack, &app).await;
    let (src, bak): (StorageRest, StorageRest) = (stack.source(), stack.backup());
    assert_eq!(snapshots(&bak.list_blobs(&c, None).await, "f.csv"), 4);
    assert_eq!(snapshots(&src.list_blobs(&c, None).await, "f.csv"), 6);
    // g.csv's newest backup copy is lost: its source snapshot of that version must stay.
    let p = app.backup.properties(&c, "g.csv", None).await.unwrap();
    app.backup
        .delete(&c, "g.csv", None, Some(&p.etag), true)
        .await
        .unwrap();
    let policy = [
        "--container",
        &c,
        "--keep",
        "last=2",
        "--keep-source",
        "last=1",
        "--tombstone-retention",
        "none",
    ];

    // A dry run plans and changes nothing.
    let mut dry = policy.to_vec();
    dry.extend(["--dry-run", "--max-delete", "100"]);
    let (code, plan) = prune(&env, &dry).await;
    assert_eq!(code, Some(0), "{plan:#}");
    // Backup: f.csv's v0..v2 (last=2 keeps v3 and v4).
    assert_eq!(plan["planned"]["backup_snapshots"], 3, "{plan:#}");
    // Source (last=1): of f.csv's snapshots of v0..v3, only v3's version stays in the backup;
    // v0..v2 go from the backup in this same plan, so their source snapshots stay, as do g.csv's
    // v0 (its backup is lost) and every snapshot of the current versions.
    assert_eq!(plan["planned"]["source_snapshots"], 1, "{plan:#}");
    assert_eq!(plan["kept_not_in_backup"], 4, "{plan:#}");
    assert_eq!(plan["deleted"]["backup_snapshots"], 0);
    assert_eq!(snapshots(&bak.list_blobs(&c, None).await, "f.csv"), 4);

    // --max-delete refuses a plan bigger than expected: exit 3, nothing deleted.
    let mut capped = policy.to_vec();
    capped.extend(["--max-delete", "2"]);
    let (code, r) = prune(&env, &capped).await;
    assert_eq!(code, Some(3), "{r:#}");
    assert!(r["refused"].is_string(), "{r:#}");
    assert_eq!(snapshots(&bak.list_blobs(&c, None).await, "f.csv"), 4);

    // Carried out.
    let mut run = policy.to_vec();
    run.extend(["--max-delete", "100"]);
    let (code, r) = prune(&env, &run).await;
    assert_eq!(code, Some(0), "{r:#}");
    assert_eq!(r["deleted"]["backup_snapshots"], 3, "{r:#}");
    let b = bak.list_blobs(&c, None).await;
    assert_eq!(
        snapshots(&b, "f.csv"),
        1,
        "v3 as a snapshot, v4 as the base"
    );
    let s = src.list_blobs(&c, None).await;
    // f.csv: the foreign snapshot and the snapshots of versions the backup does not hold stay.
    let foreign = s
        .iter()
        .filter(|x| x.name == "f.csv" && x.snapshot.is_some())
        .filter(|x| !x.metadata.contains_key("lakeguard_source_etag"))
        .count();
    assert_eq!(foreign, 1, "someone else's snapshot is never touched");
    // g.csv's v1 is only in its source snapshot: kept.
    assert!(
        s.iter().any(|x| x.name == "g.csv" && x.snapshot.is_some()),
        "{s:?}"
    );
    assert_eq!(r["deleted"]["source_snapshots"], 1, "{r:#}");

    // The promised restore points still restore exactly: the last two versions.
    for (i, t) in points.iter().enumerate().skip(3) {
        let (code, body) = restore_at(&stack, &env, &c, *t).await;
        assert_eq!(code, Some(0), "T{i}");
        assert_eq!(body, format!("version {i}").into_bytes(), "T{i}");
    }
    // Run again: nothing left to do.
    let (code, r) = prune(&env, &run).await;
    assert_eq!(code, Some(0), "{r:#}");
    assert_eq!(r["planned"]["backup_snapshots"], 0, "{r:#}");
    assert_eq!(r["planned"]["source_snapshots"], 0, "{r:#}");
}

/// A prune killed mid-run leaves a state the next run handles: it finishes the job.
#[tokio::test]
async fn a_killed_prune_is_finished_by_the_next_run() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let env = stack.env_with(&[("LAKEGUARD_CONCURRENCY", "1")]);
    let app = support::app(&env);
    let (c, points) = history(&stack, &app).await;
    let args = [
        "prune",
        "--container",
        c.as_str(),
        "--keep",
        "last=1",
        "--keep-source",
        "none",
        "--max-delete",
        "100",
        "--output",
        "json",
    ];
    let mut child = tokio::process::Command::new(support::handler::lakeguard_bin())
        .args(args)
        .env_clear()
        .envs(support::azurite::base_env())
        .envs(env.iter().cloned())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn prune");
    // Kill it as soon as it has deleted something (or at the latest when it ends).
    let bak = stack.backup();
    for _ in 0..400 {
        if snapshots(&bak.list_blobs(&c, None).await, "f.csv") < 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
    let (code, r) = prune(&env, &args[1..args.len() - 2]).await;
    assert_eq!(code, Some(0), "{r:#}");
    assert_eq!(snapshots(&bak.list_blobs(&c, None).await, "f.csv"), 0);
    let (code, body) = restore_at(&stack, &env, &c, points[4]).await;
    assert_eq!((code, body), (Some(0), b"version 4".to_vec()));
}

/// The Prune function does nothing without a configured policy; PruneNow plans without
/// `confirm` and, with it, hands the container to continuation hops (ReconcileWorker).
#[tokio::test]
async fn prune_functions_plan_and_run_through_the_continuation_queue() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let env = stack.env();
    let app = support::app(&env);
    let (c, _) = history(&stack, &app).await;
    let handler = stack.handler().await;
    let r = support::host::invoke_raw(
        handler.port(),
        "Prune",
        &support::host::timer_invocation(false, None),
    )
    .await;
    assert!(r.status.is_success(), "{}", r.body);
    assert!(r.body.contains("no retention policy"), "{}", r.body);

    let env = stack.env_with(&[
        ("LAKEGUARD_RETENTION_BACKUP", "last=1"),
        ("LAKEGUARD_RETENTION_SOURCE_SNAPSHOTS", "none"),
        ("LAKEGUARD_PRUNE_MAX_DELETE_PERCENT", "100"),
    ]);
    let handler = support::Handler::spawn(&env).await;
    let port = handler.port();
    let call = |body: String| async move {
        support::host::forwarded_http(
            port,
            "POST",
            "/api/prune",
            &[
                ("x-functions-key", "admin"),
                ("content-type", "application/json"),
            ],
            Some(body.into_bytes()),
        )
        .await
    };
    let planned = call(format!("{{\"container\":\"{c}\"}}")).await;
    assert_eq!(planned.status.as_u16(), 200, "{}", planned.body);
    // f.csv's v0..v3 and g.csv's v0 (last=1).
    assert_eq!(planned.json()["report"]["planned"]["backup_snapshots"], 5);
    let bak = stack.backup();
    assert_eq!(snapshots(&bak.list_blobs(&c, None).await, "f.csv"), 4);
    // A limit the started prune would not apply is refused, not ignored.
    let limited = call(format!(
        "{{\"container\":\"{c}\",\"confirm\":true,\"max_delete\":0}}"
    ))
    .await;
    assert_eq!(limited.status.as_u16(), 400, "{}", limited.body);
    assert_eq!(snapshots(&bak.list_blobs(&c, None).await, "f.csv"), 4);
    let started = call(format!("{{\"container\":\"{c}\",\"confirm\":true}}")).await;
    assert_eq!(started.status.as_u16(), 202, "{}", started.body);
    let queues = stack.queues();
    let rq = format!("{}-reconcile", stack.queue);
    let hops = support::QueueTrigger::reconcile_worker(&queues, handler.port(), &rq)
        .drain(20)
        .await;
    assert_eq!((hops.failed, hops.poisoned), (0, 0), "{hops:#?}");
    let b = bak.list_blobs(&c, None).await;
    assert_eq!((snapshots(&b, "f.csv"), snapshots(&b, "g.csv")), (0, 0));
}

/// A version under an immutability policy (or legal hold) is left and reported as locked; the
/// run does not fail, and the rest is pruned.
#[tokio::test]
async fn locked_versions_are_skipped_and_reported_not_failed() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let proxy = stack.blob_proxy();
    let env = stack.env_via_proxy(&proxy);
    let app = support::app(&env);
    let (c, _) = history(&stack, &app).await;
    // The backup account answers the first snapshot delete as WORM-locked.
    proxy.answer_next(
        1,
        axum::http::StatusCode::CONFLICT,
        "BlobImmutableDueToPolicy",
        |method, target| {
            method == "DELETE" && target.starts_with("/backupacct/") && target.contains("snapshot=")
        },
    );
    let (code, r) = prune(
        &env,
        &[
            "--container",
            &c,
            "--keep",
            "last=1",
            "--keep-source",
            "none",
            "--max-delete",
            "100",
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{r:#}");
    assert_eq!(r["locked"], 1, "{r:#}");
    assert_eq!(r["failed"], 0, "{r:#}");
    assert_eq!(r["deleted"]["backup_snapshots"], 4, "{r:#}");
    assert_eq!(
        snapshots(&stack.backup().list_blobs(&c, None).await, "f.csv")
            + snapshots(&stack.backup().list_blobs(&c, None).await, "g.csv"),
        1
    );
}

/// A container with f.csv overwritten and new.csv created after T, restored in place to T: the
/// restore leaves an undo snapshot of f.csv, an undo copy of new.csv and two undo records.
async fn restored_in_place(
    stack: &Stack,
    app: &App,
    tag: &str,
) -> (String, ops::restore::RestoreReport) {
    let src = stack.source();
    let c = unique_name(tag);
    src.create_container(&c).await.ok("create");
    src.put_blob(&c, "f.csv", b"f version 1", &[])
        .await
        .ok("put");
    cycle(app, &c).await;
    let t = mark().await;
    src.put_blob(&c, "f.csv", b"f version 2", &[])
        .await
        .ok("put");
    src.put_blob(&c, "new.csv", b"created after t", &[])
        .await
        .ok("put");
    cycle(app, &c).await;
    let mut req = ops::restore::RestoreRequest::new(c.as_str(), t);
    req.force = true;
    let r = ops::restore::run(app, &req, no_progress()).await.unwrap();
    assert!(r.is_complete(), "{r:#?}");
    (c, r)
}

/// Issue 17, item 6: a restore's undo data (the undo snapshot in the source; the undo copy and
/// the undo records in the backup account) is kept while younger than
/// `LAKEGUARD_UNDO_RETENTION`, then pruned with the rest of the restore's bookkeeping.
#[tokio::test]
async fn prune_keeps_undo_data_younger_than_the_undo_retention() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let app = support::app(&stack.env());
    let (c, r) = restored_in_place(&stack, &app, "undokeep").await;
    let id = r.id.clone();
    let undo_data = || {
        let (src, backup, c, id) = (stack.source(), stack.backup(), c.clone(), id.clone());
        async move {
            let snapshots = src
                .list_blobs(&c, None)
                .await
                .iter()
                .filter(|b| b.metadata.get(ops::restore::RESTORE_UNDO) == Some(&id))
                .count();
            let kept = backup
                .list_blobs(ops::restore::RESERVED_CONTAINER, Some(&format!("{id}/")))
                .await
                .len();
            (snapshots, kept)
        }
    };
    // The undo snapshot of f.csv; the undo copy of new.csv and two undo records.
    assert_eq!(undo_data().await, (1, 3));

    let args = ["--container", c.as_str()];
    let (code, v) = prune(
        &stack.env_with(&[("LAKEGUARD_UNDO_RETENTION", "1h")]),
        &args,
    )
    .await;
    assert_eq!(code, Some(0), "{v:#}");
    assert_eq!(v["deleted"]["bookkeeping"], 0, "{v:#}");
    assert_eq!(
        undo_data().await,
        (1, 3),
        "younger than the retention: kept"
    );

    // Restore ids carry their start to the second: 3 s later they are older than 2 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (code, v) = prune(
        &stack.env_with(&[("LAKEGUARD_UNDO_RETENTION", "2s")]),
        &args,
    )
    .await;
    assert_eq!(code, Some(0), "{v:#}");
    assert!(v["deleted"]["bookkeeping"].as_u64().unwrap() >= 4, "{v:#}");
    assert_eq!(
        undo_data().await,
        (0, 0),
        "older than the retention: pruned"
    );
}

/// A started prune (timer, HTTP) answers before the bookkeeping is pruned: that is a hop of
/// its own, continued a page at a time, so a year of records cannot outlast the invocation.
#[tokio::test]
async fn started_prune_hands_the_bookkeeping_to_hops_that_continue_a_page_at_a_time() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let app = support::app(&stack.env());
    let (c, r) = restored_in_place(&stack, &app, "bookhops").await;
    let kept = || {
        let (backup, prefix) = (stack.backup(), format!("{}/", r.id));
        async move {
            backup
                .list_blobs(ops::restore::RESERVED_CONTAINER, Some(&prefix))
                .await
                .len()
        }
    };
    assert_eq!(kept().await, 3, "an undo copy and two undo records");
    tokio::time::sleep(Duration::from_secs(3)).await;

    let env = stack.env_with(&[
        ("LAKEGUARD_RETENTION_BACKUP", "last=5"),
        ("LAKEGUARD_UNDO_RETENTION", "2s"),
        ("LAKEGUARD_RECONCILE_BUDGET_SECS", "0"),
        ("LAKEGUARD_LIST_PAGE_SIZE", "1"),
    ]);
    let handler = support::Handler::spawn(&env).await;
    let started = support::host::forwarded_http(
        handler.port(),
        "POST",
        "/api/prune",
        &[
            ("x-functions-key", "admin"),
            ("content-type", "application/json"),
        ],
        Some(format!("{{\"container\":\"{c}\",\"confirm\":true}}").into_bytes()),
    )
    .await;
    assert_eq!(started.status.as_u16(), 202, "{}", started.body);
    let report = &started.json()["report"];
    assert_eq!(report["continuations_queued"], 2, "{report:#}");
    assert_eq!(report["deleted"]["bookkeeping"], 0, "{report:#}");
    assert_eq!(kept().await, 3, "nothing pruned inside the call");

    let rq = format!("{}-reconcile", stack.queue);
    let hops = support::QueueTrigger::reconcile_worker(&stack.queues(), handler.port(), &rq)
        .drain(50)
        .await;
    assert_eq!((hops.failed, hops.poisoned), (0, 0), "{hops:#?}");
    // One hop for the container, and with no budget a page (one record) per bookkeeping hop.
    assert!(hops.succeeded >= 4, "{hops:#?}");
    assert_eq!(kept().await, 0, "older than the undo retention: pruned");
}
