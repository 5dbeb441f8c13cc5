"""The generation engine in-process (no HTTP): prefix reuse, chunked prefill, cancellation, sampling."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from server.detok import TextStream
from server.engine import Delta, Done, Engine, EngineConfig, Failed, GenRequest, Job, Progress
from server.prefix_cache import PrefixCache, common_prefix
from server.sampling import SamplerState, SamplingParams, _split_argmax, argmax

from .server_utils import tiny_model_dir

HISA_SPARSE = dict(hisa_block_size=16, hisa_top_blocks=4, hisa_top_k=32, hisa_min_context=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.getbasetemp() / "server-tiny-llama")


def make_engine(model_dir, **kw) -> Engine:
    cfg = EngineConfig(model=str(model_dir), served_model_name="tiny", **{**HISA_SPARSE, **kw})
    engine = Engine(cfg)
    engine.start()
    assert engine.ready.wait(120), engine.load_error
    return engine


@pytest.fixture(scope="module")
def engine(model_dir):
    e = make_engine(model_dir, prefill_chunk=64, prefix_cache_tokens=100_000)
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def cold_engine(model_dir):
    e = make_engine(model_dir, prefill_chunk=4096, prefix_cache_tokens=0)
    yield e
    e.shutdown()


def run(engine: Engine, prompts, params: SamplingParams, overrides=None, on_event=None):
    """Submit one request, collect its events; returns (tokens per index, Done.usage, events)."""

    async def go():
        jobs = [Job(list(p), i) for i, p in enumerate(prompts)]
        req = GenRequest(jobs, params, asyncio.get_running_loop(), overrides)
        engine.submit(req)
        tokens = {i: [] for i in range(len(jobs))}
        events = []
        while True:
            ev = await asyncio.wait_for(req.events.get(), 120)
            events.append(ev)
            if on_event:
                on_event(req, ev)
            if isinstance(ev, Delta):
                tokens[ev.index].append(ev.token)
            elif isinstance(ev, Done):
                return tokens, ev.usage, events
            elif isinstance(ev, Failed):
                raise ev.error

    return asyncio.run(go())


def run_together(engine: Engine, prompts, params: SamplingParams) -> list[list[int]]:
    """Submit one request per prompt at once; returns each request's tokens."""

    async def go():
        reqs = [GenRequest([Job(p, 0)], params, asyncio.get_running_loop()) for p in prompts]
        for r in reqs:
            engine.submit(r)

        async def collect(r):
            toks = []
            while True:
                ev = await asyncio.wait_for(r.events.get(), 120)
                if isinstance(ev, Delta):
                    toks.append(ev.token)
                if isinstance(ev, Done):
                    return toks

        return await asyncio.gather(*(collect(r) for r in reqs))

    return asyncio.run(go())


async def abort_and_drain(engine: Engine, req: GenRequest, timeout: float = 30) -> None:
    """Cancel ``req`` (its client left) and wait until the engine runs no sequence."""
    engine.abort(req)
    deadline = time.monotonic() + timeout
    while engine.stats()["running_sequences"] and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def prompt(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 40000, (n,), generator=g).tolist()


GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def test_chunked_prefill_matches_one_shot(engine, cold_engine):
    p = prompt(300, seed=1)
    chunked, u1, events = run(engine, [p], GREEDY)
    whole, u2, _ = run(cold_engine, [p], GREEDY)
    assert chunked == whole
    progress = [e for e in events if isinstance(e, Progress)]
    assert [e.processed for e in progress][-1] == 300 and len(progress) >= 5  # 64-token chunks
    assert all(e.total == 300 for e in progress)
    assert u1["completion_tokens"] == 12 and u1["prompt_tokens"] == 300


def test_prefix_reuse_same_tokens_as_cold_run(engine, cold_engine):
    doc = prompt(400, seed=2)
    q1, q2 = prompt(20, seed=3), prompt(25, seed=4)
    run(engine, [doc + q1], GREEDY)  # fills the prefix cache with the document
    warm, usage, _ = run(engine, [doc + q2], GREEDY)
    cold, cold_usage, _ = run(cold_engine, [doc + q2], GREEDY)
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 400
    assert cold_usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert warm == cold
    # the exact same prompt again: everything but the last prompt token is reused
    again, usage, _ = run(engine, [doc + q2], GREEDY)
    assert again == cold
    assert usage["prompt_tokens_details"]["cached_tokens"] == len(doc + q2) - 1


