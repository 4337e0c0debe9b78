"""Tests for isolcpu_plugin: run with `python3 -m unittest` in the project root.

Parsing and topology are tested on their own and on fake sysfs/procfs trees;
topology also against hwloc on the real machines in ../shared/fixtures/sysfs
(skipped when that folder or lstopo is absent). The plugin itself runs as a
real process, over real unix sockets, against FakeKubelet: an in-process
kubelet that does what the kubelet's device manager does.
"""

import asyncio
import collections
import contextlib
import gc
import hashlib
import io
import itertools
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.request
import uuid
import xml.etree.ElementTree as ElementTree

import isolcpu_plugin as plugin
from isolcpu_plugin import InputError, format_cpu_list, parse_cpu_list

HERE = os.path.dirname(os.path.abspath(__file__))
PLUGIN = os.path.join(HERE, "isolcpu_plugin.py")
CORPUS = os.environ.get("ISOLCPU_TEST_CORPUS") or os.path.join(HERE, "..", "shared", "fixtures", "sysfs")

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
try:
    import grpc
    from concurrent import futures
    import deviceplugin_pb2 as pb
    import deviceplugin_pb2_grpc as pb_grpc
except ImportError:                                  # parsing tests still run
    grpc = None

needs_grpc = unittest.skipIf(grpc is None, "grpcio/protobuf not installed")
plugin.log.handlers[:] = [logging.NullHandler()]     # in-process warnings: asserted, not printed
plugin.log.propagate = False


# ---------------------------------------------------------------------------
# Fake host trees
# ---------------------------------------------------------------------------

def write_files(root, files):
    """Create files under root from {relative path: text}, each replaced at
    once, as sysfs changes (a reader never sees half a file)."""
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".new", "w") as f:
            f.write(text)
        os.rename(path + ".new", path)


def cpu_mask(cpus, words=2):
    value = sum(1 << c for c in cpus)
    return ",".join("%08x" % ((value >> (32 * i)) & 0xFFFFFFFF) for i in reversed(range(words)))


def fake_host(root, sockets=1, cores=4, threads=2, isolated="2-3,6-7", offline=(),
              node_ids=None, numa=True, masks_only=False, cmdline="root=/dev/sda1 quiet",
              kernel_max=63, isolated_file=True, extra=None):
    """A sysfs+procfs tree of a machine numbered as Linux numbers x86:
    thread t of core c of socket s is CPU t*(sockets*cores) + s*cores + c.
    NUMA node per socket (ids from node_ids). Offline CPUs lose topology/.
    Returns (sysfs, procfs)."""
    per_thread = sockets * cores
    total = per_thread * threads
    node_ids = node_ids or list(range(sockets))
    files = {
        "proc/cmdline": cmdline + "\n",
        "sys/devices/system/cpu/possible": "0-%d\n" % (total - 1),
        "sys/devices/system/cpu/present": "0-%d\n" % (total - 1),
        "sys/devices/system/cpu/online": format_cpu_list(set(range(total)) - set(offline)) + "\n",
        "sys/devices/system/cpu/kernel_max": "%d\n" % kernel_max,
    }
    if isolated_file:
        files["sys/devices/system/cpu/isolated"] = isolated + "\n"
    for cpu in range(total):
        thread, rest = divmod(cpu, per_thread)
        sock, core = divmod(rest, cores)
        base = "sys/devices/system/cpu/cpu%d/" % cpu
        if cpu:
            files[base + "online"] = "0\n" if cpu in offline else "1\n"
        if cpu in offline:
            continue
        siblings = [t * per_thread + rest for t in range(threads)]
        package = [c for c in range(total) if (c % per_thread) // cores == sock]
        topo = base + "topology/"
        files[topo + "physical_package_id"] = "%d\n" % sock
        files[topo + "core_id"] = "%d\n" % core
        files[topo + "thread_siblings"] = cpu_mask(siblings) + "\n"
        files[topo + "core_siblings"] = cpu_mask(package) + "\n"
        if not masks_only:
            files[topo + "thread_siblings_list"] = format_cpu_list(siblings) + "\n"
            files[topo + "core_cpus_list"] = format_cpu_list(siblings) + "\n"
            files[topo + "package_cpus_list"] = format_cpu_list(package) + "\n"
    if numa:
        for sock, node in enumerate(node_ids):
            cpus = [c for c in range(total) if (c % per_thread) // cores == sock]
            online = [c for c in cpus if c not in offline]
            files["sys/devices/system/node/node%d/cpulist" % node] = format_cpu_list(online) + "\n"
            for cpu in cpus:                        # the link stays while a CPU is offline
                os.makedirs(os.path.join(root, "sys/devices/system/cpu/cpu%d/node%d" % (cpu, node)),
                            exist_ok=True)
    files.update(extra or {})
    write_files(root, files)
    return os.path.join(root, "sys"), os.path.join(root, "proc")


def fake_caches(sockets=1, cores=4, threads=2, cores_per_l3=2, l3_index=3, online=None):
    """Cache files for fake_host()'s numbering: L1d, L1i and L2 per core,
    an L3 per `cores_per_l3` cores, as list and mask; L3 in index `l3_index`
    (2 swaps it with the L2, as some machines number them). As the kernel
    does, the lists leave out CPUs not in `online`, which have no caches."""
    per_thread = sockets * cores
    total = per_thread * threads
    online = set(range(total)) if online is None else set(online)
    files = {}
    for cpu in sorted(online):
        rest = cpu % per_thread
        core = [t * per_thread + rest for t in range(threads)]
        first = rest // cores_per_l3 * cores_per_l3
        l3 = [t * per_thread + r for t in range(threads) for r in range(first, first + cores_per_l3)]
        for index, level, kind, cpus in ((0, 1, "Data", core), (1, 1, "Instruction", core),
                                         (5 - l3_index, 2, "Unified", core), (l3_index, 3, "Unified", l3)):
            cpus = [c for c in cpus if c in online]
            base = "sys/devices/system/cpu/cpu%d/cache/index%d/" % (cpu, index)
            files.update({base + "level": "%d\n" % level, base + "type": kind + "\n",
                          base + "id": "%d\n" % (first if level == 3 else rest),
                          base + "shared_cpu_list": format_cpu_list(cpus) + "\n",
                          base + "shared_cpu_map": cpu_mask(cpus) + "\n"})
    return files


def plugin_env(extra=None):
    """This environment without ISOLCPU_* (each would set one of the plugin's
    flags), plus `extra`: what a plugin process under test gets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISOLCPU_")}
    env.update(extra or {})
    return env


def task_files(pid, name):
    """{thread id: text of /proc/PID/task/TID/NAME} over the process's
    threads; a thread that ends meanwhile is left out (grpc retires some)."""
    texts = {}
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/%s" % (pid, tid, name)) as f:
                texts[int(tid)] = f.read()
        except OSError:
            pass
    return texts


class TempDirTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="isolcpu-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)


def run_main(args):
    """plugin.main() in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = plugin.main(args, environ={})
    return code, out.getvalue(), err.getvalue()


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------

class CpuListTests(unittest.TestCase):
    def parse(self, text, last=15, top=63):
        return sorted(parse_cpu_list(text, last, top))

    def test_grammar_matches_the_kernel(self):
        cases = {
            "": [], "  \n": [], "3": [3], "0-3": [0, 1, 2, 3], "1,3,5": [1, 3, 5],
            " 2-4 , 7 \n": [2, 3, 4, 7], "1,,3": [1, 3], ",1, 3,": [1, 3], "1\t2": [1, 2],
            "0-15:2/4": [0, 1, 4, 5, 8, 9, 12, 13], "0-9:1/3": [0, 3, 6, 9],
            "0-10:3/4": [0, 1, 2, 4, 5, 6, 8, 9, 10], "4-4:0/1": [],
            "N": [15], "12-N": [12, 13, 14, 15], "all": list(range(16)), "ALL": list(range(16)),
            "all:1/8": [0, 8], "2-5,3-4": [2, 3, 4, 5], "007": [7],
            "2-5,3": [2, 3, 4, 5], "9,2-3,0-15:8/16,2": [0, 1, 2, 3, 4, 5, 6, 7, 9],   # overlapping, unsorted
        }
        for text, expected in cases.items():
            with self.subTest(text=text):
                self.assertEqual(self.parse(text), expected)

    def test_leading_zeros_do_not_make_a_number_large(self):
        # the kernel's _parse_integer reads any number of digits; only the
        # value must fit a u32: 00000000002 is 2 (it was "too large")
        cases = {
            "00000000002": [2], "0" * 40 + "15": [15], "000000000001-0000000000003": [1, 2, 3],
            "0-00000000000015:00000000001/000000000004": [0, 4, 8, 12],
            "0-1:1/000000000004294967295": [0], "0" * 49000 + "7": [7],
        }
        for text, expected in cases.items():
            with self.subTest(text=text[:30]):
                self.assertEqual(sorted(parse_cpu_list(text, 15, 8191)), expected)
        for text in ("0-1:1/00000000004294967296", "0-1:000000000099999999999/1"):
            with self.subTest(text=text):
                with self.assertRaises(InputError) as caught:
                    self.parse(text)
                self.assertIn("too large", str(caught.exception))

    def test_errors_name_the_bad_token(self):
        cases = {
            "1-x": "'1-x'", "5-3": "'5-3'", "0-7:3/2": "'0-7:3/2'", "0-7:1/0": "'0-7:1/0'",
            "3:1/2": "'3:1/2'", "1-": "'1-'", "-1": "'-1'", "a": "'a'", "1 2-": "'2-'",
            "0x3": "'0x3'", "allx": "'allx'", "n": "'n'", "1.5": "'1.5'", "\u0663": "'\u0663'",
            "1\x002": "'1\\x002'", "٣-4": "'٣-4'",
        }
        for text, named in cases.items():
            with self.subTest(text=text):
                with self.assertRaises(InputError) as caught:
                    self.parse(text)
                self.assertIn(named, str(caught.exception))

    def test_work_is_bounded_by_the_highest_possible_cpu(self):
        for text in ("64", "0-4294967295", "0-99999999999999999999", "1-" + "9" * 5000, "all:1/2,70"):
            with self.subTest(text=text[:30]):
                started = time.monotonic()
                with self.assertRaises(InputError) as caught:
                    self.parse(text)
                self.assertLess(time.monotonic() - started, 0.5)
                self.assertLess(len(str(caught.exception)), 200)
        self.assertEqual(self.parse("63"), [63])

    def test_work_follows_the_regions_not_the_cpus_they_name(self):
        # as many regions, each naming 8,192 CPUs or 2: ranges merge as they
        # come, so the cost is the regions' (it was CPUs named x times named)
        def cost(text):
            best = float("inf")
            for _ in range(5):
                started = time.perf_counter()
                parse_cpu_list(text, 8191, 8191)
                best = min(best, time.perf_counter() - started)
            return best
        for wide, narrow in (("0-8191,", "0-1,"), ("0-8191:1/2,", "0-3:1/2,"), ("all,", "N,")):
            with self.subTest(wide=wide):
                self.assertLess(cost(wide * 2000) / cost(narrow * 2000), 8)

    def test_stride_numbers_do_not_size_the_work(self):
        # a-b:used/group built a used-bit number before cutting it to the
        # range: 0-1:3999999999/4000000000 (25 bytes) took 4.4 s and 1 GB.
        # Counted: the peak memory of the parse, against a 2-CPU range
        import tracemalloc
        for text in ("0-1:99999999/100000000", "0-1:1/199999999", "N-N:149999999/150000000",
                     "all:99999999/100000000", "8000-8191:99999999/100000000"):
            with self.subTest(text=text):
                tracemalloc.start()
                try:
                    plugin.cpu_list_bits(text, 8191, 8191)    # the bitmap: a set of 8,192 CPUs is 1 MB itself
                    peak = tracemalloc.get_traced_memory()[1]
                finally:
                    tracemalloc.stop()
                self.assertLess(peak, 64 * 1024)

    def test_strides_match_the_kernel(self):
        # bitmap_set_region (lib/bitmap-str.c): for (start = r->start;
        # start <= r->end; start += r->group_len) set min(end - start + 1, off)
        # bits, all unsigned int: a group of 2**32 - d with d <= start wraps
        # the loop back to start - d, start - 2d, ... (checked against that C loop)
        cases = {
            "0-1:3999999999/4000000000": [0, 1], "0-1:1/4294967295": [0], "0-5:1/7": [0],
            "2-5:3/100": [2, 3, 4], "0-15:5/6": [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15],
            "0-15:0/9": [], "3-3:4294967295/4294967295": [0, 1, 2, 3], "0-9:4294967294/4294967295": list(range(10)),
            "5-10:1/4294967295": [0, 1, 2, 3, 4, 5], "3-10:2/4294967294": [1, 2, 3, 4],
            "7-12:3/4294967291": [2, 3, 4, 7, 8, 9], "15-N:1/4294967295": list(range(16)),
            "1-3:0/4294967295": [], "4-9:4294967290/4294967290": [4, 5, 6, 7, 8, 9],
        }
        for text, expected in cases.items():
            with self.subTest(text=text):
                self.assertEqual(self.parse(text), expected)

    def test_a_number_of_2_to_the_32_or_more_is_refused_as_the_kernel_does(self):
        # bitmap_getnum: n != (u32)n is -EOVERFLOW, in every position
        for text in ("0-1:1/4294967296", "0-1:4294967296/4294967296", "4294967296",
                     "0-4294967296", "0-1:1/9999999999", "all:1/4294967296"):
            with self.subTest(text=text):
                with self.assertRaises(InputError) as caught:
                    self.parse(text)
                self.assertIn(repr(text), str(caught.exception))

    def test_a_list_longer_than_the_kernel_takes_is_refused_before_any_work(self):
        # cpuset.cpus takes at most 100 + 6 * NR_CPUS bytes (kernel/cgroup/cpuset.c)
        limit = 100 + 6 * 8192
        longest = "2-5,3," * ((limit - 1) // 6) + "7"
        longest += " " * (limit - len(longest))
        self.assertEqual(sorted(parse_cpu_list(longest, 8191, 8191)), [2, 3, 4, 5, 7])
        for text in (longest + "0", "x" + longest):
            with self.subTest(length=len(text), start=text[:3]):
                with self.assertRaises(InputError) as caught:
                    parse_cpu_list(text, 8191, 8191)
                self.assertIn("%d characters" % len(text), str(caught.exception))    # not the bad token: no loop ran
                self.assertIn(str(limit), str(caught.exception))
        # a command line's worth is always taken, however few CPUs the kernel has
        self.assertEqual(sorted(parse_cpu_list(("1," * 4096)[:4095], 3, 3)), [1])

    def test_brief_cpu_list_is_bounded(self):
        self.assertEqual(plugin.brief_cpu_list([1, 2, 3]), "1-3")
        text = plugin.brief_cpu_list(range(0, 30000, 3))
        self.assertLess(len(text), 150)
        self.assertTrue(text.startswith("0,3,6,") and text.endswith("... (10000 CPUs)"), text)

    def test_format_is_canonical(self):
        self.assertEqual(format_cpu_list([8, 2, 3, 4, 5]), "2-5,8")
        self.assertEqual(format_cpu_list([3, 11]), "3,11")
        self.assertEqual(format_cpu_list([13, 4, 5, 6]), "4-6,13")
        self.assertEqual(format_cpu_list([0, 1]), "0-1")
        self.assertEqual(format_cpu_list([]), "")

    def test_format_and_parse_round_trip(self):
        rng = random.Random(7)
        for _ in range(500):
            cpus = set(rng.sample(range(128), rng.randint(0, 40)))
            text = format_cpu_list(cpus)
            self.assertEqual(parse_cpu_list(text, 127, 127), cpus)
            self.assertEqual(format_cpu_list(parse_cpu_list(text, 127, 127)), text)

    def test_mask_work_is_linear_in_its_bits(self):
        # 8 times the bits, about 8 times the work (it was 27: a loop over
        # the set bits, each step on the whole number)
        def cost(words):
            text = ",".join(["ffffffff"] * words)
            best = float("inf")
            for _ in range(20):
                started = time.perf_counter()
                plugin.parse_cpu_mask(text, 8191)
                best = min(best, time.perf_counter() - started)
            return best
        self.assertEqual(len(plugin.parse_cpu_mask(",".join(["ffffffff"] * 256), 8191)), 8192)
        self.assertLess(cost(256) / cost(32), 16)

    def test_masks(self):
        mask = plugin.parse_cpu_mask
        self.assertEqual(sorted(mask("00000000,00000101")), [0, 8])
        self.assertEqual(sorted(mask("80000000,00000001")), [0, 63])
        self.assertEqual(sorted(mask("f")), [0, 1, 2, 3])
        self.assertEqual(sorted(mask("00000000")), [])
        for bad in ("", "xyz", "0x1", "1,,2", "123456789", "ffffffff," * 300 + "f"):
            with self.subTest(bad=bad[:20]):
                self.assertRaises(InputError, mask, bad)


class KernelCmdlineTests(unittest.TestCase):
    def test_cmdline_cpu_list_picks_what_the_kernel_applies(self):
        pick = plugin.cmdline_cpu_list
        line = "ro isolcpus=nohz,1 isolcpus=d0main,2 isolcpus=domain,3-4 isolcpus=5 nohz_full=6 nohz_full=7"
        self.assertEqual(pick(line, "isolcpus"), ("1", []))          # the first, whatever its flags
        text, problems = pick(line, "isolcpus", domain_only=True)
        self.assertEqual(text, "3-4")
        self.assertIn("'d0main'", problems[0])
        self.assertEqual(pick(line, "nohz_full"), ("6", []))
        self.assertEqual(pick("ro quiet", "isolcpus"), (None, []))
        self.assertEqual(pick("isolcpus=nohz,2-5", "isolcpus", domain_only=True), (None, []))

    def test_parameters_quotes_and_init_args(self):
        params = plugin.kernel_parameters(
            'BOOT_IMAGE=/vmlinuz "isolcpus=2-3" foo="a b" nohz_full="4-5" quiet -- isolcpus=9')
        self.assertEqual(params, [("BOOT_IMAGE", "/vmlinuz"), ("isolcpus", "2-3"),
                                  ("foo", "a b"), ("nohz_full", "4-5"), ("quiet", "")])

    def test_isolcpus_flags(self):
        parse = plugin.parse_isolcpus
        self.assertEqual(parse("2-5"), ((), "2-5"))
        self.assertEqual(parse("domain,2-5"), (("domain",), "2-5"))
        self.assertEqual(parse("nohz,managed_irq,2-5"), (("nohz", "managed_irq"), "2-5"))
        self.assertEqual(parse("bogus,2-5"), (("bogus",), "2-5"))
        for bad in ("d0main,2-5", "all", "domain"):
            with self.subTest(bad=bad):
                self.assertRaises(InputError, parse, bad)

    def test_which_flags_isolate_from_domains(self):
        isolates = plugin.isolcpus_isolates_domain
        self.assertTrue(isolates(()))
        self.assertTrue(isolates(("domain", "nohz")))
        self.assertTrue(isolates(("bogus",)))               # unknown flags are skipped
        self.assertFalse(isolates(("nohz", "managed_irq")))


class HousekeepingTests(unittest.TestCase):
    def test_housekeeping_is_online_not_isolated_and_allowed(self):
        housekeeping = plugin.housekeeping_cpus
        self.assertEqual(housekeeping(range(8), {1}, {0, 1}), {0})
        self.assertEqual(housekeeping(range(8), {2, 3}, range(8)), {0, 1, 4, 5, 6, 7})
        self.assertEqual(housekeeping({0, 2}, {1}, {1, 3}), set())
        self.assertEqual(housekeeping(range(4), set(), {3, 9}), {3})


class ResourceNameTests(unittest.TestCase):
    def test_kubelet_rules(self):
        for good in ("windriver.com/isolcpus", "example.com/cpu_1", "a/b", "x.y-z.io/A.b-c_9"):
            plugin.check_resource_name(good)
        for bad in ("isolcpus", "a/b/c", "kubernetes.io/cpus", "foo.kubernetes.io/cpus",
                    "requests.example.com/x", "Example.com/x", "example.com/", "/x",
                    "example.com/-x", "example.com/" + "x" * 64, "a" * 254 + "/x", "ex ample.com/x"):
            with self.subTest(bad=bad):
                self.assertRaises(InputError, plugin.check_resource_name, bad)

    def test_socket_name(self):
        self.assertEqual(plugin.socket_name_for("windriver.com/isolcpus"), "windriver.com-isolcpus.sock")


# ---------------------------------------------------------------------------
# Reading the host
# ---------------------------------------------------------------------------

class HostTests(TempDirTest):
    def inventory(self, **kw):
        source = kw.pop("source", "auto")
        cpus = kw.pop("cpus", None)
        sysfs, procfs = fake_host(self.tmp, **kw)
        return plugin.CpuInventory(plugin.Host(sysfs, procfs), source, cpus)

    def test_devices_from_the_isolated_file(self):
        inv = self.inventory(isolated="2-3,6-7")
        self.assertEqual([d.cpu for d in inv.devices], [2, 3, 6, 7])
        info = inv.devices[0].info
        self.assertEqual((info.numa_nodes, info.package, info.core_id, info.thread_siblings),
                         ((0,), 0, 2, (2, 6)))

    def test_lists_and_masks_agree(self):
        with_lists = self.inventory(sockets=2, cores=2, node_ids=[0, 3], isolated="0-7").devices
        shutil.rmtree(self.tmp)
        masks = self.inventory(sockets=2, cores=2, node_ids=[0, 3], isolated="0-7", masks_only=True).devices
        self.assertEqual(with_lists, masks)
        self.assertEqual([d.info.numa_nodes for d in masks], [(0,), (0,), (3,), (3,)] * 2)

    def test_unknown_topology_degrades(self):
        sysfs, procfs = fake_host(self.tmp, numa=False, isolated="1-2", extra={
            "sys/devices/system/cpu/cpu2/topology/core_id": "garbage\n",
            "sys/devices/system/cpu/cpu2/topology/core_cpus_list": "\x01\x02\n"})
        shutil.rmtree(os.path.join(sysfs, "devices/system/cpu/cpu1/topology"))
        inv = plugin.CpuInventory(plugin.Host(sysfs, procfs), "auto")
        one, two = inv.devices
        self.assertEqual(one.info, plugin.unknown_cpu_info(1))
        self.assertEqual((two.info.numa_nodes, two.info.core_id, two.info.package), ((), None, 0))
        self.assertEqual(two.info.thread_siblings, (2, 6))        # from the mask file instead

    def test_offline_cpu_is_unhealthy_and_keeps_its_node_link(self):
        inv = self.inventory(isolated="2-3", offline=[3])
        self.assertEqual([(d.cpu, d.healthy) for d in inv.devices], [(2, True), (3, False)])
        self.assertEqual(inv.devices[1].info.numa_nodes, (0,))
        self.assertEqual(inv.devices[1].info.thread_siblings, ())

    def test_per_cpu_online_files_without_online_list(self):
        sysfs, procfs = fake_host(self.tmp, isolated="1-3", offline=[2])
        os.unlink(os.path.join(sysfs, "devices/system/cpu/online"))
        inv = plugin.CpuInventory(plugin.Host(sysfs, procfs), "auto")
        self.assertEqual([(d.cpu, d.healthy) for d in inv.devices], [(1, True), (2, False), (3, True)])

    def test_a_cpu_without_its_own_online_file_is_online(self):
        # no global list: cpu0 (never hotpluggable on x86) and cpu5 have no
        # online file of their own, so they cannot be offline
        sysfs, procfs = fake_host(self.tmp, isolated="0-5", offline=[2])
        os.unlink(os.path.join(sysfs, "devices/system/cpu/online"))
        os.unlink(os.path.join(sysfs, "devices/system/cpu/cpu5/online"))
        inv = plugin.CpuInventory(plugin.Host(sysfs, procfs), "auto")
        self.assertEqual([(d.cpu, d.healthy) for d in inv.devices],
                         [(0, True), (1, True), (2, False), (3, True), (4, True), (5, True)])

    def test_change_lines_print_canonical_ranges(self):
        sysfs, procfs = fake_host(self.tmp, sockets=2, cores=4, isolated="1-7,9-15")
        inv = plugin.CpuInventory(plugin.Host(sysfs, procfs), "auto")
        write_files(self.tmp, {"sys/devices/system/cpu/online": "0-3,7-12\n",
                               "sys/devices/system/cpu/isolated": "1-7,9-14\n"})
        change = inv.scan()
        self.assertIn("removed 15", change)
        self.assertIn("now unhealthy (offline) 4-6,13-14", change)
        self.assertIn("healthy 1-3,7,9-12", change)

    def test_cpus_the_host_lacks_are_dropped(self):
        inv = self.inventory(cpus="6-9,40")
        self.assertEqual([d.cpu for d in inv.devices], [6, 7])
        shutil.rmtree(self.tmp)
        with self.assertLogs(plugin.log, "WARNING") as logged:     # said in a bounded line, whatever was listed
            inv = self.inventory(cpus="6-8191:1/2", kernel_max=8191)
        self.assertEqual([d.cpu for d in inv.devices], [6])
        self.assertIn("lists CPUs 8,10,12,", logged.output[0])
        self.assertIn("(4092 CPUs) that this host does not have", logged.output[0])
        self.assertLess(len(logged.output[0]), 400)

    def test_sources(self):
        cmdline = "ro isolcpus=nohz,managed_irq,1 isolcpus=domain,4-5 nohz_full=6-7 quiet"
        cases = [
            (dict(source="auto", isolated_file=False), [4, 5]),
            (dict(source="auto", isolated_file=True, isolated="2"), [2]),
            (dict(source="isolated", isolated="3"), [3]),
            (dict(source="cmdline", isolated="3"), [1]),
            (dict(source="nohz_full"), [6, 7]),
            (dict(source="auto", cpus="0,7"), [0, 7]),
        ]
        for kw, expected in cases:
            with self.subTest(**kw):
                shutil.rmtree(self.tmp)
                inv = self.inventory(cmdline=cmdline, **kw)
                self.assertEqual([d.cpu for d in inv.devices], expected)

    def test_auto_ignores_isolcpus_without_domain(self):
        inv = self.inventory(isolated_file=False, cmdline="isolcpus=nohz,managed_irq,2-5")
        self.assertEqual(inv.devices, ())

    def test_nohz_full_file_null_and_padding(self):
        inv = self.inventory(source="nohz_full", extra={
            "sys/devices/system/cpu/nohz_full": "              (null)\n"}, cmdline="nohz_full=1")
        self.assertEqual(inv.devices, ())

    def test_bad_source_file_is_an_error_naming_it(self):
        sysfs, procfs = fake_host(self.tmp, isolated="2-x")
        with self.assertRaises(InputError) as caught:
            plugin.CpuInventory(plugin.Host(sysfs, procfs), "auto")
        self.assertIn("isolated", str(caught.exception))
        self.assertIn("'2-x'", str(caught.exception))

    def test_a_failed_scan_keeps_the_last_good_state(self):
        sysfs, procfs = fake_host(self.tmp, isolated="2-3")
        inv = plugin.CpuInventory(plugin.Host(sysfs, procfs), "auto")
        before = (inv.devices, inv.served, inv.online, inv.origin)
        for name, text in (("isolated", "\xff\xfe garbage"), ("online", "0-x")):
            write_files(self.tmp, {"sys/devices/system/cpu/" + name: text})
            with self.assertRaises(InputError) as caught:
                inv.scan()
            self.assertIn(name, str(caught.exception))
            self.assertEqual((inv.devices, inv.served, inv.online, inv.origin), before)
            write_files(self.tmp, {"sys/devices/system/cpu/isolated": "2-3\n", "sys/devices/system/cpu/online": "0-7\n"})
        write_files(self.tmp, {"sys/devices/system/cpu/isolated": "2-4\n"})
        self.assertIn("added 4", inv.scan())

    def test_junk_after_a_nul_is_a_rescan_error_naming_the_file(self):
        sysfs, procfs = fake_host(self.tmp, isolated="2-3")
        inv = plugin.CpuInventory(plugin.Host(sysfs, procfs), "auto")
        path = os.path.join(sysfs, "devices/system/cpu/isolated")
        for junk in (b"\x00\xff\x01abc", b"2-3\x00abc\n"):
            with open(path, "wb") as f:
                f.write(junk)
            with self.assertRaises(InputError) as caught:
                inv.scan()                          # served: the rescan condition's warning
            self.assertIn(path, str(caught.exception))
            self.assertIn("is not a cpu-list", str(caught.exception))
            self.assertEqual([d.cpu for d in inv.devices], [2, 3])
        for padded in (b"2-4\n\x00", b"2-4\x00\x00\n", b"2-4\n\x00\n\x00"):
            with open(path, "wb") as f:
                f.write(padded)
            inv.scan()
            self.assertEqual([d.cpu for d in inv.devices], [2, 3, 4], padded)

    def test_rescan_sees_offline_and_back(self):
        sysfs, procfs = fake_host(self.tmp, isolated="2-3")
        inv = plugin.CpuInventory(plugin.Host(sysfs, procfs), "auto")
        self.assertIsNone(inv.scan())
        write_files(self.tmp, {"sys/devices/system/cpu/online": "0-2,4-7\n"})
        self.assertIn("now unhealthy (offline) 3", inv.scan())
        write_files(self.tmp, {"sys/devices/system/cpu/online": "0-7\n"})
        self.assertIn("healthy again 3", inv.scan())

    def test_cpu_numbers_are_bounded_by_the_most_any_kernel_has(self):
        # CONFIG_NR_CPUS is at most 8192 on every architecture: a kernel_max
        # above that is not believed, so no list can ask for more work
        sysfs, procfs = fake_host(self.tmp, kernel_max=999999)
        self.assertEqual(plugin.Host(sysfs, procfs).max_cpu, 8191)
        write_files(self.tmp, {"sys/devices/system/cpu/kernel_max": "4095\n"})
        self.assertEqual(plugin.Host(sysfs, procfs).max_cpu, 4095)

    def test_a_work_bomb_in_the_isolated_file_is_refused_at_once(self):
        # 126 KB of 0-8191 took 5.3 s to parse, on every rescan
        sysfs, procfs = fake_host(self.tmp, isolated="0-8191," * 18000, kernel_max=8191)
        with self.assertRaises(InputError) as caught:
            plugin.CpuInventory(plugin.Host(sysfs, procfs), "auto")
        self.assertIn(os.path.join(sysfs, "devices/system/cpu/isolated"), str(caught.exception))
        self.assertIn("126000 characters", str(caught.exception))

    def test_a_command_line_longer_than_a_kernel_keeps_is_refused(self):
        # COMMAND_LINE_SIZE is 2-4 KiB by default and bootconfig adds at most
        # 32 KiB; splitting 1 MiB of parameters held the event loop ~80 ms
        limit = 64 << 10
        padding = "quiet " * (limit // 6)
        sysfs, procfs = fake_host(self.tmp, isolated_file=False, cmdline=("isolcpus=2-3 " + padding)[:limit - 1])
        self.assertEqual(os.path.getsize(os.path.join(procfs, "cmdline")), limit)
        inv = plugin.CpuInventory(plugin.Host(sysfs, procfs), "auto")
        self.assertEqual([d.cpu for d in inv.devices], [2, 3])
        write_files(self.tmp, {"proc/cmdline": "isolcpus=2-3 " + padding * 16})
        with self.assertRaises(InputError) as caught:
            inv.reload()
        self.assertIn(os.path.join(procfs, "cmdline"), str(caught.exception))
        self.assertIn("larger than 65536 bytes", str(caught.exception))

    def llc_and_kinds(self, extra, **kw):
        sysfs, procfs = fake_host(self.tmp, isolated="0-7", extra=extra, **kw)
        inv = plugin.CpuInventory(plugin.Host(sysfs, procfs), "auto")
        return {d.cpu: (d.info.llc_cpus, d.info.core_class) for d in inv.devices}

    def test_last_level_cache_is_the_highest_shared_one_whatever_its_index(self):
        # one socket, 4 cores x 2 threads (core c: CPUs c, c+4), an L3 per 2 cores
        expected = {cpu: ((0, 1, 4, 5), None) if cpu % 4 < 2 else ((2, 3, 6, 7), None) for cpu in range(8)}
        self.assertEqual(self.llc_and_kinds(fake_caches()), expected)
        shutil.rmtree(self.tmp)
        self.assertEqual(self.llc_and_kinds(fake_caches(l3_index=2)), expected)
        shutil.rmtree(self.tmp)
        lists_only = {path: text for path, text in fake_caches().items() if not path.endswith("_map")}
        masks_only = {path: text for path, text in fake_caches().items() if not path.endswith("_list")}
        self.assertEqual(self.llc_and_kinds(lists_only), expected)
        shutil.rmtree(self.tmp)
        self.assertEqual(self.llc_and_kinds(masks_only), expected)
        shutil.rmtree(self.tmp)
        # an L3 per core is private, and so is every cache: no last-level cache to share
        self.assertEqual(self.llc_and_kinds(fake_caches(cores_per_l3=1)), {cpu: ((), None) for cpu in range(8)})
        shutil.rmtree(self.tmp)
        # a higher-level instruction cache is not the last-level one
        files = fake_caches(cores_per_l3=1)
        files.update({"sys/devices/system/cpu/cpu%d/cache/index4/%s" % (cpu, name): text for cpu in range(8)
                      for name, text in (("level", "4\n"), ("type", "Instruction\n"), ("shared_cpu_list", "0-7\n"))})
        self.assertEqual(self.llc_and_kinds(files), {cpu: ((), None) for cpu in range(8)})

    def test_last_level_cache_files_that_contradict_themselves_are_unknown(self):
        base = "sys/devices/system/cpu/cpu%d/cache/index3/"
        cases = [
            # cpu0's list and mask disagree, neither holding the other: its whole L3 is unknown
            ({base % 0 + "shared_cpu_map": cpu_mask([0, 1, 2, 3]) + "\n"}, {0, 1, 4, 5}),
            # cpu5 says its L3 is another one
            ({base % 5 + "shared_cpu_list": "0-7\n"}, {0, 1, 4, 5}),
            # cpu2's list does not hold cpu2
            ({base % 2 + "shared_cpu_list": "3,6-7\n", base % 2 + "shared_cpu_map": cpu_mask([3, 6, 7]) + "\n"},
             {2, 3, 6, 7}),
            # garbage, or a level that is no number: unknown, the rest as it was
            ({base % 1 + "shared_cpu_list": "\x01garbage\n", base % 1 + "shared_cpu_map": "zz\n"}, {0, 1, 4, 5}),
            ({base % 1 + "level": "three\n"}, {0, 1, 4, 5}),
        ]
        for files, unknown in cases:
            with self.subTest(files=sorted(files)):
                shutil.rmtree(self.tmp, True)
                got = self.llc_and_kinds(dict(fake_caches(), **files))
                self.assertEqual({cpu for cpu, (llc, kind) in got.items() if not llc}, unknown)
                self.assertTrue(all(llc == ((0, 1, 4, 5) if cpu % 4 < 2 else (2, 3, 6, 7))
                                    for cpu, (llc, kind) in got.items() if cpu not in unknown))
        # CPU 7 offline: the lists leave it out, or (seen on real kernels) the masks alone do
        for lists_name_it in (False, True):
            shutil.rmtree(self.tmp)
            files = fake_caches(online=range(7))
            if lists_name_it:
                files.update({base % cpu + "shared_cpu_list": "2-3,6-7\n" for cpu in (2, 3, 6)})
            got = self.llc_and_kinds(files, offline=[7])
            l3 = (2, 3, 6, 7) if lists_name_it else (2, 3, 6)
            self.assertEqual([got[cpu] for cpu in (2, 3, 6, 7)], [(l3, None)] * 3 + [((), None)])

    def test_last_level_cache_leaves_out_cpus_the_host_does_not_have(self):
        # an L3 naming CPUs that are not present (no cpuN, beyond `present`):
        # they went into llc_cpus (0-1,4-5,40-50 on an 8-CPU host), and the
        # policy would count them as cache mates. hwloc's cache objects hold
        # only the machine's CPUs; so do these, the cache itself stays
        base = "sys/devices/system/cpu/cpu%d/cache/index3/"
        expected = {cpu: ((0, 1, 4, 5), None) if cpu % 4 < 2 else ((2, 3, 6, 7), None) for cpu in range(8)}
        for ghosts, extra in (("40-50", {}), ("8,63", {}),
                              ("8-9", {"sys/devices/system/cpu/possible": "0-15\n"})):   # possible, not present
            with self.subTest(ghosts=ghosts, extra=extra):
                shutil.rmtree(self.tmp, True)
                files = dict(fake_caches(), **extra)
                files.update({base % cpu + "shared_cpu_list": "0-1,4-5,%s\n" % ghosts for cpu in (0, 1, 4, 5)})
                self.assertEqual(self.llc_and_kinds(files), expected)

    def test_kinds_of_core_from_capacities_and_pmu_lists(self):
        capacity = "sys/devices/system/cpu/cpu%d/cpu_capacity"
        gb10 = {capacity % cpu: "%d\n" % c for cpu, c in enumerate([718, 731, 718, 731, 997, 1017, 1024, 1017])}
        self.assertEqual({cpu: kind for cpu, (llc, kind) in self.llc_and_kinds(gb10).items()},
                         {0: 1, 1: 1, 2: 1, 3: 1, 4: 0, 5: 0, 6: 0, 7: 0})
        cases = [
            ({capacity % cpu: "1024\n" for cpu in range(8)}, [None] * 8),                   # one kind
            ({capacity % cpu: "%d\n" % (1024 - 7 * cpu) for cpu in range(8)}, [None] * 8),   # within 5 %
            (dict(gb10, **{capacity % 5: "fast\n"}), [1, 1, 1, 1, 0, None, 0, 0]),
            (dict(gb10, **{capacity % 1: "-5\n", capacity % 2: ""}), [1, None, None, 1, 0, 0, 0, 0]),
            ({"sys/devices/cpu_core/cpus": "0-1,4-5\n", "sys/devices/cpu_atom/cpus": "2-3,6-7\n"},
             [0, 0, 1, 1, 0, 0, 1, 1]),
            # the PMU lists win over capacities; a CPU in both, or in neither, is unknown
            (dict(gb10, **{"sys/devices/cpu_core/cpus": "0-2\n", "sys/devices/cpu_atom/cpus": "2-6\n"}),
             [0, 0, None, 1, 1, 1, 1, None]),
            ({"sys/devices/cpu_core/cpus": "0-7\n", "sys/devices/cpu_atom/cpus": "\n"}, [None] * 8),
            (dict(gb10, **{"sys/devices/cpu_core/cpus": "garbage\n"}), [1, 1, 1, 1, 0, 0, 0, 0]),
        ]
        for files, kinds in cases:
            with self.subTest(files=sorted(files.items())[:2]):
                shutil.rmtree(self.tmp)
                self.assertEqual([kind for cpu, (llc, kind) in sorted(self.llc_and_kinds(files).items())], kinds)

    def test_hotplug_rereads_the_caches_of_the_cpus_sharing_them(self):
        sysfs, procfs = fake_host(self.tmp, isolated="1-3,5-7", extra=fake_caches())
        inv = plugin.CpuInventory(plugin.Host(sysfs, procfs), "auto")
        cpu_dir = os.path.join(sysfs, "devices/system/cpu")

        def hotplug(online):
            for cpu in set(range(8)) - set(online):
                shutil.rmtree(os.path.join(cpu_dir, "cpu%d" % cpu, "cache"), True)
            write_files(self.tmp, dict(fake_caches(online=online), **{
                "sys/devices/system/cpu/online": format_cpu_list(online) + "\n"}))
            inv.scan()
            return {d.cpu: d.info.llc_cpus for d in inv.devices if d.cpu in (1, 5)}

        for online, l3 in ((set(range(8)) - {4}, (0, 1, 5)),          # a CPU not served goes
                           (set(range(8)), (0, 1, 4, 5)),              # ... and comes back
                           (set(range(8)) - {5}, (0, 1, 4)),           # a served one goes
                           (set(range(8)) - {4, 5}, (0, 1)),
                           (set(range(8)), (0, 1, 4, 5))):
            with self.subTest(online=format_cpu_list(online)):
                self.assertEqual(hotplug(online), {cpu: l3 if cpu in online else () for cpu in (1, 5)})

    def test_seven_field_cpu_info_still_builds(self):
        info = plugin.CpuInfo(3, (0,), 0, None, None, 3, (3, 7))
        self.assertEqual((info.llc_cpus, info.core_class), ((), None))
        self.assertEqual(plugin.unknown_cpu_info(3)[7:], ((), None))

    def test_host_files_are_opened_so_they_cannot_block(self):
        path = os.path.join(self.tmp, "fifo")
        os.mkfifo(path)
        started = time.monotonic()
        with self.assertRaises(InputError) as caught:
            plugin.read_host_file(path)
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertIn("not a regular file", str(caught.exception))
        with self.assertRaises(InputError) as caught:
            plugin.read_host_file(self.tmp)
        self.assertIn("not a regular file", str(caught.exception))
        self.assertIsNone(plugin.read_host_file(os.path.join(self.tmp, "missing")))
        big = os.path.join(self.tmp, "big")
        with open(big, "wb") as f:
            f.write(b"7" * 5000)
        self.assertEqual(plugin.read_host_file(big, limit=5000), b"7" * 5000)
        with self.assertRaises(InputError) as caught:
            plugin.read_host_file(big, limit=4999)
        self.assertIn("larger than 4999 bytes", str(caught.exception))


# ---------------------------------------------------------------------------
# The real-machine corpus against hwloc
# ---------------------------------------------------------------------------

LSTOPO = shutil.which("lstopo-no-graphics")

# Where hwloc knowingly corrects the kernel the plugin follows the kernel
# (fixtures README): written out here from each fixture's own files.
KERNEL_OVERRIDES = {
    "8em64t-2s2ca2c-buggynuma": {"numa": lambda cpu: list(range(8))},
    "64amd64-4s2n4ca2co": {"siblings": lambda cpu: [cpu & ~1, cpu | 1]},
    "fakeheterocpunuma": {"numa": lambda cpu: sorted(
        node for node, cpus in {0: range(0, 4), 1: range(8, 12), 3: range(20, 24),
                                4: range(16, 24), 5: range(12, 24)}.items() if cpu in cpus)},
}


# Dumps whose cache files contradict themselves: there null is as right as
# hwloc's answer (each reason read off the dump's own files).
SELF_CONTRADICTING_CACHES = {
    # cpu2's index3 shared_cpu_map says 0-3, its shared_cpu_list 2,6,...,38
    "40intel64-4n10c+pci-conflicts": "list and map disagree",
    # every CPU's shared_cpu_list is cpu0's (0-7 for L3), the masks differ
    "64fake-4n2s2ca2c2t": "lists copied from cpu0",
}


def hwloc_bitmap(text):
    """hwloc's "0x00000003,0x0000000f" bitmaps (32-bit words, most significant first)."""
    value = 0
    for word in text.split(","):                  # an empty word is a zero word
        value = (value << 32) | int(word[2:] if word.startswith("0x") else word or "0", 16)
    return {bit for bit in range(value.bit_length()) if value >> bit & 1}


def hwloc_xml(root):
    """lstopo's XML for a fixture, parsed."""
    env = dict(os.environ, HWLOC_FSROOT=root, HWLOC_COMPONENTS="linux,-x86")
    xml = subprocess.run([LSTOPO, "--no-io", "--disallowed", "--of", "xml", "-"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=True).stdout
    return ElementTree.fromstring(xml)


def hwloc_truth(root):
    """{pu: (thread siblings, local NUMA nodes)} from lstopo's XML for a fixture
    (siblings empty where hwloc has no Core for the PU)."""
    tree = hwloc_xml(root)
    nodes = [(int(o.get("os_index")), hwloc_bitmap(o.get("cpuset")))
             for o in tree.iter("object") if o.get("type") == "NUMANode"]
    truth = {}

    def walk(obj, core):
        if obj.get("type") == "Core":
            core = obj
        if obj.get("type") == "PU":
            pu = int(obj.get("os_index"))
            # no Core object: hwloc does not know the core either
            siblings = ({int(p.get("os_index")) for p in core.iter("object") if p.get("type") == "PU"}
                        if core is not None else set())
            truth[pu] = (sorted(siblings), sorted(n for n, cpus in nodes if pu in cpus))
        for child in obj.findall("object"):
            walk(child, core)

    walk(tree.find("object"), None)
    return truth


HWLOC_DATA_CACHES = {"L%dCache" % level: level for level in range(1, 6)}     # hwloc's L1i... are instruction caches


def hwloc_caches_and_kinds(tree, siblings):
    """({pu: CPUs of its last-level cache or None}, {pu: kind of core or
    None}) from lstopo's XML, as the plugin defines them. The cache: the
    highest-level data or unified cache above the PU that holds more than
    siblings(pu). The kinds: hwloc's CPU kinds that carry a Linux capacity,
    fastest first (hwloc ranks them by efficiency, 0 the most frugal),
    capacities within 5 % of a kind's highest being that kind; None for
    every PU with one kind, or with kinds from frequencies alone."""
    caches = {}

    def walk(obj, above):
        if obj.get("type") in HWLOC_DATA_CACHES:
            above = above + [{int(p.get("os_index")) for p in obj.iter("object") if p.get("type") == "PU"}]
        if obj.get("type") == "PU":
            pu = int(obj.get("os_index"))
            caches[pu] = next((sorted(cpus) for cpus in above if cpus - set(siblings(pu))), None)
        for child in obj.findall("object"):
            walk(child, above)

    walk(tree.find("object"), [])
    measured = []
    for kind in tree.iter("cpukind"):
        info = {i.get("name"): i.get("value") for i in kind.findall("info")}
        if "LinuxCapacity" in info:
            measured.append((-int(kind.get("forced_efficiency", "0")), int(info["LinuxCapacity"]),
                             hwloc_bitmap(kind.get("cpuset"))))
    kinds, kind, top = {}, -1, None
    for _, capacity, cpus in sorted(measured, key=lambda m: m[:2]):
        if top is None or capacity * 100 < top * 95:
            kind, top = kind + 1, capacity
        kinds.update((cpu, kind) for cpu in cpus)
    if kind < 1:
        kinds = {}
    return caches, {pu: kinds.get(pu) for pu in caches}


def extract_machine(archive, dest, only_cpu_files=False):
    """Unpack one corpus machine (NAME.tar.bz2 -> dest/NAME/...)."""
    if shutil.which("tar") and shutil.which("bzip2"):     # 15x faster than tarfile for whole machines
        pattern = ["--wildcards", "*/sys/devices/system/*"] if only_cpu_files else []
        subprocess.run(["tar", "-xjf", archive, "-C", dest] + pattern, check=True)
        return
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if not only_cpu_files or "/sys/devices/system/" in m.name]
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}   # 3.12+ warns without one
        tar.extractall(dest, members, **safe)


def cpu_nodes_in_kernel(sysfs):
    """NUMA nodes that hold CPUs per the kernel's own files (not memory-only tiers)."""
    node_dir = os.path.join(sysfs, "devices/system/node")
    if not os.path.isdir(node_dir):
        return None
    result = set()
    for name in os.listdir(node_dir):
        if name.startswith("node") and name[4:].isdigit():
            for file, empty in (("cpulist", ""), ("cpumap", None)):
                path = os.path.join(node_dir, name, file)
                if os.path.exists(path):
                    with open(path, "rb") as f:
                        text = f.read().split(b"\0")[0].decode().strip()
                    if (text != empty) if empty is not None else text.strip("0,"):
                        result.add(int(name[4:]))
                    break
    return result


@unittest.skipUnless(os.path.isdir(CORPUS) and LSTOPO, "sysfs corpus or lstopo-no-graphics absent")
class CorpusTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        # 127k small files: on tmpfs 1-2 s, on this CI's ext4 10-35 s
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        cls.tmp = tempfile.mkdtemp(prefix="isolcpu-corpus-", dir=shm)
        for name in sorted(os.listdir(CORPUS)):
            if name.endswith(".tar.bz2"):
                extract_machine(os.path.join(CORPUS, name), cls.tmp)
        cls.machines = sorted(os.listdir(cls.tmp))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, True)

    def test_corpus_is_complete(self):
        self.assertEqual(len(self.machines), 43)

    def test_list_json_agrees_with_hwloc(self):
        compared = 0
        for machine in self.machines:
            with self.subTest(machine=machine):
                root = os.path.join(self.tmp, machine)
                sysfs = os.path.join(root, "sys")
                code, out, err = run_main(["--sysfs", sysfs, "--procfs", os.path.join(root, "proc"),
                                           "--cpus", "all", "--list", "--json"])
                self.assertEqual(code, 0, err)
                listed = {d["cpu"]: d for d in json.loads(out)["devices"]}
                truth = hwloc_truth(root)
                cpu_nodes = cpu_nodes_in_kernel(sysfs)
                overrides = KERNEL_OVERRIDES.get(machine, {})
                self.assertTrue(set(truth) <= set(listed), "hwloc PUs missing from --list")
                for cpu, (siblings, nodes) in truth.items():
                    if cpu_nodes is None:
                        nodes = []                      # no node/ tree: unknown, not hwloc's fake node 0
                    else:
                        nodes = [n for n in nodes if n in cpu_nodes]
                    nodes = overrides.get("numa", lambda c: nodes)(cpu)
                    siblings = overrides.get("siblings", lambda c: siblings)(cpu)
                    self.assertEqual(listed[cpu]["thread_siblings"], siblings, "cpu %d" % cpu)
                    self.assertEqual(listed[cpu]["numa_nodes"], nodes, "cpu %d" % cpu)
                    compared += 1
        self.assertGreater(compared, 1500)

    def test_last_level_caches_and_kinds_of_core_agree_with_hwloc(self):
        """Every CPU's llc_cpus and core_class in --list --json against
        hwloc. hwloc knows online CPUs only, so a cache is compared on those.
        Where a dump contradicts itself hwloc's answer or null both do."""
        machines = collections.Counter()
        cpus = collections.Counter()
        for machine in self.machines:
            with self.subTest(machine=machine):
                root = os.path.join(self.tmp, machine)
                code, out, err = run_main(["--sysfs", os.path.join(root, "sys"), "--procfs", os.path.join(root, "proc"),
                                           "--cpus", "all", "--list", "--json"])
                self.assertEqual(code, 0, err)
                listed = {d["cpu"]: d for d in json.loads(out)["devices"]}
                tree = hwloc_xml(root)
                truth = hwloc_truth(root)
                siblings = KERNEL_OVERRIDES.get(machine, {}).get("siblings", lambda cpu: truth[cpu][0] or [cpu])
                caches, kinds = hwloc_caches_and_kinds(tree, siblings)
                l3 = any(o.get("type") == "L3Cache" for o in tree.iter("object"))
                shared = False
                for cpu, cache in sorted(caches.items()):
                    got = listed[cpu]["llc_cpus"]
                    got = None if got is None else [c for c in got if c in caches]
                    if machine in SELF_CONTRADICTING_CACHES and got is None:
                        cpus["null allowed"] += 1
                        continue
                    self.assertEqual(got, cache, "cpu %d" % cpu)
                    cpus["compared"] += 1
                    cpus["llc"] += cache is not None
                    shared = shared or cache is not None
                for cpu, kind in sorted(kinds.items()):
                    self.assertEqual(listed[cpu]["core_class"], kind, "cpu %d" % cpu)
                    cpus["kinds"] += kind is not None
                machines["L3"] += l3
                machines["llc", l3] += shared
                machines["kinds"] += any(kind is not None for kind in kinds.values())
        self.assertEqual(machines["L3"], 25)                 # machines where hwloc finds an L3 at all
        self.assertEqual(machines["llc", True], 21)          # ... shared by cores: 4 have an L3 per core
        self.assertEqual(machines["kinds"], 2)               # fakeheterocpunuma, nvidia-dgx-gb10
        self.assertEqual(cpus["kinds"], 44)
        self.assertGreater(cpus["compared"], 1500)
        self.assertGreater(cpus["llc"], 800)

    def test_doctor_core_kinds_agrees_with_hwloc(self):
        statuses = collections.Counter()
        for machine in self.machines:
            with self.subTest(machine=machine):
                root = os.path.join(self.tmp, machine)
                truth = hwloc_truth(root)
                kinds = hwloc_caches_and_kinds(hwloc_xml(root), lambda cpu: truth[cpu][0])[1]
                code, out, err = run_main(["--doctor", "--json", "--cpus", "all",
                                           "--sysfs", os.path.join(root, "sys"), "--procfs", os.path.join(root, "proc"),
                                           "--kubelet-dir", os.path.join(self.tmp, "no-kubelet"),
                                           "--device-plugin-path", os.path.join(self.tmp, "no-kubelet"),
                                           "--pod-resources-socket", "off"])
                self.assertIn(code, (0, 1), err)
                check = {c["id"]: c for c in json.loads(out)["checks"]}["core-kinds"]
                slower = {cpu for cpu, kind in kinds.items() if kind}
                self.assertEqual(set(expand_cpu_list(check["cpus"])), slower, check["found"])
                self.assertEqual(check["status"] == "WARN", bool(slower), check["found"])
                statuses[check["status"]] += 1
        self.assertEqual(statuses["WARN"], 2)
        self.assertEqual(statuses["PASS"], 1)                  # 128arm-2pa2n8cluster4co: cpu_capacity 1024 on all

    def test_doctor_smt_siblings_agrees_with_hwloc(self):
        compared = warned = 0
        for machine in self.machines:
            with self.subTest(machine=machine):
                root = os.path.join(self.tmp, machine)
                truth = hwloc_truth(root)
                siblings = KERNEL_OVERRIDES.get(machine, {}).get("siblings", lambda cpu: truth[cpu][0])
                cpus = sorted(truth)
                isolated = set(cpus[1::2]) | set(cpus[-4:])         # every other PU, and the last whole cores
                code, out, err = run_main(["--doctor", "--json", "--cpus", format_cpu_list(isolated),
                                           "--sysfs", os.path.join(root, "sys"), "--procfs", os.path.join(root, "proc"),
                                           "--kubelet-dir", os.path.join(self.tmp, "no-kubelet"),
                                           "--device-plugin-path", os.path.join(self.tmp, "no-kubelet"),
                                           "--pod-resources-socket", "off"])
                self.assertIn(code, (0, 1), err)
                check = {c["id"]: c for c in json.loads(out)["checks"]}["smt-siblings"]
                shared = {cpu for cpu in isolated if set(siblings(cpu)) - isolated}
                self.assertEqual(set(expand_cpu_list(check["cpus"])), shared, check["found"])
                self.assertEqual(check["status"], "WARN" if shared else "PASS" if any(
                    siblings(cpu) for cpu in isolated) else "SKIP")
                compared += 1
                warned += bool(shared)
        self.assertEqual(compared, 43)
        self.assertGreaterEqual(warned, 12)      # the choice splits cores on the SMT machines whose siblings lie an odd distance apart

    def test_listing_never_fails_and_ids_are_cpus(self):
        for machine in self.machines:
            with self.subTest(machine=machine):
                root = os.path.join(self.tmp, machine)
                for source in ("auto", "cmdline", "nohz_full"):
                    code, out, err = run_main(["--sysfs", os.path.join(root, "sys"), "--procfs",
                                               os.path.join(root, "proc"), "--source", source,
                                               "--list", "--json"])
                    if code == 2:                     # e.g. no /proc/cmdline in this dump
                        self.assertEqual(len(err.strip().splitlines()), 1, err)
                        continue
                    self.assertEqual(code, 0, err)
                    for device in json.loads(out)["devices"]:
                        self.assertEqual(device["id"], str(device["cpu"]))


# ---------------------------------------------------------------------------
# Preferred allocation
# ---------------------------------------------------------------------------

def synthetic_infos(sockets=1, cores=4, threads=2, nodes_per_socket=1, node_ids=None, unknown=(),
                    cores_per_cache=None, kinds=None, numa=True):
    """{cpu: CpuInfo} of a machine numbered as Linux numbers x86 (thread t of
    core c of socket s is CPU t*(sockets*cores) + s*cores + c); nodes split
    each socket's cores evenly; CPUs in `unknown` have no topology at all.
    With cores_per_cache, a last-level cache per that many cores of a socket
    (core c's is the cache of cores c // cores_per_cache); with kinds, core
    c of each socket is of kind kinds[c] (0 the fastest); numa=False: no
    CPU's NUMA node is known (a kernel without NUMA)."""
    per_thread = sockets * cores
    node_ids = node_ids or list(range(sockets * nodes_per_socket))
    infos = {}
    for cpu in range(per_thread * threads):
        rest = cpu % per_thread
        sock, core = divmod(rest, cores)
        node = node_ids[sock * nodes_per_socket + core * nodes_per_socket // cores]
        siblings = tuple(t * per_thread + rest for t in range(threads))
        cache = ()
        if cores_per_cache:
            first = sock * cores + core // cores_per_cache * cores_per_cache
            cache = tuple(sorted(t * per_thread + c for t in range(threads)
                                 for c in range(first, first + cores_per_cache)))
        infos[cpu] = plugin.CpuInfo(cpu, (node,) if numa else (), sock, None, None, core, siblings, cache,
                                    kinds[core] if kinds else None)
    for cpu in unknown:
        infos[cpu] = plugin.unknown_cpu_info(cpu)
    return infos


def oracle_ranks_1_4(infos, available, must, size):
    """The best (NUMA nodes, physical cores, (mixed kinds, slowest kind),
    last-level caches) over every valid answer, by exhaustive search.
    Unknown topology: a node, a core and a cache of the CPU's own; an
    unknown NUMA node is its core's (thread siblings share a node; on a
    machine where no node is known that orders answers as one node for all
    would); an unknown cache is its core's; an unknown kind is slower than
    any."""
    def nodes(cpu):
        info = infos.get(cpu)
        if info and info.numa_nodes:
            return set(info.numa_nodes)
        return {("core", frozenset(info.thread_siblings))} if info and info.thread_siblings else {("cpu", cpu)}

    def core(cpu):
        info = infos.get(cpu)
        return frozenset(info.thread_siblings) if info and info.thread_siblings else ("cpu", cpu)

    def cache(cpu):
        info = infos.get(cpu)
        return frozenset(info.llc_cpus) if info and info.llc_cpus else core(cpu)

    def kind(cpu):
        info = infos.get(cpu)
        return info.core_class if info and info.core_class is not None else float("inf")

    best = None
    for extra in itertools.combinations(sorted(set(available) - set(must)), size - len(must)):
        chosen = set(must) | set(extra)
        kinds = {kind(c) for c in chosen}
        cost = (len(set().union(*(nodes(c) for c in chosen))), len({core(c) for c in chosen}),
                (len(kinds) > 1, max(kinds)), len({cache(c) for c in chosen}))
        if best is None or cost < best:
            best = cost
    return best


def random_infos(rng):
    """A small random machine for the oracle: 1-3 NUMA nodes (or none known,
    or one node's CPUs of unknown node), 1-2 last-level caches per node of
    1-3 cores of 1, 2 or 4 threads (a cache sometimes unknown, or across two
    nodes), one, two or three kinds of core (a core's kind sometimes unknown)."""
    numa = rng.random() < 0.75
    lost_node = rng.randrange(3) if numa and rng.random() < 0.25 else None
    kinds = rng.choice([1, 2, 3, 3])
    infos, caches, cpu, core_id = {}, [], 0, 0
    for node in range(rng.randint(1, 3)):
        for _ in range(rng.randint(1, 2)):
            cores = []
            for _ in range(rng.randint(1, 3)):
                threads = rng.choice([1, 2, 2, 4]) if cpu < 12 else 1
                kind = rng.randrange(kinds) if kinds > 1 and rng.random() > 0.15 else None
                cores.append((node, tuple(range(cpu, cpu + threads)), kind, core_id))
                cpu += threads
                core_id += 1
            caches.append(cores)
    if len(caches) > 2 and rng.random() < 0.15:
        caches[0] += caches.pop()
    for cores in caches:
        cache = tuple(c for _, siblings, _, _ in cores for c in siblings) if rng.random() > 0.15 else ()
        for node, siblings, kind, core in cores:
            nodes = (node,) if numa and node != lost_node else ()
            for c in siblings:
                infos[c] = plugin.CpuInfo(c, nodes, node, None, None, core, siblings, tuple(sorted(cache)), kind)
    return infos


def corpus_infos(machine):
    """{cpu: CpuInfo} of one machine of the sysfs corpus, or None without it."""
    path = os.path.join(CORPUS, machine + ".tar.bz2")
    if not os.path.exists(path):
        return None
    tmp = tempfile.mkdtemp(prefix="isolcpu-machine-")
    try:
        extract_machine(path, tmp, only_cpu_files=True)
        top = os.listdir(tmp)[0]
        host = plugin.Host(os.path.join(tmp, top, "sys"), os.path.join(tmp, top, "proc"))
        return host.cpu_topology(sorted(host.present_cpus()))
    finally:
        shutil.rmtree(tmp, True)


class PreferredAllocationTests(unittest.TestCase):
    def prefer(self, infos, available, must=(), size=1):
        cpus, problems = plugin.preferred_allocation(plugin.cpu_placements(infos), available, must, size)
        return cpus

    def check_against_oracle(self, infos, seed, requests=120, max_available=12):
        rng = random.Random(seed)
        placements = plugin.cpu_placements(infos)
        cpus = sorted(infos)
        for _ in range(requests):
            available = rng.sample(cpus, rng.randint(1, min(max_available, len(cpus))))
            must = rng.sample(available, rng.randint(0, min(3, len(available))))
            size = rng.randint(max(1, len(must)), len(available))
            answer, problems = plugin.preferred_allocation(placements, available, must, size)
            context = "available=%s must=%s size=%d -> %s" % (sorted(available), sorted(must), size, answer)
            self.assertEqual(problems, [], context)
            self.assertEqual(len(answer), size, context)
            self.assertEqual(len(set(answer)), size, context)
            self.assertTrue(set(answer) <= set(available), context)
            self.assertTrue(set(must) <= set(answer), context)
            got = oracle_ranks_1_4(infos, answer, answer, size)
            self.assertEqual(got, oracle_ranks_1_4(infos, available, must, size), context)
            shuffled = list(available)
            rng.shuffle(shuffled)
            self.assertEqual(plugin.preferred_allocation(placements, shuffled, list(reversed(must)), size)[0],
                             answer, "not deterministic: " + context)

    def test_oracle_smt1_two_nodes(self):
        self.check_against_oracle(synthetic_infos(sockets=2, cores=6, threads=1), seed=1)

    def test_oracle_smt2_four_nodes(self):
        self.check_against_oracle(synthetic_infos(sockets=2, cores=4, threads=2, nodes_per_socket=2), seed=2)

    def test_oracle_smt4_sparse_node_ids(self):
        self.check_against_oracle(synthetic_infos(sockets=2, cores=2, threads=4, node_ids=[0, 33]), seed=3)

    def test_oracle_smt8(self):
        self.check_against_oracle(synthetic_infos(sockets=1, cores=2, threads=8, nodes_per_socket=2), seed=4)

    def test_oracle_packages_sharing_a_node_and_unknown_cpus(self):
        infos = synthetic_infos(sockets=4, cores=2, threads=2, node_ids=[0, 0, 1, 1], unknown=(5, 13))
        self.check_against_oracle(infos, seed=5)

    def test_oracle_three_kinds_of_core(self):
        # big.LITTLE with a middle kind (cpu_capacity 1024, 800, 400): must CPUs
        # of the middle kind, no other core of it, a fast core beats a slow one
        infos = synthetic_infos(sockets=1, cores=8, threads=1, cores_per_cache=2, kinds=(0, 0, 1, 1, 2, 2, 2, 2))
        self.assertEqual(self.prefer(infos, range(8), must=[2, 3], size=3), [0, 2, 3])
        self.check_against_oracle(infos, seed=14, requests=200)
        infos = synthetic_infos(sockets=2, cores=4, threads=2, cores_per_cache=2, kinds=(0, 1, 2, 2))
        self.check_against_oracle(infos, seed=15, requests=200)

    def test_oracle_a_cpu_of_unknown_kind_among_two(self):
        # an unknown kind is slower than any: the fast cores beside the must
        # cores' kinds, not the unknown one
        C = plugin.CpuInfo
        infos = {cpu: C(cpu, (0,), 0, None, None, core, siblings, cache, kind) for cpu, core, siblings, cache, kind in (
            (0, 0, (0, 1), (0, 1), 0), (1, 0, (0, 1), (0, 1), 0), (2, 1, (2, 3), (2, 3, 4, 5, 6), 0),
            (3, 1, (2, 3), (2, 3, 4, 5, 6), 0), (4, 2, (4,), (2, 3, 4, 5, 6), None),
            (5, 3, (5, 6), (2, 3, 4, 5, 6), 1), (6, 3, (5, 6), (2, 3, 4, 5, 6), 1),
            (7, 4, (7,), (7, 8), 1), (8, 5, (8,), (7, 8), 0))}
        self.assertEqual(self.prefer(infos, [0, 1, 2, 3, 4, 5, 8], must=[0, 5], size=6), [0, 1, 2, 3, 5, 8])
        self.check_against_oracle(infos, seed=16, requests=200)

    def test_oracle_no_numa_node_known(self):
        # a kernel without NUMA: siblings still together, one node for all
        infos = synthetic_infos(sockets=1, cores=4, threads=2, numa=False)          # core c: CPUs c, c+4
        self.assertEqual(self.prefer(infos, range(8), size=4), [0, 1, 4, 5])
        self.assertEqual(self.prefer(infos, [0, 1, 2, 6], size=2), [2, 6])
        self.assertEqual(len({p.numa for p in plugin.cpu_placements(infos).values()}), 1)
        self.check_against_oracle(infos, seed=17)
        self.check_against_oracle(synthetic_infos(sockets=2, cores=2, threads=4, numa=False), seed=18)
        infos = synthetic_infos(sockets=1, cores=8, threads=2, cores_per_cache=4, kinds=(0, 0, 1, 1, 0, 1, 1, 1),
                                numa=False)
        self.check_against_oracle(infos, seed=19, requests=150)

    def test_oracle_a_node_of_unknown_cpus(self):
        # NUMA node 1's list garbled ("NUMA node 1 taken as unknown"): its cores
        # are a node each, last, their siblings still together
        infos = synthetic_infos(sockets=2, cores=3, threads=2)      # node 0: 0-2,6-8; node 1: 3-5,9-11
        for cpu in (3, 4, 5, 9, 10, 11):
            infos[cpu] = infos[cpu]._replace(numa_nodes=())
        self.assertEqual(self.prefer(infos, [1, 7, 3, 9, 4, 10], size=2), [1, 7])
        self.assertEqual(self.prefer(infos, [1, 3, 9, 4, 10], size=2), [3, 9])          # one core: one node
        self.check_against_oracle(infos, seed=20, requests=150)

    def test_oracle_random_machines(self):
        for seed in range(60):
            infos = random_infos(random.Random(seed))
            with self.subTest(seed=seed, machine=sorted(infos.values())):
                self.check_against_oracle(infos, seed=seed, requests=30, max_available=10)

    def test_oracle_corpus_hybrid_machine(self):
        infos = corpus_infos("20em64t-hybrid-1p6c2t+2ca4co1t")
        if infos is None:
            self.skipTest("sysfs corpus absent")
        self.assertEqual(len(infos), 20)
        self.check_against_oracle(infos, seed=6, requests=150)

    def test_oracle_two_caches_per_node(self):
        infos = synthetic_infos(sockets=1, cores=8, threads=2, nodes_per_socket=2, cores_per_cache=2)
        self.check_against_oracle(infos, seed=8, requests=150)

    def test_oracle_smt1_caches_and_two_kinds(self):
        infos = synthetic_infos(sockets=2, cores=6, threads=1, cores_per_cache=3, kinds=(0, 1, 0, 1, 1, 0))
        self.check_against_oracle(infos, seed=9, requests=150)

    def test_oracle_kinds_caches_and_unknown_cpus(self):
        infos = synthetic_infos(sockets=1, cores=8, threads=2, nodes_per_socket=2, cores_per_cache=2,
                                kinds=(0, 0, 1, 1, 1, 0, 0, 1), unknown=(3, 12))
        for cpu in (6, 14):                                                 # core 6: its kind unknown
            infos[cpu] = infos[cpu]._replace(core_class=None)
        for cpu in (7, 15):                                                 # core 7: its cache unknown
            infos[cpu] = infos[cpu]._replace(llc_cpus=())
        self.check_against_oracle(infos, seed=10, requests=150)

    def test_oracle_a_cache_across_two_nodes(self):
        # sub-NUMA clustering: an L3 per socket, split between two NUMA nodes
        infos = synthetic_infos(sockets=2, cores=4, threads=2, nodes_per_socket=2, cores_per_cache=4)
        self.check_against_oracle(infos, seed=13, requests=150)

    def test_oracle_many_nodes_of_two_caches(self):
        # 12 NUMA nodes of 2 caches x 2 cores: more node sets tie on ranks 1-2 than are filled
        infos = synthetic_infos(sockets=1, cores=48, threads=1, nodes_per_socket=12, cores_per_cache=2,
                                kinds=[0, 0, 1, 1] * 12)
        self.check_against_oracle(infos, seed=12, requests=200, max_available=12)

    def test_oracle_corpus_two_kinds_two_caches(self):
        infos = corpus_infos("nvidia-dgx-gb10")                  # 10 little and 10 big cores, an L3 per 10 CPUs
        if infos is None:
            self.skipTest("sysfs corpus absent")
        self.assertEqual(len(infos), 20)
        self.assertEqual({i.core_class for i in infos.values()}, {0, 1})
        self.assertEqual({i.llc_cpus for i in infos.values()}, {tuple(range(10)), tuple(range(10, 20))})
        self.check_against_oracle(infos, seed=11, requests=200)

    def test_oracle_corpus_power_smt4_multi_node(self):
        infos = corpus_infos("256ppc-8n8s4t")
        if infos is None:
            self.skipTest("sysfs corpus absent")
        subset = {cpu: infos[cpu] for cpu in sorted(infos)[:64]}       # two nodes' worth, SMT-4
        self.assertEqual({len(i.thread_siblings) for i in subset.values()}, {4})
        self.check_against_oracle(subset, seed=7, requests=80, max_available=11)

    # Rank 3 ------------------------------------------------------------------

    def test_siblings_together(self):
        infos = synthetic_infos(sockets=1, cores=4, threads=2)             # core c: CPUs c, c+4
        self.assertEqual(self.prefer(infos, range(8), size=2), [0, 4])
        self.assertEqual(self.prefer(infos, [1, 2, 5, 6], size=2), [1, 5])

    def test_partly_taken_core_before_a_free_one(self):
        infos = synthetic_infos(sockets=1, cores=4, threads=2)
        # core 2's sibling 6 is taken: its CPU 2 goes before breaking core 0 or 1
        self.assertEqual(self.prefer(infos, [0, 4, 1, 5, 2], size=1), [2])
        self.assertEqual(self.prefer(infos, [0, 4, 1, 5, 2], size=3), [0, 2, 4])
        self.assertEqual(self.prefer(infos, [0, 4, 1, 5, 2, 3], size=2), [0, 4])   # a whole core wins (rank 2)

    def test_one_package_when_a_node_holds_several(self):
        infos = synthetic_infos(sockets=4, cores=2, threads=2, node_ids=[0, 0, 0, 0])
        self.assertEqual(self.prefer(infos, range(16), size=4), [0, 1, 8, 9])
        self.assertEqual(self.prefer(infos, range(16), must=[3], size=4), [2, 3, 10, 11])

    def test_one_die_and_one_cluster(self):
        infos = {}
        for cpu in range(16):                          # one package, 2 dies x 2 clusters x 4 cores, SMT-1
            die, rest = divmod(cpu, 8)
            infos[cpu] = plugin.CpuInfo(cpu, (0,), 0, die, rest // 4, cpu, (cpu,))
        self.assertEqual(self.prefer(infos, [3, 5, 6, 7, 8, 12, 13, 14], size=3), [5, 6, 7])
        self.assertEqual(self.prefer(infos, [3, 4, 5, 6, 7, 8, 12, 13], size=4), [4, 5, 6, 7])
        self.assertEqual(self.prefer(infos, [0, 1, 8, 9, 10, 11, 12], size=2), [0, 1])

    def test_tightest_node_keeps_big_blocks_free(self):
        infos = synthetic_infos(sockets=2, cores=4, threads=2)   # node 0: 0-3,8-11; node 1: 4-7,12-15
        # node 0 has two free cores, node 1 one: a 1-CPU pod goes to node 1
        self.assertEqual(self.prefer(infos, [2, 3, 7, 10, 11, 15], size=1), [7])
        self.assertEqual(self.prefer(infos, [2, 3, 7, 10, 11, 15], size=4), [2, 3, 10, 11])

    def test_unknown_topology_last(self):
        infos = synthetic_infos(sockets=1, cores=4, threads=1, unknown=(2, 3))
        self.assertEqual(self.prefer(infos, [0, 2, 3], size=2), [0, 2])
        self.assertEqual(self.prefer(infos, [2, 3, 1], size=1), [1])
        self.assertEqual(self.prefer(infos, [2, 3, 99], size=2), [2, 3])       # 99: no topology known

    def test_fewest_nodes_beats_fewest_cores(self):
        infos = synthetic_infos(sockets=2, cores=3, threads=2)
        # node 0: cores {0,6} {1,7} {2,8}; node 1: cores {3,9} {4,10} {5,11}
        self.assertEqual(self.prefer(infos, [0, 1, 2, 3, 9], size=3), [0, 1, 2])       # 1 node, 3 cores
        self.assertEqual(self.prefer(infos, [0, 1, 2, 3, 9, 4, 10], size=3), [3, 4, 9])  # 1 node, 2 cores

    # Ranks 3 and 4 -------------------------------------------------------------

    def test_one_cache_where_it_fits(self):
        infos = synthetic_infos(sockets=1, cores=8, threads=2, cores_per_cache=4)
        # cache A: cores 0-3 (CPUs 0-3,8-11), cache B: cores 4-7 (4-7,12-15); core 0 taken
        free = set(range(16)) - {0, 8}
        self.assertEqual(self.prefer(infos, free, size=8), [4, 5, 6, 7, 12, 13, 14, 15])   # only B holds 4 cores
        self.assertEqual(self.prefer(infos, free, size=6), [1, 2, 3, 9, 10, 11])           # A, the tighter
        self.assertEqual(self.prefer(infos, free, size=2), [1, 9])
        self.assertEqual(self.prefer(infos, free, must=[12], size=4), [4, 5, 12, 13])      # the must CPU's cache
        self.assertEqual(self.prefer(infos, free, size=10), [1, 2, 3, 4, 5, 9, 10, 11, 12, 13])   # two: the fewest
        # fewer cores outrank fewer caches: two whole cores in two caches, not three cores in one
        self.assertEqual(self.prefer(infos, [1, 2, 3, 5, 13], size=4), [1, 2, 5, 13])

    def test_one_kind_of_core_where_one_suffices(self):
        infos = synthetic_infos(sockets=1, cores=8, threads=1, kinds=(1, 1, 1, 1, 0, 0, 0, 0))    # 4-7 fast
        self.assertEqual(self.prefer(infos, range(8), size=2), [4, 5])
        self.assertEqual(self.prefer(infos, range(8), size=4), [4, 5, 6, 7])
        self.assertEqual(self.prefer(infos, [0, 1, 2, 3, 4, 5], size=3), [0, 1, 2])       # all slow, not mixed
        self.assertEqual(self.prefer(infos, [0, 1, 4, 5], size=3), [0, 1, 4])            # mixed: there is no other
        self.assertEqual(self.prefer(infos, [0, 1, 4, 5], must=[1], size=2), [0, 1])     # one kind with the must CPU
        # P-cores with two threads and E-cores with one: fewer cores outrank one kind
        infos = {cpu: plugin.CpuInfo(cpu, (0,), 0, None, None, cpu % 4, siblings, (), kind)
                 for cpu, siblings, kind in ((0, (0, 4), 0), (4, (0, 4), 0), (1, (1, 5), 0), (5, (1, 5), 0),
                                             (2, (2,), 1), (3, (3,), 1))}
        self.assertEqual(self.prefer(infos, [0, 2, 3], size=2), [2, 3])                  # one kind of two cores
        self.assertEqual(self.prefer(infos, [0, 4, 2, 3], size=2), [0, 4])               # one core
        self.assertEqual(self.prefer(infos, [0, 4, 2, 3], size=3), [0, 2, 4])            # two cores, mixed

    def test_one_kind_of_core_outranks_one_cache(self):
        # NVIDIA GB10's layout in small: an L3 per 4 cores, each with two fast and two slow cores
        infos = synthetic_infos(sockets=1, cores=8, threads=1, cores_per_cache=4, kinds=(0, 0, 1, 1, 0, 0, 1, 1))
        self.assertEqual(self.prefer(infos, [0, 2, 3, 4], size=2), [0, 4])               # fast, in two caches
        self.assertEqual(self.prefer(infos, [0, 2, 3, 6], size=2), [2, 3])               # slow in one, not mixed
        self.assertEqual(self.prefer(infos, range(8), size=3), [0, 1, 4])                # the fast ones span two
        self.assertEqual(self.prefer(infos, range(8), size=2), [0, 1])

    def test_the_readme_worked_example(self):
        """The README's table, row by row, as the kubelet asks under each
        topology manager policy. `none` offers every free CPU. `best-effort`,
        `restricted` and `single-numa-node` first narrow the offer to the NUMA
        node the topology manager picks (the lowest-numbered one with room: its
        "narrower, then lower bits" rule) and take a node that fits exactly
        without asking the plugin (NOTES.md section 5)."""
        infos = synthetic_infos(sockets=2, cores=4, threads=2)      # node 0: 0-3,8-11; node 1: 4-7,12-15
        isolated = set(range(16)) - {0, 8}                          # isolcpus=1-7,9-15

        def narrowed(free, size):
            for node in (0, 1):
                offer = sorted(cpu for cpu in free if infos[cpu].numa_nodes == (node,))
                if len(offer) >= size:
                    return offer
            return sorted(free)

        def under_topology_policy(free, size):
            offer = narrowed(free, size)
            return offer if len(offer) == size else self.prefer(infos, offer, size=size)

        rows = [(isolated, 2, "1,9", "1,9"), (isolated, 6, "1-3,9-11", "1-3,9-11"),
                (isolated - {1, 9}, 6, "4-6,12-14", "4-6,12-14"), ({2, 3, 10, 11, 7, 15}, 1, "7", "2")]
        for free, size, with_none, with_topology in rows:
            with self.subTest(free=format_cpu_list(free), size=size):
                self.assertEqual(format_cpu_list(self.prefer(infos, sorted(free), size=size)), with_none)
                self.assertEqual(format_cpu_list(under_topology_policy(free, size)), with_topology)

    def test_the_readme_worked_example_with_two_caches_per_node(self):
        """The README's second table: one socket, two NUMA nodes of two L3
        caches of 4 cores x 2 threads (core c: CPUs c, c+16; L3s 0-3,16-19 |
        4-7,20-23 | 8-11,24-27 | 12-15,28-31), isolcpus=1-15,17-31, under
        each topology manager policy as in the first example."""
        infos = synthetic_infos(sockets=1, cores=16, threads=2, nodes_per_socket=2, cores_per_cache=4)
        isolated = set(range(32)) - {0, 16}

        def under_topology_policy(free, size):
            offer = next((cpus for cpus in ([c for c in sorted(free) if infos[c].numa_nodes == (node,)]
                                            for node in (0, 1)) if len(cpus) >= size), sorted(free))
            return offer if len(offer) == size else self.prefer(infos, offer, size=size)

        rows = [(isolated, 2, "1,17"), (isolated, 6, "1-3,17-19"), (isolated, 8, "4-7,20-23"),
                (isolated - set(range(4, 8)) - set(range(20, 24)), 8, "8-11,24-27"),
                ({2, 3, 18, 19, 7, 23} | set(range(12, 16)) | set(range(28, 32)), 1, "7"),
                (isolated, 10, "1-5,17-21")]
        for free, size, expected in rows:
            with self.subTest(free=format_cpu_list(free), size=size):
                self.assertEqual(format_cpu_list(self.prefer(infos, sorted(free), size=size)), expected)
                self.assertEqual(format_cpu_list(under_topology_policy(free, size)), expected)

    def test_requests_that_cannot_be_met(self):
        placements = plugin.cpu_placements(synthetic_infos(sockets=1, cores=4, threads=2))
        prefer = plugin.preferred_allocation
        self.assertEqual(prefer(placements, [0, 4], [], 5)[0], [0, 4])
        self.assertIn("only 2 available", prefer(placements, [0, 4], [], 5)[1][0])
        cpus, problems = prefer(placements, [0, 1, 5], [4], 2)
        self.assertEqual(cpus, [1, 5])
        self.assertIn("not available", problems[0])
        self.assertEqual(prefer(placements, [0, 4], [], 0), ([], ["allocation size 0; nothing to prefer"]))
        self.assertEqual(prefer(placements, [0, 4], [], -3)[0], [])
        cpus, problems = prefer(placements, [0, 1, 4, 5], [0, 1, 5], 2)
        self.assertEqual(cpus, [1, 5])
        self.assertEqual(prefer(placements, [], [], 1)[0], [])


# ---------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------

class CliTests(TempDirTest):
    def setUp(self):
        super().setUp()
        self.sysfs, self.procfs = fake_host(self.tmp, sockets=2, cores=2, isolated="2-3,6-7")
        # never the host's kubelet: its own device-plugin dir, PodResources off
        self.base = ["--sysfs", self.sysfs, "--procfs", self.procfs, "--device-plugin-path",
                     os.path.join(self.tmp, "device-plugins"), "--pod-resources-socket", "off"]

    def run_cli(self, *args, env=None):
        return subprocess.run([sys.executable, PLUGIN] + list(args), env=plugin_env(env), timeout=60,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)

    def test_output_that_cannot_be_written_is_one_line_and_exit_3(self):
        for args in (["--list"], ["--list", "--json"], ["--doctor", "--kubelet-dir", self.tmp], ["--version"]):
            for stdout in ("closed", "/dev/full"):
                with self.subTest(args=args, stdout=stdout):
                    if stdout == "closed":
                        result = subprocess.run([sys.executable, PLUGIN] + self.base + args, env=plugin_env(),
                                                stderr=subprocess.PIPE, universal_newlines=True, timeout=60,
                                                preexec_fn=lambda: os.close(1))
                    else:
                        with open(stdout, "w") as full:
                            result = subprocess.run([sys.executable, PLUGIN] + self.base + args, env=plugin_env(),
                                                    stdout=full, stderr=subprocess.PIPE, universal_newlines=True,
                                                    timeout=60)
                    self.assertEqual(result.returncode, 3, result.stderr)
                    self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
                    self.assertIn("cannot write", result.stderr)
        # a reader that stops early (| head) is no error
        reader = subprocess.Popen([sys.executable, PLUGIN] + self.base + ["--list"], env=plugin_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        reader.stdout.close()
        self.assertEqual(reader.wait(60), 0)
        self.assertEqual(reader.stderr.read(), b"")
        reader.stderr.close()

    def test_list_json_contract(self):
        result = self.run_cli(*self.base + ["--list", "--json"])
        self.assertEqual(result.returncode, 0, result.stderr)
        data = json.loads(result.stdout)
        self.assertEqual(list(data), ["resource_name", "devices", "holders_source", "holders_note"])
        self.assertEqual(data["resource_name"], "windriver.com/isolcpus")
        self.assertEqual(data["devices"][0], {"id": "2", "cpu": 2, "health": "Healthy", "numa_nodes": [1],
                                              "package": 1, "core_id": 0, "thread_siblings": [2, 6],
                                              "llc_cpus": None, "core_class": None,
                                              "holder": None, "holders": []})
        self.assertEqual(list(data["devices"][0])[:7], ["id", "cpu", "health", "numa_nodes", "package", "core_id",
                                                        "thread_siblings"])
        self.assertIsNone(data["holders_source"])
        self.assertIn("PodResources is off", data["holders_note"])
        self.assertEqual([d["id"] for d in data["devices"]], ["2", "3", "6", "7"])

    def test_list_table(self):
        result = self.run_cli(*self.base + ["--list"])
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.splitlines()
        self.assertIn("4 devices", lines[0])
        self.assertEqual(lines[1].split()[:4], ["ID", "CPU", "HEALTH", "NUMA"])
        self.assertEqual(lines[2].split(), ["2", "2", "Healthy", "1", "1", "0", "2,6", "-", "?"])

    def test_list_shows_last_level_caches_and_kinds_of_core(self):
        write_files(self.tmp, fake_caches(sockets=2, cores=2, cores_per_l3=2))
        capacity = "sys/devices/system/cpu/cpu%d/cpu_capacity"
        result = self.run_cli(*self.base + ["--list"])
        self.assertEqual(result.stdout.splitlines()[1].split()[7:], ["SIBLINGS", "L3", "HOLDER"])   # one kind: no KIND
        write_files(self.tmp, {capacity % cpu: "%d\n" % (1024 if cpu in (2, 6) else 512) for cpu in range(8)})
        result = self.run_cli(*self.base + ["--list"])
        lines = result.stdout.splitlines()
        self.assertEqual(lines[1].split()[7:], ["SIBLINGS", "L3", "KIND", "HOLDER"])
        self.assertEqual([line.split()[6:9] for line in lines[2:]],
                         [["2,6", "2", "0"], ["3,7", "2", "1"], ["2,6", "2", "0"], ["3,7", "2", "1"]])
        data = json.loads(self.run_cli(*self.base + ["--list", "--json"]).stdout)
        self.assertEqual([(d["llc_cpus"], d["core_class"]) for d in data["devices"]],
                         [([2, 3, 6, 7], 0), ([2, 3, 6, 7], 1), ([2, 3, 6, 7], 0), ([2, 3, 6, 7], 1)])

    def test_environment_twins_and_flag_precedence(self):
        env = {"ISOLCPU_SYSFS": self.sysfs, "ISOLCPU_PROCFS": self.procfs, "ISOLCPU_CPUS": "1",
               "ISOLCPU_RESOURCE_NAME": "example.com/quiet", "ISOLCPU_LIST": "1", "ISOLCPU_JSON": "true"}
        data = json.loads(self.run_cli(env=env).stdout)
        self.assertEqual((data["resource_name"], [d["cpu"] for d in data["devices"]]), ("example.com/quiet", [1]))
        data = json.loads(self.run_cli("--cpus", "0", env=env).stdout)
        self.assertEqual([d["cpu"] for d in data["devices"]], [0])

    def test_empty_environment_twins_are_unset(self):
        # a blank ISOLCPU_X= line in a systemd environment file means "not set", for every flag
        base = {"ISOLCPU_SYSFS": self.sysfs, "ISOLCPU_PROCFS": self.procfs}
        twins = [plugin.env_twin(flag) for flag, _, _ in plugin.VALUE_OPTIONS]
        twins += [plugin.env_twin(flag) for flag, _ in plugin.SWITCH_OPTIONS]
        self.assertIn("ISOLCPU_CPUS", twins)
        for twin in twins:
            with self.subTest(twin=twin):
                unset = {k: v for k, v in base.items() if k != twin}
                expected = self.run_cli("--list", "--json", env=unset)
                for blank in ("", "  "):
                    result = self.run_cli("--list", "--json", env=dict(unset, **{twin: blank}))
                    self.assertEqual((result.returncode, result.stdout), (expected.returncode, expected.stdout),
                                     result.stderr)
        data = json.loads(self.run_cli("--list", "--json", env=dict(base, ISOLCPU_CPUS="")).stdout)
        self.assertEqual([d["cpu"] for d in data["devices"]], [2, 3, 6, 7])

    def test_an_empty_flag_is_an_error(self):
        for flag in ("--cpus", "--resource-name", "--source", "--env-name", "--log-level"):
            with self.subTest(flag=flag):
                result = self.run_cli(*self.base + [flag, "", "--list"])
                self.assertEqual(result.returncode, 2, result.stderr)
                self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
                self.assertIn(flag, result.stderr)

    def test_where_a_value_came_from_is_named(self):
        result = self.run_cli("--list", env={"ISOLCPU_SYSFS": self.sysfs, "ISOLCPU_PROCFS": self.procfs,
                                             "ISOLCPU_CPUS": "2-3"})
        self.assertIn("2 devices from ISOLCPU_CPUS", result.stdout.splitlines()[0])
        result = self.run_cli(*self.base + ["--list", "--cpus", "2-3"])
        self.assertIn("2 devices from --cpus", result.stdout.splitlines()[0])
        result = self.run_cli("--list", env={"ISOLCPU_SYSFS": self.sysfs, "ISOLCPU_PROCFS": self.procfs,
                                             "ISOLCPU_CPUS": "x"})
        self.assertIn("ISOLCPU_CPUS 'x'", result.stderr)

    def test_a_fifo_for_a_host_file_is_an_error_not_a_hang(self):
        path = os.path.join(self.sysfs, "devices/system/cpu/isolated")
        os.unlink(path)
        os.mkfifo(path)
        result = self.run_cli(*self.base + ["--list"])
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertIn("not a regular file", result.stderr)

    def test_junk_bytes_in_the_isolated_file_are_not_nothing_isolated(self):
        # Host.read stopped at the first NUL: this read as "nothing isolated", unsaid
        path = os.path.join(self.sysfs, "devices/system/cpu/isolated")
        with open(path, "wb") as f:
            f.write(b"\x00\xff\x01abc")
        result = self.run_cli(*self.base + ["--list"])
        self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertIn(path, result.stderr)
        self.assertIn("is not a cpu-list", result.stderr)
        with open(path, "wb") as f:                 # a NUL after the newline, as real dumps have
            f.write(b"2-3\n\x00")
        result = self.run_cli(*self.base + ["--list", "--json"])
        self.assertEqual([d["cpu"] for d in json.loads(result.stdout)["devices"]], [2, 3], result.stderr)

    def test_list_table_prints_ranges(self):
        sysfs, procfs = fake_host(os.path.join(self.tmp, "smt4"), sockets=1, cores=2, threads=4, isolated="0-7")
        result = self.run_cli("--sysfs", sysfs, "--procfs", procfs, "--list", *self.base[4:])
        self.assertEqual(result.returncode, 0, result.stderr)
        rows = [line.split() for line in result.stdout.splitlines()[2:]]
        # SMT-4: core 0 is CPUs 0,2,4,6 (no run), a run only in the cpu-list form
        self.assertEqual(rows[0], ["0", "0", "Healthy", "0", "0", "0", "0,2,4,6", "-", "?"])
        sysfs, procfs = fake_host(os.path.join(self.tmp, "smt4b"), sockets=1, cores=1, threads=4, isolated="0-3")
        result = self.run_cli("--sysfs", sysfs, "--procfs", procfs, "--list", *self.base[4:])
        self.assertEqual([line.split()[6] for line in result.stdout.splitlines()[2:]], ["0-3"] * 4)

    def test_bad_input_is_one_line_and_exit_2(self):
        cases = [
            (["--cpus", "1-x"], "--cpus"), (["--resource-name", "kubernetes.io/x"], "--resource-name"),
            (["--resource-name", "nodomain"], "--resource-name"), (["--source", "bios"], "--source"),
            (["--rescan-interval", "0"], "--rescan-interval"), (["--rescan-interval", "nan"], "--rescan-interval"),
            (["--env-name", "1X"], "--env-name"), (["--cpuid-devices", "maybe"], "--cpuid-devices"),
            (["--log-level", "loud"], "--log-level"), (["--bogus"], "--bogus"), (["--cpus"], "--cpus"),
            (["--sysfs", "/nonexistent"], "--sysfs"),
            (["--device-plugin-path", "/" + "d" * 120], "--device-plugin-path"),
        ]
        for args, named in cases + [(["--json"], "--json")]:
            with self.subTest(args=args):
                listing = [] if args == ["--json"] else ["--list"]
                result = self.run_cli(*self.base + args + listing)
                self.assertEqual(result.returncode, 2, result.stderr)
                self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
                self.assertIn(named, result.stderr)
                self.assertNotIn("Traceback", result.stderr)
        result = self.run_cli(*self.base + ["--list"], env={"ISOLCPU_CPUS": "9-3"})
        self.assertEqual(result.returncode, 2)
        self.assertIn("ISOLCPU_CPUS", result.stderr)

    def test_bad_host_files_are_one_line(self):
        write_files(self.tmp, {"sys/devices/system/cpu/isolated": "1-3,\x00\x00", "proc/cmdline": ""})
        self.assertEqual(self.run_cli(*self.base + ["--list"]).returncode, 0)   # NUL ends the text
        for content in ("\x89PNG\r\n\x1a\n", "1-99999999999", "0-3:5/4"):
            with self.subTest(content=content):
                write_files(self.tmp, {"sys/devices/system/cpu/isolated": content})
                result = self.run_cli(*self.base + ["--list"])
                self.assertEqual(result.returncode, 2)
                self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
                self.assertIn("isolated", result.stderr)

    def test_version(self):
        result = self.run_cli("--version")
        self.assertEqual(result.returncode, 0)
        self.assertIn("isolcpu-plugin %s (python %s, grpcio " % (plugin.__version__, sys.version.split()[0]),
                      result.stdout)
        self.assertIn(", protobuf ", result.stdout)


# ---------------------------------------------------------------------------
# A kubelet, as the device manager behaves
# ---------------------------------------------------------------------------

Snapshot = collections.namedtuple("Snapshot", "devices at")   # devices: {id: (health, nodes or None)}
REFERENCE = os.path.join(HERE, "..", "shared", "reference")


# Protobuf's wire format, written here from the field numbers of the kubelet's
# PodResources api.proto (../shared/reference/kubelet-podresources-v1.proto),
# independently of the plugin's stubs: what the fake kubelet sends is what a
# kubelet sends, including the fields the plugin does not read.

def pb_varint(value):
    value &= (1 << 64) - 1                          # int64: two's complement, as protobuf does
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def pb_field(number, value):
    """One field: an int as a varint, str or bytes length-delimited."""
    if isinstance(value, int):
        return pb_varint(number << 3) + pb_varint(value)
    data = value.encode("utf-8") if isinstance(value, str) else value
    return pb_varint(number << 3 | 2) + pb_varint(len(data)) + data


def pb_packed(number, values):
    return pb_field(number, b"".join(pb_varint(v) for v in values)) if values else b""


def encode_container_devices(resource, ids, numa_nodes=()):
    """ContainerDevices: resource_name = 1, device_ids = 2, topology = 3 (TopologyInfo: nodes = 1, NUMANode: ID = 1)."""
    topology = pb_field(3, b"".join(pb_field(1, pb_field(1, node)) for node in numa_nodes)) if numa_nodes else b""
    return pb_field(1, resource) + b"".join(pb_field(2, i) for i in ids) + topology


def encode_container(name, devices, cpu_ids=()):
    """ContainerResources: name = 1, devices = 2, cpu_ids = 3, memory = 4,
    dynamic_resources = 5 (whose ClaimResource has the proto3 optional share_id = 5)."""
    memory = pb_field(4, pb_field(1, "memory") + pb_field(2, 1 << 30))
    claim = pb_field(5, pb_field(2, "claim-1") + pb_field(3, "default")
                     + pb_field(4, pb_field(1, pb_field(1, "vendor.com/dev=1")) + pb_field(2, "vendor.com")
                                + pb_field(5, "share-1")))
    return (pb_field(1, name) + b"".join(pb_field(2, encode_container_devices(*d)) for d in devices)
            + pb_packed(3, cpu_ids) + memory + claim)


def encode_pod(name, namespace, containers):
    """PodResources: name = 1, namespace = 2, containers = 3, cpu_ids = 4, memory = 5."""
    return (pb_field(1, name) + pb_field(2, namespace) + b"".join(pb_field(3, c) for c in containers)
            + pb_packed(4, [0]) + pb_field(5, pb_field(1, "hugepages-2Mi") + pb_field(2, 0)))


def pod_uid(namespace, pod):
    """A real-looking, stable pod UID."""
    import uuid
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, "%s.%s.pods" % (pod, namespace)))


class FakeKubelet(object):
    """The kubelet's device manager toward one device-plugin directory.

    start() wipes every socket in the directory (as a starting kubelet does)
    and serves kubelet.sock. Register checks version and resource name, dials
    the endpoint, calls GetDevicePluginOptions, and only then answers; then it
    consumes ListAndWatch in a thread, recording every list. A plugin that
    registers again replaces its previous connection."""

    def __init__(self, directory, pod_resources_dir=None, writes_checkpoint=False):
        self.dir = directory
        self.pod_resources_dir = pod_resources_dir     # serve PodResources there too
        self.writes_checkpoint = writes_checkpoint     # write kubelet_internal_checkpoint on Allocate
        self.pod_resources_server = None
        self.pod_resources_mode = "serve"              # or "hang", "error", "garbage"
        self.pod_resources_extra = b""                 # more pods (encoded) at the end of List's answer
        self.pod_resources_calls = []                  # (method, monotonic time)
        self.released = threading.Event()              # ends hanging PodResources calls
        self.allocations = collections.OrderedDict()   # (namespace, pod, container) -> device IDs
        self.server = None
        self.cond = threading.Condition()
        self.registrations = []
        self.options = []
        self.lists = []
        self.stream_ends = 0
        self.channel = None
        self.stub = None
        self.stream = None
        self.drop_stream_before_answering = False

    @property
    def socket(self):
        return os.path.join(self.dir, "kubelet.sock")

    def start(self, wipe=True):
        os.makedirs(self.dir, exist_ok=True)
        if wipe:
            for name in os.listdir(self.dir):
                path = os.path.join(self.dir, name)
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_RegistrationServicer_to_server(self, self.server)
        self.server.add_insecure_port("unix:" + self.socket)
        self.server.start()
        if self.pod_resources_dir:
            self._serve_pod_resources()
        return self

    def stop(self):
        self.released.set()
        if self.server is not None:
            self.server.stop(None).wait()
            self.server = None
        if self.pod_resources_server is not None:
            self.pod_resources_server.stop(None).wait()
            self.pod_resources_server = None
        self.released.clear()
        self._drop_plugin()
        for path in (self.socket, self.pod_resources_socket):
            if path and os.path.exists(path):
                os.unlink(path)

    # The PodResources service (v1.PodResourcesLister), as the kubelet serves it ---

    @property
    def pod_resources_socket(self):
        return os.path.join(self.pod_resources_dir, "kubelet.sock") if self.pod_resources_dir else None

    def _serve_pod_resources(self):
        os.makedirs(self.pod_resources_dir, exist_ok=True)
        if os.path.exists(self.pod_resources_socket):
            os.unlink(self.pod_resources_socket)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handlers = {"List": self._pod_resources_list,                 # raw bytes in and out
                    "GetAllocatableResources": self._pod_resources_allocatable}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("v1.PodResourcesLister", {
            name: grpc.unary_unary_rpc_method_handler(handler) for name, handler in handlers.items()}),))
        server.add_insecure_port("unix:" + self.pod_resources_socket)
        server.start()
        self.pod_resources_server = server

    def _pod_resources_call(self, method, context):
        with self.cond:
            self.pod_resources_calls.append((method, time.monotonic()))
            self.cond.notify_all()
        if self.pod_resources_mode == "hang":
            self.released.wait(30)
        elif self.pod_resources_mode == "error":
            context.abort(grpc.StatusCode.INTERNAL, "podresources: internal error")
        return self.pod_resources_mode == "garbage"

    def _pod_resources_list(self, request, context):
        """ListPodResourcesResponse (pod_resources = 1) from the allocations made,
        with another resource beside ours and a pod that holds nothing of ours."""
        if self._pod_resources_call("List", context):
            return b"\x0a\xff\xff\xff\xff\x0fnot protobuf"    # field 1, a length past the end
        pods = collections.OrderedDict()
        with self.cond:
            for (namespace, pod, container), ids in self.allocations.items():
                pods.setdefault((namespace, pod), []).append(encode_container(
                    container, [("windriver.com/isolcpus", ids, [2]), ("example.com/nic", ["0000:3b:00.1"], [0])]))
        pods[("kube-system", "coredns-5d78c9869d-x2x7q")] = [encode_container("coredns", [], cpu_ids=[1])]
        return b"".join(pb_field(1, encode_pod(pod, namespace, containers))
                        for (namespace, pod), containers in pods.items()) + self.pod_resources_extra

    def _pod_resources_allocatable(self, request, context):
        """AllocatableResourcesResponse: devices = 1 (the healthy devices of the
        latest list, one ContainerDevices each, as the kubelet groups them), cpu_ids = 2."""
        if self._pod_resources_call("GetAllocatableResources", context):
            return b"\x0a\xff\xff\xff\xff\x0fnot protobuf"
        with self.cond:
            devices = self.lists[-1].devices if self.lists else {}
        healthy = sorted((i for i, (health, _) in devices.items() if health == "Healthy"), key=int)
        return (b"".join(pb_field(1, encode_container_devices("windriver.com/isolcpus", [i], devices[i][1] or ()))
                         for i in healthy) + pb_packed(2, [0, 1, 4, 5]))

    def write_checkpoint(self):
        """kubelet_internal_checkpoint from the allocations made, written the
        kubelet's way (a new file renamed into place)."""
        entries = [{"PodUID": pod_uid(namespace, pod), "ContainerName": container,
                    "ResourceName": "windriver.com/isolcpus", "DeviceIDs": {"2": ids}, "AllocResp": ""}
                   for (namespace, pod, container), ids in self.allocations.items()]
        path = os.path.join(self.dir, "kubelet_internal_checkpoint")
        with open(path + ".new", "w") as f:
            json.dump({"Data": {"PodDeviceEntries": entries, "RegisteredDevices": {}}, "Checksum": 0}, f)
        os.rename(path + ".new", path)

    def restart(self):
        self.stop()
        self.start()

    def _drop_plugin(self):
        if self.stream is not None:
            self.stream.cancel()
        if self.channel is not None:
            self.channel.close()
        self.stream = self.channel = self.stub = None

    # The Registration service -------------------------------------------------

    def Register(self, request, context):
        if request.version != "v1beta1":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "unsupported version")
        if "/" not in request.resource_name or "kubernetes.io/" in request.resource_name:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "invalid resource name")
        channel = grpc.insecure_channel("unix:" + os.path.join(self.dir, request.endpoint))
        stub = pb_grpc.DevicePluginStub(channel)
        try:
            options = stub.GetDevicePluginOptions(pb.Empty(), timeout=5)
        except grpc.RpcError as e:
            channel.close()
            context.abort(grpc.StatusCode.UNAVAILABLE, "cannot reach plugin: %s" % e.code())
        with self.cond:
            self._drop_plugin()
            self.channel, self.stub = channel, stub
            self.stream = stub.ListAndWatch(pb.Empty())
            self.registrations.append(request)
            self.options.append(options)
            self.cond.notify_all()
        threading.Thread(target=self._consume, args=(self.stream,), daemon=True).start()
        if self.drop_stream_before_answering:
            self.drop_stream_before_answering = False
            self.wait(lambda: self.lists, 5, "the first list")
            self.stream.cancel()
        return pb.Empty()

    def _consume(self, stream):
        try:
            for response in stream:
                devices = {d.ID: (d.health, [n.ID for n in d.topology.nodes] if d.HasField("topology") else None)
                           for d in response.devices}
                with self.cond:
                    self.lists.append(Snapshot(devices, time.monotonic()))
                    self.cond.notify_all()
        except grpc.RpcError:
            pass
        with self.cond:
            self.stream_ends += 1
            self.cond.notify_all()

    # Helpers for tests -----------------------------------------------------------

    def wait(self, predicate, timeout=10.0, what="condition"):
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise AssertionError("fake kubelet: timed out waiting for " + what)

    def wait_registered(self, count=1, timeout=10.0):
        self.wait(lambda: len(self.registrations) >= count, timeout, "registration %d" % count)
        return self.registrations[count - 1]

    def wait_list(self, predicate, timeout=10.0, since=0.0):
        """The latest list received after `since` (monotonic) that satisfies
        predicate, waiting for one if there is none yet."""
        found = []

        def check():
            for snap in reversed(self.lists):
                if snap.at > since and predicate(snap.devices):
                    found.append(snap)
                    return True
            return False
        self.wait(check, timeout, "a matching device list")
        return found[0]

    def allocate(self, *ids, pod=None):
        """Allocate for one container, `pod` = (namespace, pod, container), and
        remember it (PodResources and the checkpoint report it) as the kubelet does."""
        request = pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=list(ids))])
        response = self.stub.Allocate(request, timeout=5)
        with self.cond:
            owner = pod or ("default", "pod-%d" % (len(self.allocations) + 1), "app")
            self.allocations[owner] = list(ids)
        if self.writes_checkpoint:
            self.write_checkpoint()
        return response

    def close_stream(self):
        """End the current ListAndWatch from the kubelet's side, without restarting."""
        with self.cond:
            if self.stream is not None:
                self.stream.cancel()

    def prefer(self, available, must, size):
        """GetPreferredAllocation for one container: the IDs in the answer."""
        request = pb.PreferredAllocationRequest(container_requests=[pb.ContainerPreferredAllocationRequest(
            available_deviceIDs=available, must_include_deviceIDs=must, allocation_size=size)])
        return list(self.stub.GetPreferredAllocation(request, timeout=5).container_responses[0].deviceIDs)


# ---------------------------------------------------------------------------
# An NRI runtime, as containerd's NRI adaptation behaves
# ---------------------------------------------------------------------------

# Reading protobuf, beside pb_varint/pb_field above, and as strict as Go's
# protobuf where a plugin could get it wrong: a truncated or over-long varint,
# a length past the end, wire types 3/4 (groups) or 6/7, field number 0, a
# proto3 string that is not UTF-8 all raise ValueError. Unknown fields of wire
# types 0, 1, 2 and 5 are skipped, as every protobuf reader does.

def pb_read_varint(data, pos):
    """(value, next position) of the varint at data[pos]."""
    result = 0
    for i in range(10):
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if i == 9 and byte > 1:
                raise ValueError("varint overflows 64 bits")
            return result, pos
    raise ValueError("varint longer than 10 bytes")


def pb_decode(data):
    """[(field number, wire type, value)] of one message: an int for wire
    types 0, 1 and 5, bytes for 2."""
    fields, pos = [], 0
    while pos < len(data):
        key, pos = pb_read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if not 0 < number < 1 << 29:
            raise ValueError("field number %d" % number)
        if wire == 0:
            value, pos = pb_read_varint(data, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if pos + size > len(data):
                raise ValueError("truncated fixed%d field %d" % (size * 8, number))
            value, pos = int.from_bytes(data[pos:pos + size], "little"), pos + size
        elif wire == 2:
            length, pos = pb_read_varint(data, pos)
            if pos + length > len(data):
                raise ValueError("field %d: %d bytes past the end" % (number, pos + length - len(data)))
            value, pos = bytes(data[pos:pos + length]), pos + length
        else:
            raise ValueError("field %d: wire type %d" % (number, wire))
        fields.append((number, wire, value))
    return fields


# Message schemas: {number: (name, kind)}. A kind is "string", "bytes",
# "int32", "int64", "uint32", "uint64", "bool", "map" (map<string, string>),
# another schema (a message), or a one-element list of one of those (repeated).
# A message is a plain dict by field name; "_extra" holds raw bytes appended
# when encoding (fields of numbers the schema does not know).

PB_MAP_ENTRY = {1: ("key", "string"), 2: ("value", "string")}
PB_SCALAR_DEFAULTS = {"string": "", "bytes": b"", "int32": 0, "int64": 0, "uint32": 0, "uint64": 0, "bool": False}


def pb_encode(schema, message):
    """The wire form of `message` (a dict) after `schema`. As proto3 does, a
    scalar at its default is left out; a message that is there (even {}) is not."""
    out = []
    for number in sorted(schema):
        name, kind = schema[number]
        value = message.get(name)
        if value is None:
            continue
        if isinstance(kind, list):
            out.extend(pb_encode_value(number, kind[0], item) for item in value)
        elif kind == "map":
            out.extend(pb_field(number, pb_field(1, key) + pb_field(2, item)) for key, item in sorted(value.items()))
        elif isinstance(kind, dict) or value:
            out.append(pb_encode_value(number, kind, value))
    out.append(message.get("_extra", b""))
    return b"".join(out)


def pb_encode_value(number, kind, value):
    if isinstance(kind, dict):
        return pb_field(number, pb_encode(kind, value))
    return pb_field(number, int(value) if kind == "bool" else value)


def pb_decode_message(schema, data):
    """`data` read after `schema` into a dict holding every field of the schema
    (absent ones at their default; an absent message is None)."""
    message, parts = {}, collections.OrderedDict()
    for number, wire, value in pb_decode(data):
        if number not in schema:
            continue
        name, kind = schema[number]
        if kind == "map":
            entry = pb_decode_message(PB_MAP_ENTRY, pb_expect_bytes(name, wire, value))
            message.setdefault(name, {})[entry["key"]] = entry["value"]
        elif isinstance(kind, list):
            message.setdefault(name, []).append(pb_decode_value(name, kind[0], wire, value))
        elif isinstance(kind, dict):                  # a message seen twice is merged: decode the concatenation
            parts.setdefault(name, (kind, []))[1].append(pb_expect_bytes(name, wire, value))
        else:
            message[name] = pb_decode_value(name, kind, wire, value)
    for name, (kind, chunks) in parts.items():
        message[name] = pb_decode_message(kind, b"".join(chunks))
    for name, kind in schema.values():
        if name not in message:
            message[name] = ([] if isinstance(kind, list) else {} if kind == "map"
                             else None if isinstance(kind, dict) else PB_SCALAR_DEFAULTS[kind])
    return message


def pb_expect_bytes(name, wire, value):
    if wire != 2:
        raise ValueError("field %s: wire type %d, expected 2" % (name, wire))
    return value


def pb_decode_value(name, kind, wire, value):
    if isinstance(kind, dict):
        return pb_decode_message(kind, pb_expect_bytes(name, wire, value))
    if kind == "string":
        return pb_expect_bytes(name, wire, value).decode("utf-8")     # UnicodeDecodeError is a ValueError
    if kind == "bytes":
        return pb_expect_bytes(name, wire, value)
    if wire != 0:
        raise ValueError("field %s: wire type %d, expected 0" % (name, wire))
    if kind == "bool":
        return value != 0
    if kind in ("int32", "uint32"):
        value &= 0xFFFFFFFF
        return value - (1 << 32) if kind == "int32" and value >= 1 << 31 else value
    return value - (1 << 64) if kind == "int64" and value >= 1 << 63 else value


# The ttrpc envelopes (../shared/reference/ttrpc.proto) and the NRI messages
# (../shared/reference/nri-v1alpha1.proto). Fields the reference trims away
# (memory, mounts, hooks, namespaces, rlimits, a pod's linux part...) carry
# their numbers from upstream api.proto at v0.6.1 (NRI.md's table): a runtime
# sends them, a plugin must skip them.

TTRPC_KEY_VALUE = {1: ("key", "string"), 2: ("value", "string")}
TTRPC_REQUEST = {1: ("service", "string"), 2: ("method", "string"), 3: ("payload", "bytes"),
                 4: ("timeout_nano", "int64"), 5: ("metadata", [TTRPC_KEY_VALUE])}
TTRPC_STATUS = {1: ("code", "int32"), 2: ("message", "string")}
TTRPC_RESPONSE = {1: ("status", TTRPC_STATUS), 2: ("payload", "bytes")}

NRI_EMPTY = {}
NRI_OPTIONAL_INT64 = {1: ("value", "int64")}
NRI_OPTIONAL_UINT64 = {1: ("value", "uint64")}
NRI_LINUX_CPU = {1: ("shares", NRI_OPTIONAL_UINT64), 2: ("quota", NRI_OPTIONAL_INT64), 3: ("period", NRI_OPTIONAL_UINT64),
                 4: ("realtime_runtime", NRI_OPTIONAL_INT64), 5: ("realtime_period", NRI_OPTIONAL_UINT64),
                 6: ("cpus", "string"), 7: ("mems", "string")}
NRI_LINUX_MEMORY = {1: ("limit", NRI_OPTIONAL_INT64), 2: ("reservation", NRI_OPTIONAL_INT64),
                    3: ("swap", NRI_OPTIONAL_INT64)}
NRI_LINUX_RESOURCES = {1: ("memory", NRI_LINUX_MEMORY), 2: ("cpu", NRI_LINUX_CPU), 6: ("unified", "map")}
NRI_LINUX_NAMESPACE = {1: ("type", "string"), 2: ("path", "string")}
NRI_LINUX_POD_SANDBOX = {1: ("pod_overhead", NRI_LINUX_RESOURCES), 2: ("pod_resources", NRI_LINUX_RESOURCES),
                         3: ("cgroup_parent", "string"), 4: ("cgroups_path", "string"),
                         5: ("namespaces", [NRI_LINUX_NAMESPACE]), 6: ("resources", NRI_LINUX_RESOURCES)}
NRI_POD_SANDBOX = {1: ("id", "string"), 2: ("name", "string"), 3: ("uid", "string"), 4: ("namespace", "string"),
                   5: ("labels", "map"), 6: ("annotations", "map"), 7: ("runtime_handler", "string"),
                   8: ("linux", NRI_LINUX_POD_SANDBOX), 9: ("pid", "uint32")}
NRI_MOUNT = {1: ("destination", "string"), 2: ("type", "string"), 3: ("source", "string"), 4: ("options", ["string"])}
NRI_HOOK = {1: ("path", "string"), 2: ("args", ["string"]), 3: ("env", ["string"])}
NRI_HOOKS = {1: ("prestart", [NRI_HOOK]), 5: ("poststart", [NRI_HOOK])}
NRI_POSIX_RLIMIT = {1: ("type", "string"), 2: ("hard", "uint64"), 3: ("soft", "uint64")}
NRI_LINUX_CONTAINER = {1: ("namespaces", [NRI_LINUX_NAMESPACE]), 3: ("resources", NRI_LINUX_RESOURCES),
                       4: ("oom_score_adj", NRI_OPTIONAL_INT64), 5: ("cgroups_path", "string")}
NRI_CONTAINER = {1: ("id", "string"), 2: ("pod_sandbox_id", "string"), 3: ("name", "string"), 4: ("state", "int32"),
                 5: ("labels", "map"), 6: ("annotations", "map"), 7: ("args", ["string"]), 8: ("env", ["string"]),
                 9: ("mounts", [NRI_MOUNT]), 10: ("hooks", NRI_HOOKS), 11: ("linux", NRI_LINUX_CONTAINER),
                 12: ("pid", "uint32"), 13: ("rlimits", [NRI_POSIX_RLIMIT])}
NRI_KEY_VALUE = {1: ("key", "string"), 2: ("value", "string")}
NRI_LINUX_CONTAINER_ADJUSTMENT = {2: ("resources", NRI_LINUX_RESOURCES), 3: ("cgroups_path", "string")}
NRI_CONTAINER_ADJUSTMENT = {2: ("annotations", "map"), 3: ("mounts", [NRI_MOUNT]), 4: ("env", [NRI_KEY_VALUE]),
                            5: ("hooks", NRI_HOOKS), 6: ("linux", NRI_LINUX_CONTAINER_ADJUSTMENT),
                            7: ("rlimits", [NRI_POSIX_RLIMIT])}
NRI_LINUX_CONTAINER_UPDATE = {1: ("resources", NRI_LINUX_RESOURCES)}
NRI_CONTAINER_UPDATE = {1: ("container_id", "string"), 2: ("linux", NRI_LINUX_CONTAINER_UPDATE),
                        3: ("ignore_failure", "bool")}
NRI_CONTAINER_EVICTION = {1: ("container_id", "string"), 2: ("reason", "string")}

NRI_REGISTER_PLUGIN_REQUEST = {1: ("plugin_name", "string"), 2: ("plugin_idx", "string"), 3: ("NRI_version", "string")}
NRI_UPDATE_CONTAINERS_REQUEST = {1: ("update", [NRI_CONTAINER_UPDATE]), 2: ("evict", [NRI_CONTAINER_EVICTION])}
NRI_UPDATE_CONTAINERS_RESPONSE = {1: ("failed", [NRI_CONTAINER_UPDATE])}
NRI_CONFIGURE_REQUEST = {1: ("config", "string"), 2: ("runtime_name", "string"), 3: ("runtime_version", "string"),
                         4: ("registration_timeout", "int64"), 5: ("request_timeout", "int64"),
                         6: ("NRI_version", "string")}
NRI_CONFIGURE_RESPONSE = {2: ("events", "int32")}
NRI_SYNCHRONIZE_REQUEST = {1: ("pods", [NRI_POD_SANDBOX]), 2: ("containers", [NRI_CONTAINER]), 3: ("more", "bool")}
NRI_SYNCHRONIZE_RESPONSE = {1: ("update", [NRI_CONTAINER_UPDATE]), 2: ("more", "bool")}
NRI_CREATE_CONTAINER_REQUEST = {1: ("pod", NRI_POD_SANDBOX), 2: ("container", NRI_CONTAINER)}
NRI_CREATE_CONTAINER_RESPONSE = {1: ("adjust", NRI_CONTAINER_ADJUSTMENT), 2: ("update", [NRI_CONTAINER_UPDATE]),
                                 3: ("evict", [NRI_CONTAINER_EVICTION])}
NRI_UPDATE_CONTAINER_REQUEST = {1: ("pod", NRI_POD_SANDBOX), 2: ("container", NRI_CONTAINER),
                                3: ("linux_resources", NRI_LINUX_RESOURCES)}
NRI_UPDATE_CONTAINER_RESPONSE = {1: ("update", [NRI_CONTAINER_UPDATE]), 2: ("evict", [NRI_CONTAINER_EVICTION])}
NRI_STOP_CONTAINER_REQUEST = {1: ("pod", NRI_POD_SANDBOX), 2: ("container", NRI_CONTAINER)}
NRI_STOP_CONTAINER_RESPONSE = {1: ("update", [NRI_CONTAINER_UPDATE])}
NRI_STATE_CHANGE_EVENT = {1: ("event", "int32"), 2: ("pod", NRI_POD_SANDBOX), 3: ("container", NRI_CONTAINER)}
NRI_POD_EVENT_REQUEST = {1: ("pod", NRI_POD_SANDBOX)}                       # v0.12+ RunPodSandboxRequest & co
NRI_CONTAINER_EVENT_REQUEST = {1: ("pod", NRI_POD_SANDBOX), 2: ("container", NRI_CONTAINER)}  # RemoveContainerRequest & co

# By their names in the reference .proto, for FakeNriRuntimeTests to check the numbers against it.
NRI_SCHEMAS = {
    "RegisterPluginRequest": NRI_REGISTER_PLUGIN_REQUEST, "UpdateContainersRequest": NRI_UPDATE_CONTAINERS_REQUEST,
    "UpdateContainersResponse": NRI_UPDATE_CONTAINERS_RESPONSE, "ConfigureRequest": NRI_CONFIGURE_REQUEST,
    "ConfigureResponse": NRI_CONFIGURE_RESPONSE, "SynchronizeRequest": NRI_SYNCHRONIZE_REQUEST,
    "SynchronizeResponse": NRI_SYNCHRONIZE_RESPONSE, "CreateContainerRequest": NRI_CREATE_CONTAINER_REQUEST,
    "CreateContainerResponse": NRI_CREATE_CONTAINER_RESPONSE, "UpdateContainerRequest": NRI_UPDATE_CONTAINER_REQUEST,
    "UpdateContainerResponse": NRI_UPDATE_CONTAINER_RESPONSE, "StopContainerRequest": NRI_STOP_CONTAINER_REQUEST,
    "StopContainerResponse": NRI_STOP_CONTAINER_RESPONSE, "StateChangeEvent": NRI_STATE_CHANGE_EVENT,
    "PodSandbox": NRI_POD_SANDBOX, "Container": NRI_CONTAINER, "LinuxContainer": NRI_LINUX_CONTAINER,
    "OptionalInt64": NRI_OPTIONAL_INT64, "OptionalUInt64": NRI_OPTIONAL_UINT64, "LinuxCPU": NRI_LINUX_CPU,
    "LinuxResources": NRI_LINUX_RESOURCES, "KeyValue": NRI_KEY_VALUE, "ContainerAdjustment": NRI_CONTAINER_ADJUSTMENT,
    "LinuxContainerAdjustment": NRI_LINUX_CONTAINER_ADJUSTMENT, "ContainerUpdate": NRI_CONTAINER_UPDATE,
    "LinuxContainerUpdate": NRI_LINUX_CONTAINER_UPDATE, "ContainerEviction": NRI_CONTAINER_EVICTION,
}
TTRPC_SCHEMAS = {"KeyValue": TTRPC_KEY_VALUE, "Request": TTRPC_REQUEST, "Status": TTRPC_STATUS,
                 "Response": TTRPC_RESPONSE}

NRI_PLUGIN_SERVICE = "nri.pkg.api.v1alpha1.Plugin"      # served by the plugin on mux conn 1 (NRI.md 1, 3)
NRI_RUNTIME_SERVICE = "nri.pkg.api.v1alpha1.Runtime"    # served by the runtime on mux conn 2
NRI_PLUGIN_CONN, NRI_RUNTIME_CONN = 1, 2
TTRPC_REQUEST_TYPE, TTRPC_RESPONSE_TYPE = 1, 2
TTRPC_MESSAGE_MAX = 4 << 20                             # ttrpc channel.go messageLengthMax
NRI_FRAME_MAX = 4096                                    # what containerd 1.7 takes from a plugin in one frame (NRI.md 1)
NRI_EVENTS = {"RUN_POD_SANDBOX": 1, "STOP_POD_SANDBOX": 2, "REMOVE_POD_SANDBOX": 3, "CREATE_CONTAINER": 4,
              "POST_CREATE_CONTAINER": 5, "START_CONTAINER": 6, "POST_START_CONTAINER": 7, "UPDATE_CONTAINER": 8,
              "POST_UPDATE_CONTAINER": 9, "STOP_CONTAINER": 10, "REMOVE_CONTAINER": 11}
NRI_VALID_EVENTS_V0_6 = (1 << 11) - 1                   # events 1..11 (v0.6.1 ValidEvents); v0.10+: (1 << 14) - 1
# The v0.12+ runtime's one RPC per event, which falls back to StateChange on Unimplemented (NRI.md 3).
NRI_EVENT_RPCS = {1: "RunPodSandbox", 2: "StopPodSandbox", 3: "RemovePodSandbox", 5: "PostCreateContainer",
                  6: "StartContainer", 7: "PostStartContainer", 9: "PostUpdateContainer", 11: "RemoveContainer"}
NRI_CONTAINER_CREATED, NRI_CONTAINER_RUNNING, NRI_CONTAINER_STOPPED = 1, 3, 4
GRPC_UNKNOWN, GRPC_INVALID_ARGUMENT, GRPC_RESOURCE_EXHAUSTED, GRPC_UNIMPLEMENTED = 2, 3, 8, 12


def nri_event_mask(*events):
    """ConfigureResponse.events: bit (e - 1) for each event e (NRI.md 4)."""
    mask = 0
    for event in events:
        mask |= 1 << (event - 1)
    return mask


def mux_frame(conn_id, payload):
    """u32 BE conn id | u32 BE payload length | payload (NRI.md 1)."""
    return struct.pack(">II", conn_id, len(payload)) + payload


def ttrpc_message(stream_id, message_type, payload, flags=0):
    """u32 BE length | u32 BE stream id | u8 type | u8 flags | payload (NRI.md 2)."""
    return struct.pack(">IIBB", len(payload), stream_id, message_type, flags) + payload


def nri_id(*parts):
    """A containerd-like 64-hex-digit ID, stable for its parts."""
    return hashlib.sha256("/".join(parts).encode()).hexdigest()


def nri_linux_resources(cpus="", mems="", shares=1024, quota=None, period=100000, memory_limit=None):
    """LinuxResources as containerd fills them from a CRI request: shares and
    period always, quota and a memory limit when the pod has limits."""
    return {"memory": {"limit": {"value": memory_limit}} if memory_limit else None,
            "cpu": {"shares": {"value": shares}, "quota": {"value": quota} if quota is not None else None,
                    "period": {"value": period}, "cpus": cpus, "mems": mems},
            "unified": {}}


def nri_pod(name, namespace="default", uid=None, labels=None, annotations=None):
    """A PodSandbox as containerd 1.7 sends it, with the kubelet's labels and
    annotations and a linux part that a cpuset plugin has no use for."""
    uid = uid or pod_uid(namespace, name)
    all_labels = {"io.kubernetes.pod.name": name, "io.kubernetes.pod.namespace": namespace,
                  "io.kubernetes.pod.uid": uid, "app": name.rsplit("-", 1)[0]}
    all_labels.update(labels or {})
    all_annotations = {"kubernetes.io/config.seen": "2026-12-01T10:00:00.000000000Z",
                       "kubernetes.io/config.source": "api"}
    all_annotations.update(annotations or {})
    return {"id": nri_id("pod", namespace, name, uid), "name": name, "uid": uid, "namespace": namespace,
            "labels": all_labels, "annotations": all_annotations, "runtime_handler": "",
            "linux": {"cgroup_parent": "/kubepods/besteffort/pod" + uid,
                      "pod_resources": nri_linux_resources(shares=2),
                      "namespaces": [{"type": "network", "path": "/var/run/netns/cni-%s" % uid[:8]}]},
            "pid": 0}


def nri_container(pod, name, cpus="", env=(), state=NRI_CONTAINER_RUNNING, container_id=None, pid=None,
                  labels=None, annotations=None):
    """A Container of `pod` as containerd 1.7 sends it: an environment as the
    kubelet builds it (`env` "K=V" strings among service variables), mounts,
    namespaces, rlimits, and two fields of numbers no NRI version defines
    (fixed32 and fixed64), which a plugin must skip."""
    container_id = container_id or nri_id("container", pod["id"], name)
    all_labels = {"io.kubernetes.container.name": name, "io.kubernetes.pod.name": pod["name"],
                  "io.kubernetes.pod.namespace": pod["namespace"], "io.kubernetes.pod.uid": pod["uid"]}
    all_labels.update(labels or {})
    all_annotations = {"io.kubernetes.container.hash": "7f3a9c21", "io.kubernetes.container.restartCount": "0",
                       "io.kubernetes.container.terminationMessagePath": "/dev/termination-log"}
    all_annotations.update(annotations or {})
    environment = (["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOSTNAME=" + pod["name"]]
                   + list(env) + ["KUBERNETES_SERVICE_HOST=10.96.0.1", "KUBERNETES_SERVICE_PORT=443",
                                  "KUBERNETES_PORT=tcp://10.96.0.1:443"])
    return {"id": container_id, "pod_sandbox_id": pod["id"], "name": name, "state": state,
            "labels": all_labels, "annotations": all_annotations,
            "args": ["/bin/sh", "-c", "exec sleep infinity"], "env": environment,
            "mounts": [{"destination": "/etc/hosts", "type": "bind", "options": ["rbind", "rprivate", "rw"],
                        "source": "/var/lib/kubelet/pods/%s/etc-hosts" % pod["uid"]},
                       {"destination": "/dev/shm", "type": "bind", "options": ["rbind", "ro"],
                        "source": "/run/containerd/io.containerd.grpc.v1.cri/sandboxes/%s/shm" % pod["id"]}],
            "linux": {"namespaces": [{"type": "pid"}, {"type": "ipc", "path": "/proc/4242/ns/ipc"}, {"type": "mount"}],
                      "resources": nri_linux_resources(cpus),
                      "oom_score_adj": {"value": 1000},
                      "cgroups_path": "%s/%s" % (pod["linux"]["cgroup_parent"], container_id)},
            "pid": pid or 0, "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1048576, "soft": 1048576}],
            "_extra": pb_varint(40 << 3 | 5) + struct.pack("<I", 7) + pb_varint(41 << 3 | 1) + struct.pack("<Q", 7)}


def nri_container_update(container_id, cpus, ignore_failure=False):
    """A ContainerUpdate that sets only the cpuset."""
    return {"container_id": container_id, "linux": {"resources": {"cpu": {"cpus": cpus}}},
            "ignore_failure": ignore_failure}


def nri_cpus(message):
    """linux.resources.cpu.cpus of a Container, ContainerAdjustment or
    ContainerUpdate dict, or cpu.cpus of a LinuxResources one ("" where unset)."""
    resources = message if "cpu" in message else (message.get("linux") or {}).get("resources")
    return ((resources or {}).get("cpu") or {}).get("cpus") or ""


def nri_with_cpus(container, cpus):
    """A copy of a Container dict with linux.resources.cpu.cpus set."""
    container, linux = dict(container), dict(container.get("linux") or {})
    resources = dict(linux.get("resources") or {})
    resources["cpu"] = dict(resources.get("cpu") or {}, cpus=cpus)
    linux["resources"] = resources
    container["linux"] = linux
    return container


class NriReply(object):
    """What the runtime made of one call into the plugin.

    outcome: "ok" (the runtime uses `response`); "failed" (an error status or
    an unreadable reply: the runtime fails the container operation, NRI.md 6);
    "dropped" (no answer within the request timeout, or the connection broke
    or spoke out of protocol: the runtime closes the plugin and goes on without
    it); "skipped" (no plugin, or not subscribed to the event: nothing sent).
    code/message: the ttrpc status (or why it failed, dropped or skipped);
    response: the parsed response dict; cpus: for CreateContainer and
    UpdateContainer, the cpuset the runtime then gives the container (None when
    it fails the operation); fallback: a v0.12+ per-event RPC answered
    Unimplemented and StateChange was sent instead."""

    def __init__(self, method, outcome, response=None, code=0, message="", seconds=0.0):
        self.method, self.outcome, self.response = method, outcome, response
        self.code, self.message, self.seconds = code, message, seconds
        self.cpus = None
        self.fallback = False
        self.send_seconds = 0.0

    @property
    def ok(self):
        return self.outcome == "ok"

    def __repr__(self):
        return "NriReply(%s: %s, code %d %r, %.3f s, response %r)" % (
            self.method, self.outcome, self.code, self.message, self.seconds, self.response)


_WAITING = object()


class NriPluginConnection(object):
    """One plugin's connection to FakeNriRuntime: the mux, the runtime's ttrpc
    client on conn 1 and its ttrpc server on conn 2. Guarded by the runtime's cond."""

    def __init__(self, runtime, sock, number):
        self.runtime, self.sock, self.number = runtime, sock, number
        self.write_lock = threading.Lock()
        self.buffers = {NRI_PLUGIN_CONN: bytearray(), NRI_RUNTIME_CONN: bytearray()}
        self.pending = {}                   # stream id -> response body, _WAITING until it arrives
        self.next_stream = 1                # the runtime's client: odd ids from 1, step 2 (NRI.md 2)
        self.last_plugin_stream = 0         # the plugin's client must increase its odd ids
        self.registration = None            # RegisterPluginRequest dict once accepted
        self.registration_error = None
        self.configure_sent = threading.Event()
        self.events = 0                     # the effective event mask after Configure
        self.ready = False                  # registered, configured, synchronized
        self.closed = None                  # why, once closed
        self.reader = threading.Thread(target=self._read_loop, name="fake-nri-reader-%d" % number, daemon=True)

    # Writing ------------------------------------------------------------------

    def write(self, data):
        """Raw bytes onto the socket, one byte per write with runtime.byte_writes."""
        runtime = self.runtime
        try:
            if runtime.byte_writes:
                for i in range(len(data)):
                    self.sock.sendall(data[i:i + 1])
                    with runtime.cond:
                        runtime.socket_writes += 1
                    if runtime.byte_pause:
                        time.sleep(runtime.byte_pause)
            else:
                self.sock.sendall(data)
                with runtime.cond:
                    runtime.socket_writes += 1
            return True
        except OSError as e:
            self.close("write failed: %s" % e)
            return False

    def send(self, conn_id, message):
        """One ttrpc message in mux frames: of runtime.frame_size bytes when set,
        else as Go's 4096-byte bufio.Writer under ttrpc emits them: a message
        over 4096 bytes as its first 4096, then the rest in one frame (NRI.md 1)."""
        size = self.runtime.frame_size
        if size:
            chunks = [message[i:i + size] for i in range(0, len(message), size)]
        else:
            chunks = [message[:4096], message[4096:]] if len(message) > 4096 else [message]
        with self.write_lock:
            with self.runtime.cond:
                self.runtime.frames_sent.extend((conn_id, len(chunk)) for chunk in chunks)
            return self.write(b"".join(mux_frame(conn_id, chunk) for chunk in chunks))

    def close(self, reason):
        runtime = self.runtime
        with runtime.cond:
            if self.closed:
                return
            self.closed = reason
            runtime.closes.append(reason)
            if runtime.plugin is self:
                runtime.plugin = None
            runtime.cond.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)        # wakes the reader
        except OSError:
            pass
        self.sock.close()

    # Reading ------------------------------------------------------------------

    def _recv_exact(self, count):
        data = bytearray()
        while len(data) < count:
            chunk = self.sock.recv(min(count - len(data), 1 << 16))
            if not chunk:
                return None
            data += chunk
        return bytes(data)

    def _read_loop(self):
        runtime = self.runtime
        try:
            while not self.closed:
                header = self._recv_exact(8)
                if header is None:
                    return self.close("connection closed by plugin")
                conn_id, length = struct.unpack(">II", header)
                with runtime.cond:
                    runtime.frames_received.append((conn_id, length))
                # containerd 1.7 reads through a 4096-byte buffer and fails on a longer frame (NRI.md 1);
                # stricter than Go for an unknown conn id, whose frame Go reads in full and drops
                if runtime.max_plugin_frame is not None and length > runtime.max_plugin_frame:
                    return self.close("frame of %d bytes on conn %d > %d: ttrpc: closed" % (
                        length, conn_id, runtime.max_plugin_frame))
                payload = self._recv_exact(length)
                if payload is None:
                    return self.close("connection closed by plugin in a frame")
                if conn_id not in self.buffers:
                    runtime.violation("frame on unknown conn %d (%d bytes): the Go mux drops it" % (conn_id, length))
                    continue
                if not length:
                    runtime.violation("empty frame on conn %d" % conn_id)
                    continue
                buffer = self.buffers[conn_id]
                buffer += payload
                while len(buffer) >= 10:                          # a message may span several frames
                    size, stream, kind, flags = struct.unpack(">IIBB", bytes(buffer[:10]))
                    if size > TTRPC_MESSAGE_MAX:
                        return self.close("ttrpc message of %d bytes on conn %d > 4 MiB" % (size, conn_id))
                    if len(buffer) < 10 + size:
                        break
                    body = bytes(buffer[10:10 + size])
                    del buffer[:10 + size]
                    if flags:
                        runtime.violation("ttrpc flags 0x%x on stream %d of conn %d: unary calls use 0" % (
                            flags, stream, conn_id))
                    if conn_id == NRI_PLUGIN_CONN:
                        self._on_response(stream, kind, body)
                    else:
                        self._on_request(stream, kind, body)
                    if self.closed:
                        return
        except OSError as e:
            self.close("connection error: %s" % e)

    def _on_response(self, stream, kind, body):
        """conn 1: the plugin's answers to the runtime's calls (ttrpc client.go)."""
        runtime = self.runtime
        with runtime.cond:
            if self.pending.get(stream, None) is not _WAITING:
                runtime.violation("message on inactive stream %d of conn 1: the Go client ignores it" % stream)
                return
            if kind != TTRPC_RESPONSE_TYPE:                   # ErrProtocol: fatal, the plugin is closed
                self.close("message type %d on stream %d of conn 1: ttrpc: protocol error" % (kind, stream))
                return
            self.pending[stream] = body
            runtime.cond.notify_all()

    def _on_request(self, stream, kind, body):
        """conn 2: the plugin's calls into the runtime (ttrpc server.go)."""
        runtime = self.runtime
        if kind != TTRPC_REQUEST_TYPE:
            runtime.violation("message type %d on stream %d of conn 2" % (kind, stream))
            return self.close("message type %d from the plugin's client: no such stream" % kind)
        if stream % 2 != 1:
            runtime.violation("even stream id %d on conn 2" % stream)
            return self.respond(stream, code=GRPC_INVALID_ARGUMENT,
                                message="StreamID must be odd for client initiated streams")
        if stream <= self.last_plugin_stream:
            runtime.violation("stream id %d after %d on conn 2" % (stream, self.last_plugin_stream))
            return self.respond(stream, code=GRPC_INVALID_ARGUMENT,
                                message="StreamID cannot be re-used and must increment")
        self.last_plugin_stream = stream
        try:
            request = pb_decode_message(TTRPC_REQUEST, body)
        except ValueError as e:
            runtime.violation("unreadable ttrpc request on stream %d: %s" % (stream, e))
            return self.respond(stream, code=GRPC_INVALID_ARGUMENT, message="unmarshal request error: %s" % e)
        handlers = {"RegisterPlugin": self._register_plugin, "UpdateContainers": self._update_containers}
        if request["service"] != NRI_RUNTIME_SERVICE:
            return self.respond(stream, code=GRPC_UNIMPLEMENTED, message="service %s" % request["service"])
        if request["method"] not in handlers:
            return self.respond(stream, code=GRPC_UNIMPLEMENTED, message="method %s" % request["method"])
        # each request in its own thread, as the Go server runs handlers in goroutines
        threading.Thread(target=handlers[request["method"]], args=(stream, request["payload"]), daemon=True).start()

    def respond(self, stream, payload=b"", code=0, message=""):
        status = {"code": code, "message": message} if code else None
        return self.send(NRI_RUNTIME_CONN, ttrpc_message(stream, TTRPC_RESPONSE_TYPE, pb_encode(
            TTRPC_RESPONSE, {"status": status, "payload": payload})))

    # The Runtime service --------------------------------------------------------

    def _register_plugin(self, stream, payload):
        """plugin.go RegisterPlugin: a non-empty name, a two-digit index (NRI.md 5)."""
        runtime = self.runtime
        try:
            request = pb_decode_message(NRI_REGISTER_PLUGIN_REQUEST, payload)
        except ValueError as e:
            runtime.violation("unreadable RegisterPluginRequest: %s" % e)
            self.respond(stream, code=GRPC_UNKNOWN, message=str(e))
            return self.close("failed to register plugin: %s" % e)
        with runtime.cond:
            runtime.registrations.append(request)
            runtime.cond.notify_all()
            again = self.registration is not None
        if again:
            runtime.violation("RegisterPlugin again on one connection")
            return self.respond(stream)
        name, index = request["plugin_name"], request["plugin_idx"]
        error = None
        if not name:
            error = "invalid (empty) plugin name"
        elif len(index) != 2:
            error = 'invalid plugin index: invalid plugin index "%s", must be 2 digits' % index
        elif not ("0" <= index[0] <= "9" and "0" <= index[1] <= "9"):
            error = 'invalid plugin index: invalid plugin index "%s" (not [0-9][0-9])' % index
        if error:
            with runtime.cond:
                self.registration_error = error
                runtime.cond.notify_all()
            self.respond(stream, code=GRPC_UNKNOWN, message=error)
            return self.close("failed to register plugin: " + error)
        if runtime.configure_before_register_reply:
            # the runtime calls Configure as soon as the handler signals, racing its own reply (NRI.md 4)
            self._registered(request)
            self.configure_sent.wait(runtime.request_timeout)
            self.respond(stream)
        else:
            self.respond(stream)
            self._registered(request)

    def _registered(self, request):
        with self.runtime.cond:
            self.registration = request
            self.runtime.cond.notify_all()

    def _update_containers(self, stream, payload):
        """UpdateContainers as containerd 1.7 applies it (pkg/nri/domain.go):
        unknown containers are skipped; a failed update with ignore_failure is
        only logged; one without makes the whole call an error status, and the
        failed list never reaches the plugin (runtime.failed_reply = "list"
        answers OK with failed[] instead)."""
        runtime = self.runtime
        hang = runtime.hang_update_containers       # as it was when the request came
        try:
            request = pb_decode_message(NRI_UPDATE_CONTAINERS_REQUEST, payload)
        except ValueError as e:
            runtime.violation("unreadable UpdateContainersRequest: %s" % e)
            return self.respond(stream, code=GRPC_UNKNOWN, message=str(e))
        with runtime.cond:
            runtime.update_requests.append(request)
            runtime.cond.notify_all()
        if hang:
            return
        with runtime.runtime_lock:          # containerd's one NRI lock, held across every call into a plugin (NRI.md 6)
            with runtime.cond:
                failed = [u for u in request["update"] if u["container_id"] in runtime.failed_updates]
                runtime.apply_updates(request["update"])
        if runtime.failed_reply == "list":
            return self.respond(stream, pb_encode(NRI_UPDATE_CONTAINERS_RESPONSE, {"failed": failed}))
        if any(not u["ignore_failure"] for u in failed):
            return self.respond(stream, code=GRPC_UNKNOWN, message="NRI update of some containers failed")
        return self.respond(stream, pb_encode(NRI_UPDATE_CONTAINERS_RESPONSE, {}))

    # The runtime's calls into the Plugin service --------------------------------

    def call(self, method, payload, deadline, response_schema):
        """One unary call on conn 1, as plugin.go makes it: within the request
        timeout, else the plugin is closed (a slow plugin is dropped, NRI.md 6)."""
        runtime = self.runtime
        started = time.monotonic()
        with runtime.cond:
            if self.closed:
                return NriReply(method, "dropped", message="ttrpc: closed (%s)" % self.closed)
            stream = self.next_stream
            self.next_stream += 2
            self.pending[stream] = _WAITING
        request = pb_encode(TTRPC_REQUEST, {"service": NRI_PLUGIN_SERVICE, "method": method, "payload": payload,
                                            "timeout_nano": max(1, int((deadline - started) * 1e9))})
        self.send(NRI_PLUGIN_CONN, ttrpc_message(stream, TTRPC_REQUEST_TYPE, request))
        if method == "Configure":
            self.configure_sent.set()
        send_seconds = time.monotonic() - started
        if runtime.byte_writes:
            deadline += send_seconds          # the time spent writing byte by byte is the test's, not the plugin's
        with runtime.cond:
            runtime.cond.wait_for(lambda: self.pending[stream] is not _WAITING or self.closed,
                                  max(0.0, deadline - time.monotonic()))
            body = self.pending.pop(stream)
            closed = self.closed
        seconds = time.monotonic() - started
        if body is _WAITING:
            if not closed:
                self.close("closing plugin, failed to handle %s request: context deadline exceeded" % method)
                return self._reply(method, "dropped", seconds, send_seconds, message="context deadline exceeded")
            return self._reply(method, "dropped", seconds, send_seconds, message="ttrpc: closed (%s)" % closed)
        try:
            response = pb_decode_message(TTRPC_RESPONSE, body)
            status = response["status"] or {"code": 0, "message": ""}
            result = pb_decode_message(response_schema, response["payload"])
        except ValueError as e:                       # a proto error is not fatal: the operation fails
            runtime.violation("unreadable %s reply: %s" % (method, e))
            return self._reply(method, "failed", seconds, send_seconds, code=GRPC_UNKNOWN,
                               message="unreadable reply: %s" % e)
        if status["code"]:
            return self._reply(method, "failed", seconds, send_seconds, code=status["code"],
                               message=status["message"])
        return self._reply(method, "ok", seconds, send_seconds, response=result)

    @staticmethod
    def _reply(method, outcome, seconds, send_seconds, **fields):
        reply = NriReply(method, outcome, seconds=seconds, **fields)
        reply.send_seconds = send_seconds
        return reply


class FakeNriRuntime(object):
    """containerd 1.7's NRI adaptation (NRI v0.6.1, ttrpc v1.2.4) toward one
    plugin socket: what a plugin meets on /var/run/nri/nri.sock (NRI.md).

    start() removes a stale socket at `path`, listens, and accepts plugins one
    after another, as the runtime does (NRI.md 6). For each: wait up to
    `registration_timeout` for RegisterPlugin on conn 2 (name non-empty, index
    two ASCII digits, else an error status and the connection closed), answer
    it, call Configure (before that answer with configure_before_register_reply,
    as seen), accept the event mask only within `valid_events` (0 = all), then
    Synchronize with `pods` and `containers`, in chunks of `sync_chunk` objects
    each with `more` set (v0.7+) when given; the plugin must echo more=true
    with no updates until the last chunk, else it is closed ("plugin does not
    handle split sync requests"). The plugin is then `plugin`, which requests go
    to. Every call into it has `request_timeout`; one it does not answer in time
    closes it. stop() closes all; restart() = stop() + start(): a plugin must
    reconnect, and is registered, configured and synchronized afresh.

    Calls a test makes (synchronous; each returns an NriReply, and records it
    in `calls`; an event the plugin did not subscribe to is "skipped"):
      create_container(pod, container), update_container(pod, container,
      linux_resources), stop_container(pod, container), remove_container(pod,
      container, per_event_rpc=False), run_pod_sandbox(pod, per_event_rpc=True),
      state_change(event, pod, container) (v0.6 style), and call(method,
      payload, response_schema) for any method, subscribed or not (e.g. one a
      newer runtime has). per_event_rpc: as v0.12+, the event's own RPC first,
      StateChange after an Unimplemented (12) answer.
    The runtime's model: `pods`, `containers` (OrderedDicts by id; set them
    before the plugin connects for Synchronize); cpuset(container_id). It
    applies adjustments and updates as containerd does (an update for an id in
    `failed_updates` fails; one naming the container being created fails the
    creation).

    Records, all guarded by `cond` and kept across restarts: accepted (count),
    registrations (RegisterPluginRequest dicts, valid or not), configures
    (ConfigureResponse dicts), syncs (per Synchronize a list of (request,
    response) chunks), sync_updates (per completed one, its updates), ready
    (count of plugins synchronized), update_requests (UpdateContainersRequest
    dicts), calls, closes (why each connection ended), violations (what a real
    runtime tolerates but a correct plugin never does: frames on unknown conns,
    answers on inactive streams, non-zero flags, even or reused stream ids,
    unreadable messages), frames_received / frames_sent ((conn id, payload
    length) of every mux frame), socket_writes. Wait helpers raise
    AssertionError on timeout: wait(predicate, timeout, what), wait_ready(count),
    wait_closed(count), wait_update_requests(count), wait_accepted(count).

    Knobs, settable any time: byte_writes (every byte its own write, byte_pause
    seconds apart), frame_size (the fake's messages in mux frames of that
    many bytes), max_plugin_frame (default 4096: a longer frame from the plugin
    closes it, as containerd 1.7 does; None accepts any), failed_updates,
    failed_reply ("containerd" or "list"), hang_update_containers (never answer
    it), valid_events, nri_version (None: v0.6.1's ConfigureRequest; else also
    its timeouts and this version). Hostile sends to the current plugin:
    send_raw(data), send_frame(conn_id, payload), send_oversized_frame(),
    send_oversized_message(), hang_up_mid_request(method, payload)."""

    def __init__(self, path, pods=(), containers=(), registration_timeout=5.0, request_timeout=2.0,
                 sync_chunk=None, configure_before_register_reply=False, nri_version=None):
        self.path = path
        self.pods = collections.OrderedDict((pod["id"], pod) for pod in pods)
        self.containers = collections.OrderedDict((c["id"], c) for c in containers)
        self.registration_timeout, self.request_timeout = registration_timeout, request_timeout
        self.sync_chunk = sync_chunk
        self.configure_before_register_reply = configure_before_register_reply
        self.nri_version = nri_version
        self.runtime_name, self.runtime_version, self.config = "containerd", "1.7.24~ds1", ""
        self.valid_events = NRI_VALID_EVENTS_V0_6
        self.byte_writes, self.byte_pause = False, 0.0001
        self.frame_size = None
        self.max_plugin_frame = NRI_FRAME_MAX
        self.failed_updates = set()
        self.failed_reply = "containerd"
        self.hang_update_containers = False
        self.cond = threading.Condition()
        self.runtime_lock = threading.Lock()
        self.accepted = self.ready = self.socket_writes = 0
        self.registrations, self.configures, self.syncs, self.sync_updates = [], [], [], []
        self.update_requests, self.calls, self.closes, self.violations = [], [], [], []
        self.frames_received, self.frames_sent = [], []
        self.connections = []
        self.plugin = None
        self.listener = self.accept_thread = None
        self.stopping = False

    # Serving ------------------------------------------------------------------------

    def start(self):
        if os.path.lexists(self.path):            # the runtime removes and re-creates it (NRI.md 1)
            os.unlink(self.path)
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(8)
        listener.settimeout(0.05)                 # so that stop() is seen promptly
        self.listener, self.stopping = listener, False
        self.accept_thread = threading.Thread(target=self._accept_loop, args=(listener,),
                                              name="fake-nri-accept", daemon=True)
        self.accept_thread.start()
        return self

    def stop(self):
        self.stopping = True
        with self.cond:
            connections = list(self.connections)
        for connection in connections:
            connection.close("runtime stopped")
        if self.accept_thread is not None:
            self.accept_thread.join(10)
            self.accept_thread = None
        for connection in connections:
            connection.reader.join(5)
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            if os.path.lexists(self.path):
                os.unlink(self.path)

    def restart(self):
        self.stop()
        self.start()

    def _accept_loop(self, listener):
        while not self.stopping:
            try:
                sock, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            sock.settimeout(None)
            with self.cond:
                self.accepted += 1
                connection = NriPluginConnection(self, sock, self.accepted)
                self.connections.append(connection)
                self.cond.notify_all()
            connection.reader.start()
            self._start_plugin(connection)        # sequential: the next plugin waits (NRI.md 6)

    def _start_plugin(self, connection):
        with self.cond:
            registered = self.cond.wait_for(
                lambda: connection.registration or connection.registration_error or connection.closed,
                self.registration_timeout)
        if connection.closed or connection.registration_error:
            return
        if not registered:
            return connection.close("plugin registration timed out")
        if not self._configure(connection) or not self._synchronize(connection):
            return
        with self.cond:
            if connection.closed:
                return
            connection.ready = True
            self.plugin = connection
            self.ready += 1
            self.cond.notify_all()

    def _configure(self, connection):
        """plugin.go configure(): Configure within the request timeout; the mask
        within valid_events, 0 meaning all of them (NRI.md 4)."""
        request = {"config": self.config, "runtime_name": self.runtime_name, "runtime_version": self.runtime_version}
        if self.nri_version:
            request.update(registration_timeout=int(self.registration_timeout * 1000),
                           request_timeout=int(self.request_timeout * 1000), NRI_version=self.nri_version)
        reply = connection.call("Configure", pb_encode(NRI_CONFIGURE_REQUEST, request),
                                time.monotonic() + self.request_timeout, NRI_CONFIGURE_RESPONSE)
        with self.cond:
            self.calls.append(reply)
        if not reply.ok:
            connection.close("failed to configure plugin: %s" % reply.message)
            return False
        events = reply.response["events"]
        if events & ~self.valid_events:
            connection.close("invalid plugin events: 0x%x" % (events & ~self.valid_events & 0xFFFFFFFF))
            return False
        with self.cond:
            self.configures.append(reply.response)
            connection.events = events or self.valid_events
        return True

    def _synchronize(self, connection):
        """plugin.go synchronize() (HEAD, split as v0.7+ splits): one request
        timeout for all chunks; containerd holds its NRI lock throughout."""
        with self.runtime_lock:
            with self.cond:
                pods, containers = list(self.pods.values()), list(self.containers.values())
                chunks = []
                self.syncs.append(chunks)
            pods_per, containers_per = len(pods), len(containers)
            if self.sync_chunk:
                pods_per, containers_per = min(self.sync_chunk, pods_per), min(self.sync_chunk, containers_per)
            deadline = time.monotonic() + self.request_timeout
            while True:
                request = {"pods": pods[:pods_per], "containers": containers[:containers_per],
                           "more": len(pods) > pods_per or len(containers) > containers_per}
                reply = connection.call("Synchronize", pb_encode(NRI_SYNCHRONIZE_REQUEST, request), deadline,
                                        NRI_SYNCHRONIZE_RESPONSE)
                if self.byte_writes:
                    deadline += reply.send_seconds
                with self.cond:
                    self.calls.append(reply)
                    chunks.append((request, reply.response))
                if not reply.ok:
                    connection.close("failed to synchronize plugin: %s" % reply.message)
                    return False
                if not request["more"]:
                    break
                if reply.response["update"] or not reply.response["more"]:
                    connection.close("failed to synchronize plugin: plugin does not handle split sync requests")
                    return False
                pods, containers = pods[pods_per:], containers[containers_per:]
                pods_per, containers_per = min(pods_per, len(pods)), min(containers_per, len(containers))
            with self.cond:
                self.sync_updates.append(reply.response["update"])
                self.apply_updates(reply.response["update"])
        return True

    def apply_updates(self, updates):
        """Into the model, as containerd applies ContainerUpdates: unknown ids
        skipped, ids in failed_updates left as they are. Call with cond held."""
        for update in updates:
            container = self.containers.get(update["container_id"])
            cpus = nri_cpus(update)
            if container is not None and cpus and update["container_id"] not in self.failed_updates:
                self.containers[update["container_id"]] = nri_with_cpus(container, cpus)

    def violation(self, text):
        with self.cond:
            self.violations.append(text)
            self.cond.notify_all()

    # Calls into the plugin ------------------------------------------------------------

    def _event_call(self, event, method, request_schema, request, response_schema, connection=None,
                    deadline=None):
        connection = connection or self.plugin
        if connection is None or connection.closed:
            reply = NriReply(method, "skipped", message="no plugin")
        elif event and not connection.events & nri_event_mask(event):
            reply = NriReply(method, "skipped", message="not subscribed to event %d" % event)
        else:
            with self.runtime_lock:
                reply = connection.call(method, pb_encode(request_schema, request),
                                        deadline or time.monotonic() + self.request_timeout, response_schema)
        with self.cond:
            self.calls.append(reply)
        return reply

    def call(self, method, payload=b"", response_schema=NRI_EMPTY, timeout=None):
        """Any method of the Plugin service, subscribed or not, `payload` as bytes."""
        connection = self.plugin
        if connection is None:
            reply = NriReply(method, "skipped", message="no plugin")
        else:
            with self.runtime_lock:
                reply = connection.call(method, payload, time.monotonic() + (timeout or self.request_timeout),
                                        response_schema)
        with self.cond:
            self.calls.append(reply)
        return reply

    def create_container(self, pod, container):
        """CreateContainer; the container joins the model with the cpuset the
        runtime gives it, unless the creation fails (NRI.md 6)."""
        reply = self._event_call(4, "CreateContainer", NRI_CREATE_CONTAINER_REQUEST,
                                 {"pod": pod, "container": container}, NRI_CREATE_CONTAINER_RESPONSE)
        with self.cond:
            if reply.ok:
                for update in reply.response["update"]:
                    if update["container_id"] == container["id"]:
                        reply.outcome, reply.code = "failed", GRPC_UNKNOWN
                        reply.message = "plugin asked update of %r during creation" % container["id"]
            if reply.outcome == "failed":
                return reply
            reply.cpus = nri_cpus(container)
            if reply.ok:
                reply.cpus = nri_cpus(reply.response["adjust"] or {}) or reply.cpus
                self.apply_updates(reply.response["update"])
            self.containers[container["id"]] = nri_with_cpus(container, reply.cpus)
        return reply

    def update_container(self, pod, container, linux_resources):
        """UpdateContainer (a CRI UpdateContainerResources): the plugin may rewrite
        the pending update by returning one for the same container (NRI.md 6, 7)."""
        reply = self._event_call(8, "UpdateContainer", NRI_UPDATE_CONTAINER_REQUEST,
                                 {"pod": pod, "container": container, "linux_resources": linux_resources},
                                 NRI_UPDATE_CONTAINER_RESPONSE)
        with self.cond:
            if reply.outcome == "failed":
                return reply
            reply.cpus = nri_cpus(linux_resources)
            if reply.ok:
                for update in reply.response["update"]:
                    if update["container_id"] == container["id"] and nri_cpus(update):
                        reply.cpus = nri_cpus(update)
                self.apply_updates([u for u in reply.response["update"] if u["container_id"] != container["id"]])
            if reply.cpus and container["id"] in self.containers:
                self.containers[container["id"]] = nri_with_cpus(self.containers[container["id"]], reply.cpus)
        return reply

    def stop_container(self, pod, container):
        reply = self._event_call(10, "StopContainer", NRI_STOP_CONTAINER_REQUEST,
                                 {"pod": pod, "container": container}, NRI_STOP_CONTAINER_RESPONSE)
        with self.cond:
            if reply.ok:
                self.apply_updates(reply.response["update"])
            if container["id"] in self.containers:
                self.containers[container["id"]] = dict(self.containers[container["id"]], state=NRI_CONTAINER_STOPPED)
        return reply

    def state_change(self, event, pod=None, container=None):
        """StateChange(event), as v0.6.1 relays every other event."""
        return self._event_call(event, "StateChange", NRI_STATE_CHANGE_EVENT,
                                {"event": event, "pod": pod, "container": container}, NRI_EMPTY)

    def _per_event(self, event, pod, container, per_event_rpc):
        if not per_event_rpc:
            return self.state_change(event, pod, container)
        connection = self.plugin
        deadline = time.monotonic() + self.request_timeout          # one deadline for both attempts (HEAD)
        schema, request = NRI_POD_EVENT_REQUEST, {"pod": pod}
        if container is not None:
            schema, request = NRI_CONTAINER_EVENT_REQUEST, {"pod": pod, "container": container}
        reply = self._event_call(event, NRI_EVENT_RPCS[event], schema, request, NRI_EMPTY, connection, deadline)
        if reply.outcome == "failed" and reply.code == GRPC_UNIMPLEMENTED:
            reply = self._event_call(event, "StateChange", NRI_STATE_CHANGE_EVENT,
                                     {"event": event, "pod": pod, "container": container}, NRI_EMPTY,
                                     connection, deadline)
            reply.fallback = True
        return reply

    def remove_container(self, pod, container, per_event_rpc=False):
        """REMOVE_CONTAINER (11): StateChange, or with per_event_rpc RemoveContainer
        first; the container leaves the model either way."""
        reply = self._per_event(11, pod, container, per_event_rpc)
        with self.cond:
            self.containers.pop(container["id"], None)
        return reply

    def run_pod_sandbox(self, pod, per_event_rpc=True):
        reply = self._per_event(1, pod, None, per_event_rpc)
        with self.cond:
            self.pods[pod["id"]] = pod
        return reply

    def cpuset(self, container_id):
        with self.cond:
            return nri_cpus(self.containers[container_id])

    # Hostile sends -------------------------------------------------------------------

    def current_connection(self, timeout=5.0):
        """The plugin requests go to, else the newest open connection."""
        def find():
            if self.plugin is not None:
                return self.plugin
            return next((c for c in reversed(self.connections) if not c.closed), None)
        self.wait(find, timeout, "a plugin connection")
        with self.cond:
            return find()

    def send_raw(self, data=b"GET / HTTP/1.1\r\nHost: nri\r\n\r\n"):
        """Bytes as they are; the default reads as conn 0x47455420 with a ~790 MB frame."""
        return self.current_connection().write(data)

    def send_frame(self, conn_id, payload):
        """One mux frame, e.g. on a conn id nobody uses (the Go mux drops those)."""
        return self.current_connection().write(mux_frame(conn_id, payload))

    def send_oversized_frame(self):
        """A frame header on conn 1 announcing 4 MiB + 11 bytes (one more than a
        maximal ttrpc message), and a little of it."""
        return self.current_connection().write(struct.pack(">II", NRI_PLUGIN_CONN, TTRPC_MESSAGE_MAX + 11) + bytes(64))

    def send_oversized_message(self):
        """A ttrpc request header announcing 4 MiB + 1 bytes, in a small frame."""
        connection = self.current_connection()
        with self.cond:
            stream = connection.next_stream
            connection.next_stream += 2
        return connection.write(mux_frame(NRI_PLUGIN_CONN, struct.pack(
            ">IIBB", TTRPC_MESSAGE_MAX + 1, stream, TTRPC_REQUEST_TYPE, 0)))

    def hang_up_mid_request(self, method="CreateContainer", payload=None):
        """Half of a request's frame, then the connection closed."""
        connection = self.current_connection()
        if payload is None:
            pod = nri_pod("half-0")
            payload = pb_encode(NRI_CREATE_CONTAINER_REQUEST, {"pod": pod, "container": nri_container(pod, "c")})
        with self.cond:
            stream = connection.next_stream
            connection.next_stream += 2
        frame = mux_frame(NRI_PLUGIN_CONN, ttrpc_message(stream, TTRPC_REQUEST_TYPE, pb_encode(
            TTRPC_REQUEST, {"service": NRI_PLUGIN_SERVICE, "method": method, "payload": payload})))
        connection.write(frame[:len(frame) // 2])
        connection.close("runtime hung up mid-request")

    # Waiting ---------------------------------------------------------------------------

    def wait(self, predicate, timeout=10.0, what="condition"):
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise AssertionError("fake NRI runtime: timed out after %.1f s waiting for %s; closes %r, "
                                     "violations %r" % (timeout, what, self.closes, self.violations))

    def wait_accepted(self, count=1, timeout=10.0):
        self.wait(lambda: self.accepted >= count, timeout, "connection %d" % count)

    def wait_ready(self, count=1, timeout=10.0):
        """The registration of the count-th plugin synchronized."""
        self.wait(lambda: self.ready >= count, timeout, "plugin %d registered, configured, synchronized" % count)
        with self.cond:
            return [c for c in self.connections if c.ready][count - 1].registration

    def wait_closed(self, count=1, timeout=10.0):
        """Why the count-th connection to end did."""
        self.wait(lambda: len(self.closes) >= count, timeout, "connection close %d" % count)
        return self.closes[count - 1]

    def wait_update_requests(self, count=1, timeout=10.0):
        self.wait(lambda: len(self.update_requests) >= count, timeout, "UpdateContainers request %d" % count)
        return self.update_requests[count - 1]


class FakeNriRuntimeTests(TempDirTest):
    """FakeNriRuntime driven by the smallest plugin that speaks its protocol."""

    class MiniPlugin(object):
        """The plugin side, minimal: mux + ttrpc + the dict encoders. The test
        thread reads and answers the runtime's requests one by one."""

        def __init__(self, path, timeout=5.0):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(path)
            self.buffers = {NRI_PLUGIN_CONN: b"", NRI_RUNTIME_CONN: b""}
            self.next_stream, self.responses, self.calls = 1, {}, collections.deque()

        def send(self, conn_id, stream, kind, payload):
            self.sock.sendall(mux_frame(conn_id, ttrpc_message(stream, kind, payload)))

        def request(self, method, schema, message):
            """A call into the Runtime service on conn 2: its stream id."""
            stream, self.next_stream = self.next_stream, self.next_stream + 2
            self.send(NRI_RUNTIME_CONN, stream, TTRPC_REQUEST_TYPE, pb_encode(TTRPC_REQUEST, {
                "service": NRI_RUNTIME_SERVICE, "method": method, "payload": pb_encode(schema, message)}))
            return stream

        def answer(self, stream, schema=NRI_EMPTY, message=None, code=0, text=""):
            status = {"code": code, "message": text} if code else None
            self.send(NRI_PLUGIN_CONN, stream, TTRPC_RESPONSE_TYPE, pb_encode(TTRPC_RESPONSE, {
                "status": status, "payload": pb_encode(schema, message or {})}))

        def exact(self, count):
            """count bytes; None at EOF, or at a reset (the runtime closed with our bytes unread)."""
            data = b""
            while len(data) < count:
                try:
                    chunk = self.sock.recv(count - len(data))
                except ConnectionResetError:
                    return None
                if not chunk:
                    return None
                data += chunk
            return data

        def read(self):
            """The next whole ttrpc message: (conn id, stream id, type, body); None at EOF."""
            while True:
                for conn_id, data in self.buffers.items():
                    if len(data) >= 10:
                        size, stream, kind, _ = struct.unpack(">IIBB", data[:10])
                        if len(data) >= 10 + size:
                            self.buffers[conn_id] = data[10 + size:]
                            return conn_id, stream, kind, data[10:10 + size]
                header = self.exact(8)
                if header is None:
                    return None
                conn_id, length = struct.unpack(">II", header)
                payload = self.exact(length)
                if payload is None:
                    return None
                self.buffers[conn_id] = self.buffers.get(conn_id, b"") + payload

        def pump(self):
            """Read one message: an answer to our calls goes to `responses`, a
            call of the runtime to `calls` (the two race, as in containerd). False at EOF."""
            message = self.read()
            if message is None:
                return False
            conn_id, stream, kind, body = message
            if conn_id == NRI_RUNTIME_CONN:
                self.responses[stream] = pb_decode_message(TTRPC_RESPONSE, body)
            else:
                request = pb_decode_message(TTRPC_REQUEST, body)
                assert request["service"] == NRI_PLUGIN_SERVICE and kind == TTRPC_REQUEST_TYPE, request
                self.calls.append((stream, request["method"], request["payload"]))
            return True

        def next_call(self, method=None):
            """The runtime's next call on conn 1: (stream, method, payload); None at EOF."""
            while not self.calls:
                if not self.pump():
                    return None
            call = self.calls.popleft()
            assert method is None or call[1] == method, (method, call[1])
            return call

        def response(self, stream):
            while stream not in self.responses:
                assert self.pump(), "EOF before the answer on stream %d" % stream
            return self.responses.pop(stream)

        def register(self, name="isolcpu-plugin", index="50", events=0, updates=()):
            """RegisterPlugin, Configure with `events`, Synchronize (chunk by chunk) with `updates`."""
            stream = self.request("RegisterPlugin", NRI_REGISTER_PLUGIN_REQUEST,
                                  {"plugin_name": name, "plugin_idx": index})
            call, _, _ = self.next_call("Configure")
            self.answer(call, NRI_CONFIGURE_RESPONSE, {"events": events})
            assert self.response(stream)["status"] is None
            while True:
                call, _, payload = self.next_call("Synchronize")
                more = pb_decode_message(NRI_SYNCHRONIZE_REQUEST, payload)["more"]
                self.answer(call, NRI_SYNCHRONIZE_RESPONSE, {"more": True} if more else {"update": list(updates)})
                if not more:
                    return

        def close(self):
            self.sock.close()

    def setUp(self):
        super().setUp()
        self.socket_path = os.path.join(self.tmp, "nri", "nri.sock")

    def runtime(self, **options):
        runtime = FakeNriRuntime(self.socket_path, **options).start()
        self.addCleanup(runtime.stop)
        return runtime

    def plugin(self):
        client = self.MiniPlugin(self.socket_path)
        self.addCleanup(client.close)
        return client

    def in_thread(self, function, *args):
        """function(*args) in a thread: join() returns its result."""
        result = []
        thread = threading.Thread(target=lambda: result.append(function(*args)), daemon=True)
        thread.start()

        def join():
            thread.join(10)
            self.assertFalse(thread.is_alive(), "%s never returned" % function.__name__)
            return result[0]
        return join

    def test_codec_reads_what_it_writes_skips_unknown_fields_and_rejects_malformed(self):
        pod = nri_pod("web-0", "shop")
        container = nri_container(pod, "app", cpus="0-3", env=["ISOLCPUS=2-3"])
        decoded = pb_decode_message(NRI_CONTAINER, pb_encode(NRI_CONTAINER, container))
        self.assertEqual((decoded["id"], decoded["name"], decoded["state"], nri_cpus(decoded)),
                         (container["id"], "app", NRI_CONTAINER_RUNNING, "0-3"))
        self.assertIn("ISOLCPUS=2-3", decoded["env"])
        self.assertEqual(decoded["labels"]["io.kubernetes.pod.uid"], pod["uid"])
        self.assertEqual(decoded["linux"]["resources"]["cpu"]["shares"], {"value": 1024})
        self.assertEqual(pb_decode_message(NRI_CONFIGURE_RESPONSE, pb_encode(NRI_CONFIGURE_RESPONSE, {"events": -1})),
                         {"events": -1})
        self.assertEqual(pb_decode_message(NRI_CONTAINER, b""), pb_decode_message(NRI_CONTAINER, pb_encode(
            NRI_CONTAINER, {"name": "", "state": 0, "linux": None})))
        wire_types = {wire for _, wire, _ in pb_decode(pb_encode(NRI_CONTAINER, container))}
        self.assertEqual(wire_types, {0, 1, 2, 5})                      # the unknown fields 40 and 41
        self.assertEqual(pb_decode_message({1: ("a", NRI_KEY_VALUE)},    # a message seen twice is merged
                                           pb_field(1, pb_field(1, "k")) + pb_field(1, pb_field(2, "v")))["a"],
                         {"key": "k", "value": "v"})
        for bad in (b"\x08", b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x02", b"\x12\x05abc", b"\x0b", b"\x0c",
                    b"\x0e", b"\x0f", b"\x00\x00", b"\x0d\x00\x00", b"\x09\x00", b"\x0a\x02\xc3\x28",
                    pb_varint(1 << 32 | 2) + b"\x00"):
            with self.subTest(data=bad):
                with self.assertRaises(ValueError):
                    pb_decode_message(NRI_POD_SANDBOX, bad)
        with self.assertRaises(ValueError):                             # a known field of the wrong wire type
            pb_decode_message(NRI_POD_SANDBOX, pb_field(1, 5))

    def test_schemas_match_the_reference(self):
        for name, schemas in (("nri-v1alpha1.proto", NRI_SCHEMAS), ("ttrpc.proto", TTRPC_SCHEMAS)):
            reference = reference_proto(name)
            if reference is None:
                self.skipTest("../shared/reference absent")
            messages = reference[1]
            for message, schema in schemas.items():
                for number, (field, kind) in schema.items():
                    with self.subTest(file=name, message=message, field=field):
                        if field in messages[message]:
                            self.assertEqual(messages[message][field][0], number)
                            self.assertEqual(messages[message][field][2], isinstance(kind, list))
                        else:                   # maps (which reference_proto does not read) or upstream-only fields
                            numbers = [n for n, _, _ in messages[message].values()]
                            self.assertTrue(kind == "map" or number not in numbers)
        services = reference_proto("nri-v1alpha1.proto")[2]
        self.assertEqual(sorted(services["Runtime"]), ["RegisterPlugin", "UpdateContainers"])
        self.assertLessEqual({"Configure", "Synchronize", "CreateContainer", "UpdateContainer", "StopContainer",
                              "StateChange"}, set(services["Plugin"]))

    def test_registration_configure_split_sync_requests_and_updates(self):
        pods = [nri_pod("web-0"), nri_pod("db-0")]
        first, second, third = (nri_container(pods[0], "app", cpus="0-7"),
                                nri_container(pods[0], "sidecar", cpus="0-7"), nri_container(pods[1], "db", cpus="0-7"))
        runtime = self.runtime(pods=pods, containers=[first, second, third], sync_chunk=2,
                               configure_before_register_reply=True, nri_version="v0.12.0")
        client = self.plugin()
        register = client.request("RegisterPlugin", NRI_REGISTER_PLUGIN_REQUEST,
                                  {"plugin_name": "isolcpu-plugin", "plugin_idx": "50"})
        call, _, payload = client.next_call("Configure")
        self.assertNotIn(register, client.responses)                    # Configure came first
        configure = pb_decode_message(NRI_CONFIGURE_REQUEST, payload)
        self.assertEqual((configure["runtime_name"], configure["request_timeout"]), ("containerd", 2000))
        events = nri_event_mask(4, 8, 11)
        client.answer(call, NRI_CONFIGURE_RESPONSE, {"events": events, "_extra": pb_field(9, "a field to skip")})
        self.assertIsNone(client.response(register)["status"])
        chunks = []
        for answer in ({"more": True}, {"update": [nri_container_update(first["id"], "0-1,4-7", True)]}):
            call, _, payload = client.next_call("Synchronize")
            chunks.append(pb_decode_message(NRI_SYNCHRONIZE_REQUEST, payload))
            client.answer(call, NRI_SYNCHRONIZE_RESPONSE, answer)
        self.assertEqual([(len(c["pods"]), len(c["containers"]), c["more"]) for c in chunks],
                         [(2, 2, True), (0, 1, False)])
        self.assertEqual(chunks[1]["containers"][0]["linux"]["cgroups_path"], third["linux"]["cgroups_path"])
        self.assertEqual(runtime.wait_ready(), {"plugin_name": "isolcpu-plugin", "plugin_idx": "50", "NRI_version": ""})
        self.assertEqual((runtime.configures, runtime.plugin.events), ([{"events": events}], events))
        self.assertEqual(runtime.cpuset(first["id"]), "0-1,4-7")
        self.assertEqual([len(chunks) for chunks in runtime.syncs], [2])

        holder = nri_container(pods[1], "holder", cpus="0-7", env=["ISOLCPUS=2-3"])
        join = self.in_thread(runtime.create_container, pods[1], holder)
        call, _, payload = client.next_call("CreateContainer")
        request = pb_decode_message(NRI_CREATE_CONTAINER_REQUEST, payload)
        self.assertEqual((request["pod"]["uid"], request["container"]["name"]), (pods[1]["uid"], "holder"))
        self.assertIn("ISOLCPUS=2-3", request["container"]["env"])
        client.answer(call, NRI_CREATE_CONTAINER_RESPONSE,
                      {"adjust": {"linux": {"resources": {"cpu": {"cpus": "2-3"}}}}})
        reply = join()
        self.assertEqual((reply.outcome, reply.cpus, runtime.cpuset(holder["id"])), ("ok", "2-3", "2-3"))

        join = self.in_thread(runtime.update_container, pods[1], holder, nri_linux_resources("0-1"))
        call, _, payload = client.next_call("UpdateContainer")
        self.assertEqual(nri_cpus(pb_decode_message(NRI_UPDATE_CONTAINER_REQUEST, payload)["linux_resources"]), "0-1")
        client.answer(call, NRI_UPDATE_CONTAINER_RESPONSE, {"update": [nri_container_update(holder["id"], "0-3")]})
        self.assertEqual((join().cpus, runtime.cpuset(holder["id"])), ("0-3", "0-3"))
        self.assertEqual(runtime.stop_container(pods[1], holder).outcome, "skipped")      # not subscribed

        runtime.failed_updates = {second["id"]}
        stream = client.request("UpdateContainers", NRI_UPDATE_CONTAINERS_REQUEST, {"update": [
            nri_container_update(first["id"], "0-3", True), nri_container_update(second["id"], "1", True),
            nri_container_update("gone", "1", True)]})
        self.assertEqual(client.response(stream), {"status": None, "payload": b""})
        self.assertEqual(len(runtime.wait_update_requests()["update"]), 3)
        self.assertEqual((runtime.cpuset(first["id"]), runtime.cpuset(second["id"])), ("0-3", "0-7"))
        stream = client.request("UpdateContainers", NRI_UPDATE_CONTAINERS_REQUEST,
                                {"update": [nri_container_update(second["id"], "1")]})
        self.assertEqual(client.response(stream)["status"],
                         {"code": GRPC_UNKNOWN, "message": "NRI update of some containers failed"})
        runtime.failed_reply = "list"
        stream = client.request("UpdateContainers", NRI_UPDATE_CONTAINERS_REQUEST,
                                {"update": [nri_container_update(second["id"], "1")]})
        failed = pb_decode_message(NRI_UPDATE_CONTAINERS_RESPONSE, client.response(stream)["payload"])["failed"]
        self.assertEqual([u["container_id"] for u in failed], [second["id"]])
        runtime.hang_update_containers = True
        hung = client.request("UpdateContainers", NRI_UPDATE_CONTAINERS_REQUEST, {})
        runtime.wait_update_requests(4)
        runtime.hang_update_containers = False
        stream = client.request("UpdateContainers", NRI_UPDATE_CONTAINERS_REQUEST, {})
        self.assertIsNone(client.response(stream)["status"])
        self.assertNotIn(hung, client.responses)

        join = self.in_thread(runtime.remove_container, pods[1], holder, True)
        call, _, _ = client.next_call("RemoveContainer")
        client.answer(call, code=GRPC_UNIMPLEMENTED, text="method RemoveContainer")
        call, _, payload = client.next_call("StateChange")
        self.assertEqual(pb_decode_message(NRI_STATE_CHANGE_EVENT, payload)["event"], 11)
        client.answer(call)
        reply = join()
        self.assertEqual((reply.outcome, reply.fallback, holder["id"] in runtime.containers), ("ok", True, False))

        join = self.in_thread(runtime.call, "RunPodSandbox", pb_encode(NRI_POD_EVENT_REQUEST, {"pod": pods[0]}))
        call, _, _ = client.next_call("RunPodSandbox")
        client.answer(call, code=GRPC_UNIMPLEMENTED, text="method RunPodSandbox")
        self.assertEqual((join().outcome, runtime.calls[-1].code), ("failed", GRPC_UNIMPLEMENTED))
        self.assertTrue(runtime.frames_received and all(n <= 4096 for _, n in runtime.frames_received))
        self.assertEqual({conn for conn, _ in runtime.frames_received}, {1, 2})
        self.assertEqual((runtime.violations, runtime.closes), ([], []))

    def test_a_failing_plugin_fails_the_creation_a_slow_one_is_dropped(self):
        runtime = self.runtime(request_timeout=0.3)
        client = self.plugin()
        client.register(events=nri_event_mask(4))
        runtime.wait_ready()
        pod = nri_pod("web-0")
        join = self.in_thread(runtime.create_container, pod, nri_container(pod, "app"))
        call, _, _ = client.next_call("CreateContainer")
        client.answer(call, code=GRPC_UNKNOWN, text="no")
        reply = join()
        self.assertEqual((reply.outcome, reply.code, reply.message, reply.cpus), ("failed", GRPC_UNKNOWN, "no", None))
        self.assertEqual(list(runtime.containers), [])

        # awaiting UpdateContainers inside a request deadlocks on the runtime's lock until the timeout
        container = nri_container(pod, "app", cpus="0-7")
        join = self.in_thread(runtime.create_container, pod, container)
        client.next_call("CreateContainer")
        client.request("UpdateContainers", NRI_UPDATE_CONTAINERS_REQUEST, {"update": [nri_container_update("x", "1")]})
        self.assertIsNone(client.next_call())                         # no answer to either: the connection ends
        reply = join()
        self.assertEqual((reply.outcome, reply.cpus, runtime.cpuset(container["id"])), ("dropped", "0-7", "0-7"))
        self.assertGreaterEqual(reply.seconds, 0.3)
        self.assertIn("context deadline exceeded", runtime.wait_closed())
        self.assertEqual(runtime.create_container(pod, nri_container(pod, "late")).outcome, "skipped")

    def test_registration_rules(self):
        runtime = self.runtime(registration_timeout=0.2)
        silent = self.plugin()
        self.assertIsNone(silent.read())
        self.assertEqual(runtime.wait_closed(1), "plugin registration timed out")
        for number, (name, index, message) in enumerate((
                ("isolcpu-plugin", "5", 'invalid plugin index "5", must be 2 digits'),
                ("isolcpu-plugin", "5a", 'invalid plugin index "5a" (not [0-9][0-9])'),
                ("", "50", "invalid (empty) plugin name")), 2):
            with self.subTest(name=name, index=index):
                client = self.plugin()
                stream = client.request("RegisterPlugin", NRI_REGISTER_PLUGIN_REQUEST,
                                        {"plugin_name": name, "plugin_idx": index})
                status = client.response(stream)["status"]
                self.assertEqual(status["code"], GRPC_UNKNOWN)
                self.assertIn(message, status["message"])
                self.assertIsNone(client.read())
                self.assertIn(message, runtime.wait_closed(number))
        client = self.plugin()
        client.request("RegisterPlugin", NRI_REGISTER_PLUGIN_REQUEST, {"plugin_name": "p", "plugin_idx": "10"})
        call, _, _ = client.next_call("Configure")
        client.answer(call, NRI_CONFIGURE_RESPONSE, {"events": nri_event_mask(4, 12)})
        self.assertEqual(runtime.wait_closed(5), "invalid plugin events: 0x800")
        self.assertEqual(runtime.ready, 0)

    def test_a_split_sync_must_be_echoed(self):
        pod = nri_pod("web-0")
        runtime = self.runtime(pods=[pod], containers=[nri_container(pod, "a"), nri_container(pod, "b")], sync_chunk=1)
        answers = ({"more": False}, {"more": True, "update": [nri_container_update("a", "1")]})
        for number, answer in enumerate(answers, 1):
            with self.subTest(answer=answer):
                client = self.plugin()
                client.request("RegisterPlugin", NRI_REGISTER_PLUGIN_REQUEST, {"plugin_name": "p", "plugin_idx": "10"})
                call, _, _ = client.next_call("Configure")
                client.answer(call, NRI_CONFIGURE_RESPONSE, {})
                call, _, _ = client.next_call("Synchronize")
                client.answer(call, NRI_SYNCHRONIZE_RESPONSE, answer)
                self.assertIsNone(client.next_call())
                self.assertIn("plugin does not handle split sync requests", runtime.wait_closed(number))
        self.assertEqual(runtime.ready, 0)

    def test_bytes_written_one_by_one_and_messages_in_small_or_go_sized_frames(self):
        pod = nri_pod("web-0")
        runtime = self.runtime(pods=[pod], containers=[nri_container(pod, "c%d" % i) for i in range(12)])
        runtime.byte_writes, runtime.byte_pause = True, 0.0      # no pause: 13 KiB of Synchronize
        client = self.plugin()
        client.register(events=nri_event_mask(4))
        runtime.wait_ready()
        self.assertEqual(runtime.socket_writes, sum(8 + n for _, n in runtime.frames_sent))
        sync_frames = [n for _, n in runtime.frames_sent[2:4]]        # Configure, RegisterPlugin's answer, Synchronize
        self.assertEqual(sync_frames[0], 4096)                          # Go's bufio.Writer: 4096, then the rest
        self.assertGreater(sync_frames[1], 4096)
        runtime.byte_writes, runtime.frame_size = False, 5
        sent = len(runtime.frames_sent)
        join = self.in_thread(runtime.create_container, pod, nri_container(pod, "new"))
        call, _, payload = client.next_call("CreateContainer")
        self.assertEqual(pb_decode_message(NRI_CREATE_CONTAINER_REQUEST, payload)["container"]["name"], "new")
        client.answer(call, NRI_CREATE_CONTAINER_RESPONSE, {})
        self.assertEqual(join().outcome, "ok")
        self.assertEqual(max(n for _, n in runtime.frames_sent[sent:]), 5)

    def test_garbage_oversized_frames_and_unknown_conns_from_the_plugin(self):
        runtime = self.runtime()
        client = self.plugin()
        client.register()
        runtime.wait_ready()
        client.sock.sendall(mux_frame(7, b"hello"))                      # the Go mux drops it
        client.sock.sendall(mux_frame(1, ttrpc_message(99, TTRPC_RESPONSE_TYPE, b"")))    # an inactive stream
        runtime.wait(lambda: len(runtime.violations) == 2, 5, "two violations")
        self.assertIn("unknown conn 7", runtime.violations[0])
        self.assertIn("inactive stream 99", runtime.violations[1])
        client.sock.sendall(mux_frame(2, bytes(6144)))                   # one 6 KiB frame, as seen to fail
        self.assertIsNone(client.read())
        self.assertIn("frame of 6144 bytes on conn 2 > 4096", runtime.wait_closed(1))
        garbage = self.plugin()
        garbage.sock.sendall(b"GET / HTTP/1.1\r\nHost: nri\r\n\r\n")
        self.assertIsNone(garbage.read())
        self.assertIn("frame of", runtime.wait_closed(2))
        runtime.max_plugin_frame = None
        message = self.plugin()
        message.sock.sendall(mux_frame(2, struct.pack(">IIBB", TTRPC_MESSAGE_MAX + 1, 1, 1, 0)))
        self.assertIsNone(message.read())
        self.assertIn("> 4 MiB", runtime.wait_closed(3))

    def test_hostile_sends_reach_the_plugin_and_a_restarted_runtime_configures_afresh(self):
        runtime = self.runtime()
        client = self.plugin()
        client.register()                                               # events 0: all of them
        runtime.wait_ready()
        self.assertEqual(runtime.plugin.events, NRI_VALID_EVENTS_V0_6)
        runtime.send_frame(9, b"x")
        runtime.send_oversized_frame()
        self.assertEqual(struct.unpack(">II", client.exact(8)), (9, 1))
        client.exact(1)
        self.assertEqual(struct.unpack(">II", client.exact(8)), (1, TTRPC_MESSAGE_MAX + 11))
        client.exact(64)
        runtime.send_raw(b"\x00garbage")
        self.assertEqual(client.exact(8), b"\x00garbage")
        runtime.send_oversized_message()
        self.assertEqual(struct.unpack(">IIIIBB", client.exact(18))[2:5], (TTRPC_MESSAGE_MAX + 1, 5, 1))
        runtime.hang_up_mid_request()
        conn_id, length = struct.unpack(">II", client.exact(8))
        self.assertEqual(conn_id, 1)
        data = client.sock.recv(length)
        self.assertLess(len(data), length)
        self.assertIsNone(client.exact(length - len(data)))
        self.assertEqual(runtime.wait_closed(), "runtime hung up mid-request")
        runtime.restart()
        again = self.plugin()
        again.register(index="51")
        self.assertEqual(runtime.wait_ready(2)["plugin_idx"], "51")
        self.assertEqual([len(chunks) for chunks in runtime.syncs], [1, 1])
        self.assertEqual(len(runtime.configures), 2)


class PluginProcess(object):
    """isolcpu_plugin.py as a real process; its log goes to a file. As a
    script (the README's way), or with module=True as the package and the
    image run it: `python3 -m isolcpu_plugin`, from its byte-compiled form."""

    def __init__(self, tmp, args, env=None, module=False):
        self.log_path = tempfile.mktemp(prefix="plugin-log-", dir=tmp)
        self.log_file = open(self.log_path, "w")
        command = [sys.executable, "-m", "isolcpu_plugin"] if module else [sys.executable, PLUGIN]
        self.proc = subprocess.Popen(command + list(args), stdout=subprocess.DEVNULL, stderr=self.log_file,
                                     env=plugin_env(dict(env or {}, PYTHONPATH=HERE) if module else env))

    def log(self):
        with open(self.log_path) as f:
            return f.read()

    def wait_log(self, text, timeout=10.0, count=1):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log().count(text) >= count:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError("plugin never logged %r; log:\n%s" % (text, self.log()))

    def stop(self, signum=signal.SIGTERM, timeout=5.0):
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.log_file.close()


class PluginRig(TempDirTest):
    """A fake host, a device-plugin dir, a FakeKubelet; plugin processes on demand."""

    def setUp(self):
        super().setUp()
        self.sysfs, self.procfs = fake_host(os.path.join(self.tmp, "host"), sockets=2, cores=2,
                                            isolated="2-3,6-7", node_ids=[0, 2])
        self.dir = os.path.join(self.tmp, "device-plugins")
        os.makedirs(self.dir)
        self.kubelet = FakeKubelet(self.dir)
        self.addCleanup(self.kubelet.stop)

    def start_plugin(self, *extra, env=None):
        # never the host's own PodResources socket: the fake kubelet's, where it serves one
        args = ["--sysfs", self.sysfs, "--procfs", self.procfs, "--device-plugin-path", self.dir,
                "--pod-resources-socket", os.path.join(self.tmp, "pod-resources", "kubelet.sock"),
                "--rescan-interval", "0.2", "--log-level", "debug"] + list(extra)
        process = PluginProcess(self.tmp, args, env)
        self.addCleanup(process.stop, signal.SIGKILL)
        return process

    def registered_plugin(self, *extra):
        """The kubelet started, a plugin registered with it and listing its 4 devices."""
        self.kubelet.start()
        process = self.start_plugin(*extra)
        self.kubelet.wait_list(lambda devices: len(devices) == 4)
        process.wait_log("registered windriver.com/isolcpus")
        return process

    @property
    def plugin_socket(self):
        return os.path.join(self.dir, "windriver.com-isolcpus.sock")

    def set_host(self, name, text):
        write_files(os.path.dirname(self.sysfs), {"sys/devices/system/cpu/" + name: text})


@needs_grpc
class LifecycleTests(PluginRig):
    """The plugin as a process, against FakeKubelet over real unix sockets."""

    def test_register_list_and_allocate(self):
        self.kubelet.start()
        process = self.start_plugin()
        request = self.kubelet.wait_registered()
        self.assertEqual((request.version, request.endpoint, request.resource_name),
                         ("v1beta1", "windriver.com-isolcpus.sock", "windriver.com/isolcpus"))
        self.assertFalse(self.kubelet.options[0].pre_start_required)
        self.assertTrue(self.kubelet.options[0].get_preferred_allocation_available)
        snap = self.kubelet.wait_list(lambda devices: devices)
        self.assertEqual(snap.devices, {"2": ("Healthy", [2]), "3": ("Healthy", [2]),
                                        "6": ("Healthy", [2]), "7": ("Healthy", [2])})
        self.assertEqual(stat.S_IMODE(os.stat(self.plugin_socket).st_mode), 0o600)
        self.assertEqual(os.stat(self.plugin_socket).st_uid, os.getuid())

        for ids, expected in ((["6", "2", "3"], "2-3,6"), (["7", "6", "3", "2"], "2-3,6-7"), (["6", "7"], "6-7")):
            container = self.kubelet.allocate(*ids).container_responses[0]
            self.assertEqual(dict(container.envs), {"ISOLCPUS": expected})
        response = self.kubelet.allocate("7", "3")
        container = response.container_responses[0]
        self.assertEqual(dict(container.envs), {"ISOLCPUS": "3,7"})
        self.assertEqual(list(container.mounts), [])
        process.wait_log("allocated CPUs 3,7")
        prestart = self.kubelet.stub.PreStartContainer(pb.PreStartContainerRequest(devices_ids=["3"]))
        self.assertEqual(prestart, pb.PreStartContainerResponse())
        self.assertEqual(process.stop(), 0)

    def test_allocate_bad_ids_is_invalid_argument(self):
        self.kubelet.start()
        self.start_plugin()
        self.kubelet.wait_list(lambda devices: devices)
        for ids, named in ((["3", "99"], "'99'"), (["x" * 500], "'xxxxxxxxxxxxxxxxxxxx'..."),
                           (["3", "3"], "duplicate"), ([], "no device IDs"), (["0"], "'0'"),
                           (["-3"], "'-3'"), ([" 3"], "' 3'")):
            with self.subTest(ids=ids):
                with self.assertRaises(grpc.RpcError) as caught:
                    self.kubelet.allocate(*ids)
                self.assertEqual(caught.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
                self.assertIn(named, caught.exception.details())
                self.assertLess(len(caught.exception.details()), 300)
        self.assertEqual(dict(self.kubelet.allocate("2").container_responses[0].envs), {"ISOLCPUS": "2"})

    def test_get_preferred_allocation(self):
        # isolated 2-3,6-7: cores {2,6} and {3,7}, both on NUMA node 2
        self.kubelet.start()
        process = self.start_plugin()
        self.kubelet.wait_list(lambda devices: devices)
        prefer = self.kubelet.prefer
        self.assertEqual(prefer(["7", "3", "6", "2"], [], 2), ["2", "6"])
        self.assertEqual(prefer(["7", "3", "6", "2"], ["7"], 2), ["3", "7"])
        self.assertEqual(prefer(["2", "3", "6"], [], 1), ["3"])              # 3's sibling 7 is taken
        self.assertEqual(prefer(["2", "3"], [], 10), ["2", "3"])              # best valid subset
        self.assertEqual(prefer(["99", "2"], [], 1), ["2"])                   # not advertised: left out
        self.assertEqual(prefer(["2", "6"], ["3"], 1), ["2"])
        self.assertEqual(prefer(["2", "6"], [], 0), [])
        process.wait_log("only 2 available")
        for available, named in ((["2", "x"], "'x'"), (["-1"], "'-1'"), (["02"], "'02'"), ([""], "''")):
            with self.subTest(available=available):
                with self.assertRaises(grpc.RpcError) as caught:
                    prefer(available, [], 1)
                self.assertEqual(caught.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
                self.assertIn(named, caught.exception.details())
        with self.assertRaises(grpc.RpcError) as caught:
            prefer(["2"], ["3 "], 1)
        self.assertIn("must-include", caught.exception.details())

    def test_cpuid_devices_and_env_name(self):
        self.kubelet.start()
        self.start_plugin("--cpuid-devices", "always", "--env-name", "EXCLUSIVE_CPUS")
        self.kubelet.wait_list(lambda devices: devices)
        container = self.kubelet.allocate("6", "2").container_responses[0]
        self.assertEqual(dict(container.envs), {"EXCLUSIVE_CPUS": "2,6"})
        self.assertEqual([(d.container_path, d.host_path, d.permissions) for d in container.devices],
                         [("/dev/cpu/2/cpuid", "/dev/cpu/2/cpuid", "r"), ("/dev/cpu/6/cpuid", "/dev/cpu/6/cpuid", "r")])

    def test_cpuid_auto_follows_the_device_nodes(self):
        self.kubelet.start()
        self.start_plugin()
        self.kubelet.wait_list(lambda devices: devices)
        container = self.kubelet.allocate("2").container_responses[0]
        present = os.path.exists("/dev/cpu/2/cpuid")
        self.assertEqual([d.host_path for d in container.devices], ["/dev/cpu/2/cpuid"] if present else [])

    def test_numa_unknown_leaves_topology_out(self):
        shutil.rmtree(os.path.join(self.sysfs, "devices/system/node"))
        for cpu in range(8):
            for name in ("node0", "node2"):
                path = os.path.join(self.sysfs, "devices/system/cpu/cpu%d" % cpu, name)
                if os.path.isdir(path):
                    os.rmdir(path)
        self.kubelet.start()
        self.start_plugin()
        snap = self.kubelet.wait_list(lambda devices: devices)
        self.assertEqual(set(snap.devices.values()), {("Healthy", None)})

    def test_kubelet_late(self):
        process = self.start_plugin()
        process.wait_log("waiting for the kubelet")
        time.sleep(0.5)
        self.kubelet.start(wipe=False)
        self.kubelet.wait_registered(timeout=5)
        self.kubelet.wait_list(lambda devices: len(devices) == 4)

    def test_device_plugin_dir_created_late(self):
        os.rmdir(self.dir)
        process = self.start_plugin()
        process.wait_log("does not exist")
        self.kubelet.start()
        self.kubelet.wait_registered(timeout=5)
        self.assertEqual(process.proc.poll(), None)

    def test_kubelet_restarts(self):
        self.kubelet.start()
        process = self.start_plugin()
        self.kubelet.wait_registered()
        for restart in range(2, 5):
            started = time.monotonic()
            self.kubelet.restart()
            self.kubelet.wait_registered(restart, timeout=5)
            self.assertLess(time.monotonic() - started, 2.5)
            self.kubelet.wait_list(lambda devices: len(devices) == 4, since=started)
            self.assertEqual(dict(self.kubelet.allocate("3").container_responses[0].envs), {"ISOLCPUS": "3"})
        process.wait_log("kubelet restarted")

    def test_hotplug_and_isolated_set_changes_reach_list_and_watch(self):
        self.kubelet.start()
        self.start_plugin()
        self.kubelet.wait_list(lambda devices: len(devices) == 4)
        changed = time.monotonic()
        self.set_host("online", "0-5,7\n")
        snap = self.kubelet.wait_list(lambda devices: devices.get("6", ("",))[0] == "Unhealthy", timeout=3)
        self.assertLess(snap.at - changed, 1.0)
        self.set_host("online", "0-7\n")
        self.kubelet.wait_list(lambda devices: devices.get("6", ("",))[0] == "Healthy", timeout=3)
        self.set_host("isolated", "2-3\n")
        self.kubelet.wait_list(lambda devices: sorted(devices) == ["2", "3"], timeout=3)
        count = len(self.kubelet.lists)
        time.sleep(1.0)
        self.assertEqual(len(self.kubelet.lists), count, "a list was sent although nothing changed")

    def test_hotplug_within_a_second_at_the_default_interval(self):
        self.kubelet.start()
        process = self.start_plugin("--rescan-interval", "0.5")
        self.kubelet.wait_list(lambda devices: len(devices) == 4)
        for online, health in (("0-6\n", "Unhealthy"), ("0-7\n", "Healthy")) * 2:
            changed = time.monotonic()
            self.set_host("online", online)
            snap = self.kubelet.wait_list(lambda devices: devices["7"][0] == health, timeout=3, since=changed)
            self.assertLess(snap.at - changed, 1.0, health)
        process.wait_log("now unhealthy (offline) 7")
        process.wait_log("healthy again 7")

    def test_yanked_allocations_are_logged(self):
        checkpoint = {"Data": {"PodDeviceEntries": [
            {"PodUID": "pod-1", "ContainerName": "app", "ResourceName": "windriver.com/isolcpus",
             "DeviceIDs": {"2": ["6", "2"]}, "AllocResp": ""},
            {"PodUID": "pod-2", "ContainerName": "gpu", "ResourceName": "example.com/gpu",
             "DeviceIDs": {"0": ["3"]}, "AllocResp": ""}],
            "RegisteredDevices": {"windriver.com/isolcpus": ["2", "3", "6", "7"]}}, "Checksum": 1}
        write_files(self.dir, {"kubelet_internal_checkpoint": json.dumps(checkpoint)})
        self.kubelet.start()
        process = self.start_plugin()
        self.kubelet.wait_list(lambda devices: len(devices) == 4)
        self.set_host("online", "0-2,4-5,7\n")                    # 3 and 6 go offline
        process.wait_log("CPUs 6 are offline or no longer isolated but allocated (6 to 'pod-1/app'; "
                         "named by the kubelet's checkpoint)")
        self.assertNotIn("CPUs 3 ", process.log())

    def test_yanked_allocations_without_checkpoint(self):
        self.kubelet.start()
        process = self.start_plugin()
        self.kubelet.wait_list(lambda devices: len(devices) == 4)
        self.kubelet.allocate("7")
        self.set_host("isolated", "2-3,6\n")                     # 7 leaves the set: removed
        self.kubelet.wait_list(lambda devices: sorted(devices) == ["2", "3", "6"], timeout=3)
        process.wait_log("CPUs 7 are offline or no longer isolated but allocated (7 to an unknown container; ")

    def thread_affinities(self, pid):
        return {line.split()[1] for status in task_files(pid, "status").values()
                for line in status.splitlines() if line.startswith("Cpus_allowed_list")}

    def test_self_affinity_keeps_every_thread_off_served_cpus(self):
        if not {0, 1} <= os.sched_getaffinity(0):
            self.skipTest("needs CPUs 0 and 1 to be allowed here")
        self.set_host("isolated", "1\n")                         # fake host: housekeeping 0,2-7
        self.kubelet.start()
        process = self.start_plugin()
        self.kubelet.wait_list(lambda devices: list(devices) == ["1"])
        process.wait_log("self-affinity: plugin threads on housekeeping CPUs 0")
        self.assertEqual(self.thread_affinities(process.proc.pid), {"0"})
        self.assertGreaterEqual(len(os.listdir("/proc/%d/task" % process.proc.pid)), 3)   # grpc's too
        self.assertEqual(dict(self.kubelet.allocate("1").container_responses[0].envs), {"ISOLCPUS": "1"})
        self.set_host("isolated", "0\n")                         # the set moves: so does the plugin
        process.wait_log("self-affinity: plugin threads on housekeeping CPUs 1")
        self.assertEqual(self.thread_affinities(process.proc.pid), {"1"})

    def test_self_affinity_follows_housekeeping_cpus_going_offline_and_online(self):
        if not {0, 1} <= os.sched_getaffinity(0):
            self.skipTest("needs CPUs 0 and 1 to be allowed here")
        self.kubelet.start()
        process = self.start_plugin()                            # serves 2-3,6-7: housekeeping 0-1,4-5
        process.wait_log("self-affinity: plugin threads on housekeeping CPUs 0-1")
        self.set_host("online", "0,2-7\n")                      # no served CPU changes
        process.wait_log("self-affinity: plugin threads on housekeeping CPUs 0\n", timeout=3)
        self.assertEqual(self.thread_affinities(process.proc.pid), {"0"})
        self.set_host("online", "0-7\n")
        process.wait_log("self-affinity: plugin threads on housekeeping CPUs 0-1", count=2, timeout=3)

    def test_self_affinity_off(self):
        self.set_host("isolated", "1\n")
        self.kubelet.start()
        process = self.start_plugin("--self-affinity", "off")
        self.kubelet.wait_list(lambda devices: list(devices) == ["1"])
        self.assertEqual(self.thread_affinities(process.proc.pid), self.thread_affinities(os.getpid()))
        self.assertNotIn("self-affinity", process.log())

    def test_sighup_rereads_the_kernel_command_line(self):
        write_files(os.path.dirname(self.sysfs), {"proc/cmdline": "ro isolcpus=2-3\n"})
        self.kubelet.start()
        process = self.start_plugin("--source", "cmdline", "--rescan-interval", "600")
        self.kubelet.wait_list(lambda devices: sorted(devices) == ["2", "3"])
        write_files(os.path.dirname(self.sysfs), {"proc/cmdline": "ro isolcpus=domain,2-3,6\n"})
        time.sleep(0.3)
        self.assertEqual(len(self.kubelet.lists), 1, "rescanned without being asked")
        sent = time.monotonic()
        process.proc.send_signal(signal.SIGHUP)
        snap = self.kubelet.wait_list(lambda devices: sorted(devices) == ["2", "3", "6"], timeout=3)
        self.assertLess(snap.at - sent, 1.0)
        process.wait_log("SIGHUP")
        self.assertIsNone(process.proc.poll())

    def test_a_sighup_storm_is_one_line_and_the_last_signal_is_honoured(self):
        host = os.path.dirname(self.sysfs)
        write_files(host, {"proc/cmdline": "ro isolcpus=2-3\n"})
        self.kubelet.start()
        process = self.start_plugin("--source", "cmdline", "--rescan-interval", "600", "--log-level", "info")
        self.kubelet.wait_list(lambda devices: sorted(devices) == ["2", "3"])
        for i in range(300):
            if i == 299:                                # read by no rescan the storm started before
                write_files(host, {"proc/cmdline": "ro isolcpus=2-3,6\n"})
            process.proc.send_signal(signal.SIGHUP)
        self.kubelet.wait_list(lambda devices: sorted(devices) == ["2", "3", "6"], timeout=3)
        time.sleep(1.5)
        lines = [line for line in process.log().splitlines() if "SIGHUP" in line]
        self.assertEqual(len(lines), 1, lines)
        write_files(host, {"proc/cmdline": "ro isolcpus=2-3,6-7\n"})
        process.proc.send_signal(signal.SIGHUP)          # a burst of its own
        self.kubelet.wait_list(lambda devices: sorted(devices) == ["2", "3", "6", "7"], timeout=3)
        self.assertEqual(process.log().count("SIGHUP"), 2)

    def test_kernel_cpu_uevent_triggers_a_rescan(self):
        try:
            sender = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 15)
        except OSError as e:
            self.skipTest("no netlink here: %s" % e)
        self.addCleanup(sender.close)
        self.kubelet.start()
        process = PluginProcess(self.tmp, ["--sysfs", "/sys", "--cpus", "0", "--device-plugin-path", self.dir,
                                           "--rescan-interval", "600", "--log-level", "debug",
                                           "--self-affinity", "off"])
        self.addCleanup(process.stop, signal.SIGKILL)
        self.kubelet.wait_registered()
        if "kernel uevents unavailable" in process.log():
            self.skipTest("the plugin could not open the uevent socket here")
        message = b"offline@/devices/system/cpu/cpu0\0ACTION=offline\0DEVPATH=/devices/system/cpu/cpu0\0SUBSYSTEM=cpu\0"
        try:
            sender.sendto(message, (0, 1))                       # to the kernel uevent group, as root may
        except PermissionError as e:
            self.skipTest("cannot send to the uevent group: %s" % e)
        process.wait_log("kernel uevent 'offline@/devices/system/cpu/cpu0': rescanning", timeout=3)

    def test_sigterm_stops_within_a_second_and_removes_the_socket(self):
        self.kubelet.start()
        process = self.start_plugin()
        self.kubelet.wait_list(lambda devices: devices)
        self.assertTrue(os.path.exists(self.plugin_socket))
        started = time.monotonic()
        self.assertEqual(process.stop(signal.SIGTERM), 0)
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertFalse(os.path.exists(self.plugin_socket))
        self.assertNotIn("Traceback", process.log())

    def probe(self):
        return subprocess.run([sys.executable, PLUGIN, "--probe", "--device-plugin-path", self.dir], env=plugin_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=30)

    def test_probe(self):
        result = self.probe()
        self.assertEqual((result.returncode, len(result.stderr.splitlines())), (1, 1), result.stderr)
        self.assertIn("does not exist", result.stderr)
        self.kubelet.start()
        process = self.start_plugin()
        self.kubelet.wait_registered()
        result = self.probe()
        self.assertEqual(result.returncode, 0, result.stderr)
        process.proc.send_signal(signal.SIGSTOP)                 # alive but not answering
        try:
            started = time.monotonic()
            result = self.probe()
            self.assertLess(time.monotonic() - started, 5)
        finally:
            process.proc.send_signal(signal.SIGCONT)
        self.assertEqual((result.returncode, len(result.stderr.splitlines())), (1, 1), result.stderr)
        self.assertIn("did not answer GetDevicePluginOptions within 2 s (DEADLINE_EXCEEDED)", result.stderr)
        self.assertEqual(self.probe().returncode, 0)

    def test_metrics_and_healthz(self):
        self.kubelet.start()
        process = self.start_plugin("--metrics-address", "127.0.0.1:0")
        self.kubelet.wait_list(lambda devices: len(devices) == 4)
        # the kubelet lists before it answers Register; the plugin counts a registration on the answer
        process.wait_log("registered windriver.com/isolcpus")
        process.wait_log("metrics on http://127.0.0.1:")
        port = int(process.log().split("metrics on http://127.0.0.1:")[1].split("/")[0])

        def get(path):
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=5) as reply:
                    return reply.status, reply.headers["Content-Type"], reply.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.headers["Content-Type"], e.read().decode()

        def sample(text, name, labels=""):
            prefix = 'isolcpu_%s{resource="windriver.com/isolcpus"%s} ' % (name, labels)
            values = [line[len(prefix):] for line in text.splitlines() if line.startswith(prefix)]
            self.assertEqual(len(values), 1, "%s%s in:\n%s" % (name, labels, text))
            return int(values[0])

        status, kind, text = get("/metrics")
        self.assertEqual((status, kind.split(";")[0]), (200, "text/plain"))
        self.assertEqual(sample(text, "devices", ',health="Healthy"'), 4)
        self.assertEqual(sample(text, "registrations_total"), 1)
        self.assertEqual(sample(text, "registered"), 1)
        self.kubelet.allocate("2")
        self.kubelet.prefer(["2", "6"], [], 1)
        with self.assertRaises(grpc.RpcError):
            self.kubelet.allocate("99")
        self.set_host("online", "0-6\n")
        self.kubelet.wait_list(lambda devices: devices["7"][0] == "Unhealthy", timeout=3)
        self.kubelet.restart()
        self.kubelet.wait_registered(2)
        deadline = time.monotonic() + 5                  # the plugin counts once the kubelet answered
        while sample(get("/metrics")[2], "registrations_total") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        text = get("/metrics")[2]
        self.assertEqual((sample(text, "allocations_total"), sample(text, "allocation_errors_total"),
                          sample(text, "preferred_allocations_total")), (1, 1, 1))
        self.assertEqual((sample(text, "devices", ',health="Healthy"'),
                          sample(text, "devices", ',health="Unhealthy"')), (3, 1))
        self.assertEqual((sample(text, "registrations_total"), sample(text, "kubelet_restarts_total")), (2, 1))
        self.assertEqual(get("/healthz")[::2], (200, "serving\n"))
        self.assertEqual(get("/nothing")[0], 404)

    def test_metrics_address_errors(self):
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        for address, why in (("localhost", "HOST:PORT"), ("1.2.3.4:99999", "HOST:PORT"),
                             ("127.0.0.1:%d" % busy.getsockname()[1], "cannot listen")):
            with self.subTest(address=address):
                process = self.start_plugin("--metrics-address", address)
                self.assertEqual(process.proc.wait(30), 2)
                self.assertEqual(len(process.log().strip().splitlines()), 1, process.log())
                self.assertIn(why, process.log())

    def test_sigint_exits_zero(self):
        process = self.start_plugin()
        process.wait_log("serving " + self.plugin_socket)
        self.assertEqual(process.stop(signal.SIGINT), 0)

    def test_stale_socket_reclaimed_and_live_one_refused(self):
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(self.plugin_socket)
        stale.close()                                   # a socket file nobody listens on
        self.kubelet.start(wipe=False)
        first = self.start_plugin()
        self.kubelet.wait_registered()
        first.wait_log("removed stale socket")
        second = self.start_plugin()
        self.assertEqual(second.proc.wait(10), 2)
        self.assertIn("another running instance", second.log())
        self.assertEqual(len(second.log().strip().splitlines()), 1)
        self.assertEqual(dict(self.kubelet.allocate("2").container_responses[0].envs), {"ISOLCPUS": "2"})
        self.assertIsNone(first.proc.poll())


    def test_two_instances_started_at_once_leave_one_serving(self):
        self.kubelet.start()
        for round_ in range(3):
            with self.subTest(round=round_):
                registered = len(self.kubelet.registrations)
                pair = [self.start_plugin(), self.start_plugin()]
                deadline = time.monotonic() + 15
                while all(p.proc.poll() is None for p in pair) and time.monotonic() < deadline:
                    time.sleep(0.05)
                second = [p for p in pair if p.proc.poll() is not None]
                self.assertEqual(len(second), 1, "neither instance exited")
                first = [p for p in pair if p is not second[0]][0]
                self.assertEqual(second[0].proc.wait(), 2)
                self.assertEqual(len(second[0].log().strip().splitlines()), 1, second[0].log())
                self.assertIn("another running instance", second[0].log())
                first.wait_log("registered windriver.com/isolcpus")
                time.sleep(1.0)
                self.assertEqual(len(self.kubelet.registrations) - registered, 1)
                self.assertNotIn("kubelet restarted", first.log())
                self.assertEqual(dict(self.kubelet.allocate("2").container_responses[0].envs), {"ISOLCPUS": "2"})
                self.assertEqual(first.stop(), 0)

    def test_the_instance_lock_outlives_the_kubelet_wiping_the_directory(self):
        first = self.registered_plugin()
        self.kubelet.restart()                          # removes every socket in the directory
        self.kubelet.wait_registered(2)
        second = self.start_plugin()
        self.assertEqual(second.proc.wait(10), 2)
        self.assertIn("another running instance", second.log())
        self.assertIsNone(first.proc.poll())
        self.assertEqual(len(self.kubelet.registrations), 2)


class NotifySocket(object):
    """$NOTIFY_SOCKET as systemd serves it: a datagram socket; what the
    plugin sends, as (monotonic time, {field: value}) per datagram."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path if not path.startswith("@") else "\0" + path[1:])
        self.sock.settimeout(0.1)
        self.messages = []

    def receive(self, until, timeout=10.0):
        """Messages until one satisfies until(fields); AssertionError after `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            self.messages.append((time.monotonic(), fields))
            if until(fields):
                return fields
        raise AssertionError("no matching notification; got %r" % [m for _, m in self.messages])

    def collect(self, seconds):
        """Whatever comes within `seconds`."""
        try:
            self.receive(lambda fields: False, timeout=seconds)
        except AssertionError:
            pass

    def close(self):
        self.sock.close()


@needs_grpc
class SystemdNotifyTests(PluginRig):
    """sd_notify(3): readiness, reload, stop and the watchdog, over a real datagram socket."""

    def notify_socket(self, abstract=False):
        path = "@isolcpu-test-%d-%s" % (os.getpid(), self.id()[-20:]) if abstract else os.path.join(self.tmp, "notify")
        notify = NotifySocket(path)
        self.addCleanup(notify.close)
        return notify

    def test_ready_reload_stopping(self):
        notify = self.notify_socket()
        self.kubelet.start()
        process = self.start_plugin(env={"NOTIFY_SOCKET": notify.path})
        ready = notify.receive(lambda f: f.get("READY") == "1")
        self.assertIn("STATUS", ready)
        self.kubelet.wait_registered()
        notify.receive(lambda f: "registered" in f.get("STATUS", ""))
        process.proc.send_signal(signal.SIGHUP)
        reloading = notify.receive(lambda f: f.get("RELOADING") == "1")
        now_usec = time.monotonic() * 1e6                 # CLOCK_MONOTONIC, as systemd reads it
        self.assertLess(abs(int(reloading["MONOTONIC_USEC"]) - now_usec), 5e6)
        notify.receive(lambda f: f.get("READY") == "1")
        process.proc.send_signal(signal.SIGTERM)
        notify.receive(lambda f: f.get("STOPPING") == "1")
        self.assertEqual(process.stop(), 0)

    def test_ready_without_a_kubelet_or_its_directory_says_what_it_waits_for(self):
        notify = self.notify_socket(abstract=True)
        shutil.rmtree(self.dir)
        self.start_plugin(env={"NOTIFY_SOCKET": notify.path})
        ready = notify.receive(lambda f: f.get("READY") == "1", timeout=5)
        self.assertIn("device-plugin directory", ready["STATUS"])
        os.makedirs(self.dir)
        notify.receive(lambda f: "waiting for the kubelet" in f.get("STATUS", ""), timeout=5)

    def test_watchdog_pings_at_half_its_interval_while_the_loop_runs(self):
        notify = self.notify_socket()
        process = self.registered_plugin()
        process.stop()
        process = self.start_plugin(env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"})
        notify.receive(lambda f: f.get("READY") == "1")
        started = time.monotonic()
        notify.collect(2.6)
        pings = [at for at, f in notify.messages if f.get("WATCHDOG") == "1" and at >= started]
        self.assertGreaterEqual(len(pings), 4, notify.messages)
        self.assertLess(max(b - a for a, b in zip(pings, pings[1:])), 0.9)
        process.proc.send_signal(signal.SIGSTOP)          # a frozen loop sends nothing
        self.addCleanup(lambda: process.proc.poll() is None and process.proc.send_signal(signal.SIGCONT))
        notify.messages[:] = []
        time.sleep(1.5)
        try:
            notify.receive(lambda f: f.get("WATCHDOG") == "1", timeout=0.5)
            pinged = True
        except AssertionError:
            pinged = False
        self.assertFalse(pinged, "a stopped process pinged the watchdog")
        process.proc.send_signal(signal.SIGCONT)
        notify.receive(lambda f: f.get("WATCHDOG") == "1", timeout=2)

    def test_a_tiny_watchdog_interval_pings_at_most_every_50_ms(self):
        # WATCHDOG_USEC=1 pinged in a busy loop (2.9 s of CPU in 3 s):
        # counted, the pings of 2 s (at most 40 at the floor of 50 ms)
        notify = self.notify_socket()
        self.start_plugin(env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1"})
        notify.receive(lambda f: f.get("READY") == "1")
        notify.messages[:] = []
        notify.collect(2.0)
        pings = sum(1 for _, f in notify.messages if f.get("WATCHDOG") == "1")
        self.assertGreater(pings, 0)
        self.assertLessEqual(pings, 2.0 / 0.05 + 5)

    def test_a_notification_refused_while_the_socket_is_full_goes_with_the_next(self):
        # systemd's queue full (EAGAIN): READY=1 was dropped for good, and
        # so the unit would never start; now it waits for the next send
        # (the next ping), and pings keep going through
        notify = self.notify_socket()
        notifier = plugin.SystemdNotifier({"NOTIFY_SOCKET": notify.path})
        self.addCleanup(notifier.close)
        fillers = []
        while True:                      # fill the receiver's queue, whoever the sender
            filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            filler.setblocking(False)
            fillers.append(filler)
            self.addCleanup(filler.close)
            try:
                while True:
                    filler.sendto(b"FILL=1\n", notify.path)
            except BlockingIOError:
                pass
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
                probe.setblocking(False)
                try:
                    probe.sendto(b"FILL=1\n", notify.path)
                except BlockingIOError:
                    break                # full for a new sender too, not just this one
        notifier.send(READY=1, STATUS="serving")
        notifier.send(WATCHDOG=1)        # refused too; a later ping supersedes it
        notify.collect(0.3)              # drain
        notify.messages[:] = [(at, f) for at, f in notify.messages if "FILL" not in f]
        self.assertEqual(notify.messages, [])
        for _ in range(3):
            notifier.send(WATCHDOG=1)
        notify.collect(0.3)
        self.assertEqual([f for _, f in notify.messages],
                         [{"READY": "1", "STATUS": "serving"}] + [{"WATCHDOG": "1"}] * 3)

    def test_a_notification_refused_for_good_does_not_hold_back_the_next(self):
        # too long for a datagram (EMSGSIZE): dropped, as sd_notify drops it,
        # not kept in front of every later ping
        notify = self.notify_socket()
        notifier = plugin.SystemdNotifier({"NOTIFY_SOCKET": notify.path})
        self.addCleanup(notifier.close)
        notifier.send(STATUS="x" * (1 << 20))
        notifier.send(WATCHDOG=1)
        notifier.send(STATUS="serving")
        notify.collect(0.3)
        self.assertEqual([f for _, f in notify.messages], [{"WATCHDOG": "1"}, {"STATUS": "serving"}])

    def test_a_watchdog_shorter_than_the_rescan_period_is_said_at_start(self):
        notify = self.notify_socket()
        process = self.start_plugin("--rescan-interval", "60", env={"NOTIFY_SOCKET": notify.path,
                                                                     "WATCHDOG_USEC": "30000000"})
        process.wait_log("WatchdogSec")
        line = [l for l in process.log().splitlines() if "WatchdogSec" in l][0]
        self.assertIn(" WARNING ", line)
        self.assertIn("182", line)                       # 3 periods of 60 s + 2 s

    def test_nothing_is_sent_without_notify_socket_and_another_pid_watchdog_is_ignored(self):
        notify = self.notify_socket()
        self.kubelet.start()
        process = self.start_plugin(env={"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
        self.kubelet.wait_registered()
        time.sleep(0.5)
        self.assertEqual(notify.messages, [])
        self.assertNotIn("WATCHDOG", process.log())


class FuzzTests(TempDirTest):
    """Hostile input, 100k cases per kind, fixed seeds: a clear error or a
    documented degrade, never another exception, never unbounded text."""

    PIECES = ["0", "1", "7", "15", "63", "64", "127", "128", "4294967295", "4294967296", "99999999999999999999",
              "-", "-", ":", "/", ",", ",", " ", "\t", "\n", "N", "all", "ALL", "n", "x", "\x00", "\u0663",
              "\u2013", "\u00e9", "0-4294967295", "1-3", "0-15:2/4", "0-15:0/0", ",,,", "  ", "-1", "+1", "0x10"]

    def random_text(self, rng, pieces, most=12):
        return "".join(rng.choice(pieces) for _ in range(rng.randint(0, most)))

    def check_error(self, error, context):
        text = str(error)
        self.assertLess(len(text), 300, context)
        self.assertNotIn("\n", text, context)

    def test_cpu_lists(self):
        rng = random.Random(2026)
        valid = 0
        started = time.monotonic()
        for _ in range(100000):
            text = self.random_text(rng, self.PIECES)
            try:
                cpus = parse_cpu_list(text, 63, 127)
            except InputError as e:
                self.check_error(e, repr(text))
                continue
            valid += 1
            self.assertTrue(all(0 <= c <= 127 for c in cpus), repr(text))
            self.assertEqual(parse_cpu_list(format_cpu_list(cpus), 63, 127), cpus, repr(text))
        self.assertGreater(valid, 5000)                       # the generator also makes good lists
        self.assertLess(time.monotonic() - started, 60)

    def test_kernel_command_lines(self):
        rng = random.Random(1971)
        words = ["isolcpus=", "nohz_full=", "isolcpus=domain,", "isolcpus=nohz,", "isolcpus=managed_irq,",
                 "isolcpus=bogus,", "isolcpus=d0main,", "isolcpus", '"', "=", "--", " ", " ", " ", "quiet",
                 "root=/dev/sda1", "\x00", "\u00e9", "BOOT_IMAGE=/vmlinuz"]
        applied = 0
        for _ in range(100000):
            line = "".join(rng.choice(words if rng.random() < 0.6 else self.PIECES) for _ in range(rng.randint(0, 10)))
            for param, domain_only in (("isolcpus", False), ("isolcpus", True), ("nohz_full", False)):
                text, problems = plugin.cmdline_cpu_list(line, param, domain_only)
                for problem in problems:
                    self.check_error(problem, repr(line))
                if text is None:
                    continue
                try:
                    parse_cpu_list(text, 63, 127)
                    applied += 1
                except InputError as e:
                    self.check_error(e, repr(line))
        self.assertGreater(applied, 1000)

    def test_masks_checkpoints_and_device_ids(self):
        rng = random.Random(7)
        hexes = ["0", "1", "f", "F", "ffffffff", "00000000", "80000000", ",", "g", " ", "\x00", "123456789", "0x"]
        for _ in range(20000):
            text = self.random_text(rng, hexes, 8)
            try:
                cpus = plugin.parse_cpu_mask(text, 127)
                self.assertTrue(all(0 <= c <= 127 for c in cpus))
            except InputError as e:
                self.check_error(e, repr(text))
        docs = ["", "{}", "[]", "null", '{"Data": null}', '{"Data": {"PodDeviceEntries": null}}',
                '{"Data": {"PodDeviceEntries": [{"ResourceName": "windriver.com/isolcpus", "DeviceIDs": 5}]}}',
                '{"Data": {"PodDeviceEntries": [{"ResourceName": "windriver.com/isolcpus", "DeviceIDs": {"0": null}}]}}',
                '{"Data": {"PodDeviceEntries": [{"ResourceName": "windriver.com/isolcpus", "DeviceIDs": ["1", 2, "x"]}]}}',
                '{"Data": {"PodDeviceEntries": ["x"]}}', "\xff\xfe", '{"Data": {"PodDeviceEntries": [{}]}}']
        for doc in docs:
            try:
                holders = plugin.checkpoint_holders(doc, "windriver.com/isolcpus")
                self.assertTrue(all(isinstance(cpu, int) for cpu in holders), doc)
            except ValueError as e:
                self.check_error(e, doc)
        devices = {str(c): plugin.Device(c, True, plugin.unknown_cpu_info(c)) for c in range(8)}
        alphabet = ["0", "3", "7", "8", "-1", "", " 1", "01", "x" * 500, "\u0663", "\x00", "1" * 30]
        for _ in range(20000):
            ids = [rng.choice(alphabet) for _ in range(rng.randint(0, 6))]
            for call in (lambda: plugin.devices_for_ids(ids, devices),
                         lambda: plugin.cpus_of_device_ids(ids, "available")):
                try:
                    call()
                except plugin.RequestError as e:
                    self.check_error(e, repr(ids))

    def test_garbage_sysfs_files(self):
        files = ["isolated", "online", "present", "possible", "kernel_max", "cpu2/online",
                 "cpu2/topology/core_id", "cpu2/topology/physical_package_id", "cpu2/topology/core_cpus_list",
                 "cpu2/topology/thread_siblings_list", "cpu2/topology/thread_siblings", "../node/node0/cpulist",
                 "cpu2/cache/index3/shared_cpu_list", "cpu3/cache/index3/shared_cpu_map", "cpu2/cache/index3/level",
                 "cpu2/cache/index2/type", "cpu6/cache", "cpu2/cpu_capacity", "../../cpu_core/cpus"]
        contents = ["", "\n", "garbage", "\x00\x01\x02", "\xff\xfe\x00binary", "1-99999999999", "-1",
                    "0-4294967295", "\u0663", "7" * 100000, "1," * 600000, "<dir>", "<missing>"]
        degrade = ("/topology/", "/node0/", "kernel_max", "possible",      # refine only: never fail
                   "/cache", "cpu_capacity", "cpu_core")
        for name in files:
            for content in contents:
                with self.subTest(file=name, content=content[:12]):
                    root = os.path.join(self.tmp, "h")
                    shutil.rmtree(root, True)
                    sysfs, procfs = fake_host(root, isolated="2-3,6-7", node_ids=[0], extra=dict(fake_caches(), **{
                        "sys/devices/system/cpu/cpu%d/cpu_capacity" % cpu: "%d\n" % (1024 - cpu % 4 // 2 * 512)
                        for cpu in range(8)}, **{"sys/devices/cpu_core/cpus": "0-1,4-5\n"}))
                    path = os.path.normpath(os.path.join(sysfs, "devices/system/cpu", name))
                    if os.path.isdir(path):
                        shutil.rmtree(path)
                    else:
                        os.unlink(path)
                    if content == "<dir>":
                        os.makedirs(path)
                    elif content != "<missing>":
                        with open(path, "wb") as f:
                            f.write(content.encode("utf-8", "surrogateescape"))
                    code, out, err = run_main(["--sysfs", sysfs, "--procfs", procfs, "--list", "--json"])
                    self.assertIn(code, (0, 2), err)
                    self.assertNotIn("Traceback", err)
                    if code == 2:
                        self.assertFalse(any(part in "/" + name for part in degrade), err)
                        self.assertEqual(len(err.strip().splitlines()), 1, err)
                        self.assertLess(len(err), 400)
                        self.assertIn(os.path.basename(name), err)
                    else:
                        self.assertEqual(json.loads(out)["resource_name"], "windriver.com/isolcpus")


class RobustnessUnitTests(unittest.TestCase):
    """The pure pieces behind the hardening: bounds, conditions, health."""

    def test_a_deeply_nested_checkpoint_is_not_a_checkpoint(self):
        deep = '{"Data": {"PodDeviceEntries": ' + "[" * 100000 + "]" * 100000 + "}}"
        with self.assertRaises(ValueError) as caught:
            plugin.checkpoint_holders(deep, "windriver.com/isolcpus")
        self.assertLess(len(str(caught.exception)), 200)
        deep_dict = '{"Data": {"PodDeviceEntries": [{"ResourceName": "windriver.com/isolcpus", "DeviceIDs": ' \
                    + '{"a": ' * 50000 + "1" + "}" * 50000 + "}]}}"
        with self.assertRaises(ValueError):
            plugin.checkpoint_holders(deep_dict, "windriver.com/isolcpus")

    def test_device_ids_that_are_not_lists_of_strings_are_not_a_checkpoint(self):
        # "67" read a character at a time was CPUs 6 and 7: a cpuset widened by a malformed file
        for ids in ("67", {"0": "67"}, {"0": ["6"], "1": "7"}, [6, 7], [["6"]], {"0": {"6": 1}}):
            text = json.dumps({"Data": {"PodDeviceEntries": [
                {"PodUID": "u1", "ContainerName": "app", "ResourceName": "windriver.com/isolcpus", "DeviceIDs": ids}]}})
            with self.subTest(ids=ids):
                with self.assertRaises(ValueError) as caught:
                    plugin.checkpoint_grants(text, "windriver.com/isolcpus")
                self.assertIn("not a device-manager checkpoint", str(caught.exception))
        for ids in (None, [], {}, {"0": None}, {"0": []}):     # no devices: what the kubelet writes for none
            text = json.dumps({"Data": {"PodDeviceEntries": [
                {"PodUID": "u1", "ContainerName": "app", "ResourceName": "windriver.com/isolcpus", "DeviceIDs": ids}]}})
            self.assertEqual(plugin.checkpoint_grants(text, "windriver.com/isolcpus"), {("u1", "app"): set()}, ids)

    def test_a_condition_whose_text_alternates_is_logged_once_per_text(self):
        # a runtime in a crash loop ends connections for one of a few reasons in turn
        conditions = plugin.Conditions()
        with self.assertLogs(plugin.log, "DEBUG") as logs:
            for _ in range(50):
                for why in ("closed", "reset by peer", "broken pipe"):
                    conditions.report("nri", "NRI: the connection ended (%s)" % why)
            conditions.clear("nri")
            conditions.report("nri", "NRI: the connection ended (closed)")   # a new episode: said again
        above_debug = [line for line in logs.output if not line.startswith("DEBUG")]
        self.assertEqual(above_debug[:3], ["WARNING:isolcpu-plugin:NRI: the connection ended (%s)" % why
                                           for why in ("closed", "reset by peer", "broken pipe")])
        self.assertRegex(above_debug[3], r"^INFO:isolcpu-plugin:resolved after 150 times over [0-9.]+ s: ")
        self.assertEqual(above_debug[4], "WARNING:isolcpu-plugin:NRI: the connection ended (closed)")
        self.assertEqual(len(above_debug), 5)

    def test_holders_are_named_whole(self):
        uid = "3f1c2a9e-7b4d-4e8f-9a6b-1c2d3e4f5a6b"
        holders = {6: (plugin.Holder(None, None, "packet-processor-main-container", uid, "checkpoint"),),
                   3: (plugin.Holder("default", "pod-2", "app", None, "pod-resources"),)}
        text = plugin.holdings_text(holders)
        self.assertEqual(text, "3 to 'default/pod-2/app', 6 to '%s/packet-processor-main-container'" % uid)
        many = plugin.holdings_text({i: (plugin.Holder("n", "pod-%d" % i, "app", None, "pod-resources"),)
                                     for i in range(100)})
        self.assertIn("(+90 more)", many)
        self.assertLess(len(many), 1200)
        evil = plugin.holdings_text({1: (plugin.Holder("n", "evil\npod", "app", None, "pod-resources"),)})
        self.assertNotIn("\n", evil)
        self.assertEqual(plugin.holdings_text({4: (), 5: ()}), "4-5 to an unknown container")

    def test_request_bounds(self):
        bounds = plugin.check_request_bounds
        bounds([["2"]] * plugin.MAX_CONTAINER_REQUESTS)
        bounds([["1"] * plugin.MAX_REQUEST_IDS])
        with self.assertRaises(plugin.RequestError) as caught:
            bounds([["2"]] * (plugin.MAX_CONTAINER_REQUESTS + 1))
        self.assertIn("%d container requests" % (plugin.MAX_CONTAINER_REQUESTS + 1), str(caught.exception))
        with self.assertRaises(plugin.RequestError) as caught:
            bounds([["1"] * plugin.MAX_REQUEST_IDS, ["2"]])
        self.assertIn("device IDs", str(caught.exception))

    def test_conditions_are_logged_when_they_start_change_and_end(self):
        conditions = plugin.Conditions()
        with self.assertLogs(plugin.log, "DEBUG") as logs:
            for _ in range(5):
                conditions.report("rescan", "rescan failed: a")
            conditions.report("rescan", "rescan failed: b")
            conditions.report("rescan", "rescan failed: b")
            conditions.clear("rescan")
            conditions.clear("rescan")                    # not active: nothing
            conditions.report("kubelet", "waiting for the kubelet", level=logging.INFO)
            conditions.clear("kubelet")                   # an info ends at debug
        above_debug = [line for line in logs.output if not line.startswith("DEBUG")]
        self.assertEqual(above_debug[:2], ["WARNING:isolcpu-plugin:rescan failed: a",
                                           "WARNING:isolcpu-plugin:rescan failed: b"])
        self.assertRegex(above_debug[2], r"^INFO:isolcpu-plugin:resolved after 7 times over [0-9.]+ s: rescan failed: b$")
        self.assertEqual(above_debug[3], "INFO:isolcpu-plugin:waiting for the kubelet")
        self.assertEqual(len(above_debug), 4)

    def test_health_follows_the_event_loop_heartbeat(self):
        health = plugin.health_status
        self.assertEqual(health(serving=True, heartbeat_age=0.1, max_age=5), (True, "serving"))
        ok, text = health(serving=True, heartbeat_age=12.5, max_age=5)
        self.assertFalse(ok)
        self.assertIn("12.5 s", text)
        self.assertEqual(health(serving=False, heartbeat_age=0.1, max_age=5), (False, "not serving"))


def canonical_cpu_list(cpus):
    """The kernel's canonical cpu-list ("4-6,13"), written here independently
    of the plugin, to check what the plugin prints."""
    runs = []
    for cpu in sorted(set(cpus)):
        if runs and runs[-1][-1] == cpu - 1:
            runs[-1].append(cpu)
        else:
            runs.append([cpu])
    return ",".join(str(run[0]) if len(run) == 1 else "%d-%d" % (run[0], run[-1]) for run in runs)


def expand_cpu_list(text):
    """The CPUs of a canonical cpu-list, read independently of the plugin."""
    cpus = []
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def open_fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def thread_names(pid):
    """Counter of the process's thread names (/proc/PID/task/*/comm)."""
    return collections.Counter(name.strip() for name in task_files(pid, "comm").values())


def threads_grown(early, late, python_name):
    """The kinds of thread that leaked: Counters of thread names sampled
    `early` and `late`, compared by their floor (the fewest of a kind seen),
    as a leaked thread never goes away.

    Threads Python starts carry the process's name (`python_name`): those may
    not grow at all. Threads grpc's core starts name themselves, and its pools
    start lazily and are elastic (Python 3.6's grpcio 1.48 started a timer
    manager and two iomgr event-engine threads after some 20 restarts; 1.51's
    event engine went 2 -> 5 under load): each of those kinds may grow by two.
    """
    def floor(samples):
        return {name: min(sample[name] for sample in samples) for name in set().union(*samples)}
    before, after = floor(early), floor(late)
    return {name: count - before.get(name, 0) for name, count in after.items()
            if count > before.get(name, 0) + (0 if name == python_name else 2)}


@needs_grpc
class FaultTests(PluginRig):
    """Breaking the plugin on purpose: kubelet churn, load, faults, bad requests."""

    def test_hundred_kubelet_restarts_without_leaks(self):
        self.kubelet.start()
        process = self.start_plugin("--log-level", "info")
        self.kubelet.wait_list(lambda devices: len(devices) == 4)
        # the kubelet lists before it answers Register: a restart in between is
        # a failed registration to the plugin, not a kubelet restart
        process.wait_log("registered windriver.com/isolcpus")
        pid = process.proc.pid
        threads = []
        for restart in range(1, 101):
            started = time.monotonic()
            self.kubelet.restart()
            self.kubelet.wait_registered(restart + 1, timeout=10)
            self.kubelet.wait_list(lambda devices: len(devices) == 4, since=started, timeout=10)
            # and the plugin has the kubelet's answer: else two restarts are one to it
            process.wait_log("registered windriver.com/isolcpus", count=restart + 1)
            threads.append(thread_names(pid))
            if restart == 10:                      # grpc's pools have settled by now
                fds_before = open_fds(pid)
        self.assertEqual(dict(self.kubelet.allocate("2").container_responses[0].envs), {"ISOLCPUS": "2"})
        fds = open_fds(pid)
        self.assertLessEqual(fds, fds_before + 2, "open fds grew over 90 restarts: %d -> %d" % (fds_before, fds))
        with open("/proc/%d/comm" % pid) as f:
            python_name = f.read().strip()
        grown = threads_grown(threads[5:10], threads[-45:], python_name)
        self.assertEqual(grown, {}, "threads grew over the restarts: %s" % [dict(t) for t in threads[5::10]])
        self.assertEqual(process.log().count("kubelet restarted"), 100)
        self.assertNotIn("Traceback", process.log())

    def test_concurrent_allocations(self):
        self.set_host("isolated", "0-7\n")
        self.kubelet.start()
        self.start_plugin("--log-level", "warning")
        self.kubelet.wait_list(lambda devices: len(devices) == 8)
        errors, answered = [], []

        def client(seed):
            rng = random.Random(seed)
            channel = grpc.insecure_channel("unix:" + self.plugin_socket)
            stub = pb_grpc.DevicePluginStub(channel)
            try:
                for _ in range(500):
                    cpus = rng.sample(range(8), rng.randint(1, 8))
                    request = pb.AllocateRequest(container_requests=[
                        pb.ContainerAllocateRequest(devices_ids=[str(c) for c in cpus])])
                    envs = stub.Allocate(request, timeout=10).container_responses[0].envs
                    if envs["ISOLCPUS"] != canonical_cpu_list(cpus):
                        errors.append((cpus, dict(envs)))
                    answered.append(1)
            except grpc.RpcError as e:
                errors.append(e)
            finally:
                channel.close()

        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        self.assertEqual(errors, [])
        self.assertEqual(len(answered), 4000)

    def test_kubelet_closes_list_and_watch(self):
        self.kubelet.start()
        process = self.start_plugin()
        self.kubelet.wait_list(lambda devices: len(devices) == 4)
        closed = time.monotonic()
        self.kubelet.close_stream()
        self.kubelet.wait_registered(2, timeout=5)
        self.kubelet.wait_list(lambda devices: len(devices) == 4, since=closed, timeout=5)
        process.wait_log("kubelet closed ListAndWatch; registering again")
        time.sleep(2.5)                                    # and it settles: no re-register loop
        self.assertEqual(len(self.kubelet.registrations), 2)

    def test_kubelet_drops_list_and_watch_before_answering_register(self):
        self.kubelet.drop_stream_before_answering = True
        self.kubelet.start()
        process = self.start_plugin()
        self.kubelet.wait_registered(2, timeout=5)
        process.wait_log("kubelet closed ListAndWatch; registering again")
        self.kubelet.wait_list(lambda devices: len(devices) == 4)
        time.sleep(1.5)
        self.assertEqual((len(self.kubelet.registrations), self.kubelet.stream_ends), (2, 1))

    def test_kubelet_socket_present_but_not_answering(self):
        mute = socket.socket(socket.AF_UNIX)
        mute.bind(self.kubelet.socket)
        mute.listen(16)                                    # accepts connections, never speaks
        self.addCleanup(mute.close)
        process = self.start_plugin()
        process.wait_log("registering with the kubelet failed (DEADLINE_EXCEEDED", timeout=20)
        self.assertIsNone(process.proc.poll())
        mute.close()
        fixed = time.monotonic()
        self.kubelet.start()                               # a working kubelet replaces it
        self.kubelet.wait_registered(timeout=5)
        self.assertLess(time.monotonic() - fixed, 3)
        # once per kind of failure, not per retry: a retry between closing the
        # mute socket and the kubelet starting finds nobody listening (UNAVAILABLE)
        warnings = [line.split(" ", 1)[1] for line in process.log().splitlines()
                    if "WARNING registering with the kubelet failed" in line]
        self.assertIn("DEADLINE_EXCEEDED", warnings[0])
        self.assertEqual(len(warnings), len(set(warnings)), warnings)
        self.assertLessEqual(len(warnings), 2, warnings)

    def test_device_plugin_dir_read_only_then_fixed(self):
        try:
            subprocess.run(["mount", "--bind", self.dir, self.dir], check=True, stderr=subprocess.DEVNULL)
        except (OSError, subprocess.CalledProcessError):
            self.skipTest("cannot bind-mount here")
        self.addCleanup(subprocess.run, ["umount", "-l", self.dir], stderr=subprocess.DEVNULL)
        subprocess.run(["mount", "-o", "remount,bind,ro", self.dir], check=True)
        process = self.start_plugin()
        process.wait_log("cannot serve %s (Read-only file system); retrying" % self.plugin_socket)
        time.sleep(1.5)
        self.assertIsNone(process.proc.poll())
        self.assertEqual(process.log().count("WARNING cannot serve"), 1, "logged once, not per retry")
        # lazily: the plugin holds the directory open for its instance lock, which keeps
        # the read-only mount busy; the directory under it is locked anew
        subprocess.run(["umount", "-l", self.dir], check=True)
        self.kubelet.start(wipe=False)
        self.kubelet.wait_registered(timeout=5)

    def test_device_plugin_dir_removed_and_recreated(self):
        self.kubelet.start()
        process = self.start_plugin()
        self.kubelet.wait_registered()
        self.kubelet.stop()
        # renamed first: the plugin may serve its socket again while rmtree lists the dir
        gone = self.dir + ".gone"
        os.rename(self.dir, gone)
        shutil.rmtree(gone)
        process.wait_log("does not exist")
        self.kubelet.start()
        self.kubelet.wait_registered(2, timeout=5)
        self.kubelet.wait_list(lambda devices: len(devices) == 4)

    def test_device_plugin_dir_moved_away_and_made_anew(self):
        self.kubelet.start()
        process = self.start_plugin()
        self.kubelet.wait_registered()
        self.kubelet.stop()
        os.rename(self.dir, self.dir + ".old")
        process.wait_log("does not exist")
        os.mkdir(self.dir)
        process.wait_log("serving %s" % self.plugin_socket, count=2)
        started = time.monotonic()
        self.kubelet.start(wipe=False)          # after the plugin: only a watch on the new dir sees it
        self.kubelet.wait_registered(2, timeout=5)
        self.assertLess(time.monotonic() - started, 2.5)

    def test_sigkill_then_restart_reclaims_the_socket(self):
        self.kubelet.start()
        first = self.start_plugin()
        self.kubelet.wait_registered()
        self.assertEqual(first.stop(signal.SIGKILL), -signal.SIGKILL)
        self.assertTrue(os.path.exists(self.plugin_socket))            # left behind
        second = self.start_plugin()
        self.kubelet.wait_registered(2)
        second.wait_log("removed stale socket")
        self.assertEqual(dict(self.kubelet.allocate("3").container_responses[0].envs), {"ISOLCPUS": "3"})

    def test_bad_grpc_requests(self):
        self.kubelet.start()
        process = self.start_plugin()
        self.kubelet.wait_list(lambda devices: len(devices) == 4)
        stub = self.kubelet.stub
        self.assertEqual(stub.Allocate(pb.AllocateRequest(), timeout=5), pb.AllocateResponse())
        self.assertEqual(stub.GetPreferredAllocation(pb.PreferredAllocationRequest(), timeout=5),
                         pb.PreferredAllocationResponse())
        huge = [str(i) for i in range(10000)]
        for ids in (huge, ["2"] * 10000, ["x" * 100000]):
            with self.assertRaises(grpc.RpcError) as caught:
                self.kubelet.allocate(*ids)
            self.assertEqual(caught.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
            self.assertLess(len(caught.exception.details()), 300)
        self.assertEqual(self.kubelet.prefer(huge, [], 2), ["2", "6"])
        scattered = [str(3 * i + 100) for i in range(10000)]        # not advertised, and no runs to collapse
        self.assertEqual(self.kubelet.prefer(scattered + ["3"], scattered[:5000], 1), ["3"])
        self.assertEqual(self.kubelet.prefer(["2", "3"], [], -5), [])
        self.assertEqual(self.kubelet.prefer(["2", "2", "6"], ["6", "6"], 2), ["2", "6"])
        rng = random.Random(11)
        alphabet = ["2", "3", "6", "7", "0", "99", "-1", "", " 2", "x", "\u0663", "2" * 12, "1e3"]
        for _ in range(300):
            ids = [rng.choice(alphabet) for _ in range(rng.randint(0, 6))]
            try:
                if rng.random() < 0.5:
                    self.kubelet.allocate(*ids)
                else:
                    self.kubelet.prefer(ids, rng.sample(ids, min(len(ids), rng.randint(0, 2))),
                                        rng.randint(-2, 6))
            except grpc.RpcError as e:
                self.assertEqual(e.code(), grpc.StatusCode.INVALID_ARGUMENT, (ids, e.details()))
        self.assertIsNone(process.proc.poll())
        self.assertLess(max(len(line) for line in process.log().splitlines()), 400)
        self.assertNotIn("Traceback", process.log())

    @unittest.skipUnless(shutil.which("strace"), "strace not installed")
    def test_nothing_written_outside_the_device_plugin_dir(self):
        home, cwd = os.path.join(self.tmp, "home"), os.path.join(self.tmp, "cwd")
        os.makedirs(home)
        os.makedirs(cwd)
        trace = os.path.join(self.tmp, "trace")
        self.kubelet.start()
        args = [sys.executable, PLUGIN, "--sysfs", self.sysfs, "--procfs", self.procfs, "--device-plugin-path",
                self.dir, "--rescan-interval", "0.2", "--metrics-address", "127.0.0.1:0"]
        env = plugin_env({"HOME": home, "TMPDIR": home})
        proc = subprocess.Popen(["strace", "-f", "-qq", "-o", trace, "-e",
                                 "trace=open,openat,creat,mkdir,mkdirat,rename,renameat,renameat2,"
                                 "unlink,unlinkat,link,linkat,symlink,symlinkat,truncate,bind,chmod,fchmodat"]
                                + args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(subprocess.run, ["pkill", "-KILL", "-f", self.dir])    # strace leaves its tracee
        self.addCleanup(proc.kill)
        self.kubelet.wait_list(lambda devices: len(devices) == 4, timeout=30)
        with open("/proc/%d/task/%d/children" % (proc.pid, proc.pid)) as f:
            plugin_pid = int(f.read().split()[0])            # strace does not pass SIGTERM on
        self.kubelet.allocate("2")
        self.kubelet.restart()
        self.kubelet.wait_registered(2, timeout=10)
        self.set_host("online", "0-6\n")
        self.kubelet.wait_list(lambda devices: devices["7"][0] == "Unhealthy", timeout=5)
        os.kill(plugin_pid, signal.SIGTERM)
        self.assertEqual(proc.wait(10), 0)                   # strace exits with its tracee's status
        writes = []
        with open(trace) as f:
            for line in f:
                call = line.split(None, 1)[1] if " " in line else line
                writing = (call.startswith(("open(", "openat(")) and ("O_WRONLY" in call or "O_RDWR" in call
                                                                       or "O_CREAT" in call))
                if writing or call.startswith(("creat", "mkdir", "rename", "unlink", "link", "symlink",
                                               "truncate", "bind(", "chmod", "fchmodat")):
                    if "AF_INET" in call or "= -1" in call:
                        continue                          # the metrics port; calls that failed
                    writes.append(call.strip())
        outside = [w for w in writes if self.dir not in w and "/dev/null" not in w]
        self.assertEqual(outside, [], "written outside %s" % self.dir)
        self.assertTrue(any("windriver.com-isolcpus.sock" in w for w in writes), writes)
        self.assertEqual(os.listdir(home) + os.listdir(cwd), [])


def signal_mask(pid, field):
    """A signal set of /proc/PID/status (SigCgt, SigIgn...) as an int, bit N-1 = signal N."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def has_mapped(pid, name):
    try:
        with open("/proc/%d/maps" % pid) as f:
            return name in f.read()
    except OSError:
        return False


def peak_rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        return int([line for line in f if line.startswith("VmHWM:")][0].split()[1])


def metrics_port(process):
    process.wait_log("metrics on http://")
    return int(re.search(r"metrics on http://\S*:([0-9]+)/metrics", process.log()).group(1))


def http_get(port, path, host="127.0.0.1", timeout=5):
    """(status, body) of GET http://host:port/path."""
    url = "http://%s:%d%s" % ("[%s]" % host if ":" in host else host, port, path)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def big_checkpoint(megabytes, holder_cpu):
    """A valid device-manager checkpoint of about `megabytes` MB whose first
    entry holds `holder_cpu` of windriver.com/isolcpus."""
    entries = [{"PodUID": "big-pod", "ContainerName": "app", "ResourceName": "windriver.com/isolcpus",
                "DeviceIDs": {"0": [str(holder_cpu)]}, "AllocResp": ""}]
    filler = "A" * 400
    while len(entries) * 520 < megabytes * 1e6:
        entries.append({"PodUID": "pod-%d" % len(entries), "ContainerName": "c",
                        "ResourceName": "example.com/other", "DeviceIDs": {"0": ["1"]}, "AllocResp": filler})
    return json.dumps({"Data": {"PodDeviceEntries": entries, "RegisteredDevices": {}}, "Checksum": 1})


@needs_grpc
class HardeningTests(PluginRig):
    """What a hostile client, a careless operator or a bad host file did to
    the plugin, each once an outage: now withstood."""

    def assert_still_serving(self, process):
        """Answers RPCs, and SIGTERM ends it at once with 0."""
        self.assertEqual(dict(self.kubelet.allocate("2").container_responses[0].envs), {"ISOLCPUS": "2"})
        started = time.monotonic()
        self.assertEqual(process.stop(signal.SIGTERM), 0)
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertNotIn("Traceback", process.log())
        self.assertNotIn("internal error", process.log())

    def cpu_6_goes_offline(self, process, then_logged):
        """CPU 6 goes offline: the kubelet hears of it within 3 s whatever the
        checkpoint is, and then the plugin logs `then_logged`."""
        self.set_host("online", "0-5,7\n")
        self.kubelet.wait_list(lambda devices: devices["6"][0] == "Unhealthy", timeout=3)
        process.wait_log(then_logged)

    # Outages --------------------------------------------------------------------

    def test_a_deeply_nested_checkpoint_does_not_stop_the_list(self):
        process = self.registered_plugin()
        self.kubelet.allocate("6")
        write_files(self.dir, {"kubelet_internal_checkpoint":
                               '{"Data": {"PodDeviceEntries": ' + "[" * 100000 + "]" * 100000 + "}}"})
        self.cpu_6_goes_offline(process, "CPUs 6 are offline or no longer isolated but allocated")
        self.assert_still_serving(process)

    def test_a_big_checkpoint_is_not_read(self):
        process = self.registered_plugin()
        write_files(self.dir, {"kubelet_internal_checkpoint": big_checkpoint(15, holder_cpu=6)})
        peak_before = peak_rss_kib(process.proc.pid)
        self.cpu_6_goes_offline(process, "kubelet_internal_checkpoint: larger than")
        grown = peak_rss_kib(process.proc.pid) - peak_before
        self.assertLess(grown, 8 * 1024, "peak RSS grew by %d KiB" % grown)
        self.assert_still_serving(process)

    def test_a_fifo_for_the_checkpoint_does_not_freeze_the_plugin(self):
        process = self.registered_plugin()
        self.kubelet.allocate("6")
        os.mkfifo(os.path.join(self.dir, "kubelet_internal_checkpoint"))
        self.cpu_6_goes_offline(process, "not a regular file")
        self.assert_still_serving(process)

    def test_a_fifo_for_a_sysfs_file_does_not_freeze_the_plugin(self):
        process = self.registered_plugin()
        online = os.path.join(self.sysfs, "devices/system/cpu/online")
        os.unlink(online)
        os.mkfifo(online)
        process.wait_log("rescan failed, keeping the last device list")
        self.assertIn("not a regular file", process.log())
        self.assert_still_serving(process)

    def test_slow_metrics_clients_cannot_starve_the_plugin(self):
        import resource
        process = self.registered_plugin("--metrics-address", "127.0.0.1:0", "--log-level", "info")
        port = metrics_port(process)
        pid = process.proc.pid
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (256, 256))      # systemd's default is 1024
        clients, stop = [], threading.Event()
        for _ in range(400):
            client = socket.socket()
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", port))
            clients.append(client)
        self.addCleanup(lambda: [client.close() for client in clients])

        def trickle():                                  # a byte every second on each
            while not stop.wait(1.0):
                for client in clients:
                    try:
                        client.send(b"G")
                    except OSError:
                        pass
        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        self.addCleanup(stop.set)
        started = time.monotonic()
        fds = []
        time.sleep(1.0)
        fds.append(open_fds(pid))
        self.kubelet.restart()                          # needs new sockets
        self.kubelet.wait_registered(2, timeout=10)
        self.set_host("online", "0-6\n")                # needs to open sysfs files
        self.kubelet.wait_list(lambda devices: devices["7"][0] == "Unhealthy", timeout=5)
        fds.append(open_fds(pid))
        # whole requests time out, however often a byte arrives
        time.sleep(max(0.0, started + plugin.MetricsServer.REQUEST_TIMEOUT + 2.0 - time.monotonic()))
        fds.append(open_fds(pid))
        cut = 0
        for client in clients:
            try:
                cut += client.recv(1) == b""
            except (BlockingIOError, OSError):
                pass
        self.assertGreater(cut, 0, "no slow client was cut off")
        self.assertLess(max(fds), 100, fds)
        stop.set()
        thread.join()
        for client in clients:
            client.close()
        status, body = http_get(port, "/metrics", timeout=10)
        self.assertEqual(status, 200)
        self.assertIn("isolcpu_devices", body)
        self.assert_still_serving(process)

    def test_requests_with_too_many_containers_are_refused_at_once(self):
        process = self.registered_plugin("--log-level", "info")
        stub = self.kubelet.stub
        bound = plugin.MAX_CONTAINER_REQUESTS
        one = pb.ContainerPreferredAllocationRequest(available_deviceIDs=["2", "3", "6", "7"], allocation_size=1)
        answer = stub.GetPreferredAllocation(pb.PreferredAllocationRequest(container_requests=[one] * bound), timeout=5)
        self.assertEqual(len(answer.container_responses), bound)
        log_size = len(process.log())
        for call, request in (
                (stub.GetPreferredAllocation, pb.PreferredAllocationRequest(container_requests=[one] * 100000)),
                (stub.Allocate, pb.AllocateRequest(
                    container_requests=[pb.ContainerAllocateRequest(devices_ids=["2"])] * 100000)),
                (stub.GetPreferredAllocation, pb.PreferredAllocationRequest(container_requests=[
                    pb.ContainerPreferredAllocationRequest(available_deviceIDs=[str(i) for i in range(70000)],
                                                           allocation_size=1)]))):
            # what the bytes cost anyway, whoever handles them: protobuf writing them here and
            # reading them there (seconds in pure-python mode); refused at once is about that
            started = time.monotonic()
            type(request).FromString(request.SerializeToString())
            protobuf = time.monotonic() - started
            started = time.monotonic()
            with self.assertRaises(grpc.RpcError) as caught:
                call(request, timeout=30)
            self.assertEqual(caught.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
            self.assertLess(time.monotonic() - started, 2 * protobuf + 1.0)
            self.assertLess(len(caught.exception.details()), 300)
        self.assertLess(len(process.log()) - log_size, 2000)
        self.assert_still_serving(process)

    def test_signals_are_handled_before_anything_heavy_loads(self):
        self.kubelet.start()
        process = self.start_plugin()
        pid = process.proc.pid
        wanted = sum(1 << (signum - 1) for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT))
        deadline = time.monotonic() + 20
        while True:
            # maps first, signals second: grpc seen loaded and the signals seen not yet
            # caught, in that order, proves the order was wrong; a late poll proves nothing
            grpc_loaded = has_mapped(pid, "cygrpc")
            caught = signal_mask(pid, "SigCgt") & wanted == wanted
            self.assertFalse(grpc_loaded and not caught, "grpc was loaded before the signals were handled")
            if caught:
                break
            self.assertLess(time.monotonic(), deadline, "the plugin never caught SIGHUP, SIGTERM and SIGINT")
            self.assertIsNone(process.proc.poll(), process.log())
            time.sleep(0.0005)
        # systemctl reload right after start: a storm of SIGHUPs while it starts up
        storm_until = time.monotonic() + 0.5
        while time.monotonic() < storm_until:
            process.proc.send_signal(signal.SIGHUP)
            time.sleep(0.003)
        self.kubelet.wait_registered(timeout=10)
        self.assertIsNone(process.proc.poll(), process.log())
        process.wait_log("SIGHUP: re-reading the host")
        self.assert_still_serving(process)

    def test_sigterm_while_starting_exits_zero(self):
        self.kubelet.start()
        process = self.start_plugin()
        deadline = time.monotonic() + 20
        while not signal_mask(process.proc.pid, "SigCgt") & (1 << (signal.SIGTERM - 1)):
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.0005)
        self.assertEqual(process.stop(signal.SIGTERM), 0)
        self.assertNotIn("Traceback", process.log())

    # Wrong behaviour ------------------------------------------------------------

    def test_chmod_and_chown_of_the_sockets_are_not_restarts(self):
        process = self.registered_plugin()
        errors, stop = [], threading.Event()

        def allocate_all_along():
            while not stop.is_set():
                try:
                    self.kubelet.allocate("2")
                except grpc.RpcError as e:
                    errors.append(e.code())
        thread = threading.Thread(target=allocate_all_along)
        thread.start()
        try:
            for mode in (0o660, 0o600, 0o640, 0o600):
                for path in (self.plugin_socket, self.kubelet.socket):     # restorecon, chown -R
                    os.chmod(path, mode)
                    os.chown(path, os.getuid(), os.getgid())
                # the kubelet rewrites its checkpoint in the same directory on every allocation
                write_files(self.dir, {"kubelet_internal_checkpoint.tmp": "{}"})
                os.rename(os.path.join(self.dir, "kubelet_internal_checkpoint.tmp"),
                          os.path.join(self.dir, "kubelet_internal_checkpoint"))
                time.sleep(0.4)
        finally:
            stop.set()
            thread.join()
        self.assertEqual(len(errors), 0, collections.Counter(errors))
        self.assertEqual(len(self.kubelet.registrations), 1)
        self.assertNotIn("serving it again", process.log())
        self.assertNotIn("kubelet restarted", process.log())

    def test_another_list_and_watch_client_does_not_hide_the_kubelets_stream(self):
        process = self.registered_plugin()
        channel = grpc.insecure_channel("unix:" + self.plugin_socket)
        self.addCleanup(channel.close)
        other = pb_grpc.DevicePluginStub(channel).ListAndWatch(pb.Empty())
        self.assertEqual(len(next(other).devices), 4)
        self.kubelet.close_stream()
        self.kubelet.wait_registered(2, timeout=5)
        process.wait_log("kubelet closed ListAndWatch; registering again")
        self.kubelet.wait_list(lambda devices: len(devices) == 4)
        other.cancel()                                     # not the kubelet's: no new registration
        time.sleep(1.5)
        self.assertEqual(len(self.kubelet.registrations), 2)

    def test_holders_are_logged_whole(self):
        uid = "3f1c2a9e-7b4d-4e8f-9a6b-1c2d3e4f5a6b"
        checkpoint = {"Data": {"PodDeviceEntries": [
            {"PodUID": uid, "ContainerName": "packet-processor-main", "ResourceName": "windriver.com/isolcpus",
             "DeviceIDs": {"2": ["6", "7"]}, "AllocResp": ""},
            {"PodUID": uid, "ContainerName": "sidecar", "ResourceName": "windriver.com/isolcpus",
             "DeviceIDs": {"2": ["3"]}, "AllocResp": ""}]}, "Checksum": 1}
        write_files(self.dir, {"kubelet_internal_checkpoint": json.dumps(checkpoint)})
        process = self.registered_plugin()
        self.set_host("online", "0-2,4-5\n")
        process.wait_log("CPUs 3,6-7 are offline or no longer isolated but allocated")
        self.assertIn("%s/packet-processor-main" % uid, process.log())
        self.assertIn("%s/sidecar" % uid, process.log())

    def test_serving_no_devices_is_a_warning_once_per_change(self):
        self.set_host("isolated", "\n")
        self.kubelet.start()
        process = self.start_plugin()
        self.kubelet.wait_registered()
        process.wait_log("registered windriver.com/isolcpus")
        time.sleep(1.0)                                 # five rescans
        self.set_host("isolated", "2\n")
        self.kubelet.wait_list(lambda devices: list(devices) == ["2"], timeout=3)
        self.set_host("isolated", "\n")
        self.kubelet.wait_list(lambda devices: devices == {}, timeout=3, since=time.monotonic() - 0.1)
        time.sleep(1.0)
        warnings = [line for line in process.log().splitlines() if " WARNING " in line and "0 devices" in line]
        self.assertEqual(len(warnings), 2, process.log())

    def test_a_persistent_rescan_failure_is_logged_when_it_starts_changes_and_ends(self):
        process = self.registered_plugin()
        self.set_host("isolated", "2-x\n")
        time.sleep(1.2)                                 # six rescans at 0.2 s
        self.set_host("isolated", "2-y\n")
        time.sleep(1.2)
        self.set_host("isolated", "2-3\n")
        self.kubelet.wait_list(lambda devices: sorted(devices) == ["2", "3"], timeout=3)
        process.wait_log("resolved after")
        lines = process.log().splitlines()
        failed = [line for line in lines if " WARNING " in line and "rescan failed" in line]
        self.assertEqual(len(failed), 2, failed)
        self.assertIn("'2-x'", failed[0])
        self.assertIn("'2-y'", failed[1])
        resolved = [line for line in lines if " INFO resolved after" in line and "rescan failed" in line]
        self.assertEqual(len(resolved), 1, resolved)
        self.assertRegex(resolved[0], r"resolved after ([5-9]|[1-9][0-9]+) times over")

    def test_metrics_on_all_interfaces_with_a_query_and_a_real_backlog(self):
        process = self.registered_plugin("--metrics-address", ":0")
        port = metrics_port(process)
        self.assertEqual(http_get(port, "/metrics?x=1")[0], 200)
        self.assertEqual(http_get(port, "/healthz?verbose")[0], 200)
        self.assertEqual(http_get(port, "/nothing?x=1")[0], 404)
        if socket.has_ipv6 and os.path.exists("/proc/net/if_inet6"):
            self.assertEqual(http_get(port, "/metrics", host="::1")[0], 200)
        if shutil.which("ss"):
            listing = subprocess.run(["ss", "-ltnH", "sport = :%d" % port], stdout=subprocess.PIPE,
                                     universal_newlines=True).stdout
            backlogs = [int(line.split()[2]) for line in listing.splitlines()]
            self.assertTrue(backlogs and min(backlogs) >= 128, listing)

    def test_probe_says_permission_denied(self):
        # as nobody through setpriv: forking with a preexec_fn while grpc's threads
        # run deadlocks grpc 1.51's fork handler (seen on Debian 13)
        if os.getuid() != 0 or not shutil.which("setpriv"):
            self.skipTest("needs root and setpriv, to run the probe as nobody")
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
        self.registered_plugin()
        for path in (self.tmp, self.dir):
            os.chmod(path, 0o755)                          # the kubelet's dir; the socket stays 0600
        if subprocess.run(as_nobody + [python, "-c", "import os; os.stat(%r)" % PLUGIN],
                          stderr=subprocess.DEVNULL).returncode != 0:
            self.skipTest("nobody cannot run %s on %s here" % (python, PLUGIN))
        result = subprocess.run(as_nobody + [python, PLUGIN, "--probe", "--device-plugin-path", self.dir],
                                env=plugin_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True, timeout=30)
        self.assertEqual((result.returncode, len(result.stderr.splitlines())), (1, 1), result.stderr)
        self.assertIn("permission denied", result.stderr.lower())
        self.assertNotIn("did not answer", result.stderr)

    # Logs ------------------------------------------------------------------------

    def test_every_line_is_written_when_it_happens(self):
        self.kubelet.start()
        process = self.start_plugin("--log-level", "info")
        self.kubelet.wait_registered()
        process.proc.kill()                                # a few ms after registering
        process.proc.wait()
        log = process.log()
        self.assertIn("advertising windriver.com/isolcpus", log)
        self.assertIn("serving " + self.plugin_socket, log)

    def test_log_lines_print_canonical_cpu_lists(self):
        self.set_host("isolated", "1-7\n")
        self.kubelet.start()
        process = self.start_plugin()
        self.kubelet.wait_list(lambda devices: len(devices) == 7)
        self.assertEqual(self.kubelet.prefer(["7", "6", "3", "2", "1"], [], 4), ["2", "3", "6", "7"])
        process.wait_log("preferred CPUs 2-3,6-7 for 4 of 5 available")
        self.kubelet.allocate("5", "4", "1")
        process.wait_log("allocated CPUs 1,4-5 as ISOLCPUS")
        self.set_host("online", "0-3,7\n")
        process.wait_log("now unhealthy (offline) 4-6")
        process.wait_log("CPUs 4-5 are offline or no longer isolated but allocated")


def reference_proto(name):
    """(package, {message: {field: (number, type, repeated)}}, {service: {rpc: (request, response)}})
    of a proto3 file of ../shared/reference, read as text; None when absent."""
    path = os.path.join(REFERENCE, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = re.sub(r"//[^\n]*", "", f.read())
    package = re.search(r"^package\s+([\w.]+);", text, re.M).group(1)
    messages = {}
    for name_, body in re.findall(r"message\s+(\w+)\s*\{([^{}]*)\}", text):
        messages[name_] = {field: (int(number), kind, label == "repeated") for label, kind, field, number
                           in re.findall(r"(repeated\s+|optional\s+)?([\w.]+)\s+(\w+)\s*=\s*(\d+)\s*;", body)
                           for label in [label.strip()]}
    services = {}
    for service, body in re.findall(r"service\s+(\w+)\s*\{(.*?)\n\}", text, re.S):
        services[service] = {rpc: (request, response) for rpc, request, response
                             in re.findall(r"rpc\s+(\w+)\s*\((\w+)\)\s*returns\s*\((\w+)\)", body)}
    return package, messages, services


@unittest.skipIf(grpc is None, "grpcio/protobuf not installed")
class PodResourcesWireTests(unittest.TestCase):
    """The PodResources messages in deviceplugin.proto against the kubelet's api.proto."""

    SCALARS = {"string": 9, "int64": 3, "uint64": 4, "int32": 5, "bool": 8}    # FieldDescriptor.TYPE_*

    def test_messages_are_wire_identical_to_the_kubelets(self):
        reference = reference_proto("kubelet-podresources-v1.proto")
        if reference is None:
            self.skipTest("../shared/reference absent")
        package, messages, services = reference
        self.assertEqual(package, "v1")
        ours = pb.DESCRIPTOR.message_types_by_name
        used = {name for pair in plugin.POD_RESOURCES_METHODS.values() for name in pair}
        pending, checked = sorted(used), set()
        while pending:                                    # every message reachable from those the plugin calls with
            name = pending.pop()
            if name in checked:
                continue
            checked.add(name)
            self.assertIn(name, messages, "%s is not a PodResources message" % name)
            for field in ours[name].fields:
                with self.subTest(message=name, field=field.name):
                    self.assertIn(field.name, messages[name])
                    number, kind, repeated = messages[name][field.name]
                    self.assertEqual(field.number, number)
                    self.assertEqual(field.is_repeated if hasattr(field, "is_repeated")      # protobuf 7 has no label
                                     else field.label == field.LABEL_REPEATED, repeated)
                    if kind in self.SCALARS:
                        self.assertEqual(field.type, self.SCALARS[kind])
                    else:
                        self.assertEqual((field.type, field.message_type.name), (field.TYPE_MESSAGE, kind))
                        pending.append(kind)
        self.assertTrue({"PodResources", "ContainerResources", "ContainerDevices", "TopologyInfo"} <= checked)
        for method, (request, response) in plugin.POD_RESOURCES_METHODS.items():
            with self.subTest(method=method):
                self.assertTrue(method.startswith("/%s.PodResourcesLister/" % package), method)
                self.assertEqual(services["PodResourcesLister"][method.rsplit("/", 1)[1]], (request, response))

    def test_a_kubelets_answer_decodes_and_unknown_fields_are_skipped(self):
        data = pb_field(1, encode_pod("web-0", "shop", [encode_container(
            "app", [("windriver.com/isolcpus", ["3", "11"], [1])], cpu_ids=[-1, 5])]))
        answer = pb.ListPodResourcesResponse.FromString(data)
        pod = answer.pod_resources[0]
        self.assertEqual((pod.name, pod.namespace, pod.containers[0].name), ("web-0", "shop", "app"))
        devices = pod.containers[0].devices[0]
        self.assertEqual((devices.resource_name, list(devices.device_ids), [n.ID for n in devices.topology.nodes]),
                         ("windriver.com/isolcpus", ["3", "11"], [1]))
        self.assertEqual(list(pod.containers[0].cpu_ids), [-1, 5])

    def test_holders_from_an_answer(self):
        answer = pb.ListPodResourcesResponse.FromString(
            pb_field(1, encode_pod("dpdk-0", "net", [
                encode_container("fwd", [("windriver.com/isolcpus", ["6", "7"], [2]), ("example.com/nic", ["3"])]),
                encode_container("idle", [])]))
            + pb_field(1, encode_pod("old-1", "net", [encode_container("fwd", [("windriver.com/isolcpus", ["7"])])]))
            + pb_field(1, encode_pod("odd", "x", [encode_container("c", [("windriver.com/isolcpus", ["x", "-1", "07"])])])))
        holders = plugin.pod_resources_holders(answer, "windriver.com/isolcpus")
        self.assertEqual(sorted(holders), [6, 7])                    # 3 is another resource's; bad IDs skipped
        self.assertEqual([plugin.holder_name(h) for h in holders[6]], ["net/dpdk-0/fwd"])
        self.assertEqual(sorted(plugin.holder_name(h) for h in holders[7]), ["net/dpdk-0/fwd", "net/old-1/fwd"])
        self.assertEqual(plugin.holdings_text({6: holders[6], 7: holders[6]}), "6-7 to 'net/dpdk-0/fwd'")
        many = {cpu: (plugin.Holder("ns", "pod-%d" % cpu, "c", None, "pod-resources"),) for cpu in range(100)}
        text = plugin.holdings_text(many)
        self.assertIn("(+90 more)", text)
        self.assertLess(len(text), 600)


class PodResourcesRig(PluginRig):
    """PluginRig whose kubelet serves PodResources and writes its checkpoint."""

    def setUp(self):
        super().setUp()
        self.pod_resources_dir = os.path.join(self.tmp, "pod-resources")
        self.kubelet = FakeKubelet(self.dir, self.pod_resources_dir, writes_checkpoint=True)
        self.addCleanup(self.kubelet.stop)

    def allocate_some(self):
        self.kubelet.allocate("6", "7", pod=("net", "dpdk-fwd-0", "forwarder"))
        self.kubelet.allocate("3", pod=("trading", "order-gateway-7f9c", "gateway"))

    def calls(self, method="List"):
        with self.kubelet.cond:
            return [at for name, at in self.kubelet.pod_resources_calls if name == method]

    def list_cli(self, *args):
        return subprocess.run([sys.executable, PLUGIN, "--sysfs", self.sysfs, "--procfs", self.procfs,
                               "--device-plugin-path", self.dir, "--list"] + list(args), env=plugin_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=60)


@needs_grpc
class PodResourcesTests(PodResourcesRig):
    """Who holds each CPU, from the kubelet's PodResources API, else its checkpoint."""

    def test_lost_cpus_are_named_by_pod_resources(self):
        process = self.registered_plugin()
        self.allocate_some()
        self.set_host("online", "0-2,4-5,7\n")                       # 3 and 6 go offline
        process.wait_log("CPUs 3,6 are offline or no longer isolated but allocated")
        line = [l for l in process.log().splitlines() if "are offline or no longer isolated" in l][0]
        self.assertIn("3 to 'trading/order-gateway-7f9c/gateway'", line)
        self.assertIn("6 to 'net/dpdk-fwd-0/forwarder'", line)
        self.assertIn("named by PodResources", line)

    def test_list_names_holders_table_and_json(self):
        process = self.registered_plugin()
        self.allocate_some()
        socket_flag = ["--pod-resources-socket", self.kubelet.pod_resources_socket]
        result = self.list_cli(*socket_flag)
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.splitlines()
        self.assertIn("holders from PodResources", lines[0])
        self.assertEqual(lines[1].split()[-1], "HOLDER")
        rows = {line.split()[0]: line.split()[-1] for line in lines[2:]}
        self.assertEqual(rows, {"2": "-", "3": "trading/order-gateway-7f9c/gateway",
                                "6": "net/dpdk-fwd-0/forwarder", "7": "net/dpdk-fwd-0/forwarder"})
        data = json.loads(self.list_cli("--json", *socket_flag).stdout)
        self.assertEqual(list(data)[:2], ["resource_name", "devices"])
        self.assertEqual(data["holders_source"], "pod-resources")
        by_id = {d["id"]: d for d in data["devices"]}
        self.assertEqual(set(by_id["3"]) - {"holder", "holders"},
                         {"id", "cpu", "health", "numa_nodes", "package", "core_id", "thread_siblings",
                          "llc_cpus", "core_class"})
        self.assertEqual(by_id["3"]["holder"], {"namespace": "trading", "pod": "order-gateway-7f9c",
                                                "container": "gateway", "pod_uid": None, "source": "pod-resources",
                                                "init_or_app": False})
        self.assertIsNone(by_id["2"]["holder"])
        self.assertEqual(by_id["2"]["holders"], [])
        self.assertEqual(by_id["6"]["holders"], [by_id["6"]["holder"]])
        # without PodResources: the checkpoint, by pod UID, and it says so
        result = self.list_cli("--pod-resources-socket", "off")
        self.assertIn("holders from the kubelet's checkpoint", result.stdout.splitlines()[0])
        rows = {line.split()[0]: line.split()[-1] for line in result.stdout.splitlines()[2:]}
        self.assertEqual(rows["3"], "%s/gateway" % pod_uid("trading", "order-gateway-7f9c"))
        data = json.loads(self.list_cli("--json", "--pod-resources-socket", "").stdout)
        holder = {d["id"]: d for d in data["devices"]}["6"]["holder"]
        self.assertEqual(holder, {"namespace": None, "pod": None, "container": "forwarder",
                                  "pod_uid": pod_uid("net", "dpdk-fwd-0"), "source": "checkpoint",
                                  "init_or_app": False})
        self.assertEqual(data["holders_source"], "checkpoint")
        # neither: unknown, said once, still listed
        os.unlink(os.path.join(self.dir, "kubelet_internal_checkpoint"))
        result = self.list_cli("--json", "--pod-resources-socket", os.path.join(self.tmp, "none.sock"))
        data = json.loads(result.stdout)
        self.assertEqual((data["holders_source"], [d["holder"] for d in data["devices"]]), (None, [None] * 4))
        self.assertIn("does not exist", data["holders_note"])
        table = self.list_cli("--pod-resources-socket", os.path.join(self.tmp, "none.sock")).stdout.splitlines()
        self.assertIn("holders unknown", table[0])
        self.assertEqual({line.split()[-1] for line in table[2:]}, {"?"})
        self.assertIsNone(process.proc.poll())

    def test_checkpoint_fallback_and_one_warning_for_a_missing_socket(self):
        process = self.registered_plugin("--pod-resources-socket", os.path.join(self.tmp, "gone", "kubelet.sock"))
        self.allocate_some()
        self.set_host("online", "0-2,4-5,7\n")
        process.wait_log("CPUs 3,6 are offline or no longer isolated but allocated")
        self.set_host("online", "0-7\n")
        self.kubelet.wait_list(lambda devices: devices["6"][0] == "Healthy", timeout=3)
        self.set_host("online", "0-6\n")
        process.wait_log("CPUs 7 are offline or no longer isolated but allocated")
        lines = process.log().splitlines()
        line = [l for l in lines if "CPUs 7 are offline" in l][0]
        self.assertIn("7 to '%s/forwarder'" % pod_uid("net", "dpdk-fwd-0"), line)
        self.assertIn("named by the kubelet's checkpoint", line)
        missing = [l for l in lines if " WARNING " in l and "gone/kubelet.sock" in l and "PodResources" in l]
        self.assertEqual(len(missing), 1, missing)

    def test_a_pod_resources_server_that_hangs_or_fails_costs_nothing_but_the_names(self):
        self.kubelet.writes_checkpoint = False          # no checkpoint either: the holder is unknown
        for mode, why in (("hang", "DEADLINE_EXCEEDED"), ("error", "INTERNAL")):
            with self.subTest(mode=mode):
                self.kubelet.pod_resources_mode = mode
                process = self.registered_plugin()
                self.kubelet.allocate("6", pod=("net", "dpdk-fwd-0", "forwarder"))
                changed = time.monotonic()
                self.set_host("online", "0-5,7\n")
                snap = self.kubelet.wait_list(lambda devices: devices["6"][0] == "Unhealthy", timeout=3, since=changed)
                self.assertLess(snap.at - changed, 1.0)                  # published before asking anyone
                # serving while the question hangs
                self.assertEqual(dict(self.kubelet.allocate("2").container_responses[0].envs), {"ISOLCPUS": "2"})
                process.wait_log("CPUs 6 are offline or no longer isolated but allocated", timeout=5)
                line = [l for l in process.log().splitlines() if "CPUs 6 are offline" in l][0]
                self.assertIn("unknown", line)
                self.assertIn(why, process.log())
                self.assertEqual(process.stop(), 0)
                self.kubelet.stop()
                self.set_host("online", "0-7\n")
                self.kubelet.pod_resources_mode = "serve"
                self.kubelet.allocations.clear()

    def test_metrics_name_holders_and_ask_at_most_once_a_second(self):
        process = self.registered_plugin("--metrics-address", "127.0.0.1:0")
        port = metrics_port(process)
        self.allocate_some()
        time.sleep(1.1)
        before, started = len(self.calls()), time.monotonic()
        texts = [http_get(port, "/metrics")[1] for _ in range(5)]
        asked = len(self.calls()) - before
        self.assertGreaterEqual(asked, 1)
        self.assertLessEqual(asked, 1 + int(time.monotonic() - started), "scrapes asked more than once a second")
        samples = sorted(line for line in texts[-1].splitlines() if line.startswith("isolcpu_device_allocated{"))
        self.assertEqual(samples, [
            'isolcpu_device_allocated{resource="windriver.com/isolcpus",cpu="%d",namespace="%s",pod="%s",'
            'container="%s",pod_uid=""} 1' % (cpu, ns, pod, container)
            for cpu, ns, pod, container in ((3, "trading", "order-gateway-7f9c", "gateway"),
                                            (6, "net", "dpdk-fwd-0", "forwarder"),
                                            (7, "net", "dpdk-fwd-0", "forwarder"))])
        time.sleep(1.1)
        self.kubelet.allocate("2", pod=("late", "p", "c"))
        self.assertIn('cpu="2",namespace="late"', http_get(port, "/metrics")[1])

    def test_the_start_tells_who_holds_what_once_and_idle_asks_nothing(self):
        self.kubelet.start()
        first = self.start_plugin()
        self.kubelet.wait_list(lambda devices: len(devices) == 4)
        self.allocate_some()
        first.stop()
        self.kubelet.restart()
        process = self.start_plugin()                 # a restarted plugin learns the node's state
        process.wait_log("the kubelet reports 3 of 4 CPUs allocated")
        line = [l for l in process.log().splitlines() if "the kubelet reports" in l][0]
        self.assertIn("3 to 'trading/order-gateway-7f9c/gateway', 6-7 to 'net/dpdk-fwd-0/forwarder'", line)
        self.assertIn("PodResources", line)
        asked = len(self.calls())
        self.kubelet.restart()                        # re-registering is not a start
        self.kubelet.wait_registered(3)
        time.sleep(2.0)
        self.assertEqual(len(self.calls()), asked, "PodResources was asked while idle")
        self.assertEqual(process.log().count("the kubelet reports"), 1)

    def test_a_read_only_mount_of_the_pod_resources_dir_still_connects(self):
        self.kubelet.start()
        try:
            subprocess.run(["mount", "--bind", self.pod_resources_dir, self.pod_resources_dir], check=True,
                           stderr=subprocess.DEVNULL)
        except (OSError, subprocess.CalledProcessError):
            self.skipTest("cannot bind-mount here")
        self.addCleanup(subprocess.run, ["umount", "-l", self.pod_resources_dir], stderr=subprocess.DEVNULL)
        subprocess.run(["mount", "-o", "remount,bind,ro", self.pod_resources_dir], check=True)
        process = self.start_plugin()
        self.kubelet.wait_list(lambda devices: len(devices) == 4)
        self.allocate_some()
        result = self.list_cli("--pod-resources-socket", self.kubelet.pod_resources_socket)
        self.assertIn("holders from PodResources", result.stdout.splitlines()[0], result.stderr)
        self.assertIsNone(process.proc.poll())

    def test_the_pod_resources_flag(self):
        self.kubelet.start()
        for args, env, note in ((["--pod-resources-socket", "off"], {}, "off"),
                                ([], {"ISOLCPU_POD_RESOURCES_SOCKET": "off"}, "off"),
                                ([], {"ISOLCPU_POD_RESOURCES_SOCKET": self.kubelet.pod_resources_socket}, None)):
            with self.subTest(args=args, env=env):
                result = subprocess.run([sys.executable, PLUGIN, "--sysfs", self.sysfs, "--procfs", self.procfs,
                                         "--device-plugin-path", self.dir, "--list", "--json"] + args,
                                        env=plugin_env(env), stdout=subprocess.PIPE, universal_newlines=True)
                data = json.loads(result.stdout)
                if note:
                    self.assertIn(note, data["holders_note"])
                else:
                    self.assertEqual(data["holders_source"], "pod-resources")
        result = self.list_cli("--pod-resources-socket", "/" + "p" * 120)
        self.assertEqual(result.returncode, 2)
        self.assertIn("--pod-resources-socket", result.stderr)


def one_line_of(error):
    return "%s: %s" % (type(error).__name__, error)


def many_pods_holding(count, cpu="6", ids_per_pod=1):
    """A PodResources List answer's tail: `count` pods, each of whose one
    container names `cpu` (and ids_per_pod - 1 IDs the plugin does not serve)."""
    extra = [str(1000 + i) for i in range(ids_per_pod - 1)]
    devices = pb_field(2, encode_container_devices("windriver.com/isolcpus", [cpu] + extra))
    return b"".join(pb_field(1, pb_field(1, "old-%d" % i) + pb_field(2, "batch")
                             + pb_field(3, pb_field(1, "c") + devices)) for i in range(count))


def best_time(function, repeat=3):
    """The fastest of `repeat` runs of function(), in seconds."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


class WorkBoundUnitTests(unittest.TestCase):
    """The work an input causes grows with its size, not faster: each size
    ratio is compared within one run (noise cancels, a square does not)."""

    def assert_linear(self, work, small, factor=8):
        """work(n) for n = small and factor * small takes under factor * 2 times as long.
        The garbage collector is kept out: its full passes grow with every object alive
        (x16.6 seen once for x8 a checkpoint), whatever the work does."""
        work(small)                                     # warm caches
        gc.collect()
        gc.disable()
        try:
            ratio = best_time(lambda: work(small * factor)) / best_time(lambda: work(small))
        finally:
            gc.enable()
        self.assertLess(ratio, factor * 2, "x%d the input took x%.1f the time" % (factor, ratio))

    @needs_grpc
    def test_naming_holders_from_pod_resources_is_linear(self):
        def work(count):
            answer = pb.ListPodResourcesResponse.FromString(many_pods_holding(count))
            holders = plugin.pod_resources_holders(answer, "windriver.com/isolcpus")
            self.assertEqual(len(holders[6]), count)
        self.assert_linear(work, 1000)

    def test_naming_holders_from_the_checkpoint_is_linear(self):
        def work(count):
            text = json.dumps({"Data": {"PodDeviceEntries": [
                {"PodUID": "uid-%d" % i, "ContainerName": "c", "ResourceName": "windriver.com/isolcpus",
                 "DeviceIDs": {"0": ["6"]}} for i in range(count)]}})
            self.assertEqual(len(plugin.checkpoint_holders(text, "windriver.com/isolcpus")[6]), count)
        self.assert_linear(work, 1000)

    def test_the_checkpoint_marks_init_and_app_containers_sharing_a_cpu(self):
        def entry(uid, container, ids):
            return {"PodUID": uid, "ContainerName": container, "ResourceName": "windriver.com/isolcpus",
                    "DeviceIDs": {"0": ids}}
        text = json.dumps({"Data": {"PodDeviceEntries": [
            entry("uid-a", "setup", ["6"]), entry("uid-a", "app", ["6", "7"]), entry("uid-b", "other", ["6"])]}})
        holders = plugin.checkpoint_holders(text, "windriver.com/isolcpus")
        self.assertEqual([plugin.holder_name(h) for h in holders[6]],
                         ["uid-a/setup (init or app)", "uid-a/app (init or app)", "uid-b/other"])
        self.assertEqual([plugin.holder_name(h) for h in holders[7]], ["uid-a/app"])
        self.assertEqual([plugin.holder_record(h)["init_or_app"] for h in holders[6]], [True, True, False])

    def test_the_runtime_tells_which_of_init_and_app_runs(self):
        setup, app, other = (plugin.Holder(None, None, name, uid, "checkpoint", mark)
                             for name, uid, mark in (("setup", "u1", True), ("app", "u1", True), ("x", "u2", False)))
        resolved = plugin.name_the_running({6: (setup, app, other), 7: (app,)}, {("u1", "app"), ("u2", "x")})
        self.assertEqual([plugin.holder_name(h) for h in resolved[6]], ["u1/app", "u2/x"])
        self.assertEqual([plugin.holder_name(h) for h in resolved[7]], ["u1/app"])
        self.assertEqual(plugin.name_the_running({6: (setup, app)}, set()), {6: (setup, app)})   # nobody runs: both

    def assert_shares_the_interpreter(self, work):
        """work(), run in a thread as the plugin's worker runs it, lets this
        thread (the event loop's) run meanwhile: its longest wait is a small
        part of the work's time. One C call over a whole document would hold
        the interpreter from start to end."""
        work()                                           # warm caches
        took, done, gaps = [], threading.Event(), []
        # the garbage collector's pauses hold every thread whatever the parser does (bench.py stall
        # measures them with the rest): kept out, so that what is measured is the parser's sharing
        gc.disable()
        self.addCleanup(gc.enable)

        def run():
            started = time.perf_counter()
            work()
            took.append(time.perf_counter() - started)
            done.set()
        thread = threading.Thread(target=run)
        last = time.perf_counter()
        thread.start()
        while not done.is_set():
            sum(range(200))                              # the loop's own Python work
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        thread.join()
        self.assertLess(max(gaps), took[0] / 6, "waited %.1f ms of %.1f ms" % (1000 * max(gaps), 1000 * took[0]))

    @needs_grpc
    def test_the_variables_of_a_large_nri_request_are_looked_through_beside_the_loop(self):
        # looking for $ISOLCPUS among a million variables, on the loop, held it 120-220 ms
        request = pb.CreateContainerRequest()
        request.container.id = "c1"
        request.container.env.extend(["a="] * 900000 + ["ISOLCPUS=2-3"])
        self.assertLess(request.ByteSize(), 4 << 20)
        self.assert_shares_the_interpreter(lambda: plugin.environment_claims([request.container], "ISOLCPUS="))
        parsed, claims = plugin.parse_nri_request(pb.CreateContainerRequest.FromString,
                                                  request.SerializeToString(), "ISOLCPUS=")
        self.assertEqual((parsed.container.id, claims), ("c1", {"c1": True}))
        synchronize = pb.SynchronizeRequest(containers=[pb.Container(id="a", env=["X=1"]),
                                                        pb.Container(id="b", env=["ISOLCPUS=6"])])
        self.assertEqual(plugin.parse_nri_request(pb.SynchronizeRequest.FromString,
                                                  synchronize.SerializeToString(), "ISOLCPUS=")[1],
                         {"a": False, "b": True})
        self.assertEqual(plugin.parse_nri_request(pb.Empty.FromString, b"", "ISOLCPUS=")[1], {})

    def test_a_checkpoint_at_its_bound_is_parsed_beside_the_loop(self):
        entry = {"PodUID": "00000000-0000-0000-0000-000000000000", "ContainerName": "c",
                 "ResourceName": "windriver.com/isolcpus", "DeviceIDs": {"0": ["3"]}, "AllocResp": "A" * 64}
        text = json.dumps({"Data": {"PodDeviceEntries": [entry] * 18000}, "Checksum": 1})
        self.assertLess(len(text), plugin.CHECKPOINT_LIMIT)
        self.assert_shares_the_interpreter(lambda: plugin.checkpoint_grants(text, "windriver.com/isolcpus"))

    @needs_grpc
    def test_a_pod_resources_answer_at_its_bound_is_parsed_beside_the_loop(self):
        answer = many_pods_holding(75000)
        self.assertLess(len(answer), 4 << 20)
        client = plugin.PodResourcesClient("/nonexistent")
        api = plugin.load_grpc()
        self.assert_shares_the_interpreter(lambda: client.decode(api, plugin.POD_RESOURCES_LIST, answer))
        decoded = client.decode(api, plugin.POD_RESOURCES_LIST, answer)
        self.assertEqual(len(plugin.pod_resources_holders(decoded, "windriver.com/isolcpus")[6]), 75000)
        with self.assertRaises(plugin.PodResourcesUnavailable):
            client.decode(api, plugin.POD_RESOURCES_LIST, answer[:-3])     # cut inside the last pod

    def test_metrics_name_only_served_cpus(self):
        holders = {cpu: (plugin.Holder("ns", "p-%d" % cpu, "c", None, "pod-resources"),) for cpu in range(100000)}
        devices = plugin.build_devices([2, 3], {2, 3}, {})
        text = plugin.render_metrics("windriver.com/isolcpus", devices, plugin.Counters(), True,
                                     plugin.HolderReport(holders, "pod-resources", ()))
        samples = [line for line in text.splitlines() if line.startswith("isolcpu_device_allocated{")]
        self.assertEqual([re.search(r'cpu="(\d+)"', line).group(1) for line in samples], ["2", "3"])

    def allocated_samples(self, report):
        devices = plugin.build_devices([6], {6}, {})
        text = plugin.render_metrics("windriver.com/isolcpus", devices, plugin.Counters(), True, report)
        return [re.search(r'pod="([^"]*)",container="([^"]*)"', line).groups() for line in text.splitlines()
                if line.startswith("isolcpu_device_allocated{")]

    @needs_grpc
    def test_metrics_name_the_holder_the_checkpoint_confirms_first(self):
        # List keeps terminated pods (kubernetes#119423), in the kubelet's order: six old ones ahead of the
        # live one; the device manager's checkpoint names only the live one
        answer = pb.ListPodResourcesResponse.FromString(many_pods_holding(6) + pb_field(1, encode_pod(
            "dpdk-fwd-0", "net", [encode_container("forwarder", [("windriver.com/isolcpus", ["6"])])])))
        directory = tempfile.mkdtemp(prefix="isolcpu-test-")
        self.addCleanup(shutil.rmtree, directory, True)
        with open(os.path.join(directory, plugin.CHECKPOINT_NAME), "w") as f:
            json.dump({"Data": {"PodDeviceEntries": [
                {"PodUID": "uid-fwd", "ContainerName": "forwarder", "ResourceName": "windriver.com/isolcpus",
                 "DeviceIDs": {"0": ["6"]}, "AllocResp": ""}], "RegisteredDevices": {}}, "Checksum": 1}, f)
        report = plugin.find_holders(answer, None, directory, "windriver.com/isolcpus")
        self.assertEqual(len(report.by_cpu[6]), 7)                  # every holder stays in the report
        samples = self.allocated_samples(report)
        self.assertEqual(len(samples), plugin.MAX_HOLDER_SAMPLES)
        self.assertEqual(samples[0], ("dpdk-fwd-0", "forwarder"))
        # no checkpoint: the kubelet's order, still bounded
        report = plugin.find_holders(answer, None, os.path.join(directory, "absent"), "windriver.com/isolcpus")
        self.assertEqual(self.allocated_samples(report)[0], ("old-0", "c"))

    def test_metrics_name_the_running_holder_first(self):
        old = [plugin.Holder("batch", "old-%d" % i, "forwarder", None, "pod-resources") for i in range(6)]
        live = plugin.Holder("net", "dpdk-fwd-0", "forwarder", None, "pod-resources")
        # every holder has the container name the checkpoint names: only the runtime can tell
        by_cpu = plugin.running_first({6: tuple(old) + (live,)}, {6: {"forwarder"}}, {"net/dpdk-fwd-0/forwarder"})
        self.assertEqual(by_cpu[6][0], live)
        self.assertEqual(by_cpu[6][1:], tuple(old))                 # the others in the kubelet's order
        samples = self.allocated_samples(plugin.HolderReport(by_cpu, "pod-resources", ()))
        self.assertEqual(samples[0], ("dpdk-fwd-0", "forwarder"))
        # from the checkpoint, the runtime names pods by UID
        a, b = (plugin.Holder(None, None, "c", uid, "checkpoint") for uid in ("u-old", "u-live"))
        self.assertEqual(plugin.running_first({6: (a, b)}, None, {"u-live/c"}), {6: (b, a)})


@needs_grpc
class WorkBoundTests(PodResourcesRig):
    """Inputs within every byte bound whose work once froze the event loop."""

    def probe_while(self, port, busy, probes=20, timeout=1.0):
        """/healthz `probes` times, `timeout` each (an httpGet probe's
        default), while busy() runs in a thread: the failures."""
        thread = threading.Thread(target=busy, daemon=True)
        thread.start()
        failures = []
        for _ in range(probes):
            try:
                status = http_get(port, "/healthz", timeout=timeout)[0]
                if status != 200:
                    failures.append(status)
            except OSError as e:                      # socket.timeout, URLError
                failures.append(one_line_of(e))
            time.sleep(0.05)
        thread.join(30)
        return failures

    def test_a_pod_resources_answer_naming_one_cpu_50000_times_does_not_freeze_the_plugin(self):
        self.kubelet.pod_resources_extra = many_pods_holding(50000)
        self.assertLess(len(self.kubelet.pod_resources_extra), 4 << 20)    # 2.3 MB: under grpc's bound
        process = self.registered_plugin("--metrics-address", "127.0.0.1:0")
        port = metrics_port(process)

        def scrape():
            for _ in range(3):
                status, body = http_get(port, "/metrics", timeout=30)
                self.assertEqual(status, 200)
                time.sleep(1.1)                           # each scrape a new question
        self.assertEqual(self.probe_while(port, scrape), [])
        self.kubelet.restart()                            # re-registering does not wait behind it either
        self.kubelet.wait_registered(2, timeout=5)
        started = time.monotonic()
        self.assertEqual(process.stop(signal.SIGTERM), 0)
        self.assertLess(time.monotonic() - started, 2.0)

    def test_healthz_never_waits_behind_metrics_or_slow_clients(self):
        self.kubelet.pod_resources_mode = "hang"
        process = self.registered_plugin("--metrics-address", "127.0.0.1:0")
        port = metrics_port(process)
        slow = []
        for _ in range(16):                                # slowloris: connected, never finishing a request
            client = socket.create_connection(("127.0.0.1", port))
            client.send(b"GET /metr")
            slow.append(client)
        self.addCleanup(lambda: [client.close() for client in slow])

        def scrape():
            try:
                http_get(port, "/metrics", timeout=10)
            except OSError:                                # closed for a newer connection
                pass

        def scrapers():                                    # 16 scrapes waiting on a hung PodResources
            threads = [threading.Thread(target=scrape, daemon=True) for _ in range(16)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(15)
        self.assertEqual(self.probe_while(port, scrapers), [])
        self.assertIsNone(process.proc.poll())

    def test_metrics_count_only_the_devices_served(self):
        self.kubelet.pod_resources_extra = pb_field(1, encode_pod("many", "x", [encode_container(
            "c", [("windriver.com/isolcpus", [str(i) for i in range(100000)])])]))
        process = self.registered_plugin("--metrics-address", "127.0.0.1:0")
        status, body = http_get(metrics_port(process), "/metrics", timeout=30)
        samples = [line for line in body.splitlines() if line.startswith("isolcpu_device_allocated{")]
        self.assertEqual(sorted(re.search(r'cpu="(\d+)"', line).group(1) for line in samples), ["2", "3", "6", "7"])
        self.assertLess(len(body), 20000)

    def test_a_pod_resources_answer_that_does_not_parse_is_said_so(self):
        self.kubelet.pod_resources_mode = "garbage"
        process = self.registered_plugin()
        process.wait_log("cannot be named by PodResources")
        log_text = process.log()
        self.assertNotIn("PodResources is off", log_text)
        line = [l for l in log_text.splitlines() if "cannot be named by PodResources" in l][0]
        self.assertIn("not a ListPodResourcesResponse", line)
        self.assertIn(" WARNING ", line)
        result = self.list_cli("--pod-resources-socket", self.kubelet.pod_resources_socket)
        self.assertIn("not a ListPodResourcesResponse", result.stdout.splitlines()[0])


# ---------------------------------------------------------------------------
# The runtime side (NRI)
# ---------------------------------------------------------------------------

class NriCodecTests(unittest.TestCase):
    """The mux and ttrpc codecs, without sockets, against frames written
    here from NRI.md (mux_frame and ttrpc_message of the fake runtime)."""

    def test_frames_and_messages_split_at_every_byte_and_packed_together(self):
        messages = [(1, 1, 0, b"first"), (3, 1, 0, b""), (5, 2, 0, bytes(range(256)) * 20)]
        wire = b"".join(mux_frame(1, ttrpc_message(stream, kind, payload, flags))
                        for stream, kind, flags, payload in messages)
        for pieces in ([wire], [wire[i:i + 1] for i in range(len(wire))], [wire[:9], wire[9:4000], wire[4000:]]):
            mux, ttrpc = plugin.MuxReader(), plugin.TtrpcReader()
            got = []
            for piece in pieces:
                for conn, payload in mux.feed(piece):
                    self.assertEqual(conn, 1)
                    got.extend(ttrpc.feed(payload))
            self.assertEqual(got, messages)
        # one ttrpc message across mux frames of any size
        message = ttrpc_message(7, 1, b"x" * 10000)
        ttrpc = plugin.TtrpcReader()
        got = []
        for i in range(0, len(message), 777):
            got.extend(ttrpc.feed(message[i:i + 777]))
        self.assertEqual(got, [(7, 1, 0, b"x" * 10000)])

    def test_what_is_sent_is_in_frames_of_at_most_4096_bytes(self):
        for size in (0, 1, 4088, 4089, 100000):
            data = bytes(random.Random(size).getrandbits(8) for _ in range(size))
            wire = plugin.mux_frames(2, data)
            mux = plugin.MuxReader()
            frames = mux.feed(wire)
            self.assertEqual(b"".join(payload for _, payload in frames), data)
            self.assertTrue(all(conn == 2 and len(payload) + 8 <= 4096 for conn, payload in frames))
            self.assertEqual(mux.buffer, bytearray())
        self.assertEqual(plugin.ttrpc_message(3, 2, b"ab"), ttrpc_message(3, 2, b"ab"))

    def test_oversized_frames_and_messages_are_protocol_errors(self):
        with self.assertRaises(plugin.ProtocolError):
            plugin.MuxReader().feed(struct.pack(">II", 1, (4 << 20) + 11))
        self.assertEqual(plugin.MuxReader().feed(struct.pack(">II", 1, (4 << 20) + 10)), [])   # the bound itself
        with self.assertRaises(plugin.ProtocolError):
            plugin.TtrpcReader().feed(struct.pack(">IIBB", (4 << 20) + 1, 1, 1, 0))

    def test_reading_is_linear_in_the_bytes(self):
        def feed(count):
            wire = mux_frame(1, ttrpc_message(1, 1, b"")) * count
            mux, ttrpc = plugin.MuxReader(), plugin.TtrpcReader()
            for i in range(0, len(wire), 65536):             # as the connection reads
                for _, payload in mux.feed(wire[i:i + 65536]):
                    ttrpc.feed(payload)
        feed(1000)
        ratio = best_time(lambda: feed(80000)) / best_time(lambda: feed(10000))
        self.assertLess(ratio, 16, "x8 the frames took x%.1f the time" % ratio)


class NriRuleTests(unittest.TestCase):
    """The rule, cpuset = ((B - A) | H) & online, and the kubelet's records."""

    A = frozenset([2, 3, 6, 7])
    ONLINE = frozenset(range(8))

    def test_the_rule(self):
        rule = plugin.container_cpuset
        # a Guaranteed holder (static: exclusive 0,4) runs on those and on what it holds
        self.assertEqual(rule(frozenset([0, 4]), self.A, frozenset([6, 7]), self.ONLINE), {0, 4, 6, 7})
        # anyone else: B less the advertised CPUs; policy none (B unset): every online CPU less them
        self.assertEqual(rule(frozenset(range(8)), self.A, frozenset(), self.ONLINE), {0, 1, 4, 5})
        self.assertEqual(rule(None, self.A, frozenset(), self.ONLINE), {0, 1, 4, 5})
        self.assertEqual(rule(None, self.A, frozenset([3]), self.ONLINE - {1}), {0, 3, 4, 5})
        # the static policy granted an isolated CPU exclusively: nothing left
        self.assertEqual(rule(frozenset([2]), self.A, frozenset(), self.ONLINE), frozenset())
        self.assertEqual(plugin.granted_unheld(frozenset([2, 3]), self.A, frozenset([3]), self.ONLINE), {2})
        self.assertEqual(plugin.granted_unheld(None, self.A, frozenset([6, 7]), self.ONLINE - {2}), {3})

    def test_what_the_kubelet_wants(self):
        state = json.dumps({"policyName": "static", "defaultCpuSet": "0-1,4-5",
                            "entries": {"uid-a": {"app": "2-3"}}, "checksum": 7})
        record = plugin.kubelet_cpus(state, 7, 63)
        self.assertEqual(plugin.kubelet_wants(record, "uid-a", "app", "c1"), ({2, 3}, True))
        self.assertEqual(plugin.kubelet_wants(record, "uid-a", "sidecar", "c2"), ({0, 1, 4, 5}, False))
        old = plugin.kubelet_cpus(json.dumps({"policyName": "static", "defaultCpuSet": "0-7",
                                              "entries": {"c3": "6"}}), 7, 63)
        self.assertEqual(plugin.kubelet_wants(old, "uid-b", "x", "c3"), ({6}, True))
        none = plugin.kubelet_cpus(json.dumps({"policyName": "none", "defaultCpuSet": ""}), 7, 63)
        self.assertEqual(plugin.kubelet_wants(none, "uid-a", "app", "c1"), (None, False))
        for bad in ("", "{}", '{"policyName": "static", "defaultCpuSet": "0-x"}', "[" * 100000,
                    '{"policyName": "static", "entries": {"u": {"c": "5-"}}}', '{"policyName": "static", '
                    '"defaultCpuSet": "0-99999"}'):
            with self.assertRaises(ValueError):
                plugin.kubelet_cpus(bad, 7, 63)

    def test_what_the_checkpoint_says_each_container_holds(self):
        text = json.dumps({"Data": {"PodDeviceEntries": [
            {"PodUID": "u1", "ContainerName": "init", "ResourceName": "windriver.com/isolcpus",
             "DeviceIDs": {"0": ["2"], "1": ["6"]}},
            {"PodUID": "u1", "ContainerName": "app", "ResourceName": "windriver.com/isolcpus", "DeviceIDs": ["2", "x"]},
            {"PodUID": "u2", "ContainerName": "nic", "ResourceName": "example.com/nic", "DeviceIDs": ["3"]}]}})
        self.assertEqual(plugin.checkpoint_grants(text, "windriver.com/isolcpus"),
                         {("u1", "init"): {2, 6}, ("u1", "app"): {2}})


@unittest.skipIf(grpc is None, "grpcio/protobuf not installed")
class NriWireTests(unittest.TestCase):
    """The NRI and ttrpc messages in deviceplugin.proto against the reference .proto files."""

    SCALARS = {"string": 9, "int64": 3, "uint64": 4, "int32": 5, "bool": 8, "bytes": 12, "uint32": 13}
    ENUMS = ("Event",)                           # declared int32 here: the same varint on the wire

    def test_every_field_the_plugin_uses_is_the_runtimes(self):
        nri, ttrpc = reference_proto("nri-v1alpha1.proto"), reference_proto("ttrpc.proto")
        if nri is None or ttrpc is None:
            self.skipTest("../shared/reference absent")
        self.assertEqual((nri[0], ttrpc[0]), ("nri.pkg.api.v1alpha1", "ttrpc"))
        # RemoveContainer is v0.12+'s (NRI.md 3), past the v0.6.1 reference: its request is
        # checked against NRI_CONTAINER_EVENT_REQUEST, written from NRI.md, and its answer is empty
        upstream_only = {"RemoveContainer": "RemoveContainerRequest"}
        self.assertEqual(sorted(plugin.NriSession.HANDLERS), sorted(set(nri[2]["Plugin"]) | set(upstream_only)))
        ours = pb.DESCRIPTOR.message_types_by_name
        request = ours["RemoveContainerRequest"]
        self.assertEqual({f.number: (f.name, f.message_type.name) for f in request.fields},
                         {1: ("pod", "PodSandbox"), 2: ("container", "Container")})
        self.assertEqual({number: name for number, (name, _) in NRI_CONTAINER_EVENT_REQUEST.items()},
                         {f.number: f.name for f in request.fields})
        self.assertEqual(list(ours["RemoveContainerResponse"].fields), [])
        used = {"RegisterPluginRequest", "UpdateContainersRequest", "UpdateContainersResponse", "Request", "Response"}
        used |= {request for method, (request, _) in plugin.NriSession.HANDLERS.items() if method not in upstream_only}
        used |= {"PodSandbox", "Container"}
        used |= {response for _, response in nri[2]["Plugin"].values()}
        pending, checked = sorted(used), set()
        while pending:
            name = pending.pop()
            if name in checked:
                continue
            checked.add(name)
            reference = (ttrpc if name in ("Request", "Response", "Status") else nri)[1]
            self.assertIn(name, reference, "%s is not an NRI or ttrpc message" % name)
            for field in ours[name].fields:
                with self.subTest(message=name, field=field.name):
                    number, kind, repeated = reference[name][field.name]
                    self.assertEqual(field.number, number)
                    self.assertEqual(field.is_repeated if hasattr(field, "is_repeated")
                                     else field.label == field.LABEL_REPEATED, repeated)
                    if kind in self.SCALARS or kind in self.ENUMS:
                        self.assertEqual(field.type, self.SCALARS.get(kind, self.SCALARS["int32"]))
                    else:
                        self.assertEqual((field.type, field.message_type.name), (field.TYPE_MESSAGE, kind))
                        pending.append(kind)
        self.assertTrue({"Container", "LinuxCPU", "ContainerUpdate", "ContainerAdjustment", "Status"} <= checked)

    def test_a_runtimes_request_decodes_and_unknown_fields_are_skipped(self):
        pod = nri_pod("dpdk-0", "net")
        container = nri_container(pod, "fwd", cpus="0,4", env=["ISOLCPUS=6-7"])
        request = pb.CreateContainerRequest.FromString(pb_encode(NRI_CREATE_CONTAINER_REQUEST,
                                                                 {"pod": pod, "container": container}))
        self.assertEqual((request.pod.uid, request.pod.namespace, request.container.name), (pod["uid"], "net", "fwd"))
        self.assertEqual(request.container.linux.resources.cpu.cpus, "0,4")
        self.assertIn("ISOLCPUS=6-7", list(request.container.env))


def write_json(path, data):
    write_files(os.path.dirname(path), {os.path.basename(path): json.dumps(data)})


@needs_grpc
class NriRig(TempDirTest):
    """A fake host of 8 CPUs (2 sockets x 2 cores x 2 threads, 2-3,6-7
    isolated), the kubelet's device checkpoint and CPU manager record, a
    FakeNriRuntime, and plugin processes with --nri on. The pods: `holder`
    (net/dpdk-0, Guaranteed: exclusive 0,4, holds 6-7 as container fwd) and
    `web` (shop/web-0, in the shared pool 0-7)."""

    def setUp(self):
        super().setUp()
        self.host = os.path.join(self.tmp, "host")
        self.sysfs, self.procfs = fake_host(self.host, sockets=2, cores=2, isolated="2-3,6-7")
        self.dir = os.path.join(self.tmp, "device-plugins")
        self.kubelet_dir = os.path.join(self.tmp, "kubelet")
        os.makedirs(self.dir)
        os.makedirs(self.kubelet_dir)
        self.holder, self.web = nri_pod("dpdk-0", "net"), nri_pod("web-0", "shop")
        self.holdings = {(self.holder["uid"], "fwd"): ["6", "7"]}
        self.exclusive = {self.holder["uid"]: {"fwd": "0,4"}}
        self.write_checkpoint()
        self.write_cpu_record()
        self.runtime = FakeNriRuntime(os.path.join(self.tmp, "nri", "nri.sock"))
        self.addCleanup(self.runtime.stop)

    @property
    def checkpoint_path(self):
        return os.path.join(self.dir, "kubelet_internal_checkpoint")

    def write_checkpoint(self):
        write_json(self.checkpoint_path, {"Data": {"PodDeviceEntries": [
            {"PodUID": uid, "ContainerName": container, "ResourceName": "windriver.com/isolcpus",
             "DeviceIDs": {"0": ids}, "AllocResp": ""} for (uid, container), ids in self.holdings.items()],
            "RegisteredDevices": {}}, "Checksum": 0})

    def write_cpu_record(self, policy="static", shared="0-7"):
        write_json(os.path.join(self.kubelet_dir, "cpu_manager_state"),
                   {"policyName": policy, "defaultCpuSet": shared, "entries": self.exclusive, "checksum": 1})

    def start_plugin(self, *extra, nri="on", env=None):
        args = ["--sysfs", self.sysfs, "--procfs", self.procfs, "--device-plugin-path", self.dir,
                "--pod-resources-socket", "off", "--kubelet-dir", self.kubelet_dir, "--nri", nri,
                "--nri-socket", self.runtime.path, "--rescan-interval", "0.2", "--log-level", "debug"] + list(extra)
        process = PluginProcess(self.tmp, args, env)
        self.addCleanup(process.stop, signal.SIGKILL)
        return process

    def connected_plugin(self, *extra):
        self.runtime.start()
        process = self.start_plugin(*extra)
        self.runtime.wait_ready(timeout=10)
        return process

    def fwd(self, cpus="0,4", env=("ISOLCPUS=6-7",), **options):
        return nri_container(self.holder, "fwd", cpus=cpus, env=env, **options)

    def app(self, name="app", cpus="0-7", env=(), **options):
        return nri_container(self.web, name, cpus=cpus, env=env, **options)

    def assert_clean_log(self, process):
        self.assertNotIn("Traceback", process.log())
        self.assertNotIn("internal error", process.log())


class NriTests(NriRig):
    """The plugin as an NRI plugin, against FakeNriRuntime over a real unix socket."""

    def test_holder_others_and_a_spoofer_at_creation(self):
        process = self.connected_plugin()
        registration = self.runtime.registrations[0]
        self.assertEqual((registration["plugin_name"], registration["plugin_idx"]), ("isolcpu-plugin", "90"))
        self.assertEqual(self.runtime.configures[0]["events"], nri_event_mask(4, 8, 10, 11))
        self.assertEqual(self.runtime.create_container(self.holder, self.fwd()).cpus, "0,4,6-7")
        self.assertEqual(self.runtime.create_container(self.web, self.app()).cpus, "0-1,4-5")
        spoofed = self.runtime.create_container(self.web, self.app("spoof", env=["ISOLCPUS=2-3"]))
        self.assertEqual(spoofed.cpus, "0-1,4-5")
        process.wait_log("'shop/web-0/spoof' sets $ISOLCPUS but holds no windriver.com/isolcpus")
        # one line per adjustment, before -> after
        self.assertIn("NRI: 'net/dpdk-0/fwd' cpuset 0,4 -> 0,4,6-7; holds 6-7", process.log())
        self.assertIn("NRI: 'shop/web-0/app' cpuset 0-7 -> 0-1,4-5", process.log())
        # a container the plugin has no business with is left as it is, and never an error
        self.write_cpu_record(shared="0-1,4-5")
        plain = self.runtime.create_container(self.web, self.app("plain", cpus="0-1,4-5"))
        self.assertEqual((plain.outcome, plain.cpus, plain.response["adjust"]), ("ok", "0-1,4-5", None))
        self.assertEqual([reply.outcome for reply in self.runtime.calls if reply.method == "CreateContainer"],
                         ["ok"] * 4)
        self.assert_clean_log(process)

    def test_policy_none_every_cpu_but_the_advertised_ones(self):
        self.exclusive = {}
        self.write_cpu_record(policy="none", shared="")
        self.connected_plugin()
        self.assertEqual(self.runtime.create_container(self.holder, self.fwd(cpus="")).cpus, "0-1,4-7")
        self.assertEqual(self.runtime.create_container(self.web, self.app(cpus="")).cpus, "0-1,4-5")

    def test_synchronize_split_in_chunks_with_more(self):
        self.runtime.pods = collections.OrderedDict((p["id"], p) for p in (self.holder, self.web))
        running = [self.fwd(), self.app(), self.app("stopped", state=NRI_CONTAINER_STOPPED), self.app("b")]
        self.runtime.containers = collections.OrderedDict((c["id"], c) for c in running)
        self.runtime.sync_chunk = 1
        process = self.connected_plugin()
        self.assertGreater(len(self.runtime.syncs[0]), 2)               # the fake checks `more` is echoed
        updates = {u["container_id"]: nri_cpus(u) for u in self.runtime.sync_updates[0]}
        self.assertEqual(updates, {running[0]["id"]: "0,4,6-7", running[1]["id"]: "0-1,4-5",
                                   running[3]["id"]: "0-1,4-5"})
        self.assertTrue(all(u["ignore_failure"] for u in self.runtime.sync_updates[0]))
        self.assertEqual(self.runtime.cpuset(running[2]["id"]), "0-7")
        process.wait_log("synchronized 4 containers: 3 adjusted")

    def test_updates_from_the_kubelet_are_rewritten_and_a_resize_is_left_alone(self):
        self.connected_plugin()
        fwd, app = self.fwd(), self.app()
        self.runtime.create_container(self.holder, fwd)
        self.runtime.create_container(self.web, app)
        # the kubelet's CPU manager moves the shared pool (it wrote its record first)
        self.write_cpu_record(shared="0-3,6-7")
        reply = self.runtime.update_container(self.web, app, nri_linux_resources("0-3,6-7"))
        self.assertEqual((reply.outcome, reply.cpus), ("ok", "0-1"))
        self.assertEqual(len(reply.response["update"]), 1)
        # an in-place resize: shares and quota only
        resize = nri_linux_resources("", shares=2048, quota=200000)
        reply = self.runtime.update_container(self.holder, nri_with_cpus(fwd, "0,4,6-7"), resize)
        self.assertEqual((reply.outcome, reply.response["update"]), ("ok", []))
        self.assertEqual(self.runtime.cpuset(fwd["id"]), "0,4,6-7")

    def test_running_containers_follow_the_isolated_and_online_cpus(self):
        process = self.connected_plugin()
        fwd, app = self.fwd(), self.app()
        self.runtime.create_container(self.holder, fwd)
        self.runtime.create_container(self.web, app)
        write_files(self.host, {"sys/devices/system/cpu/isolated": "2-3,6\n"})      # 7 leaves the isolated set
        request = self.runtime.wait_update_requests(1)
        self.assertEqual({u["container_id"]: nri_cpus(u) for u in request["update"]}, {app["id"]: "0-1,4-5,7"})
        self.assertTrue(all(u["ignore_failure"] for u in request["update"]))
        self.assertEqual(self.runtime.cpuset(fwd["id"]), "0,4,6-7")    # its B is 0,4; it holds 6-7
        write_files(self.host, {"sys/devices/system/cpu/online": "0-4,6-7\n"})        # 5 goes offline
        request = self.runtime.wait_update_requests(2)
        self.assertEqual({u["container_id"]: nri_cpus(u) for u in request["update"]}, {app["id"]: "0-1,4,7"})
        write_files(self.host, {"sys/devices/system/cpu/online": "0-7\n"})
        self.runtime.wait(lambda: self.runtime.cpuset(app["id"]) == "0-1,4-5,7", 5, "CPU 5 back")
        self.assert_clean_log(process)

    def test_a_holder_created_before_its_checkpoint_entry_is_repaired(self):
        self.holdings = {}
        self.write_checkpoint()
        process = self.connected_plugin()
        fwd = self.fwd()
        self.assertEqual(self.runtime.create_container(self.holder, fwd).cpus, "0,4")   # taken for a spoofer
        self.holdings = {(self.holder["uid"], "fwd"): ["6", "7"]}
        self.write_checkpoint()                                           # the kubelet's entry, late
        request = self.runtime.wait_update_requests(1)
        self.assertEqual({u["container_id"]: nri_cpus(u) for u in request["update"]}, {fwd["id"]: "0,4,6-7"})
        self.assertIsNone(process.proc.poll())

    def test_a_holder_created_right_after_its_entry_is_no_spoofer(self):
        self.connected_plugin()
        for i in range(20):                         # each entry written just before its container is created
            name = "fwd-%d" % i
            self.holdings[(self.holder["uid"], name)] = ["2"]
            self.exclusive[self.holder["uid"]][name] = "0,4"
            self.write_cpu_record()
            self.write_checkpoint()
            container = nri_container(self.holder, name, cpus="0,4", env=["ISOLCPUS=2"])
            self.assertEqual(self.runtime.create_container(self.holder, container).cpus, "0,2,4", name)

    def test_a_missing_or_unreadable_checkpoint_leaves_claimants_as_the_kubelet_asked(self):
        os.unlink(self.checkpoint_path)
        os.mkfifo(self.checkpoint_path)             # would block a plain open()
        process = self.connected_plugin()
        reply = self.runtime.create_container(self.holder, self.fwd())
        self.assertEqual((reply.outcome, reply.cpus), ("ok", "0,4"))
        self.assertLess(reply.seconds, 1.0)
        self.assertEqual(self.runtime.create_container(self.web, self.app()).cpus, "0-1,4-5")   # no claim: no lookup
        self.assertEqual(self.runtime.create_container(self.holder, self.fwd(cpus="0,4", container_id="f2")).cpus,
                         "0,4")
        lines = [l for l in process.log().splitlines() if "checkpoint cannot be read" in l and " DEBUG " not in l]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("not a regular file", lines[0])
        os.unlink(self.checkpoint_path)
        self.write_checkpoint()                      # readable again: repaired
        self.runtime.wait(lambda: self.runtime.cpuset(self.fwd()["id"]) == "0,4,6-7", 5, "the holder repaired")
        process.wait_log("resolved after")

    def test_without_the_kubelets_cpu_record_the_rule_applies_to_what_containers_have(self):
        os.unlink(os.path.join(self.kubelet_dir, "cpu_manager_state"))
        fwd, app = self.fwd(cpus="0,4,6-7"), self.app(cpus="0-1,4-5")     # as the plugin left them
        self.runtime.pods = collections.OrderedDict((p["id"], p) for p in (self.holder, self.web))
        self.runtime.containers = collections.OrderedDict((c["id"], c) for c in (fwd, app))
        process = self.connected_plugin()
        self.assertEqual(self.runtime.sync_updates[0], [])                # idempotent
        self.assertEqual(self.runtime.create_container(self.web, self.app("new")).cpus, "0-1,4-5")
        lines = [l for l in process.log().splitlines() if "CPU manager record cannot be read" in l and " INFO " in l]
        self.assertEqual(len(lines), 1, lines)

    def test_a_cpuset_another_plugin_changed_is_left_with_a_warning(self):
        process = self.connected_plugin()
        reply = self.runtime.create_container(self.web, self.app(cpus="0-5"))     # the kubelet wants 0-7
        self.assertEqual((reply.outcome, reply.cpus), ("ok", "0-5"))
        process.wait_log("another NRI plugin changed it")

    def test_an_isolated_cpu_granted_exclusively_to_another_container_is_warned(self):
        self.exclusive[self.web["uid"]] = {"crunch": "2"}
        self.write_cpu_record(shared="0-1,3-7")
        process = self.connected_plugin()
        reply = self.runtime.create_container(self.web, self.app("crunch", cpus="2"))
        self.assertEqual((reply.outcome, reply.cpus), ("ok", "2"))                # nothing else to run on: left
        process.wait_log("the kubelet gave 'shop/web-0/crunch' isolated CPUs 2, which it does not hold")

    def test_methods_it_does_not_implement_are_code_12_and_newer_runtimes_fall_back(self):
        process = self.connected_plugin()
        for method in ("RunPodSandbox", "PostCreateContainer", "ValidateContainerAdjustment"):
            reply = self.runtime.call(method, pb_encode(NRI_POD_EVENT_REQUEST, {"pod": self.web}))
            self.assertEqual((reply.outcome, reply.code), ("failed", GRPC_UNIMPLEMENTED), method)
        # RemoveContainer, a v0.12+ runtime's own call, is answered (containerd 2.3 warns of a
        # plugin that makes it fall back to the deprecated StateChange); v0.6-v0.11's StateChange still works
        old, new = self.app("old"), self.app("new")
        self.runtime.create_container(self.web, old)
        self.runtime.create_container(self.web, new)
        reply = self.runtime.remove_container(self.web, new, per_event_rpc=True)
        self.assertEqual((reply.outcome, reply.fallback), ("ok", False))
        reply = self.runtime.remove_container(self.web, old, per_event_rpc=False)
        self.assertEqual((reply.method, reply.outcome), ("StateChange", "ok"))
        write_files(self.host, {"sys/devices/system/cpu/isolated": "2-3,6\n"})   # a removed container is not updated
        time.sleep(1.0)
        self.assertEqual(self.runtime.update_requests, [])
        self.assertIsNone(process.proc.poll())

    def test_sigterm_while_connected_ends_without_an_error(self):
        process = self.connected_plugin()
        self.runtime.create_container(self.web, self.app())
        process.proc.send_signal(signal.SIGTERM)
        self.assertEqual(process.proc.wait(10), 0)
        self.assert_clean_log(process)          # was: "Task was destroyed but it is pending!" at ERROR
        self.assertNotIn(" ERROR ", process.log())

    def test_an_update_the_runtime_did_not_make_is_tried_again(self):
        self.runtime.failed_reply = "list"      # a runtime that says which updates failed
        process = self.connected_plugin()
        app = self.app()
        self.assertEqual(self.runtime.create_container(self.web, app).cpus, "0-1,4-5")
        self.runtime.failed_updates = {app["id"]}
        write_files(self.host, {"sys/devices/system/cpu/isolated": "2-3,6\n"})   # 7 leaves A: back to app
        self.runtime.wait_update_requests(1)
        process.wait_log("did not update 1 containers")
        self.assertEqual(self.runtime.cpuset(app["id"]), "0-1,4-5")
        self.runtime.failed_updates = set()
        self.runtime.wait(lambda: nri_cpus(self.runtime.containers[app["id"]]) == "0-1,4-5,7", 10,
                          "the failed update tried again")
        # and a runtime that keeps failing one is not asked for ever
        self.runtime.failed_updates = {app["id"]}
        write_files(self.host, {"sys/devices/system/cpu/isolated": "2-3\n"})
        process.wait_log("left as it is", timeout=30)
        count = len(self.runtime.update_requests)
        time.sleep(3)
        self.assertEqual(len(self.runtime.update_requests), count)
        self.assert_clean_log(process)

    def test_a_kubelet_update_is_judged_even_where_the_cpuset_before_did_not_parse(self):
        process = self.connected_plugin()
        app = self.app(cpus="0-")
        self.assertEqual(self.runtime.create_container(self.web, app).outcome, "ok")
        process.wait_log("has a cpuset that does not parse")
        reply = self.runtime.update_container(self.web, app, nri_linux_resources("0-7"))
        self.assertEqual((reply.outcome, reply.cpus), ("ok", "0-1,4-5"))

    def test_a_change_of_the_isolated_cpus_while_synchronizing_reaches_every_container(self):
        many = [self.app("app-%d" % i) for i in range(15000)]
        self.runtime.pods = collections.OrderedDict([(self.web["id"], self.web)])
        self.runtime.containers = collections.OrderedDict((c["id"], c) for c in many)
        self.runtime.sync_chunk = 3000
        self.runtime.request_timeout = 20.0     # this fake's encoding of 15 MB is part of it
        self.runtime.start()
        process = self.start_plugin()
        # CPU 7 leaves A, and SIGHUP rescans at once: once the plugin has settled the first of the
        # 15,000 containers (the lines of its adjustments are written every 50 ms)
        process.wait_log("NRI: 'shop/web-0/app-0' cpuset 0-7 -> 0-1,4-5", timeout=20)
        write_files(self.host, {"sys/devices/system/cpu/isolated": "2-3,6\n"})
        process.proc.send_signal(signal.SIGHUP)
        self.runtime.wait_ready(timeout=30)
        self.runtime.wait(lambda: all(nri_cpus(c) == "0-1,4-5,7" for c in self.runtime.containers.values()), 30,
                          "every container given CPU 7 back")
        self.assert_clean_log(process)

    def test_a_split_synchronize_has_a_bound(self):
        big = ["BLOB=" + "x" * (1 << 20)]                      # 1 MiB of environment each
        many = [self.app("app-%d" % i, env=big) for i in range(40)]
        self.runtime.pods = collections.OrderedDict([(self.web["id"], self.web)])
        self.runtime.containers = collections.OrderedDict((c["id"], c) for c in many)
        self.runtime.sync_chunk = 3                            # 3 MiB a message, 40 MiB in all
        self.runtime.start()
        process = self.start_plugin()
        process.wait_log("ended (protocol error: a Synchronize of more than 32 MiB: the plugin keeps out of this "
                         "runtime)", timeout=30)
        self.runtime.wait_closed(1, timeout=10)
        self.assertEqual(self.runtime.ready, 0)
        self.assertIsNone(process.proc.poll())
        self.assert_clean_log(process)

    def test_a_runtime_that_hangs_up_is_retried_with_backoff_whatever_its_directory_does(self):
        path = self.runtime.path
        os.makedirs(os.path.dirname(path))
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(path)
        listener.listen(64)
        listener.settimeout(0.05)
        accepted, stop = [], threading.Event()

        def hang_up():                          # a runtime in a crash loop: accepts, then closes
            while not stop.is_set():
                try:
                    connection, _ = listener.accept()
                except socket.timeout:
                    continue
                except OSError:                 # closed by the cleanup
                    return
                accepted.append(time.monotonic())
                connection.close()

        def churn():                            # and files come and go beside its socket
            for i in itertools.count():
                if stop.is_set():
                    return
                name = os.path.join(os.path.dirname(path), "churn-%d" % (i % 8))
                with open(name, "w"):
                    pass
                os.unlink(name)
                time.sleep(0.01)
        threads = [threading.Thread(target=hang_up, daemon=True), threading.Thread(target=churn, daemon=True)]
        for thread in threads:
            thread.start()
        self.addCleanup(stop.set)
        process = self.start_plugin()
        process.wait_log("NRI: the connection to")
        time.sleep(4.0)
        stop.set()
        # backoff 0.5, 1, 2, 4 s: 4 or 5 connections in 4 s (each directory event had cut it short: hundreds)
        self.assertLessEqual(len(accepted), 6, accepted)
        self.assertLessEqual(len([line for line in process.log().splitlines() if "WARNING" in line]), 4)
        self.assert_clean_log(process)

    def test_a_large_request_is_read_beside_the_loop(self):
        # 3.6 MB of environment in 900,000 variables, read in the worker thread: $ISOLCPUS is found
        # there as in a small request, for a spoofer and for a holder
        process = self.connected_plugin()
        spoofer = self.app("big", env=["a="] * 900000 + ["ISOLCPUS=2-3"])
        reply = self.runtime.create_container(self.web, spoofer)
        self.assertEqual((reply.outcome, reply.cpus), ("ok", "0-1,4-5"))
        process.wait_log("'shop/web-0/big' sets $ISOLCPUS but holds no")
        holder = self.fwd(env=["a="] * 900000 + ["ISOLCPUS=6-7"])
        reply = self.runtime.create_container(self.holder, holder)
        self.assertEqual((reply.outcome, reply.cpus), ("ok", "0,4,6-7"))
        self.assert_clean_log(process)

    def test_every_frame_to_the_runtime_is_at_most_4096_bytes(self):
        self.runtime.pods = collections.OrderedDict([(self.web["id"], self.web)])
        many = [self.app("app-%d" % i) for i in range(400)]
        self.runtime.containers = collections.OrderedDict((c["id"], c) for c in many)
        self.connected_plugin()
        self.assertEqual(len(self.runtime.sync_updates[0]), 400)         # ~40 KB of answer
        self.assertEqual(max(length for _, length in self.runtime.frames_received) + 8, 4096)
        write_files(self.host, {"sys/devices/system/cpu/isolated": "2-3\n"})
        self.runtime.wait(lambda: sum(len(r["update"]) for r in self.runtime.update_requests) == 400, 10,
                          "400 containers updated")
        self.assertLessEqual(max(length for _, length in self.runtime.frames_received) + 8, 4096)
        self.assertEqual(self.runtime.closes, [])

    def test_frames_split_at_every_byte(self):
        self.runtime.byte_writes = True
        self.runtime.pods = collections.OrderedDict([(self.web["id"], self.web)])
        self.runtime.containers = collections.OrderedDict([(self.app()["id"], self.app())])
        self.connected_plugin()
        self.assertEqual(self.runtime.create_container(self.holder, self.fwd()).cpus, "0,4,6-7")
        self.runtime.byte_writes = False
        self.runtime.frame_size = 7
        self.assertEqual(self.runtime.create_container(self.web, self.app("b")).cpus, "0-1,4-5")

    def test_garbage_oversized_and_hang_ups_drop_the_connection_never_the_plugin(self):
        process = self.connected_plugin()
        hostile = (self.runtime.send_raw, self.runtime.send_oversized_frame, self.runtime.send_oversized_message,
                   self.runtime.hang_up_mid_request,
                   lambda: self.runtime.send_frame(1, ttrpc_message(1, 1, b"\xff\xff\xff")))
        for count, send in enumerate(hostile, 2):
            send()
            self.runtime.wait_ready(count, timeout=15)                    # reconnected, registered afresh
            self.assertEqual(self.runtime.create_container(self.web, self.app("a-%d" % count)).cpus, "0-1,4-5")
        self.runtime.send_frame(9, b"a conn nobody uses")                 # dropped, as the Go mux does
        self.assertEqual(self.runtime.create_container(self.web, self.app("last")).cpus, "0-1,4-5")
        self.assertIsNone(process.proc.poll())
        self.assert_clean_log(process)
        ended = [l for l in process.log().splitlines() if " WARNING NRI: the connection to" in l]
        self.assertLessEqual(len(ended), 5, ended)

    def test_a_runtime_restart_is_a_new_registration_and_synchronize(self):
        process = self.connected_plugin()
        app = self.app()
        self.runtime.create_container(self.web, app)
        self.runtime.restart()
        started = time.monotonic()
        self.runtime.wait_ready(2, timeout=10)
        self.assertLess(time.monotonic() - started, 10)
        self.assertEqual(len(self.runtime.registrations), 2)
        self.assertEqual(self.runtime.create_container(self.holder, self.fwd()).cpus, "0,4,6-7")
        self.assertIsNone(process.proc.poll())

    def test_a_runtime_that_never_answers_update_containers_blocks_no_request(self):
        process = self.connected_plugin()
        self.runtime.hang_update_containers = True
        app = self.app()
        self.runtime.create_container(self.web, app)
        write_files(self.host, {"sys/devices/system/cpu/isolated": "2-3\n"})
        self.runtime.wait_update_requests(1)
        for i in range(5):                        # answered while UpdateContainers waits
            reply = self.runtime.create_container(self.web, self.app("more-%d" % i))
            self.assertEqual((reply.outcome, reply.cpus), ("ok", "0-1,4-7"))
            self.assertLess(reply.seconds, 1.0)
        process.wait_log("updating the cpusets of 1 containers failed", timeout=10)

    def test_a_cpuset_that_does_not_parse_is_left_alone(self):
        process = self.connected_plugin()
        reply = self.runtime.create_container(self.web, self.app(cpus="0-x"))
        self.assertEqual((reply.outcome, reply.cpus, reply.response["adjust"]), ("ok", "0-x", None))
        process.wait_log("has a cpuset that does not parse")
        self.assertEqual(self.runtime.create_container(self.web, self.app("b")).cpus, "0-1,4-5")

    def test_an_update_from_the_kubelet_supersedes_a_queued_one(self):
        self.runtime.pods = collections.OrderedDict([(self.web["id"], self.web)])
        apps = [self.app("app-%d" % i) for i in range(100)]
        self.runtime.containers = collections.OrderedDict((c["id"], c) for c in apps)
        self.connected_plugin()
        self.runtime.hang_update_containers = True
        write_files(self.host, {"sys/devices/system/cpu/isolated": "2-3\n"})       # 6-7 back to all 100
        first = self.runtime.wait_update_requests(1)
        queued = [c for c in apps if c["id"] not in {u["container_id"] for u in first["update"]}]
        self.assertTrue(queued, "every update went in the first call")
        self.runtime.hang_update_containers = False
        self.write_cpu_record(shared="0-5")                      # the kubelet moves the shared pool first
        reply = self.runtime.update_container(self.web, queued[0], nri_linux_resources("0-5"))
        self.assertEqual(reply.cpus, "0-1,4-5")
        second = self.runtime.wait_update_requests(2, timeout=15)  # after the first times out
        self.assertNotIn(queued[0]["id"], {u["container_id"] for u in second["update"]})

    def test_auto_waits_for_the_socket_and_says_so_once(self):
        process = self.start_plugin(nri="auto")
        process.wait_log("NRI: no runtime socket at")
        time.sleep(0.5)
        self.runtime.start()                         # the runtime comes up: seen through its directory
        self.runtime.wait_ready(timeout=5)
        lines = [l for l in process.log().splitlines() if "no runtime socket" in l and " DEBUG " not in l]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(" INFO ", lines[0])

    def test_on_without_a_socket_is_a_warning(self):
        process = self.start_plugin()
        process.wait_log("NRI: no runtime socket at")
        line = [l for l in process.log().splitlines() if "no runtime socket" in l][0]
        self.assertIn(" WARNING ", line)
        self.assertIn("--nri on", line)

    def test_off_connects_to_nothing(self):
        self.runtime.start()
        process = self.start_plugin(nri="off")
        process.wait_log("advertising windriver.com/isolcpus")
        time.sleep(1.0)
        self.assertEqual(self.runtime.accepted, 0)
        self.assertNotIn("NRI", process.log())

    def test_a_second_instance_never_connects(self):
        first = self.connected_plugin()
        second = self.start_plugin()
        self.assertEqual(second.proc.wait(10), 2)
        self.assertIn("another running instance", second.log())
        time.sleep(0.5)
        self.assertEqual(self.runtime.accepted, 1)
        self.assertIsNone(first.proc.poll())

    def test_metrics(self):
        process = self.connected_plugin("--metrics-address", "127.0.0.1:0")
        port = metrics_port(process)
        self.runtime.create_container(self.web, self.app())
        self.runtime.create_container(self.web, self.app("spoof", env=["ISOLCPUS=2"]))
        body = http_get(port, "/metrics")[1]
        self.assertIn('isolcpu_nri_connected{resource="windriver.com/isolcpus"} 1', body)
        self.assertIn('isolcpu_nri_adjustments_total{resource="windriver.com/isolcpus"} 2', body)
        self.assertIn('isolcpu_nri_refused_claims_total{resource="windriver.com/isolcpus"} 1', body)
        self.runtime.stop()
        deadline = time.monotonic() + 5
        while "nri_connected{resource=\"windriver.com/isolcpus\"} 0" not in http_get(port, "/metrics")[1]:
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.1)

    def test_with_nri_the_checkpoint_names_the_container_that_runs(self):
        self.holdings = {(self.holder["uid"], "setup"): ["6"], (self.holder["uid"], "fwd"): ["6", "7"]}
        self.write_checkpoint()
        setup = nri_container(self.holder, "setup", cpus="0,4", env=["ISOLCPUS=6"], state=NRI_CONTAINER_STOPPED)
        self.runtime.pods = collections.OrderedDict([(self.holder["id"], self.holder)])
        self.runtime.containers = collections.OrderedDict((c["id"], c) for c in (setup, self.fwd()))
        process = self.connected_plugin()
        write_files(self.host, {"sys/devices/system/cpu/online": "0-5,7\n"})      # CPU 6 goes offline
        process.wait_log("CPUs 6 are offline or no longer isolated but allocated")
        line = [l for l in process.log().splitlines() if "CPUs 6 are offline" in l][0]
        self.assertIn("6 to '%s/fwd'" % self.holder["uid"], line)
        self.assertNotIn("setup", line)
        self.assertNotIn("init or app", line)

    def test_bad_nri_flags_are_one_line(self):
        for flags, why in ((["--nri", "yes"], "expected one of off, auto, on"),
                           (["--nri-index", "5"], "two digits"), (["--nri-socket", "/" + "n" * 120], "longer")):
            with self.subTest(flags=flags):
                process = self.start_plugin(*flags)
                self.assertEqual(process.proc.wait(30), 2)
                self.assertEqual(len(process.log().strip().splitlines()), 1, process.log())
                self.assertIn(why, process.log())


# ---------------------------------------------------------------------------
# The node audit (--doctor)
# ---------------------------------------------------------------------------

GOOD_CMDLINE = ("BOOT_IMAGE=/vmlinuz root=/dev/sda1 isolcpus=domain,managed_irq,2-7,10-15 nohz_full=2-7,10-15 "
                "rcu_nocbs=2-7,10-15 irqaffinity=0-1,8-9 kthread_cpus=0-1,8-9")
GOOD_KUBELET_CONFIG = """apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# the layout that works with an unpatched kubelet
cpuManagerPolicy: static
reservedSystemCPUs: "0-1,8-9,2-7,10-15"
topologyManagerPolicy: best-effort
cpuManagerPolicyOptions:
  full-pcpus-only: "true"
evictionHard:
  memory.available: 100Mi
"""


def fake_node(root, cmdline=GOOD_CMDLINE, kubelet_config=GOOD_KUBELET_CONFIG, cpu_manager_state=None):
    """A well-configured node where every host check of --doctor passes: two
    sockets x 4 cores x 2 threads (core c: CPUs c and c+8), CPUs 2-7,10-15
    isolated as whole cores, 0-1,8-9 for housekeeping; IRQs, workqueues and a
    kubelet (pid 4242) on housekeeping CPUs; cgroup v2, with one running
    container (a shell, pid 5001) on housekeeping CPUs; the kubelet dir with
    cpu_manager_state and config.yaml, a device checkpoint with no holders,
    the runtime's NRI socket. Returns the doctor's path flags."""
    web = pod_uid("shop", "web-0")
    web_cgroup = "sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod%s.slice/" % (
        web.replace("-", "_"))
    sysfs, procfs = fake_host(root, sockets=2, cores=4, isolated="2-7,10-15", cmdline=cmdline, extra={
        "sys/devices/system/cpu/nohz_full": "2-7,10-15\n",
        "sys/devices/virtual/workqueue/cpumask": "0303\n",
        "sys/fs/cgroup/cgroup.controllers": "cpuset cpu io memory pids\n",
        "sys/fs/cgroup/cpuset.cpus.isolated": "2-7,10-15\n",
        "proc/irq/default_smp_affinity": "0303\n",
        "proc/irq/0/smp_affinity_list": "0\n",
        "proc/irq/24/effective_affinity_list": "1\n", "proc/irq/24/smp_affinity_list": "0-1,8-9\n",
        "proc/irq/25/effective_affinity_list": "8\n", "proc/irq/25/smp_affinity_list": "0-1,8-9\n",
        "proc/interrupts": "".join(["      " + " ".join("CPU%d" % c for c in range(16)) + "\n",
                                   "  0: " + " 0" * 16 + "  IO-APIC   2-edge      timer\n",
                                   " 24: " + " 7" * 16 + "  IR-PCI-MSI 524288-edge  nvme0q1\n",
                                   " 25: " + " 3" * 16 + "  IR-PCI-MSI 1048576-edge  eth0-TxRx-0\n",
                                   "LOC: " + " 9" * 16 + "  Local timer interrupts\n"]),
        "proc/4242/comm": "kubelet\n",
        "proc/4242/task/4242/status": "Name:\tkubelet\nCpus_allowed_list:\t0-1,8-9\n",
        "proc/4242/task/4250/status": "Name:\tkubelet\nCpus_allowed_list:\t0-1,8-9\n",
        "host-root/var/lib/kubelet/config.yaml": kubelet_config,
        "kubelet/cpu_manager_state": cpu_manager_state or json.dumps(
            {"policyName": "static", "defaultCpuSet": "0-15", "checksum": 1}),
        web_cgroup + "cri-containerd-4e1a.scope/cpuset.cpus.effective": "0-1,8-9\n",
        web_cgroup + "cri-containerd-4e1a.scope/cgroup.procs": "5001\n",
        "proc/5001/comm": "sh\n",
        "device-plugins/kubelet_internal_checkpoint": json.dumps(
            {"Data": {"PodDeviceEntries": [], "RegisteredDevices": {}}, "Checksum": 0}),
    })
    nri_socket = os.path.join(root, "run", "nri", "nri.sock")
    os.makedirs(os.path.dirname(nri_socket))
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(nri_socket)                        # the file stays: the doctor only looks at it
    listener.close()
    with open(os.path.join(procfs, "4242", "cmdline"), "wb") as f:
        f.write(b"/usr/bin/kubelet\0--config=/var/lib/kubelet/config.yaml\0--v=2\0")
    os.symlink(os.path.join(root, "host-root"), os.path.join(procfs, "4242", "root"))
    return ["--sysfs", sysfs, "--procfs", procfs, "--kubelet-dir", os.path.join(root, "kubelet"),
            "--device-plugin-path", os.path.join(root, "device-plugins"), "--pod-resources-socket", "off",
            "--nri-socket", nri_socket]


def run_doctor(flags, *extra):
    """--doctor --json as a process: (exit code, {check id: check}, stderr)."""
    result = subprocess.run([sys.executable, PLUGIN, "--doctor", "--json"] + list(flags) + list(extra),
                            env=plugin_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=120)
    checks = collections.OrderedDict((c["id"], c) for c in json.loads(result.stdout)["checks"]) \
        if result.stdout.startswith("{") else {}
    return result.returncode, checks, result.stderr


DOCTOR_CHECKS = ["isolated", "isolcpus-flags", "smt-siblings", "core-kinds", "nohz-full", "rcu-nocbs", "irq-affinity",
                 "cpu-manager", "kubelet-config", "cgroup-isolated", "housekeeping", "plugin", "pod-cgroups",
                 "housekeeping-masks", "exclusive", "nri"]


class DoctorUnitTests(unittest.TestCase):
    """The audit's pure readers of kubelet and kernel formats."""

    def test_kubelet_config_subset_of_yaml(self):
        values = plugin.kubelet_config_values(GOOD_KUBELET_CONFIG)
        self.assertEqual((values["cpuManagerPolicy"], values["reservedSystemCPUs"], values["topologyManagerPolicy"]),
                         ("static", "0-1,8-9,2-7,10-15", "best-effort"))
        self.assertEqual(values["cpuManagerPolicyOptions"], {"full-pcpus-only": "true"})
        cases = {
            "cpuManagerPolicy: 'static'  # quoted, commented": "static",
            'cpuManagerPolicy: "none"': "none",
            "cpuManagerPolicy: static #x": "static",
            "cpuManagerPolicy: &anchor static": plugin.UNREADABLE,
            "cpuManagerPolicy: [a, b]": plugin.UNREADABLE,
            "cpuManagerPolicy: |\n  static": plugin.UNREADABLE,
            'cpuManagerPolicy: "st\\u0061tic"': plugin.UNREADABLE,
        }
        for text, expected in cases.items():
            with self.subTest(text=text):
                self.assertEqual(plugin.kubelet_config_values(text)["cpuManagerPolicy"], expected)
        flow = plugin.kubelet_config_values('cpuManagerPolicyOptions: {strict-cpu-reservation: "true", a: b}')
        self.assertEqual(flow["cpuManagerPolicyOptions"], {"strict-cpu-reservation": "true", "a": "b"})
        nested = plugin.kubelet_config_values("cpuManagerPolicyOptions:\n  deep:\n    x: y\n")
        self.assertIs(nested["cpuManagerPolicyOptions"], plugin.UNREADABLE)
        listed = plugin.kubelet_config_values("cpuManagerPolicyOptions:\n  - a\n")
        self.assertIs(listed["cpuManagerPolicyOptions"], plugin.UNREADABLE)
        two_docs = plugin.kubelet_config_values("cpuManagerPolicy: static\n---\ncpuManagerPolicy: none\n")
        self.assertEqual(two_docs["cpuManagerPolicy"], "static")
        self.assertNotIn("memory.available", plugin.kubelet_config_values(GOOD_KUBELET_CONFIG))
        as_json = plugin.kubelet_config_values(json.dumps({"cpuManagerPolicy": "static", "reservedSystemCPUs": "0-1",
                                                           "cpuManagerPolicyOptions": {"strict-cpu-reservation": True}}))
        self.assertEqual((as_json["cpuManagerPolicy"], as_json["cpuManagerPolicyOptions"]),
                         ("static", {"strict-cpu-reservation": "true"}))

    def test_cpu_manager_state_in_both_formats(self):
        uid = pod_uid("net", "dpdk-fwd-0")
        new = plugin.cpu_manager_state(json.dumps({"policyName": "static", "defaultCpuSet": "0-1,4-15",
                                                   "entries": {uid: {"fwd": "2-3"}}, "checksum": 1}))
        self.assertEqual(new, ("static", "0-1,4-15", {(uid, "fwd"): "2-3"}, False))
        old = plugin.cpu_manager_state(json.dumps({"policyName": "static", "defaultCpuSet": "0-1",
                                                   "entries": {"3f9c0aa1e5b7": "2-3"}}))
        self.assertEqual(old, ("static", "0-1", {(None, "3f9c0aa1e5b7"): "2-3"}, True))
        for bad in ("", "{}", "[]", '{"policyName": "static", "entries": 5}', "{" * 100000):
            with self.subTest(bad=bad[:20]):
                self.assertRaises(ValueError, plugin.cpu_manager_state, bad)

    def test_cpu_manager_state_costs_its_bytes_not_its_cpus(self):
        # one 50 KB state of 2,000 grants of 0-8191 took 6 s and 1.5 GB: a
        # set of 8,192 CPUs per grant; as many grants of 0-1 take a few ms
        facts = plugin.NodeFacts()
        facts.last_cpu = facts.max_cpu = 8191
        facts.isolated = frozenset(range(2, 8192))
        facts.checkpoint_path = "device-plugins/kubelet_internal_checkpoint"
        facts.checkpoint = plugin.HolderReport({5: (plugin.Holder(None, None, "app", "u7", "checkpoint"),)},
                                               "checkpoint", ())
        facts.pod_cgroups = {}

        def state(cpus, grants=2000):
            entries = {"u%d" % i: {"app": cpus} for i in range(grants)}
            return plugin.FileRead("cpu_manager_state", json.dumps(
                {"policyName": "static", "defaultCpuSet": "0-1", "entries": entries}), None)

        def cost(cpus):
            facts.cpu_manager_state = state(cpus)
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                finding = plugin.check_cpu_manager(facts)
                best = min(best, time.perf_counter() - started)
            return best, finding
        wide, finding = cost("0-8191")
        self.assertEqual(finding.status, "FAIL")
        self.assertIn("the CPU manager gave isolated CPUs 2-8191 exclusively to pod UID u0 container 'app'",
                      finding.found)
        self.assertIn("(+1995 more such grants)", finding.found)
        self.assertEqual(finding.cpus, "2-8191")
        narrow, finding = cost("0-1")
        self.assertEqual(finding.found, "policy static, shared pool 0-1; holders from the kubelet's checkpoint: pod "
                                        "UID u7 container 'app' holds CPUs 5 of the plugin but its cpuset is 0-1")
        self.assertLess(wide / narrow, 8)

    def test_many_rcu_nocbs_cost_their_bytes(self):
        facts = plugin.NodeFacts()
        facts.last_cpu = facts.max_cpu = 8191
        facts.isolated = frozenset(range(2, 8192))
        facts.nohz_full = plugin.FileRead("nohz_full", "", None)

        def cost(value):
            facts.cmdline = plugin.FileRead("cmdline", "rcu_nocbs=%s " % value * 3000, None)
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                finding = plugin.check_rcu_nocbs(facts)
                best = min(best, time.perf_counter() - started)
            return best, finding
        wide, finding = cost("0-8191")
        self.assertEqual(finding.status, "PASS", finding)
        narrow, finding = cost("2-3")
        self.assertEqual((finding.status, finding.cpus), ("WARN", "4-8191"))
        self.assertLess(wide / narrow, 8)

    def test_interrupt_names_and_quotas(self):
        text = ("           CPU0       CPU1\n  0:         12          0   IO-APIC   2-edge      timer\n"
                " 24:          0       4096  IR-PCI-MSI 524288-edge      nvme0q1\nNMI:          0          0   "
                "Non-maskable interrupts\n")
        self.assertEqual(plugin.interrupt_names(text), {0: "2-edge timer", 24: "524288-edge nvme0q1"})
        read = lambda text: plugin.FileRead("x", text, None)
        self.assertIsNone(plugin.cpu_quota((read("max 100000"),)))
        self.assertEqual(plugin.cpu_quota((read("150000 100000"),)), 1.5)
        self.assertEqual(plugin.cpu_quota((read("200000"), read("100000"))), 2.0)
        self.assertIsNone(plugin.cpu_quota((read("-1"), read("100000"))))
        self.assertRaises(ValueError, plugin.cpu_quota, (read("lots 100000"),))


class DoctorHostTests(TempDirTest):
    """Each host check on a fake node: PASS on a good one, WARN/FAIL on a bad
    one, SKIP when its files are missing."""

    def setUp(self):
        super().setUp()
        self.root = os.path.join(self.tmp, "node")
        self.flags = fake_node(self.root)

    def path(self, rel):
        return os.path.join(self.root, rel)

    def write(self, files):
        write_files(self.root, files)

    def remove(self, *rels):
        for rel in rels:
            target = self.path(rel)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            elif os.path.lexists(target):
                os.unlink(target)

    def doctor(self, *extra):
        code, checks, err = run_doctor(self.flags, *extra)
        self.assertNotIn("Traceback", err)
        self.assertEqual(list(checks), DOCTOR_CHECKS, err)
        return code, checks

    def test_a_good_node_passes(self):
        code, checks = self.doctor()
        statuses = {name: check["status"] for name, check in checks.items()}
        self.assertEqual(statuses, dict({name: "PASS" for name in DOCTOR_CHECKS},     # no kinds of core to tell
                                        plugin="SKIP", **{"pod-cgroups": "SKIP", "core-kinds": "SKIP"}), checks)
        self.assertEqual(code, 0)
        self.assertIn("2-7,10-15 (12 CPUs)", checks["isolated"]["found"])
        self.assertIn("cpuManagerPolicy=static", checks["kubelet-config"]["found"])
        self.assertIn("--config of the running kubelet (pid 4242)", checks["kubelet-config"]["found"])
        for check in checks.values():
            self.assertEqual(set(check), {"id", "status", "found", "advice", "files", "cpus"})
            self.assertTrue(check["files"], check)

    def test_the_table(self):
        result = subprocess.run([sys.executable, PLUGIN, "--doctor"] + self.flags, env=plugin_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.splitlines()
        self.assertRegex(lines[0], r"^isolcpu-plugin doctor: 13 PASS, 3 SKIP; holders ")
        rows = [line.split()[:2] for line in lines[1:] if not line.startswith(" ")]
        self.assertEqual([row[1] for row in rows], DOCTOR_CHECKS)
        self.assertTrue(all(line.startswith(("PASS", "WARN", "FAIL", "SKIP", "      ")) for line in lines[1:]))

    def test_isolated(self):
        self.write({"sys/devices/system/cpu/isolated": "\n"})
        code, checks = self.doctor()
        self.assertEqual((code, checks["isolated"]["status"]), (1, "FAIL"))
        self.assertIn("isolcpus=domain,managed_irq", checks["isolated"]["advice"])
        self.assertEqual(checks["smt-siblings"]["status"], "SKIP")
        self.write({"sys/devices/system/cpu/isolated": "2-x\n"})
        code, checks = self.doctor()
        self.assertEqual((code, checks["isolated"]["status"]), (1, "FAIL"))
        self.assertIn("'2-x'", checks["isolated"]["found"])

    def test_isolcpus_flags(self):
        for cmdline, status, said in (
                (GOOD_CMDLINE.replace("domain,managed_irq,", "domain,"), "WARN", "no managed_irq"),
                (GOOD_CMDLINE.replace("domain,managed_irq,", ""), "WARN", "no managed_irq"),
                (GOOD_CMDLINE.replace("domain,managed_irq,", "nohz,managed_irq,"), "WARN", "no domain flag"),
                (GOOD_CMDLINE.replace("isolcpus=domain,managed_irq,2-7,10-15 ", ""), "SKIP", "no isolcpus=")):
            with self.subTest(cmdline=cmdline):
                self.write({"proc/cmdline": cmdline + "\n"})
                check = self.doctor()[1]["isolcpus-flags"]
                self.assertEqual(check["status"], status, check)
                self.assertIn(said, check["found"])
        self.write({"proc/cmdline": GOOD_CMDLINE.replace("domain,managed_irq,", "domain,") + "\n"})
        self.assertEqual(self.doctor()[1]["isolcpus-flags"]["advice"], "isolcpus=domain,managed_irq,2-7,10-15")

    def test_smt_siblings(self):
        self.write({"sys/devices/system/cpu/isolated": "2-7,11-15\n"})       # core 2 = CPUs 2 and 10, split
        check = self.doctor()[1]["smt-siblings"]
        self.assertEqual(check["status"], "WARN")
        self.assertEqual(check["cpus"], "2")
        self.assertIn("isolated CPUs 2 share a core with CPUs 10", check["found"])
        for cpu in range(16):
            self.remove("sys/devices/system/cpu/cpu%d/topology" % cpu)
        self.assertEqual(self.doctor()[1]["smt-siblings"]["status"], "SKIP")

    def test_core_kinds(self):
        # socket 0 (CPUs 0-3,8-11) fast, socket 1 (4-7,12-15) slow; isolated 2-7,10-15
        capacity = "sys/devices/system/cpu/cpu%d/cpu_capacity"
        self.write({capacity % cpu: "%d\n" % (1024 if cpu % 8 < 4 else 446) for cpu in range(16)})
        check = self.doctor()[1]["core-kinds"]
        self.assertEqual((check["status"], check["cpus"]), ("WARN", "4-7,12-15"), check)
        self.assertIn("isolated CPUs mix kinds of core: 2-3,10-11 of kind 0; 4-7,12-15 of kind 1", check["found"])
        self.assertIn("only 2-3,10-11", check["advice"])
        self.write({"sys/devices/system/cpu/isolated": "4-7,12-15\n"})
        check = self.doctor()[1]["core-kinds"]
        self.assertEqual(check["status"], "PASS")
        self.assertIn("every isolated CPU is of kind 1 (0 the fastest of 2)", check["found"])
        self.write({capacity % cpu: "1024\n" for cpu in range(16)})
        self.assertEqual(self.doctor()[1]["core-kinds"]["status"], "PASS")
        self.write({"sys/devices/cpu_core/cpus": "0-3,8-11\n", "sys/devices/cpu_atom/cpus": "4-7,12-15\n",
                    "sys/devices/system/cpu/isolated": "2-7,10-15\n"})
        check = self.doctor()[1]["core-kinds"]                        # the PMU lists win over capacities
        self.assertEqual((check["status"], check["cpus"]), ("WARN", "4-7,12-15"), check)
        self.assertIn(self.path("sys/devices/cpu_core/cpus"), check["files"])

    def test_nohz_full_and_rcu_nocbs(self):
        self.write({"sys/devices/system/cpu/nohz_full": "2-7\n",
                    "proc/cmdline": GOOD_CMDLINE.replace("rcu_nocbs=2-7,10-15", "rcu_nocbs=10-13") + "\n"})
        checks = self.doctor()[1]
        self.assertEqual((checks["nohz-full"]["status"], checks["nohz-full"]["cpus"]), ("WARN", "10-15"))
        self.assertIn("nohz_full=2-7,10-15", checks["nohz-full"]["advice"])
        # nohz_full CPUs count as rcu_nocbs (the kernel offloads them): 14-15 are left
        self.assertEqual((checks["rcu-nocbs"]["status"], checks["rcu-nocbs"]["cpus"]), ("WARN", "14-15"))
        self.write({"sys/devices/system/cpu/nohz_full": "(null)\n",
                    "proc/cmdline": "root=/dev/sda1 isolcpus=2-7,10-15 rcu_nocbs\n"})
        checks = self.doctor()[1]
        self.assertEqual((checks["nohz-full"]["status"], checks["nohz-full"]["cpus"]), ("WARN", "2-7,10-15"))
        self.assertEqual((checks["rcu-nocbs"]["status"], checks["rcu-nocbs"]["cpus"]), ("WARN", "2-7,10-15"))
        self.remove("sys/devices/system/cpu/nohz_full")                   # no CONFIG_NO_HZ_FULL: the command line
        self.write({"proc/cmdline": GOOD_CMDLINE + "\n"})
        self.assertEqual(self.doctor()[1]["nohz-full"]["status"], "PASS")
        self.write({"sys/devices/system/cpu/nohz_full": "2-x\n"})
        self.remove("proc/cmdline")
        checks = self.doctor()[1]
        self.assertEqual([checks[name]["status"] for name in ("nohz-full", "rcu-nocbs", "isolcpus-flags")],
                         ["SKIP"] * 3, checks)

    def test_irq_affinity(self):
        self.write({"proc/irq/default_smp_affinity": "ffff\n", "proc/irq/24/effective_affinity_list": "3\n"})
        check = self.doctor()[1]["irq-affinity"]
        self.assertEqual(check["status"], "WARN")
        self.assertIn("default_smp_affinity includes isolated CPUs 2-7,10-15", check["found"])
        self.assertIn("1 IRQs may fire on isolated CPUs: 24 (524288-edge nvme0q1) on 3", check["found"])
        self.assertIn("irqaffinity=0-1,8-9", check["advice"])
        self.remove("proc/irq/24/effective_affinity_list")               # else smp_affinity_list
        self.write({"proc/irq/24/smp_affinity_list": "0-15\n", "proc/irq/default_smp_affinity": "0303\n"})
        self.assertIn("24 (524288-edge nvme0q1) on 2-7,10-15", self.doctor()[1]["irq-affinity"]["found"])
        for irq in range(30, 60):
            self.write({"proc/irq/%d/effective_affinity_list" % irq: "5\n"})
        check = self.doctor()[1]["irq-affinity"]
        self.assertIn("31 IRQs may fire", check["found"])
        self.assertIn("(+23 more)", check["found"])
        self.assertLess(len(check["found"]), 700)
        self.remove("proc/irq")
        self.assertEqual(self.doctor()[1]["irq-affinity"]["status"], "SKIP")

    def test_cgroup_isolated(self):
        self.write({"sys/fs/cgroup/rt.slice/cpuset.cpus.partition": "isolated\n",
                    "sys/fs/cgroup/rt.slice/cpuset.cpus.effective": "6-7\n",
                    "sys/fs/cgroup/bad.slice/cpuset.cpus.partition": "isolated invalid (Cpu list in cpuset.cpus "
                                                                        "not exclusive)\n"})
        check = self.doctor()[1]["cgroup-isolated"]
        self.assertEqual((check["status"], check["cpus"]), ("WARN", "6-7"))
        self.assertIn("rt.slice", check["found"])
        self.assertIn("not exclusive", check["found"])
        self.remove("sys/fs/cgroup/rt.slice", "sys/fs/cgroup/bad.slice")
        self.write({"sys/fs/cgroup/cpuset.cpus.isolated": "1-7,10-15\n"})     # contradicts the isolated set
        check = self.doctor()[1]["cgroup-isolated"]
        self.assertEqual(check["status"], "WARN", check)
        self.assertIn("the kernel lists CPUs 1 as isolated, which the plugin does not serve", check["found"])
        self.remove("sys/fs/cgroup")
        self.assertEqual(self.doctor()[1]["cgroup-isolated"]["status"], "SKIP")

    def test_housekeeping(self):
        self.write({"proc/4242/task/4250/status": "Name:\tkubelet\nCpus_allowed_list:\t0-15\n"})
        check = self.doctor()[1]["housekeeping"]
        self.assertEqual((check["status"], check["cpus"]), ("WARN", "2-7,10-15"))
        self.assertIn("kubelet (pid 4242) threads may run on isolated CPUs 2-7,10-15", check["found"])
        self.assertEqual(check["files"], [self.path("proc/PID/task/TID/status")])
        self.assertIn("CPUAffinity=0-1,8-9", check["advice"])
        self.remove("proc/4242")
        self.assertEqual(self.doctor()[1]["housekeeping"]["status"], "SKIP")

    def test_housekeeping_masks(self):
        self.write({"sys/devices/virtual/workqueue/cpumask": "ffff\n",
                    "proc/cmdline": GOOD_CMDLINE.replace("kthread_cpus=0-1,8-9", "kthread_cpus=0-3") + "\n"})
        check = self.doctor()[1]["housekeeping-masks"]
        self.assertEqual((check["status"], check["cpus"]), ("WARN", "2-7,10-15"))
        self.assertIn("kthread_cpus= includes isolated CPUs 2-3", check["found"])
        self.remove("sys/devices/virtual/workqueue/cpumask")
        self.write({"proc/cmdline": "root=/dev/sda1 isolcpus=2-7,10-15\n"})
        self.assertEqual(self.doctor()[1]["housekeeping-masks"]["status"], "SKIP")

    def test_kubelet_config(self):
        config = self.path("host-root/var/lib/kubelet/config.yaml")
        for text, status, said in (
                (GOOD_KUBELET_CONFIG.replace('"0-1,8-9,2-7,10-15"', '"0-1,8-9"'), "WARN", "are not in reservedSystemCPUs"),
                (GOOD_KUBELET_CONFIG.replace('full-pcpus-only: "true"', 'strict-cpu-reservation: "true"'), "FAIL",
                 "strict-cpu-reservation is on"),
                (GOOD_KUBELET_CONFIG.replace("best-effort", "single-numa-node"), "WARN", "at most 8 (node 1) of the 12"),
                (GOOD_KUBELET_CONFIG.replace("static", "none"), "PASS", "cpuManagerPolicy=none"),
                (GOOD_KUBELET_CONFIG.replace("cpuManagerPolicy: static", "cpuManagerPolicy: *policy"), "SKIP",
                 "cannot read cpuManagerPolicy")):
            with self.subTest(said=said):
                write_files(os.path.dirname(config), {"config.yaml": text})
                code, checks = self.doctor()
                self.assertEqual(checks["kubelet-config"]["status"], status, checks["kubelet-config"])
                self.assertIn(said, checks["kubelet-config"]["found"])
                self.assertEqual(code, 1 if status == "FAIL" else 0)
        # the kubelet's own flags win over its file; --kubelet-config names another file
        write_files(os.path.dirname(config), {"config.yaml": GOOD_KUBELET_CONFIG})
        with open(self.path("proc/4242/cmdline"), "wb") as f:
            f.write(b"/usr/bin/kubelet\0--config\0/var/lib/kubelet/config.yaml\0--reserved-cpus=0-1\0")
        self.assertIn("reservedSystemCPUs=0-1,", self.doctor()[1]["kubelet-config"]["found"])
        other = os.path.join(self.tmp, "other.yaml")
        write_files(self.tmp, {"other.yaml": "cpuManagerPolicy: none\n"})
        self.remove("proc/4242")
        found = self.doctor("--kubelet-config", other)[1]["kubelet-config"]["found"]
        self.assertIn("cpuManagerPolicy=none", found)
        self.assertIn("found by --kubelet-config", found)
        self.assertEqual(self.doctor()[1]["kubelet-config"]["status"], "SKIP")   # no kubelet, no kubelet-dir/config.yaml

    def test_bad_flags_exit_2(self):
        for extra in (["--list"], ["--probe"], ["--kubelet-dir", ""], ["--cpus", "x"]):
            with self.subTest(extra=extra):
                result = subprocess.run([sys.executable, PLUGIN, "--doctor"] + self.flags + extra, env=plugin_env(),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
                self.assertEqual(result.returncode, 2, result.stderr)
                self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)

    def test_junk_bytes_are_said_not_read_as_nothing(self):
        with open(self.path("sys/devices/system/cpu/isolated"), "wb") as f:
            f.write(b"\x00\xff\x01abc")
        with open(self.path("kubelet/cpu_manager_state"), "wb") as f:
            f.write(b"\x00\xff\x01abc")
        code, checks = self.doctor()
        self.assertEqual((code, checks["isolated"]["status"]), (1, "FAIL"))
        self.assertIn("isolated: '\\x00\xff\\x01abc' is not a cpu-list", checks["isolated"]["found"])
        self.assertEqual(checks["cpu-manager"]["status"], "SKIP")
        self.assertIn("cpu_manager_state: '\\x00\ufffd\\x01abc' is not text", checks["cpu-manager"]["found"])

    def holding_pod(self, uid, cpus):
        """A pod that holds `cpus` through the plugin, as the kubelet's checkpoint says."""
        self.write({"device-plugins/kubelet_internal_checkpoint": json.dumps({"Data": {"PodDeviceEntries": [
            {"PodUID": uid, "ContainerName": "app", "ResourceName": "windriver.com/isolcpus",
             "DeviceIDs": {"0": cpus}}], "RegisteredDevices": {}}, "Checksum": 1})})
        return "sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod%s.slice" % (
            uid.replace("-", "_"))

    def container_cgroup(self, uid, name, cpus, comm="sh", pid=None, v2=True, qos="burstable"):
        """A container's cgroup of pod `uid` with a process `comm` in it (v2:
        systemd naming; v1: cgroupfs); its directory."""
        pid = pid or 5100 + len(os.listdir(self.path("proc")))
        if v2:
            directory = "sys/fs/cgroup/kubepods.slice/kubepods-%s.slice/kubepods-%s-pod%s.slice/%s" % (
                qos, qos, uid.replace("-", "_"), "cri-containerd-%s.scope" % name)
            files = {directory + "/cpuset.cpus.effective": cpus + "\n"}
        else:
            directory = "sys/fs/cgroup/cpuset/kubepods/%s/pod%s/%s" % (qos, uid, name)
            files = {directory + "/cpuset.cpus": cpus + "\n"}
        files.update({directory + "/cgroup.procs": "%d\n" % pid if comm else "", "proc/%d/comm" % pid: "%s\n" % comm})
        self.write(files)
        return directory

    def test_exclusive_and_nri_on_cgroup_v2_and_v1(self):
        holder, other = pod_uid("net", "dpdk-fwd-0"), pod_uid("shop", "web-0")
        self.holding_pod(holder, ["2", "3"])
        for v2 in (True, False):
            with self.subTest(cgroup_v2=v2):
                if not v2:
                    self.remove("sys/fs/cgroup")
                    self.write({"sys/fs/cgroup/cpuset/cpuset.cpus": "0-15\n"})
                # as the plugin's NRI mode leaves them: the holder on its CPUs, the others off all isolated ones
                self.container_cgroup(holder, "9b1f", "0-1,2-3", v2=v2, qos="pod" if v2 else "guaranteed")
                self.container_cgroup(holder, "pause", "0-15", comm="pause", v2=v2, qos="pod" if v2 else "guaranteed")
                web = self.container_cgroup(other, "4e1a", "0-1,8-9", v2=v2, qos="besteffort")
                self.container_cgroup(other, "exited", "0-15", comm=None, v2=v2, qos="besteffort")
                code, checks = self.doctor()
                self.assertEqual(checks["exclusive"]["status"], "PASS", checks["exclusive"])
                self.assertIn("only the holders may run on isolated CPUs", checks["exclusive"]["found"])
                self.assertEqual(checks["nri"]["status"], "PASS", checks["nri"])
                self.assertEqual(checks["pod-cgroups"]["status"], "PASS", checks["pod-cgroups"])
                # another pod's container may run on the holder's CPU 3 and on free ones
                self.write({web + ("/cpuset.cpus.effective" if v2 else "/cpuset.cpus"): "0-1,3-4\n"})
                code, checks = self.doctor()
                check = checks["exclusive"]
                self.assertEqual((code, check["status"], check["cpus"]), (1, "FAIL", "3"), check)
                self.assertIn("pod %s cri-containerd-4e1a.scope on 3 (held by pod %s)" % (other, holder)
                              if v2 else "pod %s 4e1a on 3 (held by pod %s)" % (other, holder), check["found"])
                self.assertIn("--nri auto", check["advice"])
                self.assertEqual(checks["nri"]["status"], "WARN", checks["nri"])
                self.assertIn("exclusive (1 container on CPUs others hold)", checks["nri"]["found"])
                self.write({web + ("/cpuset.cpus.effective" if v2 else "/cpuset.cpus"): "0-1,4\n"})
                check = self.doctor()[1]["exclusive"]
                self.assertEqual((check["status"], check["cpus"]), ("WARN", "4"), check)
                self.assertIn("nobody holds yet", check["found"])
                # no NRI socket: what it would turn green, and a FAIL under --nri on
                self.write({web + ("/cpuset.cpus.effective" if v2 else "/cpuset.cpus"): "0-1,3\n"})
                nri_socket = self.flags[self.flags.index("--nri-socket") + 1]
                os.rename(nri_socket, nri_socket + ".gone")
                checks = self.doctor()[1]
                self.assertEqual(checks["nri"]["status"], "WARN", checks["nri"])
                self.assertIn("no runtime NRI socket at", checks["nri"]["found"])
                self.assertIn("would turn green: exclusive", checks["nri"]["found"])
                self.assertEqual(self.doctor("--nri", "on")[1]["nri"]["status"], "FAIL")
                os.rename(nri_socket + ".gone", nri_socket)

    def test_a_guaranteed_holder_whose_cgroup_has_its_cpus_passes(self):
        holder = pod_uid("net", "dpdk-fwd-0")
        self.holding_pod(holder, ["2", "3"])
        # the kubelet's record: exclusive CPUs 0-1 (not 2-3); the cgroup, as NRI left it: 0-3
        self.write({"kubelet/cpu_manager_state": json.dumps({"policyName": "static", "defaultCpuSet": "4-15",
                                                             "entries": {holder: {"app": "0-1"}}, "checksum": 1})})
        self.container_cgroup(holder, "9b1f", "0-3", qos="pod")
        checks = self.doctor()[1]
        self.assertEqual(checks["cpu-manager"]["status"], "PASS", checks["cpu-manager"])
        self.assertEqual(checks["pod-cgroups"]["status"], "PASS", checks["pod-cgroups"])
        self.write({self.container_cgroup(holder, "9b1f", "0-1", qos="pod") + "/x": ""})     # without NRI
        checks = self.doctor()[1]
        self.assertEqual(checks["cpu-manager"]["status"], "FAIL", checks["cpu-manager"])
        self.assertIn("holds CPUs 2-3 of the plugin but its cpuset is 0-1", checks["cpu-manager"]["found"])
        self.assertIn("--nri auto", checks["cpu-manager"]["advice"])
        self.assertEqual(checks["nri"]["status"], "WARN", checks["nri"])
        self.assertIn("pod-cgroups (1 holder without their CPUs)", checks["nri"]["found"])

    def test_a_deep_cgroup_tree_is_walked_without_recursion_and_what_is_skipped_is_said(self):
        # a tenant with a delegated subtree can nest 1,200 levels: it was
        # "internal error: RecursionError", exit 1, no report
        uid = pod_uid("net", "dpdk-fwd-0")
        self.holding_pod(uid, ["2", "3"])
        deepest = self.path("sys/fs/cgroup/kubepods.slice/tenant.slice")
        os.mkdir(deepest)
        for _ in range(1200):                                   # os.makedirs recurses
            deepest = os.path.join(deepest, "d")
            os.mkdir(deepest)
        self.addCleanup(lambda: os.path.isdir(deepest) and os.removedirs(deepest))    # rmtree recurses too
        code, checks = self.doctor()
        self.assertEqual(checks["cgroup-isolated"]["status"], "WARN", checks["cgroup-isolated"])
        self.assertIn("not looked at: 1 directory deeper than 32 levels (e.g. ", checks["cgroup-isolated"]["found"])
        self.assertEqual(checks["pod-cgroups"]["status"], "WARN", checks["pod-cgroups"])
        self.assertIn("pod %s: no cgroup found" % uid, checks["pod-cgroups"]["found"])
        self.assertIn("not looked at: 1 directory deeper than 32 levels (e.g. ", checks["pod-cgroups"]["found"])

    def test_the_walks_stay_in_the_trees_they_were_pointed_at(self):
        # a container directory linked out of the cgroup tree was read: PASS where it should FAIL
        uid = pod_uid("net", "dpdk-fwd-0")
        pod = self.holding_pod(uid, ["2", "3"])
        self.write({pod + "/cpu.max": "max 100000\n", "elsewhere/scope/cpuset.cpus.effective": "0-15\n",
                    pod + "/cri-containerd-9b1f.scope/cpuset.cpus.effective": "0-1\n"})
        os.symlink(self.path("elsewhere/scope"), self.path(pod + "/cri-containerd-0bad.scope"))
        check = self.doctor()[1]["pod-cgroups"]
        self.assertEqual(check["status"], "FAIL", check)
        self.assertIn("no container may run on its CPUs 2-3 (cri-containerd-9b1f.scope: 0-1)", check["found"])
        self.assertIn("1 symlink, not followed", check["found"])
        # ... and so was a pod directory linked elsewhere
        self.remove(pod)
        os.symlink(self.path("elsewhere"), self.path(pod))
        check = self.doctor()[1]["pod-cgroups"]
        self.assertEqual(check["status"], "WARN", check)
        self.assertIn("pod %s: no cgroup found" % uid, check["found"])
        self.assertIn("1 symlink, not followed", check["found"])

    def test_a_container_whose_cpuset_cannot_be_read_is_said_so(self):
        # its cpuset.cpus.effective and cgroup.procs were FIFOs: filtered out, and the pod FAILed with
        # "no container cgroups"
        uid = pod_uid("net", "dpdk-fwd-0")
        pod = self.holding_pod(uid, ["2", "3"])
        os.makedirs(self.path(pod + "/cri-containerd-aaaa.scope"))
        for name in ("cpuset.cpus.effective", "cgroup.procs"):
            os.mkfifo(self.path(pod + "/cri-containerd-aaaa.scope/" + name))
        code, checks = self.doctor()
        check = checks["pod-cgroups"]
        self.assertEqual(check["status"], "SKIP", check)       # unreadable files: SKIP with the reason
        self.assertNotIn("no container cgroups", check["found"])
        self.assertIn("pod %s: cannot tell whether it may run on its CPUs 2-3: the cpusets of 1 of its containers "
                      "could not be read (cri-containerd-aaaa.scope: " % uid, check["found"])
        self.assertIn("not a regular file", check["found"])
        # beside a readable container without the CPUs it cannot tell either; with one that has them, PASS
        self.container_cgroup(uid, "bbbb", "0-1")
        check = self.doctor()[1]["pod-cgroups"]
        self.assertEqual(check["status"], "SKIP", check)
        self.assertIn("could not be read", check["found"])
        self.container_cgroup(uid, "bbbb", "0-3")
        self.assertEqual(self.doctor()[1]["pod-cgroups"]["status"], "PASS")

    def test_finding_pod_cgroups_is_linear_in_directories_and_pods(self):
        # every kubepods subdirectory was compared with every pod UID's names
        def cost(count):
            root = self.path("walk-%d" % count)
            for i in range(count):
                os.makedirs(os.path.join(root, "kubepods.slice", "tenant.slice", "d%d" % i))
            uids = ["%08d-0000-0000-0000-000000000000" % i for i in range(count)]
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                found, skipped = plugin.find_pod_cgroups(root, True, uids, self.path("proc"))
                best = min(best, time.perf_counter() - started)
            self.assertEqual(found, {})
            return best
        cost(200)                                               # warm caches
        ratio = cost(3200) / cost(800)
        self.assertLess(ratio, 8, "x4 directories and pods took x%.1f the time" % ratio)     # a square: x16

    def test_the_kubelet_config_is_read_inside_the_kubelets_root(self):
        # --config=/../outside/... was joined to /proc/PID/root and read from outside it
        self.write({"outside/config.yaml": "cpuManagerPolicy: static\nreservedSystemCPUs: 0-1\n"})
        with open(self.path("proc/4242/cmdline"), "wb") as f:
            f.write(b"/usr/bin/kubelet\0--config=/../outside/config.yaml\0")
        check = self.doctor()[1]["kubelet-config"]
        self.assertEqual(check["status"], "SKIP", check)
        # `..` at the root is the root, as the kernel has it: <root>/outside/config.yaml, absent there
        self.assertIn("no kubelet config", check["found"])
        self.assertIn(self.path("proc/4242/root/outside/config.yaml"), check["found"])
        # an absolute symlink inside its root means a file inside its root
        self.remove("host-root/var/lib/kubelet/config.yaml")
        self.write({"host-root/etc/kubernetes/kubelet.yaml": GOOD_KUBELET_CONFIG})
        os.symlink("/etc/kubernetes/kubelet.yaml", self.path("host-root/var/lib/kubelet/config.yaml"))
        os.symlink("../lib/kubelet/config.yaml", self.path("host-root/var/lib/config.yaml"))
        os.symlink("../../../../etc/kubernetes/kubelet.yaml", self.path("host-root/var/lib/up.yaml"))
        for config in (b"/var/lib/kubelet/config.yaml", b"/var/lib/config.yaml", b"/var/../var/lib/./config.yaml",
                       b"/../var/lib/kubelet/config.yaml", b"/../../var/../../var/lib/config.yaml",
                       b"/var/lib/up.yaml"):
            with self.subTest(config=config):
                with open(self.path("proc/4242/cmdline"), "wb") as f:
                    f.write(b"/usr/bin/kubelet\0--config=" + config + b"\0")
                check = self.doctor()[1]["kubelet-config"]
                self.assertEqual(check["status"], "PASS", check)
                self.assertIn(self.path("proc/4242/root/etc/kubernetes/kubelet.yaml"), check["files"])
        # relative: to its working directory, also inside its root
        os.symlink(self.path("host-root/var/lib/kubelet"), self.path("proc/4242/cwd"))
        for config, status in ((b"config.yaml", "PASS"), (b"../../../../outside/config.yaml", "SKIP")):
            with self.subTest(config=config):
                with open(self.path("proc/4242/cmdline"), "wb") as f:
                    f.write(b"/usr/bin/kubelet\0--config\0" + config + b"\0")
                self.assertEqual(self.doctor()[1]["kubelet-config"]["status"], status)

    def test_garbage_everywhere_is_never_a_traceback(self):
        garbage = ["\x00\x01", "9" * 5000, "-", "ffff,ffff,zz", "{" * 50000, "isolated invalid"]
        targets = ["sys/devices/system/cpu/nohz_full", "sys/devices/virtual/workqueue/cpumask",
                   "proc/irq/default_smp_affinity", "proc/irq/24/effective_affinity_list", "proc/interrupts",
                   "kubelet/cpu_manager_state", "host-root/var/lib/kubelet/config.yaml",
                   "proc/4242/task/4242/status", "sys/fs/cgroup/cpuset.cpus.isolated",
                   "sys/devices/system/cpu/cpu2/cpu_capacity", "sys/devices/cpu_core/cpus"]
        rng = random.Random(5)
        for target in targets:
            with self.subTest(target=target):
                self.write({target: rng.choice(garbage)})
                code, checks = self.doctor()
                self.assertIn(code, (0, 1))
                self.assertTrue(all(len(c["found"]) < 2000 for c in checks.values()))
        self.write({"proc/irq/default_smp_affinity": "0303\n", "proc/irq/24/effective_affinity_list": "3\n"})
        os.unlink(self.path("proc/interrupts"))
        os.mkfifo(self.path("proc/interrupts"))
        check = self.doctor()[1]["irq-affinity"]
        self.assertEqual(check["status"], "WARN")                        # names unknown, the finding stands
        self.assertIn("24 (?) on 3", check["found"])


@needs_grpc
class DoctorKubeletTests(PodResourcesRig):
    """The checks that need a kubelet: the CPU manager, the plugin, pod
    cgroups, against a running plugin and a FakeKubelet serving PodResources."""

    def setUp(self):
        super().setUp()
        self.kubelet_dir = os.path.join(self.tmp, "kubelet")
        self.cgroup = os.path.join(self.sysfs, "fs", "cgroup")
        write_files(self.cgroup, {"cgroup.controllers": "cpuset cpu\n"})

    def doctor(self, *extra):
        flags = ["--sysfs", self.sysfs, "--procfs", self.procfs, "--device-plugin-path", self.dir,
                 "--kubelet-dir", self.kubelet_dir, "--pod-resources-socket", self.kubelet.pod_resources_socket]
        code, checks, err = run_doctor(flags, *extra)
        self.assertNotIn("Traceback", err)
        self.assertEqual(list(checks), DOCTOR_CHECKS, err)
        return code, checks

    def state(self, policy="static", default="0-7", entries=None):
        write_files(self.kubelet_dir, {"cpu_manager_state": json.dumps(
            {"policyName": policy, "defaultCpuSet": default, "entries": entries or {}, "checksum": 1})})

    def pod_cgroup(self, namespace, pod, effective, qos="burstable", cpu_max="max 100000", runtime="cri-containerd"):
        """The pod's cgroup as the systemd driver names it, with one container."""
        uid = pod_uid(namespace, pod).replace("-", "_")
        pod_dir = "kubepods.slice/kubepods-%s.slice/kubepods-%s-pod%s.slice" % (qos, qos, uid)
        write_files(self.cgroup, {pod_dir + "/cpu.max": cpu_max + "\n",
                                  pod_dir + "/%s-0f3a9c.scope/cpuset.cpus.effective" % runtime: effective + "\n"})

    def test_the_plugin_check(self):
        code, checks = self.doctor()
        self.assertEqual(checks["plugin"]["status"], "SKIP")              # no kubelet, no plugin: nothing to say
        process = self.registered_plugin()
        check = self.doctor()[1]["plugin"]
        self.assertEqual(check["status"], "PASS", check)
        self.assertIn("the kubelet counts the same 4 CPUs allocatable", check["found"])
        self.set_host("online", "0-6\n")
        self.kubelet.wait_list(lambda devices: devices["7"][0] == "Unhealthy", timeout=3)
        check = self.doctor()[1]["plugin"]
        self.assertEqual(check["status"], "PASS", check)
        self.assertIn("offline isolated CPUs: 7", check["found"])
        self.kubelet.lists.append(Snapshot({"2": ("Healthy", None)}, time.monotonic()))   # a kubelet gone stale
        check = self.doctor()[1]["plugin"]
        self.assertEqual((check["status"], check["cpus"]), ("WARN", "3,6"), check)
        process.stop(signal.SIGKILL)                                     # its socket stays, nobody serves it
        code, checks = self.doctor()
        self.assertEqual((code, checks["plugin"]["status"]), (1, "FAIL"))
        self.assertIn("is stale", checks["plugin"]["found"])

    def test_cpu_manager_none_and_the_good_static_layout(self):
        self.registered_plugin()
        self.allocate_some()                                             # net/dpdk-fwd-0: 6,7; trading/...: 3
        self.state(policy="none", default="")
        self.assertEqual(self.doctor()[1]["cpu-manager"]["status"], "PASS")
        # static, isolated CPUs reserved: in the shared pool, never granted; holders Burstable
        self.state(default="0-7", entries={pod_uid("kube-system", "coredns"): {"coredns": "1"}})
        code, checks = self.doctor()
        self.assertEqual(checks["cpu-manager"]["status"], "PASS", checks["cpu-manager"])
        self.assertIn("holders from the kubelet's checkpoint", checks["cpu-manager"]["found"])
        self.assertIn("every holder may run on its CPUs", checks["cpu-manager"]["found"])
        os.unlink(os.path.join(self.dir, "kubelet_internal_checkpoint"))
        self.assertIn("the holders' cpusets could not be checked", self.doctor()[1]["cpu-manager"]["found"])

    def test_cpu_manager_two_tenants_and_a_guaranteed_holder(self):
        self.registered_plugin()
        self.allocate_some()
        other, guaranteed = pod_uid("batch", "cruncher"), pod_uid("net", "dpdk-fwd-0")
        # the CPU manager gave 3 (held by trading/order-gateway through the plugin) to another pod,
        # and dpdk-fwd-0 (holding 6-7 through the plugin) is Guaranteed: its cpuset is 1 only
        self.state(default="0,2,4-5", entries={other: {"crunch": "3"}, guaranteed: {"forwarder": "1"}})
        code, checks = self.doctor()
        check = checks["cpu-manager"]
        self.assertEqual((code, check["status"]), (1, "FAIL"), check)
        self.assertIn("the CPU manager gave isolated CPUs 3 exclusively to pod UID %s container 'crunch'" % other,
                      check["found"])
        self.assertIn("two tenants on a quiet core", check["found"])
        self.assertIn("pod UID %s container 'forwarder' holds CPUs 6-7 of the plugin but its cpuset is 1"
                      % guaranteed, check["found"])
        self.assertIn("pod UID %s container 'gateway' holds CPUs 3" % pod_uid("trading", "order-gateway-7f9c"),
                      check["found"])
        self.assertEqual(check["cpus"], "3,6-7")
        for sentence in ("put the isolated CPUs in reservedSystemCPUs", "do not enable the strict-cpu-reservation",
                         "Burstable QoS"):
            self.assertIn(sentence, check["advice"])
        # the old format: container IDs, so any isolated grant is suspect
        write_files(self.kubelet_dir, {"cpu_manager_state": json.dumps(
            {"policyName": "static", "defaultCpuSet": "0-2,4-7", "entries": {"a1b2c3d4e5f6": "3"}})})
        check = self.doctor()[1]["cpu-manager"]
        self.assertEqual(check["status"], "FAIL")
        self.assertIn("container ID 'a1b2c3d4e5f6'", check["found"])
        self.assertIn("old state format", check["found"])
        os.unlink(os.path.join(self.kubelet_dir, "cpu_manager_state"))
        self.assertEqual(self.doctor()[1]["cpu-manager"]["status"], "SKIP")

    def test_pod_cgroups(self):
        self.registered_plugin()
        self.allocate_some()
        self.pod_cgroup("net", "dpdk-fwd-0", "0-7")
        self.pod_cgroup("trading", "order-gateway-7f9c", "0-7", qos="besteffort", runtime="crio")
        check = self.doctor()[1]["pod-cgroups"]
        self.assertEqual(check["status"], "PASS", check)
        self.assertIn("the 2 pods holding CPUs may run on them", check["found"])
        self.pod_cgroup("net", "dpdk-fwd-0", "1", cpu_max="150000 100000")       # Guaranteed-like: not its CPUs
        self.pod_cgroup("trading", "order-gateway-7f9c", "0-7", qos="besteffort", runtime="crio",
                        cpu_max="50000 100000")
        code, checks = self.doctor()
        check = checks["pod-cgroups"]
        self.assertEqual((code, check["status"], check["cpus"]), (1, "FAIL", "6-7"), check)
        self.assertIn("pod %s: no container may run on its CPUs 6-7" % pod_uid("net", "dpdk-fwd-0"), check["found"])
        self.assertIn("pod %s: its CPU limit (0.50 CPUs) is below the 1 isolated CPUs it holds"
                      % pod_uid("trading", "order-gateway-7f9c"), check["found"])
        self.assertIn("reservedSystemCPUs", check["advice"])
        self.assertIn("CPU limit", check["advice"])
        # the cgroupfs driver and cgroup v1 name them otherwise
        shutil.rmtree(self.cgroup)
        uid = pod_uid("net", "dpdk-fwd-0")
        write_files(self.cgroup, {"cpuset/kubepods/burstable/pod%s/0f3a9c/cpuset.cpus" % uid: "0-7\n",
                                  "cpu,cpuacct/kubepods/burstable/pod%s/cpu.cfs_quota_us" % uid: "100000\n",
                                  "cpu,cpuacct/kubepods/burstable/pod%s/cpu.cfs_period_us" % uid: "100000\n"})
        check = self.doctor()[1]["pod-cgroups"]
        self.assertEqual(check["status"], "WARN", check)                 # trading's pod has no cgroup here
        self.assertIn("pod %s: its CPU limit (1.00 CPUs) is below the 2 isolated CPUs" % uid, check["found"])
        self.assertIn("pod %s: no cgroup found" % pod_uid("trading", "order-gateway-7f9c"), check["found"])
        os.unlink(os.path.join(self.dir, "kubelet_internal_checkpoint"))
        self.assertEqual(self.doctor()[1]["pod-cgroups"]["status"], "SKIP")

    def test_holders_source_is_said(self):
        self.registered_plugin()
        self.allocate_some()
        result = subprocess.run([sys.executable, PLUGIN, "--doctor", "--sysfs", self.sysfs, "--procfs", self.procfs,
                                 "--device-plugin-path", self.dir, "--kubelet-dir", self.kubelet_dir,
                                 "--pod-resources-socket", self.kubelet.pod_resources_socket], env=plugin_env(),
                                stdout=subprocess.PIPE, universal_newlines=True, timeout=120)
        self.assertIn("holders from PodResources", result.stdout.splitlines()[0])
        code, checks, _ = run_doctor(["--sysfs", self.sysfs, "--procfs", self.procfs, "--device-plugin-path",
                                      self.dir, "--kubelet-dir", self.kubelet_dir, "--pod-resources-socket", "off"])
        self.assertIn("PodResources is off", checks["plugin"]["found"])


class DoctorThisMachineTests(unittest.TestCase):
    def test_this_machine(self):
        with open("/sys/devices/system/cpu/isolated") as f:
            if f.read().strip() or os.path.exists("/var/lib/kubelet"):
                self.skipTest("this machine isolates CPUs or runs a kubelet")
        result = subprocess.run([sys.executable, PLUGIN, "--doctor"], env=plugin_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        failing = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
        self.assertEqual(len(failing), 1, result.stdout)
        self.assertEqual(failing[0].split()[1], "isolated")


# ---------------------------------------------------------------------------
# A real containerd 1.7 with NRI on, driven through CRI as the kubelet drives it
# ---------------------------------------------------------------------------
# tools/ci/containerd.sh start DIR runs one (.ci/run does); ISOLCPU_TEST_CONTAINERD=DIR
# runs these against it. The plugin serves a fake host of 2 CPUs (0-1 online, 1
# isolated: CPUs this machine has) and sets cpusets by
# cpuset = ((B - A) | H) & online, A = {1}: a holder of CPU 1 runs on its kubelet
# cpuset plus 1, every other container on its kubelet cpuset minus 1.

CONTAINERD_TEST_DIR = os.environ.get("ISOLCPU_TEST_CONTAINERD")
CONTAINERD_SH = os.path.join(HERE, "tools", "ci", "containerd.sh")
NRI_INDEX = "50"


def import_cri_client():
    sys.path.insert(0, os.path.join(HERE, "tools"))
    try:
        import cri_client
    finally:
        sys.path.remove(os.path.join(HERE, "tools"))
    return cri_client


@unittest.skipUnless(CONTAINERD_TEST_DIR, "ISOLCPU_TEST_CONTAINERD (a dir made by tools/ci/containerd.sh start) not set")
@needs_grpc
class RealContainerdTests(TempDirTest):
    """Pods and containers made through CRI; each container's cgroup
    cpuset.cpus and its process's Cpus_allowed_list read back from the kernel."""

    @classmethod
    def setUpClass(cls):
        cls.cri = import_cri_client()
        cls.env = cls.cri.read_env_file(os.path.join(CONTAINERD_TEST_DIR, "env"))
        cls.client = cls.cri.CriClient(cls.env["CONTAINERD_SOCKET"])
        cls.client.wait_ready()

    @classmethod
    def tearDownClass(cls):
        cls.client.close()

    def setUp(self):
        super().setUp()
        self.sysfs, self.procfs = fake_host(os.path.join(self.tmp, "host"), sockets=1, cores=2, threads=1,
                                            isolated="1")
        self.dir = os.path.join(self.tmp, "device-plugins")
        self.kubelet_dir = os.path.join(self.tmp, "kubelet")
        os.makedirs(self.kubelet_dir)
        self.kubelet = FakeKubelet(self.dir)              # the plugin registers as on a node
        self.kubelet.start()
        self.addCleanup(self.kubelet.stop)
        self.pods = []
        self.addCleanup(self.remove_pods)
        # the kubelet's record: a Guaranteed pod holding CPU 1 (device "1") with exclusive CPU 0
        self.holder_pod = self.run_pod("guaranteed")
        self.write_checkpoint({(self.holder_pod.uid, "app"): ["1"]})
        self.write_cpu_manager_state({self.holder_pod.uid: {"app": "0"}})

    # The kubelet's side ----------------------------------------------------------

    def run_pod(self, name):
        uid = str(uuid.uuid4())
        pod = self.client.run_pod_sandbox(name, "default", uid,
                                          cgroup_parent="%s/pod%s" % (self.env["CONTAINERD_CGROUP_ROOT"], uid))
        self.pods.append(pod)
        return pod

    def remove_pods(self):
        """Every container and sandbox this test made, even after a failure."""
        for pod in self.pods:
            for container in self.client.list_containers(pod_sandbox_id=pod.id):
                with contextlib.suppress(grpc.RpcError):
                    self.client.stop_container(container["id"])
                    self.client.remove_container(container["id"])
            with contextlib.suppress(grpc.RpcError):
                self.client.stop_pod_sandbox(pod.id)
                self.client.remove_pod_sandbox(pod.id)
            self.cri.remove_cgroups(pod.cgroup_parent)

    def write_checkpoint(self, holders):
        """kubelet_internal_checkpoint naming {(pod uid, container): device IDs}, renamed into place."""
        entries = [{"PodUID": uid, "ContainerName": name, "ResourceName": "windriver.com/isolcpus",
                    "DeviceIDs": {"0": ids}, "AllocResp": ""} for (uid, name), ids in holders.items()]
        write_files(self.dir, {"kubelet_internal_checkpoint": json.dumps(
            {"Data": {"PodDeviceEntries": entries, "RegisteredDevices": {}}, "Checksum": 0})})

    def write_cpu_manager_state(self, entries, default="0-1"):
        write_files(self.kubelet_dir, {"cpu_manager_state": json.dumps(
            {"policyName": "static", "defaultCpuSet": default, "entries": entries, "checksum": 0})})

    def container(self, pod, cpuset, name="app", envs=None, attempt=0):
        """CreateContainer + StartContainer: a sleeping busybox with the kubelet's cpuset."""
        envs = dict({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}, **(envs or {}))
        container_id = self.client.create_container(pod, name, self.env["CONTAINERD_IMAGE"],
                                                    command=["/bin/sleep", "3600"], envs=envs, cpuset=cpuset,
                                                    cpu_shares=1024, attempt=attempt)
        self.client.start_container(container_id)
        return pod, container_id

    def holder(self, attempt=0):
        return self.container(self.holder_pod, "0", envs={"ISOLCPUS": "1"}, attempt=attempt)

    def non_holder(self):
        return self.container(self.run_pod("burstable"), "0-1")

    def spoofer(self):
        """Claims CPU 1 in its own pod spec; the checkpoint gives it nothing."""
        return self.container(self.run_pod("spoofer"), "0-1", envs={"ISOLCPUS": "1"})

    # What the kernel says --------------------------------------------------------

    def cpus(self, container):
        """(cgroup cpuset.cpus, the process's Cpus_allowed_list), both canonical."""
        pod, container_id = container
        pid = self.client.container_status(container_id)["pid"] or self.cri.cgroup_pids(pod.cgroup_parent,
                                                                                        container_id)[0]
        return (canonical_cpu_list(expand_cpu_list(self.cri.container_cgroup_cpus(pod.cgroup_parent, container_id))),
                canonical_cpu_list(expand_cpu_list(self.cri.cpus_allowed_list(pid))))

    def assert_cpus(self, container, expected, within=0.0, since=None, what=""):
        """Both the cgroup and the process on `expected`, at once or within
        `within` seconds of `since` (monotonic; default now)."""
        expected = canonical_cpu_list(expand_cpu_list(expected))
        deadline = (since if since is not None else time.monotonic()) + within
        while True:
            found = self.cpus(container)
            if found == (expected, expected):
                return
            plugin = getattr(self, "plugin", None)
            if time.monotonic() >= deadline or (plugin and plugin.proc.poll() is not None):
                break                                     # a plugin that exited will not fix it
            time.sleep(0.02)
        self.fail("%s %s: cgroup cpuset.cpus %s, Cpus_allowed_list %s; wanted %s%s%s" % (
            what or "container", container[1][:12], found[0], found[1], expected,
            " within %.1f s" % within if within else "", self.plugin_log()))

    # The plugin and containerd ---------------------------------------------------

    def start_plugin(self):
        args = ["--sysfs", self.sysfs, "--procfs", self.procfs, "--device-plugin-path", self.dir,
                "--pod-resources-socket", "off", "--kubelet-dir", self.kubelet_dir,
                "--nri", "on", "--nri-socket", self.env["CONTAINERD_NRI_SOCKET"], "--nri-index", NRI_INDEX,
                "--rescan-interval", "0.2", "--log-level", "debug"]
        self.plugin = PluginProcess(self.tmp, args)
        self.plugin.started = time.monotonic()
        self.addCleanup(self.plugin.stop, signal.SIGKILL)
        return self.plugin

    def plugin_log(self):
        plugin = getattr(self, "plugin", None)
        return "\nplugin log:\n%s" % plugin.log()[-4000:] if plugin else ""

    def containerd_log_size(self):
        return os.path.getsize(self.env["CONTAINERD_LOG"])

    def wait_nri_connected(self, since_offset, deadline):
        """Until containerd logs the plugin as connected, past `since_offset`: NRI's adaptation logs
        `plugin "NN-name" connected` after its Synchronize, the one outside sign of a registration."""
        text = 'plugin \\"%s-isolcpu-plugin\\" connected' % NRI_INDEX
        while time.monotonic() < deadline:
            with open(self.env["CONTAINERD_LOG"]) as f:
                f.seek(since_offset)
                if text in f.read():
                    return
            if self.plugin.proc.poll() is not None:
                self.fail("the plugin exited with %s before connecting to NRI%s" % (self.plugin.proc.returncode,
                                                                                   self.plugin_log()))
            time.sleep(0.02)
        self.fail("containerd never logged the plugin as connected%s" % self.plugin_log())

    def connected_plugin(self):
        offset = self.containerd_log_size()
        plugin = self.start_plugin()
        self.wait_nri_connected(offset, plugin.started + 10)
        return plugin

    def restart_containerd(self):
        subprocess.run([CONTAINERD_SH, "restart", CONTAINERD_TEST_DIR], check=True, stdout=subprocess.DEVNULL)
        self.client.wait_ready()

    # Without the plugin: the infrastructure itself -------------------------------

    def test_without_the_plugin_cpusets_are_the_kubelets(self):
        holder, non_holder, spoofer = self.holder(), self.non_holder(), self.spoofer()
        for container in (holder, non_holder, spoofer):
            pod, container_id = container
            status = self.client.container_status(container_id)
            self.assertEqual(status["state"], "running")
            # containerd's cgroup for it (cgroupfs driver): <cgroup_parent>/<container id>, as its process sees it
            self.assertEqual(self.cri.cgroup_of(status["pid"]), "%s/%s" % (pod.cgroup_parent, container_id))
            self.assertEqual(self.cri.cgroup_pids(pod.cgroup_parent, container_id), [status["pid"]])
        self.assert_cpus(holder, "0")
        self.assert_cpus(non_holder, "0-1")
        self.assert_cpus(spoofer, "0-1")
        self.client.update_container_resources(holder[1], cpuset="0-1")
        self.client.update_container_resources(non_holder[1], cpuset="0")
        self.assert_cpus(holder, "0-1")
        self.assert_cpus(non_holder, "0")
        self.assertEqual(self.client.container_status(non_holder[1])["cpuset"], "0")
        # a containerd restart leaves running containers as they are, as on a node
        pids = [self.client.container_status(c[1])["pid"] for c in (holder, non_holder, spoofer)]
        self.restart_containerd()
        self.assertEqual([self.client.container_status(c[1])["pid"] for c in (holder, non_holder, spoofer)], pids)
        self.assert_cpus(holder, "0-1")
        self.assert_cpus(non_holder, "0")
        self.assert_cpus(spoofer, "0-1")
        self.assert_cpus(self.container(self.holder_pod, "0", name="sidecar"), "0")

    def test_a_client_can_connect_to_the_nri_socket(self):
        """The socket is NRI's: RegisterPlugin (mux conn 2, ttrpc stream 1) is answered OK."""
        path = self.env["CONTAINERD_NRI_SOCKET"]
        self.assertTrue(stat.S_ISSOCK(os.stat(path).st_mode))
        register = pb_field(1, "ci-probe") + pb_field(2, "99")          # RegisterPluginRequest{1 name, 2 idx}
        request = (pb_field(1, "nri.pkg.api.v1alpha1.Runtime") + pb_field(2, "RegisterPlugin")
                   + pb_field(3, register))                              # ttrpc.Request{1 service, 2 method, 3 payload}
        message = struct.pack(">IIBB", len(request), 1, 1, 0) + request  # ttrpc: length, stream 1, request, flags
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(path)
            sock.sendall(struct.pack(">II", 2, len(message)) + message)  # mux: conn 2 = the runtime's service

            def read(size):
                data = b""
                while len(data) < size:
                    chunk = sock.recv(size - len(data))
                    self.assertTrue(chunk, "containerd closed the NRI connection")
                    data += chunk
                return data
            while True:                                   # Configure may come first, on conn 1
                conn, size = struct.unpack(">II", read(8))
                payload = read(size)
                length, stream, kind, _ = struct.unpack(">IIBB", payload[:10])
                if conn == 2 and stream == 1 and kind == 2:
                    break
        response = payload[10:10 + length]                # ttrpc.Response{1 status{1 code}, 2 payload}
        self.assertEqual(self.cri.field(self.cri.field(response, 1), 1, 0), 0, response)

    # With the plugin (these need its NRI side) -----------------------------------

    def test_holder_non_holder_and_spoofer(self):
        self.connected_plugin()
        self.assert_cpus(self.holder(), "0-1", what="holder")
        self.assert_cpus(self.non_holder(), "0", what="non-holder")
        self.assert_cpus(self.spoofer(), "0", what="spoofer")
        self.assertIsNone(self.plugin.proc.poll())

    def test_kubelet_updates_follow_the_rule(self):
        self.connected_plugin()
        holder, non_holder = self.holder(), self.non_holder()
        for cpuset in ("0-1", "0"):
            self.client.update_container_resources(holder[1], cpuset=cpuset)
            self.assert_cpus(holder, "0-1", what="holder updated to %s" % cpuset)
            self.client.update_container_resources(non_holder[1], cpuset=cpuset)
            self.assert_cpus(non_holder, "0", what="non-holder updated to %s" % cpuset)
        # an in-place resize carries no cpus: the cpuset stays
        self.client.update_container_resources(holder[1], cpu_shares=2048, cpu_quota=200000, cpu_period=100000)
        self.assert_cpus(holder, "0-1", what="holder resized")

    def test_containers_made_before_the_plugin_are_fixed_at_its_start(self):
        holder, non_holder, spoofer = self.holder(), self.non_holder(), self.spoofer()
        self.assert_cpus(non_holder, "0-1")
        plugin = self.start_plugin()
        self.assert_cpus(holder, "0-1", within=2, since=plugin.started, what="holder")
        self.assert_cpus(non_holder, "0", within=2, since=plugin.started, what="non-holder")
        self.assert_cpus(spoofer, "0", within=2, since=plugin.started, what="spoofer")

    def test_a_restarted_plugin_repairs_what_changed_while_it_was_down(self):
        plugin = self.connected_plugin()
        holder, non_holder = self.holder(), self.non_holder()
        self.assert_cpus(holder, "0-1")
        plugin.stop(signal.SIGKILL)
        # the kubelet updates both meanwhile; containerd applies them unadjusted
        self.client.update_container_resources(holder[1], cpuset="0")
        self.client.update_container_resources(non_holder[1], cpuset="0-1")
        self.assert_cpus(holder, "0", what="holder, plugin down")
        self.assert_cpus(non_holder, "0-1", what="non-holder, plugin down")
        plugin = self.start_plugin()
        self.assert_cpus(holder, "0-1", within=2, since=plugin.started, what="holder")
        self.assert_cpus(non_holder, "0", within=2, since=plugin.started, what="non-holder")

    def test_after_a_containerd_restart_the_plugin_reconnects(self):
        self.connected_plugin()
        holder, non_holder = self.holder(), self.non_holder()
        offset = self.containerd_log_size()
        restarted = time.monotonic()
        self.restart_containerd()
        self.assert_cpus(holder, "0-1", what="holder across the restart")
        self.assert_cpus(non_holder, "0", what="non-holder across the restart")
        self.wait_nri_connected(offset, restarted + 10)
        # the kubelet restarts the holder's container (attempt 1): the same checkpoint entry
        self.client.stop_container(holder[1])
        self.client.remove_container(holder[1])
        self.assert_cpus(self.holder(attempt=1), "0-1", what="new holder")
        self.assert_cpus(self.non_holder(), "0", what="new non-holder")
        self.assertIsNone(self.plugin.proc.poll())


if __name__ == "__main__":
    unittest.main()
