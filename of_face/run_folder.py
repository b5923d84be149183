"""A run folder (Global.output_dir) belongs to one run, and a run never loses an earlier one's work.

- A lock file `.of_face.lock` (JSON: pid, host, start time, run id) is taken by rank 0 at start
  and removed when the process exits. Another live run's lock refuses the start with one message;
  a lock left by a dead process on this host (kill -9, OOM) is taken over (one still exiting is
  waited for up to LOCK_WAIT_S); a lock of another host cannot be checked and is refused, naming
  the file to delete if that run is known to be gone.
- Every checkpoint records its run id (`meta["run_id"]`); a resumed run keeps the id of the
  checkpoint it continues (its lineage). Rotation deletes only checkpoints of this lineage.
- A fresh run into a folder that holds another run's checkpoints or backbone.npz is refused
  unless `Global.resume=auto` (continue it) or `Global.overwrite=true`, which moves that run's
  files into `replaced-<time>/` inside the folder (moved, not deleted: nothing is lost).
- Resuming compares the checkpoint's stored config with the new one before anything is written:
  differences are printed; a change of the model, the optimizer or the class count is refused
  unless listed in `Global.allow_resume_changes`. The first config stays `config.yaml`; each
  resume adds `config-resume-<step>.yaml`; metrics.csv is cut back to the resumed step.
- Ranks die with their launcher: `die_with_parent()` (Linux prctl PR_SET_PDEATHSIG).
"""
import atexit
import csv
import json
import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from of_face.config import ConfigError, save_config
from of_face.train.metrics import CONFIG_FILE, FIELDS, METRICS_FILE, PLOTS
from of_face.io import atomic_write

LOCK_FILE = ".of_face.lock"
LEGACY_RUN_ID = "legacy"  # checkpoints written before run ids existed: one lineage of their own
RESUME_CONFIG = "config-resume-{step:08d}.yaml"
# what resuming may not change unless Global.allow_resume_changes lists the key (or its section)
GUARDED = ("Model.", "Optimizer.name", "Loss.num_classes")
IGNORED = ("Global.resume", "Global.overwrite", "Global.allow_resume_changes")


class RunFolderError(ConfigError):
    """The run folder cannot be used for this run (held by another run, holds another run's work)."""


LOCK_WAIT_S = 10.0  # a holder on this host that is exiting (its launcher just killed it) gets this long


def pid_alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, someone else's
        return True
    try:  # a zombie (exited, not yet reaped) is not a run
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _outlives(pid: int, seconds: float) -> bool:
    """Whether process `pid` is still alive after up to `seconds` of waiting for it to end."""
    deadline = time.time() + seconds
    while pid_alive(pid):
        if time.time() >= deadline:
            return True
        time.sleep(0.2)
    return False


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Linux: this process gets `sig` when its parent (the launcher) dies, so killing only the
    launcher never leaves ranks training and writing on their own. No-op elsewhere."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before prctl took effect
        os._exit(1)


# --------------------------------------------------------------------------- lock


