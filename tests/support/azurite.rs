//! A real Azurite (the pinned npm package in `tools/azurite`) per test, on loopback free ports.
//!
//! Blob and queue run as two processes (`azurite-blob`, `azurite-queue`) rather than the combined
//! `azurite` binary: the combined binary writes blob and queue requests into ONE access log with
//! nothing telling them apart (and also starts a table service nobody needs). Separate processes give
//! one access log per service, so a test can count blob requests exactly.
//!
//! Every instance has two accounts (env `AZURITE_ACCOUNTS`): `devstoreaccount1` (the well-known
//! development key) is the source and holds the queues, `backupacct` is the backup account.
//! Endpoints are path-style (`http://127.0.0.1:<port>/<account>`), always with `127.0.0.1`: Azurite
//! compares a copy source's host with the request's host literally (`localhost` != `127.0.0.1`).

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::certs::TestPki;
use super::rest::{Auth, StorageRest};

/// The Azurite version pinned in `tools/azurite/package-lock.json`; the harness refuses any other.
pub const AZURITE_VERSION: &str = "3.37.0";
/// Source account (also holds the queues). The emulator's documented, public development key.
pub const DEV_ACCOUNT: &str = "devstoreaccount1";
pub const DEV_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// Backup account. A fixed 64-byte key (base64), meaningful only to this loopback emulator.
pub const BACKUP_ACCOUNT: &str = "backupacct";
pub const BACKUP_KEY: &str =
    "bGFrZWd1YXJkIHRlc3QgYmFja3VwIGFjY291bnQga2V5OyBub3QgYSBzZWNyZXQsIGxvb3BiYWNrIG9ubHkhIQ==";

/// How clients authenticate to this Azurite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Plain HTTP, Shared Key (connection strings). Bearer tokens are refused over http, both by
    /// Azurite and by the Azure SDK.
    SharedKeyHttp,
    /// HTTPS with `--oauth basic`: bearer tokens (from the managed-identity stand-in) are checked
    /// for issuer, audience and lifetime. Shared Key also still works in this mode.
    OAuthHttps,
}

/// Which Azurite service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Blob,
    Queue,
}

impl Service {
    fn bin(self) -> &'static str {
        match self {
            Service::Blob => "azurite-blob",
            Service::Queue => "azurite-queue",
        }
    }
    fn server_header(self) -> String {
        match self {
            Service::Blob => format!("Azurite-Blob/{AZURITE_VERSION}"),
            Service::Queue => format!("Azurite-Queue/{AZURITE_VERSION}"),
        }
    }
}

/// Where Azurite keeps its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// `--inMemoryPersistence`: fastest; gone when the process ends (every ordinary test).
    Memory,
    /// `--location <scratch>/data-{blob,queue}`: survives [`Azurite::restart`].
    Disk,
}

/// How [`Azurite::restart`] stops the running services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGKILL. Azurite 3.37 keeps its metadata in LokiJS databases that it writes to disk every
    /// 5 s (`autosaveInterval: 5000`): a kill loses what was acknowledged since the last save
    /// (tests/chaos.rs `azurite_loses_acknowledged_writes_on_sigkill`), which the real service
    /// never does.
    Kill,
    /// SIGTERM, then wait for the exit: Azurite closes its server and its databases (LokiJS
    /// saves on close), so everything acknowledged survives.
    Graceful,
}

/// One line of Azurite's access log (morgan "common" format):
/// `127.0.0.1 - - [22/Nov/2026:03:14:32 +0000] "GET /devstoreaccount1?comp=list HTTP/1.1" 403 -`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogEntry {
    pub method: String,
    /// The request target as sent: percent-encoded path plus query.
    pub target: String,
    pub status: u16,
    pub raw: String,
}

