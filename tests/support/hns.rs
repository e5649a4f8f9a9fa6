//! A stand-in for ADLS Gen2 (hierarchical namespace) in front of Azurite, which has none.
//!
//! It serves both accounts (`/<account>/...`, path style) on one plain-HTTP port and answers
//! what lakeguard uses of a hierarchical account; everything else is forwarded to Azurite
//! verbatim (same target, same headers including `Host`, so Shared Key signatures and copy
//! sources keep working, as in `counting_proxy`). The dfs endpoint is the same URL: dfs requests
//! are told apart by their `action=` / `resource=` parameters, which no blob request carries.
//!
//! What it does, and the documented contract it enforces (Microsoft's REST references: List
//! Blobs, Path Get Properties, Path Update, Path Create; `data-lake-storage-access-control`):
//! - keeps owner, owning group and the ACL (access and default entries) of every path in memory;
//!   new paths get the caller as owner (`$superuser` for a superuser such as Shared Key) and,
//!   under a directory with a default ACL, that default ACL as their access ACL (directories
//!   also inherit it as their default ACL);
//! - directories are real: writing `a/b/c` creates `a` and `a/b` (as zero-length
//!   `hdi_isfolder=true` blobs in Azurite, which is how the blob endpoint shows directories);
//!   `PUT ?resource=directory` creates one (409 `PathAlreadyExists` if the path exists); deleting a
//!   directory that has children is refused (409 `DirectoryNotEmpty`);
//! - List Blobs answers itself, in hierarchical order (segment by segment, a directory before its
//!   subtree), directories as entries; with `include=permissions` (refused with 400 below
//!   service version 2020-06-12) each base row carries `Owner`, `Group`, `Permissions`, `Acl`,
//!   `ResourceType`;
//! - `HEAD ?action=getAccessControl` answers `x-ms-owner` / `x-ms-group` / `x-ms-permissions` /
//!   `x-ms-acl`; `PATCH ?action=setAccessControl` checks: `x-ms-permissions` and `x-ms-acl` not
//!   together (400), the ACL grammar `[default:](user|group|mask|other):[id]:[r-][w-][x-]` (400
//!   `InvalidAccessControlList`), at most 32 entries per access/default ACL, default entries only
//!   on directories, owner or group changes only by a superuser (403
//!   `AuthorizationPermissionMismatch`), ACL changes only by the owner or a superuser, `If-Match`
//!   against the path's ETag (412 `ConditionNotMet`), the path's ETag in the answer;
//! - every request needs an `Authorization` header (or a SAS `sig=`): 401 otherwise.
//!
//! Assumptions not stated by the docs, made explicit here: Set Access Control changes neither the
//! path's ETag nor its Last-Modified (the stand-in leaves the Azurite blob alone), unless a test
//! asks for the other answer (`set_acl_changes_etag`); snapshot rows
//! carry no security fields; the caller is a superuser unless `set_superuser(false)` (an identity
//! with Storage Blob Data Contributor but not Owner), in which case it is the principal
//! [`CALLER`].

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::TokioIo;
use reqwest::Method;

use super::rest::{encode_path, http_date, xml_elements, xml_escape, xml_text, Auth, StorageRest};
use super::BackgroundServer;

/// The principal of a caller that is not a superuser.
pub const CALLER: &str = "11111111-2222-3333-4444-555555555555";
const SUPERUSER: &str = "$superuser";

/// Owner, group and ACL of one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathState {
    pub owner: String,
    pub group: String,
    /// Access entries then `default:` entries, comma-separated.
    pub acl: String,
    pub dir: bool,
}

impl PathState {
    /// `rwxr-x---` from the ACL's `user::`, `group::` (or `mask::` when there is one) and
    /// `other::` entries, `+` when named entries or a mask exist.
    pub fn permissions(&self) -> String {
        let access: Vec<&str> = self
            .acl
            .split(',')
            .filter(|e| !e.is_empty() && !e.starts_with("default:"))
            .collect();
        let find = |prefix: &str| {
            access
                .iter()
                .find_map(|e| e.strip_prefix(prefix))
                .unwrap_or("---")
                .to_owned()
        };
        let extended = access.iter().any(|e| {
            e.starts_with("mask:")
                || (e.starts_with("user:") && !e.starts_with("user::"))
                || (e.starts_with("group:") && !e.starts_with("group::"))
        });
        let group = if access.iter().any(|e| e.starts_with("mask::")) {
            find("mask::")
        } else {
            find("group::")
        };
        format!(
            "{}{}{}{}",
            find("user::"),
            group,
            find("other::"),
            if extended { "+" } else { "" }
        )
    }

