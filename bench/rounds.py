"""make bench's report over interleaved rounds: each row's median and range, its ratios to both bare models taken
round by round (so both sides of a ratio saw the same phase of a noisy host), the targets, and a plot."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.doors import GRPC
from bench.drive import format_errors

if TYPE_CHECKING:
    from bench.load import Row

BARE_TORCH, BARE_ONNX = "torch", "onnx"  # the bare rows' backends: (a) and (a')


@dataclass(frozen=True)
class Target:
    """A goal for a served backend against one bare model: p50 at most `p50_ms` over it at concurrency 1, or q/s at
    least `qps_ratio` times its q/s at `concurrency`."""

    backend: str
    against: str
    concurrency: int
    p50_ms: float | None = None
    qps_ratio: float | None = None


# The serving layer should cost (almost) nothing over the bare model a user would otherwise run.
TARGETS = (
    Target("onnx", BARE_ONNX, 1, p50_ms=1.5),
    Target("onnx", BARE_ONNX, 8, qps_ratio=1.0),
    Target("onnx", BARE_ONNX, 32, qps_ratio=1.0),
    Target("torch", BARE_TORCH, 1, p50_ms=1.5),
    Target("torch", BARE_TORCH, 32, qps_ratio=1.2),
)


@dataclass(frozen=True)
class Spread:
    """One value over rounds: its median and range."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values), len(values))

    def text(self, fmt: str = ".1f", sign: str = "", unit: str = "") -> str:
        """'12.3' for one round, '12.3 (11.0 to 13.1)' for several; `unit` follows the median."""
        shown = f"{self.median:{sign}{fmt}}{unit}"
        return shown if self.n == 1 else f"{shown} ({self.low:{sign}{fmt}} to {self.high:{sign}{fmt}})"


Key = tuple[str, str, str, int]  # model, label, backend, concurrency


def cells(rows: Iterable[Row]) -> dict[Key, list[Row]]:
    """The rows of each (model, label, backend, concurrency), one per round, in the order first measured."""
    grouped: dict[Key, list[Row]] = {}
    for row in rows:
        grouped.setdefault((row.model, row.label, row.backend, row.concurrency), []).append(row)
    return grouped


def versus(
    measured: Sequence[Row], rows: Sequence[Row], against: str, value: Callable[[Row, Row], float]
) -> Spread | None:
    """value(row, bare row of the same model and round) for each round that has both; None where none has."""
    bare = {(r.model, r.round): r for r in rows if r.bare and r.backend == against}
    values = [value(r, bare[(r.model, r.round)]) for r in measured if (r.model, r.round) in bare]
    return Spread.of(values) if values else None


def qps_ratio(row: Row, bare: Row) -> float:
    return row.qps / bare.qps


def p50_delta(row: Row, bare: Row) -> float:
    return row.p50 - bare.p50


def table(rows: Sequence[Row]) -> list[str]:
    lines = [
        "| model | row | concurrency | q/s | p50 ms | p99 ms | errors | q/s vs (a) | p50 vs (a), ms | q/s vs (a') "
        "| p50 vs (a'), ms |",
        "|---|---|--:|--:|--:|--:|---|--:|--:|--:|--:|",
    ]
    for (model, label, _, concurrency), measured in cells(rows).items():
        ratio_cells = []
        for against in (BARE_TORCH, BARE_ONNX):
            qps = versus(measured, rows, against, qps_ratio)
            p50 = versus(measured, rows, against, p50_delta) if concurrency == 1 else None
            ratio_cells += [qps.text(".2f", unit="x") if qps else "", p50.text(".1f", "+") if p50 else ""]
        errors = "" if measured[0].bare else format_errors(sum((r.errors for r in measured), Counter[str]()))
        qps, p50, p99 = (Spread.of([getattr(r, name) for r in measured]) for name in ("qps", "p50", "p99"))
        lines.append(
            f"| {model} | {label} | {concurrency} | {qps.text()} | {p50.text()} | {p99.text()} | {errors} | "
            + " | ".join(ratio_cells)
            + " |"
        )
    return lines


