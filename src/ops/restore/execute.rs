//! Phase 3 of a restore: the spooled plan carried out, every write conditional.

use super::plan::{ends, Ends};
use super::undo::{self, UndoRecord};
use super::*;
use crate::core::restore::Side;
use crate::model::Security;
use crate::storage::blob::SnapshotTaken;

const DELETED_SINCE_PLAN: &str = "deleted since the plan";

enum Outcome {
    /// `unrecorded`: done, but its undo record could not be written.
    Restored {
        overwrote: bool,
        undo: bool,
        unrecorded: bool,
        /// The ETag the copy left (`None`: not known, an earlier attempt's blob read back).
        written: Option<Etag>,
        /// The undo record written for it (in place), to follow a security step that gives the
        /// blob a new ETag.
        record: Option<UndoRecord>,
    },
    /// With the number of the blob's snapshots copied to the undo area first.
    Deleted {
        snapshot_copies: u64,
        unrecorded: bool,
    },
    Changed(String),
    Failed(String),
    /// A directory created (or already there, and a directory): hierarchical restores.
    Directory,
    /// Nothing to write but the security state (`PlanItem::SetSecurity`), `If-Match` the
    /// planned ETag.
    SecurityOnly {
        planned: Option<Etag>,
    },
}

impl Outcome {
    /// The ETag the security step is conditional on: what this item left (or found) there. A
    /// directory's step is not conditional: whether creating a child gives the directory a new
    /// ETag is undocumented, and the restore creates children right next to it.
    fn security_condition(&self) -> Option<Option<Etag>> {
        match self {
            Outcome::Restored { written, .. } => Some(written.clone()),
            Outcome::Directory => Some(None),
            Outcome::SecurityOnly { planned } => Some(planned.clone()),
            _ => None,
        }
    }
}

/// Why a security step did not happen.
enum SecurityFailure {
    /// The path changed after this restore wrote (or planned) it: left as it is.
    Changed(String),
    Failed(String),
}

/// Phase 3: carries out the spooled items with bounded concurrency.
pub async fn execute(
    app: &App,
    req: &RestoreRequest,
    plan: &mut Plan,
    progress: Arc<dyn Progress>,
) -> Result<ExecReport, OpError> {
    let mut report = ExecReport::default();
    let total = plan.spool.count;
    let limit = req.limit.unwrap_or(u64::MAX);
    let to_do = total.min(limit);
    report.not_attempted = total - to_do;
    if to_do == 0 {
        return Ok(report);
    }
    progress.add_total(to_do);
    progress.message("restoring");
    let mut reader = plan.spool.reader().map_err(spool_error)?;
    let mut done = 0u64;
    const BATCH: u64 = 512;
    while done < to_do {
        let mut batch = Vec::new();
        while (batch.len() as u64) < BATCH.min(to_do - done) {
            match reader.next() {
                Some(item) => batch.push(item.map_err(spool_error)?),
                None => break,
            }
        }
        if batch.is_empty() {
            break;
        }
        done += batch.len() as u64;
        execute_items(app, req, &plan.id, batch, &progress, &mut report).await?;
    }
    Ok(report)
}

