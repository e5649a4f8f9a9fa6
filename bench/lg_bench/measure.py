"""Runs one tool's command lines and measures them: wall time, the tool's CPU seconds and peak RSS,
and Azurite's requests and CPU over the same interval.

The tool runs under GNU time (/usr/bin/time), which reports the wait4 rusage of the tool: user +
system CPU of the tool and its waited-for descendants, and the largest RSS of one process. Not wait4
from this Python process directly: Linux carries the RSS high-water mark of the forked Python parent
across exec into ru_maxrss (every tool would show the benchmark's own ~115 MiB); GNU time is small.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from .azurite import Azurite


GNU_TIME = "/usr/bin/time"


def run_one(argv: list[str], env: dict, out: Path, err: Path, timeout: float) -> dict:
    rus = out.with_suffix(".rusage")
    with open(out, "wb") as fo, open(err, "wb") as fe:
        t0 = time.monotonic()
        p = subprocess.Popen(
            [GNU_TIME, "-o", str(rus), "-f", "%U %S %M %x", *argv], env=env, stdout=fo, stderr=fe, start_new_session=True
        )
        timed_out = threading.Event()

        def kill():
            timed_out.set()
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.start()
        p.wait()
        wall = time.monotonic() - t0
        timer.cancel()
    last = (rus.read_text().strip().splitlines() or ["0 0 0 -1"])[-1].split()
    utime, stime, maxrss_kib = float(last[0]), float(last[1]), int(last[2])
    return {
        "argv0": Path(argv[0]).name + " " + " ".join(a for a in argv[1:3] if not a.startswith("http")),
        "exit_code": p.returncode,
        "timed_out": timed_out.is_set(),
        "wall_s": wall,
        "cpu_s": utime + stime,
        "max_rss_bytes": maxrss_kib * 1024,
    }


def measure(az: Azurite, cmds: list[list[str]], env: dict, logdir: Path, label: str, timeout: float) -> dict:
    logdir.mkdir(parents=True, exist_ok=True)
    quiet_wait = az.quiesce()
    mark = az.mark()
    steps = []
    for i, argv in enumerate(cmds):
        steps.append(run_one(argv, env, logdir / f"{label}.{i}.out", logdir / f"{label}.{i}.err", timeout))
        if steps[-1]["exit_code"] != 0:
            break
    res = az.since(mark)
    wall = sum(s["wall_s"] for s in steps)
    res.update(
        wall_s=round(wall, 3),
        tool_cpu_s=round(sum(s["cpu_s"] for s in steps), 3),
        tool_peak_rss_mib=round(max((s["max_rss_bytes"] for s in steps), default=0) / 2**20, 1),
        exit_ok=all(s["exit_code"] == 0 for s in steps) and len(steps) == len(cmds),
        steps=[{**s, "wall_s": round(s["wall_s"], 3), "cpu_s": round(s["cpu_s"], 3)} for s in steps],
        logs=str(logdir / label) + ".*",
        azurite_quiesce_wait_s=quiet_wait,
    )
    # Azurite is the bottleneck when its (single-threaded) CPU time is close to the wall time.
    res["azurite_busy_fraction"] = round(res["azurite_cpu_s"] / wall, 2) if wall > 0 else None
    res["azurite_bottleneck"] = bool(wall > 0 and res["azurite_blob_cpu_s"] / wall >= 0.8)
    return res
