"""Result lines of the GPU check (scripts/gpu_check.sh): what was measured, against which target, with what outcome.

Each stage prints its lines as it goes and rewrites its JSON file after each step, marked complete at the end, so a
stage cut by its time box keeps what it finished; scripts/gpu_report.py gathers the files into the report. A line
is PASS or FAIL against a target stated before the run, SKIP (it could not run here; the note says why) or INFO (a
number without a target).
"""
import json
import math
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from scripts.markdown import markdown_table

STATUSES = ("PASS", "FAIL", "SKIP", "INFO")


@dataclass
class CheckLine:
    """One checked quantity: `check` names it, `value` and `target` are formatted for reading."""

    check: str
    status: str
    value: str = ""
    target: str = ""
    note: str = ""

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r}: expected one of {STATUSES}")

    def text(self) -> str:
        target = f" (target {self.target})" if self.target else ""
        note = f" [{self.note}]" if self.note else ""
        return f"{self.status} {self.check}: {self.value}{target}{note}"


def within(check: str, value: float, limit: float | None, at_least: bool = False, fmt: str = ".2e",
           note: str = "") -> CheckLine:
    """PASS when `value` <= `limit` (>= with `at_least`; NaN fails), INFO when `limit` is None."""
    shown = format(value, fmt)
    if limit is None:
        return CheckLine(check, "INFO", shown, note=note)
    ok = value >= limit if at_least else value <= limit  # False for NaN
    target = f"{'>=' if at_least else '<='} {format(limit, fmt)}"
    return CheckLine(check, "PASS" if ok and not math.isnan(value) else "FAIL", shown, target, note)


def largest_error(errors: dict[str, float]) -> tuple[str, float]:
    """The name and value of the largest of `errors`, a NaN larger than any number (Python's max() keeps whichever
    of a NaN and a number it meets first: a NaN loss after a finite one passed)."""
    name = max(errors, key=lambda k: math.inf if math.isnan(errors[k]) else errors[k])
    return name, errors[name]


def failure(check: str, err: Exception) -> CheckLine:
    """A FAIL line for `err`, its whole traceback printed to stdout first (into check.log: Triton puts its message
    after the kernel source, which the line's note cuts)."""
    print(f"--- {check} failed:", flush=True)
    traceback.print_exc(file=sys.stdout)
    return CheckLine(check, "FAIL", note=f"{type(err).__name__}: {str(err)[-300:]}")


def write_lines(path: str | Path, lines: list[CheckLine], complete: bool = True, **extra) -> None:
    """The stage's lines (and any `extra` raw numbers) as JSON; `complete=False` while the stage goes on. The file
    is replaced whole (written beside it, then renamed), so a stage killed mid-write leaves the previous one."""
    path = Path(path)
    partial = path.with_name(path.name + ".part")
    partial.write_text(json.dumps({"lines": [asdict(line) for line in lines], "complete": complete, **extra},
                                  indent=1) + "\n")
    partial.replace(path)


def read_lines(path: str | Path) -> tuple[list[CheckLine], dict]:
    """(lines, the other keys, "complete" among them) of a file written by `write_lines`."""
    data = json.loads(Path(path).read_text())
    return [CheckLine(**line) for line in data.pop("lines")], data


def any_failed(lines: list[CheckLine]) -> bool:
    return any(line.status == "FAIL" for line in lines)


def markdown(lines: list[CheckLine]) -> str:
    """The lines as a markdown table."""
    return markdown_table(["status", "check", "value", "target", "note"],
                          [[ln.status, ln.check, ln.value, ln.target, ln.note.replace("|", "/")] for ln in lines])
