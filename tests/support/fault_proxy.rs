//! A fault-injecting loopback proxy in front of Azurite's blob AND queue services (tests/chaos.rs).
//!
//! Forwarding is verbatim, as in `counting_proxy`: same method, same request target (a re-encoded
//! path would break Shared Key signatures and change blob names), same headers including `Host`
//! (Azurite checks that a copy source's host equals the request's, and both then name this proxy).
//! Plain HTTP only (`Mode::SharedKeyHttp`). Every connection is served by hyper directly (not
//! axum) because one fault needs to close a connection without answering at all.
//!
//! # Faults
//! Each request lakeguard makes gets at most one fault, chosen when faults are on (`set_rates`):
//! - **busy**: `503 ServerBusy`, not forwarded (throttling; retryable);
//! - **drop**: the connection is closed before anything is forwarded (nothing happened upstream);
//! - **lost**: the request is forwarded, Azurite completes it, its whole answer is read, and then
//!   the client's connection is closed without a response: the ambiguous failure (a snapshot, a
//!   Put Message, a Put Block List or a Delete Message that happened although the client saw an
//!   error).
//!
//! The choice is a function of the seed, the request's identity (service, method, path, `comp`)
//! and how many times that identity was seen before: the same seed injects the same faults into
//! the same requests whatever the order in which concurrent requests arrive (identities that
//! carry a random part, e.g. a queue message id, differ between runs). The seed is printed by the
//! test and can be fixed with `LAKEGUARD_CHAOS_SEED`.
//!
//! Azurite's own requests (it reads a copy source itself with `axios`, through this proxy, because
//! the source URL names the proxy's host) are **never faulted**: in the real service that read is
//! internal, and a fault there shows up as whatever error Azurite then makes up for the copy
//! (a bare 500 or a 404), which would test the emulator, not lakeguard.
//!
//! # Visibility timeouts, compressed
//! A drain hides the messages it receives for 300 s. Some faults leave a message hidden with no
//! one left to act on it: a lost Get Messages answer (the client never saw the messages), an
//! Update or Delete Message that failed because of a busy/drop fault (the message stays hidden
//! until its timeout), a killed consumer. The real service would deliver such a message again
//! after the timeout; waiting 5 minutes each time would make a CI run impossible. So the proxy
//! tracks every message handed out by Azurite (id and latest pop receipt, from the answers it
//! forwards) and makes the orphaned ones visible again itself (Update Message with
//! `visibilitytimeout=0`, signed with the account key, straight to Azurite): after
//! [`FaultProxy::ORPHAN_DELAY`] for the fault cases, and on [`FaultProxy::release_held`] (the
//! test calls it once a consumer is dead). The dequeue count is Azurite's, so redeliveries count
//! towards the poison threshold as they would.
//!
//! One case cannot be compensated: a Get Messages that Azurite performs while it is being stopped
//! but never answers (seen in a chaos run: a message hidden for the full 300 s, during which every
//! drain waited 120 s for it and stopped, and reconcile trusted pending markers because the queue
//! was not empty). The proxy cannot tell which messages it hid, so the test stops Azurite only
//! after [`FaultProxy::quiesce_receives`] (new receives get a 503 while it restarts). That hazard
//! is real; it is reported, not tested.
//!
//! # Triggers
//! [`FaultProxy::on_upstream`] runs an action when the n-th matching request has been answered by
//! Azurite, before that answer is passed on (e.g. SIGKILL the producer right after a snapshot was
//! taken, before its request is queued; or tell the test to restart Azurite now). When the
//! action kills the client, the answer is not delivered.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use axum::body::Body;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use reqwest::Method;

use super::rest::{xml_elements, xml_text, StorageRest};

/// The three kinds of injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// `503 ServerBusy`, not forwarded.
    Busy,
    /// Connection closed before forwarding.
    Drop,
    /// Forwarded and done upstream; the answer is thrown away and the connection closed.
    Lost,
}

impl Fault {
    pub fn label(self) -> &'static str {
        match self {
            Fault::Busy => "503",
            Fault::Drop => "dropped",
            Fault::Lost => "answer lost",
        }
    }
}

