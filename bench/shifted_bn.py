"""Bench only: BatchNorm that runs OneFlow's CPU kernel on mean-shifted data. Rejected (not used by of_face).

The idea: BatchNorm is invariant to a per-channel shift of its input, so in training mode on CPU
subtract the channel mean c (OneFlow's `mean`, detached, [C]) and run the kernel on x - c, which has
no E[x^2] - E[x]^2 cancellation; the kernel's backward gets dy - mean(dy) (d/dx is invariant to a
per-channel shift of dy too; y = z - (g - g.detach()) with g the channel mean of the kernel output z,
the bias gradient taken on that side path). Running statistics: the kernel call uses throw-away
buffers (None fails in a compiled graph), the real ones get bench/accurate_bn.py's [2, C] update
fed c -+ sqrt(unbiased var / 2) (var: OneFlow's `var`, [C]). Eval mode and CUDA: the kernel.

Why rejected (docs/BENCHMARKS.md, "Accurate BatchNorm on CPU: the shifted kernel"): one layer is as
accurate as torch's for shifted channels (bench/bn_accuracy.py: output 7.5e-6 vs the kernel's
1.9e-2 at mean 3 / std 0.05), but for centred data it is the kernel's own 8e-6 (n = 100k per channel;
6.5e-5 at n = 401k): the kernel's float32 accumulation loses precision with the reduction size, which
a shift cannot remove. Through MobileFaceNet (bench/parity_step1.py --shifted-bn) the step-1 gradient
stays 7.6e-3 off exact tensor by tensor (median; kernel 8.1e-3, accurate_bn 1.9e-3, torch 1.8e-3).
"""
import of_face  # noqa: F401  (preloads libraries; must precede oneflow)
import oneflow as flow

from accurate_bn import batchnorm_classes, update_running_stats  # bench/accurate_bn.py, beside this file
from of_face.oneflow_compat import functional


def _on_cpu(x: flow.Tensor) -> bool:
    return (x.placement.type if x.is_global else x.device.type) == "cpu"


def _train_forward(bn, x: flow.Tensor) -> flow.Tensor:
    dims = [0] + list(range(2, x.dim()))
    # (scale and shift given: with None the kernel makes them on a device, failing for global tensors)
    scale = bn.weight if bn.affine else flow.ones_like(bn.running_var)
    shift = bn.bias if bn.affine else flow.zeros_like(bn.running_mean)
    c = x.detach().mean(dim=dims, keepdim=True)
    # (throw-away running statistics: with None the kernel fails in a compiled graph)
    spare_mean, spare_var = flow.zeros_like(bn.running_mean), flow.ones_like(bn.running_var)
    z = functional.normalization(x - c, spare_mean, spare_var, scale, shift, axis=1, epsilon=bn.eps,
                                 momentum=bn.momentum, is_training=True)
    # The kernel's backward sums the incoming gradient dy the same inaccurate way. d/dx is invariant to a
    # per-channel shift of dy, so centre dy before the kernel sees it: y = z - (g - g.detach()), with g
    # the channel mean of z, is z in value (the bracket is exactly 0) and passes dy - mean(dy) to z
    # (OneFlow's reductions). The bias's gradient, sum(dy), is then taken on the same side path.
    g = z.mean(dim=dims, keepdim=True)
    fix = g - g.detach()
    if bn.affine:
        fix = fix - (bn.bias - bn.bias.detach()).reshape([1, -1] + [1] * (x.dim() - 2))
    y = z - fix
    if bn.track_running_stats:
        with flow.no_grad():
            v = flow.var(x.detach(), dim=dims, unbiased=True).reshape(1, -1)
            update_running_stats(bn, c.reshape(1, -1), flow.sqrt(v * 0.5))
    return y


BatchNorm2d, BatchNorm1d = batchnorm_classes(_train_forward, applies=_on_cpu)
