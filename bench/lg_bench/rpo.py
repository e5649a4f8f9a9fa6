"""RPO benchmark (issue 20, item 2): a writer changes blobs at a steady rate while `lakeguard serve`
runs in its deployed shape, driven by a small emulation of the Functions host (queue triggers
pumped, the timer fired, the HTTP producer called); a watcher lists the backup container and notes,
per change, when the backup first holds that version.

Scenarios, each on a fresh source container, fresh queues and a fresh `lakeguard serve`:

- ``event``: every write is followed by an Event Grid BlobCreated event (Event Grid schema, one
  event per message, base64, as Event Grid's Storage Queue handler delivers it) on the event queue;
  the host emulator pumps it to ``EventBackup``. Event Grid itself cannot run here: its own
  delivery latency (typically seconds) is NOT included.
- ``producer``: ``SnapshotProducer`` called over forwarded HTTP (``POST /api/snapshot``) every
  ``--rpo-producer-every`` seconds, as a Data Factory pipeline's last activity would; ``BackupWorker``
  pumped from the backup queue.
- ``reconcile``: the ``Reconcile`` timer fired every ``--rpo-reconcile-every`` seconds;
  ``BackupWorker`` pumped.

Every scenario also pumps ``BackupWorker`` and ``ReconcileWorker`` (continuations), as the deployed
app runs all its queue functions. One host instance (no scale-out). The queue trigger follows
host.json (batchSize, newBatchThreshold, maxPollingInterval, visibilityTimeout, maxDequeueCount)
and the wire protocol of shared/notes/custom-handler-protocol.md.
"""

from __future__ import annotations

import base64
import http.client
import itertools
import json
import math
import os
import random
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.storage.blob import BlobServiceClient
from azure.storage.queue import QueueClient

from .azurite import BACKUP_ACCOUNT, BACKUP_KEY, SOURCE_ACCOUNT, SOURCE_KEY, Azurite, free_port
from .tools import Lakeguard, account_sas

ROOT = Path(__file__).resolve().parents[2]
HOST_VERSION = "4.1036.1.23224"
SCENARIOS = {
    "event": "event path (EventBackup from the event queue)",
    "producer": "producer path (SnapshotProducer over HTTP + BackupWorker)",
    "reconcile": "reconcile alone (Reconcile timer + BackupWorker)",
}
GOAL_P99_S = 60.0  # the goal, event path at 50 changes/s


