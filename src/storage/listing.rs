//! A container listing that keeps the next page in flight while the caller works on this one.
//!
//! A listing is a chain: page k+1 needs page k's marker. Fetched strictly one after the other,
//! every page costs the service's time to build it *plus* ours to parse and act on it (a page of
//! 5,000 backup rows is ~6 MB of XML). Asking for page k+1 as soon as page k arrives overlaps the
//! two, at the price of one more page in memory per listing: still bounded by a page, never by the
//! container. At most one request per listing is in flight; the only extra request is a page
//! fetched ahead that is then not used (the caller stopped early: a reconcile budget spent, an
//! error elsewhere), at most one per listing.

use tokio::task::JoinHandle;
use tracing::Instrument;

use super::blob::{ListOptions, ListPage};
use super::{BlobStore, StorageError};

/// A page on its way, and the marker it was asked for (`None`: the first page).
type Ahead = (Option<String>, JoinHandle<Result<ListPage, StorageError>>);

pub struct Lister {
    store: BlobStore,
    container: String,
    opts: ListOptions,
    /// A container that does not exist lists as empty instead of failing.
    missing_is_empty: bool,
    ahead: Option<Ahead>,
}

impl Lister {
    pub fn new(store: &BlobStore, container: &str, opts: ListOptions) -> Self {
        Lister {
            store: store.clone(),
            container: container.to_owned(),
            opts,
            missing_is_empty: false,
            ahead: None,
        }
    }

    /// For callers to whom a missing container means "no blobs" (reconcile's and verify's sides,
    /// a restore target); everyone else gets the real 404 as an error.
    pub fn missing_is_empty(mut self) -> Self {
        self.missing_is_empty = true;
        self
    }

    /// The page at `marker` (`None`: the first page), taken from the page fetched ahead when it
    /// is that one; then the following page is asked for in the background.
    pub async fn page(&mut self, marker: Option<String>) -> Result<ListPage, StorageError> {
        let ahead = match self.ahead.take() {
            Some((m, handle)) if m == marker => Some(handle),
            Some((_, handle)) => {
                handle.abort();
                None
            }
            None => None,
        };
        let page = match ahead {
            Some(handle) => match handle.await {
                Ok(result) => result,
                // The task panicked or was aborted: ask again here, where an error is reported.
                Err(_) => self.fetch(marker).await,
            },
            None => self.fetch(marker).await,
        }?;
        if let Some(next) = &page.next_marker {
            self.prefetch(Some(next.clone()));
        }
        Ok(page)
    }

    /// Starts fetching the page at `marker` now (e.g. the first pages of two listings that will
    /// be joined, so that both are on their way at once).
    pub fn prefetch(&mut self, marker: Option<String>) {
        if let Some((_, old)) = self.ahead.take() {
            old.abort();
        }
        let (store, container, opts) = (
            self.store.clone(),
            self.container.clone(),
            self.opts.clone(),
        );
        let missing_is_empty = self.missing_is_empty;
        let at = marker.clone();
        let task = async move { fetch(&store, &container, &opts, at, missing_is_empty).await }
            .instrument(tracing::Span::current());
        self.ahead = Some((marker, tokio::spawn(task)));
    }

    async fn fetch(&self, marker: Option<String>) -> Result<ListPage, StorageError> {
        fetch(
            &self.store,
            &self.container,
            &self.opts,
            marker,
            self.missing_is_empty,
        )
        .await
    }
}

impl Drop for Lister {
    fn drop(&mut self) {
        if let Some((_, handle)) = self.ahead.take() {
            handle.abort();
        }
    }
}

async fn fetch(
    store: &BlobStore,
    container: &str,
    opts: &ListOptions,
    marker: Option<String>,
    missing_is_empty: bool,
) -> Result<ListPage, StorageError> {
    match store.list_page(container, opts, marker).await {
        Err(e) if missing_is_empty && e.is_not_found() => Ok(ListPage::default()),
        other => other,
    }
}
