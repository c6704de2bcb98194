"""What a run leaves behind: the results dict and its JSON file (written whatever happens),
and the tables printed at the end of each mode. The printers are pure over the results."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import faiss
import numpy as np
import orjson
from bench_common import OPT_NP, K, temp_dir
from bench_data import Dataset
from bench_load import PointResult

SHARE_NOTE = (
    "all nodes and the client share this machine's {cpus} core(s): the N-node figures show the "
    "overhead of fan-out (coordination, peer HTTP, merging), not scale-out"
)


# ---------------------------------------------------------------------------------------
# Results and JSON
# ---------------------------------------------------------------------------------------
def environment() -> dict[str, Any]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 0
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": affinity,
        "python": platform.python_version(),
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "aiohttp": aiohttp.__version__,
        "platform": platform.platform(),
        "note": f"client and server share the same {affinity} core(s)",
        # Other work on the machine skews every figure: the 1, 5, 15-minute load at the start.
        "loadavg_start": list(os.getloadavg()),
    }


def new_results(args: argparse.Namespace, ds: Dataset) -> dict[str, Any]:
    """The head of every results file: when, the arguments, the data set, the machine."""
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "dataset": {
            "name": ds.name,
            "n": ds.n,
            "dim": ds.dim,
            "queries": args.queries,
            "synthetic": ds.synthetic,
            "notes": ds.notes,
        },
        "environment": environment(),
    }


def run_and_record(
    args: argparse.Namespace, results: dict[str, Any], body: Callable[[Path], None]
) -> int:
    """body(tmp) in a fresh temporary directory; an error is recorded in results (and on
    stderr) rather than raised, and results go to args.out whatever happens. Exit status."""
    status = 0
    t0 = time.perf_counter()
    with temp_dir(args.keep) as tmp:
        try:
            body(tmp)
        # NodeFailed is a RuntimeError.
        except (TimeoutError, RuntimeError, aiohttp.ClientError) as exc:
            results["error"] = f"{type(exc).__name__}: {exc}"
            print(f"bench: {results['error']}", file=sys.stderr)
            status = 1
        except KeyboardInterrupt:
            results["error"] = "interrupted"
            status = 130
        finally:
            results["wall_s"] = time.perf_counter() - t0
            results["environment"]["loadavg_end"] = list(os.getloadavg())
            args.out.write_bytes(
                orjson.dumps(results, option=orjson.OPT_INDENT_2 | OPT_NP | orjson.OPT_NON_STR_KEYS)
            )
    return status


# ---------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------
def fmt_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([line, sep, *body])


def main_table(
    nprobes: list[int],
    rest: list[PointResult],
    faiss_res: list[dict[str, Any]],
    index_name: str,
    conc: list[int],
) -> str:
    by = {(r.nprobe, r.concurrency): r for r in rest}
    fz = {f["nprobe"]: f for f in faiss_res if f["index"] == index_name}
    cmax = max(conc)
    headers = ["nprobe", "recall REST"]
    headers += [f"qps REST c={c}" for c in conc]
    headers += [
        "recall FAISS",
        "qps FAISS batch",
        "qps FAISS 16thr",
        f"c{cmax}/batch",
        f"c{cmax}/16thr",
    ]
    rows = []
    for p in nprobes:
        r = by.get((p, cmax)) or by.get((p, conc[0]))
        f = fz.get(p)
        row = [str(p), f"{r.recall:.4f}" if r else "-"]
        row += [f"{by[(p, c)].qps:,.0f}" if (p, c) in by else "-" for c in conc]
        if f is not None and (p, cmax) in by:
            q = by[(p, cmax)].qps
            row += [
                f"{f['recall']:.4f}",
                f"{f['qps_batched']:,.0f}",
                f"{f['qps_threads']:,.0f}",
                f"{q / f['qps_batched']:.3f}",
                f"{q / f['qps_threads']:.3f}",
            ]
        else:
            row += ["-"] * 5
        rows.append(row)
    return fmt_table(headers, rows)


def report(args: argparse.Namespace, ds: Dataset, results: dict[str, Any]) -> None:
    env = results["environment"]
    print()
    print("=" * 100)
    print(
        f"Aquila benchmark — {ds.name}: {ds.n:,} × {ds.dim}, cosine, {args.shards} shards ivf_flat"
    )
    if ds.synthetic:
        print("*** SYNTHETIC DATA: these figures are not for the real embedding set ***")
    print(
        f"Machine: {env['cpus_usable']} usable core(s) — the client, the server and FAISS share them."
    )
    for n in ds.notes:
        print(f"Note: {n}")
    if "ingest" in results:
        i = results["ingest"]
        print(
            f"Ingest (fsync on, batch {i['batch']}, {i['uploaders']} uploaders): "
            f"{i['docs_per_s']:,.0f} docs/s ({i['seconds']:.1f}s; server CPU {i['server_cpu_s']:.1f}s)"
        )
    if "training" in results:
        t = results["training"]
        nls = sorted({v["nlist"] for v in t["node_nlists"].values()})
        print(
            f"All shards trained {t['seconds_after_ingest']:.1f}s after the last ingest ack "
            f"(node index nlist: {nls})"
        )
    rest = [PointResult(**r) for r in results.get("rest", [])]
    faiss_res = results.get("faiss", [])
    names = list(dict.fromkeys(f["index"] for f in faiss_res))
    if rest:
        print(
            f"\nREST: one query per request, k={K}, {args.queries} queries per point. "
            "nprobe is per shard on the node; per index for FAISS."
        )
        for name in names or [""]:
            print(f"\nvs {name}:")
            print(main_table(args.nprobe, rest, faiss_res, name, args.concurrency))
        print("\nREST latency (ms):")
        rows = [
            [
                str(r.nprobe),
                str(r.concurrency),
                f"{r.lat_p50_ms:.1f}",
                f"{r.lat_p95_ms:.1f}",
                f"{r.lat_p99_ms:.1f}",
                f"{r.server_took_ms_p50:.2f}",
                f"{r.server_cpu_s / r.seconds:.2f}",
                f"{r.client_cpu_s / r.seconds:.2f}",
            ]
            for r in rest
        ]
        print(
            fmt_table(
                ["nprobe", "c", "p50", "p95", "p99", "took p50", "srv cores", "cli cores"], rows
            )
        )
    if "restart" in results:
        g, k = results["restart"]["sigterm"], results["restart"]["sigkill"]
        print(
            f"\nRestart holding {ds.n:,} docs: SIGTERM stop {g['stop_s']:.2f}s, start→ready "
            f"{g['start_to_ready_s']:.2f}s, start→first search {g['start_to_first_search_s']:.2f}s"
        )
        print(
            f"                      SIGKILL (after re-upserting {k['rewritten_before_kill']:,}): "
            f"start→ready {k['start_to_ready_s']:.2f}s, start→first search "
            f"{k['start_to_first_search_s']:.2f}s, recall@10 nprobe=16 after "
            f"{k['recall_nprobe16_after']:.4f}"
        )
    prof = results.get("profile")
    if prof and "self" in prof:
        print(
            f"\npy-spy, server during c={prof['concurrency']} nprobe={prof['nprobe']} "
            f"({prof['samples']} samples): top self frames"
        )
        for f in prof["self"][:12]:
            print(f"  {f['pct']:5.1f}%  {f['frame']}")
        print("  event-loop thread (MainThread) self frames:")
        for f in prof["main_thread_self"][:8]:
            print(f"  {f['pct']:5.1f}%  {f['frame']}")
        cores = ", ".join(f"{k} {v:.2f}" for k, v in list(prof["thread_cpu_cores"].items())[:8])
        print(f"  CPU cores used per server thread (/proc): {cores}")
    print(f"\nAll figures: {args.out.resolve()}")


def report_cluster(args: argparse.Namespace, ds: Dataset, results: dict[str, Any]) -> None:
    res = results.get("cluster")
    if not res or len(res.get("runs", [])) < 1:
        return
    runs = res["runs"]
    a, b = runs[0], runs[-1]
    na, nb = a["nodes"], b["nodes"]
    print()
    print("=" * 100)
    print(
        f"Aquila 1 vs {nb} nodes — {ds.name}: {ds.n:,} × {ds.dim}, cosine, {args.shards} shards "
        f"ivf_flat, replication {b.get('collection', {}).get('replication', '?')}; "
        f"{args.queries} queries per point, one per request, round-robin over the nodes"
    )
    print(f"Network: {results['network']}")
    print("Note: " + SHARE_NOTE.format(cpus=results["environment"]["cpus_usable"]))
    for r in runs:
        if "ingest" in r:
            print(
                f"{r['nodes']} node(s): ingest {r['ingest']['docs_per_s']:,.0f} docs/s; "
                f"placement {r.get('placement', {})}"
            )
    def key(p: dict[str, Any]) -> tuple[str, float, int]:
        return p.get("mode", "nprobe"), p.get("target", p["nprobe"]), p["concurrency"]

    pa = {key(p): p for p in a.get("points", [])}
    pb = {key(p): p for p in b.get("points", [])}
    rows = []
    for k in pa:
        x, y = pa[k], pb.get(k)
        if y is None:
            continue
        rows.append(
            [
                f"{k[0]} {k[1]:g}",
                str(k[2]),
                f"{x['recall']:.4f}",
                f"{y['recall']:.4f}",
                f"{x['qps']:,.0f}",
                f"{y['qps']:,.0f}",
                f"{y['qps'] / x['qps']:.2f}",
                f"{x['lat_p50_ms']:.2f}",
                f"{y['lat_p50_ms']:.2f}",
                f"{x['lat_p99_ms']:.1f}",
                f"{y['lat_p99_ms']:.1f}",
                f"{cpu_ms(x):.2f}",
                f"{cpu_ms(y):.2f}",
                f"{cpu_ms(y) / cpu_ms(x):.2f}",
                f"{x['failures']}/{y['failures']}",
            ]
        )
    h = [
        "search",
        "c",
        f"recall {na}n",
        f"recall {nb}n",
        f"q/s {na}n",
        f"q/s {nb}n",
        f"{nb}n/{na}n",
        f"p50 {na}n",
        f"p50 {nb}n",
        f"p99 {na}n",
        f"p99 {nb}n",
        f"cpu {na}n",
        f"cpu {nb}n",
        "ratio",
        "fail",
    ]
    print("\nLatency in ms; cpu = CPU ms of all node processes per query answered")
    print(fmt_table(h, rows))
    summary = fanout_summary(pa, pb)
    res["summary"] = summary
    for line in summary_lines(summary, na, nb):
        print(line)
    batch_lines(a, res.get("faiss_batches"))
    env = results["environment"]
    print(f"Machine load (1/5/15 min): start {env.get('loadavg_start')}, "
          f"end {env.get('loadavg_end')}")
    for r in runs:
        if r.get("log_warnings"):
            print(f"{r['nodes']} node(s): {len(r['log_warnings'])} WARNING/ERROR log line(s), e.g.")
            for ln in r["log_warnings"][:3]:
                print(f"    {ln[:200]}")


def cpu_ms(p: dict[str, Any]) -> float:
    """CPU milliseconds of all node processes per query answered."""
    return float(p["server_cpu_s"]) * 1000 / max(1, int(p["ok"]))


def cpu_net_ms(p: dict[str, Any]) -> float:
    """The same, less what the nodes burn idle (gossip, timers) over the point's time."""
    idle = float(p.get("idle_cores", 0.0)) * float(p["seconds"])
    return max(0.0, float(p["server_cpu_s"]) - idle) * 1000 / max(1, int(p["ok"]))


