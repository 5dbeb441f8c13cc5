"""End-to-end latency through the HTTP server: HISA vs dense, measured by a streaming OpenAI client.

Starts ``hisa-serve`` twice on 127.0.0.1 over the same random-weight model folder — once with HISA
(default config) and once with ``--no-hisa`` (dense SDPA) — and for each prompt length measures, with the
official ``openai`` SDK streaming ``/v1/completions``:

* TTFT: request sent -> first streamed token (client side, includes HTTP, queueing, chunked prefill);
* ITL: mean gap between later streamed tokens (inter-token latency, i.e. decode ms/token);
* follow-up TTFT: the same document with another question appended (prefix reuse), as a fraction of the
  first request's TTFT, sent ``--think-time`` seconds after the first answer ended (default 1 s: a user
  reading it; the server uses idle time to prepare for follow-ups).

Each is measured twice: with the openai SDK (as users call it; its request building costs ~10 us per
token id on the client) and with a plain HTTP client (httpx + json, "raw": the server's own latency), the
latter on a fresh document so that its first request is cold too.

Prompts are token ids (``prompt=[...]``) drawn from a seeded RNG, so their length is exact. The model is
Llama-3.2-1B-shaped (hidden 2048, 16 layers, 32 heads / 8 KV heads, head dim 64, intermediate 8192, rope
theta 500000) with the tokenizer of the embedded model (vocab 49152, so the output head is smaller than
Llama's 128256; it runs for the last position only).

    python bench/serve.py --contexts 8k,32k,128k --tokenizer DIR --json bench/results/serve.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_len(s: str) -> int:
    s = s.strip().lower()
    return int(float(s[:-1]) * 1024) if s.endswith("k") else int(s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(out: Path, tokenizer_dir: Path, layers: int, hidden: int, heads: int, kv_heads: int,
                inter: int, max_len: int, dtype: str) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_len,
                      rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(out)
    tok.save_pretrained(out)


class Server:
    def __init__(self, model_dir: Path, extra: list[str], max_len: int, log: Path):
        self.port = free_port()
        cmd = [sys.executable, "-m", "server.cli", "--model", str(model_dir), "--host", "127.0.0.1",
               "--port", str(self.port), "--max-model-len", str(max_len), "--served-model-name", "bench", *extra]
        self.log = open(log, "w")
        # the server tokenizes long texts in parallel pieces: keep the tokenizer's threads on in it (the client
        # side may have turned them off for itself)
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "true"}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait(self, timeout: float = 600) -> None:
        import httpx

        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError("server did not become healthy")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def stream_raw(http, prompt: list[int], max_tokens: int) -> dict:
    """The same streamed request with a plain HTTP client (``http``: one ``httpx.Client`` per server, kept
    open as a real client keeps its connection; creating one costs 20-40 ms, mostly its TLS context) and json:
    what the server costs, without the openai SDK's request building (which walks every element of a
    token-id prompt in Python: ~0.3-0.5 s for 32k ids, measured on this bench's machines)."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    data = json.dumps(body)
    t0 = time.perf_counter()
    stamps, usage = [], None
    with http.stream("POST", "/v1/completions", content=data, headers={"Content-Type": "application/json"}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices") and event["choices"][0].get("text"):
                stamps.append(time.perf_counter())
            if event.get("usage"):
                usage = event["usage"]
    if not stamps:
        raise RuntimeError("no tokens streamed")
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ttft_s": stamps[0] - t0, "itl_ms": 1000 * statistics.mean(gaps) if gaps else None,
            "itl_median_ms": 1000 * statistics.median(gaps) if gaps else None, "tokens": len(stamps),
            "usage": usage}


