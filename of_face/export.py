"""Export a trained backbone to ONNX (through oneflow-onnx) and check it against OneFlow.

    of-face export --checkpoint OUTPUT_DIR --out model.onnx [-c config.yaml] [--opset 11]
        [--bake-normalization] [--tolerance 1e-4]          (or python -m of_face.export ...)

`--checkpoint` is a training run's output folder (backbone.npz + config.yaml, or else its newest
complete `ckpt-*` training checkpoint), a `backbone.npz` file (its config.yaml is read from the
same folder unless `-c/--config` names one) or a `ckpt-*` checkpoint (the model config stored in
it). The line it prints names the checkpoint used.

The ONNX model holds the backbone only, FP32, input `input` float32 [N, 3, 112, 112] (NCHW, RGB)
with a dynamic batch N, output `embedding` [N, d] (not L2-normalised). Pixels are normalised
outside the model, as insightface's `onnx_ijbc.py` expects: (x - 127.5) / 127.5, which equals the
training normalisation (x / 255 - 0.5) / 0.5. With `--bake-normalization` that step is inside the
model and the input is the raw 0..255 RGB pixel values as float32.

oneflow-onnx converts a static `nn.Graph` traced with one batch size, and OneFlow lowers
`flatten` to a Reshape whose target shape holds that batch size. We trace with an unusual batch
size, then make the batch dimension dynamic: graph input/output dims become dim_param "N" and every
Reshape target that copies the traced batch becomes 0 ("copy the input's dim") or -1. The result
is then run with onnxruntime at batch 1, 3 and 17 against the OneFlow model in eval mode; the
file is only renamed into place when every batch agrees: max abs diff <= tolerance (default 1e-4)
x max(1, largest OneFlow output). oneflow-onnx 0.6.2 also writes a few nodes wrongly (ReduceSum
axes and ReLU6 bounds lost from opset 11/13, Flatten's axis misspelt); `fix_converter_output`
repairs them from the OneFlow graph, and the parity check would catch any other.
"""
import argparse
import os
import sys
import tempfile

import numpy as np

import of_face  # noqa: F401  (preloads libraries; must precede oneflow)
import oneflow as flow

from of_face.run import checkpoint
from of_face.run.folder import RunFolder
from of_face.run.names import CONFIG_FILE
from of_face.models.weights import BACKBONE_FILE, load_backbone, load_backbone_state
from of_face.config import Config, ModelCfg, load_config
from of_face.data.loader import normalize
from of_face.errors import INPUT, ToolError, one_line_errors
from of_face.io import atomic_path, check_output
from of_face.models import build_backbone
from of_face.onnx_surgery import (INPUT_NAME, MEAN, OUTPUT_NAME, STD, ExportError, _rename_value, add_normalization,
                                   fix_converter_output, flow_ops, make_batch_dynamic)
from of_face.models.embed_graph import EmbedGraph
from of_face.oneflow_compat import full_graph_proto

IMAGE_SIZE = 112
# Batch size used to trace the graph: a prime that divides no channel, spatial or token size of
# the supported backbones (112 = 16 * 7, 144 tokens, powers-of-two widths), so the one entry of a
# Reshape target that is a multiple of it is the one carrying the batch.
TRACE_BATCH = 11
# opsets oneflow-onnx 0.6.2 converts to (its newest handlers are for opset 16; its default is 10)
OPSETS = range(10, 17)


# --------------------------------------------------------------------------- checkpoint + config


def resolve_checkpoint(run_dir_or_checkpoint, config=None):
    """(path, ModelCfg) from a run folder or a file and an optional config.

    A run folder: its backbone.npz, else its newest complete `ckpt-*` training checkpoint. A
    training checkpoint's model comes from the config stored in it unless `config` is given; a
    backbone.npz's from the config.yaml beside it."""
    path = os.fspath(run_dir_or_checkpoint)
    npz = path
    if os.path.isdir(path) and not checkpoint.is_training_checkpoint(path):  # a run folder
        npz = os.path.join(path, BACKBONE_FILE)
        if not os.path.isfile(npz):
            npz = RunFolder(path).latest()
            if npz is None:
                raise FileNotFoundError(f"checkpoint not found: {path} holds no {BACKBONE_FILE} and no complete "
                                        "ckpt-* training checkpoint")
    if not os.path.exists(npz):
        raise FileNotFoundError(f"checkpoint not found: {npz}")
    if config is None and checkpoint.is_training_checkpoint(npz):
        stored = (checkpoint.read_meta(npz).get("config") or {}).get("Model")
        if stored is None:
            raise FileNotFoundError(f"{npz}: no config stored in the checkpoint; pass the run's config (--config)")
        return npz, ModelCfg(**stored)
    if config is None:
        config = os.path.join(os.path.dirname(os.path.abspath(npz)), CONFIG_FILE)
        if not os.path.isfile(config):
            raise FileNotFoundError(f"no {CONFIG_FILE} next to {npz}; pass the run's config explicitly (--config)")
    if isinstance(config, ModelCfg):
        model_cfg = config
    elif isinstance(config, Config):
        model_cfg = config.Model
    else:
        model_cfg = load_config(os.fspath(config)).Model
    return npz, model_cfg


