//! Raw Azure Storage REST for tests: an oracle independent of lakeguard's own storage layer.
//!
//! Tests check what lakeguard did by reading Azurite with this code, so a bug in lakeguard's
//! signing, listing or queue code cannot hide itself. Shared Key follows the documented
//! string-to-sign (version 2015-02-21 and later); bearer tokens come from the identity stand-in.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::Method;

/// Storage service version sent by the oracle. Azurite runs with `--skipApiVersionCheck`.
pub const API_VERSION: &str = "2021-12-02";

/// Characters kept as they are in a blob path: RFC 3986 unreserved plus `/`.
const PATH_KEEP: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// Percent-encodes a blob or queue path (keeps `/`), the way SDKs put names into URLs.
pub fn encode_path(path: &str) -> String {
    utf8_percent_encode(path, PATH_KEEP).to_string()
}

#[derive(Clone)]
pub enum Auth {
    /// Account key (base64).
    SharedKey(String),
    /// `Authorization: Bearer <token>` (https only).
    Bearer(String),
    Anonymous,
}

/// An answer: status, headers and the body as text (storage answers are XML or empty).
#[derive(Debug, Clone)]
pub struct RestResponse {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl RestResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
    /// Panics with the status and body unless 2xx.
    pub fn ok(self, what: &str) -> RestResponse {
        assert!(
            self.is_success(),
            "{what}: HTTP {} {}",
            self.status,
            self.text()
        );
        self
    }
}

/// Signed REST calls against one account of one service (`endpoint` = `.../<account>`).
#[derive(Clone)]
pub struct StorageRest {
    client: reqwest::Client,
    endpoint: String,
    account: String,
    auth: Auth,
}

impl StorageRest {
    pub fn new(client: reqwest::Client, endpoint: String, account: &str, auth: Auth) -> Self {
        StorageRest {
            client,
            endpoint: endpoint.trim_end_matches('/').to_string(),
            account: account.to_string(),
            auth,
        }
    }

