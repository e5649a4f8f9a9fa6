"""The benchmark's own Azurite: blob + queue services on loopback free ports, two accounts, in memory.

Not started with --silent: stdout is the access log (one line per request, format extended by the
shim with the dispatched operation and the User-Agent). Requests are counted from it by byte offsets
taken before and after each run.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

SOURCE_ACCOUNT = "devstoreaccount1"
SOURCE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
BACKUP_ACCOUNT = "backupacct"
# A fixed, benchmark-only key (the emulator is on loopback and in memory).
BACKUP_KEY = base64.b64encode(b"lakeguard-bench-backup-account-key-0123456789abcdef").decode()

CLK_TCK = os.sysconf("SC_CLK_TCK")

# Azurite's self-requests (cross-account copy source validation) are made with axios.
SELF_UA = re.compile(r'ua="axios/')
LINE = re.compile(
    r'^(?P<ip>\S+) - - \[[^\]]*\] "(?P<method>[A-Z]+) (?P<url>\S*) HTTP/[\d.]+" (?P<status>\d{3}) \S+'
    r'(?: op=(?P<op>\S+) ua="(?P<ua>[^"]*)")?'
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of one process, from /proc/<pid>/stat (fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class RequestCounts:
    total: int = 0  # requests made by the tool (self-requests excluded)
    self_requests: int = 0  # Azurite's own requests (axios), excluded from total
    by_op: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # "<op> <status>" for status >= 400, tool requests only

    def as_dict(self) -> dict:
        return {
            "total": self.total,
            "azurite_self_requests_excluded": self.self_requests,
            "by_operation": dict(sorted(self.by_op.items())),
            "errors": dict(sorted(self.errors.items())),
        }


def parse_log(lines: list[str], counts: RequestCounts, service: str) -> None:
    for line in lines:
        m = LINE.match(line)
        if not m:
            continue
        if m.group("ua") is not None and SELF_UA.search(line):
            counts.self_requests += 1
            continue
        op = m.group("op") or f"{m.group('method')}?"
        if op == "-":
            op = f"{service}:{m.group('method')} (not dispatched)"
        counts.total += 1
        counts.by_op[op] += 1
        status = int(m.group("status"))
        if status >= 400:
            counts.errors[f"{op} {status}"] += 1


class Service:
    def __init__(self, name: str, argv: list[str], env: dict, logfile: Path):
        self.name = name
        self.logfile = logfile
        self._log = open(logfile, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def cpu(self) -> float:
        return proc_cpu_seconds(self.proc.pid)

    def rss(self) -> int:
        return proc_rss_bytes(self.proc.pid)

    def offset(self) -> int:
        self._log.flush()
        return self.logfile.stat().st_size

    def read_from(self, offset: int) -> list[str]:
        with open(self.logfile, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace").splitlines()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


class Azurite:
    def __init__(self, package: Path, workdir: Path):
        self.package = package
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.blob_port = free_port()
        self.queue_port = free_port()
        env = dict(os.environ, AZURITE_ACCOUNTS=f"{SOURCE_ACCOUNT}:{SOURCE_KEY};{BACKUP_ACCOUNT}:{BACKUP_KEY}")
        common = ["--inMemoryPersistence", "--loose", "--skipApiVersionCheck", "--disableTelemetry"]
        src = package / "dist" / "src"
        self.blob = Service(
            "blob",
            ["node", str(src / "blob" / "main.js"), "--blobHost", "127.0.0.1", "--blobPort", str(self.blob_port), *common],
            env,
            workdir / "azurite-blob.log",
        )
        self.queue = Service(
            "queue",
            ["node", str(src / "queue" / "main.js"), "--queueHost", "127.0.0.1", "--queuePort", str(self.queue_port), *common],
            env,
            workdir / "azurite-queue.log",
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.time() + 60
        for port in (self.blob_port, self.queue_port):
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        break
                except OSError:
                    if time.time() > deadline:
                        raise SystemExit(f"Azurite did not listen on {port}; see {self.workdir}")
                    for s in (self.blob, self.queue):
                        if s.proc.poll() is not None:
                            raise SystemExit(f"Azurite {s.name} exited; see {s.logfile}")
                    time.sleep(0.2)

    # endpoints -----------------------------------------------------------------------------------
    def blob_url(self, account: str) -> str:
        return f"http://127.0.0.1:{self.blob_port}/{account}"

    def queue_url(self, account: str) -> str:
        return f"http://127.0.0.1:{self.queue_port}/{account}"

    def connection_string(self, account: str, key: str) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={account};AccountKey={key};"
            f"BlobEndpoint={self.blob_url(account)};QueueEndpoint={self.queue_url(account)};"
        )

    @property
    def source_cs(self) -> str:
        return self.connection_string(SOURCE_ACCOUNT, SOURCE_KEY)

    @property
    def backup_cs(self) -> str:
        return self.connection_string(BACKUP_ACCOUNT, BACKUP_KEY)

    # measurement ---------------------------------------------------------------------------------
    def mark(self) -> dict:
        return {
            "blob_off": self.blob.offset(),
            "queue_off": self.queue.offset(),
            "blob_cpu": self.blob.cpu(),
            "queue_cpu": self.queue.cpu(),
        }

    def settle(self, timeout: float = 5.0) -> None:
        """Wait until both access logs stop growing (morgan writes after the response)."""
        last = (-1, -1)
        deadline = time.time() + timeout
        while time.time() < deadline:
            cur = (self.blob.offset(), self.queue.offset())
            if cur == last:
                return
            last = cur
            time.sleep(0.25)

    def quiesce(self, max_wait: float = 90.0) -> float:
        """Wait until both services are idle (under 10% CPU over half a second): Azurite collects
        garbage in the background (e.g. after thousands of queue deletes), and that work must not
        land in the next tool's measurement. Returns the seconds waited."""
        start = time.time()
        while time.time() - start < max_wait:
            before = self.blob.cpu() + self.queue.cpu()
            time.sleep(0.5)
            if self.blob.cpu() + self.queue.cpu() - before < 0.05:
                break
        return round(time.time() - start, 2)

    def since(self, mark: dict) -> dict:
        self.settle()
        blob_cpu = self.blob.cpu() - mark["blob_cpu"]
        queue_cpu = self.queue.cpu() - mark["queue_cpu"]
        counts = RequestCounts()
        parse_log(self.blob.read_from(mark["blob_off"]), counts, "blob")
        parse_log(self.queue.read_from(mark["queue_off"]), counts, "queue")
        return {
            "azurite_cpu_s": round(blob_cpu + queue_cpu, 3),
            "azurite_blob_cpu_s": round(blob_cpu, 3),
            "requests": counts.as_dict(),
        }

    def stop(self) -> None:
        self.blob.stop()
        self.queue.stop()
