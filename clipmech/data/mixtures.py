"""The paper's training mixtures (docs/methods.md#mixtures) for any DomainDataset.

For a test domain d* with held-out classes C2 (C1 = the rest):

    natural_only  natural domain, all classes, not subsampled          id lso-real-only
    cg_low        natural + d*[C1]                      (defines S)    id lso-rs-nosketchclasses
    cg_high       all domains, d* only C1               -> S           id lso-cipqrs-nosketchclasses
    lod           all domains but d*, all classes       -> S           id lso-cipqr-nosketchclasses
    pseudo_low    natural + d*, all classes             -> S           id ...-pseudo
    pseudo_high   all domains, all classes              -> S           id ...-pseudo

with S(d*) = |natural train| + |d* train [C1]|. `domains="LETTERS"` replaces the included domain
set (domain-interpolation mixtures), `allow_p` lets each C2 bucket of d* keep
ceil(p * rho_pseudo * n) images (cg setups), `aligned` switches to generic-term captions, and a
base image-text TSV is put in front, never subsampled.

Subsampling is deterministic and stratified (`stratified_keep`): every (domain, class) bucket keeps
its first ceil(rho * n) samples in file order with one shrink factor rho = S / |pool|, then the
ceil() overshoot is trimmed one sample per bucket, domains in the dataset's `trim_order`
(DomainNet: real, quickdraw, painting, sketch, infograph, clipart), classes in index order,
until exactly S remain. ceil() is computed in exact integer arithmetic (a float rho * n such as
0.1 * 30 = 3.0000000000000004 would otherwise round up spuriously).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from clipmech.data.captions import make_captions
from clipmech.data.dataset import DomainDataset
from clipmech.data.tsv import BaseLinesView, materialise_images, read_base_tsv, write_tsv

SETUPS = ("natural_only", "cg_low", "cg_high", "lod", "pseudo_low", "pseudo_high")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def stratified_keep(sizes: np.ndarray, target: int, trim_order: Sequence[int],
                    fixed: np.ndarray | None = None) -> np.ndarray:
    """How many samples each bucket keeps: int64[D, C] summing to exactly `target`.

    sizes: int[D, C] bucket sizes of the pool (0 = bucket not in the pool). fixed: int[D, C] or
    None; buckets with fixed[d, c] > 0 keep exactly that many (allow-p C2 buckets), the others
    share `target - fixed.sum()` with one factor rho, then are trimmed round-robin over
    `trim_order` (domain indices), classes in index order. Cost O(D * C).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    fixed = np.zeros_like(sizes) if fixed is None else np.asarray(fixed, dtype=np.int64)
    free = fixed == 0
    budget = target - int(fixed.sum())
    pool = int(sizes[free].sum())
    if budget < 0 or budget > pool:
        raise ValueError(f"cannot subsample a pool of {pool} samples (+{int(fixed.sum())} fixed) "
                         f"to {target}: the pool is too small")
    keep = np.where(free, 0, fixed)
    if pool:
        keep[free] = [_ceil_div(budget * int(n), pool) for n in sizes[free]]
    over = int(keep.sum()) - target
    # ceil() adds < 1 per bucket, so one round over the non-empty buckets always suffices
    while over > 0:
        for d in trim_order:
            for c in range(sizes.shape[1]):
                if free[d, c] and keep[d, c] > 0:
                    keep[d, c] -= 1
                    over -= 1
                    if over == 0:
                        return keep
    return keep


def allow_p_quota(p: float, S: int, pseudo_total: int, n: int, paper_compat: bool = False) -> int:
    """Samples an allow-p C2 bucket of n samples keeps: ceil(p * rho_pseudo * n) with
    rho_pseudo = S / pseudo_total, in exact rational arithmetic. paper_compat=True reproduces the
    paper code's float product math.ceil(p * rho * n), which rounds up when the float lands a hair
    above an integer (p = 0.1, rho = 1, n = 30: 3.0000000000000004 -> 4 instead of 3)."""
    if paper_compat:
        return math.ceil(p * (S / pseudo_total) * n)
    q = Fraction(str(p))
    return _ceil_div(q.numerator * S * n, q.denominator * pseudo_total)


def _shrink(budget: int, pool: int) -> float:
    return budget / pool if pool else 0.0


