/*
 * test_csrc.c - standalone test of statecore's C core (csrc/), no Python.
 *
 * Built and run by tests/test_sanitizers.py with -fsanitize=address,undefined
 * (and under valgrind by hand, see CONTRIBUTING.md):
 *
 *   gcc -std=c11 -O1 -g -Wall -Wextra -Werror -fno-omit-frame-pointer \
 *       -fsanitize=address,undefined -fno-sanitize-recover=all -Icsrc \
 *       tests/c/test_csrc.c csrc/sc_hash.c csrc/sc_buf.c csrc/sc_keycodec.c csrc/sc_table.c \
 *       -o /tmp/test_csrc && /tmp/test_csrc
 *
 * Covers: MurmurHash3 and Flink key-group vectors, varints (round trip,
 * truncated, overlong, overflowing), the composite key codec (build, parse,
 * every truncation, random garbage in exact-size heap buffers so that any
 * over-read is caught), sc_buf, and the hash table against a simple model
 * (put/get/delete/append/grow/clone/clear/expire_scan, the inline/external
 * boundary, shrink-to-inline, nested tables, the mmap'd slot arrays, byte
 * accounting).
 *
 * Negative controls: `test_csrc --plant-ub` performs a signed overflow and
 * `test_csrc --plant-oob` reads one byte past a heap block; both must abort
 * under the sanitizers (the pytest asserts it), which proves the checks are on.
 *
 * Exit status 0 and "test_csrc: N checks passed" on success; the first failed
 * check prints its line and exits 1.
 */
#define _GNU_SOURCE /* sc_ttl.h: clock_gettime, as in sc_table.c */
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sc_buf.h"
#include "sc_hash.h"
#include "sc_keycodec.h"
#include "sc_table.h"

static unsigned long checks;

#define CHECK(cond)                                                                      \
    do {                                                                                 \
        checks++;                                                                        \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);     \
            exit(1);                                                                     \
        }                                                                                \
    } while (0)

/* xorshift64*: deterministic, seedable. */
static uint64_t rng_state = 0x9E3779B97F4A7C15ULL;
static uint64_t rnd(void) {
    uint64_t x = rng_state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng_state = x;
    return x * 0x2545F4914F6CDD1DULL;
}
static size_t rnd_below(size_t n) { return n ? (size_t)(rnd() % n) : 0; }

/* A heap copy of exactly n bytes (n may be 0): reads past it are caught by ASan/valgrind. */
static uint8_t *exact_copy(const void *src, size_t n) {
    uint8_t *p = (uint8_t *)malloc(n ? n : 1);
    if (!p) abort();
    if (n) memcpy(p, src, n);
    return n ? p : p + 1; /* a zero-length buffer: one past a 1-byte block */
}
static void exact_free(uint8_t *p, size_t n) { free(n ? p : p - 1); }

/* ---------------------------------------------------------------- hashes */

