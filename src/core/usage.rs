//! What the backup holds and what it costs. Pure: one name's listing rows at a time in, counts
//! out ([`UsageTally::add_name`]); counts and prices in, a cost forecast out ([`forecast`]).
//!
//! # What is counted
//! - Backup account, per name: a name whose base blob carries a tombstone (`lakeguard_deleted_at`)
//!   is **tombstoned**: all its rows count there. Otherwise the base blob is the **current**
//!   version and the snapshots are **history**. Versions are distinct source ETags
//!   (`lakeguard_source_etag`), rows are what the service stores, bytes their listed lengths.
//! - Billed bytes. A backup version is written whole by a server-side copy, so the base and its
//!   snapshots share no blocks — except a tombstoned base, which is snapshotted (`If-Match`) and
//!   then only has its metadata changed: it shares every block with that snapshot, and the
//!   service bills them once. Those bytes are reported as `shared_bytes` and left out of the
//!   storage estimate.
//! - Source account: the snapshots lakeguard made (`lakeguard_source_etag`) and the undo snapshots
//!   of restores (`lakeguard_restore_undo`). A snapshot is billed only for the blocks it does not
//!   share with its base blob (or with other snapshots), which a listing cannot see: a snapshot
//!   of the live version shares all of them (zero), any other at most its length. The figure
//!   given (`billed_at_most`) is that upper bound.
//! - The oldest restorable point: the earliest instant from which a restore from the backup
//!   answers for every name of the container. A version is certainly current from its
//!   `current_by` on (`core::history`), and a name with no version before T is proven absent only
//!   from the coverage start on: so `max(earliest current_by of any backup version, coverage)`.
//!   Without a coverage record a restore is never complete for names lakeguard has not seen.
//!
//! # The transaction model
//! Derived from what lakeguard does per blob (see `ops::snapshot`, `ops::backup`,
//! `ops::reconcile`); each request counts in the Blob Storage price category Microsoft's
//! "Map each REST operation to a price" gives for general-purpose v2 accounts: List Blobs and
//! Create Container are *list*, Put Blob, Copy Blob From URL, Put Block From URL and Put Block
//! List *write*, Get Blob *read*, Get Blob Properties, Get Container Properties and Snapshot
//! Blob *other*, Delete Blob free. A copy from another account also costs the source account one
//! *read* per request that reads it (one per Copy Blob From URL, one per staged block).
//! - **Full run** (the first backup: every live blob is new): the listing with snapshots (rows /
//!   page size), Get Container Properties, per blob a Snapshot Blob, a Put Message, its share of
//!   Get Messages (32 per receive), the copy (writes in the backup, reads in the source; blobs
//!   over the single-copy threshold are staged in blocks plus a Put Block List and a HEAD), a
//!   Delete Message; one request-batch record per listing page, the coverage record, the
//!   watermark read and written.
//! - **Incremental run** (a watermark run, `changed_percent` of the live blobs changed): the
//!   base-blob listing, and per changed blob the same as above plus a HEAD of the backup blob and
//!   the Snapshot Blob that keeps its previous version as history.
//! - **No-op reconcile** (the hourly timer when nothing is missing): list containers in both
//!   accounts, the flat listings of both sides.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::history::history_from_backup;
use crate::model::metadata::{DELETED_AT, SOURCE_ETAG};
use crate::model::{BlobEntry, Etag};

/// Metadata of a restore's undo snapshot (`ops::restore::RESTORE_UNDO`).
const RESTORE_UNDO: &str = "lakeguard_restore_undo";

/// Bytes in the "GB" of Azure's capacity prices (Azure bills binary gigabytes).
pub const GB: f64 = (1u64 << 30) as f64;

/// Unit prices (USD) of the cost estimate: settings `LAKEGUARD_PRICE_*` (README "Usage and
/// cost"). Defaults: the Hot-tier sample prices of the Blob Service endpoint in Microsoft Learn's
/// "Estimate the cost of using Azure Blob Storage" (article of 2024-07-26), which Microsoft gives
/// as examples of its list prices; editable estimates, not a quote.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Prices {
    /// Data storage, per GB and month (Hot, LRS, first 50 TB).
    pub gb_month: f64,
    /// Per 10,000 write operations.
    pub write_10k: f64,
    /// Per 10,000 read operations.
    pub read_10k: f64,
    /// Per 10,000 list and create-container operations.
    pub list_10k: f64,
    /// Per 10,000 other operations (Get Blob Properties, Snapshot Blob, ...).
    pub other_10k: f64,
    /// Per 10,000 queue operations (Put, Get, Delete Message). No sample price is published
    /// with the blob ones; the default is the blob "other" price.
    pub queue_10k: f64,
}

