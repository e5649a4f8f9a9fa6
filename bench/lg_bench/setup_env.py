"""Installs what the benchmark needs, all under bench/work (never system-wide, except Debian packages).

- Azurite: the repository's pinned copy (tools/azurite, npm `azurite` 3.37.0) is installed if absent,
  then the `azurite` package directory is COPIED into bench/work/azurite and patched there (the
  benchmark shim, see bench/README.md). Its dependencies are symlinked, not copied. The repository's
  own Azurite (used by lakeguard's tests) is never modified.
- AzCopy: npm `@azure-tools/azcopy-linux` (pinned) into bench/work/azcopy; the binary ships without
  the executable bit. It needs Debian's libsecret-1-0.
- rclone: Debian's package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

AZCOPY_VERSION = "10.32.2"
AZURITE_VERSION = "3.37.0"
SHIM_MARKER = "lakeguard-bench-shim v3"


def log(msg: str) -> None:
    print(f"[setup] {msg}", flush=True)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def work_dir() -> Path:
    d = repo_root() / "bench" / "work"
    d.mkdir(parents=True, exist_ok=True)
    return d


def ensure_debian(packages: list[str], probe: dict[str, str]) -> None:
    """apt-get install the packages whose probe file/command is missing."""
    missing = [p for p in packages if not (shutil.which(probe[p]) or Path(probe[p]).exists())]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"need Debian packages {missing}: run as root or install them first")
    log(f"apt-get install {' '.join(missing)}")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)


def ensure_repo_azurite() -> Path:
    """The repository's pinned Azurite (tools/azurite/node_modules)."""
    tools = repo_root() / "tools" / "azurite"
    nm = tools / "node_modules"
    if not (nm / "azurite" / "package.json").exists():
        script = repo_root() / "scripts" / "install-azurite"
        if script.exists():
            log("running scripts/install-azurite")
            subprocess.run([str(script)], check=True, cwd=repo_root())
        else:
            log("npm ci in tools/azurite")
            subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], check=True, cwd=tools)
    return nm


# --- the shim -------------------------------------------------------------------------------------
# 1. Put Blob From URL (BlockBlob_PutBlobFromUrl) throws NotImplemented in Azurite 3.37. AzCopy uses it
#    for every blob that fits in one chunk. The replacement reuses Azurite's own same-instance copy
#    path (the one Copy Blob From URL uses): parse the source URL, validate a cross-account source with
#    Azurite's own self-HEAD, then LokiBlobMetadataStore.copyFromURL (shares the source's extents).
#    Difference from the service: the destination gets the source's properties (content type, MD5...)
#    even when x-ms-blob-content-* headers are sent (AzCopy sends the source's values anyway).
PUT_BLOB_FROM_URL_OLD = """    async putBlobFromUrl(contentLength, copySource, options, context) {
        throw new NotImplementedError_1.default(context.contextId);"""
PUT_BLOB_FROM_URL_NEW = """    async putBlobFromUrl(contentLength, copySource, options, context) {
        // lakeguard-bench-shim v3: same-instance Put Blob From URL (see bench/README.md)
        const blobCtx = new BlobStorageContext_1.default(context);
        let url;
        try { url = new (require("url").URL)(copySource); }
        catch { throw StorageErrorFactory_1.default.getInvalidHeaderValue(context.contextId, { HeaderName: "x-ms-copy-source", HeaderValue: "(invalid)" }); }
        const [sa, sc, sb] = require("../middlewares/blobStorageContext.middleware").extractStoragePartsFromPath(url.hostname, url.pathname, blobCtx.disableProductStyleUrl);
        if (sa === undefined || sc === undefined || sb === undefined) {
            throw StorageErrorFactory_1.default.getBlobNotFound(context.contextId);
        }
        if (sa !== blobCtx.account) {
            const BH = require("./BlobHandler").default;
            const self = Object.assign(Object.create(BH.prototype), { logger: this.logger });
            await BH.prototype.validateCopySource.call(self, copySource, sa, context);
        }
        const metadata = (0, utils_1.convertRawHeadersToMetadata)(blobCtx.request.getRawHeaders(), context.contextId);
        const res = await this.metadataStore.copyFromURL(context, { account: sa, container: sc, blob: sb, snapshot: url.searchParams.get("snapshot") || "" }, { account: blobCtx.account, container: blobCtx.container, blob: blobCtx.blob }, copySource, metadata, options.tier, options);
        return { statusCode: 201, eTag: res.etag, lastModified: res.lastModified, contentMD5: res.contentMD5,
            requestId: context.contextId, version: constants_1.BLOB_API_VERSION, date: context.startTime,
            isServerEncrypted: true, clientRequestId: options.requestId };"""

