"""How much float32 rounding alone moves an arcface_torch fixture's trajectory (one process, CPU).

    python bench/parity_rounding.py FIXTURE_DIR [--steps 2] [--data DIR]

The fixture's recipe (make_fixtures.py: CosFace softmax, SGD with momentum and weight decay on
every parameter, backbone gradient clipped to a global norm) is run twice from the same imported
weights and FC init on the same batches: once in float32 and once in float64. The maths is the
same in both runs, written here independently of of_face's trainer: the backbone is of_face's
(imported from backbone.pth), the head is a plain normalize-matmul-margin-cross-entropy and the
update is a numpy transcription of torch.optim.SGD + clip_grad_norm_ as the fixture's README
states it. The difference between the two runs is what float32 rounding does to this recipe; the
fixture's sensitivity.json (1 vs 2 torch threads) cannot show it at step 1, where both thread
counts give bit-identical gradients. Figures: docs/BENCHMARKS.md ("arcface_torch parity").
"""
import argparse
import json
from pathlib import Path

import numpy as np

import of_face  # noqa: F401  (preloads libraries; must precede oneflow)
import oneflow as flow
import oneflow.nn.functional as F

from of_face.data.loader import load_batch, normalize
from of_face.data.recordio import RecordDataset
from of_face.models import MODELS
from of_face.models.interop import import_state

ARCFACE_NAMES = {"r18": "iresnet18", "r34": "iresnet34", "r50": "iresnet50", "r100": "iresnet100", "r200": "iresnet200"}


def run(folder, traj, dataset, steps, dtype):
    hp, ml = traj["hyperparameters"], traj["hyperparameters"]["margin_loss"]
    model = MODELS[ARCFACE_NAMES.get(traj["model"], traj["model"])](embedding_size=traj["num_features"])
    model.load_state_dict({k: flow.tensor(v) for k, v in import_state(str(folder / "backbone.pth"), model).items()})
    model = model.to(dtype)
    model.train()
    np_dtype = np.float64 if dtype == flow.float64 else np.float32
    fc = flow.tensor(np.load(folder / "fc_init.npy").astype(np_dtype), requires_grad=True)
    params, momentum, out = list(model.parameters()), {}, []
    for rec in traj["steps"][:steps]:
        images, labels = load_batch(dataset, [r - 1 for r in rec["record_indices"]], [False] * len(rec["labels"]))
        x, y = flow.tensor(normalize(images)).to(dtype), flow.tensor(labels)
        cos = flow.matmul(F.normalize(model(x), dim=1), F.normalize(fc, dim=1), transpose_b=True).clamp(-1, 1)
        onehot = F.one_hot(y, traj["num_classes"]).to(dtype)
        logits = ml["s"] * (cos - ml["m3"] * onehot)  # CosFace (the fixture's m1 = 1, m2 = 0)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        grads = [p.grad.numpy().astype(np.float64) for p in params]
        norm = float(np.sqrt(sum((g ** 2).sum() for g in grads)))
        coef = min(1.0, hp["clip_grad_norm"]["max_norm"] / (norm + 1e-6))
        out.append((float(loss.numpy()), norm))
        with flow.no_grad():
            for i, (p, g) in enumerate(zip(params + [fc], grads + [fc.grad.numpy().astype(np.float64)])):
                w = p.numpy().astype(np.float64)
                d = g * (coef if i < len(params) else 1.0) + hp["weight_decay"] * w
                momentum[i] = d if i not in momentum else hp["momentum"] * momentum[i] + d
                p.copy_(flow.tensor((w - hp["lr"] * momentum[i]).astype(np_dtype)))
                p.grad = None
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("fixture")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "glint14"))
    args = ap.parse_args()
    folder = Path(args.fixture)
    traj = json.loads((folder / "trajectory.json").read_text())
    dataset = RecordDataset(args.data)
    f32 = run(folder, traj, dataset, args.steps, flow.float32)
    f64 = run(folder, traj, dataset, args.steps, flow.float64)
    print(f"{'step':>4} {'reference loss':>15} {'float32 loss':>13} {'float64 loss':>13} {'|f32-f64|':>10} "
          f"{'ref gnorm':>10} {'f32 gnorm':>10} {'f64 gnorm':>10} {'rel f32-f64':>11}")
    for rec, (l32, g32), (l64, g64) in zip(traj["steps"], f32, f64):
        print(f"{rec['step']:>4} {rec['loss']:>15.6f} {l32:>13.6f} {l64:>13.6f} {abs(l32 - l64):>10.2e} "
              f"{rec['backbone_grad_norm']:>10.4f} {g32:>10.4f} {g64:>10.4f} {abs(g32 - g64) / g64:>11.2e}")


if __name__ == "__main__":
    main()
