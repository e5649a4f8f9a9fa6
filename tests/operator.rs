//! An operator's terminal: `X__credential=azurecli` takes bearer tokens from the Azure CLI's
//! login. The `az` here is a stand-in on PATH that checks the arguments azure_identity 1.0's
//! `AzureCliCredential` sends (`account get-access-token -o json --scope <scope>`), answers the
//! JSON Azure CLI ≥ 2.54 prints (`accessToken`, `expires_on` as unix seconds, `tokenType`) with a
//! token HTTPS `--oauth basic` Azurite accepts, and logs every call.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use support::handler::run_cli;
use support::identity::{mint_token, STORAGE_RESOURCE};
use support::{Mode, Stack};

/// Writes the stand-in `az` into `dir`; its calls go to `dir/calls.log`.
fn fake_az(dir: &Path) {
    let token = mint_token(
        STORAGE_RESOURCE,
        "0peca70r-0000-4000-8000-0000000000cl",
        Duration::from_secs(3600),
    );
    let expires = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let log = dir.join("calls.log");
    let script = format!(
        r#"#!/bin/sh
echo "$*" >> '{log}'
if [ "$*" != "account get-access-token -o json --scope https://storage.azure.com/.default" ]; then
    echo "ERROR: unexpected arguments: $*" >&2
    exit 2
fi
printf '{{"accessToken": "%s", "expiresOn": "2099-01-01 00:00:00.000000", "expires_on": %s, "subscription": "s", "tenant": "t", "tokenType": "Bearer"}}\n' '{token}' {expires}
"#,
        log = log.display()
    );
    let path = dir.join("az");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn calls(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("calls.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn operator_commands_authenticate_with_the_azure_cli_login() {
    let stack = Stack::start(Mode::OAuthHttps).await;
    let bin = tempfile::tempdir().unwrap();
    fake_az(bin.path());
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // No managed identity on a laptop: the identity endpoint is removed, every connection says
    // `azurecli`.
    let env = stack.env_with(&[
        ("IDENTITY_ENDPOINT", ""),
        ("IDENTITY_HEADER", ""),
        ("SourceStorage__credential", "azurecli"),
        ("BackupStorage__credential", "azurecli"),
        ("AzureWebJobsStorage__credential", "azurecli"),
        ("PATH", &path),
    ]);

    let c = support::unique_name("ops");
    let src = stack.source();
    src.create_container(&c).await.ok("create container");
    for i in 0..12 {
        src.put_blob(
            &c,
            &format!("d/f{i:02}.csv"),
            format!("row {i}").as_bytes(),
            &[],
        )
        .await
        .ok("seed");
    }
    // A snapshot run with its drain: listing, snapshots, queue, user-delegation key and
    // server-side copies, all with the CLI's token.
    let out = run_cli(
        &["snapshot", "--container", &c, "--drain", "--output", "json"],
        &env,
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{out:?}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["snapshot"]["snapshotted"], 12, "{report:#}");
    assert_eq!(report["backup"]["backed_up"], 12, "{report:#}");
    let backed: Vec<_> = stack
        .backup()
        .list_blobs(&c, None)
        .await
        .into_iter()
        .filter(|b| b.snapshot.is_none())
        .collect();
    assert_eq!(backed.len(), 12);
    // Many clients, one `az` start: the token is cached per scope for the run.
    let seen = calls(bin.path());
    assert_eq!(seen.len(), 1, "az calls: {seen:#?}");
    assert!(
        !stderr.contains(&mint_token_prefix()),
        "a token reached the log"
    );

    // Without `az` on PATH the command fails with a clear error, not a panic.
    let env = stack.env_with(&[
        ("IDENTITY_ENDPOINT", ""),
        ("IDENTITY_HEADER", ""),
        ("SourceStorage__credential", "azurecli"),
        ("BackupStorage__credential", "azurecli"),
        ("AzureWebJobsStorage__credential", "azurecli"),
        ("PATH", "/nonexistent"),
    ]);
    let out = run_cli(&["usage", "--container", &c, "--output", "json"], &env).await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(!text.contains("panicked"), "{text}");
    assert!(text.contains("az not found on PATH"), "{text}");
}

/// The JWT header every minted token starts with (base64url of `{"alg":"none","typ":"JWT"}`).
fn mint_token_prefix() -> String {
    mint_token(STORAGE_RESOURCE, "x", Duration::from_secs(60))
        .split('.')
        .next()
        .unwrap()
        .to_owned()
}
