"""Calibration text (bundled, hub fallback, local files) and token windows."""
import hashlib
import os
import random
import struct
import subprocess
import sys
import types

import numpy as np
import pytest

from lmc.calib import text as calib_text
from lmc.calib.text import load_text
from lmc.calib.windows import eval_windows, sample_windows, windows_sha256
from lmc.errors import LmcError

# sha256 and sizes of the original files, from shared/data/README.md
README = {
    "ptb.train.txt.xz": (5101618, "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf"),
    "ptb.valid.txt.xz": (399782, "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"),
    "ptb.test.txt.xz": (449945, "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"),
    "wikitext2.test.txt.xz": (1290590, "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"),
}


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ---- bundled text -------------------------------------------------------------------------

@pytest.mark.parametrize("filename", sorted(README))
def test_bundled_text_matches_readme_sha256(filename):
    size, sha = README[filename]
    raw = calib_text.read_bundled(filename).encode("utf-8")
    assert len(raw) == size and hashlib.sha256(raw).hexdigest() == sha
    entry = calib_text.bundled_sources()["files"][filename]
    assert entry["bytes"] == size and entry["sha256"] == sha and entry["provenance"]


def test_ptb_offline_uses_bundled_and_lmdeploy_join(offline):
    loaded = load_text("ptb", "train")
    assert loaded.source == "bundled:ptb.train"
    rows = loaded.text.split("\n\n")
    assert len(rows) == 42068  # one row per line of ptb.train.txt
    assert rows[0].startswith("aer banknote berlitz") and rows[0] == rows[0].strip()
    assert rows[-1].endswith("has been less prominent according to mr. <unk>")
    assert loaded.sha256 == hashlib.sha256(loaded.text.encode()).hexdigest()
    assert load_text("ptb", "train", purpose="eval") == loaded  # LMDeploy joins both with "\n\n"


def test_ptb_valid_alias_and_test_split(offline):
    assert load_text("ptb", "valid").source == "bundled:ptb.valid"
    assert load_text("ptb", "validation").text.count("\n\n") == 3369
    assert load_text("ptb", "test").text.count("\n\n") == 3760


def test_wikitext2_offline_join(offline):
    loaded = load_text("wikitext2", "test", purpose="eval")
    assert loaded.source == "bundled:wikitext2.test"
    # hub rows: "", " = Robert Boulter = \n", "", " Robert Boulter is ...\n" joined with "\n\n"
    assert loaded.text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English")
    assert loaded.text.count(" = Robert Boulter = ") == 1


