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
    // cause is in the source chain, and an operator needs it. A transport error's text names the
    // request URL, whose query may carry a SAS (`sig=`): every URL loses its query.
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
    let mut msg = without_query_strings(&msg);
    if msg.len() > 600 {
        let mut end = 600;
        while !msg.is_char_boundary(end) {
            end -= 1;
        }
        msg.truncate(end);
    }
    msg
}

/// `text` with the query string of every http(s) URL in it replaced by `?…`.
fn without_query_strings(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("http") {
        let (before, url) = rest.split_at(at);
        out.push_str(before);
        let end = url
            .find(|c: char| c.is_whitespace() || matches!(c, ')' | '"' | '\'' | '>'))
            .unwrap_or(url.len());
        let (url, after) = url.split_at(end);
        match url.find('?') {
            Some(q) => {
                out.push_str(&url[..q]);
                out.push_str("?…");
            }
            None => out.push_str(url),
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A transport error names the URL it was sending to; with a SAS connection that URL carries
    /// the signature, and the error text reaches logs and reports.
    #[test]
    fn transport_errors_never_carry_a_query_string() {
        let io = std::io::Error::other(
            "error sending request for url (https://acct.blob.core.windows.net/c/a%20b?sv=2024&sig=S3CRET%3D&se=x): connection reset",
        );
        let err = azure_core::Error::with_error(ErrorKind::Io, io, "send");
        let text = StorageError::from_azure("get blob c/a b", err).to_string();
        assert!(!text.contains("S3CRET"), "{text}");
        assert!(!text.contains("sv=2024"), "{text}");
        assert!(
            text.contains("https://acct.blob.core.windows.net/c/a%20b?…"),
            "{text}"
        );
        assert!(text.contains("connection reset"), "{text}");
        assert_eq!(without_query_strings("no url here"), "no url here");
        assert_eq!(
            without_query_strings("a http://h/p?q=1 b https://h2/x"),
            "a http://h/p?… b https://h2/x"
        );
    }
}
