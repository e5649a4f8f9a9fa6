//! Stand-in for the App Service / Functions managed identity endpoint (`IDENTITY_ENDPOINT`).
//!
//! Contract (App Service "2019-08-01" protocol, and what azure_identity 1.0's
//! `ManagedIdentityCredential` sends, read from its source):
//! `GET {IDENTITY_ENDPOINT}?api-version=2019-08-01&resource=<uri>[&client_id=<id>]` with header
//! `X-IDENTITY-HEADER: {IDENTITY_HEADER}` (the crate also sends `metadata: true`). The answer is
//! `{"access_token","expires_on" (unix seconds AS A STRING),"resource","token_type","client_id"}`.
//! A scope (`https://storage.azure.com/.default`) must have been turned into a resource
//! (`https://storage.azure.com`) by the client; the stand-in rejects a scope, an unknown parameter,
//! a missing/wrong secret, a wrong api-version or a client id that is not assigned, records each
//! violation, and counts every request per resource and client id so tests can prove caching.
//!
//! Tokens are unsigned JWTs (`alg: none`) that Azurite 3.37's `--oauth basic` accepts: it checks
//! `iss` starts with `https://sts.windows.net/`, `aud` is `https://storage.azure.com`, and
//! `nbf <= now <= exp` (with `iat` present); it does not verify signatures.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine;
use serde_json::json;

use super::BackgroundServer;

/// The api-version App Service's identity endpoint speaks (and azure_identity sends).
pub const API_VERSION: &str = "2019-08-01";
/// Path of the endpoint, as on App Service (`http://localhost:8081/msi/token`).
pub const TOKEN_PATH: &str = "/msi/token";
/// Tenant id put in every token.
pub const TENANT_ID: &str = "72f988bf-0000-4000-8000-00000000beef";
/// Client id of the system-assigned identity.
pub const SYSTEM_CLIENT_ID: &str = "5b1d3c7e-0000-4000-8000-0000000005a1";
/// Resource of Azure Storage tokens.
pub const STORAGE_RESOURCE: &str = "https://storage.azure.com";
/// Resource of Azure Resource Manager tokens (Data Factory REST).
pub const MANAGEMENT_RESOURCE: &str = "https://management.azure.com";

/// One request that reached the stand-in.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub resource: Option<String>,
    pub client_id: Option<String>,
    /// HTTP status the stand-in answered.
    pub status: u16,
}

#[derive(Default)]
struct StateInner {
    requests: Vec<TokenRequest>,
    violations: Vec<String>,
    issued: Vec<String>,
    fail_next: VecDeque<u16>,
    assigned_client_ids: Option<Vec<String>>,
}

struct Shared {
    secret: String,
    lifetime: Duration,
    inner: Mutex<StateInner>,
}

/// A running identity endpoint on `127.0.0.1:<free port>`, served from its own thread (so it
/// answers even while a test blocks). Stops on drop.
pub struct IdentityServer {
    shared: Arc<Shared>,
    server: BackgroundServer,
}

impl IdentityServer {
    /// Starts with a random secret, tokens valid for one hour, any client id accepted.
    pub fn start() -> IdentityServer {
        Self::start_with(Duration::from_secs(3600), None)
    }

