"""A short 2-process graph training run on real faces (../shared glint14): the loss falls."""
import csv

import numpy as np

from conftest import launch


def test_two_process_graph_training_on_real_faces_lowers_the_loss(shared, tmp_path):
    out = tmp_path / "run"
    launch(["-m", "of_face.train.main", "-c", "configs/glint14_iresnet_tiny.yaml",
            "-o", f"Data.root={shared / 'data' / 'glint14'}", "-o", f"Global.output_dir={out}",
            "-o", "Global.max_steps=60", "-o", "Global.log_interval=5", "-o", "Data.batch_size=16",
            "-o", "Data.val_targets=[]", "-o", "Global.eval_before_training=false",
            "-o", "Model.width=8", "-o", "Loss.margin=[1.0,0.0,0.1]", "-o", "Loss.scale=16",
            "-o", "LRScheduler.warmup_epochs=0", "-o", "Optimizer.lr=0.05"], nproc=2)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    losses = [float(r["value"]) for r in rows if r["kind"] == "loss"]
    assert len(losses) == 12 and all(np.isfinite(losses))
    # 14 classes (untrained loss ~ ln 14 + s*m = 4.2): 60 steps of 32 real faces must cut it
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    assert (out / "backbone.npz").is_file() and (out / "config.yaml").is_file()