impl AccessLogEntry {
    pub fn parse(line: &str) -> Option<AccessLogEntry> {
        let start = line.find("] \"")? + 3;
        let rest = &line[start..];
        let end = rest.find('"')?;
        let mut request = rest[..end].split(' ');
        let method = request.next()?.to_string();
        let target = request.next()?.to_string();
        let status = rest[end + 1..].split_whitespace().next()?.parse().ok()?;
        Some(AccessLogEntry {
            method,
            target,
            status,
            raw: line.to_string(),
        })
    }

    /// The percent-encoded path, without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    /// The account: the first path segment (path-style endpoints).
    pub fn account(&self) -> &str {
        self.path()
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or("")
    }

    /// A decoded query parameter, e.g. `comp` or `restype`.
    pub fn query(&self, name: &str) -> Option<String> {
        let query = self.target.split_once('?')?.1;
        url::form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.into_owned())
    }

    pub fn comp(&self) -> Option<String> {
        self.query("comp")
    }

    pub fn restype(&self) -> Option<String> {
        self.query("restype")
    }

    /// `true` for a List Blobs call (`GET ?restype=container&comp=list`).
    pub fn is_list_blobs(&self) -> bool {
        self.method == "GET"
            && self.restype().as_deref() == Some("container")
            && self.comp().as_deref() == Some("list")
    }
}

struct Proc {
    service: Service,
    child: Child,
    port: u16,
    stdout: PathBuf,
    stderr: PathBuf,
    /// Access-log lines written before the harness declared the service ready (its own probes).
    baseline: usize,
    /// On-disk data directory (`--location`); `None` = `--inMemoryPersistence`.
    location: Option<PathBuf>,
}

impl Proc {
    fn kill(&mut self) {
        kill_group(&mut self.child);
    }
}

/// Kills a child started with `process_group(0)` together with everything in its process group
/// (node may fork helpers), then reaps it.
pub(crate) fn kill_group(child: &mut Child) {
    let pid = child.id() as libc::pid_t;
    // SAFETY: plain syscall; a negative pid addresses the process group we created.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A running Azurite (blob + queue). Dropping it kills both processes.
pub struct Azurite {
    mode: Mode,
    pki: Option<TestPki>,
    blob: Proc,
    queue: Proc,
    // Last field: dropped after the processes are dead.
    dir: tempfile::TempDir,
}

/// Picks a free loopback port: bind port 0, read the port, release it. The port can be taken by
/// someone else before the child binds it; callers retry on that (see `Azurite::start`).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// Path of a binary in `tools/azurite/node_modules/.bin`, with a clear message when missing.
fn azurite_bin(name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/azurite/node_modules");
    let pkg = root.join("azurite/package.json");
    let text = std::fs::read_to_string(&pkg).unwrap_or_else(|_| {
        panic!(
            "Azurite is not installed ({} missing): run scripts/install-azurite",
            pkg.display()
        )
    });
    let version = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["version"].as_str().map(str::to_string))
        .unwrap_or_default();
    assert_eq!(
        version, AZURITE_VERSION,
        "tools/azurite has azurite {version}, the tests need {AZURITE_VERSION}: run scripts/install-azurite"
    );
    root.join(".bin").join(name)
}

/// Environment handed to child processes: nothing of the caller's but what a program needs to run.
pub(crate) fn base_env() -> Vec<(String, String)> {
    ["PATH", "HOME", "TMPDIR", "LANG"]
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
        .collect()
}

enum StartError {
    /// The port was taken (bind race): try again with other ports.
    PortRace(String),
    Fatal(String),
}

impl Azurite {
    /// Starts blob and queue services (in memory) and waits until both answer as Azurite 3.37.0
    /// (30 s).
    pub async fn start(mode: Mode) -> Azurite {
        Self::start_with(mode, Persistence::Memory).await
    }

