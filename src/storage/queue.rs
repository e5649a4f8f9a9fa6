//! The queue of backup requests and its poison queue.
//!
//! The Functions queue trigger reads base64 by default (host.json `messageEncoding`): a plain-text
//! message would go straight to `<queue>-poison` without running the function, so every message
//! is base64 of the UTF-8 JSON, built by serde.

use std::sync::Arc;

use azure_core::http::policies::Policy;
use azure_storage_queue::models::{QueueClientReceiveMessagesOptions, QueueClientUpdateMessageOptions, QueueMessage};
use azure_storage_queue::{QueueClient, QueueClientOptions};
use base64::Engine as _;
use serde::Serialize;
use time::OffsetDateTime;

use super::connection::Connection;
use super::error::StorageError;
use super::Clients;

/// The queue service caps a message at 64 KiB, base64 included.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Cheap to clone: the clients are shared.
#[derive(Clone)]
pub struct BackupQueue {
    name: String,
    queue: Arc<QueueClient>,
    poison: Arc<QueueClient>,
}

/// A received message with what is needed to acknowledge it.
#[derive(Clone, Debug)]
pub struct Received {
    pub id: String,
    pub pop_receipt: String,
    pub dequeue_count: u32,
    /// The message text after base64 decoding (or as is, when it was not base64).
    pub text: String,
}

/// What lands in the poison queue when we poison a message ourselves: the original text and why,
/// so an operator can read, fix and requeue it. Nothing is ever dropped silently.
#[derive(Debug, Serialize)]
pub struct PoisonRecord<'a> {
    pub reason: &'a str,
    pub original: &'a str,
    pub dequeue_count: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub poisoned_at: OffsetDateTime,
}

