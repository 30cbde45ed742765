"""ansible-lint (production profile, .ansible-lint) passes on the roles, playbook and inventory."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_the_roles_are_lint_clean():
    lint = shutil.which("ansible-lint", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.fail("ansible-lint is not installed in the venv (make setup installs it)")
    proc = subprocess.run(
        [lint, "--offline", "roles", "playbooks", "inventory"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Passed" in proc.stdout + proc.stderr


def test_a_lint_failure_is_seen(tmp_path):
    """The check above can fail: a role with a bare command and no name does not pass."""
    lint = shutil.which("ansible-lint", path=str(Path(sys.executable).parent))
    role = tmp_path / "roles" / "bad" / "tasks"
    role.mkdir(parents=True)
    (role / "main.yml").write_text("---\n- command: echo hi\n")
    shutil.copy(REPO / ".ansible-lint", tmp_path / ".ansible-lint")
    proc = subprocess.run(
        [lint, "--offline", "roles"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode != 0
