"""The architecture is checked, not only described: import-linter's contracts (.importlinter) hold for the tree,
imports made inside functions included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_import_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    assert lint.exists(), f"import-linter is not installed in this environment ({lint}): run `make setup`"
    done = subprocess.run([str(lint), "--config", str(REPO / ".importlinter"), "--no-cache"], cwd=REPO / "src",
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_a_broken_layer_is_caught(tmp_path: Path) -> None:
    """The contracts bite: a copy of the package where core imports stage 1 inside a function fails the check."""
    import shutil

    copy = tmp_path / "src"
    shutil.copytree(REPO / "src" / "image_embeddings", copy / "image_embeddings",
                    ignore=shutil.ignore_patterns("__pycache__"))
    with (copy / "image_embeddings" / "core" / "config.py").open("a") as handle:
        handle.write("\n\ndef _probe() -> None:\n"
                     "    from image_embeddings.ingest.images import downscale  # noqa: F401\n")
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--config", str(REPO / ".importlinter"), "--no-cache"], cwd=copy,
                          capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(copy), "PATH": ""})
    assert done.returncode != 0
    assert "image_embeddings.core.config -> image_embeddings.ingest.images" in done.stdout


def test_no_function_in_src_is_longer_than_60_lines() -> None:
    """Each stage reads as small phases: a function over 60 lines (docstring included) is a phase to split."""
    import ast

    long = []
    for path in sorted((REPO / "src" / "image_embeddings").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > 60:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 60 lines:\n" + "\n".join(long)
