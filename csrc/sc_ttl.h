/*
 * sc_ttl.h - the TTL expiry check and the wall clock, in C.
 *
 * Flink's rule (TtlUtils.expired): a value last accessed at ts is expired at
 * now when ts + ttl <= now.  The sum is computed without signed overflow: a
 * timestamp so large that ts + ttl overflows is never expired.
 * A ttl of 0 means TTL is off and nothing ever expires.
 */
#ifndef SC_TTL_H
#define SC_TTL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* CLOCK_REALTIME_COARSE */
#endif
#include <time.h>

#include "sc_common.h"

SC_INLINE int sc_ttl_expired(int64_t ts, int64_t ttl, int64_t now) {
    if (ttl <= 0) return 0;
    if (ts > INT64_MAX - ttl) return 0;
    return ts + ttl <= now;
}

/**
 * Wall-clock milliseconds since the epoch, as Flink's processing time.
 *
 * Read from CLOCK_REALTIME_COARSE where available: about 5 ns a read (the
 * precise clock costs ~25 ns, read on every TTL state access), with the
 * kernel tick as resolution (1-4 ms), which is far below any useful TTL.
 * Pass a clock callable to the keyed backend for exact milliseconds.
 */
SC_INLINE int64_t sc_now_ms(void) {
    struct timespec ts;
#ifdef CLOCK_REALTIME_COARSE
    if (clock_gettime(CLOCK_REALTIME_COARSE, &ts) == 0) return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
#endif
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0) return 0; /* cannot fail for CLOCK_REALTIME */
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

#endif /* SC_TTL_H */
