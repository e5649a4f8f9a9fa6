//! `DataFactoryStandIn`: a local Azure Data Factory for tests.
//!
//! It is strict where Data Factory is strict and the engine could be wrong:
//! * path shape `/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.DataFactory/
//!   factories/{factory}/...` with the configured names (404 `ResourceNotFound` otherwise),
//!   `api-version=2018-06-01` exactly (400 `InvalidApiVersionParameter`);
//! * `Authorization: Bearer <jwt>` whose `aud` is ARM (401 `AuthenticationFailed` otherwise);
//!   the JWT is not verified, only decoded, as the local identity endpoint issues unsigned ones;
//! * createRun's body is checked against the parameters that the **shipped** pipeline JSON
//!   declares: unknown names, missing required ones and wrong JSON types are 400 `BadRequest`. An
//!   `Int` takes only 32-bit values: Data Factory does not document its width, so the stand-in
//!   takes the reading under which a pipeline that relies on more fails (a length above 2 GiB);
//! * a Web activity is held to the documented contract: `datasets` and `linkedServices` arrays
//!   (required, may be empty), a `body` for PUT/POST/PATCH (required), which is what the request
//!   then carries (`Content-Length` = its length, checked by the storage side: Put Blob From URL
//!   needs 0); its endpoint must answer JSON. Put Blob From URL answers `201` with no body: by
//!   default ([`WebResponsePolicy::EmptyIsTolerated`]) that becomes the output `Response: ""`, as
//!   observed on real factories; [`WebResponsePolicy::JsonOnly`] fails the activity instead, the
//!   literal reading of the docs ("non-JSON response: unsupported"), which the engine must survive;
//! * the copy source is authorised only by the SAS in `x-ms-copy-source` (no bearer token):
//!   [`MemoryStorage`] issues and checks it (read only, that one snapshot, unexpired, at most 30
//!   minutes), Azurite checks the real one in the end-to-end tests.
//!
//! It answers like Data Factory (runId; Queued -> InProgress -> Succeeded/Failed; Get, Query By
//! Factory with continuation tokens, Activity Runs) and it **executes the shipped pipeline**: the
//! activities' expressions (`@pipeline().parameters.X`, `@dataset().X`, `@linkedService().X`,
//! `@activity('A').output...`, `@{...}` interpolation and the functions the pipeline uses) are
//! evaluated, datasets and linked services are resolved through their parameters, and the
//! resulting storage operations go to a test-supplied [`StandInStorage`] (an in-memory store or
//! real Azurite). A pipeline that is not wired makes the run fail, which is what the wiring tests
//! rely on.
//!
//! Scripted faults: 429 (or any status) with Retry-After for the next N calls, runs that fail with
//! a message, runs that stay Queued/InProgress for a while.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Bytes;
use axum::extract::{Path as AxPath, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::{json, Map, Value};
use time::OffsetDateTime;

pub const API_VERSION: &str = "2018-06-01";

// ---------------------------------------------------------------------------------------------
// The shipped factory definition
// ---------------------------------------------------------------------------------------------

/// The `datafactory/` folder as Data Factory's git integration lays it out.
#[derive(Clone, Debug)]
pub struct FactoryDefinition {
    pub pipelines: BTreeMap<String, Value>,
    pub datasets: BTreeMap<String, Value>,
    pub linked_services: BTreeMap<String, Value>,
}

impl FactoryDefinition {
    /// Loads `<repo>/datafactory`.
    pub fn shipped() -> Self {
        Self::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("datafactory"))
    }

    pub fn load(dir: &Path) -> Self {
        fn read_dir(dir: PathBuf) -> BTreeMap<String, Value> {
            let mut out = BTreeMap::new();
            for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir:?}: {e}")) {
                let path = entry.unwrap().path();
                if path.extension().and_then(|e| e.to_str()) != Some("json") {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                let v: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("{path:?} is not JSON: {e}"));
                let name = v["name"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{path:?} has no name"))
                    .to_owned();
                out.insert(name, v);
            }
            out
        }
        FactoryDefinition {
            pipelines: read_dir(dir.join("pipeline")),
            datasets: read_dir(dir.join("dataset")),
            linked_services: read_dir(dir.join("linkedService")),
        }
    }

    pub fn pipeline(&self, name: &str) -> Option<&Value> {
        self.pipelines.get(name)
    }

    /// Names of the SecureString parameters of every pipeline (masked in records and answers).
    pub fn secure_parameters(&self) -> std::collections::BTreeSet<String> {
        self.pipelines
            .values()
            .flat_map(declared_parameters)
            .filter(|(_, (ty, _))| ty.eq_ignore_ascii_case("SecureString"))
            .map(|(k, _)| k)
            .collect()
    }
}

/// Declared parameters of a pipeline/dataset/linked service: name -> (type, defaultValue).
pub fn declared_parameters(resource: &Value) -> BTreeMap<String, (String, Option<Value>)> {
    resource["properties"]["parameters"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        (
                            v["type"].as_str().unwrap_or("String").to_owned(),
                            v.get("defaultValue").cloned(),
                        ),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Checks run parameters like Data Factory: every supplied name declared, every declared one
/// without default supplied, JSON types matching the declared type.
pub fn validate_run_parameters(
    pipeline: &Value,
    body: &Value,
) -> Result<Map<String, Value>, String> {
    let declared = declared_parameters(pipeline);
    let given = match body {
        Value::Null => Map::new(),
        Value::Object(m) => m.clone(),
        _ => return Err("the request body must be a JSON object of parameters".into()),
    };
    for (name, value) in &given {
        let Some((ty, _)) = declared.get(name) else {
            return Err(format!("parameter '{name}' is not declared by pipeline"));
        };
        let ok = match ty.to_ascii_lowercase().as_str() {
            "string" | "securestring" => value.is_string(),
            "int" => value.as_i64().is_some_and(|n| i32::try_from(n).is_ok()),
            "float" => value.is_number(),
            "bool" => value.is_boolean(),
            "array" => value.is_array(),
            "object" | "secureobject" => value.is_object(),
            other => return Err(format!("stand-in does not know parameter type {other}")),
        };
        if !ok {
            return Err(format!(
                "parameter '{name}' must be of type {ty}, got {value}"
            ));
        }
    }
    let mut params = given;
    for (name, (_, default)) in &declared {
        if !params.contains_key(name) {
            match default {
                Some(d) => {
                    params.insert(name.clone(), d.clone());
                }
                None => return Err(format!("missing value for required parameter '{name}'")),
            }
        }
    }
    Ok(params)
}

// ---------------------------------------------------------------------------------------------
// Expressions
// ---------------------------------------------------------------------------------------------

/// What expressions can see.
#[derive(Clone, Debug, Default)]
pub struct ExprContext {
    pub pipeline_name: String,
    pub run_id: String,
    pub pipeline_parameters: Map<String, Value>,
    pub dataset_parameters: Option<Map<String, Value>>,
    pub linked_service_parameters: Option<Map<String, Value>>,
    pub activity_outputs: BTreeMap<String, Value>,
}

/// Evaluates a property value as Data Factory does: `{"value": "...", "type": "Expression"}`,
/// a string starting with `@` (an expression; `@@` escapes), a string with `@{...}` (interpolation),
/// anything else literally (objects and arrays recursively).
pub fn eval_property(v: &Value, ctx: &ExprContext) -> Result<Value, String> {
    match v {
        Value::Object(m) if m.get("type").and_then(Value::as_str) == Some("Expression") => {
            let s = m
                .get("value")
                .and_then(Value::as_str)
                .ok_or("Expression without value")?;
            eval_string(s, ctx)
        }
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, v) in m {
                out.insert(k.clone(), eval_property(v, ctx)?);
            }
            Ok(Value::Object(out))
        }
        Value::Array(a) => a
            .iter()
            .map(|v| eval_property(v, ctx))
            .collect::<Result<_, _>>()
            .map(Value::Array),
        Value::String(s) => eval_string(s, ctx),
        other => Ok(other.clone()),
    }
}

pub fn eval_string(s: &str, ctx: &ExprContext) -> Result<Value, String> {
    if let Some(rest) = s.strip_prefix("@@") {
        return Ok(Value::String(format!("@{rest}")));
    }
    if let Some(expr) = s.strip_prefix('@') {
        if !expr.starts_with('{') {
            return eval_expr(expr, ctx);
        }
    }
    if !s.contains("@{") {
        return Ok(Value::String(s.to_owned()));
    }
    // String interpolation: "a@{expr}b".
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("@{") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = find_closing_brace(after).ok_or_else(|| format!("unclosed @{{ in {s:?}"))?;
        let v = eval_expr(&after[..end], ctx)?;
        out.push_str(&to_text(&v));
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(Value::String(out))
}