def fanout_summary(
    pa: dict[tuple[str, float, int], dict[str, Any]],
    pb: dict[tuple[str, float, int], dict[str, Any]],
) -> list[dict[str, Any]]:
    """Per way of searching (an nprobe, a target recall): the issue's figures, p50 at the
    lowest concurrency and what fan-out adds to it, q/s at the highest and their ratio, and CPU
    per query (of the lowest concurrency: nothing queues there) and its ratio."""
    out = []
    for mode, target in dict.fromkeys((m, t) for m, t, _ in pa):
        cs = sorted(c for m, t, c in pa if (m, t) == (mode, target) and (m, t, c) in pb)
        if not cs:
            continue
        lo, hi = (mode, target, cs[0]), (mode, target, cs[-1])
        out.append({
            "mode": mode, "target": target, "c_low": cs[0], "c_high": cs[-1],
            "recall_1": pa[lo]["recall"], "recall_n": pb[lo]["recall"],
            "p50_1_ms": pa[lo]["lat_p50_ms"], "p50_n_ms": pb[lo]["lat_p50_ms"],
            "p50_added_ms": pb[lo]["lat_p50_ms"] - pa[lo]["lat_p50_ms"],
            "qps_1": pa[hi]["qps"], "qps_n": pb[hi]["qps"],
            "qps_ratio": pb[hi]["qps"] / pa[hi]["qps"],
            "cpu_ms_1": cpu_ms(pa[lo]), "cpu_ms_n": cpu_ms(pb[lo]),
            "cpu_ratio": cpu_ms(pb[lo]) / cpu_ms(pa[lo]),
            "cpu_ms_1_high": cpu_ms(pa[hi]), "cpu_ms_n_high": cpu_ms(pb[hi]),
            "cpu_net_ms_1": cpu_net_ms(pa[lo]), "cpu_net_ms_n": cpu_net_ms(pb[lo]),
            "cpu_net_ms_1_high": cpu_net_ms(pa[hi]), "cpu_net_ms_n_high": cpu_net_ms(pb[hi]),
        })
    return out


