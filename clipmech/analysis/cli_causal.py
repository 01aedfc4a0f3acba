"""`clipmech analyze circuits|patching RUN_DIR`: causal analyses of a trained run.

circuits: one circuit per (domain, class) of the run's test split (paper §8.4, cached and resumable),
node / edge Jaccard and WL similarity matrices over domains (mean over classes, bootstrap CIs over
classes), heatmaps, a circuit drawing, cross-domain faithfulness, and the shared-node ablation test
of the paper's claim on the test domain's C2 classes. Everything goes to RUN_DIR/analysis/.

patching: exact activation patching vs attribution patching and IG at every analysis point
(receiver = domain d images of class k, source = --source-domain images of class k), with Spearman
rank correlations per point.
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = "analysis"


def register(subparsers) -> None:
    """Add `circuits` and `patching` to the `clipmech analyze` subparsers."""
    for name, func, helptext in (("circuits", run_circuits, "per-(domain, class) circuits, similarity, causal test"),
                                 ("patching", run_patching, "exact vs attribution patching vs IG (rank correlations)")):
        p = subparsers.add_parser(name, help=helptext, description=__doc__)
        p.add_argument("run_dir", metavar="RUN_DIR", help="a clipmech training run directory")
        p.add_argument("--checkpoint", type=int, metavar="EPOCH", help="epoch_N.pt to analyse (default: last)")
        p.add_argument("--domains", nargs="+", metavar="DOMAIN", help="domains (default: all)")
        p.add_argument("--classes", nargs="+", metavar="CLASS", help="classes (default: the run's C2 classes)")
        p.add_argument("--n-images", type=int, default=50, help="test images per (domain, class) (paper: 50)")
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
            p.add_argument("--ablation", choices=("mean", "zero"), default="mean")
            p.add_argument("--n-random", type=int, default=10, help="random node sets in the causal test")
            p.add_argument("--no-faithfulness", action="store_true", help="skip cross-domain faithfulness")
        else:
            p.add_argument("--source-domain", default="real", help="domain whose activations are patched in")
        p.set_defaults(func=func)


# ------------------------------------------------------------------------------------------- setup
class _Run:
    """The pieces of a run the analyses need: config, dataset, model, zero-shot head, samples."""

    def __init__(self, args: argparse.Namespace):
        import torch

        from clipmech.data import load_dataset
        from clipmech.eval.templates import get_templates
        from clipmech.eval.zeroshot import checkpoints, class_prompts_names
        from clipmech.models.hooked_clip import HookedCLIP
        from clipmech.train.config import load_config
        from clipmech.utils import unknown_name_error

        self.dir = Path(args.run_dir)
        if not (self.dir / "config.toml").is_file():
            raise FileNotFoundError(f"{self.dir / 'config.toml'} not found; is {self.dir} a clipmech run directory?")
        self.cfg = load_config(self.dir / "config.toml")
        found = dict(checkpoints(self.dir))
        if not found:
            raise FileNotFoundError(f"no epoch_N.pt checkpoints in {self.dir}; train first (clipmech train)")
        self.epoch = max(found) if args.checkpoint is None else args.checkpoint
        if self.epoch not in found:
            raise FileNotFoundError(f"{self.dir}/epoch_{self.epoch}.pt not found; available epochs: {sorted(found)}")
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = HookedCLIP.from_checkpoint(found[self.epoch]).to(self.device).eval()
        verify = getattr(args, "verify", None) or self.cfg["data"]["verify"]
        self.dataset = ds = load_dataset(str(self.cfg["data"]["dataset"]), verify=verify)
        for d in args.domains or []:
            if d not in ds.domains:
                raise unknown_name_error("domain", d, ds.domains)
        self.domains = list(args.domains or ds.domains)
        self.c2 = list(self.cfg["mixture"]["test_classes"] or ds.default_test_classes or [])
        for k in args.classes or []:
            if k not in ds.classes:
                raise unknown_name_error("class", k, ds.classes)
        self.classes = list(args.classes or self.c2)
        if not self.classes:
            raise ValueError("no classes to analyse: the run defines no C2 classes; pass --classes")
        self.test_domain = self.cfg["mixture"]["test_domain"] or ds.default_test_domain
        templates = get_templates(self.cfg["eval"]["templates"], ds.name)
        self.head = self.model.zero_shot_head(class_prompts_names(ds), templates).to(self.device)
        self.n_images, self.seed = args.n_images, args.seed
        self.split = None if args.split == "all" else args.split
        self.out = self.dir / RESULTS

    def sample(self, domain: str, cls: str, n: int | None = None):
        """(images [n, 3, S, S], labels [n]) of test images of `cls` in `domain`; None if there are none."""
        import torch

        from clipmech.eval.zeroshot import eval_images

        idx = self.dataset.indices(split=self.split, domains=[domain], classes=[cls])
        if len(idx) == 0:
            return None
        rng = np.random.default_rng(self.seed)
        idx = np.sort(rng.permutation(idx)[:n or self.n_images])
        images = eval_images(self.dataset, idx, self.model.image_size).to(self.device)
        labels = torch.as_tensor(self.dataset.class_idx[idx], device=self.device)
        return images, labels

    def reference(self, domain: str, n: int = 200):
        """Up to `n` random images of `domain` over all classes (the mean-ablation reference)."""
        from clipmech.eval.zeroshot import eval_images

        idx = self.dataset.indices(split=self.split, domains=[domain])
        idx = np.sort(np.random.default_rng(self.seed).permutation(idx)[:n])
        return eval_images(self.dataset, idx, self.model.image_size).to(self.device)

    def pairs(self) -> list[tuple[str, str]]:
        return [(d, k) for k in self.classes for d in self.domains]


def _short(point: str) -> str:
    return point.replace("visual.", "").replace(".hook_out", "").replace("hook_", "")


def _point_faithfulness(run: "_Run", circuit, sample, fill, ablation: str, point: str) -> float | None:
    """Faithfulness of `circuit` on `sample` with ablation at `point` only (ablation values `fill`);
    None where undefined (ablating every node there leaves the metric unchanged)."""
    from clipmech.analysis.circuits import faithfulness
    try:
        return faithfulness(run.model, circuit, *sample, run.head, ablation=ablation, fill=fill,
                            points=[point])["faithfulness"]
    except ValueError:
        return None


def _heatmap(matrix: np.ndarray, labels: list[str], title: str, path: Path, xlabels: list[str] | None = None) -> None:
    """Rows `labels`, columns `xlabels` (default: the same labels); colours clipped to [0, 1], values printed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clipmech.utils import atomic_write_bytes

    xlabels = labels if xlabels is None else xlabels
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(xlabels), 0.6 + 0.8 * len(labels)))
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(xlabels)), xlabels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(xlabels)):
            if np.isfinite(matrix[i, j]):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(buf.getvalue(), path)


