"""Write docs/configuration.md's option table from `hello_cluster.config.OPTIONS` (`make docs`).

A default, an env name or a meaning is written once, in OPTIONS; the page's table between the
two markers below is this script's output and the prose around it is kept as written.
`--check` rewrites nothing and exits 1 when the page is not what this script would write
(tests/test_docs_current.py runs it), so a changed option cannot leave the manual behind.

A script beside the package rather than a `hello-cluster` flag, as gunicorn's
`scripts/build_settings_doc.py`: Markdown for the manual is a build step of this repository,
not something an installed server needs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

from hello_cluster.config import OPTIONS, Option, parse_bool

PAGE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
BEGIN = ("<!-- BEGIN OPTIONS: generated from config.OPTIONS by tools/gen_config_docs.py; "
         "edit OPTIONS, then run make docs -->")
END = "<!-- END OPTIONS -->"
HEADER = "| flag | env | default | meaning |\n| --- | --- | --- | --- |"


def _cell(text: str) -> str:
    """A `|` would end the cell, even inside a code span: GitHub's tables want it escaped."""
    return text.replace("|", "\\|")


def flag_cell(opt: Option) -> str:
    if opt.env_only:
        return "(environment only)"
    if opt.parse is parse_bool:
        return f"`--[no-]{opt.name}`"
    return f"`{opt.flag} {opt.metavar}`" + (" (repeat)" if opt.repeat else "")


def env_cell(opt: Option) -> str:
    return f"`{opt.env}`" + (" (comma-separated)" if opt.repeat else "")


def default_cell(opt: Option) -> str:
    if opt.doc_default:
        return opt.doc_default
    return f"`{opt.default}`" if opt.default else "unset"


def row(opt: Option) -> str:
    cells = (flag_cell(opt), env_cell(opt), default_cell(opt), opt.doc or opt.help)
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def table(options: Iterable[Option] = OPTIONS) -> str:
    return "\n".join([HEADER, *(row(opt) for opt in options)])


def rewrite(page: str, generated: str) -> str:
    """The page with the text between the markers replaced by `generated`."""
    start, end = page.find(BEGIN), page.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the markers are missing: put {BEGIN!r} and {END!r} around the table")
    return page[: start + len(BEGIN)] + "\n" + generated + "\n" + page[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the page is not current")
    parser.add_argument("--page", type=Path, default=PAGE, help="default: %(default)s")
    args = parser.parse_args(argv)
    old = args.page.read_text()
    try:
        new = rewrite(old, table())
    except ValueError as err:
        print(f"{args.page}: {err}", file=sys.stderr)
        return 2
    if args.check:
        if new != old:
            print(f"{args.page} is not current with config.OPTIONS: run make docs",
                  file=sys.stderr)
            return 1
        return 0
    if new != old:
        args.page.write_text(new)
        print(f"{args.page}: option table rewritten from config.OPTIONS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
