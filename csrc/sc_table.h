/*
 * sc_table.h - open-addressing hash table: byte-string key -> (value bytes, int64 ts).
 *
 * Ownership: the table owns every key and value.  A slot holds the key
 * followed by the value region (capacity vcap >= vlen) inline when both fit in
 * SC_INLINE_BYTES (an int key's composite key and a float value do: one cache
 * miss per lookup), else it points at one malloc'd block laid out the same
 * way.  An overwrite of a value of the same or smaller size writes in place
 * and an append (ListState.add) is amortised O(len).
 * Keys and values are serialized bytes in C memory: no Python object is
 * referenced, so a table can be snapshotted, flushed or freed without the GIL.
 *
 * Nested tables: a table created with nested=1 stores an sc_table* as the
 * value of every entry (the heap backend's MapState: (key, namespace) ->
 * map of user keys); freeing or clearing the outer table frees the inner ones.
 *
 * Probing is linear with backward-shift deletion (no tombstones), capacity is
 * a power of two and the load factor is kept <= 3/4.  Pointers returned by
 * lookups stay valid until the next mutation of the same table.
 *
 * Thread safety: none; callers serialise access (the keyed backend is used
 * from one thread, the GIL or the backend's lock protects it).
 * Errors: SC_ENOMEM leaves the table unchanged; SC_ETOOBIG for sizes >= 4 GiB.
 */
#ifndef SC_TABLE_H
#define SC_TABLE_H

#include "sc_common.h"
#include "sc_hash.h"
#include "sc_ttl.h"

#include <string.h>

/** Bytes of key + value stored inside the slot itself (no allocation, no second cache miss). */
#define SC_INLINE_BYTES 24

typedef struct sc_entry {
    int64_t ts;      /**< last-access timestamp for TTL (ms); 0 when TTL is off */
    uint32_t hash;   /**< sc_table_hash(key), never 0; 0 marks an empty slot */
    uint32_t klen;   /**< key length in bytes */
    uint32_t vlen;   /**< value length in bytes (8 = the sc_table* in nested tables) */
    uint32_t vcap;   /**< value capacity >= vlen; klen + vcap <= SC_INLINE_BYTES iff stored inline */
    union {
        uint8_t *ptr;                  /**< external block: key bytes then the value region */
        uint8_t inl[SC_INLINE_BYTES];  /**< inline: key bytes then the value region */
    } u;
} sc_entry;

typedef struct sc_table {
    sc_entry *slots; /**< capacity slots */
    size_t mask;     /**< capacity - 1 (capacity is a power of two) */
    size_t count;    /**< occupied slots */
    size_t bytes;    /**< bytes allocated by this table (slots + blocks), not nested tables */
    int nested;      /**< 1: values are owned sc_table* (see header comment) */
} sc_table;

/** The hash every table uses for a key (callers may compute it once and reuse it). */
SC_INLINE uint32_t sc_table_hash(const uint8_t *key, size_t klen) {
    uint32_t h = (uint32_t)sc_hash64(key, klen);
    return h ? h : 1; /* 0 marks empty slots */
}

/** New empty table; initial_capacity is rounded up to a power of two >= 8.  NULL on ENOMEM. */
sc_table *sc_table_new(size_t initial_capacity, int nested);
/** Free the table, every block and (nested) every inner table.  NULL is fine. */
void sc_table_free(sc_table *t);
/** Grow the slot array once so that n entries fit without further growth (bulk loads, restores). */
sc_status sc_table_reserve(sc_table *t, size_t n);

/**
 * Fault in the pages of the slot array (contents unchanged), so that the kernel's zeroing of a
 * freshly mapped array is paid here, e.g. on another thread while a restore verifies its files,
 * rather than by the first insert into each page.  Small (calloc'd) arrays are left alone.
 * The caller must own the table exclusively while this runs.
 */
void sc_table_prefault(sc_table *t);
/** Remove every entry; keeps the slot array. */
void sc_table_clear(sc_table *t);

