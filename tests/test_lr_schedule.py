"""Warm-up + polynomial LR: OneFlow's schedulers (eager and compiled into nn.Graph) == lr_at()."""
import numpy as np
import pytest

import of_face  # noqa: F401
import oneflow as flow
from of_face.config import OptimizerCfg
from of_face.train.optim import build_optimizer, build_scheduler, lr_at

TOTAL, WARMUP, POWER, BASE = 12, 4, 2.0, 0.1


class Linear(flow.nn.Module):
    """loss = w * 1: the gradient is exactly 1, so an SGD step moves w by exactly -lr."""

    def __init__(self):
        super().__init__()
        self.w = flow.nn.Parameter(flow.zeros(1))

    def forward(self):
        return self.w.sum()


def make():
    model = Linear()
    cfg = OptimizerCfg(lr=BASE, momentum=0.0, weight_decay=0.0, clip_grad_norm=0.0)
    opt = build_optimizer(cfg, flow.nn.Module(), model.parameters())
    return model, opt, build_scheduler(opt, TOTAL, WARMUP, POWER)


def test_formula_shape():
    lrs = [lr_at(t, BASE, TOTAL, WARMUP, POWER) for t in range(TOTAL)]
    assert lrs[:WARMUP] == pytest.approx([0.0, 0.025, 0.05, 0.075])
    assert lrs[WARMUP] == pytest.approx(BASE)
    assert lrs[-1] == pytest.approx(BASE * (1 / 8) ** 2)


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_applied_learning_rates_follow_the_formula(mode):
    model, opt, sched = make()

    class Step(flow.nn.Graph):
        def __init__(self):
            super().__init__()
            self.model = model
            self.add_optimizer(opt, lr_sch=sched)

        def build(self):
            loss = self.model()
            loss.backward()
            return loss

    graph = Step() if mode == "graph" else None
    applied = []
    for _ in range(TOTAL):
        before = float(model.w.numpy()[0])
        if graph is not None:
            graph()
        else:
            model().backward()
            opt.step()
            opt.zero_grad()
            sched.step()
        applied.append(before - float(model.w.numpy()[0]))
    expected = [lr_at(t, BASE, TOTAL, WARMUP, POWER) for t in range(TOTAL)]
    np.testing.assert_allclose(applied, expected, rtol=1e-5, atol=1e-7)