    /// `start` with a choice of persistence ([`Persistence::Disk`] for [`Azurite::restart`]).
    pub async fn start_with(mode: Mode, persistence: Persistence) -> Azurite {
        let dir = tempfile::Builder::new()
            .prefix("lakeguard-azurite-")
            .tempdir()
            .expect("tempdir");
        let pki = match mode {
            Mode::OAuthHttps => Some(TestPki::generate(dir.path())),
            Mode::SharedKeyHttp => None,
        };
        let client = http_client(pki.as_ref());
        let mut last_error = String::new();
        let location = |name: &str| match persistence {
            Persistence::Memory => None,
            Persistence::Disk => {
                let d = dir.path().join(format!("data-{name}"));
                std::fs::create_dir_all(&d).expect("data dir");
                Some(d)
            }
        };
        for attempt in 0..5 {
            let spec = |name: &str| Spawn {
                port: free_port(),
                location: location(name),
                logs: (
                    dir.path().join(format!("{name}-{attempt}.access.log")),
                    dir.path().join(format!("{name}-{attempt}.stderr.log")),
                ),
                debug_log: dir.path().join(format!("{name}-{attempt}.debug.log")),
            };
            let mut blob = spawn(Service::Blob, mode, pki.as_ref(), dir.path(), spec("blob"))
                .unwrap_or_else(|e| panic!("{e}"));
            let mut queue = match spawn(
                Service::Queue,
                mode,
                pki.as_ref(),
                dir.path(),
                spec("queue"),
            ) {
                Ok(q) => q,
                Err(e) => {
                    blob.kill();
                    panic!("{e}");
                }
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut ready = wait_ready(&client, mode, &mut blob, deadline).await;
            if ready.is_ok() {
                ready = wait_ready(&client, mode, &mut queue, deadline).await;
            }
            match ready {
                Ok(()) => {
                    return Azurite {
                        mode,
                        pki,
                        blob,
                        queue,
                        dir,
                    }
                }
                Err(StartError::PortRace(msg)) => {
                    blob.kill();
                    queue.kill();
                    last_error = msg;
                }
                Err(StartError::Fatal(msg)) => {
                    blob.kill();
                    queue.kill();
                    panic!("{msg}");
                }
            }
        }
        panic!("Azurite did not start after 5 attempts (port races): {last_error}");
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// `http` or `https`.
    pub fn scheme(&self) -> &'static str {
        match self.mode {
            Mode::SharedKeyHttp => "http",
            Mode::OAuthHttps => "https",
        }
    }

    pub fn blob_port(&self) -> u16 {
        self.blob.port
    }

    pub fn queue_port(&self) -> u16 {
        self.queue.port
    }

    /// `http(s)://127.0.0.1:<port>/<account>` (no trailing slash).
    pub fn blob_endpoint(&self, account: &str) -> String {
        format!("{}://127.0.0.1:{}/{account}", self.scheme(), self.blob.port)
    }

    pub fn queue_endpoint(&self, account: &str) -> String {
        format!(
            "{}://127.0.0.1:{}/{account}",
            self.scheme(),
            self.queue.port
        )
    }

    /// The account key of `devstoreaccount1` or `backupacct`.
    pub fn account_key(&self, account: &str) -> &'static str {
        match account {
            DEV_ACCOUNT => DEV_KEY,
            BACKUP_ACCOUNT => BACKUP_KEY,
            other => panic!("unknown Azurite account {other}"),
        }
    }

    /// A full connection string with explicit endpoints (works in both modes; in `OAuthHttps` the
    /// client must also trust `ca_cert_path()`).
    pub fn connection_string(&self, account: &str) -> String {
        format!(
            "DefaultEndpointsProtocol={};AccountName={account};AccountKey={};BlobEndpoint={};QueueEndpoint={};",
            self.scheme(),
            self.account_key(account),
            self.blob_endpoint(account),
            self.queue_endpoint(account),
        )
    }

    /// A connection string whose blob endpoint is `blob_endpoint` (e.g. a `CountingProxy`'s) and
    /// whose queue endpoint is Azurite's.
    pub fn connection_string_via(&self, account: &str, blob_endpoint: &str) -> String {
        format!(
            "DefaultEndpointsProtocol={};AccountName={account};AccountKey={};BlobEndpoint={blob_endpoint};QueueEndpoint={};",
            self.scheme(),
            self.account_key(account),
            self.queue_endpoint(account),
        )
    }