# ---------------------------------------------------------------------------------------- circuits
def run_circuits(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from clipmech.analysis import circuit_similarity as S
    from clipmech.analysis.circuits import (Circuit, ablation_values, cross_domain_faithfulness, discover_circuit,
                                            shared_node_ablation)
    from clipmech.utils import atomic_write_json

    run = _Run(args)
    out = run.out / f"circuits_epoch{run.epoch}"
    settings = {"n_images": run.n_images, "split": args.split, "steps": args.steps, "node_fraction": args.node_fraction,
                "top_k": args.top_k, "seed": run.seed, "epoch": run.epoch}
    circuits: dict[str, dict[str, Circuit]] = {d: {} for d in run.domains}
    skipped = []
    for d, k in tqdm(run.pairs(), desc="circuits (domain, class)", unit="circuit"):
        path = out / "circuits" / d / f"{k.replace('/', '_')}.json"
        if path.exists() and path.with_suffix(".pt").exists():
            c = Circuit.load(path)
            if all(c.meta.get(key) == v for key, v in settings.items()):
                circuits[d][k] = c
                continue
        sample = run.sample(d, k)
        if sample is None:
            skipped.append(f"{d}/{k}")
            continue
        c = discover_circuit(run.model, *sample, run.head, steps=args.steps, node_fraction=args.node_fraction,
                             top_k=args.top_k, meta={**settings, "domain": d, "class": k, "images_used": len(sample[0])})
        c.save(path)
        circuits[d][k] = c
    if skipped:
        print(f"clipmech analyze circuits: skipped {len(skipped)} (domain, class) pairs without {args.split} images: "
              f"{', '.join(skipped[:10])}{' ...' if len(skipped) > 10 else ''}")

    domains = [d for d in run.domains if circuits[d]]
    first = next(iter(circuits[domains[0]].values()))
    first.draw(out / "circuit.png")
    points = [p for p in first.points if not p.endswith("hook_input")]
    sims: dict[str, Any] = {"domains": domains, "classes": run.classes, "skipped": skipped}
    measures = {"node_jaccard": lambda a, b: float(np.mean([S.node_jaccard(a, b, points)[p] for p in points])),
                "edge_jaccard": S.edge_jaccard, "wl_h2": lambda a, b: S.wl_kernel(a, b, 2)}
    for name, fn in measures.items():
        mean = np.full((len(domains), len(domains)), np.nan)
        cis = [[None] * len(domains) for _ in domains]
        for i, a in enumerate(domains):
            for j, b in enumerate(domains):
                vals = [fn(circuits[a][k], circuits[b][k]) for k in run.classes if k in circuits[a] and k in circuits[b]]
                if vals:
                    res = S.mean_with_ci(vals)
                    mean[i, j], cis[i][j] = res["mean"], res["ci"]
        sims[name] = {"mean": mean.tolist(), "ci95_over_classes": cis}
        _heatmap(mean, domains, f"{name.replace('_', ' ')} (mean over {len(run.classes)} classes)", out / f"{name}.png")
    sims["node_jaccard_per_point"] = {
        p: [[float(np.mean([S.node_jaccard(circuits[a][k], circuits[b][k], [p])[p] for k in run.classes
                            if k in circuits[a] and k in circuits[b]] or [np.nan])) for b in domains] for a in domains]
        for p in points}
    atomic_write_json(sims, out / "similarity.json")

    if not args.no_faithfulness:
        faith = {}
        # One reference forward per domain serves every class, circuit and point below.
        fills = {d: ablation_values(run.model, run.reference(d), first.points, args.ablation) for d in domains}
        for k in tqdm(run.classes, desc="cross-domain faithfulness", unit="class"):
            have = [d for d in domains if k in circuits[d]]
            samples = {d: run.sample(d, k) for d in have}
            names, mat = cross_domain_faithfulness(run.model, {d: circuits[d][k] for d in have},
                                                   {d: s[0] for d, s in samples.items()},
                                                   {d: s[1] for d, s in samples.items()}, run.head,
                                                   ablation=args.ablation, fill=fills)
            faith[k] = {"domains": names, "matrix": mat.tolist(), "per_point": {
                d: {p: _point_faithfulness(run, circuits[d][k], samples[d], fills[d], args.ablation, p) for p in points}
                for d in have}}
        full = np.full((len(domains), len(domains)), np.nan)
        for i, a in enumerate(domains):
            for j, b in enumerate(domains):
                vals = [f["matrix"][f["domains"].index(a)][f["domains"].index(b)] for f in faith.values()
                        if a in f["domains"] and b in f["domains"]]
                full[i, j] = np.mean(vals) if vals else np.nan
        per_point = np.array([[np.nanmean([np.nan if f["per_point"].get(d, {}).get(p) is None else f["per_point"][d][p]
                                            for f in faith.values()] or [np.nan]) for p in points] for d in domains])
        atomic_write_json({"per_class": faith, "mean": full.tolist(), "domains": domains, "ablation": args.ablation,
                           "points": points, "per_point_mean": per_point.tolist(),
                           "note": "per_point: a domain's own circuit on its own images, ablated at that point only"},
                          out / "faithfulness.json")
        _heatmap(per_point, domains, "faithfulness at one point (own circuit, mean over classes)",
                 out / "faithfulness_per_point.png", xlabels=[_short(p) for p in points])

    td = run.test_domain
    c2 = [k for k in run.classes if k in run.c2 and k in circuits.get(td, {})]
    if td in domains and len(domains) > 1 and c2:
        samples = {k: run.sample(td, k, n=10_000) for k in c2}
        reference = run.reference(td)
        # Accuracy over all classes (the paper's C2 accuracy) and over the analysed C2 classes only,
        # which stays informative when a weak model's all-class accuracy is at the floor.
        c2_rows = torch.as_tensor([run.dataset.classes.index(k) for k in c2], device=run.device)
        heads = {"all_classes": (run.head, lambda lab: lab),
                 "c2_classes_only": (run.head[c2_rows], lambda lab: (lab[:, None] == c2_rows[None]).long().argmax(1))}
        result = {"test_domain": td, "classes": c2, "other_domains": [d for d in domains if d != td]}
        for name, (head, relabel) in heads.items():
            try:
                result[name] = res = shared_node_ablation(
                    run.model, circuits, td, {k: (im, relabel(lab)) for k, (im, lab) in samples.items()}, head,
                    ablation=args.ablation, reference=reference, n_random=args.n_random)
            except ValueError as err:  # e.g. no node shared with another domain: nothing to ablate
                print(f"clipmech analyze circuits: causal test ({name}) skipped: {err}")
                continue
            print(f"causal test on {td} C2, {name} ({res['n_images']} images, {len(res['classes'])} classes): "
                  f"accuracy {res['accuracy_clean']:.3f}; accuracy drop with ablated nodes " + ", ".join(
                      f"{c} {v['drop']:+.3f} [{v['drop_ci95'][0]:+.3f}, {v['drop_ci95'][1]:+.3f}]"
                      for c, v in res["conditions"].items()) + "; contrasts " + ", ".join(
                      f"{c} {v['drop']:+.3f} [{v['drop_ci95'][0]:+.3f}, {v['drop_ci95'][1]:+.3f}]"
                      for c, v in res["contrasts"].items()))
        atomic_write_json(result, out / "causal_ablation.json")
        if any(name in result for name in heads):
            _causal_bars(result, [name for name in heads if name in result], out / "causal_ablation.png")
    else:
        print(f"clipmech analyze circuits: causal test skipped (needs test domain {td!r}, another domain and C2 classes)")
    print(f"clipmech analyze circuits: wrote {out}")
    return 0


def _causal_bars(result: dict, heads: list[str], path: Path) -> None:
    """Accuracy drop (points, 95 % CI) per ablation condition, one panel per zero-shot head."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clipmech.utils import atomic_write_bytes

    colors = matplotlib.style.library["tableau-colorblind10"]["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, len(heads), figsize=(4.2 * len(heads), 3.6), squeeze=False)
    for ax, head in zip(axes[0], heads):
        res = result[head]
        names = list(res["conditions"])
        drops = [100 * res["conditions"][c]["drop"] for c in names]
        lo = [100 * res["conditions"][c]["drop_ci95"][0] for c in names]
        hi = [100 * res["conditions"][c]["drop_ci95"][1] for c in names]
        ax.bar(range(len(names)), drops, color=[colors[i % len(colors)] for i in range(len(names))],
               yerr=[[d - low for d, low in zip(drops, lo)], [high - d for d, high in zip(drops, hi)]], capsize=3)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(names)), [n.replace("_", " ") for n in names], rotation=30, ha="right")
        ax.set_ylabel("accuracy drop (points)")
        nodes = res["nodes_ablated_mean_per_class"]
        ax.set_title(f"{head.replace('_', ' ')}: clean {100 * res['accuracy_clean']:.1f} %, {res['n_images']} images\n"
                     f"{nodes['shared']:.0f} nodes/class matched, {nodes['shared_all']:.0f} all shared", fontsize=8)
    fig.suptitle(f"{result['test_domain']} C2: ablating nodes shared with other domains", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(buf.getvalue(), path)


# ---------------------------------------------------------------------------------------- patching
def run_patching(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from clipmech.analysis import patching as P
    from clipmech.utils import atomic_write_json

    run = _Run(args)
    if args.source_domain not in run.dataset.domains:
        from clipmech.utils import unknown_name_error
        raise unknown_name_error("source domain", args.source_domain, run.dataset.domains)
    out = run.out / f"patching_epoch{run.epoch}"
    points = [p for p in run.model.analysis_points() if not p.endswith("hook_input")]
    rows, pooled = [], {"exact": [], "attribution": [], "ig": []}
    pairs = [(d, k) for d, k in run.pairs() if d != args.source_domain]
    for d, k in tqdm(pairs, desc="patching (domain, class)", unit="pair"):
        recv, src = run.sample(d, k), run.sample(args.source_domain, k)
        if recv is None or src is None:
            continue
        n = min(len(recv[0]), len(src[0]))
        recv_x, src_x, labels = recv[0][:n], src[0][:n], recv[1][:n]
        metric = P.true_class_logit(run.head, labels)
        attr = P.attribution_patch(run.model, src_x, recv_x, metric, points)
        row: dict[str, Any] = {"domain": d, "class": k, "n_images": n, "points": {}}
        for p in points:
            exact = P.activation_patch(run.model, recv_x, metric, p, mode="resample", source=src_x, batch_units=64)
            ig = -P.integrated_gradients(run.model, recv_x, metric, p, baseline="corrupt", corrupt=src_x,
                                         steps=args.steps, rule="midpoint")
            entry = {}
            for name, est in (("attribution", attr[p]), ("ig", ig)):
                try:
                    entry[f"spearman_{name}_vs_exact"] = P.spearman(est, exact)
                except ValueError:  # constant vectors (e.g. all-dead channels): counted, not NaN
                    entry[f"spearman_{name}_vs_exact"] = None
            row["points"][p] = entry
            pooled["exact"].append(exact)
            pooled["attribution"].append(attr[p])
            pooled["ig"].append(ig)
        rows.append(row)
    if not rows:
        raise ValueError(f"no (domain, class) pair had test images in both the domain and {args.source_domain!r}")
    summary = {}
    for name in ("attribution", "ig"):
        per_point = {p: [r["points"][p][f"spearman_{name}_vs_exact"] for r in rows] for p in points}
        summary[name] = {p: float(np.mean([v for v in vals if v is not None])) if any(v is not None for v in vals)
                         else None for p, vals in per_point.items()}
        summary[f"{name}_mean_over_points"] = float(np.mean([v for v in summary[name].values() if v is not None]))
    atomic_write_json({"source_domain": args.source_domain, "summary": summary, "pairs": rows,
                       "note": "receiver = domain images, source = source-domain images of the same class; "
                               "IG is the negated corrupt-baseline IG so all three estimate the same effect"},
                      out / "patching.json")
    _scatter({k: torch.cat(v) for k, v in pooled.items()}, out / "patching.png")
    print(f"attribution vs exact, mean Spearman over points: {summary['attribution_mean_over_points']:.3f}; "
          f"IG vs exact: {summary['ig_mean_over_points']:.3f}")
    print(f"clipmech analyze patching: wrote {out}")
    return 0


def _scatter(pooled: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clipmech.utils import atomic_write_bytes

    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    for ax, name in zip(axes, ("attribution", "ig")):
        ax.scatter(pooled["exact"].cpu(), pooled[name].cpu(), s=3, alpha=0.4)
        ax.set_xlabel("exact patching effect")
        ax.set_ylabel(f"{name} estimate")
        ax.axline((0, 0), slope=1, color="grey", lw=0.8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(buf.getvalue(), path)