/// Carries out `items` of restore `id` with bounded concurrency, adding the outcomes to
/// `report`. Items are idempotent: one already carried out by an earlier attempt of the same
/// restore (a durable chunk redelivered after its instance died) is recognised as done.
pub(super) async fn execute_items(
    app: &App,
    req: &RestoreRequest,
    id: &str,
    items: Vec<PlanItem>,
    progress: &Arc<dyn Progress>,
    report: &mut ExecReport,
) -> Result<(), OpError> {
    let ends = ends(app, req)?;
    ends.target.ensure_container(ends.target_container).await?;
    // In place every item leaves an undo record; deletes leave undo copies anywhere.
    if ends.in_place || items.iter().any(|i| matches!(i, PlanItem::Delete { .. })) {
        app.backup.ensure_container(RESERVED_CONTAINER).await?;
    }
    let ctx = Exec {
        app,
        req,
        ends: &ends,
        id,
        blocks: BlockOptions::from_settings(&app.settings),
    };
    // Phase 1: directories and content (a file's parents are created with it on a hierarchical
    // account). Phase 2, once the batch's content is there: owner, group, permissions and ACLs
    // (ACL first while the restoring identity still owns a path it created, then owner and group).
    let results: Vec<(String, Outcome, Option<Security>)> = stream::iter(items)
        .map(|item| {
            let ctx = &ctx;
            async move {
                let name = item.name().to_owned();
                let security = match &item {
                    PlanItem::Restore { security, .. } => security.clone(),
                    PlanItem::SetSecurity { security, .. } => Some(security.clone()),
                    _ => None,
                };
                (name, ctx.item(item).await, security)
            }
        })
        .buffer_unordered(app.settings.concurrency.max(1))
        .collect()
        .await;
    // A sampled restore is a restore drill into a scratch container of the (flat) backup
    // account: it proves content, not ACLs, and has none to set.
    let drill = req.sample.is_some();
    let security_steps: Vec<(String, Security, Option<Etag>, Option<UndoRecord>)> = results
        .iter()
        .filter(|_| !drill)
        .filter_map(|(n, o, s)| {
            let condition = o.security_condition()?;
            let record = match o {
                Outcome::Restored { record, .. } => record.clone(),
                _ => None,
            };
            s.clone().map(|s| (n.clone(), s, condition, record))
        })
        .collect();
    let security_results: Vec<(String, Result<(), SecurityFailure>)> = stream::iter(security_steps)
        .map(|(name, sec, condition, record)| {
            let ctx = &ctx;
            async move {
                let r = ctx
                    .security_step(&name, &sec, condition.as_ref(), record)
                    .await;
                (name, r)
            }
        })
        .buffer_unordered(app.settings.concurrency.max(1))
        .collect()
        .await;
    for (name, r) in security_results {
        match r {
            Ok(()) => report.security_set += 1,
            Err(SecurityFailure::Changed(why)) => {
                info!(blob = %name, %why, "changed since this restore wrote it; its security state is left as it is");
                report.changed_since_plan += 1;
                if report.changed.len() < MAX_REPORTED_FAILURES {
                    report.changed.push(name);
                }
            }
            Err(SecurityFailure::Failed(error)) => {
                warn!(blob = %name, %error, "restoring the security state failed (the content is restored)");
                report.security_failed += 1;
                report.failed += 1;
                if report.failures.len() < MAX_REPORTED_FAILURES {
                    report.failures.push(BlobFailure {
                        blob: name,
                        error: format!("security state not restored: {error}"),
                    });
                }
            }
        }
    }
    for (name, outcome, _) in results {
        progress.inc(1);
        match outcome {
            Outcome::Directory => report.directories += 1,
            Outcome::SecurityOnly { .. } => {}
            Outcome::Restored {
                overwrote,
                undo,
                unrecorded,
                ..
            } => {
                report.restored += 1;
                report.overwritten += u64::from(overwrote);
                report.undo_snapshots += u64::from(undo);
                report.undo_records_failed += u64::from(unrecorded);
            }
            Outcome::Deleted {
                snapshot_copies,
                unrecorded,
            } => {
                report.deleted += 1;
                report.undo_copies += 1;
                report.undo_snapshot_copies += snapshot_copies;
                report.undo_records_failed += u64::from(unrecorded);
            }
            Outcome::Changed(why) => {
                info!(blob = %name, %why, "target changed since the plan; left as it is");
                report.changed_since_plan += 1;
                if report.changed.len() < MAX_REPORTED_FAILURES {
                    report.changed.push(name);
                }
            }
            Outcome::Failed(error) => {
                warn!(blob = %name, %error, "restore of one blob failed");
                report.failed += 1;
                if report.failures.len() < MAX_REPORTED_FAILURES {
                    report.failures.push(BlobFailure { blob: name, error });
                }
            }
        }
    }
    Ok(())
}

struct Exec<'a> {
    app: &'a App,
    req: &'a RestoreRequest,
    ends: &'a Ends<'a>,
    id: &'a str,
    blocks: BlockOptions,
}

