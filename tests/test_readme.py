from __future__ import annotations

from pathlib import Path

from gate_middleware import GateSettings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_setting_is_in_the_readme_table() -> None:
    for name in GateSettings.model_fields:
        assert f"| `GATE_{name.upper()}` |" in README, name


def test_the_readme_test_command_is_what_ci_runs() -> None:
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "pip install -e '.[test]'" in README and "pip install -q -e '.[test]'" in ci
    assert ".venv/bin/python -m pytest" in README and ".venv/bin/python -m pytest" in ci
