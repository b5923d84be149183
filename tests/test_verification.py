"""Verification protocol (.bin loading, 10-fold accuracy, VAL@FAR) against hand-computed values,
independent decoders and the README reference figures of the shared MobileFaceNet model."""
import io
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from of_face.data.verification_bin import load_bin
from of_face.eval.verification import verify_bin
from of_face.scoring import evaluate, flip_embed, interp_step

from conftest import SHARED, need

GLINT_BIN = SHARED / "data" / "glint14" / "glint4_val.bin"
LFW_BIN = SHARED / "data" / "small_lfw.bin"
MODEL = SHARED / "models" / "mobilefacenet_192d.onnx"


def pairs_with_distances(dists, seed=0):
    """[2P, 2] embeddings whose normalised pairs have the given squared L2 distances.

    For unit vectors at angle phi the squared distance is 2 - 2 cos(phi). Each pair gets a random
    orientation, and rows random norms, so evaluate() must normalise to recover the distances.
    """
    rng = np.random.default_rng(seed)
    phi = np.arccos(1.0 - np.asarray(dists, dtype=np.float64) / 2.0)
    base = rng.uniform(0, 2 * np.pi, len(phi))
    angles = np.stack([base, base + phi], axis=1).reshape(-1)
    norms = rng.uniform(0.5, 20.0, len(angles))
    return np.stack([np.cos(angles), np.sin(angles)], axis=1) * norms[:, None], norms


def test_perfectly_separable_and_no_crash_on_repeated_far():
    # 10 folds x (5 same at distance 0.2, 5 different at 2.2345). Every FAR on the train folds is
    # 0 until the threshold passes 2.2345, so the FAR curve is full of repeats (insightface#2152).
    dists = np.tile([0.2] * 5 + [2.2345] * 5, 10)
    issame = np.tile([True] * 5 + [False] * 5, 10)
    emb, norms = pairs_with_distances(dists)
    r = evaluate(emb, issame)
    assert r["accuracy"] == 1.0 and r["std"] == 0.0
    # First threshold of the 0.01 grid above 0.2 wins the ties (np.argmax takes the first).
    np.testing.assert_allclose(r["thresholds"], [0.21] * 10)
    assert r["xnorm"] == pytest.approx(norms.mean())
    # VAL threshold lands just above 2.234 (FAR 0 -> 1 between 2.234 and 2.235): all same accepted.
    assert r["val"] == 1.0 and r["val_std"] == 0.0 and r["far"] == 0.0


def test_known_errors_per_fold():
    # 10 folds of 20 pairs (10 same at 0.3055, 10 different at 1.7055). Fold k holds
    # e_k = k % 4 errors, alternately a same pair pushed to 1.7055 and a different pair pulled
    # to 0.3055; any threshold in (0.3055, 1.7055] is best on train, so fold accuracy = 1 - e_k/20.
    dists, issame = [], []
    for k in range(10):
        d = [0.3055] * 10 + [1.7055] * 10
        s = [True] * 10 + [False] * 10
        for j in range(k % 4):
            d[j if j % 2 == 0 else 10 + j] = 1.7055 if j % 2 == 0 else 0.3055
        dists += d
        issame += s
    emb, _ = pairs_with_distances(dists, seed=1)
    r = evaluate(emb, np.array(issame))
    np.testing.assert_allclose(r["fold_accuracy"], [1, .95, .9, .85, 1, .95, .9, .85, 1, .95])
    assert r["accuracy"] == pytest.approx(0.935, abs=1e-12)  # (3*1 + 3*.95 + 2*.9 + 2*.85) / 10
    assert r["std"] == pytest.approx(0.055, abs=1e-12)  # sqrt(0.03025 / 10), by hand
    np.testing.assert_allclose(r["thresholds"], [0.31] * 10)
    # Every train split holds a different pair at 0.3055, so the FAR=1e-3 threshold is
    # interpolated below 0.3055 (0.305 + 0.001 * 1e-3 / FAR_train): nothing is accepted.
    assert r["val"] == 0.0 and r["far"] == 0.0


def test_val_with_hard_positives():
    # Per fold: 4 same at 0.5005, 1 same at 3.0005, 5 different at 2.2345.
    dists = np.tile([0.5005] * 4 + [3.0005] + [2.2345] * 5, 10)
    issame = np.tile([True] * 5 + [False] * 5, 10)
    r = evaluate(pairs_with_distances(dists, seed=2)[0], issame)
    assert r["accuracy"] == pytest.approx(0.9) and r["std"] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(r["thresholds"], [0.51] * 10)
    assert r["val"] == pytest.approx(0.8) and r["far"] == 0.0


def test_interp_step_on_repeated_x():
    x, y = [0, 0, 0, 0.5, 0.5, 1], [0, 1, 2, 3, 4, 5]
    # A run of equal x is a vertical segment: leave it from its last point.
    assert [interp_step(x, y, v) for v in (0, 0.25, 0.5, 0.75, 1, 2)] == [2, 2.5, 4, 4.5, 5, 5]


