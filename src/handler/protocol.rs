//! The Functions host's custom-handler payloads, as host 4.x really sends them (see the notes:
//! read from the host's source and from captured payloads; where the docs and the code disagree,
//! the code wins).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, PrimitiveDateTime};

/// `POST /{FunctionName}` body for non-forwarded invocations.
#[derive(Debug, Default, Deserialize)]
pub struct InvocationRequest {
    #[serde(rename = "Data", default)]
    pub data: Map<String, Value>,
    #[serde(rename = "Metadata", default)]
    pub metadata: Map<String, Value>,
}

/// The handler's answer. `Outputs` keys must equal binding names; a non-2xx answer fails the
/// invocation (and discards Outputs).
#[derive(Debug, Default, Serialize)]
pub struct InvocationResponse {
    #[serde(rename = "Outputs")]
    pub outputs: Map<String, Value>,
    #[serde(rename = "Logs")]
    pub logs: Vec<String>,
    #[serde(rename = "ReturnValue", skip_serializing_if = "Option::is_none")]
    pub return_value: Option<Value>,
}

impl InvocationResponse {
    pub fn with_logs(logs: Vec<String>) -> Self {
        InvocationResponse { logs, ..Default::default() }
    }
}

/// Undoes the host's double encoding of a value: every value that is not an object, an ISO date
/// or bytes is JSON-serialised and then sent as a JSON string holding that serialisation. So a
/// queue message `hello` arrives as `"\"hello\""` and `{"a":1}` as `"{\"a\":1}"` quoted once more.
/// Tolerant: when the second decoding fails, the once-decoded text is the value.
pub fn decode_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => match serde_json::from_str::<Value>(s) {
            Ok(Value::String(inner)) => Some(inner),
            // A JSON-serialised non-string (number, bool, object text) is its own text.
            Ok(_) => Some(s.clone()),
            Err(_) => Some(s.clone()),
        },
        Value::Null => None,
        // An object stays an object on the wire: its text is its serialisation.
        other => Some(other.to_string()),
    }
}

/// Queue trigger metadata. Message properties are merged into Metadata and can shadow keys
/// such as `Id`, so only `DequeueCount` is trusted, and parsed leniently (a string in practice).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueMetadata {
    pub dequeue_count: u32,
    pub id: Option<String>,
}

impl QueueMetadata {
    pub fn from_metadata(meta: &Map<String, Value>) -> Self {
        let get = |key: &str| meta.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v);
        let dequeue_count = get("DequeueCount")
            .and_then(|v| match v {
                Value::Number(n) => n.as_u64(),
                Value::String(s) => s.trim().trim_matches('"').parse().ok(),
                _ => None,
            })
            .unwrap_or(1)
            .clamp(1, u32::MAX as u64) as u32;
        QueueMetadata { dequeue_count, id: get("Id").and_then(decode_text) }
    }
}

/// Timer trigger payload (`Data.timer`), parsed leniently: `ScheduleStatus` may be null and
/// `Last` may lack an offset (`0001-01-01T00:00:00` before the first run).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TimerInfo {
    pub is_past_due: bool,
    pub last: Option<OffsetDateTime>,
    pub next: Option<OffsetDateTime>,
}

impl TimerInfo {
    pub fn from_value(v: Option<&Value>) -> Self {
        let Some(Value::Object(o)) = v else { return TimerInfo::default() };
        let is_past_due = o.get("IsPastDue").is_some_and(|v| v.as_bool() == Some(true) || v.as_str() == Some("true"));
        let status = o.get("ScheduleStatus").and_then(Value::as_object);
        let time = |k: &str| status.and_then(|s| s.get(k)).and_then(Value::as_str).and_then(parse_lenient_time);
        TimerInfo { is_past_due, last: time("Last"), next: time("Next") }
    }
}

/// RFC 3339, or the same without an offset (taken as UTC). `0001-01-01...` means "never".
pub fn parse_lenient_time(s: &str) -> Option<OffsetDateTime> {
    let t = OffsetDateTime::parse(s, &Rfc3339).ok().or_else(|| {
        let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second][optional [.[subsecond]]]");
        PrimitiveDateTime::parse(s, &fmt).ok().map(PrimitiveDateTime::assume_utc)
    })?;
    (t.year() > 1).then_some(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn double_encoded_strings() {
        assert_eq!(decode_text(&json!("\"hello!!\"")).unwrap(), "hello!!");
        assert_eq!(decode_text(&json!("\"{\\\"a\\\":1}\"")).unwrap(), "{\"a\":1}");
        // Tolerant: a once-encoded value is used as is.
        assert_eq!(decode_text(&json!("plain")).unwrap(), "plain");
        assert_eq!(decode_text(&json!({"a": 1})).unwrap(), "{\"a\":1}");
        assert_eq!(decode_text(&Value::Null), None);
    }

    #[test]
    fn dequeue_count_string_or_number() {
        let m = |v: Value| QueueMetadata::from_metadata(v.as_object().unwrap());
        assert_eq!(m(json!({"DequeueCount": "3"})).dequeue_count, 3);
        assert_eq!(m(json!({"dequeuecount": 2})).dequeue_count, 2);
        assert_eq!(m(json!({})).dequeue_count, 1);
        assert_eq!(m(json!({"Id": "\"abc\""})).id.as_deref(), Some("abc"));
    }

    #[test]
    fn lenient_times() {
        assert!(parse_lenient_time("0001-01-01T00:00:00").is_none());
        assert_eq!(parse_lenient_time("2024-11-30T14:45:51+00:00").unwrap().hour(), 14);
        assert_eq!(parse_lenient_time("2024-11-30T14:43:50.403838").unwrap().minute(), 43);
        assert!(parse_lenient_time("garbage").is_none());
    }
}
