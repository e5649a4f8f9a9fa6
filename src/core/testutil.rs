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
