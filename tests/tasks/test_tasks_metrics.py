"""Answer extraction, pass@k against its closed form, BLEU/chrF against sacreBLEU, accuracy aggregation."""
from __future__ import annotations

from math import comb

import pytest

from hybridpeft.tasks import Example
from hybridpeft.tasks.classification import accuracy_metrics
from hybridpeft.tasks.gsm8k import extract_answer, normalize_number
from hybridpeft.tasks.humaneval import build_program, extract_code, mean_pass_at_k, pass_at_k
from hybridpeft.tasks.lm import truncate_at
from hybridpeft.tasks.translation import clean_translation, corpus_scores


@pytest.mark.parametrize("text,expected", [
    ("Janet sells 9 eggs.\n#### 18", "18"),
    ("#### 1,234", "1234"),
    ("So the total is $1,450,000.\n#### $1,450,000.", "1450000"),
    ("#### -7", "-7"),
    ("#### 18.00", "18"),
    ("#### 0.50", "0.5"),
    ("She has 3 apples, then 5. The answer is 12.", "12"),      # last number, trailing period
    ("It costs $42.", "42"),
    ("10-3 = 7 so 7", "7"),                                      # subtraction is not a negative number
    ("#### 5 dollars, not 6", "5"),                              # first number after the marker
    ("first #### 3 then #### 4", "4"),                           # the last marker wins
    ("\\boxed{96} (I checked 12 cases)", "96"),
    ("no digits at all", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_normalize_number():
    assert normalize_number("1,000") == normalize_number("1000.0") == "1000"
    assert normalize_number("abc") is None


@pytest.mark.parametrize("n,c,k", [(10, 3, 1), (10, 3, 5), (20, 0, 10), (20, 20, 1), (7, 2, 7), (200, 13, 10)])
def test_pass_at_k_matches_closed_form(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_pass_at_k_known_values():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - comb(7, 5) / comb(10, 5)) == pytest.approx(11 / 12)
    assert pass_at_k(5, 4, 2) == 1.0  # fewer failures than draws: some draw passes
    assert mean_pass_at_k([10, 10], [3, 0], 1) == pytest.approx(0.15)
    with pytest.raises(ValueError, match="k="):
        pass_at_k(3, 1, 4)


def test_bleu_identity_and_sacrebleu_agreement():
    sacrebleu = pytest.importorskip("sacrebleu")
    refs = ["The cat sat on the mat.", "I would like some coffee, please."]
    assert corpus_scores(refs, refs, "es") == {"bleu": pytest.approx(100.0), "chrf": pytest.approx(100.0)}
    hyps = ["The cat sat on a mat.", "I would like coffee please."]
    got = corpus_scores(hyps, refs, "es")
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert 0 < got["bleu"] < 100


def test_chinese_uses_the_zh_tokenizer():
    sacrebleu = pytest.importorskip("sacrebleu")
    refs, hyps = ["我在学习西班牙语和法语。"], ["我在学习西班牙语。"]
    got = corpus_scores(hyps, refs, "zh")["bleu"]
    assert got == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh").score)
    # without character segmentation a space-less sentence is one token and scores 0
    assert sacrebleu.corpus_bleu(hyps, [refs], tokenize="13a").score == 0.0 < got


def test_clean_translation():
    assert clean_translation("\n Spanish: Hola.\nEnglish: next", "Spanish") == "Hola."
    assert clean_translation("", "Chinese") == ""


def test_accuracy_is_macro_over_languages():
    exs = [Example("a", label=0, meta={"language": "en"})] * 4 + [Example("b", label=1, meta={"language": "fr"})] * 1
    got = accuracy_metrics(exs, [0, 0, 0, 0, 0])  # en 4/4, fr 0/1
    assert got["accuracy"] == pytest.approx(0.5) and got["accuracy_micro"] == pytest.approx(0.8)
    assert got["accuracy_en"] == 1.0 and got["accuracy_fr"] == 0.0


PROBLEM = {
    "task_id": "t/0", "entry_point": "add",
    "prompt": 'import math\n\ndef add(a, b):\n    """Sum."""\n',
    "canonical_solution": "    return a + b\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
}


def test_build_program_forms():
    plain = build_program(PROBLEM, "    return a + b\n\ndef other():\n    pass\n")
    assert "def other" not in plain and plain.rstrip().endswith("check(add)")
    chat = build_program(PROBLEM, "Sure!\n```python\ndef add(a, b):\n    return math.fsum([a, b])\n```\nDone.", chat=True)
    assert "def add(a, b):\n    return math.fsum" in chat and "import math" in chat and "Sure!" not in chat
    exec(compile(chat, "chat", "exec"), {})  # the later def replaces the stub; the test passes
    assert extract_code("```py\nx = 1\n") == "x = 1\n"  # an unclosed fence runs to the end
    assert truncate_at("abc\ndef", ["\ndef", "zz"]) == "abc"
