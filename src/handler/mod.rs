//! `lakeguard serve`: the Azure Functions custom handler.
//!
//! The host starts the binary, waits for any answer to `GET /` (every 25 ms, 30 s), then calls
//! `POST /{FunctionName}` for queue and timer functions and forwards HTTP functions at their
//! original path (`/api/...`, `enableForwardingHttpRequest`). It only ever calls
//! `http://127.0.0.1:{port}`, so that is the only address we bind.

pub mod backup_worker;
pub mod event_backup;
pub mod protocol;
pub mod prune;
pub mod reconcile;
pub mod restore;
pub mod snapshot_producer;

use std::net::{Ipv4Addr, SocketAddr};

use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::app::App;
use crate::ops::OpError;

pub fn router(app: App) -> Router {
    Router::new()
        .route("/", get(|| async { "lakeguard ok" }))
        .route(
            "/api/snapshot",
            get(snapshot_producer::handle).post(snapshot_producer::handle),
        )
        .route("/BackupWorker", post(backup_worker::handle))
        .route("/EventBackup", post(event_backup::handle))
        .route("/api/restore", post(restore::post).get(restore::usage))
        .route("/api/restore/{id}", get(restore::status))
        .route("/Reconcile", post(reconcile::timer))
        .route("/ReconcileWorker", post(reconcile::worker))
        .route("/api/reconcile", get(reconcile::now).post(reconcile::now))
        .route("/Prune", post(prune::timer))
        .route("/api/prune", get(prune::now).post(prune::now))
        .fallback(not_found)
        .with_state(app)
}

async fn not_found(req: Request) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": format!("no function at {} {}", req.method(), req.uri().path())})),
    )
        .into_response()
}

/// Serves on 127.0.0.1:`port` until SIGTERM or Ctrl-C, then finishes in-flight invocations.
pub async fn serve(app: App, port: u16) -> std::io::Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "custom handler listening");
    axum::serve(listener, router(app))
        .with_graceful_shutdown(shutdown_signal())
        .await
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: finishing in-flight invocations");
}

/// The host's invocation id, for spans.
pub fn invocation_id(headers: &HeaderMap) -> String {
    headers
        .get("x-azure-functions-invocationid")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned()
}

/// An operation error as an HTTP answer with a clear JSON message.
pub fn op_error_response(e: &OpError) -> Response {
    let status = match e {
        OpError::InvalidInput(_) => StatusCode::BAD_REQUEST,
        OpError::ContainerNotFound(_) => StatusCode::NOT_FOUND,
        OpError::Storage(s) if s.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
        OpError::Storage(_) => StatusCode::BAD_GATEWAY,
    };
    (status, Json(json!({"error": e.to_string()}))).into_response()
}