@dataclass
class Mixture:
    """A training (or validation) mixture: dataset samples + captions + optional base TSV lines.

    indices: np.int64 into `dataset` (file order); captions: one per index; base_lines: the
    base TSV's '<path>\\t<caption>' lines (kept verbatim, first in the TSV); extra_lines: other
    image-caption lines of the mixture itself (ImageNet-Sketch, `with_in_sketches`), written after
    the base; manifest: JSON-able.
    """
    dataset: DomainDataset
    indices: np.ndarray
    captions: list[str]
    manifest: dict
    id: str
    split: str = "train"
    base_lines: list[str] = field(default_factory=list)
    extra_lines: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.base_lines) + len(self.extra_lines) + len(self.indices)

    def counts(self) -> np.ndarray:
        """int64[D, C] dataset samples per (domain, class) in this mixture."""
        return self.dataset.counts(indices=self.indices)

    def filename(self) -> str:
        """The paper's TSV name (docs/methods.md#index-files): dn-captions-{train|val}-{ID}.tsv without a base,
        {cc3m|cc12m}-train-{ID}.tsv when the base TSV's file name starts with cc3m / cc12m, and
        combined-captions-{train|val}-{ID}.tsv with any other base (e.g. ImageNet-Captions)."""
        split = "val" if self.split == "test" else "train"
        base_name = Path((self.manifest.get("base") or {}).get("path", "")).name.lower()
        for web in ("cc12m", "cc3m"):
            if self.base_lines and base_name.startswith(web):
                return f"{web}-{split}-{self.id}.tsv"
        prefix = "dn" if self.dataset.name == "domainnet" else self.dataset.name
        kind = "combined" if self.base_lines else prefix
        return f"{kind}-captions-{split}-{self.id}.tsv"

    def torch_dataset(self, transform: Callable | None = None):
        """torch Dataset yielding (image, caption, class_idx, domain_idx); base and extra lines come
        first with class_idx = domain_idx = -1."""
        view = self.dataset.torch_dataset(transform, captions=self.captions, indices=self.indices)
        lines = self.base_lines + self.extra_lines
        if not lines:
            return view
        import torch.utils.data
        return torch.utils.data.ConcatDataset([BaseLinesView(lines, view.transform), view])

    def to_tsv(self, path: str | Path, image_dir: str | Path | None = None, manifest: bool = True) -> Path:
        """Write the open_clip_train TSV (header filepath\\ttitle, base, extra, then dataset lines)
        and, if `manifest`, the manifest next to it as <path minus .tsv>.json. In-memory images
        are written once as PNG under `image_dir` (default: <tsv folder>/<name>-images-<hash>/)."""
        ds, path = self.dataset, Path(path)
        if ds.sources is None:
            image_dir = Path(image_dir) if image_dir else path.parent / f"{ds.name}-images-{ds.content_hash()}"
            paths = materialise_images(ds, self.indices, image_dir)
        else:
            paths = [str(Path(ds.sources[int(i)]).resolve()) for i in self.indices]
        for cap in self.captions:
            if "\t" in cap or "\n" in cap:
                raise ValueError(f"caption {cap!r} contains a tab or newline; the TSV cannot hold it")
        lines = [*self.base_lines, *self.extra_lines, *(f"{p}\t{c}" for p, c in zip(paths, self.captions))]
        return write_tsv(lines, path, self.manifest if manifest else None)


def _resolve_classes(ds: DomainDataset, test_classes: Sequence[str | int] | str | None) -> list[int]:
    if test_classes is None:
        if not ds.default_test_classes:
            raise ValueError(f"dataset {ds.name!r} has no default test classes; pass test_classes=[...]")
        test_classes = ds.default_test_classes
    if isinstance(test_classes, str):
        test_classes = [c for c in test_classes.split(",") if c.strip()]
    idx = sorted({ds.class_index(c) for c in test_classes})
    if not idx:
        raise ValueError("test_classes is empty; C2 needs at least one class")
    return idx


def _included_domains(ds: DomainDataset, setup: str, d_star: int, domains: str | None) -> list[int]:
    natural = ds.domain_index(ds.natural_domain)
    if domains is not None:
        if setup == "natural_only":
            raise ValueError("domains= cannot be combined with setup 'natural_only'")
        letters = ds.domain_letters()
        bad = [ch for ch in domains if ch not in letters]
        if bad or not domains:
            raise ValueError(f"domains={domains!r}: letters {bad} are not domain initials; valid: "
                             + ", ".join(f"{k}={v}" for k, v in letters.items()))
        inc = sorted({ds.domain_index(letters[ch]) for ch in domains})
        if setup == "lod" and d_star in inc:
            raise ValueError(f"setup 'lod' leaves the test domain out; remove {ds.domains[d_star][0]!r} from domains")
        if setup != "lod" and d_star not in inc:
            raise ValueError(f"setup {setup!r} includes the test domain; add {ds.domains[d_star][0]!r} to domains")
        return inc
    all_d = list(range(len(ds.domains)))
    if setup == "natural_only":
        return [natural]
    if setup in ("cg_low", "pseudo_low"):
        return sorted({natural, d_star})
    return [d for d in all_d if d != d_star] if setup == "lod" else all_d


