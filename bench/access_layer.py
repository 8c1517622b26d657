"""CPU per request of the access layer (appliance/api/access.py) against another revision's.

Both wrap the same app, which reads a one-frame body and answers 201; metrics and logging are
stubbed out, so the figure is the layer's own cost (request id, body deadline, status tracking).
Seven rounds of 20,000 requests each, alternating; the median per layer.

    .venv/bin/python bench/access_layer.py 5b697f9^   # the layer before the body deadline
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance import metrics  # noqa: E402
from appliance.api import access  # noqa: E402


def load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def app(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 201, "headers": []})
    await send({"type": "http.response.body", "body": b"{}", "more_body": False})


async def receive() -> dict[str, Any]:
    await asyncio.sleep(0)  # granian's receive always takes a loop turn
    return {"type": "http.request", "body": b'{"type": "text"}', "more_body": False}


async def send(message: Any) -> None:
    return None


SCOPE = {
    "type": "http",
    "path": "/v1/conversations/c/messages",
    "path_template": "/v1/conversations/{conversation}/messages",
    "method": "POST",
    "headers": [(b"content-length", b"16")],
    "app": SimpleNamespace(state={"services": None}),
}


async def per_request(handler: Any, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        await handler(dict(SCOPE), receive, send)
    return (time.perf_counter() - started) / count * 1e6


async def compare(layers: dict[str, Any]) -> dict[str, float]:
    rounds: dict[str, list[float]] = {name: [] for name in layers}
    for _ in range(7):
        for name, handler in layers.items():
            rounds[name].append(await per_request(handler, 20_000))
    return {name: sorted(values)[3] for name, values in rounds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revision", help="git revision whose access.py to compare with")
    args = parser.parse_args()
    source = subprocess.run(
        ["git", "show", f"{args.revision}:appliance/api/access.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "access_other.py"
        path.write_text(source)
        other = load(path, "access_other")
    stub = SimpleNamespace(
        labels=lambda *_: SimpleNamespace(inc=lambda: None, observe=lambda _: None)
    )
    metrics.HTTP_REQUESTS = stub  # type: ignore[assignment]
    metrics.HTTP_LATENCY = stub  # type: ignore[assignment]
    quiet = SimpleNamespace(info=lambda *_, **__: None)
    for module in (access, other):
        module.log = quiet  # type: ignore[attr-defined]
    try:
        theirs = other.access_layer(app, 1 << 20, 10.0)
    except TypeError:  # before body_timeout
        theirs = other.access_layer(app, 1 << 20)
    ours = access.access_layer(app, 1 << 20, 10.0)
    result = asyncio.run(compare({args.revision: theirs, "working tree": ours}))
    for name, micros in result.items():
        print(f"{name:>14}: {micros:6.1f} us per request (median of 7 x 20,000)")


if __name__ == "__main__":
    main()
