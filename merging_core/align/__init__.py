"""Permutation alignment of checkpoints trained from different initializations (Verma & Elbayad 2024,
on ZipIt!; algorithms.md A6). `permute` applies function-preserving permutations to a checkpoint."""

from .permute import KINDS, Permutation, permute_checkpoint, permute_state, random_permutation

__all__ = ["KINDS", "Permutation", "permute_checkpoint", "permute_state", "random_permutation"]
