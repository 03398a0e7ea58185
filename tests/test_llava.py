"""LLaVA 1.5 and LLaVA-NeXT: convert (HF and original layouts), preprocessing, vision forward and generation
against transformers, prefix caching keyed by image content, quantize, the front ends (CPU, tiny random models)."""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

IMAGE_TOKEN_ID = 3
TEMPLATE = (  # llava-hf's processor chat template (content parts; images first)
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
PINPOINTS = [[30, 60], [60, 30], [60, 60], [90, 30]]
_CORPUS = ["The quick brown fox jumps over the lazy dog. Describe this image in detail, please.",
           "USER: what is in the picture? ASSISTANT: a cat sitting on a red mat near the window."] * 30


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=380, special_tokens=["<unk>", "<s>", "</s>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tok.token_to_id("<image>") == IMAGE_TOKEN_ID
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   extra_special_tokens={"image_token": "<image>"})


def make_llava(out: Path, kind: str = "llava", seed: int = 0, dtype=torch.float32, layers: int = 3) -> Path:
    """A tiny random LLaVA 1.5 (kind "llava") or LLaVA-NeXT ("llava_next") checkpoint with its processor, saved by
    transformers: CLIP tiles of 30 pixels in patches of 6, a 2-layer Llama of width 64."""
    import transformers as tf

    torch.manual_seed(seed)
    text = tf.LlamaConfig(vocab_size=416, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                          rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                                 image_size=30, patch_size=6, projection_dim=16)
    if kind == "llava":
        cfg = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID)
        model = tf.LlavaForConditionalGeneration(cfg)
        image_processor = tf.LlavaImageProcessorPil(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
        processor = tf.LlavaProcessor(image_processor=image_processor, tokenizer=_tokenizer(), patch_size=6,
                                      vision_feature_select_strategy="default", chat_template=TEMPLATE,
                                      num_additional_image_tokens=1)
    else:
        cfg = tf.LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                                 image_grid_pinpoints=PINPOINTS)
        model = tf.LlavaNextForConditionalGeneration(cfg)
        image_processor = tf.LlavaNextImageProcessorPil(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30},
                                                        image_grid_pinpoints=PINPOINTS)
        processor = tf.LlavaNextProcessor(image_processor=image_processor, tokenizer=_tokenizer(), patch_size=6,
                                          vision_feature_select_strategy="default", chat_template=TEMPLATE,
                                          num_additional_image_tokens=1)
    model = model.to(dtype).eval()
    with torch.no_grad():  # norms away from 1 and a livelier image path, so that a wrong step shows
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_((1 if name.endswith("weight") else 0) + 0.2 * torch.randn_like(p))
            elif "multi_modal_projector" in name or "embeddings" in name:
                p.mul_(4)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def noise_image(w: int = 47, h: int = 33, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
