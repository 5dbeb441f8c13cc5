"""Security properties of ``hisa-serve`` with an API key (a real process, tiny random Llama on 127.0.0.1):

- every route, documented or not, rejects a request without the key (401, OpenAI envelope) except
  ``/health`` and ``/metrics`` (documented as open: health checks and Prometheus scrapers carry no key);
- the key is compared in constant time (``hmac.compare_digest`` / ``secrets.compare_digest``, checked in the
  source) and only read from the ``Authorization: Bearer`` header;
- the model is only ever taken from the command line / environment: a path in a request's ``model`` field
  is a 404, nothing is loaded, and no request field reaches the model loader;
- the documented body size limit (``--max-body-bytes``) is enforced with a 413, declared or streamed;
- CORS is off unless ``--allowed-origins`` is given.
"""

from __future__ import annotations

import ast
import json

import httpx
import pytest

from .server_utils import ROOT, ServerProcess, tiny_model_dir

KEY = "sk-security-0123456789"
MAX_BODY = 4096
OPEN = {"/health", "/metrics"}
SERVER_DIR = ROOT / "server"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("security") / "model", layers=1)


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    d = tmp_path_factory.mktemp("security-logs")
    proc = ServerProcess(["--model", str(model_dir), "--served-model-name", "tiny", "--max-model-len", "256",
                          "--max-body-bytes", str(MAX_BODY)], d / "server.log", env={"HISA_API_KEY": KEY})
    yield proc
    proc.stop()


def assert_envelope(r: httpx.Response, status: int, code=None) -> dict:
    assert r.status_code == status, f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text[:300]}"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


def documented_routes(server) -> list[tuple[str, str]]:
    doc = httpx.get(server.url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    out = []
    for path, item in doc["paths"].items():
        for method in item:
            out.append((method.upper(), path.replace("{model_id}", "tiny")))
    return out


# -- the API key -----------------------------------------------------------------------------------------
def test_every_route_but_health_and_metrics_needs_the_key(server):
    routes = documented_routes(server)
    assert len(routes) >= 8
    extra = [("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/docs/oauth2-redirect"), ("GET", "/version"),
             ("GET", "/nope"), ("POST", "/v1/nope"), ("DELETE", "/v1/models/tiny"), ("GET", "/health/../v1/models"),
             ("PUT", "/tokenize")]
    bad_headers = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEY[:-1]}"},
                   {"Authorization": f"Bearer {KEY}x"}, {"Authorization": f"Basic {KEY}"}, {"Authorization": KEY},
                   {"X-API-Key": KEY}, {"Authorization": "Bearer"}, {"Authorization": f"Token {KEY}"}]
    checked = 0
    for method, path in routes + extra:
        if path in OPEN:
            continue
        for headers in bad_headers:
            r = httpx.request(method, server.url + path, headers=headers, json={"model": "tiny", "prompt": "x"})
            err = assert_envelope(r, 401, code="invalid_api_key")
            assert KEY not in json.dumps(err)  # the key is never echoed
            assert r.headers.get("www-authenticate") == "Bearer"
            checked += 1
        # nor in the query string
        r = httpx.request(method, server.url + path, params={"api_key": KEY}, json={"model": "tiny"})
        assert_envelope(r, 401)
        # with the key: past the guard
        ok = httpx.request(method, server.url + path, headers={"Authorization": f"Bearer {KEY}"},
                           json={"model": "tiny", "prompt": "x", "tokens": [1], "max_tokens": 1})
        assert ok.status_code != 401, f"{method} {path} refused the right key"
    assert checked >= 100
    for path in OPEN:
        assert httpx.get(server.url + path).status_code == 200, path
    # bearer scheme is case-insensitive (RFC 7235), surrounding spaces tolerated
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200


def _compare_calls(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr == "compare_digest":
                names.append(ast.unparse(f))
    return names


def _is_secret(node: ast.AST) -> bool:
    """``self.key``, ``api_key``, ``settings.api_key``... (the configured key)."""
    return (isinstance(node, ast.Attribute) and node.attr in ("key", "api_key")) or \
        (isinstance(node, ast.Name) and node.id == "api_key")


def test_key_compared_in_constant_time_in_the_code():
    sources = {p.name: p.read_text() for p in SERVER_DIR.glob("*.py")}
    app = ast.parse(sources["app.py"])
    guard = next(n for n in ast.walk(app) if isinstance(n, ast.ClassDef) and n.name == "GuardMiddleware")
    calls = _compare_calls(guard)
    assert calls and all(c in ("hmac.compare_digest", "secrets.compare_digest") for c in calls), calls
    # the key is never compared with ==, !=, in, <, startswith... anywhere in the server (only `is None` checks)
    for name, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Compare) and any(_is_secret(o) for o in [node.left, *node.comparators]):
                assert all(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops), \
                    f"{name}:{node.lineno}: the API key compared with {ast.unparse(node)}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("startswith", "endswith", "find", "index", "count"):
                args = [node.func.value, *node.args]
                assert not any(_is_secret(a) for a in args), f"{name}:{node.lineno}: {ast.unparse(node)}"


