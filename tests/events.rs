//! EventBackup end to end: Blob Storage events in both Event Grid schemas (shaped like
//! Microsoft's documented examples in tests/fixtures/events, naming this test's account,
//! container, blobs and ETags) on the event queue, delivered by the host's queue trigger to
//! `lakeguard serve`; results read back with the REST oracle. Event Grid itself cannot run here:
//! duplicates, reordering and late delivery are produced by the test.

mod support;

use base64::Engine as _;
use serde_json::Value;
use support::{unique_name, Mode, Stack, StorageRest};

fn fixture(name: &str) -> Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/events")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// A documented example event re-addressed to `container/name` of the dev account.
fn event(schema: &str, kind: &str, container: &str, name: &str, etag: Option<&str>) -> String {
    let mut v = fixture(&format!("{schema}-{kind}.json"));
    let e = if v.is_array() { &mut v[0] } else { &mut v };
    let origin = if schema == "eventgrid" {
        "topic"
    } else {
        "source"
    };
    e[origin] = Value::String(
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/devstoreaccount1"
            .into(),
    );
    e["subject"] = Value::String(format!(
        "/blobServices/default/containers/{container}/blobs/{name}"
    ));
    e["id"] = Value::String(support::unique_suffix());
    if let Some(t) = etag {
        e["data"]["eTag"] = Value::String(t.into());
    }
    v.to_string()
}

fn rename(schema: &str, kind: &str, container: &str, from: &str, to: &str) -> String {
    let mut v: Value = serde_json::from_str(&event(schema, kind, container, to, None)).unwrap();
    let e = if v.is_array() { &mut v[0] } else { &mut v };
    e["data"]["sourceUrl"] = Value::String(format!(
        "https://devstoreaccount1.dfs.core.windows.net/{container}/{}",
        support::rest::encode_path(from)
    ));
    e["data"]["destinationUrl"] = Value::String(format!(
        "https://devstoreaccount1.dfs.core.windows.net/{container}/{}",
        support::rest::encode_path(to)
    ));
    v.to_string()
}

struct Fixture {
    stack: Stack,
    handler: support::Handler,
    queue: String,
    c: String,
}

impl Fixture {
    async fn start(extra: &[(&str, &str)]) -> Fixture {
        let stack = Stack::start(Mode::SharedKeyHttp).await;
        let env = stack.env_with(extra);
        Fixture::start_with(stack, env).await
    }

    /// With both accounts behind a counting proxy (to answer chosen requests itself).
    async fn start_via_proxy() -> (Fixture, support::CountingProxy) {
        let stack = Stack::start(Mode::SharedKeyHttp).await;
        let proxy = stack.blob_proxy();
        let env = stack.env_via_proxy(&proxy);
        (Fixture::start_with(stack, env).await, proxy)
    }

    async fn start_with(stack: Stack, mut env: Vec<(String, String)>) -> Fixture {
        let queue = format!("{}-events", stack.queue);
        env.push(("LAKEGUARD_EVENT_QUEUE".into(), queue.clone()));
        let handler = support::Handler::spawn(&env).await;
        let c = unique_name("ev");
        stack.source().create_container(&c).await.ok("create");
        stack.queues().create_queue(&queue).await;
        stack
            .queues()
            .create_queue(&format!("{queue}-poison"))
            .await;
        Fixture {
            stack,
            handler,
            queue,
            c,
        }
    }

    async fn put(&self, name: &str, data: &[u8]) -> String {
        self.stack
            .source()
            .put_blob(&self.c, name, data, &[("owner", "events")])
            .await
            .ok("put")
            .header("etag")
            .unwrap()
    }

    /// Queues `texts` and delivers them in that order; returns the invocation log lines.
    async fn deliver(&self, texts: &[String]) -> Vec<String> {
        let queues = self.stack.queues();
        let mut lines = Vec::new();
        for t in texts {
            queues
                .send_message(
                    &self.queue,
                    &base64::engine::general_purpose::STANDARD.encode(t),
                )
                .await
                .ok("send");
            let trigger =
                support::QueueTrigger::event_backup(&queues, self.handler.port(), &self.queue);
            let r = trigger.drain(5).await;
            assert_eq!((r.failed, r.poisoned), (0, 0), "{:#?}", r.deliveries);
            lines.push(format!("{:?}", r.deliveries));
        }
        lines
    }

    fn backup(&self) -> StorageRest {
        self.stack.backup()
    }

