//! `lakeguard usage` against a real Azurite: a small history built by the real producer, worker
//! and reconcile, whose counts and bytes are known exactly; and the transaction model checked
//! against the blob requests a real full and incremental run make (counted by a proxy).

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use lakeguard::app::App;
use lakeguard::core::usage::Requests;
use lakeguard::ops::usage::{self, UsageOptions};
use lakeguard::ops::{self, no_progress};
use serde_json::Value;
use support::app::cycle;
use support::counting_proxy::ProxiedRequest;
use support::{run_cli, unique_name, Mode, Stack};
use time::OffsetDateTime;

/// The Blob Storage price category of one request (Microsoft's "Map each REST operation to a
/// price", general-purpose v2); `None` for the free ones (Delete Blob).
fn category(r: &ProxiedRequest) -> Option<&'static str> {
    // Azurite reading a Copy Blob From URL's source: the source account's read.
    if r.is_azurite_self() {
        return Some("read");
    }
    let cat = match (
        r.method.as_str(),
        r.restype().as_deref(),
        r.comp().as_deref(),
    ) {
        ("GET", _, Some("list")) => "list",
        ("PUT", Some("container"), None) => "list",
        ("GET" | "HEAD", Some("container"), None) => "other",
        ("PUT", _, Some("snapshot" | "metadata")) => "other",
        ("PUT", _, Some("block" | "blocklist")) => "write",
        ("PUT", None, None) => "write",
        ("HEAD", None, None) => "other",
        ("GET", None, None) => "read",
        ("DELETE", _, _) => return None,
        other => panic!("unexpected request {other:?}: {r:?}"),
    };
    Some(cat)
}

fn measured(requests: &[ProxiedRequest]) -> BTreeMap<&'static str, u64> {
    let mut out = BTreeMap::new();
    for r in requests {
        if let Some(c) = category(r) {
            *out.entry(c).or_default() += 1;
        }
    }
    out
}

fn modelled(r: &Requests) -> BTreeMap<&'static str, u64> {
    [
        ("list", r.list),
        ("write", r.write),
        ("read", r.read),
        ("other", r.other),
    ]
    .into_iter()
    .filter(|(_, n)| *n > 0)
    .collect()
}

async fn report(app: &App, c: &str, changed_percent: f64) -> usage::ContainerUsage {
    let r = usage::run(
        app,
        &UsageOptions {
            container: Some(c.to_owned()),
            changed_percent: Some(changed_percent),
        },
    )
    .await
    .expect("usage");
    assert_eq!(r.containers.len(), 1);
    r.containers.into_iter().next().unwrap()
}