def summary_lines(summary: list[dict[str, Any]], na: int, nb: int) -> list[str]:
    lines = [f"\nFan-out, {na} vs {nb} nodes (goals: added p50 <= 0.4 ms, q/s ratio >= 0.6, "
             "CPU ratio <= 2):"]
    for x in summary:
        lines.append(
            f"  {x['mode']} {x['target']:g}: recall {x['recall_1']:.4f} / {x['recall_n']:.4f}; "
            f"p50 at c={x['c_low']} {x['p50_1_ms']:.2f} / {x['p50_n_ms']:.2f} ms "
            f"(+{x['p50_added_ms']:.2f}); q/s at c={x['c_high']} {x['qps_1']:,.0f} / "
            f"{x['qps_n']:,.0f} ({x['qps_ratio']:.2f}x); CPU per query at c={x['c_low']} "
            f"{x['cpu_ms_1']:.2f} / {x['cpu_ms_n']:.2f} ms ({x['cpu_ratio']:.2f}x), at "
            f"c={x['c_high']} {x['cpu_ms_1_high']:.2f} / {x['cpu_ms_n_high']:.2f} ms "
            f"({x['cpu_ms_n_high'] / x['cpu_ms_1_high']:.2f}x); less idle CPU: "
            f"{x['cpu_net_ms_1']:.2f} / {x['cpu_net_ms_n']:.2f} ms "
            f"({x['cpu_net_ms_n'] / max(1e-9, x['cpu_net_ms_1']):.2f}x) at c={x['c_low']}, "
            f"{x['cpu_net_ms_1_high']:.2f} / {x['cpu_net_ms_n_high']:.2f} ms "
            f"({x['cpu_net_ms_n_high'] / max(1e-9, x['cpu_net_ms_1_high']):.2f}x) at "
            f"c={x['c_high']}"
        )
    return lines


