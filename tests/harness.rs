//! Self-tests of the integration-test harness (tests/support): if these fail, nothing built on
//! the harness can be trusted.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::identity::{self, STORAGE_RESOURCE};
use support::rest::Auth;
use support::{Azurite, Mode, BACKUP_ACCOUNT, DEV_ACCOUNT};

/// `{endpoint}?k=v&...` (reqwest's `query` needs a feature we do not build).
fn with_query(endpoint: &str, params: &[(&str, &str)]) -> url::Url {
    let mut u = url::Url::parse(endpoint).unwrap();
    u.query_pairs_mut().extend_pairs(params);
    u
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(300),
    )
    .is_ok()
}

#[tokio::test]
async fn shared_key_http_round_trip_and_anonymous_is_rejected() {
    let az = Azurite::start(Mode::SharedKeyHttp).await;
    assert!(az
        .blob_endpoint(DEV_ACCOUNT)
        .starts_with("http://127.0.0.1:"));
    let container = support::unique_name("harness");
    for account in [DEV_ACCOUNT, BACKUP_ACCOUNT] {
        let rest = az.blob_rest(account);
        rest.create_container(&container)
            .await
            .ok("create container");
        let name = "dir/a b+c%#?ü.txt";
        rest.put_blob(&container, name, b"hello", &[("k", "v")])
            .await
            .ok("put blob");
        let got = rest.get_blob(&container, name, None).await.ok("get blob");
        assert_eq!(got.body, b"hello");
        let listed = rest.list_blobs(&container, None).await;
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].name, name);
        assert_eq!(listed[0].metadata.get("k").map(String::as_str), Some("v"));
        // Wrong key: the oracle's signing must be what makes requests pass.
        let wrong = rest.with_auth(Auth::SharedKey(
            support::azurite::BACKUP_KEY.replace('b', "c"),
        ));
        let denied = wrong.get_blob(&container, name, None).await;
        assert_eq!(denied.status, 403, "{}", denied.text());
    }
    // Accounts are separate: the container exists in both, the blob only where it was put.
    let anonymous = az.blob_rest(DEV_ACCOUNT).with_auth(Auth::Anonymous);
    let resp = anonymous
        .send(reqwest::Method::GET, "", &[("comp", "list")], &[], vec![])
        .await;
    assert_eq!(resp.status, 403, "{}", resp.text());

    // The access log records our requests (and not the harness's readiness probes).
    let log = az.blob_requests().await;
    assert!(log.iter().all(|e| !e.target.is_empty()));
    let lists = log.iter().filter(|e| e.is_list_blobs()).count();
    assert_eq!(lists, 2, "{log:#?}");
    assert_eq!(log.last().unwrap().status, 403);
}

#[tokio::test]
async fn queue_round_trip_with_shared_key() {
    let az = Azurite::start(Mode::SharedKeyHttp).await;
    let q = az.queue_rest(DEV_ACCOUNT);
    let name = support::unique_name("harness-q");
    q.create_queue(&name).await.ok("create queue");
    q.send_message(&name, "aGVsbG8=").await.ok("send");
    assert_eq!(q.message_count(&name).await, 1);
    let msgs = q.receive_messages(&name, 1, 30).await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].decoded_text().as_deref(), Some("hello"));
    assert_eq!(msgs[0].dequeue_count, 1);
    q.delete_message(&name, &msgs[0].id, &msgs[0].pop_receipt)
        .await
        .ok("delete");
    assert_eq!(q.message_count(&name).await, 0);
    let log = az.queue_requests().await;
    assert_eq!(log.len(), 6, "{log:#?}");
    assert!(az.blob_requests().await.is_empty());
}

