"""Figures → summary rows, the printed table and the JSON document."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .tools import Result

MIB = 1024**2


@dataclass
class Series:
    """All runs of one tool on one data set (warm-up kept apart)."""

    tool: str
    dataset: str
    nbytes: int
    files: int
    runs: list[Result] = field(default_factory=list)
    warmup: list[Result] = field(default_factory=list)

    @property
    def seconds(self) -> list[float]:
        return [r.measured.seconds for r in self.runs]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def median_cpu(self) -> float:
        """Median CPU seconds (user and system) of the tool's process and its children."""
        return statistics.median(r.measured.cpu for r in self.runs)

    @property
    def spread(self) -> float:
        """(max - min) / median."""
        s = self.seconds
        return (max(s) - min(s)) / self.median if len(s) > 1 and self.median else 0.0

    @property
    def peak_rss(self) -> int:
        return max(r.measured.max_rss for r in [*self.runs, *self.warmup])

    def summary(self) -> dict[str, Any]:
        med = self.median
        return {
            "tool": self.tool, "dataset": self.dataset, "bytes": self.nbytes, "files": self.files,
            "median_seconds": round(med, 3), "spread": round(self.spread, 3),
            "min_seconds": round(min(self.seconds), 3), "max_seconds": round(max(self.seconds), 3),
            "gb_per_s": round(self.nbytes / med / 1e9, 4) if med else None,
            "files_per_s": round(self.files / med, 1) if med else None,
            "peak_rss_bytes": self.peak_rss,
            "median_cpu_seconds": round(self.median_cpu, 3),
            "median_server_cpu_seconds": _median_or_none([r.measured.server_cpu for r in self.runs]),
            "runs": [_run(r) for r in self.runs],
            "warmup": [_run(r) for r in self.warmup],
        }


def _median_or_none(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return round(statistics.median(got), 3) if got else None


def _run(r: Result) -> dict[str, Any]:
    m = r.measured
    return {
        "seconds": round(m.seconds, 3), "peak_rss_bytes": m.max_rss, "cpu_user": round(m.cpu_user, 3),
        "cpu_sys": round(m.cpu_sys, 3),
        "server_cpu": None if m.server_cpu is None else round(m.server_cpu, 3), **r.info,
    }


@dataclass
class Ratio:
    name: str
    value: float
    target: float | None
    """None: reported, not a target."""
    aim: float | None = None
    higher_is_better: bool = True
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        if self.target is None:
            return True
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    def mark(self) -> str:
        if self.target is None:
            return f"{self.value:.2f} (info, no target)"
        cmp = "≥" if self.higher_is_better else "≤"
        aim = f", aim {self.aim:g}" if self.aim else ""
        return f"{self.value:.2f} ({cmp} {self.target:g}{aim}) {'PASS' if self.ok else 'FAIL'}"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": round(self.value, 4), "target": self.target, "aim": self.aim,
                "higher_is_better": self.higher_is_better, "ok": self.ok, "detail": self.detail, **self.extra}


def _rate(s: Series) -> str:
    if s.files and s.nbytes / s.files < 256 * 1024:
        return f"{s.files / s.median:,.0f} files/s"
    return f"{s.nbytes / s.median / 1e9:.3f} GB/s"


def table(series: list[Series], ratios: dict[str, Ratio], ratio_of: dict[str, str]) -> str:
    """One row per series; the ratio column on the row of the measured tool (``ratio_of``:
    series key → ratio name)."""
    head = ("tool", "data set", "median s", "spread", "min-max s", "rate", "peak RSS", "CPU s", "ratio vs target")
    rows = [head]
    for s in series:
        key = f"{s.tool}|{s.dataset}"
        r = ratios.get(ratio_of.get(key, ""))
        rows.append((
            s.tool, s.dataset, f"{s.median:.2f}", f"{s.spread * 100:.0f} %",
            f"{min(s.seconds):.2f}-{max(s.seconds):.2f}", _rate(s), f"{s.peak_rss / MIB:.0f} MiB",
            f"{s.median_cpu:.1f}", r.mark() if r else "",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def ratio_lines(ratios: dict[str, Ratio]) -> str:
    width = max((len(r.name) for r in ratios.values()), default=0)
    return "\n".join(f"{r.name:<{width}} {r.mark():<32} {r.detail}" for r in ratios.values())


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
