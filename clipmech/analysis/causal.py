"""The causal test of "shared circuit nodes matter" (issue 26): a placebo, a randomisation null,
balance on independent IG, and an exact sign-flip test over classes.

Why not the matched test of `clipmech.analysis.controls.matched_causal_test` alone: shared nodes
pile up in the top IG strata where the circuit's other nodes are scarce, so matching trimmed most of
them; matching on the discovery IG itself leaves a positive effect with no sharing mechanism
(regression to the mean: a node picked for a high noisy score in two circuits is truly important
more often than a node with the same score in one); and per-node balance does not describe a joint
set ablation. Here, for each class k of the test domain t (circuits[d][k] discovered on drawings
that are not ablated; see `clipmech.data.samples.check_disjoint_drawings`):

- shared set S_k: nodes of circuits[t][k] that lie in circuits[b][k] for some other domain b;
- placebo set P_k(pi): nodes of circuits[t][k] that lie in circuits[b][pi(k)] for some other b and
  in no circuits[b][k] (same number of other-domain circuits as S_k), for each of
  `n_derangements` fixed derangements pi of the classes (`derangements`);
- controls of a set: `n_random` random node sets matched to it on size, layer mix (count per
  point) and IG distribution (count per quantile stratum of `match_scores`, IG from drawings not
  used for discovery); the pool is every node of the point outside the set, so the top stratum is
  matchable; where a stratum still lacks pool nodes, the shortfall is counted as "unmatched" (the
  random sets are smaller there), never trimmed from the set;
- effects (drop = outcome before minus after ablating, averaged over the held-out images):
  shared - controls = drop(S) - mean drop(random sets); the randomisation rank of drop(S) among
  the random drops; the same per IG stratum (S within one stratum, the random sets' nodes there),
  top stratum included; placebo - controls likewise, averaged over derangements; the primary
  contrast (shared - controls) - (placebo - controls);
- balance: |standardised mean difference| of `balance_scores` (IG from drawings used neither for
  discovery nor for matching, z-scored within each point) between a set and its controls'
  pooled nodes; a class whose shared or placebo sets exceed BALANCE_LIMIT is excluded from the
  verdict and counted;
- outcomes: top-1 accuracy, true-class cosine logit and logit margin (true minus best other);
  ablations: mean (over reference images) and resample (donor image values).

`causal_finding` averages each class's primary contrast over models and applies the exact
one-sided sign-flip test over classes (side: shared beyond placebo, i.e. greater). With n classes
the smallest attainable p is 2^-n, so at least 8 classes are needed for p <= 1/256.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from clipmech.analysis.ablation import ablated_embeddings, ablation_values, resample_values
from clipmech.analysis.circuit import Circuit, discover_circuits
from clipmech.analysis.controls import score_strata
from clipmech.analysis.patching import cosine_logits

Circuits = Mapping[str, Mapping[Any, Circuit]]  # circuits[domain][class]
NodeSet = dict[str, list[int]]  # {point: node indices}
OUTCOMES = ("accuracy", "logit", "margin")
BALANCE_LIMIT = 0.1  # |standardised mean difference| a balanced class may not exceed
SIDE = "greater: the shared set's effect exceeds the placebo's"
MIN_CLASSES = 8  # 2^-8 = 1/256: the smallest attainable sign-flip p must be well below alpha/2


@dataclass(frozen=True)
class CausalOptions:
    """Sizes of the causal test. Forwards per class and ablation: 1 + (1 + n_random)
    + n_strata (1 + n_random_small) + n_derangements (1 + n_random_small) set ablations of the
    class's held-out images, batched `batch` images per forward."""

    n_random: int = 200  # random matched sets of the shared set (the randomisation null)
    n_random_small: int = 50  # random matched sets per stratum and per placebo set
    n_strata: int = 4  # quantile strata of the matching IG per point
    n_derangements: int = 5
    ablations: tuple[str, ...] = ("mean", "resample")
    balance_limit: float = BALANCE_LIMIT
    batch: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_random", "n_random_small", "n_strata", "n_derangements", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"CausalOptions.{name} must be >= 1, got {getattr(self, name)}")
        bad = set(self.ablations) - {"mean", "resample"}
        if bad or not self.ablations:
            raise ValueError(f"CausalOptions.ablations must be a non-empty subset of ('mean', 'resample'), got "
                             f"{self.ablations}")


