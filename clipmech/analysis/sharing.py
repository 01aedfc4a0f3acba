"""SAE feature sharing between domains (Algorithms 1-2) and concept naming (docs/methods.md#feature-sharing).

Alg. 1: for each class k and domain d, a histogram over latents counting how often each latent is
among the `top` (20) largest *positive* codes of an image of (k, d).
Alg. 2: overlap_K(Ha, Hb) = |topK(Ha) & topK(Hb)| / K; share_k(a, b) = mean over K in ks of overlap_K;
M = mean over classes of share_k; score(d*) = mean over b != d* of M[d*, b].

Deliberate choices where the paper leaves ties "arbitrary": histogram top-K breaks ties by the lower
latent index (deterministic), and latents with a zero count are never part of a top-K, so two domains
cannot "share" a latent that fired for neither. A class missing in a domain is left out of that
domain pair's mean (counted in the output). Works on codes of any SAE, so on intermediate layers too.

Controls (issue 13): `require_sparse` refuses a dense SAE (L0 >= input width; with a dense code the
top-20 latents of an image are not its features). `match_latents` pairs the latents of two SAEs
(different seeds, same activations) one-to-one by decoder cosine (Hungarian algorithm,
scipy.optimize.linear_sum_assignment); `seed_ceiling` is the sharing of one (class, domain) cell with
itself across the two seeds on matched latents, `class_permuted_floor` the sharing of different
classes in the same domain pairs.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

DEFAULT_KS = (5, 10, 15, 20)


def top_latent_histograms(codes: torch.Tensor, class_idx: np.ndarray, domain_idx: np.ndarray,
                          classes: Sequence[int], n_domains: int, top: int = 20) -> torch.Tensor:
    """Alg. 1. codes (N, n_latents) SAE activations -> counts (len(classes), n_domains, n_latents), int64."""
    codes = torch.as_tensor(codes)
    class_idx, domain_idx = np.asarray(class_idx), np.asarray(domain_idx)
    if len(codes) != len(class_idx) or len(codes) != len(domain_idx):
        raise ValueError(f"codes has {len(codes)} rows but class_idx/domain_idx have {len(class_idx)}/{len(domain_idx)}")
    n_latents = codes.shape[1]
    top = min(top, n_latents)
    vals, idx = codes.topk(top, dim=1)
    hit = torch.zeros_like(codes, dtype=torch.int64).scatter(1, idx, (vals > 0).long())  # (N, n_latents)
    H = torch.zeros(len(classes), n_domains, n_latents, dtype=torch.int64)
    pos = {k: i for i, k in enumerate(classes)}
    for c, d in set(zip(class_idx.tolist(), domain_idx.tolist())):
        if c in pos:
            rows = torch.from_numpy(np.flatnonzero((class_idx == c) & (domain_idx == d)))
            H[pos[c], d] = hit[rows].sum(0)
    return H


def _top_set(h: torch.Tensor, K: int) -> set[int]:
    """Indices of the K largest counts, ties by lower index, zero counts excluded."""
    h = np.asarray(h)
    order = np.lexsort((np.arange(len(h)), -h))[:K]  # primary key: count descending; then index
    return {int(i) for i in order if h[i] > 0}


def overlap_at_k(Ha: torch.Tensor, Hb: torch.Tensor, K: int) -> float:
    """|topK(Ha) & topK(Hb)| / K for two latent histograms (n_latents,)."""
    if K <= 0:
        raise ValueError(f"K must be positive; got {K}")
    return len(_top_set(Ha, K) & _top_set(Hb, K)) / K


def feature_sharing(H: torch.Tensor, domains: Sequence[str], ks: Sequence[int] = DEFAULT_KS,
                    class_names: Sequence[str] | None = None) -> dict:
    """Alg. 2 on histograms H (C, D, n_latents). Returns a JSON-able dict with
    per_class (C, D, D) share matrices (None where a class is absent from a domain), matrix M (D, D)
    averaged over the classes present in both domains, n_classes (D, D) used, and score[d] = mean over
    b != d of M[d, b] (the test-domain score when d = d*)."""
    C, D, _ = H.shape
    if D != len(domains):
        raise ValueError(f"H has {D} domains but {len(domains)} domain names were given")
    present = H.sum(-1) > 0  # (C, D)
    per_class = np.full((C, D, D), np.nan)
    for c in range(C):
        tops = {d: {K: _top_set(H[c, d], K) for K in ks} for d in range(D) if present[c, d]}
        for a in tops:
            for b in tops:
                per_class[c, a, b] = np.mean([len(tops[a][K] & tops[b][K]) / K for K in ks])
    counts = (~np.isnan(per_class)).sum(0)
    M = np.where(counts > 0, np.nansum(per_class, 0) / np.maximum(counts, 1), np.nan)
    score = {}
    for d in range(D):
        others = [M[d, b] for b in range(D) if b != d and counts[d, b] > 0]
        score[domains[d]] = float(np.mean(others)) if others else None
    as_list = lambda A: [[None if np.isnan(v) else float(v) for v in row] for row in A]  # noqa: E731
    return {"domains": list(domains), "ks": list(ks), "classes": list(class_names) if class_names else list(range(C)),
            "matrix": as_list(M), "n_classes": counts.tolist(), "per_class": [as_list(P) for P in per_class],
            "score": score}


def require_sparse(l0: float, d_in: int, allow_dense: bool = False) -> None:
    """Raise unless the SAE is sparse: mean L0 (active latents per input) < d_in, its input width.
    `allow_dense` lets a dense SAE through (its sharing then measures something else)."""
    if l0 >= d_in and not allow_dense:
        raise ValueError(f"the SAE is dense: mean L0 {l0:.1f} >= its input width {d_in}, so an image's top "
                         "latents are not sparse features. Retrain it with the default (paper) L1 or a top-k SAE, "
                         "or pass allow_dense=True (CLI: --allow-dense) to compute sharing anyway")


def match_latents(dec_a: torch.Tensor, dec_b: torch.Tensor, threshold: float = 0.7) -> dict:
    """One-to-one matching of the latents of SAE a to those of SAE b maximising the summed decoder
    cosine (Hungarian algorithm). dec_a [La, d], dec_b [Lb, d] decoder rows. Returns {"a", "b"
    (matched index arrays, len min(La, Lb)), "cosine" per pair, "matched" (cosine >= threshold),
    "fraction_matched" (pairs over threshold / La), "threshold"}. Cost O(max(La, Lb)^3)."""
    if dec_a.shape[1] != dec_b.shape[1]:
        raise ValueError(f"decoder widths differ ({dec_a.shape[1]} vs {dec_b.shape[1]}); SAEs of different "
                         "activations cannot be matched")
    cos = (torch.nn.functional.normalize(dec_a.double(), dim=1) @ torch.nn.functional.normalize(dec_b.double(), dim=1).T)
    ia, ib = linear_sum_assignment(cos.numpy(), maximize=True)
    c = cos.numpy()[ia, ib]
    ok = c >= threshold
    return {"a": ia, "b": ib, "cosine": c, "matched": ok, "fraction_matched": float(ok.sum() / len(dec_a)),
            "threshold": threshold}


def _share(ha: torch.Tensor, hb: torch.Tensor, ks: Sequence[int]) -> float:
    return float(np.mean([overlap_at_k(ha, hb, K) for K in ks]))


def seed_ceiling(Ha: torch.Tensor, Hb: torch.Tensor, matching: dict, ks: Sequence[int] = DEFAULT_KS) -> np.ndarray:
    """Sharing of each (class, domain) cell with itself across two SAE seeds: histograms Ha (C, D, La)
    and Hb (C, D, Lb) restricted to latents matched above threshold, b's re-indexed as a's.
    Returns (C, D) shares, NaN where a cell has no image."""
    ia, ib = matching["a"][matching["matched"]], matching["b"][matching["matched"]]
    A = torch.zeros_like(Ha)
    B = torch.zeros_like(Ha)
    A[..., ia] = Ha[..., ia]
    B[..., ia] = Hb[..., ib]
    present = (Ha.sum(-1) > 0) & (Hb.sum(-1) > 0)
    out = np.full(present.shape, np.nan)
    for c, d in zip(*np.nonzero(present.numpy())):
        out[c, d] = _share(A[c, d], B[c, d], ks)
    return out


def pair_shares(H: torch.Tensor, d: int, ks: Sequence[int] = DEFAULT_KS, permuted: bool = False) -> np.ndarray:
    """Per class k, the mean over other domains b of share(H[k, d], H[k', b]) with k' = k (the score)
    or, `permuted`, over every k' != k (the class-permuted floor). Returns (C,), NaN where a class
    has no pair with images in both cells."""
    C, D, _ = H.shape
    present = (H.sum(-1) > 0).numpy()
    out = np.full(C, np.nan)
    for k in range(C):
        if not present[k, d]:
            continue
        others = [k2 for k2 in range(C) if k2 != k] if permuted else [k]
        vals = [_share(H[k, d], H[k2, b], ks) for k2 in others for b in range(D) if b != d and present[k2, b]]
        if vals:
            out[k] = float(np.mean(vals))
    return out


@torch.no_grad()
def name_latents(decoder: torch.Tensor, word_embeddings: torch.Tensor, words: Sequence[str]) -> list[dict]:
    """Name each latent by the word whose (normalised) embedding has maximal cosine with its decoder row.

    decoder (n_latents, d) rows live in the model's joint embedding space (SAE on the final image
    embedding); word_embeddings (V, d). Returns [{"latent", "word", "cosine"}] per latent.
    """
    if decoder.shape[1] != word_embeddings.shape[1]:
        raise ValueError(f"decoder width {decoder.shape[1]} != text embedding width {word_embeddings.shape[1]}: "
                         "concept naming needs an SAE trained on the joint embedding (e.g. hook_image_embed_normalized)")
    if len(words) != len(word_embeddings):
        raise ValueError(f"{len(words)} words but {len(word_embeddings)} embeddings")
    dec = torch.nn.functional.normalize(decoder.float(), dim=1)
    emb = torch.nn.functional.normalize(word_embeddings.float(), dim=1)
    cos, best = (dec @ emb.T).max(dim=1)
    return [{"latent": i, "word": words[j], "cosine": float(c)} for i, (j, c) in enumerate(zip(best.tolist(), cos))]


@torch.no_grad()
def embed_words(model, words: Sequence[str], template: str = "{}", batch_size: int = 256) -> torch.Tensor:
    """Embed words with the model's own text tower: (V, D) L2-normalised. `model` is a HookedCLIP."""
    out = []
    for s in range(0, len(words), batch_size):
        toks = model.tokenize([template.format(w) for w in words[s:s + batch_size]])
        out.append(model.encode_text(toks, normalize=True).float())
    return torch.cat(out)


def dataset_vocabulary(dataset) -> list[str]:
    """Built-in vocabulary: the dataset's class names, their keywords and the domain names (deduplicated,
    order kept). For the emoji data these are the CLDR names and keywords."""
    words: list[str] = []
    keywords = getattr(dataset, "keywords", None) or {}
    for c in dataset.classes:
        words.append(c)
        words.extend(keywords.get(c, []))
    words.extend(dataset.domains)
    seen: set[str] = set()
    return [w for w in words if not (w in seen or seen.add(w))]


def read_vocabulary(path) -> list[str]:
    """A concept vocabulary file: one word (or phrase) per line, blank lines and duplicates dropped,
    order kept (the paper: CLIP-Dissect's 20k English words, docs/methods.md#feature-sharing)."""
    from pathlib import Path
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary file {path} not found (one word per line)")
    seen: set[str] = set()
    words = [w for w in (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
             if w and not (w in seen or seen.add(w))]
    if not words:
        raise ValueError(f"vocabulary file {path} holds no words (one word per line)")
    return words


@torch.no_grad()
def name_latents_by_data(codes: torch.Tensor, class_idx: np.ndarray, domain_idx: np.ndarray, classes: Sequence[str],
                         domains: Sequence[str], top: int = 3) -> list[dict]:
    """Name latents of an SAE with no text space to compare with (an intermediate layer): per latent,
    the `top` classes and domains with the largest mean activation over their images.
    codes (N, n_latents); returns [{"latent", "classes", "domains", "mean_activation"}] per latent."""
    codes = torch.as_tensor(codes).float()
    class_idx, domain_idx = np.asarray(class_idx), np.asarray(domain_idx)
    if len(codes) != len(class_idx) or len(codes) != len(domain_idx):
        raise ValueError(f"codes has {len(codes)} rows but class_idx/domain_idx have {len(class_idx)}/{len(domain_idx)}")

    def group_means(groups: np.ndarray, n: int) -> torch.Tensor:
        key = torch.from_numpy(groups.astype(np.int64))
        sums = torch.zeros(n, codes.shape[1]).index_add_(0, key, codes)
        counts = torch.bincount(key, minlength=n).float()
        return torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], torch.tensor(float("-inf")))

    by_class, by_domain = group_means(class_idx, len(classes)), group_means(domain_idx, len(domains))
    tc = by_class.topk(min(top, len(classes)), dim=0)
    td = by_domain.topk(min(top, len(domains)), dim=0)
    return [{"latent": i, "classes": [classes[k] for k in tc.indices[:, i].tolist()],
             "domains": [domains[d] for d in td.indices[:, i].tolist()],
             "mean_activation": float(tc.values[0, i])} for i in range(codes.shape[1])]
