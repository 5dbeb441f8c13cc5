"""``hisa-ask``: ask a question about a long text/Markdown file through any OpenAI-compatible server.

    hisa-ask FILE "question" [--url URL] [--model NAME] [--api-key KEY] [--max-tokens N]
    cat notes.md | hisa-ask - "What changed in March?"

The answer streams to stdout; everything else (what is sent where, prefill progress, a spinner until the first
token, a one-line summary with token counts, errors) goes to stderr, so ``hisa-ask ... > answer.txt`` keeps only
the answer. The prompt always has the same layout, the document first and the question last, so a second
question about the same file reuses the server's prefix cache and only the question is prefilled.

Talks to the server with the official ``openai`` SDK. Against ``hisa-serve`` it also asks for prefill progress
events (the ``hisa`` request extension); against other servers it sends plain OpenAI requests.

Exit codes: 0 answered, 1 server or API error, 2 bad usage or unreadable file, 3 server unreachable,
4 document too long for the server's context, 130 interrupted.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import threading
import time
from urllib.parse import urlsplit, urlunsplit

from .cli import _positive_int  # the same flag type as hisa-serve (cli.py imports nothing heavy)

DEFAULT_URL = "http://127.0.0.1:8000/v1"
SYSTEM_PROMPT = ("You answer questions about the document the user gives you. Base your answer on the document; "
                 "if it does not contain the answer, say so.")

EXIT_API, EXIT_USAGE, EXIT_CONNECT, EXIT_TOO_LONG, EXIT_INTERRUPTED = 1, 2, 3, 4, 130


class AskError(Exception):
    def __init__(self, message: str, code: int = EXIT_API):
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------------------------------------
# the prompt: identical prefix for every question about the same document
def build_messages(document: str, question: str, system: str = SYSTEM_PROMPT) -> list[dict]:
    """Document first, question last: everything before the question is the same for every question about this
    document, so a server with prefix caching prefills it once."""
    user = f"<document>\n{document}\n</document>\n\nQuestion: {question}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def read_document(path: str) -> tuple[str, str]:
    """(text, display name) of FILE, or of stdin for '-'."""
    if path == "-":
        if sys.stdin.isatty():
            print("hisa-ask: reading the document from stdin (end with Ctrl-D)", file=sys.stderr)
        data, name = sys.stdin.buffer.read(), "<stdin>"
    else:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            raise AskError(f"no such file: {path}", EXIT_USAGE) from None
        except IsADirectoryError:
            raise AskError(f"{path} is a folder, not a text file", EXIT_USAGE) from None
        except OSError as e:
            raise AskError(f"cannot read {path}: {e.strerror or e}", EXIT_USAGE) from None
        name = path
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise AskError(f"{name} is not UTF-8 text (byte {e.start} cannot be decoded): hisa-ask reads text and "
                       "Markdown files; convert other formats to text first", EXIT_USAGE) from None
    if "\x00" in text:
        raise AskError(f"{name} looks binary (it contains NUL bytes): hisa-ask reads text and Markdown files",
                       EXIT_USAGE)
    if not text.strip():
        raise AskError(f"{name} is empty", EXIT_USAGE)
    return text, name


def normalize_url(url: str) -> str:
    """``http://host:8000`` -> ``http://host:8000/v1`` (a bare server address gets the OpenAI prefix)."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    if not path:
        path = "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, parts.fragment))


# ----------------------------------------------------------------------------------------------------------
# stderr status: progress while the prompt is prefilled, a spinner until the first token
class Status:
    FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(self, stream=None, quiet: bool = False):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.monotonic()
        self.first_token_at: float | None = None
        self.progress: tuple[int, int, int] | None = None  # processed, total, cached
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_line = 0.0
        self._shown = False

    def note(self, text: str) -> None:
        if not self.quiet:
            with self._lock:
                self._clear()
                print(f"hisa-ask: {text}", file=self.stream, flush=True)

    def start(self) -> None:
        self.t0 = time.monotonic()
        if self.quiet:
            return
        if self.tty:
            self._thread = threading.Thread(target=self._spin, name="hisa-ask-status", daemon=True)
            self._thread.start()
        else:
            print("hisa-ask: waiting for the first token...", file=self.stream, flush=True)

    def update(self, processed: int, total: int, cached: int) -> None:
        with self._lock:
            self.progress = (processed, total, cached)
        if self.quiet or self.tty:
            return
        now = time.monotonic()
        if now - self._last_line >= 1.0 or processed >= total:  # a pipe: one line per second at most
            self._last_line = now
            print(f"hisa-ask: {self._describe()}", file=self.stream, flush=True)

    def first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic() - self.t0
            self.stop()

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(1.0)
            self._thread = None
        with self._lock:
            self._clear()

    def _describe(self) -> str:
        elapsed = time.monotonic() - self.t0
        if self.progress is None:
            return f"waiting for the first token ({elapsed:.1f} s)"
        processed, total, cached = self.progress
        pct = 100.0 * processed / total if total else 100.0
        text = f"prefill {processed:,}/{total:,} tokens ({pct:.0f}%)"
        if cached:
            text += f", {cached:,} from the prefix cache"
        return f"{text} ({elapsed:.1f} s)"

    def _spin(self) -> None:
        for frame in itertools.cycle(self.FRAMES):
            if self._done.wait(0.1):
                return
            with self._lock:
                if self._done.is_set():
                    return
                line = f"{frame} {self._describe()}"
                self.stream.write("\r\033[K" + line)
                self.stream.flush()
                self._shown = True

    def _clear(self) -> None:
        if self.tty and self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._shown = False


