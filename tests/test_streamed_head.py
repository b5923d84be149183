"""The streamed FC head (`Loss.fc_chunks` = K > 1, heads/streamed.py, train/streamed_step.py), and
its one-job form at K = 1 (OneJobStep: graph mode on the CPU, FP32, sparse updates).

One 2-rank launch of tests/workers/streamed_fc.py runs every configuration below (21 runs of 3
steps: mostly the head alone, 61 classes = 31 per rank with one padded class, 8-d,
global batch 8, PartialFC keeping k = 10 positions per rank, so K = 3 and 4 both leave a short
last chunk) and the tests read its record:

1. K = 1, 3, 4, graph and eager, SGD momentum and AdamW, sparse updates: loss, FC weights and the
   FC's optimizer slots after each of 3 steps equal a float64 numpy reference (the one of
   tests/test_sparse_update.py: `fc_grad`, `plsc_adamw` and its constants, imported); graph K = 1
   both as OneJobStep and as TrainGraph's single step (GraphStep, the path of GPUs and AMP);
2. every compiled job of StreamStep and OneJobStep is built once (3 steps, 3 jobs; 5 with a
   backbone; OneJobStep 1); with a backbone, K = 3 and OneJobStep follow TrainGraph's single step,
   the backbone's weights and BatchNorm's running statistics included;
3. with an LR that changes every step, K = 4 equals K = 1, and the LR applied at each step is
   `lr_at` of the optimizer step (not of the count of chunk calls);
4. a checkpoint at step 2 of a K = 4 run resumed at K = 2 equals the uninterrupted K = 4 run;
   4b. the host's row gradient (`rows_grad`, numpy) equals q^T xs written out in float64;
5. the config errors: K > 1 without sparse FC updates, K not an integer >= 1, K > 1 on CUDA.
"""
import numpy as np
import pytest

from conftest import one_error_line, run_worker, tiny, train
from test_partial_fc import kept_classes
from test_sparse_update import BETAS, LR, M3, MU, S, WD, fc_grad, plsc_adamw

WORLD, STEPS = 2, 3
MODES, OPTIMIZERS, CHUNKS = ("graph", "eager"), ("sgd", "adamw"), (1, 3, 4)
WARM = dict(total=4, warmup=1, power=2.0)  # the worker's lr=warm: LR 0, 0.1, 0.1 * (2/3)^2
RTOL = 1e-5
# atol, for entries near zero: ATOL_ULPS float32 ulps (at 1.0) of the largest magnitude of the
# array compared. An entry of a gradient, a momentum or a moment is a sum of terms as large as
# its row's largest, so float32 leaves it an absolute error of a fraction of an ulp of those
# terms however small the sum (observed: up to 0.5 ulp of the array's largest against float64,
# 1.7 between K = 2 and K = 4 at rtol 1e-6); relative to itself, that error is unbounded as it
# nears zero. Entries above ~1/20 of their array's largest are held to RTOL.
ATOL_ULPS = 4
# A weight is w - lr * update: beyond RTOL of itself, it carries lr (<= 0.1) times the update's
# error, a fraction of an ulp of the largest weight (observed: 0.03).
WEIGHT_ULPS = 0.25
# OneFlow's Adam kernels hold beta1, beta2 as float32: 1 - float32(0.999) is 1.3e-5 off 0.001, so
# every second moment is, relative. The reference's moments use those betas (its bias correction,
# like of_face's, the exact ones).
BETAS32 = tuple(float(np.float32(b)) for b in BETAS)


def spec(mode, opt, chunks, **extra):
    """The worker's name of a run (its argv item)."""
    return ",".join([f"mode={mode}", f"opt={opt}", f"K={chunks}"] + [f"{k}={v}" for k, v in extra.items()])


PLAIN = [spec(m, o, k) for m in MODES for o in OPTIMIZERS for k in CHUNKS]
# K = 1 in graph mode: OneJobStep (build's choice on the CPU in FP32 with sparse updates) and, as
# on a GPU or under AMP, TrainGraph's single step (GraphStep)
SINGLE = [spec("graph", o, 1, st="graph") for o in OPTIMIZERS]
EXPECTED_STEPPER = {("graph", 1): "OneJobStep", ("graph", 3): "StreamStep", ("graph", 4): "StreamStep"}
WARM_RUNS = [spec("graph", o, k, lr="warm", **({"save": 2, "resume": 2} if k == 4 else {}))
             for o in OPTIMIZERS for k in (1, 4)]
