#!/usr/bin/env bash
# matrix.sh [STACK...]: the unittest suite on each Python stack the plugin
# claims to run on, one line each (the whole log when one fails).
#   debian12   Debian 12's system python3 + apt python3-grpcio/python3-protobuf
#              (this host when it is Debian 12, else a bookworm chroot)
#   debian11   a bullseye chroot: Python 3.9, grpcio 1.30, protobuf 3.12
#   debian13   a trixie chroot: Python 3.13, grpcio 1.51, protobuf 3.21
#   pb320      venv: newest grpcio, protobuf 3.20 in pure-python mode
#   pb5, pb6   venvs: newest grpcio, protobuf 5.x / 6.x
#   py36       pyenv's Python 3.6 with grpcio 1.48 and protobuf 3.19 (skipped without it)
# Chroots come from debian-root.sh (cached); $ISOLCPU_CI_WORK holds the work.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${ISOLCPU_CI_WORK:-/tmp/isolcpu-ci}
CORPUS=${ISOLCPU_TEST_CORPUS:-$ROOT/../shared/fixtures/sysfs}
FILES="isolcpu_plugin.py deviceplugin_pb2.py deviceplugin_pb2_grpc.py test_isolcpu_plugin.py"
export GRPC_VERBOSITY=ERROR PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$WORK"
failed=0

log_of() {                       # log_of LABEL: where that stack's output goes
    printf '%s/%s.log' "$WORK" "$(printf '%s' "$1" | tr -c 'A-Za-z0-9' '_')"
}

report() {                       # report LABEL LOG STATUS
    printf '%-64s %-6s %s\n' "$1" "$3" "$(grep -E '^(Ran|OK|FAILED)' "$2" | tr '\n' ' ')"
    if [ "$3" != ok ]; then tail -n 60 "$2"; failed=1; fi
}

run_suite() {                    # run_suite LABEL COMMAND...: the suite in the project dir
    local label=$1 log
    shift
    log=$(log_of "$label")
    if (cd "$ROOT" && "$@" isolcpu_plugin.py --version >"$log" 2>&1 \
        && ISOLCPU_TEST_CORPUS=$CORPUS "$@" -m unittest >>"$log" 2>&1); then
        report "$label ($(head -n 1 "$log"))" "$log" ok
    else
        report "$label" "$log" FAILED
    fi
}

venv() {                         # venv NAME PYTHON PIP PACKAGE...: a cached venv, its python printed
    local dir=$WORK/venv-$1 python=$2 pip=$3
    shift 3
    if [ ! -f "$dir/.ready" ]; then
        rm -rf "$dir"
        "$python" -m venv "$dir" >/dev/null
        # an old venv pip misses manylinux2014 wheels and would compile grpcio for many minutes
        { "$dir/bin/python" -m pip install -q --upgrade "$pip" \
          && "$dir/bin/python" -m pip install -q --only-binary :all: "$@"; } >"$dir.log" 2>&1 \
            || { cat "$dir.log" >&2; return 1; }
        touch "$dir/.ready"
    fi
    echo "$dir/bin/python"
}

in_chroot() {                    # in_chroot DIR LABEL: the suite inside a Debian root
    local dir=$1 label=$2 log mounts=()
    log=$(log_of "$label")
    mkdir -p "$dir/src" "$dir/corpus"
    (cd "$ROOT" && cp $FILES "$dir/src/")
    # /dev and /sys as recursive binds made slaves: nothing mounted or
    # unmounted below them in the chroot can reach the host's
    mountpoint -q "$dir/proc" || { mount -t proc proc "$dir/proc"; mounts+=("$dir/proc"); }
    for tree in dev sys; do
        if ! mountpoint -q "$dir/$tree"; then
            mount --rbind "/$tree" "$dir/$tree" && mount --make-rslave "$dir/$tree"
            mounts+=("$dir/$tree")
        fi
    done
    if [ -d "$CORPUS" ] && ! mountpoint -q "$dir/corpus"; then
        mount --bind "$CORPUS" "$dir/corpus" && mount -o remount,bind,ro "$dir/corpus"
        mounts+=("$dir/corpus")
    fi
    local status=ok
    chroot "$dir" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root GRPC_VERBOSITY=ERROR \
        ISOLCPU_TEST_CORPUS=/corpus sh -c 'cd /src && python3 isolcpu_plugin.py --version && python3 -m unittest' \
        >"$log" 2>&1 || status=FAILED
    for m in "${mounts[@]}"; do umount -l "$m"; done       # -l: with everything below it
    report "$label ($(head -n 1 "$log"))" "$log" "$status"
}

stack() {
    case $1 in
    debian12)
        if grep -q '^VERSION_ID="12"' /etc/os-release 2>/dev/null; then
            dpkg -s python3-grpcio python3-protobuf >/dev/null 2>&1 || \
                { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-grpcio python3-protobuf >/dev/null; }
            run_suite "Debian 12 system python3 (this host)" env -i PATH=/usr/bin:/bin HOME="$HOME" \
                GRPC_VERBOSITY=ERROR ISOLCPU_TEST_CORPUS="$CORPUS" /usr/bin/python3
        else
            "$ROOT/tools/ci/debian-root.sh" bookworm "$WORK/debian12" python3-grpcio python3-protobuf >/dev/null
            in_chroot "$WORK/debian12" "Debian 12 chroot"
        fi ;;
    debian11)
        [ -x "$WORK/debian11/usr/bin/python3" ] || "$ROOT/tools/ci/debian-root.sh" bullseye "$WORK/debian11" python3-grpcio python3-protobuf >/dev/null
        in_chroot "$WORK/debian11" "Debian 11 chroot" ;;
    debian13)
        [ -x "$WORK/debian13/usr/bin/python3" ] || "$ROOT/tools/ci/debian-root.sh" trixie "$WORK/debian13" python3-grpcio python3-protobuf >/dev/null
        in_chroot "$WORK/debian13" "Debian 13 chroot" ;;
    pb320)
        python=$(venv pb320 python3 pip grpcio 'protobuf==3.20.*') || { failed=1; return; }
        run_suite "venv protobuf 3.20, pure-python" env PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python "$python" ;;
    pb5)
        python=$(venv pb5 python3 pip grpcio 'protobuf>=5,<6') || { failed=1; return; }
        run_suite "venv protobuf 5" "$python" ;;
    pb6)
        python=$(venv pb6 python3 pip grpcio 'protobuf>=6,<7') || { failed=1; return; }
        run_suite "venv protobuf 6" "$python" ;;
    py36)
        py36=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.6.*/bin/python 2>/dev/null | tail -n 1 || true)
        if [ -z "$py36" ]; then
            echo "py36: no pyenv Python 3.6 here; skipped"
        else
            # pip 21.3 is the last for 3.6; grpcio 1.48 and protobuf 3.19 the last wheels
            python=$(venv py36 "$py36" 'pip<22' 'grpcio<1.49' 'protobuf<3.20') || { failed=1; return; }
            run_suite "venv Python 3.6" "$python"
        fi ;;
    *)
        echo "matrix.sh: unknown stack $1" >&2
        failed=1 ;;
    esac
}

for name in "${@:-debian12 debian11 debian13 pb320 pb5 pb6 py36}"; do
    for one in $name; do stack "$one"; done
done
exit $failed
