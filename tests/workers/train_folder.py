"""Train through the real Trainer with configs/default.yaml + overrides; record what each step sees.

argv: out.json override... Rank 0 writes {"losses", "steps", "num_classes", "images", "batches": [{"labels",
"red"}]} where "red" is each image's mean normalised red value in the global batch the step received.
"""
import json
import sys

import of_face  # noqa: F401  (before oneflow)
from of_face import parallel
from of_face.config import load_config
from of_face.train.trainer import Trainer

out, overrides = sys.argv[1], sys.argv[2:]
trainer = Trainer(load_config("configs/default.yaml", overrides))
batches, step = [], trainer.step_fn


def recording_step(images, labels):
    batches.append({"labels": parallel.to_numpy(labels).tolist(),
                    "red": parallel.to_numpy(images)[:, 0].mean(axis=(1, 2)).tolist()})
    return step(images, labels)


recording_step.loss_scale = step.loss_scale  # the trainer reads AMP's scale from its stepper
trainer.step_fn = recording_step
result = trainer.fit()
if parallel.rank() == 0:
    json.dump({"losses": result["losses"], "steps": result["steps"], "num_classes": trainer.num_classes,
               "images": len(trainer.dataset), "batches": batches}, open(out, "w"))