    fn default_entries(&self) -> Vec<String> {
        self.acl
            .split(',')
            .filter_map(|e| e.strip_prefix("default:"))
            .map(str::to_owned)
            .collect()
    }
}

/// The stand-in's own check of the documented ACL grammar (independent of lakeguard's parser).
fn acl_problem(acl: &str, dir: bool) -> Option<String> {
    let (mut access, mut default) = (0, 0);
    for entry in acl.split(',') {
        let (is_default, rest) = match entry.strip_prefix("default:") {
            Some(r) => (true, r),
            None => (false, entry),
        };
        let parts: Vec<&str> = rest.split(':').collect();
        if parts.len() != 3 {
            return Some(format!("malformed entry `{entry}`"));
        }
        let kind_ok = matches!(parts[0], "user" | "group" | "mask" | "other");
        let id_ok = parts[1].is_empty() || matches!(parts[0], "user" | "group");
        let p: Vec<char> = parts[2].chars().collect();
        let perms_ok = p.len() == 3
            && (p[0] == 'r' || p[0] == '-')
            && (p[1] == 'w' || p[1] == '-')
            && (p[2] == 'x' || p[2] == '-');
        if !(kind_ok && id_ok && perms_ok) {
            return Some(format!("malformed entry `{entry}`"));
        }
        if is_default {
            default += 1;
        } else {
            access += 1;
        }
    }
    if access > 32 || default > 32 {
        return Some(format!(
            "{access} access / {default} default entries (max 32 each)"
        ));
    }
    if default > 0 && !dir {
        return Some("default ACL entries are only allowed on directories".into());
    }
    None
}

/// One request the stand-in saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub target: String,
    /// A server-side copy (Copy Blob / Copy Blob From URL / Put Block From URL).
    pub copy: bool,
    pub status: u16,
    pub user_agent: String,
}

type Key = (String, String, String);

struct Shared {
    upstream: SocketAddr,
    /// Direct, signed access to Azurite per account (for the stand-in's own reads and writes).
    rest: HashMap<String, StorageRest>,
    paths: Mutex<BTreeMap<Key, PathState>>,
    superuser: AtomicBool,
    /// The other answer to the docs' silence: an access-control change gives the path a new ETag.
    acl_changes_etag: AtomicBool,
    log: Mutex<Vec<Seen>>,
}

/// The stand-in; stops on drop.
pub struct HnsStandIn {
    shared: Arc<Shared>,
    server: BackgroundServer,
}

impl HnsStandIn {
    /// In front of Azurite's blob port; `accounts` = (name, key).
    pub fn start(upstream_port: u16, accounts: &[(&str, &str)]) -> HnsStandIn {
        let client = reqwest::Client::new();
        let rest = accounts
            .iter()
            .map(|(a, k)| {
                (
                    a.to_string(),
                    StorageRest::new(
                        client.clone(),
                        format!("http://127.0.0.1:{upstream_port}/{a}"),
                        a,
                        Auth::SharedKey(k.to_string()),
                    ),
                )
            })
            .collect();
        let shared = Arc::new(Shared {
            upstream: SocketAddr::from(([127, 0, 0, 1], upstream_port)),
            rest,
            paths: Mutex::new(BTreeMap::new()),
            superuser: AtomicBool::new(true),
            acl_changes_etag: AtomicBool::new(false),
            log: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&shared));
        HnsStandIn {
            shared,
            server: BackgroundServer::start(app),
        }
    }

    /// `http://127.0.0.1:<port>/<account>`: the blob endpoint and the dfs endpoint.
    pub fn endpoint(&self, account: &str) -> String {
        format!("http://127.0.0.1:{}/{account}", self.server.addr().port())
    }

    /// Whether callers act as superusers (Shared Key, Storage Blob Data Owner); `false`: as
    /// [`CALLER`], who may not change owners or groups.
    pub fn set_superuser(&self, yes: bool) {
        self.shared.superuser.store(yes, Ordering::SeqCst);
    }

