"""Disconnect storm against a real ``hisa-serve`` on 127.0.0.1 (slow: deselected by default).

Run it with::

    python -m pytest -m slow tests/test_stress.py -s

200 streaming requests are cancelled at random points — before the first byte (possibly still queued),
during prefill (after the n-th prefill progress event, before any token) and during decode (after the
n-th token) — interleaved with 100 normal requests whose greedy answers are checked against answers
computed alone. Afterwards: the server answers correctly, no request is stuck (/metrics running and
waiting back to 0, no live KV cache), every request is accounted for (finished + cancelled == sent), and
host RSS (and, on CUDA, the process's GPU memory) is back within a small margin of its level after
warm-up.

Knobs (env): HISA_STRESS_CANCELS (200), HISA_STRESS_NORMAL (100), HISA_STRESS_CONCURRENCY (8),
HISA_STRESS_SEED (0), HISA_STRESS_MODEL (a model folder; default: a tiny random Llama),
HISA_STRESS_DEVICE (the server's default: cuda when available), HISA_STRESS_REPORT (a path: the figures are also written there as JSON).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import subprocess
import threading
import time
from collections import Counter

import httpx
import pytest

from .helpers import CORPUS
from .server_utils import ServerProcess, metric_value, tiny_model_dir

pytestmark = pytest.mark.slow

CANCELS = int(os.environ.get("HISA_STRESS_CANCELS", "200"))
NORMAL = int(os.environ.get("HISA_STRESS_NORMAL", "100"))
CONCURRENCY = int(os.environ.get("HISA_STRESS_CONCURRENCY", "8"))
SEED = int(os.environ.get("HISA_STRESS_SEED", "0"))
MAX_LEN = 4096
RSS_MARGIN = 48 << 20  # bytes, plus 5 % of the post-warm-up level
GPU_MARGIN = 64 << 20


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def server_on_cuda() -> bool:
    """The server's device: HISA_STRESS_DEVICE, else its default (CUDA when this machine has it)."""
    device = os.environ.get("HISA_STRESS_DEVICE")
    if device:
        return device.startswith("cuda")
    import torch  # noqa: PLC0415

    return torch.cuda.is_available()


