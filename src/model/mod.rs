//! Plain data shared by every layer: listing rows, queue messages, metadata names.

pub mod entry;
pub mod event;
pub mod metadata;
pub mod request;
pub mod security;

pub use entry::{check_addressable, BlobEntry, Etag};
pub use request::{BackupRequest, VersionProps};
pub use security::Security;
