//! `lakeguard verify` against a real Azurite: passes on a healthy backup, reports pending
//! versions with their lag, fails (non-zero exit) on a missing backup and, with --deep, on a
//! corrupted one; the restore drill restores a sample, compares it and cleans up.

mod support;

use std::process::Output;

use lakeguard::app::App;
use lakeguard::ops::{self, no_progress};
use serde_json::Value;
use support::app::cycle;
use support::{run_cli, unique_name, Mode, Stack};

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

/// Item 7 of issue 15: `--deep` compares base blobs only, so a damaged version in the backup's
/// history (a backup snapshot whose content is not the source snapshot it names, or not its own
/// Content-MD5) passes it unnoticed; `--history` hashes every backup snapshot against what it
/// claims, reports each bad version with counts, and exits 1.
#[tokio::test]
async fn history_finds_a_damaged_backup_version_that_deep_does_not() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let env = stack.env();
    let app = support::app(&env);
    let src = stack.source();
    let bk = stack.backup();
    let c = unique_name("history");
    src.create_container(&c).await.ok("create");
    src.put_blob(&c, "a.txt", b"first", &[]).await.ok("put v1");
    cycle(&app, &c).await;
    src.put_blob(&c, "a.txt", b"second", &[]).await.ok("put v2");
    cycle(&app, &c).await;
    let (code, r) = verify(&env, &["--container", &c, "--deep", "--history"]).await;
    assert_eq!(code, Some(0), "{r:#}");
    assert_eq!(r["history"]["versions"], 1, "{r:#}");
    assert_eq!(r["history"]["compared_with_source"], 1, "{r:#}");

    // The REST oracle makes two bad history versions, then puts the base back as it was.
    let listing = bk.list_blobs(&c, None).await;
    let meta_of = |snapshot: bool| {
        let row = listing
            .iter()
            .find(|b| b.name == "a.txt" && b.snapshot.is_some() == snapshot)
            .unwrap();
        row.metadata
            .iter()
            .map(|(k, v)| (format!("x-ms-meta-{k}"), v.clone()))
            .collect::<Vec<_>>()
    };
    let (v1_meta, v2_meta) = (meta_of(true), meta_of(false));
    let put = |data: &'static [u8],
               meta: Vec<(String, String)>,
               extra: Vec<(&'static str, &'static str)>| {
        let bk = bk.clone();
        let c = c.clone();
        async move {
            let mut headers: Vec<(&str, &str)> = vec![("x-ms-blob-type", "BlockBlob")];
            headers.extend(extra);
            headers.extend(meta.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            bk.send(
                reqwest::Method::PUT,
                &format!("/{c}/a.txt"),
                &[],
                &headers,
                data.to_vec(),
            )
            .await
            .ok("put backup");
        }
    };
    // 1: claims to be v1 (names its source snapshot) but holds other bytes.
    put(b"tampered", v1_meta.clone(), vec![]).await;
    bk.snapshot_blob(&c, "a.txt").await.ok("snapshot");
    // 2: names no source snapshot (a live-blob copy), Content-MD5 not of its content.
    let unnamed: Vec<(String, String)> = v1_meta
        .iter()
        .filter(|(k, _)| k != "x-ms-meta-lakeguard_source_snapshot")
        .cloned()
        .collect();
    put(b"rotten", unnamed, vec![]).await;
    // Set Blob Properties stores a Content-MD5 as given (Put Blob would check it).
    bk.send(
        reqwest::Method::PUT,
        &format!("/{c}/a.txt"),
        &[("comp", "properties")],
        &[("x-ms-blob-content-md5", "AAAAAAAAAAAAAAAAAAAAAA==")],
        vec![],
    )
    .await
    .ok("set a wrong Content-MD5");
    bk.snapshot_blob(&c, "a.txt").await.ok("snapshot");
    put(b"second", v2_meta, vec![]).await;

    let (code, r) = verify(&env, &["--container", &c, "--deep"]).await;
    assert_eq!(
        code,
        Some(0),
        "the base blob is fine, --deep sees nothing: {r:#}"
    );
    assert!(r.get("history").is_none());

    let (code, r) = verify(&env, &["--container", &c, "--history"]).await;
    assert_eq!(code, Some(1), "{r:#}");
    let h = &r["history"];
    assert_eq!(
        (
            &h["versions"],
            &h["checked"],
            &h["matched"],
            &h["mismatched"]
        ),
        (&3.into(), &3.into(), &1.into(), &2.into()),
        "{r:#}"
    );
    assert_eq!(
        (&h["source_mismatches"], &h["md5_mismatches"]),
        (&1.into(), &1.into()),
        "{r:#}"
    );
    assert_eq!(
        (&h["compared_with_source"], &h["source_unnamed"]),
        (&2.into(), &1.into()),
        "{r:#}"
    );
    let problems = h["mismatches"].to_string();
    assert!(
        problems.contains("content differs from source snapshot"),
        "{problems}"
    );
    assert!(problems.contains("Content-MD5"), "{problems}");

    let (code, r) = verify(&env, &["--container", &c, "--history", "--sample", "1"]).await;
    assert_eq!(r["history"]["checked"], 1, "{r:#}");
    assert!(code == Some(0) || code == Some(1), "{r:#}");

    let out = run_cli(&["verify", "--container", &c, "--history"], &env).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("history: 3 backup versions") && text.contains("2 DIFFERENT"),
        "{text}"
    );
}