# ------------------------------------------------------------------------------------------- sets
def derangements(n: int, count: int, seed: int = 0) -> list[np.ndarray]:
    """Up to `count` distinct permutations of range(n) without a fixed point, drawn with a fixed seed
    (fewer when fewer exist: one for n = 2, two for n = 3). Raises for n < 2."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 classes, got {n}")
    if n <= 6:  # enumerate: at most 265 derangements, so small n never loops on rejections
        every = [np.array(p) for p in itertools.permutations(range(n)) if all(p[i] != i for i in range(n))]
        order = np.random.default_rng(seed).permutation(len(every))
        return [every[i] for i in order[:count]]
    rng, out, seen = np.random.default_rng(seed), [], set()
    while len(out) < count:  # about 1/e of permutations are derangements
        p = rng.permutation(n)
        if (p != np.arange(n)).all() and tuple(p) not in seen:
            seen.add(tuple(p))
            out.append(p)
    return out


def _other_nodes(circuits: Circuits, test_domain: str, k: Any, p: str) -> set[int]:
    return set().union(*(circuits[b][k].nodes[p] for b in circuits if b != test_domain and k in circuits[b]))


def shared_set(circuits: Circuits, test_domain: str, k: Any, points: Sequence[str]) -> NodeSet:
    """{point: sorted nodes} of circuits[test_domain][k] that lie in class k's circuit of another domain."""
    own = circuits[test_domain][k]
    return {p: sorted(set(own.nodes[p]) & _other_nodes(circuits, test_domain, k, p)) for p in points}


def placebo_set(circuits: Circuits, test_domain: str, k: Any, placebo: Any, points: Sequence[str]) -> NodeSet:
    """{point: sorted nodes} of circuits[test_domain][k] that lie in class `placebo`'s circuit of
    another domain and in no other domain's class-k circuit."""
    if placebo == k:
        raise ValueError(f"the placebo class must differ from the class itself ({k!r})")
    own = circuits[test_domain][k]
    return {p: sorted((set(own.nodes[p]) & _other_nodes(circuits, test_domain, placebo, p))
                      - _other_nodes(circuits, test_domain, k, p)) for p in points}


def _size(s: Mapping[str, Sequence[int]]) -> int:
    return sum(len(v) for v in s.values())


def matched_random_sets(target: Mapping[str, Sequence[int]], scores: Mapping[str, Tensor | np.ndarray],
                        n_strata: int, n_sets: int, rng: np.random.Generator) -> dict[str, Any]:
    """`n_sets` random node sets matched to `target` on size, layer mix and IG distribution: per point,
    quantile strata of `scores[point]` over all its nodes (`score_strata`); each set draws, without
    replacement, as many nodes of each stratum as `target` has there, from the point's nodes outside
    `target`. A stratum with fewer such nodes gives all it has; the shortfall is counted.

    Returns {"sets": [NodeSet] * n_sets, "strata": {point: stratum per node [C]},
    "unmatched": [n_strata] target nodes per stratum without a control (per set)}."""
    strata, unmatched = {}, np.zeros(n_strata, dtype=int)
    plan: list[tuple[str, np.ndarray, int]] = []  # (point, candidates, how many) per (point, stratum)
    for p, nodes in target.items():
        s = np.asarray(scores[p], dtype=float)
        strata[p] = score_strata(s, n_strata)[0]
        inside = np.zeros(len(s), dtype=bool)
        inside[list(nodes)] = True
        for z in range(n_strata):
            need = int((inside & (strata[p] == z)).sum())
            pool = np.flatnonzero(~inside & (strata[p] == z))
            if need:
                unmatched[z] += max(0, need - len(pool))
                plan.append((p, pool, min(need, len(pool))))
    sets = []
    for _ in range(n_sets):
        s: NodeSet = {p: [] for p in target}
        for p, pool, m in plan:
            s[p].extend(rng.choice(pool, m, replace=False).tolist())
        sets.append({p: sorted(v) for p, v in s.items()})
    return {"sets": sets, "strata": strata, "unmatched": unmatched.tolist()}


def in_stratum(s: Mapping[str, Sequence[int]], strata: Mapping[str, np.ndarray], z: int) -> NodeSet:
    """The nodes of `s` whose stratum (per point, `matched_random_sets`' "strata") is z."""
    return {p: [i for i in v if strata[p][i] == z] for p, v in s.items()}