def test_follow_up_reuses_generated_tokens(engine):
    p = prompt(100, seed=5)
    first, _, _ = run(engine, [p], GREEDY)
    follow = p + first[0] + prompt(10, seed=6)
    _, usage, _ = run(engine, [follow], GREEDY)
    # the cache held the prompt and all generated tokens but the last (never fed back)
    assert usage["prompt_tokens_details"]["cached_tokens"] == 100 + 12 - 1


def test_lookahead_gives_the_same_answers(engine, model_dir):
    """Engine lookahead (decode step n+1 enqueued before token n is read, the default on CUDA) changes
    nothing a client sees: greedy and seeded answers, several choices, log-probabilities, and answers ended
    early by a stop string, where the step computed after the last token is dropped."""
    ahead = make_engine(model_dir, prefill_chunk=64, prefix_cache_tokens=100_000, lookahead=True)
    try:
        assert ahead.lookahead and not engine.lookahead
        p = prompt(90, seed=40)
        sampled = SamplingParams(max_tokens=9, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True,
                                 logprobs=True, top_logprobs=2)
        for params in (GREEDY, sampled):
            a, ua, ea = run(engine, [p, p], params)
            b, ub, eb = run(ahead, [p, p], params)
            assert a == b and all(len(t) == params.max_tokens for t in b.values())
            assert ua["completion_tokens"] == ub["completion_tokens"] == 2 * params.max_tokens
            lp = [[(e.sample.logprob, e.sample.top) for e in ev if isinstance(e, Delta)] for ev in (ea, eb)]
            assert lp[0] == lp[1]
        # a stop string that ends the answer at its 5th token or later (a prompt whose answer has one)
        draw = SamplingParams(max_tokens=12, temperature=1.0, seed=3, ignore_eos=True)
        for seed in range(40, 60):
            p = prompt(90, seed=seed)
            toks = run(engine, [p], draw)[0][0]
            texts = [engine.decode(toks[: i + 1]) for i in range(len(toks))]
            pieces = [texts[i][len(texts[i - 1]) :] for i in range(1, len(toks))]
            found = [i + 1 for i, piece in enumerate(pieces) if i >= 3 and piece.strip() and piece not in texts[i]]
            if found:
                break
        assert found, "no prompt gave an answer with a usable stop string"
        stop_at = found[0]
        stop = texts[stop_at][len(texts[stop_at - 1]) :]
        params = SamplingParams(max_tokens=12, temperature=1.0, seed=3, ignore_eos=True, stop=[stop])
        a, _, ea = run(engine, [p], params)
        b, _, eb = run(ahead, [p], params)
        assert a == b and len(b[0]) == stop_at + 1
        assert [e.finish_reason for e in eb if isinstance(e, Delta)][-1] == "stop"
        assert "".join(e.text for e in ea if isinstance(e, Delta)) == "".join(e.text for e in eb if isinstance(e, Delta))
        # the follow-up reuses the cache, which (with lookahead) also holds the last generated token
        follow = p + b[0] + prompt(6, seed=41)
        c, usage, _ = run(ahead, [follow], GREEDY)
        assert usage["prompt_tokens_details"]["cached_tokens"] == len(p) + len(b[0])
        assert c == run(engine, [follow], GREEDY)[0]

        # answers of one and two tokens (no step or one step ahead), and concurrent requests
        for n in (1, 2):
            short = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
            assert run(ahead, [p], short)[0] == run(engine, [p], short)[0]
        prompts = [prompt(60 + 7 * i, seed=50 + i) for i in range(3)]
        expected = [run(engine, [x], GREEDY)[0][0] for x in prompts]

        assert run_together(ahead, prompts, GREEDY) == expected

        # a client that leaves mid-answer: the step in flight is settled and the cache freed
        async def leave():
            req = GenRequest([Job(prompt(60, seed=42), 0)], SamplingParams(max_tokens=500, temperature=0.0,
                                                                          ignore_eos=True),
                             asyncio.get_running_loop())
            ahead.submit(req)
            deltas = 0
            while deltas < 3:
                deltas += isinstance(await asyncio.wait_for(req.events.get(), 60), Delta)
            await abort_and_drain(ahead, req)
            return req

        req = asyncio.run(leave())
        assert req.cancelled and req.finished
        stats = ahead.stats()
        assert stats["running_sequences"] == 0 and stats["live_cache_bytes"] == {"kv": 0, "pooled": 0}
        assert run(ahead, [p], GREEDY)[0] == run(engine, [p], GREEDY)[0]  # and it still serves
    finally:
        ahead.shutdown()


