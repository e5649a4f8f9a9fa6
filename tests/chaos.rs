//! The project's own fault-injection suite: the real `lakeguard` binary, through a proxy that
//! injects faults (`support::fault_proxy`) in front of a real Azurite (blob and queue, on disk),
//! over a lake of a few thousand blobs with odd names and a multi-block blob.
//!
//! # The run (`chaos_backup_converges_and_restores_exactly`)
//! - **Lake**: `LAKEGUARD_CHAOS_BLOBS` (default 2000) small blobs whose names have spaces, `#`,
//!   `%`, `?`, `&`, `+`, quotes, unicode (BMP and astral: UTF-16 and UTF-8 order them
//!   differently), deep paths, a name that extends another (`a.txt` / `a.txt.bak`), a blob named
//!   like a folder of others, an empty blob, and one blob of 3.5 MiB that is copied in 1 MiB
//!   blocks. Contents are generated from the seed. The truth at T0 is recorded.
//! - **Phase A**, faults on, `LAKEGUARD_MAX_RETRIES=4` (the production default: the SDK's retries
//!   absorb most faults, so what is tested is the ambiguity of a *retried* request whose first
//!   attempt was done: a second snapshot, a duplicate message, a 412 or 409 on a retried
//!   conditional write). `snapshot` (the producer) SIGKILLed right after Azurite took its k-th
//!   snapshot, before that blob's request was queued; `backup --drain` SIGKILLed right after its
//!   j-th copy, before the message was deleted; `snapshot --drain`; then `reconcile --drain` until
//!   the backup holds every T0 version (at most 3 runs; checked through the REST oracle). The
//!   first Put Block List (the big blob's) always loses its answer.
//! - **Phase B**, faults on, `LAKEGUARD_MAX_RETRIES=1` (failures reach lakeguard's own handling:
//!   a failed enqueue removes its snapshot, a failed copy goes back on the queue with its dequeue
//!   count, reconcile counts errors): overwrites (the big blob included), deletions and new blobs;
//!   `snapshot --drain`, during which Azurite is stopped and restarted on the same data and ports;
//!   some deleted names re-created; `reconcile --drain`.
//! - **Phase C**, faults off, retries 4: `reconcile --drain` until a run finds nothing to do (at
//!   most 4 runs), then, through the oracle: every current source blob's backup holds its bytes
//!   and names its ETag, every deleted one is tombstoned, no other backup names exist, the backup,
//!   poison and continuation queues are empty, `verify --deep` exits 0; `restore --at T0` (before
//!   the faults and before any complete pass) into a new container reproduces every T0 blob
//!   exactly and reports the names first seen later as unavailable (coverage began after T0:
//!   nothing proves them absent then), exit 1; `restore --at T1` (after phase A's first complete
//!   pass, before phase B's changes) is complete and equals the truth exactly.
//! - **Phase D**, faults on, retries 1: the restore at T1 into another new container, SIGKILLed
//!   after its r-th copy, then run again until it exits 0 (at most 3 reruns); run once more with
//!   faults off it must find nothing to do, and the container must equal the T0 truth.
//!
//! Exit codes of the faulted runs are not asserted (a run that met a fault may report a partial
//! failure, exit 1); every run must end on its own within 5 minutes, and no run may print
//! `panicked` or a secret.
//!
//! # Determinism and knobs
//! `LAKEGUARD_CHAOS_SEED` (a u64, decimal or `0x` hex, or `random`; default fixed) drives the
//! lake, the changes, the kill points and the proxy's per-request faults (see `fault_proxy`: same
//! request identity, same fault). It is printed at the start and on failure. Timing still varies
//! between runs (which request is in flight when a kill lands), so the counts do too.
//! `LAKEGUARD_CHAOS_RATES=busy,drop,lost` (default `0.05,0.01,0.01`).
//! `LAKEGUARD_CHAOS_PENDING_TTL_SECS`, if set, is passed to every run as
//! `LAKEGUARD_PENDING_TTL_SECS`. `LAKEGUARD_CHAOS_STRICT_PENDING=1` also fails the run when a
//! `reconcile --drain` that ended with an empty queue left a blob's current version neither
//! backed up nor queued nor reported as an error (a pending marker trusted with no request behind
//! it). Since issue 15 item 5 such a marker (its batch unrecorded: the producer was killed between
//! Snapshot Blob and Put Message) is trusted only for `UNRECORDED_GRACE` (15 min) after it was
//! written, and a run with an empty queue trusts none; the kills here happen minutes before the
//! reconciles, inside that grace, so the check stays off by default and the summary counts it.
//! `LAKEGUARD_CHAOS_KEEP_LOGS=1` keeps every run's stdout and stderr and the proxy's request log
//! (`proxy.log`; the directory is printed). The summary (faults by kind and operation, kills,
//! Azurite's downtime, runs to converge, time per phase) is printed to stderr (`-- --nocapture`).
//!
//! # Azurite's persistence, and why it is restarted gracefully
//! Azurite 3.37 keeps its metadata (blobs, queues, messages) in LokiJS databases that it writes to
//! disk every 5 s. `azurite_loses_acknowledged_writes_on_sigkill` (ignored: it tests the emulator,
//! and a save landing between the writes and the kill would make it pass) shows the consequence:
//! 40 blobs and 40 messages written and acknowledged in the second before a SIGKILL were all gone
//! after the restart (0 of 40 and 0 of 40, every time it was run here; the container, created 6 s
//! earlier, survived). That is the emulator losing acknowledged writes, which the real service
//! never does, and it would make the truth unknowable. So the outage here is SIGTERM and a
//! restart (Azurite closes its server and saves on close:
//! `azurite_restart_keeps_acknowledged_writes`): lakeguard still sees requests fail while node
//! saves, exits and starts again (several seconds), with requests in flight when it stops. New
//! Get Messages are refused (503) around the restart: see `FaultProxy::quiesce_receives` for the
//! one ambiguity the harness cannot compensate.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{stream, StreamExt};
use lakeguard::model::metadata;
use serde_json::Value;
use support::app::mark;
use support::fault_proxy::{decide, mix, Fault, FaultProxy, Rates};
use support::handler::lakeguard_bin;
use support::rest::encode_path;
use support::{
    unique_name, Auth, Mode, Persistence, Stack, Stop, StorageRest, DEV_ACCOUNT, DEV_KEY,
};

type Truth = BTreeMap<String, Vec<u8>>;

const MIB: usize = 1024 * 1024;
const DEFAULT_SEED: u64 = 0x1a4e_9ba2_d000_0015;
const BIG: &str = "big/multi block é#.bin";

// ----------------------------------------------------------------------------------------------
// Configuration

