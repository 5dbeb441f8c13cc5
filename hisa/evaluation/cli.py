"""``hisa-eval``: needle-in-a-haystack and perplexity of HISA vs dense on your model and text.

    hisa-eval --model embedded --lengths 2048,4096,8192 --depths 5 --out eval-report
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from ..config import SELECTION_MODES, HisaConfig


def default_text() -> Path | None:
    """../shared/corpus/moby-dick.txt beside this repository, when it exists (this repo's tests)."""
    path = Path(__file__).resolve().parents[2].parent / "shared" / "corpus" / "moby-dick.txt"
    return path if path.is_file() else None


def _int_list(value: str) -> list[int]:
    try:
        out = [int(x) for x in value.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not out or any(x <= 0 for x in out):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {value!r}")
    return out


def _layers(value: str) -> tuple[int, ...]:
    if value.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(int(x) for x in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer indices like 0,1 or 'none', got {value!r}") from None


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    d = HisaConfig()
    text = default_text()
    p = argparse.ArgumentParser(
        prog="hisa-eval",
        description="Compare HISA with dense attention on a model: needle-in-a-haystack accuracy per "
        "(length, depth) and perplexity / KL / top-1 agreement over text windows. Writes report.md, "
        "results.json and needle_heatmap.png to --out.",
    )
    p.add_argument("--model", default="embedded",
                   help="model: 'embedded' (SmolLM2-135M-Instruct), a local folder, a .gguf file or a HF repo id")
    p.add_argument("--text", type=Path, default=text, required=text is None,
                   help="UTF-8 text file for haystacks and perplexity windows" + (f" (default {text})" if text else ""))
    p.add_argument("--lengths", type=_int_list, default=[2048, 4096, 8192],
                   help="haystack / window lengths in tokens, comma-separated (default 2048,4096,8192)")
    p.add_argument("--depths", type=_positive, default=11, help="needle depths per length, 0..100%% (default 11)")
    p.add_argument("--needles", type=_positive, default=1, help="needles per (length, depth) cell (default 1)")
    p.add_argument("--ppl-windows", type=_positive, default=2, help="perplexity windows per length (default 2)")
    p.add_argument("--max-new-tokens", type=_positive, default=32, help="answer length in tokens for the needle (default 32)")
    p.add_argument("--out", type=Path, default=Path("hisa-eval-report"), help="output folder (default ./hisa-eval-report)")
    p.add_argument("--seed", type=int, default=0, help="seed of the needles and haystack offsets (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--skip-needle", action="store_true", help="skip the needle-in-a-haystack test")
    p.add_argument("--skip-ppl", action="store_true", help="skip perplexity / KL / top-1 agreement")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("HISA settings (as in hisa-serve)")
    g.add_argument("--hisa-block-size", type=_positive, default=d.block_size)
    g.add_argument("--hisa-top-blocks", type=_positive, default=d.top_blocks)
    g.add_argument("--hisa-top-k", type=_positive, default=d.top_k)
    g.add_argument("--hisa-min-context", type=int, default=0,
                   help="key length below which attention stays dense (default 0 here, so HISA is measured at "
                   f"every length; the server's default is {d.min_context}, a speed choice). 0 also turns off the "
                   "Triton backend's dense crossovers (HISA_DENSE_BELOW[_DECODE]) unless they are set")
    g.add_argument("--hisa-dense-layers", type=_layers, default=d.dense_layers,
                   help="comma-separated layer indices kept dense, or 'none'")
    g.add_argument("--hisa-backend", choices=["auto", "reference", "reference_tiled", "triton"], default=None,
                   help="HISA implementation (sets $HISA_BACKEND): auto = Triton kernels on CUDA, else the "
                   "per-query reference; reference_tiled = the reference of the GPU prefill kernel's "
                   "tile-shared selection (to see on CPU what a GPU computes)")
    g.add_argument("--hisa-selection", choices=SELECTION_MODES, default=d.selection,
                   help="group: heads of a KV group share a selection; head: each head selects")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.skip_needle and args.skip_ppl:
        parser.error("--skip-needle and --skip-ppl together leave nothing to evaluate")
    if not args.text.is_file():
        parser.error(f"--text {args.text}: no such file")
    try:
        config = HisaConfig(
            block_size=args.hisa_block_size, top_blocks=args.hisa_top_blocks, top_k=args.hisa_top_k,
            min_context=args.hisa_min_context, dense_layers=args.hisa_dense_layers, selection=args.hisa_selection,
        )
    except ValueError as e:
        parser.error(f"invalid HISA settings: {e}")
    try:
        text = args.text.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        parser.error(f"cannot read --text {args.text}: {e}")

    if args.hisa_backend:
        os.environ["HISA_BACKEND"] = args.hisa_backend
    if args.hisa_min_context == 0:  # measure the sparse path itself, also where the GPU would run dense
        os.environ.setdefault("HISA_DENSE_BELOW", "0")
        os.environ.setdefault("HISA_DENSE_BELOW_DECODE", "0")
    import torch  # noqa: PLC0415 - keep --help fast

    from ..models import load_model, served_name  # noqa: PLC0415
    from .runner import EvalSettings, run_evaluation  # noqa: PLC0415

    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")
    settings = EvalSettings(
        lengths=args.lengths, depths=args.depths, needles_per_cell=args.needles, ppl_windows=args.ppl_windows,
        max_new_tokens=args.max_new_tokens, seed=args.seed, skip_needle=args.skip_needle, skip_ppl=args.skip_ppl,
    )
    # a kill (SIGTERM) stops like Ctrl-C: the report of what finished is still written
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    print(f"hisa-eval: loading {args.model} ...", file=sys.stderr, flush=True)
    try:
        model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"hisa-eval: error: cannot load model {args.model!r}: {e}", file=sys.stderr)
        return 2
    try:
        results = run_evaluation(model, tok, text, config, settings, out=args.out, model_name=served_name(args.model),
                                 text_name=str(args.text), progress=not args.quiet)
    except ValueError as e:
        print(f"hisa-eval: error: {e}", file=sys.stderr)
        return 2
    print(results["summary"] + (" [interrupted: partial results]" if results.get("interrupted") else ""))
    print(f"report: {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
