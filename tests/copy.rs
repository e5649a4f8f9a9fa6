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

/// Item 9 of issue 15: `hdi_isfolder=true` marks a directory placeholder only on a zero-length
/// blob. A data blob carrying that metadata (tools copy metadata around; anyone can set it) is
/// backed up by the producer and worker, verified and restored; a real (empty) placeholder is
/// still skipped everywhere.
#[tokio::test]
async fn a_data_blob_with_the_folder_flag_is_data() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let app = support::app(&stack.env());
    let src = stack.source();
    let c = unique_name("flag");
    src.create_container(&c).await.ok("create");
    src.put_blob(&c, "data.csv", b"a,b\n1,2\n", &[("hdi_isfolder", "true")])
        .await
        .ok("put data");
    src.put_blob(&c, "dir", b"", &[("hdi_isfolder", "true")])
        .await
        .ok("put placeholder");
    let r = lakeguard::ops::snapshot::run(&app, &c, None, lakeguard::ops::no_progress())
        .await
        .expect("producer");
    assert!(r.is_complete(), "{r:?}");
    let d = lakeguard::ops::backup::drain(&app, &app.queue, lakeguard::ops::no_progress())
        .await
        .expect("drain");
    assert_eq!(d.poisoned, 0, "{d:?}");
    let bk = stack.backup();
    assert_eq!(
        bk.get_blob(&c, "data.csv", None).await.ok("backup").body,
        b"a,b\n1,2\n"
    );
    assert_eq!(
        bk.blob_properties(&c, "dir", None).await.status,
        404,
        "the placeholder is not data"
    );

    let v = lakeguard::ops::verify::run(&app, &c, true, None, lakeguard::ops::no_progress())
        .await
        .expect("verify");
    assert!(v.is_ok(), "{v:#?}");
    assert_eq!((v.source_blobs, v.covered), (1, 1), "{v:#?}");
    assert_eq!(v.deep.as_ref().map(|d| d.matched), Some(1), "{v:#?}");

    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let target = unique_name("flagged");
    let mut req = lakeguard::ops::restore::RestoreRequest::new(&c, time::OffsetDateTime::now_utc());
    req.to = Some(lakeguard::ops::restore::TargetSpec {
        store: app.backup.clone(),
        container: target.clone(),
    });
    let report = lakeguard::ops::restore::run(&app, &req, lakeguard::ops::no_progress())
        .await
        .expect("restore");
    assert!(report.is_complete(), "{report:#?}");
    assert_eq!(
        bk.get_blob(&target, "data.csv", None)
            .await
            .ok("restored")
            .body,
        b"a,b\n1,2\n"
    );
}
