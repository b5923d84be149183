"""The model-zoo configs carry PLSC's settings, setting by setting.

PLSC below is a committed copy of the values in PaddlePaddle/PLSC
task/recognition/face/configs/*.yaml (commit bd0c824, "[benchmark] Delete dataset after task
completion (#212)"); pfc01 is PLSC's pfc10 file run with `-o Model.pfc_config.sample_ratio=0.1`
(tests/CI/recognition/face/IResNet50_MS1MV3_ArcFace_pfc01_1n8c_dp8_fp16o1.sh). Defaults PLSC does
not write in a file are PLSC's code defaults: Poly warm-up 0, pfc_config.sparse_update True,
IResNet dropout 0, no no_weight_decay_name (every parameter decays), AdamW epsilon 1e-8.
"""
from pathlib import Path

import pytest

from of_face.config import load_config
from of_face.train.system import BatchPlan

REPO = Path(__file__).resolve().parents[1]

R50 = "IResNet50_MS1MV3_ArcFace_pfc10_1n8c_dp_mp_fp16o1"
_R50 = dict(model="IResNet50", batch=128, optimizer="Momentum", lr=0.1, momentum=0.9, weight_decay=5e-4,
            clip_norm=5.0, warmup_epochs=0, warmup_steps=0, epochs=20, margin=(1.0, 0.5, 0.0), s=64.0,
            class_num=93431, sample_ratio=1.0, fp16="O1", init_loss_scaling=27648.0, eval_interval=2000,
            print_batch_step=100, max_num_latest_checkpoint=0, sparse_update=True, seed=2022)
_VIT = dict(batch=256, optimizer="AdamW", lr=0.001, betas=(0.9, 0.999), weight_decay=0.1, clip_norm=5.0,
            warmup_epochs=4, warmup_steps=0, epochs=40, margin=(1.0, 0.0, 0.4), s=64.0, class_num=2059906,
            drop_path_rate=0.05, fp16="O1", init_loss_scaling=27648.0, eval_interval=4000, sparse_update=True,
            seed=2022)
PLSC = {
    R50: _R50,
    "IResNet50_MS1MV3_ArcFace_pfc01_1n8c_dp_mp_fp16o1": dict(_R50, sample_ratio=0.1),
    "IResNet100_WebFace42M_CosFace_pfc02_1n8c_dp_mp_fp16o1": dict(
        _R50, model="IResNet100", margin=(1.0, 0.0, 0.4), class_num=2059906, sample_ratio=0.2,
        eval_interval=10370, print_batch_step=10),
    "MobileFaceNet_WebFace42M_CosFace_pfc02_1n8c_dp_mp_fp16o1": dict(
        _R50, model="MobileFaceNet_base", batch=256, weight_decay=1e-4, warmup_steps=2,
        margin=(1.0, 0.0, 0.4), class_num=2059906, sample_ratio=0.2, eval_interval=10000),
    "FaceViT_tiny_patch9_112_WebFace42M_CosFace_pfc10_droppath005_mask0_1n8c_dp_mp_fp16o1": dict(
        _VIT, model="FaceViT_tiny_patch9_112", mask_ratio=0.0, sample_ratio=1.0, sparse_update=False,
        print_batch_step=200, max_num_latest_checkpoint=5),
    "FaceViT_tiny_patch9_112_WebFace42M_CosFace_pfc02_droppath005_mask0_1n8c_dp_mp_fp16o1": dict(
        _VIT, model="FaceViT_tiny_patch9_112", mask_ratio=0.0, sample_ratio=0.2, print_batch_step=200,
        max_num_latest_checkpoint=5),
    "FaceViT_base_patch9_112_WebFace42M_CosFace_pfc03_droppath005_mask005_1n8c_dp_mp_fp16o1": dict(
        _VIT, model="FaceViT_base_patch9_112", mask_ratio=0.05, sample_ratio=0.3, print_batch_step=10,
        max_num_latest_checkpoint=0),
}
# of_face's name for each PLSC backbone (MobileFaceNet_base = blocks (1, 4, 6, 2), scale 2 = mbf)
MODEL_NAMES = {"IResNet50": "iresnet50", "IResNet100": "iresnet100", "MobileFaceNet_base": "mbf"}
# PLSC trains 1 node x 8 GPUs (1n8c)
GPUS = 8


