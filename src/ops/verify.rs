//! `lakeguard verify`: proof that the backup is complete and intact, and that it restores.
//!
//! Coverage. The source container is listed with snapshots and metadata (grouped by exact name)
//! and merge-joined with the backup container's flat listing. A source blob is
//! - `covered` when the backup's base blob holds its current version (`lakeguard_source_etag`
//!   equals the live ETag, `lakeguard_backed_up_at` present, no tombstone);
//! - `pending` when not yet, but a snapshot of that version carries a fresh
//!   `lakeguard_requested_at` (a request is queued; the same decision reconcile makes);
//! - `missing` otherwise (nothing will back it up until the next producer or reconcile run).
//!
//! The RPO lag is the age (now minus the source's Last-Modified) of the oldest current version
//! that is not covered, pending or missing: how much would be lost if the source vanished now.
//!
//! Integrity (`--deep`). For covered blobs (all, or a random sample of `--sample N`) the backup's
//! content and the source version's content are streamed through SHA-256, chunk by chunk
//! (memory bounded by one chunk per transfer). The source side is the immutable source snapshot
//! the backup names (`lakeguard_source_snapshot`) when it still exists, else the live blob, whose
//! ETag is checked again after reading so that a blob rewritten meanwhile is skipped, not
//! reported as corrupt. The backup side is checked the same way.
//!
//! History (`--history`). `--deep` looks at base blobs only; the backup's history is its
//! snapshots. Every backup snapshot lakeguard made (`lakeguard_source_etag` present; all, or a
//! random sample of `--sample N`) is streamed once through SHA-256 and MD5 and checked against
//! what it claims: its length, its Content-MD5 when it has one, and, while the source snapshot
//! it names (`lakeguard_source_snapshot`) still exists, that snapshot's content, read `If-Match`
//! the ETag of a HEAD that also proves the snapshot holds the same version
//! (`lakeguard_source_etag`). The backup is listed page by page (with snapshots): memory is one
//! page plus one batch of checks (or the sample).
//!
//! Restore drill (`--restore-drill`). A random sample of each container's blobs is restored as of
//! now, with the real restore code, into a scratch container of the backup account
//! (`lakeguard-drill-<random>`), compared with the source (or, when the source moved on, with
//! the backup version itself), and the scratch container is deleted whatever happened.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Instant;

