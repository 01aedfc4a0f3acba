"""Mixtures: the subsampling rule on hand-computed cases, every setup's invariants on a fake
DomainNet folder, allow-p, domain subsets, ids, validation split, base merge, errors."""
from __future__ import annotations

import math

import numpy as np
import pytest

from clipmech.data import DomainNet, build_mixture
from clipmech.data.mixtures import stratified_keep
from clipmech.data.synthetic import write_fake_domainnet


# ---- the rule on hand-computed cases --------------------------------------------------------
def test_keep_shrinks_then_trims_first_domain_first():
    # pool 10 -> 5: rho = 1/2, ceil -> [[2,1],[2,1]] = 6, trim domain 0 class 0 -> [[1,1],[2,1]]
    keep = stratified_keep(np.array([[4, 2], [3, 1]]), 5, trim_order=[0, 1])
    assert keep.tolist() == [[1, 1], [2, 1]]


def test_keep_trim_order_round_robin_over_classes():
    # all buckets keep ceil(1/2) = 1 -> 4, overshoot 2 removed from domain 1's classes 0 then 1
    keep = stratified_keep(np.array([[1, 1], [1, 1]]), 2, trim_order=[1, 0])
    assert keep.tolist() == [[1, 1], [0, 0]]


def test_keep_uses_exact_ceil():
    # rho = 14/50; exact ceil -> [2, 6, 7] = 15, trim class 0 -> [1, 6, 7]. With float rho,
    # 0.28 * 25 = 7.000000000000001 would ceil to 8 and the trim would give [1, 5, 8].
    assert 14 / 50 * 25 > 7
    assert stratified_keep(np.array([[5, 20, 25]]), 14, trim_order=[0]).tolist() == [[1, 6, 7]]


def test_keep_fixed_buckets_are_kept_and_never_trimmed():
    # fixed C2 bucket keeps 2; the rest share 4 of 15 -> ceil(4*5/15) = 2 each = 6 + 2 = 8 > 6;
    # trim domain 1 class 0, (class 1 fixed: skipped), then domain 0 class 0
    keep = stratified_keep(np.array([[5, 5], [5, 2]]), 6, trim_order=[1, 0], fixed=np.array([[0, 0], [0, 2]]))
    assert keep.tolist() == [[1, 2], [1, 2]]


def test_keep_rejects_too_small_pool():
    with pytest.raises(ValueError, match="too small"):
        stratified_keep(np.array([[2, 1]]), 4, trim_order=[0])


# ---- setups on a fake DomainNet folder --------------------------------------------------------
@pytest.fixture(scope="module")
def dn(tmp_path_factory):
    return DomainNet(write_fake_domainnet(tmp_path_factory.mktemp("dn")))


C2 = ["axe", "banana"]


def _c2_idx(ds):
    return [ds.class_index(c) for c in C2]


def _S(ds, d_star):
    tr = ds.counts("train")
    c1 = np.ones(len(ds.classes), bool)
    c1[_c2_idx(ds)] = False
    return int(tr[ds.domain_index("real")].sum() + tr[ds.domain_index(d_star), c1].sum())


