#!/usr/bin/env bash
# debian-root.sh SUITE DIR [PACKAGE...]
# Fills DIR with a Debian SUITE root filesystem: debootstrap's minbase plus
# PACKAGEs from that suite's own apt (debootstrap --include cannot resolve
# trixie's virtual packages, apt can). Made once, then reused from a tarball in
# $ISOLCPU_CI_CACHE (default /var/cache/isolcpu-ci) for a week.
set -euo pipefail
suite=$1 dir=$2
shift 2
cache=${ISOLCPU_CI_CACHE:-/var/cache/isolcpu-ci}
key=$suite
[ $# -eq 0 ] || key=$key$(printf -- '-%s' "$@")
tarball=$cache/$key.tar
mkdir -p "$cache"
rm -rf "$dir" && mkdir -p "$dir"
if [ -f "$tarball" ] && [ -n "$(find "$tarball" -mtime -7)" ]; then
    tar -C "$dir" -xf "$tarball"
    echo "$key: root filesystem from $tarball"
    exit 0
fi
command -v debootstrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
made=
for mirror in http://deb.debian.org/debian http://archive.debian.org/debian; do   # old suites move to the archive
    if debootstrap --variant=minbase "$suite" "$dir" "$mirror" >"$dir.log" 2>&1; then
        made=$mirror
        break
    fi
    rm -rf "$dir" && mkdir -p "$dir"
done
[ -n "$made" ] || { echo "debootstrap $suite failed; see $dir.log" >&2; exit 1; }
if [ $# -gt 0 ]; then
    chroot "$dir" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >>"$dir.log" 2>&1 \
        || { echo "apt-get install $* in $suite failed; see $dir.log" >&2; exit 1; }
fi
chroot "$dir" apt-get clean
rm -rf "$dir"/var/lib/apt/lists/*
tar -C "$dir" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
echo "$key: root filesystem made from $made, cached in $tarball"
