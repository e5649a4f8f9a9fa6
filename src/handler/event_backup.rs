//! EventBackup (queue trigger on `%LAKEGUARD_EVENT_QUEUE%`, non-forwarded): `POST /EventBackup`
//! with the host's payload; the message is a Blob Storage event an Event Grid subscription put
//! on the queue (see `ops::event`).

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tracing::Instrument;

use super::invocation_id;
use super::protocol::{decode_text, InvocationRequest, InvocationResponse, QueueMetadata};
use crate::app::App;
use crate::ops::backup::Retry;
use crate::ops::event;

/// Binding name of the trigger in functions/EventBackup/function.json.
pub const BINDING: &str = "msg";

pub async fn handle(
    State(app): State<App>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let span = tracing::info_span!("EventBackup", invocation_id = %invocation_id(&headers));
    async move {
        let payload: InvocationRequest = match serde_json::from_slice(&body) {
            Ok(p) => p,
            Err(e) => {
                return (
                    StatusCode::BAD_REQUEST,
                    Json(InvocationResponse::with_logs(vec![format!(
                        "invalid invocation payload: {e}"
                    )])),
                )
                    .into_response()
            }
        };
        let meta = QueueMetadata::from_metadata(&payload.metadata);
        let text = payload
            .data
            .get(BINDING)
            .and_then(decode_text)
            .unwrap_or_default();
        let queue = match app
            .clients
            .backup_queue(&app.settings.jobs, &app.settings.event_queue)
        {
            Ok(q) => q,
            Err(e) => {
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Json(InvocationResponse::with_logs(vec![format!(
                        "event queue: {e}"
                    )])),
                )
                    .into_response()
            }
        };
        match event::process_message(&app, &queue, &text, meta.dequeue_count).await {
            Ok(outcomes) => {
                let mut rsp = InvocationResponse::with_logs(
                    outcomes.iter().map(event::EventOutcome::describe).collect(),
                );
                rsp.return_value = serde_json::to_value(&outcomes).ok();
                (StatusCode::OK, Json(rsp)).into_response()
            }
            Err(Retry(e)) => {
                tracing::warn!(dequeue_count = meta.dequeue_count, error = %e, "event failed; the host will retry");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Json(InvocationResponse::with_logs(vec![format!(
                        "retryable failure: {e}"
                    )])),
                )
                    .into_response()
            }
        }
    }
    .instrument(span)
    .await
}
