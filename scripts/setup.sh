#!/usr/bin/env bash
# Build (once) the virtual environment of_face runs in, and print its python's path.
#
# The venv lives outside the clone, keyed by a hash of requirements.txt and this script, so a
# second `make setup` with nothing changed takes about a second, and a fresh clone reuses it.
# OneFlow 0.9.0 only has wheels for Python 3.7-3.10: we look for python3.10 on PATH, then pyenv.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

find_python() {
    local c
    for c in "${OF_FACE_PYTHON:-}" python3.10 \
             "$(command -v pyenv >/dev/null 2>&1 && pyenv root)"/versions/3.10*/bin/python3.10 \
             "$HOME"/.pyenv/versions/3.10*/bin/python3.10 /usr/bin/python3.10 /usr/local/bin/python3.10; do
        [ -n "$c" ] || continue
        # a pyenv shim exists on PATH even when 3.10 is not selected: check that it really runs
        if "$c" -c 'import sys, venv; assert sys.version_info[:2] == (3, 10)' >/dev/null 2>&1; then
            echo "$c"; return 0
        fi
    done
    echo "setup: no Python 3.10 found (OneFlow 0.9.0 needs 3.7-3.10). Install one (e.g. 'pyenv install 3.10')" \
         "or point OF_FACE_PYTHON at it." >&2
    return 1
}

KEY=$(cat requirements.txt scripts/setup.sh | sha256sum | cut -c1-12)
VENV="${OF_FACE_VENV_ROOT:-$HOME/.cache/of_face}/venv-$KEY"
PY="$VENV/bin/python"

if [ ! -f "$VENV/.complete" ]; then
    BASE=$(find_python)
    echo "setup: building $VENV with $BASE (first run: downloads about 2.5 GB)" >&2
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    "$BASE" -m venv "$VENV"
    # flowvision 0.2.1 is an sdist whose setup.py imports pkg_resources, which setuptools >= 70
    # no longer ships: build it (and anything else) with this venv's older setuptools.
    "$PY" -m pip install -q --upgrade "pip>=23" "setuptools>=64,<70" wheel >&2
    "$PY" -m pip install -q --no-build-isolation -r requirements.txt >&2
    touch "$VENV/.complete"
fi

SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# Every interpreter of this venv preloads cuDNN/cuBLAS (the OneFlow wheel needs them but does
# not ship them): this covers `python -m oneflow.distributed.launch`, pytest and the scripts.
if ! cmp -s of_face/_libs.py "$SITE/_of_face_libs.py"; then
    cp of_face/_libs.py "$SITE/_of_face_libs.py"
    echo "import _of_face_libs; _of_face_libs.preload()" > "$SITE/_of_face_libs.pth"
fi
# Editable install of this clone (re-pointed when the venv is reused from another clone).
if [ "$(cat "$VENV/.of_face_src" 2>/dev/null)" != "$REPO:$(sha256sum pyproject.toml | cut -c1-12)" ]; then
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . >&2
    echo "$REPO:$(sha256sum pyproject.toml | cut -c1-12)" > "$VENV/.of_face_src"
fi
echo "$PY"