struct Config {
    seed: u64,
    blobs: usize,
    rates: Rates,
    pending_ttl: Option<String>,
    /// `LAKEGUARD_CHAOS_STRICT_PENDING=1`: fail when a reconcile that ended with an empty queue
    /// and no error for a blob left that blob's version neither backed up nor queued.
    strict_pending: bool,
}

fn config() -> Config {
    let seed = match std::env::var("LAKEGUARD_CHAOS_SEED").ok().as_deref() {
        None | Some("") => DEFAULT_SEED,
        Some("random") => support::random_u64(),
        Some(s) => s
            .strip_prefix("0x")
            .map(|h| u64::from_str_radix(h, 16))
            .unwrap_or_else(|| s.parse())
            .expect("LAKEGUARD_CHAOS_SEED: a u64 (decimal or 0x hex) or `random`"),
    };
    let blobs = std::env::var("LAKEGUARD_CHAOS_BLOBS")
        .ok()
        .map(|v| v.parse().expect("LAKEGUARD_CHAOS_BLOBS: a number"))
        .unwrap_or(2000);
    assert!(blobs >= 100, "LAKEGUARD_CHAOS_BLOBS: at least 100");
    let rates = match std::env::var("LAKEGUARD_CHAOS_RATES").ok() {
        None => Rates {
            busy: 0.05,
            drop: 0.01,
            lost: 0.01,
        },
        Some(v) => {
            let r: Vec<f64> = v
                .split(',')
                .map(|x| {
                    x.trim()
                        .parse()
                        .expect("LAKEGUARD_CHAOS_RATES: busy,drop,lost")
                })
                .collect();
            assert_eq!(r.len(), 3, "LAKEGUARD_CHAOS_RATES: busy,drop,lost");
            Rates {
                busy: r[0],
                drop: r[1],
                lost: r[2],
            }
        }
    };
    Config {
        seed,
        blobs,
        rates,
        pending_ttl: std::env::var("LAKEGUARD_CHAOS_PENDING_TTL_SECS").ok(),
        strict_pending: std::env::var("LAKEGUARD_CHAOS_STRICT_PENDING").is_ok_and(|v| v == "1"),
    }
}

/// Prints the seed if the test fails (a panic unwinds through it).
struct SeedOnFailure(u64);

impl Drop for SeedOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "\nchaos: FAILED with LAKEGUARD_CHAOS_SEED={:#x} (rerun with that to reproduce)\n",
                self.0
            );
        }
    }
}

// ----------------------------------------------------------------------------------------------
// The lake, generated from the seed

/// A deterministic stream of u64 (SplitMix64).
struct Gen(u64);

