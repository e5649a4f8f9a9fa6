//! The status document of a restore started over HTTP.

use super::*;

/// The state of a restore started over HTTP, kept as `lakeguard-restores/<id>/status.json` in
/// the backup account so that any instance can answer `GET /api/restore/{id}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestoreStatus {
    pub id: String,
    /// `running`, `succeeded` (complete), `incomplete` (done, but something failed, changed or
    /// was unavailable: see the report), `failed` (the operation itself failed: see `error`).
    pub state: String,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    /// A `running` status whose `updated_at` stops moving belongs to a process that died: run
    /// the same restore again, it continues where that one stopped.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    pub request: RequestInfo,
    pub plan: PlanSummary,
    /// Actionable items carried out so far (updated every few seconds while running) and in all.
    pub done: u64,
    pub total: u64,
    pub report: Option<RestoreReport>,
    pub error: Option<String>,
}

/// Counts items for the status document of a background restore.
#[derive(Default)]
struct Counter {
    total: std::sync::atomic::AtomicU64,
    done: std::sync::atomic::AtomicU64,
}

impl Progress for Counter {
    fn add_total(&self, n: u64) {
        self.total
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
    fn inc(&self, n: u64) {
        self.done.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How often a background restore refreshes its status document.
const STATUS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

fn status_blob(id: &str) -> String {
    format!("{id}/status.json")
}

pub async fn write_status(app: &App, status: &RestoreStatus) -> Result<(), StorageError> {
    app.backup.ensure_container(RESERVED_CONTAINER).await?;
    let body = serde_json::to_vec_pretty(status).map_err(|e| StorageError::Permanent {
        what: "restore status".into(),
        detail: e.to_string(),
    })?;
    app.backup
        .upload(
            RESERVED_CONTAINER,
            &status_blob(&status.id),
            body,
            Some("application/json"),
            &BTreeMap::new(),
        )
        .await?;
    Ok(())
}

/// The status of restore `id`; `None` when there is no such restore (a real 404 only).
pub async fn read_status(app: &App, id: &str) -> Result<Option<RestoreStatus>, StorageError> {
    if !is_valid_id(id) {
        return Ok(None);
    }
    match app
        .backup
        .download(RESERVED_CONTAINER, &status_blob(id), None)
        .await
    {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| StorageError::Permanent {
                    what: format!("restore status {id}"),
                    detail: e.to_string(),
                })
        }
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Starts executing an already computed, already authorised plan in the background (HTTP
/// `Restore` with `confirm`), recording its progress in the status document. Returns the
/// initial status once it is stored.
pub async fn start_background(
    app: App,
    req: RestoreRequest,
    mut plan: Plan,
) -> Result<RestoreStatus, StorageError> {
    let now = OffsetDateTime::now_utc();
    let status = RestoreStatus {
        id: plan.id.clone(),
        state: "running".into(),
        started_at: now,
        updated_at: now,
        request: plan.info.clone(),
        plan: plan.summary.clone(),
        done: 0,
        total: 0,
        report: None,
        error: None,
    };
    write_status(&app, &status).await?;
    let initial = status.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let mut status = status;
        let counter = Arc::new(Counter::default());
        let result = {
            let run = execute(&app, &req, &mut plan, counter.clone());
            tokio::pin!(run);
            let mut tick = tokio::time::interval(STATUS_EVERY);
            tick.tick().await;
            loop {
                tokio::select! {
                    r = &mut run => break r,
                    _ = tick.tick() => {
                        status.done = counter.done.load(std::sync::atomic::Ordering::Relaxed);
                        status.total = counter.total.load(std::sync::atomic::Ordering::Relaxed);
                        status.updated_at = OffsetDateTime::now_utc();
                        if let Err(e) = write_status(&app, &status).await {
                            warn!(id = %status.id, error = %e, "could not update the restore status");
                        }
                    }
                }
            }
        };
        status.done = counter.done.load(std::sync::atomic::Ordering::Relaxed);
        status.total = counter.total.load(std::sync::atomic::Ordering::Relaxed);
        match result {
            Ok(exec) => {
                let report = RestoreReport {
                    id: plan.id.clone(),
                    request: plan.info.clone(),
                    plan: plan.summary.clone(),
                    history: plan.history.clone(),
                    items: std::mem::take(&mut plan.items),
                    items_truncated: plan.items_truncated,
                    executed: true,
                    refused: None,
                    execution: Some(exec),
                    elapsed_ms: started.elapsed().as_millis(),
                };
                status.state = if report.is_complete() {
                    "succeeded"
                } else {
                    "incomplete"
                }
                .into();
                status.report = Some(report);
            }
            Err(e) => {
                status.state = "failed".into();
                status.error = Some(e.to_string());
            }
        }
        status.updated_at = OffsetDateTime::now_utc();
        if let Err(e) = write_status(&app, &status).await {
            warn!(id = %status.id, error = %e, "could not store the final restore status");
        }
    });
    Ok(initial)
}
