"""LLaVA 1.5 and LLaVA-NeXT: convert (HF and original layouts), preprocessing, vision forward and generation
against transformers, prefix caching keyed by image content, quantize, the front ends (CPU, tiny random models)."""
from __future__ import annotations

import base64
import contextlib
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


def noise_png(w: int = 47, h: int = 33, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    noise_image(w, h, seed).save(buf, format="PNG")
    return buf.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


SIZES = [(47, 33), (33, 61), (30, 30), (100, 17), (7, 61)]  # odd sizes, non-square both ways, a tile exactly, tiny


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """kind -> (HF checkpoint, its workspace)."""
    from lmc.compiler.convert import convert

    root = tmp_path_factory.mktemp("llava")
    out = {}
    for kind in ("llava", "llava_next"):
        ckpt = make_llava(root / kind, kind)
        convert(ckpt, root / f"ws_{kind}")
        out[kind] = (ckpt, root / f"ws_{kind}")
    return out


@pytest.fixture(scope="module")
def pipes(models) -> dict:
    from lmc.api import pipeline
    from lmc.runtime.config import EngineConfig

    return {kind: pipeline(ws, backend_config=EngineConfig(device="cpu", session_len=1024, cache_block_seq_len=16))
            for kind, (_, ws) in models.items()}


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_pixel_values_equal_transformers_image_processor(models, kind):
    from transformers import AutoProcessor

    from lmc.format.workspace import Workspace
    from lmc.runtime.image_processing import prepare_image

    ckpt, ws = models[kind]
    processor = AutoProcessor.from_pretrained(ckpt)
    vc = Workspace(ws).vision
    for w, h in SIZES:
        image = noise_image(w, h, seed=w * h)
        ref = processor.image_processor(image, return_tensors="pt")["pixel_values"]  # NeXT: [1, tiles (padded), 3, S, S]
        mine = prepare_image(vc, image)
        ref = ref[0, :mine.pixel_values.shape[0]] if ref.dim() == 5 else ref
        assert mine.pixel_values.shape == ref.shape
        torch.testing.assert_close(mine.pixel_values, ref, rtol=0, atol=1e-6)
        text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}])
        ids = processor(images=image, text=text, return_tensors="pt")["input_ids"][0]
        assert int((ids == IMAGE_TOKEN_ID).sum()) == mine.num_tokens  # the token count of transformers' processor


