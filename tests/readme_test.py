"""The README's quick start is what CI runs."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def quick_start_lines() -> list[str]:
  readme = (ROOT / "README.md").read_text()
  section = readme.split("## Quick start", 1)[1]
  block = re.search(r"```(?:bash|sh)\n(.*?)```", section, re.S)
  assert block, "README's Quick start has no shell code block"
  return [line for line in block.group(1).splitlines() if line.strip()]


def test_quick_start_is_two_commands_demo_then_tests():
  demo, tests = quick_start_lines()
  assert "python -m named_embed" in demo
  assert "[test]" in tests and "pytest" in tests


def test_ci_runs_the_readme_test_command_verbatim():
  _, tests = quick_start_lines()
  ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
  assert tests in [line.strip() for line in ci_lines]
