//! lakeguard: snapshots, incremental backups and point-in-time restore for Azure Blob Storage.

pub mod copy;
pub mod core;
pub mod model;