def _transformers_greedy(ckpt: Path, image, prompt: str, max_new_tokens: int) -> tuple[list[int], list[int]]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(ckpt)
    model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    inputs = processor(images=image, text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return inputs["input_ids"][0].tolist(), out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_greedy_text_equals_transformers_generate(models, pipes, kind):
    from lmc.runtime.sampling import GenerationConfig

    ckpt, _ = models[kind]
    pipe = pipes[kind]
    gen = GenerationConfig(max_new_tokens=10, ignore_eos=True)
    outputs = []
    for w, h in [(47, 33), (33, 61)]:
        image = noise_image(w, h, seed=w)
        ref_ids, ref_tokens = _transformers_greedy(ckpt, image, "Describe this image.", 10)
        ids, placed = pipe.encode_with_images(("Describe this image.", image))
        assert ids == ref_ids and placed[0].image.num_tokens == ref_ids.count(IMAGE_TOKEN_ID)
        r = pipe(("Describe this image.", image), gen)
        assert r.token_ids == ref_tokens
        assert r.text == pipe.tokenizer.decode(ref_tokens)
        outputs.append(r.token_ids)
    assert outputs[0] != outputs[1]  # the image decides the text
    batch = pipe([("Describe this image.", noise_image(w, h, seed=w)) for w, h in [(47, 33), (33, 61)]], gen)
    assert [r.token_ids for r in batch] == outputs  # a batch of (text, image) tuples, as LMDeploy spells it


def test_prefix_cache_is_keyed_by_the_image(pipes):
    """Same prompt text and token ids, other image: no cached block with image tokens is reused, and each answer
    is the one the image gets alone; the same image again hits the cache."""
    from lmc.runtime.sampling import GenerationConfig

    pipe = pipes["llava"]
    blocks = pipe.engine.blocks
    gen = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    a, b = noise_image(47, 33, seed=1), noise_image(47, 33, seed=2)

    def forget():  # drop every cached block (all are free between requests)
        blocks.block_of.clear()
        blocks.key_of.clear()
        blocks.free.extend(blocks.evictable)
        blocks.evictable.clear()

    alone = {}
    for name, image in (("a", a), ("b", b)):
        forget()
        alone[name] = pipe(("What is it?", image), gen).token_ids
    assert alone["a"] != alone["b"]
    forget()
    pipe(("What is it?", a), gen)
    hits = blocks.hit_tokens
    assert pipe(("What is it?", a), gen).token_ids == alone["a"]
    ids, placed = pipe.encode_with_images(("What is it?", a))
    assert ids == pipe.encode_with_images(("What is it?", b))[0]  # the same token ids for both images
    assert blocks.hit_tokens - hits == (len(ids) - 1) // blocks.block_size * blocks.block_size  # every full block
    hits = blocks.hit_tokens
    assert pipe(("What is it?", b), gen).token_ids == alone["b"]
    assert blocks.hit_tokens - hits == placed[0].start // blocks.block_size * blocks.block_size  # text blocks before it


def _original_layout(hf_ckpt: Path, out: Path) -> tuple[Path, Path]:
    """The HF-layout checkpoint rewritten as the original LLaVA layout (LlavaLlamaForCausalLM + mm_projector), with
    its CLIP vision tower as a separate CLIPVisionModel folder."""
    import shutil

    from safetensors.torch import load_file, save_file

    state = load_file(hf_ckpt / "model.safetensors")
    hf = json.loads((hf_ckpt / "config.json").read_text())
    text, vision_state = {}, {}
    for name, t in state.items():
        if name.startswith("language_model.model."):
            text["model." + name[len("language_model.model."):]] = t
        elif name == "language_model.lm_head.weight":
            text["lm_head.weight"] = t
        elif name.startswith("multi_modal_projector.linear_"):
            text[f"model.mm_projector.{0 if 'linear_1' in name else 2}.{name.rsplit('.', 1)[1]}"] = t
        elif name == "image_newline":
            text["model.image_newline"] = t
        else:
            vision_state["vision_model." + name.removeprefix("vision_tower.")] = t
    out.mkdir()
    save_file(text, out / "model.safetensors", metadata={"format": "pt"})
    anyres = hf["model_type"] == "llava_next"
    cfg = {**hf["text_config"], "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
           "mm_vision_tower": "openai/clip-vit-tiny", "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
           "mm_vision_select_feature": "patch", "mm_hidden_size": 32, "mm_use_im_start_end": False,
           "image_aspect_ratio": "anyres" if anyres else "square", "torch_dtype": "float32"}
    if anyres:
        cfg |= {"image_grid_pinpoints": [[w, h] for h, w in hf["image_grid_pinpoints"]], "mm_patch_merge_type": "spatial_unpad"}
    (out / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(hf_ckpt / name, out / name)
    tower = out.parent / (out.name + "_clip")
    tower.mkdir()
    save_file(vision_state, tower / "model.safetensors", metadata={"format": "pt"})
    (tower / "config.json").write_text(json.dumps({**hf["vision_config"], "architectures": ["CLIPVisionModel"]}))
    pre = json.loads((hf_ckpt / "processor_config.json").read_text())["image_processor"]
    (tower / "preprocessor_config.json").write_text(json.dumps({**pre, "image_processor_type": "CLIPImageProcessor"}))
    return out, tower


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_original_layout_with_vision_tower_folder_runs_like_the_hf_layout(models, pipes, kind, tmp_path):
    from lmc.api import pipeline
    from lmc.compiler.convert import convert
    from lmc.errors import LmcError
    from lmc.format.workspace import verify_workspace
    from lmc.runtime.config import EngineConfig
    from lmc.runtime.sampling import GenerationConfig

    ckpt, tower = _original_layout(models[kind][0], tmp_path / "orig")
    with pytest.raises(LmcError, match="--vision-tower"):
        convert(ckpt, tmp_path / "ws_missing")
    manifest = convert(ckpt, tmp_path / "ws", vision_tower=tower)
    assert verify_workspace(tmp_path / "ws") == []
    assert set(manifest["provenance"]["vision_tower_files"]) >= {"config.json", "model.safetensors"}
    gen = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    image = noise_image(47, 33, seed=5)
    with pipeline(tmp_path / "ws", backend_config=EngineConfig(device="cpu", session_len=1024)) as pipe:
        assert pipe(("Describe this image.", image), gen).token_ids == pipes[kind](("Describe this image.", image), gen).token_ids


def test_quantized_llava_generates_converts_verifies_vision_fp16(models, tmp_path):
    from lmc.format.workspace import Workspace, verify_workspace
    from lmc.format.vision import vision_tensors

    ckpt, _ = models["llava_next"]
    q = _lmc("quantize", ckpt, "-o", tmp_path / "awq", "--calib-samples", "4", "--calib-seqlen", "32", "--w-group-size",
             "32", "--search-samples", "2", "--device", "cpu")
    assert q.returncode == 0, q.stderr
    c = _lmc("convert", tmp_path / "awq", "-o", tmp_path / "ws")
    assert c.returncode == 0, c.stderr
    assert verify_workspace(tmp_path / "ws") == []
    ws = Workspace(tmp_path / "ws")
    assert ws.quantization["method"] == "awq" and ws.has("layers.0.attention.w_qkv.qweight")
    assert all(ws.get(name).dtype == torch.float16 for name in vision_tensors(ws.vision))
    (tmp_path / "cat.png").write_bytes(noise_png(40, 52, seed=3))
    g = _lmc("generate", tmp_path / "ws", "Describe this image.", "--image", tmp_path / "cat.png", "--device", "cpu",
             "--max-new-tokens", "5", "--min-new-tokens", "5", "--json")
    assert g.returncode == 0, g.stderr
    out = json.loads(g.stdout)
    assert out["generated_tokens"] == 5 and out["input_tokens"] > 100  # the image's tokens are in the prompt
    shown = _lmc("inspect", tmp_path / "ws")
    assert shown.returncode == 0 and "vision        llava_next: CLIP" in shown.stdout, shown.stdout
    assert json.loads(_lmc("inspect", tmp_path / "ws", "--json").stdout)["vision"]["kind"] == "llava_next"
    assert _lmc("convert", tmp_path / "ws", "-o", tmp_path / "tp2", "--tp", "2").returncode == 1  # tp = 1 only


def _lmc(*args, stdin=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "lmc", *map(str, args)], input=stdin, capture_output=True, text=True,
                          timeout=timeout)


def test_cli_generate_image_and_chat_image_command(models, pipes, tmp_path):
    from lmc.runtime.sampling import GenerationConfig

    _, ws = models["llava"]
    png = noise_png(47, 33, seed=9)
    (tmp_path / "a.png").write_bytes(png)
    want = pipes["llava"](("Describe this image.", Image.open(io.BytesIO(png))),
                          GenerationConfig(max_new_tokens=6, min_new_tokens=6)).text
    g = _lmc("generate", ws, "Describe this image.", "--image", tmp_path / "a.png", "--device", "cpu",
             "--max-new-tokens", "6", "--min-new-tokens", "6", "--temperature", "0")
    assert g.returncode == 0, g.stderr
    assert g.stdout.rstrip("\n") == want
    chat = _lmc("chat", ws, "--device", "cpu", "--max-new-tokens", "6", "--min-new-tokens", "6", "--temperature", "0",
                stdin=f"/image {tmp_path / 'a.png'}\nDescribe this image.\n/image {tmp_path / 'nope.png'}\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip() == want.strip()
    assert "attached" in chat.stderr and "nope.png is not a file" in chat.stderr
    bad = _lmc("generate", ws, "hi", "--image", tmp_path / "a.png", "--no-chat-template")
    assert bad.returncode == 2 and "--no-chat-template" in bad.stderr


def test_hostile_images_are_one_line_errors(pipes, tmp_path):
    from lmc.errors import LmcError
    from lmc.vl import load_image

    big = io.BytesIO()
    Image.new("L", (9000, 9000)).save(big, format="PNG")  # 81 Mpixel: a decompression bomb in a small file
    (tmp_path / "big.png").write_bytes(big.getvalue())
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    cases = [(tmp_path / "big.png", "pixels"), (tmp_path / "junk.png", "not a readable image"),
             ("data:image/png;base64,@@@", "base64"), ("data:text/html,<b>", "data URL"),
             ("ftp://example.com/a.png", "http"), (tmp_path / "missing.png", "not a file"), (42, "PIL image")]
    for ref, words in cases:
        with pytest.raises(LmcError, match=words) as e:
            load_image(ref)
        assert "\n" not in str(e.value)
    with pytest.raises(LmcError, match="not accepted"):
        load_image(tmp_path / "junk.png", local_files=False)
    with pytest.raises(LmcError, match="outside the allowed folder"):
        load_image(tmp_path / "junk.png", allowed_dir=tmp_path / "sub")
    assert load_image(data_url(noise_png())).size == (47, 33)
    with pytest.raises(LmcError, match="does not sit on its image tokens"):
        pipes["llava"].engine.add_request([1, 2, 3], images=[object()])
    with pytest.raises(LmcError, match="do not write <image>"):
        pipes["llava"](("look: <image>", noise_image()))


def test_server_takes_image_url_data_parts(models, pipes, tmp_path):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from test_serve import Server

    from lmc.runtime.sampling import GenerationConfig

    _, ws = models["llava_next"]
    png = noise_png(33, 61, seed=4)
    want = pipes["llava_next"](("Describe this image.", Image.open(io.BytesIO(png))),
                               GenerationConfig(max_new_tokens=6, ignore_eos=True)).text
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "a.png").write_bytes(png)
    (tmp_path / "outside.png").write_bytes(png)
    server = Server(ws, tmp_path, "--session-len", "1024", "--allowed-local-media-path", tmp_path / "media")
    try:
        with server.client() as client:
            def ask(url: str):
                return client.post("/v1/chat/completions", json={
                    "model": "ws_llava_next", "max_tokens": 6, "ignore_eos": True, "temperature": 0,
                    "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe this image."}]}]})

            for url in (data_url(png), str(tmp_path / "media" / "a.png")):
                r = ask(url)
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["message"]["content"] == want
            for url, words in ((str(tmp_path / "outside.png"), "outside the allowed folder"),
                               ("data:image/png;base64,AAAA", "not a readable image"),
                               ("http://127.0.0.1:9/a.png", "non-public address")):
                r = ask(url)
                assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
            assert client.get("/health").status_code == 200
    finally:
        assert server.stop() == 0, server.log()


