"""`eptkit serve` (eptkit.serve, eptkit.adapter_pool): a real server on a free loopback port, in a thread.

Two adapters (EPT and PT, tiny random BERT with MiniLM's tokenizer, synthetic CB) are trained in a few
seconds; what the server answers is compared with `predict_file` (what `eptkit predict` writes) on a
model loaded the usual way, one adapter alone.
"""

import http.client
import json
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import torch

from eptkit import PromptTuningConfig
from eptkit.adapter_pool import AdapterPool
from eptkit.batching import length_groups
from eptkit.cli import main
from eptkit.runs import load_trained, predict_file
from eptkit.serve import RunningServer, ServeConfig, load_pool
from eptkit.tasks.registry import TaskSpec
from eptkit.train import train
from test_train import make_model, quick_config, synthetic_cb, tiny_models  # noqa: F401  (fixture)

ROWS = [{"premise": p, "hypothesis": h} for p, h in zip(synthetic_cb(n_eval=10, seed=3)["test"]["premise"],
                                                        synthetic_cb(n_eval=10, seed=3)["test"]["hypothesis"])]


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):  # noqa: F811
    """{name: output dir} of three tiny runs: EPT and PT on the tiny BERT, PT on a wider BERT."""
    root = tmp_path_factory.mktemp("serve_runs")
    out = {}
    # PT in PEFT's layout beside EPT with the text at its own positions: a mixed batch holds both layouts.
    peft_layout = PromptTuningConfig(prompt_length=4, text_positions="after_prompt")
    for name, method, backbone, cfg in (("ept", "ept", "bert", None), ("pt", "pt", "bert", peft_layout),
                                        ("wide", "pt", "bert48", None)):
        model, tok = make_model(tiny_models[backbone], method, config=cfg)
        train(model, tok, "cb", synthetic_cb(), quick_config(root / name, max_steps=2, eval_steps=2),
              run_info={"backbone": tiny_models[backbone]})
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def expected(runs, tmp_path_factory):
    """What `eptkit predict` writes for ROWS with each adapter alone (an independent path: no server, no mix)."""
    path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return {name: [r["prediction"] for r in predict_file(*load_trained(runs[name]), path)] for name in ("ept", "pt")}


def config(**kw):
    return ServeConfig(port=0, log_level="warning", **kw)


@pytest.fixture(scope="module")
def server(runs):
    with RunningServer(load_pool({"ept": str(runs["ept"]), "pt": str(runs["pt"])}, config()), config()) as s:
        yield s


