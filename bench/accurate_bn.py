"""Bench only: BatchNorm whose training-mode batch statistics are accurate in float32 on CPU.

Not used by of_face: in a compiled nn.Graph (CPU memory never reused) it took an mbf training
step at batch 32 from 3.5 to 13.9 GiB peak RSS. bench/parity_step1.py --accurate-bn swaps it in.

OneFlow 0.9's CPU `normalization` kernel accumulates the batch mean and variance in a way that
loses precision with the reduction size and with the channel mean's size against its spread
(E[x^2] - E[x]^2): measured on [32, 128, 56, 56] float32 against float64, its output is 9e-6 off
(relative) for zero-mean data and 1.7e-2 off for channels of mean 3 and std 0.05, where torch's
kernel is 2e-6 off and OneFlow's own reductions (`mean`, a two-pass variance) 1e-7 to 1e-9.
Through MobileFaceNet that makes the first gradient 8e-3 off tensor by tensor (median) against an
exact float64 one, four times torch's float32 error, and the chaotic CosFace recipe of the
arcface_torch parity fixture turns it into an 8 % gradient-norm difference one step later
(docs/BENCHMARKS.md, "arcface_torch parity: torch's own spread").

Here training mode normalises with statistics from OneFlow's reductions (two passes: the mean,
then the mean of squared deviations): the same maths as `nn.BatchNorm2d`, gradients by autograd.
The running statistics are still updated by the kernel, the only update of a buffer that a
compiled nn.Graph applies (an in-place `add_` on a buffer inside `build` is dropped): it is fed two
samples per channel, mean -+ sqrt(unbiased var / 2), whose mean and unbiased variance are the
batch's. Eval mode is the kernel's, unchanged. State-dict names and shapes are BatchNorm's.
"""
import oneflow as flow
import oneflow.nn as nn

from of_face.oneflow_compat import functional


def update_running_stats(bn, mean: flow.Tensor, spread: flow.Tensor) -> None:
    """Update bn's running statistics with the kernel (the only buffer update a compiled nn.Graph
    applies), fed two samples per channel, mean -+ spread ([1, C] each): with spread =
    sqrt(unbiased var / 2) their mean and unbiased variance are the batch's."""
    # (scale and shift given: with None the kernel makes them on a device, failing for global tensors)
    scale = bn.weight.detach() if bn.affine else flow.ones_like(bn.running_var)
    shift = bn.bias.detach() if bn.affine else flow.zeros_like(bn.running_mean)
    functional.normalization(flow.cat([mean - spread, mean + spread], dim=0), bn.running_mean, bn.running_var,
                             scale, shift, axis=1, epsilon=bn.eps, momentum=bn.momentum, is_training=True)


def batchnorm_classes(train_forward, applies=lambda x: True):
    """(BatchNorm2d, BatchNorm1d) whose training-mode forward is `train_forward(bn, x)` where
    `applies(x)`, the kernel's otherwise (eval mode always). Parameters, buffers and state-dict
    names are nn.BatchNorm's, so a module's class can be swapped in place."""
    def forward_of(kernel_class):
        # (the kernel's forward named by class: inside nn.Graph `self` is a proxy, where super() fails)
        def forward(self, x):
            if not self.training or not applies(x):
                return kernel_class.forward(self, x)
            if self.track_running_stats and self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)  # as nn.BatchNorm (a compiled graph drops it there too)
            return train_forward(self, x)
        return forward
    return (type("BatchNorm2d", (nn.BatchNorm2d,), {"forward": forward_of(nn.BatchNorm2d)}),
            type("BatchNorm1d", (nn.BatchNorm1d,), {"forward": forward_of(nn.BatchNorm1d)}))


def swap_into(module: nn.Module, classes) -> None:
    """Give every BatchNorm2d / BatchNorm1d of `module` the class of `classes` (a
    batchnorm_classes pair): same parameters and buffers, only the forward differs."""
    bn2d, bn1d = classes
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.__class__ = bn2d
        elif isinstance(m, nn.BatchNorm1d):
            m.__class__ = bn1d


def _train_forward(bn, x: flow.Tensor) -> flow.Tensor:
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dim=dims, keepdim=True)
    centred = x - mean
    var = (centred * centred).mean(dim=dims, keepdim=True)
    y = centred * flow.rsqrt(var + bn.eps)
    if bn.affine:
        y = y * bn.weight.reshape(shape) + bn.bias.reshape(shape)
    if bn.track_running_stats:
        n = x.numel() // x.shape[1]
        m, v = mean.detach().reshape(1, -1), var.detach().reshape(1, -1)
        update_running_stats(bn, m, flow.sqrt(v * (n / max(n - 1, 1) / 2.0)))
    return y


BatchNorm2d, BatchNorm1d = batchnorm_classes(_train_forward)
