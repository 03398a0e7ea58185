"""Calibration and evaluation text: named sets (hub first, bundled fallback) and local files.

`load_text(name_or_path, split, purpose)` returns one string, where it came from, and its
sha256. Tokenizing it and cutting windows is `lmc.calib.windows`' job.

Named sets and how their rows become one string (facts from LMDeploy's
`lmdeploy/lite/utils/calib_dataloader.py`, which follows GPTQ's `datautils.py`):

- `ptb`: rows are the `sentence` column of the hub's `ptb_text_only` (Mikolov's lines,
  stripped). LMDeploy's `get_ptb` (what `--calib-dataset ptb` runs) joins the train rows with
  "\\n\\n" for calibration and the validation rows with "\\n\\n" for evaluation; lmc does the
  same for both purposes so its windows match LMDeploy's. (" ".join is LMDeploy's and GPTQ's
  `ptb_new` variant and SparseGPT's `get_ptb`; lmc does not use it.)
- `wikitext2`: "\\n\\n".join(rows) for both purposes (LMDeploy's `get_wikitext2`, and the usual
  perplexity string). Hub rows are the raw file's lines with their "\\n", blank lines as "".
- `c4` (hub or cache only): calibration joins the first 5,000 documents of the train shard
  `en/c4-train.00000-of-01024.json.gz` with "\\n\\n" (LMDeploy draws whole documents instead;
  one string keeps one window sampler for every set); evaluation is " ".join of the first 1,100
  documents of `en/c4-validation.00000-of-00008.json.gz` (LMDeploy's and GPTQ's `c4_new`).
- `pileval` (hub or cache only): "\\n\\n".join of the first 5,000 stripped documents of
  `mit-han-lab/pile-val-backup` (validation), unshuffled so the text does not depend on the seed.

The hub is tried only when `datasets` is installed and huggingface.co answers within 2 s; with
HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1 only sets that have no bundled copy are looked up
in the local `datasets` cache. Bundled copies (calib/data, see SOURCES.json) hold PTB
train/valid/test and the WikiText-2 test split; they give the same string as the hub.

Local files: `.txt` is used as is; `.jsonl` takes the `text` field of every line and `.parquet`
the `text` column, rows joined with "\\n\\n".
"""
import hashlib
import importlib.resources
import importlib.util
import json
import lzma
import os
import threading
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

from lmc.errors import LmcError
from lmc.format.paths import read_capped

DATASETS = ("ptb", "wikitext2", "c4", "pileval")
PURPOSES = ("calib", "eval")
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
MAX_TEXT_FILE_BYTES = 256 * 1024 * 1024  # a local text file (a .parquet's text column uncompressed) larger is refused

_SPLITS = {
    "ptb": ("train", "validation", "test"),
    "wikitext2": ("train", "validation", "test"),
    "c4": ("train", "validation"),
    "pileval": ("validation",),
}
_SPLIT_ALIASES = {"valid": "validation", "val": "validation"}
_BUNDLED = {
    ("ptb", "train"): "ptb.train.txt.xz",
    ("ptb", "validation"): "ptb.valid.txt.xz",
    ("ptb", "test"): "ptb.test.txt.xz",
    ("wikitext2", "test"): "wikitext2.test.txt.xz",
}
# (name, purpose) -> (separator, number of leading rows used; None = all)
_JOINS = {
    ("ptb", "calib"): ("\n\n", None),
    ("ptb", "eval"): ("\n\n", None),
    ("wikitext2", "calib"): ("\n\n", None),
    ("wikitext2", "eval"): ("\n\n", None),
    ("c4", "calib"): ("\n\n", 5000),
    ("c4", "eval"): (" ", 1100),
    ("pileval", "calib"): ("\n\n", 5000),
    ("pileval", "eval"): ("\n\n", 5000),
}
_HUB_IDS = {
    "ptb": "ptb-text-only/ptb_text_only",
    "wikitext2": "Salesforce/wikitext",
    "c4": "allenai/c4",
    "pileval": "mit-han-lab/pile-val-backup",
}
_C4_SHARDS = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}
_HUB_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class LoadedText:
    text: str
    source: str  # "hub:<repo>", "bundled:<file stem>" or the local path
    sha256: str  # of text.encode("utf-8")


def load_text(name_or_path: str, split: str, purpose: str = "calib", flag: str = "--calib-dataset") -> LoadedText:
    """One string of text: a named set (`DATASETS`) split, or a local file (split ignored).
    `flag` is the caller's command-line option that named the text, for the error messages."""
    if purpose not in PURPOSES:
        raise LmcError(f"unknown text purpose {purpose!r}: use one of {', '.join(PURPOSES)}")
    if name_or_path in DATASETS:
        return _load_named(name_or_path, _check_split(name_or_path, split), purpose, flag)
    check_text_source(name_or_path, flag)
    return _load_file(Path(name_or_path), flag)


