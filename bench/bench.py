"""lakeguard benchmark: lakeguard vs AzCopy vs rclone vs the seed-000 reference design, on one
machine, against the benchmark's own Azurite. Run through bench/run (see bench/README.md)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from azure.core.exceptions import ResourceNotFoundError

from lg_bench import lake as lakemod
from lg_bench import report, setup_env
from lg_bench.azurite import BACKUP_ACCOUNT, BACKUP_KEY, SOURCE_ACCOUNT, SOURCE_KEY, Azurite
from lg_bench.measure import measure
from lg_bench.tools import AzCopy, Lakeguard, Rclone, Reference, Tool, account_sas

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

SCENARIOS = {
    1: "initial full backup",
    2: "no-op run (nothing changed)",
    3: "incremental after 1% of blobs changed",
    4: "repair after 1% of backup blobs deleted",
    5: "restore of a prefix to an earlier time",
}


def log(msg: str) -> None:
    print(f"[bench {datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def default_lakeguard() -> Path:
    target = os.environ.get("CARGO_TARGET_DIR") or str(ROOT / "target")
    return Path(target) / "release" / "lakeguard"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    ap.add_argument("--small", type=int, default=20000, help="small blobs (1-4 KiB)")
    ap.add_argument("--large", type=int, default=20, help="large blobs (8 MiB)")
    ap.add_argument("--quick", action="store_true", help="CI mode: 300 small + 2 large")
    ap.add_argument("--seed", type=int, default=20261122)
    ap.add_argument("--tools", default="lakeguard,azcopy,rclone,reference")
    ap.add_argument("--lakeguard", type=Path, default=None, help="lakeguard binary (default $CARGO_TARGET_DIR/release/lakeguard)")
    ap.add_argument("--build", action="store_true", help="cargo build --release first")
    ap.add_argument("--rss-scaling", nargs="?", const="lakeguard", default=None, metavar="TOOL",
                    help="also run the RSS scaling check (default tool: lakeguard)")
    ap.add_argument("--rss-sizes", default="20000,100000", help="blob counts for --rss-scaling")
    ap.add_argument("--timeout", type=float, default=None, help="per command, seconds")
    ap.add_argument("--repeat", type=int, default=None,
                    help="rounds of scenarios 2, 3 and 4 and of the floor, median reported (default 3; quick: 1)")
    ap.add_argument("--out", type=Path, default=BENCH / "results")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 unless every lakeguard run was correct and its no-op made no per-blob "
                         "request (what CI runs with --quick)")
    ap.add_argument("--render", type=Path, default=None, metavar="JSON",
                    help="only re-write the Markdown table and the chart of an existing results JSON")
    ap.add_argument("--rpo", action="store_true",
                    help="run the RPO benchmark instead of the scenarios (lg_bench/rpo.py; --quick: 10 s at 5/s)")
    ap.add_argument("--rpo-rate", type=float, default=None, help="RPO: changes per second (default 50; quick: 5)")
    ap.add_argument("--rpo-seconds", type=float, default=None, help="RPO: how long the writer writes (default 60; quick: 10)")
    ap.add_argument("--rpo-paths", default="event,producer,reconcile", help="RPO: which paths, comma list")
    ap.add_argument("--rpo-producer-every", type=float, default=10.0, help="RPO: SnapshotProducer call period, s")
    ap.add_argument("--rpo-reconcile-every", type=float, default=30.0, help="RPO: Reconcile timer period, s")
    ap.add_argument("--rpo-writers", type=int, default=16,
                    help="RPO: writer threads (a change is due every 1/rate s; a late writer is reported)")
    ap.add_argument("--rpo-poll", type=float, default=0.5, help="RPO: backup listing period, s")
    ap.add_argument("--rpo-drain", type=float, default=None,
                    help="RPO: how long to wait after the writer stops (default 60 s + 2 periods of the path's trigger)")
    a = ap.parse_args(argv)
    if a.rpo_rate is None:
        a.rpo_rate = 5.0 if a.quick else 50.0
    if a.rpo_seconds is None:
        a.rpo_seconds = 10.0 if a.quick else 60.0
    if a.quick:
        a.small, a.large = 300, 2
        if a.rss_sizes == "20000,100000":
            a.rss_sizes = "300,1500"
    if a.timeout is None:
        a.timeout = 300 if a.quick else 3600
    if a.repeat is None:
        a.repeat = 1 if a.quick else 3
    a.repeat = max(1, a.repeat)
    return a


# --- floor: the minimal requests (bare flat listings), served as fast as Azurite can -----------------
def flat_list(az: Azurite, account: str, key: str, container: str, include: str = "") -> int:
    sas = account_sas(account, key)
    marker, n = "", 0
    while True:
        url = f"{az.blob_url(account)}/{container}?restype=container&comp=list&{sas}"
        if include:
            url += f"&include={include}"
        if marker:
            url += "&marker=" + urllib.parse.quote(marker, safe="")
        with urllib.request.urlopen(url) as r:
            body = r.read().decode()
        n += body.count("<Blob>")
        m = re.search(r"<NextMarker>([^<]+)</NextMarker>", body)
        if not m:
            return n
        marker = m.group(1)


def combine(rounds: list[dict]) -> dict:
    """One result from repeated rounds: the numbers of the median round (by wall time; the lower
    one of an even count), every round's wall time, Azurite CPU, requests and correctness beside
    them. Wrong or failed in any round = wrong or failed."""
    ran = [r for r in rounds if "not_runnable" not in r]
    if not ran:
        return rounds[0]
    by_wall = sorted(ran, key=lambda r: r["wall_s"])
    out = dict(by_wall[(len(by_wall) - 1) // 2])
    if len(ran) == 1:
        return out
    out["rounds"] = [{"wall_s": r["wall_s"], "azurite_cpu_s": r["azurite_cpu_s"],
                      "requests": r["requests"]["total"], "exit_ok": r["exit_ok"],
                      "correct": r["correctness"].get("ok")} for r in ran]
    out["exit_ok"] = all(r["exit_ok"] for r in ran)
    bad = next((r for r in ran if not r["correctness"].get("ok")), None)
    if bad:
        out["correctness"] = bad["correctness"]
    return out


def combine_floor(rounds: list[dict]) -> dict:
    out = {"containers": rounds[0]["containers"]}
    for label in ("plain", "with_snapshots_metadata"):
        by_wall = sorted((r[label] for r in rounds), key=lambda x: x["wall_s"])
        out[label] = dict(by_wall[(len(by_wall) - 1) // 2])
        if len(rounds) > 1:
            out[label]["rounds_wall_s"] = [r[label]["wall_s"] for r in rounds]
    return out


def rotated(tools: list, k: int) -> list:
    """Round k starts with the k-th tool, so that no tool always runs first after a set-up."""
    return tools[k % len(tools):] + tools[: k % len(tools)] if tools else tools


def measure_floor(az: Azurite, tool: Tool) -> dict:
    out = {"containers": [tool.container, tool.backup_container]}
    for label, include in (("plain", ""), ("with_snapshots_metadata", "snapshots,metadata")):
        mark = az.mark()
        t0 = time.monotonic()
        n_src = flat_list(az, SOURCE_ACCOUNT, SOURCE_KEY, tool.container, include)
        n_dst = flat_list(az, BACKUP_ACCOUNT, BACKUP_KEY, tool.backup_container, include)
        wall = time.monotonic() - t0
        r = az.since(mark)
        out[label] = {"wall_s": round(wall, 3), "entries": n_src + n_dst, **r}
    return out


# --- scenario set-up (outside the measured intervals) ----------------------------------------------
def ensure_container(svc, name: str) -> None:
    try:
        svc.create_container(name)
    except Exception as e:  # already exists
        if "ContainerAlreadyExists" not in str(e):
            raise


def delete_backups(bsvc, tool: Tool, lake: lakemod.Lake, ssvc, salt: str) -> list[str]:
    """Delete the tool's current backup of a seeded 1% of the source blobs (with the backup's
    snapshots, that is with every older version the backup held); returns the source names."""
    cc = bsvc.get_container_client(tool.backup_container)
    src = lakemod.listing(ssvc.get_container_client(tool.container))
    existing = set(lakemod.listing(cc))
    names = []
    for b in lake.pick(0.01, salt):
        for cand in tool.backup_names(b.name, src[b.name]):
            if cand in existing:
                try:
                    cc.delete_blob(cand, delete_snapshots="include")
                except ResourceNotFoundError:
                    # The SDK retried a delete that Azurite finished after the client timed out:
                    # gone either way.
                    pass
                names.append(b.name)
                break
    return names


def run_tool(az, tool: Tool, scenario: int, a, logdir: Path, ssvc, bsvc, lake, extra_verify=None,
             label: str = "") -> dict:
    why = tool.scenario_runnable(scenario)
    if why:
        log(f"scenario {scenario} / {tool.name}: NOT RUNNABLE: {why}")
        return {"not_runnable": why}
    log(f"scenario {scenario} / {tool.name} {label}".rstrip())
    tag = f"s{scenario}{label}-{tool.name}"
    res = measure(az, tool.commands(scenario), tool.env(), logdir, tag, a.timeout)
    if scenario == 5:
        res["correctness"] = extra_verify()
    else:
        try:
            res["correctness"] = lakemod.verify(
                ssvc.get_container_client(tool.container),
                bsvc.get_container_client(tool.backup_container),
                tool.backup_names,
            )
        except ResourceNotFoundError as e:
            res["correctness"] = {"ok": False, "error": f"backup container missing: {e.reason}"}
    res["tool_output"] = tool_output(logdir, tag, len(res["steps"]))
    c = res["correctness"]
    log(
        f"  {tool.name}: {res['wall_s']:.2f}s wall, {res['requests']['total']} req, Azurite CPU "
        f"{res['azurite_cpu_s']:.2f}s, tool CPU {res['tool_cpu_s']:.2f}s, RSS {res['tool_peak_rss_mib']} MiB, "
        f"exit_ok={res['exit_ok']}, correct={c.get('ok')}"
    )
    return res


def tool_output(logdir: Path, label: str, n: int) -> list:
    """What each step printed as JSON (lakeguard --output json, the reference's stats); long lists
    (e.g. per-blob failures) are cut to 5 entries."""
    out = []
    for i in range(n):
        raw = (logdir / f"{label}.{i}.out").read_text(errors="replace").strip()
        try:
            out.append(json.loads(raw))
            continue
        except ValueError:
            pass
        val = None
        for line in reversed(raw.splitlines()):
            try:
                val = json.loads(line)
                break
            except ValueError:
                continue
        out.append(val)
    return [_cut(v) for v in out]


def _cut(v):
    if isinstance(v, dict):
        return {k: _cut(x) for k, x in v.items()}
    if isinstance(v, list) and len(v) > 5:
        return [_cut(x) for x in v[:5]] + [f"... {len(v) - 5} more"]
    return v


def rss_scaling(az: Azurite, a, lg: Tool, logdir: Path, ssvc, bsvc) -> dict:
    """Peak RSS of lakeguard's listing-bound passes at two container sizes (default 20k and 100k),
    in fresh containers: it must be bounded by a page, not by the container (growth below 5x).

    Per size: the producer over N new blobs (lists, snapshots and enqueues N), the same producer
    again (lists N blobs + N snapshots, nothing to do), and a reconcile dry run after the queue is
    cleared (both listings, N blobs missing from the backup, every one decided). The worker is
    not part of it: its memory is bounded by one batch per worker, whatever the container, and
    Azurite's queue makes draining 100k messages take hours (each delete scans the queue)."""
    from azure.storage.queue import QueueClient

    sizes = [int(x) for x in a.rss_sizes.split(",")]
    out = {"tool": lg.name, "sizes": sizes, "runs": [],
           "passes": ["snapshot (N new)", "snapshot (no-op)", "reconcile --dry-run (N missing)"]}
    if lg.name != "lakeguard":
        return {**out, "not_runnable": "the RSS scaling passes are lakeguard commands"}
    b = str(lg.binary)
    for n in sizes:
        lk = lakemod.Lake(a.seed + n, n, 0)
        container = f"rss-{n}"
        queue = f"rss-queue-{n}"
        ensure_container(ssvc, container)
        qc = QueueClient.from_connection_string(az.source_cs, queue)
        try:
            qc.create_queue()
        except Exception:  # noqa: BLE001 - exists from an earlier run: cleared below
            pass
        qc.clear_messages()
        log(f"rss scaling: uploading {n} blobs")
        lakemod.upload(ssvc.get_container_client(container), lk, lk.blobs, 0)
        env = {**lg.env(), "LAKEGUARD_BACKUP_QUEUE": queue}
        row = {"blobs": n}
        passes = [
            ("produce", [b, "snapshot", "--container", container, "--output", "json"]),
            ("produce_noop", [b, "snapshot", "--container", container, "--output", "json"]),
            ("reconcile_dry_run", [b, "reconcile", "--container", container, "--dry-run", "--output", "json"]),
        ]
        for label, argv in passes:
            if label == "reconcile_dry_run":
                qc.clear_messages()  # an empty queue: nothing pending, every blob decided
            r = measure(az, [argv], env, logdir, f"rss-{n}-{label}", a.timeout)
            row[label] = {k: r[k] for k in ("wall_s", "tool_cpu_s", "tool_peak_rss_mib", "exit_ok")}
            log(f"  {n} blobs, {label}: {r['wall_s']:.1f}s, RSS {r['tool_peak_rss_mib']} MiB, ok={r['exit_ok']}")
        # No clean-up of the queue here: the emulator is thrown away after the run, and clearing
        # 100k messages can keep Azurite's queue busy for minutes.
        row["peak_rss_mib"] = max(row[k]["tool_peak_rss_mib"] for k, _ in passes)
        row["all_ok"] = all(row[k]["exit_ok"] for k, _ in passes)
        out["runs"].append(row)
        log(f"  {n} blobs: peak RSS {row['peak_rss_mib']} MiB")
    first, last = out["runs"][0]["peak_rss_mib"], out["runs"][-1]["peak_rss_mib"]
    out["growth"] = round(last / first, 2) if first else None
    out["pass"] = bool(first and last / first < 5 and all(r["all_ok"] for r in out["runs"]))
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.render:
        doc = json.loads(a.render.read_text())
        stem = a.render.with_suffix("")
        if doc.get("kind") == "rpo":
            stem.with_suffix(".md").write_text(report.rpo_markdown(doc))
            print("\n".join(report.rpo_rows(doc["rpo"])))
            return 0
        stem.with_suffix(".md").write_text(report.markdown(doc, f"{stem.name}.png"))
        report.chart(doc, stem.with_suffix(".png"))
        print(report.summary(doc))
        return 0
    started = datetime.now(timezone.utc)
    names = [t.strip() for t in a.tools.split(",") if t.strip()]
    need_peers = bool({"azcopy", "rclone"} & set(names)) and not a.rpo
    paths = setup_env.ensure_all(need_peers=need_peers)
    lg_bin = a.lakeguard or default_lakeguard()
    if a.build:
        log("cargo build --release")
        subprocess.run(["cargo", "build", "--release"], cwd=ROOT, check=True)

    run_dir = BENCH / "work" / "runs" / started.strftime("%Y%m%dT%H%M%SZ")
    run_dir.mkdir(parents=True, exist_ok=True)
    logdir = run_dir / "logs"
    az = Azurite(paths["azurite"], run_dir / "azurite")
    log(f"Azurite blob :{az.blob_port} queue :{az.queue_port}, logs in {run_dir}")
    try:
        if a.rpo:
            return bench_rpo(a, az, paths, lg_bin, run_dir, started)
        return bench(a, az, names, paths, lg_bin, run_dir, logdir, started)
    finally:
        az.stop()


def bench(a, az, names, paths, lg_bin, run_dir, logdir, started) -> int:
    work = run_dir / "tools"
    all_tools = {
        "lakeguard": lambda: Lakeguard(az, work, lg_bin),
        "azcopy": lambda: AzCopy(az, work, paths.get("azcopy")),
        "rclone": lambda: Rclone(az, work, paths.get("rclone")),
        "reference": lambda: Reference(az, work),
    }
    tools, not_runnable = [], {}
    for n in names:
        t = all_tools[n]()
        why = t.runnable()
        if why:
            not_runnable[n] = why
            log(f"{n}: NOT RUNNABLE: {why}")
        else:
            tools.append(t)

    ssvc = lakemod.service(az.source_cs)
    bsvc = lakemod.service(az.backup_cs)
    lake = lakemod.Lake(a.seed, a.small, a.large)
    log(f"data lake: {a.small} small + {a.large} large blobs, seed {a.seed}")
    gen = {}
    for t in tools:
        ensure_container(ssvc, t.container)
        if t.precreate_backup_container():
            ensure_container(bsvc, t.backup_container)
        if t.precreate_queue():
            from azure.core.exceptions import ResourceExistsError
            from azure.storage.queue import QueueClient

            try:
                QueueClient.from_connection_string(az.source_cs, t.precreate_queue()).create_queue()
            except ResourceExistsError:
                pass
        t0 = time.monotonic()
        lakemod.upload(ssvc.get_container_client(t.container), lake, lake.blobs, 0)
        gen[t.name] = round(time.monotonic() - t0, 1)
        log(f"  uploaded {len(lake.blobs)} blobs to {t.container} in {gen[t.name]}s")

    results: dict = {str(s): {} for s in SCENARIOS}
    # 1. initial full backup
    for t in tools:
        results["1"][t.name] = run_tool(az, t, 1, a, logdir, ssvc, bsvc, lake)
    time.sleep(1.5)  # a restore point strictly between versions 0 and 1 (1 s timestamp granularity)
    restore_at = datetime.now(timezone.utc).replace(microsecond=0)
    time.sleep(1.5)

    ran1 = [t for t in tools if results["1"][t.name].get("correctness", {}).get("ok")]
    floor_tool = next((t for t in ran1 if t.name == "lakeguard"), ran1[0] if ran1 else None)

    # 2. no-op, and the floor, in `--repeat` rounds (Azurite's timings vary by tens of percent
    # from one run to the next: one sample per tool would decide close calls by chance).
    floors, rounds2 = [], {t.name: [] for t in tools}
    for k in range(a.repeat):
        if floor_tool:
            try:
                floors.append(measure_floor(az, floor_tool))
                f = floors[-1]
                log(f"floor round {k + 1} (flat listings of {f['containers']}): {f['plain']['wall_s']}s, "
                    f"{f['plain']['requests']['total']} req")
            except urllib.error.HTTPError as e:
                log(f"floor not measured: {e}")
        for t in rotated(tools, k):
            rounds2[t.name].append(run_tool(az, t, 2, a, logdir, ssvc, bsvc, lake, label=f"r{k + 1}"))
    floor = combine_floor(floors) if floors else None
    for t in tools:
        results["2"][t.name] = combine(rounds2[t.name])

    # 3. 1% changed (same names, same new bytes, in every tool's source container); every round
    # changes another seeded 1% to a new version.
    changed_rounds = []
    rounds3 = {t.name: [] for t in tools}
    for k in range(a.repeat):
        changed = lake.pick(0.01, "change" if k == 0 else f"change-{k}")
        changed_rounds.append(changed)
        for t in tools:
            lakemod.upload(ssvc.get_container_client(t.container), lake, changed, 1 + k)
        for t in rotated(tools, k):
            rounds3[t.name].append(run_tool(az, t, 3, a, logdir, ssvc, bsvc, lake, label=f"r{k + 1}"))
    for t in tools:
        results["3"][t.name] = combine(rounds3[t.name])
    changed_names = {b.name for ch in changed_rounds for b in ch}

    save_partial(a, started, results)

    # 4. 1% of backup blobs deleted; every round deletes another seeded 1%.
    deleted = {t.name: [] for t in tools}
    rounds4 = {t.name: [] for t in tools}
    for k in range(a.repeat):
        for t in tools:
            salt = "delete-backup" if k == 0 else f"delete-backup-{k}"
            deleted[t.name].append(delete_backups(bsvc, t, lake, ssvc, salt))
        for t in rotated(tools, k):
            rounds4[t.name].append(run_tool(az, t, 4, a, logdir, ssvc, bsvc, lake, label=f"r{k + 1}"))
    for t in tools:
        results["4"][t.name] = combine(rounds4[t.name])

    # 5. restore of a prefix to restore_at (version 0), lakeguard only
    for t in tools:
        if 5 not in t.scenarios:
            continue
        t.restore_at = restore_at.isoformat().replace("+00:00", "Z")
        t.restore_prefix = lake.restore_prefix()
        # A blob changed in scenario 3 whose backup scenario 4 then deleted (with the backup's
        # snapshots) has lost version 0 for good: no backup holds it any more, and nothing in the
        # backup says the name existed at restore_at. Not expected back, and must not come back
        # with a later version's bytes.
        lost = changed_names & {n for names in deleted[t.name] for n in names}
        expected = {b.name: lake.md5(b, 0) for b in lake.blobs
                    if b.name.startswith(t.restore_prefix) and b.name not in lost}
        lost_here = sorted(n for n in lost if n.startswith(t.restore_prefix))

        def check(t=t, expected=expected, lost_here=lost_here):
            try:
                v = lakemod.verify(
                    ssvc.get_container_client(t.container),
                    ssvc.get_container_client(t.restore_to),
                    lambda n, i: [n],
                    expected=expected,
                )
                present = lakemod.listing(ssvc.get_container_client(t.restore_to))
                wrongly = [n for n in lost_here if n in present]
                v["history_destroyed_by_setup"] = len(lost_here)
                v["restored_without_history"] = len(wrongly)
                v["ok"] = v["ok"] and not wrongly
                v["examples"] += wrongly[:3]
                return v
            except ResourceNotFoundError as e:
                return {"ok": False, "error": f"restore target missing: {e.reason}"}

        r = run_tool(az, t, 5, a, logdir, ssvc, bsvc, lake, extra_verify=check)
        if "not_runnable" not in r:
            r["restore"] = {"prefix": t.restore_prefix, "at": t.restore_at, "blobs_expected": len(expected),
                            "history_destroyed_by_setup": len(lost_here),
                            "changed_under_prefix_since": sum(1 for n in changed_names if n.startswith(t.restore_prefix))}
        results["5"][t.name] = r

    rss = None
    if a.rss_scaling:
        rt = next((t for t in tools if t.name == a.rss_scaling), None)
        rss = (rss_scaling(az, a, rt, logdir, ssvc, bsvc) if rt
               else {"tool": a.rss_scaling, "not_runnable": not_runnable.get(a.rss_scaling, "not selected (--tools)")})

    doc = {
        "started": started.isoformat(),
        "finished": datetime.now(timezone.utc).isoformat(),
        "mode": "quick" if a.quick else "full",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_at_end": os.getloadavg()},
        "data": {"seed": a.seed, "small": a.small, "large": a.large, "blobs": len(lake.blobs),
                 "changed": len(changed_rounds[0]), "repeat": a.repeat,
                 "backup_deleted": {k: [len(x) for x in v] for k, v in deleted.items()}, "upload_s": gen},
        "versions": versions(paths, lg_bin),
        "scenarios": SCENARIOS,
        "not_runnable": not_runnable,
        "floor": floor,
        "results": results,
        "rss_scaling": rss,
    }
    doc["ratios"] = report.ratios(doc)
    stem = started.strftime("%Y-%m-%d")
    if a.quick:
        stem += "-quick"
    elif (a.small, a.large) != (20000, 20):
        stem += f"-{a.small}+{a.large}"
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{stem}.json").write_text(json.dumps(doc, indent=1, default=str, ensure_ascii=False))
    (a.out / f"{stem}.md").write_text(report.markdown(doc, f"{stem}.png"))
    report.chart(doc, a.out / f"{stem}.png")
    print(report.summary(doc))
    log(f"wrote {a.out}/{stem}.json, .md, .png")
    wrong = [f"{s}/{t}" for s, per in results.items() for t, r in per.items()
             if "not_runnable" not in r and not r["correctness"].get("ok")]
    if wrong:
        log(f"incorrect or failed runs: {', '.join(wrong)}")
    if a.check:
        failures = check_lakeguard(results, not_runnable)
        for f in failures:
            log(f"CHECK FAILED: {f}")
        if failures:
            return 1
        log("check passed: every lakeguard run correct, its no-op listed and nothing else")
    return 0


def bench_rpo(a, az, paths, lg_bin, run_dir, started) -> int:
    """The RPO benchmark (lg_bench/rpo.py): per path, the time from each change to its backup."""
    from lg_bench import rpo

    if not Path(lg_bin).exists():
        log(f"lakeguard binary not found ({lg_bin}); build it with cargo build --release")
        return 1
    kinds = [k.strip() for k in a.rpo_paths.split(",") if k.strip()]
    bad = [k for k in kinds if k not in rpo.SCENARIOS]
    if bad:
        log(f"unknown --rpo-paths {bad}; known: {', '.join(rpo.SCENARIOS)}")
        return 2
    opts = {"rate": a.rpo_rate, "seconds": a.rpo_seconds, "producer_every": a.rpo_producer_every,
            "reconcile_every": a.rpo_reconcile_every, "poll": a.rpo_poll, "drain": a.rpo_drain, "writers": a.rpo_writers,
            "host_queues": rpo.host_queue_settings()}
    t0 = time.monotonic()
    results = rpo.run(az, Path(lg_bin), run_dir, kinds, opts, a.seed)
    doc = {
        "started": started.isoformat(),
        "finished": datetime.now(timezone.utc).isoformat(),
        "mode": "quick" if a.quick else "full",
        "kind": "rpo",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_at_end": os.getloadavg()},
        "versions": versions(paths, lg_bin),
        "lakeguard_binary": str(lg_bin),
        "options": opts,
        "wall_s": round(time.monotonic() - t0, 1),
        "rpo": results,
    }
    stem = started.strftime("%Y-%m-%d") + "-rpo"
    if a.quick:
        stem += "-quick"
    if kinds != list(rpo.SCENARIOS):
        stem += "-" + "+".join(kinds)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{stem}.json").write_text(json.dumps(doc, indent=1, default=str, ensure_ascii=False))
    md = report.rpo_markdown(doc)
    (a.out / f"{stem}.md").write_text(md)
    print("\n".join(report.rpo_rows(results)))
    log(f"RPO run took {doc['wall_s']} s; wrote {a.out}/{stem}.json, .md")
    fails = rpo.check(results)
    for f in fails:
        log(f"{'CHECK FAILED' if a.check or a.quick else 'note'}: {f}")
    if fails and (a.check or a.quick):
        return 1
    return 0


# Blob-service operations a no-op may make: the listings, and the existence check of the container
# it was asked to reconcile. Anything else on the blob service is a per-blob request.
NOOP_BLOB_OPS = {"Container_ListBlobFlatSegment", "Container_GetProperties"}


def check_lakeguard(results: dict, not_runnable: dict) -> list[str]:
    """What `--check` fails on: a lakeguard run that failed or left a backup wrong, or a no-op that
    made a blob request other than a listing. Peers are reported, never checked: their failures
    on the emulator are not ours to gate on."""
    out = []
    for s, per in results.items():
        r = per.get("lakeguard")
        if r is None or "not_runnable" in r:
            why = (r or {}).get("not_runnable") or not_runnable.get("lakeguard", "not selected (--tools)")
            out.append(f"scenario {s}: lakeguard did not run: {why}")
            continue
        if not r["exit_ok"]:
            out.append(f"scenario {s}: lakeguard exited with an error (logs: {r.get('logs')})")
        if not r["correctness"].get("ok"):
            out.append(f"scenario {s}: lakeguard's result is wrong: {r['correctness']}")
    noop = results.get("2", {}).get("lakeguard", {})
    extra = {op: n for op, n in noop.get("requests", {}).get("by_operation", {}).items()
             if not op.startswith(("Queue_", "Messages_", "MessageId_")) and op not in NOOP_BLOB_OPS}
    if extra:
        out.append(f"scenario 2: the no-op made per-blob requests: {extra}")
    return out


def save_partial(a, started, results: dict) -> None:
    """What has been measured so far, in case a later phase fails (a run takes an hour)."""
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"{started.strftime('%Y-%m-%d')}.partial.json"
    path.write_text(json.dumps({"started": started.isoformat(), "results": results}, indent=1, default=str))
    log(f"partial results in {path}")


def versions(paths, lg_bin) -> dict:
    def out(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except Exception as e:  # reported, not fatal
            return f"unavailable ({e.__class__.__name__})"

    v = {"azurite": setup_env.AZURITE_VERSION + f" (bench copy, {setup_env.SHIM_MARKER})", "node": out(["node", "--version"])}
    if isinstance(paths.get("azcopy"), Path):
        v["azcopy"] = out([str(paths["azcopy"]), "--version"])
    if isinstance(paths.get("rclone"), Path):
        v["rclone"] = out([str(paths["rclone"]), "version"])
    v["lakeguard"] = out([str(lg_bin), "--version"]) if Path(lg_bin).exists() else "not built"
    import azure.storage.blob as asb

    v["azure-storage-blob (reference)"] = asb.__version__
    return v


if __name__ == "__main__":
    sys.exit(main())
