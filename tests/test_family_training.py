"""Training of the decoder families: GPT-2 and the Llama layout, fine-tuned and pretrained from scratch.

On tiny random checkpoints (`test_family_scoring.build`, its offline word tokenizer) and tiny data roots
written here, so each run is a few steps of a hidden-16 model:

- full fine-tuning of a sequence classifier (a causal LM given a fresh head, `prompt=False`; by default
  it learns a classification task from its prompt: `test_rank_classification.py`) changes the weights,
  drives the loss on a repeated batch far down, records its task and base, and saves a config whose pad
  id lets transformers' own `from_pretrained` read the checkpoint as MergeLab scored it in memory (right
  padding, last real token);
- LoRA and (IA)³ modules on PEFT's default targets save only their own tensors and the head, and the
  folded model scores as the live PEFT model did; token classifiers train too;
- a `scratch-llama:tiny` decoder (RMSNorm, gated MLP, RoPE, 2 KV heads, tied embeddings) pretrained by
  next-token prediction memorises a repeated block, saving intermediate checkpoints;
- a tiny recipe runs the whole chain on decoders: pretrain from two seeds, fine-tune, pair, merge,
  evaluate, curve;
- what stays gated (families without an adapter, prefix and bottleneck modules on decoders) is refused with
  one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import merging_core as ml
from merging_core import arch, models, scratch
from merging_core.errors import MergeLabError
from merging_core.evaluation import Evaluator

from .test_family_scoring import build, word_tokenizer

FAMILIES = ("llama", "gpt2")
EOS = 3  # the word tokenizer's </s>: what decoder batches are padded with (it has no pad token)
# Eight SST-2 style sentences in the word tokenizer's vocabulary (no <unk>), both labels.
SENTENCES = [("the film is good", 1), ("the movie was not good", 0), ("a good story with the new film", 1),
             ("not a story", 0), ("it is the first good time", 1), ("this movie has no story", 0),
             ("his film was much good", 1), ("but the story is not new", 0)]
# One paragraph: a single 128-token block for the MiniLM WordPiece tokenizer of the scratch decoders.
PARAGRAPH = ("The river rises in the hills above the old town and runs south through farms and woods . It was "
             "used for mills in the nineteenth century , and a canal was cut beside it in 1820 to carry coal to "
             "the coast . Today the valley is a park , and people walk along the towpath in summer .")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Factory of tiny decoder checkpoints to fine-tune: a causal LM per family, saved with its tokenizer."""
    root = tmp_path_factory.mktemp("family-training")
    made: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in made:
            out = root / f"{family}-lm"
            build(family, "causal").save_pretrained(out)
            word_tokenizer(pad=False).save_pretrained(out)
            made[family] = str(out)
        return made[family]

    return get


@pytest.fixture()
def tiny_root(tmp_path, data_env) -> Path:
    """A data root with an eight-sentence SST-2 (train = dev: one batch is the whole set) and a WikiText-2 of
    one paragraph (the corpus task's only text: one block)."""
    root = tmp_path / "data"
    sst2 = root / "glue" / "SST-2"
    sst2.mkdir(parents=True)
    rows = "sentence\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in SENTENCES)
    for split in ("train", "dev"):
        (sst2 / f"{split}.tsv").write_text(rows)
    wiki = root / "wikitext-2"
    wiki.mkdir()
    for name in ("test.txt", "valid.txt"):
        (wiki / name).write_text(f" = Valley = \n {PARAGRAPH} \n")
    data_env(root)
    return root


def start(base: str, task: str, seed: int, keep_lm_head: bool = True) -> ml.Loaded:
    """The model `train` starts from: the same seed draws the same fresh head (or random initialization)."""
    torch.manual_seed(seed)
    return models.load(base, ml.get_task(task), new_head=True, device="cpu", keep_lm_head=keep_lm_head)


# ----------------------------------------------------------------------------------------------------
# fine-tuning


