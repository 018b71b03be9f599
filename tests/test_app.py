"""The Gradio app built in-process and driven through gradio_client, as a remote user would."""

from __future__ import annotations

import json
import math
import re

import pytest

from .conftest import app_client, copy_model, running_app, save_family_model

gradio_client = pytest.importorskip("gradio_client")


@pytest.fixture()
def client(app_home):
    with running_app() as url:
        yield app_client(url)


@pytest.fixture()
def pico_cola_entry(app_home, pico):
    """A second zoo model next to app_home's pico-sst2: a pico CoLA model."""
    entry = copy_model(pico("cola", seed=1), app_home / "zoo" / "pico-cola")
    (entry / "mergelab.json").write_text(json.dumps({"task": "cola", "kind": "full", "seed": 1, "steps": 0}))
    return entry


def _merge(client, models=("pico-sst2", "pico-cola"), method="average", params=None, **kwargs):
    from merging_core.arch import GROUPS

    args = {"models": list(models), "base": "", "method": method, "params": params or {}, "components": list(GROUPS),
            "fallback": "average", "heads": "auto", "limit": 8, "compare": True, "multitask": "", "out": "",
            **kwargs}
    return client.predict(**args, api_name="/merge")


def _rows(table: dict) -> list[dict]:
    return [dict(zip(table["headers"], row)) for row in table["data"]]


