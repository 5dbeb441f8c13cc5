"""Follow-up tokenization (server/tokcache.py): reusing a recent text's ids gives exactly the ids of a full
tokenization, and does reuse them."""

from __future__ import annotations

import copy
import random

import pytest

from server.tokcache import PrefixTokenizer, common_prefix_len
from tests.helpers import CORPUS

pytestmark = pytest.mark.skipif(not CORPUS.exists(), reason="needs ../shared/corpus/moby-dick.txt")

SUFFIXES = ["\n\nQuestion: who is Ahab?", " whale", "   \n  spaces", "é日本語 ünïcödé", "", "ing and more",
            "\t\ttabs", "😀 emoji", "x" * 50, "...!?", "\n\n\n\n"]


def _document(rng, text: str, shortest: int, odd: list[str] | None = None) -> str:
    """A random stretch of ``text`` (``shortest`` to 40000 characters), with one of ``odd`` inserted somewhere."""
    a = rng.randrange(0, len(text) - 60000)
    doc = text[a : a + rng.randrange(shortest, 40000)]
    if odd:
        pos = rng.randrange(0, len(doc))
        doc = doc[:pos] + rng.choice(odd) + doc[pos:]
    return doc


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from hisa.models import embedded_model_dir

    return AutoTokenizer.from_pretrained(str(embedded_model_dir()))


@pytest.fixture(scope="module")
def text():
    return CORPUS.read_text()


def test_common_prefix_len():
    assert common_prefix_len("abcdef", "abcxef") == 3
    assert common_prefix_len("abc", "abcd") == 3
    assert common_prefix_len("", "a") == 0
    assert common_prefix_len("same", "same") == 4
    assert common_prefix_len("é日本x", "é日本y") == 3
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randrange(0, 300)
        a = "".join(rng.choice("ab") for _ in range(n))
        b = a[: rng.randrange(0, n + 1)] + "".join(rng.choice("abc") for _ in range(rng.randrange(0, 5)))
        want = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert common_prefix_len(a, b) == want


def test_follow_ups_equal_full_tokenization(tok, text):
    pt = PrefixTokenizer(tok)
    rng = random.Random(1)
    for _ in range(25):
        a = rng.randrange(0, len(text) - 60000)
        doc = text[a : a + rng.randrange(12000, 60000)]
        cut = rng.randrange(len(doc) - 3000, len(doc))  # the texts may part mid-word or mid-whitespace
        first, second = (doc[:cut] + rng.choice(SUFFIXES) for _ in range(2))
        for special in (True, False):
            for t in (first, second, first):
                assert pt.encode(t, special) == tok.encode(t, add_special_tokens=special)
    assert pt.reused >= 40  # nearly every second text was spliced, not tokenized whole


def test_chat_turns_equal_full_tokenization(tok, text):
    """Chat-rendered prompts (special tokens inside the text): a document, then follow-up questions and a
    conversation that grows."""
    pt = PrefixTokenizer(tok)
    doc = text[10000:70000]
    history = [{"role": "system", "content": "Answer from the document."}]
    for q in ("Who is Ahab?", "What is the Pequod?", "Where does it sail?"):
        msgs = history + [{"role": "user", "content": f"{doc}\n\n{q}"}]
        rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert pt.encode(rendered, False) == tok.encode(rendered, add_special_tokens=False)
    convo = [{"role": "user", "content": doc}]
    for turn in range(3):
        convo += [{"role": "assistant", "content": f"answer {turn} " * 20}, {"role": "user", "content": f"and {turn}?"}]
        rendered = tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
        assert pt.encode(rendered, False) == tok.encode(rendered, add_special_tokens=False)
    assert pt.reused >= 4


def test_short_texts_and_early_differences_tokenize_whole(tok, text):
    pt = PrefixTokenizer(tok)
    short = text[:2000]
    assert pt.encode(short) == tok.encode(short) and pt.reused == 0
    a, b = text[:30000], "X" + text[1:30000]  # they differ at the first character
    for t in (a, b):
        assert pt.encode(t) == tok.encode(t)
    assert pt.reused == 0
    same = pt.encode(a)  # the same text again: the cached ids
    assert same == tok.encode(a)


