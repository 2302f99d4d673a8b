"""Markdown table of corekv-bench JSON lines: etcd gRPC, corekv gRPC and native per
workload, with each corekv figure as a ratio of etcd's req/s in the same run.
Usage: ratio_table.py RESULTS.json [WORKLOAD-COLUMN-TITLE]"""
import json, sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
title = sys.argv[2] if len(sys.argv) > 2 else "workload"

def cell(r):
    return (f"{r['qps']:,.0f}/s, p50 {r['p50_ms']:.2f}, p99 {r['p99_ms']:.2f}, "
            f"p99.9 {r['p999_ms']:.2f}, max {r['max_ms']:.1f}"
            + (f" ({r['errors']} errors)" if r['errors'] else ""))

print(f"| {title} | clients / conns | etcd gRPC | corekv gRPC | ratio | corekv native | ratio |")
print("|---|---|---|---|---|---|---|")
keys = []
for r in rows:
    k = (r["workload"], r["clients"], r["conns"])
    if k not in keys:
        keys.append(k)
for k in keys:
    got = {(r["server"], r["api"]): r for r in rows if (r["workload"], r["clients"], r["conns"]) == k}
    e, g, n = got.get(("etcd", "grpc")), got.get(("corekv", "grpc")), got.get(("corekv", "native"))
    ratio = lambda x: f"{x['qps'] / e['qps']:.2f}×" if e and x else "-"
    show = lambda x: cell(x) if x else "-"
    print(f"| {k[0]} | {k[1]} / {k[2]} | {show(e)} | {show(g)} | {ratio(g)} | {show(n)} | {ratio(n)} |")
print()
print("Latencies in ms (hdrhistogram); ratio = req/s against etcd in this run.")
