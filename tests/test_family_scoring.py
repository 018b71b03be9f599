"""Scoring and statistics of the families beyond BERT: DistilBERT, DeBERTa-v2, GPT-2 (sequence, token and LM
heads), Llama and Qwen2, on tiny random checkpoints saved with `save_pretrained` and the real task data.

Each result is checked against a computation written here without MergeLab's batching: one example at a
time through transformers' own model (so no padding at all), with only `input_ids` given:

- task scores (loss, accuracy, span F1) equal that forward pass's, although MergeLab pads and batches
  (decoders' tokenizers have no pad token: padded with EOS, the last real token still read by the head);
- the causal-LM loss on wikitext2 is the mean shifted cross-entropy, padding left out;
- the Gram of a `nn.Linear` and of a GPT-2 `Conv1D` is XᵀX / N over the real tokens (a last-token head:
  over the last tokens); RegMean of two GPT-2 models on a `Conv1D` is Jin et al.'s closed form in the
  weight's stored (in, out) layout; RegMean of a model with itself returns it; Fisher and MaTS merges
  give finite weights;
- what stays gated (alignment and uploads; training of DistilBERT and DeBERTa-v2; T5's alignment) is still
  refused with one line (decoders' training: `test_family_training`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers import models as token_models

import merging_core as ml
from merging_core import arch, data, encode, layerwise, losses, settings, stats, tasks
from merging_core.errors import MergeLabError
from merging_core.merge import merge
from merging_core.models import resolve
from merging_core.tasks import get_task

from .helpers import assert_close

VOCAB = 100
LIMIT = 24  # dev examples scored
EXAMPLES = 12  # train examples behind each statistic
# Frequent words of the task texts, so that the tiny models see varied inputs rather than all <unk>.
WORDS = ("the", ",", ".", "a", "of", "and", "to", "is", "in", "that", "it", "with", "for", "as", "was", "on", "film",
         "movie", "his", "'", "s", "by", "an", "be", "this", "are", "at", "from", "he", "one", "but", "not", "have",
         "has", "you", "all", "its", "who", "they", "more", "like", "about", "her", "their", "or", "so", "story",
         "there", "than", "i", "out", "what", "when", "just", "some", "can", "up", "no", "would", "even", "much",
         "good", "into", "only", "-", "(", ")", "``", "@", "=", "''", ":", ";", "new", "first", "two", "after", "time",
         "were", "had", "been", "which", "also")

_DECODER = {"bos_token_id": 2, "eos_token_id": 3}  # the word tokenizer's <s> and </s>
CONFIGS = {
    "distilbert": ("DistilBertConfig", {"dim": 16, "n_layers": 2, "n_heads": 2, "hidden_dim": 32, "pad_token_id": 0}),
    "deberta-v2": ("DebertaV2Config", {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                                       "intermediate_size": 32, "relative_attention": True, "position_buckets": 8,
                                       "max_relative_positions": 16, "pos_att_type": ["p2c", "c2p"],
                                       "norm_rel_ebd": "layer_norm", "pad_token_id": 0}),
    # decoders: no pad token anywhere (config, tokenizer), as GPT-2's and Llama's own files
    "gpt2": ("GPT2Config", {"n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 160, **_DECODER}),
    "llama": ("LlamaConfig", {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                              "num_attention_heads": 2, "num_key_value_heads": 1, **_DECODER}),
    # transformers loads a qwen2 folder's tokenizer as `Qwen2Tokenizer`, which adds Qwen's own pad token
    # <|endoftext|> as id 100: a pad token that is not EOS, and a vocabulary one larger
    "qwen2": ("Qwen2Config", {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                              "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": VOCAB + 1,
                              **_DECODER}),
}
DECODERS = ("gpt2", "llama", "qwen2")
CLASSES = {
    ("distilbert", "sequence"): "DistilBertForSequenceClassification",
    ("distilbert", "token"): "DistilBertForTokenClassification",
    ("deberta-v2", "sequence"): "DebertaV2ForSequenceClassification",
    ("gpt2", "sequence"): "GPT2ForSequenceClassification",
    ("gpt2", "token"): "GPT2ForTokenClassification",
    ("gpt2", "causal"): "GPT2LMHeadModel",
    ("llama", "sequence"): "LlamaForSequenceClassification",
    ("llama", "causal"): "LlamaForCausalLM",
    ("qwen2", "sequence"): "Qwen2ForSequenceClassification",
    ("qwen2", "causal"): "Qwen2ForCausalLM",
}
AUTO = {"sequence": "AutoModelForSequenceClassification", "token": "AutoModelForTokenClassification",
        "causal": "AutoModelForCausalLM"}
LABELS = {"sequence": 2, "token": 9, "causal": 2}  # sst2, conll2003


def word_tokenizer(pad: bool) -> transformers.PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer of exactly VOCAB tokens, built offline; with a pad token (encoders)
    or without one (decoders)."""
    words = list(dict.fromkeys(WORDS))
    names = ["<pad>", "<unk>", "<s>", "</s>", *words]
    names += [f"w{i}" for i in range(VOCAB - len(names))]
    core = Tokenizer(token_models.WordLevel({t: i for i, t in enumerate(names[:VOCAB])}, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", **({"pad_token": "<pad>"} if pad else {})}
    # token type ids from every family's tokenizer: MergeLab must not hand them to a model without type embeddings
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, **special,
                                                model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def build(family: str, head: str, seed: int = 0, labels: int | None = None) -> torch.nn.Module:
    """A tiny random model, every parameter perturbed (fresh norms are ones and biases zeros in every seed)."""
    config_class, config = CONFIGS[family]
    torch.manual_seed(seed)
    config = {"vocab_size": VOCAB, "max_position_embeddings": 160, "num_labels": labels or LABELS[head], **config}
    model = getattr(transformers, CLASSES[family, head])(getattr(transformers, config_class)(**config))
    generator = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Factory of saved checkpoints (config, safetensors, tokenizer), cached per (family, head, seed)."""
    root = tmp_path_factory.mktemp("family-scoring")
    made: dict[tuple[str, str, int], str] = {}

    def get(family: str, head: str = "sequence", seed: int = 0) -> str:
        if (family, head, seed) not in made:
            out = root / f"{family}-{head}-{seed}"
            build(family, head, seed).save_pretrained(out)
            word_tokenizer(pad=family not in DECODERS).save_pretrained(out)
            made[family, head, seed] = str(out)
        return made[family, head, seed]

    return get


def reference(folder: str, head: str) -> torch.nn.Module:
    """The checkpoint as transformers loads it, untouched by MergeLab."""
    return getattr(transformers, AUTO[head]).from_pretrained(folder).eval()


def tokenizer_of(folder: str):
    """The checkpoint's tokenizer as transformers loads it."""
    return transformers.AutoTokenizer.from_pretrained(folder)


def ids_of(tokenizer, text) -> torch.Tensor:
    """One example's token ids, alone (no padding), as (1, length)."""
    texts = text if isinstance(text, tuple) else (text,)
    return torch.tensor([tokenizer(*texts, truncation=True, max_length=128)["input_ids"]])


def train_subset(task: str, n: int) -> list:
    """The texts of the train examples statistics use: the seeded random subset `stats` documents."""
    raw = data.load_split(ml.get_task(task), "train")
    index = torch.randperm(len(raw.texts), generator=torch.Generator().manual_seed(stats.SEED))[:n]
    return [raw.texts[i] for i in index.tolist()]


def input_grams(model: torch.nn.Module, modules: dict[str, str], texts: list, tokenizer, last_only: set[str]
                ) -> dict[str, torch.Tensor]:
    """XᵀX / N of each module's inputs, one unpadded example at a time (`last_only`: the last token's row)."""
    sums = {name: 0 for name in modules}
    rows = dict.fromkeys(modules, 0)
    handles = []
    for name, path in modules.items():
        def hook(module, args, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()  # (tokens, in); a pooled input: one row
            x = x[-1:] if name in last_only else x
            sums[name] = sums[name] + x.T @ x
            rows[name] += x.shape[0]
        handles.append(model.get_submodule(path).register_forward_pre_hook(hook))
    with torch.no_grad():
        for text in texts:
            model(input_ids=ids_of(tokenizer, text))
    for h in handles:
        h.remove()
    return {name: sums[name] / rows[name] for name in modules}


# ----------------------------------------------------------------------------------------------------
# inputs: padding and token type ids


def test_decoders_pad_with_eos_on_the_loaded_model_only(saved):
    folder = saved("gpt2")
    files = {p.name: p.read_bytes() for p in Path(folder).iterdir()}
    loaded = ml.load(folder, ml.get_task("sst2"))
    assert loaded.tokenizer.pad_token_id is None and encode.pad_id(loaded.tokenizer) == 3  # </s>
    assert loaded.model.config.pad_token_id == 3  # what the batches are padded with, so the head finds the last token
    ml.evaluate(folder, "sst2", limit=4)
    assert {p.name: p.read_bytes() for p in Path(folder).iterdir()} == files  # nothing written back
    assert json.loads((Path(folder) / "config.json").read_text()).get("pad_token_id") is None
    assert encode.pad_id(word_tokenizer(pad=True)) == 0
    # a decoder tokenizer with a pad token of its own (Qwen2's <|endoftext|>): that one, on the model too
    assert ml.load(saved("qwen2"), ml.get_task("sst2")).model.config.pad_token_id == 100


def test_token_type_ids_reach_only_models_with_type_embeddings(saved):
    batch = {"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "token_type_ids": torch.zeros(1, 3, dtype=torch.long), "labels": torch.zeros(1, dtype=torch.long)}
    bert = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    assert set(encode.model_inputs(batch, bert)) == {"input_ids", "attention_mask", "token_type_ids"}
    for family in ("distilbert", "deberta-v2", "gpt2", "llama"):
        config = build(family, "causal" if family in DECODERS else "sequence").config
        assert set(encode.model_inputs(batch, config)) == {"input_ids", "attention_mask"}, family


# ----------------------------------------------------------------------------------------------------
# scoring, against one unpadded forward pass per example


@pytest.mark.parametrize("family", ["distilbert", "deberta-v2", "gpt2", "llama", "qwen2"])
def test_sequence_scores_equal_a_hand_written_forward(family, saved):
    folder = saved(family)
    result = ml.evaluate(folder, "sst2", limit=LIMIT, batch_size=7)  # batches of mixed lengths: padding
    raw = data.load_split(ml.get_task("sst2"), "dev")
    model, tokenizer = reference(folder, "sequence"), tokenizer_of(folder)
    with torch.no_grad():
        logits = torch.cat([model(input_ids=ids_of(tokenizer, text)).logits for text in raw.texts[:LIMIT]])
    labels = torch.tensor(raw.labels[:LIMIT])
    assert result["n"] == LIMIT and all(torch.isfinite(torch.tensor([result["loss"], result["accuracy"]])))
    assert result["accuracy"] == pytest.approx((logits.argmax(-1) == labels).double().mean().item())
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("family", ["distilbert", "gpt2"])
def test_token_scores_equal_a_hand_written_forward(family, saved):
    from seqeval.metrics import f1_score

    folder = saved(family, "token")
    result = ml.evaluate(folder, "conll2003", limit=LIMIT, batch_size=5)
    spec = ml.get_task("conll2003")
    raw = data.load_split(spec, "dev")
    model, tokenizer = reference(folder, "token"), tokenizer_of(folder)
    loss, count, predicted, gold = 0.0, 0, [], []
    with torch.no_grad():
        for words, tags in zip(raw.texts[:LIMIT], raw.labels[:LIMIT]):
            encoded = tokenizer(words, is_split_into_words=True)
            word_ids = encoded.word_ids()
            first = [word_ids.index(w) for w in range(len(words))]  # each word's first token carries its tag
            logits = model(input_ids=torch.tensor([encoded["input_ids"]])).logits[0, first]
            loss += F.cross_entropy(logits, torch.tensor(tags), reduction="sum").item()
            count += len(tags)
            predicted.append([spec.labels[t] for t in logits.argmax(-1).tolist()])
            gold.append([spec.labels[t] for t in tags])
    assert result["loss"] == pytest.approx(loss / count, rel=1e-5)
    assert result["f1"] == pytest.approx(f1_score(gold, predicted, zero_division=0))


@pytest.mark.parametrize("family", DECODERS)
def test_causal_lm_loss_is_the_shifted_cross_entropy(family, saved):
    folder = saved(family, "causal")
    result = ml.evaluate(folder, "wikitext2", limit=6, batch_size=4)
    spec = ml.get_task("wikitext2")
    tokenizer = tokenizer_of(folder)
    blocks = encode.encode(spec, "dev", tokenizer).head(6)
    model = reference(folder, "causal")
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(6):
            ids = blocks.ids[int(blocks.offsets[i]): int(blocks.offsets[i + 1])].long()[None]
            assert ids[0, 0] == tokenizer.bos_token_id  # a decoder's block starts like any text it reads
            logits = model(input_ids=ids).logits[0]
            total += F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    assert result["predicted_tokens"] == count
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-5)


def test_causal_lm_loss_leaves_padding_out(saved):
    """Right-padded rows of different lengths give exactly the loss of each row alone."""
    model = ml.load(saved("llama", "causal"), ml.get_task("wikitext2")).model
    rows = [torch.randint(4, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 5, 2)]
    ids = torch.full((3, 9), 3)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    with torch.no_grad():
        logits, targets = losses.causal_lm_logits(model, {"input_ids": ids, "attention_mask": mask})
        alone = [model(input_ids=row[None]).logits[0, :-1] for row in rows]
    assert len(targets) == 8 + 4 + 1
    assert_close(logits, torch.cat(alone), atol=1e-5)
    assert torch.equal(targets, torch.cat([row[1:] for row in rows]))


def test_a_head_that_cannot_score_a_task_is_one_line(saved):
    lm, classifier = saved("gpt2", "causal"), saved("llama")
    with pytest.raises(MergeLabError) as error:
        ml.evaluate(lm, "conll2003", limit=4)
    message = str(error.value)
    assert "\n" not in message and lm in message and "conll2003" in message
    assert "can be scored on cola, sst2, mrpc, rte, qnli, wnli, qqp, mnli, emotion, wikitext2 instead" in message
    with pytest.raises(MergeLabError, match=r"has a sequence head but task wikitext2 needs a mlm, causal or seq2seq head"):
        ml.evaluate(classifier, "wikitext2", limit=4)
    # a model handed to an evaluator directly is checked the same way, before any forward pass
    evaluator = ml.Evaluator("conll2003", word_tokenizer(pad=False), limit=4, device="cpu")
    with pytest.raises(MergeLabError, match="causal head but task conll2003 needs a token head"):
        evaluator(reference(lm, "causal"), name="lm")
    assert ml.get_task("wikitext2").heads == ("mlm", "causal", "seq2seq") and ml.get_task("conll2003").heads == ("token",)
    assert tasks.tasks_for_head("causal")[-1] == "wikitext2" and "conll2003" not in tasks.tasks_for_head("causal")


# ----------------------------------------------------------------------------------------------------
# statistics


@pytest.mark.parametrize("family, modules", [
    ("gpt2", {"h.0.mlp.c_fc.weight": "transformer.h.0.mlp.c_fc", "h.1.attn.c_proj.weight": "transformer.h.1.attn.c_proj",
              "score.weight": "score"}),  # two Conv1D, and the Linear head read at the last token
    ("llama", {"layers.0.mlp.down_proj.weight": "model.layers.0.mlp.down_proj", "score.weight": "score"}),
    ("distilbert", {"transformer.layer.0.ffn.lin1.weight": "distilbert.transformer.layer.0.ffn.lin1",
                    "pre_classifier.weight": "pre_classifier"}),
])
def test_grams_are_xtx_over_the_real_tokens(family, modules, saved):
    folder = saved(family)
    ours = stats.statistics(folder, "sst2", ("gram",), {"examples": EXAMPLES})
    heads = {name for name in modules if name == "score.weight"}  # GPT-2's and Llama's: the last token
    expected = input_grams(reference(folder, "sequence"), modules, train_subset("sst2", EXAMPLES),
                           tokenizer_of(folder), heads)
    for name, gram in expected.items():
        assert_close(ours[name]["gram"], gram, atol=1e-6, rtol=1e-4, msg=name)
    assert float(ours["score.weight" if "score.weight" in ours else "pre_classifier.weight"]["gram_count"]) == EXAMPLES


@pytest.mark.parametrize("family, head, task", [("gpt2", "sequence", "sst2"), ("llama", "causal", "wikitext2"),
                                                ("qwen2", "sequence", "sst2"), ("gpt2", "causal", "wikitext2"),
                                                ("llama", "causal", "emotion")])  # (rank classification)
def test_block_by_block_grams_equal_the_whole_model_pass(family, head, task, saved, monkeypatch):
    ref, spec, options = resolve(saved(family, head)), get_task(task), {**stats.DEFAULTS, "examples": EXAMPLES}
    blocks = stats.compute(ref, spec, "gram", options)
    monkeypatch.setattr(layerwise, "block_stack", lambda model: None)
    whole = stats.compute(ref, spec, "gram", options)
    assert blocks.keys() == whole.keys() and len(blocks) > 4
    for name in whole:
        assert torch.equal(blocks[name]["gram"], whole[name]["gram"]), name
        assert float(blocks[name]["gram_count"]) == float(whole[name]["gram_count"]), name


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_block_by_block_follows_several_stack_calls_per_batch(family):
    """A forward that runs the model twice per batch (as rank classification does for a long verbalizer):
    each call's inputs reach every block, in order."""
    model = build(family, "causal")
    modules = stats._linear_modules(model)
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(1, VOCAB, (2, 5 + i), generator=generator)} for i in range(2)]

    def run(batch):
        model(input_ids=batch["input_ids"])
        model(input_ids=batch["input_ids"][:, :3])

    def summed():
        sums = {}

        def accumulate(name, x, batch):
            rows = x.reshape(-1, x.shape[-1]).double()
            sums[name] = sums.get(name, 0) + rows.T @ rows

        return sums, accumulate

    whole, add = summed()
    handles = [m.register_forward_pre_hook(lambda m, a, name=name: add(name, a[0], None)) for name, m in modules.items()]
    with torch.inference_mode():
        for batch in batches:
            run(batch)
    for h in handles:
        h.remove()
    blocks, add = summed()
    order, parts = layerwise.block_grams(layerwise.block_stack(model), modules, batches, run, add,
                                         lambda names: {}, "grams", None)
    assert sum(1 for _ in parts) == model.config.num_hidden_layers + 1 and sorted(order) == sorted(modules)
    assert blocks.keys() == whole.keys()
    for name in whole:
        assert torch.equal(blocks[name], whole[name]), name


def test_each_block_s_grams_are_written_before_the_next_block_runs(saved, isolated_home, monkeypatch):
    events = []
    enter, write = layerwise._hooked.__enter__, stats.StreamingWriter.write
    monkeypatch.setattr(layerwise._hooked, "__enter__",
                        lambda self: events.append(("run", self.targets[0][0])) or enter(self))
    monkeypatch.setattr(stats.StreamingWriter, "write",
                        lambda self, name, t: events.append(("write", name)) or write(self, name, t))
    grams = stats.statistics(saved("llama", "causal"), "wikitext2", ("gram",), {"examples": EXAMPLES})
    first_write = next(i for i, (what, _) in enumerate(events) if what == "write")
    assert events[first_write][1].startswith("layers.0.")
    assert all(name.startswith("layers.0.") for what, name in events[:first_write] if what == "run")
    assert any(what == "run" and name.startswith("layers.1.") for what, name in events[first_write:])
    assert isinstance(grams["layers.1.mlp.down_proj.weight"], stats.Stored)  # read from the file when used
    (written,) = Path(settings.cache_dir("stats")).glob("*.json")  # (a fresh home: this statistic only)
    record = json.loads(written.read_text())
    assert record["kind"] == "gram" and record["task"] == "wikitext2" and record["seconds"] > 0


def test_a_layer_that_never_ran_has_no_gram(tmp_path):
    layout = {"a::gram": (torch.float32, (2, 2)), "a::gram_count": (torch.float32, ()),
              "b::gram": (torch.float32, (2, 2)), "b::gram_count": (torch.float32, ())}
    parts = iter([{"a": {"gram": torch.eye(2), "gram_count": torch.tensor(3.0)}},
                  {"b": {"gram": torch.zeros(2, 2), "gram_count": torch.tensor(0.0)}}])
    stats.save_stats(parts, {"kind": "gram"}, tmp_path / "s.safetensors", layout, started=0.0)
    values, record = stats.load_stats(tmp_path / "s.safetensors")
    assert list(values) == ["a"] and torch.equal(values["a"]["gram"], torch.eye(2)) and record["seconds"] > 0


@pytest.mark.parametrize("family, head, task", [("distilbert", "sequence", "sst2"), ("deberta-v2", "sequence", "sst2"),
                                                ("gpt2", "sequence", "sst2"), ("gpt2", "causal", "wikitext2"),
                                                ("llama", "sequence", "sst2"), ("qwen2", "causal", "wikitext2")])
def test_regmean_of_a_model_with_itself_returns_it(family, head, task, saved, tmp_path):
    folder = saved(family, head)
    merge("regmean", [folder, folder], stats_tasks=[task], params={"examples": 8}, out=tmp_path / "m")
    original, merged = load_file(Path(folder) / "model.safetensors"), load_file(tmp_path / "m" / "model.safetensors")
    assert_close(merged, original, atol=2e-5, rtol=1e-4, msg=family)


def test_regmean_of_two_gpt2_models_on_a_conv1d_is_the_closed_form(saved, tmp_path):
    """W = (Σ G̃_i)⁻¹ Σ G̃_i W_i with W stored (in, out) as Conv1D keeps it, G from each model's own inputs."""
    folders = [saved("gpt2", seed=0), saved("gpt2", seed=1)]
    merge("regmean", folders, stats_tasks=["sst2"], params={"examples": EXAMPLES, "alpha": 0.9}, out=tmp_path / "m")
    merged = load_file(tmp_path / "m" / "model.safetensors")
    modules = {"c_proj": "transformer.h.1.attn.c_proj", "c_fc": "transformer.h.0.mlp.c_fc"}  # square, and (16, 64)
    texts = train_subset("sst2", EXAMPLES)
    grams, weights = [], []
    for folder in folders:
        model = reference(folder, "sequence")
        grams.append(input_grams(model, modules, texts, tokenizer_of(folder), set()))
        weights.append({k: model.get_submodule(path).weight.detach().double() for k, path in modules.items()})
    for key, path in modules.items():
        scaled = [0.9 * g[key] + 0.1 * torch.diag_embed(g[key].diagonal()) for g in grams]
        expected = torch.linalg.solve(sum(scaled), sum(g @ w[key] for g, w in zip(scaled, weights)))
        assert merged[f"{path}.weight"].shape == weights[0][key].shape
        assert_close(merged[f"{path}.weight"], expected, atol=1e-5, rtol=1e-4, msg=key)
        mean = (weights[0][key] + weights[1][key]) / 2
        assert (expected - mean).abs().max() > 1e-3  # the Grams matter: not the average by accident


@pytest.mark.parametrize("family, head, task", [("gpt2", "causal", "wikitext2"), ("llama", "sequence", "emotion"),
                                                ("distilbert", "token", "conll2003")])
def test_fisher_and_mats_merges_are_finite(family, head, task, saved, tmp_path):
    if task == "emotion":  # six labels
        folders = []
        for seed in (0, 1):
            build(family, head, seed, labels=6).save_pretrained(tmp_path / f"emotion-{seed}")
            word_tokenizer(pad=False).save_pretrained(tmp_path / f"emotion-{seed}")
            folders.append(str(tmp_path / f"emotion-{seed}"))
    else:
        folders = [saved(family, head, 0), saved(family, head, 1)]
    fisher = merge("fisher", folders, stats_tasks=[task], params={"examples": 4})
    kfac = merge("mats", folders, stats_tasks=[task], params={"examples": 4, "objective": "kfac", "init": "average",
                                                               "iterations": 20})
    for result in (fisher, kfac):
        assert result.state and all(torch.isfinite(t).all() for t in result.state.values() if t.is_floating_point())
    first = load_file(Path(folders[0]) / "model.safetensors")
    assert any(not torch.equal(fisher.state[arch.canonical(k, family)], v) for k, v in first.items())


@pytest.mark.parametrize("kind", ["fisher", "grad_gram"])
def test_a_bf16_checkpoint_has_the_gradient_statistics_of_its_float32_copy(kind, tmp_path):
    """Statistics of gradients of a bf16 checkpoint are computed in float32 on the CPU (bf16 matrix products
    there run in a slow reference loop): the same values as the float32 copy of the same weights."""
    model = build("llama", "causal")
    folders = {}
    for dtype in (torch.bfloat16, torch.float32):
        folders[dtype] = tmp_path / str(dtype).split(".")[-1]
        model.to(torch.bfloat16).to(dtype).save_pretrained(folders[dtype])  # the same (bf16) values either way
        word_tokenizer(pad=False).save_pretrained(folders[dtype])
    spec, options = get_task("wikitext2"), {**stats.DEFAULTS, "examples": 3}
    loaded_as = []
    real_fisher, real_parts = stats._fisher, stats._gram_parts
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stats, "_fisher", lambda model, *a, **k: loaded_as.append(
            next(model.parameters()).dtype) or real_fisher(model, *a, **k))
        patch.setattr(stats, "_gram_parts", lambda model, *a, **k: loaded_as.append(
            next(model.parameters()).dtype) or real_parts(model, *a, **k))
        half, full = (stats.compute(resolve(str(folders[d])), spec, kind, options) for d in folders)
    assert loaded_as == [torch.float32, torch.float32]
    assert half.keys() == full.keys() and len(half) > 4
    for name in full:
        assert torch.equal(half[name][kind], full[name][kind]), name