    /// Whether Set Access Control gives the path a new ETag (the docs do not say; by default it
    /// does not). When it does, the stand-in rewrites the blob's metadata unchanged, which gives
    /// the Azurite blob a new ETag and Last-Modified.
    pub fn set_acl_changes_etag(&self, yes: bool) {
        self.shared.acl_changes_etag.store(yes, Ordering::SeqCst);
    }

    pub fn state(&self, account: &str, container: &str, path: &str) -> Option<PathState> {
        self.shared
            .paths
            .lock()
            .unwrap()
            .get(&(account.into(), container.into(), path.into()))
            .cloned()
    }

    /// Every path of a container with its state.
    pub fn states(&self, account: &str, container: &str) -> BTreeMap<String, PathState> {
        self.shared
            .paths
            .lock()
            .unwrap()
            .iter()
            .filter(|((a, c, _), _)| a == account && c == container)
            .map(|((_, _, p), s)| (p.clone(), s.clone()))
            .collect()
    }

    /// Sets a path's state directly (the test's own "someone changed the ACL" on the source).
    pub fn set_state(&self, account: &str, container: &str, path: &str, state: PathState) {
        self.shared
            .paths
            .lock()
            .unwrap()
            .insert((account.into(), container.into(), path.into()), state);
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.shared.log.lock().unwrap().clone()
    }

    pub fn reset(&self) {
        self.shared.log.lock().unwrap().clear();
    }

    /// Server-side copies made by lakeguard since the last reset.
    pub fn copies(&self) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.copy && !r.user_agent.starts_with("axios"))
            .count()
    }
}

