//! A restore started over HTTP, made durable. The Functions host does not track work after an
//! HTTP answer, so the confirmed plan is not executed in the background of the request: it is
//! written to the backup account in chunks (`lakeguard-restores/<id>/plan/<n>.jsonl`), with a
//! status document (`<id>/status.json`), and one message per chunk goes onto the continuation
//! queue (`{"v":1,"kind":"restore","id","chunk"}`). `ReconcileWorker` carries out each chunk on
//! any instance and records it done (`<id>/done/<n>.json`, `If-None-Match: *`, counts in its
//! metadata). Status reads add up the done records, so progress is real and survives any
//! instance dying. Items are idempotent (a restored blob carries the restore marker, a deleted
//! one left its undo copy): a chunk redelivered after its instance died is redone to the same
//! end, and only one attempt's record counts.

use std::collections::BTreeMap;

use tracing::Instrument;

use super::*;
use crate::storage::blob::ListOptions as ListOpts;

/// The continuation message's `kind` for restore chunks.
pub const MESSAGE_KIND: &str = "restore";

/// What an HTTP restore asked for, kept so that any instance can rebuild the request (accounts
/// by connection *name*, never a connection string).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestoreSpec {
    pub container: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub prefix: Option<String>,
    pub from: HistoryFrom,
    pub to_account: Option<String>,
    pub to_container: Option<String>,
    pub force: bool,
}

impl RestoreSpec {
    /// The request this spec describes (`to_account` is resolved from the app settings).
    pub fn to_request(&self, app: &App) -> Result<RestoreRequest, OpError> {
        let mut req = RestoreRequest::new(self.container.clone(), self.at);
        req.prefix = self.prefix.clone().filter(|p| !p.is_empty());
        req.from = self.from;
        req.force = self.force;
        if self.to_account.is_some() || self.to_container.is_some() {
            let store = match &self.to_account {
                Some(name) => {
                    if name.contains('=') {
                        return Err(OpError::InvalidInput(
                            "`to_account` is the name of a configured connection, not a connection string".into(),
                        ));
                    }
                    let conn = crate::settings::named_connection(name)
                        .map_err(|e| OpError::InvalidInput(e.to_string()))?;
                    app.clients.blob_store(&conn)?
                }
                None => app.source.clone(),
            };
            req.to = Some(TargetSpec {
                store,
                container: self
                    .to_container
                    .clone()
                    .unwrap_or_else(|| self.container.clone()),
            });
        }
        Ok(req)
    }
}

/// The state of a restore started over HTTP (`GET /api/restore/{id}` from any instance).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestoreStatus {
    pub id: String,
    /// `running`, `succeeded` (complete), `incomplete` (done, but something failed, changed or
    /// was unavailable: see the report), `failed` (the operation itself failed: see `error`).
    pub state: String,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    pub request: RequestInfo,
    pub plan: PlanSummary,
    #[serde(default)]
    pub history: HistoryInfo,
    /// Actionable items carried out so far (from the done chunks) and in all.
    pub done: u64,
    pub total: u64,
    /// Chunks of the plan, and how many are done.
    #[serde(default)]
    pub chunks: u64,
    #[serde(default)]
    pub chunks_done: u64,
    #[serde(default)]
    pub spec: Option<RestoreSpec>,
    pub report: Option<RestoreReport>,
    pub error: Option<String>,
}

fn status_blob(id: &str) -> String {
    format!("{id}/status.json")
}

fn chunk_blob(id: &str, n: u64) -> String {
    format!("{id}/plan/{n:06}.jsonl")
}

fn done_prefix(id: &str) -> String {
    format!("{id}/done/")
}

fn done_blob(id: &str, n: u64) -> String {
    format!("{}{n:06}.json", done_prefix(id))
}

async fn upload(
    app: &App,
    name: &str,
    body: Vec<u8>,
    meta: &BTreeMap<String, String>,
    cond: &TargetCondition,
) -> Result<Etag, StorageError> {
    app.backup
        .upload_if(
            RESERVED_CONTAINER,
            name,
            body,
            Some("application/json"),
            meta,
            cond,
        )
        .await
}

