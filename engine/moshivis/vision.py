"""MoshiVis's eyes: picture files to pixels, the SigLIP vision tower, and the projection to the LM width.

The tower is SigLIP So400m/14 as PaliGemma2-448 ships it (27 layers, width 1152, 1024 patches at
448 px) and MoshiVis reads its ``last_hidden_state``: the tokens after the post-layernorm, no
pooling head. Module names follow the official checkpoint (``image_prefix.enc.model.*`` there),
which are also the names of transformers' ``SiglipVisionModel``.

Preprocessing is that of Kyutai's PyTorch MoshiVis server: 8-bit RGB, a square bicubic resize
that does not keep the aspect ratio (no crop), then ``(x / 255 − 0.5) / 0.5``. What the official
servers leave undefined is settled here: the EXIF orientation is applied, transparent pixels are
painted over white (how a viewer shows them on a light page; the PyTorch server would keep the
hidden colour, often black), CMYK and 16-bit images become 8-bit RGB, and an animation gives its
first frame.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EngineError
from ..transformer import RMSNorm

if TYPE_CHECKING:
    from PIL import Image

# Decoding cost grows with the pixel count, not the file size: 100 MP is ~300 MB of RGB.
MAX_PIXELS = 100_000_000


class ImageError(EngineError):
    """A picture file that cannot be used: missing, not an image, truncated, or absurdly large."""


@dataclass
class VisionConfig:
    hidden: int = 1152
    num_layers: int = 27
    num_heads: int = 16
    mlp_hidden: int = 4304
    patch: int = 14
    image_size: int = 448  # the side of the square the picture is resized to
    eps: float = 1e-6  # LayerNorm

    @classmethod
    def siglip_so400m_448(cls) -> VisionConfig:
        """The tower of PaliGemma2-3B-pt-448, as in kyutai/moshika-vis-pytorch-bf16."""
        return cls()

    @classmethod
    def tiny(cls) -> VisionConfig:
        return cls(hidden=48, num_layers=2, num_heads=4, mlp_hidden=96, image_size=56)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch) ** 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> VisionConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown vision settings: {', '.join(unknown)}")
        return cls(**values)


# -- the SigLIP tower ------------------------------------------------------------------------


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.hidden, cfg.patch, stride=cfg.patch)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))
        return patches.flatten(2).transpose(1, 2) + self.position_embedding.weight


class SiglipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q_proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.k_proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.v_proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.out_proj = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, N, self.num_heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(B, N, C))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden, cfg.mlp_hidden)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipLayer(cfg) for _ in range(cfg.num_layers))


class SiglipTower(nn.Module):
    """Pixels [B, 3, S, S] in [−1, 1] -> patch tokens [B, (S/patch)², hidden] after the post-layernorm."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        size = self.cfg.image_size
        if pixels.shape[1:] != (3, size, size):
            raise ValueError(f"expected pixels [B, 3, {size}, {size}], got {tuple(pixels.shape)}")
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class ImagePrefix(nn.Module):
    """The picture as the LM attends to it: SigLIP tokens projected to the LM width, then normed by
    the unbiased variance with eps 1e-5, as Kyutai's PyTorch MoshiVis code builds ``norm_xa``."""

    def __init__(self, cfg: VisionConfig, dim: int):
        super().__init__()
        self.tower = SiglipTower(cfg)
        self.proj_xa = nn.Linear(cfg.hidden, dim)
        self.norm_xa = RMSNorm(dim, eps=1e-5, variance=True)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.norm_xa(self.proj_xa(self.tower(pixels)))


# -- picture files to pixels ------------------------------------------------------------------


def open_image(source: str | Path | bytes) -> Image.Image:
    """Decode a picture (a path or the file's bytes) into an upright 8-bit RGB image.

    Every way it can fail is an ImageError naming the file.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    name = "the image" if isinstance(source, bytes) else str(source)
    if not isinstance(source, bytes):
        path = Path(source)
        if path.is_dir():
            raise ImageError(f"{name} is a folder, not a picture")
        try:
            source = path.read_bytes()
        except FileNotFoundError:
            raise ImageError(f"picture not found: {name}") from None
        except OSError as exc:
            raise ImageError(f"cannot read {name}: {exc.strerror or exc}") from None
    too_large = f"{name} is too large: over {MAX_PIXELS // 1_000_000} megapixels"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own, lower limit follows
            image = Image.open(io.BytesIO(source))
        if image.width * image.height > MAX_PIXELS:
            raise ImageError(f"{too_large} ({image.width}×{image.height})")
        image.load()
    except Image.DecompressionBombError:
        raise ImageError(too_large) from None
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not a picture (or not in a format Pillow reads)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{name} is truncated or corrupt: {exc}") from None
    try:
        return _to_rgb(ImageOps.exif_transpose(image))
    except (OSError, ValueError) as exc:
        raise ImageError(f"{name}: cannot convert its {image.mode} pixels to RGB ({exc})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    from PIL import Image

    if image.mode in ("I;16", "I;16L", "I;16B", "I"):
        # Pillow's own conversion clips 16-bit values at 255 instead of scaling them.
        image = Image.fromarray((np.asarray(image).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


def image_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """An RGB picture -> the tower's input [1, 3, size, size] float32 in [−1, 1].

    The resize is torch's antialiased bicubic on the 8-bit pixels, which rounds its result to 8 bits:
    what torchvision's ``Resize`` (v2, on a uint8 tensor on the CPU) runs, so the pixels are those of
    the PyTorch server. Pillow's bicubic resize differs from it by 1 or 2 levels on up to 2.5% of the
    values (measured on noise and smooth pictures from 90×130 to 1000×1500 px).
    """
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]
    resized = F.interpolate(pixels, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    x = resized.float() * (1 / 255)
    return (x - 0.5) / 0.5
