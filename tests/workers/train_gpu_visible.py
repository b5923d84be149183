"""Train 2 steps on the CPU while OneFlow is made to report a CUDA GPU (flow.cuda.is_available ->
True), with a checkpoint every step: the CUDA branches of the trainer's checkpoint path run.

argv: data_root out_dir. Exits with the trainer's status.
"""
import sys

import of_face  # noqa: F401
import oneflow as flow
from of_face.config import load_config
from of_face.train.trainer import run

flow.cuda.is_available = lambda: True  # what a CUDA machine reports (Global.device=cpu keeps tensors on CPU)
root, out = sys.argv[1], sys.argv[2]
cfg = load_config("configs/default.yaml", [
    "Model.name=iresnet", "Model.layers=[1,1,1,1]", "Model.width=8", "Model.embedding_size=32",
    "Data.dataset=rec", f"Data.root={root}", "Data.val_targets=[]", "Data.batch_size=4",
    "Global.device=cpu", "Global.eval_before_training=false", f"Global.output_dir={out}",
    "Global.max_steps=2", "Global.log_interval=1", "Global.save_interval=1", "Global.keep_checkpoints=0"])
run(cfg)
