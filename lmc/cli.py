"""The `lmc` command line. Exit codes: 0 ok, 1 bad input or failed check, 2 usage."""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import click

from lmc.errors import LmcError


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
@click.option("--force", is_flag=True, help="replace an existing output folder")
@click.option("--allow-nonfinite", is_flag=True, help="keep NaN/Inf weights (with a warning) instead of refusing them")
@user_errors
def convert(src, out, model_format, dtype, tp, force, allow_nonfinite):
    """Convert an HF (float, AWQ, GPTQ, compressed-tensors) or GGUF checkpoint SRC (or copy a workspace SRC) into a workspace."""
    from lmc.compiler.convert import convert as run_convert

    if tp is not None and tp < 1:
        raise click.BadParameter("--tp must be >= 1")
    manifest = run_convert(src, out, model_format=model_format, dtype=dtype, tp=tp, force=force,
                           allow_nonfinite=allow_nonfinite, say=lambda m: click.echo(m, err=True))
    size = sum(f["size"] for f in manifest["files"].values())
    click.echo(f"wrote {out}: {len(manifest['tensors'])} tensors, {size / 1e6:.1f} MB")


def _summary(ws) -> dict:
    cfg = ws.config
    n_params = sum(1 for _ in ws.tensor_names())
    size = sum(f["size"] for f in ws.manifest["files"].values())
    return {"path": str(ws.path), "format_version": ws.meta["format_version"], "architecture": cfg.architecture,
            "dtype": ws.meta["dtype"], "quantization": ws.quantization, "tp": ws.tp, "tensors": n_params,
            "bytes": size, "model": cfg.to_dict(), "provenance": ws.manifest.get("provenance", {})}


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
    click.echo(f"dtype         {info['dtype']}")
    click.echo("quantization  " + ("none" if not q else f"{q['method']} int{q['bits']} group {q['group_size']} ({q['layout']})"))
    click.echo(f"tp            {info['tp']}")
    click.echo(f"size          {info['bytes'] / 1e6:.1f} MB in {info['tensors']} tensors")
    prov = info["provenance"]
    click.echo(f"built by      lmc {prov.get('lmc_version')}: {prov.get('command')}")
    for name, rec in prov.get("source_files", {}).items():
        click.echo(f"source        {name} sha256 {rec['sha256'][:16]}…")
    if "calibration" in prov:
        c = prov["calibration"]
        click.echo(f"calibration   {c.get('dataset')} ({c.get('source')}), {c.get('samples')} x {c.get('seqlen')}, "
                   f"seed {c.get('seed')}, windows sha256 {str(c.get('windows_sha256'))[:16]}…")


@main.command()
@click.argument("workspace")
@user_errors
def verify(workspace):
    """Check every checksum, tensor entry and the format version. Exit 1 on the first problem."""
    from lmc.format.workspace import verify_workspace

    problems = verify_workspace(workspace)
    if problems:
        click.echo(f"FAILED {workspace}: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""), err=True)
        sys.exit(1)
    click.echo(f"OK {workspace}")


@main.command()
@click.argument("src")
@click.option("-o", "--output", "--work-dir", "out", required=True, help="output folder (--work-dir as in lmdeploy lite auto_awq)")
@click.option("--w-bits", type=int, default=4, show_default=True)
@click.option("--w-group-size", type=int, default=128, show_default=True, help="32, 64 or 128")
@click.option("--calib-dataset", default="ptb", show_default=True, help="ptb, wikitext2, c4, pileval or a .txt/.jsonl/.parquet path")
@click.option("--calib-samples", type=int, default=128, show_default=True, help="0: plain round-to-nearest")
@click.option("--calib-seqlen", type=int, default=1024, show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True, help="windows per forward pass")
@click.option("--search-scale/--no-search-scale", default=True, show_default=True,
              help="AWQ scale + clip search; --no-search-scale: LMDeploy's fixed 0.5 smoothing, no clip")
@click.option("--search-samples", type=int, default=None, help="windows used for the search losses (default: 32 on GPU, 8 on CPU)")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None, help="default: cuda when available")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float16", "bfloat16"]), default="auto", show_default=True)
@click.option("--format", "format", type=click.Choice(["awq", "compressed-tensors"]), default="awq", show_default=True,
              help="HF int4 checkpoint to write: AutoAWQ GEMM or compressed-tensors pack-quantized (llm-compressor's W4A16)")
