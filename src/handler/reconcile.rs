//! The reconcile functions:
//! - `Reconcile` (timer, non-forwarded): `POST /Reconcile`, binding `timer`. Every covered
//!   container within `LAKEGUARD_RECONCILE_BUDGET_SECS`; the rest is handed over as continuations.
//! - `ReconcileWorker` (queue trigger on `%LAKEGUARD_RECONCILE_QUEUE%`, non-forwarded):
//!   `POST /ReconcileWorker`, binding `msg`. One hop of a container's continuation chain.
//! - `ReconcileNow` (HTTP, forwarded, authLevel admin): `GET|POST /api/reconcile` with optional
//!   `container` and `dry_run`, from the query string or a JSON body.
//!
//! Answers: a run with errors fails the invocation (non-2xx), so monitoring sees it; the report
//! is in the body and in the log line either way. A timer is not retried before its next
//! schedule, and nothing is lost meanwhile (reconcile is a safety net that starts over each time).

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::Instrument;

use super::protocol::{
    decode_text, InvocationRequest, InvocationResponse, QueueMetadata, TimerInfo,
};
use super::{invocation_id, op_error_response};
use crate::app::App;
use crate::ops::reconcile::{self, ContinuationOutcome, RunOptions, HTTP_BUDGET};
use crate::ops::{self, OpError};

/// Binding name of the timer trigger in functions/Reconcile/function.json.
pub const TIMER_BINDING: &str = "timer";
/// Binding name of the queue trigger in functions/ReconcileWorker/function.json.
pub const WORKER_BINDING: &str = "msg";

fn bad_payload(e: serde_json::Error) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(InvocationResponse::with_logs(vec![format!(
            "invalid invocation payload: {e}"
        )])),
    )
        .into_response()
}

/// `POST /Reconcile`.
pub async fn timer(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    let payload: InvocationRequest = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => return bad_payload(e),
    };
    let timer = TimerInfo::from_value(payload.data.get(TIMER_BINDING));
    let span = tracing::info_span!("Reconcile", invocation_id = %invocation_id(&headers));
    async move {
        tracing::info!(
            past_due = timer.is_past_due,
            last = ?timer.last,
            next = ?timer.next,
            "scheduled reconcile"
        );
        let opts = RunOptions {
            container: None,
            dry_run: false,
            budget: Some(app.settings.reconcile_budget),
        };
        match reconcile::run(&app, &opts, ops::no_progress()).await {
            Ok(report) => {
                let status = if report.errors == 0 {
                    StatusCode::OK
                } else {
                    StatusCode::INTERNAL_SERVER_ERROR
                };
                let mut rsp = InvocationResponse::with_logs(vec![report.summary()]);
                rsp.logs.extend(report.error_list.iter().map(|f| {
                    format!(
                        "error: {}/{}: {}",
                        f.container,
                        f.blob.as_deref().unwrap_or(""),
                        f.error
                    )
                }));
                rsp.return_value = serde_json::to_value(&report).ok();
                (status, Json(rsp)).into_response()
            }
            Err(e) => {
                tracing::error!(error = %e, "reconcile failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Json(InvocationResponse::with_logs(vec![format!(
                        "reconcile failed: {e}"
                    )])),
                )
                    .into_response()
            }
        }
    }
    .instrument(span)
    .await
}

/// `POST /ReconcileWorker`.
pub async fn worker(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    let payload: InvocationRequest = match serde_json::from_slice(&body) {
        Ok(p) => p,
        // Not the host's shape: fail so the host retries and finally poisons; never ack blindly.
        Err(e) => return bad_payload(e),
    };
    let meta = QueueMetadata::from_metadata(&payload.metadata);
    let text = payload
        .data
        .get(WORKER_BINDING)
        .and_then(decode_text)
        .unwrap_or_default();
    let span = tracing::info_span!("ReconcileWorker", invocation_id = %invocation_id(&headers));
    async move {
        match reconcile::run_continuation(&app, &text).await {
            ContinuationOutcome::Done(report) => {
                let mut rsp = InvocationResponse::with_logs(vec![report.summary()]);
                rsp.return_value = serde_json::to_value(&report).ok();
                (StatusCode::OK, Json(rsp)).into_response()
            }
            ContinuationOutcome::Prune(report) => {
                let mut rsp = InvocationResponse::with_logs(vec![format!(
                    "prune hop: planned {}, deleted {}, locked {}, failed {}{}",
                    report.planned.data(),
                    report.deleted.data(),
                    report.locked,
                    report.failed,
                    report.refused.as_deref().map(|r| format!("; refused: {r}")).unwrap_or_default()
                )]);
                rsp.return_value = serde_json::to_value(&report).ok();
                (StatusCode::OK, Json(rsp)).into_response()
            }
            ContinuationOutcome::Restore(report) => {
                let mut rsp = InvocationResponse::with_logs(vec![format!(
                    "restore chunk: restored {}, deleted {}, changed {}, failed {}",
                    report.restored, report.deleted, report.changed_since_plan, report.failed
                )]);
                rsp.return_value = serde_json::to_value(&report).ok();
                (StatusCode::OK, Json(rsp)).into_response()
            }
            // A producer hop: its per-blob failures are in the report (the run's watermark is
            // not saved, so the next run lists in full); the message itself is done.
            ContinuationOutcome::Producer(report) => {
                let mut rsp = InvocationResponse::with_logs(vec![format!(
                    "snapshot run {}: scanned {}, enqueued {}, failed {}{}",
                    report.run_id.as_deref().unwrap_or("?"),
                    report.scanned,
                    report.enqueued,
                    report.failed,
                    if report.continued { ", continued" } else { "" }
                )]);
                rsp.return_value = serde_json::to_value(&report).ok();
                (StatusCode::OK, Json(rsp)).into_response()
            }
            ContinuationOutcome::Malformed(reason) => {
                // Can never succeed: poison it now, with the reason, and acknowledge.
                tracing::warn!(%reason, "malformed reconcile continuation; poisoning it");
                let poisoned = match reconcile::reconcile_queue(&app) {
                    Ok(q) => q.poison(&text, &reason, meta.dequeue_count).await,
                    Err(e) => Err(e),
                };
                match poisoned {
                    Ok(()) => (
                        StatusCode::OK,
                        Json(InvocationResponse::with_logs(vec![format!("poisoned: {reason}")])),
                    )
                        .into_response(),
                    Err(e) => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        Json(InvocationResponse::with_logs(vec![format!(
                            "{reason}; and the poison queue failed: {e}"
                        )])),
                    )
                        .into_response(),
                }
            }
            ContinuationOutcome::Retry(e) => {
                tracing::warn!(dequeue_count = meta.dequeue_count, error = %e, "reconcile hop failed; the host will retry");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Json(InvocationResponse::with_logs(vec![format!("retryable failure: {e}")])),
                )
                    .into_response()
            }
        }
    }
    .instrument(span)
    .await
}

