/* sc_keycodec.c - see sc_keycodec.h. */
#include "sc_keycodec.h"

sc_status sc_kc_build_prefix(sc_buf *b, uint16_t key_group, uint16_t state_id, const uint8_t *key, size_t klen,
                             const uint8_t *ns, size_t nslen) {
    b->len = 0;
    if (sc_buf_reserve(b, SC_KC_HEAD + 2 * SC_VARINT_MAX + klen + nslen) != SC_OK) return SC_ENOMEM;
    uint8_t *p = b->data;
    sc_be16_put(p, key_group);
    sc_be16_put(p + 2, state_id);
    size_t n = SC_KC_HEAD;
    n += sc_varint_put(p + n, klen);
    if (klen) memcpy(p + n, key, klen);
    n += klen;
    n += sc_varint_put(p + n, nslen);
    if (nslen) memcpy(p + n, ns, nslen);
    n += nslen;
    b->len = n;
    return SC_OK;
}

sc_status sc_kc_parse(const uint8_t *p, size_t n, sc_kc_parts *out) {
    const uint8_t *end = p + n, *q = p + SC_KC_HEAD;
    uint64_t len;
    size_t used;
    if (n < SC_KC_HEAD) return SC_ECORRUPT;
    out->key_group = sc_be16_get(p);
    out->state_id = sc_be16_get(p + 2);
    if (!(used = sc_varint_get(q, end, &len)) || len > (uint64_t)(end - q - used)) return SC_ECORRUPT;
    q += used;
    out->key = q;
    out->klen = (size_t)len;
    q += len;
    if (!(used = sc_varint_get(q, end, &len)) || len > (uint64_t)(end - q - used)) return SC_ECORRUPT;
    q += used;
    out->ns = q;
    out->nslen = (size_t)len;
    q += len;
    out->user_key = q;
    out->uklen = (size_t)(end - q);
    return SC_OK;
}
