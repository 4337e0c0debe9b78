#!/usr/bin/env python3
"""Benchmark isolcpu_plugin and print figures (stdlib + grpcio only).

    python3 tools/bench.py                 # every section
    python3 tools/bench.py policy          # some sections
    python3 tools/bench.py --json          # one JSON object instead of the table

Sections:
  policy   preferred_allocation() alone at 64, 1024 and 8192 CPUs

Figures are wall-clock on a shared machine: compare them within one run.
"""
import argparse
import json
import os
import platform
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import isolcpu_plugin as plugin                      # noqa: E402
from test_isolcpu_plugin import synthetic_infos       # noqa: E402


def percentiles(samples):
    ordered = sorted(samples)

    def at(q):
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
    return {"p50": at(0.50), "p99": at(0.99), "max": ordered[-1], "n": len(ordered)}


# shape name -> (sockets, NUMA nodes per socket, cores per socket, threads, request size)
POLICY_SHAPES = (
    ("64 CPUs: 1 socket x 2 NUMA x 16 cores x 2 threads", (1, 2, 32, 2, 8)),
    ("1024 CPUs: 2 sockets x 4 NUMA x 64 cores x 2 threads", (2, 4, 256, 2, 64)),
    ("8192 CPUs: 8 sockets x 4 NUMA x 128 cores x 2 threads", (8, 4, 512, 2, 64)),
)


def bench_policy(requests):
    """p50/p99 of one GetPreferredAllocation decision, placements precomputed
    (the servicer caches them per device list): all CPUs available, then
    a quarter of them taken at random, with 0-2 must-include CPUs."""
    rng = random.Random(42)
    results = []
    for name, (sockets, nodes, cores, threads, size) in POLICY_SHAPES:
        infos = synthetic_infos(sockets=sockets, cores=cores, threads=threads, nodes_per_socket=nodes)
        placements = plugin.cpu_placements(infos)
        cpus = sorted(infos)
        count = requests if len(cpus) <= 1024 else max(20, requests // 5)
        for scenario in ("all available", "25% taken"):
            samples = []
            for _ in range(count):
                available = cpus if scenario == "all available" else rng.sample(cpus, len(cpus) * 3 // 4)
                must = rng.sample(available, rng.randint(0, 2))
                started = time.perf_counter()
                answer, problems = plugin.preferred_allocation(placements, available, must, size)
                samples.append((time.perf_counter() - started) * 1000)
                assert len(answer) == size and not problems
            figures = percentiles(samples)
            results.append({"shape": name, "cpus": len(cpus), "scenario": scenario, "size": size,
                            "p50_ms": round(figures["p50"], 3), "p99_ms": round(figures["p99"], 3),
                            "max_ms": round(figures["max"], 3), "requests": figures["n"]})
    return results


def print_policy(rows):
    print("GetPreferredAllocation policy (target: p99 <= 10 ms at 1024 CPUs)")
    for row in rows:
        print("  %-55s %-14s size %3d: p50 %7.2f ms  p99 %7.2f ms  max %7.2f ms  (%d requests)"
              % (row["shape"], row["scenario"], row["size"], row["p50_ms"], row["p99_ms"],
                 row["max_ms"], row["requests"]))


SECTIONS = {"policy": (bench_policy, print_policy)}


def machine():
    return {"python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "kernel": platform.release()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sections", nargs="*", choices=sorted(SECTIONS) + [[]], default=[])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--requests", type=int, default=300, help="requests per policy scenario")
    args = parser.parse_args()
    chosen = args.sections or sorted(SECTIONS)
    report = {"machine": machine()}
    for name in chosen:
        measure, show = SECTIONS[name]
        report[name] = measure(args.requests)
        if not args.json:
            show(report[name])
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        print("machine: %(machine)s, %(cpus)s CPUs, Python %(python)s, kernel %(kernel)s" % report["machine"])


if __name__ == "__main__":
    main()