fn query_of(target: &str) -> Vec<(String, String)> {
    target
        .split_once('?')
        .map(|(_, q)| {
            url::form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.to_ascii_lowercase(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// `/<account>/<container>/<path>` decoded.
fn split_path(target: &str) -> (String, String, String) {
    let path = target.split('?').next().unwrap_or("/");
    let decoded = percent_encoding::percent_decode_str(path)
        .decode_utf8_lossy()
        .into_owned();
    let mut parts = decoded.trim_start_matches('/').splitn(3, '/');
    (
        parts.next().unwrap_or_default().to_owned(),
        parts.next().unwrap_or_default().to_owned(),
        parts.next().unwrap_or_default().to_owned(),
    )
}

fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>{code}</Code><Message>{}</Message></Error>",
        xml_escape(message)
    );
    (
        status,
        [
            ("x-ms-error-code", code.to_owned()),
            ("content-type", "application/xml".to_owned()),
        ],
        body,
    )
        .into_response()
}

/// The hierarchical listing order: segment by segment, `/` below every other character.
fn hier_key(name: &str) -> Vec<u32> {
    name.encode_utf16()
        .map(|u| {
            if u == u16::from(b'/') {
                0
            } else {
                u32::from(u) + 1
            }
        })
        .collect()
}

fn parents(path: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(i) = path[at..].find('/') {
        out.push(path[..at + i].to_owned());
        at += i + 1;
    }
    out
}

impl Shared {
    fn caller(&self) -> String {
        if self.superuser.load(Ordering::SeqCst) {
            SUPERUSER.into()
        } else {
            CALLER.into()
        }
    }

    /// The state a new path gets under its parent.
    fn new_state(&self, account: &str, container: &str, path: &str, dir: bool) -> PathState {
        let parent = parents(path).pop();
        let inherited = parent
            .and_then(|p| {
                self.paths
                    .lock()
                    .unwrap()
                    .get(&(account.into(), container.into(), p))
                    .map(PathState::default_entries)
            })
            .filter(|d| !d.is_empty());
        let acl = match inherited {
            Some(d) if dir => {
                let mut all = d.clone();
                all.extend(d.iter().map(|e| format!("default:{e}")));
                all.join(",")
            }
            Some(d) => d.join(","),
            None if dir => "user::rwx,group::r-x,other::---".into(),
            None => "user::rw-,group::r--,other::---".into(),
        };
        let owner = self.caller();
        PathState {
            group: owner.clone(),
            owner,
            acl,
            dir,
        }
    }

    /// After a successful write of `path`: its parents become directories (created in Azurite
    /// as directory blobs), and the path gets a state unless it has one.
    async fn created(&self, account: &str, container: &str, path: &str, dir: bool) {
        for p in parents(path) {
            let known = self.paths.lock().unwrap().contains_key(&(
                account.into(),
                container.into(),
                p.clone(),
            ));
            if !known {
                if let Some(rest) = self.rest.get(account) {
                    let _ = rest
                        .send(
                            Method::PUT,
                            &format!("/{container}/{}", encode_path(&p)),
                            &[],
                            &[
                                ("x-ms-blob-type", "BlockBlob"),
                                ("x-ms-meta-hdi_isfolder", "true"),
                                ("if-none-match", "*"),
                            ],
                            vec![],
                        )
                        .await;
                }
                let st = self.new_state(account, container, &p, true);
                self.paths
                    .lock()
                    .unwrap()
                    .insert((account.into(), container.into(), p), st);
            }
        }
        let key = (account.to_owned(), container.to_owned(), path.to_owned());
        let exists = self.paths.lock().unwrap().contains_key(&key);
        if !exists {
            let st = self.new_state(account, container, path, dir);
            self.paths.lock().unwrap().insert(key, st);
        }
    }
}

async fn handle(State(sh): State<Arc<Shared>>, req: Request) -> Response {
    let method = req.method().to_string();
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let headers = req.headers().clone();
    let user_agent = header(&headers, "user-agent").unwrap_or_default();
    let copy = headers.contains_key("x-ms-copy-source");
    let q = query_of(&target);
    let qv = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let (account, container, path) = split_path(&target);
    let response = if !headers.contains_key("authorization") && qv("sig").is_none() {
        error(
            StatusCode::UNAUTHORIZED,
            "NoAuthenticationInformation",
            "the stand-in requires an Authorization header (or a SAS)",
        )
    } else if let Some(action) = qv("action") {
        dfs_action(&sh, &method, &action, &headers, &account, &container, &path).await
    } else if qv("resource").as_deref() == Some("directory") && method == "PUT" {
        create_directory(&sh, &account, &container, &path).await
    } else if method == "GET"
        && qv("restype").as_deref() == Some("container")
        && qv("comp").as_deref() == Some("list")
    {
        list(&sh, &headers, &q, &account, &container).await
    } else if method == "DELETE" && !path.is_empty() && qv("snapshot").is_none() {
        let key = (account.clone(), container.clone(), path.clone());
        let busy = {
            let paths = sh.paths.lock().unwrap();
            paths.get(&key).is_some_and(|s| s.dir)
                && paths.keys().any(|(a, c, p)| {
                    a == &account && c == &container && p.starts_with(&format!("{path}/"))
                })
        };
        if busy {
            error(
                StatusCode::CONFLICT,
                "DirectoryNotEmpty",
                "the directory is not empty",
            )
        } else {
            let r = forward(&sh, req, &target).await;
            if r.status().is_success() {
                sh.paths.lock().unwrap().remove(&key);
            }
            r
        }
    } else if method == "DELETE" && path.is_empty() && qv("restype").as_deref() == Some("container")
    {
        let r = forward(&sh, req, &target).await;
        if r.status().is_success() {
            sh.paths
                .lock()
                .unwrap()
                .retain(|(a, c, _), _| !(a == &account && c == &container));
        }
        r
    } else {
        let write = method == "PUT"
            && !path.is_empty()
            && matches!(qv("comp").as_deref(), None | Some("blocklist"));
        let dir = header(&headers, "x-ms-meta-hdi_isfolder").is_some_and(|v| v == "true");
        let r = forward(&sh, req, &target).await;
        if write && r.status().is_success() {
            sh.created(&account, &container, &path, dir).await;
        }
        r
    };
    sh.log.lock().unwrap().push(Seen {
        method,
        target,
        copy,
        status: response.status().as_u16(),
        user_agent,
    });
    response
}

async fn dfs_action(
    sh: &Shared,
    method: &str,
    action: &str,
    headers: &HeaderMap,
    account: &str,
    container: &str,
    path: &str,
) -> Response {
    if header(headers, "x-ms-version").is_none() {
        return error(
            StatusCode::BAD_REQUEST,
            "MissingRequiredHeader",
            "x-ms-version",
        );
    }
    let key = (account.to_owned(), container.to_owned(), path.to_owned());
    let Some(state) = sh.paths.lock().unwrap().get(&key).cloned() else {
        return error(
            StatusCode::NOT_FOUND,
            "PathNotFound",
            "the path does not exist",
        );
    };
    match (method, action) {
        ("HEAD", "getAccessControl") => (
            StatusCode::OK,
            [
                ("x-ms-owner", state.owner.clone()),
                ("x-ms-group", state.group.clone()),
                ("x-ms-permissions", state.permissions()),
                ("x-ms-acl", state.acl.clone()),
            ],
        )
            .into_response(),
        ("PATCH", "setAccessControl") => {
            // Path Update honours If-Match: the path's ETag is the Azurite blob's.
            let current = match sh.rest.get(account) {
                Some(rest) => rest
                    .send(
                        Method::HEAD,
                        &format!("/{container}/{}", encode_path(path)),
                        &[],
                        &[],
                        vec![],
                    )
                    .await
                    .header("etag")
                    .unwrap_or_default(),
                None => return error(StatusCode::NOT_FOUND, "AccountNotFound", account),
            };
            if header(headers, "if-match").is_some_and(|m| m != "*" && m != current) {
                return error(
                    StatusCode::PRECONDITION_FAILED,
                    "ConditionNotMet",
                    "the path's ETag does not match If-Match",
                );
            }
            let owner = header(headers, "x-ms-owner");
            let group = header(headers, "x-ms-group");
            let perms = header(headers, "x-ms-permissions");
            let acl = header(headers, "x-ms-acl");
            if perms.is_some() && acl.is_some() {
                return error(
                    StatusCode::BAD_REQUEST,
                    "InvalidInput",
                    "x-ms-permissions and x-ms-acl are mutually exclusive",
                );
            }
            if let Some(a) = &acl {
                if let Some(p) = acl_problem(a, state.dir) {
                    return error(StatusCode::BAD_REQUEST, "InvalidAccessControlList", &p);
                }
            }
            let superuser = sh.superuser.load(Ordering::SeqCst);
            let changes_owner = owner.as_ref().is_some_and(|o| *o != state.owner)
                || group.as_ref().is_some_and(|g| *g != state.group);
            if changes_owner && !superuser {
                return error(
                    StatusCode::FORBIDDEN,
                    "AuthorizationPermissionMismatch",
                    "changing the owner or group needs a superuser",
                );
            }
            if (acl.is_some() || perms.is_some()) && !superuser && state.owner != sh.caller() {
                return error(
                    StatusCode::FORBIDDEN,
                    "AuthorizationPermissionMismatch",
                    "only the owner or a superuser may change the ACL",
                );
            }
            let mut next = state.clone();
            if let Some(o) = owner {
                next.owner = o;
            }
            if let Some(g) = group {
                next.group = g;
            }
            if let Some(a) = acl {
                next.acl = a;
            }
            if let Some(p) = perms {
                let p: Vec<char> = p.chars().collect();
                if p.len() < 9 {
                    return error(StatusCode::BAD_REQUEST, "InvalidPermission", "permissions");
                }
                let part = |i: usize| p[i..i + 3].iter().collect::<String>();
                let mut entries: Vec<String> = next
                    .acl
                    .split(',')
                    .filter(|e| {
                        !(e.starts_with("user::")
                            || e.starts_with("group::")
                            || e.starts_with("other::"))
                    })
                    .map(str::to_owned)
                    .collect();
                entries.insert(0, format!("other::{}", part(6)));
                entries.insert(0, format!("group::{}", part(3)));
                entries.insert(0, format!("user::{}", part(0)));
                next.acl = entries.join(",");
            }
            sh.paths.lock().unwrap().insert(key, next);
            let mut etag = current;
            if sh.acl_changes_etag.load(Ordering::SeqCst) {
                let rest = &sh.rest[account];
                let blob = format!("/{container}/{}", encode_path(path));
                let head = rest.send(Method::HEAD, &blob, &[], &[], vec![]).await;
                let meta: Vec<(String, String)> = head
                    .headers
                    .iter()
                    .filter(|(k, _)| k.as_str().starts_with("x-ms-meta-"))
                    .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
                    .collect();
                let meta: Vec<(&str, &str)> =
                    meta.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let r = rest
                    .send(Method::PUT, &blob, &[("comp", "metadata")], &meta, vec![])
                    .await;
                etag = r.header("etag").unwrap_or(etag);
            }
            (StatusCode::OK, [("etag", etag)]).into_response()
        }
        _ => error(
            StatusCode::BAD_REQUEST,
            "UnsupportedAction",
            &format!("the stand-in does not implement {method} action={action}"),
        ),
    }
}

async fn create_directory(sh: &Shared, account: &str, container: &str, path: &str) -> Response {
    let key = (account.to_owned(), container.to_owned(), path.to_owned());
    if sh.paths.lock().unwrap().contains_key(&key) {
        return error(StatusCode::CONFLICT, "PathAlreadyExists", "the path exists");
    }
    let Some(rest) = sh.rest.get(account) else {
        return error(StatusCode::NOT_FOUND, "AccountNotFound", account);
    };
    let r = rest
        .send(
            Method::PUT,
            &format!("/{container}/{}", encode_path(path)),
            &[],
            &[
                ("x-ms-blob-type", "BlockBlob"),
                ("x-ms-meta-hdi_isfolder", "true"),
            ],
            vec![],
        )
        .await;
    if !r.is_success() {
        return error(
            StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_GATEWAY),
            &r.header("x-ms-error-code").unwrap_or_default(),
            "create directory",
        );
    }
    sh.created(account, container, path, true).await;
    (
        StatusCode::CREATED,
        [("etag", r.header("etag").unwrap_or_default())],
    )
        .into_response()
}

async fn list(
    sh: &Shared,
    headers: &HeaderMap,
    q: &[(String, String)],
    account: &str,
    container: &str,
) -> Response {
    let qv = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let include: Vec<String> = qv("include")
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    let want = |i: &str| include.iter().any(|x| x == i);
    if want("permissions")
        && header(headers, "x-ms-version").is_none_or(|v| v.as_str() < "2020-06-12")
    {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidQueryParameterValue",
            "include=permissions needs x-ms-version 2020-06-12 or later",
        );
    }
    let Some(rest) = sh.rest.get(account) else {
        return error(StatusCode::NOT_FOUND, "AccountNotFound", account);
    };
    // Everything from Azurite (default page size: it loses snapshot rows at page boundaries).
    let mut rows: Vec<(Vec<u32>, u8, String, String, String)> = Vec::new();
    let mut marker = String::new();
    let inc = if want("snapshots") {
        "snapshots,metadata"
    } else {
        "metadata"
    };
    let prefix = qv("prefix");
    loop {
        let mut query: Vec<(&str, &str)> =
            vec![("restype", "container"), ("comp", "list"), ("include", inc)];
        if let Some(p) = &prefix {
            query.push(("prefix", p));
        }
        if !marker.is_empty() {
            query.push(("marker", &marker));
        }
        let r = rest
            .send(Method::GET, &format!("/{container}"), &query, &[], vec![])
            .await;
        if !r.is_success() {
            return (
                StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_GATEWAY),
                [(
                    "x-ms-error-code",
                    r.header("x-ms-error-code").unwrap_or_default(),
                )],
                r.body,
            )
                .into_response();
        }
        let xml = r.text();
        for b in xml_elements(&xml, "Blob") {
            let name = xml_text(&b, "Name").unwrap_or_default();
            let snap = xml_text(&b, "Snapshot").unwrap_or_default();
            // Within a name: snapshots oldest first, then the base blob.
            let rank = u8::from(snap.is_empty());
            rows.push((hier_key(&name), rank, snap, name, b));
        }
        marker = xml_text(&xml, "NextMarker").unwrap_or_default();
        if marker.is_empty() {
            break;
        }
    }
    rows.sort_by(|a, b| (&a.0, a.1, &a.2).cmp(&(&b.0, b.1, &b.2)));
    // Our own marker: the position key of the first row of the next page, hex.
    let start = qv("marker")
        .filter(|m| !m.is_empty())
        .and_then(|m| decode_marker(&m));
    let max: usize = qv("maxresults")
        .and_then(|m| m.parse().ok())
        .unwrap_or(5000);
    let rows: Vec<_> = rows
        .into_iter()
        .filter(|r| {
            start
                .as_ref()
                .is_none_or(|(n, rank, s)| (&r.0, r.1, &r.2) >= (&hier_key(n), *rank, s))
        })
        .collect();
    let next = rows.get(max).map(|r| encode_marker(&r.3, r.1, &r.2));
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"utf-8\"?>");
    out.push_str(&format!(
        "<EnumerationResults ServiceEndpoint=\"http://127.0.0.1/{account}\" ContainerName=\"{}\">",
        xml_escape(container)
    ));
    if let Some(p) = &prefix {
        out.push_str(&format!("<Prefix>{}</Prefix>", xml_escape(p)));
    }
    out.push_str("<Blobs>");
    let paths = sh.paths.lock().unwrap().clone();
    for (_, _, snap, name, mut inner) in rows.into_iter().take(max) {
        if !want("metadata") {
            if let (Some(i), Some(j)) = (inner.find("<Metadata"), inner.find("</Metadata>")) {
                inner.replace_range(i..j + "</Metadata>".len(), "");
            } else if let Some(i) = inner.find("<Metadata/>") {
                inner.replace_range(i..i + "<Metadata/>".len(), "");
            }
        }
        if want("permissions") && snap.is_empty() {
            if let Some(st) = paths.get(&(account.to_owned(), container.to_owned(), name.clone())) {
                let extra = format!(
                    "<Owner>{}</Owner><Group>{}</Group><Permissions>{}</Permissions><Acl>{}</Acl><ResourceType>{}</ResourceType>",
                    xml_escape(&st.owner),
                    xml_escape(&st.group),
                    xml_escape(&st.permissions()),
                    xml_escape(&st.acl),
                    if st.dir { "directory" } else { "file" }
                );
                if let Some(i) = inner.find("</Properties>") {
                    inner.insert_str(i, &extra);
                }
            }
        }
        out.push_str("<Blob>");
        out.push_str(&inner);
        out.push_str("</Blob>");
    }
    out.push_str("</Blobs>");
    match next {
        Some(m) => out.push_str(&format!("<NextMarker>{m}</NextMarker>")),
        None => out.push_str("<NextMarker />"),
    }
    out.push_str("</EnumerationResults>");
    (
        StatusCode::OK,
        [
            ("content-type", "application/xml".to_owned()),
            ("date", http_date(time::OffsetDateTime::now_utc())),
            ("x-ms-version", "2026-04-06".to_owned()),
        ],
        out,
    )
        .into_response()
}

