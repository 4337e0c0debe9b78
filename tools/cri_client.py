#!/usr/bin/env python3
"""A small CRI v1 client, to drive a real containerd as the kubelet does.

    python3 tools/cri_client.py SOCKET version
    python3 tools/cri_client.py SOCKET ps
    python3 tools/cri_client.py SOCKET bench N [CGROUP_ROOT]   # CreateContainer p50/p99 over N

It speaks runtime.v1.RuntimeService on grpcio alone: no generated CRI stubs
(the project ships none, and CRI's api.proto pulls in gogo options). The few
requests are encoded by hand and the few answer fields decoded by hand, with
the field numbers of kubernetes/cri-api pkg/apis/runtime/v1/api.proto named in
the comments. Each method is called by its path with bytes in and bytes out.

Where a container runs (cgroup v1, cgroupfs driver, as on these machines):
containerd's CRI puts a container's cgroup at <cgroup_parent>/<container id>,
the cgroup_parent being the pod sandbox's (linux.cgroup_parent), the same
path in every v1 hierarchy: its cpuset is
/sys/fs/cgroup/cpuset/<cgroup_parent>/<container id>/cpuset.cpus. On cgroup
v2 the same path is under /sys/fs/cgroup itself. container_cgroup_cpus()
reads that; cgroup_of() reads the process's own /proc/PID/cgroup, so a test
can check the two agree.
"""
import json
import os
import sys
import time
import uuid

import grpc

SERVICE = "/runtime.v1.RuntimeService/"

# enums of api.proto
NAMESPACE_POD, NAMESPACE_CONTAINER, NAMESPACE_NODE = 0, 1, 2              # NamespaceMode
CONTAINER_STATES = {0: "created", 1: "running", 2: "exited", 3: "unknown"}  # ContainerState
SANDBOX_STATES = {0: "ready", 1: "notready"}                                # PodSandboxState


# -- protobuf wire format: just what these messages need -----------------------

def _varint(value):
    value &= (1 << 64) - 1                # negative int64: two's complement, ten bytes
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def f_int(number, value):
    """A varint field (int64, uint32, bool, enum); 0 is proto3's default and not sent."""
    return _varint(number << 3) + _varint(int(value)) if value else b""


def f_bytes(number, data):
    """A length-delimited field, sent even when empty: a present empty message
    is not an absent one (ListContainers' state filter for CREATED is empty)."""
    if isinstance(data, str):
        data = data.encode()
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def f_str(number, text):
    return f_bytes(number, text) if text else b""


def f_strs(number, texts):
    return b"".join(f_bytes(number, t) for t in texts)


def f_map(number, mapping):
    """map<string, string>: one entry message {1 key, 2 value} per pair."""
    return b"".join(f_bytes(number, f_str(1, k) + f_str(2, v)) for k, v in sorted((mapping or {}).items()))