impl Default for Prices {
    fn default() -> Self {
        Prices {
            gb_month: 0.0208,
            write_10k: 0.055,
            read_10k: 0.0044,
            list_10k: 0.055,
            other_10k: 0.0044,
            queue_10k: 0.0044,
        }
    }
}

/// Rows, distinct versions and bytes of one kind of stored data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub rows: u64,
    pub versions: u64,
    pub bytes: u64,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.rows += o.rows;
        self.versions += o.versions;
        self.bytes += o.bytes;
    }
}

/// Source snapshots of one kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotTally {
    pub snapshots: u64,
    pub bytes: u64,
    /// Upper bound of the bytes billed for them (see the module docs).
    pub billed_at_most: u64,
}

impl SnapshotTally {
    fn add(&mut self, o: &SnapshotTally) {
        self.snapshots += o.snapshots;
        self.bytes += o.bytes;
        self.billed_at_most += o.billed_at_most;
    }
}

/// Write and read requests of one copy of every live blob, as `ops::backup` makes them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyRequests {
    /// Copy Blob From URL, or Put Block From URL per block plus Put Block List (backup: write).
    pub writes: u64,
    /// Reads of the copy source (source: read): one per Copy Blob From URL or staged block.
    pub source_reads: u64,
    /// HEADs of the source version before a block copy (source: other).
    pub source_heads: u64,
}

impl CopyRequests {
    fn add(&mut self, o: &CopyRequests) {
        self.writes += o.writes;
        self.source_reads += o.source_reads;
        self.source_heads += o.source_heads;
    }
}

/// How copies are split (`copy::direct::BlockOptions`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyShape {
    pub threshold: u64,
    pub block_size: u64,
}

impl CopyShape {
    /// The requests copying one version of `len` bytes makes.
    pub fn requests(&self, len: u64) -> CopyRequests {
        if len <= self.threshold {
            CopyRequests {
                writes: 1,
                source_reads: 1,
                source_heads: 0,
            }
        } else {
            let blocks = len.div_ceil(self.block_size.max(1));
            CopyRequests {
                writes: blocks + 1,
                source_reads: blocks,
                source_heads: 1,
            }
        }
    }
}

/// What one container (or all of them) holds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageTally {
    /// Backup base blobs of names that are not tombstoned (one version each).
    pub backup_current: Tally,
    /// Backup snapshots of those names.
    pub backup_history: Tally,
    /// Names whose backup base is a tombstone, and all their rows.
    pub tombstoned_names: u64,
    pub backup_tombstoned: Tally,
    /// Bytes of tombstoned bases that share their blocks with the snapshot taken before the
    /// tombstone (billed once).
    pub backup_shared_bytes: u64,
    /// Live base blobs of the source (directory placeholders excluded).
    pub source_live: Tally,
    /// Snapshots lakeguard made in the source (`lakeguard_source_etag`).
    pub source_snapshots: SnapshotTally,
    /// Undo snapshots restores took in the source (`lakeguard_restore_undo`).
    pub undo_snapshots: SnapshotTally,
    /// Every source snapshot row, lakeguard's or not: what a full producer listing reads.
    pub source_snapshot_rows: u64,
    /// Backup base rows: what a reconcile listing reads.
    pub backup_base_rows: u64,
    /// The requests that copy every live blob once.
    pub copy_all: CopyRequests,
    /// Earliest instant at which a backup version is certainly current.
    #[serde(with = "time::serde::rfc3339::option")]
    pub oldest_version: Option<OffsetDateTime>,
    /// Names with backup rows that cannot be placed in time (not counted as versions).
    pub unplaceable_names: u64,
}

