//! `lakeguard restore --undo <id>`: an in-place restore reversed from its undo data, conditional
//! on nothing having changed since.
//!
//! # What proves that a blob is still what the restore left
//! The marker `lakeguard_restored_from_etag` does not: it survives metadata-preserving rewrites
//! (an ADLS append and flush keeps the metadata). The ETag the restore's write returned does,
//! and the restore keeps it: for every blob an in-place restore writes or deletes it writes an
//! **undo record**, `lakeguard-restores/<id>/written/<container>/<name>` (no body; metadata:
//! what it did, the ETag it left, the ETag it replaced, the undo snapshot it took), right after
//! the write. The undo acts only where the blob still has exactly that ETag (HEAD, then every
//! write `If-Match` it), or, for a deletion, where the name is still absent (`If-None-Match: *`).
//! A process that dies between a write and its record leaves that one item unrecorded: it is
//! not undone (at most `LAKEGUARD_CONCURRENCY` items; their undo snapshots and copies stay).
//!
//! # The plan, per record
//! - **overwrote** (the blob still has the ETag the restore left): the undo snapshot
//!   (`lakeguard_restore_undo` = id) is copied back over it (`put_back`);
//! - **created** (still the restore's ETag): the blob is deleted (`remove`);
//! - **deleted** (the name still absent): the undo copy `<id>/undo/<container>/<name>` is copied
//!   back (`recreate`). The copies of its snapshots (`<id>/undo-snapshots/`) are *not* turned
//!   back into snapshots: a snapshot's id is its creation time, which the history reads as proof
//!   that its version was current then, so a recreated one would carry a false time. They stay
//!   where they are (counted in the report) until prune expires them;
//! - a blob that holds the state before the restore again (an earlier undo: the ETag it had, or
//!   its marker and length) is `already_undone`; anything else changed since the restore is left
//!   as it is and reported (`changed`); undo data that is gone (pruned after
//!   `LAKEGUARD_UNDO_RETENTION`) is `unavailable`.
//!
//! # Carried out like a restore, so that it can itself be undone
//! The actions become restore plan items executed by the restore's own executor under a new id:
//! before a blob is put back it is snapshotted, before one is removed it is copied to
//! `lakeguard-restores/<new id>/undo/`, and each action is recorded. `restore --undo <new id>`
//! reverses the undo. Blobs written back carry `lakeguard_restored_from_etag` = the ETag they had
//! before the restore, like any restored blob. Memory: one page of records at a time.

use std::collections::BTreeMap;

use super::*;
use crate::core::restore::{ContentRef, Side, Version};
use crate::storage::blob::{BlobProperties, ListPage};

/// The folder of a restore's undo records, under `lakeguard-restores/<id>/`.
pub const RECORDS: &str = "written";

const ACTION: &str = "lakeguard_undo_action";
const WRITTEN: &str = "lakeguard_undo_written_etag";
const PREVIOUS: &str = "lakeguard_undo_previous_etag";
const PREVIOUS_LENGTH: &str = "lakeguard_undo_previous_length";
const SNAPSHOT: &str = "lakeguard_undo_snapshot";

/// The undo record of one blob of restore `id`.
pub fn record_name(id: &str, container: &str, name: &str) -> String {
    format!("{id}/{RECORDS}/{container}/{name}")
}

fn records_prefix(id: &str) -> String {
    format!("{id}/{RECORDS}/")
}

/// What an in-place restore did to one blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UndoRecord {
    /// Replaced the blob of ETag `previous` (and length) with a version; `written` is the ETag
    /// it left, `snapshot` the undo snapshot holding the replaced state.
    Overwrote {
        written: Etag,
        previous: Etag,
        previous_length: u64,
        snapshot: String,
    },
    /// Wrote a blob where there was none.
    Created { written: Etag },
    /// Deleted the blob of ETag `previous` (its undo copy is `<id>/undo/<container>/<name>`).
    /// The length is unknown when an earlier attempt of the restore deleted it.
    Deleted {
        previous: Etag,
        previous_length: Option<u64>,
    },
}