def gpu_bytes(pid: int) -> int | None:
    """GPU memory of ``pid`` from nvidia-smi; when the process is not listed (PID namespaces in containers),
    the memory used on the card (the stress server is then its only user). None for a CPU server."""
    if not server_on_cuda():
        return None
    if not shutil.which("nvidia-smi"):
        pytest.fail("HISA_STRESS_DEVICE is cuda but nvidia-smi is missing: cannot check GPU memory")

    def query(what: str) -> str:
        return subprocess.run(["nvidia-smi", f"--query-{what}", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=30).stdout

    total = None
    for line in query("compute-apps=pid,used_memory").splitlines():
        p, _, mib = line.partition(",")
        if p.strip() == str(pid):
            total = (total or 0) + int(mib.strip()) * 2**20
    if total is None:
        total = int(query("gpu=memory.used").split()[0]) * 2**20
    return total


class MemorySampler:
    """Peak RSS of the server process, sampled every 100 ms in a thread."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            self._stop.wait(0.1)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def metrics(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=30).text


def metric(page: str, name: str, **labels) -> float:
    try:
        return metric_value(page, name, **labels)
    except KeyError:
        return 0.0


def wait_idle(url: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        page = metrics(url)
        if (metric(page, "hisa_num_requests_running") == 0 and metric(page, "hisa_num_requests_waiting") == 0
                and metric(page, "hisa_kv_cache_bytes") == 0):
            return page
        if time.monotonic() > deadline:
            raise AssertionError(f"requests still stuck after {timeout} s:\n" + "\n".join(
                line for line in page.splitlines() if "running" in line or "waiting" in line or "kv_cache" in line))
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("stress")
    model = os.environ.get("HISA_STRESS_MODEL") or str(tiny_model_dir(d / "model", layers=2))
    args = ["--model", model, "--served-model-name", "m", "--max-model-len", str(MAX_LEN), "--max-queue", "512",
            "--max-num-seqs", "4", "--prefill-chunk", "128", "--hisa-block-size", "32", "--hisa-top-blocks", "8",
            "--hisa-top-k", "256", "--hisa-min-context", "512"]
    if os.environ.get("HISA_STRESS_DEVICE"):
        args += ["--device", os.environ["HISA_STRESS_DEVICE"]]
    proc = ServerProcess(args, d / "server.log")
    yield proc
    print(f"\nserver log: {proc.log_path}")
    proc.stop()


def corpus_prompts(rng: random.Random, n: int, lo: int, hi: int) -> list[str]:
    text = CORPUS.read_text(encoding="utf-8")
    out = []
    for _ in range(n):
        size = rng.randint(lo, hi)
        start = rng.randrange(0, len(text) - size)
        out.append(text[start:start + size])
    return out


def greedy(prompt: str, max_tokens: int, stream: bool = False, **extra) -> dict:
    return {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream, **extra}


async def normal_request(client: httpx.AsyncClient, prompt: str, expected: str, stream: bool) -> str:
    if not stream:
        r = await client.post("/v1/completions", json=greedy(prompt, 16))
        assert r.status_code == 200, r.text[:300]
        text = r.json()["choices"][0]["text"]
    else:
        parts = []
        async with client.stream("POST", "/v1/completions", json=greedy(prompt, 16, True)) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data:") and line[5:].strip() != "[DONE]":
                    chunk = json.loads(line[5:])
                    assert "error" not in chunk, chunk
                    parts += [c["text"] for c in chunk["choices"]]
        text = "".join(parts)
    assert text == expected, "a normal request got a different answer during the storm"
    return "ok"


async def cancelled_request(client: httpx.AsyncClient, prompt: str, kind: str, rng: random.Random) -> str:
    """Start a stream and drop the connection at a random point of the ``kind`` phase; returns the phase
    the client actually observed when it hung up."""
    body = greedy(prompt, 200, True, hisa={"progress": True})
    if kind == "early":
        task = asyncio.ensure_future(client.post("/v1/completions", json=body))
        await asyncio.sleep(rng.uniform(0.0, 0.05))
        task.cancel()
        try:
            await task
            return "finished"
        except (asyncio.CancelledError, httpx.HTTPError):
            return "early"
    stop_after = rng.randint(1, 6) if kind == "prefill" else rng.randint(1, 150)
    progress = tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return "finished"
            chunk = json.loads(data)
            assert "error" not in chunk, chunk
            if "hisa_progress" in chunk:
                done = chunk["hisa_progress"]
                progress += 1
                if kind == "prefill" and (progress >= stop_after or done["processed_tokens"] >= done["total_tokens"]):
                    break
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                tokens += 1
                if kind == "decode" and tokens >= stop_after:
                    break
    # leaving the block closes the connection mid-stream
    return "decode" if tokens else ("prefill" if progress else "early")


def test_disconnect_storm(server):
    rng = random.Random(SEED)
    url = server.url
    pid = server.proc.pid
    normal_prompts = corpus_prompts(rng, 6, 200, 6000)
    storm_prompts = corpus_prompts(rng, 40, 400, 12000)

    async def references():
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            out = []
            for p in normal_prompts:
                r = await client.post("/v1/completions", json=greedy(p, 16))
                assert r.status_code == 200, r.text
                out.append(r.json()["choices"][0]["text"])
            return out

    async def storm(plan):
        sem = asyncio.Semaphore(CONCURRENCY)
        limits = httpx.Limits(max_connections=CONCURRENCY * 4, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

            async def one(item):
                async with sem:
                    what, idx, extra = item
                    if what == "normal":
                        return await normal_request(client, normal_prompts[idx], expected[idx], extra)
                    return await cancelled_request(client, storm_prompts[idx], extra, random.Random(rng.random()))

            return await asyncio.gather(*(one(item) for item in plan))

    def make_plan(n_cancel, n_normal):
        plan = [("cancel", rng.randrange(len(storm_prompts)), rng.choice(["early", "prefill", "prefill", "decode",
                                                                           "decode"])) for _ in range(n_cancel)]
        plan += [("normal", rng.randrange(len(normal_prompts)), rng.random() < 0.5) for _ in range(n_normal)]
        rng.shuffle(plan)
        return plan

    expected = asyncio.run(references())
    # warm-up: every code path once (allocator pools, prefix cache filled), then the baseline
    asyncio.run(storm(make_plan(24, 12)))
    base_page = wait_idle(url)
    time.sleep(1.0)
    rss_base = rss_bytes(pid)
    gpu_base = gpu_bytes(pid)
    count0 = {k: metric(base_page, f"hisa_request_{k}_total") for k in ("success", "aborted")}
    cancelled0 = metric(base_page, "hisa_request_aborted_total", reason="cancelled")

    t0 = time.monotonic()
    with MemorySampler(pid) as sampler:
        outcomes = asyncio.run(storm(make_plan(CANCELS, NORMAL)))
        page = wait_idle(url)
    seconds = time.monotonic() - t0
    time.sleep(1.0)
    rss_after = rss_bytes(pid)
    gpu_after = gpu_bytes(pid)

    observed = Counter(outcomes)
    assert observed["ok"] == NORMAL
    # every request accounted for: finished or cancelled, nothing else (no errors, nothing lost)
    finished = metric(page, "hisa_request_success_total") - count0["success"]
    aborted = metric(page, "hisa_request_aborted_total") - count0["aborted"]
    cancelled = metric(page, "hisa_request_aborted_total", reason="cancelled") - cancelled0
    assert aborted == cancelled, "some requests failed instead of being cancelled"
    # (a request dropped before the server read it is neither: only the "early" kind can be that)
    assert CANCELS + NORMAL - observed["early"] <= finished + cancelled <= CANCELS + NORMAL, (finished, cancelled)
    # the client hung up in each phase often enough for the test to mean something
    assert observed["prefill"] >= CANCELS // 5 and observed["decode"] >= CANCELS // 5, observed
    assert cancelled >= CANCELS - observed["finished"] - observed["early"], (cancelled, observed)

    # the server still answers correctly
    assert asyncio.run(references()) == expected
    wait_idle(url)

    figures = {
        "requests": CANCELS + NORMAL, "cancel_attempts": CANCELS, "normal": NORMAL, "concurrency": CONCURRENCY,
        "client_observed": dict(observed), "server_cancelled": int(cancelled), "server_finished": int(finished),
        "seconds": round(seconds, 1), "rss_after_warmup_mib": round(rss_base / 2**20, 1),
        "rss_peak_mib": round(sampler.peak / 2**20, 1), "rss_after_mib": round(rss_after / 2**20, 1),
        "gpu_after_warmup_mib": gpu_base and round(gpu_base / 2**20, 1),
        "gpu_after_mib": gpu_after and round(gpu_after / 2**20, 1),
    }
    print("\nstress figures: " + json.dumps(figures))
    if os.environ.get("HISA_STRESS_REPORT"):
        with open(os.environ["HISA_STRESS_REPORT"], "w") as f:
            json.dump(figures, f, indent=1)
    assert rss_after - rss_base <= RSS_MARGIN + 0.05 * rss_base, figures
    if server_on_cuda():
        assert gpu_after - gpu_base <= GPU_MARGIN, figures
    assert "Traceback" not in server.logs()