@pytest.mark.parametrize("family", FAMILIES)
def test_full_fine_tuning_learns_and_saves_a_classifier_transformers_reads_alike(family, bases, tiny_root,
                                                                                  tmp_path):
    base = bases(family)
    config = ml.TrainConfig(task="sst2", base=base, seed=0, steps=40, batch_size=8, lr=1e-2, warmup=0.0, prompt=False)
    before = ml.evaluate(start(base, "sst2", 0, keep_lm_head=False), "sst2", split="train")["loss"]
    out = tmp_path / "run"
    result = ml.train(config, out)

    meta = json.loads((out / "mergelab.json").read_text())
    assert meta == result.metadata
    assert (meta["task"], meta["base"], meta["kind"], meta["head"], meta["steps"]) == ("sst2", base, "full",
                                                                                      "sequence", 40)
    after = ml.evaluate(str(out), "sst2", split="train")
    assert after["loss"] < 0.25 * before and after["accuracy"] == 1.0  # the eight examples are learnt

    tuned, pretrained = load_file(out / "model.safetensors"), load_file(Path(base) / "model.safetensors")
    shared = [name for name in tuned if name in pretrained]
    assert len(shared) >= len(tuned) - 1  # all but the fresh score head come from the base
    assert all(not torch.equal(tuned[name], pretrained[name]) for name in shared)  # full fine-tuning moves all

    # The saved config records the padding id, so transformers' own loader finds the last real token.
    saved_config = json.loads((out / "config.json").read_text())
    assert saved_config["pad_token_id"] == EOS
    assert saved_config["architectures"][0].endswith("ForSequenceClassification")
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert reloaded.config.pad_token_id == EOS
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    texts = [text for text, _ in SENTENCES[:4]]
    batch = tokenizer(texts, padding=False)["input_ids"]
    width = max(map(len, batch))
    padded = torch.tensor([ids + [EOS] * (width - len(ids)) for ids in batch])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch])
    with torch.no_grad():
        alone = torch.cat([reloaded(input_ids=torch.tensor([ids])).logits for ids in batch])
        together = reloaded(input_ids=padded, attention_mask=mask).logits
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    # ... and scores exactly as the in-memory model did at the end of training
    scored = Evaluator("sst2", tokenizer, "dev", device="cpu")(reloaded)
    assert scored["accuracy"] == meta["scores"]["dev"]["accuracy"]
    assert scored["loss"] == pytest.approx(meta["scores"]["dev"]["loss"], rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("kind", ["lora", "ia3"])
@pytest.mark.parametrize("family", FAMILIES)
def test_peft_modules_save_only_their_tensors_and_fold_into_the_same_scores(family, kind, bases, tiny_root,
                                                                            tmp_path):
    base = bases(family)
    out = tmp_path / kind
    ml.train(ml.TrainConfig(task="sst2", base=base, steps=12, batch_size=8, lr=2e-2, peft=kind, prompt=False), out)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    # PEFT's own default targets for the model type
    expected = {("lora", "llama"): {"q_proj", "v_proj"}, ("lora", "gpt2"): {"c_attn"},
                ("ia3", "llama"): {"k_proj", "v_proj", "down_proj"}, ("ia3", "gpt2"): {"c_attn", "mlp.c_proj"}}
    assert set(adapter_config["target_modules"]) == expected[kind, family]
    assert not (out / "model.safetensors").exists()
    tensors = load_file(out / models.ADAPTER_FILE)
    own = "lora_" if kind == "lora" else "ia3_l"
    assert all(own in name or ".score." in f".{name}" for name in tensors), sorted(tensors)
    assert any(".score." in f".{name}" for name in tensors)  # the task head is saved with the module
    trained = [t for n, t in tensors.items() if "lora_B" in n or "ia3_l" in n]
    assert trained and all(not torch.equal(t, torch.zeros_like(t) if kind == "lora" else torch.ones_like(t))
                           for t in trained)  # the module moved from its identity start

    ref = models.resolve(str(out))
    live = models.load_adapter(ref)  # the PEFT model, not folded
    folded = ml.load(str(out), ml.get_task("sst2"), device="cpu").model  # merge_and_unload
    assert type(folded).__name__.endswith("ForSequenceClassification")
    evaluator = Evaluator("sst2", models.load_tokenizer(ref), "dev", device="cpu")
    live_scores, folded_scores = evaluator(live), evaluator(folded)
    assert folded_scores["accuracy"] == live_scores["accuracy"]
    assert folded_scores["loss"] == pytest.approx(live_scores["loss"], abs=1e-5)
    assert folded_scores["loss"] == pytest.approx(json.loads((out / "mergelab.json").read_text())
                                                  ["scores"]["dev"]["loss"], abs=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_token_classifiers_train_on_decoders(family, bases, tmp_path):
    out = tmp_path / "ner"
    meta = ml.train(ml.TrainConfig(task="conll2003", base=bases(family), steps=2, batch_size=4, eval_limit=8),
                    out).metadata
    assert meta["head"] == "token"
    assert type(ml.load(str(out), ml.get_task("conll2003")).model).__name__.endswith("ForTokenClassification")
    assert ml.evaluate(str(out), "conll2003", limit=8)["f1"] == meta["scores"]["dev"]["f1"]


def test_a_multitask_decoder_shares_its_body_and_keeps_a_head_per_task(bases, tmp_path):
    out = tmp_path / "mt"
    meta = ml.train(ml.TrainConfig(task="sst2,mrpc", base=bases("gpt2"), steps=3, batch_size=4, eval_limit=8,
                                   prompt=False), out).metadata
    assert meta["kind"] == "multitask" and set(meta["heads"]) == {"sst2", "mrpc"}
    for task in ("sst2", "mrpc"):
        assert ml.evaluate(str(out), task, limit=8)["loss"] == pytest.approx(meta["scores"]["dev"][task]["loss"],
                                                                              abs=1e-6)


# ----------------------------------------------------------------------------------------------------
# pretraining from scratch


def test_the_scratch_decoder_is_the_llama_layout_with_minilm_s_vocabulary():
    model = start("scratch-llama:tiny", "corpus", 0).model
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads) == (128, 2, 4, 2)  # grouped-query attention: 2 queries per KV head
    assert config.hidden_act == "silu" and config.tie_word_embeddings and config.vocab_size == 30522
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert type(model.model.norm).__name__ == "LlamaRMSNorm"
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 101, 102)  # [PAD] [CLS] [SEP]
    for size, bert in scratch.BERT_SIZES.items():  # the BERT sizes' widths and depths
        llama = scratch.LLAMA_SIZES[size]
        assert (llama["hidden_size"], llama["num_hidden_layers"]) == (bert["hidden_size"], bert["num_hidden_layers"])
    assert not torch.equal(start("scratch-llama:tiny", "corpus", 1).model.model.embed_tokens.weight,
                           model.model.embed_tokens.weight)  # the seed decides the initialization
    with pytest.raises(MergeLabError, match="unknown scratch size 'scratch-llama:huge'; use one of: "
                                            "scratch-llama:tiny"):
        models.resolve("scratch-llama:huge")


