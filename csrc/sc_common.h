/*
 * sc_common.h - shared macros and the status type of statecore's C core.
 *
 * The C core never includes Python.h: it is plain C11 so that it can be
 * unit-tested, fuzzed and sanitised on its own, and so that every function
 * here may run with the GIL released.  Errors are reported as sc_status
 * values; the Cython layer (statecore/_status.pxd) turns them into Python
 * exceptions in exactly one place.
 */
#ifndef SC_COMMON_H
#define SC_COMMON_H

#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__) || defined(__clang__)
#define SC_LIKELY(x)   __builtin_expect(!!(x), 1)
#define SC_UNLIKELY(x) __builtin_expect(!!(x), 0)
#define SC_INLINE      static inline __attribute__((always_inline))
#define SC_NOINLINE    __attribute__((noinline))
#define SC_PREFETCH(p) __builtin_prefetch((p))
#else
#define SC_LIKELY(x)   (x)
#define SC_UNLIKELY(x) (x)
#define SC_INLINE      static inline
#define SC_NOINLINE
#define SC_PREFETCH(p) ((void)(p))
#endif

/** Result of every fallible C-core call.  Negative values are errors. */
typedef enum sc_status {
    SC_OK = 0,          /**< success */
    SC_NOTFOUND = 1,    /**< lookup miss (not an error) */
    SC_ENOMEM = -1,     /**< an allocation failed; the structure is unchanged */
    SC_ECORRUPT = -2,   /**< malformed input bytes (decoding) */
    SC_ETOOBIG = -3     /**< a size does not fit the format (> 4 GiB value, ...) */
} sc_status;

#endif /* SC_COMMON_H */