fn find_closing_brace(s: &str) -> Option<usize> {
    let mut in_str = false;
    for (i, c) in s.char_indices() {
        match c {
            '\'' => in_str = !in_str,
            '}' if !in_str => return Some(i),
            _ => {}
        }
    }
    None
}

fn to_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(f64),
    LParen,
    RParen,
    Comma,
    Dot,
    LBracket,
    RBracket,
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let cs: Vec<char> = s.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    while i < cs.len() {
        let c = cs[i];
        match c {
            ' ' | '\t' | '\n' | '\r' => i += 1,
            '(' => {
                out.push(Tok::LParen);
                i += 1
            }
            ')' => {
                out.push(Tok::RParen);
                i += 1
            }
            ',' => {
                out.push(Tok::Comma);
                i += 1
            }
            '.' => {
                out.push(Tok::Dot);
                i += 1
            }
            '[' => {
                out.push(Tok::LBracket);
                i += 1
            }
            ']' => {
                out.push(Tok::RBracket);
                i += 1
            }
            '\'' => {
                let mut lit = String::new();
                i += 1;
                loop {
                    if i >= cs.len() {
                        return Err(format!("unterminated string in {s:?}"));
                    }
                    if cs[i] == '\'' {
                        if i + 1 < cs.len() && cs[i + 1] == '\'' {
                            lit.push('\'');
                            i += 2;
                            continue;
                        }
                        i += 1;
                        break;
                    }
                    lit.push(cs[i]);
                    i += 1;
                }
                out.push(Tok::Str(lit));
            }
            c if c.is_ascii_digit() || c == '-' => {
                let start = i;
                i += 1;
                while i < cs.len() && (cs[i].is_ascii_digit() || cs[i] == '.') {
                    i += 1;
                }
                let t: String = cs[start..i].iter().collect();
                out.push(Tok::Num(t.parse().map_err(|_| format!("bad number {t}"))?));
            }
            c if c.is_alphabetic() || c == '_' => {
                let start = i;
                while i < cs.len() && (cs[i].is_alphanumeric() || cs[i] == '_') {
                    i += 1;
                }
                out.push(Tok::Ident(cs[start..i].iter().collect()));
            }
            other => return Err(format!("unexpected {other:?} in expression {s:?}")),
        }
    }
    Ok(out)
}

struct Parser<'a> {
    toks: Vec<Tok>,
    pos: usize,
    ctx: &'a ExprContext,
}

pub fn eval_expr(s: &str, ctx: &ExprContext) -> Result<Value, String> {
    let mut p = Parser {
        toks: tokenize(s)?,
        pos: 0,
        ctx,
    };
    let v = p.expr()?;
    if p.pos != p.toks.len() {
        return Err(format!("trailing tokens in expression {s:?}"));
    }
    Ok(v)
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }
    fn expect(&mut self, t: Tok) -> Result<(), String> {
        match self.next() {
            Some(ref x) if *x == t => Ok(()),
            other => Err(format!("expected {t:?}, found {other:?}")),
        }
    }

    fn expr(&mut self) -> Result<Value, String> {
        let mut v = self.primary()?;
        loop {
            match self.peek() {
                Some(Tok::Dot) => {
                    self.pos += 1;
                    let Some(Tok::Ident(name)) = self.next() else {
                        return Err("expected a property name after '.'".into());
                    };
                    v = member(&v, &name)?;
                }
                Some(Tok::LBracket) => {
                    self.pos += 1;
                    let key = self.expr()?;
                    self.expect(Tok::RBracket)?;
                    v = match key {
                        Value::String(k) => member(&v, &k)?,
                        Value::Number(n) => v
                            .get(n.as_u64().ok_or("bad index")? as usize)
                            .cloned()
                            .ok_or("index out of range")?,
                        other => return Err(format!("bad index {other}")),
                    };
                }
                _ => return Ok(v),
            }
        }
    }

    fn primary(&mut self) -> Result<Value, String> {
        match self.next() {
            Some(Tok::Str(s)) => Ok(Value::String(s)),
            Some(Tok::Num(n)) => Ok(if n.fract() == 0.0 {
                json!(n as i64)
            } else {
                json!(n)
            }),
            Some(Tok::Ident(name)) => {
                if name == "true" || name == "false" {
                    return Ok(Value::Bool(name == "true"));
                }
                self.expect(Tok::LParen)?;
                let mut args = Vec::new();
                if self.peek() != Some(&Tok::RParen) {
                    loop {
                        args.push(self.expr()?);
                        match self.next() {
                            Some(Tok::Comma) => continue,
                            Some(Tok::RParen) => break,
                            other => return Err(format!("expected ',' or ')', found {other:?}")),
                        }
                    }
                } else {
                    self.pos += 1;
                }
                call(&name, args, self.ctx)
            }
            other => Err(format!("unexpected token {other:?}")),
        }
    }
}

fn member(v: &Value, name: &str) -> Result<Value, String> {
    v.as_object()
        .and_then(|m| {
            m.get(name).or_else(|| {
                m.iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v)
            })
        })
        .cloned()
        .ok_or_else(|| format!("property '{name}' does not exist"))
}

fn str_arg(args: &[Value], i: usize, f: &str) -> Result<String, String> {
    match args.get(i) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("{f}: argument {i} must be a string, got {other}")),
        None => Err(format!("{f}: missing argument {i}")),
    }
}

/// The functions of the Data Factory expression language that lakeguard's pipeline uses.
fn call(name: &str, args: Vec<Value>, ctx: &ExprContext) -> Result<Value, String> {
    match name {
        "pipeline" => Ok(json!({
            "parameters": Value::Object(ctx.pipeline_parameters.clone()),
            "RunId": ctx.run_id,
            "Pipeline": ctx.pipeline_name,
        })),
        "dataset" => ctx
            .dataset_parameters
            .clone()
            .map(Value::Object)
            .ok_or_else(|| "dataset() used outside a dataset".into()),
        "linkedService" => ctx
            .linked_service_parameters
            .clone()
            .map(Value::Object)
            .ok_or_else(|| "linkedService() used outside a linked service".into()),
        "activity" => {
            let a = str_arg(&args, 0, name)?;
            let out = ctx.activity_outputs.get(&a).ok_or_else(|| {
                format!("activity '{a}' has no output (not run or not a dependency)")
            })?;
            Ok(json!({ "output": out }))
        }
        "concat" => {
            let mut s = String::new();
            for a in &args {
                s.push_str(&to_text(a));
            }
            Ok(Value::String(s))
        }
        "replace" => {
            let (s, old, new) = (
                str_arg(&args, 0, name)?,
                str_arg(&args, 1, name)?,
                str_arg(&args, 2, name)?,
            );
            Ok(Value::String(s.replace(&old, &new)))
        }
        "uriComponent" => {
            // Data Factory escapes like .NET's Uri.EscapeDataString (RFC 3986 unreserved kept).
            const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
                .remove(b'-')
                .remove(b'_')
                .remove(b'.')
                .remove(b'~');
            let s = str_arg(&args, 0, name)?;
            Ok(Value::String(
                percent_encoding::utf8_percent_encode(&s, SET).to_string(),
            ))
        }
        "string" => Ok(Value::String(to_text(
            args.first().ok_or("string: no argument")?,
        ))),
        "int" => match args.first() {
            Some(Value::String(s)) => s
                .trim()
                .parse::<i64>()
                .map(|n| json!(n))
                .map_err(|e| e.to_string()),
            Some(Value::Number(n)) => Ok(json!(n.as_f64().unwrap_or(0.0) as i64)),
            other => Err(format!("int: bad argument {other:?}")),
        },
        "equals" => {
            let (a, b) = (
                args.first().ok_or("equals: 2 args")?,
                args.get(1).ok_or("equals: 2 args")?,
            );
            let eq = match (a.as_f64(), b.as_f64()) {
                (Some(x), Some(y)) => x == y,
                _ => a == b,
            };
            Ok(Value::Bool(eq))
        }
        "empty" => Ok(Value::Bool(match args.first() {
            Some(Value::Null) | None => true,
            Some(Value::String(s)) => s.is_empty(),
            Some(Value::Array(a)) => a.is_empty(),
            Some(Value::Object(o)) => o.is_empty(),
            Some(_) => false,
        })),
        "if" => {
            let c = args
                .first()
                .and_then(Value::as_bool)
                .ok_or("if: condition must be boolean")?;
            args.get(if c { 1 } else { 2 })
                .cloned()
                .ok_or_else(|| "if: 3 arguments".into())
        }
        "and" => Ok(Value::Bool(args.iter().all(|a| a.as_bool() == Some(true)))),
        "or" => Ok(Value::Bool(args.iter().any(|a| a.as_bool() == Some(true)))),
        "not" => Ok(Value::Bool(
            args.first().and_then(Value::as_bool) != Some(true),
        )),
        other => Err(format!(
            "function '{other}' is not supported by the stand-in"
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// What a run does to storage
// ---------------------------------------------------------------------------------------------

/// The storage request that the pipeline's Web activity resolved to.
#[derive(Clone, Debug)]
pub struct ResolvedCopy {
    pub run_id: String,
    pub activity: String,
    pub method: String,
    /// Target blob URL (the request URL of Put Blob From URL).
    pub url: String,
    /// Header names lower-cased (plus `content-length`, from the body). `x-ms-copy-source` holds
    /// the SAS: tests may check it, never print it.
    pub headers: BTreeMap<String, String>,
    /// MSI resource of the activity's authentication.
    pub msi_resource: String,
}

impl ResolvedCopy {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
    pub fn source_url(&self) -> Option<&str> {
        self.header("x-ms-copy-source")
    }
}

/// A blob as a dataset resolves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedBlob {
    pub endpoint: String,
    pub container: String,
    pub blob: String,
}

/// The storage side of the stand-in: tests supply an in-memory store or wire it to Azurite.
#[async_trait]
pub trait StandInStorage: Send + Sync + 'static {
    /// Perform Put Blob From URL as `copy` describes it. Ok = the new ETag of the target.
    /// Err = the storage error text (becomes the activity's error).
    async fn put_blob_from_url(&self, copy: &ResolvedCopy) -> Result<String, String>;
    /// Get Metadata of a blob: Ok(None) = does not exist, Ok(Some(size)).
    async fn blob_size(&self, blob: &ResolvedBlob) -> Result<Option<u64>, String>;
}

/// Splits `{endpoint}/{container}/{blob...}[?snapshot=...]` given the account endpoint, decoding
/// the percent-escapes as the storage service does.
pub fn split_blob_url(url: &str, endpoint: &str) -> Option<(String, String, Option<String>)> {
    let endpoint = endpoint.trim_end_matches('/');
    let rest = url.strip_prefix(endpoint)?.strip_prefix('/')?;
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    let (container, blob) = path.split_once('/')?;
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .ok()
            .map(|c| c.into_owned())
    };
    let snapshot = query.and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "snapshot")
            .map(|(_, v)| v.into_owned())
    });
    Some((decode(container)?, decode(blob)?, snapshot))
}