pub async fn write_status(app: &App, status: &RestoreStatus) -> Result<(), StorageError> {
    app.backup.ensure_container(RESERVED_CONTAINER).await?;
    let body = serde_json::to_vec_pretty(status).map_err(|e| StorageError::Permanent {
        what: "restore status".into(),
        detail: e.to_string(),
    })?;
    upload(
        app,
        &status_blob(&status.id),
        body,
        &BTreeMap::new(),
        &TargetCondition::Any,
    )
    .await?;
    Ok(())
}

async fn read_status_doc(
    app: &App,
    id: &str,
) -> Result<Option<(RestoreStatus, Etag)>, StorageError> {
    match app
        .backup
        .download_versioned(RESERVED_CONTAINER, &status_blob(id))
        .await
    {
        Ok((bytes, etag)) => serde_json::from_slice(&bytes)
            .map(|s| Some((s, etag)))
            .map_err(|e| StorageError::Permanent {
                what: format!("restore status {id}"),
                detail: e.to_string(),
            }),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// The status of restore `id`, with the progress of its chunks added up; once every chunk is
/// done, the final report (stored back, `If-Match`, so later reads are one request). `None`
/// when there is no such restore (a real 404 only).
pub async fn read_status(app: &App, id: &str) -> Result<Option<RestoreStatus>, StorageError> {
    if !is_valid_id(id) {
        return Ok(None);
    }
    let Some((mut status, etag)) = read_status_doc(app, id).await? else {
        return Ok(None);
    };
    if status.state != "running" {
        return Ok(Some(status));
    }
    // Done records: counts in metadata, so one listing answers without downloads.
    let opts = ListOpts {
        prefix: Some(done_prefix(id)),
        snapshots: false,
        metadata: true,
        max_results: None,
    };
    let mut marker = None;
    let mut done_records = Vec::new();
    loop {
        let page = app
            .backup
            .list_page(RESERVED_CONTAINER, &opts, marker)
            .await?;
        done_records.extend(page.entries);
        match page.next_marker {
            Some(m) => marker = Some(m),
            None => break,
        }
    }
    let count = |e: &crate::model::BlobEntry, k: &str| {
        e.meta(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
    };
    status.chunks_done = done_records.len() as u64;
    status.done = done_records
        .iter()
        .map(|e| count(e, "lakeguard_items"))
        .sum();
    if status.chunks_done < status.chunks {
        return Ok(Some(status));
    }
    // Every chunk is done: the final report, with the details of chunks that had any.
    let mut exec = ExecReport::default();
    for e in &done_records {
        let detailed = count(e, "lakeguard_failed") + count(e, "lakeguard_changed") > 0;
        let r: ExecReport = if detailed {
            let body = app
                .backup
                .download(RESERVED_CONTAINER, &e.name, None)
                .await?;
            serde_json::from_slice(&body).map_err(|err| StorageError::Permanent {
                what: format!("restore chunk record {}", e.name),
                detail: err.to_string(),
            })?
        } else {
            ExecReport {
                restored: count(e, "lakeguard_restored"),
                overwritten: count(e, "lakeguard_overwritten"),
                deleted: count(e, "lakeguard_deleted"),
                undo_snapshots: count(e, "lakeguard_undo_snapshots"),
                undo_copies: count(e, "lakeguard_deleted"),
                undo_snapshot_copies: count(e, "lakeguard_undo_snapshot_copies"),
                undo_records_failed: count(e, "lakeguard_undo_records_failed"),
                ..Default::default()
            }
        };
        merge(&mut exec, r);
    }
    let report = RestoreReport {
        id: status.id.clone(),
        request: status.request.clone(),
        plan: status.plan.clone(),
        history: status.history.clone(),
        items: Vec::new(),
        items_truncated: false,
        executed: true,
        refused: None,
        execution: Some(exec),
        elapsed_ms: (OffsetDateTime::now_utc() - status.started_at)
            .whole_milliseconds()
            .max(0) as u128,
    };
    status.state = if report.is_complete() {
        "succeeded"
    } else {
        "incomplete"
    }
    .into();
    status.report = Some(report);
    status.updated_at = OffsetDateTime::now_utc();
    let body = serde_json::to_vec_pretty(&status).map_err(|e| StorageError::Permanent {
        what: "restore status".into(),
        detail: e.to_string(),
    })?;
    match upload(
        app,
        &status_blob(id),
        body,
        &BTreeMap::new(),
        &TargetCondition::Matches(etag),
    )
    .await
    {
        Ok(_) => info!(id, state = %status.state, "restore finished"),
        // Another reader stored the same final status first.
        Err(e) if crate::ops::state::is_lost_race(&e) => {}
        Err(e) => {
            warn!(id, error = %e, "could not store the final restore status; it is recomputed on the next read")
        }
    }
    Ok(Some(status))
}

fn merge(total: &mut ExecReport, r: ExecReport) {
    total.restored += r.restored;
    total.overwritten += r.overwritten;
    total.deleted += r.deleted;
    total.undo_snapshots += r.undo_snapshots;
    total.undo_copies += r.undo_copies;
    total.undo_snapshot_copies += r.undo_snapshot_copies;
    total.undo_records_failed += r.undo_records_failed;
    total.changed_since_plan += r.changed_since_plan;
    total.failed += r.failed;
    total.not_attempted += r.not_attempted;
    total.directories += r.directories;
    total.security_set += r.security_set;
    total.security_failed += r.security_failed;
    for c in r.changed {
        if total.changed.len() < MAX_REPORTED_FAILURES {
            total.changed.push(c);
        }
    }
    for f in r.failures {
        if total.failures.len() < MAX_REPORTED_FAILURES {
            total.failures.push(f);
        }
    }
}

/// The continuation message of one chunk.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChunkMessage {
    pub v: u32,
    pub kind: String,
    pub id: String,
    pub chunk: u64,
}

/// Starts an already computed, already authorised plan (HTTP `Restore` with `confirm`): the plan
/// in chunks, the status, then one message per chunk. Returns the initial status.
pub async fn start_durable(
    app: &App,
    spec: RestoreSpec,
    mut plan: Plan,
) -> Result<RestoreStatus, StorageError> {
    app.backup.ensure_container(RESERVED_CONTAINER).await?;
    let chunk_items = app.settings.restore_chunk_items.max(1) as usize;
    let spool_err = |e: std::io::Error| StorageError::Permanent {
        what: "restore plan spool (temporary file)".into(),
        detail: e.to_string(),
    };
    let mut chunks = 0u64;
    let mut total = 0u64;
    {
        let mut reader = plan.spool.reader().map_err(spool_err)?;
        loop {
            let mut body = Vec::new();
            let mut n = 0;
            for item in reader.by_ref().take(chunk_items) {
                let item = item.map_err(spool_err)?;
                serde_json::to_writer(&mut body, &item).map_err(|e| spool_err(e.into()))?;
                body.push(b'\n');
                n += 1;
            }
            if n == 0 {
                break;
            }
            upload(
                app,
                &chunk_blob(&plan.id, chunks),
                body,
                &BTreeMap::new(),
                &TargetCondition::Absent,
            )
            .await?;
            chunks += 1;
            total += n as u64;
        }
    }
    let now = OffsetDateTime::now_utc();
    let status = RestoreStatus {
        id: plan.id.clone(),
        state: if chunks == 0 { "succeeded" } else { "running" }.into(),
        started_at: now,
        updated_at: now,
        request: plan.info.clone(),
        plan: plan.summary.clone(),
        history: plan.history.clone(),
        done: 0,
        total,
        chunks,
        chunks_done: 0,
        spec: Some(spec),
        report: None,
        error: None,
    };
    write_status(app, &status).await?;
    let queue = crate::ops::reconcile::reconcile_queue(app)?;
    queue.ensure_exists().await?;
    for n in 0..chunks {
        let msg = ChunkMessage {
            v: 1,
            kind: MESSAGE_KIND.into(),
            id: plan.id.clone(),
            chunk: n,
        };
        queue
            .send_text(&serde_json::to_string(&msg).expect("a chunk message serialises"))
            .await?;
    }
    info!(id = %plan.id, chunks, items = total, "restore started: its chunks are queued");
    Ok(status)
}

/// What a chunk's invocation did.
pub enum ChunkOutcome {
    /// Carried out (or done already): the counts of this attempt.
    Done(Box<ExecReport>),
    Malformed(String),
    Retry(String),
}

/// One chunk of a durable restore (`ReconcileWorker`, message kind `restore`).
pub async fn run_chunk(app: &App, text: &str) -> ChunkOutcome {
    let msg: ChunkMessage = match serde_json::from_str(text.trim()) {
        Ok(m) => m,
        Err(e) => return ChunkOutcome::Malformed(format!("not a restore chunk message: {e}")),
    };
    if msg.v != 1 || msg.kind != MESSAGE_KIND || !is_valid_id(&msg.id) {
        return ChunkOutcome::Malformed(format!("unsupported restore chunk message: {text}"));
    }
    let (status, _) = match read_status_doc(app, &msg.id).await {
        Ok(Some(s)) => s,
        // The status is written before any chunk message: missing means not readable yet.
        Ok(None) => return ChunkOutcome::Retry(format!("restore {} has no status", msg.id)),
        Err(e) => return ChunkOutcome::Retry(format!("reading the restore status: {e}")),
    };
    if msg.chunk >= status.chunks {
        return ChunkOutcome::Malformed(format!(
            "chunk {} of restore {} which has {}",
            msg.chunk, msg.id, status.chunks
        ));
    }
    match app
        .backup
        .properties(RESERVED_CONTAINER, &done_blob(&msg.id, msg.chunk), None)
        .await
    {
        Ok(_) => {
            info!(id = %msg.id, chunk = msg.chunk, "restore chunk done already; acknowledged");
            return ChunkOutcome::Done(Box::default());
        }
        Err(e) if e.is_not_found() => {}
        Err(e) => return ChunkOutcome::Retry(format!("reading the chunk record: {e}")),
    }
    let Some(spec) = &status.spec else {
        return ChunkOutcome::Malformed(format!("restore {} has no stored request", msg.id));
    };
    let req = match spec.to_request(app) {
        Ok(r) => r,
        Err(e) => return ChunkOutcome::Malformed(format!("restore {}: {e}", msg.id)),
    };
    let body = match app
        .backup
        .download(RESERVED_CONTAINER, &chunk_blob(&msg.id, msg.chunk), None)
        .await
    {
        Ok(b) => b,
        Err(e) => return ChunkOutcome::Retry(format!("reading chunk {}: {e}", msg.chunk)),
    };
    let mut items = Vec::new();
    for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        match serde_json::from_slice::<PlanItem>(line) {
            Ok(i) => items.push(i),
            Err(e) => return ChunkOutcome::Malformed(format!("chunk {}: {e}", msg.chunk)),
        }
    }
    let n = items.len() as u64;
    let span = tracing::info_span!("restore_chunk", id = %msg.id, chunk = msg.chunk, container = %spec.container);
    let mut exec = ExecReport::default();
    let run = execute_items(
        app,
        &req,
        &msg.id,
        items,
        &super::super::no_progress(),
        &mut exec,
    )
    .instrument(span)
    .await;
    if let Err(e) = run {
        return ChunkOutcome::Retry(format!("chunk {}: {e}", msg.chunk));
    }
    let mut meta = BTreeMap::new();
    for (k, v) in [
        ("lakeguard_items", n),
        ("lakeguard_restored", exec.restored),
        ("lakeguard_overwritten", exec.overwritten),
        ("lakeguard_deleted", exec.deleted),
        ("lakeguard_undo_snapshots", exec.undo_snapshots),
        ("lakeguard_undo_snapshot_copies", exec.undo_snapshot_copies),
        ("lakeguard_undo_records_failed", exec.undo_records_failed),
        ("lakeguard_changed", exec.changed_since_plan),
        ("lakeguard_failed", exec.failed),
    ] {
        meta.insert(k.to_owned(), v.to_string());
    }
    let body = serde_json::to_vec(&exec).expect("an exec report serialises");
    match upload(
        app,
        &done_blob(&msg.id, msg.chunk),
        body,
        &meta,
        &TargetCondition::Absent,
    )
    .await
    {
        Ok(_) => {}
        // Another attempt recorded it first; its items are the same, already carried out.
        Err(e) if crate::ops::state::is_lost_race(&e) => {}
        Err(e) => return ChunkOutcome::Retry(format!("recording chunk {}: {e}", msg.chunk)),
    }
    ChunkOutcome::Done(Box::new(exec))
}