@click.option("--workspace", is_flag=True, help="write an lmc workspace instead of an HF checkpoint")
@click.option("--allow-nonfinite", is_flag=True, help="keep NaN/Inf weights (with a warning) instead of refusing them")
@click.option("--force", is_flag=True, help="replace an existing output folder")
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary (timings, memory, per-layer losses)")
@user_errors
def quantize(src, out, force, as_json, **kw):
    """AWQ W4A16: calibrate on text, search scales and clipping, pack int4 (HF folder or GGUF SRC)."""
    from lmc.compiler.quantize import QuantizeOptions, quantize as run_quantize, summary_json

    opts = QuantizeOptions(**kw)
    if opts.workspace and opts.format != "awq":
        raise click.UsageError(f"--workspace writes an lmc workspace; drop --format {opts.format} or --workspace")
    command = (f"lmc quantize <src> -o <output> --w-bits {opts.w_bits} --w-group-size {opts.w_group_size} "
               f"--calib-dataset {opts.calib_dataset} --calib-samples {opts.calib_samples} --calib-seqlen {opts.calib_seqlen} "
               f"--batch-size {opts.batch_size} --{'' if opts.search_scale else 'no-'}search-scale "
               f"--search-samples {opts.search_samples or 'auto'} --seed {opts.seed} --dtype {opts.dtype}"
               + (" --workspace" if opts.workspace else "") + (f" --format {opts.format}" if opts.format != "awq" else ""))
    say = (lambda m: click.echo(m, err=True)) if as_json else click.echo
    summary = run_quantize(src, out, opts, force=force, command=command, say=say)
    if as_json:
        click.echo(summary_json(summary))
    else:
        click.echo(f"wrote {out} ({summary['format']}, {summary['method']}) in {summary['seconds']['total']:.1f} s")


def _engine_flags(max_batch_size: int | None = 64) -> list:
    return [
        click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None, help="default: cuda when available"),
        click.option("--session-len", type=click.IntRange(min=2), default=None, help="max tokens per session (default: the model's)"),
        click.option("--cache-max-entry-count", type=click.FloatRange(0, 1, min_open=True), default=0.8, show_default=True,
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
        click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: lmc picks; see docs/cli.md)"),
    ]


_SAMPLING_FLAGS = [
    click.option("--max-new-tokens", type=click.IntRange(min=1), default=512, show_default=True),
    click.option("--min-new-tokens", type=click.IntRange(min=0), default=None, help="no EOS before this many tokens"),
    click.option("--temperature", type=click.FloatRange(min=0), default=0.8, show_default=True, help="0: greedy"),
    click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.8, show_default=True),
    click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True, help="0: no limit"),
    click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True),
    click.option("--stop-words", multiple=True, help="stop when the text contains this (repeatable)"),
    click.option("--seed", type=int, default=None, help="sampling seed (reproducible output)"),
]


def _apply(options: list, fn):
    for option in reversed(options):
        fn = option(fn)
    return fn


def engine_options(fn):
    """EngineConfig and sampling flags, spelled as `lmdeploy chat` spells them. Out-of-range values are usage
    errors (exit 2)."""
    return _apply(_engine_flags() + _SAMPLING_FLAGS, fn)


def _engine_flags_for_bench(fn):
    return _apply(_engine_flags(max_batch_size=None), fn)


def _engine_config(kw: dict):
    from lmc.runtime.config import EngineConfig

    return EngineConfig(session_len=kw["session_len"], max_batch_size=kw["max_batch_size"],
                        cache_max_entry_count=kw["cache_max_entry_count"], cache_block_seq_len=kw["cache_block_seq_len"],
                        max_prefill_token_num=kw["max_prefill_token_num"],
                        enable_prefix_caching=kw["enable_prefix_caching"], quant_policy=int(kw["quant_policy"]),
                        device=kw["device"], threads=kw["threads"])


def _configs(kw: dict):
    """EngineConfig and GenerationConfig from the flags. As `lmdeploy chat`, the CLI samples unless
    --temperature 0 (the Python GenerationConfig is greedy unless do_sample, as LMDeploy's)."""
    from lmc.runtime.sampling import GenerationConfig

    engine = _engine_config(kw)
    gen = GenerationConfig(max_new_tokens=kw["max_new_tokens"], min_new_tokens=kw["min_new_tokens"],
                           do_sample=kw["temperature"] > 0, temperature=kw["temperature"], top_p=kw["top_p"],
                           top_k=kw["top_k"], repetition_penalty=kw["repetition_penalty"],
                           stop_words=list(kw["stop_words"]), random_seed=kw["seed"])
    return engine, gen


