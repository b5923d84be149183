"""Optional training augmentations beyond the flip: random crop, colour jitter, greyscale.

All are off by default. Every sample draws from its own generator, a child stream of
(seed, epoch) keyed by its dataset index, so a batch is the same whichever process decodes it and
however many loader workers there are. flowvision's ColorJitter / RandomResizedCrop /
RandomGrayscale draw from OneFlow's and numpy's global generators instead, hence these small
numpy/PIL versions. All random numbers are drawn even for ops that are off, so switching one op
on or off does not change what the others do.
"""
import numpy as np
from PIL import Image


def sample_rng(seed, epoch, index):
    """The generator of dataset item `index` in `epoch` (independent of the epoch's order/flip stream)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)], spawn_key=(int(index),)))


def luma(rgb):
    """ITU-R 601 luma 0.299 R + 0.587 G + 0.114 B of a float HxWx3 array."""
    return rgb[..., 0] * np.float32(0.299) + rgb[..., 1] * np.float32(0.587) + rgb[..., 2] * np.float32(0.114)


def grayscale(image):
    """uint8 HxWx3 -> its ITU-R 601 luma, rounded half up (integer arithmetic), in all three channels."""
    rgb = image.astype(np.int32)
    gray = (299 * rgb[..., 0] + 587 * rgb[..., 1] + 114 * rgb[..., 2] + 500) // 1000
    return np.repeat(gray[..., None], 3, axis=2).astype(np.uint8)


def crop_resize(image, box):
    """Cut `box` = (left, top, width, height) out of `image` and resize it back to full size (PIL bilinear)."""
    h, w = image.shape[:2]
    left, top, cw, ch = box
    crop = Image.fromarray(np.ascontiguousarray(image)).crop((left, top, left + cw, top + ch))
    return np.asarray(crop.resize((w, h), Image.BILINEAR))


def color_jitter(image, brightness, contrast, saturation):
    """Scale brightness, contrast (about the mean luma) and saturation (about each pixel's luma) by the
    given factors, in that order, clipping to [0, 255] after each as torchvision does; round once."""
    x = np.clip(image.astype(np.float32) * np.float32(brightness), 0, 255)
    mean = np.float32(luma(x).mean())
    x = np.clip((x - mean) * np.float32(contrast) + mean, 0, 255)
    gray = luma(x)[..., None]
    x = np.clip((x - gray) * np.float32(saturation) + gray, 0, 255)
    return np.rint(x).astype(np.uint8)


class Augment:
    """`augment(image, rng)`: crop -> colour jitter -> greyscale on a uint8 HxWx3 image (after the flip).

    ``random_crop`` s: a crop whose sides are a share f ~ U[1 - s, 1] of the image's, at a uniform
    position, resized back. ``color_jitter`` s: brightness/contrast/saturation factors ~ U[1 - s, 1 + s].
    ``grayscale_prob`` p: with probability p the image becomes its luma in all three channels.
    """

    def __init__(self, random_crop=0.0, color_jitter=0.0, grayscale_prob=0.0):
        self.random_crop = float(random_crop)
        self.color_jitter = float(color_jitter)
        self.grayscale_prob = float(grayscale_prob)

    @classmethod
    def from_config(cls, data):
        return cls(data.random_crop, data.color_jitter, data.grayscale_prob)

    @property
    def active(self):
        return bool(self.random_crop or self.color_jitter or self.grayscale_prob)

    def draw(self, rng, shape):
        """This sample's parameters: crop box (left, top, width, height), jitter factors, greyscale coin."""
        u = rng.random(7)  # always 7 draws, whatever is switched on
        h, w = shape[:2]
        share = 1.0 - self.random_crop * u[0]
        ch, cw = max(1, round(h * share)), max(1, round(w * share))
        box = (int(u[2] * (w - cw + 1)), int(u[1] * (h - ch + 1)), cw, ch)
        factors = tuple(float(f) for f in 1.0 + self.color_jitter * (2.0 * u[3:6] - 1.0))
        return box, factors, bool(u[6] < self.grayscale_prob)

    def __call__(self, image, rng):
        box, factors, gray = self.draw(rng, image.shape)
        if self.random_crop:
            image = crop_resize(image, box)
        if self.color_jitter:
            image = color_jitter(image, *factors)
        if gray:
            image = grayscale(image)
        return image

    def __repr__(self):
        return (f"Augment(random_crop={self.random_crop}, color_jitter={self.color_jitter}, "
                f"grayscale_prob={self.grayscale_prob})")
