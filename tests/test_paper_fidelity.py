"""The paper's analysis rules (paper.md §8.3-8.6, §12) and the `paper_compat` switch: WL on hand-made
directed graphs, 50-image cell sampling, and that paper_compat changes exactly the documented numbers."""
import numpy as np
import pytest
import torch

from clipmech.analysis import circuit_similarity as S
from clipmech.analysis.circuits import Circuit
from clipmech.analysis.cka import domain_cka
from clipmech.analysis.paper_compat import cka_class_list_domain, wraparound_edges
from clipmech.data.dataset import DomainDataset
from clipmech.data.samples import cell_samples, distinct_drawings


def _graph(edges, nodes=None):
    """A circuit over points p0 < p1 < p2 whose edges are (u, i, d, j); nodes default to the endpoints."""
    points = ["p0", "p1", "p2"]
    found = {p: set() for p in points}
    for u, i, d, j in edges:
        found[u].add(i)
        found[d].add(j)
    for p, extra in (nodes or {}).items():
        found[p] |= set(extra)
    return Circuit(points, {p: torch.arange(8.0) for p in points}, {p: sorted(v) for p, v in found.items()},
                   [(u, i, d, j, 1.0) for u, i, d, j in edges])


def test_wl_successors_only_hand_computation():
    """a: x->y, x->z, y->z (+ isolated w); b: x->y, x->z, z->y (+ w); x = p0/0, y = p1/0, z = p2/0, w = p2/1.
    Successor-only relabelling by hand:
      h1  a: x(x|y,z) y(y|z) z(z|) w(w|)   b: x(x|y,z) y(y|) z(z|y) w(w|)  -> shared x, w
      h2  only w keeps an identical subtree (x's successors now differ)     -> shared w
      h3  again only w.  Each graph has 4 labels per iteration."""
    a = _graph([("p0", 0, "p1", 0), ("p0", 0, "p2", 0), ("p1", 0, "p2", 0)], {"p2": [1]})
    b = _graph([("p0", 0, "p1", 0), ("p0", 0, "p2", 0), ("p2", 0, "p1", 0)], {"p2": [1]})
    assert [S.wl_kernel(a, b, h, normalize=False) for h in range(4)] == [4, 4 + 2, 4 + 2 + 1, 4 + 2 + 1 + 1]
    assert [S.wl_kernel(a, a, h, normalize=False) for h in range(4)] == [4, 8, 12, 16]
    assert S.wl_kernel(a, b, 1) == pytest.approx(6 / 8) and S.wl_kernel(a, b, 2) == pytest.approx(7 / 12)
    # direction matters: reversing every edge of a gives other successor sets
    rev = _graph([("p1", 0, "p0", 0), ("p2", 0, "p0", 0), ("p2", 0, "p1", 0)], {"p2": [1]})
    assert S.wl_kernel(a, rev, 1, normalize=False) == 4 + 1  # only w


def test_wl_paper_naming_is_the_only_compat_change():
    a = _graph([("p0", 0, "p1", 0), ("p0", 0, "p2", 0), ("p1", 0, "p2", 0)], {"p2": [1]})
    b = _graph([("p0", 0, "p1", 0), ("p0", 0, "p2", 0), ("p2", 0, "p1", 0)], {"p2": [1]})
    ours, paper = S.wl_scores(a, b), S.wl_scores(a, b, paper_compat=True)
    assert ours == {"wl_h1": pytest.approx(6 / 8), "wl_h2": pytest.approx(7 / 12), "wl_h3": pytest.approx(8 / 16)}
    assert paper == {**ours, "wl_h2": ours["wl_h3"]}  # the paper's "h2" runs h = 3
    full, full_compat = S.circuit_similarities(a, b), S.circuit_similarities(a, b, paper_compat=True)
    assert {k for k in full if full[k] != full_compat[k]} == {"wl_h2"}


def test_wraparound_edges_change_edges_not_nodes():
    """paper.md §12: with verbose off the paper's edge loop also pairs the last point (upstream) with
    the first (downstream); the scores are 0, so the top-k tie keeps the first k upstream nodes."""
    a = _graph([("p0", 0, "p1", 0), ("p1", 0, "p2", 0)], {"p2": [5, 6, 7, 1]})
    b = _graph([("p0", 0, "p1", 0), ("p1", 0, "p2", 1)], {"p2": [0, 5, 6]})
    wa, wb = wraparound_edges(a, top_k=3), wraparound_edges(b, top_k=3)
    assert wa.edges[len(a.edges):] == [("p2", i, "p0", 0, 0.0) for i in a.nodes["p2"][:3]]
    assert wa.nodes == a.nodes and wa.meta["wraparound_edges"] == 3 and a.edges == wraparound_edges(a).edges[:2]
    assert S.node_jaccard(wa, wb) == S.node_jaccard(a, b)
    assert S.edge_jaccard(a, b) == pytest.approx(1 / 3)
    # a keeps p2/{0,1,5} -> p0/0 (0 is its p2/0 node), b p2/{0,1,5}: three shared wrap-around edges
    assert S.edge_jaccard(wa, wb) == pytest.approx((1 + 3) / (3 + 3))


