"""The FastAPI app: OpenAI-compatible routes over :class:`server.engine.Engine`.

The HTTP server is up at once; the model loads in the engine's thread meanwhile (``/health`` answers 503
until it is ready). Bodies are parsed by hand with strict pydantic models so that every failure is an
OpenAI error envelope with status 400 (never FastAPI's 422).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .engine import Delta, Done, Engine, EngineConfig, Failed, GenRequest, Job, Progress, resolve_overrides
from .errors import APIError, context_length_error, error_body, from_validation_errors
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .openapi import build_openapi
from .protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .sampling import SamplingParams

log = logging.getLogger("hisa.server")

# with an API key, every route needs it except these (health checks and Prometheus scrapers send no key);
# CORS preflights (OPTIONS) carry no credentials either
OPEN_PATHS = ("/health", "/metrics")
SSE_PING_SECONDS = 10
# apply_chat_template arguments the server sets itself (chat_template_kwargs only reach the template)
RESERVED_TEMPLATE_KWARGS = {"messages", "conversation", "add_generation_prompt", "tokenize", "chat_template",
                            "return_dict", "return_tensors", "tokenizer_kwargs", "padding", "truncation",
                            "max_length", "return_assistant_tokens_mask", "continue_final_message"}
SYSTEM_FINGERPRINT = f"hisa-serve-{__version__}"


@dataclass
class ServerSettings:
    engine: EngineConfig = field(default_factory=EngineConfig)
    served_model_names: list[str] = field(default_factory=list)
    api_key: str | None = None
    allowed_origins: list[str] = field(default_factory=list)
    max_body_bytes: int = 32 << 20


# ----------------------------------------------------------------------------------------------------------
class GuardMiddleware:
    """API key (constant-time comparison) on every route but OPEN_PATHS, and the request body size limit
    (declared Content-Length; the streamed size is checked again while reading)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = dict(scope.get("headers") or [])
        if self.key is not None and scope.get("method") != "OPTIONS" and path not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"")
            scheme, _, given = auth.partition(b" ")
            ok = scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.key)
            if not ok:
                msg = ("Incorrect API key provided." if auth else
                       "Missing API key: send it as 'Authorization: Bearer <key>'.")
                resp = JSONResponse(error_body(msg, "invalid_request_error", None, "invalid_api_key"),
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await resp(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body
            except ValueError:
                too_big = False
            if too_big:
                resp = JSONResponse(body_too_large(self.max_body).body(), status_code=413)
                return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


def body_too_large(limit: int) -> APIError:
    return APIError(f"request body too large: the limit is {limit} bytes (--max-body-bytes)", status=413,
                    code="request_too_large")


# ----------------------------------------------------------------------------------------------------------
def create_app(settings: ServerSettings, engine: Engine | None = None) -> FastAPI:
    names = settings.served_model_names or [settings.engine.served_model_name or "model"]
    settings.engine.served_model_name = names[0]
    metrics = Metrics(names[0])
    engine = engine or Engine(settings.engine, metrics)
    tok_pool = ThreadPoolExecutor(1, thread_name_prefix="hisa-tokenizer")
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.shutdown()
        tok_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="hisa-serve", version=__version__, lifespan=lifespan, docs_url="/docs",
                  redoc_url=None)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.settings = settings
    app.openapi = lambda: build_openapi(app, {"/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest,
                                              "/v1/chat/completions": ChatCompletionRequest,
                                              "/v1/completions": CompletionRequest})
    app.add_middleware(GuardMiddleware, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes)
    if settings.allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware  # noqa: PLC0415

        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=False)

    # -- errors ------------------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        err = from_validation_errors(list(exc.errors()))
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            msg = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            msg = f"method {request.method} is not allowed on {request.url.path}"
        else:
            msg = str(exc.detail)
        err = APIError(msg, status=exc.status_code, code=exc.status_code)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        err = APIError(f"internal server error: {type(exc).__name__}", status=500, type="server_error")
        return JSONResponse(err.body(), status_code=500)

    # -- helpers -----------------------------------------------------------------------------------------
    async def read_body(request: Request, model):
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise body_too_large(settings.max_body_bytes)
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw.strip():
            raise APIError("the request body is empty: send a JSON object", code="invalid_json")
        try:
            return model.model_validate_json(raw)
        except ValidationError as e:
            raise from_validation_errors(e.errors(include_url=False)) from None

    def require_ready():
        if engine.load_error is not None:
            raise APIError(f"the model failed to load: {engine.load_error}", status=500, type="server_error")
        if engine.loading:
            raise APIError("the model is still loading; retry shortly", status=503, code="model_loading",
                           headers={"Retry-After": "5"})

    def check_model(name: str | None):
        if name and name not in names:
            raise APIError(f"The model `{name}` does not exist. Available: {', '.join(names)}", status=404,
                           param="model", code="model_not_found")
        return names[0]

    async def in_tokenizer(fn, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(tok_pool, lambda: fn(*args, **kwargs))

    def sampling_params(body, max_tokens: int, logprobs: bool, top_logprobs: int) -> SamplingParams:
        d = engine.generation_defaults

        def pick(name, default):
            value = getattr(body, name)
            return value if value is not None else d.get(name, default)

        bias = {}
        for key, value in (body.logit_bias or {}).items():
            try:
                tok = int(key)
            except ValueError:
                raise APIError(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
            if not 0 <= tok < engine.vocab_size:
                raise APIError(f"logit_bias token id {tok} is outside the vocabulary (0..{engine.vocab_size - 1})",
                               param="logit_bias")
            bias[tok] = value
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=pick("temperature", 1.0),
            top_p=pick("top_p", 1.0),
            top_k=pick("top_k", 0),
            min_p=pick("min_p", 0.0),
            seed=body.seed,
            stop=body.stop or [],
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=pick("repetition_penalty", 1.0),
            logit_bias=bias,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            ignore_eos=body.ignore_eos,
        )

    def hisa_overrides(body) -> dict:
        if body.hisa is None:
            return {}
        try:
            return resolve_overrides(engine.hisa_config, body.hisa.overrides())
        except ValueError as e:
            raise APIError(f"invalid hisa settings: {e}", param="hisa") from None

    def budget(prompt_lens: list[int], requested: int | None, param: str) -> int:
        """max_tokens to use; a 400 context_length_exceeded when prompt + max_tokens does not fit."""
        longest = max(prompt_lens)
        limit = engine.max_model_len
        if requested is None:
            if longest >= limit:
                raise context_length_error(limit, longest, 1, param)
            return limit - longest
        if longest + requested > limit:
            raise context_length_error(limit, longest, requested, param)
        return requested

    def token_str(tok: int) -> str:
        return engine.tokenizer.decode([tok], skip_special_tokens=False)

    def chat_logprob_entries(delta: Delta) -> list[dict]:
        s = delta.sample
        t = token_str(delta.token)
        top = [{"token": token_str(i), "logprob": lp, "bytes": list(token_str(i).encode())} for i, lp in s.top or []]
        return [{"token": t, "logprob": s.logprob, "bytes": list(t.encode()), "top_logprobs": top}]

    def submit(jobs, params, overrides, request_id, received: float) -> GenRequest:
        req = GenRequest(jobs, params, asyncio.get_running_loop(), overrides, request_id)
        req.received = received  # the handler's start: reading, validating and tokenizing come before arrival
        engine.submit(req)
        return req

    async def next_event(req: GenRequest, request: Request, state: dict):
        """The next engine event; cancels the request when the client has gone away (checked at most
        every half second, also while events keep coming)."""
        while True:
            now = time.monotonic()
            if now - state.get("checked", now) >= 0.5:
                state["checked"] = now
                if await request.is_disconnected():
                    engine.abort(req)
                    raise asyncio.CancelledError("client disconnected")
            state.setdefault("checked", now)
            try:
                return await asyncio.wait_for(req.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                continue

    def progress_chunk(base: dict, ev: Progress) -> dict:
        return {**base, "choices": [], "hisa_progress": {"index": ev.index, "processed_tokens": ev.processed,
                                                         "total_tokens": ev.total, "cached_tokens": ev.cached}}

    # -- routes: health, metrics, models -----------------------------------------------------------------
    @app.get("/health")
    async def health():
        if engine.load_error is not None:
            return JSONResponse({"status": "error", "error": str(engine.load_error)}, status_code=500)
        if engine.loading:
            return JSONResponse({"status": "loading", "model": names[0]}, status_code=503,
                                headers={"Retry-After": "5"})
        return {"status": "ok", "model": names[0], "max_model_len": engine.max_model_len}

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics_route():
        if not engine.loading:
            engine._set_memory_gauges()
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        require_ready()
        data = [{"id": n, "object": "model", "created": created, "owned_by": "hisa-serve", "root": engine.model_path,
                 "parent": None, "max_model_len": engine.max_model_len, "permission": []} for n in names]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id:path}")
    async def model_info(model_id: str):
        require_ready()
        check_model(model_id)
        return {"id": model_id, "object": "model", "created": created, "owned_by": "hisa-serve",
                "root": engine.model_path, "parent": None, "max_model_len": engine.max_model_len, "permission": []}

    # -- tokenizer routes (vLLM shapes) ------------------------------------------------------------------
    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await read_body(request, TokenizeRequest)
        require_ready()
        check_model(body.model)
        if body.messages is not None:
            msgs = [{"role": _role(m.role), "content": m.text()} for m in body.messages]
            text = await in_tokenizer(engine.render_chat, msgs, body.add_generation_prompt)
            add_special = bool(body.add_special_tokens)
        else:
            text = body.prompt
            add_special = True if body.add_special_tokens is None else body.add_special_tokens
        ids = await in_tokenizer(engine.encode, text, add_special)
        strs = engine.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await read_body(request, DetokenizeRequest)
        require_ready()
        check_model(body.model)
        bad = [t for t in body.tokens if t >= len(engine.tokenizer)]
        if bad:
            raise APIError(f"token id {bad[0]} is outside the vocabulary (size {len(engine.tokenizer)})",
                           param="tokens")
        text = await in_tokenizer(engine.decode, body.tokens, False)
        return {"prompt": text}

    # -- chat completions --------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        received = time.monotonic()
        body = await read_body(request, ChatCompletionRequest)
        require_ready()
        model_name = check_model(body.model)
        msgs = []
        for m in body.messages:
            entry = {"role": _role(m.role), "content": m.text()}
            if m.name:
                entry["name"] = m.name
            msgs.append(entry)
        kwargs = dict(body.chat_template_kwargs or {})
        reserved = sorted(set(kwargs) & RESERVED_TEMPLATE_KWARGS)
        if reserved:  # they would clash with the server's own arguments (a TypeError, i.e. a 500, before)
            raise APIError(f"chat_template_kwargs cannot set {', '.join(reserved)}", param="chat_template_kwargs")
        text = await in_tokenizer(engine.render_chat, msgs, body.add_generation_prompt, **kwargs)
        prompt_ids = await in_tokenizer(engine.encode, text, False)
        if not prompt_ids:
            raise APIError("the rendered prompt is empty", param="messages")
        max_tokens = budget([len(prompt_ids)], body.token_limit(),
                            "messages")
        params = sampling_params(body, max_tokens, body.logprobs, body.top_logprobs or 0)
        overrides = hisa_overrides(body)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        req = submit([Job(prompt_ids, i) for i in range(body.n)], params, overrides, rid, received)
        base = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name,
                "system_fingerprint": SYSTEM_FINGERPRINT}
        if body.stream:
            return EventSourceResponse(chat_stream(req, request, body, base), ping=SSE_PING_SECONDS,
                                       headers={"X-Request-Id": rid, "Cache-Control": "no-cache",
                                                "X-Accel-Buffering": "no"})
        return await chat_full(req, request, body, {**base, "object": "chat.completion"})

    async def stream_events(req: GenRequest, body, base: dict, prologue: list[str], on_delta):
        """The SSE body shared by both streaming routes: ``prologue`` chunks, then keep-alive comments and
        (on request) progress chunks during prefill, ``on_delta(ev, usage_field)`` chunks for generated text,
        the usage chunk, and ``[DONE]``; an engine failure becomes an error event. Leaving early (client gone)
        aborts the request."""
        usage_field = {"usage": None} if body.include_usage else {}
        want_progress = bool(body.hisa and body.hisa.progress)
        try:
            for chunk in prologue:
                yield chunk
            while True:
                ev = await req.events.get()
                if isinstance(ev, Progress):
                    yield ServerSentEvent(comment=f"prefill {ev.processed}/{ev.total}")
                    if want_progress:
                        yield json.dumps(progress_chunk({**base, **usage_field}, ev))
                elif isinstance(ev, Delta):
                    for chunk in on_delta(ev, usage_field):
                        yield chunk
                elif isinstance(ev, Done):
                    if body.include_usage:
                        yield json.dumps({**base, "choices": [], "usage": ev.usage})
                    yield "[DONE]"
                    return
                elif isinstance(ev, Failed):
                    yield json.dumps(ev.error.body())
                    yield "[DONE]"
                    return
        finally:
            if not req.finished:
                engine.abort(req)

    def chat_stream(req: GenRequest, request: Request, body: ChatCompletionRequest, base: dict):
        usage_field = {"usage": None} if body.include_usage else {}
        pending_lp: dict[int, list] = {}
        prologue = [json.dumps({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                      "logprobs": None, "finish_reason": None}], **usage_field})
                    for i in range(body.n)]

        def on_delta(ev: Delta, usage_field: dict) -> list[str]:
            out = []
            if body.logprobs:
                pending_lp.setdefault(ev.index, []).extend(chat_logprob_entries(ev))
            if ev.text:
                lp = {"content": pending_lp.pop(ev.index, [])} if body.logprobs else None
                out.append(json.dumps({**base, "choices": [{"index": ev.index, "delta": {"content": ev.text},
                                                            "logprobs": lp, "finish_reason": None}], **usage_field}))
            if ev.finish_reason:
                lp = pending_lp.pop(ev.index, None)
                out.append(json.dumps({**base, "choices": [{"index": ev.index, "delta": {},
                                                            "logprobs": {"content": lp} if lp else None,
                                                            "finish_reason": ev.finish_reason}], **usage_field}))
            return out

        return stream_events(req, body, base, prologue, on_delta)

    async def run_full(req: GenRequest, request: Request, on_delta) -> tuple[dict, dict]:
        """Run a non-streamed request to its end, ``on_delta(ev)`` for every delta; returns (finish reason by
        choice index, usage). Aborts the request if it ends otherwise (client gone, error)."""
        finish = {}
        watch: dict = {}
        try:
            while True:
                ev = await next_event(req, request, watch)
                if isinstance(ev, Delta):
                    on_delta(ev)
                    if ev.finish_reason:
                        finish[ev.index] = ev.finish_reason
                elif isinstance(ev, Done):
                    return finish, ev.usage
                elif isinstance(ev, Failed):
                    raise ev.error
        finally:
            if not req.finished:
                engine.abort(req)

    async def chat_full(req: GenRequest, request: Request, body: ChatCompletionRequest, base: dict):
        texts = {i: [] for i in range(body.n)}
        lps = {i: [] for i in range(body.n)}

        def on_delta(ev):
            texts[ev.index].append(ev.text)
            if body.logprobs:
                lps[ev.index].extend(chat_logprob_entries(ev))

        finish, usage = await run_full(req, request, on_delta)
        choices = [{"index": i,
                    "message": {"role": "assistant", "content": "".join(texts[i]), "refusal": None},
                    "logprobs": {"content": lps[i], "refusal": None} if body.logprobs else None,
                    "finish_reason": finish.get(i, "stop")} for i in range(body.n)]
        return JSONResponse({**base, "choices": choices, "usage": usage}, headers={"X-Request-Id": base["id"]})

    # -- completions -------------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request):
        received = time.monotonic()
        body = await read_body(request, CompletionRequest)
        require_ready()
        model_name = check_model(body.model)
        prompts = body.prompts()
        if len(prompts) * body.n > 64:
            raise APIError("at most 64 completions (prompts x n) per request", param="prompt")
        ids_list, texts = [], []
        for p in prompts:
            if isinstance(p, str):
                if not p:
                    raise APIError("prompt must not be empty", param="prompt")
                ids = await in_tokenizer(engine.encode, p, True)
                texts.append(p)
            else:
                if p and max(p) >= engine.vocab_size:  # (a C-level scan: long prompts are checked in ~0.1 ms)
                    bad = next(t for t in p if t >= engine.vocab_size)
                    raise APIError(f"prompt token id {bad} is outside the vocabulary", param="prompt")
                ids = list(p)
                texts.append(None)
            if not ids:
                raise APIError("prompt must not be empty", param="prompt")
            ids_list.append(ids)
        max_tokens = budget([len(x) for x in ids_list], body.token_limit(), "prompt")
        top = body.logprobs or 0
        params = sampling_params(body, max_tokens, body.logprobs is not None, top)
        overrides = hisa_overrides(body)
        jobs = [Job(ids, pi * body.n + j) for pi, ids in enumerate(ids_list) for j in range(body.n)]
        rid = f"cmpl-{uuid.uuid4().hex}"
        req = submit(jobs, params, overrides, rid, received)
        base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                "system_fingerprint": SYSTEM_FINGERPRINT}
        echo = {}
        if body.echo:
            for pi, (ids, t) in enumerate(zip(ids_list, texts)):
                text = t if t is not None else await in_tokenizer(engine.decode, ids, True)
                for j in range(body.n):
                    echo[pi * body.n + j] = text
        if body.stream:
            return EventSourceResponse(completion_stream(req, body, base, len(jobs), echo), ping=SSE_PING_SECONDS,
                                       headers={"X-Request-Id": rid, "Cache-Control": "no-cache",
                                                "X-Accel-Buffering": "no"})
        return await completion_full(req, request, body, base, len(jobs), echo)

    def completion_logprobs(entries: list, offset0: int) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = offset0
        for tok, s in entries:
            t = token_str(tok)
            out["tokens"].append(t)
            out["token_logprobs"].append(s.logprob)
            out["top_logprobs"].append({token_str(i): lp for i, lp in (s.top or [])})
            out["text_offset"].append(offset)
            offset += len(t)
        return out

    def completion_stream(req: GenRequest, body: CompletionRequest, base: dict, count: int, echo: dict):
        usage_field = {"usage": None} if body.include_usage else {}
        pending: dict[int, list] = {}
        offsets = {i: len(echo.get(i, "")) for i in range(count)}
        prologue = [json.dumps({**base, "choices": [{"index": i, "text": text, "logprobs": None,
                                                      "finish_reason": None}], **usage_field})
                    for i, text in echo.items()]

        def on_delta(ev: Delta, usage_field: dict) -> list[str]:
            if body.logprobs is not None:
                pending.setdefault(ev.index, []).append((ev.token, ev.sample))
            if not (ev.text or ev.finish_reason):
                return []
            lp = None
            if body.logprobs is not None:
                lp = completion_logprobs(pending.pop(ev.index, []), offsets[ev.index])
            offsets[ev.index] += len(ev.text)
            return [json.dumps({**base, "choices": [{"index": ev.index, "text": ev.text, "logprobs": lp,
                                                     "finish_reason": ev.finish_reason}], **usage_field})]

        return stream_events(req, body, base, prologue, on_delta)

    async def completion_full(req, request, body: CompletionRequest, base: dict, count: int, echo: dict):
        texts = {i: [echo.get(i, "")] for i in range(count)}
        entries = {i: [] for i in range(count)}

        def on_delta(ev):
            texts[ev.index].append(ev.text)
            if body.logprobs is not None:
                entries[ev.index].append((ev.token, ev.sample))

        finish, usage = await run_full(req, request, on_delta)
        choices = [{"index": i, "text": "".join(texts[i]),
                    "logprobs": completion_logprobs(entries[i], len(echo.get(i, "")))
                    if body.logprobs is not None else None,
                    "finish_reason": finish.get(i, "stop")} for i in range(count)]
        return JSONResponse({**base, "choices": choices, "usage": usage}, headers={"X-Request-Id": base["id"]})

    return app


def _role(role: str) -> str:
    return "system" if role == "developer" else role