/// (container, blob, snapshot)
pub type SnapshotKey = (String, String, String);
/// (container, blob)
pub type BlobKey = (String, String);
/// One blob of the in-memory backup account.
#[derive(Clone, Debug)]
pub struct BackupBlob {
    pub etag: String,
    pub content: Vec<u8>,
    /// Its length as the service reports it (`content.len()` unless a test declared more).
    pub size: u64,
    /// Request headers of the copy that wrote it.
    pub headers: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
}

/// In-memory storage with source snapshots and a backup account; checks `x-ms-source-if-match`
/// like the service (412) and answers 404 for a missing snapshot.
pub struct MemoryStorage {
    pub source_endpoint: String,
    pub backup_endpoint: String,
    /// (container, blob, snapshot) -> (etag, content)
    pub snapshots: Mutex<HashMap<SnapshotKey, (String, Vec<u8>)>>,
    /// Live base blobs (must never be read by a copy).
    pub live: Mutex<HashMap<BlobKey, (String, Vec<u8>)>>,
    /// (container, blob) -> (etag, content, headers of the copy that wrote it)
    pub backup: Mutex<HashMap<BlobKey, BackupBlob>>,
    pub copies: Mutex<Vec<ResolvedCopy>>,
    /// The next N copies fail with this error (activity retry tests).
    pub fail_next: Mutex<(u32, String)>,
    /// Content written instead of the snapshot's (to make the size check fail).
    pub corrupt_next: Mutex<bool>,
    /// Declared lengths of snapshots bigger than a test wants to hold in memory.
    pub sizes: Mutex<HashMap<SnapshotKey, u64>>,
    /// Every copy-source SAS issued ([`lakeguard::copy::datafactory::SourceAuthorizer`]), by
    /// signature: what it was issued for.
    pub issued_sas: Mutex<HashMap<String, IssuedSas>>,
    etag_seq: AtomicU64,
}

/// What a SAS issued by [`MemoryStorage`] grants.
#[derive(Clone, Debug)]
pub struct IssuedSas {
    pub container: String,
    pub blob: String,
    pub snapshot: String,
    pub start: OffsetDateTime,
    pub expiry: OffsetDateTime,
    /// The SAS as issued (a query string).
    pub query: String,
}

impl MemoryStorage {
    pub fn new(source_endpoint: &str, backup_endpoint: &str) -> Arc<Self> {
        Arc::new(MemoryStorage {
            source_endpoint: source_endpoint.trim_end_matches('/').to_owned(),
            backup_endpoint: backup_endpoint.trim_end_matches('/').to_owned(),
            snapshots: Mutex::default(),
            live: Mutex::default(),
            backup: Mutex::default(),
            copies: Mutex::default(),
            fail_next: Mutex::new((0, String::new())),
            corrupt_next: Mutex::new(false),
            sizes: Mutex::default(),
            issued_sas: Mutex::default(),
            etag_seq: AtomicU64::new(1),
        })
    }

    pub fn add_snapshot(
        &self,
        container: &str,
        blob: &str,
        snapshot: &str,
        etag: &str,
        content: &[u8],
    ) {
        self.snapshots.lock().unwrap().insert(
            (container.into(), blob.into(), snapshot.into()),
            (etag.into(), content.to_vec()),
        );
    }

    /// A snapshot whose service-reported length is `size` (a few bytes of content stand for it).
    pub fn add_snapshot_sized(
        &self,
        container: &str,
        blob: &str,
        snapshot: &str,
        etag: &str,
        content: &[u8],
        size: u64,
    ) {
        self.add_snapshot(container, blob, snapshot, etag, content);
        self.sizes
            .lock()
            .unwrap()
            .insert((container.into(), blob.into(), snapshot.into()), size);
    }

    /// Makes every SAS issued so far expired (a run that starts its copy too late).
    pub fn expire_issued_sas(&self) {
        for sas in self.issued_sas.lock().unwrap().values_mut() {
            sas.expiry = now() - time::Duration::seconds(1);
        }
    }

    /// Checks the SAS of a copy-source URL like the service: known signature, read only, blob
    /// snapshot scope, exactly this snapshot, within its validity, at most 30 minutes in all.
    /// Errors never quote the SAS.
    fn verify_source_sas(
        &self,
        query: Option<&str>,
        container: &str,
        blob: &str,
        snapshot: Option<&str>,
    ) -> Result<(), String> {
        let q: BTreeMap<String, String> =
            url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
        let fail = |why: &str| {
            Err(format!(
                "403 CannotVerifyCopySource: AuthenticationFailed ({why})"
            ))
        };
        let Some(sig) = q.get("sig") else {
            return fail("the copy source carries no SAS");
        };
        let Some(issued) = self.issued_sas.lock().unwrap().get(sig).cloned() else {
            return fail("signature not recognised");
        };
        if q.get("sp").map(String::as_str) != Some("r")
            || q.get("sr").map(String::as_str) != Some("bs")
        {
            return fail("the SAS is not a read-only snapshot SAS");
        }
        if (
            issued.container.as_str(),
            issued.blob.as_str(),
            Some(issued.snapshot.as_str()),
        ) != (container, blob, snapshot)
        {
            return fail("the SAS was issued for another blob or snapshot");
        }
        let t = now();
        if t < issued.start || t >= issued.expiry {
            return fail("signed expiry time has passed or start time is ahead");
        }
        if issued.expiry - issued.start > time::Duration::minutes(30) {
            return fail("lifetime above 30 minutes");
        }
        Ok(())
    }

    pub fn set_live(&self, container: &str, blob: &str, etag: &str, content: &[u8]) {
        self.live.lock().unwrap().insert(
            (container.into(), blob.into()),
            (etag.into(), content.to_vec()),
        );
    }

