"""End to end with the real embedded model (SmolLM2-135M-Instruct): ``hisa-serve`` with no --model answers a
question sensibly over a stream. Slow on 2 CPU cores (model load + generation): run with ``-m slow``."""

from __future__ import annotations

import openai
import pytest

from .server_utils import ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess([], tmp_path_factory.mktemp("embedded") / "server.log", timeout=600)
    yield proc
    proc.stop()


def test_embedded_model_streams_a_sensible_answer(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    assert client.models.list().data[0].id == "SmolLM2-135M-Instruct"
    stream = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", temperature=0, max_tokens=40, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}])
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert "Paris" in text
    assert usage.completion_tokens < 40  # it stopped by itself (end of turn)
    # a follow-up in the same conversation reuses the cached conversation
    follow = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", temperature=0, max_tokens=40,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."},
                  {"role": "assistant", "content": text},
                  {"role": "user", "content": "And of Italy?"}])
    assert "Rome" in follow.choices[0].message.content
    assert follow.usage.prompt_tokens_details.cached_tokens > 30
