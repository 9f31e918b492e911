"""infra/bin/retry, which the Makefile's install steps go through: tries again after a failure, stops at the first
success, gives up after ATTEMPTS with the last exit status, and refuses a bad count."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

RETRY = Path(__file__).resolve().parents[2] / "infra" / "bin" / "retry"


def _run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RETRY_WAIT_S": "0"}
    return subprocess.run([str(RETRY), *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=30)


def test_a_command_that_fails_twice_then_succeeds_is_run_three_times(tmp_path: Path) -> None:
    # each try appends a line; the command succeeds once the file has 3 lines
    script = "echo x >> tries; [ $(wc -l < tries) -ge 3 ]"
    result = _run("5", "sh", "-c", script, tmp_path=tmp_path)
    assert result.returncode == 0
    assert (tmp_path / "tries").read_text().count("x") == 3
    assert result.stderr.count("trying again") == 2
    assert "try 2 of 5" in result.stderr


def test_gives_up_after_the_attempts_with_the_last_exit_status(tmp_path: Path) -> None:
    result = _run("2", "sh", "-c", "echo x >> tries; exit 7", tmp_path=tmp_path)
    assert result.returncode == 7
    assert (tmp_path / "tries").read_text().count("x") == 2


def test_a_bad_attempt_count_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    for bad in ("0", "three", "-1"):
        result = _run(bad, "sh", "-c", "echo x >> tries", tmp_path=tmp_path)
        assert result.returncode == 2
        assert f"got: {bad}" in result.stderr
    assert not (tmp_path / "tries").exists()
