"""``hisa-serve``: command-line entry point. Parses flags first (``--help`` is instant: torch and the web
stack are imported only after parsing), then starts uvicorn; the model loads in the background."""

from __future__ import annotations

import argparse
import logging
import os
import sys

ENV_PREFIX = "HISA_"


def env_name(name: str) -> str:
    """``max-model-len`` -> ``HISA_MAX_MODEL_LEN``; ``hisa-top-k`` -> ``HISA_TOP_K`` (no doubled prefix)."""
    return ENV_PREFIX + name.removeprefix("hisa-").upper().replace("-", "_")


def _env(name: str):
    return os.environ.get(env_name(name))


def _bool_env(name: str) -> bool:
    value = _env(name)
    return value is not None and value.strip().lower() in ("1", "true", "yes", "on")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


# (flag, env var suffix, kwargs)
FLAGS = [
    ("--model", dict(default=None, help="HF repo id, local folder (safetensors) or .gguf file; default: the "
                     "embedded SmolLM2-135M-Instruct")),
    ("--served-model-name", dict(default=None, nargs="+", help="name(s) clients use in 'model' (default: "
                                 "derived from --model)")),
    ("--host", dict(default="0.0.0.0", help="address to bind (default 0.0.0.0)")),
    ("--port", dict(default=8000, type=_positive_int, help="port (default 8000)")),
    ("--api-key", dict(default=None, help="require 'Authorization: Bearer KEY' on every route except /health "
                      "and /metrics")),
    ("--max-model-len", dict(default=None, type=_positive_int, help="longest context (prompt + completion) to "
                             "accept; default: the model's limit, or what fits in GPU memory")),
    ("--dtype", dict(default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                     help="weights/activations dtype (auto: bfloat16 on CUDA, float32 on CPU)")),
    ("--device", dict(default=None, help="cuda, cuda:1, cpu... (default: cuda when available)")),
    ("--chat-template", dict(default=None, help="Jinja chat template (file path or the template itself)")),
    ("--allowed-origins", dict(default=None, nargs="+", help="CORS origins to allow (CORS is off unless set); "
                               "env: comma-separated")),
    ("--hisa-block-size", dict(default=None, type=_positive_int, help="tokens per pooled block (default 64)")),
    ("--hisa-top-blocks", dict(default=None, type=_positive_int, help="blocks kept per query (default 64)")),
    ("--hisa-top-k", dict(default=None, type=_positive_int, help="tokens kept per query (default 2048)")),
    ("--hisa-min-context", dict(default=None, type=_nonneg_int, help="dense attention below this many keys "
                                "(default 4096 where HISA has GPU kernels; on CPU dense everywhere unless set)")),
    ("--no-hisa", dict(action="store_true", help="serve with dense attention")),
    ("--max-queue", dict(default=64, type=_nonneg_int, help="requests allowed to wait; more get 503 (default 64)")),
    ("--max-num-seqs", dict(default=8, type=_positive_int, help="requests computed concurrently (default 8)")),
    ("--prefill-chunk", dict(default=None, type=_positive_int, help="prompt tokens per prefill step "
                             "(default 2048 on CPU, 8192 on CUDA)")),
    ("--prefix-cache-tokens", dict(default=None, type=_nonneg_int, help="token capacity kept for prefix reuse "
                                   "(0: off; default: 2x max-model-len on CPU, the free KV budget on CUDA)")),
    ("--enforce-eager", dict(action="store_true", help="decode without CUDA graphs (slower; for debugging)")),
    ("--gpu-memory-utilization", dict(default=0.90, type=float, help="fraction of GPU memory to use (default 0.9)")),
    ("--max-body-bytes", dict(default=32 << 20, type=_positive_int, help="largest request body, bytes "
                              "(default 33554432 = 32 MiB); larger gets 413")),
    ("--log-level", dict(default="info", choices=["debug", "info", "warning", "error"], help="log level")),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hisa-serve",
        description="OpenAI-compatible server for long prompts with HISA (Hierarchical Indexed Sparse "
        "Attention). Every flag can also be set with an environment variable: --max-model-len -> "
        "HISA_MAX_MODEL_LEN, --no-hisa -> HISA_NO_HISA=1, and so on.",
    )
    for flag, kwargs in FLAGS:
        kwargs = dict(kwargs)
        name = flag[2:]
        env = _env(name)
        kwargs["help"] = kwargs.get("help", "") + f" [env {env_name(name)}]"
        if kwargs.get("action") == "store_true":
            kwargs["default"] = _bool_env(name)
        elif env is not None:
            if kwargs.get("nargs") == "+":
                kwargs["default"] = [x.strip() for x in env.split(",") if x.strip()]
            else:
                conv = kwargs.get("type", str)
                try:
                    kwargs["default"] = conv(env)
                except (argparse.ArgumentTypeError, ValueError) as e:
                    parser.error(f"{env_name(name)}={env!r}: {e}")
                if "choices" in kwargs and kwargs["default"] not in kwargs["choices"]:
                    parser.error(f"{env_name(name)}={env!r}: choose from "
                                 f"{', '.join(kwargs['choices'])}")
        parser.add_argument(flag, **kwargs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0.05 <= args.gpu_memory_utilization <= 1.0:
        print("hisa-serve: --gpu-memory-utilization must be within 0.05..1", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("hisa.server")

    import uvicorn  # noqa: PLC0415

    from .app import ServerSettings, create_app  # noqa: PLC0415  (imports torch)
    from .engine import EngineConfig  # noqa: PLC0415
    from hisa.models import served_name  # noqa: PLC0415

    names = args.served_model_name or [served_name(args.model)]
    engine_cfg = EngineConfig(
        model=args.model, served_model_name=names[0], dtype=args.dtype, device=args.device,
        max_model_len=args.max_model_len, hisa_block_size=args.hisa_block_size,
        hisa_top_blocks=args.hisa_top_blocks, hisa_top_k=args.hisa_top_k, hisa_min_context=args.hisa_min_context,
        no_hisa=args.no_hisa, max_queue=args.max_queue, max_num_seqs=args.max_num_seqs,
        prefill_chunk=args.prefill_chunk, prefix_cache_tokens=args.prefix_cache_tokens,
        chat_template=args.chat_template, gpu_memory_utilization=args.gpu_memory_utilization,
        cuda_graphs=not args.enforce_eager,
    )
    settings = ServerSettings(engine=engine_cfg, served_model_names=names,
                              api_key=args.api_key or None, allowed_origins=args.allowed_origins or [],
                              max_body_bytes=args.max_body_bytes)
    app = create_app(settings)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    failed = []

    def load_failed(exc):
        failed.append(exc)
        server.should_exit = True

    app.state.engine.on_load_failed = load_failed
    log.info("hisa-serve %s listening on http://%s:%d (model %s loads in the background; /health is 503 until "
             "ready)%s", _version(), args.host, args.port, names[0], "; API key required" if args.api_key else "")
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl+C it caught, after its graceful shutdown
        pass
    if failed:
        print(f"hisa-serve: the model could not be loaded: {failed[0]}", file=sys.stderr)
        return 1
    return 0


def _version() -> str:
    from . import __version__  # noqa: PLC0415

    return __version__


if __name__ == "__main__":
    sys.exit(main())
