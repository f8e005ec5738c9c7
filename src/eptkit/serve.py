"""`eptkit serve`: one process holds the frozen backbone and any number of adapters, and answers
concurrent requests for different adapters with one mixed forward pass (`eptkit.adapter_pool`).

The HTTP side is Starlette (the ASGI toolkit FastAPI is built on) served by uvicorn: both are
maintained, widely deployed and small (uvicorn parses HTTP with h11; no HTTP is parsed here), and
asyncio lets one event loop gather requests into batches while one worker thread runs the model.
FastAPI's request models would add pydantic for five fields whose errors we word ourselves.

    GET    /health            {"status": "ok", "adapters": N, "requests": N, "batches": N, "rows": N}
    GET    /adapters          {"adapters": [{"name", "method", "task", "parameters", "fields", ...}]}
    POST   /adapters          {"name": NAME, "path": DIR} -> 201 and the adapter's description
    DELETE /adapters/NAME     {"unloaded": NAME}
    POST   /predict           {"adapter": NAME, "rows": [{field: text, ...}, ...]} -> {"predictions": [...]}

Every error is a 4xx/5xx with a one-line JSON body {"error": "..."} naming the problem: 400 malformed
JSON or a missing/ill-typed field, 404 an unknown adapter or route, 409 an adapter name in use (or
the last adapter unloaded), 413 a body over max_body_bytes or more rows than max_rows, 422 a row
longer than its adapter's max_length (the server never truncates, unlike `eptkit predict`) or an
adapter directory refused at load (corrupted, truncated, another backbone, a pickle: only safetensors
and JSON are read).

Request batching (not batching.py's training order, nor forward.py's mixed batch itself): requests
wait in one queue; the RequestBatcher takes the first, then whatever else arrives within
batch_window_ms, up to max_batch_size rows, and runs them as one mixed batch on the worker thread (rows
of similar length share a forward pass: `eptkit.batching.length_groups`).
Loads and unloads go through the same queue, so a request accepted before an unload is still answered
and nothing ever runs beside a forward pass.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .tasks.errors import DataError

# The pool (torch, transformers) is imported where it is used: `eptkit --help` builds serve's parser.
if TYPE_CHECKING:
    from .adapter_pool import AdapterPool

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class ServeConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on; the default, 127.0.0.1, is loopback only."})
    port: int = field(default=8000, metadata={"help": "Port (0: any free port)."})
    allow_remote: bool = field(default=False, metadata={
        "help": "Allow a --host beyond loopback. The server has no authentication or TLS: put it behind a proxy."})
    model: str | None = field(default=None, metadata={
        "help": "Backbone path or Hub id for every adapter (default: the one their runs record; all must agree)."})
    max_batch_size: int = field(default=64, metadata={
        "help": "Most rows in one batch (served by one or a few forward passes of rows of similar length); "
                "1 serves each request alone (no batching across requests)."})
    batch_window_ms: float = field(default=5.0, metadata={
        "help": "How long the first request of a batch waits for others to join it, in milliseconds."})
    max_rows: int = field(default=64, metadata={"help": "Most rows in one request (more: 413)."})
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "Largest request body in bytes (more: 413)."})
    fold: bool = field(default=True, metadata={
        "help": "Fold each adapter's prompt side into constants at load, as a folded adapter file holds it "
                "(the default).",
        # what the command-line flag, --no-fold, does
        "flag_help": "Serve the adapters as trained: do not fold their prompt side into constants at load "
                     "(folding, the default, answers the same to float precision and is faster)."})
    log_level: str = field(default="info", metadata={"help": "uvicorn's log level (info logs every request)."})

    def __post_init__(self):
        for name in ("max_batch_size", "max_rows", "max_body_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")
        if not 0 <= self.batch_window_ms <= 10_000:
            raise ValueError(f"batch_window_ms: expected 0 to 10000 milliseconds, got {self.batch_window_ms}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: expected 0 to 65535, got {self.port}")
        if not self.allow_remote and not is_loopback(self.host):
            raise ValueError(f"host: {self.host} is reachable beyond this machine and the server has no "
                             "authentication; pass --allow-remote (allow_remote=True) if that is what you want")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def parse_adapter_option(text: str, what: str = "--adapter", value: str = "DIR") -> tuple[str, str]:
    """'NAME=DIR' (an --adapter option; --task: NAME=TASK) -> (name, dir)."""
    name, sep, path = text.partition("=")
    if not sep or not path:
        raise ValueError(f"{what}: expected NAME={value}, got {text!r}")
    check_name(name)
    return name, path


def check_name(name) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"name: {name!r} is not a valid adapter name (letters, digits, '.', '_', '-'; up to 64, "
                         "starting with a letter or digit)")
    return name


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class _Job:
    future: asyncio.Future
    adapter: str | None = None  # a prediction: its adapter and raw rows
    rows: list | None = None
    control: object = None  # or a load/unload: a function of the pool, run between batches

    @property
    def size(self) -> int:
        return len(self.rows) if self.rows is not None else 0


class RequestBatcher:
    """The request queue and the loop that turns it into mixed batches on the one model thread."""

    def __init__(self, pool: AdapterPool, config: ServeConfig):
        self.pool, self.config = pool, config
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eptkit-model")
        self.stats = {"requests": 0, "batches": 0, "rows": 0}
        self._queue: deque[_Job] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.executor.shutdown(wait=True)

    async def predict(self, adapter: str, rows: list) -> list:
        return await self._submit(_Job(asyncio.get_running_loop().create_future(), adapter, rows))

    async def control(self, action) -> object:
        """Run action(pool) on the model thread, after every request queued before it."""
        return await self._submit(_Job(asyncio.get_running_loop().create_future(), control=action))

    async def _submit(self, job: _Job):
        self._queue.append(job)
        self._wake.set()
        return await job.future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            first = self._queue.popleft()
            if first.control is not None:
                await self._finish([first], loop.run_in_executor(self.executor, _run_control, self.pool,
                                                                 first.control))
                continue
            batch, rows = [first], first.size
            deadline = loop.time() + self.config.batch_window_ms / 1000
            while rows < self.config.max_batch_size:
                if not self._queue:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), remaining)
                    except TimeoutError:
                        pass
                    continue
                nxt = self._queue[0]
                if nxt.control is not None or rows + nxt.size > self.config.max_batch_size:
                    break
                batch.append(self._queue.popleft())
                rows += nxt.size
            self.stats["batches"] += 1
            self.stats["rows"] += rows
            await self._finish(batch, loop.run_in_executor(self.executor, _run_batch, self.pool,
                                                           [(j.adapter, j.rows) for j in batch]))

    async def _finish(self, jobs: list[_Job], work) -> None:
        try:
            results = await work
        except Exception as e:  # noqa: BLE001 - a failure of the whole batch answers each of its requests
            results = [e] * len(jobs)
        for job, result in zip(jobs, results):
            if job.future.done():  # the client went away
                continue
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)


def _run_control(pool: AdapterPool, action) -> list:
    """On the model thread, between batches: a load or an unload; [its result or its error]."""
    try:
        return [action(pool)]
    except Exception as e:  # noqa: BLE001 - returned to the one request that asked
        return [e]


def _run_batch(pool: AdapterPool, requests: list[tuple[str, list]]) -> list:
    """On the model thread: encode each request (a bad one fails alone), then one mixed batch for the rest."""
    from .adapter_pool import UnknownAdapter
    from .tasks.formatting import RowTooLong

    results: list = [None] * len(requests)
    names, rows, spans = [], [], []
    for i, (adapter, raw) in enumerate(requests):
        try:
            encoded = pool.encode(adapter, raw)
        except RowTooLong as e:
            results[i] = HTTPError(422, f"rows[{e.row}]: {e.length} tokens, more than max_length={e.max_length} "
                                        f"of adapter {adapter!r}; shorten the text (the server does not truncate)")
            continue
        except (UnknownAdapter, DataError, ValueError) as e:
            results[i] = e
            continue
        spans.append((i, len(rows), len(encoded)))
        names += [adapter] * len(encoded)
        rows += encoded
    if rows:
        predictions = pool.predict(names, rows)
        for i, start, n in spans:
            results[i] = predictions[start:start + n]
    return results


# ---------------------------------------------------------------------------- the HTTP app
def _error(status: int, message: str):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


def _status_of(e: BaseException) -> int:
    from .adapter_pool import NameConflict, UnknownAdapter

    if isinstance(e, HTTPError):
        return e.status
    if isinstance(e, UnknownAdapter):
        return 404
    if isinstance(e, NameConflict):
        return 409
    return 400 if isinstance(e, ValueError) else 500  # DataError and AdapterError are ValueErrors


async def _read_body(request, limit: int) -> bytes:
    """The body, refused (413) past `limit` bytes without reading the rest."""
    too_large = HTTPError(413, f"request body: more than the server's max_body_bytes={limit}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _json_body(request, limit: int, allowed: set[str], required: set[str]) -> dict:
    """The request's JSON object, checked for size, unknown and missing keys."""
    try:
        body = json.loads(await _read_body(request, limit))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise HTTPError(400, f"malformed JSON in the request body ({type(e).__name__}: {e})") from None
    if not isinstance(body, dict):
        raise HTTPError(400, f"request body: expected a JSON object with {sorted(required)}, got {type(body).__name__}")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise HTTPError(400, f"{unknown[0]}: unknown field; the request takes {sorted(allowed)}")
    missing = sorted(required - set(body))
    if missing:
        raise HTTPError(400, f"{missing[0]}: missing field; the request takes {sorted(allowed)}")
    return body


