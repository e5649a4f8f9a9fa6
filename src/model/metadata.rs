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
/// On restored blobs: the source ETag of the version that was restored (makes restore resumable).
pub const RESTORED_FROM_ETAG: &str = "lakeguard_restored_from_etag";

/// True for the keys lakeguard owns; they are never copied from a source as user metadata.
pub fn is_lakeguard_key(key: &str) -> bool {
    key.starts_with("lakeguard_")
}
