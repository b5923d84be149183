"""What a resume may change in the config: the differences are printed, and a change of the
model, the optimizer or the class count is refused unless Global.allow_resume_changes lists the
key (or its section).

What each allowed key does:
- `Model.*`: only a change that keeps every backbone tensor's shape can resume (dropout, masking,
  ...); a shape change is refused by the load, naming the tensors, whatever is listed.
- `Optimizer.name`: the backbone and FC weights continue; the new optimizer's slots (momentum,
  Adam moments) start at zero, since the old one's mean something else. Its step count
  continues (the LR schedule's position), so AdamW's bias correction is the resumed step's.
- `Loss.num_classes` (also when the class count comes from a data set that grew): more classes
  than the checkpoint's. Its rows and their optimizer state are kept; the new classes' rows are
  initialised as a fresh run initialises them (the same seed gives the same values), their
  optimizer state is zero. Fewer classes are refused: that would drop trained class centres.
"""
import os
from typing import Callable, Dict, List, Tuple

from of_face.run.lock import RunFolderError

# what resuming may not change unless Global.allow_resume_changes lists the key (or its section)
GUARDED = ("Model.", "Optimizer.name", "Loss.num_classes")
IGNORED = ("Global.resume", "Global.overwrite", "Global.allow_resume_changes")
CLASS_COUNT = "Loss.num_classes"


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


def print_changes(path: str, meta: dict, cfg, log: Callable[[str], None]) -> None:
    """How the new config differs from the checkpoint's, one line per key (before any check)."""
    for key, old, new in config_changes(meta.get("config") or {}, cfg.to_dict()):
        log(f"resume: {key} {old!r} -> {new!r} (checkpoint {os.path.basename(path)})")


def check(path: str, meta: dict, cfg) -> None:
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
    """Whether Global.allow_resume_changes lists `key` or a section holding it."""
    return any(key == a or key.startswith(f"{a}.") for a in cfg.Global.allow_resume_changes)

