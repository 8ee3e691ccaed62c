"""Model-side helpers shared by every task: prompts, validation loss, label scoring, generation.

All of them run under ``torch.inference_mode`` with the model in eval mode (its
previous mode is restored), move inputs to the model's device, and tokenize with
``add_special_tokens=False`` exactly as ``encode_causal`` does, so what is scored
at evaluation is what was trained.
"""
from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import distributed
from .base import IGNORE_INDEX, Example

if TYPE_CHECKING:
    from .base import Task


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    if size <= 0:
        raise ValueError(f"batch_size={size!r} is invalid: expected a positive integer")
    for i in range(0, len(items), size):
        yield items[i: i + size]


@contextlib.contextmanager
def evaluating(model: torch.nn.Module, inference: bool = True) -> Iterator[None]:
    """Eval mode and no autograd for the duration (``inference_mode``, or ``no_grad`` with
    ``inference=False``); the training flag is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode() if inference else torch.no_grad():
            yield
    finally:
        model.train(was_training)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) and hasattr(tokenizer, "apply_chat_template")


def chat_prompt(tokenizer: Any, content: str) -> str:
    """``content`` as one user turn, ending where the assistant's reply begins."""
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)


def bos_text(tokenizer: Any) -> str:
    """The BOS token's text if the tokenizer would add it by itself, else ``""``.

    We tokenize with ``add_special_tokens=False`` (so prompt and target split
    cleanly); a model trained with a leading BOS gets it back through the text.
    """
    bos = getattr(tokenizer, "bos_token", None)
    if not bos:
        return ""
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == tokenizer.bos_token_id else ""


def pad_id(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are upcast for the softmax; float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def validation_loss(
    model: torch.nn.Module, tokenizer: Any, task: "Task", examples: Sequence[Example],
    batch_size: int = 8, max_length: int = 512, *, progress: bool = False, accelerator: Any | None = None,
) -> float:
    """Mean loss over every supervised token (causal) or example (classification).

    ``L = Σ_tokens −log p(y_t | y_<t, prompt) / #tokens`` over the batches of
    ``task.encode`` (prompt tokens and padding carry IGNORE_INDEX), pooled over the
    whole set rather than averaged per batch; NaN if that is not finite.

    With an ``accelerate.Accelerator`` of ``world`` processes (the training loop's),
    rank ``k`` scores examples ``k, k + world, …`` under the accelerator's autocast
    and the two sums are all-reduced, so every rank returns the same value. Runs
    under ``no_grad`` rather than inference mode: it is called between training
    steps, and inference tensors must not reach a sharded model's parameters. A sharded
    (FSDP) model gathers its weights in every forward, so there each rank runs as many
    forwards as the busiest one (the extra ones on a throwaway batch).
    """
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
    device = model_device(model)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (Σ loss, Σ count)
    mine = list(chunks(examples[rank::world], batch_size))
    with evaluating(model, inference=False):
        for chunk in tqdm(mine, desc=f"{task.name} loss", disable=not progress):
            batch = to_device(task.encode(tokenizer, list(chunk), max_length), device)
            labels = batch.pop("labels")
            with autocast():
                logits = at_least_float32(model(**batch).logits)
            if task.kind == "classification":
                loss = F.cross_entropy(logits, labels, reduction="sum")  # logits: (B, C)
                count = labels.numel()
            else:
                shifted = labels[:, 1:]  # (B, T-1): token t is predicted at position t-1
                loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), shifted, ignore_index=IGNORE_INDEX, reduction="sum")
                count = int((shifted != IGNORE_INDEX).sum())
            total += torch.stack([loss.double(), torch.tensor(float(count), dtype=torch.float64, device=device)])
        if distributed.any_sharded(model.parameters()) and examples:
            # A sharded model all-gathers in every forward: each rank must run as many as the busiest one.
            busiest = math.ceil(math.ceil(len(examples) / world) / batch_size)
            for _ in range(busiest - len(mine)):
                batch = to_device(task.encode(tokenizer, list(examples[:1]), max_length), device)
                batch.pop("labels")
                with autocast():
                    model(**batch)
    if world > 1:
        total = accelerator.reduce(total, "sum")
    value = (total[0] / total[1].clamp_min(1)).item()
    return value if math.isfinite(value) else float("nan")


