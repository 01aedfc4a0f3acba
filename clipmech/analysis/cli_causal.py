"""`clipmech analyze circuits|patching`: causal analyses of a trained run or of any CLIP.

The model is a clipmech run (RUN_DIR), --model NAME --pretrained TAG_OR_PATH, or --hf PATH (with
--dataset and --out). circuits: one circuit per (domain, class) of the test split (docs/methods.md#circuits, cached
and resumable), node / edge Jaccard and WL similarity matrices over domains (mean over classes,
bootstrap CIs over classes), heatmaps, a circuit drawing, cross-domain faithfulness, and the
de-confounded causal test of the paper's claim on the test domain's C2 classes
(`clipmech.analysis.controls.matched_causal_test`): circuits discovered on one set of drawings are
ablated on a disjoint one (--discovery), nodes shared with other domains against controls matched on
IG score, per-class paired effects on accuracy and the true-class logit, the study's verdict rule.
Everything goes to RUN_DIR/analysis/ (or --out).

patching: exact activation patching vs attribution patching and IG at every analysis point
(receiver = domain d images of class k, source = --source-domain images of class k), with Spearman
rank correlations per point.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from clipmech.analysis.source import add_source_arguments


def register(subparsers) -> None:
    """Add `circuits` and `patching` to the `clipmech analyze` subparsers."""
    for name, func, helptext in (("circuits", run_circuits, "per-(domain, class) circuits, similarity, causal test"),
                                 ("patching", run_patching, "exact vs attribution patching vs IG (rank correlations)")):
        p = subparsers.add_parser(name, help=helptext, description=__doc__)
        add_source_arguments(p)
        p.add_argument("--domains", nargs="+", metavar="DOMAIN", help="domains (default: all)")
        p.add_argument("--classes", nargs="+", metavar="CLASS",
                       help="classes (default: all, C2 first, as the paper; similarities reported for all / C2 / C1)")
        p.add_argument("--n-images", type=int, default=50,
                       help="images per (domain, class), from one shuffle of the split seeded --seed (paper: 50)")
        p.add_argument("--steps", type=int, default=10, help="IG steps (paper: 10)")
        p.add_argument("--seed", type=int, default=42, help="seed of the image sample")
        p.add_argument("--split", choices=("test", "train", "all"), default="test",
                       help="images to analyse (paper: test). 'all' helps datasets with few test images per "
                            "(domain, class), e.g. emoji; the test domain's C2 images are unseen in CG setups")
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        if name == "circuits":
            p.add_argument("--node-fraction", type=float, default=0.1, help="top fraction of nodes per point")
            p.add_argument("--top-k", type=int, default=3, help="incoming edges kept per node")
            p.add_argument("--method", choices=("paper_ig", "eap_ig"), default="paper_ig",
                           help="circuit discovery: the paper's IG, or EAP-IG with mean ablation over up to 200 images "
                                "of the domain, the faithfulness reference (docs/circuit_validity.md; exploratory)")
            p.add_argument("--ablation", choices=("mean", "zero"), default="mean")
            p.add_argument("--discovery", choices=("auto", "train", "split"), default="auto",
                           help="causal test: 'train' discovers its circuits on distinct training-split drawings "
                                "and ablates the test drawings; 'split' halves each (domain, class) cell's test "
                                "images (seeded --seed; cells with < 2 skipped and counted), discovery on one half, "
                                "ablation on the other; 'auto': train for datasets of augmented drawings (emoji, "
                                "one test drawing per cell), split otherwise (DomainNet)")
            p.add_argument("--n-draws", type=int, default=10,
                           help="causal test: matched control draws per class (effects averaged over them)")
            p.add_argument("--n-strata", type=int, default=4,
                           help="causal test: IG-score quantile strata per point the controls are matched in")
            p.add_argument("--no-faithfulness", action="store_true", help="skip cross-domain faithfulness")
            p.add_argument("--no-causal", action="store_true",
                           help="skip the causal and placebo tests (and their discovery circuits)")
            p.add_argument("--paper-compat", action="store_true",
                           help="reproduce the paper code's quirks: WL 'h2' runs 3 iterations, wrap-around "
                                "attnpool -> input edges (also [analysis] paper_compat in the run config)")
        else:
            p.add_argument("--source-domain", default="real", help="domain whose activations are patched in")
        p.set_defaults(func=func)


# ------------------------------------------------------------------------------------------- setup
class _Run:
    """What `analyze circuits` / `patching` analyse: the Source (`self.source`: dataset, C2, test
    domain, output folder), its model on the chosen device and zero-shot head, and the command's
    selection (domains, classes, images per cell, split, seed) with its image samples."""

    def __init__(self, args: argparse.Namespace):
        import torch

        from clipmech.analysis.source import load_source
        from clipmech.utils import unknown_name_error

        self.source = src = load_source(args)
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = src.model.to(self.device).eval()
        ds = src.dataset
        for d in args.domains or []:
            if d not in ds.domains:
                raise unknown_name_error("domain", d, ds.domains)
        self.domains = list(args.domains or ds.domains)
        for k in args.classes or []:
            if k not in ds.classes:
                raise unknown_name_error("class", k, ds.classes)
        self.classes = list(args.classes or src.c2 + [k for k in ds.classes if k not in src.c2])
        if not self.classes:
            raise ValueError("no classes to analyse: the dataset has none; pass --classes")
        self.head = src.head(self.model).to(self.device)
        self.n_images, self.seed = args.n_images, args.seed
        self.split = None if args.split == "all" else args.split
        self.paper_compat = bool(getattr(args, "paper_compat", False) or src.paper_compat)
        self.cells: dict | None = None
        self._references: dict = {}

    def sample(self, domain: str, cls: str):
        """(images [n, 3, S, S], labels [n]) of `cls` in `domain`: the paper's --n-images per cell from
        one seeded shuffle of the split (`cell_samples`); None if there are none."""
        from clipmech.data.samples import cell_samples

        if self.cells is None:
            self.cells = cell_samples(self.source.dataset, self.n_images, self.split, self.seed)
        idx = self.cells.get((domain, cls), np.zeros(0, np.int64))
        return self.images(idx) if len(idx) else None

    def images(self, idx: np.ndarray):
        """(images [n, 3, S, S], labels [n] as rows of the zero-shot head) of dataset rows `idx`."""
        import torch

        from clipmech.data.preprocess import eval_images

        images = eval_images(self.source.dataset, idx, self.model.image_size).to(self.device)
        return images, torch.as_tensor(self.source.dataset.class_idx[idx], device=self.device)

    def reference(self, domain: str, n: int = 200):
        """Up to `n` random images of `domain` over all classes (the mean-ablation reference), loaded
        once per (domain, n)."""
        from clipmech.data.preprocess import eval_images

        if (domain, n) not in self._references:
            idx = self.source.dataset.indices(split=self.split, domains=[domain])
            idx = np.sort(np.random.default_rng(self.seed).permutation(idx)[:n])
            self._references[domain, n] = eval_images(self.source.dataset, idx, self.model.image_size).to(self.device)
        return self._references[domain, n]

    def pairs(self) -> list[tuple[str, str]]:
        return [(d, k) for k in self.classes for d in self.domains]


# ---------------------------------------------------------------------------------------- circuits
def run_circuits(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from clipmech.analysis.ablation import ablation_values, faithfulness_across_domains
    from clipmech.analysis.activations import inner_points
    from clipmech.analysis.circuit import Circuit, short_point
    from clipmech.analysis.circuit_similarity import domain_similarity
    from clipmech.analysis.figures import value_heatmap
    from clipmech.utils import atomic_write_json

    for flag, value in (("--n-draws", args.n_draws), ("--n-strata", args.n_strata)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    run = _Run(args)
    out = run.source.out / f"circuits_{run.source.label}"
    settings = {"n_images": run.n_images, "split": args.split, "steps": args.steps, "node_fraction": args.node_fraction,
                "top_k": args.top_k, "seed": run.seed, "epoch": run.source.epoch, "model": run.source.model_key,
                "sampling": "one shuffle of the split", "paper_compat": run.paper_compat}
    if args.method != "paper_ig":  # paper-IG circuit files written before --method existed stay valid
        settings["method"] = args.method
    circuits: dict[str, dict[str, Circuit]] = {d: {} for d in run.domains}
    skipped = []
    for d, k in tqdm(run.pairs(), desc="circuits (domain, class)", unit="circuit"):
        c = _cached_circuit(run, args, out / "circuits" / d / f"{k.replace('/', '_')}.json",
                            settings | {"domain": d, "class": k}, lambda d=d, k=k: run.sample(d, k), args.top_k)
        if c is None:
            skipped.append(f"{d}/{k}")
        else:
            circuits[d][k] = c
    if skipped:
        print(f"clipmech analyze circuits: skipped {len(skipped)} (domain, class) pairs without {args.split} images: "
              f"{', '.join(skipped[:10])}{' ...' if len(skipped) > 10 else ''}")

    domains = [d for d in run.domains if circuits[d]]
    first = next(iter(circuits[domains[0]].values()))
    first.draw(out / "circuit.png")
    points = inner_points(first.points)
    subsets = {"all": run.classes, "C2": [k for k in run.classes if k in run.source.c2],
               "C1": [k for k in run.classes if k not in run.source.c2]}
    sims = {"domains": domains, "classes": run.classes, "skipped": skipped, "paper_compat": run.paper_compat,
            "subsets": {name: len(ks) for name, ks in subsets.items()},
            **domain_similarity(circuits, domains, subsets, points, run.paper_compat)}
    for name in ("node_jaccard", "edge_jaccard", "wl_h2"):
        value_heatmap(np.array(sims[name]["mean"], dtype=float), domains,
                      f"{name.replace('_', ' ')} (mean over {len(run.classes)} classes)", out / f"{name}.png")
    atomic_write_json(sims, out / "similarity.json")

    if not args.no_faithfulness:
        # One reference forward per domain serves every class, circuit and point.
        fills = {d: ablation_values(run.model, run.reference(d), first.points, args.ablation) for d in domains}
        samples = {k: {d: run.sample(d, k) for d in domains if k in circuits[d]}
                   for k in tqdm(run.classes, desc="cross-domain faithfulness (images)", unit="class")}
        faith = faithfulness_across_domains(run.model, circuits, samples, run.head, fills, domains, points,
                                            args.ablation)
        atomic_write_json(faith, out / "faithfulness.json")
        value_heatmap(np.array(faith["per_point_mean"]), domains, "faithfulness at one point (own circuit, mean over "
                      "classes)", out / "faithfulness_per_point.png", xlabels=[short_point(p) for p in points])

    if args.no_causal:  # a previous run's causal results would not belong to these circuits
        for name in ("causal_ablation.json", "causal_ablation.png", "causal_placebo.json"):
            (out / name).unlink(missing_ok=True)
        print("clipmech analyze circuits: causal test skipped (--no-causal)")
    else:
        _causal_test(run, args, out, settings)
    print(f"clipmech analyze circuits: wrote {out}")
    return 0


def _cached_circuit(run: "_Run", args: argparse.Namespace, path: Path, settings: dict, load, top_k: int):
    """The circuit saved at `path` when its meta matches `settings`, else one discovered on `load()`
    ((images, labels), or None when the cell has no images: returns None) with `top_k` edges per node
    (0: nodes only) and saved there."""
    from clipmech.analysis.circuit import Circuit, discover_circuit
    from clipmech.analysis.discovery import eap_ig_circuit
    from clipmech.analysis.paper_compat import wraparound_edges

    c = Circuit.load_matching(path, settings)
    # a paper-IG circuit's meta has no "method" (files from before --method existed), an EAP-IG one has
    if c is not None and c.meta.get("method", "paper_ig") == settings.get("method", "paper_ig"):
        return c
    sample = load()
    if sample is None:
        return None
    meta = {**settings, "images_used": len(sample[0])}
    if settings.get("method", "paper_ig") == "paper_ig":
        c = discover_circuit(run.model, *sample, run.head, steps=args.steps, node_fraction=args.node_fraction,
                             edges=top_k > 0, top_k=max(top_k, 1), meta=meta)
    else:
        c = eap_ig_circuit(run.model, *sample, run.head, run.reference(settings["domain"]), steps=args.steps,
                           node_fraction=args.node_fraction, edges=top_k > 0, top_k=max(top_k, 1), meta=meta)
    if run.paper_compat and top_k:
        c = wraparound_edges(c, top_k)
    c.save(path)
    return c


# --------------------------------------------------------------------------------------- causal test
def _causal_test(run: "_Run", args: argparse.Namespace, out: Path, settings: dict) -> None:
    """The de-confounded causal test (module doc) on the test domain's C2 classes: its circuits,
    causal_ablation.json, the printed summary and causal_ablation.png."""
    from tqdm import tqdm

    from clipmech.analysis.controls import causal_summary, matched_causal_test
    from clipmech.analysis.figures import causal_effect_bars
    from clipmech.data.samples import DISCOVERY, causal_cells, discovery_mode
    from clipmech.utils import atomic_write_json

    for name in ("causal_ablation.json", "causal_ablation.png"):  # never leave a previous run's result beside
        (out / name).unlink(missing_ok=True)
    td, c2 = run.source.test_domain, [k for k in run.classes if k in run.source.c2]
    if td not in run.domains or len(run.domains) < 2 or not c2:
        print(f"clipmech analyze circuits: causal test skipped (needs test domain {td!r}, another domain and "
              "C2 classes)")
        return
    mode = discovery_mode(run.source.dataset, args.discovery)
    found, ablated = DISCOVERY[mode]
    cells, skipped = causal_cells(run.source.dataset, run.domains, c2, mode, run.n_images, run.seed)
    circuits: dict[str, dict] = {}
    for (d, k), (disc, _) in tqdm(cells.items(), desc="causal-test circuits (discovery drawings)", unit="circuit"):
        # nodes only: the test ablates nodes, so no edge IG is spent on these circuits
        meta = settings | {"domain": d, "class": k, "split": mode, "sampling": found, "rows": disc.tolist(), "top_k": 0}
        path = out / "causal_circuits" / d / f"{k.replace('/', '_')}.json"
        circuits.setdefault(d, {})[k] = _cached_circuit(run, args, path, meta, lambda disc=disc: run.images(disc), 0)
    held = {k: cells[td, k][1] for k in c2 if (td, k) in cells and len(cells[td, k][1])}
    if skipped:
        print(f"clipmech analyze circuits: causal test skipped {len(skipped)} (domain, class) cells without "
              f"{'training drawings' if mode == 'train' else '2 test images'}: {', '.join(skipped[:10])}"
              f"{' ...' if len(skipped) > 10 else ''}")
    if td not in circuits or len(circuits) < 2 or not held:
        print(f"clipmech analyze circuits: causal test skipped: needs discovery circuits of {td!r} and another domain "
              f"and held-out {td!r} images ({found} for discovery, {ablated} for ablation)")
        return
    res = matched_causal_test(run.model, circuits, td, {k: run.images(idx) for k, idx in held.items()}, run.head,
                              reference=run.reference(td), ablation=args.ablation, n_strata=args.n_strata,
                              n_draws=args.n_draws, seed=run.seed)
    result = {"test_domain": td, "other_domains": [d for d in circuits if d != td], "discovery": mode,
              "discovery_drawings": found, "ablation_drawings": ablated, "n_images": sum(map(len, held.values())),
              "cells_skipped": skipped, "rows": {k: {"discovery": cells[td, k][0].tolist(), "held_out": idx.tolist()}
                                                 for k, idx in held.items()}, **res}
    atomic_write_json(result, out / "causal_ablation.json")
    print(causal_summary(result))
    if res["per_class"]:
        causal_effect_bars(result, out / "causal_ablation.png")
    _placebo_test(run, circuits, cells, held, out, args.steps)


def _placebo_test(run: "_Run", circuits: dict, cells: dict, held: dict, out: Path, steps: int) -> None:
    """The study's causal test (placebo classes, randomisation null, balance; issue 26) on the same
    discovery circuits and held-out drawings: matching IG on the other domains' held-out drawings of
    the class, resample donors from the test domain's held-out drawings of other classes (seeded),
    mean ablation over `run.reference`. Writes causal_placebo.json (with `causal_finding` of this
    one model) and prints one line; skipped, with the reason printed, below 2 classes."""
    from clipmech.analysis.causal import causal_finding, causal_test_from_drawings
    from clipmech.utils import atomic_write_json

    (out / "causal_placebo.json").unlink(missing_ok=True)
    td = run.source.test_domain
    rng = np.random.default_rng(run.seed)
    ready = {}
    for k, idx in held.items():
        other = [cells[d, k][1] for d in run.domains if d != td and (d, k) in cells and len(cells[d, k][1])]
        donors = np.concatenate([held[j] for j in held if j != k] or [np.zeros(0, np.int64)])
        if other and len(donors):
            ready[k] = (idx, np.concatenate(other), rng.choice(donors, len(idx)))
    if len(ready) < 2:
        print(f"clipmech analyze circuits: placebo causal test skipped: {len(ready)} class(es) with held-out, "
              "matching (other domains' held-out) and donor drawings; the placebo needs 2")
        return
    images = {k: (run.images(h), run.images(m)[0], run.images(d)[0]) for k, (h, m, d) in ready.items()}
    res = causal_test_from_drawings(run.model, circuits, td, {k: v[0] for k, v in images.items()},
                                    {k: v[1] for k, v in images.items()}, {k: v[2] for k, v in images.items()},
                                    run.reference(td), run.head, steps=steps)
    res["finding"] = f = causal_finding([res])
    atomic_write_json(res, out / "causal_placebo.json")
    est = "n/a" if f.get("estimate") is None else f"{f['estimate']:+.3f}, sign-flip p {f['p']:.4f}"
    print(f"placebo causal test on {td} ({len(res['classes'])} classes, {f['excluded']['unbalanced']} unbalanced): "
          f"(shared - controls) - (placebo - controls) = {est}: {f['verdict']} (one model; the study's verdict "
          "pools classes over models)")


# ---------------------------------------------------------------------------------------- patching
def run_patching(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from clipmech.analysis.activations import inner_points
    from clipmech.analysis.figures import patching_scatter
    from clipmech.analysis.patching import patching_agreement
    from clipmech.utils import atomic_write_json

    run = _Run(args)
    if args.source_domain not in run.source.dataset.domains:
        from clipmech.utils import unknown_name_error
        raise unknown_name_error("source domain", args.source_domain, run.source.dataset.domains)
    out = run.source.out / f"patching_{run.source.label}"
    points = inner_points(run.model.analysis_points())
    rows, pooled = [], {"exact": [], "attribution": [], "ig": []}
    pairs = [(d, k) for d, k in run.pairs() if d != args.source_domain]
    for d, k in tqdm(pairs, desc="patching (domain, class)", unit="pair"):
        recv, src = run.sample(d, k), run.sample(args.source_domain, k)
        if recv is None or src is None:
            continue
        n = min(len(recv[0]), len(src[0]))
        per_point, values = patching_agreement(run.model, recv[0][:n], src[0][:n], recv[1][:n], run.head, points,
                                               args.steps)
        rows.append({"domain": d, "class": k, "n_images": n, "points": per_point})
        for v in values.values():
            for name in pooled:
                pooled[name].append(v[name])
    if not rows:
        raise ValueError(f"no (domain, class) pair had test images in both the domain and {args.source_domain!r}")
    def mean(values) -> float | None:  # None, not NaN, when every correlation was undefined (constant vectors)
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    summary = {}
    for name in ("attribution", "ig"):
        summary[name] = {p: mean(r["points"][p][f"spearman_{name}_vs_exact"] for r in rows) for p in points}
        summary[f"{name}_mean_over_points"] = mean(summary[name].values())
    atomic_write_json({"source_domain": args.source_domain, "summary": summary, "pairs": rows,
                       "note": "receiver = domain images, source = source-domain images of the same class; "
                               "IG is the negated corrupt-baseline IG so all three estimate the same effect"},
                      out / "patching.json")
    patching_scatter({k: torch.cat(v) for k, v in pooled.items()}, out / "patching.png")
    shown = {name: "n/a (every point constant)" if summary[f"{name}_mean_over_points"] is None
             else f"{summary[f'{name}_mean_over_points']:.3f}" for name in ("attribution", "ig")}
    print(f"attribution vs exact, mean Spearman over points: {shown['attribution']}; IG vs exact: {shown['ig']}")
    print(f"clipmech analyze patching: wrote {out}")
    return 0
