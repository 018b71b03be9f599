"""Merge and unmerge matrices: ZipIt's merge of two models' feature spaces (Stoica et al. 2023, "ZipIt!
Merging Models from Different Tasks without Training", arXiv:2305.03053, Sec. 4.1-4.3), as Verma & Elbayad
(2024, "Merging Text Transformer Models from Different Initializations", arXiv:2403.00986, Sec. 3) use it
for BERT.

For one feature space of width d (the feed-forward neurons of a layer, an attention layer's Q·K or V·O
rows, the residual stream), A's features x_A and B's x_B stack into z = [x_A; x_B] (2d). A **merge**
matrix M (d x 2d) makes the merged model's features, x_m = M z; an **unmerge** matrix U (2d x d) gives
each model's features back from them, z ≈ U x_m. A layer whose output lies in space O and input in space
I merges as

    W_m = M_O [W_A 0; 0 W_B] U_I = Σ_s M_O^s W_s U_I^s        (ZipIt Eq. 3; s = A, B; M^s, U^s their halves)

(biases and LayerNorm γ, β: b_m = Σ_s M^s b_s; the word, position and token-type embeddings, whose columns
are residual features: E_m = Σ_s E_s (M^s)ᵀ). The MLM decoder reads the residual stream and writes
vocabulary logits, which are not merged (M = [I/2, I/2] there), so it is **unmerged**:
dec_m = ½ Σ_s dec_s U^s, and the logits stay in vocabulary order (the paper's `--unmerge` evaluation of a
permuted output projection). BERT ties the decoder to the word embeddings; both formulas give the same
matrix because every merge matrix here is M = ½ Uᵀ (`check_tied`), so the tie survives the merge.

Permutation alignment is the special case M = [I/2, P/2], U = [I; Pᵀ] (P: B's order, `from_order`), where
W_m = (W_A + P_O W_B P_Iᵀ)/2 is the average of A and B permuted. ZipIt's matching (`zip_match`) may also
zip two features of the same model (the share `same`: at most ⌊same·d/2⌋ pairs per model), and U is then
no permutation's inverse. Every pair is averaged: M's rows hold ½ at a pair's two features, U's columns 1
there, so for every Zip

    M U = I_d,   (U M)² = U M   (U M: a projection onto the features a merge keeps: z = U M z iff the two
                                 features of every pair are equal),

and `unmerge_state` maps a merged model back to one model's basis (W_s = U_O^s W_m (U_I^s)⁺, with the
pseudo-inverse (U^s)⁺ = diag(1/count) U^sᵀ), which for a permutation returns B exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch import adapter_for
from ..errors import MergeLabError
from .match import Matching, match, residual_sites
from .permute import EMBEDDINGS, Permutation, _sites

TOLERANCE = 1e-5  # relative: the tied decoder and the unmerged one agree to float rounding


@dataclass(frozen=True)
class Zip:
    """One feature space's merge (d x 2d) and unmerge (2d x d) matrices; columns/rows 0..d-1 are A's
    features, d..2d-1 B's."""

    merge: torch.Tensor
    unmerge: torch.Tensor

    @property
    def width(self) -> int:
        return self.merge.shape[0]

    def part(self, side: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(M^s, d x d; U^s, d x d) of model `side` (0: A, 1: B)."""
        d = self.width
        return self.merge[:, side * d:(side + 1) * d], self.unmerge[side * d:(side + 1) * d]

    def groups(self) -> torch.Tensor:
        """(d, 2) int64: the two stacked features each merged feature averages (`from_groups` inverts it)."""
        return torch.nonzero(self.unmerge.T)[:, 1].reshape(self.width, 2)

    def pairs(self) -> dict[str, int]:
        """How many merged features zip A with B, A with A and B with B."""
        d, members = self.width, (self.unmerge > 0).T  # d x 2d: merged feature j holds these features
        in_a, in_b = members[:, :d].sum(1), members[:, d:].sum(1)
        return {"a-b": int(((in_a == 1) & (in_b == 1)).sum()), "a-a": int((in_a == 2).sum()),
                "b-b": int((in_b == 2).sum())}


def from_groups(groups: list[tuple[int, int]] | torch.Tensor, d: int) -> Zip:
    """The Zip that averages each pair (i, j) of stacked features (0..2d-1) into merged feature k, in order."""
    if len(groups) != d:
        raise ValueError(f"{len(groups)} pairs for {d} merged features")
    merge, unmerge = torch.zeros(d, 2 * d), torch.zeros(2 * d, d)
    for k, (i, j) in enumerate(groups.tolist() if isinstance(groups, torch.Tensor) else groups):
        merge[k, i] = merge[k, j] = 0.5
        unmerge[i, k] = unmerge[j, k] = 1.0
    if not torch.equal(unmerge.sum(1), torch.ones(2 * d)):
        raise ValueError("every feature must belong to exactly one pair")
    return Zip(merge, unmerge)


def from_order(order: torch.Tensor) -> Zip:
    """Permutation alignment as a Zip: merged feature i averages A's unit i with B's unit order[i]
    (M = [I/2, P/2], U = [I; Pᵀ] with P[i, order[i]] = 1)."""
    d = len(order)
    return from_groups([(i, d + int(order[i])) for i in range(d)], d)


def zip_match(cross: torch.Tensor, own_a: torch.Tensor | None = None, own_b: torch.Tensor | None = None,
              same: float = 0.0) -> Zip:
    """ZipIt's matching of one space from its correlations (A x B; A x A and B x B when `same` > 0).

    `same` = 0: the Hungarian solve of the cross correlations (permutation alignment, `from_order`).
    Otherwise ZipIt's greedy matching (Stoica et al. 2023, Sec. 4.3, Alg. 1): the most correlated free pair
    of the 2d features is zipped first, a pair of one model's features only while that model has fewer
    than ⌊same·d/2⌋ such pairs. Every perfect matching has as many A-A as B-B pairs, so the d merged
    features always take each feature once."""
    d = cross.shape[0]
    budget = int(same * d / 2)
    if budget == 0 or own_a is None or own_b is None:
        return from_order(match(cross))
    full = torch.zeros(2 * d, 2 * d, dtype=torch.float64)
    full[:d, :d], full[d:, d:], full[:d, d:], full[d:, :d] = own_a, own_b, cross, cross.T
    full.fill_diagonal_(float("-inf"))
    upper = torch.triu_indices(2 * d, 2 * d, offset=1)
    scores = full[upper[0], upper[1]]
    order = torch.argsort(scores, descending=True, stable=True)
    pairs_i, pairs_j = upper[0][order].tolist(), upper[1][order].tolist()
    free = [True] * (2 * d)
    used = [0, 0]
    groups: list[tuple[int, int]] = []
    for i, j in zip(pairs_i, pairs_j):
        if not (free[i] and free[j]):
            continue
        side_i, side_j = i >= d, j >= d
        if side_i == side_j:
            if used[side_i] >= budget:
                continue
            used[side_i] += 1
        free[i] = free[j] = False
        groups.append((i, j))
        if len(groups) == d:
            break
    # merged features in A's order where they hold one of A's units, the B-B pairs after them
    groups.sort(key=lambda g: (g[0] >= d, g[0]))
    return from_groups(groups, d)


def _identity(d: int) -> Zip:
    return from_order(torch.arange(d))


def zips_for(matching: Matching, config, corrs: dict[str, torch.Tensor] | None = None,
             same: float = 0.0) -> dict[str, Zip]:
    """Every feature space's Zip for a matching (`ff.<l>`, `qk.<l>`, `vo.<l>`, `res.<site>`): the orders it
    found as permutation Zips, identity (plain averaging) where it permutes nothing, and, with `same` > 0
    and `corrs` from `features.correlations(..., within=True)`, ZipIt's matching with same-model pairs for
    the feed-forward and residual spaces it permutes (attention keeps its head-structured orders: a
    same-model pair across heads would mix the softmaxes)."""
    perm: Permutation = matching.permutation
    layers, hidden = config.num_hidden_layers, config.hidden_size
    zips: dict[str, Zip] = {}
    for layer in range(layers):
        order = perm.ff.get(layer)
        if order is not None and same and corrs is not None:
            site = f"ff.{layer}"
            zips[site] = zip_match(corrs[site], corrs[f"{site}:aa"], corrs[f"{site}:bb"], same)
        else:
            zips[f"ff.{layer}"] = from_order(order) if order is not None else _identity(config.intermediate_size)
        for kind in ("qk", "vo"):
            order = getattr(perm, kind).get(layer)
            zips[f"{kind}.{layer}"] = from_order(order) if order is not None else _identity(hidden)
    sites = residual_sites(layers)
    if perm.residual is None:
        shared = _identity(hidden)
        zips.update({f"res.{site}": shared for site in sites})
    elif isinstance(perm.residual, dict):  # sep: one per site
        for site in sites:
            if same and corrs is not None:
                key = f"res.{site}"
                zips[key] = zip_match(corrs[key], corrs[f"{key}:aa"], corrs[f"{key}:bb"], same)
            else:
                zips[f"res.{site}"] = from_order(perm.residual[site])
    else:
        if same and corrs is not None:
            used = {"first": sites[:1], "last": sites[-1:], "all": sites}[matching.residual]
            mean = {k: torch.stack([corrs[f"res.{s}{k}"] for s in used]).mean(0) for k in ("", ":aa", ":bb")}
            shared = zip_match(mean[""], mean[":aa"], mean[":bb"], same)
        else:
            shared = from_order(perm.residual)
        zips.update({f"res.{site}": shared for site in sites})
    return zips


def _layout(name: str, role: str, layer: int | None, last: int, token_head: bool, dims: int
            ) -> tuple[str, str | None, str | None]:
    """(how the tensor holds features, its output space, its input space) for one canonical parameter.
    Layouts: `matrix` (rows: output features, columns: input features), `vector` (output features),
    `columns` (an embedding table: the last dimension holds residual features), `decoder` (the MLM
    decoder: rows are vocabulary logits, columns residual features)."""
    reads, writes = _sites(role, layer, last)
    if role == "classifier" and not token_head:
        reads = None  # a sequence classifier reads the pooled output
    res = (lambda site: f"res.{site}" if site is not None else None)
    own = {"ff_in": f"ff.{layer}", "query": f"qk.{layer}", "key": f"qk.{layer}", "value": f"vo.{layer}"}.get(role)
    inner = {"ff_out": f"ff.{layer}", "attn_out": f"vo.{layer}"}.get(role)
    if role in EMBEDDINGS and role != "ln_embeddings":
        return "columns", res(writes), None
    if role in ("ln_embeddings", "ln_attn", "ln_ff", "mlm_layer_norm"):
        return "vector", res(writes), None
    if role == "mlm_decoder":
        return ("decoder" if dims == 2 else "vector"), None, res(reads)
    out = own or res(writes)
    if dims == 1 or not name.endswith("weight"):
        return "vector", out, None
    return "matrix", out, inner or res(reads)


def _left_inverse(unmerge_part: torch.Tensor) -> torch.Tensor:
    """(U^s)⁺ for a 0/1 unmerge half with one 1 per row: diag(1/count) U^sᵀ (0 for a merged feature that
    holds none of this model's features); exactly Pᵀ's inverse P for a permutation."""
    count = unmerge_part.sum(0)
    return unmerge_part.T / count.clamp_min(1)[:, None]


def zip_state(state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor], zips: dict[str, Zip], *,
              model_type: str = "bert", token_head: bool = False, tied: bool = True) -> dict[str, torch.Tensor]:
    """The merged canonical state dict W_m = Σ_s M_O^s W_s U_I^s of two models (see the module doc).
    With `tied` (the decoder shares the word embeddings' tensor) the unmerged decoder is checked against
    the merged embeddings (`check_tied`)."""
    if state_a.keys() != state_b.keys():
        raise MergeLabError("A and B hold different parameters; zip models of one architecture", param="b")
    adapter = adapter_for(model_type)
    infos = {name: adapter.describe(name) for name in state_a}
    last = max((i.layer for i in infos.values() if i.layer is not None), default=0)
    out = {}
    for name, ta in state_a.items():
        info, tb = infos[name], state_b[name]
        if info.group == "buffer" or not ta.is_floating_point():
            out[name] = ta
            continue
        layout, space_out, space_in = _layout(name, info.role, info.layer, last, token_head, ta.dim())
        merged = torch.zeros_like(ta, dtype=torch.float32)
        for side, t in enumerate((ta, tb)):
            t = t.float()
            m_out = zips[space_out].part(side)[0] if space_out else None
            u_in = zips[space_in].part(side)[1] if space_in else None
            if layout == "columns":
                part = t @ m_out.T
            elif layout == "vector":
                part = m_out @ t if m_out is not None else 0.5 * t
            elif layout == "decoder":  # vocabulary rows are not merged (½ each); the columns are unmerged
                part = 0.5 * (t @ u_in)
            else:
                part = m_out @ t if m_out is not None else 0.5 * t
                part = part @ u_in if u_in is not None else part
            merged += part
        out[name] = merged.to(ta.dtype).contiguous()
    if tied:
        check_tied(state_a, state_b, zips, out, model_type=model_type)
    return out


def check_tied(state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor], zips: dict[str, Zip],
               merged: dict[str, torch.Tensor], *, model_type: str = "bert") -> torch.Tensor:
    """The unmerged MLM decoder ½ Σ_s E_s U^s (the paper's `--unmerge` output projection) of a model whose
    decoder is tied to its word embeddings E, checked equal to the merged embeddings Σ_s E_s (M^s)ᵀ that
    the tie makes it read: the tie holds after the merge. Returns the unmerged decoder."""
    adapter = adapter_for(model_type)
    word = next((n for n in state_a if adapter.describe(n).role == "word"), None)
    if word is None:
        raise MergeLabError("the models have no word embeddings to tie a decoder to", param="a")
    space = zips["res.embeddings"]
    decoder = sum(0.5 * (s[word].float() @ space.part(side)[1]) for side, s in enumerate((state_a, state_b)))
    scale = float(merged[word].abs().max()) or 1.0
    if float((decoder - merged[word].float()).abs().max()) > TOLERANCE * scale:
        raise RuntimeError("the unmerged decoder differs from the merged word embeddings it is tied to")
    return decoder


def unmerge_state(merged: dict[str, torch.Tensor], zips: dict[str, Zip], side: int, *, model_type: str = "bert",
                  token_head: bool = False) -> dict[str, torch.Tensor]:
    """A merged model mapped back to model `side`'s basis (0: A, 1: B): W_s = U_O^s W_m (U_I^s)⁺,
    b_s = U_O^s b_m, E_s = E_m (U^s)ᵀ. After merging a model with a permuted copy of itself this returns
    each one exactly (up to float rounding)."""
    if side not in (0, 1):
        raise MergeLabError(f"side must be 0 (A) or 1 (B), got {side!r}", param="side")
    adapter = adapter_for(model_type)
    infos = {name: adapter.describe(name) for name in merged}
    last = max((i.layer for i in infos.values() if i.layer is not None), default=0)
    out = {}
    for name, t in merged.items():
        info = infos[name]
        if info.group == "buffer" or not t.is_floating_point():
            out[name] = t
            continue
        layout, space_out, space_in = _layout(name, info.role, info.layer, last, token_head, t.dim())
        u_out = zips[space_out].part(side)[1] if space_out else None
        back_in = _left_inverse(zips[space_in].part(side)[1]) if space_in else None
        x = t.float()
        if layout == "columns":
            x = x @ u_out.T
        elif layout == "vector":
            x = u_out @ x if u_out is not None else x
        elif layout == "decoder":
            x = x @ back_in
        else:
            x = u_out @ x if u_out is not None else x
            x = x @ back_in if back_in is not None else x
        out[name] = x.to(t.dtype).contiguous()
    return out


__all__ = ["Zip", "check_tied", "from_groups", "from_order", "unmerge_state", "zip_match", "zip_state",
           "zips_for"]
