/* sc_table.c - see sc_table.h for the contract. */
#define _GNU_SOURCE /* MADV_HUGEPAGE */
#include "sc_table.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define SC_MIN_CAP 8
/* malloc's per-block bookkeeping, counted so that memory accounting is honest. */
#define SC_BLOCK_OVERHEAD 16

static size_t round_pow2(size_t n) {
    size_t c = SC_MIN_CAP;
    while (c < n) c <<= 1;
    return c;
}

/* Slot arrays of at least this size are mmap'd and backed by transparent huge
 * pages where the kernel allows it: a random probe into a 100 MB array then
 * costs one cache miss instead of a cache miss plus a page-table walk. */
#define SC_HUGE_BYTES (2u << 20)

static sc_entry *alloc_slots(size_t cap) {
    size_t bytes = cap * sizeof(sc_entry);
    if (bytes < SC_HUGE_BYTES) return (sc_entry *)calloc(cap, sizeof(sc_entry));
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
#ifdef MADV_HUGEPAGE
    (void)madvise(p, bytes, MADV_HUGEPAGE); /* advisory: failure only costs speed */
#endif
    return (sc_entry *)p; /* anonymous mappings are zero-filled: all slots empty */
}

void sc_table_prefault(sc_table *t) {
    size_t bytes = (t->mask + 1) * sizeof(sc_entry);
    if (bytes < SC_HUGE_BYTES) return;
#ifdef MADV_POPULATE_WRITE
    if (madvise(t->slots, bytes, MADV_POPULATE_WRITE) == 0) return; /* Linux >= 5.14 */
#endif
    /* Older kernels: write each page's first byte back to itself (a write fault maps a zeroed page). */
    volatile uint8_t *p = (volatile uint8_t *)t->slots;
    for (size_t off = 0; off < bytes; off += 4096) p[off] = p[off];
}

static void free_slots(sc_entry *slots, size_t cap) {
    size_t bytes = cap * sizeof(sc_entry);
    if (!slots) return;
    if (bytes < SC_HUGE_BYTES)
        free(slots);
    else
        munmap(slots, bytes);
}

static size_t block_bytes(const sc_entry *e) {
    return sc_entry_is_inline(e) ? 0 : (size_t)e->klen + e->vcap + SC_BLOCK_OVERHEAD;
}

sc_table *sc_table_new(size_t initial_capacity, int nested) {
    sc_table *t = (sc_table *)calloc(1, sizeof *t);
    if (!t) return NULL;
    size_t cap = round_pow2(initial_capacity);
    t->slots = alloc_slots(cap);
    if (!t->slots) {
        free(t);
        return NULL;
    }
    t->mask = cap - 1;
    t->nested = nested;
    t->bytes = sizeof *t + cap * sizeof(sc_entry);
    return t;
}

/* Free what an occupied slot owns and mark it empty (count is the caller's). */
static void release_slot(sc_table *t, sc_entry *e) {
    if (t->nested) sc_table_free(sc_entry_inner(e));
    t->bytes -= block_bytes(e);
    if (!sc_entry_is_inline(e)) free(e->u.ptr);
    e->hash = 0;
}

void sc_table_clear(sc_table *t) {
    if (!t) return;
    for (size_t i = 0; i <= t->mask; i++)
        if (t->slots[i].hash) release_slot(t, &t->slots[i]);
    t->count = 0;
}

void sc_table_free(sc_table *t) {
    if (!t) return;
    /* A flat table whose entries are all inline owns nothing but its slot array: skip the
     * walk over every slot (a 1M-entry table has 2M slots, ~100 MB to read for nothing). */
    if (t->nested || t->bytes != sizeof *t + (t->mask + 1) * sizeof(sc_entry)) sc_table_clear(t);
    free_slots(t->slots, t->mask + 1);
    free(t);
}

/* Equality of n bytes.  Composite keys of int and short str keys are 8-16 bytes: two overlapping 8-byte
 * loads per side instead of a libc memcmp call on every hit. */
SC_INLINE int bytes_equal(const uint8_t *a, const uint8_t *b, size_t n) {
    if (n >= 8 && n <= 16) {
        uint64_t a0, b0, a1, b1;
        memcpy(&a0, a, 8);
        memcpy(&b0, b, 8);
        memcpy(&a1, a + n - 8, 8);
        memcpy(&b1, b + n - 8, 8);
        return a0 == b0 && a1 == b1;
    }
    return memcmp(a, b, n) == 0;
}

SC_INLINE int key_equals(sc_entry *e, const uint8_t *key, size_t klen, uint32_t hash) {
    return e->hash == hash && e->klen == klen && bytes_equal(sc_entry_key(e), key, klen);
}

