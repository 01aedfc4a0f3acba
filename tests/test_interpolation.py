"""Domain interpolation (issue 30): the subset mixtures keep the paper's size rule on a DomainNet-layout
fixture, the design and its statistics give known answers, the verdict rule's boundaries, bad input,
and the command end to end with a rerun that reuses everything."""
import json
import math

import numpy as np
import pytest

from clipmech.cli import main
from clipmech.data import build_mixture, load_dataset
from clipmech.data.domainnet import DOMAINS
from clipmech.data.synthetic import write_fake_domainnet
from clipmech.study import interpolation as I
from clipmech.study import interpolation_stats as IS

CLASSES = ["axe", "banana", "barn", "bed", "apple", "bear", "cat", "dog", "eye", "fish"]


def _fixture(root, empty=()):
    """Unequal bucket sizes (3-5 train drawings), so the subsampling has to trim; `empty`: domains
    with no train drawings."""
    counts = {(d, c, s): (0 if d in empty and s == "train" else 3 + (i + j) % 3 if s == "train" else 2)
              for j, d in enumerate(DOMAINS) for i, c in enumerate(CLASSES) for s in ("train", "test")}
    return write_fake_domainnet(root / "dn", counts, size=8)


@pytest.fixture(scope="module")
def dn(tmp_path_factory):
    return _fixture(tmp_path_factory.mktemp("interp"))


def test_subset_mixtures_keep_the_size_rule(dn):
    ds = load_dataset(dn)
    c2 = ds.default_test_classes
    d_star = ds.domain_index("sketch")
    c2_idx = [ds.class_index(c) for c in c2]
    counts = ds.counts("train")
    natural = int(counts[ds.domain_index("real")].sum())
    S = natural + int(np.delete(counts[d_star], c2_idx).sum())
    levels = I.interpolation_levels(ds, c2, "sketch", 2, "full", 25)
    assert len(levels) == 16 + 3 and len({lv.label for lv in levels}) == 19
    for level in levels:
        spec = level.specs[0]
        m = build_mixture(ds, spec.setup, test_domain=None if spec.setup == "natural_only" else "sketch",
                          test_classes=c2, domains=spec.domains)
        kept = m.counts()
        present = {ds.domains[d] for d in np.flatnonzero(kept.sum(1))}
        if level.added is not None:  # the factorial: equal size, exactly the included domains, d* C1-only
            assert len(m.indices) == S, level.label
            assert present == {"real", "sketch", *level.added}, level.label
            assert kept[d_star, c2_idx].sum() == 0
        elif level.label == "lod":
            assert len(m.indices) == S and "sketch" not in present and present == set(DOMAINS) - {"sketch"}
        else:  # natural-only and its steps-matched twin: the natural domain, not subsampled
            assert present == {"real"} and len(m.indices) == natural
    steps = next(lv for lv in levels if lv.label == I.STEPS_MATCHED).specs[0]
    assert steps.epochs == math.ceil(25 * S / natural) and steps.run_id == "natural_only_steps-sketch-s0"
    assert [s.seed for s in levels[0].specs] == [0, 1]


def test_half_design_is_a_balanced_fraction():
    subsets = I.added_subsets(["a", "b", "c", "d"], "half")
    assert len(subsets) == 8 and all(len(s) % 2 == 0 for s in subsets)
    X = np.array([[d in s for d in "abcd"] for s in subsets], dtype=float) * 2 - 1
    assert np.allclose(X.T @ X, 8 * np.eye(4))  # main effects orthogonal: each domain in half of the runs
    assert len(I.added_subsets(["a", "b", "c", "d"], "full")) == 16
    with pytest.raises(ValueError, match="no domain besides the natural and the test domain"):
        I.added_subsets([], "full")
    with pytest.raises(KeyError, match="design"):
        I.added_subsets(["a"], "quarter")


