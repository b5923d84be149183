"""Verification during training is the saved model's: rank 0's BatchNorm statistics on every rank.

BatchNorm running statistics differ across ranks (each rank's own samples); backbone.npz holds
rank 0's. The verifier embeds with rank 0's statistics on every rank, so its numbers are those of
the saved model for any world size, and each rank's own statistics come back for training.
"""
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, launch, run_worker


@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_same_embeddings_on_one_and_two_ranks(tmp_path, mode):
    two = run_worker("verify_ranks", tmp_path / "two.json", nproc=2, extra=[mode])
    one = run_worker("verify_ranks", tmp_path / "one.json", nproc=1, extra=[mode])  # rank 0's statistics
    assert (two["world"], one["world"]) == (2, 1)
    np.testing.assert_allclose(two["emb"], one["emb"], rtol=1e-4, atol=1e-5)
    # not vacuous: rank 1's statistics give other embeddings (what rank 1 verified before)
    rank1 = run_worker("verify_ranks", tmp_path / "rank1.json", nproc=1, extra=[mode, 1])
    assert np.abs(np.array(rank1["emb"]) - np.array(one["emb"])).max() > 1e-2


def test_two_rank_run_prints_the_accuracy_of_its_backbone_npz(tmp_path):
    out, root = tmp_path / "run", tmp_path / "synth"
    proc = launch(["-m", "of_face.train.main", "-c", "configs/default.yaml",
                   "-o", f"Global.output_dir={out}", "-o", "Global.max_steps=12", "-o", "Global.log_interval=6",
                   "-o", "Global.eval_before_training=false", "-o", f"Data.root={root}",
                   "-o", "Data.synth_identities=8", "-o", "Data.synth_images_per_identity=8",
                   "-o", "Data.synth_val_identities=6", "-o", "Data.synth_val_pairs=60", "-o", "Data.batch_size=4"],
                  nproc=2, timeout=900)
    printed = re.search(r"\[verify final\] step \d+ synth_val: accuracy ([\d.]+) ± ([\d.]+)  XNorm ([\d.]+)",
                        proc.stdout)
    assert printed, proc.stdout[-2000:]
    # the run's two ranks ended with different BatchNorm statistics (the checkpoint keeps both)
    ckpt = sorted(out.glob("ckpt-*.npz"))[-1]
    with np.load(ckpt) as f:
        assert any(k.startswith("replica/") and "running_" in k for k in f.files)
    cli = subprocess.run([sys.executable, "eval/verification.py", "--checkpoint", str(out),
                          "--bin", str(root / "synth_val.bin")], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert cli.returncode == 0, cli.stderr[-3000:]
    saved = re.search(r"synth_val: ([\d.]+) ± ([\d.]+), XNorm ([\d.]+)", cli.stdout)
    assert saved, cli.stdout
    assert printed.groups() == saved.groups()  # accuracy, std and XNorm to the printed digits
