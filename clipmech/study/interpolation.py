"""`clipmech interpolation`: domain interpolation at toy scale, a dose-response test of finding 3.

For one test domain d* the study trains CG-low {natural, d*[C1]} plus every subset of the other
domains (a 2^k factorial in the added domains; `design="half"` keeps the even-sized subsets, a
resolution-IV half fraction for k = 4), with CG-low (nothing added) and CG-high (everything added)
as its corners, LOD, natural-only and a steps-matched natural-only as endpoints, each with
`seeds` seeds. Every mixture but natural-only holds S(d*) = |natural| + |d*[C1]| samples
(`clipmech.data.mixtures`); natural-only holds |natural| and sees fewer samples in the same
epochs, so the steps-matched one trains ceil(epochs x S / |natural|) epochs to see as many.

Training, evaluation and the per-run analysis are the quickstart's (`clipmech.study.quickstart`:
same trainer settings, same preset, same registry, so a second run reuses every model and stage).
The statistics (`clipmech.study.interpolation_stats`) follow the analysis plan
`clipmech/study/plans/interpolation-v1.toml`, fixed before the first run.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from clipmech.data.domainnet import DOMAINS
from clipmech.data.mixtures import build_mixture
from clipmech.study.interpolation_report import write_interpolation_outputs
from clipmech.study.interpolation_stats import build_interpolation_results
from clipmech.study.progress import Progress
from clipmech.study.provenance import provenance
from clipmech.study.quickstart import (ModelSpec, QuickstartOptions, Study, analyse_models, c2_drawings,
                                       check_distinct_mixtures, open_study, plan_budgets, train_and_evaluate)
from clipmech.utils import unknown_name_error

DESIGNS = ("full", "half")
STEPS_MATCHED = "natural_only_steps"


@dataclass(frozen=True)
class InterpolationOptions:
    """What the interpolation study trains; trainer and analysis settings are the quickstart's
    (`base`, its defaults unless changed)."""

    out: str = "runs/interpolation"
    test_domain: str | None = None  # None: the plan's rule (the dataset's default test domain)
    seeds: int = 5
    design: str = "full"
    base: QuickstartOptions = QuickstartOptions()

    def quickstart(self) -> QuickstartOptions:
        """The quickstart options the models are trained and analysed with."""
        return replace(self.base, out=self.out, seeds=self.seeds, test_domains=None)


def choose_test_domain(ds, requested: str | None) -> tuple[str, str]:
    """(test domain, why): `requested`, else the dataset's default test domain (on the emoji data the
    domain with the largest DG gap in its own leave-one-domain-out check, fixed before any training).
    ValueError when neither exists or the domain cannot be a test domain."""
    if requested is None:
        if ds.default_test_domain is None:
            raise ValueError(f"dataset {ds.name!r} names no default test domain (the plan's rule); pass "
                             f"--test-domain, one of {[d for d in ds.domains if d != ds.natural_domain]}")
        return ds.default_test_domain, "the dataset's default test domain (largest DG gap in its own check)"
    if requested not in ds.domains:
        raise unknown_name_error("test domain", requested, ds.domains)
    if requested == ds.natural_domain:
        raise ValueError(f"the natural domain {requested!r} cannot be a test domain")
    return requested, "chosen with --test-domain"


def other_domains(domains: Sequence[str], natural: str, test_domain: str) -> list[str]:
    """The domains a study on `test_domain` can add to CG-low: all but the natural and the test domain."""
    return [d for d in domains if d not in (natural, test_domain)]


def added_subsets(others: Sequence[str], design: str) -> list[tuple[str, ...]]:
    """The added-domain subsets of the design, smallest first: all 2^k ("full") or the even-sized
    ones ("half", defining relation I = all factors; main effects aliased only with 3-way interactions
    for k = 4). Needs at least one other domain."""
    if design not in DESIGNS:
        raise unknown_name_error("design", design, DESIGNS)
    if not others:
        raise ValueError("the dataset has no domain besides the natural and the test domain to add; "
                         "domain interpolation needs at least one")
    subsets = [c for k in range(len(others) + 1) for c in itertools.combinations(others, k)]
    return [s for s in subsets if design == "full" or len(s) % 2 == 0]


def mixture_label(added: Sequence[str], others: Sequence[str]) -> str:
    """cg_low (nothing added), cg_high (everything added), else cg_low+<initials of the added domains>."""
    if not added:
        return "cg_low"
    if len(added) == len(others):
        return "cg_high"
    return "cg_low+" + "".join(d[0] for d in added)


@dataclass
class Level:
    """One mixture of the study: its row label, the added domains (None for the endpoints LOD and
    the natural-only pair) and its models, one per seed."""

    label: str
    added: tuple[str, ...] | None
    specs: list[ModelSpec]


def interpolation_levels(ds, c2: Sequence[str], test_domain: str, seeds: int, design: str, epochs: int
                         ) -> list[Level]:
    """Every mixture of the study in training order: the design's subsets, then LOD, natural-only and the
    steps-matched natural-only, each with seeds 0..seeds-1."""
    others = other_domains(ds.domains, ds.natural_domain, test_domain)
    levels = []
    for added in added_subsets(others, design):
        label = mixture_label(added, others)
        corner = label in ("cg_low", "cg_high")
        core = "".join(d[0] for d in (ds.natural_domain, test_domain, *added))
        levels.append(Level(label, added, [ModelSpec(label if corner else "cg_high", seed, test_domain,
                                                     domains=None if corner else core, label=None if corner else label)
                                           for seed in range(seeds)]))
    counts = ds.counts(split="train")
    natural = int(counts[ds.domain_index(ds.natural_domain)].sum())
    c1 = [k for k, c in enumerate(ds.classes) if c not in set(c2)]
    S = natural + int(counts[ds.domain_index(test_domain), c1].sum())
    steps_epochs = math.ceil(epochs * S / max(natural, 1))
    levels.append(Level("lod", None, [ModelSpec("lod", s, test_domain) for s in range(seeds)]))
    levels.append(Level("natural_only", None, [ModelSpec("natural_only", s, test_domain) for s in range(seeds)]))
    levels.append(Level(STEPS_MATCHED, None, [ModelSpec("natural_only", s, test_domain, epochs=steps_epochs,
                                                        label=STEPS_MATCHED) for s in range(seeds)]))
    return levels


def buildable(study: Study, levels: Sequence[Level]) -> tuple[list[Level], list[dict[str, str]]]:
    """(levels whose mixture can be built, [{"level", "reason"}] for the others): a dataset with too few
    samples for a level loses that level, named with the reason, instead of the whole study.
    Cost: one mixture build per level (numpy, well under a second each)."""
    keep, skipped = [], []
    for level in levels:
        spec = level.specs[0]
        try:
            mixture = build_mixture(study.dataset, spec.setup, test_domain=None if spec.setup == "natural_only" else
                                    spec.test_domain, test_classes=list(study.c2), domains=spec.domains, split="train")
        except (ValueError, RuntimeError) as err:
            skipped.append({"level": level.label, "reason": str(err)})
            continue
        per_domain = mixture.counts().sum(1)
        empty = [d for d in level.added or () if per_domain[study.dataset.domain_index(d)] == 0]
        if empty:  # it would train the same samples as a smaller level
            skipped.append({"level": level.label, "reason": f"adds {', '.join(empty)}, which keeps no training "
                                                            "drawing in the mixture (too few drawings)"})
            continue
        keep.append(level)
    return keep, skipped


def run_interpolation(opts: InterpolationOptions) -> dict[str, Any]:
    """Run (or resume) the study: train, evaluate and analyse every model, then the plan's statistics;
    writes OUT/results.json, OUT/report.md and OUT/figures/. Returns the results dict.
    Cost at the defaults: 95 models, about 25 s each on 2 cores (training ~10 s, analysis ~14 s)."""
    t0, c0 = time.perf_counter(), time.process_time()
    qopts = opts.quickstart()
    study = open_study(qopts, test_domains=[])
    test_domain, why = choose_test_domain(study.dataset, opts.test_domain)
    study.test_domains = [test_domain]
    levels, skipped = buildable(study, interpolation_levels(study.dataset, study.c2, test_domain, opts.seeds,
                                                            opts.design, qopts.epochs))
    for s in skipped:
        print(f"clipmech interpolation: skipping level {s['level']}: {s['reason']}")
    specs = [spec for level in levels for spec in level.specs]
    progress = Progress(plan_budgets(qopts, specs, study.dataset), enabled=qopts.progress)
    runs, metrics = train_and_evaluate(study, specs, progress)
    check_distinct_mixtures([s for s in specs if s.name != STEPS_MATCHED], runs)
    no_figure = ModelSpec("none", -1, test_domain)  # no UMAP: the study draws none
    rows, _, _ = analyse_models(study, specs, runs, metrics, progress, no_figure)
    added = {spec.run_id: level.added for level in levels for spec in level.specs}
    others = other_domains(study.dataset.domains, study.dataset.natural_domain, test_domain)
    for row in rows:
        row["added"] = None if added[row["run_id"]] is None else list(added[row["run_id"]])
    config = {"out": opts.out, "seeds": opts.seeds, "design": opts.design, "test_domain": test_domain,
              "test_domain_rule": why, "added_domains": others, "c2_classes": study.c2,
              "c2_drawings": c2_drawings(study, test_domain),
              "trainer_and_preset": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(qopts).items()
                                     if k not in ("progress", "out", "test_domains", "seeds")}}
    results = build_interpolation_results(rows, config, skipped, provenance(study.dataset, "cpu"))
    results["extra"] = {"wall_time_s": round(time.perf_counter() - t0, 1),
                        "cpu_time_s": round(time.process_time() - c0, 1), "models": len(runs),
                        "stages_run": len(progress.done), "stages_reused": len(progress.reused),
                        "stages": progress.timings()}
    write_interpolation_outputs(results, Path(opts.out))
    return results


# ------------------------------------------------------------------------------------ paper scale
# The paper's interpolation mixtures (Fig. 3 / Fig. 8): included domain initials on DomainNet, CG-low
# first (c i p q r s = clipart infograph painting quickdraw real sketch).
PAPER_MIXTURES = {"clipart": ("cr", "cqr", "cpr", "cir", "crs", "cqrs", "cprs", "cirs", "cpqrs", "ciprs"),
                  "sketch": ("rs", "qrs", "prs", "irs", "crs", "cqrs", "cprs", "cirs", "cpqrs", "ciprs")}


def paper_experiment(test_domain: str, seeds: int, design: str) -> dict[str, Any]:
    """The paper-scale interpolation as an experiment table (`clipmech experiment` format): RN50 with the
    paper's trainer settings on DomainNet + ImageNet-Captions, CG-high over the included domains with
    d* C1-only, subsampled to S(d*). Clipart and sketch use the paper's listed mixtures; any other
    DomainNet test domain gets the design's subsets of the four other domains. Seeds 0..seeds-1."""
    if test_domain not in DOMAINS or test_domain == "real":
        raise ValueError(f"--paper needs a DomainNet test domain other than real, got {test_domain!r}")
    if test_domain in PAPER_MIXTURES and design == "full":
        mixtures = list(PAPER_MIXTURES[test_domain])
    else:
        others = other_domains(DOMAINS, "real", test_domain)
        mixtures = ["".join(sorted(d[0] for d in ("real", test_domain, *a))) for a in added_subsets(others, design)]
    return {"experiment": {"name": f"domain_interpolation_{test_domain}", "figure": "Fig. 3, Fig. 8", "kind": "clip",
                           "description": f"CG on {test_domain} as a function of which domains are added to CG-low",
                           "base_tsv": "{imagenet_captions}"},
            "base": {"model": {"name": "RN50", "grad_checkpointing": True},
                     "data": {"dataset": "{domainnet}", "workers": 8},
                     "mixture": {"setup": "cg_high", "test_domain": test_domain},
                     "train": {"epochs": 32, "batch_size": 128, "accum_freq": 2, "precision": "amp_bf16",
                               "progress": False},
                     "eval": {"templates": "domainnet"}},
            "matrix": {"mixture.domains": mixtures, "train.seed": list(range(seeds))},
            "launch": {"nproc_per_node": 4}}