static void test_murmur3(void) {
    struct {
        const char *data;
        size_t len;
        uint32_t seed, want;
    } v[] = {
        {"", 0, 0, 0},
        {"", 0, 1, 0x514E28B7U},
        {"", 0, 0xFFFFFFFFU, 0x81F16F39U},
        {"\xff\xff\xff\xff", 4, 0, 0x76293B50U},
        {"\x21\x43\x65\x87", 4, 0, 0xF55B516BU},
        {"\x21\x43\x65\x87", 4, 0x5082EDEEU, 0x2362F9DEU},
        {"\x21\x43\x65", 3, 0, 0x7E4A8634U},
        {"\x21\x43", 2, 0, 0xA0F7B07AU},
        {"\x21", 1, 0, 0x72661CF4U},
        {"\x00\x00\x00\x00", 4, 0, 0x2362F9DEU},
        {"\x00\x00\x00", 3, 0, 0x85F0B427U},
        {"\x00\x00", 2, 0, 0x30F4C306U},
        {"\x00", 1, 0, 0x514E28B7U},
        {"aaaa", 4, 0x9747B28CU, 0x5A97808AU},
        {"aaa", 3, 0x9747B28CU, 0x283E0130U},
        {"aa", 2, 0x9747B28CU, 0x5D211726U},
        {"a", 1, 0x9747B28CU, 0x7FA09EA6U},
        {"abcd", 4, 0x9747B28CU, 0xF0478627U},
        {"abc", 3, 0x9747B28CU, 0xC84A62DDU},
        {"ab", 2, 0x9747B28CU, 0x74875592U},
        {"Hello, world!", 13, 0x9747B28CU, 0x24884CBAU},
        {"Hello, world!", 13, 1234, 0xFAF6CDB3U},
        {"The quick brown fox jumps over the lazy dog", 43, 0x9747B28CU, 0x2FA826CDU},
    };
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
        uint8_t *p = exact_copy(v[i].data, v[i].len);
        CHECK(sc_murmur3_32(p, v[i].len, v[i].seed) == v[i].want);
        exact_free(p, v[i].len);
    }
    /* Flink MathUtils.murmurHash(int) and KeyGroupRangeAssignment (values from the Python reference). */
    CHECK(sc_flink_murmur(0) == 593689054);
    CHECK(sc_flink_murmur(1) == 68075478);
    CHECK(sc_flink_murmur(-1) == 1982413648);
    CHECK(sc_flink_murmur(42) == 1134849565);
    CHECK(sc_flink_murmur(INT32_MAX) == 1653689534);
    CHECK(sc_flink_murmur(INT32_MIN) == 1718298732);
    CHECK(sc_flink_murmur(123456789) == 1088346449);
    CHECK(sc_key_group("", 0, 128) == 94);
    CHECK(sc_key_group("", 0, 32768) == 31198);
    CHECK(sc_key_group("a", 1, 128) == 95);
    CHECK(sc_key_group("hello", 5, 128) == 63);
    CHECK(sc_key_group("hello", 5, 32768) == 31807);
    uint8_t seq[17];
    for (int i = 0; i < 17; i++) seq[i] = (uint8_t)i;
    CHECK(sc_key_group(seq, 17, 128) == 59);
    CHECK(sc_key_group(seq, 17, 32768) == 12475);
    for (int i = 0; i < 100000; i++) {
        int32_t c = (int32_t)(uint32_t)rnd();
        CHECK(sc_flink_murmur(c) >= 0);
        int32_t kg = sc_key_group(&c, sizeof c, 1 + (int32_t)rnd_below(32768));
        CHECK(kg >= 0 && kg < 32768);
    }
    /* sc_hash64 / sc_table_hash: deterministic, every length 0..64 from an exact-size buffer. */
    for (size_t n = 0; n <= 64; n++) {
        uint8_t *p = exact_copy(seq, n < 17 ? n : 17);
        size_t m = n < 17 ? n : 17;
        CHECK(sc_hash64(p, m) == sc_hash64(p, m));
        CHECK(sc_table_hash(p, m) != 0);
        exact_free(p, m);
    }
}

/* ---------------------------------------------------------------- varints and big-endian */