def build_app(pool: AdapterPool, config: ServeConfig):
    """The Starlette app over a loaded pool (its batcher starts and stops with the app)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    batcher: RequestBatcher | None = None

    @asynccontextmanager
    async def lifespan(app):
        nonlocal batcher
        batcher = RequestBatcher(pool, config)
        batcher.start()
        app.state.batcher = batcher
        yield
        await batcher.stop()

    def handles_errors(endpoint):
        async def wrapped(request):
            try:
                return await endpoint(request)
            except Exception as e:  # noqa: BLE001 - every error is one JSON line
                return _error(_status_of(e), str(e) or type(e).__name__)
        return wrapped

    async def health(request):
        return JSONResponse({"status": "ok", "adapters": len(pool.adapters), **batcher.stats})

    async def list_adapters(request):
        return JSONResponse({"adapters": pool.describe()})

    async def add_adapter(request):
        from .adapter_files import AdapterError

        body = await _json_body(request, config.max_body_bytes, {"name", "path", "task"}, {"name", "path"})
        name, path, task = check_name(body["name"]), body["path"], body.get("task")
        if not isinstance(path, str):
            raise HTTPError(400, f"path: expected a directory (a string), got {type(path).__name__}")
        if task is not None and not isinstance(task, str):
            raise HTTPError(400, f"task: expected a task name (a string), got {type(task).__name__}")
        try:
            served = await batcher.control(lambda p: p.load(name, path, task=task).describe())
        except (AdapterError, DataError, OSError) as e:  # the directory is refused, with the reason
            raise HTTPError(422, f"path: cannot load {path}: {e}") from None
        return JSONResponse(served, status_code=201)

    async def remove_adapter(request):
        name = request.path_params["name"]
        await batcher.control(lambda p: p.unload(name))  # unknown: 404; the last one: 409
        return JSONResponse({"unloaded": name})

    async def predict(request):
        body = await _json_body(request, config.max_body_bytes, {"adapter", "rows"}, {"adapter", "rows"})
        adapter, rows = body["adapter"], body["rows"]
        if not isinstance(adapter, str):
            raise HTTPError(400, f"adapter: expected an adapter name (a string), got {type(adapter).__name__}")
        if not isinstance(rows, list) or not rows:
            raise HTTPError(400, "rows: expected a non-empty list of rows (JSON objects)")
        if len(rows) > config.max_rows:
            raise HTTPError(413, f"rows: {len(rows)} rows, more than the server's max_rows={config.max_rows} per "
                                 "request; split the request")
        pool.check_rows(adapter, rows)  # unknown adapter: 404; a row without the task's fields: 400
        batcher.stats["requests"] += 1
        return JSONResponse({"predictions": await batcher.predict(adapter, rows)})

    async def http_error(request, exc: HTTPException):
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    routes = [Route("/health", handles_errors(health), methods=["GET"]),
              Route("/adapters", handles_errors(list_adapters), methods=["GET"]),
              Route("/adapters", handles_errors(add_adapter), methods=["POST"]),
              Route("/adapters/{name}", handles_errors(remove_adapter), methods=["DELETE"]),
              Route("/predict", handles_errors(predict), methods=["POST"])]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})


# ---------------------------------------------------------------------------- running it
def load_pool(adapters: dict[str, str], config: ServeConfig, tasks: dict[str, str] | None = None) -> AdapterPool:
    """The pool serving `adapters` (name -> directory); `tasks` (name -> task) for adapters that do not
    record their task (saved from the Python API)."""
    from .adapter_pool import AdapterPool

    if not adapters:
        raise ValueError("--adapter: give at least one NAME=DIR (it decides the backbone)")
    unknown = sorted(set(tasks or {}) - set(adapters))
    if unknown:
        raise ValueError(f"--task: no --adapter is named {unknown[0]!r}")
    pool = AdapterPool(config.model, fold=config.fold)
    for name, path in adapters.items():
        pool.load(check_name(name), path, task=(tasks or {}).get(name))
    return pool


class RunningServer:
    """A server on a thread of this process (tests, benchmarks): `url`, `stop()`; a context manager."""

    def __init__(self, pool: AdapterPool, config: ServeConfig):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(build_app(pool, config), host=config.host, port=config.port,
                                                    log_level=config.log_level, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="eptkit-serve", daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"the server did not start on {config.host}:{config.port} (see the log)")
            self.thread.join(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def serve(adapters: dict[str, str], config: ServeConfig, tasks: dict[str, str] | None = None) -> None:
    """Load the adapters and serve until interrupted (`eptkit serve`)."""
    import uvicorn

    pool = load_pool(adapters, config, tasks)
    print(f"eptkit serve: {len(pool.adapters)} adapter(s) on {pool.model_path}: http://{config.host}:{config.port}",
          flush=True)
    uvicorn.run(build_app(pool, config), host=config.host, port=config.port, log_level=config.log_level)


def add_arguments(parser) -> None:
    """`eptkit serve`'s options: --adapter NAME=DIR (repeated), then one option per ServeConfig field."""
    import dataclasses

    from .options import add_dataclass_arguments

    parser.add_argument("--adapter", action="append", required=True, metavar="NAME=DIR",
                        help="An adapter to serve under NAME (output dir of `eptkit train`, or an adapter dir); "
                             "repeat for more.")
    parser.add_argument("--task", action="append", default=[], metavar="NAME=TASK",
                        help="The task of adapter NAME, for an adapter that does not record one (saved with "
                             "save_pretrained from Python); repeat for more. POST /adapters takes a \"task\" field.")
    add_dataclass_arguments(parser, dataclasses.fields(ServeConfig))  # the helper train uses (eptkit.options)


def run_command(args) -> int:
    import dataclasses

    config = ServeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)})
    adapters = dict(parse_adapter_option(a) for a in args.adapter)
    if len(adapters) < len(args.adapter):
        raise ValueError("--adapter: the same NAME is given twice")
    tasks = dict(parse_adapter_option(a, what="--task", value="TASK") for a in args.task)
    serve(adapters, config, tasks)
    return 0
