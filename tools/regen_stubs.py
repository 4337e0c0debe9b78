#!/usr/bin/env python3
"""Regenerate deviceplugin_pb2.py and deviceplugin_pb2_grpc.py from deviceplugin.proto.

    python3 tools/regen_stubs.py           # rewrite the two stubs
    python3 tools/regen_stubs.py --check   # exit 1 if the checked-in stubs differ

Why this generator: the stubs must import on Debian 11's grpcio 1.30 /
protobuf 3.12 and on PyPI's newest. grpcio-tools 1.48.2 (protoc 3.19.5) is
the newest whose output does that (newer ones call runtime-version checks,
registered-method APIs or protobuf's `builder` module, which old runtimes
lack). Its one flaw: on protobuf < 3.19 in pure-python mode
AddSerializedFile() returns None, so the generated file falls back to
looking the file up in the default pool; this script adds that line.

grpcio-tools 1.48.2 has wheels only up to Python 3.10, so the script finds a
Python 3.7-3.10 ($STUBS_PYTHON, python3.10 ... python3.7 on PATH, or pyenv's),
installs the generator into a cached venv and runs protoc from there.
"""
import difflib
import glob
import os
import shutil
import subprocess
import sys
import tempfile

GENERATOR = "grpcio-tools==1.48.2"
PROTO = "deviceplugin.proto"
STUBS = ("deviceplugin_pb2.py", "deviceplugin_pb2_grpc.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                     "isolcpu-plugin", "grpcio-tools-1.48.2")

ADD_FILE = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
FALLBACK = ("if DESCRIPTOR is None:  # protobuf < 3.19, pure-python: AddSerializedFile returns None\n"
            "  DESCRIPTOR = _descriptor_pool.Default().FindFileByName(%r)\n" % PROTO)


def runs_generator_python(python):
    """True when `python` starts and is 3.7-3.10 (pyenv shims exist but may not run)."""
    try:
        out = subprocess.run([python, "-c", "import sys; print(sys.version_info[:2] >= (3, 7) "
                              "and sys.version_info[:2] <= (3, 10))"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=60)
    except OSError:
        return False
    return out.returncode == 0 and out.stdout.strip() == b"True"


def find_generator_python():
    candidates = [os.environ.get("STUBS_PYTHON")]
    candidates += [shutil.which("python3.%d" % minor) for minor in (10, 9, 8, 7)]
    pyenv = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    for minor in (10, 9, 8, 7):
        candidates += sorted(glob.glob(os.path.join(pyenv, "versions", "3.%d.*" % minor, "bin", "python")))
    for python in candidates:
        if python and runs_generator_python(python):
            return python
    sys.exit("regen_stubs: no Python 3.7-3.10 found for %s; set STUBS_PYTHON" % GENERATOR)


def generator_venv():
    python = os.path.join(CACHE, "bin", "python")
    if not os.path.exists(os.path.join(CACHE, ".installed")):
        subprocess.check_call([find_generator_python(), "-m", "venv", "--clear", CACHE])
        subprocess.check_call([python, "-m", "pip", "install", "-q", GENERATOR])
        open(os.path.join(CACHE, ".installed"), "w").close()
    return python


def add_pool_fallback(text):
    """Insert the FindFileByName fallback after the AddSerializedFile statement."""
    start = text.index(ADD_FILE)
    end = text.index("\n", start) + 1          # the serialized descriptor is one line
    if FALLBACK in text:
        return text
    return text[:end] + FALLBACK + text[end:]


def generate(out_dir):
    subprocess.check_call([generator_venv(), "-m", "grpc_tools.protoc", "-I", ROOT,
                           "--python_out", out_dir, "--grpc_python_out", out_dir,
                           os.path.join(ROOT, PROTO)])
    path = os.path.join(out_dir, STUBS[0])
    with open(path) as f:
        text = add_pool_fallback(f.read())
    with open(path, "w") as f:
        f.write(text)


def main():
    check = sys.argv[1:] == ["--check"]
    with tempfile.TemporaryDirectory() as out_dir:
        generate(out_dir)
        stale = []
        for name in STUBS:
            with open(os.path.join(out_dir, name)) as f:
                fresh = f.read()
            target = os.path.join(ROOT, name)
            current = open(target).read() if os.path.exists(target) else ""
            if fresh == current:
                continue
            if check:
                stale.append(name)
                sys.stdout.writelines(difflib.unified_diff(
                    current.splitlines(True), fresh.splitlines(True), name, name + " (regenerated)", n=1))
            else:
                with open(target, "w") as f:
                    f.write(fresh)
                print("regen_stubs: wrote %s" % name)
    if stale:
        sys.exit("regen_stubs: %s out of date with %s; run python3 tools/regen_stubs.py"
                 % (", ".join(stale), PROTO))
    if check:
        print("regen_stubs: %s match %s" % (" and ".join(STUBS), PROTO))


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as e:
        sys.exit("regen_stubs: %s failed with exit status %s" % (" ".join(e.cmd[:4]), e.returncode))
