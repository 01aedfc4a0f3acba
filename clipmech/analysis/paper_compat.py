"""The paper code's quirks, reproduced on request (`paper_compat`: config `[analysis] paper_compat`,
CLI `--paper-compat`); clipmech's defaults are the correct rules. The parity table in
experiments/README.md lists every rule with the paper's behaviour, clipmech's default and the switch.

Where each quirk lives (one small option each, so the default code path is unchanged):
- allow-p quotas: float ceil(p * rho * n)       -> `clipmech.data.mixtures.allow_p_quota(paper_compat=)`
- CKA "all" / "C1" rows: painting's class list  -> `domain_cka(class_list_domain=CKA_CLASS_LIST_DOMAIN)`
- WL score "h2" runs 3 iterations               -> `circuit_similarity.wl_scores(paper_compat=)`
- edge routine's wrap-around pair last -> first -> `wraparound_edges` below
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from clipmech.analysis.circuits import Circuit

CKA_CLASS_LIST_DOMAIN = "painting"  # the paper CKA script's leftover loop variable (docs/methods.md#paper-code-quirks)


def cka_class_list_domain(domains: Sequence[str], paper_compat: bool) -> str | None:
    """The `class_list_domain` for `domain_cka`: painting under paper_compat when the dataset has it."""
    return CKA_CLASS_LIST_DOMAIN if paper_compat and CKA_CLASS_LIST_DOMAIN in domains else None


def wraparound_edges(circuit: Circuit, top_k: int = 3) -> Circuit:
    """`circuit` plus the edges the paper's edge routine adds with verbose off (docs/methods.md#paper-code-quirks): its
    layer loop starts at index 0 and pairs the LAST point (attnpool) as upstream with the FIRST
    (input) as downstream. The input does not depend on attnpool, so every such edge score is 0 and
    the top-k by signed score is a tie: resolved, as clipmech's stable sort does, to the first
    `top_k` upstream nodes in their best-first order ([INFER]: the paper's tie order is undocumented).
    Each edge gets weight 0.0; nodes and node scores are unchanged. Meta records `wraparound_edges`."""
    first, last = circuit.points[0], circuit.points[-1]
    if first == last:
        raise ValueError("a wrap-around edge needs a circuit with at least two points")
    extra = [(last, i, first, j, 0.0) for j in circuit.nodes[first] for i in circuit.nodes[last][:top_k]]
    return replace(circuit, edges=[*circuit.edges, *extra], meta={**circuit.meta, "wraparound_edges": len(extra)})