static void test_varint(void) {
    const uint64_t vals[] = {0, 1, 127, 128, 255, 300, 16383, 16384, (1ULL << 21) - 1, 1ULL << 21,
                             (1ULL << 35) + 5, (1ULL << 56) - 1, 1ULL << 56, (1ULL << 63) - 1, 1ULL << 63,
                             UINT64_MAX};
    for (size_t i = 0; i < sizeof vals / sizeof vals[0]; i++) {
        uint8_t tmp[SC_VARINT_MAX];
        size_t n = sc_varint_put(tmp, vals[i]);
        CHECK(n >= 1 && n <= SC_VARINT_MAX);
        uint8_t *p = exact_copy(tmp, n);
        uint64_t out = 0;
        CHECK(sc_varint_get(p, p + n, &out) == n);
        CHECK(out == vals[i]);
        for (size_t k = 0; k < n; k++) CHECK(sc_varint_get(p, p + k, &out) == 0); /* truncated */
        exact_free(p, n);
    }
    for (int i = 0; i < 200000; i++) {
        uint64_t v = rnd() >> rnd_below(64);
        uint8_t tmp[SC_VARINT_MAX];
        size_t n = sc_varint_put(tmp, v);
        uint64_t out = 0;
        CHECK(sc_varint_get(tmp, tmp + n, &out) == n && out == v);
    }
    uint64_t out = 0;
    uint8_t *e = exact_copy("", 0);
    CHECK(sc_varint_get(e, e, &out) == 0); /* empty */
    exact_free(e, 0);
    uint8_t over[11];
    memset(over, 0x80, sizeof over);
    over[10] = 0;
    uint8_t *p = exact_copy(over, 11);
    CHECK(sc_varint_get(p, p + 11, &out) == 0); /* longer than 10 bytes */
    exact_free(p, 11);
    uint8_t big[10];
    memset(big, 0xff, 9);
    big[9] = 0x02; /* 2^64: overflows */
    p = exact_copy(big, 10);
    CHECK(sc_varint_get(p, p + 10, &out) == 0);
    exact_free(p, 10);
    big[9] = 0x01; /* UINT64_MAX: the largest that fits */
    p = exact_copy(big, 10);
    CHECK(sc_varint_get(p, p + 10, &out) == 10 && out == UINT64_MAX);
    exact_free(p, 10);
    /* Random garbage of every short length: never reads past the end, never claims more than it has. */
    for (int i = 0; i < 100000; i++) {
        size_t n = rnd_below(12);
        uint8_t tmp[12];
        for (size_t k = 0; k < n; k++) tmp[k] = (uint8_t)rnd();
        p = exact_copy(tmp, n);
        size_t used = sc_varint_get(p, p + n, &out);
        CHECK(used <= n);
        exact_free(p, n);
    }

    uint8_t b[8];
    sc_be16_put(b, 0xBEEF);
    CHECK(b[0] == 0xBE && b[1] == 0xEF && sc_be16_get(b) == 0xBEEF);
    sc_be64_put(b, 0x0102030405060708ULL);
    CHECK(b[0] == 1 && b[7] == 8 && sc_be64_get(b) == 0x0102030405060708ULL);
    sc_be64_put(b, UINT64_MAX);
    CHECK(sc_be64_get(b) == UINT64_MAX);
}

/* ---------------------------------------------------------------- sc_buf */

static void test_buf(void) {
    sc_buf b = {0};
    CHECK(sc_buf_write(&b, "", 0) == SC_OK && b.len == 0);
    for (int i = 0; i < 10000; i++) CHECK(sc_buf_put_byte(&b, (uint8_t)i) == SC_OK);
    CHECK(b.len == 10000 && b.cap >= 10000);
    for (int i = 0; i < 10000; i++) CHECK(b.data[i] == (uint8_t)i);
    uint8_t chunk[777];
    memset(chunk, 0xAB, sizeof chunk);
    for (int i = 0; i < 50; i++) CHECK(sc_buf_write(&b, chunk, sizeof chunk) == SC_OK);
    CHECK(b.len == 10000 + 50 * 777 && b.data[b.len - 1] == 0xAB);
    size_t len = b.len, cap = b.cap;
    CHECK(sc_buf_grow(&b, SIZE_MAX - 10) == SC_ENOMEM); /* overflow guard: buffer unchanged */
    CHECK(b.len == len && b.cap == cap);
    CHECK(sc_buf_reserve(&b, 1 << 20) == SC_OK && b.cap - b.len >= (1u << 20));
    sc_buf_free(&b);
    CHECK(b.data == NULL && b.len == 0 && b.cap == 0);
    sc_buf_free(&b); /* idempotent */
}

/* ---------------------------------------------------------------- composite key codec */

static void check_parse(const uint8_t *key, size_t klen, const uint8_t *ns, size_t nslen, const uint8_t *uk,
                        size_t uklen, uint16_t kg, uint16_t sid) {
    sc_buf b = {0};
    CHECK(sc_kc_build_prefix(&b, kg, sid, key, klen, ns, nslen) == SC_OK);
    size_t plen = b.len;
    CHECK(sc_buf_write(&b, uk, uklen) == SC_OK);
    size_t n = b.len;
    uint8_t *p = exact_copy(b.data, n);
    sc_kc_parts parts;
    CHECK(sc_kc_parse(p, n, &parts) == SC_OK);
    CHECK(parts.key_group == kg && parts.state_id == sid);
    CHECK(parts.klen == klen && (klen == 0 || memcmp(parts.key, key, klen) == 0));
    CHECK(parts.nslen == nslen && (nslen == 0 || memcmp(parts.ns, ns, nslen) == 0));
    CHECK(parts.uklen == uklen && (uklen == 0 || memcmp(parts.user_key, uk, uklen) == 0));
    CHECK(parts.user_key == p + plen);
    /* Every truncation inside the prefix is malformed; past it, the rest is a (shorter) user key. */
    for (size_t k = 0; k < n; k++) {
        uint8_t *q = exact_copy(p, k);
        sc_status st = sc_kc_parse(q, k, &parts);
        if (k < plen)
            CHECK(st == SC_ECORRUPT);
        else
            CHECK(st == SC_OK && parts.uklen == k - plen);
        exact_free(q, k);
    }
    exact_free(p, n);
    sc_buf_free(&b);
}

