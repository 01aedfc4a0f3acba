"""Former home of the attribution engine, the `Circuit` type and circuit ablation, kept for one
release so that existing imports work; it now only re-exports. New code imports from
`clipmech.analysis.attribution` (node and edge IG, its cost model), `clipmech.analysis.circuit`
(the `Circuit` type, `discover_circuit`, `shared_nodes`) and `clipmech.analysis.ablation`
(ablation values, faithfulness and its curves).
"""
from __future__ import annotations

from clipmech.analysis.ablation import (FAITHFULNESS_EPS, FAITHFULNESS_SIZES, ablated_embedding,  # noqa: F401
                                        ablation_values, cross_domain_faithfulness, curve_areas, faithfulness,
                                        faithfulness_curve, resample_values, top_fraction_masks)
from clipmech.analysis.attribution import (EDGE_MEMORY, EDGE_STRATEGIES, EdgePlan, NodeSpace,  # noqa: F401
                                           component_points, ig_edge_plan, ig_edge_scores, ig_node_scores,
                                           plan_edges, reference_ig_edge_scores)
from clipmech.analysis.circuit import Circuit, discover_circuit, node_name, shared_nodes  # noqa: F401