def test_pretraining_a_scratch_decoder_lowers_its_next_token_loss(tiny_root, tmp_path):
    base = "scratch-llama:tiny"
    before = ml.evaluate(start(base, "corpus", 0), "corpus", split="train")
    assert before["n"] == 1  # one block, repeated by every step
    config = ml.TrainConfig(task="corpus", base=base, seed=0, steps=30, batch_size=1, lr=3e-3, save_every=10)
    out = tmp_path / "pretrained"
    meta = ml.train(config, out).metadata
    assert (meta["base"], meta["head"], meta["kind"]) == (base, "causal", "full")
    after = ml.evaluate(str(out), "corpus", split="train")
    assert after["predicted_tokens"] == before["predicted_tokens"]
    assert after["loss"] < 0.5 * before["loss"]  # next-token loss, memorising the block
    assert [c["step"] for c in meta["checkpoints"]] == [10, 20]
    step10 = ml.evaluate(str(out / "step-10"), "corpus", split="train")["loss"]
    assert after["loss"] < step10 < before["loss"]
    assert "lm_head.weight" not in load_file(out / "model.safetensors")  # tied: saved once, as the embeddings
    # a head-only run of a tied causal LM would train nothing: one line, not a silent no-op
    with pytest.raises(MergeLabError, match="leaves no parameter to train"):
        ml.train(ml.TrainConfig(task="corpus", base=str(out), steps=1, head_only=True), tmp_path / "head")


