//! `lakeguard restore --undo <id>` against a real Azurite: in-place restores (finished and
//! interrupted) reversed from their undo data, blobs changed since a restore left alone and
//! reported, and an undo reversed in turn. Every state is compared, contents and user metadata,
//! through the independent REST oracle.

mod support;

use std::collections::BTreeMap;

use lakeguard::app::App;
use lakeguard::model::metadata;
use lakeguard::ops::no_progress;
use lakeguard::ops::restore::undo::{self, UndoRequest};
use lakeguard::ops::restore::{self, RestoreRequest};
use serde_json::Value;
use support::app::{cycle, mark};
use support::{run_cli, unique_name, Mode, Stack, StorageRest};
use time::OffsetDateTime;

/// Name -> (content, user metadata).
type State = BTreeMap<String, (Vec<u8>, BTreeMap<String, String>)>;

/// The container's base blobs: content and user metadata (lakeguard's own keys left out).
async fn state(rest: &StorageRest, c: &str) -> State {
    let mut out = State::new();
    for b in rest.list_blobs(c, None).await {
        if b.snapshot.is_none() {
            let body = rest.get_blob(c, &b.name, None).await.ok("get blob").body;
            let meta = b
                .metadata
                .into_iter()
                .filter(|(k, _)| !metadata::is_lakeguard_key(k))
                .collect();
            out.insert(b.name, (body, meta));
        }
    }
    out
}

fn names(s: &State) -> Vec<&str> {
    s.keys().map(String::as_str).collect()
}

async fn undo_cli(env: &[(String, String)], id: &str, extra: &[&str]) -> (Option<i32>, Value) {
    let mut args = vec!["restore", "--undo", id, "--output", "json"];
    args.extend_from_slice(extra);
    let out = run_cli(&args, env).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), v)
}

async fn undo_lib(app: &App, id: &str) -> undo::UndoReport {
    undo::run(
        app,
        &UndoRequest {
            id: id.to_owned(),
            container: None,
            dry_run: false,
            force: true,
        },
        no_progress(),
    )
    .await
    .expect("undo")
}

fn in_place(c: &str, t: OffsetDateTime) -> RestoreRequest {
    let mut req = RestoreRequest::new(c, t);
    req.force = true;
    req
}

