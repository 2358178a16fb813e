/*
 * sc_hash.h - stable hashes of serialized key bytes.
 *
 * sc_murmur3_32 is MurmurHash3_x86_32 (Austin Appleby, public domain),
 * written here so that key-group assignment is identical in every process,
 * on every platform and for every PYTHONHASHSEED: it reads the input byte by
 * byte in little-endian order, never as native words.
 *
 * sc_key_group applies Flink's KeyGroupRangeAssignment on top of it:
 *   key_group = MathUtils.murmurHash(murmur3_32(bytes)) % max_parallelism
 * where MathUtils.murmurHash is Flink's int mixing function (sc_flink_murmur).
 *
 * sc_hash64 is the (non-stable across versions, but deterministic) hash used
 * inside the in-memory tables; it is never persisted.
 *
 * All functions are pure, thread-safe and allocation-free.
 */
#ifndef SC_HASH_H
#define SC_HASH_H

#include "sc_common.h"

/** MurmurHash3_x86_32 of len bytes at data with the given seed. */
uint32_t sc_murmur3_32(const void *data, size_t len, uint32_t seed);

/** Flink's MathUtils.murmurHash(int): a non-negative int32 (as int32_t). */
int32_t sc_flink_murmur(int32_t code);

/** Flink's key-group assignment of serialized key bytes; max_parallelism >= 1. */
SC_INLINE int32_t sc_key_group(const void *key, size_t len, int32_t max_parallelism) {
    return sc_flink_murmur((int32_t)sc_murmur3_32(key, len, 0)) % max_parallelism;
}

/** Fast 64-bit hash for the in-memory tables (word-at-a-time, fmix64 finish). */
uint64_t sc_hash64(const void *data, size_t len);

#endif /* SC_HASH_H */
