"""The MoshiVis vision side: SigLIP tower against transformers, picture files of every kind to pixels,
the projection, and one-line errors for files that are not usable pictures.

The pictures are written with Pillow at test time: JPEG with an EXIF orientation, palette PNG with
and without transparency, RGBA, LA, CMYK JPEG, grayscale, 16-bit, bilevel, animated GIF, WebP,
very small, very large and very elongated.
"""

import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps

from engine.transformer import RMSNorm
from engine.moshivis.tiny import random_image_prefix_state
from engine.moshivis.vision import ImageError, ImagePrefix, SiglipTower, VisionConfig, image_pixels, open_image

SIZE = 448
RED, BLUE = (255, 0, 0), (0, 0, 255)


def _photo(width, height, seed=0):
    """Smooth gradients, hard edges and noise, so that resampling differences would show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1),
                     127 + 127 * np.sin(x / 7.0 + y / 11.0)], axis=-1)
    base = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(base)
    draw = ImageDraw.Draw(image)
    draw.rectangle([width // 5, height // 4, width // 2, height // 2], fill=(250, 240, 10))
    draw.ellipse([width // 2, height // 2, width - 2, height - 2], fill=(20, 30, 200))
    return image


def _halves(width, height, left, right, mode="RGB"):
    image = Image.new(mode, (width, height), right)
    image.paste(left, (0, 0, width // 2, height))
    return image


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    files = {}

    def save(name, image, **kwargs):
        files[name] = folder / name
        image.save(files[name], **kwargs)

    save("photo_large.jpg", _photo(1600, 1000), quality=90)
    save("tiny.png", _photo(9, 7))
    save("tall.png", _photo(40, 900))
    save("photo.webp", _photo(500, 375))
    # Stored sideways: red on the left. Orientation 6 says "turn 90° clockwise to view", so red is on top.
    exif = Image.Exif()
    exif[0x0112] = 6
    save("exif_rotated.jpg", _halves(320, 200, RED, BLUE), exif=exif, quality=95)
    save("palette.png", _photo(300, 200).quantize(64))
    transparent = _halves(200, 100, BLUE, RED).quantize(4)
    transparent_index = transparent.getpixel((0, 0))  # the blue left half becomes transparent
    save("palette_transparent.png", transparent, transparency=transparent_index)
    rgba = _photo(240, 160).convert("RGBA")
    rgba.paste((0, 0, 0, 0), (0, 0, 120, 160))  # left half fully transparent, hidden colour black
    save("rgba.png", rgba)
    la = Image.merge("LA", (_photo(100, 80).convert("L"), Image.linear_gradient("L").resize((100, 80))))
    save("la.png", la)
    save("cmyk.jpg", _halves(200, 120, (255, 0, 0, 0), (0, 255, 0, 0), mode="CMYK"), quality=95)  # cyan | magenta
    save("gray.jpg", _photo(300, 300).convert("L"))
    gradient16 = (np.linspace(0, 65535, 256)[None, :] * np.ones((64, 1))).astype(np.uint16)
    save("gray16.png", Image.fromarray(gradient16))
    save("bilevel.bmp", _photo(120, 90).convert("1"))
    frames = [Image.new("RGB", (64, 48), RED), Image.new("RGB", (64, 48), BLUE)]
    save("animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=100)
    return files


def _reference_pixels(path, size=SIZE):
    """A plain reading of the official recipe (the PyTorch server: RGB, torchvision's bicubic square
    resize of the uint8 tensor, which is torch's antialiased one, /255, (x − 0.5) / 0.5), plus what
    `moshi see` documents on top: upright, alpha over white, 16-bit scaled to 8. That the resize
    gives torchvision's pixels is checked in test_moshivis_kyuteye.py."""
    image = ImageOps.exif_transpose(Image.open(path))
    if image.mode == "I;16":
        image = Image.fromarray(np.round(np.asarray(image) / 257).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "P") and (image.mode != "P" or "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)
        alpha = rgba[..., 3:] / 255
        rgb = rgba[..., :3] * alpha + 255 * (1 - alpha)
        image = Image.fromarray(np.round(rgb).astype(np.uint8))
    rgb = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None]
    array = F.interpolate(rgb, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return (array[0].double().numpy() / 255 - 0.5) / 0.5


ALPHA_OR_16BIT = {"palette_transparent.png", "rgba.png", "la.png", "gray16.png"}


@pytest.mark.parametrize("name", ["photo_large.jpg", "tiny.png", "tall.png", "photo.webp", "exif_rotated.jpg",
                                  "palette.png", "palette_transparent.png", "rgba.png", "la.png", "cmyk.jpg",
                                  "gray.jpg", "gray16.png", "bilevel.bmp", "animated.gif"])
def test_preprocessing_matches_the_official_recipe(pictures, name):
    pixels = image_pixels(open_image(pictures[name]), SIZE)
    assert pixels.shape == (1, 3, SIZE, SIZE) and pixels.dtype == torch.float32
    expected = _reference_pixels(pictures[name])
    # Compositing and 16-bit scaling may round one level apart.
    tolerance = 1.01 / 127.5 if name in ALPHA_OR_16BIT else 1e-6
    np.testing.assert_allclose(pixels[0].numpy(), expected, rtol=0, atol=tolerance)
    assert pixels.min() >= -1 - 1e-6 and pixels.max() <= 1 + 1e-6


def _mean_rgb(pixels, rows, cols):
    """Mean colour of a region of the tower input, back in 0..255."""
    region = pixels[0, :, rows, cols]
    return ((region.mean(dim=(1, 2)) * 0.5 + 0.5) * 255).tolist()


def test_exif_orientation_is_applied(pictures):
    pixels = image_pixels(open_image(pictures["exif_rotated.jpg"]), SIZE)
    top, bottom = _mean_rgb(pixels, slice(0, 150), slice(None)), _mean_rgb(pixels, slice(300, None), slice(None))
    assert top[0] > 200 and top[2] < 50, f"top should be red: {top}"
    assert bottom[2] > 200 and bottom[0] < 50, f"bottom should be blue: {bottom}"
    assert open_image(pictures["exif_rotated.jpg"]).size == (200, 320)


def test_transparent_pixels_become_white(pictures):
    for name in ("rgba.png", "palette_transparent.png"):
        left = _mean_rgb(image_pixels(open_image(pictures[name]), SIZE), slice(None), slice(0, 200))
        assert all(c > 250 for c in left), f"{name}: the transparent half should be white, got {left}"


def test_cmyk_colours_and_gray_channels(pictures):
    pixels = image_pixels(open_image(pictures["cmyk.jpg"]), SIZE)
    cyan, magenta = _mean_rgb(pixels, slice(None), slice(0, 200)), _mean_rgb(pixels, slice(None), slice(250, None))
    assert cyan[0] < 30 and cyan[1] > 225 and cyan[2] > 225, cyan
    assert magenta[0] > 225 and magenta[1] < 30 and magenta[2] > 225, magenta
    gray = image_pixels(open_image(pictures["gray.jpg"]), SIZE)
    assert torch.equal(gray[0, 0], gray[0, 1]) and torch.equal(gray[0, 1], gray[0, 2])


def test_16_bit_and_animation(pictures):
    ramp = image_pixels(open_image(pictures["gray16.png"]), SIZE)[0, 0].mean(dim=0)
    assert ramp[0] < -0.95 and ramp[-1] > 0.95 and abs(float(ramp[SIZE // 2])) < 0.05, "a full-range ramp, not clipped"
    first_frame = _mean_rgb(image_pixels(open_image(pictures["animated.gif"]), SIZE), slice(None), slice(None))
    assert first_frame[0] > 250 and first_frame[2] < 5


def test_bytes_give_the_same_picture(pictures):
    path = pictures["photo.webp"]
    assert torch.equal(image_pixels(open_image(path.read_bytes()), 64), image_pixels(open_image(path), 64))


def _png_header(width, height):
    """A PNG that declares a size but holds almost no data: what a decompression bomb looks like."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("case, words", [
    ("missing", "not found"),
    ("folder", "folder"),
    ("empty", "not a picture"),
    ("text", "not a picture"),
    ("truncated_jpeg", "truncated or corrupt"),
    ("truncated_png", "truncated or corrupt"),
    ("bomb", "too large"),  # 400 MP: Pillow itself refuses it
    ("huge", "too large"),  # 120 MP: under Pillow's refusal, over our limit
])
def test_unusable_files_give_one_line_errors(pictures, tmp_path, case, words):
    path = tmp_path / f"{case}.img"
    if case == "folder":
        path.mkdir()
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "text":
        path.write_text("this is not a picture\n")
    elif case == "truncated_jpeg":
        data = pictures["photo_large.jpg"].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "truncated_png":
        data = pictures["palette.png"].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "bomb":
        path.write_bytes(_png_header(20000, 20000))
    elif case == "huge":
        path.write_bytes(_png_header(12000, 10000))
    with pytest.raises(ImageError) as err:
        open_image(path)
    message = str(err.value)
    assert words in message and str(path) in message and "\n" not in message, message


# -- the tower ----------------------------------------------------------------------------------


def test_official_tower_config():
    """SigLIP So400m/14 at 448 px as in PaliGemma2-448 (moshivis.md §2)."""
    cfg = VisionConfig.siglip_so400m_448()
    assert (cfg.hidden, cfg.num_layers, cfg.num_heads, cfg.mlp_hidden, cfg.patch, cfg.image_size, cfg.eps) == (
        1152, 27, 16, 4304, 14, 448, 1e-6)
    assert cfg.num_patches == 1024
    with torch.device("meta"):
        tower = SiglipTower(cfg)
    assert tower.embeddings.position_embedding.weight.shape == (1024, 1152)
    per_layer = 4 * (1152 * 1152 + 1152) + 2 * 1152 * 4304 + 4304 + 1152 + 4 * 1152
    expected = 1152 * 3 * 14 * 14 + 1152 + 1024 * 1152 + 27 * per_layer + 2 * 1152
    assert sum(p.numel() for p in tower.parameters()) == expected


def _transformers_tower(cfg):
    transformers = pytest.importorskip("transformers")
    config = transformers.SiglipVisionConfig(
        hidden_size=cfg.hidden, intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, patch_size=cfg.patch, image_size=cfg.image_size,
        layer_norm_eps=cfg.eps, hidden_act="gelu_pytorch_tanh", vision_use_head=False)
    return transformers.SiglipVisionModel(config).eval()


def test_official_config_has_as_many_weights_as_transformers_siglip():
    cfg = VisionConfig.siglip_so400m_448()
    with torch.device("meta"):
        ours, theirs = SiglipTower(cfg), _transformers_tower(cfg)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_tower_matches_transformers(pictures):
    """Same random weights in both, real pictures and noise in: same last_hidden_state within 1e-4.

    Smaller than So400m (3 layers, width 96, 224 px) to stay fast; the code path is the same."""
    cfg = VisionConfig(hidden=96, num_layers=3, num_heads=6, mlp_hidden=192, image_size=224)
    state = {k.removeprefix("tower."): v for k, v in random_image_prefix_state(cfg, dim=64, seed=1).items()
             if k.startswith("tower.")}
    theirs = _transformers_tower(cfg)
    theirs.load_state_dict(state, strict=True)
    ours = SiglipTower(cfg).eval()
    ours.load_state_dict(state, strict=True)
    pixels = torch.cat([image_pixels(open_image(pictures[name]), cfg.image_size)
                        for name in ("photo_large.jpg", "rgba.png")] + [torch.rand(1, 3, 224, 224) * 2 - 1])
    with torch.no_grad():
        expected = theirs(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
        got = ours(pixels)
    assert got.shape == (3, 256, 96)
    assert expected.abs().mean() > 0.3, "a degenerate tower would prove little"
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_projection_and_norm():
    """proj_xa (with bias) then norm_xa, against a float64 reading of the formulas."""
    cfg = VisionConfig.tiny()
    prefix = ImagePrefix(cfg, dim=64).eval()
    prefix.load_state_dict(random_image_prefix_state(cfg, dim=64, seed=2))
    pixels = torch.rand(1, 3, cfg.image_size, cfg.image_size) * 2 - 1
    with torch.no_grad():
        tokens = prefix.tower(pixels).double().numpy()
        got = prefix(pixels).double().numpy()
        weight, bias = prefix.proj_xa.weight.double().numpy(), prefix.proj_xa.bias.double().numpy()
        alpha = prefix.norm_xa.alpha.double().numpy()
    projected = tokens @ weight.T + bias
    # kyuteye's `rms_norm`: the unbiased variance, eps 1e-5
    scale = 1 / np.sqrt(1e-5 + projected.var(axis=-1, ddof=1, keepdims=True))
    np.testing.assert_allclose(got, projected * scale * alpha, rtol=0, atol=1e-5)
    assert got.shape == (1, cfg.num_patches, 64)


def test_rms_norm_variants_differ_on_uncentred_input():
    x = torch.randn(1, 3, 64) + 2.0
    assert not torch.allclose(RMSNorm(64)(x), RMSNorm(64, variance=True)(x), atol=1e-2)
