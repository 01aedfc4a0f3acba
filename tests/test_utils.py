"""Atomic writes (content, file mode, no partial files, old file kept on failure) and hashing."""
import os

import pytest
import torch

from clipmech.utils import atomic_torch_save, atomic_write_json, atomic_write_text, hash_obj, unknown_name_error


def test_atomic_write_gives_the_mode_open_would_and_leaves_no_temp(tmp_path):
    path = atomic_write_text("hello\n", tmp_path / "sub" / "a.txt")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert path.read_text() == "hello\n"
    assert os.stat(path).st_mode & 0o777 == os.stat(plain).st_mode & 0o777
    assert [p.name for p in path.parent.iterdir()] == ["a.txt"]


def test_failed_write_keeps_the_old_file(tmp_path):
    target = atomic_write_json({"v": 1}, tmp_path / "r.json")
    with pytest.raises(TypeError):
        atomic_write_json({"v": object()}, target)
    assert target.read_text().replace(" ", "").replace("\n", "") == '{"v":1}'
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    atomic_torch_save({"w": torch.ones(2)}, tmp_path / "c.pt")
    assert torch.equal(torch.load(tmp_path / "c.pt")["w"], torch.ones(2))


def test_hash_is_order_independent_for_dicts_and_names_close_matches():
    assert hash_obj({"a": 1, "b": [1, 2]}) == hash_obj({"b": [1, 2], "a": 1})
    assert hash_obj({"a": 1}) != hash_obj({"a": 2})
    err = unknown_name_error("domain", "quickdrew", ["quickdraw", "sketch", "real"])
    assert "quickdrew" in str(err) and "'quickdraw'" in str(err)