#[tokio::test]
async fn usage_counts_the_backup_exactly_and_models_the_runs_requests() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let proxy = stack.blob_proxy();
    let env = stack.env_via_proxy(&proxy);
    let src = stack.source();
    // The state container exists already (a first state write creates it on demand).
    let warm = unique_name("warm");
    src.create_container(&warm).await.ok("create");
    src.put_blob(&warm, "x", b"x", &[]).await.ok("put");
    cycle(&support::app(&env), &warm).await;

    let c = unique_name("usage");
    src.create_container(&c).await.ok("create");
    for (name, data) in [
        ("a.txt", &b"a version 1"[..]),
        ("b.txt", b"bb v1"),
        ("c.txt", b"c1"),
    ] {
        src.put_blob(&c, name, data, &[("owner", "team-a")])
            .await
            .ok("put");
    }
    // A full run (everything is new), in a fresh worker process.
    proxy.reset();
    cycle(&support::app(&env), &c).await;
    let full = measured(&proxy.requests());
    let app = support::app(&env);
    let u = report(&app, &c, 50.0).await;
    assert_eq!(u.forecast.full_run.blobs, 3);
    assert_eq!(
        full,
        modelled(&u.forecast.full_run.requests),
        "the full run's blob requests: {:#?}",
        proxy.requests()
    );
    let after_first = OffsetDateTime::now_utc();
    tokio::time::sleep(Duration::from_millis(2100)).await;

    // An incremental run: one of the (then two) live blobs changed, `b.txt` deleted.
    src.put_blob(&c, "a.txt", b"a version 2, longer", &[])
        .await
        .ok("put");
    src.delete_blob(&c, "b.txt").await.ok("delete");
    proxy.reset();
    let app2 = support::app(&env);
    let r = ops::snapshot::run(&app2, &c, None, no_progress())
        .await
        .unwrap();
    assert_eq!(r.listing, "since the previous complete run", "{r:?}");
    assert_eq!(r.enqueued, 1, "{r:?}");
    ops::backup::drain(&app2, &app2.queue, no_progress())
        .await
        .unwrap();
    let incremental = measured(&proxy.requests());
    let opts = ops::reconcile::RunOptions {
        container: Some(c.clone()),
        ..Default::default()
    };
    let rec = ops::reconcile::run(&app, &opts, no_progress())
        .await
        .unwrap();
    assert_eq!(rec.tombstones_written, 1, "{rec:?}");

    // 2 live blobs, 50 %: one changed blob, as above.
    let u = report(&app, &c, 50.0).await;
    assert_eq!(u.forecast.incremental_run.blobs, 1);
    assert_eq!(
        incremental,
        modelled(&u.forecast.incremental_run.requests),
        "the incremental run's blob requests"
    );
    let t = &u.tally;
    // a.txt: v2 current (19 B), v1 history (11 B); c.txt current (2 B); b.txt tombstoned: its
    // base and the snapshot kept before the tombstone, both v1 (5 B), sharing their blocks.
    assert_eq!(
        (
            t.backup_current.rows,
            t.backup_current.versions,
            t.backup_current.bytes
        ),
        (2, 2, 21)
    );
    assert_eq!(
        (
            t.backup_history.rows,
            t.backup_history.versions,
            t.backup_history.bytes
        ),
        (1, 1, 11)
    );
    assert_eq!(t.tombstoned_names, 1);
    assert_eq!(
        (
            t.backup_tombstoned.rows,
            t.backup_tombstoned.versions,
            t.backup_tombstoned.bytes
        ),
        (2, 1, 10)
    );
    assert_eq!(t.backup_shared_bytes, 5);
    // lakeguard's source snapshots: a v1, a v2, c v1; only a v1 differs from its live blob.
    assert_eq!(
        (
            t.source_snapshots.snapshots,
            t.source_snapshots.bytes,
            t.source_snapshots.billed_at_most
        ),
        (3, 32, 11)
    );
    assert_eq!((t.source_live.rows, t.source_live.bytes), (2, 21));
    assert_eq!(t.undo_snapshots.snapshots, 0);
    assert_eq!(t.billed_bytes(), 21 + 11 + 10 - 5 + 11);
    let billed_gb = 48.0 / (1u64 << 30) as f64;
    assert!((u.forecast.billed_gb - billed_gb).abs() < 1e-15);

    // The oldest restorable point: after the coverage start, and a restore from there on
    // answers for every name with data.
    let coverage = u
        .coverage_since
        .expect("the first full run recorded coverage");
    let oldest = u.oldest_restorable.expect("an oldest restorable point");
    assert!(
        oldest >= coverage && oldest <= after_first,
        "{oldest} {coverage}"
    );
    let target = unique_name("at-oldest");
    let mut req = ops::restore::RestoreRequest::new(c.as_str(), oldest + time::Duration::SECOND);
    req.to = Some(ops::restore::TargetSpec {
        store: app.backup.clone(),
        container: target,
    });
    req.dry_run = true;
    let plan = ops::restore::run(&app, &req, no_progress()).await.unwrap();
    assert_eq!(
        (plan.plan.restore, plan.plan.unavailable),
        (3, 0),
        "{plan:#?}"
    );

    // The CLI: JSON for scripts, text for a terminal; totals include the bookkeeping.
    let out = run_cli(&["usage", "--container", &c, "--output", "json"], &env).await;
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["containers"][0]["backup_current"]["versions"], 2, "{v:#}");
    assert_eq!(v["total"]["tombstoned_names"], 1, "{v:#}");
    assert!(v["state"]["blobs"].as_u64().unwrap() > 0, "{v:#}");
    assert!(v["total_forecast"]["storage_month_usd"].as_f64().unwrap() > 0.0);
    assert_eq!(v["prices"]["gb_month"], 0.0208);
    let out = run_cli(&["usage", "--container", &c], &env).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains("oldest restorable point") && text.contains("incremental (1%)"),
        "{text}"
    );
    stack.assert_no_secrets_in(&text);
    // Bad input is exit 2.
    for args in [
        &["usage", "--container", "lakeguard-state"][..],
        &["usage", "--changed-percent", "150"],
    ] {
        let out = run_cli(args, &env).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    }
}
