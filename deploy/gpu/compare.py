#!/usr/bin/env python3
"""Side-by-side table of `dslactl bench engine --json` and `bench_transformers.py` reports, with ratios.

    python3 deploy/gpu/compare.py engine.json transformers-sdpa.json transformers-eager.json [--markdown out.md]

The first report is the one the ratios are about (normally DslaMesh); a ratio below 1 means it is faster. Batch-1
decode is also given as a multiple of the first report's weight-read bound.
"""

from __future__ import annotations

import argparse
import json
import sys


def load(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def cell(value: float | None, entry: dict | None) -> str:
    if value is not None:
        return f"{value:.2f}"
    if entry is None:
        return "-"
    if entry.get("status") == "oom":
        return f"OOM ({entry.get('needs_gib', 0):.0f} GiB)"
    return entry.get("status", "-")


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a is not None and b else "-"


def render(reports: list[dict]) -> str:
    first = reports[0]
    names = [r["engine"] for r in reports]
    m = first["model"]
    lines = [
        f"Card: **{first['device']}**, {first['dtype']}; model: hidden {m['hidden']}, {m['layers']} layers, "
        f"{m['heads']}/{m['kv_heads']} heads, MLP {m['intermediate']}, vocab {m['vocab']} "
        f"({m['parameters'] / 1e9:.2f}B parameters, {m['weight_bytes'] / 1e9:.2f} GB; {m['weight_read_bytes'] / 1e9:.2f} GB read per decode step).",
        "",
    ]
    if first.get("copy_bandwidth_gbps"):
        lines.append(f"Copy bandwidth (device-to-device, read + write): **{first['copy_bandwidth_gbps']:.0f} GB/s**; "
                     f"weight-read bound: **{first['weight_read_bound_ms']:.2f} ms/step**.")
        lines.append("")
    for other in reports[1:]:
        if other["device"] != first["device"]:
            lines.append(f"> warning: {other['engine']} ran on {other['device']}, not {first['device']}.")
            lines.append("")

    lines.append("### Prefill (batch 1), ms")
    lines.append("")
    header = "| tokens | " + " | ".join(names) + " | " + " | ".join(f"{names[0]} / {n}" for n in names[1:]) + " |"
    lines += [header, "|" + "---|" * (1 + len(names) + len(names) - 1)]
    for entry in first["prefill"]:
        t = entry["tokens"]
        row = [next((p for p in r["prefill"] if p["tokens"] == t), None) for r in reports]
        values = [p["ms"] if p else None for p in row]
        lines.append(f"| {t} | " + " | ".join(cell(v, p) for v, p in zip(values, row)) + " | "
                     + " | ".join(ratio(values[0], v) for v in values[1:]) + " |")
    lines.append("")

    bound = first.get("weight_read_bound_ms")
    lines.append("### Decode, ms per step (one token for each sequence of the batch)")
    lines.append("")
    header = "| batch | context | " + " | ".join(names) + " | " + " | ".join(f"{names[0]} / {n}" for n in names[1:]) + " | × bound |"
    lines += [header, "|" + "---|" * (2 + len(names) + len(names) - 1 + 1)]
    for entry in first["decode"]:
        b, c = entry["batch"], entry["context"]
        row = [next((d for d in r["decode"] if d["batch"] == b and d["context"] == c), None) for r in reports]
        values = [d["ms_per_step"] if d else None for d in row]
        times_bound = f"{values[0] / bound:.2f}×" if values[0] is not None and bound and b == 1 else ""
        lines.append(f"| {b} | {c} | " + " | ".join(cell(v, d) for v, d in zip(values, row)) + " | "
                     + " | ".join(ratio(values[0], v) for v in values[1:]) + f" | {times_bound} |")
    plain = first.get("plain_kernels")
    if plain:
        lines += ["", "### Before/after (same run): plain kernels vs fused", "",
                  "| measurement | plain | fused | fused / plain |", "|---|---|---|---|"]
        for p in plain.get("prefill", []):
            fused = next((x for x in first["prefill"] if x["tokens"] == p["tokens"]), None)
            lines.append(f"| prefill {p['tokens']} (ms) | {cell(p['ms'], p)} | {cell(fused and fused['ms'], fused)} | {ratio(fused and fused['ms'], p['ms'])} |")
        for d in plain.get("decode", []):
            fused = next((x for x in first["decode"] if x["batch"] == d["batch"] and x["context"] == d["context"]), None)
            lines.append(f"| decode batch {d['batch']} ctx {d['context']} (ms/step) | {cell(d['ms_per_step'], d)} | "
                         f"{cell(fused and fused['ms_per_step'], fused)} | {ratio(fused and fused['ms_per_step'], d['ms_per_step'])} |")
    for key, title, without_name, with_name in (
            ("decode_without_graphs", "decode without and with CUDA graphs", "without graphs", "with graphs"),
            ("decode_without_kernel", "decode with LibTorch (KV copies, SDPA, GEMMs) and with the engine's decode kernels", "LibTorch", "kernels")):
        before = first.get(key)
        if not before:
            continue
        lines += ["", f"### Before/after (same run): {title}, ms per step", "",
                  f"| batch | context | {without_name} | {with_name} | {with_name} / {without_name} | × bound ({with_name}) |",
                  "|---|---|---|---|---|---|"]
        for d in before:
            after = next((x for x in first["decode"] if x["batch"] == d["batch"] and x["context"] == d["context"]), None)
            after_ms = after and after["ms_per_step"]
            times_bound = f"{after_ms / bound:.2f}×" if after_ms and bound and d["batch"] == 1 else ""
            lines.append(f"| {d['batch']} | {d['context']} | {cell(d['ms_per_step'], d)} | {cell(after_ms, after)} | "
                         f"{ratio(after_ms, d['ms_per_step'])} | {times_bound} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", help="JSON reports; the first is compared with the others")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    text = render([load(p) for p in args.reports])
    print(text, end="")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
