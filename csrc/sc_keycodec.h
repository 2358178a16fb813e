/*
 * sc_keycodec.h - composite state keys and the small integer codecs they use.
 *
 * Layout of a composite key (Flink's RocksDBSerializedCompositeKeyBuilder,
 * with the state id in the key instead of a column family):
 *
 *   BE16 key_group | BE16 state_id | varint len(key) | key | varint len(ns) | ns | user_key
 *
 * - the key group leads, big-endian, so byte order is key-group order and a
 *   key-group range is one contiguous byte range (rescaling and the LMDB tier
 *   rely on it);
 * - lengths make the (state, key, namespace) prefix prefix-free, so all map
 *   entries of one (state, key, namespace) are exactly the keys that start
 *   with that prefix, contiguous in byte order;
 * - the map user key is last and unprefixed.
 *
 * Varints are LEB128 (7 bits per byte, little-endian groups), at most 10 bytes.
 * All functions are pure and allocation-free except sc_kc_build_prefix, which
 * writes into an sc_buf.
 */
#ifndef SC_KEYCODEC_H
#define SC_KEYCODEC_H

#include "sc_buf.h"
#include "sc_common.h"

#define SC_VARINT_MAX 10
/** Bytes of the fixed head: key group + state id. */
#define SC_KC_HEAD 4

/** Write v as a varint at p (room for SC_VARINT_MAX bytes); returns bytes written. */
SC_INLINE size_t sc_varint_put(uint8_t *p, uint64_t v) {
    size_t n = 0;
    while (v >= 0x80) {
        p[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    p[n++] = (uint8_t)v;
    return n;
}

/**
 * Read a varint from [p, end); returns bytes consumed, or 0 when the input is
 * truncated, longer than 10 bytes or overflows 64 bits (malformed).
 */
SC_INLINE size_t sc_varint_get(const uint8_t *p, const uint8_t *end, uint64_t *out) {
    uint64_t v = 0;
    for (size_t i = 0; i < SC_VARINT_MAX && p + i < end; i++) {
        uint8_t c = p[i];
        if (i == 9 && c > 1) return 0; /* would overflow 64 bits */
        v |= (uint64_t)(c & 0x7f) << (7 * i);
        if (!(c & 0x80)) {
            *out = v;
            return i + 1;
        }
    }
    return 0;
}

SC_INLINE void sc_be16_put(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}
SC_INLINE uint16_t sc_be16_get(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }

SC_INLINE void sc_be64_put(uint8_t *p, uint64_t v) {
    for (int i = 7; i >= 0; i--) {
        p[i] = (uint8_t)v;
        v >>= 8;
    }
}
SC_INLINE uint64_t sc_be64_get(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = (v << 8) | p[i];
    return v;
}

/**
 * Replace b's contents with the (state, key, namespace) prefix
 * BE16 kg | BE16 sid | varint klen | key | varint nslen | ns.
 */
sc_status sc_kc_build_prefix(sc_buf *b, uint16_t key_group, uint16_t state_id, const uint8_t *key, size_t klen,
                             const uint8_t *ns, size_t nslen);

/** The parts of a composite key; pointers alias the input. */
typedef struct sc_kc_parts {
    uint16_t key_group;
    uint16_t state_id;
    const uint8_t *key;
    size_t klen;
    const uint8_t *ns;
    size_t nslen;
    const uint8_t *user_key; /**< bytes after the namespace (map user key), may be empty */
    size_t uklen;
} sc_kc_parts;

/** Split a composite key; SC_ECORRUPT when it is malformed. */
sc_status sc_kc_parse(const uint8_t *p, size_t n, sc_kc_parts *out);

#endif /* SC_KEYCODEC_H */
