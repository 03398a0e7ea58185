"""`lmc bench`: serving throughput and latency, as LMDeploy's profile_throughput and vLLM's bench serving.

C concurrent clients (coroutines on one asyncio loop) take the next of N requests, stream it, and
record when each token arrived. Against a workspace the requests go to the engine's public API
on its background thread; against a URL they go to the OpenAI-compatible server. Every request
ignores EOS and generates exactly its output length, so runs compare like for like.

The `random` dataset draws prompt and output lengths uniformly in [L * (1 - R), L * (1 + R)] (vLLM's
`--random-range-ratio`) around ShareGPT's means (224 prompt and 200 completion tokens per request
in LMDeploy's published 10,000-request run); prompt tokens are random ids of the model's vocabulary
(against a URL, of the vocabulary size the server reports, else ids below 1000).
A ShareGPT JSON file gives real prompts: the first human turn, with the first reply's token count
as the output length (vLLM's sampling: pairs shorter than 4 or longer than 1024/2048 tokens dropped).
"""
from __future__ import annotations

import asyncio
import json
import random
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmc.errors import LmcError, one_line

SHAREGPT_PROMPT_MEAN, SHAREGPT_OUTPUT_MEAN = 224, 200


@dataclass
class BenchRequest:
    prompt_ids: list[int]
    output_len: int


@dataclass
class RequestTiming:
    prompt_tokens: int
    start: float
    token_times: list[float] = field(default_factory=list)  # arrival time of each output chunk's tokens
    tokens: int = 0
    ok: bool = True
    error: str | None = None  # why it failed, when it did


def random_requests(n: int, input_len: int, output_len: int, range_ratio: float, vocab: list[int],
                    seed: int) -> list[BenchRequest]:
    rng = random.Random(seed)

    def length(mean: int) -> int:
        return max(1, rng.randint(int(mean * (1 - range_ratio)), int(mean * (1 + range_ratio))))

    lengths = [(length(input_len), length(output_len)) for _ in range(n)]  # first: the same for any vocabulary
    return [BenchRequest([rng.choice(vocab) for _ in range(p)], o) for p, o in lengths]


def sharegpt_requests(path: Path, n: int, encode, seed: int) -> list[BenchRequest]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise LmcError(f"--dataset {path}: not a readable ShareGPT JSON file ({type(e).__name__}: {e})"[:500]) from None
    if not isinstance(data, list):
        raise LmcError(f"--dataset {path}: a ShareGPT file is a JSON list of {{\"conversations\": [...]}} objects, "
                       f"its top level is {type(data).__name__}")

    def turn(t) -> str | None:
        return t["value"] if isinstance(t, dict) and isinstance(t.get("value"), str) else None

    pairs = [(turn(c[0]), turn(c[1])) for d in data if isinstance(d, dict)
             for c in [d.get("conversations")] if isinstance(c, list) and len(c) >= 2]
    pairs = [p for p in pairs if None not in p]  # turns without a string "value" are skipped, as short ones are
    random.Random(seed).shuffle(pairs)
    out = []
    for first, second in pairs:
        prompt, reply = encode(first), encode(second)
        if len(prompt) < 4 or len(reply) < 4 or len(prompt) > 1024 or len(prompt) + len(reply) > 2048:
            continue
        out.append(BenchRequest(prompt, len(reply)))
        if len(out) == n:
            return out
    raise LmcError(f"--dataset {path} has {len(out)} usable conversations, fewer than --num-prompts {n}")


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    ordered = sorted(values)

    def pct(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))], 3)

    return {"mean": round(statistics.fmean(ordered), 3), "p50": pct(50), "p90": pct(90), "p99": pct(99)}


def summarize(timings: list[RequestTiming], duration: float) -> dict:
    done = [t for t in timings if t.ok and t.token_times]
    ttft = [(t.token_times[0] - t.start) * 1e3 for t in done]
    tpot = [(t.token_times[-1] - t.token_times[0]) * 1e3 / (t.tokens - 1) for t in done if t.tokens > 1]
    itl = [(b - a) * 1e3 for t in done for a, b in zip(t.token_times, t.token_times[1:])]
    prompt_tokens = sum(t.prompt_tokens for t in done)
    completion_tokens = sum(t.tokens for t in done)
    return {"completed": len(done), "failed": len(timings) - len(done), "duration_s": round(duration, 3),
            "request_throughput": round(len(done) / duration, 3),
            "output_throughput": round(completion_tokens / duration, 2),
            "total_token_throughput": round((prompt_tokens + completion_tokens) / duration, 2),
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "ttft_ms": _percentiles(ttft), "tpot_ms": _percentiles(tpot), "itl_ms": _percentiles(itl)}


