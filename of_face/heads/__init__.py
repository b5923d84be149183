"""Classification heads, built from the config: `build_head(cfg, num_classes, batch)`.

A head owns its FC weight and says what it needs from the optimizer (`param_group()`: the FC
group's options; `sparse_variables`: parameters to update with indexed slices), so the
optimizer and the steppers are wired from what the head states, not from attributes written
onto it afterwards. Its `objective(...)` returns a `HeadOutput`: everything a step needs.
"""
from typing import Any, Dict, Tuple

from of_face.heads.partial_fc import HeadOutput, PartialFC


def sparse_fc_options(opt_cfg) -> Tuple[Dict[str, Any], float]:
    """(FC group options, decay the head applies to kept rows) for sparse FC updates.

    OneFlow's indexed-slices pass only rewrites an update without weight decay, so sparse SGD
    moves the decay into the head (a penalty on the kept rows, same gradient wd*w). Its sparse
    Adam kernel applies the decoupled decay to kept rows but no bias correction; the FC group
    turns OneFlow's correction off (eager mode then updates as the kernel does) and asks the
    steppers for PLSC's, from the global step, on the kept rows (train.optim.bias_correct_kept_rows).
    """
    if opt_cfg.name == "sgd":
        return {"weight_decay": 0.0}, opt_cfg.weight_decay
    return {"do_bias_correction": False, "sparse_adam_bias_correction": True}, 0.0


def build_head(cfg, num_classes: int, micro_global_batch: int) -> PartialFC:
    """The class-split FC head of a run: margin and PartialFC from `Loss`, SparseMomentum and
    its decay handling from `Optimizer`; `micro_global_batch` bounds the positives per step."""
    sampling = PartialFC.samples(num_classes, cfg.Loss.sample_rate, micro_global_batch)
    sparse = cfg.Optimizer.sparse_fc_update and sampling
    group, row_decay = sparse_fc_options(cfg.Optimizer) if sparse else ({}, 0.0)
    return PartialFC(
        num_classes, cfg.Model.embedding_size, margin=cfg.Loss.margin, scale=cfg.Loss.scale,
        sample_rate=cfg.Loss.sample_rate, device=cfg.Global.device, global_batch=micro_global_batch,
        sparse_update=sparse, seed=cfg.Global.seed, row_decay=row_decay, group_options=group, amp=cfg.AMP.enable,
    )


__all__ = ["HeadOutput", "PartialFC", "build_head", "sparse_fc_options"]