def plan_paper_interpolation(test_domain: str, seeds: int, design: str, out: str, data: dict[str, str],
                             launch: dict[str, Any], dry_run: bool) -> Path:
    """Write OUT/domain_interpolation_<d>.toml and run it as `clipmech experiment run` does (torchrun per
    run, local or SLURM through `launch`; resumable; `dry_run` prints the commands). Returns the file."""
    import tomli_w

    from clipmech.study.experiments import run_experiment

    path = Path(out) / f"domain_interpolation_{test_domain}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# written by `clipmech interpolation --paper`\n"
                    + tomli_w.dumps(paper_experiment(test_domain, seeds, design)))
    run_experiment(path, out, data, dry_run=dry_run, launch=launch)
    return path


def interpolation_rows(rows: Sequence[dict[str, Any]], mixtures: dict[str, str], test_domain: str,
                       domains: Sequence[str] = DOMAINS, natural: str = "real") -> list[dict[str, Any]]:
    """Paper-scale rows (`experiment analyse`, every mixture's setup "cg_high") as interpolation rows:
    each row's `setup` becomes its level label and `added` its added domains, from `mixtures`
    ({run id: included domain initials}). Rows of other runs or test domains are dropped."""
    others = other_domains(domains, natural, test_domain)
    by_initial = {d[0]: d for d in domains}
    out = []
    for row in rows:
        letters = mixtures.get(row["run_id"])
        if letters is None or row["test_domain"] != test_domain:
            continue
        added = tuple(d for d in others if d[0] in letters)
        unknown = set(letters) - set(by_initial)
        if unknown:
            raise ValueError(f"run {row['run_id']}: domain initials {sorted(unknown)} are not DomainNet's")
        out.append({**row, "setup": mixture_label(added, others), "added": list(added)})
    return out


