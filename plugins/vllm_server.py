"""Server mode of the vllm plugin: ``lft vllm-serve`` runs a vLLM engine in its own process (on
its own GPU, or another machine), and a run with ``--plugin vllm vllm.mode=server`` samples its
rollouts there and sends the policy's weights there after every optimizer step.

The protocol is HTTP with JSON, on the host and port given (loopback by default):

* ``GET /health``: ``{"model", "dtype", "max_model_len", "reloads", "requests"}`` once the
  engine is up (``reloads``: weight updates received; ``requests``: sampling requests served);
* ``POST /sample`` with ``{"prompts": [[token ids]], "request": {...}}`` (``Sampler.sample``'s
  arguments): ``{"tokens": [[...]], "logprobs": [[...]]}``;
* ``POST /weights`` with the weights as one safetensors blob: they are reloaded in place.

A failed request answers ``{"error": "..."}``, which the run reports as a one-line error.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import torch

import lft
from lft.plugins.vllm_engine import INSTALL, Sampler

DEFAULT_PORT = 8765


class RemoteSampler:
    """``Sampler``'s interface, answered by an ``lft vllm-serve`` at ``url``."""

    remote = True  # one server may serve every process of a run

    def __init__(self, url: str, timeout: float = 300.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.info = self.wait()

    def wait(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=10) as response:
                    return json.loads(response.read())
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise lft.PluginError(
                        f"no lft vllm-serve answered at {self.url} within {self.timeout:g} s ({exc}); start one "
                        f"with `lft vllm-serve --model MODEL --port PORT`, or set vllm.host, vllm.port and "
                        "vllm.server_timeout"
                    ) from None
                time.sleep(1.0)

    def post(self, path: str, body: bytes, kind: str) -> dict:
        request = urllib.request.Request(f"{self.url}{path}", data=body, method="POST", headers={"Content-Type": kind})
        try:
            with urllib.request.urlopen(request, timeout=max(self.timeout, 600)) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", str(exc))
            except ValueError:
                message = str(exc)
            raise lft.PluginError(f"the vLLM server at {self.url} refused {path}: {message}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            raise lft.PluginError(f"the vLLM server at {self.url} stopped answering ({exc})") from None

    def load(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        from safetensors.torch import save

        self.post("/weights", save(dict(weights)), "application/octet-stream")

    def sample(self, prompts: list[list[int]], request: dict) -> tuple[list[list[int]], list[list[float]]]:
        out = self.post("/sample", json.dumps({"prompts": prompts, "request": request}).encode(), "application/json")
        return out["tokens"], out["logprobs"]


def handler_for(sampler: Sampler) -> type:
    served = {"reloads": 0, "requests": 0}

    class Handler(BaseHTTPRequestHandler):
        def reply(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path == "/health":
                self.reply(200, {**sampler.info, **served})
            else:
                self.reply(404, {"error": f"no such endpoint {self.path}"})

        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                if self.path == "/sample":
                    data = json.loads(body)
                    tokens, logprobs = sampler.sample(data["prompts"], data["request"])
                    served["requests"] += 1
                    self.reply(200, {"tokens": tokens, "logprobs": logprobs})
                elif self.path == "/weights":
                    from safetensors.torch import load

                    weights = list(load(body).items())
                    sampler.load(weights)
                    served["reloads"] += 1
                    self.reply(200, {"loaded": len(weights)})
                else:
                    self.reply(404, {"error": f"no such endpoint {self.path}"})
            except Exception as exc:  # the trainer gets the reason, the server keeps serving
                self.reply(400, {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]})

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # one line per request would drown the engine's own log

    return Handler


def serve(sampler: Sampler, host: str, port: int) -> HTTPServer:
    """The HTTP server for ``sampler`` (not yet serving: call ``serve_forever``). It answers one
    request at a time, in the thread that serves: vLLM's weight reload keeps per-thread state, so
    the engine is driven from the thread that built it, and requests from several processes take
    turns."""
    return HTTPServer((host, port), handler_for(sampler))


def add_command(cli: Any) -> None:
    parser = cli.add_parser(
        "vllm-serve",
        help="serve rollouts from a vLLM engine for runs with --plugin vllm vllm.mode=server",
        description="Start a vLLM engine and serve it over HTTP to lft runs with --plugin vllm "
        "vllm.mode=server: they sample their rollouts here and send their weights here after every "
        f"optimizer step. Needs vLLM: {INSTALL}.",
    )
    parser.add_argument(
        "--model", "-m", metavar="PATH_OR_ID", help="the run's starting model (default: the embedded SmolLM2)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="engine dtype (default bfloat16)",
    )
    parser.add_argument(
        "--memory-share",
        type=float,
        default=None,
        help="share of the device's memory for the engine: weights and KV cache on a GPU (default 0.9), "
        "the KV cache on a CPU (default 0.1)",
    )
    parser.add_argument("--max-model-len", type=int, default=2048, help="longest sequence, prompt + completion")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from lft.model import loading

    folder = loading.local_folder(args.model)
    share = args.memory_share or (0.9 if torch.cuda.is_available() else 0.1)  # a GPU of its own: most of it
    sampler = Sampler(folder, args.dtype, args.max_model_len, share, args.seed)
    server = serve(sampler, args.host, args.port)
    print(
        f"lft vllm-serve: {folder} ({args.dtype}, up to {args.max_model_len} tokens) on http://{args.host}:{args.port}",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
