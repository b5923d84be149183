"""A run folder (Global.output_dir) belongs to one run, and a run never loses an earlier one's work.

`RunFolder` owns the folder: its lock (of_face/run/lock.py), the names of the files it holds,
which checkpoints are there and which one a resume takes, saving into it and rotation, and the
temporaries an interrupted run left. One checkpoint's format is of_face/run/checkpoint.py.

- Every checkpoint records its run id (`meta["run_id"]`); a resumed run keeps the id of the
  checkpoint it continues (its lineage; checkpoints from before run ids are LEGACY_RUN_ID's).
  Rotation deletes only checkpoints of this lineage.
- A fresh run into a folder that holds another run's checkpoints or backbone.npz is refused
  unless `Global.resume=auto` (continue it) or `Global.overwrite=true`, which moves that run's
  files into `replaced-<time>/` inside the folder (moved, not deleted: nothing is lost).
- The first config stays `config.yaml`; each resume adds `config-resume-<step>.yaml`;
  metrics.csv is cut back to the resumed step. What a resume may change: of_face/run/changes.py.
"""
import csv
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

from of_face import io, parallel
from of_face.config import save_config
from of_face.io import atomic_write
from of_face.models.weights import BACKBONE_FILE
from of_face.run import checkpoint, shards
from of_face.run.checkpoint import CheckpointError, CheckpointState, CheckpointWriteError
from of_face.run.lock import RunFolderError, take_lock
from of_face.run.names import CONFIG_FILE, LEGACY_RUN_ID, METRICS_FILE, PLOTS, RESUME_CONFIG


Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass
class Claim:
    """What rank 0 found when it took the folder: the run id and another run's files (if any)."""
    out_dir: str
    run_id: str
    fresh: bool
    foreign: List[str] = field(default_factory=list)


