"""Reproducible data lake: names and contents are pure functions of (seed, index, version).

Every tool gets its own source container filled with the same names and bytes, so scenarios run on
identical data while one tool's snapshots never show up in another tool's listings.
"""

from __future__ import annotations

import base64
import hashlib
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from azure.storage.blob import BlobServiceClient, ContainerClient

KIB = 1024
MIB = 1024 * KIB

# Odd but legal names: spaces, %, #, unicode, deep nesting. No '"' or '\\' (the reference design
# builds its queue JSON by string formatting and would break on them; that defect is documented, not
# benchmarked), no trailing '.' or '/'.
TOPS = ["raw", "curated", "zone é", "100% ready", "#tags"]
STEMS = ["part-{i:05d}.csv", "file #{i}.json", "50% off {i}.txt", "naïve résumé {i}.parquet", "space name {i}.dat", "日本語-{i}.bin"]


@dataclass(frozen=True)
class Blob:
    name: str
    size: int
    large: bool


class Lake:
    def __init__(self, seed: int, small: int, large: int):
        self.seed = seed
        rng = random.Random(seed)
        folders = max(1, small // 20)
        self.blobs: list[Blob] = []
        for i in range(small):
            f = rng.randrange(folders)
            top = TOPS[f % len(TOPS)]
            name = f"{top}/d{f // len(TOPS):03d}/sub {f % 7}/" + rng.choice(STEMS).format(i=i)
            self.blobs.append(Blob(name, rng.randint(1 * KIB, 4 * KIB), False))
        for i in range(large):
            self.blobs.append(Blob(f"large/blob-{i:03d}.bin", 8 * MIB, True))
        self.by_name = {b.name: b for b in self.blobs}
        assert len(self.by_name) == len(self.blobs), "generated names must be unique"

    def content(self, blob: Blob, version: int) -> bytes:
        r = random.Random(f"{self.seed}/{blob.name}/{version}")
        return r.randbytes(blob.size)

    def md5(self, blob: Blob, version: int) -> bytes:
        return hashlib.md5(self.content(blob, version)).digest()

    def pick(self, fraction: float, salt: str) -> list[Blob]:
        """A seeded selection of `fraction` of the blobs (at least one)."""
        n = max(1, round(len(self.blobs) * fraction))
        r = random.Random(f"{self.seed}/pick/{salt}")
        return sorted(r.sample(self.blobs, n), key=lambda b: b.name)

    def restore_prefix(self) -> str:
        return TOPS[1] + "/"


def upload(cc: ContainerClient, lake: Lake, blobs: list[Blob], version: int, threads: int = 16) -> None:
    def put(b: Blob) -> None:
        cc.upload_blob(b.name, lake.content(b, version), overwrite=True, max_concurrency=1)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, blobs))


@dataclass
class Info:
    size: int
    md5: bytes | None
    etag: str
    last_modified: object  # datetime


def listing(cc: ContainerClient) -> dict[str, Info]:
    """name -> Info of base blobs (flat listing)."""
    out = {}
    for p in cc.list_blobs():
        md5 = p.content_settings.content_md5
        out[p.name] = Info(p.size, bytes(md5) if md5 else None, p.etag, p.last_modified)
    return out


def blob_md5(cc: ContainerClient, name: str) -> bytes:
    return hashlib.md5(cc.download_blob(name).readall()).digest()


def verify(
    src: ContainerClient,
    dst: ContainerClient,
    backup_name,
    expected: dict[str, bytes] | None = None,
    prefix: str = "",
) -> dict:
    """Every source base blob (under prefix) must have a backup, found through backup_name(name,
    Info) -> list of candidate names, with equal size and MD5. When `expected` (name -> MD5) is given
    it is the truth instead of the live source (restore checks)."""
    truth: dict[str, tuple[int | None, bytes, Info | None]] = {}
    if expected is None:
        for n, info in listing(src).items():
            if n.startswith(prefix):
                truth[n] = (info.size, info.md5 if info.md5 is not None else blob_md5(src, n), info)
    else:
        truth = {n: (None, m, None) for n, m in expected.items()}
    dst_list = listing(dst)
    missing, wrong, checked = [], [], 0
    for n, (size, md5, info) in truth.items():
        cands = [c for c in backup_name(n, info) if c in dst_list]
        if not cands:
            missing.append(n)
            continue
        c = cands[0]
        dsize, dmd5 = dst_list[c].size, dst_list[c].md5
        if dmd5 is None:
            dmd5 = blob_md5(dst, c)
        checked += 1
        if (size is not None and dsize != size) or dmd5 != md5:
            wrong.append(n)
    return {
        "ok": not missing and not wrong,
        "source_blobs": len(truth),
        "verified_equal": checked - len(wrong),
        "missing": len(missing),
        "wrong_content": len(wrong),
        "examples": (missing[:3] + wrong[:3]),
    }


def b64md5(d: bytes) -> str:
    return base64.b64encode(d).decode()


def service(conn_str: str) -> BlobServiceClient:
    # Set-up and checks, never measured: at the default size Azurite can stall for minutes (a
    # 20k run died in scenario 4's set-up when deletes hit the SDK's 60 s read timeout).
    return BlobServiceClient.from_connection_string(conn_str, read_timeout=900)
