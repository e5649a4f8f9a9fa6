//! ADLS Gen2 fidelity (issue 18) end to end: both accounts behind the hierarchical-namespace
//! stand-in (`support::hns`), a lake with nested and empty directories, default ACLs, per-file
//! ACLs and odd names; backup by the producer + worker and by reconcile; an ACL-only change
//! recorded without a byte copy; a "bad day"; point-in-time restores in place and into another
//! container compared path by path (bytes, directory-ness, owner, group, permissions, ACL) with
//! the truth the test recorded; a restore by an identity that may not change owners; verify
//! reporting an ACL mismatch.

mod support;

use std::collections::BTreeMap;

use lakeguard::app::App;
use lakeguard::ops::restore::{self, RestoreRequest, TargetSpec};
use lakeguard::ops::{self, no_progress};
use reqwest::Method;
use support::app::mark;
use support::hns::{HnsStandIn, PathState, CALLER};
use support::rest::encode_path;
use support::{
    run_cli, unique_name, Auth, Mode, Stack, StorageRest, BACKUP_ACCOUNT, BACKUP_KEY, DEV_ACCOUNT,
    DEV_KEY,
};
use time::OffsetDateTime;

/// What one path holds: `None` bytes for a directory.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Path {
    bytes: Option<Vec<u8>>,
    owner: String,
    group: String,
    permissions: String,
    acl: String,
}

type Truth = BTreeMap<String, Path>;

struct Lake {
    stack: Stack,
    hns: HnsStandIn,
    env: Vec<(String, String)>,
    app: App,
    src: StorageRest,
}

async fn lake() -> Lake {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let hns = HnsStandIn::start(
        stack.azurite.blob_port(),
        &[(DEV_ACCOUNT, DEV_KEY), (BACKUP_ACCOUNT, BACKUP_KEY)],
    );
    let az = &stack.azurite;
    let source = az.connection_string_via(DEV_ACCOUNT, &hns.endpoint(DEV_ACCOUNT));
    let backup = az.connection_string_via(BACKUP_ACCOUNT, &hns.endpoint(BACKUP_ACCOUNT));
    let dfs = hns.endpoint(DEV_ACCOUNT);
    let env = stack.env_with(&[
        ("SourceStorage", &source),
        ("BackupStorage", &backup),
        ("SourceStorage__dfsServiceUri", &dfs),
        ("LAKEGUARD_SOURCE_HNS", "true"),
        ("LAKEGUARD_NAME_ORDER", "hierarchical"),
    ]);
    let app = support::app(&env);
    let src = StorageRest::new(
        reqwest::Client::new(),
        hns.endpoint(DEV_ACCOUNT),
        DEV_ACCOUNT,
        Auth::SharedKey(DEV_KEY.to_string()),
    );
    Lake {
        stack,
        hns,
        env,
        app,
        src,
    }
}

impl Lake {
    async fn mkdir(&self, c: &str, path: &str) {
        self.src
            .send(
                Method::PUT,
                &format!("/{c}/{}", encode_path(path)),
                &[("resource", "directory")],
                &[],
                vec![],
            )
            .await
            .ok("create directory");
    }

    async fn set_acl(&self, c: &str, path: &str, headers: &[(&str, &str)]) {
        self.src
            .send(
                Method::PATCH,
                &format!("/{c}/{}", encode_path(path)),
                &[("action", "setAccessControl")],
                headers,
                vec![],
            )
            .await
            .ok("set access control");
    }

    async fn put(&self, c: &str, path: &str, data: &[u8]) {
        self.src
            .put_blob(c, path, data, &[("team", "lake")])
            .await
            .ok("put blob");
    }

    async fn delete(&self, c: &str, path: &str) {
        self.src.delete_blob(c, path).await.ok("delete");
    }

    /// Every path of a container as the stand-in and Azurite hold it.
    async fn truth(&self, c: &str) -> Truth {
        truth_in(self, &self.src, DEV_ACCOUNT, c).await
    }

