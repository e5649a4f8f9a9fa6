//! Name order and the streaming merge-join shared by reconcile and restore planning.
//!
//! Both planners walk two listings "side by side". A merge-join is only correct if both inputs
//! are sorted by the *same* total order as the comparator, so the order is an explicit parameter
//! and every adjacent pair of each input is checked as it is pushed: a listing that is not in the
//! declared order makes the join fail instead of silently pairing the wrong names.

use std::cmp::Ordering;
use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::model::BlobEntry;

/// The order in which a listing service returns blob names.
///
/// Azure documents List Blobs results only as "alphabetical". What is observed:
/// - Flat-namespace accounts: ordered by UTF-16 code units (a blob written for every Unicode
///   character came back in UTF-16BE order; blobfile/blobfile PR #238).
/// - Azurite (3.x, LokiJS store): sorts with JavaScript string comparison (`a > b`), which is
///   UTF-16 code unit order.
/// - Hierarchical-namespace (ADLS Gen2) accounts: a flat listing comes back depth-first, path
///   segment by segment (`A`, `A/dat1`, `A-B`, ...: Azure/azure-sdk-for-go issue #24210), i.e. as if
///   `/` sorted before every other character.
///
/// UTF-8 byte order (Rust's `str` order) and UTF-16 unit order agree except between characters in
/// U+E000..=U+FFFF and astral characters (surrogate pairs sort below U+E000 in UTF-16, above it in
/// UTF-8), which is exactly the kind of difference a merge-join must not get wrong.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NameOrder {
    /// Byte order of the UTF-8 encoding (same as `str::cmp`).
    Utf8Bytes,
    /// Order of UTF-16 code units: Azure flat-namespace accounts and Azurite.
    #[default]
    Utf16Units,
    /// Path segments (split on `/`) compared one by one in UTF-16 unit order, a name before its
    /// descendants: flat listings of hierarchical-namespace accounts. Observed with ASCII names
    /// only; the unit order inside a segment is assumed to be the flat one.
    Hierarchical,
}

impl NameOrder {
    pub fn cmp(self, a: &str, b: &str) -> Ordering {
        match self {
            NameOrder::Utf8Bytes => a.as_bytes().cmp(b.as_bytes()),
            NameOrder::Utf16Units => a.encode_utf16().cmp(b.encode_utf16()),
            // Mapping `/` below every other unit is the same as comparing segment by segment,
            // a shorter segment list first when one is a prefix of the other.
            NameOrder::Hierarchical => {
                let key = |u: u16| {
                    if u == u16::from(b'/') {
                        0u32
                    } else {
                        u32::from(u) + 1
                    }
                };
                a.encode_utf16().map(key).cmp(b.encode_utf16().map(key))
            }
        }
    }

    /// Sorts names (or anything named) in this order; for tests and small in-memory lists.
    pub fn sort_by_name<T>(self, items: &mut [T], name: impl Fn(&T) -> &str) {
        items.sort_by(|x, y| self.cmp(name(x), name(y)));
    }
}

/// Something that belongs to one blob name in a sorted listing.
pub trait Named {
    fn name(&self) -> &str;
}

impl Named for BlobEntry {
    fn name(&self) -> &str {
        &self.name
    }
}

/// Why a join (or a grouping) refused its input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    /// The input is not strictly increasing in the declared order. Either the listing's real
    /// order differs from the declared [`NameOrder`] (e.g. a hierarchical-namespace account joined
    /// as flat) or a name is listed twice. Continuing would pair the wrong names.
    #[error("{input} listing is not in {order:?} order: {previous:?} came before {next:?}")]
    OutOfOrder {
        input: &'static str,
        order: NameOrder,
        previous: String,
        next: String,
    },
    /// A snapshot row in an input that must hold base blobs only (a flat listing without
    /// `include=snapshots`): its etag would be taken for the live blob's.
    #[error(
        "{input} listing contains snapshot {snapshot} of {name:?}; base blobs only are expected"
    )]
    UnexpectedSnapshot {
        input: &'static str,
        name: String,
        snapshot: String,
    },
    /// A page was pushed after the input was declared finished: a caller bug.
    #[error("{input} listing received a page after its end")]
    PushAfterEnd { input: &'static str },
}

