#!/usr/bin/env python3
"""isolcpu-plugin: offers a node's isolated CPUs to the kubelet as devices.

A Kubernetes device plugin (API v1beta1). Every CPU the kernel isolated from
the scheduler (isolcpus=) becomes one device of the extended resource
windriver.com/isolcpus, ID = the CPU number, with its NUMA node; a container
that is allocated some gets them as $ISOLCPUS (e.g. "3,11"). A drop-in for
StarlingX's Go isolcpus plugin: same resource, socket name and device IDs.

Read top-down: values and parsing; reading the host; allocation policy (pure
functions); the gRPC servicer; the kubelet session and lifecycle, with the
PodResources client; the node audit (--doctor: the node read once, then pure
checks); the CLI. Needs only the standard library, grpcio and protobuf; grpc
is imported only to serve or to ask the kubelet, so --list and the host
checks of --doctor run with the standard library alone.
"""

import signal
import sys

# The signals the plugin documents are handled from the module's first lines
# (before them, for the 20-100 ms the interpreter takes to start, Python's
# defaults apply: the unit's Type=notify keeps systemd's reload until
# READY=1): Python's default for SIGHUP kills, and systemd counts death by
# SIGHUP as a clean exit, so `systemctl reload` right after a start would
# leave the node without a plugin. Until the event loop takes them over,
# SIGHUP is remembered and replayed, SIGTERM and SIGINT end the process with 0.
PENDING_SIGNALS = []


def _remember_signal(signum, frame):
    PENDING_SIGNALS.append(signum)


def _exit_now(signum, frame):
    raise SystemExit(0)


def hold_signals():
    signal.signal(signal.SIGHUP, _remember_signal)
    signal.signal(signal.SIGTERM, _exit_now)
    signal.signal(signal.SIGINT, _exit_now)


if __name__ == "__main__":
    hold_signals()

import argparse
import asyncio
import bisect
import collections
import concurrent.futures
import errno
import fcntl
import functools
import itertools
import json
import logging
import os
import re
import socket
import stat
import struct
import threading
import time

__version__ = "1.0.0"

PROGRAM = "isolcpu-plugin"
API_VERSION = "v1beta1"
DEFAULT_RESOURCE_NAME = "windriver.com/isolcpus"
DEFAULT_DEVICE_PLUGIN_PATH = "/var/lib/kubelet/device-plugins"
KUBELET_SOCKET_NAME = "kubelet.sock"
HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
# Highest CPU number accepted, and where the host does not say (no
# kernel_max): CONFIG_NR_CPUS tops out at 8192 (x86 MAXSMP, powerpc).
FALLBACK_MAX_CPU = 8191
# The shortest cpu-list any kernel takes whole: a kernel command line of the
# default COMMAND_LINE_SIZE (4096 on s390, mips and loongarch; 2048 on x86,
# arm64 and powerpc). See cpu_list_limit().
CPU_LIST_FLOOR = 4096
UNIX_PATH_MAX = 107            # sun_path is 108 bytes with its NUL
HOST_FILE_LIMIT = 1 << 20      # sysfs attributes are one page
# /proc/cmdline: COMMAND_LINE_SIZE is 2048 (x86, arm64, powerpc) to 4096 (s390)
# bytes by default, and bootconfig adds at most 32 KiB; only s390 can be built
# with more (up to 1 MiB). Splitting a command line costs a step per byte.
CMDLINE_LIMIT = 64 << 10
CHECKPOINT_LIMIT = 4 << 20     # a busy node's device checkpoint is ~1 MB; 4 MiB parse in ~12 ms

log = logging.getLogger(PROGRAM)


# ---------------------------------------------------------------------------
# Values and parsing
# ---------------------------------------------------------------------------

class InputError(Exception):
    """Bad configuration or host input. str() is the one line a user sees."""


def quote(text, limit=40):
    """repr() of untrusted text, cut so that logs and errors stay bounded."""
    text = str(text)
    if len(text) > limit:
        return repr(text[:limit]) + "..."
    return repr(text)


def quote_list(items, limit=5):
    """A bounded, quoted rendering of untrusted items: 'a', 'b' (+3 more)."""
    items = list(items)
    shown = ", ".join(quote(item, 20) for item in items[:limit])
    if len(items) > limit:
        shown += " (+%d more)" % (len(items) - limit)
    return shown


def one_line(error):
    """An exception as one log line."""
    text = str(error) or type(error).__name__
    return " ".join(text.split())


_CPULIST_SEPARATORS = re.compile(r"[, \t\n\r\f\v]+")
_CPU_NUMBER = r"[0-9]+|N"
_CPULIST_REGION = re.compile(
    r"(?:(?:(?P<all>[aA][lL][lL])|(?P<start>{n})-(?P<end>{n}))"
    r"(?::(?P<used>{n})/(?P<group>{n}))?|(?P<single>{n}))\Z".format(n=_CPU_NUMBER))


def cpu_list_limit(max_cpu):
    """The longest cpu-list text parsed for a kernel whose highest CPU is
    max_cpu: what cpuset.cpus takes (its write buffer is 100 + 6 * NR_CPUS
    bytes, kernel/cgroup/cpuset.c), or a kernel command line's worth,
    whichever is longer. Every list the kernel prints fits (canonical
    lists take under 4 bytes per CPU), and so does every isolcpus= of a
    default-size command line; with 8,192 CPUs it is 49,252 bytes."""
    return max(100 + 6 * (max_cpu + 1), CPU_LIST_FLOOR)


def stride_bits(start, end, used, group):
    """The bitmap of the stride group start-end:used/group, built by doubling
    one group's bits: log(groups) big-number steps, not a step per CPU."""
    span = end - start + 1
    pattern, width = (1 << used) - 1, group
    while width < span:
        pattern |= pattern << width
        width *= 2
    return (pattern & ((1 << span) - 1)) << start


def cpus_of_bits(bits):
    """The CPUs set in a bitmap (bit n = CPU n), a run of set bits at a time."""
    text = bin(bits)[:1:-1]                 # lowest bit first
    cpus = []
    start = text.find("1")
    while start >= 0:
        end = text.find("0", start)
        if end < 0:
            end = len(text)
        cpus.extend(range(start, end))
        start = text.find("1", end)
    return frozenset(cpus)


def bits_of_cpus(cpus):
    """The bitmap of a set of CPUs (cpus_of_bits undone), in one pass."""
    if not cpus:
        return 0
    digits = bytearray(b"0" * (max(cpus) + 1))
    for cpu in cpus:
        digits[cpu] = ord("1")
    return int(bytes(digits[::-1]), 2)


def parse_cpu_list(text, last_cpu, max_cpu=FALLBACK_MAX_CPU):
    """The CPUs a kernel cpu-list names, read as the kernel's bitmap_parselist does.

    Grammar: regions separated by commas or whitespace, in any order and
    overlapping (2-5,3); a region is `a`, `a-b`, `a-b:used/group` (stride
    groups: 0-15:2/4 = 0,1,4,5,8,9,12,13) or `all` (optionally with a
    stride); `N` is last_cpu. A CPU above max_cpu is an error. The work is
    bounded before it starts: a text longer than cpu_list_limit() is
    refused, and each region costs a few operations on a max_cpu-bit
    number, however many CPUs it names.
    """
    return cpus_of_bits(cpu_list_bits(text, last_cpu, max_cpu))


def cpu_list_bits(text, last_cpu, max_cpu=FALLBACK_MAX_CPU):
    """parse_cpu_list() as a bitmap (bit n = CPU n): for sets of many
    lists, which as bitmaps cost no more than their text."""
    limit = cpu_list_limit(max_cpu)
    if len(text) > limit:
        raise InputError("%d characters: longer than a cpu-list for %d CPUs can be (%d)"
                         % (len(text), max_cpu + 1, limit))

    def number(digits, token):
        if digits == "N":
            return last_cpu
        digits = digits.lstrip("0") or "0"    # the kernel reads any number of leading zeros
        if len(digits) > 10 or int(digits) > 0xFFFFFFFF:   # not a u32: the kernel's -EOVERFLOW
            raise InputError("number in %s is too large" % quote(token))
        return int(digits)

    bits = 0                                  # CPU n is bit n: a region merges in at once
    for token in _CPULIST_SEPARATORS.split(text):
        if not token:
            continue
        region = _CPULIST_REGION.match(token)
        if not region:
            raise InputError("%s is not a CPU, range or stride group" % quote(token))
        every, first, last, used, group, single = region.groups()
        if single is not None:
            start = end = number(single, token)
        elif every is not None:
            start, end = 0, last_cpu
        else:
            start, end = number(first, token), number(last, token)
        if used is not None:
            used, group = number(used, token), number(group, token)
        else:
            used = group = end - start + 1
        if start > end:
            raise InputError("range %s runs backwards" % quote(token))
        if group == 0 or used > group:
            raise InputError("stride group %s needs used <= group and group > 0" % quote(token))
        if end > max_cpu:
            raise InputError("CPU %d in %s is above the highest possible CPU %d"
                             % (end, quote(token), max_cpu))
        if start + group > 0xFFFFFFFF:
            # The kernel's loop, for (start; start <= end; start += group),
            # is in unsigned int: a group of 2**32 - d (d <= start) steps
            # back d at a time, setting `used` bits (cut at end) from start,
            # start - d, ... down to start % d; the same bits as the stride
            # start % d-(start + used - 1):used/d, cut at end.
            step = (1 << 32) - group
            start, end, group = start % step, min(end, start + used - 1), step
        # Only whole groups that start in the range count, and only their bits
        # in it: cut used and group to the range's length so that no number
        # built is longer than the range, whatever the stride numbers say
        # (0-1:3999999999/4000000000 built a 4e9-bit number).
        span = end - start + 1
        used, group = min(used, span), min(group, span)
        if used >= group:
            bits |= ((2 << (end - start)) - 1) << start
        elif used:
            bits |= stride_bits(start, end, used, group)
    return bits


def format_cpu_list(cpus):
    """The canonical cpu-list: ascending, runs collapsed, as the kernel prints ("2-5,8")."""
    runs = []
    for cpu in sorted(cpus):
        if runs and runs[-1][1] == cpu - 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else "%d-%d" % (a, b) for a, b in runs)


def brief_cpu_list(cpus, limit=120):
    """format_cpu_list() cut to about `limit` characters, for logging CPU
    numbers that came from a request (scattered ones do not collapse)."""
    text = format_cpu_list(cpus)
    if len(text) <= limit:
        return text
    return "%s... (%d CPUs)" % (text[:text.rfind(",", 0, limit)], len(set(cpus)))


_MASK_WORD = re.compile(r"[0-9a-fA-F]{1,8}\Z")


def parse_cpu_mask(text, max_cpu=FALLBACK_MAX_CPU):
    """The CPUs set in a kernel hex cpumask ("00000000,00000101": 32-bit words,
    most significant first), the only form old kernels give."""
    words = text.strip().split(",")
    if len(words) > max_cpu // 32 + 1 or not all(_MASK_WORD.match(word) for word in words):
        raise InputError("%s is not a hex cpumask" % quote(text))
    value = 0
    for word in words:
        value = (value << 32) | int(word, 16)
    if value.bit_length() - 1 > max_cpu:
        raise InputError("cpumask %s sets CPU %d, above the highest possible CPU %d"
                         % (quote(text), value.bit_length() - 1, max_cpu))
    return cpus_of_bits(value)


def kernel_parameters(cmdline):
    """(name, value) pairs of a kernel command line; quotes are dropped as the
    kernel's next_arg does, and everything after a bare `--` belongs to init."""
    params = []
    token, in_quote = [], False
    for char in cmdline + " ":
        if char == '"':
            in_quote = not in_quote
        elif char.isspace() and not in_quote:
            if token:
                word = "".join(token)
                if word == "--":
                    break
                name, _, value = word.partition("=")
                params.append((name, value))
                token = []
        else:
            token.append(char)
    return params


ISOLCPUS_FLAGS = ("nohz", "domain", "managed_irq")
_ISOLCPUS_FLAG = re.compile(r"[A-Za-z_]+\Z")
_ASCII_LETTER = re.compile(r"[A-Za-z]")


def parse_isolcpus(value):
    """Split an isolcpus= value into (flags, cpu-list text) as
    kernel/sched/isolation.c does: leading alphabetic words each followed by a
    comma are flags; unknown ones are skipped. Raises InputError where the
    kernel ignores the whole parameter."""
    flags, rest = [], value
    while _ASCII_LETTER.match(rest):
        flag, comma, tail = rest.partition(",")
        if not _ISOLCPUS_FLAG.match(flag):
            raise InputError("isolcpus=%s has the invalid flag %s, so the kernel ignored it"
                             % (quote(value), quote(flag)))
        if not comma:
            raise InputError("isolcpus=%s has no cpu-list after its flags" % quote(value))
        flags.append(flag)
        rest = tail
    return tuple(flags), rest


def isolcpus_isolates_domain(flags):
    """True when isolcpus= with these flags removes CPUs from scheduler domains
    (what /sys/devices/system/cpu/isolated reports): `domain`, or no known flag."""
    known = [flag for flag in flags if flag in ISOLCPUS_FLAGS]
    return "domain" in known or not known


def cmdline_cpu_list(cmdline, param, domain_only=False):
    """(cpu-list text of `param` on a kernel command line or None, problems).
    For isolcpus, the first occurrence the kernel would apply: its flags
    parse, and with domain_only they isolate from scheduler domains (a later
    conflicting isolcpus= is refused by the kernel)."""
    problems = []
    for name, value in kernel_parameters(cmdline):
        if name != param:
            continue
        if param != "isolcpus":
            return value, problems
        try:
            flags, cpu_list = parse_isolcpus(value)
        except InputError as e:
            problems.append(str(e))
            continue
        if not domain_only or isolcpus_isolates_domain(flags):
            return cpu_list, problems
    return None, problems


_DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(r"{0}(?:\.{0})*\Z".format(_DNS_LABEL))
_RESOURCE_NAME_PART = re.compile(r"[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?\Z")


def check_resource_name(name):
    """Raise InputError unless the kubelet would accept `name` as an extended
    resource: <DNS subdomain>/<name>, not under kubernetes.io/, not requests.*"""
    prefix, slash, part = name.partition("/")
    if not slash or "/" in part:
        raise InputError("must be <domain>/<name> with exactly one '/'")
    if "kubernetes.io/" in name:
        raise InputError("names under kubernetes.io/ are reserved for native resources")
    if name.startswith("requests."):
        raise InputError("must not start with 'requests.'")
    if len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix):
        raise InputError("prefix %s is not a DNS subdomain" % quote(prefix))
    if len(part) > 63 or not _RESOURCE_NAME_PART.match(part):
        raise InputError("name %s must be 1-63 of [A-Za-z0-9._-], starting and ending "
                         "alphanumeric" % quote(part))


def socket_name_for(resource_name):
    """The plugin's socket file name, as the Go plugin named it."""
    return resource_name.replace("/", "-") + ".sock"


# ---------------------------------------------------------------------------
# Reading the host
# ---------------------------------------------------------------------------

# What sysfs says about one CPU. numa_nodes and thread_siblings are sorted
# tuples, () when unknown; package, die, cluster and core_id are ints or None.
# llc_cpus: the CPUs sharing its last-level cache (sorted), () when unknown or
# private to its core; core_class: its kind of core, 0 the fastest on this
# machine, None with one kind or unknown. Both default, so that the CpuInfo
# of seven fields still builds.
CpuInfo = collections.namedtuple(
    "CpuInfo", "cpu numa_nodes package die cluster core_id thread_siblings llc_cpus core_class")
CpuInfo.__new__.__defaults__ = ((), None)       # namedtuple(defaults=) needs Python 3.7


def unknown_cpu_info(cpu):
    return CpuInfo(cpu, (), None, None, None, None, ())


def host_text(data, encoding="latin-1"):
    """A host file's bytes as the kernel's readers take its text: up to the
    first NUL (real dumps pad "0-31\\n" with one), whitespace stripped;
    None when more than NULs and whitespace follow that NUL: not text."""
    text, _, rest = data.partition(b"\0")
    if rest.strip(b"\0 \t\n\r\x0b\x0c"):
        return None
    return text.decode(encoding, "replace").strip()


def read_host_file(path, limit=HOST_FILE_LIMIT, follow_symlinks=True):
    """The bytes of a host file, None when it is absent. Opened so that it
    cannot block the event loop: only a regular file is opened at all (a FIFO
    or a device where a sysfs file or a checkpoint should be is an error),
    with O_NONBLOCK in case it was swapped meanwhile, and read up to `limit`.
    Without follow_symlinks, a symlink is an error too (O_NOFOLLOW)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        mode = (os.stat(path) if follow_symlinks else os.lstat(path)).st_mode
        if stat.S_ISLNK(mode):
            raise InputError("%s: a symlink, not followed" % path)
        if not stat.S_ISREG(mode):
            raise InputError("%s: not a regular file" % path)
        fd = os.open(path, flags if follow_symlinks else flags | os.O_NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise InputError("%s: %s" % (path, e.strerror or e))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError("%s: not a regular file" % path)
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 16, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise InputError("%s: %s" % (path, e.strerror or e))
    finally:
        os.close(fd)
    if size > limit:
        raise InputError("%s: larger than %d bytes" % (path, limit))
    return b"".join(chunks)


# Hybrid Intel's PMU devices, each listing its CPUs: fastest kind first.
HYBRID_PMUS = ("cpu_core", "cpu_atom")


def capacity_classes(capacities):
    """{cpu: kind of core} from {cpu: cpu_capacity}, 0 the fastest. A kind
    starts at its highest capacity and takes every capacity within 5 % below
    it: boost and binning make one kind of core report several (NVIDIA GB10's
    big cores say 997, 1017 and 1024, its little ones 718 and 731)."""
    kind_of, kind, top = {}, -1, None
    for capacity in sorted(set(capacities.values()), reverse=True):
        if top is None or capacity * 100 < top * 95:
            kind, top = kind + 1, capacity
        kind_of[capacity] = kind
    return {cpu: kind_of[capacity] for cpu, capacity in capacities.items()}


class Host(object):
    """A host's CPU files under a sysfs and a procfs root: all file reading
    lives here, so that everything else can be tested without a host."""

    def __init__(self, sysfs="/sys", procfs="/proc"):
        self.cpu_dir = os.path.join(sysfs, "devices", "system", "cpu")
        self.devices_dir = os.path.join(sysfs, "devices")
        self.node_dir = os.path.join(sysfs, "devices", "system", "node")
        self.cmdline_path = os.path.join(procfs, "cmdline")
        if not os.path.isdir(self.cpu_dir):
            raise InputError("--sysfs %s: no devices/system/cpu directory there" % quote(sysfs, 200))
        self.max_cpu = self._max_cpu()
        self.last_cpu = self._last_cpu()
        self._kinds = None              # core_kinds(), read once: kinds of core do not change while the kernel runs

    # Files -----------------------------------------------------------------

    def read(self, path, limit=HOST_FILE_LIMIT, what="text"):
        """A host file's text (see host_text), or None when the file is
        absent; InputError saying it is not `what` when it holds junk."""
        data = read_host_file(path, limit)
        if data is None:
            return None
        text = host_text(data)
        if text is None:
            raise InputError("%s: %s is not %s" % (path, quote(data.decode("latin-1")), what))
        return text

    def optional_text(self, path, problems=None):
        """read() for files that only refine what is advertised: unreadable
        is absent (noted in `problems` under the file's name when given)."""
        try:
            return self.read(path)
        except InputError as e:
            if problems is not None:
                problems.setdefault(os.path.basename(path), str(e))
            return None

    def cpu_list_file(self, path):
        """A cpu-list file as a set, None when absent; bad contents name the file."""
        text = self.read(path, what="a cpu-list")
        if text is None:
            return None
        try:
            return parse_cpu_list(text, self.last_cpu, self.max_cpu)
        except InputError as e:
            raise InputError("%s: %s" % (path, e))

    # CPU numbering ---------------------------------------------------------

    def _max_cpu(self):
        """kernel_max, where it is one a kernel can have (what parsing costs
        is bounded by it), else the most any kernel has."""
        text = self.optional_text(os.path.join(self.cpu_dir, "kernel_max"))
        if text is not None and text.isdigit() and len(text) <= 6 and int(text) <= FALLBACK_MAX_CPU:
            return int(text)
        if text is not None:
            log.warning("%s: %s is not a kernel_max any kernel has; CPUs up to %d are read",
                        os.path.join(self.cpu_dir, "kernel_max"), quote(text), FALLBACK_MAX_CPU)
        return FALLBACK_MAX_CPU

    def _last_cpu(self):
        """The last possible CPU (what `N` and `all` mean): from `possible`,
        else the highest cpuN directory."""
        self.last_cpu = self.max_cpu            # `possible` may itself say N
        try:
            possible = self.cpu_list_file(os.path.join(self.cpu_dir, "possible"))
        except InputError as e:
            log.warning("%s; the highest cpuN directory is taken as the last CPU", e)
            possible = None
        if possible:
            return max(possible)
        return max([cpu for cpu in self._cpu_dirs() if cpu <= self.max_cpu] or [self.max_cpu])

    def _cpu_dirs(self):
        try:
            names = os.listdir(self.cpu_dir)
        except OSError:
            return []
        return [int(name[3:]) for name in names
                if name.startswith("cpu") and name[3:].isdigit() and len(name) <= 9]

    # CPU sets --------------------------------------------------------------

    def present_cpus(self):
        present = self.cpu_list_file(os.path.join(self.cpu_dir, "present"))
        if present is None:                      # old kernels: the cpuN directories
            present = frozenset(cpu for cpu in self._cpu_dirs() if cpu <= self.max_cpu)
        return present

    def online_cpus(self, present):
        """The online CPUs; where there is no `online` list, each CPU's own
        file (no file means it cannot go offline, so it is online)."""
        online = self.cpu_list_file(os.path.join(self.cpu_dir, "online"))
        if online is not None:
            return online
        result = set()
        for cpu in present:
            path = os.path.join(self.cpu_dir, "cpu%d" % cpu, "online")
            text = self.read(path)
            if text not in (None, "", "0", "1"):       # some old dumps leave it empty: no news
                raise InputError("%s: %s is not 0 or 1" % (path, quote(text)))
            if text != "0":
                result.add(cpu)
        return frozenset(result)

    def cmdline(self):
        text = self.read(self.cmdline_path, CMDLINE_LIMIT, "a command line")
        if text is None:
            raise InputError("%s: missing" % self.cmdline_path)
        return text

    # Topology --------------------------------------------------------------

    def cpu_topology(self, cpus):
        """CpuInfo for each CPU. Missing or unparseable files make that item
        unknown (logged once per file kind), never an error: topology only
        refines what is advertised."""
        node_cpus = self._node_cpu_lists()
        problems = {}
        kinds = self.core_kinds(problems)[1]
        caches = {}                              # what _last_level_cache() read, for the CPUs sharing a cache
        infos = {}
        for cpu in cpus:
            info = self._one_cpu_topology(cpu, node_cpus, problems)
            infos[cpu] = info._replace(llc_cpus=self._last_level_cache(cpu, info.thread_siblings, caches, problems),
                                       core_class=kinds.get(cpu))
        for kind, example in sorted(problems.items()):
            log.warning("topology: %s unreadable, taken as unknown (e.g. %s)", kind, example)
        return infos

    def _node_cpu_lists(self):
        """{node: cpus} from node/nodeK/cpulist (or the cpumap mask); None
        without a node/ tree (kernels without CONFIG_NUMA)."""
        try:
            names = os.listdir(self.node_dir)
        except OSError:
            return None
        nodes = {}
        for name in names:
            if not (name.startswith("node") and name[4:].isdigit()):
                continue
            directory = os.path.join(self.node_dir, name)
            try:
                cpus = self.cpu_list_file(os.path.join(directory, "cpulist"))
                if cpus is None:
                    mask = self.read(os.path.join(directory, "cpumap"), what="a cpumask")
                    cpus = parse_cpu_mask(mask, self.max_cpu) if mask is not None else None
            except InputError as e:                     # unreadable or unparseable alike
                log.warning("topology: %s; NUMA node %s taken as unknown", e, name[4:])
                cpus = None
            if cpus is not None:
                nodes[int(name[4:])] = cpus
        return nodes

    def _one_cpu_topology(self, cpu, node_cpus, problems):
        cpu_path = os.path.join(self.cpu_dir, "cpu%d" % cpu)
        topo = os.path.join(cpu_path, "topology")

        def number(name):
            path = os.path.join(topo, name)
            text = self.optional_text(path, problems)
            if text is None:
                return None
            if re.match(r"-?[0-9]{1,9}\Z", text):
                value = int(text)
                return value if value >= 0 else None      # -1: the arch does not know
            problems.setdefault(name, "%s = %s" % (path, quote(text)))
            return None

        def cpu_set(list_names, mask_names):
            for name in list_names + mask_names:
                path = os.path.join(topo, name)
                text = self.optional_text(path, problems)
                if text is None:
                    continue
                try:
                    if name in list_names:
                        return parse_cpu_list(text, self.last_cpu, self.max_cpu)
                    return parse_cpu_mask(text, self.max_cpu)
                except InputError as e:          # try the next form of the same fact
                    problems.setdefault(name, "%s: %s" % (path, e))
            return None

        siblings = cpu_set(["core_cpus_list", "thread_siblings_list"], ["core_cpus", "thread_siblings"])
        if siblings is not None and cpu not in siblings:
            problems.setdefault("thread siblings", "cpu%d is not among its own" % cpu)
            siblings = None
        return CpuInfo(cpu=cpu,
                       numa_nodes=self._numa_nodes(cpu, cpu_path, node_cpus),
                       package=number("physical_package_id"),
                       die=number("die_id"),
                       cluster=number("cluster_id"),
                       core_id=number("core_id"),
                       thread_siblings=tuple(sorted(siblings)) if siblings else ())

    # Caches and kinds of core ----------------------------------------------

    def _caches(self, cpu, memo, problems):
        """[(level, directory)] of the CPU's data and unified caches, highest
        level first (the index number is not the level: some machines keep L3
        in index2, or an L2 instruction cache in index3); None without a cache
        directory (an offline CPU on most kernels)."""
        key = ("caches", cpu)
        if key not in memo:
            directory = os.path.join(self.cpu_dir, "cpu%d" % cpu, "cache")
            try:
                names = os.listdir(directory)
            except OSError:
                names = None
            caches = None
            if names is not None:
                caches = []
                for name in names:
                    if not re.match(r"index[0-9]{1,3}\Z", name):
                        continue
                    path = os.path.join(directory, name)
                    if self.optional_text(os.path.join(path, "type"), problems) not in ("Data", "Unified"):
                        continue
                    level = self.optional_text(os.path.join(path, "level"), problems)
                    if level is not None and re.match(r"[0-9]{1,2}\Z", level):
                        caches.append((int(level), path))
                    elif level is not None:
                        problems.setdefault("level", "%s/level = %s" % (path, quote(level)))
                caches.sort(key=lambda cache: (-cache[0], cache[1]))
            memo[key] = caches
        return memo[key]

    def _cache_cpus(self, path, memo, problems):
        """(id, CPUs) of one cache: its shared_cpu_list, else its
        shared_cpu_map; CPUs None when neither reads, or when both do and
        neither holds the other (that one leaves offline CPUs out is seen on
        real kernels). The id (text, None when absent) only has to match."""
        key = ("cpus", path)
        if key not in memo:
            found = []
            for name, parse in (("shared_cpu_list", lambda text: parse_cpu_list(text, self.last_cpu, self.max_cpu)),
                                ("shared_cpu_map", lambda text: parse_cpu_mask(text, self.max_cpu))):
                text = self.optional_text(os.path.join(path, name), problems)
                if text is None:
                    continue
                try:
                    found.append(parse(text))
                except InputError as e:
                    problems.setdefault(name, "%s/%s: %s" % (path, name, e))
            cpus = found[0] if found else None
            if len(found) == 2 and not (found[0] <= found[1] or found[1] <= found[0]):
                problems.setdefault("last-level cache", "%s: shared_cpu_list and shared_cpu_map disagree" % path)
                cpus = None
            if cpus is not None:
                # Only the host's CPUs: a cache naming CPUs that are not
                # present (no cpuN, not in `present`; 40-50 on an 8-CPU host)
                # holds the present ones, as hwloc's cache objects hold only
                # the machine's CPUs (its cpuset is the cpuN directories).
                # Present but offline CPUs stay: they keep the cache.
                if "present" not in memo:
                    try:
                        memo["present"] = self.present_cpus()
                    except InputError:
                        memo["present"] = frozenset(self._cpu_dirs())
                if not cpus <= memo["present"]:
                    if "absent warned" not in memo:      # once a read, not once per CPU of the cache
                        memo["absent warned"] = True
                        log.warning("topology: %s names CPUs %s, which are not present; they are left out",
                                    path, brief_cpu_list(cpus - memo["present"]))
                    cpus &= memo["present"]
            memo[key] = (self.optional_text(os.path.join(path, "id"), problems), cpus)
        return memo[key]

    def _last_level_cache(self, cpu, siblings, memo, problems):
        """The CPUs sharing the CPU's last-level cache: its highest-level data
        or unified cache shared with more than its own core, as a sorted
        tuple. () when there is none, and when the files contradict
        themselves (a cache that does not list the CPU, a list and a mask
        that disagree, a CPU of the cache that describes it otherwise): a
        cache known wrong is worse for the policy than none."""
        own = set(siblings) or {cpu}
        for level, path in self._caches(cpu, memo, problems) or ():
            ident, cpus = self._cache_cpus(path, memo, problems)
            if cpus is None:
                return ()
            if cpu not in cpus:
                problems.setdefault("last-level cache", "%s does not list cpu%d" % (path, cpu))
                return ()
            if cpus - own:
                break
        else:
            return ()                    # no cache, or each private to the core
        key = ("agreed", level, ident, cpus)
        if key not in memo:              # once per cache: every CPU of it that has caches says the same
            memo[key] = all(self._describes_cache(other, level, ident, cpus, memo, problems)
                            for other in sorted(cpus) if other != cpu)
            if not memo[key]:
                problems.setdefault("last-level cache", "the CPUs of %s describe it differently" % path)
        return tuple(sorted(cpus)) if memo[key] else ()

    def _describes_cache(self, cpu, level, ident, cpus, memo, problems):
        """Whether the CPU has the same cache at `level`, or no caches at all
        (offline CPUs keep none on most kernels)."""
        caches = self._caches(cpu, memo, problems)
        if caches is None:
            return True
        for other_level, path in caches:
            if other_level == level:
                return self._cache_cpus(path, memo, problems) == (ident, cpus)
        return False

    def core_kinds(self, problems=None):
        """(the files that tell the kinds of core, {cpu: kind} with 0 the
        fastest). The kinds come from hybrid Intel's PMU lists, else from each
        CPU's cpu_capacity (arm64, newer x86); with one kind, or where
        neither tells, the map is empty. Frequencies alone make no kinds: a
        part binned or boosted per core is one kind of core."""
        if self._kinds is None:
            self._kinds = self._read_core_kinds({} if problems is None else problems)
        return self._kinds

    def _read_core_kinds(self, problems):
        files, kinds = [], {}
        for kind, name in enumerate(HYBRID_PMUS):
            path = os.path.join(self.devices_dir, name, "cpus")
            text = self.optional_text(path, problems)
            if text is None:
                continue
            try:
                cpus = parse_cpu_list(text, self.last_cpu, self.max_cpu)
            except InputError as e:
                problems.setdefault(name + "/cpus", "%s: %s" % (path, e))
                continue
            files.append(path)
            for cpu in cpus:
                kinds[cpu] = None if cpu in kinds else kind          # in both lists: unknown
        if not files:
            capacities = {}
            for cpu in sorted(self._cpu_dirs()):
                path = os.path.join(self.cpu_dir, "cpu%d" % cpu, "cpu_capacity")
                text = self.optional_text(path, problems)
                if text is not None and re.match(r"[0-9]{1,7}\Z", text) and int(text) > 0:
                    capacities[cpu] = int(text)
                elif text is not None:
                    problems.setdefault("cpu_capacity", "%s = %s" % (path, quote(text)))
            if capacities:
                files.append(os.path.join(self.cpu_dir, "cpuN", "cpu_capacity"))
            kinds = capacity_classes(capacities)
        kinds = {cpu: kind for cpu, kind in kinds.items() if kind is not None}
        if len(set(kinds.values())) < 2:
            kinds = {}
        return files, kinds

    def _numa_nodes(self, cpu, cpu_path, node_cpus):
        """The nodes whose cpulist holds the CPU; failing that (an offline CPU
        may be in none) the cpuN/nodeK links the Go plugin read, where that
        node exists (a link to an offline node dangles)."""
        if node_cpus is None:
            return ()
        nodes = sorted(node for node, cpus in node_cpus.items() if cpu in cpus)
        if not nodes:
            try:
                nodes = sorted(int(name[4:]) for name in os.listdir(cpu_path)
                               if name.startswith("node") and name[4:].isdigit()
                               and int(name[4:]) in node_cpus)
            except OSError:
                nodes = []
        return tuple(nodes)


def cpuid_path(cpu):
    return "/dev/cpu/%d/cpuid" % cpu


def cpuid_device_paths(cpus, mode):
    """/dev/cpu/N/cpuid for each CPU, as the Go plugin passed them: `always`,
    `never`, or `auto` = those that exist here."""
    if mode == "never" or (mode == "auto" and not os.path.isdir("/dev/cpu")):
        return []                      # no cpuid module: one stat, not one per CPU
    paths = [cpuid_path(cpu) for cpu in sorted(cpus)]
    if mode == "auto":
        paths = [path for path in paths if os.path.exists(path)]
    return paths


def pin_threads(cpus):
    """Restrict every thread of this process to `cpus`. sched_setaffinity
    moves one thread, so each is moved; threads created later inherit it
    from their creator. Returns [(thread id, error)] for those that failed."""
    failures = []
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]                                  # no /proc: this thread at least
    for tid in threads:
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:
            pass                                       # ended meanwhile
        except OSError as e:
            failures.append((tid, e))
    return failures