    async fn cycle(&self, c: &str) -> ops::backup::DrainReport {
        let r = ops::snapshot::run(&self.app, c, None, no_progress())
            .await
            .expect("producer");
        assert!(r.is_complete(), "{r:?}");
        let d = ops::backup::drain(&self.app, &self.app.queue, no_progress())
            .await
            .expect("drain");
        assert_eq!(d.poisoned, 0, "{d:?}");
        d
    }

    async fn reconcile(&self, c: &str) -> ops::reconcile::ReconcileReport {
        let opts = ops::reconcile::RunOptions {
            container: Some(c.to_owned()),
            ..Default::default()
        };
        let r = ops::reconcile::run(&self.app, &opts, no_progress())
            .await
            .expect("reconcile");
        assert_eq!(r.errors, 0, "{r:?}");
        r
    }

    async fn restore_into(
        &self,
        c: &str,
        at: OffsetDateTime,
        target: &str,
    ) -> restore::RestoreReport {
        let mut req = RestoreRequest::new(c, at);
        req.to = Some(TargetSpec {
            store: self.app.source.clone(),
            container: target.to_owned(),
        });
        restore::run(&self.app, &req, no_progress()).await.unwrap()
    }
}

fn assert_same(what: &str, got: &Truth, want: &Truth) {
    let names = |t: &Truth| t.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(got), names(want), "{what}: paths");
    for (k, w) in want {
        assert_eq!(&got[k], w, "{what}: {k}");
    }
}

