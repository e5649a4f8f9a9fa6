//! The Azure Functions host (4.x) stand-in: builds the exact payloads the host sends to a custom
//! handler, sends them the way the host does, checks the answers the way the host does, and
//! emulates the queue trigger's delivery loop (receive -> invoke -> delete / retry / poison)
//! against the real Azurite queue. Facts: /work/shared/notes/custom-handler-protocol.md.
//!
//! Encoding rules reproduced here (from the host's source and captured payloads):
//! * Every binding value that is not a JSON object/array is JSON-serialized and then sent as a
//!   JSON STRING holding that serialization ("double encoding"): message text `hello` arrives as
//!   `"\"hello\""`, and the JSON message `{"a":1}` as `"\"{\\\"a\\\":1}\""`.
//! * Queue metadata: `DequeueCount` is a string (`"1"`), `Id` and `PopReceipt` are double-encoded,
//!   times have no fractional seconds, `sys` = {MethodName, UtcNow, RandGuid}. The top-level
//!   properties of a JSON message are merged into Metadata and override built-in keys
//!   (case-insensitively), so a handler must never trust Metadata keys a message can carry.
//! * Requests: `POST /{FunctionName}`, `Content-Type: application/json; charset=utf-8`, a chunked
//!   body (no Content-Length), `X-Azure-Functions-InvocationId`, `X-Azure-Functions-HostVersion`,
//!   `traceparent`, `User-Agent: Azure-Functions-Host/4.x`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use reqwest::StatusCode;
use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc2822;
use time::OffsetDateTime;

use super::rest::{QueueMessage, StorageRest};

/// Host version announced in headers (a real 4.x build number).
pub const HOST_VERSION: &str = "4.1036.1.23224";
/// The host's defaults for queues (host.json `extensions.queues`).
pub const MAX_DEQUEUE_COUNT: u32 = 5;

/// A GUID-shaped random-enough id (no uuid crate needed).
pub fn guid() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let a = super::random_u64() ^ N.fetch_add(1, Ordering::Relaxed);
    let b = super::random_u64();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        (a >> 32) as u32,
        (a >> 16) as u16,
        (a as u16) & 0x0fff,
        ((b >> 48) as u16 & 0x3fff) | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

/// JSON-serialize a string and wrap the result in a JSON string: the host's double encoding.
pub fn double_encode(s: &str) -> Value {
    Value::String(Value::String(s.to_string()).to_string())
}

/// `2025-02-18T03:06:19+00:00` (the host's DateTimeOffset form, no fractional seconds).
pub fn host_time(t: OffsetDateTime) -> String {
    let f =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]+00:00");
    t.to_offset(time::UtcOffset::UTC).format(&f).unwrap()
}

/// `2025-02-18T03:06:20.7562691Z` (sys.UtcNow: seven fractional digits).
pub fn host_utc_now() -> String {
    let f = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:7]Z"
    );
    OffsetDateTime::now_utc().format(&f).unwrap()
}

fn sys_block(method_name: &str) -> Value {
    // RandGuid: the host prints a GUID whose tail is zeros.
    let g = guid();
    json!({
        "MethodName": method_name,
        "UtcNow": host_utc_now(),
        "RandGuid": format!("{}-0000-0000-0000-000000000000", &g[..8]),
    })
}

/// Queue message facts the host puts in Metadata.
#[derive(Debug, Clone)]
pub struct QueueMeta {
    pub id: String,
    pub pop_receipt: String,
    pub dequeue_count: u32,
    pub insertion_time: OffsetDateTime,
    pub expiration_time: OffsetDateTime,
    pub next_visible_time: OffsetDateTime,
}

impl QueueMeta {
    /// Plausible values for a message inserted just now.
    pub fn new(dequeue_count: u32) -> QueueMeta {
        let now = OffsetDateTime::now_utc();
        QueueMeta {
            id: guid(),
            pop_receipt: base64::engine::general_purpose::STANDARD
                .encode(guid().as_bytes())
                .trim_end_matches('=')
                .to_string(),
            dequeue_count,
            insertion_time: now,
            expiration_time: now + time::Duration::days(7),
            next_visible_time: now + time::Duration::minutes(10),
        }
    }

