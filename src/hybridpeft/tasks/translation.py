"""English → Chinese / Spanish translation on Tatoeba pairs; corpus BLEU and chrF (sacreBLEU).

Stands in for the paper's "MT-Bench (BLEU)" and FLORES directions. Chinese is
scored with sacreBLEU's ``zh`` tokenizer (characters, since Chinese has no
spaces); Spanish with the default ``13a``. chrF (character n-gram F-score) is
the second metric.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..checks import check
from .base import Example, register_task
from .common import CausalTask
from .data import load_hub_rows, locate, parse_split, read_delimited, require_columns, require_text
from .lm import first_line_complete, generate

PROMPT = "Translate this English sentence into {language}.\nEnglish: {text}\n{language}:"


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str], target: str) -> dict[str, float]:
    """Corpus BLEU (``tokenize="zh"`` when ``target == "zh"``, else ``13a``) and chrF, both 0–100.

    Raises:
        ImportError: ``sacrebleu`` is not installed.
        ValueError: the two lists differ in length.
    """
    try:
        import sacrebleu
    except ImportError:
        raise ImportError("translation metrics need sacrebleu (pip install 'hybridpeft[tasks]')") from None
    if len(hypotheses) != len(references):
        raise ValueError(f"got {len(hypotheses)} hypotheses for {len(references)} references")
    refs = [list(references)]
    bleu = sacrebleu.corpus_bleu(list(hypotheses), refs, tokenize="zh" if target == "zh" else "13a")
    chrf = sacrebleu.corpus_chrf(list(hypotheses), refs)
    return {"bleu": float(bleu.score), "chrf": float(chrf.score)}


def clean_translation(text: str, language: str) -> str:
    """The first non-empty line of a generation, without a leading ``"<Language>:"`` label."""
    line = next((x.strip() for x in text.splitlines() if x.strip()), "")
    if line.lower().startswith(language.lower() + ":"):
        line = line[len(language) + 1:].strip()
    return line


class TranslationTask(CausalTask):
    """Args:
        max_new_tokens: generation budget per sentence.
        plus ``CausalTask``/``DataTask`` options.

    Local files ``tatoeba/eng-<xxx>.{dev,test}.tsv`` (header ``src\\ttgt``, no
    quoting); hub ``Helsinki-NLP/tatoeba_mt`` (config ``eng-<xxx>``). There is no
    local training split: train on ``dev`` and evaluate on ``test`` (disjoint).
    """

    metric = "bleu"
    pair: str = ""          # e.g. "eng-spa"
    target: str = ""        # sacreBLEU language code of the target
    language: str = ""      # the target language's English name, for the prompt
    train_split = "dev"
    eval_split = "test"

    def __init__(self, max_new_tokens: int = 128, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check(isinstance(max_new_tokens, int) and max_new_tokens > 0, "max_new_tokens", max_new_tokens, "a positive integer")
        self.max_new_tokens = max_new_tokens

    def read(self, split: str, data_dir: str | None = None) -> list[Example]:
        parsed = parse_split(split)
        source = locate(data_dir, "tatoeba", f"{self.pair}.{parsed.base}.tsv")
        if source.is_hub:
            origin = f"hub:Helsinki-NLP/tatoeba_mt/{self.pair}[{parsed.hub_name()}]"
            rows = [(i, {"src": r.get("sourceString"), "tgt": r.get("targetString")})
                    for i, r in enumerate(load_hub_rows("Helsinki-NLP/tatoeba_mt", self.pair, parsed), start=1)]
        else:
            origin = source.path
            rows = read_delimited(source.path)
            require_columns(source.path, rows, ["src", "tgt"])
        examples = [
            Example(prompt=PROMPT.format(language=self.language, text=require_text(row["src"], origin, line, "src")),
                    target=require_text(row["tgt"], origin, line, "tgt"), meta={"source": row["src"], "line": line})
            for line, row in rows
        ]
        return examples if source.is_hub else parsed.apply(examples)

    def evaluate(self, model: torch.nn.Module, tokenizer: Any, examples: list[Example], batch_size: int = 8) -> dict[str, float]:
        """Greedy translations (first line) scored against the references."""
        prompts = [self.render_prompt(tokenizer, ex) for ex in examples]
        texts = generate(model, tokenizer, prompts, max_new_tokens=self.max_new_tokens, batch_size=batch_size,
                         stop=() if self.chat(tokenizer) else ("\n",), until=first_line_complete,
                         progress=self.progress, desc=self.name)
        hyps = [clean_translation(t, self.language) for t in texts]
        self.last_outputs, self.last_generations = hyps, texts
        out = {**corpus_scores(hyps, [ex.target for ex in examples], self.target), "n": float(len(examples))}
        return {**out, **self.loss_metrics(model, tokenizer, examples, batch_size)}


    def predictions(self, examples: list[Example]) -> list[dict[str, Any]]:
        """Per sentence: source, translation (first line of the generation), reference, the raw
        generation, and sentence-level BLEU and chrF (same tokenizer as the corpus score)."""
        hyps, texts = list(self.last_outputs), list(getattr(self, "last_generations", []))
        if len(hyps) != len(examples) or len(texts) != len(examples):
            return []
        import sacrebleu

        tokenize = "zh" if self.target == "zh" else "13a"
        return [{"index": i, "input": ex.meta.get("source", ex.prompt), "output": hyp, "reference": ex.target,
                 "generation": text, "bleu": float(sacrebleu.sentence_bleu(hyp, [ex.target], tokenize=tokenize).score),
                 "chrf": float(sacrebleu.sentence_chrf(hyp, [ex.target]).score)}
                for i, (ex, hyp, text) in enumerate(zip(examples, hyps, texts))]


@register_task
class TranslateEnZh(TranslationTask):
    name, pair, target, language = "translate-en-zh", "eng-zho", "zh", "Chinese"


@register_task
class TranslateEnEs(TranslationTask):
    name, pair, target, language = "translate-en-es", "eng-spa", "es", "Spanish"