BACKBONE_RUNS = [spec("graph", "sgd", 1, bb="lin", st="graph")] + [spec("graph", "sgd", k, bb="lin") for k in (1, 3)]


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("streamed") / "runs.json"
    return run_worker("streamed_fc", out, extra=PLAIN + SINGLE + WARM_RUNS + BACKBONE_RUNS, timeout=300)


# ----------------------------------------------------------------------------- the numpy reference
def sampled(labels, seed, step, local, k):
    """PartialFC's kept local positions at optimizer step `step` (heads/partial_fc.py): every
    position holding a label (class c sits at c % local on rank c // local), then the highest
    of the step's host noise, numpy's default_rng([seed, step]).random(local, float32)."""
    noise = np.random.default_rng([seed, step]).random(local, dtype=np.float32).astype(np.float64)
    positive = np.zeros(local)
    positive[np.asarray(labels) % local] = 1.0
    score = noise + 2.0 * positive
    order = np.argsort(-score)
    assert score[order[k - 1]] > score[order[k]], "a tie at the sampling boundary"
    return np.sort(order[:k])


def cosface_loss(w, x, y, kept):
    """Mean CosFace cross-entropy of features x over the classes `kept` (sorted ids), float64."""
    def unit(a):
        return a / np.linalg.norm(a, axis=1, keepdims=True)
    label = np.asarray(kept)[None, :] == np.asarray(y)[:, None]  # [N, kept]: one True per row
    z = S * (unit(x) @ unit(w[kept]).T) - S * M3 * label
    top = z.max(axis=1)
    return float(np.mean(top + np.log(np.exp(z - top[:, None]).sum(axis=1)) - z[label]))


def reference(run, w0, data, optimizer, classes):
    """float64 numpy, from the run's initial FC and batches, on its own: per step the loss, the
    whole FC and its optimizer slots (eager names), and the kept rows.

    The kept set is recomputed from the sampling rule rather than read off the rows that changed
    (as test_sparse_update's `replay` does): the reference then owes nothing to the run, and the
    test checks separately that exactly those rows changed. A kept padded class (its position is
    a real class on the other rank) has no logit, so it gets a zero gradient and only its decay.
    """
    local, k = run["local"], run["k"]
    w = np.array(w0, np.float64)
    slots = {name: np.zeros_like(w) for name in ("momentum_buf", "exp_avg", "exp_avg_sq")}
    out = {"loss": [], "weights": [w.copy()], "state": [], "kept": []}
    for t, (x, y) in enumerate(data, start=1):
        x, y = np.array(x, np.float64), np.array(y)
        rows = kept_classes(sampled(y, run["seed"], t - 1, local, k), local, WORLD)  # ascending
        real = rows < classes
        out["loss"].append(cosface_loss(w, x, y, rows[real]))
        g = np.zeros((len(rows), w.shape[1]))
        g[real] = fc_grad(w, x, y, rows[real])
        if optimizer == "sgd":
            v = slots["momentum_buf"]
            v[rows] = MU * v[rows] + g + WD * w[rows]
            w[rows] -= LR * v[rows]
            state = {"momentum_buf": v.copy()}
        else:
            m, s = slots["exp_avg"], slots["exp_avg_sq"]
            b1, b2 = BETAS32
            m[rows] = b1 * m[rows] + (1 - b1) * g
            s[rows] = b2 * s[rows] + (1 - b2) * g * g
            w[rows] = plsc_adamw(w[rows], m[rows], s[rows], t)
            state = {"exp_avg": m.copy(), "exp_avg_sq": s.copy()}
        out["weights"].append(w.copy())
        out["state"].append(state)
        out["kept"].append(rows)
    return out


def assert_close(actual, expected, what, rtol=RTOL, ulps=ATOL_ULPS):
    expected = np.asarray(expected, np.float64)
    atol = ulps * np.finfo(np.float32).eps * np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol, err_msg=what)


def changed_rows(run, t):
    before, after = np.array(run["weights"][t - 1]), np.array(run["weights"][t])
    return np.flatnonzero(np.any(before != after, axis=1))


