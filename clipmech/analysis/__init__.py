"""Representation and causal analyses of CLIP models (CKA, embeddings, SAEs, feature sharing, circuits).

Kept import-light: submodules are imported where used (`from clipmech.analysis.cka import cka`).
"""
