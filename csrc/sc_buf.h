/*
 * sc_buf.h - growable byte buffer (the serializers' output and the key builder).
 *
 * The fast path (space available) is inline; growth is a separate noinline
 * function so the common case stays small (msgspec's ms_write pattern).
 * Ownership: the buffer owns data; sc_buf_free releases it.  A failed grow
 * leaves the buffer unchanged and returns SC_ENOMEM.
 */
#ifndef SC_BUF_H
#define SC_BUF_H

#include <string.h>

#include "sc_common.h"

typedef struct sc_buf {
    uint8_t *data; /**< capacity bytes, NULL until the first write */
    size_t len;    /**< bytes written */
    size_t cap;    /**< bytes allocated */
} sc_buf;

/** Make room for at least `extra` more bytes (slow path). */
sc_status sc_buf_grow(sc_buf *b, size_t extra);
void sc_buf_free(sc_buf *b);

SC_INLINE sc_status sc_buf_reserve(sc_buf *b, size_t extra) {
    if (SC_LIKELY(b->cap - b->len >= extra)) return SC_OK;
    return sc_buf_grow(b, extra);
}

SC_INLINE sc_status sc_buf_write(sc_buf *b, const void *p, size_t n) {
    if (SC_UNLIKELY(b->cap - b->len < n) && sc_buf_grow(b, n) != SC_OK) return SC_ENOMEM;
    if (n) memcpy(b->data + b->len, p, n);
    b->len += n;
    return SC_OK;
}

SC_INLINE sc_status sc_buf_put_byte(sc_buf *b, uint8_t c) {
    if (SC_UNLIKELY(b->cap == b->len) && sc_buf_grow(b, 1) != SC_OK) return SC_ENOMEM;
    b->data[b->len++] = c;
    return SC_OK;
}

#endif /* SC_BUF_H */