    /// `lifetime` of issued tokens; `assigned_client_ids` = the user-assigned identities this
    /// "app" has (others get 400 like App Service); `None` accepts any client id.
    pub fn start_with(
        lifetime: Duration,
        assigned_client_ids: Option<Vec<String>>,
    ) -> IdentityServer {
        let shared = Arc::new(Shared {
            secret: format!("identity-header-{}", super::unique_suffix()),
            lifetime,
            inner: Mutex::new(StateInner {
                assigned_client_ids,
                ..Default::default()
            }),
        });
        let app = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&shared));
        let server = BackgroundServer::start(app);
        IdentityServer { shared, server }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// Value for `IDENTITY_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}{TOKEN_PATH}", self.server.addr())
    }

    /// Value for `IDENTITY_HEADER`.
    pub fn header_secret(&self) -> String {
        self.shared.secret.clone()
    }

    /// `IDENTITY_ENDPOINT` and `IDENTITY_HEADER` as env pairs.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("IDENTITY_ENDPOINT".to_string(), self.endpoint()),
            ("IDENTITY_HEADER".to_string(), self.header_secret()),
        ]
    }

    /// Requests (valid or not) that asked for `resource` (compared without a trailing slash).
    pub fn requests_for(&self, resource: &str) -> usize {
        let want = resource.trim_end_matches('/');
        self.requests()
            .iter()
            .filter(|r| r.resource.as_deref().map(|s| s.trim_end_matches('/')) == Some(want))
            .count()
    }

    /// Distinct client ids seen (`None` = system-assigned), with request counts.
    pub fn client_ids_seen(&self) -> BTreeMap<Option<String>, usize> {
        let mut out = BTreeMap::new();
        for r in self.requests() {
            *out.entry(r.client_id.clone()).or_insert(0) += 1;
        }
        out
    }

    pub fn requests(&self) -> Vec<TokenRequest> {
        self.shared.inner.lock().unwrap().requests.clone()
    }

    /// Every contract violation seen so far (empty = the client behaved).
    pub fn violations(&self) -> Vec<String> {
        self.shared.inner.lock().unwrap().violations.clone()
    }

    pub fn assert_no_violations(&self) {
        let v = self.violations();
        assert!(
            v.is_empty(),
            "identity endpoint contract violations: {v:#?}"
        );
    }

    /// Every access token handed out (tests check none of them appears in logs).
    pub fn issued_tokens(&self) -> Vec<String> {
        self.shared.inner.lock().unwrap().issued.clone()
    }

    /// Checks an `Authorization` header value as a resource server would (e.g. a Data Factory
    /// stand-in): `Bearer <token>` where the token was issued by THIS endpoint, is unexpired and
    /// its audience is `resource`. Returns the token's claims.
    pub fn verify_bearer(
        &self,
        authorization: Option<&str>,
        resource: &str,
    ) -> Result<serde_json::Value, String> {
        let header = authorization.ok_or("no Authorization header")?;
        let token = header
            .strip_prefix("Bearer ")
            .ok_or("Authorization is not a Bearer token")?;
        if !self.issued_tokens().iter().any(|t| t == token) {
            return Err("token was not issued by this identity endpoint".into());
        }
        let claims = decode_claims(token).ok_or("token is not a JWT")?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        if claims["exp"].as_u64().unwrap_or(0) < now {
            return Err("token expired".into());
        }
        let aud = claims["aud"].as_str().unwrap_or("");
        if aud.trim_end_matches('/') != resource.trim_end_matches('/') {
            return Err(format!("token audience {aud}, expected {resource}"));
        }
        Ok(claims)
    }

    /// The next valid requests are answered with these statuses instead of a token (e.g. 500, 429).
    pub fn fail_next(&self, statuses: &[u16]) {
        self.shared
            .inner
            .lock()
            .unwrap()
            .fail_next
            .extend(statuses.iter().copied());
    }
}

/// A token for `resource` exactly like the stand-in issues (for raw REST calls in tests; not
/// counted). Valid from 5 minutes ago for `lifetime`.
pub fn mint_token(resource: &str, client_id: &str, lifetime: Duration) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string().as_bytes())
    };
    let header = json!({"alg": "none", "typ": "JWT"});
    let claims = json!({
        "aud": resource.trim_end_matches('/'),
        "iss": format!("https://sts.windows.net/{TENANT_ID}/"),
        "iat": now - 300,
        "nbf": now - 300,
        "exp": now + lifetime.as_secs(),
        "oid": client_id,
        "sub": client_id,
        "appid": client_id,
        "tid": TENANT_ID,
        "ver": "1.0",
        "jti": super::unique_suffix(),
    });
    // Unsigned: header.payload. (empty signature); Azurite's basic OAuth only decodes.
    format!("{}.{}.", b64(&header), b64(&claims))
}