/// Sets a path's security state as it was at T: the ACL (or, without one, the permissions)
/// first, then owner and group, each a Path Update `setAccessControl`, `If-Match` the ETag the
/// path had when this restore wrote (or planned) it, then the ETag the first answer gave: a path
/// someone changed meanwhile is left alone. Only a hierarchical target can hold it: on a flat
/// one this fails (reported, never skipped silently). A 403 on the owner means the identity is
/// not a superuser (Storage Blob Data Owner). Returns the path's ETag afterwards.
async fn apply_security(
    target: &crate::storage::BlobStore,
    container: &str,
    name: &str,
    sec: &Security,
    condition: Option<&Etag>,
) -> Result<Option<Etag>, SecurityFailure> {
    use crate::storage::dfs::AccessChange;
    if !target.connection().hns {
        return Err(SecurityFailure::Failed(format!(
            "the target account ({}) is not hierarchical (set `{}__dfsServiceUri` or `__hierarchicalNamespace=true` if it is)",
            target.account(),
            target.connection().name
        )));
    }
    // A recorded ACL the service would refuse (damaged metadata) is reported as such.
    crate::model::security::parse_acl(&sec.acl)
        .map_err(|e| SecurityFailure::Failed(format!("the recorded ACL is not valid: {e}")))?;
    let failure = |step: &str, e: StorageError| {
        if e.is_precondition_failed() {
            SecurityFailure::Changed(format!("{step}: {e}"))
        } else {
            SecurityFailure::Failed(format!("{step}: {e}"))
        }
    };
    let first = if sec.acl.trim().is_empty() {
        AccessChange {
            permissions: Some(sec.settable_permissions().to_owned()),
            ..Default::default()
        }
    } else {
        AccessChange {
            acl: Some(sec.acl.clone()),
            ..Default::default()
        }
    };
    let after_acl = target
        .set_access_control(container, name, &first, condition)
        .await
        .map_err(|e| failure("ACL", e))?
        .or_else(|| condition.cloned());
    let owner = AccessChange {
        owner: Some(sec.owner.clone()),
        group: Some(sec.group.clone()),
        ..Default::default()
    };
    let after = target
        .set_access_control(container, name, &owner, after_acl.as_ref())
        .await
        .map_err(|e| {
            let hint = if e.to_string().contains("403") {
                " (changing the owner needs a superuser: the Storage Blob Data Owner role)"
            } else {
                ""
            };
            match failure("owner/group", e) {
                SecurityFailure::Failed(m) => SecurityFailure::Failed(format!("{m}{hint}")),
                changed => changed,
            }
        })?;
    Ok(after.or(after_acl))
}

/// A 412/409 on a conditional copy: the target's or the source's condition? The service names
/// source conditions (`SourceConditionNotMet`), the emulator does not, so when the code does not
/// say, the target is looked at again: if it still is as planned, the source moved. A target
/// that cannot be read leaves it unknown: an error, never a guess.
async fn source_moved(
    e: &StorageError,
    target: &BlobStore,
    c: &str,
    name: &str,
    planned: Option<&Etag>,
) -> Result<bool, StorageError> {
    if e.code().to_ascii_lowercase().contains("source") {
        return Ok(true);
    }
    let now = target.properties(c, name, None).await.map(|p| p.etag);
    still_as_planned(now, planned)
}

/// Whether the target, read again (`now`: its ETag, or the error reading it), is as planned.
fn still_as_planned(
    now: Result<Etag, StorageError>,
    planned: Option<&Etag>,
) -> Result<bool, StorageError> {
    match now {
        Ok(etag) => Ok(planned == Some(&etag)),
        Err(err) if err.is_not_found() => Ok(planned.is_none()),
        Err(err) => Err(err),
    }
}

fn is_condition_failure(e: &StorageError) -> bool {
    e.is_precondition_failed()
        || matches!(e, StorageError::Conflict { code, .. } if code == "BlobAlreadyExists")
}

