//! The backup request: one queue message per source version to back up.
//!
//! Schema v1 (documented in README; other producers may write it):
//! `{"v":1,"container":"raw","blob":"dir/a.csv","etag":"\"0x8D..\"","snapshot":"2026-...Z"}`.
//! The reference implementation's `{"container","blob_name","etag"}` is accepted too, so its users
//! can switch without draining their queue; it names no snapshot, so the worker finds one.
//!
//! Optional `"props"` carries what the producer's listing already knew about the version (the
//! snapshot's ETag from the Snapshot Blob answer, size, content type, time, user metadata), so the
//! worker copies without a HEAD of the snapshot. Without it the worker reads the snapshot.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::Etag;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackupRequest {
    pub v: u32,
    pub container: String,
    pub blob: String,
    pub etag: Etag,
    /// The source snapshot holding exactly `etag`. `None` for legacy messages, and for requests
    /// of the live version (reconcile's repairs: `props` present, see [`BackupRequest::live`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub props: Option<VersionProps>,
    /// The producer saw no backup of this blob (a new blob; a reconcile found none), so the worker
    /// may write with `If-None-Match: *` without a HEAD first. A hint only: a conflict sends the
    /// worker back to the HEAD path in the same delivery.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub backup_absent: bool,
}

/// The version's properties as the snapshot holds them. Only trusted together with
/// `snapshot_etag`: the copy reads the snapshot with `x-ms-source-if-match` on it, so a snapshot
/// that holds something else fails the copy instead of being backed up under the wrong version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionProps {
    pub snapshot_etag: Etag,
    pub length: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// The source version's Last-Modified.
    #[serde(with = "time::serde::rfc3339")]
    pub last_modified: OffsetDateTime,
    /// The blob's user metadata (lakeguard's own keys excluded).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Hierarchical source: the path's owner, group, permissions and ACL as listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security: Option<super::Security>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("message is not JSON: {0}")]
    NotJson(String),
    #[error("message is not a backup request: {0}")]
    Schema(String),
    #[error("unsupported message version {0} (this worker understands v1)")]
    Version(u64),
    #[error("invalid field `{field}`: {problem}")]
    Field {
        field: &'static str,
        problem: String,
    },
}

/// Blob names are at most 1024 characters.
pub const MAX_BLOB_NAME_CHARS: usize = 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct V1 {
    v: u64,
    container: String,
    blob: String,
    etag: String,
    #[serde(default)]
    snapshot: Option<String>,
    #[serde(default)]
    props: Option<VersionProps>,
    #[serde(default)]
    backup_absent: bool,
}

#[derive(Deserialize)]
struct Legacy {
    container: String,
    blob_name: String,
    etag: String,
}

impl BackupRequest {
    pub fn new(container: &str, blob: &str, etag: &Etag, snapshot: &str) -> Self {
        BackupRequest {
            v: 1,
            container: container.to_owned(),
            blob: blob.to_owned(),
            etag: etag.clone(),
            snapshot: Some(snapshot.to_owned()),
            props: None,
            backup_absent: false,
        }
    }

    /// A request for the live blob while its ETag is `etag` (no snapshot named): the worker
    /// copies the base blob under `source-if-match`, or looks for a snapshot of the version.
    /// A request naming only the version: the worker finds a snapshot of it, or takes one while
    /// it is live (the reference schema's semantics; the event path's fallback).
    pub fn version(container: &str, blob: &str, etag: &Etag) -> Self {
        BackupRequest {
            v: 1,
            container: container.to_owned(),
            blob: blob.to_owned(),
            etag: etag.clone(),
            snapshot: None,
            props: None,
            backup_absent: false,
        }
    }

    pub fn live(container: &str, blob: &str, etag: &Etag) -> Self {
        BackupRequest {
            v: 1,
            container: container.to_owned(),
            blob: blob.to_owned(),
            etag: etag.clone(),
            snapshot: None,
            props: None,
            backup_absent: false,
        }
    }

    pub fn with_backup_absent(mut self, absent: bool) -> Self {
        self.backup_absent = absent;
        self
    }

