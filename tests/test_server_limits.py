"""Start-up and limits of a real ``hisa-serve``: fast --help, env-var flags, /health 503 while the model
loads (then ready), queue full -> 503 with Retry-After, CORS, and a clean exit when the model is missing."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from .server_utils import ROOT, ServerProcess, free_port, metric_value, tiny_model_dir

MODEL = "tiny"


def test_help_is_fast_and_lists_flags():
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "server.cli", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    elapsed = time.monotonic() - t0
    assert out.returncode == 0
    for flag in ("--model", "--served-model-name", "--host", "--port", "--api-key", "--max-model-len", "--dtype",
                 "--device", "--chat-template", "--allowed-origins", "--hisa-block-size", "--hisa-top-blocks",
                 "--hisa-top-k", "--no-hisa", "--max-queue", "--prefill-chunk", "--prefix-cache-tokens",
                 "--max-body-bytes", "HISA_PORT"):
        assert flag in out.stdout, flag
    assert elapsed < 5  # no torch import before parsing
    probe = subprocess.run([sys.executable, "-c", "import sys, server.cli; print('torch' in sys.modules)"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "False"


def test_bad_flag_values():
    bad = subprocess.run([sys.executable, "-m", "server.cli", "--port", "zero"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--port" in bad.stderr
    env_bad = subprocess.run([sys.executable, "-m", "server.cli"], cwd=ROOT, capture_output=True, text=True,
                             timeout=60, env={"HISA_MAX_MODEL_LEN": "-3", "PATH": ""})
    assert env_bad.returncode == 2 and "HISA_MAX_MODEL_LEN" in env_bad.stderr


def test_missing_model_exits_with_message(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "server.cli", "--model", str(tmp_path / "nope"), "--port", str(free_port()),
                           "--host", "127.0.0.1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "does not exist" in proc.stderr


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("limits")
    model = tiny_model_dir(tmp_path_factory.getbasetemp() / "server-tiny-llama")
    # flags from the environment; a load delay to observe the loading state
    env = {"HISA_MODEL": str(model), "HISA_SERVED_MODEL_NAME": MODEL, "HISA_MAX_NUM_SEQS": "1",
           "HISA_MAX_QUEUE": "1", "HISA_ALLOWED_ORIGINS": "http://example.test", "HISA_DEBUG_LOAD_DELAY": "3",
           "HISA_PREFILL_CHUNK": "16"}
    proc = ServerProcess([], d / "server.log", env=env, wait=False)
    yield proc
    proc.stop()


def test_loading_state_then_ready(server):
    deadline = time.monotonic() + 60
    r = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(server.url + "/health", timeout=2)
            break
        except httpx.HTTPError:
            time.sleep(0.05)
    assert r is not None and r.status_code == 503  # up at once, model still loading
    assert r.json()["status"] == "loading" and r.headers["retry-after"]
    chat = httpx.post(server.url + "/v1/chat/completions",
                      json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert chat.status_code == 503 and chat.headers["retry-after"]
    assert chat.json()["error"]["code"] == "model_loading"
    server.wait_ready(120)
    logs = server.logs()
    assert "longest context that fits" in logs and "HISA:" in logs and "on cpu" in logs


def test_queue_full_503(server):
    server.wait_ready(120)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    long_kw = dict(model=MODEL, messages=[{"role": "user", "content": "long " * 300}], max_tokens=1500,
                   stream=True, extra_body={"ignore_eos": True})
    first = client.chat.completions.create(**long_kw)  # runs (max-num-seqs 1)
    next(iter(first))
    results = {}

    def waiter():  # waits in the queue (max-queue 1)
        s = client.chat.completions.create(**{**long_kw, "max_tokens": 2})
        results["second"] = sum(1 for _ in s)

    t = threading.Thread(target=waiter)
    t.start()
    deadline = time.monotonic() + 30
    while metric_value(httpx.get(server.url + "/metrics").text, "hisa_num_requests_waiting") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
    assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
    assert r.json()["error"]["code"] == "queue_full"
    first.close()  # frees the slot: the waiting request runs
    t.join(60)
    assert results["second"] > 0
    m = httpx.get(server.url + "/metrics").text
    assert metric_value(m, "hisa_request_rejected_total", reason="queue_full") >= 1


def test_cors(server):
    server.wait_ready(120)
    pre = httpx.options(server.url + "/v1/chat/completions", headers={
        "Origin": "http://example.test", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "http://example.test"
    other = httpx.get(server.url + "/health", headers={"Origin": "http://evil.test"})
    assert "access-control-allow-origin" not in other.headers