def _right_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def label_log_likelihoods(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str],
    batch_size: int = 8, max_length: int = 512, progress: bool = False, desc: str = "score",
) -> torch.Tensor:
    """``S[i, j] = Σ_t log p(target_j token t | prompt_i, earlier target tokens)``.

    Every (prompt, target) pair is one right-padded row (right padding keeps the
    positions of real tokens as in training); ``batch_size`` prompts go per
    forward pass, i.e. ``batch_size · len(targets)`` rows. Prompts too long for
    ``max_length`` lose tokens on the left. When every target is a single token
    (the usual label words) one row per prompt is enough. Returns (N, L) float64
    on the CPU.
    """
    target_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in targets]
    if any(len(t) == 0 for t in target_ids):
        raise ValueError(f"targets={list(targets)!r} is invalid: every target must have at least one token")
    device, pad = model_device(model), pad_id(tokenizer)
    if all(len(t) == 1 for t in target_ids):
        return _single_token_scores(model, tokenizer, prompts, [t[0] for t in target_ids], batch_size, max_length, progress, desc)
    scores = torch.empty((len(prompts), len(targets)), dtype=torch.float64)
    with evaluating(model):
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
            rows, spans = [], []  # spans: (first target position, target ids) per row
            for prompt in prompts[start: start + batch_size]:
                p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
                for t in target_ids:
                    keep = max(max_length - len(t), 1)
                    row = p[-keep:] + t
                    rows.append(row)
                    spans.append((len(row) - len(t), t))
            ids, mask = _right_pad(rows, pad)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (R, T, V)
            row_idx = torch.tensor([r for r, (s, t) in enumerate(spans) for _ in t], device=device)
            pos_idx = torch.tensor([s + k - 1 for s, t in spans for k in range(len(t))], device=device)  # predicting position
            tok_idx = torch.tensor([tok for _, t in spans for tok in t], device=device)
            logp = torch.log_softmax(at_least_float32(logits[row_idx, pos_idx]), dim=-1)  # (n_target_tokens, V)
            per_token = logp.gather(1, tok_idx[:, None]).squeeze(1).double().cpu()
            per_row = torch.zeros(len(rows), dtype=torch.float64).index_add_(0, row_idx.cpu(), per_token)
            scores[start: start + len(rows) // len(targets)] = per_row.view(-1, len(targets))
    return scores


def _single_token_scores(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], tokens: list[int],
    batch_size: int, max_length: int, progress: bool, desc: str,
) -> torch.Tensor:
    """When every target is one token, one row per prompt suffices: the scores are
    the next-token log-probabilities after the prompt (the same numbers the
    general path computes, at ``1 / len(targets)`` of the cost)."""
    device, pad = model_device(model), pad_id(tokenizer)
    token_idx = torch.tensor(tokens, device=device)
    scores = torch.empty((len(prompts), len(tokens)), dtype=torch.float64)
    with evaluating(model):
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
            rows = [tokenizer(p, add_special_tokens=False)["input_ids"][-(max_length - 1):] for p in prompts[start: start + batch_size]]
            ids, mask = _right_pad(rows, pad)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
            last = torch.tensor([len(r) - 1 for r in rows], device=device)
            logp = torch.log_softmax(at_least_float32(logits[torch.arange(len(rows), device=device), last]), dim=-1)  # (B, V)
            scores[start: start + len(rows)] = logp[:, token_idx].double().cpu()
    return scores


def truncate_at(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


def stop_is_final(text: str, stops: Sequence[str]) -> bool:
    """True once no further text can change ``truncate_at(text, stops)``.

    That holds when a stop string occurs at some index ``c`` and the text reaches
    ``c + max_len − 1``: any stop string starting before ``c`` would then already be
    complete (and would have been found instead)."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return bool(found) and len(text) >= min(found) + max(len(s) for s in stops) - 1


def first_line_complete(text: str) -> bool:
    """True once the first non-blank line of ``text`` has ended (a line break follows it): nothing
    generated later changes that line, which is all a translation keeps."""
    for line in text.splitlines(keepends=True):
        if line.strip():
            return len(line.splitlines()[0]) < len(line)
    return False


class _FinishedRows:
    """A ``transformers`` stopping criterion: row ``i`` is finished once its decoded continuation
    satisfies ``stop_is_final`` or ``until``, so each row of a batch stops on its own (generation
    ends when every row has) instead of running to ``max_new_tokens`` without an EOS."""

    def __init__(self, tokenizer: Any, width: int, stop: Sequence[str], until: Callable[[str], bool] | None) -> None:
        self.tokenizer, self.width, self.stop, self.until = tokenizer, width, [s for s in stop if s], until

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.width:], skip_special_tokens=True)
        done = [(bool(self.stop) and stop_is_final(t, self.stop)) or (self.until is not None and self.until(t)) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def generate(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 256, batch_size: int = 8,
    do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, stop: Sequence[str] = (),
    until: Callable[[str], bool] | None = None, seed: int | None = None, progress: bool = True, desc: str = "generate",
) -> list[str]:
    """Continuations of ``prompts`` (already rendered), decoded without special tokens.

    Batched with left padding (so every row's next token sits in the last
    column); prompts are grouped by length to waste little padding and the
    outputs are returned in the input order. Greedy unless ``do_sample``.
    Outputs are cut at the first ``stop`` string. Each row stops generating at
    EOS, once its ``stop`` cut can no longer change (``stop_is_final``), or once
    ``until(text so far)`` is true — ``until`` must only say so when what the
    caller keeps of the text is settled (e.g. ``first_line_complete`` for a
    translation read from its first line). ``seed`` seeds torch's global
    generator before sampling.
    """
    if seed is not None:
        torch.manual_seed(seed)
    device, pad = model_device(model), pad_id(tokenizer)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    eos = {tokenizer.eos_token_id} | set(_as_list(getattr(getattr(model, "generation_config", None), "eos_token_id", None)))
    eos.discard(None)
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "pad_token_id": pad}
    if eos:
        options["eos_token_id"] = sorted(eos)
    if do_sample:
        options.update(temperature=temperature, top_p=top_p)
    else:  # a model's generation_config may carry sampling defaults; greedy must not see them
        options.update(temperature=None, top_p=None, top_k=None)
    with evaluating(model):
        for idx in tqdm(list(chunks(order, batch_size)), desc=desc, disable=not progress):
            rows = [encoded[i] for i in idx]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, width - len(row):] = torch.tensor(row, dtype=torch.long)
                mask[r, width - len(row):] = 1
            finished = [_FinishedRows(tokenizer, width, stop, until)] if (any(stop) or until is not None) else []
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),  # (B, width + new)
                                 stopping_criteria=_criteria(finished), **options)
            texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            for i, text in zip(idx, texts):
                outputs[i] = truncate_at(text, stop)
    return outputs


def _criteria(items: list[Any]) -> Any:
    from transformers import StoppingCriteriaList

    return StoppingCriteriaList(items)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple, set)) else [value]