# ---------------------------------------------------------------------------------------- balance
def standardized_mean_difference(a: Sequence[float], b: Sequence[float]) -> float:
    """(mean a - mean b) / sqrt((var a + var b) / 2), sample variances (ddof 1; 0 for one value).
    0 when both groups are constant and equal; raises when a group is empty or when the groups are
    constant but differ (the SMD is infinite: no balance)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size == 0 or b.size == 0:
        raise ValueError("standardized_mean_difference needs two non-empty groups")
    var = lambda x: float(x.var(ddof=1)) if x.size > 1 else 0.0  # noqa: E731
    diff, pooled = float(a.mean() - b.mean()), np.sqrt((var(a) + var(b)) / 2)
    if pooled == 0:
        if diff == 0:
            return 0.0
        raise ValueError("standardized_mean_difference: constant groups with different means (infinite SMD)")
    return diff / pooled


def set_balance(target: Mapping[str, Sequence[int]], controls: Sequence[Mapping[str, Sequence[int]]],
                scores: Mapping[str, Tensor | np.ndarray]) -> float | None:
    """SMD of `scores` (z-scored within each point over all its nodes, so points are comparable)
    between the target's nodes and the pooled nodes of all control sets; None when it is infinite
    (both groups constant with different means, e.g. a one-node placebo set whose stratum offers one
    other node): such a set is not balanced, and the class is excluded and counted as unbalanced."""
    z = {}
    for p in target:
        s = np.asarray(scores[p], dtype=float)
        sd = s.std()
        z[p] = (s - s.mean()) / (sd if sd > 0 else 1.0)
    a = [z[p][i] for p, v in target.items() for i in v]
    b = [z[p][i] for c in controls for p, v in c.items() for i in v]
    a_arr, b_arr = np.asarray(a), np.asarray(b)
    if a_arr.size and b_arr.size and np.ptp(a_arr) == 0 and np.ptp(b_arr) == 0 and a_arr[0] != b_arr[0]:
        return None
    return standardized_mean_difference(a, b)


# -------------------------------------------------------------------------------------- inference
def randomisation_rank(observed: float, null: Sequence[float]) -> dict[str, Any]:
    """Rank of `observed` among the null draws, largest first, ties counted against it:
    rank = 1 + #{null >= observed}; one-sided p = rank / (n + 1) (side: observed larger)."""
    null = np.asarray(null, dtype=float)
    rank = 1 + int((null >= observed).sum())
    return {"rank": rank, "n": int(null.size), "p": rank / (null.size + 1), "side": "greater"}


def sign_flip_test(values: Sequence[float], exact_max: int = 20, n_mc: int = 2 ** 20, seed: int = 0
                   ) -> dict[str, Any]:
    """One-sided sign-flip test of mean(values) > 0 over n exchangeable units (classes): p = share of
    the 2^n sign vectors whose flipped mean is >= the observed one (ties count against). Exact for
    n <= exact_max, else Monte Carlo with `n_mc` draws (p = (1 + hits) / (1 + n_mc)). Returns
    {"p", "p_opposite" (same for mean < 0), "n", "min_p" (2^-n), "exact", "side"}. Sign vectors
    are enumerated or drawn in blocks of 2^16 (memory O(2^16 n))."""
    x = np.asarray(values, dtype=float)
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError(f"sign_flip_test needs finite values, got {x.tolist()}")
    n, tol = x.size, 1e-12 * max(1.0, float(np.abs(x).sum()))
    obs, exact = float(x.sum()), n <= exact_max
    total = 2 ** n if exact else n_mc
    rng, block, ge, le = np.random.default_rng(seed), 2 ** 16, 0, 0
    for start in range(0, total, block):
        if exact:
            codes = np.arange(start, min(total, start + block))[:, None]
            signs = 1 - 2 * ((codes >> np.arange(n)) & 1)
        else:
            signs = rng.choice([-1.0, 1.0], size=(min(block, total - start), n))
        sums = signs @ x
        ge += int((sums >= obs - tol).sum())
        le += int((sums <= obs + tol).sum())
    p, q = (ge / total, le / total) if exact else ((1 + ge) / (1 + total), (1 + le) / (1 + total))
    return {"p": p, "p_opposite": q, "n": n, "min_p": 2.0 ** -n, "exact": exact, "side": "greater"}