const DEFAULT_ACL: &str = "user::rwx,group::r-x,other::---,default:user::rwx,default:group::r-x,default:group:readers:r-x,default:mask::r-x,default:other::---";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acls_directories_and_owners_survive_backup_and_point_in_time_restore() {
    let l = lake().await;
    let c = unique_name("lake");
    l.src.create_container(&c).await.ok("create container");

    // The lake: a directory with default ACLs and a nested file that inherits them, an odd
    // name, an empty directory, a file with its own ACL and owner.
    l.mkdir(&c, "raw").await;
    l.set_acl(&c, "raw", &[("x-ms-acl", DEFAULT_ACL)]).await;
    l.put(&c, "raw/2026/12/data one.csv", b"id,value\n1,2\n")
        .await;
    l.put(&c, "raw/ünï code #1%.txt", b"odd name").await;
    l.mkdir(&c, "empty/dir").await;
    l.put(&c, "top.txt", b"top").await;
    l.set_acl(
        &c,
        "top.txt",
        &[(
            "x-ms-acl",
            "user::rw-,user:alice:r--,group::r--,mask::r--,other::---",
        )],
    )
    .await;
    l.set_acl(
        &c,
        "top.txt",
        &[("x-ms-owner", "owner-1"), ("x-ms-group", "grp-1")],
    )
    .await;
    let inherited = l
        .hns
        .state(DEV_ACCOUNT, &c, "raw/2026/12/data one.csv")
        .unwrap();
    assert!(inherited.acl.contains("group:readers:r-x"), "{inherited:?}");

    // Backup: producer + worker (files), reconcile (directories; files are in sync).
    l.hns.reset();
    let d = l.cycle(&c).await;
    assert_eq!(d.backed_up, 3, "{d:?}");
    assert_eq!(
        l.hns.copies(),
        3,
        "the copy counter sees the first backup's copies"
    );
    let r = l.reconcile(&c).await;
    assert_eq!(
        r.directories_backed_up, 5,
        "raw, raw/2026, raw/2026/12, empty, empty/dir: {r:?}"
    );
    assert_eq!(r.requests_enqueued, 0, "{r:?}");
    let again = l.reconcile(&c).await;
    assert_eq!(
        (
            again.directories_backed_up,
            again.security_recorded,
            again.requests_enqueued
        ),
        (0, 0, 0),
        "a second reconcile has nothing to do: {again:?}"
    );
    let t1 = mark().await;
    let truth1 = l.truth(&c).await;
    assert_eq!(truth1.len(), 8, "{truth1:?}");

    // An ACL-only change on a file and on a directory: new versions, no byte copy.
    l.set_acl(
        &c,
        "top.txt",
        &[(
            "x-ms-acl",
            "user::rw-,user:alice:rw-,user:bob:r--,group::r--,mask::rw-,other::---",
        )],
    )
    .await;
    l.set_acl(&c, "raw", &[("x-ms-acl", "user::rwx,group::---,other::---,default:user::rwx,default:group::---,default:other::---")])
        .await;
    l.hns.reset();
    let d = l.cycle(&c).await;
    assert_eq!((d.backed_up, d.security_recorded), (0, 1), "{d:?}");
    let r = l.reconcile(&c).await;
    assert_eq!(r.directories_backed_up, 1, "the directory's new ACL: {r:?}");
    assert_eq!(
        r.security_recorded, 0,
        "the producer recorded the file's already: {r:?}"
    );
    assert_eq!(l.hns.copies(), 0, "an ACL-only change copies no bytes");
    let t2 = mark().await;
    let truth2 = l.truth(&c).await;

    // A bad day: a directory deleted with its files, ACLs and an owner changed.
    l.delete(&c, "raw/2026/12/data one.csv").await;
    l.delete(&c, "raw/2026/12").await;
    l.delete(&c, "raw/2026").await;
    l.set_acl(
        &c,
        "top.txt",
        &[("x-ms-acl", "user::rw-,group::rw-,other::rw-")],
    )
    .await;
    l.set_acl(&c, "empty/dir", &[("x-ms-owner", "intruder")])
        .await;
    l.cycle(&c).await;
    let r = l.reconcile(&c).await;
    assert_eq!(r.tombstones_written, 3, "{r:?}");
    assert_eq!(r.directories_backed_up, 1, "empty/dir's new owner: {r:?}");
    let t3 = mark().await;
    let truth3 = l.truth(&c).await;

    // verify: in step now; then an ACL change on the source is reported as a mismatch.
    let v = ops::verify::run(&l.app, &c, false, None, no_progress())
        .await
        .unwrap();
    assert!(v.is_ok(), "{v:?}");
    assert_eq!(v.directories, 3, "raw, empty, empty/dir: {v:?}");
    let before = l
        .hns
        .state(DEV_ACCOUNT, &c, "raw/ünï code #1%.txt")
        .unwrap();
    l.hns.set_state(
        DEV_ACCOUNT,
        &c,
        "raw/ünï code #1%.txt",
        PathState {
            acl: "user::rwx,group::rwx,other::rwx".into(),
            ..before.clone()
        },
    );
    let v = ops::verify::run(&l.app, &c, false, None, no_progress())
        .await
        .unwrap();
    assert!(!v.is_ok());
    assert_eq!(v.security_mismatched, 1, "{v:?}");
    assert_eq!(v.security_mismatches[0].name, "raw/ünï code #1%.txt");
    assert_eq!(v.security_mismatches[0].differs, vec!["permissions", "acl"]);
    l.hns
        .set_state(DEV_ACCOUNT, &c, "raw/ünï code #1%.txt", before);

    // Restores into other containers at each point, then in place to T1.
    for (i, (t, truth)) in [(t1, &truth1), (t2, &truth2), (t3, &truth3)]
        .into_iter()
        .enumerate()
    {
        let target = unique_name(&format!("restored-t{}", i + 1));
        let report = l.restore_into(&c, t, &target).await;
        assert!(report.is_complete(), "T{}: {report:?}", i + 1);
        let e = report.execution.as_ref().unwrap();
        assert_eq!(e.security_failed, 0, "{e:?}");
        assert_same(
            &format!("restore into another container at T{}", i + 1),
            &l.truth(&target).await,
            truth,
        );
    }
    let mut req = RestoreRequest::new(c.as_str(), t1);
    req.force = true;
    let report = restore::run(&l.app, &req, no_progress()).await.unwrap();
    assert!(report.is_complete(), "{report:?}");
    assert!(
        report.plan.set_security >= 2,
        "top.txt and empty/dir only need their security: {:?}",
        report.plan
    );
    assert_same("in place at T1", &l.truth(&c).await, &truth1);
    // A rerun finds nothing to do.
    let report = restore::run(&l.app, &req, no_progress()).await.unwrap();
    assert_eq!(
        (
            report.plan.restore,
            report.plan.set_security,
            report.plan.delete
        ),
        (0, 0, 0),
        "{:?}",
        report.plan
    );
    drop(l.stack);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restore_without_the_owner_right_restores_bytes_and_reports_each_acl_failure() {
    let l = lake().await;
    let c = unique_name("lake");
    l.src.create_container(&c).await.ok("create container");
    l.mkdir(&c, "d").await;
    l.put(&c, "d/a.bin", b"aaaa").await;
    l.put(&c, "b.bin", b"bb").await;
    for p in ["d", "d/a.bin", "b.bin"] {
        l.set_acl(
            &c,
            p,
            &[("x-ms-owner", "data-owner"), ("x-ms-group", "data-team")],
        )
        .await;
    }
    // Backed up by reconcile alone (no producer run): the directory at once, the files through
    // requests the worker drains; verify then finds every security state recorded.
    let r = l.reconcile(&c).await;
    assert_eq!(
        (r.directories_backed_up, r.requests_enqueued),
        (1, 2),
        "{r:?}"
    );
    let d = ops::backup::drain(&l.app, &l.app.queue, no_progress())
        .await
        .expect("drain");
    assert_eq!(d.backed_up, 2, "{d:?}");
    let v = ops::verify::run(&l.app, &c, false, None, no_progress())
        .await
        .unwrap();
    assert!(v.is_ok(), "{v:?}");
    assert_eq!((v.security_checked, v.security_mismatched), (3, 0), "{v:?}");
    let t = mark().await;
    let truth = l.truth(&c).await;

    // The restoring identity is not a superuser: it creates the paths (so owns them and may
    // set their ACLs) but may not give them their owner back.
    l.hns.set_superuser(false);
    let target = unique_name("restored");
    let at = lakeguard::model::metadata::format_time(t);
    let out = run_cli(
        &[
            "restore",
            "--container",
            &c,
            "--at",
            &at,
            "--to-container",
            &target,
            "--output",
            "json",
        ],
        &l.env,
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("json report");
    let e = &report["execution"];
    assert_eq!(e["security_failed"], 3, "{e}");
    let failed: Vec<String> = e["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["blob"].as_str().unwrap().to_owned())
        .collect();
    let mut failed_sorted = failed.clone();
    failed_sorted.sort();
    assert_eq!(failed_sorted, vec!["b.bin", "d", "d/a.bin"], "{e}");
    assert!(
        e["failures"][0]["error"]
            .as_str()
            .unwrap()
            .contains("Storage Blob Data Owner"),
        "{e}"
    );
    // Bytes are there, ACLs set, owners are the restoring identity's.
    let got = l.truth(&target).await;
    for (k, want) in &truth {
        let g = &got[k];
        assert_eq!(g.bytes, want.bytes, "{k}");
        assert_eq!(g.acl, want.acl, "{k}");
        assert_eq!(g.owner, CALLER, "{k}");
    }
    drop(l.stack);
}

/// The event path on a hierarchical source: an event carries no ACL, so the version is backed up
/// with the state read by one Get Access Control.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_backs_up_the_version_with_its_security_state() {
    let l = lake().await;
    let c = unique_name("lake");
    l.src.create_container(&c).await.ok("create container");
    l.put(&c, "d/e f.csv", b"event data").await;
    l.set_acl(&c, "d/e f.csv", &[("x-ms-owner", "owner-9")])
        .await;
    l.set_acl(
        &c,
        "d/e f.csv",
        &[(
            "x-ms-acl",
            "user::rw-,user:carol:r--,group::r--,mask::r--,other::---",
        )],
    )
    .await;
    let etag = l
        .src
        .blob_properties(&c, "d/e f.csv", None)
        .await
        .ok("head")
        .header("etag")
        .unwrap();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/events/eventgrid-blob-created.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let e = if v.is_array() { &mut v[0] } else { &mut v };
    e["topic"] = serde_json::Value::String(format!(
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/{DEV_ACCOUNT}"
    ));
    e["subject"] = serde_json::Value::String(format!(
        "/blobServices/default/containers/{c}/blobs/d/e f.csv"
    ));
    e["data"]["eTag"] = serde_json::Value::String(etag);
    let out = ops::event::process_message(&l.app, &l.app.queue, &v.to_string(), 1)
        .await
        .expect("event");
    assert_eq!(out.len(), 1, "{out:?}");
    let p = l
        .app
        .backup
        .properties(&c, "d/e f.csv", None)
        .await
        .expect("backed up");
    let s = lakeguard::model::Security::from_metadata(&p.metadata).expect("security recorded");
    assert_eq!(s.owner, "owner-9");
    assert!(s.acl.contains("user:carol:r--"), "{s:?}");
    drop(l.stack);
}

/// A file replaced by a directory of the same name: reconcile backs the directory up over the
/// file's backup (kept as a backup snapshot); restores before and after give the file, then the
/// directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_replaced_by_a_directory_keeps_both_in_the_history() {
    let l = lake().await;
    let c = unique_name("lake");
    l.src.create_container(&c).await.ok("create container");
    l.put(&c, "x", b"a file called x").await;
    l.cycle(&c).await;
    let t1 = mark().await;
    let truth1 = l.truth(&c).await;
    l.delete(&c, "x").await;
    l.mkdir(&c, "x").await;
    l.set_acl(
        &c,
        "x",
        &[(
            "x-ms-acl",
            "user::rwx,group::---,other::---,default:user::rwx",
        )],
    )
    .await;
    let r = l.reconcile(&c).await;
    assert_eq!(
        (r.tombstones_written, r.directories_backed_up),
        (0, 1),
        "{r:?}"
    );
    let t2 = mark().await;
    let truth2 = l.truth(&c).await;
    assert!(truth2["x"].bytes.is_none() && truth1["x"].bytes.is_some());
    for (t, truth) in [(t1, &truth1), (t2, &truth2)] {
        let target = unique_name("restored");
        let report = l.restore_into(&c, t, &target).await;
        assert!(report.is_complete(), "{report:?}");
        assert_same("file, then directory", &l.truth(&target).await, truth);
    }
    drop(l.stack);
}

/// The security step of a restore is conditional: a path rewritten after the plan keeps what
/// its writer gave it (412 on `If-Match`, counted as changed since the plan); one the restore
/// only re-secures gets its state of T. A directory is never "created" over a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn security_changes_are_conditional_and_a_file_is_never_taken_for_a_directory() {
    let l = lake().await;
    let c = unique_name("lake");
    l.src.create_container(&c).await.ok("create container");
    l.mkdir(&c, "d").await;
    l.put(&c, "d/a.txt", b"a at T").await;
    l.put(&c, "b.txt", b"b at T").await;
    for p in ["d/a.txt", "b.txt"] {
        l.set_acl(&c, p, &[("x-ms-acl", "user::rw-,group::r--,other::---")])
            .await;
    }
    l.cycle(&c).await;
    let t = mark().await;
    let truth = l.truth(&c).await;
    // Only the ACLs change after T: an in-place restore only re-secures both files.
    for p in ["d/a.txt", "b.txt"] {
        l.set_acl(&c, p, &[("x-ms-acl", "user::rwx,group::rwx,other::r--")])
            .await;
    }
    l.reconcile(&c).await;
    let mut req = RestoreRequest::new(c.as_str(), t);
    req.force = true;
    let mut plan = restore::plan(&l.app, &req).await.unwrap();
    assert_eq!(plan.summary.set_security, 2, "{:?}", plan.summary);
    // A writer rewrites d/a.txt between the plan and its execution.
    l.put(&c, "d/a.txt", b"written meanwhile").await;
    let written = l.hns.state(DEV_ACCOUNT, &c, "d/a.txt").unwrap();
    let exec = restore::execute(&l.app, &req, &mut plan, no_progress())
        .await
        .unwrap();
    assert_eq!(exec.changed, vec!["d/a.txt".to_string()], "{exec:?}");
    assert_eq!((exec.security_set, exec.failed), (1, 0), "{exec:?}");
    assert_eq!(
        l.hns.state(DEV_ACCOUNT, &c, "d/a.txt").unwrap(),
        written,
        "the rewritten file keeps what its writer left"
    );
    let now = l.truth(&c).await;
    assert_eq!(now["b.txt"], truth["b.txt"], "re-secured to its state of T");
    assert_eq!(
        now["d/a.txt"].bytes.as_deref(),
        Some(&b"written meanwhile"[..])
    );

    // A directory where a file is: an error, never "already there".
    let err = l
        .app
        .source
        .ensure_directory(&c, "b.txt")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("a file"), "{err}");
    let dir = l.app.source.ensure_directory(&c, "d").await.unwrap();
    let head = l
        .src
        .send(Method::HEAD, &format!("/{c}/d"), &[], &[], vec![])
        .await;
    assert_eq!(Some(dir.quoted()), head.header("etag"));
    drop(l.stack);
}