def test_unreachable_hub_without_env_uses_bundled(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(calib_text, "_hub_reachable", lambda: False)
    assert load_text("ptb", "test").source == "bundled:ptb.test"


def _fake_datasets(monkeypatch, load_dataset):
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    monkeypatch.setattr(calib_text, "_hub_mode", lambda: "online")


class _Rows:
    def __init__(self, column, rows):
        self.column, self.rows = column, rows

    def __getitem__(self, index):
        return {self.column: self.rows[index]}


def test_hub_rows_give_the_bundled_string(monkeypatch, offline):
    bundled = load_text("ptb", "test")
    lines = calib_text.read_bundled("ptb.test.txt.xz").split("\n")[:-1]
    calls = []

    def load_dataset(path, data_files=None, split=None):
        calls.append((path, data_files, split))
        return _Rows("sentence", [line.strip() for line in lines])

    _fake_datasets(monkeypatch, load_dataset)
    hub = load_text("ptb", "test")
    assert hub.source == "hub:ptb-text-only/ptb_text_only"
    assert hub.sha256 == bundled.sha256
    assert calls[0][0] == "parquet" and "refs%2Fconvert%2Fparquet" in calls[0][1]["test"]


def test_hub_failure_falls_back_to_bundled(monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("hub went away")

    _fake_datasets(monkeypatch, load_dataset)
    with pytest.warns(UserWarning, match="hub went away"):
        assert load_text("ptb", "test").source == "bundled:ptb.test"


def test_c4_offline_error_says_pass_a_local_file(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path))
    code = ("from lmc.calib.text import load_text\n"
            "from lmc.errors import LmcError\n"
            "try:\n    load_text('c4', 'train')\nexcept LmcError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    message = out.stdout.strip()
    assert out.returncode == 0 and "\n" not in message
    assert "c4" in message and "--calib-dataset PATH" in message


@pytest.mark.parametrize("name,split", [("c4", "train"), ("pileval", "validation"),
                                        ("wikitext2", "train")])
def test_no_hub_and_no_bundled_copy_is_an_error(monkeypatch, name, split):
    monkeypatch.setattr(calib_text, "_hub_mode", lambda: None)
    with pytest.raises(LmcError, match="--calib-dataset PATH"):
        load_text(name, split)


@pytest.mark.parametrize("args,match", [
    (("nosuchset", "train"), "unknown dataset 'nosuchset'"),
    (("/nonexistent/calib.txt", "train"), "not found"),
    (("ptb", "dev"), "no split 'dev'"),
    (("ptb", "train", "train"), "unknown text purpose"),
])
def test_bad_names_are_one_line_errors(args, match):
    with pytest.raises(LmcError, match=match) as info:
        load_text(*args)
    assert "\n" not in str(info.value)


# ---- local files --------------------------------------------------------------------------

def test_local_txt_is_used_as_is(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("line one\n\nline two é\n", encoding="utf-8")
    loaded = load_text(str(path), "train")
    assert loaded.text == "line one\n\nline two é\n" and loaded.source == str(path)
    assert loaded.sha256 == hashlib.sha256("line one\n\nline two é\n".encode()).hexdigest()


def test_a_byte_order_mark_is_not_text(tmp_path):
    """A UTF-8 file saved with a byte-order mark (Notepad's 'UTF-8 with BOM'): the .jsonl was refused as invalid
    JSON on line 1 and the .txt carried U+FEFF into the tokens; the mark is dropped from both, and only at the start."""
    (tmp_path / "b.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "alpha"}\n{"text": "beta"}\n')
    assert load_text(str(tmp_path / "b.jsonl"), "train").text == "alpha\n\nbeta"
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbfone\r\ntwo \xef\xbb\xbf\n")
    assert load_text(str(tmp_path / "b.txt"), "train").text == "one\ntwo \ufeff\n"


def test_local_jsonl_joins_text_fields(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "alpha", "id": 1}\n\n{"text": "beta\\ngamma"}\n', encoding="utf-8")
    assert load_text(str(path), "train").text == "alpha\n\nbeta\ngamma"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(LmcError, match=r"bad.jsonl:2: no string field 'text'"):
        load_text(str(bad), "train")


def test_local_parquet_joins_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["one", "two", "three"]}), path)
    loaded = load_text(str(path), "validation")
    assert loaded.text == "one\n\ntwo\n\nthree" and loaded.source == str(path)
    other = tmp_path / "o.parquet"
    pq.write_table(pa.table({"body": ["x"]}), other)
    with pytest.raises(LmcError, match="no 'text' column"):
        load_text(str(other), "train")


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("  \n", encoding="utf-8")
    with pytest.raises(LmcError, match="empty"):
        load_text(str(path), "train")


# ---- windows ------------------------------------------------------------------------------

def _lmdeploy_starts(n_tokens, n_samples, seqlen, seed):
    """LMDeploy's calib_dataloader: random.seed(seed), then randint(0, n - seqlen) per sample."""
    state = random.getstate()
    try:
        random.seed(seed)
        return [random.randint(0, n_tokens - seqlen) for _ in range(n_samples)]
    finally:
        random.setstate(state)


def test_sample_windows_match_lmdeploy_and_are_in_bounds():
    ids = np.arange(1001, dtype=np.int64)  # token value == its position
    windows = sample_windows(ids, n_samples=37, seqlen=63, seed=7)
    assert windows.shape == (37, 63) and windows.dtype == np.int64
    starts = windows[:, 0]
    assert starts.tolist() == _lmdeploy_starts(1001, 37, 63, 7)
    assert starts.min() >= 0 and starts.max() <= 1001 - 63
    assert np.array_equal(windows, starts[:, None] + np.arange(63))  # consecutive tokens


def test_sample_windows_seeded():
    ids = np.random.default_rng(0).integers(0, 50000, 777)
    a = sample_windows(ids, 9, 31, seed=1)
    assert np.array_equal(a, sample_windows(list(ids), 9, 31, seed=1))
    assert not np.array_equal(a, sample_windows(ids, 9, 31, seed=2))
    assert windows_sha256(a) == windows_sha256(sample_windows(ids, 9, 31, seed=1))
    assert windows_sha256(a) != windows_sha256(sample_windows(ids, 9, 31, seed=2))


def test_sample_windows_length_limits():
    assert sample_windows(np.arange(13), 3, 13, seed=0).tolist() == [list(range(13))] * 3
    with pytest.raises(LmcError, match="fewer than --calib-seqlen"):
        sample_windows(np.arange(12), 3, 13, seed=0)


def test_eval_windows_consecutive_non_overlapping():
    ids = np.arange(103)
    w = eval_windows(ids, 10)
    assert w.shape == (10, 10) and w.dtype == np.int64
    assert np.array_equal(w.reshape(-1), np.arange(100))  # tail of 3 dropped
    assert np.array_equal(eval_windows(ids, 10, max_windows=3), w[:3])
    assert eval_windows(np.arange(10)[None, :], 10).shape == (1, 10)  # a [1, T] batch
    with pytest.raises(LmcError, match="fewer than one window"):
        eval_windows(np.arange(9), 10)


def test_windows_sha256_is_int64_little_endian_bytes():
    w = np.array([[1, 2], [3, 2**40]], dtype=np.int64)
    expected = hashlib.sha256(struct.pack("<4q", 1, 2, 3, 2**40)).hexdigest()
    assert windows_sha256(w) == expected
    assert windows_sha256(np.array([[1, 2]], dtype=np.int32)) == \
        hashlib.sha256(struct.pack("<2q", 1, 2)).hexdigest()


def test_sources_json_lists_every_bundled_file():
    assert sorted(calib_text.bundled_sources()["files"]) == sorted(README)
