"""The GPU check's plumbing (stdlib only: it runs on the device image before anything is installed).

    python tests/gpu/gpucheck.py sizes [--bundle .gpu_bundle] [--record]   # table vs. built bundle, budget
    python tests/gpu/gpucheck.py verify [--bundle .gpu_bundle]             # every pinned file is in the bundle
    python tests/gpu/gpucheck.py audit                                      # carried packages' needs vs. the image
    python tests/gpu/gpucheck.py record --name N --status S --seconds T [--note ...] RESULTS
    python tests/gpu/gpucheck.py summary RESULTS                            # the table; exit 1 if any check failed

The bundle (.gpu_bundle/, git-ignored, carried by the device `run` tool) is listed in scripts/gpu_wheels.txt:
`requirement kind bytes file` per line. kind: `wheel` (pip download, cp312 manylinux x86_64 or pure Python),
`sdist` (built here with `pip wheel`), `fallback` (installed on the device only when the image's copy is too
old for a carried package), `snapshot` (a directory copied into the bundle; bytes = its total).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TABLE = ROOT / "scripts" / "gpu_wheels.txt"
BUNDLE = ROOT / ".gpu_bundle"
MIB = 2**20
CARRY_LIMIT = 64 * MIB          # the device `run` tool: working tree + carried paths, together
WORKTREE_RESERVE = 2 * MIB      # the least room kept for the working tree (tracked + untracked-not-ignored)
KINDS = ("wheel", "sdist", "fallback", "snapshot")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_table(path: Path = TABLE) -> list[dict]:
    """The pinned bundle: one dict per line (requirement, name, version, kind, bytes, file)."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 4:
            raise ValueError(f"{path}:{number}: expected `requirement kind bytes file`, got {line!r}")
        requirement, kind, size, file = fields
        if kind not in KINDS:
            raise ValueError(f"{path}:{number}: kind {kind!r} is not one of {KINDS}")
        name, sep, version = requirement.partition("==")
        if kind != "snapshot" and not (sep and version):
            raise ValueError(f"{path}:{number}: {requirement!r} is not pinned (name==version)")
        rows.append({"requirement": requirement, "name": normalize(name), "version": version, "kind": kind,
                     "bytes": int(size), "file": file})
    return rows


def wheel_path(bundle: Path, row: dict) -> Path:
    return bundle / ("wheels/fallback" if row["kind"] == "fallback" else "wheels") / row["file"]


def entry_path(bundle: Path, row: dict) -> Path:
    return bundle / row["file"] if row["kind"] == "snapshot" else wheel_path(bundle, row)


