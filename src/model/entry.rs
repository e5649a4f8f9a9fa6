//! One row of a blob listing, independent of the SDK's generated models so that the pure core can
//! be tested without I/O.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// An entity tag, kept unquoted.
///
/// The service is not consistent about quoting: response headers carry `"0x8D..."` while listings
/// (and some SDKs) carry the bare value. Comparing raw strings would make every blob look changed,
/// so equality is defined on the unquoted form and `Display` gives the quoted header form that
/// `If-Match` expects.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Etag(String);

impl Etag {
    pub fn new(raw: impl AsRef<str>) -> Self {
        let raw = raw.as_ref().trim();
        let raw = raw.strip_prefix("W/").unwrap_or(raw);
        Etag(raw.trim_matches('"').to_owned())
    }

    /// The bare value, without quotes.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The quoted form used in `If-Match` headers and in queue messages.
    pub fn quoted(&self) -> String {
        format!("\"{}\"", self.0)
    }
}

impl fmt::Display for Etag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.0)
    }
}

impl fmt::Debug for Etag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Etag({})", self.0)
    }
}

impl From<&str> for Etag {
    fn from(s: &str) -> Self {
        Etag::new(s)
    }
}

impl Serialize for Etag {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.quoted())
    }
}

impl<'de> Deserialize<'de> for Etag {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(Etag::new(s))
    }
}

/// One listing row: a base blob (`snapshot == None`) or one of its snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobEntry {
    pub name: String,
    pub snapshot: Option<String>,
    pub etag: Etag,
    #[serde(with = "time::serde::rfc3339")]
    pub last_modified: OffsetDateTime,
    pub content_length: u64,
    pub content_type: Option<String>,
    pub content_md5: Option<Vec<u8>>,
    /// Keys lower-cased: metadata names are case-insensitive in the service.
    pub metadata: BTreeMap<String, String>,
    /// Owner, group, permissions and ACL, from a hierarchical-namespace listing with
    /// `include=permissions` (`None` everywhere else).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security: Option<super::security::Security>,
}

impl BlobEntry {
    pub fn is_snapshot(&self) -> bool {
        self.snapshot.is_some()
    }

    /// HNS directory placeholders (and their emulation on flat accounts) are not data: a
    /// zero-length blob with `hdi_isfolder=true`. The metadata alone proves nothing (anyone can
    /// set it, and tools that copy metadata carry it onto files): a blob with content is data,
    /// whatever its metadata says, and is backed up, restored and verified like any other.
    pub fn is_directory_placeholder(&self) -> bool {
        self.content_length == 0
            && self
                .metadata
                .get(super::metadata::HDI_ISFOLDER)
                .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }

    pub fn meta(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }
}

/// Whether a blob name can be addressed exactly by a URL, with the reason when it cannot.
///
/// A name with a `.` or `..` path segment (`a/./b`, `a/../b`, `./x`, `x/..`) cannot: URL
/// handling removes dot segments (RFC 3986 5.2.4; the `url` crate drops them even when pushed as
/// one segment, and percent-encoding them as `%2E` does not help, since `%2E` is the same
/// segment), so the request would address *another* blob (`a/../b` becomes `b`'s sibling `a/b`
/// or `b`). Azurite stores such names literally when a raw request creates them; the service's
/// naming rules advise against names whose segments end in a dot. lakeguard refuses these names
/// (a clear, per-blob error) rather than touch another blob.
pub fn check_addressable(name: &str) -> Result<(), String> {
    match name.split('/').find(|seg| *seg == "." || *seg == "..") {
        Some(seg) => Err(format!(
            "the name `{name}` has a `{seg}` path segment, which a URL cannot address (it would \
             be normalised onto another blob); lakeguard does not copy, restore or delete it"
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_equality_ignores_quotes() {
        assert_eq!(Etag::new("\"0x8D1\""), Etag::new("0x8D1"));
        assert_eq!(Etag::new("0x8D1").to_string(), "\"0x8D1\"");
        assert_eq!(Etag::new("W/\"abc\"").as_str(), "abc");
    }

    #[test]
    fn dot_segments_are_not_addressable() {
        for bad in ["a/./b", "a/../b", "./x", "x/..", ".", "..", "x/."] {
            let e = check_addressable(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
        for ok in [
            "a.b", "a/.b/c", "..x", "x..", "a//b", "/a", "a/", "...", "a/.../b",
        ] {
            assert!(check_addressable(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn only_an_empty_blob_is_a_directory_placeholder() {
        let mut e = BlobEntry {
            name: "d".into(),
            snapshot: None,
            etag: Etag::new("0x1"),
            last_modified: OffsetDateTime::UNIX_EPOCH,
            content_length: 0,
            content_type: None,
            content_md5: None,
            metadata: BTreeMap::from([("hdi_isfolder".into(), "True".into())]),
            security: None,
        };
        assert!(e.is_directory_placeholder());
        e.content_length = 1;
        assert!(
            !e.is_directory_placeholder(),
            "data with the folder flag is data"
        );
        e.content_length = 0;
        e.metadata.clear();
        assert!(
            !e.is_directory_placeholder(),
            "an empty blob is a (empty) file"
        );
    }
}