def fields(data):
    """(number, value) for each field of a message: an int for varints, bytes
    for length-delimited fields; fixed-width fields are skipped (none is used)."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 2:
            size, pos = _read_varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            continue
        else:
            raise ValueError("wire type %d in a CRI answer" % wire)
        yield number, value


def _read_varint(data, pos):
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def field(data, number, default=b""):
    """The last value of field `number` (proto3: the last one wins)."""
    found = default
    for n, value in fields(data):
        if n == number:
            found = value
    return found


def repeated(data, number):
    return [value for n, value in fields(data) if n == number]


def decode_map(data, number):
    return {field(e, 1).decode(): field(e, 2).decode() for e in repeated(data, number)}


def _identity(data):
    return data


# -- the messages ---------------------------------------------------------------

def namespace_options(network=NAMESPACE_NODE, pid=NAMESPACE_CONTAINER, ipc=NAMESPACE_POD):
    # NamespaceOption{1 network, 2 pid, 3 ipc}: what the kubelet sends for a hostNetwork pod
    return f_int(1, network) + f_int(2, pid) + f_int(3, ipc)


def linux_resources(cpuset="", cpu_shares=0, cpu_quota=0, cpu_period=0, memory=0):
    # LinuxContainerResources{1 cpu_period, 2 cpu_quota, 3 cpu_shares, 4 memory_limit_in_bytes, 6 cpuset_cpus}
    return (f_int(1, cpu_period) + f_int(2, cpu_quota) + f_int(3, cpu_shares) + f_int(4, memory)
            + f_str(6, cpuset))


class Pod(object):
    """A pod sandbox made here: its id, and the PodSandboxConfig it was run
    with (the kubelet sends it again with every CreateContainer)."""

    def __init__(self, id, config, name, namespace, uid, cgroup_parent):
        self.id, self.config = id, config
        self.name, self.namespace, self.uid, self.cgroup_parent = name, namespace, uid, cgroup_parent

    def __repr__(self):
        return "Pod(%s/%s uid=%s id=%s)" % (self.namespace, self.name, self.uid, self.id[:12])


class CriClient(object):
    def __init__(self, socket_path, timeout=30.0):
        self.timeout = timeout
        # reconnect quickly after a containerd restart (grpc's default backoff starts at 1 s)
        self.channel = grpc.insecure_channel("unix://" + socket_path, options=[
            ("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
            ("grpc.max_reconnect_backoff_ms", 500)])
        self._calls = {}

    def close(self):
        self.channel.close()

    def call(self, method, request, timeout=None):
        if method not in self._calls:
            self._calls[method] = self.channel.unary_unary(SERVICE + method, request_serializer=_identity,
                                                           response_deserializer=_identity)
        return self._calls[method](request, timeout=timeout or self.timeout)

    def version(self):
        # VersionRequest{1 version}; VersionResponse{1 version, 2 runtime_name, 3 runtime_version, 4 runtime_api_version}
        answer = self.call("Version", f_str(1, "v1"))
        return {"runtime_name": field(answer, 2).decode(), "runtime_version": field(answer, 3).decode(),
                "runtime_api_version": field(answer, 4).decode()}

    def wait_ready(self, timeout=30.0):
        """Until CRI answers: right after a (re)start it says "server is not initialized yet"."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.version()
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    # Pod sandboxes --------------------------------------------------------------

    def run_pod_sandbox(self, name, namespace="default", uid=None, cgroup_parent="", attempt=0,
                        labels=None, annotations=None):
        """A pod in the host's network namespace (no CNI), without a hostname
        (runc cannot set one without a private UTS namespace), labelled as the kubelet labels it."""
        uid = uid or str(uuid.uuid4())
        labels = dict({"io.kubernetes.pod.name": name, "io.kubernetes.pod.namespace": namespace,
                       "io.kubernetes.pod.uid": uid}, **(labels or {}))
        # PodSandboxConfig{1 metadata{1 name, 2 uid, 3 namespace, 4 attempt}, 6 labels, 7 annotations,
        #   8 linux: LinuxPodSandboxConfig{1 cgroup_parent, 2 security_context:
        #     LinuxSandboxSecurityContext{1 namespace_options}}}
        config = (f_bytes(1, f_str(1, name) + f_str(2, uid) + f_str(3, namespace) + f_int(4, attempt))
                  + f_map(6, labels) + f_map(7, annotations)
                  + f_bytes(8, f_str(1, cgroup_parent) + f_bytes(2, f_bytes(1, namespace_options()))))
        # RunPodSandboxRequest{1 config, 2 runtime_handler}; RunPodSandboxResponse{1 pod_sandbox_id}
        answer = self.call("RunPodSandbox", f_bytes(1, config))
        return Pod(field(answer, 1).decode(), config, name, namespace, uid, cgroup_parent)

    def stop_pod_sandbox(self, sandbox_id):
        self.call("StopPodSandbox", f_str(1, sandbox_id))          # {1 pod_sandbox_id}

    def remove_pod_sandbox(self, sandbox_id):
        self.call("RemovePodSandbox", f_str(1, sandbox_id))        # {1 pod_sandbox_id}

    def list_pod_sandboxes(self):
        # ListPodSandboxRequest{1 filter}; ListPodSandboxResponse{1 items: PodSandbox{1 id,
        #   2 metadata{1 name, 2 uid, 3 namespace}, 3 state, 5 labels}}
        answer = self.call("ListPodSandbox", b"")
        pods = []
        for item in repeated(answer, 1):
            meta = field(item, 2)
            pods.append({"id": field(item, 1).decode(), "name": field(meta, 1).decode(),
                         "uid": field(meta, 2).decode(), "namespace": field(meta, 3).decode(),
                         "state": SANDBOX_STATES.get(field(item, 3, 0), "?"), "labels": decode_map(item, 5)})
        return pods

    # Containers -----------------------------------------------------------------

    def create_container(self, pod, name, image, command=(), args=(), envs=None, cpuset="", cpu_shares=0,
                         cpu_quota=0, cpu_period=0, memory=0, attempt=0, labels=None, annotations=None):
        """CreateContainer as the kubelet sends it: its labels name the pod and
        the container, its linux.resources carry the CPU manager's cpuset."""
        labels = dict({"io.kubernetes.container.name": name, "io.kubernetes.pod.name": pod.name,
                       "io.kubernetes.pod.namespace": pod.namespace, "io.kubernetes.pod.uid": pod.uid},
                      **(labels or {}))
        annotations = dict({"io.kubernetes.container.restartCount": str(attempt),
                            "io.kubernetes.container.terminationMessagePath": "/dev/termination-log"},
                           **(annotations or {}))
        # ContainerConfig{1 metadata{1 name, 2 attempt}, 2 image: ImageSpec{1 image}, 3 command, 4 args,
        #   6 envs: KeyValue{1 key, 2 value}, 9 labels, 10 annotations,
        #   15 linux: LinuxContainerConfig{1 resources, 2 security_context{3 namespace_options}}}
        config = (f_bytes(1, f_str(1, name) + f_int(2, attempt)) + f_bytes(2, f_str(1, image))
                  + f_strs(3, command) + f_strs(4, args)
                  + b"".join(f_bytes(6, f_str(1, k) + f_str(2, v)) for k, v in (envs or {}).items())
                  + f_map(9, labels) + f_map(10, annotations)
                  + f_bytes(15, f_bytes(1, linux_resources(cpuset, cpu_shares, cpu_quota, cpu_period, memory))
                            + f_bytes(2, f_bytes(3, namespace_options()))))
        # CreateContainerRequest{1 pod_sandbox_id, 2 config, 3 sandbox_config}; Response{1 container_id}
        answer = self.call("CreateContainer", f_str(1, pod.id) + f_bytes(2, config) + f_bytes(3, pod.config))
        return field(answer, 1).decode()

    def start_container(self, container_id):
        self.call("StartContainer", f_str(1, container_id))        # {1 container_id}

    def update_container_resources(self, container_id, cpuset="", cpu_shares=0, cpu_quota=0, cpu_period=0):
        """The kubelet's CPU manager sends only cpuset_cpus; an in-place resize only shares/quota."""
        # UpdateContainerResourcesRequest{1 container_id, 2 linux: LinuxContainerResources}
        self.call("UpdateContainerResources", f_str(1, container_id)
                  + f_bytes(2, linux_resources(cpuset, cpu_shares, cpu_quota, cpu_period)))

    def stop_container(self, container_id, timeout=0):
        # StopContainerRequest{1 container_id, 2 timeout (s)}: 0 = SIGKILL at once
        self.call("StopContainer", f_str(1, container_id) + f_int(2, timeout))

    def remove_container(self, container_id):
        self.call("RemoveContainer", f_str(1, container_id))       # {1 container_id}

    def container_status(self, container_id):
        """{id, name, state, cpuset (as containerd has it), pid (0 when not running), info}."""
        # ContainerStatusRequest{1 container_id, 2 verbose}; ContainerStatusResponse{1 status, 2 info map}
        answer = self.call("ContainerStatus", f_str(1, container_id) + f_int(2, True))
        # ContainerStatus{1 id, 2 metadata{1 name}, 3 state, 16 resources: ContainerResources{1 linux{6 cpuset_cpus}}}
        status = field(answer, 1)
        info = decode_map(answer, 2)
        verbose = json.loads(info.get("info") or "{}")   # containerd's verbose info: pid, runtimeSpec, ...
        return {"id": field(status, 1).decode(), "name": field(field(status, 2), 1).decode(),
                "state": CONTAINER_STATES.get(field(status, 3, 0), "?"),
                "cpuset": field(field(field(status, 16), 1), 6).decode(),
                "pid": int(verbose.get("pid") or 0), "info": verbose}

    def list_containers(self, pod_sandbox_id="", state=None):
        # ListContainersRequest{1 filter: ContainerFilter{2 state: ContainerStateValue{1 state}, 3 pod_sandbox_id}}
        flt = f_str(3, pod_sandbox_id)
        if state is not None:
            flt += f_bytes(2, f_int(1, {v: k for k, v in CONTAINER_STATES.items()}[state]))
        answer = self.call("ListContainers", f_bytes(1, flt))
        # ListContainersResponse{1 containers: Container{1 id, 2 pod_sandbox_id, 3 metadata{1 name}, 6 state, 8 labels}}
        return [{"id": field(c, 1).decode(), "pod_sandbox_id": field(c, 2).decode(),
                 "name": field(field(c, 3), 1).decode(), "state": CONTAINER_STATES.get(field(c, 6, 0), "?"),
                 "labels": decode_map(c, 8)} for c in repeated(answer, 1)]

    def remove_everything(self):
        """Every container, then every sandbox: what a test leaves behind, even after a failure."""
        for container in self.list_containers():
            try:
                self.stop_container(container["id"])
                self.remove_container(container["id"])
            except grpc.RpcError:
                pass
        for pod in self.list_pod_sandboxes():
            try:
                self.stop_pod_sandbox(pod["id"])
                self.remove_pod_sandbox(pod["id"])
            except grpc.RpcError:
                pass


