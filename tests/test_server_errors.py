"""Error shapes over raw HTTP: every failure is an OpenAI error envelope with the right status, and the
server keeps serving afterwards."""

from __future__ import annotations

import httpx
import openai
import pytest

from .server_utils import ServerProcess, tiny_model_dir

KEY = "sk-errors"
MODEL = "tiny"
MAX_LEN = 256
MAX_BODY = 20_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("errors")
    model = tiny_model_dir(tmp_path_factory.getbasetemp() / "server-tiny-llama")
    proc = ServerProcess(["--model", str(model), "--served-model-name", MODEL, "--max-model-len", str(MAX_LEN),
                          "--max-body-bytes", str(MAX_BODY)], d / "server.log", env={"HISA_API_KEY": KEY})
    yield proc
    proc.stop()


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def assert_error(r: httpx.Response, status: int, code=None, param=None):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def ok_chat(http):
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                "max_tokens": 2})
    assert r.status_code == 200, r.text
    return r.json()


# -- authentication ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                                         ("POST", "/v1/completions"), ("POST", "/tokenize"),
                                         ("POST", "/detokenize"), ("GET", "/v1/nope")])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                                     {"Authorization": KEY}])
def test_api_key_required(server, method, path, headers):
    r = httpx.request(method, server.url + path, headers=headers, json={"model": MODEL})
    err = assert_error(r, 401, code="invalid_api_key")
    assert err["type"] == "invalid_request_error"
    assert r.headers.get("www-authenticate") == "Bearer"


def test_open_routes_and_sdk_auth(server):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="bad", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0).models.list()
    assert ok.data[0].id == MODEL


# -- routing -------------------------------------------------------------------------------------------------
def test_unknown_route_and_method(http, server):
    assert_error(http.get("/v1/does-not-exist"), 404)
    assert_error(http.get("/nothing/here"), 404)  # with the key; without it every route but /health, /metrics is 401
    assert_error(http.get("/v1/chat/completions"), 405)


def test_unknown_model(http):
    r = http.post("/v1/chat/completions", json={"model": "gpt-17", "messages": [{"role": "user", "content": "x"}]})
    assert_error(r, 404, code="model_not_found", param="model")


# -- validation ----------------------------------------------------------------------------------------------
MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body,param", [
    ({"model": MODEL}, "messages"),
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": "hello"}, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"model": MODEL, "messages": [{"role": "user"}]}, "messages.0"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content"),
    ({"model": MODEL, "messages": MSG, "max_tokens": "5"}, "max_tokens"),
    ({"model": MODEL, "messages": MSG, "max_tokens": -1}, "max_tokens"),
    ({"model": MODEL, "messages": MSG, "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "messages": MSG, "max_tokens": 1.5}, "max_tokens"),
    ({"model": MODEL, "messages": MSG, "temperature": "hot"}, "temperature"),
    ({"model": MODEL, "messages": MSG, "temperature": 7}, "temperature"),
    ({"model": MODEL, "messages": MSG, "top_p": 0}, "top_p"),
    ({"model": MODEL, "messages": MSG, "n": 1000}, "n"),
    ({"model": MODEL, "messages": MSG, "n": 0}, "n"),
    ({"model": MODEL, "messages": MSG, "presence_penalty": 9}, "presence_penalty"),
    ({"model": MODEL, "messages": MSG, "stream": "yes"}, "stream"),
    ({"model": MODEL, "messages": MSG, "stop": ["a", ""]}, "stop"),
    ({"model": MODEL, "messages": MSG, "stop": 3}, "stop"),
    ({"model": MODEL, "messages": MSG, "top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"model": MODEL, "messages": MSG, "top_logprobs": 2}, None),
    ({"model": MODEL, "messages": MSG, "stream_options": {"include_usage": True}}, None),
    ({"model": MODEL, "messages": MSG, "seed": "abc"}, "seed"),
    ({"model": MODEL, "messages": MSG, "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"model": MODEL, "messages": MSG, "logit_bias": {"999999999": 1}}, "logit_bias"),
    ({"model": MODEL, "messages": MSG, "hisa": {"top_k": 0}}, "hisa.top_k"),
    ({"model": MODEL, "messages": MSG, "hisa": {"top_k": 4096, "top_blocks": 2}}, "hisa"),
    ({"model": MODEL, "messages": MSG, "hisa": "off"}, "hisa"),
])
def test_chat_validation_400(http, body, param):
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code != 422
    assert_error(r, 400, param=param)


@pytest.mark.parametrize("body,param", [
    ({"model": MODEL}, "prompt"),
    ({"model": MODEL, "prompt": ""}, "prompt"),
    ({"model": MODEL, "prompt": []}, "prompt"),
    ({"model": MODEL, "prompt": [1, -2]}, "prompt"),
    ({"model": MODEL, "prompt": [10**9]}, "prompt"),
    ({"model": MODEL, "prompt": "x", "logprobs": 99}, "logprobs"),
    ({"model": MODEL, "prompt": "x", "suffix": "y"}, None),
])
def test_completion_validation_400(http, body, param):
    assert_error(http.post("/v1/completions", json=body), 400, param=param)


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2]", b"null", b'{"model": "tiny", "messages": [}'])
def test_malformed_json(http, content):
    r = http.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert_error(r, 400)


def test_tokenizer_route_errors(http):
    assert_error(http.post("/tokenize", json={"prompt": "a", "messages": MSG}), 400)
    assert_error(http.post("/tokenize", json={}), 400)
    assert_error(http.post("/detokenize", json={"tokens": [10**8]}), 400, param="tokens")
    assert_error(http.post("/detokenize", json={"tokens": "abc"}), 400, param="tokens")


# -- sizes ---------------------------------------------------------------------------------------------------
def test_oversized_body_413(http):
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * (MAX_BODY + 10)}]}
    err = assert_error(http.post("/v1/chat/completions", json=big), 413, code="request_too_large")
    assert str(MAX_BODY) in err["message"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(30):
            yield b"y" * 1000
        yield b'"}]}'

    assert_error(http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}),
                 413)
    ok_chat(http)


def test_context_length_exceeded_non_stream(http):
    long = " ".join(["word"] * 400)
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": long}]})
    err = assert_error(r, 400, code="context_length_exceeded", param="messages")
    assert str(MAX_LEN) in err["message"]
    tokens = http.post("/tokenize", json={"messages": [{"role": "user", "content": long}]}).json()["count"]
    assert str(tokens) in err["message"]
    # short prompt, too many completion tokens
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": MSG, "max_tokens": MAX_LEN})
    err = assert_error(r, 400, code="context_length_exceeded")
    assert f"{MAX_LEN} in the completion" in err["message"]
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": long, "max_tokens": 5})
    assert_error(r, 400, code="context_length_exceeded", param="prompt")


def test_context_length_exceeded_stream_is_plain_400(http, server):
    long = " ".join(["word"] * 400)
    body = {"model": MODEL, "messages": [{"role": "user", "content": long}], "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.read()
    assert_error(r, 400, code="context_length_exceeded")  # an error response, not an SSE stream
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long}], stream=True)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=long, max_tokens=5, stream=True)


def test_still_serving_after_errors(http):
    for _ in range(2):
        http.post("/v1/chat/completions", content=b"{oops")
        http.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
    body = ok_chat(http)
    assert body["choices"][0]["message"]["role"] == "assistant"
