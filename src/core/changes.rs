//! Producer change detection: which base blobs need a snapshot and a backup request.
//!
//! A base blob needs one when it has no snapshot, or when its newest snapshot holds another
//! version. Entries are grouped by exact name (never by listing order or by prefix: the service
//! does not promise an order of snapshots within a name, and Azurite varies it), and the newest
//! snapshot is chosen by snapshot time explicitly.
//!
//! A snapshot's version is its `lakeguard_source_etag` metadata when lakeguard made it (set at
//! creation under If-Match, so it is exact); otherwise its own ETag, which the service keeps
//! equal to the base's at snapshot time.

use std::collections::BTreeMap;

use super::reconcile::snapshot_version_etag as snapshot_version;
use crate::model::{BlobEntry, Etag, Security};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No snapshot yet: snapshot it and request a backup.
    New,
    /// The newest snapshot holds another version.
    Changed { previous: Etag },
    /// Modified since the previous complete run's watermark and not among the versions it
    /// handled ([`super::watermark::Since`]); whether a snapshot of it exists is not known.
    Modified,
    /// The newest snapshot holds this version's content, but the path's security state (owner,
    /// group, permissions, ACL: hierarchical sources only) differs from the one it recorded, or
    /// it recorded none.
    SecurityChanged,
    /// The newest snapshot already holds this version.
    Unchanged,
    /// HNS directory placeholder: not data.
    Placeholder,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub blob: BlobEntry,
    pub verdict: Verdict,
}

impl Decision {
    pub fn needs_snapshot(&self) -> bool {
        matches!(
            self.verdict,
            Verdict::New | Verdict::Changed { .. } | Verdict::Modified | Verdict::SecurityChanged
        )
    }
}

/// Accumulates listing entries of any order and decides per base blob.
///
/// Memory: one entry per base blob plus the newest snapshot per name — bounded by the names of
/// the listed range, not by the number of snapshots. Callers feed one page at a time.
#[derive(Default)]
pub struct ChangeDetector {
    bases: BTreeMap<String, BlobEntry>,
    newest_snapshot: BTreeMap<String, (String, Etag, Option<Security>)>,
}

impl ChangeDetector {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, entry: BlobEntry) {
        match &entry.snapshot {
            None => {
                self.bases.insert(entry.name.clone(), entry);
            }
            Some(snap) => {
                let version = snapshot_version(&entry);
                let newer = match self.newest_snapshot.get(&entry.name) {
                    None => true,
                    // Snapshot ids are fixed-width RFC 3339 UTC timestamps: they order as strings.
                    Some((existing, _, _)) => snap.as_str() > existing.as_str(),
                };
                if newer {
                    let security = Security::from_metadata(&entry.metadata);
                    self.newest_snapshot
                        .insert(entry.name.clone(), (snap.clone(), version, security));
                }
            }
        }
    }

    /// Whether every row held (not yet decided) belongs to `name`: then a run may stop here and a
    /// later one re-read that name from the page where it began.
    pub fn holds_only(&self, name: &str) -> bool {
        self.bases.keys().all(|k| k == name) && self.newest_snapshot.keys().all(|k| k == name)
    }

    /// Decisions for the names strictly before `name` (complete once the listing has moved on to
    /// `name`), removing them from the detector.
    pub fn drain_before(&mut self, name: &str) -> Vec<Decision> {
        let rest_bases = self.bases.split_off(name);
        let rest_snaps = self.newest_snapshot.split_off(name);
        let done = ChangeDetector {
            bases: std::mem::replace(&mut self.bases, rest_bases),
            newest_snapshot: std::mem::replace(&mut self.newest_snapshot, rest_snaps),
        };
        done.finish()
    }

    /// Decisions for every base blob pushed so far, by name. Snapshots of names without a base
    /// blob (the base was deleted) need nothing.
    pub fn finish(self) -> Vec<Decision> {
        let ChangeDetector {
            bases,
            newest_snapshot,
        } = self;
        bases
            .into_values()
            .map(|blob| {
                let verdict = if blob.is_directory_placeholder() {
                    Verdict::Placeholder
                } else {
                    match newest_snapshot.get(&blob.name) {
                        None => Verdict::New,
                        Some((_, v, recorded)) if *v == blob.etag => {
                            match (&blob.security, recorded) {
                                (Some(now), Some(then)) if now.same_as(then) => Verdict::Unchanged,
                                (Some(_), _) => Verdict::SecurityChanged,
                                (None, _) => Verdict::Unchanged,
                            }
                        }
                        Some((_, v, _)) => Verdict::Changed {
                            previous: v.clone(),
                        },
                    }
                };
                Decision { blob, verdict }
            })
            .collect()
    }
}

