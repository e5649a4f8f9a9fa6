//! The copy path (`copy::direct::server_side_copy`, shared by the worker and restore) against a
//! real Azurite: block ids, copy-source authorisation, content headers, odd names. Shared Key
//! over http here; the managed-identity (https) variants are in `tests/copy_identity.rs`.

mod copy_cases;
mod support;

use std::collections::BTreeMap;

use copy_cases::*;
use lakeguard::copy::direct::{server_side_copy, BlockOptions};
use lakeguard::model::metadata;
use lakeguard::storage::StorageError;
use support::{unique_name, Mode, Stack};

/// Item 2 of issue 15: two copies of different versions of one multi-block blob, run at the same
/// time into the same backup name (as two worker instances do for two queued requests), must
/// never commit a mix of the two. With ids shared by every copy (`lakeguard-00000000`, ...) the
/// second copy's staged blocks replace the first one's in the blob's single uncommitted block
/// list, and the first Put Block List commits whatever is there. Every round: whichever copy wins,
/// the backup is byte-identical to exactly one version and its metadata names that version.
#[tokio::test]
async fn concurrent_block_copies_of_two_versions_never_mix() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let app = support::app(&stack.env());
    let c = unique_name("mix");
    app.source.ensure_container(&c).await.expect("container");
    app.backup.ensure_container(&c).await.expect("container");
    let len = (4 << 20) + 100 * 1024; // five 1 MiB blocks, the last one short
    let v1 = put_version(&app, &c, "big.bin", version_bytes(1, len)).await;
    let v2 = put_version(&app, &c, "big.bin", version_bytes(2, len)).await;
    assert_ne!(v1.data, v2.data);
    let blocks = BlockOptions {
        threshold: 1 << 20,
        block_size: 1 << 20,
        concurrency: 5,
    };
    let (m1, m2) = (meta_for(&v1), meta_for(&v2));
    let mut winners = BTreeMap::<&str, u32>::new();
    for round in 0..8 {
        let target = format!("round-{round}/big.bin");
        let (f1, f2) = (
            snapshot_source(&app, &c, "big.bin", &v1),
            snapshot_source(&app, &c, "big.bin", &v2),
        );
        let (t1, t2) = (
            new_backup(&app, &c, &target, &m1),
            new_backup(&app, &c, &target, &m2),
        );
        let (r1, r2) = tokio::join!(
            server_side_copy(&f1, &t1, &blocks),
            server_side_copy(&f2, &t2, &blocks)
        );
        assert!(
            r1.is_ok() || r2.is_ok(),
            "round {round}: neither copy succeeded: {r1:?} / {r2:?}"
        );
        for e in [&r1, &r2].into_iter().filter_map(|r| r.as_ref().err()) {
            // The loser fails on its target condition (the worker then looks again), never
            // on anything that would poison its request.
            assert!(
                matches!(
                    e,
                    StorageError::Conflict { .. } | StorageError::PreconditionFailed { .. }
                ),
                "round {round}: {e:?}"
            );
        }
        let got = app
            .backup
            .download(&c, &target, None)
            .await
            .expect("download backup");
        let props = app
            .backup
            .properties(&c, &target, None)
            .await
            .expect("head backup");
        let named = props
            .metadata
            .get(metadata::SOURCE_SNAPSHOT)
            .cloned()
            .unwrap_or_default();
        let (which, expected) = if got == v1.data {
            ("v1", &v1)
        } else if got == v2.data {
            ("v2", &v2)
        } else {
            let mixed: Vec<&str> = got
                .chunks(1 << 20)
                .zip(v1.data.chunks(1 << 20))
                .map(|(g, a)| if g == a { "v1" } else { "v2" })
                .collect();
            panic!("round {round}: the backup mixes both versions, blocks {mixed:?}");
        };
        assert_eq!(
            named, expected.snapshot,
            "round {round}: the backup holds {which} but its metadata names another version"
        );
        *winners.entry(which).or_default() += 1;
    }
    eprintln!("winners: {winners:?}");
}

#[tokio::test]
async fn every_copy_shape_works_with_a_service_sas() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    every_copy_shape_works(&stack, &support::app(&stack.env())).await;
}

#[tokio::test]
async fn a_service_sas_reads_exactly_one_snapshot() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    copy_source_sas_reads_only_its_blob(&stack, &support::app(&stack.env())).await;
}

#[tokio::test]
async fn content_headers_survive_block_copies() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let env = stack.env_with(&[
        ("LAKEGUARD_COPY_BLOCK_THRESHOLD_BYTES", "1048576"),
        ("LAKEGUARD_COPY_BLOCK_SIZE_BYTES", "1048576"),
    ]);
    content_headers_survive_backup_and_restore(&stack, &support::app(&env)).await;
}
