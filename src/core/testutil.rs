//! Row builders for the planners' tests.

use std::collections::BTreeMap;

use time::OffsetDateTime;

use crate::model::metadata;
use crate::model::{BlobEntry, Etag};

/// Seconds since an arbitrary epoch, as a time (tests think in small integers).
pub fn ts(secs: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_800_000_000 + secs).unwrap()
}

/// A snapshot id for time `secs` (the service's 7-digit fractional form).
pub fn snap_id(secs: i64) -> String {
    let t = ts(secs);
    format!(
        "{}.{:07}Z",
        t.format(&time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second]"
        ))
        .unwrap(),
        t.nanosecond() / 100
    )
}

pub fn entry(name: &str, etag: &str, lm: i64) -> BlobEntry {
    BlobEntry {
        name: name.to_owned(),
        snapshot: None,
        etag: Etag::new(etag),
        last_modified: ts(lm),
        content_length: 10,
        content_type: Some("application/octet-stream".into()),
        content_md5: None,
        metadata: BTreeMap::new(),
        security: None,
    }
}

pub fn with_meta(mut e: BlobEntry, k: &str, v: &str) -> BlobEntry {
    e.metadata.insert(k.to_owned(), v.to_owned());
    e
}

pub fn with_time(e: BlobEntry, k: &str, secs: i64) -> BlobEntry {
    with_meta(e, k, &metadata::format_time(ts(secs)))
}

pub fn snapshot(mut e: BlobEntry, secs: i64) -> BlobEntry {
    e.snapshot = Some(snap_id(secs));
    e
}

/// An HNS directory placeholder: zero length, `hdi_isfolder=true`.
pub fn placeholder(name: &str) -> BlobEntry {
    let mut e = with_meta(entry(name, "dir", 0), metadata::HDI_ISFOLDER, "true");
    e.content_length = 0;
    e
}

/// A backup row holding source version `etag` that became current at `lm`.
pub fn backup_row(name: &str, backup_etag: &str, etag: &str, lm: i64) -> BlobEntry {
    let e = with_meta(
        entry(name, backup_etag, lm + 1),
        metadata::SOURCE_ETAG,
        etag,
    );
    let e = with_time(e, metadata::SOURCE_LAST_MODIFIED, lm);
    with_time(e, metadata::BACKED_UP_AT, lm + 1)
}

/// Backup rows of "a.txt" for: v1 at 10, overwritten by v2 at 20, deleted (observed) at 30,
/// re-created as v3 at 40. Snapshot ids are the times the backup kept each state.
pub fn overwrite_delete_recreate() -> Vec<BlobEntry> {
    vec![
        // v1 kept when v2 arrived.
        snapshot(backup_row("a.txt", "b1", "v1", 10), 21),
        // v2 kept before the tombstone was written.
        snapshot(backup_row("a.txt", "b2", "v2", 20), 31),
        // the tombstoned state of v2, kept when v3 arrived.
        snapshot(
            with_time(
                backup_row("a.txt", "b2t", "v2", 20),
                metadata::DELETED_AT,
                30,
            ),
            41,
        ),
        // the base: v3.
        backup_row("a.txt", "b3", "v3", 40),
        // a name that is a prefix-extension must not leak in.
        backup_row("a.txt.bak", "x", "other", 15),
    ]
}