# 2. Account SAS has no permission entry for BlockBlob_PutBlobFromUrl (a bare 500 under account SAS):
#    give it the entry Copy Blob From URL has (write/create on an object).
SAS_ANCHOR = "OPERATION_ACCOUNT_SAS_PERMISSIONS.set(operation_1.default.Blob_CopyFromURL,"
SAS_ADDED = (
    "// lakeguard-bench-shim v3\n"
    "OPERATION_ACCOUNT_SAS_PERMISSIONS.set(operation_1.default.BlockBlob_PutBlobFromUrl, "
    "new OperationAccountSASPermission(AccountSASServices_1.AccountSASService.Blob, "
    "AccountSASResourceTypes_1.AccountSASResourceType.Object, "
    "AccountSASPermissions_1.AccountSASPermission.Write + AccountSASPermissions_1.AccountSASPermission.Create));\n"
)

# 4. Delete Blob (LokiBlobMetadataStore.deleteBlob) removes the blob's documents with Loki's
#    findAndRemove. On a collection with binary indices Loki's batch remove marks every index dirty,
#    so the next query re-sorts all four indices of the blobs collection: ~0.75 s per delete at the
#    ~130k blob and snapshot documents of a default run (measured with Loki alone: find + remove of
#    each document takes 1-2 ms). Scenario 4's set-up deletes 600 blobs, and the last delete's
#    re-sort would land in the next measured request. The replacement removes the same documents one
#    at a time (Loki then updates its indices in place). No tool deletes a blob in a measured run.
DELETE_BLOB_OLD = """    async deleteBlob(context, account, container, blob, options) {
        const coll = this.db.getCollection(this.BLOBS_COLLECTION);"""
DELETE_BLOB_NEW = """    async deleteBlob(context, account, container, blob, options) {
        // lakeguard-bench-shim v3: remove documents one at a time (see bench/README.md)
        const blobs = this.db.getCollection(this.BLOBS_COLLECTION);
        const coll = {
            count: (q) => blobs.count(q),
            findAndRemove: (q) => { for (const d of blobs.find(q)) blobs.remove(d); }
        };"""

# 5. The same LokiJS batch remove in the extent store that blob and queue share
#    (LokiExtentMetadataStore.deleteExtent: findAndRemove on a collection indexed by id). Azurite's
#    garbage collector (queue: every 60 s; blob: every 10 min) deletes unreferenced extents one call
#    at a time, and each call re-sorts the id index that the previous one marked dirty: O(k n log n)
#    for k garbage extents out of n, in one synchronous loop that answers no request meanwhile.
#    Measured: a 20k initial backup through the queue had the queue service answer nothing for
#    7.5 minutes while busy (489 CPU s in a 545 s run). Replaced by findOne + remove (same effect).
DELETE_EXTENT_OLD = """    async deleteExtent(extentId) {
        const coll = this.db.getCollection(this.EXTENTS_COLLECTION);
        return coll.findAndRemove({ id: extentId });"""
DELETE_EXTENT_NEW = """    async deleteExtent(extentId) {
        // lakeguard-bench-shim v3: remove one document, indices updated in place (see bench/README.md)
        const coll = this.db.getCollection(this.EXTENTS_COLLECTION);
        const doc = coll.findOne({ id: extentId });
        if (doc) { coll.remove(doc); }"""

# 3. Access log format (logging only): morgan "common" plus the operation Azurite dispatched the
#    request to and the User-Agent (Azurite's self-requests for cross-account copies come from axios),
#    with the SAS signature redacted. This is how requests are counted by operation type.
MORGAN_OLD = 'app.use(morgan("common", { stream: this.accessLogWriteStream }));'


def morgan_new(ctx_path: str, op_module: str) -> str:
    return (
        "/* lakeguard-bench-shim v3 */ "
        "morgan.token(\"lgop\", (req, res) => { const h = res.locals && res.locals." + ctx_path + "; "
        "return h && h.operation !== undefined ? require(\"" + op_module + "\").Operation[h.operation] : \"-\"; }); "
        "morgan.token(\"lgurl\", (req) => String(req.originalUrl || req.url).replace(/sig=[^&]*/g, \"sig=REDACTED\")); "
        "app.use(morgan(':remote-addr - - [:date[clf]] \":method :lgurl HTTP/:http-version\" :status "
        ":res[content-length] op=:lgop ua=\":user-agent\"', { stream: this.accessLogWriteStream }));"
    )