use futures::{stream, StreamExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tracing::{info, warn};

use super::restore::{self as restore_op, RestoreRequest, TargetSpec};
use super::{BlobFailure, OpError, Progress, MAX_REPORTED_FAILURES};
use crate::app::App;
use crate::core::join::{join_step, JoinError, JoinStep, NameGroups, Named, SortedInput};
use crate::core::reconcile::{decide_snapshot, SnapshotDecision};
use crate::core::restore::{PlanItem, Version};
use crate::model::{metadata, BlobEntry, Etag};
use crate::storage::blob::ListOptions;
use crate::storage::{BlobStore, Lister, StorageError};

/// Names kept in reports per category; counts stay exact.
const MAX_LISTED: usize = 100;

/// Prefix of the scratch containers of restore drills (never verified or drilled themselves).
pub const DRILL_PREFIX: &str = crate::settings::DRILL_CONTAINER_PREFIX;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PendingBlob {
    pub name: String,
    #[serde(with = "time::serde::rfc3339")]
    pub requested_at: OffsetDateTime,
    pub lag_secs: i64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Mismatch {
    pub name: String,
    pub source: String,
    pub backup: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DeepReport {
    /// Blobs whose contents were compared.
    pub checked: u64,
    pub matched: u64,
    pub mismatched: u64,
    pub mismatches: Vec<Mismatch>,
    /// Blobs that changed while being read (source or backup): not a verdict either way.
    pub skipped_changed: u64,
}

/// One backup version (snapshot) that is not what it claims.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HistoryMismatch {
    pub name: String,
    /// The backup snapshot.
    pub snapshot: String,
    /// What differs (length, Content-MD5, or content vs the source snapshot).
    pub problem: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HistoryReport {
    /// Backup snapshots lakeguard wrote (the backup's history), listed.
    pub versions: u64,
    /// Backup snapshots without `lakeguard_source_etag` (not lakeguard's): not checked.
    pub foreign: u64,
    /// Versions hashed (all, or the sample).
    pub checked: u64,
    pub matched: u64,
    pub mismatched: u64,
    /// Of `mismatched`, by what differed (one version can count in several).
    pub length_mismatches: u64,
    pub md5_mismatches: u64,
    pub source_mismatches: u64,
    /// Of `checked`: compared with the source snapshot they name (it still exists).
    pub compared_with_source: u64,
    /// Of `checked`: the named source snapshot is gone (length and MD5 checked only).
    pub source_gone: u64,
    /// Of `checked`: copied from a live blob (no source snapshot named; length and MD5 only).
    pub source_unnamed: u64,
    /// Of `checked`: with a Content-MD5 to check against.
    pub with_md5: u64,
    pub mismatches: Vec<HistoryMismatch>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    pub container: String,
    /// Source blobs with data (directory placeholders excluded).
    pub source_blobs: u64,
    pub covered: u64,
    pub pending: u64,
    pub missing: u64,
    pub missing_blobs: Vec<String>,
    pub pending_blobs: Vec<PendingBlob>,
    /// Age in seconds of the oldest current version not in the backup (0 when all are).
    pub rpo_lag_secs: i64,
    pub deep: Option<DeepReport>,
    /// `--history`: the backup's snapshots checked against what they claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<HistoryReport>,
    pub failed: u64,
    pub failures: Vec<BlobFailure>,
    /// Hierarchical source: paths (directories included) whose owner, group, permissions and
    /// ACL were compared with what the backup records for their current version.
    #[serde(default)]
    pub security_checked: u64,
    /// Of those, paths whose recorded security state differs from the source's (or is missing).
    #[serde(default)]
    pub security_mismatched: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_mismatches: Vec<SecurityMismatch>,
    /// Hierarchical source: directories listed in the source.
    #[serde(default)]
    pub directories: u64,
    pub elapsed_ms: u128,
}

/// A path whose recorded security state is not the source's.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SecurityMismatch {
    pub name: String,
    /// `owner`, `group`, `permissions`, `acl`, or `not recorded`.
    pub differs: Vec<String>,
    pub source: crate::model::Security,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded: Option<crate::model::Security>,
}

impl VerifyReport {
    /// Compares the source's listed security state of `name` with the backup row's record.
    fn check_security(
        &mut self,
        name: &str,
        source: &crate::model::Security,
        backup: Option<&BlobEntry>,
    ) {
        self.security_checked += 1;
        let recorded = backup.and_then(|b| crate::model::Security::from_metadata(&b.metadata));
        let differs: Vec<String> = match &recorded {
            None => vec!["not recorded".into()],
            Some(r) => r
                .differences(source)
                .into_iter()
                .map(str::to_owned)
                .collect(),
        };
        if differs.is_empty() {
            return;
        }
        self.security_mismatched += 1;
        if self.security_mismatches.len() < MAX_LISTED {
            self.security_mismatches.push(SecurityMismatch {
                name: name.to_owned(),
                differs,
                source: source.clone(),
                recorded,
            });
        }
    }

    /// Nothing missing, nothing corrupt, nothing that could not be checked.
    pub fn is_ok(&self) -> bool {
        self.missing == 0
            && self.failed == 0
            && self.deep.as_ref().is_none_or(|d| d.mismatched == 0)
            && self.history.as_ref().is_none_or(|h| h.mismatched == 0)
            && self.security_mismatched == 0
    }

    fn fail(&mut self, blob: &str, error: String) {
        warn!(blob, %error, "verify: could not check");
        self.failed += 1;
        if self.failures.len() < MAX_REPORTED_FAILURES {
            self.failures.push(BlobFailure {
                blob: blob.to_owned(),
                error,
            });
        }
    }
}

/// All rows of one source name: the planner's left input.
struct SourceName {
    name: String,
    base: Option<BlobEntry>,
    snapshots: Vec<BlobEntry>,
}

impl Named for SourceName {
    fn name(&self) -> &str {
        &self.name
    }
}

fn source_name(group: Vec<BlobEntry>) -> Option<SourceName> {
    let name = group.first()?.name.clone();
    let (mut base, mut snapshots) = (None, Vec::new());
    for e in group {
        if e.snapshot.is_some() {
            snapshots.push(e);
        } else {
            base = Some(e);
        }
    }
    Some(SourceName {
        name,
        base,
        snapshots,
    })
}

fn join_error(e: JoinError) -> OpError {
    OpError::Storage(StorageError::Permanent {
        what: "verify".into(),
        detail: e.to_string(),
    })
}

pub(crate) fn random_u64() -> u64 {
    restore_op::random_u64() ^ {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u8(1);
        h.finish()
    }
}

/// A covered blob to compare with `--deep`.
struct DeepJob {
    name: String,
    backup_etag: Etag,
    /// The source snapshot holding the version, when it still exists.
    source_snapshot: Option<String>,
    source_etag: Etag,
}

/// Streams a blob or snapshot through SHA-256. Returns (length, hex digest).
pub async fn sha256_of(
    store: &BlobStore,
    container: &str,
    blob: &str,
    snapshot: Option<&str>,
) -> Result<(u64, String), StorageError> {
    let mut h = Sha256::new();
    let n = store
        .download_with(container, blob, snapshot, |chunk| h.update(chunk))
        .await?;
    Ok((n, hex(&h.finalize())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a mutable base blob that had `etag` when it was listed; `None` when it changed.
/// ETags never repeat, so if the blob still has `etag` after the download, nothing was written
/// between the listing and the end of the download: the bytes read are that version's.
async fn sha256_if_unchanged(
    store: &BlobStore,
    container: &str,
    blob: &str,
    etag: &Etag,
) -> Result<Option<(u64, String)>, StorageError> {
    let digest = sha256_of(store, container, blob, None).await?;
    let after = store.properties(container, blob, None).await?;
    Ok((&after.etag == etag).then_some(digest))
}

enum DeepOutcome {
    Matched,
    Mismatched(Mismatch),
    Changed,
    Failed(String),
}

async fn deep_one(app: &App, container: &str, job: &DeepJob) -> DeepOutcome {
    let source = match &job.source_snapshot {
        Some(s) => sha256_of(&app.source, container, &job.name, Some(s))
            .await
            .map(Some),
        None => sha256_if_unchanged(&app.source, container, &job.name, &job.source_etag).await,
    };
    let backup = sha256_if_unchanged(&app.backup, container, &job.name, &job.backup_etag).await;
    match (source, backup) {
        (Ok(Some(s)), Ok(Some(b))) if s == b => DeepOutcome::Matched,
        (Ok(Some(s)), Ok(Some(b))) => DeepOutcome::Mismatched(Mismatch {
            name: job.name.clone(),
            source: format!("{} bytes sha256 {}", s.0, s.1),
            backup: format!("{} bytes sha256 {}", b.0, b.1),
        }),
        (Err(e), _) | (_, Err(e)) if e.is_not_found() => DeepOutcome::Changed,
        (Err(e), _) | (_, Err(e)) => DeepOutcome::Failed(e.to_string()),
        _ => DeepOutcome::Changed,
    }
}

/// What `verify --container C` checks besides coverage.
#[derive(Clone, Copy, Debug, Default)]
pub struct VerifyOptions {
    /// `--deep`: content of the backup's base blobs against their source versions.
    pub deep: bool,
    /// `--history`: the backup's snapshots against what they claim.
    pub history: bool,
    /// `--sample N`: that many blobs (deep) and versions (history), chosen at random.
    pub sample: Option<usize>,
}

/// `lakeguard verify --container C [--deep] [--sample N]`.
pub async fn run(
    app: &App,
    container: &str,
    deep: bool,
    sample: Option<usize>,
    progress: Arc<dyn Progress>,
) -> Result<VerifyReport, OpError> {
    let opts = VerifyOptions {
        deep,
        history: false,
        sample,
    };
    run_with(app, container, &opts, progress).await
}

/// `lakeguard verify --container C [--deep] [--history] [--sample N]`.
pub async fn run_with(
    app: &App,
    container: &str,
    opts: &VerifyOptions,
    progress: Arc<dyn Progress>,
) -> Result<VerifyReport, OpError> {
    let (deep, sample) = (opts.deep, opts.sample);
    let started = Instant::now();
    crate::settings::validate_container_name(container).map_err(OpError::InvalidInput)?;
    if !app.source.container_exists(container).await? {
        return Err(OpError::ContainerNotFound(container.to_owned()));
    }
    let now = OffsetDateTime::now_utc();
    let pending_ttl = app.pending_ttl().await;
    let batches = crate::ops::state::BatchRecords::default();
    let order = app.settings.name_order;
    let mut report = VerifyReport {
        container: container.to_owned(),
        deep: deep.then(DeepReport::default),
        ..Default::default()
    };
    let source_opts = ListOptions {
        prefix: None,
        snapshots: true,
        metadata: true,
        max_results: None,
    };
    let backup_opts = ListOptions {
        prefix: None,
        snapshots: false,
        metadata: true,
        max_results: None,
    };
    let mut groups = NameGroups::new(order, "source");
    let mut left: SortedInput<SourceName> = SortedInput::new("source");
    let mut right: SortedInput<BlobEntry> = SortedInput::new("backup");
    let (mut source_marker, mut backup_marker) = (None::<String>, None::<String>);
    let mut source_pages = Lister::new(&app.source, container, source_opts);
    // No backup container at all: everything is missing.
    let mut backup_pages = Lister::new(&app.backup, container, backup_opts).missing_is_empty();
    source_pages.prefetch(None);
    backup_pages.prefetch(None);
    let mut jobs: Vec<DeepJob> = Vec::new();
    let mut covered_seen = 0u64;
    progress.message("listing");
    loop {
        let step = join_step(order, &mut left, &mut right);
        match step {
            JoinStep::NeedLeft => {
                let page = source_pages.page(source_marker.take()).await?;
                groups.push(page.entries).map_err(join_error)?;
                let last = page.next_marker.is_none();
                if last {
                    groups.end();
                } else {
                    source_marker = page.next_marker;
                }
                let mut rows = Vec::new();
                while let Some(g) = groups.pop() {
                    rows.extend(source_name(g));
                }
                left.push(order, rows).map_err(join_error)?;
                if last {
                    left.end();
                }
            }
            JoinStep::NeedRight => {
                let page = backup_pages.page(backup_marker.take()).await?;
                let last = page.next_marker.is_none();
                right.push(order, page.entries).map_err(join_error)?;
                if last {
                    right.end();
                } else {
                    backup_marker = page.next_marker;
                }
            }
            JoinStep::Done => break,
            JoinStep::Pair(None, _) => {}
            JoinStep::Pair(Some(src), backup) => {
                let Some(base) = src.base.as_ref() else {
                    continue; // deleted in the source: its snapshots are history, not data
                };
                if base.is_directory_placeholder() {
                    // Hierarchical source: a directory is backed up by its security state.
                    if let Some(sec) = &base.security {
                        report.directories += 1;
                        let ours = backup.as_ref().filter(|b| {
                            b.meta(crate::model::security::DIRECTORY).is_some()
                                && b.meta(metadata::DELETED_AT).is_none()
                        });
                        report.check_security(&src.name, sec, ours);
                    }
                    continue;
                }
                report.source_blobs += 1;
                progress.inc(1);
                let holds = backup.as_ref().filter(|b| {
                    b.meta(metadata::SOURCE_ETAG).map(Etag::new).as_ref() == Some(&base.etag)
                        && b.meta(metadata::BACKED_UP_AT).is_some()
                        && b.meta(metadata::DELETED_AT).is_none()
                });
                if let Some(b) = holds {
                    report.covered += 1;
                    if let Some(sec) = &base.security {
                        report.check_security(&src.name, sec, Some(b));
                    }
                    if deep {
                        let snap = b.meta(metadata::SOURCE_SNAPSHOT).filter(|s| {
                            src.snapshots
                                .iter()
                                .any(|x| x.snapshot.as_deref() == Some(*s))
                        });
                        let job = DeepJob {
                            name: src.name.clone(),
                            backup_etag: b.etag.clone(),
                            source_snapshot: snap.map(str::to_owned),
                            source_etag: base.etag.clone(),
                        };
                        covered_seen += 1;
                        match sample {
                            Some(n) if jobs.len() >= n => {
                                let j = random_u64() % covered_seen;
                                if (j as usize) < n {
                                    jobs[j as usize] = job;
                                }
                            }
                            _ => jobs.push(job),
                        }
                        if sample.is_none() && jobs.len() >= 64 {
                            let batch = std::mem::take(&mut jobs);
                            run_deep(app, container, batch, &mut report).await;
                        }
                    }
                    continue;
                }
                let lag = (now - base.last_modified).whole_seconds().max(0);
                report.rpo_lag_secs = report.rpo_lag_secs.max(lag);
                batches
                    .fetch(app, &crate::core::reconcile::marker_batches(&src.snapshots))
                    .await;
                match decide_snapshot(base, &src.snapshots, now, pending_ttl, &|id| {
                    batches.get(id)
                }) {
                    SnapshotDecision::Pending { requested_at, .. } => {
                        report.pending += 1;
                        if report.pending_blobs.len() < MAX_LISTED {
                            report.pending_blobs.push(PendingBlob {
                                name: src.name.clone(),
                                requested_at,
                                lag_secs: lag,
                            });
                        }
                    }
                    SnapshotDecision::SnapshotAndEnqueue { .. } => {
                        report.missing += 1;
                        if report.missing_blobs.len() < MAX_LISTED {
                            report.missing_blobs.push(src.name.clone());
                        }
                    }
                }
            }
        }
    }
    if deep && !jobs.is_empty() {
        run_deep(app, container, jobs, &mut report).await;
    }
    if opts.history {
        progress.message("history");
        verify_history(app, container, sample, &mut report).await?;
    }
    report.elapsed_ms = started.elapsed().as_millis();
    info!(
        container,
        source_blobs = report.source_blobs,
        covered = report.covered,
        pending = report.pending,
        missing = report.missing,
        rpo_lag_secs = report.rpo_lag_secs,
        ok = report.is_ok(),
        "verify finished"
    );
    Ok(report)
}

async fn run_deep(app: &App, container: &str, jobs: Vec<DeepJob>, report: &mut VerifyReport) {
    let results: Vec<(String, DeepOutcome)> = stream::iter(jobs)
        .map(|job| async move {
            let out = deep_one(app, container, &job).await;
            (job.name, out)
        })
        .buffer_unordered(app.settings.concurrency.max(1))
        .collect()
        .await;
    for (name, out) in results {
        let mut failed = None;
        if let Some(d) = report.deep.as_mut() {
            match out {
                DeepOutcome::Matched => {
                    d.checked += 1;
                    d.matched += 1;
                }
                DeepOutcome::Mismatched(m) => {
                    warn!(blob = %name, "backup content differs from the source version");
                    d.checked += 1;
                    d.mismatched += 1;
                    if d.mismatches.len() < MAX_LISTED {
                        d.mismatches.push(m);
                    }
                }
                DeepOutcome::Changed => d.skipped_changed += 1,
                DeepOutcome::Failed(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            report.fail(&name, e);
        }
    }
}

/// One backup snapshot to check with `--history`.
struct HistoryJob {
    name: String,
    snapshot: String,
    etag: Etag,
    length: u64,
    md5: Option<Vec<u8>>,
    source_etag: Etag,
    source_snapshot: Option<String>,
}

/// What one version turned out to be.
#[derive(Default)]
struct HistoryOutcome {
    problems: Vec<String>,
    length_bad: bool,
    md5_checked: bool,
    md5_bad: bool,
    source: SourceCheck,
}

#[derive(Default, PartialEq, Eq)]
enum SourceCheck {
    #[default]
    Unnamed,
    Gone,
    Compared,
    Differs,
}

/// SHA-256 and MD5 of a blob or snapshot in one pass, read `If-Match` `etag`.
async fn digests_of(
    store: &BlobStore,
    container: &str,
    blob: &str,
    snapshot: Option<&str>,
    etag: Option<&Etag>,
) -> Result<(u64, [u8; 32], [u8; 16]), StorageError> {
    use md5::Md5;
    let (mut sha, mut md) = (Sha256::new(), Md5::new());
    let n = store
        .download_with_if(container, blob, snapshot, etag, |chunk| {
            sha.update(chunk);
            md.update(chunk);
        })
        .await?;
    Ok((n, sha.finalize().into(), md.finalize().into()))
}

async fn history_one(
    app: &App,
    container: &str,
    job: &HistoryJob,
) -> Result<HistoryOutcome, StorageError> {
    let mut out = HistoryOutcome::default();
    let (len, sha, md5) = digests_of(
        &app.backup,
        container,
        &job.name,
        Some(&job.snapshot),
        Some(&job.etag),
    )
    .await?;
    if len != job.length {
        out.length_bad = true;
        out.problems
            .push(format!("{len} bytes read, {} listed", job.length));
    }
    if let Some(claimed) = &job.md5 {
        out.md5_checked = true;
        if claimed.as_slice() != md5 {
            out.md5_bad = true;
            out.problems.push(format!(
                "Content-MD5 {} but the content's MD5 is {}",
                hex(claimed),
                hex(&md5)
            ));
        }
    }
    let Some(s) = &job.source_snapshot else {
        return Ok(out);
    };
    // Only a real 404 means the source snapshot is gone.
    let props = match app.source.properties(container, &job.name, Some(s)).await {
        Ok(p) => p,
        Err(e) if e.is_not_found() => {
            out.source = SourceCheck::Gone;
            return Ok(out);
        }
        Err(e) => return Err(e),
    };
    let holds = props
        .metadata
        .get(metadata::SOURCE_ETAG)
        .map(Etag::new)
        .unwrap_or_else(|| props.etag.clone());
    if holds != job.source_etag {
        out.source = SourceCheck::Differs;
        out.problems.push(format!(
            "names source snapshot {s}, which holds version {holds}, not {}",
            job.source_etag
        ));
        return Ok(out);
    }
    match digests_of(
        &app.source,
        container,
        &job.name,
        Some(s),
        Some(&props.etag),
    )
    .await
    {
        Ok((slen, ssha, _)) if (slen, ssha) == (len, sha) => out.source = SourceCheck::Compared,
        Ok((slen, ssha, _)) => {
            out.source = SourceCheck::Differs;
            out.problems.push(format!(
                "content differs from source snapshot {s}: backup {len} bytes sha256 {}, source {slen} bytes sha256 {}",
                hex(&sha),
                hex(&ssha)
            ));
        }
        Err(e) if e.is_not_found() => out.source = SourceCheck::Gone,
        Err(e) => return Err(e),
    }
    Ok(out)
}

/// `--history`: every backup snapshot of `container` (or a sample), see the module docs.
async fn verify_history(
    app: &App,
    container: &str,
    sample: Option<usize>,
    report: &mut VerifyReport,
) -> Result<(), OpError> {
    report.history = Some(HistoryReport::default());
    let opts = ListOptions {
        prefix: None,
        snapshots: true,
        metadata: true,
        max_results: None,
    };
    let mut pages = Lister::new(&app.backup, container, opts).missing_is_empty();
    let mut marker = None;
    let mut jobs: Vec<HistoryJob> = Vec::new();
    let mut seen = 0u64;
    loop {
        let page = pages.page(marker.take()).await?;
        for e in page.entries {
            let Some(snapshot) = e.snapshot.clone() else {
                continue; // base blobs: `--deep`
            };
            let h = report.history.as_mut().expect("set above");
            let Some(source_etag) = e.meta(metadata::SOURCE_ETAG).map(Etag::new) else {
                h.foreign += 1;
                continue;
            };
            h.versions += 1;
            let job = HistoryJob {
                source_snapshot: e
                    .meta(metadata::SOURCE_SNAPSHOT)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned),
                name: e.name,
                snapshot,
                etag: e.etag,
                length: e.content_length,
                md5: e.content_md5,
                source_etag,
            };
            seen += 1;
            match sample {
                Some(n) if jobs.len() >= n => {
                    let j = random_u64() % seen;
                    if (j as usize) < n {
                        jobs[j as usize] = job;
                    }
                }
                _ => jobs.push(job),
            }
        }
        if sample.is_none() && jobs.len() >= 64 {
            run_history(app, container, std::mem::take(&mut jobs), report).await;
        }
        match page.next_marker {
            Some(m) => marker = Some(m),
            None => break,
        }
    }
    run_history(app, container, jobs, report).await;
    Ok(())
}

async fn run_history(app: &App, container: &str, jobs: Vec<HistoryJob>, report: &mut VerifyReport) {
    let results: Vec<(HistoryJob, Result<HistoryOutcome, StorageError>)> = stream::iter(jobs)
        .map(|job| async move {
            let out = history_one(app, container, &job).await;
            (job, out)
        })
        .buffer_unordered(app.settings.concurrency.max(1))
        .collect()
        .await;
    for (job, out) in results {
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                report.fail(
                    &format!("{} (snapshot {})", job.name, job.snapshot),
                    e.to_string(),
                );
                continue;
            }
        };
        let h = report.history.as_mut().expect("set by verify_history");
        h.checked += 1;
        h.with_md5 += u64::from(out.md5_checked);
        match out.source {
            SourceCheck::Unnamed => h.source_unnamed += 1,
            SourceCheck::Gone => h.source_gone += 1,
            SourceCheck::Compared | SourceCheck::Differs => h.compared_with_source += 1,
        }
        if out.problems.is_empty() {
            h.matched += 1;
            continue;
        }
        warn!(blob = %job.name, snapshot = %job.snapshot, "backup version is not what it claims");
        h.mismatched += 1;
        h.length_mismatches += u64::from(out.length_bad);
        h.md5_mismatches += u64::from(out.md5_bad);
        h.source_mismatches += u64::from(out.source == SourceCheck::Differs);
        if h.mismatches.len() < MAX_LISTED {
            h.mismatches.push(HistoryMismatch {
                name: job.name,
                snapshot: job.snapshot,
                problem: out.problems.join("; "),
            });
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DrillContainer {
    pub container: String,
    pub scratch_container: String,
    pub restore_id: String,
    pub sampled: u64,
    pub restored: u64,
    pub matched: u64,
    /// Of `matched`: compared with the live source (it still holds the version).
    pub matched_source: u64,
    pub mismatched: u64,
    pub mismatches: Vec<Mismatch>,
    pub failed: u64,
    pub failures: Vec<BlobFailure>,
    pub cleaned_up: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DrillReport {
    pub containers: Vec<DrillContainer>,
    pub elapsed_ms: u128,
}

impl DrillReport {
    /// Something was restored, everything restored matched, nothing failed, nothing left behind.
    pub fn is_ok(&self) -> bool {
        self.containers.iter().map(|c| c.restored).sum::<u64>() > 0
            && self.containers.iter().all(|c| {
                c.mismatched == 0 && c.failed == 0 && c.cleaned_up && c.restored == c.sampled
            })
    }
}

/// `lakeguard verify --restore-drill [--container C] [--sample N]`.
pub async fn drill(
    app: &App,
    container: Option<&str>,
    sample: usize,
    progress: Arc<dyn Progress>,
) -> Result<DrillReport, OpError> {
    let started = Instant::now();
    let containers = match container {
        Some(c) => {
            crate::settings::validate_container_name(c).map_err(OpError::InvalidInput)?;
            vec![c.to_owned()]
        }
        None => {
            let mut all = Vec::new();
            let mut marker = None;
            loop {
                let (names, next) = app.backup.list_containers_page(marker).await?;
                all.extend(
                    names
                        .into_iter()
                        .filter(|n| !crate::settings::is_reserved_container(n)),
                );
                marker = next;
                if marker.is_none() {
                    break;
                }
            }
            all
        }
    };
    let mut report = DrillReport::default();
    for c in containers {
        progress.message(&c);
        report
            .containers
            .push(drill_container(app, &c, sample.max(1)).await?);
    }
    report.elapsed_ms = started.elapsed().as_millis();
    Ok(report)
}

async fn drill_container(
    app: &App,
    container: &str,
    sample: usize,
) -> Result<DrillContainer, OpError> {
    let scratch = format!("{DRILL_PREFIX}{:012x}", random_u64() & 0xffff_ffff_ffff);
    let mut req = RestoreRequest::new(container, OffsetDateTime::now_utc());
    req.to = Some(TargetSpec {
        store: app.backup.clone(),
        container: scratch.clone(),
    });
    req.sample = Some(sample);
    let mut out = DrillContainer {
        container: container.to_owned(),
        scratch_container: scratch.clone(),
        ..Default::default()
    };
    let result = drill_in(app, &req, &mut out).await;
    // Clean up whatever happened (the scratch container may not exist: that is fine).
    match app.backup.delete_container(&scratch).await {
        Ok(()) => out.cleaned_up = true,
        Err(e) => {
            warn!(container = %scratch, error = %e, "could not delete the drill's scratch container")
        }
    }
    result?;
    Ok(out)
}

async fn drill_in(
    app: &App,
    req: &RestoreRequest,
    out: &mut DrillContainer,
) -> Result<(), OpError> {
    let mut plan = restore_op::plan(app, req).await?;
    out.restore_id = plan.id.clone();
    let sampled: Vec<(String, Version)> = plan
        .actionable()?
        .into_iter()
        .filter_map(|i| match i {
            PlanItem::Restore { name, version, .. } => Some((name, version)),
            _ => None,
        })
        .collect();
    out.sampled = sampled.len() as u64;
    let exec = restore_op::execute(app, req, &mut plan, super::no_progress()).await?;
    out.restored = exec.restored;
    out.failed = exec.failed + exec.changed_since_plan;
    out.failures = exec.failures;
    let scratch = &req.to.as_ref().expect("drill has a target").container;
    for (name, version) in sampled {
        let restored = match sha256_of(&app.backup, scratch, &name, None).await {
            Ok(d) => d,
            Err(e) => {
                out.failed += 1;
                if out.failures.len() < MAX_REPORTED_FAILURES {
                    out.failures.push(BlobFailure {
                        blob: name.clone(),
                        error: format!("reading the restored blob: {e}"),
                    });
                }
                continue;
            }
        };
        // The truth: the source itself while it still holds the version, else the backup's copy.
        let from_source =
            sha256_if_unchanged(&app.source, &req.container, &name, &version.source_etag)
                .await
                .ok()
                .flatten();
        let expected = match &from_source {
            Some(d) => Ok(d.clone()),
            None => match &version.content {
                Some(c) => sha256_of(&app.backup, &req.container, &c.name, c.snapshot.as_deref())
                    .await
                    .map_err(|e| e.to_string()),
                None => Err("no content reference".to_owned()),
            },
        };
        match expected {
            Ok(e) if e == restored => {
                out.matched += 1;
                out.matched_source += u64::from(from_source.is_some());
            }
            Ok(e) => {
                out.mismatched += 1;
                if out.mismatches.len() < MAX_LISTED {
                    out.mismatches.push(Mismatch {
                        name,
                        source: format!("{} bytes sha256 {}", e.0, e.1),
                        backup: format!("restored {} bytes sha256 {}", restored.0, restored.1),
                    });
                }
            }
            Err(e) => {
                out.failed += 1;
                if out.failures.len() < MAX_REPORTED_FAILURES {
                    out.failures.push(BlobFailure {
                        blob: name,
                        error: format!("reading the expected content: {e}"),
                    });
                }
            }
        }
    }
    Ok(())
}