    pub fn backup_blob(&self, container: &str, blob: &str) -> Option<BackupBlob> {
        self.backup
            .lock()
            .unwrap()
            .get(&(container.into(), blob.into()))
            .cloned()
    }

    pub fn backup_content(&self, container: &str, blob: &str) -> Option<Vec<u8>> {
        self.backup_blob(container, blob).map(|b| b.content)
    }

    /// Writes a backup blob directly (another writer), returning its ETag.
    pub fn put_backup(
        &self,
        container: &str,
        blob: &str,
        content: &[u8],
        metadata: BTreeMap<String, String>,
    ) -> String {
        let etag = self.next_etag();
        self.backup.lock().unwrap().insert(
            (container.into(), blob.into()),
            BackupBlob {
                etag: etag.clone(),
                content: content.to_vec(),
                size: content.len() as u64,
                headers: BTreeMap::new(),
                metadata,
            },
        );
        etag
    }

    fn next_etag(&self) -> String {
        format!(
            "\"0x8DC{:012X}\"",
            self.etag_seq.fetch_add(1, Ordering::SeqCst)
        )
    }
}

#[async_trait]
impl StandInStorage for MemoryStorage {
    async fn put_blob_from_url(&self, copy: &ResolvedCopy) -> Result<String, String> {
        self.copies.lock().unwrap().push(copy.clone());
        {
            let mut f = self.fail_next.lock().unwrap();
            if f.0 > 0 {
                f.0 -= 1;
                return Err(f.1.clone());
            }
        }
        let (tc, tb, tsnap) =
            split_blob_url(&copy.url, &self.backup_endpoint).ok_or_else(|| {
                format!(
                    "404 AccountNotFound: target {} is not in the backup account",
                    copy.url
                )
            })?;
        if tsnap.is_some() {
            return Err("400 InvalidQueryParameterValue: a snapshot cannot be written".into());
        }
        if copy.header("content-length") != Some("0") {
            return Err(format!(
                "400 InvalidHeaderValue: Put Blob From URL needs Content-Length: 0, got {:?}",
                copy.header("content-length")
            ));
        }
        if copy.header("x-ms-copy-source-authorization").is_some() {
            return Err("400: the copy source must be authorised by its SAS alone".into());
        }
        let src = copy
            .source_url()
            .ok_or("400 MissingRequiredHeader: x-ms-copy-source")?;
        let without_query = src.split('?').next().unwrap_or_default();
        let (sc, sb, ssnap) = split_blob_url(src, &self.source_endpoint).ok_or_else(|| {
            format!("403 CannotVerifyCopySource: {without_query} is not in the source account")
        })?;
        self.verify_source_sas(
            src.split_once('?').map(|(_, q)| q),
            &sc,
            &sb,
            ssnap.as_deref(),
        )?;
        let declared = ssnap.as_ref().and_then(|snap| {
            self.sizes
                .lock()
                .unwrap()
                .get(&(sc.clone(), sb.clone(), snap.clone()))
                .copied()
        });
        let content = match ssnap {
            Some(snap) => {
                let snaps = self.snapshots.lock().unwrap();
                let (etag, content) = snaps
                    .get(&(sc.clone(), sb.clone(), snap.clone()))
                    .ok_or_else(|| {
                        format!(
                            "404 CannotVerifyCopySource: BlobNotFound {sc}/{sb}?snapshot={snap}"
                        )
                    })?;
                if let Some(want) = copy.header("x-ms-source-if-match") {
                    if want.trim_matches('"') != etag.trim_matches('"') {
                        return Err(
                            "412 CannotVerifyCopySource: ConditionNotMet (x-ms-source-if-match)"
                                .into(),
                        );
                    }
                }
                content.clone()
            }
            None => {
                // The live blob: a correct pipeline never gets here; copy it anyway so that a
                // wrong pipeline shows up as wrong content in the tests.
                let live = self.live.lock().unwrap();
                live.get(&(sc.clone(), sb.clone()))
                    .map(|l| l.1.clone())
                    .ok_or("404 BlobNotFound")?
            }
        };
        let content = if std::mem::take(&mut *self.corrupt_next.lock().unwrap()) {
            b"corrupted".to_vec()
        } else {
            content
        };
        let mut backup = self.backup.lock().unwrap();
        let key = (tc, tb);
        let current = backup.get(&key).map(|b| b.etag.clone());
        if let Some(m) = copy.header("if-match") {
            if m != "*"
                && current.as_deref().map(|e| e.trim_matches('"')) != Some(m.trim_matches('"'))
            {
                return Err("412 ConditionNotMet: If-Match".into());
            }
        }
        if copy.header("if-none-match") == Some("*") && current.is_some() {
            return Err("409 BlobAlreadyExists: If-None-Match: *".into());
        }
        let metadata = copy
            .headers
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("x-ms-meta-")
                    .map(|n| (n.to_owned(), v.clone()))
            })
            .collect();
        let etag = self.next_etag();
        let size = declared.unwrap_or(content.len() as u64);
        backup.insert(
            key,
            BackupBlob {
                etag: etag.clone(),
                content,
                size,
                headers: copy.headers.clone(),
                metadata,
            },
        );
        Ok(etag)
    }

    async fn blob_size(&self, blob: &ResolvedBlob) -> Result<Option<u64>, String> {
        if blob.endpoint.trim_end_matches('/') != self.backup_endpoint {
            return Err(format!(
                "403 AuthorizationFailure: {} is not the backup account",
                blob.endpoint
            ));
        }
        Ok(self
            .backup
            .lock()
            .unwrap()
            .get(&(blob.container.clone(), blob.blob.clone()))
            .map(|b| b.size))
    }
}

impl std::fmt::Debug for MemoryStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoryStorage")
    }
}

/// The engine's view of the backup account, served from the same memory.
#[async_trait]
impl lakeguard::copy::datafactory::BackupBlobs for MemoryStorage {
    async fn head(
        &self,
        container: &str,
        blob: &str,
    ) -> Result<Option<lakeguard::copy::datafactory::BackupBlobInfo>, lakeguard::copy::CopyError>
    {
        Ok(self.backup_blob(container, blob).map(|b| {
            lakeguard::copy::datafactory::BackupBlobInfo {
                etag: lakeguard::model::Etag::new(&b.etag),
                metadata: b.metadata,
                content_length: b.size,
            }
        }))
    }

    async fn set_metadata(
        &self,
        container: &str,
        blob: &str,
        metadata: &BTreeMap<String, String>,
        if_match: &lakeguard::model::Etag,
    ) -> Result<(), lakeguard::copy::CopyError> {
        let mut backup = self.backup.lock().unwrap();
        let Some(b) = backup.get_mut(&(container.into(), blob.into())) else {
            return Err(lakeguard::copy::CopyError::Retryable(
                "404 BlobNotFound".into(),
            ));
        };
        if lakeguard::model::Etag::new(&b.etag) != *if_match {
            return Err(lakeguard::copy::CopyError::Retryable(
                "412 ConditionNotMet".into(),
            ));
        }
        b.metadata = metadata.clone();
        b.etag = self.next_etag();
        Ok(())
    }
}

/// The engine's copy-source SAS, issued by the same memory that checks it. Its shape is the
/// real one (`sv`, `sr=bs`, `sp=r`, `st`, `se`, `spr=https`, `sig`); the signature is a random
/// token the store remembers.
#[async_trait]
impl lakeguard::copy::datafactory::SourceAuthorizer for MemoryStorage {
    async fn snapshot_sas(
        &self,
        container: &str,
        blob: &str,
        snapshot: &str,
        valid_for: time::Duration,
    ) -> Result<String, lakeguard::copy::CopyError> {
        let t = now();
        let start = t - time::Duration::minutes(5);
        let expiry = t + valid_for.min(time::Duration::minutes(25));
        let n = self.etag_seq.fetch_add(1, Ordering::SeqCst);
        let sig = base64::engine::general_purpose::STANDARD
            .encode(format!("memsig-{n}-{}", now().unix_timestamp_nanos()));
        let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let query = format!(
            "sv=2021-08-06&sr=bs&sp=r&st={}&se={}&spr=https&sig={}",
            enc(&rfc3339(start)),
            enc(&rfc3339(expiry)),
            enc(&sig)
        );
        self.issued_sas.lock().unwrap().insert(
            sig,
            IssuedSas {
                container: container.into(),
                blob: blob.into(),
                snapshot: snapshot.into(),
                start,
                expiry,
                query: query.clone(),
            },
        );
        Ok(query)
    }
}

