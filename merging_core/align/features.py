"""Cross-correlations of two models' hidden units on the same text (ZipIt!, Stoica et al. 2023, "ZipIt!
Merging Models from Different Tasks without Training", arXiv:2305.03053; Verma & Elbayad 2024, "Merging
Text Transformer Models from Different Initializations", arXiv:2403.00986, Sec. 3).

Both models read the same batches; forward hooks capture, at every matching site, the features of
every non-padding token ([CLS] and [SEP] included):

- `ff.<l>`: the inputs of `output.dense` (the feed-forward neurons after the activation);
- `attn.<l>`: the inputs of `attention.output.dense` (the heads' outputs, concatenated: V's side);
- `qk.<l>`: the outputs of `query` and of `key` (for a separate Q/K order: the mean of their correlations);
- `res.embeddings`, `res.attn.<l>`, `res.ff.<l>`: the LayerNorm outputs that close each residual site.

A decoder's sites are its own (`decoder_match`: the MLP's and the attention's output projections' inputs,
the norms' outputs).

Streaming sums (float64) give each site's Pearson correlation between A's unit i and B's unit j:
corr_ij = (E[a_i b_j] − E[a_i] E[b_j]) / (σ(a_i) σ(b_j)).

`within=True` also gives each model's own unit-unit correlations (`<site>:aa`, `<site>:bb`), which ZipIt's
matching needs to zip two features of one model. `max_tokens` caps the token rows the sums see (the
first ones in reading order): the data amount of Verma & Elbayad's ablation (Sec. 6, Fig. 6).
"""

from __future__ import annotations

from collections.abc import Iterable, Sized

import torch

from ..arch import canonical
from ..encode import model_inputs
from ..progress import ProgressFn
from .decoder_match import decoder_taps
from .decoders import supports


class _Sums:
    """Running sums over token rows of one site's features in A and B."""

    def __init__(self, width_a: int, width_b: int, device, within: bool = False):
        kwargs = {"dtype": torch.float64, "device": device}
        self.n = 0
        self.sum_a, self.sum_b = torch.zeros(width_a, **kwargs), torch.zeros(width_b, **kwargs)
        self.sq_a, self.sq_b = torch.zeros(width_a, **kwargs), torch.zeros(width_b, **kwargs)
        self.cross = torch.zeros(width_a, width_b, **kwargs)
        # each model's own Gram, only when asked (ZipIt's same-model pairs): it doubles the matrix work
        self.gram_a = torch.zeros(width_a, width_a, **kwargs) if within else None
        self.gram_b = torch.zeros(width_b, width_b, **kwargs) if within else None

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        # one batch's sums in float32 (a few thousand rows: ~1e-7 relative error, ~1.7x faster than
        # float64 on a CPU), accumulated over batches in float64
        a, b = a.float(), b.float()
        self.n += a.shape[0]
        self.sum_a += a.sum(0)
        self.sum_b += b.sum(0)
        self.sq_a += (a * a).sum(0)
        self.sq_b += (b * b).sum(0)
        self.cross += a.T @ b
        if self.gram_a is not None:
            self.gram_a += a.T @ a
            self.gram_b += b.T @ b

    @staticmethod
    def _pearson(cross, n, sum_x, sq_x, sum_y, sq_y) -> torch.Tensor:
        mean_x, mean_y = sum_x / n, sum_y / n
        std_x = (sq_x / n - mean_x ** 2).clamp_min(0).sqrt()
        std_y = (sq_y / n - mean_y ** 2).clamp_min(0).sqrt()
        covariance = cross / n - mean_x[:, None] * mean_y[None, :]
        # a dead unit (σ = 0) correlates with nothing: 0, not NaN
        return (covariance / (std_x[:, None] * std_y[None, :]).clamp_min(1e-12)).float().cpu()

    def correlation(self) -> torch.Tensor:
        return self._pearson(self.cross, max(self.n, 1), self.sum_a, self.sq_a, self.sum_b, self.sq_b)

    def own(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each model's unit-unit correlations (A x A, B x B); needs `within`."""
        n = max(self.n, 1)
        return (self._pearson(self.gram_a, n, self.sum_a, self.sq_a, self.sum_a, self.sq_a),
                self._pearson(self.gram_b, n, self.sum_b, self.sq_b, self.sum_b, self.sq_b))


def _taps(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, str]]:
    """site -> (module, "input" | "output") of a BERT-family model, or of a decoder (`decoder_match`)."""
    if supports(model.config.model_type):
        return decoder_taps(model)
    taps: dict[str, tuple[torch.nn.Module, str]] = {}
    model_type = model.config.model_type
    for name, module in model.named_modules():
        key = canonical(name, model_type)
        parts = key.split(".")
        if key == "embeddings.LayerNorm":
            taps["res.embeddings"] = (module, "output")
        elif len(parts) >= 3 and parts[0] == "encoder" and parts[1] == "layer":
            layer, rest = parts[2], ".".join(parts[3:])
            site = {"output.dense": (f"ff.{layer}", "input"), "attention.output.dense": (f"attn.{layer}", "input"),
                    "attention.self.query": (f"qk.{layer}.q", "output"),
                    "attention.self.key": (f"qk.{layer}.k", "output"),
                    "attention.output.LayerNorm": (f"res.attn.{layer}", "output"),
                    "output.LayerNorm": (f"res.ff.{layer}", "output")}.get(rest)
            if site:
                taps[site[0]] = (module, site[1])
    return taps


