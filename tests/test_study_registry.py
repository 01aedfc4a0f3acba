"""Registry: finished stages are reused, changed keys recompute, corrupt entries do not count."""
import pytest

from clipmech.study.registry import Registry


def test_run_reuses_and_rekeys(tmp_path):
    reg = Registry(tmp_path)
    calls = []

    def work():
        calls.append(1)
        return {"acc": 0.5, "curve": [0.1, 0.2]}

    res, reused = reg.run("train", {"setup": "lod", "seed": 0}, work)
    assert res == {"acc": 0.5, "curve": [0.1, 0.2]} and not reused
    res2, reused2 = reg.run("train", {"seed": 0, "setup": "lod"}, work)  # key order does not matter
    assert res2 == res and reused2 and len(calls) == 1
    _, reused3 = reg.run("train", {"setup": "lod", "seed": 1}, work)
    assert not reused3 and len(calls) == 2
    assert len(reg.finished("train")) == 2 and reg.finished("eval") == []


def test_corrupt_entry_recomputes_and_bad_input(tmp_path):
    reg = Registry(tmp_path)
    reg.put("cka", "k", [1, 2])
    reg.path("cka", "k").write_text("{not json")
    assert reg.get("cka", "k") is None
    assert reg.run("cka", "k", lambda: [3])[0] == [3]
    with pytest.raises(ValueError, match="returned None"):
        reg.run("cka", "other", lambda: None)
    with pytest.raises(ValueError, match="stage name"):
        reg.path("../x", "k")
