"""Load test of `eptkit serve` (issue 13): mixed-adapter batches against one request at a time.

    python benchmarks/serve_load.py [--clients 16] [--requests 600] [--duration 35] [--rows 1]
                                    [--max-tokens 128] [--workload pairs|short] [--data-dir ../shared/data]
                                    [--output benchmarks/results/serve_cpu.md]

Four adapters on the bundled MiniLM (`--workload pairs`: EPT on RTE, DePT on MRPC, PT on CoLA, PT on
RTE; `short`: SST-2 and CoLA only: different tasks and customers on one backbone; each trained for a
step or so, since what is measured is serving, not accuracy) are served by one `eptkit serve` process on a free loopback port, twice:

- batched: the defaults (5 ms window, up to 64 rows per forward, adapters mixed in one batch);
- one at a time: `--max-batch-size 1`, each request its own forward pass (dynamic batching off).

Each time, --clients threads (persistent HTTP/1.1 connections) send requests back to back, each for a
random adapter with --rows rows drawn from that task's test split, until --requests are answered or
--duration seconds pass (after a warm-up). Reported: throughput (requests/s), p50 and p99 latency, the
speed-up, and that every answer equals what `eptkit predict` (`eptkit.runs.predict_file`) writes for
the same rows. The server runs with one torch thread, so the clients' process does not starve it on
small machines. Target: >= 2x throughput at equal or better p99, 16 clients, CPU.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from eptkit.backbones import bundled_model_path
from eptkit.config import DePTConfig, EPTConfig, PromptTuningConfig, TrainConfig
from eptkit.files import atomic_write_json, atomic_write_lines
from eptkit.runs import load_trained, predict_file
from eptkit.tasks.loading import load_task
from eptkit.tasks.registry import get_task
from eptkit.train import train

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = {  # sentence pairs of RTE/MRPC (median 53 tokens) with short CoLA sentences; or short texts only
    "pairs": {"rte-ept": ("rte", EPTConfig(prompt_length=20, rank=8, offset_length=128)),
              "mrpc-dept": ("mrpc", DePTConfig(prompt_length=20, rank=8, offset_length=128)),
              "cola-pt": ("cola", PromptTuningConfig(prompt_length=20)),
              "rte-pt": ("rte", PromptTuningConfig(prompt_length=10))},
    "short": {"sst2-ept": ("sst2", EPTConfig(prompt_length=20, rank=8, offset_length=128)),
              "cola-dept": ("cola", DePTConfig(prompt_length=20, rank=8, offset_length=128)),
              "cola-pt": ("cola", PromptTuningConfig(prompt_length=20)),
              "sst2-pt": ("sst2", PromptTuningConfig(prompt_length=10))}}
MODES = {"batched": [], "one at a time": ["--max-batch-size", "1"]}


def make_adapters(root: Path, data_dir: Path, steps: int, max_tokens: int = 128,
                  workload: str = "pairs") -> tuple[dict, dict]:
    """Train the adapters briefly; ({name: dir}, {name: request rows of its task's test split})."""
    from eptkit.backbones import load_backbone
    from eptkit.model import get_prompted_model

    dirs, rows = {}, {}
    for name, (task, config) in WORKLOADS[workload].items():
        data = load_task(task, data_dir)
        backbone, tok = load_backbone(bundled_model_path(), "classification", get_task(task))
        model = get_prompted_model(backbone, config, tokenizer=tok)
        cfg = TrainConfig(output_dir=str(root / name), max_steps=steps, eval_steps=0, save_steps=0, batch_size=8,
                          max_eval_samples=16, max_length=128, overwrite=True, seed=0)
        train(model, tok, task, data, cfg, run_info={"backbone": bundled_model_path()})
        dirs[name] = root / name
        spec, test = get_task(task), data["test"]
        # The server refuses rows over max_length (eptkit predict would truncate them): send rows that fit.
        fitting = (r for r in test if len(tok(*spec.segments(r))["input_ids"]) <= max_tokens)
        rows[name] = [{f: r[f] for f in spec.text_fields} for r, _ in zip(fitting, range(64))]
    return dirs, rows


def expected_answers(dirs: dict, rows: dict, tmp: Path) -> dict:
    """{adapter: [prediction per row]} from `eptkit predict`'s own code path, one adapter alone."""
    out = {}
    for name, path in dirs.items():
        file = tmp / f"{name}.jsonl"
        file.write_text("".join(json.dumps(r) + "\n" for r in rows[name]))
        out[name] = [r["prediction"] for r in predict_file(*load_trained(path), file)]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(dirs: dict, extra: list[str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "eptkit.cli", "serve", "--port", str(port), "--log-level", "warning", *extra]
    for name, path in dirs.items():
        cmd += ["--adapter", f"{name}={path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"eptkit serve exited: {proc.stderr.read()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("eptkit serve did not answer /health within 180 s")


def load(port: int, rows: dict, expected: dict, args) -> dict:
    """--clients threads sending requests back to back; latencies of the answered ones after warm-up."""
    names = sorted(rows)
    latencies, wrong, errors, lock = [], 0, [], threading.Lock()
    budget = {"left": args.requests + args.warmup}
    stop_at = time.monotonic() + args.duration

    def client(seed: int):
        nonlocal wrong
        rng = random.Random(seed)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.monotonic() < stop_at:
            with lock:
                if budget["left"] <= 0:
                    return
                budget["left"] -= 1
                warm = budget["left"] >= args.requests
            name = rng.choice(names)
            picks = [rng.randrange(len(rows[name])) for _ in range(args.rows)]
            body = json.dumps({"adapter": name, "rows": [rows[name][i] for i in picks]})
            t0 = time.perf_counter()
            conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            answer = json.loads(response.read())
            elapsed = time.perf_counter() - t0
            with lock:
                if response.status != 200:
                    errors.append(answer)
                    continue
                wrong += answer["predictions"] != [expected[name][i] for i in picks]
                if not warm:
                    latencies.append((time.perf_counter(), elapsed))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    ends = sorted(end for end, _ in latencies)
    starts = sorted(end - lat for end, lat in latencies)
    span = ends[-1] - starts[0]
    lat = sorted(x for _, x in latencies)
    return {"requests": len(lat), "seconds": round(span, 2), "throughput_rps": round(len(lat) / span, 2),
            "p50_ms": round(1000 * statistics.median(lat), 1),
            "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1), "wrong_answers": wrong}


def health(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/health")
    return json.loads(conn.getresponse().read())


def run(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dirs, rows = make_adapters(tmp, Path(args.data_dir), args.train_steps, args.max_tokens, args.workload)
        expected = expected_answers(dirs, rows, tmp)
        results = {}
        for mode, extra in MODES.items():
            proc, port = start_server(dirs, extra)
            try:
                results[mode] = load(port, rows, expected, args)
                stats = health(port)
                results[mode]["rows_per_batch"] = round(stats["rows"] / max(stats["batches"], 1), 2)
            finally:
                proc.terminate()
                proc.wait(30)
    batched, alone = results["batched"], results["one at a time"]
    return {"results": results, "speedup": round(batched["throughput_rps"] / alone["throughput_rps"], 2),
            "p99_ratio": round(batched["p99_ms"] / alone["p99_ms"], 2),
            "target": ">= 2x throughput at equal or better p99", "adapters": list(WORKLOADS[args.workload]),
            "settings": {k: v for k, v in vars(args).items() if k != "output"},
            "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version(),
                        "server_torch_threads": 1},
            "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write(result: dict, output: Path) -> None:
    r = result["results"]
    lines = ["# `eptkit serve` load test (CPU)", "",
             f"Command: `{result['command']}`; {result['date']}; {result['machine']['cpus']} CPUs, load average "
             f"{', '.join(f'{x:.2f}' for x in result['machine']['load_average'])} at the end (other jobs running). "
             f"Bundled all-MiniLM-L6-v2, workload {result['settings']['workload']!r}: four adapters "
             f"({', '.join(result['adapters'])}), server with one torch "
             f"thread, {result['settings']['clients']} clients, {result['settings']['rows']} row(s) per request, "
             f"test rows of at most {result['settings']['max_tokens']} tokens.", "",
             "| mode | requests | throughput (req/s) | p50 (ms) | p99 (ms) | rows per batch | answers != eptkit predict |",
             "|---|---|---|---|---|---|---|"]
    for mode, m in r.items():
        lines.append(f"| {mode} | {m['requests']} | {m['throughput_rps']} | {m['p50_ms']} | {m['p99_ms']} | "
                     f"{m['rows_per_batch']} | {m['wrong_answers']} |")
    met = result["speedup"] >= 2 and result["p99_ratio"] <= 1
    lines += ["", f"Speed-up (throughput batched / one at a time): **{result['speedup']}x**; p99 batched / one at a "
                  f"time: {result['p99_ratio']}. Target ({result['target']}): **{'met' if met else 'not met'}**.", ""]
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_lines(output, lines)
    atomic_write_json(output.with_suffix(".json"), result)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=600, help="Answered requests per mode (after the warm-up).")
    p.add_argument("--warmup", type=int, default=48, help="Requests per mode not timed.")
    p.add_argument("--duration", type=float, default=35, help="Most seconds per mode.")
    p.add_argument("--rows", type=int, default=1, help="Rows per request.")
    p.add_argument("--train-steps", type=int, default=1, help="Training steps per adapter.")
    p.add_argument("--max-tokens", type=int, default=128, help="Send test rows of at most this many tokens.")
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="pairs",
                   help="pairs: RTE/MRPC sentence pairs and CoLA; short: SST-2 and CoLA sentences only.")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "serve_cpu.md"))
    args = p.parse_args(argv)
    result = run(args)
    write(result, Path(args.output))
    print(json.dumps({k: result[k] for k in ("results", "speedup", "p99_ratio")}, indent=2))


if __name__ == "__main__":
    main()
