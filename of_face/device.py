"""Which device a run uses, and whether OneFlow 0.9.0 can run on it.

OneFlow 0.9.0's CUDA wheel carries machine code (SASS) for compute capability 6.0, 6.1, 7.0, 7.5,
8.0 and 8.6 and no PTX: a GPU runs it if a SASS of its major version is there and its minor
version is not lower, i.e. 6.0-8.9. Hopper (9.x: H100, H200) and later have no kernel at all, so
without this check the first kernel fails with an obscure CUDA error ("no kernel image is
available"); Maxwell and older (< 6.0) likewise.
"""
from typing import Callable, Optional, Tuple

DEVICES = ("auto", "cpu", "cuda")
SUPPORTED = ((6, 0), (8, 9))  # inclusive compute-capability range of OneFlow 0.9.0's kernels


class UnsupportedDevice(ValueError):
    """The configured device cannot run this OneFlow build (exit code 2: change the set-up)."""


def device_hint(value: str) -> str:
    """What a wrong Global.device value probably meant."""
    text = str(value).lower()
    if text.startswith("gpu") or text == "nvidia":
        return "for an NVIDIA GPU use 'cuda' (OneFlow's name for it)"
    if text.startswith("cuda:"):
        return "use 'cuda': each rank takes the GPU of its local rank; pick GPUs with CUDA_VISIBLE_DEVICES"
    if text in ("mps", "npu", "xpu", "rocm", "hip", "tpu"):
        return "OneFlow 0.9 runs on 'cpu' and NVIDIA GPUs ('cuda') only"
    return "'auto' takes cuda when OneFlow sees a GPU, else cpu"


def capability_supported(cc: Tuple[int, int]) -> bool:
    return SUPPORTED[0] <= tuple(cc) <= SUPPORTED[1]


def check_device(device: str, log: Optional[Callable[[str], None]] = None, index: Optional[int] = None) -> str:
    """Resolve `device` (auto | cpu | cuda) to cpu or cuda; for cuda, check the GPU this process
    uses (`index`, default: the current one) against SUPPORTED and say which it is through `log`.
    Raises UnsupportedDevice naming the GPU, its compute capability and the supported range."""
    import oneflow as flow

    available = flow.cuda.is_available()
    if device == "auto":
        device = "cuda" if available else "cpu"
    if device != "cuda":
        return device
    if not available:
        raise UnsupportedDevice("Global.device=cuda: OneFlow sees no CUDA GPU (check nvidia-smi and "
                                "CUDA_VISIBLE_DEVICES, or set Global.device=cpu)")
    index = flow.cuda.current_device() if index is None else index
    name = flow.cuda.get_device_name(index)
    cc = tuple(flow.cuda.get_device_capability(index))
    lo, hi = SUPPORTED
    if not capability_supported(cc):
        why = ("Hopper and newer GPUs have no OneFlow 0.9.0 kernels (its wheel holds SASS up to sm_86 and "
               "no PTX); use an Ampere/Ada GPU (A100, A10, RTX 30/40, L4, L40) or a OneFlow build for sm_90"
               if cc >= (9, 0) else "too old for OneFlow 0.9.0's kernels")
        raise UnsupportedDevice(f"GPU {index} ({name}) has compute capability {cc[0]}.{cc[1]}, outside the "
                                f"supported {lo[0]}.{lo[1]}-{hi[0]}.{hi[1]}: {why}")
    if log is not None:
        log(f"device: GPU {index} {name}, compute capability {cc[0]}.{cc[1]} "
            f"(supported {lo[0]}.{lo[1]}-{hi[0]}.{hi[1]})")
    return device