def load_model(run_dir_or_checkpoint, config=None):
    """Local backbone in eval mode with the checkpoint's weights: (module, ModelCfg, path used)."""
    npz, model_cfg = resolve_checkpoint(run_dir_or_checkpoint, config)
    model = build_backbone(model_cfg)
    if checkpoint.is_training_checkpoint(npz):
        state, _ = checkpoint.read_backbone(npz)
        load_backbone_state(model, state, npz)
    else:
        load_backbone(model, npz)
    model.eval()
    return model, model_cfg, npz


# --------------------------------------------------------------------------- export


def _oneflow_embed(model, x):
    with flow.no_grad():
        return model(flow.tensor(x, dtype=flow.float32)).numpy()


def _parity_batches(batch_sizes, seed=0):
    """uint8 images [n, 3, 112, 112] per batch size: per image a random colour, gradient and
    stripe pattern plus noise (pure noise images all embed alike once pooled, a weak check)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / float(IMAGE_SIZE)
    batches = {}
    for n in batch_sizes:
        out = np.empty((int(n), 3, IMAGE_SIZE, IMAGE_SIZE))
        for i in range(int(n)):
            base = rng.uniform(60, 200, (3, 1, 1))
            grad = rng.uniform(-80, 80, (2, 3, 1, 1))
            fx, fy, phase = rng.uniform(1, 6), rng.uniform(1, 6), rng.uniform(0, 2 * np.pi)
            out[i] = (base + grad[0] * (xx - 0.5) + grad[1] * (yy - 0.5)
                      + 40 * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
                      + rng.normal(0, 20, (3, IMAGE_SIZE, IMAGE_SIZE)))
        batches[int(n)] = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return batches


def check_parity(onnx_path, model, baked=False, batch_sizes=(1, 3, 17), tolerance=1e-4):
    """Max abs difference onnxruntime vs OneFlow (eval, eager) per batch size; raises on a miss.

    A batch passes when max|onnx - oneflow| <= tolerance * max(1, max|oneflow|): an absolute
    bound for embeddings within +-1, relative to the output's size beyond (float32 rounding grows
    with it: a full-width MobileFaceNet whose outputs reach 55 differs by 1.0e-4, 1.8e-6 relative).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    diffs = {}
    for n, pixels in _parity_batches(batch_sizes).items():
        normed = normalize(pixels)
        feed = pixels.astype(np.float32) if baked else normed
        try:
            got = sess.run([OUTPUT_NAME], {INPUT_NAME: feed})[0]
        except Exception as e:
            raise ExportError(f"onnxruntime failed at batch {n}: {e}") from None
        want = _oneflow_embed(model, normed)
        if got.shape != want.shape:
            raise ExportError(f"batch {n}: ONNX output shape {got.shape} != OneFlow {want.shape}")
        diffs[n] = float(np.abs(got - want).max())
        scale = float(np.abs(want).max())
        limit = tolerance * max(1.0, scale)
        if not np.isfinite(diffs[n]) or diffs[n] > limit:
            raise ExportError(
                f"ONNX and OneFlow outputs differ at batch {n}: max abs diff {diffs[n]:.3g} > tolerance "
                f"{tolerance:g} x max(1, largest OneFlow output {scale:.3g}) = {limit:.3g}; "
                f"a larger --tolerance accepts it")
    return diffs


def _check_convertible(ops, opset, model_name):
    """Name the OneFlow ops oneflow-onnx has no conversion for at this opset (it would crash later)."""
    from oneflow_onnx.oneflow2onnx import flow2onnx  # noqa: F401  (registers the handlers)
    from oneflow_onnx.oneflow2onnx.handler import flow_op

    supported = flow_op.CreateMapping(opset, None)
    missing = sorted({op_type for op_type, _ in ops.values()} - set(supported))
    if missing:
        higher = [v for v in range(opset + 1, 17) if not set(missing) - set(flow_op.CreateMapping(v, None))]
        hint = f"; use --opset {higher[0]} or higher" if higher else ""
        flow_op.CreateMapping(opset, None)
        raise ExportError(f"oneflow-onnx cannot convert the OneFlow op(s) {', '.join(missing)} of {model_name} "
                          f"at opset {opset}{hint}", code=INPUT)


