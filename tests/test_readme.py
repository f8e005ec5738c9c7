"""Every fenced example of README.md runs as printed, in order, in one working directory (issue 22).

What the test changes, and nothing else:
- every `eptkit train` command trains 2 steps (`--max-steps N` becomes `--max-steps 2`, or is added),
  so the examples take seconds here instead of the minutes they take as printed;
- `eptkit` is this interpreter's `python -m eptkit.cli` (a shell function), with this checkout's sources;
- port 8000 becomes a free port; a block that is one `eptkit serve` command runs in the background
  while the next block (its requests) runs;
- `mine.csv`, the file the README calls the user's own, is written here (SST-2 rows as review/stars);
- a block after `<!-- doc-test: skip (why) -->` is not run; it must say why.
The working directory holds `recipes/` (a link) and sees the data as `../shared/data`, as a checkout does.
No block may print a traceback or transformers' LOAD REPORT.
"""

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import data_dir

ROOT = Path(__file__).resolve().parents[1]
DATA = data_dir()
SKIP = re.compile(r"<!-- doc-test: skip \((.+)\) -->\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")


def readme_blocks(text: str) -> list[dict]:
    """The fenced blocks of README.md: {"lang", "code", "skip" (the reason or None), "line"}."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m and m.group(1):
            start = i
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            before = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
            skip = SKIP.match(before)
            blocks.append({"lang": m.group(1), "code": "\n".join(lines[start + 1:j]) + "\n",
                           "skip": skip.group(1) if skip else None, "line": start + 1})
            i = j
        i += 1
    return blocks


def shortened(code: str, port: int) -> str:
    """The block with 2 training steps per `eptkit train` and the free port (see the module docstring)."""
    code = code.replace("\\\n", " ")  # one command per line
    out = []
    for line in code.splitlines():
        if line.lstrip().startswith("eptkit train"):
            comment = ""
            if " #" in line:
                line, comment = line.split(" #", 1)
                comment = " #" + comment
            line = re.sub(r"--max-steps \d+", "--max-steps 2", line) if "--max-steps" in line else \
                line.rstrip() + " --max-steps 2"
            line += comment
        out.append(re.sub(r"(?<=:)8000\b|(?<=--port )8000\b", str(port), line))
    return "\n".join(out) + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_users_file(path: Path) -> None:
    with open(DATA / "glue" / "SST-2" / "train.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))[:120]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "stars"])
        w.writerows([r["sentence"], "5" if r["label"] == "1" else "1"] for r in rows)


def json_values(text: str) -> list:
    """Every JSON value in `text` (curl prints them one after another, without newlines)."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return values
        value, i = decoder.raw_decode(text, i)
        values.append(value)


BLOCKS = readme_blocks((ROOT / "README.md").read_text())


def test_every_block_runs_or_says_why_not():
    assert len(BLOCKS) >= 8
    for block in BLOCKS:
        assert block["lang"] in ("bash", "python", "json"), block
        assert block["skip"] is None or len(block["skip"]) > 10, block


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "glue" / "SST-2" / "train.tsv").is_file(), reason=f"data folder {DATA} not found")
def test_readme_examples_run_as_printed(tmp_path):
    work = tmp_path / "checkout"
    work.mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(DATA)
    (work / "recipes").symlink_to(ROOT / "recipes")
    write_users_file(work / "mine.csv")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("EPTKIT_DEBUG", None)
    prelude = f'set -euo pipefail\neptkit() {{ "{sys.executable}" -m eptkit.cli "$@"; }}\n'
    port, server = free_port(), None
    try:
        for n, block in enumerate(BLOCKS):
            if block["skip"] or block["lang"] == "json":
                continue
            code = shortened(block["code"], port)
            where = f"README.md line {block['line']}"
            if block["lang"] == "python":
                script = work / f"block{n}.py"
                script.write_text(code)
                proc = subprocess.run([sys.executable, str(script)], cwd=work, env=env, capture_output=True,
                                      text=True, timeout=900)
            elif code.strip().startswith("eptkit serve") and len(code.strip().splitlines()) == 1:
                command = code.strip().replace("eptkit", f"'{sys.executable}' -m eptkit.cli", 1)
                server = subprocess.Popen(["bash", "-c", "exec " + command], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True, start_new_session=True)
                wait_for(server, port, where)
                continue
            else:
                proc = subprocess.run(["bash", "-c", prelude + code], cwd=work, env=env, capture_output=True,
                                      text=True, timeout=1800)
            output = proc.stdout + proc.stderr
            assert proc.returncode == 0, f"{where}: exit {proc.returncode}\n{output[-4000:]}"
            assert "Traceback" not in output and "LOAD REPORT" not in output, f"{where}:\n{output[-4000:]}"
            check_output(block["code"], proc.stdout, where)
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)


def wait_for(server, port: int, where: str) -> None:
    deadline = time.time() + 300
    while time.time() < deadline:
        assert server.poll() is None, f"{where}: the server stopped:\n{server.stdout.read()[-4000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{where}: the server did not answer within 300 s")


def check_output(code: str, stdout: str, where: str) -> None:
    """What the README says a block prints, where it says it: predictions of known label names."""
    if code.startswith("curl"):
        values = json_values(stdout)
        assert values and not any("error" in v for v in values if isinstance(v, dict)), f"{where}: {stdout}"
        assert values[0]["predictions"] and set(values[0]["predictions"]) <= {"negative", "positive"}
    if "adapter_names=" in code:  # the mixed batch prints one label name per row
        printed = [ln for ln in stdout.splitlines() if ln.startswith("[")][-1]
        labels = json.loads(printed.replace("'", '"'))
        assert len(labels) == 4 and set(labels) <= {"negative", "positive"}, f"{where}: {stdout}"
