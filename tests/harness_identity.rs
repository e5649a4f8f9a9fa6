//! Proves the identity stand-in speaks what the real client speaks: azure_identity 1.0's
//! ManagedIdentityCredential (App Service source) and azure_storage_blob 1.1 against the stand-in
//! and an HTTPS `--oauth basic` Azurite.
//!
//! ManagedIdentityCredential reads IDENTITY_ENDPOINT / IDENTITY_HEADER from the process
//! environment, so this file holds exactly ONE test: its process has no other thread that could
//! read the environment while it is being set.

mod support;

use std::sync::Arc;

use azure_core::credentials::TokenCredential;
use azure_core::http::{Transport, Url};
use azure_identity::{ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId};
use azure_storage_blob::{BlobContainerClient, BlobContainerClientOptions};
use support::identity::{MANAGEMENT_RESOURCE, STORAGE_RESOURCE};
use support::{Mode, Stack, BACKUP_ACCOUNT};

#[tokio::test]
async fn azure_sdk_managed_identity_against_stand_in_and_azurite() {
    let stack = Stack::start(Mode::OAuthHttps).await;
    let id = stack.identity.as_ref().expect("identity server");
    std::env::set_var("IDENTITY_ENDPOINT", id.endpoint());
    std::env::set_var("IDENTITY_HEADER", id.header_secret());

    let credential: Arc<dyn TokenCredential> =
        ManagedIdentityCredential::new(None).expect("credential");
    let mut options = BlobContainerClientOptions::default();
    options.client_options.transport = Some(Transport::new(Arc::new(stack.azurite.http_client())));
    let container = support::unique_name("sdk");
    let url = Url::parse(&format!(
        "{}/{container}",
        stack.azurite.blob_endpoint(BACKUP_ACCOUNT)
    ))
    .unwrap();
    let client = BlobContainerClient::new(url, Some(credential.clone()), Some(options))
        .expect("container client");
    client.create(None).await.expect("create container via SDK");
    assert!(client.exists().await.expect("exists"));
    // The oracle (Shared Key) sees the container the SDK created with a bearer token.
    let listed = stack.backup().list_blobs(&container, None).await;
    assert!(listed.is_empty());

    // Two storage calls, one token request: the credential caches per scope.
    assert_eq!(id.requests_for(STORAGE_RESOURCE), 1, "{:#?}", id.requests());
    let t1 = credential
        .get_token(&["https://management.azure.com/.default"], None)
        .await
        .expect("management token");
    let t2 = credential
        .get_token(&["https://management.azure.com/.default"], None)
        .await
        .expect("management token again");
    assert_eq!(t1.token.secret(), t2.token.secret());
    assert_eq!(id.requests_for(MANAGEMENT_RESOURCE), 1);

    // A user-assigned identity is selected with client_id.
    let user_assigned = ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
        user_assigned_id: Some(UserAssignedId::ClientId(
            "0000aaaa-1111-2222-3333-444455556666".into(),
        )),
        ..Default::default()
    }))
    .expect("user-assigned credential");
    user_assigned
        .get_token(&["https://storage.azure.com/.default"], None)
        .await
        .expect("user-assigned token");
    let seen = id.client_ids_seen();
    assert_eq!(seen.get(&None), Some(&2), "{seen:?}");
    assert_eq!(
        seen.get(&Some("0000aaaa-1111-2222-3333-444455556666".to_string())),
        Some(&1)
    );
    id.assert_no_violations();

    // A wrong secret is refused and the credential reports an error (no token).
    std::env::set_var("IDENTITY_HEADER", "wrong");
    let fresh = ManagedIdentityCredential::new(None).expect("credential");
    assert!(fresh
        .get_token(&["https://storage.azure.com/.default"], None)
        .await
        .is_err());
    assert_eq!(id.violations().len(), 1);
}
