"""Per-kernel totals of the decode steps an Nsight Compute run profiled (`bench engine --profile-steps N`).

    ncu --profile-from-start off --graph-profiling node --metrics gpu__time_duration.sum --csv --log-file ncu.csv \\
        dslamesh-gpu/run.sh bench engine --prefill 16 --contexts 1024,16384 --batches 1 --warmup 2 --steps 1 --profile-steps 1
    python3 deploy/gpu/ncu_summary.py ncu.csv [--cells 2]

Splits the profiled kernels into --cells equal parts (one per decode cell: here 1k and 16k), then prints for each part
the kernels grouped by name and grid, largest total first. Nsight Compute runs every kernel alone, with clocks locked
and caches flushed, so its totals run a few per cent above the step time the benchmark measures; compare them with
each other, not with the benchmark.
"""
import argparse, collections, csv

parser = argparse.ArgumentParser()
parser.add_argument("csv")
parser.add_argument("--cells", type=int, default=2, help="decode cells profiled (equal kernel counts each)")
parser.add_argument("--top", type=int, default=8)
args = parser.parse_args()

header, rows = None, []
for row in csv.reader(open(args.csv)):
    if row and row[0] == "ID":
        header = row
    elif header and len(row) == len(header):
        rows.append(dict(zip(header, row)))
rows = [r for r in rows if r["Metric Name"] == "gpu__time_duration.sum"]
per_cell = len(rows) // max(args.cells, 1)
for cell in range(args.cells):
    part = rows[cell * per_cell:(cell + 1) * per_cell]
    groups = collections.defaultdict(lambda: [0, 0.0])
    for r in part:
        name = r["Kernel Name"]
        short = name.split("(")[0].replace("void ", "")[:60]
        group = groups[(short, r["Grid Size"])]
        group[0] += 1
        group[1] += float(r["Metric Value"].replace(",", "")) / 1000
    total = sum(g[1] for g in groups.values())
    print(f"cell {cell + 1}: {len(part)} kernels, {total:.1f} µs in all")
    for (short, grid), (count, micros) in sorted(groups.items(), key=lambda item: -item[1][1])[:args.top]:
        print(f"  {count:4d} × {micros / count:7.2f} µs = {micros:8.1f} µs  grid {grid:>14}  {short}")
