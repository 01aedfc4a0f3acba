"""`clipmech view`: the site's data from a study folder (the committed quickstart results with a small
registry of real `Circuit.save` files and CKA entries), explanation records, bad input, atomic
reruns; then the pages in a real headless Chromium (Debian's chromium + chromium-driver)."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipmech.analysis.circuits import Circuit
from clipmech.cli import main
from clipmech.study.registry import Registry
from clipmech.utils import hash_obj
from clipmech.view import results as R
from clipmech.view.explanations import read_explanations
from clipmech.view.locate import circuit_refs, checkpoints, read_circuit
from clipmech.view.site import ViewInputError, build_site

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "figures"
POINTS = ["visual.hook_input", "visual.layer1.0.hook_out", "visual.layer2.0.hook_out", "visual.attnpool.hook_out"]
WIDTH = {"visual.hook_input": 3, "visual.layer1.0.hook_out": 16, "visual.layer2.0.hook_out": 32, "visual.attnpool.hook_out": 12}
CIRCUIT_MODELS = ("cg_high-clipart-s0", "natural_only-s0")
DOMAINS = ("clipart", "painting", "real")


def _circuit(seed: int, n_images: int, cls: str | None = None) -> Circuit:
    """A layered circuit over POINTS: ~25 % of each point's channels, top 2 upstream edges per node;
    meta names its class when `cls` is given (as clipmech.study.circuit_sets writes it now)."""
    g = torch.Generator().manual_seed(seed)
    scores = {p: torch.rand(c, generator=g) for p, c in WIDTH.items()}
    nodes = {p: torch.argsort(s, descending=True)[: max(1, c // 4)].tolist() for (p, c), s in zip(WIDTH.items(), scores.values())}
    edges = [(u, i, d, j, float(torch.randn(1, generator=g)))
             for u, d in zip(POINTS, POINTS[1:]) for j in nodes[d] for i in nodes[u][:2]]
    return Circuit(POINTS, scores, nodes, edges, {"split": "test", "n_images": n_images, **({"class": cls} if cls else {})})


def expected_nodes() -> int:
    return sum(max(1, c // 4) for c in WIDTH.values())


def make_study(root: Path, explanations: bool = True) -> Path:
    """A quickstart-shaped study: the committed results, report and figures, and a registry holding
    training records, CKA results and test-split circuit sets (as clipmech.study.circuit_sets
    stores them) for CIRCUIT_MODELS: the first model's circuits name their class only by dataset
    index (older files), the second's also in meta["class"]."""
    study = root / "study"
    (study / "figures").mkdir(parents=True)
    shutil.copy(COMMITTED / "quickstart_results.json", study / "results.json")
    shutil.copy(COMMITTED / "quickstart_report.md", study / "report.md")
    for png in ["fig2_c2_accuracy.png", "cka_per_layer.png", "faithfulness_cg_high-clipart-s0_clipart.png"]:
        shutil.copy(COMMITTED / png, study / "figures" / png)
    results = json.loads((study / "results.json").read_text())
    names = R.class_names(results)
    classes = R.circuit_class_names(results)[:2]
    reg = Registry(study / "registry")
    for n, model in enumerate(CIRCUIT_MODELS):
        ckpt = f"{n:016x}"
        reg.put("train", {"model": model}, {"run_dir": str(study / "runs" / f"{model}-{n:08x}"), "checkpoint_hash": ckpt})
        points = POINTS[1:]
        pairs = {f"{a}|{b}": {"cka": [0.2 + 0.1 * k + 0.05 * n for k in range(len(points))],
                              "ci_low": [0.1] * len(points), "ci_high": [0.9] * len(points)}
                 for i, a in enumerate(DOMAINS) for b in DOMAINS[i + 1:]}
        reg.put("cka", {"checkpoint": ckpt}, {"points": points, "results": {"C2": {"linear": pairs}}})
        key = {"stage": "circuit_set", "model": ckpt, "split": "test"}
        folder = reg.root / "circuit_files" / hash_obj(key)
        index = {d: {str(names.index(c)): _circuit(100 * n + 10 * di + ci, 2, c if n else None).save(folder / f"{di}_{names.index(c)}").name
                     for ci, c in enumerate(classes)} for di, d in enumerate(DOMAINS)}
        reg.put("circuit_set", key, index)
        repeat = key | {"split": "train"}  # the controls' repeat circuits: not what the view shows
        reg.put("circuit_set", repeat, {d: {} for d in DOMAINS})
    if explanations:  # the second model's file names it only by its run folder (meta.run_dir)
        write_explanations(study / "explanations" / CIRCUIT_MODELS[0])
        write_explanations(study / "look", None, f"/elsewhere/runs/{CIRCUIT_MODELS[1]}-0000abcd")
    return study


