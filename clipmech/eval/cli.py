"""`clipmech eval RUN_DIR`: zero-shot (or supervised-head) evaluation of every checkpoint of a run."""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate every checkpoint of a run -> RUN_DIR/eval/results.json",
                              description=__doc__)
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--dataset", metavar="NAME_OR_ROOT", help="dataset to evaluate (default: the run's)")
    p.add_argument("--templates", metavar="SET_OR_FILE",
                   help="template set (domainnet, emoji, openai, simple, auto) or a file with one per line")
    p.add_argument("--batch-size", type=int, metavar="N")
    p.add_argument("--device", metavar="DEVICE", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--imagenet", metavar="ROOT", help="also ImageNet-1k zero-shot top-1 of every checkpoint "
                   "(ImageNet val folder, ROOT/<wnid>/*.JPEG) -> RUN_DIR/eval/imagenet.json")
    p.add_argument("--fp16", action="store_true",
                   help="evaluate with the fp16 model (the paper's), DomainNet and --imagenet alike (default: the run "
                        "config's [eval] precision, fp32 unless set); recorded as "
                        "\"precision\" in RUN_DIR/eval/meta.json and imagenet.json (on CPU fp16 is slow)")
    p.add_argument("--verify", choices=("none", "header", "decode"),
                   help="check image files when loading a DomainNet folder (default: the run's [data] verify)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def evaluate_after_train(run_dir) -> None:
    """`clipmech train`'s closing step ([eval] after_train): zero-shot evaluation of every checkpoint."""
    from clipmech.eval.zeroshot import evaluate_run
    path = evaluate_run(run_dir)
    print(f"clipmech train: zero-shot evaluation of every checkpoint -> {path}")


def run(args: argparse.Namespace) -> int:

    from clipmech.eval.zeroshot import evaluate_run
    from clipmech.locks import unit_lock
    from clipmech.train.run_dir import require_run_dir
    run_dir = require_run_dir(args.run_dir)
    precision = "fp16" if args.fp16 else None  # None: the run config's [eval] precision
    with unit_lock(run_dir / "eval", "eval", recursive=True):
        path = evaluate_run(run_dir, dataset=args.dataset, templates=args.templates, batch_size=args.batch_size,
                            device=args.device, verify=args.verify, precision=precision)
    results = json.loads(path.read_text())
    precision = json.loads((run_dir / "eval" / "meta.json").read_text())["precision"]  # what actually ran
    last = max(results, key=int)
    print(f"clipmech eval: {len(results)} checkpoints ({precision}) -> {path}")
    print(f"epoch {last}:")
    for key, value in sorted(results[last].items()):
        if key.endswith("/top1"):
            print(f"  {key:<28} {value:.3f}")
    if args.imagenet:
        from clipmech.eval.imagenet import evaluate_run_imagenet
        path = evaluate_run_imagenet(args.run_dir, args.imagenet, precision=precision,
                                     batch_size=args.batch_size or 256, device=args.device)
        res = json.loads(path.read_text())
        print(f"  imagenet-val total ({res['precision']}, {res['n_images']} images) {res['results'][last]:.3f} -> {path}")
    return 0
