"""The docs' flag tables against the commands' own --help: every flag in both."""

import re
import subprocess
import sys

import pytest

from tests.test_cli import ENV, ROOT

TABLES = {
    "beam_jobs.extract_features": "docs/extract.md",
    "beam_jobs.caption_images": "docs/caption.md",
    "model.train": "docs/train.md",
    "model.evaluate": "docs/evaluate.md",
}


def table_flags(doc: str) -> set[str]:
    """The flags a doc's tables describe: those in the first cell of each row."""
    flags: set[str] = set()
    with open(f"{ROOT}/{doc}") as f:
        for line in f:
            if line.startswith("| `--"):
                flags |= set(re.findall(r"`(--[a-z_]+)", line.split("|")[1]))
    return flags


@pytest.mark.parametrize("module", sorted(TABLES))
def test_every_flag_of_a_command_is_in_its_docs_table_and_no_other(module):
    shown = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, env=ENV, cwd=ROOT
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    options = shown.stdout.split("options:", 1)[1]
    flags = set(re.findall(r"^\s+(--[a-z_]+)", options, re.MULTILINE))
    documented = table_flags(TABLES[module])
    assert sorted(flags - documented) == [], f"in --help, not in {TABLES[module]}'s table"
    assert sorted(documented - flags) == [], f"in {TABLES[module]}'s table, not in --help"