def chat_raw(http, text: str, max_tokens: int) -> dict:
    """A streamed chat request whose user message is ``text`` (a document and a question) with the plain
    HTTP client: time to the first content delta (the server tokenizes the text: a follow-up on the same
    document re-tokenizes only its end)."""
    body = {"model": "bench", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    data = json.dumps(body)
    t0 = time.perf_counter()
    first, usage = None, None
    with http.stream("POST", "/v1/chat/completions", content=data,
                     headers={"Content-Type": "application/json"}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if first is None and event.get("choices") and event["choices"][0].get("delta", {}).get("content"):
                first = time.perf_counter() - t0
            if event.get("usage"):
                usage = event["usage"]
    if first is None:
        raise RuntimeError("no content streamed")
    return {"ttft_s": first, "usage": usage}


def document_text(corpus: str, tok, n_tokens: int, offset: int) -> str:
    """About ``n_tokens`` tokens (of tokenizer ``tok``) of ``corpus`` (repeated as needed) starting ``offset``
    characters in."""
    text = corpus[offset:] + "\n\n" + corpus
    while len(text) < 6 * n_tokens:
        text += "\n\n" + corpus
    ids = tok.encode(text[: 6 * n_tokens], add_special_tokens=False)[:n_tokens]
    return tok.decode(ids)


def stream_once(client, prompt: list[int], max_tokens: int) -> dict:
    t0 = time.perf_counter()
    stamps = []
    usage = None
    stream = client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
        if getattr(chunk, "usage", None):
            usage = chunk.usage.model_dump() if hasattr(chunk.usage, "model_dump") else dict(chunk.usage)
    if not stamps:
        raise RuntimeError("no tokens streamed")
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {
        "ttft_s": stamps[0] - t0,
        "itl_ms": 1000 * statistics.mean(gaps) if gaps else None,
        "itl_median_ms": 1000 * statistics.median(gaps) if gaps else None,
        "tokens": len(stamps),
        "usage": usage,
    }


def gpu_memory(server) -> dict:
    """The server's GPU memory gauges (bytes) from /metrics: allocated now and peak since start-up."""
    import re
    import urllib.request

    text = urllib.request.urlopen(server.url + "/metrics", timeout=30).read().decode()
    out = {}
    for key, metric in (("allocated", "hisa_gpu_memory_allocated_bytes"), ("peak", "hisa_gpu_memory_peak_bytes")):
        m = re.search(rf"^{metric}\{{[^}}]*\}} ([0-9.e+]+)$", text, re.M)
        out[key] = float(m.group(1)) if m else None
    return out


def run_mode(name: str, server: Server, contexts: list[int], vocab: int, max_tokens: int, followup_len: int,
             think: float = 0.0, docs: dict | None = None) -> list:
    from openai import OpenAI

    import httpx

    client = OpenAI(base_url=server.url + "/v1", api_key="none", timeout=1800, max_retries=0)
    http = httpx.Client(base_url=server.url, timeout=1800)
    rng = random.Random(0)
    rows = []
    # warm-up: compiles kernels and fills allocator pools at a long-ish length
    warm = [rng.randrange(100, vocab) for _ in range(min(contexts[-1], 20000))]
    stream_once(client, warm, 4)
    stream_raw(http, warm[:9000], 4)
    for n in contexts:
        doc = [rng.randrange(100, vocab) for _ in range(n - 16)]
        q1, q2, q3, q4 = ([rng.randrange(100, vocab) for _ in range(16)] for _ in range(4))
        # SDK client first (the openai package, as users call it), then the same kind of request raw
        sdk = stream_once(client, doc + q1, max_tokens)
        time.sleep(think)
        sdk_follow = stream_once(client, doc + q2, 8) if n <= followup_len else None
        first = stream_raw(http, doc + q3, max_tokens)  # reuses doc's cache too: only q3 is new
        # a cold first request on a fresh document, then (up to followup_len) a follow-up on it
        doc2 = [rng.randrange(100, vocab) for _ in range(n - 16)]
        first_cold = stream_raw(http, doc2 + q1, max_tokens)
        time.sleep(think)
        follow = stream_raw(http, doc2 + q4, 8) if n <= followup_len else None
        row = {"mode": name, "context": n, **{k: sdk[k] for k in ("ttft_s", "itl_ms", "itl_median_ms")},
               "usage": sdk["usage"], "raw_itl_ms": first["itl_ms"], "raw_ttft_s": first_cold["ttft_s"]}
        if follow:
            row["raw_followup_ttft_s"] = follow["ttft_s"]
            row["raw_followup_ratio"] = follow["ttft_s"] / first_cold["ttft_s"]
        first, follow = sdk, sdk_follow
        mem = gpu_memory(server)  # contexts run in increasing order, so the peak so far is this context's
        row["gpu_peak_gib"] = mem["peak"] / 2**30 if mem["peak"] else None
        if follow:
            row["followup_ttft_s"] = follow["ttft_s"]
            row["followup_ratio"] = follow["ttft_s"] / first["ttft_s"]
            row["followup_cached_tokens"] = ((follow["usage"] or {}).get("prompt_tokens_details") or {}).get(
                "cached_tokens")
        if docs and n in docs:  # a user's way: chat with the document's text, then a follow-up question
            chat_first = chat_raw(http, docs[n] + "\n\nQuestion: who is the captain of the ship?", 8)
            time.sleep(think)
            chat_follow = chat_raw(http, docs[n] + "\n\nQuestion: what is the name of the ship?", 8)
            row.update(chat_ttft_s=chat_first["ttft_s"], chat_followup_ttft_s=chat_follow["ttft_s"],
                       chat_followup_ratio=chat_follow["ttft_s"] / chat_first["ttft_s"],
                       chat_prompt_tokens=(chat_first["usage"] or {}).get("prompt_tokens"),
                       chat_followup_cached=((chat_follow["usage"] or {}).get("prompt_tokens_details") or {}).get(
                           "cached_tokens"))
            print(f"{name:6s} {n:>7d}  chat (text) TTFT {row['chat_ttft_s']:.3f} s, follow-up "
                  f"{row['chat_followup_ttft_s']:.3f} s ({row['chat_followup_ratio']:.3f}x), "
                  f"cached {row['chat_followup_cached']} of {row['chat_prompt_tokens']}", flush=True)
        rows.append(row)
        print(f"{name:6s} {n:>7d}  SDK TTFT {first['ttft_s']:.3f} s  ITL {first['itl_ms']:.2f} ms"
              + f"  raw TTFT {row['raw_ttft_s']:.3f} s"
              + (f" follow-up {row['raw_followup_ttft_s']:.3f} s ({row['raw_followup_ratio']:.3f}x)"
                 if "raw_followup_ttft_s" in row else "")
              + (f"  peak {row['gpu_peak_gib']:.1f} GiB" if row["gpu_peak_gib"] else "")
              + (f"  follow-up TTFT {follow['ttft_s']:.3f} s ({row['followup_ratio']:.2f}x)" if follow else ""),
              flush=True)
    http.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="8k,32k,64k,128k")
    ap.add_argument("--tokenizer", required=True, help="folder with a tokenizer (e.g. the embedded model's)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--followup-up-to", type=parse_len, default=32 * 1024,
                    help="ask a follow-up question for contexts up to this length")
    ap.add_argument("--think-time", type=float, default=1.0,
                    help="seconds between an answer and its follow-up question (a user reading; default 1)")
    ap.add_argument("--text", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "corpus" / "moby-dick.txt",
                    help="public-domain text for the chat follow-up measurement (skipped when missing)")
    ap.add_argument("--modes", default="hisa,dense")
    ap.add_argument("--server-args", default="", help="extra hisa-serve flags for both modes")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--logs", type=Path, default=Path(tempfile.gettempdir()))
    args = ap.parse_args()

    contexts = [parse_len(c) for c in args.contexts.split(",")]
    max_len = max(contexts) + args.max_tokens + 64
    work = Path(tempfile.mkdtemp(prefix="hisa-serve-bench-"))
    try:
        model_dir = work / "model"
        build_model(model_dir, Path(args.tokenizer), args.layers, args.hidden, args.heads, args.kv_heads,
                    args.intermediate, max(max_len, 8192), args.dtype)
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        results = {"card": _card(), "contexts": contexts, "rows": []}
        docs = {}
        if args.text and args.text.is_file():
            from transformers import AutoTokenizer

            corpus = args.text.read_text()
            tok = AutoTokenizer.from_pretrained(args.tokenizer)
            docs = {n: document_text(corpus, tok, n - 64, 1000 * i)
                    for i, n in enumerate(contexts) if n <= args.followup_up_to}
        for mode in args.modes.split(","):
            extra = args.server_args.split() + (["--no-hisa"] if mode == "dense" else [])
            server = Server(model_dir, extra, max_len, args.logs / f"serve-{mode}.log")
            try:
                server.wait()
                results["rows"] += run_mode(mode, server, contexts, vocab, args.max_tokens, args.followup_up_to,
                                            args.think_time, docs)
            finally:
                server.stop()
        _table(results)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _card() -> str:
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001
        return "unknown"


def _table(results: dict) -> None:
    rows = results["rows"]
    dense = {r["context"]: r for r in rows if r["mode"] == "dense"}
    print(f"\ncard: {results['card']}")
    print("| context | mode | SDK TTFT s | TTFT vs dense | ITL ms | ITL vs dense | SDK follow-up TTFT (x first) | "
          "raw TTFT s / follow-up s (x) | chat text TTFT s / follow-up s (x) | raw ITL ms | peak GPU GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        d = dense.get(r["context"])
        tr = f"{r['ttft_s'] / d['ttft_s']:.2f}" if d else "-"
        ir = f"{r['itl_ms'] / d['itl_ms']:.2f}" if d and r["itl_ms"] and d["itl_ms"] else "-"
        fu = f"{r['followup_ttft_s']:.3f} s ({r['followup_ratio']:.3f})" if "followup_ttft_s" in r else "-"
        pk = f"{r['gpu_peak_gib']:.1f}" if r.get("gpu_peak_gib") else "-"
        raw = f"{r['raw_ttft_s']:.3f}" + (f" / {r['raw_followup_ttft_s']:.3f} ({r['raw_followup_ratio']:.3f})"
                                           if "raw_followup_ttft_s" in r else "")
        chat = (f"{r['chat_ttft_s']:.3f} / {r['chat_followup_ttft_s']:.3f} ({r['chat_followup_ratio']:.3f})"
                if "chat_ttft_s" in r else "-")
        print(f"| {r['context']} | {r['mode']} | {r['ttft_s']:.3f} | {tr} | {r['itl_ms']:.2f} | {ir} | {fu} | {raw} | "
              f"{chat} | {r['raw_itl_ms']:.2f} | {pk} |")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
