"""`of_face.train.main`, but the backbone's BatchNorms use their running statistics (eval mode).

argv: -c CONFIG [-o Section.key=value ...], as of_face.train.main.

In training mode a BatchNorm normalises each rank's part of the batch with that part's own
statistics, so the same global batch gives a different loss on 1 and on 2 ranks. With the
statistics frozen the loss is a plain mean over samples and does not depend on how the batch
is split: tests/test_resume.py uses this to compare the next step's loss after a checkpoint
moved between world sizes with the loss of an unmoved run.
"""
from of_face.config import load_config
from of_face.train.main import parse_args
from of_face.train.trainer import Trainer

args = parse_args()
trainer = Trainer(load_config(args.config, args.override))
trainer.backbone.eval()  # before the graph's first call: the compiled step uses running statistics
trainer.fit()
