"""cffi API-mode ("out-of-line") build of `cwbuild.disk._xts_c`: xts.py's per-sector loop, compiled.

setup.py hands `ffibuilder` to cffi (`cffi_modules`), so `pip install` (wheel or editable) compiles it; it
needs a C compiler and Python.h only. OpenSSL is NOT linked and no OpenSSL header is used: xts.py keeps
dlopen'ing the system libcrypto.so.3 in ABI mode and passes the addresses of `EVP_CipherInit_ex` and
`EVP_CipherUpdate` and of its keyed `EVP_CIPHER_CTX` as integers. The prototypes below are OpenSSL 3's
(openssl/evp.h), with the opaque context and cipher as `void *` (same representation and calling convention
on every ABI cwbuild runs on). The extension is optional: without a compiler the package still installs and
xts.py falls back to its Python loop over the same two calls.

Build by hand, from the repository root (writes the .c, .o and .so next to this file):
`python cwbuild/disk/_xts_build.py`.
"""

from __future__ import annotations

import cffi  # type: ignore[import-untyped]  # no stubs published

#: The C side of the interface, in cffi's cdef dialect (`...` = value taken from the C source).
CDEF = """
#define CWB_XTS_OK ...
#define CWB_XTS_E_NULL ...
#define CWB_XTS_E_SECTOR_SIZE ...
#define CWB_XTS_E_LENGTH ...
#define CWB_XTS_E_IV_STEP ...
#define CWB_XTS_E_IV_RANGE ...
#define CWB_XTS_E_OPENSSL ...
int cwb_xts_run(uintptr_t init_fn, uintptr_t update_fn, uintptr_t ctx, unsigned char *buf, size_t len,
                unsigned int sector_size, uint64_t first_iv, uint64_t iv_step, int plain64);
"""

SOURCE = r"""
#include <stddef.h>
#include <stdint.h>

#define CWB_XTS_OK 0
#define CWB_XTS_E_NULL 1         /* a function, the context or the buffer is NULL */
#define CWB_XTS_E_SECTOR_SIZE 2  /* not one of dm-crypt's 512, 1024, 2048, 4096 */
#define CWB_XTS_E_LENGTH 3       /* buffer not a whole number of sectors */
#define CWB_XTS_E_IV_STEP 4      /* neither 1 (iv_large_sectors) nor sector_size / 512 */
#define CWB_XTS_E_IV_RANGE 5     /* first_iv + count * iv_step > 2^64 */
#define CWB_XTS_E_OPENSSL 6      /* EVP_CipherInit_ex or EVP_CipherUpdate failed or wrote short */

/* OpenSSL 3 openssl/evp.h, EVP_CIPHER_CTX and EVP_CIPHER opaque. */
typedef int (*cwb_init_fn)(void *ctx, const void *cipher, void *impl, const unsigned char *key,
                           const unsigned char *iv, int enc);
typedef int (*cwb_update_fn)(void *ctx, unsigned char *out, int *outl, const unsigned char *in, int inl);

/* Transform buf (len bytes, whole sectors) in place with the keyed XTS context ctx. Sector k gets the
   IV of dm-crypt's plain64 (LE64 of first_iv + k * iv_step, then 8 zero bytes) or, if !plain64, plain
   (the same truncated to 32 bits). The IV is reset with EVP_CipherInit_ex(ctx, NULL, NULL, NULL, iv, -1),
   which keeps the key schedule (a documented use), then the sector is updated in place. */
int cwb_xts_run(uintptr_t init_fn, uintptr_t update_fn, uintptr_t ctx, unsigned char *buf, size_t len,
                unsigned int sector_size, uint64_t first_iv, uint64_t iv_step, int plain64)
{
    cwb_init_fn init = (cwb_init_fn)init_fn;
    cwb_update_fn update = (cwb_update_fn)update_fn;
    void *c = (void *)ctx;
    unsigned char iv[16] = {0};
    size_t count, k;
    int outl, j;

    if (init == NULL || update == NULL || c == NULL || (buf == NULL && len != 0))
        return CWB_XTS_E_NULL;
    if (sector_size != 512 && sector_size != 1024 && sector_size != 2048 && sector_size != 4096)
        return CWB_XTS_E_SECTOR_SIZE;
    if (len % sector_size != 0)
        return CWB_XTS_E_LENGTH;
    if (iv_step != 1 && iv_step != sector_size / 512)
        return CWB_XTS_E_IV_STEP;
    count = len / sector_size;
    /* first_iv + count * iv_step <= 2^64 (xts.py's _ivs), in 64-bit arithmetic that cannot wrap: the first
       test makes count * iv_step < 2^64, and for first_iv > 0, 2^64 - first_iv is 0 - first_iv. */
    if ((uint64_t)count > UINT64_MAX / iv_step)
        return CWB_XTS_E_IV_RANGE;
    if (first_iv != 0 && (uint64_t)count * iv_step > (uint64_t)0 - first_iv)
        return CWB_XTS_E_IV_RANGE;

    for (k = 0; k < count; k++) {
        uint64_t n = first_iv + (uint64_t)k * iv_step;  /* no wrap: checked above */
        unsigned char *p = buf + k * sector_size;
        if (!plain64)
            n &= 0xFFFFFFFFu;
        for (j = 0; j < 8; j++)
            iv[j] = (unsigned char)(n >> (8 * j));
        if (init(c, NULL, NULL, NULL, iv, -1) != 1)
            return CWB_XTS_E_OPENSSL;
        if (update(c, p, &outl, p, (int)sector_size) != 1 || outl != (int)sector_size)
            return CWB_XTS_E_OPENSSL;
    }
    return CWB_XTS_OK;
}
"""

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
# optional=True (setuptools Extension): a machine without a compiler or Python.h still installs the package.
ffibuilder.set_source("cwbuild.disk._xts_c", SOURCE, optional=True)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
