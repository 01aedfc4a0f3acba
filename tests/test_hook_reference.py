"""docs/hooks.md is what the models give today: regenerate it and compare (RN50, ViT-B-32, the tiny
presets and a tiny Hugging Face CLIPModel, all with random weights)."""
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from clipmech.models import hook_reference as R  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "hooks.md"


def test_hooks_md_is_in_sync_with_the_models():
    text = R.render(R.REFERENCE_MODELS)
    assert DOC.read_text(encoding="utf-8") == text, \
        "docs/hooks.md is out of date: python -m clipmech.models.hook_reference docs/hooks.md"
    # every hook point of every model is listed (ranges count once per block)
    assert "| `visual.layer4.{1..2}.hook_out` | [B, 2048, 7, 7] |" in text
    assert "| `visual.blocks.{0..11}.attn.hook_z` | [B, 50, 12, 64] |" in text


def test_unknown_points_need_an_entry():
    assert R.meaning("visual.layer3.5.hook_branch").startswith("bottleneck: residual branch")
    assert R.meaning("visual.hook_act2") == "ResNet stem: conv 2 -> batch norm -> ReLU"
    with pytest.raises(KeyError, match="add one"):
        R.meaning("visual.blocks.3.hook_new")