def write_explanations(folder: Path, model_id: str | None = CIRCUIT_MODELS[0], run_dir: str | None = None) -> Path:
    """An explanations.json as `clipmech analyze explain` writes it (clipmech.explanations/1), naming
    its model by `model_id` and/or meta.run_dir: one full record on a node of the first model's first
    circuit, one skipped node (no labels), and two malformed entries."""
    (folder / "thumbs").mkdir(parents=True, exist_ok=True)
    shutil.copy(COMMITTED / "fig2_c2_accuracy.png", folder / "thumbs" / "a.png")
    node = f"{POINTS[2]}/{_circuit(0, 2).nodes[POINTS[2]][0]}"
    full = {"node": node, "point": POINTS[2], "index": int(node.split("/")[1]), "group": "shared", "ig_score": 0.0123,
            "method": "total", "labels": [{"word": "banana", "fraction": 0.41, "logit_effect": 0.02},
                                          {"word": "yellow", "fraction": 0.22, "logit_effect": -0.01}],
            "explained": 0.63, "chance": 0.05, "ceiling": 0.8, "norm": 0.31,
            "domains": {"clipart": {"mean_activation": 0.8, "ablation_effect": -0.12, "n_images": 8},
                        "painting": {"mean_activation": 0.3, "ablation_effect": -0.02, "n_images": 8}},
            "top_examples": {"clipart": [{"row": 3, "source": "x", "class": "banana", "activation": 2.5, "thumbnail": "thumbs/a.png"},
                                         {"row": 4, "class": "banana", "activation": 1.0, "thumbnail": "thumbs/missing.png"}]}}
    dead = {"node": f"{POINTS[1]}/0", "labels": [], "skipped": "all effects are zero (dead node)"}
    meta = {"dataset": "emoji", **({"run_dir": run_dir} if run_dir else {})}
    path = folder / "explanations.json"
    path.write_text(json.dumps({"format": "clipmech.explanations/1", "meta": meta, "nodes": [full, dead, {"node": "no-slash"}, 3],
                                **({"model_id": model_id} if model_id else {})}))
    return path