def test_a_template_of_string_contents_gets_llavas_image_prefix(pipes):
    """A chat template that concatenates string contents (it fails on a list of parts) renders the image as
    LLaVA's own `<image>\\n` before the text."""
    pipe = pipes["llava"]
    saved = pipe.tokenizer.chat_template
    pipe.tokenizer.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}A:"
    try:
        ids, placed = pipe.encode_with_images(("hello", noise_image()))
    finally:
        pipe.tokenizer.chat_template = saved
    n = placed[0].image.num_tokens
    assert ids[placed[0].start:placed[0].end] == [IMAGE_TOKEN_ID] * n
    assert ids == pipe.tokenizer.encode("user: " + "<image>" * n + "\nhello\nA:")


def test_two_images_and_chunked_prefill_equal_transformers(models, pipes):
    """Two images in one message, as OpenAI image_url parts (data URLs), prefilled in chunks of 16 tokens that
    cut through both images' tokens: the greedy text equals transformers' for the same images and prompt."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from lmc.api import pipeline
    from lmc.runtime.config import EngineConfig
    from lmc.runtime.sampling import GenerationConfig

    ckpt, ws = models["llava"]
    pngs = [noise_png(47, 33, seed=11), noise_png(20, 44, seed=12)]
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in pngs]
                 + [{"type": "text", "text": "Compare the two images."}]}]
    processor = AutoProcessor.from_pretrained(ckpt)
    model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32).eval()
    hf_messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                {"type": "text", "text": "Compare the two images."}]}]
    inputs = processor(images=[Image.open(io.BytesIO(p)) for p in pngs],
                       text=processor.apply_chat_template(hf_messages, add_generation_prompt=True), return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    gen = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    ids, placed = pipes["llava"].encode_with_images(messages)
    assert ids == inputs["input_ids"][0].tolist() and len(placed) == 2
    assert pipes["llava"](messages, gen).token_ids == ref
    with pipeline(ws, backend_config=EngineConfig(device="cpu", session_len=1024, max_prefill_token_num=16,
                                                  enable_prefix_caching=False)) as chunked:
        assert chunked(messages, gen).token_ids == ref


def test_a_bad_vision_entry_is_refused_with_one_line(models, tmp_path):
    """lmc.json's vision entry is checked where the workspace is opened; text-only workspaces have none."""
    import shutil

    from lmc.errors import WorkspaceError
    from lmc.format.workspace import Workspace

    good = json.loads((models["llava"][1] / "lmc.json").read_text())
    for key, value, words in (("patch_size", 7, "not a multiple of patch_size"), ("image_mean", [0.5], "image_mean"),
                              ("kind", "llava_x", "vision kind"), ("text_hidden_size", 63, "does not fit the model"),
                              ("image_token_id", 10**6, "does not fit the model"), ("extra", 1, "unknown keys")):
        ws = tmp_path / f"ws_{key}"
        shutil.copytree(models["llava"][1], ws)
        (ws / "lmc.json").write_text(json.dumps({**good, "vision": {**good["vision"], key: value}}))
        with pytest.raises(WorkspaceError, match=words) as e:
            Workspace(ws)
        assert "\n" not in str(e.value)


