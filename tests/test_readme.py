"""The README's configuration reference is the trial config's own documentation: the table between
the `config-reference` markers is rebuilt from each field's default and description, so neither can
drift from the other. After changing a field, `python tests/test_readme.py` rewrites the table."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from trainer.config import TrialConfig, flatten

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- config-reference: start (generated from trainer/config.py) -->", "<!-- config-reference: end -->"


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


def readme_table(text: str) -> str:
    assert START in text and END in text, f"README.md lacks the markers {START!r} and {END!r}"
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def test_every_config_field_is_documented_where_it_is_declared():
    undocumented = [key for key, _, description in reference_rows() if not description]
    assert not undocumented, f"fields without Field(description=...): {undocumented}"


def test_the_rows_are_every_config_key():
    assert [key for key, _, _ in reference_rows()] == list(flatten(TrialConfig()))


def test_readme_reference_is_the_config_documentation():
    assert readme_table(README.read_text()) == reference_table(), (
        "README.md's configuration reference differs from trainer/config.py; run `python tests/test_readme.py`"
    )


def test_every_config_key_is_documented():
    text = README.read_text()
    missing = [key for key in flatten(TrialConfig()) if f"`{key}`" not in text]
    assert not missing, f"README.md's configuration reference lacks {missing}"


def test_readme_gives_the_two_setup_commands():
    text = README.read_text()
    assert "make run" in text and "make test" in text


if __name__ == "__main__":
    text = README.read_text()
    README.write_text(text.replace(readme_table(text), reference_table()))
    print(f"rewrote the configuration reference in {README}")
