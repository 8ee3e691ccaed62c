"""Model-side evaluation: label scoring, batched generation, validation loss, every task end to end.

A tiny random-init Llama with the SmolLM2 tokenizer (the only module that needs
it: in a fresh CI cache the first ``resolve`` de-quantizes the GGUF once, ~40 s).
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hybridpeft.tasks import Example, get_task
from hybridpeft.tasks.lm import generate, label_log_likelihoods, truncate_at, validation_loss

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from hybridpeft.models import resolve

    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m"))
    assert tok.chat_template and tok.pad_token_id is not None
    return tok


@pytest.fixture(scope="session")
def tiny_lm(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    return LlamaForCausalLM(config).double().eval()


class Favour(nn.Module):
    """A stand-in LM whose every next-token distribution prefers one token."""

    def __init__(self, vocab: int, token: int, margin: float = 5.0) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device
        self.vocab, self.token, self.margin = vocab, token, margin

    def forward(self, input_ids, attention_mask=None, **kwargs):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.token] = self.margin
        return SimpleNamespace(logits=logits)


def _sst2_examples(task, labels=(1, 0, 1, 1)):
    examples = [Example(prompt=f"review number {i} " * (i + 1), label=lab) for i, lab in enumerate(labels)]
    for ex in examples:
        task.decorate(ex)
    return examples


# --------------------------------------------------------------------------- verbalizer scoring


@pytest.mark.parametrize("targets", [
    [" positive", " negative", " not sure at all"],   # multi-token: one row per (prompt, target)
    [" positive", " negative", " yes"],               # single tokens: the one-row-per-prompt path
], ids=["multi-token", "single-token"])
def test_label_log_likelihoods_equal_unbatched_sums(tiny_lm, tokenizer, targets):
    prompts = ["Short prompt:", "A considerably longer prompt, with more tokens in it than the other one:", "Mid one:"]
    assert (max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in targets) == 1) == (targets[-1] == " yes")
    batched = label_log_likelihoods(tiny_lm, tokenizer, prompts, targets, batch_size=2)
    for i, p in enumerate(prompts):
        p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        for j, t in enumerate(targets):
            t_ids = tokenizer(t, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(tiny_lm(torch.tensor([p_ids + t_ids])).logits[0], -1)
            manual = sum(logp[len(p_ids) + k - 1, tok].item() for k, tok in enumerate(t_ids))
            assert batched[i, j].item() == pytest.approx(manual, abs=1e-9)


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("word,label", [("positive", 1), ("negative", 0)])
def test_verbalizer_picks_the_more_likely_label(tokenizer, chat, word, label):
    task = get_task("sst2", use_chat_template=chat, progress=False, report_loss=False)
    examples = _sst2_examples(task)
    first = tokenizer(task.render_target(tokenizer, examples[0], word), add_special_tokens=False)["input_ids"][0]
    model = Favour(len(tokenizer), first)
    scores = task.predict(model, tokenizer, examples)
    assert scores.shape == (4, 2) and (scores[:, label] > scores[:, 1 - label]).all()
    result = task.evaluate(model, tokenizer, examples)
    assert task.last_outputs == [label] * 4
    assert result["accuracy"] == pytest.approx(sum(ex.label == label for ex in examples) / 4)


def test_encode_renders_prompt_and_supervises_only_the_answer(tokenizer):
    ex = _sst2_examples(get_task("sst2"), labels=(1,))
    for chat, expected in [(True, "positive<|im_end|>"), (False, " positive<|im_end|>")]:
        task = get_task("sst2", use_chat_template=chat)
        batch = task.encode(tokenizer, ex, max_length=256)
        supervised = batch["input_ids"][0][batch["labels"][0] != -100]
        assert tokenizer.decode(supervised) == expected
        assert ("<|im_start|>assistant" in tokenizer.decode(batch["input_ids"][0])) == chat


def test_humaneval_chat_target_is_a_code_block(tokenizer):
    task = get_task("humaneval")
    ex = task.load("test[:1]")[0]
    batch = task.encode(tokenizer, [ex], max_length=1024)
    answer = tokenizer.decode(batch["input_ids"][0][batch["labels"][0] != -100])
    assert answer.startswith("```python\n") and "def has_close_elements" in answer and answer.endswith("```<|im_end|>")


# --------------------------------------------------------------------------- generation and loss


def test_left_padded_batches_generate_what_single_prompts_do(tiny_lm, tokenizer):
    prompts = ["Hello", "Translate this long English sentence into Spanish please:", "2 + 2 ="]
    batched = generate(tiny_lm, tokenizer, prompts, max_new_tokens=6, batch_size=3, progress=False)
    single = [generate(tiny_lm, tokenizer, [p], max_new_tokens=6, batch_size=1, progress=False)[0] for p in prompts]
    assert batched == single
    assert any(batched)  # a random model still emits text


class _GenerationSpy:
    """Counts the new tokens of each ``model.generate`` call and, while active, makes the model
    emit a newline after every token whose id is divisible by 3 (so generations have lines)."""

    def __init__(self, model, newline_id):
        self.model, self.newline_id, self.new_tokens = model, newline_id, []

    def __enter__(self):
        original = self.model.generate

        def counting(**kwargs):
            out = original(**kwargs)
            self.new_tokens.append(out.shape[1] - kwargs["input_ids"].shape[1])
            return out

        def newline_bias(module, args, kwargs, output):
            last = kwargs["input_ids"][:, -1:]  # (B, 1): the token just emitted
            output.logits[:, -1:, self.newline_id] += 50.0 * (last % 3 == 0)
            return output

        self.model.generate = counting
        self.hook = self.model.register_forward_hook(newline_bias, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        del self.model.generate
        self.hook.remove()


def test_rows_stop_generating_at_their_stop_string_and_outputs_do_not_change(tiny_lm, tokenizer):
    """Stop strings used to be applied after generating max_new_tokens for every row; now a row
    stops as soon as its cut cannot change, and what callers get is exactly what they got before."""
    from hybridpeft.tasks.lm import first_line_complete
    from hybridpeft.tasks.translation import clean_translation

    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1
    prompts = ["Hello", "Translate this long English sentence into Spanish please:", "2 + 2 =", "Once upon a time"]
    with _GenerationSpy(tiny_lm, newline[0]) as spy:
        full = generate(tiny_lm, tokenizer, prompts, max_new_tokens=24, batch_size=4, progress=False)
        assert spy.new_tokens == [24] and sum("\n" in t for t in full) >= 3  # the bias makes lines
        stopped = generate(tiny_lm, tokenizer, prompts, max_new_tokens=24, batch_size=4, stop=("\n",), progress=False)
        assert stopped == [truncate_at(t, ("\n",)) for t in full]
        lined = generate(tiny_lm, tokenizer, prompts, max_new_tokens=24, batch_size=4, until=first_line_complete,
                         progress=False)
        assert [clean_translation(t, "Spanish") for t in lined] == [clean_translation(t, "Spanish") for t in full]
        assert spy.new_tokens[1] < 24 or not all("\n" in t for t in full)
        spy.new_tokens.clear()
        one_by_one = [generate(tiny_lm, tokenizer, [p], max_new_tokens=24, batch_size=1, stop=("\n",), progress=False)[0]
                      for p in prompts]
        assert one_by_one == stopped
        for text, n_new in zip(full, spy.new_tokens):  # a row that meets its stop string ends there
            assert n_new < 24 if "\n" in text else n_new == 24


def test_stop_is_final_waits_for_a_longer_stop_that_could_start_earlier():
    from hybridpeft.tasks.lm import first_line_complete, stop_is_final

    assert not stop_is_final("abc", ("\n",)) and stop_is_final("ab\nc", ("\n",))
    stops = ("XY", "bcdefg")  # "bcdefg" could still begin at index 1 when "XY" is first seen at 3
    assert not stop_is_final("abcXY", stops) and stop_is_final("abcXYzzzz", stops)
    assert truncate_at("abcdefgXY", stops) == "a"
    assert not first_line_complete("\n\n  Hola") and first_line_complete("\n Hola.\nEnglish")
    assert first_line_complete("Hola.\r") and not first_line_complete("")


def test_validation_loss_is_token_weighted_mean(tiny_lm, tokenizer):
    task = get_task("translate-en-es", use_chat_template=False)
    examples = [Example(prompt="English: Hi.\nSpanish:", target="Hola."),
                Example(prompt="English: The cat sleeps on the sofa all day.\nSpanish:", target="El gato duerme en el sofá todo el día."),
                Example(prompt="English: Yes.\nSpanish:", target="Sí.")]
    batch = task.encode(tokenizer, examples, max_length=256)
    with torch.no_grad():
        reference = tiny_lm(**batch).loss.item()  # HF: mean over every supervised token of the batch
    one_batch = validation_loss(tiny_lm, tokenizer, task, examples, batch_size=3)
    pooled = validation_loss(tiny_lm, tokenizer, task, examples, batch_size=1)
    assert one_batch == pytest.approx(reference, rel=1e-6)  # HF computes its loss in float32
    assert pooled == pytest.approx(one_batch, rel=1e-12)  # pooled over tokens, not per batch
    metrics = task.loss_metrics(tiny_lm, tokenizer, examples, batch_size=3)  # what evaluate() reports
    assert metrics["val_loss"] == one_batch and metrics["val_ppl"] == pytest.approx(math.exp(reference))


class _TwoRanks:
    """Stands in for a 2-process ``accelerate.Accelerator``: the ranks run one after the other in
    this process, and ``reduce`` adds the sums the other rank reduced (rank 1 must run first)."""

    sums: dict[int, torch.Tensor] = {}

    def __init__(self, rank: int) -> None:
        self.process_index, self.num_processes = rank, 2
        self.autocast_entered = 0

    def autocast(self):
        self.autocast_entered += 1
        return contextlib.nullcontext()

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "sum"
        self.sums[self.process_index] = tensor.clone()
        return tensor + self.sums.get(1 - self.process_index, torch.zeros_like(tensor))


def test_validation_loss_sharded_over_ranks_pools_the_same_tokens(tiny_lm, tokenizer):
    """Each rank scores every second example under the accelerator's autocast; the all-reduced
    sums give every rank the single-process loss."""
    task = get_task("translate-en-es", use_chat_template=False)
    examples = [Example(prompt=f"English: {text}\nSpanish:", target=target) for text, target in
                [("Hi.", "Hola."), ("The cat sleeps on the sofa all day.", "El gato duerme en el sofá todo el día."),
                 ("Yes.", "Sí."), ("Thank you very much.", "Muchas gracias."), ("Good night.", "Buenas noches.")]]
    whole = validation_loss(tiny_lm, tokenizer, task, examples, batch_size=2)
    _TwoRanks.sums = {}
    second = _TwoRanks(1)
    rank1_only = validation_loss(tiny_lm, tokenizer, task, examples, batch_size=2, accelerator=second)
    first = _TwoRanks(0)
    pooled = validation_loss(tiny_lm, tokenizer, task, examples, batch_size=2, accelerator=first)
    assert pooled == pytest.approx(whole, rel=1e-12)  # float64 sums, added in another order
    assert rank1_only != pytest.approx(whole, rel=1e-6)  # rank 1 alone saw other tokens
    assert first.autocast_entered == 2 and second.autocast_entered == 1  # batches of examples 0,2,4 and 1,3
    assert _TwoRanks.sums[1][1] + _TwoRanks.sums[0][1] == sum(
        int((task.encode(tokenizer, [ex], 256)["labels"][:, 1:] != -100).sum()) for ex in examples)


# --------------------------------------------------------------------------- every task end to end


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not present")
@pytest.mark.parametrize("name,split,kwargs,metric", [
    ("sst2", "dev", {}, "accuracy"),
    ("rte", "dev[50%:]", {}, "accuracy"),
    ("xnli", "dev", {}, "accuracy_en"),
    ("gsm8k", "test", {"max_new_tokens": 4}, "accuracy"),
    ("translate-en-zh", "test", {"max_new_tokens": 4}, "bleu"),
    ("translate-en-es", "test", {"max_new_tokens": 4}, "chrf"),
    ("humaneval", "dev", {"max_new_tokens": 4, "n_samples": 2, "ks": (1, 2, 10), "temperature": 1.0}, "pass@2"),
])
def test_causal_task_evaluates(tiny_lm, tokenizer, name, split, kwargs, metric):
    if name == "humaneval":
        from hybridpeft.tasks import sandbox

        iso = sandbox.isolation()
        if iso.kind == "none":  # the refusal itself is tested in test_tasks_sandbox.py
            pytest.skip(f"HumanEval refuses to run generated code without an OS sandbox here: {iso.reason}")
    task = get_task(name, progress=False, **kwargs)
    examples = task.load(split, data_dir=str(DATA) if name != "humaneval" else None, limit=2)
    result = task.evaluate(tiny_lm, tokenizer, examples, batch_size=2)
    assert metric in result and task.metric in result and result["n"] == 2
    assert math.isfinite(result["val_loss"]) and result["val_loss"] > 0
    assert len(task.last_outputs) == 2 * kwargs.get("n_samples", 1)
    if name == "humaneval":
        assert "pass@10" not in result  # k above n_samples is left out
    records = task.predictions(examples)  # what `hybridpeft eval` writes to predictions.jsonl
    assert len(records) == 2 * kwargs.get("n_samples", 1) and [r["index"] for r in records] == list(range(len(records)))
    assert all({"input", "output"} <= set(r) for r in records)
    score_key = {"sst2": "correct", "rte": "correct", "xnli": "correct", "gsm8k": "correct",
                 "translate-en-zh": "bleu", "translate-en-es": "chrf", "humaneval": "passed"}[name]
    assert all(score_key in r for r in records)
    if name.startswith("translate"):
        assert all(r["reference"] == ex.target and r["input"] == ex.meta["source"] for r, ex in zip(records, examples))
    if name in ("sst2", "rte", "xnli"):
        assert all(r["correct"] == (r["output"] == r["reference"]) and set(r["label_log_likelihoods"]) == set(task.spec.words)
                   for r in records)


class FixedHead(nn.Module):
    """A stand-in encoder classifier: the same logits for every input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **kwargs):
        return SimpleNamespace(logits=self.logits.expand(input_ids.shape[0], -1))


def test_sequence_classification_evaluate():
    from transformers import AutoTokenizer

    from hybridpeft.models import resolve

    tok = AutoTokenizer.from_pretrained(resolve("minilm-l6"))
    task = get_task("rte-cls", progress=False)
    examples = [Example("a premise", text_pair="a hypothesis", label=lab) for lab in (0, 1, 1, 0, 1)]
    batch = task.encode(tok, examples)
    assert "token_type_ids" in batch and batch["labels"].tolist() == [0, 1, 1, 0, 1]
    model = FixedHead([0.0, 1.0])
    result = task.evaluate(model, tok, examples, batch_size=2)
    assert result["accuracy"] == pytest.approx(0.6)
    records = task.predictions(examples)
    assert [r["output"] for r in records] == ["no"] * 5 and [r["correct"] for r in records] == [False, True, True, False, True]
    assert records[0]["logits"] == {"yes": 0.0, "no": 1.0} and records[0]["text_pair"] == "a hypothesis"
    expected = -(3 * math.log(1 / (1 + math.e ** -1)) + 2 * math.log(1 / (1 + math.e))) / 5
    assert result["val_loss"] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="num_labels=2"):
        task.evaluate(FixedHead([0.0, 1.0, 2.0]), tok, examples)