impl UndoRecord {
    /// The same record, for a blob that now has ETag `etag` (a later step of the same restore
    /// changed it, such as setting its ACL).
    pub fn with_written(self, etag: Etag) -> UndoRecord {
        match self {
            UndoRecord::Overwrote {
                previous,
                previous_length,
                snapshot,
                ..
            } => UndoRecord::Overwrote {
                written: etag,
                previous,
                previous_length,
                snapshot,
            },
            UndoRecord::Created { .. } => UndoRecord::Created { written: etag },
            deleted @ UndoRecord::Deleted { .. } => deleted,
        }
    }

    pub fn to_metadata(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            m.insert(k.to_owned(), v);
        };
        match self {
            UndoRecord::Overwrote {
                written,
                previous,
                previous_length,
                snapshot,
            } => {
                put(ACTION, "overwrote".into());
                put(WRITTEN, written.quoted());
                put(PREVIOUS, previous.quoted());
                put(PREVIOUS_LENGTH, previous_length.to_string());
                put(SNAPSHOT, snapshot.clone());
            }
            UndoRecord::Created { written } => {
                put(ACTION, "created".into());
                put(WRITTEN, written.quoted());
            }
            UndoRecord::Deleted {
                previous,
                previous_length,
            } => {
                put(ACTION, "deleted".into());
                put(PREVIOUS, previous.quoted());
                if let Some(l) = previous_length {
                    put(PREVIOUS_LENGTH, l.to_string());
                }
            }
        }
        m
    }

    pub fn from_metadata(m: &BTreeMap<String, String>) -> Result<UndoRecord, String> {
        let get = |k: &str| {
            m.get(k)
                .ok_or_else(|| format!("the undo record has no {k}"))
        };
        let etag = |k: &str| get(k).map(Etag::new);
        let length = |k: &str| {
            get(k)?
                .parse::<u64>()
                .map_err(|_| format!("the undo record's {k} is not a number"))
        };
        match get(ACTION)?.as_str() {
            "overwrote" => Ok(UndoRecord::Overwrote {
                written: etag(WRITTEN)?,
                previous: etag(PREVIOUS)?,
                previous_length: length(PREVIOUS_LENGTH)?,
                snapshot: get(SNAPSHOT)?.clone(),
            }),
            "created" => Ok(UndoRecord::Created {
                written: etag(WRITTEN)?,
            }),
            "deleted" => Ok(UndoRecord::Deleted {
                previous: etag(PREVIOUS)?,
                previous_length: match m.get(PREVIOUS_LENGTH) {
                    None => None,
                    Some(_) => Some(length(PREVIOUS_LENGTH)?),
                },
            }),
            other => Err(format!("unknown undo action `{other}`")),
        }
    }
}

/// `lakeguard restore --undo <id>`.
#[derive(Clone, Debug)]
pub struct UndoRequest {
    /// The restore to reverse.
    pub id: String,
    /// When given, the restore must have been of this container.
    pub container: Option<String>,
    pub dry_run: bool,
    /// Needed to write (the undo overwrites and deletes in place, like the restore did).
    pub force: bool,
}

/// One line of an undo plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum UndoItem {
    /// The restore overwrote the blob: its undo snapshot goes back over it.
    PutBack {
        name: String,
        snapshot: String,
        restored_etag: Etag,
    },
    /// The restore created the blob: it is deleted.
    Remove { name: String, restored_etag: Etag },
    /// The restore deleted the blob: its undo copy is copied back.
    Recreate { name: String, undo_copy: String },
    /// Holds the state before the restore already.
    AlreadyUndone { name: String, why: String },
    /// Changed since the restore: left as it is.
    Changed { name: String, why: String },
    /// Its undo data is gone or unreadable: left as it is.
    Unavailable { name: String, why: String },
}