def size_of(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def worktree_bytes(root: Path = ROOT) -> int | None:
    """Bytes of what the `run` tool sends besides `carry`: tracked and untracked-not-ignored files."""
    try:
        listing = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root,
                                 capture_output=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    total = 0
    for name in listing.decode(errors="replace").split("\0"):
        path = root / name
        if name and path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def budget(worktree: int | None) -> int:
    """Bytes the carried bundle may take: 64 MiB less the working tree (at least WORKTREE_RESERVE)."""
    return CARRY_LIMIT - max(worktree or 0, WORKTREE_RESERVE)


def check_table(rows: list[dict]) -> list[str]:
    """Problems with the pinned list itself (no bundle needed)."""
    problems = []
    names = [r["name"] for r in rows if r["kind"] != "snapshot"]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{name}: pinned more than once (two versions stop the whole install)")
    for row in rows:
        if row["kind"] == "snapshot":
            continue
        stem = row["file"][: -len(".whl")] if row["file"].endswith(".whl") else None
        parts = stem.split("-") if stem else []
        if len(parts) < 5 or normalize(parts[0]) != row["name"] or parts[1] != row["version"]:
            problems.append(f"{row['requirement']}: file {row['file']!r} is not a wheel of that name and version")
            continue
        python, abi, platform = parts[-3:]
        if platform != "any" and not ("manylinux" in platform and "x86_64" in platform):
            problems.append(f"{row['file']}: platform {platform} does not run on the device (linux x86_64)")
        if not ({"py3", "cp312"} & set(python.split(".")) or python == "py312"):
            problems.append(f"{row['file']}: python tag {python} does not fit the device's Python 3.12")
        if abi not in ("none", "abi3", "cp312"):
            problems.append(f"{row['file']}: ABI {abi} does not fit the device's Python 3.12")
        if row["bytes"] <= 0:
            problems.append(f"{row['requirement']}: no size recorded (run scripts/gpu_wheels.sh --record)")
    return problems


def cmd_sizes(args) -> int:
    rows = read_table(args.table)
    bundle = Path(args.bundle)
    problems = []
    missing = []
    print(f"{'entry':44} {'kind':9} {'recorded':>10} {'built':>10}")
    for row in rows:
        path = entry_path(bundle, row)
        built = size_of(path) if path.exists() else None
        if built is None:
            missing.append(row["requirement"])
        elif args.record:
            row["bytes"] = built
        elif built != row["bytes"]:
            problems.append(f"{row['requirement']}: {built} bytes built, {row['bytes']} recorded "
                            "(scripts/gpu_wheels.sh --record updates the table)")
        shown = "missing" if built is None else f"{built / MIB:.2f} MiB"
        print(f"{row['requirement'][:44]:44} {row['kind']:9} {row['bytes'] / MIB:>6.2f} MiB {shown:>10}")
    if args.record and not missing:
        write_sizes(args.table, rows)
    problems = check_table(rows) + problems
    total = sum(r["bytes"] for r in rows)
    tree = worktree_bytes()
    room = budget(tree)
    tree_text = "unknown" if tree is None else f"{tree / MIB:.2f} MiB"
    print(f"bundle total {total / MIB:.2f} MiB; working tree {tree_text}; room under the 64 MiB carry limit "
          f"{room / MIB:.2f} MiB")
    if total > room:
        problems.append(f"bundle {total / MIB:.2f} MiB exceeds the {room / MIB:.2f} MiB left under 64 MiB")
    for entry in missing:
        problems.append(f"{entry}: not in {bundle} (run scripts/gpu_wheels.sh)")
    extra = unlisted(bundle, rows)
    problems += [f"{p}: in the bundle but not in {args.table.name} (it would be installed too)" for p in extra]
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


def unlisted(bundle: Path, rows: list[dict]) -> list[str]:
    listed = {entry_path(bundle, r).resolve() for r in rows if r["kind"] != "snapshot"}
    found = list((bundle / "wheels").glob("*.whl")) + list((bundle / "wheels/fallback").glob("*.whl"))
    return sorted(str(p) for p in found if p.resolve() not in listed)


def write_sizes(table: Path, rows: list[dict]) -> None:
    """Rewrite the bytes column in place (comments and order kept)."""
    by_requirement = {r["requirement"]: r for r in rows}
    out = []
    for line in table.read_text().splitlines():
        body = line.split("#", 1)[0].strip()
        fields = body.split()
        if len(fields) == 4 and fields[0] in by_requirement:
            row = by_requirement[fields[0]]
            line = f"{row['requirement']:34} {row['kind']:9} {row['bytes']:>9}  {row['file']}"
        out.append(line)
    table.write_text("\n".join(out) + "\n")


def cmd_verify(args) -> int:
    """On the device, before installing: every pinned entry is there, nothing unlisted."""
    rows = read_table(args.table)
    bundle = Path(args.bundle)
    if not bundle.is_dir():
        print(f"MISSING: {bundle}/ (build it with scripts/gpu_wheels.sh and name it in the run tool's carry)")
        return 1
    bad = [r["requirement"] for r in rows if not entry_path(bundle, r).exists()]
    bad += [f"unlisted {p}" for p in unlisted(bundle, rows)]
    for entry in bad:
        print(f"MISSING or unexpected: {entry}")
    total = sum(size_of(entry_path(bundle, r)) for r in rows if entry_path(bundle, r).exists())
    print(f"bundle {bundle}: {len(rows) - len(bad)}/{len(rows)} entries, {total / MIB:.2f} MiB")
    return 1 if bad else 0


def cmd_audit(args) -> int:
    """Each carried package's requirements against what this Python sees (image + installed bundle).
    Prints `FALLBACK <wheel path>` for each unmet one a fallback wheel covers; exit 1 if others stay unmet."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.version import Version

    rows = read_table(args.table)
    bundle = Path(args.bundle)
    fallbacks = {r["name"]: r for r in rows if r["kind"] == "fallback"}
    unmet = 0
    for row in rows:
        if row["kind"] not in ("wheel", "sdist"):
            continue
        try:
            requires = md.requires(row["name"]) or []
        except md.PackageNotFoundError:
            print(f"UNMET {row['requirement']}: not installed")
            unmet += 1
            continue
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            try:
                have = md.version(requirement.name)
            except md.PackageNotFoundError:
                have = None
            if have is not None and requirement.specifier.contains(Version(have), prereleases=True):
                continue
            fallback = fallbacks.get(normalize(requirement.name))
            if fallback and requirement.specifier.contains(Version(fallback["version"]), prereleases=True):
                print(f"FALLBACK {wheel_path(bundle, fallback)}  # {row['name']} needs {requirement}, image has {have}")
            else:
                print(f"UNMET {row['name']} needs {requirement}, this Python has {have}")
                unmet += 1
    return 1 if unmet else 0


# ------------------------------------------------------------------------------------------ results
def append_result(results: Path, row: dict) -> None:
    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def cmd_record(args) -> int:
    append_result(Path(args.results), {"name": args.name, "status": args.status, "seconds": args.seconds,
                                       "note": args.note})
    return 0


def format_summary(rows: list[dict]) -> tuple[str, bool]:
    """The summary table and whether every check passed (skips count as failures: a check that could not
    run on the device machine proves nothing; an empty table fails too)."""
    header = f"{'check':46} {'status':7} {'seconds':>8} {'tokens/s':>10} {'peak GPU GiB':>12}  note"
    lines = ["=" * len(header), "GPU CHECK SUMMARY", header, "-" * len(header)]
    ok = bool(rows)
    for row in rows:
        status = row.get("status", "?")
        ok = ok and status == "passed"
        tokens = row.get("tokens_per_s")
        memory = row.get("gpu_mem_gb")
        lines.append(f"{str(row.get('name'))[:46]:46} {status:7} {float(row.get('seconds') or 0):8.1f} "
                     f"{'-' if tokens is None else f'{tokens:,.0f}':>10} "
                     f"{'-' if memory is None else f'{memory:.3f}':>12}  {row.get('note') or ''}")
    if not rows:
        lines.append("(no results recorded)")
    lines.append("-" * len(header))
    passed = sum(r.get("status") == "passed" for r in rows)
    lines.append(f"{'PASS' if ok else 'FAIL'}: {passed}/{len(rows)} checks passed")
    return "\n".join(lines), ok


def read_results(results: Path) -> list[dict]:
    if not results.exists():
        return []
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()]


def cmd_summary(args) -> int:
    text, ok = format_summary(read_results(Path(args.results)))
    print(text)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, default=TABLE)
    commands = parser.add_subparsers(dest="command", required=True)
    sizes = commands.add_parser("sizes")
    sizes.add_argument("--bundle", default=os.environ.get("GPU_BUNDLE", str(BUNDLE)))
    sizes.add_argument("--record", action="store_true", help="write the built sizes into the table")
    verify = commands.add_parser("verify")
    verify.add_argument("--bundle", default=os.environ.get("GPU_BUNDLE", str(BUNDLE)))
    audit = commands.add_parser("audit")
    audit.add_argument("--bundle", default=os.environ.get("GPU_BUNDLE", str(BUNDLE)))
    record = commands.add_parser("record")
    record.add_argument("--name", required=True)
    record.add_argument("--status", required=True, choices=["passed", "failed", "skipped"])
    record.add_argument("--seconds", type=float, default=0.0)
    record.add_argument("--note", default="")
    record.add_argument("results")
    summary = commands.add_parser("summary")
    summary.add_argument("results")
    args = parser.parse_args(argv)
    handler = {"sizes": cmd_sizes, "verify": cmd_verify, "audit": cmd_audit, "record": cmd_record,
               "summary": cmd_summary}[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