    /// The test CA's PEM file (`OAuthHttps` only).
    pub fn ca_cert_path(&self) -> Option<&Path> {
        self.pki.as_ref().map(|p| p.ca_cert.as_path())
    }

    pub fn pki(&self) -> Option<&TestPki> {
        self.pki.as_ref()
    }

    /// Scratch directory of this instance (logs, PEMs); removed on drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A reqwest client that trusts exactly the test CA (https) or plain http.
    pub fn http_client(&self) -> reqwest::Client {
        http_client(self.pki.as_ref())
    }

    /// Raw REST access to the blob service of `account`, signed with its Shared Key: an oracle
    /// that is independent of lakeguard's own storage code.
    pub fn blob_rest(&self, account: &str) -> StorageRest {
        StorageRest::new(
            self.http_client(),
            self.blob_endpoint(account),
            account,
            Auth::SharedKey(self.account_key(account).to_string()),
        )
    }

    /// Raw REST access to the queue service of `account` (Shared Key).
    pub fn queue_rest(&self, account: &str) -> StorageRest {
        StorageRest::new(
            self.http_client(),
            self.queue_endpoint(account),
            account,
            Auth::SharedKey(self.account_key(account).to_string()),
        )
    }

    /// Blob access-log lines (raw), excluding the harness's readiness probes.
    pub fn request_log(&self) -> Vec<String> {
        read_access_log(&self.blob)
            .into_iter()
            .map(|e| e.raw)
            .collect()
    }

    /// Parsed blob access log, excluding the harness's readiness probes. Waits until the log
    /// stops growing (Azurite writes a line when the response has finished, which can be a moment
    /// after the client has read it).
    pub async fn blob_requests(&self) -> Vec<AccessLogEntry> {
        settle(|| read_access_log(&self.blob)).await
    }

    /// Parsed queue access log (see `blob_requests`).
    pub async fn queue_requests(&self) -> Vec<AccessLogEntry> {
        settle(|| read_access_log(&self.queue)).await
    }

    /// Everything Azurite printed to stderr (both services), for failure messages.
    pub fn stderr(&self) -> String {
        let mut out = String::new();
        for p in [&self.blob, &self.queue] {
            out.push_str(&std::fs::read_to_string(&p.stderr).unwrap_or_default());
        }
        out
    }

