"""IJB-C per-pair scores against insightface's `onnx_ijbc.py` pipeline, recomputed here.

The reference follows recognition/arcface_torch/onnx_ijbc.py step by step (../shared/data/README.md
says the shared reference table was made with it): cv2.imread + BGR->RGB, float32 landmarks, a
similarity fit to its SRC template (skimage's SimilarityTransform = least squares; written here as
the closed-form complex-number solution, a second derivation), cv2.warpAffine(borderValue=0),
image + flipped image through the ONNX model with (x - mean) / std, flip sum, x faceness, mean per
media then sum per template, sklearn normalize, dot product per pair through a template2id table.
of_face's evaluate_ijb must give the same score for every pair within 1e-4.
"""
import cv2
import numpy as np
import onnxruntime as ort
from sklearn.preprocessing import normalize

from conftest import SHARED, need
from of_face.eval.ijb import evaluate_ijb
from of_face.eval.onnx_embedder import OnnxEmbedder

IJBC = SHARED / "data" / "ijbc_mini"
MODEL = SHARED / "models" / "mobilefacenet_192d.onnx"
MEAN, STD = 127.5, 128.0  # this model's normalisation (README: pixel_norm.txt 127.5 / 128)

SRC = np.array([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655],
                [62.7299, 92.2041]], dtype=np.float32)
SRC[:, 0] += 8.0


def similarity_complex(src, dst):
    """Least-squares z -> a z + b over complex points (a similarity without reflection)."""
    s = src[:, 0].astype(np.float64) + 1j * src[:, 1]
    d = dst[:, 0].astype(np.float64) + 1j * dst[:, 1]
    sc, dc = s - s.mean(), d - d.mean()
    a = (dc * np.conj(sc)).sum() / (np.abs(sc) ** 2).sum()
    b = d.mean() - a * s.mean()
    return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag]])


def reference_scores():
    meta = IJBC / "meta"
    lines = (meta / "ijbc_name_5pts_score.txt").read_text().splitlines()
    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    name_in, name_out = session.get_inputs()[0].name, session.get_outputs()[0].name
    feats = []
    for line in lines:
        parts = line.strip().split(" ")
        img = cv2.cvtColor(cv2.imread(str(IJBC / "loose_crop" / parts[0])), cv2.COLOR_BGR2RGB)
        lmk = np.array([float(x) for x in parts[1:-1]], dtype=np.float32).reshape(5, 2)
        img = cv2.warpAffine(img, similarity_complex(lmk, SRC), (112, 112), borderValue=0.0)
        batch = np.stack([img, np.fliplr(img)]).astype(np.float32).transpose(0, 3, 1, 2)
        out = session.run([name_out], {name_in: (batch - MEAN) / STD})[0].astype(np.float64)
        feats.append(out[0] + out[1])  # flip test
    faceness = np.array([line.split()[-1] for line in lines]).astype(np.float32)
    feats = np.array(feats) * faceness[:, None]
    tid_mid = np.loadtxt(meta / "ijbc_face_tid_mid.txt", dtype=str)
    templates, medias = tid_mid[:, 1].astype(int), tid_mid[:, 2].astype(int)
    unique = np.unique(templates)
    tfeats = np.zeros((len(unique), feats.shape[1]))
    for k, t in enumerate(unique):
        (ind,) = np.where(templates == t)
        media_feats = [feats[ind][medias[ind] == m].mean(0) for m in np.unique(medias[ind])]
        tfeats[k] = np.sum(media_feats, axis=0)
    tfeats = normalize(tfeats)
    template2id = np.zeros(unique.max() + 1, dtype=int)
    template2id[unique] = np.arange(len(unique))
    pairs = np.loadtxt(meta / "ijbc_template_pair_label.txt", dtype=int)
    return np.sum(tfeats[template2id[pairs[:, 0]]] * tfeats[template2id[pairs[:, 1]]], -1)


def test_pair_scores_match_insightface_pipeline():
    need(IJBC, MODEL)
    ref = reference_scores()
    ours = evaluate_ijb(IJBC, OnnxEmbedder(MODEL, mean=MEAN, std=STD), target="IJBC", batch_size=32,
                        workers=2)["scores"]
    assert ours.shape == ref.shape == (6160,)
    diff = np.abs(ours - ref)
    print(f"per-pair |of_face - insightface| max {diff.max():.2e}, mean {diff.mean():.2e}")
    assert diff.max() < 1e-4