@pytest.mark.parametrize("d_star", ["sketch", "quickdraw", "painting"])
def test_every_setup_invariants(dn, d_star):
    S = _S(dn, d_star)
    d, r = dn.domain_index(d_star), dn.domain_index("real")
    c2 = _c2_idx(dn)
    tr = dn.counts("train")
    ids = {}
    for setup in ["natural_only", "cg_low", "cg_high", "lod", "pseudo_low", "pseudo_high"]:
        m = build_mixture(dn, setup, test_domain=d_star, test_classes=C2)
        ids[setup] = m.id
        c = m.counts()
        assert (dn.split[m.indices] == "train").all() and len(np.unique(m.indices)) == len(m.indices)
        assert np.all(c <= tr)
        present = set(np.flatnonzero(c.sum(1)).tolist())
        if setup == "natural_only":
            assert np.array_equal(c, np.where(np.arange(6)[:, None] == r, tr, 0))
            continue
        assert len(m.indices) == S  # equal DomainNet size across the non-natural setups
        if setup in ("cg_low", "cg_high", "lod"):
            assert c[d, c2].sum() == 0
        if setup == "cg_low":
            assert np.array_equal(c[[r, d]][:, [k for k in range(len(dn.classes)) if k not in c2]],
                                  tr[[r, d]][:, [k for k in range(len(dn.classes)) if k not in c2]])
        if setup in ("cg_low", "pseudo_low"):
            assert present <= {r, d}
        if setup == "lod":
            assert d not in present and c[:, c2].sum() > 0  # C2 of other domains present by design
        if setup in ("cg_high", "pseudo_high"):
            assert present == set(range(6))
        if setup.startswith("pseudo"):
            assert c[d, c2].sum() > 0
    letters = "cipqrs".replace(d_star[0], "")
    assert ids == {
        "natural_only": "lso-real-only",
        "cg_low": f"lso-{''.join(sorted('r' + d_star[0]))}-no{d_star}classes",
        "cg_high": f"lso-cipqrs-no{d_star}classes",
        "lod": f"lso-{letters}-no{d_star}classes",
        "pseudo_low": f"lso-{''.join(sorted('r' + d_star[0]))}-no{d_star}classes-pseudo",
        "pseudo_high": f"lso-cipqrs-no{d_star}classes-pseudo",
    }


def test_cg_high_is_stratified_and_keeps_first_samples(dn):
    m = build_mixture(dn, "cg_high", test_domain="sketch", test_classes=C2)
    pool = dn.counts("train")
    pool[dn.domain_index("sketch"), _c2_idx(dn)] = 0
    trim = [dn.domain_index(x) for x in ["real", "quickdraw", "painting", "sketch", "infograph", "clipart"]]
    expected = stratified_keep(pool, _S(dn, "sketch"), trim)
    assert np.array_equal(m.counts(), expected)
    assert m.manifest["rho"] == pytest.approx(_S(dn, "sketch") / pool.sum())
    # kept samples are the first ones of each bucket in file order
    for d in range(6):
        for k in range(len(dn.classes)):
            bucket = dn.indices("train", domains=[d], classes=[k])
            kept = np.intersect1d(m.indices, bucket)
            assert np.array_equal(kept, bucket[:len(kept)])


def test_allow_p_keeps_quota_of_c2(dn):
    p = 0.5
    S = _S(dn, "sketch")
    d = dn.domain_index("sketch")
    pseudo = build_mixture(dn, "pseudo_high", test_domain="sketch", test_classes=C2)
    m = build_mixture(dn, "cg_high", test_domain="sketch", test_classes=C2, allow_p=p)
    tr = dn.counts("train")
    rho_pseudo = S / tr.sum()
    assert pseudo.manifest["rho"] == pytest.approx(rho_pseudo)
    quota = [math.ceil(p * rho_pseudo * n - 1e-9) for n in tr[d, _c2_idx(dn)]]
    assert m.counts()[d, _c2_idx(dn)].tolist() == quota
    assert len(m.indices) == S
    assert m.id == "lso-cipqrs-nosketchclasses-allow0.5" and m.manifest["paper_compat"] is False
    compat = build_mixture(dn, "cg_high", test_domain="sketch", test_classes=C2, allow_p=p, paper_compat=True)
    assert compat.manifest["paper_compat"] is True and compat.counts().tolist() == m.counts().tolist()  # no float hit
    with pytest.raises(ValueError, match="allow_p"):
        build_mixture(dn, "lod", test_domain="sketch", test_classes=C2, allow_p=p)


