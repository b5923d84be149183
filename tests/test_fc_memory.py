"""heads/memory.py: the per-rank memory formula of the FC head and Loss.fc_chunks: auto's choice.
Arithmetic only (fake heads and configs), plus one real head and one 1-rank build."""
from types import SimpleNamespace

import pytest

from of_face.config import load_config
from of_face.heads import memory
from of_face.heads.memory import GIB, FCMemory, HeadShape


def shape(classes=4_000_000, dim=128, batch=256, world=2, rate=0.1, slots=1, sparse=True, row_decay=True,
          adamw=False):
    local = -(-classes // world)
    kept = min(local, max(-(-int(rate * local * 1000) // 1000), batch))
    return HeadShape(local, kept, dim, batch, world, slots, sparse, classes % world != 0, row_decay, adamw)


def fake(classes=4_000_000, dim=128, batch=256, world=2, rate=0.1, sparse=True, optimizer="sgd", momentum=0.9,
         accum=1, chunks="auto", budget=0.0, mode="eager", amp=False, device="cpu"):
    """A config and head; eager mode by default, where K = 1 is GraphStep's formula (graph mode on
    the CPU in FP32 with sparse updates runs OneJobStep at K = 1: `memory.one_job`)."""
    s = shape(classes, dim, batch, world, rate)
    head = SimpleNamespace(local_classes=s.local, num_sample=s.kept, embedding_size=dim, world=world,
                           sparse_update=sparse and s.sampling, pad_bias=None if classes % world == 0 else object(),
                           row_decay=5e-4 if sparse and optimizer == "sgd" else 0.0, num_classes=classes,
                           weight=SimpleNamespace(placement=SimpleNamespace(type=device)))
    cfg = SimpleNamespace(Optimizer=SimpleNamespace(name=optimizer, momentum=momentum, accum_steps=accum),
                          Loss=SimpleNamespace(fc_chunks=chunks, fc_memory_gib=budget),
                          Global=SimpleNamespace(mode=mode), AMP=SimpleNamespace(enable=amp))
    return cfg, head


def test_weight_and_optimizer_slots_are_4_bytes_per_element_each():
    for slots in (0, 1, 2):
        terms = memory.predict(shape(slots=slots), 1)
        s = shape()
        assert terms["weight"] == 4 * s.local * s.dim
        assert terms["slots"] == 4 * s.local * s.dim * slots
    assert memory.predict(shape(), 4)["total"] == pytest.approx(sum(
        v for k, v in memory.predict(shape(), 4).items() if k != "total"))


def test_head_shape_reads_slots_from_the_optimizer():
    assert HeadShape.of(*fake(optimizer="sgd", momentum=0.9), 256).slots == 1
    assert HeadShape.of(*fake(optimizer="sgd", momentum=0.0), 256).slots == 0
    adamw = HeadShape.of(*fake(optimizer="adamw"), 256)
    assert adamw.slots == 2 and adamw.adamw_correction and not adamw.row_decay


def test_streaming_shrinks_the_chunk_terms_and_keeps_one_logits_tensor():
    s = shape()
    one, four, many = (memory.predict(s, k) for k in (1, 4, 32))
    assert one["total"] > four["total"] > many["total"]
    assert one["weight"] == four["weight"] and one["sampling"] == four["sampling"]
    # the chunks' p kept between passes: one float32 [N, k] whatever K
    assert many["logits"] >= 4 * s.batch * s.kept
    assert many["rows"] * 8 == pytest.approx(memory.predict(s, 4)["rows"], rel=0.01)


def test_padding_and_row_decay_add_their_buffers():
    plain = memory.predict(shape(classes=4_000_000, row_decay=False), 1)
    padded = memory.predict(shape(classes=4_000_001, row_decay=False), 1)
    s = shape(classes=4_000_001)
    assert padded["logits"] - plain["logits"] == pytest.approx(8 * s.batch * s.kept, rel=1e-4)
    decay = memory.predict(shape(row_decay=True), 1)
    assert decay["rows"] > plain["rows"]


def test_chunk_plan_is_the_streamed_heads():
    from of_face.heads.streamed import ChunkPlan
    for kept in (1000, 50_001, 200_000, 333_333):
        for chunks in (1, 2, 3, 7, 16, 64):
            plan = ChunkPlan.of(SimpleNamespace(num_sample=kept, pad_bias=None), chunks)
            assert memory.chunk_plan(kept, chunks) == (plan.chunks, plan.size)


def test_candidates_skip_k_that_run_as_another():
    s = shape(classes=2_000, batch=8)  # k = 100: K 51..64 all run ceil(100 / 2) = 50 chunks or fewer
    ks = memory.candidates(s, streams=True)
    assert ks[0] == 1 and ks == sorted(set(ks)) and all(memory.chunk_plan(s.kept, k)[0] == k for k in ks)
    assert memory.candidates(s, streams=False) == [1]


def test_default_budget_is_the_share_of_memtotal_less_the_margin():
    assert memory.default_budget_gib(24.0, 2) == pytest.approx(12 * (1 - memory.MARGIN_FRACTION) - memory.MARGIN_GIB)
    assert memory.default_budget_gib(24.0, 1) > memory.default_budget_gib(24.0, 4)
    assert memory.meminfo_total_gib() > 0.5  # this machine's /proc/meminfo


def _needed(cfg, head, chunks):
    return memory.predicted_gib(HeadShape.of(cfg, head, 256), chunks)


def test_auto_takes_k_1_when_it_fits():
    cfg, head = fake(budget=1000.0)
    assert memory.choose_chunks(cfg, head, 256) == FCMemory(1, _needed(cfg, head, 1), 1000.0)


def test_auto_takes_the_smallest_k_that_fits():
    cfg, head = fake()
    one, four = _needed(cfg, head, 1), _needed(cfg, head, 4)
    cfg.Loss.fc_memory_gib = (four + _needed(cfg, head, 3)) / 2  # 4 fits, 3 does not
    got = memory.choose_chunks(cfg, head, 256)
    assert got.chunks == 4 and got.fits and got.predicted_gib == pytest.approx(four) and one > got.budget_gib


def test_auto_returns_1_when_the_head_cannot_stream():
    for cfg, head in (fake(sparse=False, budget=100.0), fake(accum=2, budget=100.0), fake(rate=1.0, budget=100.0)):
        assert memory.choose_chunks(cfg, head, 256).chunks == 1


def test_auto_refuses_what_fits_in_no_k_naming_the_budget_key():
    cfg, head = fake(budget=0.5)
    with pytest.raises(memory.DoesNotFit,
                       match=r"Loss\.fc_memory_gib.*4000000 classes.*even in \d+ chunks.*budget of 0\.50"):
        memory.choose_chunks(cfg, head, 256)
    cfg, head = fake(sparse=False, budget=0.5)
    with pytest.raises(memory.DoesNotFit, match=r"Loss\.fc_memory_gib.*cannot stream"):
        memory.choose_chunks(cfg, head, 256)


def test_auto_with_the_default_budget_uses_this_machine(monkeypatch):
    monkeypatch.setattr(memory, "local_ranks", lambda: 2)
    cfg, head = fake(classes=20_000)
    got = memory.choose_chunks(cfg, head, 256)
    assert got.chunks == 1 and got.budget_gib == pytest.approx(memory.default_budget_gib(ranks=2))


def test_describe_names_k_the_peak_and_the_budget():
    text = FCMemory(4, 9.5, 10.09).describe()
    assert "K = 4 chunks" in text and "9.50 GiB per rank" in text and "budget 10.09 GiB" in text
    assert "K = 1 chunk," in FCMemory(1, 1.0, 2.0).describe()


def test_a_real_head_and_auto_through_the_build():
    """PartialFC's own numbers, and `build` with fc_chunks auto on one rank streams in the K chosen."""
    import oneflow as flow
    from of_face.heads import build_head
    from of_face.train.system import build

    over = ["Global.mode=graph", "Model.embedding_size=32", "Loss.sample_rate=0.1", "Data.batch_size=8",
            "Loss.fc_chunks=auto"]
    cfg = load_config(None, over + ["Loss.fc_memory_gib=100"])
    head = build_head(cfg, 20_001, 8)
    s = HeadShape.of(cfg, head, 8)
    assert (s.local, s.kept, s.dim, s.world, s.padded, s.sparse) == (20_001, 2001, 32, 1, False, True)
    # a budget just under K=1's prediction: auto streams
    need = [memory.predicted_gib(s, k) for k in (1, 2)]
    cfg = load_config(None, over + [f"Loss.fc_memory_gib={(need[0] + need[1]) / 2}"])
    system = build(cfg, 20_001, backbone=flow.nn.Identity(), total_steps=2, warmup_steps=0)
    assert system.step.plan.chunks == 2
    assert memory.memory_of(cfg, system.head, 8, 2).predicted_gib == pytest.approx(need[1])
    assert need[0] * GIB > need[1] * GIB


def test_k_1_runs_one_job_only_where_it_can():
    """OneJobStep at K = 1: graph mode, CPU, FP32, sparse updates, no accumulation; else GraphStep."""
    assert memory.one_job(*fake(mode="graph"))
    for other in (dict(mode="eager"), dict(amp=True), dict(device="cuda"), dict(sparse=False), dict(rate=1.0),
                  dict(accum=2)):
        assert not memory.one_job(*fake(**{"mode": "graph", **other})), other


def test_one_job_k_1_is_the_streamed_formula_at_one_chunk():
    """OneJobStep's K = 1: the K > 1 terms with c = k and no job beyond the one (P2g measured it),
    below GraphStep's; at 1M classes, 128-d, r 0.1 it fits the 2.6 GiB auto is benched at."""
    s = shape(classes=1_000_000)
    one = memory.predict(s, 1)
    streamed = memory.predict(HeadShape(**{**s.__dict__, "one_job": True}), 1)
    assert streamed["total"] < one["total"]
    N, k, D = s.batch, s.kept, s.dim
    assert streamed["logits"] == (32 + 4 * s.padded) * N * k + 4 * N * k
    assert streamed["rows"] == (12 + memory.HOST_ROWS_SGD) * k * D
    assert streamed["process"] == memory.BASE_GIB * GIB
    cfg, head = fake(classes=1_000_000, mode="graph", budget=2.6)  # (the FC bench: nothing upstream trains)
    assert memory.choose_chunks(cfg, head, 256, embedding_grad=False).chunks == 1
    cfg, head = fake(classes=1_000_000, dim=512, mode="graph", budget=2.6)
    assert memory.choose_chunks(cfg, head, 256, embedding_grad=False).chunks > 1