def test_a_scratch_decoder_recipe_runs_the_whole_chain(isolated_home, tmp_path):
    """Pretrain two seeds, fine-tune (full and LoRA), then the engine's merge, evaluation and curve on them."""
    recipe = tmp_path / "decoders.yaml"
    recipe.write_text(
        "defaults: {base: 'scratch-llama:tiny', task: corpus, steps: 3, batch_size: 4, eval_limit: 4}\n"
        "models:\n"
        "  d0: {seed: 0, save_every: 2}\n"
        "  d1: {seed: 1}\n"
        "  d0-sst2: {base: d0, task: sst2, seed: 0, eval_limit: 8}\n"
        "  d0-sst2-b: {base: d0, task: sst2, seed: 1, eval_limit: 8}\n"
        "  d1-sst2: {base: d1, task: sst2, seed: 0, eval_limit: 8}\n"
        "  d0-lora-sst2: {base: d0, task: sst2, peft: lora, eval_limit: 8}\n")
    rows = ml.zoo.build(recipe)
    assert [r["status"] for r in rows] == ["built"] * 6
    entries = {e["name"]: e for e in ml.zoo.entries()}
    assert entries["d0"]["base"] == "scratch-llama:tiny" and "d0/step-2" in entries
    assert entries["d0-lora-sst2"]["kind"] == "lora"
    kinds = {(p["a"], p["b"]): p["kind"] for p in ml.zoo.pairs()}
    assert kinds[("d0", "d1")] == "different initializations"
    assert kinds[("d0-sst2", "d1-sst2")] == "different initializations"  # through their pretrained ancestors
    assert kinds[("d0-sst2", "d0-sst2-b")] == "same task, different seeds"
    assert ml.evaluate("d0", "wikitext2", limit=4)["perplexity"] > 1  # the causal LM on held-out text

    merged = tmp_path / "merged"
    ml.merge("average", ["d0-sst2", "d0-sst2-b"], out=merged)
    a, b = (load_file(isolated_home / "zoo" / name / "model.safetensors") for name in ("d0-sst2", "d0-sst2-b"))
    key = "model.layers.0.self_attn.k_proj.weight"
    torch.testing.assert_close(load_file(merged / "model.safetensors")[key], (a[key] + b[key]) / 2)
    scores = ml.evaluate(str(merged), "sst2", limit=8)
    assert scores["n"] == 8 and 0 <= scores["accuracy"] <= 1

    points = [p for p in ml.curve("d0-sst2", "d0-sst2-b", "sst2", points=3, limit=8) if p["kind"] == "point"]
    assert [p["t"] for p in points] == [0.0, 0.5, 1.0]
    for point, name in ((points[0], "d0-sst2"), (points[-1], "d0-sst2-b")):  # the ends are the fine-tunes
        assert point["scores"]["sst2"]["loss"] == pytest.approx(ml.evaluate(name, "sst2", limit=8)["loss"], abs=1e-5)
    assert points[1]["scores"]["sst2"]["loss"] == pytest.approx(scores["loss"], abs=1e-5)  # the midpoint: the average
    assert ml.evaluate("d0-lora-sst2", "sst2", limit=8)["n"] == 8


@pytest.mark.parametrize("recipe", ["scratch-llama", "scratch-t5"])
def test_the_shipped_recipe_pretrains_three_seeds_and_fine_tunes_each(recipe):
    entries = ml.zoo.load_recipe(recipe).entries
    pretrained = {name: c for name, c in entries.items() if c.task == "corpus"}
    assert {c.base for c in pretrained.values()} == {f"{recipe}:mini"}
    assert sorted(c.seed for c in pretrained.values()) == [0, 1, 2]
    full = [c for c in entries.values() if c.task != "corpus" and c.peft is None and "," not in c.task]
    assert {(c.base, c.task) for c in full} == {(p, t) for p in pretrained for t in ("sst2", "mrpc", "emotion")}
    assert all(c.prompt for c in entries.values())  # fine-tunes learn the prompts with the LM head
    [multitask] = [c for c in entries.values() if "," in c.task]
    assert multitask.base in pretrained and set(multitask.task.split(",")) == {"sst2", "mrpc", "emotion"}
    lora = [c for c in entries.values() if c.peft == "lora"]
    assert lora and len({c.base for c in lora}) == 1 and {c.base for c in lora} <= set(pretrained)
    # every base is built before the entries that start from it
    names = list(entries)
    assert all(names.index(c.base) < names.index(n) for n, c in entries.items() if c.base in entries)


# ----------------------------------------------------------------------------------------------------
# what stays gated


def test_a_family_without_training_is_refused_with_one_line(tmp_path):
    folder = tmp_path / "neox"
    transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2)).save_pretrained(folder)
    with pytest.raises(MergeLabError, match="model type 'gpt_neox' is not supported yet for fine-tuning") as error:
        ml.train(ml.TrainConfig(base=str(folder), task="sst2", steps=1), tmp_path / "out")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()
    for family in ("gpt2", "llama", "qwen2", "mistral", "bert", "t5"):  # T5: tests/test_t5.py
        arch.require(family, "training")


@pytest.mark.parametrize("kind", ["prefix", "bottleneck"])
def test_modules_that_need_bert_s_layout_are_refused_on_decoders(kind, bases, tmp_path):
    with pytest.raises(MergeLabError, match=f"{kind} modules are trained on BERT-family models only so far, not "
                                            "on model type 'llama'"):
        ml.train(ml.TrainConfig(base=bases("llama"), task="sst2", steps=1, peft=kind), tmp_path / "out")