    async fn backed_up(&self, name: &str) -> Option<(Vec<u8>, Value)> {
        let r = self.backup().get_blob(&self.c, name, None).await;
        if !r.is_success() {
            return None;
        }
        let props = self.backup().blob_properties(&self.c, name, None).await;
        let meta = serde_json::json!({
            "etag": props.header("x-ms-meta-lakeguard_source_etag"),
            "deleted": props.header("x-ms-meta-lakeguard_deleted_at"),
        });
        Some((r.body, meta))
    }
}

#[tokio::test]
async fn created_events_back_up_exactly_their_version_in_both_schemas() {
    let f = Fixture::start(&[]).await;
    let e1 = f.put("a b/one.csv", b"one v1").await;
    let e2 = f.put("two.csv", b"two v1").await;
    let lines = f
        .deliver(&[
            event("eventgrid", "blob-created", &f.c, "a b/one.csv", Some(&e1)),
            event("cloudevents", "blob-created", &f.c, "two.csv", Some(&e2)),
        ])
        .await;
    assert!(lines[0].contains("backed up"), "{lines:?}");
    let (body, meta) = f.backed_up("a b/one.csv").await.expect("backed up");
    assert_eq!(body, b"one v1");
    assert_eq!(
        meta["etag"].as_str().unwrap().trim_matches('"'),
        e1.trim_matches('"')
    );
    assert_eq!(f.backed_up("two.csv").await.unwrap().0, b"two v1");
    // A duplicate changes nothing and takes no new snapshot.
    let before = f.stack.source().list_blobs(&f.c, None).await.len();
    let lines = f
        .deliver(&[event(
            "eventgrid",
            "blob-created",
            &f.c,
            "a b/one.csv",
            Some(&e1),
        )])
        .await;
    assert!(lines[0].contains("already in the backup"), "{lines:?}");
    assert_eq!(f.stack.source().list_blobs(&f.c, None).await.len(), before);
    f.stack.assert_no_secrets_in(&f.handler.logs());
}

#[tokio::test]
async fn an_event_for_an_overwritten_version_never_backs_up_the_newer_bytes_under_its_name() {
    let f = Fixture::start(&[]).await;
    let e1 = f.put("f.csv", b"version 1").await;
    let e2 = f.put("f.csv", b"version 2").await;
    // The late event of v1: v1 is gone (no snapshot of it exists): superseded, nothing written.
    let lines = f
        .deliver(&[event("eventgrid", "blob-created", &f.c, "f.csv", Some(&e1))])
        .await;
    assert!(lines[0].contains("superseded"), "{lines:?}");
    assert!(f.backed_up("f.csv").await.is_none());
    // v2's event backs v2 up.
    f.deliver(&[event("eventgrid", "blob-created", &f.c, "f.csv", Some(&e2))])
        .await;
    let (body, meta) = f.backed_up("f.csv").await.unwrap();
    assert_eq!(body, b"version 2");
    assert_eq!(
        meta["etag"].as_str().unwrap().trim_matches('"'),
        e2.trim_matches('"')
    );
}

#[tokio::test]
async fn deletes_tombstone_and_reordering_or_recreation_loses_nothing() {
    let f = Fixture::start(&[]).await;
    // In order: create, delete, re-create.
    let e1 = f.put("g.csv", b"g v1").await;
    f.deliver(&[event("eventgrid", "blob-created", &f.c, "g.csv", Some(&e1))])
        .await;
    f.stack
        .source()
        .delete_blob(&f.c, "g.csv")
        .await
        .ok("delete");
    let lines = f
        .deliver(&[event("cloudevents", "blob-deleted", &f.c, "g.csv", None)])
        .await;
    assert!(lines[0].contains("tombstoned"), "{lines:?}");
    assert!(f.backed_up("g.csv").await.unwrap().1["deleted"].is_string());
    // A duplicate delete is harmless.
    let lines = f
        .deliver(&[event("cloudevents", "blob-deleted", &f.c, "g.csv", None)])
        .await;
    assert!(lines[0].contains("tombstoned already"), "{lines:?}");
    let e2 = f.put("g.csv", b"g v2, re-created").await;
    f.deliver(&[event("eventgrid", "blob-created", &f.c, "g.csv", Some(&e2))])
        .await;
    let (body, meta) = f.backed_up("g.csv").await.unwrap();
    assert_eq!(body, b"g v2, re-created");
    assert!(meta["deleted"].is_null(), "{meta}");

    // Out of order: the three events of h.csv arrive last-first.
    let h1 = f.put("h.csv", b"h v1").await;
    f.stack
        .source()
        .delete_blob(&f.c, "h.csv")
        .await
        .ok("delete");
    let h2 = f.put("h.csv", b"h v2").await;
    let lines = f
        .deliver(&[
            event("eventgrid", "blob-created", &f.c, "h.csv", Some(&h2)),
            event("eventgrid", "blob-deleted", &f.c, "h.csv", None),
            event("eventgrid", "blob-created", &f.c, "h.csv", Some(&h1)),
        ])
        .await;
    assert!(lines[1].contains("exists"), "the late delete: {lines:?}");
    assert!(
        lines[2].contains("superseded") || lines[2].contains("already"),
        "{lines:?}"
    );
    let (body, meta) = f.backed_up("h.csv").await.unwrap();
    assert_eq!(body, b"h v2");
    assert!(meta["deleted"].is_null());
}

