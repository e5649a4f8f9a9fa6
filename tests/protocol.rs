//! The host's payloads, from fixtures in the captured shapes (see the notes): the handler's
//! protocol types must read exactly these.

use lakeguard::handler::protocol::{decode_text, InvocationRequest, QueueMetadata, TimerInfo};
use lakeguard::model::{BackupRequest, Etag};

fn fixture(name: &str) -> InvocationRequest {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn queue_text_message_is_double_encoded() {
    let p = fixture("queue_trigger_text.json");
    assert_eq!(decode_text(&p.data["msg"]).unwrap(), "hello!!");
    let meta = QueueMetadata::from_metadata(&p.metadata);
    assert_eq!(meta.dequeue_count, 1);
    assert_eq!(
        meta.id.as_deref(),
        Some("52d53c5f-e212-487e-998b-abbe3b9d51e4")
    );
    // Not a backup request: the worker poisons it with a reason.
    let err = BackupRequest::parse("hello!!").unwrap_err();
    assert!(err.to_string().contains("not JSON"));
}

#[test]
fn backup_request_survives_double_encoding_with_quotes_in_the_name() {
    let p = fixture("queue_trigger_backup_request.json");
    let text = decode_text(&p.data["msg"]).unwrap();
    let req = BackupRequest::parse(&text).unwrap();
    assert_eq!(req.container, "raw");
    assert_eq!(req.blob, "dir/a \"quoted\".csv");
    assert_eq!(req.etag, Etag::new("0x8DC1"));
    assert_eq!(
        req.snapshot.as_deref(),
        Some("2026-11-22T03:08:15.1234567Z")
    );
    assert_eq!(QueueMetadata::from_metadata(&p.metadata).dequeue_count, 3);
}

#[test]
fn legacy_reference_message_and_shadowed_metadata() {
    let p = fixture("queue_trigger_legacy_request.json");
    let req = BackupRequest::parse(&decode_text(&p.data["msg"]).unwrap()).unwrap();
    assert_eq!(req.blob, "a.csv");
    assert_eq!(req.snapshot, None);
    // Message properties are merged into Metadata: only DequeueCount is relied upon.
    assert_eq!(QueueMetadata::from_metadata(&p.metadata).dequeue_count, 1);
}

#[test]
fn timer_payloads_parse_leniently() {
    let first = TimerInfo::from_value(fixture("timer_first_run.json").data.get("timer"));
    assert!(!first.is_past_due);
    assert_eq!(first.last, None, "0001-01-01 without offset means never");
    assert!(first.next.is_some());
    let null = TimerInfo::from_value(fixture("timer_status_null.json").data.get("timer"));
    assert_eq!(
        (null.last, null.next, null.is_past_due),
        (None, None, false)
    );
    let due = TimerInfo::from_value(fixture("timer_past_due.json").data.get("timer"));
    assert!(due.is_past_due);
    assert_eq!(
        due.last.unwrap().hour(),
        2,
        "Last without offset is taken as UTC"
    );
}