impl UsageTally {
    /// Adds one name's rows: its backup rows (base and snapshots) and its source rows.
    pub fn add_name(&mut self, backup: &[BlobEntry], source: &[BlobEntry], shape: &CopyShape) {
        let data = |r: &&BlobEntry| !r.is_directory_placeholder();
        let backup: Vec<&BlobEntry> = backup.iter().filter(data).collect();
        let source: Vec<&BlobEntry> = source.iter().filter(data).collect();
        let version = |r: &BlobEntry| r.meta(SOURCE_ETAG).map(Etag::new);
        if let Some(first) = backup.first() {
            let base: Option<&BlobEntry> = backup.iter().copied().find(|r| r.snapshot.is_none());
            self.backup_base_rows += u64::from(base.is_some());
            let tombstoned = base.is_some_and(|b| b.meta(DELETED_AT).is_some());
            let mut seen: Vec<Etag> = Vec::new();
            let mut distinct = |r: &BlobEntry| match version(r) {
                Some(v) if !seen.contains(&v) => {
                    seen.push(v);
                    1
                }
                _ => 0,
            };
            if tombstoned {
                self.tombstoned_names += 1;
                for r in backup.iter().copied() {
                    self.backup_tombstoned.add(&Tally {
                        rows: 1,
                        versions: distinct(r),
                        bytes: r.content_length,
                    });
                }
                let b = base.expect("tombstoned has a base");
                let shares = backup.iter().copied().any(|s| {
                    s.snapshot.is_some()
                        && version(s).is_some()
                        && version(s) == version(b)
                        && s.content_length == b.content_length
                });
                if shares {
                    self.backup_shared_bytes += b.content_length;
                }
            } else {
                if let Some(b) = base {
                    self.backup_current.add(&Tally {
                        rows: 1,
                        versions: distinct(b),
                        bytes: b.content_length,
                    });
                }
                for r in backup.iter().copied().filter(|r| r.snapshot.is_some()) {
                    self.backup_history.add(&Tally {
                        rows: 1,
                        versions: distinct(r),
                        bytes: r.content_length,
                    });
                }
            }
            let rows: Vec<BlobEntry> = backup.iter().map(|r| (*r).clone()).collect();
            let history = history_from_backup(&first.name, &rows);
            if !history.unknown.is_empty() {
                self.unplaceable_names += 1;
            }
            let earliest = history
                .versions
                .iter()
                .filter(|v| v.in_backup)
                .filter_map(|v| v.current_by)
                .min();
            self.oldest_version = match (self.oldest_version, earliest) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        let live: Option<&BlobEntry> = source.iter().copied().find(|r| r.snapshot.is_none());
        if let Some(l) = live {
            self.source_live.add(&Tally {
                rows: 1,
                versions: 1,
                bytes: l.content_length,
            });
            self.copy_all.add(&shape.requests(l.content_length));
        }
        for s in source.iter().copied().filter(|r| r.snapshot.is_some()) {
            self.source_snapshot_rows += 1;
            // A snapshot holding the live version shares all its blocks with the base blob.
            let held = version(s).unwrap_or_else(|| s.etag.clone());
            let billed = if live.is_some_and(|l| l.etag == held) {
                0
            } else {
                s.content_length
            };
            let t = SnapshotTally {
                snapshots: 1,
                bytes: s.content_length,
                billed_at_most: billed,
            };
            if s.meta(RESTORE_UNDO).is_some() {
                self.undo_snapshots.add(&t);
            } else if s.meta(SOURCE_ETAG).is_some() {
                self.source_snapshots.add(&t);
            }
        }
    }

    /// Adds another container's tally (totals).
    pub fn merge(&mut self, o: &UsageTally) {
        self.backup_current.add(&o.backup_current);
        self.backup_history.add(&o.backup_history);
        self.tombstoned_names += o.tombstoned_names;
        self.backup_tombstoned.add(&o.backup_tombstoned);
        self.backup_shared_bytes += o.backup_shared_bytes;
        self.source_live.add(&o.source_live);
        self.source_snapshots.add(&o.source_snapshots);
        self.undo_snapshots.add(&o.undo_snapshots);
        self.source_snapshot_rows += o.source_snapshot_rows;
        self.backup_base_rows += o.backup_base_rows;
        self.copy_all.add(&o.copy_all);
        self.oldest_version = match (self.oldest_version, o.oldest_version) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.unplaceable_names += o.unplaceable_names;
    }

    /// Every byte the backup account stores for the container, as listed.
    pub fn backup_bytes(&self) -> u64 {
        self.backup_current.bytes + self.backup_history.bytes + self.backup_tombstoned.bytes
    }

    /// What the storage estimate counts: the backup's bytes (shared blocks once) and the upper
    /// bound of lakeguard's source snapshots (undo snapshots included).
    pub fn billed_bytes(&self) -> u64 {
        self.backup_bytes() - self.backup_shared_bytes.min(self.backup_bytes())
            + self.source_snapshots.billed_at_most
            + self.undo_snapshots.billed_at_most
    }
}

/// The oldest restorable point (see the module docs): `None` without coverage or versions.
pub fn oldest_restorable(
    oldest_version: Option<OffsetDateTime>,
    coverage: Option<OffsetDateTime>,
) -> Option<OffsetDateTime> {
    match (oldest_version, coverage) {
        (Some(v), Some(c)) => Some(v.max(c)),
        _ => None,
    }
}

/// Requests by price category.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requests {
    pub list: u64,
    pub write: u64,
    pub read: u64,
    pub other: u64,
    pub queue: u64,
}