    /// From a message received from the real queue.
    pub fn from_message(m: &QueueMessage) -> QueueMeta {
        let t = |s: &str| {
            OffsetDateTime::parse(s, &Rfc2822)
                .unwrap_or_else(|e| panic!("queue time {s:?} not RFC 1123: {e}"))
        };
        QueueMeta {
            id: m.id.clone(),
            pop_receipt: m.pop_receipt.clone(),
            dequeue_count: m.dequeue_count,
            insertion_time: t(&m.insertion_time),
            expiration_time: t(&m.expiration_time),
            next_visible_time: t(&m.time_next_visible),
        }
    }
}

/// The host's encoding of one Metadata value merged from a JSON message.
fn metadata_value(v: &Value) -> Value {
    match v {
        Value::Object(_) | Value::Array(_) => v.clone(),
        other => Value::String(other.to_string()),
    }
}

/// Payload of a queue-triggered invocation: `msg_text` is the DECODED message text (what the
/// trigger gives the function after base64-decoding the stored message).
pub fn queue_payload(binding: &str, method_name: &str, msg_text: &str, meta: &QueueMeta) -> Value {
    let mut metadata = Map::new();
    metadata.insert(
        "DequeueCount".into(),
        Value::String(meta.dequeue_count.to_string()),
    );
    metadata.insert(
        "ExpirationTime".into(),
        Value::String(host_time(meta.expiration_time)),
    );
    metadata.insert("Id".into(), double_encode(&meta.id));
    metadata.insert(
        "InsertionTime".into(),
        Value::String(host_time(meta.insertion_time)),
    );
    metadata.insert(
        "NextVisibleTime".into(),
        Value::String(host_time(meta.next_visible_time)),
    );
    metadata.insert("PopReceipt".into(), double_encode(&meta.pop_receipt));
    // A JSON-object message: its top-level properties join Metadata and win over built-ins.
    if let Ok(Value::Object(props)) = serde_json::from_str::<Value>(msg_text) {
        for (k, v) in props {
            let existing: Vec<String> = metadata
                .keys()
                .filter(|e| e.eq_ignore_ascii_case(&k))
                .cloned()
                .collect();
            for e in existing {
                metadata.remove(&e);
            }
            metadata.insert(k, metadata_value(&v));
        }
    }
    metadata.insert("sys".into(), sys_block(method_name));
    let mut data = Map::new();
    data.insert(binding.to_string(), double_encode(msg_text));
    json!({"Data": data, "Metadata": metadata})
}

/// Queue invocation with binding `msg`, method `BackupWorker` and fresh metadata.
pub fn queue_invocation(msg_text: &str, dequeue_count: u32) -> Value {
    queue_payload(
        "msg",
        "BackupWorker",
        msg_text,
        &QueueMeta::new(dequeue_count),
    )
}

/// `ScheduleStatus` of a timer payload (times passed through as given: the host may send `Last`
/// without an offset, e.g. `0001-01-01T00:00:00`).
#[derive(Debug, Clone)]
pub struct ScheduleStatus {
    pub last: String,
    pub next: String,
    pub last_updated: String,
}

impl ScheduleStatus {
    /// What a never-run timer reports.
    pub fn first_run() -> ScheduleStatus {
        let now = OffsetDateTime::now_utc();
        ScheduleStatus {
            last: "0001-01-01T00:00:00".into(),
            next: host_time(now + time::Duration::hours(1)),
            last_updated: host_time(now),
        }
    }
}

/// Payload of a timer-triggered invocation (binding `binding`).
pub fn timer_payload(
    binding: &str,
    method_name: &str,
    past_due: bool,
    status: Option<ScheduleStatus>,
) -> Value {
    let status = match status {
        Some(s) => json!({"Last": s.last, "Next": s.next, "LastUpdated": s.last_updated}),
        None => Value::Null,
    };
    let mut data = Map::new();
    data.insert(
        binding.to_string(),
        json!({"Schedule": {"AdjustForDST": true}, "ScheduleStatus": status, "IsPastDue": past_due}),
    );
    json!({"Data": data, "Metadata": {"sys": sys_block(method_name)}})
}