#[tokio::test]
async fn renames_back_up_the_new_name_and_tombstone_the_old_one() {
    let f = Fixture::start(&[]).await;
    let e = f.put("old.txt", b"renamed content").await;
    f.deliver(&[event(
        "eventgrid",
        "blob-created",
        &f.c,
        "old.txt",
        Some(&e),
    )])
    .await;
    for n in ["dir1/a.csv", "dir1/b.csv"] {
        let e = f.put(n, n.as_bytes()).await;
        f.deliver(&[event("eventgrid", "blob-created", &f.c, n, Some(&e))])
            .await;
    }
    // A flat account cannot rename: emulate what a rename leaves (new names, old ones gone).
    let src = f.stack.source();
    src.put_blob(&f.c, "new.txt", b"renamed content", &[])
        .await
        .ok("put");
    src.delete_blob(&f.c, "old.txt").await.ok("delete");
    for n in ["a.csv", "b.csv"] {
        src.put_blob(
            &f.c,
            &format!("dir2/{n}"),
            format!("dir1/{n}").as_bytes(),
            &[],
        )
        .await
        .ok("put");
        src.delete_blob(&f.c, &format!("dir1/{n}"))
            .await
            .ok("delete");
    }
    let lines = f
        .deliver(&[
            rename("eventgrid", "blob-renamed", &f.c, "old.txt", "new.txt"),
            rename("cloudevents", "directory-renamed", &f.c, "dir1", "dir2"),
        ])
        .await;
    assert!(
        lines[1].contains("tombstoned: 2") || lines[1].contains("2 tombstoned"),
        "{lines:?}"
    );
    assert_eq!(f.backed_up("new.txt").await.unwrap().0, b"renamed content");
    assert!(f.backed_up("old.txt").await.unwrap().1["deleted"].is_string());
    for n in ["a.csv", "b.csv"] {
        assert!(f.backed_up(&format!("dir1/{n}")).await.unwrap().1["deleted"].is_string());
    }
    // The new directory's paths were requested (the backup queue holds their requests).
    assert_eq!(f.stack.queues().message_count(&f.stack.queue).await, 2);
}

#[tokio::test]
async fn out_of_scope_and_malformed_events_are_acknowledged_counted_or_poisoned() {
    let f = Fixture::start(&[("LAKEGUARD_EVENT_PREFIXES", "in/")]).await;
    let e = f.put("out/x.csv", b"x").await;
    let mut other_account: Value = serde_json::from_str(&event(
        "eventgrid",
        "blob-created",
        &f.c,
        "in/y.csv",
        Some(&e),
    ))
    .unwrap();
    other_account[0]["topic"] = Value::String(
        "/subscriptions/s/providers/Microsoft.Storage/storageAccounts/someoneelse".into(),
    );
    let lines = f
        .deliver(&[
            event("eventgrid", "blob-created", &f.c, "out/x.csv", Some(&e)),
            other_account.to_string(),
            event("eventgrid", "blob-tier-changed", &f.c, "in/z.csv", None),
        ])
        .await;
    assert!(
        lines[0].contains("outside LAKEGUARD_EVENT_PREFIXES"),
        "{lines:?}"
    );
    assert!(lines[1].contains("someoneelse"), "{lines:?}");
    assert!(lines[2].contains("ignored"), "{lines:?}");
    assert!(f.backed_up("out/x.csv").await.is_none());
    // Not an event: poisoned at once with the reason, acknowledged.
    let queues = f.stack.queues();
    queues
        .send_message(
            &f.queue,
            &base64::engine::general_purpose::STANDARD.encode("{\"hello\":1}"),
        )
        .await
        .ok("send");
    let r = support::QueueTrigger::event_backup(&queues, f.handler.port(), &f.queue)
        .drain(5)
        .await;
    assert_eq!(r.succeeded, 1, "{:#?}", r.deliveries);
    let poison = queues.peek_messages(&format!("{}-poison", f.queue)).await;
    assert_eq!(poison.len(), 1);
}

