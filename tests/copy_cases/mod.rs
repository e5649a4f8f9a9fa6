//! Copy-path cases shared by `tests/copy.rs` (Shared Key over http) and `tests/copy_identity.rs`
//! (managed identity over https, which needs a process of its own: ManagedIdentityCredential
//! reads `IDENTITY_ENDPOINT` from the process environment).

#![allow(dead_code)]

use std::collections::BTreeMap;

use lakeguard::app::App;
use lakeguard::copy::direct::{server_side_copy, BlockOptions, CopyFrom, CopyTo};
use lakeguard::model::{metadata, Etag};
use lakeguard::storage::blob::TargetCondition;
use lakeguard::storage::sas::{self, DelegationKeyCache};
use reqwest::Method;

use crate::support::rest::encode_path;
use crate::support::{unique_name, Auth, Mode, Stack, StorageRest};

/// Deterministic content that differs per version and per block.
pub fn version_bytes(version: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i: usize| ((i.wrapping_mul(2654435761) >> 11) as u8) ^ version.wrapping_mul(37))
        .collect()
}

/// One version of a blob held by a source snapshot.
pub struct Version {
    pub snapshot: String,
    pub etag: Etag,
    pub data: Vec<u8>,
}

/// Writes `data` as the current version of `name` and snapshots it (If-Match that version).
pub async fn put_version(app: &App, c: &str, name: &str, data: Vec<u8>) -> Version {
    let etag = app
        .source
        .upload(c, name, data.clone(), None, &BTreeMap::new())
        .await
        .expect("upload");
    snapshot_of(app, c, name, &etag, data).await
}

async fn snapshot_of(app: &App, c: &str, name: &str, etag: &Etag, data: Vec<u8>) -> Version {
    let snap = app
        .source
        .create_snapshot(c, name, etag, &BTreeMap::new())
        .await
        .expect("snapshot");
    let props = app
        .source
        .properties(c, name, Some(&snap.id))
        .await
        .expect("head snapshot");
    Version {
        snapshot: snap.id,
        etag: props.etag,
        data,
    }
}

/// The copy source of one version: its snapshot, read under its ETag.
pub fn snapshot_source<'a>(
    app: &'a App,
    c: &'a str,
    name: &'a str,
    v: &'a Version,
) -> CopyFrom<'a> {
    CopyFrom {
        store: &app.source,
        keys: &app.source_keys,
        container: c,
        blob: name,
        snapshot: Some(v.snapshot.as_str()),
        if_match: Some(v.etag.clone()),
        content_length: v.data.len() as u64,
        content_type: None,
    }
}

/// A backup target that must not exist yet (`If-None-Match: *`, as the worker writes a first
/// backup).
pub fn new_backup<'a>(
    app: &'a App,
    c: &'a str,
    name: &'a str,
    meta: &'a BTreeMap<String, String>,
) -> CopyTo<'a> {
    CopyTo {
        store: &app.backup,
        container: c,
        blob: name,
        condition: TargetCondition::Absent,
        metadata: meta,
    }
}

pub fn meta_for(v: &Version) -> BTreeMap<String, String> {
    BTreeMap::from([(metadata::SOURCE_SNAPSHOT.to_owned(), v.snapshot.clone())])
}

/// 1 MiB threshold and blocks: anything above 1 MiB takes the block path.
pub const SMALL_BLOCKS: BlockOptions = BlockOptions {
    threshold: 1 << 20,
    block_size: 1 << 20,
    concurrency: 4,
};