impl BackupQueue {
    pub fn new(clients: &Clients, conn: &Connection, name: &str) -> Result<Self, StorageError> {
        let endpoint = conn
            .queue_endpoint()
            .map_err(|e| StorageError::Permanent { what: conn.name.clone(), detail: e.to_string() })?;
        let (credential, per_try, sas): (_, Vec<Arc<dyn Policy>>, _) = clients.auth_for(conn)?;
        let make = |queue_name: &str| -> Result<QueueClient, StorageError> {
            let mut url = endpoint.clone();
            url.path_segments_mut().expect("base url").pop_if_empty().push(queue_name);
            if let Some(sas) = &sas {
                url.set_query(Some(sas));
            }
            QueueClient::new(
                url,
                credential.clone(),
                Some(QueueClientOptions { client_options: clients.client_options(per_try.clone()), ..Default::default() }),
            )
            .map_err(|e| StorageError::from_azure(format!("queue {queue_name}"), e))
        };
        Ok(BackupQueue {
            name: name.to_owned(),
            queue: Arc::new(make(name)?),
            poison: Arc::new(make(&format!("{name}-poison"))?),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Creates the queue and its poison queue if missing (idempotent: 201 and 204 both succeed).
    pub async fn ensure_exists(&self) -> Result<(), StorageError> {
        for (q, n) in [(&*self.queue, self.name.clone()), (&*self.poison, format!("{}-poison", self.name))] {
            q.create(None).await.map_err(|e| StorageError::from_azure(format!("create queue {n}"), e))?;
        }
        Ok(())
    }

    /// Sends one message (JSON text, base64-encoded here).
    pub async fn send_text(&self, text: &str) -> Result<(), StorageError> {
        send(&self.queue, &self.name, text).await
    }

    /// Sends to `<queue>-poison`, wrapped with the reason.
    pub async fn poison(&self, original: &str, reason: &str, dequeue_count: u32) -> Result<(), StorageError> {
        let record = PoisonRecord { reason, original, dequeue_count, poisoned_at: OffsetDateTime::now_utc() };
        let mut text = serde_json::to_string(&record).expect("poison record serialises");
        if base64_len(text.len()) > MAX_MESSAGE_BYTES {
            // Keep the reason; truncate the original on a char boundary so the record still fits.
            let mut cut = original.len().min(MAX_MESSAGE_BYTES / 2);
            while !original.is_char_boundary(cut) {
                cut -= 1;
            }
            let record = PoisonRecord { original: &original[..cut], ..record };
            text = serde_json::to_string(&record).expect("poison record serialises");
        }
        send(&self.poison, &format!("{}-poison", self.name), &text).await
    }

    /// Receives up to `max` messages, hiding them for `visibility_secs`.
    pub async fn receive(&self, max: u8, visibility_secs: i32) -> Result<Vec<Received>, StorageError> {
        receive(&self.queue, &self.name, max, visibility_secs).await
    }

    pub async fn receive_poison(&self, max: u8, visibility_secs: i32) -> Result<Vec<Received>, StorageError> {
        receive(&self.poison, &format!("{}-poison", self.name), max, visibility_secs).await
    }

    /// Deletes a processed message. A 404 means it was already deleted (or its pop receipt went
    /// stale because another consumer took it over): reported, not hidden.
    pub async fn delete(&self, msg: &Received) -> Result<(), StorageError> {
        self.queue
            .delete_message(&msg.id, &msg.pop_receipt, None)
            .await
            .map_err(|e| StorageError::from_azure(format!("delete message {} from {}", msg.id, self.name), e))?;
        Ok(())
    }

    pub async fn delete_poison(&self, msg: &Received) -> Result<(), StorageError> {
        self.poison
            .delete_message(&msg.id, &msg.pop_receipt, None)
            .await
            .map_err(|e| StorageError::from_azure(format!("delete poison message {}", msg.id), e))?;
        Ok(())
    }

    /// Extends a message's invisibility while a long copy runs; returns the new pop receipt.
    pub async fn extend(&self, msg: &Received, visibility_secs: i32) -> Result<String, StorageError> {
        let what = format!("update message {} in {}", msg.id, self.name);
        let rsp = self
            .queue
            .update_message(&msg.id, &msg.pop_receipt, visibility_secs, Some(QueueClientUpdateMessageOptions::default()))
            .await
            .map_err(|e| StorageError::from_azure(&what, e))?;
        // The SDK exposes the new receipt only as a raw header.
        rsp.headers()
            .get_optional_str(&azure_core::http::headers::HeaderName::from_static("x-ms-popreceipt"))
            .map(str::to_owned)
            .ok_or(StorageError::Permanent { what, detail: "no x-ms-popreceipt".into() })
    }

    /// Approximate number of messages (for progress bars).
    pub async fn approximate_count(&self) -> Result<u64, StorageError> {
        let rsp = self
            .queue
            .get_properties(None)
            .await
            .map_err(|e| StorageError::from_azure(format!("properties of queue {}", self.name), e))?;
        Ok(rsp
            .headers()
            .get_optional_str(&azure_core::http::headers::HeaderName::from_static("x-ms-approximate-messages-count"))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0))
    }
}

fn base64_len(n: usize) -> usize {
    n.div_ceil(3) * 4
}

async fn send(client: &QueueClient, name: &str, text: &str) -> Result<(), StorageError> {
    let encoded = base64::engine::general_purpose::STANDARD.encode(text.as_bytes());
    if encoded.len() > MAX_MESSAGE_BYTES {
        return Err(StorageError::Permanent {
            what: format!("send to {name}"),
            detail: format!("message of {} bytes exceeds the queue's 64 KiB limit", encoded.len()),
        });
    }
    let message = QueueMessage { message_text: Some(encoded) };
    let content = message.try_into().map_err(|e| StorageError::from_azure(format!("send to {name}"), e))?;
    client.send_message(content, None).await.map_err(|e| StorageError::from_azure(format!("send to {name}"), e))?;
    Ok(())
}

async fn receive(client: &QueueClient, name: &str, max: u8, visibility_secs: i32) -> Result<Vec<Received>, StorageError> {
    let what = format!("receive from {name}");
    let options = QueueClientReceiveMessagesOptions {
        number_of_messages: Some(max.clamp(1, 32) as i32),
        visibility_timeout: Some(visibility_secs),
        ..Default::default()
    };
    let rsp = client.receive_messages(Some(options)).await.map_err(|e| StorageError::from_azure(&what, e))?;
    let items = rsp.into_model().map_err(|e| StorageError::from_azure(&what, e))?.items.unwrap_or_default();
    Ok(items
        .into_iter()
        .filter_map(|m| {
            let raw = m.message_text.unwrap_or_default();
            let text = base64::engine::general_purpose::STANDARD
                .decode(raw.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .unwrap_or(raw);
            Some(Received {
                id: m.message_id?,
                pop_receipt: m.pop_receipt?,
                dequeue_count: m.dequeue_count.unwrap_or(1).max(1) as u32,
                text,
            })
        })
        .collect())
}
