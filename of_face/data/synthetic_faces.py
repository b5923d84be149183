"""Cartoon faces for the synthetic identities (of_face/data/synthetic.py writes them as datasets).

An identity is a small parameter vector (face shape, skin tone, eyes, brows, nose, mouth, hair style
and colour, ears, moles, glasses, beard): `identity_params(seed, identity)`. `render` redraws that
face n times with a random expression and yaw, then applies pose (rotation/scale/shift), lighting,
blur, noise and an occluding patch, all scaled by ``difficulty``; everything comes from the numpy
Generator it is given, so the same generator state gives the same pixels.
"""
import numpy as np
from PIL import Image, ImageFilter

SIZE = 112
CANVAS = 120  # drawn a little larger than the crop; the pose warp samples from an edge-padded copy
PAD = 32
DIFFICULTY = 0.3  # the default: see the calibration note in synthetic.py

HAIR_COLOURS = np.array([[20, 18, 18], [60, 40, 28], [110, 75, 45], [200, 165, 100], [150, 60, 30],
                         [150, 150, 150], [230, 225, 215]], np.float32)
IRIS_COLOURS = np.array([[70, 40, 20], [40, 25, 15], [60, 110, 170], [70, 120, 70], [110, 110, 120],
                         [120, 90, 40]], np.float32)


def _col(v):
    """Per-image values -> shape (n,1,1) so they broadcast against (1,h,1)/(1,1,w) coordinates."""
    return np.asarray(v, np.float32).reshape(-1, 1, 1)


def _ellipse(x, y, cx, cy, a, b, angle=None):
    """Anti-aliased ellipse coverage in [0,1] (first-order distance to the boundary, 1 px ramp)."""
    dx, dy = x - cx, y - cy
    if angle is not None:
        c, s = np.cos(angle), np.sin(angle)
        dx, dy = c * dx + s * dy, c * dy - s * dx
    u, v = dx / a, dy / b
    f = u * u + v * v - 1.0
    g = 2.0 * np.sqrt((u / a) ** 2 + (v / b) ** 2) + 1e-3
    return np.clip(0.5 - f / g, 0.0, 1.0)


class _Canvas:
    """A batch of n images in face coordinates (origin at the face centre), painted layer by layer."""

    def __init__(self, background):
        n = len(background)
        self.img = np.empty((n, CANVAS, CANVAS, 3), np.float32)
        self.img[:] = background[:, None, None, :]
        self.x = (np.arange(CANVAS, dtype=np.float32) - CANVAS / 2).reshape(1, 1, -1)
        self.y = (np.arange(CANVAS, dtype=np.float32) - CANVAS / 2 - 4).reshape(1, -1, 1)

    def paint(self, coverage, colour, box=None, opacity=1.0):
        """Blend `colour` where coverage(x, y) > 0; `box` (x0, x1, y0, y1) limits the work to a window."""
        sx = sy = slice(None)
        if box is not None:  # only evaluate the shape where it can be (features are small)
            x0, x1, y0, y1 = (int(np.floor(np.min(box[0]))), int(np.ceil(np.max(box[1]))),
                              int(np.floor(np.min(box[2]))), int(np.ceil(np.max(box[3]))))
            ox, oy = CANVAS // 2, CANVAS // 2 + 4
            sx = slice(max(0, x0 + ox), max(0, min(CANVAS, x1 + ox)))
            sy = slice(max(0, y0 + oy), max(0, min(CANVAS, y1 + oy)))
        alpha = coverage(self.x[:, :, sx], self.y[:, sy, :])
        if np.ndim(opacity) or opacity != 1.0:
            alpha = alpha * _col(opacity)
        region = self.img[:, sy, sx]  # a view: the in-place updates below paint the canvas
        change = np.asarray(colour, np.float32).reshape(-1, 1, 1, 3) - region
        change *= alpha[..., None]
        region += change