def test_a_level_whose_added_domain_has_no_drawings_is_skipped_with_its_reason(tmp_path):
    ds = load_dataset(_fixture(tmp_path, empty=("quickdraw",)))
    study = I.Study(I.QuickstartOptions(), dataset=ds, c2=ds.default_test_classes)
    levels, skipped = I.buildable(study, I.interpolation_levels(ds, study.c2, "sketch", 1, "full", 25))
    names = {s["level"] for s in skipped}
    assert names == {"cg_low+q", "cg_low+cq", "cg_low+iq", "cg_low+pq", "cg_low+ciq", "cg_low+cpq", "cg_low+ipq",
                     "cg_high"}
    assert all("adds quickdraw, which keeps no training drawing" in s["reason"] for s in skipped)
    assert len(levels) == 19 - 8


# ------------------------------------------------------------------------------------ statistics
DOMS = ["c", "f", "p", "s"]


def _rows(acc, measure=None, seeds=3, classes=6, endpoints=True):
    """Rows of a full design: C2 accuracy per class = acc(added, seed, class), one measure per model."""
    rows = []
    for added in I.added_subsets(DOMS, "full"):
        for s in range(seeds):
            per = {f"k{c}": float(acc(added, s, c)) for c in range(classes)}
            rows.append({"setup": I.mixture_label(added, DOMS), "seed": s, "added": list(added),
                         "c2_test_acc": float(np.mean(list(per.values()))), "c2_test_acc_per_class": per,
                         "m": None if measure is None else float(measure(added, s)), "n_train": 100,
                         "run_id": f"{I.mixture_label(added, DOMS)}-s{s}"})
    if endpoints:
        rows += [{"setup": "lod", "seed": s, "added": None, "c2_test_acc": 0.3, "n_train": 100} for s in range(seeds)]
    return rows


def test_dose_slope_and_inclusion_effects_recover_planted_values_exactly():
    effect = {"c": 0.04, "f": 0.0, "p": 0.10, "s": -0.02}
    rows = _rows(lambda added, s, c: 0.1 + sum(effect[d] for d in added))
    design = IS.Design(rows, DOMS, ["m"])
    dose = IS.dose_response(design, n_boot=200)["accuracy"]
    # additive effects: the slope on the number added is the mean effect, each main effect its own
    assert dose["slope"]["estimate"] == pytest.approx(np.mean(list(effect.values())), abs=1e-12)
    for d, e in effect.items():
        assert dose[f"adds_{d}"]["estimate"] == pytest.approx(e, abs=1e-12)
        assert dose[f"adds_{d}"]["ci_low"] == pytest.approx(e, abs=1e-12)  # nothing varies: a point CI
    assert dose["slope"]["verdict"] == "reproduced"
    assert dose["k0"]["estimate"] == pytest.approx(0.1) and dose["k4"]["estimate"] == pytest.approx(0.22)


def test_a_flat_dose_is_exactly_at_the_boundary_and_not_reproduced():
    rows = _rows(lambda added, s, c: 0.2)
    dose = IS.dose_response(IS.Design(rows, DOMS, ["m"]), n_boot=200)["accuracy"]["slope"]
    assert dose["estimate"] == pytest.approx(0.0, abs=1e-15)
    assert dose["p_star"] == 0.5 and dose["verdict"] == "inconclusive"  # every resample ties at 0: mid-p


def test_the_bootstrap_resamples_seeds_and_classes_of_the_models():
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.05, (3, 6))  # seed x class noise shared by every mixture
    rows = _rows(lambda added, s, c: 0.1 + 0.02 * len(added) + noise[s, c] * (1 + len(added)))
    slope = IS.dose_response(IS.Design(rows, DOMS, ["m"]), n_boot=2000)["accuracy"]["slope"]
    assert slope["ci_low"] < 0.02 < slope["ci_high"] and slope["ci_high"] - slope["ci_low"] > 1e-3


def _fit(between, within, p_neg=0.9):
    return {"coef": {"between": {"estimate": between, "p_positive_holm": 1 - p_neg if between > 0 else p_neg,
                                 "p_negative_holm": p_neg if between > 0 else 1 - p_neg},
                     "within": {"estimate": within}}}