# ----------------------------------------------------------------------------------------------------------
def _server_message(err) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        if inner.get("message"):
            return str(inner["message"])
    return str(getattr(err, "message", None) or err)


def _error_code(err) -> str | None:
    code = getattr(err, "code", None)
    if code:
        return str(code)
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        return inner.get("code")
    return None


def _translate(err, url: str, doc_name: str, doc_chars: int, max_tokens: int | None = None) -> AskError:
    import openai  # noqa: PLC0415

    if isinstance(err, openai.APITimeoutError):
        return AskError(f"the server at {url} did not answer in time (--timeout)", EXIT_CONNECT)
    if isinstance(err, openai.APIConnectionError):
        cause = err.__cause__ or err.__context__
        reason = f" ({cause})" if cause else ""
        return AskError(f"cannot connect to the server at {url}{reason}. Is it running? Start one with "
                        "`hisa-serve`, or point --url (or OPENAI_BASE_URL) at your server.", EXIT_CONNECT)
    if isinstance(err, openai.APIStatusError):
        msg = _server_message(err)
        status = err.status_code
        if _error_code(err) == "context_length_exceeded" or "maximum context length" in msg:
            hint = "Serve a model with a longer context (hisa-serve --max-model-len), "
            hint += f"lower --max-tokens ({max_tokens}), " if max_tokens else ""
            hint += "or ask about a part of the file."
            return AskError(f"the document is too long for this server: {doc_name} ({doc_chars:,} characters) "
                            f"does not fit in the model's context.\n  server: {msg}\n  {hint}", EXIT_TOO_LONG)
        if status == 413:
            return AskError(f"the document is too large for the server's request size limit: {msg} "
                            "(hisa-serve --max-body-bytes raises it)", EXIT_TOO_LONG)
        if status == 401:
            return AskError(f"the server wants an API key: {msg}. Pass --api-key or set HISA_API_KEY "
                            "(or OPENAI_API_KEY).")
        if status == 404 and "model" in msg.lower():
            return AskError(f"{msg} (see the names the server offers with: curl {url}/models)")
        return AskError(f"the server answered {status}: {msg}")
    if isinstance(err, openai.APIError):  # e.g. an error event inside the stream
        return AskError(f"the server reported an error: {_server_message(err)}")
    return AskError(str(err))


def _pick_model(client, requested: str | None, wait: float, status: Status) -> tuple[str, bool]:
    """(model name, is hisa-serve). Waits while the server is still loading its model (503)."""
    import openai  # noqa: PLC0415

    deadline = time.monotonic() + wait
    announced = False
    while True:
        try:
            models = list(client.models.list())
            break
        except openai.APIStatusError as e:
            if e.status_code == 503 and time.monotonic() < deadline:
                if not announced:
                    status.note("the server is still loading its model; waiting...")
                    announced = True
                time.sleep(2.0)
                continue
            if e.status_code == 404 and requested:  # a server without /v1/models
                return requested, False
            raise
    if requested:
        entry = next((m for m in models if m.id == requested), None)
        owner = getattr(entry, "owned_by", None) if entry else None
        is_hisa = owner == "hisa-serve" or (entry is None and any(m.owned_by == "hisa-serve" for m in models))
        return requested, is_hisa
    if not models:
        raise AskError("the server lists no models (GET /v1/models); name one with --model")
    return models[0].id, models[0].owned_by == "hisa-serve"