def test_cancel_mid_prefill_frees_cache(model_dir):
    e = make_engine(model_dir, prefill_chunk=16, prefix_cache_tokens=100_000)
    try:
        p = prompt(1500, seed=7)
        seen = {}

        async def go():
            req = GenRequest([Job(p, 0)], GREEDY, asyncio.get_running_loop())
            e.submit(req)
            ev = await asyncio.wait_for(req.events.get(), 60)
            assert isinstance(ev, Progress) and ev.processed < ev.total
            seen["live"] = e.stats()["live_cache_bytes"]["kv"]
            await abort_and_drain(e, req)
            return req

        req = asyncio.run(go())
        stats = e.stats()
        assert seen["live"] > 0
        assert req.cancelled and req.finished
        assert stats["running_sequences"] == 0
        assert stats["live_cache_bytes"] == {"kv": 0, "pooled": 0}
        assert stats["prefix_cache_entries"] == 0  # a cancelled prefill is not kept
        # and the engine still serves
        out, usage, _ = run(e, [prompt(50, seed=8)], GREEDY)
        assert len(out[0]) == 12
    finally:
        e.shutdown()


def test_hisa_override_and_usage(engine):
    p = prompt(200, seed=9)
    _, sparse, _ = run(engine, [p], GREEDY)
    _, dense, _ = run(engine, [p + [5]], GREEDY, overrides={"enabled": False})
    assert sparse["hisa"]["fraction"] < 0.5  # top_k 32 of up to 212 visible keys
    assert sparse["hisa"]["attended_kv_tokens"] < sparse["hisa"]["visible_kv_tokens"]
    assert dense["hisa"]["fraction"] == 1.0 and dense["hisa"]["enabled"] is False


def test_n_choices_and_seed(engine):
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=123, ignore_eos=True)
    p = prompt(30, seed=10)
    a, ua, _ = run(engine, [p, p, p], params)
    b, _, _ = run(engine, [p, p, p], params)
    assert a == b  # same seed, same draws
    assert len({tuple(v) for v in a.values()}) > 1  # the choices differ from each other
    assert ua["prompt_tokens"] == 30  # the shared prompt counts once
    assert ua["completion_tokens"] == 24


def test_concurrent_requests_unmixed(engine, cold_engine):
    prompts = [prompt(60 + 7 * i, seed=20 + i) for i in range(4)]
    expected = [run(cold_engine, [p], GREEDY)[0][0] for p in prompts]

    assert run_together(engine, prompts, GREEDY) == expected


def test_queue_bound(model_dir):
    e = make_engine(model_dir, max_queue=1, max_num_seqs=1, prefill_chunk=8)
    try:
        from server.errors import APIError

        async def go():
            loop = asyncio.get_running_loop()
            long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
            a = GenRequest([Job(prompt(400), 0)], long, loop)
            b = GenRequest([Job(prompt(400), 0)], long, loop)
            c = GenRequest([Job(prompt(400), 0)], long, loop)
            e.submit(a)
            await asyncio.sleep(0.2)  # a is admitted, b waits
            e.submit(b)
            with pytest.raises(APIError) as err:
                e.submit(c)
            assert err.value.status == 503 and err.value.headers.get("Retry-After")
            e.abort(a)
            e.abort(b)

        asyncio.run(go())
    finally:
        e.shutdown()


# -- units -----------------------------------------------------------------------------------------------
def test_sampler_greedy_topk_and_penalties():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5])
    s = SamplerState(SamplingParams(temperature=0.0), 4, "cpu")
    tok, sample = s.sample(logits)
    assert sample.token == 1
    s = SamplerState(SamplingParams(temperature=1.0, top_k=1, seed=0), 4, "cpu")
    assert s.sample(logits)[1].token == 1
    # frequency penalty pushes away from the repeated token
    s = SamplerState(SamplingParams(temperature=0.0, frequency_penalty=2.0), 4, "cpu")
    assert [s.sample(logits)[1].token for _ in range(3)] == [1, 2, 0]  # 3-2=1 ties with 1: first wins
    s = SamplerState(SamplingParams(temperature=0.0, repetition_penalty=10.0), 4, "cpu", prompt_ids=[1])
    assert s.sample(logits)[1].token == 2
    s = SamplerState(SamplingParams(temperature=0.0, logit_bias={3: 100.0}), 4, "cpu")
    assert s.sample(logits)[1].token == 3


def test_sampler_top_p_min_p_and_seed():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    s = SamplerState(SamplingParams(temperature=1.0, top_p=0.6, seed=1), 4, "cpu")
    assert {s.sample(logits)[1].token for _ in range(200)} == {0, 1}
    s = SamplerState(SamplingParams(temperature=1.0, min_p=0.5, seed=1), 4, "cpu")
    assert {s.sample(logits)[1].token for _ in range(200)} == {0, 1}
    draws = []
    for _ in range(2):
        s = SamplerState(SamplingParams(temperature=1.0, seed=42), 4, "cpu")
        draws.append([s.sample(logits)[1].token for _ in range(50)])
    assert draws[0] == draws[1] and len(set(draws[0])) > 2


