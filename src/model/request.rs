//! Placeholder; the lead writes the queue message schema here.
pub struct BackupRequest;
