#!/usr/bin/env python3
"""Summarize a kvslim_bench JSON run as the Markdown tables of bench/README.md.

    kvslim_bench --benchmark_repetitions=3 --benchmark_out=run.json --benchmark_out_format=json
    python3 bench/report.py run.json

Attention rows use the fastest repetition (the `_min` aggregate) and compute bytes/s from
kv_bytes; roofline and codec rows use the median. Ratios are times of the same run. Any
subset of rows works (a --benchmark_filter run): missing kinds leave their tables or cells
out.
"""
import json
import re
import sys
from collections import defaultdict


def load(path):
    with open(path) as f:
        data = json.load(f)
    rows = defaultdict(dict)  # run_name -> {aggregate or "iteration": entry}
    for b in data.get("benchmarks", []):
        key = b.get("aggregate_name", "iteration") if b.get("run_type") == "aggregate" else "iteration"
        rows[b.get("run_name", b.get("name", ""))].setdefault(key, b)
    return rows


def seconds(entry):
    unit = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[entry["time_unit"]]
    return entry["real_time"] * unit


def pick(rows, name, prefer=("min", "median", "mean", "iteration")):
    for p in prefer:
        if p in rows.get(name, {}):
            return rows[name][p]
    return None


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: report.py RUN.json  (a kvslim_bench --benchmark_out=RUN.json run)")
    rows = load(sys.argv[1])
    if not rows:
        sys.exit(f"report.py: {sys.argv[1]} holds no benchmark rows")
    gb = 1e9

    read = {}
    for th in (1, 2):
        e = pick(rows, f"BM_read_bandwidth/real_time/threads:{th}", ("median", "mean", "iteration"))
        if e and "bytes_per_second" in e:
            read[th] = e["bytes_per_second"]
    mc = pick(rows, "BM_memcpy/real_time", ("median", "mean", "iteration"))
    memcpy = mc.get("bytes_per_second") if mc else None

    def gbps(x):
        """GB/s with % of memcpy, or an empty cell when the run has no such row."""
        if x is None:
            return ""
        return f"{x / gb:.2f}" + (f" ({100 * x / memcpy:.0f}%)" if memcpy else "")

    if read or memcpy:
        print("### Roofline\n")
        print("| benchmark | GB/s |\n|---|---|")
        for th, v in read.items():
            print(f"| BM_read_bandwidth, {th} thread{'s' if th > 1 else ''} | {v / gb:.1f} |")
        if memcpy:
            print(f"| BM_memcpy | {memcpy / gb:.1f} |")

    codec = defaultdict(dict)
    for name in rows:
        m = re.match(r"BM_(encode|decode)/(\w+)/(\w+)/real_time$", name)
        if m:
            e = pick(rows, name, ("median", "mean", "iteration"))
            if e and "bytes_per_second" in e:
                codec[(m.group(2), m.group(3))][m.group(1)] = e["bytes_per_second"]
    if codec:
        print("\n### Encode / decode (GB/s of f32; % of BM_memcpy)\n")
        print("| ISA | format | encode | decode |\n|---|---|---|---|")
        for (isa, fmt), v in codec.items():
            print(f"| {isa} | {fmt} | {gbps(v.get('encode'))} | {gbps(v.get('decode'))} |")

    att = {}
    for name in rows:
        m = re.match(r"BM_attend/(\w+)/(\w+)/ctx:(\d+)/threads:(\d+)/real_time$", name)
        if m:
            e = pick(rows, name)
            if not e or "kv_bytes" not in e:
                continue
            att[(m.group(1), m.group(2), int(m.group(3)), int(m.group(4)))] = (seconds(e), e["kv_bytes"])
    if att:
        order = ["scalar", "avx2", "avx512"]
        isas = sorted({k[0] for k in att}, key=lambda i: (order.index(i) if i in order else len(order), i))
        known = ["f32", "f16", "bf16", "kivi8", "kivi4", "kivi3", "kivi2", "kivi1", "kivi4q8", "kivi2q8", "nuq4", "nuq3", "nuq2", "cq1", "cq2"]
        fmts = [f for f in known if any(k[1] == f for k in att)]
        fmts += sorted({k[1] for k in att} - set(known))
        ctxs = sorted({k[2] for k in att})
        ths = sorted({k[3] for k in att})
        print("\n### Decode attention: ms per layer step (GB/s of KV bytes; % of BM_read_bandwidth with as many threads)\n")
        print("| ISA | context | threads | " + " | ".join(fmts) + " |")
        print("|---|---|---|" + "---|" * len(fmts))
        for isa in isas:
            for ctx in ctxs:
                for th in ths:
                    cells = []
                    for f in fmts:
                        if (isa, f, ctx, th) not in att:
                            cells.append("")
                            continue
                        t, b = att[(isa, f, ctx, th)]
                        bw = b / t
                        pct = f", {100 * bw / read[th]:.0f}%" if th in read else ""
                        cells.append(f"{t * 1e3:.2f} ({bw / gb:.1f}{pct})")
                    print(f"| {isa} | {ctx // 1024}K | {th} | " + " | ".join(cells) + " |")
        ratios = []
        for isa in isas:
            for ctx in ctxs:
                for th in ths:
                    g = lambda f: att.get((isa, f, ctx, th), (None,))[0]
                    if None in (g("f16"), g("f32"), g("kivi4"), g("kivi2")):
                        continue
                    q8 = "".join(f" {g('f16') / g(f):.2f}x |" if g(f) else " |" for f in ("kivi4q8", "kivi2q8"))
                    ratios.append(f"| {isa} | {ctx // 1024}K | {th} | {g('f16') / g('kivi4'):.2f}x | "
                                  f"{g('f32') / g('kivi4'):.2f}x | {g('f16') / g('kivi2'):.2f}x |" + q8)
        if ratios:
            print("\n### Target ratios (time of the first / time of the second, same run)\n")
            print("| ISA | context | threads | f16/kivi4 | f32/kivi4 | f16/kivi2 | f16/kivi4q8 | f16/kivi2q8 |\n"
                  "|---|---|---|---|---|---|---|---|")
            print("\n".join(ratios))

        floors(rows, att, read, isas, fmts)