/// Parameters of ReconcileNow. `dry_run` may be a JSON boolean or a query-string word.
#[derive(Debug, Default, Deserialize)]
pub struct Params {
    pub container: Option<String>,
    pub dry_run: Option<Value>,
}

fn flag(v: Option<&Value>) -> Result<bool, OpError> {
    match v {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) => match s.trim().to_ascii_lowercase().as_str() {
            "" | "true" | "1" | "yes" => Ok(true),
            "false" | "0" | "no" => Ok(false),
            other => Err(OpError::InvalidInput(format!(
                "`dry_run` must be true or false, not `{other}`"
            ))),
        },
        Some(other) => Err(OpError::InvalidInput(format!(
            "`dry_run` must be true or false, not {other}"
        ))),
    }
}

/// Query parameters (all strings) merged with an optional JSON body; the query wins.
pub fn params(
    query: &std::collections::HashMap<String, String>,
    body: &[u8],
) -> Result<(Option<String>, bool), OpError> {
    let body_params = if body.iter().all(u8::is_ascii_whitespace) {
        Params::default()
    } else {
        serde_json::from_slice::<Params>(body).map_err(|e| {
            OpError::InvalidInput(format!(
                "request body is not a JSON object with `container` and `dry_run`: {e}"
            ))
        })?
    };
    let container = query
        .get("container")
        .cloned()
        .or(body_params.container)
        .filter(|c| !c.is_empty());
    let dry_run = match query.get("dry_run") {
        Some(q) => flag(Some(&Value::String(q.clone())))?,
        None => flag(body_params.dry_run.as_ref())?,
    };
    Ok((container, dry_run))
}

/// `GET|POST /api/reconcile` (forwarded).
pub async fn now(
    State(app): State<App>,
    headers: HeaderMap,
    Query(query): Query<std::collections::HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let (container, dry_run) = match params(&query, &body) {
        Ok(p) => p,
        Err(e) => return op_error_response(&e),
    };
    let span = tracing::info_span!("ReconcileNow", invocation_id = %invocation_id(&headers), container = ?container, dry_run);
    let opts = RunOptions {
        container,
        dry_run,
        budget: Some(app.settings.reconcile_budget.min(HTTP_BUDGET)),
    };
    match reconcile::run(&app, &opts, ops::no_progress())
        .instrument(span)
        .await
    {
        Ok(report) if report.errors == 0 => (
            StatusCode::OK,
            Json(json!({"status": "ok", "report": report})),
        )
            .into_response(),
        Ok(report) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"status": "partial_failure", "report": report})),
        )
            .into_response(),
        Err(e) => op_error_response(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parameters_from_query_or_body() {
        assert_eq!(params(&q(&[]), b"").unwrap(), (None, false));
        assert_eq!(
            params(&q(&[("container", "raw"), ("dry_run", "true")]), b"").unwrap(),
            (Some("raw".into()), true)
        );
        assert_eq!(
            params(&q(&[("dry_run", "")]), b"").unwrap(),
            (None, true),
            "a bare ?dry_run means yes"
        );
        assert_eq!(
            params(&q(&[]), br#"{"container":"raw","dry_run":true}"#).unwrap(),
            (Some("raw".into()), true)
        );
        assert_eq!(
            params(&q(&[("dry_run", "0")]), br#"{"dry_run":true}"#).unwrap(),
            (None, false),
            "the query wins"
        );
        assert!(params(&q(&[("dry_run", "maybe")]), b"").is_err());
        assert!(params(&q(&[]), br#"{"dry_run":3}"#).is_err());
        assert!(params(&q(&[]), b"container=raw").is_err());
    }
}