impl Requests {
    pub fn total(&self) -> u64 {
        self.list + self.write + self.read + self.other + self.queue
    }

    pub fn cost(&self, p: &Prices) -> f64 {
        (self.list as f64 * p.list_10k
            + self.write as f64 * p.write_10k
            + self.read as f64 * p.read_10k
            + self.other as f64 * p.other_10k
            + self.queue as f64 * p.queue_10k)
            / 10_000.0
    }
}

/// The requests and cost of one run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunCost {
    /// Live blobs the run copies.
    pub blobs: u64,
    pub requests: Requests,
    pub cost_usd: f64,
}

/// Listing page sizes (`maxresults`; the service default is 5000).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pages {
    pub producer: u64,
    pub reconcile: u64,
}

impl Default for Pages {
    fn default() -> Self {
        Pages {
            producer: 5000,
            reconcile: 5000,
        }
    }
}

/// The forecast for what a tally describes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Forecast {
    pub billed_gb: f64,
    pub storage_month_usd: f64,
    /// Share of the live blobs the incremental run copies, in percent.
    pub changed_percent: f64,
    pub full_run: RunCost,
    pub incremental_run: RunCost,
    pub reconcile_run: RunCost,
}

/// Messages a worker receives per Get Messages (`ops::backup::drain`; the host's batch is
/// smaller, which only adds receives).
const RECEIVE_BATCH: u64 = 32;

fn per_blob(blobs: u64, pages: u64, copies: CopyRequests, incremental: bool) -> Requests {
    let mut r = Requests {
        // Get Container Properties (the container exists), one Snapshot Blob per blob.
        other: 1 + blobs + copies.source_heads,
        // The watermark written, one request-batch record per page with changes, the copies.
        write: 1 + pages.min(blobs) + copies.writes,
        // The watermark read (a 404 on a first run is billed too), the copies' source reads.
        read: 1 + copies.source_reads,
        // Create Queue (exists: still a request), Put + Delete Message per blob, receives.
        queue: 1 + 2 * blobs + blobs.div_ceil(RECEIVE_BATCH),
        // The listing, and the backup container ensured once per worker process.
        list: pages + u64::from(blobs > 0),
    };
    if incremental {
        // A HEAD of the backup blob (the request cannot claim it absent), and the snapshot
        // that keeps its previous version as history.
        r.other += 2 * blobs;
    } else {
        // The coverage record (refused after the first full pass, billed all the same).
        r.write += 1;
    }
    r
}

