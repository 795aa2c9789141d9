"""The benchmark scripts turn a wrong argument away before they start."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks")


@pytest.mark.parametrize(
    ("script", "args", "accepted"),
    [
        ("run.py", ["--rounds", "0"], "a whole number above 0; got '0'"),
        ("run.py", ["--scale", "-1"], "a number above 0; got '-1'"),
        ("run.py", ["--requests", "many"], "a whole number above 0; got 'many'"),
        ("bench_chain.py", ["--seconds", "inf"], "a number above 0; got 'inf'"),
        ("bench_chain.py", ["--rounds", "0"], "a whole number above 0"),
        ("bench_cli.py", ["--rows", "0"], "a whole number above 0"),
        ("bench_verify.py", ["--rows", "-5"], "a whole number above 0"),
        ("bench_tracking.py", ["--rounds", "nan"], "a whole number above 0"),
        (
            "bench_tracking.py",
            ["--postgres-url", "sqlite:///x.db"],
            "a PostgreSQL URL such as postgresql+psycopg://",
        ),
        ("bench_tracking.py", ["--postgres-url", "none"], "got 'none'"),
        ("bench_floor.py", ["--rounds", "1.5"], "a whole number above 0"),
    ],
)
def test_wrong_argument_is_a_usage_error(
    script: str, args: list[str], accepted: str
) -> None:
    done = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, script), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert accepted in done.stderr
    assert "Traceback" not in done.stderr
