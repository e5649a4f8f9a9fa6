//! The prune functions:
//! - `Prune` (timer on `%LAKEGUARD_PRUNE_SCHEDULE%`, non-forwarded): `POST /Prune`, binding
//!   `timer`. Nothing happens unless a retention policy is configured; otherwise each covered
//!   container becomes a continuation hop on `%LAKEGUARD_RECONCILE_QUEUE%` (`ReconcileWorker`).
//! - `PruneNow` (HTTP, forwarded, authLevel admin): `GET|POST /api/prune` with optional
//!   `container`, `max_delete` and `confirm`. Without `confirm` it plans (a dry run, within the
//!   request: large accounts are planned from the CLI); with it, it starts the hops and answers
//!   202 with the run id.

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use tracing::Instrument;

use super::protocol::{InvocationRequest, InvocationResponse};
use super::{invocation_id, op_error_response};
use crate::app::App;
use crate::ops::{self, prune, OpError};

/// `POST /Prune`.
pub async fn timer(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(e) = serde_json::from_slice::<InvocationRequest>(&body) {
        return (
            StatusCode::BAD_REQUEST,
            Json(InvocationResponse::with_logs(vec![format!(
                "invalid invocation payload: {e}"
            )])),
        )
            .into_response();
    }
    let span = tracing::info_span!("Prune", invocation_id = %invocation_id(&headers));
    match prune::run_timer(&app).instrument(span).await {
        Ok(report) => {
            let status = if report.failed == 0 {
                StatusCode::OK
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            let mut rsp = InvocationResponse::with_logs(vec![format!(
                "prune {}: bookkeeping deleted {}, containers handed over {}{}",
                report.run_id,
                report.deleted.bookkeeping,
                report.continuations_queued,
                report
                    .refused
                    .as_deref()
                    .map(|r| format!("; {r}"))
                    .unwrap_or_default()
            )]);
            rsp.return_value = serde_json::to_value(&report).ok();
            (status, Json(rsp)).into_response()
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(InvocationResponse::with_logs(vec![format!(
                "prune failed: {e}"
            )])),
        )
            .into_response(),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Body {
    pub container: Option<String>,
    pub max_delete: Option<u64>,
    #[serde(default)]
    pub confirm: bool,
}

/// `GET|POST /api/prune` (forwarded).
pub async fn now(
    State(app): State<App>,
    headers: HeaderMap,
    Query(query): Query<std::collections::HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let mut b = if body.iter().all(u8::is_ascii_whitespace) {
        Body::default()
    } else {
        match serde_json::from_slice::<Body>(&body) {
            Ok(b) => b,
            Err(e) => {
                return op_error_response(&OpError::InvalidInput(format!(
                "body must be a JSON object {{\"container\"?, \"max_delete\"?, \"confirm\"?}}: {e}"
            )))
            }
        }
    };
    if let Some(c) = query.get("container") {
        b.container = Some(c.clone());
    }
    let span = tracing::info_span!("PruneNow", invocation_id = %invocation_id(&headers), container = ?b.container, confirm = b.confirm);
    async move {
        if !b.confirm {
            let opts = prune::PruneOptions {
                container: b.container.clone(),
                dry_run: true,
                max_delete: b.max_delete,
                policy: None,
            };
            return match prune::run(&app, &opts, ops::no_progress()).await {
                Ok(report) => (
                    StatusCode::OK,
                    Json(json!({"status": "planned", "report": report})),
                )
                    .into_response(),
                Err(e) => op_error_response(&e),
            };
        }
        if b.max_delete.is_some() {
            // The started prune applies LAKEGUARD_PRUNE_MAX_DELETE_PERCENT per hop; a limit the
            // caller sets must not be silently ignored.
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"status": "invalid", "error": "max_delete applies to a planned (dry) prune only; a confirmed prune uses LAKEGUARD_PRUNE_MAX_DELETE_PERCENT (or run `lakeguard prune --max-delete N`)"})),
            )
                .into_response();
        }
        match prune::start(&app, b.container.as_deref()).await {
            Ok(report) => (
                StatusCode::ACCEPTED,
                Json(json!({"status": "started", "run_id": report.run_id, "report": report})),
            )
                .into_response(),
            Err(e) => op_error_response(&e),
        }
    }
    .instrument(span)
    .await
}