static void test_keycodec(void) {
    uint8_t key[300], ns[200], uk[64];
    for (size_t i = 0; i < sizeof key; i++) key[i] = (uint8_t)(i * 7);
    for (size_t i = 0; i < sizeof ns; i++) ns[i] = (uint8_t)(255 - i);
    for (size_t i = 0; i < sizeof uk; i++) uk[i] = (uint8_t)(i ^ 0x5a);
    check_parse(key, 0, ns, 0, uk, 0, 0, 0);
    check_parse(key, 1, ns, 0, uk, 0, 127, 1);
    check_parse(key, 8, ns, 1, uk, 5, 0xFFFF, 0xFFFF);
    check_parse(key, 127, ns, 128, uk, 64, 32767, 3); /* one- and two-byte length varints */
    check_parse(key, 300, ns, 200, uk, 1, 5, 65535);

    /* The prefix sorts by key group first (big-endian). */
    sc_buf a = {0}, b = {0};
    CHECK(sc_kc_build_prefix(&a, 1, 9, key, 3, ns, 2) == SC_OK);
    CHECK(sc_kc_build_prefix(&b, 256, 0, key, 3, ns, 2) == SC_OK);
    CHECK(memcmp(a.data, b.data, 4) < 0);
    /* Reuse of a buffer replaces its contents. */
    CHECK(sc_kc_build_prefix(&a, 2, 2, key, 0, ns, 0) == SC_OK && a.len == SC_KC_HEAD + 2);
    sc_buf_free(&a);
    sc_buf_free(&b);

    /* Hand-made malformed keys. */
    sc_kc_parts parts;
    struct {
        const char *bytes;
        size_t n;
    } bad[] = {
        {"", 0},
        {"\x00", 1},
        {"\x00\x01\x00", 3},
        {"\x00\x01\x00\x02", 4},                         /* no key length */
        {"\x00\x01\x00\x02\x05" "abcd", 9},              /* key length 5, 4 bytes */
        {"\x00\x01\x00\x02\x01" "a", 6},                 /* no namespace length */
        {"\x00\x01\x00\x02\x01" "a\x02" "b", 8},         /* namespace length 2, 1 byte */
        {"\x00\x01\x00\x02\x80", 5},                     /* truncated varint */
        {"\x00\x01\x00\x02\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", 14}, /* length 2^64-1 */
        {"\x00\x01\x00\x02\xff\xff\xff\xff\xff\xff\xff\xff\x7f", 13},     /* length 2^63-1 */
        {"\x00\x01\x00\x02\x00\xff\xff\xff\xff\x0f", 10},                 /* ns length 2^32-1 */
        {"\x00\x01\x00\x02\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x00", 15}, /* 11-byte varint */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        uint8_t *p = exact_copy(bad[i].bytes, bad[i].n);
        CHECK(sc_kc_parse(p, bad[i].n, &parts) == SC_ECORRUPT);
        exact_free(p, bad[i].n);
    }
    /* Random garbage in exact-size buffers: parse never reads out of bounds and its parts stay inside. */
    unsigned long ok = 0;
    for (int i = 0; i < 300000; i++) {
        size_t n = rnd_below(24);
        uint8_t tmp[24];
        for (size_t k = 0; k < n; k++) tmp[k] = (uint8_t)(rnd_below(4) ? rnd_below(8) : rnd());
        uint8_t *p = exact_copy(tmp, n);
        if (sc_kc_parse(p, n, &parts) == SC_OK) {
            ok++;
            CHECK(parts.key >= p + SC_KC_HEAD && parts.key + parts.klen <= p + n);
            CHECK(parts.ns >= parts.key + parts.klen && parts.ns + parts.nslen <= p + n);
            CHECK(parts.user_key == parts.ns + parts.nslen && parts.user_key + parts.uklen == p + n);
        }
        exact_free(p, n);
    }
    CHECK(ok > 1000); /* the generator does reach valid keys */
}

