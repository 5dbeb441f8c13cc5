"""``hisa-ask`` (and examples/ask_document.py) against a live ``hisa-serve`` on 127.0.0.1 serving a tiny random
Llama with the embedded model's tokenizer, ``--max-model-len 512`` so that an oversized file is easy to make."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server.ask import build_messages, normalize_url, read_document, AskError
from tests.helpers import CORPUS
from tests.server_utils import TOKENIZER_FILES, ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
MAX_LEN = 512
QUESTION = "Who is the narrator?"


def _text(chars: int) -> str:
    if CORPUS.is_file():
        text = CORPUS.read_text(encoding="utf-8")
        start = text.find("Call me Ishmael")
        return text[max(start, 0): max(start, 0) + chars]
    words = "the whale ship sea captain harpoon voyage sailor ocean deck mast storm".split()
    return " ".join(words[(i * 7) % len(words)] for i in range(chars // 5))[:chars]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random Llama (hidden 64, 2 layers) with the embedded model's tokenizer and chat template. Untied, sharp
    output weights: its greedy answers are varied words (a tied tiny model just repeats the prompt's last token,
    here a newline, and an all-whitespace answer would make the stdout check vacuous)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hisa.models import embedded_model_dir

    path = tmp_path_factory.mktemp("ask-model") / "tiny-ask"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=1,
                      eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path)
    src = embedded_model_dir()
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, path / name)
    return path


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    # small prefill chunks so that a ~300-token document prefills in several steps (progress events)
    srv = ServerProcess(["--model", str(model_dir), "--max-model-len", str(MAX_LEN), "--prefill-chunk", "32"],
                        tmp_path_factory.mktemp("ask-logs") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def doc(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("docs") / "chapter.md"
    path.write_text("# Loomings\n\n" + _text(1100), encoding="utf-8")
    return path


def hisa_ask(*args, url: str | None = None, env: dict | None = None, stdin: str | None = None, timeout=180):
    exe = shutil.which("hisa-ask", path=str(Path(sys.executable).parent)) or shutil.which("hisa-ask")
    assert exe, "the hisa-ask console script is not installed (pip install -e .)"
    cmd = [exe, *map(str, args)]
    if url:
        cmd += ["--url", url]
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "HISA_API_KEY")}
    full_env.update(env or {})
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=ROOT)


def direct_answer(server, document: str, question: str, max_tokens: int, model: str) -> dict:
    r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "model": model, "messages": build_messages(document, question), "max_tokens": max_tokens,
        "temperature": 0, "stream": False})
    assert r.status_code == 200, r.text
    return r.json()


def served_model(server) -> str:
    return httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]


def usage_line(stderr: str) -> tuple[int, int]:
    m = re.search(r"prompt ([\d,]+) tokens(?: \(([\d,]+) cached\))?", stderr)
    assert m, stderr
    return int(m.group(1).replace(",", "")), int((m.group(2) or "0").replace(",", ""))


# ----------------------------------------------------------------------------------------------------------
def test_answer_on_stdout_progress_on_stderr(server, doc):
    proc = hisa_ask(doc, QUESTION, "--max-tokens", 16, url=server.url + "/v1")
    assert proc.returncode == 0, proc.stderr
    model = served_model(server)
    expected = direct_answer(server, doc.read_text(encoding="utf-8"), QUESTION, 16, model)
    content = expected["choices"][0]["message"]["content"]
    assert content.strip(), "the tiny model answered nothing: the comparison would be vacuous"
    # stdout is exactly the answer (plus a final newline), the same text as a greedy non-stream request
    assert proc.stdout == content + ("" if content.endswith("\n") else "\n")
    # status goes to stderr only: what was sent where, prefill progress events, the usage summary
    assert "hisa-ask:" not in proc.stdout and "prefill" not in proc.stdout
    assert f"-> {model} at {server.url}/v1" in proc.stderr  # model taken from GET /v1/models
    assert re.search(r"prefill [\d,]+/[\d,]+ tokens \(\d+%\)", proc.stderr), proc.stderr
    prompt_tokens, _ = usage_line(proc.stderr)
    assert prompt_tokens == expected["usage"]["prompt_tokens"]


def test_second_question_reuses_the_prefix_cache(server, doc):
    first = hisa_ask(doc, "What is the first chapter called?", "--max-tokens", 4, url=server.url)
    assert first.returncode == 0, first.stderr
    second = hisa_ask(doc, "Where does the story start?", "--max-tokens", 4, url=server.url)
    assert second.returncode == 0, second.stderr
    prompt, cached = usage_line(second.stderr)
    question_tokens = 40  # generous: the question + the end of the chat template
    assert cached >= prompt - question_tokens, second.stderr
    assert re.search(r"[\d,]+ from the prefix cache", second.stderr), second.stderr


def test_stdin_document_same_answer(server, doc):
    from_file = hisa_ask(doc, QUESTION, "--max-tokens", 8, "--quiet", url=server.url)
    from_stdin = hisa_ask("-", QUESTION, "--max-tokens", 8, "--quiet", url=server.url,
                          stdin=doc.read_text(encoding="utf-8"))
    assert from_file.returncode == from_stdin.returncode == 0, from_stdin.stderr
    assert from_stdin.stdout == from_file.stdout and from_stdin.stdout.strip()
    assert from_stdin.stderr == ""  # --quiet: nothing but errors on stderr


def test_oversized_document_clear_error(server, tmp_path):
    big = tmp_path / "big.txt"
    big.write_text(_text(6000), encoding="utf-8")  # well over 512 tokens
    proc = hisa_ask(big, QUESTION, url=server.url)
    assert proc.returncode == 4
    assert proc.stdout == ""
    assert "too long" in proc.stderr and f"maximum context length is {MAX_LEN} tokens" in proc.stderr
    assert "Traceback" not in proc.stderr
    # the server is unharmed
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_max_tokens_beyond_context_is_reported(server, doc):
    proc = hisa_ask(doc, QUESTION, "--max-tokens", MAX_LEN, url=server.url)
    assert proc.returncode == 4
    assert f"--max-tokens ({MAX_LEN})" in proc.stderr


def test_unreachable_server(doc):
    proc = hisa_ask(doc, QUESTION, url=f"http://127.0.0.1:{free_port()}/v1", timeout=60)
    assert proc.returncode == 3
    assert "cannot connect to the server at http://127.0.0.1:" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_unknown_model_and_env_url(server, doc):
    proc = hisa_ask(doc, QUESTION, "--model", "no-such-model", env={"OPENAI_BASE_URL": server.url + "/v1"})
    assert proc.returncode == 1
    assert "no-such-model" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_inputs_exit_2(tmp_path, server):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    for path, words in ((tmp_path / "missing.txt", "no such file"), (empty, "is empty"), (binary, "UTF-8"),
                        (tmp_path, "folder")):
        proc = hisa_ask(path, QUESTION, url=server.url)
        assert proc.returncode == 2 and words in proc.stderr, (path, proc.stderr)
    proc = hisa_ask(empty, QUESTION, "--max-tokens", "0", url=server.url)
    assert proc.returncode == 2 and "positive integer" in proc.stderr


def test_api_key(model_dir, tmp_path, doc):
    srv = ServerProcess(["--model", str(model_dir), "--max-model-len", str(MAX_LEN), "--api-key", "s3cret"],
                        tmp_path / "server.log")
    try:
        denied = hisa_ask(doc, QUESTION, "--max-tokens", 4, url=srv.url)
        assert denied.returncode == 1 and "API key" in denied.stderr, denied.stderr
        for env in ({"HISA_API_KEY": "s3cret"}, {"OPENAI_API_KEY": "s3cret"}):
            ok = hisa_ask(doc, QUESTION, "--max-tokens", 4, url=srv.url, env=env)
            assert ok.returncode == 0 and ok.stdout.strip(), ok.stderr
        ok = hisa_ask(doc, QUESTION, "--max-tokens", 4, "--api-key", "s3cret", url=srv.url)
        assert ok.returncode == 0, ok.stderr
    finally:
        srv.stop()


def test_example_script(server, doc):
    env = {**os.environ, "OPENAI_BASE_URL": server.url + "/v1", "MAX_TOKENS": "16"}
    env.pop("HISA_API_KEY", None)
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "ask_document.py"), str(doc), QUESTION,
                           "Where does the story start?"], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("## ") == 2 and len(proc.stdout.strip()) > len("## ") * 2 + len(QUESTION)
    assert len(re.findall(r"\d+ prompt tokens, \d+ from the prefix cache", proc.stderr)) == 2


# ----------------------------------------------------------------------------------------------------------
# pieces, without a server
def test_prompt_layout_shares_the_document_prefix():
    a = build_messages("DOC TEXT", "first question?")
    b = build_messages("DOC TEXT", "another one")
    assert a[0] == b[0]
    ua, ub = a[1]["content"], b[1]["content"]
    common = len(os.path.commonprefix([ua, ub]))
    assert ua.index("DOC TEXT") < common and ua.endswith("first question?")


def test_normalize_url():
    assert normalize_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert normalize_url("127.0.0.1:8000/") == "http://127.0.0.1:8000/v1"
    assert normalize_url("https://example.com/api/v1/") == "https://example.com/api/v1"


def test_read_document_utf8_bom(tmp_path):
    p = tmp_path / "bom.md"
    p.write_bytes("\ufeff# Title\nbody".encode("utf-8"))
    assert read_document(str(p)) == ("# Title\nbody", str(p))
    with pytest.raises(AskError):
        read_document(str(tmp_path / "nope.md"))


def test_status_on_a_terminal_spins_then_clears():
    import io
    import time as _time

    from server.ask import Status

    class FakeTTY(io.StringIO):
        def isatty(self):
            return True

    tty = FakeTTY()
    status = Status(tty)
    status.start()
    status.update(512, 2048, 256)
    _time.sleep(0.35)
    status.first_token()
    text = tty.getvalue()
    assert "prefill 512/2,048 tokens (25%), 256 from the prefix cache" in text
    assert text.count("\r\033[K") >= 2 and text.endswith("\r\033[K")  # redrawn in place, cleared before the answer
    assert status.first_token_at is not None and status.first_token_at >= 0.3


def test_plain_openai_server_while_loading(tmp_path, doc):
    """Against a server that is not hisa-serve (a stub speaking plain OpenAI SSE): no `hisa` extension is sent,
    a 503 from /v1/models (model still loading) is waited out, the streamed text lands on stdout, and the usage
    chunk's cached tokens are reported."""
    import http.server
    import json
    import threading

    seen: dict = {"models": 0, "bodies": []}

    class Stub(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen["models"] += 1
            if seen["models"] <= 2:
                self._json(503, {"error": {"message": "loading", "type": "service_unavailable_error",
                                           "param": None, "code": None}})
            else:
                self._json(200, {"object": "list", "data": [{"id": "stub-model", "object": "model", "created": 0,
                                                             "owned_by": "someone"}]})

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen["bodies"].append(body)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            base = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "stub-model"}
            events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": None}]}]
            events += [{**base, "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]}
                       for t in ("Ishmael", " tells", " it.")]
            events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            events.append({**base, "choices": [], "usage": {"prompt_tokens": 300, "completion_tokens": 3,
                                                            "total_tokens": 303,
                                                            "prompt_tokens_details": {"cached_tokens": 256}}})
            for ev in events:
                self.wfile.write(f"data: {json.dumps(ev)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")

        def _json(self, code, obj):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        proc = hisa_ask(doc, QUESTION, url=f"http://127.0.0.1:{srv.server_address[1]}/v1", timeout=60)
    finally:
        srv.shutdown()
        srv.server_close()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Ishmael tells it.\n"
    assert "still loading" in proc.stderr and "prompt 300 tokens (256 cached)" in proc.stderr
    [body] = seen["bodies"]
    assert "hisa" not in body and body["model"] == "stub-model" and body["stream"] is True
    assert body["messages"] == build_messages(doc.read_text(encoding="utf-8"), QUESTION)
