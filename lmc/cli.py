"""The `lmc` command line. Exit codes: 0 ok, 1 bad input or failed check, 2 usage."""
from __future__ import annotations

import functools
import json
import math
import os
import sys
from pathlib import Path

import click

from lmc.errors import LmcError
from lmc.runtime.config import MAX_THREADS


def user_errors(fn):
    """Print an LmcError as one line on stderr and exit 1 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LmcError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except (KeyboardInterrupt, BrokenPipeError) as e:
            if isinstance(e, BrokenPipeError):  # stdout closed (e.g. `| head`): flushing it again would fail at exit
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


class FiniteFloat(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (they pass its bounds: every comparison with nan is false), as a
    usage error (exit 2) before anything loads."""

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number", param, ctx)
        return value


@click.group()
@click.version_option(package_name="lmc")
def main():
    """lmc: convert, quantize and run LLMs offline."""


@main.command()
@click.argument("src")
@click.option("-o", "--output", "out", required=True, help="workspace folder to write")
@click.option("--model-format", type=click.Choice(["hf", "awq", "gptq", "compressed-tensors", "gguf"]), default=None,
              help="source format (default: detect; a .gguf file is gguf, a quantization_config names awq, gptq or "
                   "compressed-tensors)")
@click.option("--dtype", type=click.Choice(["auto", "float16", "bfloat16", "float32"]), default="auto",
              help="float dtype of the workspace (auto: the source's)")
@click.option("--tp", type=int, default=None,
              help="tensor-parallel ranks to split weights for (default: 1; a workspace SRC keeps its own)")
@click.option("--force", is_flag=True, help="replace an existing lmc output (never a file or a folder of other files)")
@click.option("--allow-nonfinite", is_flag=True, help="keep NaN/Inf weights (with a warning) instead of refusing them")
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary instead of a line; no progress bar")
@click.option("--vision-tower", type=click.Path(exists=True, file_okay=False), default=None,
              help="an original-layout LLaVA checkpoint's CLIP vision tower folder (its config names it by hub id)")
@user_errors
def convert(src, out, model_format, dtype, tp, force, allow_nonfinite, as_json, vision_tower):
    """Convert an HF (float, AWQ, GPTQ, compressed-tensors) or GGUF checkpoint SRC (or copy a workspace SRC) into a workspace."""
    import time

    from lmc.compiler.source_files import early_source_files
    from lmc.format.hashing import BackgroundHashes
    from lmc.format.manifest import DIGEST

    if tp is not None and tp < 1:
        raise click.BadParameter("--tp must be >= 1")
    start = time.perf_counter()
    files = early_source_files(src)
    early = BackgroundHashes(files, DIGEST) if files else None  # the source is read and hashed while torch loads
    from lmc.compiler.passthrough import convert_passthrough

    options = dict(dtype=dtype, tp=tp, force=force, progress=False if as_json else None, allow_nonfinite=allow_nonfinite,
                   say=lambda m: click.echo(m, err=True), hashes=early, model_format=model_format, vision_tower=vision_tower)
    manifest = convert_passthrough(src, out, **options)  # a float safetensors checkpoint kept as it is: no torch
    if manifest is None:
        from lmc.compiler.convert import convert as run_convert

        manifest = run_convert(src, out, **options)
    size = sum(f["size"] for f in manifest["files"].values())
    if as_json:
        click.echo(json.dumps({"output": str(out), "tensors": len(manifest["tensors"]), "bytes": size,
                               "seconds": round(time.perf_counter() - start, 2)}, sort_keys=True))
    else:
        click.echo(f"wrote {out}: {len(manifest['tensors'])} tensors, {size / 1e6:.1f} MB")


def _summary(ws) -> dict:
    cfg = ws.config
    n_params = sum(1 for _ in ws.tensor_names())
    size = sum(f["size"] for f in ws.manifest["files"].values())
    return {"path": str(ws.path), "format_version": ws.meta["format_version"], "architecture": cfg.architecture,
            "dtype": ws.meta["dtype"], "quantization": ws.quantization, "tp": ws.tp, "tensors": n_params,
            "bytes": size, "model": cfg.to_dict(), "vision": ws.meta.get("vision"),
            "provenance": ws.manifest.get("provenance", {})}


