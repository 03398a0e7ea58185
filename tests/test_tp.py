"""Tensor parallel at runtime on the CPU: 2 gloo ranks (lmc starts the second as a process) give the greedy
tokens of tp = 1 on every tiny family, float and int4, with the lm_head split over the ranks (vocabulary sizes
that 2 does not divide, tied embeddings) or replicated; the gathered logits are tp = 1's; --tp is checked
against the workspace; a tp = 1 workspace re-splits without its checkpoint."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lmc.compiler.convert import convert
from lmc.compiler.quantize import QuantizeOptions, quantize
from lmc.errors import LmcError
from lmc.format.archs import kv_heads_of_rank, rank_config
from lmc.format.workspace import Workspace, verify_workspace
from lmc.runtime.config import EngineConfig
from lmc.runtime.engine import Engine
from lmc.runtime.sampling import GenerationConfig

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 30, 40, 50, 60, 70, 80, 90, 100, 110]]
GREEDY = GenerationConfig(max_new_tokens=10, ignore_eos=True)


def _tokens(ws, **kw) -> list[list[int]]:
    engine = Engine(str(ws), EngineConfig(device="cpu", cpu_cache_budget_gb=0.05, threads=1, **kw))
    try:
        return [r.token_ids for r in engine.generate(PROMPTS, GREEDY)]
    finally:
        engine.close()


# GQA (6 heads, 2 KV), MHA with tied embeddings, qkv bias with one KV head (replicated on both ranks), q/k norm;
# vocabularies of 417 and 415: rank 1 holds one lm_head row fewer than rank 0 (tied and not)
@pytest.mark.parametrize("case,overrides", [("llama3", {}), ("llama-linear-tied-mha", {}), ("qwen2", {}),
                                            ("qwen3", {"num_key_value_heads": 2}), ("internlm2", {}),
                                            ("llama3", {"vocab_size": 417}), ("qwen2", {"vocab_size": 415})])
def test_tp2_greedy_equals_tp1(case, overrides, checkpoint, tmp_path):
    ckpt = checkpoint(case, **overrides)
    convert(ckpt, tmp_path / "tp1")
    convert(ckpt, tmp_path / "tp2", tp=2)
    assert Workspace(tmp_path / "tp2").tp == 2
    assert _tokens(tmp_path / "tp2") == _tokens(tmp_path / "tp1")


def _logits(ws, gen: GenerationConfig, **kw) -> list[torch.Tensor]:
    """Prefill in chunks of 6 tokens: some forwards sample no row, some a prompt's last token beside decodes."""
    engine = Engine(str(ws), EngineConfig(device="cpu", cpu_cache_budget_gb=0.05, threads=1, max_prefill_token_num=6,
                                          **kw))
    try:
        return [r.logits for r in engine.generate(PROMPTS, gen)]
    finally:
        engine.close()


@pytest.mark.parametrize("case,overrides", [("llama3", {"vocab_size": 417}), ("llama-linear-tied-mha", {})])
def test_split_lm_head_gathers_the_logits_of_tp1(case, overrides, checkpoint, tmp_path):
    """Every generated position's float32 logits (prefill's last token, then decode steps, several sequences in
    a batch) at tp = 2 with the lm_head cut by vocabulary equal tp = 1's in vocabulary order."""
    ckpt = checkpoint(case, **overrides)
    convert(ckpt, tmp_path / "tp1")
    convert(ckpt, tmp_path / "tp2", tp=2)
    gen = GenerationConfig(max_new_tokens=4, ignore_eos=True, output_logits="generation")
    one, two = _logits(tmp_path / "tp1", gen), _logits(tmp_path / "tp2", gen)
    vocab = Workspace(tmp_path / "tp1").config.vocab_size
    for a, b in zip(one, two):
        assert a.shape == b.shape == (4, vocab) and a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        assert torch.equal(b.argmax(-1), a.argmax(-1))