/// Convenience for a complete listing.
pub fn detect(entries: impl IntoIterator<Item = BlobEntry>) -> Vec<Decision> {
    let mut d = ChangeDetector::new();
    for e in entries {
        d.push(e);
    }
    d.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::metadata;
    use proptest::prelude::*;
    use time::macros::datetime;

    fn base(name: &str, etag: &str) -> BlobEntry {
        BlobEntry {
            name: name.into(),
            snapshot: None,
            etag: Etag::new(etag),
            last_modified: datetime!(2026-11-01 00:00 UTC),
            content_length: 1,
            content_type: None,
            content_md5: None,
            metadata: Default::default(),
            security: None,
        }
    }

    fn snap(name: &str, at: u32, etag: &str, with_meta: bool) -> BlobEntry {
        let mut e = base(name, if with_meta { "0xSNAPSHOTOWN" } else { etag });
        e.snapshot = Some(format!("2026-11-01T00:00:{:02}.0000000Z", at));
        if with_meta {
            e.metadata
                .insert(metadata::SOURCE_ETAG.into(), format!("\"{etag}\""));
        }
        e
    }

    fn verdicts(d: Vec<Decision>) -> Vec<(String, Verdict)> {
        d.into_iter().map(|d| (d.blob.name, d.verdict)).collect()
    }

    #[test]
    fn new_changed_unchanged_placeholder() {
        let mut dir = base("dir", "0xD");
        dir.metadata.insert("hdi_isfolder".into(), "true".into());
        dir.content_length = 0;
        let out = detect(vec![
            base("a", "0x2"),
            snap("a", 1, "0x1", true),
            base("b", "0x5"),
            snap("b", 3, "0x5", false),
            base("c", "0x9"),
            dir,
        ]);
        assert_eq!(
            verdicts(out),
            vec![
                (
                    "a".into(),
                    Verdict::Changed {
                        previous: Etag::new("0x1")
                    }
                ),
                ("b".into(), Verdict::Unchanged),
                ("c".into(), Verdict::New),
                ("dir".into(), Verdict::Placeholder),
            ]
        );
    }

    /// Issue 18: on a hierarchical source, a security change with the same content is a change;
    /// without a listed security state (flat source) nothing changes.
    #[test]
    fn security_only_change() {
        let sec = |acl: &str| Security {
            owner: "o".into(),
            group: "g".into(),
            permissions: "rw-r-----".into(),
            acl: acl.into(),
        };
        let recorded = |acl: &str| {
            let mut s = snap("a", 1, "0x1", true);
            sec(acl).write_metadata(&mut s.metadata, datetime!(2026-11-01 00:00 UTC));
            s
        };
        let listed = |acl: Option<&str>| {
            let mut b = base("a", "0x1");
            b.security = acl.map(sec);
            b
        };
        let one = |rows: Vec<BlobEntry>| detect(rows).pop().unwrap().verdict;
        assert_eq!(
            one(vec![listed(Some("user::rw-")), recorded("user::rw-")]),
            Verdict::Unchanged
        );
        assert_eq!(
            one(vec![
                listed(Some("user::rw-,user:x:r--")),
                recorded("user::rw-")
            ]),
            Verdict::SecurityChanged
        );
        assert_eq!(
            one(vec![listed(Some("user::rw-")), snap("a", 1, "0x1", true)]),
            Verdict::SecurityChanged,
            "a snapshot that recorded no state"
        );
        assert_eq!(
            one(vec![listed(None), recorded("user::rw-")]),
            Verdict::Unchanged,
            "flat source"
        );
        assert!(matches!(
            one(vec![
                {
                    let mut b = listed(Some("user::---"));
                    b.etag = Etag::new("0x2");
                    b
                },
                recorded("user::rw-")
            ]),
            Verdict::Changed { .. }
        ));
    }

    /// Item 9 of issue 15: `hdi_isfolder=true` on a blob with content is not a placeholder.
    #[test]
    fn data_with_the_folder_flag_is_data() {
        let mut data = base("d.csv", "0xA");
        data.metadata.insert("hdi_isfolder".into(), "true".into());
        assert_eq!(
            verdicts(detect(vec![data])),
            vec![("d.csv".into(), Verdict::New)]
        );
    }

    #[test]
    fn newest_snapshot_wins_whatever_the_order() {
        // The reference took the entry before the base; here the newest is chosen by time.
        let entries = vec![
            snap("a", 9, "0x3", true),
            base("a", "0x3"),
            snap("a", 1, "0x1", true),
            snap("a", 5, "0x2", true),
        ];
        assert_eq!(
            verdicts(detect(entries)),
            vec![("a".into(), Verdict::Unchanged)]
        );
        let entries = vec![
            snap("a", 1, "0x3", true),
            base("a", "0x3"),
            snap("a", 9, "0x1", true),
        ];
        assert_eq!(
            verdicts(detect(entries))[0].1,
            Verdict::Changed {
                previous: Etag::new("0x1")
            }
        );
    }

    #[test]
    fn names_that_are_prefixes_of_each_other_are_separate() {
        let entries = vec![
            base("a.txt", "0x1"),
            snap("a.txt.bak", 1, "0x1", true),
            base("a.txt.bak", "0x1"),
            base("a", "0x1"),
        ];
        let v = verdicts(detect(entries));
        assert_eq!(
            v.iter().find(|(n, _)| n == "a.txt").unwrap().1,
            Verdict::New
        );
        assert_eq!(
            v.iter().find(|(n, _)| n == "a.txt.bak").unwrap().1,
            Verdict::Unchanged
        );
        assert_eq!(v.iter().find(|(n, _)| n == "a").unwrap().1, Verdict::New);
    }

    #[test]
    fn snapshots_of_deleted_blobs_need_nothing() {
        assert!(detect(vec![snap("gone", 1, "0x1", true)]).is_empty());
    }

    proptest! {
        /// Any permutation of a listing gives the same decisions, and they match a direct oracle.
        #[test]
        fn order_independent(
            blobs in proptest::collection::btree_map("[ab]{1,3}(/[ab]{1,2})?", (0u8..4, proptest::collection::vec((0u32..60, 0u8..4, any::<bool>()), 0..6)), 0..12),
            seed in any::<u64>(),
        ) {
            let mut entries = Vec::new();
            let mut expected = Vec::new();
            for (name, (cur, snaps)) in &blobs {
                let cur_etag = format!("0x{cur}");
                entries.push(base(name, &cur_etag));
                let mut newest: Option<(u32, String)> = None;
                let mut seen = std::collections::BTreeSet::new();
                for (at, ver, meta) in snaps {
                    if !seen.insert(*at) { continue; }
                    let v = format!("0x{ver}");
                    entries.push(snap(name, *at, &v, *meta));
                    if newest.as_ref().is_none_or(|(t, _)| at > t) { newest = Some((*at, v)); }
                }
                let verdict = match newest {
                    None => Verdict::New,
                    Some((_, v)) if v == cur_etag => Verdict::Unchanged,
                    Some((_, v)) => Verdict::Changed { previous: Etag::new(v) },
                };
                expected.push((name.clone(), verdict));
            }
            // Deterministic shuffle.
            let mut s = seed;
            for i in (1..entries.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                entries.swap(i, (s >> 33) as usize % (i + 1));
            }
            prop_assert_eq!(verdicts(detect(entries)), expected);
        }
    }
}

#[cfg(test)]
mod paging_tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn drain_before_splits_at_page_boundaries() {
        let e = |name: &str, snap: Option<&str>, etag: &str| BlobEntry {
            name: name.into(),
            snapshot: snap.map(str::to_owned),
            etag: Etag::new(etag),
            last_modified: datetime!(2026-11-01 00:00 UTC),
            content_length: 0,
            content_type: None,
            content_md5: None,
            metadata: Default::default(),
            security: None,
        };
        let mut d = ChangeDetector::new();
        d.push(e("a", None, "1"));
        d.push(e("b", Some("2026-11-01T00:00:00.0000000Z"), "1"));
        let first = d.drain_before("b");
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].blob.name, "a");
        // b's base arrives on the next page and still sees its snapshot.
        d.push(e("b", None, "1"));
        let rest = d.finish();
        assert_eq!(rest[0].verdict, Verdict::Unchanged);
    }
}
