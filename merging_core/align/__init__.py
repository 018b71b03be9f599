"""Permutation alignment of checkpoints trained from different initializations (Verma & Elbayad 2024,
"Merging Text Transformer Models from Different Initializations", arXiv:2403.00986; built on ZipIt!,
Stoica et al. 2023, "ZipIt! Merging Models from Different Tasks without Training", arXiv:2305.03053).

`align(a, b)` (or `align(AlignSpec(a, b, ...))`: one request as a value, `spec`) runs both models on
the same text, correlates their hidden units at every site (`features`), matches them with Hungarian
solves (`match`) and writes B permuted into A's basis (`permute`). Averaging or interpolating A with
that copy (`merging_core.merge`, `merging_core.curve`) is then a merge of aligned models; with a
function-preserving setting the copy computes exactly what B computes. With `method="zip"` it writes the
ZipIt merge of A and B instead, from each feature space's merge and unmerge matrices (`zip`: permutation
alignment is the special case M = [I/2, P/2], U = [I; Pᵀ]; a share `zip_same` of same-model pairs makes
it more), the MLM decoder unmerged so the logits stay in vocabulary order. `tokens` caps the activations'
data amount (Verma & Elbayad, Sec. 6: how much data the statistics need).

Every stage reports progress with its name, counts and the time left ("activations: batch 3/16, ~40 s
left", "matching: ff.2 (5/18)", "writing: ..."), often enough (a transformer layer, a site's sums, one
Hungarian solve) that a callback raising `merging_core.progress.Cancelled` stops a run within moments.
Decoders (GPT-2, the Llama layout) are aligned on their own sites and symmetries (`decoder_match`).
Alignment is for models trained from different initializations: when A and B share one (two fine-tunes
of one pretrained model), the summary's `notes` say so (`origin`), as they do when the permutation found
leaves nearly every unit in place.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import settings
from ..arch import require
from ..checkpoint import check_compatible, open_checkpoint
from ..encode import encode
from ..errors import MergeLabError, writing
from ..models import load
from ..outputs import check_out
from ..progress import Cancelled, ProgressFn, scaled, track, with_eta
from ..tasks import get_task
from .decoder_match import match_decoder
from .decoders import DecoderPermutation, HeadOrder, supports
from .features import correlations
from .match import ATTENTION, MERGE_TYPES, RESIDUAL, Matching, find_permutation
from .origin import initialization_note
from .permute import (
    KINDS,
    Permutation,
    permute_checkpoint,
    permute_state,
    random_permutation,
    write_permuted,
    write_state,
)
from .spec import METHODS, AlignSpec
from .zip import Zip, from_groups, unmerge_state, zip_state, zips_for

SEED = 0  # which text examples are read
ALIGNMENT = "alignment"  # the subfolder of an aligned model that records how it was aligned
IN_PLACE = 0.9  # a permutation that keeps this share of units in place: A and B likely share an initialization
# Each stage's share of a run's progress: loading and reading the text, activations, matching, writing.
STAGES = {"loading": (0.0, 0.05), "activations": (0.05, 0.8), "matching": (0.8, 0.95), "writing": (0.95, 1.0)}


def in_place_note(matching: Matching) -> str | None:
    """A note when the permutation keeps at least `IN_PLACE` of the units it orders where they were."""
    kept, total = matching.permutation.in_place()
    if not total or kept / total < IN_PLACE:
        return None
    return (f"the permutation keeps {kept / total:.0%} of units in place: A and B likely share an initialization; "
            "alignment changes little")


@dataclass
class Alignment:
    """What `align` found: B's permutation, the correlations it came from, where B permuted was written."""

    a: str
    b: str
    matching: Matching
    correlations: dict[str, torch.Tensor]  # site -> A units x B units, before alignment
    out: Path
    text: dict
    seconds: dict[str, float]
    spec: AlignSpec | None = None  # the request it answers (None: written before specs were recorded)
    notes: list[str] = field(default_factory=list)  # e.g. A and B share an initialization
    zips: dict[str, Zip] | None = None  # method zip: every feature space's merge and unmerge matrices

    def order(self, site: str) -> torch.Tensor | None:
        """The order applied to B's units at a correlation site (None: left as they are)."""
        if isinstance(self.matching.permutation, DecoderPermutation):
            return self.matching.permutation.order_at(site)
        perm, (kind, _, rest) = self.matching.permutation, site.partition(".")
        layer = int(rest.split(".")[0]) if kind in ("ff", "attn", "qk") else None
        return {"ff": perm.ff.get(layer), "attn": perm.vo.get(layer), "qk": perm.qk.get(layer),
                "res": perm.site(rest)}.get(kind)

    def aligned(self, site: str) -> torch.Tensor:
        """The site's correlations with B's units in their new order (the diagonal: matched pairs)."""
        order = self.order(site)
        corr = self.correlations[site]
        return corr if order is None else corr[:, order]

    def heatmaps(self, site: str, size: int = 64) -> dict:
        """Plain lists for a view: the first `size` units' correlations before and after alignment, the
        matched pairs among them, and the layer's head-matching cost when the site has one."""
        if site not in self.correlations:
            raise MergeLabError(f"no correlation site {site!r}; sites: {', '.join(self.correlations)}", param="site")
        corr, after = self.correlations[site], self.aligned(site)
        n = min(size, corr.shape[0])
        order = self.order(site)
        matches = [(i, int(order[i])) for i in range(n) if int(order[i]) < n] if order is not None else []
        layer = int(site.split(".")[1]) if site.startswith("attn.") else None
        cost = self.matching.head_costs.get(layer) if layer is not None else None
        return {"site": site, "units": corr.shape[0], "shown": n, "before": corr[:n, :n].tolist(),
                "after": after[:n, :n].tolist(), "matches": matches, "permuted": order is not None,
                "mean_before": float(corr.diagonal().mean()), "mean_after": float(after.diagonal().mean()),
                "head_cost": cost.tolist() if cost is not None else None,
                "head_order": self.matching.head_orders[layer].tolist() if layer in self.matching.head_orders else None}

    def summary(self) -> dict:
        """Settings, timings and, per site, the mean correlation of unit i of A with unit i of B
        before and after the permutation; `spec`: the request (`AlignSpec.to_dict`), to re-create the run;
        `notes`: sentences for people (e.g. A and B share an initialization, so alignment changes little)."""
        sites = {}
        for site, corr in self.correlations.items():
            before = float(corr.diagonal().mean())
            sites[site] = {"before": before, "after": float(self.aligned(site).diagonal().mean()),
                           "permuted": self.order(site) is not None}
        m = self.matching
        zipped = None
        if self.zips is not None:  # pairs over every space, each shared residual Zip counted once
            zipped = {"a-b": 0, "a-a": 0, "b-b": 0}
            for z in {id(z): z for z in self.zips.values()}.values():
                for kind, count in z.pairs().items():
                    zipped[kind] += count
        return {"a": self.a, "b": self.b, "out": str(self.out), "method": self.spec.method if self.spec else "permute",
                "decoder": isinstance(m.permutation, DecoderPermutation),
                "zip_pairs": zipped, "merge_type": m.merge_type, "attention": m.attention,
                "residual": m.residual, "qk": m.qk, "function_preserving": m.function_preserving, "text": self.text,
                "seconds": self.seconds, "sites": sites,
                "head_costs": {str(layer): cost.tolist() for layer, cost in m.head_costs.items()},
                "head_orders": {str(layer): order.tolist() for layer, order in m.head_orders.items()},
                "spec": self.spec.to_dict() if self.spec is not None else None, "notes": list(self.notes)}