def identity_params(seed, identity):
    """The parameter vector of one identity (a dict of floats), a function of (seed, identity) only."""
    r = np.random.default_rng([seed, 1, identity])
    skin = (1 - r.uniform()) * np.array([250, 218, 190]) + r.uniform() * np.array([100, 62, 42])
    p = dict(skin=skin + r.normal(0, 8, 3), fw=r.uniform(28, 37), fh=r.uniform(37, 47), jaw=r.uniform(0, .4),
             ex=r.uniform(11, 16), ey=r.uniform(-13, -6), ew=r.uniform(4.5, 7.5), eh=r.uniform(2.5, 4.2),
             tilt=r.uniform(-.2, .2), iris=IRIS_COLOURS[r.integers(len(IRIS_COLOURS))] + r.normal(0, 10, 3),
             brow_dy=r.uniform(5, 9), brow_len=r.uniform(6, 11), brow_w=r.uniform(1.2, 3.0),
             brow_ang=r.uniform(-.3, .3), ny=r.uniform(5, 13), nw=r.uniform(3.5, 7.5), mw=r.uniform(8, 15),
             mh=r.uniform(1.8, 4.0), my_gap=r.uniform(7, 13), smile=r.uniform(-.02, .05),
             lip=np.array([170, 70, 70]) * r.uniform(.6, 1.1) + r.normal(0, 12, 3),
             hair=np.clip(HAIR_COLOURS[r.integers(len(HAIR_COLOURS))] + r.normal(0, 12, 3), 0, 255),
             style=int(r.integers(4)), hairline=r.uniform(.35, .85), curl=r.uniform(-8, 12),
             part=r.uniform(-10, 10), ear=r.uniform(.8, 1.2), blush=r.uniform(0, .3),
             glasses=r.uniform() < .15, frame=r.uniform(0, 120, 3), beard=r.uniform(.4, .8) * (r.uniform() < .15),
             moles=r.uniform([-1, -1, 1], [1, 1, 2.2], (r.poisson(1.0), 3)))
    # Hair styles: 0 short, 1 long, 2 shaved, 3 bob -> (extra height, extra width, how far down).
    top, width, length = [(r.uniform(5, 10), r.uniform(2, 5), r.uniform(-.3, .1)),
                          (r.uniform(6, 12), r.uniform(5, 12), r.uniform(.6, 1.2)),
                          (r.uniform(0, 2), r.uniform(0, 1), -.6),
                          (r.uniform(6, 11), r.uniform(4, 9), r.uniform(.1, .5))][p["style"]]
    p.update(hair_top=top, hair_w=width, hair_len=length * p["fh"], mouth_y=p["ny"] + p["my_gap"])
    if p["style"] == 2:
        p["hairline"] = 1.3  # no fringe: the head top is skin (lightly tinted by stubble below)
    return p


