"""The typed error hierarchy (STYLE.md rule 7).

Every failure cwbuild reports on purpose is a `CwbuildError`. The CLI's single top-level handler prints
`diagnostics()` (one line plus an optional hint) and exits with `exit_code`; tracebacks only with --debug.
Messages never carry secrets: callers name the file or the field, never its content.
"""

from __future__ import annotations


class CwbuildError(Exception):
    """Base class of every error cwbuild raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def diagnostics(self) -> str:
        """What the user sees: one line, then a hint line when there is one."""
        text = f"error: {self.message}"
        if self.hint:
            text += f"\nhint: {self.hint}"
        return text


class UsageError(CwbuildError):
    """The command line or a config file is wrong (exit 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration file (cwbuild.yaml, server.yaml, a policy) is malformed."""


class FormatError(CwbuildError):
    """Input bytes do not have the expected structure (firmware, LUKS header, report, quote, tar)."""


class ImageError(CwbuildError):
    """An image reference cannot be resolved or an image is inconsistent."""


class DigestMismatchError(ImageError):
    """A blob's content does not match its declared digest or size."""


class LayerError(ImageError):
    """A layer cannot be applied safely (escape attempts, refused hardlinks, missing parents)."""


class ToolError(CwbuildError):
    """An external program failed. Carries argv, exit code and the tail of stderr."""

    def __init__(
        self,
        message: str,
        *,
        argv: list[str] | None = None,
        returncode: int | None = None,
        stderr_tail: str = "",
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.argv = argv or []
        self.returncode = returncode
        self.stderr_tail = stderr_tail

    def diagnostics(self) -> str:
        text = super().diagnostics()
        if self.stderr_tail:
            text += "\n" + "\n".join("  | " + line for line in self.stderr_tail.splitlines())
        return text


class ToolNotFoundError(ToolError):
    """An external program is not installed."""


class SecretFileError(CwbuildError):
    """A secret file is missing, unreadable, too permissive, or malformed."""


class DiskError(CwbuildError):
    """Building, encrypting or decrypting a disk failed."""


class MeasurementError(CwbuildError):
    """A launch measurement cannot be computed from the given inputs."""


class EvidenceError(CwbuildError):
    """Attestation evidence is malformed or cannot be verified."""


class PolicyError(CwbuildError):
    """Evidence is authentic but violates the policy."""


class KitError(CwbuildError):
    """A boot kit cannot be fetched, verified or used."""


class NetworkError(CwbuildError):
    """A network peer (endpoint, archive, KDS) could not be reached or answered badly."""


class AttestError(CwbuildError):
    """The attestation endpoint refused a request or failed."""


class BuildError(CwbuildError):
    """A build step failed."""


class AttestRefused(AttestError):
    """The endpoint refused a request: `reason` is its stable id (DESIGN.md), `status` the HTTP status."""

    def __init__(self, reason: str, message: str, *, status: int = 403, hint: str | None = None) -> None:
        super().__init__(f"{reason}: {message}", hint=hint)
        self.reason = reason
        self.status = status
        self.detail = message
        self.audited = False