// ---------------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------------

/// One request as the stand-in saw it (the Authorization header is not kept).
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Option<Value>,
    pub status: u16,
}

impl RecordedRequest {
    pub fn is_create_run(&self) -> bool {
        self.method == "POST" && self.path.ends_with("/createRun")
    }
}

/// How the next run created behaves.
#[derive(Clone, Debug)]
pub struct RunScript {
    pub queued_for: Duration,
    /// Extra time InProgress after the activities ran.
    pub in_progress_for: Duration,
    /// `Some(message)`: the run fails with this message without touching storage.
    pub fail_with: Option<String>,
}

impl Default for RunScript {
    fn default() -> Self {
        RunScript {
            queued_for: Duration::from_millis(30),
            in_progress_for: Duration::from_millis(30),
            fail_with: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct RunRecord {
    pub run_id: String,
    pub pipeline_name: String,
    /// As given in createRun (typed).
    pub parameters: Map<String, Value>,
    pub status: String,
    pub message: String,
    pub run_start: Option<OffsetDateTime>,
    pub run_end: Option<OffsetDateTime>,
    pub last_updated: OffsetDateTime,
    pub activities: Vec<Value>,
}

pub enum Fault {
    /// Answer `status` with `Retry-After: <retry_after>` (raw header value) instead of serving.
    Status {
        status: u16,
        retry_after: Option<String>,
    },
}

#[derive(Default)]
struct Inner {
    requests: Vec<RecordedRequest>,
    runs: Vec<RunRecord>,
    faults: Vec<Fault>,
    scripts: Vec<RunScript>,
    page_size: usize,
    /// The next Get Pipeline Run calls answer only after this long (client timeouts).
    get_delays: Vec<Duration>,
    web_response: WebResponsePolicy,
}

pub struct StandInState {
    pub subscription: String,
    pub resource_group: String,
    pub factory: String,
    pub definition: FactoryDefinition,
    storage: Arc<dyn StandInStorage>,
    inner: Mutex<Inner>,
    seq: AtomicU64,
}

/// The stand-in, served over https (`https://127.0.0.1:<port>`): lakeguard refuses an http ARM
/// endpoint, since it sends bearer tokens there. Clients must trust [`Self::pki`]'s CA
/// ([`Self::http_client`], or `LAKEGUARD_CA_CERT` = `pki.ca_cert`).
pub struct DataFactoryStandIn {
    pub base_url: String,
    pub state: Arc<StandInState>,
    pub pki: crate::support::TestPki,
    task: tokio::task::JoinHandle<()>,
    _pki_dir: Option<tempfile::TempDir>,
}

impl Drop for DataFactoryStandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn arm_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// Decodes (does not verify) the payload of a JWT.
pub fn jwt_payload(token: &str) -> Option<Value> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// True when `authorization` is `Bearer <jwt>` with `aud` = `audience` (with or without the
/// trailing slash) and not expired.
pub fn bearer_has_audience(authorization: Option<&str>, audience: &str) -> Result<(), String> {
    let token = authorization
        .and_then(|h| h.strip_prefix("Bearer "))
        .ok_or("no bearer token")?;
    let claims = jwt_payload(token).ok_or("the bearer token is not a JWT")?;
    let aud = claims["aud"].as_str().unwrap_or("");
    if aud.trim_end_matches('/') != audience.trim_end_matches('/') {
        return Err(format!("token audience '{aud}' is not '{audience}'"));
    }
    if let Some(exp) = claims["exp"].as_i64() {
        if exp < now().unix_timestamp() {
            return Err("token expired".into());
        }
    }
    Ok(())
}

impl DataFactoryStandIn {
    /// The stand-in with a PKI of its own.
    pub async fn start(
        subscription: &str,
        resource_group: &str,
        factory: &str,
        storage: Arc<dyn StandInStorage>,
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = crate::support::TestPki::generate(dir.path());
        let mut s = Self::start_with_pki(subscription, resource_group, factory, storage, pki).await;
        s._pki_dir = Some(dir);
        s
    }

    /// The stand-in presenting `pki`'s leaf (e.g. Azurite's, whose CA lakeguard already trusts).
    pub async fn start_with_pki(
        subscription: &str,
        resource_group: &str,
        factory: &str,
        storage: Arc<dyn StandInStorage>,
        pki: crate::support::TestPki,
    ) -> Self {
        let state = Arc::new(StandInState {
            subscription: subscription.into(),
            resource_group: resource_group.into(),
            factory: factory.into(),
            definition: FactoryDefinition::shipped(),
            storage,
            inner: Mutex::new(Inner {
                page_size: 100,
                ..Default::default()
            }),
            seq: AtomicU64::new(1),
        });
        let prefix = "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.DataFactory/factories/{factory}";
        let app = Router::new()
            .route(
                &format!("{prefix}/pipelines/{{pipeline}}/createRun"),
                post(create_run),
            )
            .route(&format!("{prefix}/pipelineruns/{{run}}"), get(get_run))
            .route(&format!("{prefix}/queryPipelineRuns"), post(query_runs))
            .route(
                &format!("{prefix}/pipelineruns/{{run}}/queryActivityruns"),
                post(query_activity_runs),
            )
            .fallback(fallback)
            .with_state(state.clone());
        let listener = crate::support::certs::TlsListener::bind(&pki).await;
        let addr = axum::serve::Listener::local_addr(&listener).unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        DataFactoryStandIn {
            base_url: format!("https://{addr}"),
            state,
            pki,
            task,
            _pki_dir: None,
        }
    }

    /// A client that trusts the stand-in's CA.
    pub fn http_client(&self) -> reqwest::Client {
        self.pki.client()
    }

    /// The next `n` requests (any operation) get `status` with the given Retry-After.
    pub fn fail_next(&self, n: usize, status: u16, retry_after: Option<&str>) {
        let mut inner = self.state.inner.lock().unwrap();
        for _ in 0..n {
            inner.faults.push(Fault::Status {
                status,
                retry_after: retry_after.map(str::to_owned),
            });
        }
    }

    /// The next `n` Get Pipeline Run calls are answered only after `delay`.
    pub fn delay_next_gets(&self, n: usize, delay: Duration) {
        let mut inner = self.state.inner.lock().unwrap();
        for _ in 0..n {
            inner.get_delays.push(delay);
        }
    }

    /// The next run created follows `script` (then the default again).
    pub fn script_next_run(&self, script: RunScript) {
        self.state.inner.lock().unwrap().scripts.push(script);
    }

    /// How Web activities treat their endpoint's answer from now on.
    pub fn set_web_response_policy(&self, policy: WebResponsePolicy) {
        self.state.inner.lock().unwrap().web_response = policy;
    }

    /// Page size of queryPipelineRuns (small values force continuation tokens).
    pub fn set_page_size(&self, n: usize) {
        self.state.inner.lock().unwrap().page_size = n.max(1);
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.inner.lock().unwrap().requests.clone()
    }

    pub fn create_run_count(&self) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.is_create_run() && r.status == 200)
            .count()
    }

    pub fn runs(&self) -> Vec<RunRecord> {
        self.state.inner.lock().unwrap().runs.clone()
    }

    pub fn run(&self, run_id: &str) -> Option<RunRecord> {
        self.runs().into_iter().find(|r| r.run_id == run_id)
    }

    /// Waits until no run is Queued/InProgress (bounded).
    pub async fn wait_idle(&self, max: Duration) {
        let end = tokio::time::Instant::now() + max;
        while tokio::time::Instant::now() < end {
            if self
                .runs()
                .iter()
                .all(|r| r.status != "Queued" && r.status != "InProgress")
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("runs still active after {max:?}");
    }
}

impl StandInState {
    fn record(&self, method: &Method, uri: &Uri, body: Option<Value>, status: StatusCode) {
        // The body of createRun holds SecureString parameters (the SAS): mask them in the record.
        let secure = self.definition.secure_parameters();
        let body = body.map(|mut b| {
            for k in &secure {
                if let Some(v) = b.get_mut(k) {
                    *v = json!("<masked>");
                }
            }
            b
        });
        self.inner.lock().unwrap().requests.push(RecordedRequest {
            method: method.to_string(),
            path: uri.path().to_owned(),
            query: uri.query().unwrap_or("").to_owned(),
            body,
            status: status.as_u16(),
        });
    }

    /// Checks shared by every operation; Some(response) = refuse.
    fn gate(
        &self,
        sub: &str,
        rg: &str,
        factory: &str,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Option<Response> {
        if let Some(Fault::Status {
            status,
            retry_after,
        }) = {
            let mut inner = self.inner.lock().unwrap();
            if inner.faults.is_empty() {
                None
            } else {
                Some(inner.faults.remove(0))
            }
        } {
            let status = StatusCode::from_u16(status).unwrap();
            let mut resp = arm_error(status, "TooManyRequests", "scripted fault");
            if let Some(ra) = retry_after {
                resp.headers_mut()
                    .insert("retry-after", ra.parse().unwrap());
            }
            return Some(resp);
        }
        let versions: Vec<String> = query
            .map(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .filter(|(k, _)| k == "api-version")
                    .map(|(_, v)| v.into_owned())
                    .collect()
            })
            .unwrap_or_default();
        if versions.len() != 1 || versions[0] != API_VERSION {
            return Some(arm_error(
                StatusCode::BAD_REQUEST,
                "InvalidApiVersionParameter",
                &format!("api-version must be {API_VERSION}, got {versions:?}"),
            ));
        }
        let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
        if let Err(e) = bearer_has_audience(auth, "https://management.azure.com") {
            return Some(arm_error(
                StatusCode::UNAUTHORIZED,
                "AuthenticationFailed",
                &e,
            ));
        }
        if sub != self.subscription || rg != self.resource_group || factory != self.factory {
            return Some(arm_error(
                StatusCode::NOT_FOUND,
                "ResourceNotFound",
                &format!("factory {sub}/{rg}/{factory} not found"),
            ));
        }
        None
    }

    fn new_run_id(&self) -> String {
        let n = self.seq.fetch_add(1, Ordering::SeqCst);
        let t = now().unix_timestamp_nanos() as u64;
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            (t >> 32) as u32,
            (t >> 16) as u16,
            n & 0xfff,
            (t & 0xfff),
            n
        )
    }

    fn update_run(&self, run_id: &str, f: impl FnOnce(&mut RunRecord)) {
        let mut inner = self.inner.lock().unwrap();
        if let Some(r) = inner.runs.iter_mut().find(|r| r.run_id == run_id) {
            f(r);
            r.last_updated = now();
        }
    }
}

fn run_json(r: &RunRecord, secure: &std::collections::BTreeSet<String>) -> Value {
    // Data Factory reports parameter values as strings; SecureString values are not given back.
    let params: Map<String, Value> = r
        .parameters
        .iter()
        .map(|(k, v)| {
            let s = if secure.contains(k) {
                "**********".to_owned()
            } else {
                to_text(v)
            };
            (k.clone(), Value::String(s))
        })
        .collect();
    json!({
        "id": format!("/pipelineruns/{}", r.run_id),
        "runId": r.run_id,
        "runGroupId": r.run_id,
        "isLatest": true,
        "pipelineName": r.pipeline_name,
        "parameters": params,
        "runDimensions": {},
        "invokedBy": {"name": "Manual", "id": "manual", "invokedByType": "Manual"},
        "lastUpdated": rfc3339(r.last_updated),
        "runStart": r.run_start.map(rfc3339),
        "runEnd": r.run_end.map(rfc3339),
        "durationInMs": match (r.run_start, r.run_end) {
            (Some(s), Some(e)) => json!((e - s).whole_milliseconds() as i64),
            _ => Value::Null,
        },
        "status": r.status,
        "message": r.message,
    })
}

type Segs4 = (String, String, String, String);

async fn create_run(
    State(st): State<Arc<StandInState>>,
    AxPath((sub, rg, factory, pipeline)): AxPath<Segs4>,
    method: Method,
    uri: Uri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let parsed: Option<Value> = if body.is_empty() {
        Some(Value::Null)
    } else {
        serde_json::from_slice(&body).ok()
    };
    let resp = (|| {
        if let Some(r) = st.gate(&sub, &rg, &factory, query.as_deref(), &headers) {
            return r;
        }
        let Some(def) = st.definition.pipeline(&pipeline).cloned() else {
            return arm_error(
                StatusCode::NOT_FOUND,
                "PipelineNotFound",
                &format!("pipeline {pipeline} not found"),
            );
        };
        let Some(body) = parsed.clone() else {
            return arm_error(StatusCode::BAD_REQUEST, "BadRequest", "body is not JSON");
        };
        let ct_json = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if !body.is_null() && !ct_json {
            return arm_error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                "JSON body expected",
            );
        }
        let params = match validate_run_parameters(&def, &body) {
            Ok(p) => p,
            Err(e) => return arm_error(StatusCode::BAD_REQUEST, "BadRequest", &e),
        };
        let run_id = st.new_run_id();
        let script = {
            let mut inner = st.inner.lock().unwrap();
            let script = if inner.scripts.is_empty() {
                RunScript::default()
            } else {
                inner.scripts.remove(0)
            };
            inner.runs.push(RunRecord {
                run_id: run_id.clone(),
                pipeline_name: pipeline.clone(),
                parameters: params.clone(),
                status: "Queued".into(),
                message: String::new(),
                run_start: None,
                run_end: None,
                last_updated: now(),
                activities: Vec::new(),
            });
            script
        };
        tokio::spawn(drive_run(st.clone(), def, run_id.clone(), params, script));
        (StatusCode::OK, Json(json!({ "runId": run_id }))).into_response()
    })();
    st.record(&method, &uri, parsed, resp.status());
    resp
}