def _draw(p, n, r, d):
    """Draw n images of identity p (canvas, float) with random expression, yaw and clothing."""
    yaw = np.clip(r.normal(0, .25 * d, n), -.8, .8)
    smile = p["smile"] + r.normal(0, .03 * d, n)
    mouth_open = np.clip(r.normal(-.2, .5 * d, n), 0, 1)
    brow_up = r.normal(0, 1.2 * d, n)
    eye_open = np.clip(r.normal(1, .15 * d, n), .3, 1.2)
    gaze = r.normal(0, .25 * d, n)
    background = r.uniform(30, 225, (n, 3))
    shirt = r.uniform(20, 235, (n, 3))
    c = _Canvas(background.astype(np.float32))
    skin, hair = p["skin"], p["hair"]
    fw, fh = p["fw"] * (1 - .08 * np.abs(yaw)), p["fh"]
    shift = _col(yaw)  # inner features move sideways with yaw, the nose most

    c.paint(lambda x, y: _ellipse(x, y, 0, fh + 38, 62, 26), shirt, (-64, 64, fh + 10, 80))
    c.paint(lambda x, y: np.clip(fw[:, None, None] * .45 - np.abs(x), 0, 1) * np.clip(y - 10, 0, 1), skin * .82,
            (-fw * .45 - 1, fw * .45 + 1, 9, 80))
    hair_a, hair_b, hair_cy = p["fw"] + p["hair_w"], p["fh"] + p["hair_top"], -p["hair_top"] * .8
    hair_box = (yaw * 2 - hair_a - 2, yaw * 2 + hair_a + 2, hair_cy - hair_b - 2,
                min(hair_cy + hair_b, p["hair_len"]) + 2)
    c.paint(lambda x, y: _ellipse(x, y, shift * 2, hair_cy, hair_a, hair_b)
            * np.clip(p["hair_len"] - y, 0, 1), hair * .8, hair_box)
    for side in (-1, 1):  # the ear on the side the head turns away from gets smaller
        w = 4.5 * p["ear"] * np.clip(1 + side * yaw, .2, 1.5)
        c.paint(lambda x, y: _ellipse(x, y, side * _col(fw) + shift * 1.5, p["ey"] + 5, _col(w), 8 * p["ear"]),
                skin * .9, (side * fw - 10, side * fw + 10, p["ey"] - 6, p["ey"] + 16))

    def face(x, y):
        squeeze = 1 - p["jaw"] * np.clip(y / fh, 0, 1) ** 2  # narrower towards the chin
        return _ellipse(x / squeeze, y, shift * 1.5, 0, _col(fw), fh)
    face_box = (yaw * 1.5 - fw - 3, yaw * 1.5 + fw + 3, -fh - 2, fh + 2)
    c.paint(face, skin, face_box)
    c.paint(lambda x, y: face(x, y) * np.clip(np.abs(x - shift * 6) / _col(fw) - .55, 0, 1) * .5, skin * .7,
            face_box)
    if p["beard"]:
        c.paint(lambda x, y: face(x, y) * np.clip((y - p["ny"] - 3) / 3, 0, 1), hair, face_box, p["beard"])
    if p["style"] == 2:
        c.paint(lambda x, y: face(x, y) * np.clip((-.55 * fh - y) / 4, 0, 1), hair, face_box, .35)

    def front_hair(x, y):
        line = -p["hairline"] * fh + p["curl"] * ((x - p["part"]) / p["fw"]) ** 2
        inside = _ellipse(x, y, shift * 2, hair_cy, hair_a, hair_b)
        sides = np.clip(np.abs(x - shift * 2) - _col(fw) * .85, 0, 1) * np.clip(p["hair_len"] - y, 0, 1)
        return inside * np.maximum(np.clip(line - y, 0, 1), sides * (p["style"] in (1, 3)))
    c.paint(front_hair, hair, hair_box)
    for side in (-1, 1):
        cx = side * p["ex"] + shift * 5
        box = (cx - 12, cx + 12, p["ey"] - 20, p["ey"] + 18)
        c.paint(lambda x, y: _ellipse(x, y, cx, p["ey"] + 10, 6, 4), (220, 90, 90), box, opacity=p["blush"])
        c.paint(lambda x, y: _ellipse(x, y, cx, p["ey"], p["ew"], _col(p["eh"] * eye_open), side * p["tilt"]),
                (245, 245, 240), box)
        iris_x = cx + _col(gaze) * p["ew"] * .4
        sclera = lambda x, y: _ellipse(x, y, cx, p["ey"], p["ew"], _col(p["eh"] * eye_open), side * p["tilt"])
        c.paint(lambda x, y: _ellipse(x, y, iris_x, p["ey"], p["eh"] * .9, p["eh"] * .9) * sclera(x, y),
                p["iris"], box)
        c.paint(lambda x, y: _ellipse(x, y, iris_x, p["ey"], p["eh"] * .4, p["eh"] * .4) * sclera(x, y),
                (10, 10, 10), box)
        brow_y = p["ey"] - p["brow_dy"] - _col(brow_up)
        c.paint(lambda x, y: _ellipse(x, y, cx + side * 1.5, brow_y, p["brow_len"], p["brow_w"],
                                      -side * p["brow_ang"]), hair * .6, box)
        if p["glasses"]:
            c.paint(lambda x, y: np.clip(_ellipse(x, y, cx, p["ey"], p["ew"] + 4, p["eh"] + 5)
                                         - _ellipse(x, y, cx, p["ey"], p["ew"] + 2.5, p["eh"] + 3.5), 0, 1),
                    p["frame"], box)
    nose_x = shift * 7
    nb = (nose_x - 12, nose_x + 12, p["ey"], p["ny"] + 6)
    c.paint(lambda x, y: _ellipse(x, y, nose_x * .8, (p["ey"] + p["ny"]) / 2, p["nw"] * .35,
                                  (p["ny"] - p["ey"]) / 2), skin * .8, nb, opacity=.5)
    c.paint(lambda x, y: _ellipse(x, y, nose_x, p["ny"], p["nw"], p["nw"] * .5), skin * .78, nb, opacity=.6)
    for side in (-1, 1):
        c.paint(lambda x, y: _ellipse(x, y, nose_x + side * p["nw"] * .45, p["ny"] + 1.5, 1.4, 1.0),
                (40, 20, 20), nb, opacity=.8)
    mx = shift * 5
    mb = (mx - p["mw"] - 3, mx + p["mw"] + 3, p["mouth_y"] - 12, p["mouth_y"] + 12)
    bend = lambda x, y: y + _col(smile) * (x - mx) ** 2  # a smile lifts the corners
    c.paint(lambda x, y: _ellipse(x, bend(x, y), mx, p["mouth_y"], p["mw"], p["mh"] + 4 * _col(mouth_open)),
            p["lip"], mb)
    c.paint(lambda x, y: _ellipse(x, bend(x, y), mx, p["mouth_y"], p["mw"] * .75, .4 + 4 * _col(mouth_open)),
            (60, 15, 20), mb)
    for mole_x, mole_y, radius in p["moles"]:
        mxy = (mole_x * p["fw"] * .6 + shift * 3, mole_y * p["fh"] * .6)
        c.paint(lambda x, y: _ellipse(x, y, mxy[0], mxy[1], radius, radius), skin * .45,
                (mxy[0] - 4, mxy[0] + 4, mxy[1] - 4, mxy[1] + 4))
    return c.img


