//! SnapshotProducer (HTTP, forwarded): called as the last activity of a Data Factory pipeline.
//! Parameters `container` (required), `prefix` and `full` (optional), from the query string or a
//! JSON body.

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use tracing::Instrument;

use super::{invocation_id, op_error_response};
use crate::app::App;
use crate::ops::{self, OpError};

#[derive(Debug, Default, Deserialize)]
pub struct Params {
    pub container: Option<String>,
    pub prefix: Option<String>,
    /// `true`: list every snapshot even when a watermark exists.
    pub full: Option<bool>,
}

/// Merges query and body parameters (query wins); a body that is present but not a JSON object is
/// a client error, not something to ignore.
pub fn params(query: Params, body: &[u8]) -> Result<Params, OpError> {
    let body_params = if body.iter().all(u8::is_ascii_whitespace) {
        Params::default()
    } else {
        serde_json::from_slice::<Params>(body).map_err(|e| {
            OpError::InvalidInput(format!(
                "request body is not a JSON object with `container` and `prefix`: {e}"
            ))
        })?
    };
    Ok(Params {
        container: query.container.or(body_params.container),
        prefix: query
            .prefix
            .or(body_params.prefix)
            .filter(|p| !p.is_empty()),
        full: query.full.or(body_params.full),
    })
}

pub async fn handle(
    State(app): State<App>,
    headers: HeaderMap,
    Query(query): Query<Params>,
    body: Bytes,
) -> Response {
    let p = match params(query, &body) {
        Ok(p) => p,
        Err(e) => return op_error_response(&e),
    };
    let Some(container) = p.container.filter(|c| !c.is_empty()) else {
        return op_error_response(&OpError::InvalidInput(
            "parameter `container` is required (query string or JSON body)".into(),
        ));
    };
    let span = tracing::info_span!("SnapshotProducer", invocation_id = %invocation_id(&headers), container = %container);
    let result = ops::snapshot::run_budgeted(
        &app,
        &container,
        p.prefix.as_deref(),
        p.full.unwrap_or(false),
        app.settings.producer_budget,
    )
    .instrument(span)
    .await;
    match result {
        // Out of time: the rest continues through the reconcile continuation queue (any
        // instance). The activity succeeds; `run_id` names the run in the logs.
        Ok(report) if report.continued && report.is_complete() => (
            StatusCode::OK,
            Json(json!({"status": "continued", "run_id": report.run_id, "report": report})),
        )
            .into_response(),
        Ok(report) if report.is_complete() => (
            StatusCode::OK,
            Json(json!({"status": "ok", "report": report})),
        )
            .into_response(),
        // A partial failure fails the pipeline activity visibly; nothing is lost (see ops::snapshot::enqueue).
        Ok(report) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"status": "partial_failure", "report": report})),
        )
            .into_response(),
        Err(e) => op_error_response(&e),
    }
}