def mixture_id(ds: DomainDataset, setup: str, d_star: int | None, included: list[int], subsample: bool,
               allow_p: float | None, aligned: bool) -> str:
    """The paper's id: lso-real-only or lso-{letters}-no{domain}classes[-nosub][-pseudo][-allow{p}][-aligned]."""
    if setup == "natural_only":
        base = f"lso-{ds.natural_domain}-only"
    else:
        base = f"lso-{''.join(ds.domains[d][0] for d in included)}-no{ds.domains[d_star]}classes"
    parts = [base]
    if not subsample and setup != "natural_only":
        parts.append("nosub")
    if setup.startswith("pseudo"):
        parts.append("pseudo")
    if allow_p is not None:
        parts.append(f"allow{allow_p:g}")
    if aligned:
        parts.append("aligned")
    return "-".join(parts)


def build_mixture(dataset: DomainDataset, setup: str, test_domain: str | None = None,
                  test_classes: Sequence[str | int] | str | None = None, allow_p: float | None = None,
                  domains: str | None = None, aligned: bool = False, split: str = "train", seed: int = 42,
                  base: str | Path | None = None, subsample: bool = True,
                  templates: Sequence[str] | None = None, paper_compat: bool = False) -> Mixture:
    """Build one mixture of docs/methods.md#mixtures (see module docstring). split='val' (or 'test') gives the
    validation mixture: same filters on the test split, never subsampled. paper_compat: allow-p
    quotas with the paper code's float ceil (`allow_p_quota`); recorded in the manifest. Raises ValueError on
    bad parameters and RuntimeError if a sanity check fails. Cost: O(N) numpy + captions.
    """
    ds = dataset
    if setup not in SETUPS:
        from clipmech.utils import unknown_name_error
        raise unknown_name_error("mixture setup", setup, SETUPS)
    data_split = {"train": "train", "val": "test", "test": "test"}.get(split)
    if data_split is None:
        raise ValueError(f"split {split!r} must be 'train' or 'val'")
    natural = ds.domain_index(ds.natural_domain)
    test_domain = test_domain or ds.default_test_domain
    if test_domain is None and setup != "natural_only":  # natural-only is one model for every d*
        raise ValueError(f"dataset {ds.name!r} has no default test domain; pass test_domain= "
                         f"(CLI: --test-domain), one of {[d for d in ds.domains if d != ds.natural_domain]}")
    d_star = None if test_domain is None else ds.domain_index(test_domain)
    if d_star == natural:
        raise ValueError(f"the test domain cannot be the natural domain {ds.natural_domain!r}")
    c2 = [] if d_star is None else _resolve_classes(ds, test_classes)
    if allow_p is not None:
        if setup not in ("cg_low", "cg_high"):
            raise ValueError(f"allow_p applies to cg_low / cg_high, not {setup!r}")
        if not 0 < allow_p <= 1:
            raise ValueError(f"allow_p={allow_p} must be in (0, 1]")
    included = _included_domains(ds, setup, d_star, domains)
    hold_out_c2 = setup in ("cg_low", "cg_high", "lod")

    train_counts = ds.counts("train")
    c1_mask = np.ones(len(ds.classes), dtype=bool)
    c1_mask[c2] = False
    S = int(train_counts[natural].sum() + (0 if d_star is None else train_counts[d_star, c1_mask].sum()))

    def pool_sizes(counts: np.ndarray, with_c2: bool) -> np.ndarray:
        sizes = np.zeros_like(counts)
        sizes[included] = counts[included]
        if not with_c2:
            sizes[d_star, c2] = 0
        return sizes

    counts = ds.counts(data_split)
    sizes = pool_sizes(counts, with_c2=not hold_out_c2)
    rho, allowed = 1.0, None
    do_sub = data_split == "train" and subsample and setup != "natural_only"
    if do_sub and allow_p is not None:
        pseudo = pool_sizes(counts, with_c2=True)
        fixed = np.zeros_like(counts)
        fixed[d_star, c2] = [allow_p_quota(allow_p, S, int(pseudo.sum()), int(n), paper_compat)
                             for n in counts[d_star, c2]]
        allowed = fixed
        keep = _keep(ds, pseudo, S, fixed, setup)
        rho = _shrink(S - int(fixed.sum()), int(sizes.sum()))
    elif do_sub:
        keep = _keep(ds, sizes, S, None, setup)
        rho = _shrink(S, int(sizes.sum()))
    else:
        keep = sizes
    indices = _take_first(ds, data_split, keep)
    captions = make_captions(ds, indices, seed=seed, aligned=aligned, templates=templates)
    mid = mixture_id(ds, setup, d_star, included, subsample, allow_p, aligned)
    base_lines, base_info = read_base_tsv(base) if base is not None else ([], None)
    m = Mixture(ds, indices, captions, {}, mid, split=data_split, base_lines=base_lines)
    m.manifest = _manifest(m, setup=setup, test_domain=None if d_star is None else ds.domains[d_star], c2=c2, allow_p=allow_p,
                           included=included, aligned=aligned, seed=seed, subsample=subsample, S=S,
                           rho=rho, base_info=base_info, templates=templates)
    m.manifest["paper_compat"] = paper_compat
    c2_allowed = (allowed[d_star, c2] if allowed is not None else 0) if hold_out_c2 else None
    check_mixture(m, S=S if do_sub else None, d_star=d_star, c2=c2, c2_allowed=c2_allowed)
    return m