#[tokio::test]
async fn oauth_https_accepts_identity_tokens_and_rejects_bad_ones() {
    let id = support::IdentityServer::start();
    let az = Azurite::start(Mode::OAuthHttps).await;
    assert!(az
        .blob_endpoint(BACKUP_ACCOUNT)
        .starts_with("https://127.0.0.1:"));
    let ca = az.ca_cert_path().expect("CA").to_path_buf();
    assert!(ca.exists());

    // Get a token the way ManagedIdentityCredential does.
    let client = reqwest::Client::new();
    let resp = client
        .get(with_query(
            &id.endpoint(),
            &[
                ("api-version", "2019-08-01"),
                ("resource", STORAGE_RESOURCE),
            ],
        ))
        .header("X-IDENTITY-HEADER", id.header_secret())
        .header("metadata", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["resource"], STORAGE_RESOURCE);
    let expires: u64 = body["expires_on"].as_str().unwrap().parse().unwrap();
    assert!(expires > 1_700_000_000);
    let token = body["access_token"].as_str().unwrap().to_string();
    assert_eq!(id.requests_for(STORAGE_RESOURCE), 1);
    id.assert_no_violations();

    // A client that trusts only the test CA reaches Azurite over HTTPS.
    let rest = az.blob_rest(BACKUP_ACCOUNT).with_auth(Auth::Bearer(token));
    let container = support::unique_name("oauth");
    rest.create_container(&container)
        .await
        .ok("create container with bearer token");
    rest.put_blob(&container, "x.bin", b"data", &[])
        .await
        .ok("put blob with bearer token");
    let listed = rest.list_blobs(&container, None).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, "x.bin");
    // Queues accept the same token.
    let q = az
        .queue_rest(DEV_ACCOUNT)
        .with_auth(Auth::Bearer(identity::storage_token()));
    let qname = support::unique_name("oauth-q");
    q.create_queue(&qname).await.ok("create queue with bearer");

    // Azurite really checks tokens: wrong audience, wrong issuer, expired.
    let wrong_aud = identity::mint_token(
        "https://management.azure.com",
        "x",
        Duration::from_secs(600),
    );
    let denied = rest
        .with_auth(Auth::Bearer(wrong_aud))
        .list_blobs_raw(&container)
        .await;
    assert_eq!(denied.status, 403, "{}", denied.text());
    assert!(denied.text().contains("Invalid token audience"));
    let expired = identity::mint_token(STORAGE_RESOURCE, "x", Duration::from_secs(0));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let denied = rest
        .with_auth(Auth::Bearer(expired))
        .list_blobs_raw(&container)
        .await;
    assert_eq!(denied.status, 403, "{}", denied.text());
    assert!(denied.text().contains("expired"), "{}", denied.text());
    // Not a JWT at all.
    let garbage = identity::storage_token().replace('.', "!");
    let denied = rest
        .with_auth(Auth::Bearer(garbage))
        .list_blobs_raw(&container)
        .await;
    assert_eq!(denied.status, 403, "{}", denied.text());

    // A client with the default roots does NOT trust the emulator's certificate.
    let untrusting = reqwest::Client::new();
    assert!(untrusting
        .get(format!("{}?comp=list", az.blob_endpoint(DEV_ACCOUNT)))
        .send()
        .await
        .is_err());
}