# ---------------------------------------------------------------------------------------- ablation
def _outcomes(logits: Tensor, labels: Tensor) -> Tensor:
    """[B, 3]: top-1 correctness, true-class logit and margin (true minus best other) per image."""
    true = logits.gather(1, labels[:, None])[:, 0]
    other = logits.scatter(1, labels[:, None], float("-inf")).max(1).values
    return torch.stack([(logits.argmax(1) == labels).to(logits.dtype), true, true - other], 1)


def set_ablation_outcomes(model, images: Tensor, labels: Tensor, head: Tensor, sets: Sequence[Mapping[str, Sequence[int]]],
                          fill: Mapping[str, Tensor], n_nodes: Mapping[str, int], batch: int = 256) -> np.ndarray:
    """[len(sets), 3] mean accuracy, true-class logit and logit margin over `images` when the nodes
    of each set are ablated together (a set per row; an empty set gives the clean outcomes).
    `fill[p]`: node values of one example [..., C] (mean ablation, `ablation_values`) or of one donor
    per image [B, ..., C] (resample ablation, `resample_values`). Sets are batched: one forward holds
    about `batch` images. Cost: len(sets) * len(images) image forwards."""
    labels = torch.as_tensor(labels).long()
    keep = {}
    for p, n in n_nodes.items():
        keep[p] = torch.ones(len(sets), n, dtype=torch.bool)
        for r, s in enumerate(sets):
            keep[p][r, list(s.get(p, []))] = False
    emb = ablated_embeddings(model, images, keep, fill, batch)  # [sets, images, D]
    res = _outcomes(cosine_logits(emb.flatten(0, 1), head).cpu().double(), labels.repeat(len(sets)))
    return res.view(len(sets), len(images), 3).mean(1).numpy()


def _set_effect(drops: np.ndarray) -> dict[str, Any]:
    """Effect of a set from the drops [1 + R, 3] of the set (row 0) and its R random matched sets:
    per outcome drop, control (mean random drop), effect (difference) and randomisation rank."""
    obs, null = drops[0], drops[1:]
    return {o: {"drop": float(obs[i]), "control": float(null[:, i].mean()), "effect": float(obs[i] - null[:, i].mean()),
                "randomisation": randomisation_rank(obs[i], null[:, i])} for i, o in enumerate(OUTCOMES)}


# -------------------------------------------------------------------------------------- per class
def class_causal_effects(model, circuits: Circuits, test_domain: str, k: Any, images: Tensor, labels: Tensor,
                         head: Tensor, *, match_scores: Mapping[str, Tensor], balance_scores: Mapping[str, Tensor],
                         fills: Mapping[str, Mapping[str, Tensor]], placebos: Sequence[Any],
                         points: Sequence[str], opts: CausalOptions = CausalOptions(),
                         rng: np.random.Generator | None = None) -> dict[str, Any]:
    """The causal effects of class k (module doc) under every ablation of `fills` ({"mean": fill,
    "resample": fill}): {"n_images", "shared": {"size", "unmatched", "balance_smd" (None: infinite), ablation:
    {outcome: {...}}}, "strata": [per stratum: {"size", "unmatched", ablation: effects}], "placebo":
    [per placebo class: same as shared, or None when empty], "balanced", and per ablation and
    outcome "primary" = shared effect - mean placebo effect (None without a placebo node)}.
    Raises when the shared set is empty (the caller skips and counts the class)."""
    rng = np.random.default_rng(opts.seed) if rng is None else rng
    n_nodes = {p: len(match_scores[p]) for p in points}
    s = shared_set(circuits, test_domain, k, points)
    if not _size(s):
        raise ValueError(f"class {k!r}: no node shared with another domain")

    def _drops(target: NodeSet, controls: Sequence[NodeSet], fill: Mapping[str, Tensor]) -> np.ndarray:
        out = set_ablation_outcomes(model, images, labels, head, [{}, target, *controls], fill, n_nodes, opts.batch)
        return out[0] - out[1:]  # drop = clean - ablated

    def measure(target: NodeSet, n_sets: int, by_stratum: bool) -> dict[str, Any]:
        m = matched_random_sets(target, match_scores, opts.n_strata, n_sets, rng)
        res: dict[str, Any] = {"size": _size(target), "unmatched": m["unmatched"],
                               "balance_smd": set_balance(target, m["sets"], balance_scores)}
        for how, fill in fills.items():
            drops = _drops(target, m["sets"], fill)
            res[how] = _set_effect(drops)
        if by_stratum:
            res["strata"] = []
            for z in range(opts.n_strata):
                sub = in_stratum(target, m["strata"], z)
                row: dict[str, Any] = {"stratum": z, "size": _size(sub), "unmatched": m["unmatched"][z]}
                if row["size"]:
                    ctrl = [in_stratum(c, m["strata"], z) for c in m["sets"][:opts.n_random_small]]
                    for how, fill in fills.items():
                        row[how] = _set_effect(_drops(sub, ctrl, fill))
                res["strata"].append(row)
        return res

    shared = measure(s, opts.n_random, by_stratum=True)
    strata = shared.pop("strata")
    placebo = []
    for pk in placebos:
        ps = placebo_set(circuits, test_domain, k, pk, points)
        placebo.append(measure(ps, opts.n_random_small, by_stratum=False) | {"class": pk} if _size(ps) else None)
    used = [p for p in placebo if p is not None]
    smds = [shared["balance_smd"]] + [p["balance_smd"] for p in used]
    out: dict[str, Any] = {"n_images": len(images), "shared": shared, "strata": strata, "placebo": placebo,
                           "n_placebo_empty": len(placebo) - len(used),
                           "balanced": bool(all(v is not None and abs(v) <= opts.balance_limit for v in smds)),
                           "max_abs_smd": None if None in smds else float(max(abs(v) for v in smds)),
                           "primary": {}}
    for how in fills:
        out["primary"][how] = {o: (shared[how][o]["effect"] - float(np.mean([p[how][o]["effect"] for p in used]))
                                   if used else None) for o in OUTCOMES}
    return out


