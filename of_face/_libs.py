"""Make the cuDNN 8 / cuBLAS 11 libraries from the nvidia-* pip packages loadable.

OneFlow 0.9.0 links against them but its wheel does not ship them. The dynamic loader
reads LD_LIBRARY_PATH only when a process starts, so inside a running interpreter we
preload every shared object with RTLD_GLOBAL; later dlopen() calls by soname then
resolve to the already-loaded copies. `make setup` also installs a .pth hook that runs
this at interpreter start-up, which covers `python -m oneflow.distributed.launch`.
"""
import ctypes
import glob
import os
import site
import sys


def nvidia_lib_dirs():
    roots = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
    dirs = []
    for root in roots:
        for sub in ("cublas", "cudnn"):
            d = os.path.join(root, "nvidia", sub, "lib")
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
    return dirs


def gpu_present() -> bool:
    """Whether this process can see an NVIDIA GPU, judged without importing OneFlow (the settings
    below must be in the environment before OneFlow starts)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")


def process_env(device: str = "auto") -> dict:
    """Environment settings for a process that trains on `device` (cpu | cuda | auto), to be set
    before OneFlow starts. Each setting is for one device only:

    * CPU: OneFlow 0.9.0's CPU graphs on several ranks are not deterministic (first losses and
      updates differ run to run, and training can go NaN) unless kernels run on the VM's scheduler
      thread (ONEFLOW_VM_COMPUTE_ON_WORKER_THREAD=0; measured in tests/test_train_determinism.py).
      Without a GPU, OneFlow's glog prints CUDA-driver warnings at every start (GLOG_minloglevel=3;
      errors that matter still arrive as Python exceptions).
    * CUDA: neither. The worker thread is what keeps GPU kernels overlapping, and glog is where
      CUDA and NCCL errors are reported.
    """
    if device == "auto":
        device = "cuda" if gpu_present() else "cpu"
    env = {"OF_FACE_DEVICE": device}
    if device == "cpu":
        env.update(ONEFLOW_VM_COMPUTE_ON_WORKER_THREAD="0", GLOG_minloglevel="3")
    return env


def preload():
    """Load cuBLAS/cuDNN (retrying, since their order of dependency is not alphabetical)."""
    # device settings (process_env): the launcher says which device (OF_FACE_DEVICE); a process
    # started otherwise gets the ones for the device it can see. A value already set wins.
    for key, value in process_env(os.environ.get("OF_FACE_DEVICE", "auto")).items():
        os.environ.setdefault(key, value)
    libs = [p for d in nvidia_lib_dirs() for p in sorted(glob.glob(os.path.join(d, "lib*.so*")))]
    pending = libs
    for _ in range(len(libs) + 1):
        failed = []
        for path in pending:
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                failed.append(path)
        if not failed or len(failed) == len(pending):
            break
        pending = failed
    # Child processes (workers, launcher children) find them through the loader path too.
    extra = ":".join(nvidia_lib_dirs())
    if extra and extra not in os.environ.get("LD_LIBRARY_PATH", ""):
        os.environ["LD_LIBRARY_PATH"] = extra + ":" + os.environ.get("LD_LIBRARY_PATH", "")
