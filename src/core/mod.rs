//! The pure core: functions from listings to plans. No I/O, no async; everything here is unit-
//! and property-tested.

pub mod changes;
