"""The README's configuration reference names every trial-config key, so it cannot drift."""

from pathlib import Path

from trainer.config import TrialConfig, flatten

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_config_key_is_documented():
    text = README.read_text()
    missing = [key for key in flatten(TrialConfig()) if f"`{key}`" not in text]
    assert not missing, f"README.md's configuration reference lacks {missing}"


def test_readme_gives_the_two_setup_commands():
    text = README.read_text()
    assert "make run" in text and "make test" in text