/// The forecast: storage per month, a full and an incremental producer + worker run, and a
/// no-op reconcile.
pub fn forecast(t: &UsageTally, prices: &Prices, changed_percent: f64, pages: Pages) -> Forecast {
    let billed_gb = t.billed_bytes() as f64 / GB;
    let n = t.source_live.rows;
    let percent = if changed_percent.is_finite() {
        changed_percent.clamp(0.0, 100.0)
    } else {
        0.0
    };
    let full_pages = (n + t.source_snapshot_rows).div_ceil(pages.producer.max(1));
    let full = per_blob(n, full_pages, t.copy_all, false);
    let changed = ((n as f64) * percent / 100.0).ceil() as u64;
    // The changed blobs' copies, at the average shape of the live blobs.
    let scale = |x: u64| {
        if n == 0 {
            0
        } else {
            ((x as f64) * (changed as f64) / (n as f64)).ceil() as u64
        }
    };
    let inc_copies = CopyRequests {
        writes: scale(t.copy_all.writes),
        source_reads: scale(t.copy_all.source_reads),
        source_heads: scale(t.copy_all.source_heads),
    };
    let inc_pages = n.div_ceil(pages.producer.max(1)).max(1);
    let incremental = per_blob(changed, inc_pages, inc_copies, true);
    let reconcile = Requests {
        list: 2
            + n.div_ceil(pages.reconcile.max(1)).max(1)
            + t.backup_base_rows.div_ceil(pages.reconcile.max(1)).max(1),
        ..Default::default()
    };
    let run = |blobs, requests: Requests| RunCost {
        blobs,
        requests,
        cost_usd: requests.cost(prices),
    };
    Forecast {
        billed_gb,
        storage_month_usd: billed_gb * prices.gb_month,
        changed_percent: percent,
        full_run: run(n, full),
        incremental_run: run(changed, incremental),
        reconcile_run: run(0, reconcile),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::testutil::*;
    use crate::model::metadata;

    const SHAPE: CopyShape = CopyShape {
        threshold: 256 << 20,
        block_size: 100 << 20,
    };

    fn sized(mut e: BlobEntry, len: u64) -> BlobEntry {
        e.content_length = len;
        e
    }

    fn source_snapshot(name: &str, etag: &str, lm: i64, at: i64, len: u64) -> BlobEntry {
        let e = with_meta(entry(name, etag, lm), SOURCE_ETAG, etag);
        sized(snapshot(e, at), len)
    }

    #[test]
    fn counts_current_history_and_tombstoned_names() {
        let mut t = UsageTally::default();
        // a.txt: v1 kept as history when v2 arrived; live v2; two lakeguard snapshots in the
        // source (v1's is billed, v2's shares its blocks with the live blob) and a foreign one.
        let backup = vec![
            sized(snapshot(backup_row("a.txt", "b1", "v1", 10), 21), 100),
            sized(backup_row("a.txt", "b2", "v2", 20), 150),
        ];
        let source = vec![
            source_snapshot("a.txt", "v1", 10, 12, 100),
            source_snapshot("a.txt", "v2", 20, 22, 150),
            sized(snapshot(entry("a.txt", "v2", 20), 30), 150),
            sized(entry("a.txt", "v2", 20), 150),
        ];
        t.add_name(&backup, &source, &SHAPE);
        // b.txt: deleted; the tombstone's base shares its blocks with the snapshot before it.
        let backup = vec![
            sized(snapshot(backup_row("b.txt", "b1", "w1", 10), 31), 40),
            sized(
                with_time(
                    backup_row("b.txt", "b1t", "w1", 10),
                    metadata::DELETED_AT,
                    30,
                ),
                40,
            ),
        ];
        t.add_name(&backup, &[], &SHAPE);
        // A folder placeholder is not data.
        t.add_name(&[], &[placeholder("dir")], &SHAPE);

        assert_eq!(
            t.backup_current,
            Tally {
                rows: 1,
                versions: 1,
                bytes: 150
            }
        );
        assert_eq!(
            t.backup_history,
            Tally {
                rows: 1,
                versions: 1,
                bytes: 100
            }
        );
        assert_eq!(t.tombstoned_names, 1);
        assert_eq!(
            t.backup_tombstoned,
            Tally {
                rows: 2,
                versions: 1,
                bytes: 80
            }
        );
        assert_eq!(t.backup_shared_bytes, 40);
        assert_eq!(t.backup_bytes(), 330);
        assert_eq!(
            t.source_snapshots,
            SnapshotTally {
                snapshots: 2,
                bytes: 250,
                billed_at_most: 100
            }
        );
        assert_eq!(t.source_snapshot_rows, 3);
        assert_eq!(t.source_live.rows, 1);
        assert_eq!(t.backup_base_rows, 2);
        // 330 listed - 40 shared + 100 (source snapshot upper bound).
        assert_eq!(t.billed_bytes(), 390);
        // v1 of b.txt and a.txt: Last-Modified 10 (whole second) -> certainly current at 11,
        // unless a proof comes earlier.
        assert_eq!(t.oldest_version, Some(ts(11)));
        assert_eq!(t.unplaceable_names, 0);
    }

    #[test]
    fn the_oldest_restorable_point_needs_coverage() {
        assert_eq!(oldest_restorable(Some(ts(5)), None), None);
        assert_eq!(oldest_restorable(None, Some(ts(5))), None);
        assert_eq!(oldest_restorable(Some(ts(5)), Some(ts(9))), Some(ts(9)));
        assert_eq!(oldest_restorable(Some(ts(12)), Some(ts(9))), Some(ts(12)));
    }

    #[test]
    fn undo_snapshots_and_unplaceable_rows() {
        let mut t = UsageTally::default();
        let undo = with_meta(
            sized(snapshot(entry("x", "old", 5), 40), 7),
            RESTORE_UNDO,
            "20260101t000000z-1",
        );
        let live = sized(entry("x", "new", 41), 9);
        let foreign_backup = entry("x", "f", 3); // no lakeguard metadata
        t.add_name(&[foreign_backup], &[undo, live], &SHAPE);
        assert_eq!(
            t.undo_snapshots,
            SnapshotTally {
                snapshots: 1,
                bytes: 7,
                billed_at_most: 7
            }
        );
        assert_eq!(t.source_snapshots, SnapshotTally::default());
        assert_eq!(t.unplaceable_names, 1);
        assert_eq!(t.oldest_version, None);
        assert_eq!(t.backup_current.versions, 0, "no source ETag, no version");
        assert_eq!(t.backup_current.rows, 1);
    }

    #[test]
    fn copies_of_large_blobs_go_in_blocks() {
        assert_eq!(SHAPE.requests(10).writes, 1);
        let big = SHAPE.requests(300 << 20);
        assert_eq!(
            big,
            CopyRequests {
                writes: 4,
                source_reads: 3,
                source_heads: 1
            }
        );
    }

    #[test]
    fn forecast_follows_the_transaction_model() {
        let mut t = UsageTally::default();
        for i in 0..200u64 {
            let name = format!("f{i:03}");
            let rows = vec![sized(entry(&name, "e", 1), 1 << 20)];
            t.add_name(&[], &rows, &SHAPE);
        }
        t.source_snapshot_rows = 50;
        t.backup_base_rows = 200;
        let prices = Prices::default();
        let f = forecast(
            &t,
            &prices,
            1.0,
            Pages {
                producer: 100,
                reconcile: 100,
            },
        );
        // Full: 250 rows in pages of 100 = 3 list pages (+1 Create Container).
        let full = f.full_run.requests;
        assert_eq!(f.full_run.blobs, 200);
        assert_eq!(full.list, 3 + 1);
        assert_eq!(
            full.other,
            1 + 200,
            "container check + one snapshot per blob"
        );
        assert_eq!(
            full.write,
            2 + 3 + 200,
            "state, one batch record per page, copies"
        );
        assert_eq!(full.read, 1 + 200, "watermark + one source read per copy");
        assert_eq!(
            full.queue,
            1 + 400 + 7,
            "create, put + delete per blob, receives"
        );
        // Incremental: 1 % of 200 = 2 blobs, base listing of 2 pages.
        let inc = f.incremental_run.requests;
        assert_eq!(f.incremental_run.blobs, 2);
        assert_eq!(inc.list, 2 + 1);
        assert_eq!(
            inc.other,
            1 + 2 + 4,
            "container, snapshots, HEAD + history snapshot"
        );
        assert_eq!(inc.write, 1 + 2 + 2, "watermark, batch records, copies");
        assert_eq!(inc.queue, 1 + 4 + 1);
        // Reconcile: list containers twice, two flat listings of 2 pages each.
        assert_eq!(f.reconcile_run.requests.list, 2 + 2 + 2);
        let expected = (4.0 * prices.list_10k
            + 205.0 * prices.write_10k
            + 201.0 * prices.read_10k
            + 201.0 * prices.other_10k
            + 408.0 * prices.queue_10k)
            / 10_000.0;
        assert!((f.full_run.cost_usd - expected).abs() < 1e-12);
        assert!((f.billed_gb - 0.0).abs() < 1e-12);
        assert_eq!(
            forecast(&t, &prices, f64::NAN, Pages::default())
                .incremental_run
                .blobs,
            0
        );
        assert_eq!(
            forecast(&t, &prices, 250.0, Pages::default())
                .incremental_run
                .blobs,
            200
        );
    }

    #[test]
    fn storage_cost_is_billed_gb_times_price() {
        let mut t = UsageTally::default();
        t.backup_current.bytes = 3 << 30;
        t.backup_tombstoned.bytes = 1 << 30;
        t.backup_shared_bytes = 1 << 30;
        t.source_snapshots.billed_at_most = 1 << 29;
        let f = forecast(&t, &Prices::default(), 1.0, Pages::default());
        assert!((f.billed_gb - 3.5).abs() < 1e-12);
        assert!((f.storage_month_usd - 3.5 * 0.0208).abs() < 1e-12);
    }
}