def test_int4_lm_head_split_over_ranks_gives_the_tp1_logits(checkpoint, tmp_path):
    """--lm-head int4 at tp = 2: each rank quantizes its vocabulary rows (codes per row, so the same as the whole
    head's); the gathered logits are tp = 1's with the int4 head, and not the float head's."""
    ckpt = checkpoint("llama3", vocab_size=417)
    convert(ckpt, tmp_path / "tp1")
    convert(ckpt, tmp_path / "tp2", tp=2)
    gen = GenerationConfig(max_new_tokens=4, ignore_eos=True, output_logits="generation")
    one, two = _logits(tmp_path / "tp1", gen, lm_head="int4"), _logits(tmp_path / "tp2", gen, lm_head="int4")
    float_head = _logits(tmp_path / "tp1", gen)
    for a, b, f in zip(one, two, float_head):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(a, f, rtol=1e-4, atol=1e-4)


def _gather_on_rank(rank: int, tp: int, store: str, cases: list, queue) -> None:
    import torch.distributed as dist

    from lmc.runtime.distributed import Shard

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=tp)
    try:
        for vocab, batch in cases:
            shard = Shard(rank, tp, dist.group.WORLD, None, None, store)
            full = torch.arange(batch * vocab, dtype=torch.float16).view(batch, vocab)  # [B, V]: logit = its index
            rows = shard.vocab_rows(vocab)
            got = shard.gather_vocab(full[:, rows.start:rows.stop].contiguous(), vocab)
            if rank == 0:
                queue.put((vocab, batch, got))
            else:
                queue.put((vocab, rank, len(rows), got))
    finally:
        dist.destroy_process_group()


def test_gather_vocab_puts_every_ranks_rows_in_vocabulary_order(tmp_path):
    """3 gloo ranks, float16 logits: V = 9 (3 rows each), 7 (3, 3, 1), 2 (1, 1, 0: the last rank holds none):
    rank 0 gets the whole [B, V] in order in float32, the other ranks None."""
    import multiprocessing

    cases = [(9, 2), (7, 3), (2, 1)]
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gather_on_rank, args=(r, 3, str(tmp_path / "store"), cases, queue), daemon=True)
             for r in range(3)]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=120) for _ in range(3 * len(cases))]
    finally:
        for p in procs:
            p.join(60)
            if p.exitcode is None:
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0, 0]
    leader = sorted(r for r in results if len(r) == 3)
    assert [(v, b) for v, b, _ in leader] == sorted(cases)
    for vocab, batch, got in leader:
        assert got.dtype == torch.float32 and got.is_contiguous()
        assert torch.equal(got, torch.arange(batch * vocab, dtype=torch.float32).view(batch, vocab))
    followers = sorted((v, rank, n, got) for v, rank, n, got in (r for r in results if len(r) == 4))
    assert [(v, rank, n) for v, rank, n, _ in followers] == [(2, 1, 1), (2, 2, 0), (7, 1, 3), (7, 2, 1), (9, 1, 3),
                                                           (9, 2, 3)]
    assert all(got is None for *_, got in followers)