/* ---------------------------------------------------------------- table vs model */

#define NKEYS 600
typedef struct model_entry {
    int present;
    int dup; /* same bytes as a lower-numbered key (lengths 0 and 1): never used */
    uint8_t key[48];
    size_t klen;
    uint8_t *val;
    size_t vlen;
    int64_t ts;
} model_entry;

static model_entry model[NKEYS];

static void model_set(model_entry *m, const uint8_t *v, size_t n, int64_t ts) {
    free(m->val);
    m->val = (uint8_t *)malloc(n ? n : 1);
    if (!m->val) abort();
    if (n) memcpy(m->val, v, n);
    m->vlen = n;
    m->present = 1;
    m->ts = ts;
}

static void model_append(model_entry *m, const uint8_t *v, size_t n, int64_t ts) {
    if (!m->present) {
        model_set(m, v, n, ts);
        return;
    }
    uint8_t *nv = (uint8_t *)realloc(m->val, m->vlen + n ? m->vlen + n : 1);
    if (!nv) abort();
    if (n) memcpy(nv + m->vlen, v, n);
    m->val = nv;
    m->vlen += n;
}

static void model_del(model_entry *m) {
    free(m->val);
    m->val = NULL;
    m->vlen = 0;
    m->present = 0;
}

/* What sc_table->bytes must be, recomputed from the slots (the accounting rule in sc_table.c). */
static size_t expected_bytes(const sc_table *t) {
    size_t b = sizeof *t + (t->mask + 1) * sizeof(sc_entry);
    for (size_t i = 0; i <= t->mask; i++) {
        const sc_entry *e = &t->slots[i];
        if (e->hash && !sc_entry_is_inline(e)) b += (size_t)e->klen + e->vcap + 16;
    }
    return b;
}

static void check_invariants(const sc_table *t) {
    size_t n = 0;
    for (size_t i = 0; i <= t->mask; i++) {
        sc_entry *e = &t->slots[i];
        if (!e->hash) continue;
        n++;
        CHECK(e->vlen <= e->vcap);
        CHECK(e->hash == sc_table_hash(sc_entry_key(e), e->klen));
        CHECK(sc_table_find(t, sc_entry_key(e), e->klen, e->hash) == e);
    }
    CHECK(n == t->count);
    CHECK(t->count * 4 <= (t->mask + 1) * 3);
    CHECK(t->bytes == expected_bytes(t));
}

static void check_model(const sc_table *t) {
    size_t n = 0;
    for (size_t i = 0; i < NKEYS; i++) {
        model_entry *m = &model[i];
        if (m->dup) continue;
        sc_entry *e = sc_table_find(t, m->key, m->klen, sc_table_hash(m->key, m->klen));
        if (!m->present) {
            CHECK(e == NULL);
            continue;
        }
        n++;
        CHECK(e != NULL);
        CHECK(e->vlen == m->vlen && (m->vlen == 0 || memcmp(sc_entry_value(e), m->val, m->vlen) == 0));
        CHECK(e->ts == m->ts);
    }
    CHECK(n == t->count);
    size_t pos = 0, seen = 0;
    while (sc_table_next(t, &pos)) seen++;
    CHECK(seen == n);
    check_invariants(t);
}

static void fill(uint8_t *p, size_t n, uint64_t seed) {
    for (size_t i = 0; i < n; i++) p[i] = (uint8_t)(seed + i * 31);
}

