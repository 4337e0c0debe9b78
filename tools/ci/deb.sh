#!/usr/bin/env bash
# deb.sh: the Debian package, from build to purge. Builds it (tools/build-deb.sh),
# runs lintian (no error, no warning that is not overridden), then in the
# Debian 12 root the matrix uses (debian-root.sh, cached): installs a stand-in
# for the Go plugin's isolcpus-device-plugin, installs ours with
# `apt-get install ./dist/...deb` (which must replace it), runs
# `isolcpu-plugin --version` and `--list --json --cpus 0`, checks the unit
# was enabled under both names and the modules byte-compiled, removes it (the
# conffile stays), purges it, and checks that nothing is left: every path
# `dpkg -L` listed is gone and the root is as it was before.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${ISOLCPU_CI_WORK:-/tmp/isolcpu-ci}
TARGET=$WORK/debian12
mkdir -p "$WORK"

deb=$("$ROOT/tools/build-deb.sh")
echo "built $deb ($(du -h "$deb" | cut -f1))"
lintian --version
lintian --fail-on error,warning --display-info --show-overrides "$deb" 2>&1 | grep -v '^N:' | sed 's/^/  /' || true
lintian --fail-on error,warning "$deb" >/dev/null 2>&1 || { echo "lintian: errors or warnings not overridden"; exit 1; }
echo "lintian: no errors; every warning overridden with its reason"

# a fresh root each time (from debian-root.sh's cached tarball): a run must not see the last one's traces
for tree in proc sys dev; do mountpoint -q "$TARGET/$tree" && umount -l "$TARGET/$tree"; done
"$ROOT/tools/ci/debian-root.sh" bookworm "$TARGET" python3-grpcio python3-protobuf >/dev/null
mounts=()
cleanup() { for m in "${mounts[@]}"; do umount -l "$m" 2>/dev/null || true; done; }
trap cleanup EXIT
for tree in proc sys dev; do
    if ! mountpoint -q "$TARGET/$tree"; then
        if [ $tree = proc ]; then mount -t proc proc "$TARGET/proc"; else mount --rbind "/$tree" "$TARGET/$tree" && mount --make-rslave "$TARGET/$tree"; fi
        mounts+=("$TARGET/$tree")
    fi
done
in_root() { chroot "$TARGET" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root DEBIAN_FRONTEND=noninteractive "$@"; }
snapshot() {        # every path of the root but the volatile ones and package-manager state
    (cd "$TARGET" && find . -xdev \( -path ./proc -o -path ./sys -o -path ./dev -o -path ./tmp -o -path ./run \
        -o -path ./var/lib/dpkg -o -path ./var/lib/apt -o -path ./var/cache -o -path ./var/log \) -prune -o -print \
        | LC_ALL=C sort)
}
fail() { echo "deb: $*" >&2; exit 1; }

# a node has procps (the unit's ExecReload runs /bin/kill); the cached root may not
if [ ! -x "$TARGET/bin/kill" ]; then
    { in_root apt-get update -q && in_root apt-get install -y -q --no-install-recommends procps; } >"$WORK/deb-procps.log" 2>&1 \
        || { cat "$WORK/deb-procps.log"; fail "cannot install procps into the root"; }
fi
# a stand-in for the Go plugin's package: what it installs, as NOTES.md says
old=$WORK/deb-go-plugin
rm -rf "$old" && mkdir -p "$old/DEBIAN" "$old/usr/local/sbin" "$old/lib/systemd/system"
printf '#!/bin/sh\nexit 0\n' >"$old/usr/local/sbin/isolcpu_plugin" && chmod 0755 "$old/usr/local/sbin/isolcpu_plugin"
printf '[Unit]\nDescription=the Go isolcpus plugin\n[Service]\nExecStart=/usr/local/sbin/isolcpu_plugin\n' \
    >"$old/lib/systemd/system/isolcpu_plugin.service"
printf 'Package: isolcpus-device-plugin\nVersion: 1.0-1\nArchitecture: all\nMaintainer: stand-in <ci@example.com>\nDescription: stand-in for the Go plugin\n' \
    >"$old/DEBIAN/control"
dpkg-deb --root-owner-group --build "$old" "$TARGET/tmp/isolcpus-device-plugin.deb" >/dev/null

cp "$deb" "$TARGET/tmp/"
name=$(basename "$deb")