def floors(rows, att, read, isas, fmts):
    """Per ISA and format at the longest context, 1 thread: the measured time against the byte
    floor (kv_bytes at BM_read_bandwidth, 1 thread), the FMA floor of a float kernel
    (32 query / 8 kv heads -> 4 rows, head_dim 128: 4 * 128 * 2 multiply-adds per token and kv
    head, BM_fma_peak lanes per FMA), and the in-cache compute time (the 4K step scaled to the
    context: the kernels' own speed with the data in the last-level cache). Time close to
    max(compute, transfer) means they overlap; close to their sum means they do not."""
    lanes = {"avx2": 8, "avx512": 16}
    peak = {}
    for isa in lanes:
        e = pick(rows, f"BM_fma_peak/{isa}", ("median", "mean", "iteration"))
        if e and "fma_per_second" in e:
            peak[isa] = e["fma_per_second"]
    ctxs = sorted({k[2] for k in att})
    if not ctxs or 1 not in read:
        return
    ctx, small = ctxs[-1], ctxs[0]
    lines = []
    for isa in isas:
        if isa == "scalar":
            continue
        for f in fmts:
            if (isa, f, ctx, 1) not in att:
                continue
            t, b = att[(isa, f, ctx, 1)]
            byte = b / read[1]
            fma = ctx * 8 * 4 * 128 * 2 / lanes[isa] / peak[isa] if isa in peak else None
            comp = att[(isa, f, small, 1)][0] * ctx / small if (isa, f, small, 1) in att and small < ctx else None
            cell = lambda x: f"{x * 1e3:.2f} ({t / x:.2f}x)" if x else ""
            mx = max(comp, byte) if comp else None
            sm = comp + byte if comp else None
            lines.append(f"| {isa} | {f} | {t * 1e3:.2f} | {cell(byte)} | {cell(fma)} | {cell(comp)} | "
                         f"{cell(mx)} | {cell(sm)} |")
    if lines:
        print(f"\n### Floors at {ctx // 1024}K, 1 thread: ms (measured / floor)\n")
        print("| ISA | format | measured | byte floor | FMA floor | compute in cache | max(compute, bytes) | "
              "compute + bytes |\n|---|---|---|---|---|---|---|---|")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
