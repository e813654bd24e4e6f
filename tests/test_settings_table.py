"""README's "## Settings" table names every ``Settings`` field by its environment variable, and nothing else.

Fast and model-free: it reads README.md and ``app.config.Settings.model_fields`` only.
"""

from __future__ import annotations

import re
from pathlib import Path

from app.config import Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def _table_variables(markdown: str) -> list[str]:
    """The variables of the Settings table's first column (a row may name several: ``A`` / ``B``), in order."""
    section = markdown.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert rows[0].split("|")[1].strip() == "variable", "the Settings table's first column is 'variable'"
    return [name for row in rows[2:] for name in re.findall(r"`(SAFT_[A-Z0-9_]+)`", row.split("|")[1])]


def _env_names() -> set[str]:
    """Each field's environment variable: its alias if it has one, else the prefix and its upper-cased name."""
    prefix = Settings.model_config.get("env_prefix", "")
    return {field.validation_alias if isinstance(field.validation_alias, str) else f"{prefix}{name}".upper()
            for name, field in Settings.model_fields.items()}


def test_readme_settings_table_names_every_setting_once() -> None:
    named = _table_variables(README.read_text(encoding="utf-8"))
    fields = _env_names()
    assert len(named) > 20  # the table was found and read
    assert sorted(set(named) - fields) == [], "README names settings that app.config.Settings does not have"
    assert sorted(fields - set(named)) == [], "app.config.Settings has settings the README table does not name"
    assert sorted(n for n in set(named) if named.count(n) > 1) == [], "README names a setting twice"