@pytest.mark.parametrize("p, counted", [(0.025, False), (0.0249, True)])
def test_verdict_counts_a_measure_only_strictly_below_alpha_half(p, counted):
    dose = {"accuracy": {"slope": {"verdict": "reproduced", "estimate": 0.02, "ci_low": 0.01, "ci_high": 0.03}}}
    mixed = {"a": {"coef": {"between": {"estimate": 0.1, "p_positive_holm": p, "p_negative_holm": 0.99}}},
             "b": {"coef": {"between": {"estimate": 0.1, "p_positive_holm": 0.001, "p_negative_holm": 0.99}}}}
    v = IS.verdict(dose, mixed, ["a", "b"], 0.05)
    assert v["verdict"] == ("holds" if counted else "partly")


def test_verdict_rule():
    up = {"accuracy": {"slope": {"verdict": "reproduced", "estimate": 0.02, "ci_low": 0.01, "ci_high": 0.03}}}
    flat = {"accuracy": {"slope": {"verdict": "inconclusive", "estimate": 0.0, "ci_low": -0.01, "ci_high": 0.01}}}
    pos = {"coef": {"between": {"estimate": 0.1, "p_positive_holm": 0.001, "p_negative_holm": 0.999}}}
    neg = {"coef": {"between": {"estimate": -0.1, "p_positive_holm": 0.999, "p_negative_holm": 0.001}}}
    unfit = {"reason": "X is rank-deficient"}
    assert IS.verdict(up, {"a": pos, "b": pos}, ["a", "b"], 0.05)["verdict"] == "holds"
    assert IS.verdict(flat, {"a": pos, "b": pos}, ["a", "b"], 0.05)["verdict"] == "not shown"
    assert IS.verdict(up, {"a": pos, "b": neg}, ["a", "b"], 0.05)["verdict"] == "contradicted"
    v = IS.verdict(up, {"a": pos, "b": unfit}, ["a", "b"], 0.05)
    assert v["verdict"] == "partly" and v["not_fitted"] == ["b"] and "not fitted: b" in v["text"]


def test_mixed_models_find_a_planted_between_link():
    rng = np.random.default_rng(1)
    mix_noise = {I.mixture_label(a, DOMS): rng.normal(0, 0.05) for a in I.added_subsets(DOMS, "full")}
    share = {k: 0.3 + v for k, v in mix_noise.items()}  # sharedness varies between mixtures beyond the design

    def acc(added, s, c):
        return np.clip(0.2 + 0.02 * len(added) + 1.0 * (share[I.mixture_label(added, DOMS)] - 0.3)
                       + rng.normal(0, 0.05), 0, 1)
    rows = _rows(acc, measure=lambda added, s: share[I.mixture_label(added, DOMS)] + rng.normal(0, 0.005),
                 seeds=5, classes=20)
    fit = IS.mixed_models(IS.Design(rows, DOMS, ["m"]))["m"]
    b = fit["coef"]["between"]
    assert b["df"] == 16 - 6 and b["p_positive_holm"] < 0.025
    sd = fit["measure_sd"]
    assert b["ci_low"] < 1.0 * sd < b["ci_high"]  # per SD of the measure


TINY = ["--epochs", "1", "--batch-size", "16", "--circuit-steps", "2", "--circuit-classes", "4", "--sae-steps", "50", "--cka-boot", "0",
        "--curve-points", "2", "--n-templates", "1", "--quiet"]


