//! A loopback HTTP reverse proxy that counts requests, in front of Azurite's blob (or queue)
//! service. Used to prove request budgets, e.g. "a no-op reconcile makes listing calls only".
//!
//! It forwards every request VERBATIM: same method, same request target (no re-encoding of the
//! path: a re-encoded path would break Shared Key signatures and change blob names), same headers
//! including `Host` (Azurite compares a copy source's host with the request's host, and both then
//! name the proxy). Plain HTTP only (`Mode::SharedKeyHttp`); in HTTPS mode count with Azurite's
//! access log instead (`Azurite::blob_requests`), which sees the same requests.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::TokioIo;

use super::BackgroundServer;

/// One forwarded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxiedRequest {
    pub method: String,
    /// Request target as received (encoded path + query).
    pub target: String,
    /// Upstream status, or 502 when the upstream could not be reached.
    pub status: u16,
    /// Tells lakeguard's requests from Azurite's own (it reads a copy source with axios).
    pub user_agent: String,
}

impl ProxiedRequest {
    pub fn query(&self, name: &str) -> Option<String> {
        let q = self.target.split_once('?')?.1;
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.into_owned())
    }
    pub fn comp(&self) -> Option<String> {
        self.query("comp")
    }
    pub fn restype(&self) -> Option<String> {
        self.query("restype")
    }
    /// Made by Azurite itself (the copy-source read of a Copy Blob From URL), not by lakeguard.
    pub fn is_azurite_self(&self) -> bool {
        self.user_agent.starts_with("axios")
    }
    pub fn is_list_blobs(&self) -> bool {
        self.method == "GET"
            && self.restype().as_deref() == Some("container")
            && self.comp().as_deref() == Some("list")
    }
}

/// Which requests to answer instead of forwarding, how many more times, and with what (status
/// and `x-ms-error-code`).
type Fault = (
    Box<dyn Fn(&str, &str) -> bool + Send + Sync>,
    usize,
    (StatusCode, &'static str),
);

struct Shared {
    upstream: SocketAddr,
    log: Mutex<Vec<ProxiedRequest>>,
    fault: Mutex<Option<Fault>>,
}

/// The proxy; stops on drop.
pub struct CountingProxy {
    shared: Arc<Shared>,
    server: BackgroundServer,
}

impl CountingProxy {
    /// Proxies `127.0.0.1:<free port>` to `127.0.0.1:<upstream_port>`.
    pub fn start(upstream_port: u16) -> CountingProxy {
        let shared = Arc::new(Shared {
            upstream: SocketAddr::from(([127, 0, 0, 1], upstream_port)),
            log: Mutex::new(Vec::new()),
            fault: Mutex::new(None),
        });
        let app = Router::new()
            .fallback(forward)
            .with_state(Arc::clone(&shared));
        CountingProxy {
            shared,
            server: BackgroundServer::start(app),
        }
    }

    pub fn port(&self) -> u16 {
        self.server.addr().port()
    }

    /// `http://127.0.0.1:<proxy port>/<account>`: use it instead of Azurite's blob endpoint.
    pub fn endpoint(&self, account: &str) -> String {
        format!("http://127.0.0.1:{}/{account}", self.port())
    }

    pub fn requests(&self) -> Vec<ProxiedRequest> {
        self.shared.log.lock().unwrap().clone()
    }

    /// Answers the next `times` requests for which `matches(method, target)` holds with
    /// `503 ServerBusy` (not forwarded), as a throttled service would.
    pub fn fail_next(
        &self,
        times: usize,
        matches: impl Fn(&str, &str) -> bool + Send + Sync + 'static,
    ) {
        self.answer_next(
            times,
            StatusCode::SERVICE_UNAVAILABLE,
            "ServerBusy",
            matches,
        );
    }

    /// Answers the next `times` matching requests with `status` and `x-ms-error-code: code`
    /// (e.g. 409 `BlobImmutableDueToPolicy`, which the emulator cannot produce), not forwarded.
    pub fn answer_next(
        &self,
        times: usize,
        status: StatusCode,
        code: &'static str,
        matches: impl Fn(&str, &str) -> bool + Send + Sync + 'static,
    ) {
        *self.shared.fault.lock().unwrap() = Some((Box::new(matches), times, (status, code)));
    }

    /// Forgets everything counted so far (e.g. after a set-up phase).
    pub fn reset(&self) {
        self.shared.log.lock().unwrap().clear();
    }

    /// Requests with this method and `comp` value (`None` = no `comp` parameter).
    pub fn count(&self, method: &str, comp: Option<&str>) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.method == method && r.comp().as_deref() == comp)
            .count()
    }

    /// Counts grouped by `"METHOD comp=<c> restype=<r>"`, for readable assertion messages.
    pub fn summary(&self) -> std::collections::BTreeMap<String, usize> {
        let mut out = std::collections::BTreeMap::new();
        for r in self.requests() {
            let key = format!(
                "{} comp={} restype={}",
                r.method,
                r.comp().unwrap_or_default(),
                r.restype().unwrap_or_default()
            );
            *out.entry(key).or_insert(0) += 1;
        }
        out
    }
}

async fn forward(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let method = req.method().to_string();
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());
    let user_agent = req
        .headers()
        .get(axum::http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let record = |status: u16| {
        shared.log.lock().unwrap().push(ProxiedRequest {
            method: method.clone(),
            target: target.clone(),
            status,
            user_agent: user_agent.clone(),
        });
    };
    let injected = {
        let mut fault = shared.fault.lock().unwrap();
        match fault.as_mut() {
            Some((matches, left, answer)) if *left > 0 && matches(&method, &target) => {
                *left -= 1;
                Some(*answer)
            }
            _ => None,
        }
    };
    if let Some((status, code)) = injected {
        record(status.as_u16());
        return (
            status,
            [("x-ms-error-code", code)],
            "injected by the test proxy",
        )
            .into_response();
    }
    let upstream = match tokio::net::TcpStream::connect(shared.upstream).await {
        Ok(s) => s,
        Err(e) => {
            record(502);
            return (StatusCode::BAD_GATEWAY, format!("proxy: connect: {e}")).into_response();
        }
    };
    let (mut sender, conn) =
        match hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await {
            Ok(x) => x,
            Err(e) => {
                record(502);
                return (StatusCode::BAD_GATEWAY, format!("proxy: handshake: {e}")).into_response();
            }
        };
    tokio::spawn(conn);
    let (mut parts, body) = req.into_parts();
    // Origin-form target exactly as received.
    parts.uri = target.parse::<Uri>().expect("origin-form uri");
    let out = hyper::Request::from_parts(parts, body);
    match sender.send_request(out).await {
        Ok(resp) => {
            record(resp.status().as_u16());
            resp.map(Body::new)
        }
        Err(e) => {
            record(502);
            (StatusCode::BAD_GATEWAY, format!("proxy: {e}")).into_response()
        }
    }
}
