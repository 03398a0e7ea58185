"""Which W4A16 kernel path and block shapes to launch, per GPU model and shape class.

The tables live in `w4a16_tuning.json` next to this module:

    {"format": "lmc-w4a16-tuning-1", "default": "<device name>",
     "devices": {"<torch.cuda.get_device_name()>": {"source": "<how it was measured>",
                                                    "entries": [{"m": 16, "k": 4096, "n": 6144, "path": "gemm",
                                                                 "config": {...launcher keywords...},
                                                                 "us": 16.5}, ...]}}}

An entry is the configuration measured best for M rows at one (K, N) shape ("us": its time there, for the record).
An entry of path "mma" (the load-time mma layout: kernels/w4a16_mma.py for 1-16 rows, kernels/w4a16_mma_wide.py
where its config has "tiles", kernels/w4a16_wgmma.py (Hopper) where it has "rows"; written by
`bench/bench_w4a16_mma.py --write-table`) carries a "fallback": {"path", "config"}, what the same product takes where a weight has no mma layout. A product [M, K] x [K, N] takes its M
class, the smallest entry M >= M (the largest if none), and within it the entry whose (K, N) is nearest on a log
scale. A GPU without a table gets the "default" device's table and a one-line hint, once, to run the sweep that
writes its own (`python bench/bench_w4a16.py --sweep --write-table`). The choice is made once per (device, M, N, K)
and cached: nothing is timed per call, so CUDA graphs capture a fixed launch.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path

TABLE_PATH = Path(__file__).with_name("w4a16_tuning.json")
FORMAT = "lmc-w4a16-tuning-1"
PATHS = ("gemv", "gemm", "dequant", "mma")
TUNE_HINT = "python bench/bench_w4a16.py --sweep --write-table"


def read_tables(path: Path = TABLE_PATH) -> dict:
    tables = json.loads(Path(path).read_text())
    if tables.get("format") != FORMAT or tables.get("default") not in tables.get("devices", {}):
        raise ValueError(f"{path} is not a {FORMAT} table with its default device")
    return tables


@functools.cache
def _tables() -> dict:
    return read_tables(TABLE_PATH)  # the module attribute at call time (a bench may point it elsewhere)


def select(entries: list[dict], m: int, n: int, k: int, mma: bool = False) -> tuple[str, dict]:
    """The entry for an [M, K] x [K, N] product: M class first, then the nearest (K, N) (log scale); an "mma"
    entry gives its fallback unless `mma` (the weight has the mma layout)."""
    classes = sorted({e["m"] for e in entries})
    m_class = next((c for c in classes if c >= m), classes[-1])

    def distance(e: dict) -> float:
        return abs(math.log(e["n"] / max(n, 1))) + abs(math.log(e["k"] / max(k, 1)))

    best = min((e for e in entries if e["m"] == m_class), key=distance)
    if best["path"] == "mma" and not mma:
        best = best["fallback"]
    return best["path"], dict(best["config"])


def has_mma(device_name: str | None) -> bool:
    """Whether this GPU's own table has mma entries (the loader builds the mma layout only then: an untuned GPU
    keeps one copy of each weight)."""
    devices = _tables()["devices"]
    return device_name in devices and any(e["path"] == "mma" for e in devices[device_name]["entries"])


@functools.cache
def _hint(device_name: str, default: str) -> None:
    print(f"lmc: no W4A16 tuning table for {device_name!r}; using {default!r}'s. Tune it: {TUNE_HINT}",
          file=sys.stderr)


@functools.cache
def _config(device_name: str | None, m: int, n: int, k: int, mma: bool) -> tuple[str, tuple]:
    tables = _tables()
    device = device_name if device_name in tables["devices"] else tables["default"]
    if device_name is not None and device != device_name:
        _hint(device_name, device)
    path, kw = select(tables["devices"][device]["entries"], m, n, k, mma)
    return path, tuple(kw.items())


def config_for(device_name: str | None, m: int, n: int, k: int, mma: bool = False) -> tuple[str, dict]:
    """(path, launcher keywords) for `device_name` (None: the default table, no hint); mma: the weight has the
    mma layout (else an "mma" entry's fallback)."""
    path, items = _config(device_name, m, n, k, mma)
    return path, dict(items)


def merge(tables: dict, device_name: str, measured: list[dict], source: str) -> dict:
    """tables with `measured` entries (m, k, n, path, config, us) written into device_name's table: an entry of
    the same (m, k, n) is replaced, the others kept; a new device starts from a copy of the default's entries."""
    devices = dict(tables["devices"])
    old = devices.get(device_name) or {"source": f"seeded from {tables['default']}",
                                       "entries": devices[tables["default"]]["entries"]}
    new_keys = {(e["m"], e["k"], e["n"]) for e in measured}
    kept = [e for e in old["entries"] if (e["m"], e["k"], e["n"]) not in new_keys]
    entries = sorted(kept + [dict(e) for e in measured], key=lambda e: (e["m"], e["k"], e["n"]))
    devices[device_name] = {"source": f"{old['source']}; {source}", "entries": entries}
    return {**tables, "devices": devices}


def write_tables(tables: dict, path: Path = TABLE_PATH) -> None:
    """One entry per line, so that a merge reads as a small diff."""
    lines = ["{", f' "format": {json.dumps(tables["format"])},', f' "default": {json.dumps(tables["default"])},',
             ' "devices": {']
    names = list(tables["devices"])
    for i, name in enumerate(names):
        dev = tables["devices"][name]
        lines += [f"  {json.dumps(name)}: {{", f'   "source": {json.dumps(dev["source"])},', '   "entries": [']
        rows = [f"    {json.dumps(e)}" for e in dev["entries"]]
        lines += [r + ("," if j < len(rows) - 1 else "") for j, r in enumerate(rows)]
        lines += ["   ]", "  }" + ("," if i < len(names) - 1 else "")]
    lines += [" }", "}"]
    Path(path).write_text("\n".join(lines) + "\n")
    read_tables(path)  # what was written reads back