def test_endpoints_are_named(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/evaluate", "/zoo_list", "/zoo_build", "/merge", "/curve", "/plane", "/align", "/ensemble"} <= names


def test_zoo_list_and_evaluate(client):
    zoo = _rows(client.predict(api_name="/zoo_list"))
    assert [r["name"] for r in zoo] == ["pico-sst2"] and zoo[0]["score"] == 0.5
    rows = _rows(client.predict("pico-sst2", ["sst2", "emotion"], "dev", 16, api_name="/evaluate"))
    assert rows[0]["task"] == "SST-2" and rows[0]["n"] == 16 and rows[0]["metric"] == "accuracy"
    assert 0.0 <= rows[0]["score"] <= 1.0
    assert "6" in rows[1]["note"]  # the emotion row explains why it was skipped


def test_bad_model_is_an_app_error(client):
    with pytest.raises(Exception, match="does not exist"):
        client.predict("./not-a-model", ["sst2"], "dev", 4, api_name="/evaluate")


def test_zoo_build_from_the_app(client):
    table, note = client.predict("tiny", api_name="/zoo_build")
    assert "Built 1 model(s)" in note
    assert {r["name"] for r in _rows(table)} == {"pico-sst2", "stsb-tiny"}


def test_merge_and_compare(pico_cola_entry, client, app_home):
    table, status, files = _merge(client, out="avg-pico")
    folder = app_home / "merges" / "avg-pico"
    assert (folder / "model.safetensors").is_file() and (folder / "merge_config.json").is_file()
    assert table["headers"] == ["model", "kind", "CoLA", "SST-2", "mean"]  # tasks as people know them
    rows = {r["model"]: r for r in _rows(table)}
    assert [r["kind"] for r in rows.values()] == ["merge", "individual", "individual", "ensemble"]
    merged, sst2, cola = rows["avg-pico"], rows["pico-sst2"], rows["pico-cola"]
    for row, tasks in ((merged, ("SST-2", "CoLA")), (sst2, ("SST-2",)), (cola, ("CoLA",))):
        for task in tasks:
            assert isinstance(row[task], float) and -1.0 <= row[task] <= 1.0  # cola's MCC may be negative
        assert row["mean"] == pytest.approx(sum(row[t] for t in tasks) / len(tasks), abs=1e-4)
    assert rows["ensemble (logits)"]["SST-2"] is not None
    assert str(folder) in status and "first 8 examples" in status
    assert [json.loads(open(f).read())["method"] for f in files] == ["average"]

    # a multi-task model (here: the multi-head merge just saved) gets its own row
    table, _, _ = _merge(client, out="avg-pico-2", multitask=str(folder))
    assert _rows(table)[-1]["kind"] == "multi-task" and _rows(table)[-1]["SST-2"] is not None

    # compare off: only the saved merge is scored; a default name lands under merges/
    table, status, _ = _merge(client, params={"weights": "3, 1"}, compare=False)
    (row,) = _rows(table)
    assert row["kind"] == "merge" and row["model"].startswith("average-")
    assert (app_home / "merges" / row["model"]).is_dir() and "weights=[3.0, 1.0]" in status


def test_merge_with_every_pair(pico_cola_entry, pico, client, app_home):
    # three checkpoints: the merge of all three, then each pair merged with the same method and each
    # row's mean over the three pairs (the same-task tables of Jin et al. 2023)
    entry = copy_model(pico("sst2", seed=2), app_home / "zoo" / "pico-sst2-b")
    (entry / "mergelab.json").write_text(json.dumps({"task": "sst2", "kind": "full", "seed": 2, "steps": 0}))
    table, status, _ = _merge(client, models=("pico-sst2", "pico-cola", "pico-sst2-b"), out="trio", compare=False,
                              pairwise=True)
    rows = _rows(table)
    assert table["headers"] == ["model", "kind", "pair", "CoLA", "SST-2", "mean"]
    assert rows[0]["model"] == "trio" and rows[0]["pair"] == ""
    pairs = {r["pair"] for r in rows[1:] if r["pair"] != "mean of 3"}
    assert pairs == {"pico-sst2 + pico-cola", "pico-sst2 + pico-sst2-b", "pico-cola + pico-sst2-b"}
    merged = [r for r in rows if r["kind"] == "merge" and r["pair"] not in ("", "mean of 3")]
    (mean,) = [r for r in rows if r["kind"] == "merge" and r["pair"] == "mean of 3"]
    assert len(merged) == 3 and mean["mean"] == pytest.approx(sum(r["mean"] for r in merged) / 3, abs=1e-3)
    # two checkpoints: the merge is the only pair
    _, status, _ = _merge(client, out="duo", compare=False, pairwise=True)
    assert "Pairs skipped" in status


def test_merge_writes_the_dtype_and_shards_asked_for(pico_cola_entry, client, app_home):
    from safetensors import safe_open

    _, status, _ = _merge(client, out="bf16-shards", compare=False, dtype="bf16", shard_size="20KB")
    assert "saved in bf16" in status and "files of at most 20,000 bytes" in status
    folder = app_home / "merges" / "bf16-shards"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert len(shards) > 1 and not (folder / "model.safetensors").exists()
    dtypes = set()
    for shard in shards:  # the size bounds a shard's tensor bytes (as transformers'); one larger tensor sits alone
        with safe_open(folder / shard, "pt") as f:
            slices = [f.get_slice(k) for k in f.keys()]
            data = sum({"BF16": 2, "I64": 8}[s.get_dtype()] * math.prod(s.get_shape()) for s in slices)
            assert data <= 20_000 or len(slices) == 1
            dtypes |= {str(s.get_dtype()) for k, s in zip(f.keys(), slices) if "position_ids" not in k}
    assert dtypes == {"BF16"}
    config = json.loads((folder / "merge_config.json").read_text())
    assert config["dtype"] == "bf16" and config["shard_size"] == 20_000
    # left empty: one file, in the inputs' float32
    _merge(client, out="plain", compare=False, dtype="", shard_size=" ")
    with safe_open(app_home / "merges" / "plain" / "model.safetensors", "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} >= {"F32"}


def test_merge_errors_are_one_line(pico_cola_entry, client, app_home):
    cases = [({"method": "task_arithmetic"}, "^Base model: .*give the model they were fine-tuned from"),
             ({"method": "ties", "base": "pico-sst2", "params": {"density": 5}}, r"'density'.*\[0\.0, 1\.0\]"),
             ({"method": "average", "params": {"lambda": 0.3}}, "has no parameter 'lambda'"),
             ({"method": "slerp", "models": ["pico-sst2"]}, "exactly 2 models"),
             ({"dtype": "int8"}, "^Output dtype: .*'int8'.* not in the list of choices"),
             ({"shard_size": "big"}, "^Shard size: shard size 'big' is not a size")]
    for kwargs, message in cases:
        with pytest.raises(gradio_client.exceptions.AppError, match=message) as caught:
            _merge(client, **kwargs)
        assert "\n" not in str(caught.value)
    _merge(client, out="taken", compare=False)
    with pytest.raises(gradio_client.exceptions.AppError, match="^Output folder: .*already exists"):
        _merge(client, out="taken", compare=False)
    assert not (app_home / "merges").exists() or sorted(p.name for p in (app_home / "merges").iterdir()) == ["taken"]


def test_param_controls_follow_the_spec():
    import gradio as gr

    import merging_core as ml
    from views import merge_tab

    kinds = {"bool": gr.Checkbox, "choice": gr.Dropdown, "floats": gr.Textbox}
    with gr.Blocks():
        for method in ml.available_methods():
            for p in method["params"]:
                control = merge_tab.param_control(p)
                expected = kinds.get(p["kind"]) or (gr.Slider, gr.Number)
                assert isinstance(control, expected), (method["name"], p["name"])
                assert control.interactive and control.label == p["name"]
    # bounded, not tiny -> slider; a tolerance of 1e-6 or an open range -> number box
    mats = {p["name"]: p for m in ml.available_methods() if m["name"] == "mats" for p in m["params"]}
    with gr.Blocks():
        assert isinstance(merge_tab.param_control(mats["init_lambda"]), gr.Slider)
        assert isinstance(merge_tab.param_control(mats["tolerance"]), gr.Number)
        assert isinstance(merge_tab.param_control(mats["examples"]), gr.Number)
    assert merge_tab.defaults("ties") == {"density": 0.2, "scope": "model", "lambda": 1.0, "zero_sign": "auto",
                                          "tie_break": "sort"}
    assert [len(r) for r in merge_tab.balanced_rows(list(range(13)), 3)] == [3, 3, 3, 2, 2]


def test_curve_and_plane_endpoints(pico_cola_entry, client, app_home, pico):
    copy_model(pico("sst2", seed=5), app_home / "zoo" / "pico-sst2-b")
    figure, summary, status, files = client.predict(
        "pico-sst2", "pico-sst2-b", ["sst2"], 3, "line", 8, "", "", ["average"], 10, api_name="/curve")
    assert "Done in" in status and "first 8 examples" in status
    assert "pico-sst2 ↔ pico-sst2-b" in summary and "| line | sst2 |" in summary and "L2" in summary
    plot = json.loads(figure["plot"])
    traces = {t["name"] for t in plot["data"] if t.get("name")}
    assert {"sst2 (line)", "average"} <= traces
    csv = next(f for f in files if f.endswith(".csv"))
    lines = open(csv).read().strip().splitlines()
    assert lines[0].startswith("path,kind,method,t,task") and len(lines) == 1 + 3 + 1  # 3 points, 1 merge

    for show, title in (("metric", "accuracy"), ("loss", "loss")):
        figure, status = client.predict("pico-sst2", "pico-sst2-b", "pico-cola", "sst2", 3, 8, [], "", show,
                                        api_name="/plane")
        assert "Best accuracy on the grid" in status
        data = json.loads(figure["plot"])["data"]
        assert [t["type"] for t in data][0] == "contour" and data[0]["colorbar"]["title"]["text"] == title
        assert sum(len(row) for row in data[0]["z"]) == 9  # the 3 x 3 grid

    with pytest.raises(gradio_client.exceptions.AppError, match="pick two checkpoints"):
        client.predict("pico-sst2", "", ["sst2"], 3, "line", 8, "", "", [], 10, api_name="/curve")
    with pytest.raises(gradio_client.exceptions.AppError, match="minimum value 2"):  # the slider's own bound
        client.predict("pico-sst2", "pico-sst2-b", ["sst2"], 1, "line", 8, "", "", [], 10, api_name="/curve")
    with pytest.raises(gradio_client.exceptions.AppError, match="none of pico-sst2, pico-sst2-b has a head for task emotion"):
        client.predict("pico-sst2", "pico-sst2-b", ["emotion"], 3, "line", 8, "", "", [], 10, api_name="/curve")


def test_align_endpoint(client, app_home, pico):
    """/align: heatmaps, then vanilla and aligned curves; aligning an exact permuted copy leaves no barrier."""
    from merging_core.align import permute_checkpoint

    entry = copy_model(pico("wikitext2", seed=0), app_home / "zoo" / "pico-mlm")
    (entry / "mergelab.json").write_text(json.dumps({"task": "wikitext2", "kind": "full", "seed": 0}))
    permute_checkpoint("pico-mlm", app_home / "zoo" / "pico-mlm-permuted", seed=2)
    status, summary, site, heatmap, heads, curves = client.predict(
        "pico-mlm", "pico-mlm-permuted", "all", "head-perm", "first", True, "wikitext2", 16, [], 3, 4,
        api_name="/align")
    assert status.startswith("Done") and "function-preserving" in summary and "→ 1.000" in summary
    assert site["value"] == "attn.0" and {"ff.0", "res.embeddings", "qk.1"} <= set(c[0] for c in site["choices"])
    plot = json.loads(curves["plot"])
    names = {t["name"] for t in plot["data"] if t.get("name")}
    assert {"wikitext2 (vanilla)", "wikitext2 (aligned)"} <= names
    aligned = [t for t in plot["data"] if t.get("name") == "wikitext2 (aligned)"]
    assert len(aligned) == 1  # MLM's metric is its loss: one panel, not the same curve twice
    losses = aligned[0]["y"]  # the loss along the aligned line is flat (B is A again)
    assert max(losses) - min(losses) < 1e-5
    assert json.loads(heatmap["plot"])["data"][0]["type"] == "heatmap"
    with pytest.raises(gradio_client.exceptions.AppError, match="pick two checkpoints"):
        client.predict("pico-mlm", "", "all", "head-perm", "first", True, "wikitext2", 16, [], 3, 4, api_name="/align")


def test_ensemble_endpoint(client, app_home, pico):
    """/ensemble: the zoo's modules of other tasks weighted by similarity, and the few-shot comparison."""
    import merging_core as ml

    for task in ("cola", "emotion"):
        ml.train(ml.TrainConfig(task=task, base=str(pico(None)), steps=2, batch_size=4, peft="lora", eval_limit=8),
                 app_home / "zoo" / f"lora-{task}")
    plot, table, status = client.predict("sst2", "lora", [], "loss", -1.0, "model", 8, "0,1", 5, 8,
                                         api_name="/ensemble")
    assert "best start" in status and "--set weights=" in status
    rows = _rows(table)
    assert [r["init"] for r in rows] == ["fresh", "uniform", "weighted"] and all(r["seeds"] == 2 for r in rows)
    bars = [t for t in json.loads(plot["plot"])["data"] if t["type"] == "bar"]
    assert {tuple(t["x"]) for t in bars} == {("lora-cola", "lora-emotion")}
    weights = [t["y"] for t in bars if t.get("showlegend") is False]  # the right panel: weights, one bar set per seed
    assert all(sum(w) == pytest.approx(1.0) for w in weights)
    with pytest.raises(gradio_client.exceptions.AppError, match="seeds must be integers"):
        client.predict("sst2", "lora", [], "loss", -1.0, "model", 8, "zero", 5, 8, api_name="/ensemble")


# ----------------------------------------------------------------------------------------------------
# families beyond BERT: the pickers say which family and size each model is, and offer what it can do


def test_model_pickers_show_family_size_and_task(family_zoo):
    from views.common import model_choices, multitask_choices

    labels = {name: label for label, name in model_choices()}
    assert list(labels)[-1] == "minilm" and labels["minilm"] == "minilm · bert · 22.7M · no head"
    assert re.fullmatch(r"pico-sst2 · bert · \d+\.\dM · SST-2", labels["pico-sst2"]), labels
    assert re.fullmatch(r"tiny-llama · llama · \d+\.\dK · causal LM", labels["tiny-llama"]), labels
    assert re.fullmatch(r"tiny-gpt2-sst2 · gpt2 · \d+\.\dK · SST-2", labels["tiny-gpt2-sst2"]), labels
    assert multitask_choices() == []


def test_the_evaluate_tab_opens_on_a_pretrained_model_with_a_task_it_offers(app_home):
    """A zoo whose first model was pretrained on the text corpus (its recorded task `corpus`, which no picker
    offers) builds an Evaluate tab whose ticked tasks are among its choices, not an invalid value."""
    from views import build_app

    save_family_model(app_home / "zoo" / "a-pretrained-llama", "llama", "causal",
                      {"task": "corpus", "kind": "full", "seed": 0})
    demo = build_app()
    blocks = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    assert blocks["eval-model"].value == "a-pretrained-llama"  # the first model: the case this checks
    tasks = blocks["eval-tasks"]
    offered = [value for _, value in tasks.choices]
    assert "corpus" not in offered and tasks.value == ["wikitext2"]  # its held-out text, ticked
    # the Curves tab's suggested pair of two such models is scored on that text too
    import merging_core as ml

    save_family_model(app_home / "zoo" / "a-pretrained-llama-2", "llama", "causal",
                      {"task": "corpus", "kind": "full", "seed": 1})
    pair = next(p for p in ml.zoo.pairs() if {p["a"], p["b"]} == {"a-pretrained-llama", "a-pretrained-llama-2"})
    assert pair["tasks"] == ["wikitext2"]
    assert ml.tasks.listed_as("corpus") == "wikitext2" and ml.tasks.listed_as("sst2") == "sst2"


def test_evaluate_offers_a_causal_lm_its_tasks_and_scores_them(family_zoo, client):
    from views import evaluate_tab

    def offered(update) -> list[str]:
        return [task for _, task in update.constructor_args["choices"]]

    # a causal LM: its text task (next-token loss) and the classification tasks (rank classification)
    causal = evaluate_tab.pick_tasks("tiny-llama", ["sst2", "stsb"])
    assert {"wikitext2", "sst2", "emotion"} <= set(offered(causal))
    assert not {"stsb", "conll2003"} & set(offered(causal)) and causal.constructor_args["value"] == ["sst2"]
    assert "next-token loss" in causal.constructor_args["info"]
    # nothing ticked and no task of its own (a pretrained LM): its text task is ticked for it
    assert evaluate_tab.pick_tasks("tiny-llama", []).constructor_args["value"] == ["wikitext2"]
    classifier = evaluate_tab.pick_tasks("tiny-gpt2-sst2", [])  # a 2-label SST-2 head: SST-2, its own task
    assert offered(classifier) == ["sst2"] and classifier.constructor_args["value"] == ["sst2"]
    assert {"sst2", "wikitext2", "emotion"} <= set(offered(evaluate_tab.pick_tasks("", [])))  # none picked: all

    (row,) = _rows(client.predict("tiny-llama", ["wikitext2"], "dev", 8, api_name="/evaluate"))
    assert (row["task"], row["n"], row["metric"], row["note"]) == ("WikiText-2", 8, "next-token loss", "")
    perplexity = float(re.search(r"perplexity ([0-9.]+)", row["other metrics"]).group(1))
    assert math.isfinite(perplexity) and perplexity > 1.0
    assert row["score"] == pytest.approx(math.log(perplexity), abs=1e-3)  # the loss the perplexity comes from
    (row,) = _rows(client.predict("tiny-llama", ["sst2"], "dev", 8, api_name="/evaluate"))
    assert (row["task"], row["n"], row["metric"], row["note"]) == ("SST-2", 8, "accuracy", "")
    # an API request still naming a task the head cannot score: the engine's one line, in its row
    (row,) = _rows(client.predict("tiny-llama", ["conll2003"], "dev", 8, api_name="/evaluate"))
    assert "has a causal head but task conll2003 needs a token head" in row["note"] and "\n" not in row["note"]


def test_aligning_a_family_without_alignment_is_one_line(family_zoo, client):
    save_family_model(family_zoo / "zoo" / "tiny-distilbert", "distilbert", "sequence", {"task": "sst2"},
                      labels=("negative", "positive"))
    with pytest.raises(gradio_client.exceptions.AppError) as caught:
        client.predict("pico-sst2", "tiny-distilbert", "all", "head-perm", "first", True, "wikitext2", 16, [], 3, 4,
                       api_name="/align")
    message = str(caught.value)
    assert message.startswith("B (permuted into A's basis): model 'tiny-distilbert': model type 'distilbert' is "
                              "not supported yet for permutation alignment") and "\n" not in message


@pytest.fixture()
def distil_recipe(family_zoo) -> str:
    """A recipe (before the app is built: its picker lists the recipes there are) fine-tuning a DistilBERT."""
    import merging_core as ml

    base = save_family_model(family_zoo / "distilbert-base", "distilbert", "sequence", {"kind": "full"})
    (ml.zoo.RECIPES / "distil.yaml").write_text(f"defaults: {{base: '{base}', steps: 2, batch_size: 4}}\n"
                                                "models:\n  distil-sst2: {task: sst2}\n")
    return "distil"


def test_a_recipe_whose_base_cannot_be_fine_tuned_says_so_before_building(family_zoo, distil_recipe, client):
    from views import zoo_tab

    status = zoo_tab.recipe_refusal(distil_recipe)
    assert status.startswith("⚠ entry 'distil-sst2': model ") and "\n" not in status
    assert "model type 'distilbert' is not supported yet for fine-tuning" in status
    assert zoo_tab.recipe_refusal("tiny", status) == ""  # picking a recipe that builds clears it
    with pytest.raises(gradio_client.exceptions.AppError, match="^Recipe: entry 'distil-sst2': .* not supported yet "
                                                                  "for fine-tuning"):
        client.predict(distil_recipe, api_name="/zoo_build")
    assert not (family_zoo / "zoo" / "distil-sst2").exists()  # refused before any training
