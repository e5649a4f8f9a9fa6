//! The producer's watermark: which base blobs a run must look at, given what the previous
//! complete run of the same container and prefix left behind, so that a run lists base blobs
//! only instead of every snapshot ever taken.
//!
//! # The invariant
//! A complete run (every examined blob snapshotted and queued, or found already snapshotted)
//! records `from`: a time at or before its first listing request, by both the service's and our
//! clock, less [`MARGIN`]. A version whose Last-Modified is before `from` existed before that run
//! listed anything; if it is still the current version now, it was current during the whole
//! listing, so that run listed it and handled it. Such a blob needs nothing now.
//!
//! A version modified at or after `from` may or may not have been seen (a listing is not a
//! point-in-time view). So the run also records a fingerprint of every `(name, ETag)` it handled
//! whose Last-Modified is at or after `from`; the next run skips those and takes everything else
//! in the window. The window is a few minutes of writes, so the set is bounded by the write rate,
//! not by the container; past [`MAX_HANDLED`] the run keeps no state, and the next one lists in
//! full.
//!
//! A run that failed anywhere, or could not save its state, removes the previous state: the next
//! run lists in full (snapshots included), which needs no state at all. Two overlapping runs each
//! leave a valid state; whichever is kept, the invariant holds for it.

use std::collections::HashSet;

use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::changes::{Decision, Verdict};
use crate::model::{BlobEntry, Etag};

/// How far before its first listing request a run's `from` lies: covers the skew between the
/// service's front ends and our clock, and a listing query evaluated before its response's `Date`.
pub const MARGIN: time::Duration = time::Duration::minutes(5);

/// Most fingerprints a state keeps (16 bytes each in memory, 25 in JSON: ~5 MiB). A run that handles more
/// versions inside its window keeps no state.
pub const MAX_HANDLED: usize = 200_000;

/// A state older than this is not used: the run lists in full, so that whatever escaped the
/// Last-Modified rule (an ADLS rename keeps a file's Last-Modified) is found within a day, not
/// only by reconcile.
pub const MAX_AGE: time::Duration = time::Duration::hours(24);

pub const SCHEMA: u32 = 1;

/// What a complete producer run leaves for the next run of the same container and prefix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerState {
    pub schema: u32,
    pub container: String,
    pub prefix: Option<String>,
    /// Versions modified before this were handled by the run that wrote this state.
    #[serde(with = "time::serde::rfc3339")]
    pub from: OffsetDateTime,
    /// Fingerprints ([`fingerprint`]) of the versions that run handled, modified at or after
    /// `from`.
    pub handled: Vec<String>,
}

/// `(name, ETag)` as 128 bits of SHA-256 (16 bytes in memory, 22 characters of base64 in the
/// state): names are up to 1,024 characters, and a false match (which would skip a change) is as
/// likely as a SHA-256 collision on 128 bits.
pub type Fingerprint = [u8; 16];

pub fn fingerprint(name: &str, etag: &Etag) -> Fingerprint {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([0]);
    h.update(etag.as_str().as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize()[..16]);
    out
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD_NO_PAD;

/// Why a stored state cannot be used; the run lists in full.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    #[error("schema {0} is not {SCHEMA}")]
    Schema(u32),
    #[error("it belongs to container {container:?} prefix {prefix:?}")]
    OtherScope {
        container: String,
        prefix: Option<String>,
    },
    #[error("it is older than {MAX_AGE} (from {0})")]
    TooOld(OffsetDateTime),
    #[error("its `from` lies in the future ({0})")]
    Future(OffsetDateTime),
    #[error("fingerprint {0:?} is not 16 bytes of base64")]
    Fingerprint(String),
}

/// A stored state, checked and ready to answer [`Since::needs_look`].
#[derive(Debug)]
pub struct Since {
    from: OffsetDateTime,
    handled: HashSet<Fingerprint>,
}