/// Probability of each fault per request (their sum must be at most 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    pub busy: f64,
    pub drop: f64,
    pub lost: f64,
}

impl Rates {
    pub const OFF: Rates = Rates {
        busy: 0.0,
        drop: 0.0,
        lost: 0.0,
    };
}

/// Which service a request went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Svc {
    Blob,
    Queue,
}

/// One request as the proxy classified it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub svc: Svc,
    pub method: String,
    pub target: String,
    /// REST operation name (`Snapshot Blob`, `Put Message`, ...).
    pub op: &'static str,
}

type Action = Box<dyn FnOnce() -> bool + Send>;

/// A fault injected on the n-th matching request whatever the rates (so that a rare operation,
/// e.g. the one Put Block List of a run, is certain to meet it).
struct Forced {
    matches: Box<dyn Fn(&Seen) -> bool + Send>,
    left: u64,
    fault: Fault,
}

struct Trigger {
    matches: Box<dyn Fn(&Seen) -> bool + Send>,
    left: u64,
    /// Returns `true` when the client is gone (its answer is then not delivered).
    action: Option<Action>,
}

/// What the proxy injected and forwarded, by operation.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Requests lakeguard made, by operation (faulted ones included).
    pub requests: BTreeMap<&'static str, u64>,
    /// Injected faults by (kind, operation).
    pub injected: BTreeMap<(Fault, &'static str), u64>,
    /// Azurite's own copy-source reads passed through (never faulted).
    pub azurite_self: u64,
    /// Messages made visible again by the proxy (compressed visibility timeouts).
    pub released: u64,
    /// Get Messages refused while Azurite restarted ([`FaultProxy::quiesce_receives`]).
    pub held_for_restart: u64,
}

impl Stats {
    pub fn total(&self, kind: Fault) -> u64 {
        self.injected
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|(_, n)| n)
            .sum()
    }

    /// Injected faults of one operation, all kinds.
    pub fn of_op(&self, op: &str) -> u64 {
        self.injected
            .iter()
            .filter(|((_, o), _)| *o == op)
            .map(|(_, n)| n)
            .sum()
    }

    /// What happened after `earlier` (a `stats()` taken before).
    pub fn since(&self, earlier: &Stats) -> Stats {
        let mut out = self.clone();
        for (k, n) in &earlier.requests {
            *out.requests.entry(k).or_insert(0) -= n;
        }
        for (k, n) in &earlier.injected {
            *out.injected.entry(*k).or_insert(0) -= n;
        }
        out.requests.retain(|_, n| *n > 0);
        out.injected.retain(|_, n| *n > 0);
        out.azurite_self -= earlier.azurite_self;
        out.released -= earlier.released;
        out.held_for_restart -= earlier.held_for_restart;
        out
    }

    /// A readable table: `operation: requests, 503 n, dropped n, answer lost n`.
    pub fn table(&self) -> String {
        let mut out = String::new();
        for (op, n) in &self.requests {
            let f = |k: Fault| self.injected.get(&(k, *op)).copied().unwrap_or(0);
            out.push_str(&format!(
                "  {op:<28} {n:>6} requests, 503 {:>4}, dropped {:>3}, answer lost {:>3}\n",
                f(Fault::Busy),
                f(Fault::Drop),
                f(Fault::Lost)
            ));
        }
        out.push_str(&format!(
            "  total: 503 {}, dropped {}, answer lost {}; Azurite's own reads {} (not faulted); messages released {}\n",
            self.total(Fault::Busy),
            self.total(Fault::Drop),
            self.total(Fault::Lost),
            self.azurite_self,
            self.released
        ));
        out
    }
}

/// One request as the proxy handled it (the log a failed chaos run is read with).
#[derive(Debug, Clone)]
pub struct Logged {
    /// Milliseconds since the proxy started, when the request arrived.
    pub at_ms: u128,
    pub svc: Svc,
    pub method: String,
    pub target: String,
    pub op: &'static str,
    pub fault: Option<Fault>,
    /// Azurite's status; `None` when nothing was forwarded or no answer came.
    pub status: Option<u16>,
    pub azurite_self: bool,
    /// Messages a Get Messages answer handed out (`id@receipt`), or what a release did.
    pub note: String,
}