/// The claims of a token minted here (no signature check: they are unsigned).
pub fn decode_claims(token: &str) -> Option<serde_json::Value> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// A storage token for raw REST calls against Azurite in `OAuthHttps` mode.
pub fn storage_token() -> String {
    mint_token(
        STORAGE_RESOURCE,
        SYSTEM_CLIENT_ID,
        Duration::from_secs(3600),
    )
}

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query: Vec<(String, String)> = req
        .uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let get = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let resource = get("resource");
    let client_id = get("client_id");
    let secret = req
        .headers()
        .get("x-identity-header")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);

    let mut problems = Vec::new();
    let mut status = StatusCode::OK;
    if method != axum::http::Method::GET {
        problems.push(format!("method {method}, expected GET"));
        status = StatusCode::METHOD_NOT_ALLOWED;
    } else if path != TOKEN_PATH {
        problems.push(format!("path {path}, expected {TOKEN_PATH}"));
        status = StatusCode::NOT_FOUND;
    } else if secret.is_none() {
        problems.push("missing X-IDENTITY-HEADER".to_string());
        status = StatusCode::BAD_REQUEST;
    } else if secret.as_deref() != Some(shared.secret.as_str()) {
        problems.push("wrong X-IDENTITY-HEADER".to_string());
        status = StatusCode::UNAUTHORIZED;
    } else {
        if get("api-version").as_deref() != Some(API_VERSION) {
            problems.push(format!(
                "api-version {:?}, expected {API_VERSION}",
                get("api-version")
            ));
        }
        match resource.as_deref() {
            None => problems.push("missing resource".to_string()),
            Some(r) if r.ends_with("/.default") => {
                problems.push(format!("resource {r} is a scope, not a resource"))
            }
            Some(r) if url::Url::parse(r).is_err() => {
                problems.push(format!("resource {r} is not a URI"))
            }
            Some(_) => {}
        }
        for (k, _) in &query {
            if !matches!(
                k.as_str(),
                "api-version"
                    | "resource"
                    | "client_id"
                    | "principal_id"
                    | "object_id"
                    | "mi_res_id"
            ) {
                problems.push(format!("unknown query parameter {k}"));
            }
        }
        let identity_params = query
            .iter()
            .filter(|(k, _)| {
                matches!(
                    k.as_str(),
                    "client_id" | "principal_id" | "object_id" | "mi_res_id"
                )
            })
            .count();
        if identity_params > 1 {
            problems.push("more than one user-assigned identity selector".to_string());
        }
        if !problems.is_empty() {
            status = StatusCode::BAD_REQUEST;
        }
    }

    let mut inner = shared.inner.lock().unwrap();
    if status == StatusCode::OK {
        if let (Some(id), Some(assigned)) = (&client_id, &inner.assigned_client_ids) {
            if !assigned.contains(id) {
                // Not a client bug: App Service answers 400 for an identity not assigned.
                status = StatusCode::BAD_REQUEST;
            }
        }
    }
    if status == StatusCode::OK {
        if let Some(s) = inner.fail_next.pop_front() {
            status = StatusCode::from_u16(s).expect("status");
        }
    }
    inner.requests.push(TokenRequest {
        resource: resource.clone(),
        client_id: client_id.clone(),
        status: status.as_u16(),
    });
    let detail = problems.join("; ");
    inner.violations.extend(
        problems
            .into_iter()
            .map(|p| format!("{method} {path}: {p}")),
    );
    if status != StatusCode::OK {
        let body = json!({"error": "invalid_request", "error_description": detail});
        return (status, axum::Json(body)).into_response();
    }
    let resource = resource.unwrap_or_default();
    let client = client_id.unwrap_or_else(|| SYSTEM_CLIENT_ID.to_string());
    let token = mint_token(&resource, &client, shared.lifetime);
    inner.issued.push(token.clone());
    drop(inner);
    let expires_on = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + shared.lifetime.as_secs();
    let body = json!({
        "access_token": token,
        "expires_on": expires_on.to_string(),
        "resource": resource,
        "token_type": "Bearer",
        "client_id": client,
    });
    (StatusCode::OK, axum::Json(body)).into_response()
}
