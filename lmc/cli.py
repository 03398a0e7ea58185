"""The `lmc` command line. Exit codes: 0 ok, 1 bad input or failed check, 2 usage."""
from __future__ import annotations

import functools
import json
import sys

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
        except KeyboardInterrupt:
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
@click.option("--model-format", type=click.Choice(["hf", "awq", "gguf"]), default=None,
              help="source format (default: detect; a .gguf file is gguf, an AWQ config is awq)")
@click.option("--dtype", type=click.Choice(["auto", "float16", "bfloat16", "float32"]), default="auto",
              help="float dtype of the workspace (auto: the source's)")
@click.option("--tp", type=int, default=1, show_default=True, help="tensor-parallel ranks to split weights for")
@click.option("--force", is_flag=True, help="replace an existing output folder")
@user_errors
def convert(src, out, model_format, dtype, tp, force):
    """Convert an HF, AWQ or GGUF checkpoint SRC into a workspace."""
    from lmc.compiler.convert import convert as run_convert

    if tp < 1:
        raise click.BadParameter("--tp must be >= 1")
    manifest = run_convert(src, out, model_format=model_format, dtype=dtype, tp=tp, force=force)
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
    from lmc.runtime.workspace import Workspace

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
    from lmc.runtime.workspace import verify_workspace

    problems = verify_workspace(workspace)
    if problems:
        click.echo(f"FAILED {workspace}: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""), err=True)
        sys.exit(1)
    click.echo(f"OK {workspace}")