def test_allow_p_quota_exact_and_paper_float_ceil():
    """paper_compat reproduces the paper's float ceil(p * rho * n); the default is exact."""
    from clipmech.data.mixtures import allow_p_quota
    assert 0.05 * (2 / 5) * 50 > 1  # 1.0000000000000002: exactly 1 in rationals, a hair above in floats
    assert allow_p_quota(0.05, 2, 5, 50) == 1 and allow_p_quota(0.05, 2, 5, 50, paper_compat=True) == 2
    assert allow_p_quota(0.05, 2, 5, 51) == allow_p_quota(0.05, 2, 5, 51, paper_compat=True) == 2
    assert allow_p_quota(0.5, 10, 20, 8) == allow_p_quota(0.5, 10, 20, 8, paper_compat=True) == 2  # exact hit


def test_domain_subsets_and_aligned(dn):
    m = build_mixture(dn, "cg_low", test_domain="sketch", test_classes=C2, domains="cqrs", aligned=True)
    assert m.id == "lso-cqrs-nosketchclasses-aligned"
    assert set(np.flatnonzero(m.counts().sum(1))) == {dn.domain_index(x) for x in ["clipart", "quickdraw", "real", "sketch"]}
    assert len(m.indices) == _S(dn, "sketch")
    assert all(("image" in c or "picture" in c) for c in m.captions)
    with pytest.raises(ValueError, match="add 's'"):
        build_mixture(dn, "cg_high", test_domain="sketch", test_classes=C2, domains="cqr")
    with pytest.raises(ValueError, match="not domain initials"):
        build_mixture(dn, "cg_high", test_domain="sketch", test_classes=C2, domains="rsx")


def test_val_split_is_filtered_not_subsampled(dn):
    m = build_mixture(dn, "cg_high", test_domain="sketch", test_classes=C2, split="val")
    expected = dn.counts("test")
    expected[dn.domain_index("sketch"), _c2_idx(dn)] = 0
    assert np.array_equal(m.counts(), expected)
    assert m.filename() == "dn-captions-val-lso-cipqrs-nosketchclasses.tsv"


def test_nosub_and_default_c2(dn):
    m = build_mixture(dn, "cg_high", test_domain="sketch", subsample=False)
    assert m.id == "lso-cipqrs-nosketchclasses-nosub"
    # DomainNet default C2 = the paper's 15 classes that exist here
    assert m.manifest["test_classes"] == ["aircraft carrier", "axe", "banana"]


def test_manifest_counts_and_hash(dn):
    a = build_mixture(dn, "lod", test_domain="quickdraw", test_classes=C2)
    b = build_mixture(dn, "lod", test_domain="quickdraw", test_classes=C2, seed=1)
    man = a.manifest
    assert sum(sum(v.values()) for v in man["counts"].values()) == len(a.indices) == man["n_dataset_samples"]
    assert man["counts"]["quickdraw"] == {c: 0 for c in dn.classes}
    assert man["content_hash"] != b.manifest["content_hash"]  # captions differ with the seed
    assert man["dataset"]["content_hash"] == dn.content_hash()


def test_bad_parameters(dn):
    with pytest.raises(KeyError, match="cg_high"):
        build_mixture(dn, "cg-high", test_domain="sketch")
    with pytest.raises(ValueError, match="natural domain"):
        build_mixture(dn, "cg_high", test_domain="real")
    with pytest.raises(KeyError, match="sketch"):
        build_mixture(dn, "cg_high", test_domain="sketchy")
    with pytest.raises(KeyError, match="banana"):
        build_mixture(dn, "cg_high", test_domain="sketch", test_classes=["bananna"])
    with pytest.raises(ValueError, match="'train' or 'val'"):
        build_mixture(dn, "cg_high", test_domain="sketch", split="dev")


def test_natural_only_needs_no_test_domain_and_small_pool_error(dn):
    m = build_mixture(dn, "natural_only")
    assert m.id == "lso-real-only" and np.array_equal(m.indices, dn.indices("train", domains=["real"]))
    with pytest.raises(ValueError, match="no default test domain"):
        build_mixture(dn, "cg_high")
    with pytest.raises(ValueError, match="pool is too small.*--no-subsample"):
        build_mixture(dn, "lod", test_domain="sketch", test_classes=C2, domains="r")
