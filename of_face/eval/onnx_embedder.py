"""Face embeddings from an ONNX model with onnxruntime (CPU, or CUDA when its provider is installed).

Used by the evaluation CLIs and tests to check the evaluation code against an external,
pretrained model (and to evaluate exported of_face models the same way).
"""
import numpy as np
import onnxruntime as ort


def providers(device: str = "cpu") -> list:
    """onnxruntime execution providers for `device` (cpu | cuda); cuda needs the CUDA build."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if device != "cuda" or "CUDAExecutionProvider" not in available:
        raise ValueError(f"--device {device}: this onnxruntime ({ort.__version__}) offers {', '.join(available)}; "
                         f"for GPUs install onnxruntime-gpu=={ort.__version__} in place of onnxruntime, "
                         "or use --device cpu")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


class OnnxEmbedder:
    """Callable: uint8 RGB batch [n, H, W, 3] -> float32 embeddings [n, d].

    Pixels are normalised as (x - mean) / std; the layout the model wants (NCHW or NHWC) is read
    from its input shape. The batch dimension may be dynamic or fixed (then inputs are chunked).
    """

    def __init__(self, model_path, mean=127.5, std=127.5, threads=None, device="cpu"):
        opts = ort.SessionOptions()
        # errors only: some exported models (SFace-style) make onnxruntime print one warning per
        # initializer at load (174 lines), which buries the result
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model_path), sess_options=opts, providers=providers(device))
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_name = self.session.get_outputs()[0].name
        shape = list(inp.shape)
        if len(shape) != 4:
            raise ValueError(f"{model_path}: expected a 4-D image input, got shape {shape}")
        # A channel axis of 3 at position 1 means NCHW (insightface/of_face exports), else NHWC.
        self.channels_first = shape[1] == 3
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.mean, self.std = float(mean), float(std)

    def __call__(self, images):
        x = (np.asarray(images, dtype=np.float32) - self.mean) / self.std
        if self.channels_first:
            x = x.transpose(0, 3, 1, 2)
        x = np.ascontiguousarray(x)
        step = self.fixed_batch or max(len(x), 1)
        outs = []
        for i in range(0, len(x), step):
            chunk = x[i:i + step]
            pad = step - len(chunk) if self.fixed_batch else 0
            if pad:  # a fixed-batch model needs full batches: pad with zeros, drop their outputs
                chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.float32)])
            out = self.session.run([self.output_name], {self.input_name: chunk})[0]
            outs.append(out[:len(out) - pad])
        return np.concatenate(outs).astype(np.float32, copy=False)