impl Gen {
    fn new(seed: u64, stream: u64) -> Gen {
        Gen(mix(seed ^ mix(stream)))
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Names every lake has, whatever its size: the odd cases.
const SPECIAL: &[&str] = &[
    "a.txt",
    "a.txt.bak",
    "a.txt.bak.old",
    "with space.csv",
    " leading space.txt",
    "hash#tag.json",
    "percent%20literal.txt",
    "percent%.txt",
    "question?mark.txt",
    "amp&eq=semi;colon.txt",
    "plus+sign.txt",
    "quote'single\"double.txt",
    "brackets [1] (2) {3}.txt",
    "dollar$at@caret^.txt",
    "tilde~under_score-dash.dot.txt",
    "UPPER/Mixed Case.TXT",
    "unicode/é/日本語/ファイル.txt",
    "emoji 🦀/crab.bin",
    "order/\u{ff5e}.txt",
    "order/\u{1f980}.txt",
    "order/\u{e000}.txt",
    "deep/a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/file.txt",
    "logs",
    "logs/2026.txt",
    "empty file",
];

const DECORATIONS: &[&str] = &[
    "", "", "", " ", " (copy)", "#1", "%41", "?q=1", "é", "日本", "🦀", "+", "&", "'", "~",
];

fn lake_names(seed: u64, n: usize) -> Vec<String> {
    let mut g = Gen::new(seed, 1);
    let mut names: BTreeSet<String> = SPECIAL.iter().map(|s| s.to_string()).collect();
    names.insert(BIG.to_string());
    let mut i = 0;
    while names.len() < n {
        let deco = DECORATIONS[g.below(DECORATIONS.len() as u64) as usize];
        let dir = g.below(40);
        let sub = g.below(7);
        let name = match g.below(4) {
            0 => format!("d{dir:02}/f{i:05}{deco}.dat"),
            1 => format!("d{dir:02}/s{sub}/f{i:05}{deco}.csv"),
            2 => format!("d{dir:02}/s{sub} x/deeper/f{i:05}{deco}"),
            _ => format!("top{deco}{i:05}.json"),
        };
        names.insert(name);
        i += 1;
    }
    names.into_iter().collect()
}

/// Content of `version` of `name`: small, except the big blob (3.5 MiB, then 3.25 MiB + 7 bytes:
/// 4 blocks of at most 1 MiB each).
fn content(seed: u64, name: &str, version: u32) -> Vec<u8> {
    let mut g = Gen::new(seed ^ name_hash(name), u64::from(version) + 100);
    let len = if name == BIG {
        if version == 0 {
            3 * MIB + MIB / 2
        } else {
            3 * MIB + MIB / 4 + 7
        }
    } else if name == "empty file" && version == 0 {
        0
    } else {
        1 + g.below(600) as usize
    };
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&g.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

// ----------------------------------------------------------------------------------------------
// Running the binary

struct RunRecord {
    label: String,
    status: ExitStatus,
    stdout: String,
    stderr: String,
    secs: f64,
}

impl RunRecord {
    fn killed(&self) -> bool {
        self.status.signal() == Some(libc::SIGKILL)
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "{}: stdout is not JSON ({e}):\n{}\n{}",
                self.label, self.stdout, self.stderr
            )
        })
    }
    /// The counts of a `--output json` report, in one line (empty if it is not one).
    fn counts(&self) -> String {
        let Ok(j) = serde_json::from_str::<Value>(&self.stdout) else {
            return String::new();
        };
        let pick = |v: &Value, keys: &[&str]| {
            keys.iter()
                .filter_map(|k| {
                    v.get(*k)
                        .and_then(Value::as_u64)
                        .map(|n| format!("{k} {n}"))
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut parts = Vec::new();
        if let Some(r) = j.get("reconcile") {
            parts.push(format!(
                "reconcile: {}",
                pick(
                    r,
                    &[
                        "needs_backup",
                        "already_pending",
                        "snapshots_made",
                        "requests_enqueued",
                        "tombstones_written",
                        "skipped",
                        "errors"
                    ]
                )
            ));
        }
        if let Some(r) = j.get("snapshot") {
            parts.push(format!(
                "snapshot: {}",
                pick(r, &["scanned", "snapshotted", "unchanged", "failed"])
            ));
        }
        let drain = j.get("backup").unwrap_or(&j);
        if drain.get("processed").is_some() {
            parts.push(format!(
                "drain: {}",
                pick(
                    drain,
                    &[
                        "processed",
                        "backed_up",
                        "already_backed_up",
                        "superseded",
                        "poisoned",
                        "retried",
                        "unqueued"
                    ]
                )
            ));
        }
        if j.get("deep").is_some() || j.get("covered").is_some() {
            parts.push(format!(
                "verify: {}",
                pick(&j, &["source_blobs", "covered", "pending", "missing"])
            ));
        }
        parts.join("; ")
    }

    fn describe(&self) -> String {
        format!(
            "{} ({:.1} s, {}):\nstdout:\n{}\nstderr (last 4000 chars):\n{}",
            self.label,
            self.secs,
            self.status,
            self.stdout,
            tail(&self.stderr, 4000)
        )
    }
}

fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

struct Runner {
    dir: tempfile::TempDir,
    runs: Mutex<Vec<RunRecord>>,
    count: Mutex<usize>,
    /// With `LAKEGUARD_CHAOS_KEEP_LOGS`: the proxy whose request log is written next to the
    /// runs' output (`proxy.log`, each run's requests after its header), and how much of it is
    /// written.
    keep: Option<(Arc<FaultProxy>, Mutex<usize>)>,
}

/// What to do while a run is in progress: nothing, or restart Azurite when the proxy says so.
enum During<'a> {
    Nothing,
    RestartAzurite(
        &'a mut Stack,
        &'a FaultProxy,
        tokio::sync::mpsc::UnboundedReceiver<()>,
        &'a mut Option<Duration>,
    ),
}

impl Runner {
    fn new(proxy: &Arc<FaultProxy>) -> Runner {
        let mut dir = tempfile::Builder::new()
            .prefix("lakeguard-chaos-")
            .tempdir()
            .unwrap();
        let keep = std::env::var_os("LAKEGUARD_CHAOS_KEEP_LOGS").is_some();
        if keep {
            dir.disable_cleanup(true);
            eprintln!(
                "chaos: the runs' stdout and stderr and the proxy's log stay in {}",
                dir.path().display()
            );
        }
        Runner {
            dir,
            runs: Mutex::new(Vec::new()),
            count: Mutex::new(0),
            keep: keep.then(|| (Arc::clone(proxy), Mutex::new(0))),
        }
    }

    /// Appends the proxy's requests since the last call to `proxy.log`, under `header`.
    fn dump_proxy_log(&self, header: &str) {
        use std::io::Write as _;
        let Some((proxy, written)) = &self.keep else {
            return;
        };
        let log = proxy.log();
        let mut written = written.lock().unwrap();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("proxy.log"))
            .unwrap();
        writeln!(f, "==== {header}").unwrap();
        for l in &log[(*written).min(log.len())..] {
            writeln!(f, "{l}").unwrap();
        }
        *written = log.len();
    }

    /// Runs `lakeguard <args>`; `armed(pid)` is called once it runs (to aim the proxy's
    /// triggers at it). Returns the record (also kept for the final panic check).
    async fn run(
        &self,
        label: &str,
        args: &[&str],
        env: &[(String, String)],
        armed: impl FnOnce(u32),
        during: During<'_>,
    ) -> RunRecord {
        let n = {
            let mut c = self.count.lock().unwrap();
            *c += 1;
            *c
        };
        let out: PathBuf = self.dir.path().join(format!("{n:02}.stdout"));
        let err: PathBuf = self.dir.path().join(format!("{n:02}.stderr"));
        let started = Instant::now();
        let mut child = tokio::process::Command::new(lakeguard_bin())
            .args(args)
            .env_clear()
            .envs(
                ["PATH", "HOME", "TMPDIR", "LANG"]
                    .iter()
                    .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v))),
            )
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn lakeguard");
        armed(child.id().expect("pid"));
        let deadline = tokio::time::sleep(Duration::from_secs(300));
        tokio::pin!(deadline);
        let status = match during {
            During::Nothing => tokio::select! {
                s = child.wait() => s.expect("wait"),
                _ = &mut deadline => panic!(
                    "{label}: lakeguard {args:?} did not finish within 5 minutes:\n{}",
                    tail(&std::fs::read_to_string(&err).unwrap_or_default(), 4000)
                ),
            },
            During::RestartAzurite(stack, proxy, mut rx, downtime) => {
                let mut restarted = false;
                loop {
                    tokio::select! {
                        s = child.wait() => break s.expect("wait"),
                        Some(()) = rx.recv(), if !restarted => {
                            restarted = true;
                            // The child keeps running (and failing to connect) meanwhile.
                            proxy.quiesce_receives().await;
                            *downtime = Some(stack.azurite.restart(Stop::Graceful).await);
                            proxy.resume_receives();
                        }
                        _ = &mut deadline => panic!(
                            "{label}: lakeguard {args:?} did not finish within 5 minutes:\n{}",
                            tail(&std::fs::read_to_string(&err).unwrap_or_default(), 4000)
                        ),
                    }
                }
            }
        };
        self.dump_proxy_log(&format!("until the end of run {n:02}: {label}"));
        let record = RunRecord {
            label: label.to_string(),
            status,
            stdout: std::fs::read_to_string(&out).unwrap_or_default(),
            stderr: std::fs::read_to_string(&err).unwrap_or_default(),
            secs: started.elapsed().as_secs_f64(),
        };
        eprintln!(
            "chaos: {label}: {} in {:.1} s",
            if record.killed() {
                "SIGKILLed".to_string()
            } else {
                record.status.to_string()
            },
            record.secs
        );
        let copy = RunRecord {
            label: record.label.clone(),
            status: record.status,
            stdout: record.stdout.clone(),
            stderr: record.stderr.clone(),
            secs: record.secs,
        };
        self.runs.lock().unwrap().push(copy);
        record
    }
}

fn sigkill(pid: u32) -> bool {
    // SAFETY: plain syscall on our own child.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
    true
}

/// `LAKEGUARD_*` for a run: the proxy's endpoints, 1 MiB blocks, retries, quiet-ish logs.
fn run_env(
    stack: &Stack,
    proxy: &FaultProxy,
    cfg: &Config,
    retries: &str,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = stack
        .env_via_fault_proxy(proxy)
        .into_iter()
        .filter(|(k, _)| !matches!(k.as_str(), "LAKEGUARD_MAX_RETRIES" | "LAKEGUARD_LOG"))
        .collect();
    let mut set = |k: &str, v: &str| env.push((k.to_string(), v.to_string()));
    set("LAKEGUARD_MAX_RETRIES", retries);
    set("LAKEGUARD_LOG", "info");
    set("LAKEGUARD_COPY_BLOCK_THRESHOLD_BYTES", &MIB.to_string());
    set("LAKEGUARD_COPY_BLOCK_SIZE_BYTES", &MIB.to_string());
    if let Some(ttl) = &cfg.pending_ttl {
        set("LAKEGUARD_PENDING_TTL_SECS", ttl);
    }
    env
}

