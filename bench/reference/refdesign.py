#!/usr/bin/env python3
"""The seed-000 reference design ("snapshots + Data Factory incremental backup"), re-implemented
faithfully as a small program for the benchmark, from the design's description and its three
published functions (HttpSnapshotIncBackupContainerProducer, QueueCreateBlobBackupADFv2,
HttpSnapshotIncBackupStorageReconciliation).

Kept as designed (these are the behaviours being measured, defects included):
- producer: ONE sequential `list_blobs(include=snapshots)`; a base blob is "new or changed" when the
  previous listing entry is not a snapshot of the same name with the same ETag (it relies on
  snapshots being listed right before their base blob); for each: create_snapshot() (no If-Match)
  and enqueue `{"container","blob_name","etag"}` built by string formatting, base64 text.
- worker (one queue message = one function invocation): get/create the `<container>bak` backup
  container, HEAD the source (any error = "deleted": drop), compare ETags, acquire a 30 s lease on the
  source, HEAD the source again for Last-Modified, copy the LIVE base blob to
  `{stem}_{last_modified}_{etag}{ext}` in the backup container, release the lease. Any copy error is
  swallowed ("copy failed") and the message is deleted.
- reconcile: the same listing + snapshot rule (snapshot only, no enqueue), then per base blob TWO
  get-properties on the source and one on the backup name; missing (any error) = enqueue.

Substitutions, needed to run it here:
- Data Factory's Copy activity -> a server-side Copy Blob from the source URL (with an account SAS,
  which Azurite needs for a cross-account copy), which Azurite completes at once; the ADF REST call,
  the MSI token fetch and the 15 s completion polls disappear (they would only add time).
- The Functions host -> `worker --drain`: receive 32 messages at a time and run them on 16 threads
  (the queue trigger's default batchSize is 16).
- reconcile: per-blob checks run on 16 threads (the published function is single-threaded: this is
  generous to it) and only the named container is reconciled (the published one walks every
  container of the account, which here holds the other tools' containers).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from azure.core.exceptions import ResourceExistsError
from azure.storage.blob import BlobServiceClient
from azure.storage.queue import QueueClient, TextBase64DecodePolicy, TextBase64EncodePolicy

THREADS = 16
MAX_LEASE_SECONDS = 30

log = logging.getLogger("refdesign")


def clients():
    src = BlobServiceClient.from_connection_string(os.environ["REF_SOURCE_CS"])
    bak = BlobServiceClient.from_connection_string(os.environ["REF_BACKUP_CS"])
    q = QueueClient.from_connection_string(
        os.environ["REF_QUEUE_CS"],
        os.environ["REF_QUEUE"],
        message_encode_policy=TextBase64EncodePolicy(),
        message_decode_policy=TextBase64DecodePolicy(),
    )
    return src, bak, q


def ensure_queue(q: QueueClient) -> None:
    try:
        q.create_queue()
    except ResourceExistsError:
        pass


def append_timestamp_etag(filename: str, source_modified, etag: str) -> str:
    name, ext = os.path.splitext(filename)
    return "{name}_{modified}_{etag}{ext}".format(name=name, modified=source_modified, etag=etag, ext=ext)


def queue_json(container: str, blob_name: str, etag: str) -> str:
    # Built by string formatting, as published (breaks on '"' or '\\' in a name).
    return "{" + '"container":"{}", "blob_name":"{}", "etag":"{}"'.format(container, blob_name, etag) + "}"


# --- producer ------------------------------------------------------------------------------------
def producer(container: str) -> dict:
    src, _, q = clients()
    ensure_queue(q)
    cc = src.get_container_client(container)
    prev_name, prev_etag, requested = "", "", 0
    for blob in cc.list_blobs(include=["snapshots"]):
        if blob.snapshot is None:
            if prev_name != blob.name or prev_etag != blob.etag:
                cc.get_blob_client(blob.name).create_snapshot()
                q.send_message(queue_json(container, blob.name, blob.etag))
                requested += 1
        prev_name, prev_etag = blob.name, blob.etag
    return {"requested": requested}


# --- worker --------------------------------------------------------------------------------------
def source_blob_changed(blob_source, blob_etag: str) -> bool:
    try:
        props = blob_source.get_blob_properties()
    except Exception:  # as published: any error means "does not exist anymore"
        return True
    return int(props.etag.replace('"', ""), 16) != int(blob_etag.replace('"', ""), 16)


def process(src: BlobServiceClient, bak: BlobServiceClient, sas: str, raw: str, stats: dict, lock) -> None:
    msg = json.loads(raw)
    container, blob_name, etag = msg["container"], msg["blob_name"], msg["etag"]
    container_backup = container + "bak"
    blob_source = src.get_blob_client(container, blob_name)
    bcc = bak.get_container_client(container_backup)
    try:  # create_container_backup_if_not_exists, on every message
        bcc.get_container_properties()
    except Exception:
        try:
            bak.create_container(container_backup)
        except ResourceExistsError:
            pass
    if source_blob_changed(blob_source, etag):
        with lock:
            stats["stale_dropped"] += 1
        return
    try:
        try:
            lease = blob_source.acquire_lease(lease_duration=MAX_LEASE_SECONDS)
        except Exception:
            with lock:
                stats["lease_failed"] += 1
            return
        source_modified = blob_source.get_blob_properties()["last_modified"]
        name_backup = append_timestamp_etag(blob_name, source_modified, etag)
        # "ADF copy": the live base blob, not the snapshot.
        bak.get_blob_client(container_backup, name_backup).start_copy_from_url(f"{blob_source.url}?{sas}")
        lease.release()
        with lock:
            stats["copied"] += 1
    except Exception:
        log.info("copy failed")
        with lock:
            stats["copy_failed"] += 1


def worker_drain() -> dict:
    src, bak, q = clients()
    ensure_queue(q)
    sas = os.environ["REF_SOURCE_SAS"]
    stats = {"messages": 0, "copied": 0, "stale_dropped": 0, "lease_failed": 0, "copy_failed": 0}
    lock = threading.Lock()
    with ThreadPoolExecutor(THREADS) as pool:
        while True:
            batch = list(q.receive_messages(messages_per_page=32, max_messages=32, visibility_timeout=300))
            if not batch:
                break

            def run(m):
                process(src, bak, sas, m.content, stats, lock)
                q.delete_message(m)  # the host deletes the message when the function returns

            list(pool.map(run, batch))
            stats["messages"] += len(batch)
    return stats


# --- reconcile -----------------------------------------------------------------------------------
def reconcile(container: str) -> dict:
    src, bak, q = clients()
    ensure_queue(q)
    cc = src.get_container_client(container)
    stats = {"blobs": 0, "snapshots_created": 0, "enqueued": 0}
    lock = threading.Lock()

    def check(name: str, make_snapshot: bool) -> None:
        blob_source = cc.get_blob_client(name)
        if make_snapshot:
            blob_source.create_snapshot()
        source_last_modified = blob_source.get_blob_properties()["last_modified"]
        source_etag = str(blob_source.get_blob_properties()["etag"]).replace('"', "")
        name_backup = append_timestamp_etag(name, source_last_modified, source_etag)
        try:
            bak.get_blob_client(container + "bak", name_backup).get_blob_properties()
            exists = True
        except Exception:  # as published: any error means "missing"
            exists = False
        if not exists:
            q.send_message(queue_json(container, name, source_etag))
        with lock:
            stats["blobs"] += 1
            stats["snapshots_created"] += int(make_snapshot)
            stats["enqueued"] += int(not exists)

    prev_name, prev_etag = "", ""
    with ThreadPoolExecutor(THREADS) as pool:
        futures = []
        for blob in cc.list_blobs(include=["snapshots"]):
            if blob.snapshot is None:
                snap = prev_name != blob.name or prev_etag != blob.etag
                futures.append(pool.submit(check, blob.name, snap))
            prev_name, prev_etag = blob.name, blob.etag
        for f in futures:
            f.result()
    return stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("producer")
    p.add_argument("--container", required=True)
    sub.add_parser("worker")
    r = sub.add_parser("reconcile")
    r.add_argument("--container", required=True)
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if a.cmd == "producer":
        out = producer(a.container)
    elif a.cmd == "worker":
        out = worker_drain()
    else:
        out = reconcile(a.container)
    json.dump(out, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
