"""`clipmech data ...`: mixture TSVs, dataset summaries, the emoji dataset builder."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

SETUP_CHOICES = ["natural_only", "cg_low", "cg_high", "lod", "pseudo_low", "pseudo_high"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `data` command with subcommands mixture, imagenet-captions, summary, build-emoji."""
    data = subparsers.add_parser("data", help="datasets, training mixtures, TSV export")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])

    mix = sub.add_parser("mixture", help="write a training/validation mixture TSV + JSON manifest")
    mix.add_argument("--domainnet", required=True, metavar="ROOT",
                     help="DomainNet root folder (or 'emoji' for the embedded dataset)")
    mix.add_argument("--setup", required=True, choices=SETUP_CHOICES)
    mix.add_argument("--test-domain", metavar="DOMAIN", help="test domain d* (default: the dataset's)")
    mix.add_argument("--test-classes", metavar="NAMES", help="comma-separated C2 classes (default: paper's 15)")
    mix.add_argument("--allow-p", type=float, metavar="P", help="allow-p interpolation (cg_low / cg_high)")
    mix.add_argument("--domains", metavar="LETTERS", help="included domains by initial, e.g. 'cqrs'")
    mix.add_argument("--aligned", action="store_true", help="generic-term (aligned) captions")
    mix.add_argument("--split", choices=["train", "val"], default="train")
    mix.add_argument("--base", metavar="BASE.tsv", help="base image-text TSV put first, never subsampled")
    mix.add_argument("--seed", type=int, default=42, help="caption seed (default 42)")
    mix.add_argument("--in-sketch", metavar="ROOT", help="ImageNet-Sketch folder: the paper's sketch add variant "
                     "(natural_only, lod, cg_high), or with --in-sketch-keep the mix variant (cg_high)")
    mix.add_argument("--in-sketch-keep", metavar="KEEP", help="mix variant: fiftyp, thirtyp, twentyfivep, tenp, "
                     "fivep, onep or one (share of C1 classes whose test-domain images stay)")
    mix.add_argument("--in-sketch-filter", choices=["mapping", "dn_substring", "dn_words"], default="mapping",
                     help="ImageNet-Sketch filter: the paper's class mapping (default) or DomainNet names as "
                          "substrings / whole words (not the paper's)")
    mix.add_argument("--paper-compat", action="store_true",
                     help="reproduce the paper code's allow-p float ceil (experiments/README.md, parity table)")
    mix.add_argument("--no-subsample", action="store_true", help="keep the whole pool (id suffix -nosub)")
    mix.add_argument("--verify", choices=["none", "header", "decode"], default="header",
                     help="DomainNet file check: 'header' skips files PIL cannot identify (default), 'decode' "
                          "also truncated files (decodes every image), 'none' only missing files")
    mix.add_argument("--out", required=True, metavar="FILE.tsv",
                     help="output TSV (a folder: use the paper's file name inside it)")
    mix.set_defaults(func=_mixture)

    caps = sub.add_parser(
        "imagenet-captions", help="ImageNet-Captions JSON + ImageNet train folder -> base TSV",
        description="Write the paper's base TSV (caption = title; tags; description, docs/methods.md#data) and a "
                    "deterministic train/val split: an entry is validation iff int(sha256(file name)[:8], 16) < "
                    "FRACTION * 2**32, so the split does not depend on the JSON's order or on which entries are "
                    "present. The paper's own split file is not public; this documented rule replaces it.")
    caps.add_argument("--json", required=True, metavar="FILE", help="the ImageNet-Captions JSON release")
    caps.add_argument("--imagenet", required=True, metavar="ROOT", help="ImageNet folder (ROOT/train/<wnid>/...)")
    caps.add_argument("--out", required=True, metavar="FILE.tsv",
                      help="train TSV; the validation TSV goes to FILE-val.tsv, the manifest to FILE.json")
    caps.add_argument("--val-fraction", type=float, default=0.05,
                      help="share of entries in validation: those with int(sha256(file name)[:8], 16) < "
                           "FRACTION * 2**32 (default 0.05; 0: no validation TSV)")
    caps.set_defaults(func=_imagenet_captions)

    summ = sub.add_parser("summary", help="print a domain x split count table")
    summ.add_argument("dataset", metavar="NAME_OR_ROOT", help="'emoji' or a DomainNet root folder")
    summ.add_argument("--verify", choices=["none", "header", "decode"], default="none")
    summ.set_defaults(func=_summary)

    build = sub.add_parser("build-emoji", help="rebuild the embedded emoji dataset from npm / Debian / PyPI")
    build.add_argument("--sources", metavar="DIR", help="reuse already fetched sources (else a temp folder)")
    build.add_argument("--fetch-to", metavar="DIR", help="fetch the sources into DIR and keep them")
    build.add_argument("--out", metavar="DIR", help="output folder (default: the package's assets folder)")
    build.add_argument("--size", type=int, default=40, help="image side in pixels (default 40)")
    build.set_defaults(func=_build_emoji)


