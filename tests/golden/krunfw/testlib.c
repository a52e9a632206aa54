/*
 * A stand-in for libkrunfw-sev with small, known payloads, written for cwbuild's known-answer tests.
 *
 * It exports what libkrunfw's utils/krunfw_measurement.c (containers/libkrunfw @ e0647fa) loads: the three
 * getters, with krunfw_get_kernel in the two-argument form that tool declares (the real ABI >= 4 takes
 * load_addr, entry_addr, size; see spec measurement.md §2.2). The bundles follow bin2cbundle.py's shape:
 * global char arrays padded to a multiple of 64 KiB plus the string literal's NUL, sizes reported as
 * sizeof - 1. Every array is mostly zero with a few marker bytes so that every page is distinguishable.
 *
 * Build: cc -shared -fPIC -O2 -o libkrunfw-test.so testlib.c
 */
#include <stddef.h>

#define KIB64 65536

__attribute__((aligned(KIB64))) char QBOOT_BUNDLE[KIB64 + 1] = {
    'Q', 'B', 'O', 'O', 'T', [4096] = 0x11, [32768] = 0x22, [KIB64 - 16] = 0xea, [KIB64 - 1] = 0x5a,
};

__attribute__((aligned(KIB64))) char KERNEL_BUNDLE[2 * KIB64 + 1] = {
    'K', 'E', 'R', 'N', 'E', 'L', [4096] = 0x01, [8191] = 0x02, [65536] = 0x03, [2 * KIB64 - 1] = 0x04,
};

__attribute__((aligned(KIB64))) char INITRD_BUNDLE[KIB64 + 1] = {
    0x1f, (char)0x8b, 0x08, [12288] = 0x7e, [KIB64 - 1] = 0x33,
};

char *krunfw_get_qboot(size_t *size)
{
    *size = sizeof(QBOOT_BUNDLE) - 1;
    return &QBOOT_BUNDLE[0];
}

char *krunfw_get_kernel(size_t *load_addr, size_t *size)
{
    *load_addr = 0x1000000;
    *size = sizeof(KERNEL_BUNDLE) - 1;
    return &KERNEL_BUNDLE[0];
}

char *krunfw_get_initrd(size_t *size)
{
    *size = sizeof(INITRD_BUNDLE) - 1;
    return &INITRD_BUNDLE[0];
}

int krunfw_get_version(void)
{
    return 4;
}