impl Since {
    pub fn new(
        state: ProducerState,
        container: &str,
        prefix: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<Self, Unusable> {
        if state.schema != SCHEMA {
            return Err(Unusable::Schema(state.schema));
        }
        if state.container != container || state.prefix.as_deref() != prefix {
            return Err(Unusable::OtherScope {
                container: state.container,
                prefix: state.prefix,
            });
        }
        if now - state.from > MAX_AGE {
            return Err(Unusable::TooOld(state.from));
        }
        if state.from > now + MARGIN {
            return Err(Unusable::Future(state.from));
        }
        let mut handled = HashSet::with_capacity(state.handled.len());
        for text in state.handled {
            match B64
                .decode(&text)
                .ok()
                .and_then(|b| Fingerprint::try_from(b).ok())
            {
                Some(f) => handled.insert(f),
                None => return Err(Unusable::Fingerprint(text)),
            };
        }
        Ok(Since {
            from: state.from,
            handled,
        })
    }

    pub fn from(&self) -> OffsetDateTime {
        self.from
    }

    /// Whether this base blob may hold a version no complete run has handled.
    pub fn needs_look(&self, blob: &BlobEntry) -> bool {
        blob.last_modified >= self.from
            && !self.handled.contains(&fingerprint(&blob.name, &blob.etag))
    }

    /// The producer's decision for one base blob of a base-only listing.
    pub fn decide(&self, blob: BlobEntry) -> Decision {
        let verdict = if blob.is_directory_placeholder() {
            Verdict::Placeholder
        } else if self.needs_look(&blob) {
            Verdict::Modified
        } else {
            Verdict::Unchanged
        };
        Decision { blob, verdict }
    }
}

/// Collects, during a run, what the next run needs.
#[derive(Debug)]
pub struct StateBuilder {
    container: String,
    prefix: Option<String>,
    from: OffsetDateTime,
    handled: Vec<Fingerprint>,
    overflow: bool,
}

impl StateBuilder {
    /// `started`: the earlier of our clock before the first listing request and the service's
    /// `Date` on the first page.
    pub fn new(container: &str, prefix: Option<&str>, started: OffsetDateTime) -> Self {
        StateBuilder {
            container: container.to_owned(),
            prefix: prefix.map(str::to_owned),
            from: started - MARGIN,
            handled: Vec::new(),
            overflow: false,
        }
    }

    /// The service's `Date` on the first page, when it is earlier than our clock was.
    pub fn served_at(&mut self, date: OffsetDateTime) {
        self.from = self.from.min(date - MARGIN);
    }

    /// A version this run handled (found already snapshotted, or snapshotted and queued).
    pub fn handled(&mut self, name: &str, etag: &Etag, last_modified: OffsetDateTime) {
        if last_modified < self.from || self.overflow {
            return;
        }
        if self.handled.len() >= MAX_HANDLED {
            self.overflow = true;
            self.handled = Vec::new();
            return;
        }
        self.handled.push(fingerprint(name, etag));
    }

    /// What has been collected so far, to carry a run over to its next invocation; `None` once
    /// the window held too many versions to remember.
    pub fn checkpoint(&self) -> Option<ProducerState> {
        (!self.overflow).then(|| ProducerState {
            schema: SCHEMA,
            container: self.container.clone(),
            prefix: self.prefix.clone(),
            from: self.from,
            handled: self.handled.iter().map(|f| B64.encode(f)).collect(),
        })
    }

    /// Continues collecting from a [`checkpoint`](Self::checkpoint) (`None`: it had overflowed).
    pub fn resume(
        container: &str,
        prefix: Option<&str>,
        from: OffsetDateTime,
        checkpoint: Option<ProducerState>,
    ) -> Result<Self, Unusable> {
        let mut b = StateBuilder {
            container: container.to_owned(),
            prefix: prefix.map(str::to_owned),
            from,
            handled: Vec::new(),
            overflow: checkpoint.is_none(),
        };
        if let Some(state) = checkpoint {
            b.from = state.from;
            for text in state.handled {
                match B64
                    .decode(&text)
                    .ok()
                    .and_then(|v| Fingerprint::try_from(v).ok())
                {
                    Some(f) => b.handled.push(f),
                    None => return Err(Unusable::Fingerprint(text)),
                }
            }
        }
        Ok(b)
    }