    pub fn with_auth(&self, auth: Auth) -> Self {
        StorageRest {
            auth,
            ..self.clone()
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Sends a request. `path` is relative to the account and already percent-encoded
    /// (e.g. `/container/dir/a%20b.txt`, or `""` for the account itself). Panics on a transport
    /// error (see `try_send`).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> RestResponse {
        self.try_send(method, path, query, headers, body)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// `send`, with a transport error (connection refused or closed without an answer) returned
    /// instead of a panic: what a test of a fault-injecting proxy observes.
    pub async fn try_send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<RestResponse, String> {
        let mut url = url::Url::parse(&format!("{}{}", self.endpoint, path)).expect("url");
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(
                HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                HeaderValue::from_str(v).expect("header value"),
            );
        }
        map.insert("x-ms-version", HeaderValue::from_static(API_VERSION));
        map.insert(
            "x-ms-date",
            HeaderValue::from_str(&http_date(time::OffsetDateTime::now_utc())).unwrap(),
        );
        match &self.auth {
            Auth::SharedKey(key) => {
                let to_sign = string_to_sign(&method, &url, &map, body.len(), &self.account);
                let sig = azure_core::hmac::hmac_sha256(
                    &to_sign,
                    &azure_core::credentials::Secret::new(key.clone()),
                )
                .expect("hmac");
                map.insert(
                    "authorization",
                    HeaderValue::from_str(&format!("SharedKey {}:{sig}", self.account)).unwrap(),
                );
            }
            Auth::Bearer(token) => {
                map.insert(
                    "authorization",
                    HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
                );
            }
            Auth::Anonymous => {}
        }
        if body.is_empty() && (method == Method::PUT || method == Method::POST) {
            // hyper sends no Content-Length for an empty body; the service requires one on writes.
            map.insert("content-length", HeaderValue::from_static("0"));
        }
        let resp = self
            .client
            .request(method.clone(), url.clone())
            .headers(map)
            .body(body)
            .timeout(Duration::from_secs(120))
            .send()
            .await
            .map_err(|e| format!("{method} {url}: {e}"))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .bytes()
            .await
            .map_err(|e| format!("{method} {url}: reading the body: {e}"))?
            .to_vec();
        Ok(RestResponse {
            status,
            headers,
            body,
        })
    }

    // ----- blob service -----

    pub async fn create_container(&self, container: &str) -> RestResponse {
        self.send(
            Method::PUT,
            &format!("/{container}"),
            &[("restype", "container")],
            &[],
            vec![],
        )
        .await
    }

    /// Put Blob (block blob) with optional user metadata; returns the answer (ETag in headers).
    pub async fn put_blob(
        &self,
        container: &str,
        name: &str,
        data: &[u8],
        metadata: &[(&str, &str)],
    ) -> RestResponse {
        let meta: Vec<(String, &str)> = metadata
            .iter()
            .map(|(k, v)| (format!("x-ms-meta-{k}"), *v))
            .collect();
        let mut headers: Vec<(&str, &str)> = vec![
            ("x-ms-blob-type", "BlockBlob"),
            ("content-type", "application/octet-stream"),
        ];
        headers.extend(meta.iter().map(|(k, v)| (k.as_str(), *v)));
        self.send(
            Method::PUT,
            &format!("/{container}/{}", encode_path(name)),
            &[],
            &headers,
            data.to_vec(),
        )
        .await
    }

    /// Get Blob (optionally a snapshot).
    pub async fn get_blob(
        &self,
        container: &str,
        name: &str,
        snapshot: Option<&str>,
    ) -> RestResponse {
        let query: Vec<(&str, &str)> = snapshot.map(|s| ("snapshot", s)).into_iter().collect();
        self.send(
            Method::GET,
            &format!("/{container}/{}", encode_path(name)),
            &query,
            &[],
            vec![],
        )
        .await
    }

    /// Get Blob Properties (HEAD).
    pub async fn blob_properties(
        &self,
        container: &str,
        name: &str,
        snapshot: Option<&str>,
    ) -> RestResponse {
        let query: Vec<(&str, &str)> = snapshot.map(|s| ("snapshot", s)).into_iter().collect();
        self.send(
            Method::HEAD,
            &format!("/{container}/{}", encode_path(name)),
            &query,
            &[],
            vec![],
        )
        .await
    }

    pub async fn snapshot_blob(&self, container: &str, name: &str) -> RestResponse {
        self.send(
            Method::PUT,
            &format!("/{container}/{}", encode_path(name)),
            &[("comp", "snapshot")],
            &[],
            vec![],
        )
        .await
    }

    /// Delete Blob (`include` deletes its snapshots too).
    pub async fn delete_blob(&self, container: &str, name: &str) -> RestResponse {
        self.send(
            Method::DELETE,
            &format!("/{container}/{}", encode_path(name)),
            &[],
            &[("x-ms-delete-snapshots", "include")],
            vec![],
        )
        .await
    }

    /// One List Blobs call (first page), answer unparsed.
    pub async fn list_blobs_raw(&self, container: &str) -> RestResponse {
        self.send(
            Method::GET,
            &format!("/{container}"),
            &[("restype", "container"), ("comp", "list")],
            &[],
            vec![],
        )
        .await
    }

    /// Lists a whole container (all pages), with snapshots and metadata.
    pub async fn list_blobs(&self, container: &str, prefix: Option<&str>) -> Vec<ListedBlob> {
        let mut out = Vec::new();
        let mut marker = String::new();
        loop {
            let mut query = vec![
                ("restype", "container"),
                ("comp", "list"),
                ("include", "snapshots,metadata"),
            ];
            if let Some(p) = prefix {
                query.push(("prefix", p));
            }
            if !marker.is_empty() {
                query.push(("marker", marker.as_str()));
            }
            let resp = self
                .send(Method::GET, &format!("/{container}"), &query, &[], vec![])
                .await
                .ok("list blobs");
            let xml = resp.text();
            out.extend(
                xml_elements(&xml, "Blob")
                    .iter()
                    .map(|b| ListedBlob::parse(b)),
            );
            marker = xml_text(&xml, "NextMarker").unwrap_or_default();
            if marker.is_empty() {
                return out;
            }
        }
    }

    // ----- queue service -----

    pub async fn delete_queue(&self, queue: &str) -> RestResponse {
        self.send(Method::DELETE, &format!("/{queue}"), &[], &[], vec![])
            .await
    }

    pub async fn create_queue(&self, queue: &str) -> RestResponse {
        self.send(Method::PUT, &format!("/{queue}"), &[], &[], vec![])
            .await
    }

    /// Put Message: `text` is sent as given (callers base64-encode for the Functions trigger).
    pub async fn send_message(&self, queue: &str, text: &str) -> RestResponse {
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?><QueueMessage><MessageText>{}</MessageText></QueueMessage>",
            xml_escape(text)
        );
        self.send(
            Method::POST,
            &format!("/{queue}/messages"),
            &[],
            &[("content-type", "application/xml")],
            body.into_bytes(),
        )
        .await
    }