impl Exec<'_> {
    /// Keeps what an in-place restore did to `name` (`undo::UndoRecord`): the proof
    /// `restore --undo` needs that the blob still is what this restore left. Restores
    /// elsewhere keep none (they are not undone). `false` when it could not be written: the
    /// item is done all the same, and counted (`undo_records_failed`).
    async fn record(&self, name: &str, record: &UndoRecord) -> bool {
        self.write_record(name, record, TargetCondition::Any).await
    }

    /// [`record`](Self::record), unless an earlier attempt recorded it already.
    async fn record_if_absent(&self, name: &str, record: &UndoRecord) -> bool {
        self.write_record(name, record, TargetCondition::Absent)
            .await
    }

    async fn write_record(&self, name: &str, record: &UndoRecord, cond: TargetCondition) -> bool {
        if !self.ends.in_place {
            return true;
        }
        let blob = undo::record_name(self.id, self.ends.target_container, name);
        if blob.chars().count() > 1024 {
            warn!(blob = %name, "the name is too long to keep an undo record under lakeguard-restores/; this item cannot be undone by `restore --undo`");
            return false;
        }
        match self
            .app
            .backup
            .upload_if(
                RESERVED_CONTAINER,
                &blob,
                Vec::new(),
                None,
                &record.to_metadata(),
                &cond,
            )
            .await
        {
            Ok(_) => true,
            Err(e) if crate::ops::state::is_lost_race(&e) => true,
            Err(e) => {
                warn!(blob = %name, error = %e, "could not write the undo record; this item cannot be undone by `restore --undo`");
                false
            }
        }
    }

    /// The security step of one path; in place, an undo record follows the path's new ETag
    /// if the change gave it one (else `restore --undo` would take the path as changed since).
    async fn security_step(
        &self,
        name: &str,
        sec: &Security,
        condition: Option<&Etag>,
        record: Option<UndoRecord>,
    ) -> Result<(), SecurityFailure> {
        let (t, c) = (self.ends.target, self.ends.target_container);
        let after = apply_security(t, c, name, sec, condition).await?;
        if let (Some(record), Some(after)) = (record, after) {
            if Some(&after) != condition && !self.record(name, &record.with_written(after)).await {
                warn!(blob = %name, "the undo record does not follow the ETag the security change gave the path: `restore --undo` will leave it");
            }
        }
        Ok(())
    }

    async fn item(&self, item: PlanItem) -> Outcome {
        match item {
            PlanItem::Restore { name, version, .. } if version.directory => {
                self.directory(&name).await
            }
            PlanItem::Restore {
                name,
                version,
                target_etag,
                ..
            } => self.restore(&name, &version, target_etag).await,
            PlanItem::SetSecurity {
                target_etag,
                directory,
                ..
            } => Outcome::SecurityOnly {
                planned: target_etag.filter(|_| !directory),
            },
            PlanItem::Delete {
                name,
                target_etag,
                backed_up,
            } => self.delete(&name, &target_etag, &backed_up).await,
            other => Outcome::Failed(format!("not an actionable item: {other:?}")),
        }
    }

    /// Recreates a directory of the history: Path Create `resource=directory` on a hierarchical
    /// target (an existing directory is fine: a child restored first made it), a zero-length
    /// `hdi_isfolder=true` blob on a flat one.
    async fn directory(&self, name: &str) -> Outcome {
        let (t, c) = (self.ends.target, self.ends.target_container);
        if t.connection().hns {
            return match t.ensure_directory(c, name).await {
                Ok(_) => Outcome::Directory,
                Err(e) => Outcome::Failed(format!("create directory: {e}")),
            };
        }
        let meta = std::collections::BTreeMap::from([(
            metadata::HDI_ISFOLDER.to_owned(),
            "true".to_owned(),
        )]);
        match t
            .upload_if(c, name, Vec::new(), None, &meta, &TargetCondition::Absent)
            .await
        {
            Ok(_) => Outcome::Directory,
            Err(e) if e.is_precondition_failed() || matches!(e, StorageError::Conflict { .. }) => {
                Outcome::Directory
            }
            Err(e) => Outcome::Failed(format!("create directory placeholder: {e}")),
        }
    }

    /// `otherwise`, unless the target already holds the version as restored by a restore (an
    /// earlier attempt of this one: the marker with the version's ETag and length).
    async fn restored_already(
        &self,
        name: &str,
        version: &crate::core::restore::Version,
        overwrote: bool,
        otherwise: Outcome,
    ) -> Outcome {
        match self
            .ends
            .target
            .properties(self.ends.target_container, name, None)
            .await
        {
            Ok(p)
                if p.metadata
                    .get(metadata::RESTORED_FROM_ETAG)
                    .map(Etag::new)
                    .as_ref()
                    == Some(&version.source_etag)
                    && p.content_length == version.content_length =>
            {
                // Done by an earlier attempt, whose record stands.
                Outcome::Restored {
                    overwrote,
                    undo: false,
                    unrecorded: false,
                    written: Some(p.etag),
                    record: None,
                }
            }
            _ => otherwise,
        }
    }

    /// HEAD of the target; `Err(Outcome)` when it no longer has the planned ETag.
    async fn current(
        &self,
        name: &str,
        planned: &Etag,
    ) -> Result<crate::storage::blob::BlobProperties, Outcome> {
        match self
            .ends
            .target
            .properties(self.ends.target_container, name, None)
            .await
        {
            Ok(p) if &p.etag == planned => Ok(p),
            Ok(p) => Err(Outcome::Changed(format!(
                "now {} (planned {planned})",
                p.etag
            ))),
            Err(e) if e.is_not_found() => Err(Outcome::Changed(DELETED_SINCE_PLAN.into())),
            Err(e) => Err(Outcome::Failed(e.to_string())),
        }
    }

    async fn restore(
        &self,
        name: &str,
        version: &crate::core::restore::Version,
        target_etag: Option<Etag>,
    ) -> Outcome {
        let Some(content) = &version.content else {
            return Outcome::Failed("the version's content is not held (planner bug)".into());
        };
        let mut undo = false;
        let mut undo_snapshot: Option<SnapshotTaken> = None;
        let mut previous_length = 0;
        let condition = match &target_etag {
            None => TargetCondition::Absent,
            Some(planned) => {
                let props = match self.current(name, planned).await {
                    Ok(p) => p,
                    Err(o) => return self.restored_already(name, version, true, o).await,
                };
                // Keep the state being replaced, so that this restore can be undone.
                let mut meta = props.metadata.clone();
                meta.insert(RESTORE_UNDO.into(), self.id.to_owned());
                previous_length = props.content_length;
                match self
                    .ends
                    .target
                    .create_snapshot(self.ends.target_container, name, planned, &meta)
                    .await
                {
                    Ok(taken) => {
                        undo = true;
                        undo_snapshot = Some(taken);
                    }
                    Err(e) if e.is_precondition_failed() || e.is_not_found() => {
                        return Outcome::Changed(format!("changed before its undo snapshot: {e}"))
                    }
                    Err(e) => return Outcome::Failed(format!("undo snapshot: {e}")),
                }
                TargetCondition::Matches(planned.clone())
            }
        };
        let mut meta = version.user_metadata.clone();
        meta.insert(
            metadata::RESTORED_FROM_ETAG.into(),
            version.source_etag.quoted(),
        );
        let (store, keys) = match content.side {
            Side::Backup => (&self.app.backup, &self.ends.backup_keys),
            Side::Source => (&self.app.source, &self.app.source_keys),
        };
        let from = CopyFrom {
            store,
            keys,
            container: content.container.as_deref().unwrap_or(&self.req.container),
            blob: &content.name,
            snapshot: content.snapshot.as_deref(),
            if_match: Some(content.etag.clone()),
            content_length: version.content_length,
            content_type: version.content_type.as_deref(),
        };
        let to = CopyTo {
            store: self.ends.target,
            container: self.ends.target_container,
            blob: name,
            condition,
            metadata: &meta,
        };
        match server_side_copy(&from, &to, &self.blocks).await {
            Ok(written) => {
                let record = match (&target_etag, &undo_snapshot) {
                    (Some(previous), Some(snap)) => UndoRecord::Overwrote {
                        written: written.clone(),
                        previous: previous.clone(),
                        previous_length,
                        snapshot: snap.id.clone(),
                    },
                    _ => UndoRecord::Created {
                        written: written.clone(),
                    },
                };
                let recorded = self.record(name, &record).await;
                Outcome::Restored {
                    overwrote: target_etag.is_some(),
                    undo,
                    unrecorded: !recorded,
                    written: Some(written),
                    record: (recorded && self.ends.in_place).then_some(record),
                }
            }
            Err(e) if is_condition_failure(&e) => {
                let t = self.ends.target;
                let outcome = match source_moved(
                    &e,
                    t,
                    self.ends.target_container,
                    name,
                    target_etag.as_ref(),
                )
                .await
                {
                    Ok(true) => Outcome::Failed(format!(
                        "the version's row in the history changed since the plan (run the restore again): {e}"
                    )),
                    Ok(false) => Outcome::Changed(e.to_string()),
                    // Unknown: the rerun plans again and sees which one changed.
                    Err(head) => Outcome::Failed(format!(
                        "a condition of the copy failed ({e}) and the target could not be read to tell which (run the restore again): {head}"
                    )),
                };
                // A new blob in its place may be this version, restored by an earlier attempt.
                if target_etag.is_none() && matches!(outcome, Outcome::Changed(_)) {
                    self.restored_already(name, version, false, outcome).await
                } else {
                    outcome
                }
            }
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }

    /// Deletes a blob the history proves absent at T. Nothing that holds a version goes without
    /// a copy: its current content is copied to `<id>/undo/<container>/<name>` first, and if
    /// Azure refuses because it has snapshots (`SnapshotsPresent`), every snapshot whose version
    /// the backup account does not hold (`backed_up`) is copied to
    /// `<id>/undo-snapshots/<container>/<snapshot id>/<name>` before the blob is deleted with
    /// them. The delete is `If-Match` the planned ETag, so a snapshot taken after the listing of
    /// snapshots holds that same content, which the undo copy has.
    async fn delete(&self, name: &str, planned: &Etag, backed_up: &[Etag]) -> Outcome {
        let c = self.ends.target_container;
        let undo_name = format!("{}/undo/{}/{}", self.id, c, name);
        let props = match self.current(name, planned).await {
            Ok(p) => p,
            // Gone, and this restore's undo copy of it exists: an earlier attempt deleted it.
            Err(Outcome::Changed(why)) if why == DELETED_SINCE_PLAN => {
                return match self
                    .app
                    .backup
                    .properties(RESERVED_CONTAINER, &undo_name, None)
                    .await
                {
                    Ok(_) => {
                        let record = UndoRecord::Deleted {
                            previous: planned.clone(),
                            previous_length: None,
                        };
                        Outcome::Deleted {
                            snapshot_copies: 0,
                            unrecorded: !self.record_if_absent(name, &record).await,
                        }
                    }
                    Err(e) if e.is_not_found() => Outcome::Changed(why),
                    // Not proof of anything: fail the item, so that the chunk is retried and
                    // the deletion still gets its undo record.
                    Err(e) => Outcome::Failed(format!("reading the undo copy: {e}")),
                };
            }
            Err(o) => return o,
        };
        if undo_name.chars().count() > 1024 {
            return Outcome::Failed(
                "the name is too long to keep an undo copy under lakeguard-restores/; not deleted"
                    .into(),
            );
        }
        let mut meta = props.metadata.clone();
        meta.insert(RESTORE_UNDO.into(), self.id.to_owned());
        let from = CopyFrom {
            store: self.ends.target,
            keys: &self.app.source_keys,
            container: c,
            blob: name,
            snapshot: None,
            if_match: Some(planned.clone()),
            content_length: props.content_length,
            content_type: props.content_type.as_deref(),
        };
        let to = CopyTo {
            store: &self.app.backup,
            container: RESERVED_CONTAINER,
            blob: &undo_name,
            condition: TargetCondition::Any,
            metadata: &meta,
        };
        match server_side_copy(&from, &to, &self.blocks).await {
            Ok(_) => {}
            Err(e) if is_condition_failure(&e) || e.is_not_found() => {
                return Outcome::Changed(format!("changed before its undo copy: {e}"))
            }
            Err(e) => return Outcome::Failed(format!("undo copy: {e}")),
        }
        let target = self.ends.target;
        let record = UndoRecord::Deleted {
            previous: planned.clone(),
            previous_length: Some(props.content_length),
        };
        match target.delete(c, name, None, Some(planned), false).await {
            Ok(()) => {
                return Outcome::Deleted {
                    snapshot_copies: 0,
                    unrecorded: !self.record(name, &record).await,
                }
            }
            Err(e) if e.code() == "SnapshotsPresent" => {}
            Err(e) if e.is_precondition_failed() || e.is_not_found() => {
                return Outcome::Changed(e.to_string())
            }
            Err(e) => return Outcome::Failed(e.to_string()),
        }
        let snapshots = match target.list_versions(c, name).await {
            Ok(rows) => rows,
            Err(e) => return Outcome::Failed(format!("listing its snapshots: {e}")),
        };
        let mut copies = 0u64;
        for snap in snapshots.iter().filter(|r| r.snapshot.is_some()) {
            let version = crate::core::reconcile::snapshot_version_etag(snap);
            if backed_up.contains(&version) {
                continue;
            }
            let id = snap.snapshot.as_deref().unwrap_or_default();
            let undo_snap = format!("{}/undo-snapshots/{}/{}/{}", self.id, c, id, name);
            if undo_snap.chars().count() > 1024 {
                return Outcome::Failed(format!(
                    "snapshot {id} holds version {version}, which the backup does not hold, and the name is too long to keep a copy: not deleted"
                ));
            }
            let mut meta = snap.metadata.clone();
            meta.insert(RESTORE_UNDO.into(), self.id.to_owned());
            meta.insert(UNDO_OF_SNAPSHOT.into(), id.to_owned());
            let from = CopyFrom {
                store: target,
                keys: &self.app.source_keys,
                container: c,
                blob: name,
                snapshot: Some(id),
                if_match: Some(snap.etag.clone()),
                content_length: snap.content_length,
                content_type: snap.content_type.as_deref(),
            };
            let to = CopyTo {
                store: &self.app.backup,
                container: RESERVED_CONTAINER,
                blob: &undo_snap,
                condition: TargetCondition::Any,
                metadata: &meta,
            };
            if let Err(e) = server_side_copy(&from, &to, &self.blocks).await {
                return Outcome::Failed(format!(
                    "copying snapshot {id} (version {version}, not in the backup) before the delete failed, so the blob was not deleted: {e}"
                ));
            }
            copies += 1;
        }
        match target.delete(c, name, None, Some(planned), true).await {
            Ok(()) => Outcome::Deleted {
                snapshot_copies: copies,
                unrecorded: !self.record(name, &record).await,
            },
            Err(e) if e.is_precondition_failed() || e.is_not_found() => {
                Outcome::Changed(e.to_string())
            }
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_that_cannot_be_read_again_blames_nobody() {
        let planned = Etag::new("\"0x1\"");
        let busy = || StorageError::Retryable {
            what: "Get Blob Properties".into(),
            detail: "503".into(),
        };
        let gone = || StorageError::NotFound {
            what: "Get Blob Properties".into(),
            code: "BlobNotFound".into(),
        };
        assert!(still_as_planned(Ok(planned.clone()), Some(&planned)).unwrap());
        assert!(!still_as_planned(Ok(Etag::new("\"0x2\"")), Some(&planned)).unwrap());
        assert!(still_as_planned(Err(gone()), None).unwrap());
        assert!(!still_as_planned(Err(gone()), Some(&planned)).unwrap());
        // A throttled read says nothing about who changed: not "the target changed".
        assert!(still_as_planned(Err(busy()), Some(&planned)).is_err());
        assert!(still_as_planned(Err(busy()), None).is_err());
    }
}
