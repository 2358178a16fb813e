/* sc_hash.c - see sc_hash.h. */
#include "sc_hash.h"

#include <string.h>

static inline uint32_t rotl32(uint32_t x, int r) { return (x << r) | (x >> (32 - r)); }
static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint32_t fmix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x85ebca6bU;
    h ^= h >> 13;
    h *= 0xc2b2ae35U;
    h ^= h >> 16;
    return h;
}

static inline uint64_t fmix64(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ULL;
    k ^= k >> 33;
    return k;
}

/* Explicit little-endian loads keep the hash identical on big-endian hosts. */
static inline uint32_t load_le32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

uint32_t sc_murmur3_32(const void *data, size_t len, uint32_t seed) {
    const uint8_t *p = (const uint8_t *)data;
    const size_t nblocks = len / 4;
    const uint32_t c1 = 0xcc9e2d51U, c2 = 0x1b873593U;
    uint32_t h1 = seed;

    for (size_t i = 0; i < nblocks; i++) {
        uint32_t k1 = load_le32(p + 4 * i);
        k1 *= c1;
        k1 = rotl32(k1, 15);
        k1 *= c2;
        h1 ^= k1;
        h1 = rotl32(h1, 13);
        h1 = h1 * 5 + 0xe6546b64U;
    }
    const uint8_t *tail = p + nblocks * 4;
    uint32_t k1 = 0;
    switch (len & 3) {
    case 3: k1 ^= (uint32_t)tail[2] << 16; /* fall through */
    case 2: k1 ^= (uint32_t)tail[1] << 8;  /* fall through */
    case 1:
        k1 ^= tail[0];
        k1 *= c1;
        k1 = rotl32(k1, 15);
        k1 *= c2;
        h1 ^= k1;
    }
    /* murmur3 mixes in the length modulo 2^32, as the reference does. */
    h1 ^= (uint32_t)len;
    return fmix32(h1);
}

int32_t sc_flink_murmur(int32_t code_in) {
    /* Java int arithmetic wraps; do it in uint32_t where wrapping is defined. */
    uint32_t code = (uint32_t)code_in;
    code *= 0xcc9e2d51U;
    code = rotl32(code, 15);
    code *= 0x1b873593U;
    code = rotl32(code, 13);
    code = code * 5 + 0xe6546b64U;
    code ^= 4;
    code = fmix32(code);
    if ((code & 0x80000000U) == 0) return (int32_t)code;
    if (code != 0x80000000U) return (int32_t)(~code + 1U); /* -code, without signed overflow */
    return 0;
}

uint64_t sc_hash64(const void *data, size_t len) {
    const uint8_t *p = (const uint8_t *)data;
    const uint64_t k = 0x9E3779B97F4A7C15ULL;
    uint64_t h = (uint64_t)len * k;
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8); /* native order is fine: this hash is never persisted */
        h = rotl64(h ^ (w * 0xC2B2AE3D27D4EB4FULL), 29) * k;
        p += 8;
        len -= 8;
    }
    if (len) {
        uint64_t w = 0;
        memcpy(&w, p, len);
        h = rotl64(h ^ (w * 0xC2B2AE3D27D4EB4FULL), 29) * k;
    }
    return fmix64(h);
}