async fn get_run(
    State(st): State<Arc<StandInState>>,
    AxPath((sub, rg, factory, run)): AxPath<Segs4>,
    method: Method,
    uri: Uri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let delay = {
        let mut inner = st.inner.lock().unwrap();
        if inner.get_delays.is_empty() {
            None
        } else {
            Some(inner.get_delays.remove(0))
        }
    };
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    let resp = st
        .gate(&sub, &rg, &factory, query.as_deref(), &headers)
        .unwrap_or_else(|| {
            let inner = st.inner.lock().unwrap();
            match inner.runs.iter().find(|r| r.run_id == run) {
                Some(r) => Json(run_json(r, &st.definition.secure_parameters())).into_response(),
                None => arm_error(
                    StatusCode::NOT_FOUND,
                    "PipelineRunNotFound",
                    &format!("run {run} not found"),
                ),
            }
        });
    st.record(&method, &uri, None, resp.status());
    resp
}

fn parse_window(body: &Value) -> Result<(OffsetDateTime, OffsetDateTime), String> {
    let f = |k: &str| -> Result<OffsetDateTime, String> {
        let s = body[k].as_str().ok_or_else(|| format!("{k} is required"))?;
        OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
            .map_err(|e| format!("{k}: {e}"))
    };
    Ok((f("lastUpdatedAfter")?, f("lastUpdatedBefore")?))
}

