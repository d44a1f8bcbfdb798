"""README (and docs/) against the code it documents, where drift is cheap to check and easy to miss.

- The settings table and app/config.py stay in step: every QLORA_* setting is in the table, every row names
  a setting, and each row's default is what Settings gives when nothing is set. The table is what an
  operator reads to configure a deployment; a row missing, or a default that drifted (a number changed in
  config.py and not in the README), sends them wrong without any test failing.
- Every `qlora` command line the docs show names a command, a subcommand and options the CLI has: a user
  copies them literally (the README said `qlora jobs get` of what is `qlora jobs show`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import typer.main

from app.cli import cli
from app.config import Settings

ROOT = Path(__file__).resolve().parent.parent.parent

# A default the README gives as a number with its unit, in the unit the setting is in.
UNITS = {"": 1, "GiB": 1024**3, "MiB": 1024**2, "h": 3600, "days": 24 * 3600}

# Defaults that Settings derives from other settings (its field holds "", 0 or None meaning "derived"): the
# README's words for each, and what they must mean of a Settings built with nothing set but its home.
DERIVED: dict[str, tuple[str, Callable[[Settings], bool]]] = {
    "home": ("`~/.qlora`", lambda s: Settings.model_fields["home"].default == Path("~/.qlora")),
    "database_url": ("`sqlite:///$QLORA_HOME/qlora.db`", lambda s: s.database_url == f"sqlite:///{s.home}/qlora.db"),
    "storage_url": ("`file://$QLORA_HOME/storage`", lambda s: s.storage_url == f"file://{s.home}/storage"),
    "s3_endpoint_url": ("AWS", lambda s: s.s3_endpoint_url is None),
    "s3_public_endpoint_url": ("the endpoint above", lambda s: s.s3_public_endpoint_url is None),
    "public_url": ("the address each request came to", lambda s: s.public_url is None),
    "broker_url": ("a filesystem queue under `$QLORA_HOME`", lambda s: s.embedded),
    "model_roots": ("`<QLORA_HOME>/models`", lambda s: s.allowed_model_roots == [s.home / "models"]),
    "broker_visibility_timeout_s": (
        "time limit + 2 h", lambda s: s.visibility_timeout_s == s.job_time_limit_s + 2 * 3600),
    "worker_database_timeout_s": (
        "a quarter of the heartbeat deadline, 2 to 30 s (30 with the defaults)",
        lambda s: s.database_timeout_s == 30 == min(30, max(2, int(s.heartbeat_deadline_s // 4)))),
}


def readme_settings_table() -> dict[str, str]:
    """{setting field: the README's default for it}, from the table under "## Configuration"."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        names = re.findall(r"`QLORA_([A-Z0-9_]+)`", cells[0]) if line.startswith("| `QLORA_") else []
        if not names:
            continue
        defaults = cells[1].split(", ") if len(names) > 1 else [cells[1]]
        assert len(defaults) == len(names), f"README row {cells[0]}: {len(names)} settings, defaults {cells[1]!r}"
        for name, default in zip(names, defaults, strict=True):
            assert name.lower() not in rows, f"README's settings table has QLORA_{name} twice"
            rows[name.lower()] = default
    return rows


def parsed(default: str) -> object:
    """The README's default as a value: a number with an optional unit, `none`, or a literal in backticks."""
    if default == "none":
        return None
    literal = re.fullmatch(r"`([^`]*)`", default)
    if literal and not re.fullmatch(r"\d+(?:\.\d+)?", literal.group(1)):
        return {"true": True, "false": False}.get(literal.group(1), literal.group(1))
    default = default.strip("`")
    number = re.fullmatch(r"(\d+(?:\.\d+)?) ?(GiB|MiB|h|days)?", default)
    assert number, f"a default the README gives as {default!r} is neither a number (with a unit), none nor `literal`"
    return float(number.group(1)) * UNITS[number.group(2) or ""]


def test_every_setting_is_in_the_readme_table_and_every_row_is_a_setting():
    documented = set(readme_settings_table())
    fields = set(Settings.model_fields)
    assert not fields - documented, f"settings missing from README's table: {sorted(fields - documented)}"
    assert not documented - fields, f"README's table names settings app/config.py lacks: {sorted(documented - fields)}"


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_the_readme_default_is_the_settings_default(name, tmp_path):
    said = readme_settings_table().get(name)
    assert said is not None, f"QLORA_{name.upper()} is missing from README's settings table"
    settings = Settings(home=tmp_path)
    if name in DERIVED:
        words, holds = DERIVED[name]
        assert said == words, f"QLORA_{name.upper()}: README says {said!r}; this test checks {words!r} (update both)"
        assert holds(settings), f"QLORA_{name.upper()}: README says {said!r}, which Settings does not give"
        return
    actual = getattr(settings, name)
    if actual in ({}, []):  # QLORA_GPU_CLASSES, QLORA_EXTRA_GPU_CLASSES: none given
        actual = None
    expected = parsed(said)
    if isinstance(actual, bool) or not isinstance(actual, int | float) or expected is None:
        assert expected == actual, f"QLORA_{name.upper()}: README says {said!r}, app/config.py gives {actual!r}"
    else:
        assert expected == pytest.approx(actual), f"QLORA_{name.upper()}: README says {said!r}, app/config.py gives {actual!r}"


# `qlora ...` in the docs' code that is not a command line: the value `disabled_by` holds for `qlora admin`.
NOT_COMMANDS = {"qlora admin as alice on ops-1"}


def docs_code() -> list[tuple[str, str]]:
    """(file, text) of every fenced block's line and every inline code span of README.md and docs/*.md."""
    pieces: list[tuple[str, str]] = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        fenced = re.compile(r"```[a-z]*\n(.*?)```", re.S)
        pieces += [(path.name, line) for block in fenced.findall(text) for line in block.splitlines()]
        pieces += [(path.name, span) for span in re.findall(r"`([^`\n]+)`", fenced.sub("", text))]
    return pieces


def option_names(command) -> set[str]:
    return {name for param in command.params for name in (*param.opts, *param.secondary_opts)}


def test_every_qlora_command_line_in_the_docs_is_one_the_cli_has():
    root = typer.main.get_command(cli)
    wrong: list[str] = []
    for where, code in docs_code():
        # The command and what follows it up to a comment, a pipe, a `;`, `&&`, a `)` closing $( ) or the span's end.
        for shown in re.finditer(r"(?<![\w./-])qlora\s+[a-z][\w-]*(?:\s+[^\s#|;&)`]+)*", code):
            line = shown.group(0)
            if line in NOT_COMMANDS:
                continue
            words = line.split()[1:]
            command = root.commands.get(words.pop(0))
            if command is None:
                wrong.append(f"{where}: `{line}`: qlora has no such command")
                continue
            options = option_names(command)
            if hasattr(command, "commands"):  # a group: its own options (--url, --api-key) come before the verb
                while words and words[0].startswith("--"):
                    words.pop(0)
                    if words and not words[0].startswith("-"):
                        words.pop(0)
                if not words:
                    continue
                verb = words.pop(0)
                if verb not in command.commands:
                    wrong.append(f"{where}: `{line}`: qlora {command.name} has no command {verb!r}")
                    continue
                command = command.commands[verb]
                options = option_names(command)
            for word in words:
                option = re.fullmatch(r"\[?(--[a-z][a-z-]*)(?:=\S*)?\]?", word)
                if option and option.group(1) not in options:
                    wrong.append(f"{where}: `{line}`: no option {option.group(1)}")
    assert not wrong, "\n".join(wrong)


def fenced_out(text: str) -> str:
    """The text without its fenced blocks (a `# comment` in a shell block is no heading)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def anchor_of(title: str) -> str:
    """The anchor GitHub gives a heading: lowercased, punctuation but `-` and `_` dropped, spaces as `-`."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def heading_anchors(text: str) -> set[str]:
    """The anchors of a Markdown file's headings; a repeated one gets -1, -2, ... as on GitHub."""
    anchors: set[str] = set()
    for title in re.findall(r"^#{1,6} (.+)$", fenced_out(text), re.M):
        anchor, n = anchor_of(title), 0
        while (f"{anchor}-{n}" if n else anchor) in anchors:
            n += 1
        anchors.add(f"{anchor}-{n}" if n else anchor)
    return anchors


def section_links(text: str) -> list[str]:
    return re.findall(r"\]\(#([^)\s]+)\)", text)


def test_every_link_to_a_section_names_a_heading_there():
    # The README's contents and its "see ..." links: a heading reworded breaks them silently.
    wrong: list[str] = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        anchors = heading_anchors(text)
        wrong += [f"{path.name}: #{link}" for link in section_links(text) if link not in anchors]
    assert not wrong, "\n".join(wrong)


def test_the_readme_contents_lists_every_section_and_subsection():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    contents = text.split("\n## Contents\n", 1)[1].split("\n## ", 1)[0]
    sections = [anchor_of(title) for title in re.findall(r"^###? (.+)$", fenced_out(text), re.M) if title != "Contents"]
    missing = [anchor for anchor in sections if anchor not in section_links(contents)]
    assert not missing, f"add these to the README's Contents: {missing}"
