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