def _keep(ds: DomainDataset, sizes: np.ndarray, S: int, fixed: np.ndarray | None, setup: str) -> np.ndarray:
    try:
        return stratified_keep(sizes, S, [ds.domain_index(d) for d in ds.trim_order], fixed=fixed)
    except ValueError as err:
        raise ValueError(f"setup {setup!r} over domains {[d for d, n in zip(ds.domains, sizes.sum(1)) if n]}: "
                         f"{err}; include more domains or use subsample=False (--no-subsample)") from err


def _take_first(ds: DomainDataset, split: str, keep: np.ndarray) -> np.ndarray:
    """Indices of the first keep[d, c] samples (file order) of each (domain, class) bucket of `split`."""
    idx = ds.indices(split)
    flat = ds.domain_idx[idx] * len(ds.classes) + ds.class_idx[idx]
    order = np.argsort(flat, kind="stable")  # buckets contiguous, file order within each
    sorted_flat = flat[order]
    starts = np.searchsorted(sorted_flat, sorted_flat, side="left")
    rank = np.arange(len(order)) - starts  # position of each sample inside its bucket
    chosen = order[rank < keep.reshape(-1)[sorted_flat]]
    return np.sort(idx[chosen]).astype(np.int64)


def check_mixture(m: Mixture, S: int | None, d_star: int | None, c2: list[int], c2_allowed) -> None:
    """Sanity checks (RuntimeError): unique in-split indices, exact size S when subsampled, and no
    C2 image of d* beyond what the setup allows (none for cg/lod, the allow-p quota otherwise)."""
    ds, idx = m.dataset, m.indices
    if len(np.unique(idx)) != len(idx) or (len(idx) and not (ds.split[idx] == m.split).all()):
        raise RuntimeError(f"mixture {m.id}: duplicate samples or samples outside split {m.split!r}")
    if S is not None and len(idx) != S:
        raise RuntimeError(f"mixture {m.id}: {len(idx)} dataset samples, expected S(d*) = {S}")
    if c2_allowed is not None and d_star is not None:
        got = m.counts()[d_star, c2]
        if not np.array_equal(got, np.broadcast_to(c2_allowed, got.shape)):
            raise RuntimeError(f"mixture {m.id}: test domain {ds.domains[d_star]!r} has C2 counts {got.tolist()}, "
                               f"expected {np.broadcast_to(c2_allowed, got.shape).tolist()}")


def _manifest(m: Mixture, *, setup, test_domain, c2, allow_p, included, aligned, seed, subsample, S, rho,
              base_info, templates) -> dict:
    ds = m.dataset
    return {
        "id": m.id, "setup": setup, "split": "val" if m.split == "test" else "train",
        "dataset": {"name": ds.name, "root": ds.root, "content_hash": ds.content_hash()},
        "natural_domain": ds.natural_domain, "test_domain": test_domain,
        "test_classes": [ds.classes[c] for c in c2], "allow_p": allow_p,
        "domains": [ds.domains[d] for d in included], "aligned": aligned, "seed": seed,
        "subsample": subsample, "templates": list(templates) if templates is not None else "paper",
        "S": S, "rho": rho, "base": base_info,
        **content_entries(m),
    }


def content_entries(m: Mixture) -> dict:
    """The manifest entries that describe the mixture's content: sizes, counts, content hash."""
    ds, counts = m.dataset, m.counts()
    h = hashlib.sha256()
    for line in m.base_lines + m.extra_lines:
        h.update(line.encode("utf-8") + b"\n")
    for i, cap in zip(m.indices, m.captions):
        h.update(f"{ds.source_key(int(i))}\t{cap}\n".encode("utf-8"))
    return {"n_dataset_samples": int(len(m.indices)), "n_base_samples": len(m.base_lines),
            "n_extra_samples": len(m.extra_lines),
            "counts": {d: {c: int(counts[i, j]) for j, c in enumerate(ds.classes)} for i, d in enumerate(ds.domains)},
            "content_hash": h.hexdigest()[:16]}