static void test_table_model(void) {
    /* Key lengths 0..40 so that key + value falls on both sides of SC_INLINE_BYTES (24). */
    for (size_t i = 0; i < NKEYS; i++) {
        model[i].klen = i % 41;
        fill(model[i].key, model[i].klen, i * 1000003);
        if (model[i].klen >= 2) {
            model[i].key[0] = (uint8_t)i; /* distinct keys */
            model[i].key[1] = (uint8_t)(i >> 8);
        }
        model[i].dup = model[i].klen < 2 && i >= 41;
    }
    sc_table *t = sc_table_new(0, 0);
    CHECK(t && t->mask + 1 == 8 && t->count == 0);
    check_invariants(t);
    uint8_t val[400];
    size_t cursor = 0;
    int64_t now = 1000;
    for (int step = 0; step < 60000; step++) {
        size_t i = rnd_below(NKEYS);
        if (model[i].dup) continue;
        model_entry *m = &model[i];
        uint32_t h = sc_table_hash(m->key, m->klen);
        int op = (int)rnd_below(100);
        int64_t ts = now - (int64_t)rnd_below(200);
        if (op < 40) { /* put: value sizes around the inline boundary, sometimes large */
            size_t vlen = rnd_below(4) ? rnd_below(30) : rnd_below(sizeof val);
            fill(val, vlen, rnd());
            sc_entry *out = NULL;
            CHECK(sc_table_put(t, m->key, m->klen, h, val, vlen, ts, &out) == SC_OK);
            CHECK(out && out->vlen == vlen);
            model_set(m, val, vlen, ts);
        } else if (op < 60) { /* append */
            size_t vlen = rnd_below(3) ? rnd_below(9) : rnd_below(100);
            fill(val, vlen, rnd());
            CHECK(sc_table_append(t, m->key, m->klen, h, val, vlen, ts) == SC_OK);
            model_append(m, val, vlen, ts);
        } else if (op < 75) { /* delete */
            CHECK(sc_table_delete(t, m->key, m->klen, h) == m->present);
            model_del(m);
        } else if (op < 85) { /* find */
            sc_entry *e = sc_table_find(t, m->key, m->klen, h);
            CHECK((e != NULL) == m->present);
        } else if (op < 97) { /* incremental TTL cleanup */
            int64_t ttl = 100;
            size_t before = t->count;
            size_t dropped = sc_table_expire_scan(t, &cursor, rnd_below(40), ttl, now);
            CHECK(t->count == before - dropped);
            CHECK(cursor <= t->mask);
            for (size_t k = 0; k < NKEYS; k++) {
                model_entry *mk = &model[k];
                if (!mk->present || mk->dup) continue;
                sc_entry *e = sc_table_find(t, mk->key, mk->klen, sc_table_hash(mk->key, mk->klen));
                if (!e) {
                    CHECK(sc_ttl_expired(mk->ts, ttl, now)); /* only expired entries go */
                    model_del(mk);
                }
            }
            now += 7;
        } else if (op < 99) { /* clone: equal and independent */
            sc_table *c = sc_table_clone(t);
            CHECK(c != NULL);
            check_model(c);
            CHECK(c->bytes <= t->bytes); /* a clone drops spare value capacity */
            /* Mutating the clone leaves the original alone. */
            for (size_t k = 0; k < NKEYS; k += 7)
                if (!model[k].dup) sc_table_delete(c, model[k].key, model[k].klen, sc_table_hash(model[k].key, model[k].klen));
            sc_table_free(c);
        } else { /* full check */
            check_model(t);
        }
        if (step % 5000 == 0) check_model(t);
    }
    check_model(t);
    /* A full sweep with ttl=1 at a late time removes everything, whatever the cursor. */
    for (int round = 0; round < 3 && t->count; round++) sc_table_expire_scan(t, &cursor, t->mask + 1, 1, now + 1000);
    CHECK(t->count == 0);
    check_invariants(t);
    for (size_t k = 0; k < NKEYS; k++) model_del(&model[k]);
    /* ttl 0 = off: nothing expires. */
    CHECK(sc_table_put(t, (const uint8_t *)"k", 1, sc_table_hash((const uint8_t *)"k", 1), val, 3, 0, NULL) == SC_OK);
    CHECK(sc_table_expire_scan(t, &cursor, 100, 0, INT64_MAX) == 0 && t->count == 1);
    /* A timestamp so large that ts + ttl overflows never expires (and is no UB). */
    CHECK(sc_table_put(t, (const uint8_t *)"k", 1, sc_table_hash((const uint8_t *)"k", 1), val, 3, INT64_MAX - 1,
                       NULL) == SC_OK);
    CHECK(sc_table_expire_scan(t, &cursor, 100, 1000, INT64_MAX) == 0 && t->count == 1);
    sc_table_clear(t);
    CHECK(t->count == 0);
    check_invariants(t);
    sc_table_free(t);
    sc_table_free(NULL);
    sc_table_clear(NULL);
}