def _cka_inputs():
    """3 domains x 10 classes x 3 images, painting lacks class 9; C2 = {0, 1, 2, 3}."""
    rng = np.random.default_rng(0)
    dom, cls = np.meshgrid(np.arange(3), np.arange(10), indexing="ij")
    dom, cls = np.repeat(dom.ravel(), 3), np.repeat(cls.ravel(), 3)
    keep = ~((dom == 1) & (cls == 9))
    dom, cls = dom[keep], cls[keep]
    feats = {"p": rng.normal(size=(len(dom), 7)) + cls[:, None] * 0.3}
    subsets = {"all": list(range(10)), "C1": list(range(4, 10)), "C2": [0, 1, 2, 3]}
    return feats, cls, dom, ["clipart", "painting", "real"], subsets


def test_cka_painting_class_list_changes_only_pairs_without_painting():
    feats, cls, dom, domains, subsets = _cka_inputs()
    kw = dict(kernels=["linear"], n_boot=20, n_perm=10, seed=3, min_rows=4)  # a small fixture
    ours = domain_cka(feats, cls, dom, domains, subsets, **kw)
    paper = domain_cka(feats, cls, dom, domains, subsets, class_list_domain=cka_class_list_domain(domains, True), **kw)
    assert cka_class_list_domain(domains, False) is None and cka_class_list_domain(["a", "b"], True) is None
    assert ours["class_list_domain"] is None and paper["class_list_domain"] == "painting"
    changed = set()
    for subset in subsets:
        for pair, r in ours["results"][subset]["linear"].items():
            if r != paper["results"][subset]["linear"].get(pair):
                changed.add((subset, pair))
    assert not ours["skipped"] and not paper["skipped"]
    assert changed == {("all", "clipart|real"), ("C1", "clipart|real")}
    assert ours["results"]["all"]["linear"]["clipart|real"]["n_classes"] == 10
    assert paper["results"]["all"]["linear"]["clipart|real"]["n_classes"] == 9
    assert ours["results"]["all"]["linear"]["clipart|real"]["cka"] != paper["results"]["all"]["linear"]["clipart|real"]["cka"]
    with pytest.raises(KeyError, match="painting"):
        domain_cka(feats, cls, dom, domains, subsets, class_list_domain="paintng", **kw)


def _cells_dataset():
    dom, cls = np.meshgrid(np.arange(2), np.arange(3), indexing="ij")
    dom = np.repeat(dom.ravel(), 70)
    cls = np.repeat(cls.ravel(), 70)
    split = np.where(np.arange(len(dom)) % 7 == 0, "train", "test")
    return DomainDataset("cells", ["a", "b"], ["x", "y", "z"], dom, cls, split,
                         sources=[f"/img/{i}.png" for i in range(len(dom))], natural_domain="a")


def test_cell_samples_one_seeded_shuffle():
    """paper.md §8.4: 50 images per (domain, class), the first ones of that cell in ONE permutation
    of the test split seeded 42."""
    ds = _cells_dataset()
    cells = cell_samples(ds)
    test = ds.indices("test")
    perm = np.random.default_rng(42).permutation(test)
    for (d, k), idx in cells.items():
        in_cell = perm[(ds.domain_idx[perm] == ds.domains.index(d)) & (ds.class_idx[perm] == ds.classes.index(k))]
        assert np.array_equal(idx, in_cell[:50]) and len(idx) == 50  # 60 test images per cell
        assert (ds.split[idx] == "test").all()
    assert len(cells) == 6
    again = cell_samples(ds)
    assert all(np.array_equal(cells[c], again[c]) for c in cells)
    small = cell_samples(ds, n=10)
    assert all(np.array_equal(small[c], cells[c][:10]) for c in cells)  # a prefix: one shuffle for all n
    other = cell_samples(ds, seed=0)
    assert any(not np.array_equal(other[c], cells[c]) for c in cells)
    with pytest.raises(ValueError, match="n must be"):
        cell_samples(ds, n=0)


def test_distinct_drawings_count_view_zero_only_where_views_are_marked():
    ds = _cells_dataset()
    assert distinct_drawings(ds).all() and len(distinct_drawings(ds)) == len(ds.class_idx)
    ds.view_idx = np.arange(len(ds.class_idx)) % 4  # four views per drawing
    assert np.array_equal(distinct_drawings(ds), ds.view_idx == 0)
