//! `lakeguard demo`: the README's main job on an embedded default. Seeds a small data lake with
//! awkward names in the source account, runs the producer and the worker, and shows source and
//! backup side by side, damages and restores it, and ends with the usage report. Used against the local Azurite that `scripts/demo` starts.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::app::App;
use crate::model::metadata;
use crate::ops::{self, OpError};
use crate::storage::blob::ListOptions;

pub const DEMO_CONTAINER: &str = "demo-lake";

/// (name, content) of the demo lake: nested paths, spaces, `%`, `#`, `?`, `+`, unicode, and a
/// name that is a prefix of another.
pub fn demo_blobs() -> Vec<(&'static str, &'static str)> {
    vec![
        ("raw/2026/11/sales 01.csv", "id,amount\n1,10\n2,20\n"),
        ("raw/2026/11/sales 02.csv", "id,amount\n3,30\n"),
        ("raw/odd/100% #1?.txt", "percent, hash and question mark\n"),
        ("raw/odd/a+b=c.txt", "plus and equals\n"),
        ("raw/ünïcode/données €.json", "{\"ok\":true}\n"),
        ("curated/report.parquet", "PAR1 not really parquet PAR1"),
        ("curated/report.parquet.bak", "an older report"),
    ]
}

pub async fn seed(app: &App) -> Result<(), OpError> {
    app.source.ensure_container(DEMO_CONTAINER).await?;
    let mut folder = BTreeMap::new();
    folder.insert(metadata::HDI_ISFOLDER.to_owned(), "true".to_owned());
    app.source
        .upload(DEMO_CONTAINER, "raw/2026", vec![], None, &folder)
        .await?;
    for (name, content) in demo_blobs() {
        let mut meta = BTreeMap::new();
        meta.insert("producer".to_owned(), "demo-pipeline".to_owned());
        app.source
            .upload(
                DEMO_CONTAINER,
                name,
                content.as_bytes().to_vec(),
                Some("text/plain"),
                &meta,
            )
            .await?;
    }
    Ok(())
}

/// A side-by-side table of the source's base blobs and the backup's versions.
pub async fn side_by_side(app: &App, container: &str) -> Result<String, OpError> {
    let opts = ListOptions {
        metadata: true,
        ..Default::default()
    };
    let src = app.source.list_page(container, &opts, None).await?.entries;
    let bak = if app.backup.container_exists(container).await? {
        app.backup
            .list_page(
                container,
                &ListOptions {
                    metadata: true,
                    snapshots: true,
                    ..Default::default()
                },
                None,
            )
            .await?
            .entries
    } else {
        vec![]
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<34} {:<22} {:<22} {:>8}",
        "blob", "source version", "backup version", "history"
    );
    // Every name either side knows, so deletions (tombstones) show too.
    let names: std::collections::BTreeSet<&str> = src
        .iter()
        .map(|e| e.name.as_str())
        .chain(
            bak.iter()
                .filter(|b| b.snapshot.is_none())
                .map(|b| b.name.as_str()),
        )
        .collect();
    for name in names {
        let s = src.iter().find(|e| e.name == name);
        let current = bak.iter().find(|b| b.name == name && b.snapshot.is_none());
        let history = bak
            .iter()
            .filter(|b| b.name == name && b.snapshot.is_some())
            .count();
        let backup = match current {
            Some(b) if b.meta(metadata::DELETED_AT).is_some() => "(tombstone)".to_owned(),
            Some(b) => b
                .meta(metadata::SOURCE_ETAG)
                .map(|e| e.trim_matches('"').to_owned())
                .unwrap_or_else(|| "-".into()),
            None if s.is_some_and(|s| s.is_directory_placeholder()) => "(folder: skipped)".into(),
            None => "-".into(),
        };
        let source = s
            .map(|s| s.etag.as_str().to_owned())
            .unwrap_or_else(|| "(deleted)".into());
        let _ = writeln!(
            out,
            "{:<34} {:<22} {:<22} {:>8}",
            truncate(name, 34),
            source,
            backup,
            history
        );
    }
    Ok(out)
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        s.chars().take(n - 1).chain(std::iter::once('…')).collect()
    }
}

