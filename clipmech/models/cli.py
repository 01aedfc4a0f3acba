"""`clipmech demo`: build a small HookedCLIP, run one cached forward and print activation shapes."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="build a tiny HookedCLIP and print cached activation shapes",
                              description=__doc__)
    p.add_argument("--model", metavar="NAME", help="preset (tiny-rn, tiny-vit) or open_clip config name "
                   "(default: tiny-rn; with --checkpoint: the config stored in the checkpoint)")
    p.add_argument("--checkpoint", metavar="FILE", help="load weights from a checkpoint instead of random init")
    p.add_argument("--all", action="store_true", help="print every hook point, not only the analysis points")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from clipmech.models.hooked_clip import HookedCLIP

    torch.manual_seed(0)
    if args.checkpoint:
        model = HookedCLIP.from_checkpoint(args.checkpoint, model_name=args.model)
    else:
        model = HookedCLIP.from_config(args.model or "tiny-rn")
    images = torch.rand(2, 3, model.image_size, model.image_size)
    text = model.tokenize(["a photo of a dog", "a sketch of a bicycle"])
    names = model.hook_names() if args.all else model.analysis_points() + ["hook_image_embed", "hook_text_embed"]
    with torch.no_grad():
        _, cache = model.run_with_cache(image=images, text=text, names_filter=names)
    print(f"HookedCLIP {model.model_name or 'custom'}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{len(model.hook_names())} hook points, {len(model.analysis_points())} analysis points")
    width = max(len(n) for n in names)
    for name in names:
        print(f"  {name:<{width}}  {tuple(cache[name].shape)}")
    return 0
