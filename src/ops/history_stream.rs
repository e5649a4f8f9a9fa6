//! A container's history read from up to two accounts at once: the backup account and the
//! source account, each listed page by page with snapshots and metadata, grouped by exact name
//! ([`NameGroups`]) and merge-joined by name. Restore plans and prune plans read it. Memory: one
//! page per listing (plus the page fetched ahead).
//!
//! Resumable: [`HistoryStream::checkpoint`] says where each listing must start again (the marker
//! of the page holding its first row not yet consumed) and the last name consumed; a stream
//! [`HistoryStream::resume`]d from it drops rows of names up to that one, which is exact whatever
//! an opaque marker encodes (the same technique as reconcile's continuations).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::OpError;
use crate::app::App;
use crate::core::join::{join_step, JoinError, JoinStep, Named, SortedInput};
use crate::core::{NameGroups, NameOrder};
use crate::model::BlobEntry;
use crate::storage::blob::{ListOptions, ListPage};
use crate::storage::{BlobStore, Lister, StorageError};

fn join_error(e: JoinError) -> OpError {
    OpError::Storage(StorageError::Permanent {
        what: "history listing".into(),
        detail: e.to_string(),
    })
}

/// All rows of one name in one account's listing, when its page was served, and the marker of
/// the page where its rows began.
struct Group {
    rows: Vec<BlobEntry>,
    listed_by: Option<OffsetDateTime>,
    start: Option<String>,
}

impl Named for Group {
    fn name(&self) -> &str {
        &self.rows[0].name
    }
}

/// One name's rows in both accounts.
pub struct NameRows {
    pub name: String,
    pub backup: Vec<BlobEntry>,
    pub source: Vec<BlobEntry>,
    /// An instant by which the source page holding the name had been served (its live rows
    /// were current at some instant before it).
    pub listed_by: Option<OffsetDateTime>,
}

/// Where one listing starts again.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "at", content = "marker")]
pub enum SideCursor {
    #[default]
    Start,
    Marker(String),
    End,
}

impl SideCursor {
    fn of(marker: Option<String>) -> Self {
        marker.map_or(SideCursor::Start, SideCursor::Marker)
    }
}

/// Where a stream starts again (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamCheckpoint {
    pub backup: SideCursor,
    pub source: SideCursor,
    pub after_name: Option<String>,
}

/// Which listings a stream reads.
#[derive(Clone, Copy, Debug)]
pub struct Sides {
    /// `Some(with_snapshots)` to read that account.
    pub backup: Option<bool>,
    pub source: Option<bool>,
    /// A container missing on one side is an empty history there.
    pub missing_is_empty: bool,
}

/// One account's listing of the container, grouped by name.
struct SideListing<'a> {
    store: &'a BlobStore,
    container: &'a str,
    pages: Lister,
    groups: NameGroups,
    /// The next page to fetch; `None` with `done` = the listing is over.
    next: Option<String>,
    done: bool,
    /// The name NameGroups holds incomplete, and the marker of the page where it began.
    open: Option<(String, Option<String>)>,
    missing_is_empty: bool,
}

impl SideListing<'_> {
    /// Fetches the next page and pushes its complete groups.
    async fn fetch(
        &mut self,
        order: NameOrder,
        after: Option<&str>,
        sorted: &mut SortedInput<Group>,
    ) -> Result<(), OpError> {
        let fetched_with = self.next.take();
        let page = match self.pages.page(fetched_with.clone()).await {
            Ok(p) => p,
            Err(e) if e.is_not_found() && self.missing_is_empty => ListPage::default(),
            Err(e) if e.is_not_found() => {
                return Err(OpError::ContainerNotFound(format!(
                    "{}` in account `{}",
                    self.container,
                    self.store.account()
                )))
            }
            Err(e) => return Err(e.into()),
        };
        // Date has one-second precision and is taken when the answer is sent, after the rows
        // were read: the end of its second is an instant by which they had been read.
        let listed_by = page.served_at.map(|d| d + time::Duration::SECOND);
        let mut entries = page.entries;
        if let Some(a) = after {
            entries.retain(|e| order.cmp(&e.name, a) == std::cmp::Ordering::Greater);
        }
        let first_name = entries.first().map(|e| e.name.clone());
        let last_name = entries.last().map(|e| e.name.clone());
        let previous_open = self.open.take();
        self.groups.push(entries).map_err(join_error)?;
        let last = page.next_marker.is_none();
        if last {
            self.groups.end();
            self.done = true;
        } else {
            self.next = page.next_marker;
        }
        let mut complete = Vec::new();
        while let Some(rows) = self.groups.pop() {
            // The group the previous page left open began there; the others on this page.
            let start = match &previous_open {
                Some((n, m)) if *n == rows[0].name => m.clone(),
                _ => fetched_with.clone(),
            };
            complete.push(Group {
                rows,
                listed_by,
                start,
            });
        }
        if !last {
            if let Some(name) = last_name {
                let start = match previous_open {
                    Some((n, m)) if n == name && first_name.as_deref() == Some(n.as_str()) => m,
                    _ => fetched_with,
                };
                self.open = Some((name, start));
            }
        }
        sorted.push(order, complete).map_err(join_error)?;
        if last {
            sorted.end();
        }
        Ok(())
    }

    /// Where this listing starts again, given the first group not consumed (if listed yet).
    fn cursor(&self, pending: Option<&Group>) -> SideCursor {
        if let Some(g) = pending {
            return SideCursor::of(g.start.clone());
        }
        if let Some((_, m)) = &self.open {
            return SideCursor::of(m.clone());
        }
        match (&self.next, self.done) {
            (_, true) => SideCursor::End,
            (m, false) => SideCursor::of(m.clone()),
        }
    }
}

