"""Progress display: stage lines, reuse marking, remaining-time estimate from observed speed."""
import io

import pytest

from clipmech.study.progress import Progress


def test_stage_lines_and_estimate(monkeypatch):
    clock = iter([0.0, 0.0, 10.0, 10.0, 10.0, 10.0, 10.0])  # start, a: begin/end/elapsed, b: ...
    monkeypatch.setattr("clipmech.study.progress.time.perf_counter", lambda: next(clock))
    out = io.StringIO()
    p = Progress({"a": 5.0, "b": 5.0, "c": 20.0}, stream=out)
    with p.stage("a"):
        pass
    # "a" took 10 s for a 5 s budget: the 25 s left are scaled by 2.
    assert p.remaining() == pytest.approx(50.0)
    with p.stage("b") as h:
        h.reused = True
    assert p.remaining() == pytest.approx(40.0)  # reused stages do not change the speed ratio
    text = out.getvalue()
    assert "[ 1/3] a ..." in text and "a: done (10.0s)" in text and "b: done (reused)" in text
    assert "~0:50 left" in text
    with pytest.raises(KeyError, match="not planned"):
        with p.stage("zzz"):
            pass
