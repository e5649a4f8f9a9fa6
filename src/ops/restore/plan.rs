//! Phase 1 of a restore: the plan, streaming over the history and target listings.
//!
//! The history of each name is read from up to two accounts at once: the backup account (base
//! blobs + snapshots) and the source account (its snapshots and live blobs), each listed page by
//! page with snapshots and metadata, grouped by exact name ([`NameGroups`]) and merge-joined by
//! name ([`HistoryStream`]). The source fills in versions the backup has not received yet (a
//! request still queued or poisoned): without it such a version would look like a hole, and an
//! in-place restore could take the blob holding it for one created after T. In place, the
//! source listing also is the target listing (its base rows): no third listing.

use super::*;
use crate::core::restore::{NameState, StateContext};
use crate::ops::history_stream::{HistoryStream, Sides};

/// The stores and containers of one restore.
pub(super) struct Ends<'a> {
    pub(super) target: &'a BlobStore,
    pub(super) target_container: &'a str,
    pub(super) in_place: bool,
    /// Key cache for copies out of the backup account (restores read it rarely: one per run).
    pub(super) backup_keys: DelegationKeyCache,
}

pub(super) fn ends<'a>(app: &'a App, req: &'a RestoreRequest) -> Result<Ends<'a>, OpError> {
    crate::settings::validate_container_name(&req.container).map_err(OpError::InvalidInput)?;
    let (target, target_container, in_place) = match &req.to {
        None => (&app.source, req.container.as_str(), true),
        Some(t) => {
            crate::settings::validate_container_name(&t.container)
                .map_err(OpError::InvalidInput)?;
            // Drills restore into their own scratch containers (sample-only requests).
            if crate::settings::is_reserved_container(&t.container)
                && !(req.sample.is_some()
                    && t.container
                        .starts_with(crate::settings::DRILL_CONTAINER_PREFIX))
            {
                return Err(OpError::InvalidInput(format!(
                    "`{}` is reserved for lakeguard's own bookkeeping",
                    t.container
                )));
            }
            if same_account(&t.store, &app.source) && t.container == req.container {
                (&app.source, req.container.as_str(), true)
            } else {
                if req.from.reads_backup()
                    && same_account(&t.store, &app.backup)
                    && t.container == req.container
                {
                    return Err(OpError::InvalidInput(format!(
                        "the target `{}` is the history being restored from; choose another container",
                        t.container
                    )));
                }
                (&t.store, t.container.as_str(), false)
            }
        }
    };
    Ok(Ends {
        target,
        target_container,
        in_place,
        backup_keys: DelegationKeyCache::default(),
    })
}

/// Whether two stores address the same account (same endpoint; credentials may differ).
fn same_account(a: &BlobStore, b: &BlobStore) -> bool {
    let (ua, ub) = (a.url("x", None, None), b.url("x", None, None));
    ua.host_str() == ub.host_str()
        && ua.port_or_known_default() == ub.port_or_known_default()
        && ua.path() == ub.path()
}

/// The restore time must be a real instant in the past: a time in the future would "restore"
/// a state nobody has seen (and in place delete what is written meanwhile), and one outside
/// years 1-9999 cannot even be written down in metadata.
pub(super) fn validate_at(at: OffsetDateTime, now: OffsetDateTime) -> Result<(), OpError> {
    let utc = at.to_offset(time::UtcOffset::UTC);
    if !(1..=9999).contains(&utc.year()) {
        return Err(OpError::InvalidInput(format!(
            "restore time {at} is outside the years 1-9999 (in UTC)"
        )));
    }
    if at > now {
        return Err(OpError::InvalidInput(format!(
            "restore time {} is in the future (now {})",
            metadata::format_time(at),
            metadata::format_time(now)
        )));
    }
    Ok(())
}

