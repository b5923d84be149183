"""The one training loop: data -> step (graph | eager) -> log -> verify -> checkpoint.

Runs identically in every process of the launcher's world; only rank 0 prints and writes.
"""
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

import numpy as np
import oneflow as flow

from of_face import parallel
from of_face.config import Config, ConfigError, DataCfg
from of_face.data.augment import Augment
from of_face.data.loader import ShardedLoader, SkipBadRecords
from of_face.data.recordio import RecordDataset
from of_face.device import check_device
from of_face.heads import PartialFC
from of_face.heads.memory import memory_of
from of_face.models.weights import save_backbone
from of_face.run import changes, checkpoint, shards
from of_face.run.folder import Claim, RunFolder
from of_face.run.lock import RunFolderError
from of_face.train import snapshot
from of_face.train.errors import PeerFailed, fail
from of_face.train.optim import lr_at
from of_face.train.progress import Progress
from of_face.train.system import BatchPlan, build
from of_face.train.verify import Verifier

T = TypeVar("T")
Position = Tuple[int, int, int]  # (optimizer step, epoch, batches of that epoch already done)


def log(*args: Any) -> None:
    if parallel.rank() == 0:
        print(*args, flush=True)


def prepare_data(cfg: Config) -> Tuple[Any, int]:
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
                f"{summary['num_images']} images; verification pairs from {data.synth_val_identities} "
                "unseen identities")
        parallel.barrier()
    if not os.path.isdir(data.root):
        raise ConfigError(f"Data.root: folder not found: {data.root}")
    if data.dataset == "folder":
        from of_face.data.folder import open_image_dataset

        try:  # a bad label.txt line or an empty identity folder: a data-config problem, one message
            dataset = open_image_dataset(data.root, resize=data.resize)
        except ValueError as e:
            raise ConfigError(f"Data.root: {e}") from None
    else:
        dataset = _open_record_dataset(data)
    if data.skip_bad_records:
        dataset = SkipBadRecords(dataset)
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


def _open_record_dataset(data: DataCfg) -> RecordDataset:
    """RecordDataset on every rank; rank 0 first, so that it alone builds the label index and its
    cache (of_face/data/record_index.py) and the other ranks read that."""
    def open_() -> RecordDataset:
        try:  # the models take 112x112 crops: hold every record to that, not just to `property`
            dataset = RecordDataset(data.root, resize=data.resize, image_size=(112, 112), log=log)
            dataset.labels()  # the labels into the cache too
            return dataset
        except ValueError as e:  # a cut or mismatched train.rec/.idx/property: one message naming the file
            raise ConfigError(f"Data.root: {e}") from None

    dataset, error = None, None
    if parallel.rank() == 0:
        try:
            dataset = open_()
        except (ConfigError, FileNotFoundError) as e:
            error = e
    if not parallel.all_ok(error is None):
        raise error or PeerFailed(f"Data.root: {data.root} could not be opened (see rank 0)")
    return dataset if dataset is not None else open_()


