"""Needle in a haystack: a generated fact hidden at a chosen depth of a long text, then asked about.

The fact is made from a seeded RNG (a random person and a random 6-digit passcode), so no model can
have memorised it. The haystack is cut from any text file; the prompt goes through the model's chat
template; the answer is greedy and counts as correct when the passcode appears in it as a whole number.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass

import torch

from ..attention import override

_FIRST = (
    "Alma Bruno Cecile Dorian Elska Farid Greta Hollis Ines Jarek Kiri Lionel Maren Nikos Odile Pavel Quilla Rosalind "
    "Soren Tamsin Ulric Vesna Wendell Xiomara Yannick Zelda Anselm Brigitte Casimir Delphine Emeric Fenna Gideon "
    "Hester Isidor Jolanda Konrad Leocadia Magnus Noor Osric Petra Rainer Saskia Thaddeus Ursula Viggo Wilhelmina"
).split()
_LAST = (
    "Abernathy Bellweather Castellan Drummond Eskildsen Fairweather Gallagher Holloway Ingersoll Jaramillo Kowalczyk "
    "Lindqvist Montague Nakashima Oyelaran Pemberton Quintero Rasmussen Sandoval Thorncastle Underhill Valcourt "
    "Whitlock Yarborough Zabrowski Ashcombe Blackwood Corrigan Delacroix Ellington Fitzgerald Grimaldi Hargreaves"
).split()

QUESTION = "What is the secret passcode of {name}? Answer with the 6-digit passcode only."
FACT = "The secret passcode of {name} is {code}."


@dataclass(frozen=True)
class Needle:
    name: str
    code: str

    @property
    def fact(self) -> str:
        return FACT.format(name=self.name, code=self.code)

    @property
    def question(self) -> str:
        return QUESTION.format(name=self.name)


def make_needle(rng: random.Random) -> Needle:
    return Needle(f"{rng.choice(_FIRST)} {rng.choice(_LAST)}", f"{rng.randrange(100000, 1000000)}")


def answer_is_correct(answer: str, code: str) -> bool:
    """True when ``code`` appears in ``answer`` as a whole number (thousands separators ignored)."""
    flat = re.sub(r"(?<=\d)[,\s](?=\d)", "", answer)
    return re.search(rf"(?<!\d){re.escape(code)}(?!\d)", flat) is not None


def _chat_ids(tokenizer, content: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(content + "\nAnswer:", add_special_tokens=True)["input_ids"]


def _content(haystack: str, needle: Needle) -> str:
    return f"Read the document and answer the question.\n\n<document>\n{haystack}\n</document>\n\n{needle.question}"


def _insert(haystack: str, fact: str, depth: float) -> str:
    """Put ``fact`` at fraction ``depth`` of ``haystack``, moved forward to the next sentence end."""
    if depth <= 0:
        return f"{fact} {haystack}"
    if depth >= 1:
        return f"{haystack} {fact}"
    at = int(len(haystack) * depth)
    m = re.compile(r"[.!?][\"')\]]?\s").search(haystack, at)
    at = m.end() if m else at
    return f"{haystack[:at].rstrip()} {fact} {haystack[at:].lstrip()}"


def build_prompt(tokenizer, text_ids: list[int] | torch.Tensor, length: int, depth: float, needle: Needle,
                 offset: int = 0) -> list[int]:
    """Prompt token ids of about ``length`` tokens (never more): a haystack cut from ``text_ids`` at
    ``offset`` with the needle at ``depth`` (0..1), asked through the chat template."""
    text_ids = list(text_ids.tolist() if isinstance(text_ids, torch.Tensor) else text_ids)
    overhead = len(_chat_ids(tokenizer, _content(_insert("", needle.fact, 0.0), needle)))
    if overhead >= length:
        raise ValueError(f"length {length} is too short for the needle prompt ({overhead} tokens of overhead)")
    budget = length - overhead
    ids = None
    for _ in range(8):  # re-tokenising the joined text shifts the count a little: converge from above
        if offset + budget > len(text_ids):
            raise ValueError(f"the text has too few tokens for a {length}-token haystack")
        hay = tokenizer.decode(text_ids[offset : offset + budget], skip_special_tokens=True)
        ids = _chat_ids(tokenizer, _content(_insert(hay, needle.fact, depth), needle))
        if len(ids) <= length:
            if length - len(ids) <= 8:
                break
            budget += (length - len(ids)) // 2
        else:
            budget -= len(ids) - length + 2
    while len(ids) > length:  # last resort, rarely needed
        budget -= 16
        hay = tokenizer.decode(text_ids[offset : offset + budget], skip_special_tokens=True)
        ids = _chat_ids(tokenizer, _content(_insert(hay, needle.fact, depth), needle))
    return ids


@dataclass
class NeedleTrial:
    length: int
    depth: float
    prompt_tokens: int
    code: str
    dense_answer: str
    hisa_answer: str
    dense_correct: bool
    hisa_correct: bool

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def generate_answer(model, tokenizer, ids: list[int], max_new_tokens: int = 16) -> str:
    dev = next(model.parameters()).device
    inp = torch.tensor([ids], device=dev)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        input_ids=inp,
        attention_mask=torch.ones_like(inp),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    return tokenizer.decode(out[0, inp.shape[1] :], skip_special_tokens=True).strip()


def plan_trial(rng: random.Random, text_tokens: int, length: int) -> tuple[Needle, int]:
    """Draw one trial's needle and haystack offset (a random place of the text when it is long enough)."""
    needle = make_needle(rng)
    slack = text_tokens - 2 * length
    return needle, (rng.randrange(0, slack) if slack > 0 else 0)


def run_planned(model, tokenizer, text_ids, length: int, depth: float, needle: Needle, offset: int,
                max_new_tokens: int = 32) -> NeedleTrial:
    """One needle at one (length, depth): the same prompt answered densely and with HISA (the model
    must already be HISA-patched)."""
    ids = build_prompt(tokenizer, text_ids, length, depth, needle, offset=offset)
    with override(enabled=False):
        dense = generate_answer(model, tokenizer, ids, max_new_tokens)
    sparse = generate_answer(model, tokenizer, ids, max_new_tokens)
    return NeedleTrial(length, depth, len(ids), needle.code, dense, sparse,
                       answer_is_correct(dense, needle.code), answer_is_correct(sparse, needle.code))


def run_trial(model, tokenizer, text_ids, length: int, depth: float, rng: random.Random,
              max_new_tokens: int = 32) -> NeedleTrial:
    """:func:`plan_trial` then :func:`run_planned`."""
    needle, offset = plan_trial(rng, len(text_ids), length)
    return run_planned(model, tokenizer, text_ids, length, depth, needle, offset, max_new_tokens)
