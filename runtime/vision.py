"""Images in the prompt: the CLIP ViT (torch SDPA) and projector of a LLaVA workspace, the prompt with its image
tokens, and the image features placed at those tokens' rows of a forward.

A prompt with images is token ids plus `PlacedImage`s: image i's `num_tokens` features replace the embeddings of
the tokens at [start, start + num_tokens), which hold the workspace's image_token_id. The engine computes an
image's features once, the first time a forward reaches its tokens (chunked prefill may split them), and keys the
prefix cache of every block those tokens touch by the image's content digest.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmc.errors import LmcError
from lmc.format.vision import VisionConfig, vision_tensors
from lmc.format.workspace import Workspace
from lmc.runtime.image_processing import PreparedImage, prepare_image, unpadded_grid
from lmc.runtime.tokenizer import Tokenizer

MAX_IMAGES = 16  # per prompt


@dataclass(eq=False)
class PlacedImage:
    """An image and where its tokens start in the prompt."""

    start: int
    image: PreparedImage

    @property
    def end(self) -> int:
        return self.start + self.image.num_tokens


_ACTS = {"gelu": F.gelu, "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "silu": F.silu, "relu": F.relu,
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class VisionModel:
    """The vision tower, projector and (LLaVA-NeXT) image newline of a workspace, on the engine's device."""

    def __init__(self, ws: Workspace, device: torch.device, dtype: torch.dtype):
        self.cfg: VisionConfig = ws.vision
        self.device, self.dtype = device, dtype
        self.w = {name: ws.get(name).to(device=device, dtype=dtype) for name in vision_tensors(self.cfg)}

    def tiles(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixel values [N, 3, S, S] -> projected features [N, tile_tokens, H]."""
        c, w = self.cfg, self.w
        x = F.conv2d(pixels.to(self.device, self.dtype), w["vision.patch_embedding.weight"], stride=c.patch_size)  # [N, D, P, P]
        x = x.flatten(2).transpose(1, 2)  # [N, P*P, D]
        cls = w["vision.class_embedding"].expand(x.shape[0], 1, -1)  # [N, 1, D]
        x = torch.cat([cls, x], dim=1) + w["vision.position_embedding"]  # [N, T, D]
        x = F.layer_norm(x, (c.hidden_size,), w["vision.pre_norm.weight"], w["vision.pre_norm.bias"], c.layer_norm_eps)
        act, heads = _ACTS[c.hidden_act], c.num_heads
        for i in range(c.num_layers):
            p = f"vision.layers.{i}."
            h = F.layer_norm(x, (c.hidden_size,), w[p + "norm1.weight"], w[p + "norm1.bias"], c.layer_norm_eps)
            n, t, d = h.shape
            qkv = F.linear(h, w[p + "w_qkv.weight"], w[p + "w_qkv.bias"]).view(n, t, 3, heads, d // heads)  # [N, T, 3, h, d]
            q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [N, heads, T, d]
            o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d)  # [N, T, D]
            x = x + F.linear(o, w[p + "wo.weight"], w[p + "wo.bias"])
            h = F.layer_norm(x, (c.hidden_size,), w[p + "norm2.weight"], w[p + "norm2.bias"], c.layer_norm_eps)
            x = x + F.linear(act(F.linear(h, w[p + "fc1.weight"], w[p + "fc1.bias"])), w[p + "fc2.weight"], w[p + "fc2.bias"])
        if c.select == "default":
            x = x[:, 1:]  # [N, P*P, D]: the CLS feature dropped
        y = F.linear(x, w["projector.linear_1.weight"], w.get("projector.linear_1.bias"))  # [N, T', H]
        if c.projector_layers == 2:
            y = F.linear(_ACTS[c.projector_act](y), w["projector.linear_2.weight"], w.get("projector.linear_2.bias"))
        return y

    def features(self, image: PreparedImage) -> torch.Tensor:
        """An image's features [num_tokens, H], in prompt order (computed once, kept on the image)."""
        if image.features is None:
            tiles = self.tiles(image.pixel_values)  # [tiles, T, H]
            image.features = tiles[0] if self.cfg.kind == "llava" else self._pack(tiles, *image.size)
            assert image.features.shape[0] == image.num_tokens, (image.features.shape, image.num_tokens)
        return image.features

    def _pack(self, tiles: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """LLaVA-NeXT: the base tile's features, then the other tiles' as one unpadded feature map, row by row,
        each row followed by the image newline."""
        c = self.cfg
        p = c.patches_per_side
        rows, cols, top, bottom, left, right = unpadded_grid(c, height, width)
        grid = tiles[1:].view(rows, cols, p, p, -1).permute(4, 0, 2, 1, 3).reshape(-1, rows * p, cols * p)  # [H, rP, cP]
        grid = grid[:, top:bottom, left:right]  # [H, h', w']
        newline = self.w["image_newline"][:, None, None].expand(-1, grid.shape[1], 1)  # [H, h', 1]
        grid = torch.cat([grid, newline], dim=2).flatten(1).t()  # [h' * (w' + 1), H]
        return torch.cat([tiles[0], grid])

    def embed(self, table: torch.Tensor, ids: torch.Tensor, pieces: list[tuple[list[PlacedImage], int, int]]) -> torch.Tensor:
        """Token embeddings [T, H] of a forward's flat batch with image features at their tokens' rows. pieces: per
        sequence, in batch order, (its images, first position computed, tokens computed)."""
        x = table[ids]  # [T, H]
        row = 0
        for images, start, n in pieces:
            for placed in images:
                a, b = max(placed.start, start), min(placed.end, start + n)
                if a < b:
                    feats = self.features(placed.image)
                    x[row + a - start:row + b - start] = feats[a - placed.start:b - placed.start].to(x.dtype)
            row += n
        return x


# ----------------------------------------------------------------------------- prompts


def image_parts(content) -> int:
    """How many image parts a message's content has (a string has none)."""
    if not isinstance(content, list):
        return 0
    return sum(1 for part in content if isinstance(part, dict) and part.get("type") in ("image", "image_url"))


def _flatten(messages: list[dict], image_token: str) -> list[dict]:
    """Messages with content parts as plain strings, each image as `<image>\\n` before the text (LLaVA's own
    prompt format), for chat templates that take string contents only."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            text = " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            content = f"{image_token}\n" * image_parts(content) + text
        out.append({**m, "content": content})
    return out


def _parts(messages: list[dict]) -> list[dict]:
    """Image parts as transformers' processors expect them in a chat template: {"type": "image"}."""
    return [{**m, "content": [{"type": "image"} if isinstance(p, dict) and p.get("type") in ("image", "image_url") else p
                              for p in m["content"]]} if isinstance(m.get("content"), list) else m for m in messages]


def render_with_images(tokenizer: Tokenizer, vc: VisionConfig, messages: list[dict], count: int) -> str:
    """The chat rendered with one image token text per image: the template's own rendering of image parts when it
    has one (as transformers' processors do), else LLaVA's `<image>\\n` before the text."""
    try:
        text = tokenizer.render_chat(_parts(messages))
    except Exception:  # a template that takes string contents only (jinja2 raises TypeError and others on a list)
        text = ""
    if text.count(vc.image_token) != count:
        text = tokenizer.render_chat(_flatten(messages, vc.image_token))
    if text.count(vc.image_token) != count:
        raise LmcError(f"the prompt holds {text.count(vc.image_token)} {vc.image_token} placeholders for {count} "
                       f"images; do not write {vc.image_token} in the text")
    return text


def encode_with_images(tokenizer: Tokenizer, vc: VisionConfig, text: str,
                       images: list[PreparedImage]) -> tuple[list[int], list[PlacedImage]]:
    """Rendered text with one image_token per image -> token ids with num_tokens image tokens per image, and where
    each image sits. Special tokens (BOS) are added unless the text starts with them (transformers' rule)."""
    bos = tokenizer.bos_token
    special = not (bos and text.startswith(bos))
    pieces = text.split(vc.image_token)
    if len(pieces) != len(images) + 1:
        raise LmcError(f"the prompt holds {len(pieces) - 1} {vc.image_token} placeholders for {len(images)} images")
    if tokenizer.token_id(vc.image_token) == vc.image_token_id:  # an image token of the vocabulary: expand it
        expanded = pieces[0] + "".join(vc.image_token * img.num_tokens + piece for img, piece in zip(images, pieces[1:]))
        ids = tokenizer.encode(expanded, add_special_tokens=special)
        placed, i = [], 0
        for img in images:
            while ids[i] != vc.image_token_id:
                i += 1
            placed.append(PlacedImage(i, img))
            i += img.num_tokens
        return ids, placed
    ids, placed = tokenizer.encode(pieces[0], add_special_tokens=special), []  # original LLaVA: splice between pieces
    for img, piece in zip(images, pieces[1:]):
        placed.append(PlacedImage(len(ids), img))
        ids += [vc.image_token_id] * img.num_tokens + tokenizer.encode(piece, add_special_tokens=False)
    return ids, placed


def multimodal_prompt(tokenizer: Tokenizer, vc: VisionConfig | None, messages: list[dict],
                      images: list) -> tuple[list[int], list[PlacedImage]]:
    """Messages whose contents may hold image parts, and the PIL images of those parts in order -> token ids and
    placed images for Engine.add_request."""
    if vc is None:
        raise LmcError("this workspace has no vision tower: convert a LLaVA checkpoint to run images")
    if len(images) > MAX_IMAGES:
        raise LmcError(f"{len(images)} images in one prompt; at most {MAX_IMAGES} are read")
    count = sum(image_parts(m.get("content")) for m in messages)
    if count != len(images):
        raise LmcError(f"the messages have {count} image parts but {len(images)} images were given")
    prepared = [prepare_image(vc, im) for im in images]
    return encode_with_images(tokenizer, vc, render_with_images(tokenizer, vc, messages, count), prepared)


def check_placement(vc: VisionConfig | None, prompt_ids: list[int], images: list[PlacedImage]) -> None:
    """Images of a request: each on a run of image tokens inside the prompt, in order, not overlapping, and not
    holding the prompt's last token (whose logits start the generation)."""
    if not images:
        return
    if vc is None:
        raise LmcError("this workspace has no vision tower: convert a LLaVA checkpoint to run images")
    end = 0
    for placed in images:
        if not isinstance(placed, PlacedImage) or placed.start < end or placed.end >= len(prompt_ids) or \
                any(t != vc.image_token_id for t in prompt_ids[placed.start:placed.end]):
            raise LmcError("an image does not sit on its image tokens in the prompt; build the prompt with "
                           "lmc.runtime.vision.multimodal_prompt")
        end = placed.end
