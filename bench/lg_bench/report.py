"""Markdown table, PNG chart and console summary from one results document."""

from __future__ import annotations

from pathlib import Path

PEERS = ("azcopy", "rclone", "reference")


def ratios(doc: dict) -> dict:
    """lakeguard / peer, per scenario: wall time and requests (< 1 means lakeguard is better)."""
    out = {}
    for s, per in doc["results"].items():
        lg = per.get("lakeguard")
        if not lg or "not_runnable" in lg:
            continue
        row = {}
        for p in PEERS:
            r = per.get(p)
            if not r or "not_runnable" in r:
                continue
            row[p] = {
                "wall": round(lg["wall_s"] / r["wall_s"], 2) if r["wall_s"] else None,
                "requests": round(lg["requests"]["total"] / r["requests"]["total"], 2) if r["requests"]["total"] else None,
            }
        if s == "2" and doc.get("floor"):
            f = doc["floor"]["plain"]["wall_s"]
            row["floor"] = {"wall": round(lg["wall_s"] / f, 2) if f else None}
        out[s] = row
    return out


def _ops(r: dict, top: int = 4) -> str:
    ops = sorted(r["requests"]["by_operation"].items(), key=lambda kv: -kv[1])
    s = ", ".join(f"{k} {v}" for k, v in ops[:top])
    if len(ops) > top:
        s += f", +{sum(v for _, v in ops[top:])} other"
    return s or "-"


def _queue_share(r: dict) -> str:
    q = r["azurite_cpu_s"] - r.get("azurite_blob_cpu_s", r["azurite_cpu_s"])
    return f" ({q:.1f} queue)" if q >= 0.5 else ""


def _wall(r: dict) -> str:
    rounds = r.get("rounds")
    if not rounds:
        return f"{r['wall_s']:.2f}"
    walls = sorted(x["wall_s"] for x in rounds)
    return f"{r['wall_s']:.2f} (median of {len(walls)}: {walls[0]:.2f}-{walls[-1]:.2f})"


def _correct(r: dict) -> str:
    c = r.get("correctness", {})
    lost = c.get("history_destroyed_by_setup")
    lost_note = f"; {lost} whose history scenario 4 deleted, correctly not restored" if lost else ""
    if c.get("ok"):
        return f"yes ({c.get('verified_equal')}/{c.get('source_blobs')}{lost_note})"
    # A row of several rounds shows the median round's numbers but is wrong if any round was:
    # name the round(s), so the reader does not pin the failure on the median one.
    rounds = r.get("rounds") or []
    bad = [str(i + 1) for i, x in enumerate(rounds) if not (x.get("correct") and x.get("exit_ok"))]
    where = f" in round {', '.join(bad)} of {len(rounds)}" if bad else ""
    if "error" in c:
        return f"**NO**{where}: {c['error']}"
    return f"**NO**{where}: {c.get('missing')} missing, {c.get('wrong_content')} wrong of {c.get('source_blobs')}"