/// Phase 1: the plan, streaming over the listings.
pub async fn plan(app: &App, req: &RestoreRequest) -> Result<Plan, OpError> {
    validate_at(req.at, OffsetDateTime::now_utc())?;
    let ends = ends(app, req)?;
    // A container of the backup account named like a source container is that container's
    // history: restoring anything over it would rewrite backups.
    if !ends.in_place
        && same_account(ends.target, &app.backup)
        && app.source.container_exists(ends.target_container).await?
    {
        return Err(OpError::InvalidInput(format!(
            "container `{}` of the backup account holds the backup history of the source container of that name; choose another target container",
            ends.target_container
        )));
    }
    let id = req.id.clone().unwrap_or_else(new_id);
    if !is_valid_id(&id) {
        return Err(OpError::InvalidInput(format!("invalid restore id `{id}`")));
    }
    let mut history = HistoryInfo {
        backup_read: req.from.reads_backup(),
        source_read: req.from.reads_source(),
        ..Default::default()
    };
    // Coverage proves names absent before their first version. Without the backup account
    // (`--from snapshots` with it unreachable) there is none: more names are unknown, never
    // more deleted.
    history.coverage_since = match super::super::state::coverage(app, &req.container).await {
        Ok(c) => c,
        Err(e) if req.from == HistoryFrom::SourceSnapshots => {
            history.notes.push(format!(
                "the coverage record could not be read ({e}): names are proven absent only by tombstones"
            ));
            None
        }
        Err(e) => return Err(e.into()),
    };
    if history.coverage_since.is_none() {
        history.notes.push(
            "no complete lakeguard pass over the container is recorded: a name before its first known version is unknown, not absent".into(),
        );
    }
    let info = RequestInfo {
        container: req.container.clone(),
        prefix: req.prefix.clone(),
        at: req.at,
        from: req.from,
        in_place: ends.in_place,
        target_account: ends.target.account().to_owned(),
        target_container: ends.target_container.to_owned(),
        dry_run: req.dry_run,
        force: req.force,
    };
    let order = app.settings.name_order;
    let mut planner = RestorePlanner::new(PlanOptions {
        at: req.at,
        target: if ends.in_place {
            RestoreTarget::InPlace
        } else {
            RestoreTarget::Elsewhere
        },
        prefix: req.prefix.clone(),
        order,
        coverage: history.coverage_since,
    });
    // Which listings: the backup with snapshots unless `--from snapshots`, where a flat
    // backup listing (when reachable) only counts what that mode cannot see; the source with
    // snapshots unless `--from backup-only`. A missing source container is an empty history for
    // `--from backup` (a source lost in a disaster), an error for `--from snapshots`.
    let snapshots_mode = req.from == HistoryFrom::SourceSnapshots;
    let backup_side = match req.from {
        HistoryFrom::SourceSnapshots => match app.backup.container_exists(&req.container).await {
            Ok(true) => Some(false),
            Ok(false) => None,
            Err(e) => {
                history.notes.push(format!(
                    "the backup account could not be read ({e}): blobs deleted from the source together with their snapshots cannot be counted"
                ));
                None
            }
        },
        _ => Some(true),
    };
    let source_side = req.from.reads_source().then_some(true);
    if snapshots_mode {
        history.only_in_backup = backup_side.map(|_| 0);
    }
    let mut stream = HistoryStream::new(
        app,
        &req.container,
        req.prefix.as_deref(),
        Sides {
            backup: backup_side,
            source: source_side,
            missing_is_empty: req.from == HistoryFrom::Backup,
        },
    );
    let ctx = |listed_by| StateContext {
        at: req.at,
        coverage: history.coverage_since,
        listed_at: listed_by,
    };
    let target_opts = ListOptions {
        prefix: req.prefix.clone(),
        snapshots: false,
        metadata: true,
        max_results: None,
    };
    // In place the source listing is the target listing.
    let mut target_pages = (!ends.in_place).then(|| {
        let mut l = Lister::new(ends.target, ends.target_container, target_opts).missing_is_empty();
        l.prefetch(None);
        l
    });
    let mut target_marker: Option<String> = None;
    let mut spool = Spool::new(&id).map_err(spool_error)?;
    let mut summary = PlanSummary::default();
    let mut items = Vec::new();
    let mut items_truncated = false;
    let mut reservoir: Vec<PlanItem> = Vec::new();
    let mut restores_seen = 0u64;
    loop {
        let step = planner.step();
        match step {
            PlanStep::Item(item) => {
                summary.record(&item);
                if !matches!(item, PlanItem::Unchanged { .. }) {
                    if items.len() < MAX_LISTED_ITEMS {
                        items.push(item.clone());
                    } else {
                        items_truncated = true;
                    }
                }
                match (&item, req.sample) {
                    (PlanItem::Restore { .. }, Some(n)) => {
                        // Reservoir sampling: every restore equally likely, memory n items.
                        restores_seen += 1;
                        if reservoir.len() < n {
                            reservoir.push(item);
                        } else {
                            let j = random_u64() % restores_seen;
                            if (j as usize) < n {
                                reservoir[j as usize] = item;
                            }
                        }
                    }
                    (_, Some(_)) => {}
                    (
                        PlanItem::Restore { .. }
                        | PlanItem::Delete { .. }
                        | PlanItem::SetSecurity { .. },
                        None,
                    ) => spool.push(&item).map_err(spool_error)?,
                    _ => {}
                }
            }
            PlanStep::NeedTarget if !ends.in_place => {
                let pages = target_pages
                    .as_mut()
                    .expect("elsewhere has a target listing");
                let page = pages
                    .page(target_marker.take())
                    .await
                    .map_err(OpError::from)?;
                let last = page.next_marker.is_none();
                planner.push_target(page.entries).map_err(plan_error)?;
                if last {
                    planner.end_target();
                } else {
                    target_marker = page.next_marker;
                }
            }
            PlanStep::NeedStates | PlanStep::NeedTarget => match stream.next_batch().await? {
                Some(batch) => {
                    let mut states: Vec<NameState> = Vec::with_capacity(batch.len());
                    let mut targets = Vec::new();
                    for rows in batch {
                        if snapshots_mode && rows.source.is_empty() && !rows.backup.is_empty() {
                            // Known to the backup, no row left in the source.
                            if rows
                                .backup
                                .iter()
                                .any(|r| r.meta(metadata::SOURCE_ETAG).is_some())
                            {
                                *history.only_in_backup.get_or_insert(0) += 1;
                            }
                            continue;
                        }
                        if ends.in_place {
                            targets
                                .extend(rows.source.iter().find(|r| r.snapshot.is_none()).cloned());
                        }
                        let backup = if snapshots_mode {
                            &[][..]
                        } else {
                            &rows.backup[..]
                        };
                        states.extend(name_state(
                            req.from,
                            backup,
                            &rows.source,
                            &ctx(rows.listed_by),
                        ));
                    }
                    planner.push_states(states).map_err(plan_error)?;
                    if ends.in_place {
                        planner.push_target(targets).map_err(plan_error)?;
                    }
                }
                None => {
                    planner.end_states();
                    if ends.in_place {
                        planner.end_target();
                    }
                }
            },
            PlanStep::Done => break,
        }
    }
    if let Some(n) = history.only_in_backup {
        history.notes.push(format!(
            "--from snapshots sees only what the source still holds: {n} name(s) the backup account knows have no row left in the source (deleted together with their snapshots) and are invisible to it; --from backup restores them"
        ));
    } else if snapshots_mode {
        history.notes.push(
            "--from snapshots sees only what the source still holds: blobs deleted together with their snapshots are invisible to it".into(),
        );
    }
    for item in &reservoir {
        spool.push(item).map_err(spool_error)?;
    }
    Ok(Plan {
        id,
        info,
        summary,
        history,
        items,
        items_truncated,
        spool,
    })
}