/// The history listings joined by name, in name order.
pub struct HistoryStream<'a> {
    order: NameOrder,
    backup: Option<SideListing<'a>>,
    source: Option<SideListing<'a>>,
    backup_groups: SortedInput<Group>,
    source_groups: SortedInput<Group>,
    /// Rows of names up to this one are dropped (a resumed stream); also the last name handed
    /// out.
    after: Option<String>,
}

impl<'a> HistoryStream<'a> {
    pub fn new(app: &'a App, container: &'a str, prefix: Option<&str>, sides: Sides) -> Self {
        Self::resume(app, container, prefix, sides, &StreamCheckpoint::default())
    }

    pub fn resume(
        app: &'a App,
        container: &'a str,
        prefix: Option<&str>,
        sides: Sides,
        from: &StreamCheckpoint,
    ) -> Self {
        let order = app.settings.name_order;
        let side = |store: &'a BlobStore, snaps: bool, label, at: &SideCursor| {
            let opts = ListOptions {
                prefix: prefix.map(str::to_owned),
                snapshots: snaps,
                metadata: true,
                max_results: None,
            };
            let next = match at {
                SideCursor::Marker(m) => Some(m.clone()),
                _ => None,
            };
            let mut pages = Lister::new(store, container, opts);
            pages.prefetch(next.clone());
            SideListing {
                store,
                container,
                pages,
                groups: NameGroups::new(order, label),
                next,
                done: false,
                open: None,
                missing_is_empty: sides.missing_is_empty,
            }
        };
        let mut backup_groups = SortedInput::new("backup history");
        let mut source_groups = SortedInput::new("source history");
        let backup = match (sides.backup, &from.backup) {
            (Some(s), at) if *at != SideCursor::End => {
                Some(side(&app.backup, s, "backup history", at))
            }
            _ => None,
        };
        let source = match (sides.source, &from.source) {
            (Some(s), at) if *at != SideCursor::End => {
                Some(side(&app.source, s, "source history", at))
            }
            _ => None,
        };
        if backup.is_none() {
            backup_groups.end();
        }
        if source.is_none() {
            source_groups.end();
        }
        HistoryStream {
            order,
            backup,
            source,
            backup_groups,
            source_groups,
            after: from.after_name.clone(),
        }
    }

    /// The next names with their rows; `None` when both listings are over. Each call lists at
    /// most one page per account.
    pub async fn next_batch(&mut self) -> Result<Option<Vec<NameRows>>, OpError> {
        let mut out = Vec::new();
        let after = self.after.clone();
        loop {
            match join_step(self.order, &mut self.backup_groups, &mut self.source_groups) {
                JoinStep::Pair(b, s) => {
                    let listed_by = s.as_ref().and_then(|g| g.listed_by);
                    let name = b
                        .as_ref()
                        .or(s.as_ref())
                        .map(|g| g.name().to_owned())
                        .unwrap_or_default();
                    self.after = Some(name.clone());
                    out.push(NameRows {
                        name,
                        backup: b.map(|g| g.rows).unwrap_or_default(),
                        source: s.map(|g| g.rows).unwrap_or_default(),
                        listed_by,
                    });
                }
                JoinStep::NeedLeft | JoinStep::NeedRight if !out.is_empty() => {
                    return Ok(Some(out))
                }
                JoinStep::NeedLeft => {
                    let side = self.backup.as_mut().expect("an unread side is ended");
                    side.fetch(self.order, after.as_deref(), &mut self.backup_groups)
                        .await?;
                }
                JoinStep::NeedRight => {
                    let side = self.source.as_mut().expect("an unread side is ended");
                    side.fetch(self.order, after.as_deref(), &mut self.source_groups)
                        .await?;
                }
                JoinStep::Done => return Ok((!out.is_empty()).then_some(out)),
            }
        }
    }

    /// Where a later stream starts to go on after the names handed out so far.
    pub fn checkpoint(&self) -> StreamCheckpoint {
        let cursor = |side: &Option<SideListing<'_>>, pending: &SortedInput<Group>| match side {
            None => SideCursor::End,
            Some(s) => s.cursor(pending.front()),
        };
        StreamCheckpoint {
            backup: cursor(&self.backup, &self.backup_groups),
            source: cursor(&self.source, &self.source_groups),
            after_name: self.after.clone(),
        }
    }
}
