"""`clipmech analyze cka|embeddings|sae|sharing|circuits|patching`: analyses of a trained run or of any CLIP.

The model is a clipmech run (RUN_DIR), an open_clip model with pretrained weights (--model NAME
--pretrained TAG_OR_PATH) or a Hugging Face CLIPModel (--hf PATH); with the last two give --dataset
and --out. cka: domain x domain CKA at every analysis point (class-centroid or per-image rows;
subsets all/C1/C2; linear and RBF; bootstrap CIs over classes; permutation baseline) ->
cka_<mode>.json and one PNG per domain pair. embeddings: UMAP with and without the test domain plus
separation scores -> embeddings.json, umap*.png. sae: an SAE on one hook point, streamed from
activation shards -> sae_<point>.pt/.json. sharing: feature sharing (paper Alg. 1-2) with that SAE
and concept names -> sharing_<point>.json, sharing_<point>.png. Results go to RUN_DIR/analysis (or
--out); activations are cached in its cache/ folder and reused by all four.
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np

from clipmech.analysis import cli_causal, cli_explain
from clipmech.analysis.source import RESULTS, add_source_arguments, source_flags

EMBED_POINT = "hook_image_embed_normalized"
SPLITS = ("test", "train", "all")


def register(subparsers) -> None:
    analyze = subparsers.add_parser("analyze", aliases=["analyse"], description=__doc__,
                                    help="analyses of a trained run or any CLIP (cka, embeddings, sae, sharing, "
                                         "circuits, patching)")
    sub = analyze.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    for name, func, text in (("cka", run_cka, "domain x domain CKA at every analysis point"),
                             ("embeddings", run_embeddings, "UMAP figures and domain-separation scores"),
                             ("sae", run_sae, "train a sparse autoencoder on one hook point"),
                             ("sharing", run_sharing, "SAE feature sharing between domains (paper Alg. 1-2)")):
        p = sub.add_parser(name, help=text, description=__doc__)
        add_source_arguments(p)
        p.add_argument("--classes", nargs="+", metavar="CLASS",
                       help="the held-out (C2) classes (default: the run's; for --model / --hf: the dataset's)")
        p.add_argument("--split", choices=SPLITS, default="all" if name == "sae" else "test",
                       help="which images to use (sae default: all; others: test)")
        p.add_argument("--pooling", choices=("mean", "cls"),
                       help="spatial/token mean or ViT CLS token (default: mean for ResNets; ViTs must choose)")
        p.add_argument("--batch-size", type=int, default=128)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        if name == "cka":
            p.add_argument("--mode", choices=("centroid", "image"), default="centroid")
            p.add_argument("--kernels", nargs="+", choices=("linear", "rbf"), default=["linear", "rbf"])
            p.add_argument("--estimator", choices=("unbiased", "biased"), default="unbiased")
            p.add_argument("--n-boot", type=int, default=200)
            p.add_argument("--n-perm", type=int, default=100)
            p.add_argument("--paper-compat", action="store_true",
                           help="the paper code's 'all'/'C1' class list from painting for every pair "
                                "(also [analysis] paper_compat in the run config)")
            p.add_argument("--min-rows", type=int, default=None,
                           help="skip domain pairs with fewer rows (default: clipmech.analysis.cka.MIN_ROWS = 8)")
        if name == "embeddings":
            p.add_argument("--exclude", metavar="DOMAIN", help="domain left out of the second UMAP (default: test domain)")
            p.add_argument("--per-domain", type=int, default=2000, help="UMAP points per domain (seeded sample)")
            p.add_argument("--no-densmap", action="store_true", help="plain UMAP instead of densMAP")
        if name in ("sae", "sharing"):
            p.add_argument("--point", default=EMBED_POINT, help=f"hook point (default: {EMBED_POINT})")
        if name == "sae":
            p.add_argument("--expansion", type=int, default=4, help="latents = expansion x width (paper: 4)")
            p.add_argument("--k", type=int, help="top-k SAE with this k (default: ReLU + L1)")
            p.add_argument("--l1", type=float, default=None,
                           help="L1 coefficient (default 1e-4 * 1024 / width: the paper's 1e-4 at 1024-d)")
            p.add_argument("--lr", type=float, default=1e-3)
            p.add_argument("--epochs", type=int, default=50)
            p.add_argument("--sae-batch-size", type=int, default=2048)
        if name == "sharing":
            p.add_argument("--subset", choices=("C2", "C1", "all"), default="C2",
                           help="which classes to compare (paper: C2)")
            p.add_argument("--top", type=int, default=20, help="latents per image (paper: 20)")
            p.add_argument("--vocab", metavar="FILE", help="concept vocabulary, one word per line, embedded by the "
                           "run's text tower (paper: CLIP-Dissect 20k words; default: dataset class and domain words)")
            p.add_argument("--allow-dense", action="store_true",
                           help="compute sharing even when the SAE's L0 >= its input width (refused by default)")
        p.set_defaults(func=func)
    cli_causal.register(sub)
    cli_explain.register(sub)
    for name, p in {id(p): (n, p) for n, p in sub.choices.items()}.values():
        p.add_argument("--verify", choices=("none", "header", "decode"),
                       help="check DomainNet image files when loading (default: the run's [data] verify, else none)")
        p.set_defaults(func=_one_writer(name, p.get_default("func")))


def _one_writer(name: str, func):
    """`func` holding the lock of this analysis in its output folder (RUN/analysis or --out:
    .clipmech-analyze-NAME.lock), so two processes never write one analysis's files at once;
    different analyses run in parallel."""
    def run(args: argparse.Namespace) -> int:
        from clipmech.locks import unit_lock
        from clipmech.train.run_dir import require_run_dir
        if args.run_dir:
            require_run_dir(args.run_dir)
        out = Path(args.out) if args.out else Path(args.run_dir) / RESULTS if args.run_dir else None
        if out is None:  # load_source names what is missing
            return func(args)
        with unit_lock(out, f"analyze-{name}", recursive=True):
            return func(args)
    return run


class _Context:
    """The model, dataset, class subsets and rows to analyse, and where results go."""

    def __init__(self, args: argparse.Namespace):
        import torch

        from clipmech.analysis.source import load_source
        from clipmech.utils import unknown_name_error

        self.source = src = load_source(args)
        self.model, self.model_key, self.dataset = src.model, src.model_key, src.dataset
        self.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.is_vit = self.model.analysis_points()[0] == "visual.hook_embed"
        if args.pooling is None and self.is_vit:
            raise ValueError("this model is a ViT: choose how tokens are pooled with --pooling cls or --pooling mean "
                             "(the choice is recorded in the outputs)")
        self.pooling = args.pooling or "mean"
        ds = self.dataset
        self.indices = ds.indices(split=None if args.split == "all" else args.split)
        if len(self.indices) == 0:
            raise ValueError(f"dataset {ds.name!r} has no {args.split!r} images; choose another --split")
        for k in args.classes or []:
            if k not in ds.classes:
                raise unknown_name_error("class", k, ds.classes)
        c2 = [ds.class_index(k) for k in (args.classes or src.c2)]
        self.subsets = {"all": list(range(len(ds.classes))), "C1": [k for k in range(len(ds.classes)) if k not in c2],
                        "C2": c2}
        self.test_domain = src.test_domain
        self.out = src.out
        self.args = args

    def features(self, points: list[str]) -> dict:
        from clipmech.analysis.activations import extract_activations
        return extract_activations(self.model, self.dataset, points, self.pooling, indices=self.indices,
                                   batch_size=self.args.batch_size, cache_dir=self.out / "cache",
                                   model_key=self.model_key, device=self.device)

    def meta(self) -> dict:
        return {**self.source.meta, "dataset": self.dataset.name, "split": self.args.split, "pooling": self.pooling,
                "n_images": int(len(self.indices))}


def _save_png(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    from clipmech.utils import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(buf.getvalue(), path)


def run_cka(args: argparse.Namespace) -> int:
    from clipmech.analysis.cka import domain_cka
    from clipmech.analysis.paper_compat import cka_class_list_domain
    from clipmech.utils import atomic_write_json

    ctx = _Context(args)
    paper_compat = bool(args.paper_compat or ctx.source.paper_compat)
    from clipmech.analysis.activations import inner_points
    points = inner_points(ctx.model.analysis_points())
    feats = ctx.features(points)
    ds, rows = ctx.dataset, ctx.indices
    subsets = {k: v for k, v in ctx.subsets.items() if v}
    res = domain_cka(feats, ds.class_idx[rows], ds.domain_idx[rows], ds.domains, subsets, mode=args.mode,
                     kernels=args.kernels, estimator=args.estimator, n_boot=args.n_boot, n_perm=args.n_perm,
                     seed=args.seed, pooling=ctx.pooling, progress=True,
                     class_list_domain=cka_class_list_domain(ds.domains, paper_compat),
                     **({"min_rows": args.min_rows} if args.min_rows is not None else {}))
    res["meta"] = {**ctx.meta(), "paper_compat": paper_compat}
    path = atomic_write_json(res, ctx.out / f"cka_{args.mode}.json")
    figs = _plot_cka(res, ctx.out / f"cka_{args.mode}", args.kernels[0])
    print(f"clipmech analyze cka: {len(points)} points x {len(ds.domains) * (len(ds.domains) - 1) // 2} domain pairs "
          f"-> {path} and {len(figs)} figures in {ctx.out / f'cka_{args.mode}'}")
    for subset, by_kernel in res["results"].items():
        for pair, r in by_kernel[args.kernels[0]].items():
            vals = [v for v in r["cka"] if v is not None]
            flags = [u for u in r["unreliable"] if u]
            if vals:
                print(f"  {subset:>3} {args.kernels[0]} {pair:<22} min {min(vals):.3f}  last {vals[-1]:.3f}"
                      + (f"  UNRELIABLE at {len(flags)} points: {flags[0]}" if flags else ""))
    for s in res["skipped"]:
        print(f"  skipped {s['subset']} {s['pair']}: {s['reason']}")
    return 0


def _plot_cka(res: dict, folder: Path, kernel: str) -> list[Path]:
    """One PNG per domain pair: CKA per layer for each class subset, CI band, permutation 95th pct."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = sorted({pair for by_kernel in res["results"].values() for pair in by_kernel.get(kernel, {})})
    x = np.arange(len(res["points"]))
    labels = [p.replace("visual.", "").replace(".hook_out", "").replace("hook_", "") for p in res["points"]]
    paths = []
    for pair in pairs:
        fig, ax = plt.subplots(figsize=(8, 3.5), dpi=110)
        for subset, by_kernel in res["results"].items():
            r = by_kernel.get(kernel, {}).get(pair)
            if r is None:
                continue
            y = np.array([np.nan if v is None else v for v in r["cka"]], dtype=float)
            lo = np.array([np.nan if v is None else v for v in r["ci_low"]], dtype=float)
            hi = np.array([np.nan if v is None else v for v in r["ci_high"]], dtype=float)
            perm = np.array([np.nan if v is None else v for v in r["perm_p95"]], dtype=float)
            (line,) = ax.plot(x, y, marker="o", ms=3, label=f"{subset} (n={r['n_rows']})")
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
            ax.plot(x, perm, ls=":", color=line.get_color(), lw=1)
        ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(f"{kernel} CKA ({res['estimator']})")
        ax.set_title(f"{pair.replace('|', ' vs ')}: {res['mode']} rows; band = {res['ci']:.0%} CI, dotted = "
                     "permutation 95th pct", fontsize=9)
        ax.legend(fontsize=7)
        path = folder / f"{pair.replace('|', '_')}.png"
        _save_png(fig, path)
        paths.append(path)
    return paths