/* The inline/external boundary, explicitly. */
static void test_table_boundary(void) {
    sc_table *t = sc_table_new(16, 0);
    CHECK(t != NULL);
    uint8_t key[40], val[300], got[300];
    fill(key, sizeof key, 1);
    fill(val, sizeof val, 2);
    for (size_t klen = 0; klen <= 30; klen++) {
        uint32_t h = sc_table_hash(key, klen);
        for (size_t vlen = 0; vlen <= 30; vlen++) {
            sc_entry *e;
            CHECK(sc_table_put(t, key, klen, h, val, vlen, 5, &e) == SC_OK);
            CHECK(sc_entry_is_inline(e) == (klen + e->vcap <= SC_INLINE_BYTES));
            if (klen + vlen <= SC_INLINE_BYTES) CHECK(sc_entry_is_inline(e));
            CHECK(e->vlen == vlen && memcmp(sc_entry_key(e), key, klen) == 0);
            CHECK(vlen == 0 || memcmp(sc_entry_value(e), val, vlen) == 0);
            check_invariants(t);
        }
        /* Grow a value far past the inline size, then shrink it back (to inline when it fits). */
        sc_entry *e;
        CHECK(sc_table_put(t, key, klen, h, val, 300, 5, &e) == SC_OK && !sc_entry_is_inline(e));
        CHECK(sc_table_put(t, key, klen, h, val + 1, 100, 5, &e) == SC_OK);
        CHECK(e->vlen == 100 && memcmp(sc_entry_value(e), val + 1, 100) == 0);
        check_invariants(t);
        CHECK(sc_table_put(t, key, klen, h, val + 2, 3, 5, &e) == SC_OK);
        CHECK(e->vlen == 3 && memcmp(sc_entry_value(e), val + 2, 3) == 0);
        if (klen + 3 <= SC_INLINE_BYTES) CHECK(sc_entry_is_inline(e));
        check_invariants(t);
        /* Appends one byte at a time across the boundary. */
        CHECK(sc_table_delete(t, key, klen, h) == 1);
        CHECK(sc_table_delete(t, key, klen, h) == 0);
        for (size_t n = 0; n < 100; n++) CHECK(sc_table_append(t, key, klen, h, val + n, 1, 7) == SC_OK);
        e = sc_table_find(t, key, klen, h);
        CHECK(e && e->vlen == 100 && memcmp(sc_entry_value(e), val, 100) == 0);
        memcpy(got, sc_entry_value(e), 100);
        CHECK(memcmp(got, val, 100) == 0);
        check_invariants(t);
        /* Empty append creates an empty value. */
        CHECK(sc_table_delete(t, key, klen, h) == 1);
        CHECK(sc_table_append(t, key, klen, h, val, 0, 7) == SC_OK);
        e = sc_table_find(t, key, klen, h);
        CHECK(e && e->vlen == 0);
        check_invariants(t);
    }
    CHECK(sc_table_put(t, key, 1, 1, val, (size_t)UINT32_MAX, 0, NULL) == SC_ETOOBIG);
    CHECK(sc_table_append(t, key, 1, 1, val, (size_t)UINT32_MAX, 0) == SC_ETOOBIG);
    sc_table_free(t);
}