# ----------------------------------------------------------------------------- 1
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_chunks_equal_float64_numpy(record, mode, optimizer):
    """K = 1 (the single step), 3 and 4 (streamed) against float64 numpy, step by step: the loss,
    which rows moved, the whole FC and its optimizer slots (RTOL, near-zero entries ATOL_ULPS)."""
    classes, w0 = record["classes"], record["w0"]
    data = record["data"]["id"]
    names = [spec(mode, optimizer, chunks) for chunks in CHUNKS]
    names += [spec(mode, optimizer, 1, st="graph")] if mode == "graph" else []
    for name in names:
        run = record["runs"][name]
        chunks = int(dict(kv.split("=") for kv in name.split(","))["K"])
        # the case this covers: a padded class, and k kept columns per rank not a multiple of K
        assert classes % WORLD == 1 and len(w0) == classes + 1
        assert (run["local"], run["k"]) == (31, 10)  # ceil(61 / 2); ceil(0.3 * 31) > global batch 8
        if chunks > 1:
            assert run["k"] % chunks != 0 and run["plan"][0] == chunks
        expected = "GraphStep" if "st=graph" in name else EXPECTED_STEPPER.get((mode, chunks), "EagerStep")
        assert run["stepper"] == expected
        want = reference(run, w0, data, optimizer, classes)
        for t in range(1, STEPS + 1):
            at = f"{name} ({run['stepper']}) step {t}"
            # sparse: exactly the sampled rows (both ranks', the padded class's when kept) moved
            np.testing.assert_array_equal(changed_rows(run, t), want["kept"][t - 1], err_msg=at)
            assert run["loss"][t - 1] == pytest.approx(want["loss"][t - 1], rel=RTOL), at
            assert_close(run["weights"][t], want["weights"][t], f"{at}: FC weights", ulps=WEIGHT_ULPS)
            assert set(run["state"][t - 1]) == set(want["state"][t - 1]), at
            for slot, value in want["state"][t - 1].items():
                assert_close(run["state"][t - 1][slot], value, f"{at}: {slot}")
    # a row kept at step 1, not at 2, again at 3 matched at step 3: its state was carried over;
    # the padded class (row `classes`, rank 1's last position) was kept at step 2: only decayed
    k1, k2, k3 = (set(want["kept"][t]) for t in range(3))
    assert (k1 - k2) & k3 and classes in k2


# ----------------------------------------------------------------------------- 2
def test_each_job_is_compiled_once(record):
    streamed = {name: run for name, run in record["runs"].items() if run["stepper"] in ("StreamStep", "OneJobStep")}
    # StreamStep: graph K = 3, 4 x sgd, adamw; lr=warm K = 4 x sgd, adamw; bb=lin K = 3. OneJobStep:
    # graph K = 1 x sgd, adamw; lr=warm K = 1 x sgd, adamw; bb=lin K = 1
    assert len(streamed) == 12
    for name, run in streamed.items():
        jobs = ["PrepareGraph", "StatsGraph", "FinishGraph"]
        if "bb=lin" in name:
            jobs = ["ForwardGraph", *jobs, "BackboneGraph"]
        if run["stepper"] == "OneJobStep":  # the backbone, the passes and its backward: one job
            jobs = ["OneJobGraph"]
        assert run["graphs"] == [[job, 1] for job in jobs], name
        if "resumed" in run:
            assert run["resumed"]["graphs"] == [[job, 1] for job in jobs], name


def test_backbone_jobs_equal_the_single_step(record):
    """With a backbone (Linear + BatchNorm): OneJobStep at K = 1 (one job) and K = 3 (a forward
    job, a backward job recomputing it) follow TrainGraph's single step, autograd through both
    (3 steps: each loss depends on the backbone's earlier updates)."""
    single, *others = (record["runs"][name] for name in BACKBONE_RUNS)
    assert [r["stepper"] for r in (single, *others)] == ["GraphStep", "OneJobStep", "StreamStep"]
    for run in others:
        assert_close(run["loss"], single["loss"], f"{run['stepper']}: losses")
        assert_close(run["weights"][-1], single["weights"][-1], f"{run['stepper']}: FC weights", ulps=WEIGHT_ULPS)
        for name, value in single["backbone"].items():  # (the weights a wrong d emb would move elsewhere)
            assert_close(run["backbone"][name], value, f"{run['stepper']}: backbone {name}")


def test_backbone_batchnorm_statistics_follow_the_single_step(record):
    """BatchNorm's running statistics are updated once a step, by ForwardGraph (the backward job's
    recomputed forward is traced at momentum 0, train/streamed_step.py), or by OneJobGraph's one
    forward: as in TrainGraph's single step."""
    single, *others = (record["runs"][name]["backbone"] for name in BACKBONE_RUNS)
    stats = [name for name in single if "running" in name]
    assert stats
    for run in others:
        assert set(run) == set(single)
        for name in stats:
            assert_close(run[name], single[name], f"backbone {name}")