def test_load_image_over_http_is_bounded(tmp_path, monkeypatch):
    """`load_image("http://...")` reads a served PNG; an oversized body, a 404 and a closed port are one
    LmcError line each (nothing read past the byte limit)."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import lmc.vl as vl
    from lmc.errors import LmcError

    png = noise_png(31, 17, seed=5)
    monkeypatch.setattr(vl, "MAX_IMAGE_BYTES", 4096)
    sent = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/drip.png":  # a byte every 0.2 s: the total deadline ends it
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                try:
                    for _ in range(1000):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.2)
                except OSError:
                    pass
                return
            body = {"/cat.png": png, "/big.png": b"\x89PNG" + b"\0" * 100_000}.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except OSError:  # the client stopped reading at its limit
                pass
            sent[self.path] = len(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        image = vl.load_image(base + "/cat.png")
        assert image.size == (31, 17) and image.mode == "RGB"
        with pytest.raises(LmcError, match="over 4096 bytes"):
            vl.load_image(base + "/big.png")
        with pytest.raises(LmcError, match="could not fetch the image"):
            vl.load_image(base + "/missing.png")
        monkeypatch.setattr(vl, "FETCH_TOTAL_S", 1.0)
        start = time.monotonic()
        with pytest.raises(LmcError, match="took more than 1 s to download"):
            vl.load_image(base + "/drip.png")
        assert time.monotonic() - start < 5
    finally:
        server.shutdown()
    with pytest.raises(LmcError, match="could not fetch the image"):
        vl.load_image(base + "/cat.png")  # nothing listens any more


@contextlib.contextmanager
def png_server(png: bytes, redirects: dict[str, str] | None = None):
    """A local HTTP server on 127.0.0.1: every path answers `png`, those in `redirects` a 302 to the URL given;
    yields (port, the paths asked for, in order)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            if self.path in (redirects or {}):
                self.send_response(302)
                self.send_header("Location", redirects[self.path])
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], hits
    finally:
        server.shutdown()


