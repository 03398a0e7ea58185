"""Images in: bounded decoding, and LLaVA's preprocessing (PIL + numpy + torch, no transformers).

The steps and their arithmetic are those of transformers' PIL image processors (CLIP / LLaVA / LLaVA-NeXT):
convert to RGB (transparency composited onto white), optionally pad to a square with the mean color, resize the
shortest edge with PIL, center crop, rescale in float64 then cast to float32, normalize in float32. LLaVA-NeXT
adds any-resolution tiling: the best of the grid pinpoints for the image's size, the image resized into it
(aspect kept) and centered on black, cut into tiles, after a base tile of the whole image squeezed to a square.
"""
from __future__ import annotations

import hashlib
import io
import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from lmc.errors import LmcError
from lmc.format.vision import VisionConfig

MAX_IMAGE_BYTES = 32 * 1024 * 1024  # an encoded image larger than this is refused before decoding
MAX_IMAGE_PIXELS = 40_000_000  # width x height after decoding (PIL's decompression-bomb guard is at 89M)
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "PPM")


def decode_image(data: bytes, what: str = "the image"):
    """Encoded bytes -> an RGB PIL image, bounded in bytes and pixels; anything undecodable is one LmcError."""
    from PIL import Image

    if len(data) > MAX_IMAGE_BYTES:
        raise LmcError(f"{what} is {len(data)} bytes; images up to {MAX_IMAGE_BYTES} bytes are read")
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        check_pixels(image, what)
        image.load()
    except LmcError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as e:
        detail = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))[:120]  # PIL names its buffer
        raise LmcError(f"{what} is not a readable image ({type(e).__name__}: {detail}); "
                       f"lmc reads {', '.join(IMAGE_FORMATS)}") from None
    return to_rgb(image)


def check_pixels(image, what: str = "the image") -> None:
    width, height = image.size
    if width < 1 or height < 1 or width * height > MAX_IMAGE_PIXELS:
        raise LmcError(f"{what} is {width}x{height} pixels; images up to {MAX_IMAGE_PIXELS} pixels are read")


def to_rgb(image):
    """RGB, with any transparency composited onto white (as transformers' convert_to_rgb)."""
    from PIL import Image

    check_pixels(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(eq=False)
class PreparedImage:
    """One image ready for the vision tower."""

    pixel_values: torch.Tensor  # [tiles, 3, S, S] float32
    size: tuple[int, int]  # (height, width) of the RGB image
    num_tokens: int  # image tokens (features) it becomes in the prompt
    digest: bytes  # sha256 of its RGB pixels and size: the prefix cache's key for its tokens
    features: torch.Tensor | None = field(default=None, repr=False)  # [num_tokens, H], computed once when needed


# ----------------------------------------------------------------------------- transformers' PIL steps


def _resize(rgb: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """[h, w, 3] uint8 -> [height, width, 3] uint8 with PIL (a same-size resize is a copy)."""
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).resize((width, height), resample=resample))


def shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the shortest edge `size` and the other scaled (truncated), as transformers."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def _center_crop(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """[h, w, 3] -> [height, width, 3]; an image smaller than the crop is padded with zeros around it."""
    h, w = rgb.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return rgb[top:top + height, left:left + width]
    nh, nw = max(height, h), max(width, w)
    canvas = np.zeros((nh, nw, 3), dtype=rgb.dtype)
    pad_top, pad_left = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    canvas[pad_top:pad_top + h, pad_left:pad_left + w] = rgb
    top, left = top + pad_top, left + pad_left
    return canvas[max(0, top):min(nh, top + height), max(0, left):min(nw, left + width)]


def _pad_to_square(rgb: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    h, w = rgb.shape[:2]
    if h == w:
        return rgb
    side = max(h, w)
    canvas = np.empty((side, side, 3), dtype=rgb.dtype)
    canvas[:] = color
    top, left = (side - h) // 2 if h < side else 0, (side - w) // 2 if w < side else 0
    canvas[top:top + h, left:left + w] = rgb
    return canvas


def _tile(vc: VisionConfig, rgb: np.ndarray) -> np.ndarray:
    """One tile: resize the shortest edge, center crop, rescale, normalize -> [3, S, S] float32."""
    h, w = shortest_edge_size(*rgb.shape[:2], vc.resize_shortest_edge)
    rgb = _center_crop(_resize(rgb, h, w, vc.resample), *vc.crop_size)
    x = (rgb.astype(np.float64) * vc.rescale_factor).astype(np.float32).transpose(2, 0, 1)  # [3, S, S]
    mean, std = np.array(vc.image_mean, dtype=np.float32), np.array(vc.image_std, dtype=np.float32)
    return ((x.T - mean) / std).T


# ----------------------------------------------------------------------------- LLaVA-NeXT any resolution


def best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """The pinpoint that keeps the most of the image's pixels, then wastes the fewest (transformers' rule)."""
    best, most, least_waste = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = h * w - effective
        if effective > most or (effective == most and waste < least_waste):
            best, most, least_waste = (h, w), effective, waste
    return best


def fit_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """The image's size resized into (target_h, target_w), aspect kept."""
    if target_w / width < target_h / height:
        return min(math.ceil(height * target_w / width), target_h), target_w
    return target_h, min(math.ceil(width * target_h / height), target_w)


def unpadded_grid(vc: VisionConfig, height: int, width: int) -> tuple[int, int, int, int, int, int]:
    """LLaVA-NeXT's feature grid for an image: (tile rows, tile cols, top, bottom, left, right), the crop of the
    (rows*P, cols*P) feature map that drops the padding (P: patches per tile side)."""
    bh, bw = best_resolution(height, width, vc.grid_pinpoints)
    rows, cols = bh // vc.image_size, bw // vc.image_size
    cur_h, cur_w = rows * vc.patches_per_side, cols * vc.patches_per_side
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        pad = (cur_h - new_h) // 2
        return rows, cols, pad, cur_h - pad, 0, cur_w
    new_w = int(round(width * (cur_h / height), 7))
    pad = (cur_w - new_w) // 2
    return rows, cols, 0, cur_h, pad, cur_w - pad


def num_image_tokens(vc: VisionConfig, height: int, width: int) -> int:
    if vc.kind == "llava":
        return vc.tile_tokens
    _, _, top, bottom, left, right = unpadded_grid(vc, height, width)
    return vc.tile_tokens + (bottom - top) * (right - left + 1)  # base tile, then each row and its newline


def _anyres_tiles(vc: VisionConfig, rgb: np.ndarray) -> list[np.ndarray]:
    h, w = rgb.shape[:2]
    bh, bw = best_resolution(h, w, vc.grid_pinpoints)
    nh, nw = fit_size(h, w, bh, bw)
    canvas = np.zeros((bh, bw, 3), dtype=np.uint8)
    top, left = (bh - nh) // 2, (bw - nw) // 2
    canvas[top:top + nh, left:left + nw] = _resize(rgb, nh, nw, vc.resample)
    side = vc.crop_size[0]
    tiles = [canvas[i:i + side, j:j + side] for i in range(0, bh, side) for j in range(0, bw, side)]
    base = _resize(rgb, vc.resize_shortest_edge, vc.resize_shortest_edge, vc.resample)
    return [base] + tiles


def prepare_image(vc: VisionConfig, image) -> PreparedImage:
    """A PIL image -> pixel values, token count and content digest for a workspace's vision settings."""
    rgb = np.asarray(to_rgb(image))  # [h, w, 3] uint8
    h, w = rgb.shape[:2]
    digest = hashlib.sha256(np.asarray([h, w], dtype=np.int64).tobytes() + rgb.tobytes()).digest()
    if vc.kind == "llava_next":
        tiles = _anyres_tiles(vc, rgb)
    else:
        color = tuple(int(m * 255) for m in vc.image_mean)
        tiles = [_pad_to_square(rgb, color) if vc.pad_to_square else rgb]
    pixels = torch.from_numpy(np.stack([_tile(vc, t) for t in tiles]))  # [tiles, 3, S, S]
    return PreparedImage(pixels, (h, w), num_image_tokens(vc, h, w), digest)