def analyse_paper_interpolation(test_domain: str, out: str, data: dict[str, str], launch: dict[str, Any],
                                dry_run: bool) -> dict[str, Any] | None:
    """Analyse the trained paper-scale runs (OUT/domain_interpolation_<d>.toml) with `clipmech experiment
    analyse` (each run's own config, the analysis defaults), then judge them by the interpolation plan:
    OUT/domain_interpolation_<d>_mechanistic/interpolation/{results.json,report.md,figures}. The mixed
    model weights classes equally (paper-scale rows carry no drawing counts). None on dry_run."""
    import tomli_w

    from clipmech.study.experiments import analyse_experiment, expand_runs, load_experiment

    source = Path(out) / f"domain_interpolation_{test_domain}.toml"
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist; train first with `clipmech interpolation --paper "
                                f"--test-domain {test_domain}`")
    name = f"domain_interpolation_{test_domain}_mechanistic"
    path = Path(out) / f"{name}.toml"
    path.write_text(tomli_w.dumps({"experiment": {"name": name, "kind": "analysis",
                                                  "description": "per-run analysis of the interpolation runs"},
                                   "analysis": {"source": source.name}}))
    results = analyse_experiment(path, out, data, launch=launch, dry_run=dry_run)
    if results is None:
        return None
    mixtures = {r["id"]: r["config"]["mixture"]["domains"] for r in expand_runs(load_experiment(source), data)}
    rows = interpolation_rows(results["models"], mixtures, test_domain)
    seeds = sorted({r["seed"] for r in rows})
    config = {"out": out, "seeds": len(seeds), "design": "paper", "test_domain": test_domain,
              "test_domain_rule": "chosen with --test-domain", "c2_classes": results["config"]["c2_classes"],
              "added_domains": other_domains(DOMAINS, "real", test_domain), "scale": "paper"}
    interp = build_interpolation_results(rows, config, [], results.get("provenance"))
    interp["extra"] = {"models": len({r["run_id"] for r in rows})}
    write_interpolation_outputs(interp, Path(out) / name / "interpolation")
    return interp
