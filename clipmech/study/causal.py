"""The causal test of one study model (issue 26): which drawings play which part, then
`clipmech.analysis.causal.causal_test`. Meant to be one unit of the per-run analysis plan.

Four roles, four sets of distinct drawings (emoji: view 0 only; `check_disjoint_drawings` refuses
any drawing, view or copy, that plays two of the first and last roles):
- discovery: the circuits `discovery[d][k]` (the controls' training-drawing circuits,
  `clipmech.study.circuit_sets`), which select the shared and placebo sets;
- matching: IG node scores of class k on the other domains' test drawings of class k (not used for
  discovery, not ablated): the IG distribution the random sets are matched on;
- balance: IG node scores of class k on the test domain's held-out drawings (used neither for
  selection nor for matching): where balance is shown;
- ablation: the test domain's held-out (test-split) drawings of class k, every one of them.
Mean ablation takes the mean over the test domain's test drawings; resample ablation takes, for
each held-out image, a test-domain test drawing of another class (fixed seed).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from clipmech.analysis.causal import CausalOptions, causal_finding, causal_test_from_drawings
from clipmech.analysis.circuit import Circuit
from clipmech.data.samples import capped_rows, check_disjoint_drawings, distinct_drawings
from clipmech.eval.zeroshot import class_prompts_names


def study_causal_test(study, model, discovery: Mapping[str, Mapping[int, Circuit]], test_domain: str,
                      opts: CausalOptions = CausalOptions()) -> dict[str, Any]:
    """The causal test of `model` on `test_domain` (module doc for the drawings' roles). `study`
    gives `dataset`, `images(split)`, `templates()` and `opts.circuit_steps`; `discovery[d][k]`
    circuits carry meta["rows"] (rows into the training split). Returns `causal_test`'s result with
    class names as keys, plus "finding" (`causal_finding` of this one model, for a quick look; the
    study's verdict averages classes over models). Cost: `causal_test_from_drawings` (one grouped
    node IG, then the set ablations of `CausalOptions`)."""
    ds = study.dataset
    test_idx, train_idx = ds.indices(split="test"), ds.indices(split="train")
    images = study.images("test")
    view0 = distinct_drawings(ds)[test_idx]
    t = ds.domains.index(test_domain)
    in_t = np.flatnonzero((ds.domain_idx[test_idx] == t) & view0)
    with torch.no_grad():
        head = model.zero_shot_head(class_prompts_names(ds), study.templates())
    points = None
    held, matching, donor_images = {}, {}, {}
    skipped: dict[str, str] = {}
    rng = np.random.default_rng(opts.seed)
    for k, circuit in discovery.get(test_domain, {}).items():
        rows = in_t[ds.class_idx[test_idx][in_t] == k]
        others = np.flatnonzero((ds.domain_idx[test_idx] != t) & (ds.class_idx[test_idx] == k) & view0)
        donors = in_t[ds.class_idx[test_idx][in_t] != k]
        disc_rows = np.concatenate([train_idx[np.asarray(c.meta["rows"], dtype=np.int64)]
                                    for per in discovery.values() for kk, c in per.items() if kk == k])
        check_disjoint_drawings(ds, disc_rows, test_idx[np.concatenate([rows, others])],
                                what=f"causal test, class {ds.classes[k]!r}")
        points = points or [p for p in circuit.points if not p.endswith("hook_input")]
        missing = [what for what, r in (("held-out", rows), ("matching (other domains')", others),
                                        ("resample donor", donors)) if not len(r)]
        if missing:
            skipped[ds.classes[k]] = "no " + ", no ".join(missing) + " drawing"
            continue
        held[k] = (images[rows], torch.full((len(rows),), k, dtype=torch.long))
        matching[k] = images[others]
        donor_images[k] = images[rng.choice(donors, len(rows))]
    if len(held) < 2:  # placebos come from other classes: nothing to test (the report falls back, says why)
        return {"classes": {}, "skipped": skipped, "derangements": [],
                "reason": f"{len(held)} class(es) with held-out, matching and donor drawings; the placebo needs 2"}
    res = causal_test_from_drawings(model, discovery, test_domain, held, matching, donor_images,
                                    images[capped_rows(in_t, study.opts.reference_images)], head,
                                    steps=study.opts.circuit_steps, points=points, opts=opts)
    names = {str(k): ds.classes[k] for k in held}
    res["classes"] = {names[k]: v for k, v in res["classes"].items()}
    res["skipped"] = {names.get(k, k): v for k, v in res["skipped"].items()} | skipped
    res["derangements"] = [[names[k] for k in p] for p in res["derangements"]]
    res["finding"] = causal_finding([res])
    return res