# ------------------------------------------------------------------------------------ data
def test_results_fields_are_read_defensively():
    results = json.loads((COMMITTED / "quickstart_results.json").read_text())
    found = R.findings(results)
    assert [f["finding"] for f in found] == [f["finding"] for f in results["findings"]]
    first = found[0]["evidence"][0]
    assert first["label"] == "C2 accuracy lod − natural_only" and first["estimate"] == "+20.2 points"
    assert first["ci"] == "[11.1, 29.4]" and first["verdict"] == "reproduced"
    causal = found[-1]["evidence"]
    assert causal[0]["estimate"] == "+0.107" and causal[-1].get("beside")
    assert "Holm" not in first["p"] and found[2]["evidence"][0]["p"] == "0.0410 ± 0.0044 (Holm-adjusted 0.0538)"
    row = R.model_summary(results["models"][0], R.measures_of(results["models"]))
    m = row["measures"]["node_jaccard"]
    assert (m["score"], m["floor"], m["ceiling"]) == (pytest.approx(0.3558, abs=1e-4), pytest.approx(0.1182, abs=1e-4),
                                                     pytest.approx(0.5453, abs=1e-4))
    # missing, NaN and wrong-typed fields are "not measured", never an error or NaN
    sparse = R.model_detail({"model_id": "m", "c2_test_acc": float("nan"), "cka_mid": "x", "controls": []}, ["cka_mid"])
    assert sparse["c2"] is None and sparse["measures"]["cka_mid"]["score"] is None
    assert sparse["causal"]["logit"] == R.NOT_MEASURED and sparse["faithfulness"] is None
    assert R.findings({"findings": [{"evidence": [{"better": "a"}]}, "junk"]})[0]["evidence"][0]["estimate"] == R.NOT_MEASURED
    odd = {"models": [{"model_id": "a"}, {"run_id": "b"}, {"setup": "no id"}, "junk"]}
    assert [R.model_id(r) for r in R.model_rows(odd)] == ["a", "b"] and R.unnamed_rows(odd) == 2  # counted, shown
    table = R.accuracy_table(results, (COMMITTED / "quickstart_report.md").read_text())
    assert table["columns"][:2] == ["setup", "models"] and [r[0] for r in table["rows"]] == ["natural_only", "lod", "cg_low", "cg_high"]
    assert R.accuracy_table({}, "# no table here") is None


def test_circuit_classes_are_named_and_only_test_circuits_of_known_models_listed(tmp_path):
    study = make_study(tmp_path, explanations=False)
    results = json.loads((study / "results.json").read_text())
    refs = circuit_refs(study, results, checkpoints(study, R.model_rows(results)))
    assert {(r.model_id, r.class_name, r.domain) for r in refs} == {
        (m, c, d) for m in CIRCUIT_MODELS for c in R.circuit_class_names(results)[:2] for d in DOMAINS}
    circ = read_circuit(refs[0].path)
    assert sum(len(v) for v in circ["nodes"].values()) == expected_nodes() and circ["n_images"] == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "clipmech.circuit/1", "points": ["p"], "nodes": {"p": [0]}, "edges": [["p", 0, "q"]]}))
    with pytest.raises(ValueError, match=r"bad.json has malformed points, nodes or edges"):
        read_circuit(bad)
    # one index that does not land on a circuit class (here: the second, with circuit_classes = 1) makes
    # the inference untrusted for all: "class #k", never a wrong name; a class named in meta is taken as written
    classes = R.circuit_class_names(results)[:2]
    results["config"]["circuit_classes"] = 1
    named = {(r.model_id, r.class_name) for r in circuit_refs(study, results, checkpoints(study, R.model_rows(results)))}
    assert named == {(CIRCUIT_MODELS[0], f"class #{R.class_names(results).index(c)}") for c in classes} | {
        (CIRCUIT_MODELS[1], c) for c in classes}


def test_explanation_records_keep_what_they_have_and_count_the_rest(tmp_path):
    path = write_explanations(tmp_path / "ex", run_dir="/runs/lod-clipart-s0-0123abcd")
    ex = read_explanations(path)
    assert ex.names == [CIRCUIT_MODELS[0], "lod-clipart-s0-0123abcd"] and ex.skipped == 2 and len(ex.nodes) == 2
    full = next(e for e in ex.nodes.values() if e.labels)
    assert [(lb.word, lb.fraction, lb.logit_effect) for lb in full.labels] == [("banana", 0.41, 0.02), ("yellow", 0.22, -0.01)]
    assert (full.explained, full.chance, full.ceiling, full.method, full.ig_score) == (0.63, 0.05, 0.8, "total", 0.0123)
    assert full.domains["clipart"].ablation_effect == -0.12 and full.domains["painting"].mean_activation == 0.3
    assert full.examples["clipart"][0].thumbnail == path.parent / "thumbs" / "a.png"
    assert full.examples["clipart"][0].class_name == "banana" and full.examples["clipart"][1].activation == 1.0
    dead = ex.nodes[f"{POINTS[1]}/0"]
    assert dead.labels == [] and dead.skipped.startswith("all effects are zero") and dead.explained is None
    (tmp_path / "other.json").write_text(json.dumps({"format": "something.else/2", "nodes": []}))
    with pytest.raises(ValueError, match="is not a clipmech.explanations/1 file"):
        read_explanations(tmp_path / "other.json")


