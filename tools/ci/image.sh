#!/usr/bin/env bash
# image.sh: build the Containerfile as CI can (buildah, chroot isolation, vfs
# storage, no pulls) on a Debian 12 base made by debootstrap and tagged with
# the Containerfile's FROM name; then run the image's --list --json against a
# fake sysfs tree and the test suite inside the image, and print the image's
# size above its base.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${ISOLCPU_CI_WORK:-/tmp/isolcpu-ci}
BASE=$(sed -n 's/^FROM[[:space:]]\+//p' "$ROOT/Containerfile" | head -n 1)
IMAGE=localhost/isolcpu-plugin:ci
B=(buildah --storage-driver vfs)
export GRPC_VERBOSITY=ERROR
mkdir -p "$WORK"
command -v buildah >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah >/dev/null; }

rootfs_bytes() {     # the uncompressed size of an image's root filesystem
    local ctr mnt
    ctr=$("${B[@]}" from "$1")
    mnt=$("${B[@]}" mount "$ctr")
    du -sb "$mnt" | cut -f1
    "${B[@]}" umount "$ctr" >/dev/null
    "${B[@]}" rm "$ctr" >/dev/null
}

echo "base $BASE"
if ! "${B[@]}" inspect --type image "$BASE" >/dev/null 2>&1; then
    "$ROOT/tools/ci/debian-root.sh" bookworm "$WORK/base"
    ctr=$("${B[@]}" from scratch)
    mnt=$("${B[@]}" mount "$ctr")
    cp -a "$WORK/base/." "$mnt/"
    "${B[@]}" umount "$ctr" >/dev/null
    "${B[@]}" config --cmd /bin/bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
    "${B[@]}" commit -q --rm "$ctr" "$BASE" >/dev/null
    echo "base made by debootstrap and tagged $BASE"
fi

echo "build $IMAGE"
"${B[@]}" build --isolation chroot --pull=never -q -t "$IMAGE" -f "$ROOT/Containerfile" "$ROOT" >"$WORK/image-build.log" 2>&1 \
    || { tail -n 40 "$WORK/image-build.log"; exit 1; }
entrypoint=$("${B[@]}" inspect --type image --format '{{.OCIv1.Config.Entrypoint}}' "$IMAGE")
[ "$entrypoint" = '[/usr/bin/python3 -m isolcpu_plugin]' ] || { echo "unexpected ENTRYPOINT $entrypoint"; exit 1; }

ctr=$("${B[@]}" from "$IMAGE")
trap '"${B[@]}" rm "$ctr" >/dev/null 2>&1 || true' EXIT
run=("${B[@]}" run --isolation chroot)

echo "the image's --list --json on a fake sysfs tree"
fake=$WORK/fake-host
rm -rf "$fake"
(cd "$ROOT" && python3 -c 'import sys, test_isolcpu_plugin as t; t.fake_host(sys.argv[1], sockets=2, cores=2, isolated="2-3,6-7", node_ids=[0, 1])' "$fake")
"${run[@]}" -v "$fake:/host:ro" "$ctr" -- /usr/bin/python3 /app/isolcpu_plugin.py \
    --sysfs /host/sys --procfs /host/proc --list --json >"$WORK/image-list.json"
python3 - "$WORK/image-list.json" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
got = [(d["id"], d["numa_nodes"], d["thread_siblings"]) for d in data["devices"]]
want = [("2", [1], [2, 6]), ("3", [1], [3, 7]), ("6", [1], [2, 6]), ("7", [1], [3, 7])]
assert data["resource_name"] == "windriver.com/isolcpus" and got == want, got
print("  %d devices: %s" % (len(got), ", ".join(d[0] for d in got)))
PY

echo "the test suite inside the image (the test file copied into a working container)"
"${B[@]}" copy "$ctr" "$ROOT/test_isolcpu_plugin.py" /app/ >/dev/null
"${run[@]}" "$ctr" -- /usr/bin/python3 -m isolcpu_plugin --version          # the entry point's way
probed=$("${run[@]}" "$ctr" -- /usr/bin/python3 -m isolcpu_plugin --probe --device-plugin-path /tmp 2>&1 || true)
grep -q 'does not exist' <<<"$probed" || { echo "the DaemonSet's probe command does not run in the image: $probed"; exit 1; }
CORPUS=${ISOLCPU_TEST_CORPUS:-$ROOT/../shared/fixtures/sysfs}
corpus=()
[ -d "$CORPUS" ] && corpus=(-v "$(cd "$CORPUS" && pwd):/corpus:ro" --env ISOLCPU_TEST_CORPUS=/corpus)
"${run[@]}" "${corpus[@]}" --workingdir /app "$ctr" -- /usr/bin/python3 -m unittest >"$WORK/image-tests.log" 2>&1 \
    || { tail -n 60 "$WORK/image-tests.log"; exit 1; }
echo "  $(grep -E '^(Ran|OK|FAILED)' "$WORK/image-tests.log" | tr '\n' ' ')"

base_bytes=$(rootfs_bytes "$BASE")
image_bytes=$(rootfs_bytes "$IMAGE")
python3 -c 'import sys; b, i = int(sys.argv[1]), int(sys.argv[2]); print("image %.1f MB, base %.1f MB: %.1f MB above its base" % (i / 1e6, b / 1e6, (i - b) / 1e6))' \
    "$base_bytes" "$image_bytes"