def text_batches(task: str, split: str, tokenizer, examples: int, batch_size: int, device, *,
                 max_length: int = 128) -> list[dict]:
    """A seeded random subset of a task split's inputs, unmasked, in padded batches on the device (at most
    `max_length` tokens each: a model with fewer positions reads shorter blocks)."""
    spec = get_task(task)
    encoded = encode(spec, split, tokenizer, max_length)
    index = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(SEED))[:examples]
    pad = tokenizer.pad_token_id or 0
    return [{k: v.to(device) for k, v in encoded.batch(index[i: i + batch_size], pad).items()}
            for i in range(0, len(index), batch_size)]


def align(a: str | AlignSpec, b: str | None = None, *, merge_type: str = AlignSpec.merge_type,
          attention: str = AlignSpec.attention, residual: str = AlignSpec.residual, qk: bool = AlignSpec.qk,
          text: str = AlignSpec.text, split: str = AlignSpec.split, examples: int = AlignSpec.examples,
          batch_size: int = AlignSpec.batch_size, tokens: int = AlignSpec.tokens, method: str = AlignSpec.method,
          zip_same: float = AlignSpec.zip_same, out: str | Path | None = None, overwrite: bool = False,
          progress: ProgressFn | None = None) -> Alignment:
    """Align model B to model A and write B permuted into A's basis (see the module doc).

    `merge_type` picks what is permuted (`MERGE_TYPES`), `attention` and `residual` how those sites are
    matched, `qk` a separate order for Q and K; the features come from `examples` inputs of `text`'s
    `split` (`tokens` > 0: their first `tokens` tokens only). `method="zip"` writes the ZipIt merge of A
    and B (`zip_same`: the share of same-model pairs) instead of B permuted. These make one `AlignSpec`; an
    `AlignSpec` may be given instead, as the first argument. `out` receives B permuted (or the zipped
    model; an HF folder) and, in `out/alignment/`, `permutation.safetensors`, `correlations.safetensors`,
    `alignment.json` (which records the spec) and, for zip, `zip.safetensors` (each space's pairs); by
    default a new folder under $MERGELAB_HOME/aligned.
    """
    options = {"merge_type": merge_type, "attention": attention, "residual": residual, "qk": qk, "text": text,
               "split": split, "examples": examples, "batch_size": batch_size, "tokens": tokens, "method": method,
               "zip_same": zip_same}
    if isinstance(a, AlignSpec):
        given = [name for name, value in options.items() if value != getattr(AlignSpec, name)]
        if b is not None or given:
            raise TypeError(f"align(spec): the spec holds the options; got {'b' if b is not None else given[0]} too")
        spec = a
    else:
        spec = AlignSpec(a, b, **options)
    return _run(spec, out=out, overwrite=overwrite, progress=progress)