#[tokio::test]
async fn identity_endpoint_enforces_the_app_service_contract() {
    let id = support::IdentityServer::start();
    let client = reqwest::Client::new();
    let base = [
        ("api-version", "2019-08-01"),
        ("resource", STORAGE_RESOURCE),
    ];

    let missing = client
        .get(with_query(&id.endpoint(), &base))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 400);
    let wrong = client
        .get(with_query(&id.endpoint(), &base))
        .header("X-IDENTITY-HEADER", "nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let scope = client
        .get(with_query(
            &id.endpoint(),
            &[
                ("api-version", "2019-08-01"),
                ("resource", "https://storage.azure.com/.default"),
            ],
        ))
        .header("X-IDENTITY-HEADER", id.header_secret())
        .send()
        .await
        .unwrap();
    assert_eq!(scope.status(), 400);
    let old_api = client
        .get(with_query(
            &id.endpoint(),
            &[
                ("api-version", "2017-09-01"),
                ("resource", STORAGE_RESOURCE),
            ],
        ))
        .header("X-IDENTITY-HEADER", id.header_secret())
        .send()
        .await
        .unwrap();
    assert_eq!(old_api.status(), 400);
    assert_eq!(id.violations().len(), 4, "{:#?}", id.violations());
    assert!(id.issued_tokens().is_empty());

    // User-assigned identity: client_id is recorded and echoed.
    let ok = client
        .get(with_query(
            &id.endpoint(),
            &[
                ("api-version", "2019-08-01"),
                ("resource", "https://management.azure.com"),
                ("client_id", "11111111-2222-3333-4444-555555555555"),
            ],
        ))
        .header("X-IDENTITY-HEADER", id.header_secret())
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let body: serde_json::Value = ok.json().await.unwrap();
    assert_eq!(body["client_id"], "11111111-2222-3333-4444-555555555555");
    assert_eq!(id.requests_for("https://management.azure.com/"), 1);
    let arm_token = body["access_token"].as_str().unwrap();
    let claims = id
        .verify_bearer(
            Some(&format!("Bearer {arm_token}")),
            "https://management.azure.com/",
        )
        .expect("valid management token");
    assert_eq!(claims["appid"], "11111111-2222-3333-4444-555555555555");
    assert!(id
        .verify_bearer(Some(&format!("Bearer {arm_token}")), STORAGE_RESOURCE)
        .is_err());
    assert!(id
        .verify_bearer(
            Some(&format!("Bearer {}", identity::storage_token())),
            STORAGE_RESOURCE
        )
        .is_err());
    assert!(id.verify_bearer(None, STORAGE_RESOURCE).is_err());
    let seen = id.client_ids_seen();
    assert_eq!(
        seen.get(&Some("11111111-2222-3333-4444-555555555555".to_string())),
        Some(&1)
    );

    // Injected failures.
    id.fail_next(&[500]);
    let failed = client
        .get(with_query(&id.endpoint(), &base))
        .header("X-IDENTITY-HEADER", id.header_secret())
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), 500);
}

#[tokio::test]
async fn dropping_azurite_kills_its_processes() {
    let az = Azurite::start(Mode::SharedKeyHttp).await;
    let (bp, qp) = (az.blob_port(), az.queue_port());
    let pids = az.pids();
    assert!(port_open(bp) && port_open(qp));
    drop(az);
    assert!(!port_open(bp), "blob port still open after drop");
    assert!(!port_open(qp), "queue port still open after drop");
    for pid in pids {
        // kill(pid, 0) fails with ESRCH once the process is gone (it was reaped by drop).
        let alive = unsafe { libc::kill(pid as libc::pid_t, 0) } == 0;
        assert!(!alive, "process {pid} still alive");
        // No member of its process group either (node helpers).
        let group_alive = unsafe { libc::kill(-(pid as libc::pid_t), 0) } == 0;
        assert!(!group_alive, "process group {pid} still has members");
    }
}

#[tokio::test]
async fn counting_proxy_forwards_verbatim_and_counts() {
    let az = Azurite::start(Mode::SharedKeyHttp).await;
    let proxy = support::CountingProxy::start(az.blob_port());
    let rest = support::StorageRest::new(
        az.http_client(),
        proxy.endpoint(DEV_ACCOUNT),
        DEV_ACCOUNT,
        Auth::SharedKey(support::DEV_KEY.to_string()),
    );
    let container = support::unique_name("proxy");
    rest.create_container(&container).await.ok("create");
    // Percent-encoded names must reach Azurite unchanged or the Shared Key signature breaks.
    let name = "a b/ü%2F#?.txt";
    rest.put_blob(&container, name, b"1", &[]).await.ok("put");
    let listed = rest.list_blobs(&container, None).await;
    assert_eq!(listed[0].name, name);
    assert_eq!(proxy.count("PUT", None), 2, "{:#?}", proxy.summary());
    assert_eq!(proxy.count("GET", Some("list")), 1);
    assert_eq!(
        proxy
            .requests()
            .iter()
            .filter(|r| r.is_list_blobs())
            .count(),
        1
    );
    // Azurite saw exactly the same requests.
    let log = az.blob_requests().await;
    let via_proxy: Vec<_> = proxy.requests().into_iter().map(|r| r.target).collect();
    let seen: Vec<_> = log.into_iter().map(|e| e.target).collect();
    assert_eq!(via_proxy, seen);
    proxy.reset();
    assert!(proxy.requests().is_empty());
}

