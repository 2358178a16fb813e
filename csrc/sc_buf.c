/* sc_buf.c - see sc_buf.h. */
#include "sc_buf.h"

#include <stdlib.h>

sc_status sc_buf_grow(sc_buf *b, size_t extra) {
    if (extra > SIZE_MAX / 2 - b->len) return SC_ENOMEM;
    size_t need = b->len + extra, cap = b->cap ? b->cap : 64;
    while (cap < need) cap *= 2;
    uint8_t *d = (uint8_t *)realloc(b->data, cap);
    if (!d) return SC_ENOMEM;
    b->data = d;
    b->cap = cap;
    return SC_OK;
}

void sc_buf_free(sc_buf *b) {
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}