/// A directory event is judged by the subtree it touches and a rename by both of its names:
/// with `LAKEGUARD_EVENT_PREFIXES=data/keep/`, deleting the directory `data` tombstones what was
/// under `data/keep/`, and renaming a file out of `data/keep/` tombstones its old name.
#[tokio::test]
async fn renames_and_directory_events_are_scoped_by_every_path_they_touch() {
    let f = Fixture::start(&[("LAKEGUARD_EVENT_PREFIXES", "data/keep/")]).await;
    for n in ["data/keep/a.csv", "data/keep/x.csv"] {
        let e = f.put(n, n.as_bytes()).await;
        f.deliver(&[event("eventgrid", "blob-created", &f.c, n, Some(&e))])
            .await;
        assert!(f.backed_up(n).await.is_some(), "{n}");
    }
    let src = f.stack.source();
    // A rename out of the prefixes (emulated: a flat account cannot rename).
    src.put_blob(&f.c, "elsewhere/x.csv", b"data/keep/x.csv", &[])
        .await
        .ok("put");
    src.delete_blob(&f.c, "data/keep/x.csv").await.ok("delete");
    let lines = f
        .deliver(&[rename(
            "eventgrid",
            "blob-renamed",
            &f.c,
            "data/keep/x.csv",
            "elsewhere/x.csv",
        )])
        .await;
    assert!(
        f.backed_up("data/keep/x.csv").await.unwrap().1["deleted"].is_string(),
        "{lines:?}"
    );
    assert!(
        f.backed_up("elsewhere/x.csv").await.is_none(),
        "out of scope"
    );
    // The parent directory deleted, with everything under it.
    src.delete_blob(&f.c, "data/keep/a.csv").await.ok("delete");
    let mut v: Value =
        serde_json::from_str(&event("eventgrid", "blob-deleted", &f.c, "data", None)).unwrap();
    let e = if v.is_array() { &mut v[0] } else { &mut v };
    e["eventType"] = Value::String("Microsoft.Storage.DirectoryDeleted".into());
    let lines = f.deliver(&[v.to_string()]).await;
    assert!(
        f.backed_up("data/keep/a.csv").await.unwrap().1["deleted"].is_string(),
        "{lines:?}"
    );
}

/// A delete event whose tombstone meets a backup that changed meanwhile (a late copy of the
/// last version) is delivered again, not acknowledged: the deletion is recorded on the retry.
#[tokio::test]
async fn a_delete_event_is_retried_when_the_backup_changed_under_its_tombstone() {
    let (f, proxy) = Fixture::start_via_proxy().await;
    let e = f.put("k.csv", b"k v1").await;
    f.deliver(&[event("eventgrid", "blob-created", &f.c, "k.csv", Some(&e))])
        .await;
    f.stack
        .source()
        .delete_blob(&f.c, "k.csv")
        .await
        .ok("delete");
    let path = format!("/{}/{}/k.csv", support::azurite::BACKUP_ACCOUNT, f.c);
    proxy.answer_next(
        1,
        axum::http::StatusCode::PRECONDITION_FAILED,
        "ConditionNotMet",
        move |m, t| m == "PUT" && t.starts_with(&path),
    );
    let queues = f.stack.queues();
    queues
        .send_message(
            &f.queue,
            &base64::engine::general_purpose::STANDARD.encode(event(
                "cloudevents",
                "blob-deleted",
                &f.c,
                "k.csv",
                None,
            )),
        )
        .await
        .ok("send");
    let r = support::QueueTrigger::event_backup(&queues, f.handler.port(), &f.queue)
        .drain(5)
        .await;
    assert_eq!(
        (r.failed, r.succeeded, r.poisoned),
        (1, 1, 0),
        "{:#?}",
        r.deliveries
    );
    assert!(f.backed_up("k.csv").await.unwrap().1["deleted"].is_string());
}
