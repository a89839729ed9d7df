"""Benchmark: the HTTP API under load on this machine: requests/s and p50/p95 latency of POST /v1/recommend and
POST /v1/chat at concurrency 1 and 8, against `python -m pipeline serve` on 127.0.0.1.

Why: the chat page and scripted probes wait on these calls. Targets on 2 cores at concurrency 1: /v1/recommend
p95 under 0.5 s and /v1/chat p95 under 1.5 s (explanations included). At concurrency 8 the server answers one
request at a time (each already uses both cores), so throughput should stay near concurrency 1's and latency grow
with the queue, with no error.

The server runs as its own process on a free port with the workspace's trained models (`--models-from workspace`)
and is stopped at the end. The requests are real conversations: prefixes of ReDial test conversations that end
with a seeker's turn (seeded sample, cycled). Each cell sends a few warm-up requests, then --requests requests from
`concurrency` clients; latency is measured at the client (connection reuse on).

    .venv/bin/python bench/serve.py [--workspace .] [--requests 60]

Prints a table and writes bench/results/serve.json.
"""

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for common, also when run with runpy
import httpx  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from common import ROOT, write_results  # noqa: E402  (puts the project root on sys.path)

from pipeline.servers import free_port  # noqa: E402

ENDPOINTS = {"/v1/recommend": {"top_k": 10}, "/v1/chat": {"top_k": 3}}
CONCURRENCY = (1, 8)
WARM_UP = 3


def conversations(workspace: Path, count: int, seed: int = 0) -> list[list[dict]]:
    """Prefixes of ReDial test conversations that end with a seeker's turn, as the API's messages."""
    utterances = (
        pl.read_parquet(workspace / "data/ingest/utterances.parquet")
        .join(pl.read_parquet(workspace / "data/ingest/conversations.parquet").select("conv_id", "split"), on="conv_id")
        .filter(pl.col("split") == "test")
        .sort("conv_id", "turn_idx")
    )
    prefixes = []
    for _, turns in utterances.group_by("conv_id", maintain_order=True):
        messages = [{"role": r, "text": t[:2000]} for r, t in turns.select("role", "text").iter_rows() if t.strip()]
        prefixes += [messages[: i + 1] for i, m in enumerate(messages) if m["role"] == "seeker"]
    picked = np.random.default_rng(seed).choice(len(prefixes), size=min(count, len(prefixes)), replace=False)
    return [prefixes[i] for i in picked]


def start_server(workspace: Path, port: int) -> subprocess.Popen:
    log = open(ROOT / "bench" / "results" / "serve-server.log", "w")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            "serve",
            "--params",
            str(workspace / "params.yaml"),
            "--models-from",
            "workspace",
            "--port",
            str(port),
            "--timeout",
            "120",
        ],
        cwd=workspace,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ},
    )


def wait_healthy(url: str, server: subprocess.Popen, timeout: float = 600) -> float:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if server.poll() is not None:
            sys.exit(f"error: the server exited with code {server.returncode}; see bench/results/serve-server.log")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return time.monotonic() - began
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit(f"error: the server was not healthy within {timeout:.0f} s; see bench/results/serve-server.log")


async def load(url: str, path: str, extra: dict, bodies: list[list[dict]], concurrency: int, requests: int) -> dict:
    """`requests` POSTs from `concurrency` clients sharing one connection pool; latencies at the client."""
    latencies, errors, queue = [], {}, asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(bodies[i % len(bodies)])
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        for body in bodies[:WARM_UP]:
            (await client.post(path, json={"messages": body, **extra})).raise_for_status()

        async def worker():
            while not queue.empty():
                body = queue.get_nowait()
                began = time.perf_counter()
                answer = await client.post(path, json={"messages": body, **extra})
                latencies.append(time.perf_counter() - began)
                if answer.status_code != 200:
                    errors[answer.status_code] = errors.get(answer.status_code, 0) + 1

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - began
    quantiles = statistics.quantiles(latencies, n=20)
    return {
        "endpoint": path,
        "concurrency": concurrency,
        "requests": requests,
        "errors": errors,
        "requests_per_s": round(requests / wall, 2),
        "p50_s": round(statistics.median(latencies), 3),
        "p95_s": round(quantiles[18], 3),
        "max_s": round(max(latencies), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, default=ROOT, help="a workspace with trained models (default: .)")
    parser.add_argument("--requests", type=int, default=60, help="requests per cell (default: 60)")
    args = parser.parse_args()
    workspace = args.workspace.resolve()
    for needed in ("data/models/c2crs_rec.pt", "data/models/c2crs_conv.pt", "data/ingest/utterances.parquet"):
        if not (workspace / needed).is_file():
            sys.exit(
                f"error: {workspace / needed} is missing; train the models first: "
                "python -m pipeline repro finetune_rec finetune_conv"
            )
    bodies = conversations(workspace, 200)
    port = free_port()
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    server = start_server(workspace, port)
    url = f"http://127.0.0.1:{port}"
    try:
        startup = wait_healthy(url, server)
        print(f"server healthy after {startup:.1f} s (loading the models and tables)")
        cells = []
        for path, extra in ENDPOINTS.items():
            for concurrency in CONCURRENCY:
                cell = asyncio.run(load(url, path, extra, bodies, concurrency, args.requests))
                cells.append(cell)
                print(
                    f"{path:14s} concurrency {concurrency}: {cell['requests_per_s']:6.2f} req/s  "
                    f"p50 {cell['p50_s']:.3f} s  p95 {cell['p95_s']:.3f} s  max {cell['max_s']:.3f} s  "
                    f"errors {cell['errors'] or 0}",
                    flush=True,
                )
    finally:
        server.terminate()
        server.wait(30)
    write_results(
        "serve",
        {"workspace": str(workspace), "startup_s": round(startup, 1), "conversations": len(bodies), "cells": cells},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
