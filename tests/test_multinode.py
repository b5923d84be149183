"""Two "nodes" on one machine (two launchers, --nnodes 2, master 127.0.0.1) train as one world.

Run through scripts/train_ddp.sh with NNODES / NODE_RANK / MASTER / NPROC_PER_NODE=1, plus
OF_FACE_NODES_SHARE_HOST=1 (OneFlow maps ranks to hosts by address; without it both nodes'
processes claim local rank 0 of the same host and node 1 holds no data). The loss curve must
equal one node with two processes: same world, same seed.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, free_port, losses, o_args, tiny, train

STEPS = ["Global.max_steps=6", "Global.log_interval=1", "Data.batch_size=4"]


@pytest.mark.slow  # two launchers and a 2-rank reference run: `make test-all` only
def test_two_nodes_train_like_one_node_with_two_processes(tmp_path, synthetic_faces):
    faces = synthetic_faces(12, 10)
    one = tmp_path / "one_node"
    train(tiny(faces, one, *STEPS), nproc=2, timeout=400)

    two = tmp_path / "two_nodes"
    args = o_args(tiny(faces, two, *STEPS))
    master = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHON": sys.executable, "NNODES": "2", "MASTER": master, "NPROC_PER_NODE": "1",
           "OF_FACE_NODES_SHARE_HOST": "1"}
    nodes = [subprocess.Popen(["bash", "scripts/train_ddp.sh", "-c", "configs/default.yaml", *args], cwd=REPO,
                              env={**env, "NODE_RANK": str(n)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for n in (0, 1)]
    outputs = [n.communicate(timeout=400)[0] for n in nodes]
    for n, out in zip(nodes, outputs):
        assert n.returncode == 0, out[-4000:]
    assert "on node 1 of 2" in outputs[1] and "2 rank(s)" in outputs[0]

    single, multi = losses(one), losses(two)
    assert sorted(multi) == list(range(1, 7))
    np.testing.assert_allclose([multi[s] for s in sorted(multi)], [single[s] for s in sorted(single)], rtol=1e-6)