    /// The state to keep, or `None` when the window held too many versions to remember.
    pub fn finish(self) -> Option<ProducerState> {
        (!self.overflow).then_some(ProducerState {
            schema: SCHEMA,
            container: self.container,
            prefix: self.prefix,
            from: self.from,
            handled: self.handled.iter().map(|f| B64.encode(f)).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::testutil::entry;
    use proptest::prelude::*;
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2026-12-01 12:00 UTC);

    fn blob(name: &str, etag: &str, lm: OffsetDateTime) -> BlobEntry {
        let mut b = entry(name, etag, 0);
        b.last_modified = lm;
        b
    }

    fn since(state: ProducerState) -> Since {
        Since::new(state, "c", None, T0 + time::Duration::hours(1)).unwrap()
    }

    #[test]
    fn before_from_is_done_after_from_is_looked_at_unless_handled() {
        let mut b = StateBuilder::new("c", None, T0);
        b.handled("early", &Etag::new("e1"), T0 - time::Duration::hours(1));
        b.handled("window", &Etag::new("w1"), T0 - time::Duration::minutes(1));
        let state = b.finish().unwrap();
        assert_eq!(state.from, T0 - MARGIN);
        assert_eq!(
            state.handled.len(),
            1,
            "only versions inside the window are kept"
        );
        let s = since(state);
        assert!(!s.needs_look(&blob("early", "e1", T0 - time::Duration::hours(1))));
        assert!(!s.needs_look(&blob("window", "w1", T0 - time::Duration::minutes(1))));
        // The same name in another version, inside the window, is a change.
        assert!(s.needs_look(&blob("window", "w2", T0 - time::Duration::minutes(1))));
        assert!(s.needs_look(&blob("new", "n1", T0 + time::Duration::seconds(1))));
        // Exactly at `from` counts as inside the window.
        assert!(s.needs_look(&blob("edge", "x", T0 - MARGIN)));
    }

    #[test]
    fn decisions_of_a_base_only_listing() {
        let mut b = StateBuilder::new("c", None, T0);
        b.handled("seen", &Etag::new("s1"), T0);
        let s = since(b.finish().unwrap());
        let mut dir = blob("dir", "d", T0 + time::Duration::minutes(1));
        dir.metadata.insert("hdi_isfolder".into(), "true".into());
        dir.content_length = 0;
        assert_eq!(s.decide(dir.clone()).verdict, Verdict::Placeholder);
        dir.content_length = 1;
        assert_eq!(
            s.decide(dir).verdict,
            Verdict::Modified,
            "data with the folder flag"
        );
        assert_eq!(s.decide(blob("seen", "s1", T0)).verdict, Verdict::Unchanged);
        assert_eq!(s.decide(blob("seen", "s2", T0)).verdict, Verdict::Modified);
        assert_eq!(
            s.decide(blob("old", "o", T0 - time::Duration::hours(2)))
                .verdict,
            Verdict::Unchanged
        );
        assert!(s.decide(blob("new", "n", T0)).needs_snapshot());
    }

    #[test]
    fn the_service_date_moves_from_earlier_never_later() {
        let mut b = StateBuilder::new("c", None, T0);
        b.served_at(T0 + time::Duration::minutes(3));
        assert_eq!(b.finish().unwrap().from, T0 - MARGIN);
        let mut b = StateBuilder::new("c", None, T0);
        b.served_at(T0 - time::Duration::minutes(3));
        assert_eq!(
            b.finish().unwrap().from,
            T0 - time::Duration::minutes(3) - MARGIN
        );
    }

    #[test]
    fn too_many_handled_versions_leave_no_state() {
        let mut b = StateBuilder::new("c", None, T0);
        for i in 0..=MAX_HANDLED {
            b.handled(&format!("b{i}"), &Etag::new("e"), T0);
        }
        assert!(b.finish().is_none());
    }

    #[test]
    fn a_state_is_used_only_for_its_own_scope_schema_and_age() {
        let state = StateBuilder::new("c", Some("p/"), T0).finish().unwrap();
        let now = T0 + time::Duration::hours(1);
        assert!(Since::new(state.clone(), "c", Some("p/"), now).is_ok());
        assert!(matches!(
            Since::new(state.clone(), "c", None, now),
            Err(Unusable::OtherScope { .. })
        ));
        assert!(matches!(
            Since::new(state.clone(), "d", Some("p/"), now),
            Err(Unusable::OtherScope { .. })
        ));
        assert!(matches!(
            Since::new(
                state.clone(),
                "c",
                Some("p/"),
                T0 + MAX_AGE + time::Duration::hours(1)
            ),
            Err(Unusable::TooOld(_))
        ));
        assert!(matches!(
            Since::new(
                state.clone(),
                "c",
                Some("p/"),
                T0 - time::Duration::hours(1)
            ),
            Err(Unusable::Future(_))
        ));
        let mut other = state;
        other.schema = 99;
        assert_eq!(
            Since::new(other, "c", Some("p/"), now).unwrap_err(),
            Unusable::Schema(99)
        );
    }

    #[test]
    fn fingerprints_separate_name_from_etag() {
        assert_ne!(
            fingerprint("ab", &Etag::new("c")),
            fingerprint("a", &Etag::new("bc"))
        );
        let mut b = StateBuilder::new("c", None, T0);
        b.handled("a b/ü?#%", &Etag::new("\"0x1\""), T0);
        let state = b.finish().unwrap();
        assert_eq!(state.handled[0].len(), 22);
        let mut damaged = state.clone();
        damaged.handled.push("not base64!".into());
        assert!(matches!(
            Since::new(damaged, "c", None, T0),
            Err(Unusable::Fingerprint(_))
        ));
        assert!(!since(state).needs_look(&blob("a b/ü?#%", "\"0x1\"", T0)));
    }

    proptest! {
        /// Model of two consecutive runs. Run 1 lists every blob at some moment in its listing;
        /// writes happen before, during and after it. Whatever the timing, every version that is
        /// current at run 2 and that run 1 did not handle is looked at by run 2 — nothing is
        /// missed — and a version run 1 handled inside the window is not taken twice.
        #[test]
        fn no_version_current_at_run_two_is_missed(
            // per blob: minutes of its first write relative to T0, and an optional rewrite
            blobs in proptest::collection::vec((-30i64..30, proptest::option::of(-30i64..30), 0i64..10), 1..40),
        ) {
            let listing_start = T0;
            let mut b = StateBuilder::new("c", None, listing_start);
            let mut current = Vec::new();
            let mut seen_by_run1 = Vec::new();
            for (i, (first, rewrite, listed_after)) in blobs.iter().enumerate() {
                let name = format!("b{i}");
                let v1 = blob(&name, "v1", T0 + time::Duration::minutes(*first));
                // The moment run 1 lists this name: somewhere within its listing.
                let listed_at = listing_start + time::Duration::minutes(*listed_after);
                let rewritten = rewrite.map(|r| blob(&name, "v2", T0 + time::Duration::minutes(r.max(*first + 1))));
                let version_at = |t: OffsetDateTime| match &rewritten {
                    Some(v2) if v2.last_modified <= t => Some(v2.clone()),
                    _ if v1.last_modified <= t => Some(v1.clone()),
                    _ => None,
                };
                if let Some(v) = version_at(listed_at) {
                    b.handled(&v.name, &v.etag, v.last_modified);
                    seen_by_run1.push((v.name.clone(), v.etag.clone()));
                }
                current.push(version_at(T0 + time::Duration::hours(1)).unwrap());
            }
            let s = since(b.finish().unwrap());
            for v in &current {
                let handled = seen_by_run1.iter().any(|(n, e)| *n == v.name && *e == v.etag);
                prop_assert_eq!(s.needs_look(v), !handled, "{:?}", v);
            }
        }
    }
}