/// If Set Access Control gives a path a new ETag (the docs do not say; the stand-in can do
/// either), an in-place restore's undo record follows it, so `restore --undo` still recognises
/// the path as the restore left it and reverses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn undo_follows_a_security_change_that_gives_the_path_a_new_etag() {
    let l = lake().await;
    l.hns.set_acl_changes_etag(true);
    let c = unique_name("lake");
    l.src.create_container(&c).await.ok("create container");
    l.put(&c, "f.txt", b"f at T").await;
    l.set_acl(
        &c,
        "f.txt",
        &[("x-ms-acl", "user::rw-,group::r--,other::---")],
    )
    .await;
    l.cycle(&c).await;
    let t = mark().await;
    let truth = l.truth(&c).await;
    l.put(&c, "f.txt", b"f after T, the bad write").await;
    l.set_acl(
        &c,
        "f.txt",
        &[("x-ms-acl", "user::rwx,group::rwx,other::rwx")],
    )
    .await;
    l.cycle(&c).await;
    let after = l.truth(&c).await;

    let mut req = RestoreRequest::new(c.as_str(), t);
    req.force = true;
    let r = restore::run(&l.app, &req, no_progress()).await.unwrap();
    assert!(r.is_complete(), "{r:?}");
    assert_eq!(r.execution.as_ref().unwrap().security_set, 1, "{r:?}");
    assert_same("in place at T", &l.truth(&c).await, &truth);

    let u = restore::undo::run(
        &l.app,
        &restore::undo::UndoRequest {
            id: r.id.clone(),
            container: None,
            dry_run: false,
            force: true,
        },
        no_progress(),
    )
    .await
    .unwrap();
    assert!(u.is_complete(), "{u:#?}");
    assert_eq!(
        l.truth(&c).await["f.txt"].bytes,
        after["f.txt"].bytes,
        "undone: the content of before the restore"
    );
    drop(l.stack);
}