def run_embeddings(args: argparse.Namespace) -> int:
    from clipmech.analysis.embeddings import plot_umap, separation_scores
    from clipmech.utils import atomic_write_json, unknown_name_error

    ctx = _Context(args)
    ds, rows = ctx.dataset, ctx.indices
    exclude = args.exclude or ctx.test_domain
    if exclude is not None and exclude not in ds.domains:
        raise unknown_name_error("domain", exclude, ds.domains)
    emb = ctx.features([EMBED_POINT])[EMBED_POINT].numpy()
    dom, cls = ds.domain_idx[rows], ds.class_idx[rows]
    res = {"meta": ctx.meta(), "point": EMBED_POINT,
           "scores": separation_scores(emb, dom, ds.domains, class_idx=cls, seed=args.seed)}
    common = dict(per_domain=args.per_domain, seed=args.seed, densmap=not args.no_densmap)
    res["umap"] = [plot_umap(emb, dom, ds.domains, ctx.out / "umap.png", **common)]
    if exclude is not None:
        res["umap"].append(plot_umap(emb, dom, ds.domains, ctx.out / f"umap_without_{exclude}.png", exclude=exclude,
                                     **common))
    path = atomic_write_json(res, ctx.out / "embeddings.json")
    o, c = res["scores"]["overall"], res["scores"].get("class_conditional", {})
    print(f"clipmech analyze embeddings: -> {path}, {', '.join(u['path'] for u in res['umap'])}")
    print(f"  overall: silhouette {o['silhouette']:.3f}, probe domain accuracy {o['probe_accuracy']:.3f} "
          f"(chance {o['chance']:.3f})")
    if c.get("n_classes"):
        print(f"  class-conditional ({c['n_classes']} classes): silhouette {c['silhouette']:.3f}, probe "
              f"{c['probe_accuracy']:.3f} (chance {c['chance']:.3f})")
    return 0


