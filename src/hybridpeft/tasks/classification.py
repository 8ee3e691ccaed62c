"""Sentence(-pair) classification: SST-2, RTE, MNLI, QNLI, QQP (GLUE) and XNLI.

Each dataset is offered twice:

* ``<name>`` (kind ``causal``): a verbalizer task for decoder LMs. The prompt
  asks the question, the target is the label word; evaluation scores every label
  word by its log-likelihood given the prompt and predicts the best,
  ``ŷ = argmax_j Σ_t log p(word_j,t | prompt, word_j,<t)``.
* ``<name>-cls`` (kind ``classification``): raw text (and pair) for an encoder
  with a ``num_labels`` head; prediction is ``argmax`` of the logits.

Metric: accuracy; with several languages (XNLI) ``accuracy`` is the macro
average of the per-language accuracies, also reported as ``accuracy_<lang>``.
"""
from __future__ import annotations

import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checks import check
from .base import Example, encode_classification, register_task
from .common import CausalTask, DataTask
from .data import (
    HUB, DataFormatError, Split, default_data_dir, load_hub_rows, locate, parse_label, parse_split, read_delimited,
    require_columns, require_text,
)
from .lm import at_least_float32, chunks, evaluating, label_log_likelihoods, model_device, to_device


@dataclass(frozen=True)
class PairSpec:
    """How one classification dataset is stored and asked.

    Args:
        folder: the task's folder under the data directory.
        files: local file name per split name (``"dev"`` etc.).
        columns: (text, pair or None, label) column names in the local header.
        label_map: raw local label value -> class index.
        words: the verbalizer word of each class, in class order.
        template: the prompt, formatted with ``text`` and ``pair``.
        quoted: the local file uses CSV quoting (else none; quotes are literal).
        hub: (dataset path, config) for ``datasets.load_dataset``.
        hub_columns: (text, pair or None, label) names in the hub rows.
        hub_splits: split name -> hub split name where they differ.
    """

    folder: str
    files: dict[str, str]
    columns: tuple[str, str | None, str]
    label_map: dict[str, int]
    words: tuple[str, ...]
    template: str
    quoted: bool
    hub: tuple[str, str | None]
    hub_columns: tuple[str, str | None, str]
    hub_splits: dict[str, str] = field(default_factory=dict)
    delimiter: str = "\t"
    header: tuple[str, ...] | None = None  # column names for a headerless file

    @property
    def num_labels(self) -> int:
        return len(self.words)


_NLI3 = {"entailment": 0, "neutral": 1, "contradiction": 2, "0": 0, "1": 1, "2": 2}
_NLI2 = {"entailment": 0, "not_entailment": 1, "0": 0, "1": 1}
_NLI_PROMPT = "Premise: {text}\nHypothesis: {pair}\nDoes the premise entail the hypothesis? Answer yes, maybe or no.\nAnswer:"