def check_text_source(name_or_path: str, flag: str) -> None:
    """What `load_text` would refuse without reading the text (a bad name, suffix or path), so that a command
    says it before opening its model: one LmcError line."""
    if name_or_path in DATASETS:
        return
    path = Path(name_or_path)
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise LmcError(f"unknown dataset {name_or_path!r} given to {flag}: use one of {', '.join(DATASETS)} "
                       f"or a local {'/'.join(FILE_SUFFIXES)} file")
    check_text_file(path, flag)


def bundled_sources() -> dict:
    """calib/data/SOURCES.json: provenance and sha256 of every bundled text."""
    return json.loads(_data_dir().joinpath("SOURCES.json").read_text(encoding="utf-8"))


def read_bundled(filename: str) -> str:
    """Decompress one bundled file and check it against its recorded sha256."""
    entry = bundled_sources()["files"][filename]
    raw = lzma.decompress(_data_dir().joinpath(filename).read_bytes())
    if hashlib.sha256(raw).hexdigest() != entry["sha256"]:
        raise LmcError(f"bundled text {filename} is damaged (sha256 mismatch): reinstall lmc")
    return raw.decode("utf-8")


def _check_split(name: str, split: str) -> str:
    split = _SPLIT_ALIASES.get(split, split)
    if split not in _SPLITS[name]:
        raise LmcError(f"{name} has no split {split!r}: use one of {', '.join(_SPLITS[name])}")
    return split


def _fix_local(flag: str) -> str:
    return f"pass a local file with {flag} PATH (.txt, .jsonl or .parquet)"


def _load_named(name: str, split: str, purpose: str, flag: str) -> LoadedText:
    bundled = _BUNDLED.get((name, split))
    sep, limit = _JOINS[(name, purpose)]
    mode = _hub_mode()
    if mode == "online" or (mode == "cache" and bundled is None):
        try:
            rows = _hub_rows(name, split, limit)
        except Exception as exc:  # any hub/cache failure: fall back or explain
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if bundled is None:
                raise LmcError(f"could not load {name} ({split}) from the hub or the datasets "
                               f"cache ({reason}): {_fix_local(flag)}") from exc
            warnings.warn(f"hub load of {name} ({split}) failed ({reason}); using the bundled copy")
        else:
            return _loaded(sep.join(rows[:limit]), f"hub:{_HUB_IDS[name]}")
    if bundled is None:
        raise LmcError(f"{name} ({split}) needs the Hugging Face hub, which is unreachable or "
                       f"disabled, and lmc bundles no copy: {_fix_local(flag)}, or set "
                       f"HF_DATASETS_OFFLINE=1 to use a copy in the datasets cache")
    rows = _bundled_rows(name, read_bundled(bundled))
    return _loaded(sep.join(rows[:limit]), f"bundled:{bundled.removesuffix('.txt.xz')}")


def _bundled_rows(name: str, raw: str) -> list[str]:
    lines = raw.split("\n")[:-1]  # the files end with "\n"
    if name == "ptb":
        return [line.strip() for line in lines]
    return [line + "\n" if line.strip() else "" for line in lines]


def _hub_mode() -> str | None:
    """'online' (hub reachable), 'cache' (offline env set) or None (no datasets, no hub)."""
    if importlib.util.find_spec("datasets") is None:
        return None
    if _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE"):
        return "cache"
    return "online" if _hub_reachable() else None


def _env_true(key: str) -> bool:
    return os.environ.get(key, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_reachable() -> bool:
    """Any HTTP answer from the hub endpoint within _HUB_TIMEOUT_S (DNS included)."""
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    answered = []

    def probe():
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=_HUB_TIMEOUT_S)
            answered.append(True)
        except urllib.error.HTTPError:
            answered.append(True)
        except (OSError, ValueError):
            answered.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(_HUB_TIMEOUT_S)
    return bool(answered) and answered[0]


def _hub_rows(name: str, split: str, limit: int | None) -> list[str]:
    from datasets import load_dataset

    rows = slice(None, limit)
    if name == "ptb":
        # the script-based ptb_text_only no longer loads; its parquet conversion does
        files = (f"hf://datasets/{_HUB_IDS['ptb']}@refs%2Fconvert%2Fparquet/"
                 f"penn_treebank/{split}/*.parquet")
        ds = load_dataset("parquet", data_files={split: files}, split=split)
        return [row.strip() for row in ds[rows]["sentence"]]
    if name == "wikitext2":
        return load_dataset(_HUB_IDS[name], "wikitext-2-raw-v1", split=split)[rows]["text"]
    if name == "c4":
        ds = load_dataset(_HUB_IDS[name], data_files={split: _C4_SHARDS[split]}, split=split)
        return ds[rows]["text"]
    ds = load_dataset(_HUB_IDS[name], split=split)
    return [row.strip() for row in ds[rows]["text"]]