def _load(name: str, verify: str):
    from clipmech.data import load_dataset
    return load_dataset(name, verify=verify)


def _mixture(args: argparse.Namespace) -> int:
    from clipmech.data.mixtures import build_mixture
    from clipmech.locks import ensure_folder
    folder = Path(args.out) if args.out.endswith(("/", "\\")) or Path(args.out).is_dir() else Path(args.out).parent
    ensure_folder(folder)  # a file in the way fails now, not after the mixture is built
    ds = _load(args.domainnet, args.verify)
    m = build_mixture(ds, args.setup, test_domain=args.test_domain, test_classes=args.test_classes,
                      allow_p=args.allow_p, domains=args.domains, aligned=args.aligned, split=args.split,
                      seed=args.seed, base=args.base, subsample=not args.no_subsample, paper_compat=args.paper_compat)
    if args.in_sketch:
        from clipmech.data.imagenet_sketch import add_imagenet_sketch
        m = add_imagenet_sketch(m, args.in_sketch, keep=args.in_sketch_keep, filter=args.in_sketch_filter,
                                seed=args.seed)
    elif args.in_sketch_keep:
        raise ValueError("--in-sketch-keep needs --in-sketch ROOT (the ImageNet-Sketch folder)")
    out = Path(args.out)
    if out.is_dir() or args.out.endswith(("/", "\\")):
        out = out / m.filename()
    m.to_tsv(out)
    extra = f" + {len(m.extra_lines)} ImageNet-Sketch" if m.extra_lines else ""
    print(f"wrote {out} ({len(m.base_lines)} base + {len(m.indices)} {ds.name}{extra} lines, id {m.id}) "
          f"and {out.with_suffix('.json')}")
    return 0


def _imagenet_captions(args: argparse.Namespace) -> int:
    from clipmech.data.imagenet_captions import build_imagenet_captions
    m = build_imagenet_captions(args.json, args.imagenet, args.out, val_fraction=args.val_fraction)
    print(f"wrote {m['outputs']['train']} ({m['n_train']} lines)"
          + (f" and {m['outputs']['val']} ({m['n_val']} lines)" if "val" in m["outputs"] else "")
          + f" from {m['n_entries']} entries; manifest {Path(args.out).with_suffix('.json')}")
    if m["n_missing_images"] or m["n_empty_captions"]:
        print(f"skipped {m['n_missing_images']} entries without an image file (first: "
              f"{', '.join(m['missing_first'][:3]) or '-'}) and {m['n_empty_captions']} with an empty caption")
    return 0


def _summary(args: argparse.Namespace) -> int:
    print(_load(args.dataset, args.verify).summary())
    return 0


def _build_emoji(args: argparse.Namespace) -> int:
    from clipmech.data import build_emoji
    sources = Path(args.sources) if args.sources else None
    if args.fetch_to:
        sources = build_emoji.fetch_sources(Path(args.fetch_to))
    out = Path(args.out) if args.out else build_emoji.ASSET_DIR
    path = build_emoji.build(sources, out_dir=out, size=args.size)
    print(path, file=sys.stdout)
    return 0
