"""A tiny fake DomainNet folder (for tests and demos of the DomainNet code path without DomainNet)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from clipmech.data.domainnet import DOMAINS

FAKE_CLASSES = ("aircraft_carrier", "axe", "banana", "teddy-bear", "The_Eiffel_Tower", "zebra")


def fake_counts(domains=DOMAINS, classes=FAKE_CLASSES) -> dict[tuple[str, str, str], int]:
    """(domain, class folder, split) -> number of images; uneven on purpose, painting lacks the
    last class (like DomainNet's painting)."""
    out = {}
    for d, dom in enumerate(domains):
        for c, cls in enumerate(classes):
            if dom == "painting" and c == len(classes) - 1:
                continue
            out[(dom, cls, "train")] = 6 + 2 * ((3 * d + 5 * c) % 7)
            out[(dom, cls, "test")] = 1 + (d + c) % 2
    return out


def write_fake_domainnet(root: str | Path, counts: dict[tuple[str, str, str], int] | None = None,
                         size: int = 8) -> Path:
    """Write ROOT/{domain}/{class}/{domain}_{class}_{k}.png (size x size, a colour per (domain,
    class, k)) and ROOT/{domain}_{split}.txt lists with labels. Returns ROOT. ~1 ms per image."""
    root = Path(root)
    counts = fake_counts() if counts is None else counts
    classes = sorted({c for _, c, _ in counts}, key=lambda n: (n.lower(), n))
    label = {c: i for i, c in enumerate(classes)}
    domains = sorted({d for d, _, _ in counts})
    lines: dict[tuple[str, str], list[str]] = {(d, s): [] for d in domains for s in ("train", "test")}
    rng = np.random.default_rng(0)
    for (dom, cls, split), n in sorted(counts.items()):
        folder = root / dom / cls
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(n):
            name = f"{dom}_{cls}_{split}_{k:03d}.png"
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name)
            lines[(dom, split)].append(f"{dom}/{cls}/{name} {label[cls]}")
    for (dom, split), rows in lines.items():
        (root / f"{dom}_{split}.txt").write_text("".join(r + "\n" for r in rows))
    return root