// ----------------------------------------------------------------------------------------------
// The oracle

async fn put_all(src: &StorageRest, c: &str, blobs: Vec<(String, Vec<u8>)>) {
    stream::iter(blobs)
        .map(|(name, data)| async move {
            src.put_blob(c, &name, &data, &[("origin", "chaos")])
                .await
                .ok(&format!("put {name}"));
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
}

fn unquote(s: &str) -> String {
    s.trim_matches('"').to_string()
}

/// Base blobs of a container: name -> (ETag unquoted, metadata).
async fn base_blobs(
    rest: &StorageRest,
    c: &str,
) -> BTreeMap<String, (String, BTreeMap<String, String>)> {
    rest.list_blobs(c, None)
        .await
        .into_iter()
        .filter(|b| b.snapshot.is_none())
        .map(|b| (b.name, (unquote(&b.etag), b.metadata)))
        .collect()
}

/// Source names whose backup base does not hold their current version (or is a tombstone).
async fn not_backed_up(stack: &Stack, c: &str) -> Vec<String> {
    let source = base_blobs(&stack.source(), c).await;
    let backup = base_blobs(&stack.backup(), c).await;
    source
        .iter()
        .filter(|(name, (etag, _))| {
            backup.get(*name).is_none_or(|(_, m)| {
                m.get(metadata::SOURCE_ETAG).map(|e| unquote(e)) != Some(etag.clone())
                    || m.contains_key(metadata::DELETED_AT)
            })
        })
        .map(|(n, _)| n.clone())
        .collect()
}

/// After a `reconcile --drain` that printed its report, poisoned nothing, left nothing unqueued
/// and left the queue empty: the source blobs whose current version is still not in the backup
/// and that its report does not name as errors. Each of them was left with no request anywhere
/// (e.g. counted as already pending because of a marker no queued request stands behind).
/// `None` when the run does not allow the conclusion.
async fn left_without_request(stack: &Stack, c: &str, run: &RunRecord) -> Option<Vec<String>> {
    let j: Value = serde_json::from_str(&run.stdout).ok()?;
    let (rec, drained) = (&j["reconcile"], &j["backup"]);
    if drained["unqueued"].as_u64()? > 0 || drained["poisoned"].as_u64()? > 0 {
        return None;
    }
    let errors: BTreeSet<String> = rec["error_list"]
        .as_array()?
        .iter()
        .filter_map(|e| e["blob"].as_str().map(str::to_string))
        .collect();
    if rec["errors"].as_u64()? as usize > rec["error_list"].as_array()?.len() {
        return None;
    }
    if stack.queues().message_count(&stack.queue).await > 0 {
        return None;
    }
    Some(
        not_backed_up(stack, c)
            .await
            .into_iter()
            .filter(|n| !errors.contains(n))
            .collect(),
    )
}

/// Records [`left_without_request`] for a reconcile run; with `LAKEGUARD_CHAOS_STRICT_PENDING=1`
/// a non-empty answer fails the test.
async fn check_left(
    stack: &Stack,
    c: &str,
    run: &RunRecord,
    cfg: &Config,
    out: &mut Vec<(String, Option<Vec<String>>)>,
) {
    let left = left_without_request(stack, c, run).await;
    if let (true, Some(left)) = (cfg.strict_pending, &left) {
        assert!(
            left.is_empty(),
            "{} finished with an empty queue and no error for {} blobs whose current version is \
             still not in the backup (counted as already pending on a marker no request stands \
             behind?): {:?}\n{}",
            run.label,
            left.len(),
            &left[..left.len().min(10)],
            run.describe()
        );
    }
    out.push((run.label.clone(), left));
}

/// Every blob's bytes, `n` at a time.
async fn contents(rest: &StorageRest, c: &str, names: Vec<String>) -> Truth {
    stream::iter(names)
        .map(|name| async move {
            let r = rest
                .get_blob(c, &name, None)
                .await
                .ok(&format!("get {name}"));
            (name, r.body)
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// The first differences between two truths, readable.
fn diff(expected: &Truth, actual: &Truth) -> String {
    let mut out = Vec::new();
    for (k, v) in expected {
        match actual.get(k) {
            None => out.push(format!("missing: {k:?}")),
            Some(a) if a != v => out.push(format!(
                "different: {k:?} ({} bytes expected, {} found)",
                v.len(),
                a.len()
            )),
            _ => {}
        }
    }
    for k in actual.keys().filter(|k| !expected.contains_key(*k)) {
        out.push(format!("unexpected: {k:?}"));
    }
    let n = out.len();
    out.truncate(20);
    format!("{n} differences, first ones:\n  {}", out.join("\n  "))
}

// ----------------------------------------------------------------------------------------------
// The proxy and the harness, checked on their own (quick)

fn rest_via(endpoint: String, account: &str, key: &str) -> StorageRest {
    StorageRest::new(
        reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
        endpoint,
        account,
        Auth::SharedKey(key.to_string()),
    )
}

/// Each fault does what it claims: busy = 503 and nothing done; drop = no answer and nothing
/// done; lost = no answer although it was done. A forced fault hits exactly the n-th match, and
/// Azurite's own requests are not faulted (none here).
#[tokio::test]
async fn fault_proxy_faults_do_what_they_claim() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let proxy = stack.fault_proxy(7);
    let c = unique_name("faults");
    stack.source().create_container(&c).await.ok("container");
    let via = rest_via(proxy.blob_endpoint(DEV_ACCOUNT), DEV_ACCOUNT, DEV_KEY);
    let direct = stack.source();
    let put = |name: &'static str| {
        let via = via.clone();
        let c = c.clone();
        async move {
            via.try_send(
                reqwest::Method::PUT,
                &format!("/{c}/{}", encode_path(name)),
                &[],
                &[("x-ms-blob-type", "BlockBlob")],
                b"data".to_vec(),
            )
            .await
        }
    };
    let exists = |name: &'static str| {
        let direct = direct.clone();
        let c = c.clone();
        async move { direct.blob_properties(&c, name, None).await.status == 200 }
    };

    proxy.set_rates(Rates {
        busy: 1.0,
        drop: 0.0,
        lost: 0.0,
    });
    let r = put("busy").await.expect("an answer");
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-ms-error-code").as_deref(), Some("ServerBusy"));
    assert!(!exists("busy").await, "a 503 must not be forwarded");

    proxy.set_rates(Rates {
        busy: 0.0,
        drop: 1.0,
        lost: 0.0,
    });
    assert!(put("dropped").await.is_err(), "a drop gives no answer");
    assert!(!exists("dropped").await, "a drop must not be forwarded");

    proxy.set_rates(Rates {
        busy: 0.0,
        drop: 0.0,
        lost: 1.0,
    });
    assert!(put("lost").await.is_err(), "a lost answer gives no answer");
    assert!(
        exists("lost").await,
        "a lost answer's request is done upstream"
    );

    proxy.set_rates(Rates::OFF);
    proxy.force(2, |s| s.op == "Put Blob", Fault::Lost);
    assert_eq!(put("first").await.expect("answer").status, 201);
    assert!(
        put("second").await.is_err(),
        "the forced fault hits the 2nd"
    );
    assert!(exists("second").await);
    assert_eq!(put("third").await.expect("answer").status, 201);

    let stats = proxy.stats();
    assert_eq!(stats.requests["Put Blob"], 6, "{}", stats.table());
    assert_eq!(stats.injected[&(Fault::Busy, "Put Blob")], 1);
    assert_eq!(stats.injected[&(Fault::Drop, "Put Blob")], 1);
    assert_eq!(stats.injected[&(Fault::Lost, "Put Blob")], 2);
}

/// A Get Messages whose answer is lost hides its messages; the proxy makes them visible again
/// after `ORPHAN_DELAY` (the compressed visibility timeout), and `release_held` does the same for
/// messages a dead consumer held. Dequeue counts are Azurite's.
#[tokio::test]
async fn fault_proxy_releases_orphaned_messages() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let proxy = stack.fault_proxy(7);
    let q = unique_name("orphans");
    let direct = stack.queues();
    direct.create_queue(&q).await.ok("queue");
    direct.send_message(&q, "one").await.ok("send");
    let via = rest_via(proxy.queue_endpoint(DEV_ACCOUNT), DEV_ACCOUNT, DEV_KEY);
    let receive = |via: StorageRest, q: String| async move {
        via.try_send(
            reqwest::Method::GET,
            &format!("/{q}/messages"),
            &[("numofmessages", "32"), ("visibilitytimeout", "300")],
            &[],
            vec![],
        )
        .await
    };

    proxy.force(1, |s| s.op == "Get Messages", Fault::Lost);
    assert!(receive(via.clone(), q.clone()).await.is_err());
    assert!(
        direct.receive_messages(&q, 32, 1).await.is_empty(),
        "hidden"
    );
    tokio::time::sleep(FaultProxy::ORPHAN_DELAY + Duration::from_millis(1500)).await;
    let again = direct.peek_messages(&q).await;
    assert_eq!(again.len(), 1, "visible again after the compressed timeout");
    assert_eq!(again[0].dequeue_count, 1, "the lost receive counted");

    // A consumer that received it and died: released on demand.
    let got = receive(via.clone(), q.clone()).await.expect("answer");
    assert!(got.text().contains("<MessageId>"));
    assert_eq!(proxy.held(), 1);
    assert!(direct.peek_messages(&q).await.is_empty());
    assert_eq!(proxy.release_held().await, 1);
    let back = direct.peek_messages(&q).await;
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].dequeue_count, 2);
    assert!(proxy.stats().released >= 2);
}

