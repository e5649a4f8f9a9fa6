//! `lakeguard usage`: what the backup holds and what it costs, per container and in total.
//!
//! Per container the backup's and the source's histories are read together ([`HistoryStream`],
//! memory: a page per listing) and each name's rows are counted by the pure
//! [`UsageTally::add_name`]; the coverage record bounds the oldest restorable point; the
//! forecast ([`forecast`]) prices it with the `LAKEGUARD_PRICE_*` settings. lakeguard's own
//! bookkeeping in the backup account (restore undo data, state records) is listed flat and
//! counted as storage. Read-only: nothing is written.

use std::time::Instant;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::history_stream::{HistoryStream, Sides};
use super::OpError;
use crate::app::App;
use crate::core::usage::{
    forecast, oldest_restorable, CopyShape, Forecast, Pages, Prices, Requests, RunCost, UsageTally,
    GB,
};
use crate::settings::{RESTORES_CONTAINER, STATE_CONTAINER};
use crate::storage::blob::ListOptions;

#[derive(Clone, Debug, Default)]
pub struct UsageOptions {
    /// One container, or every covered one.
    pub container: Option<String>,
    /// Overrides `LAKEGUARD_USAGE_CHANGED_PERCENT`.
    pub changed_percent: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ContainerUsage {
    pub container: String,
    #[serde(flatten)]
    pub tally: UsageTally,
    /// Start of lakeguard's first complete pass over the container.
    #[serde(with = "time::serde::rfc3339::option")]
    pub coverage_since: Option<OffsetDateTime>,
    /// The earliest instant a restore from the backup answers for every name (`None`: no
    /// coverage recorded, or nothing backed up).
    #[serde(with = "time::serde::rfc3339::option")]
    pub oldest_restorable: Option<OffsetDateTime>,
    pub forecast: Forecast,
}

/// Blobs and bytes of one of lakeguard's own containers.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stored {
    pub blobs: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UsageReport {
    pub containers: Vec<ContainerUsage>,
    pub total: UsageTally,
    /// Restore status, plans, records and undo copies (`lakeguard-restores`).
    pub restores: Stored,
    /// Watermarks, coverage, request batch and producer run records (`lakeguard-state`).
    pub state: Stored,
    /// Storage of every container and the bookkeeping; runs summed over the containers (each
    /// container is its own producer run).
    pub total_forecast: Forecast,
    pub prices: Prices,
    pub notes: Vec<String>,
    pub elapsed_ms: u128,
}

fn add_requests(a: &mut Requests, b: &Requests) {
    a.list += b.list;
    a.write += b.write;
    a.read += b.read;
    a.other += b.other;
    a.queue += b.queue;
}

fn add_run(a: &mut RunCost, b: &RunCost) {
    a.blobs += b.blobs;
    add_requests(&mut a.requests, &b.requests);
    a.cost_usd += b.cost_usd;
}

async fn stored(app: &App, container: &str) -> Result<Stored, OpError> {
    let opts = ListOptions::default();
    let mut out = Stored::default();
    let mut marker = None;
    loop {
        let page = match app.backup.list_page(container, &opts, marker.take()).await {
            Ok(p) => p,
            Err(e) if e.is_not_found() => return Ok(out),
            Err(e) => return Err(e.into()),
        };
        out.blobs += page.entries.len() as u64;
        out.bytes += page.entries.iter().map(|e| e.content_length).sum::<u64>();
        match page.next_marker {
            Some(m) => marker = Some(m),
            None => return Ok(out),
        }
    }
}

/// The usage of one container.
async fn container_usage(
    app: &App,
    container: &str,
    changed_percent: f64,
    notes: &mut Vec<String>,
) -> Result<ContainerUsage, OpError> {
    let shape = CopyShape {
        threshold: app.settings.copy_block_threshold.max(1 << 20),
        block_size: app.settings.copy_block_size.max(1 << 20),
    };
    let mut tally = UsageTally::default();
    let mut stream = HistoryStream::new(
        app,
        container,
        None,
        Sides {
            backup: Some(true),
            source: Some(true),
            missing_is_empty: true,
        },
    );
    while let Some(batch) = stream.next_batch().await? {
        for rows in batch {
            tally.add_name(&rows.backup, &rows.source, &shape);
        }
    }
    let coverage_since = match super::state::coverage(app, container).await {
        Ok(c) => c,
        Err(e) => {
            notes.push(format!(
                "{container}: the coverage record could not be read ({e}): no oldest restorable point"
            ));
            None
        }
    };
    if coverage_since.is_none() && tally.backup_bytes() > 0 {
        notes.push(format!(
            "{container}: no complete lakeguard pass is recorded, so no restore is complete for names lakeguard has not seen: no oldest restorable point"
        ));
    }
    if tally.unplaceable_names > 0 {
        notes.push(format!(
            "{container}: {} name(s) have backup rows that cannot be placed in time (no lakeguard metadata); their bytes are counted, their versions are not",
            tally.unplaceable_names
        ));
    }
    let pages = Pages {
        producer: u64::from(app.settings.producer_page_size.unwrap_or(5000)),
        reconcile: u64::from(app.settings.list_page_size.unwrap_or(5000)),
    };
    Ok(ContainerUsage {
        container: container.to_owned(),
        forecast: forecast(&tally, &app.settings.prices, changed_percent, pages),
        oldest_restorable: oldest_restorable(tally.oldest_version, coverage_since),
        coverage_since,
        tally,
    })
}

/// `lakeguard usage`.
pub async fn run(app: &App, opts: &UsageOptions) -> Result<UsageReport, OpError> {
    let started = Instant::now();
    let changed_percent = opts
        .changed_percent
        .unwrap_or(app.settings.usage_changed_percent);
    if !changed_percent.is_finite() || !(0.0..=100.0).contains(&changed_percent) {
        return Err(OpError::InvalidInput(format!(
            "--changed-percent {changed_percent} is not in 0..=100"
        )));
    }
    let names = match &opts.container {
        Some(c) => {
            crate::settings::validate_container_name(c).map_err(OpError::InvalidInput)?;
            if crate::settings::is_reserved_container(c) {
                return Err(OpError::InvalidInput(format!(
                    "`{c}` is lakeguard's own bookkeeping; it is counted with every report"
                )));
            }
            vec![c.clone()]
        }
        None => super::reconcile::covered_containers(app).await?,
    };
    let mut notes = Vec::new();
    let mut containers = Vec::with_capacity(names.len());
    let mut total = UsageTally::default();
    let mut total_forecast = Forecast {
        changed_percent,
        ..Default::default()
    };
    for c in &names {
        let u = container_usage(app, c, changed_percent, &mut notes).await?;
        total.merge(&u.tally);
        add_run(&mut total_forecast.full_run, &u.forecast.full_run);
        add_run(
            &mut total_forecast.incremental_run,
            &u.forecast.incremental_run,
        );
        add_run(&mut total_forecast.reconcile_run, &u.forecast.reconcile_run);
        containers.push(u);
    }
    let restores = stored(app, RESTORES_CONTAINER).await?;
    let state = stored(app, STATE_CONTAINER).await?;
    let billed = total.billed_bytes() + restores.bytes + state.bytes;
    total_forecast.billed_gb = billed as f64 / GB;
    total_forecast.storage_month_usd = total_forecast.billed_gb * app.settings.prices.gb_month;
    Ok(UsageReport {
        containers,
        total,
        restores,
        state,
        total_forecast,
        prices: app.settings.prices.clone(),
        notes,
        elapsed_ms: started.elapsed().as_millis(),
    })
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn time_or(t: Option<OffsetDateTime>, none: &str) -> String {
    t.map_or_else(|| none.to_owned(), crate::model::metadata::format_time)
}

fn run_line(label: &str, r: &RunCost) -> String {
    let q = &r.requests;
    format!(
        "  {label:<22} {:>9} blobs {:>10} requests (list {}, write {}, read {}, other {}, queue {})  ${:.4}",
        r.blobs,
        q.total(),
        q.list,
        q.write,
        q.read,
        q.other,
        q.queue,
        r.cost_usd
    )
}

/// The report for a terminal.
pub fn text(r: &UsageReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<24} {:>18} {:>18} {:>22} {:>24}",
        "container", "current", "history", "tombstoned names", "source snapshots (≤ billed)"
    );
    let line = |c: &str, t: &UsageTally| {
        format!(
            "{:<24} {:>6} {:>11} {:>6} {:>11} {:>4} {:>6} {:>10} {:>6} {:>17}",
            c,
            t.backup_current.versions,
            bytes(t.backup_current.bytes),
            t.backup_history.versions,
            bytes(t.backup_history.bytes),
            t.tombstoned_names,
            t.backup_tombstoned.versions,
            bytes(t.backup_tombstoned.bytes),
            t.source_snapshots.snapshots,
            format!(
                "{} (≤ {})",
                bytes(t.source_snapshots.bytes),
                bytes(t.source_snapshots.billed_at_most)
            ),
        )
    };
    for c in &r.containers {
        let _ = writeln!(out, "{}", line(&c.container, &c.tally));
    }
    let _ = writeln!(out, "{}", line("TOTAL", &r.total));
    for c in &r.containers {
        let _ = writeln!(
            out,
            "  {}: oldest restorable point {} (coverage since {}); {} live blobs ({}); undo snapshots {} ({})",
            c.container,
            time_or(c.oldest_restorable, "none"),
            time_or(c.coverage_since, "not recorded"),
            c.tally.source_live.rows,
            bytes(c.tally.source_live.bytes),
            c.tally.undo_snapshots.snapshots,
            bytes(c.tally.undo_snapshots.bytes),
        );
    }
    let _ = writeln!(
        out,
        "bookkeeping: restores {} blobs ({}), state {} blobs ({})",
        r.restores.blobs,
        bytes(r.restores.bytes),
        r.state.blobs,
        bytes(r.state.bytes)
    );
    let f = &r.total_forecast;
    let p = &r.prices;
    let _ = writeln!(
        out,
        "estimate (editable prices, USD: {} per GB-month, per 10k: write {}, read {}, list {}, other {}, queue {}):",
        p.gb_month, p.write_10k, p.read_10k, p.list_10k, p.other_10k, p.queue_10k
    );
    let _ = writeln!(
        out,
        "  storage                {:.3} GB billed  ${:.4} per month (source snapshots at their upper bound)",
        f.billed_gb, f.storage_month_usd
    );
    let _ = writeln!(out, "{}", run_line("full run", &f.full_run));
    let _ = writeln!(
        out,
        "{}",
        run_line(
            &format!("incremental ({}%)", f.changed_percent),
            &f.incremental_run
        )
    );
    let _ = writeln!(out, "{}", run_line("no-op reconcile", &f.reconcile_run));
    for n in &r.notes {
        let _ = writeln!(out, "note: {n}");
    }
    out.trim_end().to_owned()
}
