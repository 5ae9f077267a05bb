"""Write docs/config.md from the config schema (src/tomdistill/config_schema.py) and the composed defaults of conf/.

    python scripts/render_config_docs.py            # (re)write docs/config.md
    python scripts/render_config_docs.py --check    # exit 1, with one line, when docs/config.md is stale

tests/test_config_schema.py runs the check, so CI fails when a schema, a default or an experiment changed and the
page was not rendered again.
"""
from __future__ import annotations

import argparse
import difflib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))


def stale_summary(committed: str, rendered: str, name: str) -> str | None:
    """One line saying how `committed` differs from `rendered` (None when they are the same)."""
    if committed == rendered:
        return None
    old, new = committed.splitlines(), rendered.splitlines()
    changed = [op for op in difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes() if op[0] != "equal"]
    removed = sum(i2 - i1 for _, i1, i2, _, _ in changed)
    added = sum(j2 - j1 for _, _, _, j1, j2 in changed)
    first = changed[0][1] + 1 if changed else 1
    line = (new[changed[0][3]] if changed and changed[0][3] < len(new) else "").strip()
    return (f"{name} is stale ({removed} line(s) out, {added} in; the first difference at line {first}: "
            f"{line[:80]!r}); run python scripts/render_config_docs.py")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/config.md differs from the schema's")
    args = parser.parse_args(argv)
    from tomdistill.config_schema import CONFIG_DOCS, render_config_docs

    rendered = render_config_docs()
    name = os.path.relpath(CONFIG_DOCS, ROOT)
    if args.check:
        committed = CONFIG_DOCS.read_text() if CONFIG_DOCS.exists() else ""
        summary = stale_summary(committed, rendered, name)
        if summary:
            print(summary, file=sys.stderr)
            return 1
        print(f"{name} is up to date")
        return 0
    CONFIG_DOCS.write_text(rendered)
    print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