CHECKPOINT_NAME = "kubelet_internal_checkpoint"


def read_checkpoint(directory):
    """The kubelet's device-manager checkpoint (bytes), None when absent;
    InputError when it cannot be read cheaply (see read_host_file)."""
    return read_host_file(os.path.join(directory, CHECKPOINT_NAME), CHECKPOINT_LIMIT)


SOURCES = ("auto", "isolated", "cmdline", "nohz_full")


class CpuInventory(object):
    """What the plugin advertises, rebuilt from the host on each rescan.

    A rescan reads two lists (the isolated source and `online`); the rest
    (present CPUs, topology) is read again only when those change. When the
    host's files turn unreadable the last good state stays (logged)."""

    def __init__(self, host, source="auto", cpus_text=None, cpus_origin="--cpus"):
        self.host = host
        self.explicit = None
        self.explicit_origin = cpus_origin
        if cpus_text is not None:
            try:
                self.explicit = parse_cpu_list(cpus_text, host.last_cpu, host.max_cpu)
            except InputError as e:
                raise InputError("%s %s: %s" % (cpus_origin, quote(cpus_text), e))
        self.source = source
        if source == "auto":        # the isolated file (kernel 4.12+), else isolcpus= with `domain`
            has_file = os.path.exists(os.path.join(host.cpu_dir, "isolated"))
            self.source = "isolated" if has_file else "isolcpus-domain"
        self.cmdline_cpus = None         # (cpus, origin) from /proc/cmdline, per (re)load
        self.origin = ""
        self.served = self.present = self.online = frozenset()
        self.topology = {}
        self.devices = ()
        self.reload()
        self.scan()

    def reload(self):
        """Read what does not change while the kernel runs: /proc/cmdline and
        the CPUs it names for a command-line source (problems logged once)."""
        cmdline_cpus = None
        if self.explicit is None and self.source in ("cmdline", "isolcpus-domain"):
            cmdline_cpus = self._from_cmdline("isolcpus")
        self.cmdline_cpus = cmdline_cpus

    def _from_cmdline(self, param):
        path = self.host.cmdline_path
        text, problems = cmdline_cpu_list(self.host.cmdline(), param,
                                          domain_only=self.source == "isolcpus-domain")
        for problem in problems:
            log.warning("%s: %s", path, problem)
        origin = "%s %s=" % (path, param)
        if text is None:
            return frozenset(), origin
        try:
            return parse_cpu_list(text, self.host.last_cpu, self.host.max_cpu), origin
        except InputError as e:
            raise InputError("%s %s=%s: %s" % (path, param, quote(text), e))

    def served_cpus(self):
        """(CPUs to serve, where they came from); InputError when unreadable."""
        host = self.host
        if self.explicit is not None:
            return self.explicit, self.explicit_origin
        if self.cmdline_cpus is not None:
            return self.cmdline_cpus
        if self.source == "isolated":
            path = os.path.join(host.cpu_dir, "isolated")
            cpus = host.cpu_list_file(path)
            if cpus is None:
                raise InputError("%s: missing (kernel older than 4.12?); try --source cmdline" % path)
            return cpus, path
        # nohz_full: the file CONFIG_NO_HZ_FULL makes, else the command line (read once)
        path = os.path.join(host.cpu_dir, "nohz_full")
        text = host.read(path, what="a cpu-list")
        if text is None:
            self.cmdline_cpus = self._from_cmdline("nohz_full")
            return self.cmdline_cpus
        try:
            return parse_cpu_list("" if text == "(null)" else text, host.last_cpu, host.max_cpu), path
        except InputError as e:
            raise InputError("%s: %s" % (path, e))

    def scan(self):
        """Read the host; return a log line when the devices changed, else
        None. Raises InputError when a file that decides the devices is bad,
        having changed nothing: the last good state stays."""
        served, origin = self.served_cpus()
        online = self.host.online_cpus(self.present)
        if (served, online, origin) == (self.served, self.online, self.origin):
            return None
        # `present` changes only with a hotplug, which changes `online` too
        present = self.host.present_cpus()
        if present != self.present:
            online = self.host.online_cpus(present)
        missing = served - present
        if missing and missing != self.served - self.present:
            log.warning("%s lists CPUs %s that this host does not have; they are left out",
                        origin, brief_cpu_list(missing))
        wanted = served & present
        stale = {cpu for cpu in wanted
                 if cpu not in self.topology or (cpu in online) != (cpu in self.online)}
        self.topology = {cpu: info for cpu, info in self.topology.items() if cpu in wanted}
        self.topology.update(self.host.cpu_topology(sorted(stale)))
        # A CPU going off- or online leaves or joins the cache lists of the
        # CPUs sharing its cache: read those again, found in their old lists
        # or in the returning CPU's own.
        hotplugged = (online ^ self.online) & present if self.online else frozenset()
        if hotplugged:
            back = self.host.cpu_topology(sorted(hotplugged & online - stale))
            back.update((cpu, self.topology[cpu]) for cpu in hotplugged & stale)
            hit = {llc for llc in {info.llc_cpus for info in self.topology.values()} if hotplugged.intersection(llc)}
            mates = {cpu for cpu, info in self.topology.items() if info.llc_cpus in hit}
            mates.update(cpu for info in back.values() for cpu in info.llc_cpus if cpu in wanted)
            self.topology.update(self.host.cpu_topology(sorted(mates - stale)))
        self.served, self.present, self.online, self.origin = served, present, online, origin
        devices = build_devices(wanted, online, self.topology)
        change = describe_device_changes(self.devices, devices)
        self.devices = devices
        return change


# ---------------------------------------------------------------------------
# Allocation policy (pure: data in, data out)
# ---------------------------------------------------------------------------

# One advertised device: a CPU, whether it is healthy (online), its topology.
Device = collections.namedtuple("Device", "cpu healthy info")


def device_id(cpu):
    return str(cpu)


def build_devices(cpus, online, topology):
    """The devices to advertise: one per CPU, healthy when online."""
    return tuple(Device(cpu, cpu in online, topology.get(cpu) or unknown_cpu_info(cpu))
                 for cpu in sorted(cpus))


def describe_device_changes(old, new):
    """One log line saying how the device list changed, or None."""
    if old == new:
        return None
    old_health = {d.cpu: d.healthy for d in old}
    new_health = {d.cpu: d.healthy for d in new}
    parts = []
    for label, cpus in (
            ("added", [c for c in new_health if c not in old_health]),
            ("removed", [c for c in old_health if c not in new_health]),
            ("now unhealthy (offline)", [c for c in new_health if old_health.get(c) and not new_health[c]]),
            ("healthy again", [c for c in new_health if old_health.get(c) is False and new_health[c]])):
        if cpus:
            parts.append("%s %s" % (label, format_cpu_list(cpus)))
    if not parts:
        parts.append("topology updated")
    healthy = [d.cpu for d in new if d.healthy]
    return "devices changed: %s; advertising %d, healthy %s" % (
        ", ".join(parts), len(new), format_cpu_list(healthy) or "none")


class RequestError(Exception):
    """A request the plugin refuses (INVALID_ARGUMENT); str() names what is wrong."""


# What one Allocate or GetPreferredAllocation call may carry. The kubelet
# sends one container request per call, with at most the devices advertised
# (<= 8192 CPUs); beyond these a call is refused before any work is done, so
# that neither the time a call holds the event loop nor its log lines grow
# with what a client sends.
MAX_CONTAINER_REQUESTS = 16
MAX_REQUEST_IDS = 65536


def check_request_bounds(containers, ids_in=len):
    """RequestError when a call carries more container requests or device
    IDs (ids_in(container) of each) than the bounds above."""
    if len(containers) > MAX_CONTAINER_REQUESTS:
        raise RequestError("%d container requests in one call; at most %d are served (the kubelet sends one)"
                           % (len(containers), MAX_CONTAINER_REQUESTS))
    count = sum(ids_in(container) for container in containers)
    if count > MAX_REQUEST_IDS:
        raise RequestError("%d device IDs in one call; at most %d are served" % (count, MAX_REQUEST_IDS))


def devices_for_ids(ids, devices_by_id):
    """The devices behind one container's device IDs, in one pass (this is
    Allocate's hot path); RequestError names the bad IDs."""
    ids = list(ids)
    devices = [devices_by_id.get(i) for i in ids]
    if not ids:
        raise RequestError("no device IDs in the request")
    if None in devices:
        raise RequestError("unknown device IDs %s" % quote_list(
            i for i, device in zip(ids, devices) if device is None))
    if len(set(ids)) != len(ids):
        counts = collections.Counter(ids)
        raise RequestError("duplicate device IDs %s" % quote_list(i for i in counts if counts[i] > 1))
    return devices


def housekeeping_cpus(online, isolated, allowed):
    """Where the plugin itself should run: online, not isolated, allowed to it."""
    return (frozenset(online) - frozenset(isolated)) & frozenset(allowed)


def container_cpuset(kubelet, advertised, held, online):
    """The one rule of the runtime side: ((B - A) | H) & online, B =
    `kubelet` (the cpuset the kubelet wants for a container; None: it sets
    none, every online CPU), A = `advertised`, H = `held` (the kubelet's word
    on what the container holds). A holder runs on its isolated CPUs and on
    what the kubelet gave it; nobody else runs on an advertised CPU."""
    wanted = online if kubelet is None else kubelet
    return ((wanted - advertised) | held) & online


def granted_unheld(kubelet, advertised, held, online):
    """The advertised CPUs the kubelet gives a container that does not hold
    them (the static policy granting an isolated CPU exclusively)."""
    wanted = online if kubelet is None else kubelet
    return (wanted & advertised & online) - held


_DEVICE_ID = re.compile(r"(?:0|[1-9][0-9]{0,8})\Z")     # a CPU number as this plugin writes it


# Who holds an allocated CPU: a container, as PodResources names it
# (namespace, pod, container) or as the kubelet's checkpoint does (pod UID,
# container); the fields a source does not give are None. source is
# "pod-resources" or "checkpoint". init_or_app: the checkpoint names this
# container and another of its pod for the same CPU, as the kubelet does when
# an app container reuses an init container's devices; which one runs, the
# checkpoint cannot tell.
Holder = collections.namedtuple("Holder", "namespace pod container pod_uid source init_or_app")
Holder.__new__.__defaults__ = (False,)
HOLDER_SOURCES = {"pod-resources": "PodResources", "checkpoint": "the kubelet's checkpoint"}


def holder_name(holder):
    """namespace/pod/container, or pod-uid/container from the checkpoint."""
    if holder.namespace is not None:
        name = "%s/%s/%s" % (holder.namespace, holder.pod, holder.container)
    else:
        name = "%s/%s" % (holder.pod_uid, holder.container)
    return name + " (init or app)" if holder.init_or_app else name


def holder_record(holder):
    """A holder as `--list --json` prints it (a contract: keep these keys)."""
    return collections.OrderedDict([("namespace", holder.namespace), ("pod", holder.pod),
                                    ("container", holder.container), ("pod_uid", holder.pod_uid),
                                    ("source", holder.source), ("init_or_app", holder.init_or_app)])


def holders_by_cpu(holdings):
    """{cpu: (Holder, ...)} from (device IDs, Holder) pairs, each holder once
    per CPU in the order first named. Linear in the IDs: an answer naming one
    CPU for 50,000 pods is 50,000 steps, not their square."""
    by_cpu = {}
    for ids, holder in holdings:
        for i in ids:
            if isinstance(i, str) and _DEVICE_ID.match(i):
                cpu = int(i)
                named = by_cpu.get(cpu)
                if named is None:
                    by_cpu[cpu] = {holder: None}
                else:
                    named[holder] = None
    return {cpu: tuple(named) for cpu, named in by_cpu.items()}


def pod_resources_holders(answer, resource_name):
    """{cpu: (Holder, ...)} from a PodResources ListPodResourcesResponse: the
    containers whose devices of `resource_name` include the CPU's device ID.
    A CPU may have several: List includes terminated pods (kubernetes#119423)."""
    return holders_by_cpu((devices.device_ids, Holder(pod.namespace, pod.name, container.name, None, "pod-resources"))
                          for pod in answer.pod_resources for container in pod.containers
                          for devices in container.devices if devices.resource_name == resource_name)


def _turn(value):
    return value


def json_document(text):
    """json.loads() that lets other threads run while it parses: its C
    scanner holds the interpreter for a whole document, 40 ms for a 4 MiB
    checkpoint of small entries; a hook in Python per object gives the event
    loop's thread a turn every switch interval while the worker parses."""
    return json.loads(text, object_hook=_turn)


def device_id_list(ids):
    """`ids` when it is a list of strings, as the kubelet writes them (a
    string read a character at a time would name other CPUs)."""
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise TypeError("DeviceIDs is not a list of strings")
    return ids


def checkpoint_entries(text, resource_name):
    """[(pod UID, container name, device IDs)] of `resource_name` in the
    kubelet's device-manager checkpoint (text or bytes; DeviceIDs a list, or
    per NUMA node since Kubernetes 1.20). ValueError when it is not such a
    checkpoint, nesting too deep for the parser included."""
    try:
        entries = json_document(text)["Data"]["PodDeviceEntries"] or []
        found = []
        for entry in entries:
            if entry.get("ResourceName") != resource_name:
                continue
            ids = entry.get("DeviceIDs") or []
            if isinstance(ids, dict):
                ids = [i for per_node in ids.values() for i in device_id_list(per_node or [])]
            found.append((str(entry.get("PodUID")), str(entry.get("ContainerName")), device_id_list(ids)))
        return found
    except (KeyError, TypeError, AttributeError, ValueError, RecursionError) as e:
        raise ValueError("not a device-manager checkpoint (%s: %s)" % (type(e).__name__, quote(one_line(e), 80)))


def checkpoint_holders(text, resource_name):
    """{cpu: (Holder, ...)} of `resource_name` in the kubelet's device-manager
    checkpoint. Containers of one pod named for the same CPU are marked
    init_or_app. ValueError when it is not such a checkpoint."""
    by_cpu = holders_by_cpu((ids, Holder(None, None, container, uid, "checkpoint"))
                            for uid, container, ids in checkpoint_entries(text, resource_name))
    for cpu, holders in by_cpu.items():
        if len(holders) > 1:
            pods = collections.Counter(h.pod_uid for h in holders)
            by_cpu[cpu] = tuple(h._replace(init_or_app=True) if pods[h.pod_uid] > 1 else h for h in holders)
    return by_cpu


def name_the_running(by_cpu, running):
    """Holders marked init_or_app resolved by what runs ({(pod UID,
    container)}, as the runtime says): of a pod whose containers named for a
    CPU include running ones, those are its holders; the others (an init
    container that finished) are not."""
    resolved = {}
    for cpu, holders in by_cpu.items():
        runs = {h.pod_uid for h in holders if h.init_or_app and (h.pod_uid, h.container) in running}
        kept = []
        for holder in holders:
            if not (holder.init_or_app and holder.pod_uid in runs):
                kept.append(holder)
            elif (holder.pod_uid, holder.container) in running:
                kept.append(holder._replace(init_or_app=False))
        resolved[cpu] = tuple(kept)
    return resolved


def checkpoint_grants(text, resource_name):
    """{(pod UID, container name): frozenset of CPUs} of `resource_name` in
    the kubelet's device-manager checkpoint: what each container holds, as
    the kubelet recorded it during admission. ValueError as above."""
    grants = {}
    for uid, container, ids in checkpoint_entries(text, resource_name):
        cpus = [int(i) for i in ids if isinstance(i, str) and _DEVICE_ID.match(i)]
        grants[(uid, container)] = grants.get((uid, container), frozenset()) | frozenset(cpus)
    return grants


def cpu_manager_state(text):
    """(policy, defaultCpuSet text, {(pod uid or None, container or container ID): cpu-list text}, old format?)
    of a cpu_manager_state; ValueError when it is not one."""
    try:
        data = json_document(text)
        policy = data["policyName"]
        entries = data.get("entries") or {}
        grants, old = {}, False
        for key, value in entries.items():
            if isinstance(value, dict):
                for container, cpus in value.items():
                    grants[(key, container)] = cpus
            else:
                grants[(None, key)] = value
                old = True
        return policy, data.get("defaultCpuSet") or "", grants, old
    except (KeyError, TypeError, AttributeError, ValueError, RecursionError) as e:
        raise ValueError("not a cpu_manager_state (%s: %s)" % (type(e).__name__, quote(one_line(e), 80)))


def holdings_text(by_cpu, limit=10):
    """Who holds which of these CPUs, one entry per holder, each named whole
    and quoted: "3 to 'shop/web-0/app', 6-7 to 'net/fwd-0/fwd'". A CPU
    whose holders are () is held by an unknown container."""
    cpus_of = collections.defaultdict(set)
    for cpu, holders in by_cpu.items():
        for name in [holder_name(h) for h in holders] or [None]:
            cpus_of[name].add(cpu)
    entries = sorted(cpus_of.items(), key=lambda item: (min(item[1]), item[0] or ""))
    shown = ["%s to %s" % (format_cpu_list(cpus), quote(name, 400) if name is not None else "an unknown container")
             for name, cpus in entries[:limit]]
    text = ", ".join(shown)
    if len(entries) > limit:
        text += " (+%d more)" % (len(entries) - limit)
    return text


def cpus_of_device_ids(ids, what):
    """CPU numbers of well-formed device IDs; RequestError names malformed ones."""
    malformed = [i for i in ids if not _DEVICE_ID.match(i)]
    if malformed:
        raise RequestError("malformed %s device IDs %s" % (what, quote_list(malformed)))
    return [int(i) for i in ids]


def container_allocation(cpus, env_name, cpuid_paths):
    """(envs, device specs) for a container given `cpus`."""
    return {env_name: format_cpu_list(cpus)}, [(path, path, "r") for path in cpuid_paths]


# Where a CPU sits, as the preferred-allocation policy counts it. numa: the
# frozenset of its NUMA nodes; core: the key of its physical core (its thread
# siblings); package, die, cluster: keys of the domains around that core.
# Whatever sysfs does not tell becomes a singleton of the CPU's own, so an
# unknown CPU costs a node, a core and a domain of its own: it ranks last;
# but an unknown NUMA node is its core's (thread siblings share one), and
# where no CPU's node is known (a kernel without NUMA: the kubelet gets no
# topology either) every CPU is of one node, NO_NUMA, that orders answers
# as a node per core would, at the cost of one.
# llc: the key of its last-level cache (named by its first CPU: the CPUs of a
# cache agree on it), its core's own when unknown (a cache per core costs
# nothing the count of cores does not; named by the core's first CPU, cheap
# to hash); kind: its kind of core, 0 the fastest, UNKNOWN_KIND on machines
# of one kind and where unknown.
Placement = collections.namedtuple("Placement", "numa core package die cluster known llc kind")
UNKNOWN_KIND = 1 << 16          # after every kind a machine has


NO_NUMA = frozenset([("numa", None)])


def cpu_placement(info, numa_known=True):
    """Where `info`'s CPU sits; numa_known: some CPU of the machine has a
    NUMA node (else it is of NO_NUMA)."""
    own = ("cpu", info.cpu)
    if info.numa_nodes:
        numa = frozenset(info.numa_nodes)
    elif not numa_known:
        numa = NO_NUMA
    else:
        numa = frozenset([("core", info.thread_siblings) if info.thread_siblings else own])
    core = (numa, info.thread_siblings) if info.thread_siblings else own
    package = ("package", info.package) if info.package is not None else ("core", core)
    die = package + (info.die,) if info.die is not None else package       # absent level: one per parent
    cluster = die + (info.cluster,) if info.cluster is not None else die
    return Placement(numa, core, package, die, cluster, bool(info.numa_nodes and info.thread_siblings),
                     ("llc", info.llc_cpus[0]) if info.llc_cpus else ("core", (info.thread_siblings or (info.cpu,))[0]),
                     UNKNOWN_KIND if info.core_class is None else info.core_class)


def cpu_placements(infos):
    """{cpu: Placement} for the policy, from {cpu: CpuInfo}."""
    numa_known = any(info.numa_nodes for info in infos.values())
    return {cpu: cpu_placement(info, numa_known) for cpu, info in infos.items()}


COMBINATION_BUDGET = 2048      # domain sets tried exactly before falling back to greedy


def preferred_allocation(placements, available, must_include, size):
    """The CPUs to prefer for one container, and the problems met.

    Exactly `size` distinct CPUs of `available`, all of `must_include`, chosen
    by, most important first:
      1. the fewest NUMA nodes;
      2. the fewest physical cores (SMT siblings together, any SMT width);
      3. one kind of core: an answer of one kind before a mixed one, then the
         fastest slowest core (a pod runs at the speed of its slowest);
      4. the fewest last-level caches;
      5. known topology before unknown; the fewest packages, then dies, then
         clusters; filling partly taken cores (a sibling not available)
         before breaking wholly free ones; the NUMA node set, and among as
         few caches those, with the least room to spare (best fit, keeping
         big free blocks for big pods);
      6. the lowest CPU numbers: the same request gets the same answer.
    A request that cannot be met (size above what is available, must-include
    not available, size <= 0) gets the best valid subset, with the reason in
    `problems`. Ranks 1-4 are exact (exhaustive over NUMA node sets, a
    histogram count for cores, per kind for kinds, a dynamic programme for
    caches; each within a bound of work, then greedy); rank 5 is a careful
    greedy.
    """
    problems = []
    available = frozenset(available)
    must = frozenset(must_include)
    if not must <= available:
        problems.append("must-include CPUs %s are not available; left out"
                        % brief_cpu_list(must - available))
        must &= available
    if size <= 0:
        problems.append("allocation size %d; nothing to prefer" % size)
        return [], problems
    if size > len(available):
        problems.append("allocation size %d but only %d available" % (size, len(available)))
        size = len(available)
    if len(must) > size:
        problems.append("%d must-include CPUs for size %d; preferring among them" % (len(must), size))
        available, must = must, frozenset()
    if len(must) == size:
        return sorted(must), problems
    place = {cpu: placements.get(cpu) or cpu_placement(unknown_cpu_info(cpu)) for cpu in available}
    request = _Request(place, available, must, size)
    return request.choose(), problems


class _Request(object):
    """One preferred-allocation request, worked through rank by rank."""

    def __init__(self, place, available, must, size):
        self.place, self.available, self.must, self.size = place, available, must, size
        self.cores = {}                                   # core key -> its available CPUs, ascending
        for cpu in sorted(available):
            self.cores.setdefault(place[cpu].core, []).append(cpu)
        self.must_cores = {place[cpu].core for cpu in must}
        self.group_cores = collections.defaultdict(list)  # NUMA group -> its other cores
        traits = collections.defaultdict(list)
        for core, cpus in self.cores.items():
            if core not in self.must_cores:
                where = place[cpus[0]]                    # a core's CPUs share its kind and caches
                self.group_cores[where.numa].append(core)
                # None: the core's own cache (unknown), so that machines without caches add few keys
                traits[where.numa].append((where.kind, where.llc if where.llc[0] == "llc" else None, len(cpus)))
        self.group_traits = {group: collections.Counter(keys) for group, keys in traits.items()}  # (kind, cache, size)
        self.group_sizes = {}                                                                     # ... and size alone
        for group, counts in self.group_traits.items():
            sizes = self.group_sizes[group] = collections.Counter()
            for (_, _, size), count in counts.items():
                sizes[size] += count
        self.must_kinds = {place[self.cores[core][0]].kind for core in self.must_cores}
        self.must_caches = {place[self.cores[core][0]].llc for core in self.must_cores}
        traits = [key for counts in self.group_traits.values() for key in counts]
        self.several_kinds = len({kind for kind, _, _ in traits} | self.must_kinds) > 1
        self.caches_known = any(cache is not None for _, cache, _ in traits) or any(
            cache[0] == "llc" for cache in self.must_caches)
        self._group_caches = {}

    def wholly_free(self, core):
        """Every thread of the core is available (taking part of it breaks it)."""
        if core[0] == "cpu":
            return True
        return all(cpu in self.available for cpu in core[1])

    # Rank 1 ------------------------------------------------------------------

    def numa_candidates(self):
        """The smallest NUMA node sets that hold the request: [(nodes, groups)]."""
        capacity = collections.Counter(self.place[cpu].numa for cpu in self.available)
        required = {self.place[cpu].numa for cpu in self.must}
        optional = sorted((g for g in capacity if g not in required), key=_sort_key)
        base = frozenset().union(*required)

        def closure(nodes):     # every group inside the node set is usable for free
            return [g for g in capacity if g <= nodes]

        best, found, tried = None, [], 0
        for count in range(len(optional) + 1):
            if best is not None and count > best - len(base):
                break                          # each extra group adds at least one node
            for extra in itertools.combinations(optional, count):
                tried += 1
                if tried > COMBINATION_BUDGET:
                    return found or [self._greedy_numa(capacity, required, optional, base)]
                nodes = base.union(*extra)
                if any(g <= base.union(*(e for e in extra if e is not g)) for g in extra):
                    continue                   # a redundant group: the set without it is as good
                groups = closure(nodes)
                if sum(capacity[g] for g in groups) < self.size:
                    continue
                if best is None or len(nodes) < best:
                    best, found = len(nodes), []
                if len(nodes) == best:
                    found.append((nodes, groups))
        return found

    def _greedy_numa(self, capacity, required, optional, base):
        """Add the largest groups until the request fits (exact when no CPU
        sits in two nodes, as on every sane machine)."""
        nodes, total = base, sum(capacity[g] for g in required)
        for group in sorted(optional, key=lambda g: (-capacity[g] / len(g), _sort_key(g))):
            if total >= self.size:
                break
            nodes |= group
            total = sum(capacity[g] for g in capacity if g <= nodes)
        return nodes, [g for g in capacity if g <= nodes]

    # Rank 2 ------------------------------------------------------------------

    def core_plan(self, groups):
        """(cores touched at least, CPUs still needed after the must cores,
        the other cores usable, how many of them) within the NUMA groups."""
        need = self.size - sum(len(self.cores[c]) for c in self.must_cores)
        sizes = collections.Counter()
        for group in groups:
            sizes.update(self.group_sizes.get(group, {}))
        extra = _fewest_to_cover(sizes, need)
        others = [core for group in groups for core in self.group_cores.get(group, ())]
        return len(self.must_cores) + extra, need, others, extra

    # Ranks 3 and 4 -------------------------------------------------------------

    def kind_plan(self, groups, need, extra):
        """((mixed, slowest kind) of the best answer, the kinds it draws
        from or None for any): the first kind whose cores alone hold what
        the must cores leave (`extra` cores for `need` CPUs), else the
        fastest kinds that do together."""
        if not self.several_kinds:
            return (False, 0), None
        by_kind = collections.defaultdict(collections.Counter)
        for group in groups:
            for (kind, _, size), count in self.group_traits.get(group, {}).items():
                by_kind[kind][size] += count
        if need <= 0:
            return (len(self.must_kinds) > 1, max(self.must_kinds)), None
        for kind in sorted(by_kind):
            if self.must_kinds <= {kind} and _top_sum(by_kind[kind], extra) >= need:
                return (False, kind), frozenset([kind])
        # mixed: the slowest kind is the slowest must kind or one the other
        # cores have, whichever is the first to hold it with the faster ones
        # (a must kind no other core has counts: 3 kinds, or an unknown one)
        slowest_must = max(self.must_kinds) if self.must_kinds else -1
        pooled = collections.Counter()
        for kind in sorted(set(by_kind) | self.must_kinds):
            pooled.update(by_kind.get(kind, ()))
            if kind >= slowest_must and _top_sum(pooled, extra) >= need:
                return (True, kind), frozenset(k for k in by_kind if k <= kind)
        return (True, max(set(by_kind) | self.must_kinds)), None    # not reached: the cores hold it (rank 2)

    def caches_of(self, groups, kinds):
        """{cache: {core size: cores}} of the other cores of `kinds` (None:
        any) in the NUMA groups; per group once (node sets share groups)."""
        merged = {}
        for group in groups:
            caches = self._group_caches.get((group, kinds))
            if caches is None:
                caches = self._group_caches[group, kinds] = {}
                for (kind, cache, size), count in self.group_traits.get(group, {}).items():
                    if (kinds is None or kind in kinds) and cache is not None:
                        sizes = caches.setdefault(cache, {})
                        sizes[size] = sizes.get(size, 0) + count
                if any(cache is None for _, cache, _ in self.group_traits.get(group, {})):
                    for core in self.group_cores[group]:       # cores of unknown cache: a cache each
                        where = self.place[self.cores[core][0]]
                        if where.llc[0] != "llc" and (kinds is None or where.kind in kinds):
                            caches[where.llc] = {len(self.cores[core]): 1}
            for cache, sizes in caches.items():
                if cache in merged:                      # a cache across NUMA nodes
                    sizes = collections.Counter(merged[cache]) + collections.Counter(sizes)
                merged[cache] = sizes
        return merged

    def kinds_and_caches(self, chosen):
        """(mixed, slowest kind) and the count of caches of an answer."""
        kinds = {self.place[cpu].kind for cpu in chosen}
        return (len(kinds) > 1, max(kinds)), len({self.place[cpu].llc for cpu in chosen})

    # Rank 5 and the final pick -------------------------------------------------

    def choose(self):
        # a plan: [cores, (mixed, slowest kind), caches, fit, nodes, need,
        # other cores, extra cores, groups; later (kinds, caches) to draw from]
        plans = []
        for nodes, groups in self.numa_candidates():
            cores, need, others, extra = self.core_plan(groups)
            fit = sum(len(self.cores[c]) for c in others)      # best fit: the tightest node set
            plans.append([cores, None, None, fit, sorted(_sort_key(n) for n in nodes), need, others, extra, groups])
        fewest = min(plan[0] for plan in plans)
        plans = [plan for plan in plans if plan[0] == fewest]
        for plan in plans:                    # rank 3, and a bound on rank 4 (exact where cores are whole)
            need, extra, groups = plan[5], plan[7], plan[8]
            plan[1], kinds = self.kind_plan(groups, need, extra)
            caches = self.caches_of(groups, kinds) if self.caches_known else None
            plan[2] = _cache_bound(caches, self.must_caches, extra, need) if caches is not None else 0
            plan[8] = kinds, caches
        # Rank 4 exactly, in the order of the bounds, until no node set left
        # could be among the (at most 8) best: plans[:8] of all, as if each
        # were counted.
        plans.sort(key=lambda plan: plan[1:5])
        counted, tied = [], []                # tied: the best ranks 3-4 so far, by fit
        for plan in plans:
            if tied and (plan[1:3] > tied[0][:2] or (len(tied) >= 8 and plan[1:5] > tied[7])):
                break
            kinds, caches = plan[8]
            chosen_caches = None
            if caches is not None:
                plan[2], chosen_caches = _fewest_caches(caches, self.must_caches, plan[7], plan[5])
            plan[8] = kinds, chosen_caches
            counted.append(plan)
            if not tied or plan[1:3] < tied[0][:2]:
                tied = []
            if not tied or plan[1:3] == tied[0][:2]:
                bisect.insort(tied, plan[1:5])
        counted.sort(key=lambda plan: plan[:5])
        best = None
        for cores, kind, count, fit, _, need, others, extra, (kinds, caches) in counted[:8]:   # equal on ranks 1-4
            if (kind, count) != tuple(counted[0][1:3]):
                break
            if kinds is not None or caches is not None:             # the cores ranks 3 and 4 draw from
                others = [core for core in others if (kinds is None or self.place[self.cores[core][0]].kind in kinds)
                          and (caches is None or self.place[self.cores[core][0]].llc in caches)]
            chosen = self.fill(need, others, extra)
            cost = (self.kinds_and_caches(chosen), self.rank3_cost(chosen), fit, sorted(chosen))
            if best is None or cost < best[0]:
                best = (cost, chosen)
        return sorted(best[1])

    def fill(self, need, others, extra):
        chosen = set(self.must)
        remaining = self.size - len(chosen)
        # the must cores are touched anyway: fill them first, wholly free ones
        # first so that they are not left broken
        for core in sorted(self.must_cores, key=lambda c: (not self.wholly_free(c), self.cores[c][0])):
            for cpu in self.cores[core]:
                if remaining and cpu not in chosen:
                    chosen.add(cpu)
                    remaining -= 1
        if remaining:
            for core in self.pick_cores(self.narrow_domains(others, extra, remaining), extra, remaining):
                take = self.cores[core][:remaining]
                chosen.update(take)
                remaining -= len(take)
        return chosen

    def narrow_domains(self, cores, budget, need):
        """Restrict `cores` to the fewest packages, then dies, then clusters in
        which `budget` cores still hold `need` CPUs; the domains the must
        CPUs touch come for free."""
        for level in ("package", "die", "cluster"):
            by_domain = collections.defaultdict(list)
            for core in cores:
                by_domain[getattr(self.place[self.cores[core][0]], level)].append(core)
            required = {getattr(self.place[cpu], level) for cpu in self.must} & set(by_domain)
            sizes = {domain: collections.Counter(len(self.cores[c]) for c in members)
                     for domain, members in by_domain.items()}
            chosen = _fewest_domains(sizes, required, budget, need)
            cores = [core for domain in chosen for core in by_domain[domain]]
        return cores

    def pick_cores(self, cores, budget, need):
        """`budget` cores holding `need` CPUs: biggest first (partly taken
        first among equals), the last one fitting the remainder best."""
        def preference(core):
            return (not self.place[self.cores[core][0]].known, -len(self.cores[core]),
                    self.wholly_free(core), self.cores[core][0])

        def last_preference(core):
            size = len(self.cores[core])
            return (not self.place[self.cores[core][0]].known, size != need,
                    self.wholly_free(core), size, self.cores[core][0])

        left = collections.Counter(len(self.cores[c]) for c in cores)
        picked, skipped = [], []
        # One pass: a core that cannot be taken now (the rest could no longer
        # reach `need`) cannot be taken later either, as taking any core y
        # lowers what the rest can reach by at least y.
        for core in sorted(cores, key=preference):
            if budget <= 1 or need <= 0:
                skipped.append(core)
                continue
            size = len(self.cores[core])
            left[size] -= 1
            if size + _top_sum(left, budget - 1) >= need:
                picked.append(core)
                need -= size
                budget -= 1
            else:
                left[size] += 1
        if need > 0 and budget == 1:                                # the last core fits the remainder
            fitting = [core for core in skipped if len(self.cores[core]) >= need]
            if fitting:
                picked.append(min(fitting, key=last_preference))
        return picked

    def rank3_cost(self, chosen):
        place = self.place
        touched = {place[cpu].core for cpu in chosen}
        broken = sum(1 for core in touched
                     if self.wholly_free(core) and not set(self.cores[core]) <= chosen)
        return (sum(1 for cpu in chosen if not place[cpu].known),
                len({place[cpu].package for cpu in chosen}), len({place[cpu].die for cpu in chosen}),
                len({place[cpu].cluster for cpu in chosen}), broken)