# ----------------------------------------------------------------------------- 3
def lr_at(step):
    from of_face.train.optim import lr_at as formula

    return formula(step, LR, WARM["total"], WARM["warmup"], WARM["power"])


def applied_lr(run, t):
    """The LR of SGD's step t (w -= lr * v, v the momentum after the step) over the kept rows,
    least squares over every entry: (W[t-1] - W[t]) . v / v . v."""
    rows = changed_rows(run, t)  # (an unsampled row keeps an old momentum and does not move)
    dw = np.array(run["weights"][t - 1], np.float64)[rows] - np.array(run["weights"][t], np.float64)[rows]
    v = np.array(run["state"][t - 1]["momentum_buf"], np.float64)[rows]
    assert len(rows) == WORLD * run["k"]
    return float((dw * v).sum() / (v * v).sum())


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_schedule_counts_optimizer_steps_not_chunk_calls(record, optimizer):
    """Warm-up 1 step, then power 2: LR 0, 0.1, 0.044. Were the FC's LR taken at the count of
    chunk calls (4 a step at K = 4), steps 2 and 3 would run at LR(4..11) = 0; were it taken at
    the chunk's index within the step, step 3's chunks would run at LR(2..5) = 0.044, 0.011, 0, 0.
    Both fail here."""
    lrs = [lr_at(t) for t in range(STEPS)]
    assert lrs == pytest.approx([0.0, 0.1, 0.1 * (2 / 3) ** 2])  # (lr_at is of_face's formula)
    one, four = (record["runs"][spec("graph", optimizer, k, lr="warm", **extra)]
                 for k, extra in ((1, {}), (4, {"save": 2, "resume": 2})))
    assert four["plan"][0] == 4
    if optimizer == "sgd":  # the LR each step applied, read off the run: SGD's update is lr * momentum
        for run in (one, four):
            assert np.array_equal(run["weights"][1], run["weights"][0]), f"{run['name']}: the FC moved at LR 0"
            for t in (2, 3):  # (W[t-1] - W[t], a float32 difference, is exact to ~1e-5 of itself)
                assert applied_lr(run, t) == pytest.approx(lrs[t - 1], rel=1e-4), f"{run['name']} step {t}"
    assert_close(four["loss"], one["loss"], "losses")
    for t in range(1, STEPS + 1):
        assert_close(four["weights"][t], one["weights"][t], f"FC weights after step {t}", ulps=WEIGHT_ULPS)
        for slot, value in one["state"][t - 1].items():
            assert_close(four["state"][t - 1][slot], value, f"{slot} after step {t}")


# ----------------------------------------------------------------------------- 4
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_resume_at_other_chunk_count(record, optimizer):
    """Two steps at K = 4, the trainer's checkpoint, a fresh system at K = 2 loads it and takes
    step 3: as the uninterrupted K = 4 run to 1e-6. Not bit for bit: K = 2 sums the chunks'
    log-sum-exps and row gradients in another order."""
    whole = record["runs"][spec("graph", optimizer, 4, lr="warm", save=2, resume=2)]
    resumed, real = whole["resumed"], slice(0, record["classes"])
    assert resumed["stepper"] == "StreamStep" and len(resumed["loss"]) == 1
    assert resumed["loss"][0] == pytest.approx(whole["loss"][2], rel=1e-6)
    # the real classes' rows: a checkpoint holds no padded row (it never gets a gradient; a
    # resumed run starts it afresh)
    assert_close(np.array(resumed["weights"][0])[real], np.array(whole["weights"][3])[real],
                 "FC weights after step 3", rtol=1e-6, ulps=WEIGHT_ULPS)
    for slot, value in whole["state"][2].items():
        assert_close(np.array(resumed["state"][0][slot])[real], np.array(value)[real], f"{slot} after step 3",
                     rtol=1e-6)
    # step 3 moved the FC (LR 0.044): a resume that lost the weights or the slots would show
    assert not np.array_equal(whole["weights"][3], whole["weights"][2])


