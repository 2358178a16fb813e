/* sc_table.c - see sc_table.h for the contract. */
#include "sc_table.h"

#include <stdlib.h>
#include <string.h>

#define SC_MIN_CAP 8
/* malloc's per-block bookkeeping, counted so that memory accounting is honest. */
#define SC_BLOCK_OVERHEAD 16

static size_t round_pow2(size_t n) {
    size_t c = SC_MIN_CAP;
    while (c < n) c <<= 1;
    return c;
}

sc_table *sc_table_new(size_t initial_capacity, int nested) {
    sc_table *t = (sc_table *)calloc(1, sizeof *t);
    if (!t) return NULL;
    size_t cap = round_pow2(initial_capacity);
    t->slots = (sc_entry *)calloc(cap, sizeof(sc_entry));
    if (!t->slots) {
        free(t);
        return NULL;
    }
    t->mask = cap - 1;
    t->nested = nested;
    t->bytes = sizeof *t + cap * sizeof(sc_entry);
    return t;
}

static void free_block(sc_table *t, sc_entry *e) {
    if (t->nested) sc_table_free(sc_entry_inner(e));
    t->bytes -= (size_t)e->klen + e->vcap + SC_BLOCK_OVERHEAD;
    free(e->data);
    e->data = NULL;
}

void sc_table_clear(sc_table *t) {
    if (!t) return;
    for (size_t i = 0; i <= t->mask; i++)
        if (t->slots[i].data) free_block(t, &t->slots[i]);
    t->count = 0;
}

void sc_table_free(sc_table *t) {
    if (!t) return;
    sc_table_clear(t);
    free(t->slots);
    free(t);
}

sc_entry *sc_table_find(const sc_table *t, const uint8_t *key, size_t klen, uint32_t hash) {
    size_t i = hash & t->mask;
    for (;;) {
        sc_entry *e = &t->slots[i];
        if (!e->data) return NULL;
        if (e->hash == hash && e->klen == klen && memcmp(e->data, key, klen) == 0) return e;
        i = (i + 1) & t->mask;
    }
}

/* Double the slot array; entries keep their blocks, only slots move. */
static SC_NOINLINE sc_status grow(sc_table *t) {
    size_t old_cap = t->mask + 1, cap = old_cap * 2;
    if (cap > SIZE_MAX / sizeof(sc_entry)) return SC_ENOMEM;
    sc_entry *slots = (sc_entry *)calloc(cap, sizeof(sc_entry));
    if (!slots) return SC_ENOMEM;
    for (size_t i = 0; i < old_cap; i++) {
        sc_entry *e = &t->slots[i];
        if (!e->data) continue;
        size_t j = e->hash & (cap - 1);
        while (slots[j].data) j = (j + 1) & (cap - 1);
        slots[j] = *e;
    }
    free(t->slots);
    t->slots = slots;
    t->mask = cap - 1;
    t->bytes += (cap - old_cap) * sizeof(sc_entry);
    return SC_OK;
}

/* Find key or the empty slot where it goes, growing first if needed. */
static sc_status locate(sc_table *t, const uint8_t *key, size_t klen, uint32_t hash, sc_entry **out,
                        int *found) {
    if (SC_UNLIKELY((t->count + 1) * 4 > (t->mask + 1) * 3)) {
        sc_status st = grow(t);
        if (st != SC_OK) return st;
    }
    size_t i = hash & t->mask;
    for (;;) {
        sc_entry *e = &t->slots[i];
        if (!e->data) {
            *out = e;
            *found = 0;
            return SC_OK;
        }
        if (e->hash == hash && e->klen == klen && memcmp(e->data, key, klen) == 0) {
            *out = e;
            *found = 1;
            return SC_OK;
        }
        i = (i + 1) & t->mask;
    }
}

/* Value capacity for a new or growing value: small values get exactly what
 * they need (ValueState overwrites in place); growing ones double (ListState). */
static size_t next_cap(size_t need, size_t old_cap) {
    if (old_cap == 0) return need;
    size_t c = old_cap + old_cap / 2;
    return c < need ? need : c;
}

static sc_status insert_new(sc_table *t, sc_entry *slot, const uint8_t *key, size_t klen, uint32_t hash,
                            const uint8_t *val, size_t vlen, size_t vcap, int64_t ts) {
    uint8_t *blk = (uint8_t *)malloc(klen + vcap ? klen + vcap : 1);
    if (!blk) return SC_ENOMEM;
    memcpy(blk, key, klen);
    if (vlen) memcpy(blk + klen, val, vlen);
    slot->data = blk;
    slot->hash = hash;
    slot->klen = (uint32_t)klen;
    slot->vlen = (uint32_t)vlen;
    slot->vcap = (uint32_t)vcap;
    slot->ts = ts;
    t->count++;
    t->bytes += klen + vcap + SC_BLOCK_OVERHEAD;
    return SC_OK;
}

static sc_status resize_value(sc_table *t, sc_entry *e, size_t new_cap) {
    uint8_t *blk = (uint8_t *)realloc(e->data, e->klen + new_cap);
    if (!blk) return SC_ENOMEM;
    t->bytes += new_cap - e->vcap;
    e->data = blk;
    e->vcap = (uint32_t)new_cap;
    return SC_OK;
}