def _echo_stream(pieces) -> str:
    """Print text pieces as they come; returns the whole text."""
    out = []
    for piece in pieces:
        out.append(piece)
        click.echo(piece, nl=False)
    click.echo()
    return "".join(out)


@main.command()
@click.argument("path")
@click.argument("prompt")
@click.option("--no-chat-template", is_flag=True, help="feed PROMPT as raw text (completion), not as a user turn")
@click.option("--json", "as_json", is_flag=True, help="print a JSON object (text, token ids, finish reason, timings)")
@engine_options
@user_errors
def generate(path, prompt, no_chat_template, as_json, **kw):
    """Generate a reply to PROMPT with the model at PATH (workspace, HF folder or GGUF file)."""
    import time

    from lmc.api import pipeline

    engine_cfg, gen = _configs(kw)
    pipe = pipeline(path, backend_config=engine_cfg)
    start = time.perf_counter()
    if as_json:
        r = pipe(prompt, gen, chat_template=not no_chat_template)
        seconds = time.perf_counter() - start
        click.echo(json.dumps({"text": r.text, "token_ids": r.token_ids, "finish_reason": r.finish_reason,
                               "input_tokens": r.input_token_len, "generated_tokens": r.generate_token_len,
                               "seconds": round(seconds, 3)}, ensure_ascii=False))
        return
    _echo_stream(item.text for item in pipe.stream_infer(prompt, gen, chat_template=not no_chat_template))


def _fit_history(pipe, history: list[dict], room: int) -> list[dict]:
    """Drop the oldest turns until the rendered conversation leaves `room` tokens of the session."""
    limit = pipe.engine.session_len - room
    dropped = 0
    while len(history) > 1 and len(pipe.encode(history)) > limit:
        cut = 2 if len(history) > 2 and history[0]["role"] == "user" else 1  # a user turn and its reply
        history = history[cut:]
        dropped += cut
    if dropped:
        click.echo(f"(dropped the {dropped} oldest messages: the conversation passed session_len "
                   f"{pipe.engine.session_len} less {room} tokens for the reply)", err=True)
    return history