def _slug(point: str) -> str:
    return point.replace(".", "_")


def run_sae(args: argparse.Namespace) -> int:
    from clipmech.analysis.sae import ActivationShards, ShardWriter, evaluate_sae, train_sae
    from clipmech.utils import atomic_write_json

    ctx = _Context(args)
    acts = ctx.features([args.point])[args.point]
    shard_dir = ctx.out / "shards" / f"{_slug(args.point)}_{ctx.model_key[5:]}_{args.split}_{ctx.pooling}"
    if not (shard_dir / "meta.json").exists():
        writer = ShardWriter(shard_dir, shard_size=65536)
        for part in acts.split(65536):
            writer.add(part)
        writer.close()
    shards = ActivationShards(shard_dir)
    n_latents = args.expansion * shards.dim
    sae, history = train_sae(shards, n_latents, k=args.k, l1_coef=args.l1, lr=args.lr, epochs=args.epochs,
                             batch_size=args.sae_batch_size, seed=args.seed, device=ctx.device)
    metrics = evaluate_sae(sae, shards)
    info = {"meta": ctx.meta(), "point": args.point, "n_latents": n_latents, "k": args.k, "l1": sae.cfg.l1_coef,
            "lr": args.lr, "epochs": args.epochs, "metrics": metrics, "history": history,
            "shards": str(shard_dir)}
    sae.save(ctx.out / f"sae_{_slug(args.point)}.pt", extra=info)
    path = atomic_write_json(info, ctx.out / f"sae_{_slug(args.point)}.json")
    print(f"clipmech analyze sae: {args.point} ({shards.dim}-d, {len(shards)} vectors) -> {n_latents} latents; "
          f"FVU {metrics['fvu']:.3f}, L0 {metrics['l0']:.1f}, dead {metrics['dead_latents']} -> {path}")
    for flag in metrics["flags"]:
        print(f"  warning: {flag} (flagged in {path})")
    if args.k is None and metrics["l0"] >= shards.dim:
        print(f"  warning: the SAE is not sparse (L0 {metrics['l0']:.0f} >= {shards.dim} input dimensions); "
              f"raise --l1 (now {sae.cfg.l1_coef:g}) or use a top-k SAE (--k); `analyze sharing` will refuse it")
    return 0