/// Every shape of copy lakeguard makes still works with the narrowed copy-source SAS: single
/// shot and block path (Shared Key only, see below), each from a snapshot and from the live
/// base blob (reconcile's repair), into the backup account (the worker); and from a backup
/// snapshot back into the source account (restore `--from backup`).
pub async fn every_copy_shape_works(stack: &Stack, app: &App) {
    let c = unique_name("shapes");
    app.source.ensure_container(&c).await.expect("container");
    app.backup.ensure_container(&c).await.expect("container");
    let mut shapes = vec![("small.txt", 1000usize)];
    if stack.mode() == Mode::SharedKeyHttp {
        // Over https, Azurite 3.37's Put Block From URL trusts only the very certificate it
        // presents (a pinned agent), not the test CA that signed it, so every block fails
        // with "self-signed certificate in certificate chain" before the SAS is looked at.
        // The block path signs its per-block SAS exactly like the single shot, which does run
        // over https here; the SAS shapes themselves are unit-tested in `storage::sas`.
        shapes.push(("big.bin", (3 << 20) + 7));
    }
    for (name, len) in shapes {
        let old = put_version(app, &c, name, version_bytes(1, len)).await;
        let live_data = version_bytes(2, len);
        let live_etag = app
            .source
            .upload(&c, name, live_data.clone(), None, &BTreeMap::new())
            .await
            .expect("upload live");
        let none = BTreeMap::new();
        let from_snapshot = format!("{name}.from-snapshot");
        server_side_copy(
            &snapshot_source(app, &c, name, &old),
            &new_backup(app, &c, &from_snapshot, &none),
            &SMALL_BLOCKS,
        )
        .await
        .unwrap_or_else(|e| panic!("{name} from its snapshot: {e:?}"));
        let from_live = format!("{name}.from-live");
        let live = CopyFrom {
            store: &app.source,
            keys: &app.source_keys,
            container: &c,
            blob: name,
            snapshot: None,
            if_match: Some(live_etag.clone()),
            content_length: len as u64,
            content_type: None,
        };
        server_side_copy(
            &live,
            &new_backup(app, &c, &from_live, &none),
            &SMALL_BLOCKS,
        )
        .await
        .unwrap_or_else(|e| panic!("{name} from the live blob: {e:?}"));
        let bk = stack.backup();
        assert!(
            get(&bk, &c, &from_snapshot, None).await == old.data,
            "{name}"
        );
        assert!(get(&bk, &c, &from_live, None).await == live_data, "{name}");
        // The live blob moves on: a copy of the version it held fails on its source condition
        // (412, which the worker answers by looking again), on both paths.
        app.source
            .upload(&c, name, version_bytes(9, len), None, &BTreeMap::new())
            .await
            .expect("overwrite live");
        let stale = server_side_copy(
            &live,
            &new_backup(app, &c, &format!("{name}.stale"), &none),
            &SMALL_BLOCKS,
        )
        .await;
        assert!(
            matches!(&stale, Err(e) if e.is_precondition_failed()),
            "{name}: {stale:?}"
        );

        // Restore's direction: a backup snapshot (the backup account's history) as the source.
        let backup_etag = app
            .backup
            .properties(&c, &from_snapshot, None)
            .await
            .expect("head backup")
            .etag;
        let backup_snap = app
            .backup
            .create_snapshot(&c, &from_snapshot, &backup_etag, &BTreeMap::new())
            .await
            .expect("backup snapshot");
        let backup_snap_etag = app
            .backup
            .properties(&c, &from_snapshot, Some(&backup_snap.id))
            .await
            .expect("head backup snapshot")
            .etag;
        let history_keys = DelegationKeyCache::default();
        let restored = format!("restored/{name}");
        server_side_copy(
            &CopyFrom {
                store: &app.backup,
                keys: &history_keys,
                container: &c,
                blob: &from_snapshot,
                snapshot: Some(&backup_snap.id),
                if_match: Some(backup_snap_etag),
                content_length: len as u64,
                content_type: None,
            },
            &CopyTo {
                store: &app.source,
                container: &c,
                blob: &restored,
                condition: TargetCondition::Absent,
                metadata: &none,
            },
            &SMALL_BLOCKS,
        )
        .await
        .unwrap_or_else(|e| panic!("{name} restored from a backup snapshot: {e:?}"));
        assert!(
            get(&stack.source(), &c, &restored, None).await == old.data,
            "{name}"
        );
    }
}

async fn get(rest: &StorageRest, c: &str, name: &str, snapshot: Option<&str>) -> Vec<u8> {
    rest.get_blob(c, name, snapshot).await.ok("get blob").body
}