async fn query_runs(
    State(st): State<Arc<StandInState>>,
    AxPath((sub, rg, factory)): AxPath<(String, String, String)>,
    method: Method,
    uri: Uri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let resp = (|| {
        if let Some(r) = st.gate(&sub, &rg, &factory, query.as_deref(), &headers) {
            return r;
        }
        let Some(body) = parsed.clone() else {
            return arm_error(StatusCode::BAD_REQUEST, "BadRequest", "body is not JSON");
        };
        let (after, before) = match parse_window(&body) {
            Ok(w) => w,
            Err(e) => return arm_error(StatusCode::BAD_REQUEST, "BadRequest", &e),
        };
        let mut filters = Vec::new();
        for f in body["filters"].as_array().into_iter().flatten() {
            let operand = f["operand"].as_str().unwrap_or("");
            let operator = f["operator"].as_str().unwrap_or("");
            let values: Vec<String> = f["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect();
            if !matches!(operand, "PipelineName" | "Status" | "RunId")
                || !matches!(operator, "Equals" | "In")
            {
                return arm_error(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("stand-in does not support filter {operand} {operator}"),
                );
            }
            filters.push((operand.to_owned(), values));
        }
        let inner = st.inner.lock().unwrap();
        let matching: Vec<&RunRecord> = inner
            .runs
            .iter()
            .filter(|r| r.last_updated >= after && r.last_updated <= before)
            .filter(|r| {
                filters.iter().all(|(op, vals)| {
                    let field = match op.as_str() {
                        "PipelineName" => &r.pipeline_name,
                        "Status" => &r.status,
                        _ => &r.run_id,
                    };
                    vals.iter().any(|v| v == field)
                })
            })
            .collect();
        let start: usize = match body.get("continuationToken").and_then(Value::as_str) {
            Some(t) => match t.strip_prefix("page-").and_then(|n| n.parse().ok()) {
                Some(n) => n,
                None => {
                    return arm_error(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        "invalid continuationToken",
                    )
                }
            },
            None => 0,
        };
        let end = (start + inner.page_size).min(matching.len());
        let page: Vec<Value> = matching[start.min(end)..end]
            .iter()
            .map(|r| run_json(r, &st.definition.secure_parameters()))
            .collect();
        let mut out = json!({ "value": page });
        if end < matching.len() {
            out["continuationToken"] = json!(format!("page-{end}"));
        }
        Json(out).into_response()
    })();
    st.record(&method, &uri, parsed, resp.status());
    resp
}

async fn query_activity_runs(
    State(st): State<Arc<StandInState>>,
    AxPath((sub, rg, factory, run)): AxPath<Segs4>,
    method: Method,
    uri: Uri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let resp = (|| {
        if let Some(r) = st.gate(&sub, &rg, &factory, query.as_deref(), &headers) {
            return r;
        }
        let Some(body) = parsed.clone() else {
            return arm_error(StatusCode::BAD_REQUEST, "BadRequest", "body is not JSON");
        };
        if let Err(e) = parse_window(&body) {
            return arm_error(StatusCode::BAD_REQUEST, "BadRequest", &e);
        }
        let names: Option<Vec<String>> = body["filters"].as_array().map(|fs| {
            fs.iter()
                .filter(|f| f["operand"] == "ActivityName")
                .flat_map(|f| f["values"].as_array().cloned().unwrap_or_default())
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        });
        let inner = st.inner.lock().unwrap();
        let Some(r) = inner.runs.iter().find(|r| r.run_id == run) else {
            return arm_error(StatusCode::NOT_FOUND, "PipelineRunNotFound", "no such run");
        };
        let acts: Vec<Value> = r
            .activities
            .iter()
            .filter(|a| match &names {
                Some(n) if !n.is_empty() => n.iter().any(|x| a["activityName"] == x.as_str()),
                _ => true,
            })
            .cloned()
            .collect();
        Json(json!({ "value": acts })).into_response()
    })();
    st.record(&method, &uri, parsed, resp.status());
    resp
}

async fn fallback(
    State(st): State<Arc<StandInState>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    let resp = arm_error(
        StatusCode::NOT_FOUND,
        "NoRegisteredProviderFound",
        &format!("the stand-in does not serve {method} {}", uri.path()),
    );
    st.record(
        &method,
        &uri,
        serde_json::from_slice(&body).ok(),
        resp.status(),
    );
    resp
}

// ---------------------------------------------------------------------------------------------
// Running the pipeline
// ---------------------------------------------------------------------------------------------

async fn drive_run(
    st: Arc<StandInState>,
    pipeline: Value,
    run_id: String,
    params: Map<String, Value>,
    script: RunScript,
) {
    tokio::time::sleep(script.queued_for).await;
    st.update_run(&run_id, |r| {
        r.status = "InProgress".into();
        r.run_start = Some(now());
    });
    let result = match &script.fail_with {
        Some(msg) => Err(msg.clone()),
        None => {
            let mut exec = Execution {
                st: st.clone(),
                ctx: ExprContext {
                    pipeline_name: pipeline["name"].as_str().unwrap_or("").to_owned(),
                    run_id: run_id.clone(),
                    pipeline_parameters: params,
                    ..Default::default()
                },
                activity_runs: Vec::new(),
            };
            let activities = pipeline["properties"]["activities"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let r = exec.run_activities(&activities).await;
            let acts = exec.activity_runs;
            st.update_run(&run_id, |rec| rec.activities = acts);
            r
        }
    };
    tokio::time::sleep(script.in_progress_for).await;
    st.update_run(&run_id, |r| {
        r.run_end = Some(now());
        match result {
            Ok(()) => r.status = "Succeeded".into(),
            Err(m) => {
                r.status = "Failed".into();
                r.message = m;
            }
        }
    });
}

struct Execution {
    st: Arc<StandInState>,
    ctx: ExprContext,
    activity_runs: Vec<Value>,
}

impl Execution {
    /// Runs activities in dependency order; an activity whose dependency did not succeed is skipped.
    async fn run_activities(&mut self, activities: &[Value]) -> Result<(), String> {
        let mut done: BTreeMap<String, bool> = BTreeMap::new();
        let mut remaining: Vec<&Value> = activities.iter().collect();
        while !remaining.is_empty() {
            let idx = remaining.iter().position(|a| {
                a["dependsOn"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .all(|d| done.contains_key(d["activity"].as_str().unwrap_or("")))
            });
            let Some(idx) = idx else {
                return Err("activities have unresolvable dependencies".into());
            };
            let act = remaining.remove(idx);
            let name = act["name"].as_str().unwrap_or("").to_owned();
            let deps_ok = act["dependsOn"].as_array().into_iter().flatten().all(|d| {
                let ok = done
                    .get(d["activity"].as_str().unwrap_or(""))
                    .copied()
                    .unwrap_or(false);
                let conds: Vec<&str> = d["dependencyConditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                conds.iter().any(|c| {
                    (*c == "Succeeded" && ok) || (*c == "Failed" && !ok) || *c == "Completed"
                })
            });
            if !deps_ok {
                done.insert(name, false);
                continue;
            }
            match self.run_activity(act).await {
                Ok(()) => {
                    done.insert(name, true);
                }
                Err(e) => {
                    done.insert(name.clone(), false);
                    // Like Data Factory's run message for a failed activity.
                    return Err(format!("Operation on target {name} failed: {e}"));
                }
            }
        }
        Ok(())
    }

    async fn run_activity(&mut self, act: &Value) -> Result<(), String> {
        let name = act["name"].as_str().unwrap_or("").to_owned();
        let ty = act["type"].as_str().unwrap_or("");
        let retries = act["policy"]["retry"].as_u64().unwrap_or(0);
        let start = now();
        let mut attempt = 0;
        let result = loop {
            let r = match ty {
                "WebActivity" => self.web_activity(&name, act).await,
                "GetMetadata" => self.get_metadata(act).await,
                "IfCondition" => self.if_condition(act).await,
                "Fail" => self.fail(act),
                other => Err(format!("the stand-in cannot run activity type {other}")),
            };
            match r {
                Err(e) if attempt < retries && ty != "Fail" && ty != "IfCondition" => {
                    attempt += 1;
                    let _ = e;
                }
                r => break r,
            }
        };
        let (status, output, error) = match &result {
            Ok(out) => ("Succeeded", out.clone(), Value::Null),
            Err(e) => (
                "Failed",
                Value::Null,
                json!({"errorCode": "2011", "message": e, "failureType": "UserError", "target": name}),
            ),
        };
        self.activity_runs.push(json!({
            "activityName": name,
            "activityType": ty,
            "activityRunId": format!("{}-{}", self.ctx.run_id, self.activity_runs.len()),
            "pipelineName": self.ctx.pipeline_name,
            "pipelineRunId": self.ctx.run_id,
            "status": status,
            "activityRunStart": rfc3339(start),
            "activityRunEnd": rfc3339(now()),
            "retryAttempt": attempt,
            "input": {},
            "output": output,
            "error": error,
        }));
        if let Ok(out) = &result {
            self.ctx.activity_outputs.insert(name, out.clone());
        }
        result.map(|_| ())
    }

    async fn web_activity(&mut self, name: &str, act: &Value) -> Result<Value, String> {
        let copy = resolve_web_request(name, act, &self.ctx)?;
        if copy.msi_resource.trim_end_matches('/') != "https://storage.azure.com" {
            return Err(format!(
                "MSI resource {} is not Azure Storage",
                copy.msi_resource
            ));
        }
        if copy.method != "PUT"
            || copy.header("x-ms-blob-type") != Some("BlockBlob")
            || copy.source_url().is_none()
        {
            return Err("the stand-in performs only Put Blob From URL (PUT, x-ms-blob-type: BlockBlob, x-ms-copy-source)".into());
        }
        // Put Blob From URL: 201 Created, no body.
        let etag = self.st.storage.put_blob_from_url(&copy).await?;
        let policy = self.st.inner.lock().unwrap().web_response;
        web_activity_output(policy, 201, b"", &etag)
    }
    /// Resolves a DatasetReference: dataset parameters from the caller's context, the linked
    /// service's parameters from the dataset's, then the blob location.
    fn resolve_dataset(&self, reference: &Value) -> Result<ResolvedBlob, String> {
        let ds_name = reference["referenceName"]
            .as_str()
            .ok_or("dataset reference without name")?;
        let ds = self
            .st
            .definition
            .datasets
            .get(ds_name)
            .ok_or_else(|| format!("dataset {ds_name} does not exist"))?;
        let declared = declared_parameters(ds);
        let mut ds_params = Map::new();
        for (k, v) in reference["parameters"].as_object().into_iter().flatten() {
            if !declared.contains_key(k) {
                return Err(format!("dataset {ds_name} has no parameter {k}"));
            }
            ds_params.insert(k.clone(), eval_property(v, &self.ctx)?);
        }
        for (k, (_, default)) in &declared {
            if !ds_params.contains_key(k) {
                ds_params.insert(
                    k.clone(),
                    default
                        .clone()
                        .ok_or_else(|| format!("dataset parameter {k} not supplied"))?,
                );
            }
        }
        let ds_ctx = ExprContext {
            dataset_parameters: Some(ds_params),
            ..self.ctx.clone()
        };
        let ls_ref = &ds["properties"]["linkedServiceName"];
        let ls_name = ls_ref["referenceName"]
            .as_str()
            .ok_or("dataset without linked service")?;
        let ls = self
            .st
            .definition
            .linked_services
            .get(ls_name)
            .ok_or_else(|| format!("linked service {ls_name} does not exist"))?;
        let ls_declared = declared_parameters(ls);
        let mut ls_params = Map::new();
        for (k, v) in ls_ref["parameters"].as_object().into_iter().flatten() {
            if !ls_declared.contains_key(k) {
                return Err(format!("linked service {ls_name} has no parameter {k}"));
            }
            ls_params.insert(k.clone(), eval_property(v, &ds_ctx)?);
        }
        for (k, (_, default)) in &ls_declared {
            if !ls_params.contains_key(k) {
                ls_params.insert(
                    k.clone(),
                    default
                        .clone()
                        .ok_or_else(|| format!("linked service parameter {k} not supplied"))?,
                );
            }
        }
        let ls_ctx = ExprContext {
            linked_service_parameters: Some(ls_params),
            ..self.ctx.clone()
        };
        if ls["properties"]["type"] != "AzureBlobStorage" {
            return Err(format!("linked service {ls_name} is not AzureBlobStorage"));
        }
        let endpoint = to_text(&eval_property(
            &ls["properties"]["typeProperties"]["serviceEndpoint"],
            &ls_ctx,
        )?);
        let loc = &ds["properties"]["typeProperties"]["location"];
        if loc["type"] != "AzureBlobStorageLocation" {
            return Err(format!(
                "dataset {ds_name} location is not AzureBlobStorageLocation"
            ));
        }
        let container = to_text(&eval_property(&loc["container"], &ds_ctx)?);
        let mut blob = to_text(&eval_property(&loc["fileName"], &ds_ctx)?);
        if let Some(folder) = loc.get("folderPath") {
            let folder = to_text(&eval_property(folder, &ds_ctx)?);
            if !folder.is_empty() {
                blob = format!("{}/{blob}", folder.trim_end_matches('/'));
            }
        }
        Ok(ResolvedBlob {
            endpoint,
            container,
            blob,
        })
    }

    async fn get_metadata(&mut self, act: &Value) -> Result<Value, String> {
        let blob = self.resolve_dataset(&act["typeProperties"]["dataset"])?;
        let size = self.st.storage.blob_size(&blob).await?;
        let mut out = Map::new();
        for f in act["typeProperties"]["fieldList"]
            .as_array()
            .into_iter()
            .flatten()
        {
            match f.as_str() {
                Some("exists") => {
                    out.insert("exists".into(), json!(size.is_some()));
                }
                Some("size") => match size {
                    Some(s) => {
                        out.insert("size".into(), json!(s));
                    }
                    None => {
                        return Err(format!(
                            "the blob {}/{} does not exist",
                            blob.container, blob.blob
                        ))
                    }
                },
                Some("itemName") => {
                    out.insert("itemName".into(), json!(blob.blob));
                }
                other => return Err(format!("stand-in does not support field {other:?}")),
            }
        }
        Ok(Value::Object(out))
    }

    async fn if_condition(&mut self, act: &Value) -> Result<Value, String> {
        let tp = &act["typeProperties"];
        let cond = eval_property(&tp["expression"], &self.ctx)?;
        let cond = cond
            .as_bool()
            .ok_or_else(|| format!("IfCondition expression is not boolean: {cond}"))?;
        let branch = if cond {
            &tp["ifTrueActivities"]
        } else {
            &tp["ifFalseActivities"]
        };
        let acts = branch.as_array().cloned().unwrap_or_default();
        Box::pin(self.run_activities(&acts)).await?;
        Ok(json!({ "ifCondition": cond }))
    }

    fn fail(&mut self, act: &Value) -> Result<Value, String> {
        let msg = to_text(&eval_property(
            &act["typeProperties"]["message"],
            &self.ctx,
        )?);
        Err(msg)
    }
}

/// What the stand-in does with a Web activity's successful answer (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WebResponsePolicy {
    /// An empty body becomes `{"Response": ""}` (observed); a JSON object is the output; any
    /// other body fails the activity (documented: unsupported).
    #[default]
    EmptyIsTolerated,
    /// Only a JSON object is accepted: an empty body fails the activity too.
    JsonOnly,
}

/// The output of a Web activity whose endpoint answered `status` with `body`, or its error.
pub fn web_activity_output(
    policy: WebResponsePolicy,
    status: u16,
    body: &[u8],
    etag: &str,
) -> Result<Value, String> {
    let headers = json!({"ETag": etag, "x-ms-request-server-encrypted": "true"});
    if body.is_empty() && policy == WebResponsePolicy::EmptyIsTolerated {
        return Ok(json!({"Response": "", "ADFWebActivityResponseHeaders": headers}));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(mut m)) => {
            m.insert("ADFWebActivityResponseHeaders".into(), headers);
            Ok(Value::Object(m))
        }
        _ => Err(format!(
            "the endpoint answered {status} with a body that is not a JSON object ({} bytes): a Web activity's endpoint must return JSON",
            body.len()
        )),
    }
}

