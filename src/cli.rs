//! The operator's terminal: the same operations as the functions, with progress bars and
//! `--output json` for scripts.

use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use crate::ops::Progress;

#[derive(Debug, Parser)]
#[command(
    name = "lakeguard",
    version,
    about = "Snapshots, incremental backups and point-in-time restore for Azure Blob Storage / ADLS"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the Azure Functions custom handler on 127.0.0.1:$FUNCTIONS_CUSTOMHANDLER_PORT.
    Serve,
    /// Snapshot new or changed blobs of a container and queue backup requests (SnapshotProducer).
    Snapshot {
        #[arg(long)]
        container: String,
        #[arg(long)]
        prefix: Option<String>,
        /// List every snapshot even when the previous complete run left a watermark (which
        /// otherwise limits the listing to base blobs).
        #[arg(long)]
        full: bool,
        /// Also process the backup queue while snapshotting, until both are done ("back up this
        /// container now"; like the queue trigger, it takes any request on the queue).
        #[arg(long)]
        drain: bool,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Process backup requests from the queue until it is empty (BackupWorker).
    Backup {
        /// Required: process the queue until it is empty.
        #[arg(long)]
        drain: bool,
        /// Queue name (default: $LAKEGUARD_BACKUP_QUEUE) on the AzureWebJobsStorage account.
        #[arg(long)]
        queue: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Restore a container (or a prefix) to a point in time, from the backup account's history or
    /// the source's own snapshots. Prints the plan first; writes only with explicit intent.
    Restore {
        /// The container (with --undo: optional, checked against the restore's).
        #[arg(long, required_unless_present = "undo")]
        container: Option<String>,
        /// Only names starting with this string.
        #[arg(long)]
        prefix: Option<String>,
        /// The point in time (RFC 3339, e.g. 2026-11-22T03:00:00Z).
        #[arg(long, required_unless_present = "undo")]
        at: Option<String>,
        /// Instead of a restore: reverse the in-place restore with this id from its undo data,
        /// for every blob still as that restore left it (the rest is left and reported).
        #[arg(long, conflicts_with_all = ["prefix", "at", "to_account", "to_container"])]
        undo: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        from: RestoreFrom,
        /// Restore into another account: a connection string, or the name of a connection
        /// configured like SourceStorage (e.g. `DrStorage` with `DrStorage__blobServiceUri`).
        #[arg(long)]
        to_account: Option<String>,
        /// Restore into this container (default: the same name) instead of in place.
        #[arg(long)]
        to_container: Option<String>,
        /// Print the plan and stop.
        #[arg(long)]
        dry_run: bool,
        /// Allow overwrites and deletes (always needed in place).
        #[arg(long)]
        force: bool,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Prove the backup: coverage of every source blob's current version (and, with --deep,
    /// content hashes), or with --restore-drill a sample restored into a scratch container.
    Verify {
        /// The container to verify (a drill without it samples every backed-up container).
        #[arg(long)]
        container: Option<String>,
        /// Compare SHA-256 of source and backup contents (streaming).
        #[arg(long)]
        deep: bool,
        /// Also check the backup's history: every backup snapshot (or --sample N of them) hashed
        /// against its length, Content-MD5 and the source snapshot it names while that exists.
        #[arg(long, conflicts_with = "restore_drill")]
        history: bool,
        /// Check only a random sample of this many blobs (per container) with --deep / the drill,
        /// and of this many backup versions with --history.
        #[arg(long)]
        sample: Option<usize>,
        /// Restore a sample into a scratch container of the backup account, compare, clean up.
        #[arg(long)]
        restore_drill: bool,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Find and heal what the event path missed: missing or stale backups, lost requests,
    /// deleted sources (tombstones). All covered containers, or one (Reconcile / ReconcileNow).
    Reconcile {
        /// Only this container (include/exclude lists are not applied to an explicit choice).
        #[arg(long)]
        container: Option<String>,
        /// Plan and count; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Stop after this many seconds and hand the rest over as continuation messages
        /// (default: run to the end in this process).
        #[arg(long)]
        budget_secs: Option<u64>,
        /// Instead of a run: process the continuation queue ($LAKEGUARD_RECONCILE_QUEUE) until it
        /// is empty, like the ReconcileWorker function.
        #[arg(long, conflicts_with_all = ["container", "dry_run", "budget_secs"])]
        continuations: bool,
        /// Also process the backup queue while reconciling, until both are done.
        #[arg(long, conflicts_with_all = ["dry_run", "continuations"])]
        drain: bool,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Apply the retention policy: delete backup versions and lakeguard's source snapshots that
    /// no promised restore point needs (plan first, then delete; every delete conditional).
    Prune {
        /// Only this container (default: every covered one).
        #[arg(long)]
        container: Option<String>,
        /// Print the plan and stop.
        #[arg(long)]
        dry_run: bool,
        /// Refuse a plan deleting more than this many rows (default: the configured share of
        /// the rows listed, LAKEGUARD_PRUNE_MAX_DELETE_PERCENT).
        #[arg(long)]
        max_delete: Option<u64>,
        /// Backup policy, overriding LAKEGUARD_RETENTION_BACKUP (e.g. `within=30d,monthly=12`).
        #[arg(long)]
        keep: Option<String>,
        /// Source-snapshot policy, overriding LAKEGUARD_RETENTION_SOURCE_SNAPSHOTS.
        #[arg(long)]
        keep_source: Option<String>,
        /// How long a deleted blob's history is kept (`90d`, or `none`), overriding
        /// LAKEGUARD_TOMBSTONE_RETENTION.
        #[arg(long)]
        tombstone_retention: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// What the backup holds and costs: per container, versions and bytes in the backup
    /// (current, history, tombstoned), lakeguard's source snapshots, the oldest restorable point,
    /// and an estimate of the monthly storage and of the requests a full and an incremental run
    /// make (prices: LAKEGUARD_PRICE_*). Read-only.
    Usage {
        /// Only this container (default: every covered one).
        #[arg(long)]
        container: Option<String>,
        /// Share of the live blobs an incremental run changes, in percent (default:
        /// LAKEGUARD_USAGE_CHANGED_PERCENT, 1).
        #[arg(long)]
        changed_percent: Option<f64>,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Seed a demo data lake (container `demo-lake`) and run producer and worker on it: the
    /// README's main job, against the local Azurite that `scripts/demo` starts.
    Demo,
}

/// `--from`: where the history is read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum RestoreFrom {
    /// The backup account (base blobs, snapshots and tombstones), with the source's snapshots
    /// and live blobs filling in versions not yet backed up.
    #[default]
    Backup,
    /// The backup account alone (the source account is lost or unreachable).
    BackupOnly,
    /// The source account's own snapshots (fast, same account; blind to blobs deleted together
    /// with their snapshots).
    Snapshots,
}

/// The plan and outcome of a restore, for a terminal.
pub fn restore_text(r: &crate::ops::restore::RestoreReport) -> String {
    use crate::core::restore::PlanItem;
    use std::fmt::Write as _;
    let mut out = String::new();
    let req = &r.request;
    let _ = writeln!(
        out,
        "restore {} of container {}{} at {} from {:?} into {} / {}{}",
        r.id,
        req.container,
        req.prefix
            .as_deref()
            .map(|p| format!(" (prefix {p:?})"))
            .unwrap_or_default(),
        crate::model::metadata::format_time(req.at),
        req.from,
        req.target_account,
        req.target_container,
        if req.in_place { " (in place)" } else { "" }
    );
    let _ = writeln!(out, "{:<12} NAME", "ACTION");
    for item in &r.items {
        let (kind, detail) = match item {
            PlanItem::Restore {
                version,
                target_etag,
                ..
            } => (
                if target_etag.is_some() {
                    "overwrite"
                } else {
                    "restore"
                },
                format!(
                    "version {} of {} ({} bytes)",
                    version.source_etag,
                    crate::model::metadata::format_time(version.source_last_modified),
                    version.content_length
                ),
            ),
            PlanItem::Delete { .. } => ("delete", "did not exist at T".to_owned()),
            PlanItem::LeftAlone { .. } => (
                "left alone",
                "did not exist at T; not ours to delete here".to_owned(),
            ),
            PlanItem::Unavailable { why, .. } => ("unavailable", why.clone()),
            PlanItem::Unchanged { .. } => ("unchanged", String::new()),
            PlanItem::SetSecurity { security, .. } => (
                "security",
                format!(
                    "owner {} group {} ACL {}",
                    security.owner, security.group, security.acl
                ),
            ),
        };
        let _ = writeln!(out, "{kind:<12} {}  {detail}", item.name());
    }
    if r.items_truncated {
        let _ = writeln!(out, "... (more items; counts below are complete)");
    }
    let p = &r.plan;
    let _ = writeln!(
        out,
        "plan: restore {} (overwrite {}), delete {}, unchanged {}, left alone {}, unavailable {}, {} bytes",
        p.restore, p.overwrite, p.delete, p.unchanged, p.left_alone, p.unavailable, p.restore_bytes
    );
    if let Some(why) = &r.refused {
        let _ = writeln!(out, "REFUSED: {why}");
    } else if !r.executed {
        let _ = writeln!(out, "dry run: nothing written");
    }
    if let Some(e) = &r.execution {
        let _ = writeln!(
            out,
            "done: restored {} (overwritten {}), deleted {}, undo snapshots {}, undo copies {}, changed since plan {}, failed {}, not attempted {} in {} ms",
            e.restored, e.overwritten, e.deleted, e.undo_snapshots, e.undo_copies, e.changed_since_plan, e.failed, e.not_attempted, r.elapsed_ms
        );
        if e.directories + e.security_set + e.security_failed > 0 {
            let _ = writeln!(
                out,
                "ADLS: directories {}, owner/group/ACL set {}, NOT set {} (listed under failures)",
                e.directories, e.security_set, e.security_failed
            );
        }
        if e.undo_records_failed > 0 {
            let _ = writeln!(
                out,
                "  {} item(s) have no undo record (see the log): `restore --undo {}` leaves them",
                e.undo_records_failed, r.id
            );
        } else if r.request.in_place {
            let _ = writeln!(
                out,
                "  undo with: lakeguard restore --undo {} --force",
                r.id
            );
        }
        for n in &e.changed {
            let _ = writeln!(out, "  changed since plan, left as it is: {n}");
        }
        for f in &e.failures {
            let _ = writeln!(out, "  failed: {}: {}", f.blob, f.error);
        }
    }
    out.trim_end().to_owned()
}

/// An undo plan and its outcome, for a terminal.
pub fn undo_text(r: &crate::ops::restore::undo::UndoReport) -> String {
    use crate::ops::restore::undo::UndoItem;
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "undo of restore {} in container {} (this undo's id: {})",
        r.undoes, r.container, r.id
    );
    let _ = writeln!(out, "{:<14} NAME", "ACTION");
    for item in &r.items {
        let (kind, detail) = match item {
            UndoItem::PutBack { snapshot, .. } => {
                ("put back", format!("from undo snapshot {snapshot}"))
            }
            UndoItem::Remove { .. } => ("remove", "created by the restore".to_owned()),
            UndoItem::Recreate { undo_copy, .. } => ("recreate", format!("from {undo_copy}")),
            UndoItem::AlreadyUndone { why, .. } => ("already undone", why.clone()),
            UndoItem::Changed { why, .. } => ("CHANGED", format!("{why}; left as it is")),
            UndoItem::Unavailable { why, .. } => ("UNAVAILABLE", why.clone()),
        };
        let _ = writeln!(out, "{kind:<14} {}  {detail}", item.name());
    }
    if r.items_truncated {
        let _ = writeln!(out, "... (more items; counts below are complete)");
    }
    let p = &r.plan;
    let _ = writeln!(
        out,
        "plan: put back {}, remove {}, recreate {}, already undone {}, changed since the restore {}, unavailable {}",
        p.put_back, p.remove, p.recreate, p.already_undone, p.changed, p.unavailable
    );
    if r.snapshot_copies_kept > 0 {
        let _ = writeln!(
            out,
            "kept, not recreated as snapshots: {} copies of snapshots of deleted blobs under lakeguard-restores/{}/undo-snapshots/",
            r.snapshot_copies_kept, r.undoes
        );
    }
    if r.unrecorded_undo_copies > 0 {
        let _ = writeln!(
            out,
            "left: {} undo copies with no recorded delete (kept under lakeguard-restores/{}/undo/)",
            r.unrecorded_undo_copies, r.undoes
        );
    }
    if let Some(why) = &r.refused {
        let _ = writeln!(out, "REFUSED: {why}");
    } else if !r.executed {
        let _ = writeln!(out, "dry run: nothing written");
    }
    if let Some(e) = &r.execution {
        let _ = writeln!(
            out,
            "done: put back or recreated {}, removed {}, undo snapshots {}, undo copies {}, changed since the plan {}, failed {} in {} ms",
            e.restored, e.deleted, e.undo_snapshots, e.undo_copies, e.changed_since_plan, e.failed, r.elapsed_ms
        );
        for n in &e.changed {
            let _ = writeln!(out, "  changed since the plan, left as it is: {n}");
        }
        for f in &e.failures {
            let _ = writeln!(out, "  failed: {}: {}", f.blob, f.error);
        }
    }
    out.trim_end().to_owned()
}

/// The verify report for a terminal.
pub fn verify_text(r: &crate::ops::verify::VerifyReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let verdict = if r.is_ok() { "OK" } else { "FAILED" };
    let _ = writeln!(
        out,
        "verify {}: {verdict}: {} source blobs, {} backed up, {} pending, {} missing; RPO lag {} s",
        r.container, r.source_blobs, r.covered, r.pending, r.missing, r.rpo_lag_secs
    );
    for n in &r.missing_blobs {
        let _ = writeln!(out, "  missing: {n}");
    }
    if r.security_checked > 0 {
        let _ = writeln!(
            out,
            "ADLS: {} paths' owner/group/permissions/ACL compared ({} directories), {} DIFFERENT from the backup's record",
            r.security_checked, r.directories, r.security_mismatched
        );
        for m in &r.security_mismatches {
            let _ = writeln!(
                out,
                "  security differs: {}: {}",
                m.name,
                m.differs.join(", ")
            );
        }
    }
    for p in &r.pending_blobs {
        let _ = writeln!(
            out,
            "  pending: {} (requested {}, lag {} s)",
            p.name,
            crate::model::metadata::format_time(p.requested_at),
            p.lag_secs
        );
    }
    if let Some(d) = &r.deep {
        let _ = writeln!(
            out,
            "deep: {} compared, {} identical, {} DIFFERENT, {} changed while read",
            d.checked, d.matched, d.mismatched, d.skipped_changed
        );
        for m in &d.mismatches {
            let _ = writeln!(
                out,
                "  different: {}: source {}, backup {}",
                m.name, m.source, m.backup
            );
        }
    }
    if let Some(h) = &r.history {
        let _ = writeln!(
            out,
            "history: {} backup versions, {} checked, {} as claimed, {} DIFFERENT \
             ({} length, {} Content-MD5, {} source snapshot); {} compared with their source \
             snapshot, {} source gone, {} from a live blob, {} with Content-MD5, {} not lakeguard's",
            h.versions,
            h.checked,
            h.matched,
            h.mismatched,
            h.length_mismatches,
            h.md5_mismatches,
            h.source_mismatches,
            h.compared_with_source,
            h.source_gone,
            h.source_unnamed,
            h.with_md5,
            h.foreign
        );
        for m in &h.mismatches {
            let _ = writeln!(
                out,
                "  different: {} (snapshot {}): {}",
                m.name, m.snapshot, m.problem
            );
        }
    }
    for f in &r.failures {
        let _ = writeln!(out, "  could not check: {}: {}", f.blob, f.error);
    }
    out.trim_end().to_owned()
}

/// The producer's report for a terminal.
pub fn snapshot_text(report: &crate::ops::snapshot::SnapshotReport) -> String {
    format!(
        "{}: scanned {}, snapshotted {}, enqueued {}, unchanged {}, skipped {}, failed {} in {} ms\n  listing: {}; state: {}{}",
        report.container,
        report.scanned,
        report.snapshotted,
        report.enqueued,
        report.unchanged,
        report.skipped,
        report.failed,
        report.elapsed_ms,
        report.listing,
        report.state,
        report
            .failures
            .iter()
            .map(|f| format!("\n  failed: {}: {}", f.blob, f.error))
            .collect::<String>()
    )
}

/// The drain's report for a terminal.
pub fn drain_text(report: &crate::ops::backup::DrainReport) -> String {
    format!(
        "{}: processed {}, backed up {}, already backed up {}, superseded {}, poisoned {}, retried {}{}{} in {} ms",
        report.queue,
        report.processed,
        report.backed_up,
        report.already_backed_up,
        report.superseded,
        report.poisoned,
        report.retried,
        if report.unqueued > 0 {
            format!(", FAILED AND NOT QUEUED {} (see the log)", report.unqueued)
        } else {
            String::new()
        },
        if report.left_on_queue > 0 {
            format!(
                ", STOPPED WITH {} STILL ON THE QUEUE (invisible: held by another consumer or one that died)",
                report.left_on_queue
            )
        } else {
            String::new()
        },
        report.elapsed_ms
    )
}

/// A prune report for a terminal.
pub fn prune_text(r: &crate::ops::prune::PruneReport) -> String {
    let mut out = format!(
        "prune {}{}: {} containers, {} names, {} rows listed
  policy: {}
  planned: {} backup snapshots, {} whole deleted names, {} source snapshots, {} bookkeeping ({} bytes)
  deleted: {} backup snapshots, {} names, {} source snapshots, {} bookkeeping ({} bytes freed)
  kept (not provably in the backup): {}, unplaceable names: {}, locked: {}, gone already: {}, changed: {}, failed: {}",
        r.run_id,
        if r.dry_run { " (dry run)" } else { "" },
        r.containers,
        r.names_scanned,
        r.rows_scanned,
        r.policy,
        r.planned.backup_snapshots,
        r.planned.backup_names,
        r.planned.source_snapshots,
        r.planned.bookkeeping,
        r.planned.bytes,
        r.deleted.backup_snapshots,
        r.deleted.backup_names,
        r.deleted.source_snapshots,
        r.deleted.bookkeeping,
        r.deleted.bytes,
        r.kept_not_in_backup,
        r.unplaceable,
        r.locked,
        r.already_gone,
        r.changed,
        r.failed,
    );
    if let Some(why) = &r.refused {
        out.push_str(&format!("\n  REFUSED: {why}"));
    }
    for f in &r.failures {
        out.push_str(&format!("\n  failed: {}: {}", f.blob, f.error));
    }
    out
}

/// The restore drill's report for a terminal.
pub fn drill_text(r: &crate::ops::verify::DrillReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "restore drill: {}",
        if r.is_ok() { "OK" } else { "FAILED" }
    );
    for c in &r.containers {
        let _ = writeln!(
            out,
            "  {}: sampled {}, restored {}, identical {} ({} checked against the live source), DIFFERENT {}, failed {}; scratch {} {}",
            c.container,
            c.sampled,
            c.restored,
            c.matched,
            c.matched_source,
            c.mismatched,
            c.failed,
            c.scratch_container,
            if c.cleaned_up { "deleted" } else { "NOT deleted" }
        );
        for m in &c.mismatches {
            let _ = writeln!(
                out,
                "    different: {}: expected {}, {}",
                m.name, m.source, m.backup
            );
        }
        for f in &c.failures {
            let _ = writeln!(out, "    failed: {}: {}", f.blob, f.error);
        }
    }
    out.trim_end().to_owned()
}

/// A progress bar on a terminal; hidden when stderr is not one (CI, pipes, `--output json`).
pub struct Bar(ProgressBar);

impl Bar {
    pub fn new(label: &str, output: Output) -> Arc<Self> {
        Self::styled(Self::visible(output), label)
    }

    /// Two bars drawn together (a producer and the drain running alongside it).
    pub fn pair(first: &str, second: &str, output: Output) -> (Arc<Self>, Arc<Self>) {
        let multi = indicatif::MultiProgress::new();
        (
            Self::styled(multi.add(Self::visible(output)), first),
            Self::styled(multi.add(Self::visible(output)), second),
        )
    }

    fn visible(output: Output) -> ProgressBar {
        if output == Output::Text && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            ProgressBar::new(0)
        } else {
            ProgressBar::hidden()
        }
    }

    fn styled(pb: ProgressBar, label: &str) -> Arc<Self> {
        pb.set_style(
            ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb.set_prefix(label.to_owned());
        Arc::new(Bar(pb))
    }

    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}

impl Progress for Bar {
    fn add_total(&self, n: u64) {
        self.0.inc_length(n);
    }
    fn inc(&self, n: u64) {
        self.0.inc(n);
    }
    fn message(&self, msg: &str) {
        self.0.set_message(msg.to_owned());
    }
}
