//! lakeguard: snapshots, incremental backups and point-in-time restore for Azure Blob Storage and
//! Azure Data Lake Storage, as an Azure Functions custom handler.
//!
//! Layers (see docs/architecture.md): `model` (plain data) -> `core` (pure planning) ->
//! `storage` (all I/O) -> `ops` (operations) -> `handler` (the Functions host protocol) and `cli`.

pub mod app;
pub mod cli;
pub mod copy;
pub mod handler;
pub mod core;
pub mod model;
pub mod ops;
pub mod settings;
pub mod storage;
pub mod telemetry;