# -- what the kernel says -------------------------------------------------------

def read_env_file(path):
    """tools/ci/containerd.sh's DIR/env: {KEY: value}."""
    with open(path) as f:
        return dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)


def cgroup_root():
    """Where the cpuset controller is: its v1 hierarchy, else the v2 unified one."""
    return "/sys/fs/cgroup/cpuset" if os.path.isdir("/sys/fs/cgroup/cpuset") else "/sys/fs/cgroup"


def container_cgroup(cgroup_parent, container_id):
    """containerd's cgroup for a container under the cgroupfs driver: <parent>/<id>."""
    return os.path.join(cgroup_root(), cgroup_parent.lstrip("/"), container_id)


def container_cgroup_cpus(cgroup_parent, container_id):
    with open(os.path.join(container_cgroup(cgroup_parent, container_id), "cpuset.cpus")) as f:
        return f.read().strip()


def cgroup_pids(cgroup_parent, container_id):
    """The processes in a container's cgroup: its pid where ContainerStatus has none."""
    with open(os.path.join(container_cgroup(cgroup_parent, container_id), "cgroup.procs")) as f:
        return [int(line) for line in f if line.strip()]


def cgroup_of(pid):
    """The process's cpuset cgroup path, from /proc/PID/cgroup (v1 "N:cpuset:/p", else v2 "0::/p")."""
    with open("/proc/%d/cgroup" % pid) as f:
        lines = [line.rstrip("\n").split(":", 2) for line in f]
    for _, controllers, path in lines:
        if "cpuset" in controllers.split(","):
            return path
    return next(path for _, controllers, path in lines if controllers == "")


