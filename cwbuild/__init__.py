"""cwbuild: turn OCI container images into confidential workloads."""

__version__ = "0.1.0"
