"""AMP + sparse FC updates (train/amp_sparse.py) resume exactly: 2 steps, checkpoint, a fresh
system loads it and takes 2 more; losses and the FC equal an uninterrupted 4-step run bit for
bit (the FC job's momentum / Adam moments, its step counter and the count of FC updates that
sparse AdamW's bias correction uses all come back)."""
import numpy as np
import pytest

import of_face  # noqa: F401
from of_face import parallel
from of_face.train.snapshot import load_checkpoint, save_checkpoint
from of_face.config import load_config
from of_face.train.amp_sparse import AmpSparseStep
from of_face.train.system import build
from of_face.heads import fc_table


def config(optimizer):
    return load_config(None, [
        "Global.mode=graph", "Global.seed=0", "Model.name=iresnet", "Model.layers=[1, 1, 1, 1]", "Model.width=4",
        "Model.embedding_size=16", "Loss.margin=[1.0, 0.0, 0.35]", "Loss.scale=16.0", "Optimizer.lr=0.1",
        f"Optimizer.name={optimizer}", "Loss.sample_rate=0.3", "Data.batch_size=8", "LRScheduler.power=1.0",
        "AMP.enable=true", "AMP.init_scale=1024.0"])


def run(system, batches):
    return [float(parallel.to_numpy(system.step(parallel.batch(x), parallel.batch(y)))) for x, y in batches]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_equals_the_uninterrupted_run(tmp_path, optimizer):
    cfg = config(optimizer)
    rng = np.random.default_rng(0)
    data = [(rng.standard_normal((8, 3, 112, 112)).astype(np.float32), rng.integers(0, 41, 8)) for _ in range(4)]
    whole = build(cfg, 41, total_steps=10, warmup_steps=2)  # warm-up: the LR differs at every step
    assert isinstance(whole.step, AmpSparseStep)
    losses = run(whole, data)
    first = build(cfg, 41, total_steps=10, warmup_steps=2)
    head_losses = run(first, data[:2])
    path = save_checkpoint(str(tmp_path), 2, first, {"checkpoint_format": "npz"})
    resumed = build(cfg, 41, total_steps=10, warmup_steps=2)
    load_checkpoint(path, resumed)
    assert head_losses + run(resumed, data[2:]) == losses
    assert np.array_equal(fc_table.rows(resumed.head.weight), fc_table.rows(whole.head.weight))
    assert resumed.step.fc_updates == whole.step.fc_updates == 4