fn encode_marker(name: &str, rank: u8, snap: &str) -> String {
    format!("{name}\n{rank}\n{snap}")
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_marker(m: &str) -> Option<(String, u8, String)> {
    let bytes: Option<Vec<u8>> = (0..m.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(m.get(i..i + 2)?, 16).ok())
        .collect();
    let s = String::from_utf8(bytes?).ok()?;
    let mut parts = s.splitn(3, '\n');
    Some((
        parts.next()?.to_owned(),
        parts.next()?.parse().ok()?,
        parts.next()?.to_owned(),
    ))
}

async fn forward(sh: &Shared, req: Request, target: &str) -> Response {
    let upstream = match tokio::net::TcpStream::connect(sh.upstream).await {
        Ok(s) => s,
        Err(e) => {
            return (StatusCode::BAD_GATEWAY, format!("stand-in: connect: {e}")).into_response()
        }
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(upstream))
        .await
    {
        Ok(x) => x,
        Err(e) => {
            return (StatusCode::BAD_GATEWAY, format!("stand-in: handshake: {e}")).into_response()
        }
    };
    tokio::spawn(conn);
    let (mut parts, body) = req.into_parts();
    parts.uri = target.parse::<Uri>().expect("origin-form uri");
    match sender
        .send_request(hyper::Request::from_parts(parts, body))
        .await
    {
        Ok(resp) => resp.map(Body::new),
        Err(e) => (StatusCode::BAD_GATEWAY, format!("stand-in: {e}")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_follow_the_acl() {
        let s = PathState {
            owner: "o".into(),
            group: "g".into(),
            acl: "user::rwx,group::r-x,other::---".into(),
            dir: true,
        };
        assert_eq!(s.permissions(), "rwxr-x---");
        let s = PathState {
            acl: "user::rw-,user:u1:r--,group::r--,mask::r--,other::---,default:user::rwx".into(),
            ..s
        };
        assert_eq!(s.permissions(), "rw-r-----+");
        assert_eq!(s.default_entries(), vec!["user::rwx".to_string()]);
        assert!(acl_problem("user::rwx,default:user::rwx", false).is_some());
        assert!(acl_problem("user::rwx,default:user::rwx", true).is_none());
        assert!(acl_problem("user::rwz", true).is_some());
        assert_eq!(parents("a/b/c"), vec!["a".to_string(), "a/b".to_string()]);
        let m = encode_marker("a b/ü", 1, "");
        assert_eq!(decode_marker(&m), Some(("a b/ü".into(), 1, String::new())));
    }
}