/// The same seed and request identity give the same faults, at about the configured rates.
#[test]
fn fault_choice_is_seeded_and_at_the_rates() {
    let rates = Rates {
        busy: 0.05,
        drop: 0.01,
        lost: 0.01,
    };
    let run = |seed| {
        (1..=20_000)
            .map(|n| decide(seed, "Blob PUT /devstoreaccount1/c/x snapshot", n, rates))
            .collect::<Vec<_>>()
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
    let faults = run(3);
    let count = |k| faults.iter().filter(|f| **f == Some(k)).count() as f64 / 20_000.0;
    assert!(
        (count(Fault::Busy) - 0.05).abs() < 0.01,
        "{}",
        count(Fault::Busy)
    );
    assert!((count(Fault::Drop) - 0.01).abs() < 0.004);
    assert!((count(Fault::Lost) - 0.01).abs() < 0.004);
}

/// A graceful restart keeps everything Azurite acknowledged (blobs and messages), on the same
/// ports.
#[tokio::test]
async fn azurite_restart_keeps_acknowledged_writes() {
    let (mut stack, c) = written_then_restarted(Stop::Graceful).await;
    assert_eq!(stack.source().list_blobs(&c, None).await.len(), 40);
    assert_eq!(stack.queues().message_count(&c).await, 40);
    assert!(stack.azurite.is_running());
}

/// Azurite saves its metadata every 5 s: a SIGKILL loses what it acknowledged since. A test of
/// the emulator (why the chaos run restarts it gracefully), and timing-dependent: ignored.
#[tokio::test]
#[ignore = "documents an emulator limitation; run with --ignored"]
async fn azurite_loses_acknowledged_writes_on_sigkill() {
    let (stack, c) = written_then_restarted(Stop::Kill).await;
    let blobs = stack.source().list_blobs(&c, None).await.len();
    let messages = stack.queues().message_count(&c).await;
    eprintln!("after SIGKILL: {blobs} of 40 blobs, {messages} of 40 messages");
    assert!(blobs < 40 || messages < 40);
}

/// 40 blobs and 40 messages written in about a second, 6 s after the container and the queue
/// were created; then `restart(stop)`.
async fn written_then_restarted(stop: Stop) -> (Stack, String) {
    let mut stack = Stack::start_with(Mode::SharedKeyHttp, Persistence::Disk).await;
    let (src, q) = (stack.source(), stack.queues());
    let c = unique_name("restart");
    src.create_container(&c).await.ok("container");
    q.create_queue(&c).await.ok("queue");
    tokio::time::sleep(Duration::from_secs(6)).await;
    for i in 0..40 {
        src.put_blob(&c, &format!("b{i}"), b"x", &[])
            .await
            .ok("put");
        q.send_message(&c, "m").await.ok("message");
    }
    let port = stack.azurite.blob_port();
    stack.azurite.restart(stop).await;
    assert_eq!(stack.azurite.blob_port(), port, "same port");
    (stack, c)
}

// ----------------------------------------------------------------------------------------------
// The chaos run

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_backup_converges_and_restores_exactly() {
    let cfg = config();
    let _seed_guard = SeedOnFailure(cfg.seed);
    let wall = Instant::now();
    eprintln!(
        "chaos: LAKEGUARD_CHAOS_SEED={:#x}, {} blobs, rates 503 {} / drop {} / lost {}",
        cfg.seed, cfg.blobs, cfg.rates.busy, cfg.rates.drop, cfg.rates.lost
    );
    let mut stack = Stack::start_with(Mode::SharedKeyHttp, Persistence::Disk).await;
    let proxy = Arc::new(stack.fault_proxy(cfg.seed));
    let runner = Runner::new(&proxy);
    let (src, bak) = (stack.source(), stack.backup());
    let c = unique_name("chaos");
    src.create_container(&c).await.ok("container");
    let env4 = run_env(&stack, &proxy, &cfg, "4");
    let env1 = run_env(&stack, &proxy, &cfg, "1");
    let mut phases: Vec<(&str, f64)> = Vec::new();
    let mut g = Gen::new(cfg.seed, 2);

    // The lake and its truth at T0.
    let t = Instant::now();
    let names = lake_names(cfg.seed, cfg.blobs);
    let truth0: Truth = names
        .iter()
        .map(|n| (n.clone(), content(cfg.seed, n, 0)))
        .collect();
    put_all(
        &src,
        &c,
        truth0.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    )
    .await;
    let t0 = mark().await;
    phases.push(("lake upload", t.elapsed().as_secs_f64()));

    // ---- Phase A: initial backup under faults, producer and drain killed -------------------
    let t = Instant::now();
    proxy.set_rates(cfg.rates);
    // The one Put Block List of the big blob's first copy: done, answer lost.
    proxy.force(1, |s| s.op == "Put Block List", Fault::Lost);
    let k = (cfg.blobs as u64) / 4 + g.below(cfg.blobs as u64 / 4);
    let a1 = runner
        .run(
            "A1 snapshot (SIGKILL after snapshot k)",
            &["snapshot", "--container", &c, "--output", "json"],
            &env4,
            |pid| proxy.on_upstream(k, |s| s.op == "Snapshot Blob", move || sigkill(pid)),
            During::Nothing,
        )
        .await;
    assert!(
        a1.killed(),
        "A1 should have been killed after snapshot {k}: {}",
        a1.describe()
    );
    let released_a1 = proxy.release_held().await;
    let queued = stack.queues().message_count(&stack.queue).await as u64;
    assert!(queued >= 8, "A1 left only {queued} requests on the queue");
    let j = queued / 4 + g.below(queued / 4);
    let a2 = runner
        .run(
            "A2 backup --drain (SIGKILL after copy j)",
            &["backup", "--drain", "--output", "json"],
            &env4,
            |pid| {
                proxy.on_upstream(
                    j,
                    |s| s.op == "Copy Blob From URL" || s.op == "Put Block List",
                    move || sigkill(pid),
                )
            },
            During::Nothing,
        )
        .await;
    assert!(
        a2.killed(),
        "A2 should have been killed after copy {j} of {queued} queued: {}",
        a2.describe()
    );
    proxy.clear_triggers();
    let released_a2 = proxy.release_held().await;
    runner
        .run(
            "A3 snapshot --drain",
            &["snapshot", "--container", &c, "--drain", "--output", "json"],
            &env4,
            |_| {},
            During::Nothing,
        )
        .await;
    // Checkpoint: under faults, reconcile brings the backup to every T0 version.
    let mut a_runs = 0;
    loop {
        a_runs += 1;
        runner
            .run(
                &format!("A4 reconcile --drain #{a_runs}"),
                &[
                    "reconcile",
                    "--container",
                    &c,
                    "--drain",
                    "--output",
                    "json",
                ],
                &env4,
                |_| {},
                During::Nothing,
            )
            .await;
        proxy.release_held().await;
        let missing = not_backed_up(&stack, &c).await;
        if missing.is_empty() {
            break;
        }
        assert!(
            a_runs < 3,
            "after {a_runs} reconcile runs under faults, {} T0 versions are still not in the backup, e.g. {:?}\n{}",
            missing.len(),
            &missing[..missing.len().min(10)],
            runner.runs.lock().unwrap().last().unwrap().describe()
        );
    }
    phases.push(("phase A (initial backup, kills)", t.elapsed().as_secs_f64()));
    // T1: after the first complete producer pass (A3), before phase B's changes. T0 lies
    // before any complete pass: lakeguard's coverage of the container began after it.
    let t1 = mark().await;

    // ---- Phase B: changes under faults, Azurite restarted mid-run --------------------------
    let t = Instant::now();
    let mut now = truth0.clone();
    let mut deleted: BTreeSet<String> = BTreeSet::new();
    let mut writes: Vec<(String, Vec<u8>)> = Vec::new();
    let mut overwritten = 0;
    for name in &names {
        let r = mix(cfg.seed ^ name_hash(name) ^ 0xb1) % 1000;
        let forced_overwrite = name == BIG || name == "a.txt" || name == "empty file";
        if forced_overwrite || (name != "a.txt.bak" && r < 80) {
            let data = content(cfg.seed, name, 1);
            now.insert(name.clone(), data.clone());
            writes.push((name.clone(), data));
            overwritten += 1;
        } else if name == "a.txt.bak" || r < 120 {
            deleted.insert(name.clone());
        }
    }
    let added = (cfg.blobs * 3 / 100).max(5);
    for i in 0..added {
        let deco = DECORATIONS[g.below(DECORATIONS.len() as u64) as usize];
        let name = match i {
            0 => "a.txt.bak.new".to_string(),
            1 => "logs/2026.txt.1".to_string(),
            _ => format!("new/n{i:04}{deco}.dat"),
        };
        let data = content(cfg.seed, &name, 0);
        now.insert(name.clone(), data.clone());
        writes.push((name, data));
    }
    put_all(&src, &c, writes).await;
    for name in &deleted {
        src.delete_blob(&c, name)
            .await
            .ok(&format!("delete {name}"));
        now.remove(name);
    }
    let mut restart_down = None;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    // Snapshots and copies of B2: about two per write; restart a quarter to half way in.
    let w = (overwritten + added) as u64;
    let m = (w / 4).max(1) + g.below((w / 4).max(1));
    let b2 = {
        let tx = tx.clone();
        runner
            .run(
                "B2 snapshot --drain (Azurite restarted mid-run)",
                &["snapshot", "--container", &c, "--drain", "--output", "json"],
                &env1,
                |_| {
                    proxy.on_upstream(
                        m,
                        |s| s.op == "Snapshot Blob" || s.op == "Copy Blob From URL",
                        move || {
                            let _ = tx.send(());
                            false
                        },
                    )
                },
                During::RestartAzurite(&mut stack, &proxy, rx, &mut restart_down),
            )
            .await
    };
    assert!(
        restart_down.is_some(),
        "Azurite was not restarted during B2 (trigger at request {m}): {}",
        b2.describe()
    );
    proxy.clear_triggers();
    proxy.release_held().await;
    // Some deleted names come back (their backups may already be tombstones).
    let recreated: Vec<String> = deleted.iter().take(3).cloned().collect();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for name in &recreated {
        let data = content(cfg.seed, name, 2);
        src.put_blob(&c, name, &data, &[]).await.ok("recreate");
        now.insert(name.clone(), data);
        deleted.remove(name);
    }
    let b4 = runner
        .run(
            "B4 reconcile --drain",
            &[
                "reconcile",
                "--container",
                &c,
                "--drain",
                "--output",
                "json",
            ],
            &env1,
            |_| {},
            During::Nothing,
        )
        .await;
    let mut left_unqueued = Vec::new();
    check_left(&stack, &c, &b4, &cfg, &mut left_unqueued).await;
    phases.push((
        "phase B (changes, Azurite restart)",
        t.elapsed().as_secs_f64(),
    ));

    // ---- Phase C: faults off; converge, then prove ------------------------------------------
    let t = Instant::now();
    proxy.set_rates(Rates::OFF);
    let stats = proxy.stats();
    proxy.release_held().await;
    let mut c_runs = 0;
    let mut worked = 0;
    loop {
        c_runs += 1;
        let r = runner
            .run(
                &format!("C reconcile --drain #{c_runs}"),
                &[
                    "reconcile",
                    "--container",
                    &c,
                    "--drain",
                    "--output",
                    "json",
                ],
                &env4,
                |_| {},
                During::Nothing,
            )
            .await;
        check_left(&stack, &c, &r, &cfg, &mut left_unqueued).await;
        let j = r.json();
        let (rec, drained) = (&j["reconcile"], &j["backup"]);
        let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or(u64::MAX);
        let idle = n(rec, "needs_backup") == 0
            && n(rec, "tombstones") == 0
            && n(rec, "errors") == 0
            && n(rec, "skipped") == 0
            && n(drained, "processed") == 0;
        if idle {
            assert!(r.status.success(), "{}", r.describe());
            break;
        }
        worked += 1;
        assert!(
            c_runs < 4,
            "reconcile did not converge in {c_runs} runs with faults off; the last one:\n{}",
            r.describe()
        );
    }

    // Every current version is in the backup, byte for byte, and names its source ETag.
    let source_now = base_blobs(&src, &c).await;
    let backup_now = base_blobs(&bak, &c).await;
    assert_eq!(
        source_now.keys().cloned().collect::<BTreeSet<_>>(),
        now.keys().cloned().collect::<BTreeSet<_>>(),
        "the source holds what the test wrote"
    );
    let mut wrong = Vec::new();
    for (name, (etag, _)) in &source_now {
        match backup_now.get(name) {
            None => wrong.push(format!("no backup: {name:?}")),
            Some((_, m)) => {
                if m.get(metadata::SOURCE_ETAG).map(|e| unquote(e)).as_ref() != Some(etag) {
                    wrong.push(format!(
                        "backup of {name:?} names {:?}, source is {etag}",
                        m.get(metadata::SOURCE_ETAG)
                    ));
                }
                if m.contains_key(metadata::DELETED_AT) {
                    wrong.push(format!("live {name:?} is tombstoned in the backup"));
                }
            }
        }
    }
    for name in &deleted {
        match backup_now.get(name) {
            Some((_, m)) if m.contains_key(metadata::DELETED_AT) => {}
            Some(_) => wrong.push(format!("deleted {name:?} is not tombstoned")),
            None => wrong.push(format!("deleted {name:?} has no backup at all")),
        }
    }
    for name in backup_now.keys() {
        if !now.contains_key(name) && !deleted.contains(name) {
            wrong.push(format!("backup has a name the source never had: {name:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} problems:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    let backup_bytes = contents(&bak, &c, now.keys().cloned().collect()).await;
    assert!(
        backup_bytes == now,
        "backup bytes: {}",
        diff(&now, &backup_bytes)
    );

    // Nothing poisoned, nothing left.
    for q in [
        stack.queue.clone(),
        format!("{}-poison", stack.queue),
        format!("{}-reconcile", stack.queue),
        format!("{}-reconcile-poison", stack.queue),
    ] {
        let left = stack.queues().peek_messages(&q).await;
        assert!(
            left.is_empty(),
            "queue {q} holds {} messages, e.g. {:?}",
            left.len(),
            left[0].decoded_text()
        );
    }

    let v = runner
        .run(
            "C verify --deep",
            &["verify", "--container", &c, "--deep", "--output", "json"],
            &env4,
            |_| {},
            During::Nothing,
        )
        .await;
    assert!(v.status.success(), "{}", v.describe());

    // T0 (before the faults, before any complete pass): every name present at T0 comes back
    // exactly. Names first seen later cannot be proven absent at T0 (coverage began after it):
    // they are reported unavailable and not restored, and the run says so (exit 1).
    let target = unique_name("restored");
    let r = runner
        .run(
            "C restore --at T0",
            &[
                "restore",
                "--container",
                &c,
                "--at",
                &metadata::format_time(t0),
                "--to-container",
                &target,
                "--output",
                "json",
            ],
            &env4,
            |_| {},
            During::Nothing,
        )
        .await;
    let report = r.json();
    let coverage = report["history"]["coverage_since"]
        .as_str()
        .and_then(metadata::parse_time)
        .expect("a complete pass was recorded");
    assert!(
        coverage > t0,
        "coverage {coverage} should start after T0 {t0}"
    );
    let unavailable = report["plan"]["unavailable"].as_u64().unwrap_or(u64::MAX);
    assert_eq!(
        r.status.code(),
        Some(if unavailable > 0 { 1 } else { 0 }),
        "{}",
        r.describe()
    );
    for item in report["items"].as_array().into_iter().flatten() {
        if item["kind"] == "unavailable" {
            let name = item["name"].as_str().unwrap_or_default();
            assert!(
                !truth0.contains_key(name),
                "{name} existed at T0 but is unavailable: {item:#}"
            );
        }
    }
    let restored_names: Vec<String> = base_blobs(&src, &target).await.into_keys().collect();
    let restored = contents(&src, &target, restored_names).await;
    assert!(
        restored == truth0,
        "restore at T0: {}",
        diff(&truth0, &restored)
    );
    // T1, covered: complete, and exactly the truth (phase A changed nothing in the lake).
    let target = unique_name("restored-t1");
    let r = runner
        .run(
            "C restore --at T1",
            &[
                "restore",
                "--container",
                &c,
                "--at",
                &metadata::format_time(t1),
                "--to-container",
                &target,
                "--output",
                "json",
            ],
            &env4,
            |_| {},
            During::Nothing,
        )
        .await;
    assert!(r.status.success(), "{}", r.describe());
    let restored_names: Vec<String> = base_blobs(&src, &target).await.into_keys().collect();
    let restored = contents(&src, &target, restored_names).await;
    assert!(
        restored == truth0,
        "restore at T1: {}",
        diff(&truth0, &restored)
    );
    phases.push((
        "phase C (converge, verify, restore)",
        t.elapsed().as_secs_f64(),
    ));

    // ---- Phase D: the restore itself under faults, killed, then finished by reruns ----------
    let t = Instant::now();
    let before_d = proxy.stats();
    proxy.set_rates(cfg.rates);
    let r_kill = (cfg.blobs as u64) / 4 + g.below(cfg.blobs as u64 / 4);
    // Under faults a run may also end on its own before its r-th copy (its listing can exhaust
    // the retries of LAKEGUARD_MAX_RETRIES): such a run proves nothing about being killed, so D1
    // starts over into a fresh container until a run is killed mid-restore.
    let mut d1_runs = 0;
    let (target, d1) = loop {
        d1_runs += 1;
        let target = unique_name("restored-faulted");
        let args = restore_args_for(&c, t1, &target);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = runner
            .run(
                &format!("D1 restore --at T1 under faults (SIGKILL after copy r) #{d1_runs}"),
                &args,
                &env1,
                |pid| {
                    proxy.on_upstream(
                        r_kill,
                        |s| s.op == "Copy Blob From URL",
                        move || sigkill(pid),
                    )
                },
                During::Nothing,
            )
            .await;
        proxy.clear_triggers();
        if run.killed() {
            break (target, run);
        }
        assert!(
            !run.status.success() && d1_runs < 4,
            "D1 should have been killed after copy {r_kill}, run #{d1_runs}: {}",
            run.describe()
        );
    };
    assert!(d1.killed());
    let restore_args = restore_args_for(&c, t1, &target);
    let restore_args: Vec<&str> = restore_args.iter().map(String::as_str).collect();
    let mut d_runs = 0;
    loop {
        d_runs += 1;
        let r = runner
            .run(
                &format!("D2 restore --at T1 again under faults #{d_runs}"),
                &restore_args,
                &env1,
                |_| {},
                During::Nothing,
            )
            .await;
        if r.status.success() {
            break;
        }
        assert!(
            d_runs < 4,
            "a restore under faults did not complete in {d_runs} reruns:\n{}",
            r.describe()
        );
    }
    proxy.set_rates(Rates::OFF);
    let last = runner
        .run(
            "D3 restore --at T1 again, faults off",
            &restore_args,
            &env4,
            |_| {},
            During::Nothing,
        )
        .await;
    assert!(last.status.success(), "{}", last.describe());
    let plan = &last.json()["plan"];
    assert_eq!(
        (plan["restore"].as_u64(), plan["unchanged"].as_u64()),
        (Some(0), Some(truth0.len() as u64)),
        "a finished restore, run again, has nothing left to do: {plan:#}"
    );
    let restored_names: Vec<String> = base_blobs(&src, &target).await.into_keys().collect();
    let restored = contents(&src, &target, restored_names).await;
    assert!(
        restored == truth0,
        "restore at T1 under faults: {}",
        diff(&truth0, &restored)
    );
    phases.push(("phase D (restore under faults)", t.elapsed().as_secs_f64()));
    let stats_d = proxy.stats().since(&before_d);

    // No panic anywhere, no secret in any log.
    for run in runner.runs.lock().unwrap().iter() {
        assert!(
            !run.stderr.contains("panicked") && !run.stdout.contains("panicked"),
            "{} panicked:\n{}",
            run.label,
            run.describe()
        );
        stack.assert_no_secrets_in(&run.stderr);
    }

    // The run's figures.
    assert!(stats.total(Fault::Busy) > 0 && stats.total(Fault::Drop) > 0);
    for op in [
        "Snapshot Blob",
        "Put Message",
        "Delete Message",
        "Put Block List",
    ] {
        assert!(
            stats.injected.contains_key(&(Fault::Lost, op)),
            "no lost answer of {op} was injected (seed {:#x}):\n{}",
            cfg.seed,
            stats.table()
        );
    }
    let mut summary = format!(
        "\n==== chaos summary: seed {:#x}, {} blobs; then {overwritten} overwritten (the 3.5 MiB block blob included), {} deleted ({} of them re-created), {added} added\n",
        cfg.seed,
        cfg.blobs,
        deleted.len() + recreated.len(),
        recreated.len()
    );
    summary.push_str(&format!(
        "phases A+B, faults on ({} requests): 503 {}, dropped {}, answer lost {}\n{}",
        stats.requests.values().sum::<u64>(),
        stats.total(Fault::Busy),
        stats.total(Fault::Drop),
        stats.total(Fault::Lost),
        stats.table()
    ));
    summary.push_str(&format!(
        "phase D (restore), faults on ({} requests): 503 {}, dropped {}, answer lost {}\n{}",
        stats_d.requests.values().sum::<u64>(),
        stats_d.total(Fault::Busy),
        stats_d.total(Fault::Drop),
        stats_d.total(Fault::Lost),
        stats_d.table()
    ));
    summary.push_str(&format!(
        "kills: producer after snapshot {k}, drain after copy {j} of {queued}; messages released after kills {released_a1} + {released_a2}\n\
         Azurite restarted (SIGTERM) after request {m} of B2, down {down:.1} s\n\
         phase A reconcile runs to full coverage: {a_runs}; phase C reconcile runs with work: {worked} (+1 that found nothing)\n\
         restore under faults: killed after copy {r_kill}, then {d_runs} rerun(s) to complete\n\
         versions a reconcile --drain left neither backed up, nor queued, nor reported as errors (it ended with an empty queue): {left}\n",
        down = restart_down.unwrap().as_secs_f64(),
        left = left_unqueued
            .iter()
            .map(|(label, l)| match l {
                Some(l) => format!("{label}: {}", l.len()),
                None => format!("{label}: not concluded"),
            })
            .collect::<Vec<_>>()
            .join("; "),
    ));
    for (p, s) in &phases {
        summary.push_str(&format!("  {p}: {s:.1} s\n"));
    }
    summary.push_str(&format!(
        "wall time {:.1} s\n",
        wall.elapsed().as_secs_f64()
    ));
    for run in runner.runs.lock().unwrap().iter() {
        summary.push_str(&format!(
            "  {}: {} in {:.1} s  {}\n",
            run.label,
            run.status,
            run.secs,
            run.counts()
        ));
    }
    eprintln!("{summary}");
}

/// `restore --at T --to-container TARGET --output json` for container `c`.
fn restore_args_for(c: &str, at: time::OffsetDateTime, target: &str) -> Vec<String> {
    [
        "restore",
        "--container",
        c,
        "--at",
        &metadata::format_time(at),
        "--to-container",
        target,
        "--output",
        "json",
    ]
    .map(str::to_string)
    .to_vec()
}
