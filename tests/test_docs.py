"""The examples in the docs run: every fenced ```python block of README.md and docs/*.md.

Each file's blocks run in order in one fresh namespace, in a temporary working directory
(files the examples write land there), with one torch thread (fast and steady on a busy
machine). ``TRITON_INTERPRET=1`` is set on CPU machines (conftest.py), and the launchers are
told to take their torch paths (``AMIPS_BACKEND=torch``): the interpreter runs a kernel
thousands of times slower than torch, and the kernels are compared with their torch
references in their own tests; here the examples test the API a reader copies. ```bash and
```text blocks are not run. Files are discovered when the tests are collected: a new page
is tested without touching this file.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[^\s`]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, source) of every ```python fence (```py too), in order."""
    blocks = []
    for m in FENCE.finditer(text):
        if m.group("lang").lower() in ("python", "py"):
            line = text.count("\n", 0, m.start("body")) + 1
            body = "\n".join(ln[len(m.group("indent")):] for ln in m.group("body").splitlines())
            blocks.append((line, body))
    return blocks


def test_fence_parser_finds_python_and_skips_others():
    text = "x\n```python\na = 1\n```\n```bash\nexit 1\n```\n```text\nno\n```\n```py\nb = a + 1\n```\n"
    assert [src for _, src in python_blocks(text)] == ["a = 1", "b = a + 1"]
    assert [line for line, _ in python_blocks(text)] == [3, 12]


def test_doc_files_are_found():
    assert ROOT / "README.md" in DOC_FILES
    assert any(p.parent.name == "docs" for p in DOC_FILES)


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_run(path: Path, tmp_path, monkeypatch, one_torch_thread):
    blocks = python_blocks(path.read_text(encoding="utf-8"))
    if not blocks:
        pytest.skip(f"{path.name} has no python examples")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AMIPS_BACKEND", "torch")
    namespace: dict = {"__name__": "__docs__"}
    for line, source in blocks:
        # padded so that a traceback's line numbers are the file's own
        code = compile("\n" * (line - 1) + source, str(path), "exec")
        try:
            exec(code, namespace)
        except Exception as exc:
            raise AssertionError(
                f"{path.relative_to(ROOT)}, the python block at line {line} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