/** Entry for key, or NULL. */
sc_entry *sc_table_find(const sc_table *t, const uint8_t *key, size_t klen, uint32_t hash);

/** Insert or overwrite key with value and ts; *out (optional) receives the entry.
 *  key and val must not point into this table (a put may grow or move it). */
sc_status sc_table_put(sc_table *t, const uint8_t *key, size_t klen, uint32_t hash,
                       const uint8_t *val, size_t vlen, int64_t ts, sc_entry **out);

/** Append vlen bytes to the value of key, creating it (with ts) when absent. */
sc_status sc_table_append(sc_table *t, const uint8_t *key, size_t klen, uint32_t hash,
                          const uint8_t *val, size_t vlen, int64_t ts);

/** Remove key; returns 1 when it was present, 0 otherwise. */
int sc_table_delete(sc_table *t, const uint8_t *key, size_t klen, uint32_t hash);

/** Remove the entry e (a pointer obtained from this table). */
void sc_table_delete_entry(sc_table *t, sc_entry *e);

/**
 * Nested tables only: the inner table stored under key, created (empty) when
 * create != 0 and absent.  Returns NULL when absent and create == 0, or on ENOMEM
 * (then *st is SC_ENOMEM).
 */
sc_table *sc_table_get_inner(sc_table *t, const uint8_t *key, size_t klen, uint32_t hash,
                             int create, sc_status *st);

/** Occupied slot at index i (0 <= i <= mask) or NULL: for iteration and cleanup cursors. */
SC_INLINE sc_entry *sc_table_slot(const sc_table *t, size_t i) {
    sc_entry *e = &t->slots[i & t->mask];
    return e->hash ? e : NULL;
}

/** Next occupied entry at or after *pos, advancing *pos past it; NULL at the end. */
sc_entry *sc_table_next(const sc_table *t, size_t *pos);

/** Hint the CPU to load the home slot of hash (batch lookups overlap their misses). */
SC_INLINE void sc_table_prefetch(const sc_table *t, uint32_t hash) {
    const sc_entry *e = &t->slots[hash & t->mask];
    SC_PREFETCH(e);
    /* A 48-byte slot straddles two cache lines one time in two: fetch the line holding its end (the
     * inline key) too, or the key compare takes the miss the prefetch was meant to hide. */
    SC_PREFETCH((const char *)(e + 1) - 1);
}

SC_INLINE int sc_entry_is_inline(const sc_entry *e) { return (size_t)e->klen + e->vcap <= SC_INLINE_BYTES; }
SC_INLINE uint8_t *sc_entry_key(sc_entry *e) { return sc_entry_is_inline(e) ? e->u.inl : e->u.ptr; }
SC_INLINE uint8_t *sc_entry_value(sc_entry *e) { return sc_entry_key(e) + e->klen; }
SC_INLINE sc_table *sc_entry_inner(sc_entry *e) {
    sc_table *inner;
    memcpy(&inner, sc_entry_value(e), sizeof inner);
    return inner;
}

/** Bytes in use, including nested tables (O(entries) for nested tables). */
size_t sc_table_bytes_deep(const sc_table *t);
/** Entries, counting each entry of nested tables (O(entries) for nested tables). */
size_t sc_table_count_deep(const sc_table *t);

/**
 * Incremental TTL cleanup of a flat table (Flink's heap incremental cleanup):
 * visit up to n slots from *cursor (advancing it, round robin) and delete the
 * entries whose timestamp has expired (sc_ttl_expired).  Returns how many
 * were deleted.  Slots are visited in order, so the scan is cache-friendly.
 */
size_t sc_table_expire_scan(sc_table *t, size_t *cursor, size_t n, int64_t ttl, int64_t now);

/** Deep copy (for consistent snapshots).  NULL on ENOMEM. */
sc_table *sc_table_clone(const sc_table *t);

#endif /* SC_TABLE_H */