def _layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer layers of a BERT-family model (`encoder.layer.<l>`), in order; a decoder's MLP output
    projections (one per layer: what progress counts)."""
    if supports(model.config.model_type):
        taps = decoder_taps(model)
        return [taps[site][0] for site in sorted((s for s in taps if s.startswith("ff.")),
                                                 key=lambda s: int(s.split(".")[1]))]
    model_type = model.config.model_type
    found = {}
    for name, module in model.named_modules():
        parts = canonical(name, model_type).split(".")
        if len(parts) == 3 and parts[:2] == ["encoder", "layer"] and parts[2].isdigit():
            found[int(parts[2])] = module
    return [found[i] for i in sorted(found)]


@torch.inference_mode()
def correlations(model_a: torch.nn.Module, model_b: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                 progress: ProgressFn | None = None, total: int | None = None, *, max_tokens: int | None = None,
                 within: bool = False) -> dict[str, torch.Tensor]:
    """{site: corr (units of A x units of B)} over the non-padding tokens of `batches` (see the module doc).
    `qk.<l>` is the mean of the query and key correlations. `max_tokens`: only the first this many
    non-padding tokens count (later batches are not read); `within`: also `<site>:aa` and `<site>:bb`, each
    model's own unit-unit correlations, for every site but `qk`.

    `progress` hears ("batch i/n") after every transformer layer of either model and after every site's
    sums, a fraction of a second of work each even for a large model on a CPU, so a callback that raises
    (`merging_core.progress.Cancelled`) stops the pass within moments. `total`: the number of batches
    (default: `len(batches)`)."""
    if total is None:
        total = len(batches) if isinstance(batches, Sized) else 0
    taps_a, taps_b = _taps(model_a), _taps(model_b)
    captured: dict[str, list[torch.Tensor | None]] = {site: [None, None] for site in taps_a}
    handles = []
    for side, taps in enumerate((taps_a, taps_b)):
        for site, (module, where) in taps.items():
            def hook(mod, inputs, output, site=site, side=side, where=where):
                captured[site][side] = (inputs[0] if where == "input" else output).detach()
            handles.append(module.register_forward_hook(hook))
    layers = _layers(model_a) + _layers(model_b)
    steps = max(len(layers) + len(captured), 1)  # per batch: every layer of A and B, then every site's sums
    position = {"batch": 0, "step": 0}

    def tick() -> None:
        if progress is None:
            return
        position["step"] += 1
        i = position["batch"]
        done = (i + min(position["step"], steps) / steps) / total if total else 0.0
        progress(min(done, 1.0), f"batch {i + 1}/{total}" if total else f"batch {i + 1}")

    handles += [layer.register_forward_hook(lambda *_: tick()) for layer in layers]
    sums: dict[str, _Sums] = {}
    seen = 0
    try:
        for i, batch in enumerate(batches):
            if max_tokens is not None and seen >= max_tokens:
                break
            position["batch"], position["step"] = i, 0
            if progress is not None:
                progress(i / total if total else 0.0, f"batch {i + 1}/{total}" if total else f"batch {i + 1}")
            mask = batch["attention_mask"].bool()
            # the inputs each family takes (GPT-2 would embed token type ids as words: `model_inputs`)
            model_a.base_model(**model_inputs(batch, model_a.config))
            model_b.base_model(**model_inputs(batch, model_b.config))
            keep = int(mask.sum()) if max_tokens is None else min(int(mask.sum()), max_tokens - seen)
            seen += keep
            for site, (a, b) in captured.items():
                rows_a, rows_b = a[mask][:keep], b[mask][:keep]  # non-padding tokens only, within the budget
                if site not in sums:
                    sums[site] = _Sums(rows_a.shape[-1], rows_b.shape[-1], rows_a.device,
                                       within=within and not site.startswith("qk."))
                sums[site].add(rows_a, rows_b)
                tick()
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, (site, s) in enumerate(sums.items()):
        if progress is not None:
            progress(1.0, f"correlations ({n + 1}/{len(sums)} sites)")
        if not site.startswith("qk."):
            out[site] = s.correlation()
            if s.gram_a is not None:
                out[f"{site}:aa"], out[f"{site}:bb"] = s.own()
    for site in [s for s in sums if s.endswith(".q")]:
        layer = site.split(".")[1]
        out[f"qk.{layer}"] = (sums[site].correlation() + sums[f"qk.{layer}.k"].correlation()) / 2
    return out