@main.command()
@click.argument("workspace")
@click.option("--json", "as_json", is_flag=True, help="print machine-readable JSON")
@user_errors
def inspect(workspace, as_json):
    """Show a workspace's architecture, sizes, dtype, quantization, tp and provenance."""
    from lmc.format.workspace import Workspace

    info = _summary(Workspace(workspace))
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    m, q = info["model"], info["quantization"]
    click.echo(f"workspace     {info['path']} (format v{info['format_version']})")
    click.echo(f"architecture  {m['architecture']}: {m['num_layers']} layers, hidden {m['hidden_size']}, "
               f"heads {m['num_heads']}/{m['num_kv_heads']} x {m['head_dim']}, ffn {m['intermediate_size']}, vocab {m['vocab_size']}")
    v = info["vision"]
    if v:
        click.echo(f"vision        {v['kind']}: CLIP {v['num_layers']} layers, hidden {v['hidden_size']}, "
                   f"{v['image_size']} px tiles of {v['patch_size']} px patches, projector {v['projector_layers']} "
                   f"layer(s), image token {v['image_token']!r} (id {v['image_token_id']})")
    click.echo(f"dtype         {info['dtype']}")
    click.echo("quantization  " + ("none" if not q else f"{q['method']} int{q['bits']} group {q['group_size']} ({q['layout']})"
                                  + (f", act-order {', '.join(q['act_order'])}" if q.get("act_order") else "")))
    click.echo(f"tp            {info['tp']}")
    click.echo(f"size          {info['bytes'] / 1e6:.1f} MB in {info['tensors']} tensors")
    prov = info["provenance"]
    click.echo(f"built by      lmc {prov.get('lmc_version')}: {prov.get('command')}")
    sources = prov.get("source_files")  # informational: the reader checks only that provenance is an object
    for name, rec in sources.items() if isinstance(sources, dict) else ():
        if isinstance(rec, dict):  # sha256 in version 1 and in a workspace re-split from one, else blake3
            digest = next((k for k in rec if k != "size"), "digest")
            click.echo(f"source        {name} {digest} {str(rec.get(digest))[:16]}…")
    if isinstance(prov.get("calibration"), dict):
        c = prov["calibration"]
        click.echo(f"calibration   {c.get('dataset')} ({c.get('source')}), {c.get('samples')} x {c.get('seqlen')}, "
                   f"seed {c.get('seed')}, windows sha256 {str(c.get('windows_sha256'))[:16]}…")


@main.command()
@click.argument("workspace")
@user_errors
def verify(workspace):
    """Check every checksum, tensor entry and the format version. Exit 1 on the first problem."""
    from lmc.format.manifest import verify_workspace  # no torch: verify takes the time of hashing the files

    problems = verify_workspace(workspace)
    if problems:
        click.echo(f"FAILED {workspace}: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""), err=True)
        sys.exit(1)
    click.echo(f"OK {workspace}")


@main.command()
@click.argument("src")
@click.option("-o", "--output", "--work-dir", "out", required=True, help="output folder (--work-dir as in lmdeploy lite auto_awq)")
@click.option("--w-bits", type=int, default=4, show_default=True)
@click.option("--w-group-size", type=int, default=128, show_default=True,
              help="32, 64 or 128. The HF AWQ output (AutoAWQ's GEMM layout) needs every linear's K (input features) "
                   "to be a multiple of it and N of 8; where one is not (SmolLM2's hidden 576 with 128), an lmc "
                   "workspace is written instead and stderr says which linear")
@click.option("--calib-dataset", default="ptb", show_default=True, help="ptb, wikitext2, c4, pileval or a .txt/.jsonl/.parquet path")
@click.option("--calib-samples", type=click.IntRange(min=0), default=128, show_default=True,
              help="0: plain round-to-nearest")
@click.option("--calib-seqlen", type=click.IntRange(min=2), default=1024, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True, help="windows per forward pass")
@click.option("--search-scale/--no-search-scale", default=True, show_default=True,
              help="AWQ scale + clip search; --no-search-scale: LMDeploy's fixed 0.5 smoothing, no clip")
@click.option("--search-samples", type=click.IntRange(min=1), default=None, help="windows used for the search losses (default: 32 on GPU, 8 on CPU)")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None, help="default: cuda when available")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float16", "bfloat16"]), default="auto", show_default=True)
@click.option("--calib-dtype", type=click.Choice(["auto", "stored", "float32", "bfloat16"]), default="auto",
              show_default=True, help="what calibration computes in (bfloat16: float32 weights, bf16 autocast "
              "matmuls); auto: the stored dtype on a GPU, bfloat16 on a CPU with bf16 instructions (avx512_bf16 / "
              "AMX), else float32")
@click.option("--format", "format", type=click.Choice(["awq", "compressed-tensors"]), default="awq", show_default=True,
              help="HF int4 checkpoint to write: AutoAWQ GEMM or compressed-tensors pack-quantized (llm-compressor's W4A16)")
@click.option("--method", type=click.Choice(["auto", "awq", "awq-gptq", "awq-autoround"]), default="auto",
              show_default=True,
              help="awq: scale and clip search, min-max rounding; awq-gptq: the scale search, then GPTQ error feedback; "
                   "awq-autoround: the scale search, then rounding and clipping tuned per layer (CPU); auto: "
                   "awq-autoround on the CPU, awq on a GPU")
@click.option("--workspace", is_flag=True,
              help="write an lmc workspace instead of an HF checkpoint (also the fallback when the HF int4 layouts "
                   "cannot hold a linear: K not a multiple of --w-group-size, or N not of 8)")