impl UndoItem {
    pub fn name(&self) -> &str {
        match self {
            UndoItem::PutBack { name, .. }
            | UndoItem::Remove { name, .. }
            | UndoItem::Recreate { name, .. }
            | UndoItem::AlreadyUndone { name, .. }
            | UndoItem::Changed { name, .. }
            | UndoItem::Unavailable { name, .. } => name,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UndoSummary {
    pub put_back: u64,
    pub remove: u64,
    pub recreate: u64,
    pub already_undone: u64,
    pub changed: u64,
    pub unavailable: u64,
}

impl UndoSummary {
    fn record(&mut self, item: &UndoItem) {
        match item {
            UndoItem::PutBack { .. } => self.put_back += 1,
            UndoItem::Remove { .. } => self.remove += 1,
            UndoItem::Recreate { .. } => self.recreate += 1,
            UndoItem::AlreadyUndone { .. } => self.already_undone += 1,
            UndoItem::Changed { .. } => self.changed += 1,
            UndoItem::Unavailable { .. } => self.unavailable += 1,
        }
    }

    pub fn actionable(&self) -> u64 {
        self.put_back + self.remove + self.recreate
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UndoReport {
    /// The undo's own id: its undo data, so `restore --undo <id>` reverses the undo.
    pub id: String,
    /// The restore being reversed.
    pub undoes: String,
    pub container: String,
    pub dry_run: bool,
    pub plan: UndoSummary,
    /// The plan's items, at most [`MAX_LISTED_ITEMS`].
    pub items: Vec<UndoItem>,
    pub items_truncated: bool,
    /// Copies of snapshots of blobs the restore deleted (`<id>/undo-snapshots/`): kept there,
    /// not recreated as snapshots (see the module docs).
    pub snapshot_copies_kept: u64,
    /// Undo copies with no record of a delete: deletes the restore did not make (the blob
    /// changed first) or could not record. Left; the copies stay under `<id>/undo/`.
    pub unrecorded_undo_copies: u64,
    pub refused: Option<String>,
    pub executed: bool,
    pub execution: Option<ExecReport>,
    pub elapsed_ms: u128,
}

impl UndoReport {
    /// Every recorded action of the restore is reversed (or was already).
    pub fn is_complete(&self) -> bool {
        self.executed
            && self.plan.changed == 0
            && self.plan.unavailable == 0
            && self
                .execution
                .as_ref()
                .is_some_and(|e| e.failed == 0 && e.changed_since_plan == 0)
    }
}

/// HEAD with a real 404 as `None`.
async fn head(
    store: &BlobStore,
    c: &str,
    b: &str,
    snapshot: Option<&str>,
) -> Result<Option<BlobProperties>, StorageError> {
    match store.properties(c, b, snapshot).await {
        Ok(p) => Ok(Some(p)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// The state before the restore as a version to restore: `previous` is the ETag the blob had,
/// `props` the undo snapshot's or undo copy's properties, `content` where it is read.
fn version_from(props: &BlobProperties, previous: &Etag, content: ContentRef) -> Version {
    Version {
        source_etag: previous.clone(),
        source_last_modified: props.last_modified,
        current_from: props.last_modified,
        current_by: None,
        seen_first: None,
        seen_last: None,
        deleted_at: None,
        content: Some(content),
        in_backup: false,
        content_length: props.content_length,
        content_type: props.content_type.clone(),
        content_md5: props.content_md5.clone(),
        user_metadata: props
            .metadata
            .iter()
            .filter(|(k, _)| !metadata::is_lakeguard_key(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        // Undo restores bytes; the security state before a restore is not recorded.
        directory: false,
        security: Vec::new(),
    }
}

/// The blob holds the state before the restore again: the ETag it had, or (written back by an
/// earlier undo) the marker naming it, with its length.
fn holds_previous(p: &BlobProperties, previous: &Etag, length: Option<u64>) -> bool {
    p.etag == *previous
        || (p
            .metadata
            .get(metadata::RESTORED_FROM_ETAG)
            .map(Etag::new)
            .as_ref()
            == Some(previous)
            && length.is_none_or(|l| l == p.content_length))
}

/// One record's plan line and, when there is something to do, the restore plan item doing it.
async fn plan_record(
    app: &App,
    id: &str,
    c: &str,
    name: String,
    record: Result<UndoRecord, String>,
) -> (UndoItem, Option<PlanItem>) {
    let unavailable = |name: String, why: String| (UndoItem::Unavailable { name, why }, None);
    let record = match record {
        Ok(r) => r,
        Err(why) => return unavailable(name, why),
    };
    let current = match head(&app.source, c, &name, None).await {
        Ok(p) => p,
        Err(e) => return unavailable(name, format!("reading the blob: {e}")),
    };
    match record {
        UndoRecord::Overwrote {
            written,
            previous,
            previous_length,
            snapshot,
        } => match current {
            None => (
                UndoItem::Changed {
                    name,
                    why: "deleted since the restore".into(),
                },
                None,
            ),
            Some(p) if p.etag == written => {
                match head(&app.source, c, &name, Some(&snapshot)).await {
                    Ok(Some(s)) => {
                        let content = ContentRef {
                            side: Side::Source,
                            name: name.clone(),
                            snapshot: Some(snapshot.clone()),
                            etag: s.etag.clone(),
                            container: None,
                        };
                        let action = PlanItem::Restore {
                            name: name.clone(),
                            version: version_from(&s, &previous, content),
                            target_etag: Some(written.clone()),
                            security: None,
                        };
                        (
                            UndoItem::PutBack {
                                name,
                                snapshot,
                                restored_etag: written,
                            },
                            Some(action),
                        )
                    }
                    Ok(None) => unavailable(
                        name,
                        format!("its undo snapshot {snapshot} is gone (pruned after LAKEGUARD_UNDO_RETENTION?)"),
                    ),
                    Err(e) => unavailable(name, format!("reading its undo snapshot: {e}")),
                }
            }
            Some(p) if holds_previous(&p, &previous, Some(previous_length)) => (
                UndoItem::AlreadyUndone {
                    name,
                    why: "holds the state it had before the restore".into(),
                },
                None,
            ),
            Some(p) => (
                UndoItem::Changed {
                    name,
                    why: format!("now {} (the restore left {written})", p.etag),
                },
                None,
            ),
        },
        UndoRecord::Created { written } => match current {
            None => (
                UndoItem::AlreadyUndone {
                    name,
                    why: "absent, as before the restore".into(),
                },
                None,
            ),
            Some(p) if p.etag == written => (
                UndoItem::Remove {
                    name: name.clone(),
                    restored_etag: written.clone(),
                },
                Some(PlanItem::Delete {
                    name,
                    target_etag: written,
                    backed_up: Vec::new(),
                }),
            ),
            Some(p) => (
                UndoItem::Changed {
                    name,
                    why: format!("now {} (the restore left {written})", p.etag),
                },
                None,
            ),
        },
        UndoRecord::Deleted {
            previous,
            previous_length,
        } => match current {
            Some(p) if holds_previous(&p, &previous, previous_length) => (
                UndoItem::AlreadyUndone {
                    name,
                    why: "holds the state it had before the restore".into(),
                },
                None,
            ),
            Some(p) => (
                UndoItem::Changed {
                    name,
                    why: format!("written since the restore deleted it (now {})", p.etag),
                },
                None,
            ),
            None => {
                let copy = format!("{id}/undo/{c}/{name}");
                match head(&app.backup, RESERVED_CONTAINER, &copy, None).await {
                    Ok(Some(u)) => {
                        let content = ContentRef {
                            side: Side::Backup,
                            name: copy.clone(),
                            snapshot: None,
                            etag: u.etag.clone(),
                            container: Some(RESERVED_CONTAINER.to_owned()),
                        };
                        let action = PlanItem::Restore {
                            name: name.clone(),
                            version: version_from(&u, &previous, content),
                            target_etag: None,
                            security: None,
                        };
                        (
                            UndoItem::Recreate {
                                name,
                                undo_copy: copy,
                            },
                            Some(action),
                        )
                    }
                    Ok(None) => unavailable(
                        name,
                        format!("its undo copy {RESERVED_CONTAINER}/{copy} is gone (pruned after LAKEGUARD_UNDO_RETENTION?)"),
                    ),
                    Err(e) => unavailable(name, format!("reading its undo copy: {e}")),
                }
            }
        },
    }
}

/// Blobs under `prefix` in the reserved container (flat, names only).
async fn count(app: &App, prefix: String) -> Result<u64, OpError> {
    let opts = ListOptions {
        prefix: Some(prefix),
        ..Default::default()
    };
    let mut n = 0;
    let mut marker = None;
    loop {
        let page = match app
            .backup
            .list_page(RESERVED_CONTAINER, &opts, marker.take())
            .await
        {
            Ok(p) => p,
            Err(e) if e.is_not_found() => return Ok(n),
            Err(e) => return Err(e.into()),
        };
        n += page.entries.len() as u64;
        match page.next_marker {
            Some(m) => marker = Some(m),
            None => return Ok(n),
        }
    }
}

/// Plans the undo of restore `req.id` record page by record page and, with `force` (and not a
/// dry run), carries out each page's actions before the next one is listed.
pub async fn run(
    app: &App,
    req: &UndoRequest,
    progress: Arc<dyn Progress>,
) -> Result<UndoReport, OpError> {
    let started = Instant::now();
    let id = req.id.as_str();
    if !is_valid_id(id) {
        return Err(OpError::InvalidInput(format!("invalid restore id `{id}`")));
    }
    if let Some(c) = &req.container {
        crate::settings::validate_container_name(c).map_err(OpError::InvalidInput)?;
    }
    let execute_now = req.force && !req.dry_run;
    let mut report = UndoReport {
        id: new_id(),
        undoes: id.to_owned(),
        container: req.container.clone().unwrap_or_default(),
        dry_run: req.dry_run,
        plan: UndoSummary::default(),
        items: Vec::new(),
        items_truncated: false,
        snapshot_copies_kept: 0,
        unrecorded_undo_copies: 0,
        refused: (!req.force && !req.dry_run).then(|| {
            format!(
                "undoing restore `{id}` overwrites and deletes blobs in place; it needs --force"
            )
        }),
        executed: false,
        execution: None,
        elapsed_ms: 0,
    };
    let prefix = records_prefix(id);
    let opts = ListOptions {
        prefix: Some(prefix.clone()),
        snapshots: false,
        metadata: true,
        max_results: None,
    };
    let mut container = req.container.clone();
    let mut exec = ExecReport::default();
    let mut records = 0u64;
    let mut deleted_records = 0u64;
    let mut marker = None;
    progress.message("undoing");
    loop {
        let page = match app
            .backup
            .list_page(RESERVED_CONTAINER, &opts, marker.take())
            .await
        {
            Ok(p) => p,
            Err(e) if e.is_not_found() => ListPage::default(),
            Err(e) => return Err(e.into()),
        };
        let mut todo = Vec::with_capacity(page.entries.len());
        for e in page.entries {
            let rest = e.name.strip_prefix(&prefix).unwrap_or(&e.name);
            let Some((c, name)) = rest.split_once('/') else {
                continue;
            };
            match &container {
                Some(k) if k != c => {
                    return Err(OpError::InvalidInput(format!(
                        "restore `{id}` was of container `{c}`, not `{k}`"
                    )))
                }
                Some(_) => {}
                None => container = Some(c.to_owned()),
            }
            let record = UndoRecord::from_metadata(&e.metadata);
            deleted_records += u64::from(matches!(record, Ok(UndoRecord::Deleted { .. })));
            todo.push((name.to_owned(), record));
        }
        records += todo.len() as u64;
        progress.add_total(todo.len() as u64);
        if let Some(c) = container.clone() {
            let planned: Vec<(UndoItem, Option<PlanItem>)> = stream::iter(todo)
                .map(|(name, record)| plan_record(app, id, &c, name, record))
                .buffer_unordered(app.settings.concurrency.max(1))
                .collect()
                .await;
            let mut actions = Vec::new();
            for (item, action) in planned {
                report.plan.record(&item);
                if report.items.len() < MAX_LISTED_ITEMS {
                    report.items.push(item);
                } else {
                    report.items_truncated = true;
                }
                match action {
                    Some(a) => actions.push(a),
                    None => progress.inc(1),
                }
            }
            if execute_now && !actions.is_empty() {
                let mut restore = RestoreRequest::new(c.as_str(), OffsetDateTime::now_utc());
                restore.force = true;
                restore.id = Some(report.id.clone());
                execute_items(app, &restore, &report.id, actions, &progress, &mut exec).await?;
            }
        }
        match page.next_marker {
            Some(m) => marker = Some(m),
            None => break,
        }
    }
    let undo_copies = count(app, format!("{id}/undo/")).await?;
    report.snapshot_copies_kept = count(app, format!("{id}/undo-snapshots/")).await?;
    report.unrecorded_undo_copies = undo_copies.saturating_sub(deleted_records);
    if records == 0 && undo_copies == 0 && read_status(app, id).await?.is_none() {
        return Err(OpError::InvalidInput(format!(
            "restore `{id}` left no undo records: the id is wrong, the restore wrote nothing or was not in place, its undo data was pruned (LAKEGUARD_UNDO_RETENTION), or it ran before lakeguard kept undo records"
        )));
    }
    report.container = container.unwrap_or_default();
    if execute_now {
        report.executed = true;
        report.execution = Some(exec);
    }
    report
        .items
        .sort_by(|a, b| app.settings.name_order.cmp(a.name(), b.name()));
    report.elapsed_ms = started.elapsed().as_millis();
    info!(
        undo = %report.id,
        restore = id,
        container = %report.container,
        put_back = report.plan.put_back,
        remove = report.plan.remove,
        recreate = report.plan.recreate,
        changed = report.plan.changed,
        unavailable = report.plan.unavailable,
        executed = report.executed,
        "restore undo finished"
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_metadata() {
        for r in [
            UndoRecord::Overwrote {
                written: Etag::new("0x1"),
                previous: Etag::new("\"0x0\""),
                previous_length: 42,
                snapshot: "2026-11-22T03:08:15.1234567Z".into(),
            },
            UndoRecord::Created {
                written: Etag::new("0x2"),
            },
            UndoRecord::Deleted {
                previous: Etag::new("0x3"),
                previous_length: Some(7),
            },
            UndoRecord::Deleted {
                previous: Etag::new("0x4"),
                previous_length: None,
            },
        ] {
            let m = r.to_metadata();
            assert!(m.keys().all(|k| metadata::is_lakeguard_key(k)), "{m:?}");
            assert_eq!(UndoRecord::from_metadata(&m), Ok(r));
        }
    }

    #[test]
    fn damaged_records_are_errors_not_guesses() {
        let mut m = UndoRecord::Created {
            written: Etag::new("0x2"),
        }
        .to_metadata();
        m.remove(WRITTEN);
        assert!(UndoRecord::from_metadata(&m).is_err());
        m.insert(ACTION.into(), "renamed".into());
        assert!(UndoRecord::from_metadata(&m).is_err());
        let mut m = UndoRecord::Deleted {
            previous: Etag::new("0x3"),
            previous_length: Some(7),
        }
        .to_metadata();
        m.insert(PREVIOUS_LENGTH.into(), "seven".into());
        assert!(UndoRecord::from_metadata(&m).is_err());
        assert!(UndoRecord::from_metadata(&BTreeMap::new()).is_err());
    }

    fn props(etag: &str, len: u64, marker: Option<&str>) -> BlobProperties {
        let mut metadata = BTreeMap::new();
        if let Some(m) = marker {
            metadata.insert(metadata::RESTORED_FROM_ETAG.to_owned(), m.to_owned());
        }
        BlobProperties {
            etag: Etag::new(etag),
            last_modified: OffsetDateTime::UNIX_EPOCH,
            content_length: len,
            content_type: None,
            content_md5: None,
            metadata,
        }
    }

    #[test]
    fn the_state_before_is_recognised_by_etag_or_marker_and_length() {
        let before = Etag::new("0xB");
        assert!(holds_previous(&props("0xB", 1, None), &before, Some(5)));
        assert!(holds_previous(
            &props("0xU", 5, Some("\"0xB\"")),
            &before,
            Some(5)
        ));
        assert!(!holds_previous(
            &props("0xU", 6, Some("\"0xB\"")),
            &before,
            Some(5)
        ));
        assert!(holds_previous(&props("0xU", 6, Some("0xB")), &before, None));
        assert!(!holds_previous(
            &props("0xU", 5, Some("0xC")),
            &before,
            Some(5)
        ));
        assert!(!holds_previous(&props("0xU", 5, None), &before, Some(5)));
    }
}