def batch_lines(one: dict[str, Any], ref: dict[str, Any] | None) -> None:
    """The 1-node batch figure beside FAISS in-process (same nlist, nprobe, batches)."""
    batches = one.get("batches") or []
    if not batches:
        return
    print(f"\nOne node, {batches[0]['per_request']} query vectors per request, nprobe "
          f"{batches[0]['nprobe']} (goal: >= 0.7x in-process FAISS batch throughput):")
    for b in batches:
        line = (f"  node c={b['concurrency']}: {b['qps']:,.0f} q/s, recall {b['recall']:.4f}, "
                f"CPU {b['server_cpu_ms_per_query']:.3f} ms/query")
        if ref:
            faiss_qps = ref["qps_1_thread"] if b["concurrency"] == 1 else ref["qps_all_cores"]
            which = "1 thread" if b["concurrency"] == 1 else "all cores"
            line += f"; FAISS ({which}) {faiss_qps:,.0f} q/s: {b['qps'] / faiss_qps:.2f}x"
            faiss_cpu = ref.get("cpu_ms_per_query_1_thread")
            if faiss_cpu:
                net = b.get("server_cpu_net_ms_per_query") or b["server_cpu_ms_per_query"]
                line += (f"; FAISS CPU {faiss_cpu:.3f} ms/query: node/FAISS throughput per "
                         f"CPU second {faiss_cpu / b['server_cpu_ms_per_query']:.2f}x "
                         f"({faiss_cpu / max(1e-9, net):.2f}x less the node's idle CPU, "
                         f"{b.get('idle_cores', 0.0):.3f} cores)")
        print(line)
    if ref:
        print(f"  FAISS IVF{ref['nlist']} (the node's nlist, trained on its first "
              f"{ref['trained_on']:,}) recall {ref['recall']:.4f}")


