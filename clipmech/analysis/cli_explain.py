"""`clipmech analyze saliency|explain`: where a model looks, and what circuit nodes mean.

The model is a clipmech run (RUN_DIR), --model NAME --pretrained TAG_OR_PATH, or --hf PATH (with
--dataset and --out). Images: up to --n-images per domain of the held-out (C2) classes (all classes
when there are none) from the --split, one seeded shuffle.

saliency: per image, input-level IG of the true-class cosine logit (baseline --baseline), Grad-CAM at
--point (default: the last spatial point) and, with --nodes, the IG attribution of that node set per
position -> saliency_<label>/saliency.npz, saliency.json and one PNG per image.

explain: for the nodes given by --nodes, or else the test domain's C2 circuits written by `clipmech
analyze circuits` (nodes shared with another domain's circuit of the same class, and nodes of the
test domain only, best IG score first): text labels with the fraction of the node's effect each
explains (`clipmech.analysis.explain`), per-domain mean activation and ablation effect, and the
top-activating images per domain with the node's activation map -> explain_<label>/explanations.json
and thumbs/*.png (schema: docs/explain.md).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from clipmech.analysis.source import add_source_arguments, source_flags


def register(subparsers) -> None:
    """Add `saliency` and `explain` to the `clipmech analyze` subparsers."""
    for name, func, helptext in (("saliency", run_saliency, "input IG, Grad-CAM and node-set IG maps per image"),
                                 ("explain", run_explain, "text labels, examples and domain effects of circuit nodes")):
        p = subparsers.add_parser(name, help=helptext, description=__doc__)
        add_source_arguments(p)
        p.add_argument("--nodes", nargs="+", metavar="POINT/INDEX",
                       help="nodes to attribute / explain, e.g. visual.layer3.0.hook_out/17 (explain default: "
                            "the test domain's circuit nodes)")
        p.add_argument("--n-images", type=int, default=8 if name == "explain" else 4,
                       help="images per domain (C2 classes)")
        p.add_argument("--split", choices=("test", "train", "all"), default="test")
        p.add_argument("--seed", type=int, default=0, help="seed of the image sample")
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        if name == "saliency":
            p.add_argument("--point", help="Grad-CAM point (default: the last point with spatial positions)")
            p.add_argument("--steps", type=int, default=16, help="IG Riemann steps (midpoint rule)")
            p.add_argument("--baseline", choices=("zero", "black"), default="zero",
                           help="input IG baseline: 'zero' = the normalised all-zero image (dataset mean colour), "
                                "'black' = pixel value 0")
        else:
            p.add_argument("--vocab", metavar="FILE", help="label vocabulary, one word or phrase per line, embedded "
                           "in the dataset's templates (default: the dataset's class names; for a clipmech run, "
                           "words of FILE its text tower never saw in training captions are dropped)")
            p.add_argument("--labels", type=int, default=3, help="labels per node")
            p.add_argument("--method", choices=("auto", "textspan", "direct", "total"), default="auto",
                           help="label source (auto: TextSpan for ViT heads, direct effect where a direct path "
                                "exists, total effect otherwise)")
            p.add_argument("--max-nodes", type=int, default=8,
                           help="circuit nodes per group (shared, test-domain only)")
            p.add_argument("--top", type=int, default=3, help="top-activating examples per domain")
            p.add_argument("--pool", type=int, default=32, help="images per domain searched for top examples")
        p.set_defaults(func=func)


class _Setup:
    """Model, dataset, zero-shot head and the image sample both commands use."""

    def __init__(self, args: argparse.Namespace):
        import torch

        from clipmech.analysis.source import load_source
        from clipmech.eval.templates import get_templates
        from clipmech.eval.zeroshot import class_prompts_names

        if args.n_images < 1:
            raise ValueError(f"--n-images must be >= 1, got {args.n_images}")
        self.source = src = load_source(args)
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = src.model.to(self.device).eval()
        self.dataset = ds = src.dataset
        self.templates = get_templates(src.templates, ds.name)
        self.class_names = class_prompts_names(ds)
        self.c2 = [ds.class_index(k) for k in src.c2] or list(range(len(ds.classes)))
        self.split = None if args.split == "all" else args.split
        self.nodes = [self._node(n) for n in args.nodes or []]
        self.args = args

    def _node(self, name: str) -> tuple[str, int]:
        from clipmech.analysis.explain import parse_node
        return parse_node(self.model, name)

    def rows(self, n: int, seed: int, classes: list[int] | None = None) -> np.ndarray:
        """Up to n rows per domain of `classes` (default C2) from the split, one seeded shuffle each."""
        ds, out = self.dataset, []
        classes = self.c2 if classes is None else classes
        for d in ds.domains:
            idx = ds.indices(split=self.split, domains=[d], classes=[ds.classes[k] for k in classes])
            out.append(np.sort(np.random.default_rng([seed, ds.domains.index(d)]).permutation(idx)[:n]))
        rows = np.concatenate(out)
        if not len(rows):
            raise ValueError(f"no {self.split or 'any'} images of the chosen classes; choose another --split")
        return rows

    def head_and_labels(self, rows: np.ndarray):
        """(zero-shot head [K, D] of the classes among `rows`, each row's label into it): the
        true-class cosine logit needs only those classes (all 459 emoji classes x 25 templates would
        cost more text passes than the analysis itself)."""
        import torch

        classes, labels = np.unique(self.dataset.class_idx[rows], return_inverse=True)
        head = self.model.zero_shot_head([self.class_names[k] for k in classes], self.templates)
        return head, torch.as_tensor(labels, device=self.device)

    def images(self, rows: np.ndarray):
        from clipmech.data.preprocess import eval_images
        return eval_images(self.dataset, rows, self.model.image_size).to(self.device)


# ---------------------------------------------------------------------------------------- saliency
def run_saliency(args: argparse.Namespace) -> int:
    import torch

    from clipmech.analysis import saliency as S
    from clipmech.analysis.patching import true_class_logit
    from clipmech.utils import atomic_write_json

    s = _Setup(args)
    point = args.point or S.last_spatial_point(s.model)
    S.grid_shape(s.model, point)  # a point without positions fails here, before any IG
    for p, _ in s.nodes:
        S.grid_shape(s.model, p)
    rows = s.rows(args.n_images, args.seed)
    out = s.source.out / f"saliency_{s.source.label}"
    arrays: dict[str, Any] = {"rows": rows}
    inputs, cams, node_maps = [], [], []
    for start in range(0, len(rows), 16):
        chunk = rows[start:start + 16]
        images = s.images(chunk)
        head, labels = s.head_and_labels(chunk)
        metric = true_class_logit(head, labels, reduce="sum")
        inputs.append(S.input_saliency(s.model, images, metric, steps=args.steps, baseline=args.baseline).cpu())
        cams.append(S.upsample(S.grad_cam(s.model, images, metric, point), s.model.image_size).cpu())
        if s.nodes:
            by_point: dict[str, list[int]] = {}
            for p, i in s.nodes:
                by_point.setdefault(p, []).append(i)
            node_maps.append(S.circuit_saliency(s.model, images, metric, by_point, steps=args.steps).cpu())
    arrays["input_ig"], arrays["grad_cam"] = torch.cat(inputs).numpy(), torch.cat(cams).numpy()
    if node_maps:
        arrays["node_ig"] = torch.cat(node_maps).numpy()
    out.mkdir(parents=True, exist_ok=True)
    _save_npz(arrays, out / "saliency.npz")
    pngs = _saliency_pngs(s, rows, arrays, out)
    atomic_write_json({"meta": {**s.source.meta, "dataset": s.dataset.name, "split": args.split},
                       "cam_point": point, "nodes": [f"{p}/{i}" for p, i in s.nodes], "steps": args.steps,
                       "baseline": args.baseline, "metric": "true-class cosine logit",
                       "rows": rows.tolist(), "sources": [s.dataset.source_key(int(r)) for r in rows],
                       "domains": [s.dataset.domains[int(s.dataset.domain_idx[r])] for r in rows],
                       "images": pngs, "arrays": "saliency.npz"}, out / "saliency.json")
    print(f"clipmech analyze saliency: {len(rows)} images, Grad-CAM at {point} -> {out}")
    return 0


def _save_npz(arrays: dict[str, Any], path: Path) -> None:
    import io

    from clipmech.utils import atomic_write_bytes

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(buf.getvalue(), path)


def _saliency_pngs(s: _Setup, rows: np.ndarray, arrays: dict[str, Any], out: Path) -> list[str]:
    """One PNG per image: the image, then each map as an overlay; returns paths relative to `out`."""
    from clipmech.analysis.explanations import overlay, thumbnail, write_image

    names = [k for k in ("input_ig", "grad_cam", "node_ig") if k in arrays]
    paths = []
    for j, r in enumerate(rows):
        image = s.images(np.array([r]))[0]
        tiles = [thumbnail(image)] + [overlay(image, arrays[k][j]) for k in names]
        name = f"images/{j:03d}_row{int(r)}.png"
        write_image(np.concatenate(tiles, axis=1), out / name)
        paths.append(name)
    return paths


# ---------------------------------------------------------------------------------------- explain
def vocabulary(s: _Setup, vocab: str | None) -> tuple[list[str], dict[str, Any]]:
    """(words, description): --vocab FILE (for a clipmech run only words of its training captions:
    class names, their keywords, domain words) or the dataset's class names. Words are embedded in
    the dataset's templates."""
    from clipmech.analysis.sharing import dataset_vocabulary, read_vocabulary

    trained = dataset_vocabulary(s.dataset)
    if vocab is None:
        return list(s.class_names), {"source": "dataset class names", "n_words": len(s.class_names), "dropped": 0}
    words = read_vocabulary(vocab)
    if s.source.epoch is None:
        return words, {"source": str(vocab), "n_words": len(words), "dropped": 0}
    seen = {w.lower() for w in trained} | {w.replace("_", " ").lower() for w in trained}
    kept = [w for w in words if w.lower() in seen]
    if not kept:
        raise ValueError(f"none of the {len(words)} words of {vocab} occurs in this run's training captions "
                         f"(its text tower knows e.g. {', '.join(trained[:5])}); list such words or omit --vocab")
    return kept, {"source": f"{vocab}, restricted to words of the training captions", "n_words": len(kept),
                  "dropped": len(words) - len(kept)}


def circuit_nodes(s: _Setup, limit: int) -> tuple[list, dict[str, Any]]:
    """The nodes to explain from the circuits `analyze circuits` wrote for this model
    (`analysis.explanations.select_circuit_nodes`) and what was read; names the command when none."""
    import json

    from clipmech.analysis.circuits import Circuit
    from clipmech.analysis.explanations import select_circuit_nodes

    src, ds = s.source, s.dataset
    folder = src.out / f"circuits_{src.label}" / "circuits"
    td = src.test_domain
    hint = (f"compute them first: clipmech analyze circuits {source_flags(s.args)}, or name nodes with "
            "--nodes POINT/INDEX")
    if td is None:
        raise ValueError(f"this model has no test domain to explain circuits of; {hint}")
    circuits: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*/*.json")) if folder.is_dir() else []:
        if json.loads(path.read_text()).get("format") == "clipmech.circuit/1":
            circuits.setdefault(path.parent.name, {})[path.stem] = Circuit.load(path)
    names = {ds.classes[k]: ds.classes[k].replace("/", "_") for k in s.c2}
    classes = [k for k, file in names.items() if file in circuits.get(td, {})]
    if not classes or len(circuits) < 2:
        raise FileNotFoundError(f"no circuits of test domain {td!r} and another domain in {folder}; {hint}")
    by_class = {d: {k: c[names[k]] for k in classes if names[k] in c} for d, c in circuits.items()}
    nodes, info = select_circuit_nodes(by_class, td, classes, limit)
    return nodes, {"folder": str(folder), **info}


def run_explain(args: argparse.Namespace) -> int:
    from clipmech.analysis.explanations import ImageSet, explain_nodes

    s = _Setup(args)
    words, vocab_info = vocabulary(s, args.vocab)
    if s.nodes:
        nodes, found = [(p, i, "requested", None) for p, i in s.nodes], {}
    else:
        nodes, found = circuit_nodes(s, args.max_nodes)
    ds = s.dataset
    rows = s.rows(args.n_images, args.seed)
    head, labels = s.head_and_labels(rows)
    sample = ImageSet(s.images(rows), ds.domain_idx[rows], labels)
    pool_rows = s.rows(args.pool, args.seed + 1, classes=list(range(len(ds.classes))))
    pool = ImageSet(s.images(pool_rows), ds.domain_idx[pool_rows], sources=[ds.source_key(int(r)) for r in pool_rows],
                    classes=[ds.classes[int(k)] for k in ds.class_idx[pool_rows]])
    word_emb = s.model.zero_shot_head([w.replace("_", " ") for w in words], s.templates)
    out = s.source.out / f"explain_{s.source.label}"
    meta = {**s.source.meta, "dataset": ds.name, "split": args.split, "test_domain": s.source.test_domain,
            "images_per_domain": args.n_images, "vocabulary": vocab_info, "circuits": found or None}
    doc, figures = explain_nodes(s.model, nodes, sample, head, pool, ds.domains, words, word_emb, out,
                                 method=args.method, k=args.labels, top=args.top, meta=meta)
    print(f"clipmech analyze explain: {len(doc['nodes'])} nodes, {len(words)} words -> {out / 'explanations.json'}, "
          f"{', '.join(p.name for p in figures)}")
    for r in doc["nodes"][:10]:
        lab = ", ".join(f"{x['word']} {x['fraction']:.0%}" for x in r["labels"]) or r.get("skipped", "")
        print(f"  {r['node']:<36} {r['group']:<16} {r['method']:<8} {lab}  (explained {r['explained']:.0%}, "
              f"chance {r['chance']:.0%}, ceiling {r['ceiling']:.0%})")
    return 0