impl std::fmt::Display for Logged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>8} {:?} {} {} [{}] {} -> {}",
            self.at_ms,
            self.svc,
            self.method,
            self.target,
            self.op,
            match (self.azurite_self, self.fault) {
                (true, _) => "azurite's own".to_string(),
                (false, Some(k)) => format!("FAULT {}", k.label()),
                (false, None) => "-".to_string(),
            },
            self.status
                .map(|s| s.to_string())
                .unwrap_or_else(|| "no answer".into())
        )?;
        if !self.note.is_empty() {
            write!(f, " {}", self.note)?;
        }
        Ok(())
    }
}

struct Shared {
    seed: u64,
    started: std::time::Instant,
    log: Mutex<Vec<Logged>>,
    blob_upstream: SocketAddr,
    queue_upstream: SocketAddr,
    rates: Mutex<Rates>,
    /// Occurrences per request identity (the determinism key).
    seen: Mutex<HashMap<String, u64>>,
    stats: Mutex<Stats>,
    /// Messages handed out by Azurite and not deleted: (queue, id) -> latest pop receipt.
    held: Mutex<HashMap<(String, String), String>>,
    triggers: Mutex<Vec<Trigger>>,
    forced: Mutex<Vec<Forced>>,
    /// Get Messages forwarded and not yet answered, and whether new ones are refused (503) while
    /// Azurite restarts (see [`FaultProxy::quiesce_receives`]).
    receives_in_flight: std::sync::atomic::AtomicUsize,
    hold_receives: AtomicBool,
    /// Queue service of `devstoreaccount1`, straight to Azurite (releases).
    queues: StorageRest,
    runtime: tokio::runtime::Handle,
}

/// The proxy: one listener for the blob service, one for the queue service. Stops on drop.
pub struct FaultProxy {
    shared: Arc<Shared>,
    blob_addr: SocketAddr,
    queue_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// How long a message orphaned by a fault stays hidden (instead of the rest of its timeout).
    pub const ORPHAN_DELAY: Duration = Duration::from_secs(4);

