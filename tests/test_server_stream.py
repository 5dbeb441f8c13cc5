"""Streaming behaviour of a real ``hisa-serve``: headers at once, keep-alive comments and progress events
during a long prefill, client disconnects (mid-prefill and mid-decode) cancel the request and free its
cache, concurrent clients get their own answers."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import openai
import pytest

from .server_utils import ServerProcess, metric_value, tiny_model_dir

MODEL = "tiny"
LONG = " ".join(f"w{i}" for i in range(700))  # ~2900 tokens


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    model = tiny_model_dir(tmp_path_factory.getbasetemp() / "server-tiny-llama")
    proc = ServerProcess(["--model", str(model), "--served-model-name", MODEL, "--max-model-len", "4096",
                          "--prefill-chunk", "8", "--hisa-block-size", "16", "--hisa-top-blocks", "4",
                          "--hisa-top-k", "32", "--hisa-min-context", "0", "--prefix-cache-tokens", "0"],
                         d / "server.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def metrics(server) -> str:
    return httpx.get(server.url + "/metrics").text


def wait_idle(server, timeout=30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = metrics(server)
        if metric_value(text, "hisa_num_requests_running") == 0 and metric_value(text, "hisa_num_requests_waiting") == 0:
            return text
        time.sleep(0.05)
    raise TimeoutError("server still busy")


def test_long_prefill_headers_keepalive_progress(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": LONG}], "max_tokens": 3, "stream": True,
            "hisa": {"progress": True}, "ignore_eos": True}
    t0 = time.monotonic()
    lines = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
        t_headers = time.monotonic() - t0
        assert r.status_code == 200
        for line in r.iter_lines():
            lines.append((time.monotonic() - t0, line))
    data = [(t, json.loads(line[5:])) for t, line in lines if line.startswith("data:") and "[DONE]" not in line]
    comments = [line for _, line in lines if line.startswith(":")]
    progress = [d["hisa_progress"] for _, d in data if "hisa_progress" in d]
    first_content = next(t for t, d in data if d["choices"] and d["choices"][0]["delta"].get("content") is not None
                         and d["choices"][0]["delta"].get("role") is None)
    assert t_headers < first_content / 2  # headers went out long before the first token
    assert data[0][1]["choices"][0]["delta"]["role"] == "assistant"
    assert any(c.startswith(": prefill") for c in comments)  # keep-alives during prefill
    assert len(progress) > 10
    assert [p["processed_tokens"] for p in progress] == sorted(p["processed_tokens"] for p in progress)
    assert progress[-1]["processed_tokens"] == progress[-1]["total_tokens"] > 2000
    assert all(d["choices"] == [] for _, d in data if "hisa_progress" in d)
    assert [line for _, line in lines if line][-1] == "data: [DONE]"


def test_sdk_tolerates_progress_chunks(client):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": LONG[:3000]}],
                                            max_tokens=3, stream=True, extra_body={"hisa": {"progress": True},
                                                                                   "ignore_eos": True})
    text, progress = "", []
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        else:
            progress.append(chunk.hisa_progress)
    assert progress and progress[-1]["processed_tokens"] == progress[-1]["total_tokens"]
    assert text


def test_disconnect_mid_prefill_cancels_and_frees(server, client):
    before = wait_idle(server)
    body = {"model": MODEL, "messages": [{"role": "user", "content": LONG}], "max_tokens": 50, "stream": True,
            "hisa": {"progress": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if "hisa_progress" in line:
                p = json.loads(line[5:])["hisa_progress"]
                assert p["processed_tokens"] < p["total_tokens"]
                break
    # the client is gone: the request is cancelled between prefill chunks and its cache freed
    after = wait_idle(server)
    assert metric_value(after, "hisa_request_aborted_total", reason="cancelled") == \
        metric_value(before, "hisa_request_aborted_total", reason="cancelled") + 1
    assert metric_value(after, "hisa_kv_cache_bytes") == 0
    assert metric_value(after, "hisa_generation_tokens_total") == metric_value(before, "hisa_generation_tokens_total")
    assert metric_value(after, "hisa_prompt_tokens_total") == metric_value(before, "hisa_prompt_tokens_total")
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "still there?"}],
                                       max_tokens=4, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4


def test_disconnect_mid_decode_then_healthy(server, client):
    before = wait_idle(server)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go on forever"}],
                                            max_tokens=3000, stream=True, extra_body={"ignore_eos": True})
    got = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            got += 1
            if got == 5:
                break
    stream.close()
    after = wait_idle(server)
    assert metric_value(after, "hisa_request_aborted_total", reason="cancelled") == \
        metric_value(before, "hisa_request_aborted_total", reason="cancelled") + 1
    assert metric_value(after, "hisa_kv_cache_bytes") == 0
    # the decode stopped early: far fewer than 3000 tokens were generated
    assert metric_value(after, "hisa_request_success_total") == metric_value(before, "hisa_request_success_total")
    assert httpx.get(server.url + "/health").status_code == 200
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "next"}], max_tokens=3,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"


def test_non_stream_client_timeout_cancels(server):
    before = wait_idle(server)
    impatient = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": LONG}], max_tokens=1000,
                                          extra_body={"ignore_eos": True})
    after = wait_idle(server)
    assert metric_value(after, "hisa_request_aborted_total", reason="cancelled") == \
        metric_value(before, "hisa_request_aborted_total", reason="cancelled") + 1
    assert metric_value(after, "hisa_kv_cache_bytes") == 0


def test_concurrent_threads_unmixed(server, client):
    prompts = [f"Tell me about topic {i}. " + "more " * (i * 20) for i in range(6)]

    def ask(p, stream=False):
        kw = dict(model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=10, temperature=1.0,
                  seed=len(p), extra_body={"ignore_eos": True})
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(**kw, stream=True) if c.choices)
        return client.chat.completions.create(**kw).choices[0].message.content

    expected = [ask(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda ip: ask(ip[1], stream=ip[0] % 2 == 1), enumerate(prompts)))
    assert got == expected
    assert len(set(expected)) == len(expected)
    text = wait_idle(server)
    assert metric_value(text, "hisa_request_queue_time_seconds_count") >= 12