def test_every_zoo_file_is_a_plsc_row():
    files = {p.stem for p in (REPO / "configs").glob("*_1n8c_dp_mp_fp16o1.yaml")}
    assert files == set(PLSC)


@pytest.mark.parametrize("name", sorted(PLSC))
def test_zoo_config_equals_plsc(name):
    plsc, path = PLSC[name], REPO / "configs" / f"{name}.yaml"
    text = path.read_text()
    source = R50 if "pfc01" in name else name
    assert f"PaddlePaddle/PLSC task/recognition/face/configs/{source}.yaml" in text  # names its PLSC file
    cfg = load_config(path)
    G, M, L, D, Opt, S, A = cfg.Global, cfg.Model, cfg.Loss, cfg.Data, cfg.Optimizer, cfg.LRScheduler, cfg.AMP
    got = {
        "model": M.name, "batch": D.batch_size, "epochs": G.epochs, "seed": G.seed,
        "optimizer": Opt.name, "lr": Opt.lr, "weight_decay": Opt.weight_decay, "clip_norm": Opt.clip_grad_norm,
        "margin": tuple(L.margin), "s": L.scale, "class_num": L.num_classes, "sample_ratio": L.sample_rate,
        "eval_interval": G.eval_interval, "print_batch_step": G.log_interval,
        "max_num_latest_checkpoint": G.keep_checkpoints, "init_loss_scaling": A.init_scale,
        "warmup_epochs": S.warmup_epochs, "warmup_steps": S.warmup_steps,
    }
    want = dict(plsc, model=MODEL_NAMES.get(plsc["model"], plsc["model"]),
                optimizer={"Momentum": "sgd", "AdamW": "adamw"}[plsc["optimizer"]])
    for key, value in got.items():
        assert value == pytest.approx(want[key]), f"{name}: {key} = {value}, PLSC {want[key]}"
    if "momentum" in plsc:
        assert Opt.momentum == plsc["momentum"]
    if "betas" in plsc:
        assert tuple(Opt.betas) == plsc["betas"]
    if "drop_path_rate" in plsc:
        assert (M.drop_path_rate, M.mask_ratio) == (plsc["drop_path_rate"], plsc["mask_ratio"])
    else:
        assert M.dropout == 0.0
    assert A.enable == (plsc["fp16"] == "O1") and S.power == 2.0  # PLSC's Poly decays with power 2
    # PLSC decays every parameter and clips one norm over the backbone (its FC is not clipped)
    assert not Opt.no_weight_decay_on_bn_bias
    assert D.flip and D.val_targets == ["agedb_30"] and Opt.accum_steps == 1
    # the same global batch as PLSC's 8-GPU run
    assert BatchPlan.from_config(cfg, world=GPUS).step_global == plsc["batch"] * GPUS
    # SparseMomentum as PLSC's, FP16 included (train/amp_sparse.py)
    sparse = Opt.sparse_fc_update and L.sample_rate < 1.0
    assert sparse == (plsc["sparse_update"] and plsc["sample_ratio"] < 1.0)


@pytest.mark.parametrize("name", sorted(PLSC))
def test_info_on_a_zoo_config_shows_plscs_global_batch(name):
    from of_face.report import info_main

    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert info_main([str(REPO / "configs" / f"{name}.yaml")]) == 0
    batch = PLSC[name]["batch"]
    assert f"batch {batch} per rank x {GPUS} rank(s) = global batch {batch * GPUS}" in out.getvalue()
