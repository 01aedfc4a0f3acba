"""Analyses of trained CLIP models: representational (activations, CKA, embeddings, SAEs, sharing)
and causal (patching, integrated gradients, circuits)."""
