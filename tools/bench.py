#!/usr/bin/env python3
"""Benchmark isolcpu_plugin and print figures (stdlib + grpcio only).

    python3 tools/bench.py                 # every section
    python3 tools/bench.py policy          # some sections
    python3 tools/bench.py --json          # one JSON object instead of the table

It starts the plugin as a process against an in-process fake kubelet
(test_isolcpu_plugin.FakeKubelet) on synthetic hosts, the way the package
and the image run it: `python3 -m isolcpu_plugin`, from its byte-compiled
module (this checkout's __pycache__, written when bench.py imports it).
Sections:
  start    process start to Registered
  rpc      Allocate vs GetDevicePluginOptions (the floor of any call), and
           GetPreferredAllocation over gRPC at 64, 1024 and 8192 CPUs
  restart  kubelet restart to re-registered, many times over
  idle     wakeups/s (all threads), CPU and RSS of a registered, idle plugin
  hotplug  CPU offline/online to the new list on ListAndWatch
  policy   preferred_allocation() alone at 64, 1024 and 8192 CPUs

Figures are wall-clock on a shared machine: compare them within one run.
"""
import argparse
import collections
import json
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import isolcpu_plugin as plugin                      # noqa: E402
from test_isolcpu_plugin import (FakeKubelet, PluginProcess, fake_host, pb, synthetic_infos,  # noqa: E402
                                 task_files, write_files)


def percentiles(samples, digits=None):
    """p50, p99, max (rounded to `digits` when given) and n of the samples."""
    ordered = sorted(samples)

    def at(q):
        value = ordered[min(len(ordered) - 1, int(q * len(ordered)))]
        return value if digits is None else round(value, digits)
    return {"p50": at(0.50), "p99": at(0.99), "max": at(1.0), "n": len(ordered)}


# shape name -> (sockets, NUMA nodes per socket, cores per socket, threads, request size,
# cores per last-level cache: 8, as AMD EPYC's CCDs)
POLICY_SHAPES = (
    ("64 CPUs: 1 socket x 2 NUMA x 16 cores x 2 threads", (1, 2, 32, 2, 8, 8)),
    ("1024 CPUs: 2 sockets x 4 NUMA x 64 cores x 2 threads", (2, 4, 256, 2, 64, 8)),
    ("8192 CPUs: 8 sockets x 4 NUMA x 128 cores x 2 threads", (8, 4, 512, 2, 64, 8)),
)


