"""`DomainDataset`: one abstraction for domain x class image collections.

A dataset is a flat table of N samples with a domain, a class, a split ('train' / 'test') and an
image source: a file path (DomainNet) or a row of an in-memory uint8 array (the embedded emoji
set). Mixtures, captions, training and evaluation only ever see this table, so every setup works
unchanged on any dataset that fills it.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from clipmech.utils import unknown_name_error

SPLITS = ("train", "test")
VERIFY = ("none", "header", "decode")
MAX_UNREADABLE = 0.01  # default share of unreadable images a training or evaluation run tolerates


class UnreadableImageError(RuntimeError):
    """An image file that cannot be decoded; `.path` names it."""

    def __init__(self, path: str, err: BaseException | str):
        self.path = path
        super().__init__(f"cannot read image {path}: {err}; rerun with --verify decode (config: [data] verify = "
                         "\"decode\") to skip unreadable files when the dataset loads")


def check_image(path: str, verify: str) -> str | None:
    """None if the image at `path` passes `verify` ("header": PIL identifies it; "decode": every pixel
    decodes, so truncated files fail), else the reason. Cost: ~0.1 ms (header) / a full decode."""
    if verify not in VERIFY:
        raise ValueError(f"verify={verify!r} must be one of {VERIFY}")
    if verify == "none":
        return None
    try:
        with Image.open(path) as im:
            if verify == "decode":
                im.load()
        return None
    except (OSError, SyntaxError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
        return f"unreadable ({type(err).__name__}: {str(err)[:80]})"


class UnreadableImagesError(RuntimeError):
    """More unreadable images than a run tolerates; the list was written to a file."""


def report_unreadable(paths: Iterable[str], total: int, list_file, max_share: float = MAX_UNREADABLE,
                      what: str = "images") -> str | None:
    """Write the sorted unreadable `paths` to `list_file` and return a one-line summary, or None when
    there are none. Raises UnreadableImagesError when they exceed `max_share` of `total`."""
    from clipmech.utils import atomic_write_text

    bad = sorted(set(paths))
    if not bad:
        return None
    atomic_write_text("\n".join(bad) + "\n", list_file)
    line = f"{len(bad)} of {total} {what} were unreadable and skipped (listed in {list_file})"
    if len(bad) > max_share * total:
        raise UnreadableImagesError(f"{line}; that is more than {max_share:.0%}: repair or remove them, or reload "
                                    "the dataset with --verify decode so they are left out from the start")
    return line


class DomainDataset:
    """N samples of `domains` x `classes` with per-sample split and image source.

    Attributes: name, domains (list[str]), classes (list[str]), domain_idx / class_idx (np.int64[N]),
    split (np.str_[N] of 'train'/'test'), sources (list[str] of file paths, or None when in
    memory), images (np.uint8[N,H,W,3] or None), keywords (dict class -> list[str] or None),
    natural_domain (the domain playing "real"), default_test_domain, default_test_classes,
    trim_order (domains in the order the mixture trimming visits them), domain_terms (extra caption
    terms for domains the paper does not name), root (folder or None), extras (per-sample arrays,
    also set as attributes, e.g. emoji `style_idx`), info (dataset-level metadata dict).
    Sample order is "file order": mixtures keep the first samples of each (domain, class) bucket.
    """

    def __init__(
        self,
        name: str,
        domains: Sequence[str],
        classes: Sequence[str],
        domain_idx: np.ndarray,
        class_idx: np.ndarray,
        split: np.ndarray,
        sources: list[str] | None = None,
        images: np.ndarray | None = None,
        keywords: dict[str, list[str]] | None = None,
        natural_domain: str = "real",
        default_test_domain: str | None = None,
        default_test_classes: list[str] | None = None,
        trim_order: Sequence[str] | None = None,
        domain_terms: dict[str, list[str]] | None = None,
        root: str | None = None,
        extras: dict[str, np.ndarray] | None = None,
        info: dict | None = None,
    ):
        self.name = name
        self.domains = list(domains)
        self.classes = list(classes)
        self.domain_idx = np.asarray(domain_idx, dtype=np.int64)
        self.class_idx = np.asarray(class_idx, dtype=np.int64)
        self.split = np.asarray(split, dtype="<U5")
        self.sources = sources
        self.images = images
        self.keywords = keywords
        self.natural_domain = natural_domain
        self.default_test_domain = default_test_domain
        self.default_test_classes = default_test_classes
        self.trim_order = list(trim_order) if trim_order is not None else (
            [natural_domain] + [d for d in self.domains if d != natural_domain])
        self.domain_terms = domain_terms or {}
        self.root = root
        self.extras = {k: np.asarray(v) for k, v in (extras or {}).items()}
        for k, v in self.extras.items():
            setattr(self, k, v)
        self.info = dict(info or {})
        self._validate()

    def _validate(self) -> None:
        n = len(self.domain_idx)
        if (sources_missing := self.sources is None) == (self.images is None):
            raise ValueError("DomainDataset needs exactly one of `sources` (paths) or `images` (array)")
        lengths = {"class_idx": len(self.class_idx), "split": len(self.split),
                   "sources/images": len(self.images) if sources_missing else len(self.sources)}
        for what, m in lengths.items():
            if m != n:
                raise ValueError(f"DomainDataset {self.name!r}: {what} has {m} entries, domain_idx has {n}")
        if n and (self.domain_idx.min() < 0 or self.domain_idx.max() >= len(self.domains)):
            raise ValueError(f"DomainDataset {self.name!r}: domain_idx outside 0..{len(self.domains) - 1}")
        if n and (self.class_idx.min() < 0 or self.class_idx.max() >= len(self.classes)):
            raise ValueError(f"DomainDataset {self.name!r}: class_idx outside 0..{len(self.classes) - 1}")
        bad = set(np.unique(self.split).tolist()) - set(SPLITS)
        if bad:
            raise ValueError(f"DomainDataset {self.name!r}: split values {sorted(bad)} not in {SPLITS}")
        for k, v in self.extras.items():
            if len(v) != n:
                raise ValueError(f"DomainDataset {self.name!r}: extra {k!r} has {len(v)} entries, expected {n}")
        for d in [self.natural_domain, *self.trim_order]:
            self.domain_index(d)
        if sorted(self.trim_order) != sorted(self.domains):
            raise ValueError(f"trim_order {self.trim_order} must list every domain of {self.domains} once")

    def __len__(self) -> int:
        return len(self.domain_idx)

    def __repr__(self) -> str:
        return (f"DomainDataset({self.name!r}, {len(self)} samples, {len(self.domains)} domains, "
                f"{len(self.classes)} classes)")

    # ---- names -> indices -------------------------------------------------------------------
    def domain_index(self, domain: str | int) -> int:
        """Index of a domain given by name or int."""
        if isinstance(domain, (int, np.integer)):
            if not 0 <= domain < len(self.domains):
                raise ValueError(f"domain index {domain} outside 0..{len(self.domains) - 1}")
            return int(domain)
        if domain not in self.domains:
            raise unknown_name_error(f"domain of dataset {self.name!r}", domain, self.domains)
        return self.domains.index(domain)

    def class_index(self, cls: str | int) -> int:
        """Index of a class given by name (with '_' or ' ') or int."""
        if isinstance(cls, (int, np.integer)):
            if not 0 <= cls < len(self.classes):
                raise ValueError(f"class index {cls} outside 0..{len(self.classes) - 1}")
            return int(cls)
        name = cls.strip().replace("_", " ")
        if name not in self._class_lookup:
            raise unknown_name_error(f"class of dataset {self.name!r}", cls, self.classes)
        return self._class_lookup[name]

    @property
    def _class_lookup(self) -> dict[str, int]:
        if getattr(self, "_lookup_cache", None) is None or len(self._lookup_cache) != len(self.classes):
            self._lookup_cache = {c: i for i, c in enumerate(self.classes)}
        return self._lookup_cache

    def domain_letters(self) -> dict[str, str]:
        """Initial letter -> domain name (used in mixture ids); raises if initials collide."""
        letters = {}
        for d in self.domains:
            if d[0] in letters:
                raise ValueError(f"domains {letters[d[0]]!r} and {d!r} share the initial {d[0]!r}; "
                                 "mixture ids need unique initials")
            letters[d[0]] = d
        return letters

    # ---- selection --------------------------------------------------------------------------
    def mask(self, split: str | None = None, domains: Iterable[str | int] | None = None,
             classes: Iterable[str | int] | None = None) -> np.ndarray:
        """Boolean[N] of samples matching all given filters (None = no filter)."""
        m = np.ones(len(self), dtype=bool)
        if split is not None:
            if split not in SPLITS:
                raise ValueError(f"split {split!r} is not one of {SPLITS}")
            m &= self.split == split
        if domains is not None:
            m &= np.isin(self.domain_idx, [self.domain_index(d) for d in domains])
        if classes is not None:
            m &= np.isin(self.class_idx, [self.class_index(c) for c in classes])
        return m

    def indices(self, split: str | None = None, domains: Iterable[str | int] | None = None,
                classes: Iterable[str | int] | None = None) -> np.ndarray:
        """np.int64 indices (file order) of samples matching the filters."""
        return np.flatnonzero(self.mask(split, domains, classes)).astype(np.int64)

    def counts(self, split: str | None = None, indices: np.ndarray | None = None) -> np.ndarray:
        """np.int64[D, C]: samples per (domain, class), optionally restricted to a split / indices."""
        sel = self.indices(split) if indices is None else np.asarray(indices, dtype=np.int64)
        if indices is not None and split is not None:
            sel = sel[self.split[sel] == split]
        flat = self.domain_idx[sel] * len(self.classes) + self.class_idx[sel]
        return np.bincount(flat, minlength=len(self.domains) * len(self.classes)).reshape(
            len(self.domains), len(self.classes)).astype(np.int64)

    def subset(self, indices: np.ndarray) -> "DomainDataset":
        """A new dataset holding only `indices` (same domains, classes and defaults)."""
        idx = np.asarray(indices, dtype=np.int64)
        return DomainDataset(
            self.name, self.domains, self.classes, self.domain_idx[idx], self.class_idx[idx],
            self.split[idx],
            sources=None if self.sources is None else [self.sources[i] for i in idx],
            images=None if self.images is None else self.images[idx],
            keywords=self.keywords, natural_domain=self.natural_domain,
            default_test_domain=self.default_test_domain,
            default_test_classes=self.default_test_classes, trim_order=self.trim_order,
            domain_terms=self.domain_terms, root=self.root,
            extras={k: v[idx] for k, v in self.extras.items()}, info=self.info)

    def select_classes(self, classes: Iterable[str | int]) -> "DomainDataset":
        """A new dataset restricted to `classes` (names or indices): their samples only, `.classes`
        shortened to them (in this dataset's order) and class indices renumbered, so zero-shot heads
        and chance level cover the kept classes only. Default test classes not kept are dropped."""
        keep = sorted({self.class_index(c) for c in classes})
        if not keep:
            raise ValueError("select_classes needs at least one class")
        new_idx = np.full(len(self.classes), -1, dtype=np.int64)
        new_idx[keep] = np.arange(len(keep))
        idx = self.indices(classes=keep)
        names = [self.classes[k] for k in keep]
        test_classes = [c for c in self.default_test_classes or [] if c in names] or None
        return DomainDataset(
            self.name, self.domains, names, self.domain_idx[idx], new_idx[self.class_idx[idx]], self.split[idx],
            sources=None if self.sources is None else [self.sources[i] for i in idx],
            images=None if self.images is None else self.images[idx],
            keywords=None if self.keywords is None else {c: v for c, v in self.keywords.items() if c in names},
            natural_domain=self.natural_domain, default_test_domain=self.default_test_domain,
            default_test_classes=test_classes, trim_order=self.trim_order, domain_terms=self.domain_terms,
            root=self.root, extras={k: v[idx] for k, v in self.extras.items()}, info=self.info)

    # ---- images -----------------------------------------------------------------------------
    def load_image(self, i: int) -> Image.Image:
        """Sample `i` as an RGB PIL image (decoded from disk or from the in-memory array)."""
        if self.images is not None:
            return Image.fromarray(self.images[i])
        path = self.sources[i]
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, SyntaxError, ValueError) as err:
            raise UnreadableImageError(path, err) from err

    def source_key(self, i: int) -> str:
        """A stable, machine-independent name of sample i (relative path or in-memory id)."""
        if self.sources is None:
            return f"{self.name}:{i}"
        path = self.sources[i]
        if self.root and path.startswith(self.root):
            return path[len(self.root):].lstrip("/\\")
        return path

    def content_hash(self) -> str:
        """sha256 (16 hex) over names, labels, splits and sources (relative paths or pixel bytes).
        Memoised: the dataset's arrays are treated as immutable."""
        if getattr(self, "_hash", None) is None:
            self._hash = self._compute_hash()
        return self._hash

    def _compute_hash(self) -> str:
        h = hashlib.sha256()
        for part in (self.name, "\n".join(self.domains), "\n".join(self.classes)):
            h.update(part.encode("utf-8") + b"\0")
        for arr in (self.domain_idx, self.class_idx):
            h.update(np.ascontiguousarray(arr).tobytes())
        h.update("\n".join(self.split.tolist()).encode("utf-8"))
        if self.images is not None:
            h.update(np.ascontiguousarray(self.images).tobytes())
        else:
            h.update("\n".join(self.source_key(i) for i in range(len(self))).encode("utf-8"))
        return h.hexdigest()[:16]

    def summary(self) -> str:
        """A domain x split count table (plain text)."""
        rows = [("domain", "classes", "train", "test", "total")]
        for d, dom in enumerate(self.domains):
            m = self.domain_idx == d
            rows.append((dom, str(len(np.unique(self.class_idx[m]))), str(int((m & (self.split == "train")).sum())),
                         str(int((m & (self.split == "test")).sum())), str(int(m.sum()))))
        rows.append(("total", str(len(self.classes)), str(int((self.split == "train").sum())),
                     str(int((self.split == "test").sum())), str(len(self))))
        widths = [max(len(r[j]) for r in rows) for j in range(5)]
        lines = [f"{self.name}: {len(self)} samples, {len(self.domains)} domains, {len(self.classes)} classes"
                 f" (natural: {self.natural_domain}, default test domain: {self.default_test_domain})"]
        lines += ["  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths)))
                  for r in rows]
        return "\n".join(lines)

    def torch_dataset(self, transform: Callable | None = None, captions: Sequence[str] | None = None,
                      indices: np.ndarray | None = None) -> "TorchView":
        """A torch Dataset over `indices` (default all) yielding
        (transform(image), caption, class_idx, domain_idx). Caption defaults to the class name."""
        return TorchView(self, transform, captions, indices)


class TorchView:
    """torch.utils.data.Dataset-compatible view (map-style: __len__ / __getitem__)."""

    def __init__(self, dataset: DomainDataset, transform: Callable | None,
                 captions: Sequence[str] | None, indices: np.ndarray | None):
        self.dataset = dataset
        self.indices = np.arange(len(dataset), dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
        if captions is not None and len(captions) != len(self.indices):
            raise ValueError(f"{len(captions)} captions for {len(self.indices)} samples")
        self.captions = captions
        if transform is None:
            from torchvision.transforms.functional import to_tensor
            transform = to_tensor
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        i = int(self.indices[j])
        ds = self.dataset
        caption = self.captions[j] if self.captions is not None else ds.classes[ds.class_idx[i]]
        return self.transform(ds.load_image(i)), caption, int(ds.class_idx[i]), int(ds.domain_idx[i])
