"""Expected launch measurements (pure: bytes and paths in, values out; STYLE.md rule 6).

Entry point for the CLI and the build: `measure(MeasureSpec(...)) -> MeasureResult`. `MeasureResult.to_json()`
is the measurement.json document; `bundle.dumps` gives its canonical text, `bundle.check_bundle` re-checks it.
"""

from cwbuild.measure.api import (
    Blob,
    KrunSpecOptions,
    MeasureResult,
    MeasureSpec,
    SevOptions,
    Target,
    TdxOptions,
    Tee,
    TeeResult,
    measure,
)

__all__ = [
    "Blob",
    "KrunSpecOptions",
    "MeasureResult",
    "MeasureSpec",
    "SevOptions",
    "Target",
    "TdxOptions",
    "Tee",
    "TeeResult",
    "measure",
]
