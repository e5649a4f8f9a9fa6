//! The harness driving the real `lakeguard serve` in both modes: proves that `Stack::env()` is a
//! configuration lakeguard accepts, that the host stand-in's requests are understood, and that the
//! queue-trigger emulation carries a producer's request to the worker. (The functions' own
//! behaviour is tested in their own files; this is the plumbing.)

mod support;

use support::host::{self, Delivery};
use support::identity::STORAGE_RESOURCE;
use support::{Mode, Stack};

async fn producer_to_worker(mode: Mode) {
    let stack = Stack::start(mode).await;
    let container = support::unique_name("stack");
    let source = stack.source();
    source.create_container(&container).await.ok("create");
    source
        .put_blob(&container, "dir/a b.txt", b"payload", &[("owner", "me")])
        .await
        .ok("put");

    // In Shared Key mode all blob traffic goes through a counting proxy: proves the proxy is
    // transparent to the real SDK (signatures, copies) and that it sees every call.
    let proxy = (mode == Mode::SharedKeyHttp).then(|| stack.blob_proxy());
    let handler = match &proxy {
        Some(p) => support::Handler::spawn(&stack.env_via_proxy(p)).await,
        None => stack.handler().await,
    };
    let resp = host::forwarded_http(
        handler.port(),
        "POST",
        &format!("/api/snapshot?container={container}&code=test-key"),
        &[("x-functions-key", "test-key")],
        None,
    )
    .await;
    assert!(
        resp.status.is_success(),
        "{} {}\n{}",
        resp.status,
        resp.body,
        handler.logs()
    );
    let body = resp.json();
    assert!(body.is_object(), "{body}");

    // One base64 message on the configured queue, naming the blob.
    let queued = stack.queues().peek_messages(&stack.queue).await;
    assert_eq!(queued.len(), 1, "{queued:?}");
    let text = queued[0].decoded_text().expect("base64 UTF-8 message");
    let msg: serde_json::Value = serde_json::from_str(&text).expect("JSON message");
    assert_eq!(msg["container"], container.as_str());
    assert_eq!(msg["blob"], "dir/a b.txt");

    // The queue trigger delivers it to BackupWorker, which copies it.
    let queues = stack.queues();
    let trigger = stack.trigger(&queues, handler.port());
    let report = trigger.drain(10).await;
    assert_eq!(report.succeeded, 1, "{report:#?}\n{}", handler.logs());
    assert!(
        matches!(report.deliveries[..], [Delivery::Succeeded { .. }]),
        "{report:#?}\n{}",
        handler.logs()
    );
    // The copy really happened (in OAuthHttps too: lakeguard signs a container-scoped
    // user-delegation SAS, because Azurite 3.37 leaves the snapshot time out of its
    // string-to-sign for a snapshot-scoped one (`sr=bs`) and rejects a correct signature).
    let backup = stack
        .backup()
        .get_blob(&container, "dir/a b.txt", None)
        .await;
    if !backup.is_success() && std::env::var_os("LAKEGUARD_TEST_AZURITE_DEBUG").is_some() {
        eprintln!("{}", stack.azurite.debug_log());
    }
    let backup = backup.ok(&format!("backup blob exists ({report:#?})"));
    assert_eq!(backup.body, b"payload");

    if let Some(p) = &proxy {
        let requests = p.requests();
        assert!(
            requests.iter().any(|r| r.is_list_blobs()),
            "{:#?}",
            p.summary()
        );
        assert!(
            requests
                .iter()
                .any(|r| r.method == "PUT" && r.comp().as_deref() == Some("snapshot")),
            "{:#?}",
            p.summary()
        );
        assert!(requests.iter().all(|r| r.status < 500), "{requests:#?}");
        // Azurite saw every proxied request; the only others are this test's own three oracle
        // calls (create container, put blob, get backup blob).
        let mut direct: Vec<String> = stack
            .azurite
            .blob_requests()
            .await
            .into_iter()
            .map(|e| e.target)
            .collect();
        for r in &requests {
            let i = direct
                .iter()
                .position(|t| *t == r.target)
                .unwrap_or_else(|| panic!("{} not in Azurite's log", r.target));
            direct.remove(i);
        }
        assert_eq!(direct.len(), 3, "{direct:#?}");
    }
    if let Some(id) = &stack.identity {
        id.assert_no_violations();
        assert!(id.requests_for(STORAGE_RESOURCE) >= 1);
    }
    stack.assert_no_secrets_in(&handler.logs());
}

#[tokio::test]
async fn shared_key_http_stack_runs_producer_and_worker() {
    producer_to_worker(Mode::SharedKeyHttp).await;
}

#[tokio::test]
async fn oauth_https_stack_runs_producer_and_worker() {
    producer_to_worker(Mode::OAuthHttps).await;
}
