"""Prometheus metrics in the text exposition format (version 0.0.4), without a client library.

Counters of decisions by event, outcome and reason, a latency histogram per route, and a few gauges read at
scrape time. Label values are our own ids (never request data), so the label set stays bounded.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable

#: Histogram buckets in seconds (Prometheus convention: upper bounds, plus +Inf).
BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    body = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in pairs
    )
    return "{" + body + "}"


class Metrics:
    """Thread-safe counters and histograms."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._decisions: dict[tuple[tuple[str, str], ...], int] = {}
        self._hist: dict[str, list[float]] = {}
        self._hist_sum: dict[str, float] = {}
        self._gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def decision(self, event: str, outcome: str, reason: str) -> None:
        key = (("event", event), ("outcome", outcome), ("reason", reason))
        with self._lock:
            self._decisions[key] = self._decisions.get(key, 0) + 1

    def observe(self, route: str, seconds: float) -> None:
        with self._lock:
            counts = self._hist.setdefault(route, [0.0] * (len(BUCKETS) + 1))
            counts[bisect.bisect_left(BUCKETS, seconds)] += 1
            self._hist_sum[route] = self._hist_sum.get(route, 0.0) + seconds

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self._gauges[name] = (help_text, read)

    def render(self) -> str:
        lines = [
            "# HELP cwbuild_decisions_total Decisions taken by the attestation endpoint.",
            "# TYPE cwbuild_decisions_total counter",
        ]
        with self._lock:
            decisions = sorted(self._decisions.items())
            hist = {k: list(v) for k, v in self._hist.items()}
            sums = dict(self._hist_sum)
        lines += [f"cwbuild_decisions_total{_labels(k)} {v}" for k, v in decisions]
        lines += [
            "# HELP cwbuild_request_seconds Request latency by route.",
            "# TYPE cwbuild_request_seconds histogram",
        ]
        for route, counts in sorted(hist.items()):
            total = 0.0
            for bound, count in zip((*map(str, BUCKETS), "+Inf"), counts, strict=True):
                total += count
                lines.append(
                    f"cwbuild_request_seconds_bucket{_labels((('route', route), ('le', bound)))} {total:g}"
                )
            lines.append(f"cwbuild_request_seconds_sum{_labels((('route', route),))} {sums[route]:.6f}")
            lines.append(f"cwbuild_request_seconds_count{_labels((('route', route),))} {total:g}")
        for name, (help_text, read) in sorted(self._gauges.items()):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {read():g}"]
        return "\n".join(lines) + "\n"
