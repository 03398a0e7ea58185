"""Temporary: find where tp=2 on CUDA stops (run with PYTHONFAULTHANDLER=1)."""
import sys, time
from pathlib import Path
import torch
sys.path.insert(0, "bench")
from bench_decode import TINY, random_hf_model, wordlevel_tokenizer
from lmc.compiler.convert import convert
from lmc.runtime.config import EngineConfig
from lmc.runtime.engine import Engine
from lmc.runtime.sampling import GenerationConfig

if __name__ == "__main__":
    graphs = sys.argv[1] == "graph"
    work = Path("/tmp/tpdbg")
    if not (work / "tp2" / "lmc.json").is_file():
        model, _ = random_hf_model(TINY, "cpu", torch.float16)
        model.save_pretrained(work / "hf")
        for n, d in wordlevel_tokenizer(TINY["vocab_size"], 2).items():
            (work / "hf" / n).write_bytes(d)
        convert(work / "hf", work / "tp1"); convert(work / "hf", work / "tp2", tp=2)
    t0 = time.time()
    for ws in ("tp1", "tp2"):
        e = Engine(str(work / ws), EngineConfig(device="cuda", cuda_graph=graphs, cache_max_entry_count=0.05, max_batch_size=4))
        print(ws, "engine up", time.time() - t0, flush=True)
        r = e.generate([[5, 6, 7], [8, 9]], GenerationConfig(max_new_tokens=8, ignore_eos=True))
        print(ws, "tokens", [x.token_ids for x in r], time.time() - t0, flush=True)
        e.close()
        print(ws, "closed", flush=True)
