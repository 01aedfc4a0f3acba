"""`clipmech demo`: prints cached activation shapes for a tiny model or a checkpoint."""
import torch

from clipmech import HookedCLIP
from clipmech.cli import main


def test_demo_prints_analysis_point_shapes(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "10 analysis points" in out
    assert "visual.layer4.0.hook_out  (2, 512, 2, 2)" in out and "hook_text_embed" in out


def test_demo_from_checkpoint_and_bad_name(tmp_path, capsys):
    path = tmp_path / "epoch_0.pt"
    model = HookedCLIP.from_config("tiny-vit")
    torch.save({"epoch": 0, "name": "tiny-vit", "state_dict": model.state_dict(), "model_cfg": model.cfg}, path)
    assert main(["demo", "--checkpoint", str(path)]) == 0
    assert "visual.blocks.1.hook_resid_post  (2, 65, 64)" in capsys.readouterr().out
    assert main(["demo", "--model", "tiny-vti"]) == 1
    assert "tiny-vit" in capsys.readouterr().err