/// Status of an anonymous GET of `name` (optionally a snapshot) carrying only `sas`.
async fn get_with_sas(
    rest: &StorageRest,
    c: &str,
    name: &str,
    snapshot: Option<&str>,
    sas: &str,
) -> u16 {
    let mut query: Vec<(String, String)> = url::form_urlencoded::parse(sas.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if let Some(s) = snapshot {
        query.insert(0, ("snapshot".into(), s.into()));
    }
    let pairs: Vec<(&str, &str)> = query
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    rest.with_auth(Auth::Anonymous)
        .send(
            Method::GET,
            &format!("/{c}/{}", encode_path(name)),
            &pairs,
            &[],
            vec![],
        )
        .await
        .status
}

fn sas_param(sas: &str, key: &str) -> Option<String> {
    url::form_urlencoded::parse(sas.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// A copy-source SAS lakeguard makes for one snapshot of blob A reads that snapshot and nothing
/// else: not blob B of the same container, not A's namesake in another container, and (with the
/// account key, `sr=bs`) neither A's base blob nor A's other snapshots. The managed-identity SAS
/// on the emulator is blob-scoped (`sr=b`, see `storage::sas`): A's other versions, still
/// nothing else. Its lifetime is capped whatever the caller asks for, and `spr` is `https`
/// exactly when the endpoint is https.
pub async fn copy_source_sas_reads_only_its_blob(stack: &Stack, app: &App) {
    let (c, other) = (unique_name("scope"), unique_name("other"));
    for container in [&c, &other] {
        app.source
            .ensure_container(container)
            .await
            .expect("container");
    }
    let a1 = put_version(app, &c, "a.txt", b"a, first".to_vec()).await;
    let a2 = put_version(app, &c, "a.txt", b"a, second".to_vec()).await;
    let b = put_version(app, &c, "b.txt", b"b".to_vec()).await;
    let elsewhere = put_version(app, &other, "a.txt", b"a elsewhere".to_vec()).await;
    let sas = sas::read_sas(
        &app.source,
        &app.source_keys,
        &c,
        "a.txt",
        Some(&a1.snapshot),
        time::Duration::days(30),
    )
    .await
    .expect("read sas");
    let rest = stack.source();
    assert_eq!(
        get_with_sas(&rest, &c, "a.txt", Some(&a1.snapshot), &sas).await,
        200,
        "the SAS reads the snapshot it was made for"
    );
    assert_eq!(get_with_sas(&rest, &c, "b.txt", None, &sas).await, 403);
    assert_eq!(
        get_with_sas(&rest, &c, "b.txt", Some(&b.snapshot), &sas).await,
        403
    );
    assert_eq!(
        get_with_sas(&rest, &other, "a.txt", Some(&elsewhere.snapshot), &sas).await,
        403
    );
    assert_eq!(get_with_sas(&rest, &other, "a.txt", None, &sas).await, 403);
    let same_blob = [
        get_with_sas(&rest, &c, "a.txt", None, &sas).await,
        get_with_sas(&rest, &c, "a.txt", Some(&a2.snapshot), &sas).await,
    ];
    match stack.mode() {
        Mode::SharedKeyHttp => {
            assert_eq!(sas_param(&sas, "sr").as_deref(), Some("bs"));
            assert_eq!(same_blob, [403, 403], "sr=bs reads one snapshot only");
        }
        Mode::OAuthHttps => {
            assert_eq!(sas_param(&sas, "sr").as_deref(), Some("b"));
            assert_eq!(same_blob, [200, 200], "blob-scoped on the emulator");
        }
    }
    let https = stack.mode() == Mode::OAuthHttps;
    assert_eq!(
        sas_param(&sas, "spr").as_deref(),
        Some(if https { "https" } else { "https,http" })
    );
    let t = |k: &str| {
        time::OffsetDateTime::parse(
            &sas_param(&sas, k).unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    assert!(t("se") - t("st") <= sas::MAX_LIFETIME, "asked for 30 days");
    assert_eq!(sas_param(&sas, "sp").as_deref(), Some("r"));
}

/// The standard headers set on the test's source blobs (Content-MD5 comes from the service).
pub const CONTENT_HEADERS: [(&str, &str, &str); 5] = [
    (
        "x-ms-blob-content-type",
        "content-type",
        "text/csv; charset=utf-8",
    ),
    ("x-ms-blob-content-encoding", "content-encoding", "identity"),
    ("x-ms-blob-content-language", "content-language", "de-DE"),
    (
        "x-ms-blob-content-disposition",
        "content-disposition",
        "attachment; filename=\"rows.csv\"",
    ),
    ("x-ms-blob-cache-control", "cache-control", "max-age=60"),
];

async fn put_with_headers(rest: &StorageRest, c: &str, name: &str, data: &[u8]) {
    let mut headers = vec![("x-ms-blob-type", "BlockBlob")];
    headers.extend(CONTENT_HEADERS.iter().map(|(set, _, v)| (*set, *v)));
    rest.send(
        Method::PUT,
        &format!("/{c}/{}", encode_path(name)),
        &[],
        &headers,
        data.to_vec(),
    )
    .await
    .ok("put blob with headers");
}

/// Asserts that `copy` carries every content header of `original` (and a Content-MD5).
async fn assert_same_headers(
    what: &str,
    (orig_rest, orig_c, orig_name): (&StorageRest, &str, &str),
    (copy_rest, copy_c, copy_name): (&StorageRest, &str, &str),
) {
    let orig = orig_rest
        .blob_properties(orig_c, orig_name, None)
        .await
        .ok("head original");
    let copy = copy_rest
        .blob_properties(copy_c, copy_name, None)
        .await
        .ok("head copy");
    for (_, header, value) in CONTENT_HEADERS {
        assert_eq!(
            copy.header(header).as_deref(),
            Some(value),
            "{what}: {header} of {copy_c}/{copy_name}"
        );
    }
    assert!(orig.header("content-md5").is_some(), "the service sets it");
    assert_eq!(
        copy.header("content-md5"),
        orig.header("content-md5"),
        "{what}: content-md5 of {copy_c}/{copy_name}"
    );
}

/// Item 9 of issue 15: a version copied through the block path (Put Block From URL + Put Block
/// List, which sets the blob's headers from its own request) keeps Content-Type,
/// Content-Encoding, Content-Language, Content-Disposition, Cache-Control and Content-MD5, as the
/// single-shot Copy Blob From URL does: through the worker (producer + drain, in process) into
/// the backup, and through a restore from the backup into another container. `app` must have
/// been built with a 1 MiB block threshold and block size.
pub async fn content_headers_survive_backup_and_restore(stack: &Stack, app: &App) {
    assert_eq!(app.settings.copy_block_threshold, 1 << 20);
    let c = unique_name("headers");
    let src = stack.source();
    src.create_container(&c).await.ok("create");
    let mut names = vec![("small.csv", 1000usize)];
    if stack.mode() == Mode::SharedKeyHttp {
        // No block path over https on Azurite: see `every_copy_shape_works`.
        names.push(("big.csv", (3 << 20) + 5));
    }
    for (name, len) in &names {
        put_with_headers(&src, &c, name, &version_bytes(3, *len)).await;
    }
    let r = lakeguard::ops::snapshot::run(app, &c, None, lakeguard::ops::no_progress())
        .await
        .expect("producer");
    assert!(r.is_complete(), "{r:?}");
    let d = lakeguard::ops::backup::drain(app, &app.queue, lakeguard::ops::no_progress())
        .await
        .expect("drain");
    assert_eq!(d.poisoned, 0, "{d:?}");
    let bk = stack.backup();
    for (name, len) in &names {
        assert_eq!(get(&bk, &c, name, None).await.len(), *len);
        assert_same_headers("backup", (&src, &c, name), (&bk, &c, name)).await;
    }

    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let target = unique_name("restored");
    let mut req = lakeguard::ops::restore::RestoreRequest::new(&c, time::OffsetDateTime::now_utc());
    req.to = Some(lakeguard::ops::restore::TargetSpec {
        store: app.backup.clone(),
        container: target.clone(),
    });
    let report = lakeguard::ops::restore::run(app, &req, lakeguard::ops::no_progress())
        .await
        .expect("restore");
    assert!(report.is_complete(), "{report:#?}");
    for (name, _) in &names {
        assert!(get(&bk, &target, name, None).await == get(&src, &c, name, None).await);
        assert_same_headers("restore", (&src, &c, name), (&bk, &target, name)).await;
    }
}
