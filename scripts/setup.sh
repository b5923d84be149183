#!/usr/bin/env bash
# Build (once) the environment of_face runs in, and print its python's path.
#
# Two layers: the heavy dependencies (OneFlow, cuDNN, mxnet, ... ~2.5 GB) live in a venv outside
# the clone, keyed by a hash of requirements.txt and DEPS_RECIPE, so every clone shares it; each
# clone has a small `.venv` of its own that sees those packages and holds the editable install
# of this clone (so one clone never re-points another's `of-face`). A second `make setup` with
# nothing changed takes about a second.
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

# Bump DEPS_RECIPE when the way the shared venv is built changes (not for edits elsewhere here).
DEPS_RECIPE=1
KEY=$( (cat requirements.txt; echo "$DEPS_RECIPE") | sha256sum | cut -c1-12)
VENV="${OF_FACE_VENV_ROOT:-$HOME/.cache/of_face}/venv-$KEY"
DEPS_PY="$VENV/bin/python"
PY="$DEPS_PY"

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

site_of() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
DEPS_SITE=$(site_of "$DEPS_PY")
# Every interpreter that sees these packages preloads cuDNN/cuBLAS (the OneFlow wheel needs
# them but does not ship them): this covers `python -m oneflow.distributed.launch`, pytest and
# the scripts.
if ! cmp -s of_face/_libs.py "$DEPS_SITE/_of_face_libs.py"; then
    cp of_face/_libs.py "$DEPS_SITE/_of_face_libs.py"
    echo "import _of_face_libs; _of_face_libs.preload()" > "$DEPS_SITE/_of_face_libs.pth"
fi

# This clone's own small venv: the shared packages via site.addsitedir (which also runs their
# .pth hooks), plus the editable install with the console entry points.
STAMP="$KEY:$(sha256sum pyproject.toml | cut -c1-12)"
PY="$REPO/.venv/bin/python"
if [ "$(cat .venv/.of_face_stamp 2>/dev/null)" != "$STAMP" ]; then
    rm -rf .venv
    "$DEPS_PY" -m venv .venv
    echo "import site; site.addsitedir('$DEPS_SITE')" > "$(site_of "$PY")/_of_face_deps.pth"
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . >&2
    echo "$STAMP" > .venv/.of_face_stamp
fi
echo "$PY"
