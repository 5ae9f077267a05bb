"""The GPU check's plumbing (stdlib and packaging only: it runs on the device image before anything is installed).

    python tests/gpu/gpucheck.py sizes [--bundle .gpu_bundle] [--record]   # table vs. built bundle, budget
    python tests/gpu/gpucheck.py verify [--bundle .gpu_bundle]             # every pinned file is in the bundle
    python tests/gpu/gpucheck.py audit                                      # carried packages' needs vs. the image
    python tests/gpu/gpucheck.py image --pip-list PIP_LIST.json             # the image vs. its list; every need met
    python tests/gpu/gpucheck.py record --name N --status S --seconds T [--note ...] RESULTS
    python tests/gpu/gpucheck.py summary RESULTS                            # the table; exit 1 if any check failed

The bundle (.gpu_bundle/, git-ignored, carried by the device `run` tool) is listed in scripts/gpu_wheels.txt:
`requirement kind bytes file` per line. kind: `wheel` (pip download, cp312 manylinux x86_64 or pure Python),
`sdist` (built here with `pip wheel`), `fallback` (installed on the device only when the image's copy is too
old for a carried package), `overlay` (installed on the device into a folder of its own, first on PYTHONPATH for
one fit only), `snapshot` (a directory copied into the bundle; bytes = its total).

scripts/gpu_image_packages.txt lists what the check takes from the device image (`name version`, `*` where the
version was not read); scripts/gpu_wheels_requires.txt records each carried wheel's requirements on the device
(`sizes --record` writes it from the built wheels), so CI checks, without the bundle, that each one is carried
or in the image (`coverage`); on the device `image` checks the same against `pip list`.
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
IMAGE = ROOT / "scripts" / "gpu_image_packages.txt"
REQUIRES = ROOT / "scripts" / "gpu_wheels_requires.txt"
BUNDLE = ROOT / ".gpu_bundle"
MIB = 2**20
CARRY_LIMIT = 64 * MIB          # the device `run` tool: working tree + carried paths, together
WORKTREE_RESERVE = 2 * MIB      # the least room kept for the working tree (tracked + untracked-not-ignored)
KINDS = ("wheel", "sdist", "fallback", "overlay", "snapshot")
SUBDIR = {"fallback": "wheels/fallback", "overlay": "wheels/overlay"}  # in the bundle; other wheels: wheels/
# the device's interpreter, for requirement markers (Python 3.12 on linux x86_64; no extras)
DEVICE_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "platform_machine": "x86_64",
                  "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
                  "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


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
    return bundle / SUBDIR.get(row["kind"], "wheels") / row["file"]


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
    if not missing:  # each wheel's requirements, as recorded for CI (coverage) and as built
        built_requires = bundle_requires(bundle, rows)
        if args.record:
            write_requires(args.requires, built_requires)
        elif read_requires(args.requires) != built_requires:
            problems.append(f"{args.requires.name} differs from the built wheels' requirements "
                            "(scripts/gpu_wheels.sh --record updates it)")
        problems += coverage(rows, built_requires, read_image(args.image))
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
    found = [p for folder in ("wheels", *SUBDIR.values()) for p in (bundle / folder).glob("*.whl")]
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


# ------------------------------------------------------------------------ requirements vs. the image
def read_image(path: Path = IMAGE) -> dict[str, str | None]:
    """scripts/gpu_image_packages.txt: normalized name -> version (None for `*`: present, version not read)."""
    image = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 2:
            raise ValueError(f"{path}:{number}: expected `name version` (version `*` if unknown), got {line!r}")
        image[normalize(fields[0])] = None if fields[1] == "*" else fields[1]
    return image


def device_requires(requires_dist: list[str]) -> list[str]:
    """The `Requires-Dist` lines that apply on the device (its Python, no extras), markers dropped, sorted."""
    from packaging.requirements import Requirement

    kept = set()
    for text in requires_dist:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate(DEVICE_MARKERS):
            continue
        requirement.marker = None
        requirement.name = normalize(requirement.name)
        kept.add(str(requirement))
    return sorted(kept)


def wheel_requires(path: Path) -> list[str]:
    """A wheel's requirements on the device, from its METADATA."""
    import zipfile
    from email.parser import Parser

    with zipfile.ZipFile(path) as wheel:
        name = next(n for n in wheel.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(wheel.read(name).decode())
    return device_requires(metadata.get_all("Requires-Dist") or [])


def bundle_requires(bundle: Path, rows: list[dict]) -> dict[str, list[str]]:
    return {r["requirement"]: wheel_requires(wheel_path(bundle, r)) for r in rows if r["kind"] != "snapshot"}


def read_requires(path: Path = REQUIRES) -> dict[str, list[str]]:
    """scripts/gpu_wheels_requires.txt: `name==version requirement` lines (`-`: it requires nothing)."""
    recorded: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            package, _, requirement = line.partition(" ")
            entries = recorded.setdefault(package, [])
            if requirement.strip() != "-":
                entries.append(requirement.strip())
    return {package: sorted(entries) for package, entries in recorded.items()}


def write_requires(path: Path, requires: dict[str, list[str]]) -> None:
    lines = ["# Each carried wheel's requirements on the device (Python 3.12, linux x86_64, no extras), read from",
             "# the built wheels by scripts/gpu_wheels.sh --record; tests/test_gpu_check.py checks each is carried",
             "# or listed in scripts/gpu_image_packages.txt. `-`: the wheel requires nothing."]
    for package in sorted(requires):
        lines += [f"{package:34} {r}" for r in requires[package]] or [f"{package:34} -"]
    path.write_text("\n".join(lines) + "\n")


def coverage(rows: list[dict], requires: dict[str, list[str]], image: dict[str, str | None]) -> list[str]:
    """Problems: requirements of carried wheels that nothing meets. A requirement is met by the carried copy
    (`wheel`/`sdist`: installed first on PYTHONPATH, so it must fit), else by the image's (a version of None
    is unknown here and checked on the device; "" is listed but not installed) or a `fallback` (installed where
    the image's does not fit). An
    `overlay` package sees the overlay first; a base package that the overlay replaces must accept it too."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    carried = {r["name"]: r["version"] for r in rows if r["kind"] in ("wheel", "sdist")}
    fallback = {r["name"]: r["version"] for r in rows if r["kind"] == "fallback"}
    overlay = {r["name"]: r["version"] for r in rows if r["kind"] == "overlay"}
    problems = []
    for row in rows:
        if row["kind"] == "snapshot":
            continue
        if row["requirement"] not in requires:
            problems.append(f"{row['requirement']}: its requirements are not recorded (scripts/gpu_wheels.sh --record)")
            continue
        for text in requires[row["requirement"]]:
            requirement = Requirement(text)
            name = normalize(requirement.name)

            def fits(version: str) -> bool:
                return requirement.specifier.contains(Version(version), prereleases=True)

            if name in overlay:
                if not fits(overlay[name]):  # the overlay fit loads this one
                    problems.append(f"{row['requirement']} needs {requirement}; the overlay carries {overlay[name]}")
                if row["kind"] == "overlay":
                    continue
            if name in carried:
                if not fits(carried[name]):
                    problems.append(f"{row['requirement']} needs {requirement}; {name}=={carried[name]} is carried")
            elif name in image or name in fallback:
                have = image.get(name, "")  # "": listed but not installed there
                if name in image and (have is None or (have and fits(have))):
                    continue
                if name in fallback and fits(fallback[name]):
                    continue
                problems.append(f"{row['requirement']} needs {requirement}; the image has {name} {have or 'absent'}"
                                + (f", the fallback is {fallback[name]}" if name in fallback else ""))
            else:
                problems.append(f"{row['requirement']} needs {requirement}: {name} is neither carried nor in "
                                f"{IMAGE.name}")
    return problems


def image_problems(image: dict[str, str | None], installed: dict[str, str]) -> list[str]:
    """The listed image against what is installed there (`pip list`): each listed package present, at the listed
    version where one is listed."""
    problems = []
    for name, version in sorted(image.items()):
        if name not in installed:
            problems.append(f"{name}: listed in {IMAGE.name}, not installed in the image")
        elif version is not None and version not in (installed[name], installed[name].split("+")[0]):
            problems.append(f"{name}: {installed[name]} installed, {version} listed in {IMAGE.name}")
    return problems


def cmd_image(args) -> int:
    """On the device, before installing: the image as listed (`pip list` JSON), and each carried wheel's
    requirements met with the image's real versions. Exit 1 on any problem (the summary shows the first)."""
    rows = read_table(args.table)
    bundle = Path(args.bundle)
    installed = {normalize(p["name"]): p["version"] for p in json.loads(Path(args.pip_list).read_text())}
    image = read_image(args.image)
    problems = image_problems(image, installed)
    requires = read_requires(args.requires)
    for row in rows:  # the wheels themselves where they are here
        if row["kind"] != "snapshot" and wheel_path(bundle, row).is_file():
            requires[row["requirement"]] = wheel_requires(wheel_path(bundle, row))
    # the listed names, at the versions installed there (a requirement outside the list is a problem here too)
    problems += coverage(rows, requires, {n: installed.get(n, "") for n in image})
    print("image: " + ", ".join(f"{n} {installed.get(n, '-')}" for n in sorted(image)))  # to update the list
    for problem in problems:
        print(f"PROBLEM: {problem}")
    needs = sum(len(v) for v in requires.values())
    print(f"image: {len(image)} listed packages checked against pip list ({len(installed)} installed); "
          f"{needs} requirements of {len(requires)} carried wheels: {len(problems)} problem(s)")
    return 1 if problems else 0


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
    parser.add_argument("--image", type=Path, default=IMAGE)
    parser.add_argument("--requires", type=Path, default=REQUIRES)
    commands = parser.add_subparsers(dest="command", required=True)
    sizes = commands.add_parser("sizes")
    sizes.add_argument("--bundle", default=os.environ.get("GPU_BUNDLE", str(BUNDLE)))
    sizes.add_argument("--record", action="store_true", help="write the built sizes into the table")
    verify = commands.add_parser("verify")
    verify.add_argument("--bundle", default=os.environ.get("GPU_BUNDLE", str(BUNDLE)))
    audit = commands.add_parser("audit")
    audit.add_argument("--bundle", default=os.environ.get("GPU_BUNDLE", str(BUNDLE)))
    image = commands.add_parser("image")
    image.add_argument("--bundle", default=os.environ.get("GPU_BUNDLE", str(BUNDLE)))
    image.add_argument("--pip-list", required=True, help="`python -m pip list --format=json` of the image")
    record = commands.add_parser("record")
    record.add_argument("--name", required=True)
    record.add_argument("--status", required=True, choices=["passed", "failed", "skipped"])
    record.add_argument("--seconds", type=float, default=0.0)
    record.add_argument("--note", default="")
    record.add_argument("results")
    summary = commands.add_parser("summary")
    summary.add_argument("results")
    args = parser.parse_args(argv)
    handler = {"sizes": cmd_sizes, "verify": cmd_verify, "audit": cmd_audit, "image": cmd_image, "record": cmd_record,
               "summary": cmd_summary}[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
