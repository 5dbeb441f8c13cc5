"""Real out-of-memory on the GPU: a too-long prompt under a memory cap must give that request an OpenAI
error (500, code ``out_of_memory``), free its memory, and leave the server serving.

    python bench/oom_gpu.py                                  # embedded model, 2 GiB cap, 160k-token prompt
    python bench/oom_gpu.py --model /models/llama --cap-gib 6 --prompt-tokens 400000 --json oom.json

The server runs in this process (uvicorn in a thread) so that ``torch.cuda.set_per_process_memory_fraction``
caps its allocations; its context sizing reads the card's free memory, not the cap, so it admits a prompt
that cannot fit under the cap. The script then sends, over HTTP on 127.0.0.1:

1. a short warm-up request (baseline: ``torch.cuda.memory_allocated`` after it);
2. the too-long prompt, non-streamed: expects 500 ``out_of_memory``;
3. the too-long prompt, streamed: expects a 200 stream carrying one error event, then ``[DONE]``;
4. the short request again: expects 200 and the same greedy text as in 1;

and reports allocated / reserved memory at each step, the peak, and whether each expectation held (exit
status 1 if not). Without CUDA (or with ``--simulate``) it runs on CPU with the engine's test hook
``HISA_TEST_FAULT_FILE`` instead, to check the plumbing of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder / repo id (default: the embedded SmolLM2-135M)")
    ap.add_argument("--cap-gib", type=float, default=2.0, help="GPU memory cap for this process (GiB)")
    ap.add_argument("--prompt-tokens", type=int, default=160_000, help="length of the too-long prompt")
    ap.add_argument("--port", type=int, default=18431)
    ap.add_argument("--simulate", action="store_true", help="CPU, OOM injected by the engine's test hook")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()

    import torch  # noqa: PLC0415

    simulate = args.simulate or not torch.cuda.is_available()
    fault = Path(tempfile.mkdtemp()) / "fault"
    if simulate:
        os.environ["HISA_TEST_FAULT_FILE"] = str(fault)
        args.prompt_tokens = min(args.prompt_tokens, 3000)
    else:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total), 0)

    import httpx  # noqa: PLC0415
    import uvicorn  # noqa: PLC0415

    from server.app import ServerSettings, create_app  # noqa: PLC0415
    from server.engine import EngineConfig  # noqa: PLC0415

    max_len = args.prompt_tokens + 64
    cfg = EngineConfig(model=args.model, served_model_name="m", max_model_len=max_len,
                       device="cpu" if simulate else "cuda", gpu_memory_utilization=0.95,
                       prefix_cache_tokens=0)
    app = create_app(ServerSettings(engine=cfg, served_model_names=["m"]))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{args.port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if app.state.engine.load_error is not None:
            print(f"the model failed to load (under the cap?): {app.state.engine.load_error!r}", file=sys.stderr)
            return 1
        if time.monotonic() > deadline or not thread.is_alive():
            print("server not ready", file=sys.stderr)
            return 1
        time.sleep(0.5)
    engine = app.state.engine
    if engine.max_model_len < max_len:
        print(f"note: the server caps the context at {engine.max_model_len} tokens (the card's memory); the "
              f"too-long prompt is shortened to fit under that limit", file=sys.stderr)
        args.prompt_tokens = engine.max_model_len - 64

    def mem() -> dict:
        if simulate:
            return {}
        torch.cuda.synchronize()
        return {"allocated_mib": round(torch.cuda.memory_allocated() / 2**20, 1),
                "reserved_mib": round(torch.cuda.memory_reserved() / 2**20, 1),
                "peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)}

    vocab = engine.vocab_size
    long_prompt = [(i * 7919 + 13) % (vocab - 256) + 128 for i in range(args.prompt_tokens)]
    short = {"model": "m", "prompt": "The whale surfaced and", "max_tokens": 16, "temperature": 0,
             "ignore_eos": True}
    figures: dict = {"device": torch.cuda.get_device_name(0) if not simulate else "cpu (simulated OOM)",
                     "cap_gib": None if simulate else args.cap_gib, "prompt_tokens": args.prompt_tokens,
                     "kv_bytes_per_token": engine.kv_bytes_per_token, "checks": {}}
    checks = figures["checks"]
    with httpx.Client(base_url=url, timeout=1800) as http:
        r = http.post("/v1/completions", json=short)
        checks["warmup_ok"] = r.status_code == 200
        expected = r.json()["choices"][0]["text"] if r.status_code == 200 else None
        figures["after_warmup"] = mem()

        body = {"model": "m", "prompt": long_prompt, "max_tokens": 8, "temperature": 0}
        if simulate:
            fault.write_text("oom:prefill")
        if not simulate:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.monotonic()
        r = http.post("/v1/completions", json=body)
        figures["oom_seconds"] = round(time.monotonic() - t0, 2)
        err = r.json().get("error", {}) if r.headers.get("content-type", "").startswith("application/json") else {}
        figures["oom_response"] = {"status": r.status_code, "error": err}
        checks["oom_is_500_out_of_memory"] = r.status_code in (500, 503) and err.get("code") == "out_of_memory"
        figures["after_oom"] = mem()

        if simulate:
            fault.write_text("oom:prefill")
        r = http.post("/v1/completions", json={**body, "stream": True})
        datas = [line[5:].strip() for line in r.text.splitlines() if line.startswith("data:")]
        errors = [json.loads(d)["error"] for d in datas if d != "[DONE]" and "error" in json.loads(d)]
        figures["oom_stream"] = {"status": r.status_code, "errors": errors, "ends_with_done": datas[-1:] == ["[DONE]"]}
        checks["oom_stream_error_event"] = (r.status_code == 200 and len(errors) == 1
                                            and errors[0].get("code") == "out_of_memory" and datas[-1] == "[DONE]")
        figures["after_oom_stream"] = mem()

        r = http.post("/v1/completions", json=short)
        checks["next_request_ok"] = r.status_code == 200 and r.json()["choices"][0]["text"] == expected
        figures["after_next"] = mem()
        m = http.get("/metrics").text
        running = [ln for ln in m.splitlines() if ln.startswith("hisa_num_requests_running")]
        checks["nothing_running"] = all(ln.rsplit(" ", 1)[1] in ("0.0", "0") for ln in running)
    if not simulate:
        base, after = figures["after_warmup"]["allocated_mib"], figures["after_next"]["allocated_mib"]
        checks["memory_freed"] = after - base <= 64  # MiB
    server.should_exit = True
    thread.join(30)
    figures["passed"] = all(checks.values())
    print(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0 if figures["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