def _sort_key(value):
    """A total order over the policy's keys (ints, tuples, frozensets, mixed)."""
    if isinstance(value, frozenset):
        return (2, sorted((_sort_key(v) for v in value)))
    if isinstance(value, tuple):
        return (1, [_sort_key(v) for v in value])
    if isinstance(value, int):
        return (0, value)
    return (3, str(value))


def _fewest_to_cover(sizes, need):
    """How many of the largest sizes (a Counter of size -> cores) reach `need`."""
    count = 0
    for size in sorted(sizes, reverse=True):
        if need <= 0:
            break
        take = min(sizes[size], -(-need // size))
        need -= take * size
        count += take
    return count


def _top_sum(counter, count):
    """Sum of the `count` largest values in a Counter of value -> multiplicity."""
    total = 0
    for value in sorted(counter, reverse=True):
        take = min(count, counter[value])
        total += take * value
        count -= take
        if count <= 0:
            break
    return total


CACHE_PLAN_BUDGET = 1 << 17    # steps of _fewest_caches' dynamic programme before it settles for greedy


def _cache_slack(caches, budget, need):
    """(the biggest core w, how many CPUs `budget` cores may fall short of w in all)."""
    widest = max([size for sizes in caches.values() for size in sizes] or [1])
    return widest, budget * widest - need


def _cache_bound(caches, required, budget, need):
    """At most as many caches as _fewest_caches() counts, from what each
    cache offers alone: its whole cores, and one partly taken core per CPU
    of slack. Exact without slack (only whole cores will do), which is the
    common case: then the caches with the most whole cores go first."""
    if need <= 0:
        return len(required)
    widest, slack = _cache_slack(caches, budget, need)
    slack = max(slack, 0)
    free = collections.Counter()
    for cache in required:
        free.update(caches.get(cache, {}))
    offers = [sizes.get(widest, 0) + (min(sum(sizes.values()) - sizes.get(widest, 0), slack) if slack else 0)
              for cache, sizes in caches.items() if cache not in required]
    cores = free.get(widest, 0) + min(sum(free.values()) - free.get(widest, 0), slack)
    count = len(required)
    for more in sorted(offers, reverse=True):
        if cores >= budget:
            break
        cores += more
        count += 1
    return count


def _fewest_caches(caches, required, budget, need):
    """(how many caches, which) for `budget` cores to hold `need` CPUs:
    the fewest caches, counting `required` (those the must cores touch:
    their other cores come free), from caches: cache -> Counter of the core
    sizes there; among as few, those with the least room to spare.

    Exact: with w the biggest core, the answer's cores fall short of w by
    at most budget * w - need CPUs in all (the slack, small where cores are
    whole), so a dynamic programme over (caches taken, CPUs short) finds
    the most cores any m caches offer. Greedy, biggest caches first, where
    that would take more than CACHE_PLAN_BUDGET steps."""
    free = collections.Counter()
    for cache in required:
        free.update(caches.get(cache, {}))
    optional = sorted((c for c in caches if c not in required),
                      key=lambda c: (sum(size * n for size, n in caches[c].items()), _sort_key(c)))
    chosen_free = [c for c in required if c in caches]
    if need <= 0:
        return len(required), chosen_free
    widest, slack = _cache_slack(caches, budget, need)
    most = min(len(optional), budget)
    if slack < 0 or len(optional) * (most + 1) * (slack + 1) ** 2 > CACHE_PLAN_BUDGET:
        chosen, pooled = [], collections.Counter(free)
        for cache in sorted(optional, key=lambda c: (-_top_sum(caches[c], budget), _sort_key(c))):
            if _top_sum(pooled, budget) >= need:
                break
            chosen.append(cache)
            pooled.update(caches[cache])
        return len(required) + len(chosen), chosen_free + chosen

    def reach(sizes):
        """reach[s]: the most cores (at most `budget`) of these falling s CPUs short of w, or less."""
        cores, short, most_cores = 0, 0, [0] * (slack + 1)
        for size in sorted(sizes, reverse=True):
            gap = widest - size
            take = min(sizes[size], budget - cores)
            if gap:
                take = min(take, (slack - short) // gap)
            for _ in range(take if gap else 1 if take else 0):
                cores, short = (cores + 1, short + gap) if gap else (cores + take, short)
                most_cores[short] = cores
        for s in range(1, slack + 1):
            most_cores[s] = max(most_cores[s], most_cores[s - 1])
        return most_cores

    # best[m][s]: the most cores with at most m optional caches, at most s short;
    # rows beyond the fewest caches found so far no longer matter
    best = [reach(free) for _ in range(most + 1)]
    taken = 0 if best[0][slack] >= budget else None
    history, reaches = [], []
    for i, cache in enumerate(optional):
        if taken == 0:
            break
        offer = reach(caches[cache])
        reaches.append(offer)
        top_row = min(i + 1, most if taken is None else taken)
        history.append([row[:] for row in best[:top_row + 1]])
        for m in range(top_row, 0, -1):
            fewer, row = best[m - 1], best[m]
            for s in range(slack, -1, -1):
                top = row[s]
                for t in range(s + 1):
                    if fewer[s - t] + offer[t] > top:
                        top = fewer[s - t] + offer[t]
                row[s] = min(top, budget)
            if row[slack] >= budget and (taken is None or m < taken):
                taken = m
    if taken is None:                                           # not reached: rank 2 found them
        return len(required) + len(optional), chosen_free + optional
    # Which: walking back from the roomiest cache, leave out each the others do without.
    chosen, m, s, cores = [], taken, slack, budget
    for i in range(len(history) - 1, -1, -1):
        if m == 0 or cores <= 0 or (m < len(history[i]) and history[i][m][s] >= cores):
            continue
        fewer, offer = history[i][m - 1], reaches[i]
        t = next(t for t in range(s + 1) if fewer[s - t] + offer[t] >= cores)
        chosen.append(optional[i])
        m, s, cores = m - 1, s - t, cores - offer[t]
    return len(required) + taken, chosen_free + chosen


def _fewest_domains(sizes, required, budget, need):
    """The fewest domains, including `required`, whose cores (sizes: domain
    -> Counter of core sizes) let `budget` cores hold `need` CPUs; among
    equals the tightest fit, then the lowest keys. Exhaustive up to
    COMBINATION_BUDGET sets, then greedy."""
    def holds(domains):
        merged = collections.Counter()
        for domain in domains:
            merged.update(sizes[domain])
        return _top_sum(merged, budget) >= need, sum(size * n for size, n in merged.items())

    optional = sorted((d for d in sizes if d not in required), key=_sort_key)
    tried = 0
    for count in range(len(optional) + 1):
        fits = []
        for extra in itertools.combinations(optional, count):
            tried += 1
            if tried > COMBINATION_BUDGET:
                break
            domains = list(required) + list(extra)
            ok, total = holds(domains)
            if ok:
                fits.append((total, [_sort_key(d) for d in extra], domains))
        if fits:
            return min(fits, key=lambda fit: fit[:2])[2]
        if tried > COMBINATION_BUDGET:
            break
    domains = list(required)                               # greedy: biggest domains first
    for domain in sorted(optional, key=lambda d: (-_top_sum(sizes[d], budget), _sort_key(d))):
        if holds(domains)[0]:
            break
        domains.append(domain)
    return domains


# ---------------------------------------------------------------------------
# The gRPC servicer
# ---------------------------------------------------------------------------

GrpcApi = collections.namedtuple("GrpcApi", "grpc aio pb pb_grpc DecodeError")


def load_grpc():
    """grpc, its asyncio API and the generated stubs, imported only when serving."""
    here = os.path.dirname(os.path.realpath(__file__))
    if here not in sys.path:
        sys.path.append(here)
    # grpc core logs in its own format to stderr; the plugin reports what
    # matters itself, so grpc's lines show only at --log-level debug
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR" if log.isEnabledFor(logging.DEBUG) else "NONE")
    try:
        import grpc
    except ImportError as e:
        raise InputError("grpcio is not installed (%s): apt install python3-grpcio, "
                         "or pip install grpcio" % one_line(e))
    aio = getattr(grpc, "aio", None)
    if aio is None:
        try:
            from grpc.experimental import aio         # grpcio 1.28-1.31
        except ImportError:
            raise InputError("grpcio %s has no asyncio API; grpcio 1.30 or newer is needed"
                             % grpc.__version__)
    try:
        import deviceplugin_pb2 as pb
        import deviceplugin_pb2_grpc as pb_grpc
        from google.protobuf.message import DecodeError
    except Exception as e:
        raise InputError("cannot load deviceplugin_pb2*.py beside %s: %s" % (__file__, one_line(e)))
    return GrpcApi(grpc, aio, pb, pb_grpc, DecodeError)


class DeviceBoard(object):
    """The device list on offer, shared by the host watcher (writer) and the
    servicer (readers). `generation` counts real changes only, so that
    ListAndWatch sends a list exactly when something changed."""

    def __init__(self, devices):
        self.devices = devices
        self.by_id = {device_id(d.cpu): d for d in devices}
        self.generation = 0
        self.closed = False
        self._changed = asyncio.Condition()

    async def close(self):
        """End every ListAndWatch stream normally (the plugin is stopping)."""
        self.closed = True
        async with self._changed:
            self._changed.notify_all()

    async def publish(self, devices):
        if devices == self.devices:
            return
        self.devices = devices
        self.by_id = {device_id(d.cpu): d for d in devices}
        self.generation += 1
        async with self._changed:
            self._changed.notify_all()

    async def wait_newer_than(self, generation):
        """The next generation; None once the board is closed."""
        async with self._changed:
            while self.generation == generation and not self.closed:
                await self._changed.wait()
        return None if self.closed else self.generation


class Counters(object):
    """What the plugin counts, for --metrics-address. Plain ints, bumped in
    the event loop and read by the metrics thread (one reference each, as
    are the Plugin attributes it reads)."""

    def __init__(self):
        self.allocations = 0             # container requests answered by Allocate
        self.allocation_errors = 0       # Allocate and GetPreferredAllocation refusals
        self.preferred_allocations = 0   # container requests answered by GetPreferredAllocation
        self.registrations = 0
        self.kubelet_restarts = 0
        self.nri_adjustments = 0         # cpusets the runtime side set (create, update, running)
        self.nri_refused_claims = 0      # containers with $ISOLCPUS that hold nothing


def prometheus_label(name, value):
    """name="value", escaped as the text format wants (pod and container
    names come from the kubelet, so they are escaped all the same)."""
    value = "" if value is None else str(value)
    return '%s="%s"' % (name, value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n"))


MAX_HOLDER_SAMPLES = 4        # per CPU in /metrics; a CPU has one or two where PodResources prunes the rest


def render_metrics(resource_name, devices, counters, registered, holders=None, nri_connected=None):
    """Prometheus text exposition (format 0.0.4) of the plugin's state and,
    with a HolderReport, who holds each allocated CPU of those served: how
    many, and up to MAX_HOLDER_SAMPLES of them by name, in the report's
    order (find_holders puts the running or the checkpoint's first; bounded
    by the CPU count, whatever PodResources answers).
    nri_connected: the runtime side's state, None when it is off."""
    healthy = sum(1 for d in devices if d.healthy)
    lines = []

    def metric(name, kind, text, samples):
        lines.append("# HELP isolcpu_%s %s" % (name, text))
        lines.append("# TYPE isolcpu_%s %s" % (name, kind))
        for labels, value in samples:
            lines.append("isolcpu_%s{%s} %d" % (name, ",".join([prometheus_label("resource", resource_name)]
                                                                + labels), value))

    metric("devices", "gauge", "Devices advertised, by health.",
           [(['health="Healthy"'], healthy), (['health="Unhealthy"'], len(devices) - healthy)])
    metric("allocations_total", "counter", "Container requests answered by Allocate.",
           [([], counters.allocations)])
    metric("allocation_errors_total", "counter", "Allocate and GetPreferredAllocation requests refused.",
           [([], counters.allocation_errors)])
    metric("preferred_allocations_total", "counter", "Container requests answered by GetPreferredAllocation.",
           [([], counters.preferred_allocations)])
    metric("registrations_total", "counter", "Successful registrations with the kubelet.",
           [([], counters.registrations)])
    metric("kubelet_restarts_total", "counter", "Kubelet restarts seen.", [([], counters.kubelet_restarts)])
    metric("registered", "gauge", "1 while registered with a running kubelet.", [([], int(registered))])
    metric("build_info", "gauge", "Version of the plugin.", [(['version="%s"' % __version__], 1)])
    if nri_connected is not None:
        metric("nri_connected", "gauge", "1 while registered and synchronized with the runtime's NRI.",
               [([], int(nri_connected))])
        metric("nri_adjustments_total", "counter", "Container cpusets the runtime side set.",
               [([], counters.nri_adjustments)])
        metric("nri_refused_claims_total", "counter", "Containers that set the CPU variable but hold no CPUs.",
               [([], counters.nri_refused_claims)])
    if holders is not None and holders.by_cpu is not None:
        held = [(d.cpu, holders.by_cpu[d.cpu]) for d in devices if d.cpu in holders.by_cpu]
        source = HOLDER_SOURCES[holders.source]
        metric("device_holders", "gauge", "Containers that hold an allocated CPU (from %s)." % source,
               [([prometheus_label("cpu", cpu)], len(named)) for cpu, named in held])
        metric("device_allocated", "gauge", "Allocated CPUs and who holds them (from %s)." % source,
               [([prometheus_label("cpu", cpu), prometheus_label("namespace", h.namespace),
                  prometheus_label("pod", h.pod), prometheus_label("container", h.container),
                  prometheus_label("pod_uid", h.pod_uid)], 1)
                for cpu, named in held for h in named[:MAX_HOLDER_SAMPLES]])
    return "\n".join(lines) + "\n"


CPUID_RECHECK = 30.0           # seconds: a cpuid module loaded or unloaded later is seen by then


class DevicePluginServicer(object):
    """v1beta1.DevicePlugin. Thin: requests become policy calls and back."""

    def __init__(self, api, board, config, on_stream, counters):
        self.api = api
        self.board = board
        self.config = config
        self.on_stream = on_stream              # on_stream(stream id, opened): who watches is the session's business
        self.counters = counters
        self.open_streams = 0
        self._stream_ids = itertools.count(1)
        self._message = (None, None)            # (generation, ListAndWatchResponse)
        self._placements = (None, None)         # (generation, {cpu: Placement})
        self._cpuid = (None, 0.0, {})           # (generation, good until, {cpu: has a cpuid device})
        self.allocated = set()                  # CPUs handed to containers since start

    def options(self):
        return self.api.pb.DevicePluginOptions(
            pre_start_required=False, get_preferred_allocation_available=True)

    def placements(self):
        generation, placements = self._placements
        if generation != self.board.generation:
            placements = cpu_placements({d.cpu: d.info for d in self.board.devices})
            self._placements = (self.board.generation, placements)
        return placements

    def cpuid_paths(self, cpus):
        """cpuid_device_paths(), looked up once per CPU per board generation
        and CPUID_RECHECK seconds: a stat() in Allocate lets grpc's threads
        take the GIL mid-call, which costs more than the rest of the call."""
        generation, good_until, known = self._cpuid
        now = time.monotonic()
        if generation != self.board.generation or now >= good_until:
            known = {}
            self._cpuid = (self.board.generation, now + CPUID_RECHECK, known)
        missing = [cpu for cpu in cpus if cpu not in known]
        if missing:
            present = set(cpuid_device_paths(missing, self.config.cpuid_devices))
            known.update((cpu, cpuid_path(cpu) in present) for cpu in missing)
        return [cpuid_path(cpu) for cpu in sorted(cpus) if known[cpu]]

    def refuse(self, context, error, response):
        log.warning("%s", error)
        self.counters.allocation_errors += 1
        context.set_code(self.api.grpc.StatusCode.INVALID_ARGUMENT)
        context.set_details(str(error))
        return response

    async def GetDevicePluginOptions(self, request, context):
        return self.options()

    def _list_message(self):
        generation, message = self._message
        if generation != self.board.generation:
            pb = self.api.pb
            devices = []
            for d in self.board.devices:
                device = pb.Device(ID=device_id(d.cpu), health=HEALTHY if d.healthy else UNHEALTHY)
                if d.info.numa_nodes:           # unknown: no TopologyInfo at all (kubernetes#112234)
                    device.topology.nodes.extend(pb.NUMANode(ID=n) for n in d.info.numa_nodes)
                devices.append(device)
            message = pb.ListAndWatchResponse(devices=devices)
            self._message = (self.board.generation, message)
        return message

    async def ListAndWatch(self, request, context):
        stream = next(self._stream_ids)
        self.open_streams += 1
        log.debug("ListAndWatch %d opened (%d open)", stream, self.open_streams)
        self.on_stream(stream, True)
        try:
            generation = self.board.generation
            while generation is not None:
                yield self._list_message()
                generation = await self.board.wait_newer_than(generation)
        finally:
            self.open_streams -= 1
            log.debug("ListAndWatch %d closed (%d open)", stream, self.open_streams)
            self.on_stream(stream, False)

    async def GetPreferredAllocation(self, request, context):
        pb = self.api.pb
        try:
            check_request_bounds(request.container_requests,
                                 lambda c: len(c.available_deviceIDs) + len(c.must_include_deviceIDs))
        except RequestError as e:
            return self.refuse(context, "GetPreferredAllocation refused: %s" % e, pb.PreferredAllocationResponse())
        placements = self.placements()
        response = pb.PreferredAllocationResponse()
        for container in request.container_requests:
            try:
                available = cpus_of_device_ids(container.available_deviceIDs, "available")
                must = cpus_of_device_ids(container.must_include_deviceIDs, "must-include")
            except RequestError as e:
                return self.refuse(context, "GetPreferredAllocation refused: %s" % e,
                                   pb.PreferredAllocationResponse())
            unknown = [cpu for cpu in available if cpu not in placements]
            if unknown:
                log.warning("GetPreferredAllocation: CPUs %s are not advertised; left out",
                            brief_cpu_list(unknown))
            size = container.allocation_size
            cpus, problems = preferred_allocation(
                placements, [cpu for cpu in available if cpu in placements], must, size)
            for problem in problems:
                log.warning("GetPreferredAllocation: %s", problem)
            log.info("preferred CPUs %s for %d of %d available", format_cpu_list(cpus) or "none",
                     size, len(available))
            self.counters.preferred_allocations += 1
            response.container_responses.add(deviceIDs=[device_id(cpu) for cpu in cpus])
        return response

    async def Allocate(self, request, context):
        pb = self.api.pb
        try:
            check_request_bounds(request.container_requests, lambda c: len(c.devices_ids))
        except RequestError as e:
            return self.refuse(context, "Allocate refused: %s" % e, pb.AllocateResponse())
        response = pb.AllocateResponse()
        for container in request.container_requests:
            try:
                devices = devices_for_ids(container.devices_ids, self.board.by_id)
            except RequestError as e:
                return self.refuse(context, "Allocate refused: %s" % e, pb.AllocateResponse())
            cpus = [d.cpu for d in devices]
            if not all(d.healthy for d in devices):
                log.warning("Allocate: CPUs %s are offline",
                            format_cpu_list(d.cpu for d in devices if not d.healthy))
            envs, specs = container_allocation(
                cpus, self.config.env_name, self.cpuid_paths(cpus))
            self.allocated.update(cpus)
            self.counters.allocations += 1
            allocation = response.container_responses.add()
            for name, value in envs.items():
                allocation.envs[name] = value        # not add(envs=): a Python-level map update
            for container_path, host_path, permissions in specs:
                allocation.devices.add(container_path=container_path, host_path=host_path,
                                       permissions=permissions)
            log.info("allocated CPUs %s as %s", envs[self.config.env_name], self.config.env_name)
        return response

    async def PreStartContainer(self, request, context):
        return self.api.pb.PreStartContainerResponse()


# ---------------------------------------------------------------------------
# The kubelet session and lifecycle
# ---------------------------------------------------------------------------

DEFAULT_POD_RESOURCES_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
# The kubelet's PodResources API v1 as the plugin calls it: method path ->
# (request, response) message names in deviceplugin_pb2 (see deviceplugin.proto).
POD_RESOURCES_METHODS = collections.OrderedDict([
    ("/v1.PodResourcesLister/List", ("ListPodResourcesRequest", "ListPodResourcesResponse")),
    ("/v1.PodResourcesLister/GetAllocatableResources",
     ("AllocatableResourcesRequest", "AllocatableResourcesResponse")),
])
POD_RESOURCES_LIST = "/v1.PodResourcesLister/List"


class PodResourcesList(object):
    """A ListPodResourcesResponse as PodResourcesClient.decode() makes it:
    its pods' bytes, each parsed alone when iterated (`pod_resources`), so
    that only what is kept of a pod outlives it."""

    def __init__(self, parse, pods):
        self.parse, self.pods = parse, pods

    @property
    def pod_resources(self):
        return (self.parse(pod) for pod in self.pods)


def _varint_at(data, pos):
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("a varint runs past the end")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


def length_delimited_fields(data, number):
    """The payloads of the length-delimited field `number` at the top of a
    protobuf message, in order, cut out without parsing them; other fields
    skipped. ValueError when the bytes are not a message. Linear in the bytes."""
    found, pos = [], 0
    while pos < len(data):
        tag, pos = _varint_at(data, pos)
        kind = tag & 7
        if kind == 0:
            pos = _varint_at(data, pos)[1]
            continue
        if kind == 2:
            length, pos = _varint_at(data, pos)
            end = pos + length
            if tag >> 3 == number and end <= len(data):
                found.append(data[pos:end])
        elif kind in (1, 5):
            end = pos + (8 if kind == 1 else 4)
        else:
            raise ValueError("wire type %d at byte %d" % (kind, pos))
        if end > len(data):
            raise ValueError("a field runs past the end")
        pos = end
    return found


class PodResourcesUnavailable(Exception):
    """PodResources did not answer; str() is one line saying why."""


class PodResourcesClient(object):
    """A client of the kubelet's PodResources API on its unix socket.
    Connected only for a call, with a 2 s deadline; never polled. Answers are
    bounded by grpc's default 4 MiB receive limit (a busy node's List is
    about 100 KB); a bigger one fails like any other answer. A call returns
    the answer's bytes: grpc's asyncio client would parse it on the event
    loop, so parsing is decode()'s, wherever the caller runs it."""

    DEADLINE = 2.0

    def __init__(self, path):
        self.path = path

    def check_reachable(self):
        """Fail at once, with the standard library alone, where no call could
        succeed: no socket, nobody serving it, no permission."""
        try:
            state = unix_socket_state(self.path)
        except OSError as e:
            raise PodResourcesUnavailable("PodResources socket %s: %s" % (self.path, e.strerror or e))
        if state == "missing":
            raise PodResourcesUnavailable("PodResources socket %s does not exist" % self.path)
        if state == "refused":
            raise PodResourcesUnavailable("nothing serves the PodResources socket %s" % self.path)

    def _rpc(self, api, channel, method):
        request = getattr(api.pb, POD_RESOURCES_METHODS[method][0])
        return channel.unary_unary(method, request_serializer=request.SerializeToString), request()

    def decode(self, api, method, answer):
        """The message in `answer` (bytes of `method`'s response); one line
        saying what came instead when it is none. List's answer is parsed a
        pod at a time: protobuf's C parser would hold the interpreter for all
        4 MiB at once, and so the event loop, whichever thread parses."""
        name = POD_RESOURCES_METHODS[method][1]
        try:
            if method == POD_RESOURCES_LIST:
                pods = length_delimited_fields(answer, 1)
                for pod in pods:                     # every one parses, or the answer is none
                    api.pb.PodResources.FromString(pod)
                return PodResourcesList(api.pb.PodResources.FromString, pods)
            return getattr(api.pb, name).FromString(answer)
        except (api.DecodeError, RecursionError, ValueError) as e:
            raise PodResourcesUnavailable("PodResources at %s answered %d bytes that are not a %s (%s)"
                                          % (self.path, len(answer), name, quote(one_line(e), 80)))

    def _failure(self, error):
        code = error.code() if hasattr(error, "code") else None
        details = error.details() if hasattr(error, "details") else error
        return "PodResources at %s: %s (%s)" % (self.path, getattr(code, "name", code), quote(details, 120))

    def call(self, api, method):
        """The answer's bytes to `method` (a path of POD_RESOURCES_METHODS), blocking."""
        self.check_reachable()
        channel = api.grpc.insecure_channel("unix:" + self.path)
        try:
            rpc, request = self._rpc(api, channel, method)
            return rpc(request, timeout=self.DEADLINE)
        except api.grpc.RpcError as e:
            raise PodResourcesUnavailable(self._failure(e))
        finally:
            channel.close()

    async def call_async(self, api, method):
        """call() on the event loop."""
        self.check_reachable()
        channel = api.aio.insecure_channel("unix:" + self.path)
        try:
            rpc, request = self._rpc(api, channel, method)
            return await rpc(request, timeout=self.DEADLINE)
        except api.grpc.RpcError as e:
            raise PodResourcesUnavailable(self._failure(e))
        finally:
            await channel.close()


POD_RESOURCES_OFF = ("PodResources is off: --pod-resources-socket off", True)


def ask_pod_resources(path, method):
    """(answer or None, (why, normal)) of a PodResources call, blocking."""
    if path is None:
        return None, POD_RESOURCES_OFF
    client = PodResourcesClient(path)
    try:
        client.check_reachable()
        api = load_grpc()
        return client.decode(api, method, client.call(api, method)), None
    except PodResourcesUnavailable as e:
        return None, (str(e), False)
    except InputError as e:
        return None, ("PodResources not asked: %s" % e, False)


# Who holds the plugin's CPUs, and how that was learnt. by_cpu: {cpu:
# (Holder, ...)}, None when no source could tell; source: a HOLDER_SOURCES
# key or None; failures: ((source, why, normal), ...) of the sources tried
# in vain, `normal` when that is no fault (off, or no checkpoint written yet).
HolderReport = collections.namedtuple("HolderReport", "by_cpu source failures")


def running_key(holder):
    """How the runtime names a holder's container: namespace/pod/container,
    or pod-uid/container for one from the checkpoint."""
    if holder.namespace is not None:
        return "%s/%s/%s" % (holder.namespace, holder.pod, holder.container)
    return "%s/%s" % (holder.pod_uid, holder.container)


def running_first(by_cpu, confirmed, running):
    """by_cpu with each CPU's holders reordered, none dropped: first those
    the runtime runs (`running`: running_key()s), then those the kubelet's
    checkpoint confirms (`confirmed`: {cpu: container names it holds it
    for}; None when the holders come from the checkpoint itself), then the
    rest (terminated pods PodResources still lists, kubernetes#119423), each
    group in the order given. Bounded views (/metrics) keep the first."""
    ordered = {}
    for cpu, holders in by_cpu.items():
        if len(holders) > 1:
            names = confirmed.get(cpu, ()) if confirmed is not None else None

            def rank(holder):
                if running_key(holder) in running:
                    return 0
                return 1 if names is None or holder.container in names else 2
            holders = tuple(sorted(holders, key=rank))
        ordered[cpu] = holders
    return ordered


def find_holders(answer, failure, directory, resource_name, running=frozenset()):
    """The holders from PodResources' List `answer` when there is one, else
    (PodResources having failed: `failure` = (why, normal)) from the
    kubelet's checkpoint in the device-plugin `directory`, read within its
    bounds; a CPU's holders ordered by running_first() (`running`: the
    running_key()s of the containers the runtime runs, when it says)."""
    if answer is not None:
        by_cpu = pod_resources_holders(answer, resource_name)
        confirmed = {}
        if any(len(holders) > 1 for holders in by_cpu.values()):
            # PodResources names pods, the checkpoint UIDs: what they share is the container's name
            try:
                text = read_checkpoint(directory)
                if text is not None:
                    confirmed = {cpu: {holder.container for holder in holders}
                                 for cpu, holders in checkpoint_holders(text, resource_name).items()}
            except (InputError, ValueError):
                pass                                     # no confirmation: the kubelet's order
        return HolderReport(running_first(by_cpu, confirmed, running), "pod-resources", ())
    failures = (("pod-resources",) + failure,)
    path = os.path.join(directory, CHECKPOINT_NAME)
    try:
        text = read_checkpoint(directory)
        if text is not None:
            return HolderReport(running_first(checkpoint_holders(text, resource_name), None, running),
                                "checkpoint", failures)
        why, normal = "no checkpoint at %s" % path, True
    except InputError as e:
        why, normal = str(e), False
    except ValueError as e:
        why, normal = "%s: %s" % (path, e), False
    return HolderReport(None, None, failures + (("checkpoint", why, normal),))


def holder_report(api, client, answer, failure, directory, resource_name, running=frozenset()):
    """find_holders() from the bytes of a List `answer` of `client` (None:
    PodResources failed, `failure` says how). All its work grows with the
    answer: it runs off the event loop."""
    message = None
    if answer is not None:
        try:
            message = client.decode(api, POD_RESOURCES_LIST, answer)
        except PodResourcesUnavailable as e:
            failure = (str(e), False)
    return find_holders(message, failure, directory, resource_name, running)


def holdings_line(report, served):
    """The start's line on who holds the served CPUs (what the kubelet has allocated)."""
    if report.by_cpu is None:
        return "who holds the %d CPUs is unknown (%s)" % (len(served), holders_note(report))
    held = {cpu: holders for cpu, holders in report.by_cpu.items() if cpu in served}
    gone = sorted(cpu for cpu in report.by_cpu if cpu not in served)
    return "the kubelet reports %d of %d CPUs allocated%s (from %s)%s" % (
        len(held), len(served), ": " + holdings_text(held) if held else "", HOLDER_SOURCES[report.source],
        "; allocated but no longer served: %s" % brief_cpu_list(gone) if gone else "")


def yanked_line(report, lost, allocated):
    """The warning naming who holds CPUs that went offline or stopped being
    served, None when nobody holds them; `allocated`: what this process
    handed out, for when no source can name the holders."""
    if report.by_cpu is not None:
        yanked = {cpu: report.by_cpu[cpu] for cpu in lost if cpu in report.by_cpu}
        how = "named by %s" % HOLDER_SOURCES[report.source]
    else:
        yanked = {cpu: () for cpu in lost if cpu in allocated}
        how = holders_note(report)
    if not yanked:
        return None
    return ("CPUs %s are offline or no longer isolated but allocated (%s; %s); those pods keep them, new pods "
            "will not get them" % (format_cpu_list(yanked), holdings_text(yanked), how))


def holders_note(report):
    """Why the better sources of a HolderReport were not used ("" when none failed)."""
    return "; ".join(why for _, why, _ in report.failures)


def holders_clause(report):
    """Where the holders in a listing come from, for its header."""
    if report.source == "pod-resources":
        return "holders from PodResources"
    if report.source == "checkpoint":
        return "holders from the kubelet's checkpoint (%s)" % holders_note(report)
    return "holders unknown (%s)" % holders_note(report)


def file_identity(path):
    """A file's identity, (device, inode), None when absent. Not its ctime:
    chmod or chown (restorecon, `chown -R` of the directory) changes that,
    and the file is the same. A socket made anew may get its inode number
    back; a kubelet restart is still seen, as the kubelet wipes ours too."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def unix_socket_state(path):
    """'listening', 'refused' (a socket file nobody serves) or 'missing',
    found without blocking: a non-blocking connect to a full backlog fails
    with EAGAIN, which means that someone listens. OSError otherwise (EACCES)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
        return "listening"
    except BlockingIOError:
        return "listening"
    except ConnectionRefusedError:
        return "refused"
    except FileNotFoundError:
        return "missing"
    finally:
        probe.close()


def unbindable(path):
    """Why a unix socket cannot be bound at `path` (read-only or missing
    directory, permissions), or None. grpc would only say "bind failed"."""
    trial = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        trial.bind(path)
    except OSError as e:
        return e.strerror or str(e)
    finally:
        trial.close()
    os.unlink(path)
    return None


class InstanceLock(object):
    """One plugin per node: an exclusive flock on the device-plugin
    directory itself. A lock file would not do: the kubelet deletes the
    directory's files when it starts, and a new instance would lock a new
    file. The directory is the same inode for a host service and a DaemonSet
    pod that mounts it; the lock lasts as long as the process. A directory
    made anew at the path (moved away, removed) is locked anew."""

    def __init__(self, directory):
        self.directory = directory
        self.fd = None
        self.identity = None             # (device, inode) of the directory locked

    def hold(self):
        """Hold the lock on the directory now at the path: True; False while
        there is no directory; InputError when another instance holds it."""
        try:
            st = os.stat(self.directory)
        except OSError:
            return False
        if (st.st_dev, st.st_ino) == self.identity:
            return True
        self.release()
        try:
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise InputError("another running instance holds the lock on %s; stop it first" % self.directory)
            raise InputError("cannot lock %s: %s" % (self.directory, e.strerror or e))
        st = os.fstat(fd)
        self.fd, self.identity = fd, (st.st_dev, st.st_ino)
        return True

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = self.identity = None


def clear_stale_socket(path):
    """Remove a socket a dead instance left; InputError when one still
    answers there or the file is no socket; OSError when it cannot be removed."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise InputError("%s exists and is not a socket; refusing to replace it" % path)
    try:
        state = unix_socket_state(path)
    except OSError as e:
        raise InputError("%s: cannot tell whether another instance serves it: %s" % (path, e.strerror or e))
    if state == "listening":
        raise InputError("%s is served by another running instance; stop it first" % path)
    if state == "refused":
        os.unlink(path)
        log.info("removed stale socket %s", path)


_IN_EVENTS = 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800  # moves, create, delete, self (not attrib: chmod is no news)
_IN_MOVE_SELF = 0x800
_IN_IGNORED = 0x8000
_IN_NONBLOCK, _IN_CLOEXEC = 0o4000, 0o2000000


class DirectoryWatch(object):
    """Calls `on_change` when entries of a directory are created, deleted or
    moved (inotify through libc). `active` is False when inotify is
    unavailable or the directory is missing: the caller then polls."""

    def __init__(self, path, on_change):
        self.path = path
        self.on_change = on_change
        self.fd = None
        self.wd = -1
        self.active = False
        self._libc = None
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
            if fd >= 0:
                self._libc, self.fd = libc, fd
                asyncio.get_event_loop().add_reader(fd, self._readable)
        except (ImportError, OSError, AttributeError) as e:
            log.debug("inotify unavailable (%s); polling %s", one_line(e), path)

    def arm(self):
        """Watch the directory if not yet watching; cheap when already active."""
        if self.fd is not None and not self.active:
            self.wd = self._libc.inotify_add_watch(self.fd, os.fsencode(self.path), _IN_EVENTS)
            self.active = self.wd >= 0
        return self.active

    def _readable(self):
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        offset = 0
        while offset + 16 <= len(data):
            wd, mask, _cookie, length = struct.unpack_from("iIII", data, offset)
            if mask & _IN_MOVE_SELF and wd == self.wd:
                # the watch follows the inode; a directory made at the path
                # later is another one: drop it, re-arm on the path
                self._libc.inotify_rm_watch(self.fd, wd)
                self.active = False
            elif mask & _IN_IGNORED and wd == self.wd:
                self.active = False          # directory gone: re-armed when it returns
            offset += 16 + length
        self.on_change()

    def close(self):
        if self.fd is not None:
            asyncio.get_event_loop().remove_reader(self.fd)
            os.close(self.fd)
            self.fd = None


_NETLINK_KOBJECT_UEVENT = 15


class CpuUevents(object):
    """Calls `on_cpu_event` on kernel uevents for CPUs (online/offline/add),
    so hotplug is seen at once instead of by polling. open() returns None
    where the kernel's uevent socket is out of reach."""

    def __init__(self, sock, on_cpu_event):
        self.sock = sock
        self.on_cpu_event = on_cpu_event
        asyncio.get_event_loop().add_reader(sock.fileno(), self._readable)

    @classmethod
    def open(cls, on_cpu_event):
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_KOBJECT_UEVENT)
            sock.bind((0, 1))                # group 1: the kernel's own events
            sock.setblocking(False)
        except (OSError, AttributeError) as e:
            log.info("kernel uevents unavailable (%s); polling for CPU hotplug", one_line(e))
            return None
        return cls(sock, on_cpu_event)

    def _readable(self):
        seen = False
        while True:
            try:
                message = self.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError:                  # ENOBUFS: events were lost; rescan anyway
                seen = True
                continue
            header = message.split(b"\0", 1)[0]
            if b"@/devices/system/cpu/" in header:
                log.debug("kernel uevent %s: rescanning", quote(header.decode("latin-1"), 60))
                seen = True
        if seen:
            self.on_cpu_event()

    def close(self):
        asyncio.get_event_loop().remove_reader(self.sock.fileno())
        self.sock.close()


class Backoff(object):
    """Retry delays for the kubelet: short, growing to a small cap."""

    def __init__(self, first=0.5, cap=5.0):
        self.first, self.cap, self.delay = first, cap, first

    def next(self):
        delay, self.delay = self.delay, min(self.delay * 2, self.cap)
        return delay

    def reset(self):
        self.delay = self.first


class SystemdNotifier(object):
    """sd_notify(3) on the standard library: one datagram per message to
    $NOTIFY_SOCKET (a path, or @name in the abstract namespace). Nothing is
    sent where it is unset; failing sends are logged at debug, when they
    start and when sends go through again. The
    watchdog is ours when WATCHDOG_USEC is set and WATCHDOG_PID, if set,
    names this process: `watchdog` is then its interval in seconds.

    A message the socket refuses (EAGAIN: systemd's queue is full) is not
    lost: it goes, in order, before the next one sent (at the latest the
    next watchdog ping); a refused ping is not kept, the next one says the
    same. At most PENDING_KEPT messages wait, the oldest give way."""

    PENDING_KEPT = 16
    PING_FLOOR = 0.05                    # seconds between pings at least, as --rescan-interval's floor

    def __init__(self, environ):
        path = environ.get("NOTIFY_SOCKET") or ""
        self.address = ("\0" + path[1:] if path.startswith("@") else path) or None
        self.sock = None
        self.failed = False                  # the last send failed (logged when it starts and ends)
        self.pending = collections.deque(maxlen=self.PENDING_KEPT)   # refused messages, oldest first
        self.watchdog = None
        usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
        if self.address and usec.isdigit() and int(usec) > 0 and pid in ("", str(os.getpid())):
            self.watchdog = int(usec) / 1e6

    def send(self, **fields):
        """One message, e.g. send(READY=1, STATUS="...")."""
        if self.address is None:
            return
        text = "".join("%s=%s\n" % (name, " ".join(str(value).split())) for name, value in sorted(fields.items()))
        message = text.encode("utf-8", "replace")
        ping = None
        if set(fields) == {"WATCHDOG"}:
            ping = message
        else:
            self.pending.append(message)
        while self.pending or ping is not None:
            try:
                if self.sock is None:
                    self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self.sock.setblocking(False)
                self.sock.sendto(self.pending[0] if self.pending else ping, self.address)
            except OSError as e:
                # full (systemd busy) or no socket yet: tried again with the
                # next send; refused for good (too long, nobody there): dropped
                again = self.sock is None or isinstance(e, BlockingIOError) or e.errno == errno.ENOBUFS
                if not self.failed:
                    self.failed = True
                    log.debug("systemd notification to %s failed: %s; %s", quote(self.address, 100), one_line(e),
                              "%d message(s) wait for the next send" % len(self.pending) if again else "dropped")
                if again:
                    return
            if self.pending:
                self.pending.popleft()
            else:
                ping = None
        if self.failed:
            self.failed = False
            log.debug("systemd notifications to %s go through again", quote(self.address, 100))

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class Conditions(object):
    """Conditions that persist (a kubelet that does not answer, a host file
    that does not parse, no devices to serve): logged when they start, when
    their text changes to one not yet said and when they end, with how often
    they were seen; at debug in between. A condition costs a few lines, not
    one per retry, also when its text alternates (a peer in a crash loop
    fails in one of a few ways in turn)."""

    TEXTS_KEPT = 16                       # texts remembered per condition as said

    def __init__(self):
        self.active = {}                  # key -> [text, level, times seen, since (monotonic), texts said]

    def report(self, key, text, level=logging.WARNING):
        entry = self.active.get(key)
        if entry is None:
            self.active[key] = [text, level, 1, time.monotonic(), collections.OrderedDict([(text, None)])]
        else:
            entry[2] += 1
            said = entry[4]
            entry[:2] = [text, level]
            if text in said:
                said.move_to_end(text)
                log.debug("%s", text)
                return
            said[text] = None
            if len(said) > self.TEXTS_KEPT:
                said.popitem(last=False)
        log.log(level, "%s", text)

    def clear(self, key):
        """The condition ended: a warning gets its closing line; an info
        (waiting for the kubelet) is closed by what comes next."""
        entry = self.active.pop(key, None)
        if entry is not None:
            text, level, times, since, _ = entry
            log.log(logging.INFO if level >= logging.WARNING else logging.DEBUG,
                    "resolved after %d time%s over %.1f s: %s", times, "" if times == 1 else "s",
                    time.monotonic() - since, text)


def health_status(serving, heartbeat_age, max_age):
    """(healthy, text) for /healthz: the socket is served, and the event
    loop's host watch ran within `max_age` seconds (a stuck loop or task is
    not healthy, whatever else still answers)."""
    if not serving:
        return False, "not serving"
    if heartbeat_age > max_age:
        return False, "the host watch last ran %.1f s ago" % heartbeat_age
    return True, "serving"


def log_loop_exception(loop, context):
    """asyncio's report of an error no task awaited: one line, not a traceback."""
    error = context.get("exception")
    detail = "; %s: %s" % (type(error).__name__, one_line(error)) if error is not None else ""
    log.error("internal error in the event loop: %s%s", one_line(context.get("message") or "?"), detail)
    if error is not None:
        log.debug("details", exc_info=error)


class Plugin(object):
    """One running plugin: keeps its socket served, registered with whichever
    kubelet runs, and the device list current, until stopped."""

    REGISTER_TIMEOUT = 10.0      # the kubelet dials back before it answers
    POLL_INTERVAL = 1.0          # directory checks where inotify cannot watch
    UEVENT_RESCAN = 5.0          # safety rescan period while uevents report hotplug
    STREAM_GRACE = 1.0           # the kubelet's ListAndWatch gone that long: register again

    RELOAD_BURST = 1.0           # SIGHUPs closer than this are one burst: one info line

    def __init__(self, config, inventory, api, lock, notifier, metrics_server=None):
        self.config = config
        self.inventory = inventory
        self.api = api
        self.lock = lock                 # InstanceLock: held before our socket is touched
        self.notifier = notifier         # SystemdNotifier
        self.session_state = "starting"  # what the session does or waits for, for STATUS=
        self.told_status = None          # the last STATUS= sent; None: READY=1 not yet sent
        self.reload_signals = 0          # SIGHUPs not yet acted on
        self.last_reload = None          # when the last one was (monotonic)
        self.metrics_server = metrics_server
        self.socket_path = os.path.join(config.device_plugin_path, config.socket_name)
        self.kubelet_socket = os.path.join(config.device_plugin_path, KUBELET_SOCKET_NAME)
        self.server = None
        self.served_identity = None      # our socket file as we bound it
        self.registered_with = None      # kubelet.sock identity we are registered with
        self.last_kubelet = None         # ... or were, before it went away
        self.socket_wiped = False        # our socket vanished since we registered
        self.awaiting_stream = False     # registering began; the kubelet's ListAndWatch not yet seen
        self.kubelet_stream = None       # the id of the kubelet's ListAndWatch
        self.kubelet_stream_closed = None   # when it ended (monotonic)
        self.exit_code = 0
        self.conditions = Conditions()
        self.allowed_cpus = frozenset(os.sched_getaffinity(0))   # what we may run on, before pinning
        self.pinned_to = None
        self.counters = Counters()
        self.heartbeat = time.monotonic()   # stamped by each pass of the host watch
        self.pod_resources = (PodResourcesClient(config.pod_resources_socket)
                              if config.pod_resources_socket else None)
        self.holders_task, self.holders_asked = None, 0.0   # recent_holders()' shared question
        self.worker = None                                   # off_loop()'s thread
        self.nri = None                                      # NriSession, with --nri auto|on
        self.told_holdings = False
        self.background = set()                              # tasks to cancel when stopping

    # Entry -------------------------------------------------------------------

    async def run(self):
        loop = asyncio.get_event_loop()
        self.loop = loop
        loop.set_exception_handler(log_loop_exception)
        self.stopping = asyncio.Event()
        self.session_wakeup = asyncio.Event()
        self.rescan_wakeup = asyncio.Event()
        self.board = DeviceBoard(self.inventory.devices)
        self.servicer = DevicePluginServicer(self.api, self.board, self.config, self._stream_event, self.counters)
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self.stop)
            loop.add_signal_handler(signal.SIGHUP, self._reload)
            if PENDING_SIGNALS:                      # a SIGHUP while starting: honoured now
                del PENDING_SIGNALS[:]
                self._reload()
        self.place_self()
        if self.metrics_server:
            self.metrics_server.start(self.http_answer)
        self.watch = DirectoryWatch(self.config.device_plugin_path, self._directory_changed)
        self.uevents = (CpuUevents.open(self.rescan_wakeup.set)
                        if self.config.uevents == "auto" and os.path.realpath(self.config.sysfs) == "/sys"
                        else None)
        tasks = [loop.create_task(self._guarded(self.run_session)),
                 loop.create_task(self._guarded(self.watch_host))]
        if self.notifier.watchdog:
            self.check_watchdog_interval()
            tasks.append(loop.create_task(self._guarded(self.feed_watchdog)))
        if self.config.nri != "off":
            self.nri = NriSession(self.config, self.api, self.inventory, self.lock, self.conditions, self.counters,
                                  self.off_loop)
            tasks.append(loop.create_task(self._guarded(self.nri.run)))
        log.info("advertising %s: %d devices (%s) from %s", self.config.resource_name,
                 len(self.inventory.devices), format_cpu_list(d.cpu for d in self.inventory.devices) or "none",
                 self.inventory.origin)
        self.note_device_count()
        await self.stopping.wait()
        if self.nri is not None:
            self.nri.stop()
        for task in tasks + list(self.background):
            task.cancel()
        await asyncio.gather(*tasks + list(self.background), return_exceptions=True)
        if self.metrics_server:
            await self.metrics_server.close()
        await self.board.close()
        await self.stop_serving(grace=0.3)
        self.watch.close()
        if self.worker is not None:
            self.worker.shutdown(wait=False)
        if self.uevents:
            self.uevents.close()
        self.notifier.close()
        log.info("stopped")
        return self.exit_code

    def stop(self, exit_code=None):
        if exit_code is not None:
            self.exit_code = exit_code
        if not self.stopping.is_set():
            self.notifier.send(STOPPING=1)
        self.stopping.set()
        self.session_wakeup.set()
        self.rescan_wakeup.set()

    def _reload(self):
        """SIGHUP: the host watch re-reads the host at once. However many
        arrive, at most one rescan waits behind the one running (a SIGHUP
        after that one read its files still gets its own)."""
        self.reload_signals += 1
        self.rescan_wakeup.set()

    def reload_host(self):
        """Act on the SIGHUPs received: /proc/cmdline and the rest are read
        again by the scan that follows. One info line per burst."""
        signals, self.reload_signals = self.reload_signals, 0
        now = time.monotonic()
        burst = self.last_reload is not None and now - self.last_reload < self.RELOAD_BURST
        self.last_reload = now
        log.log(logging.DEBUG if burst else logging.INFO, "SIGHUP%s: re-reading the host",
                " (%d signals)" % signals if signals > 1 else "")
        self.notifier.send(RELOADING=1, MONOTONIC_USEC=int(now * 1e6))   # CLOCK_MONOTONIC, as systemd wants
        try:
            self.inventory.reload()
        except InputError as e:
            log.warning("reload failed, keeping the last configuration: %s", e)

    def tell_status(self, state=None):
        """The session's state to systemd: READY=1 with the first one (the
        first scan is done by then, whether or not a kubelet is there: a
        node booting without one must not hang its start job), then STATUS=
        whenever it changes."""
        if state is not None:
            self.session_state = state
        status = "%s; advertising %d devices" % (self.session_state, len(self.inventory.devices))
        if status == self.told_status:
            return
        if self.told_status is None:
            self.notifier.send(READY=1, STATUS=status)
        else:
            self.notifier.send(STATUS=status)
        self.told_status = status

    def check_watchdog_interval(self):
        """Say at start when the watchdog cannot see what its interval promises."""
        silence = 3 * self.rescan_period() + 2.0
        if self.notifier.watchdog <= silence:
            log.warning("WatchdogSec=%gs is not longer than the host watch may stay silent (%g s: 3 rescan "
                        "periods of %g s + 2 s): a stuck host watch is noticed after %g s, not %g s; raise "
                        "WatchdogSec or lower --rescan-interval", self.notifier.watchdog, silence,
                        self.rescan_period(), silence, self.notifier.watchdog)

    async def feed_watchdog(self):
        """WATCHDOG=1 at half the watchdog's interval, from the event loop
        (a frozen loop sends nothing) and only while the host watch runs."""
        while True:
            if time.monotonic() - self.heartbeat <= 3 * self.rescan_period() + 2.0:
                self.notifier.send(WATCHDOG=1)
            # a floor, as --rescan-interval has: WATCHDOG_USEC=1 pinged in a busy loop
            await asyncio.sleep(max(self.notifier.watchdog / 2, SystemdNotifier.PING_FLOOR))

    def _directory_changed(self):
        """inotify on the device-plugin directory: the kubelet restarted or
        wrote its checkpoint."""
        self.session_wakeup.set()
        if self.nri is not None:
            self.nri.kubelet_files_changed()

    def spawn(self, coroutine):
        """Run `coroutine` beside the loops, cancelled when the plugin stops."""
        task = self.loop.create_task(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    def _stream_event(self, stream, opened):
        """Follow the kubelet's own ListAndWatch: the first one opened once
        registering began (the kubelet opens it, and may drop it, before it
        answers Register). Streams other clients hold do not count."""
        if opened:
            if self.awaiting_stream:
                self.kubelet_stream, self.awaiting_stream = stream, False
        elif stream == self.kubelet_stream:
            self.kubelet_stream_closed = time.monotonic()
            self.loop.call_later(self.STREAM_GRACE + 0.05, self.session_wakeup.set)

    async def _guarded(self, loop_body):
        """Run a forever-loop; a bug in it is logged and the loop restarted,
        an InputError (e.g. another instance took our socket) stops the plugin."""
        while not self.stopping.is_set():
            try:
                await loop_body()
            except asyncio.CancelledError:
                raise
            except InputError as e:
                log.error("%s", e)
                self.stop(2)
            except Exception as e:
                log.error("internal error in %s: %s: %s", loop_body.__name__, type(e).__name__, one_line(e))
                log.debug("details", exc_info=True)
                await self._sleep(1.0)

    async def _sleep(self, seconds, wakeup=None):
        """Sleep up to `seconds` (None: no limit) unless `wakeup` (default:
        stopping, which stop() also sets) cuts it short; clears `wakeup`."""
        event = wakeup or self.stopping
        try:
            await asyncio.wait_for(event.wait(), seconds)
        except asyncio.TimeoutError:
            pass
        if wakeup is not None:
            wakeup.clear()

    # Host ----------------------------------------------------------------------

    def rescan_period(self):
        return max(self.config.rescan_interval, self.UEVENT_RESCAN) if self.uevents else self.config.rescan_interval

    async def watch_host(self):
        while not self.stopping.is_set():
            await self._sleep(self.rescan_period(), self.rescan_wakeup)
            self.heartbeat = time.monotonic()
            before, online = self.inventory.devices, self.inventory.online
            reloading = self.reload_signals > 0
            if reloading:
                self.reload_host()
            try:
                change = self.inventory.scan()
            except InputError as e:
                self.conditions.report("rescan", "rescan failed, keeping the last device list: %s" % e)
                continue
            finally:
                if reloading:
                    self.notifier.send(READY=1)
            self.conditions.clear("rescan")
            if change:
                # publish first, explain second: nothing said about a change
                # may keep the kubelet from learning of it
                await self.board.publish(self.inventory.devices)
                log.info("%s", change)
                self.note_device_count()
                self.tell_status()
                self.spawn(self.warn_if_yanked(before, self.inventory.devices))
            if change or self.inventory.online != online:       # a housekeeping CPU matters too
                self.place_self()
                if self.nri is not None:
                    self.nri.host_changed()

    def note_device_count(self):
        """Serving nothing (a node booted without isolcpus=, an empty source)
        is a warning, once per change."""
        if self.inventory.devices:
            self.conditions.clear("no devices")
        else:
            self.conditions.report("no devices", "serving 0 devices: %s names no CPU this host has; boot with "
                                   "isolcpus=<cpu-list> or set --cpus" % self.inventory.origin)

    def place_self(self):
        """Keep every thread of the plugin off the CPUs it hands out."""
        if self.config.self_affinity == "off":
            return
        inventory = self.inventory
        target = housekeeping_cpus(inventory.online, inventory.served, self.allowed_cpus)
        if not target:
            self.conditions.report("affinity", "self-affinity: no housekeeping CPU is allowed to the plugin "
                                   "(allowed %s, served %s); staying where it is"
                                   % (format_cpu_list(self.allowed_cpus), format_cpu_list(inventory.served)))
            return
        if target == self.pinned_to:
            return
        failures = pin_threads(target)
        if failures:
            self.conditions.report("affinity", "self-affinity: could not move %d threads to CPUs %s (%s)"
                                   % (len(failures), format_cpu_list(target), one_line(failures[0][1])))
        else:
            self.conditions.clear("affinity")
            log.info("self-affinity: plugin threads on housekeeping CPUs %s", format_cpu_list(target))
        self.pinned_to = target

    async def warn_if_yanked(self, before, after):
        """Log CPUs in use by containers that went offline or stopped being
        served, naming who holds them: running pods keep them (the kubelet
        does not take devices back), but nothing should happen silently."""
        lost = {d.cpu for d in before if d.healthy} - {d.cpu for d in after if d.healthy}
        if not lost:
            return
        try:
            report = await self.holders()
            line = await self.off_loop(yanked_line, report, lost, frozenset(self.servicer.allocated))
            if line:
                log.warning("%s", line)
        except asyncio.CancelledError:                # an Exception before Python 3.8
            raise
        except Exception as e:
            log.warning("could not tell who holds the CPUs that went away: %s: %s", type(e).__name__, one_line(e))

    async def off_loop(self, function, *args):
        """function(*args) in the plugin's worker thread: for work that grows
        with what the kubelet answers, so that the event loop does not wait
        on it. One thread, started on first use, idle otherwise."""
        if self.worker is None:
            self.worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="isolcpu-worker")
        return await self.loop.run_in_executor(self.worker, functools.partial(function, *args))

    async def holders(self):
        """Who holds the plugin's CPUs: PodResources' List, else the kubelet's
        checkpoint. Each source that fails is a condition of its own, logged
        once per way it fails (a missing socket: one warning, not one per use)."""
        answer, failure = None, POD_RESOURCES_OFF
        if self.pod_resources is not None:
            try:
                answer = await self.pod_resources.call_async(self.api, POD_RESOURCES_LIST)
            except PodResourcesUnavailable as e:
                failure = (str(e), False)
        running = frozenset()
        if self.nri is not None and self.nri.connected:
            # what the runtime runs comes first in each CPU's holders (a bounded /metrics keeps it)
            running = self.nri.running_keys()
        report = await self.off_loop(holder_report, self.api, self.pod_resources, answer, failure,
                                     self.config.device_plugin_path, self.config.resource_name, running)
        if report.source == "checkpoint" and self.nri is not None and self.nri.connected:
            # the checkpoint cannot tell an init container from the app that reuses its CPUs: the runtime can
            report = report._replace(by_cpu=await self.off_loop(name_the_running, report.by_cpu,
                                                                self.nri.running_names()))
        failed = {source: (why, normal) for source, why, normal in report.failures}
        for source, text in HOLDER_SOURCES.items():
            if source in failed:
                why, normal = failed[source]
                self.conditions.report(source, "holders of CPUs cannot be named by %s: %s" % (text, why),
                                       logging.INFO if normal else logging.WARNING)
            else:
                self.conditions.clear(source)
        return report

    async def recent_holders(self, max_age=1.0):
        """holders(), asked at most once per `max_age` seconds; callers at the
        same time share one question (metrics scrapes)."""
        task = self.holders_task
        if task is None or (task.done() and time.monotonic() - self.holders_asked >= max_age):
            self.holders_asked = time.monotonic()
            task = self.holders_task = self.spawn(self.holders())
        return await asyncio.shield(task)

    async def tell_holdings(self):
        """Once a plugin starts: what the kubelet has allocated of its CPUs, so
        that a restarted plugin's log shows the node's state."""
        report = await self.recent_holders()
        log.info("%s", await self.off_loop(holdings_line, report, frozenset(d.cpu for d in self.board.devices)))

    # Socket and registration ---------------------------------------------------

    async def run_session(self):
        backoff = Backoff()
        while not self.stopping.is_set():
            watched = self.watch.arm()
            delay = None if watched else self.POLL_INTERVAL
            if not watched and self.nri is not None:
                self.nri.kubelet_files_changed()
            if not await self.ensure_serving():
                await self._sleep(self.POLL_INTERVAL, self.session_wakeup)
                continue
            kubelet = file_identity(self.kubelet_socket)
            if kubelet is None:
                self.registered_with = None
                self.conditions.report("kubelet", "waiting for the kubelet to serve %s" % self.kubelet_socket,
                                       logging.INFO)
                self.tell_status("serving; waiting for the kubelet to serve %s" % self.kubelet_socket)
            elif self._stream_lost():
                log.warning("kubelet closed ListAndWatch; registering again")
                self.registered_with = None
                continue
            elif kubelet != self.registered_with:
                # a restarted kubelet has a new kubelet.sock and wiped our socket;
                # the new kubelet.sock may have the old one's inode, the wipe is sure
                if self.last_kubelet is not None and (kubelet != self.last_kubelet or self.socket_wiped):
                    log.info("kubelet restarted (new %s); registering again", KUBELET_SOCKET_NAME)
                    self.counters.kubelet_restarts += 1
                    self.last_kubelet = None
                self.socket_wiped = False
                self.awaiting_stream, self.kubelet_stream, self.kubelet_stream_closed = True, None, None
                self.tell_status("serving; registering with the kubelet")
                registered = await self.register_unless_replaced(kubelet)
                if registered is None:
                    continue                           # a new kubelet.sock: try that one now
                if registered:
                    self.counters.registrations += 1
                    self.registered_with = self.last_kubelet = kubelet
                    backoff.reset()
                    self.conditions.clear("kubelet")
                    self.tell_status("serving, registered with the kubelet")
                    if not self.told_holdings:
                        self.told_holdings = True
                        self.spawn(self.tell_holdings())
                    continue
                self.tell_status("serving; registering with the kubelet failed, retrying")
                delay = backoff.next()
            await self._sleep(delay, self.session_wakeup)

    def _stream_lost(self):
        closed = self.kubelet_stream_closed
        return (self.registered_with is not None and closed is not None
                and time.monotonic() - closed >= self.STREAM_GRACE)

    def health(self):
        max_age = 3 * self.rescan_period() + 2.0
        return health_status(self.server is not None, time.monotonic() - self.heartbeat, max_age)

    async def http_answer(self, path):
        """(status, content type, body) for a GET of `path` on --metrics-address."""
        if path == "/metrics":
            holders = await self.recent_holders()
            return 200, "text/plain; version=0.0.4; charset=utf-8", await self.off_loop(
                render_metrics, self.config.resource_name, self.board.devices, self.counters,
                self.registered_with is not None, holders, None if self.nri is None else self.nri.connected)
        if path == "/healthz":
            ok, text = self.health()
            return (200 if ok else 503), "text/plain; charset=utf-8", text + "\n"
        return 404, "text/plain; charset=utf-8", "not found: try /metrics or /healthz\n"

    async def ensure_serving(self):
        """Serve our socket; (re)create it when missing or replaced, e.g. after
        the kubelet wiped the directory. False while it cannot be served."""
        if self.server is not None and file_identity(self.socket_path) == self.served_identity:
            return True
        if self.server is not None:
            log.info("socket %s was removed; serving it again", self.socket_path)
            self.socket_wiped = True               # what a starting kubelet does to every plugin
            await self.stop_serving()
        directory = self.config.device_plugin_path
        if not self.lock.hold():                   # InputError: another instance has it; we stop
            self.conditions.report("serve", "device-plugin directory %s does not exist; waiting for it" % directory)
            self.tell_status("waiting for the device-plugin directory %s" % directory)
            return False
        try:
            clear_stale_socket(self.socket_path)
            problem = unbindable(self.socket_path)
        except OSError as e:
            problem = e.strerror or str(e)
        if problem:
            self.conditions.report("serve", "cannot serve %s (%s); retrying" % (self.socket_path, problem))
            self.tell_status("cannot serve %s (%s); retrying" % (self.socket_path, problem))
            return False
        server = self.api.aio.server()
        self.api.pb_grpc.add_DevicePluginServicer_to_server(self.servicer, server)
        try:
            if not server.add_insecure_port("unix:" + self.socket_path):
                raise RuntimeError("bind failed")
            await server.start()
            os.chmod(self.socket_path, 0o600)
        except (RuntimeError, OSError) as e:
            try:
                await server.stop(None)
            except Exception:
                pass
            self.conditions.report("serve", "cannot serve %s (%s); retrying" % (self.socket_path, one_line(e)))
            return False
        self.server, self.served_identity, self.registered_with = server, file_identity(self.socket_path), None
        self.conditions.clear("serve")
        log.info("serving %s", self.socket_path)
        return True

    async def stop_serving(self, grace=None):
        if self.server is None:
            return
        server, self.server = self.server, None
        await server.stop(grace)
        if file_identity(self.socket_path) == self.served_identity:
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
        self.served_identity = None

    async def register_unless_replaced(self, kubelet):
        """register(), given up at once (None) when a new kubelet.sock appears
        meanwhile: a hung kubelet replaced by a good one is not waited out."""
        attempt = self.loop.create_task(self.register())
        while not attempt.done():
            woken = self.loop.create_task(self.session_wakeup.wait())
            await asyncio.wait([attempt, woken], return_when=asyncio.FIRST_COMPLETED)
            woken.cancel()
            if not attempt.done():
                self.session_wakeup.clear()        # every loop pass re-checks all state anyway
                if self.stopping.is_set() or file_identity(self.kubelet_socket) != kubelet:
                    attempt.cancel()
                    await asyncio.gather(attempt, return_exceptions=True)
                    return None
        return attempt.result()

    async def register(self):
        pb, aio = self.api.pb, self.api.aio
        request = pb.RegisterRequest(version=API_VERSION, endpoint=self.config.socket_name,
                                     resource_name=self.config.resource_name,
                                     options=self.servicer.options())
        channel = aio.insecure_channel("unix:" + self.kubelet_socket)
        try:
            await self.api.pb_grpc.RegistrationStub(channel).Register(request, timeout=self.REGISTER_TIMEOUT)
        except self.api.grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            self.conditions.report("kubelet", "registering with the kubelet failed (%s: %s); retrying"
                                   % (getattr(code, "name", code),
                                      quote(e.details() if hasattr(e, "details") else e, 200)))
            return False
        finally:
            await channel.close()
        log.info("registered %s with the kubelet (endpoint %s)", self.config.resource_name, self.config.socket_name)
        return True


class MetricsServer(object):
    """--metrics-address: GET /metrics (Prometheus text) and /healthz, served
    on the event loop, so that a stuck loop answers nothing rather than a
    cheerful 200. At most MAX_CONNECTIONS are open at once, each given
    REQUEST_TIMEOUT for its whole exchange however slowly it trickles in; a
    new connection beyond them closes the oldest, so that a liveness probe
    never waits behind slow clients or scrapes stuck on PodResources, and
    the plugin keeps its file descriptors for its own sockets and sysfs."""

    MAX_CONNECTIONS = 16
    REQUEST_TIMEOUT = 5.0
    BACKLOG = 128
    MAX_REQUEST = 8192

    def __init__(self, address):
        self.sock = open_listener(address, self.BACKLOG)
        self.address = self.sock.getsockname()[:2]
        self.accepting = None
        self.connections = collections.OrderedDict()     # serving tasks, oldest first

    def start(self, answer):
        """Serve, `answer(path)` giving (status, content type, body) when awaited."""
        self.answer = answer
        self.accepting = asyncio.get_event_loop().create_task(self._accept())
        log.info("metrics on http://%s/metrics", format_listen_address(self.address))

    async def close(self):
        tasks = list(self.connections) + ([self.accepting] if self.accepting else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.sock.close()

    async def _accept(self):
        loop = asyncio.get_event_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except OSError as e:                   # EMFILE and the like: the backlog keeps them
                log.debug("metrics: accept failed: %s", one_line(e))
                await asyncio.sleep(0.5)
                continue
            if len(self.connections) >= self.MAX_CONNECTIONS:
                oldest = next(iter(self.connections))
                oldest.cancel()
                await asyncio.wait([oldest])       # its descriptor is closed before the next one is taken
            conn.setblocking(False)
            task = loop.create_task(self._serve(conn))
            self.connections[task] = None
            task.add_done_callback(self._forget)

    def _forget(self, task):
        self.connections.pop(task, None)

    async def _serve(self, conn):
        loop = asyncio.get_event_loop()
        try:
            await asyncio.wait_for(self._exchange(loop, conn), self.REQUEST_TIMEOUT)
        except asyncio.TimeoutError:
            log.debug("metrics: a client took over %.0f s; closed", self.REQUEST_TIMEOUT)
        except (OSError, ValueError) as e:
            log.debug("metrics: %s", one_line(e))
        except asyncio.CancelledError:                # an Exception before Python 3.8
            raise
        except Exception as e:
            log.error("internal error answering a metrics request: %s: %s", type(e).__name__, one_line(e))
        finally:
            loop.remove_reader(conn.fileno())      # a cancelled sock_recv may leave one (Python 3.6)
            loop.remove_writer(conn.fileno())
            conn.close()

    async def _exchange(self, loop, conn):
        request = b""
        while b"\r\n\r\n" not in request and b"\n\n" not in request:
            chunk = await loop.sock_recv(conn, 4096)
            if not chunk:
                return
            request += chunk
            if len(request) > self.MAX_REQUEST:
                raise ValueError("request head over %d bytes" % self.MAX_REQUEST)
        parts = request.split(b"\n", 1)[0].decode("latin-1").split()
        method, target = (parts + ["", ""])[:2]
        if method not in ("GET", "HEAD"):
            status, content_type, body = 405, "text/plain; charset=utf-8", "only GET\n"
        else:
            status, content_type, body = await self.answer(target.split("?", 1)[0])
        data = body.encode("utf-8")
        head = ("HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                % (status, HTTP_REASONS.get(status, "?"), content_type, len(data)))
        await loop.sock_sendall(conn, head.encode("latin-1") + (b"" if method == "HEAD" else data))


HTTP_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def open_listener(address, backlog):
    """A listening TCP socket for (host, port); host None is every
    interface, IPv6 and IPv4 on one socket where the host has IPv6."""
    host, port = address
    if host is None:
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("::", port))
            except OSError:
                sock.close()
                raise
        except OSError:                           # no IPv6 here
            return open_listener(("0.0.0.0", port), backlog)
    else:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def parse_listen_address(text):
    """(host, port) of "HOST:PORT", "[v6]:PORT" or ":PORT" (host None: all interfaces)."""
    match = re.match(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[-A-Za-z0-9.]*)):(?P<port>[0-9]{1,5})\Z", text)
    if not match or int(match.group("port")) > 65535:
        raise InputError("expected HOST:PORT, [IPv6]:PORT or :PORT")
    return (match.group("v6") or match.group("host") or None, int(match.group("port")))


def format_listen_address(address):
    host, port = address[:2]
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def ask_plugin(path):
    """(state, answered, why): the plugin socket's state ('listening',
    'refused', 'missing', or 'error') and whether it answered
    GetDevicePluginOptions within 2 s (None: grpc not there to ask)."""
    try:
        state = unix_socket_state(path)
    except PermissionError:
        return "error", False, ("permission denied connecting to %s: the socket is the plugin's (mode 0600); "
                                "run as the plugin's user (root)" % path)
    except OSError as e:
        return "error", False, "%s: %s" % (path, e.strerror or e)
    if state != "listening":
        return state, False, ""
    try:
        api = load_grpc()
    except InputError as e:
        return state, None, str(e)
    channel = api.grpc.insecure_channel("unix:" + path)
    try:
        api.pb_grpc.DevicePluginStub(channel).GetDevicePluginOptions(api.pb.Empty(), timeout=2)
        return state, True, ""
    except api.grpc.RpcError as e:
        return state, False, "%s did not answer GetDevicePluginOptions within 2 s (%s)" % (
            path, getattr(e.code(), "name", e.code()))
    finally:
        channel.close()


def probe(config):
    """--probe: 0 when the running plugin answers GetDevicePluginOptions on
    its socket within 2 s, else 1 with one line saying why."""
    path = os.path.join(config.device_plugin_path, config.socket_name)
    state, answered, why = ask_plugin(path)
    if answered is None:
        raise InputError(why)                       # grpcio missing: a bad setup, not a dead plugin
    if not answered:
        why = {"missing": "%s does not exist" % path,
               "refused": "nothing serves %s (a stale socket: the plugin is not running)" % path}.get(state, why)
        write_stderr("%s: probe: %s\n" % (PROGRAM, why))
        return 1
    return 0


def serve(config, inventory):
    """Run the plugin until SIGTERM/SIGINT; returns the exit code."""
    # another instance on this node: refuse before doing anything
    lock = InstanceLock(config.device_plugin_path)
    socket_path = os.path.join(config.device_plugin_path, config.socket_name)
    try:
        if lock.hold():
            clear_stale_socket(socket_path)
    except OSError as e:
        raise InputError("%s: %s" % (socket_path, e.strerror or e))
    if config.from_environment:
        log.info("settings from the environment: %s", ", ".join(
            "%s=%s" % (name, quote(value, 100)) for name, value in config.from_environment))
    api = load_grpc()
    os.umask(0o077)                       # the socket is created private
    metrics_server = None
    if config.metrics_address:
        try:
            metrics_server = MetricsServer(config.metrics_address)
        except OSError as e:
            raise InputError("%s %s: cannot listen: %s" % (
                config.origin["metrics_address"],
                format_listen_address((config.metrics_address[0] or "", config.metrics_address[1])),
                e.strerror or e))
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    plugin = Plugin(config, inventory, api, lock, SystemdNotifier(os.environ), metrics_server)
    try:
        return loop.run_until_complete(plugin.run())
    finally:
        finish_pending_tasks(loop)
        loop.close()


def finish_pending_tasks(loop, timeout=0.5):
    """Let the tasks grpc still runs for ended RPCs finish before the loop
    closes (cancelling them makes grpc print tracebacks)."""
    all_tasks = getattr(asyncio, "all_tasks", None) or asyncio.Task.all_tasks
    pending = [task for task in all_tasks(loop) if not task.done()]
    if pending:
        loop.run_until_complete(asyncio.wait(pending, timeout=timeout))


# ---------------------------------------------------------------------------
# The runtime side (NRI): every container's cpuset by one rule
# ---------------------------------------------------------------------------
#
# With --nri auto|on the plugin is also an NRI plugin of the container runtime
# (containerd, CRI-O), in the same process and event loop: it sees every
# container before it is created and every resource update the kubelet
# sends, and sets cpusets by container_cpuset(). The wire (NRI.md): one unix
# socket carrying a multiplex of two ttrpc streams, the runtime calling the
# plugin on conn 1 and the plugin calling the runtime on conn 2. A codec
# (MuxReader, TtrpcReader, mux_frames, ttrpc_message) tested without sockets;
# NriConnection, the thin connection on asyncio streams; NriSession, the
# plugin's side of the conversation.

DEFAULT_NRI_SOCKET = "/var/run/nri/nri.sock"
DEFAULT_NRI_INDEX = "90"         # runtimes call plugins in index order: late, it sees what others changed
NRI_PLUGIN_NAME = PROGRAM
NRI_PLUGIN_SERVICE = "nri.pkg.api.v1alpha1.Plugin"
NRI_RUNTIME_SERVICE = "nri.pkg.api.v1alpha1.Runtime"
# The events subscribed to (nri's enum Event; 12-14 would make containerd <= 2.1 refuse the plugin)
NRI_EVENTS = {"CreateContainer": 4, "UpdateContainer": 8, "StopContainer": 10, "RemoveContainer": 11}
NRI_CONTAINER_STOPPED = 4        # nri's enum ContainerState
MUX_HEADER = struct.Struct(">II")              # conn id, payload length
TTRPC_HEADER = struct.Struct(">IIBB")          # length, stream id, type, flags
MUX_PLUGIN_CONN, MUX_RUNTIME_CONN = 1, 2
MUX_MAX_PAYLOAD = (4 << 20) + 10               # a whole ttrpc message in one frame
TTRPC_MAX_MESSAGE = 4 << 20
MUX_MAX_FRAME_OUT = 4096                       # containerd 1.7 drops a plugin that sends longer frames
TTRPC_REQUEST, TTRPC_RESPONSE = 1, 2
STATUS_INVALID_ARGUMENT, STATUS_UNIMPLEMENTED = 3, 12


class ProtocolError(Exception):
    """The peer broke the wire protocol: the connection is dropped."""


class MuxReader(object):
    """Mux frames (u32 conn id, u32 length, payload; big-endian) from a
    byte stream fed in pieces of any size; the work is linear in the bytes."""

    def __init__(self):
        self.buffer = bytearray()

    def feed(self, data):
        """[(conn id, payload)] of the frames `data` completes."""
        buffer = self.buffer
        buffer += data
        frames, offset = [], 0
        while len(buffer) - offset >= MUX_HEADER.size:
            conn, length = MUX_HEADER.unpack_from(buffer, offset)
            if length > MUX_MAX_PAYLOAD:
                raise ProtocolError("a mux frame of %d bytes (at most %d)" % (length, MUX_MAX_PAYLOAD))
            end = offset + MUX_HEADER.size + length
            if end > len(buffer):
                break
            frames.append((conn, bytes(buffer[offset + MUX_HEADER.size:end])))
            offset = end
        del buffer[:offset]
        return frames


class TtrpcReader(object):
    """ttrpc messages (u32 length, u32 stream id, u8 type, u8 flags,
    payload) from the payloads of one mux conn: a message may span frames,
    a frame may hold several."""

    def __init__(self):
        self.buffer = bytearray()

    def feed(self, data):
        """[(stream id, type, flags, payload)] of the messages `data` completes."""
        buffer = self.buffer
        buffer += data
        messages, offset = [], 0
        while len(buffer) - offset >= TTRPC_HEADER.size:
            length, stream, kind, flags = TTRPC_HEADER.unpack_from(buffer, offset)
            if length > TTRPC_MAX_MESSAGE:
                raise ProtocolError("a ttrpc message of %d bytes (at most %d)" % (length, TTRPC_MAX_MESSAGE))
            end = offset + TTRPC_HEADER.size + length
            if end > len(buffer):
                break
            messages.append((stream, kind, flags, bytes(buffer[offset + TTRPC_HEADER.size:end])))
            offset = end
        del buffer[:offset]
        return messages


def ttrpc_message(stream, kind, payload, flags=0):
    return TTRPC_HEADER.pack(len(payload), stream, kind, flags) + payload


def mux_frames(conn, data, limit=MUX_MAX_FRAME_OUT):
    """`data` as mux frames of at most `limit` bytes each, headers included."""
    step = limit - MUX_HEADER.size
    return b"".join(MUX_HEADER.pack(conn, len(data[i:i + step])) + data[i:i + step]
                    for i in range(0, max(len(data), 1), step))


class NriCallFailed(Exception):
    """A call to the runtime failed or got no answer; str() says how."""


class NriConnection(object):
    """One connection to the runtime's NRI socket: the mux with ttrpc on its
    two conns. The runtime's requests (conn 1) go to `handler(method,
    payload)`, a coroutine giving (status code, message, answer bytes), one
    at a time in their order (the runtime sends one at a time); our calls
    (conn 2) wait for their answers beside them, so that a request is
    answered while a call of ours is out. Thin: what the messages mean is
    the session's. Anything malformed or oversized ends the connection."""

    MAX_WAITING = 64               # requests queued; more is no runtime's doing
    WRITE_TIMEOUT = 5.0            # a runtime that does not read is gone

    def __init__(self, api, reader, writer, handler):
        self.api = api
        self.reader, self.writer = reader, writer
        self.handler = handler
        self.loop = asyncio.get_event_loop()
        self.mux = MuxReader()
        self.conns = {MUX_PLUGIN_CONN: TtrpcReader(), MUX_RUNTIME_CONN: TtrpcReader()}
        self.requests = asyncio.Queue(self.MAX_WAITING)
        self.answers = {}          # stream id of a call of ours -> future of the Response bytes
        self.next_stream = 1       # ours, on conn 2: odd, as every ttrpc client numbers them
        self.why = None            # why it ended, once it has

    def close(self, why):
        if self.why is None:
            self.why = why
            self.writer.close()
            for future in self.answers.values():
                if not future.done():
                    future.set_exception(NriCallFailed(why))
            try:                       # ends _serve_requests: asyncio.wait_for before 3.12 can swallow a cancel
                self.requests.put_nowait(None)
            except asyncio.QueueFull:  # it is busy, and looks at `why` next
                pass

    async def run(self):
        """Read and serve until the connection ends; returns why it did."""
        serving = self.loop.create_task(self._serve_requests())
        try:
            while self.why is None:
                data = await self.reader.read(65536)
                if not data:
                    self.close("the runtime closed the connection")
                    break
                for conn, payload in self.mux.feed(data):
                    stream = self.conns.get(conn)
                    if stream is not None:            # other conns: dropped, as the runtime's mux does
                        for message in stream.feed(payload):
                            self._received(conn, *message)
        except ProtocolError as e:
            self.close("protocol error: %s" % e)
        except OSError as e:
            self.close(one_line(e))
        finally:
            self.close("stopped")
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
        return self.why

    def _received(self, conn, stream, kind, flags, payload):
        if conn == MUX_PLUGIN_CONN:
            if kind != TTRPC_REQUEST:
                raise ProtocolError("ttrpc message type %d where requests come" % kind)
            try:
                self.requests.put_nowait((stream, payload))
            except asyncio.QueueFull:
                raise ProtocolError("over %d requests at once" % self.MAX_WAITING)
        elif kind == TTRPC_RESPONSE:
            future = self.answers.pop(stream, None)
            if future is not None and not future.done():
                future.set_result(payload)
        else:
            raise ProtocolError("ttrpc message type %d where answers come" % kind)

    async def _serve_requests(self):
        pb = self.api.pb
        while self.why is None:
            item = await self.requests.get()
            if item is None:
                break
            stream, data = item
            try:
                request = pb.Request.FromString(data)
            except (self.api.DecodeError, RecursionError) as e:
                return self.close("a request that does not parse (%s)" % quote(one_line(e), 80))
            if stream % 2 != 1:
                code, message, payload = STATUS_INVALID_ARGUMENT, "stream ids of requests are odd", b""
            elif request.service != NRI_PLUGIN_SERVICE:
                code, message, payload = STATUS_UNIMPLEMENTED, "no service %s here" % quote(request.service), b""
            else:
                try:
                    code, message, payload = await self.handler(request.method, request.payload)
                except ProtocolError as e:
                    return self.close("protocol error: %s" % e)
                except asyncio.CancelledError:            # an Exception before Python 3.8
                    raise
                except Exception as e:                    # a bug: the runtime goes on without us, never fails
                    log.error("internal error answering NRI %s: %s: %s", quote(request.method), type(e).__name__,
                              one_line(e))
                    log.debug("details", exc_info=True)
                    return self.close("internal error answering %s" % quote(request.method))
            answer = pb.Response(payload=payload)
            if code:
                answer.status.code, answer.status.message = code, message
            await self.send(MUX_PLUGIN_CONN, ttrpc_message(stream, TTRPC_RESPONSE, answer.SerializeToString()))

    async def send(self, conn, message):
        self.writer.write(mux_frames(conn, message))
        try:
            await asyncio.wait_for(self.writer.drain(), self.WRITE_TIMEOUT)
        except asyncio.TimeoutError:
            self.close("the runtime read nothing for %.0f s" % self.WRITE_TIMEOUT)
        except OSError as e:
            self.close(one_line(e))

    async def call(self, method, request, timeout):
        """The runtime's answer (bytes) to `method` of its Runtime service;
        NriCallFailed when it fails, or does not come within `timeout`."""
        if self.why is not None:
            raise NriCallFailed(self.why)
        pb = self.api.pb
        stream, self.next_stream = self.next_stream, self.next_stream + 2
        future = self.answers[stream] = self.loop.create_future()
        body = pb.Request(service=NRI_RUNTIME_SERVICE, method=method, payload=request.SerializeToString(),
                          timeout_nano=int(timeout * 1e9)).SerializeToString()
        await self.send(MUX_RUNTIME_CONN, ttrpc_message(stream, TTRPC_REQUEST, body))
        try:
            data = await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise NriCallFailed("%s: no answer within %g s" % (method, timeout))
        finally:
            self.answers.pop(stream, None)
        try:
            answer = pb.Response.FromString(data)
        except (self.api.DecodeError, RecursionError) as e:
            self.close("an answer that does not parse (%s)" % quote(one_line(e), 80))
            raise NriCallFailed(self.why)
        if answer.status.code:
            raise NriCallFailed("%s: %s (code %d)" % (method, quote(answer.status.message, 200), answer.status.code))
        return answer.payload


class KubeletFile(object):
    """A file of the kubelet's, read and parsed again only when its
    identity, size or modification time changed: a stat() to consult on a
    runtime request, where the kubelet may just have written it. read() is
    the reading, within read_host_file()'s bounds (regular file,
    non-blocking, `limit` bytes), for the caller to run off the event loop;
    `state` changes in one assignment, so the loop reads a whole one."""

    def __init__(self, path, limit, parse):
        self.path, self.limit, self.parse = path, limit, parse
        self.state = ((), None, "not read yet")    # (the stat it was read at, parsed value, why there is none)

    def stat_key(self):
        try:
            st = os.stat(self.path)
            return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError as e:
            return e.errno

    def stale(self):
        return self.stat_key() != self.state[0]

    @property
    def current(self):
        """(parsed value, None), or (None, why it cannot be had), as last read."""
        return self.state[1:]

    def read(self):
        """Read and parse it again if it changed; `current` after."""
        key = self.stat_key()
        if key == self.state[0]:
            return self.current
        value, why = None, None
        try:
            data = read_host_file(self.path, self.limit)
            if data is None:
                why = "%s is absent" % self.path
            else:
                value = self.parse(data)
        except InputError as e:
            why = str(e)
        except ValueError as e:
            why = "%s: %s" % (self.path, e)
        self.state = (key, value, why)
        return value, why


# The kubelet's CPU manager record, as the rule reads it: its policy, the
# shared pool, and the exclusive grants by (pod UID, container) and, in the
# older format, by container ID.
KubeletCpus = collections.namedtuple("KubeletCpus", "policy shared grants by_id")


def kubelet_cpus(text, last_cpu, max_cpu):
    """KubeletCpus of a cpu_manager_state; ValueError when it is not one."""
    policy, default, grants, _ = cpu_manager_state(text)
    try:
        parsed = {key: parse_cpu_list(str(value), last_cpu, max_cpu) for key, value in grants.items()}
        shared = parse_cpu_list(str(default), last_cpu, max_cpu)
    except InputError as e:
        raise ValueError("a cpu-list that does not parse (%s)" % e)
    return KubeletCpus(str(policy), shared, {k: v for k, v in parsed.items() if k[0] is not None},
                       {k[1]: v for k, v in parsed.items() if k[0] is None})


def kubelet_wants(record, pod_uid, name, container_id):
    """(B, exclusive) from a KubeletCpus: the cpuset the kubelet gives this
    container (None: it sets none, every CPU), and whether it is an
    exclusive grant of the static policy."""
    if record.policy != "static":
        return None, False
    grant = record.grants.get((pod_uid, name), record.by_id.get(container_id))
    if grant is not None:
        return grant, True
    return record.shared, False


class RuntimeContainer(object):
    """A container the runtime has, as the session knows it."""

    __slots__ = ("id", "pod_uid", "name", "label", "claims", "kubelet", "cpuset", "stopped", "unreadable")

    def __init__(self, message, pod, env_prefix, claims=None):
        self.id, self.name = message.id, message.name
        self.pod_uid = pod.uid if pod is not None else ""
        self.label = "%s/%s/%s" % (pod.namespace, pod.name, message.name) if pod is not None else message.name
        # no $ISOLCPUS, nothing held: Allocate always sets it, so the others need no lookup
        self.claims = sets_variable(message, env_prefix) if claims is None else claims
        self.kubelet = None             # B: what the kubelet wants for it (None: every CPU)
        self.cpuset = None              # what it has now (None: unrestricted)
        self.stopped = message.state == NRI_CONTAINER_STOPPED
        self.unreadable = False         # a cpuset of the runtime's did not parse: left alone


def sets_variable(container, prefix):
    """Whether an NRI Container's environment has a "NAME=" `prefix`."""
    return any(variable.startswith(prefix) for variable in container.env)


def environment_claims(containers, prefix):
    """{container id: sets_variable()}: a Python loop, which in the worker
    thread shares the interpreter with the event loop however many
    variables there are (4 MiB of request holds about a million)."""
    return {container.id: sets_variable(container, prefix) for container in containers}


def parse_nri_request(parse, payload, env_prefix):
    """(request, environment_claims() of the containers it carries), for a
    large request in the worker thread. The parse itself is one call that
    holds the interpreter wherever it runs (bench.py stall measures it)."""
    request = parse(payload)
    if hasattr(request, "containers"):
        containers = request.containers
    else:
        containers = [request.container] if hasattr(request, "container") else []
    return request, environment_claims(containers, env_prefix)


def cpuset_text(cpus):
    return "all" if cpus is None else format_cpu_list(cpus) or "none"


class NriSession(object):
    """The runtime side: an NRI plugin of the container runtime that keeps
    every container's cpuset at the rule of container_cpuset(). Connects
    (after the instance lock: two plugins setting cpusets would fail every
    creation), registers, answers Configure and Synchronize, then every
    CreateContainer, UpdateContainer, StopContainer and RemoveContainer;
    reconnects with backoff when the runtime drops it or restarts. Nothing
    on a request's path waits: a request is answered from what is in memory
    and two kubelet files read again only when they changed; containers
    already running are brought back to the rule by UpdateContainers from a
    queue, never from inside a request (the runtime holds one lock across
    its NRI calls). Every error is the connection's end, never an error
    status: that would fail a container's creation."""

    REGISTER_TIMEOUT = 5.0          # the runtime's registration timeout
    UPDATE_TIMEOUT = 5.0
    ABSENT_POLL = 30.0              # no socket directory to watch: NRI is off in the runtime
    YIELD_AFTER = 0.002             # seconds of settling containers between two turns of the loop
    LARGE_REQUEST = 1 << 16         # requests parsed off the event loop from this size
    UPDATE_BATCH = 64
    RETRY_DELAYS = (1.0, 2.0, 4.0)  # an update the runtime did not make: tried again after these
    SYNC_LIMIT = 32 << 20           # bytes of one Synchronize, all its chunks: 8 maximal messages

    def __init__(self, config, api, inventory, lock, conditions, counters, off_loop):
        self.config, self.api, self.inventory = config, api, inventory
        self.lock, self.conditions, self.counters, self.off_loop = lock, conditions, counters, off_loop
        self.socket_path = config.nri_socket
        self.env_prefix = config.env_name + "="
        host = inventory.host
        self.checkpoint = KubeletFile(os.path.join(config.device_plugin_path, CHECKPOINT_NAME), CHECKPOINT_LIMIT,
                                      lambda data: checkpoint_grants(data, config.resource_name))
        self.cpu_record = KubeletFile(os.path.join(config.kubelet_dir, "cpu_manager_state"), HOST_FILE_LIMIT,
                                      lambda data: kubelet_cpus(data, host.last_cpu, host.max_cpu))
        self.containers = collections.OrderedDict()   # id -> RuntimeContainer
        self.connection = None
        self.synchronized = False
        self.synchronizing = asyncio.Event()     # set at the end of Synchronize; anew per connection
        self.sync_chunks = []           # SynchronizeRequests of a split Synchronize so far
        self.sync_bytes = 0             # and their size
        self.env_claims = {}            # container id -> sets_variable(), found beside the loop for a large request
        self.reconsider_missed = None   # a change came while Synchronize settled: "all" or "claimants"
        self.runtime = "the runtime"
        self.warned = {}                # container id -> the kinds of warning it had (each once)
        self.pending = collections.OrderedDict()      # container id -> cpus for UpdateContainers
        self.unconfirmed = {}           # container id -> its cpuset before queued updates the runtime has not made yet
        self.update_tries = {}          # container id -> updates of it the runtime did not make, in a row
        self.updates_wakeup = asyncio.Event()
        self.socket_wakeup = asyncio.Event()
        self.stop_wakeup = asyncio.Event()
        self.watch = None
        self.stopping = False
        self.reconsidering = set()      # spawn_reconsider()'s tasks
        self.retries = []               # try_again()'s timers: (when, handle)

    @property
    def connected(self):
        return self.synchronized and self.connection is not None and self.connection.why is None

    # The connection ------------------------------------------------------------

    async def run(self):
        """Keep connected to the runtime's socket while the plugin runs."""
        backoff = Backoff()
        try:
            while not self.stopping:
                self.socket_wakeup.clear()
                watched = self.watch_socket()
                if not self.lock.hold():               # InputError: another instance; the plugin stops
                    await self._wait(self.socket_wakeup, 1.0)
                    continue
                if not os.path.exists(self.socket_path):
                    self.say_absent()
                    await self._wait(self.socket_wakeup, None if watched else self.ABSENT_POLL)
                    continue
                try:
                    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(self.socket_path), 2.0)
                except (OSError, asyncio.TimeoutError) as e:
                    self.conditions.report("nri", "NRI: cannot connect to %s (%s); retrying" % (
                        self.socket_path, one_line(e) or "timed out"))
                    await self._wait(self.stop_wakeup, backoff.next())
                    continue
                started = time.monotonic()
                why = await self.serve(reader, writer)
                self.conditions.report("nri", "NRI: the connection to %s ended (%s); reconnecting"
                                       % (self.socket_path, why))
                if time.monotonic() - started > 10.0:
                    backoff.reset()
                await self._wait(self.stop_wakeup, backoff.next())
        finally:
            if self.connection is not None:
                self.connection.close("the plugin stopped")
            if self.watch is not None:
                self.watch.close()
                self.watch = None

    def watch_socket(self):
        """Watch the socket's directory (a runtime restarting makes the
        socket anew there), or its parent until the directory exists (a
        runtime starting NRI makes it): True while inotify watches one."""
        directory = os.path.dirname(self.socket_path)
        if not os.path.isdir(directory):
            directory = os.path.dirname(directory)
        if self.watch is not None and self.watch.path != directory:
            self.watch.close()
            self.watch = None
        if self.watch is None:
            self.watch = DirectoryWatch(directory, self.socket_wakeup.set)
        return self.watch.arm()

    @staticmethod
    async def _wait(event, seconds):
        """Up to `seconds` (None: no limit) unless `event` is set: the socket's
        directory changed (socket_wakeup: the socket may be there now), or
        the plugin stops (stop_wakeup: a backoff runs its course whatever the
        directory does, where a runtime in a crash loop makes its socket anew)."""
        try:
            await asyncio.wait_for(event.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    def stop(self):
        """The plugin stops: end the connection and the loop (not only by
        cancelling: asyncio.wait_for before Python 3.12 may swallow that)."""
        self.stopping = True
        self.socket_wakeup.set()
        self.stop_wakeup.set()
        if self.connection is not None:
            self.connection.close("the plugin stopped")
        for task in list(self.reconsidering):
            task.cancel()
        for _, timer in self.retries:
            timer.cancel()

    def say_absent(self):
        """No socket: said once at info under --nri auto (the runtime may
        have NRI off), a warning under --nri on."""
        text = "NRI: no runtime socket at %s; cpusets are the kubelet's until one appears" % self.socket_path
        if self.config.nri == "on":
            self.conditions.report("nri", text + " (--nri on)")
        else:
            self.conditions.report("nri", text + " (--nri auto)", logging.INFO)

    async def serve(self, reader, writer):
        """One connection: register, synchronize, serve; returns why it ended."""
        connection = self.connection = NriConnection(self.api, reader, writer, self.handle)
        self.synchronized, self.sync_chunks, self.sync_bytes, self.reconsider_missed = False, [], 0, None
        self.env_claims = {}
        self.synchronizing = asyncio.Event()
        for known in (self.containers, self.pending, self.unconfirmed, self.update_tries):
            known.clear()
        running = asyncio.get_event_loop().create_task(connection.run())
        updating = None
        try:
            try:
                pb = self.api.pb
                await connection.call("RegisterPlugin", pb.RegisterPluginRequest(
                    plugin_name=NRI_PLUGIN_NAME, plugin_idx=self.config.nri_index), self.REGISTER_TIMEOUT)
                synchronized = asyncio.get_event_loop().create_task(self.synchronizing.wait())
                await asyncio.wait([running, synchronized], timeout=2 * self.REGISTER_TIMEOUT,   # Configure, Synchronize
                                   return_when=asyncio.FIRST_COMPLETED)
                synchronized.cancel()
                if not self.synchronized and connection.why is None:
                    connection.close("registered, but no Synchronize came")
                if connection.why is None:
                    self.conditions.clear("nri")
                    updating = asyncio.get_event_loop().create_task(self.send_updates(connection))
            except NriCallFailed as e:
                connection.close("RegisterPlugin failed: %s" % e)
            return await running
        finally:                               # also when the plugin stops: no task left pending
            self.synchronized, self.sync_chunks, self.env_claims = False, [], {}
            connection.close("the plugin stopped")
            self.updates_wakeup.set()          # send_updates sees the connection ended
            tasks = [task for task in (updating, running) if task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def handle(self, method, payload):
        """(status code, message, answer bytes) for the runtime's `method`."""
        handler = self.HANDLERS.get(method)
        if handler is None:               # newer runtimes fall back to StateChange on code 12
            return STATUS_UNIMPLEMENTED, "%s: %s is not implemented" % (NRI_PLUGIN_NAME, method), b""
        request_type, answer = handler
        parse = getattr(self.api.pb, request_type).FromString
        try:
            if len(payload) >= self.LARGE_REQUEST:
                request, claims = await self.off_loop(parse_nri_request, parse, payload, self.env_prefix)
                self.env_claims.update(claims)
            else:
                request = parse(payload)
        except (self.api.DecodeError, RecursionError) as e:
            raise ProtocolError("%s that does not parse (%s)" % (request_type, quote(one_line(e), 80)))
        await self.read_kubelet_files()
        response = answer(self, request)
        if asyncio.iscoroutine(response):
            response = await response
        if method != "Synchronize":     # a split one keeps its chunks' until the last
            self.env_claims.clear()
        return 0, "", response.SerializeToString()

    # The runtime's requests --------------------------------------------------------

    def configure(self, request):
        self.runtime = ("%s %s" % (request.runtime_name, request.runtime_version)).strip() or "the runtime"
        return self.api.pb.ConfigureResponse(events=sum(1 << (event - 1) for event in NRI_EVENTS.values()))

    async def synchronize(self, request):
        """Every container the runtime has; split ones (`more`) are answered
        with `more` and no updates until the last chunk (NRI v0.7+)."""
        pb = self.api.pb
        self.sync_chunks.append(request)
        self.sync_bytes += request.ByteSize()
        if self.sync_bytes > self.SYNC_LIMIT:
            raise ProtocolError("a Synchronize of more than %d MiB: the plugin keeps out of this runtime"
                                % (self.SYNC_LIMIT >> 20))
        if request.more:
            return pb.SynchronizeResponse(more=True)
        chunks, self.sync_chunks, self.sync_bytes = self.sync_chunks, [], 0
        claims, self.env_claims = self.env_claims, {}
        pods = {pod.id: pod for chunk in chunks for pod in chunk.pods}
        record, _ = self.cpu_record_now()
        updates, holders, seen = [], 0, 0
        turn = time.monotonic()
        for chunk in chunks:
            for message in chunk.containers:
                container = RuntimeContainer(message, pods.get(message.pod_sandbox_id), self.env_prefix,
                                             claims.get(message.id))
                container.cpuset = self.request_cpus(container, message.linux.resources.cpu.cpus)
                container.kubelet = self.kubelet_record_for(container, record)
                self.containers[container.id] = container
                seen += 1
                if not (container.stopped or container.unreadable):
                    cpus = self.settle(container, container.kubelet, container.cpuset, record)
                    holders += bool(container.claims)
                    if cpus is not None:
                        updates.append(self.update_of(container.id, cpus))
                turn = await self.next_turn(turn)
        self.synchronized = True
        self.synchronizing.set()
        self.counters.nri_adjustments += len(updates)
        self.warned = {known: kinds for known, kinds in self.warned.items() if known in self.containers}
        log.info("NRI: registered as %s-%s with %s on %s; synchronized %d containers: %d adjusted, %d claim "
                 "isolated CPUs", self.config.nri_index, NRI_PLUGIN_NAME, self.runtime, self.socket_path, seen,
                 len(updates), holders)
        if self.reconsider_missed is not None:      # what changed while settling reaches those settled before
            self.spawn_reconsider(claimants_only=self.reconsider_missed == "claimants")
            self.reconsider_missed = None
        return pb.SynchronizeResponse(update=updates)

    def create_container(self, request):
        pb = self.api.pb
        container = self.containers[request.container.id] = RuntimeContainer(
            request.container, request.pod, self.env_prefix, self.env_claims.get(request.container.id))
        cpus = self.settle_request(container, self.request_cpus(container, request.container.linux.resources.cpu.cpus))
        response = pb.CreateContainerResponse()
        if cpus is not None:
            self.counters.nri_adjustments += 1
            response.adjust.linux.resources.cpu.cpus = format_cpu_list(cpus)
        return response

    def update_container(self, request):
        """A resource update the kubelet sends: rewritten where its cpuset
        breaks the rule; one without cpus (an in-place resize sends shares
        and quota) changes no cpuset and is left alone."""
        pb = self.api.pb
        response = pb.UpdateContainerResponse()
        text = request.linux_resources.cpu.cpus
        container = self.containers.get(request.container.id)
        if container is None:
            container = self.containers[request.container.id] = RuntimeContainer(
                request.container, request.pod, self.env_prefix, self.env_claims.get(request.container.id))
        container.unreadable = False
        if not text:
            container.cpuset = self.request_cpus(container, request.container.linux.resources.cpu.cpus)
            return response
        cpus = self.settle_request(container, self.request_cpus(container, text))   # what it had matters no more
        if cpus is not None:
            self.counters.nri_adjustments += 1
            response.update.extend([self.update_of(container.id, cpus, ignore_failure=False)])
        return response

    def stop_container(self, request):
        container = self.containers.get(request.container.id)
        if container is not None:
            container.stopped = True
        return self.api.pb.StopContainerResponse()

    def remove_container(self, request):
        self.containers.pop(request.container.id, None)
        self.warned.pop(request.container.id, None)
        self.forget_updates(request.container.id)
        return self.api.pb.RemoveContainerResponse()

    def state_change(self, request):
        """Events as runtimes before NRI v0.12 send them (v0.12+ fall back
        to it for a method answered with code 12)."""
        if request.event == NRI_EVENTS["RemoveContainer"]:
            self.remove_container(request)
        elif request.event == NRI_EVENTS["StopContainer"]:
            self.stop_container(request)
        return self.api.pb.Empty()

    def shutdown(self, request):
        log.info("NRI: %s asked the plugin to shut down its connection", self.runtime)
        return self.api.pb.Empty()

    HANDLERS = {"Configure": ("ConfigureRequest", configure),
                "Synchronize": ("SynchronizeRequest", synchronize),
                "CreateContainer": ("CreateContainerRequest", create_container),
                "UpdateContainer": ("UpdateContainerRequest", update_container),
                "StopContainer": ("StopContainerRequest", stop_container),
                "RemoveContainer": ("RemoveContainerRequest", remove_container),   # v0.12+
                "StateChange": ("StateChangeEvent", state_change),
                "Shutdown": ("Empty", shutdown)}

    # The rule ------------------------------------------------------------------

    def request_cpus(self, container, text):
        """A cpuset of the runtime's for `container`: None for ""
        (unrestricted), else its CPUs; one that does not parse marks the
        container as one to leave alone (said once) and is None."""
        if not text:
            return None
        try:
            return parse_cpu_list(text, self.inventory.host.last_cpu, self.inventory.host.max_cpu)
        except InputError as e:
            container.unreadable = True
            self.warn_once(container, "unreadable", "NRI: %s has a cpuset that does not parse (%s); left as it is"
                           % (quote(container.label, 300), e))
            return None

    async def read_kubelet_files(self):
        """The checkpoint and the CPU manager record as they are now: read
        again, off the event loop (each may be megabytes), where they changed."""
        for record in (self.checkpoint, self.cpu_record):
            if record.stale():
                await self.off_loop(record.read)

    def cpu_record_now(self):
        record, why = self.cpu_record.current
        if record is None:
            self.conditions.report("nri-cpu-record", "NRI: the kubelet's CPU manager record cannot be read (%s): "
                                   "cpusets are judged by what containers have, and CPUs that leave the isolated "
                                   "set return to them only with the kubelet's next update" % why, logging.INFO)
        else:
            self.conditions.clear("nri-cpu-record")
        return record, why

    def kubelet_record_for(self, container, record):
        """B for a container whose cpuset may be one the plugin set itself:
        the kubelet's record when it can be read, else what the kubelet last
        asked for it, else what it has."""
        if record is not None:
            return kubelet_wants(record, container.pod_uid, container.name, container.id)[0]
        return container.kubelet if container.kubelet is not None else container.cpuset

    def settle_request(self, container, kubelet):
        """settle() for a cpuset the kubelet sends now (`kubelet`: what the
        container gets unless the plugin changes it), unless that is not
        what the kubelet's record says it wants: another NRI plugin changed
        it before us, and only one may set a container's CPUs."""
        container.kubelet = container.cpuset = kubelet
        self.forget_updates(container.id)          # what the kubelet sends now supersedes them
        if container.unreadable:
            return None
        record, _ = self.cpu_record_now()
        if record is not None:
            wanted, _ = kubelet_wants(record, container.pod_uid, container.name, container.id)
            if wanted != kubelet:
                self.warn_once(container, "foreign", "NRI: %s gets cpuset %s where the kubelet wants %s: another NRI "
                               "plugin changed it; left as it is (only one may set a container's CPUs)"
                               % (quote(container.label, 300), cpuset_text(kubelet), cpuset_text(wanted)))
                return None
        return self.settle(container, kubelet, kubelet, record)

    def settle(self, container, kubelet, current, record=None):
        """The cpuset to give `container` now (None: leave it), by the rule,
        H from the kubelet's checkpoint; logged. `current` is what it has."""
        advertised = frozenset(d.cpu for d in self.inventory.devices)
        online = self.inventory.online
        held = frozenset()
        if container.claims:
            grants, why = self.checkpoint.current
            if grants is None:
                self.conditions.report("nri-checkpoint", "NRI: containers that claim isolated CPUs are left as the "
                                       "kubelet set them: the kubelet's checkpoint cannot be read (%s)" % why)
                return None
            self.conditions.clear("nri-checkpoint")
            held = grants.get((container.pod_uid, container.name))
            if held is None:
                if "claim" not in self.warned.get(container.id, ()):
                    self.counters.nri_refused_claims += 1
                self.warn_once(container, "claim", "NRI: %s sets $%s but holds no %s in the kubelet's checkpoint: "
                               "it gets none of them" % (quote(container.label, 300), self.config.env_name,
                                                         self.config.resource_name))
                held = frozenset()
        cpus = container_cpuset(kubelet, advertised, held, online)
        taken = granted_unheld(kubelet, advertised, held, online)
        exclusive = record is not None and kubelet_wants(record, container.pod_uid, container.name,
                                                         container.id)[1]
        if taken and (exclusive or not cpus):
            self.warn_once(container, "taken", "NRI: the kubelet gave %s isolated CPUs %s, which it does not hold, "
                           "%s; keep the isolated CPUs in reservedSystemCPUs" % (
                               quote(container.label, 300), format_cpu_list(taken),
                               "as an exclusive grant" if exclusive else "and nothing else: they are left to it"))
        if not cpus or cpus == (online if current is None else current):
            return None                 # nothing to run on: B stays; or it has it already
        container.cpuset = cpus
        log.info("NRI: %s cpuset %s -> %s%s", quote(container.label, 300), cpuset_text(current),
                 format_cpu_list(cpus), "; holds %s" % format_cpu_list(held) if held else "")
        return cpus

    def warn_once(self, container, kind, text):
        kinds = self.warned.setdefault(container.id, set())
        if kind not in kinds:
            kinds.add(kind)
            log.warning("%s", text)

    def forget_updates(self, container_id):
        """The plugin's updates of a container, queued or not yet made, and
        their failures: none any more."""
        for updates in (self.pending, self.unconfirmed, self.update_tries):
            updates.pop(container_id, None)

    def update_of(self, container_id, cpus, ignore_failure=True):
        update = self.api.pb.ContainerUpdate(container_id=container_id, ignore_failure=ignore_failure)
        update.linux.resources.cpu.cpus = format_cpu_list(cpus)
        return update

    # Running containers ---------------------------------------------------------

    async def next_turn(self, turn):
        """Let the loop's other work run when this work has held it
        YIELD_AFTER since `turn` (monotonic): an RPC takes several turns of
        the loop, and a node's worth of containers must not make each one
        wait long. Returns when this turn began."""
        if time.monotonic() - turn < self.YIELD_AFTER:
            return turn
        await asyncio.sleep(0)
        return time.monotonic()

    async def reconsider(self, claimants_only=False, only=None):
        """Bring running containers (those of `only`, else all) back to the
        rule (the isolated or online CPUs changed, or the kubelet's
        checkpoint did, or an update failed): queued for UpdateContainers,
        which runs beside the runtime's requests. While Synchronize settles
        what the runtime has, once more when it is done."""
        if self.connection is None or self.connection.why is not None:
            return                          # a new connection synchronizes afresh
        if not self.synchronized:
            if self.reconsider_missed != "all":
                self.reconsider_missed = "claimants" if claimants_only and only is None else "all"
            return
        record, _ = self.cpu_record_now()
        turn = time.monotonic()
        containers = self.containers.values() if only is None else [
            self.containers[known] for known in only if known in self.containers]
        for container in list(containers):
            turn = await self.next_turn(turn)
            if self.containers.get(container.id) is not container:
                continue                    # removed (or made anew) meanwhile
            if container.stopped or container.unreadable or (claimants_only and not container.claims):
                continue
            kubelet = self.kubelet_record_for(container, record)
            before = container.cpuset
            current = self.pending.get(container.id, before)
            cpus = self.settle(container, kubelet, current, record)
            if cpus is not None:
                self.pending[container.id] = cpus
                self.unconfirmed.setdefault(container.id, before)
        if self.pending:
            self.updates_wakeup.set()

    def kubelet_files_changed(self):
        """The device-plugin directory changed: a holder's checkpoint entry
        may have come after its container."""
        if self.connection is not None and self.checkpoint.stale():
            self.spawn_reconsider(claimants_only=True)

    def host_changed(self):
        self.spawn_reconsider()

    def spawn_reconsider(self, claimants_only=False, only=None):
        """reconsider() once the kubelet's files are read, beside the loop's other work."""
        async def reconsidering():
            await self.read_kubelet_files()
            await self.reconsider(claimants_only, only)
        task = asyncio.get_event_loop().create_task(reconsidering())
        self.reconsidering.add(task)
        task.add_done_callback(self.reconsidering.discard)

    async def send_updates(self, connection):
        pb = self.api.pb
        while connection.why is None:
            await self.updates_wakeup.wait()
            self.updates_wakeup.clear()
            while self.pending and connection.why is None:
                batch = []
                while self.pending and len(batch) < self.UPDATE_BATCH:
                    container_id, cpus = self.pending.popitem(last=False)
                    batch.append(self.update_of(container_id, cpus))
                try:
                    answer = await connection.call("UpdateContainers", pb.UpdateContainersRequest(update=batch),
                                                   self.UPDATE_TIMEOUT)
                    failed = {update.container_id for update in pb.UpdateContainersResponse.FromString(answer).failed}
                except (NriCallFailed, self.api.DecodeError) as e:
                    log.warning("NRI: updating the cpusets of %d containers failed: %s", len(batch), one_line(e))
                    failed = {update.container_id for update in batch}
                else:
                    if failed:
                        log.info("NRI: %s did not update %d containers (gone meanwhile?): %s", self.runtime,
                                 len(failed), quote_list(sorted(failed)))
                made = [update.container_id for update in batch if update.container_id not in failed]
                self.counters.nri_adjustments += len(made)
                for container_id in made:
                    self.unconfirmed.pop(container_id, None)
                    self.update_tries.pop(container_id, None)
                self.try_again(failed)

    def try_again(self, failed):
        """Updates the runtime did not make (it failed them, or the call):
        the containers have what they had, and are brought to the rule again
        after a pause, RETRY_DELAYS times; then left until the next change."""
        again = collections.defaultdict(list)
        for container_id in failed:
            before = self.unconfirmed.pop(container_id, self)      # self: nothing unconfirmed
            container = self.containers.get(container_id)
            if before is self or container is None or container_id in self.pending:
                continue                    # gone, or a newer update is queued
            container.cpuset = before
            tries = self.update_tries[container_id] = self.update_tries.get(container_id, 0) + 1
            if tries > len(self.RETRY_DELAYS):
                del self.update_tries[container_id]
                log.warning("NRI: %s did not update the cpuset of %s %d times; left as it is (%s) until the next "
                            "change", self.runtime, quote(container.label, 300), tries, cpuset_text(before))
                continue
            again[self.RETRY_DELAYS[tries - 1]].append(container_id)
        loop = asyncio.get_event_loop()
        now = loop.time()
        self.retries = [(when, timer) for when, timer in self.retries if when > now]
        for delay, container_ids in again.items():
            self.retries.append((now + delay, loop.call_later(delay, functools.partial(
                self.spawn_reconsider, only=frozenset(container_ids)))))

    def running_names(self):
        """{(pod UID, container name)} of the containers the runtime runs."""
        return {(c.pod_uid, c.name) for c in self.containers.values() if not c.stopped}

    def running_keys(self):
        """The containers the runtime runs, each as running_key() names a
        holder: namespace/pod/container and pod-uid/container."""
        return frozenset(key for c in self.containers.values() if not c.stopped
                         for key in (c.label, "%s/%s" % (c.pod_uid, c.name)))


# ---------------------------------------------------------------------------
# The node audit (--doctor): can a pod really run on the CPUs it gets?
# ---------------------------------------------------------------------------
#
# read_node() reads what the audit needs of the node, once, at this edge:
# every file's text or why it could not be read, and what the kubelet and
# the plugin answer. The checks are pure functions of those facts, one
# Finding each, naming the files they read; a check whose files are absent
# or unreadable says SKIP and why. Nothing here writes to the host.

DEFAULT_KUBELET_DIR = "/var/lib/kubelet"
PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"
# One row of the report. cpus: the CPUs the finding is about, in full (the
# found text is bounded), for tooling; "" when none.
Finding = collections.namedtuple("Finding", "id status found advice files cpus")
# A file as read: text, or None with error None (absent) or the reason.
FileRead = collections.namedtuple("FileRead", "path text error")
AUDIT_FILE_LIMIT = 16 << 20          # /proc/interrupts: a line per IRQ, a column per CPU
MAX_IRQS = 16384
MAX_CGROUP_DIRS = 20000              # a walk of the cgroup tree stops there
# ... and goes no deeper: a container is 4 levels below kubepods
# (kubepods/<qos>/<pod>/<container>), nested runtimes add a few
MAX_CGROUP_DEPTH = 32
MAX_SYMLINKS = 40                    # the kernel's most in one path lookup
PATH_MAX = 4096
KUBELET_FLAGS = {"--cpu-manager-policy": "cpuManagerPolicy", "--reserved-cpus": "reservedSystemCPUs",
                 "--topology-manager-policy": "topologyManagerPolicy",
                 "--cpu-manager-policy-options": "cpuManagerPolicyOptions"}


def read_file(path, limit=HOST_FILE_LIMIT, follow_symlinks=True):
    """A host file as a FileRead (see read_host_file for what cannot block)."""
    try:
        data = read_host_file(path, limit, follow_symlinks)
    except InputError as e:
        return FileRead(path, None, str(e))
    if data is None:
        return FileRead(path, None, None)
    text = host_text(data, "utf-8")
    if text is None:
        return FileRead(path, None, "%s: %s is not text" % (path, quote(data.decode("utf-8", "replace"))))
    return FileRead(path, text, None)


def why_unread(read):
    return read.error or "%s is absent" % read.path


def list_dir(path):
    try:
        return os.listdir(path)
    except OSError:
        return []


class NodeFacts(object):
    """What the audit read of a node: plain data (the checks are pure
    functions of it). Built by read_node(); every attribute is set there."""


def read_node(config):
    """Read, once, everything the checks look at."""
    facts = NodeFacts()
    facts.resource_name = config.resource_name
    sysfs, procfs = config.sysfs, config.procfs
    cpu_dir = os.path.join(sysfs, "devices", "system", "cpu")
    facts.cmdline = read_file(os.path.join(procfs, "cmdline"), CMDLINE_LIMIT)
    facts.isolated, facts.origin, facts.isolated_error = frozenset(), "", None
    facts.devices, facts.topology, facts.online, facts.missing = (), {}, frozenset(), frozenset()
    host = Host(sysfs, procfs)                     # InputError: a bad --sysfs is a bad flag (exit 2)
    facts.last_cpu, facts.max_cpu = host.last_cpu, host.max_cpu
    if config.cpus is not None:                    # ... and so is a bad --cpus; bad host files are findings
        try:
            parse_cpu_list(config.cpus, host.last_cpu, host.max_cpu)
        except InputError as e:
            raise InputError("%s %s: %s" % (config.origin["cpus"], quote(config.cpus), e))
    try:
        inventory = CpuInventory(host, config.source, config.cpus, config.origin["cpus"])
        facts.devices, facts.online, facts.origin = inventory.devices, inventory.online, inventory.origin
        facts.isolated = frozenset(d.cpu for d in inventory.devices)
        facts.missing = inventory.served - inventory.present
        facts.topology = {d.cpu: d.info for d in inventory.devices}
    except InputError as e:
        facts.isolated_error = str(e)
    facts.core_kinds = host.core_kinds()
    facts.nohz_full = read_file(os.path.join(cpu_dir, "nohz_full"))
    facts.workqueue = read_file(os.path.join(sysfs, "devices", "virtual", "workqueue", "cpumask"))
    irq_dir = os.path.join(procfs, "irq")
    facts.irq_dir = irq_dir
    facts.irq_default = read_file(os.path.join(irq_dir, "default_smp_affinity"))
    facts.irq_affinity = collections.OrderedDict()
    for name in sorted((n for n in list_dir(irq_dir) if n.isdigit()), key=int)[:MAX_IRQS]:
        read = read_file(os.path.join(irq_dir, name, "effective_affinity_list"))
        if read.text is None:
            read = read_file(os.path.join(irq_dir, name, "smp_affinity_list"))
        facts.irq_affinity[int(name)] = read
    facts.interrupts = read_file(os.path.join(procfs, "interrupts"), AUDIT_FILE_LIMIT)
    facts.cgroup_root = os.path.join(sysfs, "fs", "cgroup")
    facts.cgroup_v2 = os.path.exists(os.path.join(facts.cgroup_root, "cgroup.controllers"))
    facts.cgroup_isolated = read_file(os.path.join(facts.cgroup_root, "cpuset.cpus.isolated"))
    facts.partitions, facts.partitions_skipped = (find_isolated_partitions(facts.cgroup_root) if facts.cgroup_v2
                                                  else ([], ""))
    facts.procfs = procfs
    facts.processes = find_processes(procfs)
    facts.kubelet_dir = config.kubelet_dir
    facts.cpu_manager_state = read_file(os.path.join(config.kubelet_dir, "cpu_manager_state"))
    facts.kubelet_flags, facts.kubelet_config, facts.kubelet_config_from = find_kubelet_config(
        config, procfs, [p for p in facts.processes if p.role == "kubelet"])
    facts.device_plugin_dir = config.device_plugin_path
    facts.device_plugin_dir_exists = os.path.isdir(config.device_plugin_path)
    facts.kubelet_socket = os.path.exists(os.path.join(config.device_plugin_path, KUBELET_SOCKET_NAME))
    facts.plugin_socket = os.path.join(config.device_plugin_path, config.socket_name)
    facts.plugin_answer = ask_plugin(facts.plugin_socket)
    facts.pod_resources_socket = config.pod_resources_socket
    facts.pod_resources = ask_pod_resources(config.pod_resources_socket, POD_RESOURCES_LIST)
    facts.allocatable = ask_pod_resources(config.pod_resources_socket,
                                          "/v1.PodResourcesLister/GetAllocatableResources")
    facts.checkpoint_path = os.path.join(config.device_plugin_path, CHECKPOINT_NAME)
    facts.holders = find_holders(facts.pod_resources[0], facts.pod_resources[1], config.device_plugin_path,
                                 config.resource_name)
    # pod UIDs (cgroup names, cpu_manager_state keys) only the checkpoint gives
    facts.checkpoint = find_holders(None, ("PodResources gives no pod UIDs", True), config.device_plugin_path,
                                    config.resource_name)
    uids = {h.pod_uid for holders in (facts.checkpoint.by_cpu or {}).values() for h in holders}
    facts.pod_cgroups, facts.pod_cgroups_skipped = find_pod_cgroups(facts.cgroup_root, facts.cgroup_v2, uids,
                                                                     procfs)
    facts.nri_mode, facts.nri_socket = config.nri, config.nri_socket
    try:                                           # not connected to: a runtime waits for a plugin that does
        facts.nri_socket_present = stat.S_ISSOCK(os.stat(config.nri_socket).st_mode)
    except OSError:
        facts.nri_socket_present = False
    return facts


# A process the audit looks at: role "kubelet" or "plugin"; threads: {tid: allowed cpu-list text}.
Process = collections.namedtuple("Process", "pid role name args threads")


def find_processes(procfs):
    """The kubelet's and running plugins' processes, with each thread's
    allowed CPUs (the audit itself and other CLI runs left out)."""
    found = []
    own = os.getpid() if os.path.realpath(procfs) == "/proc" else None
    for name in list_dir(procfs):
        if not name.isdigit() or int(name) == own:
            continue
        base = os.path.join(procfs, name)
        comm = read_file(os.path.join(base, "comm")).text
        try:                                         # NUL-separated, so not read_file()
            args = [a.decode("utf-8", "replace")
                    for a in (read_host_file(os.path.join(base, "cmdline")) or b"").split(b"\0") if a]
        except InputError:
            args = []
        if comm == "kubelet":
            role = "kubelet"
        elif (any("isolcpu_plugin" in a or "isolcpu-plugin" in a for a in args[:3])
              and not set(args) & {"--doctor", "--list", "--probe", "--version"}):
            role = "plugin"
        else:
            continue
        threads = {}
        for tid in list_dir(os.path.join(base, "task")):
            status = read_file(os.path.join(base, "task", tid, "status")).text or ""
            allowed = [line.split(":", 1)[1].strip() for line in status.splitlines()
                       if line.startswith("Cpus_allowed_list:")]
            if allowed:
                threads[tid] = allowed[0]
        found.append(Process(int(name), role, comm or "?", args, threads))
    return sorted(found)


def find_kubelet_config(config, procfs, kubelets):
    """({config key: value} from the running kubelet's flags, the config file
    as a FileRead, how its path was found). The path: --kubelet-config, else
    the running kubelet's --config read through its own root
    (/proc/PID/root), else <kubelet-dir>/config.yaml."""
    flags = {}
    path, found_by = None, None
    for kubelet in kubelets[:1]:
        args = kubelet.args
        for i, arg in enumerate(args):
            name, eq, value = arg.partition("=")
            if not eq and i + 1 < len(args) and not args[i + 1].startswith("--"):
                value = args[i + 1]
            if name == "--config" and value:
                path = kubelet_file(procfs, kubelet.pid, value)
                found_by = "--config of the running kubelet (pid %d)" % kubelet.pid
            elif name in KUBELET_FLAGS and value:
                flags[KUBELET_FLAGS[name]] = value
    if config.kubelet_config:
        path, found_by = config.kubelet_config, config.origin["kubelet_config"]
    if path is None:
        path, found_by = os.path.join(config.kubelet_dir, "config.yaml"), "the kubelet dir"
    return flags, path if isinstance(path, FileRead) else read_file(path), found_by


def kubelet_file(procfs, pid, name):
    """Where to read the file a process names `name` (its --config): inside
    its root (/proc/PID/root), as it would resolve it; a FileRead saying why
    not when it cannot be resolved there (too long, too many symlinks)."""
    root = os.path.join(procfs, str(pid), "root")
    where = "--config %s of the running kubelet (pid %d)" % (quote(name, 200), pid)
    if not name.startswith("/"):                 # relative to its working directory, inside its root
        try:
            top, cwd = os.readlink(root), os.readlink(os.path.join(procfs, str(pid), "cwd"))
        except OSError as e:
            return FileRead(root, None, "%s: its working directory is unknown (%s)" % (where, e.strerror or e))
        if top != "/" and not cwd.startswith(top.rstrip("/") + "/"):
            return FileRead(root, None, "%s: its working directory %s is outside its root" % (where, quote(cwd, 200)))
        name = cwd[len(top.rstrip("/")):] + "/" + name
    try:
        return path_in_root(root, name)
    except InputError as e:
        return FileRead(root + "/" + name.lstrip("/"), None, "%s %s: not read" % (where, e))


def path_in_root(root, path):
    """`path` as a process whose root directory is `root` names it, resolved
    inside root the way that process would: symlinks followed (an absolute
    target starts again at root, not at ours, as /proc/PID/root would have
    it), `..` taken on what is resolved so far, and at root it stays at
    root, as the kernel has it for a process's root directory (so nothing
    leaves root). InputError for a path too long or too many symlinks."""
    if len(path) > PATH_MAX:
        raise InputError("is longer than PATH_MAX (%d)" % PATH_MAX)
    pending = [part for part in path.split("/") if part not in ("", ".")]
    resolved, links = [], 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        here = os.path.join(root, *(resolved + [part]))
        try:
            target = os.readlink(here)
        except OSError:                          # not a symlink (or absent: reading says so)
            resolved.append(part)
            continue
        links += 1
        if links > MAX_SYMLINKS:
            raise InputError("takes more than %d symlinks" % MAX_SYMLINKS)
        if target.startswith("/"):
            resolved = []
        pending[:0] = [p for p in target.split("/") if p not in ("", ".")]
    return os.path.join(root, *resolved)


class CgroupWalk(object):
    """Walks of a cgroup tree top-down, like os.walk, but without recursion
    (os.walk recurses on Pythons before 3.12, and a tenant with a delegated
    subtree can nest it 1,200 deep) and without following a symlink (every
    directory of a cgroup tree is the kernel's; a link is someone's): at most
    MAX_CGROUP_DEPTH levels below `root` and MAX_CGROUP_DIRS directories in
    all. What they did not look at is counted, for the finding to say."""

    def __init__(self, root):
        self.root = root
        self.seen = 0
        self.stopped = False
        self.skips = collections.OrderedDict()   # kind: [count, first path]

    def _skip(self, kind, path):
        self.skips.setdefault(kind, [0, path])[0] += 1

    def entries(self, directory):
        """(subdirectory names, file names) of a directory, sorted; symlinks
        counted, not listed; None when it cannot be read."""
        subdirs, files = [], []
        try:
            with os.scandir(directory) as found:
                for entry in found:
                    if entry.is_symlink():
                        self._skip("links", entry.path)
                    elif entry.is_dir(follow_symlinks=False):
                        subdirs.append(entry.name)
                    else:
                        files.append(entry.name)
        except OSError:
            self._skip("unreadable", directory)
            return None
        return sorted(subdirs), sorted(files)

    def walk(self, name=None):
        """(directory, subdirectory names, file names) from root, or from the
        directory `name` under it (not followed if a link); remove names from
        the list to prune, as with os.walk."""
        if name is not None and os.path.islink(os.path.join(self.root, name)):
            self._skip("links", os.path.join(self.root, name))
            return
        pending = [(self.root, 0) if name is None else (os.path.join(self.root, name), 1)]
        while pending:
            directory, depth = pending.pop()
            if self.seen >= MAX_CGROUP_DIRS:
                self.stopped = True
                return
            self.seen += 1
            listed = self.entries(directory)
            if listed is None:
                continue
            subdirs, files = listed
            yield directory, subdirs, files
            for sub in reversed(subdirs):
                if depth >= MAX_CGROUP_DEPTH:
                    self._skip("too_deep", os.path.join(directory, sub))
                else:
                    pending.append((os.path.join(directory, sub), depth + 1))

    def skipped(self):
        """What the walk did not look at, as a clause; "" when nothing."""
        kinds = {"too_deep": ("director%s deeper than %d levels" % ("%s", MAX_CGROUP_DEPTH), "y", "ies"),
                 "links": ("symlink%s, not followed (a cgroup tree has none)", "", "s"),
                 "unreadable": ("unreadable director%s", "y", "ies")}
        parts = []
        for kind, (count, path) in self.skips.items():
            what, one, many = kinds[kind]
            parts.append("%d %s (e.g. %s)" % (count, what % (one if count == 1 else many), quote(path, 200)))
        if self.stopped:
            parts.append("what lies beyond the first %d directories" % MAX_CGROUP_DIRS)
        return "not looked at: %s" % ", ".join(parts) if parts else ""


def find_isolated_partitions(root):
    """([(cgroup dir, cpuset.cpus.partition text, cpuset.cpus.effective text)]
    of the cgroup v2 partitions that say isolated (valid or not), what the
    walk did not look at)."""
    found = []
    walk = CgroupWalk(root)
    for directory, subdirs, files in walk.walk():
        if "cpuset.cpus.partition" in files:
            text = read_file(os.path.join(directory, "cpuset.cpus.partition"), follow_symlinks=False).text or ""
            if text.startswith("isolated"):
                effective = read_file(os.path.join(directory, "cpuset.cpus.effective"), follow_symlinks=False).text
                found.append((directory, text, effective))
    return found, walk.skipped()


# A pod's cgroups: its directory, [ContainerCgroup], and its CPU quota as
# FileReads (v2: cpu.max; v1: cfs quota and period).
PodCgroup = collections.namedtuple("PodCgroup", "path containers quota")
# A container's cgroup: its directory, its effective cpuset (a FileRead), and
# what runs in it: "tasks" (a process may run on that cpuset), "sandbox" (only
# the pod's pause process), "none" (exited), or None (unreadable).
ContainerCgroup = collections.namedtuple("ContainerCgroup", "path cpus runs")
_POD_CGROUP = re.compile(r"(?:^|-)pod([0-9a-fA-F]{8}(?:[-_][0-9a-fA-F]{4}){3}[-_][0-9a-fA-F]{12})(?:\.slice)?\Z")
MAX_TASKS_LOOKED_AT = 16          # processes of a container whose names are read (pause or not)


def what_runs(directory, procfs):
    """ContainerCgroup.runs of a container's cgroup directory."""
    read = read_file(os.path.join(directory, "cgroup.procs"), follow_symlinks=False)
    if read.text is None:
        return None
    pids = read.text.split()
    if not pids:
        return "none"
    for pid in pids[:MAX_TASKS_LOOKED_AT]:
        if not pid.isdigit() or read_file(os.path.join(procfs, pid, "comm")).text != "pause":
            return "tasks"
    return "sandbox" if len(pids) <= MAX_TASKS_LOOKED_AT else "tasks"


def find_pod_cgroups(root, v2, uids, procfs):
    """({pod uid: PodCgroup} for the pods under the kubepods hierarchy, `uids`
    (any names) and every pod with a UUID: systemd naming
    (kubepods-burstable-pod<uid with _>.slice) or cgroupfs (pod<uid>),
    containerd, CRI-O or docker scopes below; what the walk did not look at)."""
    cpuset_root = root if v2 else os.path.join(root, "cpuset")
    names = {}
    for uid in uids:
        names["pod" + uid] = uid
        names["pod" + uid.replace("-", "_") + ".slice"] = uid
    found, walk = {}, CgroupWalk(cpuset_root)
    for top in sorted(n for n in list_dir(cpuset_root) if n.startswith("kubepods")):
        for directory, subdirs, _ in walk.walk(top):
            for sub in list(subdirs):
                # a name of `names` whole or after a "-" (kubepods-burstable-pod<uid>.slice): a lookup per
                # "-" of the directory's name, not a comparison per pod
                uid = names.get(sub)
                dash = sub.find("-")
                while uid is None and dash >= 0:
                    uid = names.get(sub[dash + 1:])
                    dash = sub.find("-", dash + 1)
                if uid is None:
                    match = _POD_CGROUP.search(sub)
                    if match is None:
                        continue
                    uid = match.group(1).replace("_", "-")
                subdirs.remove(sub)                  # a pod's containers are not pods
                pod_dir = os.path.join(directory, sub)
                containers = []
                for child in (walk.entries(pod_dir) or ([], []))[0]:     # a linked container: counted, not read
                    child_dir = os.path.join(pod_dir, child)
                    read = read_file(os.path.join(child_dir, "cpuset.cpus.effective"), follow_symlinks=False)
                    if read.text is None and not v2:
                        read = read_file(os.path.join(child_dir, "cpuset.effective_cpus"), follow_symlinks=False)
                        if read.text is None:
                            read = read_file(os.path.join(child_dir, "cpuset.cpus"), follow_symlinks=False)
                    containers.append(ContainerCgroup(child_dir, read, what_runs(child_dir, procfs)))
                if v2:
                    quota = (read_file(os.path.join(pod_dir, "cpu.max"), follow_symlinks=False),)
                else:
                    relative = os.path.relpath(pod_dir, cpuset_root)
                    cpu_root = next((os.path.join(root, n) for n in ("cpu,cpuacct", "cpu")
                                     if os.path.isdir(os.path.join(root, n))), os.path.join(root, "cpu"))
                    quota = tuple(read_file(path, follow_symlinks=False) if not links_below(cpu_root, path)
                                  else FileRead(path, None, "%s: under a symlink, not followed" % path)
                                  for path in (os.path.join(cpu_root, relative, "cpu.cfs_quota_us"),
                                               os.path.join(cpu_root, relative, "cpu.cfs_period_us")))
                found[uid] = PodCgroup(pod_dir, containers, quota)
    return found, walk.skipped()


def links_below(base, path):
    """Whether a directory between base and path (path inside base) is a symlink."""
    parts = os.path.relpath(os.path.dirname(path), base).split(os.sep)
    return any(os.path.islink(os.path.join(base, *parts[:i + 1])) for i in range(len(parts)) if parts[i] != ".")


# The checks ----------------------------------------------------------------------

UNREADABLE = "<unreadable>"      # a setting the audit cannot read honestly without a YAML parser
_YAML_KEY = re.compile(r"([A-Za-z_][\w.-]*)\s*:(?:\s+(.*))?\Z")


def _yaml_scalar(text):
    """A plain or quoted YAML scalar on one line; UNREADABLE for anything
    else (flow sequences, anchors, aliases, tags, block scalars, escapes)."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        inner = text[1:-1]
        if text[0] == '"':
            return UNREADABLE if "\\" in inner else inner
        return inner.replace("''", "'")
    if not text or text[0] in "[{&*!|>%@`'\"" or text.startswith("- "):
        return UNREADABLE
    return text


def _yaml_flow_map(text):
    """{a: b, c: "d"} of scalars, or UNREADABLE."""
    inner = text.strip()[1:-1]
    if any(c in inner for c in "{}[]\"'"):
        return UNREADABLE if any(c in inner for c in "{}[]") else _yaml_quoted_flow_map(inner)
    return _yaml_pairs(inner.split(","))


def _yaml_quoted_flow_map(inner):
    pairs = re.findall(r"\s*([^,:]+?)\s*:\s*(\"[^\"]*\"|'[^']*'|[^,]*?)\s*(?:,|\Z)", inner)
    return _yaml_pairs("%s: %s" % pair for pair in pairs) if pairs else UNREADABLE


def _yaml_pairs(parts):
    values = {}
    for part in filter(None, (p.strip() for p in parts)):
        key, colon, value = part.partition(":")
        if not colon:
            return UNREADABLE
        values[_yaml_scalar(key)] = _yaml_scalar(value)
    return UNREADABLE if UNREADABLE in values or UNREADABLE in values.values() else values


def _strip_comment(line):
    """A YAML line without its # comment (a # inside quotes stays)."""
    quoting = None
    for i, c in enumerate(line):
        if quoting:
            if c == quoting:
                quoting = None
        elif c in "'\"":
            quoting = c
        elif c == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line.rstrip()


def kubelet_config_values(text):
    """The top-level settings of a KubeletConfiguration (YAML or JSON) read
    with the standard library: scalars, and maps of scalars one level down
    (cpuManagerPolicyOptions). What it cannot read honestly is UNREADABLE;
    only the first YAML document counts, as for the kubelet."""
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            return {}
        values = {}
        for key, value in (data.items() if isinstance(data, dict) else ()):
            if isinstance(value, dict):
                value = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in value.items()
                         if not isinstance(v, (dict, list))}
            elif isinstance(value, list):
                value = UNREADABLE
            elif isinstance(value, bool):
                value = str(value).lower()
            elif value is not None:
                value = str(value)
            values[key] = value
        return values
    values = {}
    lines = [_strip_comment(line) for line in text.splitlines()]
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.strip() in ("---", "..."):
            if values:
                break
            continue
        match = _YAML_KEY.match(line)
        if not match:
            continue                                  # blank, or indented under another key
        key, raw = match.group(1), (match.group(2) or "").strip()
        if raw.startswith("{") and raw.endswith("}"):
            values[key] = _yaml_flow_map(raw)
        elif raw:
            values[key] = _yaml_scalar(raw)
        else:                                         # a block below it: a map of scalars, or unreadable
            block = {}
            while i < len(lines) and (not lines[i].strip() or lines[i][:1] in " \t"):
                item = lines[i].strip()
                i += 1
                if item and block is not UNREADABLE:
                    sub = _YAML_KEY.match(item)
                    if not sub or not sub.group(2):
                        block = UNREADABLE
                    else:
                        block[sub.group(1)] = _yaml_scalar(sub.group(2))
            if block is not UNREADABLE and UNREADABLE in block.values():
                block = UNREADABLE
            values[key] = block if block else UNREADABLE
    return values



def _bits(text, facts):
    """A cpu-list text as a bitmap, None when it does not parse."""
    try:
        return cpu_list_bits(text, facts.last_cpu, facts.max_cpu)
    except InputError:
        return None


def _cpus(text, facts):
    """A cpu-list text as a set, None when it does not parse."""
    bits = _bits(text, facts)
    return None if bits is None else cpus_of_bits(bits)


def _lowest_cpu(bits):
    return (bits & -bits).bit_length() - 1


def _mask(text, facts):
    try:
        return parse_cpu_mask(text, facts.max_cpu)
    except InputError:
        return None


def _brief(cpus):
    return brief_cpu_list(cpus, 80) or "none"


def _housekeeping(facts):
    return facts.online - facts.isolated


def _cmdline_values(facts, name):
    """The values of each `name` on the kernel command line ("" for a bare name)."""
    return [value for param, value in kernel_parameters(facts.cmdline.text or "") if param == name]


def _nothing_isolated(check, facts):
    return Finding(check, SKIP, "no isolated CPUs to check (see isolated)", "", [facts.origin or facts.cmdline.path], "")


def check_isolated(facts):
    files = [p for p in [facts.origin.split(" ")[0]] if p.startswith("/")] or [facts.cmdline.path]
    if facts.isolated_error:
        return Finding("isolated", FAIL, "cannot tell: %s" % facts.isolated_error,
                       "fix the file named, or give the CPUs with --cpus", files, "")
    if not facts.isolated:
        return Finding("isolated", FAIL, "no isolated CPUs in %s" % (facts.origin or "the kernel"),
                       "boot with isolcpus=domain,managed_irq,<cpu-list>, nohz_full=<cpu-list> and "
                       "rcu_nocbs=<cpu-list> (whole cores, not core 0), or serve chosen CPUs with --cpus", files, "")
    offline = facts.isolated - facts.online
    found = "%s (%d CPUs) from %s" % (_brief(facts.isolated), len(facts.isolated), facts.origin)
    if offline:
        found += "; offline: %s" % _brief(offline)
    if facts.missing:
        found += "; listed but not on this host: %s" % _brief(facts.missing)
    return Finding("isolated", PASS, found, "", files, format_cpu_list(facts.isolated))


def check_isolcpus_flags(facts):
    files = [facts.cmdline.path]
    if facts.cmdline.text is None:
        return Finding("isolcpus-flags", SKIP, "cannot read the kernel command line: %s" % why_unread(facts.cmdline),
                       "", files, "")
    values = _cmdline_values(facts, "isolcpus")
    if not values:
        return Finding("isolcpus-flags", SKIP, "no isolcpus= on the kernel command line", "", files, "")
    try:
        flags, cpu_list = parse_isolcpus(values[0])
    except InputError as e:
        return Finding("isolcpus-flags", WARN, str(e), "isolcpus=domain,managed_irq,<cpu-list>", files, "")
    problems = []
    if not isolcpus_isolates_domain(flags):
        problems.append("no domain flag: the CPUs stay in the scheduler's load balancing")
    if "managed_irq" not in flags:
        problems.append("no managed_irq: the kernel may place managed interrupts (multi-queue NICs, NVMe) "
                        "on them")
    unknown = [f for f in flags if f not in ISOLCPUS_FLAGS]
    if unknown:
        problems.append("the kernel skips the unknown flags %s" % quote_list(unknown))
    found = "isolcpus=%s" % quote(values[0], 80)[1:-1]
    wanted = ["domain", "managed_irq"] + [f for f in flags if f == "nohz"]
    advice = "isolcpus=%s,%s" % (",".join(wanted), cpu_list) if problems else ""
    return Finding("isolcpus-flags", WARN if problems else PASS, "; ".join([found] + problems), advice, files, "")


def smt_split(isolated, topology):
    """(isolated CPUs sharing a core with CPUs that are not isolated, those
    other CPUs), from the thread siblings sysfs gave."""
    shared, others = set(), set()
    for cpu in isolated:
        siblings = set(topology[cpu].thread_siblings) if cpu in topology else set()
        if siblings - isolated:
            shared.add(cpu)
            others |= siblings - isolated
    return frozenset(shared), frozenset(others)


def check_smt_siblings(facts):
    files = [os.path.join(os.path.dirname(facts.nohz_full.path), "cpuN", "topology", "thread_siblings_list")]
    if not facts.isolated:
        return _nothing_isolated("smt-siblings", facts)
    known = [cpu for cpu in facts.isolated if facts.topology.get(cpu) and facts.topology[cpu].thread_siblings]
    if not known:
        return Finding("smt-siblings", SKIP, "the thread siblings of the isolated CPUs are unknown (no topology "
                       "files, or all offline)", "", files, "")
    shared, others = smt_split(facts.isolated, facts.topology)
    unknown = facts.isolated - set(known)
    tail = "; siblings unknown for %s" % _brief(unknown) if unknown else ""
    if shared:
        return Finding("smt-siblings", WARN, "isolated CPUs %s share a core with CPUs %s, which are not isolated%s"
                       % (_brief(shared), _brief(others), tail),
                       "isolate whole cores: add %s to the isolated CPUs, or take %s out"
                       % (_brief(others), _brief(shared)), files, format_cpu_list(shared))
    return Finding("smt-siblings", PASS, "every isolated CPU's thread siblings are isolated too%s" % tail, "",
                   files, "")


def check_core_kinds(facts):
    cpu_dir = os.path.dirname(facts.nohz_full.path)
    devices = os.path.dirname(os.path.dirname(cpu_dir))
    files, kinds = facts.core_kinds
    files = files or [os.path.join(devices, name, "cpus") for name in HYBRID_PMUS] + [
        os.path.join(cpu_dir, "cpuN", "cpu_capacity")]
    if not facts.isolated:
        return _nothing_isolated("core-kinds", facts)
    if not facts.core_kinds[0]:
        return Finding("core-kinds", SKIP, "the kinds of core are unknown: no hybrid PMU lists and no cpu_capacity",
                       "", files, "")
    if not kinds:
        return Finding("core-kinds", PASS, "every CPU is of one kind of core", "", files, "")
    of_kind = collections.defaultdict(set)
    for cpu in facts.isolated:
        of_kind[kinds.get(cpu)].add(cpu)
    known = sorted(kind for kind in of_kind if kind is not None)
    tail = "; kind unknown for %s" % _brief(of_kind[None]) if None in of_kind else ""
    scale = " (0 the fastest of %d)" % len(set(kinds.values()))
    if len(known) > 1:
        slower = set().union(*(of_kind[kind] for kind in known[1:]))
        return Finding("core-kinds", WARN, "isolated CPUs mix kinds of core: %s%s%s; a pod may be given a slow core"
                       % ("; ".join("%s of kind %d" % (_brief(of_kind[kind]), kind) for kind in known), scale, tail),
                       "isolate CPUs of one kind (e.g. only %s); the plugin gives a pod one kind where it can, and "
                       "the fastest" % _brief(of_kind[known[0]]), files, format_cpu_list(slower))
    if known:
        return Finding("core-kinds", PASS, "every isolated CPU is of kind %d%s%s" % (known[0], scale, tail),
                       "", files, "")
    return Finding("core-kinds", SKIP, "the kinds of the isolated CPUs are unknown%s" % tail, "", files, "")


def _nohz_full_cpus(facts):
    """(nohz_full CPUs or None, where from): the sysfs file, else the command line."""
    text = facts.nohz_full.text
    if text is not None:
        cpus = _cpus("" if text == "(null)" else text, facts)
        return cpus, facts.nohz_full.path
    values = _cmdline_values(facts, "nohz_full")
    if values:
        return _cpus(values[0], facts), "nohz_full= on %s" % facts.cmdline.path
    return frozenset(), "no %s and no nohz_full= on the command line" % facts.nohz_full.path


def check_nohz_full(facts):
    files = [facts.nohz_full.path, facts.cmdline.path]
    if not facts.isolated:
        return _nothing_isolated("nohz-full", facts)
    covered, source = _nohz_full_cpus(facts)
    if covered is None:
        return Finding("nohz-full", SKIP, "%s does not parse" % source, "", files, "")
    ticking = facts.isolated - covered
    if ticking:
        return Finding("nohz-full", WARN, "isolated CPUs %s still take the timer tick (nohz_full: %s, from %s)"
                       % (_brief(ticking), _brief(covered), source),
                       "boot with nohz_full=%s (the kernel needs CONFIG_NO_HZ_FULL)" % _brief(facts.isolated),
                       files, format_cpu_list(ticking))
    return Finding("nohz-full", PASS, "every isolated CPU is nohz_full (%s)" % source, "", files, "")


def check_rcu_nocbs(facts):
    files = [facts.cmdline.path, facts.nohz_full.path]
    if not facts.isolated:
        return _nothing_isolated("rcu-nocbs", facts)
    if facts.cmdline.text is None:
        return Finding("rcu-nocbs", SKIP, "cannot read the kernel command line: %s" % why_unread(facts.cmdline),
                       "", files, "")
    listed = 0                                    # as a bitmap: a union of many lists costs their bytes
    for value in _cmdline_values(facts, "rcu_nocbs"):
        if value:                                 # a bare rcu_nocbs offloads no CPU at boot
            listed |= _bits(value, facts) or 0
    listed = cpus_of_bits(listed)
    nohz, _ = _nohz_full_cpus(facts)
    covered = listed | (nohz or frozenset())      # nohz_full CPUs are offloaded as if listed
    left = facts.isolated - covered
    if left:
        return Finding("rcu-nocbs", WARN, "RCU callbacks still run on isolated CPUs %s (rcu_nocbs: %s, nohz_full: %s)"
                       % (_brief(left), _brief(listed), _brief(nohz or ())),
                       "boot with rcu_nocbs=%s (nohz_full= CPUs are offloaded too)" % _brief(facts.isolated),
                       files, format_cpu_list(left))
    return Finding("rcu-nocbs", PASS, "every isolated CPU's RCU callbacks are offloaded (rcu_nocbs %s, nohz_full %s)"
                   % (_brief(listed), _brief(nohz or ())), "", files, "")


def interrupt_names(text):
    """{irq: its name} from /proc/interrupts (the words after the counts)."""
    names = {}
    lines = (text or "").splitlines()
    if not lines:
        return names
    columns = len(lines[0].split())                # one per CPU
    for line in lines[1:]:
        head, colon, rest = line.partition(":")
        if colon and head.strip().isdigit():
            words = rest.split()[columns:]
            names[int(head)] = " ".join(words[-2:]) if words else "?"
    return names


def check_irq_affinity(facts):
    files = [facts.irq_default.path, os.path.join(facts.irq_dir, "N", "effective_affinity_list"),
             facts.interrupts.path]
    if not facts.isolated:
        return _nothing_isolated("irq-affinity", facts)
    if facts.irq_default.text is None and not facts.irq_affinity:
        return Finding("irq-affinity", SKIP, "cannot read %s: %s" % (facts.irq_dir, why_unread(facts.irq_default)),
                       "", files, "")
    problems, hit = [], set()
    default = _mask(facts.irq_default.text, facts) if facts.irq_default.text is not None else None
    if default is not None and default & facts.isolated:
        problems.append("default_smp_affinity includes isolated CPUs %s" % _brief(default & facts.isolated))
        hit |= default & facts.isolated
    names = interrupt_names(facts.interrupts.text)
    bad = []
    for irq, read in facts.irq_affinity.items():
        cpus = _cpus(read.text, facts) if read.text is not None else None
        if cpus and cpus & facts.isolated:
            bad.append((irq, cpus & facts.isolated))
            hit |= cpus & facts.isolated
    if bad:
        shown = ", ".join("%d (%s) on %s" % (irq, quote(names.get(irq, "?"), 30)[1:-1], _brief(cpus))
                          for irq, cpus in bad[:8])
        problems.append("%d IRQs may fire on isolated CPUs: %s%s" % (len(bad), shown,
                                                                   " (+%d more)" % (len(bad) - 8) if len(bad) > 8 else ""))
    if problems:
        housekeeping = _brief(_housekeeping(facts))
        return Finding("irq-affinity", WARN, "; ".join(problems),
                       "boot with irqaffinity=%s and isolcpus=managed_irq,...; move the others: echo %s > "
                       "/proc/irq/N/smp_affinity_list (managed IRQs refuse; managed_irq keeps them off)"
                       % (housekeeping, housekeeping), files, format_cpu_list(hit))
    return Finding("irq-affinity", PASS, "no IRQ of %d may fire on an isolated CPU%s" % (
        len(facts.irq_affinity), ", nor by default" if default is not None else ""), "", files, "")


CPU_MANAGER_LAYOUT = ("under the static policy: put the isolated CPUs in reservedSystemCPUs (the CPU manager "
                      "then never grants them exclusively, and they stay in the shared pool); do not enable "
                      "the strict-cpu-reservation option (it removes reserved CPUs from the shared pool); run the "
                      "plugin with --nri auto on a runtime with NRI, which adds a holder's isolated CPUs to its "
                      "cpuset (Guaranteed pods are then fine); without NRI, give pods that request isolated CPUs "
                      "a Burstable QoS (a Guaranteed pod with integer CPUs gets only its exclusive CPUs)")
NRI_ADVICE = ("run the plugin with --nri auto (or on) on a runtime with NRI: containerd 1.7 with "
              "[plugins.\"io.containerd.nri.v1.nri\"] disable = false, containerd 2.x or CRI-O 1.30+ by default; "
              "it keeps every container but a CPU's holder off the isolated CPUs; no other NRI plugin that sets "
              "cpusets may run beside it")


def _holders_by_uid(facts):
    """{cpu: {(pod uid, container)}} of the plugin's CPUs, from the checkpoint; None when unknown."""
    by_cpu = facts.checkpoint.by_cpu
    if by_cpu is None:
        return None
    return {cpu: {(h.pod_uid, h.container) for h in holders} for cpu, holders in by_cpu.items()}


def check_cpu_manager(facts):
    read = facts.cpu_manager_state
    files = [read.path, facts.checkpoint_path]
    if read.text is None:
        return Finding("cpu-manager", SKIP, "cannot read the CPU manager's state: %s" % why_unread(read), "", files, "")
    try:
        policy, default_text, grants, old = cpu_manager_state(read.text)
    except ValueError as e:
        return Finding("cpu-manager", SKIP, "%s: %s" % (read.path, e), "", files, "")
    if policy == "none":
        return Finding("cpu-manager", PASS, "policy none: every container's cpuset is every CPU, so $ISOLCPUS is "
                       "usable", "", files, "")
    if policy != "static":
        return Finding("cpu-manager", SKIP, "policy %s is not one this audit knows" % quote(policy), "", files, "")
    # grants as bitmaps: a state's many lists, each of up to every CPU, cost its bytes
    default = _bits(default_text, facts) or 0
    grant_bits = {key: _bits(text, facts) or 0 for key, text in grants.items()}
    holders = _holders_by_uid(facts)
    isolated = bits_of_cpus(facts.isolated)
    held = collections.defaultdict(int)                 # {key: CPUs it holds through the plugin}
    for cpu, keys in (holders or {}).items():
        if cpu <= facts.max_cpu:
            for key in keys:
                held[key] |= 1 << cpu
    problems, hit = [], 0

    def name(key):
        return "container ID %s" % quote(key[1], 70) if key[0] is None else "pod UID %s container %s" % (
            key[0], quote(key[1], 70))
    # isolated CPUs granted exclusively to a container that does not hold them through the plugin
    tenants = {}
    for key, bits in grant_bits.items():
        foreign = bits & isolated & ~held.get(key, 0)
        if foreign:
            tenants[key] = foreign
    for key, bits in sorted(tenants.items(), key=lambda item: _lowest_cpu(item[1]))[:5]:
        problems.append("the CPU manager gave isolated CPUs %s exclusively to %s, which does not hold them "
                        "through the plugin: two tenants on a quiet core" % (_brief(cpus_of_bits(bits)), name(key)))
        hit |= bits
    if len(tenants) > 5:
        problems.append("(+%d more such grants)" % (len(tenants) - 5))
    # containers holding CPUs of ours whose cpuset lacks them (not where their pod's
    # cgroups show the CPUs: the plugin's NRI mode adds them to what the kubelet gave)
    if holders is not None and not old:
        lacking = {}
        for cpu, keys in holders.items():
            for key in keys:
                if not grant_bits.get(key, default) >> cpu & 1 and cpu not in _cpus_in_pod_cgroups(facts, key[0]):
                    lacking.setdefault(key, set()).add(cpu)
        for key, cpus in sorted(lacking.items(), key=lambda item: min(item[1]))[:5]:
            problems.append("%s holds CPUs %s of the plugin but its cpuset is %s" % (
                name(key), _brief(cpus), _brief(cpus_of_bits(grant_bits.get(key, default)))))
            hit |= bits_of_cpus(cpus)
    note = ("holders from the kubelet's checkpoint" if holders is not None
            else "holders unknown (%s)" % holders_note(facts.checkpoint))
    if old:
        note += "; old state format (by container ID): holders cannot be matched"
    found = "policy static, shared pool %s; %s" % (_brief(cpus_of_bits(default)), note)
    if problems:
        return Finding("cpu-manager", FAIL, "%s: %s" % (found, "; ".join(problems)), CPU_MANAGER_LAYOUT, files,
                       format_cpu_list(cpus_of_bits(hit)))
    checked = ("every holder may run on its CPUs" if holders is not None and not old
               else "the holders' cpusets could not be checked")
    return Finding("cpu-manager", PASS, "%s; no isolated CPU is granted exclusively; %s" % (found, checked), "",
                   files, "")


def _cpus_in_pod_cgroups(facts, uid):
    """The CPUs some container of the pod may run on, by its cgroups."""
    cgroup = facts.pod_cgroups.get(uid)
    cpus = set()
    for container in (cgroup.containers if cgroup else ()):
        if container.cpus.text is not None and container.runs != "sandbox":
            cpus |= _cpus(container.cpus.text, facts) or set()
    return cpus


def rule_breakers(facts):
    """([(pod uid, container dir, held CPUs it may run on, holder pods)],
    [(pod uid, container dir, free isolated CPUs it may run on)]) of the
    running containers by their cgroups; None when the holders are unknown.
    Judged per pod: cgroups name containers by runtime ID, not by name."""
    holders = _holders_by_uid(facts)
    if holders is None:
        return None
    held_by = collections.defaultdict(set)          # isolated CPU -> pod UIDs holding it
    for cpu, keys in holders.items():
        if cpu in facts.isolated:
            held_by[cpu] |= {uid for uid, _ in keys}
    held = bits_of_cpus(held_by)
    free = bits_of_cpus(facts.isolated) & ~held
    intruders, sharers = [], []
    for uid, pod in sorted(facts.pod_cgroups.items()):
        for container in pod.containers:
            if container.runs != "tasks" or container.cpus.text is None:
                continue
            bits = _bits(container.cpus.text, facts) or 0
            foreign = [cpu for cpu in cpus_of_bits(bits & held) if uid not in held_by[cpu]]
            if foreign:
                intruders.append((uid, container.path, foreign, sorted(set().union(*(held_by[c] for c in foreign)))))
            if bits & free:
                sharers.append((uid, container.path, cpus_of_bits(bits & free)))
    return intruders, sharers


def check_exclusive(facts):
    files = [os.path.join(facts.cgroup_root, "kubepods...", "cpuset.cpus.effective"),
             os.path.join(facts.cgroup_root, "kubepods...", "cgroup.procs"), facts.checkpoint_path]
    if not facts.isolated:
        return _nothing_isolated("exclusive", facts)
    running = sum(1 for pod in facts.pod_cgroups.values() for c in pod.containers if c.runs == "tasks")
    if not running:
        return Finding("exclusive", SKIP, "no running container found under %s/kubepods%s" % (
            facts.cgroup_root, "; " + facts.pod_cgroups_skipped if facts.pod_cgroups_skipped else ""), "", files, "")
    found = rule_breakers(facts)
    if found is None:
        return Finding("exclusive", SKIP, "who holds the isolated CPUs is unknown (%s)" % holders_note(facts.checkpoint),
                       "", files, "")
    intruders, sharers = found
    tail = "; " + facts.pod_cgroups_skipped if facts.pod_cgroups_skipped else ""

    def shown(items, text):
        parts = [text(item) for item in items[:4]]
        return ", ".join(parts) + (" (+%d more)" % (len(items) - 4) if len(items) > 4 else "")
    if intruders:
        hit = set().union(*(set(cpus) for _, _, cpus, _ in intruders))
        return Finding("exclusive", FAIL, "%s may run on isolated CPUs other pods hold: %s%s" % (
            _count(len(intruders), "container"), shown(intruders, lambda i: "pod %s %s on %s (held by pod %s)" % (
                i[0], os.path.basename(i[1]), _brief(i[2]), ", ".join(i[3][:2]))), tail),
            NRI_ADVICE, files, format_cpu_list(hit))
    if sharers:
        hit = set().union(*(set(cpus) for _, _, cpus in sharers))
        return Finding("exclusive", WARN, "%s may run on isolated CPUs nobody holds yet (%s): the pod given "
                       "them next shares them: %s%s" % (_count(len(sharers), "container"), _brief(hit), shown(
                           sharers, lambda i: "pod %s %s" % (i[0], os.path.basename(i[1]))), tail),
                       NRI_ADVICE, files, format_cpu_list(hit))
    return Finding("exclusive", PASS, "of %d running containers, only the holders may run on isolated CPUs%s"
                   % (running, tail), "", files, "")


def check_nri(facts):
    files = [facts.nri_socket]
    found = rule_breakers(facts) if facts.isolated else None
    lacking = [uid for uid, cpus in _pods_holding(facts).items()
               if uid in facts.pod_cgroups and not cpus <= _cpus_in_pod_cgroups(facts, uid)]
    fixes = []
    if found and found[0]:
        fixes.append("exclusive (%s on CPUs others hold)" % _count(len(found[0]), "container"))
    if lacking:
        fixes.append("pod-cgroups (%s without their CPUs)" % _count(len(lacking), "holder"))
    would = "; with it the plugin would turn green: %s" % ", ".join(fixes) if fixes else ""
    if facts.nri_socket_present:
        if fixes:
            return Finding("nri", WARN, "the runtime's NRI socket %s is there, but containers break the plugin's rule "
                           "(is the plugin running with --nri auto or on, or another NRI plugin setting cpusets?)%s"
                           % (facts.nri_socket, would), NRI_ADVICE, files, "")
        return Finding("nri", PASS, "the runtime's NRI socket %s is there (--nri %s)" % (facts.nri_socket,
                                                                                          facts.nri_mode), "", files, "")
    text = "no runtime NRI socket at %s%s" % (facts.nri_socket, would)
    if facts.nri_mode == "on":
        return Finding("nri", FAIL, text + " (--nri on)", NRI_ADVICE, files, "")
    if fixes:
        return Finding("nri", WARN, text, NRI_ADVICE, files, "")
    return Finding("nri", SKIP, text + "; nothing here needs it now", "", files, "")


def _count(number, noun):
    return "%d %s%s" % (number, noun, "" if number == 1 else "s")


def _pods_holding(facts):
    """{pod uid: the CPUs it holds} from the checkpoint ({} when unknown)."""
    pods = {}
    for cpu, keys in (_holders_by_uid(facts) or {}).items():
        for uid, _ in keys:
            pods.setdefault(uid, set()).add(cpu)
    return pods


def check_kubelet_config(facts):
    read = facts.kubelet_config
    files = [read.path]
    if read.text is None and not facts.kubelet_flags:
        return Finding("kubelet-config", SKIP, "no kubelet config (%s; found by %s)" % (why_unread(read),
                       facts.kubelet_config_from), "", files, "")
    values = kubelet_config_values(read.text) if read.text is not None else {}
    for key, value in facts.kubelet_flags.items():          # the kubelet's flags win over its file
        if key == "cpuManagerPolicyOptions":
            value = dict(item.partition("=")[::2] for item in value.split(",") if item)
        values[key] = value
    policy = values.get("cpuManagerPolicy", "none")
    topology = values.get("topologyManagerPolicy", "none")
    reserved_text = values.get("reservedSystemCPUs")
    options = values.get("cpuManagerPolicyOptions", {})
    found = "cpuManagerPolicy=%s, reservedSystemCPUs=%s, topologyManagerPolicy=%s" % (
        policy, reserved_text if reserved_text is not None else "(unset)", topology)
    unreadable = [key for key in ("cpuManagerPolicy", "reservedSystemCPUs", "topologyManagerPolicy",
                                  "cpuManagerPolicyOptions") if values.get(key) is UNREADABLE]
    if unreadable:
        return Finding("kubelet-config", SKIP, "%s: cannot read %s without a YAML parser (%s)"
                       % (read.path, ", ".join(unreadable), found), "", files, "")
    found += " (%s, found by %s)" % (read.path, facts.kubelet_config_from)
    if not facts.isolated:
        return Finding("kubelet-config", PASS, found, "", files, "")
    problems, fails, hit = [], [], set()
    if policy == "static":
        reserved = _cpus(reserved_text, facts) if reserved_text else frozenset()
        if reserved is None:
            return Finding("kubelet-config", SKIP, "reservedSystemCPUs %s does not parse" % quote(reserved_text),
                           "", files, "")
        outside = facts.isolated - reserved
        if outside:
            problems.append("isolated CPUs %s are not in reservedSystemCPUs: the CPU manager may grant them "
                            "exclusively to Guaranteed containers" % _brief(outside))
            hit |= outside
        if str(options.get("strict-cpu-reservation", "")).lower() == "true" and facts.isolated & reserved:
            fails.append("strict-cpu-reservation is on: reserved CPUs (isolated %s among them) are out of the "
                         "shared pool, so no pod may run on the isolated CPUs it gets"
                         % _brief(facts.isolated & reserved))
            hit |= facts.isolated & reserved
    if topology == "single-numa-node":
        per_node = collections.Counter()
        for cpu in facts.isolated:
            info = facts.topology.get(cpu)
            for node in (info.numa_nodes if info else ()) or ("?",):
                per_node[node] += 1
        if len(per_node) > 1:
            node, most = per_node.most_common(1)[0]
            problems.append("single-numa-node: a pod's isolated CPUs must come from one NUMA node, so at most "
                            "%d (node %s) of the %d can go to one pod; bigger requests are rejected (%s)"
                            % (most, node, len(facts.isolated), ", ".join("node %s: %d" % item for item in
                                                                          sorted(per_node.items(), key=str))))
    status = FAIL if fails else WARN if problems else PASS
    advice = CPU_MANAGER_LAYOUT if policy == "static" and (fails or hit) else (
        "size requests to the isolated CPUs of one NUMA node, or isolate more per node" if problems else "")
    return Finding("kubelet-config", status, "; ".join([found] + fails + problems), advice, files,
                   format_cpu_list(hit))


def check_cgroup_isolated(facts):
    files = [facts.cgroup_isolated.path, os.path.join(facts.cgroup_root, "**", "cpuset.cpus.partition")]
    if not facts.cgroup_v2:
        return Finding("cgroup-isolated", SKIP, "no cgroup v2 at %s: no isolated partitions" % facts.cgroup_root,
                       "", files, "")
    listed = _cpus(facts.cgroup_isolated.text, facts) if facts.cgroup_isolated.text else frozenset()
    problems, hit, in_partitions = [], set(), set()
    for directory, text, effective in facts.partitions:
        cpus = _cpus(effective or "", facts) or frozenset()
        if text != "isolated":
            problems.append("partition %s is %s" % (directory, quote(text, 100)[1:-1]))
            continue
        in_partitions |= cpus
        if cpus & facts.isolated:
            problems.append("CPUs %s are in the isolated partition %s: only its tasks run there, not the pods "
                            "the plugin gives them to" % (_brief(cpus & facts.isolated), directory))
            hit |= cpus & facts.isolated
    found = "cpuset.cpus.isolated: %s" % (_brief(listed) if facts.cgroup_isolated.text is not None
                                         else "absent (kernel before 6.8)")
    if in_partitions:
        found += "; isolated partitions hold %s" % _brief(in_partitions)
    # since 6.12 the file lists the boot-isolated CPUs too, before only partitions': either way
    # a CPU there is served by the plugin or held by a partition
    unexplained = (listed or frozenset()) - facts.isolated - in_partitions
    if unexplained:
        problems.append("the kernel lists CPUs %s as isolated, which the plugin does not serve and no isolated "
                        "partition holds" % _brief(unexplained))
    skipped = [facts.partitions_skipped] if facts.partitions_skipped else []
    if problems:
        return Finding("cgroup-isolated", WARN, "; ".join([found] + problems + skipped),
                       "serve only CPUs outside isolated partitions (--cpus), or dissolve the partition "
                       "(echo member > cpuset.cpus.partition)", files, format_cpu_list(hit))
    if skipped:                                   # a partition may be where the walk did not go
        return Finding("cgroup-isolated", WARN, "; ".join([found] + skipped),
                       "look for isolated partitions there yourself (cpuset.cpus.partition)", files, "")
    return Finding("cgroup-isolated", PASS, found, "", files, "")


def check_housekeeping(facts):
    files = [os.path.join(facts.procfs, "PID", "task", "TID", "status")]
    if not facts.isolated:
        return _nothing_isolated("housekeeping", facts)
    if not facts.processes:
        return Finding("housekeeping", SKIP, "no kubelet or plugin process runs here", "", files, "")
    problems, fine, hit = [], [], set()
    for process in facts.processes:
        allowed = set()
        for text in process.threads.values():
            allowed |= _cpus(text, facts) or set()
        on = allowed & facts.isolated
        label = "%s (pid %d)" % (process.role, process.pid)
        if on:
            problems.append("%s threads may run on isolated CPUs %s" % (label, _brief(on)))
            hit |= on
        else:
            fine.append(label)
    found = "; ".join(problems + ["%s threads stay off the isolated CPUs" % label for label in fine])
    if problems:
        return Finding("housekeeping", WARN, found, "keep the kubelet on housekeeping CPUs (CPUAffinity=%s in its "
                       "systemd unit); the plugin keeps itself off with --self-affinity on (the default)"
                       % _brief(_housekeeping(facts)), files, format_cpu_list(hit))
    return Finding("housekeeping", PASS, found, "", files, "")


def check_plugin(facts):
    files = [facts.plugin_socket, facts.pod_resources_socket or "(PodResources off)"]
    if not facts.device_plugin_dir_exists:
        return Finding("plugin", SKIP, "no %s: no kubelet here" % facts.device_plugin_dir, "", files, "")
    state, answered, why = facts.plugin_answer
    offline = facts.isolated - facts.online
    tail = "; offline isolated CPUs: %s" % _brief(offline) if offline else ""
    if state != "listening":
        if not facts.kubelet_socket and state == "missing":
            return Finding("plugin", SKIP, "neither the kubelet nor the plugin serves in %s" % facts.device_plugin_dir,
                           "", files, "")
        what = {"missing": "does not exist", "refused": "is stale: nothing serves it"}.get(state, why)
        return Finding("plugin", FAIL, "the plugin's socket %s %s%s" % (facts.plugin_socket, what, tail),
                       "start the plugin (systemctl start isolcpu-plugin, or its DaemonSet) and read its log",
                       files, "")
    if answered is False:
        return Finding("plugin", FAIL, "the plugin's socket listens but %s%s" % (why, tail),
                       "the plugin is stuck: restart it and read its log", files, "")
    found = "the plugin answers on %s" % facts.plugin_socket if answered else (
        "the plugin's socket listens (not asked: %s)" % why)
    answer, failure = facts.allocatable
    if answer is None:
        return Finding("plugin", PASS, "%s; the kubelet's view unknown (%s)%s" % (found, failure[0], tail), "",
                       files, "")
    allocatable = set()
    for devices in answer.devices:
        if devices.resource_name == facts.resource_name:
            allocatable |= {int(i) for i in devices.device_ids if _DEVICE_ID.match(i)}
    advertised = {d.cpu for d in facts.devices if d.healthy}
    if allocatable != advertised:
        differ = allocatable ^ advertised
        return Finding("plugin", WARN, "%s; the kubelet counts %s allocatable, the plugin would advertise %s%s"
                       % (found, _brief(allocatable), _brief(advertised), tail),
                       "the kubelet's view is stale: the plugin re-registers when it changes its list; restart "
                       "it if this stays", files, format_cpu_list(differ))
    return Finding("plugin", PASS, "%s; the kubelet counts the same %d CPUs allocatable%s"
                   % (found, len(allocatable), tail), "", files, "")


def cpu_quota(reads):
    """A pod's CPU limit in CPUs from its cgroup (v2 cpu.max; v1 quota and
    period), None when unlimited, ValueError when unreadable."""
    if len(reads) == 1:
        quota, _, period = (reads[0].text or "").partition(" ")
    else:
        quota, period = reads[0].text or "", reads[1].text or ""
    if quota in ("max", "-1"):
        return None
    return int(quota) / float(int(period or "100000"))


def check_pod_cgroups(facts):
    files = [os.path.join(facts.cgroup_root, "kubepods...", "cpuset.cpus.effective"), facts.checkpoint_path]
    if _holders_by_uid(facts) is None:
        return Finding("pod-cgroups", SKIP, "the pods holding CPUs are unknown by UID (%s)"
                       % holders_note(facts.checkpoint), "", files, "")
    pods = _pods_holding(facts)
    if not pods:
        return Finding("pod-cgroups", SKIP, "no pod holds CPUs of the plugin", "", files, "")
    fails, warns, unread, hit = [], [], [], set()
    for uid, cpus in sorted(pods.items()):
        cgroup = facts.pod_cgroups.get(uid)
        if cgroup is None:
            warns.append("pod %s: no cgroup found (ended?)" % uid)
            continue
        effective = [(c.path, _cpus(c.cpus.text, facts)) for c in cgroup.containers
                     if c.cpus.text is not None and c.runs != "sandbox"]
        # a cpuset that is there but cannot be read (not an absent one: no cpuset controller there)
        unreadable = [c for c in cgroup.containers if c.cpus.text is None and c.cpus.error is not None
                      and c.runs != "sandbox"]
        if any(cpuset is not None and cpus <= cpuset for _, cpuset in effective):
            pass
        elif unreadable:                  # one of them may have the CPUs: cannot tell
            unread.append("pod %s: cannot tell whether it may run on its CPUs %s: the cpusets of %d of its "
                          "containers could not be read (%s)" % (
                uid, _brief(cpus), len(unreadable), ", ".join("%s: %s" % (os.path.basename(c.path), c.cpus.error) for c in unreadable[:4])
                + (" (+%d more)" % (len(unreadable) - 4) if len(unreadable) > 4 else "")))
        else:
            fails.append("pod %s: no container may run on its CPUs %s (%s)" % (
                uid, _brief(cpus), ", ".join("%s: %s" % (os.path.basename(path), _brief(c) if c is not None else "?")
                                             for path, c in effective[:4]) or "no container cgroups"))
            hit |= cpus
        try:
            limit = cpu_quota(cgroup.quota)
        except ValueError:
            limit = None
        if limit is not None and limit < len(cpus):
            warns.append("pod %s: its CPU limit (%.2f CPUs) is below the %d isolated CPUs it holds: busy-polling "
                         "threads get throttled" % (uid, limit, len(cpus)))
    found = "; ".join(fails + warns + unread) or "the %d pods holding CPUs may run on them" % len(pods)
    if facts.pod_cgroups_skipped:
        found += "; " + facts.pod_cgroups_skipped
    advice = "; ".join(([CPU_MANAGER_LAYOUT] if fails else []) + (
        ["set a pod's CPU limit to at least the isolated CPUs it busy-polls, or leave the limit out"] if warns else []))
    # files it cannot read: SKIP with the reason, as every check, unless something else FAILs or WARNs
    return Finding("pod-cgroups", FAIL if fails else WARN if warns else SKIP if unread else PASS, found, advice,
                   files, format_cpu_list(hit))


def check_housekeeping_masks(facts):
    files = [facts.workqueue.path, facts.cmdline.path]
    if not facts.isolated:
        return _nothing_isolated("housekeeping-masks", facts)
    problems, seen, hit = [], [], set()
    if facts.workqueue.text is not None:
        mask = _mask(facts.workqueue.text, facts)
        if mask is not None:
            seen.append("workqueue cpumask %s" % _brief(mask))
            if mask & facts.isolated:
                problems.append("unbound workqueues may run on isolated CPUs %s" % _brief(mask & facts.isolated))
                hit |= mask & facts.isolated
    for param in ("kthread_cpus", "irqaffinity"):
        for value in _cmdline_values(facts, param):
            cpus = _cpus(value, facts)
            if cpus is None:
                continue
            seen.append("%s=%s" % (param, _brief(cpus)))
            if cpus & facts.isolated:
                problems.append("%s= includes isolated CPUs %s" % (param, _brief(cpus & facts.isolated)))
                hit |= cpus & facts.isolated
    if not seen:
        return Finding("housekeeping-masks", SKIP, "no %s and no kthread_cpus= or irqaffinity=" % facts.workqueue.path,
                       "", files, "")
    if problems:
        housekeeping = _brief(_housekeeping(facts))
        return Finding("housekeeping-masks", WARN, "; ".join(problems),
                       "write the housekeeping CPUs' mask to %s at boot (tuned's cpu-partitioning profile does), "
                       "and boot with kthread_cpus=%s irqaffinity=%s" % (facts.workqueue.path, housekeeping,
                                                                         housekeeping), files, format_cpu_list(hit))
    return Finding("housekeeping-masks", PASS, "; ".join(seen) + ": kernel work stays off the isolated CPUs", "",
                   files, "")


CHECKS = (check_isolated, check_isolcpus_flags, check_smt_siblings, check_core_kinds, check_nohz_full, check_rcu_nocbs,
          check_irq_affinity, check_cpu_manager, check_kubelet_config, check_cgroup_isolated, check_housekeeping,
          check_plugin, check_pod_cgroups, check_housekeeping_masks, check_exclusive, check_nri)


def audit(facts):
    """Every check's Finding, in order; a check that fails on facts it did
    not foresee is a SKIP saying so, not a traceback."""
    findings = []
    for check in CHECKS:
        name = check.__name__[len("check_"):].replace("_", "-")
        try:
            findings.append(check(facts))
        except Exception as e:
            findings.append(Finding(name, SKIP, "could not check: %s: %s" % (type(e).__name__, one_line(e)), "",
                                    [], ""))
    return findings


def write_report(findings, facts, as_json, out):
    counts = collections.Counter(f.status for f in findings)
    holders = holders_clause(facts.holders)
    if as_json:
        json.dump(collections.OrderedDict([
            ("checks", [collections.OrderedDict([("id", f.id), ("status", f.status), ("found", f.found),
                                                 ("advice", f.advice), ("files", f.files), ("cpus", f.cpus)])
                        for f in findings]),
            ("holders_source", facts.holders.source), ("holders_note", holders_note(facts.holders))]), out)
        out.write("\n")
        return
    out.write("isolcpu-plugin doctor: %s; %s\n" % (", ".join("%d %s" % (counts[s], s) for s in (FAIL, WARN, PASS, SKIP)
                                                              if counts[s]), holders))
    width = max(len(f.id) for f in findings)
    for f in findings:
        out.write("%-4s  %-*s  %s\n" % (f.status, width, f.id, f.found))
        if f.advice:
            out.write("%s  fix: %s\n" % (" " * (width + 4), f.advice))
        if f.files:
            out.write("%s  read: %s\n" % (" " * (width + 4), ", ".join(f.files)))


def doctor(config, out):
    """--doctor: 1 when a check FAILs, else 0."""
    facts = read_node(config)
    findings = audit(facts)
    write_report(findings, facts, config.json, out)
    return 1 if any(f.status == FAIL for f in findings) else 0


# ---------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------

LOG_LEVELS = ("debug", "info", "warning", "error")
_ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*\Z")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")

# (flag, default, help); every flag also reads ISOLCPU_<FLAG> from the
# environment. An empty or blank variable is taken as unset (a blank line in
# a systemd environment file); an empty value on the command line is an
# error, except where "" is documented to mean off (EMPTY_MEANS_OFF).
VALUE_OPTIONS = (
    ("--resource-name", DEFAULT_RESOURCE_NAME, "extended resource to advertise"),
    ("--device-plugin-path", DEFAULT_DEVICE_PLUGIN_PATH, "the kubelet's device-plugin directory"),
    ("--sysfs", "/sys", "where the host's sysfs is mounted"),
    ("--procfs", "/proc", "where the host's procfs is mounted"),
    ("--cpus", None, "serve exactly these CPUs (kernel cpu-list), overriding discovery"),
    ("--source", "auto", "where isolated CPUs come from: " + "|".join(SOURCES)),
    ("--env-name", "ISOLCPUS", "environment variable that receives the allocated CPUs"),
    ("--cpuid-devices", "auto", "pass /dev/cpu/N/cpuid: auto (when present)|always|never"),
    ("--rescan-interval", "0.5", "seconds between rereads of the online and isolated lists"),
    ("--uevents", "auto", "kernel CPU hotplug events: auto (when --sysfs is /sys)|off (always poll)"),
    ("--self-affinity", "on", "keep the plugin's own threads off the CPUs it serves: on|off"),
    ("--log-level", "info", "|".join(LOG_LEVELS)),
    ("--metrics-address", None, "serve Prometheus /metrics and /healthz on HOST:PORT (off by default)"),
    ("--pod-resources-socket", DEFAULT_POD_RESOURCES_SOCKET,
     "the kubelet's PodResources socket, asked who holds each CPU; off (or \"\"): never asked"),
    ("--nri", "off", "keep every container's cpuset by the plugin's rule through the runtime's NRI: "
                     "off|auto (when its socket is there)|on (its absence a warning)"),
    ("--nri-socket", DEFAULT_NRI_SOCKET, "the container runtime's NRI socket"),
    ("--nri-index", DEFAULT_NRI_INDEX, "the plugin's NRI index, two digits (runtimes call plugins in index order)"),
    ("--kubelet-dir", DEFAULT_KUBELET_DIR, "the kubelet's root directory (cpu_manager_state), for --nri and --doctor"),
    ("--kubelet-config", None, "the kubelet's config file, for --doctor (default: the running kubelet's "
                               "--config, else <kubelet-dir>/config.yaml)"),
)
EMPTY_MEANS_OFF = ("metrics_address", "pod_resources_socket")
SWITCH_OPTIONS = (
    ("--list", "print the devices that would be advertised, then exit"),
    ("--json", "with --list or --doctor: print one JSON object"),
    ("--probe", "exit 0 if the running plugin answers on its socket within 2 s, else 1"),
    ("--doctor", "audit this node (read only): can pods run on the isolated CPUs they get? exit 1 on a FAIL"),
)


def env_twin(flag):
    return "ISOLCPU_" + flag[2:].upper().replace("-", "_")


class _VersionAction(argparse.Action):
    """--version, with the runtime a bug report needs (grpc imported only here)."""

    def __call__(self, parser, namespace, values, option_string=None):
        found = []
        for name, module in (("grpcio", "grpc"), ("protobuf", "google.protobuf")):
            try:
                found.append("%s %s" % (name, __import__(module, fromlist=["__version__"]).__version__))
            except ImportError:
                found.append("%s missing" % name)
        write_stdout(lambda out: out.write("%s %s (python %s, %s)\n" % (
            PROGRAM, __version__, sys.version.split()[0], ", ".join(found))))
        parser.exit(0)


class OutputError(Exception):
    """stdout cannot take the output (closed, disk full): exit 3."""


def write_stdout(write):
    """write(stdout), flushed; OutputError when it cannot be written. A
    reader that stops early (| head) is no error (BrokenPipeError, exit 0).
    Either way stdout is pointed at /dev/null after, so that the flush at
    exit does not fail again."""
    out = sys.stdout
    if out is None:
        raise OutputError("stdout is closed")
    try:
        write(out)
        out.flush()
    except OSError as e:
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, out.fileno())
            os.close(null)
        except (OSError, ValueError):
            pass
        if isinstance(e, BrokenPipeError):
            raise
        raise OutputError(e.strerror or str(e))