def read_lock(out_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(out_dir, LOCK_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _release(path: str, pid: int) -> None:
    try:
        with open(path) as f:
            if json.load(f).get("pid") == pid:
                os.remove(path)
    except (OSError, ValueError):
        pass


def take_lock(out_dir: str, run_id: str, log: Optional[Callable[[str], None]] = None) -> Optional[dict]:
    """Lock out_dir for this process (removed at exit). Returns the lock this same process already
    held there (a second Trainer in one process is the same run), else None. RunFolderError when
    another live run holds it."""
    path = os.path.join(out_dir, LOCK_FILE)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id,
          "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    tmp = f"{path}.new{os.getpid()}"
    for _ in range(3):
        with open(tmp, "w") as f:
            json.dump(me, f)
        try:
            os.link(tmp, path)  # complete content or no lock at all; fails if a lock exists
            atexit.register(_release, path, os.getpid())
            return None
        except FileExistsError:
            pass
        finally:
            os.remove(tmp)
        held = read_lock(out_dir) or {}
        pid, host = held.get("pid"), held.get("host")
        if pid == os.getpid() and host == me["host"]:
            return held
        if host == me["host"] and isinstance(pid, int) and not _outlives(pid, LOCK_WAIT_S):
            if log:
                log(f"{out_dir}: taking over the lock of a run that is gone (pid {pid}, started {held.get('started')})")
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        raise RunFolderError(
            f"Global.output_dir: {out_dir} is in use by another run (pid {pid} on host {host}, started "
            f"{held.get('started')}; lock file {path}). Wait for it, pick another output_dir, or delete the "
            "lock file if that run is gone")
    raise RunFolderError(f"Global.output_dir: could not take the lock {path} (it keeps changing)")


# --------------------------------------------------------------------------- claiming the folder


@dataclass
class Claim:
    """What rank 0 found when it took the folder: the run id and another run's files (if any)."""
    out_dir: str
    run_id: str
    fresh: bool
    foreign: List[str] = field(default_factory=list)


def claim(out_dir: str, resume_meta: Optional[dict], checkpoints: List[Tuple[str, str]],
          log: Optional[Callable[[str], None]] = None) -> Claim:
    """Lock out_dir and decide this run's id; list another run's work found there (refused later
    by `refuse_foreign`, after the data and the checkpoint were checked). `checkpoints`:
    [(path, run id)] of the complete checkpoints in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    if resume_meta is not None:
        run_id = resume_meta.get("run_id") or LEGACY_RUN_ID
    else:
        run_id = uuid.uuid4().hex[:12]
    held = take_lock(out_dir, run_id, log)
    fresh = resume_meta is None and held is None
    if held is not None and resume_meta is None:
        run_id = held.get("run_id") or run_id  # the same process again: the same run
    foreign = [p for p, rid in checkpoints if rid != run_id]
    backbone = os.path.join(out_dir, "backbone.npz")
    if fresh and os.path.isfile(backbone):
        foreign.append(backbone)
    return Claim(out_dir, run_id, fresh, foreign)


def refuse_foreign(claim_: Claim, overwrite: bool) -> None:
    """A run never trains over another run's checkpoints unless told to (Global.overwrite)."""
    if claim_.foreign and not overwrite:
        out = claim_.out_dir
        names = ", ".join(os.path.basename(p) for p in claim_.foreign[:3]) + (" ..." if len(claim_.foreign) > 3 else "")
        raise RunFolderError(
            f"Global.output_dir: {out} holds another run's work ({names}); continue it with "
            "Global.resume=auto, or set Global.overwrite=true to move its files into "
            f"{os.path.join(out, 'replaced-<time>')}/ and start afresh, or pick another output_dir")


def _move_aside(claim_: Claim, log) -> Optional[str]:
    """Global.overwrite: the other run's files into replaced-<time>/ (renames: cheap, nothing lost)."""
    out = claim_.out_dir
    names = {os.path.basename(p) for p in claim_.foreign}
    if claim_.fresh:
        names |= {n for n in os.listdir(out)
                  if n in (METRICS_FILE, CONFIG_FILE) or n.startswith("config-resume-")
                  or n in {f"{p}.png" for p in PLOTS}}
    if not names:
        return None
    dest = os.path.join(out, time.strftime("replaced-%Y%m%d-%H%M%S"))
    os.makedirs(dest, exist_ok=True)
    for n in sorted(names):
        os.replace(os.path.join(out, n), os.path.join(dest, n))
    log(f"Global.overwrite: moved the earlier run's {len(names)} file(s) to {dest}")
    return dest


def prepare(claim_: Claim, cfg, resumed_step: Optional[int], log: Callable[[str], None]) -> None:
    """Rank 0, once every check passed: move another run's files aside (overwrite), write the
    config (config.yaml for a fresh run, config-resume-<step>.yaml for a resume), cut metrics.csv
    back to the resumed step (a fresh run starts it empty)."""
    out = claim_.out_dir
    _move_aside(claim_, log)
    config_path = os.path.join(out, CONFIG_FILE)
    if resumed_step is None or not os.path.isfile(config_path):
        save_config(cfg, config_path)
    if resumed_step is not None:
        save_config(cfg, os.path.join(out, RESUME_CONFIG.format(step=resumed_step)))
    dropped = cut_metrics(os.path.join(out, METRICS_FILE), -1 if resumed_step is None else resumed_step)
    if dropped:
        log(f"metrics.csv: dropped {dropped} row(s) after step {resumed_step or 0} (steps that were not saved)")


def cut_metrics(path: str, step: int) -> int:
    """Keep only metrics.csv rows at steps <= step (all rows gone for step < 0); returns how many
    were dropped. Rewritten atomically."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return 0
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames or FIELDS, list(reader)

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


# --------------------------------------------------------------------------- config on resume


def _flat(d: dict, prefix: str = "") -> Dict[str, object]:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, now: dict) -> List[Tuple[str, object, object]]:
    """[(Section.key, saved value, new value)] where the two configs differ."""
    a, b = _flat(saved), _flat(now)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not k.startswith(IGNORED)]


def print_resume_changes(path: str, meta: dict, cfg, log: Callable[[str], None]) -> None:
    """How the new config differs from the checkpoint's, one line per key (before any check)."""
    for key, old, new in config_changes(meta.get("config") or {}, cfg.to_dict()):
        log(f"resume: {key} {old!r} -> {new!r} (checkpoint {os.path.basename(path)})")


def check_resume_config(path: str, meta: dict, cfg) -> None:
    """Refuse a change of the model, the optimizer or the class count unless
    Global.allow_resume_changes lists it (a shape change is already refused by the load)."""
    changes = config_changes(meta.get("config") or {}, cfg.to_dict())
    refused = [(k, o, n) for k, o, n in changes if k.startswith(GUARDED) and not allowed(k, cfg)]
    if refused:
        text = "; ".join(f"{k} {o!r} -> {n!r}" for k, o, n in refused)
        raise RunFolderError(
            f"Global.resume: {path} was trained with another model/optimizer/class count ({text}); "
            f"resume with the checkpoint's values, or allow the change with "
            f"Global.allow_resume_changes=[{refused[0][0]}]")


def allowed(key: str, cfg) -> bool:
    return any(key == a or key.startswith(f"{a}.") for a in cfg.Global.allow_resume_changes)
