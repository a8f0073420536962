"""The GPU check's report: every stage's JSON lines (scripts.gpu_results) and bench tables as one markdown file.

    python scripts/gpu_report.py --out DIR [--dry-run]

Reads DIR/{env,numerics,train,timings}.json and DIR/pytest.log, writes DIR/report.md: a summary (PASS / FAIL / SKIP
counts, stages that wrote nothing or did not finish, e.g. cut by their time box), each stage's lines, then
bench.py's tables. --stages limits it to the stages a re-run ran (gpu_check.sh --only). Exit status 1 when a line
failed or a stage is missing or unfinished.
"""
import argparse
import re
import sys
from collections import Counter
from pathlib import Path

from scripts.gpu_results import STATUSES, CheckLine, markdown, read_lines

PYTEST_STATUS = {"PASSED": "PASS", "FAILED": "FAIL", "ERROR": "FAIL", "SKIPPED": "SKIP", "XFAIL": "INFO",
                 "XPASS": "INFO"}
VERBOSE_RE = re.compile(rf"^(\S+::\S+) ({'|'.join(PYTEST_STATUS)})\b", re.MULTILINE)
# pytest's closing line ("=== 6 passed, 2 skipped in 75.31s (0:01:15) ===", "=== no tests ran in 0.01s ==="): absent
# when its time box killed it, and then the tests after its last verbose line did not run
FINISHED_RE = re.compile(r"^=+ .* in \d+(\.\d+)?s\b.*=+\s*$", re.MULTILINE)
STAGES = {"env": "environment", "pytest": "pytest -m gpu", "numerics": "numerics: device vs CPU fp32",
          "train": "training through train.py", "timings": "timings (scripts/bench.py)"}


def pytest_lines(log: str) -> list[CheckLine]:
    """One line per entry of pytest's `-rA` short summary ("PASSED tests/x.py::name", "SKIPPED [2] x.py:3: why"),
    or, when pytest was killed before its summary, per `-v` result line ("tests/x.py::name PASSED [ 50%]")."""
    lines = []
    for text in log.splitlines():
        word, _, rest = text.partition(" ")
        if word in PYTEST_STATUS:
            test, _, note = rest.partition(" - ") if word != "SKIPPED" else rest.partition(": ")
            lines.append(CheckLine(test.strip(), PYTEST_STATUS[word], note=note.strip()[:200]))
    if not lines:
        lines = [CheckLine(test, PYTEST_STATUS[word], note="pytest cut short: no summary, no reasons")
                 for test, word in VERBOSE_RE.findall(log)]
    return lines


def stage_lines(folder: Path, key: str) -> tuple[list[CheckLine], dict] | None:
    """The lines and raw numbers of one stage, None when it wrote nothing."""
    if key == "pytest":
        path = folder / "pytest.log"
        if not path.exists():
            return None
        log = path.read_text()
        return pytest_lines(log), {"complete": bool(FINISHED_RE.search(log))}
    path = folder / f"{key}.json"
    return read_lines(path) if path.exists() else None


def report(folder: Path, dry_run: bool, stages: list[str] | None = None) -> tuple[str, bool]:
    """(markdown, whether everything passed) of `stages` (default: all)."""
    parts, counts, missing = [], Counter(), []
    for key, title in STAGES.items():
        if stages is not None and key not in stages:
            continue
        found = stage_lines(folder, key)
        lines, raw = found or ([], {})
        if not lines:
            missing.append(key)
            lines = [CheckLine(title, "FAIL", "no results", note="crashed or hit its time box: see check.log")]
        elif not raw.get("complete", True):
            missing.append(f"{key} (unfinished)")
            lines.append(CheckLine(f"{title}: the rest", "FAIL", "not finished",
                                   note="crashed or cut by its time box after the lines above: see check.log"))
        counts.update(line.status for line in lines)
        parts += [f"## {title}", "", markdown(lines), ""]
        for name, table in raw.get("tables", {}).items():
            parts += [f"## bench.py {name} section", "", table.strip(), ""]
    ok = counts["FAIL"] == 0
    head = [f"# GPU check{' (dry run on the CPU: tiny shapes, CUDA-only lines SKIP)' if dry_run else ''}", "",
            "**" + ("all checks passed" if ok else "some checks FAILED") + "**: " +
            ", ".join(f"{counts[s]} {s}" for s in STATUSES) +
            (f"; stages without results or cut short: {', '.join(missing)}" if missing else ""), ""]
    return "\n".join(head + parts), ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the check's output folder")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--stages", type=lambda s: s.split(","), help=f"comma-separated subset of {','.join(STAGES)}")
    args = p.parse_args(argv)
    unknown = set(args.stages or ()) - set(STAGES)
    if unknown:
        p.error(f"--stages: unknown {sorted(unknown)}; expected some of {list(STAGES)}")
    text, ok = report(Path(args.out), args.dry_run, args.stages)
    (Path(args.out) / "report.md").write_text(text)
    print(text.split("\n## ")[0])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
