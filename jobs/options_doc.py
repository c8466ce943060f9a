"""Write docs/OPTIONS.md: every job's options, read from the job's own argparse parser.

    python -m jobs.options_doc                             # print the Markdown
    python -m jobs.options_doc --output docs/OPTIONS.md    # regenerate the document
    python -m jobs.options_doc --check docs/OPTIONS.md     # exit 1 when it is out of date

A job is any `jobs/<name>.py` module with a `build_parser()` function, so a new job appears
here (and makes the `--check` fail until the document is regenerated) without editing this
file. Exit status: 0 success (or up to date); 1 failure or out of date; 2 usage error.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import pkgutil
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipelines.cli import entry_points

REGENERATE = "python -m jobs.options_doc --output docs/OPTIONS.md"
# Pipeline order first; jobs not listed follow alphabetically.
JOB_ORDER = (
    "make_synthetic",
    "ingest",
    "refine",
    "train",
    "pseudo_masks",
    "evaluate",
    "retrain",
    "pipeline",
)
NOT_JOBS = frozenset({"options_doc"})  # modules of jobs/ that are tools, not pipeline jobs
USAGE_WIDTH = 100  # fixed, so the document does not depend on the terminal


@dataclass(frozen=True)
class Job:
    """A job module and its parser."""

    name: str  # module name under jobs/
    parser: argparse.ArgumentParser


def discover_jobs(package: str = "jobs") -> list[Job]:
    """Every module of `package` that has a `build_parser()`, in pipeline order."""
    root = importlib.import_module(package)
    names = [
        info.name
        for info in pkgutil.iter_modules(root.__path__)
        if not info.name.startswith("_") and info.name not in NOT_JOBS
    ]
    jobs = []
    for name in names:
        module = importlib.import_module(f"{package}.{name}")
        build = getattr(module, "build_parser", None)
        if callable(build):
            jobs.append(Job(name, build()))
    rank = {name: i for i, name in enumerate(JOB_ORDER)}
    return sorted(jobs, key=lambda job: (rank.get(job.name, len(rank)), job.name))


def render(jobs: Sequence[Job]) -> str:
    """The whole Markdown document."""
    lines = [
        "# Job options",
        "",
        "Every option of every job, generated from the jobs' own argparse parsers "
        f"(`{REGENERATE}`); do not edit by hand. `tests/jobs/test_options_doc.py` fails when "
        "this file is out of date. Each job also prints the same with `--help`.",
        "",
        "Options left at their default take the value of the stage's config dataclass, or of "
        "`--config FILE` when given (flags override the file). Exit status of every job: 0 "
        "success; 1 failure with a one-line reason on stderr; 2 usage error.",
        "",
    ]
    lines += [f"- [`{_command(job)}`](#{_anchor(job)})" for job in jobs]
    for job in jobs:
        lines += ["", *_render_job(job)]
    return "\n".join(lines).rstrip() + "\n"


def _render_job(job: Job) -> list[str]:
    parser = job.parser
    lines = [f'<a id="{_anchor(job)}"></a>', "", f"## `{_command(job)}`", ""]
    summary, details = _split_description(parser.description or "")
    if summary:
        lines += [summary, ""]
    lines += ["```text", _usage(parser).rstrip(), "```", ""]
    if details:
        lines += ["```text", details, "```", ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if _documented(a)]
        if not actions:
            continue
        title = group.title or "options"
        lines += [f"**{title}**", "", "| option | value | default | description |"]
        lines += ["|---|---|---|---|"]
        lines += [_row(action) for action in actions]
        lines.append("")
    for exclusive in parser._mutually_exclusive_groups:
        flags = ", ".join(f"`{a.option_strings[0]}`" for a in exclusive._group_actions)
        need = "exactly one" if exclusive.required else "at most one"
        lines += [f"Give {need} of {flags}.", ""]
    if parser.epilog:
        lines += [parser.epilog.strip(), ""]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _command(job: Job) -> str:
    return f"python -m jobs.{job.name}"


def _anchor(job: Job) -> str:
    return f"job-{job.name.replace('_', '-')}"


def _split_description(text: str) -> tuple[str, str]:
    """First paragraph as one line; the rest verbatim (it holds indented examples)."""
    paragraphs = text.strip().split("\n\n", 1)
    summary = " ".join(paragraphs[0].split())
    details = paragraphs[1].strip("\n") if len(paragraphs) > 1 else ""
    return summary, textwrap.dedent(details).strip("\n")


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = functools.partial(parser.formatter_class, width=USAGE_WIDTH)
    fixed = argparse.ArgumentParser(
        prog=parser.prog, formatter_class=formatter, add_help=False, usage=parser.usage
    )
    fixed._actions = parser._actions
    fixed._mutually_exclusive_groups = parser._mutually_exclusive_groups
    return fixed.format_usage()


def _documented(action: argparse.Action) -> bool:
    return bool(action.option_strings) and not isinstance(action, argparse._HelpAction)


def _row(action: argparse.Action) -> str:
    option = ", ".join(f"`{s}`" for s in action.option_strings)
    value = _value(action)
    default = _default(action)
    description = _cell(action.help or "")
    if action.required:
        description = "**required**" + (f". {description}" if description else "")
    if isinstance(action, argparse._AppendAction) and "repeatable" not in description:
        description += ("; " if description else "") + "repeatable"
    return f"| {option} | {value} | {default} | {description} |"


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices is not None:
        return " \\| ".join(f"`{c}`" for c in action.choices)
    metavar = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
    return f"`{_cell(metavar)}`"


def _default(action: argparse.Action) -> str:
    if isinstance(action, argparse._StoreTrueAction):
        return "off"
    if isinstance(action, argparse._StoreFalseAction):
        return "on"
    if action.default is None or action.default is argparse.SUPPRESS:
        return ""
    return f"`{_cell(str(action.default))}`"


def _cell(text: str) -> str:
    """One table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.options_doc", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--output", metavar="FILE", help="write the Markdown to FILE")
    where.add_argument(
        "--check", metavar="FILE", help="exit 1 when FILE differs from the generated Markdown"
    )
    return parser


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    text = render(discover_jobs())
    if args.check:
        path = Path(args.check)
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current != text:
            state = "missing" if current is None else "out of date"
            print(f"error: {path} is {state}: run `{REGENERATE}`", file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    if args.output:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
        return 0
    sys.stdout.write(text)
    return 0


main, cli = entry_points(_main)

if __name__ == "__main__":
    cli()