def _data(site: Path, rel: str):
    text = (site / rel).read_text()
    m = re.fullmatch(r'CLIPMECH\.data\((".*?"), (.*)\);\n', text, flags=re.S)
    assert m and json.loads(m.group(1)) == rel
    return json.loads(m.group(2))


def test_site_has_one_data_file_per_page_and_copies_what_it_shows(tmp_path):
    study = make_study(tmp_path)
    site = build_site(study)
    root = site.index.parent
    assert site.models == 21 and site.circuits == len(CIRCUIT_MODELS) * 2 * len(DOMAINS) and site.explained_models == 2
    data = _data(root, "data/study.js")
    assert len(data["findings"]) == 4 and len(data["models"]) == 24
    assert {f["src"] for f in data["figures"]} == {"figures/fig2_c2_accuracy.png", "figures/cka_per_layer.png"}
    page = _data(root, next(m["page"] for m in data["models"] if m["model_id"] == CIRCUIT_MODELS[0]))
    assert [f["name"] for f in page["figures"]] == ["faithfulness_cg_high-clipart-s0_clipart"]
    assert page["cka"]["subset"] == "C2" and len(page["cka"]["pairs"]) == 3
    assert set(page["circuits"]["counts"][page["circuits"]["classes"][0]].values()) == {expected_nodes()}
    ex = _data(root, page["explanations"])
    assert len(ex["nodes"]) == 2 and ex["skipped"] == 2
    shown = [x for rec in ex["nodes"].values() for xs in rec["examples"].values() for x in xs]
    assert (root / shown[0]["image"]).is_file() and shown[1]["image"] is None  # a missing image is not invented
    assert sorted(rec.get("skipped") or "" for rec in ex["nodes"].values())[1].startswith("all effects are zero")
    other = _data(root, next(m["page"] for m in data["models"] if m["model_id"] == "lod-clipart-s0"))
    assert other["cka"] is None and other["circuits"]["classes"] == [] and other["explanations"] is None
    # an `experiment analyse` folder keeps CKA as analysis units named by run
    unit = study / "units" / "lod-clipart-s0" / "cka-0123456789ab"
    unit.mkdir(parents=True)
    (unit / "result.json").write_text(json.dumps({"points": ["a", "b"], "results": {"all": {"linear": {"clipart|real": {"cka": [0.5, 0.25]}}}}}))
    build_site(study)
    other = _data(root, next(m["page"] for m in data["models"] if m["model_id"] == "lod-clipart-s0"))
    assert other["cka"] == {"points": ["a", "b"], "subset": "all", "kernel": "linear",
                            "pairs": [{"a": "clipart", "b": "real", "cka": [0.5, 0.25], "ci_low": [], "ci_high": []}]}
    # every script and style is local: no http(s) reference anywhere in the site
    for p in root.rglob("*"):
        if p.suffix in (".html", ".js", ".css"):
            assert not re.search(r"(?<!www\.w3\.org/2000/svg)https?://(?!www\.w3\.org/2000/svg)", p.read_text()), p


def make_analysis(root: Path) -> Path:
    """One run's analysis folder as `clipmech analyze cka|circuits|explain RUN_DIR` write it."""
    run = root / "cg_high-clipart-s0-0123abcd"
    analysis = run / "analysis"
    analysis.mkdir(parents=True)
    (analysis / "cka_centroid.json").write_text(json.dumps({"points": POINTS[1:], "results": {"C2": {"linear": {
        "clipart|real": {"cka": [0.3, 0.5, 0.7], "ci_low": [0.2, 0.4, 0.6], "ci_high": [0.4, 0.6, 0.8]}}}}}))
    (analysis / "cka_sample.json").write_text(json.dumps({"points": ["x"], "results": {}}))
    for di, d in enumerate(DOMAINS[:2]):
        for ci, c in enumerate(("banana", "fire engine")):
            circ = _circuit(di * 10 + ci, 3)
            circ.meta.update(domain=d, **{"class": c})
            circ.save(analysis / "circuits_epoch_25" / "circuits" / d / f"{c}.json")
    _circuit(99, 1).save(analysis / "circuits_epoch_0" / "circuits" / "clipart" / "banana.json")  # another label: not shown
    write_explanations(analysis / "explain_epoch_25", None, str(run))
    return analysis