def call(server, method, path, body=None, raw: bytes | None = None):
    """(status, JSON body) of one request."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_predictions_equal_eptkit_predict(server, expected):
    for name in ("ept", "pt"):
        status, body = call(server, "POST", "/predict", {"adapter": name, "rows": ROWS})
        assert status == 200, body
        assert body == {"predictions": expected[name]}
    assert expected["ept"] != expected["pt"]  # so a row answered by the wrong adapter would show


def test_health_and_the_adapter_list(server, runs):
    status, health = call(server, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["adapters"] == 2
    status, listing = call(server, "GET", "/adapters")
    by_name = {a["name"]: a for a in listing["adapters"]}
    assert sorted(by_name) == ["ept", "pt"]
    assert (by_name["ept"]["method"], by_name["pt"]["method"]) == ("ept", "pt")
    assert by_name["ept"]["task"] == "cb" and by_name["ept"]["fields"] == ["premise", "hypothesis"]
    assert all(a["compiled"] for a in by_name.values())  # folded by default
    from safetensors.torch import load_file

    stored = load_file(str(runs["pt"] / "adapter_model.safetensors"))
    assert by_name["pt"]["parameters"] == sum(t.numel() for t in stored.values())


def _error_cases():
    long_row = {"premise": "word " * 300, "hypothesis": "short"}  # PT here reads up to 256 - 4 tokens
    return {
        "malformed JSON": ("POST", "/predict", None, b'{"adapter": "ept", "rows": [', 400, "malformed JSON"),
        "not an object": ("POST", "/predict", [1, 2], None, 400, "JSON object"),
        "missing rows": ("POST", "/predict", {"adapter": "ept"}, None, 400, "rows"),
        "unknown field": ("POST", "/predict", {"adapter": "ept", "rows": ROWS, "row": 1}, None, 400, "row: unknown"),
        "rows not a list": ("POST", "/predict", {"adapter": "ept", "rows": "text"}, None, 400, "rows"),
        "unknown adapter": ("POST", "/predict", {"adapter": "nope", "rows": ROWS}, None, 404, "'nope'"),
        "missing field": ("POST", "/predict", {"adapter": "ept", "rows": [{"premise": "a"}]}, None, 400,
                          "hypothesis"),
        "row not an object": ("POST", "/predict", {"adapter": "ept", "rows": ["a"]}, None, 400, "rows[0]"),
        "field not text": ("POST", "/predict", {"adapter": "ept", "rows": [{"premise": 1, "hypothesis": "b"}]},
                           None, 400, "'premise'"),
        "too many rows": ("POST", "/predict", {"adapter": "ept", "rows": ROWS * 7}, None, 413, "max_rows=64"),
        "row over max_length": ("POST", "/predict", {"adapter": "pt", "rows": ROWS[:2] + [long_row]}, None, 422,
                                "rows[2]"),
        "unknown route": ("GET", "/nothing", None, None, 404, "/nothing"),
        "wrong method": ("GET", "/predict", None, None, 405, "/predict"),
        "bad adapter name": ("POST", "/adapters", {"name": "a/b", "path": "x"}, None, 400, "'a/b'"),
        "unload unknown": ("DELETE", "/adapters/nope", None, None, 404, "'nope'"),
    }


@pytest.mark.parametrize("case", sorted(_error_cases()))
def test_bad_input_gets_a_4xx_with_a_one_line_json_error(server, case):
    method, path, body, raw, status, needle = _error_cases()[case]
    got, answer = call(server, method, path, body, raw)
    assert got == status, answer
    assert list(answer) == ["error"] and "\n" not in answer["error"] and needle in answer["error"], answer


def test_a_body_over_the_limit_is_refused_from_its_header(server):
    """A 2 MiB body is refused before it is read. The client declares the length and sends none of the
    body: one still sending would race the early answer (a broken pipe on a loaded machine)."""
    url = urllib.parse.urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.putrequest("POST", "/predict")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(2 << 20))
        conn.endheaders()
        response = conn.getresponse()
        answer = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 413 and list(answer) == ["error"] and "max_body_bytes" in answer["error"], answer


def test_a_bad_request_in_a_batch_fails_alone(runs, expected):
    """A row over max_length is found while its batch is encoded; the requests beside it are answered."""
    with RunningServer(load_pool({"ept": str(runs["ept"])}, config()), config(batch_window_ms=300)) as s:
        answers = _concurrently(s, [{"adapter": "ept", "rows": [{"premise": "w " * 80, "hypothesis": "x"}]},
                                    {"adapter": "ept", "rows": ROWS}])
    assert answers[0][0] == 422 and answers[1] == (200, {"predictions": expected["ept"]})


def test_load_and_unload_at_run_time(server, runs, expected, tmp_path):
    status, body = call(server, "POST", "/adapters", {"name": "late", "path": str(runs["ept"])})
    assert status == 201 and body["name"] == "late" and body["method"] == "ept"
    assert call(server, "POST", "/adapters", {"name": "late", "path": str(runs["ept"])})[0] == 409
    assert call(server, "POST", "/predict", {"adapter": "late", "rows": ROWS}) == (200, {"predictions": expected["ept"]})
    assert call(server, "DELETE", "/adapters/late") == (200, {"unloaded": "late"})
    status, body = call(server, "POST", "/predict", {"adapter": "late", "rows": ROWS})
    assert status == 404 and "'late'" in body["error"]
    assert sorted(a["name"] for a in call(server, "GET", "/adapters")[1]["adapters"]) == ["ept", "pt"]


def test_corrupted_or_foreign_adapters_are_refused_at_load(server, runs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(runs["ept"], broken, ignore=shutil.ignore_patterns("checkpoints"))
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    pickled = tmp_path / "dept"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING_LORA"}))
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04 never unpickled")
    cases = {str(broken): "truncated or corrupted", str(runs["wide"]): "backbone",
             str(tmp_path / "none"): "not found", str(pickled): "safetensors only"}
    for path, needle in cases.items():
        status, body = call(server, "POST", "/adapters", {"name": "x", "path": path})
        assert status == 422 and needle in body["error"] and path in body["error"], body
    assert call(server, "GET", "/health")[1]["adapters"] == 2


def test_the_last_adapter_cannot_be_unloaded(runs):
    with RunningServer(load_pool({"pt": str(runs["pt"])}, config()), config()) as s:
        status, body = call(s, "DELETE", "/adapters/pt")
    assert status == 409 and "only adapter" in body["error"]


def _concurrently(server, bodies, path="/predict", method="POST"):
    answers, start = [None] * len(bodies), threading.Barrier(len(bodies))

    def send(i):
        start.wait()
        answers[i] = call(server, method, path, bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def test_concurrent_requests_for_two_adapters_share_one_forward(runs, expected):
    pool = load_pool({"ept": str(runs["ept"]), "pt": str(runs["pt"])}, config())
    forwards = []
    original = pool.model.forward

    def counting(*args, adapter_names=None, **kwargs):
        forwards.append(sorted(set(adapter_names)))
        return original(*args, adapter_names=adapter_names, **kwargs)

    pool.model.forward = counting
    with RunningServer(pool, config(batch_window_ms=500)) as s:
        answers = _concurrently(s, [{"adapter": "ept", "rows": ROWS}, {"adapter": "pt", "rows": ROWS[5:]}])
        stats = call(s, "GET", "/health")[1]
    assert answers == [(200, {"predictions": expected["ept"]}), (200, {"predictions": expected["pt"][5:]})]
    # One batch; its rows go through passes by length (length_groups), at least one holding both adapters.
    lengths = [len(r["input_ids"]) for r in pool.encode("ept", ROWS) + pool.encode("pt", ROWS[5:])]
    assert ["ept", "pt"] in forwards and len(forwards) == len(length_groups(lengths)) < len(lengths)
    assert (stats["requests"], stats["batches"], stats["rows"]) == (2, 1, len(ROWS) + len(ROWS[5:]))


def test_max_batch_size_1_serves_each_request_alone(runs, expected):
    pool = load_pool({"ept": str(runs["ept"]), "pt": str(runs["pt"])}, config())
    with RunningServer(pool, config(batch_window_ms=200, max_batch_size=1)) as s:
        answers = _concurrently(s, [{"adapter": "ept", "rows": ROWS}, {"adapter": "pt", "rows": ROWS}])
        assert call(s, "GET", "/health")[1]["batches"] == 2
    assert answers == [(200, {"predictions": expected["ept"]}), (200, {"predictions": expected["pt"]})]


def test_a_request_in_flight_survives_the_unload_of_its_adapter(runs, expected):
    pool = load_pool({"ept": str(runs["ept"]), "pt": str(runs["pt"])}, config())
    with RunningServer(pool, config(batch_window_ms=400)) as s:
        answer = []
        sender = threading.Thread(target=lambda: answer.append(call(s, "POST", "/predict",
                                                                     {"adapter": "pt", "rows": ROWS})))
        sender.start()
        time.sleep(0.1)  # the request waits in its batch window when the unload arrives
        assert call(s, "DELETE", "/adapters/pt") == (200, {"unloaded": "pt"})
        sender.join()
    assert answer == [(200, {"predictions": expected["pt"]})]


def test_the_pool_refuses_baselines(tiny_models, runs, tmp_path):  # noqa: F811
    model, tok = make_model(tiny_models["bert"], "head")
    train(model, tok, "cb", synthetic_cb(), quick_config(tmp_path / "head", max_steps=1, eval_steps=1),
          run_info={"backbone": tiny_models["bert"]})
    pool = AdapterPool()
    pool.load("ept", runs["ept"])
    with pytest.raises(ValueError, match="cannot share"):
        pool.load("head", tmp_path / "head")
    assert list(pool.adapters) == ["ept"] and torch.is_tensor(pool.model.adapters["ept"].prompt_embeddings)


def test_binding_beyond_loopback_is_an_explicit_choice(runs, capsys):
    with pytest.raises(ValueError, match="allow-remote"):
        ServeConfig(host="0.0.0.0")
    assert ServeConfig(host="0.0.0.0", allow_remote=True).host == "0.0.0.0"
    assert ServeConfig(host="::1").host == "::1"
    code = main(["serve", "--adapter", f"ept={runs['ept']}", "--host", "0.0.0.0"])
    err = capsys.readouterr().err
    assert code == 2 and "allow-remote" in err and len(err.strip().splitlines()) == 1
    assert main(["serve", "--adapter", str(runs["ept"])]) == 2
    assert "NAME=DIR" in capsys.readouterr().err


def test_every_serve_config_field_is_a_flag_with_its_help():
    import dataclasses

    from eptkit.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    actions = {a.dest: a for a in subparsers.choices["serve"]._actions}
    fields = dataclasses.fields(ServeConfig)
    for f in fields:
        action = actions[f.name]
        on_by_default = f.default is True  # a switch that is on is written --no-NAME
        assert action.option_strings == ["--" + ("no-" if on_by_default else "") + f.name.replace("_", "-")]
        assert action.help.startswith(f.metadata.get("flag_help") or f.metadata["help"]), f.name
        assert action.default == f.default, f.name
    # the flags as a user writes them reach the config, each to its own field
    args = subparsers.choices["serve"].parse_args(["--adapter", "a=b", "--port", "0", "--max-batch-size", "3",
                                                   "--batch-window-ms", "2.5", "--no-fold", "--allow-remote",
                                                   "--host", "0.0.0.0", "--model", "m", "--max-rows", "7",
                                                   "--max-body-bytes", "99", "--log-level", "warning"])
    config = ServeConfig(**{f.name: getattr(args, f.name) for f in fields})
    assert config == ServeConfig(host="0.0.0.0", port=0, allow_remote=True, model="m", max_batch_size=3,
                                 batch_window_ms=2.5, max_rows=7, max_body_bytes=99, fold=False, log_level="warning")


def test_rows_of_similar_length_share_a_pass():
    lengths = [10, 12, 50, 11, 55, 128, 60, 13]
    groups = length_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert groups == [[0, 3, 1, 7], [2, 4, 6], [5]]  # short, middle, long
    for g in groups:  # padding to the group's longest row wastes at most 30%
        assert len(g) * max(lengths[i] for i in g) <= 1.3 * sum(lengths[i] for i in g)


def test_text_to_text_adapters_mix_and_answer_as_predict(tiny_models, tmp_path, monkeypatch):  # noqa: F811
    """Generation: rows of two T5 adapters in one generate call, each answer what `predict_file` writes.
    Tiny random T5s generate no label word, so every answer would be None: a checksum of the generated
    text stands in for the label, making any difference in the generated text show."""
    monkeypatch.setattr(TaskSpec, "parse_label", lambda self, text: sum(map(ord, text)) % 3)
    dirs = {}
    for method in ("pt", "ept"):
        model, tok = make_model(tiny_models["t5"], method, task_type="seq2seq")
        train(model, tok, "cb", synthetic_cb(), quick_config(tmp_path / method, max_steps=1, eval_steps=1),
              run_info={"backbone": tiny_models["t5"]})
        dirs[method] = tmp_path / method
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    expected = {m: [r["prediction"] for r in predict_file(*load_trained(d), path)] for m, d in dirs.items()}
    pool = load_pool({m: str(d) for m, d in dirs.items()}, config())
    names = ["pt", "ept"] * len(ROWS)
    rows = [r for row in ROWS for r in (row, row)]
    encoded = [pool.encode(name, [row])[0] for name, row in zip(names, rows)]
    answers = pool.predict(names, encoded)
    assert answers[0::2] == expected["pt"] and answers[1::2] == expected["ept"]
    assert len(set(expected["pt"] + expected["ept"])) > 1