sc_entry *sc_table_find(const sc_table *t, const uint8_t *key, size_t klen, uint32_t hash) {
    size_t i = hash & t->mask;
    for (;;) {
        sc_entry *e = &t->slots[i];
        if (!e->hash) return NULL;
        if (key_equals(e, key, klen, hash)) return e;
        i = (i + 1) & t->mask;
    }
}

/* Rehash into cap slots (a power of two > count); slots move as a whole (inline bytes and block pointers alike). */
static SC_NOINLINE sc_status rehash(sc_table *t, size_t cap) {
    size_t old_cap = t->mask + 1;
    if (cap > SIZE_MAX / sizeof(sc_entry)) return SC_ENOMEM;
    sc_entry *slots = alloc_slots(cap);
    if (!slots) return SC_ENOMEM;
    for (size_t i = 0; i < old_cap; i++) {
        sc_entry *e = &t->slots[i];
        if (!e->hash) continue;
        size_t j = e->hash & (cap - 1);
        while (slots[j].hash) j = (j + 1) & (cap - 1);
        slots[j] = *e;
    }
    free_slots(t->slots, old_cap);
    t->slots = slots;
    t->mask = cap - 1;
    t->bytes = t->bytes + cap * sizeof(sc_entry) - old_cap * sizeof(sc_entry);
    return SC_OK;
}

static sc_status grow(sc_table *t) { return rehash(t, (t->mask + 1) * 2); }

sc_status sc_table_reserve(sc_table *t, size_t n) {
    if (n > (SIZE_MAX / 4) / sizeof(sc_entry)) return SC_ENOMEM;
    size_t cap = t->mask + 1;
    while (n * 4 > cap * 3) cap *= 2; /* the load factor stays <= 3/4 */
    return cap == t->mask + 1 ? SC_OK : rehash(t, cap);
}

/* Find key or the empty slot where it goes, growing first if needed. */
static sc_status locate(sc_table *t, const uint8_t *key, size_t klen, uint32_t hash, sc_entry **out, int *found) {
    if (SC_UNLIKELY((t->count + 1) * 4 > (t->mask + 1) * 3)) {
        sc_status st = grow(t);
        if (st != SC_OK) return st;
    }
    size_t i = hash & t->mask;
    for (;;) {
        sc_entry *e = &t->slots[i];
        if (!e->hash) {
            *out = e;
            *found = 0;
            return SC_OK;
        }
        if (key_equals(e, key, klen, hash)) {
            *out = e;
            *found = 1;
            return SC_OK;
        }
        i = (i + 1) & t->mask;
    }
}

/* Fill the empty slot with key and value; vcap >= vlen is the requested capacity. */
static sc_status insert_new(sc_table *t, sc_entry *slot, const uint8_t *key, size_t klen, uint32_t hash,
                            const uint8_t *val, size_t vlen, size_t vcap, int64_t ts) {
    uint8_t *dst;
    if (klen + vcap <= SC_INLINE_BYTES) {
        vcap = SC_INLINE_BYTES - klen; /* the invariant: inline iff klen + vcap <= SC_INLINE_BYTES */
        dst = slot->u.inl;
    } else {
        dst = (uint8_t *)malloc(klen + vcap);
        if (!dst) return SC_ENOMEM;
        slot->u.ptr = dst;
    }
    memcpy(dst, key, klen);
    if (vlen) memcpy(dst + klen, val, vlen);
    slot->hash = hash;
    slot->klen = (uint32_t)klen;
    slot->vlen = (uint32_t)vlen;
    slot->vcap = (uint32_t)vcap;
    slot->ts = ts;
    t->count++;
    t->bytes += block_bytes(slot);
    return SC_OK;
}

/* Give e's value region capacity new_cap (> SC_INLINE_BYTES - klen), keeping its bytes. */
static sc_status resize_value(sc_table *t, sc_entry *e, size_t new_cap) {
    size_t keep = (size_t)e->klen + (e->vlen < new_cap ? e->vlen : new_cap);
    if (sc_entry_is_inline(e)) {
        uint8_t *blk = (uint8_t *)malloc(e->klen + new_cap);
        if (!blk) return SC_ENOMEM;
        memcpy(blk, e->u.inl, keep);
        e->u.ptr = blk;
    } else {
        uint8_t *blk = (uint8_t *)realloc(e->u.ptr, e->klen + new_cap);
        if (!blk) return SC_ENOMEM;
        t->bytes -= block_bytes(e);
        e->u.ptr = blk;
    }
    e->vcap = (uint32_t)new_cap;
    t->bytes += block_bytes(e);
    return SC_OK;
}

