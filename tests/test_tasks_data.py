"""Task registry and data readers on the real shared data."""

from __future__ import annotations

import pytest

from merging_core import data, metrics, tasks
from merging_core.errors import MergeLabError

# Example counts of the files in shared/data (MRPC train: 3,667 rows after the header).
COUNTS = {
    ("cola", "train"): 8551, ("cola", "dev"): 1043,
    ("sst2", "train"): 67349, ("sst2", "dev"): 872,
    ("mrpc", "train"): 3667, ("mrpc", "dev"): 408,
    ("stsb", "train"): 5749, ("stsb", "dev"): 1500,
    ("emotion", "train"): 16000, ("emotion", "dev"): 2000, ("emotion", "test"): 2000,
    ("conll2003", "train"): 14041, ("conll2003", "dev"): 3250, ("conll2003", "test"): 3453,
}


@pytest.mark.parametrize(("task", "split"), sorted(COUNTS))
def test_split_sizes_and_labels(task, split):
    spec = tasks.get_task(task)
    raw = data.load_split(spec, split)
    assert len(raw.texts) == len(raw.labels) == COUNTS[task, split]
    if spec.kind == "classification":
        assert set(raw.labels) == set(range(spec.num_labels))
    elif spec.kind == "regression":
        assert min(raw.labels) >= 0.0 and max(raw.labels) <= 5.0
    else:  # token task: one tag per word
        assert all(len(w) == len(t) for w, t in zip(raw.texts, raw.labels))


def test_glue_columns_are_read_by_header_name():
    mrpc = data.load_split(tasks.get_task("MRPC"), "dev")  # header starts with a BOM
    assert mrpc.texts[0][0].startswith("He said the foodservice pie business")
    assert mrpc.texts[0][1].startswith('" The foodservice pie business')
    stsb = data.load_split(tasks.get_task("sts-b"), "dev")
    assert stsb.texts[0] == ("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.")
    assert stsb.labels[0] == 5.0


def test_cola_has_no_header_and_is_read_by_position():
    cola = data.load_split(tasks.get_task("cola"), "dev")
    assert cola.texts[0] == ("The sailors rode the breeze clear of the rocks.",)
    assert cola.labels[0] == 1


def test_emotion_label_names_map_to_indices():
    spec = tasks.get_task("emotion")
    raw = data.load_split(spec, "dev")
    assert spec.labels[raw.labels[0]] == "sadness"  # "im feeling quite sad ...;sadness"


def test_conll_sentences_skip_docstart_and_score_like_conlleval():
    spec = tasks.get_task("ner")
    raw = data.load_split(spec, "dev")
    assert all(w != "-DOCSTART-" for sentence in raw.texts for w in sentence)
    # The file is IOB2 except for a few spans that open with I- (56 in dev); conlleval rules, which
    # seqeval's default mode follows, count such a tag as the start of a span.
    gold = [[spec.labels[t] for t in tags] for tags in raw.labels]
    opens_with_i = sum(t.startswith("I-") and p[2:] != t[2:] for s in gold for p, t in zip(["O"] + s, s))
    assert opens_with_i == 56
    assert metrics.span_metrics(gold, gold)["f1"] == 1.0
    assert metrics.span_metrics([["I-PER", "I-PER"]], [["B-PER", "I-PER"]])["f1"] == 1.0


def test_wikitext_train_falls_back_to_test_file():
    spec = tasks.get_task("mlm")
    assert data.load_split(spec, "train").source.endswith("test.txt")
    assert data.load_split(spec, "dev").source.endswith("valid.txt")


def test_task_aliases():
    assert tasks.get_task("SST-2").name == tasks.get_task("sst2").name == "sst2"
    assert tasks.get_task("NER").name == "conll2003"


def test_unknown_task_is_one_clear_line():
    with pytest.raises(MergeLabError, match=r"unknown task 'sst3'; known tasks: cola, sst2"):
        tasks.get_task("sst3")


def test_unknown_split():
    with pytest.raises(MergeLabError, match="has no split 'test'"):
        data.load_split(tasks.get_task("sst2"), "test")


def test_missing_data_root(data_env, tmp_path):
    data_env(tmp_path / "nowhere")
    with pytest.raises(MergeLabError, match="does not exist; point it at a folder"):
        data.load_split(tasks.get_task("sst2"), "dev")


def test_task_missing_offline_names_the_folder(data_env, tmp_path):
    data_env(tmp_path)  # exists, but holds nothing
    with pytest.raises(MergeLabError, match=r"not in the data root \(looked for .*glue/SST-2/dev.tsv\).*HF_HUB_OFFLINE"):
        data.load_split(tasks.get_task("sst2"), "dev")


def test_rte_reads_from_its_registry_entry_alone(data_env, rte_root):
    data_env(rte_root)
    spec = tasks.get_task("RTE")
    dev = data.load_split(spec, "dev")
    assert len(dev.texts) == 6 and dev.labels[:2] == [0, 1]  # entailment, not_entailment by name
    assert dev.texts[0] == ("The cat sat on the mat in the kitchen.", "A cat is on a mat.")
    assert "rte" in data.available_tasks()


def test_malformed_glue_rows_are_skipped(data_env, tmp_path):
    folder = tmp_path / "glue" / "QNLI"
    folder.mkdir(parents=True)
    (folder / "dev.tsv").write_text("index\tquestion\tsentence\tlabel\n0\tWhy?\tBecause.\tentailment\n"
                                    "1\tbroken row\tnot_entailment\n2\tWho?\tNobody.\tnot_entailment\n")
    data_env(tmp_path)
    raw = data.load_split(tasks.get_task("qnli"), "dev")
    assert raw.texts == [("Why?", "Because."), ("Who?", "Nobody.")] and raw.labels == [0, 1]


def test_bad_label_names_the_file(data_env, tmp_path):
    folder = tmp_path / "glue" / "SST-2"
    folder.mkdir(parents=True)
    (folder / "dev.tsv").write_text("sentence\tlabel\ngood film\t7\n")
    data_env(tmp_path)
    with pytest.raises(MergeLabError, match=r"dev.tsv: label '7' is not one of"):
        data.load_split(tasks.get_task("sst2"), "dev")


def test_corpus_gathers_every_training_text_and_keeps_wikitext_dev(data_env, rte_root):
    data_env(rte_root)
    spec = tasks.get_task("corpus")
    train = data.load_split(spec, "train")
    assert train.source.startswith("corpus:") and {"sst2", "emotion", "conll2003", "wikitext2", "rte"} <= set(
        train.source.removeprefix("corpus:").split(","))
    assert "The cat sat on the mat in the kitchen." in train.texts  # RTE's first sentence, on its own line
    assert "A cat is on a mat." in train.texts  # and its second
    sst2 = data.load_split(tasks.get_task("sst2"), "train")
    assert sst2.texts[0][0] in train.texts
    dev = data.load_split(spec, "dev")
    assert dev.texts == data.load_split(tasks.get_task("wikitext2"), "dev").texts  # held out, comparable
    assert data.local_fingerprint(spec, "train") != data.local_fingerprint(tasks.get_task("wikitext2"), "train")
