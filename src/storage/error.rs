//! Storage errors, classified once so that no caller ever has to guess whether an error means
//! "not found", "changed under us", "try again" or "give up".

use azure_core::error::ErrorKind;
use azure_core::http::StatusCode;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A real 404 from the service (blob, snapshot, container or queue does not exist).
    #[error("{what}: not found ({code})")]
    NotFound { what: String, code: String },
    /// 412: a conditional request's ETag no longer matches: someone changed the resource.
    #[error("{what}: changed since it was read (412 {code})")]
    PreconditionFailed { what: String, code: String },
    /// 409 (lease present, snapshots present, being deleted, ...).
    #[error("{what}: conflict (409 {code})")]
    Conflict { what: String, code: String },
    /// Throttling, server errors, timeouts and transport failures: worth another attempt later.
    #[error("{what}: transient failure ({detail})")]
    Retryable { what: String, detail: String },
    /// Anything else (400, 401, 403, ...): repeating it will not help.
    #[error("{what}: failed ({detail})")]
    Permanent { what: String, detail: String },
}

impl StorageError {
    /// Classifies an SDK error. `what` names the operation and resource (never a URL: a URL may
    /// carry a SAS).
    pub fn from_azure(what: impl Into<String>, err: azure_core::Error) -> Self {
        let what = what.into();
        match err.kind() {
            ErrorKind::HttpResponse {
                status, error_code, ..
            } => {
                let code = error_code.clone().unwrap_or_default();
                Self::from_status(what, *status, code)
            }
            ErrorKind::Io | ErrorKind::Connection => StorageError::Retryable {
                what,
                detail: format!("transport: {}", root_message(&err)),
            },
            _ => StorageError::Permanent {
                what,
                detail: root_message(&err),
            },
        }
    }

    pub fn from_status(what: String, status: StatusCode, code: String) -> Self {
        match u16::from(status) {
            404 => StorageError::NotFound { what, code },
            412 => StorageError::PreconditionFailed { what, code },
            409 => StorageError::Conflict { what, code },
            408 | 429 | 500 | 502 | 503 | 504 => StorageError::Retryable {
                what,
                detail: format!("HTTP {} {code}", u16::from(status)),
            },
            s => StorageError::Permanent {
                what,
                detail: format!("HTTP {s} {code}"),
            },
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, StorageError::NotFound { .. })
    }

    pub fn is_precondition_failed(&self) -> bool {
        matches!(self, StorageError::PreconditionFailed { .. })
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self, StorageError::Retryable { .. })
    }

    /// The service error code (`BlobNotFound`, `ContainerNotFound`, `SnapshotsPresent`, ...).
    pub fn code(&self) -> &str {
        match self {
            StorageError::NotFound { code, .. }
            | StorageError::PreconditionFailed { code, .. }
            | StorageError::Conflict { code, .. } => code,
            _ => "",
        }
    }
}

fn root_message(err: &azure_core::Error) -> String {
    // The SDK's messages name operations, not URLs with query strings; keep the chain short. The
    // retry policy wraps what it will not retry (a credential that cannot get a token: `az` not
    // found, not logged in) as "non-transport error occurred which will not be retried": the
    // cause is in the source chain, and an operator needs it.
    let mut msg = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    if msg.len() > 600 {
        let mut end = 600;
        while !msg.is_char_boundary(end) {
            end -= 1;
        }
        msg.truncate(end);
    }
    msg
}