def test_flip_embed_sums_and_batches():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (7, 112, 112, 3), dtype=np.uint8)
    imgs[5] = imgs[1]  # a repeated image must still get its own row
    calls = []

    def fake(batch):  # left-column mean and right-column mean: a flip swaps them
        calls.append(len(batch))
        return np.stack([batch[:, :, 0].mean((1, 2)), 2 * batch[:, :, -1].mean((1, 2))], axis=1)

    out = flip_embed(fake, imgs, batch_size=4)
    left, right = imgs[:, :, 0].mean((1, 2)), imgs[:, :, -1].mean((1, 2))
    np.testing.assert_allclose(out, np.stack([left + right, 2 * (right + left)], 1), rtol=1e-5)
    assert max(calls) <= 4


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("protocol", [2, 3, 4])
@pytest.mark.parametrize("as_array", [False, True])
def test_load_bin_formats(tmp_path, protocol, as_array):
    rng = np.random.default_rng(protocol)
    imgs = rng.integers(0, 256, (4, 112, 112, 3), dtype=np.uint8)
    bins = [_png(a) for a in imgs]  # lossless, so the decoded pixels must equal the source
    if as_array:
        bins = [np.frombuffer(b, np.uint8).reshape(-1, 1) for b in bins]
    path = tmp_path / "x.bin"
    path.write_bytes(pickle.dumps((bins, [True, False]), protocol=protocol))
    got, issame = load_bin(path)
    assert got.dtype == np.uint8 and np.array_equal(got, imgs)
    assert issame.dtype == np.bool_ and issame.tolist() == [True, False]


def test_load_bin_python2_pickle(tmp_path):
    # Hand-written protocol-2 opcodes as Python 2 emits them: image bytes are BINSTRING ('T'),
    # which Python 3 can only load with encoding='bytes'.
    imgs = np.random.default_rng(5).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    data = b"\x80\x02]q\x00(" + b"".join(b"T" + struct.pack("<I", len(p)) + p for p in map(_png, imgs))
    data += b"e]q\x01\x88a\x86q\x02."
    path = tmp_path / "py2.bin"
    path.write_bytes(data)
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(data)
    got, issame = load_bin(path)
    assert np.array_equal(got, imgs) and issame.tolist() == [True]


def test_load_bin_errors_name_the_file(tmp_path):
    png = _png(np.zeros((112, 112, 3), np.uint8))
    odd = tmp_path / "odd_count.bin"
    odd.write_bytes(pickle.dumps(([png] * 3, [True])))
    with pytest.raises(ValueError, match="odd_count.bin"):
        load_bin(odd)
    short = tmp_path / "too_few.bin"
    short.write_bytes(pickle.dumps(([png] * 2, [True, False])))
    with pytest.raises(ValueError, match="too_few.bin"):
        load_bin(short)
    broken = tmp_path / "broken.bin"
    broken.write_bytes(pickle.dumps(([png, b"not an image"], [True])))
    with pytest.raises(ValueError, match=r"broken.bin.*image 1"):
        load_bin(broken)


def test_load_small_lfw_matches_mxnet_decoder():
    need(LFW_BIN)
    images, issame = load_bin(LFW_BIN)
    assert images.shape == (20, 112, 112, 3) and images.dtype == np.uint8
    assert issame.shape == (10,) and issame.all()
    mx = pytest.importorskip("mxnet")  # insightface's own decoder, as an independent reference
    with open(LFW_BIN, "rb") as f:
        bins, _ = pickle.load(f, encoding="bytes")
    for i in (0, 7, 19):
        assert np.array_equal(images[i], mx.image.imdecode(bins[i].tobytes()).asnumpy())


def test_load_glint4_val_matches_pair_list():
    need(GLINT_BIN)
    images, issame = load_bin(GLINT_BIN)
    assert images.shape == (2000, 112, 112, 3) and issame.sum() == 500
    lines = (GLINT_BIN.parent / "glint4_val_pairs.tsv").read_text().splitlines()[1:]
    assert issame.tolist() == [ln.split("\t")[1] == "1" for ln in lines]
    # Same source file -> identical pixels; 839 distinct images per the README.
    assert len({img.tobytes() for img in images}) == 839


def test_reference_model_accuracy():
    """README figures: glint4_val 0.9480 +- 0.0172 (thresholds 1.41-1.48); small_lfw 0.90 +- 0.30."""
    need(GLINT_BIN, LFW_BIN, MODEL)
    pytest.importorskip("onnxruntime")
    from of_face.eval.onnx_embedder import OnnxEmbedder

    embed = OnnxEmbedder(MODEL, mean=127.5, std=128.0, threads=1)
    r = verify_bin(GLINT_BIN, embed, batch_size=16)
    assert r["pairs"] == 1000
    assert r["accuracy"] == pytest.approx(0.9480, abs=1e-3)
    assert r["std"] == pytest.approx(0.0172, abs=1e-3)
    assert 1.41 - 1e-9 <= r["thresholds"].min() and r["thresholds"].max() <= 1.48 + 1e-9
    assert r["xnorm"] == pytest.approx(2 * r["xnorm_single"], rel=0.05)  # flip-summed vs single
    lfw = verify_bin(LFW_BIN, embed, batch_size=16)
    assert lfw["accuracy"] == pytest.approx(0.9) and lfw["std"] == pytest.approx(0.3)