def write_stderr(text):
    """A line for the user, where there is a stderr to take it."""
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (AttributeError, OSError):            # None (closed), or full: nobody to tell
        pass


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, "%s: error: %s\n" % (PROGRAM, " ".join(message.split())))


def build_parser():
    parser = _OneLineParser(
        prog="isolcpu_plugin.py",
        description="Kubernetes device plugin offering isolated CPUs (isolcpus=) as devices. "
                    "Every flag can also be set as ISOLCPU_<FLAG> in the environment; a flag wins.")
    for flag, default, text in VALUE_OPTIONS:
        parser.add_argument(flag, metavar=flag[2:].upper().replace("-", "_"),
                            help="%s (default: %s; env %s)" % (text, default, env_twin(flag)))
    for flag, text in SWITCH_OPTIONS:
        parser.add_argument(flag, action="store_true", default=None,
                            help="%s (env %s)" % (text, env_twin(flag)))
    parser.add_argument("--version", action=_VersionAction, nargs=0,
                        help="print the version, with python's, grpcio's and protobuf's, and exit")
    return parser


class Config(object):
    """Validated settings; `origin[name]` is the flag or variable a value came
    from; `from_environment` the (variable, text) pairs that were used."""


def parse_config(argv, environ):
    args = build_parser().parse_args(argv)
    config = Config()
    config.origin = {}
    config.from_environment = []

    def from_environment(flag):
        text = environ.get(env_twin(flag), "")
        if not text.strip():
            return None                            # unset, or blank: the same
        config.from_environment.append((env_twin(flag), text))
        return text

    for flag, default, _ in VALUE_OPTIONS:
        name = flag[2:].replace("-", "_")
        value, origin = getattr(args, name), flag
        if value is None:
            value, origin = from_environment(flag), env_twin(flag)
        elif not value.strip() and name not in EMPTY_MEANS_OFF:
            raise InputError("%s %s: empty; leave the flag out for its default" % (flag, quote(value)))
        setattr(config, name, default if value is None else value)
        config.origin[name] = origin
    for flag, _ in SWITCH_OPTIONS:
        name = flag[2:]
        value = getattr(args, name)
        if value is None:
            text = (from_environment(flag) or "").strip().lower()
            if text not in _TRUE + _FALSE:
                raise InputError("%s=%s: expected 1/0, true/false, yes/no" % (env_twin(flag), quote(text)))
            value = text in _TRUE
        setattr(config, name, value)

    def bad(name, why):
        return InputError("%s %s: %s" % (config.origin[name], quote(getattr(config, name), 200), why))

    try:
        check_resource_name(config.resource_name)
    except InputError as e:
        raise bad("resource_name", e)
    config.socket_name = socket_name_for(config.resource_name)
    for name in ("device_plugin_path", "sysfs", "procfs"):
        setattr(config, name, os.path.abspath(getattr(config, name)))
    if len(os.fsencode(os.path.join(config.device_plugin_path, config.socket_name))) > UNIX_PATH_MAX:
        raise bad("device_plugin_path", "socket path longer than %d bytes" % UNIX_PATH_MAX)
    if config.pod_resources_socket.strip() in ("", "off"):
        config.pod_resources_socket = None
    else:
        config.pod_resources_socket = os.path.abspath(config.pod_resources_socket)
        if len(os.fsencode(config.pod_resources_socket)) > UNIX_PATH_MAX:
            raise bad("pod_resources_socket", "longer than %d bytes" % UNIX_PATH_MAX)
    if not _ENV_NAME.match(config.env_name):
        raise bad("env_name", "not a valid environment variable name")
    config.log_level = config.log_level.lower()
    for name, choices in (("source", SOURCES), ("cpuid_devices", ("auto", "always", "never")),
                          ("uevents", ("auto", "off")), ("self_affinity", ("on", "off")), ("nri", ("off", "auto", "on")),
                          ("log_level", LOG_LEVELS)):
        if getattr(config, name) not in choices:
            raise bad(name, "expected one of " + ", ".join(choices))
    try:
        interval = float(config.rescan_interval)
    except ValueError:
        interval = float("nan")
    if not (0.05 <= interval <= 3600):
        raise bad("rescan_interval", "expected seconds between 0.05 and 3600")
    config.rescan_interval = interval
    if not re.match(r"[0-9]{2}\Z", config.nri_index):
        raise bad("nri_index", "expected two digits, 00 to 99")
    config.nri_socket = os.path.abspath(config.nri_socket)
    if len(os.fsencode(config.nri_socket)) > UNIX_PATH_MAX:
        raise bad("nri_socket", "longer than %d bytes" % UNIX_PATH_MAX)
    if config.json and not (config.list or config.doctor):
        raise InputError("--json needs --list or --doctor")
    modes = [flag for flag in ("--list", "--probe", "--doctor") if getattr(config, flag[2:])]
    if len(modes) > 1:
        raise InputError("%s exclude each other" % " and ".join(modes))
    config.kubelet_dir = os.path.abspath(config.kubelet_dir)
    if config.kubelet_config is not None:
        config.kubelet_config = os.path.abspath(config.kubelet_config)
    if config.metrics_address:
        try:
            config.metrics_address = parse_listen_address(config.metrics_address)
        except InputError as e:
            raise bad("metrics_address", e)
    return config