# -- the model path --------------------------------------------------------------------------------------
def test_model_path_never_taken_from_a_request(server, model_dir, tmp_path):
    auth = {"Authorization": f"Bearer {KEY}"}
    root_before = httpx.get(server.url + "/v1/models", headers=auth).json()["data"][0]["root"]
    other = tiny_model_dir(tmp_path / "other", layers=2, seed=1)  # a real, loadable model folder
    for value in (str(other), str(model_dir), "../../etc/passwd", "/etc/passwd", "HuggingFaceTB/SmolLM2-135M",
                  str(other / "config.json")):
        for path, body in (("/v1/completions", {"prompt": "x", "max_tokens": 1}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}),
                           ("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
            r = httpx.post(server.url + path, headers=auth, json={**body, "model": value})
            err = assert_envelope(r, 404, code="model_not_found")
            assert err["param"] == "model"
        r = httpx.get(server.url + "/v1/models/" + value.lstrip("/"), headers=auth)
        assert r.status_code == 404
    # a request cannot smuggle a template or loader options either
    r = httpx.post(server.url + "/v1/chat/completions", headers=auth, json={
        "messages": [{"role": "user", "content": "x"}], "max_tokens": 1,
        "chat_template_kwargs": {"chat_template": "{{ 'PWNED' }}"}})
    assert r.status_code == 400 and "PWNED" not in r.text
    assert httpx.get(server.url + "/v1/models", headers=auth).json()["data"][0]["root"] == root_before
    logs = server.logs()
    assert logs.count("loading model") == 1 and str(other) not in logs

    # in the code: the loader is called from the engine's _load only, with the server's own configuration
    for p in SERVER_DIR.glob("*.py"):
        tree = ast.parse(p.read_text())
        for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for call in [c for c in ast.walk(fn) if isinstance(c, ast.Call)]:
                name = call.func.id if isinstance(call.func, ast.Name) else getattr(call.func, "attr", "")
                if name in ("load_model", "resolve_model", "from_pretrained"):
                    assert (p.name, fn.name) == ("engine.py", "_load"), f"{p.name}:{call.lineno} in {fn.name}"
                    assert "cfg.model" in ast.unparse(call), ast.unparse(call)


# -- body size -------------------------------------------------------------------------------------------
def test_body_size_limit(server):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    big = json.dumps({"prompt": "x" * (MAX_BODY + 10), "max_tokens": 1}).encode()
    # declared Content-Length
    r = httpx.post(server.url + "/v1/completions", headers=auth, content=big)
    err = assert_envelope(r, 413, code="request_too_large")
    assert str(MAX_BODY) in err["message"]
    # streamed (chunked transfer, no Content-Length)
    def chunks():
        for i in range(0, len(big), 512):
            yield big[i:i + 512]
    r = httpx.post(server.url + "/v1/completions", headers=auth, content=chunks())
    assert "content-length" not in r.request.headers
    assert_envelope(r, 413, code="request_too_large")
    # the same on every POST route
    for path in ("/v1/chat/completions", "/tokenize", "/detokenize"):
        assert_envelope(httpx.post(server.url + path, headers=auth, content=big), 413)
    # without the key, the key is checked first (nothing about the body is revealed)
    assert_envelope(httpx.post(server.url + "/v1/completions", content=big), 401)
    # just under the limit is accepted, and the server keeps serving
    fits = json.dumps({"prompt": "x", "max_tokens": 1, "user": "u" * (MAX_BODY - 200)}).encode()
    assert len(fits) <= MAX_BODY
    r = httpx.post(server.url + "/v1/completions", headers=auth, content=fits)
    assert r.status_code == 200, r.text


def test_body_limit_is_documented():
    from server.cli import build_parser  # noqa: PLC0415

    text = build_parser().format_help()
    assert "--max-body-bytes" in text and "413" in text and "HISA_MAX_BODY_BYTES" in text


# -- CORS ------------------------------------------------------------------------------------------------
def test_cors_off_by_default(server):
    preflight = httpx.options(server.url + "/v1/chat/completions", headers={
        "Origin": "http://evil.test", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert not any(h.startswith("access-control-") for h in preflight.headers), dict(preflight.headers)
    assert preflight.status_code >= 400
    for path in ("/health", "/v1/models"):
        r = httpx.get(server.url + path, headers={"Origin": "http://evil.test", "Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200
        assert not any(h.startswith("access-control-") for h in r.headers), dict(r.headers)


def test_cors_only_with_allowed_origins():
    from starlette.middleware.cors import CORSMiddleware  # noqa: PLC0415

    from server.app import ServerSettings, create_app  # noqa: PLC0415

    off = create_app(ServerSettings())
    assert not any(m.cls is CORSMiddleware for m in off.user_middleware)
    on = create_app(ServerSettings(allowed_origins=["http://ok.test"]))
    cors = [m for m in on.user_middleware if m.cls is CORSMiddleware]
    assert len(cors) == 1 and cors[0].kwargs["allow_origins"] == ["http://ok.test"]
    assert cors[0].kwargs.get("allow_credentials") is not True