def markdown(doc: dict, png_name: str) -> str:
    d = doc["data"]
    L = [
        f"# lakeguard benchmark — {doc['started'][:19]}Z ({doc['mode']} mode)",
        "",
        f"Data: {d['small']} small blobs (1-4 KiB) + {d['large']} of 8 MiB (seed {d['seed']}); "
        f"1% = {d['changed']} blobs changed in scenario 3; backup blobs deleted in scenario 4: {d['backup_deleted']}.",
        f"Machine: {doc['machine']['cpus']} CPUs, {doc['machine']['platform']}; load average at end "
        f"{', '.join(f'{x:.1f}' for x in doc['machine']['loadavg_at_end'])}.",
        "Versions: " + "; ".join(f"{k} {v}" for k, v in doc["versions"].items()) + ".",
        "",
        "Requests are counted from Azurite's access log; Azurite's own requests (its HEAD of the source "
        "of a cross-account copy) are excluded and shown as 'self'. *Bottleneck* = Azurite's blob "
        "service CPU >= 80% of the wall time (it is single-threaded). Azurite CPU is blob + queue "
        "service; the queue's share is in parentheses when it matters (Azurite's in-memory queue "
        "scans every message of the queue on each operation, so a deep queue costs it seconds).",
        "",
    ]
    if d.get("repeat", 1) > 1:
        # Results written before scenario 4 had rounds carry one deletion count per tool.
        s4_rounds = any(isinstance(v, list) for v in d["backup_deleted"].values())
        L += [
            (f"Scenarios 2, 3 and 4 and the floor ran in {d['repeat']} rounds (tools in rotating order; "
             "every round of scenario 3 rewrites another seeded 1%, every round of scenario 4 deletes "
             "another seeded 1% of each tool's backups)" if s4_rounds else
             f"Scenarios 2 and 3 and the floor ran in {d['repeat']} rounds (tools in rotating order; every "
             "round of scenario 3 rewrites another seeded 1%)")
            + ": the row shows the median round, min-max beside it, and the ratios compare medians. The "
            "same command on the same data varies by tens of percent on this emulator."
            + ("" if s4_rounds else " Scenario 4 ran once: its set-up (deleting 1% of every tool's "
               "backups with their snapshots) costs Azurite about a second per blob at this size."),
            "",
        ]
    if doc["not_runnable"]:
        L.append("**Not runnable in this run:** " + "; ".join(f"{k}: {v}" for k, v in doc["not_runnable"].items()))
        L.append("")
    L += [
        "| scenario | tool | wall s | Azurite CPU s | bottleneck | requests (self) | main operations | tool CPU s | peak RSS MiB | correct |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s, per in doc["results"].items():
        for t, r in per.items():
            title = doc["scenarios"][s] if s in doc["scenarios"] else doc["scenarios"][int(s)]
            if "not_runnable" in r:
                L.append(f"| {s}. {title} | {t} | not runnable: {r['not_runnable']} | | | | | | | |")
                continue
            ok = "" if r["exit_ok"] else " (exit≠0)"
            L.append(
                f"| {s}. {title} | {t}{ok} | {_wall(r)} | "
                f"{r['azurite_cpu_s']:.2f}{_queue_share(r)} | {'**yes**' if r['azurite_bottleneck'] else 'no'} | "
                f"{r['requests']['total']} ({r['requests']['azurite_self_requests_excluded']}) | {_ops(r)} | "
                f"{r['tool_cpu_s']:.2f} | {r['tool_peak_rss_mib']} | {_correct(r)} |"
            )
    f = doc.get("floor")
    if f:
        L += [
            "",
            f"**Floor** (bare flat listings of `{f['containers'][0]}` in the source and `{f['containers'][1]}` "
            f"in the backup account, raw HTTP, one after the other): plain {f['plain']['wall_s']:.2f} s"
            + (f" (median of {len(f['plain']['rounds_wall_s'])}: {min(f['plain']['rounds_wall_s']):.2f}-{max(f['plain']['rounds_wall_s']):.2f})"
               if f["plain"].get("rounds_wall_s") else "")
            + f" / {f['plain']['requests']['total']} requests "
            f"/ Azurite CPU {f['plain']['azurite_cpu_s']:.2f} s; with include=snapshots,metadata "
            f"{f['with_snapshots_metadata']['wall_s']:.2f} s / {f['with_snapshots_metadata']['requests']['total']} requests.",
        ]
    rat = doc.get("ratios") or {}
    if rat:
        L += ["", "## Ratios lakeguard / peer (wall time; requests) — below 1 means lakeguard is better", "",
              "| scenario | vs azcopy | vs rclone | vs reference | vs floor |", "|---|---|---|---|---|"]
        for s, row in rat.items():
            cells = []
            for p in (*PEERS, "floor"):
                v = row.get(p)
                if not v:
                    cells.append("-")
                elif p == "floor":
                    cells.append(f"{v['wall']}")
                else:
                    cells.append(f"{v['wall']}; {v['requests']}")
            L.append(f"| {s} | " + " | ".join(cells) + " |")
    else:
        L += ["", "No lakeguard/peer ratios: lakeguard did not run (see above)."]
    rss = doc.get("rss_scaling")
    if rss:
        L += ["", f"## RSS scaling ({rss.get('tool')})", ""]
        if "runs" in rss:
            if rss.get("passes"):
                L.append(f"Passes per size: {'; '.join(rss['passes'])}.")
                L.append("")
            for r in rss["runs"]:
                times = ", ".join(f"{k} {v['wall_s']} s / {v['tool_peak_rss_mib']} MiB"
                                  for k, v in r.items() if isinstance(v, dict) and "wall_s" in v)
                L.append(f"- {r['blobs']} blobs: peak RSS {r['peak_rss_mib']} MiB ({times})")
            L.append(f"- growth {rss['growth']}x: {'PASS' if rss['pass'] else 'FAIL'} (must stay below 5x)")
        else:
            L.append(f"- not run: {rss.get('not_runnable')}")
    L += ["", f"![chart]({png_name})", ""]
    return "\n".join(L)


def chart(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = {s: {t: r for t, r in per.items() if "not_runnable" not in r} for s, per in doc["results"].items()}
    scen = [s for s in res if res[s]]
    tools = []
    for s in scen:
        for t in res[s]:
            if t not in tools:
                tools.append(t)
    if not scen:
        return
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 8))
    w = 0.8 / max(1, len(tools))
    for i, t in enumerate(tools):
        xs = [j + i * w for j, s in enumerate(scen) if t in res[s]]
        walls = [res[s][t]["wall_s"] for s in scen if t in res[s]]
        azc = [res[s][t]["azurite_cpu_s"] for s in scen if t in res[s]]
        reqs = [max(1, res[s][t]["requests"]["total"]) for s in scen if t in res[s]]
        bars = ax1.bar(xs, walls, w, label=t)
        ax1.bar(xs, azc, w * 0.35, color="black", alpha=0.45)
        for x, s in zip(xs, [s for s in scen if t in res[s]]):
            if not res[s][t]["correctness"].get("ok"):
                ax1.text(x, res[s][t]["wall_s"], "WRONG", ha="center", va="bottom", fontsize=7, color="red", rotation=90)
        ax2.bar(xs, reqs, w, label=t, color=bars[0].get_facecolor())
    labels = [f"{s}. {doc['scenarios'].get(s) or doc['scenarios'].get(int(s))}" for s in scen]
    for ax in (ax1, ax2):
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(scen))])
        ax.set_xticklabels([l if len(l) < 28 else l[:26] + "…" for l in labels], fontsize=8)
    if doc.get("floor"):
        ax1.axhline(doc["floor"]["plain"]["wall_s"], color="grey", ls="--", lw=1, label="floor (flat listings)")
    ax1.set_ylabel("wall time, s (black: Azurite CPU s)")
    ax1.legend(fontsize=8)
    d = doc["data"]
    ax1.set_title(f"lakeguard benchmark, {d['small']}+{d['large']} blobs ({doc['mode']}), {doc['started'][:16]}Z")
    ax2.set_yscale("log")
    ax2.set_ylabel("requests (Azurite self-requests excluded)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(doc: dict) -> str:
    L = ["", "=== summary ==="]
    for s, per in doc["results"].items():
        for t, r in per.items():
            if "not_runnable" in r:
                L.append(f"{s} {t:10s} not runnable: {r['not_runnable']}")
                continue
            L.append(
                f"{s} {t:10s} wall {r['wall_s']:8.2f}s  req {r['requests']['total']:7d}  Azurite CPU {r['azurite_cpu_s']:7.2f}s"
                f"{' [Azurite-bound]' if r['azurite_bottleneck'] else ''}  correct={r['correctness'].get('ok')}"
            )
    if doc.get("ratios"):
        L.append("ratios lakeguard/peer (wall; requests):")
        for s, row in doc["ratios"].items():
            L.append(f"  {s}: " + ", ".join(f"{p} {v.get('wall')}" + (f"; {v['requests']}" if "requests" in v else "") for p, v in row.items()))
    else:
        why = doc["not_runnable"].get("lakeguard", "not selected (--tools)")
        L.append(f"no lakeguard/peer ratios: lakeguard did not run: {why}")
    return "\n".join(L)


# --- RPO benchmark (lg_bench/rpo.py) -----------------------------------------------------------------
def _s(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def rpo_rows(results: dict) -> list[str]:
    L = ["| path | rate /s (achieved) | changes | backed up | superseded | never backed up | median s | p99 s | max s | Azurite CPU s |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for kind, r in results.items():
        if "error" in r:
            L.append(f"| {r['title']} | failed: {r['error']} | | | | | | | | |")
            continue
        lat = r["latency_s"]
        late = f" ({r['backed_up_after_overwrite']} after an overwrite)" if r["backed_up_after_overwrite"] else ""
        never = f"**{r['never_backed_up']}**" if r["never_backed_up"] else "0"
        L.append(
            f"| {r['title']} | {r['rate_target']:g} ({r['rate_achieved']}) | {r['changes']} | {r['backed_up']}{late} "
            f"| {r['superseded']} | {never} | {_s(lat['median'])} | {_s(lat['p99'])} | {_s(lat['max'])} "
            f"| {r['azurite_cpu_s']:.1f} |"
        )
    return L


def rpo_markdown(doc: dict) -> str:
    o = doc["options"]
    L = [
        f"# lakeguard RPO benchmark — {doc['started'][:19]}Z ({doc['mode']} mode)",
        "",
        f"Machine: {doc['machine']['cpus']} CPUs, {doc['machine']['platform']}; load average at end "
        f"{', '.join(f'{x:.1f}' for x in doc['machine']['loadavg_at_end'])}. lakeguard: {doc['versions'].get('lakeguard')} "
        f"({doc['lakeguard_binary']}). Azurite {doc['versions'].get('azurite')}.",
        "",
        f"A writer changes ~1 KiB blobs (half new names, half overwrites) at the rate for {o['seconds']:g} s while "
        "`lakeguard serve` runs behind a Python emulation of the Functions host (queue triggers per host.json: "
        f"batch {o['host_queues']['batch']}, newBatchThreshold {o['host_queues']['threshold']}, empty-queue back-off "
        f"100 ms to {o['host_queues']['max_poll_s']:g} s; one instance). Latency = from Put Blob's answer to the "
        f"first listing of the backup container (include=metadata,snapshots, every {o['poll']:g} s) that shows "
        "the version's `lakeguard_source_etag`. *Superseded* = overwritten and never backed up (not counted in "
        "the latency); *never backed up* = a name's last version still missing after the drain. Producer every "
        f"{o['producer_every']:g} s, Reconcile timer every {o['reconcile_every']:g} s. Event path: the events are "
        "put on the queue by the writer right after each write (Event Grid cannot run here); **Event Grid's own "
        "delivery latency is not included**.",
        "",
        *rpo_rows(doc["rpo"]),
        "",
    ]
    ev = doc["rpo"].get("event")
    if ev and "error" not in ev and ev["rate_target"] >= 50:
        p99_ok = ev["latency_s"]["p99"] is not None and ev["latency_s"]["p99"] < 60 and not ev["never_backed_up"]
        rate_ok = (ev["rate_achieved"] or 0) >= 0.95 * 50
        verdict = "met" if p99_ok and rate_ok else ("NOT met" if not p99_ok else
                                                    "not shown: the writer did not reach 50 changes/s")
        L.append(f"Goal (event path, p99 < 60 s at 50 changes/s): **{verdict}** "
                 f"(p99 {_s(ev['latency_s']['p99'])} s at {ev['rate_achieved']} changes/s achieved).")
        L.append("")
    for kind, r in doc["rpo"].items():
        if "error" in r:
            continue
        fns = "; ".join(f"{f} {s['succeeded']} ok / {s['failed']} failed / {s['poisoned']} poisoned"
                        for f, s in r["functions"].items() if s["invocations"])
        per = r.get("periodic")
        calls = ""
        if per:
            c = per["calls"]
            calls = (f"; {per['function']} called {len(c)} times, statuses "
                     f"{sorted({x['status'] for x in c})}, longest {max((x['took_s'] for x in c), default=0):.1f} s")
        L.append(f"- {r['title']}: invocations: {fns or 'none'}{calls}; watcher {r['watcher']['polls']} listings "
                 f"(median {r['watcher']['listing_s_median']} s); writer late on {r['writer_late']['count']} changes "
                 f"(max {r['writer_late']['max_s']} s); drained in {r['drained_s']} s (limit {r['drain_limit_s']} s); "
                 f"{r['requests']['total']} requests"
                 + (f"; left on the queues when the drain ended: {r['left_on_queues_at_drain_end']}"
                    if r.get("left_on_queues_at_drain_end") else "") + ".")
        w = r.get("latency_by_10s_of_writing")
        if w:
            L.append("  median latency by 10 s of writing: " + ", ".join(f"{x['from_s']}s: {_s(x['median'])}" for x in w))
    L.append("")
    return "\n".join(L)
