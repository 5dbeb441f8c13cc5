"""`hisa-eval` end to end on CPU with a tiny random-weight Llama (structure of the report, not numbers),
plus the metric and needle helpers it is built from."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys

import pytest
import torch

from hisa.evaluation import answer_is_correct, build_prompt, compare_logits, make_needle, sparse_positions
from hisa.evaluation.metrics import MetricAccumulator

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


@pytest.fixture(scope="module")
def tokenizer_dir():
    from hisa.models import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = random.Random(1)
    words = "the whale ship sea captain harpoon deck sailor wind storm island ocean boat rope mast".split()
    sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))).capitalize() + "." for _ in range(900)]
    path = tmp_path_factory.mktemp("text") / "haystack.txt"
    path.write_text(" ".join(sentences))
    return path


def _hisa_eval_cmd() -> list[str]:
    exe = shutil.which("hisa-eval")
    return [exe] if exe else [sys.executable, "-m", "hisa.evaluation.cli"]


def test_hisa_eval_end_to_end(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "report"
    lengths, depths = [256, 512], 3
    cmd = _hisa_eval_cmd() + [
        "--model", str(tiny_model_dir), "--text", str(text_file), "--lengths", "256,512", "--depths", str(depths),
        "--ppl-windows", "2", "--max-new-tokens", "4", "--out", str(out), "--seed", "3", "--device", "cpu",
        "--hisa-block-size", "16", "--hisa-top-blocks", "8", "--hisa-top-k", "64", "--hisa-dense-layers", "0",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()
    assert any(line.startswith("hisa-eval: ") and "needle dense" in line for line in last), proc.stdout
    assert "hisa-eval" in proc.stderr  # the progress bar

    for name in ("results.json", "report.md", "needle_heatmap.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "needle_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    res = json.loads((out / "results.json").read_text())
    assert res["config"]["top_k"] == 64 and res["config"]["dense_layers"] == [0]
    assert res["seed"] == 3 and res["summary"].startswith("hisa-eval: ")
    ppl = res["perplexity"]
    assert [row["length"] for row in ppl] == lengths
    for row in ppl:
        assert len(row["windows"]) == 2
        assert row["all"]["positions"] == 2 * (row["length"] - 1)
        assert row["sparse"]["positions"] == 2 * (row["length"] - 1 - 64)  # context > top_k
        for part in ("all", "sparse"):
            for key in ("ppl_dense", "ppl_hisa", "ppl_delta_pct", "kl_mean", "kl_max", "top1_agreement"):
                assert isinstance(row[part][key], float), (part, key)
            assert 0.0 <= row[part]["top1_agreement"] <= 1.0 and row[part]["kl_mean"] >= 0.0

    needle = res["needle"]
    assert needle["lengths"] == lengths and needle["depths"] == [0.0, 0.5, 1.0]
    assert len(needle["trials"]) == len(lengths) * depths
    for t in needle["trials"]:
        assert t["prompt_tokens"] <= t["length"] and t["prompt_tokens"] > t["length"] - 40
        assert len(t["code"]) == 6 and isinstance(t["dense_correct"], bool) and isinstance(t["hisa_correct"], bool)
        assert isinstance(t["dense_answer"], str) and isinstance(t["hisa_answer"], str)
    assert [r["length"] for r in needle["rows"]] == lengths

    md = (out / "report.md").read_text()
    assert "| window |" in md and "| length | trials | dense | HISA |" in md
    assert "needle_heatmap.png" in md and res["summary"] in md

    # deterministic for a given seed: the same needles and answers again (in-process this time)
    from hisa.evaluation.cli import main

    out2 = tmp_path / "again"
    args2 = cmd[len(_hisa_eval_cmd()):]
    args2 = [a if a != str(out) else str(out2) for a in args2]
    args2[args2.index("--lengths") + 1] = "256"
    assert main(args2 + ["--skip-ppl", "--quiet"]) == 0
    res2 = json.loads((out2 / "results.json").read_text())
    assert res2["perplexity"] is None
    first = [t for t in needle["trials"] if t["length"] == 256]
    assert [t["code"] for t in res2["needle"]["trials"]] == [t["code"] for t in first]
    assert [t["hisa_answer"] for t in res2["needle"]["trials"]] == [t["hisa_answer"] for t in first]


def test_hisa_eval_rejects_bad_input(tiny_model_dir, text_file, tmp_path, capsys):
    from hisa.evaluation.cli import main

    base = ["--model", str(tiny_model_dir), "--out", str(tmp_path / "x"), "--quiet"]
    for extra, msg in (
        (["--text", str(tmp_path / "missing.txt")], "no such file"),
        (["--text", str(text_file), "--lengths", "2048,abc"], "comma-separated integers"),
        (["--text", str(text_file), "--hisa-top-k", "4096", "--hisa-top-blocks", "2"], "invalid HISA settings"),
        (["--text", str(text_file), "--skip-ppl", "--skip-needle"], "nothing to evaluate"),
        (["--text", str(text_file), "--lengths", "4096"], "exceeds the model's context"),
    ):
        try:
            code = main(base + extra)
        except SystemExit as e:  # argparse errors
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and msg in err, (extra, err[-1500:])
    assert not (tmp_path / "x").exists()  # nothing written on bad input


def test_compare_logits_and_accumulator():
    torch.manual_seed(0)
    d = torch.randn(6, 11)
    same = compare_logits(d, d.clone(), torch.arange(6))
    assert torch.allclose(same["kl"], torch.zeros(6)) and same["agree"].all()
    s = d.clone()
    s[0] = -s[0]
    m = compare_logits(d, s, torch.arange(6))
    assert m["kl"][0] > 0 and not m["agree"][0] and m["agree"][1:].all()
    ref_kl = torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(d, -1), log_target=True,
                                        reduction="none").sum(-1)
    assert torch.allclose(m["kl"], ref_kl, atol=1e-6)
    acc = MetricAccumulator()
    acc.update(d, s, torch.arange(6), torch.tensor([True, False, False, False, False, True]))
    r = acc.result()
    assert r["all"]["positions"] == 6 and r["sparse"]["positions"] == 2
    assert r["sparse"]["top1_agreement"] == 0.5 and abs(r["all"]["top1_agreement"] - 5 / 6) < 1e-9
    assert sparse_positions(10, 4).tolist() == [False] * 4 + [True] * 5


def test_needle_helpers(tokenizer_dir):
    from transformers import AutoTokenizer

    n1, n2 = make_needle(random.Random(5)), make_needle(random.Random(5))
    assert n1 == n2 and len(n1.code) == 6 and n1.code in n1.fact and n1.name in n1.question
    assert answer_is_correct(f"The passcode is {n1.code}.", n1.code)
    assert answer_is_correct(f"{n1.code[:3]},{n1.code[3:]}", n1.code)
    assert not answer_is_correct(f"1{n1.code}", n1.code) and not answer_is_correct("I don't know", n1.code)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    text_ids = tok(" ".join(["Call me Ishmael."] * 400), add_special_tokens=False)["input_ids"]
    for depth in (0.0, 0.3, 1.0):
        ids = build_prompt(tok, text_ids, 300, depth, n1)
        assert 280 < len(ids) <= 300
        text = tok.decode(ids)
        assert n1.fact in text and n1.question in text
    early = tok.decode(build_prompt(tok, text_ids, 300, 0.0, n1))
    late = tok.decode(build_prompt(tok, text_ids, 300, 1.0, n1))
    assert early.index(n1.fact) < late.index(n1.fact)