def ask(args, out=None, err=None) -> int:
    import openai  # noqa: PLC0415

    out = out or sys.stdout
    status = Status(err or sys.stderr, quiet=args.quiet)
    document, name = read_document(args.file)
    question = args.question.strip()
    if not question:
        raise AskError("the question is empty", EXIT_USAGE)
    url = normalize_url(args.url)
    client = openai.OpenAI(base_url=url, api_key=args.api_key or "EMPTY", max_retries=0,
                           timeout=openai.Timeout(args.timeout, connect=10.0))
    try:
        model, is_hisa = _pick_model(client, args.model, args.wait, status)
        status.note(f"{name}: {len(document):,} characters -> {model} at {url}")
        request = dict(model=model, messages=build_messages(document, question, args.system), stream=True,
                       stream_options={"include_usage": True}, temperature=args.temperature)
        if args.max_tokens is not None:
            request["max_tokens"] = args.max_tokens
        if args.seed is not None:
            request["seed"] = args.seed
        if is_hisa:
            request["extra_body"] = {"hisa": {"progress": True}}
        status.start()
        stream = client.chat.completions.create(**request)
        return _consume(stream, out, status, args)
    except openai.OpenAIError as e:
        status.stop()
        raise _translate(e, url, name, len(document), args.max_tokens) from None
    finally:
        status.stop()


def _consume(stream, out, status: Status, args) -> int:
    answer_tail, finish, usage, generated = "", None, None, 0
    try:
        for chunk in stream:
            extra = chunk.model_extra or {}
            prog = extra.get("hisa_progress")
            if prog:
                status.update(int(prog.get("processed_tokens", 0)), int(prog.get("total_tokens", 0)),
                              int(prog.get("cached_tokens", 0)))
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text = choice.delta.content if choice.delta else None
                if text:
                    status.first_token()
                    out.write(text)
                    out.flush()
                    answer_tail = text
                    generated += 1
                if choice.finish_reason:
                    finish = choice.finish_reason
    except KeyboardInterrupt:
        stream.close()  # closing the connection cancels the request on the server
        raise
    finally:
        status.stop()
    if answer_tail and not answer_tail.endswith("\n"):
        out.write("\n")
        out.flush()
    if generated == 0:
        status.note("the model returned an empty answer")
    _summary(status, usage, finish, args)
    return 0


def _summary(status: Status, usage, finish, args) -> None:
    parts = []
    if usage is not None:
        prompt = f"prompt {usage.prompt_tokens:,} tokens"
        details = getattr(usage, "prompt_tokens_details", None)
        cached = getattr(details, "cached_tokens", None) if details is not None else None
        if cached:
            prompt += f" ({cached:,} cached)"
        parts.append(prompt)
        parts.append(f"answer {usage.completion_tokens:,} tokens")
        hisa = (usage.model_extra or {}).get("hisa")
        if isinstance(hisa, dict) and hisa.get("enabled") and hisa.get("fraction") is not None:
            parts.append(f"HISA read {100 * float(hisa['fraction']):.1f}% of the KV cache")
    if status.first_token_at is not None:
        parts.append(f"first token after {status.first_token_at:.2f} s")
    parts.append(f"total {time.monotonic() - status.t0:.2f} s")
    status.note(", ".join(parts))
    if finish == "length":
        status.note("the answer was cut short: it reached --max-tokens or the end of the model's context")


# ----------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    env = os.environ
    p = argparse.ArgumentParser(
        prog="hisa-ask",
        description="Ask a question about a long text or Markdown file through an OpenAI-compatible server "
        "(hisa-serve by default). The answer streams to stdout; progress and errors go to stderr. Asking again "
        "about the same file reuses the server's prefix cache.",
        epilog="exit codes: 0 answered, 1 server/API error, 2 usage or unreadable file, 3 server unreachable, "
        "4 document too long for the server's context, 130 interrupted",
    )
    p.add_argument("file", metavar="FILE", help="text or Markdown file; '-' reads stdin")
    p.add_argument("question", metavar="QUESTION", help="the question (asked after the document)")
    p.add_argument("--url", default=env.get("OPENAI_BASE_URL") or DEFAULT_URL,
                   help=f"the server's OpenAI base URL (default: $OPENAI_BASE_URL, else {DEFAULT_URL})")
    p.add_argument("--model", default=None, help="model name (default: the first one the server lists)")
    p.add_argument("--api-key", default=env.get("HISA_API_KEY") or env.get("OPENAI_API_KEY"),
                   help="API key (default: $HISA_API_KEY, else $OPENAI_API_KEY; none needed by a server started "
                   "without --api-key)")
    p.add_argument("--max-tokens", type=_positive_int, default=None,
                   help="longest answer in tokens (default: whatever fits in the model's context)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--system", default=SYSTEM_PROMPT, help="system prompt (default: answer from the document)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds to wait for the server between two pieces of the answer (default 600)")
    p.add_argument("--wait", type=float, default=300.0,
                   help="seconds to wait for a server that is still loading its model (default 300)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or summary on stderr (errors only)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sys.stdout.reconfigure(errors="replace")
    except (AttributeError, ValueError):
        pass
    try:
        return ask(args)
    except AskError as e:
        print(f"hisa-ask: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("\nhisa-ask: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `hisa-ask ... | head -1`
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        except OSError:
            pass
        return 0


if __name__ == "__main__":
    sys.exit(main())