def test_a_causal_lm_fisher_is_the_squared_gradient_of_its_next_token_log_likelihood(saved):
    folder = saved("gpt2", "causal")
    spec = ml.get_task("wikitext2")
    ours = stats.statistics(folder, spec, ("fisher",), {"examples": 3})
    model = reference(folder, "causal")
    blocks = encode.encode(spec, "train", tokenizer_of(folder))
    index = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(stats.SEED))[:3]
    expected = torch.zeros_like(model.transformer.h[0].mlp.c_fc.weight)
    for i in index.tolist():
        ids = blocks.ids[int(blocks.offsets[i]): int(blocks.offsets[i + 1])].long()[None]
        model.zero_grad()
        logits = model(input_ids=ids).logits[0, :-1]
        F.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).sum().backward()  # log p(x) = Σ log p(x_t | x_<t)
        expected += model.transformer.h[0].mlp.c_fc.weight.grad ** 2
    assert_close(ours["h.0.mlp.c_fc.weight"]["fisher"], expected / 3, atol=1e-9, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------
# what stays gated


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "qwen2", "distilbert", "deberta-v2"])
def test_the_gate_refuses_what_a_family_cannot_do_yet(model_type):
    arch.require(model_type, "scoring")
    arch.require(model_type, "statistics")
    refused = (("uploads", "uploads"),)
    if model_type in DECODERS:  # decoders train (test_family_training) and align (test_decoder_permutation)
        arch.require(model_type, "training")
        arch.require(model_type, "alignment")
    else:  # the other encoders do neither yet
        refused += (("training", "fine-tuning"), ("alignment", "permutation alignment"))
    for feature, what in refused:
        with pytest.raises(MergeLabError, match=f"model type '{model_type}' is not supported yet for {what}") as error:
            arch.require(model_type, feature)
        assert "\n" not in str(error.value)


def test_t5_stays_gated_for_alignment_and_training_refuses_distilbert(saved, tmp_path):
    for feature in ("scoring", "statistics", "training"):  # as a language model (tests/test_t5.py)
        arch.require("t5", feature)
    for feature in ("alignment", "uploads"):
        with pytest.raises(MergeLabError, match="model type 't5' is not supported yet"):
            arch.require("t5", feature)
    with pytest.raises(MergeLabError, match="'distilbert' is not supported yet for fine-tuning"):
        ml.train(ml.TrainConfig(base=saved("distilbert"), task="sst2", steps=1), tmp_path / "out")