def test_sampler_logprobs():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5])
    s = SamplerState(SamplingParams(temperature=0.0, logprobs=True, top_logprobs=2), 4, "cpu")
    _, sample = s.sample(logits)
    lsm = torch.log_softmax(logits, -1)
    assert sample.logprob == pytest.approx(lsm[1].item())
    assert [t for t, _ in sample.top] == [1, 2]
    assert sample.top[1][1] == pytest.approx(lsm[2].item())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_argmax_over_chunks_resolves_as_torch(device):
    g = torch.Generator().manual_seed(0)
    for n in (16384, 32000, 49152, 100003, 128256, 151936):
        x = torch.randn(n, generator=g).to(device)
        assert _split_argmax(x).tolist() == [x.argmax().item()] == argmax(x).tolist()
        x[n // 3] = x[n - 5] = 1e4  # a tie: the first position wins
        assert _split_argmax(x).item() == n // 3 == argmax(x).item()
        x[n // 2] = float("nan")  # NaN counts as the largest, as for torch.argmax
        assert _split_argmax(x).item() == n // 2 == argmax(x).item()
        x.fill_(float("-inf"))
        assert _split_argmax(x).item() == x.argmax().item() == 0


class _CharTok:
    """A tokenizer whose ids are characters (enough for TextStream)."""

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join(chr(i) for i in ids)


def test_text_stream_stop_strings_hold_back():
    ts = TextStream(_CharTok(), stop=["END"])
    out = "".join(ts.push(ord(c)) for c in "abcEN")
    assert out == "abc"  # "EN" is held back: it may start "END"
    out += ts.push(ord("x"))
    assert out == "abcENx" and not ts.stopped
    out += "".join(ts.push(ord(c)) for c in "yEND tail")
    assert out == "abcENxy" and ts.stopped


def test_text_stream_flush():
    ts = TextStream(_CharTok(), stop=["##"])
    out = "".join(ts.push(ord(c)) for c in "ab#")
    assert out == "ab"
    assert ts.flush() == "#"


def test_prefix_cache_lru_and_prefix_match():
    class FakeCache:
        def __init__(self, n):
            self.layers = [type("L", (), {"capacity": n})()]
            self.released = False

        def release(self):
            self.released = True

        def nbytes(self):
            return {"kv": 0, "pooled": 0}

    pc = PrefixCache(max_tokens=250)
    a, b, c = FakeCache(100), FakeCache(100), FakeCache(100)
    pc.put(torch.arange(100), a)
    pc.put(torch.arange(1000, 1100), b)
    pc.put(torch.arange(2000, 2100), c)  # over budget: a (least recently used) goes
    assert a.released and len(pc) == 2
    got, n = pc.take(torch.cat([torch.arange(1000, 1050), torch.tensor([7])]))
    assert got is b and n == 50 and len(pc) == 1
    assert pc.take(torch.tensor([5, 6]))[0] is None
    assert common_prefix(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4, 5])) == 2


def test_other_document_after_the_same_prefix_copies_it(engine, cold_engine):
    """Two documents behind the same system prompt: the second reuses a copy of the shared prompt and the
    first document's cache stays for its own follow-up; answers equal cold runs."""
    system = prompt(40, seed=40)
    doc_a, doc_b = system + prompt(300, seed=41), system + prompt(280, seed=42)
    run(engine, [doc_a], GREEDY)
    answer_b, usage, _ = run(engine, [doc_b], GREEDY)
    assert usage["prompt_tokens_details"]["cached_tokens"] == 40
    assert answer_b == run(cold_engine, [doc_b], GREEDY)[0]
    follow_a = doc_a + prompt(9, seed=43)
    answer_a, usage, _ = run(engine, [follow_a], GREEDY)
    assert usage["prompt_tokens_details"]["cached_tokens"] >= len(doc_a)
    assert answer_a == run(cold_engine, [follow_a], GREEDY)[0]


