"""The one training loop: data -> step (graph | eager) -> log -> verify -> checkpoint.

Runs identically in every process of the launcher's world; only rank 0 prints and writes.
"""
import csv
import math
import os
import sys
import time

import numpy as np
import oneflow as flow

from of_face import checkpoint, parallel
from of_face.config import ConfigError, save_config
from of_face.data.loader import ShardedLoader
from of_face.data.recordio import RecordDataset
from of_face.heads.partial_fc import PartialFC
from of_face.models import build_backbone
from of_face.train.optim import build_optimizer, build_scheduler, lr_at
from of_face.train.steps import STEPPERS
from of_face.train.verify import Verifier


def log(*args):
    if parallel.rank() == 0:
        print(*args, flush=True)


def prepare_data(cfg):
    """Make sure the training set exists (generating the synthetic one on rank 0) and open it."""
    data = cfg.Data
    if data.dataset == "synthetic":
        if parallel.rank() == 0:
            from of_face.data import synthetic

            summary = synthetic.ensure(
                data.root,
                num_identities=data.synth_identities,
                images_per_identity=data.synth_images_per_identity,
                val_identities=data.synth_val_identities,
                val_pairs=data.synth_val_pairs,
                seed=cfg.Global.seed,
                difficulty=data.synth_difficulty,
            )
            log(f"synthetic identities in {data.root}: {summary['num_classes']} training identities, "
                f"{summary['num_images']} images; verification pairs from {data.synth_val_identities} unseen identities")
        parallel.barrier()
    if not os.path.isdir(data.root):
        raise ConfigError(f"Data.root: folder not found: {data.root}")
    dataset = RecordDataset(data.root)
    num_classes = cfg.Loss.num_classes or dataset.num_classes
    if cfg.Loss.num_classes and cfg.Loss.num_classes != dataset.num_classes:
        raise ConfigError(
            f"Loss.num_classes={cfg.Loss.num_classes} but {data.root} holds {dataset.num_classes} classes"
        )
    labels = dataset.labels()
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise ConfigError(f"{data.root}: image {bad[0]} has label {labels[bad[0]]}, outside 0..{num_classes - 1} "
                          f"({len(bad)} such images)")
    return dataset, num_classes


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        g = cfg.Global
        flow.manual_seed(g.seed)  # same seed on every rank: identical broadcast initialisation
        np.random.seed(g.seed)
        self.out_dir = g.output_dir
        if parallel.rank() == 0:
            os.makedirs(self.out_dir, exist_ok=True)
            save_config(cfg, os.path.join(self.out_dir, "config.yaml"))

        self.dataset, self.num_classes = prepare_data(cfg)
        world = parallel.world_size()
        self.loader = ShardedLoader(
            self.dataset, cfg.Data.batch_size, parallel.rank(), world, seed=g.seed,
            num_workers=cfg.Data.num_workers, flip=cfg.Data.flip,
        )
        if len(self.loader) == 0:
            raise ConfigError(
                f"Data.batch_size={cfg.Data.batch_size} x {world} ranks exceeds the {len(self.dataset)} images"
            )
        self.global_batch = cfg.Data.batch_size * world
        self.total_steps = g.epochs * len(self.loader)
        if g.max_steps:
            self.total_steps = min(self.total_steps, g.max_steps)
        self.warmup_steps = int(cfg.LRScheduler.warmup_epochs * len(self.loader))

        self.backbone = build_backbone(cfg.Model)
        if g.pretrained:
            checkpoint.load_backbone(self.backbone, g.pretrained)
        self.backbone = parallel.broadcast_module(self.backbone, g.device)
        self.head = PartialFC(
            self.num_classes, cfg.Model.embedding_size, margin=cfg.Loss.margin, scale=cfg.Loss.scale,
            sample_rate=cfg.Loss.sample_rate, device=g.device, global_batch=self.global_batch,
        )
        self.optimizer = build_optimizer(cfg.Optimizer, self.backbone, self.head.parameters())
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, self.warmup_steps, cfg.LRScheduler.power)
        self.step_fn = STEPPERS[g.mode](self.backbone, self.head, self.optimizer, self.scheduler, cfg.AMP,
                                        checkpointing=cfg.Model.activation_checkpointing)
        self.verifier = Verifier(cfg, self.backbone)
        self.metrics_path = os.path.join(self.out_dir, "metrics.csv")

    def lr(self, step):
        c = self.cfg
        return lr_at(step, c.Optimizer.lr, self.total_steps, self.warmup_steps, c.LRScheduler.power)

    def verify(self, step, label):
        results = self.verifier.run()
        for name, r in results.items():
            log(f"[verify {label}] step {step} {name}: accuracy {r['accuracy']:.4f} ± {r['std']:.4f}  "
                f"XNorm {r['xnorm']:.2f}  ({r['pairs']} pairs, unseen identities)")
            self._write_metrics({"step": step, "kind": f"verify:{name}", "value": r["accuracy"]})
        return results

    def _write_metrics(self, row):
        if parallel.rank() != 0:
            return
        new = not os.path.exists(self.metrics_path)
        with open(self.metrics_path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", "kind", "value"])
            if new:
                w.writeheader()
            w.writerow(row)

    def fit(self):
        g = self.cfg.Global
        log(f"training {self.cfg.Model.name} ({g.mode} mode) on {parallel.world_size()} rank(s), "
            f"{len(self.dataset)} images, {self.num_classes} classes, global batch {self.global_batch}, "
            f"{self.total_steps} steps")
        if g.eval_before_training and self.verifier.targets:
            self.verify(0, "untrained")
        step, pending, t0, t_start = 0, [], time.time(), time.time()
        losses = []
        for epoch in range(g.epochs):
            self.loader.set_epoch(epoch)
            for images, labels in self.loader:
                if step >= self.total_steps:
                    break
                loss = self.step_fn(parallel.batch(images, device=g.device),
                                    parallel.batch(labels, device=g.device))
                pending.append(loss)
                step += 1
                if step % g.log_interval == 0 or step == self.total_steps:
                    values = [float(parallel.to_numpy(l)) for l in pending]
                    self._check_finite(values, step)
                    losses.extend(values)
                    dt = time.time() - t0
                    speed = len(pending) * self.global_batch / max(dt, 1e-9)
                    eta = (self.total_steps - step) * self.global_batch / max(speed, 1e-9)
                    log(f"step {step}/{self.total_steps}  epoch {epoch}  loss {np.mean(values):.4f}  "
                        f"lr {self.lr(step - 1):.5f}  {speed:.1f} samples/s  eta {eta:.0f}s")
                    self._write_metrics({"step": step, "kind": "loss", "value": float(np.mean(values))})
                    pending, t0 = [], time.time()
                if g.eval_interval and step % g.eval_interval == 0 and step < self.total_steps:
                    self.verify(step, "during training")
            if step >= self.total_steps:
                break
        results = self.verify(step, "final") if self.verifier.targets else {}
        path = checkpoint.save_backbone(self.backbone, self.out_dir, step)
        log(f"done: {step} steps in {time.time() - t_start:.0f}s; backbone saved to {path}")
        return {"losses": losses, "verification": results, "steps": step}

    @staticmethod
    def _check_finite(values, step):
        if not all(math.isfinite(v) for v in values):
            raise FloatingPointError(f"non-finite loss at or before step {step}: {values}")


def run(cfg):
    try:
        return Trainer(cfg).fit()
    except (ConfigError, FileNotFoundError) as e:
        log(f"error: {e}")
        sys.exit(2)