def _load_file(path: Path, flag: str) -> LoadedText:
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            text = _read_bounded(path)
        elif suffix == ".jsonl":
            text = "\n\n".join(_jsonl_rows(path, _read_bounded(path)))
        else:
            text = "\n\n".join(_parquet_rows(path))
    except UnicodeDecodeError as exc:
        raise LmcError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): "
                       f"convert it to UTF-8") from exc
    return _loaded(text, str(path))


def check_text_file(path: Path, flag: str) -> None:
    """A local text file must exist and be a regular file (not a folder, a device or a pipe, which could be read
    forever) of at most MAX_TEXT_FILE_BYTES; anything else is one LmcError line."""
    if not path.exists():
        raise LmcError(f"text file not found: {path}: check the path given to {flag}")
    if not path.is_file():
        raise LmcError(f"{path} is not a regular file (a folder, a device or a pipe): pass a .txt, .jsonl or "
                       f".parquet file to {flag}")
    _check_size(path, path.stat().st_size)


def _check_size(path: Path, size: int) -> None:
    if size > MAX_TEXT_FILE_BYTES:
        raise LmcError(f"{path} holds {size} bytes of text; lmc reads at most {MAX_TEXT_FILE_BYTES} "
                       f"({MAX_TEXT_FILE_BYTES >> 20} MiB): pass the part of it you need")


def _read_bounded(path: Path) -> str:
    """The file's UTF-8 text with universal newlines (as read_text), never more than MAX_TEXT_FILE_BYTES read (a
    file that grew after the check is refused). A leading byte-order mark (Windows editors write one) is not text
    and is dropped ("utf-8-sig"): a .jsonl starting with one was refused as invalid JSON, a .txt kept U+FEFF."""
    data = read_capped(path, MAX_TEXT_FILE_BYTES)
    _check_size(path, len(data))
    return data.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")


def _jsonl_rows(path: Path, text: str) -> list[str]:
    rows = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            raise LmcError(f"{path}:{lineno}: not valid JSON ({reason}): "
                           f"write one JSON object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise LmcError(f"{path}:{lineno}: no string field 'text': "
                           f'write one {{"text": "..."}} object per line')
        try:  # JSON's \ud800 escapes decode to lone surrogates, which are not text (UTF-8 cannot hold them)
            record["text"].encode("utf-8")
        except UnicodeEncodeError as exc:
            raise LmcError(f"{path}:{lineno}: the 'text' field holds an unpaired surrogate escape "
                           f"(\\u{ord(exc.object[exc.start]):04x}), which is not Unicode text: fix or drop that line") from None
        rows.append(record["text"])
    return rows


def _parquet_rows(path: Path) -> list[str]:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise LmcError("reading .parquet needs pyarrow: pip install pyarrow "
                       "(or pass a .txt/.jsonl file)") from exc
    try:
        meta = pq.ParquetFile(path).metadata
        schema = meta.schema.to_arrow_schema()
        if "text" not in schema.names:
            raise LmcError(f"{path} has no 'text' column (columns: {', '.join(schema.names)}): "
                           f"rename the text column to 'text'")
        kind = schema.field("text").type
        if not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind)):
            raise LmcError(f"{path}'s 'text' column holds {kind}, not strings: store the text as a string column")
        _check_size(path, 2 * meta.num_rows)  # the rows are joined with "\n\n"
        column = pq.read_table(path, columns=["text"], read_dictionary=["text"]).column("text")
        _check_size(path, _decoded_bytes(column))  # a value repeated through the dictionary counts every time
        rows = column.cast(pyarrow.string()).to_pylist()
    except (pyarrow.ArrowException, OSError) as exc:
        raise LmcError(f"{path} is not a readable parquet file of text ({type(exc).__name__}: {str(exc)[:120]}): "
                       f"pass a .parquet file with a string column 'text', or a .txt/.jsonl file") from None
    return [row for row in rows if row is not None]


def _decoded_bytes(column) -> int:
    """Bytes a dictionary-encoded string column holds once decoded (computed on the dictionary and the indices:
    a few bytes of file can repeat one long value a million times)."""
    import pyarrow.compute as pc

    total = 0
    for chunk in column.chunks:
        lengths = pc.binary_length(chunk.dictionary).take(chunk.indices)
        total += pc.sum(lengths).as_py() or 0
    return total


def _loaded(text: str, source: str) -> LoadedText:
    if not text.strip():
        raise LmcError(f"the text from {source} is empty: use a file or dataset with text in it")
    return LoadedText(text=text, source=source, sha256=hashlib.sha256(text.encode("utf-8")).hexdigest())


def _data_dir():
    return importlib.resources.files("lmc.calib").joinpath("data")
