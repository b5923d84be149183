"""Resume a checkpoint with more classes (Global.allow_resume_changes=[Loss.num_classes]).

`python -m of_face.train.launch --module tests.workers.resume_classes -c CONFIG -o ...`, the
config naming the checkpoint to resume. Rank 0 writes to $RESUME_CLASSES_OUT (.npz): `fresh`,
the FC rows a fresh run of this config starts with (built first, with the same seed); `loaded`,
the FC rows right after the Trainer resumed; `momentum`, the SGD momentum the resume handed the
stepper; `trained`, the FC rows after `fit()`; `losses`.
tests/test_resume_classes.py runs it on 2 ranks.
"""
import os

import numpy as np

import of_face  # noqa: F401
from of_face import parallel
from of_face.heads import fc_table
from of_face.train.errors import guard_rank
from of_face.train.main import parse_args

guard_rank()  # die with the launcher
out = os.environ["RESUME_CLASSES_OUT"]
args = parse_args()
from of_face.config import load_config  # noqa: E402
from of_face.train import snapshot  # noqa: E402
from of_face.train.system import build  # noqa: E402
from of_face.train.trainer import Trainer  # noqa: E402

handed = {}  # the optimizer state the resume hands the stepper (graph mode: before it compiles)
real_restore = snapshot.restore


def restore(state, system, path, more_classes=False):
    real_load = system.step.load_state_dict

    def load(steps):
        handed.update(steps.slots)
        real_load(steps)
    system.step.load_state_dict = load
    return real_restore(state, system, path, more_classes)


snapshot.restore = restore
cfg = load_config(args.config, args.override)
fresh = fc_table.rows(build(cfg, cfg.Loss.num_classes, 1).head.weight)
trainer = Trainer(cfg)
loaded = fc_table.rows(trainer.head.weight)
momentum = fc_table.rows(handed[("head.weight", "momentum_buf")])
result = trainer.fit()
trained = fc_table.rows(trainer.head.weight)
if parallel.rank() == 0:
    np.savez(out, fresh=fresh, loaded=loaded, momentum=momentum, trained=trained,
             losses=np.array(result["losses"]))
