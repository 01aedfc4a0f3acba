import os

import pytest
import torch

# CI has 2 cores; keep torch from oversubscribing them when pytest-xdist is not used.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_open_clip_name(tmp_path_factory):
    """tiny-rn (32 px) registered with open_clip under its own name, so open_clip's create_model (the
    code path of open_clip model names like RN50) builds it offline."""
    import json

    import open_clip

    from clipmech.models.configs import resolve_config
    folder = tmp_path_factory.mktemp("oc_configs")
    _, cfg = resolve_config("tiny-rn")
    cfg["vision_cfg"]["image_size"] = 32
    (folder / "clipmech-test-tiny-rn.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return "clipmech-test-tiny-rn"


@pytest.fixture(scope="session")
def random_discovery():
    """f(study, model) -> {domain: {class index: Circuit}}: discovery circuits on the study's training
    drawings (circuit_sets.circuit_cells' repeat cells, meta["rows"]) with random node scores and
    node sets (seeded), for tests about the drawings' roles rather than the circuits."""
    def make(study, model):
        from clipmech.analysis.circuit import Circuit
        from clipmech.study.circuit_sets import circuit_cells

        pts = [p for p in model.analysis_points() if not p.endswith("hook_input")]
        with torch.no_grad():
            sizes = {p: a.shape[1] for p, a in model.run_with_cache(study.images("test")[:1])[1].items() if p in pts}
        g = torch.Generator().manual_seed(3)
        _, repeat = circuit_cells(study)
        return {d: {k: Circuit(pts, {p: torch.rand(n, generator=g) for p, n in sizes.items()},
                               {p: torch.randperm(n, generator=g)[:max(1, n // 5)].tolist() for p, n in sizes.items()},
                               [], {"rows": rows.tolist()}) for k, rows in per.items() if len(rows)}
                for d, per in repeat.items()}
    return make