def bench_policy(args):
    """p50/p99 of one GetPreferredAllocation decision, placements precomputed
    (the servicer caches them per device list): all CPUs available, then
    a quarter of them taken at random, with 0-2 must-include CPUs; an L3
    per 8 cores."""
    rng = random.Random(42)
    results = []
    for name, (sockets, nodes, cores, threads, size, cores_per_cache) in POLICY_SHAPES:
        infos = synthetic_infos(sockets=sockets, cores=cores, threads=threads, nodes_per_socket=nodes,
                                cores_per_cache=cores_per_cache)
        placements = plugin.cpu_placements(infos)
        cpus = sorted(infos)
        count = args.requests if len(cpus) <= 1024 else max(20, args.requests // 5)
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


class Rig(object):
    """A fake kubelet and a plugin process on a synthetic host, in a temp dir
    (on tmpfs where there is one: big hosts are many small files)."""

    def __init__(self, *args, sysfs=None, sockets=2, cores=4, isolated="2-7,10-15"):
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.tmp = tempfile.mkdtemp(prefix="isolcpu-bench-", dir=shm)
        self.host_root = os.path.join(self.tmp, "host")
        fake_sysfs, fake_procfs = fake_host(self.host_root, sockets=sockets, cores=cores, threads=2,
                                            isolated=isolated, kernel_max=8191)
        self.dir = os.path.join(self.tmp, "device-plugins")
        self.kubelet = FakeKubelet(self.dir).start()
        self.started = time.monotonic()
        self.process = PluginProcess(self.tmp, ["--sysfs", sysfs or fake_sysfs, "--procfs", fake_procfs,
                                                "--device-plugin-path", self.dir] + list(args), module=True)

    @property
    def pid(self):
        return self.process.proc.pid

    def set_cpu_file(self, name, text):
        write_files(self.host_root, {"sys/devices/system/cpu/" + name: text})

    def close(self):
        self.process.stop(signal.SIGTERM)
        self.kubelet.stop()
        shutil.rmtree(self.tmp, True)


def thread_switches(pid):
    """{thread id: (name, voluntary + involuntary context switches)}."""
    names = task_files(pid, "comm")
    return {tid: (names[tid].strip(), sum(int(line.split()[1]) for line in status.splitlines()
                                          if "ctxt_switches" in line))
            for tid, status in task_files(pid, "status").items() if tid in names}


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def measure_idle(pid, seconds):
    """Wakeups/s of all threads (and of the plugin's own event-loop thread),
    share of one CPU and RSS over `seconds` of idling."""
    before, cpu_before, started = thread_switches(pid), cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    after, cpu_after, elapsed = thread_switches(pid), cpu_seconds(pid), time.monotonic() - started
    per_thread = {}
    for tid, (name, switches) in after.items():
        per_thread[tid] = (name, switches - before.get(tid, (name, 0))[1])
    total = sum(n for _, n in per_thread.values())
    own = per_thread.get(pid, ("", 0))[1]
    return {"seconds": round(elapsed, 1), "wakeups_per_s": round(total / elapsed, 2),
            "own_thread_wakeups_per_s": round(own / elapsed, 2),
            "grpc_threads_wakeups_per_s": round((total - own) / elapsed, 2),
            "cpu_percent": round(100 * (cpu_after - cpu_before) / elapsed, 3),
            "rss_mib": round(rss_mib(pid), 1), "threads": len(after),
            "per_thread": sorted("%s:%d" % (name, n) for name, n in per_thread.values())}


def bench_idle(args):
    """Both ways the plugin watches the host, measured side by side: real
    /sys with kernel uevents (production), and a fake tree polled every
    --rescan-interval (0.5 s, the default)."""
    import grpc
    rigs = {"real /sys, uevents": Rig("--cpus", "1", sysfs="/sys"),
            "fake tree, polling 0.5 s": Rig()}
    results = []
    try:
        for rig in rigs.values():
            rig.kubelet.wait_list(lambda devices: devices, timeout=30)
        time.sleep(2)                                  # let start-up settle
        measured = {}
        threads = [threading.Thread(target=lambda n=n, r=r: measured.__setitem__(n, measure_idle(r.pid, args.idle_seconds)))
                   for n, r in rigs.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for name in rigs:
            results.append(dict(measured[name], mode=name, grpcio=grpc.__version__))
    finally:
        for rig in rigs.values():
            rig.close()
    return results


def print_idle(rows):
    print("Idle, registered, ListAndWatch open (targets: <= 1 wakeup/s, <= 0.1 % CPU, <= 40 MiB RSS)")
    for row in rows:
        print("  %-26s grpcio %-7s over %4.0f s: %5.2f wakeups/s (event loop %.2f, grpc threads %.2f), "
              "CPU %.3f %%, RSS %.1f MiB, %d threads"
              % (row["mode"], row["grpcio"], row["seconds"], row["wakeups_per_s"], row["own_thread_wakeups_per_s"],
                 row["grpc_threads_wakeups_per_s"], row["cpu_percent"], row["rss_mib"], row["threads"]))
        print("  %-26s per thread (name:switches): %s" % ("", " ".join(row["per_thread"])))


def bench_hotplug(args):
    """CPU 7 offline/online on a fake tree (default --rescan-interval 0.5):
    time from the file change to the new list arriving on ListAndWatch."""
    rig = Rig()
    rng = random.Random(3)
    samples = {"offline -> Unhealthy": [], "online -> Healthy": []}
    try:
        rig.kubelet.wait_list(lambda devices: devices, timeout=30)
        for _ in range(args.flips):
            for online, health, key in (("0-6\n", "Unhealthy", "offline -> Unhealthy"),
                                        ("0-15\n", "Healthy", "online -> Healthy")):
                time.sleep(rng.uniform(0, 0.5))        # any phase of the polling period
                changed = time.monotonic()
                rig.set_cpu_file("online", online.replace("0-6", "0-6,8-15"))
                snap = rig.kubelet.wait_list(lambda d, h=health: d["7"][0] == h, timeout=5, since=changed)
                samples[key].append((snap.at - changed) * 1000)
    finally:
        rig.close()
    return [dict(event=key, **{k if k == "n" else k + "_ms": v for k, v in percentiles(values, 1).items()})
            for key, values in samples.items()]


def print_hotplug(rows):
    print("Hotplug on a fake tree, polling every 0.5 s (target: within 1 s)")
    for row in rows:
        print("  %-22s p50 %6.1f ms  p99 %6.1f ms  max %6.1f ms  (%d flips)"
              % (row["event"], row["p50_ms"], row["p99_ms"], row["max_ms"], row["n"]))


def bench_start(args):
    """Process start (Popen) to the fake kubelet holding its Register."""
    samples = []
    for _ in range(args.starts):
        rig = Rig("--log-level", "warning")
        try:
            rig.kubelet.wait_registered(timeout=30)
            samples.append((time.monotonic() - rig.started) * 1000)
        finally:
            rig.close()
    return {"start_to_registered_ms": percentiles(samples, 1)}


def print_start(result):
    f = result["start_to_registered_ms"]
    print("Start to Registered: p50 %.0f ms, max %.0f ms (%d starts; grpc imports are most of it)"
          % (f["p50"], f["max"], f["n"]))


def timed_calls(call, count):
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1e6)
    return samples


def bench_rpc(args):
    """Round trips over the plugin's unix socket from one client, as the
    kubelet makes them. Allocate and GetDevicePluginOptions interleaved in
    rounds so that both see the same machine."""
    import grpc
    from test_isolcpu_plugin import pb_grpc
    result = {}
    rig = Rig()                                   # the default log level: a line per Allocate
    try:
        rig.kubelet.wait_list(lambda devices: devices, timeout=30)
        stub = rig.kubelet.stub
        empty = pb.Empty()
        allocate = pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=["3", "11"])])
        floor, alloc = [], []
        timed_calls(lambda: stub.GetDevicePluginOptions(empty), 200)          # warm up
        for _ in range(args.calls // 100):
            floor += timed_calls(lambda: stub.GetDevicePluginOptions(empty), 100)
            alloc += timed_calls(lambda: stub.Allocate(allocate), 100)
        f, a = percentiles(floor), percentiles(alloc)
        result["floor_us"] = {k: round(v) for k, v in f.items()}
        result["allocate_us"] = {k: round(v) for k, v in a.items()}
        result["allocate_over_floor_p50"] = round(a["p50"] / f["p50"], 3)
    finally:
        rig.close()
    result["preferred"] = []
    rng = random.Random(5)
    for cpus, sockets, cores in ((64, 2, 16), (1024, 8, 64), (8192, 8, 512)):
        rig = Rig("--log-level", "warning", sockets=sockets, cores=cores, isolated="0-%d" % (cpus - 1))
        try:
            rig.kubelet.wait_list(lambda devices: len(devices) == cpus, timeout=120)
            ready = time.monotonic() - rig.started
            ids = [str(c) for c in range(cpus)]
            size = min(64, cpus // 4)

            def prefer():
                must = rng.sample(ids, rng.randint(0, 2))
                request = pb.PreferredAllocationRequest(container_requests=[pb.ContainerPreferredAllocationRequest(
                    available_deviceIDs=ids, must_include_deviceIDs=must, allocation_size=size)])
                assert len(rig.kubelet.stub.GetPreferredAllocation(request).container_responses[0].deviceIDs) == size
            count = args.calls // 10 if cpus <= 1024 else args.calls // 40
            figures = percentiles(timed_calls(prefer, count))
            result["preferred"].append({"cpus": cpus, "size": size, "requests": count,
                                        "p50_ms": round(figures["p50"] / 1000, 2),
                                        "p99_ms": round(figures["p99"] / 1000, 2),
                                        "start_to_first_list_s": round(ready, 2)})
        finally:
            rig.close()
    return result


def print_rpc(result):
    f, a = result["floor_us"], result["allocate_us"]
    print("gRPC round trips over the unix socket (target: Allocate p50 <= 1.5x the floor)")
    print("  GetDevicePluginOptions (floor): p50 %4d us  p99 %5d us  (%d calls)" % (f["p50"], f["p99"], f["n"]))
    print("  Allocate, 2 CPUs:               p50 %4d us  p99 %5d us  (%d calls)  p50 ratio %.2f"
          % (a["p50"], a["p99"], a["n"], result["allocate_over_floor_p50"]))
    for row in result["preferred"]:
        print("  GetPreferredAllocation %4d CPUs, size %2d: p50 %6.2f ms  p99 %6.2f ms  (%d calls; plugin start "
              "to first list %.2f s)" % (row["cpus"], row["size"], row["p50_ms"], row["p99_ms"], row["requests"],
                                         row["start_to_first_list_s"]))


def bench_restart(args):
    """Kubelet restarts (sockets wiped, new kubelet.sock): from the new
    kubelet serving to the plugin's Register arriving, and to the first
    list on its ListAndWatch."""
    rig = Rig()                                   # info: its "registered" lines are waited for
    registered, listed = [], []
    try:
        rig.kubelet.wait_list(lambda devices: devices, timeout=30)
        # the kubelet lists before it answers Register: restarting in between
        # would be a failed registration to the plugin, not a restart
        rig.process.wait_log("registered windriver.com/isolcpus", timeout=30)
        for n in range(2, args.restarts + 2):
            rig.kubelet.stop()
            rig.kubelet.start()
            serving = time.monotonic()
            rig.kubelet.wait_registered(n, timeout=30)
            registered.append((time.monotonic() - serving) * 1000)
            snap = rig.kubelet.wait_list(lambda devices: devices, since=serving, timeout=30)
            listed.append((snap.at - serving) * 1000)
            rig.process.wait_log("registered windriver.com/isolcpus", count=n)
    finally:
        rig.close()
    return {"to_registered_ms": percentiles(registered, 1), "to_first_list_ms": percentiles(listed, 1)}


def print_restart(result):
    r, l = result["to_registered_ms"], result["to_first_list_ms"]
    print("Kubelet restart (target: noticed within 1-2 s): re-registered p50 %.1f ms, p99 %.1f ms; "
          "first list p50 %.1f ms, p99 %.1f ms (%d restarts)" % (r["p50"], r["p99"], l["p50"], l["p99"], r["n"]))


SECTIONS = collections.OrderedDict([
    ("start", (bench_start, print_start)), ("rpc", (bench_rpc, print_rpc)),
    ("restart", (bench_restart, print_restart)), ("idle", (bench_idle, print_idle)),
    ("hotplug", (bench_hotplug, print_hotplug)), ("policy", (bench_policy, print_policy))])


def machine():
    return {"python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "kernel": platform.release()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sections", nargs="*", choices=list(SECTIONS) + [[]], default=[])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--requests", type=int, default=300, help="requests per policy scenario")
    parser.add_argument("--idle-seconds", type=float, default=60, help="idle measuring window")
    parser.add_argument("--flips", type=int, default=20, help="offline/online flips for hotplug")
    parser.add_argument("--starts", type=int, default=5, help="plugin starts timed")
    parser.add_argument("--calls", type=int, default=2000, help="Allocate and GetDevicePluginOptions calls each")
    parser.add_argument("--restarts", type=int, default=50, help="kubelet restarts timed")
    args = parser.parse_args()
    chosen = args.sections or list(SECTIONS)
    report = {"machine": machine()}
    for name in chosen:
        measure, show = SECTIONS[name]
        report[name] = measure(args)
        if not args.json:
            show(report[name])
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        print("machine: %(machine)s, %(cpus)s CPUs, Python %(python)s, kernel %(kernel)s" % report["machine"])


if __name__ == "__main__":
    main()
