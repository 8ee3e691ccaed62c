"""Where in the encoder a trained MiniLM classifier's predictions stop depending on the input.

For each run directory given (a benchmark run's ``train/`` dir with its saved ``adapter/``), the
script scores the same XNLI-en examples with the untouched base model and with the adapter, and
prints, per stage of ``BertForSequenceClassification``:

- ``cls``: the last layer's [CLS] hidden state h (384-d): its mean norm, and the spread of h across
  examples (mean over dimensions of the across-example s.d.);
- ``pooler``: z = W_p h + b_p before tanh: the share of units with |z| > 3 (tanh saturated, where
  its slope is below 0.01) and the across-example spread of tanh(z);
- ``logits``: the across-example s.d. of each class's logit, and the share of the most frequent
  predicted class (1.0 = one answer for every example).

A prediction that no longer depends on the input shows up as a spread near 0 at some stage; the
first stage where it does is where the collapse happens.

    python benchmarks/xnli_collapse_probe.py runs/bench/xnli-collapse/runs/*/train --limit 128
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch


def probe(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Spread and saturation statistics at the [CLS] state, the pooler and the logits."""
    with torch.inference_mode():
        out = model.bert(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
        h = out.hidden_states[-1][:, 0]  # (N, d): the last layer's [CLS] state
        z = model.bert.pooler.dense(h)  # (N, d): the pooler before tanh
        pooled = torch.tanh(z)
        logits = model.classifier(pooled)  # (N, C), eval mode: no dropout
    top = Counter(logits.argmax(-1).tolist()).most_common(1)[0][1] / logits.shape[0]
    return {
        "cls_norm": h.norm(dim=-1).mean().item(),
        "cls_spread": h.std(dim=0).mean().item(),
        "pooler_saturated": (z.abs() > 3).float().mean().item(),
        "pooled_spread": pooled.std(dim=0).mean().item(),
        "logit_spread": logits.std(dim=0).mean().item(),
        "top_prediction_share": top,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (each with adapter/ and config.yaml)")
    parser.add_argument("--limit", type=int, default=128, help="XNLI-en examples of the scored split")
    parser.add_argument("--out", help="also write the rows as JSON lines here")
    args = parser.parse_args(argv)

    from hybridpeft.api import load_adapter
    from hybridpeft.tasks import get_task
    from hybridpeft.train.setup import load_model

    task = get_task("xnli-cls", progress=False)
    examples = task.load(task.eval_split, limit=args.limit, seed=0)
    rows = []
    for run in [Path(r) for r in args.runs]:
        if not (run / "adapter" / "adapter_config.json").is_file():
            print(f"skipping {run}: no adapter/", file=sys.stderr)
            continue
        torch.manual_seed(0)
        model, tokenizer = load_model("minilm-l6", task)
        model.eval()
        batch = task.encode(tokenizer, examples, max_length=128)
        label = run.parent.name
        if not rows:
            rows.append({"run": "base model (fresh head)", **probe(model, batch)})
        load_adapter(model, run / "adapter")
        model.eval()
        rows.append({"run": label, **probe(model, batch)})
    keys = ["cls_norm", "cls_spread", "pooler_saturated", "pooled_spread", "logit_spread", "top_prediction_share"]
    print("| run | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for row in rows:
        print(f"| {row['run']} | " + " | ".join(f"{row[k]:.4f}" for k in keys) + " |")
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