def device_record(device):
    """A device as `--list --json` prints it (a contract: keep these keys)."""
    info = device.info
    return collections.OrderedDict([
        ("id", device_id(device.cpu)), ("cpu", device.cpu),
        ("health", HEALTHY if device.healthy else UNHEALTHY),
        ("numa_nodes", list(info.numa_nodes)), ("package", info.package),
        ("core_id", info.core_id), ("thread_siblings", list(info.thread_siblings)),
        ("llc_cpus", list(info.llc_cpus) or None), ("core_class", info.core_class)])


def list_holders(config):
    """Who holds the CPUs, for --list: PodResources (blocking gRPC) where its
    socket answers, else the kubelet's checkpoint. grpc is imported only to
    ask PodResources, so the rest of --list needs the standard library alone."""
    answer, failure = ask_pod_resources(config.pod_resources_socket, POD_RESOURCES_LIST)
    return find_holders(answer, failure, config.device_plugin_path, config.resource_name)


def write_listing(config, inventory, holders, out):
    """--list: the devices and who holds them (a HolderReport), as a table
    or, with --json, one object."""
    devices = inventory.devices
    by_cpu = holders.by_cpu
    if config.json:
        records = []
        for d in devices:
            held = sorted(by_cpu.get(d.cpu, ()), key=holder_name) if by_cpu is not None else []
            record = device_record(d)
            record["holder"] = holder_record(held[0]) if held else None
            record["holders"] = [holder_record(h) for h in held]
            records.append(record)
        json.dump(collections.OrderedDict([("resource_name", config.resource_name), ("devices", records),
                                           ("holders_source", holders.source),
                                           ("holders_note", holders_note(holders))]),
                  out)
        out.write("\n")
        return
    out.write("%s: %d devices from %s; %s\n" % (config.resource_name, len(devices), inventory.origin,
                                                 holders_clause(holders)))
    # L3: the last-level cache, named by its first CPU; KIND only where cores differ
    kinds = any(d.info.core_class is not None for d in devices)
    rows = [("ID", "CPU", "HEALTH", "NUMA", "PACKAGE", "CORE", "THREAD SIBLINGS", "L3") + ("KIND",) * kinds
            + ("HOLDER",)]
    for d in devices:
        info = d.info
        if by_cpu is None:
            holder = "?"
        else:
            holder = ", ".join(sorted(holder_name(h) for h in by_cpu.get(d.cpu, ()))) or "-"
        kind = ("-" if info.core_class is None else str(info.core_class),) * kinds
        rows.append((device_id(d.cpu), str(d.cpu), HEALTHY if d.healthy else UNHEALTHY,
                     format_cpu_list(info.numa_nodes) or "-",
                     "-" if info.package is None else str(info.package),
                     "-" if info.core_id is None else str(info.core_id),
                     format_cpu_list(info.thread_siblings) or "-",
                     str(info.llc_cpus[0]) if info.llc_cpus else "-") + kind + (holder,))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() + "\n")
    if not devices:
        out.write("(no isolated CPUs: boot with isolcpus=<cpu-list>, or use --cpus)\n")