class RunFolder:
    """Global.output_dir of one run. Listing and resolving work on any rank; `claim`, `prepare`,
    `remove_stale_temporaries` and rotation are rank 0's; `save` is collective."""

    CONFIG_FILE, METRICS_FILE, PLOTS, BACKBONE_FILE = CONFIG_FILE, METRICS_FILE, PLOTS, BACKBONE_FILE

    def __init__(self, path: str, log: Optional[Log] = None):
        self.path = path
        self.log = log or _quiet
        self.run_id: Optional[str] = None
        self.last_good: Optional[str] = None  # the newest good state of this run's lineage

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    # ----------------------------------------------------------------- the checkpoints in it

    def checkpoints(self) -> List[Tuple[int, str]]:
        """[(step, path)] of the `ckpt-*` checkpoints (files and sharded folders), oldest first."""
        if not os.path.isdir(self.path):
            return []
        found = [(int(m.group(1)), self.file(n)) for n in os.listdir(self.path) if (m := checkpoint.CKPT_RE.match(n))]
        return sorted(found)

    def latest(self) -> Optional[str]:
        """Newest readable checkpoint, or None; unreadable newer ones are reported and skipped."""
        for _, path in reversed(self.checkpoints()):
            try:
                checkpoint.read_meta(path)
                return path
            except CheckpointError as e:
                self.log(f"warning: skipping {e}")
        return None

    def resolve_resume(self, value: Optional[str]) -> Optional[str]:
        """Global.resume -> checkpoint path or None. 'auto': the newest complete one here (None if
        there is none); a folder: its newest; a file: that file (it must exist)."""
        if value in (None, "", "none", "false", "no"):
            return None
        if value == "auto":
            return self.latest()
        if os.path.isdir(value) and not checkpoint.is_training_checkpoint(value):
            path = RunFolder(value, self.log).latest()
            if path is None:
                raise CheckpointError(f"Global.resume: no readable ckpt-*.npz checkpoint in {value}")
            return path
        if not os.path.exists(value):
            raise CheckpointError(f"Global.resume: checkpoint not found: {value}")
        return value

    def lineage(self) -> List[Tuple[str, str]]:
        """[(path, run id)] of the readable checkpoints, oldest first."""
        found = []
        for _, path in self.checkpoints():
            try:
                found.append((path, checkpoint.read_meta(path).get("run_id") or LEGACY_RUN_ID))
            except CheckpointError:
                pass
        return found

    def rotate(self, keep: int, run_id: str) -> List[str]:
        """Delete all but the newest `keep` checkpoints *of run `run_id`* (another run's are never touched)."""
        mine = [p for p, rid in self.lineage() if rid == run_id]
        for old in mine[:-keep]:
            shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
        return mine[:-keep]

    def save(self, state: CheckpointState, keep: int = 0) -> str:
        """Write `state` as ckpt-<step> here (collective) and return its path; `keep` > 0 then
        deletes all but the newest `keep` checkpoints of this run. A failed write raises
        CheckpointWriteError on every rank naming the file and the last good checkpoint."""
        path = self.file(checkpoint.checkpoint_name(state.step, state.sharded))
        try:
            checkpoint.save(path, state)
        except CheckpointWriteError as e:
            raise CheckpointWriteError(
                f"{e}; the run stops. Last good checkpoint: {self.last_good or 'none (no checkpoint was saved)'}; "
                "free some space and resume with Global.resume=auto") from None
        if parallel.rank() == 0 and keep > 0:
            self.rotate(keep, state.meta.get("run_id") or LEGACY_RUN_ID)
        parallel.barrier()
        self.last_good = path
        return path

    def remove_stale_temporaries(self) -> List[str]:
        """Delete temporaries a killed run left behind (of_face.io's `.<name>.tmp<pid>` scheme,
        which every atomic writer uses, and unfinished sharded saves); rank 0 only. Their names."""
        if parallel.rank() != 0:
            return []
        return shards.remove_partials(self.path) + io.remove_stale_temporaries(self.path, only_dead=True)

    # ----------------------------------------------------------------- claiming it

    def claim(self, resume_meta: Optional[dict]) -> Claim:
        """Rank 0: lock the folder and decide this run's id; list another run's work found here
        (refused later by `refuse_foreign`, after the data and the checkpoint were checked)."""
        os.makedirs(self.path, exist_ok=True)
        if resume_meta is not None:
            run_id = resume_meta.get("run_id") or LEGACY_RUN_ID
        else:
            run_id = uuid.uuid4().hex[:12]
        held = take_lock(self.path, run_id, self.log)
        fresh = resume_meta is None and held is None
        if held is not None and resume_meta is None:
            run_id = held.get("run_id") or run_id  # the same process again: the same run
        foreign = [p for p, rid in self.lineage() if rid != run_id]
        if fresh and os.path.isfile(self.file(BACKBONE_FILE)):
            foreign.append(self.file(BACKBONE_FILE))
        return Claim(self.path, run_id, fresh, foreign)

    @staticmethod
    def refuse_foreign(claim: Claim, overwrite: bool) -> None:
        """A run never trains over another run's checkpoints unless told to (Global.overwrite)."""
        if claim.foreign and not overwrite:
            out = claim.out_dir
            more = " ..." if len(claim.foreign) > 3 else ""
            names = ", ".join(os.path.basename(p) for p in claim.foreign[:3]) + more
            raise RunFolderError(
                f"Global.output_dir: {out} holds another run's work ({names}); continue it with "
                "Global.resume=auto, or set Global.overwrite=true to move its files into "
                f"{os.path.join(out, 'replaced-<time>')}/ and start afresh, or pick another output_dir")

    def _move_aside(self, claim: Claim) -> Optional[str]:
        """Global.overwrite: the other run's files into replaced-<time>/ (renames: cheap, nothing lost)."""
        names = {os.path.basename(p) for p in claim.foreign}
        if claim.fresh:
            names |= {n for n in os.listdir(self.path)
                      if n in (METRICS_FILE, CONFIG_FILE) or n.startswith(RESUME_CONFIG.split("{")[0])
                      or n in {f"{p}.png" for p in PLOTS}}
        if not names:
            return None
        dest = self.file(time.strftime("replaced-%Y%m%d-%H%M%S"))
        os.makedirs(dest, exist_ok=True)
        for n in sorted(names):
            os.replace(self.file(n), os.path.join(dest, n))
        self.log(f"Global.overwrite: moved the earlier run's {len(names)} file(s) to {dest}")
        return dest

    def prepare(self, claim: Claim, cfg, resumed_step: Optional[int]) -> None:
        """Rank 0, once every check passed: move another run's files aside (overwrite), write the
        config (config.yaml for a fresh run, config-resume-<step>.yaml for a resume), cut
        metrics.csv back to the resumed step (a fresh run starts it empty)."""
        self._move_aside(claim)
        if resumed_step is None or not os.path.isfile(self.file(CONFIG_FILE)):
            save_config(cfg, self.file(CONFIG_FILE))
        if resumed_step is not None:
            save_config(cfg, self.file(RESUME_CONFIG.format(step=resumed_step)))
        dropped = cut_metrics(self.file(METRICS_FILE), -1 if resumed_step is None else resumed_step, self.log)
        if dropped:
            self.log(f"{METRICS_FILE}: dropped {dropped} row(s) after step {resumed_step or 0} "
                     "(steps that were not saved)")


def cut_metrics(path: str, step: int, warn: Callable[[str], None] = print) -> int:
    """Keep only metrics.csv rows at steps <= step (all rows gone for step < 0); returns how many
    were dropped. Rewritten atomically."""
    # a crash may have left a partial last row or NUL bytes, which csv cannot read: cut them first
    if not os.path.isfile(path) or not io.cut_to_complete_rows(path, warn):
        return 0
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    if not header:
        return 0

    def step_of(r):
        try:
            return int(float(r.get("step") or 0))
        except ValueError:
            return 0
    kept = [r for r in rows if step >= 0 and step_of(r) <= step]
    if len(kept) == len(rows):
        return 0
    with atomic_write(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        w.writeheader()
        w.writerows(kept)
    return len(rows) - len(kept)
