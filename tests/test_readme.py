"""The README's examples run as written, and its two commands are the ones CI uses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
EXAMPLES = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def _needs(code: str) -> str | None:
    """The library an example needs beyond NumPy, if any."""
    for lib in ("cupy", "torch"):
        if re.search(rf"^import {lib}\b", code, flags=re.MULTILINE):
            return lib
    return None


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_readme_example_runs(code):
    lib = _needs(code)
    if lib is not None:
        mod = pytest.importorskip(lib)
        if lib == "cupy" and not mod.is_available():
            pytest.skip("CuPy is installed but no CUDA GPU is available")
    exec(compile(code, "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```\n(.*?)\n```", README)
    assert "pip install . && python -m rnn_xp" in commands
    test_command = 'pip install "torch==2.13.0" ".[cpu]" && python -m pytest'
    assert test_command in commands
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()