/// One input of a join: a bounded queue of rows plus the name of the last row pushed, so that
/// order is checked across page boundaries too.
#[derive(Debug)]
pub(crate) struct SortedInput<T> {
    label: &'static str,
    buf: VecDeque<T>,
    last: Option<String>,
    ended: bool,
    pushed: u64,
}

impl<T: Named> SortedInput<T> {
    pub(crate) fn new(label: &'static str) -> Self {
        SortedInput {
            label,
            buf: VecDeque::new(),
            last: None,
            ended: false,
            pushed: 0,
        }
    }

    /// Appends rows, checking that names strictly increase. On error nothing after the
    /// offending row is kept, and the caller must stop: the join is no longer trustworthy.
    pub(crate) fn push(
        &mut self,
        order: NameOrder,
        rows: impl IntoIterator<Item = T>,
    ) -> Result<(), JoinError> {
        if self.ended {
            return Err(JoinError::PushAfterEnd { input: self.label });
        }
        for row in rows {
            if let Some(prev) = &self.last {
                if order.cmp(prev, row.name()) != Ordering::Less {
                    return Err(JoinError::OutOfOrder {
                        input: self.label,
                        order,
                        previous: prev.clone(),
                        next: row.name().to_owned(),
                    });
                }
            }
            self.last = Some(row.name().to_owned());
            self.pushed += 1;
            self.buf.push_back(row);
        }
        Ok(())
    }

    pub(crate) fn end(&mut self) {
        self.ended = true;
    }

    /// The next item not yet taken by the join.
    pub(crate) fn front(&self) -> Option<&T> {
        self.buf.front()
    }

    pub(crate) fn pushed(&self) -> u64 {
        self.pushed
    }
}

/// What the generic join needs next, or the next pair of rows sharing one name.
#[derive(Debug)]
pub(crate) enum JoinStep<L, R> {
    Pair(Option<L>, Option<R>),
    NeedLeft,
    NeedRight,
    Done,
}

/// Pops the next name from two sorted inputs. A side is only asked for more when its queue is
/// empty and not ended, so at most one page per side is held.
pub(crate) fn join_step<L: Named, R: Named>(
    order: NameOrder,
    left: &mut SortedInput<L>,
    right: &mut SortedInput<R>,
) -> JoinStep<L, R> {
    match (left.buf.front(), right.buf.front()) {
        (None, _) if !left.ended => JoinStep::NeedLeft,
        (_, None) if !right.ended => JoinStep::NeedRight,
        (None, None) => JoinStep::Done,
        (Some(_), None) => JoinStep::Pair(left.buf.pop_front(), None),
        (None, Some(_)) => JoinStep::Pair(None, right.buf.pop_front()),
        (Some(l), Some(r)) => match order.cmp(l.name(), r.name()) {
            Ordering::Less => JoinStep::Pair(left.buf.pop_front(), None),
            Ordering::Greater => JoinStep::Pair(None, right.buf.pop_front()),
            Ordering::Equal => JoinStep::Pair(left.buf.pop_front(), right.buf.pop_front()),
        },
    }
}

/// Groups a listing that includes snapshots into one `Vec` per exact name.
///
/// The service keeps all rows of one name together (they share the sort key), but the order of
/// the base blob and its snapshots *within* a name is not stable (Azurite varies it), so a group
/// is handed out unordered and only once the next name has started (or the input ended): a
/// name's rows may straddle a page boundary. Names are compared exactly, never by prefix.
/// Memory: the current page plus one name's rows.
#[derive(Debug)]
pub struct NameGroups {
    order: NameOrder,
    label: &'static str,
    complete: VecDeque<Vec<BlobEntry>>,
    current: Vec<BlobEntry>,
    ended: bool,
}

impl NameGroups {
    pub fn new(order: NameOrder, label: &'static str) -> Self {
        NameGroups {
            order,
            label,
            complete: VecDeque::new(),
            current: Vec::new(),
            ended: false,
        }
    }