    /// Proxies to Azurite's blob and queue ports; `queues` is the oracle of the queue account
    /// (used to release orphaned messages). Faults start off.
    pub fn start(blob_port: u16, queue_port: u16, queues: StorageRest, seed: u64) -> FaultProxy {
        let (tx, rx) = std::sync::mpsc::channel();
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let blob = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                    let queue = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                    let shared = Arc::new(Shared {
                        seed,
                        started: std::time::Instant::now(),
                        log: Default::default(),
                        blob_upstream: SocketAddr::from(([127, 0, 0, 1], blob_port)),
                        queue_upstream: SocketAddr::from(([127, 0, 0, 1], queue_port)),
                        rates: Mutex::new(Rates::OFF),
                        seen: Default::default(),
                        stats: Default::default(),
                        held: Default::default(),
                        triggers: Default::default(),
                        forced: Default::default(),
                        receives_in_flight: Default::default(),
                        hold_receives: AtomicBool::new(false),
                        queues,
                        runtime: tokio::runtime::Handle::current(),
                    });
                    tx.send((
                        Arc::clone(&shared),
                        blob.local_addr().unwrap(),
                        queue.local_addr().unwrap(),
                    ))
                    .unwrap();
                    tokio::select! {
                        _ = accept_loop(blob, Svc::Blob, Arc::clone(&shared)) => {}
                        _ = accept_loop(queue, Svc::Queue, shared) => {}
                        _ = shutdown_rx => {}
                    }
                });
                rt.shutdown_background();
            })
            .expect("spawn proxy thread");
        let (shared, blob_addr, queue_addr) = rx.recv().expect("proxy started");
        FaultProxy {
            shared,
            blob_addr,
            queue_addr,
            stop,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        }
    }

    pub fn seed(&self) -> u64 {
        self.shared.seed
    }

    /// `http://127.0.0.1:<blob proxy port>/<account>`.
    pub fn blob_endpoint(&self, account: &str) -> String {
        format!("http://127.0.0.1:{}/{account}", self.blob_addr.port())
    }

    /// `http://127.0.0.1:<queue proxy port>/<account>`.
    pub fn queue_endpoint(&self, account: &str) -> String {
        format!("http://127.0.0.1:{}/{account}", self.queue_addr.port())
    }

    /// Sets the fault rates (`Rates::OFF`: forward everything).
    pub fn set_rates(&self, rates: Rates) {
        assert!(
            rates.busy + rates.drop + rates.lost <= 1.0,
            "fault rates sum above 1"
        );
        *self.shared.rates.lock().unwrap() = rates;
    }

    /// Every request so far, in arrival order of their answers.
    pub fn log(&self) -> Vec<Logged> {
        self.shared.log.lock().unwrap().clone()
    }

    pub fn stats(&self) -> Stats {
        self.shared.stats.lock().unwrap().clone()
    }

    /// Runs `action` when the `nth` (1-based) request matching `matches` has been answered by
    /// Azurite, before the answer is passed on; `action` returns `true` if the client is gone
    /// (the answer is then not delivered). Once.
    pub fn on_upstream(
        &self,
        nth: u64,
        matches: impl Fn(&Seen) -> bool + Send + 'static,
        action: impl FnOnce() -> bool + Send + 'static,
    ) {
        assert!(nth >= 1);
        self.shared.triggers.lock().unwrap().push(Trigger {
            matches: Box::new(matches),
            left: nth,
            action: Some(Box::new(action)),
        });
    }

    /// Injects `fault` into the `nth` (1-based) request of lakeguard's matching `matches`, faults
    /// on or off. Once.
    pub fn force(&self, nth: u64, matches: impl Fn(&Seen) -> bool + Send + 'static, fault: Fault) {
        assert!(nth >= 1);
        self.shared.forced.lock().unwrap().push(Forced {
            matches: Box::new(matches),
            left: nth,
            fault,
        });
    }

    /// Refuses new Get Messages (503 ServerBusy) and waits until none is in flight, so that
    /// Azurite can be stopped without a receive it performs but never answers: that receive would
    /// hide up to 32 messages for the drain's whole visibility timeout (300 s), and unlike an
    /// injected lost answer, the proxy could not tell which messages to release. (A real hazard,
    /// see tests/chaos.rs; it would make every run wait out 5 minutes.)
    pub async fn quiesce_receives(&self) {
        self.shared.hold_receives.store(true, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while self.shared.receives_in_flight.load(Ordering::SeqCst) > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "a Get Messages stayed in flight for 60 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Ends [`FaultProxy::quiesce_receives`].
    pub fn resume_receives(&self) {
        self.shared.hold_receives.store(false, Ordering::SeqCst);
    }

    /// Removes triggers that have not fired.
    pub fn clear_triggers(&self) {
        self.shared.triggers.lock().unwrap().clear();
    }

    /// Makes every message Azurite handed out and nobody deleted visible again, as the end of its
    /// visibility timeout would. Call it only when no consumer is alive (a live one would see its
    /// pop receipt go stale; harmless, as processing is idempotent, but not what it means).
    /// Returns how many messages became visible.
    pub async fn release_held(&self) -> usize {
        // A receive the dead consumer made may still be on its way back from Azurite: its
        // messages are tracked when its answer arrives, so wait for it first.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while self.shared.receives_in_flight.load(Ordering::SeqCst) > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "a Get Messages stayed in flight for 60 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let held: Vec<((String, String), String)> =
            self.shared.held.lock().unwrap().drain().collect();
        let mut n = 0;
        for ((queue, id), receipt) in held {
            if release(&self.shared, &queue, &id, &receipt).await == Some(true) {
                n += 1;
            }
        }
        n
    }

    /// Messages currently known as handed out and not deleted.
    pub fn held(&self) -> usize {
        self.shared.held.lock().unwrap().len()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, svc: Svc, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = Arc::clone(&shared);
                // In a task of its own: when the client disconnects (a consumer SIGKILLed while
                // its Get Messages is on the way), hyper drops this future, but the exchange with
                // Azurite and its bookkeeping (the messages handed out, the in-flight count) must
                // finish, or those messages stay hidden, untracked, for their whole timeout.
                async move {
                    tokio::spawn(handle(shared, svc, req))
                        .await
                        .unwrap_or(Err(Closed("proxy task failed")))
                }
            });
            // An Err from the service makes hyper close the connection without writing anything:
            // that is how `drop` and `lost` look to the client.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A connection closed on purpose (hyper then writes nothing).
#[derive(Debug)]
struct Closed(&'static str);

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Closed {}

fn query(target: &str, name: &str) -> Option<String> {
    let q = target.split_once('?')?.1;
    url::form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.into_owned())
}

/// The REST operation of a request (enough to count and target faults; not a full parser).
pub fn operation(svc: Svc, method: &str, target: &str, headers: &hyper::HeaderMap) -> &'static str {
    let path = target.split('?').next().unwrap_or("");
    // Path segments after the account.
    let segs: Vec<&str> = path
        .trim_start_matches('/')
        .split('/')
        .skip(1)
        .filter(|s| !s.is_empty())
        .collect();
    let comp = query(target, "comp");
    let restype = query(target, "restype");
    let has = |h: &str| headers.contains_key(h);
    match svc {
        Svc::Queue => match (method, segs.len(), segs.get(1).copied()) {
            ("GET", 0, _) => "List Queues",
            ("PUT", 1, _) if comp.as_deref() == Some("metadata") => "Set Queue Metadata",
            ("PUT", 1, _) => "Create Queue",
            ("GET", 1, _) => "Get Queue Metadata",
            ("DELETE", 1, _) => "Delete Queue",
            ("POST", 2, Some("messages")) => "Put Message",
            ("GET", 2, Some("messages"))
                if query(target, "peekonly").as_deref() == Some("true") =>
            {
                "Peek Messages"
            }
            ("GET", 2, Some("messages")) => "Get Messages",
            ("DELETE", 2, Some("messages")) => "Clear Messages",
            ("PUT", 3, Some("messages")) => "Update Message",
            ("DELETE", 3, Some("messages")) => "Delete Message",
            _ => "other queue request",
        },
        Svc::Blob => {
            let container = segs.len() == 1 && restype.as_deref() == Some("container");
            match (method, comp.as_deref()) {
                ("GET", Some("list")) if container => "List Blobs",
                ("GET", Some("list")) => "List Containers",
                (_, _) if container => match method {
                    "PUT" => "Create Container",
                    "DELETE" => "Delete Container",
                    _ => "Get Container Properties",
                },
                ("GET", Some("userdelegationkey")) | ("POST", Some("userdelegationkey")) => {
                    "Get User Delegation Key"
                }
                ("PUT", Some("snapshot")) => "Snapshot Blob",
                ("PUT", Some("metadata")) => "Set Blob Metadata",
                ("PUT", Some("properties")) => "Set Blob Properties",
                ("PUT", Some("lease")) => "Lease Blob",
                ("PUT", Some("block")) if has("x-ms-copy-source") => "Put Block From URL",
                ("PUT", Some("block")) => "Put Block",
                ("PUT", Some("blocklist")) => "Put Block List",
                ("GET", Some("blocklist")) => "Get Block List",
                ("PUT", None) if has("x-ms-copy-source") && has("x-ms-requires-sync") => {
                    "Copy Blob From URL"
                }
                ("PUT", None) if has("x-ms-copy-source") => "Copy Blob",
                ("PUT", None) => "Put Blob",
                ("HEAD", None) => "Get Blob Properties",
                ("GET", None) => "Get Blob",
                ("DELETE", None) => "Delete Blob",
                _ => "other blob request",
            }
        }
    }
}