# ----------------------------------------------------------------------------- 4b
@pytest.mark.parametrize("rank", [0, 1])
def test_host_row_gradient_is_q_transpose_xs(rank):
    """streamed.rows_grad (the compiled step's row gradient, numpy) against q^T xs written out in
    float64: q = r p, plus b at each row's label column when this rank owns the label and it falls
    in the chunk. Labels sit on the chunk's first and last column, just outside it, on the other
    rank, and two rows share one label (both terms count)."""
    from of_face.heads.streamed import rows_grad

    rng = np.random.default_rng(rank)
    n, size, dim, start = 9, 5, 6, 10
    p = rng.random((n, size), dtype=np.float32)
    r, b = rng.random(n, dtype=np.float32), rng.standard_normal(n).astype(np.float32)
    xs = rng.standard_normal((n, dim)).astype(np.float32)
    slot = np.array([10, 14, 9, 15, 12, 12, 11, 13, 10], np.int64)
    owner = np.array([rank, rank, rank, rank, rank, rank, 1 - rank, rank, 1 - rank], np.int64)
    q = r[:, None].astype(np.float64) * p
    for i in range(n):
        if owner[i] == rank and start <= slot[i] < start + size:
            q[i, slot[i] - start] += b[i]
    want = q.T @ xs.astype(np.float64)
    got = rows_grad(p, r, xs, b, slot, owner, start, rank)
    assert got.shape == (size, dim)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- 5
@pytest.mark.parametrize("override", ["Optimizer.sparse_fc_update=false", "Loss.sample_rate=1.0"])
def test_chunks_need_sparse_updates(override):
    """Chunks stream the sparse update: refused, naming Loss.fc_chunks and what it needs, when
    the FC is updated densely (sparse_fc_update off, or nothing sampled)."""
    from of_face.config import ConfigError, load_config
    from of_face.train.system import build
    import oneflow as flow

    cfg = load_config(None, ["Global.device=cpu", "Model.embedding_size=8", "Data.batch_size=4",
                             "Loss.sample_rate=0.3", "Loss.fc_chunks=3", override])
    with pytest.raises(ConfigError) as e:
        build(cfg, 61, backbone=flow.nn.Identity(), total_steps=3, warmup_steps=0)
    assert str(e.value).startswith("Loss.fc_chunks: 3 chunks")
    assert "Optimizer.sparse_fc_update=true" in str(e.value) and "Loss.sample_rate < 1" in str(e.value)


@pytest.mark.parametrize("chunks, expected", [(3, None), ("auto", 1), (1, 1)])
def test_chunks_are_cpu_only(chunks, expected):
    """On CUDA OneFlow reuses a compiled job's memory and the host cannot write the rows in place
    (train/fc_rows.py): an integer K > 1 is refused naming the device, auto takes 1. (No GPU
    here: the head's placement type is what system.fc_chunks reads, so a stand-in carries it.)"""
    from types import SimpleNamespace
    from of_face.config import ConfigError, load_config
    from of_face.train.system import fc_chunks

    cfg = load_config(None, ["Loss.sample_rate=0.3", f"Loss.fc_chunks={chunks}"])
    head = SimpleNamespace(weight=SimpleNamespace(placement=SimpleNamespace(type="cuda")), sparse_update=True)
    if expected is None:
        with pytest.raises(ConfigError, match=r"^Loss\.fc_chunks: 3 chunks stream the FC on CPU only \(on cuda"):
            fc_chunks(cfg, head, None)
    else:
        assert fc_chunks(cfg, head, None) == expected


@pytest.mark.parametrize("value", ["0", "abc", "-2", "2.5"])
def test_bad_chunk_counts_are_refused(value):
    """Not an integer >= 1 (nor auto): refused when the config is read."""
    from of_face.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^Loss\.fc_chunks: expected"):
        load_config(None, [f"Loss.fc_chunks={value}"])


def test_the_trainer_refuses_chunks_without_sparse_updates(synthetic_faces, tmp_path):
    """Through the launcher scripts/train_ddp.sh uses, 2 ranks: one `error:` line, exit 2."""
    # 40 classes, global batch 4, sample_rate 0.3: 20 per rank, 6 kept; only the dense update is wrong
    overrides = tiny(synthetic_faces(40, 2), tmp_path / "run", "Data.batch_size=2", "Loss.sample_rate=0.3",
                     "Loss.fc_chunks=3", "Optimizer.sparse_fc_update=false")
    proc = train(overrides, launcher="of_face", check=False, timeout=120)
    one_error_line(proc, 2, ["Loss.fc_chunks: 3 chunks", "Optimizer.sparse_fc_update=true"])
    assert "step 1/" not in proc.stdout
