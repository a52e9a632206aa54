"""Launch configs of a bundle: launch/qemu.sh, launch/libvirt.xml, launch/krun-sev.json (pure rendering)."""

from cwbuild.launch.qemu import qemu_args
from cwbuild.launch.render import check_krun_limits, launch_assumptions, render_launch
from cwbuild.launch.spec import SIM_PORT_NAME, LaunchSpec, Tee

__all__ = [
    "SIM_PORT_NAME",
    "LaunchSpec",
    "Tee",
    "check_krun_limits",
    "launch_assumptions",
    "qemu_args",
    "render_launch",
]