/// FNV-1a: stable across Rust versions and runs (std's hasher is not promised to be).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// SplitMix64's finaliser: a well-mixed u64 from any u64.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The fault (if any) for the `n`-th occurrence of a request identity.
pub fn decide(seed: u64, key: &str, n: u64, rates: Rates) -> Option<Fault> {
    let r = mix(seed ^ fnv1a(key.as_bytes()) ^ mix(n));
    let u = (r >> 11) as f64 / (1u64 << 53) as f64;
    if u < rates.busy {
        Some(Fault::Busy)
    } else if u < rates.busy + rates.drop {
        Some(Fault::Drop)
    } else if u < rates.busy + rates.drop + rates.lost {
        Some(Fault::Lost)
    } else {
        None
    }
}

type Answer = Result<Response<Body>, Closed>;

async fn handle(shared: Arc<Shared>, svc: Svc, req: Request<Incoming>) -> Answer {
    let method = req.method().to_string();
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());
    let azurite_self = req
        .headers()
        .get(hyper::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ua| ua.starts_with("axios"));
    let op = operation(svc, &method, &target, req.headers());
    let seen = Seen {
        svc,
        method: method.clone(),
        target: target.clone(),
        op,
    };
    let fault = if azurite_self {
        shared.stats.lock().unwrap().azurite_self += 1;
        None
    } else {
        let key = format!(
            "{svc:?} {method} {} {}",
            target.split('?').next().unwrap_or(""),
            query(&target, "comp").unwrap_or_default()
        );
        let n = {
            let mut seen = shared.seen.lock().unwrap();
            let n = seen.entry(key.clone()).or_insert(0);
            *n += 1;
            *n
        };
        let rates = *shared.rates.lock().unwrap();
        let forced = {
            let mut forced = shared.forced.lock().unwrap();
            let mut hit = None;
            for f in forced.iter_mut() {
                if f.left > 0 && (f.matches)(&seen) {
                    f.left -= 1;
                    if f.left == 0 && hit.is_none() {
                        hit = Some(f.fault);
                    }
                }
            }
            forced.retain(|f| f.left > 0);
            hit
        };
        let fault = forced.or_else(|| decide(shared.seed, &key, n, rates));
        let mut stats = shared.stats.lock().unwrap();
        *stats.requests.entry(op).or_insert(0) += 1;
        if let Some(f) = fault {
            *stats.injected.entry((f, op)).or_insert(0) += 1;
        }
        fault
    };
    let at_ms = shared.started.elapsed().as_millis();
    let record_note = |status: Option<u16>, note: String| {
        shared.log.lock().unwrap().push(Logged {
            at_ms,
            svc,
            method: method.clone(),
            target: target.clone(),
            op,
            fault,
            status,
            azurite_self,
            note,
        });
    };
    let record = |status: Option<u16>| record_note(status, String::new());
    let queue_msg = (svc == Svc::Queue).then(|| message_ref(&target)).flatten();
    match fault {
        Some(Fault::Busy) => {
            record(None);
            orphaned_by_fault(&shared, op, queue_msg.as_ref());
            return Ok(Response::builder()
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .header("x-ms-error-code", "ServerBusy")
                .header("content-type", "application/xml")
                .body(Body::from(
                    "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>ServerBusy</Code>\
                     <Message>injected by the fault proxy</Message></Error>",
                ))
                .unwrap());
        }
        Some(Fault::Drop) => {
            record(None);
            orphaned_by_fault(&shared, op, queue_msg.as_ref());
            return Err(Closed("dropped before forwarding"));
        }
        _ => {}
    }
    let upstream = match svc {
        Svc::Blob => shared.blob_upstream,
        Svc::Queue => shared.queue_upstream,
    };
    let receive = op == "Get Messages";
    if receive {
        // Counted before the hold is checked: quiesce sets the hold, then waits for the count.
        shared.receives_in_flight.fetch_add(1, Ordering::SeqCst);
        if shared.hold_receives.load(Ordering::SeqCst) {
            shared.receives_in_flight.fetch_sub(1, Ordering::SeqCst);
            record(Some(503));
            shared.stats.lock().unwrap().held_for_restart += 1;
            return Ok(Response::builder()
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .header("x-ms-error-code", "ServerBusy")
                .body(Body::from(
                    "fault proxy: receives held while Azurite restarts",
                ))
                .unwrap());
        }
    }
    let forwarded = forward(upstream, req).await;
    let resp = match forwarded {
        Ok(r) => r,
        // Azurite down (restarting): what a client sees from an unreachable service.
        Err(e) => {
            record(None);
            if receive {
                shared.receives_in_flight.fetch_sub(1, Ordering::SeqCst);
            }
            return Ok(Response::builder()
                .status(StatusCode::BAD_GATEWAY)
                .body(Body::from(format!("fault proxy: upstream: {e}")))
                .unwrap());
        }
    };
    let (parts, incoming) = resp.into_parts();
    let mut stream = Some(incoming);
    // Queue answers are small and carry the pop receipts the proxy tracks; blob answers stream,
    // except a lost one, which is read to its end (the upstream work completes) and discarded.
    let body = if svc == Svc::Queue || fault == Some(Fault::Lost) {
        match axum::body::to_bytes(Body::new(stream.take().expect("body")), usize::MAX).await {
            Ok(b) => Some(b),
            Err(_) => {
                if receive {
                    shared.receives_in_flight.fetch_sub(1, Ordering::SeqCst);
                }
                return Err(Closed("upstream answer cut"));
            }
        }
    } else {
        None
    };
    let status = parts.status.as_u16();
    let mut handed_out = Vec::new();
    if svc == Svc::Queue {
        let text = String::from_utf8_lossy(body.as_deref().unwrap_or_default()).into_owned();
        handed_out = track_messages(&shared, op, &target, status, &parts.headers, &text);
    }
    let note = handed_out
        .iter()
        .map(|(_, id, r)| format!("{id}@{r}"))
        .chain(
            parts
                .headers
                .get("x-ms-popreceipt")
                .and_then(|v| v.to_str().ok())
                .map(|r| format!("new receipt {r}")),
        )
        .collect::<Vec<_>>()
        .join(" ");
    record_note(Some(status), note);
    if receive {
        shared.receives_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
    let client_gone = fire_triggers(&shared, &seen);
    if fault == Some(Fault::Lost) || client_gone {
        if fault == Some(Fault::Lost) && op == "Get Messages" {
            // Nobody saw these messages: they are orphaned until their timeout.
            for (queue, id, receipt) in handed_out {
                schedule_release(&shared, queue, id, receipt);
            }
        }
        return Err(Closed("answer lost"));
    }
    let body = match (body, stream) {
        (Some(b), _) => Body::from(b),
        (None, Some(s)) => Body::new(s),
        (None, None) => unreachable!("either collected or streamed"),
    };
    Ok(Response::from_parts(parts, body))
}

