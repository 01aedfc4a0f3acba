"""clipmech: mechanistic interpretability of CLIP domain and compositional generalization."""
__version__ = "0.1.0"