def test_one_runs_analysis_folder_is_a_study_of_one_model(tmp_path):
    site = build_site(make_analysis(tmp_path))
    root = site.index.parent
    assert (site.models, site.circuits, site.explained_models) == (1, 4, 1)
    data = _data(root, "data/study.js")
    assert data["kind"] == "analysis" and data["findings"] == [] and [m["model_id"] for m in data["models"]] == [
        "cg_high-clipart-s0-0123abcd"]
    page = _data(root, data["models"][0]["page"])
    assert page["cka"]["pairs"][0]["cka"] == [0.3, 0.5, 0.7]  # cka_centroid.json before the other modes
    assert page["circuits"]["classes"] == ["banana", "fire engine"] and page["circuits"]["domains"] == list(DOMAINS[:2])
    circ = _data(root, page["circuits"]["files"]["banana"])["domains"]["clipart"]
    assert circ["nodes"] == {p: v for p, v in _circuit(0, 3).nodes.items()} and circ["n_images"] == 3


def test_bad_input_is_one_line_and_a_rerun_replaces_the_site_whole(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["view", str(empty)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds no results.json" in err and "clipmech quickstart" in err
    assert main(["view", str(tmp_path / "nowhere")]) == 1 and "is not a folder" in capsys.readouterr().err
    (empty / "results.json").write_text("{not json")
    assert main(["view", str(empty)]) == 1 and "is not valid JSON" in capsys.readouterr().err
    study = make_study(tmp_path, explanations=False)
    assert main(["view", str(study)]) == 0 and "21 model pages" in capsys.readouterr().out
    stale = study / "view" / "stale.txt"
    stale.write_text("from an older site")
    build_site(study)
    assert not stale.exists() and (study / "view" / "index.html").is_file()
    assert [p.name for p in study.iterdir() if p.name.startswith(".view")] == []
    # a failed build leaves the previous site in place and no temporary folder behind
    blocked = make_study(tmp_path / "blocked", explanations=False)
    (blocked / "view").write_text("a file where the site goes")
    with pytest.raises(ViewInputError, match="exists and is not a folder"):
        build_site(blocked)
    assert (blocked / "view").read_text() == "a file where the site goes"
    assert [p.name for p in blocked.iterdir() if p.name.startswith(".view")] == []
    (study / "results.json").write_text(json.dumps({"models": "not a list"}))
    with pytest.raises(ViewInputError, match="no list of model rows"):
        build_site(study)
    assert (study / "view" / "index.html").is_file() and [p.name for p in study.iterdir() if p.name.startswith(".view")] == []


def test_view_package_does_not_import_torch():
    code = "import sys, clipmech.view.site, clipmech.view.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------ browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """(driver, site index, screenshot folder): headless Debian Chromium on a fresh profile, logging
    the console and every network request. Skips (counted, with the reason) only outside CI."""
    missing = [name for name, found in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if not found]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium")
    if missing:
        message = f"browser tests need {', '.join(missing)}: apt-get install chromium chromium-driver; pip install selenium"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    site = build_site(make_study(tmp_path_factory.mktemp("browser")))
    shots = Path(os.environ.get("CLIPMECH_VIEW_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    driver = chromium_driver(tmp_path_factory.mktemp("profile"))
    yield driver, site.index, shots
    driver.quit()


def chromium_driver(profile: Path):
    """Headless Debian Chromium through chromedriver on a fresh profile, logging the console and the
    network (also used by benchmarks/view_site.py)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--window-size=1400,1000", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    driver.get("about:blank")
    driver.get_log("browser"), driver.get_log("performance")  # drop the start-up tab's own (chrome://) requests
    return driver


def _wait(driver, condition: str, timeout: float = 15):
    """Wait until the JavaScript expression `condition` is truthy on the page."""
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(driver, timeout).until(lambda d: d.execute_script(f"return !!({condition})"))


def _page(driver, kind: str, extra: str = "true"):
    _wait(driver, f"document.body.dataset.page === '{kind}' && document.body.dataset.ready === '1' && ({extra})")


def full_page_screenshot(driver, shots: Path, name: str) -> Path:
    """A full-page screenshot shots/name.png (the window grown to the page's height, then restored)."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(max(1000, height), 6000))
    path = shots / f"{name}.png"
    driver.save_screenshot(str(path))
    driver.set_window_size(1400, 1000)
    return path


def requested_urls(driver) -> list[str]:
    """Every URL the page requested since the last call (from the performance log)."""
    return [json.loads(e["message"])["message"]["params"]["request"]["url"] for e in driver.get_log("performance")
            if '"Network.requestWillBeSent"' in e["message"]]


def _clean_logs(driver) -> None:
    """No console errors, and no request for anything but a file:// URL."""
    errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert errors == []
    urls = requested_urls(driver)
    assert urls and all(u.startswith("file://") for u in urls), [u for u in urls if not u.startswith("file://")]


def test_study_page_lists_every_finding_and_sorts_models(browser):
    from selenium.webdriver.common.by import By
    driver, index, shots = browser
    driver.get(index.as_uri())
    _page(driver, "study")
    results = json.loads((index.parent.parent / "results.json").read_text())
    shown = [e.get_attribute("data-finding") for e in driver.find_elements(By.CSS_SELECTOR, ".finding")]
    assert shown == [f["finding"] for f in results["findings"]]
    text = driver.find_element(By.ID, "findings").text
    assert all(f"{f['finding']}: {f['verdict']}" in text for f in results["findings"])
    assert len(driver.find_elements(By.CSS_SELECTOR, "table.models tbody tr")) == len(results["models"])
    driver.find_element(By.CSS_SELECTOR, 'th[data-key="c2"]').click()
    c2 = [float(r.find_elements(By.TAG_NAME, "td")[5].text) for r in driver.find_elements(By.CSS_SELECTOR, "table.models tbody tr")]
    assert c2 == sorted(c2) and c2 != [round(100 * m["c2_test_acc"], 1) for m in results["models"]]
    driver.find_element(By.CSS_SELECTOR, 'th[data-key="c2"]').click()  # again: descending
    c2 = [float(r.find_elements(By.TAG_NAME, "td")[5].text) for r in driver.find_elements(By.CSS_SELECTOR, "table.models tbody tr")]
    assert c2 == sorted(c2, reverse=True)
    assert driver.find_element(By.CSS_SELECTOR, 'th[data-key="c2"]').get_attribute("aria-sort") == "descending"
    assert full_page_screenshot(driver, shots, "study").stat().st_size > 10_000
    _clean_logs(driver)


def test_model_link_opens_its_circuit_graphs_and_a_node_opens_its_panel(browser):
    from selenium.webdriver.common.by import By
    driver, index, shots = browser
    model = CIRCUIT_MODELS[0]
    driver.get(index.as_uri())
    _page(driver, "study")
    driver.find_element(By.CSS_SELECTOR, f'a.model-link[data-model="{model}"]').click()
    _page(driver, "model", "document.querySelectorAll('svg.circuit').length === 2")
    graphs = driver.find_elements(By.CSS_SELECTOR, "svg.circuit")
    assert [g.get_attribute("data-domain") for g in graphs] == ["clipart", "painting"]  # the row's test domain first
    assert [len(g.find_elements(By.CSS_SELECTOR, "circle.node")) for g in graphs] == [expected_nodes()] * 2
    # nodes shared with the side-by-side domain are highlighted: exactly the intersection of the two files
    a, b = (_circuit(100 * 0 + 10 * di, 2).node_set() for di in (0, 1))
    assert {c.get_attribute("data-node") for c in graphs[0].find_elements(By.CSS_SELECTOR, "circle.node.shared")} == a & b
    assert driver.find_elements(By.CSS_SELECTOR, "svg.cka circle.pt")
    full_page_screenshot(driver, shots, "model")
    explained = f"{POINTS[2]}/{_circuit(0, 2).nodes[POINTS[2]][0]}"
    driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))",
                          graphs[0].find_element(By.CSS_SELECTOR, f'circle.node[data-node="{explained}"]'))
    _page(driver, "node", f"document.querySelector('#node-panel[data-node=\"{explained}\"]')")
    panel = driver.find_element(By.ID, "node-panel")
    assert "banana" in panel.text and "63.0 % of the node's effect energy (chance 5.0 %, ceiling 80.0 %)" in panel.text
    assert "-0.1200" in panel.text and "image missing" in panel.text
    assert driver.execute_script("return [...document.querySelectorAll('#node-panel img')].every(i => i.complete && i.naturalWidth > 0)")
    full_page_screenshot(driver, shots, "node")
    plain = f"{POINTS[1]}/{_circuit(0, 2).nodes[POINTS[1]][1]}"
    driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))",  # the page re-rendered
                          driver.find_element(By.CSS_SELECTOR, f'svg.circuit[data-domain="clipart"] circle.node[data-node="{plain}"]'))
    _page(driver, "node", f"document.querySelector('#node-panel[data-node=\"{plain}\"]')")
    assert "No explanation recorded" in driver.find_element(By.ID, "node-panel").text
    _clean_logs(driver)


