//! The copy path with managed identity (HTTPS, bearer tokens, user-delegation SAS on copy
//! sources), in process. ManagedIdentityCredential reads IDENTITY_ENDPOINT / IDENTITY_HEADER
//! from the process environment, so this file holds exactly ONE test: its process has no other
//! thread that could read the environment while it is being set.

mod copy_cases;
mod support;

use copy_cases::*;
use support::{Mode, Stack};

#[tokio::test]
async fn copies_with_managed_identity() {
    let stack = Stack::start(Mode::OAuthHttps).await;
    let id = stack.identity.as_ref().expect("identity server");
    std::env::set_var("IDENTITY_ENDPOINT", id.endpoint());
    std::env::set_var("IDENTITY_HEADER", id.header_secret());
    let env = stack.env_with(&[
        ("LAKEGUARD_COPY_BLOCK_THRESHOLD_BYTES", "1048576"),
        ("LAKEGUARD_COPY_BLOCK_SIZE_BYTES", "1048576"),
    ]);
    let app = support::app(&env);
    every_copy_shape_works(&stack, &app).await;
    copy_source_sas_reads_only_its_blob(&stack, &app).await;
    content_headers_survive_backup_and_restore(&stack, &app).await;
}
