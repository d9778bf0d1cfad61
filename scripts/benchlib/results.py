"""Measurements, rows and the final table of the bench, with honest lower bounds.

A `Measurement` holds the run times of one subject on one piece of work. A run stopped at its
cap counts as the cap, a lower bound of the real time; the runner stops a subject after such a
run, so capped runs are always its slowest. When the median falls on a capped run it is
printed as "> 120.000" s, the rate as "< x MB/s", and a ratio as "< x" (subject capped) or
"> x" (reference capped); a goal is then "no" or "yes" only when the bound decides it, else
"unknown". `Report` prints each row as it is made and keeps them for the table.

Not a statistics package: medians only, no confidence intervals (BENCH.md asks for ratios of
medians over ≥ 3 interleaved runs in one run of the bench).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from .util import say


@dataclass
class Measurement:
    """The runs of one subject on one piece of work (`amount` bytes, files or reads)."""

    label: str
    amount: float = 0.0
    unit: str = "MB/s"
    times: list[float] = field(default_factory=list)
    capped: int = 0  # how many of `times` are caps (lower bounds); they are the last ones
    error: str | None = None
    note: str = ""
    skipped: bool = False  # not run on purpose (peer missing, --quick): no comparison row against it
    fewer: str = ""  # why fewer runs than asked, if so
    checks: list[str] = field(default_factory=list)  # what was verified, one entry per kind

    def check(self, what: str) -> None:
        if what not in self.checks:
            self.checks.append(what)

    def bound(self) -> tuple[float | None, bool]:
        """(median, True if the median is only a lower bound because capped runs reach it)."""
        if self.error is not None or not self.times:
            return None, False
        n, k = len(self.times), self.capped
        med = statistics.median(self.times)
        # the k capped runs are the slowest: the median uses one iff it reaches into the top k
        lower = k > 0 and (n - k <= (n - 1) // 2 if n % 2 else n - k <= n // 2)
        return med, lower

    @property
    def median(self) -> float | None:
        return self.bound()[0]

    def rate_value(self) -> float | None:
        m = self.median
        return self.amount / m if m and self.amount > 0 else None

    def rate(self) -> str:
        r = self.rate_value()
        if r is None:
            return "-"
        lt = "< " if self.bound()[1] else ""
        if self.unit == "MB/s":
            return f"{lt}{r / 1e6:,.0f} MB/s"
        return f"{lt}{r:,.0f} {self.unit}"

    def seconds(self) -> str:
        m, lower = self.bound()
        if m is None:
            return "-"
        return f"> {m:.3f}" if lower else f"{m:.3f}"

    def runs_note(self) -> str:
        n = len(self.times)
        s = f"{n} run{'s' if n != 1 else ''}"
        if self.capped:
            s += f" ({self.capped} stopped at the cap)"
        if self.fewer:
            s += f"; fewer runs: {self.fewer}"
        return s


@dataclass
class Row:
    name: str
    seconds: str = "-"
    rate: str = "-"
    ratio: str = "-"
    goal: str = "report"
    met: str = "-"
    note: str = ""


def compare(subject: Measurement, ref: Measurement, goal: float | None) -> tuple[str, str]:
    """(ratio text, met) of subject rate / reference rate, honest about bounds."""
    s, s_low = subject.bound()
    r, r_low = ref.bound()
    if s is None or r is None or s <= 0 or r <= 0 or ref.amount <= 0 or subject.amount <= 0:
        if subject.error is None and ref.error is not None:
            return f"n/a ({ref.label} failed)", "-"
        return "-", "-"
    x = (subject.amount / s) / (ref.amount / r)  # rates: the amounts may differ (a prefix of big)
    if s_low and r_low:
        return f"? ({subject.label} and {ref.label} capped)", "unknown" if goal is not None else "-"
    if s_low:
        text, met = f"< {x:.2f}× {ref.label}", ("no" if x <= (goal or 0) else "unknown")
    elif r_low:
        text, met = f"> {x:.2f}× {ref.label}", ("yes" if x >= (goal or 0) else "unknown")
    else:
        text, met = f"{x:.2f}× {ref.label}", ("yes" if goal is not None and x >= goal else "no")
    return text, met if goal is not None else "-"


class Report:
    """The rows of one bench run: printed as they come, kept for the final table."""

    def __init__(self) -> None:
        self.rows: list[Row] = []

    def emit(self, row: Row) -> None:
        self.rows.append(row)
        parts = [f"{row.seconds} s" if row.seconds != "-" else "", row.rate if row.rate != "-" else ""]
        parts += [row.ratio if row.ratio != "-" else "", f"goal {row.goal}" if row.goal else ""]
        parts += [f"met: {row.met}" if row.met not in ("", "-") else ""]
        shown = ", ".join(p for p in parts if p)
        say(f"{row.name}: {shown}" + (f"  [{row.note}]" if row.note else ""))

    def report(self, name: str, subject: Measurement, refs: list[tuple[Measurement, float | None]]) -> None:
        """Rows for the references (as measured) and one row per comparison of `subject` with one of them."""
        for ref, _ in refs:
            self.emit(row_of(f"{name}: {ref.label}", ref, ratio="(reference)", goal="", met=""))
        if all(ref.skipped for ref, _ in refs):
            self.emit(row_of(f"{name}: {subject.label}", subject))
        for ref, goal in refs:
            if ref.skipped:
                continue
            ratio, met = compare(subject, ref, goal)
            goal_s = f"≥ {goal:g}× {ref.label}" if goal is not None else "report"
            self.emit(row_of(f"{name}: {subject.label}", subject, ratio=ratio, goal=goal_s, met=met))


def row_of(name: str, m: Measurement, ratio: str = "-", goal: str = "report", met: str = "-") -> Row:
    if m.error is not None:
        what = "skipped" if m.skipped else "FAILED"
        note = f"{what}: {m.error}"
        if m.times:
            note += f" (after {len(m.times)} runs)"
        return Row(name, ratio=ratio if ratio != "(reference)" else "-", goal=goal, met=met, note=note)
    parts = [m.runs_note()]
    if m.checks:
        parts.append("verified: " + ", ".join(m.checks))
    if m.note:
        parts.append(m.note)
    return Row(name, seconds=m.seconds(), rate=m.rate(), ratio=ratio, goal=goal, met=met, note="; ".join(parts))


COLUMNS = (("row", "name"), ("median s", "seconds"), ("rate", "rate"), ("ratio", "ratio"), ("goal", "goal"))


def format_table(rows: list[Row]) -> str:
    heads = [h for h, _ in COLUMNS] + ["met", "note"]
    cells = [[getattr(r, a) for _, a in COLUMNS] + [r.met, r.note] for r in rows]
    widths = [max([len(heads[i])] + [len(c[i]) for c in cells]) for i in range(len(heads) - 1)]
    right = {1, 2}

    def line(vals: list[str]) -> str:
        out = []
        for i, v in enumerate(vals[:-1]):
            out.append(v.rjust(widths[i]) if i in right else v.ljust(widths[i]))
        out.append(vals[-1])
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths) + "  ----"
    return "\n".join([line(heads), sep, *(line(c) for c in cells)])
