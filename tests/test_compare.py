"""`of-face embed / compare / verify` and the --checkpoint options of the evaluation scripts.

References are computed here independently: the shared MobileFaceNet through onnxruntime on
images decoded from glint4_val.bin; thresholds by brute force over a grid; the landmark path
against the *original aligned crop* (from glint4_val.bin) of the same source photo that ijbc_mini
pasted into a loose crop; checkpoint paths against a OneFlow forward pass written out here.
"""
import importlib.util
import io
import pickle
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from of_face.cli import main as cli

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GLINT_BIN = SHARED / "data" / "glint14" / "glint4_val.bin"
IJBC_MINI = SHARED / "data" / "ijbc_mini"
MODEL = SHARED / "models" / "mobilefacenet_192d.onnx"
MFN = ["--model", str(MODEL), "--std", "128"]  # the shared model's normalisation: (x - 127.5) / 128

# Pairs of glint4_val.bin (fold 0) used as test cases: (pair index, issame). Chosen once among
# pairs the reference model gets right, well away from the threshold (cosines 0.67, 0.88, -0.05, -0.18).
SAME_PAIRS, DIFF_PAIRS = (1, 12), (3, 9)
CALIBRATION_PAIRS = range(100, 200)  # fold 1: 50 same + 50 different, disjoint from the test pairs


def need(*paths):
    for p in paths:
        if not p.exists():
            pytest.skip(f"shared test material missing: {p}")


@pytest.fixture(scope="module")
def glint():
    need(GLINT_BIN, MODEL)
    with open(GLINT_BIN, "rb") as f:
        bins, issame = pickle.load(f)
    return list(bins), np.asarray(issame, dtype=bool)


def decode(jpeg):
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