    pub fn with_props(mut self, props: VersionProps) -> Self {
        self.props = Some(props);
        self
    }

    /// The message text (JSON by serde: quotes and backslashes in names stay valid JSON).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a request always serialises")
    }

    /// Parses a message text of either schema and validates it.
    pub fn parse(text: &str) -> Result<Self, RequestError> {
        let value: serde_json::Value =
            serde_json::from_str(text.trim()).map_err(|e| RequestError::NotJson(e.to_string()))?;
        let obj = value
            .as_object()
            .ok_or_else(|| RequestError::Schema("not a JSON object".into()))?;
        let req = if obj.contains_key("v") {
            let m: V1 =
                serde_json::from_value(value).map_err(|e| RequestError::Schema(e.to_string()))?;
            if m.v != 1 {
                return Err(RequestError::Version(m.v));
            }
            BackupRequest {
                v: 1,
                container: m.container,
                blob: m.blob,
                etag: Etag::new(&m.etag),
                snapshot: m.snapshot,
                props: m.props,
                backup_absent: m.backup_absent,
            }
        } else {
            let m: Legacy =
                serde_json::from_value(value).map_err(|e| RequestError::Schema(e.to_string()))?;
            BackupRequest {
                v: 1,
                container: m.container,
                blob: m.blob_name,
                etag: Etag::new(&m.etag),
                snapshot: None,
                props: None,
                backup_absent: false,
            }
        };
        req.validate()?;
        Ok(req)
    }

    fn validate(&self) -> Result<(), RequestError> {
        crate::settings::validate_container_name(&self.container).map_err(|problem| {
            RequestError::Field {
                field: "container",
                problem,
            }
        })?;
        let n = self.blob.chars().count();
        if n == 0 || n > MAX_BLOB_NAME_CHARS {
            return Err(RequestError::Field {
                field: "blob",
                problem: format!("{n} characters (1..=1024 allowed)"),
            });
        }
        // Refused now, with the reason, rather than on every delivery (it can never be copied).
        super::check_addressable(&self.blob).map_err(|problem| RequestError::Field {
            field: "blob",
            problem,
        })?;
        if self.etag.as_str().is_empty() {
            return Err(RequestError::Field {
                field: "etag",
                problem: "empty".into(),
            });
        }
        // Without a snapshot, props describe the live blob at `etag` (reconcile's repairs), so
        // the ETag they carry for the copy's `source-if-match` must be that one.
        if let (Some(p), None) = (&self.props, &self.snapshot) {
            if p.snapshot_etag != self.etag {
                return Err(RequestError::Field {
                    field: "props",
                    problem: "without a snapshot, props describe the live version: their snapshot_etag must equal etag".into(),
                });
            }
        }
        if let Some(s) = &self.snapshot {
            if time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .is_err()
            {
                return Err(RequestError::Field {
                    field: "snapshot",
                    problem: format!("`{s}` is not a snapshot timestamp"),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_with_hostile_names() {
        for name in [
            "a\"b\\c.csv",
            "dir/sub dir/#1?%20+ü😀.txt",
            &"n".repeat(1024),
        ] {
            let r = BackupRequest::new(
                "raw",
                name,
                &Etag::new("\"0x8D1\""),
                "2026-11-22T03:08:15.1234567Z",
            );
            let text = r.to_json();
            assert!(text.contains(r#""v":1"#));
            assert!(text.contains(r#""etag":"\"0x8D1\"""#), "{text}");
            assert_eq!(BackupRequest::parse(&text).unwrap(), r);
        }
    }

    #[test]
    fn names_with_dot_segments_are_refused_with_the_reason() {
        for name in ["a/../b", "./x"] {
            let text = BackupRequest::new("raw", name, &Etag::new("0x1"), "2026-11-22T03:08:15Z")
                .to_json();
            let e = BackupRequest::parse(&text).unwrap_err().to_string();
            assert!(e.contains("segment") && e.contains(name), "{e}");
        }
    }

    #[test]
    fn hints_round_trip_and_are_validated() {
        let props = VersionProps {
            snapshot_etag: Etag::new("\"0x8D2\""),
            length: 42,
            content_type: Some("text/csv".into()),
            last_modified: OffsetDateTime::from_unix_timestamp(1_795_000_000).unwrap(),
            metadata: [("owner".to_string(), "team \"x\"".to_string())].into(),
            security: Some(crate::model::Security {
                owner: "alice".into(),
                group: "staff".into(),
                permissions: "rw-r-----".into(),
                acl: "user::rw-,group::r--,other::---".into(),
            }),
        };
        let r = BackupRequest::new(
            "raw",
            "a b.csv",
            &Etag::new("0x8D1"),
            "2026-11-22T03:08:15.1234567Z",
        )
        .with_props(props)
        .with_backup_absent(true);
        let text = r.to_json();
        assert!(text.contains(r#""backup_absent":true"#), "{text}");
        assert_eq!(BackupRequest::parse(&text).unwrap(), r);
        // Without hints the message is the plain v1 schema.
        let plain = BackupRequest::new("raw", "a", &Etag::new("1"), "2026-11-22T03:08:15Z");
        assert!(!plain.to_json().contains("props") && !plain.to_json().contains("absent"));
        // Without a snapshot, props describe the live version: they round-trip when their ETag
        // is the request's, and are refused when it is another (as are unknown props fields).
        let live = BackupRequest::live("raw", "a b.csv", &Etag::new("0x8D1"))
            .with_props(VersionProps {
                snapshot_etag: Etag::new("\"0x8D1\""),
                length: 1,
                content_type: None,
                last_modified: OffsetDateTime::from_unix_timestamp(1_795_000_000).unwrap(),
                metadata: BTreeMap::new(),
                security: None,
            })
            .with_backup_absent(true);
        let text = live.to_json();
        assert!(!text.contains("snapshot\""), "{text}");
        assert_eq!(BackupRequest::parse(&text).unwrap(), live);
        let err = BackupRequest::parse(
            r#"{"v":1,"container":"raw","blob":"a","etag":"x","props":{"snapshot_etag":"y","length":1,"last_modified":"2026-11-22T03:08:15Z"}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("props"), "{err}");
        let err = BackupRequest::parse(
            r#"{"v":1,"container":"raw","blob":"a","etag":"x","snapshot":"2026-11-22T03:08:15Z","props":{"snapshot_etag":"y","length":1,"last_modified":"2026-11-22T03:08:15Z","size":2}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("size"), "{err}");
    }

    #[test]
    fn legacy_schema() {
        let r = BackupRequest::parse(r#"{"container":"raw","blob_name":"a.csv","etag":"\"0x1\""}"#)
            .unwrap();
        assert_eq!(r.blob, "a.csv");
        assert_eq!(r.snapshot, None);
        assert_eq!(r.etag, Etag::new("0x1"));
    }

    #[test]
    fn malformed_messages_are_rejected_with_reasons() {
        let cases = [
            ("not json", "not JSON"),
            ("[1,2]", "not a JSON object"),
            (
                r#"{"v":2,"container":"raw","blob":"a","etag":"x","snapshot":"2026-11-22T03:08:15Z"}"#,
                "version 2",
            ),
            (r#"{"v":1,"container":"raw","etag":"x"}"#, "blob"),
            (
                r#"{"v":1,"container":"Raw!","blob":"a","etag":"x"}"#,
                "container",
            ),
            (r#"{"v":1,"container":"raw","blob":"","etag":"x"}"#, "blob"),
            (
                r#"{"v":1,"container":"raw","blob":"a","etag":"x","snapshot":"yesterday"}"#,
                "snapshot",
            ),
            (
                r#"{"v":1,"container":"raw","blob":"a","etag":"x","extra":1}"#,
                "extra",
            ),
        ];
        for (text, needle) in cases {
            let err = BackupRequest::parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
        let huge = format!(
            r#"{{"v":1,"container":"raw","blob":"{}","etag":"x"}}"#,
            "a".repeat(1025)
        );
        assert!(BackupRequest::parse(&huge)
            .unwrap_err()
            .to_string()
            .contains("1025"));
    }
}
