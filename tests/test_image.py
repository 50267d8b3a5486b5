"""Image loading (every mode to RGB, EXIF orientation, errors) and the transforms (crop, pad, normalise)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.processing.image import ImageError, ImageTransform, load_image, to_rgb


def _rgb_at(img: Image.Image, xy=(0, 0)):
    return img.getpixel(xy)


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("L", (128, 128, 128)),
        ("1", (255, 255, 255)),
        ("P", (200, 30, 30)),
        ("CMYK", (200, 30, 30)),
        ("YCbCr", None),
        ("LA", (128, 128, 128)),
    ],
)
def test_modes_become_rgb(mode, expected):
    base = Image.new("RGB", (4, 4), (200, 30, 30))
    if mode in ("L", "LA"):
        img = Image.new(mode, (4, 4), 128 if mode == "L" else (128, 255))
    elif mode == "1":
        img = Image.new("1", (4, 4), 1)
    elif mode == "P":
        img = Image.new("P", (4, 4), 0)
        img.putpalette([200, 30, 30] + [0] * 765)
    else:
        img = base.convert(mode)
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (4, 4)
    if expected is not None:
        assert np.allclose(_rgb_at(out), expected, atol=2)


def test_rgba_transparent_pixels_become_white_not_black():
    img = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    img.putpixel((1, 0), (10, 20, 30, 255))
    out = to_rgb(img)
    assert _rgb_at(out, (0, 0)) == (255, 255, 255)
    assert _rgb_at(out, (1, 0)) == (10, 20, 30)


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 0
    path = tmp_path / "p.png"
    img.save(path, transparency=0)
    out = load_image(path)
    assert _rgb_at(out, (0, 0)) == (255, 255, 255)  # transparent index -> white background
    assert _rgb_at(out, (1, 0)) == (0, 0, 255)


def test_16_bit_greyscale_scaled_by_range(tmp_path):
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(arr).save(path)
    out = load_image(path)
    assert [out.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_exif_orientation_is_applied(tmp_path):
    # 40x20 landscape image with EXIF orientation 6 (rotate 90 CW to display) -> 20x40 portrait
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 255, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif.tobytes(), quality=100)
    out = load_image(path)
    assert out.size == (20, 40)
    # the top-left green block of the stored image ends up at the top-right after the rotation
    r, g, b = out.getpixel((15, 5))
    assert g > 200 and r < 60


def test_missing_and_corrupt_images_name_the_file(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match=str(bad)):
        load_image(bad)


def test_crop_transform_shape_and_normalisation():
    t = ImageTransform(8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "crop")
    x = t(Image.new("RGB", (20, 10), (255, 0, 128)))
    assert x.shape == (3, 8, 8)
    assert torch.allclose(x[:, 0, 0], torch.tensor([2.0, -2.0, (128 / 255 - 0.5) / 0.25]), atol=1e-5)


def test_crop_keeps_the_center():
    img = Image.new("RGB", (30, 10), (0, 0, 0))
    img.paste((255, 255, 255), (10, 0, 20, 10))  # white middle third
    t = ImageTransform(10, (0.0,) * 3, (1.0,) * 3, "crop")
    x = t(img)
    assert torch.allclose(x, torch.ones_like(x))


def test_pad_to_square_uses_mean_colour():
    mean = (0.2, 0.4, 0.6)
    t = ImageTransform(10, mean, (1.0, 1.0, 1.0), "pad")
    img = Image.new("RGB", (10, 4), (255, 255, 255))
    g = t.geometry(img)
    assert g.size == (10, 10)
    assert g.getpixel((5, 0)) == tuple(round(m * 255) for m in mean)  # padded band
    assert g.getpixel((5, 5)) == (255, 255, 255)  # the image stays centred


def test_crop_matches_transformers_clip_image_processor():
    """Parity with CLIPImageProcessor (the processor LLaVA uses): resize shortest edge + center crop."""
    from transformers import CLIPImageProcessor

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    ref = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    expected = torch.tensor(np.asarray(ref(images=img, return_tensors="np")["pixel_values"][0]))
    ours = ImageTransform(32, tuple(ref.image_mean), tuple(ref.image_std), "crop")(img)
    assert ours.shape == expected.shape
    assert torch.allclose(ours, expected, atol=0.02)


def test_bad_aspect_rejected():
    with pytest.raises(ValueError, match="crop"):
        ImageTransform(8, (0.5,) * 3, (0.5,) * 3, "stretch")


def test_augmentations_are_the_symmetries_they_name_and_follow_the_generator():
    from vlmkit.processing.augment import AUGMENTATIONS, Augmenter

    x = torch.arange(3 * 4 * 4, dtype=torch.float32).view(3, 4, 4)
    seen = {"hflip": set(), "vflip": set(), "rot90": set()}
    allowed = {"hflip": [x, x.flip(-1)], "vflip": [x, x.flip(-2)], "rot90": [torch.rot90(x, k, (-2, -1)) for k in range(4)]}
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        for name in seen:
            out = AUGMENTATIONS.get(name)(x, gen)
            match = [k for k, y in enumerate(allowed[name]) if torch.equal(out, y)]
            assert len(match) == 1, name
            seen[name].add(match[0])
    assert seen == {"hflip": {0, 1}, "vflip": {0, 1}, "rot90": {0, 1, 2, 3}}  # every outcome drawn
    a, b = Augmenter(["hflip", "rot90"]), Augmenter(["hflip", "rot90"])
    ga, gb = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert all(torch.equal(a(x, ga), b(x, gb)) for _ in range(10))
    assert not Augmenter([]) and Augmenter([])(x) is x


def test_dataset_augments_each_draw_and_keeps_the_cache_clean(llava_data, build_tiny):
    from vlmkit.config import ConfigError, DataConfig
    from vlmkit.data import ConversationDataset, load_source

    _, processor = build_tiny()
    samples = load_source(DataConfig(source="llava_json", path=str(llava_data))).samples
    plain = ConversationDataset(samples, processor, cache_images=True)[0].pixel_values
    data = ConversationDataset(samples, processor, cache_images=True, augment=["hflip"])
    torch.manual_seed(0)
    draws = [data[0].pixel_values for _ in range(12)]
    assert all(torch.equal(d, plain) or torch.equal(d, plain.flip(-1)) for d in draws)
    assert any(not torch.equal(d, plain) for d in draws) and any(torch.equal(d, plain) for d in draws)
    assert torch.equal(next(iter(data.cache.values())), plain[0])
    with pytest.raises(ConfigError, match="data.augment: 'blur' is not an augmentation; valid: hflip, rot90, vflip"):
        DataConfig(source="easyvqa", augment=["blur"])