def _blaming(param: str, fn, *args):
    """fn(*args), with a bad input blamed on this alignment's `param` (the checkpoint layer says "models")."""
    try:
        return fn(*args)
    except MergeLabError as exc:
        if exc.param not in (None, "model", "models"):
            raise
        raise MergeLabError(exc.message, param=param, hint=exc.hint) from exc


def _stage(progress: ProgressFn | None, name: str) -> ProgressFn | None:
    """One stage's own 0..1 progress, its descriptions prefixed with its name and ended with its time left."""
    start, end = STAGES[name]
    return with_eta(scaled(progress, start, end, f"{name}: "))


def _finally(progress: ProgressFn | None) -> ProgressFn | None:
    """`progress` for reports made while writing or after it: a Stop pressed then no longer interrupts
    (what is being written is nearly done, and would be reported as not saved)."""
    if progress is None:
        return None

    def report(fraction: float, desc: str) -> None:
        try:
            progress(fraction, desc)
        except Cancelled:
            pass

    return report


def _run(spec: AlignSpec, *, out: str | Path | None, overwrite: bool, progress: ProgressFn | None) -> Alignment:
    """Features, matching, B written in A's basis, and the record of how (see `align`)."""
    target = Path(out) if out is not None else None
    if target is not None:
        check_out(target, overwrite)  # before minutes of work
    loading = scaled(progress, *STAGES["loading"], "loading: ")
    if loading:
        loading(0.0, "opening A and B")
    source_a, source_b = _blaming("a", open_checkpoint, spec.a), _blaming("b", open_checkpoint, spec.b)
    _blaming("b", check_compatible, [source_a, source_b], None)
    _blaming("a", require, source_a.config.model_type, "alignment", spec.a)
    decoder = supports(source_a.config.model_type)  # GPT-2, the Llama layout: `decoder_match`
    if decoder and spec.method == "zip":
        raise MergeLabError("ZipIt merges are for the BERT family so far; align decoders with method permute",
                            param="method")
    if source_b.ref.is_adapter:
        raise MergeLabError(f"model {spec.b!r} is an adapter module (LoRA, (IA)3); align full checkpoints", param="b")
    notes = [note for note in [initialization_note(source_a.ref, source_b.ref)] if note]
    config = source_b.config
    device = settings.device()
    timings = {}
    started = time.perf_counter()
    if loading:
        loading(0.1, "model A")
    model_a = load(spec.a, device=device).model
    if loading:
        loading(0.4, "model B")
    model_b = load(spec.b, device=device).model
    if loading:
        loading(0.7, f"text ({get_task(spec.text).name}, {spec.split}, {spec.examples} examples)")
    positions = config.get("n_positions") or config.get("max_position_embeddings") or 128
    batches = token_budget(text_batches(spec.text, spec.split, source_a.tokenizer, spec.examples, spec.batch_size,
                                        device, max_length=min(128, positions)), spec.tokens)
    cap, within = spec.tokens or None, spec.method == "zip" and spec.zip_same > 0
    if progress is None:  # a terminal: one bar over the batches
        corrs = correlations(model_a, model_b, track(batches, len(batches), "activations", None), total=len(batches),
                             max_tokens=cap, within=within)
    else:
        corrs = correlations(model_a, model_b, batches, progress=_stage(progress, "activations"), total=len(batches),
                             max_tokens=cap, within=within)
    timings["features"] = time.perf_counter() - started
    del model_a, model_b

    started = time.perf_counter()
    if decoder:
        matching = match_decoder(corrs, config, merge_type=spec.merge_type, attention=spec.attention,
                                 residual=spec.residual, qk=spec.qk, progress=_stage(progress, "matching"))
    else:
        matching = find_permutation(corrs, layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
                                    merge_type=spec.merge_type, attention=spec.attention, residual=spec.residual,
                                    qk=spec.qk, progress=_stage(progress, "matching"))
    timings["matching"] = time.perf_counter() - started
    notes += [note for note in [in_place_note(matching)] if note]

    started = time.perf_counter()
    if progress:  # the last moment a Stop ends the run: nothing is written yet
        progress(STAGES["writing"][0], "writing B in A's basis")
    writing_progress = _finally(scaled(progress, *STAGES["writing"], "writing: "))
    if target is None:
        root = settings.home() / "aligned"
        root.mkdir(parents=True, exist_ok=True)
        joined = "zip" if spec.method == "zip" else "to"
        stem = f"{Path(source_b.ref.name).name}-{joined}-{Path(source_a.ref.name).name}-{spec.merge_type}".replace("/", "_")
        target = Path(tempfile.mkdtemp(prefix=f"{stem}-", dir=root)) / "model"
    tokens_read = int(sum(int(x["attention_mask"].sum()) for x in batches))
    text_record = {"task": get_task(spec.text).name, "split": spec.split,
                   "examples": sum(len(x["input_ids"]) for x in batches),
                   "tokens": min(tokens_read, spec.tokens) if spec.tokens else tokens_read}
    zips = None
    if spec.method == "zip":
        zips = zips_for(matching, config, corrs, spec.zip_same)
        token_head = source_a.head.kind == "token"
        state = zip_state({n: source_a.get(n) for n in source_a.names}, {n: source_b.get(n) for n in source_b.names},
                          zips, model_type=config.model_type, token_head=token_head,
                          tied=bool(getattr(config, "tie_word_embeddings", True)))
        # no "base": a merge of two initializations is no fine-tune of either's base (no task vector)
        write_state(source_a, state, target, {"kind": "zipped", "zipped_from": [source_a.ref.spec, source_b.ref.spec],
                                              "alignment": spec.to_dict(), "text": text_record}, overwrite=overwrite)
    else:
        write_permuted(source_b, matching.permutation, target,
                       # no "base": B permuted is no fine-tune of B's base in weight space (no task vector)
                       {"kind": "aligned", "aligned_from": source_b.ref.spec, "aligned_to": source_a.ref.spec,
                        "alignment": spec.to_dict(), "text": text_record,
                        "function_preserving": matching.function_preserving}, overwrite=overwrite)
    if writing_progress:
        writing_progress(0.7, "the alignment record")
    timings["apply"] = time.perf_counter() - started
    corrs = {k: v for k, v in corrs.items() if ":" not in k}  # the same-model correlations served the matching only
    result = Alignment(spec.a, spec.b, matching, corrs, target, text_record,
                       {k: round(v, 3) for k, v in timings.items()}, spec, notes, zips)
    # a subfolder: a model folder's own *.safetensors files are all read as its weights
    record = target / ALIGNMENT
    with writing(record):
        record.mkdir()
        save_file(matching.permutation.tensors() or {"none": torch.zeros(0, dtype=torch.int64)},
                  record / "permutation.safetensors")
        save_file({k: v.contiguous() for k, v in corrs.items()}, record / "correlations.safetensors")
        if zips is not None:
            save_file({space: z.groups() for space, z in zips.items()}, record / "zip.safetensors")
        (record / "alignment.json").write_text(json.dumps(result.summary(), indent=2) + "\n")
    if writing_progress:
        writing_progress(1.0, "aligned")
    return result


