"""Optional augmentations (random crop, colour jitter, greyscale): each op against a hand computation,
off-by-default leaves batches untouched, and batches are reproducible across loader worker counts."""
import numpy as np
import pytest
from PIL import Image

from of_face.config import ConfigError, load_config
from of_face.data.augment import Augment, color_jitter, grayscale, sample_rng
from of_face.data.folder import FolderDataset
from of_face.data.loader import ShardedLoader

from conftest import REPO


class Textures:
    """Item i: a random (seeded by i) 112x112 RGB texture, label i."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.random.default_rng(i).integers(0, 256, (112, 112, 3), dtype=np.uint8), i


def _collect(loader):
    images, labels = zip(*list(loader))
    return np.concatenate(images), np.concatenate(labels)


ALL_ON = Augment(random_crop=0.3, color_jitter=0.4, grayscale_prob=0.3)


def test_defaults_leave_batches_equal_to_plain_decode_and_normalise(tmp_path):
    cfg = load_config(REPO / "configs/default.yaml")
    assert not Augment.from_config(cfg.Data).active and cfg.Data.resize is False
    for k in range(3):  # a folder-per-identity set of PNGs, decoded independently with PIL below
        (tmp_path / f"id{k}").mkdir()
        for j in range(4):
            Image.fromarray(Textures(100)[10 * k + j][0]).save(tmp_path / f"id{k}" / f"{j}.png")
    ds = FolderDataset(tmp_path)
    images, labels = _collect(ShardedLoader(ds, 4, 0, 1, shuffle=False, flip=False, augment=Augment()))
    expected = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float64) for p in ds.paths])
    np.testing.assert_allclose(images, ((expected / 255 - 0.5) / 0.5).transpose(0, 3, 1, 2), atol=1e-6)
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # with shuffling and flipping on, an all-off Augment changes nothing either
    plain = _collect(ShardedLoader(ds, 4, 0, 1, seed=5))
    with_off = _collect(ShardedLoader(ds, 4, 0, 1, seed=5, augment=Augment.from_config(cfg.Data)))
    for a, b in zip(plain, with_off):
        np.testing.assert_array_equal(a, b)


def test_same_seed_same_batches_for_0_and_2_workers_and_order_unchanged():
    def run(seed, workers, epoch=0, augment=ALL_ON):
        loader = ShardedLoader(Textures(40), 5, 1, 2, seed=seed, num_workers=workers, augment=augment)
        loader.set_epoch(epoch)
        try:
            return _collect(loader)
        finally:
            loader.close()

    images, labels = run(7, 0)
    for other in (run(7, 2), run(7, 0)):
        np.testing.assert_array_equal(other[0], images)
        np.testing.assert_array_equal(other[1], labels)
    # augmentation draws from its own per-sample streams: the order and the flips stay those of no augmentation
    plain_images, plain_labels = run(7, 0, augment=None)
    np.testing.assert_array_equal(plain_labels, labels)
    assert not np.array_equal(plain_images, images)
    # another seed, or the next epoch, augments the same items differently (labels = item ids)
    first = dict(zip(labels.tolist(), images))
    for other_images, other_labels in (run(8, 0), run(7, 0, epoch=1)):
        common = [(first[label], im) for label, im in zip(other_labels.tolist(), other_images) if label in first]
        assert len(common) > 3 and all(not np.array_equal(a, b) for a, b in common)


def test_grayscale_is_itu_r_601_luma_in_all_channels():
    image = Textures(1)[0][0]
    out = Augment(grayscale_prob=1.0)(image, sample_rng(0, 0, 0))
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    rgb = image.astype(np.float64)
    luma = np.floor((0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) + 0.5 + 1e-9)
    np.testing.assert_array_equal(out[..., 0], luma)
    # PIL's own "L" conversion (16-bit fixed point) agrees to within one grey level
    pil = np.asarray(Image.fromarray(image).convert("L"), np.int64)
    assert np.abs(pil - out[..., 0]).max() <= 1
    # with probability 0.5 about half the images turn grey; the others are untouched
    half = Augment(grayscale_prob=0.5)
    grey = 0
    for i in range(200):
        got = half(image, sample_rng(1, 0, i))
        grey += np.array_equal(got, out)
        assert np.array_equal(got, out) or np.array_equal(got, image)
    assert 70 < grey < 130


def test_random_crop_is_a_zoom_of_a_sub_window():
    """R = 2x, G = 2y: bilinear resampling of a linear ramp is the ramp at the sampled position, so the
    output's columns/rows must read off a window of side in [(1-s)112, 112] lying inside the image."""
    x = np.arange(112)
    image = np.zeros((112, 112, 3), np.uint8)
    image[..., 0] = 2 * x[None, :]
    image[..., 1] = 2 * x[:, None]
    s = 0.3
    aug = Augment(random_crop=s)
    shares = []
    for i in range(40):
        (left, top, w, h), _, _ = aug.draw(sample_rng(3, 0, i), image.shape)
        assert w == h and round(112 * (1 - s)) <= w <= 112
        assert 0 <= left <= 112 - w and 0 <= top <= 112 - h
        out = aug(image, sample_rng(3, 0, i))
        assert out.shape == (112, 112, 3) and out.dtype == np.uint8 and not out[..., 2].any()
        # pixel j's centre maps to crop coordinate (j + 0.5) * w / 112 - 0.5, clamped at the borders
        u = np.clip((np.arange(112) + 0.5) * w / 112 - 0.5, 0, w - 1)
        want_r, want_g = 2 * (left + u), 2 * (top + u)
        assert np.abs(out[..., 0].astype(float) - want_r[None, :]).max() <= 0.5 + 1e-6  # rounding only
        assert np.abs(out[..., 1].astype(float) - want_g[:, None]).max() <= 0.5 + 1e-6
        shares.append(w / 112)
    assert min(shares) < 1 - s + 0.05 and max(shares) > 0.95  # the whole range is used


