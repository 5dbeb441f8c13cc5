"""A real ``hisa-serve`` process with a tiny random Llama, driven by the official openai SDK (sync,
async, streaming) and raw HTTP: response shapes, parameters, the ``hisa`` extension, tokenizer routes."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from .server_utils import ServerProcess, metric_value, tiny_model_dir

KEY = "sk-test-key"
MODEL = "tiny"
MAX_LEN = 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    model = tiny_model_dir(tmp_path_factory.getbasetemp() / "server-tiny-llama")
    proc = ServerProcess(["--model", str(model), "--served-model-name", MODEL, "alias", "--api-key", KEY,
                          "--max-model-len", str(MAX_LEN), "--hisa-block-size", "16", "--hisa-top-blocks", "4",
                          "--hisa-top-k", "32", "--hisa-min-context", "0", "--prefill-chunk", "64"],
                         d / "server.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def chat(**kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hello there, tell me a story."}], **kw}


def sse_events(text: str) -> list:
    """data payloads of an SSE body (JSON-decoded, '[DONE]' kept as a string)."""
    out = []
    for line in text.splitlines():
        if line.startswith("data:"):
            data = line[5:].strip()
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# -- models, health --------------------------------------------------------------------------------------
def test_health_and_models(server, client, http):
    r = httpx.get(server.url + "/health")  # open without a key
    assert r.status_code == 200 and r.json()["status"] == "ok"
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids == [MODEL, "alias"]
    m = models.data[0]
    assert m.owned_by == "hisa-serve" and m.created > 0
    raw = http.get("/v1/models").json()["data"][0]
    assert raw["max_model_len"] == MAX_LEN and raw["root"] and raw["object"] == "model"
    assert client.models.retrieve("alias").id == "alias"


# -- chat ------------------------------------------------------------------------------------------------
def test_chat_non_stream_shape(client, http):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi!"}], max_tokens=7,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    choice = r.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and choice.finish_reason == "length"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert r.usage.completion_tokens == 7 and r.usage.total_tokens == r.usage.prompt_tokens + 7
    assert r.usage.prompt_tokens_details.cached_tokens >= 0
    raw = http.post("/v1/chat/completions", json=chat(max_tokens=3)).json()
    assert set(raw) >= {"id", "object", "created", "model", "choices", "usage", "system_fingerprint"}
    assert set(raw["choices"][0]) == {"index", "message", "logprobs", "finish_reason"}
    assert raw["choices"][0]["logprobs"] is None


def test_chat_stream_shape(client):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi!"}],
                                            max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi!"}], max_tokens=6,
                                          temperature=0, extra_body={"ignore_eos": True})
    assert text == full.choices[0].message.content


def test_chat_stream_raw_sse(http):
    with http.stream("POST", "/v1/chat/completions", json=chat(max_tokens=4, stream=True, temperature=0)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    events = sse_events(body)
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "usage" not in events[1]  # no include_usage: no usage key in chunks
    last = events[-2]["choices"][0]
    assert last["delta"] == {} and last["finish_reason"] in ("stop", "length")


def test_n_and_seed(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Pick words"}], max_tokens=8, temperature=1.0,
              n=3, seed=7, extra_body={"ignore_eos": True})
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1
    c = client.chat.completions.create(**{**kw, "seed": 8})
    assert [x.message.content for x in c.choices] != [x.message.content for x in a.choices]


def test_n_streaming(client):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                            n=2, stream=True, extra_body={"ignore_eos": True})
    finished = {}
    for chunk in stream:
        for ch in chunk.choices:
            if ch.finish_reason:
                finished[ch.index] = ch.finish_reason
    assert finished == {0: "length", 1: "length"}


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.token == entry.top_logprobs[0].token  # greedy picks the most likely token
        assert entry.bytes == list(entry.token.encode())
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                            temperature=0, logprobs=True, stream=True, extra_body={"ignore_eos": True})
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]


def test_stop_strings(client):
    base = dict(model=MODEL, messages=[{"role": "user", "content": "Say stuff"}], max_tokens=20, temperature=0,
                extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**base).choices[0].message.content
    assert len(full) > 6
    stop = full[3:6]
    r = client.chat.completions.create(**base, stop=[stop, "\u2603never"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[: full.index(stop)]
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(**base, stop=stop, stream=True) if c.choices)
    assert streamed == full[: full.index(stop)]


def test_sampling_params_accepted(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                                                              {"role": "user", "content": [{"type": "text", "text": "A"},
                                                                                           {"type": "text", "text": "B"}]},
                                                              {"role": "assistant", "content": "ok"},
                                                              {"role": "user", "content": "again"}],
                                       max_completion_tokens=5, temperature=0.7, top_p=0.9, presence_penalty=0.5,
                                       frequency_penalty=0.5, user="tester", seed=1,
                                       extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
                                                   "some_unknown_field": {"x": 1}})
    assert r.usage.completion_tokens <= 5 and r.choices[0].finish_reason in ("stop", "length")


def test_penalties_change_output(client):
    base = dict(model=MODEL, messages=[{"role": "user", "content": "repeat"}], max_tokens=30, temperature=0,
                extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(**base, logprobs=True).choices[0].logprobs.content
    pen = client.chat.completions.create(**base, frequency_penalty=2.0, logprobs=True).choices[0].logprobs.content
    ids_plain = [e.token for e in plain]
    ids_pen = [e.token for e in pen]
    assert len(set(ids_pen)) >= len(set(ids_plain))
    assert ids_plain != ids_pen or len(set(ids_plain)) == len(ids_plain)


# -- completions -----------------------------------------------------------------------------------------
def test_completions(client):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    batch = client.completions.create(model=MODEL, prompt=["One", "Two"], max_tokens=3, n=2, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text  # greedy: both choices of one prompt agree
    ids = client.completions.create(model=MODEL, prompt=[1, 500, 600], max_tokens=2, extra_body={"ignore_eos": True})
    assert ids.usage.prompt_tokens == 3
    echo = client.completions.create(model=MODEL, prompt="Echo me", max_tokens=2, echo=True, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert echo.choices[0].text.startswith("Echo me")
    lp = client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, logprobs=2, temperature=0,
                                   extra_body={"ignore_eos": True})
    lpc = lp.choices[0].logprobs
    assert len(lpc.tokens) == 3 and len(lpc.token_logprobs) == 3 and all(len(t) <= 2 for t in lpc.top_logprobs)
    assert lpc.text_offset[0] == 0
    default = client.completions.create(model=MODEL, prompt="x", extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions


def test_completions_stream(client):
    chunks = list(client.completions.create(model=MODEL, prompt="Stream", max_tokens=4, stream=True, temperature=0,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    full = client.completions.create(model=MODEL, prompt="Stream", max_tokens=4, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert text == full.choices[0].text


# -- async SDK ---------------------------------------------------------------------------------------------
def test_async_sdk_concurrent(server):
    async def go():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        prompts = [f"Question number {i}: what is {i} plus {i}?" + "!" * i for i in range(5)]

        async def ask(p, stream):
            # seeded sampling: each prompt's answer is reproducible and differs from the others'
            kw = dict(model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=8, temperature=1.0,
                      seed=len(p), extra_body={"ignore_eos": True})
            if stream:
                s = await client.chat.completions.create(**kw, stream=True)
                return "".join([c.choices[0].delta.content or "" async for c in s if c.choices])
            r = await client.chat.completions.create(**kw)
            return r.choices[0].message.content

        seq = [await ask(p, False) for p in prompts]  # one at a time
        conc = await asyncio.gather(*(ask(p, i % 2 == 0) for i, p in enumerate(prompts)))
        await client.close()
        return seq, conc

    seq, conc = asyncio.run(go())
    assert list(conc) == seq  # concurrent answers equal the one-at-a-time ones: nothing mixed up
    assert len(set(seq)) > 1


# -- hisa extension, prefix reuse --------------------------------------------------------------------------
def test_hisa_extension_usage(client):
    doc = " ".join(f"word{i}" for i in range(150))
    msgs = [{"role": "user", "content": doc}]
    sparse = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3)
    h = sparse.usage.hisa
    assert h["enabled"] is True and h["fraction"] < 1.0 and h["attended_kv_tokens"] < h["visible_kv_tokens"]
    dense = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3,
                                           extra_body={"hisa": {"enabled": False}})
    assert dense.usage.hisa["enabled"] is False and dense.usage.hisa["fraction"] == 1.0
    # other attention settings never reuse K/V computed under different ones: both compute the whole
    # prompt (the same work), only the budget differs
    narrow = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3,
                                            extra_body={"hisa": {"top_k": 16}})
    wide = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3,
                                          extra_body={"hisa": {"top_k": 48, "top_blocks": 4}})
    assert narrow.usage.hisa["top_k"] == 16 and wide.usage.hisa["top_k"] == 48
    assert narrow.usage.prompt_tokens_details.cached_tokens == wide.usage.prompt_tokens_details.cached_tokens == 0
    assert narrow.usage.hisa["visible_kv_tokens"] == wide.usage.hisa["visible_kv_tokens"]
    assert narrow.usage.hisa["fraction"] < wide.usage.hisa["fraction"] < 1.0


def test_prefix_reuse_reports_cached_tokens_and_same_answer(client):
    doc = "Document. " + " ".join(f"fact {i} is {i * 7}." for i in range(60))
    first = [{"role": "user", "content": doc + "\nQuestion: what is fact 3?"}]
    second = [{"role": "user", "content": doc + "\nQuestion: what is fact 9?"}]
    kw = dict(model=MODEL, max_tokens=8, temperature=0, logprobs=True, extra_body={"ignore_eos": True})

    def same(a, b):  # same tokens and (numerically) the same log-probabilities
        la, lb = a.choices[0].logprobs.content, b.choices[0].logprobs.content
        assert [x.token for x in la] == [x.token for x in lb]
        assert [x.logprob for x in la] == pytest.approx([x.logprob for x in lb], abs=1e-3)

    cold = client.chat.completions.create(messages=second, **kw)  # only the system prompt is cached yet
    assert cold.usage.prompt_tokens_details.cached_tokens < 40
    a1 = client.chat.completions.create(messages=first, **kw)  # reuses the document from `cold`
    assert a1.usage.prompt_tokens_details.cached_tokens > 300
    warm = client.chat.completions.create(messages=second, **kw)  # document cached, question recomputed
    cached = warm.usage.prompt_tokens_details.cached_tokens
    assert 300 < cached < warm.usage.prompt_tokens - 1
    same(warm, cold)
    again = client.chat.completions.create(messages=second, **kw)
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    same(again, cold)


# -- tokenizer routes ----------------------------------------------------------------------------------------
def test_tokenize_detokenize(http):
    r = http.post("/tokenize", json={"model": MODEL, "prompt": "Hello world"})
    assert r.status_code == 200
    body = r.json()
    assert body["count"] == len(body["tokens"]) > 0 and body["max_model_len"] == MAX_LEN
    d = http.post("/detokenize", json={"model": MODEL, "tokens": body["tokens"]}).json()
    assert "Hello world" in d["prompt"]
    chat_tok = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}],
                                            "return_token_strs": True}).json()
    assert chat_tok["count"] > 3 and len(chat_tok["token_strs"]) == chat_tok["count"]


def test_metrics_move(server, client):
    before = httpx.get(server.url + "/metrics").text
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "count me"}], max_tokens=5,
                                   extra_body={"ignore_eos": True})
    after = httpx.get(server.url + "/metrics").text
    for name in ("hisa_generation_tokens_total", "hisa_prompt_tokens_total", "hisa_e2e_request_latency_seconds_count",
                 "hisa_time_to_first_token_seconds_count", "hisa_request_queue_time_seconds_count"):
        assert metric_value(after, name) > metric_value(before, name), name
    assert metric_value(after, "hisa_generation_tokens_total") - metric_value(before, "hisa_generation_tokens_total") == 5
    assert metric_value(after, "hisa_inter_token_latency_seconds_count") >= 4
    assert metric_value(after, "hisa_num_requests_running") == 0
    assert metric_value(after, "hisa_num_requests_waiting") == 0
    assert metric_value(after, "hisa_pooled_index_bytes") > 0  # the prefix cache holds pooled keys
    assert 0 < metric_value(after, "hisa_attended_kv_fraction") <= 1
    assert metric_value(after, "hisa_attended_kv_tokens_total") > 0