    /// Azurite's debug logs (blob then queue), written only when the test process runs with
    /// `LAKEGUARD_TEST_AZURITE_DEBUG=1`; empty otherwise.
    pub fn debug_log(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            let mut paths: Vec<_> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.to_string_lossy().ends_with(".debug.log"))
                .collect();
            paths.sort();
            for p in paths {
                out.push_str(&std::fs::read_to_string(p).unwrap_or_default());
            }
        }
        out
    }

    /// Process ids of the two services (for tests of the harness itself).
    pub fn pids(&self) -> [u32; 2] {
        [self.blob.child.id(), self.queue.child.id()]
    }

    /// `true` while both processes are alive.
    pub fn is_running(&mut self) -> bool {
        matches!(self.blob.child.try_wait(), Ok(None))
            && matches!(self.queue.child.try_wait(), Ok(None))
    }

    /// Stops both services (`stop`), then starts them again on the same ports and the same data
    /// directories, and waits until both answer. Needs [`Persistence::Disk`]. Requests made
    /// meanwhile fail to connect, as in an outage. Access logs continue in the same files (the
    /// restart's readiness probes are counted in them). Returns how long the services were down.
    pub async fn restart(&mut self, stop: Stop) -> Duration {
        assert!(
            self.blob.location.is_some() && self.queue.location.is_some(),
            "Azurite::restart needs Persistence::Disk (in memory, a restart loses everything)"
        );
        let down = Instant::now();
        match stop {
            Stop::Kill => {
                self.blob.kill();
                self.queue.kill();
            }
            Stop::Graceful => {
                for p in [&self.blob, &self.queue] {
                    // SAFETY: plain syscall on our own child.
                    unsafe {
                        libc::kill(p.child.id() as libc::pid_t, libc::SIGTERM);
                    }
                }
                for p in [&mut self.blob, &mut self.queue] {
                    wait_exit(&mut p.child, p.service.bin()).await;
                }
            }
        }
        let spec = |p: &Proc, name: &str| Spawn {
            port: p.port,
            location: p.location.clone(),
            logs: (p.stdout.clone(), p.stderr.clone()),
            debug_log: self.dir.path().join(format!("{name}-restarted.debug.log")),
        };
        let (blob_spec, queue_spec) = (spec(&self.blob, "blob"), spec(&self.queue, "queue"));
        // Both boot at once (node takes seconds to start each).
        let (blob, queue) = tokio::join!(
            self.respawn(Service::Blob, blob_spec, self.blob.baseline),
            self.respawn(Service::Queue, queue_spec, self.queue.baseline)
        );
        self.blob = blob;
        self.queue = queue;
        down.elapsed()
    }

    /// Starts `which` again on its old port and data; retries while the port is briefly taken.
    async fn respawn(&self, which: Service, spec: Spawn, baseline: usize) -> Proc {
        let client = http_client(self.pki.as_ref());
        let mut last = String::new();
        for _ in 0..10 {
            let mut proc = spawn(
                which,
                self.mode,
                self.pki.as_ref(),
                self.dir.path(),
                spec.clone(),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            let deadline = Instant::now() + Duration::from_secs(30);
            match wait_ready(&client, self.mode, &mut proc, deadline).await {
                Ok(()) => {
                    // The harness's first probes stay excluded; the restart's are counted.
                    proc.baseline = baseline;
                    return proc;
                }
                Err(StartError::PortRace(msg)) => {
                    proc.kill();
                    last = msg;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(StartError::Fatal(msg)) => {
                    proc.kill();
                    panic!("restarting {}: {msg}", which.bin());
                }
            }
        }
        panic!(
            "{} could not take its port {} again: {last}",
            which.bin(),
            spec.port
        );
    }
}

/// Waits up to 30 s for a process sent SIGTERM to exit (Azurite closes its server and saves its
/// databases first); one that does not is killed and the test fails (a hung shutdown would
/// otherwise pass for a clean one).
async fn wait_exit(child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            // Helpers forked by node (none expected) go with the group.
            kill_group(child);
            return;
        }
        if Instant::now() > deadline {
            kill_group(child);
            panic!("{what} did not exit within 30 s of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        self.blob.kill();
        self.queue.kill();
    }
}

fn http_client(pki: Option<&TestPki>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(4)
        // Azurite closes a connection after 5 s idle (its keep-alive flag is ignored: it reads a
        // key the option does not set). A pooled connection reused just as it closes fails with
        // "error sending request", so the oracle drops idle connections well before that.
        .pool_idle_timeout(Duration::from_secs(2));
    if let Some(pki) = pki {
        builder = builder.tls_certs_only([pki.reqwest_ca()]);
    }
    builder.build().expect("reqwest client")
}

/// What one service process gets: its port, its data (`None` = in memory), its log files
/// (appended to, so that a restarted service continues them) and its debug log's path.
#[derive(Clone)]
struct Spawn {
    port: u16,
    location: Option<PathBuf>,
    logs: (PathBuf, PathBuf),
    debug_log: PathBuf,
}

fn append(path: &Path) -> Result<File, String> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn spawn(
    service: Service,
    mode: Mode,
    pki: Option<&TestPki>,
    dir: &Path,
    spec: Spawn,
) -> Result<Proc, String> {
    let Spawn {
        port,
        location,
        logs: (stdout, stderr),
        debug_log,
    } = spec;
    let mut cmd = Command::new(azurite_bin(service.bin()));
    cmd.env_clear()
        .envs(base_env())
        .env(
            "AZURITE_ACCOUNTS",
            format!("{DEV_ACCOUNT}:{DEV_KEY};{BACKUP_ACCOUNT}:{BACKUP_KEY}"),
        )
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(append(&stdout)?)
        .stderr(append(&stderr)?)
        .process_group(0);
    match service {
        Service::Blob => cmd.args(["--blobHost", "127.0.0.1", "--blobPort"]),
        Service::Queue => cmd.args(["--queueHost", "127.0.0.1", "--queuePort"]),
    };
    cmd.arg(port.to_string())
        .args(["--loose", "--skipApiVersionCheck", "--disableTelemetry"]);
    match &location {
        None => cmd.arg("--inMemoryPersistence"),
        Some(d) => cmd.arg("--location").arg(d),
    };
    if std::env::var_os("LAKEGUARD_TEST_AZURITE_DEBUG").is_some() {
        // Azurite's debug log explains its bare 500s and 403s (e.g. why a copy source failed).
        cmd.arg("--debug").arg(&debug_log);
    }
    if mode == Mode::OAuthHttps {
        let pki = pki.expect("OAuthHttps needs a PKI");
        // Azurite fetches copy sources itself (a HEAD/GET of the source URL, which is https here):
        // node must trust the test CA or every server-side copy fails with a bare 500.
        cmd.env("NODE_EXTRA_CA_CERTS", &pki.ca_cert);
        cmd.args(["--oauth", "basic", "--cert"])
            .arg(&pki.leaf_cert)
            .arg("--key")
            .arg(&pki.leaf_key);
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", service.bin()))?;
    Ok(Proc {
        service,
        child,
        port,
        stdout,
        stderr,
        baseline: 0,
        location,
    })
}

async fn wait_ready(
    client: &reqwest::Client,
    mode: Mode,
    proc: &mut Proc,
    deadline: Instant,
) -> Result<(), StartError> {
    let scheme = match mode {
        Mode::SharedKeyHttp => "http",
        Mode::OAuthHttps => "https",
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], proc.port));
    let url = format!("{scheme}://127.0.0.1:{}/{DEV_ACCOUNT}?comp=list", proc.port);
    let expected_server = proc.service.server_header();
    loop {
        if let Ok(Some(status)) = proc.child.try_wait() {
            let err = std::fs::read_to_string(&proc.stderr).unwrap_or_default();
            let out = std::fs::read_to_string(&proc.stdout).unwrap_or_default();
            let msg = format!(
                "{} exited ({status}) before it was ready:\n{err}\n{out}",
                proc.service.bin()
            );
            return if err.contains("EADDRINUSE") || out.contains("EADDRINUSE") {
                Err(StartError::PortRace(msg))
            } else {
                Err(StartError::Fatal(msg))
            };
        }
        if Instant::now() > deadline {
            return Err(StartError::Fatal(format!(
                "{} did not become ready within 30 s; stderr:\n{}",
                proc.service.bin(),
                std::fs::read_to_string(&proc.stderr).unwrap_or_default()
            )));
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            if let Ok(resp) = client.get(&url).send().await {
                let server = resp
                    .headers()
                    .get("server")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                if server != expected_server {
                    // Someone else got the port between our probe bind and Azurite's bind.
                    return Err(StartError::PortRace(format!(
                        "port {} answered as {server:?}, not {expected_server}",
                        proc.port
                    )));
                }
                proc.baseline = settle(|| parse_all(&proc.stdout)).await.len();
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn parse_all(path: &Path) -> Vec<AccessLogEntry> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(AccessLogEntry::parse)
        .collect()
}

fn read_access_log(proc: &Proc) -> Vec<AccessLogEntry> {
    let mut all = parse_all(&proc.stdout);
    all.drain(..proc.baseline.min(all.len()));
    all
}

/// Re-reads until two reads 60 ms apart agree (at most ~2 s).
async fn settle<T: PartialEq>(read: impl Fn() -> Vec<T>) -> Vec<T> {
    let mut last = read();
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        let now = read();
        if now == last {
            return now;
        }
        last = now;
    }
    last
}