sc_status sc_table_put(sc_table *t, const uint8_t *key, size_t klen, uint32_t hash, const uint8_t *val,
                       size_t vlen, int64_t ts, sc_entry **out) {
    if (SC_UNLIKELY(klen > UINT32_MAX || vlen > UINT32_MAX / 2)) return SC_ETOOBIG;
    sc_entry *e;
    int found;
    sc_status st = locate(t, key, klen, hash, &e, &found);
    if (st != SC_OK) return st;
    if (!found) {
        st = insert_new(t, e, key, klen, hash, val, vlen, vlen, ts);
    } else {
        /* Shrink a much larger region so memory accounting follows the data. */
        if (vlen > e->vcap || (e->vcap > 64 && vlen < e->vcap / 4)) st = resize_value(t, e, vlen);
        if (st == SC_OK) {
            if (vlen) memmove(sc_entry_value(e), val, vlen);
            e->vlen = (uint32_t)vlen;
            e->ts = ts;
        }
    }
    if (st == SC_OK && out) *out = e;
    return st;
}

sc_status sc_table_append(sc_table *t, const uint8_t *key, size_t klen, uint32_t hash, const uint8_t *val,
                          size_t vlen, int64_t ts) {
    if (SC_UNLIKELY(klen > UINT32_MAX || vlen > UINT32_MAX / 2)) return SC_ETOOBIG;
    sc_entry *e;
    int found;
    sc_status st = locate(t, key, klen, hash, &e, &found);
    if (st != SC_OK) return st;
    if (!found) return insert_new(t, e, key, klen, hash, val, vlen, vlen, ts);
    size_t need = (size_t)e->vlen + vlen;
    if (SC_UNLIKELY(need > UINT32_MAX / 2)) return SC_ETOOBIG;
    if (need > e->vcap) {
        st = resize_value(t, e, next_cap(need, e->vcap));
        if (st != SC_OK) return st;
    }
    memcpy(sc_entry_value(e) + e->vlen, val, vlen);
    e->vlen = (uint32_t)need;
    return SC_OK;
}

void sc_table_delete_entry(sc_table *t, sc_entry *e) {
    free_block(t, e);
    t->count--;
    /* Backward-shift deletion: pull later members of the probe run into the
     * hole so that lookups never need tombstones. */
    size_t hole = (size_t)(e - t->slots), i = hole;
    for (;;) {
        i = (i + 1) & t->mask;
        sc_entry *n = &t->slots[i];
        if (!n->data) break;
        size_t home = n->hash & t->mask;
        /* n may move into hole iff hole lies cyclically in [home, i). */
        if (((i - home) & t->mask) >= ((i - hole) & t->mask)) {
            t->slots[hole] = *n;
            n->data = NULL;
            hole = i;
        }
    }
}

int sc_table_delete(sc_table *t, const uint8_t *key, size_t klen, uint32_t hash) {
    sc_entry *e = sc_table_find(t, key, klen, hash);
    if (!e) return 0;
    sc_table_delete_entry(t, e);
    return 1;
}

sc_table *sc_table_get_inner(sc_table *t, const uint8_t *key, size_t klen, uint32_t hash, int create,
                             sc_status *st) {
    *st = SC_OK;
    sc_entry *e = sc_table_find(t, key, klen, hash);
    if (e) return sc_entry_inner(e);
    if (!create) return NULL;
    sc_table *inner = sc_table_new(SC_MIN_CAP, 0);
    if (!inner) {
        *st = SC_ENOMEM;
        return NULL;
    }
    *st = sc_table_put(t, key, klen, hash, (const uint8_t *)&inner, sizeof inner, 0, NULL);
    if (*st != SC_OK) {
        sc_table_free(inner);
        return NULL;
    }
    return inner;
}

sc_entry *sc_table_next(const sc_table *t, size_t *pos) {
    for (size_t i = *pos; i <= t->mask; i++) {
        if (t->slots[i].data) {
            *pos = i + 1;
            return &t->slots[i];
        }
    }
    *pos = t->mask + 1;
    return NULL;
}

size_t sc_table_bytes_deep(const sc_table *t) {
    size_t b = t->bytes;
    if (t->nested)
        for (size_t i = 0; i <= t->mask; i++)
            if (t->slots[i].data) b += sc_table_bytes_deep(sc_entry_inner(&t->slots[i]));
    return b;
}

size_t sc_table_count_deep(const sc_table *t) {
    if (!t->nested) return t->count;
    size_t n = 0;
    for (size_t i = 0; i <= t->mask; i++)
        if (t->slots[i].data) n += sc_table_count_deep(sc_entry_inner(&t->slots[i]));
    return n;
}

sc_table *sc_table_clone(const sc_table *t) {
    sc_table *c = sc_table_new(t->mask + 1, t->nested);
    if (!c) return NULL;
    for (size_t i = 0; i <= t->mask; i++) {
        const sc_entry *e = &t->slots[i];
        if (!e->data) continue;
        sc_entry *d = &c->slots[i]; /* same capacity: same positions are valid */
        if (t->nested) {
            sc_table *inner = sc_table_clone(sc_entry_inner(e));
            if (!inner || insert_new(c, d, e->data, e->klen, e->hash, (const uint8_t *)&inner, sizeof inner,
                                     sizeof inner, e->ts) != SC_OK) {
                sc_table_free(inner);
                sc_table_free(c);
                return NULL;
            }
        } else if (insert_new(c, d, e->data, e->klen, e->hash, sc_entry_value(e), e->vlen, e->vlen, e->ts) !=
                   SC_OK) {
            sc_table_free(c);
            return NULL;
        }
    }
    return c;
}