def render(p, n, r, difficulty=DIFFICULTY):
    """n uint8 [n,112,112,3] images of identity p; r is a numpy Generator, difficulty scales nuisances."""
    d = float(difficulty)
    canvas = np.clip(_draw(p, n, r, d), 0, 255).astype(np.uint8)
    canvas = np.pad(canvas, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)), mode="edge")
    angle = np.clip(r.normal(0, .12 * d, n), -.5, .5)
    scale = np.exp(np.clip(r.normal(0, .07 * d, n), -.25, .25))
    shift = np.clip(r.normal(0, 3.0 * d, (n, 2)), -10, 10)
    blur = np.where(r.uniform(size=n) < .3 * d, r.uniform(.3, .6 + .6 * d, n), 0)
    out = np.empty((n, SIZE, SIZE, 3), np.float32)
    for i in range(n):
        # PIL maps each output pixel o to input A @ o + b: rotate/scale about the crop centre.
        cos, sin = np.cos(angle[i]) / scale[i], np.sin(angle[i]) / scale[i]
        centre_in, centre_out = CANVAS / 2 + PAD, SIZE / 2
        bx = centre_in - cos * centre_out + sin * centre_out + shift[i, 0]
        by = centre_in - sin * centre_out - cos * centre_out + shift[i, 1]
        im = Image.fromarray(canvas[i]).transform((SIZE, SIZE), Image.AFFINE, (cos, -sin, bx, sin, cos, by),
                                                  resample=Image.BILINEAR)
        if blur[i] > 0:
            im = im.filter(ImageFilter.GaussianBlur(float(blur[i])))
        out[i] = np.asarray(im, np.float32)
    # Occluder: a flat rectangle (hand, microphone, sticker) on a fraction of the images.
    size = r.uniform(12, 22 + 18 * d, (n, 2))
    corner = np.rint(r.uniform(0, SIZE, (n, 2)) - size / 2).astype(int)
    end = corner + np.rint(size).astype(int)
    colour = r.uniform(0, 255, (n, 3))
    for i in np.flatnonzero(r.uniform(size=n) < min(.9, .3 * d)):
        (x0, y0), (x1, y1) = np.maximum(corner[i], 0), end[i]
        out[i, y0:y1, x0:x1] = colour[i]
    # Lighting: contrast, exposure x directional gradient (side light), colour cast. In place: big arrays.
    contrast = np.exp(r.normal(0, .15 * d, n)).astype(np.float32).reshape(-1, 1, 1, 1)
    gain = np.exp(r.normal(0, .15 * d, n))
    cast = np.exp(r.normal(0, .05 * d, (n, 1, 1, 3))).astype(np.float32)
    theta, strength = r.uniform(0, 2 * np.pi, n), r.uniform(0, .4 * d, n)
    centred = np.arange(SIZE, dtype=np.float32) / SIZE - .5
    ramp = 1 + _col(strength) * (_col(np.cos(theta)) * centred.reshape(1, 1, -1)
                                 + _col(np.sin(theta)) * centred.reshape(1, -1, 1))
    mean = out.mean(axis=(1, 2, 3), keepdims=True)
    out -= mean
    out *= contrast
    out += mean
    out *= (_col(gain) * ramp)[..., None]
    out *= cast
    noise = r.standard_normal((n, SIZE, SIZE, 1), np.float32)  # grey sensor noise: 1/3 of the draws
    noise *= _col(r.uniform(1, 6, n) * d)[..., None]
    out += noise
    np.clip(out, 0, 255, out=out)
    out += .5  # round to nearest on the cast below (values are >= 0)
    return out.astype(np.uint8)