class Reference:
    """MobileFaceNet through onnxruntime, normalisation written out: (x - 127.5) / 128, NCHW."""

    def __init__(self):
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.sess = ort.InferenceSession(str(MODEL), sess_options=opts, providers=["CPUExecutionProvider"])

    def raw(self, rgb):
        x = ((np.asarray(rgb, np.float32) - 127.5) / 128.0).transpose(0, 3, 1, 2)
        return self.sess.run(None, {"input": np.ascontiguousarray(x)})[0].astype(np.float64)

    def unit(self, rgb):
        rgb = np.asarray(rgb)
        f = self.raw(rgb) + self.raw(rgb[:, :, ::-1])
        return f / np.linalg.norm(f, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def ref():
    need(MODEL)
    return Reference()


def write_pair(bins, i, folder):
    a, b = Path(folder) / f"pair{i}_a.jpg", Path(folder) / f"pair{i}_b.jpg"
    a.write_bytes(bins[2 * i])  # the .bin holds JPEG bytes: write them as files unchanged
    b.write_bytes(bins[2 * i + 1])
    return a, b


def write_bin(bins, issame, pairs, path):
    pairs = list(pairs)
    sub = [bins[2 * i + k] for i in pairs for k in (0, 1)]
    with open(path, "wb") as f:
        pickle.dump((sub, [bool(issame[i]) for i in pairs]), f, protocol=4)
    return path


def parse_compare(text):
    cos = float(re.search(r"^cosine: (\S+)$", text, re.M).group(1))
    thr = float(re.search(r"^threshold: (\S+)", text, re.M).group(1))
    decision = re.search(r"^decision: (\S+)$", text, re.M).group(1)
    return cos, thr, decision


def run_cli(capsys, args):
    capsys.readouterr()
    rc = cli(args)
    out = capsys.readouterr()
    assert not rc, out.err
    return out.out


def test_compare_real_pairs_against_reference(glint, ref, tmp_path, capsys):
    bins, issame = glint
    cosines = {}
    for i in SAME_PAIRS + DIFF_PAIRS:
        a, b = write_pair(bins, i, tmp_path)
        cos, thr, decision = parse_compare(run_cli(capsys, ["compare", str(a), str(b), *MFN, "--threshold", "0.3"]))
        want = ref.unit(np.stack([decode(bins[2 * i]), decode(bins[2 * i + 1])]))
        assert cos == pytest.approx(float(want[0] @ want[1]), abs=1e-5)
        assert thr == 0.3 and decision == ("same" if cos >= 0.3 else "different")
        cosines[i] = cos
    # every same pair scores above every different pair
    assert min(cosines[i] for i in SAME_PAIRS) > max(cosines[i] for i in DIFF_PAIRS) + 0.3


def test_calibrated_threshold_is_best_accuracy_and_calls_match_labels(glint, ref, tmp_path, capsys):
    from of_face.data.verification_bin import load_bin
    from of_face.scoring import evaluate

    bins, issame = glint
    calib = write_bin(bins, issame, CALIBRATION_PAIRS, tmp_path / "calib.bin")
    a, b = write_pair(bins, SAME_PAIRS[0], tmp_path)
    out = run_cli(capsys, ["compare", str(a), str(b), *MFN, "--calibrate-bin", str(calib)])
    _, threshold, decision = parse_compare(out)
    assert "calibrated on" in out and decision == "same"

    # Independent: cosines of the calibration pairs, accuracy on a fine grid of thresholds.
    images, labels = load_bin(calib)
    emb = ref.unit(images)
    cos = np.sum(emb[0::2] * emb[1::2], axis=1)

    def accuracy(t):
        return np.mean((cos >= t) == labels)

    grid = np.linspace(-1, 1, 20001)
    best_grid = max(accuracy(t) for t in grid)
    assert accuracy(threshold) >= best_grid - 1e-12
    assert accuracy(threshold) >= 0.95  # README: the model is ~95% accurate on this set
    # insightface's own fold protocol on the same pairs (squared L2 = 2 - 2 cos) cannot beat it.
    assert accuracy(threshold) >= evaluate(emb, labels, nfolds=1)["accuracy"] - 1e-12

    for i in SAME_PAIRS + DIFF_PAIRS:
        a, b = write_pair(bins, i, tmp_path)
        _, _, decision = parse_compare(run_cli(capsys, ["compare", str(a), str(b), *MFN,
                                                        "--threshold", repr(threshold)]))
        assert decision == ("same" if issame[i] else "different"), f"pair {i}"


def test_default_threshold_is_documented_and_used(glint, tmp_path, capsys):
    from of_face.eval.compare import DEFAULT_THRESHOLD

    bins, _ = glint
    a, b = write_pair(bins, DIFF_PAIRS[0], tmp_path)
    out = run_cli(capsys, ["compare", str(a), str(b), *MFN])
    _, thr, decision = parse_compare(out)
    assert thr == pytest.approx(DEFAULT_THRESHOLD) and "default" in out and decision == "different"


def ijbc_landmarks(name):
    for line in (IJBC_MINI / "meta" / "ijbc_name_5pts_score.txt").read_text().splitlines():
        f = line.split()
        if f[0] == name:
            return np.array(f[1:11], dtype=np.float64).reshape(5, 2)
    raise KeyError(name)


def test_embed_with_landmarks_recovers_the_original_crop(glint, ref, tmp_path, capsys):
    """ijbc_mini 464.jpg is glint4_val pair 5's second image (Will Smith/10224.png) pasted into a
    loose crop; aligning it with its 5 points must embed like the original aligned crop."""
    need(IJBC_MINI)
    from of_face.eval.align import align_face

    bins, issame = glint
    rows = [ln.split("\t") for ln in (IJBC_MINI / "images.tsv").read_text().splitlines()]
    source = {r[0]: r[5] for r in rows[1:]}
    pairs = [ln.split("\t") for ln in (GLINT_BIN.parent / "glint4_val_pairs.tsv").read_text().splitlines()[1:]]
    assert source["464.jpg"] == pairs[5][3] == "Will Smith/10224.png"
    original = decode(bins[11])
    loose = IJBC_MINI / "loose_crop" / "464.jpg"
    other = IJBC_MINI / "loose_crop" / "1.jpg"  # Gwyneth Paltrow
    assert Image.open(loose).size != (112, 112)

    out = tmp_path / "emb.npy"
    # The IJB landmark file itself has the accepted `name x1 y1 ... x5 y5 [score]` layout.
    run_cli(capsys, ["embed", str(loose), str(other), *MFN,
                     "--landmarks", str(IJBC_MINI / "meta" / "ijbc_name_5pts_score.txt"), "--out", str(out)])
    emb = np.load(out)
    assert emb.shape == (2, 192) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert (tmp_path / "emb.names.txt").read_text().split() == [str(loose), str(other)]

    want = ref.unit(original[None])[0]
    assert float(emb[0] @ want) > 0.9
    # same pipeline, done by hand: align_face with the landmarks, then the reference model
    by_hand = ref.unit(align_face(np.asarray(Image.open(loose).convert("RGB")), ijbc_landmarks("464.jpg"))[None])[0]
    assert float(emb[0] @ by_hand) > 0.9999
    # a different person stays far away
    assert float(emb[1] @ want) < 0.3

    # Without landmarks a loose crop is refused, not silently resized.
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli(["embed", str(loose), *MFN])
    assert exit_info.value.code == 2  # a refused input
    assert "not an aligned 112x112 crop" in capsys.readouterr().err


# --------------------------------------------------------------------------- --checkpoint paths


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from test_export import make_run, reference_model

    run = tmp_path_factory.mktemp("tiny") / "run"
    cfg = make_run(str(run), seed=3)
    return run, reference_model(str(run), cfg)


def oneflow_unit(model, rgb):
    """Flip-summed unit embeddings from a OneFlow forward pass with (x/255 - 0.5)/0.5 written out."""
    import oneflow as flow

    def fwd(a):
        x = (np.asarray(a, np.float32) / 255.0 - 0.5) / 0.5
        with flow.no_grad():
            return model(flow.tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy().astype(np.float64)

    f = fwd(rgb) + fwd(np.asarray(rgb)[:, :, ::-1])
    return f, f / np.linalg.norm(f, axis=1, keepdims=True)


def test_checkpoint_verify_and_compare(glint, tiny_run, tmp_path, capsys):
    from of_face.data.verification_bin import load_bin
    from of_face.scoring import evaluate

    run, model = tiny_run
    bins, issame = glint
    small = write_bin(bins, issame, range(0, 20), tmp_path / "small.bin")
    out = run_cli(capsys, ["verify", "--checkpoint", str(run), "--bin", str(small)])
    images, labels = load_bin(small)
    summed, _ = oneflow_unit(model, images)
    r = evaluate(summed, labels)
    assert f"small: {r['accuracy']:.4f} ± {r['std']:.4f}" in out and "20 pairs" in out

    a, b = write_pair(bins, 1, tmp_path)
    cos, _, _ = parse_compare(run_cli(capsys, ["compare", str(a), str(b), "--checkpoint", str(run)]))
    _, unit = oneflow_unit(model, np.stack([decode(bins[2]), decode(bins[3])]))
    assert cos == pytest.approx(float(unit[0] @ unit[1]), abs=1e-5)

    # eval/verification.py is the same command
    spec = importlib.util.spec_from_file_location("eval_verification", REPO / "eval" / "verification.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    capsys.readouterr()
    assert script.main(["--checkpoint", str(run / "backbone.npz"), "--bin", str(small)]) == 0
    assert f"small: {r['accuracy']:.4f}" in capsys.readouterr().out


def test_ijbc_script_takes_a_checkpoint(tiny_run, tmp_path, capsys):
    """eval/ijbc.py --checkpoint on a subset of ijbc_mini vs evaluate_ijb with a hand-written embedder."""
    need(IJBC_MINI)
    import oneflow as flow

    from of_face.eval.ijb import evaluate_ijb

    run, model = tiny_run
    # Subset: the templates of images 1-8 (one identity) and 61-68 (another), their pairs.
    meta = IJBC_MINI / "meta"
    tid_mid = [ln.split() for ln in (meta / "ijbc_face_tid_mid.txt").read_text().splitlines()]
    lmk = (meta / "ijbc_name_5pts_score.txt").read_text().splitlines()
    keep_t = {r[1] for r in tid_mid[0:8] + tid_mid[60:68]}
    keep = [i for i, r in enumerate(tid_mid) if r[1] in keep_t]
    pairs = [ln for ln in (meta / "ijbc_template_pair_label.txt").read_text().splitlines()
             if ln.split()[0] in keep_t and ln.split()[1] in keep_t]
    labels = {ln.split()[2] for ln in pairs}
    assert labels == {"0", "1"}, "subset needs both same and different pairs"
    sub = tmp_path / "ijbc_sub"
    (sub / "meta").mkdir(parents=True)
    (sub / "loose_crop").symlink_to(IJBC_MINI / "loose_crop")
    (sub / "meta" / "ijbc_face_tid_mid.txt").write_text("".join(" ".join(tid_mid[i]) + "\n" for i in keep))
    (sub / "meta" / "ijbc_name_5pts_score.txt").write_text("".join(lmk[i] + "\n" for i in keep))
    (sub / "meta" / "ijbc_template_pair_label.txt").write_text("\n".join(pairs) + "\n")

    spec = importlib.util.spec_from_file_location("eval_ijbc", REPO / "eval" / "ijbc.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    capsys.readouterr()
    assert script.main(["--checkpoint", str(run), "--image-path", str(sub), "--result-dir",
                        str(tmp_path / "res"), "--workers", "1"]) == 0
    assert "TAR (%) @ FAR" in capsys.readouterr().out
    got = np.load(tmp_path / "res" / "scores.npy")

    def embed(rgb):
        x = (np.asarray(rgb, np.float32) / 255.0 - 0.5) / 0.5
        with flow.no_grad():
            return model(flow.tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()

    want = evaluate_ijb(sub, embed, workers=1)["scores"]
    assert len(got) == len(pairs)
    np.testing.assert_allclose(got, want, atol=1e-5)
