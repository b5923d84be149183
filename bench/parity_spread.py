"""arcface_torch's own spread on a parity fixture: how far torch itself moves from the fixture.

    ~/.cache/of_face/anchor-venv/bin/python bench/parity_spread.py FIXTURE_DIR [--json OUT]
        [--dump-step1 DIR] [--variants f32,f64,ulp] [--data DIR] [--arcface DIR]

Runs in the bench-only PyTorch venv (../shared/anchors/README.md), never in of_face's: it imports
arcface_torch's own files unmodified (get_model, PartialFC_V2, CombinedMarginLoss) and the data
path of ../shared/interop/make_fixtures.py (same RecordIO reader and preprocessing), and replays
the fixture's recipe (trajectory.json: SGD + clip_grad_norm_ over the backbone, as make_fixtures.py
trains) from its backbone.pth and fc_init.npy on its recorded batches, in three variants:

  f32  float32, 1 thread: the fixture's own computation (bit for bit on the machine that made it)
  f64  the same in float64 (torch.set_default_dtype(float64), so PartialFC_V2's buffers follow):
       the same maths, only rounding differs. The parity bounds on final quantities are 3x this.
  ulp  float32, but at step 1 every gradient element moved by one ulp (nextafter towards +inf)
       before clipping: the smallest kernel-level change of the first update.

For each: per step |loss - fixture's| and the relative difference of the pre-clip backbone
gradient norm; after the last step the measures scripts/parity_arcface_torch.py applies (final
state_dict L2 norms as one vector, fc_final, after-training embeddings). --dump-step1 writes, per
variant, the step-1 pre-clip gradients, parameters and buffers after step 1 as float64 .npz
(torch state_dict names), to compare with of_face's tensor by tensor.
The f32 variant reproduces a fixture made with the same torch on the same machine bit for bit
(checked: the r18 fixture of docs/BENCHMARKS.md); on another machine it is a further spread.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
INTEROP = REPO.parent / "shared" / "interop"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("fixture")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "glint14"))
    ap.add_argument("--arcface", default=os.path.expanduser("~/.cache/of_face/recognition/arcface_torch"))
    ap.add_argument("--interop", default=str(INTEROP), help="folder of make_fixtures.py")
    ap.add_argument("--variants", default="f32,f64,ulp")
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--dump-step1", help="folder for the step-1 tensors of each variant (.npz)")
    ap.add_argument("--record", help="merge the f64 variant's final spread into this JSON file (the parity "
                                     "bounds: scripts/parity_spreads.json), keyed by the fixture's trajectory sha256")
    return ap.parse_args(argv)


def replay(mf, torch, arc, folder, traj, data, variant, dump):
    """One variant of the fixture's recipe; returns per-step figures and the final quantities."""
    dtype = torch.float64 if variant == "f64" else torch.float32
    torch.set_default_dtype(dtype)
    hp, ml = traj["hyperparameters"], traj["hyperparameters"]["margin_loss"]
    backbone = arc["get_model"](traj["model"], dropout=0.0, fp16=False, num_features=traj["num_features"])
    backbone.load_state_dict(torch.load(folder / "backbone.pth"))
    margin = arc["CombinedMarginLoss"](ml["s"], ml["m1"], ml["m2"], ml["m3"])
    pfc = arc["PartialFC_V2"](margin, traj["num_features"], traj["num_classes"],
                              hp["partial_fc"]["sample_rate"], False)
    with torch.no_grad():
        pfc.weight.copy_(torch.from_numpy(np.load(folder / "fc_init.npy")))
    opt = torch.optim.SGD(params=[{"params": backbone.parameters()}, {"params": pfc.parameters()}],
                          lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])
    backbone.train()
    pfc.train()
    steps = []
    for rec, (x, y) in zip(traj["steps"], data["train"]):
        loss = pfc(backbone(x.to(dtype)), y.clone())
        loss.backward()
        params = [p for p in backbone.parameters() if p.grad is not None]
        if variant == "ulp" and rec["step"] == 1:
            with torch.no_grad():
                for p in params + [pfc.weight]:
                    p.grad.copy_(torch.nextafter(p.grad, torch.full_like(p.grad, float("inf"))))
        g64 = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)))
        grads = {n: p.grad.double().numpy().copy() for n, p in backbone.named_parameters() if p.grad is not None}
        fc_grad = pfc.weight.grad.double().numpy().copy()
        gnorm = float(torch.nn.utils.clip_grad_norm_(backbone.parameters(), hp["clip_grad_norm"]["max_norm"]))
        opt.step()
        opt.zero_grad()
        steps.append({"step": rec["step"], "loss": float(loss), "grad_norm": gnorm, "grad_norm_f64": g64})
        if dump and rec["step"] == 1:
            after = {f"after.{n}": v.detach().double().numpy() for n, v in backbone.state_dict().items()}
            np.savez(Path(dump) / f"{variant}_step1.npz", fc_grad=fc_grad,
                     fc_after=pfc.weight.detach().double().numpy(), **{f"grad.{n}": g for n, g in grads.items()},
                     **after)
        print(f"  {variant} step {rec['step']}: loss {float(loss)!r} grad norm {gnorm!r}", flush=True)
    backbone.eval()
    with torch.no_grad():
        emb = backbone(data["eval"].to(dtype)).double().numpy()
    norms = {n: float(v.detach().double().norm()) for n, v in backbone.state_dict().items()}
    torch.set_default_dtype(torch.float32)
    return {"steps": steps, "norms": norms, "fc_final": pfc.weight.detach().double().numpy(), "emb": emb}