@click.option("--allow-nonfinite", is_flag=True, help="keep NaN/Inf weights (with a warning) instead of refusing them")
@click.option("--force", is_flag=True, help="replace an existing lmc output (never a file or a folder of other files)")
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary (timings, memory, per-layer losses)")
@user_errors
def quantize(src, out, force, as_json, **kw):
    """AWQ W4A16: calibrate on text, search scales and clipping, pack int4 (HF folder or GGUF SRC)."""
    if kw["w_bits"] != 4:  # out-of-range values are usage errors (exit 2) before anything loads, as IntRange's are
        raise click.BadParameter(f"{kw['w_bits']}: only 4-bit weights are supported", param_hint="'--w-bits'")
    from lmc.format.int4_layout import GROUP_SIZES  # torch-free

    if kw["w_group_size"] not in GROUP_SIZES:
        raise click.BadParameter(f"{kw['w_group_size']}: choose one of {', '.join(map(str, GROUP_SIZES))}",
                                 param_hint="'--w-group-size'")
    from lmc.compiler.quantize import QuantizeOptions, command_line, quantize as run_quantize, resolve_options, summary_json

    opts = QuantizeOptions(**kw)
    if opts.workspace and opts.format != "awq":
        raise click.UsageError(f"--workspace writes an lmc workspace; drop --format {opts.format} or --workspace")
    opts = resolve_options(opts)
    say = (lambda m: click.echo(m, err=True)) if as_json else click.echo
    summary = run_quantize(src, out, opts, force=force, progress=False if as_json else None, command=command_line(opts), say=say,
                           warn=lambda m: click.echo(m, err=True))
    if as_json:
        click.echo(summary_json(summary))
    else:
        click.echo(f"wrote {out} ({summary['format']}, {summary['method']}) in {summary['seconds']['total']:.1f} s")


def _engine_flags(max_batch_size: int | None = 64) -> list:
    return [
        click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None, help="default: cuda when available"),
        click.option("--session-len", type=click.IntRange(min=2), default=None, help="max tokens per session (default: the model's)"),
        click.option("--cache-max-entry-count", type=FiniteFloat(0, 1, min_open=True), default=0.8, show_default=True,
                     help="fraction of free device memory for the KV cache"),
        click.option("--cache-block-seq-len", type=click.IntRange(min=1), default=64, show_default=True, help="tokens per KV block"),
        click.option("--max-batch-size", type=click.IntRange(min=1), default=max_batch_size, show_default=True,
                     help="sequences running at once"),
        click.option("--max-prefill-token-num", type=click.IntRange(min=1), default=8192, show_default=True,
                     help="tokens computed per step; longer prompts are prefilled in chunks"),
        click.option("--enable-prefix-caching/--disable-prefix-caching", default=True, show_default=True,
                     help="share the KV blocks of common prompt prefixes between requests"),
        click.option("--quant-policy", type=click.Choice(["0", "4", "8"]), default="0", show_default=True,
                     help="KV cache quantization: 0 none, 8 int8, 4 int4"),
        click.option("--lm-head", type=click.Choice(["float", "int4"]), default="float", show_default=True,
                     help="int4: quantize the float lm_head at load (RTN, groups of 128 or the workspace's)"),
        click.option("--threads", type=click.IntRange(min=1, max=MAX_THREADS), default=None,
                     help="CPU threads (default: lmc picks; see docs/cli.md)"),
        click.option("--tp", type=click.IntRange(min=1), default=None,
                     help="tensor-parallel ranks, one GPU each; must match the workspace's split (default: the workspace's)"),
    ]


SAMPLING_FLAGS = [
    click.option("--max-new-tokens", type=click.IntRange(min=1), default=512, show_default=True),
    click.option("--min-new-tokens", type=click.IntRange(min=0), default=None, help="no EOS before this many tokens"),
    click.option("--temperature", type=FiniteFloat(min=0), default=0.8, show_default=True, help="0: greedy"),
    click.option("--top-p", type=FiniteFloat(0, 1, min_open=True), default=0.8, show_default=True),
    click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True, help="0: no limit"),
    click.option("--repetition-penalty", type=FiniteFloat(min=0, min_open=True), default=1.0, show_default=True),
    click.option("--stop-words", multiple=True, help="stop when the text contains this (repeatable)"),
    click.option("--seed", type=int, default=None, help="sampling seed (reproducible output)"),
]


def _with_options(options, fn):
    for option in reversed(options):
        fn = option(fn)
    return fn


def engine_options(fn):
    """EngineConfig and sampling flags, spelled as `lmdeploy chat` spells them. Out-of-range values are usage
    errors (exit 2)."""
    return _with_options(_engine_flags() + SAMPLING_FLAGS, fn)


def engine_flags_only(fn):
    """The EngineConfig flags alone (for `lmc serve`: sampling settings come with each request)."""
    return _with_options(_engine_flags(), fn)


def _engine_flags_for_bench(fn):
    return _with_options(_engine_flags(max_batch_size=None), fn)


WARMUP_FLAG = click.option("--warmup/--no-warmup", default=True, show_default=True,
                           help="on a GPU, compile the kernels and capture the decode graphs before the first request")


def _warm_up(engine, warmup: bool, quiet: bool) -> dict | None:
    """Engine.warmup on a GPU engine when asked (a CPU has nothing to compile); one line on stderr unless quiet."""
    if not warmup or engine.device.type != "cuda":
        return None
    report = engine.warmup(progress=not quiet and sys.stderr.isatty())
    if not quiet:
        click.echo(f"warmed up in {report['seconds']:.1f} s ({report['forwards']} forwards, "
                   f"{report['graphs']} CUDA graphs)", err=True)
    return report


