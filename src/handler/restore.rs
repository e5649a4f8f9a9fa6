//! Restore (HTTP, forwarded, authLevel admin: the host checks the admin key before forwarding).
//!
//! `POST /api/restore` with a JSON body
//! `{"container", "at", "prefix"?, "from"?: "backup"|"backup-only"|"snapshots", "to_account"?, "to_container"?,
//!   "confirm"?: bool, "force"?: bool}`:
//! - without `"confirm": true` it only plans (a dry run) and answers 200 with the plan;
//! - with it, the plan is checked like the CLI does (in place needs `"force": true`; another
//!   target needs it when something there would be overwritten; refusal = 409 with the plan),
//!   then carried out in the background: 202 with `id` and `status_url`.
//!
//! `GET /api/restore/{id}` answers the status document that the run keeps in the backup account
//! (`lakeguard-restores/<id>/status.json`), so any instance can answer it, even after a restart.
//!
//! `to_account` is the *name* of a connection configured in the app settings (e.g.
//! `DrStorage` with `DrStorage__blobServiceUri`), never a connection string: secrets do not
//! travel in request bodies. The plan is computed inside the request, so it must fit in the
//! host's 230 s HTTP limit; very large containers are restored with the CLI.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use tracing::Instrument;

use super::{invocation_id, op_error_response};
use crate::app::App;
use crate::core::restore::HistoryFrom;
use crate::ops::restore::{self as op, RestoreRequest, RestoreSpec};
use crate::ops::OpError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Body {
    pub container: String,
    pub at: String,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub to_account: Option<String>,
    #[serde(default)]
    pub to_container: Option<String>,
    #[serde(default)]
    pub confirm: bool,
    #[serde(default)]
    pub force: bool,
}

fn request(app: &App, body: &[u8]) -> Result<(RestoreRequest, RestoreSpec, bool), OpError> {
    let b: Body = serde_json::from_slice(body).map_err(|e| {
        OpError::InvalidInput(format!(
            "body must be a JSON object {{\"container\", \"at\", \"prefix\"?, \"from\"?, \"to_account\"?, \"to_container\"?, \"confirm\"?, \"force\"?}}: {e}"
        ))
    })?;
    let at = crate::model::metadata::parse_time(&b.at).ok_or_else(|| {
        OpError::InvalidInput(format!("`at` = `{}` is not an RFC 3339 time", b.at))
    })?;
    let from = match b.from.as_deref() {
        None | Some("backup") => HistoryFrom::Backup,
        Some("backup-only") => HistoryFrom::BackupOnly,
        Some("snapshots") => HistoryFrom::SourceSnapshots,
        Some(other) => {
            return Err(OpError::InvalidInput(format!(
                "`from` = `{other}`: use `backup`, `backup-only` or `snapshots`"
            )))
        }
    };
    let spec = RestoreSpec {
        container: b.container,
        at,
        prefix: b.prefix,
        from,
        to_account: b.to_account,
        to_container: b.to_container,
        force: b.force,
    };
    let mut req = spec.to_request(app)?;
    req.dry_run = !b.confirm;
    Ok((req, spec, b.confirm))
}

pub async fn post(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    let (req, spec, confirm) = match request(&app, &body) {
        Ok(r) => r,
        Err(e) => return op_error_response(&e),
    };
    let span = tracing::info_span!("Restore", invocation_id = %invocation_id(&headers), container = %req.container, confirm);
    async move {
        if !confirm {
            return match op::run(&app, &req, crate::ops::no_progress()).await {
                Ok(report) => (StatusCode::OK, Json(json!(report))).into_response(),
                Err(e) => op_error_response(&e),
            };
        }
        let plan = match op::plan(&app, &req).await {
            Ok(p) => p,
            Err(e) => return op_error_response(&e),
        };
        if let Some(why) = op::refusal(&plan, req.force) {
            return (
                StatusCode::CONFLICT,
                Json(json!({
                    "id": plan.id, "request": plan.info, "plan": plan.summary, "history": plan.history,
                    "items": plan.items, "items_truncated": plan.items_truncated,
                    "executed": false, "refused": why,
                })),
            )
                .into_response();
        }
        let (id, summary, items) = (plan.id.clone(), plan.summary.clone(), plan.items.clone());
        // Durable: the plan goes to the backup account in chunks, the queue carries them out
        // (any instance, surviving this one); nothing runs after this answer.
        match op::start_durable(&app, spec, plan).await {
            Ok(status) => (
                StatusCode::ACCEPTED,
                Json(json!({
                    "id": id,
                    "state": status.state,
                    "status_url": format!("/api/restore/{id}"),
                    "plan": summary,
                    "items": items,
                })),
            )
                .into_response(),
            Err(e) => op_error_response(&OpError::Storage(e)),
        }
    }
    .instrument(span)
    .await
}

pub async fn status(State(app): State<App>, Path(id): Path<String>) -> Response {
    match op::read_status(&app, &id).await {
        Ok(Some(s)) => (StatusCode::OK, Json(json!(s))).into_response(),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("no restore with id `{id}`")})),
        )
            .into_response(),
        Err(e) => op_error_response(&OpError::Storage(e)),
    }
}

pub async fn usage() -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": "POST /api/restore with {\"container\", \"at\", ...} plans a restore (add \"confirm\": true to run it); GET /api/restore/{id} follows one"})),
    )
        .into_response()
}
