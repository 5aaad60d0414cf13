"""Benchmark the openai engine against a stand-in endpoint with a fixed latency and capacity.

    .venv/bin/python benchmarks/bench_openai.py [--requests 800] [--latency 0.2] [--capacity 16]

The stand-in (an aiohttp server in a subprocess, so its CPU is not counted) answers each
request after ``--latency`` seconds and answers 429 to any request above ``--capacity`` in
flight. One OpenAIEngine.generate call sends ``--requests`` 256 px JPEG images. Reported for
two endpoint settings (max_concurrency equal to the capacity, and twice it, so the adaptive
limit has to find the capacity by 429s): images/s, the endpoint's utilisation (busy
slot-seconds over capacity x wall time), 429s, and the engine process's CPU per image.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time
from typing import Any

from PIL import Image

from caption_flow.config.models import EndpointConfig, SamplingConfig
from caption_flow.engines.base import EngineSpec, GenerationRequest
from caption_flow.engines.openai_engine import OpenAIEngine


def serve(port_out: Any, stats: Any, latency: float, capacity: int) -> None:
    from aiohttp import web

    state = {"in_flight": 0, "busy": 0.0, "rejected": 0}

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        if state["in_flight"] >= capacity:
            state["rejected"] += 1
            stats["rejected"] = state["rejected"]
            return web.Response(status=429, text="busy")
        state["in_flight"] += 1
        await asyncio.sleep(latency)
        state["in_flight"] -= 1
        state["busy"] += latency
        stats["busy"] = state["busy"]
        body = {"choices": [{"message": {"content": "a caption"}}], "usage": {}}
        return web.json_response(body)

    async def main() -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port_out.put(runner.addresses[0][1])
        await asyncio.Event().wait()

    asyncio.run(main())


def run(count: int, latency: float, capacity: int, max_concurrency: int) -> dict[str, float]:
    manager = multiprocessing.Manager()
    stats = manager.dict(busy=0.0, rejected=0)
    port_out = manager.Queue()
    server = multiprocessing.Process(
        target=serve, args=(port_out, stats, latency, capacity), daemon=True
    )
    server.start()
    try:
        port = port_out.get(timeout=30)
        endpoint = EndpointConfig(
            name="bench",
            base_url=f"http://127.0.0.1:{port}/v1",
            model="m",
            initial_concurrency=4,
            max_concurrency=max_concurrency,
            max_retries=50,
        )
        engine = OpenAIEngine(EngineSpec(model="m"), [endpoint])
        image = Image.effect_noise((256, 256), 64).convert("RGB")
        requests = [GenerationRequest(image, f"describe {i}") for i in range(count)]
        sampling = SamplingConfig(max_tokens=32)
        cpu, wall = time.process_time(), time.monotonic()
        results = engine.generate(requests, sampling)
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        engine.close()
        assert all(r.error is None for r in results), [r.error for r in results if r.error][:3]
        return {
            "images_per_s": count / wall,
            "utilisation": stats["busy"] / (capacity * wall),
            "rejected_429": stats["rejected"],
            "cpu_ms_per_image": 1000 * cpu / count,
        }
    finally:
        server.kill()
        manager.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=800)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--capacity", type=int, default=16)
    args = parser.parse_args()
    ideal = args.capacity / args.latency
    print(f"capacity {args.capacity} x {args.latency:g} s: at most {ideal:.0f} images/s")
    for max_concurrency in (args.capacity, 2 * args.capacity):
        r = run(args.requests, args.latency, args.capacity, max_concurrency)
        print(
            f"max_concurrency {max_concurrency:3d}: {r['images_per_s']:6.1f} images/s, "
            f"utilisation {100 * r['utilisation']:5.1f} %, {r['rejected_429']:4.0f} x 429, "
            f"{r['cpu_ms_per_image']:.2f} ms CPU per image"
        )


if __name__ == "__main__":
    main()
