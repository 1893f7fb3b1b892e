"""Every ``python sample.py|evaluate.py|train.py ...`` command in README.md and docs/*.md composes:
its config groups, options and keys exist (a renamed group or key fails here, not for a reader).

Composition only: the commands' runs are sized for real use; the jobs themselves are tested elsewhere.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

ROOT = Path(__file__).resolve().parents[1]
ENTRY = re.compile(r"python (sample|evaluate|train)\.py\b")
#: flags and arguments that are not overrides of the composed config
SKIPPED = ("-m", "--multirun", "--cfg", "job", "--help")


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where, primary config, overrides) of every documented command line (continuations joined)."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        if path.name == "errors.md":  # the bad-input catalog: its commands are meant to fail
            continue
        text = path.read_text().replace("\\\n", " ")
        for number, line in enumerate(text.splitlines(), 1):
            for match in ENTRY.finditer(line):
                command = line[match.end() :].split("`")[0].split(" # ")[0].split("|")[0]
                overrides = parse_overrides(command)
                if overrides is not None:
                    found.append((f"{path.name}:{number}", match.group(1), overrides))
    return found


def parse_overrides(command: str) -> list[str] | None:
    """Overrides of one command; sweeps keep their first value; placeholders (``<run>``, ``$k``) become
    plain words; None for a line that is not a whole command (``python sample.py ... key=value``)."""
    command = re.sub(r"<[^<>]*>|\$\w+", "placeholder", command).rstrip("; ")
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    if "..." in words:
        return None
    overrides = []
    for word in words:
        word = word.rstrip(";")  # a shell loop's body: `...; done`
        if word in SKIPPED or "=" not in word or word.startswith(("-", "$", "&", ";", ">")):
            continue
        key, value = word.split("=", 1)
        if "," in value and not value.startswith(("[", "{", "'", '"')) and "(" not in value:
            value = value.split(",")[0]  # a multirun sweep: compose its first job
        overrides.append(f"{key}={value}")
    return overrides


COMMANDS = documented_commands()


def test_the_docs_hold_commands():
    assert len(COMMANDS) > 40
    assert {primary for _, primary, _ in COMMANDS} == {"sample", "evaluate", "train"}


@pytest.mark.parametrize(("where", "primary", "overrides"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_documented_command_composes(where, primary, overrides):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        try:
            compose(primary, overrides=overrides)
        except (HydraException, OmegaConfBaseException) as err:
            pytest.fail(f"{where}: python {primary}.py {' '.join(overrides)}\n{err}")