def balance_summary(models: Sequence[Mapping[str, Any]], ablation: str = "mean", outcome: str = "logit",
                    limit: float = BALANCE_LIMIT) -> dict[str, Any]:
    """The balance check over every (model, class) pair of several models' `causal_test` results,
    balanced or not (descriptive: `causal_finding` uses only the balanced pairs). Returns the pair
    counts, quartiles of the shared set's signed SMD (positive: shared nodes have higher independent
    IG than their matched controls) with the share above 0 and within `limit`, the median |SMD| of the
    placebo sets, infinite SMDs counted, and the shared - controls effect per IG stratum over all
    pairs (top stratum last; exploratory, since unbalanced pairs are included), and the randomisation
    null over all pairs: the median one-sided rank p of the shared set's drop among its matched random
    sets and the share of pairs with rank p <= 0.05 (side: the shared set's drop larger)."""
    shared, placebo, rank_p, n_pairs, n_balanced, infinite = [], [], [], 0, 0, 0
    n_null: set[int] = set()
    strata: dict[int, list[float]] = {}
    for res in models:
        for c in res["classes"].values():
            n_pairs += 1
            n_balanced += bool(c["balanced"])
            if "balance_smd" not in c["shared"]:  # a result written before the balance check: nothing to add
                continue
            smd = c["shared"]["balance_smd"]
            if ablation in c["shared"]:
                rank = c["shared"][ablation][outcome]["randomisation"]
                rank_p.append(rank["p"])
                n_null.add(rank["n"])
            infinite += smd is None
            shared += [] if smd is None else [smd]
            for pl in c["placebo"]:
                if pl is not None and "balance_smd" in pl:
                    infinite += pl["balance_smd"] is None
                    placebo += [] if pl["balance_smd"] is None else [abs(pl["balance_smd"])]
            for row in c["strata"]:
                if ablation in row:
                    strata.setdefault(row["stratum"], []).append(row[ablation][outcome]["effect"])
    sh = np.asarray(shared, dtype=float)
    quart = (lambda a: [float(q) for q in np.percentile(a, [25, 50, 75])] if a.size else None)
    return {"ablation": ablation, "outcome": outcome, "limit": limit, "n_pairs": n_pairs, "n_balanced": n_balanced,
            "infinite": infinite, "shared_smd_quartiles": quart(sh),
            "shared_positive": float((sh > 0).mean()) if sh.size else None,
            "shared_within_limit": float((np.abs(sh) <= limit).mean()) if sh.size else None,
            "placebo_abs_smd_median": float(np.median(placebo)) if placebo else None,
            "strata_all_pairs": {z: {"effect": float(np.mean(v)), "n": len(v)} for z, v in sorted(strata.items())},
            "randomisation_all_pairs": {"n": len(rank_p), "median_p": float(np.median(rank_p)) if rank_p else None,
                                        "share_p_le_0.05": float(np.mean(np.asarray(rank_p) <= 0.05)) if rank_p else None,
                                        "n_null": sorted(n_null)}}


