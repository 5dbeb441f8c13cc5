"""A follow-up question in process: where its time to first token goes.

Builds a Llama-3.2-1B-shaped model with random weights (the given tokenizer's vocabulary), starts the generation
engine on the GPU, sends a 32k-token document with a question, then three follow-up questions (16 new tokens
each, one second apart, as a user reading the answer), printing the engine's host phases (start and duration in
ms from submission), and finally one follow-up under ``torch.profiler`` (the GPU's busy time and its kernels).

    python bench/followup_profile.py TOKENIZER_DIR
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hisa  # noqa: E402
from bench.serve import build_model  # noqa: E402
from server.engine import Delta, Done, Engine, EngineConfig, GenRequest, Job  # noqa: E402
from server.sampling import PendingSample, SamplerState, SamplingParams  # noqa: E402

DOC_TOKENS = 32752


def main() -> None:
    out = Path(tempfile.mkdtemp()) / "model"
    build_model(out, Path(sys.argv[1]), 16, 2048, 32, 8, 8192, 40000, "bfloat16")
    engine = Engine(EngineConfig(model=str(out), served_model_name="m", prefill_chunk=131072, max_model_len=40000))
    engine.start()
    assert engine.ready.wait(900), engine.load_error
    marks: list[tuple[str, float, float]] = []
    t_submit = [0.0]

    def wrap(owner, name):
        orig = getattr(owner, name)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                marks.append((name, round((t - t_submit[0]) * 1e3, 2), round((time.perf_counter() - t) * 1e3, 2)))

        setattr(owner, name, timed)

    for owner, name in ((Engine, "_admit"), (Engine, "_begin"), (Engine, "_prefill_chunk"), (Engine, "_accept"),
                        (type(engine.prefix_cache), "take"), (hisa.HisaCache, "crop_to"),
                        (type(engine.stepper), "chunk"), (PendingSample, "result"), (SamplerState, "sample_async")):
        wrap(owner, name)

    def ask(prompt: list[int], max_tokens: int) -> float:
        async def go():
            req = GenRequest([Job(prompt, 0)], SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                              ignore_eos=True), asyncio.get_running_loop())
            t_submit[0] = time.perf_counter()
            engine.submit(req)
            first = None
            while True:
                ev = await req.events.get()
                if isinstance(ev, Delta) and first is None:
                    first = time.perf_counter() - t_submit[0]
                if isinstance(ev, Done):
                    return first

        return asyncio.run(go())

    rng = random.Random(0)
    doc = [rng.randrange(100, 49000) for _ in range(DOC_TOKENS)]
    new = lambda: [rng.randrange(100, 49000) for _ in range(16)]  # noqa: E731
    print(f"first request: first token {ask(doc + new(), 8) * 1e3:.1f} ms")
    for _ in range(3):
        time.sleep(1.0)
        marks.clear()
        first = ask(doc + new(), 8)
        phases = [m for m in marks if m[1] < first * 1e3 + 1]
        print(f"follow-up: first token {first * 1e3:.2f} ms; phases (name, start ms, took ms): {phases}")
    time.sleep(1.0)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        first = ask(doc + new(), 1)
    torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    if kernels:
        span = max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)
        busy = sum(e.time_range.end - e.time_range.start for e in kernels)
        print(f"profiled follow-up: first token {first * 1e3:.2f} ms; {len(kernels)} GPU kernels, busy "
              f"{busy / 1e3:.2f} ms over {span / 1e3:.2f} ms")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
    engine.shutdown()


if __name__ == "__main__":
    main()
