"""The workload disk: reproducible ext4 (`fs.make_filesystem`), LUKS2/LUKS1 written and read in userspace
(`luks.encrypt_image`, `luks.read_header`, `luks.unlock`, `luks.decrypt_image`), the krun footer (`footer`),
and AES-XTS at OpenSSL speed (`xts`). No root, no device-mapper, no loop devices."""