def causal_test(model, circuits: Circuits, test_domain: str, held_out: Mapping[Any, tuple[Tensor, Tensor]],
                head: Tensor, *, match_scores: Mapping[Any, Mapping[str, Tensor]],
                balance_scores: Mapping[Any, Mapping[str, Tensor]], fills: Mapping[Any, Mapping[str, Mapping[str, Tensor]]],
                points: Sequence[str] | None = None, opts: CausalOptions = CausalOptions()) -> dict[str, Any]:
    """One model's causal test on the test domain's classes (module doc).

    `circuits[d][k]`: circuits discovered on drawings that are not ablated (check them with
    `clipmech.data.samples.check_disjoint_drawings`); `held_out[k]` = (images, labels) ablated;
    `match_scores[k]` / `balance_scores[k]`: {point: IG node scores [C]} of class k from two further
    sets of drawings (matching, balance); `fills[k]`: {ablation: fill} for `set_ablation_outcomes`
    (resample donors are per class). Placebo classes come from `opts.n_derangements` fixed
    derangements of the classes of circuits[test_domain] that have held-out images.
    Returns {"classes": {k: `class_causal_effects`}, "skipped": {k: reason}, "derangements",
    "options"}. Cost: see `CausalOptions`."""
    mine = circuits.get(test_domain) or {}
    if not mine:
        raise KeyError(f"no circuits for test domain {test_domain!r}; have {sorted(circuits)}")
    if len([d for d in circuits if d != test_domain]) < 1:
        raise ValueError("the causal test needs circuits of at least one domain besides the test domain")
    first = next(iter(mine.values()))
    points = [p for p in first.points if not p.endswith("hook_input")] if points is None else list(points)
    skipped: dict[str, str] = {}
    classes = []
    for k, (images, _) in held_out.items():
        if k not in mine:
            skipped[str(k)] = "no discovery circuit in the test domain"
        elif len(images) == 0:
            skipped[str(k)] = "no held-out drawing"
        else:
            classes.append(k)
    if len(classes) < 2:
        raise ValueError(f"the causal test needs at least 2 classes with circuits and held-out drawings (placebos "
                         f"come from other classes), got {len(classes)}; skipped: {skipped}")
    perms = derangements(len(classes), opts.n_derangements, opts.seed)
    rng = np.random.default_rng(opts.seed)
    out: dict[str, Any] = {"classes": {}, "skipped": skipped, "options": asdict(opts),
                           "derangements": [[str(classes[j]) for j in p] for p in perms]}
    for i, k in enumerate(classes):
        images, labels = held_out[k]
        try:
            out["classes"][str(k)] = class_causal_effects(
                model, circuits, test_domain, k, images, labels, head, match_scores=match_scores[k],
                balance_scores=balance_scores[k], fills=fills[k], placebos=[classes[p[i]] for p in perms],
                points=points, opts=opts, rng=rng)
        except ValueError as err:
            if "no node shared" not in str(err):
                raise
            skipped[str(k)] = "no node shared with another domain"
    return out


# -------------------------------------------------------------------------------------- over models
def causal_test_from_drawings(model, circuits: Circuits, test_domain: str,
                              held_out: Mapping[Any, tuple[Tensor, Tensor]], matching: Mapping[Any, Tensor],
                              donors: Mapping[Any, Tensor], reference: Tensor, head: Tensor, *, steps: int = 10,
                              points: Sequence[str] | None = None,
                              opts: CausalOptions = CausalOptions()) -> dict[str, Any]:
    """`causal_test` from the drawings of each role (the study and `clipmech analyze circuits` both
    call it): `held_out[k]` = (images, labels) ablated and used for balance; `matching[k]`: class k's
    drawings of the other domains (matching IG; neither discovery nor ablated); `donors[k]`: one
    test-domain drawing of another class per held-out image (resample ablation); `reference`:
    test-domain images of every class (mean ablation). The node IG (`steps` steps) of matching and
    balance drawings of every class runs in one grouped IG (`discover_circuits`, edges=False).
    Cost: that IG plus `causal_test`'s set ablations."""
    points = (list(points) if points is not None else
              [p for p in next(iter(circuits[test_domain].values())).points if not p.endswith("hook_input")])
    classes = [k for k in held_out if k in matching and len(matching[k]) and len(held_out[k][0])]
    batches = []
    for k in classes:
        label = int(held_out[k][1][0])
        batches += [(matching[k], torch.full((len(matching[k]),), label, dtype=torch.long)),
                    (held_out[k][0], held_out[k][1].long())]
    found = discover_circuits(model, batches, head, steps=steps, edges=False)
    match = {k: found[2 * i].node_scores for i, k in enumerate(classes)}
    balance = {k: found[2 * i + 1].node_scores for i, k in enumerate(classes)}
    mean = ablation_values(model, reference, points, "mean") if "mean" in opts.ablations else None
    fills = {k: ({"mean": mean} if mean is not None else {}) |
             ({"resample": resample_values(model, donors[k], points)} if "resample" in opts.ablations else {})
             for k in classes}
    return causal_test(model, circuits, test_domain, {k: held_out[k] for k in classes}, head, match_scores=match,
                       balance_scores=balance, fills=fills, points=points, opts=opts)