async fn forward(
    upstream: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Incoming>, String> {
    let stream = tokio::net::TcpStream::connect(upstream)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    sender.send_request(req).await.map_err(|e| e.to_string())
}

/// `(queue, message id)` of a request on `/<account>/<queue>/messages/<id>`.
fn message_ref(target: &str) -> Option<(String, String, String)> {
    let path = target.split('?').next()?;
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segs.as_slice() {
        [_account, queue, "messages", id] => Some((
            queue.to_string(),
            id.to_string(),
            query(target, "popreceipt").unwrap_or_default(),
        )),
        _ => None,
    }
}

/// Updates the table of handed-out messages from one forwarded queue answer; returns the messages
/// of a Get Messages answer (queue, id, pop receipt).
fn track_messages(
    shared: &Shared,
    op: &str,
    target: &str,
    status: u16,
    headers: &hyper::HeaderMap,
    body: &str,
) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    if !(200..300).contains(&status) {
        return out;
    }
    let mut held = shared.held.lock().unwrap();
    match op {
        "Get Messages" => {
            let queue = target
                .split('?')
                .next()
                .unwrap_or("")
                .trim_start_matches('/')
                .split('/')
                .nth(1)
                .unwrap_or("")
                .to_string();
            for m in xml_elements(body, "QueueMessage") {
                let (Some(id), Some(receipt)) =
                    (xml_text(&m, "MessageId"), xml_text(&m, "PopReceipt"))
                else {
                    continue;
                };
                held.insert((queue.clone(), id.clone()), receipt.clone());
                out.push((queue.clone(), id, receipt));
            }
        }
        "Update Message" => {
            if let (Some((queue, id, _)), Some(receipt)) = (
                message_ref(target),
                headers.get("x-ms-popreceipt").and_then(|v| v.to_str().ok()),
            ) {
                held.insert((queue, id), receipt.to_string());
            }
        }
        "Delete Message" => {
            if let Some((queue, id, _)) = message_ref(target) {
                held.remove(&(queue, id));
            }
        }
        _ => {}
    }
    out
}

