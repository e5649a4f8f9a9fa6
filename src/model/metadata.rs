//! Metadata names written and read by lakeguard. Metadata names must be valid C# identifiers, and
//! the service lower-cases nothing: we always write lower-case and compare lower-cased.

/// Placeholder blobs that HNS accounts (and tools emulating folders) create for directories.
pub const HDI_ISFOLDER: &str = "hdi_isfolder";

/// On source snapshots and backup blobs: the source ETag of the version they hold.
pub const SOURCE_ETAG: &str = "lakeguard_source_etag";
/// On source snapshots and backup blobs: when that version became current in the source.
pub const SOURCE_LAST_MODIFIED: &str = "lakeguard_source_last_modified";
/// On backup blobs: the source snapshot the content was copied from.
pub const SOURCE_SNAPSHOT: &str = "lakeguard_source_snapshot";
/// On backup blobs: when the copy finished.
pub const BACKED_UP_AT: &str = "lakeguard_backed_up_at";
/// On backup blobs: the source blob was observed gone at this time (tombstone).
pub const DELETED_AT: &str = "lakeguard_deleted_at";
/// On source snapshots: a backup request for this version was queued at this time (pending marker).
pub const REQUESTED_AT: &str = "lakeguard_requested_at";
/// On source snapshots: the batch of requests the marker belongs to. The batch's record
/// (`lakeguard-state/requests/<id>.json`, written once every request of the batch was queued)
/// is what makes the marker trustworthy: a producer killed between Snapshot Blob and Put Message
/// leaves a marker whose batch has no record.
pub const REQUEST_BATCH: &str = "lakeguard_request_batch";
/// On restored blobs: the source ETag of the version that was restored (makes restore resumable).
pub const RESTORED_FROM_ETAG: &str = "lakeguard_restored_from_etag";

/// True for the keys lakeguard owns; they are never copied from a source as user metadata.
pub fn is_lakeguard_key(key: &str) -> bool {
    key.starts_with("lakeguard_")
}

/// Parses a time written by lakeguard (RFC 3339) or a snapshot id (RFC 3339 with 7 fractional
/// digits, e.g. `2026-11-22T03:08:15.1234567Z`). `None` for anything else: callers must treat an
/// unreadable time as unknown, never as "now" or "the epoch".
pub fn parse_time(value: &str) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(value.trim(), &time::format_description::well_known::Rfc3339).ok()
}

/// Formats a time the way lakeguard writes it into metadata (RFC 3339, UTC). RFC 3339 has no
/// form for years outside 0-9999 (`0000-01-01T00:00:00+01:00` is year -1 in UTC): those are
/// given in the `time` crate's own notation instead of panicking; callers that store a time
/// validate its range first.
pub fn format_time(t: time::OffsetDateTime) -> String {
    let utc = t.to_offset(time::UtcOffset::UTC);
    utc.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| utc.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_snapshot_ids_and_metadata_times() {
        let t = parse_time("2026-11-22T03:08:15.1234567Z").unwrap();
        assert_eq!(t.nanosecond(), 123_456_700);
        let u = parse_time("2026-11-22T04:08:15+01:00").unwrap();
        assert_eq!(u.unix_timestamp(), t.unix_timestamp());
        assert_eq!(parse_time(&format_time(t)), Some(t));
        assert_eq!(parse_time("Sun, 22 Nov 2026 03:08:15 GMT"), None);
        assert_eq!(parse_time(""), None);
        // Year -1 in UTC: no RFC 3339 form, and no panic either.
        let odd = parse_time("0000-01-01T00:00:00+01:00").unwrap();
        assert!(format_time(odd).contains("-1"), "{}", format_time(odd));
    }
}
