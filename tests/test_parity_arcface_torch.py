"""scripts/parity_arcface_torch.py on ../shared/interop/arcface_torch_mbf, in graph and in eager mode.

What holds (asserted): step 1 within 1e-4 in loss and 1e-3 in pre-clip gradient norm; fc_final,
the final parameter/buffer norms and the after-training embeddings within 10x the fixture's
recorded spread; the exit status says whether every check passed.

What does not (strict xfail, so a change that makes it pass is noticed): step 2 within 1e-4 /
1e-3. The recipe amplifies float32 rounding about 1000-fold in one step (docs/BENCHMARKS.md,
"arcface_torch parity"): of_face's own float32 and float64 runs of the same maths differ at
step 2 by 0.009 in loss and 5% in gradient norm, and graph vs eager mode by 0.017, so no
float32 implementation with kernels other than torch's own meets those bounds.
"""
import json
import subprocess
import sys

import pytest

from conftest import REPO, SHARED, need

FIX = SHARED / "interop" / "arcface_torch_mbf"
SCRIPT = REPO / "scripts" / "parity_arcface_torch.py"


def _run(mode, tmp_path):
    need(FIX / "trajectory.json", SHARED / "data" / "glint14" / "train.rec")
    out = tmp_path / f"{mode}.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(FIX), "--mode", mode, "--json", str(out)],
                          capture_output=True, text=True, timeout=1800, cwd=REPO)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = {c["check"]: c for c in json.loads(out.read_text())["checks"]}
    return proc, checks


@pytest.fixture(scope="module", params=["graph", pytest.param("eager", marks=pytest.mark.slow)])
def parity(request, tmp_path_factory):
    return _run(request.param, tmp_path_factory.mktemp(request.param))


def test_step1_and_after_training_within_tolerance(parity):
    proc, checks = parity
    for name in ("step 1 loss (absolute)", "step 1 pre-clip gradient norm (relative)", "fc_final (relative difference)",
                 "final parameter/buffer L2 norms (as one vector)",
                 "after-training embeddings: 1 - min row cosine", "after-training embeddings: max |diff|"):
        assert checks[name]["ok"], (name, checks[name], proc.stdout[-3000:])
    assert checks["step 1 loss (absolute)"]["tolerance"] == 1e-4
    assert checks["step 1 pre-clip gradient norm (relative)"]["tolerance"] == 1e-3
    # tolerances come from sensitivity.json: 10x the recorded fc spread
    sens = json.loads((FIX / "sensitivity.json").read_text())
    fc_tol = checks["fc_final (relative difference)"]["tolerance"]
    assert fc_tol == pytest.approx(10 * sens["after"]["fc_final_rel_diff"])
    assert proc.returncode == (0 if all(c["ok"] for c in checks.values()) else 1)


@pytest.mark.xfail(strict=True, reason="float32 rounding amplified ~1000x in one step (see module docstring)")
def test_step2_within_1e4_loss(parity):
    _, checks = parity
    assert checks["step 2 loss (absolute)"]["ok"] and checks["step 2 pre-clip gradient norm (relative)"]["ok"]


def test_not_a_fixture_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if "ibverbs" not in line]
    assert len(err) == 1 and str(tmp_path) in err[0] and "missing" in err[0], proc.stderr