/// Evaluates a Web activity into the HTTP request Data Factory would send, refusing what the
/// Web activity documentation does not allow. The request's `content-length` is the length of
/// the evaluated `body` (that is what goes on the wire).
pub fn resolve_web_request(
    name: &str,
    act: &Value,
    ctx: &ExprContext,
) -> Result<ResolvedCopy, String> {
    let tp = &act["typeProperties"];
    for required in ["datasets", "linkedServices"] {
        if !tp[required].is_array() {
            return Err(format!(
                "Web activity {name}: '{required}' is required (an array, may be empty)"
            ));
        }
    }
    let auth = &tp["authentication"];
    if auth["type"] != "MSI" {
        return Err(format!(
            "authentication {} is not managed identity",
            auth["type"]
        ));
    }
    let resource = to_text(&eval_property(&auth["resource"], ctx)?);
    let method = to_text(&eval_property(&tp["method"], ctx)?).to_ascii_uppercase();
    if !["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&method.as_str()) {
        return Err(format!(
            "Web activity {name}: method {method} is not supported"
        ));
    }
    let body = match tp.get("body") {
        Some(b) if method != "GET" => Some(match eval_property(b, ctx)? {
            Value::String(s) => s,
            other => other.to_string(),
        }),
        Some(_) => return Err(format!("Web activity {name}: a GET has no body")),
        None if matches!(method.as_str(), "POST" | "PUT" | "PATCH") => {
            return Err(format!(
                "Web activity {name}: 'body' is required for {method}"
            ))
        }
        None => None,
    };
    let url = to_text(&eval_property(&tp["url"], ctx)?);
    let mut headers = BTreeMap::new();
    for (k, v) in tp["headers"].as_object().into_iter().flatten() {
        headers.insert(k.to_ascii_lowercase(), to_text(&eval_property(v, ctx)?));
    }
    if let Some(b) = &body {
        headers.insert("content-length".into(), b.len().to_string());
    }
    Ok(ResolvedCopy {
        run_id: ctx.run_id.clone(),
        activity: name.to_owned(),
        method,
        url,
        headers,
        msi_resource: resource,
    })
}

// ---------------------------------------------------------------------------------------------
// Static wiring analysis (used by the wiring tests)
// ---------------------------------------------------------------------------------------------

/// Every string inside `v` (expression texts included).
pub fn all_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| all_strings(x, out)),
        Value::Object(m) => m.values().for_each(|x| all_strings(x, out)),
        _ => {}
    }
}