def targets(rows: Sequence[Row]) -> list[str]:
    """One line per target whose Answer rows were measured: the median over rounds, its range, met or not. (The other
    doors and the streams are held to the Answer row of their server instead: doors().)"""
    lines = []
    for target in TARGETS:
        for (model, label, backend, concurrency), measured in cells(rows).items():
            first = measured[0]
            if first.bare or first.door != GRPC or backend != target.backend or concurrency != target.concurrency:
                continue
            name = "(a')" if target.against == BARE_ONNX else "(a)"
            if target.p50_ms is not None:
                found = versus(measured, rows, target.against, p50_delta)
                goal, met = f"p50 at most +{target.p50_ms:g} ms over {name}", found and found.median <= target.p50_ms
                shown = found.text(".1f", "+", " ms") if found else "no baseline"
            else:
                assert target.qps_ratio is not None
                found = versus(measured, rows, target.against, qps_ratio)
                goal, met = f"at least {target.qps_ratio:g}x {name}'s q/s", found and found.median >= target.qps_ratio
                shown = found.text(".2f", unit="x") if found else "no baseline"
            verdict = "met" if met else "NOT met"
            lines.append(f"- {model}, {label} @ {concurrency}: {goal}: {shown}: {verdict}")
    return lines


def doors(rows: Sequence[Row]) -> list[str]:
    """One line per other door's row (HTTP JSON, V2 gRPC, the gRPC streams): against the qaserve.v1 gRPC Answer row
    of the same server, concurrency and round (p50 difference at concurrency 1, q/s ratio above)."""
    grpc_rows = {(r.model, r.backend, r.concurrency, r.round): r for r in rows if r.door == GRPC and not r.bare}
    lines = []
    for (model, _, backend, concurrency), measured in cells(rows).items():
        pairs = [(r, grpc_rows.get((r.model, r.backend, r.concurrency, r.round))) for r in measured]
        pairs = [(r, base) for r, base in pairs if base is not None and r.door != GRPC]
        if not pairs:
            continue
        if concurrency == 1:
            delta = Spread.of([r.p50 - base.p50 for r, base in pairs])
            compared = f"p50 {delta.text('.2f', '+', ' ms')} vs gRPC Answer"
        else:
            ratio = Spread.of([r.qps / base.qps for r, base in pairs])
            compared = f"{ratio.text('.2f', unit='x')} gRPC Answer's q/s"
        lines.append(f"- {model}, --backend {backend}, {pairs[0][0].door} @ {concurrency}: {compared}")
    return lines


def write_plot(rows: Sequence[Row], path: Path, title: str) -> None:
    """q/s and p99 against concurrency for each served row (median, bars over the rounds' range), the bare models
    as dashed lines (they answer one question at a time)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot

    figure, (throughput, latency) = pyplot.subplots(1, 2, figsize=(12, 5))
    served: dict[tuple[str, str], list[tuple[int, Spread, Spread]]] = {}
    for (model, label, _, concurrency), measured in cells(rows).items():
        qps, p99 = Spread.of([r.qps for r in measured]), Spread.of([r.p99 for r in measured])
        if measured[0].bare:
            line = throughput.axhline(qps.median, linestyle="--", linewidth=1, label=f"{model}: {label}")
            latency.axhline(p99.median, linestyle="--", linewidth=1, color=line.get_color())
        else:
            served.setdefault((model, label), []).append((concurrency, qps, p99))
    for (model, label), points in served.items():
        points.sort(key=lambda point: point[0])
        x = [c for c, _, _ in points]
        for axes, spreads in ((throughput, [q for _, q, _ in points]), (latency, [p for _, _, p in points])):
            medians = [s.median for s in spreads]
            bars = [[s.median - s.low for s in spreads], [s.high - s.median for s in spreads]]
            axes.errorbar(x, medians, yerr=bars, marker="o", capsize=3, label=f"{model}: {label}")
    for axes, name in ((throughput, "answers per second"), (latency, "p99 latency, ms")):
        axes.set_xscale("log", base=2)
        axes.set_xlabel("concurrency (closed loop)")
        axes.set_ylabel(name)
        axes.grid(True, which="both", alpha=0.3)
    latency.set_yscale("log")
    throughput.legend(fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