#[tokio::test]
async fn undo_reverses_in_place_restores_and_leaves_what_changed_since() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let env = stack.env();
    let app = support::app(&env);
    let src = stack.source();
    let c = unique_name("undo");
    src.create_container(&c).await.ok("create");
    src.put_blob(&c, "a.txt", b"a1", &[("owner", "team-a")])
        .await
        .ok("put");
    src.put_blob(&c, "b.txt", b"b1", &[]).await.ok("put");
    src.put_blob(&c, "c.txt", b"c1", &[]).await.ok("put");
    cycle(&app, &c).await;
    let t = mark().await;
    src.put_blob(&c, "a.txt", b"a2, longer", &[("owner", "team-b")])
        .await
        .ok("put");
    src.delete_blob(&c, "b.txt").await.ok("delete");
    src.put_blob(&c, "d.txt", b"d1", &[("kind", "new")])
        .await
        .ok("put");
    src.put_blob(&c, "e.txt", b"e1", &[]).await.ok("put");
    cycle(&app, &c).await;
    let before = state(&src, &c).await;
    assert_eq!(names(&before), ["a.txt", "c.txt", "d.txt", "e.txt"]);

    // 1. An interrupted restore (two of its four items) is undone for what it did.
    let mut req = in_place(&c, t);
    req.limit = Some(2);
    let r1 = restore::run(&app, &req, no_progress()).await.unwrap();
    let e1 = r1.execution.clone().unwrap();
    assert_eq!((e1.restored, e1.not_attempted), (2, 2), "{r1:#?}");
    assert_eq!(e1.undo_records_failed, 0);
    let mid = state(&src, &c).await;
    assert_eq!(names(&mid), ["a.txt", "b.txt", "c.txt", "d.txt", "e.txt"]);
    let u1 = undo_lib(&app, &r1.id).await;
    assert!(u1.is_complete(), "{u1:#?}");
    assert_eq!(
        (u1.plan.put_back, u1.plan.remove, u1.plan.recreate),
        (1, 1, 0)
    );
    assert_eq!(state(&src, &c).await, before);

    // 2. A finished restore: dry run, refusal without --force, undo, and a rerun that finds
    //    nothing left to do.
    let out = run_cli(
        &[
            "restore",
            "--container",
            &c,
            "--at",
            &metadata::format_time(t),
            "--force",
            "--output",
            "json",
        ],
        &env,
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let r2: Value = serde_json::from_slice(&out.stdout).unwrap();
    let r2_id = r2["id"].as_str().unwrap().to_owned();
    let at_t = state(&src, &c).await;
    assert_eq!(names(&at_t), ["a.txt", "b.txt", "c.txt"]);
    assert_eq!(at_t["a.txt"].0, b"a1");
    assert_eq!(
        at_t["a.txt"].1.get("owner").map(String::as_str),
        Some("team-a")
    );

    let (code, plan) = undo_cli(&env, &r2_id, &["--dry-run"]).await;
    assert_eq!(code, Some(0), "{plan:#}");
    assert_eq!(plan["executed"], false);
    assert_eq!(plan["plan"]["put_back"], 1, "a.txt: {plan:#}");
    assert_eq!(plan["plan"]["remove"], 1, "b.txt: {plan:#}");
    assert_eq!(plan["plan"]["recreate"], 2, "d.txt, e.txt: {plan:#}");
    let (code, refused) = undo_cli(&env, &r2_id, &[]).await;
    assert_eq!(code, Some(3), "{refused:#}");
    assert!(refused["refused"].as_str().unwrap().contains("--force"));
    assert_eq!(
        state(&src, &c).await,
        at_t,
        "nothing written without --force"
    );

    let (code, u2) = undo_cli(&env, &r2_id, &["--force"]).await;
    assert_eq!(code, Some(0), "{u2:#}");
    assert_eq!(u2["executed"], true);
    assert_eq!(u2["execution"]["restored"], 3, "{u2:#}");
    assert_eq!(u2["execution"]["deleted"], 1, "{u2:#}");
    assert_eq!(
        state(&src, &c).await,
        before,
        "the state before the restore"
    );
    let again = undo_lib(&app, &r2_id).await;
    assert!(again.is_complete(), "{again:#?}");
    assert_eq!(again.plan.already_undone, 4, "{again:#?}");
    assert_eq!(again.plan.actionable(), 0);
    let e = again.execution.unwrap();
    assert_eq!((e.restored, e.deleted), (0, 0), "nothing done twice");
    assert_eq!(state(&src, &c).await, before);

    // 3. Changed since the restore: a blob it created is rewritten, one it deleted re-created.
    let r3 = restore::run(&app, &in_place(&c, t), no_progress())
        .await
        .unwrap();
    assert!(r3.is_complete(), "{r3:#?}");
    src.put_blob(&c, "b.txt", b"b by hand", &[]).await.ok("put");
    src.put_blob(&c, "e.txt", b"e by hand", &[]).await.ok("put");
    let (code, u3) = undo_cli(&env, &r3.id, &["--force"]).await;
    assert_eq!(
        code,
        Some(1),
        "changes since the restore are reported: {u3:#}"
    );
    assert_eq!(u3["plan"]["put_back"], 1, "{u3:#}");
    assert_eq!(u3["plan"]["recreate"], 1, "{u3:#}");
    assert_eq!(u3["plan"]["changed"], 2, "{u3:#}");
    let changed: Vec<&str> = u3["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["kind"] == "changed")
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(changed, ["b.txt", "e.txt"]);
    let now = state(&src, &c).await;
    assert_eq!(names(&now), ["a.txt", "b.txt", "c.txt", "d.txt", "e.txt"]);
    assert_eq!(now["a.txt"], before["a.txt"]);
    assert_eq!(now["d.txt"], before["d.txt"]);
    assert_eq!(now["b.txt"].0, b"b by hand");
    assert_eq!(now["e.txt"].0, b"e by hand");

    // 4. The undo is itself undone: `a.txt` goes back to what the restore wrote, `d.txt` away;
    //    the hand-made blobs stay.
    let u3_id = u3["id"].as_str().unwrap().to_owned();
    let u4 = undo_lib(&app, &u3_id).await;
    assert!(u4.is_complete(), "{u4:#?}");
    assert_eq!((u4.plan.put_back, u4.plan.remove), (1, 1), "{u4:#?}");
    let last = state(&src, &c).await;
    assert_eq!(names(&last), ["a.txt", "b.txt", "c.txt", "e.txt"]);
    assert_eq!(last["a.txt"], at_t["a.txt"]);
    assert_eq!(last["b.txt"].0, b"b by hand");

    // An unknown id is invalid input.
    let out = run_cli(
        &["restore", "--undo", "20200101t000000z-00000000", "--force"],
        &env,
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
