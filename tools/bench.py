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
  nri      time inside the plugin per NRI CreateContainer/UpdateContainer
           with 250 containers known, and one re-read of their checkpoint
  containerd  CreateContainer on a real containerd (tools/ci/containerd.sh)
           with and without the plugin's NRI side, interleaved
  stall    the event loop's longest stall for the largest input each byte
           bound admits (PodResources, checkpoint, cpu-list, NRI)

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
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import isolcpu_plugin as plugin                      # noqa: E402
from test_isolcpu_plugin import (NRI_CREATE_CONTAINER_REQUEST, NRI_SYNCHRONIZE_REQUEST,  # noqa: E402
                                 NRI_UPDATE_CONTAINER_REQUEST, FakeKubelet, FakeNriRuntime, PluginProcess,
                                 fake_host, http_get, many_pods_holding, metrics_port, nri_container,
                                 nri_linux_resources, nri_pod, pb, pb_encode, synthetic_infos, task_files,
                                 write_files)


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

    def __init__(self, *args, sysfs=None, sockets=2, cores=4, isolated="2-7,10-15", pod_resources=False, env=None):
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.tmp = tempfile.mkdtemp(prefix="isolcpu-bench-", dir=shm)
        self.host_root = os.path.join(self.tmp, "host")
        fake_sysfs, fake_procfs = fake_host(self.host_root, sockets=sockets, cores=cores, threads=2,
                                            isolated=isolated, kernel_max=8191)
        self.dir = os.path.join(self.tmp, "device-plugins")
        pod_resources_dir = os.path.join(self.tmp, "pod-resources")
        self.kubelet = FakeKubelet(self.dir, pod_resources_dir if pod_resources else None).start()
        self.started = time.monotonic()
        if "--pod-resources-socket" not in args:           # never the host's own
            args = ("--pod-resources-socket", os.path.join(pod_resources_dir, "kubelet.sock")) + tuple(args)
        self.process = PluginProcess(self.tmp, ["--sysfs", sysfs or fake_sysfs, "--procfs", fake_procfs,
                                                "--device-plugin-path", self.dir] + list(args), env=env, module=True)

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
    --rescan-interval (0.5 s, the default); both under systemd's watchdog as
    the unit sets it (WatchdogSec=30s: a WATCHDOG=1 every 15 s)."""
    import grpc
    import socket
    notify_dir = tempfile.mkdtemp(prefix="isolcpu-bench-notify-")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(os.path.join(notify_dir, "notify"))
    env = {"NOTIFY_SOCKET": os.path.join(notify_dir, "notify"), "WATCHDOG_USEC": "30000000"}
    rigs = {"real /sys, uevents": Rig("--cpus", "1", sysfs="/sys", env=env),
            "fake tree, polling 0.5 s": Rig(env=env)}
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
        notify.close()
        shutil.rmtree(notify_dir, True)
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


def protobuf_runtime():
    from google.protobuf.internal import api_implementation
    import google.protobuf
    return "protobuf %s (%s)" % (google.protobuf.__version__, api_implementation.Type())


def nri_node(root, containers=250, envs=30):
    """A fake host of 32 CPUs (2-15,18-31 isolated) with the kubelet's device
    checkpoint and CPU manager record for `containers` containers, half of
    them holders of an isolated CPU each, and those containers as NRI sends
    them ({"pods", "containers"} dicts), each with `envs` variables."""
    sysfs, procfs = fake_host(os.path.join(root, "host"), sockets=2, cores=8, threads=2, isolated="2-15,18-31")
    dp, kubelet = os.path.join(root, "device-plugins"), os.path.join(root, "kubelet")
    pods, items, entries, exclusive = [], [], [], {}
    for i in range(containers):
        pod = nri_pod("app-%d" % i, "ns-%d" % (i % 10))
        holder = i % 2 == 0
        env = ["VAR_%02d=value-%02d" % (k, k) for k in range(envs - 1)]
        if holder:
            cpu = [2, 3, 4, 5, 18, 19][i % 6]
            env.append("ISOLCPUS=%d" % cpu)
            entries.append({"PodUID": pod["uid"], "ContainerName": "c", "ResourceName": "windriver.com/isolcpus",
                            "DeviceIDs": {"0": [str(cpu)]}, "AllocResp": "Cg8KCElTT0xDUFVTEgMyLTM="})
            exclusive[pod["uid"]] = {"c": "0"}
        else:
            env.append("OTHER=1")
        pods.append(pod)
        items.append(nri_container(pod, "c", cpus="0" if holder else "0-1,16-17", env=env))
    write_files(root, {"device-plugins/kubelet_internal_checkpoint": json.dumps(
        {"Data": {"PodDeviceEntries": entries, "RegisteredDevices": {"windriver.com/isolcpus": []}}, "Checksum": 1}),
        "kubelet/cpu_manager_state": json.dumps({"policyName": "static", "defaultCpuSet": "0-1,16-17",
                                                 "entries": exclusive, "checksum": 1})})
    flags = ["--sysfs", sysfs, "--procfs", procfs, "--device-plugin-path", dp, "--kubelet-dir", kubelet,
             "--pod-resources-socket", "off"]
    return flags, pods, items


def bench_nri(args):
    """Time inside the plugin per NRI request, from the request's bytes to
    the answer's, the way the runtime side handles them (decode, rule,
    encode, its log line), with 250 containers known from a Synchronize, a
    typical pod's request (30 environment variables) and the checkpoint
    unchanged; and one re-read of that checkpoint after the kubelet rewrote it."""
    import asyncio
    import concurrent.futures
    root = tempfile.mkdtemp(prefix="isolcpu-bench-nri-")
    log_sink = open(os.devnull, "w")
    try:
        flags, pods, items = nri_node(root)
        config = plugin.parse_config(flags + ["--nri", "on"], {})
        plugin.configure_logging("info")
        plugin.log.handlers[0].stream = log_sink           # one line per adjustment, as it logs it
        inventory = plugin.CpuInventory(plugin.Host(config.sysfs, config.procfs))
        api = plugin.load_grpc()
        worker = concurrent.futures.ThreadPoolExecutor(1)
        loop = asyncio.new_event_loop()

        async def off_loop(function, *call_args):
            return await loop.run_in_executor(worker, lambda: function(*call_args))

        session = plugin.NriSession(config, api, inventory, plugin.InstanceLock(config.device_plugin_path),
                                    plugin.Conditions(), plugin.Counters(), off_loop)
        sync = pb_encode(NRI_SYNCHRONIZE_REQUEST, {"pods": pods, "containers": items})
        loop.run_until_complete(session.handle("Synchronize", sync))
        assert len(session.containers) == len(items)
        creates = [pb_encode(NRI_CREATE_CONTAINER_REQUEST, {"pod": pods[i], "container": items[i]})
                   for i in range(len(items))]
        updates = [pb_encode(NRI_UPDATE_CONTAINER_REQUEST, {"pod": pods[i], "container": items[i],
                                                            "linux_resources": nri_linux_resources("0-1,16-17")})
                   for i in range(1, len(items), 2)]

        def timed(method, payloads, count):
            samples = []
            for n in range(count):
                started = time.perf_counter()
                loop.run_until_complete(session.handle(method, payloads[n % len(payloads)]))
                samples.append((time.perf_counter() - started) * 1000)
            return percentiles(samples, 3)
        timed("CreateContainer", creates, 200)                  # warm up
        result = {"containers_known": len(session.containers), "request_bytes": len(creates[0]),
                  "protobuf": protobuf_runtime(),
                  "create_ms": timed("CreateContainer", creates, args.nri_requests),
                  "update_ms": timed("UpdateContainer", updates, args.nri_requests)}
        path = os.path.join(config.device_plugin_path, plugin.CHECKPOINT_NAME)
        rereads = []
        for n in range(50):
            os.utime(path, ns=(n, n))                           # what the kubelet's rewrite changes
            started = time.perf_counter()
            grants, why = session.checkpoint.read()
            rereads.append((time.perf_counter() - started) * 1000)
            assert grants is not None, why
        result["checkpoint_reread_ms"] = percentiles(rereads, 3)
        result["checkpoint_bytes"] = os.path.getsize(path)
        loop.close()
        worker.shutdown()
        return result
    finally:
        plugin.log.handlers[:] = []
        log_sink.close()
        shutil.rmtree(root, True)


def print_nri(result):
    c, u, r = result["create_ms"], result["update_ms"], result["checkpoint_reread_ms"]
    print("NRI, inside the plugin, %d containers known, %s (targets: p99 <= 1 ms; a re-read <= 5 ms)"
          % (result["containers_known"], result["protobuf"]))
    print("  CreateContainer (%d-byte request): p50 %.3f ms  p99 %.3f ms  (%d)" % (result["request_bytes"], c["p50"],
                                                                               c["p99"], c["n"]))
    print("  UpdateContainer:                  p50 %.3f ms  p99 %.3f ms  (%d)" % (u["p50"], u["p99"], u["n"]))
    print("  checkpoint re-read (%d bytes):  p50 %.3f ms  p99 %.3f ms" % (result["checkpoint_bytes"], r["p50"],
                                                                          r["p99"]))


def bench_containerd(args):
    """CreateContainer through CRI on a real containerd with NRI on, without
    and with the plugin connected, in alternating rounds on one machine."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import cri_client
    script = os.path.join(ROOT, "tools", "ci", "containerd.sh")
    directory = tempfile.mkdtemp(prefix="ctrd-", dir="/tmp")
    root = tempfile.mkdtemp(prefix="isolcpu-bench-ctrd-")
    started = subprocess.run([script, "start", directory], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             universal_newlines=True)
    if started.returncode != 0:
        shutil.rmtree(root, True)
        return {"skipped": "containerd did not start: %s" % started.stdout.strip().splitlines()[-1:]}
    process = None
    try:
        env = cri_client.read_env_file(os.path.join(directory, "env"))
        client = cri_client.CriClient(env["CONTAINERD_SOCKET"])
        client.wait_ready()
        flags, _, _ = nri_node(root, containers=0)
        pod = client.run_pod_sandbox("bench", uid=str(__import__("uuid").uuid4()),
                                     cgroup_parent="%s/pod-bench" % env["CONTAINERD_CGROUP_ROOT"])
        envs = {"VAR_%02d" % i: "value-%02d" % i for i in range(30)}
        without, with_plugin = [], []
        log_size = os.path.getsize(env["CONTAINERD_LOG"])
        for round_ in range(args.containerd_rounds):
            without += cri_client.time_create_container(client, pod, env["CONTAINERD_IMAGE"], 20, "0-1", envs,
                                                        name="without-%d" % round_)
            process = PluginProcess(root, flags + ["--nri", "on", "--nri-socket", env["CONTAINERD_NRI_SOCKET"],
                                                   "--log-level", "warning"], module=True)
            connected = 'plugin \\"90-isolcpu-plugin\\" connected'
            deadline = time.monotonic() + 20
            while True:
                with open(env["CONTAINERD_LOG"]) as f:
                    f.seek(log_size)
                    text = f.read()
                if connected in text:
                    break
                assert time.monotonic() < deadline, "the plugin did not connect"
                time.sleep(0.02)
            log_size += len(text.encode())
            with_plugin += cri_client.time_create_container(client, pod, env["CONTAINERD_IMAGE"], 20, "0-1", envs,
                                                            name="with-%d" % round_)
            process.stop(signal.SIGTERM)
            process = None
        return {"without_ms": cri_client.percentiles(without), "with_ms": cri_client.percentiles(with_plugin),
                "containerd": env.get("CONTAINERD_VERSION", "?"), "protobuf": protobuf_runtime()}
    finally:
        if process is not None:
            process.stop(signal.SIGKILL)
        subprocess.run([script, "stop", directory], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(root, True)


def print_containerd(result):
    if "skipped" in result:
        print("CreateContainer on a real containerd: skipped (%s)" % result["skipped"])
        return
    w, p = result["without_ms"], result["with_ms"]
    print("CreateContainer on containerd %s, 30 env vars, interleaved (target: p50 with the plugin within 2 ms "
          "of without; the plugin on %s)" % (result["containerd"], result["protobuf"]))
    print("  without the plugin: p50 %6.2f ms  p99 %6.2f ms  (%d)" % (w["p50"], w["p99"], w["n"]))
    print("  with the plugin:    p50 %6.2f ms  p99 %6.2f ms  (%d)  p50 difference %+.2f ms"
          % (p["p50"], p["p99"], p["n"], p["p50"] - w["p50"]))


PROBE = """
import sys, time, grpc
sys.path.insert(0, sys.argv[2])
import deviceplugin_pb2 as pb, deviceplugin_pb2_grpc as pb_grpc
stub = pb_grpc.DevicePluginStub(grpc.insecure_channel("unix:" + sys.argv[1]))
stub.GetDevicePluginOptions(pb.Empty(), timeout=30)
print("ready", flush=True)
while not sys.stdin.closed:
    started = time.monotonic()
    stub.GetDevicePluginOptions(pb.Empty(), timeout=30)
    now = time.monotonic()
    print("%.6f %.6f" % (now, now - started), flush=True)
    time.sleep(0.001)
"""


NRI_RUNTIME = """
import os, sys
sys.path.insert(0, sys.argv[2])
from test_isolcpu_plugin import FakeNriRuntime, NRI_SYNCHRONIZE_REQUEST, nri_container, nri_pod, pb_encode
holder = nri_pod("dpdk-0", "net")
one = len(pb_encode(NRI_SYNCHRONIZE_REQUEST, {"pods": [], "containers": [nri_container(holder, "c-0")]}))
containers = [nri_container(holder, "c-%d" % i, cpus="0-15") for i in range(int((4 << 20) * 0.97 / one))]
size = len(pb_encode(NRI_SYNCHRONIZE_REQUEST, {"pods": [holder], "containers": containers}))
print(size, len(containers), flush=True)
runtime = FakeNriRuntime(os.path.join(sys.argv[1], "nri.sock"), pods=[holder], containers=containers,
                         request_timeout=30.0).start()
runtime.wait_ready(timeout=120)
print("ready", flush=True)
sys.stdin.read()
runtime.stop()
"""


class LoopProbe(object):
    """GetDevicePluginOptions on a plugin's socket, back to back, from a
    process of its own (the bench's threads would hold its own GIL): the
    longest round trip while an input is worked on is how long the plugin's
    event loop stalled (a round trip is ~0.5 ms otherwise)."""

    def __init__(self, socket_path):
        self.proc = subprocess.Popen([sys.executable, "-c", PROBE, socket_path, ROOT], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, universal_newlines=True)
        assert self.proc.stdout.readline().strip() == "ready"
        self.samples = []                    # (end, seconds), monotonic
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            end, seconds = line.split()
            self.samples.append((float(end), float(seconds)))

    def longest(self, since):
        """The longest round trip ended after `since` (monotonic), in ms."""
        return round(1000 * max([seconds for end, seconds in list(self.samples) if end >= since] or [0]), 1)

    def close(self):
        self.proc.kill()
        self.proc.wait()
        self.thread.join(10)


def bench_stall(args):
    """The largest input each byte bound admits, each worked on by a running
    plugin while LoopProbe asks it: PodResources' List answer (grpc's 4 MiB)
    and the kubelet's checkpoint (4 MiB), parsed for /metrics; an isolated
    cpu-list as long as the parser takes (rescan); a /proc/cmdline of its
    64 KiB bound with isolcpus= that long (SIGHUP); an NRI Synchronize of
    about 4 MiB (the ttrpc bound)."""
    results = []

    def measure(name, size, start, trigger, finished, extra=()):
        rig = start()
        probe = None
        try:
            rig.kubelet.wait_list(lambda devices: devices, timeout=60)
            probe = LoopProbe(os.path.join(rig.dir, "windriver.com-isolcpus.sock"))
            # the plugin's event loop and the probe ahead of this harness's own threads (a fake
            # runtime encodes megabytes in Python): the stall measured is the plugin's, not the CPU's
            for pid in (rig.pid, probe.proc.pid):
                for tid in task_files(pid, "comm"):      # every thread: nice is per thread on Linux
                    os.setpriority(os.PRIO_PROCESS, tid, -10)
            # past the start's question on holders (a scrape within 1 s of it would share it)
            deadline = time.monotonic() + 30
            while "the kubelet reports" not in rig.process.log() and "who holds the" not in rig.process.log():
                assert time.monotonic() < deadline, rig.process.log()[-2000:]
                time.sleep(0.05)
            time.sleep(1.5)
            idle = probe.longest(time.monotonic() - 1.0)
            began = time.monotonic()
            trigger(rig)
            finished(rig)
            time.sleep(0.2)
            results.append({"input": name, "bytes": size, "stall_ms": probe.longest(began), "idle_ms": idle,
                            "took_ms": round(1000 * (time.monotonic() - began - 0.2))})
        finally:
            if probe is not None:
                probe.close()
            rig.close()

    # PodResources: pods naming one CPU each, up to grpc's 4 MiB receive limit
    pods = (4 << 20) // len(many_pods_holding(1))
    while len(many_pods_holding(pods)) > (4 << 20) - 4096:     # the fake kubelet's own pods take the rest
        pods -= 1000
    answer = many_pods_holding(pods)

    def pod_resources_rig():
        rig = Rig("--metrics-address", "127.0.0.1:0", "--log-level", "info", pod_resources=True)
        rig.kubelet.pod_resources_extra = answer
        return rig

    def scrape(rig):
        status, body = http_get(metrics_port(rig.process), "/metrics", timeout=60)
        assert status == 200 and "isolcpu_device_holders" in body, body[-300:]
    measure("PodResources List, pods naming one CPU", len(answer), pod_resources_rig, scrape, lambda rig: None)

    # the kubelet's checkpoint: entries of the plugin's resource, up to its 4 MiB bound
    entry = {"PodUID": "00000000-0000-0000-0000-000000000000", "ContainerName": "c",
             "ResourceName": "windriver.com/isolcpus", "DeviceIDs": {"0": ["3"]}, "AllocResp": "A" * 64}
    count = int((plugin.CHECKPOINT_LIMIT - 200) / (len(json.dumps(entry)) + 2))
    checkpoint = json.dumps({"Data": {"PodDeviceEntries": [entry] * count, "RegisteredDevices": {}}, "Checksum": 1})
    while len(checkpoint) > plugin.CHECKPOINT_LIMIT:
        count -= 100
        checkpoint = json.dumps({"Data": {"PodDeviceEntries": [entry] * count}, "Checksum": 1})

    def checkpoint_rig():
        rig = Rig("--metrics-address", "127.0.0.1:0", "--log-level", "info", "--pod-resources-socket", "off")
        write_files(rig.dir, {"kubelet_internal_checkpoint": checkpoint})
        return rig
    measure("kubelet checkpoint, entries naming one CPU", len(checkpoint), checkpoint_rig, scrape, lambda rig: None)

    # an isolated file as long as a cpu-list may be, of regions that each name every CPU
    limit = plugin.cpu_list_limit(8191)
    regions = ("0-8191:1/2,1-8191:1/2," * (limit // 22 + 1))[:limit]
    regions = regions[:regions.rfind(",")]

    def isolated_rig():
        return Rig("--log-level", "info")

    def write_isolated(rig):
        rig.set_cpu_file("isolated", regions + "\n")

    def wait_isolated(rig):
        rig.kubelet.wait_list(lambda devices: len(devices) == 16, timeout=10)
    measure("isolated cpu-list, stride groups naming every CPU", len(regions), isolated_rig, write_isolated,
            wait_isolated)

    # /proc/cmdline at its bound, its isolcpus= as long as a cpu-list may be, read on SIGHUP
    cmdline = ("quiet " * 3000)[:(64 << 10) - limit - 40] + " isolcpus=" + regions.replace("8191", "15")

    def cmdline_rig():
        rig = Rig("--log-level", "info", "--source", "cmdline")
        write_files(rig.host_root, {"proc/cmdline": cmdline + "\n"})
        return rig

    def sighup(rig):
        rig.process.proc.send_signal(signal.SIGHUP)
        rig.process.wait_log("SIGHUP", timeout=10)
    measure("/proc/cmdline with isolcpus=, on SIGHUP", len(cmdline), cmdline_rig, sighup, lambda rig: time.sleep(0.5))

    # NRI: a Synchronize of about 4 MiB, from a fake runtime in a process of its own at the lowest
    # priority (its Python encoding of megabytes would otherwise take the CPU the plugin needs)
    runtime = {}

    def nri_rig():
        runtime["dir"] = tempfile.mkdtemp(prefix="isolcpu-bench-nri-")
        return Rig("--log-level", "info", "--nri", "on", "--nri-socket", os.path.join(runtime["dir"], "nri.sock"))

    def serve_nri(rig):
        runtime["proc"] = subprocess.Popen([sys.executable, "-c", NRI_RUNTIME, runtime["dir"], ROOT],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, universal_newlines=True,
                                           preexec_fn=lambda: os.nice(19))
        runtime["size"] = runtime["proc"].stdout.readline().split()

    def synchronized(rig):
        line = runtime["proc"].stdout.readline().strip()
        runtime["proc"].stdin.close()
        runtime["proc"].wait(30)
        shutil.rmtree(runtime["dir"], True)
        assert line == "ready", line
    measure("NRI Synchronize", None, nri_rig, serve_nri, synchronized)
    results[-1]["input"] = "NRI Synchronize, %s containers" % runtime["size"][1]
    results[-1]["bytes"] = int(runtime["size"][0])
    return results


def print_stall(rows):
    print("Event-loop stall for the largest input each bound admits (target: < 50 ms; a probe's round trip "
          "while idle in brackets)")
    for row in rows:
        print("  %-52s %9d bytes: longest stall %6.1f ms (idle %.1f ms); worked on for %d ms"
              % (row["input"], row["bytes"], row["stall_ms"], row["idle_ms"], row["took_ms"]))


SECTIONS = collections.OrderedDict([
    ("start", (bench_start, print_start)), ("rpc", (bench_rpc, print_rpc)),
    ("restart", (bench_restart, print_restart)), ("idle", (bench_idle, print_idle)),
    ("hotplug", (bench_hotplug, print_hotplug)), ("policy", (bench_policy, print_policy)),
    ("nri", (bench_nri, print_nri)), ("containerd", (bench_containerd, print_containerd)),
    ("stall", (bench_stall, print_stall))])


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
    parser.add_argument("--nri-requests", type=int, default=2000, help="NRI requests timed, each kind")
    parser.add_argument("--containerd-rounds", type=int, default=5, help="rounds of 20 creates without and with")
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
