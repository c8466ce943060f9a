"""jobs.options_doc: docs/OPTIONS.md lists every option of every job and is up to date."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from jobs import options_doc
from jobs.options_doc import REGENERATE, discover_jobs, main, render

ROOT = Path(__file__).resolve().parents[2]
OPTIONS_MD = ROOT / "docs" / "OPTIONS.md"
KNOWN_JOBS = {"make_synthetic", "ingest", "refine", "train", "pipeline"}


@pytest.fixture(scope="module")
def generated() -> str:
    return render(discover_jobs())


def test_options_md_is_up_to_date(generated: str) -> None:
    current = OPTIONS_MD.read_text(encoding="utf-8") if OPTIONS_MD.is_file() else ""
    assert current == generated, f"docs/OPTIONS.md is out of date: run `{REGENERATE}`"


def test_discovers_every_job_module() -> None:
    names = [job.name for job in discover_jobs()]
    assert KNOWN_JOBS <= set(names)
    assert "options_doc" not in names
    order = [names.index(n) for n in ("make_synthetic", "ingest", "refine", "train", "pipeline")]
    assert order == sorted(order)  # pipeline order, not alphabetical
    job_files = {p.stem for p in (ROOT / "jobs").glob("*.py") if not p.stem.startswith("_")}
    assert set(names) == job_files - options_doc.NOT_JOBS  # every job has a build_parser


def test_every_option_of_every_job_is_documented(generated: str) -> None:
    for job in discover_jobs():
        section = generated.split(f"## `python -m jobs.{job.name}`", 1)[1].split("\n## ", 1)[0]
        for action in job.parser._actions:
            for flag in action.option_strings:
                if flag in ("-h", "--help"):
                    continue
                assert f"`{flag}`" in section, f"{job.name}: {flag} missing"


def test_renders_defaults_choices_and_required() -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.x", description="Does x.\n\n    ex")
    parser.add_argument("--size", type=int, default=3, metavar="N", help="a | size")
    parser.add_argument("--mode", choices=("a", "b"), required=True)
    parser.add_argument("--flag", action="store_true")
    parser.add_argument("--item", action="append", metavar="I")
    text = render([options_doc.Job("x", parser)])
    assert "| `--size` | `N` | `3` | a \\| size |" in text
    assert "| `--mode` | `a` \\| `b` |  | **required** |" in text
    assert "| `--flag` |  | off |  |" in text
    assert "| `--item` | `I` |  | repeatable |" in text
    assert "Does x." in text and "```text\nex\n```" in text


def test_cli_prints_writes_and_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# Job options")
    target = tmp_path / "OPTIONS.md"
    assert main(["--check", str(target)]) == 1  # missing
    assert REGENERATE in capsys.readouterr().err
    assert main(["--output", str(target)]) == 0
    assert target.read_text() == printed
    assert main(["--check", str(target)]) == 0
    target.write_text(printed.replace("--iterations", "--iters"))
    assert main(["--check", str(target)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert main(["--output", "a", "--check", "b"]) == 2


def _readme_job_commands() -> list[tuple[str, list[str]]]:
    """`python -m jobs.<name> ...` commands of the README's bash blocks, continuations joined."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            match = re.search(r"python -m jobs\.(\w+)(.*)$", line)
            if match:
                args = shlex.split(match.group(2).split("#", 1)[0].split("&&", 1)[0])
                commands.append((match.group(1), args))
    return commands


def test_readme_job_commands_parse() -> None:
    """Every job command the README shows uses options its job has."""
    parsers = {job.name: job.parser for job in discover_jobs()}
    parsers["options_doc"] = options_doc.build_parser()
    commands = _readme_job_commands()
    assert {"pipeline", "ingest", "refine", "train"} <= {name for name, _ in commands}
    for name, args in commands:
        try:
            parsers[name].parse_args(args)
        except SystemExit as exit_:
            raise AssertionError(f"README: python -m jobs.{name} {' '.join(args)}") from exit_