def load_alignment(folder: str | Path) -> Alignment:
    """An alignment written by `align` (the aligned model's folder), to look at again without recomputing it."""
    model_folder = Path(folder)
    folder = model_folder / ALIGNMENT
    if not (folder / "alignment.json").is_file():
        raise MergeLabError(f"{model_folder} holds no alignment (no {ALIGNMENT}/alignment.json)", param="folder",
                            hint="name the output folder of an alignment")
    summary = json.loads((folder / "alignment.json").read_text())
    orders = load_file(folder / "permutation.safetensors")
    decoder = any(key.startswith("kv.") for key in orders) or summary.get("decoder", False)
    perm = DecoderPermutation.from_tensors(orders) if decoder else Permutation()
    for key, order in ({} if decoder else orders).items():
        kind, _, rest = key.partition(".")
        if kind in ("ff", "qk", "vo"):
            getattr(perm, kind)[int(rest)] = order
        elif kind == "residual" and rest:
            perm.residual = {**(perm.residual or {}), rest: order}
        elif kind == "residual":
            perm.residual = order
    matching = Matching(perm, summary["merge_type"], summary["attention"], summary["residual"], summary["qk"],
                        {int(k): torch.tensor(v) for k, v in summary["head_costs"].items()},
                        {int(k): torch.tensor(v) for k, v in summary["head_orders"].items()})
    spec = AlignSpec.from_dict(summary["spec"]) if summary.get("spec") else None
    zips = None
    if (folder / "zip.safetensors").is_file():
        zips = {space: from_groups(groups, len(groups)) for space, groups in load_file(folder / "zip.safetensors").items()}
    return Alignment(summary["a"], summary["b"], matching, load_file(folder / "correlations.safetensors"),
                     model_folder, summary["text"], summary["seconds"], spec, list(summary.get("notes") or []), zips)


def token_budget(batches: list[dict], tokens: int) -> list[dict]:
    """The batches whose non-padding tokens reach `tokens` (0: all of them): later ones are never read."""
    if not tokens:
        return batches
    kept, seen = [], 0
    for batch in batches:
        if seen >= tokens:
            break
        kept.append(batch)
        seen += int(batch["attention_mask"].sum())
    return kept


__all__ = ["ATTENTION", "KINDS", "MERGE_TYPES", "METHODS", "RESIDUAL", "AlignSpec", "Alignment", "DecoderPermutation",
           "HeadOrder", "Matching", "Permutation", "Zip", "align", "find_permutation", "in_place_note",
           "initialization_note", "load_alignment", "permute_checkpoint", "permute_state", "random_permutation",
           "text_batches", "token_budget", "unmerge_state", "write_permuted", "zip_state", "zips_for"]
