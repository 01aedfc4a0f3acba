"""Every Python snippet of docs/api.md runs as written, in order, in one namespace."""
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_api_doc_snippets_run():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 4
    namespace: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/api.md snippet {i + 1}", "exec"), namespace)  # noqa: S102
    # what the snippets claim
    assert namespace["one"]["visual.layer4.0.hook_out"].shape == namespace["block"].shape[1:]
    assert namespace["ig"].shape == namespace["scores"].shape
    assert namespace["nodes_only"].edges == [] and namespace["circuit"].edges
    assert set(namespace["result"]) >= {"faithfulness", "completeness"}
