//! Pure planning: functions from listings to plans. No I/O, no async, no SDK types, so that every
//! decision is unit- and property-tested without a storage account.

pub mod changes;
pub mod history;
pub mod join;
pub mod reconcile;
pub mod restore;
pub mod retention;
pub mod usage;
pub mod watermark;

pub use join::{group_by_name, JoinError, NameGroups, NameOrder};

#[cfg(test)]
pub(crate) mod testutil;
