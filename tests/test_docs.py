"""The README stays true: its configuration reference is generated from the dataclasses."""

from pathlib import Path

from pipeline.config_docs import update

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_configuration_reference_is_generated_from_the_dataclasses():
    assert update(README, check=True), "README.md is stale: run `python -m pipeline.config_docs README.md`"


def test_readme_gives_exactly_two_setup_commands():
    setup = README.read_text().split("## Set up (two commands)", 1)[1].split("##", 1)[0]
    block = setup.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    assert commands == ["make demo", "make test"]