def log(msg: str) -> None:
    print(f"[rpo {datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


# --- the host's wire format ---------------------------------------------------------------------
def host_time(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S+00:00")


def utc_now7() -> str:
    t = datetime.now(timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond * 10:07d}Z"


def dbl(s: str) -> str:
    """The host's double encoding of a string value: a JSON string holding its JSON form."""
    return json.dumps(s)


def sys_block(method: str) -> dict:
    return {"MethodName": method, "UtcNow": utc_now7(), "RandGuid": f"{uuid.uuid4().hex[:8]}-0000-0000-0000-000000000000"}


def queue_payload(binding: str, function: str, text: str, msg) -> dict:
    meta = {
        "DequeueCount": str(msg.dequeue_count),
        "ExpirationTime": host_time(msg.expires_on),
        "Id": dbl(msg.id),
        "InsertionTime": host_time(msg.inserted_on),
        "NextVisibleTime": host_time(msg.next_visible_on),
        "PopReceipt": dbl(msg.pop_receipt),
    }
    try:  # a JSON-object message's top-level properties join Metadata (case-insensitive, they win)
        props = json.loads(text)
    except ValueError:
        props = None
    if isinstance(props, dict):
        for k, v in props.items():
            for e in [e for e in meta if e.lower() == k.lower()]:
                del meta[e]
            meta[k] = v if isinstance(v, (dict, list)) else json.dumps(v)
    meta["sys"] = sys_block(function)
    return {"Data": {binding: dbl(text)}, "Metadata": meta}


def timer_payload(binding: str, function: str, last: datetime | None, nxt: datetime) -> dict:
    now = datetime.now(timezone.utc)
    status = {"Last": host_time(last) if last else "0001-01-01T00:00:00", "Next": host_time(nxt),
              "LastUpdated": now.isoformat()}
    return {"Data": {binding: {"Schedule": {"AdjustForDST": True}, "ScheduleStatus": status, "IsPastDue": False}},
            "Metadata": {"sys": sys_block(function)}}


def host_headers() -> dict:
    return {
        "X-Azure-Functions-InvocationId": str(uuid.uuid4()),
        "X-Azure-Functions-HostVersion": HOST_VERSION,
        "traceparent": f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-00",
        "User-Agent": f"Azure-Functions-Host/{HOST_VERSION}",
    }


class Handler:
    """HTTP to the custom handler on 127.0.0.1:port, one keep-alive connection per thread."""

    def __init__(self, port: int):
        self.port = port
        self._local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        return c

    def request(self, method: str, path: str, body: bytes | None, headers: dict, chunked: bool) -> tuple[int, bytes]:
        for attempt in (0, 1):
            c = self._conn()
            try:
                if chunked:  # the host sends a chunked body, no Content-Length
                    c.request(method, path, body=iter([body or b""]), headers=headers, encode_chunked=True)
                else:
                    c.request(method, path, body=body, headers=headers)
                r = c.getresponse()
                return r.status, r.read()
            except (http.client.HTTPException, OSError) as e:
                c.close()
                self._local.c = None
                if attempt:
                    return 599, f"the worker did not answer: {e}".encode()
        return 599, b""

    def invoke(self, function: str, payload: dict) -> tuple[int, bytes]:
        h = dict(host_headers(), **{"Content-Type": "application/json; charset=utf-8"})
        return self.request("POST", f"/{function}", json.dumps(payload).encode(), h, chunked=True)


def host_succeeded(status: int, body: bytes) -> bool:
    """2xx and a JSON object answer (Outputs an object, Logs an array), as the host requires."""
    if not 200 <= status < 300:
        return False
    try:
        v = json.loads(body)
    except ValueError:
        return False
    return isinstance(v, dict) and isinstance(v.get("Outputs") or {}, dict) and isinstance(v.get("Logs") or [], list)


def binding_of(function: str, kind: str) -> str:
    fj = json.loads((ROOT / "functions" / function / "function.json").read_text())
    return next(b["name"] for b in fj["bindings"] if b["type"] == kind)


def host_queue_settings() -> dict:
    q = json.loads((ROOT / "host.json").read_text()).get("extensions", {}).get("queues", {})

    def secs(v, default):
        if v is None:
            return default
        h, m, s = (float(x) for x in v.split(":"))
        return h * 3600 + m * 60 + s

    batch = int(q.get("batchSize", 16))
    return {
        "batch": batch,
        "threshold": int(q.get("newBatchThreshold", batch // 2)),
        "max_poll_s": secs(q.get("maxPollingInterval"), 60.0),
        "visibility_s": secs(q.get("visibilityTimeout"), 0.0),
        "max_dequeue": int(q.get("maxDequeueCount", 5)),
    }


class QueueTrigger(threading.Thread):
    """The host's queue listener for one function: receive a batch, run its invocations at once,
    fetch the next batch when in-flight drops to newBatchThreshold; empty queue = randomized
    exponential back-off from 100 ms to maxPollingInterval; success deletes the message, failure
    makes it visible again after visibilityTimeout, the last allowed delivery moves it to
    <queue>-poison."""

    def __init__(self, cs: str, queue: str, function: str, handler: Handler, cfg: dict, stop: threading.Event):
        super().__init__(daemon=True, name=f"trigger-{function}")
        self.q = QueueClient.from_connection_string(cs, queue)
        self.poison = QueueClient.from_connection_string(cs, f"{queue}-poison")
        self.function, self.handler, self.cfg, self.stop_ev = function, handler, cfg, stop
        self.binding = binding_of(function, "queueTrigger")
        self.pool = ThreadPoolExecutor(cfg["batch"] + cfg["threshold"], thread_name_prefix=function)
        self.cond = threading.Condition()
        self.inflight = 0
        self.stats = {"invocations": 0, "succeeded": 0, "failed": 0, "poisoned": 0, "failures": []}
        self.lock = threading.Lock()

    def _done(self, kind: str, note: str | None = None) -> None:
        with self.lock:
            self.stats["invocations"] += kind != "undecodable"
            self.stats[kind if kind != "undecodable" else "poisoned"] += 1
            if note and len(self.stats["failures"]) < 10:
                self.stats["failures"].append(note)
        with self.cond:
            self.inflight -= 1
            self.cond.notify_all()

    def _handle(self, msg) -> None:
        try:
            try:
                text = base64.b64decode(msg.content, validate=True).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                self.poison.send_message(msg.content)
                self.q.delete_message(msg)
                return self._done("undecodable", "not base64")
            status, body = self.handler.invoke(self.function, queue_payload(self.binding, self.function, text, msg))
            if host_succeeded(status, body):
                self.q.delete_message(msg)
                return self._done("succeeded")
            note = f"{status}: {body[:300].decode('utf-8', 'replace')}"
            if msg.dequeue_count >= self.cfg["max_dequeue"]:
                self.poison.send_message(msg.content)
                self.q.delete_message(msg)
                return self._done("poisoned", note)
            self.q.update_message(msg, pop_receipt=msg.pop_receipt, visibility_timeout=int(self.cfg["visibility_s"]))
            return self._done("failed", note)
        except Exception as e:  # a queue error: the message reappears after its invisibility
            self._done("failed", f"trigger error: {e.__class__.__name__}: {str(e)[:200]}")

    def run(self) -> None:
        wait = 0.1
        while not self.stop_ev.is_set():
            with self.cond:
                while self.inflight > self.cfg["threshold"] and not self.stop_ev.is_set():
                    self.cond.wait(0.2)
            try:
                page = next(self.q.receive_messages(messages_per_page=self.cfg["batch"], visibility_timeout=600).by_page(), None)
                msgs = list(page) if page is not None else []
            except ResourceNotFoundError:
                msgs = []
            except Exception as e:
                log(f"{self.function}: receive failed: {e.__class__.__name__}")
                msgs = []
            if not msgs:
                self.stop_ev.wait(wait * random.uniform(0.8, 1.2))
                wait = min(wait * 2, self.cfg["max_poll_s"])
                continue
            wait = 0.1
            with self.cond:
                self.inflight += len(msgs)
            for m in msgs:
                self.pool.submit(self._handle, m)

    def finish(self) -> None:
        self.pool.shutdown(wait=True)


class Periodic(threading.Thread):
    """Calls `fire()` every `every` seconds from the start, never two at once (a timer function is a
    singleton; a pipeline's activity runs once per run); an occurrence that falls inside a running
    call is skipped, as the host's timer does."""

    def __init__(self, name: str, every: float, fire, stop: threading.Event):
        super().__init__(daemon=True, name=name)
        self.every, self.fire, self.stop_ev = every, fire, stop
        self.calls: list[dict] = []

    def run(self) -> None:
        t0 = time.monotonic()
        last = None
        k = 1
        while not self.stop_ev.wait(max(0.0, t0 + k * self.every - time.monotonic())):
            started = time.monotonic()
            now = datetime.now(timezone.utc)
            status, body = self.fire(last, now + timedelta(seconds=self.every))
            took = time.monotonic() - started
            self.calls.append({"at_s": round(started - t0, 2), "status": status, "took_s": round(took, 2),
                               **({"body": body[:300].decode("utf-8", "replace")} if status >= 300 else {})})
            last = now
            k = max(k + 1, math.floor((time.monotonic() - t0) / self.every) + 1)


# --- the watcher ----------------------------------------------------------------------------------
class Watcher(threading.Thread):
    """One flat listing of the backup container (include=metadata,snapshots, so a version copied and
    replaced between two polls is still seen, as a backup snapshot) per poll, every `period`
    seconds at most; notes when each (name, lakeguard_source_etag) first appears. A version's time
    is when the listing page naming it arrived."""

    def __init__(self, az: Azurite, container: str, period: float, stop: threading.Event):
        super().__init__(daemon=True, name="watcher")
        self.base = f"{az.blob_url(BACKUP_ACCOUNT)}/{urllib.parse.quote(container)}"
        self.sas = account_sas(BACKUP_ACCOUNT, BACKUP_KEY)
        self.period, self.stop_ev = period, stop
        self.seen: dict[tuple[str, str], float] = {}
        self.polls, self.poll_s, self.errors = 0, [], 0
        self.lock = threading.Lock()

    def poll_once(self) -> None:
        marker = ""
        t_start = time.monotonic()
        while True:
            url = f"{self.base}?restype=container&comp=list&include=metadata,snapshots&maxresults=5000&{self.sas}"
            if marker:
                url += "&marker=" + urllib.parse.quote(marker, safe="")
            try:
                with urllib.request.urlopen(url, timeout=60) as r:
                    body = r.read()
            except urllib.error.HTTPError as e:
                if e.code != 404:  # the backup container does not exist before the first copy
                    self.errors += 1
                break
            except OSError:
                self.errors += 1
                break
            t_page = time.monotonic()
            root = ET.fromstring(body)
            with self.lock:
                for b in root.iter("Blob"):
                    name = b.findtext("Name")
                    etag = b.findtext("Metadata/lakeguard_source_etag")
                    if name is None or not etag:
                        continue
                    key = (name, etag.strip('"'))
                    if key not in self.seen:
                        self.seen[key] = t_page
            marker = root.findtext("NextMarker") or ""
            if not marker:
                break
        self.polls += 1
        self.poll_s.append(time.monotonic() - t_start)

    def run(self) -> None:
        while not self.stop_ev.is_set():
            t0 = time.monotonic()
            self.poll_once()
            self.stop_ev.wait(max(0.0, self.period - (time.monotonic() - t0)))


# --- the writer -----------------------------------------------------------------------------------
class Writer:
    """`rate` changes per second for `seconds`, each a Put Blob of ~1 KiB: a new name or an
    overwrite of an earlier one (never of a name with a write in flight). Change i is due at
    t0 + i/rate; `threads` workers take them in order. The write time of a version is when Put
    Blob answered with its ETag (the event, if any, is enqueued after it)."""

    def __init__(self, scc, container: str, rate: float, seconds: float, seed: int, on_write=None, threads: int = 8):
        self.cc = scc.get_container_client(container)
        self.rate, self.n = rate, max(1, int(round(rate * seconds)))
        self.rng = random.Random(seed)
        self.on_write, self.threads = on_write, threads
        self.lock = threading.Lock()
        self.names: list[str] = []
        self.inflight: set[str] = set()
        self.versions: list[dict] = []
        self.errors = 0
        self.late_s: list[float] = []
        self._next = itertools.count()

    def _pick(self, i: int) -> tuple[str, bytes]:
        with self.lock:
            free = [n for n in self.names[-2000:] if n not in self.inflight] if self.names else []
            if free and self.rng.random() < 0.5:
                name = self.rng.choice(free)
            else:
                name = f"rpo/d{i % 16:02d}/blob-{i:06d}.dat"
                self.names.append(name)
            self.inflight.add(name)
            size = self.rng.randint(900, 1100)
        data = (f"{name} v{i} ".encode() * (size // 20 + 1))[:size]
        return name, data

    def _work(self, t0: float) -> None:
        while True:
            i = next(self._next)
            if i >= self.n:
                return
            due = t0 + i / self.rate
            d = due - time.monotonic()
            if d > 0:
                time.sleep(d)
            else:
                self.late_s.append(-d)
            name, data = self._pick(i)
            try:
                started = time.monotonic()
                r = self.cc.get_blob_client(name).upload_blob(data, overwrite=True)
                done = time.monotonic()
                v = {"i": i, "name": name, "etag": r["etag"].strip('"'), "t_start": started, "t_done": done,
                     "size": len(data)}
                with self.lock:
                    self.versions.append(v)
                if self.on_write:
                    self.on_write(v)
            except Exception as e:
                self.errors += 1
                log(f"writer: {name}: {e.__class__.__name__}: {str(e)[:200]}")
            finally:
                with self.lock:
                    self.inflight.discard(name)

    def run(self) -> float:
        t0 = time.monotonic()
        ts = [threading.Thread(target=self._work, args=(t0,), daemon=True) for _ in range(self.threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return time.monotonic() - t0


def event_message(az: Azurite, container: str, v: dict, seq: int) -> str:
    """An Event Grid BlobCreated event (tests/fixtures/events/eventgrid-blob-created.json's shape)
    for the real account, container, blob and ETag; base64 as the Storage Queue handler delivers."""
    ev = {
        "topic": f"/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/bench/providers/"
                 f"Microsoft.Storage/storageAccounts/{SOURCE_ACCOUNT}",
        "subject": f"/blobServices/default/containers/{container}/blobs/{v['name']}",
        "eventType": "Microsoft.Storage.BlobCreated",
        "eventTime": utc_now7(),
        "id": str(uuid.uuid4()),
        "data": {
            "api": "PutBlob",
            "clientRequestId": str(uuid.uuid4()),
            "requestId": str(uuid.uuid4()),
            "eTag": f'"{v["etag"]}"',
            "contentType": "application/octet-stream",
            "contentLength": v["size"],
            "blobType": "BlockBlob",
            "url": f"{az.blob_url(SOURCE_ACCOUNT)}/{container}/{urllib.parse.quote(v['name'])}",
            "sequencer": f"{seq:032x}",
            "storageDiagnostics": {"batchId": str(uuid.uuid4())},
        },
        "dataVersion": "",
        "metadataVersion": "1",
    }
    return base64.b64encode(json.dumps(ev).encode()).decode()


# --- statistics -------------------------------------------------------------------------------------
def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def classify(versions: list[dict], seen: dict) -> dict:
    by_name: dict[str, list[dict]] = {}
    for v in sorted(versions, key=lambda v: v["t_done"]):
        by_name.setdefault(v["name"], []).append(v)
    lat, late_ok, superseded, never, never_ex = [], 0, 0, 0, []
    t_first = min((v["t_done"] for v in versions), default=0.0)
    windows: dict[int, list[float]] = {}  # latency by 10-s window of write time: does a backlog grow?
    for vs in by_name.values():
        for k, v in enumerate(vs):
            t = seen.get((v["name"], v["etag"]))
            nxt = vs[k + 1] if k + 1 < len(vs) else None
            if t is not None:
                lat.append(max(0.0, t - v["t_done"]))
                windows.setdefault(int((v["t_done"] - t_first) // 10), []).append(lat[-1])
                late_ok += bool(nxt and nxt["t_done"] < t)
            elif nxt is not None:
                superseded += 1
            else:
                never += 1
                if len(never_ex) < 5:
                    never_ex.append(v["name"])
    r = lambda x: None if x is None else round(x, 2)
    return {
        "changes": len(versions),
        "names": len(by_name),
        "backed_up": len(lat),
        "backed_up_after_overwrite": late_ok,
        "superseded": superseded,
        "never_backed_up": never,
        "never_examples": never_ex,
        "latency_s": {"median": r(pct(lat, 50)), "p99": r(pct(lat, 99)), "max": r(max(lat) if lat else None),
                      "mean": r(sum(lat) / len(lat) if lat else None)},
        "latency_by_10s_of_writing": [{"from_s": k * 10, "backed_up": len(w), "median": r(pct(w, 50)),
                                       "p99": r(pct(w, 99))} for k, w in sorted(windows.items())],
    }


# --- one scenario -----------------------------------------------------------------------------------
def ensure_queue(cs: str, name: str) -> None:
    try:
        QueueClient.from_connection_string(cs, name).create_queue()
    except ResourceExistsError:
        pass


def start_serve(lg_bin: Path, env: dict, logdir: Path, tag: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = dict(env, FUNCTIONS_CUSTOMHANDLER_PORT=str(port), FUNCTIONS_HTTPWORKER_PORT=str(port),
               FUNCTIONS_APP_ROOT_PATH=str(ROOT))
    out = open(logdir / f"{tag}-serve.stdout", "wb")
    err = open(logdir / f"{tag}-serve.stderr", "wb")
    p = subprocess.Popen([str(lg_bin), "serve"], env=env, stdout=out, stderr=err, cwd=str(ROOT), start_new_session=True)
    deadline = time.monotonic() + 30  # the host's initializationTimeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"lakeguard serve exited with {p.returncode}; see {logdir}/{tag}-serve.stderr")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1):
                return p, port
        except OSError:
            time.sleep(0.025)
    p.kill()
    raise RuntimeError("lakeguard serve did not answer GET / within 30 s")


def stop_serve(p: subprocess.Popen) -> int:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return p.returncode


def run_scenario(kind: str, az: Azurite, lg_bin: Path, work: Path, opts: dict, seed: int) -> dict:
    rate, seconds = opts["rate"], opts["seconds"]
    stamp = datetime.now(timezone.utc).strftime("%H%M%S")
    container = f"rpo-{kind}-{stamp}"
    qbase = f"rpo-{kind}-{stamp}"
    queues = {"backup": qbase, "event": f"{qbase}-events", "reconcile": f"{qbase}-reconcile"}
    logdir = work / "rpo"
    logdir.mkdir(parents=True, exist_ok=True)
    scc = BlobServiceClient.from_connection_string(az.source_cs)
    scc.create_container(container)
    for q in queues.values():
        ensure_queue(az.source_cs, q)  # the deployment creates them (infra/)
    env = Lakeguard(az, work, lg_bin).env()
    env.update(
        LAKEGUARD_BACKUP_QUEUE=queues["backup"],
        LAKEGUARD_EVENT_QUEUE=queues["event"],
        LAKEGUARD_RECONCILE_QUEUE=queues["reconcile"],
        LAKEGUARD_CONTAINERS_INCLUDE=container,
        LAKEGUARD_LOG=os.environ.get("LAKEGUARD_LOG", "warn"),
    )
    serve, port = start_serve(lg_bin, env, logdir, container)
    h = Handler(port)
    cfg = host_queue_settings()
    stop_host, stop_watch = threading.Event(), threading.Event()
    triggers = [QueueTrigger(az.source_cs, queues["backup"], "BackupWorker", h, cfg, stop_host),
                QueueTrigger(az.source_cs, queues["reconcile"], "ReconcileWorker", h, cfg, stop_host)]
    periodic = None
    if kind == "event":
        triggers.append(QueueTrigger(az.source_cs, queues["event"], "EventBackup", h, cfg, stop_host))
    elif kind == "producer":
        body = json.dumps({"container": container}).encode()

        def fire(_last, _next):  # forwarded HTTP: the original request at its original path
            hd = {"Content-Type": "application/json", "x-functions-key": "bench-key",
                  "X-Azure-Functions-InvocationId": str(uuid.uuid4()), "User-Agent": "AzureDataFactory"}
            return h.request("POST", "/api/snapshot", body, hd, chunked=False)

        periodic = Periodic("producer", opts["producer_every"], fire, stop_host)
    elif kind == "reconcile":
        tb = binding_of("Reconcile", "timerTrigger")
        periodic = Periodic("reconcile", opts["reconcile_every"],
                            lambda last, nxt: h.invoke("Reconcile", timer_payload(tb, "Reconcile", last, nxt)), stop_host)
    watcher = Watcher(az, container, opts["poll"], stop_watch)

    evq = QueueClient.from_connection_string(az.source_cs, queues["event"]) if kind == "event" else None
    seq = itertools.count(1)
    seq_lock = threading.Lock()
    enqueue_errors = [0]

    def on_write(v):
        if evq is None:
            return
        with seq_lock:
            s = next(seq)
        try:
            evq.send_message(event_message(az, container, v, s))
        except Exception:
            enqueue_errors[0] += 1

    writer = Writer(scc, container, rate, seconds, seed, on_write, threads=opts.get("writers", 16))
    mark = az.mark()
    for t in triggers:
        t.start()
    if periodic:
        periodic.start()
    watcher.start()
    log(f"{kind}: writing {writer.n} changes at {rate}/s into {container} (handler on :{port})")
    wall = writer.run()
    t_end = time.monotonic()
    log(f"{kind}: writer done in {wall:.1f}s ({len(writer.versions)} written, {writer.errors} errors); draining")
    every = {"producer": opts["producer_every"], "reconcile": opts["reconcile_every"]}.get(kind, 0)
    drain = opts["drain"] if opts["drain"] is not None else 60 + 2 * every
    latest = {}
    for v in sorted(writer.versions, key=lambda v: v["t_done"]):
        latest[v["name"]] = v["etag"]
    while time.monotonic() - t_end < drain:
        with watcher.lock:
            missing = sum(1 for n, e in latest.items() if (n, e) not in watcher.seen)
        if not missing:
            break
        time.sleep(0.5)
    drained_s = time.monotonic() - t_end
    left = {}  # what was still queued when the drain ended (a backlog, not a loss)
    for q in queues.values():
        try:
            left[q] = QueueClient.from_connection_string(az.source_cs, q).get_queue_properties().approximate_message_count
        except Exception as e:
            left[q] = f"unknown ({e.__class__.__name__})"
    stop_watch.set()
    watcher.join()
    stop_host.set()
    for t in triggers:
        t.join()
        t.finish()
    if periodic:
        periodic.join()
    rc = stop_serve(serve)
    usage = az.since(mark)
    with watcher.lock:
        res = classify(writer.versions, dict(watcher.seen))
    late = writer.late_s
    res.update({
        "scenario": kind,
        "title": SCENARIOS[kind],
        "container": container,
        "rate_target": rate,
        "seconds_target": seconds,
        "writer_wall_s": round(wall, 2),
        "rate_achieved": round(len(writer.versions) / wall, 2) if wall else None,
        "writer_errors": writer.errors,
        "writer_threads": writer.threads,
        "writer_late": {"count": len(late), "max_s": round(max(late), 2) if late else 0},
        "event_enqueue_errors": enqueue_errors[0] if kind == "event" else None,
        "drain_limit_s": drain,
        "drained_s": round(drained_s, 2),
        "left_on_queues_at_drain_end": left,
        "watcher": {"polls": watcher.polls, "errors": watcher.errors, "period_s": opts["poll"],
                    "listing_s_median": round(pct(watcher.poll_s, 50) or 0, 3),
                    "listing_s_max": round(max(watcher.poll_s) if watcher.poll_s else 0, 3)},
        "functions": {t.function: t.stats for t in triggers},
        "periodic": ({"function": "SnapshotProducer" if kind == "producer" else "Reconcile",
                      "every_s": every, "calls": periodic.calls} if periodic else None),
        "serve_exit": rc,
        "azurite_cpu_s": usage["azurite_cpu_s"],
        "azurite_blob_cpu_s": usage["azurite_blob_cpu_s"],
        "requests": usage["requests"],
    })
    lat = res["latency_s"]
    log(f"{kind}: {res['changes']} changes, {res['backed_up']} backed up, {res['superseded']} superseded, "
        f"{res['never_backed_up']} never; latency median {lat['median']} p99 {lat['p99']} max {lat['max']} s; "
        f"Azurite CPU {res['azurite_cpu_s']}s over {wall + drained_s:.0f}s")
    return res


def run(az: Azurite, lg_bin: Path, run_dir: Path, kinds: list[str], opts: dict, seed: int) -> dict:
    out = {}
    for k, kind in enumerate(kinds):
        az.quiesce()
        try:
            out[kind] = run_scenario(kind, az, lg_bin, run_dir / "tools", opts, seed + k)
        except Exception as e:  # reported, never a made-up number
            log(f"{kind}: FAILED: {e.__class__.__name__}: {e}")
            out[kind] = {"scenario": kind, "title": SCENARIOS[kind], "error": f"{e.__class__.__name__}: {e}"}
    return out


def check(results: dict) -> list[str]:
    fails = []
    for kind, r in results.items():
        if "error" in r:
            fails.append(f"rpo {kind}: {r['error']}")
        elif r["never_backed_up"] or not r["changes"] or r["writer_errors"]:
            fails.append(f"rpo {kind}: {r['never_backed_up']} of {r['changes']} changes never backed up "
                         f"(e.g. {r['never_examples']}), {r['writer_errors']} write errors")
    return fails
