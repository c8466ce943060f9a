"""docs/OPTIONS.md from the jobs' own argparse parsers: `discover_jobs`, then `render`.

A job is any module of `jobs/` with a `build_parser()` function, so a new job appears in the
document (and `jobs.options_doc --check` fails until it is regenerated) without editing this file.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import pkgutil
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

REGENERATE = "python -m jobs.options_doc --output docs/OPTIONS.md"
# Pipeline order first; jobs not listed follow alphabetically.
JOB_ORDER = "make_synthetic ingest refine train pseudo_masks evaluate retrain pipeline".split()
NOT_JOBS = frozenset({"options_doc"})  # modules of jobs/ that are tools, not pipeline jobs
USAGE_WIDTH = 100  # fixed, so the document does not depend on the terminal
INTRO = (
    "Every option of every job, generated from the jobs' own argparse parsers "
    f"(`{REGENERATE}`); do not edit by hand. `tests/jobs/test_options_doc.py` fails when "
    "this file is out of date. Each job also prints the same with `--help`.",
    "Options left at their default take the value of the stage's config dataclass, or of "
    "`--config FILE` when given (flags override the file). Exit status of every job: 0 "
    "success; 1 failure with a one-line reason on stderr; 2 usage error.",
)


@dataclass(frozen=True)
class Job:
    """A job module (its name under jobs/) and its parser."""

    name: str
    parser: argparse.ArgumentParser


def discover_jobs(package: str = "jobs") -> list[Job]:
    """Every module of `package` that has a `build_parser()`, in pipeline order."""
    jobs = []
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if info.name.startswith("_") or info.name in NOT_JOBS:
            continue
        build = getattr(importlib.import_module(f"{package}.{info.name}"), "build_parser", None)
        if callable(build):
            jobs.append(Job(info.name, build()))
    rank = {name: i for i, name in enumerate(JOB_ORDER)}
    return sorted(jobs, key=lambda job: (rank.get(job.name, len(rank)), job.name))


def render(jobs: Sequence[Job]) -> str:
    """The whole Markdown document."""
    lines = ["# Job options", "", INTRO[0], "", INTRO[1], ""]
    lines += [f"- [`python -m jobs.{job.name}`](#{_anchor(job)})" for job in jobs]
    for job in jobs:
        lines += ["", *_render_job(job)]
    return "\n".join(lines).rstrip() + "\n"


def _render_job(job: Job) -> list[str]:
    parser = job.parser
    lines = [f'<a id="{_anchor(job)}"></a>', "", f"## `python -m jobs.{job.name}`", ""]
    # The description's first paragraph as one line; the rest verbatim (indented examples).
    summary, _, details = (parser.description or "").strip().partition("\n\n")
    if summary:
        lines += [" ".join(summary.split()), ""]
    lines += ["```text", _usage(parser).rstrip(), "```", ""]
    if details := textwrap.dedent(details.strip("\n")).strip("\n"):
        lines += ["```text", details, "```", ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if _documented(a)]
        if actions:
            lines += [f"**{group.title or 'options'}**", ""]
            lines += ["| option | value | default | description |", "|---|---|---|---|"]
            lines += [*map(_row, actions), ""]
    for exclusive in parser._mutually_exclusive_groups:
        flags = ", ".join(f"`{a.option_strings[0]}`" for a in exclusive._group_actions)
        lines += [f"Give {'exactly' if exclusive.required else 'at most'} one of {flags}.", ""]
    if parser.epilog:
        lines += [parser.epilog.strip(), ""]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _anchor(job: Job) -> str:
    return f"job-{job.name.replace('_', '-')}"


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
    """One table row: option, value (choices or metavar), default, description."""
    if action.nargs == 0:
        value = ""
    elif action.choices is not None:
        value = " \\| ".join(f"`{c}`" for c in action.choices)
    else:
        metavar = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
        value = f"`{_cell(metavar)}`"
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        default = "off" if isinstance(action, argparse._StoreTrueAction) else "on"
    elif action.default is None or action.default is argparse.SUPPRESS:
        default = ""
    else:
        default = f"`{_cell(str(action.default))}`"
    description = _cell(action.help or "")
    if action.required:
        description = "**required**" + (f". {description}" if description else "")
    if isinstance(action, argparse._AppendAction) and "repeatable" not in description:
        description += ("; " if description else "") + "repeatable"
    option = ", ".join(f"`{s}`" for s in action.option_strings)
    return f"| {option} | {value} | {default} | {description} |"


def _cell(text: str) -> str:
    """One table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")