def test_interpolation_command_end_to_end_and_a_rerun_reuses_everything(dn, tmp_path, capsys):
    out = tmp_path / "study"
    args = ["interpolation", "--dataset", str(dn), "--test-domain", "sketch", "--seeds", "2", "--design", "half",
            "--out", str(out), *TINY]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "finding 3 from this design:" in first
    results = json.loads((out / "results.json").read_text())
    assert results["kind"] == "interpolation" and results["plan"]["status"] == "confirmatory"
    assert results["design"]["mixtures"] == ["cg_low", "cg_low+ci", "cg_low+cp", "cg_low+cq", "cg_low+ip",
                                             "cg_low+iq", "cg_low+pq", "cg_high"]
    assert len(results["models"]) == (8 + 3) * 2 and results["extra"]["models"] == 22
    assert {m["n_train"] for m in results["models"] if m["added"] is not None} == \
        set(results["endpoints"]["lod"]["n_train"])  # every factorial mixture and LOD hold S samples
    assert results["verdict"]["verdict"] in ("holds", "partly", "contradicted", "not shown")
    for k in ("node_jaccard", "edge_jaccard", "feature_sharing"):
        assert "coef" in results["mixed"][k] and "hinge" in results["threshold"][k] and "slope" in results["dose"][k]
    # CKA's C2 measure is null on 6 C2 classes (< 8 centroid rows): kept with the rows' reason, the rest written
    assert "C2 rows" in results["dose"]["cka_mid"]["reason"] and "C2 rows" in results["mixed"]["cka_mid"]["reason"]
    assert results["threshold"]["cka_mid"] == {"reason": "no model has this measure"}
    assert "cka_mid | not fitted: no model has this measure" in (out / "report.md").read_text()
    report = (out / "report.md").read_text()
    assert "## Verdict on finding 3 from this design" in report and "What the toy scale can and cannot say" in report
    for fig in results["extra"]["figures"]:
        assert (out / "figures" / fig).stat().st_size > 1000

    stamp = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("epoch_*.pt")}
    assert main([a for a in args if a != "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "train: done (reused)" in err and err.count("(reused)") == err.count(": done")  # nothing recomputed
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("epoch_*.pt")} == stamp
    again = json.loads((out / "results.json").read_text())
    assert again["verdict"] == results["verdict"] and again["dose"] == results["dose"]


def test_interpolation_refuses_one_seed_and_a_natural_test_domain(dn, tmp_path, capsys):
    assert main(["interpolation", "--dataset", str(dn), "--seeds", "1", "--out", str(tmp_path / "a")]) == 1
    assert "--seeds must be >= 2" in capsys.readouterr().err
    assert main(["interpolation", "--dataset", str(dn), "--test-domain", "real", "--out", str(tmp_path / "b"),
                 *TINY]) == 1
    assert "the natural domain 'real' cannot be a test domain" in capsys.readouterr().err
    assert main(["interpolation", "--dataset", str(dn), "--out", str(tmp_path / "c"), *TINY]) == 1
    assert "names no default test domain" in capsys.readouterr().err


def test_paper_scale_plan_lists_the_papers_mixtures_and_runs_through_experiment_run(tmp_path, capsys):
    args = ["interpolation", "--paper", "--test-domain", "sketch", "--seeds", "2", "--data", "domainnet=/dn",
            "--data", "imagenet_captions=/in.tsv", "--dry-run", "--out", str(tmp_path)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "0/20 units finished, 20 to run (local)" in err
    exp = I.paper_experiment("sketch", 2, "full")
    assert exp["matrix"]["mixture.domains"] == ["rs", "qrs", "prs", "irs", "crs", "cqrs", "cprs", "cirs", "cpqrs",
                                                "ciprs"]
    assert (tmp_path / "domain_interpolation_sketch.toml").is_file()
    from clipmech.study.experiments import expand_runs, load_experiment
    runs = expand_runs(load_experiment(tmp_path / "domain_interpolation_sketch.toml"),
                       {"domainnet": "/dn", "imagenet_captions": "/in.tsv"})
    assert len(runs) == 20 and {r["config"]["mixture"]["setup"] for r in runs} == {"cg_high"}
    # another test domain: the design's subsets of the four other DomainNet domains
    assert len(I.paper_experiment("painting", 1, "full")["matrix"]["mixture.domains"]) == 16
    assert main(["interpolation", "--paper", "--out", str(tmp_path)]) == 1
    assert "--paper needs --test-domain" in capsys.readouterr().err


def test_mixed_model_weights_are_the_classes_drawings():
    rng = np.random.default_rng(2)
    rows = _rows(lambda added, s, c: np.clip(0.2 + 0.03 * len(added) + rng.normal(0, 0.1), 0, 1),
                 measure=lambda added, s: 0.3 + 0.01 * len(added) + rng.normal(0, 0.01), seeds=4, classes=6)
    design = IS.Design(rows, DOMS, ["m"])
    equal = IS.mixed_models(design)["m"]["coef"]
    twos = IS.mixed_models(design, drawings={f"k{c}": 2 for c in range(6)})["m"]["coef"]
    uneven = IS.mixed_models(design, drawings={f"k{c}": 1 + 5 * (c == 0) for c in range(6)})["m"]["coef"]
    for k in equal:  # a common weight changes nothing; unequal drawings change the fit
        assert twos[k]["estimate"] == pytest.approx(equal[k]["estimate"], rel=1e-6, abs=1e-9)
    assert uneven["within"]["estimate"] != pytest.approx(equal["within"]["estimate"], rel=1e-3)


def test_paper_rows_become_interpolation_rows_by_their_runs_mixtures():
    rows = [{"run_id": "a", "test_domain": "sketch", "setup": "cg_high", "seed": 0},
            {"run_id": "b", "test_domain": "sketch", "setup": "cg_high", "seed": 0},
            {"run_id": "c", "test_domain": "sketch", "setup": "cg_high", "seed": 0},
            {"run_id": "a", "test_domain": "clipart", "setup": "cg_high", "seed": 0},
            {"run_id": "z", "test_domain": "sketch", "setup": "lod", "seed": 0}]
    got = I.interpolation_rows(rows, {"a": "rs", "b": "cqrs", "c": "ciprqs"}, "sketch")
    assert [(r["setup"], r["added"]) for r in got] == [
        ("cg_low", []), ("cg_low+cq", ["clipart", "quickdraw"]),
        ("cg_high", ["clipart", "infograph", "painting", "quickdraw"])]
    with pytest.raises(ValueError, match=r"initials \['x'\] are not DomainNet's"):
        I.interpolation_rows(rows[:1], {"a": "rsx"}, "sketch")


def test_paper_analyse_before_training_names_the_missing_step(tmp_path, capsys):
    common = ["--paper", "--test-domain", "sketch", "--seeds", "2", "--data", "domainnet=/dn", "--data",
              "imagenet_captions=/in.tsv", "--out", str(tmp_path)]
    assert main(["interpolation", *common, "--analyse"]) == 1
    assert "domain_interpolation_sketch.toml does not exist; train first" in capsys.readouterr().err
    assert main(["interpolation", *common, "--dry-run"]) == 0
    assert main(["interpolation", *common, "--analyse"]) == 1
    assert "has not finished training; run `clipmech experiment run" in capsys.readouterr().err
    assert main(["interpolation", "--analyse", "--out", str(tmp_path)]) == 1
    assert "--analyse applies with --paper" in capsys.readouterr().err


def test_a_listed_design_that_never_adds_a_domain_estimates_the_others():
    listed = {(), ("c",), ("f",), ("c", "f"), ("c", "f", "s")}  # painting never added, sketch once
    rng = np.random.default_rng(3)
    rows = [r for r in _rows(lambda added, s, c: 0.1 + 0.05 * ("c" in added) + rng.normal(0, 0.02),
                             measure=lambda added, s: 0.3 + 0.01 * len(added) + rng.normal(0, 0.01), seeds=4)
            if r["added"] is None or tuple(r["added"]) in listed]
    design = IS.Design(rows, DOMS, ["m"])
    dose = IS.dose_response(design, n_boot=200)["accuracy"]
    assert dose["adds_p"] == {"reason": "added in every mixture or in none: no effect to estimate"}
    assert dose["adds_c"]["estimate"] == pytest.approx(0.05, abs=0.02)
    fit = IS.mixed_models(design)["m"]
    # 5 mixtures cannot carry intercept, between and 3 indicators (containment df 0): kept with the reason
    assert "containment df < 1" in fit["reason"] and "adds_p" not in fit["reason"]