def causal_finding(models: Sequence[Mapping[str, Any]], ablation: str = "mean", outcome: str = "logit",
                   alpha: float = 0.05, min_classes: int = MIN_CLASSES) -> dict[str, Any]:
    """The causal finding from several models' `causal_test` results: per class, the primary contrast
    averaged over the models where the class is balanced and has a placebo (excluded (model, class)
    pairs counted with reasons), then `sign_flip_test` over classes. Verdict (side: greater):
    "reproduced" when p < alpha/2, "contradicted" when the opposite p < alpha/2, else
    "inconclusive"; "not measured" without a class; fewer than `min_classes` classes is reported in
    "warning" (the smallest attainable p is 2^-n). Shared - controls, the placebo effect, the
    randomisation p and the per-stratum effects (with unmatched counts) are averaged beside."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
    per_class: dict[str, dict[str, list[float]]] = {}
    excluded: dict[str, int] = {"unbalanced": 0, "no placebo node": 0, "ablation not run": 0}
    strata: dict[int, dict[str, Any]] = {}
    for res in models:
        for k, c in res["classes"].items():
            if ablation not in c["primary"]:
                excluded["ablation not run"] += 1
                continue
            if c["primary"][ablation][outcome] is None:
                excluded["no placebo node"] += 1
                continue
            if not c["balanced"]:
                excluded["unbalanced"] += 1
                continue
            sh = c["shared"][ablation][outcome]
            row = per_class.setdefault(k, {"primary": [], "shared_minus_controls": [], "randomisation_p": []})
            row["primary"].append(c["primary"][ablation][outcome])
            row["shared_minus_controls"].append(sh["effect"])
            row["randomisation_p"].append(sh["randomisation"]["p"])
            for s in c["strata"]:
                acc = strata.setdefault(s["stratum"], {"effects": [], "size": 0, "unmatched": 0})
                acc["size"] += s["size"]
                acc["unmatched"] += s["unmatched"]
                if ablation in s:
                    acc["effects"].append(s[ablation][outcome]["effect"])
    means = {k: {f: float(np.mean(v)) for f, v in row.items()} | {"n_models": len(row["primary"])}
             for k, row in per_class.items()}
    out: dict[str, Any] = {"ablation": ablation, "outcome": outcome, "side": SIDE, "alpha": alpha,
                           "per_class": means, "excluded": excluded, "n_classes": len(means),
                           "strata": {z: {"effect": float(np.mean(a["effects"])) if a["effects"] else None,
                                          "n": len(a["effects"]), "size": a["size"], "unmatched": a["unmatched"]}
                                      for z, a in sorted(strata.items())}}
    if not means:
        return out | {"verdict": "not measured", "p": None}
    primary = [m["primary"] for m in means.values()]
    test = sign_flip_test(primary)
    verdict = "reproduced" if test["p"] < alpha / 2 else "contradicted" if test["p_opposite"] < alpha / 2 else "inconclusive"
    out |= {"estimate": float(np.mean(primary)), "p": test["p"], "p_opposite": test["p_opposite"],
            "min_p": test["min_p"], "exact": test["exact"], "verdict": verdict,
            "shared_minus_controls": float(np.mean([m["shared_minus_controls"] for m in means.values()])),
            "randomisation_p": float(np.mean([m["randomisation_p"] for m in means.values()]))}
    if len(means) < min_classes:
        out["warning"] = (f"only {len(means)} classes: the smallest attainable p is 2^-{len(means)} = "
                          f"{2.0 ** -len(means):.4f}; use at least {min_classes}")
    return out
