"""The combined margin past theta + m2 = pi: numpy's guarded formula and its exact gradient."""
import math

import numpy as np
import pytest

import of_face  # noqa: F401
import oneflow as flow
from of_face.heads.margin import CombinedMargin


def numpy_target(theta, m1, m2, m3):
    """Target logit / s and its derivative with respect to cos(theta); the guard only for m1 = 1."""
    past = (m1 == 1.0) & (m1 * theta + m2 > math.pi)
    value = np.where(past, np.cos(theta) - m2 * math.sin(m2) - m3, np.cos(m1 * theta + m2) - m3)
    grad = np.where(past, 1.0, m1 * np.sin(m1 * theta + m2) / np.sin(theta))
    return value, grad, past


@pytest.mark.parametrize("margin", [(1.0, 0.5, 0.0), (1.0, 0.3, 0.2), (1.2, 0.4, 0.0)])
def test_target_logit_and_gradient_follow_the_guarded_formula(margin):
    theta = np.linspace(0.2, 3.0, 15)  # crosses (pi - m2) / m1 for every margin above
    n, classes = len(theta), 5
    labels = np.arange(n) % classes
    cos = np.full((n, classes), 0.3)
    cos[np.arange(n), labels] = np.cos(theta)
    x = flow.tensor(cos, dtype=flow.float32, requires_grad=True)
    out = CombinedMargin(*margin, scale=2.0)(x, flow.tensor(labels))
    out.sum().backward()
    value, grad, past = numpy_target(theta, *margin)
    assert (past.any() or margin[0] != 1.0) and (~past).any()
    got = out.numpy()
    np.testing.assert_allclose(got[np.arange(n), labels], 2.0 * value, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(x.grad.numpy()[np.arange(n), labels], 2.0 * grad, rtol=1e-3, atol=1e-4)
    others = np.ones_like(cos, bool)
    others[np.arange(n), labels] = False
    assert np.allclose(got[others], 0.6) and np.allclose(x.grad.numpy()[others], 2.0)
    if margin[0] == 1.0:  # the guard keeps the target logit falling as theta grows
        assert np.all(np.diff(got[np.arange(n), labels]) < 0)


def test_cosface_needs_no_guard():
    assert CombinedMargin(1.0, 0.0, 0.4).guard_cos is None


def test_gradient_stays_finite_at_cos_one():
    """A memorised sample reaches cos = 1.0 exactly; OneFlow's op alone gives an infinite gradient."""
    x = flow.tensor([[1.0, 0.2], [0.3, -1.0]], requires_grad=True)
    out = CombinedMargin(1.0, 0.5, 0.0, scale=64.0)(x, flow.tensor([0, 1]))
    out.sum().backward()
    assert np.all(np.isfinite(x.grad.numpy())) and np.all(np.isfinite(out.numpy()))
    # the clamp moves theta from 0 to ~1.4e-3 there: the logit is within 1e-3 of s*cos(m2)
    assert out.numpy()[0, 0] == pytest.approx(64.0 * math.cos(0.5), rel=1e-3)


@pytest.mark.parametrize("margin", [(1.0, 0.5, 0.0), (1.0, 0.3, 0.2), (1.2, 0.4, 0.0), (1.0, 0.0, 0.4)])
def test_slope_the_head_uses_is_the_gradient_of_the_target(margin):
    """`target_and_slope` (the head's forward-only chain rule) against the numpy formula and
    against autograd through `target_logit`, at cosines that include +-1 and the guard's side."""
    t = np.concatenate([np.cos(np.linspace(0.05, 3.1, 40)), [1.0, -1.0, 0.999999999]]).astype(np.float32)
    m = CombinedMargin(*margin, scale=64.0)
    x = flow.tensor(t, requires_grad=True)
    value, slope = m.target_and_slope(x.detach())
    m.target_logit(x).sum().backward()
    np.testing.assert_allclose(slope.numpy(), x.grad.numpy(), rtol=1e-5, atol=1e-5)
    inside = np.abs(t) < 1.0 - 1e-6  # (outside, the clamp makes both 0)
    want_value, want_slope, _ = numpy_target(np.arccos(t[inside].astype(np.float64)), *margin)
    np.testing.assert_allclose(value.numpy()[inside], want_value, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(slope.numpy()[inside], want_slope, rtol=1e-3, atol=1e-4)