/// Reconcile dates a security state by the listing page that showed it (its `Date`), not by the
/// moment it gets to record it: a restore between the two must not take the older state.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconcile_dates_a_security_state_by_the_page_that_showed_it() {
    let l = lake().await;
    let c = unique_name("lake");
    l.src.create_container(&c).await.ok("create container");
    l.mkdir(&c, "d").await;
    l.set_acl(&c, "d", &[("x-ms-acl", "user::rwx,group::r-x,other::---")])
        .await;
    let before = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let r = l.reconcile(&c).await;
    let after = OffsetDateTime::now_utc();
    assert_eq!(r.directories_backed_up, 1, "{r:?}");
    let head = l
        .stack
        .backup()
        .send(Method::HEAD, &format!("/{c}/d"), &[], &[], vec![])
        .await
        .ok("head");
    let at = head
        .header("x-ms-meta-lakeguard_security_at")
        .and_then(|v| lakeguard::model::metadata::parse_time(&v))
        .expect("a dated security state");
    assert!(
        at.nanosecond() == 0 && before <= at && at <= after,
        "stamped {at}, not the page's Date (between {before} and {after})"
    );
    drop(l.stack);
}

/// Every path of `c` in `account` as the stand-in and Azurite hold it.
async fn truth_in(l: &Lake, rest: &StorageRest, account: &str, c: &str) -> Truth {
    let mut out = Truth::new();
    for (path, st) in l.hns.states(account, c) {
        let bytes = if st.dir {
            None
        } else {
            Some(rest.get_blob(c, &path, None).await.ok("get").body)
        };
        out.insert(
            path,
            Path {
                bytes,
                owner: st.owner.clone(),
                group: st.group.clone(),
                permissions: st.permissions(),
                acl: st.acl.clone(),
            },
        );
    }
    out
}

