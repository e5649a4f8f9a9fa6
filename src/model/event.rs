//! Blob Storage events as Event Grid's Storage-queue handler delivers them: one event per
//! message, in the Event Grid schema (`eventType`, `topic`, `eventTime`) or the CloudEvents 1.0
//! schema (`type`, `source`, `time`), either as an object or as a one-element array (the form of
//! Microsoft's examples). Parsing is pure; see `ops::event` for what lakeguard does with them.
//!
//! The blob's name is taken from `subject` (`/blobServices/default/containers/<c>/blobs/<name>`),
//! which carries it as stored; the `url` fields are percent-encoded and may name the dfs
//! endpoint. ADLS Gen2 renames carry `sourceUrl` and `destinationUrl`, whose paths are decoded.

use serde::Deserialize;

use super::Etag;

/// What happened, as far as lakeguard acts on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A blob was created or replaced; `etag` is the version it then had.
    BlobCreated {
        etag: Option<Etag>,
    },
    BlobDeleted,
    /// ADLS Gen2: a file renamed from `from` (a name in the same container).
    BlobRenamed {
        from: String,
    },
    /// ADLS Gen2: a directory renamed from `from`; every path under it moved.
    DirectoryRenamed {
        from: String,
    },
    /// ADLS Gen2: a directory deleted (with everything under it when recursive).
    DirectoryDeleted,
    /// Any other type (tier changes, directory creation, …): acknowledged, counted.
    Other(String),
}

/// One event, reduced to what lakeguard needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobEvent {
    pub id: String,
    /// The storage account the event is about (last segment of `topic` / `source`).
    pub account: String,
    pub container: String,
    /// The blob (or directory) path inside the container.
    pub name: String,
    pub kind: EventKind,
    /// Event Grid's ordering key of events of one blob (hex, comparable as strings of equal
    /// length), when present.
    pub sequencer: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wire {
    id: Option<String>,
    subject: Option<String>,
    // Event Grid schema
    event_type: Option<String>,
    topic: Option<String>,
    // CloudEvents schema
    #[serde(rename = "type")]
    ce_type: Option<String>,
    source: Option<String>,
    #[serde(default)]
    data: Data,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Data {
    e_tag: Option<String>,
    sequencer: Option<String>,
    source_url: Option<String>,
}

/// Why a message is not a usable event (it goes to the poison queue with this reason).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("not a Blob Storage event: {0}")]
    Schema(String),
}

