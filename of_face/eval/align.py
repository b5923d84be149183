"""5-point face alignment to the ArcFace 112x112 template.

The IJB-B/C protocol crops every image by fitting a similarity transform from its five detected
landmarks to the ArcFace template and warping with bilinear interpolation: insightface uses
skimage's SimilarityTransform (Umeyama least squares, `estimate_similarity` here) and
cv2.warpAffine with a black border. `align_face` warps with cv2.warpAffine too: OpenCV's
fixed-point bilinear differs from an exact float warp by up to a few grey levels, which moved
IJB pair scores by up to 4e-3 against insightface's (and the numpy warp was 3x slower).
`warp_affine` keeps the exact float64 warp as a reference.
"""
import numpy as np

# Left eye, right eye, nose tip, left and right mouth corner (image terms), 112x112 crop, in the
# pixel-centre convention of OpenCV (pixel (0, 0) covers [-0.5, 0.5)).
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


# The same points as insightface writes them (onnx_ijbc.py SRC, float32, x shifted by 8 in float32)
_INSIGHTFACE_SRC = np.array([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655],
                             [62.7299, 92.2041]], dtype=np.float32)
_INSIGHTFACE_SRC[:, 0] += np.float32(8.0)


def estimate_similarity(src5, dst5):
    """Least-squares similarity (rotation, uniform scale, translation) mapping src -> dst.

    Umeyama (1991): with centred point sets, the optimal rotation comes from the SVD of their
    cross-covariance; a reflection is excluded by flipping the sign of the smallest singular
    direction when needed. Returns the 2x3 matrix M with dst ~= M @ [x, y, 1].
    """
    src = np.asarray(src5, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst5, dtype=np.float64).reshape(-1, 2)
    if src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"need matching point sets of >= 2 points, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    if src_var <= 1e-12:
        raise ValueError("degenerate landmarks: all source points coincide")
    cov = dst_c.T @ src_c / len(src)
    u, sing, vt = np.linalg.svd(cov)
    # Force a proper rotation (det = +1): a mirrored face must not be "aligned" by a reflection.
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0
    rot = u @ np.diag(sign) @ vt
    scale = (sing * sign).sum() / src_var
    shift = dst_mean - scale * rot @ src_mean
    return np.hstack([scale * rot, shift[:, None]])


def warp_affine(image, matrix, size):
    """Warp `image` (H, W[, C]) with the forward 2x3 map `matrix` into an (h, w) = size output.

    Same semantics as cv2.warpAffine(img, M, (w, h), flags=INTER_LINEAR, borderValue=0): every
    output pixel samples the source at M^-1 @ (x, y, 1) bilinearly, and neighbours outside the
    source count as 0. Computed in float64 and rounded, so it differs from OpenCV's fixed-point
    version by at most about one grey level.
    """
    img = np.asarray(image)
    squeeze = img.ndim == 2
    if squeeze:
        img = img[:, :, None]
    h_out, w_out = size
    full = np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(full)[:2]
    ys, xs = np.mgrid[0:h_out, 0:w_out].astype(np.float64)
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    x0, y0 = np.floor(sx), np.floor(sy)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    # One pixel of zero padding gives the black border; indices beyond it are clipped onto it.
    pad = np.pad(img.astype(np.float64), ((1, 1), (1, 1), (0, 0)))
    h_pad, w_pad = pad.shape[:2]
    xi0 = np.clip(x0.astype(np.int64) + 1, 0, w_pad - 1)
    xi1 = np.clip(x0.astype(np.int64) + 2, 0, w_pad - 1)
    yi0 = np.clip(y0.astype(np.int64) + 1, 0, h_pad - 1)
    yi1 = np.clip(y0.astype(np.int64) + 2, 0, h_pad - 1)
    top = pad[yi0, xi0] * (1 - fx) + pad[yi0, xi1] * fx
    bottom = pad[yi1, xi0] * (1 - fx) + pad[yi1, xi1] * fx
    out = top * (1 - fy) + bottom * fy
    if np.issubdtype(img.dtype, np.integer):
        out = np.clip(np.rint(out), np.iinfo(img.dtype).min, np.iinfo(img.dtype).max)
    out = out.astype(img.dtype)
    return out[:, :, 0] if squeeze else out


def align_face(image, landmarks5, size=112):
    """Crop a face to the ArcFace template: image (H, W, 3) uint8, landmarks5 (5, 2) in image px.
    As insightface's norm_crop / onnx_ijbc.py: cv2.warpAffine, bilinear, border value 0."""
    import cv2

    # float32 landmarks and template, exactly as insightface holds them: OpenCV rounds sample
    # positions to 1/32 px, so even a 1e-5 change of the matrix moves some pixels by a grey level
    template = _INSIGHTFACE_SRC.astype(np.float64) * (size / 112.0)
    lmk = np.asarray(landmarks5, dtype=np.float32).astype(np.float64)
    matrix = estimate_similarity(lmk, template)
    return cv2.warpAffine(np.ascontiguousarray(image), matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderValue=0.0)
