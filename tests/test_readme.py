"""The README's configuration reference is the trial config's own documentation, and its table of
shipped specs is each spec's own `description`: the tables between the `config-reference` and
`spec-table` markers are rebuilt from them, so neither can drift from the other. After changing a
field or a spec, `python tests/test_readme.py` rewrites both tables."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from orchestrator.spec import load_spec
from trainer.config import TrialConfig, flatten

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
START, END = "<!-- config-reference: start (generated from trainer/config.py) -->", "<!-- config-reference: end -->"
SPECS_START, SPECS_END = "<!-- spec-table: start (generated from each spec's description) -->", "<!-- spec-table: end -->"


def show_default(value) -> str:
    """A default as YAML spells it: null, true, [3, 5, null]."""
    if isinstance(value, (bool, type(None), list)):
        return json.dumps(value)
    return str(value)


def reference_rows(model: type[BaseModel] = TrialConfig, prefix: str = "") -> list[tuple[str, str, str | None]]:
    """(dotted key, default, description) of every leaf field, in declaration order."""
    rows = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += reference_rows(annotation, f"{prefix}{name}.")
        else:
            rows.append((f"{prefix}{name}", show_default(info.get_default(call_default_factory=True)), info.description))
    return rows


def reference_table() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{key}` | `{default}` | {description} |" for key, default, description in reference_rows()]
    return "\n".join(lines)


def spec_table() -> str:
    """One row per shipped spec under search_spaces/: its path and its description on one line."""
    lines = ["| spec | what |", "|---|---|"]
    for path in sorted((ROOT / "search_spaces").glob("**/*.yaml")):
        description = " ".join(load_spec(path).description.split()).replace("|", "\\|")
        lines.append(f"| `{path.relative_to(ROOT / 'search_spaces')}` | {description} |")
    return "\n".join(lines)


def readme_table(text: str, start: str = START, end: str = END) -> str:
    assert start in text and end in text, f"README.md lacks the markers {start!r} and {end!r}"
    return text.split(start, 1)[1].split(end, 1)[0].strip()


def rewrite(text: str, start: str, end: str, table: str) -> str:
    before, rest = text.split(start, 1)
    return f"{before}{start}\n{table}\n{end}{rest.split(end, 1)[1]}"


def test_every_config_field_is_documented_where_it_is_declared():
    undocumented = [key for key, _, description in reference_rows() if not description]
    assert not undocumented, f"fields without Field(description=...): {undocumented}"


def test_the_rows_are_every_config_key():
    assert [key for key, _, _ in reference_rows()] == list(flatten(TrialConfig()))


def test_readme_reference_is_the_config_documentation():
    assert readme_table(README.read_text()) == reference_table(), (
        "README.md's configuration reference differs from trainer/config.py; run `python tests/test_readme.py`"
    )


def test_readme_spec_table_is_each_specs_description():
    assert readme_table(README.read_text(), SPECS_START, SPECS_END) == spec_table(), (
        "README.md's table of shipped specs differs from their descriptions; run `python tests/test_readme.py`"
    )


def test_every_config_key_is_documented():
    text = README.read_text()
    missing = [key for key in flatten(TrialConfig()) if f"`{key}`" not in text]
    assert not missing, f"README.md's configuration reference lacks {missing}"


def test_readme_gives_the_two_setup_commands():
    text = README.read_text()
    assert "make run" in text and "make test" in text


if __name__ == "__main__":
    text = rewrite(README.read_text(), START, END, reference_table())
    README.write_text(rewrite(text, SPECS_START, SPECS_END, spec_table()))
    print(f"rewrote the configuration reference and the table of shipped specs in {README}")
