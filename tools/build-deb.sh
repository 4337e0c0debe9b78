#!/usr/bin/env bash
# build-deb.sh: build dist/isolcpu-plugin_<version>_all.deb from this checkout
# with dpkg-deb alone (no network, no debhelper). The version is the module's
# __version__, which must match deploy/debian/changelog. What the package holds:
#   /usr/lib/isolcpu-plugin/     the three runtime files (byte-compiled by postinst)
#   /usr/sbin/isolcpu-plugin     runs that module, byte-compiled, as __main__ with /usr/bin/python3
#   /lib/systemd/system/isolcpu-plugin.service   (Alias=isolcpu_plugin.service, the Go plugin's name)
#   /etc/default/isolcpu-plugin  a conffile, every line commented, one per option
#   /usr/share/man/man8/isolcpu-plugin.8.gz, /usr/share/doc/isolcpu-plugin/{copyright,changelog.gz}
#   /usr/share/doc/isolcpu-plugin/examples/notify-reload.conf   the drop-in for systemd 253+
# MAINTAINER="Name <mail>" overrides the Maintainer field.
set -euo pipefail
umask 022
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEB=$ROOT/deploy/debian
version=$(python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); import isolcpu_plugin; print(isolcpu_plugin.__version__)' "$ROOT")
changelog_version=$(sed -n '1s/^isolcpu-plugin (\([^)]*\)).*/\1/p' "$DEB/changelog")
[ "$version" = "$changelog_version" ] || { echo "build-deb: __version__ $version but deploy/debian/changelog says $changelog_version" >&2; exit 1; }
date_line=$(sed -n 's/^ -- .*  \(.*\)$/\1/p' "$DEB/changelog" | head -n 1)
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(date -d "$date_line" +%s)}
maintainer=${MAINTAINER:-$(sed -n 's/^ -- \(.*\)  .*$/\1/p' "$DEB/changelog" | head -n 1)}

stage=$ROOT/build/deb
rm -rf "$stage"
lib=$stage/usr/lib/isolcpu-plugin doc=$stage/usr/share/doc/isolcpu-plugin
mkdir -p "$lib" "$stage/usr/sbin" "$stage/lib/systemd/system" "$stage/etc/default" "$doc" \
         "$stage/usr/share/man/man8" "$stage/usr/share/lintian/overrides" "$stage/DEBIAN"

# the runtime files; the module runs with the distro's Python, as dh_python3 would make it
sed '1s|^#!.*|#!/usr/bin/python3|' "$ROOT/isolcpu_plugin.py" >"$lib/isolcpu_plugin.py"
chmod 0755 "$lib/isolcpu_plugin.py"
install -m 0644 "$ROOT/deviceplugin_pb2.py" "$ROOT/deviceplugin_pb2_grpc.py" "$lib/"
# the entry point runs the byte-compiled module (run as a script, Python would compile
# all of it at every start and keep ~8 MiB more); the module holds its signals from its
# first lines either way
cat >"$stage/usr/sbin/isolcpu-plugin" <<'LAUNCHER'
#!/usr/bin/python3
# isolcpu-plugin: runs /usr/lib/isolcpu-plugin/isolcpu_plugin.py, byte-compiled, as __main__.
import runpy
import sys
sys.path.insert(0, "/usr/lib/isolcpu-plugin")
runpy.run_module("isolcpu_plugin", run_name="__main__", alter_sys=True)
LAUNCHER
chmod 0755 "$stage/usr/sbin/isolcpu-plugin"

# the unit: deploy/isolcpu-plugin.service with the package's paths
sed -e '1i\# isolcpu-plugin, as installed by its Debian package (see isolcpu-plugin(8)).' -e '1,/^# Flags go in/{/^# Flags go in/!d}' \
    -e 's|^ExecStart=.*|ExecStart=/usr/sbin/isolcpu-plugin|' -e '/^Environment=PYTHONPATH=/d' \
    "$ROOT/deploy/isolcpu-plugin.service" >"$stage/lib/systemd/system/isolcpu-plugin.service"
grep -q '^ExecStart=/usr/sbin/isolcpu-plugin$' "$stage/lib/systemd/system/isolcpu-plugin.service"
grep -q '^Alias=isolcpu_plugin.service$' "$stage/lib/systemd/system/isolcpu-plugin.service"

python3 "$ROOT/tools/debian_files.py" defaults >"$stage/etc/default/isolcpu-plugin"
python3 "$ROOT/tools/debian_files.py" manpage "$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%d)" \
    | gzip -9n >"$stage/usr/share/man/man8/isolcpu-plugin.8.gz"
install -m 0644 "$DEB/copyright" "$doc/copyright"
install -D -m 0644 "$ROOT/deploy/isolcpu-plugin.service.d/notify-reload.conf" "$doc/examples/notify-reload.conf"
gzip -9n <"$DEB/changelog" >"$doc/changelog.gz"
install -m 0644 "$DEB/lintian-overrides" "$stage/usr/share/lintian/overrides/isolcpu-plugin"

install -m 0755 "$DEB/postinst" "$DEB/prerm" "$DEB/postrm" "$stage/DEBIAN/"
echo /etc/default/isolcpu-plugin >"$stage/DEBIAN/conffiles"
(cd "$stage" && find . -path ./DEBIAN -prune -o -type f -print | sed 's|^\./||' | LC_ALL=C sort \
    | xargs md5sum) >"$stage/DEBIAN/md5sums"
size=$(du -sk --apparent-size --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s|@VERSION@|$version|" -e "s|@MAINTAINER@|$maintainer|" -e "s|@INSTALLED_SIZE@|$size|" \
    "$DEB/control.in" >"$stage/DEBIAN/control"
find "$stage" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

mkdir -p "$ROOT/dist"
out=$ROOT/dist/isolcpu-plugin_${version}_all.deb
dpkg-deb --root-owner-group -Zxz --build "$stage" "$out" >/dev/null
echo "$out"