def _patch(path: Path, old: str, new: str, mode: str = "replace") -> None:
    text = path.read_text()
    if SHIM_MARKER in text:
        return
    if old not in text:
        raise SystemExit(f"shim: anchor not found in {path} (Azurite version changed?)")
    if mode == "replace":
        text = text.replace(old, new, 1)
    else:  # insert before
        text = text.replace(old, new + old, 1)
    path.write_text(text)


def ensure_bench_azurite() -> Path:
    """bench/work/azurite/node_modules: a patched copy of `azurite`, other packages symlinked."""
    src_nm = ensure_repo_azurite()
    dst_nm = work_dir() / "azurite" / "node_modules"
    dst_pkg = dst_nm / "azurite"
    stamp = dst_nm / ".shim-ok"
    if stamp.exists() and stamp.read_text() == SHIM_MARKER:
        return dst_pkg
    if dst_nm.exists():
        shutil.rmtree(dst_nm)
    dst_nm.mkdir(parents=True)
    for entry in src_nm.iterdir():
        if entry.name == "azurite":
            continue
        (dst_nm / entry.name).symlink_to(entry.resolve())
    shutil.copytree(src_nm / "azurite", dst_pkg, symlinks=True)
    version = __import__("json").loads((dst_pkg / "package.json").read_text())["version"]
    if version != AZURITE_VERSION:
        log(f"warning: Azurite {version}, shim written for {AZURITE_VERSION}")
    blob = dst_pkg / "dist" / "src" / "blob"
    _patch(blob / "handlers" / "BlockBlobHandler.js", PUT_BLOB_FROM_URL_OLD, PUT_BLOB_FROM_URL_NEW)
    _patch(blob / "authentication" / "OperationAccountSASPermission.js", SAS_ANCHOR, SAS_ADDED, "insert")
    _patch(blob / "persistence" / "LokiBlobMetadataStore.js", DELETE_BLOB_OLD, DELETE_BLOB_NEW)
    _patch(dst_pkg / "dist" / "src" / "common" / "persistence" / "LokiExtentMetadataStore.js",
           DELETE_EXTENT_OLD, DELETE_EXTENT_NEW)
    _patch(
        blob / "BlobRequestListenerFactory.js",
        MORGAN_OLD,
        morgan_new("azurite_blob_context", "./generated/artifacts/operation"),
    )
    _patch(
        dst_pkg / "dist" / "src" / "queue" / "QueueRequestListenerFactory.js",
        MORGAN_OLD,
        morgan_new("azurite_queue_context", "./generated/artifacts/operation"),
    )
    stamp.write_text(SHIM_MARKER)
    log(f"patched Azurite copy in {dst_pkg}")
    return dst_pkg


def ensure_azcopy() -> Path:
    d = work_dir() / "azcopy"
    binary = d / "node_modules" / "@azure-tools" / "azcopy-linux" / "dist" / "bin" / "azcopy_linux_amd64"
    if not binary.exists():
        d.mkdir(parents=True, exist_ok=True)
        (d / "package.json").write_text('{"private": true}\n')
        log(f"npm install @azure-tools/azcopy-linux@{AZCOPY_VERSION}")
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", f"@azure-tools/azcopy-linux@{AZCOPY_VERSION}"],
            check=True,
            cwd=d,
        )
    binary.chmod(0o755)
    return binary


def ensure_all(need_peers: bool = True) -> dict[str, Path | None]:
    probes = {"rclone": "rclone", "libsecret-1-0": "/usr/lib/x86_64-linux-gnu/libsecret-1.so.0", "time": "/usr/bin/time"}
    ensure_debian(["time"], probes)  # lakeguard's own measurement needs it: fatal
    out: dict[str, Path | str | None] = {"azurite": ensure_bench_azurite()}
    out["azcopy"] = out["rclone"] = None
    if need_peers:
        # A peer that cannot be installed here (no root, no network) is reported as not runnable
        # with the reason, and the rest of the benchmark runs.
        try:
            ensure_debian(["rclone", "libsecret-1-0"], probes)
            found = shutil.which("rclone")
            out["rclone"] = Path(found) if found else "rclone installed but not on PATH"
        except (SystemExit, subprocess.CalledProcessError) as e:
            out["rclone"] = f"could not install rclone: {e}"
            log(out["rclone"])
        try:
            out["azcopy"] = ensure_azcopy()
        except (subprocess.CalledProcessError, OSError) as e:
            out["azcopy"] = f"could not install AzCopy: {e}"
            log(out["azcopy"])
    return out