/// Timer invocation with binding `timer`, method `Reconcile`.
pub fn timer_invocation(past_due: bool, schedule_status: Option<ScheduleStatus>) -> Value {
    timer_payload("timer", "Reconcile", past_due, schedule_status)
}

/// `Data.req` of a NON-forwarded HTTP trigger: `{Url, Method, Query, Headers, Params,
/// Identities, Body}`; query values comma-joined, headers name -> array, Body omitted if empty.
pub fn http_payload(
    binding: &str,
    method_name: &str,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Value {
    let parsed = url::Url::parse(url).expect("absolute url");
    let mut query: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in parsed.query_pairs() {
        query
            .entry(k.into_owned())
            .or_default()
            .push(v.into_owned());
    }
    let query: Map<String, Value> = query
        .into_iter()
        .map(|(k, v)| (k, Value::String(v.join(","))))
        .collect();
    let mut hdrs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in headers {
        hdrs.entry(k.to_string()).or_default().push(v.to_string());
    }
    let mut req = json!({
        "Url": url,
        "Method": method,
        "Query": query,
        "Headers": hdrs,
        "Params": {},
        "Identities": [],
    });
    if let Some(b) = body.filter(|b| !b.is_empty()) {
        req["Body"] = Value::String(b.to_string());
    }
    let mut data = Map::new();
    data.insert(binding.to_string(), req);
    json!({"Data": data, "Metadata": {"sys": sys_block(method_name)}})
}

/// The name of the trigger binding in `functions/<function>/function.json` (what the host uses
/// as the `Data` key). Panics if the file or the trigger is missing.
pub fn trigger_binding(function: &str) -> String {
    try_trigger_binding(function)
        .unwrap_or_else(|| panic!("functions/{function}/function.json: no trigger binding"))
}

/// `trigger_binding` that gives `None` when the function folder does not exist (yet).
pub fn try_trigger_binding(function: &str) -> Option<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("functions")
        .join(function)
        .join("function.json");
    let text = std::fs::read_to_string(&path).ok()?;
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    v["bindings"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| b["type"].as_str().is_some_and(|t| t.ends_with("Trigger")))
        .and_then(|b| b["name"].as_str())
        .map(str::to_string)
}

/// A handler's answer to one invocation.
#[derive(Debug, Clone)]
pub struct InvokeResponse {
    pub status: StatusCode,
    pub content_type: Option<String>,
    pub body: String,
}