def test_deep_link_opens_the_named_class_domains_and_node_in_a_moved_copy(browser, tmp_path):
    from selenium.webdriver.common.by import By
    driver, built, shots = browser
    index = shutil.copytree(built.parent, tmp_path / "shared copy") / "index.html"  # self-contained: works anywhere
    model, node = CIRCUIT_MODELS[1], f"{POINTS[3]}/{_circuit(100 + 20 + 1, 2).nodes[POINTS[3]][0]}"
    cls = R.circuit_class_names(json.loads((built.parent.parent / "results.json").read_text()))[1]
    driver.get("about:blank")
    driver.get(index.as_uri() + f"#model={model}&class={cls}&domain=real&vs=none&node={node}")
    _page(driver, "node", f"document.querySelector('#node-panel[data-node=\"{node}\"]')")
    assert [g.get_attribute("data-domain") for g in driver.find_elements(By.CSS_SELECTOR, "svg.circuit")] == ["real"]
    assert driver.find_element(By.CSS_SELECTOR, 'select[data-key="class"]').get_attribute("value") == cls
    assert "rank in point" in driver.find_element(By.ID, "node-panel").text
    _clean_logs(driver)


def test_analysis_folder_site_draws_its_run(browser, tmp_path):
    from selenium.webdriver.common.by import By
    driver, _, shots = browser
    index = build_site(make_analysis(tmp_path)).index
    driver.get(index.as_uri())
    _page(driver, "study")
    assert "One run's analysis folder" in driver.find_element(By.ID, "findings").text
    driver.find_element(By.CSS_SELECTOR, "a.model-link").click()
    _page(driver, "model", "document.querySelectorAll('svg.circuit').length === 2")
    assert [len(g.find_elements(By.CSS_SELECTOR, "circle.node")) for g in driver.find_elements(By.CSS_SELECTOR, "svg.circuit")] == \
        [expected_nodes()] * 2
    assert not driver.find_elements(By.ID, "rows") and not driver.find_elements(By.ID, "causal")  # no study rows
    assert len(driver.find_elements(By.CSS_SELECTOR, "svg.cka polyline")) == 1
    full_page_screenshot(driver, shots, "analysis_model")
    _clean_logs(driver)