def _engine_config(kw: dict):
    from lmc.runtime.config import EngineConfig

    return EngineConfig(session_len=kw["session_len"], max_batch_size=kw["max_batch_size"],
                        cache_max_entry_count=kw["cache_max_entry_count"], cache_block_seq_len=kw["cache_block_seq_len"],
                        max_prefill_token_num=kw["max_prefill_token_num"],
                        enable_prefix_caching=kw["enable_prefix_caching"], quant_policy=int(kw["quant_policy"]),
                        lm_head=kw["lm_head"],
                        device=kw["device"], threads=kw["threads"], tp=kw["tp"])


def _configs(kw: dict):
    """EngineConfig and GenerationConfig from the flags. As `lmdeploy chat`, the CLI samples unless
    --temperature 0 (the Python GenerationConfig is greedy unless do_sample, as LMDeploy's)."""
    from lmc.runtime.sampling import GenerationConfig

    gen = GenerationConfig(max_new_tokens=kw["max_new_tokens"], min_new_tokens=kw["min_new_tokens"],
                           do_sample=kw["temperature"] > 0, temperature=kw["temperature"], top_p=kw["top_p"],
                           top_k=kw["top_k"], repetition_penalty=kw["repetition_penalty"],
                           stop_words=list(kw["stop_words"]), random_seed=kw["seed"])
    return _engine_config(kw), gen


def _echo_stream(pieces) -> str:
    """Print text pieces as they come; returns the whole text. A stream that fails after some text still ends
    its line, so that the error line starts on its own on a terminal."""
    out = []
    try:
        for piece in pieces:
            out.append(piece)
            click.echo(piece, nl=False)
    except BaseException:
        if out:
            click.echo()
        raise
    click.echo()
    return "".join(out)


@main.command()
@click.argument("path")
@click.argument("prompt")
@click.option("--no-chat-template", is_flag=True, help="feed PROMPT as raw text (completion), not as a user turn")
@click.option("--json", "as_json", is_flag=True, help="print a JSON object (text, token ids, finish reason, timings)")
@click.option("--image", "images", multiple=True, metavar="PATH",
              help="an image for a vision-language workspace (LLaVA), placed before PROMPT; repeat for more")
@engine_options
@user_errors
def generate(path, prompt, no_chat_template, as_json, images, **kw):
    """Generate a reply to PROMPT with the model at PATH (workspace, HF folder or GGUF file)."""
    import time

    from lmc.api import pipeline

    if images and no_chat_template:
        raise click.UsageError("--image goes through the chat template; drop --no-chat-template")
    prompt = (prompt, list(images)) if images else prompt
    engine_cfg, gen = _configs(kw)
    with pipeline(path, backend_config=engine_cfg) as pipe:
        start = time.perf_counter()
        if as_json:
            r = pipe(prompt, gen, chat_template=not no_chat_template)
            seconds = time.perf_counter() - start
            click.echo(json.dumps({"text": r.text, "token_ids": r.token_ids, "finish_reason": r.finish_reason,
                                   "input_tokens": r.input_token_len, "generated_tokens": r.generate_token_len,
                                   "seconds": round(seconds, 3)}, ensure_ascii=False))
            return
        _echo_stream(item.text for item in pipe.stream_infer(prompt, gen, chat_template=not no_chat_template))


def _drop_oldest_turn(history: list[dict]) -> list[dict]:
    """The history without its oldest turn (a user message and its reply)."""
    return history[2 if len(history) > 2 and history[0]["role"] == "user" else 1:]


def _fit_history(pipe, system: list[dict], history: list[dict], room: int) -> list[dict]:
    """Drop the oldest turns (never the system prompt) until the rendered conversation leaves `room`
    tokens of the session."""
    limit = pipe.engine.session_len - room
    before = len(history)
    while len(history) > 1 and len(pipe.encode(system + history)) > limit:
        history = _drop_oldest_turn(history)
    if len(history) < before:
        click.echo(f"(dropped the {before - len(history)} oldest messages: the conversation passed session_len "
                   f"{pipe.engine.session_len} less {room} tokens for the reply)", err=True)
    return history