    /// Adds one page. Fails when names go backwards (a name listed again after another one).
    pub fn push(&mut self, rows: impl IntoIterator<Item = BlobEntry>) -> Result<(), JoinError> {
        if self.ended {
            return Err(JoinError::PushAfterEnd { input: self.label });
        }
        for row in rows {
            if let Some(cur) = self.current.first() {
                match self.order.cmp(&cur.name, &row.name) {
                    Ordering::Equal => {}
                    Ordering::Less => self.complete.push_back(std::mem::take(&mut self.current)),
                    Ordering::Greater => {
                        return Err(JoinError::OutOfOrder {
                            input: self.label,
                            order: self.order,
                            previous: cur.name.clone(),
                            next: row.name,
                        })
                    }
                }
            }
            self.current.push(row);
        }
        Ok(())
    }

    /// Declares the listing finished: the last name's group becomes complete.
    pub fn end(&mut self) {
        self.ended = true;
        if !self.current.is_empty() {
            self.complete.push_back(std::mem::take(&mut self.current));
        }
    }

    /// The next complete group (all rows of one name, in no particular order).
    pub fn order(&self) -> NameOrder {
        self.order
    }

    pub fn pop(&mut self) -> Option<Vec<BlobEntry>> {
        self.complete.pop_front()
    }

    /// True when every pushed row has been handed out and the input ended.
    pub fn is_finished(&self) -> bool {
        self.ended && self.complete.is_empty() && self.current.is_empty()
    }
}

/// Sync convenience over [`NameGroups`] for an in-memory (or blocking) listing.
pub fn group_by_name(
    order: NameOrder,
    rows: impl IntoIterator<Item = BlobEntry>,
) -> Result<Vec<Vec<BlobEntry>>, JoinError> {
    let mut g = NameGroups::new(order, "listing");
    g.push(rows)?;
    g.end();
    Ok(std::iter::from_fn(|| g.pop()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf16_and_utf8_differ_on_astral_vs_high_bmp() {
        let astral = "\u{1F600}"; // surrogate pair D83D DE00
        let high_bmp = "\u{FF5E}";
        assert_eq!(
            NameOrder::Utf8Bytes.cmp(astral, high_bmp),
            Ordering::Greater
        );
        assert_eq!(NameOrder::Utf16Units.cmp(astral, high_bmp), Ordering::Less);
        assert_eq!(
            NameOrder::Hierarchical.cmp(astral, high_bmp),
            Ordering::Less
        );
    }

    #[test]
    fn hierarchical_matches_observed_adls_order() {
        // Order observed on an ADLS Gen2 account (Azure/azure-sdk-for-go#24210).
        let adls = [
            "A", "A/dat1", "A-B", "A-B/dat2", "A-B-C", "A-C", "A.C", "A.C/dat3", "AB", "AB/AB",
            "AB/dat4", "AB.txt", "ABC",
        ];
        for w in adls.windows(2) {
            assert_eq!(
                NameOrder::Hierarchical.cmp(w[0], w[1]),
                Ordering::Less,
                "{w:?}"
            );
        }
        // The same names on a flat account.
        let flat = [
            "A", "A-B", "A-B-C", "A-B/dat2", "A-C", "A.C", "A.C/dat3", "A/dat1", "AB", "AB.txt",
            "AB/AB", "AB/dat4", "ABC",
        ];
        for w in flat.windows(2) {
            assert_eq!(
                NameOrder::Utf16Units.cmp(w[0], w[1]),
                Ordering::Less,
                "{w:?}"
            );
        }
    }

    #[test]
    fn prefix_sorts_first_in_every_order() {
        for o in [
            NameOrder::Utf8Bytes,
            NameOrder::Utf16Units,
            NameOrder::Hierarchical,
        ] {
            assert_eq!(o.cmp("a", "a.bak"), Ordering::Less);
            assert_eq!(o.cmp("a", "a/b"), Ordering::Less);
            assert_eq!(o.cmp("a", "a"), Ordering::Equal);
        }
    }
}