/// Seeds, snapshots, backs up, heals a missed change and a deletion with reconcile, and returns a
/// printable account of what happened.
pub async fn run(app: &App) -> Result<String, OpError> {
    let mut out = String::new();
    seed(app).await?;
    let _ = writeln!(
        out,
        "== seeded `{DEMO_CONTAINER}` with {} files and one folder placeholder",
        demo_blobs().len()
    );
    let snap = ops::snapshot::run(app, DEMO_CONTAINER, None, ops::no_progress()).await?;
    let _ = writeln!(
        out,
        "== SnapshotProducer: scanned {}, snapshotted {}, enqueued {}, unchanged {}, skipped {}, failed {}",
        snap.scanned, snap.snapshotted, snap.enqueued, snap.unchanged, snap.skipped, snap.failed
    );
    let drained = ops::backup::drain(app, &app.queue, ops::no_progress()).await?;
    let _ = writeln!(
        out,
        "== BackupWorker (drain): processed {}, backed up {}, already backed up {}, poisoned {}",
        drained.processed, drained.backed_up, drained.already_backed_up, drained.poisoned
    );
    let again = ops::snapshot::run(app, DEMO_CONTAINER, None, ops::no_progress()).await?;
    let _ = writeln!(
        out,
        "== SnapshotProducer again (nothing changed): enqueued {}, unchanged {}",
        again.enqueued, again.unchanged
    );
    // A producer pipeline writes a new version: the backup keeps the old one as history.
    let changed = "raw/2026/11/sales 01.csv";
    app.source
        .upload(
            DEMO_CONTAINER,
            changed,
            b"id,amount\n1,10\n2,20\n4,40\n".to_vec(),
            Some("text/plain"),
            &BTreeMap::new(),
        )
        .await?;
    let snap = ops::snapshot::run(app, DEMO_CONTAINER, None, ops::no_progress()).await?;
    let drained = ops::backup::drain(app, &app.queue, ops::no_progress()).await?;
    let _ = writeln!(
        out,
        "== `{changed}` rewritten: producer enqueued {}, worker backed up {} (the previous backup version is kept as a backup snapshot)",
        snap.enqueued, drained.backed_up
    );
    // What the event path misses: a file rewritten and a file deleted with no pipeline run after.
    app.source
        .upload(
            DEMO_CONTAINER,
            "raw/2026/11/sales 02.csv",
            b"id,amount\n3,30\n5,50\n".to_vec(),
            Some("text/plain"),
            &BTreeMap::new(),
        )
        .await?;
    app.source
        .delete(DEMO_CONTAINER, "raw/odd/a+b=c.txt", None, None, true)
        .await?;
    let _ = writeln!(
        out,
        "== changed `raw/2026/11/sales 02.csv` and deleted `raw/odd/a+b=c.txt` without running the producer"
    );
    let opts = ops::reconcile::RunOptions {
        container: Some(DEMO_CONTAINER.into()),
        ..Default::default()
    };
    let healed = ops::reconcile::run(app, &opts, ops::no_progress()).await?;
    let _ = writeln!(out, "== Reconcile: {}", healed.summary());
    let drained = ops::backup::drain(app, &app.queue, ops::no_progress()).await?;
    let _ = writeln!(
        out,
        "== BackupWorker (drain): processed {}, backed up {}",
        drained.processed, drained.backed_up
    );
    let again = ops::reconcile::run(app, &opts, ops::no_progress()).await?;
    let _ = writeln!(
        out,
        "== Reconcile again: in sync {}, enqueued {}, already tombstoned {}, RPO lag {} s",
        again.tally.in_sync,
        again.requests_enqueued,
        again.tally.already_tombstoned,
        again.rpo_lag_secs
    );
    let _ = writeln!(out, "\n{}", side_by_side(app, DEMO_CONTAINER).await?);
    out.push_str(&restore_act(app).await?);
    // What the backup now holds, and what keeping it costs.
    let usage = ops::usage::run(
        app,
        &ops::usage::UsageOptions {
            container: Some(DEMO_CONTAINER.into()),
            changed_percent: None,
        },
    )
    .await?;
    let _ = writeln!(
        out,
        "\n== lakeguard usage --container {DEMO_CONTAINER}:\n{}",
        ops::usage::text(&usage)
    );
    Ok(out)
}