@main.command()
@click.argument("path")
@engine_options
@user_errors
def chat(path, **kw):
    """Chat with the model at PATH. One line is one turn; `exit` (or end of input) quits."""
    from lmc.api import pipeline

    engine_cfg, gen = _configs(kw)
    pipe = pipeline(path, backend_config=engine_cfg)
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    room = min(gen.max_new_tokens, pipe.engine.session_len // 2)
    while True:
        if interactive:
            click.echo("\n>>> ", nl=False)
        line = sys.stdin.readline()
        if not line or line.strip() == "exit":
            break
        if not line.strip():
            continue
        history = _fit_history(pipe, history + [{"role": "user", "content": line.rstrip("\n")}], room)
        if len(pipe.encode(history)) >= pipe.engine.session_len:
            click.echo(f"error: this message alone passes session_len {pipe.engine.session_len}; shorten it", err=True)
            history = history[:-1]
            continue
        reply = _echo_stream(item.text for item in pipe.stream_infer(history, gen))
        history.append({"role": "assistant", "content": reply})


@main.command()
@click.argument("path")
@click.option("--num-prompts", type=click.IntRange(min=1), default=1000, show_default=True, help="requests to send")
@click.option("--concurrency", type=click.IntRange(min=1), default=64, show_default=True, help="clients sending at once")
@click.option("--dataset", default="random", show_default=True, help="`random`, or a ShareGPT JSON file")
@click.option("--input-len", type=click.IntRange(min=1), default=224, show_default=True, help="random: mean prompt tokens")
@click.option("--output-len", type=click.IntRange(min=1), default=200, show_default=True, help="random: mean output tokens")
@click.option("--range-ratio", type=click.FloatRange(0, 1, max_open=True), default=0.5, show_default=True,
              help="random: lengths uniform in [L*(1-R), L*(1+R)]")
@click.option("--seed", type=int, default=0, show_default=True, help="dataset sampling seed")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of the table")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="also write the JSON result to this file")
@_engine_flags_for_bench
@user_errors
def bench(path, num_prompts, concurrency, dataset, input_len, output_len, range_ratio, seed, as_json, out, **kw):
    """Throughput and latency of the model at PATH under C concurrent clients (as LMDeploy's profile_throughput)."""
    import platform

    import torch

    from lmc import bench as B
    from lmc.runtime.engine import Engine
    from lmc.api import resolve_workspace

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
    engine.start()
    try:
        result = B.run_bench(requests, concurrency, B.engine_sender(engine), show_progress=not as_json and sys.stderr.isatty())
    finally:
        engine.stop()
    result.update({"path": str(path), "num_prompts": num_prompts, "concurrency": concurrency, "dataset": dataset,
                   "device": torch.cuda.get_device_name() if engine.device.type == "cuda" else platform.processor() or "cpu",
                   "engine": {k: v for k, v in kw.items()}, "stats": vars(engine.stats())})
    if out:
        Path(out).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    click.echo(json.dumps(result, sort_keys=True) if as_json else B.table(result))


# ----------------------------------------------------------------------------- lmc eval


@main.group(name="eval")
def eval_group():
    """Measure a model's quality on text (perplexity)."""


def _text_origin(source: str) -> str:
    """LoadedText.source ("hub:<repo>", "bundled:<stem>" or a path) -> hub, bundled or file."""
    kind = source.split(":", 1)[0]
    return kind if kind in ("hub", "bundled") else "file"


@eval_group.command(name="ppl")
@click.argument("path")
@click.option("--dataset", default="wikitext2", show_default=True,
              help="wikitext2, ptb, c4, pileval, or a local .txt/.jsonl/.parquet file")
@click.option("--split", default="test", show_default=True, help="split of a named dataset (a file has none)")
@click.option("--seqlen", type=click.IntRange(min=2), default=512, show_default=True, help="tokens per window")
@click.option("--max-windows", type=click.IntRange(min=1), default=None, help="score only the first N windows (default: all)")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True, help="windows per forward pass")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None, help="default: cuda when available")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of the summary line")
@click.option("--fail-above", type=float, default=None, metavar="X", help="exit 1 when the perplexity is above X (a CI gate)")
@user_errors
def eval_ppl(path, dataset, split, seqlen, max_windows, batch_size, device, as_json, fail_above):
    """Perplexity of a model on a text (wikitext2, ptb or a file).

    PATH is a workspace, an HF or AWQ model folder, or a GGUF file. The text is tokenized once as a whole with the workspace's tokenizer (its own special
    tokens, e.g. Llama's BOS at the very start), cut into consecutive windows of --seqlen
    tokens (the tail is dropped), and every window is scored on its own."""
    import time
    from pathlib import Path

    import torch
    from tqdm import tqdm

    from lmc.api import resolve_workspace
    from lmc.calib.text import DATASETS, load_text
    from lmc.calib.windows import eval_windows
    from lmc.runtime.device import compute_dtype, pick_device
    from lmc.runtime.model import Model
    from lmc.runtime.perplexity import perplexity
    from lmc.runtime.tokenizer import Tokenizer
    from lmc.format.workspace import Workspace

    started = time.perf_counter()
    named = dataset in DATASETS
    if not named and not Path(dataset).is_file():
        raise LmcError(f"dataset file not found: {dataset}: pass an existing .txt/.jsonl/.parquet file "
                       f"or one of {', '.join(DATASETS)}")
    text = load_text(dataset, split, purpose="eval")
    ws = Workspace(resolve_workspace(path))
    ids = Tokenizer(ws.tokenizer_dir).encode(text.text)
    windows = torch.from_numpy(eval_windows(ids, seqlen, max_windows))  # [n, seqlen]
    dev = pick_device(device)
    dtype = compute_dtype(dev, ws.dtype)
    model = Model(ws, dev, dtype)
    bar = tqdm(total=windows.shape[0], desc="ppl", unit="window", disable=as_json or not sys.stderr.isatty())
    begin = time.perf_counter()
    result = perplexity(model, windows, batch_size, progress=bar.update)
    seconds = time.perf_counter() - begin
    bar.close()
    label = f"{dataset} {split}" if named else dataset
    if as_json:
        click.echo(json.dumps({
            **result, "dataset": dataset, "split": split if named else None, "source": _text_origin(text.source),
            "text_source": text.source, "text_sha256": text.sha256, "text_tokens": len(ids),
            "workspace": str(ws.path), "device": dev.type, "dtype": str(dtype).removeprefix("torch."),
            "batch_size": batch_size, "seconds": round(seconds, 3),
            "total_seconds": round(time.perf_counter() - started, 3)}, sort_keys=True))
    else:
        click.echo(f"ppl {result['ppl']:.3f} ({label}, {result['windows']} windows x {result['seqlen']} tokens, "
                   f"{result['tokens']} tokens predicted)")
    if fail_above is not None and not result["ppl"] <= fail_above:
        click.echo(f"FAILED ppl {result['ppl']:.3f} is above --fail-above {fail_above:g}", err=True)
        sys.exit(1)
