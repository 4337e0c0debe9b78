#!/usr/bin/env bash
# containerd.sh: a real containerd with NRI on (Debian 13's 1.7, or one given by
# ISOLCPU_CI_CONTAINERD_BIN, below), for the tests that drive it through CRI as the
# kubelet does (tools/cri_client.py, RealContainerdTests).
#
#   containerd.sh start DIR     fetch (cached), write the config, start containerd
#                               in the background, import the image; DIR/env has the paths
#   containerd.sh restart DIR   containerd only, same dirs: shims and containers keep running
#   containerd.sh stop DIR      every container and sandbox killed, containerd stopped,
#                               mounts and cgroups gone, DIR removed
#   containerd.sh fetch         only fill the cache
#
# Debian 12 has no containerd with NRI (1.6.20); Debian 13's 1.7.24 runs here as it
# is. runc is Debian 12's: trixie's needs glibc 2.38. The only image is a one-layer
# OCI layout around Debian 12's busybox-static, written here: no registry. The
# binaries are cached in $ISOLCPU_CI_CACHE (else $ISOLCPU_CI_WORK, default
# /tmp/isolcpu-ci) for a week.
#
# ISOLCPU_CI_CONTAINERD_BIN=DIR: run the containerd, containerd-shim-runc-v2 and ctr
# in DIR instead of Debian's (say a containerd 2.x built by hand; nothing here builds
# one); runc and busybox still come from the cache. Unset: Debian 13's, as above.
# The config is written for the version that `containerd --version` reports: 1.x
# gets config version 2, 2.x version 3 (its CRI plugins split in two, see write_config).
#
# DIR/env (KEY=VALUE lines, shell- and Python-readable):
#   CONTAINERD_SOCKET       containerd's gRPC socket, where CRI runtime.v1 is served
#   CONTAINERD_NRI_SOCKET   the NRI socket plugins connect to
#   CONTAINERD_PID          the running containerd (changes on restart)
#   CONTAINERD_IMAGE        the image for containers (also the sandbox image)
#   CONTAINERD_CGROUP_ROOT  cgroup parent under which pods must go (stop removes it)
#   CONTAINERD_BIN, CONTAINERD_CONFIG, CONTAINERD_LOG, CONTAINERD_VERSION, CONTAINERD_DIR
set -euo pipefail
WORK=${ISOLCPU_CI_WORK:-/tmp/isolcpu-ci}
CACHE=${ISOLCPU_CI_CACHE:-$WORK}/containerd
BIN=$CACHE/bin
CDBIN=${ISOLCPU_CI_CONTAINERD_BIN:-$BIN}    # containerd, its shim and ctr
IMAGE_NAME=localhost/isolcpu-ci/busybox:1

fail() { echo "containerd.sh: $*" >&2; exit 1; }
usage() { fail "usage: containerd.sh start|restart|stop DIR, or containerd.sh fetch"; }

