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


def preload():
    """Load cuBLAS/cuDNN (retrying, since their order of dependency is not alphabetical)."""
    # OneFlow 0.9.0's CPU graphs on several ranks are not deterministic (first losses and
    # updates differ run to run, and training can go NaN) unless kernels run on the VM's
    # scheduler thread; measured in tests/test_train_determinism.py.
    os.environ.setdefault("ONEFLOW_VM_COMPUTE_ON_WORKER_THREAD", "0")
    # Without a GPU, OneFlow's glog prints CUDA-driver warnings at every start; errors that
    # matter still arrive as Python exceptions.
    os.environ.setdefault("GLOG_minloglevel", "3")
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