#[tokio::test]
async fn host_payloads_match_the_captured_shapes() {
    use support::host;
    let v = host::queue_invocation("hello!!", 1);
    assert_eq!(v["Data"]["msg"], "\"hello!!\"");
    assert_eq!(v["Metadata"]["DequeueCount"], "1");
    let id = v["Metadata"]["Id"].as_str().unwrap();
    assert!(id.starts_with('"') && id.ends_with('"'), "{id}");
    assert!(v["Metadata"]["PopReceipt"]
        .as_str()
        .unwrap()
        .starts_with('"'));
    let t = v["Metadata"]["InsertionTime"].as_str().unwrap();
    assert!(t.ends_with("+00:00") && !t.contains('.'), "{t}");
    assert_eq!(v["Metadata"]["sys"]["MethodName"], "BackupWorker");
    let now = v["Metadata"]["sys"]["UtcNow"].as_str().unwrap();
    assert_eq!(now.split('.').nth(1).unwrap().len(), 8, "{now}"); // 7 digits + Z

    // JSON message: double-encoded, and its properties shadow Metadata keys.
    let v = host::queue_invocation(r#"{"a":1,"id":"evil"}"#, 2);
    assert_eq!(v["Data"]["msg"], r#""{\"a\":1,\"id\":\"evil\"}""#);
    let once: String = serde_json::from_str(v["Data"]["msg"].as_str().unwrap()).unwrap();
    assert_eq!(once, r#"{"a":1,"id":"evil"}"#);
    assert_eq!(v["Metadata"]["a"], "1");
    assert_eq!(v["Metadata"]["id"], "\"evil\"");
    assert!(v["Metadata"].get("Id").is_none());

    let t = host::timer_invocation(true, None);
    assert_eq!(t["Data"]["timer"]["IsPastDue"], true);
    assert!(t["Data"]["timer"]["ScheduleStatus"].is_null());
    let t = host::timer_invocation(false, Some(host::ScheduleStatus::first_run()));
    assert_eq!(
        t["Data"]["timer"]["ScheduleStatus"]["Last"],
        "0001-01-01T00:00:00"
    );

    assert!(host::check_answer(r#"{"Outputs":{},"Logs":["x"],"ReturnValue":null}"#).is_ok());
    assert!(host::check_answer(r#"{"Logs":[1]}"#).is_err());
    assert!(host::check_answer("ok").is_err());
}

/// What the fake function saw.
#[derive(Clone, Default)]
struct Seen {
    calls: Arc<Mutex<Vec<(axum::http::HeaderMap, serde_json::Value)>>>,
}

/// A stand-in BackupWorker: "ok"/JSON messages succeed, "fail" answers 500, "nonjson" answers
/// 200 with a non-JSON body (which the host counts as a failure).
async fn fake_worker(
    axum::extract::State(seen): axum::extract::State<Seen>,
    headers: axum::http::HeaderMap,
    body: String,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let v: serde_json::Value = serde_json::from_str(&body).expect("host sends JSON");
    seen.calls.lock().unwrap().push((headers, v.clone()));
    let once: String = serde_json::from_str(v["Data"]["msg"].as_str().unwrap()).unwrap();
    match once.as_str() {
        "fail" => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
        "nonjson" => (axum::http::StatusCode::OK, "done").into_response(),
        _ => axum::Json(serde_json::json!({"Outputs": {}, "Logs": ["ok"], "ReturnValue": null}))
            .into_response(),
    }
}

#[tokio::test]
async fn queue_trigger_emulation_deletes_retries_and_poisons() {
    use base64::Engine;
    use support::host::{Delivery, QueueAccess, QueueTrigger};
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);

    let az = Azurite::start(Mode::SharedKeyHttp).await;
    let seen = Seen::default();
    let app = axum::Router::new()
        .route("/BackupWorker", axum::routing::post(fake_worker))
        .with_state(seen.clone());
    let server = support::BackgroundServer::start(app);

    let q = az.queue_rest(DEV_ACCOUNT);
    let queue = support::unique_name("trigger");
    let json_msg = r#"{"v":1,"container":"c","blob":"a \"b\".txt"}"#;
    for text in ["ok", "fail", "nonjson", json_msg] {
        q.put_raw(&queue, &b64(text)).await;
    }
    q.put_raw(&queue, "plain text, not base64!").await;

    let trigger = QueueTrigger {
        access: &q,
        port: server.addr().port(),
        function: "BackupWorker".into(),
        binding: "msg".into(),
        queue: queue.clone(),
        max_dequeue_count: 5,
        lease_secs: 60,
    };
    let report = trigger.drain(50).await;
    // ok + json succeed; fail and nonjson are tried 5 times each then poisoned; the
    // non-base64 message is poisoned without an invocation.
    assert_eq!(report.succeeded, 2, "{report:#?}");
    assert_eq!(report.failed, 8);
    assert_eq!(report.poisoned, 3);
    assert_eq!(seen.calls.lock().unwrap().len(), 12);
    assert_eq!(q.message_count(&queue).await, 0);
    let mut poison: Vec<String> = q
        .peek_messages(&trigger.poison_queue())
        .await
        .into_iter()
        .map(|m| m.text)
        .collect();
    poison.sort();
    let mut expected = vec![
        b64("fail"),
        b64("nonjson"),
        "plain text, not base64!".to_string(),
    ];
    expected.sort();
    assert_eq!(poison, expected);
    let last_fail = report
        .deliveries
        .iter()
        .filter_map(|d| match d {
            Delivery::Poisoned {
                dequeue_count,
                response: Some(_),
                ..
            } => Some(*dequeue_count),
            _ => None,
        })
        .collect::<Vec<_>>();
    assert_eq!(last_fail, vec![5, 5]);

    // What the function received looks like the host's requests.
    let calls = seen.calls.lock().unwrap().clone();
    for (headers, v) in &calls {
        let h = |n: &str| headers.get(n).and_then(|x| x.to_str().ok()).unwrap_or("");
        assert_eq!(h("transfer-encoding"), "chunked");
        assert!(headers.get("content-length").is_none());
        assert_eq!(h("content-type"), "application/json; charset=utf-8");
        assert!(h("user-agent").starts_with("Azure-Functions-Host/4."));
        assert_eq!(h("x-azure-functions-invocationid").len(), 36);
        assert!(h("traceparent").starts_with("00-"));
        let count: u32 = v["Metadata"]["DequeueCount"]
            .as_str()
            .expect("DequeueCount is a string")
            .parse()
            .unwrap();
        assert!((1..=5).contains(&count));
        let id = v["Metadata"]["Id"].as_str().unwrap();
        assert!(id.starts_with('"') && id.len() > 2, "{id}");
        assert_eq!(v["Metadata"]["sys"]["MethodName"], "BackupWorker");
    }
    let json_call = calls
        .iter()
        .map(|(_, v)| v)
        .find(|v| v["Data"]["msg"].as_str().unwrap().contains("container"))
        .expect("json message delivered");
    let once: String = serde_json::from_str(json_call["Data"]["msg"].as_str().unwrap()).unwrap();
    assert_eq!(once, json_msg);
    assert_eq!(json_call["Metadata"]["container"], "\"c\"");
    assert_eq!(json_call["Metadata"]["v"], "1");
}

/// A minimal custom handler in Node (present wherever Azurite runs): answers `GET /`, prints its
/// environment's variable names, and slowly starts so readiness polling is exercised.
const NODE_HANDLER: &str = r#"
console.log("ENV " + JSON.stringify(Object.keys(process.env).sort()));
console.error("starting on " + process.env.FUNCTIONS_CUSTOMHANDLER_PORT);
setTimeout(() => {
  require("http").createServer((req, res) => {
    console.log(req.method + " " + req.url);
    res.end("{}");
  }).listen(Number(process.env.FUNCTIONS_CUSTOMHANDLER_PORT), "127.0.0.1");
}, 300);
"#;

#[tokio::test]
async fn handler_runner_gives_a_clean_env_waits_for_ready_and_kills() {
    let node = std::path::PathBuf::from("node");
    let env = vec![("LAKEGUARD_LOG".to_string(), "debug".to_string())];
    let mut handler = support::Handler::spawn_program(&node, &["-e", NODE_HANDLER], &env).await;
    let port = handler.port();
    assert!(port_open(port));
    let resp = reqwest::get(format!("{}/", handler.base_url()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let logs = handler.logs();
    let env_line = logs
        .lines()
        .find(|l| l.starts_with("ENV "))
        .expect("env line");
    let names: Vec<String> = serde_json::from_str(&env_line[4..]).unwrap();
    assert!(names.contains(&"FUNCTIONS_CUSTOMHANDLER_PORT".to_string()));
    assert!(names.contains(&"LAKEGUARD_LOG".to_string()));
    assert!(names.contains(&"PATH".to_string()));
    // Nothing leaks from the test process (cargo sets CARGO_* for tests).
    assert!(!names.iter().any(|n| n.starts_with("CARGO")), "{names:?}");
    assert!(handler.stderr().contains(&format!("starting on {port}")));
    assert!(handler.stdout().contains("GET /"));
    assert!(handler.is_running());
    support::assert_free_of(&logs, &["a-secret-that-is-not-there"]);
    let leaked = std::panic::catch_unwind(|| support::assert_free_of(&logs, &["starting on"]));
    assert!(
        leaked.is_err(),
        "assert_free_of must catch a secret in the logs"
    );

    // SIGTERM ends it; drop of another instance kills it.
    handler.terminate();
    assert!(handler.wait_exit(Duration::from_secs(10)).await.is_some());
    let second = support::Handler::spawn_program(&node, &["-e", NODE_HANDLER], &env).await;
    let port2 = second.port();
    assert!(port_open(port2));
    drop(second);
    assert!(!port_open(port2));
}

#[tokio::test]
async fn queue_trigger_runs_deliveries_in_parallel() {
    use base64::Engine;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use support::host::{QueueAccess, QueueTrigger};

    #[derive(Clone, Default)]
    struct Load {
        now: Arc<AtomicUsize>,
        peak: Arc<AtomicUsize>,
    }
    async fn slow(
        axum::extract::State(load): axum::extract::State<Load>,
    ) -> axum::Json<serde_json::Value> {
        let n = load.now.fetch_add(1, Ordering::SeqCst) + 1;
        load.peak.fetch_max(n, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(150)).await;
        load.now.fetch_sub(1, Ordering::SeqCst);
        axum::Json(serde_json::json!({"Outputs": {}, "Logs": []}))
    }

    let az = Azurite::start(Mode::SharedKeyHttp).await;
    let load = Load::default();
    let app = axum::Router::new()
        .route("/BackupWorker", axum::routing::post(slow))
        .with_state(load.clone());
    let server = support::BackgroundServer::start(app);
    let q = az.queue_rest(DEV_ACCOUNT);
    let queue = support::unique_name("parallel");
    for i in 0..12 {
        q.put_raw(
            &queue,
            &base64::engine::general_purpose::STANDARD.encode(format!("m{i}")),
        )
        .await;
    }
    let trigger = QueueTrigger::backup_worker(&q, server.addr().port(), &queue);
    let report = trigger.drain_parallel(4, 100).await;
    assert_eq!(report.succeeded, 12, "{report:#?}");
    assert_eq!(q.message_count(&queue).await, 0);
    let peak = load.peak.load(Ordering::SeqCst);
    assert!((2..=4).contains(&peak), "peak concurrency {peak}");
}