fetch() {   # the binaries, once a week; a failed refresh keeps the old ones
    if [ -x "$BIN/containerd" ] && [ -n "$(find "$CACHE/versions" -mtime -7 2>/dev/null)" ]; then
        return 0
    fi
    local new=$CACHE.new
    local apt=$new/apt debs=$new/debs tree=$new/tree
    rm -rf "$new" && mkdir -p "$apt/state/lists/partial" "$apt/cache/archives/partial" "$debs" "$tree" "$new/bin"
    # a private apt: its own sources, lists and cache, so the host's apt is untouched
    cat >"$apt/sources.list" <<'EOF'
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
EOF
    touch "$apt/state/status"
    local opts=(-o Dir::Etc::sourcelist="$apt/sources.list" -o Dir::Etc::sourceparts=/nonexistent
                -o Dir::State="$apt/state" -o Dir::State::status="$apt/state/status"
                -o Dir::Cache="$apt/cache" -o APT::Sandbox::User=root)
    if ! { apt-get "${opts[@]}" update -qq &&
           (cd "$debs" && apt-get "${opts[@]}" download containerd/trixie runc/bookworm busybox-static/bookworm); } \
           >"$new/apt.log" 2>&1; then
        cat "$new/apt.log" >&2
        [ -x "$BIN/containerd" ] || fail "apt-get could not fetch containerd, runc, busybox-static"
        echo "containerd.sh: apt-get failed; using the cached packages" >&2
        rm -rf "$new"
        return 0
    fi
    for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$tree"; done
    cp "$tree"/usr/bin/{containerd,containerd-shim-runc-v2,ctr} "$tree/usr/sbin/runc" "$tree/bin/busybox" "$new/bin/"
    # shellcheck disable=SC2016  # dpkg-deb expands ${Package}, not the shell
    for deb in "$debs"/*.deb; do dpkg-deb -W --showformat='${Package} ${Version}\n' "$deb"; done >"$new/versions"
    rm -rf "$apt" "$debs" "$tree"
    rm -rf "$CACHE" && mv "$new" "$CACHE"
}

image() {   # image DIR: DIR/busybox-oci.tar, a one-layer OCI image layout for `ctr images import`;
            # made afresh each start (50 ms), so it always is what this script says
    local layout=$1/oci rootfs=$1/rootfs arch digest size
    arch=$(dpkg --print-architecture)
    rm -rf "$layout" "$rootfs" && mkdir -p "$layout/blobs/sha256" "$rootfs/bin"
    mkdir -p "$rootfs"/{dev,proc,sys,etc,tmp,run}
    cp "$BIN/busybox" "$rootfs/bin/busybox"
    for applet in sh sleep cat grep; do ln -s busybox "$rootfs/bin/$applet"; done
    blob() {    # blob FILE: moved into blobs/sha256 under its digest; sets digest and size
        digest=$(sha256sum "$1" | cut -d' ' -f1)
        size=$(stat -c %s "$1")
        mv "$1" "$layout/blobs/sha256/$digest"
    }
    # a reproducible layer: same bytes, same digest, on every run
    tar -C "$rootfs" --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -cf "$layout/layer" .
    blob "$layout/layer"
    local layer=$digest layer_size=$size
    # the sandbox runs this too: a sleep (sandboxes are stopped with SIGKILL, so PID 1 ignoring SIGTERM is fine)
    cat >"$layout/config" <<EOF
{"architecture": "$arch", "os": "linux",
 "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sleep", "2147483647"]},
 "rootfs": {"type": "layers", "diff_ids": ["sha256:$layer"]}}
EOF
    blob "$layout/config"
    cat >"$layout/manifest" <<EOF
{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
 "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:$digest", "size": $size},
 "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "sha256:$layer", "size": $layer_size}]}
EOF
    blob "$layout/manifest"
    # io.containerd.image.name: the name `ctr images import` gives it
    cat >"$layout/index.json" <<EOF
{"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
  "digest": "sha256:$digest", "size": $size, "platform": {"architecture": "$arch", "os": "linux"},
  "annotations": {"io.containerd.image.name": "$IMAGE_NAME", "org.opencontainers.image.ref.name": "1"}}]}
EOF
    echo '{"imageLayoutVersion": "1.0.0"}' >"$layout/oci-layout"
    tar -C "$layout" --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -cf "$1/busybox-oci.tar" .
    rm -rf "$layout" "$rootfs"
}

config_common() {       # config_common DIR VERSION: the settings every version writes alike
    cat <<EOF
# written by tools/ci/containerd.sh: every path under $1, so nothing of a node's containerd is touched
version = $2
root = "$1/root"
state = "$1/state"
[grpc]
  address = "$1/containerd.sock"
[ttrpc]
  address = "$1/containerd.sock.ttrpc"
[debug]
  level = "info"
[plugins."io.containerd.internal.v1.opt"]
  path = "$1/opt"
[plugins."io.containerd.nri.v1.nri"]
  disable = false
  socket_path = "$1/nri/nri.sock"
  plugin_path = "$1/nri/plugins"
  plugin_config_path = "$1/nri/conf.d"
  plugin_registration_timeout = "5s"
  plugin_request_timeout = "2s"
  disable_connections = false
EOF
}

write_config() {
    local dir=$1 major
    mkdir -p "$dir"/{root,state,nri/plugins,nri/conf.d,cni/bin,cni/net.d,opt}
    # containerd 2.x reads config version 3, where the CRI plugin's settings moved to
    # io.containerd.cri.v1.images and io.containerd.cri.v1.runtime (it would migrate a
    # version 2 in memory, with a warning); the NRI section is named as in 1.7
    major=$("$CDBIN/containerd" --version | awk '{ v = $3; sub(/^v/, "", v); split(v, n, "."); print n[1] }')
    if [ "$major" -ge 2 ]; then write_config_v3 "$dir"; return; fi
    { config_common "$dir" 2; cat <<EOF
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$IMAGE_NAME"
  # no CAP_SYS_RESOURCE on these machines: runc fails on the sandbox's oom_score_adj -998 otherwise
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "$BIN/runc"
        Root = "$dir/runc"
        SystemdCgroup = false
  # pods are in the host's network namespace: no CNI is ever called
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$dir/cni/bin"
    conf_dir = "$dir/cni/net.d"
EOF
    } >"$dir/config.toml"
}

write_config_v3() {     # the same settings for containerd 2.x (2.3 reads version 4 and migrates a 3 in
                        # memory with a warning: 4 only moved [debug] address to a plugin, unused here)
    local dir=$1
    { config_common "$dir" 3; cat <<EOF
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "$IMAGE_NAME"
[plugins."io.containerd.cri.v1.runtime"]
  # no CAP_SYS_RESOURCE on these machines: runc fails on the sandbox's oom_score_adj -998 otherwise
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "$BIN/runc"
        Root = "$dir/runc"
        SystemdCgroup = false
  # pods are in the host's network namespace: no CNI is ever called (bin_dir: 2.0 has no
  # bin_dirs; 2.2+ logs bin_dir as deprecated but honours it)
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dir = "$dir/cni/bin"
    conf_dir = "$dir/cni/net.d"
EOF
    } >"$dir/config.toml"
}

env_value() { sed -n "s/^$2=//p" "$1/env" 2>/dev/null; }

alive() {   # alive PID DIR: PID is the containerd serving DIR
    [ -n "$1" ] && tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline" | grep -qF -- "--config $2/config.toml"
}

launch() {  # containerd in the background, its own session (it outlives this script); waits for CRI
    local dir=$1 pid start=$SECONDS
    : >>"$dir/containerd.log"
    local lines
    lines=$(wc -l <"$dir/containerd.log")
    # PATH: containerd finds containerd-shim-runc-v2 there
    PATH=$CDBIN:$BIN:$PATH setsid "$CDBIN/containerd" --config "$dir/config.toml" </dev/null >>"$dir/containerd.log" 2>&1 &
    pid=$!
    # ready = serving gRPC and the CRI plugin past its start (before that, CRI calls
    # fail with "server is not initialized yet")
    # (awk reads the file itself: `tail | grep -q` under pipefail fails when grep stops early)
    while ! awk -v from="$lines" 'NR > from && /containerd successfully booted/ { found = 1 } END { exit !found }' \
            "$dir/containerd.log"; do
        kill -0 "$pid" 2>/dev/null || { tail -n 30 "$dir/containerd.log"; fail "containerd exited while starting"; }
        [ $((SECONDS - start)) -lt 30 ] || { tail -n 30 "$dir/containerd.log"; kill -9 "$pid"; fail "containerd not ready in 30 s"; }
        sleep 0.05
    done
    [ -S "$dir/nri/nri.sock" ] || { tail -n 30 "$dir/containerd.log"; fail "no NRI socket at $dir/nri/nri.sock"; }
    cat >"$dir/env" <<EOF
CONTAINERD_DIR=$dir
CONTAINERD_SOCKET=$dir/containerd.sock
CONTAINERD_NRI_SOCKET=$dir/nri/nri.sock
CONTAINERD_PID=$pid
CONTAINERD_IMAGE=$IMAGE_NAME
CONTAINERD_CGROUP_ROOT=/isolcpu-ci-$(basename "$dir")
CONTAINERD_BIN=$CDBIN
CONTAINERD_CONFIG=$dir/config.toml
CONTAINERD_LOG=$dir/containerd.log
CONTAINERD_VERSION=$("$CDBIN/containerd" --version | cut -d' ' -f3)   # one word: the file is sourced by shells too
EOF
}

# restart and stop run the containerd that start ran, whatever ISOLCPU_CI_CONTAINERD_BIN says now
started_bin() { CDBIN=$(env_value "$1" CONTAINERD_BIN); CDBIN=${CDBIN:-$BIN}; }

ctr_() { "$CDBIN/ctr" --address "$1/containerd.sock" -n k8s.io "${@:2}"; }

start() {
    local dir=$1 begin=$SECONDS
    if alive "$(env_value "$dir" CONTAINERD_PID)" "$dir"; then fail "containerd already runs for $dir"; fi
    fetch
    [ -x "$CDBIN/containerd" ] || fail "no containerd in $CDBIN (ISOLCPU_CI_CONTAINERD_BIN)"
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    # unix socket paths are limited to 107 bytes; the longest here is containerd.sock.ttrpc
    [ ${#dir} -le 80 ] || fail "$dir is too long a path for its sockets (80 characters at most)"
    write_config "$dir"
    launch "$dir"
    image "$dir"
    ctr_ "$dir" images import --platform "linux/$(dpkg --print-architecture)" "$dir/busybox-oci.tar" >"$dir/import.log" 2>&1 \
        || { cat "$dir/import.log"; fail "ctr images import failed"; }
    # into a file, not a pipe: grep -q stops reading at the first match, and with
    # pipefail ctr's SIGPIPE would fail a check that passed
    ctr_ "$dir" images check >"$dir/check.log" 2>&1 || { cat "$dir/check.log"; fail "ctr images check failed"; }
    grep -qF "$IMAGE_NAME" "$dir/check.log" || fail "$IMAGE_NAME not in the image store after the import"
    local what
    what=$(paste -sd, "$CACHE/versions" | sed 's/,/, /g')
    # a containerd of ISOLCPU_CI_CONTAINERD_BIN: its own version first (the cache's is not the one running)
    [ -z "${ISOLCPU_CI_CONTAINERD_BIN:-}" ] || what="containerd $(env_value "$dir" CONTAINERD_VERSION) from $CDBIN, with $what"
    echo "$what: containerd with NRI at $dir/nri/nri.sock," \
         "pid $(env_value "$dir" CONTAINERD_PID), ready in $((SECONDS - begin)) s; env in $dir/env"
}

terminate() {   # terminate PID: SIGTERM, then SIGKILL after 10 s; waits for it to be gone
    local pid=$1 waited=0
    kill "$pid" 2>/dev/null || return 0
    while [ $waited -lt 200 ]; do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.05; waited=$((waited + 1)); done
    kill -9 "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
}

restart() {
    local dir pid
    dir=$(cd "$1" && pwd)
    started_bin "$dir"
    pid=$(env_value "$dir" CONTAINERD_PID)
    alive "$pid" "$dir" && terminate "$pid"
    launch "$dir"
    echo "containerd restarted for $dir, pid $(env_value "$dir" CONTAINERD_PID)"
}

stop() {        # best effort at every step: it also cleans up after a failed start
    local dir=$1 pid id cg
    [ -d "$dir" ] || return 0
    dir=$(cd "$dir" && pwd)
    # it removes DIR: only one that start made (or left empty)
    [ -f "$dir/config.toml" ] || [ -z "$(ls -A "$dir")" ] || fail "$dir is not a containerd.sh dir; not touching it"
    cg=/isolcpu-ci-$(basename "$dir")
    started_bin "$dir"
    pid=$(env_value "$dir" CONTAINERD_PID)
    if alive "$pid" "$dir"; then
        # containers and sandboxes alike are containerd containers: kill each task, delete it
        for id in $(ctr_ "$dir" tasks ls -q 2>/dev/null); do
            ctr_ "$dir" tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
        done
        for id in $(ctr_ "$dir" tasks ls -q 2>/dev/null); do
            ctr_ "$dir" tasks delete -f "$id" >/dev/null 2>&1 || true
        done
        for id in $(ctr_ "$dir" containers ls -q 2>/dev/null); do
            ctr_ "$dir" containers delete "$id" >/dev/null 2>&1 || true
        done
        terminate "$pid"
    fi
    # what is left whatever state containerd was in: our shims (by their -address),
    # then any process still in our cgroups (a container whose shim died)
    local proc
    for proc in /proc/[0-9]*; do
        if tr '\0' ' ' 2>/dev/null <"$proc/cmdline" | grep -qF -- "-address $dir/containerd.sock "; then
            kill -9 "${proc#/proc/}" 2>/dev/null || true
        fi
    done
    { find /sys/fs/cgroup/*/"$cg" /sys/fs/cgroup/"$cg" -name cgroup.procs -exec cat {} + 2>/dev/null || true; } \
        | while read -r pid; do kill -9 "$pid" 2>/dev/null || true; done
    # mounts under DIR (rootfs overlays, sandbox shm), deepest first
    awk -v d="$dir/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r | while read -r m; do
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
    # cgroups: a removed container's dir may take a moment to empty
    local tries=0
    while [ $tries -lt 50 ]; do
        find /sys/fs/cgroup/*/"$cg" /sys/fs/cgroup/"$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
        ls -d /sys/fs/cgroup/*/"$cg" /sys/fs/cgroup/"$cg" >/dev/null 2>&1 || break
        sleep 0.1
        tries=$((tries + 1))
    done
    if ls -d /sys/fs/cgroup/*/"$cg" /sys/fs/cgroup/"$cg" >/dev/null 2>&1; then echo "containerd.sh: cgroups left under $cg" >&2; fi
    if awk -v d="$dir/" 'index($5, d) == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo; then
        fail "mounts left under $dir; not removing it"
    fi
    # the shims' sockets are in /run/containerd/s whatever the config says (containerd 1.7 and 2.x), named
    # sha256(<containerd address>/<namespace>/<id>); a killed shim leaves its own behind
    local bundle sock
    for bundle in "$dir"/state/io.containerd.runtime.v2.task/k8s.io/*; do
        [ -d "$bundle" ] || continue
        sock=/run/containerd/s/$(printf '%s' "$dir/containerd.sock/k8s.io/${bundle##*/}" | sha256sum | cut -d' ' -f1)
        [ ! -S "$sock" ] || rm -f "$sock"
    done
    rm -rf "$dir"
    # a node's containerd keeps its own socket in /run/containerd: an empty one is ours
    rmdir /run/containerd/s /run/containerd 2>/dev/null || true
    echo "containerd for $dir stopped; containers, mounts and cgroups removed"
}

[ $# -ge 1 ] || usage
case $1 in
    fetch) fetch; echo "cached in $CACHE: $(paste -sd, "$CACHE/versions" | sed 's/,/, /g')" ;;
    start) [ $# -eq 2 ] || usage; start "$2" ;;
    restart) [ $# -eq 2 ] || usage; restart "$2" ;;
    stop) [ $# -eq 2 ] || usage; stop "$2" ;;
    *) usage ;;
esac
