"""The README's commands run as written: every code block marked `<!-- runnable -->` is run
with bash from the repository root, the project's venv first on PATH (as after
`source .venv/bin/activate`)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- runnable -->\n```(bash|python)\n(.*?)```", re.S)


def runnable_blocks() -> list[tuple[str, str]]:
    """(language, code) of every runnable block, in the README's order."""
    return BLOCK.findall((REPO / "README.md").read_text())


def test_the_readme_marks_its_main_commands_runnable():
    blocks = runnable_blocks()
    assert len(blocks) >= 3 and any("make demo" in code for _, code in blocks)
    assert any(language == "python" for language, _ in blocks)


@pytest.mark.integration
@pytest.mark.parametrize("index", range(len(runnable_blocks())))
def test_runnable_readme_block(index):
    """Run in the README's order: a block may use what an earlier one wrote."""
    language, block = runnable_blocks()[index]
    has_data = (REPO / "data" / "kaggle_3m").is_dir() or (REPO.parent / "shared" / "lgg").is_dir()
    if "data/kaggle_3m" in block or "make demo" in block or "predictions/TCGA" in block:
        if not has_data:
            pytest.skip("the dataset is not here (make data explains how to get it)")
        subprocess.run(["make", "data"], cwd=REPO, check=True, capture_output=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = ["bash", "-e", "-c", block] if language == "bash" else [sys.executable, "-c", block]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