def remove_cgroups(cgroup_parent):
    """rmdir a pod's cgroup and what is under it, in every hierarchy: runc
    removes a container's own cgroups, never the parents it made for it."""
    bases = [os.path.join("/sys/fs/cgroup", d) for d in os.listdir("/sys/fs/cgroup")] + ["/sys/fs/cgroup"]
    for base in bases:
        top = os.path.join(base, cgroup_parent.strip("/"))
        if not os.path.isdir(top) or os.path.islink(base):
            continue
        for path, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):   # deepest first
            try:
                os.rmdir(path)
            except OSError:
                pass


def cpus_allowed_list(pid):
    """Where the process may run: Cpus_allowed_list of /proc/PID/status."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    raise ValueError("no Cpus_allowed_list for pid %d" % pid)


# -- benchmark ------------------------------------------------------------------

def time_create_container(client, pod, image, count, cpuset="", envs=None, name="bench"):
    """Seconds of each of `count` CreateContainer calls into `pod`, each container
    removed again outside the timing (a growing store would skew later calls).
    Interleaving runs with and without a plugin is the caller's business."""
    samples = []
    for i in range(count):
        started = time.perf_counter()
        container_id = client.create_container(pod, "%s-%d" % (name, i), image, command=["/bin/sleep", "3600"],
                                               envs=envs, cpuset=cpuset)
        samples.append(time.perf_counter() - started)
        client.remove_container(container_id)
    return samples


def percentiles(samples):
    """{p50, p99, max} in ms, and n."""
    ordered = sorted(samples)

    def at(q):
        return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)
    return {"p50": at(0.50), "p99": at(0.99), "max": at(1.0), "n": len(ordered)}


def main(argv):
    if len(argv) < 2 or argv[1] not in ("version", "ps", "bench"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    client = CriClient(argv[0])
    if argv[1] == "version":
        print(json.dumps(client.wait_ready()))
    elif argv[1] == "ps":
        for pod in client.list_pod_sandboxes():
            print("pod %s %s/%s %s" % (pod["id"][:12], pod["namespace"], pod["name"], pod["state"]))
        for c in client.list_containers():
            print("container %s %s pod %s %s" % (c["id"][:12], c["name"], c["pod_sandbox_id"][:12], c["state"]))
    else:
        count = int(argv[2])
        parent = "/%s/pod-bench" % (argv[3].strip("/") if len(argv) > 3 else "isolcpu-ci-bench")
        pod = client.run_pod_sandbox("bench", uid=str(uuid.uuid4()), cgroup_parent=parent)
        try:
            envs = {"VAR_%02d" % i: "value-%02d" % i for i in range(30)}     # a typical pod's size
            image = os.environ.get("CONTAINERD_IMAGE", "localhost/isolcpu-ci/busybox:1")
            time_create_container(client, pod, image, 3, "0", envs)        # warm caches
            print(json.dumps(percentiles(time_create_container(client, pod, image, count, "0", envs))))
        finally:
            client.stop_pod_sandbox(pod.id)
            client.remove_pod_sandbox(pod.id)
            remove_cgroups(parent)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
