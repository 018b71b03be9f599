"""Merge speed per model family: a data-free merge (task arithmetic, written to disk) and a RegMean merge
(Gram statistics on SST-2 train examples computed fresh, then the per-layer solves) of two random
"fine-tunes" of one random base, for BERT and every other family MergeLab has an adapter for, at one
size (hidden 256, 4 layers, MiniLM's 30522-token vocabulary). Each time is divided by the checkpoint's
parameter count and compared with BERT's: the other families share BERT's code path, so a family that
costs much more per parameter has a slow spot of its own. RegMean's time is also divided by the
parameters it solves for (the linear layers' weights; the embeddings are averaged): a family whose
linear layers hold a larger share of its parameters (T5's decoder blocks, with cross-attention) has
more to solve per parameter.

    python bench/family_speed.py [--repeats 3] [--examples 64] [--families bert t5] [--results NAME]

Decoders (GPT-2, the Llama layout) and T5 carry their LM head and compute RegMean's statistics by rank
classification on SST-2's prompts (T5: the encoder reads the prompt, the decoder one verbalizer position);
encoders carry a sequence head. Every folder holds MiniLM's tokenizer files, but transformers reads a Qwen2
folder's as a Qwen2 tokenizer, under which SST-2's verbalizers take several tokens, so Qwen2's statistics
run more forward passes per batch (`verbalizer_tokens`). T5 has 4 encoder and 4 decoder blocks (its
decoder blocks add cross-attention), so it has more parameters than the others at this width.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

from common import print_table, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import merging_core as ml  # noqa: E402
from merging_core import prompts, settings  # noqa: E402
from merging_core.encode import encode  # noqa: E402
from merging_core.merge import merge  # noqa: E402
from merging_core.models import load_tokenizer  # noqa: E402

HIDDEN, LAYERS, HEADS = 256, 4, 4
_LLAMA = {"hidden_size": HIDDEN, "intermediate_size": 704, "num_hidden_layers": LAYERS,
          "num_attention_heads": HEADS, "num_key_value_heads": 2, "max_position_embeddings": 512}
# family -> (config class, config, model class); the vocabulary is MiniLM's (RegMean reads SST-2 through it)
FAMILIES = {
    "bert": ("BertConfig", {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
                            "intermediate_size": 4 * HIDDEN}, "BertForSequenceClassification"),
    "distilbert": ("DistilBertConfig", {"dim": HIDDEN, "n_layers": LAYERS, "n_heads": HEADS, "hidden_dim": 4 * HIDDEN},
                   "DistilBertForSequenceClassification"),
    "deberta-v2": ("DebertaV2Config", {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
                                       "intermediate_size": 4 * HIDDEN, "relative_attention": True,
                                       "position_buckets": 64, "pos_att_type": ["p2c", "c2p"],
                                       "norm_rel_ebd": "layer_norm"}, "DebertaV2ForSequenceClassification"),
    "gpt2": ("GPT2Config", {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_positions": 512},
             "GPT2LMHeadModel"),
    "llama": ("LlamaConfig", _LLAMA, "LlamaForCausalLM"),
    "mistral": ("MistralConfig", _LLAMA, "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", _LLAMA, "Qwen2ForCausalLM"),
    "t5": ("T5Config", {"d_model": HIDDEN, "d_kv": HIDDEN // HEADS, "d_ff": 4 * HIDDEN, "num_layers": LAYERS,
                        "num_heads": HEADS, "decoder_start_token_id": 0}, "T5ForConditionalGeneration"),
}


def build(family: str, folder: Path, tokenizer) -> tuple[list[str], str, int]:
    """A random base and two fine-tunes (base + small noise), saved as a user's checkpoints would be:
    (fine-tune folders, base folder, parameters)."""
    config_class, kwargs, model_class = FAMILIES[family]
    special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.cls_token_id,
               "eos_token_id": tokenizer.sep_token_id}
    config = getattr(transformers, config_class)(vocab_size=len(tokenizer), **kwargs, **special)
    if model_class.endswith("SequenceClassification"):
        config.num_labels = 2
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    out = []
    for name, noise in (("base", None), ("ft1", 1), ("ft2", 2)):
        if noise is not None:
            generator = torch.Generator().manual_seed(noise)
            model.load_state_dict({k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in base.items()})
        path = folder / f"{family}-{name}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        out.append(str(path))
    return out[1:], out[0], sum(p.numel() for p in model.parameters()), solved_parameters(model)


def solved_parameters(model: torch.nn.Module) -> int:
    """The parameters RegMean solves for: the weights of the linear layers (`nn.Linear`, GPT-2's `Conv1D`),
    an LM head tied to the embeddings left out (that matrix is the embeddings, averaged)."""
    embedding = model.get_input_embeddings().weight
    layers = (torch.nn.Linear, transformers.pytorch_utils.Conv1D)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, layers) and m.weight is not embedding)


def timed(fn, repeats: int) -> float:
    """The median wall time of `fn()` over `repeats` runs."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--examples", type=int, default=64, help="SST-2 train examples of RegMean's Grams")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--results", default="family_speed",
                        help="results file name: bench/results/<name>-<device>.json")
    args = parser.parse_args()
    tokenizer = load_tokenizer(ml.resolve("minilm"))
    for task in (ml.get_task("sst2"), ml.tasks.scored_as(ml.get_task("sst2"), "causal")):
        encode(task, "train", tokenizer)  # tokenized once (as sentences, as prompts), outside every timing
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for family in args.families:
            models, base, n, solved = build(family, folder, tokenizer)
            out = folder / f"{family}-merged"
            free = timed(functools.partial(merge, "task_arithmetic", models, base=base, out=out, overwrite=True),
                         args.repeats)
            row = {"family": family, "params_M": n / 1e6, "solved_params_M": solved / 1e6, "task_arithmetic_s": free,
                   "task_arithmetic_us_per_param": free / n * 1e6}

            def regmean(models: list[str] = models) -> None:
                shutil.rmtree(settings.cache_dir("stats"), ignore_errors=True)  # statistics computed fresh every time
                merge("regmean", models, stats_tasks=("sst2", "sst2"), params={"examples": args.examples})

            aware = timed(regmean, args.repeats)
            row.update(regmean_s=aware, regmean_us_per_param=aware / n * 1e6,
                       regmean_us_per_solved_param=aware / solved * 1e6)
            if not FAMILIES[family][2].endswith("SequenceClassification"):
                # the statistics read SST-2's prompts: a verbalizer of several tokens under the tokenizer
                # transformers loads for the folder costs a forward pass of its own
                loaded = load_tokenizer(ml.resolve(models[0]))
                words = prompts.verbalizer_ids(ml.tasks.scored_as(ml.get_task("sst2"), "causal"), loaded)
                row["verbalizer_tokens"] = max(map(len, words))
            rows.append(row)
            print(row, flush=True)
    bert = rows[0] if rows and rows[0]["family"] == "bert" else None
    ratios = {"task_arithmetic_vs_bert": "task_arithmetic_us_per_param", "regmean_vs_bert": "regmean_us_per_param",
              "regmean_solved_vs_bert": "regmean_us_per_solved_param"}
    for row in rows:
        for name, key in ratios.items():
            if bert and key in row:
                row[name] = row[key] / bert[key]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    print_table(rows, columns)
    write_results(args.results, {"repeats": args.repeats, "examples": args.examples, "rows": rows})


if __name__ == "__main__":
    main()