/// The path of a blob URL inside its container: `https://acct.blob…/<container>/<path>`.
fn path_in_container(url: &str, container: &str) -> Option<String> {
    let u = url::Url::parse(url).ok()?;
    let mut segs = u.path_segments()?;
    // Path-style URLs (emulators) carry the account first.
    let first = segs.next()?;
    let segs: Vec<&str> = if first == container {
        segs.collect()
    } else {
        let second = segs.next()?;
        if second != container {
            return None;
        }
        segs.collect()
    };
    let raw = segs.join("/");
    percent_encoding::percent_decode_str(&raw)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

fn one(v: serde_json::Value) -> Result<BlobEvent, EventError> {
    let w: Wire = serde_json::from_value(v).map_err(|e| EventError::Schema(e.to_string()))?;
    let ty = w
        .event_type
        .or(w.ce_type)
        .ok_or_else(|| EventError::Schema("no eventType / type".into()))?;
    let origin = w
        .topic
        .or(w.source)
        .ok_or_else(|| EventError::Schema("no topic / source".into()))?;
    let account = origin
        .rsplit_once("/storageAccounts/")
        .map(|(_, a)| a.trim_end_matches('/').to_owned())
        .ok_or_else(|| EventError::Schema(format!("topic {origin:?} is not a storage account")))?;
    let subject = w
        .subject
        .ok_or_else(|| EventError::Schema("no subject".into()))?;
    let rest = subject
        .strip_prefix("/blobServices/default/containers/")
        .ok_or_else(|| EventError::Schema(format!("subject {subject:?} is not a blob")))?;
    let (container, name) = rest
        .split_once("/blobs/")
        .ok_or_else(|| EventError::Schema(format!("subject {subject:?} names no blob")))?;
    if container.is_empty() || name.is_empty() {
        return Err(EventError::Schema(format!(
            "subject {subject:?} names no blob"
        )));
    }
    let from = || {
        w.data
            .source_url
            .as_deref()
            .and_then(|u| path_in_container(u, container))
            .ok_or_else(|| EventError::Schema(format!("{ty} without a usable sourceUrl")))
    };
    let kind = match ty.as_str() {
        "Microsoft.Storage.BlobCreated" => EventKind::BlobCreated {
            etag: w.data.e_tag.as_deref().map(Etag::new),
        },
        "Microsoft.Storage.BlobDeleted" => EventKind::BlobDeleted,
        "Microsoft.Storage.BlobRenamed" => EventKind::BlobRenamed { from: from()? },
        "Microsoft.Storage.DirectoryRenamed" => EventKind::DirectoryRenamed { from: from()? },
        "Microsoft.Storage.DirectoryDeleted" => EventKind::DirectoryDeleted,
        other => EventKind::Other(other.to_owned()),
    };
    Ok(BlobEvent {
        id: w.id.unwrap_or_default(),
        account,
        container: container.to_owned(),
        name: name.to_owned(),
        kind,
        sequencer: w.data.sequencer,
    })
}

/// The events of one queue message.
pub fn parse(text: &str) -> Result<Vec<BlobEvent>, EventError> {
    let v: serde_json::Value =
        serde_json::from_str(text.trim()).map_err(|e| EventError::NotJson(e.to_string()))?;
    match v {
        serde_json::Value::Array(items) if !items.is_empty() => {
            items.into_iter().map(one).collect()
        }
        serde_json::Value::Object(_) => Ok(vec![one(v)?]),
        _ => Err(EventError::Schema(
            "neither an event object nor a non-empty array of events".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/events")
            .join(name);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn both_schemas_of_the_documented_examples_parse_alike() {
        for schema in ["eventgrid", "cloudevents"] {
            let created = parse(&fixture(&format!("{schema}-blob-created.json"))).unwrap();
            assert_eq!(
                created,
                vec![BlobEvent {
                    id: "831e1650-001e-001b-66ab-eeb76e069631".into(),
                    account: "my-storage-account".into(),
                    container: "test-container".into(),
                    name: "new-file.txt".into(),
                    kind: EventKind::BlobCreated {
                        etag: Some(Etag::new("0x8D4BCC2E4835CD0"))
                    },
                    sequencer: Some("00000000000004420000000000028963".into()),
                }],
                "{schema}"
            );
            let deleted = parse(&fixture(&format!("{schema}-blob-deleted.json"))).unwrap();
            assert_eq!(deleted[0].kind, EventKind::BlobDeleted);
            assert_eq!(deleted[0].name, "file-to-delete.txt");
            let renamed = parse(&fixture(&format!("{schema}-blob-renamed.json"))).unwrap();
            assert_eq!(
                renamed[0].kind,
                EventKind::BlobRenamed {
                    from: "my-original-file.txt".into()
                }
            );
            assert_eq!(renamed[0].name, "my-renamed-file.txt");
            let dir = parse(&fixture(&format!("{schema}-directory-renamed.json"))).unwrap();
            assert_eq!(
                dir[0].kind,
                EventKind::DirectoryRenamed {
                    from: "my-original-directory".into()
                }
            );
            let tier = parse(&fixture(&format!("{schema}-blob-tier-changed.json"))).unwrap();
            assert_eq!(
                tier[0].kind,
                EventKind::Other("Microsoft.Storage.BlobTierChanged".into())
            );
        }
    }

    #[test]
    fn bad_messages_are_rejected_with_a_reason() {
        for (text, want) in [
            ("not json", "not JSON"),
            ("[]", "neither"),
            ("{\"eventType\":\"x\"}", "no topic"),
            (
                "{\"eventType\":\"Microsoft.Storage.BlobCreated\",\"topic\":\"/subscriptions/s/providers/Microsoft.Storage/storageAccounts/a\",\"subject\":\"/blobServices/default/containers/c\"}",
                "names no blob",
            ),
            (
                "{\"eventType\":\"Microsoft.Storage.BlobRenamed\",\"topic\":\"/x/storageAccounts/a\",\"subject\":\"/blobServices/default/containers/c/blobs/n\",\"data\":{}}",
                "sourceUrl",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn urls_are_decoded_and_path_style_urls_understood() {
        assert_eq!(
            path_in_container(
                "http://127.0.0.1:10000/devstoreaccount1/c/a%20b/%C3%BC.txt",
                "c"
            ),
            Some("a b/ü.txt".into())
        );
        assert_eq!(
            path_in_container("https://acct.dfs.core.windows.net/fs/dir/x", "fs"),
            Some("dir/x".into())
        );
        assert_eq!(
            path_in_container("https://acct.blob.core.windows.net/other/x", "fs"),
            None
        );
    }
}