def test_color_jitter_matches_the_textbook_definitions():
    image = Textures(1)[0][0]
    np.testing.assert_array_equal(color_jitter(image, 1.0, 1.0, 1.0), image)
    w = np.array([0.299, 0.587, 0.114])
    for b, c, s in [(1.3, 0.8, 1.2), (0.7, 1.25, 0.6), (1.0, 1.0, 0.0)]:
        x = np.clip(image.astype(np.float64) * b, 0, 255)                    # brightness: scale
        m = (x @ w).mean()
        x = np.clip((x - m) * c + m, 0, 255)                                # contrast: about the mean luma
        g = (x @ w)[..., None]
        want = np.clip((x - g) * s + g, 0, 255)                             # saturation: about the pixel's luma
        got = color_jitter(image, b, c, s).astype(np.float64)
        assert np.abs(got - want).max() <= 0.5 + 1e-3
        assert np.mean(got == np.rint(want)) > 0.999
    # drawn factors lie in [1 - s, 1 + s] and use that range; a flat grey image only changes in brightness
    aug = Augment(color_jitter=0.4)
    factors = np.array([aug.draw(sample_rng(0, 0, i), image.shape)[1] for i in range(300)])
    assert factors.min() >= 0.6 and factors.max() <= 1.4
    assert factors.min(axis=0).max() < 0.65 and factors.max(axis=0).min() > 1.35
    flat = np.full((112, 112, 3), 100, np.uint8)
    for i in range(5):
        brightness = aug.draw(sample_rng(0, 0, i), flat.shape)[1][0]
        assert np.all(np.abs(aug(flat, sample_rng(0, 0, i)).astype(float) - 100 * brightness) <= 0.5 + 1e-3)


def test_switching_one_op_does_not_change_the_others():
    """Every draw is made whatever is on: crop+grey equals grey applied to the crop-only result."""
    image = Textures(2)[1][0]
    for i in range(10):
        crop_only = Augment(random_crop=0.3)(image, sample_rng(0, 0, i))
        both = Augment(random_crop=0.3, grayscale_prob=1.0)(image, sample_rng(0, 0, i))
        np.testing.assert_array_equal(both, grayscale(crop_only))


@pytest.mark.parametrize("override, words", [
    ("Data.random_crop=1.0", ["Data.random_crop", "[0, 1)", "1.0"]),
    ("Data.random_crop=-0.1", ["Data.random_crop", "[0, 1)"]),
    ("Data.color_jitter=1.5", ["Data.color_jitter", "[0, 1]", "1.5"]),
    ("Data.color_jitter=strong", ["Data.color_jitter", "expected float", "strong"]),
    ("Data.grayscale_prob=2", ["Data.grayscale_prob", "[0, 1]"]),
    ("Data.resize=maybe", ["Data.resize", "expected bool", "maybe"]),
    ("Data.dataset=folders", ["Data.dataset", "did you mean 'folder'"]),
    ("Data.colour_jitter=0.1", ["Data.colour_jitter", "did you mean 'Data.color_jitter'"]),
])
def test_new_data_keys_reject_bad_values(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs/default.yaml", [override])
    for w in words:
        assert w in str(e.value)


def test_new_data_keys_parse():
    cfg = load_config(REPO / "configs/default.yaml", ["Data.dataset=folder", "Data.resize=true", "Data.random_crop=0.2",
                                                      "Data.color_jitter=0", "Data.grayscale_prob=0.1"])
    assert cfg.Data.dataset == "folder" and cfg.Data.resize is True
    aug = Augment.from_config(cfg.Data)
    assert (aug.random_crop, aug.color_jitter, aug.grayscale_prob) == (0.2, 0.0, 0.1) and aug.active
