"""Loaders on the real files in ../shared/data, strict errors on malformed files, splits and sampling."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from hybridpeft.tasks import Example, get_task
from hybridpeft.tasks import classification, gsm8k, translation
from hybridpeft.tasks.data import DataFormatError, k_shot, locate, parse_split, subsample

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not present")


# --------------------------------------------------------------------------- real files (row counts from the README)


@needs_data
@pytest.mark.parametrize("name,split,rows", [
    ("sst2", "train", 6920), ("sst2", "dev", 872), ("sst2-cls", "dev", 872),
    ("rte", "dev", 277), ("rte-cls", "dev", 277),
    ("xnli", "dev", 2490), ("xnli-cls", "dev", 2490),
    ("gsm8k", "train", 7473), ("gsm8k", "test", 1319),
    ("translate-en-es", "dev", 1600), ("translate-en-es", "test", 1600),
    ("translate-en-zh", "dev", 654), ("translate-en-zh", "test", 653),
])
def test_loader_row_counts(name, split, rows):
    examples = get_task(name).load(split, data_dir=str(DATA))
    assert len(examples) == rows
    assert all(ex.prompt for ex in examples)


@needs_data
def test_sst2_labels_and_formats():
    verbal = get_task("sst2").load("dev", data_dir=str(DATA))
    encoder = get_task("sst2-cls").load("dev", data_dir=str(DATA))
    # first data row of dev.tsv is "one long string of cliches .\t0"
    assert encoder[0].prompt == "one long string of cliches ." and encoder[0].label == 0 and encoder[0].text_pair is None
    assert verbal[0].target == "negative" and "one long string of cliches ." in verbal[0].prompt
    assert {ex.target for ex in verbal} == {"negative", "positive"}
    assert [ex.label for ex in verbal] == [ex.label for ex in encoder]


@needs_data
def test_rte_quoted_fields_and_pairs():
    examples = get_task("rte-cls").load("dev", data_dir=str(DATA))
    assert all(ex.text_pair and ex.label in (0, 1) for ex in examples)
    # CSV quoting: no field keeps its surrounding quotes, yet quotes inside text survive
    assert not any(ex.prompt.startswith('"') and ex.prompt.endswith('"') for ex in examples)
    assert any('"' in ex.prompt for ex in examples)


@needs_data
def test_xnli_languages_and_balance():
    examples = get_task("xnli", languages="en").load("dev", data_dir=str(DATA))
    assert Counter(ex.label for ex in examples) == {0: 830, 1: 830, 2: 830}
    assert {ex.meta["language"] for ex in examples} == {"en"}
    assert {ex.target for ex in examples} == {"yes", "maybe", "no"}
    with pytest.raises(DataFormatError, match="dev-fr.csv"):
        get_task("xnli", languages=["en", "fr"]).load("dev", data_dir=str(DATA))
    with pytest.raises(ValueError, match="languages"):
        get_task("xnli", languages="xx")


@needs_data
def test_gsm8k_targets_and_answers():
    examples = get_task("gsm8k").load("test", data_dir=str(DATA))
    first = examples[0]
    assert first.meta["answer"] == "18"
    assert first.target.endswith("#### 18") and "<<" not in first.target
    kept = get_task("gsm8k", keep_calculator=True).load("test[:1]", data_dir=str(DATA))[0]
    assert "<<16-3-4=9>>" in kept.target
    assert all(gsm8k.extract_answer(ex.target) == ex.meta["answer"] for ex in examples)


@needs_data
def test_translation_rows():
    zh = get_task("translate-en-zh").load("dev", data_dir=str(DATA))
    assert zh[0].meta["source"] == "Why does Tom call me Mary?" and zh[0].target == "为什么汤姆叫我玛丽？"
    assert "Chinese" in zh[0].prompt


def test_humaneval_problems_from_package():
    task = get_task("humaneval")
    test, train, dev = task.load("test"), task.load("train"), task.load("dev")
    assert len(test) == 164 and len(train) + len(dev) == 164
    assert not {ex.meta["task_id"] for ex in train} & {ex.meta["task_id"] for ex in dev}
    assert test[0].meta["task_id"] == "HumanEval/0" and "def has_close_elements" in test[0].prompt


@needs_data
def test_missing_split_names_file_and_suggests_slices():
    with pytest.raises(DataFormatError, match=r"rte/train\.tsv.*dev\.tsv.*dev\[:50%\]"):
        get_task("rte").load("train", data_dir=str(DATA))


@needs_data
def test_split_slices_are_disjoint_and_cover():
    task = get_task("rte-cls")
    a, b = task.load("dev[:50%]", data_dir=str(DATA)), task.load("dev[50%:]", data_dir=str(DATA))
    whole = task.load("validation", data_dir=str(DATA))
    assert [ex.meta["line"] for ex in a + b] == [ex.meta["line"] for ex in whole]
    assert len(task.load("dev[10:20]", data_dir=str(DATA))) == 10


def test_parse_split_rejects_garbage():
    assert parse_split("validation[:50%]").base == "dev"
    assert parse_split("train[100:]").hub_name() == "train[100:]"
    assert parse_split("dev").hub_name() == "validation"
    for bad in ["dev[", "dev[1]", "", "a b"]:
        with pytest.raises(ValueError, match="split="):
            parse_split(bad)


# --------------------------------------------------------------------------- malformed files


def _write(tmp_path: Path, rel: str, text: str) -> Path:
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("body,line,expected", [
    ("sentence\tlabel\ngood film\t1\nbad film\n", 3, "expected 2 tab-separated fields"),
    ("sentence\tlabel\ngood film\t1\nbad film\t7\n", 3, "expected label in"),
    ("sentence\tlabel\ngood film\t1\n\nbad\t0\n", 3, "blank line"),
    ("sentence\tlabel\n\t1\n", 2, "non-empty text"),
])
def test_malformed_tsv_names_file_and_line(tmp_path, body, line, expected):
    _write(tmp_path, "sst2/dev.tsv", body)
    with pytest.raises(DataFormatError) as err:
        get_task("sst2").load("dev", data_dir=str(tmp_path))
    assert f"dev.tsv:{line}:" in str(err.value) and expected in str(err.value)


def test_tsv_missing_column_is_reported(tmp_path):
    _write(tmp_path, "sst2/dev.tsv", "text\tlabel\ngood\t1\n")
    with pytest.raises(DataFormatError, match=r"dev\.tsv:1: expected columns \['sentence', 'label'\]"):
        get_task("sst2").load("dev", data_dir=str(tmp_path))


def test_quoted_record_spanning_lines_reports_its_line(tmp_path):
    body = 'sentence1\tsentence2\tlabel\tidx\n"a\nb"\tc\t0\t0\nx\ty\tmaybe\t1\n'
    _write(tmp_path, "rte/dev.tsv", body)
    with pytest.raises(DataFormatError, match=r"dev\.tsv:4: expected label"):
        get_task("rte").load("dev", data_dir=str(tmp_path))


@pytest.mark.parametrize("body,line,expected", [
    ('{"question": "q", "answer": "a #### 1"}\n{"question": "q"\n', 2, "invalid JSON"),
    ('{"question": "q", "answer": "a #### 1"}\n{"question": "q"}\n', 2, "expected key 'answer'"),
    ('[1, 2]\n', 1, "expected a JSON object"),
    ('{"question": "q", "answer": 5}\n', 1, "expected 'answer' to be str"),
    ('{"question": "q", "answer": "no final marker"}\n', 1, "#### <number>"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, body, line, expected):
    _write(tmp_path, "gsm8k/test.jsonl", body)
    with pytest.raises(DataFormatError) as err:
        get_task("gsm8k").load("test", data_dir=str(tmp_path))
    assert f"test.jsonl:{line}:" in str(err.value) and expected in str(err.value)


def test_invalid_utf8_is_reported(tmp_path):
    path = tmp_path / "gsm8k" / "test.jsonl"
    path.parent.mkdir()
    path.write_bytes(b'{"question": "q", "answer": "#### 1"}\n{"question": "\xff"}\n')
    with pytest.raises(DataFormatError, match=r"test\.jsonl:2: expected UTF-8"):
        get_task("gsm8k").load("test", data_dir=str(tmp_path))


def test_headerless_csv_with_wrong_width(tmp_path):
    _write(tmp_path, "xnli/dev-en.csv", "p,h,entailment\np,h\n")
    with pytest.raises(DataFormatError, match=r"dev-en\.csv:2: expected 3 comma-separated fields"):
        get_task("xnli-cls").load("dev", data_dir=str(tmp_path))


def test_explicit_data_dir_never_falls_back_to_the_hub(tmp_path):
    with pytest.raises(DataFormatError, match=r"missing data file .*tatoeba/eng-spa\.test\.tsv"):
        get_task("translate-en-es").load("test", data_dir=str(tmp_path))


# --------------------------------------------------------------------------- hub branch (the network call is faked)


def test_hub_branch_converts_and_validates(monkeypatch):
    calls = []

    def fake(path, name, split, split_names=None):
        calls.append((path, name, split.hub_name(split_names)))
        return [{"sentence": "fine", "label": 1, "idx": 0}, {"sentence": "awful", "label": 0, "idx": 1}]

    monkeypatch.setattr(classification, "load_hub_rows", fake)
    examples = get_task("sst2-cls").load("dev[:2]", data_dir="hub")
    assert calls == [("glue", "sst2", "validation[:2]")]
    assert [(ex.prompt, ex.label) for ex in examples] == [("fine", 1), ("awful", 0)]
    monkeypatch.setattr(classification, "load_hub_rows", lambda *a, **k: [{"sentence": "x", "label": -1}])
    with pytest.raises(DataFormatError, match=r"hub:glue/sst2\[validation\]:1: expected label"):
        get_task("sst2").load("dev", data_dir="hub")


def test_hub_branch_for_mnli_and_xnli_names(monkeypatch):
    calls = []
    row = {"premise": "p", "hypothesis": "h", "label": 2}
    monkeypatch.setattr(classification, "load_hub_rows", lambda p, n, s, m=None: calls.append((p, n, s.hub_name(m))) or [row])
    get_task("mnli").load("dev", data_dir="hub")
    get_task("xnli", languages="de,fr").load("test", data_dir="hub")
    assert calls == [("glue", "mnli", "validation_matched"), ("xnli", "de", "test"), ("xnli", "fr", "test")]


def test_locate_rules(tmp_path, monkeypatch):
    monkeypatch.delenv("HYBRIDPEFT_DATA", raising=False)
    assert locate("hub", "sst2", "dev.tsv").is_hub
    _write(tmp_path, "sst2/dev.tsv", "sentence\tlabel\n")
    assert locate(tmp_path, "sst2", "dev.tsv").path == tmp_path / "sst2" / "dev.tsv"
    monkeypatch.setenv("HYBRIDPEFT_DATA", str(tmp_path))
    assert locate(None, "sst2", "dev.tsv").path == tmp_path / "sst2" / "dev.tsv"
    with pytest.raises(DataFormatError, match="gsm8k"):
        locate(None, "gsm8k", "test.jsonl")  # an env-var directory is explicit: no silent hub


def test_gsm8k_hub_branch(monkeypatch):
    monkeypatch.setattr(gsm8k, "load_hub_rows", lambda *a, **k: [{"question": "1+1?", "answer": "1+1=2\n#### 2"}])
    (ex,) = get_task("gsm8k").load("test", data_dir="hub")
    assert ex.meta["answer"] == "2"
    monkeypatch.setattr(translation, "load_hub_rows", lambda *a, **k: [{"sourceString": "Hi.", "targetString": "Hola."}])
    (ex,) = get_task("translate-en-es").load("test", data_dir="hub")
    assert ex.target == "Hola." and "Hi." in ex.prompt


# --------------------------------------------------------------------------- sampling


def _pool(n_per_label=20, labels=(0, 1, 2), languages=("en", "fr")) -> list[Example]:
    return [Example(prompt=f"{lang}{lab}-{i}", label=lab, meta={"language": lang})
            for lang in languages for lab in labels for i in range(n_per_label)]


def test_k_shot_is_deterministic_stratified_and_ordered():
    pool = _pool()
    a, b = k_shot(pool, 4, seed=3), k_shot(pool, 4, seed=3)
    assert [e.prompt for e in a] == [e.prompt for e in b]
    assert [e.prompt for e in k_shot(pool, 4, seed=4)] != [e.prompt for e in a]
    assert Counter(e.label for e in a) == {0: 4, 1: 4, 2: 4}  # k per label, languages pooled
    index = {id(e): i for i, e in enumerate(pool)}
    assert [index[id(e)] for e in a] == sorted(index[id(e)] for e in a)


def test_k_shot_per_language_spreads_over_labels():
    sample = k_shot(_pool(), 32, seed=0, per="language")
    by_lang = Counter(e.meta["language"] for e in sample)
    assert by_lang == {"en": 32, "fr": 32}
    for lang in ("en", "fr"):
        counts = sorted(Counter(e.label for e in sample if e.meta["language"] == lang).values())
        assert counts == [10, 11, 11]  # 32 over 3 labels, as even as possible


def test_k_shot_refuses_too_few():
    with pytest.raises(ValueError, match="only 40 exist"):
        k_shot(_pool(), 41)  # 20 per language, pooled
    with pytest.raises(ValueError, match="language 'en', label 0.*only 2 exist"):
        k_shot(_pool(n_per_label=2), 9, per="language")
    with pytest.raises(ValueError, match="k="):
        k_shot(_pool(), 0)


def test_subsample_is_proportional_and_deterministic():
    pool = [Example(prompt=str(i), label=int(i < 30)) for i in range(100)]  # 30 % label 1
    a = subsample(pool, 10, seed=1)
    assert [e.prompt for e in a] == [e.prompt for e in subsample(pool, 10, seed=1)]
    assert Counter(e.label for e in a) == {0: 7, 1: 3}
    assert len(subsample(pool, 1000)) == 100


@needs_data
def test_task_k_shot_option_applies_to_train_only():
    task = get_task("sst2", k_shot=5)
    train = task.load("train", data_dir=str(DATA), seed=2)
    assert Counter(ex.label for ex in train) == {0: 5, 1: 5}
    assert len(task.load("dev", data_dir=str(DATA))) == 872
    xnli = get_task("xnli", k_shot=32)
    assert len(xnli.few_shot(xnli.load("dev", data_dir=str(DATA)), 32, seed=0)) == 32


@needs_data
@pytest.mark.parametrize("name", ["xnli", "xnli-cls", "rte-cls"])
def test_k_shot_holds_for_a_training_split_not_named_train(name):
    """XNLI and RTE train on ``dev[:50%]``: k_shot used to apply to ``train…`` names only, so
    ``get_task("xnli-cls", k_shot=32)`` silently trained on 1,245 examples."""
    task = get_task(name, k_shot=8)
    shots = task.load(task.train_split, data_dir=str(DATA), seed=1)
    per_group = Counter(ex.meta.get("language") if name.startswith("xnli") else ex.label for ex in shots)
    assert per_group == ({"en": 8} if name.startswith("xnli") else {0: 8, 1: 8})
    assert len(task.load(task.eval_split, data_dir=str(DATA))) > 100  # the scored split is untouched
    shots2, rest = task.few_shot_split("dev[:30%]", str(DATA), seed=1)  # any split a job trains on
    assert len(shots2) == len(shots) and len(rest) == len(task.read("dev[:30%]", str(DATA))) - len(shots2)
    assert not {id(ex) for ex in shots2} & {id(ex) for ex in rest}


@needs_data
def test_missing_xnli_languages_are_skipped_only_when_asked(monkeypatch):
    def no_hub(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(classification, "load_hub_rows", no_hub)
    with pytest.raises(DataFormatError, match="dev-zh.csv"):
        get_task("xnli", languages="en,zh").load("dev", data_dir=str(DATA))
    task = get_task("xnli", languages="en,zh,hi", missing_languages="skip", k_shot=32)
    with pytest.warns(UserWarning, match="'zh' has no data"):
        shots = task.load(task.train_split, data_dir=str(DATA))
    assert Counter(ex.meta["language"] for ex in shots) == {"en": 32}
    assert set(task.skipped_languages) == {"zh", "hi"} and "ConnectionError" in task.skipped_languages["zh"]
    monkeypatch.setattr(classification, "load_hub_rows",
                        lambda p, n, s, m=None: [{"premise": f"{n} p", "hypothesis": "h", "label": i % 3} for i in range(90)])
    hub = get_task("xnli", languages="en,zh", missing_languages="skip", k_shot=4)
    assert Counter(ex.meta["language"] for ex in hub.load("dev[:50%]", data_dir=str(DATA))) == {"en": 4, "zh": 4}
    with pytest.raises(ValueError, match="missing_languages"):
        get_task("xnli", missing_languages="ignore")
