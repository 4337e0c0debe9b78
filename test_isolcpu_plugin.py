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
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.request
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
        }
        for text, expected in cases.items():
            with self.subTest(text=text):
                self.assertEqual(self.parse(text), expected)

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

    def test_rescan_sees_offline_and_back(self):
        sysfs, procfs = fake_host(self.tmp, isolated="2-3")
        inv = plugin.CpuInventory(plugin.Host(sysfs, procfs), "auto")
        self.assertIsNone(inv.scan())
        write_files(self.tmp, {"sys/devices/system/cpu/online": "0-2,4-7\n"})
        self.assertIn("now unhealthy (offline) 3", inv.scan())
        write_files(self.tmp, {"sys/devices/system/cpu/online": "0-7\n"})
        self.assertIn("healthy again 3", inv.scan())

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
                    cores_per_cache=None, kinds=None):
    """{cpu: CpuInfo} of a machine numbered as Linux numbers x86 (thread t of
    core c of socket s is CPU t*(sockets*cores) + s*cores + c); nodes split
    each socket's cores evenly; CPUs in `unknown` have no topology at all.
    With cores_per_cache, a last-level cache per that many cores of a socket
    (core c's is the cache of cores c // cores_per_cache); with kinds, core
    c of each socket is of kind kinds[c] (0 the fastest)."""
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
        infos[cpu] = plugin.CpuInfo(cpu, (node,), sock, None, None, core, siblings, cache,
                                    kinds[core] if kinds else None)
    for cpu in unknown:
        infos[cpu] = plugin.unknown_cpu_info(cpu)
    return infos


def oracle_ranks_1_4(infos, available, must, size):
    """The best (NUMA nodes, physical cores, (mixed kinds, slowest kind),
    last-level caches) over every valid answer, by exhaustive search.
    Unknown topology: a node, a core and a cache of the CPU's own; an
    unknown cache is its core's; an unknown kind is slower than any."""
    def nodes(cpu):
        info = infos.get(cpu)
        return set(info.numa_nodes) if info and info.numa_nodes else {("cpu", cpu)}

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
        self.pod_resources_mode = "serve"              # or "hang", "error"
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

    def _pod_resources_list(self, request, context):
        """ListPodResourcesResponse (pod_resources = 1) from the allocations made,
        with another resource beside ours and a pod that holds nothing of ours."""
        self._pod_resources_call("List", context)
        pods = collections.OrderedDict()
        with self.cond:
            for (namespace, pod, container), ids in self.allocations.items():
                pods.setdefault((namespace, pod), []).append(encode_container(
                    container, [("windriver.com/isolcpus", ids, [2]), ("example.com/nic", ["0000:3b:00.1"], [0])]))
        pods[("kube-system", "coredns-5d78c9869d-x2x7q")] = [encode_container("coredns", [], cpu_ids=[1])]
        return b"".join(pb_field(1, encode_pod(pod, namespace, containers))
                        for (namespace, pod), containers in pods.items())

    def _pod_resources_allocatable(self, request, context):
        """AllocatableResourcesResponse: devices = 1 (the healthy devices of the
        latest list, one ContainerDevices each, as the kubelet groups them), cpu_ids = 2."""
        self._pod_resources_call("GetAllocatableResources", context)
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
        subprocess.run(["umount", self.dir], check=True)
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
            started = time.monotonic()
            with self.assertRaises(grpc.RpcError) as caught:
                call(request, timeout=10)
            self.assertEqual(caught.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
            self.assertLess(time.monotonic() - started, 2.0)
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
                                                "container": "gateway", "pod_uid": None, "source": "pod-resources"})
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
                                  "pod_uid": pod_uid("net", "dpdk-fwd-0"), "source": "checkpoint"})
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
    kubelet (pid 4242) on housekeeping CPUs; cgroup v2; the kubelet dir with
    cpu_manager_state and config.yaml. Returns the doctor's path flags."""
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
    })
    with open(os.path.join(procfs, "4242", "cmdline"), "wb") as f:
        f.write(b"/usr/bin/kubelet\0--config=/var/lib/kubelet/config.yaml\0--v=2\0")
    os.symlink(os.path.join(root, "host-root"), os.path.join(procfs, "4242", "root"))
    return ["--sysfs", sysfs, "--procfs", procfs, "--kubelet-dir", os.path.join(root, "kubelet"),
            "--device-plugin-path", os.path.join(root, "device-plugins"), "--pod-resources-socket", "off"]


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
                 "housekeeping-masks"]


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
        self.assertRegex(lines[0], r"^isolcpu-plugin doctor: 11 PASS, 3 SKIP; holders ")
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


if __name__ == "__main__":
    unittest.main()