/* Many entries: repeated growth, the mmap'd (>= 2 MiB) slot arrays, deletion of most, clone. */
static void test_table_large(void) {
    sc_table *t = sc_table_new(1, 0);
    CHECK(t != NULL);
    const uint32_t N = 60000;
    for (uint32_t i = 0; i < N; i++) {
        uint8_t k[8], v[40];
        sc_be64_put(k, (uint64_t)i * 2654435761U);
        fill(v, i % 40, i);
        CHECK(sc_table_put(t, k, 8, sc_table_hash(k, 8), v, i % 40, i, NULL) == SC_OK);
    }
    CHECK(t->count == N && (t->mask + 1) * sizeof(sc_entry) >= (2u << 20));
    check_invariants(t);
    sc_table *c = sc_table_clone(t);
    CHECK(c && c->count == N && c->bytes == t->bytes);
    for (uint32_t i = 0; i < N; i++) {
        uint8_t k[8], v[40];
        sc_be64_put(k, (uint64_t)i * 2654435761U);
        fill(v, i % 40, i);
        sc_entry *e = sc_table_find(c, k, 8, sc_table_hash(k, 8));
        CHECK(e && e->vlen == i % 40 && (i % 40 == 0 || memcmp(sc_entry_value(e), v, i % 40) == 0));
        if (i % 10) CHECK(sc_table_delete(t, k, 8, sc_table_hash(k, 8)) == 1);
    }
    CHECK(t->count == N / 10);
    check_invariants(t);
    size_t cursor = 12345;
    /* ts = i for the survivors (multiples of 10): expire those below 30000. */
    size_t dropped = 0;
    for (int round = 0; round < 3; round++) dropped += sc_table_expire_scan(t, &cursor, t->mask + 1, 1, 30000);
    CHECK(dropped == 3000 && t->count == 3000);
    check_invariants(t);
    sc_table_free(c);
    sc_table_free(t);
}

/* Nested tables (the heap MapState): the outer table owns the inner ones. */
static void test_table_nested(void) {
    sc_table *t = sc_table_new(8, 1);
    CHECK(t != NULL);
    sc_status st;
    CHECK(sc_table_get_inner(t, (const uint8_t *)"nope", 4, sc_table_hash((const uint8_t *)"nope", 4), 0, &st) ==
              NULL &&
          st == SC_OK);
    size_t total = 0;
    for (uint32_t i = 0; i < 200; i++) {
        uint8_t k[4];
        memcpy(k, &i, 4);
        sc_table *in = sc_table_get_inner(t, k, 4, sc_table_hash(k, 4), 1, &st);
        CHECK(in && st == SC_OK);
        CHECK(sc_table_get_inner(t, k, 4, sc_table_hash(k, 4), 1, &st) == in);
        for (uint32_t j = 0; j < i % 13; j++) {
            uint8_t uk[6], v[30];
            memcpy(uk, &j, 4);
            uk[4] = 'u';
            uk[5] = (uint8_t)i;
            fill(v, j * 2, j);
            CHECK(sc_table_put(in, uk, 6, sc_table_hash(uk, 6), v, j * 2, 0, NULL) == SC_OK);
            total++;
        }
    }
    CHECK(t->count == 200 && sc_table_count_deep(t) == total);
    size_t deep = sc_table_bytes_deep(t);
    CHECK(deep > t->bytes);
    sc_table *c = sc_table_clone(t);
    CHECK(c && sc_table_count_deep(c) == total && sc_table_bytes_deep(c) == deep);
    /* Deleting an outer entry frees its inner table (leak-checked by ASan/valgrind). */
    for (uint32_t i = 0; i < 200; i += 2) {
        uint8_t k[4];
        memcpy(k, &i, 4);
        CHECK(sc_table_delete(t, k, 4, sc_table_hash(k, 4)) == 1);
    }
    CHECK(t->count == 100);
    CHECK(sc_table_count_deep(c) == total); /* the clone is independent */
    sc_table_clear(c);
    CHECK(c->count == 0 && sc_table_count_deep(c) == 0);
    sc_table_free(c);
    sc_table_free(t);
}

/* ---------------------------------------------------------------- negative controls */

static int plant(const char *what) {
    if (strcmp(what, "--plant-ub") == 0) {
        volatile int x = INT_MAX;
        volatile int y = x + 1; /* signed overflow: UBSan must abort here */
        printf("no UBSan: %d\n", y);
        return 0;
    }
    if (strcmp(what, "--plant-oob") == 0) {
        uint8_t *p = exact_copy("abcd", 4);
        volatile uint8_t c = p[4]; /* heap over-read: ASan (and valgrind) must report it */
        printf("no ASan: %d\n", c);
        exact_free(p, 4);
        return 0;
    }
    fprintf(stderr, "usage: test_csrc [--plant-ub | --plant-oob]\n");
    return 2;
}

int main(int argc, char **argv) {
    if (argc > 1) return plant(argv[1]);
    test_murmur3();
    test_varint();
    test_buf();
    test_keycodec();
    test_table_boundary();
    test_table_model();
    test_table_large();
    test_table_nested();
    printf("test_csrc: %lu checks passed\n", checks);
    return 0;
}
