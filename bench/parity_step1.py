"""of_face's step 1 on an arcface_torch fixture, tensor by tensor, against torch's (bench/parity_spread.py).

    python bench/parity_step1.py FIXTURE_DIR --torch-dump DIR [--mode graph|eager] [--data DIR]

Builds the training system exactly as scripts/parity_arcface_torch.py does (same config keys,
fc_init.npy, the recorded first batch), takes the pre-clip gradients of an eager copy at the
initial weights, runs the stepper's step 1, and reads back the momentum buffer of every backbone
parameter (step 1 of SGD: clipped gradient + weight decay x weight) and the weights after the step.
Compares each tensor with DIR/f64_step1.npz and DIR/f32_step1.npz (bench/parity_spread.py
--dump-step1) and prints, for the tensors furthest off, the relative L2 difference of:
  grad    the eager copy's pre-clip gradient against torch's
  clipped the stepper's own clipped gradient (momentum - wd x w0), scaled to unit global norm,
          against torch's gradient scaled the same way (so the clip coefficient drops out)
  after   the parameter or buffer after step 1
"""
import argparse
import importlib.util
from pathlib import Path

import numpy as np

import of_face  # noqa: F401  (preloads libraries; must precede oneflow)
import oneflow as flow

from of_face import parallel
from of_face.data.recordio import RecordDataset
from of_face.heads import build_head, fc_table
from of_face.models import build_backbone
from of_face.models.interop import family_of, of_face_name
from of_face.train.system import build

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("parity", REPO / "scripts" / "parity_arcface_torch.py")
parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parity)


class GradNormProbe:
    """The backbone's pre-clip gradient L2 norm (float64) at the system's current weights, computed on
    a copy (same modules built the same way, values copied in before each step), so the step itself
    is untouched. A copy because OneFlow 0.9 cannot run an eager backward through modules that an
    nn.Graph has already run ("This is a oneflow bug")."""

    def __init__(self, cfg, num_classes, system):
        self.system = system
        self.backbone = parallel.broadcast_module(build_backbone(cfg.Model), cfg.Global.device)
        self.head = build_head(cfg, num_classes, system.batch_plan.micro_global)

    def __call__(self, x, y):
        with flow.no_grad():
            for copy, orig in ((self.backbone, self.system.backbone), (self.head, self.system.head)):
                own = copy.state_dict()
                for name, value in orig.state_dict().items():
                    if fc_table.is_table(value):
                        fc_table.load_rows(own[name], fc_table.rows(value))
                    else:
                        parallel.load_into(own[name], parallel.to_numpy(value))
        out = self.head.objective(self.backbone(x), y)
        out.objective.backward()
        total = sum(float(np.sum(parallel.to_numpy(p.grad).astype(np.float64) ** 2))
                    for p in self.backbone.parameters() if p.grad is not None)
        for p in list(self.backbone.parameters()) + list(self.head.parameters()):
            p.grad = None
        return total ** 0.5


def rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("fixture")
    ap.add_argument("--torch-dump", required=True)
    ap.add_argument("--mode", choices=("graph", "eager"), default="graph")
    ap.add_argument("--data", default=str(parity.DEFAULT_DATA))
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--accurate-bn", action="store_true",
                    help="swap bench/accurate_bn.py's BatchNorm into the backbone (of_face uses OneFlow's kernel)")
    ap.add_argument("--shifted-bn", action="store_true",
                    help="swap bench/shifted_bn.py's BatchNorm (the kernel on mean-shifted input) into the backbone")
    ap.add_argument("--dump", help="also write of_face's step-1 tensors (torch names) to this .npz")
    args = ap.parse_args()
    folder = Path(args.fixture)
    traj, _ = parity.read_fixture(folder)
    hp = traj["hyperparameters"]
    cfg = parity.config_for(traj, folder, args.mode, [])
    dataset = RecordDataset(args.data)
    backbone = build_backbone(cfg.Model)
    if args.accurate_bn or args.shifted_bn:
        import accurate_bn  # bench/accurate_bn.py (this folder is on sys.path when run as a script)
        import shifted_bn  # bench/shifted_bn.py
        chosen = accurate_bn if args.accurate_bn else shifted_bn
        accurate_bn.swap_into(backbone, (chosen.BatchNorm2d, chosen.BatchNorm1d))
    system = build(cfg, traj["num_classes"], backbone=backbone, total_steps=len(traj["steps"]), warmup_steps=0)
    with flow.no_grad():
        fc_table.load_rows(system.head.weight, np.load(folder / "fc_init.npy"))
    family = family_of(build_backbone(cfg.Model))
    w0 = {n: parallel.to_numpy(v).astype(np.float64) for n, v in system.backbone.state_dict().items()}
    rec = traj["steps"][0]
    x, y = parity.batch_of(dataset, rec["record_indices"], rec["labels"], rec["input_sha256_float32_nchw"], "step 1")
    images, labels = parallel.batch(x, device="cpu"), parallel.batch(y, device="cpu")
    probe = GradNormProbe(cfg, traj["num_classes"], system)
    gnorm = probe(images, labels)
    # the probe's gradients are cleared after use: recompute them here to keep them
    out = probe.head.objective(probe.backbone(images), labels)
    out.objective.backward()
    grads = {n: parallel.to_numpy(p.grad).astype(np.float64) for n, p in probe.backbone.named_parameters()}
    loss = float(parallel.to_numpy(system.step(images, labels)))
    print(f"step 1 ({args.mode}): loss {loss!r} (fixture {rec['loss']!r}), eager-copy pre-clip norm {gnorm!r} "
          f"(fixture {rec['backbone_grad_norm']!r})")
    slots = system.step.state_dict().slots
    buf = {n[len("backbone."):]: parallel.to_numpy(t).astype(np.float64) for (n, s), t in slots.items()
           if n.startswith("backbone.") and s == "momentum_buf"}
    after = {n: parallel.to_numpy(v).astype(np.float64) for n, v in system.backbone.state_dict().items()}
    # OneFlow's SGD keeps the buffer as torch does (buf = g + wd*w at step 1) : check on the update
    some = max(buf, key=lambda n: np.abs(buf[n]).max())
    sign = np.sign(np.sum((w0[some] - after[some]) * buf[some]))
    clipped = {n: sign * b - hp["weight_decay"] * w0[n] for n, b in buf.items()}
    total = np.sqrt(sum((c ** 2).sum() for c in clipped.values()))
    if args.dump:
        torch_names = {of_face_name(n, family): n for n in traj["final"]["state_dict_l2"]}
        np.savez(args.dump, **{f"grad.{torch_names[n]}": g for n, g in grads.items()},
                 **{f"clipped.{torch_names[n]}": c for n, c in clipped.items()},
                 **{f"after.{torch_names[n]}": a for n, a in after.items() if n in torch_names})
    for variant in ("f64", "f32"):
        ref = np.load(Path(args.torch_dump) / f"{variant}_step1.npz")
        tnames = [k[len("grad."):] for k in ref.files if k.startswith("grad.")]
        tg_total = np.sqrt(sum((ref[f"grad.{n}"] ** 2).sum() for n in tnames))
        rows = []
        tiny = 1e-9 * tg_total  # gradients that are 0 in exact arithmetic (BN shifts before a BN)
        for tn in [n for n in tnames if np.linalg.norm(ref[f"grad.{n}"]) > tiny]:
            on = of_face_name(tn, family)
            g = ref[f"grad.{tn}"]
            rows.append((rel(clipped[on] / total, g / tg_total), rel(grads[on], g), rel(after[on], ref[f"after.{tn}"]),
                         tn, on, g.size, float(np.linalg.norm(g))))
        buffers = [(rel(after[of_face_name(k[6:], family)], ref[k]), k[6:]) for k in ref.files
                   if k.startswith("after.") and ("running" in k)]
        own = np.sqrt(sum((grads[of_face_name(n, family)] ** 2).sum() for n in tnames))
        print(f"\nagainst torch {variant}: eager-copy grad norm {own:.6f} vs torch {tg_total:.6f}")
        print(f"{'clipped':>9} {'grad':>9} {'after':>9} {'size':>8} {'|g|':>9}  tensor")
        for r in sorted(rows, reverse=True)[: args.top]:
            print(f"{r[0]:>9.2e} {r[1]:>9.2e} {r[2]:>9.2e} {r[5]:>8} {r[6]:>9.3g}  {r[3]} ({r[4]})")
        print("median over tensors: " + ", ".join(f"{k} {np.median([r[i] for r in rows]):.2e}"
                                                 for i, k in enumerate(("clipped", "grad", "after"))))
        print("BN running stats, worst: " + ", ".join(f"{n} {v:.2e}" for v, n in sorted(buffers, reverse=True)[:4]))


if __name__ == "__main__":
    main()