def test_a_host_that_rebinds_to_a_private_address_is_not_reached(monkeypatch):
    """DNS rebinding: a name that resolves to a public address for the check and to this machine for the
    connection. The server's fetch connects to the address it checked (which refuses here), never to the one a
    second lookup gives."""
    import socket

    import lmc.vl as vl
    from lmc.errors import LmcError

    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect
    answers = iter(["93.184.216.34"] + ["127.0.0.1"] * 10)  # public first, this machine after
    with png_server(noise_png(5, 4, seed=2)) as (port, hits):
        def rebinding(host, *args, **kwargs):
            if host != "rebind.example":
                return real_getaddrinfo(host, *args, **kwargs)
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (next(answers), port))]

        def connect(sock, address):
            if address[0] == "93.184.216.34":
                raise ConnectionRefusedError("the test's public address refuses")
            return real_connect(sock, address)

        monkeypatch.setattr(socket, "getaddrinfo", rebinding)
        monkeypatch.setattr(socket.socket, "connect", connect)
        with pytest.raises(LmcError, match="could not fetch the image"):
            vl.load_image(f"http://rebind.example:{port}/cat.png", public_only=True)
        assert hits == []  # the private address was never reached


def test_server_rules_for_image_urls(tmp_path):
    """As the server loads them (public_only): a URL whose host is loopback, private or link-local is refused
    before any connection, and so is a public URL's redirect to one; --allowed-media-domains admits exactly the
    hosts it names (private ones included) and refuses all others."""
    import lmc.vl as vl
    from lmc.errors import LmcError

    with png_server(noise_png(9, 7, seed=6), {"/hop": "http://169.254.169.254/latest/meta-data/"}) as (port, hits):
        for host in ("127.0.0.1", "localhost", "10.1.2.3", "169.254.169.254", "[::1]"):
            with pytest.raises(LmcError, match="non-public address"):
                vl.load_image(f"http://{host}:{port}/cat.png", public_only=True)
        assert hits == []  # refused before connecting
        image = vl.load_image(f"http://127.0.0.1:{port}/cat.png", media_domains=("127.0.0.1",), public_only=True)
        assert image.size == (9, 7)
        with pytest.raises(LmcError, match="not one of --allowed-media-domains"):
            vl.load_image(f"http://localhost:{port}/cat.png", media_domains=("127.0.0.1",), public_only=True)
        with pytest.raises(LmcError, match="not one of --allowed-media-domains"):
            vl.load_image(f"http://127.0.0.1:{port}/hop", media_domains=("127.0.0.1",), public_only=True)
        assert hits == ["/cat.png", "/hop"]  # the redirect's target was never fetched
        assert vl.load_image(f"http://127.0.0.1:{port}/cat.png").size == (9, 7)  # the library's own default