    /// Get Messages (dequeue) with a visibility timeout. An absent queue gives an empty list.
    pub async fn receive_messages(
        &self,
        queue: &str,
        max: u32,
        visibility_timeout_secs: u32,
    ) -> Vec<QueueMessage> {
        let max = max.to_string();
        let vt = visibility_timeout_secs.to_string();
        let resp = self
            .send(
                Method::GET,
                &format!("/{queue}/messages"),
                &[("numofmessages", &max), ("visibilitytimeout", &vt)],
                &[],
                vec![],
            )
            .await;
        if resp.status == 404 {
            return vec![];
        }
        let resp = resp.ok("get messages");
        xml_elements(&resp.text(), "QueueMessage")
            .iter()
            .map(|m| QueueMessage::parse(m))
            .collect()
    }

    /// Peek Messages (up to 32, no dequeue). An absent queue gives an empty list.
    pub async fn peek_messages(&self, queue: &str) -> Vec<QueueMessage> {
        let resp = self
            .send(
                Method::GET,
                &format!("/{queue}/messages"),
                &[("peekonly", "true"), ("numofmessages", "32")],
                &[],
                vec![],
            )
            .await;
        if resp.status == 404 {
            return vec![];
        }
        let resp = resp.ok("peek messages");
        xml_elements(&resp.text(), "QueueMessage")
            .iter()
            .map(|m| QueueMessage::parse(m))
            .collect()
    }

    pub async fn delete_message(&self, queue: &str, id: &str, pop_receipt: &str) -> RestResponse {
        self.send(
            Method::DELETE,
            &format!("/{queue}/messages/{id}"),
            &[("popreceipt", pop_receipt)],
            &[],
            vec![],
        )
        .await
    }

    /// `x-ms-approximate-messages-count` (exact on an idle Azurite); 0 for an absent queue.
    pub async fn message_count(&self, queue: &str) -> usize {
        let resp = self
            .send(
                Method::GET,
                &format!("/{queue}"),
                &[("comp", "metadata")],
                &[],
                vec![],
            )
            .await;
        if resp.status == 404 {
            return 0;
        }
        resp.ok("queue metadata")
            .header("x-ms-approximate-messages-count")
            .and_then(|v| v.parse().ok())
            .expect("x-ms-approximate-messages-count")
    }
}

/// One entry of a blob listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedBlob {
    pub name: String,
    pub snapshot: Option<String>,
    /// As listed (Azurite lists ETags quoted).
    pub etag: String,
    pub content_length: u64,
    pub metadata: BTreeMap<String, String>,
}

impl ListedBlob {
    fn parse(xml: &str) -> ListedBlob {
        let metadata = xml_element_inner(xml, "Metadata")
            .map(|m| xml_children(&m))
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        ListedBlob {
            name: xml_text(xml, "Name").expect("Name"),
            snapshot: xml_text(xml, "Snapshot").filter(|s| !s.is_empty()),
            etag: xml_text(xml, "Etag").unwrap_or_default(),
            content_length: xml_text(xml, "Content-Length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            metadata,
        }
    }
}

/// One message from Get/Peek Messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueMessage {
    pub id: String,
    /// Empty for peeked messages.
    pub pop_receipt: String,
    /// RFC 1123 times as the service sends them.
    pub insertion_time: String,
    pub expiration_time: String,
    pub time_next_visible: String,
    pub dequeue_count: u32,
    /// The message text as stored (base64 for Functions queues).
    pub text: String,
}

impl QueueMessage {
    fn parse(xml: &str) -> QueueMessage {
        QueueMessage {
            id: xml_text(xml, "MessageId").expect("MessageId"),
            pop_receipt: xml_text(xml, "PopReceipt").unwrap_or_default(),
            insertion_time: xml_text(xml, "InsertionTime").unwrap_or_default(),
            expiration_time: xml_text(xml, "ExpirationTime").unwrap_or_default(),
            time_next_visible: xml_text(xml, "TimeNextVisible").unwrap_or_default(),
            dequeue_count: xml_text(xml, "DequeueCount")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            text: xml_text(xml, "MessageText").unwrap_or_default(),
        }
    }

    /// The text base64-decoded as UTF-8 (what the Functions trigger hands to the function).
    pub fn decoded_text(&self) -> Option<String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(self.text.trim())
            .ok()?;
        String::from_utf8(bytes).ok()
    }
}