/// The second act: damage the lake (overwrite one file, delete another), restore it in place to
/// the moment before the damage, back the restored state up, and prove it with `verify --deep`.
pub async fn restore_act(app: &App) -> Result<String, OpError> {
    use crate::core::restore::PlanItem;
    let mut out = String::new();
    // A restore point strictly after the backed-up versions and strictly before the damage,
    // whatever the service's one-second Last-Modified resolution.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let t = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .expect("0 is a valid nanosecond");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let (overwritten, deleted) = ("curated/report.parquet", "raw/2026/11/sales 02.csv");
    app.source
        .upload(
            DEMO_CONTAINER,
            overwritten,
            b"CORRUPTED by a buggy job".to_vec(),
            Some("text/plain"),
            &BTreeMap::new(),
        )
        .await?;
    app.source
        .delete(DEMO_CONTAINER, deleted, None, None, true)
        .await?;
    let _ = writeln!(
        out,
        "== damage: overwrote `{overwritten}`, deleted `{deleted}`"
    );
    let mut req = ops::restore::RestoreRequest::new(DEMO_CONTAINER, t);
    req.force = true;
    let report = ops::restore::run(app, &req, ops::no_progress()).await?;
    let _ = writeln!(
        out,
        "== restore --container {DEMO_CONTAINER} --at {} --force (in place):",
        metadata::format_time(t)
    );
    for item in &report.items {
        let what = match item {
            PlanItem::Restore {
                target_etag: Some(_),
                ..
            } => "overwrite (undo snapshot kept)",
            PlanItem::Restore { .. } => "restore",
            PlanItem::Delete { .. } => "delete (undo copy kept)",
            PlanItem::LeftAlone { .. } => "left alone",
            PlanItem::Unavailable { .. } => "UNAVAILABLE",
            PlanItem::Unchanged { .. } => "unchanged",
            PlanItem::SetSecurity { .. } => "set owner/group/ACL",
        };
        let _ = writeln!(out, "   {what:<32} {}", item.name());
    }
    let e = report.execution.clone().unwrap_or_default();
    let _ = writeln!(
        out,
        "   unchanged {}, restored {}, undo snapshots {}, failed {}, complete: {}",
        report.plan.unchanged,
        e.restored,
        e.undo_snapshots,
        e.failed,
        report.is_complete()
    );
    let back = app
        .source
        .download(DEMO_CONTAINER, overwritten, None)
        .await?;
    let _ = writeln!(
        out,
        "   `{overwritten}` is again: {:?}",
        String::from_utf8_lossy(&back)
    );
    // The restored blobs are new versions of the source: back them up, then prove the backup.
    ops::snapshot::run(app, DEMO_CONTAINER, None, ops::no_progress()).await?;
    ops::backup::drain(app, &app.queue, ops::no_progress()).await?;
    let v = ops::verify::run(app, DEMO_CONTAINER, true, None, ops::no_progress()).await?;
    let d = v.deep.clone().unwrap_or_default();
    let _ = writeln!(
        out,
        "== verify --deep: {} source blobs, {} backed up, {} pending, {} missing, {} of {} identical by SHA-256: {}",
        v.source_blobs,
        v.covered,
        v.pending,
        v.missing,
        d.matched,
        d.checked,
        if v.is_ok() { "OK" } else { "FAILED" }
    );
    Ok(out)
}