def export_onnx(run_dir_or_checkpoint, out_path, config=None, opset=11, bake_normalization=False,
                batch_for_check=(1, 3, 17), tolerance=1e-4, verbose=False):
    """Export a checkpoint's backbone to `out_path`; returns {"path", "max_abs_diff": {batch: diff}, ...}.

    Nothing is written at `out_path` unless conversion and the parity check both succeed.
    """
    if opset not in OPSETS:
        raise ToolError(f"--opset {opset}: oneflow-onnx converts to opsets {OPSETS[0]}..{OPSETS[-1]} (default 11)")
    check_output(out_path, "--out", ".onnx file")
    import onnx
    from oneflow_onnx.oneflow2onnx.flow2onnx import Export

    model, model_cfg, npz = load_model(run_dir_or_checkpoint, config)
    out_path = os.path.abspath(os.fspath(out_path))
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    # written to `.<name>.tmp<pid>`, checked there, renamed into place only if the check passes
    with atomic_path(out_path) as tmp_out:
        with tempfile.TemporaryDirectory(prefix="of_face_export_") as work:
            graph = EmbedGraph(model)
            example = normalize(_parity_batches([TRACE_BATCH], seed=1)[TRACE_BATCH])
            with flow.no_grad():
                graph(flow.tensor(example, dtype=flow.float32))  # trace + compile at TRACE_BATCH
            ops = flow_ops(full_graph_proto(graph))
            _check_convertible(ops, opset, model_cfg.name)
            weights = os.path.join(work, "weights")
            flow.save(graph.state_dict(), weights)
            raw = os.path.join(work, "raw.onnx")
            try:
                if verbose:
                    Export(graph, weights, raw, opset=opset)
                else:
                    _quiet(Export, graph, weights, raw, opset=opset)
            except Exception as e:
                raise ExportError(f"oneflow-onnx could not convert {model_cfg.name}: {type(e).__name__}: {e}") from e
            proto = onnx.load(raw)
            if len(proto.graph.input) != 1 or len(proto.graph.output) != 1:
                raise ExportError(f"expected one input and one output, got {len(proto.graph.input)} / "
                                  f"{len(proto.graph.output)}")
            _rename_value(proto.graph, proto.graph.input[0].name, INPUT_NAME)
            _rename_value(proto.graph, proto.graph.output[0].name, OUTPUT_NAME)
            fix_converter_output(proto, opset, ops)
            patched = make_batch_dynamic(proto, TRACE_BATCH)
            if bake_normalization:
                add_normalization(proto)
            proto.producer_name = "of_face"
            del proto.metadata_props[:]
            for key, value in (("normalization", "inside: raw 0..255 RGB" if bake_normalization
                                else f"outside: (x - {MEAN}) / {STD}, RGB"),
                               # machine-readable, what embedders.make_embedder applies by default
                               ("mean", "0" if bake_normalization else str(MEAN)),
                               ("std", "1" if bake_normalization else str(STD)),
                               ("model", model_cfg.name), ("embedding_size", str(model_cfg.embedding_size))):
                entry = proto.metadata_props.add()
                entry.key, entry.value = key, value
            onnx.checker.check_model(proto)
            with open(tmp_out, "wb") as f:
                f.write(proto.SerializeToString())
        diffs = check_parity(tmp_out, model, baked=bake_normalization, batch_sizes=batch_for_check,
                             tolerance=tolerance)
    return {"path": out_path, "max_abs_diff": diffs, "opset": opset, "bake_normalization": bool(bake_normalization),
            "checkpoint": npz, "shape_constants_patched": patched, "embedding_size": model_cfg.embedding_size}


def _quiet(fn, *args, **kwargs):
    """Run fn with the converter's prints and info logs silenced (errors still raise)."""
    import contextlib
    import io
    import logging

    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return fn(*args, **kwargs)
    finally:
        logging.getLogger().setLevel(level)


@one_line_errors
def main(argv=None):
    ap = argparse.ArgumentParser(prog="of-face export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="run output folder, backbone.npz or ckpt-* checkpoint")
    ap.add_argument("--out", required=True, help="ONNX file to write")
    ap.add_argument("-c", "--config", default=None, help="config.yaml (default: the one next to the checkpoint)")
    ap.add_argument("--opset", type=int, default=11)
    ap.add_argument("--bake-normalization", action="store_true",
                    help="put (x - 127.5) / 127.5 inside the model (input: raw 0..255 RGB floats)")
    ap.add_argument("--tolerance", type=float, default=1e-4,
                    help="allowed max abs diff ONNX vs OneFlow, times max(1, largest output) (default 1e-4)")
    ap.add_argument("--check-batches", default="1,3,17", help="batch sizes of the parity check")
    ap.add_argument("-v", "--verbose", action="store_true", help="show oneflow-onnx's own output")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-o" in argv:  # the flags of older versions: -c RUN -o OUT.onnx
        ap.error("-o means a config override in of-face, not an output: use --checkpoint RUN --out OUT.onnx")
    args = ap.parse_args(argv)
    try:
        batches = tuple(int(b) for b in args.check_batches.split(",") if b.strip())
    except ValueError:
        raise ToolError(f"--check-batches {args.check_batches}: expected batch sizes like 1,3,17") from None
    r = export_onnx(args.checkpoint, args.out, config=args.config, opset=args.opset,
                    bake_normalization=args.bake_normalization, batch_for_check=batches,
                    tolerance=args.tolerance, verbose=args.verbose)
    diffs = ", ".join(f"batch {n}: {d:.2e}" for n, d in r["max_abs_diff"].items())
    print(f"wrote {r['path']} from {r['checkpoint']} (opset {r['opset']}, input '{INPUT_NAME}' [N,3,112,112], output "
          f"'{OUTPUT_NAME}' [N,{r['embedding_size']}], normalisation "
          f"{'inside' if r['bake_normalization'] else 'outside: (x-127.5)/127.5'}); "
          f"ONNX vs OneFlow max abs diff {diffs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