def test_prefix_cache_takes_or_copies():
    class FakeCache:
        def __init__(self, n):
            self.layers = [type("L", (), {"capacity": n})()]
            self.clones = []

        def clone_prefix(self, n, capacity):
            self.clones.append((n, capacity))
            return ("copy", n)

        def release(self):
            pass

    pc = PrefixCache(max_tokens=10_000)
    a = FakeCache(100)
    pc.put(torch.arange(100), a)
    got, n = pc.take(torch.cat([torch.arange(20), torch.tensor([999])]), capacity=500)
    assert got == ("copy", 20) and n == 20 and a.clones == [(20, 500)] and len(pc) == 1  # kept
    got, n = pc.take(torch.cat([torch.arange(60), torch.tensor([999])]))
    assert got is a and n == 60 and len(pc) == 0  # most of it: taken


def test_prefix_reuse_only_between_equal_attention_settings(engine):
    doc = prompt(300, seed=30)
    run(engine, [doc], GREEDY, overrides={"enabled": False})
    _, usage, _ = run(engine, [doc + [7]], GREEDY)  # HISA on: the dense-computed K/V are not reused
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    _, usage, _ = run(engine, [doc + [8]], GREEDY, overrides={"enabled": False})
    assert usage["prompt_tokens_details"]["cached_tokens"] == 300


def test_prefix_cache_tags():
    class FakeCache:
        layers = []

        def release(self):
            pass

    pc = PrefixCache(max_tokens=1000)
    c = FakeCache()
    pc.put(torch.arange(50), c, tag=(("enabled", False),))
    assert pc.take(torch.arange(60))[0] is None
    assert pc.take(torch.arange(60), tag=(("enabled", False),)) == (c, 50)


def test_cancel_inside_a_prefill_chunk(model_dir):
    """A client leaving in the middle of one (long) prefill chunk stops it between decoder layers."""
    e = make_engine(model_dir, prefill_chunk=4096, prefix_cache_tokens=100_000)
    try:
        p = prompt(1000, seed=40)
        box = {}
        layer = e.model.get_decoder().layers[0]
        calls = {"n": 0}

        def leave(module, args):  # the client goes away as layer 0 of the only chunk starts
            calls["n"] += 1
            if "req" in box and calls["n"] == 1:
                e.abort(box["req"])

        # the engine's hook on layer 1 notices
        handle = layer.register_forward_pre_hook(leave)

        async def go():
            req = GenRequest([Job(p, 0)], GREEDY, asyncio.get_running_loop())
            box["req"] = req
            e.submit(req)
            deadline = time.monotonic() + 30
            while not req.finished and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            events = []
            while not req.events.empty():
                events.append(req.events.get_nowait())
            return req, events

        try:
            req, events = asyncio.run(go())
        finally:
            handle.remove()
        assert req.cancelled and req.finished
        assert not [ev for ev in events if isinstance(ev, (Delta, Progress, Done))]  # the chunk never finished
        stats = e.stats()
        assert stats["running_sequences"] == 0 and stats["live_cache_bytes"] == {"kv": 0, "pooled": 0}
        assert stats["prefix_cache_entries"] == 0
        out, _, _ = run(e, [prompt(40, seed=41)], GREEDY)  # still serving
        assert len(out[0]) == 12
    finally:
        e.shutdown()


def test_engine_loop_survives_an_internal_error(model_dir, monkeypatch):
    """An exception outside a request's own step (here: in admission) fails the running requests with a
    500-class error instead of killing the worker thread; the next request is served normally."""
    engine = make_engine(model_dir, prefill_chunk=64, prefix_cache_tokens=0)
    try:
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        expected, _, _ = run(engine, [[5, 6, 7, 8]], params)
        original = engine._admit
        calls = {"n": 0}

        def broken_once():
            calls["n"] += 1
            if calls["n"] == 2:  # admits the request, then fails before its first step
                original()
                raise RuntimeError("boom")
            return original()

        monkeypatch.setattr(engine, "_admit", broken_once)
        with pytest.raises(Exception, match="internal error"):
            run(engine, [[5, 6, 7, 8]], params)
        again, _, _ = run(engine, [[5, 6, 7, 8]], params)
        assert again == expected
        assert not engine._active
    finally:
        engine.shutdown()


def test_cache_keeps_room_for_the_follow_up_step(engine):
    """A short answer leaves room in its cache for the follow-up chunk step that the engine records while
    idle (positions from the cache's length on), so a follow-up question replays it instead of recording."""
    from hisa.graph import CHUNK

    for n, max_tokens in ((300, 3), (317, 1), (250, 8)):
        p = prompt(n, seed=n)
        run(engine, [p], SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        entry = next(e for e in engine.prefix_cache._entries.values() if e.tokens[:n].tolist() == p)
        held = entry.cache.get_seq_length()
        assert held >= n
        assert all(layer.capacity >= held + CHUNK for layer in entry.cache.layers), (n, held)
