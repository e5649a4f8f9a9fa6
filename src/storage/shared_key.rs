//! Shared Key authorisation as an `azure_core` pipeline policy.
//!
//! The official crates only speak Entra ID bearer tokens, but connection strings (and
//! `UseDevelopmentStorage=true`) need Shared Key. The policy sits last among the per-try policies
//! so that every header it signs is final, and runs on every try so that `x-ms-date` is fresh.
//! Reference: "Authorize with Shared Key" (Blob, Queue; version 2009-09-19 and later).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use azure_core::credentials::Secret;
use azure_core::http::policies::{Policy, PolicyResult};
use azure_core::http::{Context, Request};
use time::format_description::well_known::Rfc2822;
use time::OffsetDateTime;

#[derive(Clone)]
pub struct SharedKeyPolicy {
    account: String,
    key: Secret,
}

impl std::fmt::Debug for SharedKeyPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedKeyPolicy {{ account: {} }}", self.account)
    }
}

impl SharedKeyPolicy {
    pub fn new(account: impl Into<String>, key: Secret) -> Self {
        Self { account: account.into(), key }
    }
}

#[async_trait]
impl Policy for SharedKeyPolicy {
    async fn send(&self, ctx: &Context, request: &mut Request, next: &[Arc<dyn Policy>]) -> PolicyResult {
        request.insert_header("x-ms-date", http_date(OffsetDateTime::now_utc()));
        let content_length = request.body().len().unwrap_or(0);
        let string_to_sign = string_to_sign(&self.account, request, content_length);
        let signature = azure_core::hmac::hmac_sha256(&string_to_sign, &self.key)?;
        request.insert_header("authorization", format!("SharedKey {}:{}", self.account, signature));
        next[0].send(ctx, request, &next[1..]).await
    }
}

/// RFC 1123 date in GMT, as the service requires (`Sun, 22 Nov 2026 03:08:15 GMT`).
pub fn http_date(t: OffsetDateTime) -> String {
    // Rfc2822 prints "+0000"; the service wants the literal "GMT".
    let s = t.to_offset(time::UtcOffset::UTC).format(&Rfc2822).unwrap_or_default();
    s.replace(" +0000", " GMT")
}

fn string_to_sign(account: &str, request: &Request, content_length: u64) -> String {
    let headers = request.headers();
    let h = |name: &'static str| -> String {
        headers
            .get_optional_str(&azure_core::http::headers::HeaderName::from_static(name))
            .unwrap_or("")
            .to_owned()
    };
    // Content-Length must be empty, not "0", for an empty body (versions 2015-02-21 and later).
    let length = if content_length == 0 { String::new() } else { content_length.to_string() };
    let mut canonical_headers = BTreeMap::new();
    for (name, value) in headers.iter() {
        let name = name.as_str().to_ascii_lowercase();
        if name.starts_with("x-ms-") {
            canonical_headers.insert(name, value.as_str().trim().to_owned());
        }
    }
    let mut out = String::new();
    for part in [
        request.method().as_ref().to_owned(),
        h("content-encoding"),
        h("content-language"),
        length,
        h("content-md5"),
        h("content-type"),
        String::new(), // Date: we always send x-ms-date instead
        h("if-modified-since"),
        h("if-match"),
        h("if-none-match"),
        h("if-unmodified-since"),
        h("range"),
    ] {
        out.push_str(&part);
        out.push('\n');
    }
    for (k, v) in canonical_headers {
        out.push_str(&k);
        out.push(':');
        out.push_str(&v);
        out.push('\n');
    }
    out.push_str(&canonical_resource(account, request.url()));
    out
}

/// `/{account}{path}` plus each query parameter, lower-cased name, values sorted and
/// comma-joined. The path is taken as sent (percent-encoded), which is what the service signs;
/// for the emulator's path-style URLs it already starts with `/{account}`, giving the documented
/// `/{account}/{account}/container/blob` form.
fn canonical_resource(account: &str, url: &url::Url) -> String {
    let mut out = format!("/{}{}", account, url.path());
    let mut params: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in url.query_pairs() {
        params.entry(k.to_ascii_lowercase()).or_default().push(v.into_owned());
    }
    for (k, mut values) in params {
        values.sort();
        out.push('\n');
        out.push_str(&k);
        out.push(':');
        out.push_str(&values.join(","));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use azure_core::http::Method;

    #[test]
    fn date_format_is_rfc1123_gmt() {
        let t = time::macros::datetime!(2026-11-22 03:08:15 UTC);
        assert_eq!(http_date(t), "Sun, 22 Nov 2026 03:08:15 GMT");
    }

    #[test]
    fn canonical_resource_emulator_and_query() {
        let url = url::Url::parse("http://127.0.0.1:10000/devstoreaccount1/raw?restype=container&comp=list&include=snapshots,metadata").unwrap();
        assert_eq!(
            canonical_resource("devstoreaccount1", &url),
            "/devstoreaccount1/devstoreaccount1/raw\ncomp:list\ninclude:snapshots,metadata\nrestype:container"
        );
    }

    #[test]
    fn string_to_sign_layout() {
        let url = url::Url::parse("https://acct.blob.core.windows.net/c/a%20b?comp=snapshot").unwrap();
        let mut req = Request::new(url, Method::Put);
        req.insert_header("x-ms-version", "2025-01-05");
        req.insert_header("x-ms-date", "Sun, 22 Nov 2026 03:08:15 GMT");
        req.insert_header("if-match", "\"0x1\"");
        let s = string_to_sign("acct", &req, 0);
        assert_eq!(
            s,
            "PUT\n\n\n\n\n\n\n\n\"0x1\"\n\n\n\nx-ms-date:Sun, 22 Nov 2026 03:08:15 GMT\nx-ms-version:2025-01-05\n/acct/c/a%20b\ncomp:snapshot"
        );
    }
}
