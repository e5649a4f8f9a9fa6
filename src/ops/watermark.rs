//! Where the producer's watermark ([`crate::core::watermark`]) lives: one JSON blob per container
//! and prefix, `producer/<container>/<scope>.json` in the backup account's reserved
//! [`STATE_CONTAINER`] (lakeguard's own bookkeeping, never in the user's source containers).
//!
//! Losing or damaging a state costs speed, never a backup: without a usable state the producer
//! lists in full, snapshots included, as if it had never run. So reading is forgiving (anything
//! but a clean read means a full listing), and writing is conditional on what was read (If-Match
//! the ETag read, or If-None-Match `*` when there was none): a state another run wrote meanwhile
//! is as valid as ours and is kept.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tracing::{info, warn};

use crate::app::App;
use crate::core::watermark::{ProducerState, Since};
use crate::model::Etag;
use crate::settings::STATE_CONTAINER;
use crate::storage::blob::TargetCondition;
use crate::storage::StorageError;

/// The state blob of a container and prefix. A prefix may hold any character, so it is named by
/// its hash.
pub fn blob_name(container: &str, prefix: Option<&str>) -> String {
    match prefix {
        None => format!("producer/{container}/all.json"),
        Some(p) => {
            let h = Sha256::digest(p.as_bytes());
            let hex: String = h[..16].iter().map(|b| format!("{b:02x}")).collect();
            format!("producer/{container}/prefix-{hex}.json")
        }
    }
}

/// What a run found of its predecessor's state.
#[derive(Debug)]
pub struct Loaded {
    pub name: String,
    /// A usable state: list base blobs only.
    pub since: Option<Since>,
    /// The ETag of the state blob read: what a save or discard is conditional on. `None`: there
    /// was none (or it could not be read), and a save requires that there still is none.
    pub etag: Option<Etag>,
    /// Why there is no usable state (for the report and the log).
    pub why_full: Option<String>,
    /// Reading failed (not "not found"): a state may be there that this run neither uses nor
    /// replaces.
    pub unread: bool,
}

pub async fn load(app: &App, container: &str, prefix: Option<&str>, now: OffsetDateTime) -> Loaded {
    let name = blob_name(container, prefix);
    let (body, etag) = match app.backup.download_versioned(STATE_CONTAINER, &name).await {
        Ok(read) => read,
        Err(e) if e.is_not_found() => {
            return Loaded {
                name,
                since: None,
                etag: None,
                why_full: Some("no state of a previous complete run".into()),
                unread: false,
            }
        }
        Err(e) => {
            // Not "not found": we cannot know what is there, so we neither use nor replace it.
            warn!(error = %e, "reading the producer state failed; listing in full");
            return Loaded {
                name,
                since: None,
                etag: None,
                why_full: Some(format!("reading the state failed: {e}")),
                unread: true,
            };
        }
    };
    let parsed = match serde_json::from_slice::<Discarded>(&body) {
        Ok(d) => Err(format!(
            "the previous run discarded its state: {}",
            d.discarded
        )),
        Err(_) => serde_json::from_slice::<ProducerState>(&body)
            .map_err(|e| format!("the state is not readable: {e}")),
    }
    .and_then(|s| {
        Since::new(s, container, prefix, now).map_err(|e| format!("the state is unusable: {e}"))
    });
    match parsed {
        Ok(since) => Loaded {
            name,
            since: Some(since),
            etag: Some(etag),
            why_full: None,
            unread: false,
        },
        Err(why) => {
            info!(why, "listing in full");
            Loaded {
                name,
                since: None,
                etag: Some(etag),
                why_full: Some(why),
                unread: false,
            }
        }
    }
}

fn condition(etag: Option<&Etag>) -> TargetCondition {
    match etag {
        Some(e) => TargetCondition::Matches(e.clone()),
        None => TargetCondition::Absent,
    }
}