def test_tokenizer_that_appends_special_tokens(tok, text):
    """A post-processor adding an end token: splicing would drop it, so such texts are tokenized whole."""
    from tokenizers.processors import TemplateProcessing

    t2 = copy.deepcopy(tok)
    eos = t2.eos_token
    t2.backend_tokenizer.post_processor = TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, t2.eos_token_id)])
    pt = PrefixTokenizer(t2)
    doc = text[5000:40000]
    for q in (" first?", " second?"):
        assert pt.encode(doc + q, True) == t2.encode(doc + q, add_special_tokens=True)
        assert pt.encode(doc + q, True)[-1] == t2.eos_token_id


def test_long_text_in_parallel_pieces_equals_whole(tok, text):
    """First-time tokenization of a long text as overlapping pieces (one batch), joined at checked points:
    prose, unicode, long runs of whitespace and of letters across the piece boundaries."""
    pt = PrefixTokenizer(tok, piece_chars=4096, workers=8)
    rng = random.Random(2)
    odd = ["\n" * 700, " " * 3000, "a" * 5000, "日本語" * 800, "\t \n" * 500, "1234567890" * 300]
    for trial in range(12):
        t = _document(rng, text, 9000, odd if trial % 2 else None)
        for special in (True, False):
            assert pt.encode(t, special) == tok.encode(t, add_special_tokens=special), (trial, special)
    assert pt.split >= 12


def _trained_tokenizer(kind: str, text: str):
    """A small tokenizer of one design family, trained on ``text`` (offline, ~0.3 s)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "wordpiece":  # BERT: lower-casing normaliser, [CLS] ... [SEP] added around the text
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=3000, special_tokens=["[UNK]", "[CLS]", "[SEP]"])
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>" if kind == "metaspace" else None,
                                   byte_fallback=kind == "metaspace"))
        alphabet = [] if kind == "metaspace" else pre_tokenizers.ByteLevel.alphabet()
        trainer = trainers.BpeTrainer(vocab_size=3000, special_tokens=["<unk>", "<s>", "</s>"],
                                      initial_alphabet=alphabet)
        if kind == "metaspace":  # SentencePiece style (Llama 2, Mistral): a dummy prefix on the first word, BOS
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
            tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        elif kind == "bytelevel":  # GPT-2 style
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
        else:  # Llama 3 / Qwen style: a split regex, then bytes
            pat = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pat), behavior="isolated"),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                  use_regex=False)])
            tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text[:400000]], trainer=trainer)
    if kind == "metaspace":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    if kind == "wordpiece":
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                           special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    bos, eos = ("[CLS]", "[SEP]") if kind == "wordpiece" else ("<s>", "</s>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)


@pytest.mark.parametrize("kind", ["metaspace", "bytelevel", "split", "wordpiece"])
def test_other_tokenizer_designs(kind, text):
    """Follow-up splicing and parallel pieces give one pass's ids with the main tokenizer designs users bring:
    SentencePiece-style (a dummy prefix on a restarted piece, BOS), GPT-2 byte-level, Llama 3 / Qwen regex
    splits, BERT WordPiece (appends [SEP]: falls back to one pass with special tokens)."""
    tok = _trained_tokenizer(kind, text)
    pt = PrefixTokenizer(tok, piece_chars=4096, workers=8)
    rng = random.Random(3)
    odd = ["\n" * 300, " " * 900, "a" * 2000, "日本語" * 300, "1234567890" * 100, "😀" * 200]
    for trial in range(8):
        doc = _document(rng, text, 12000, odd if trial % 2 else None)
        cut = rng.randrange(len(doc) - 3000, len(doc))
        for special in (True, False):
            for t in (doc[:cut] + rng.choice(SUFFIXES), doc[:cut] + "\n\nQuestion: why?"):
                assert pt.encode(t, special) == tok.encode(t, add_special_tokens=special), (kind, trial, special)
    assert pt.reused >= 8 and pt.split >= 8
