"""The README's Python snippets run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_quick_start_runs_as_written(chdir, capsys):
    quick_start = python_blocks()[0]
    exec(compile(quick_start, "README.md (quick start)", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "Training started at step 0" in out and "Step 19: loss=" in out and "Training completed in" in out


def test_the_rank_zero_snippet_runs_on_its_own():
    # Each snippet imports what it uses: this one once lacked `Callback`.
    namespace: dict = {"__name__": "readme"}
    exec(compile(python_blocks()[1], "README.md (torchrun)", "exec"), namespace)
    assert namespace["RankZeroCallback"].__mro__[1].__name__ == "Callback"
