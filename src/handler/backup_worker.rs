//! BackupWorker (queue trigger, non-forwarded): `POST /BackupWorker` with the host's payload.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tracing::Instrument;

use super::invocation_id;
use super::protocol::{decode_text, InvocationRequest, InvocationResponse, QueueMetadata};
use crate::app::App;
use crate::ops::backup::{self, Retry};

/// Binding name of the trigger in functions/BackupWorker/function.json.
pub const BINDING: &str = "msg";

pub async fn handle(State(app): State<App>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let invocation = invocation_id(&headers);
    let span = tracing::info_span!("BackupWorker", invocation_id = %invocation);
    async move {
        let payload: InvocationRequest = match serde_json::from_slice(&body) {
            Ok(p) => p,
            // Not the host's shape at all: fail the invocation so the host retries and finally
            // poisons the message itself; never acknowledge what we could not read.
            Err(e) => {
                return (StatusCode::BAD_REQUEST, Json(InvocationResponse::with_logs(vec![format!("invalid invocation payload: {e}")])))
                    .into_response()
            }
        };
        let meta = QueueMetadata::from_metadata(&payload.metadata);
        let text = payload.data.get(BINDING).and_then(decode_text).unwrap_or_default();
        match backup::process_message(&app, &text, meta.dequeue_count).await {
            Ok(outcome) => {
                let line = outcome.describe();
                tracing::info!(dequeue_count = meta.dequeue_count, "{line}");
                let mut rsp = InvocationResponse::with_logs(vec![line]);
                rsp.return_value = serde_json::to_value(&outcome).ok();
                (StatusCode::OK, Json(rsp)).into_response()
            }
            Err(Retry(e)) => {
                tracing::warn!(dequeue_count = meta.dequeue_count, error = %e, "backup failed; the host will retry");
                (StatusCode::INTERNAL_SERVER_ERROR, Json(InvocationResponse::with_logs(vec![format!("retryable failure: {e}")])))
                    .into_response()
            }
        }
    }
    .instrument(span)
    .await
}