def configure_logging(level):
    """One line per event on stderr, written and flushed when it happens:
    a daemon's log holds everything up to the moment it died."""
    # The logging HOWTO's "Optimization": the format uses no caller, thread or
    # process fields, and not looking them up halves the cost of a line.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


def main(argv=None, environ=None):
    environ = os.environ if environ is None else environ
    try:
        config = parse_config(argv, environ)
        configure_logging(config.log_level)
        if config.probe:
            return probe(config)
        if config.doctor:
            findings = []
            write_stdout(lambda out: findings.append(doctor(config, out)))
            return findings[0]
        inventory = CpuInventory(Host(config.sysfs, config.procfs), config.source,
                                 config.cpus, config.origin["cpus"])
        if config.list:
            holders = list_holders(config)
            write_stdout(lambda out: write_listing(config, inventory, holders, out))
            return 0
        return serve(config, inventory)
    except InputError as e:
        write_stderr("%s: error: %s\n" % (PROGRAM, e))
        return 2
    except OutputError as e:
        write_stderr("%s: error: cannot write the output: %s\n" % (PROGRAM, e))
        return 3
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        return 0
    except Exception as e:                     # a bug: one line, details at debug
        write_stderr("%s: internal error: %s: %s\n" % (PROGRAM, type(e).__name__, one_line(e)))
        log.debug("details", exc_info=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