SST2 = PairSpec(
    folder="sst2", files={"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"},
    columns=("sentence", None, "label"), label_map={"0": 0, "1": 1}, words=("negative", "positive"),
    template="Review: {text}\nIs the sentiment of this review positive or negative?\nAnswer:", quoted=False,
    hub=("glue", "sst2"), hub_columns=("sentence", None, "label"),
)
RTE = PairSpec(
    folder="rte", files={"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"},
    columns=("sentence1", "sentence2", "label"), label_map=_NLI2, words=("yes", "no"),
    template='{text}\nQuestion: Does this imply that "{pair}"? Yes or no?\nAnswer:', quoted=True,
    hub=("glue", "rte"), hub_columns=("sentence1", "sentence2", "label"),
)
MNLI = PairSpec(
    folder="mnli",
    files={"train": "train.tsv", "dev": "dev_matched.tsv", "dev_mismatched": "dev_mismatched.tsv"},
    columns=("sentence1", "sentence2", "gold_label"), label_map=_NLI3, words=("yes", "maybe", "no"),
    template=_NLI_PROMPT, quoted=False, hub=("glue", "mnli"), hub_columns=("premise", "hypothesis", "label"),
    hub_splits={"dev": "validation_matched", "dev_mismatched": "validation_mismatched"},
)
QNLI = PairSpec(
    folder="qnli", files={"train": "train.tsv", "dev": "dev.tsv"},
    columns=("question", "sentence", "label"), label_map=_NLI2, words=("yes", "no"),
    template="Question: {text}\nSentence: {pair}\nDoes the sentence answer the question? Yes or no?\nAnswer:", quoted=False,
    hub=("glue", "qnli"), hub_columns=("question", "sentence", "label"),
)
QQP = PairSpec(
    folder="qqp", files={"train": "train.tsv", "dev": "dev.tsv"},
    columns=("question1", "question2", "is_duplicate"), label_map={"0": 0, "1": 1}, words=("no", "yes"),
    template="Question 1: {text}\nQuestion 2: {pair}\nDo these two questions ask the same thing? Yes or no?\nAnswer:", quoted=False,
    hub=("glue", "qqp"), hub_columns=("question1", "question2", "label"),
)
XNLI = PairSpec(
    folder="xnli", files={"train": "train-{lang}.csv", "dev": "dev-{lang}.csv", "test": "test-{lang}.csv"},
    columns=("premise", "hypothesis", "label"), label_map=_NLI3, words=("yes", "maybe", "no"),
    template=_NLI_PROMPT, quoted=True, hub=("xnli", None), hub_columns=("premise", "hypothesis", "label"),
    delimiter=",", header=("premise", "hypothesis", "label"),
)
XNLI_LANGUAGES = ("ar", "bg", "de", "el", "en", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh")


def _local_file(spec: PairSpec, split: Split, lang: str | None) -> str:
    if split.base not in spec.files:
        raise ValueError(f"split={split.base!r} is invalid for {spec.folder}: expected one of {sorted(spec.files)}")
    return spec.files[split.base].format(lang=lang)


def read_pairs(spec: PairSpec, split: Split, data_dir: Any, lang: str | None = None) -> list[Example]:
    """All examples of one split (slice applied) as raw text, ``label`` set, ``meta['language']`` for XNLI.

    Raises:
        DataFormatError: a missing file or malformed row (file and line named).
    """
    source = locate(data_dir, spec.folder, _local_file(spec, split, lang))
    meta = {"language": lang} if lang is not None else {}
    text_col, pair_col, label_col = spec.columns
    out = []
    if source.is_hub:
        text_col, pair_col, label_col = spec.hub_columns
        name = lang if spec.hub[1] is None else spec.hub[1]
        hub_split = split.hub_name(spec.hub_splits)
        origin = f"hub:{spec.hub[0]}/{name}[{hub_split}]"
        labels = {str(i): i for i in range(spec.num_labels)}
        for i, row in enumerate(load_hub_rows(spec.hub[0], name, split, spec.hub_splits), start=1):
            out.append(Example(
                prompt=require_text(row.get(text_col), origin, i, text_col),
                text_pair=require_text(row.get(pair_col), origin, i, pair_col) if pair_col else None,
                label=parse_label(str(row.get(label_col)), labels, origin, i, label_col),
                meta=dict(meta),
            ))
        return out  # the hub applied the slice
    path = source.path
    rows = read_delimited(path, spec.header, spec.delimiter, spec.quoted)
    require_columns(path, rows, [c for c in spec.columns if c])
    for line, row in rows:
        out.append(Example(
            prompt=require_text(row[text_col], path, line, text_col),
            text_pair=require_text(row[pair_col], path, line, pair_col) if pair_col else None,
            label=parse_label(row[label_col], spec.label_map, path, line, label_col),
            meta={**meta, "line": line},
        ))
    return split.apply(out)


def accuracy_metrics(examples: Sequence[Example], predictions: Sequence[int]) -> dict[str, float]:
    """``accuracy`` (macro over languages when there are several), per-language and micro accuracy,
    ``majority_class_accuracy``: what always predicting the most frequent gold label would
    score (micro), the floor a trained classifier has to clear to show it learned anything, and
    ``top_prediction_share``: the share of examples given the most frequent *predicted* class
    (1.0 when the model predicts one class for everything)."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for ex, pred in zip(examples, predictions):
        hits[str(ex.meta.get("language", ""))].append(int(pred) == ex.label)
    per_lang = {lang: sum(h) / len(h) for lang, h in hits.items()}
    micro = sum(sum(h) for h in hits.values()) / max(len(examples), 1)
    out = {"accuracy": sum(per_lang.values()) / len(per_lang) if per_lang else 0.0, "accuracy_micro": micro, "n": float(len(examples))}
    if examples:
        out["majority_class_accuracy"] = max(Counter(ex.label for ex in examples).values()) / len(examples)
        # 1.0 = the model answered with one class for every example (a collapse), 1/C = evenly spread
        out["top_prediction_share"] = max(Counter(int(p) for p in predictions).values()) / len(examples)
    if len(per_lang) > 1 or "" not in per_lang:
        out.update({f"accuracy_{lang}": acc for lang, acc in sorted(per_lang.items())})
    return out


class PairLoader:
    """Loading shared by the verbalizer and encoder variants of a dataset."""

    spec: PairSpec

    def languages_for(self, split: Split, data_dir: Any) -> list[str | None]:
        return [None]

    def read(self, split: str, data_dir: str | None = None) -> list[Example]:
        parsed = parse_split(split)
        examples = [ex for lang in self.languages_for(parsed, data_dir) for ex in self.read_language(parsed, data_dir, lang)]
        for ex in examples:
            self.decorate(ex)
        return examples

    def read_language(self, split: Split, data_dir: Any, lang: str | None) -> list[Example]:
        """One language's examples (all of them for single-language datasets)."""
        return read_pairs(self.spec, split, data_dir, lang)

    def decorate(self, ex: Example) -> None:
        """Hook: turn a raw example into this variant's form."""


class VerbalizerTask(PairLoader, CausalTask):
    """Prompt → label word; see the module docstring. ``Example.prompt`` is the
    filled template, ``target`` the gold word, the raw text is kept in ``meta``."""

    metric = "accuracy"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_labels = self.spec.num_labels

    def decorate(self, ex: Example) -> None:
        ex.meta.update(text=ex.prompt, text_pair=ex.text_pair)
        ex.prompt = self.spec.template.format(text=ex.prompt, pair=ex.text_pair)
        ex.text_pair = None
        ex.target = self.spec.words[ex.label]

    def predict(self, model: torch.nn.Module, tokenizer: Any, examples: Sequence[Example], batch_size: int = 8) -> torch.Tensor:
        """(N, C) label-word log-likelihoods."""
        if not examples:
            return torch.empty((0, self.num_labels), dtype=torch.float64)
        prompts = [self.render_prompt(tokenizer, ex) for ex in examples]
        words = [self.render_target(tokenizer, examples[0], w) for w in self.spec.words]
        return label_log_likelihoods(model, tokenizer, prompts, words, batch_size, self.max_length, self.progress, desc=self.name)

    def evaluate(self, model: torch.nn.Module, tokenizer: Any, examples: list[Example], batch_size: int = 8) -> dict[str, float]:
        scores = self.predict(model, tokenizer, examples, batch_size)
        preds = scores.argmax(dim=1).tolist()
        self.last_outputs, self.last_scores = preds, scores.tolist()
        return {**accuracy_metrics(examples, preds), **self.loss_metrics(model, tokenizer, examples, batch_size)}

    def predictions(self, examples: list[Example]) -> list[dict[str, Any]]:
        """Per example: the prompt, the predicted and gold label words, and every word's log-likelihood."""
        return pair_predictions(self, examples, "label_log_likelihoods")


def pair_predictions(task: Any, examples: Sequence[Example], score_name: str) -> list[dict[str, Any]]:
    """Prediction records of a classification task (verbalizer or head) from its latest evaluate."""
    preds, scores = list(getattr(task, "last_outputs", [])), list(getattr(task, "last_scores", []))
    if len(preds) != len(examples) or len(scores) != len(examples):
        return []
    words = task.spec.words
    out = []
    for i, (ex, pred, row) in enumerate(zip(examples, preds, scores)):
        record: dict[str, Any] = {"index": i, "input": ex.prompt}
        if ex.meta.get("text") is not None or ex.text_pair is not None:
            record["text"], record["text_pair"] = ex.meta.get("text", ex.prompt), ex.meta.get("text_pair", ex.text_pair)
        if ex.meta.get("language"):
            record["language"] = ex.meta["language"]
        record.update(output=words[pred], reference=words[ex.label], correct=int(pred) == ex.label,
                      **{score_name: dict(zip(words, row))})
        out.append(record)
    return out


class SequenceClassificationTask(PairLoader, DataTask):
    """Raw text (and pair) → class index through an encoder's classification head."""

    kind = "classification"
    metric = "accuracy"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_labels = self.spec.num_labels

    def evaluate(self, model: torch.nn.Module, tokenizer: Any, examples: list[Example], batch_size: int = 8) -> dict[str, float]:
        """Accuracy of ``argmax`` logits; ``val_loss`` is the mean cross-entropy of the same pass."""
        device = model_device(model)
        preds: list[int] = []
        all_logits: list[list[float]] = []
        loss_sum = 0.0
        with evaluating(model):
            for chunk in tqdm(list(chunks(examples, batch_size)), desc=self.name, disable=not self.progress):
                batch = to_device(encode_classification(tokenizer, list(chunk), self.max_length), device)
                labels = batch.pop("labels")
                logits = at_least_float32(model(**batch).logits)  # (B, C)
                if logits.shape[-1] != self.num_labels:
                    raise ValueError(f"the model has {logits.shape[-1]} output labels; task {self.name!r} needs num_labels={self.num_labels}")
                loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
                preds.extend(logits.argmax(dim=-1).tolist())
                all_logits.extend(logits.tolist())
        self.last_outputs, self.last_scores = preds, all_logits
        out = accuracy_metrics(examples, preds)
        if self.report_loss and examples:
            out["val_loss"] = loss_sum / len(examples)
        return out

    def predictions(self, examples: list[Example]) -> list[dict[str, Any]]:
        """Per example: the text (and pair), the predicted and gold labels, and the head's logits."""
        return pair_predictions(self, examples, "logits")


class XnliLoader(PairLoader):
    """XNLI per language.

    Args:
        languages: a language code, a list, or a comma-separated string
            (``"en,fr"``). ``None``: locally every ``<split>-<lang>.csv`` present,
            on the hub all 15 XNLI languages.
        missing_languages: ``"error"`` (default): a listed language without data
            is an error. ``"skip"``: a language whose local file is missing is
            read from the hub, and one the hub cannot give either (no network, no
            ``datasets``) is left out with a warning and recorded in
            ``skipped_languages`` (language -> reason); its accuracy is then
            absent from ``evaluate``'s result. At least one language must remain.
    """

    spec = XNLI
    k_shot_per = "language"
    train_split = "dev[:50%]"
    eval_split = "dev[50%:]"

    def __init__(self, languages: str | Sequence[str] | None = None, missing_languages: str = "error", **kwargs: Any) -> None:
        if isinstance(languages, str):
            languages = [x.strip() for x in languages.split(",") if x.strip()]
        if languages is not None:
            bad = [x for x in languages if x not in XNLI_LANGUAGES]
            check(bool(languages) and not bad, "languages", languages, f"codes among {list(XNLI_LANGUAGES)}")
        check(missing_languages in ("error", "skip"), "missing_languages", missing_languages, "'error' or 'skip'")
        self.languages = list(languages) if languages is not None else None
        self.missing_languages = missing_languages
        self.skipped_languages: dict[str, str] = {}
        super().__init__(**kwargs)

    def read(self, split: str, data_dir: str | None = None) -> list[Example]:
        examples = super().read(split, data_dir)
        if not examples and self.skipped_languages:
            reasons = "; ".join(f"{lang}: {why}" for lang, why in self.skipped_languages.items())
            raise DataFormatError(f"no XNLI language of {self.languages} has data for split {split!r} ({reasons})")
        return examples

    def read_language(self, split: Split, data_dir: Any, lang: str | None) -> list[Example]:
        if self.missing_languages == "error" or (data_dir is not None and str(data_dir) == HUB):
            return read_pairs(self.spec, split, data_dir, lang)
        try:
            return read_pairs(self.spec, split, data_dir, lang)
        except DataFormatError as local:
            try:
                return read_pairs(self.spec, split, HUB, lang)
            except Exception as hub:  # noqa: BLE001 - whatever keeps the hub away (no package, no network), skip is asked for
                reason = f"{local}; the hub gave {type(hub).__name__}: {str(hub).splitlines()[0] if str(hub) else ''}"
                if lang not in self.skipped_languages:
                    warnings.warn(f"XNLI language {lang!r} has no data and is left out (missing_languages='skip'): {reason}",
                                  stacklevel=2)
                self.skipped_languages[str(lang)] = reason
                return []

    def languages_for(self, split: Split, data_dir: Any) -> list[str | None]:
        if self.languages is not None:
            return list(self.languages)
        if data_dir is not None and str(data_dir) == HUB:
            return list(XNLI_LANGUAGES)
        root = Path(data_dir) if data_dir is not None else default_data_dir()
        folder = root / XNLI.folder if root is not None else None
        if folder is None or not folder.is_dir():
            if data_dir is None:
                return list(XNLI_LANGUAGES)
            raise DataFormatError(f"missing data folder {folder}; expected files like {_local_file(XNLI, split, 'en')}")
        head, tail = _local_file(XNLI, split, "*").split("*")  # e.g. "dev-", ".csv"
        found = sorted(p.name[len(head): len(p.name) - len(tail)] for p in folder.glob(f"{head}*{tail}"))
        langs = [x for x in found if x in XNLI_LANGUAGES]
        if not langs:
            raise DataFormatError(f"no XNLI files for split {split.base!r} in {folder}; expected {_local_file(XNLI, split, '<lang>')} "
                                  f"with <lang> among {list(XNLI_LANGUAGES)}")
        return langs


# --------------------------------------------------------------------------- registered tasks


@register_task
class Sst2(VerbalizerTask):
    name, spec, eval_split = "sst2", SST2, "dev"


@register_task
class Sst2Cls(SequenceClassificationTask):
    name, spec, eval_split = "sst2-cls", SST2, "dev"


@register_task
class Rte(VerbalizerTask):
    name, spec, train_split, eval_split = "rte", RTE, "dev[:50%]", "dev[50%:]"


@register_task
class RteCls(SequenceClassificationTask):
    name, spec, train_split, eval_split = "rte-cls", RTE, "dev[:50%]", "dev[50%:]"


@register_task
class Mnli(VerbalizerTask):
    name, spec, eval_split = "mnli", MNLI, "dev"


@register_task
class MnliCls(SequenceClassificationTask):
    name, spec, eval_split = "mnli-cls", MNLI, "dev"


@register_task
class Qnli(VerbalizerTask):
    name, spec, eval_split = "qnli", QNLI, "dev"


@register_task
class QnliCls(SequenceClassificationTask):
    name, spec, eval_split = "qnli-cls", QNLI, "dev"


@register_task
class Qqp(VerbalizerTask):
    name, spec, eval_split = "qqp", QQP, "dev"


@register_task
class QqpCls(SequenceClassificationTask):
    name, spec, eval_split = "qqp-cls", QQP, "dev"


@register_task
class Xnli(XnliLoader, VerbalizerTask):
    name = "xnli"


@register_task
class XnliCls(XnliLoader, SequenceClassificationTask):
    name = "xnli-cls"