def run_sharing(args: argparse.Namespace) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from clipmech.analysis.sae import SparseAutoencoder
    from clipmech.analysis.sharing import (dataset_vocabulary, embed_words, feature_sharing, name_latents,
                                           name_latents_by_data, read_vocabulary, require_sparse,
                                           top_latent_histograms)
    from clipmech.utils import atomic_write_json

    ctx = _Context(args)
    sae_path = ctx.out / f"sae_{_slug(args.point)}.pt"
    if not sae_path.exists():
        raise FileNotFoundError(f"{sae_path} not found; train it first: clipmech analyze sae {source_flags(args)} "
                                f"--point {args.point}")
    sae = SparseAutoencoder.load(sae_path)
    ds, rows = ctx.dataset, ctx.indices
    classes = ctx.subsets[args.subset]
    if not classes:
        raise ValueError(f"there are no {args.subset} classes (no held-out classes given); use --subset all or "
                         "name them with --classes")
    keep = np.isin(ds.class_idx[rows], classes)
    acts = ctx.features([args.point])[args.point][torch.from_numpy(keep)]
    if acts.shape[1] != sae.cfg.d_in:
        raise ValueError(f"{sae_path} was trained on {sae.cfg.d_in}-d inputs but {args.point} gives {acts.shape[1]}-d; "
                         "retrain the SAE for this point and pooling")
    with torch.no_grad():
        codes = sae.encode(acts)
    require_sparse(float((codes > 0).sum(1).double().mean()), sae.cfg.d_in, args.allow_dense)
    H = top_latent_histograms(codes, ds.class_idx[rows][keep], ds.domain_idx[rows][keep], classes, len(ds.domains),
                              top=args.top)
    res = feature_sharing(H, ds.domains, class_names=[ds.classes[k] for k in classes])
    res.update(meta=ctx.meta(), point=args.point, sae=str(sae_path), top=args.top, class_subset=args.subset,
               test_domain=ctx.test_domain)
    counts = H.sum((0, 1))
    if sae.cfg.d_in == ctx.model.cfg["embed_dim"] and args.point.startswith("hook_image_embed"):
        words = read_vocabulary(args.vocab) if args.vocab else dataset_vocabulary(ds)
        names = name_latents(sae.W_dec.detach(), embed_words(ctx.model, words), words)
        res["concept_naming"] = {"method": "nearest word to the decoder column in the joint embedding",
                                 "vocabulary": str(args.vocab) if args.vocab else "dataset class and domain words",
                                 "n_words": len(words)}
    else:
        # an intermediate layer has no text space to compare decoder columns with
        names = name_latents_by_data(codes, ds.class_idx[rows][keep], ds.domain_idx[rows][keep],
                                     ds.classes, ds.domains)
        res["concept_naming"] = {"method": "top-activating classes and domains (intermediate-layer SAE: no word "
                                           "vocabulary applies)", "vocabulary": None}
        if args.vocab:
            print(f"  note: --vocab ignored: {args.point} is not the joint embedding; latents are named by their "
                  "top-activating classes and domains")
    res["concepts"] = [dict(names[i], count=int(counts[i])) for i in counts.argsort(descending=True)[:30].tolist()
                       if counts[i] > 0]
    path = atomic_write_json(res, ctx.out / f"sharing_{_slug(args.point)}.json")
    M = np.array([[np.nan if v is None else v for v in row] for row in res["matrix"]], dtype=float)
    fig, ax = plt.subplots(figsize=(5, 4.3), dpi=120)
    im = ax.imshow(M, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(ds.domains)), ds.domains, rotation=45, ha="right")
    ax.set_yticks(range(len(ds.domains)), ds.domains)
    for i in range(len(M)):
        for j in range(len(M)):
            if np.isfinite(M[i, j]):
                ax.text(j, i, f"{M[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w" if M[i, j] < 0.5 else "k")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(f"SAE feature sharing ({args.subset}, {args.point})", fontsize=9)
    _save_png(fig, ctx.out / f"sharing_{_slug(args.point)}.png")
    print(f"clipmech analyze sharing: {len(classes)} classes -> {path}")
    for d, s in res["score"].items():
        mark = "  (test domain)" if d == ctx.test_domain else ""
        print(f"  score {d:<10} {s:.3f}{mark}" if s is not None else f"  score {d:<10} n/a")
    return 0