def _local_turn(path: str, system: list[dict], template: str | None, kw: dict):
    """The REPL's turn on a model loaded here."""
    from lmc.api import pipeline

    engine_cfg, gen = _configs(kw)
    pipe = pipeline(path, backend_config=engine_cfg)
    if template is not None:
        pipe.tokenizer.chat_template = template
    pipe.tokenizer.on_missing_template = lambda note: click.echo(f"warning: {note}", err=True)
    room = min(gen.max_new_tokens, pipe.engine.session_len // 2)

    def turn(history: list[dict]) -> list[dict]:
        try:
            history = _fit_history(pipe, system, history, room)
            prompt_len = len(pipe.encode(system + history))
        except LmcError as e:  # e.g. a line that was not UTF-8: say so, drop it, take the next
            click.echo(f"error: {e}", err=True)
            return history[:-1]
        if prompt_len >= pipe.engine.session_len:
            click.echo(f"error: this message alone passes session_len {pipe.engine.session_len}; shorten it", err=True)
            return history[:-1]
        reply = _echo_stream(item.text for item in pipe.stream_infer(system + history, gen))
        return history + [{"role": "assistant", "content": reply}]

    return turn


def _remote_turn(url: str, api_key: str | None, system: list[dict], template: str | None, kw: dict):
    """The REPL's turn through a server's chat completions API, streaming; the oldest turns are dropped
    while the server answers that the conversation passes its session_len."""
    from lmc.client import ApiError, Client

    client = Client(url, api_key)
    card = client.models()[0]
    if template is None and card.get("has_chat_template") is False:
        from lmc.runtime.tokenizer import NO_TEMPLATE_NOTE

        click.echo(f"warning: {NO_TEMPLATE_NOTE}", err=True)
    params = {"model": card["id"], "max_tokens": kw["max_new_tokens"], "min_tokens": kw["min_new_tokens"],
              "temperature": kw["temperature"], "top_p": kw["top_p"], "top_k": kw["top_k"],
              "repetition_penalty": kw["repetition_penalty"], "stop": list(kw["stop_words"]) or None,
              "seed": kw["seed"], "chat_template": template}
    params = {k: v for k, v in params.items() if v is not None}

    def turn(history: list[dict]) -> list[dict]:
        before = len(history)
        while True:
            try:
                reply = _echo_stream(client.chat_stream(system + history, **params))
            except ApiError as e:
                if e.code == "context_length_exceeded" and len(history) > 1:
                    history = _drop_oldest_turn(history)
                    continue
                click.echo(f"error: {e}", err=True)
                return history[:-1]
            if len(history) < before:
                click.echo(f"(dropped the {before - len(history)} oldest messages: the conversation passed the "
                           "server's session_len)", err=True)
            return history + [{"role": "assistant", "content": reply}]

    return turn


def _option_names(options) -> set[str]:
    return {p.name for p in click.command()(_with_options(options, lambda **kw: None)).params}


def _refuse_engine_flags(ctx) -> None:
    """Against a server URL, engine flags given on the command line are a usage error."""
    names = sorted(_option_names(_engine_flags())) + [name for name in ("warmup",) if name in ctx.params]
    local_only = [name for name in names if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
    if local_only:
        raise click.UsageError(f"--{local_only[0].replace('_', '-')} sets up a local engine; "
                               "a server keeps the settings it was started with")


@main.command()
@click.argument("path")
@click.option("--system", default=None, help="system prompt: the first message of every conversation")
@click.option("--chat-template", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Jinja chat template FILE to use instead of the model's")
@click.option("--api-key", default=None, help="with a URL: a key the server was started with (--api-keys)")
@engine_options
@click.pass_context
@user_errors
def chat(ctx, path, system, chat_template, api_key, **kw):
    """Chat with the model at PATH, or with a server at PATH = http://host:port.

    One line is one message (three double quotes start and end a multi-line one); /reset forgets
    the conversation, /help lists the commands, `exit` (or end of input) quits."""
    from lmc import repl
    from lmc.cache import cache_root
    from lmc.runtime.tokenizer import read_template_file

    template = read_template_file(chat_template) if chat_template else None
    system_messages = [{"role": "system", "content": system}] if system else []
    if path.startswith(("http://", "https://")):
        _refuse_engine_flags(ctx)
        turn = _remote_turn(path, api_key, system_messages, template, kw)
    else:
        if api_key is not None:
            raise click.UsageError("--api-key is for a server URL, not a local model")
        turn = _local_turn(path, system_messages, template, kw)
    repl.run(turn, cache_root() / "chat_history")


def _default_model_name(path: str) -> str:
    from pathlib import Path

    p = Path(path).resolve()
    return p.stem if p.suffix == ".gguf" else p.name


class _ApiKeysCommand(click.Command):
    """Reads `--api-keys K1 K2 ...` as LMDeploy's argparse does: values up to the next option."""

    def parse_args(self, ctx, args):
        spread, i = [], 0
        while i < len(args):
            spread.append(args[i])
            i += 1
            if spread[-1] == "--api-keys":
                first = True
                while i < len(args) and not args[i].startswith("-"):
                    spread += ([] if first else ["--api-keys"]) + [args[i]]
                    first, i = False, i + 1
        return super().parse_args(ctx, spread)


@main.command(cls=_ApiKeysCommand)
@click.argument("path")
@click.option("--server-name", default="0.0.0.0", show_default=True, help="address to listen on (127.0.0.1: this machine only)")
@click.option("--server-port", type=click.IntRange(1, 65535), default=23333, show_default=True)
@click.option("--api-keys", multiple=True, metavar="KEY...",
              help="answer only requests with `Authorization: Bearer KEY` for one of these keys")
@click.option("--model-name", default=None, help="the model's name in the API (default: PATH's file or folder name)")
@click.option("--max-queue", type=click.IntRange(min=1), default=None,
              help="answer 429 while this many requests wait (default: no limit)")
@click.option("--chat-template", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Jinja chat template FILE to use instead of the model's")
@click.option("--drain-timeout", type=FiniteFloat(min=0), default=30.0, show_default=True,
              help="seconds in-flight requests get to finish after SIGTERM or Ctrl-C")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
              default="info", show_default=True)
@click.option("--allowed-local-media-path", "media_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="image_url parts may name local files inside this folder (default: no local files)")
@click.option("--allowed-media-domains", "media_domains", multiple=True, metavar="HOST...",
              help="image URLs only from these hosts (default: any host with a public address)")
@engine_flags_only
@WARMUP_FLAG
@user_errors
def serve(path, server_name, server_port, api_keys, model_name, max_queue, chat_template, drain_timeout, log_level,
          media_dir, media_domains, warmup, **kw):
    """Serve the model at PATH over an OpenAI-compatible HTTP API, with a chat page at /.

    PATH is a workspace, an HF folder or a GGUF file. Needs the serve extra: pip install 'lmc[serve]'."""
    try:
        from lmc.serve.app import ServeOptions, run_server
    except ImportError as e:
        raise LmcError(f"lmc serve needs {e.name}: pip install 'lmc[serve]' (fastapi, uvicorn, prometheus-client)") from None
    from lmc.api import resolve_workspace
    from lmc.runtime.engine import Engine
    from lmc.runtime.tokenizer import read_template_file

    template = read_template_file(chat_template) if chat_template else None  # before the model loads
    engine = Engine(str(resolve_workspace(path)), _engine_config(kw))
    try:
        _warm_up(engine, warmup, quiet=False)
    except BaseException:
        engine.close()
        raise
    if template is not None:
        engine.tokenizer.chat_template = template
    name = model_name or _default_model_name(path)
    click.echo(f"serving {name} on http://{server_name}:{server_port} (OpenAI API at /v1, chat page at /)", err=True)
    try:
        options = ServeOptions(name, tuple(api_keys), max_queue, media_dir, tuple(media_domains) or None)
        run_server(engine, options, server_name, server_port, drain_timeout, log_level.lower())
    finally:
        engine.close()


@main.command()
@click.argument("path")
@click.option("--num-prompts", type=click.IntRange(min=1), default=1000, show_default=True, help="requests to send")
@click.option("--concurrency", type=click.IntRange(min=1), default=64, show_default=True, help="clients sending at once")
@click.option("--dataset", default="random", show_default=True, help="`random`, or a ShareGPT JSON file")
@click.option("--input-len", type=click.IntRange(min=1), default=224, show_default=True, help="random: mean prompt tokens")
@click.option("--output-len", type=click.IntRange(min=1), default=200, show_default=True, help="random: mean output tokens")
@click.option("--range-ratio", type=FiniteFloat(0, 1, max_open=True), default=0.5, show_default=True,
              help="random: lengths uniform in [L*(1-R), L*(1+R)]")
@click.option("--seed", type=int, default=0, show_default=True, help="dataset sampling seed")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of the table")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="also write the JSON result to this file")
@click.option("--api-key", default=None, help="PATH = a server URL: its API key (sent as a Bearer token)")
@_engine_flags_for_bench
@WARMUP_FLAG
@click.pass_context
@user_errors
def bench(ctx, path, num_prompts, concurrency, dataset, input_len, output_len, range_ratio, seed, as_json, out, api_key,
          warmup, **kw):
    """Throughput and latency of the model at PATH under C concurrent clients (as LMDeploy's profile_throughput).
    PATH = http://host:port benchmarks a running OpenAI-compatible server through its API instead."""
    import platform

    from lmc import bench as B

    _check_bench_out(out)
    if path.startswith(("http://", "https://")):
        _refuse_engine_flags(ctx)
        _bench_url(path, api_key, num_prompts, concurrency, dataset, input_len, output_len, range_ratio, seed, as_json, out)
        return
    if api_key is not None:
        raise click.UsageError("--api-key is for a server URL, not a local model")
    import torch

    from lmc.api import resolve_workspace
    from lmc.runtime.engine import Engine

    if kw["max_batch_size"] is None:
        kw["max_batch_size"] = concurrency
    engine = Engine(str(resolve_workspace(path)), _engine_config(kw))
    tok = engine.tokenizer
    if dataset == "random":
        specials = set(tok.tok.get_added_tokens_decoder())
        vocab = [i for i in range(min(tok.vocab_size, engine.cfg.vocab_size)) if i not in specials]
        requests = B.random_requests(num_prompts, input_len, output_len, range_ratio, vocab, seed)
    else:
        requests = B.sharegpt_requests(Path(dataset), num_prompts, lambda t: tok.encode(t, add_special_tokens=False), seed)
    too_long = [r for r in requests if len(r.prompt_ids) + r.output_len > engine.session_len]
    if too_long:
        raise LmcError(f"{len(too_long)} requests need more than session_len {engine.session_len} tokens; "
                       "raise --session-len or lower --input-len/--output-len")
    try:
        warmed = _warm_up(engine, warmup, quiet=as_json)
        engine.start()
        result = B.run_bench(requests, concurrency, B.engine_sender(engine), show_progress=not as_json and sys.stderr.isatty())
    finally:
        engine.close()
    result["warmup"] = warmed
    result.update({"path": str(path), "num_prompts": num_prompts, "concurrency": concurrency, "dataset": dataset,
                   "device": torch.cuda.get_device_name() if engine.device.type == "cuda" else platform.processor() or "cpu",
                   "engine": {k: v for k, v in kw.items()}, "stats": vars(engine.stats())})
    _write_bench_out(out, result)
    click.echo(json.dumps(result, sort_keys=True) if as_json else B.table(result))


def _check_bench_out(out: str | None) -> None:
    """--out's folder must exist before the benchmark runs, not after it (a missing one lost the whole run)."""
    if out and not Path(out).resolve().parent.is_dir():
        raise LmcError(f"--out {out}: the folder {Path(out).resolve().parent} does not exist; create it or pick another "
                       "path")


def _write_bench_out(out: str | None, result: dict) -> None:
    """The JSON result to --out, whole or not at all (a temporary file beside it, then a rename)."""
    if out:
        tmp = Path(out).with_name(f".{Path(out).name}.tmp")
        tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, out)


def _bench_url(url, api_key, num_prompts, concurrency, dataset, input_len, output_len, range_ratio, seed, as_json, out):
    """`lmc bench URL`: the same clients and result, through the server's /v1/completions."""
    from lmc import bench as B
    from lmc.client import Client

    if dataset != "random":
        raise click.UsageError("against a URL only --dataset random is measured (ShareGPT needs the model's "
                               "tokenizer: bench the workspace itself)")
    client = Client(url, api_key)
    card = client.models()[0]
    vocab = B.server_vocab(card)
    requests = B.random_requests(num_prompts, input_len, output_len, range_ratio, vocab, seed)
    result = B.run_bench(requests, concurrency, B.url_sender(client, card["id"], concurrency),
                         show_progress=not as_json and sys.stderr.isatty())
    result.update({"path": url, "num_prompts": num_prompts, "concurrency": concurrency, "dataset": dataset,
                   "model": card["id"], "max_model_len": card.get("max_model_len")})
    _write_bench_out(out, result)
    click.echo(json.dumps(result, sort_keys=True) if as_json else B.table(result))


# ----------------------------------------------------------------------------- lmc eval


@main.group(name="eval")
def eval_group():
    """Measure a model's quality on text (perplexity)."""


def _text_origin(source: str) -> str:
    """LoadedText.source ("hub:<repo>", "bundled:<stem>" or a path) -> hub, bundled or file."""
    kind = source.split(":", 1)[0]
    return kind if kind in ("hub", "bundled") else "file"


CPU_EVAL_TOKENS = 40 * 512  # tokens `eval ppl` scores on the CPU by default: a minute or so for a 135M model


@eval_group.command(name="ppl")
@click.argument("path")
@click.option("--dataset", default="wikitext2", show_default=True,
              help="wikitext2, ptb, c4, pileval, or a local .txt/.jsonl/.parquet file")
@click.option("--split", default="test", show_default=True, help="split of a named dataset (a file has none)")
@click.option("--seqlen", type=click.IntRange(min=2), default=512, show_default=True, help="tokens per window")
@click.option("--max-windows", type=click.IntRange(min=1), default=None,
              help=f"score only the first N windows (default: all on a GPU; on the CPU the first {CPU_EVAL_TOKENS:,} "
                   f"tokens' worth, 40 windows at --seqlen 512)")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True, help="windows per forward pass")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None, help="default: cuda when available")
@click.option("--quant-policy", type=click.Choice(["0", "4", "8"]), default="0", show_default=True,
              help="KV cache: 0 dense, no cache; 8 int8 or 4 int4: windows run in 64-token chunks through a "
                   "quantized paged cache, as decoding reads it")
@click.option("--lm-head", type=click.Choice(["float", "int4"]), default="float", show_default=True,
              help="int4: quantize the float lm_head at load, as the engine's --lm-head int4 does")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of the summary line")
@click.option("--fail-above", type=FiniteFloat(min=1), default=None, metavar="X",
              help="exit 1 when the perplexity is above X or not finite (a CI gate; a perplexity is at least 1)")
@user_errors
def eval_ppl(path, dataset, split, seqlen, max_windows, batch_size, device, quant_policy, lm_head, as_json,
             fail_above):
    """Perplexity of a model on a text (wikitext2, ptb or a file).

    PATH is a workspace, an HF or AWQ model folder, or a GGUF file. The text is tokenized once as a whole with the workspace's tokenizer (its own special
    tokens, e.g. Llama's BOS at the very start), cut into consecutive windows of --seqlen
    tokens (the tail is dropped), and every window is scored on its own. With --quant-policy 8 or 4 the
    windows run through a KV cache of that policy, so attention reads earlier positions as decoding does."""
    import time

    import torch
    from tqdm import tqdm

    from lmc.api import resolve_workspace
    from lmc.calib.text import DATASETS, check_text_source, load_text
    from lmc.calib.windows import eval_windows
    from lmc.runtime.device import compute_dtype, pick_device
    from lmc.runtime.model import Model
    from lmc.runtime.perplexity import perplexity
    from lmc.runtime.tokenizer import Tokenizer
    from lmc.format.workspace import Workspace

    started = time.perf_counter()
    named = dataset in DATASETS
    check_text_source(dataset, "--dataset")  # a bad name, a missing, odd or oversized file: before the model loads
    dev = pick_device(device)
    if max_windows is None and dev.type == "cpu":
        max_windows = max(1, CPU_EVAL_TOKENS // seqlen)
    text = load_text(dataset, split, purpose="eval", flag="--dataset")
    ws = Workspace(resolve_workspace(path))
    ws.check_within_window(seqlen, "--seqlen")
    if ws.tp != 1:
        raise LmcError(f"{path} is split for tp={ws.tp}; lmc eval ppl runs one device: evaluate the tp=1 workspace "
                       "it was cut from (or convert the checkpoint with --tp 1)")
    ids = Tokenizer(ws.tokenizer_dir).encode(text.text)
    windows = torch.from_numpy(eval_windows(ids, seqlen, max_windows))  # [n, seqlen]
    dtype = compute_dtype(dev, ws.dtype)
    model = Model(ws, dev, dtype, lm_head=lm_head)
    bar = tqdm(total=windows.shape[0], desc="ppl", unit="window", disable=as_json or not sys.stderr.isatty())
    begin = time.perf_counter()
    result = perplexity(model, windows, batch_size, progress=bar.update, quant_policy=int(quant_policy))
    seconds = time.perf_counter() - begin
    bar.close()
    total = len(ids) // seqlen
    problem = _ppl_problem(result)
    label = f"{dataset} {split}" if named else dataset
    if as_json:
        numbers = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in result.items()}
        click.echo(json.dumps({
            **numbers, "ppl_error": problem, "windows_total": total, "dataset": dataset, "split": split if named else None,
            "source": _text_origin(text.source), "text_source": text.source, "text_sha256": text.sha256,
            "text_tokens": len(ids), "workspace": str(ws.path), "device": dev.type,
            "dtype": str(dtype).removeprefix("torch."), "batch_size": batch_size, "quant_policy": int(quant_policy), "lm_head": lm_head, "seconds": round(seconds, 3),
            "total_seconds": round(time.perf_counter() - started, 3)}, sort_keys=True, allow_nan=False))
    else:
        click.echo(f"ppl {result['ppl']:.3f} ({label}, {result['windows']} of {total} windows x {result['seqlen']} tokens, "
                   f"{result['tokens']} tokens predicted)")
    if fail_above is not None and not result["ppl"] <= fail_above:
        verdict = f"ppl {result['ppl']:.3f} is above" if problem is None else f"ppl {result['ppl']} ({problem}) fails"
        click.echo(f"FAILED {verdict} --fail-above {fail_above:g}", err=True)
        sys.exit(1)


def _ppl_problem(result: dict) -> str | None:
    """Why a perplexity is not a finite number (None when it is)."""
    nll = result["nll"]
    if math.isnan(nll):
        return "the mean log-likelihood is NaN: the model produced NaN logits"
    if math.isinf(nll):
        return "a token had probability 0 under the model (infinite loss)"
    if math.isinf(result["ppl"]):
        return f"exp(nll) overflows a float: nll {nll:.1f} > 709"
    return None


# ----------------------------------------------------------------------------- lmc cache


@main.group(name="cache")
def cache_group():
    """The workspaces converted on the fly from HF folders and GGUF files ($LMC_CACHE, default ~/.cache/lmc)."""


@cache_group.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="print a JSON list instead of the table")
@user_errors
def cache_list(as_json):
    """List the cached workspaces: path, source, size and last use (least recently used first)."""
    from lmc.cache import cache_root, entries, entry_dict

    rows = entries()
    if as_json:
        click.echo(json.dumps([entry_dict(e) for e in rows], indent=2))
        return
    if not rows:
        click.echo(f"no cached workspaces in {cache_root()}")
        return
    for e in rows:
        used = entry_dict(e)["last_used"].replace("T", " ")[:16]
        note = " (stale: its source changed or is gone)" if e.stale else ""
        click.echo(f"{e.path}  {e.size / 1e6:8.1f} MB  last used {used}  from {e.source or '?'}{note}")
    click.echo(f"{len(rows)} workspaces, {sum(e.size for e in rows) / 1e6:.1f} MB")


@cache_group.command(name="clean")
@click.option("--all", "everything", is_flag=True, help="remove every cached workspace")
@click.option("--older-than", type=FiniteFloat(min=0), default=None, metavar="DAYS",
              help="remove the workspaces not used for more than DAYS days")
@user_errors
def cache_clean(everything, older_than):
    """Remove cached workspaces: by default the stale ones (their source changed or is gone)."""
    from lmc.cache import clean

    if everything and older_than is not None:
        raise click.UsageError("give --all or --older-than, not both")
    removed = clean(everything, older_than)
    for e in removed:
        click.echo(f"removed {e.path} ({e.size / 1e6:.1f} MB)")
    click.echo(f"removed {len(removed)} workspaces, {sum(e.size for e in removed) / 1e6:.1f} MB")