sc_status sc_table_put(sc_table *t, const uint8_t *key, size_t klen, uint32_t hash, const uint8_t *val,
                       size_t vlen, int64_t ts, sc_entry **out) {
    if (SC_UNLIKELY(klen > UINT32_MAX / 4 || vlen > UINT32_MAX / 4)) return SC_ETOOBIG;
    sc_entry *e;
    int found;
    sc_status st = locate(t, key, klen, hash, &e, &found);
    if (st != SC_OK) return st;
    if (!found) {
        st = insert_new(t, e, key, klen, hash, val, vlen, vlen, ts);
    } else {
        if (vlen > e->vcap) {
            st = resize_value(t, e, vlen);
        } else if (!sc_entry_is_inline(e) && e->vcap > 64 && vlen < e->vcap / 4) {
            /* Shrink a much larger block so memory accounting follows the data. */
            if (klen + vlen <= SC_INLINE_BYTES) {
                uint8_t *blk = e->u.ptr;
                t->bytes -= block_bytes(e);
                memcpy(e->u.inl, blk, klen);
                memcpy(e->u.inl + klen, val, vlen);
                free(blk);
                e->vcap = (uint32_t)(SC_INLINE_BYTES - klen);
                e->vlen = (uint32_t)vlen;
                e->ts = ts;
                if (out) *out = e;
                return SC_OK;
            }
            st = resize_value(t, e, vlen);
        }
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
    if (SC_UNLIKELY(klen > UINT32_MAX / 4 || vlen > UINT32_MAX / 4)) return SC_ETOOBIG;
    sc_entry *e;
    int found;
    sc_status st = locate(t, key, klen, hash, &e, &found);
    if (st != SC_OK) return st;
    if (!found) return insert_new(t, e, key, klen, hash, val, vlen, vlen, ts);
    size_t need = (size_t)e->vlen + vlen;
    if (SC_UNLIKELY(need > UINT32_MAX / 4)) return SC_ETOOBIG;
    if (need > e->vcap) {
        size_t cap = (size_t)e->vcap + e->vcap / 2; /* grow by 1.5x: appends stay amortised O(1) */
        st = resize_value(t, e, cap < need ? need : cap);
        if (st != SC_OK) return st;
    }
    memcpy(sc_entry_value(e) + e->vlen, val, vlen);
    e->vlen = (uint32_t)need;
    return SC_OK;
}

void sc_table_delete_entry(sc_table *t, sc_entry *e) {
    release_slot(t, e);
    t->count--;
    /* Backward-shift deletion: pull later members of the probe run into the
     * hole so that lookups never need tombstones. */
    size_t hole = (size_t)(e - t->slots), i = hole;
    for (;;) {
        i = (i + 1) & t->mask;
        sc_entry *n = &t->slots[i];
        if (!n->hash) break;
        size_t home = n->hash & t->mask;
        /* n may move into hole iff hole lies cyclically in [home, i). */
        if (((i - home) & t->mask) >= ((i - hole) & t->mask)) {
            t->slots[hole] = *n;
            n->hash = 0;
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
        if (t->slots[i].hash) {
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
            if (t->slots[i].hash) b += sc_table_bytes_deep(sc_entry_inner(&t->slots[i]));
    return b;
}

size_t sc_table_count_deep(const sc_table *t) {
    if (!t->nested) return t->count;
    size_t n = 0;
    for (size_t i = 0; i <= t->mask; i++)
        if (t->slots[i].hash) n += sc_table_count_deep(sc_entry_inner(&t->slots[i]));
    return n;
}

size_t sc_table_expire_scan(sc_table *t, size_t *cursor, size_t n, int64_t ttl, int64_t now) {
    size_t dropped = 0;
    if (t->count == 0) return 0;
    if (n > t->mask + 1) n = t->mask + 1;
    for (size_t i = 0; i < n; i++) {
        sc_entry *e = &t->slots[*cursor & t->mask];
        if (e->hash && sc_ttl_expired(e->ts, ttl, now)) {
            sc_table_delete_entry(t, e);
            dropped++;
            continue; /* the backward shift may have moved an unvisited entry into this slot */
        }
        *cursor = (*cursor + 1) & t->mask;
    }
    return dropped;
}

sc_table *sc_table_clone(const sc_table *t) {
    sc_table *c = sc_table_new(t->mask + 1, t->nested);
    if (!c) return NULL;
    for (size_t i = 0; i <= t->mask; i++) {
        sc_entry *e = &t->slots[i];
        if (!e->hash) continue;
        sc_entry *d = &c->slots[i]; /* same capacity: same positions are valid */
        sc_status st;
        if (t->nested) {
            sc_table *inner = sc_table_clone(sc_entry_inner(e));
            st = inner ? insert_new(c, d, sc_entry_key(e), e->klen, e->hash, (const uint8_t *)&inner,
                                    sizeof inner, sizeof inner, e->ts)
                       : SC_ENOMEM;
            if (st != SC_OK) sc_table_free(inner);
        } else {
            st = insert_new(c, d, sc_entry_key(e), e->klen, e->hash, sc_entry_value(e), e->vlen, e->vlen, e->ts);
        }
        if (st != SC_OK) {
            sc_table_free(c);
            return NULL;
        }
    }
    return c;
}
