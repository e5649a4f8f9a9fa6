//! A producer run that outlives one invocation. The Functions host answers an HTTP call within
//! 230 s and kills work it does not track, so a run over a large container stops at its budget
//! (between listing pages), saves its place in the backup account
//! (`lakeguard-state/producer-runs/<run id>.json`) and hands the rest to a continuation message
//! on the reconcile continuation queue (`{"v":1,"kind":"snapshot","run_id","container","hop"}`),
//! which `ReconcileWorker` (any instance) picks up, and so on until the listing ends.
//!
//! Exactly one invocation owns each hop: the document is written `If-None-Match: *` by the first
//! and `If-Match` the ETag read by every later one, and it records the hop it expects. A
//! redelivered or duplicated message whose hop is done, or whose write loses the race, stops
//! without work queued twice; a hop killed mid-way is redelivered by the host and redoes its
//! pages from the saved place (snapshots it already took are found unchanged; requests it
//! already queued are acknowledged by the worker as duplicates).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::SnapshotReport;
use crate::app::App;
use crate::core::watermark::ProducerState;
use crate::model::Etag;
use crate::ops::state;
use crate::storage::blob::TargetCondition;
use crate::storage::StorageError;

/// The continuation message's `kind` (the reconcile queue carries both kinds).
pub const MESSAGE_KIND: &str = "snapshot";

/// Everything a later invocation needs to continue a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunState {
    pub schema: u32,
    pub run_id: String,
    pub container: String,
    pub prefix: Option<String>,
    /// The watermark state the run decides by: the ETag it had when read (a later hop checks it
    /// is still that one). `None`: a full listing with snapshots.
    pub watermark: Option<Etag>,
    /// The ETag of the state read when the run decided to list in full (its save is conditional
    /// on it), and whether reading it failed.
    pub state_etag: Option<Etag>,
    pub state_unread: bool,
    pub why_full: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub listing_started: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub listing_served: Option<OffsetDateTime>,
    /// Marker of the page to list from (`None`: the first page).
    pub cursor: Option<String>,
    /// Rows of names before this one on that page were handled already.
    pub resume_name: Option<String>,
    /// The next watermark collected so far; `None` once it overflowed.
    pub next_state: Option<ProducerState>,
    /// `from` of the next watermark (kept when `next_state` overflowed).
    #[serde(with = "time::serde::rfc3339")]
    pub next_from: OffsetDateTime,
    pub report: SnapshotReport,
    /// The hop that continues the run (0 = the first invocation).
    pub hop: u32,
    pub finished: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// The continuation message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Continuation {
    pub v: u32,
    pub kind: String,
    pub run_id: String,
    pub container: String,
    pub hop: u32,
}

impl Continuation {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a continuation always serialises")
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let c: Continuation = serde_json::from_str(text.trim())
            .map_err(|e| format!("not a snapshot continuation: {e}"))?;
        if c.v != 1 || c.kind != MESSAGE_KIND {
            return Err(format!(
                "unsupported continuation (v {}, kind {:?})",
                c.v, c.kind
            ));
        }
        crate::settings::validate_container_name(&c.container)?;
        if !crate::ops::restore::is_valid_id(&c.run_id) {
            return Err(format!("invalid run id {:?}", c.run_id));
        }
        Ok(c)
    }
}

/// The message kind of a continuation text, if it names one.
pub fn kind_of(text: &str) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(text.trim())
        .ok()?
        .get("kind")?
        .as_str()
        .map(str::to_owned)
}

fn blob(run_id: &str) -> String {
    format!("producer-runs/{run_id}.json")
}

/// The run's document and its ETag; `None` for a real 404.
pub async fn load(app: &App, run_id: &str) -> Result<Option<(RunState, Etag)>, StorageError> {
    let Some((body, etag)) = state::get(app, &blob(run_id)).await? else {
        return Ok(None);
    };
    let run = serde_json::from_slice::<RunState>(&body).map_err(|e| StorageError::Permanent {
        what: format!("producer run {run_id}"),
        detail: e.to_string(),
    })?;
    Ok(Some((run, etag)))
}

/// Saves the run under `cond`; a lost race is `Ok(None)` (another invocation owns the run).
pub async fn save(
    app: &App,
    run: &RunState,
    cond: &TargetCondition,
) -> Result<Option<Etag>, StorageError> {
    let body = serde_json::to_vec(run).map_err(|e| StorageError::Permanent {
        what: format!("producer run {}", run.run_id),
        detail: e.to_string(),
    })?;
    match state::put(app, &blob(&run.run_id), body, cond).await {
        Ok(etag) => Ok(Some(etag)),
        Err(e) if state::is_lost_race(&e) => Ok(None),
        Err(e) => Err(e),
    }
}