/// What became of the state at the end of a run.
pub async fn save(app: &App, loaded: &Loaded, state: &ProducerState) -> String {
    let body = match serde_json::to_vec(state) {
        Ok(b) => b,
        Err(e) => return format!("not saved: {e}"),
    };
    let cond = condition(loaded.etag.as_ref());
    let meta = BTreeMap::new();
    let mut attempt = app
        .backup
        .upload_if(
            STATE_CONTAINER,
            &loaded.name,
            body.clone(),
            Some("application/json"),
            &meta,
            &cond,
        )
        .await;
    if matches!(&attempt, Err(e) if e.is_not_found() && e.code() == "ContainerNotFound") {
        // First state of the account: the container is created on demand.
        attempt = match app.backup.ensure_container(STATE_CONTAINER).await {
            Ok(()) => {
                app.backup
                    .upload_if(
                        STATE_CONTAINER,
                        &loaded.name,
                        body,
                        Some("application/json"),
                        &meta,
                        &cond,
                    )
                    .await
            }
            Err(e) => Err(e),
        };
    }
    match attempt {
        Ok(_) => "saved".into(),
        // If-None-Match `*` lost to the state this run could not read: older than ours but
        // sound, since it vouches only for what its own run handled (the next run may look at
        // some of this run's blobs again, and finds them snapshotted).
        Err(e) if is_lost_race(&e) && loaded.unread => {
            "not saved: the state this run could not read is kept".into()
        }
        Err(e) if is_lost_race(&e) => {
            info!("another run replaced the producer state meanwhile; keeping its state");
            "kept the state another run saved meanwhile".into()
        }
        Err(e) => {
            warn!(error = %e, "saving the producer state failed; removing the old one");
            let removed = discard(app, loaded).await;
            format!("not saved ({e}); {removed}")
        }
    }
}

/// Removes the predecessor's state (the run cannot vouch for a newer one), so that the next run
/// lists in full instead of taking again what this run did.
pub async fn discard(app: &App, loaded: &Loaded) -> String {
    let Some(etag) = &loaded.etag else {
        return if loaded.unread {
            "the state this run could not read is kept (it vouches only for what it saw)".into()
        } else {
            "no state kept".into()
        };
    };
    // Replaced by a marker rather than deleted: the function's identity needs no delete right
    // on the backup account (a compromised function must not be able to erase backups).
    let body = serde_json::to_vec(&Discarded {
        discarded: "a run that could not vouch for a newer state".into(),
    })
    .expect("a discard marker serialises");
    match app
        .backup
        .upload_if(
            STATE_CONTAINER,
            &loaded.name,
            body,
            Some("application/json"),
            &BTreeMap::new(),
            &TargetCondition::Matches(etag.clone()),
        )
        .await
    {
        Ok(_) => "removed; the next run lists in full".into(),
        Err(e) if e.is_not_found() || is_lost_race(&e) => {
            "kept the state another run saved meanwhile".into()
        }
        Err(e) => {
            warn!(error = %e, "removing the producer state failed; the next run may snapshot some unchanged blobs again");
            format!("removing the old state failed ({e}); the next run may snapshot some unchanged blobs again")
        }
    }
}

/// What replaces a state a run could not vouch for.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Discarded {
    discarded: String,
}

/// 412 (If-Match lost) or 409 `BlobAlreadyExists` (If-None-Match lost): another run wrote first.
fn is_lost_race(e: &StorageError) -> bool {
    e.is_precondition_failed()
        || matches!(e, StorageError::Conflict { code, .. } if code == "BlobAlreadyExists")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_are_per_container_and_prefix_and_safe() {
        assert_eq!(blob_name("c", None), "producer/c/all.json");
        let a = blob_name("c", Some("a b/#?%ü"));
        assert!(a.starts_with("producer/c/prefix-") && a.ends_with(".json"));
        assert!(a.is_ascii() && !a.contains(' ') && !a.contains('#'));
        assert_ne!(a, blob_name("c", Some("a b/#?%u")));
        assert_ne!(blob_name("c", Some("x")), blob_name("d", Some("x")));
    }
}
