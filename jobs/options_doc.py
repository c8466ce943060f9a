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
import sys
from pathlib import Path

from pipelines.cli import entry_points
from pipelines.cli.options_doc import NOT_JOBS, REGENERATE, Job, discover_jobs, render

__all__ = ["NOT_JOBS", "REGENERATE", "Job", "build_parser", "discover_jobs", "main", "render"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.options_doc", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--output", metavar="FILE", help="write the Markdown to FILE")
    check = "exit 1 when FILE differs from the generated Markdown"
    where.add_argument("--check", metavar="FILE", help=check)
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
    elif args.output:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    else:
        sys.stdout.write(text)
    return 0


main, cli = entry_points(_main)

if __name__ == "__main__":
    cli()