/// `lakeguard restore --to-account`: into another hierarchical account every path comes back
/// with its owner, group and ACLs of T; into a flat one the bytes come back, each path's security
/// step is reported as failed, and the run exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restore_into_another_account_brings_back_acls_or_says_it_cannot() {
    let l = lake().await;
    let c = unique_name("lake");
    l.src.create_container(&c).await.ok("create container");
    l.mkdir(&c, "raw").await;
    l.set_acl(&c, "raw", &[("x-ms-acl", DEFAULT_ACL)]).await;
    l.mkdir(&c, "raw/empty").await;
    l.put(&c, "raw/a b.csv", b"a at T").await;
    l.put(&c, "top.txt", b"top at T").await;
    l.set_acl(
        &c,
        "top.txt",
        &[(
            "x-ms-acl",
            "user::rw-,user:alice:r--,group::r--,mask::r--,other::---",
        )],
    )
    .await;
    l.set_acl(
        &c,
        "top.txt",
        &[("x-ms-owner", "owner-1"), ("x-ms-group", "grp-1")],
    )
    .await;
    l.cycle(&c).await;
    l.reconcile(&c).await;
    let t = mark().await;
    let truth = l.truth(&c).await;
    // After T: a file rewritten, an ACL opened up.
    l.put(&c, "raw/a b.csv", b"a after T").await;
    l.set_acl(
        &c,
        "top.txt",
        &[("x-ms-acl", "user::rw-,group::rw-,other::rw-")],
    )
    .await;
    l.cycle(&c).await;

    let at = lakeguard::model::metadata::format_time(t);
    let backup_hns = l
        .stack
        .azurite
        .connection_string_via(BACKUP_ACCOUNT, &l.hns.endpoint(BACKUP_ACCOUNT));
    let dr = unique_name("dr");
    let mut env = l.env.clone();
    env.push(("DrStorage".into(), backup_hns.clone()));
    env.push((
        "DrStorage__dfsServiceUri".into(),
        l.hns.endpoint(BACKUP_ACCOUNT),
    ));
    let args = [
        "restore",
        "--container",
        &c,
        "--at",
        &at,
        "--to-account",
        "DrStorage",
        "--to-container",
        &dr,
        "--output",
        "json",
    ];
    let out = run_cli(&args, &env).await;
    assert!(out.status.success(), "{out:?}");
    let dr_rest = StorageRest::new(
        reqwest::Client::new(),
        l.hns.endpoint(BACKUP_ACCOUNT),
        BACKUP_ACCOUNT,
        Auth::SharedKey(BACKUP_KEY.to_string()),
    );
    assert_same(
        "restore into another hierarchical account",
        &truth_in(&l, &dr_rest, BACKUP_ACCOUNT, &dr).await,
        &truth,
    );

    // Into a flat account (the same one, without its dfs endpoint): bytes, and an honest exit 1.
    let flat = unique_name("flat");
    let mut env = l.env.clone();
    env.push(("FlatStorage".into(), backup_hns));
    let args = [
        "restore",
        "--container",
        &c,
        "--at",
        &at,
        "--to-account",
        "FlatStorage",
        "--to-container",
        &flat,
        "--output",
        "json",
    ];
    let out = run_cli(&args, &env).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let e = &v["execution"];
    assert_eq!(e["restored"], 2, "{v:#}");
    assert_eq!(
        e["security_failed"],
        truth.len(),
        "every path's security step: {v:#}"
    );
    assert!(
        e["failures"][0]["error"]
            .as_str()
            .unwrap()
            .contains("not hierarchical"),
        "{v:#}"
    );
    assert_eq!(
        dr_rest
            .get_blob(&flat, "raw/a b.csv", None)
            .await
            .ok("get")
            .body,
        b"a at T"
    );
    drop(l.stack);
}
