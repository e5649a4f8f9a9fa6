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

/// Creates `name` verbatim (dot segments included) with a raw HTTP/1.1 request: every URL
/// library, the test oracle's included, would remove the dot segments first. Authorised by an
/// account SAS (its signature does not cover the path), signed with the emulator's key.
async fn put_raw(stack: &Stack, container: &str, name: &str, body: &[u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let now = time::OffsetDateTime::now_utc();
    let t = |t: time::OffsetDateTime| {
        let t = t.replace_nanosecond(0).unwrap();
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let (st, se) = (
        t(now - time::Duration::minutes(5)),
        t(now + time::Duration::hours(1)),
    );
    let to_sign = format!(
        "{}\nrwc\nb\nco\n{st}\n{se}\n\nhttps,http\n2021-08-06\n\n",
        support::DEV_ACCOUNT
    );
    let sig = azure_core::hmac::hmac_sha256(
        &to_sign,
        &azure_core::credentials::Secret::new(support::DEV_KEY.to_string()),
    )
    .unwrap();
    let sas: String = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs([
            ("sv", "2021-08-06"),
            ("ss", "b"),
            ("srt", "co"),
            ("sp", "rwc"),
            ("st", &st),
            ("se", &se),
            ("spr", "https,http"),
            ("sig", &sig),
        ])
        .finish();
    let port = stack.azurite.blob_port();
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let head = format!(
        "PUT /{}/{container}/{name}?{sas} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
         x-ms-blob-type: BlockBlob\r\nx-ms-version: 2021-12-02\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        support::DEV_ACCOUNT,
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(body).await.unwrap();
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).await.unwrap();
    String::from_utf8_lossy(&answer)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Item 9 of issue 15: a name with a `.` or `..` segment cannot be addressed by a URL (dot
/// segments are removed: `a/../b` would address `a/b`'s neighbour `b`, `a/./x` would address
/// `a/x`), so lakeguard refuses it with a clear per-blob error and never touches the blob the
/// URL would have named instead. Azurite stores such names literally; here `a/b` and `b` exist
/// next to `a/../b` and `a/./b`, and the producer, the worker, reconcile and an in-place restore
/// must leave them exactly as they are (before the fix, the producer snapshotted `b` for
/// `a/../b` and the in-place restore could delete it).
#[tokio::test]
async fn names_with_dot_segments_are_refused_and_never_touch_another_blob() {
    let stack = Stack::start(Mode::SharedKeyHttp).await;
    let app = support::app(&stack.env());
    let src = stack.source();
    let c = unique_name("dots");
    src.create_container(&c).await.ok("create");
    for (name, data) in [("a/b", "a/b's own"), ("b", "b's own"), ("a/x", "a/x's own")] {
        src.put_blob(&c, name, data.as_bytes(), &[]).await.ok("put");
    }
    let dotted = ["a/../b", "a/./b", "./a/x", "b/.."];
    for name in dotted {
        assert_eq!(
            put_raw(&stack, &c, name, name.as_bytes()).await,
            201,
            "{name}"
        );
    }
    let before = src.list_blobs(&c, None).await;
    for name in dotted {
        assert!(
            before.iter().any(|b| b.name == name),
            "Azurite keeps {name}"
        );
    }

    let r = lakeguard::ops::snapshot::run(&app, &c, None, lakeguard::ops::no_progress())
        .await
        .expect("producer");
    assert_eq!((r.enqueued, r.failed), (3, 4), "{r:#?}");
    for f in &r.failures {
        assert!(
            dotted.contains(&f.blob.as_str()) && f.error.contains("path segment"),
            "{f:?}"
        );
    }
    let d = lakeguard::ops::backup::drain(&app, &app.queue, lakeguard::ops::no_progress())
        .await
        .expect("drain");
    assert_eq!((d.poisoned, d.backed_up), (0, 3), "{d:?}");
    let bk = stack.backup();
    for (name, data) in [("a/b", "a/b's own"), ("b", "b's own"), ("a/x", "a/x's own")] {
        assert_eq!(
            bk.get_blob(&c, name, None).await.ok("backup").body,
            data.as_bytes()
        );
    }
    let snapshots_of = |listing: &[support::rest::ListedBlob], name: &str| {
        listing
            .iter()
            .filter(|b| b.name == name && b.snapshot.is_some())
            .count()
    };
    let after = src.list_blobs(&c, None).await;
    for name in ["a/b", "b", "a/x"] {
        assert_eq!(
            snapshots_of(&after, name),
            1,
            "{name}: one snapshot, its own"
        );
    }

    let rec = lakeguard::ops::reconcile::run(
        &app,
        &lakeguard::ops::reconcile::RunOptions {
            container: Some(c.clone()),
            ..Default::default()
        },
        lakeguard::ops::no_progress(),
    )
    .await
    .expect("reconcile");
    assert_eq!(rec.errors, 4, "{rec:#?}");

    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let mut req = lakeguard::ops::restore::RestoreRequest::new(&c, time::OffsetDateTime::now_utc());
    req.force = true;
    let report = lakeguard::ops::restore::run(&app, &req, lakeguard::ops::no_progress()).await;
    let end = src.list_blobs(&c, None).await;
    let bases = |l: &[support::rest::ListedBlob]| -> BTreeMap<String, String> {
        l.iter()
            .filter(|b| b.snapshot.is_none())
            .map(|b| (b.name.clone(), b.etag.clone()))
            .collect()
    };
    assert_eq!(
        bases(&end),
        bases(&before),
        "an in-place restore touched nothing: {report:#?}"
    );
    for name in ["a/b", "b", "a/x"] {
        assert_eq!(snapshots_of(&end, name), 1, "{name}");
    }
}