def spread(traj, folder, run):
    """The differences to the fixture, measured as scripts/parity_arcface_torch.py measures them."""
    per_step = [{"step": r["step"], "loss_abs": abs(s["loss"] - r["loss"]),
                 "grad_norm_rel": abs(s["grad_norm"] - r["backbone_grad_norm"]) / r["backbone_grad_norm"]}
                for r, s in zip(traj["steps"], run["steps"])]
    final = traj["final"]["state_dict_l2"]
    names = [n for n in final if not n.endswith("num_batches_tracked")]
    ref = np.array([final[n]["l2"] for n in names])
    own = np.array([run["norms"][n] for n in names])
    fc_ref = np.load(folder / "fc_final.npy").astype(np.float64)
    emb_ref = np.load(folder / "eval_embeddings_after.npy").astype(np.float64)
    emb = run["emb"]
    cos = (emb * emb_ref).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(emb_ref, axis=1))
    return {"steps": per_step, "final": {
        "norms_rel": float(np.linalg.norm(own - ref) / np.linalg.norm(ref)),
        "fc_final_rel": float(np.linalg.norm(run["fc_final"] - fc_ref) / np.linalg.norm(fc_ref)),
        "embeddings_one_minus_min_cosine": float(1.0 - cos.min()),
        "embeddings_rel": float(np.linalg.norm(emb - emb_ref) / np.linalg.norm(emb_ref)),
        "embeddings_row_norm_rel": float(abs(np.linalg.norm(emb, axis=1).mean() / np.linalg.norm(emb_ref, axis=1).mean()
                                             - 1.0)),
        "embeddings_max_abs_diff": float(np.abs(emb - emb_ref).max()),
        "embeddings_max_abs": float(np.abs(emb_ref).max())}}


def main(argv=None):
    args = parse_args(argv)
    folder = Path(args.fixture)
    sys.path.insert(0, args.interop)
    import make_fixtures as mf  # noqa: E402  (its numpy/mxnet patches, RecordIO reader, preprocessing)
    import torch  # noqa: E402
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.Tensor.cuda = lambda self, *a, **k: self  # PartialFC_V2 moves its buffers with .cuda()
    sys.path.insert(0, args.arcface)
    from backbones import get_model  # noqa: E402
    from losses import CombinedMarginLoss  # noqa: E402
    from partial_fc_v2 import PartialFC_V2  # noqa: E402
    import torch.distributed as dist  # noqa: E402
    arc = {"get_model": get_model, "CombinedMarginLoss": CombinedMarginLoss, "PartialFC_V2": PartialFC_V2}
    traj = json.loads((folder / "trajectory.json").read_text())
    rec = mf.Rec(args.data)
    data = {"train": [mf.load_batch(rec, s["record_indices"]) for s in traj["steps"]],
            "eval": mf.load_batch(rec, [int(r) for r in (folder / "eval_inputs.txt").read_text().split()])[0]}
    for s, (x, _) in zip(traj["steps"], data["train"]):
        assert mf.sha256_array(x.numpy()) == s["input_sha256_float32_nchw"], f"step {s['step']}: another batch"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{mf.free_port()}", rank=0, world_size=1)
    if args.dump_step1:
        os.makedirs(args.dump_step1, exist_ok=True)
    out = {"fixture": folder.name, "model": traj["model"], "seed": traj["seed"],
           "trajectory_sha256": mf.sha256_file(folder / "trajectory.json"), "torch": torch.__version__,
           "variants": {}}
    for variant in args.variants.split(","):
        t0 = time.time()
        run = replay(mf, torch, arc, folder, traj, data, variant, args.dump_step1)
        out["variants"][variant] = s = spread(traj, folder, run)
        s["seconds"] = round(time.time() - t0, 1)
        print(f"{variant}: " + ", ".join(f"step {p['step']} |dloss| {p['loss_abs']:.2g} gnorm rel "
                                         f"{p['grad_norm_rel']:.2g}" for p in s["steps"]))
        print(f"{variant}: final " + ", ".join(f"{k} {v:.3g}" for k, v in s["final"].items()), flush=True)
        if variant == "f32" and any(p["loss_abs"] or p["grad_norm_rel"] for p in s["steps"]):
            print("note: the f32 replay is not bitwise the fixture: another torch build or CPU made it (or the "
                  "recipe differs; a fixture made on this machine must reproduce)")
    dist.destroy_process_group()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    if args.record and "f64" in out["variants"]:
        path = Path(args.record)
        table = json.loads(path.read_text()) if path.exists() else {}
        f64 = out["variants"]["f64"]["final"]
        table[out["trajectory_sha256"]] = {
            "fixture": f"{traj['model']} seed {traj['seed']} ({folder.name})",
            "source": f"bench/parity_spread.py, f64 variant (torch {torch.__version__}, float64 replay vs the "
                      f"fixture), {time.strftime('%Y-%m-%d')}",
            **{k: f64[k] for k in ("norms_rel", "fc_final_rel", "embeddings_one_minus_min_cosine",
                                   "embeddings_row_norm_rel")}}
        path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
