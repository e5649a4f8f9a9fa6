//! `lakeguard verify` against a real Azurite: passes on a healthy backup, reports pending
//! versions with their lag, fails (non-zero exit) on a missing backup and, with --deep, on a
//! corrupted one; the restore drill restores a sample, compares it and cleans up.

mod support;

use std::process::Output;

use lakeguard::app::App;
use lakeguard::ops::{self, no_progress};
use serde_json::Value;
use support::{run_cli, unique_name, Mode, Stack};

async fn cycle(app: &App, container: &str) {
    let r = ops::snapshot::run(app, container, None, no_progress())
        .await
        .unwrap();
    assert!(r.is_complete(), "{r:?}");
    let d = ops::backup::drain(app, &app.queue, no_progress())
        .await
        .unwrap();
    assert_eq!(d.poisoned, 0, "{d:?}");
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

async fn verify(env: &[(String, String)], args: &[&str]) -> (Option<i32>, Value) {
    let mut all = vec!["verify"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--output", "json"]);
    let out = run_cli(&all, env).await;
    (out.status.code(), json(&out))
}

async fn drill_containers(app: &App) -> Vec<String> {
    let (names, _) = app.backup.list_containers_page(None).await.unwrap();
    names
        .into_iter()
        .filter(|n| n.starts_with(ops::verify::DRILL_PREFIX))
        .collect()
}

#[tokio::test]
async fn verify_coverage_integrity_and_restore_drill() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let env = stack.env();
    let app = support::app(&env);
    let src = stack.source();
    let c = unique_name("verify");
    src.create_container(&c).await.ok("create");
    for (name, data) in [
        ("a.txt", "alpha"),
        ("dir/b.csv", "bravo,1\n"),
        ("c.bin", "charlie"),
    ] {
        src.put_blob(&c, name, data.as_bytes(), &[("k", "v")])
            .await
            .ok("put");
    }
    src.put_blob(&c, "dir", b"", &[("hdi_isfolder", "true")])
        .await
        .ok("placeholder");
    cycle(&app, &c).await;

    // Healthy, deep.
    let (code, r) = verify(&env, &["--container", &c, "--deep"]).await;
    assert_eq!(code, Some(0), "{r:#}");
    assert_eq!(r["source_blobs"], 3, "the placeholder is not data: {r:#}");
    assert_eq!(r["covered"], 3);
    assert_eq!(r["deep"]["checked"], 3);
    assert_eq!(r["deep"]["matched"], 3);
    let (code, r) = verify(&env, &["--container", &c, "--deep", "--sample", "1"]).await;
    assert_eq!(code, Some(0), "{r:#}");
    assert_eq!(r["deep"]["checked"], 1, "{r:#}");

    // A new version snapshotted and queued but not yet copied: pending, with its lag; still OK.
    src.put_blob(&c, "a.txt", b"alpha 2", &[]).await.ok("put");
    let p = ops::snapshot::run(&app, &c, None, no_progress())
        .await
        .unwrap();
    assert_eq!(p.enqueued, 1);
    let (code, r) = verify(&env, &["--container", &c]).await;
    assert_eq!(code, Some(0), "{r:#}");
    assert_eq!(r["pending"], 1, "{r:#}");
    assert_eq!(r["pending_blobs"][0]["name"], "a.txt");
    assert!(r["rpo_lag_secs"].as_i64().unwrap() >= 0);
    ops::backup::drain(&app, &app.queue, no_progress())
        .await
        .unwrap();

    // A changed blob that nobody snapshotted: missing, exit 1, with the RPO lag.
    src.put_blob(&c, "c.bin", b"charlie 2", &[]).await.ok("put");
    let (code, r) = verify(&env, &["--container", &c]).await;
    assert_eq!(code, Some(1), "{r:#}");
    assert_eq!(r["missing"], 1, "{r:#}");
    assert_eq!(r["missing_blobs"], serde_json::json!(["c.bin"]));
    cycle(&app, &c).await;

    // A backup blob deleted behind lakeguard's back while its request marker is still fresh. The
    // backup queue is empty, so nothing can be pending: it is reported missing (exit 1), not
    // pending and never backed up.
    stack
        .backup()
        .delete_blob(&c, "dir/b.csv")
        .await
        .ok("delete backup");
    let (code, r) = verify(&env, &["--container", &c]).await;
    assert_eq!(code, Some(1), "{r:#}");
    assert_eq!(r["covered"], 2, "{r:#}");
    assert_eq!(r["pending"], 0, "{r:#}");
    assert_eq!(
        r["missing_blobs"],
        serde_json::json!(["dir/b.csv"]),
        "{r:#}"
    );
    src.put_blob(&c, "dir/b.csv", b"bravo,2\n", &[])
        .await
        .ok("put");
    cycle(&app, &c).await;
    let (code, r) = verify(&env, &["--container", &c, "--deep"]).await;
    assert_eq!(code, Some(0), "{r:#}");
    assert_eq!(r["covered"], 3, "{r:#}");

    // Restore drill on the healthy backup: restores a sample, compares, cleans up.
    let (code, r) = verify(
        &env,
        &["--restore-drill", "--container", &c, "--sample", "2"],
    )
    .await;
    assert_eq!(code, Some(0), "{r:#}");
    let d = &r["containers"][0];
    assert_eq!(d["sampled"], 2, "{r:#}");
    assert_eq!(d["restored"], 2);
    assert_eq!(d["matched"], 2);
    assert_eq!(d["cleaned_up"], true);
    assert!(drill_containers(&app).await.is_empty());

    // A backup corrupted behind lakeguard's back (content replaced, metadata kept): coverage
    // cannot see it, --deep and the drill do.
    let backup = stack.backup();
    let listed = backup.list_blobs(&c, Some("a.txt")).await;
    let base = listed
        .iter()
        .find(|b| b.name == "a.txt" && b.snapshot.is_none())
        .unwrap();
    let meta: Vec<(&str, &str)> = base
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    backup
        .put_blob(&c, "a.txt", b"bit rot", &meta)
        .await
        .ok("corrupt");
    let (code, r) = verify(&env, &["--container", &c]).await;
    assert_eq!(code, Some(0), "coverage alone trusts metadata: {r:#}");
    let (code, r) = verify(&env, &["--container", &c, "--deep"]).await;
    assert_eq!(code, Some(1), "{r:#}");
    assert_eq!(r["deep"]["mismatched"], 1, "{r:#}");
    assert_eq!(r["deep"]["mismatches"][0]["name"], "a.txt");
    let (code, r) = verify(
        &env,
        &["--restore-drill", "--container", &c, "--sample", "10"],
    )
    .await;
    assert_eq!(code, Some(1), "{r:#}");
    assert_eq!(r["containers"][0]["mismatched"], 1, "{r:#}");
    assert_eq!(r["containers"][0]["cleaned_up"], true);
    assert!(drill_containers(&app).await.is_empty());

    // Text output for people.
    let out = run_cli(&["verify", "--container", &c, "--deep"], &env).await;
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("FAILED") && text.contains("different: a.txt"),
        "{text}"
    );
}

#[tokio::test]
async fn verify_refuses_unknown_container() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let out = run_cli(
        &["verify", "--container", &unique_name("nope")],
        &stack.env(),
    )
    .await;
    assert_ne!(out.status.code(), Some(0));
    let out = run_cli(&["verify"], &stack.env()).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
