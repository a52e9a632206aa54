"""Starting the endpoint: the resolved configuration (flags over `server.yaml`), checks, and uvicorn.

Refuses to start without a master key and an admin token, and refuses plain HTTP on anything but a
loopback address unless `--insecure-http`. The listening socket is bound here (port 0 picks a free port)
and the real address is printed, so tests and scripts need no port guessing.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from cwbuild.attest.api import Limits, Service
from cwbuild.attest.audit import Audit
from cwbuild.attest.certsource import CertOptions, CertSource
from cwbuild.attest.collateral import Collateral
from cwbuild.attest.evidence_gate import INSECURE_SIM_WARNING, EvidenceGate
from cwbuild.attest.kbs_compat import DEFAULT_ALLOW, KbsCompat, parse_networks
from cwbuild.attest.metrics import Metrics
from cwbuild.attest.pcs_source import CollateralSource, PcsOptions
from cwbuild.attest.ratelimit import Rate, RateLimiter
from cwbuild.attest.server import DEFAULT_MAX_BODY, ServerOptions, create_app
from cwbuild.attest.sim import load_sim_public_key
from cwbuild.attest.store import open_store
from cwbuild.errors import ConfigError, FormatError, UsageError
from cwbuild.secrets import read_master_key_file, read_token_file

log = logging.getLogger("cwbuild.serve")


@dataclass(frozen=True)
class ServeConfig:
    """Everything `cwbuild serve` needs; field names are the server.yaml keys (flags use dashes)."""

    listen: str = "127.0.0.1:8080"
    db: str = "cwbuild-attest.db"
    admin_token_file: str | None = None
    master_key_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    insecure_http: bool = False
    kbs_compat: bool = False
    kbs_compat_allow: tuple[str, ...] = DEFAULT_ALLOW
    insecure_sim_trust: str | None = None
    cert_cache: str | None = None
    offline: bool = False
    audit_log: str | None = None
    nonce_ttl: float = 60.0
    max_pending: int = 10000
    max_pending_per_client: int = 64
    rate_per_second: float = 20.0
    rate_burst: int = 40
    max_body: int = DEFAULT_MAX_BODY
    default_policy: Mapping[str, Any] = field(default_factory=dict)
    access_log: bool = False
    tdx_collateral: str | None = None
    max_connections: int = 1000


def load_config(path: Path | None, overrides: Mapping[str, Any]) -> ServeConfig:
    """server.yaml (if any) with the flags that were given on top; unknown keys are refused."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping")
        data.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
    data.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(ServeConfig)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown server configuration keys: {', '.join(sorted(unknown))}")
    if "kbs_compat_allow" in data:
        data["kbs_compat_allow"] = tuple(data["kbs_compat_allow"])
    config = ServeConfig(**data)
    if not 1 <= config.nonce_ttl <= 600:
        raise ConfigError("nonce_ttl must be 1..600 seconds")
    return config


def split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--listen must be HOST:PORT, got {listen!r}")
    return host, int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _secret_paths(config: ServeConfig) -> tuple[str, str]:
    if config.master_key_file is None:
        raise UsageError(
            "refusing to start without a master key", hint="pass --master-key-file (32 bytes or 64 hex)"
        )
    if config.admin_token_file is None:
        raise UsageError("refusing to start without an admin token", hint="pass --admin-token-file")
    return config.master_key_file, config.admin_token_file


def _check(config: ServeConfig, host: str) -> None:
    _secret_paths(config)
    if (config.tls_cert is None) != (config.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    if config.tls_cert is None and not _is_loopback(host) and not config.insecure_http:
        raise UsageError(
            f"refusing plain HTTP on non-loopback address {host}",
            hint="pass --tls-cert/--tls-key, or --insecure-http if TLS is terminated in front",
        )


def load_collateral(path: str | None) -> Collateral | None:
    """TDX collateral (TCB info, QE identity, CRLs) from a file: the offline bundle of spec §3.7."""
    if path is None:
        return None
    try:
        return Collateral.from_json(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigError(f"tdx_collateral {path}: {exc.strerror}") from None
    except FormatError as exc:
        raise ConfigError(f"tdx_collateral {path}: {exc.message}") from None


def build(config: ServeConfig) -> tuple[Any, Service]:
    """The ASGI app and its service, from a checked configuration."""
    master_key_path, token_path = _secret_paths(config)
    master_key = read_master_key_file(master_key_path)
    token = read_token_file(token_path)
    sim_key = None
    if config.insecure_sim_trust is not None:
        try:
            sim_key = load_sim_public_key(Path(config.insecure_sim_trust).read_bytes())
        except OSError as exc:
            raise ConfigError(f"--insecure-sim-trust {config.insecure_sim_trust}: {exc.strerror}") from None
        except FormatError as exc:
            raise ConfigError(f"--insecure-sim-trust: {exc.message}") from None
        log.warning("%s (key from %s)", INSECURE_SIM_WARNING, config.insecure_sim_trust)
    collateral = CollateralSource(
        PcsOptions(fixed=load_collateral(config.tdx_collateral), offline=config.offline)
    )
    certs = CertSource(
        CertOptions(cache_dir=Path(config.cert_cache) if config.cert_cache else None, offline=config.offline)
    )
    service = Service(
        store=open_store(config.db),
        master_key=master_key,
        audit=Audit(Path(config.audit_log) if config.audit_log else None),
        metrics=Metrics(),
        gate=EvidenceGate(certs=certs, sim_key=sim_key, collateral=collateral),
        limits=Limits(config.nonce_ttl, config.max_pending, config.max_pending_per_client),
        default_policy=config.default_policy,
    )
    service.metrics.gauge("cwbuild_workloads", "Registered workloads.", service.store.count_workloads)
    rate = Rate(config.rate_per_second, config.rate_burst)
    options = ServerOptions(
        admin_token=token,
        guest_limiter=RateLimiter(rate),
        admin_limiter=RateLimiter(Rate(1.0, 10)),
        max_body=config.max_body,
    )
    app = create_app(service, options)
    if config.kbs_compat:
        kbs = KbsCompat(service, allow=parse_networks(config.kbs_compat_allow), limiter=RateLimiter(rate))
        app.include_router(kbs.router())
    return app, service


def plain_logging() -> None:
    """A daemon logs plain timestamped lines (journald, files); the CLI's rich handler costs ~1 ms a line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().handlers[:] = [handler]


def serve(config: ServeConfig) -> None:
    """Run until SIGINT/SIGTERM."""
    import uvicorn  # noqa: PLC0415 - only the server needs it

    plain_logging()
    os.umask(0o077)  # the database, its WAL and the cert cache are private to the service user
    host, port = split_listen(config.listen)
    _check(config, host)
    app, service = build(config)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=1024)
    except OSError as exc:
        raise UsageError(f"cannot listen on {config.listen}: {exc.strerror}") from None
    scheme = "https" if config.tls_cert else "http"
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"cwbuild serve: listening on {scheme}://{shown}:{bound}", file=sys.stderr, flush=True)
    uv_config = uvicorn.Config(
        app,
        log_config=None,
        access_log=config.access_log,
        ssl_certfile=config.tls_cert,
        ssl_keyfile=config.tls_key,
        timeout_keep_alive=5,
        limit_concurrency=config.max_connections,  # beyond this uvicorn answers 503 instead of queueing
        server_header=False,
    )
    try:
        uvicorn.Server(uv_config).run(sockets=[sock])
    finally:
        sock.close()
        service.audit.close()
        service.store.close()
