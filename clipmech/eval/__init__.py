"""Evaluation: zero-shot DG/CG accuracy per domain x {C1, C2} with cached image features."""
from clipmech.eval.templates import DOMAINNET_TEMPLATES, EMOJI_TEMPLATES, get_templates
from clipmech.eval.zeroshot import classification_metrics, evaluate_run, zero_shot

__all__ = ["DOMAINNET_TEMPLATES", "EMOJI_TEMPLATES", "classification_metrics", "evaluate_run", "get_templates",
           "zero_shot"]
