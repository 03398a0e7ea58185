"""What the HTTP server costs: `lmc bench WS` (the engine in-process) against `lmc bench URL` (the same engine behind
`lmc serve`, requests streamed through /v1/completions) on the 8B-shaped fp16 workspace, same requests.

Both sides are the CLI commands a user runs. Each is run twice and the second run kept: the first fills Triton's
kernel cache (shared by the processes on the machine) and, for the server, compiles its prefill shapes. The server
is started with its defaults; the client count (64) is the issue's.

    python bench/bench_http.py --out bench/results/http_vs_engine_h200.json      # on the GPU machine (serve extra)
    python bench/bench_http.py --smoke --out /tmp/http_smoke.json                 # tiny shapes on the CPU
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import LLAMA3_8B, TINY, versions  # noqa: E402
from bench_serving import build  # noqa: E402


def lmc_bench(target: str, args, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "lmc", "bench", target, "--concurrency", str(args.concurrency), "--num-prompts",
           str(args.num_prompts), "--input-len", str(args.input_len), "--output-len", str(args.output_len),
           "--json", *extra]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result = json.loads(out)
    print(f"  {target}: {result['output_throughput']:.1f} out tok/s, TTFT p50 {result['ttft_ms']['p50']} ms, "
          f"TPOT p50 {result['tpot_ms']['p50']} ms", flush=True)
    return {"command": " ".join(cmd[1:]), **result}


def wait_ready(url: str, server: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"lmc serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit("lmc serve did not answer /health in time")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default="/tmp/lmc_bench_serving", help="shared with bench_serving.py's builds")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=512)
    parser.add_argument("--port", type=int, default=23411)
    args = parser.parse_args()
    shape = TINY if args.smoke else LLAMA3_8B
    args.input_len, args.output_len = (16, 8) if args.smoke else (224, 200)
    if args.smoke:
        args.num_prompts, args.concurrency = min(args.num_prompts, 16), min(args.concurrency, 4)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ws = build(shape, Path(args.work), dev, formats=("fp16",))["fp16"]
    device_flag = ["--device", dev]

    runs: dict[str, list[dict]] = {"engine": [], "http": []}
    for _ in range(2):
        runs["engine"].append(lmc_bench(str(ws), args, device_flag))
    url = f"http://127.0.0.1:{args.port}"
    serve_cmd = [sys.executable, "-m", "lmc", "serve", str(ws), "--server-name", "127.0.0.1", "--server-port",
                 str(args.port), *device_flag]
    server = subprocess.Popen(serve_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(url, server)
        for _ in range(2):
            runs["http"].append(lmc_bench(url, args, []))
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    engine, http = runs["engine"][-1], runs["http"][-1]
    ratio = http["output_throughput"] / engine["output_throughput"]
    print(f"http / engine output tok/s: {ratio:.3f}", flush=True)
    result = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "cpu",
        "versions": versions(), "shape": "tiny" if args.smoke else "llama3-8b", "format": "fp16",
        "serve_command": " ".join(serve_cmd[1:]), "runs": runs,
        "http_over_engine_output_throughput": round(ratio, 4),
        "note": "second run of each kept (the first fills the Triton cache)",
        "date": time.strftime("%Y-%m-%d"), "commit": os.environ.get("LMC_COMMIT", ""),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
