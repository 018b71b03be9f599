"""Whether two checkpoints share an initialization, from what they record (Verma & Elbayad 2024,
"Merging Text Transformer Models from Different Initializations", arXiv:2403.00986).

Permutation alignment is for models trained from different random initializations: their hidden units
compute similar features in another order. Two fine-tunes of one pretrained model (e.g. both from
MiniLM) already have corresponding units, so aligning them finds (nearly) the identity and changes
little. A checkpoint's origin is found by following the `base` its metadata records (the model it was
trained from, `merging_core.checkpoint.recorded_base`) back to one that records none: a pretrained model,
or one trained from a random initialization (`scratch:<size>`, `scratch-llama:<size>`, whose weights the
recorded seed decides).
A permuted or aligned copy is its own origin: its units no longer line up with its source's.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MergeLabError
from ..models import ModelRef, resolve
from ..scratch import is_scratch

_OWN_BASIS = ("aligned", "permuted", "zipped")  # kinds whose units were reordered: no longer in their source's basis
_DEPTH = 16  # how far a chain of bases is followed


def _key(ref: ModelRef) -> str:
    return str(Path(ref.location).resolve()) if ref.path is not None else ref.location


def _parent(meta: dict) -> ModelRef | None:
    """The model a checkpoint records as its base, when it can be found here."""
    location = meta.get("base_location")
    if isinstance(location, str) and location and (Path(location) / "config.json").is_file():
        return ModelRef(str(meta.get("base") or location), "local", location)
    try:
        return resolve(str(meta["base"]))
    except MergeLabError:
        return None


def origin(ref: ModelRef) -> tuple[str, str]:
    """(a key that is equal for checkpoints of one initialization, a label for people) of a checkpoint."""
    label, seen = ref.spec, set()
    for _ in range(_DEPTH):
        key = _key(ref)
        if key in seen:
            break
        seen.add(key)
        try:
            meta = ref.metadata()
        except MergeLabError:
            meta = {}
        base = meta.get("base")
        if not isinstance(base, str) or not base or meta.get("kind") in _OWN_BASIS:
            return key, ref.spec
        if is_scratch(base):  # a random initialization: the seed decides the weights
            seed = meta.get("seed")
            if seed is None:
                return key, ref.spec
            return f"{base}#seed={seed}", f"{base} with seed {seed} (the same random initialization)"
        parent = _parent(meta)
        if parent is None:  # a base not available here (e.g. a hub model offline): its name identifies it
            return f"spec:{base}", base
        ref, label = parent, base
    return _key(ref), label


def initialization_note(a: str | ModelRef, b: str | ModelRef) -> str | None:
    """A sentence saying that A and B share an initialization (so aligning them changes little), or None
    when they do not, as far as their recorded bases tell."""
    try:
        ref_a = a if isinstance(a, ModelRef) else resolve(a)
        ref_b = b if isinstance(b, ModelRef) else resolve(b)
    except MergeLabError:
        return None
    if _key(ref_a) == _key(ref_b):
        return ("A and B are the same model: its units already correspond to themselves, so alignment finds "
                "the identity and changes nothing")
    (key_a, label), (key_b, _) = origin(ref_a), origin(ref_b)
    if key_a != key_b:
        return None
    if key_a == _key(ref_a) or key_b == _key(ref_b):
        which, other = ("B", "A") if key_a == _key(ref_a) else ("A", "B")
        return (f"{which} was trained from {other}: their units already correspond, so alignment changes little "
                "(it is meant for models trained from different initializations)")
    return (f"A and B were both trained from {label}: they share an initialization, so their units already "
            "correspond and alignment changes little (it is meant for models trained from different "
            "initializations)")
