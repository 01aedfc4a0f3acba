"""Atomic writes (content, file mode, no partial files, old file kept on failure), hashing, TensorCache."""
import os

import pytest
import torch

from clipmech.utils import (TensorCache, atomic_torch_save, atomic_write_json, atomic_write_text, hash_obj,
                            unknown_name_error)


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


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_tensor_cache_warns_and_recomputes_a_corrupt_entry(tmp_path, damage):
    cache = TensorCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(1000.0)

    assert torch.equal(cache.get_or_compute({"k": 1}, compute), torch.arange(1000.0))
    assert torch.equal(cache.get_or_compute({"k": 1}, compute), torch.arange(1000.0))
    assert len(calls) == 1  # the second call was served from disk
    path = cache.path({"k": 1})
    blob = path.read_bytes()
    path.write_bytes({"truncate": blob[:len(blob) // 2], "garbage": b"not a torch file", "empty": b""}[damage])
    with pytest.warns(RuntimeWarning, match=f"cache entry {path}.*unreadable.*recomputing"):
        value = cache.get_or_compute({"k": 1}, compute)
    assert torch.equal(value, torch.arange(1000.0)) and len(calls) == 2
    assert torch.equal(torch.load(path, weights_only=False), torch.arange(1000.0))  # rewritten whole
