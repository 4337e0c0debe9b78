#!/usr/bin/env bash
# check-deploy.sh: the DaemonSet and the README's example pod against Kubernetes'
# schemas (kubernetes-validate, strict, the newest Kubernetes it knows) and the systemd unit with
# systemd-analyze verify, where systemd is installed (any complaint fails).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${ISOLCPU_CI_WORK:-/tmp/isolcpu-ci}
mkdir -p "$WORK"

venv=$WORK/venv-kubernetes-validate
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q kubernetes-validate >"$venv.log" 2>&1 || { cat "$venv.log"; exit 1; }
fi
"$venv/bin/kubernetes-validate" --strict "$ROOT/deploy/daemonset.yaml"
# the README's example pod, as it stands there
pod=$(mktemp --suffix=.yaml)
sed -n '/^```yaml$/,/^```$/p' "$ROOT/README.md" | sed '1d;$d' >"$pod"
grep -q '^kind: Pod$' "$pod" || { echo "no example pod found in README.md"; exit 1; }
"$venv/bin/kubernetes-validate" --strict "$pod"
rm -f "$pod"

if command -v systemd-analyze >/dev/null; then
    units=$(mktemp -d)
    trap 'rm -rf "$units"' EXIT
    cp "$ROOT/deploy/isolcpu-plugin.service" "$units/"
    printf '[Unit]\nDescription=stand-in for the kubelet\n[Service]\nExecStart=/bin/true\n' >"$units/kubelet.service"
    complaints=$(systemd-analyze verify "$units/isolcpu-plugin.service" "$units/kubelet.service" 2>&1 || true)
    if [ -n "$complaints" ]; then
        echo "$complaints"
        exit 1
    fi
    echo "systemd-analyze verify: deploy/isolcpu-plugin.service is clean ($(systemd-analyze --version | head -n 1))"
else
    echo "systemd-analyze not installed here: the unit is not verified"
fi
