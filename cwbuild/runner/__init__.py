"""`cwbuild run`: boot a bundle under QEMU (confidentially on SNP/TDX hosts, or with the simulated TEE)."""