class Trainer:
    """One run: the run folder claimed, the data opened, the system built (and resumed), then `fit()`."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        g = cfg.Global
        np.random.seed(g.seed)  # (OneFlow's generator is seeded by build())
        self.out_dir: str = g.output_dir
        self.folder = RunFolder(self.out_dir, log)
        # a checkpoint to continue from (Global.resume): checked before anything is built or written
        self.resume_path: Optional[str] = self.folder.resolve_resume(g.resume)
        if g.resume == "auto" and not self.resume_path:
            log(f"Global.resume=auto: no checkpoint in {self.out_dir}, starting from scratch")
        resume_meta = checkpoint.read_meta(self.resume_path) if self.resume_path else None
        # rank 0 locks the folder (another live run refused) and decides the run id
        self.claim: Optional[Claim] = self._agree(lambda: self.folder.claim(resume_meta))
        self.run_id: Optional[str] = self.claim.run_id if self.claim else None
        if resume_meta is not None:
            changes.print_changes(self.resume_path, resume_meta, cfg, log)

        self.dataset, self.num_classes = prepare_data(cfg)
        self.loader = self._open_loader()
        self.system = build(cfg, self.num_classes, len(self.loader))
        self.plan: BatchPlan = self.system.batch_plan
        self.global_batch = self.plan.step_global  # samples per optimizer step
        self.total_steps, self.warmup_steps = self.system.total_steps, self.system.warmup_steps
        self.backbone, self.step_fn = self.system.backbone, self.system.step
        self.verifier = Verifier(cfg, self.backbone)
        self.start: Position = (0, 0, 0)
        self.folder.last_good = self.resume_path  # the newest good state of this run's lineage
        if self.resume_path:  # the load names a model or class-count mismatch; then the other guarded keys
            meta = self._resume(self.resume_path, resume_meta)
        self._agree(lambda: RunFolder.refuse_foreign(self.claim, g.overwrite))  # another run's work
        if parallel.rank() == 0:  # every check passed: only now is anything written
            self.folder.prepare(self.claim, cfg, self.start[0] if self.resume_path else None)
            for name in self.folder.remove_stale_temporaries():
                log(f"removed {name}: a temporary file left by an interrupted run")
        if self.resume_path:
            log(f"resumed from {self.resume_path}: step {self.start[0]}, epoch {self.start[1]}, "
                f"batch {self.start[2]} of {len(self.loader)} (saved on {meta['world_size']} rank(s))")

    def _open_loader(self) -> ShardedLoader:
        cfg, world = self.cfg, parallel.world_size()
        try:
            loader = ShardedLoader(  # one batch = the micro-batches of one optimizer step
                self.dataset, BatchPlan.from_config(cfg).loader_batch, parallel.rank(), world, seed=cfg.Global.seed,
                num_workers=cfg.Data.num_workers, flip=cfg.Data.flip, augment=Augment.from_config(cfg.Data),
            )
        except ValueError as e:  # fewer images than one global batch
            raise ConfigError(f"Data.batch_size={cfg.Data.batch_size}: {e}") from None
        if len(loader) == 0:
            raise ConfigError(
                f"Data.batch_size={cfg.Data.batch_size} x {world} ranks exceeds the {len(self.dataset)} images"
            )
        return loader

    def _resume(self, path: str, saved_meta: dict) -> dict:
        """Restore the checkpoint into the fresh system, check the config's guarded keys, find
        where the data continues. Returns the checkpoint's metadata."""
        more = changes.allowed(changes.CLASS_COUNT, self.cfg)
        meta = snapshot.restore(checkpoint.load(path), self.system, path, more_classes=more)
        changes.check(path, saved_meta, self.cfg)
        if meta["num_classes"] < self.num_classes:
            log(f"resume: {self.num_classes - meta['num_classes']} new classes ({meta['num_classes']} -> "
                f"{self.num_classes}): their FC rows start as a fresh run's, their optimizer state at zero")
        self.start = self._resume_position(meta)
        return meta

    def _agree(self, check: Callable[[], T]) -> Optional[T]:
        """Run a run-folder `check` on rank 0; every rank learns its outcome (one collective), so a
        refusal stops them all rather than leaving the others in a later collective. Returns
        rank 0's result (None on the other ranks)."""
        error, result = None, None
        if parallel.rank() == 0:
            try:
                result = check()
            except RunFolderError as e:
                error = e
        if not parallel.all_ok(error is None):
            raise error or RunFolderError(f"Global.output_dir: {self.out_dir} refused (see rank 0)")
        return result

    @property
    def head(self) -> PartialFC:
        return self.system.head

    @property
    def optimizer(self) -> flow.optim.Optimizer:
        return self.system.optimizer

    def _resume_position(self, meta: dict) -> Position:
        """Where the data order continues: the same (epoch, batch) when the global batch is the
        same; otherwise the first batch of the new size with no sample already trained on."""
        step, epoch, done = int(meta["step"]), int(meta["epoch"]), int(meta["batch_in_epoch"])
        if meta["global_batch"] != self.global_batch:
            done = -(-done * meta["global_batch"] // self.global_batch)
            log(f"note: global batch {meta['global_batch']} -> {self.global_batch}; continuing epoch {epoch} "
                f"at batch {done} (the LR schedule is recomputed for {self.total_steps} steps)")
        if done >= len(self.loader):
            epoch, done = epoch + 1, 0
        return step, epoch, done

    def save_checkpoint(self, step: int, epoch: int, batch_in_epoch: int) -> str:
        g = self.cfg.Global
        meta = {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "steps_per_epoch": len(self.loader),
                "global_batch": self.global_batch, "batch_plan": self.plan.to_dict(),
                "total_steps": self.total_steps, "mode": g.mode, "config": self.cfg.to_dict(),
                "run_id": self.run_id,  # rank 0's (only rank 0's meta is written)
                "checkpoint_format": shards.resolve_format(g.checkpoint_format, self.system.head)}
        return self.folder.save(snapshot.capture(self.system, step, meta), keep=g.keep_checkpoints)

    def lr(self, step: int) -> float:
        c = self.cfg
        return lr_at(step, c.Optimizer.lr, self.total_steps, self.warmup_steps, c.LRScheduler.power)

    def verify(self, step: int, label: str) -> Dict[str, Any]:
        with self.progress.paused():  # verification time is not training time (samples/s, ETA)
            results = self.verifier.run()
        for name, r in results.items():
            self.progress.verification(step, name, r, label)  # prints (rank 0) and appends to metrics.csv
        return results

    def fit(self) -> Dict[str, Any]:
        g = self.cfg.Global
        chunks = getattr(getattr(self.step_fn, "plan", None), "chunks", 1)  # StreamStep's K (1: one job)
        fc = memory_of(self.cfg, self.system.head, self.plan.micro_global, chunks)
        log(f"training {self.cfg.Model.name} ({g.mode} mode) on {parallel.world_size()} rank(s), "
            f"{len(self.dataset)} images, {self.num_classes} classes, global batch {self.global_batch}, "
            f"{self.total_steps} steps; {fc.describe()}")
        step, start_epoch, skip = self.start
        self.progress = Progress(self.total_steps, self.global_batch, self.out_dir,  # rich bar or plain lines
                                 start_step=step)
        if g.eval_before_training and self.verifier.targets and not self.resume_path:
            self.verify(0, "untrained")
        pending, t_start = [], time.time()
        losses = []
        self._nonfinite = []  # steps of the current run of non-finite losses
        for epoch in range(start_epoch, g.epochs):
            batch_in_epoch = skip if epoch == start_epoch else 0
            self.loader.set_epoch(epoch, batch_in_epoch)
            for images, labels in self.loader:
                if step >= self.total_steps:
                    break
                loss = self.step_fn(parallel.batch(images, device=g.device),
                                    parallel.batch(labels, device=g.device))
                pending.append(loss)
                step += 1
                batch_in_epoch += 1
                if step % g.log_interval == 0 or step == self.total_steps:
                    values = [float(parallel.to_numpy(loss)) for loss in pending]
                    self._check_finite(values, step)
                    losses.extend(values)
                    scale = self.step_fn.loss_scale()  # AMP's live loss scale (graph mode, rank 0), else None
                    self.progress.update(step, epoch, values, self.lr(step - 1), scale)
                    pending = []
                if g.save_interval and step % g.save_interval == 0 and step < self.total_steps:
                    self._save_if_finite(step, epoch, batch_in_epoch, pending)
                if g.eval_interval and step % g.eval_interval == 0 and step < self.total_steps:
                    self.verify(step, "during training")
            if step >= self.total_steps:
                break
        if step > self.start[0]:
            self._save_if_finite(step, epoch, batch_in_epoch, pending)
        results = self.verify(step, "final") if self.verifier.targets else {}
        path = save_backbone(self.backbone, self.out_dir, step)
        self.progress.close()  # stops the bar; writes loss.png, lr.png, verification.png
        log(f"done: {step} steps in {time.time() - t_start:.0f}s; backbone saved to {path}")
        return {"losses": losses, "verification": results, "steps": step}

    def _check_finite(self, values: List[float], step: int) -> None:
        """Count consecutive non-finite step losses (values are those of steps ..step); stop with
        one message once Global.max_nonfinite_steps of them are in a row."""
        limit = self.cfg.Global.max_nonfinite_steps
        for s, v in zip(range(step - len(values) + 1, step + 1), values):
            if math.isfinite(v):
                self._nonfinite = []
                continue
            self._nonfinite.append(s)
            if len(self._nonfinite) >= limit:
                first = self._nonfinite[0]
                where = f"step {s}" if first == s else f"steps {first}..{s}"
                good = self.folder.last_good or "none (no checkpoint was saved)"
                raise NonFiniteLoss(
                    f"loss is {v} at {where} ({len(self._nonfinite)} consecutive non-finite step(s), "
                    f"Global.max_nonfinite_steps={limit}); stopped at step {s}. Last good checkpoint: {good}")

    def _save_if_finite(self, step: int, epoch: int, batch_in_epoch: int, pending: list) -> Optional[str]:
        """A checkpoint of the current state, unless a recent loss was not finite (then the
        previous checkpoints stay the newest: resuming never starts from a diverged state)."""
        values = [float(parallel.to_numpy(loss)) for loss in pending]  # already computed: cheap
        if self._nonfinite or not all(math.isfinite(v) for v in values):
            log(f"step {step}: not saving a checkpoint, the loss is not finite")
            return None
        path = self.save_checkpoint(step, epoch, batch_in_epoch)
        log(f"step {step}: checkpoint {path}")
        return path


class NonFiniteLoss(RuntimeError):
    """Training diverged: the loss stayed NaN/inf for Global.max_nonfinite_steps steps."""


def run(cfg: Config) -> Dict[str, Any]:
    """Train; any error ends this process with one line and its exit code (train/errors.py)."""
    try:
        check_device(cfg.Global.device, log)  # a GPU OneFlow 0.9 has no kernels for: say so first
        return Trainer(cfg).fit()
    except (Exception, KeyboardInterrupt) as e:
        fail(e, int(os.environ.get("WORLD_SIZE", "1")), cfg.Global.output_dir)