def _graph_decoder_steps(rank: int, tp: int, store: str, workspace: str, queue, steps: int = 4) -> None:
    """Prefill PROMPTS, then greedy decode steps through GraphDecoder.replay_rows (its padded step, eager on the
    CPU: the code a CUDA graph captures) on this rank; rank 0 puts every step's logits [B, V] on the queue.
    Ranks 1.. know the lengths but not the tokens (rank 0 broadcasts them in the forward), as in `follow`."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from lmc.runtime.block_manager import BlockManager
    from lmc.runtime.cuda_graph import GraphDecoder, pack_decode_rows
    from lmc.runtime.distributed import Shard
    from lmc.runtime.kv_cache import PagedKVCache
    from lmc.runtime.model import Model, PagedBatch

    cpu, block = torch.device("cpu"), 16
    shard = None
    if tp > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=tp)
        shard = Shard(rank, tp, dist.group.WORLD, None, None, store)
    try:
        model = Model(Workspace(workspace), cpu, torch.float32, shard)
        blocks = BlockManager(8, block, False)
        engine = SimpleNamespace(model=model, cache=PagedKVCache(model.cfg, 8, block, torch.float32, cpu), shard=shard,
                                 device=cpu, session_len=32, blocks=blocks, config=SimpleNamespace(max_batch_size=4))
        decoder = GraphDecoder(engine)
        tables = [blocks.allocate(2) for _ in PROMPTS]
        ids = torch.tensor([t for p in PROMPTS for t in p] if rank == 0 else [0] * sum(map(len, PROMPTS)))  # [T]
        positions = torch.tensor([i for p in PROMPTS for i in range(len(p))])  # [T]
        slots = torch.tensor([b[i // block] * block + i % block for p, b in zip(PROMPTS, tables) for i in range(len(p))])
        lens = torch.tensor([len(p) for p in PROMPTS], dtype=torch.int32)  # [B]
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0).to(torch.int32)])  # [B+1]
        paged = PagedBatch(engine.cache.k, engine.cache.v, slots, torch.tensor(tables, dtype=torch.int32), lens, cu)
        h = model.hidden(ids, positions, paged, int(lens.max()) - 1)  # [T, H]
        logits = model.logits(h[cu[1:].long() - 1])  # [B, V] on rank 0
        out, lengths = [], [len(p) for p in PROMPTS]
        for _ in range(steps):
            tokens = logits.argmax(-1).tolist() if rank == 0 else [0] * len(PROMPTS)
            lengths = [n + 1 for n in lengths]
            rows = pack_decode_rows(list(zip(tokens, lengths, tables)), 4, decoder.width, block, decoder.scratch_block)
            logits = decoder.replay_rows(4, len(PROMPTS), rows, None).clone()  # [B, V] (bucket 4: a padding row)
            out.append(logits)
        if rank == 0:
            queue.put(out)
    finally:
        if tp > 1:
            dist.destroy_process_group()


def test_graph_decoders_padded_step_gathers_tp1_logits(checkpoint, tmp_path):
    """The CUDA-graph decoder's step (run eagerly on 2 gloo ranks: the same collectives in the same order on both,
    the follower given no tokens) gives tp = 1's logits with the lm_head split (vocabulary 417: uneven)."""
    import multiprocessing
    import queue as queues

    ckpt = checkpoint("llama3", vocab_size=417)
    convert(ckpt, tmp_path / "tp1")
    convert(ckpt, tmp_path / "tp2", tp=2)
    reference: queues.SimpleQueue = queues.SimpleQueue()
    _graph_decoder_steps(0, 1, "", str(tmp_path / "tp1"), reference)
    ctx = multiprocessing.get_context("spawn")
    got = ctx.Queue()
    procs = [ctx.Process(target=_graph_decoder_steps, args=(r, 2, str(tmp_path / "store"), str(tmp_path / "tp2"), got),
                         daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        steps = got.get(timeout=120)  # ranks that run different collectives wait for each other: no result
    finally:
        for p in procs:
            p.join(60)
            if p.exitcode is None:
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    for a, b in zip(reference.get(), steps, strict=True):
        assert b.shape == (len(PROMPTS), 417)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_each_rank_holds_its_share_of_the_lm_head(checkpoint, tmp_path, monkeypatch):
    """Rank 0 holds ceil(V / 2) rows of the lm_head (a view of the mapped file, or of the embedding when tied:
    no copy), the embedding whole; LMC_TP_LM_HEAD=replicated holds it whole and gives the same tokens; a bad
    value is one line before any rank starts."""
    ckpt = checkpoint("llama3", vocab_size=417)
    convert(ckpt, tmp_path / "tp2", tp=2)
    convert(checkpoint("qwen2", vocab_size=415), tmp_path / "tied", tp=2)
    config = EngineConfig(device="cpu", cpu_cache_budget_gb=0.05, threads=1)
    engine = Engine(str(tmp_path / "tp2"), config)
    try:
        assert engine.model.lm_head.shape == (209, 72) and engine.model.embed.shape == (417, 72)
        mapped = engine.workspace.get("0:output.weight")  # [417, 72] float32, the compute dtype on the CPU
        assert engine.model.lm_head.data_ptr() == mapped.data_ptr() and torch.equal(engine.model.lm_head, mapped[:209])
        split = [r.token_ids for r in engine.generate(PROMPTS, GREEDY)]
    finally:
        engine.close()
    tied = Engine(str(tmp_path / "tied"), config)
    try:
        assert tied.model.lm_head.shape == (208, 72) and tied.model.lm_head.data_ptr() == tied.model.embed.data_ptr()
    finally:
        tied.close()
    monkeypatch.setenv("LMC_TP_LM_HEAD", "replicated")
    engine = Engine(str(tmp_path / "tp2"), config)
    try:
        assert engine.model.lm_head.shape == (417, 72) and not engine.model.split_lm_head
        assert [r.token_ids for r in engine.generate(PROMPTS, GREEDY)] == split
    finally:
        engine.close()
    monkeypatch.setenv("LMC_TP_LM_HEAD", "vocab")
    with pytest.raises(LmcError, match="LMC_TP_LM_HEAD='vocab': set it to one of split, replicated"):
        Engine(str(tmp_path / "tp2"), config)


def test_int4_with_a_partial_group_resplit_equals_tp1(checkpoint, tmp_path):
    """hidden 72 with groups of 32: w_qkv and w13 end in a partial group (col-parallel, cut along N); wo and w2
    (row-parallel) get K = 32 and 64 per rank, whole groups. The tp = 1 int4 workspace is cut without the
    checkpoint (`lmc convert WS --tp 2`)."""
    ckpt = checkpoint("llama3", num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128)
    opts = QuantizeOptions(calib_samples=0, w_group_size=32, workspace=True, device="cpu")
    quantize(ckpt, tmp_path / "q1", opts, say=lambda *a: None, warn=lambda *a: None)
    convert(tmp_path / "q1", tmp_path / "q2", tp=2)
    assert verify_workspace(tmp_path / "q2") == []
    ws = Workspace(tmp_path / "q2")
    assert ws.tp == 2 and ws.quantization["group_size"] == 32
    assert ws.get("1:layers.0.attention.w_qkv.1.qweight").shape == (9, 64)  # ceil(72 / 8) rows, (4 + 2 + 2) heads / 2 x 16
    assert _tokens(tmp_path / "q2") == _tokens(tmp_path / "q1")


def test_kv_heads_fewer_than_ranks_are_replicated(checkpoint, tmp_path):
    cfg = Workspace(convert(checkpoint("qwen2"), tmp_path / "w") and tmp_path / "w").config
    assert cfg.num_kv_heads == 1
    assert [kv_heads_of_rank(cfg, 2, r) for r in range(2)] == [range(0, 1), range(0, 1)]
    local = rank_config(cfg, 2)
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size) == (3, 1, 50)


def test_rendezvous_and_channel_are_private_and_gone_after_close(checkpoint, tmp_path):
    """The ranks meet through a store file in a 0700 folder (not a TCP port) and talk through a 0600 /dev/shm file
    that is unlinked once the followers joined; closing the engine removes the folder."""
    import os
    import stat

    convert(checkpoint("llama3"), tmp_path / "tp2", tp=2)
    engine = Engine(str(tmp_path / "tp2"), EngineConfig(device="cpu", cpu_cache_budget_gb=0.05, threads=1))
    try:
        folder = os.path.dirname(engine.shard.store)
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700 and os.stat(folder).st_uid == os.getuid()
        assert not os.path.exists(engine.shard.channel.path)  # unlinked: nothing left behind in /dev/shm
        assert engine.generate([PROMPTS[0]], GREEDY)[0].token_ids  # the followers still hear rank 0
    finally:
        engine.close()
    assert not os.path.exists(folder)


def test_tp_flag_is_checked_against_the_workspace(checkpoint, tmp_path):
    convert(checkpoint("llama3"), tmp_path / "tp2", tp=2)
    with pytest.raises(LmcError, match="split for tp=2: pass --tp 2"):
        Engine(str(tmp_path / "tp2"), EngineConfig(device="cpu", tp=1))
    bad = subprocess.run([sys.executable, "-m", "lmc", "eval", "ppl", str(tmp_path / "tp2"), "--max-windows", "1"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "lmc eval ppl runs one device" in bad.stderr
    with pytest.raises(LmcError, match="re-casting or re-splitting a split workspace"):
        convert(tmp_path / "tp2", tmp_path / "again", tp=1)
    assert not (tmp_path / "again").exists()


def test_generate_and_bench_cli_run_tp2(checkpoint, tmp_path):
    ckpt = checkpoint("llama3")
    convert(ckpt, tmp_path / "tp1")
    convert(ckpt, tmp_path / "tp2", tp=2)
    run = lambda *args: subprocess.run([sys.executable, "-m", "lmc", *args], capture_output=True, text=True, timeout=300)
    outs = [run("generate", str(tmp_path / ws), "hello world", "--max-new-tokens", "8", "--device", "cpu",
                "--temperature", "0", "--json") for ws in ("tp1", "tp2")]
    for o in outs:
        assert o.returncode == 0, o.stderr
    assert json.loads(outs[0].stdout)["token_ids"] == json.loads(outs[1].stdout)["token_ids"]
    bad = run("generate", str(tmp_path / "tp2"), "hi", "--tp", "4", "--device", "cpu")
    assert bad.returncode == 1 and "split for tp=2" in bad.stderr
    benches = [run("bench", str(tmp_path / ws), "--num-prompts", "6", "--concurrency", "3", "--input-len", "12",
                   "--output-len", "6", "--device", "cpu", "--json") for ws in ("tp1", "tp2")]
    results = [json.loads(b.stdout) for b in benches]
    assert all(b.returncode == 0 for b in benches), benches[1].stderr
    assert [(r["completed"], r["failed"]) for r in results] == [(6, 0), (6, 0)]
    assert results[1]["completion_tokens"] == results[0]["completion_tokens"] > 0


def test_tp_weights_are_cut_not_copied(checkpoint, tmp_path):
    """Each rank holds half of every split linear: the two ranks' weight bytes are about half of tp = 1's each,
    plus the replicated embeddings and norms."""
    ckpt = checkpoint("llama3")
    convert(ckpt, tmp_path / "tp1")
    convert(ckpt, tmp_path / "tp2", tp=2)
    one, two = Workspace(tmp_path / "tp1"), Workspace(tmp_path / "tp2")
    split = sum(one.get(n).numel() for n in one.tensor_names() if n.startswith("layers.") and "norm" not in n)
    rank1 = sum(two.get(n).numel() for n in two.tensor_names() if n.startswith("1:layers.") and "norm" not in n)
    assert rank1 == split // 2
    assert torch.equal(two.get("1:tok_embeddings.weight"), one.get("tok_embeddings.weight"))


def test_server_runs_tp2_with_tp1_answers(checkpoint, tmp_path):
    """`lmc serve` of a tp = 2 workspace: concurrent greedy chat completions give tp = 1's text, and SIGTERM
    ends the server and its second rank cleanly."""
    pytest.importorskip("fastapi")
    from concurrent.futures import ThreadPoolExecutor

    from test_serve import Server

    ckpt = checkpoint("qwen2")
    convert(ckpt, tmp_path / "tp1")
    convert(ckpt, tmp_path / "tp2", tp=2)
    answers = {}
    for ws in ("tp1", "tp2"):
        server = Server(tmp_path / ws, tmp_path, "--session-len", "128", "--max-batch-size", "4")
        try:
            with server.client() as client:
                def ask(i):
                    body = {"model": ws, "messages": [{"role": "user", "content": f"question {i}"}], "temperature": 0,
                            "max_tokens": 12, "ignore_eos": True}
                    r = client.post("/v1/chat/completions", json=body)
                    assert r.status_code == 200, r.text
                    return r.json()["choices"][0]["message"]["content"]

                with ThreadPoolExecutor(3) as pool:
                    answers[ws] = list(pool.map(ask, range(3)))
        finally:
            assert server.stop() == 0, server.log()
    assert answers["tp2"] == answers["tp1"] and all(answers["tp1"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("dtype", ["float32", None])
def test_tp2_on_two_gpus_with_cuda_graphs(dtype, checkpoint, tmp_path):
    """NCCL ranks, CUDA-graph decode with the all-reduces captured (every bucket at the warm-up), pipelined
    greedy: tp = 1's tokens (float32 compute; the stored fp16 too on this tiny model)."""
    ckpt = checkpoint("llama3", dtype=torch.float16)
    convert(ckpt, tmp_path / "tp1")
    convert(ckpt, tmp_path / "tp2", tp=2)
    got = {}
    for ws in ("tp1", "tp2"):
        engine = Engine(str(tmp_path / ws), EngineConfig(device="cuda", dtype=dtype, cache_max_entry_count=0.05,
                                                        max_batch_size=4))
        try:
            engine.warmup()  # the followers capture every bucket's graph with rank 0 (runtime/warmup.py)
            assert sorted(engine.decoder.graphs) == engine.decoder.buckets
            got[ws] = [r.token_ids for r in engine.generate(PROMPTS, GREEDY)]
            assert engine.decoder is not None and engine.decoder.graphs, "decode ran without CUDA graphs"
        finally:
            engine.close()
    assert got["tp2"] == got["tp1"]


def _children(pid: int) -> list[int]:
    from pathlib import Path

    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_followers_exit_when_rank0_is_killed(checkpoint, tmp_path):
    """SIGKILL of `lmc serve --tp 2` leaves no rank behind: the follower's wait for the next step fails as the
    leader's sockets close, and it exits."""
    pytest.importorskip("fastapi")
    import os
    import signal
    import time

    from test_serve import Server

    convert(checkpoint("llama3"), tmp_path / "tp2", tp=2)
    server = Server(tmp_path / "tp2", tmp_path, "--session-len", "64")
    try:
        ranks = [p for p in _children(server.proc.pid) if b"spawn_main" in open(f"/proc/{p}/cmdline", "rb").read()]
        assert len(ranks) == 1, "expected one follower process"
    except BaseException:
        server.stop()  # a failed check must not leave the server and its rank running
        raise
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(30)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and os.path.exists(f"/proc/{ranks[0]}") and \
            open(f"/proc/{ranks[0]}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.2)
    alive = os.path.exists(f"/proc/{ranks[0]}") and open(f"/proc/{ranks[0]}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    assert not alive, "the follower outlived its leader"


def test_a_follower_that_dies_before_joining_ends_the_wait(checkpoint, tmp_path):
    """Rank 1 killed while it starts (before it joins the process group): rank 0 says so at once instead of
    waiting out the 10-minute join timeout, and the Engine is not built."""
    import multiprocessing
    import threading
    import time

    convert(checkpoint("llama3"), tmp_path / "tp2", tp=2)
    killed = []

    def kill_the_follower() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not killed:
            for p in multiprocessing.active_children():
                if p.name == "lmc-rank1":
                    p.kill()  # a spawned interpreter needs seconds to import torch: it has not joined yet
                    killed.append(p.name)
            time.sleep(0.01)

    threading.Thread(target=kill_the_follower, daemon=True).start()
    start = time.monotonic()
    with pytest.raises(LmcError, match="tensor-parallel rank 1 exited .* before joining"):
        Engine(str(tmp_path / "tp2"), EngineConfig(device="cpu", cpu_cache_budget_gb=0.05, threads=1))
    assert killed and time.monotonic() - start < 60
    # rank 0 joins only after its followers said they are about to: no thread of the failed start is left inside
    # init_process_group, where it blocked the next tensor-parallel engine of this process for 10 minutes
    assert not [t for t in threading.enumerate() if t.name == "lmc-tp-join"]
    assert [len(t) for t in _tokens(tmp_path / "tp2")] == [10] * len(PROMPTS)  # and the next engine runs


def test_a_bad_allreduce_mode_is_one_line_before_any_rank_starts(checkpoint, tmp_path, monkeypatch):
    import os

    convert(checkpoint("llama3"), tmp_path / "tp2", tp=2)
    monkeypatch.setenv("LMC_TP_ALLREDUCE", "ring")
    with pytest.raises(LmcError, match="LMC_TP_ALLREDUCE='ring': set it to one of one-shot, nccl"):
        Engine(str(tmp_path / "tp2"), EngineConfig(device="cpu"))
    assert not [p for p in _children(os.getpid()) if b"spawn_main" in open(f"/proc/{p}/cmdline", "rb").read()]
