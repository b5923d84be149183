"""Graph and eager mode are twins: same seed -> same losses and FC weights over 20 steps.

PartialFC r=0.5 with SparseMomentum on 2 processes, built by the trainer's own builders. The
sampling noise comes from the host (PartialFC.step_noise), so both modes keep the same centres.
The backbone here has no BatchNorm: with BatchNorm the modes agree for the first update and then
drift apart (~1% by step 3 on a width-4 IResNet), an open OneFlow 0.9 finding recorded in
docs/BENCHMARKS.md's notes, not hidden by a loose tolerance here.
"""
import numpy as np

from conftest import run_worker


def test_graph_and_eager_train_the_same(tmp_path):
    graph = run_worker("twin", tmp_path / "graph.json", extra=["graph", "mlp"])
    eager = run_worker("twin", tmp_path / "eager.json", extra=["eager", "mlp"])
    assert len(graph["losses"]) == 20 and graph["losses"][-1] < 0.6 * graph["losses"][0]  # it learns
    np.testing.assert_allclose(eager["losses"], graph["losses"], rtol=1e-4)
    np.testing.assert_allclose(eager["fc"], graph["fc"], rtol=1e-4, atol=1e-5)