install_and_check() {       # install_and_check EXPECT_REPLACED: install, use, remove, purge; check each step
    in_root apt-get install -y -q "/tmp/$name" >"$WORK/deb-install.log" 2>&1 || { cat "$WORK/deb-install.log"; fail "apt-get install failed"; }
    if [ "$1" = yes ]; then
        grep -q 'Removing isolcpus-device-plugin' "$WORK/deb-install.log" || { cat "$WORK/deb-install.log"; fail "the Go plugin's package was not replaced"; }
        echo "apt-get install ./$name: installed, and it replaced isolcpus-device-plugin"
    else
        echo "apt-get install ./$name: installed"
    fi
    in_root dpkg -L isolcpu-plugin >"$WORK/deb-files.list"
    echo "  $(in_root isolcpu-plugin --version)"
    in_root isolcpu-plugin --list --json --cpus 0 >"$WORK/deb-list.json"
    python3 - "$WORK/deb-list.json" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
assert [d["id"] for d in data["devices"]] == ["0"], data
print("  --list --json --cpus 0: device 0, holders_source %s" % data["holders_source"])
PY
    for link in etc/systemd/system/kubelet.service.wants/isolcpu-plugin.service etc/systemd/system/isolcpu_plugin.service; do
        [ -L "$TARGET/$link" ] || fail "/$link was not made: the unit is not enabled under that name"
    done
    ls "$TARGET"/usr/lib/isolcpu-plugin/__pycache__/*.pyc >/dev/null 2>&1 || fail "the modules were not byte-compiled"
    echo "  enabled as isolcpu-plugin.service and isolcpu_plugin.service; modules byte-compiled"

    in_root apt-get remove -y -q isolcpu-plugin >"$WORK/deb-remove.log" 2>&1 || { cat "$WORK/deb-remove.log"; fail "apt-get remove failed"; }
    [ -f "$TARGET/etc/default/isolcpu-plugin" ] || fail "remove dropped the conffile /etc/default/isolcpu-plugin"
    [ ! -e "$TARGET/usr/lib/isolcpu-plugin" ] || fail "remove left /usr/lib/isolcpu-plugin: $(ls -A "$TARGET/usr/lib/isolcpu-plugin")"
    echo "apt-get remove: files gone, conffile kept"

    in_root apt-get purge -y -q isolcpu-plugin >"$WORK/deb-purge.log" 2>&1 || { cat "$WORK/deb-purge.log"; fail "apt-get purge failed"; }
    left=()
    while read -r path; do  # its files and links; directories (shared, /lib a link on merged /usr) by the snapshot
        [ -d "$TARGET$path" ] && continue
        { [ -e "$TARGET$path" ] || [ -L "$TARGET$path" ]; } && left+=("$path")
    done <"$WORK/deb-files.list"
    [ ${#left[@]} -eq 0 ] || fail "purge left what dpkg -L listed: ${left[*]}"
    echo "apt-get purge: conffile gone; none of the $(wc -l <"$WORK/deb-files.list") paths dpkg -L listed is left"
}

in_root dpkg -i /tmp/isolcpus-device-plugin.deb >/dev/null
install_and_check yes

# again on a root with nothing of either package: after the purge it is as it was
snapshot >"$WORK/deb-before.list"
install_and_check no
snapshot >"$WORK/deb-after.list"
if ! diff -u "$WORK/deb-before.list" "$WORK/deb-after.list" >"$WORK/deb-left.diff"; then
    cat "$WORK/deb-left.diff"
    fail "the root differs from before the install"
fi
echo "the root is as it was before the install, path for path"
if command -v systemd-analyze >/dev/null; then
    # on the host, as check-deploy.sh verifies deploy/: the root has no systemd to verify with; the
    # unit's ExecStart, /usr/sbin/isolcpu-plugin, ran above, so a stand-in takes its place here
    units=$(mktemp -d)
    dpkg-deb --fsys-tarfile "$deb" | tar -xO ./lib/systemd/system/isolcpu-plugin.service \
        | sed 's|^ExecStart=.*|ExecStart=/bin/true|' >"$units/isolcpu-plugin.service"
    printf '[Unit]\nDescription=stand-in for the kubelet\n[Service]\nExecStart=/bin/true\n' >"$units/kubelet.service"
    complaints=$(systemd-analyze verify "$units/isolcpu-plugin.service" "$units/kubelet.service" 2>&1 || true)
    rm -rf "$units"
    [ -z "$complaints" ] || { echo "$complaints"; fail "systemd-analyze verify complains about the packaged unit"; }
    echo "systemd-analyze verify: the packaged unit is clean"
fi