/// Shared Key string-to-sign (2015-02-21+): Content-Length is empty when 0.
fn string_to_sign(
    method: &Method,
    url: &url::Url,
    headers: &HeaderMap,
    content_length: usize,
    account: &str,
) -> String {
    let h = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let length = if content_length == 0 {
        String::new()
    } else {
        content_length.to_string()
    };
    let mut ms: Vec<(String, String)> = headers
        .iter()
        .filter(|(k, _)| k.as_str().starts_with("x-ms-"))
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                v.to_str().unwrap_or("").trim().to_string(),
            )
        })
        .collect();
    ms.sort();
    let canonical_headers: String = ms.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let mut resource = format!("/{account}{}", url.path());
    let mut params: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in url.query_pairs() {
        params
            .entry(k.to_ascii_lowercase())
            .or_default()
            .push(v.into_owned());
    }
    for (k, mut vs) in params {
        vs.sort();
        resource.push_str(&format!("\n{k}:{}", vs.join(",")));
    }
    format!(
        "{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}{}",
        method.as_str(),
        h("content-encoding"),
        h("content-language"),
        length,
        h("content-md5"),
        h("content-type"),
        "", // Date: x-ms-date is used instead
        h("if-modified-since"),
        h("if-match"),
        h("if-none-match"),
        h("if-unmodified-since"),
        h("range"),
        canonical_headers,
        resource
    )
}

/// RFC 1123 date, e.g. `Sun, 22 Nov 2026 03:14:32 GMT`.
pub fn http_date(t: time::OffsetDateTime) -> String {
    let f = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    t.to_offset(time::UtcOffset::UTC)
        .format(&f)
        .expect("format date")
}

pub fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

pub fn xml_unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let Some(end) = tail.find(';') else {
            out.push_str(tail);
            return out;
        };
        let entity = &tail[1..end];
        let decoded = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            e if e.starts_with("#x") => u32::from_str_radix(&e[2..], 16)
                .ok()
                .and_then(char::from_u32),
            e if e.starts_with('#') => e[1..].parse().ok().and_then(char::from_u32),
            _ => None,
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &tail[end + 1..];
            }
            None => {
                out.push('&');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The raw inner XML of every `<tag>...</tag>` (or `<tag attr..>`) element, not nested.
pub fn xml_elements(xml: &str, tag: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some((inner, after)) = next_element(rest, tag) {
        out.push(inner);
        rest = after;
    }
    out
}

fn next_element<'a>(xml: &'a str, tag: &str) -> Option<(String, &'a str)> {
    let open = format!("<{tag}");
    let close = format!("</{tag}>");
    let mut search = xml;
    loop {
        let i = search.find(&open)?;
        let after_name = &search[i + open.len()..];
        // Must be exactly this tag (`<Blob>` but not `<Blobs>`).
        match after_name.chars().next() {
            Some('>') | Some(' ') | Some('/') => {}
            _ => {
                search = after_name;
                continue;
            }
        }
        let gt = after_name.find('>')?;
        if after_name[..gt].ends_with('/') {
            return Some((String::new(), &after_name[gt + 1..]));
        }
        let body = &after_name[gt + 1..];
        let end = body.find(&close)?;
        return Some((body[..end].to_string(), &body[end + close.len()..]));
    }
}

fn xml_element_inner(xml: &str, tag: &str) -> Option<String> {
    next_element(xml, tag).map(|(inner, _)| inner)
}

/// Unescaped text of the first `<tag>` element.
pub fn xml_text(xml: &str, tag: &str) -> Option<String> {
    xml_element_inner(xml, tag).map(|s| xml_unescape(&s))
}

/// Direct children `<k>v</k>` of a flat element (e.g. `<Metadata>`).
fn xml_children(xml: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = xml.trim_start();
    while let Some(stripped) = rest.strip_prefix('<') {
        let Some(gt) = stripped.find('>') else { break };
        let name = stripped[..gt].trim_end_matches('/').trim().to_string();
        if stripped[..gt].ends_with('/') {
            out.push((name, String::new()));
            rest = stripped[gt + 1..].trim_start();
            continue;
        }
        let body = &stripped[gt + 1..];
        let close = format!("</{name}>");
        let Some(end) = body.find(&close) else { break };
        out.push((name, xml_unescape(&body[..end])));
        rest = body[end + close.len()..].trim_start();
    }
    out
}