async def _run(requests: list[BenchRequest], concurrency: int, send, progress) -> tuple[list[RequestTiming], float]:
    """send(request, timing) streams one request, filling timing. Returns the timings and the wall time."""
    timings: list[RequestTiming | None] = [None] * len(requests)
    next_index = iter(range(len(requests)))

    async def client():
        for i in next_index:
            timing = RequestTiming(len(requests[i].prompt_ids), time.perf_counter())
            try:
                await send(requests[i], timing)
            except Exception as e:  # a failed request is counted, the run goes on
                timing.ok, timing.error = False, one_line(e) or type(e).__name__
            timings[i] = timing
            progress(1)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return timings, time.perf_counter() - start


def engine_sender(engine):
    from lmc.runtime.sampling import GenerationConfig

    async def send(req: BenchRequest, timing: RequestTiming) -> None:
        gen = GenerationConfig(max_new_tokens=req.output_len, ignore_eos=True)
        async for out in engine.add_request(req.prompt_ids, gen):
            if out.token_ids:
                timing.token_times.append(time.perf_counter())
                timing.tokens += len(out.token_ids)
            if out.finish_reason == "abort":
                timing.ok, timing.error = False, "the engine aborted it"

    return send


def server_vocab(card: dict) -> range:
    """The token ids random prompts draw from against a server: 10 up to the vocab_size its model card reports
    (lmc serve does), else up to 1000."""
    size = card.get("vocab_size")
    if size is None:
        return range(10, 1000)
    if not isinstance(size, int) or isinstance(size, bool) or not 10 < size <= 1 << 31:
        raise LmcError(f"the server's /v1/models gives vocab_size {str(size)[:40]!r}, not a vocabulary size "
                       "(an integer from 11 to 2**31); is it an OpenAI-compatible server?")
    return range(10, size)


async def _on_daemon_thread(fn, *args) -> None:
    """await fn(*args) run on a daemon thread of its own: Ctrl-C ends the run at once, where an executor's
    threads would hold the exit until their blocked reads return."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if not done.done():
            done.set_exception(error) if error else done.set_result(None)

    def work() -> None:
        error = None
        try:
            fn(*args)
        except Exception as e:
            error = e
        try:
            loop.call_soon_threadsafe(settle, error)
        except RuntimeError:  # the loop is closed: the run was interrupted
            pass

    threading.Thread(target=work, daemon=True).start()
    await done


def url_sender(client, model: str, concurrency: int):
    """Requests to an OpenAI-compatible server's /v1/completions (token-id prompts, EOS ignored, greedy), each
    streamed on a daemon thread of its own (at most `concurrency` at once, as there are as many clients);
    tokens are counted from the usage the server reports at the end."""
    path = "/v1/completions"

    def blocking(req: BenchRequest, timing: RequestTiming) -> None:
        body = {"model": model, "prompt": req.prompt_ids, "max_tokens": req.output_len, "ignore_eos": True,
                "temperature": 0, "stream_options": {"include_usage": True}}
        for event in client.stream(path, body):  # at most stream_line_limit(body) lines
            if any(c.get("text") for c in client.choices(event, path)):
                timing.token_times.append(time.perf_counter())
            usage = event.get("usage")
            if usage:
                tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
                if not isinstance(tokens, int):
                    raise LmcError(f"{client.url}{path} sent a usage without completion_tokens ({str(usage)[:80]})")
                timing.tokens = tokens
        if timing.tokens != req.output_len:
            raise LmcError(f"the server reported {timing.tokens} completion tokens for max_tokens {req.output_len} "
                           "(it must ignore EOS and report usage with stream_options.include_usage)")

    async def send(req: BenchRequest, timing: RequestTiming) -> None:
        await _on_daemon_thread(blocking, req, timing)

    return send


def run_bench(requests: list[BenchRequest], concurrency: int, send, show_progress: bool) -> dict:
    """The summary of a run; an LmcError, with the first failure's reason, when no request completed."""
    from tqdm import tqdm

    bar = tqdm(total=len(requests), desc="bench", unit="req", disable=not show_progress)
    timings, duration = asyncio.run(_run(requests, concurrency, send, bar.update))
    bar.close()
    failed = [t for t in timings if not (t.ok and t.token_times)]
    if requests and len(failed) == len(requests):
        why = next((t.error for t in failed if t.error), "no request produced a token")
        raise LmcError(f"none of the {len(requests)} requests completed; the first failure: {why}")
    return summarize(timings, duration)


def table(result: dict) -> str:
    lines = [f"{'completed':<26}{result['completed']} (failed {result['failed']})",
             f"{'duration':<26}{result['duration_s']:.2f} s",
             f"{'request throughput':<26}{result['request_throughput']:.2f} req/s",
             f"{'output token throughput':<26}{result['output_throughput']:.1f} tok/s",
             f"{'total token throughput':<26}{result['total_token_throughput']:.1f} tok/s",
             f"{'prompt / completion':<26}{result['prompt_tokens']} / {result['completion_tokens']} tokens",
             f"{'':<26}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}"]
    for key, label in (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("itl_ms", "ITL (ms)")):
        row = result[key]
        lines.append(f"{label:<26}" + "".join(f"{'-' if row[k] is None else row[k]:>10}" for k in ("mean", "p50", "p90", "p99")))
    return "\n".join(lines)
