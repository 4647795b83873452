#!/usr/bin/env python3
"""Where a run's p99 comes from: reads the DUMP_DIR of `loadtest/cluster.sh` (every reading's
send time and latency per run, wsbench-dump.patch) and prints, per run, its p50 and p99, the
50 ms windows holding most of the readings at or above the p99 (seconds into the run, how
many, the worst latency), and the nats-servers' garbage collections during the run (seconds
into the run, heap before -> after -> live in MB), from their GODEBUG=gctrace=1 lines.

A p99 made of a few windows is made of stalls, not of a slower path: see BENCHMARKS.md,
"Where the cluster's p99 goes".

Usage: loadtest/stalls.py DUMP_DIR [RUN_NAME_SUBSTRING]
"""
import glob
import os
import re
import sys

WINDOW_NS = 50_000_000


def gcs(dump_dir):
    """Each server's collections as (seconds since the servers started, heap figures)."""
    start = float(open(os.path.join(dump_dir, "nats-start.txt")).read())
    out = []
    for path in sorted(glob.glob(os.path.join(dump_dir, "gc-n*.txt"))):
        server = path.rsplit("-", 1)[1][:-4]
        for line in open(path):
            m = re.match(r"gc \d+ @([\d.]+)s .* ([\d]+->[\d]+->[\d]+) MB", line)
            if m:
                out.append((start + float(m.group(1)), server, m.group(2)))
    return out


def main():
    dump_dir = sys.argv[1]
    pick = sys.argv[2] if len(sys.argv) > 2 else ""
    collections = gcs(dump_dir) if os.path.exists(os.path.join(dump_dir, "nats-start.txt")) else []
    for path in sorted(glob.glob(os.path.join(dump_dir, "*.txt"))):
        name = os.path.basename(path)[:-4]
        if pick not in name or not os.path.exists(path + ".start"):
            continue
        rows = sorted(tuple(map(int, line.split())) for line in open(path))
        if not rows:
            continue
        lat = sorted(l for _, l in rows)
        n = len(lat)
        p99 = lat[int(n * 0.99)]
        t0 = rows[0][0]
        windows = {}
        for t, l in rows:
            w = windows.setdefault((t - t0) // WINDOW_NS, [0, 0])
            w[0] += l >= p99
            w[1] = max(w[1], l)
        above = sum(w[0] for w in windows.values())
        worst = sorted(windows.items(), key=lambda kv: -kv[1][0])
        held, k = 0, 0
        for _, w in worst:
            held += w[0]
            k += 1
            if held >= 0.8 * above:
                break
        print(f"{name}: {n} readings, p50 {lat[n // 2] / 1e6:.2f} ms, p99 {p99 / 1e6:.2f} ms; "
              f"80 % of the {above} at or above the p99 fall in {k} of {len(windows)} 50 ms windows")
        print("  worst windows (s: readings >= p99, max ms): " + ", ".join(
            f"{w * WINDOW_NS / 1e9:.2f}: {c[0]}, {c[1] / 1e6:.0f}" for w, c in worst[:8]))
        # wsbench's clock starts when it does; the run's first send is t0 after that.
        first = float(open(path + ".start").read()) + t0 / 1e9
        last = first + (rows[-1][0] - t0) / 1e9
        during = [(at - first, s, heap) for at, s, heap in collections if first <= at <= last]
        if during:
            print("  nats-server GCs (s server heap): " + ", ".join(
                f"{at:.2f} {s} {heap}" for at, s, heap in during))


if __name__ == "__main__":
    main()
