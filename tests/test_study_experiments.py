"""Experiment files: every config parses and validates, the matrix expands as the paper's run counts."""
from pathlib import Path

import pytest

from clipmech.study import experiments as X

EXP = Path(__file__).resolve().parents[1] / "experiments"
DATA = {"domainnet": "/data/domainnet", "imagenet_captions": "/data/inc.tsv", "cc12m": "/data/cc12m.tsv",
        "imagenet_sketch": "/data/imagenet-sketch"}


@pytest.mark.parametrize("name,runs", [("main", 48), ("cc12m", 7), ("allow_p", 60), ("supervised", 90),
                                       ("aligned_quickdraw", 1), ("domain_interpolation_sketch", 9),
                                       ("domain_interpolation_clipart", 9), ("imagenet_sketch_add", 3),
                                       ("imagenet_sketch_mix", 7)])
def test_configs_expand_and_validate(name, runs):
    from clipmech.train.config import load_config
    exp = X.load_experiment(EXP / f"{name}.toml")
    table = X.expand_runs(exp, DATA)
    assert len(table) == runs
    assert len({r["id"] for r in table}) == runs
    for r in table:
        load_config(r["config"])  # every key exists in clipmech.train's config
        assert not X._PLACEHOLDER.search(str(r["config"]))


def test_errors_name_the_fix(tmp_path):
    exp = X.load_experiment(EXP / "main.toml")
    with pytest.raises(ValueError, match="--data domainnet=/path"):
        X.expand_runs(exp, {})
    with pytest.raises(ValueError, match="--data imagenet_sketch=/path"):
        X.expand_runs(X.load_experiment(EXP / "imagenet_sketch_mix.toml"), {"domainnet": "/d", "imagenet_captions": "/i"})
    with pytest.raises(ValueError, match="is an analysis"):
        X.run_experiment(EXP / "mechanistic.toml", tmp_path, DATA, dry_run=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        X.load_experiment(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('[experiment]\nname = "x"\n[matrix]\nseed = [0]\n')
    with pytest.raises(ValueError, match='"section.key"'):
        X.load_experiment(bad)


def test_dry_run_lists_torchrun_commands(tmp_path, capsys):
    table = X.run_experiment(EXP / "aligned_quickdraw.toml", tmp_path, DATA, dry_run=True, without_base=True)
    assert len(table) == 1 and not table[0]["finished"]
    out = capsys.readouterr().out
    assert "torchrun --nproc_per_node=4" in out and "-m clipmech.cli train" in out and "--resume" in out


def test_figures_redrawn_from_stored_results(tmp_path):
    """Natural-only (no test domain) counts for every test domain; runs without results are skipped."""
    import json
    exp = X.load_experiment(EXP / "main.toml")
    runs = X.expand_runs(exp, DATA)
    for r in runs[:8]:
        m = r["config"]["mixture"]
        if m["setup"] == "natural_only" or m["test_domain"] == "clipart":
            res = {"32": {f"{d}/C2/top1_balanced": 0.1 * (1 + r["config"]["train"]["seed"])
                          for d in ("clipart", "sketch")}}
            path = tmp_path / "main" / r["id"] / "eval" / "results.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps(res))
    table = [{"id": r["id"], "run_dir": str(tmp_path / "main" / r["id"]), "config": r["config"]} for r in runs]
    acc = X.collect_accuracies(table)
    assert acc["natural_only"]["sketch"] == pytest.approx([0.1, 0.2, 0.3])
    assert set(acc) >= {"natural_only"} and all(set(v) <= {"clipart", "infograph", "painting", "quickdraw", "sketch"}
                                                for v in acc.values())
    paths = X.redraw_figures(EXP / "main.toml", tmp_path, DATA)
    assert paths[0].stat().st_size > 5000
    with pytest.raises(FileNotFoundError, match="no evaluated runs"):
        X.redraw_figures(EXP / "allow_p.toml", tmp_path, DATA)


def test_base_tsv_reaches_every_run_config_unless_left_out():
    exp = X.load_experiment(EXP / "main.toml")
    with_base = X.expand_runs(exp, DATA)
    assert all(r["config"]["data"]["base"] == "/data/inc.tsv" for r in with_base)
    without = X.expand_runs(exp, DATA, without_base=True)
    assert all("base" not in r["config"]["data"] and r["id"].endswith("-nobase") for r in without)
    assert {r["id"] for r in with_base}.isdisjoint({r["id"] for r in without})
    mix = X.expand_runs(X.load_experiment(EXP / "imagenet_sketch_mix.toml"), DATA)
    assert sorted(r["config"]["mixture"]["in_sketch_keep"] for r in mix) == sorted(
        ["fiftyp", "thirtyp", "twentyfivep", "tenp", "fivep", "onep", "one"])
    assert all(r["config"]["mixture"]["in_sketch"] == "/data/imagenet-sketch" for r in mix)


def test_mechanistic_analyses_the_papers_scope(tmp_path):
    """mechanistic.toml: circuits for every class, C2 first, 50 images per cell (paper.md §8.4); its
    [analysis] table parses, and a dry run gets as far as asking for the trained source runs."""
    from clipmech.study.analyse import analysis_options
    table = dict(X.load_experiment(EXP / "mechanistic.toml")["analysis"])
    table.pop("source")
    opts = analysis_options(table)
    assert (opts.circuit_scope, opts.circuit_classes, opts.circuit_images, opts.circuit_steps) == ("all", None, 50, 10)
    assert opts.paper_compat is False
    with pytest.raises(FileNotFoundError, match="has not finished training"):
        X.analyse_experiment(EXP / "mechanistic.toml", tmp_path, DATA, dry_run=True)