/// A busy/drop fault on an Update or Delete Message leaves the message hidden for the rest of
/// the timeout its holder set (the holder has given up on it or moved on): schedule a release.
fn orphaned_by_fault(shared: &Arc<Shared>, op: &str, msg: Option<&(String, String, String)>) {
    if let (true, Some((queue, id, receipt))) =
        (matches!(op, "Update Message" | "Delete Message"), msg)
    {
        schedule_release(shared, queue.clone(), id.clone(), receipt.clone());
    }
}

/// After `ORPHAN_DELAY`, makes the message visible again if it is still held with `receipt`
/// (a successful retry meanwhile changed the receipt or deleted the message: nothing to do).
fn schedule_release(shared: &Arc<Shared>, queue: String, id: String, receipt: String) {
    let shared2 = Arc::clone(shared);
    shared.runtime.spawn(async move {
        tokio::time::sleep(FaultProxy::ORPHAN_DELAY).await;
        let still = shared2
            .held
            .lock()
            .unwrap()
            .get(&(queue.clone(), id.clone()))
            .is_some_and(|r| *r == receipt);
        // Azurite may be restarting: try again a few times (the message stays tracked, and
        // `release_held` takes it otherwise).
        for _ in 0..20 {
            if !still || release(&shared2, &queue, &id, &receipt).await.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
}

/// Update Message `visibilitytimeout=0` straight to Azurite; `Some(true)` if the message was
/// there, `None` if Azurite did not answer (restarting).
async fn release(shared: &Shared, queue: &str, id: &str, receipt: &str) -> Option<bool> {
    let resp = shared
        .queues
        .try_send(
            Method::PUT,
            &format!("/{queue}/messages/{id}"),
            &[("popreceipt", receipt), ("visibilitytimeout", "0")],
            &[],
            vec![],
        )
        .await
        .ok()?;
    let ok = resp.is_success();
    shared.log.lock().unwrap().push(Logged {
        at_ms: shared.started.elapsed().as_millis(),
        svc: Svc::Queue,
        method: "PUT".into(),
        target: format!("/{queue}/messages/{id}?popreceipt={receipt}&visibilitytimeout=0"),
        op: "release (by the proxy)",
        fault: None,
        status: Some(resp.status),
        azurite_self: false,
        note: String::new(),
    });
    if ok {
        // Visible again: whoever receives it next gets a new receipt (tracked then).
        shared.stats.lock().unwrap().released += 1;
        shared
            .held
            .lock()
            .unwrap()
            .remove(&(queue.to_string(), id.to_string()));
    }
    Some(ok)
}

/// Runs the triggers matching `seen`; `true` if one of them reported the client gone.
fn fire_triggers(shared: &Shared, seen: &Seen) -> bool {
    let mut due = Vec::new();
    {
        let mut triggers = shared.triggers.lock().unwrap();
        for t in triggers.iter_mut() {
            if t.action.is_some() && (t.matches)(seen) {
                t.left -= 1;
                if t.left == 0 {
                    due.push(t.action.take().unwrap());
                }
            }
        }
        triggers.retain(|t| t.action.is_some());
    }
    // Every due action runs (no short circuit).
    let mut gone = false;
    for action in due {
        gone |= action();
    }
    gone
}