def report_rebalance(results: dict[str, Any], concurrency: int) -> None:
    """concurrency: of the search load during the rebalance (not in the results)."""
    r = results.get("rebalance")
    if not r or "before" not in r:
        return
    print()
    print("=" * 100)
    spec = r["collection"]
    n = results["dataset"]["n"]
    print(
        f"Rebalance 3 → 4 nodes — {results['dataset']['name']}: {n:,} × "
        f"{results['dataset']['dim']}, {spec['shards']} shards, replication {spec['replication']}, "
        f"{spec['index']['type']}, train_min {r['train_min']}"
    )
    print(f"Network: {results['network']}")
    print("Note: " + SHARE_NOTE.format(cpus=results["environment"]["cpus_usable"]))
    print(f"Placement before: {r['placement_before']}")
    print(f"Placement after:  {r['placement_after']}  (count after {r['count_after']:,})")
    print(
        f"Moves: {len(r['moves'])}; documents moved {r['documents_moved']:,} in "
        f"{r['elapsed_s']:.1f}s (POST → map final): {r['docs_per_s']:,.0f} docs/s, "
        f"{r['mb_per_s']:.2f} MB/s at {r['bytes_per_doc']:.0f} B/doc "
        f"({results['dataset']['dim']}×4 + {r['avg_metadata_bytes']:.0f} metadata)"
    )
    w = r["watch"]
    rows = []
    for m in r["moves"]:
        s = int(m["shard"])
        fm, sw = w["first_seen_moving_s"].get(s), w["seen_switched_s"].get(s)
        rows.append(
            [
                str(s),
                str(m["from"]),
                str(m["to"]),
                f"{r['shard_counts_before'].get(s, 0):,}",
                "-" if fm is None else f"{fm:.1f}",
                "-" if sw is None else f"{sw:.1f}",
                "-" if fm is None or sw is None else f"{sw - fm:.1f}",
            ]
        )
    print("\nPer move (seconds after the POST, as seen by polling GET /v1/cluster/shards):")
    print(fmt_table(["shard", "from", "to", "docs", "moving", "switched", "took"], rows))
    print(f"Polls by number of shards shown moving: {w['polls_by_moving_count']}")
    print(
        f"\nSearches, concurrency {concurrency} round-robin over n1..n3, nprobe "
        f"{r['nprobe']}, k=10 (latency ms):"
    )
    rows = []
    for phase in ("before", "during", "after"):
        x = r[phase]
        rows.append(
            [
                phase,
                f"{x['seconds']:.1f}",
                f"{x['ok']:,}",
                str(x["failures"]),
                str(x["partial"]),
                f"{x['qps']:,.0f}",
                f"{x['lat_p50_ms']:.1f}",
                f"{x['lat_p99_ms']:.1f}",
                f"{x['lat_max_ms']:.0f}",
                f"{x['recall']:.4f}",
            ]
        )
    print(
        fmt_table(
            ["phase", "s", "ok", "failed", "partial", "q/s", "p50", "p99", "max", "recall@10"],
            rows,
        )
    )
    for phase in ("before", "during", "after"):
        if r[phase]["errors"]:
            print(f"  {phase} errors: {r[phase]['errors']}")
    if r.get("log_warnings"):
        print(f"{len(r['log_warnings'])} WARNING/ERROR log line(s), last ones:")
        for ln in r["log_warnings"][-5:]:
            print(f"    {ln[:220]}")
