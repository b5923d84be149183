"""Train 2 steps on the CPU while OneFlow is made to report a CUDA GPU (flow.cuda.is_available ->
True), with a checkpoint every step: the CUDA branches of the trainer's checkpoint path run.

argv: data_root out_dir. Exits with the trainer's status.
"""
import sys
from pathlib import Path

import of_face  # noqa: F401
import oneflow as flow
from of_face.config import load_config
from of_face.train.trainer import run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest's tiny run
from conftest import tiny  # noqa: E402

flow.cuda.is_available = lambda: True  # what a CUDA machine reports (Global.device=cpu keeps tensors on CPU)
root, out = sys.argv[1], sys.argv[2]
cfg = load_config("configs/default.yaml", tiny(root, out, "Data.batch_size=4", "Global.max_steps=2",
                                               "Global.log_interval=1", "Global.save_interval=1",
                                               "Global.keep_checkpoints=0"))
run(cfg)