impl InvokeResponse {
    /// The body as JSON; panics (like the host fails the invocation) if it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "handler answered non-JSON ({e}), status {}: {}",
                self.status, self.body
            )
        })
    }

    /// The host's verdict: the invocation succeeded iff 2xx AND a JSON object body whose
    /// `Outputs` (if any) is an object and `Logs` (if any) an array of strings.
    pub fn host_succeeded(&self) -> bool {
        self.status.is_success() && check_answer(&self.body).is_ok()
    }

    /// `Outputs.<name>`.
    pub fn output(&self, name: &str) -> Option<Value> {
        self.json()
            .get("Outputs")
            .and_then(|o| o.get(name))
            .cloned()
    }

    /// `Logs` lines.
    pub fn logs(&self) -> Vec<String> {
        self.json()
            .get("Logs")
            .and_then(|l| l.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The shape checks the host applies to a custom handler's answer.
pub fn check_answer(body: &str) -> Result<Value, String> {
    let v: Value = serde_json::from_str(body).map_err(|e| format!("not JSON: {e}"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    if let Some(o) = obj.get("Outputs") {
        if !(o.is_object() || o.is_null()) {
            return Err("Outputs is not an object".into());
        }
    }
    if let Some(l) = obj.get("Logs") {
        let ok = l.is_null() || l.as_array().is_some_and(|a| a.iter().all(Value::is_string));
        if !ok {
            return Err("Logs is not an array of strings".into());
        }
    }
    Ok(v)
}

fn host_client() -> reqwest::Client {
    reqwest::Client::builder()
        // The host's default functionTimeout on Flex/Premium is 30 min; tests should be faster.
        .timeout(Duration::from_secs(600))
        .build()
        .unwrap()
}

fn traceparent() -> String {
    format!(
        "00-{:016x}{:016x}-{:016x}-00",
        super::random_u64(),
        super::random_u64(),
        super::random_u64()
    )
}

/// `POST /{function}` exactly like the host: chunked JSON body and the host's headers.
pub async fn invoke_raw(port: u16, function: &str, payload: &Value) -> InvokeResponse {
    let bytes = serde_json::to_vec(payload).unwrap();
    // A stream body has no known length, so hyper sends Transfer-Encoding: chunked like the host.
    let stream = futures::stream::iter(
        bytes
            .chunks(8192)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let resp = host_client()
        .post(format!("http://127.0.0.1:{port}/{function}"))
        .header("Content-Type", "application/json; charset=utf-8")
        .header("X-Azure-Functions-InvocationId", guid())
        .header("X-Azure-Functions-HostVersion", HOST_VERSION)
        .header("traceparent", traceparent())
        .header("User-Agent", format!("Azure-Functions-Host/{HOST_VERSION}"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await;
    // The worker process died (or never listened): the host records a failed invocation.
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            return InvokeResponse {
                status: StatusCode::BAD_GATEWAY,
                content_type: None,
                body: format!("POST /{function}: the worker did not answer: {e}"),
            }
        }
    };
    let status = resp.status();
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = match resp.text().await {
        Ok(b) => b,
        Err(e) => {
            return InvokeResponse {
                status: StatusCode::BAD_GATEWAY,
                content_type,
                body: format!("POST /{function}: the answer was cut off: {e}"),
            }
        }
    };
    InvokeResponse {
        status,
        content_type,
        body,
    }
}

/// Invokes and returns `(status, JSON body)`; panics if the body is not JSON (the host would fail
/// the invocation whatever the status).
pub async fn invoke(port: u16, function: &str, payload: &Value) -> (StatusCode, Value) {
    let r = invoke_raw(port, function, payload).await;
    let v = r.json();
    (r.status, v)
}

/// A response to a forwarded HTTP request (returned to the caller as is).
#[derive(Debug, Clone)]
pub struct ForwardedResponse {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl ForwardedResponse {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("non-JSON answer ({e}), {}: {}", self.status, self.body))
    }
}

/// An `enableForwardingHttpRequest` call: the original request at its original path (with the
/// route prefix, e.g. `/api/snapshot?container=raw&code=...`), method, headers and body, plus
/// `X-Azure-Functions-InvocationId`.
pub async fn forwarded_http(
    port: u16,
    method: &str,
    path_and_query: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> ForwardedResponse {
    assert!(path_and_query.starts_with('/'), "path must start with /");
    let mut req = host_client()
        .request(
            reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
            format!("http://127.0.0.1:{port}{path_and_query}"),
        )
        .header("X-Azure-Functions-InvocationId", guid());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {path_and_query}: {e}"));
    ForwardedResponse {
        status: resp.status(),
        headers: resp.headers().clone(),
        body: resp.text().await.expect("read answer"),
    }
}

// ---------------------------------------------------------------------------------------------
// Queue trigger emulation

/// The queue operations the trigger needs. Implemented by the raw REST oracle (`StorageRest`);
/// kept as a trait so another client can be plugged in.
#[async_trait::async_trait]
pub trait QueueAccess: Send + Sync {
    /// Dequeue one message, invisible for `visibility_timeout_secs`.
    async fn receive_one(&self, queue: &str, visibility_timeout_secs: u32) -> Option<QueueMessage>;
    async fn delete(&self, queue: &str, msg: &QueueMessage);
    /// Make a failed message visible again (the host's `visibilityTimeout`, default 0).
    async fn release(&self, queue: &str, msg: &QueueMessage, visibility_timeout_secs: u32);
    /// Put raw text (already base64) on a queue, creating the queue if needed.
    async fn put_raw(&self, queue: &str, text: &str);
}

#[async_trait::async_trait]
impl QueueAccess for StorageRest {
    async fn receive_one(&self, queue: &str, visibility_timeout_secs: u32) -> Option<QueueMessage> {
        self.receive_messages(queue, 1, visibility_timeout_secs)
            .await
            .into_iter()
            .next()
    }

    async fn delete(&self, queue: &str, msg: &QueueMessage) {
        self.delete_message(queue, &msg.id, &msg.pop_receipt)
            .await
            .ok("delete message");
    }

    async fn release(&self, queue: &str, msg: &QueueMessage, visibility_timeout_secs: u32) {
        let vt = visibility_timeout_secs.to_string();
        // Update Message with an empty body keeps the text and changes only the visibility.
        self.send(
            reqwest::Method::PUT,
            &format!("/{queue}/messages/{}", msg.id),
            &[
                ("popreceipt", msg.pop_receipt.as_str()),
                ("visibilitytimeout", vt.as_str()),
            ],
            &[],
            vec![],
        )
        .await
        .ok("update message visibility");
    }

    async fn put_raw(&self, queue: &str, text: &str) {
        let created = self.create_queue(queue).await;
        assert!(
            created.is_success() || created.status == 409,
            "create queue {queue}: {}",
            created.status
        );
        self.send_message(queue, text).await.ok("put message");
    }
}

/// What happened to one message.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// 2xx + valid answer: the message was deleted.
    Succeeded {
        text: String,
        response: InvokeResponse,
    },
    /// The invocation failed; the message is visible again with a higher DequeueCount.
    Failed {
        text: String,
        dequeue_count: u32,
        response: InvokeResponse,
    },
    /// Moved to `<queue>-poison` (after `max_dequeue_count` failures, or at once when the
    /// stored text is not valid base64: the trigger cannot decode it and never calls the function).
    Poisoned {
        raw_text: String,
        dequeue_count: u32,
        response: Option<InvokeResponse>,
    },
}

/// Totals of a drain.
#[derive(Debug, Clone, Default)]
pub struct DrainReport {
    pub invocations: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub poisoned: usize,
    pub deliveries: Vec<Delivery>,
}

/// The queue trigger: receive from the real queue, decode base64, invoke the function with the
/// host's payload, then delete on success; on failure release the message (visibility 0, the
/// host default) or, once its DequeueCount reaches `max_dequeue_count`, copy it to
/// `<queue>-poison` and delete it.
pub struct QueueTrigger<'a> {
    pub access: &'a dyn QueueAccess,
    pub port: u16,
    pub function: String,
    pub binding: String,
    pub queue: String,
    pub max_dequeue_count: u32,
    /// Invisibility while the invocation runs (the host renews; we just pick a long one).
    pub lease_secs: u32,
}

impl<'a> QueueTrigger<'a> {
    /// `BackupWorker` with binding name read from its function.json when present, else `msg`.
    pub fn backup_worker(access: &'a dyn QueueAccess, port: u16, queue: &str) -> Self {
        let binding = try_trigger_binding("BackupWorker").unwrap_or_else(|| "msg".to_string());
        QueueTrigger {
            access,
            port,
            function: "BackupWorker".into(),
            binding,
            queue: queue.to_string(),
            max_dequeue_count: MAX_DEQUEUE_COUNT,
            lease_secs: 600,
        }
    }

    /// `ReconcileWorker` on a continuation queue (reconcile hops, producer hops, restore
    /// chunks).
    pub fn reconcile_worker(access: &'a dyn QueueAccess, port: u16, queue: &str) -> Self {
        QueueTrigger {
            access,
            port,
            function: "ReconcileWorker".into(),
            binding: trigger_binding("ReconcileWorker"),
            queue: queue.to_string(),
            max_dequeue_count: MAX_DEQUEUE_COUNT,
            lease_secs: 600,
        }
    }

    /// `EventBackup` on the event queue.
    pub fn event_backup(access: &'a dyn QueueAccess, port: u16, queue: &str) -> Self {
        QueueTrigger {
            access,
            port,
            function: "EventBackup".into(),
            binding: trigger_binding("EventBackup"),
            queue: queue.to_string(),
            max_dequeue_count: MAX_DEQUEUE_COUNT,
            lease_secs: 600,
        }
    }

    pub fn poison_queue(&self) -> String {
        format!("{}-poison", self.queue)
    }

    /// Handles one message; `None` if the queue is empty (or absent).
    pub async fn run_once(&self) -> Option<Delivery> {
        let msg = self
            .access
            .receive_one(&self.queue, self.lease_secs)
            .await?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(msg.text.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok());
        let Some(text) = decoded else {
            self.access.put_raw(&self.poison_queue(), &msg.text).await;
            self.access.delete(&self.queue, &msg).await;
            return Some(Delivery::Poisoned {
                raw_text: msg.text,
                dequeue_count: msg.dequeue_count,
                response: None,
            });
        };
        let meta = QueueMeta::from_message(&msg);
        let payload = queue_payload(&self.binding, &self.function, &text, &meta);
        let response = invoke_raw(self.port, &self.function, &payload).await;
        if response.host_succeeded() {
            self.access.delete(&self.queue, &msg).await;
            return Some(Delivery::Succeeded { text, response });
        }
        if msg.dequeue_count >= self.max_dequeue_count {
            self.access.put_raw(&self.poison_queue(), &msg.text).await;
            self.access.delete(&self.queue, &msg).await;
            return Some(Delivery::Poisoned {
                raw_text: msg.text,
                dequeue_count: msg.dequeue_count,
                response: Some(response),
            });
        }
        self.access.release(&self.queue, &msg, 0).await;
        Some(Delivery::Failed {
            text,
            dequeue_count: msg.dequeue_count,
            response,
        })
    }

    /// Like `drain`, with up to `parallelism` deliveries in flight at once, as the host runs a
    /// queue function (up to batchSize + newBatchThreshold = 24 by default, per instance). Rounds
    /// repeat until a round finds the queue empty everywhere (a failed message released by one
    /// delivery may reappear after another delivery has seen the queue empty).
    pub async fn drain_parallel(&self, parallelism: usize, max_invocations: usize) -> DrainReport {
        let total = std::sync::Mutex::new(DrainReport::default());
        loop {
            let before = total.lock().unwrap().invocations;
            let lanes = (0..parallelism.max(1)).map(|_| async {
                while let Some(d) = self.run_once().await {
                    let mut t = total.lock().unwrap();
                    t.invocations += 1;
                    match &d {
                        Delivery::Succeeded { .. } => t.succeeded += 1,
                        Delivery::Failed { .. } => t.failed += 1,
                        Delivery::Poisoned { .. } => t.poisoned += 1,
                    }
                    t.deliveries.push(d);
                    assert!(
                        t.invocations <= max_invocations,
                        "queue {} not drained after {max_invocations} deliveries",
                        self.queue
                    );
                }
            });
            futures::future::join_all(lanes).await;
            if total.lock().unwrap().invocations == before {
                break;
            }
        }
        total.into_inner().unwrap()
    }

    /// Runs until the queue is empty or `max_invocations` deliveries were made (then panics:
    /// a test that never drains is a bug).
    pub async fn drain(&self, max_invocations: usize) -> DrainReport {
        let mut report = DrainReport::default();
        while let Some(d) = self.run_once().await {
            report.invocations += 1;
            match &d {
                Delivery::Succeeded { .. } => report.succeeded += 1,
                Delivery::Failed { .. } => report.failed += 1,
                Delivery::Poisoned { .. } => report.poisoned += 1,
            }
            report.deliveries.push(d);
            assert!(
                report.invocations <= max_invocations,
                "queue {} not drained after {max_invocations} deliveries",
                self.queue
            );
        }
        report
    }
}
