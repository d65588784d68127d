/* C twin of runtime/_tokenizer_py.py: the tokenizer hot loops, text in, ids out.
 *
 * Same surface as the Python twin, `WordPieceEncoder(vocab, **options)`,
 * `BPEEncoder(vocab, merges, **options)`, `SentencePieceBPEEncoder(vocab,
 * merges, **options)` and `UnigramEncoder(pieces, **options)`, each with
 * `.encode(text) -> list[int]`, plus `.encode_batch(texts)`. Same steps, in the
 * same order, and the same ids for every str (tests/test_tokenizer_c.py,
 * test_tokenizer_bpe.py, test_tokenizer_sentencepiece.py,
 * test_tokenizer_unigram.py). WordPiece:
 *
 *     added tokens -> clean, CJK spacing, NFD + drop Mn, lowercase
 *                  -> split on whitespace and punctuation -> WordPiece -> ids
 *
 * An all-ASCII text (most of them) takes these steps in one pass instead
 * (encode_ascii), with per-char tables that the general path makes for itself.
 *
 * The Unicode tables come from the twin itself: runtime/_gen_tables.py writes
 * _tokenizer_tables.h at build time (setup.py), and the module refuses to load
 * under another Unicode version than the one they were made with.
 *
 * Each call copies the text to a UCS4 buffer and then works without the GIL
 * (but for texts under RELEASE_GIL_CHARS); an encoder is read-only after
 * construction but for its slots (a pool of 1 MB caches of words and their
 * ids, with the scratch buffers of a call, one per thread encoding at the
 * same time, each guarded by a try-lock; see "word caches"), so threads may
 * share one. encode_batch
 * splits a big batch (BATCH_CHARS_PER_THREAD chars a thread) into contiguous
 * runs of texts and encodes them on up to BATCH_THREADS_MAX POSIX threads at
 * once, each with its own scratch and id buffers; a small batch, or a build without pthreads,
 * runs on the calling thread. Allocation in the GIL-free part uses PyMem_Raw*,
 * the only allocator that allows it. Python objects in there are borrowed id
 * ints owned by the encoder, touched again only with the GIL.
 *
 * Module layout follows pallets/markupsafe's _speedups.c: multi-phase init
 * (PEP 489), a heap type, no global mutable state.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

/* encode_batch's worker threads: POSIX threads where there are some. */
#if defined(HAVE_PTHREAD_H) && !defined(_WIN32)
#define TOK_BATCH_THREADS 1
#include <pthread.h>
#include <unistd.h>
#if defined(__linux__)
#include <sched.h>
#endif
#endif

#include "_tokenizer_tables.h"

typedef Py_UCS4 ucs4;

/* ------------------------------------------------------------ Unicode tables */

static inline unsigned
char_flags(ucs4 c)
{
    /* c < 0x110000: Python strs hold nothing else. */
    if (c < 128) {
        return tok_ascii_flags[c];
    }
    return tok_flags[((size_t)tok_index[c >> TOK_SHIFT] << TOK_SHIFT)
                     | (c & ((1u << TOK_SHIFT) - 1))];
}

static const tok_map *
find_map(const tok_map *rows, size_t n, ucs4 c)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (rows[mid].cp < c) {
            lo = mid + 1;
        }
        else if (rows[mid].cp > c) {
            hi = mid;
        }
        else {
            return &rows[mid];
        }
    }
    return NULL;
}

static unsigned
combining_class(ucs4 c)
{
    if (!(char_flags(c) & F_CCC)) {
        return 0;
    }
    size_t lo = 0, hi = sizeof(tok_ccc) / sizeof(tok_ccc[0]);
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (tok_ccc[mid].cp < c) {
            lo = mid + 1;
        }
        else if (tok_ccc[mid].cp > c) {
            hi = mid;
        }
        else {
            return tok_ccc[mid].ccc;
        }
    }
    return 0;
}

#define N_ROWS(table) (sizeof(table) / sizeof((table)[0]))

/* ------------------------------------------- growable buffers (GIL not held) */

typedef struct {
    ucs4 *data;
    size_t len, cap;
} TextBuf;

typedef struct {
    PyObject **data; /* borrowed: the encoder owns the id ints */
    size_t len, cap;
} IdBuf;

typedef struct {
    uint64_t *data;
    size_t cap;
} HashBuf;

static int
grow(void **data, size_t *cap, size_t need, size_t item)
{
    if (need <= *cap) {
        return 0;
    }
    size_t cap2 = *cap ? *cap : 64;
    while (cap2 < need) {
        if (cap2 > PY_SSIZE_T_MAX / 2 / item) {
            return -1;
        }
        cap2 *= 2;
    }
    void *data2 = PyMem_RawRealloc(*data, cap2 * item);
    if (data2 == NULL) {
        return -1;
    }
    *data = data2;
    *cap = cap2;
    return 0;
}

static inline int
text_reserve(TextBuf *b, size_t extra)
{
    if (extra > PY_SSIZE_T_MAX - b->len) {
        return -1;
    }
    return grow((void **)&b->data, &b->cap, b->len + extra, sizeof(ucs4));
}

/* Empties `out` with room for an n-char text normalized: ' ' c ' ' at most per
 * char in the common case (longer lowercases reserve more as they go). */
static int
text_restart(TextBuf *out, size_t n)
{
    out->len = 0;
    if (n > PY_SSIZE_T_MAX / 3 / sizeof(ucs4)) {
        return -1;
    }
    return text_reserve(out, 3 * n);
}

static inline int
ids_push(IdBuf *b, PyObject *id)
{
    if (b->len == b->cap
        && grow((void **)&b->data, &b->cap, b->len + 1, sizeof(PyObject *)) < 0) {
        return -1;
    }
    b->data[b->len++] = id;
    return 0;
}

/* BPE's working state for one word: a linked list of symbols and a heap. */
typedef struct {
    uint32_t rank, pos, merged;
} MergeEntry;

typedef struct {
    uint8_t *bytes;        /* the word's UTF-8 */
    int32_t *ids;          /* symbol ids; -1 once merged into its left neighbour */
    int32_t *prev, *next;  /* -1 at the ends */
    int32_t *result;       /* the final ids (aliases prev) */
    MergeEntry *heap;
    size_t cap, heap_cap;
} BpeBuf;

struct CacheEntry;

/* What keeps apart the structs that different threads write next to each
 * other in an array (one per batch thread): without it, the lengths each
 * thread bumps per char shared cache lines, and batches ran ~5% slower. Two
 * lines, for CPUs that fetch lines in pairs; padding, so no alignment is
 * assumed of PyObject_Malloc'd memory. */
#define FALSE_SHARING_PAD 128

/* Working memory of one encode call (or one batch thread): never shared
 * between threads. The encoder keeps one per word cache (see slot_take), so a
 * call on a short text allocates nothing but its result. */
typedef struct {
    TextBuf input;                /* encode's text as UCS4 */
    TextBuf norm, tmp, sorted;
    HashBuf hashes;
    BpeBuf bpe;
    IdBuf ids;                    /* encode's ids */
    double *best;                 /* Unigram's Viterbi: best score of each prefix ... */
    int32_t *from, *piece;        /* ... where its last piece starts, that piece's id */
    size_t best_cap;
    struct CacheEntry *cache;     /* the word cache this text may use; NULL: none */
    int slot;                     /* which of the encoder's slots this is; -1: none */
    int ascii;                    /* the text being encoded is all ASCII */
    const ucs4 *text;             /* where it starts (SentencePiece-style BPE's "first") */
    char pad[FALSE_SHARING_PAD];
} Scratch;

static void
scratch_free(Scratch *s)
{
    PyMem_RawFree(s->input.data);
    PyMem_RawFree(s->norm.data);
    PyMem_RawFree(s->tmp.data);
    PyMem_RawFree(s->sorted.data);
    PyMem_RawFree(s->hashes.data);
    PyMem_RawFree(s->bpe.bytes);
    PyMem_RawFree(s->bpe.ids);
    PyMem_RawFree(s->bpe.prev);
    PyMem_RawFree(s->bpe.next);
    PyMem_RawFree(s->bpe.heap);
    PyMem_RawFree(s->ids.data);
    PyMem_RawFree(s->best);
    PyMem_RawFree(s->from);
    PyMem_RawFree(s->piece);
    memset(s, 0, sizeof(*s));
}

/* Buffers kept between calls hold at most this many items each (a longer
 * text's are freed after it): 256 KB of UCS4, enough for 64k-char texts. */
#define SCRATCH_KEEP 65536

static void
scratch_trim(Scratch *s)
{
    if (s->input.cap > SCRATCH_KEEP || s->norm.cap > SCRATCH_KEEP || s->tmp.cap > SCRATCH_KEEP
        || s->sorted.cap > SCRATCH_KEEP || s->hashes.cap > SCRATCH_KEEP
        || s->bpe.cap > SCRATCH_KEEP || s->bpe.heap_cap > SCRATCH_KEEP
        || s->ids.cap > SCRATCH_KEEP || s->best_cap > SCRATCH_KEEP) {
        scratch_free(s);
    }
}

/* ------------------------------------------------------------- word caches */

/* Each encoder (WordPiece or BPE) has a word cache: short words and their ids,
 * two-way set-associative by hash (least recently used out: on the
 * benchmark's paragraphs 1.8% of pieces miss, against 3.1% direct-mapped),
 * one 64-byte entry each, CACHE_SLOTS of them: 1 MB per encoder (calloc'd, so
 * pages cost memory only once used). A word is its UTF-8 (WordPiece: a
 * piece as word_piece gets it, after normalization and the punctuation split;
 * BPE: a pre-token's bytes); a word over CACHE_BYTES bytes, or with more than
 * CACHE_IDS ids, is not cached. Ids are int32: BPE's token
 * ids, WordPiece's vocab entry indices (-1: unk).
 *
 * Encoding runs without the GIL and threads may share an encoder, so a lock
 * guards each cache. An encoder has a pool of CACHE_POOL caches: each call
 * (each batch thread) try-locks them in order and uses the first free one, so
 * threads that encode at the same time (encode_batch's, or the application's)
 * each keep a warm cache of their own; a cache is made the first time a thread
 * needs it (one thread: 1 MB; each further concurrent thread: 1 MB more) and
 * kept until the encoder goes, with the scratch buffers of its calls. A call
 * that finds every cache busy is encoded without one; nobody waits. Never waiting, a lock is a bare atomic flag (a PyThread lock
 * costs ~30 ns a text, 8% of a short one). */
#define CACHE_SHIFT 14
#define CACHE_SLOTS (1 << CACHE_SHIFT)
#define CACHE_BYTES 22
#define CACHE_IDS 7

typedef struct CacheEntry {
    uint64_t hash;
    uint8_t length, count; /* length 0: empty */
    uint8_t bytes[CACHE_BYTES];
    int32_t ids[CACHE_IDS];
} CacheEntry;

/* As many as encode_batch runs threads (BATCH_THREADS_MAX). */
#define CACHE_POOL 8

typedef struct {
    /* entries[i] and scratch[i] are used only by the thread holding busy[i]:
     * entries[i] is made by the first call that takes lock i (entries[0] at
     * construction); scratch[i] keeps its buffers from call to call. */
    CacheEntry *entries[CACHE_POOL];
    Scratch scratch[CACHE_POOL];
    long busy[CACHE_POOL]; /* lock i: 1 while a call uses slot i */
} WordCache;

/* Try-lock and unlock of a busy flag: acquire and release ordering. The
 * flag is the one thing an encode call writes in an encoder but its cache. */
#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>

static inline int
flag_try_lock(const long *busy)
{
    return _InterlockedExchange((long *)busy, 1) == 0;
}

static inline void
flag_unlock(const long *busy)
{
    _InterlockedExchange((long *)busy, 0);
}
#else /* GCC, Clang and compatible compilers */
static inline int
flag_try_lock(const long *busy)
{
    return __atomic_exchange_n((long *)busy, 1, __ATOMIC_ACQUIRE) == 0;
}

static inline void
flag_unlock(const long *busy)
{
    __atomic_store_n((long *)busy, 0, __ATOMIC_RELEASE);
}
#endif

/* GIL held; a Python error on failure. */
static int
word_cache_init(WordCache *c)
{
    memset(c, 0, sizeof(*c));
    c->entries[0] = PyMem_RawCalloc(CACHE_SLOTS, sizeof(CacheEntry));
    if (c->entries[0] == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* Also for a cache that word_cache_init never saw (all NULL). */
static void
word_cache_free(WordCache *c)
{
    for (int i = 0; i < CACHE_POOL; i++) {
        PyMem_RawFree(c->entries[i]);
        c->entries[i] = NULL;
        scratch_free(&c->scratch[i]);
    }
}

/* The first free slot of the pool, a cache and the scratch that goes with it,
 * for one call (or one batch thread); slot_give gives it back. Without a
 * free slot (or memory for a new cache), `own`: no cache, fresh buffers. */
static Scratch *
slot_take(const WordCache *c, Scratch *own)
{
    WordCache *pool = (WordCache *)c; /* the locks and their slots are the mutable part */
    for (int i = 0; i < CACHE_POOL; i++) {
        if (!flag_try_lock(&pool->busy[i])) {
            continue;
        }
        if (pool->entries[i] == NULL) {
            pool->entries[i] = PyMem_RawCalloc(CACHE_SLOTS, sizeof(CacheEntry));
        }
        if (pool->entries[i] == NULL) {
            flag_unlock(&pool->busy[i]);
            break;
        }
        Scratch *s = &pool->scratch[i];
        s->cache = pool->entries[i];
        s->slot = i;
        return s;
    }
    memset(own, 0, sizeof(*own));
    own->slot = -1;
    return own;
}

static void
slot_give(const WordCache *c, Scratch *s)
{
    if (s->slot < 0) {
        scratch_free(s);
        return;
    }
    int slot = s->slot;
    scratch_trim(s);
    flag_unlock(&((WordCache *)c)->busy[slot]);
}

/* The two entries a word of this hash may be in: the most recently used first. */
static inline CacheEntry *
cache_set(CacheEntry *cache, uint64_t hash)
{
    return &cache[2 * ((hash * UINT64_C(0x9E3779B97F4A7C15)) >> (64 - CACHE_SHIFT + 1))];
}

static inline int
cache_holds(const CacheEntry *entry, uint64_t hash, const uint8_t *word, size_t len)
{
    if (entry->length != len || entry->hash != hash) {
        return 0;
    }
    for (size_t i = 0; i < len; i++) { /* memcmp, without a libc call for a few bytes */
        if (entry->bytes[i] != word[i]) {
            return 0;
        }
    }
    return 1;
}

/* The entry of `set` holding the word, made the set's first; NULL if none does. */
static inline const CacheEntry *
cache_find(CacheEntry *set, uint64_t hash, const uint8_t *word, size_t len)
{
    if (cache_holds(&set[0], hash, word, len)) {
        return &set[0];
    }
    if (!cache_holds(&set[1], hash, word, len)) {
        return NULL;
    }
    CacheEntry swap = set[0];
    set[0] = set[1];
    set[1] = swap;
    return &set[0];
}

/* Puts word -> ids first in `set` (0 < len <= CACHE_BYTES), dropping its
 * least recently used entry, if the ids fit. */
static inline void
cache_put(CacheEntry *set, uint64_t hash, const uint8_t *word, size_t len,
          const int32_t *ids, size_t count)
{
    if (count > CACHE_IDS) {
        return;
    }
    set[1] = set[0];
    CacheEntry *entry = &set[0];
    entry->hash = hash;
    entry->length = (uint8_t)len;
    entry->count = (uint8_t)count;
    memcpy(entry->bytes, word, len);
    if (count > 0) {
        memcpy(entry->ids, ids, count * sizeof(int32_t));
    }
}

/* UTF-8 of c at p (a lone surrogate in its 3-byte form); returns how many bytes. */
static inline size_t
utf8_put(uint8_t *p, ucs4 c)
{
    if (c < 0x80) {
        p[0] = (uint8_t)c;
        return 1;
    }
    if (c < 0x800) {
        p[0] = (uint8_t)(0xC0 | c >> 6);
        p[1] = (uint8_t)(0x80 | (c & 0x3F));
        return 2;
    }
    if (c < 0x10000) {
        p[0] = (uint8_t)(0xE0 | c >> 12);
        p[1] = (uint8_t)(0x80 | (c >> 6 & 0x3F));
        p[2] = (uint8_t)(0x80 | (c & 0x3F));
        return 3;
    }
    p[0] = (uint8_t)(0xF0 | c >> 18);
    p[1] = (uint8_t)(0x80 | (c >> 12 & 0x3F));
    p[2] = (uint8_t)(0x80 | (c >> 6 & 0x3F));
    p[3] = (uint8_t)(0x80 | (c & 0x3F));
    return 4;
}

/* --------------------------------------------------------------- the encoder */

/* FNV-1a over code points; vocab keys and WordPiece candidates hash alike. */
#define HASH_BASIS UINT64_C(0xcbf29ce484222325)

static inline uint64_t
hash_step(uint64_t h, ucs4 c)
{
    return (h ^ c) * UINT64_C(0x100000001b3);
}

typedef struct {
    uint64_t hash;
    size_t offset; /* into vocab_chars */
    Py_ssize_t length;
} VocabEntry;

/* A slot of the vocab's open-addressing table: entry index + 1 (0: empty)
 * and the top half of the entry's hash, so that a probe past another key
 * rarely reads its entry. */
typedef struct {
    uint32_t index, tag;
} VocabSlot;

typedef struct {
    size_t offset; /* into added_chars */
    Py_ssize_t length;
    PyObject *id;
    int single_word, lstrip, rstrip;
} AddedEntry;

/* The added tokens of one splitter, sorted by (first char, length descending):
 * the candidates at a position are one run, longest first. */
typedef struct {
    AddedEntry *tokens;
    Py_ssize_t count;
    ucs4 *chars;
    uint64_t first_bits[4]; /* bit (first char & 255): a quick "no token here" */
} AddedSet;

typedef struct {
    PyObject_HEAD
    VocabEntry *vocab;
    PyObject **ids; /* ids[i]: the id of vocab[i] (owned); apart, 8 bytes each, for the cache */
    Py_ssize_t vocab_count;
    VocabSlot *slots;
    uint64_t *filter; /* bit filter_bit(hash) set for every vocab key's hash */
    int filter_shift;
    size_t slot_mask;
    ucs4 *vocab_chars;
    ucs4 *prefix;
    Py_ssize_t prefix_length;
    uint64_t prefix_hash;
    Py_ssize_t longest_token;
    long long max_word_chars;
    PyObject *unk_id;
    PyObject *ascii_piece[128]; /* the ids of each ASCII char as a piece by itself (borrowed) */
    uint8_t ascii_kind[128], ascii_norm[128]; /* encode_ascii's tables */
    int clean_text, handle_chinese_chars, strip_accents, lowercase;
    AddedSet raw_added, normalized_added;
    WordCache cache; /* piece -> vocab entry indices (-1: unk) */
} Encoder;

static inline size_t
slot_of(uint64_t hash, size_t mask)
{
    return (size_t)((hash * UINT64_C(0x9E3779B97F4A7C15)) >> 32) & mask;
}

/* Most probes of the greedy loop miss; a bit per hash in a table that
 * stays in L1 (8 bits per key: 1 in 8 misses gets past it) saves their
 * trip to the slots, which do not. */
static inline size_t
filter_bit(uint64_t hash, int shift)
{
    return (size_t)((hash * UINT64_C(0x9E3779B97F4A7C15)) >> shift);
}

/* memcmp, without a libc call for the few chars of a token. */
static inline int
same_chars(const ucs4 *a, const ucs4 *b, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        if (a[i] != b[i]) {
            return 0;
        }
    }
    return 1;
}

/* The index of prefix + piece in e->vocab, or -1. */
static inline int32_t
vocab_get(const Encoder *e, uint64_t hash, const ucs4 *prefix, Py_ssize_t prefix_length,
          const ucs4 *piece, Py_ssize_t piece_length)
{
    size_t bit = filter_bit(hash, e->filter_shift);
    if (!(e->filter[bit >> 6] >> (bit & 63) & 1)) {
        return -1;
    }
    uint32_t tag = (uint32_t)(hash >> 32);
    for (size_t slot = slot_of(hash, e->slot_mask);; slot = (slot + 1) & e->slot_mask) {
        uint32_t index = e->slots[slot].index;
        if (index == 0) {
            return -1;
        }
        if (e->slots[slot].tag != tag) {
            continue;
        }
        const VocabEntry *entry = &e->vocab[index - 1];
        if (entry->hash == hash && entry->length == prefix_length + piece_length) {
            const ucs4 *key = e->vocab_chars + entry->offset;
            if (same_chars(key, prefix, prefix_length)
                && same_chars(key + prefix_length, piece, piece_length)) {
                return (int32_t)(index - 1);
            }
        }
    }
}

/* ---------------------------------------------------------------- normalize */

/* Appends the lowercase of c; the caller has reserved room for one char. */
static inline int
push_lower(TextBuf *out, ucs4 c, unsigned flags)
{
    if (!(flags & F_LOWER) || c < 128) {
        out->data[out->len++] = c < 128 && (flags & F_LOWER) ? c + ('a' - 'A') : c;
        return 0;
    }
    const tok_map *row = find_map(tok_lower, N_ROWS(tok_lower), c);
    if (text_reserve(out, row->length) < 0) {
        return -1;
    }
    memcpy(out->data + out->len, tok_lower_pool + row->offset, row->length * sizeof(ucs4));
    out->len += row->length;
    return 0;
}

/* Appends the NFD of Hangul syllable c (Unicode 3.12): 2 or 3 jamo, starters
 * that are never marks and never cased. */
static inline int
push_hangul(TextBuf *out, ucs4 c)
{
    if (text_reserve(out, 3) < 0) {
        return -1;
    }
    ucs4 s = c - 0xAC00;
    out->data[out->len++] = 0x1100 + s / 588;
    out->data[out->len++] = 0x1161 + (s % 588) / 28;
    if (s % 28) {
        out->data[out->len++] = 0x11A7 + s % 28;
    }
    return 0;
}

/* NFD of src into dst: decompose, then order each run of non-starters by
 * combining class, stably (what CPython's unicodedata.normalize does with an
 * insertion sort; long runs get a counting sort so Zalgo text stays linear). */
static int
nfd(const ucs4 *src, size_t n, TextBuf *dst, TextBuf *sorted)
{
    dst->len = 0;
    if (text_reserve(dst, n) < 0) {
        return -1;
    }
    int reorder = 0;
    for (size_t i = 0; i < n; i++) {
        ucs4 c = src[i];
        unsigned flags = char_flags(c);
        reorder |= flags & F_CCC;
        if (!(flags & F_DECOMP)) {
            if (text_reserve(dst, 1) < 0) {
                return -1;
            }
            dst->data[dst->len++] = c;
        }
        else if (c >= 0xAC00 && c <= 0xD7A3) {
            if (push_hangul(dst, c) < 0) {
                return -1;
            }
        }
        else {
            const tok_map *row = find_map(tok_decomp, N_ROWS(tok_decomp), c);
            if (text_reserve(dst, row->length) < 0) {
                return -1;
            }
            for (unsigned k = 0; k < row->length; k++) {
                ucs4 d = tok_decomp_pool[row->offset + k];
                reorder |= char_flags(d) & F_CCC;
                dst->data[dst->len++] = d;
            }
        }
    }
    if (!reorder) {
        return 0;
    }
    ucs4 *s = dst->data;
    size_t len = dst->len;
    for (size_t start = 0; start < len;) {
        if (combining_class(s[start]) == 0) {
            start++;
            continue;
        }
        size_t end = start + 1;
        while (end < len && combining_class(s[end]) != 0) {
            end++;
        }
        size_t run = end - start;
        if (run <= 16) {
            for (size_t i = start + 1; i < end; i++) { /* stable insertion sort */
                ucs4 c = s[i];
                unsigned cc = combining_class(c);
                size_t j = i;
                while (j > start && combining_class(s[j - 1]) > cc) {
                    s[j] = s[j - 1];
                    j--;
                }
                s[j] = c;
            }
        }
        else { /* stable counting sort by class */
            size_t count[257] = {0};
            sorted->len = 0;
            if (text_reserve(sorted, run) < 0) {
                return -1;
            }
            for (size_t i = start; i < end; i++) {
                count[combining_class(s[i]) + 1]++;
            }
            for (int k = 1; k < 257; k++) {
                count[k] += count[k - 1];
            }
            for (size_t i = start; i < end; i++) {
                sorted->data[count[combining_class(s[i])]++] = s[i];
            }
            memcpy(s + start, sorted->data, run * sizeof(ucs4));
        }
        start = end;
    }
    return 0;
}

/* Appends c to `out` as the twin's last two steps leave it: nothing if
 * strip_accents drops it (a nonspacing mark), else lowercased if asked.
 * Returns 1 for a char that canonical reordering could move relative to
 * another kept char (a combining class but not a nonspacing mark), which the
 * one-pass normalize leaves to the reordering one; 0 done; -1 no memory. */
static inline int
push_stripped(const Encoder *e, TextBuf *out, ucs4 c)
{
    unsigned flags = char_flags(c);
    if (flags & (F_CCC | F_MN)) {
        if (!(flags & F_MN)) {
            return 1;
        }
        return 0;
    }
    if (text_reserve(out, 1) < 0) {
        return -1;
    }
    if (e->lowercase) {
        return push_lower(out, c, flags);
    }
    out->data[out->len++] = c;
    return 0;
}

/* clean_text's step for one char: false for a control char (dropped), and
 * other whitespace it cleans becomes ' ' (with its flags). */
static inline int
clean_char(const Encoder *e, ucs4 *c, unsigned *flags)
{
    if (e->clean_text && (*flags & (F_CONTROL | F_CLEAN_WS))) {
        if (*flags & F_CONTROL) {
            return 0;
        }
        *c = ' ';
        *flags = char_flags(' ');
    }
    return 1;
}

/* BertNormalizer with strip_accents in the twin's order (clean, CJK spacing,
 * NFD, drop nonspacing marks, lowercase) but one char at a time, which is the
 * same thing unless canonical reordering moves a kept char: NFD only reorders
 * runs of chars with a combining class, and every such char but a few
 * spacing marks is dropped. Returns 1 (and an unfinished `out`) when the text
 * has one of those, 0 when done, -1 without memory. */
static int
normalize_stripping(const Encoder *e, const ucs4 *text, size_t n, TextBuf *out)
{
    if (text_restart(out, n) < 0) {
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        ucs4 c = text[i];
        unsigned flags = char_flags(c);
        if (!clean_char(e, &c, &flags)) {
            continue;
        }
        if (c < 0x80) { /* no mark, decomposition or CJK here */
            if (out->cap == out->len && text_reserve(out, 1) < 0) {
                return -1;
            }
            out->data[out->len++] = e->lowercase && (flags & F_LOWER) ? c + ('a' - 'A') : c;
            continue;
        }
        int cjk = e->handle_chinese_chars && (flags & F_CJK);
        if (cjk) {
            if (text_reserve(out, 1) < 0) {
                return -1;
            }
            out->data[out->len++] = ' ';
        }
        int status = 0;
        if (!(flags & F_DECOMP)) {
            status = push_stripped(e, out, c);
        }
        else if (c >= 0xAC00 && c <= 0xD7A3) {
            status = push_hangul(out, c);
        }
        else {
            const tok_map *row = find_map(tok_decomp, N_ROWS(tok_decomp), c);
            for (unsigned k = 0; k < row->length && status == 0; k++) {
                status = push_stripped(e, out, tok_decomp_pool[row->offset + k]);
            }
        }
        if (status != 0) {
            return status;
        }
        if (cjk) {
            if (text_reserve(out, 1) < 0) {
                return -1;
            }
            out->data[out->len++] = ' ';
        }
    }
    return 0;
}

/* BertNormalizer in the twin's order: clean, CJK spacing, accents, lowercase.
 * Replaces the contents of `out`; uses s->tmp and s->sorted. */
static int
normalize(const Encoder *e, const ucs4 *text, size_t n, Scratch *s, TextBuf *out)
{
    int strip = e->strip_accents;
    if (strip) {
        int status = normalize_stripping(e, text, n, out);
        if (status <= 0) {
            return status;
        }
    }
    /* Pass by pass: clean and CJK spacing (and lowercasing, if no stripping). */
    TextBuf *first = strip ? &s->tmp : out;
    if (text_restart(first, n) < 0) {
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        ucs4 c = text[i];
        unsigned flags = char_flags(c);
        if (!clean_char(e, &c, &flags)) {
            continue;
        }
        if (first->cap - first->len < 3 && text_reserve(first, 3) < 0) {
            return -1;
        }
        int cjk = e->handle_chinese_chars && (flags & F_CJK);
        if (cjk) {
            first->data[first->len++] = ' ';
        }
        if (!strip && e->lowercase) {
            if (push_lower(first, c, flags) < 0 || text_reserve(first, 1) < 0) {
                return -1;
            }
        }
        else {
            first->data[first->len++] = c;
        }
        if (cjk) {
            first->data[first->len++] = ' ';
        }
    }
    if (!strip) {
        return 0;
    }
    /* NFD into `out`, then filter it in place into itself (never longer). */
    if (nfd(s->tmp.data, s->tmp.len, out, &s->sorted) < 0) {
        return -1;
    }
    if (!e->lowercase) {
        size_t kept = 0;
        for (size_t i = 0; i < out->len; i++) {
            if (!(char_flags(out->data[i]) & F_MN)) {
                out->data[kept++] = out->data[i];
            }
        }
        out->len = kept;
        return 0;
    }
    /* Lowercasing may lengthen (U+0130 -> i + U+0307), so go through tmp. */
    s->tmp.len = 0;
    for (size_t i = 0; i < out->len; i++) {
        ucs4 c = out->data[i];
        unsigned flags = char_flags(c);
        if (flags & F_MN) {
            continue;
        }
        if (text_reserve(&s->tmp, 1) < 0 || push_lower(&s->tmp, c, flags) < 0) {
            return -1;
        }
    }
    TextBuf swap = *out;
    *out = s->tmp;
    s->tmp = swap;
    return 0;
}

/* ------------------------------------------------- pre-tokenize + WordPiece */

/* Greedy longest-match-first; any miss makes the whole piece unk. Through the
 * word cache (looked up first: a cache line is cheaper than a vocab probe that
 * misses): `key` is the piece's UTF-8 (`len` bytes; not looked up over
 * CACHE_BYTES), `h` its FNV-1a over chars, the vocab's hash of the piece. */
static int
word_piece_keyed(const Encoder *e, const ucs4 *piece, Py_ssize_t n, uint64_t h,
                 const uint8_t *key, size_t len, Scratch *s, IdBuf *out)
{
    if ((long long)n > e->max_word_chars) {
        return ids_push(out, e->unk_id);
    }
    CacheEntry *entry = NULL;
    if (s->cache != NULL && len <= CACHE_BYTES) {
        entry = cache_set(s->cache, h);
        const CacheEntry *hit = cache_find(entry, h, key, len);
        if (hit != NULL) {
            for (uint8_t i = 0; i < hit->count; i++) {
                int32_t index = hit->ids[i];
                if (ids_push(out, index < 0 ? e->unk_id : e->ids[index]) < 0) {
                    return -1;
                }
            }
            return 0;
        }
    }
    /* No vocab key is longer than longest_token. hashes.data[k]: the hash of
     * piece[0:k], for k up to `most`. */
    Py_ssize_t most = e->longest_token < n ? e->longest_token : n;
    if (grow((void **)&s->hashes.data, &s->hashes.cap, (size_t)most + 1, sizeof(uint64_t)) < 0) {
        return -1;
    }
    uint64_t first = HASH_BASIS;
    for (Py_ssize_t k = 1; k <= most; k++) {
        first = hash_step(first, piece[k - 1]);
        s->hashes.data[k] = first;
    }
    int32_t found[CACHE_IDS]; /* vocab indices for the cache; -1: unk */
    size_t count = 0, mark = out->len;
    for (Py_ssize_t start = 0; start < n;) {
        const ucs4 *prefix = start ? e->prefix : NULL;
        Py_ssize_t prefix_length = start ? e->prefix_length : 0;
        if (start > 0) {
            most = e->longest_token - prefix_length;
            if (most > n - start) {
                most = n - start;
            }
            if (most > 0 && grow((void **)&s->hashes.data, &s->hashes.cap, (size_t)most + 1,
                                 sizeof(uint64_t)) < 0) {
                return -1;
            }
            uint64_t g = e->prefix_hash;
            for (Py_ssize_t k = 1; k <= most; k++) {
                g = hash_step(g, piece[start + k - 1]);
                s->hashes.data[k] = g;
            }
        }
        int32_t index = -1;
        Py_ssize_t k = most;
        for (; k > 0; k--) {
            index = vocab_get(e, s->hashes.data[k], prefix, prefix_length, piece + start, k);
            if (index >= 0) {
                break;
            }
        }
        if (index < 0) { /* the whole piece is unk */
            out->len = mark;
            found[0] = -1;
            count = 1;
            if (ids_push(out, e->unk_id) < 0) {
                return -1;
            }
            break;
        }
        if (ids_push(out, e->ids[index]) < 0) {
            return -1;
        }
        if (count < CACHE_IDS) {
            found[count] = index;
        }
        count++;
        start += k;
    }
    if (entry != NULL) {
        cache_put(entry, h, key, len, found, count);
    }
    return 0;
}

/* word_piece_keyed of a piece, its cache key made here. */
static int
word_piece(const Encoder *e, const ucs4 *piece, Py_ssize_t n, Scratch *s, IdBuf *out)
{
    uint8_t key[CACHE_BYTES + 4]; /* room for the char that goes past the limit */
    size_t len = 0;
    uint64_t h = HASH_BASIS;
    if (s->cache != NULL && n <= CACHE_BYTES && (long long)n <= e->max_word_chars) {
        for (Py_ssize_t k = 0; k < n; k++) {
            h = hash_step(h, piece[k]);
            if (len <= CACHE_BYTES) {
                len += utf8_put(key + len, piece[k]);
            }
        }
    }
    else {
        len = CACHE_BYTES + 1; /* not looked up */
    }
    return word_piece_keyed(e, piece, n, h, key, len, s, out);
}

/* word_piece, but a single ASCII char (punctuation, mostly: a third of all
 * pieces) comes from a table without a call. */
static inline int
piece_ids(const Encoder *e, const ucs4 *piece, Py_ssize_t n, Scratch *s, IdBuf *out)
{
    if (n == 1 && piece[0] < 128) {
        return ids_push(out, e->ascii_piece[piece[0]]);
    }
    return word_piece(e, piece, n, s, out);
}

/* BertPreTokenizer + WordPiece: words split on whitespace, punctuation alone. */
static int
encode_words(const void *ctx, const ucs4 *text, size_t n, Scratch *s, IdBuf *out)
{
    const Encoder *e = ctx;
    size_t run = 0; /* start of the current run of word chars */
    for (size_t i = 0; i <= n; i++) {
        unsigned flags = i < n ? char_flags(text[i]) : F_WS;
        if (!(flags & (F_WS | F_PUNCT))) {
            continue;
        }
        if (run < i && piece_ids(e, text + run, (Py_ssize_t)(i - run), s, out) < 0) {
            return -1;
        }
        if ((flags & F_PUNCT) && !(flags & F_WS)
            && piece_ids(e, text + i, 1, s, out) < 0) {
            return -1;
        }
        run = i + 1;
    }
    return 0;
}

/* -------------------------------------------------------------- added tokens */

/* The longest token of `set` at text[i] (i < n), or NULL. */
static const AddedEntry *
added_at(const AddedSet *set, const ucs4 *text, size_t n, size_t i)
{
    ucs4 c = text[i];
    /* First token whose first char is >= c. */
    Py_ssize_t lo = 0, hi = set->count;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (set->chars[set->tokens[mid].offset] < c) {
            lo = mid + 1;
        }
        else {
            hi = mid;
        }
    }
    for (Py_ssize_t t = lo; t < set->count; t++) {
        const AddedEntry *token = &set->tokens[t];
        const ucs4 *content = set->chars + token->offset;
        if (content[0] != c) {
            break;
        }
        if ((size_t)token->length <= n - i && same_chars(content, text + i, token->length)) {
            return token;
        }
    }
    return NULL;
}

/* Leftmost-longest match of `set` in text[pos:n]: the token, its start in *at. */
static const AddedEntry *
find_added(const AddedSet *set, const ucs4 *text, size_t n, size_t pos, size_t *at)
{
    for (size_t i = pos; i < n; i++) {
        ucs4 c = text[i];
        if (!(set->first_bits[(c & 255) >> 6] >> (c & 63) & 1)) {
            continue;
        }
        const AddedEntry *token = added_at(set, text, n, i);
        if (token != NULL) {
            *at = i;
            return token;
        }
    }
    return NULL;
}

/* Encodes a piece of text; ctx is the encoder (WordPiece or BPE). */
typedef int (*piece_fn)(const void *ctx, const ucs4 *, size_t, Scratch *, IdBuf *);

/* _AddedTokenSplitter.split: ids of the tokens found, `between` on the rest.
 * Like Python's finditer, the search resumes where the match ended, even
 * when single_word rejects it or rstrip took whitespace beyond it. */
static int
split_added(const void *e, const AddedSet *set, const ucs4 *text, size_t n, piece_fn between,
            Scratch *s, IdBuf *out)
{
    size_t offset = 0, pos = 0, start;
    const AddedEntry *token;
    while (set->count && (token = find_added(set, text, n, pos, &start)) != NULL) {
        size_t stop = start + token->length;
        pos = stop;
        if (token->single_word
            && ((start > 0 && (char_flags(text[start - 1]) & F_WORD))
                || (stop < n && (char_flags(text[stop]) & F_WORD)))) {
            continue;
        }
        if (token->lstrip) {
            while (start > offset && (char_flags(text[start - 1]) & F_WS)) {
                start--;
            }
        }
        if (token->rstrip) {
            while (stop < n && (char_flags(text[stop]) & F_WS)) {
                stop++;
            }
        }
        if (offset < start && between(e, text + offset, start - offset, s, out) < 0) {
            return -1;
        }
        if (ids_push(out, token->id) < 0) {
            return -1;
        }
        offset = stop;
    }
    if (offset < n) {
        return between(e, text + offset, n - offset, s, out);
    }
    return 0;
}

static int
encode_raw_piece(const void *ctx, const ucs4 *text, size_t n, Scratch *s, IdBuf *out)
{
    const Encoder *e = ctx;
    if (normalize(e, text, n, s, &s->norm) < 0) {
        return -1;
    }
    return split_added(e, &e->normalized_added, s->norm.data, s->norm.len, encode_words, s,
                       out);
}

/* ASCII text, encode_text in one pass: what each char becomes and does comes
 * from tables made by the general path itself (ascii_tables), and a piece's
 * cache key is made on the way. */
enum { ASCII_WORD, ASCII_SPACE, ASCII_PUNCT, ASCII_DROP, ASCII_STOP, ASCII_ADDED = 8 };

/* Returns 1, with `out` as it was, where an added token may be: at a raw
 * added token (a char with ASCII_ADDED, the first char of one, where one
 * matches) or at an ASCII_STOP char (what the first char of a normalized
 * added token normalizes from). The general path takes that text. */
static int
encode_ascii(const Encoder *e, const ucs4 *text, size_t n, Scratch *s, IdBuf *out)
{
    size_t mark = out->len;
    s->norm.len = 0;
    if (text_reserve(&s->norm, n) < 0) {
        return -1;
    }
    ucs4 *piece = s->norm.data;
    uint8_t key[CACHE_BYTES];
    size_t len = 0;
    uint64_t h = HASH_BASIS;
    for (size_t i = 0; i <= n; i++) {
        ucs4 c = i < n ? text[i] : ' ';
        unsigned kind = i < n ? e->ascii_kind[c] : ASCII_SPACE;
        if (kind & ASCII_ADDED) {
            if (added_at(&e->raw_added, text, n, i) != NULL) {
                out->len = mark;
                return 1;
            }
            kind &= ~ASCII_ADDED;
        }
        if (kind == ASCII_WORD) {
            uint8_t b = e->ascii_norm[c];
            if (len < CACHE_BYTES) {
                key[len] = b;
            }
            piece[len++] = b;
            h = hash_step(h, b);
            continue;
        }
        if (kind == ASCII_DROP) {
            continue;
        }
        if (kind == ASCII_STOP) {
            out->len = mark;
            return 1;
        }
        if (len == 1) {
            if (ids_push(out, e->ascii_piece[piece[0]]) < 0) {
                return -1;
            }
        }
        else if (len > 0
                 && word_piece_keyed(e, piece, (Py_ssize_t)len, h, key, len, s, out) < 0) {
            return -1;
        }
        len = 0;
        h = HASH_BASIS;
        if (kind == ASCII_PUNCT && ids_push(out, e->ascii_piece[e->ascii_norm[c]]) < 0) {
            return -1;
        }
    }
    return 0;
}

/* The whole hot loop; runs without the GIL (but for short texts). */
static int
encode_text(const void *ctx, const ucs4 *text, size_t n, Scratch *s, IdBuf *out)
{
    const Encoder *e = ctx;
    if (s->ascii) {
        int status = encode_ascii(e, text, n, s, out);
        if (status <= 0) {
            return status;
        }
    }
    return split_added(e, &e->raw_added, text, n, encode_raw_piece, s, out);
}

/* ------------------------------------------------------------ construction */

/* An exact int for a vocab or added token id (what the twin returns, as int). */
static PyObject *
id_object(PyObject *value, PyObject *token)
{
    PyObject *id = PyNumber_Index(value);
    if (id == NULL && PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Format(PyExc_TypeError, "the id of token %R must be an int, got %R", token,
                     value);
    }
    return id;
}

static int
build_vocab(Encoder *e, PyObject *vocab)
{
    Py_ssize_t count = PyDict_GET_SIZE(vocab), pos = 0, total = 0;
    PyObject *key, *value;
    while (PyDict_Next(vocab, &pos, &key, &value)) {
        if (!PyUnicode_Check(key)) {
            PyErr_Format(PyExc_TypeError, "vocab keys must be str, got %R", key);
            return -1;
        }
        total += PyUnicode_GET_LENGTH(key);
    }
    if (count >= UINT32_MAX / 2) {
        PyErr_SetString(PyExc_ValueError, "vocab is too large");
        return -1;
    }
    size_t slots = 8;
    while (slots < 2 * (size_t)count) {
        slots *= 2;
    }
    e->vocab = PyMem_Calloc(count ? count : 1, sizeof(VocabEntry));
    e->ids = PyMem_Calloc(count ? count : 1, sizeof(PyObject *));
    e->slots = PyMem_Calloc(slots, sizeof(VocabSlot));
    e->vocab_chars = PyMem_Malloc((total ? total : 1) * sizeof(ucs4));
    int filter_log2 = 9; /* bits: 512 at least, 8 per key, a power of 2 */
    while (((size_t)1 << filter_log2) < 8 * (size_t)count) {
        filter_log2++;
    }
    e->filter_shift = 64 - filter_log2;
    e->filter = PyMem_Calloc((size_t)1 << (filter_log2 - 6), sizeof(uint64_t));
    if (e->vocab == NULL || e->ids == NULL || e->slots == NULL || e->vocab_chars == NULL
        || e->filter == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    e->slot_mask = slots - 1;
    size_t offset = 0;
    pos = 0;
    while (PyDict_Next(vocab, &pos, &key, &value)) {
        Py_ssize_t length = PyUnicode_GET_LENGTH(key);
        ucs4 *chars = e->vocab_chars + offset;
        if (length && PyUnicode_AsUCS4(key, chars, length, 0) == NULL) {
            return -1;
        }
        VocabEntry *entry = &e->vocab[e->vocab_count];
        e->ids[e->vocab_count] = id_object(value, key);
        if (e->ids[e->vocab_count] == NULL) {
            return -1;
        }
        e->vocab_count++; /* owns the id from here: dealloc frees it */
        uint64_t h = HASH_BASIS;
        for (Py_ssize_t i = 0; i < length; i++) {
            h = hash_step(h, chars[i]);
        }
        entry->hash = h;
        entry->offset = offset;
        entry->length = length;
        offset += length;
        if (length > e->longest_token) {
            e->longest_token = length;
        }
        size_t slot = slot_of(h, e->slot_mask);
        while (e->slots[slot].index) {
            slot = (slot + 1) & e->slot_mask;
        }
        e->slots[slot] = (VocabSlot){(uint32_t)e->vocab_count, (uint32_t)(h >> 32)};
        size_t bit = filter_bit(h, e->filter_shift);
        e->filter[bit >> 6] |= UINT64_C(1) << (bit & 63);
    }
    return 0;
}

/* An added token and its first char, for sorting. */
typedef struct {
    AddedEntry entry;
    ucs4 first;
} SortItem;

static int
compare_sort_items(const void *a_, const void *b_)
{
    const SortItem *a = a_, *b = b_;
    if (a->first != b->first) {
        return a->first < b->first ? -1 : 1;
    }
    if (a->entry.length != b->entry.length) {
        return a->entry.length > b->entry.length ? -1 : 1;
    }
    return 0; /* same first char and length: different contents, order is moot */
}

/* One added token as given: content (normalized when `normalized`), id, flags. */
typedef struct {
    PyObject *content; /* str */
    PyObject *id;      /* exact int */
    int single_word, lstrip, rstrip, normalized, special;
} AddedSpec;

static int
flag_attr(PyObject *token, const char *name, int *out)
{
    PyObject *value = PyObject_GetAttrString(token, name);
    if (value == NULL) {
        return -1;
    }
    *out = PyObject_IsTrue(value);
    Py_DECREF(value);
    return *out < 0 ? -1 : 0;
}

/* An AddedSet of the specs whose `normalized` equals `normalized`; of specs
 * with the same content, the first special one, else the first, as in the twin. */
static int
build_added(AddedSet *set, AddedSpec *specs, Py_ssize_t n, int normalized)
{
    PyObject *by_content = PyDict_New(); /* content -> index into specs */
    if (by_content == NULL) {
        return -1;
    }
    /* Two tokens may have one content (normalized ones: "Zorg" and "ZORG" under
     * lowercase). HF's matcher lists the special tokens first, then the others,
     * each in order, and the first listed wins: keep the first seen. */
    for (int special = 1; special >= 0; special--) {
        for (Py_ssize_t i = 0; i < n; i++) {
            if (specs[i].normalized != normalized || !specs[i].special != !special
                || PyUnicode_GET_LENGTH(specs[i].content) == 0) {
                continue;
            }
            PyObject *index = PyLong_FromSsize_t(i);
            if (index == NULL || PyDict_SetDefault(by_content, specs[i].content, index) == NULL) {
                Py_XDECREF(index);
                Py_DECREF(by_content);
                return -1;
            }
            Py_DECREF(index);
        }
    }
    Py_ssize_t count = PyDict_GET_SIZE(by_content), total = 0, pos = 0;
    PyObject *content, *index;
    while (PyDict_Next(by_content, &pos, &content, &index)) {
        total += PyUnicode_GET_LENGTH(content);
    }
    SortItem *items = PyMem_Calloc(count ? count : 1, sizeof(SortItem));
    set->tokens = PyMem_Calloc(count ? count : 1, sizeof(AddedEntry));
    set->chars = PyMem_Malloc((total ? total : 1) * sizeof(ucs4));
    if (items == NULL || set->tokens == NULL || set->chars == NULL) {
        PyMem_Free(items);
        Py_DECREF(by_content);
        PyErr_NoMemory();
        return -1;
    }
    size_t offset = 0;
    Py_ssize_t k = 0;
    pos = 0;
    while (PyDict_Next(by_content, &pos, &content, &index)) {
        const AddedSpec *spec = &specs[PyLong_AsSsize_t(index)];
        Py_ssize_t length = PyUnicode_GET_LENGTH(content);
        if (PyUnicode_AsUCS4(content, set->chars + offset, length, 0) == NULL) {
            PyMem_Free(items);
            Py_DECREF(by_content);
            return -1;
        }
        /* Borrowed from the spec until the tokens are sorted below. */
        items[k].entry = (AddedEntry){offset, length, spec->id, spec->single_word,
                                      spec->lstrip, spec->rstrip};
        items[k].first = set->chars[offset];
        offset += length;
        k++;
    }
    Py_DECREF(by_content);
    qsort(items, count, sizeof(SortItem), compare_sort_items);
    for (Py_ssize_t i = 0; i < count; i++) {
        set->tokens[i] = items[i].entry;
        Py_INCREF(set->tokens[i].id);
        ucs4 c = items[i].first;
        set->first_bits[(c & 255) >> 6] |= UINT64_C(1) << (c & 63);
    }
    set->count = count;
    PyMem_Free(items);
    return 0;
}

/* Normalize `text` with the encoder's settings (GIL held; used for added tokens). */
static PyObject *
normalize_str(const Encoder *e, PyObject *text)
{
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    ucs4 *chars = PyUnicode_AsUCS4Copy(text);
    if (chars == NULL) {
        return NULL;
    }
    Scratch s = {0};
    PyObject *result = NULL;
    if (normalize(e, chars, (size_t)n, &s, &s.norm) < 0) {
        PyErr_NoMemory();
    }
    else {
        result = PyUnicode_FromKindAndData(PyUnicode_4BYTE_KIND, s.norm.data,
                                           (Py_ssize_t)s.norm.len);
    }
    PyMem_Free(chars);
    scratch_free(&s);
    return result;
}

/* The two AddedSets of `added_tokens`; `e` normalizes the normalized ones
 * (NULL: no normalizer, they are matched as written). */
static int
build_added_tokens(AddedSet *raw, AddedSet *normalized, const Encoder *e,
                   PyObject *added_tokens)
{
    /* A list of our own: attribute lookups below run Python code. */
    PyObject *seq = PySequence_List(added_tokens);
    if (seq == NULL) {
        return -1;
    }
    Py_ssize_t n = PyList_GET_SIZE(seq);
    AddedSpec *specs = PyMem_Calloc(n ? n : 1, sizeof(AddedSpec));
    int status = -1;
    if (specs == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *token = PyList_GET_ITEM(seq, i);
        AddedSpec *spec = &specs[i];
        PyObject *id;
        spec->content = PyObject_GetAttrString(token, "content");
        if (spec->content == NULL) {
            goto done;
        }
        if (!PyUnicode_Check(spec->content)) {
            PyErr_Format(PyExc_TypeError, "added token content must be str, got %R",
                         spec->content);
            goto done;
        }
        if ((id = PyObject_GetAttrString(token, "id")) == NULL) {
            goto done;
        }
        spec->id = id_object(id, spec->content);
        Py_DECREF(id);
        if (spec->id == NULL || flag_attr(token, "single_word", &spec->single_word) < 0
            || flag_attr(token, "lstrip", &spec->lstrip) < 0
            || flag_attr(token, "rstrip", &spec->rstrip) < 0
            || flag_attr(token, "normalized", &spec->normalized) < 0
            || flag_attr(token, "special", &spec->special) < 0) {
            goto done;
        }
        if (spec->normalized && e != NULL) {
            /* HF matches normalized tokens by their own normalized form. */
            Py_SETREF(spec->content, normalize_str(e, spec->content));
            if (spec->content == NULL) {
                goto done;
            }
        }
    }
    if (build_added(raw, specs, n, 0) < 0 || build_added(normalized, specs, n, 1) < 0) {
        goto done;
    }
    status = 0;
done:
    for (Py_ssize_t i = 0; specs && i < n; i++) {
        Py_XDECREF(specs[i].content);
        Py_XDECREF(specs[i].id);
    }
    PyMem_Free(specs);
    Py_DECREF(seq);
    return status;
}

static void
added_set_clear(AddedSet *set)
{
    for (Py_ssize_t i = 0; i < set->count; i++) {
        Py_DECREF(set->tokens[i].id);
    }
    PyMem_Free(set->tokens);
    PyMem_Free(set->chars);
}

static void
Encoder_dealloc(PyObject *self)
{
    Encoder *e = (Encoder *)self;
    PyTypeObject *type = Py_TYPE(self);
    for (Py_ssize_t i = 0; i < e->vocab_count; i++) {
        Py_DECREF(e->ids[i]);
    }
    PyMem_Free(e->vocab);
    PyMem_Free(e->ids);
    PyMem_Free(e->slots);
    PyMem_Free(e->filter);
    PyMem_Free(e->vocab_chars);
    PyMem_Free(e->prefix);
    Py_XDECREF(e->unk_id);
    added_set_clear(&e->raw_added);
    added_set_clear(&e->normalized_added);
    word_cache_free(&e->cache);
    type->tp_free(self);
    Py_DECREF(type);
}

static int
starts_added(const AddedSet *set, ucs4 c)
{
    for (Py_ssize_t t = 0; t < set->count; t++) {
        if (set->chars[set->tokens[t].offset] == c) {
            return 1;
        }
    }
    return 0;
}

/* encode_ascii's tables, from what the general path does to each ASCII char
 * alone (ASCII is normalized char by char: clean, lowercase, nothing else). */
static int
ascii_tables(Encoder *e)
{
    Scratch s;
    memset(&s, 0, sizeof(s));
    for (ucs4 c = 0; c < 128; c++) {
        if (normalize(e, &c, 1, &s, &s.norm) < 0) {
            scratch_free(&s);
            PyErr_NoMemory();
            return -1;
        }
        ucs4 d = s.norm.len ? s.norm.data[0] : 0;
        unsigned flags = char_flags(d);
        e->ascii_norm[c] = (uint8_t)d;
        e->ascii_kind[c] = s.norm.len == 0 ? ASCII_DROP
                           : s.norm.len > 1 || d >= 128 || starts_added(&e->normalized_added, d)
                               ? ASCII_STOP
                           : flags & F_WS    ? ASCII_SPACE
                           : flags & F_PUNCT ? ASCII_PUNCT
                                             : ASCII_WORD;
        if (starts_added(&e->raw_added, c)) {
            e->ascii_kind[c] |= ASCII_ADDED;
        }
    }
    scratch_free(&s);
    return 0;
}

static PyObject *
Encoder_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"vocab",
                               "unk_token",
                               "continuing_subword_prefix",
                               "max_input_chars_per_word",
                               "clean_text",
                               "handle_chinese_chars",
                               "strip_accents",
                               "lowercase",
                               "added_tokens",
                               NULL};
    PyObject *vocab_arg, *unk_token = NULL, *prefix = NULL, *max_word_chars = NULL;
    PyObject *added_tokens = NULL, *vocab = NULL;
    int clean_text = -1, handle_chinese_chars = -1, strip_accents = -1, lowercase = -1;
    /* All but vocab are keyword-only; the format can only say "optional". */
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|$UUOppppO:WordPieceEncoder", keywords,
                                     &vocab_arg, &unk_token, &prefix, &max_word_chars,
                                     &clean_text, &handle_chinese_chars, &strip_accents,
                                     &lowercase, &added_tokens)) {
        return NULL;
    }
    const char *missing = unk_token == NULL                ? "unk_token"
                          : prefix == NULL                 ? "continuing_subword_prefix"
                          : max_word_chars == NULL         ? "max_input_chars_per_word"
                          : clean_text < 0                 ? "clean_text"
                          : handle_chinese_chars < 0       ? "handle_chinese_chars"
                          : strip_accents < 0              ? "strip_accents"
                          : lowercase < 0                  ? "lowercase"
                                                           : NULL;
    if (missing != NULL) {
        PyErr_Format(PyExc_TypeError,
                     "WordPieceEncoder() missing required keyword-only argument: '%s'",
                     missing);
        return NULL;
    }
    /* Like the twin's dict(vocab): any mapping, copied, so that no __index__
     * of an id can change it while build_vocab walks it. */
    vocab = PyObject_CallOneArg((PyObject *)&PyDict_Type, vocab_arg);
    if (vocab == NULL) {
        return NULL;
    }
    Encoder *e = (Encoder *)type->tp_alloc(type, 0);
    if (e == NULL) {
        Py_DECREF(vocab);
        return NULL;
    }
    e->clean_text = clean_text;
    e->handle_chinese_chars = handle_chinese_chars;
    e->strip_accents = strip_accents;
    e->lowercase = lowercase;
    if (word_cache_init(&e->cache) < 0) {
        goto error;
    }

    int overflow;
    e->max_word_chars = PyLong_AsLongLongAndOverflow(max_word_chars, &overflow);
    if (e->max_word_chars == -1 && PyErr_Occurred()) {
        goto error;
    }
    if (overflow) { /* beyond any length, or below zero */
        e->max_word_chars = overflow > 0 ? LLONG_MAX : -1;
    }

    e->prefix_length = PyUnicode_GET_LENGTH(prefix);
    if ((e->prefix = PyUnicode_AsUCS4Copy(prefix)) == NULL) {
        goto error;
    }
    e->prefix_hash = HASH_BASIS;
    for (Py_ssize_t i = 0; i < e->prefix_length; i++) {
        e->prefix_hash = hash_step(e->prefix_hash, e->prefix[i]);
    }

    if (build_vocab(e, vocab) < 0) {
        goto error;
    }
    PyObject *unk = PyDict_GetItemWithError(vocab, unk_token);
    if (unk == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_Format(PyExc_KeyError, "unk_token %R is not in the vocab", unk_token);
        }
        goto error;
    }
    if ((e->unk_id = id_object(unk, unk_token)) == NULL) {
        goto error;
    }
    for (ucs4 c = 0; c < 128; c++) {
        int32_t index = vocab_get(e, hash_step(HASH_BASIS, c), NULL, 0, &c, 1);
        e->ascii_piece[c] = index < 0 || e->max_word_chars < 1 ? e->unk_id : e->ids[index];
    }
    if (added_tokens != NULL
        && build_added_tokens(&e->raw_added, &e->normalized_added, e, added_tokens) < 0) {
        goto error;
    }
    if (ascii_tables(e) < 0) {
        goto error;
    }
    Py_DECREF(vocab);
    return (PyObject *)e;
error:
    Py_DECREF(vocab);
    Py_DECREF(e);
    return NULL;
}

/* ------------------------------------------------------------------ encoding */

/* What encode and encode_batch put around a text's ids, as runtime.Tokenizer decides
 * it: its special tokens, and truncation of the text's own ids. */
typedef struct {
    PyObject **prefix, **suffix; /* ints */
    Py_ssize_t n_prefix, n_suffix;
    Py_ssize_t max_content;      /* -1: no truncation */
} Template;

/* prefix + ids[:max_content] + suffix as a new list (ids borrowed from the
 * encoder). */
static PyObject *
id_list(const Template *t, PyObject *const *ids, size_t n)
{
    if (t->max_content >= 0 && n > (size_t)t->max_content) {
        n = (size_t)t->max_content;
    }
    Py_ssize_t at = 0;
    PyObject *list = PyList_New(t->n_prefix + (Py_ssize_t)n + t->n_suffix);
    if (list == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < t->n_prefix; i++) {
        PyList_SET_ITEM(list, at++, Py_NewRef(t->prefix[i]));
    }
    for (size_t i = 0; i < n; i++) {
        PyList_SET_ITEM(list, at++, Py_NewRef(ids[i]));
    }
    for (Py_ssize_t i = 0; i < t->n_suffix; i++) {
        PyList_SET_ITEM(list, at++, Py_NewRef(t->suffix[i]));
    }
    return list;
}

/* Below this many chars (about a microsecond of work) the GIL is kept: giving
 * it up costs ~50 ns alone, and getting it back from a busy thread can take
 * the whole switch interval (5 ms). encode_batch always releases it. */
#define RELEASE_GIL_CHARS 256

/* Copies a str to UCS4; BPE reads a lone surrogate as U+FFFD (it has no UTF-8). */
static int
copy_chars(PyObject *text, ucs4 *chars, Py_ssize_t n, int replace_surrogates)
{
    if (n && PyUnicode_AsUCS4(text, chars, n, 0) == NULL) {
        return -1;
    }
    if (replace_surrogates && PyUnicode_KIND(text) != PyUnicode_1BYTE_KIND) {
        for (Py_ssize_t i = 0; i < n; i++) {
            if (chars[i] >= 0xD800 && chars[i] < 0xE000) {
                chars[i] = 0xFFFD;
            }
        }
    }
    return 0;
}

static PyObject *
encode_one(PyObject *self, const WordCache *pool, PyObject *text, const Template *t,
           piece_fn encode_text, int replace_surrogates)
{
    if (!PyUnicode_Check(text)) {
        return PyErr_Format(PyExc_TypeError, "encode() expects str, got %s",
                            Py_TYPE(text)->tp_name);
    }
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    Scratch own;
    Scratch *s = slot_take(pool, &own);
    PyObject *result = NULL;
    s->input.len = s->ids.len = 0;
    s->ascii = PyUnicode_IS_ASCII(text);
    if (text_reserve(&s->input, (size_t)n + 1) < 0) {
        PyErr_NoMemory();
        goto done;
    }
    if (copy_chars(text, s->input.data, n, replace_surrogates) < 0) {
        goto done;
    }
    int status;
    if (n >= RELEASE_GIL_CHARS) {
        Py_BEGIN_ALLOW_THREADS
        status = encode_text(self, s->input.data, (size_t)n, s, &s->ids);
        Py_END_ALLOW_THREADS
    }
    else {
        status = encode_text(self, s->input.data, (size_t)n, s, &s->ids);
    }
    result = status < 0 ? PyErr_NoMemory() : id_list(t, s->ids.data, s->ids.len);
done:
    slot_give(pool, s);
    return result;
}

/* ------------------------------------------------ batches on several threads */

/* Enough work for a thread (~1 ms of encoding) to be worth starting one. */
#define BATCH_CHARS_PER_THREAD 32768
#define BATCH_THREADS_MAX 8

/* One contiguous run of a batch's texts and what encoding it takes. */
typedef struct {
    const void *encoder;
    const WordCache *pool;
    piece_fn encode_text;
    const ucs4 *chars;
    const size_t *char_ends;
    const uint8_t *ascii;     /* ascii[i]: text i is all ASCII */
    size_t *id_ends;          /* id_ends[i] of its texts, into its own `ids` */
    Py_ssize_t first, stop;   /* its texts: [first, stop) */
    IdBuf ids;
    int status;               /* -1: out of memory */
    char pad[FALSE_SHARING_PAD];
} BatchPart;

static void
batch_run(BatchPart *p)
{
    size_t start = p->first ? p->char_ends[p->first - 1] : 0;
    Scratch own;
    Scratch *s = slot_take(p->pool, &own);
    for (Py_ssize_t i = p->first; i < p->stop && p->status == 0; i++) {
        s->ascii = p->ascii[i];
        p->status = p->encode_text(p->encoder, p->chars + start, p->char_ends[i] - start, s,
                                   &p->ids);
        p->id_ends[i] = p->ids.len;
        start = p->char_ends[i];
    }
    slot_give(p->pool, s);
}

#ifdef TOK_BATCH_THREADS
static void *
batch_worker(void *part)
{
    batch_run(part);
    return NULL;
}

/* CPUs this process may run on. */
static size_t
usable_cpus(void)
{
#if defined(__linux__) && defined(CPU_COUNT)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) {
        return (size_t)CPU_COUNT(&set);
    }
#endif
#ifdef _SC_NPROCESSORS_ONLN
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    if (n > 0) {
        return (size_t)n;
    }
#endif
    return 1;
}
#endif

/* Threads for a batch: one per BATCH_CHARS_PER_THREAD chars, at most one a
 * text, a CPU, or BATCH_THREADS_MAX; 1 means the calling thread alone. */
static int
batch_threads(size_t total, Py_ssize_t count)
{
    size_t n = total / BATCH_CHARS_PER_THREAD;
    if (n > (size_t)count) {
        n = (size_t)count;
    }
    if (n > BATCH_THREADS_MAX) {
        n = BATCH_THREADS_MAX;
    }
#ifdef TOK_BATCH_THREADS
    if (n >= 2) {
        size_t cpus = usable_cpus();
        if (n > cpus) {
            n = cpus;
        }
    }
#else
    n = 1;
#endif
    return n < 2 ? 1 : (int)n;
}

static PyObject *
encode_many(PyObject *self, const WordCache *pool, PyObject *texts, const Template *t,
            piece_fn encode_text, int replace_surrogates)
{
    if (PyUnicode_Check(texts)) {
        return PyErr_Format(PyExc_TypeError,
                            "encode_batch() expects a list of str, got a single str");
    }
    char not_iterable[160];
    snprintf(not_iterable, sizeof not_iterable, "encode_batch() expects a list of str, got %.100s",
             Py_TYPE(texts)->tp_name);
    PyObject *seq = PySequence_Fast(texts, not_iterable);
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq), total = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *text = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyUnicode_Check(text)) {
            Py_DECREF(seq);
            return PyErr_Format(PyExc_TypeError,
                                "encode_batch() expects a list of str, item %zd is %s", i,
                                Py_TYPE(text)->tp_name);
        }
        total += PyUnicode_GET_LENGTH(text);
    }
    /* All texts in one buffer; char_ends[i] is where text i stops in it, and
     * id_ends[i] where its ids stop in its part's id buffer. */
    ucs4 *chars = PyMem_RawMalloc((total ? total : 1) * sizeof(ucs4));
    size_t *char_ends = PyMem_RawMalloc((count ? count : 1) * sizeof(size_t));
    size_t *id_ends = PyMem_RawMalloc((count ? count : 1) * sizeof(size_t));
    uint8_t *ascii = PyMem_RawMalloc(count ? count : 1);
    PyObject *result = NULL;
    BatchPart parts[BATCH_THREADS_MAX];
    memset(parts, 0, sizeof(parts));
    int n_parts = 1;
    if (chars == NULL || char_ends == NULL || id_ends == NULL || ascii == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    size_t offset = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *text = PySequence_Fast_GET_ITEM(seq, i);
        Py_ssize_t n = PyUnicode_GET_LENGTH(text);
        if (copy_chars(text, chars + offset, n, replace_surrogates) < 0) {
            goto done;
        }
        offset += n;
        char_ends[i] = offset;
        ascii[i] = (uint8_t)PyUnicode_IS_ASCII(text);
    }
    /* Contiguous runs of texts with about as many chars each. */
    n_parts = batch_threads((size_t)total, count);
    Py_ssize_t next = 0;
    for (int k = 0; k < n_parts; k++) {
        BatchPart *p = &parts[k];
        p->encoder = self;
        p->pool = pool;
        p->encode_text = encode_text;
        p->chars = chars;
        p->char_ends = char_ends;
        p->ascii = ascii;
        p->id_ends = id_ends;
        p->first = next;
        if (k == n_parts - 1) {
            next = count;
        }
        else {
            size_t t = (size_t)total, m = (size_t)n_parts, j = (size_t)k + 1;
            size_t target = t / m * j + t % m * j / m;
            while (next < count && char_ends[next] <= target) {
                next++;
            }
            /* The text across the target goes where it unbalances less. */
            if (next < count
                && char_ends[next] - target < target - (next ? char_ends[next - 1] : 0)) {
                next++;
            }
        }
        p->stop = next;
    }
    int status = 0;
    Py_BEGIN_ALLOW_THREADS
    int started[BATCH_THREADS_MAX] = {0};
#ifdef TOK_BATCH_THREADS
    pthread_t threads[BATCH_THREADS_MAX];
    for (int k = 1; k < n_parts; k++) {
        /* A thread that cannot start leaves its part to this one. */
        started[k] = parts[k].first < parts[k].stop
                     && pthread_create(&threads[k], NULL, batch_worker, &parts[k]) == 0;
    }
#endif
    for (int k = 0; k < n_parts; k++) {
        if (!started[k]) {
            batch_run(&parts[k]);
        }
    }
#ifdef TOK_BATCH_THREADS
    for (int k = 1; k < n_parts; k++) {
        if (started[k]) {
            pthread_join(threads[k], NULL);
        }
    }
#endif
    for (int k = 0; k < n_parts; k++) {
        status |= parts[k].status;
    }
    Py_END_ALLOW_THREADS
    if (status < 0) {
        PyErr_NoMemory();
        goto done;
    }
    /* The lists join the cyclic GC only once all are made. Tracked from the
     * start, each gen-0 collection the allocations trigger walked the lists so
     * far, found them alive and moved them on to older generations (a fifth of
     * a short-text batch's time went to that, and to the full collections the
     * promoted lists brought on). */
    if ((result = PyList_New(count)) == NULL) {
        goto done;
    }
    PyObject_GC_UnTrack(result);
    for (int k = 0; k < n_parts; k++) {
        const BatchPart *p = &parts[k];
        size_t first = 0;
        for (Py_ssize_t i = p->first; i < p->stop; i++) {
            PyObject *list = id_list(t, p->ids.data + first, id_ends[i] - first);
            if (list == NULL) {
                Py_CLEAR(result);
                goto done;
            }
            PyObject_GC_UnTrack(list);
            PyList_SET_ITEM(result, i, list);
            first = id_ends[i];
        }
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject_GC_Track(PyList_GET_ITEM(result, i));
    }
    PyObject_GC_Track(result);
done:
    PyMem_RawFree(chars);
    PyMem_RawFree(char_ends);
    PyMem_RawFree(id_ends);
    PyMem_RawFree(ascii);
    for (int k = 0; k < n_parts; k++) {
        PyMem_RawFree(parts[k].ids.data);
    }
    Py_DECREF(seq);
    return result;
}

/* Argument `name` of `fn`, a sequence of ints, as a tuple: the items are read while the
 * GIL is released, when another thread could resize a list (runtime.Tokenizer passes
 * tuples, which cost nothing here; anything else is copied). */
static PyObject *
int_sequence(const char *fn, PyObject *arg, const char *name, PyObject ***items, Py_ssize_t *n)
{
    PyObject *seq = PyTuple_CheckExact(arg) ? Py_NewRef(arg) : PySequence_Tuple(arg);
    if (seq == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_TypeError)) {
            return NULL;
        }
        PyErr_Clear();
        return PyErr_Format(PyExc_TypeError, "%s() %s must be a sequence of int, not %s", fn,
                            name, Py_TYPE(arg)->tp_name);
    }
    *n = PySequence_Fast_GET_SIZE(seq);
    *items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < *n; i++) {
        if (!PyLong_Check((*items)[i]) || PyBool_Check((*items)[i])) {
            PyErr_Format(PyExc_TypeError, "%s() %s: item %zd is %s, not int", fn, name, i,
                         Py_TYPE((*items)[i])->tp_name);
            Py_DECREF(seq);
            return NULL;
        }
    }
    return seq;
}

/* The arguments of encode and encode_batch, `fn`:
 *
 *     fn(text_or_texts, /, prefix=(), suffix=(), max_content=None)
 *
 * as vectorcall gives them. Sets *subject and *t; the template's ints are
 * held in hold[0] and hold[1] (NULL or new references, for the caller to drop). */
static int
call_args(const char *fn, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
          PyObject **subject, Template *t, PyObject *hold[2])
{
    static const char *const names[] = {"", "prefix", "suffix", "max_content"};
    PyObject *given[4] = {NULL, NULL, NULL, NULL};
    *t = (Template){NULL, NULL, 0, 0, -1};
    hold[0] = hold[1] = NULL;
    if (nargs < 1 || nargs > 4) {
        PyErr_Format(PyExc_TypeError, "%s() takes from 1 to 4 positional arguments but %zd "
                     "were given", fn, nargs);
        return -1;
    }
    memcpy(given, args, (size_t)nargs * sizeof(PyObject *));
    Py_ssize_t n_keywords = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t k = 0; k < n_keywords; k++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, k);
        int at = 1;
        while (at < 4 && PyUnicode_CompareWithASCIIString(name, names[at]) != 0) {
            at++;
        }
        if (at == 4) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument %R", fn, name);
            return -1;
        }
        if (given[at] != NULL) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", fn,
                         names[at]);
            return -1;
        }
        given[at] = args[nargs + k];
    }
    *subject = given[0];
    if (given[1] != NULL
        && (hold[0] = int_sequence(fn, given[1], "prefix", &t->prefix, &t->n_prefix)) == NULL) {
        return -1;
    }
    if (given[2] != NULL
        && (hold[1] = int_sequence(fn, given[2], "suffix", &t->suffix, &t->n_suffix)) == NULL) {
        return -1;
    }
    if (given[3] != NULL && given[3] != Py_None) {
        if (!PyLong_Check(given[3])) {
            PyErr_Format(PyExc_TypeError, "%s() max_content must be an int or None, not %s", fn,
                         Py_TYPE(given[3])->tp_name);
            return -1;
        }
        t->max_content = PyLong_AsSsize_t(given[3]);
        if (t->max_content < 0) {
            if (!PyErr_Occurred()) {
                PyErr_Format(PyExc_ValueError, "%s() max_content must be >= 0", fn);
            }
            return -1;
        }
    }
    return 0;
}

/* The docstrings of every encoder type's two methods. */
#define ENCODE_DOC                                                                            \
    PyDoc_STR("encode(text, /, prefix=(), suffix=(), max_content=None)\n--\n\n"              \
              "prefix + (content ids of `text`)[:max_content] + suffix.")
#define ENCODE_BATCH_DOC                                                                      \
    PyDoc_STR("encode_batch(texts, /, prefix=(), suffix=(), max_content=None)\n--\n\n"       \
              "prefix + encode(text)[:max_content] + suffix for each str in `texts`, in one "  \
              "call without the GIL; a big batch is split over several threads (up to 8, "    \
              "one per 32k chars and CPU).")

/* encode or encode_batch (`many`) of any encoder. */
static PyObject *
encode_call(PyObject *self, const WordCache *pool, int many, PyObject *const *args,
            Py_ssize_t nargs, PyObject *kwnames, piece_fn encode_text, int replace_surrogates)
{
    PyObject *subject, *hold[2], *result = NULL;
    Template t;
    if (call_args(many ? "encode_batch" : "encode", args, nargs, kwnames,
                  &subject, &t, hold) == 0) {
        result = many ? encode_many(self, pool, subject, &t, encode_text, replace_surrogates)
                      : encode_one(self, pool, subject, &t, encode_text, replace_surrogates);
    }
    Py_XDECREF(hold[0]);
    Py_XDECREF(hold[1]);
    return result;
}

static PyObject *
Encoder_encode(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    return encode_call(self, &((Encoder *)self)->cache, 0, args, nargs, kwnames, encode_text, 0);
}

static PyObject *
Encoder_encode_batch(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                     PyObject *kwnames)
{
    return encode_call(self, &((Encoder *)self)->cache, 1, args, nargs, kwnames, encode_text, 0);
}

/* ============================================================ byte-level BPE
 *
 * The C twin of _tokenizer_py.BPEEncoder, same steps in the same order:
 *
 *     added tokens -> [Digits] -> GPT-2 or Llama-3 split -> UTF-8 -> BPE merges -> ids
 *
 * There is no regex engine here: each split pattern is a small function that
 * returns where the pre-token starting at i ends, trying the pattern's
 * alternatives in order, as a backtracking engine (Oniguruma, in HF) does.
 * Ids are plain int32 inside; `id_objects` turns them into the vocab's ints. */

enum { SPLIT_GPT2, SPLIT_LLAMA3 };

/* Character classes of the split regexes: \p{L}, \p{N}, \s, and the rest. */
enum { C_LETTER, C_NUMBER, C_SPACE, C_OTHER };

static inline int
char_class(ucs4 c)
{
    unsigned flags = char_flags(c);
    return (flags & F_LETTER) ? C_LETTER
           : (flags & F_NUMBER) ? C_NUMBER
           : (flags & F_WS)     ? C_SPACE
                                : C_OTHER;
}

/* End of the run of class k that starts at i. */
static inline size_t
span(const ucs4 *t, size_t i, size_t n, int k)
{
    while (i < n && char_class(t[i]) == k) {
        i++;
    }
    return i;
}

/* `\s+(?!\S)|\s+` at a space: the run, less its last char when a non-space
 * follows (that char then starts the next pre-token, e.g. " word"). */
static size_t
space_end(const ucs4 *t, size_t i, size_t n)
{
    size_t end = span(t, i, n, C_SPACE);
    return end == n || end - i == 1 ? end : end - 1;
}

/* GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */
static size_t
gpt2_end(const ucs4 *t, size_t i, size_t n)
{
    if (t[i] == '\'' && i + 1 < n) {
        ucs4 a = t[i + 1], b = i + 2 < n ? t[i + 2] : 0;
        if (a == 's' || a == 't' || a == 'm' || a == 'd') {
            return i + 2;
        }
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) {
            return i + 3;
        }
    }
    /* An optional ' ', then a run of letters, numbers or others. */
    size_t j = i + (t[i] == ' ' && i + 1 < n);
    int k = char_class(t[j]);
    return k == C_SPACE ? space_end(t, i, n) : span(t, j, n, k);
}

/* c == the ASCII letter `lower` under (?i): either case, and U+017F LONG S
 * for 's' (Unicode case folding, as Oniguruma and Python's re apply it). */
static inline int
fold_is(ucs4 c, char lower)
{
    return c == (ucs4)lower || c == (ucs4)(lower - 32) || (lower == 's' && c == 0x17F);
}

/* Llama-3: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
 *          ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+ */
static size_t
llama3_end(const ucs4 *t, size_t i, size_t n)
{
    if (t[i] == '\'' && i + 1 < n) {
        ucs4 a = t[i + 1], b = i + 2 < n ? t[i + 2] : 0;
        if (fold_is(a, 's') || fold_is(a, 't') || fold_is(a, 'm') || fold_is(a, 'd')) {
            return i + 2;
        }
        if ((fold_is(a, 'r') && fold_is(b, 'e')) || (fold_is(a, 'v') && fold_is(b, 'e'))
            || (fold_is(a, 'l') && fold_is(b, 'l'))) {
            return i + 3;
        }
    }
    ucs4 c = t[i];
    int k = char_class(c);
    if (k == C_LETTER) {
        return span(t, i, n, C_LETTER);
    }
    /* One char that is no letter, number, \r or \n, glued to the letters after it. */
    if (k != C_NUMBER && c != '\r' && c != '\n' && i + 1 < n
        && char_class(t[i + 1]) == C_LETTER) {
        return span(t, i + 1, n, C_LETTER);
    }
    if (k == C_NUMBER) {
        size_t end = span(t, i, n, C_NUMBER);
        return end - i > 3 ? i + 3 : end;
    }
    size_t j = i + (c == ' ' && i + 1 < n);
    if (char_class(t[j]) == C_OTHER) {
        size_t end = span(t, j, n, C_OTHER);
        while (end < n && (t[end] == '\r' || t[end] == '\n')) {
            end++;
        }
        return end;
    }
    /* t[i] is a space. `\s*[\r\n]+`: up to the run's last \r or \n, if any. */
    size_t end = span(t, i, n, C_SPACE);
    for (size_t p = end; p > i; p--) {
        if (t[p - 1] == '\r' || t[p - 1] == '\n') {
            return p;
        }
    }
    return space_end(t, i, n);
}

/* (left id, right id) -> (rank, merged id), open addressing. */
typedef struct {
    uint64_t key; /* left << 32 | right; EMPTY_KEY when free */
    uint32_t rank, merged;
} MergeSlot;

#define EMPTY_KEY UINT64_MAX

/* A vocab token by the bytes it stands for (for ignore_merges); length 0 = free. */
typedef struct {
    uint64_t hash;
    size_t offset; /* into word_bytes */
    uint32_t length;
    int32_t id;
} WordSlot;

/* A single-char token of a SentencePiece-style vocab; id -1 = free. */
typedef struct {
    ucs4 c;
    int32_t id;
} CharSlot;

/* Where a SentencePiece-style file puts its "\u2581" (SentencePieceBPEEncoder's prepend). */
enum { PREPEND_LEGACY, PREPEND_ALWAYS, PREPEND_FIRST, PREPEND_NEVER };
#define METASPACE 0x2581

typedef struct {
    PyObject_HEAD
    int32_t byte_ids[256]; /* token of each byte; -1 if the vocab has none */
    WordCache cache;
    MergeSlot *merges;
    size_t merge_mask;
    PyObject **id_objects; /* id -> the vocab's int, for 0 <= id < n_ids */
    uint32_t n_ids;
    WordSlot *words; /* NULL unless ignore_merges */
    size_t word_mask;
    uint8_t *word_bytes;
    int split, individual_digits, add_prefix_space, ignore_merges, fuse_unk;
    int32_t unk_id; /* -1: none, unknown bytes are dropped */
    AddedSet raw_added, normalized_added;
    /* SentencePiece-style BPE (SentencePieceBPEEncoder): symbols are chars, not bytes. */
    int sp, prepend, sp_split, cut_words, cut_blocked;
    int32_t fallback_ids[256]; /* <0xNN> token of each byte; -1: none (or no byte_fallback) */
    CharSlot *chars;           /* single-char token -> id */
    size_t char_mask;
} Bpe;

/* Ids live in int32 and index id_objects: keep them small. */
#define MAX_BPE_ID (1 << 24)

static inline uint64_t
mix64(uint64_t key)
{
    return (key * UINT64_C(0x9E3779B97F4A7C15)) >> 29;
}

static inline const MergeSlot *
find_merge(const Bpe *b, int32_t left, int32_t right)
{
    uint64_t key = (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
    for (size_t i = mix64(key) & b->merge_mask;; i = (i + 1) & b->merge_mask) {
        if (b->merges[i].key == key) {
            return &b->merges[i];
        }
        if (b->merges[i].key == EMPTY_KEY) {
            return NULL;
        }
    }
}

static inline uint64_t
hash_bytes(const uint8_t *p, size_t n)
{
    uint64_t h = HASH_BASIS;
    for (size_t i = 0; i < n; i++) {
        h = hash_step(h, p[i]);
    }
    return h;
}

static int32_t
find_word(const Bpe *b, const uint8_t *p, size_t n)
{
    uint64_t h = hash_bytes(p, n);
    for (size_t i = slot_of(h, b->word_mask);; i = (i + 1) & b->word_mask) {
        const WordSlot *w = &b->words[i];
        if (w->length == 0) {
            return -1;
        }
        if (w->hash == h && w->length == n && memcmp(b->word_bytes + w->offset, p, n) == 0) {
            return w->id;
        }
    }
}

/* Min-heap of merges by (rank, position): HF's BinaryHeap<Merge> order. */
static inline int
entry_less(MergeEntry a, MergeEntry b)
{
    return a.rank < b.rank || (a.rank == b.rank && a.pos < b.pos);
}

static void
heap_push(MergeEntry *heap, size_t *len, MergeEntry e)
{
    size_t i = (*len)++;
    while (i > 0 && entry_less(e, heap[(i - 1) / 2])) {
        heap[i] = heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    heap[i] = e;
}

static MergeEntry
heap_pop(MergeEntry *heap, size_t *len)
{
    MergeEntry top = heap[0], last = heap[--*len];
    size_t i = 0, n = *len;
    for (size_t c; (c = 2 * i + 1) < n; i = c) {
        if (c + 1 < n && entry_less(heap[c + 1], heap[c])) {
            c++;
        }
        if (!entry_less(heap[c], last)) {
            break;
        }
        heap[i] = heap[c];
    }
    if (n > 0) {
        heap[i] = last;
    }
    return top;
}

static int
bpe_reserve(BpeBuf *w, size_t n)
{
    if (n <= w->cap) {
        return 0;
    }
    size_t cap = w->cap ? w->cap : 64;
    while (cap < n) {
        if (cap > (size_t)INT32_MAX / 4) {
            return -1;
        }
        cap *= 2;
    }
    /* Bytes, symbols and up to 3 heap entries per byte (n - 1 at first, then
     * at most 2 pushes per merge). */
    uint8_t *bytes = PyMem_RawRealloc(w->bytes, cap);
    if (bytes != NULL) {
        w->bytes = bytes;
    }
    int32_t *ids = PyMem_RawRealloc(w->ids, cap * sizeof(int32_t));
    if (ids != NULL) {
        w->ids = ids;
    }
    int32_t *prev = PyMem_RawRealloc(w->prev, cap * sizeof(int32_t));
    if (prev != NULL) {
        w->prev = prev;
    }
    int32_t *next = PyMem_RawRealloc(w->next, cap * sizeof(int32_t));
    if (next != NULL) {
        w->next = next;
    }
    MergeEntry *heap = PyMem_RawRealloc(w->heap, 3 * cap * sizeof(MergeEntry));
    if (heap != NULL) {
        w->heap = heap;
    }
    if (bytes == NULL || ids == NULL || prev == NULL || next == NULL || heap == NULL) {
        return -1;
    }
    w->cap = cap;
    return 0;
}

static int bpe_merge(const Bpe *b, BpeBuf *w, size_t len, IdBuf *out);
static int merge_symbols(const Bpe *b, BpeBuf *w, int32_t count, IdBuf *out);

/* BPE of one pre-token, (" " +) t[0:n], onto `out`: HF's BPE::merge_word and
 * Word::merge_all (tokenizers/src/models/bpe/{model,word}.rs), through the cache. */
static int
bpe_word(const Bpe *b, const ucs4 *t, size_t n, int space_first, Scratch *s, IdBuf *out)
{
    BpeBuf *w = &s->bpe;
    if (n > (size_t)INT32_MAX / 8 || bpe_reserve(w, 4 * n + 1) < 0) {
        return -1;
    }
    /* UTF-8 (lone surrogates were made U+FFFD on the way in). */
    size_t len = 0;
    if (space_first) {
        w->bytes[len++] = ' ';
    }
    for (size_t i = 0; i < n; i++) {
        len += utf8_put(w->bytes + len, t[i]);
    }
    uint64_t hash = 0;
    CacheEntry *entry = NULL;
    if (s->cache != NULL && len <= CACHE_BYTES) {
        hash = hash_bytes(w->bytes, len);
        entry = cache_set(s->cache, hash);
        const CacheEntry *hit = cache_find(entry, hash, w->bytes, len);
        if (hit != NULL) {
            entry = (CacheEntry *)hit;
            for (uint8_t i = 0; i < entry->count; i++) {
                if (ids_push(out, b->id_objects[entry->ids[i]]) < 0) {
                    return -1;
                }
            }
            return 0;
        }
    }
    size_t mark = out->len;
    if (b->words != NULL) { /* ignore_merges: a word that is a token is that token */
        int32_t id = find_word(b, w->bytes, len);
        if (id >= 0) {
            return ids_push(out, b->id_objects[id]);
        }
    }
    if (bpe_merge(b, w, len, out) < 0) {
        return -1;
    }
    if (entry != NULL) {
        cache_put(entry, hash, w->bytes, len, w->result, out->len - mark);
    }
    return 0;
}

/* Word::merge_all on the bytes in w->bytes[0:len]; the ids go to `out` and,
 * as int32, to w->result. */
static int
bpe_merge(const Bpe *b, BpeBuf *w, size_t len, IdBuf *out)
{
    /* One symbol per byte; a byte without a token is unk (one per run with
     * fuse_unk) or, without an unk token, nothing. */
    int32_t count = 0;
    for (size_t i = 0; i < len; i++) {
        int32_t id = b->byte_ids[w->bytes[i]];
        if (id < 0) {
            if (b->unk_id < 0 || (b->fuse_unk && i > 0 && b->byte_ids[w->bytes[i - 1]] < 0)) {
                continue;
            }
            id = b->unk_id;
        }
        w->ids[count++] = id;
    }
    return merge_symbols(b, w, count, out);
}

/* Word::merge_all on the symbols w->ids[0:count]: the lowest-ranked merge (leftmost on
 * ties) until none applies; the ids go to `out` and, as int32, to w->result. */
static int
merge_symbols(const Bpe *b, BpeBuf *w, int32_t count, IdBuf *out)
{
    if (count == 0) {
        return 0;
    }
    for (int32_t i = 0; i < count; i++) {
        w->prev[i] = i - 1;
        w->next[i] = i + 1;
    }
    w->next[count - 1] = -1;
    w->result = w->prev; /* free once merging is done; filled in order, never ahead */
    size_t heap_len = 0;
    for (int32_t i = 0; i + 1 < count; i++) {
        const MergeSlot *m = find_merge(b, w->ids[i], w->ids[i + 1]);
        if (m != NULL) {
            heap_push(w->heap, &heap_len, (MergeEntry){m->rank, (uint32_t)i, m->merged});
        }
    }
    while (heap_len > 0) {
        MergeEntry top = heap_pop(w->heap, &heap_len);
        int32_t i = (int32_t)top.pos, j = w->next[i];
        if (w->ids[i] < 0 || j < 0) {
            continue;
        }
        /* Stale entry: the pair at i has changed since it was pushed. */
        const MergeSlot *m = find_merge(b, w->ids[i], w->ids[j]);
        if (m == NULL || m->merged != top.merged) {
            continue;
        }
        w->ids[i] = (int32_t)top.merged;
        w->ids[j] = -1;
        int32_t k = w->next[i] = w->next[j];
        if (k >= 0) {
            w->prev[k] = i;
        }
        int32_t h = w->prev[i];
        if (h >= 0 && (m = find_merge(b, w->ids[h], w->ids[i])) != NULL) {
            heap_push(w->heap, &heap_len, (MergeEntry){m->rank, (uint32_t)h, m->merged});
        }
        if (k >= 0 && (m = find_merge(b, w->ids[i], w->ids[k])) != NULL) {
            heap_push(w->heap, &heap_len, (MergeEntry){m->rank, (uint32_t)i, m->merged});
        }
    }
    int32_t n_result = 0;
    for (int32_t i = 0; i >= 0; i = w->next[i]) {
        w->result[n_result++] = w->ids[i];
        if (ids_push(out, b->id_objects[w->ids[i]]) < 0) {
            return -1;
        }
    }
    return 0;
}

/* The split regex over one segment, then BPE of each pre-token. */
static int
bpe_segment(const Bpe *b, const ucs4 *t, size_t n, Scratch *s, IdBuf *out)
{
    if (b->split == SPLIT_GPT2 && b->add_prefix_space && t[0] != ' ') {
        /* ByteLevel(add_prefix_space) puts the space in before its regex runs. */
        s->tmp.len = 0;
        if (text_reserve(&s->tmp, n + 1) < 0) {
            return -1;
        }
        s->tmp.data[0] = ' ';
        memcpy(s->tmp.data + 1, t, n * sizeof(ucs4));
        t = s->tmp.data;
        n++;
    }
    for (size_t i = 0; i < n;) {
        size_t end = b->split == SPLIT_GPT2 ? gpt2_end(t, i, n) : llama3_end(t, i, n);
        /* After a Split step, ByteLevel adds the prefix space to each piece. */
        int space_first = b->split == SPLIT_LLAMA3 && b->add_prefix_space && t[i] != ' ';
        if (bpe_word(b, t + i, end - i, space_first, s, out) < 0) {
            return -1;
        }
        i = end;
    }
    return 0;
}

/* Digits(individual_digits=True) first, when set: each numeric char alone. */
static int
bpe_words(const void *ctx, const ucs4 *t, size_t n, Scratch *s, IdBuf *out)
{
    const Bpe *b = ctx;
    for (size_t start = 0, stop; start < n; start = stop) {
        stop = n;
        if (b->individual_digits) {
            stop = start + 1;
            if (!(char_flags(t[start]) & F_NUMERIC)) {
                while (stop < n && !(char_flags(t[stop]) & F_NUMERIC)) {
                    stop++;
                }
            }
        }
        if (bpe_segment(b, t + start, stop - start, s, out) < 0) {
            return -1;
        }
    }
    return 0;
}

static int
bpe_raw_piece(const void *ctx, const ucs4 *t, size_t n, Scratch *s, IdBuf *out)
{
    /* No normalizer: "normalized" added tokens are matched as written, after the others. */
    return split_added(ctx, &((const Bpe *)ctx)->normalized_added, t, n, bpe_words, s, out);
}

static int
bpe_text(const void *ctx, const ucs4 *t, size_t n, Scratch *s, IdBuf *out)
{
    const Bpe *b = ctx;
    return split_added(ctx, &b->raw_added, t, n, bpe_raw_piece, s, out);
}

/* ------------------------------------------- SentencePiece-style BPE (Llama 2) */

static inline int32_t
char_id(const Bpe *b, ucs4 c)
{
    for (size_t i = mix64(c) & b->char_mask;; i = (i + 1) & b->char_mask) {
        if (b->chars[i].id < 0 || b->chars[i].c == c) {
            return b->chars[i].id;
        }
    }
}

/* BPE of one word, ("\u2581" +) t[0:n] with each ' ' read as "\u2581": HF's
 * BPE::merge_word on chars, then Word::merge_all, through the cache. A char
 * without a token becomes its bytes' <0xNN> tokens where all exist, else the unk
 * (one per run with fuse_unk; HF adds a pending unk only at the next char with
 * a token, so byte tokens in between come before it), else nothing. */
static int
sp_word(const Bpe *b, const ucs4 *t, size_t n, int prefix, Scratch *s, IdBuf *out)
{
    BpeBuf *w = &s->bpe;
    if (n > (size_t)INT32_MAX / 8 || bpe_reserve(w, 4 * n + 4) < 0) {
        return -1;
    }
    size_t len = 0;
    if (prefix) {
        len += utf8_put(w->bytes, METASPACE);
    }
    for (size_t i = 0; i < n; i++) {
        len += utf8_put(w->bytes + len, t[i] == ' ' ? METASPACE : t[i]);
    }
    uint64_t hash = 0;
    CacheEntry *entry = NULL;
    if (s->cache != NULL && len <= CACHE_BYTES) {
        hash = hash_bytes(w->bytes, len);
        entry = cache_set(s->cache, hash);
        const CacheEntry *hit = cache_find(entry, hash, w->bytes, len);
        if (hit != NULL) {
            for (uint8_t i = 0; i < hit->count; i++) {
                if (ids_push(out, b->id_objects[hit->ids[i]]) < 0) {
                    return -1;
                }
            }
            return 0;
        }
    }
    size_t mark = out->len;
    if (b->words != NULL) { /* ignore_merges: a word that is a token is that token */
        int32_t id = find_word(b, w->bytes, len);
        if (id >= 0) {
            return ids_push(out, b->id_objects[id]);
        }
    }
    int32_t count = 0;
    int unk = 0; /* an unknown char is waiting for its unk */
    for (size_t i = -(size_t)prefix; i != n; i++) {
        ucs4 c = i == (size_t)-1 || t[i] == ' ' ? METASPACE : t[i];
        int32_t id = char_id(b, c);
        if (id >= 0) {
            if (unk) {
                w->ids[count++] = b->unk_id;
                unk = 0;
            }
            w->ids[count++] = id;
            continue;
        }
        uint8_t bytes[4];
        size_t k = utf8_put(bytes, c), known = 0;
        while (known < k && b->fallback_ids[bytes[known]] >= 0) {
            known++;
        }
        if (known == k) {
            for (size_t j = 0; j < k; j++) {
                w->ids[count++] = b->fallback_ids[bytes[j]];
            }
            continue;
        }
        if (b->unk_id < 0) {
            continue;
        }
        if (unk && !b->fuse_unk) {
            w->ids[count++] = b->unk_id;
        }
        unk = 1;
    }
    if (unk) {
        w->ids[count++] = b->unk_id;
    }
    if (merge_symbols(b, w, count, out) < 0) {
        return -1;
    }
    if (entry != NULL) {
        cache_put(entry, hash, w->bytes, len, w->result, out->len - mark);
    }
    return 0;
}

static inline int
is_metaspace(ucs4 c)
{
    return c == ' ' || c == METASPACE;
}

/* What HF BPEs as one word ((prefix +) t[0:n]): cut before each "\u2581" that
 * follows another char where cut_words allows it (no token has a "\u2581"
 * after another char, so no merge joins across such a cut: the same ids, and
 * words short enough for the cache). */
static int
sp_cut(const Bpe *b, const ucs4 *t, size_t n, int prefix, Scratch *s, IdBuf *out)
{
    size_t start = 0;
    for (size_t i = 1; b->cut_words && i < n; i++) {
        if (is_metaspace(t[i]) && !is_metaspace(t[i - 1])) {
            if (sp_word(b, t + start, i - start, prefix && start == 0, s, out) < 0) {
                return -1;
            }
            start = i;
        }
    }
    return sp_word(b, t + start, n - start, prefix && start == 0, s, out);
}

/* The legacy normalizer's text (between normalized added tokens): one word to HF. */
static int
sp_legacy_word(const void *ctx, const ucs4 *t, size_t n, Scratch *s, IdBuf *out)
{
    return sp_cut(ctx, t, n, 0, s, out);
}

/* The Metaspace pre-tokenizer: "\u2581" in front (by the prepend scheme, where
 * the piece does not start with one), then, with split, a word from each
 * "\u2581" on (spaces count as "\u2581"). */
static int
sp_metaspace_piece(const void *ctx, const ucs4 *t, size_t n, Scratch *s, IdBuf *out)
{
    const Bpe *b = ctx;
    int prefix = !is_metaspace(t[0]) && (b->prepend == PREPEND_ALWAYS
                                          || (b->prepend == PREPEND_FIRST && t == s->text));
    if (!b->sp_split) {
        return sp_cut(b, t, n, prefix, s, out);
    }
    size_t start = 0;
    for (size_t i = 1; i <= n; i++) {
        if (i == n || is_metaspace(t[i])) {
            if (sp_word(b, t + start, i - start, prefix && start == 0, s, out) < 0) {
                return -1;
            }
            start = i;
        }
    }
    return 0;
}

static int
sp_raw_piece(const void *ctx, const ucs4 *t, size_t n, Scratch *s, IdBuf *out)
{
    const Bpe *b = ctx;
    if (b->prepend != PREPEND_LEGACY) { /* no normalizer: matched as written, after the others */
        return split_added(ctx, &b->normalized_added, t, n, sp_metaspace_piece, s, out);
    }
    /* Sequence[Prepend("\u2581"), Replace(" ", "\u2581")], then the normalized added
     * tokens (given normalized) in that text. */
    TextBuf *norm = &s->norm;
    norm->len = 0;
    if (text_reserve(norm, n + 1) < 0) {
        return -1;
    }
    norm->data[0] = METASPACE;
    for (size_t i = 0; i < n; i++) {
        norm->data[i + 1] = t[i] == ' ' ? METASPACE : t[i];
    }
    norm->len = n + 1;
    return split_added(ctx, &b->normalized_added, norm->data, norm->len, sp_legacy_word, s, out);
}

static int
sp_text(const void *ctx, const ucs4 *t, size_t n, Scratch *s, IdBuf *out)
{
    s->text = t;
    return split_added(ctx, &((const Bpe *)ctx)->raw_added, t, n, sp_raw_piece, s, out);
}

/* GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the
 * other 68 for U+0100 onwards, in byte order. */
static void
byte_level_chars(ucs4 chars[256])
{
    ucs4 extra = 0x100;
    for (int byte = 0; byte < 256; byte++) {
        int keep = (byte >= 0x21 && byte <= 0x7E) || (byte >= 0xA1 && byte <= 0xAC) || byte >= 0xAE;
        chars[byte] = keep ? (ucs4)byte : extra++;
    }
}

static int32_t
bpe_id(PyObject *vocab, PyObject *token, Py_ssize_t rank)
{
    PyObject *id = PyDict_GetItemWithError(vocab, token);
    if (id == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_Format(PyExc_ValueError,
                         "merge %zd uses %R, which is not in the vocab.", rank, token);
        }
        return -1;
    }
    return (int32_t)PyLong_AsLong(id); /* checked when the vocab was read */
}

/* Each id of `vocab` (a private dict) replaced by the exact int it stands for, asked of its
 * __index__ once: the tables are sized by one reading and filled by another, so a value
 * whose __index__ changed between them would write past them. */
static int
exact_ids(PyObject *vocab)
{
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(vocab, &pos, &key, &value)) {
        if (PyLong_CheckExact(value)) {
            continue;
        }
        PyObject *id = id_object(value, key);
        if (id == NULL) {
            return -1;
        }
        int rc = PyDict_SetItem(vocab, key, id); /* an existing key: the dict keeps its size */
        Py_DECREF(id);
        if (rc < 0) {
            return -1;
        }
    }
    return 0;
}

static int
build_bpe_vocab(Bpe *b, PyObject *vocab)
{
    ucs4 byte_chars[256];
    int16_t char_byte[0x144]; /* byte-level char -> its byte; -1 if not one */
    byte_level_chars(byte_chars);
    memset(char_byte, 0xFF, sizeof(char_byte));
    for (int byte = 0; byte < 256; byte++) {
        char_byte[byte_chars[byte]] = (int16_t)byte;
        b->byte_ids[byte] = -1;
    }
    /* First pass: check the ids, size the tables. */
    Py_ssize_t pos = 0, total = 0;
    PyObject *key, *value;
    long most = -1;
    while (PyDict_Next(vocab, &pos, &key, &value)) {
        if (!PyUnicode_Check(key)) {
            PyErr_Format(PyExc_TypeError, "vocab keys must be str, got %R", key);
            return -1;
        }
        PyObject *index = id_object(value, key);
        if (index == NULL) {
            return -1;
        }
        long id = PyLong_AsLong(index);
        Py_DECREF(index);
        if (id < 0 || id >= MAX_BPE_ID) {
            if (!PyErr_Occurred() || PyErr_ExceptionMatches(PyExc_OverflowError)) {
                PyErr_Clear();
                PyErr_Format(PyExc_ValueError, "the id of token %R must be in range(2**24), got %R",
                             key, value);
            }
            return -1;
        }
        most = id > most ? id : most;
        total += PyUnicode_GET_LENGTH(key);
    }
    b->n_ids = (uint32_t)(most + 1);
    b->id_objects = PyMem_Calloc(most + 1 > 0 ? most + 1 : 1, sizeof(PyObject *));
    if (b->id_objects == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    size_t slots = 8;
    while (slots < 2 * (size_t)PyDict_GET_SIZE(vocab)) {
        slots *= 2;
    }
    if (b->ignore_merges && !b->sp) { /* (build_sp_tables makes a SentencePiece file's) */
        b->words = PyMem_Calloc(slots, sizeof(WordSlot));
        b->word_bytes = PyMem_Malloc(total ? total : 1);
        if (b->words == NULL || b->word_bytes == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        b->word_mask = slots - 1;
    }
    size_t offset = 0;
    pos = 0;
    while (PyDict_Next(vocab, &pos, &key, &value)) {
        PyObject *id = PyNumber_Index(value);
        if (id == NULL) {
            return -1;
        }
        long index = PyLong_AsLong(id);
        if (index < 0 || index >= (long)b->n_ids) { /* exact_ids made this impossible */
            Py_DECREF(id);
            PyErr_Format(PyExc_ValueError, "the id of token %R changed while it was read", key);
            return -1;
        }
        Py_XSETREF(b->id_objects[index], id);
        /* The bytes a token stands for, if all its chars are byte-level chars. */
        Py_ssize_t length = PyUnicode_GET_LENGTH(key);
        int kind = PyUnicode_KIND(key);
        const void *data = PyUnicode_DATA(key);
        size_t start = offset;
        int all_bytes = length > 0;
        for (Py_ssize_t i = 0; i < length && all_bytes; i++) {
            ucs4 c = PyUnicode_READ(kind, data, i);
            all_bytes = c < 0x144 && char_byte[c] >= 0;
            if (all_bytes && b->words != NULL) {
                b->word_bytes[offset++] = (uint8_t)char_byte[c];
            }
        }
        if (all_bytes && length == 1 && !b->sp) {
            b->byte_ids[char_byte[PyUnicode_READ(kind, data, 0)]] = (int32_t)index;
        }
        if (all_bytes && b->words != NULL) {
            uint64_t h = hash_bytes(b->word_bytes + start, offset - start);
            size_t slot = slot_of(h, b->word_mask);
            while (b->words[slot].length != 0) {
                slot = (slot + 1) & b->word_mask;
            }
            b->words[slot] = (WordSlot){h, start, (uint32_t)(offset - start), (int32_t)index};
        }
        else {
            offset = start;
        }
    }
    return 0;
}

static int
build_merges(Bpe *b, PyObject *vocab, PyObject *merges_arg)
{
    PyObject *merges = PySequence_List(merges_arg);
    if (merges == NULL) {
        return -1;
    }
    Py_ssize_t count = PyList_GET_SIZE(merges);
    size_t slots = 8;
    while (slots < 2 * (size_t)count) {
        slots *= 2;
    }
    b->merges = PyMem_Malloc(slots * sizeof(MergeSlot));
    if (b->merges == NULL) {
        Py_DECREF(merges);
        PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0; i < slots; i++) {
        b->merges[i].key = EMPTY_KEY;
    }
    b->merge_mask = slots - 1;
    for (Py_ssize_t rank = 0; rank < count; rank++) {
        PyObject *left, *right, *merged;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(merges, rank), "UU;a merge is a pair of str", &left,
                              &right)) {
            goto error;
        }
        int32_t l = bpe_id(vocab, left, rank), r = bpe_id(vocab, right, rank);
        if (l < 0 || r < 0 || (merged = PyUnicode_Concat(left, right)) == NULL) {
            goto error;
        }
        int32_t m = bpe_id(vocab, merged, rank);
        Py_DECREF(merged);
        if (m < 0) {
            goto error;
        }
        /* A pair listed twice keeps its last rank, as in the twin's dict. */
        uint64_t key = (uint64_t)(uint32_t)l << 32 | (uint32_t)r;
        size_t i = mix64(key) & b->merge_mask;
        while (b->merges[i].key != EMPTY_KEY && b->merges[i].key != key) {
            i = (i + 1) & b->merge_mask;
        }
        b->merges[i] = (MergeSlot){key, (uint32_t)rank, (uint32_t)m};
    }
    Py_DECREF(merges);
    return 0;
error:
    Py_DECREF(merges);
    return -1;
}

static void
Bpe_dealloc(PyObject *self)
{
    Bpe *b = (Bpe *)self;
    PyTypeObject *type = Py_TYPE(self);
    for (uint32_t i = 0; b->id_objects != NULL && i < b->n_ids; i++) {
        Py_XDECREF(b->id_objects[i]);
    }
    PyMem_Free(b->id_objects);
    PyMem_Free(b->merges);
    word_cache_free(&b->cache);
    PyMem_Free(b->words);
    PyMem_Free(b->word_bytes);
    PyMem_Free(b->chars);
    added_set_clear(&b->raw_added);
    added_set_clear(&b->normalized_added);
    type->tp_free(self);
    Py_DECREF(type);
}

static int build_sp_tables(Bpe *b, PyObject *vocab, int byte_fallback);

/* The tables of a new BPEEncoder or (b->sp) SentencePieceBPEEncoder `b`
 * whose options are set; takes `vocab` (a private dict). Returns `b`, or NULL with `b`
 * freed and the exception set. */
static PyObject *
bpe_init(Bpe *b, PyObject *vocab, PyObject *merges, PyObject *unk_id, PyObject *added_tokens,
         int byte_fallback)
{
    b->unk_id = -1;
    if (word_cache_init(&b->cache) < 0) {
        goto error;
    }
    if (exact_ids(vocab) < 0 || build_bpe_vocab(b, vocab) < 0
        || (b->sp && build_sp_tables(b, vocab, byte_fallback) < 0)
        || build_merges(b, vocab, merges) < 0) {
        goto error;
    }
    if (unk_id != Py_None) {
        long id = PyLong_AsLong(unk_id);
        if (id == -1 && PyErr_Occurred()) {
            goto error;
        }
        if (id < 0 || id >= (long)b->n_ids || b->id_objects[id] == NULL) {
            PyErr_Format(PyExc_ValueError, "unk_id %R is not an id of the vocab", unk_id);
            goto error;
        }
        b->unk_id = (int32_t)id;
    }
    /* SentencePiece-style: cut where no char is dropped (HF's offsets shift past one for the
     * rest of what it BPEs as one word): every byte has its token, or unknown chars are unk. */
    b->cut_words = b->cut_words || (b->sp && b->unk_id >= 0 && !b->cut_blocked);
    if (added_tokens != NULL
        && build_added_tokens(&b->raw_added, &b->normalized_added, NULL, added_tokens) < 0) {
        goto error;
    }
    Py_DECREF(vocab);
    return (PyObject *)b;
error:
    Py_DECREF(vocab);
    Py_DECREF(b);
    return NULL;
}

static PyObject *
Bpe_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"vocab",         "merges",   "split",    "individual_digits",
                               "add_prefix_space", "ignore_merges", "unk_id", "fuse_unk",
                               "added_tokens",  NULL};
    PyObject *vocab_arg, *merges, *split = NULL, *unk_id = Py_None, *added_tokens = NULL;
    int individual_digits = -1, add_prefix_space = -1, ignore_merges = -1, fuse_unk = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|$UpppOpO:BPEEncoder", keywords, &vocab_arg,
                                     &merges, &split, &individual_digits, &add_prefix_space,
                                     &ignore_merges, &unk_id, &fuse_unk, &added_tokens)) {
        return NULL;
    }
    const char *missing = split == NULL                ? "split"
                          : individual_digits < 0      ? "individual_digits"
                          : add_prefix_space < 0       ? "add_prefix_space"
                          : ignore_merges < 0          ? "ignore_merges"
                                                       : NULL;
    if (missing != NULL) {
        PyErr_Format(PyExc_TypeError, "BPEEncoder() missing required keyword-only argument: '%s'",
                     missing);
        return NULL;
    }
    int split_kind = PyUnicode_CompareWithASCIIString(split, "gpt2") == 0     ? SPLIT_GPT2
                     : PyUnicode_CompareWithASCIIString(split, "llama3") == 0 ? SPLIT_LLAMA3
                                                                              : -1;
    if (split_kind < 0) {
        PyErr_Format(PyExc_ValueError, "Unknown split %R. Available: gpt2, llama3.", split);
        return NULL;
    }
    PyObject *vocab = PyObject_CallOneArg((PyObject *)&PyDict_Type, vocab_arg);
    if (vocab == NULL) {
        return NULL;
    }
    Bpe *b = (Bpe *)type->tp_alloc(type, 0);
    if (b == NULL) {
        Py_DECREF(vocab);
        return NULL;
    }
    b->split = split_kind;
    b->individual_digits = individual_digits;
    b->add_prefix_space = add_prefix_space;
    b->ignore_merges = ignore_merges;
    b->fuse_unk = fuse_unk;
    return bpe_init(b, vocab, merges, unk_id, added_tokens, -1);
}

static PyObject *
Bpe_encode(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    const Bpe *b = (const Bpe *)self;
    return encode_call(self, &((Bpe *)self)->cache, 0, args, nargs, kwnames,
                       b->sp ? sp_text : bpe_text, 1);
}

static PyObject *
Bpe_encode_batch(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    const Bpe *b = (const Bpe *)self;
    return encode_call(self, &((Bpe *)self)->cache, 1, args, nargs, kwnames,
                       b->sp ? sp_text : bpe_text, 1);
}

static PyMethodDef Bpe_methods[] = {
    {"encode", (PyCFunction)(void (*)(void))Bpe_encode, METH_FASTCALL | METH_KEYWORDS,
     ENCODE_DOC},
    {"encode_batch", (PyCFunction)(void (*)(void))Bpe_encode_batch,
     METH_FASTCALL | METH_KEYWORDS,
     ENCODE_BATCH_DOC},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Bpe_slots[] = {
    {Py_tp_new, Bpe_new},
    {Py_tp_dealloc, Bpe_dealloc},
    {Py_tp_methods, Bpe_methods},
    {Py_tp_doc,
     PyDoc_STR("BPEEncoder(vocab, merges, *, split, individual_digits, add_prefix_space, "
               "ignore_merges, unk_id=None, fuse_unk=False, added_tokens=())\n--\n\n"
               "Text to content ids with a byte-level pre-tokenizer and BPE merges; the C twin "
               "of runtime._tokenizer_py.BPEEncoder.")},
    {0, NULL},
};

static PyType_Spec Bpe_spec = {
    .name = "runtime._tokenizer_c.BPEEncoder",
    .basicsize = sizeof(Bpe),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Bpe_slots,
};

/* A SentencePiece-style vocab's own tables: its single-char tokens, its <0xNN>
 * tokens (with byte_fallback) and, with ignore_merges, every token by its UTF-8. */
static int
build_sp_tables(Bpe *b, PyObject *vocab, int byte_fallback)
{
    size_t slots = 8;
    while (slots < 2 * (size_t)PyDict_GET_SIZE(vocab)) {
        slots *= 2;
    }
    b->chars = PyMem_Malloc(slots * sizeof(CharSlot));
    if (b->chars == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0; i < slots; i++) {
        b->chars[i].id = -1;
    }
    b->char_mask = slots - 1;
    Py_ssize_t total = 0, pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(vocab, &pos, &key, &value)) {
        total += PyUnicode_GET_LENGTH(key);
    }
    if (b->ignore_merges) {
        b->words = PyMem_Calloc(slots, sizeof(WordSlot));
        b->word_bytes = PyMem_Malloc(total ? 4 * (size_t)total : 1);
        if (b->words == NULL || b->word_bytes == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        b->word_mask = slots - 1;
    }
    size_t offset = 0;
    int inner_space = 0; /* a token with a "\u2581" after another char */
    pos = 0;
    while (PyDict_Next(vocab, &pos, &key, &value)) { /* exact ints (exact_ids), checked */
        int32_t id = (int32_t)PyLong_AsLong(value);
        Py_ssize_t length = PyUnicode_GET_LENGTH(key);
        int kind = PyUnicode_KIND(key);
        const void *data = PyUnicode_DATA(key);
        for (Py_ssize_t i = 1; i < length && !inner_space; i++) {
            inner_space = PyUnicode_READ(kind, data, i) == METASPACE
                          && PyUnicode_READ(kind, data, i - 1) != METASPACE;
        }
        if (length == 1) {
            ucs4 c = PyUnicode_READ(kind, data, 0);
            size_t i = mix64(c) & b->char_mask;
            while (b->chars[i].id >= 0 && b->chars[i].c != c) {
                i = (i + 1) & b->char_mask;
            }
            b->chars[i] = (CharSlot){c, id};
        }
        if (b->words != NULL && length > 0) {
            size_t start = offset;
            for (Py_ssize_t i = 0; i < length; i++) {
                ucs4 c = PyUnicode_READ(kind, data, i);
                offset += utf8_put(b->word_bytes + offset, c >= 0xD800 && c < 0xE000 ? 0xFFFD : c);
            }
            uint64_t h = hash_bytes(b->word_bytes + start, offset - start);
            size_t slot = slot_of(h, b->word_mask);
            while (b->words[slot].length != 0) {
                slot = (slot + 1) & b->word_mask;
            }
            b->words[slot] = (WordSlot){h, start, (uint32_t)(offset - start), id};
        }
    }
    int all_bytes = byte_fallback;
    for (int byte = 0; byte < 256; byte++) {
        b->fallback_ids[byte] = -1;
        if (!byte_fallback) {
            continue;
        }
        char name[8]; /* HF's format!("<{b:#04X}>") */
        snprintf(name, sizeof(name), "<0x%02X>", byte);
        PyObject *id = PyDict_GetItemString(vocab, name);
        if (id != NULL) {
            b->fallback_ids[byte] = (int32_t)PyLong_AsLong(id);
        }
        all_bytes = all_bytes && id != NULL;
    }
    /* As the twin's _cut_words; Sp_new adds: not where a char may be dropped. */
    b->cut_blocked = inner_space || char_id(b, METASPACE) < 0;
    b->cut_words = !b->cut_blocked && all_bytes;
    return 0;
}

static PyObject *
Sp_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"vocab",   "merges",   "prepend",       "split",        "byte_fallback",
                               "unk_id",  "fuse_unk", "ignore_merges", "added_tokens", NULL};
    PyObject *vocab_arg, *merges, *prepend = NULL, *unk_id = Py_None, *added_tokens = NULL;
    int split = -1, byte_fallback = -1, fuse_unk = 0, ignore_merges = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|$UppOppO:SentencePieceBPEEncoder",
                                     keywords, &vocab_arg, &merges, &prepend, &split,
                                     &byte_fallback, &unk_id, &fuse_unk, &ignore_merges,
                                     &added_tokens)) {
        return NULL;
    }
    const char *missing = prepend == NULL     ? "prepend"
                          : split < 0         ? "split"
                          : byte_fallback < 0 ? "byte_fallback"
                                              : NULL;
    if (missing != NULL) {
        PyErr_Format(PyExc_TypeError,
                     "SentencePieceBPEEncoder() missing required keyword-only argument: '%s'",
                     missing);
        return NULL;
    }
    static const char *schemes[] = {"legacy", "always", "first", "never"};
    int scheme = -1;
    for (int i = 0; i < 4; i++) {
        if (PyUnicode_CompareWithASCIIString(prepend, schemes[i]) == 0) {
            scheme = i; /* the PREPEND_* order */
        }
    }
    if (scheme < 0) {
        PyErr_Format(PyExc_ValueError, "Unknown prepend %R. Available: legacy, always, first, never.",
                     prepend);
        return NULL;
    }
    PyObject *vocab = PyObject_CallOneArg((PyObject *)&PyDict_Type, vocab_arg);
    if (vocab == NULL) {
        return NULL;
    }
    Bpe *b = (Bpe *)type->tp_alloc(type, 0);
    if (b == NULL) {
        Py_DECREF(vocab);
        return NULL;
    }
    b->sp = 1;
    b->prepend = scheme;
    b->sp_split = split;
    b->ignore_merges = ignore_merges;
    b->fuse_unk = fuse_unk;
    return bpe_init(b, vocab, merges, unk_id, added_tokens, byte_fallback);
}

static PyType_Slot Sp_slots[] = {
    {Py_tp_new, Sp_new},
    {Py_tp_dealloc, Bpe_dealloc},
    {Py_tp_methods, Bpe_methods}, /* Bpe_encode reads b->sp */
    {Py_tp_doc,
     PyDoc_STR("SentencePieceBPEEncoder(vocab, merges, *, prepend, split, byte_fallback, "
               "unk_id=None, fuse_unk=False, ignore_merges=False, added_tokens=())\n--\n\n"
               "Text to content ids for SentencePiece-style BPE (Llama 2, Mistral); the C twin "
               "of runtime._tokenizer_py.SentencePieceBPEEncoder.")},
    {0, NULL},
};

static PyType_Spec Sp_spec = {
    .name = "runtime._tokenizer_c.SentencePieceBPEEncoder",
    .basicsize = sizeof(Bpe),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Sp_slots,
};

/* ============================================================ Unigram
 *
 * The C twin of _tokenizer_py.UnigramEncoder (XLM-R, T5), same steps in the same order:
 *
 *     added tokens -> Precompiled, Strip, Replace -> normalized added tokens ->
 *     [WhitespaceSplit] -> Metaspace -> Viterbi over the pieces -> ids
 *
 * It runs what transformers writes: a Replace of a string, or of a run of one
 * char (" {2,}"); the "always" and "never" prepend schemes. Another layout raises
 * NotImplementedError, and runtime.Tokenizer takes the twin. */

/* A step of the normalizer. */
enum { STEP_PRECOMPILED, STEP_STRIP, STEP_REPLACE_STRING, STEP_REPLACE_RUN };

typedef struct {
    int kind;
    int left, right;      /* STEP_STRIP */
    ucs4 *pattern;        /* STEP_REPLACE_STRING: the string; STEP_REPLACE_RUN: the char */
    size_t pattern_len;   /* STEP_REPLACE_RUN: the shortest run replaced */
    ucs4 *content;
    size_t content_len;
} UniStep;

#define UNI_MAX_STEPS 16

/* A piece of the vocab's open-addressing table: index + 1 (0: empty). */
typedef struct {
    uint64_t hash;
    uint32_t index;
} PieceSlot;

typedef struct {
    PyObject_HEAD
    WordCache cache;
    PyObject **id_objects;  /* id -> int (owned) */
    uint32_t n_ids;
    ucs4 *piece_chars;      /* every piece's chars, back to back */
    size_t *piece_at;       /* piece i: piece_chars[piece_at[i]:piece_at[i + 1]] */
    double *scores;
    PieceSlot *slots;
    size_t slot_mask;
    size_t *lengths;        /* the lengths (chars) pieces have, ascending */
    size_t n_lengths;
    uint8_t *is_length;     /* is_length[k]: a piece has k chars (k <= longest) */
    size_t longest;
    uint64_t *prefixes;     /* a Bloom filter (one bit) of the hashes of every piece's */
    int prefix_shift;       /* prefixes, themselves included: the Viterbi's early stop */
    int32_t unk_id;
    double unk_score;
    int32_t fallback_ids[256]; /* <0xNN> piece of each byte; -1: none (or no byte_fallback) */
    uint32_t *units;        /* the charsmap's double array; NULL: no Precompiled step */
    size_t n_units;
    uint8_t *pool;          /* its replacement strings, NUL-terminated UTF-8 */
    size_t pool_len;
    UniStep steps[UNI_MAX_STEPS];
    int n_steps, prepend, split, whitespace_split;
    AddedSet raw_added, normalized_added;
} Uni;

static inline int
gb_class(ucs4 c)
{
    size_t lo = 0, hi = N_ROWS(tok_gb);
    while (lo < hi) { /* the first run that ends at c or after it */
        size_t mid = (lo + hi) / 2;
        if (tok_gb[mid].last < c) {
            lo = mid + 1;
        }
        else {
            hi = mid;
        }
    }
    return lo < N_ROWS(tok_gb) && tok_gb[lo].first <= c ? tok_gb[lo].kind : TOK_GB_OTHER;
}

static inline size_t
darts_offset(uint32_t unit)
{
    return (size_t)(unit >> 10) << ((unit & (1u << 9)) >> 6);
}

/* Strict UTF-8 to UCS4 (what Python's decode accepts); -1 where it is not valid. */
static int
utf8_chars(const uint8_t *p, size_t n, TextBuf *out)
{
    size_t i = 0;
    while (i < n) {
        uint8_t b = p[i];
        ucs4 c;
        size_t k;
        if (b < 0x80) {
            c = b, k = 1;
        }
        else if (b >= 0xC2 && b < 0xE0) {
            c = b & 0x1F, k = 2;
        }
        else if (b >= 0xE0 && b < 0xF0) {
            c = b & 0x0F, k = 3;
        }
        else if (b >= 0xF0 && b < 0xF5) {
            c = b & 0x07, k = 4;
        }
        else {
            return -1;
        }
        if (i + k > n) {
            return -1;
        }
        for (size_t j = 1; j < k; j++) {
            if ((p[i + j] & 0xC0) != 0x80) {
                return -1;
            }
            c = c << 6 | (p[i + j] & 0x3F);
        }
        if ((k == 3 && (c < 0x800 || (c >= 0xD800 && c < 0xE000))) || (k == 4 && (c < 0x10000 || c > 0x10FFFF))) {
            return -1;
        }
        if (text_reserve(out, 1) < 0) {
            return -2;
        }
        out->data[out->len++] = c;
        i += k;
    }
    return 0;
}

/* Precompiled's transform: appends what chars[0:n] becomes to `out` and returns 1;
 * 0 (nothing appended) where no key of the charsmap is a prefix of their UTF-8;
 * -1 out of memory. The shortest key wins (HF's results[0]). */
static int
charsmap_apply(const Uni *u, const ucs4 *chars, size_t n, TextBuf *out)
{
    uint8_t bytes[24];
    size_t len = 0;
    for (size_t i = 0; i < n && len + 4 <= sizeof(bytes); i++) {
        len += utf8_put(bytes + len, chars[i]);
    }
    size_t node = darts_offset(u->units[0]);
    for (size_t i = 0; i < len; i++) {
        uint8_t byte = bytes[i];
        if (byte == 0) {
            return 0;
        }
        node ^= byte;
        if (node >= u->n_units) {
            return 0;
        }
        uint32_t unit = u->units[node];
        if ((unit & UINT32_C(0x800000FF)) != byte) {
            return 0;
        }
        node ^= darts_offset(unit);
        if (unit >> 8 & 1) {
            if (node >= u->n_units) {
                return 0;
            }
            size_t at = u->units[node] & UINT32_C(0x7FFFFFFF);
            if (at >= u->pool_len) {
                return 0;
            }
            const uint8_t *end = memchr(u->pool + at, 0, u->pool_len - at);
            size_t mark = out->len;
            int status = utf8_chars(u->pool + at, (end ? (size_t)(end - u->pool) : u->pool_len) - at,
                                    out);
            if (status == -2) {
                return -1;
            }
            if (status < 0) { /* a value inside a char: no rule (HF would panic) */
                out->len = mark;
                return 0;
            }
            return 1;
        }
    }
    return 0;
}

/* One grapheme cluster t[0:n]: whole where under 6 UTF-8 bytes and a rule
 * matches, else char by char. */
static int
precompiled_cluster(const Uni *u, const ucs4 *t, size_t n, TextBuf *out)
{
    if (n > 1) {
        size_t bytes = 0;
        for (size_t i = 0; i < n && bytes < 6; i++) {
            bytes += t[i] < 0x80 ? 1 : t[i] < 0x800 ? 2 : t[i] < 0x10000 ? 3 : 4;
        }
        if (bytes < 6) {
            int status = charsmap_apply(u, t, n, out);
            if (status != 0) {
                return status < 0 ? -1 : 0;
            }
        }
    }
    for (size_t i = 0; i < n; i++) {
        int status = charsmap_apply(u, t + i, 1, out);
        if (status < 0) {
            return -1;
        }
        if (status == 0) {
            if (text_reserve(out, 1) < 0) {
                return -1;
            }
            out->data[out->len++] = t[i];
        }
    }
    return 0;
}

/* The Precompiled step: the text's grapheme clusters (_tokenizer_py.grapheme_ends)
 * one by one. */
static int
precompiled(const Uni *u, const ucs4 *t, size_t n, TextBuf *out)
{
    out->len = 0;
    if (n == 0) {
        return 0;
    }
    int before = gb_class(t[0]);
    int in_picto = before == TOK_GB_PICTO, picto_zwj = 0;
    size_t regional = before == TOK_GB_RI, start = 0;
    for (size_t i = 1; i <= n; i++) {
        int kind = TOK_GB_OTHER, joined = 0;
        if (i < n) {
            kind = gb_class(t[i]);
            if (before == TOK_GB_CR && kind == TOK_GB_LF) {
                joined = 1;
            }
            else if (before == TOK_GB_CR || before == TOK_GB_LF || before == TOK_GB_CONTROL
                     || kind == TOK_GB_CR || kind == TOK_GB_LF || kind == TOK_GB_CONTROL) {
                joined = 0;
            }
            else if ((before == TOK_GB_L
                      && (kind == TOK_GB_L || kind == TOK_GB_V || kind == TOK_GB_LV
                          || kind == TOK_GB_LVT))
                     || ((before == TOK_GB_LV || before == TOK_GB_V)
                         && (kind == TOK_GB_V || kind == TOK_GB_T))
                     || ((before == TOK_GB_LVT || before == TOK_GB_T) && kind == TOK_GB_T)) {
                joined = 1;
            }
            else if (kind == TOK_GB_EXTEND || kind == TOK_GB_ZWJ || kind == TOK_GB_SPACING
                     || before == TOK_GB_PREPEND) {
                joined = 1;
            }
            else if (before == TOK_GB_ZWJ && kind == TOK_GB_PICTO && picto_zwj) {
                joined = 1;
            }
            else {
                joined = before == TOK_GB_RI && kind == TOK_GB_RI && regional % 2 == 1;
            }
        }
        if (!joined) {
            if (precompiled_cluster(u, t + start, i - start, out) < 0) {
                return -1;
            }
            start = i;
        }
        if (i == n) {
            break;
        }
        if (kind == TOK_GB_PICTO) {
            in_picto = 1, picto_zwj = 0;
        }
        else if (kind == TOK_GB_ZWJ) {
            picto_zwj = in_picto, in_picto = 0;
        }
        else if (kind != TOK_GB_EXTEND) {
            in_picto = picto_zwj = 0;
        }
        else {
            picto_zwj = 0;
        }
        regional = kind == TOK_GB_RI ? regional + 1 : 0;
        before = kind;
    }
    return 0;
}

static int
push_chars(TextBuf *out, const ucs4 *chars, size_t n)
{
    if (text_reserve(out, n) < 0) {
        return -1;
    }
    memcpy(out->data + out->len, chars, n * sizeof(ucs4));
    out->len += n;
    return 0;
}

/* One Strip or Replace step on t[0:n] into `out`. */
static int
uni_step(const UniStep *step, const ucs4 *t, size_t n, TextBuf *out)
{
    out->len = 0;
    if (step->kind == STEP_STRIP) {
        size_t first = 0, last = n;
        while (step->left && first < last && (char_flags(t[first]) & F_WS)) {
            first++;
        }
        while (step->right && last > first && (char_flags(t[last - 1]) & F_WS)) {
            last--;
        }
        return push_chars(out, t + first, last - first);
    }
    size_t i = 0;
    while (i < n) {
        size_t length = 0; /* of the match at i */
        if (step->kind == STEP_REPLACE_STRING) {
            if (n - i >= step->pattern_len && same_chars(t + i, step->pattern,
                                                         (Py_ssize_t)step->pattern_len)) {
                length = step->pattern_len;
            }
        }
        else {
            while (i + length < n && t[i + length] == step->pattern[0]) {
                length++;
            }
            if (length < step->pattern_len) {
                if (push_chars(out, t + i, length ? length : 1) < 0) {
                    return -1;
                }
                i += length ? length : 1;
                continue;
            }
        }
        if (length) {
            if (push_chars(out, step->content, step->content_len) < 0) {
                return -1;
            }
            i += length;
        }
        else {
            if (push_chars(out, t + i, 1) < 0) {
                return -1;
            }
            i++;
        }
    }
    return 0;
}

static inline int32_t
piece_find(const Uni *u, uint64_t hash, const ucs4 *chars, size_t n)
{
    for (size_t i = slot_of(hash, u->slot_mask);; i = (i + 1) & u->slot_mask) {
        const PieceSlot *slot = &u->slots[i];
        if (slot->index == 0) {
            return -1;
        }
        uint32_t id = slot->index - 1;
        if (slot->hash == hash && u->piece_at[id + 1] - u->piece_at[id] == n
            && same_chars(u->piece_chars + u->piece_at[id], chars, (Py_ssize_t)n)) {
            return (int32_t)id;
        }
    }
}

static int
best_reserve(Scratch *s, size_t n)
{
    if (n <= s->best_cap) {
        return 0;
    }
    size_t cap = s->best_cap ? s->best_cap : 64;
    while (cap < n) {
        cap *= 2;
    }
    double *best = PyMem_RawRealloc(s->best, cap * sizeof(double));
    if (best != NULL) {
        s->best = best;
    }
    int32_t *from = PyMem_RawRealloc(s->from, cap * sizeof(int32_t));
    if (from != NULL) {
        s->from = from;
    }
    int32_t *piece = PyMem_RawRealloc(s->piece, cap * sizeof(int32_t));
    if (piece != NULL) {
        s->piece = piece;
    }
    if (best == NULL || from == NULL || piece == NULL) {
        return -1;
    }
    s->best_cap = cap;
    return 0;
}

/* The ids of one (fused) piece w[start:stop] of the best path: its id; for an
 * unknown run, its id where the vocab has the run, else its <0xNN> tokens where
 * byte_fallback has them all, else unk (Unigram::tokenize). */
static int
uni_piece_ids(const Uni *u, const ucs4 *w, size_t start, size_t stop, int32_t id,
              int32_t *ids, size_t *count, size_t cap)
{
    if (id == u->unk_id) {
        uint64_t h = HASH_BASIS;
        for (size_t i = start; i < stop; i++) {
            h = hash_step(h, w[i]);
        }
        int32_t found = piece_find(u, h, w + start, stop - start);
        if (found >= 0) {
            id = found;
        }
        else if (u->fallback_ids[0] != -2) { /* byte_fallback */
            size_t known = 0, total = 0;
            for (size_t i = start; i < stop; i++) {
                uint8_t bytes[4];
                size_t k = utf8_put(bytes, w[i]);
                for (size_t j = 0; j < k; j++, total++) {
                    known += u->fallback_ids[bytes[j]] >= 0;
                }
            }
            if (known == total) {
                if (*count + total > cap) {
                    return -1;
                }
                for (size_t i = start; i < stop; i++) {
                    uint8_t bytes[4];
                    size_t k = utf8_put(bytes, w[i]);
                    for (size_t j = 0; j < k; j++) {
                        ids[(*count)++] = u->fallback_ids[bytes[j]];
                    }
                }
                return 0;
            }
        }
    }
    if (*count + 1 > cap) {
        return -1;
    }
    ids[(*count)++] = id;
    return 0;
}

/* The best split of one word w[0:n] (Unigram::encode_optimized): best[i] is the
 * best score of w[:i]; a piece ending at i replaces it only when strictly
 * higher, so among equal scores the first found stays (the shortest piece from
 * the earliest start). A char no single-char piece covers is unk at the unk
 * score; runs of unk pieces are fused. Through the word cache. */
static int
uni_word(const Uni *u, const ucs4 *w, size_t n, Scratch *s, IdBuf *out)
{
    if (n == 0) {
        return 0;
    }
    uint8_t key[CACHE_BYTES];
    size_t key_len = 0;
    int cacheable = s->cache != NULL;
    for (size_t i = 0; i < n && cacheable; i++) {
        uint8_t bytes[4];
        size_t k = utf8_put(bytes, w[i]);
        if (key_len + k > CACHE_BYTES) {
            cacheable = 0;
            break;
        }
        memcpy(key + key_len, bytes, k);
        key_len += k;
    }
    uint64_t hash = 0;
    CacheEntry *entry = NULL;
    if (cacheable) {
        hash = hash_bytes(key, key_len);
        entry = cache_set(s->cache, hash);
        const CacheEntry *hit = cache_find(entry, hash, key, key_len);
        if (hit != NULL) {
            for (uint8_t i = 0; i < hit->count; i++) {
                if (ids_push(out, u->id_objects[hit->ids[i]]) < 0) {
                    return -1;
                }
            }
            return 0;
        }
    }
    /* from[] is the ids' buffer once the path is read: byte tokens take up to 4 a char */
    int byte_fallback = u->fallback_ids[0] != -2;
    size_t cap = byte_fallback ? 4 * (n + 1) : n + 1;
    if (n > (size_t)INT32_MAX / 8 || best_reserve(s, cap) < 0) {
        return -1;
    }
    double *best = s->best;
    int32_t *from = s->from, *piece = s->piece;
    best[0] = 0.0;
    from[0] = 0;
    for (size_t i = 1; i <= n; i++) {
        from[i] = -1;
    }
    for (size_t i = 0; i < n; i++) {
        double base = from[i] >= 0 ? best[i] : 0.0;
        uint64_t h = HASH_BASIS;
        int single = 0;
        size_t limit = n - i < u->longest ? n : i + u->longest;
        for (size_t stop = i + 1; stop <= limit; stop++) {
            h = hash_step(h, w[stop - 1]);
            size_t bit = filter_bit(h, u->prefix_shift);
            if (!(u->prefixes[bit >> 6] >> (bit & 63) & 1)) {
                break; /* no piece starts with w[i:stop]: none longer matches either */
            }
            if (!u->is_length[stop - i]) {
                continue;
            }
            int32_t id = piece_find(u, h, w + i, stop - i);
            if (id < 0) {
                continue;
            }
            single |= stop == i + 1;
            double score = u->scores[id] + base;
            if (from[stop] < 0 || score > best[stop]) {
                best[stop] = score;
                from[stop] = (int32_t)i;
                piece[stop] = id;
            }
        }
        if (!single) {
            double score = u->unk_score + base;
            if (from[i + 1] < 0 || score > best[i + 1]) {
                best[i + 1] = score;
                from[i + 1] = (int32_t)i;
                piece[i + 1] = u->unk_id;
            }
        }
    }
    /* Back from the end: the path's pieces as (start, id) at best[stop] ... reversed
     * into the low end of `best`'s memory, which is no longer read. */
    int32_t *starts = (int32_t *)best; /* n + 1 doubles hold 2n + 2 int32 */
    int32_t *path_ids = starts + (n + 1);
    size_t count = 0;
    for (size_t stop = n; stop > 0;) {
        int32_t start = from[stop], id = piece[stop];
        if (id == u->unk_id && count && path_ids[count - 1] == u->unk_id) {
            starts[count - 1] = start; /* fuse_unk: the run grows to the left */
        }
        else {
            starts[count] = start;
            path_ids[count] = id;
            count++;
        }
        stop = (size_t)start;
    }
    /* Forward: each piece's ids, into from[] (read no more). */
    size_t mark = out->len, n_ids = 0;
    int32_t *ids = from;
    for (size_t k = count; k-- > 0;) {
        size_t start = (size_t)starts[k];
        size_t end = k ? (size_t)starts[k - 1] : n;
        if (uni_piece_ids(u, w, start, end, path_ids[k], ids, &n_ids, cap) < 0) {
            return -1;
        }
    }
    for (size_t i = 0; i < n_ids; i++) {
        if (ids_push(out, u->id_objects[ids[i]]) < 0) {
            return -1;
        }
    }
    if (entry != NULL) {
        cache_put(entry, hash, key, key_len, ids, out->len - mark);
    }
    return 0;
}

/* The Metaspace pre-tokenizer on one piece (after a WhitespaceSplit, one word of
 * it): spaces become "\u2581", one goes in front (prepend "always", where the
 * piece does not start with one), and with split each "\u2581" starts a word. */
static int
uni_metaspace(const Uni *u, const ucs4 *t, size_t n, Scratch *s, IdBuf *out)
{
    if (n == 0) {
        return 0;
    }
    TextBuf *word = &s->sorted;
    word->len = 0;
    if (text_reserve(word, n + 1) < 0) {
        return -1;
    }
    if (u->prepend == PREPEND_ALWAYS && !is_metaspace(t[0])) {
        word->data[word->len++] = METASPACE;
    }
    for (size_t i = 0; i < n; i++) {
        word->data[word->len++] = t[i] == ' ' ? METASPACE : t[i];
    }
    if (!u->split) {
        return uni_word(u, word->data, word->len, s, out);
    }
    size_t start = 0;
    for (size_t i = 1; i <= word->len; i++) {
        if (i == word->len || word->data[i] == METASPACE) {
            if (uni_word(u, word->data + start, i - start, s, out) < 0) {
                return -1;
            }
            start = i;
        }
    }
    return 0;
}

/* Between normalized added tokens: [WhitespaceSplit], then Metaspace. */
static int
uni_words(const void *ctx, const ucs4 *t, size_t n, Scratch *s, IdBuf *out)
{
    const Uni *u = ctx;
    if (!u->whitespace_split) {
        return uni_metaspace(u, t, n, s, out);
    }
    size_t i = 0;
    while (i < n) {
        while (i < n && (char_flags(t[i]) & F_WS)) {
            i++;
        }
        size_t start = i;
        while (i < n && !(char_flags(t[i]) & F_WS)) {
            i++;
        }
        if (i > start && uni_metaspace(u, t + start, i - start, s, out) < 0) {
            return -1;
        }
    }
    return 0;
}

/* Between raw added tokens: the normalizer's steps (in s->norm), then the normalized
 * added tokens in what they wrote. */
static int
uni_raw_piece(const void *ctx, const ucs4 *t, size_t n, Scratch *s, IdBuf *out)
{
    const Uni *u = ctx;
    TextBuf *in = &s->tmp, *result = &s->norm;
    in->len = 0;
    if (push_chars(in, t, n) < 0) {
        return -1;
    }
    for (int k = 0; k < u->n_steps; k++) {
        const UniStep *step = &u->steps[k];
        int status = step->kind == STEP_PRECOMPILED ? precompiled(u, in->data, in->len, result)
                                                    : uni_step(step, in->data, in->len, result);
        if (status < 0) {
            return -1;
        }
        TextBuf swap = *in; /* the result is the next step's input */
        *in = *result;
        *result = swap;
    }
    /* The text is in `in` (s->tmp); uni_metaspace writes its words in s->sorted. */
    return split_added(u, &u->normalized_added, in->data, in->len, uni_words, s, out);
}

static int
uni_text(const void *ctx, const ucs4 *t, size_t n, Scratch *s, IdBuf *out)
{
    return split_added(ctx, &((const Uni *)ctx)->raw_added, t, n, uni_raw_piece, s, out);
}

/* ------------------------------------------------------ Unigram construction */

static PyObject *
unigram_unsupported(const char *what)
{
    PyErr_Format(PyExc_NotImplementedError, "the C Unigram encoder does not implement %s",
                 what);
    return NULL;
}

static ucs4 *
ucs4_copy(PyObject *text, size_t *n)
{
    if (!PyUnicode_Check(text)) {
        PyErr_Format(PyExc_TypeError, "expected str, got %R", text);
        return NULL;
    }
    *n = (size_t)PyUnicode_GET_LENGTH(text);
    ucs4 *chars = PyMem_Malloc((*n ? *n : 1) * sizeof(ucs4));
    if (chars == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    if (*n && PyUnicode_AsUCS4(text, chars, (Py_ssize_t)*n, 0) == NULL) {
        PyMem_Free(chars);
        return NULL;
    }
    return chars;
}

/* ("precompiled", bytes) | ("strip", left, right) | ("replace_string", s, content)
 * | ("replace_regex", "c{n,}", content): the steps, with the charsmap read. */
static int
uni_steps(Uni *u, PyObject *normalizers)
{
    PyObject *seq = PySequence_List(normalizers);
    if (seq == NULL) {
        return -1;
    }
    int status = -1;
    Py_ssize_t count = PyList_GET_SIZE(seq);
    if (count > UNI_MAX_STEPS) {
        unigram_unsupported("more than 16 normalizer steps");
        goto done;
    }
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *step = PyList_GET_ITEM(seq, k);
        UniStep *out = &u->steps[u->n_steps];
        PyObject *kind, *a, *b = NULL;
        if (!PyTuple_Check(step) || PyTuple_GET_SIZE(step) < 2
            || !PyUnicode_Check(kind = PyTuple_GET_ITEM(step, 0))) {
            PyErr_Format(PyExc_ValueError, "unknown normalizer step %R", step);
            goto done;
        }
        a = PyTuple_GET_ITEM(step, 1);
        if (PyTuple_GET_SIZE(step) == 3) {
            b = PyTuple_GET_ITEM(step, 2);
        }
        if (PyUnicode_CompareWithASCIIString(kind, "precompiled") == 0 && b == NULL) {
            Py_buffer view;
            if (u->units != NULL) {
                unigram_unsupported("two Precompiled steps");
                goto done;
            }
            if (PyObject_GetBuffer(a, &view, PyBUF_SIMPLE) < 0) {
                goto done;
            }
            const uint8_t *data = view.buf;
            size_t len = (size_t)view.len;
            size_t size = len >= 4 ? (size_t)data[0] | (size_t)data[1] << 8
                                         | (size_t)data[2] << 16 | (size_t)data[3] << 24
                                   : 0;
            if (len < 4 || size % 4 || size > len - 4) {
                PyBuffer_Release(&view);
                PyErr_SetString(PyExc_ValueError, "precompiled_charsmap: a bad trie size");
                goto done;
            }
            u->n_units = size / 4;
            u->units = PyMem_Malloc((u->n_units ? u->n_units : 1) * sizeof(uint32_t));
            u->pool_len = len - 4 - size;
            u->pool = PyMem_Malloc(u->pool_len ? u->pool_len : 1);
            if (u->units == NULL || u->pool == NULL) {
                PyBuffer_Release(&view);
                PyErr_NoMemory();
                goto done;
            }
            for (size_t i = 0; i < u->n_units; i++) {
                const uint8_t *p = data + 4 + 4 * i;
                u->units[i] = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16
                              | (uint32_t)p[3] << 24;
            }
            memcpy(u->pool, data + 4 + size, u->pool_len);
            PyBuffer_Release(&view);
            TextBuf check = {0};
            int valid = u->n_units > 0 ? utf8_chars(u->pool, u->pool_len, &check) : -1;
            PyMem_RawFree(check.data);
            if (valid == -2) {
                PyErr_NoMemory();
                goto done;
            }
            if (valid < 0) {
                PyErr_SetString(PyExc_ValueError,
                                u->n_units ? "precompiled_charsmap: its replacement strings "
                                             "are not UTF-8"
                                           : "precompiled_charsmap has an empty trie");
                goto done;
            }
            out->kind = STEP_PRECOMPILED;
        }
        else if (PyUnicode_CompareWithASCIIString(kind, "strip") == 0 && b != NULL) {
            out->kind = STEP_STRIP;
            if ((out->left = PyObject_IsTrue(a)) < 0 || (out->right = PyObject_IsTrue(b)) < 0) {
                goto done;
            }
        }
        else if (PyUnicode_CompareWithASCIIString(kind, "replace_string") == 0 && b != NULL) {
            out->kind = STEP_REPLACE_STRING;
            if ((out->pattern = ucs4_copy(a, &out->pattern_len)) == NULL
                || (out->content = ucs4_copy(b, &out->content_len)) == NULL) {
                goto done;
            }
            if (out->pattern_len == 0) {
                PyErr_SetString(PyExc_ValueError, "a Replace pattern that is an empty string "
                                                  "is not supported");
                goto done;
            }
        }
        else if (PyUnicode_CompareWithASCIIString(kind, "replace_regex") == 0 && b != NULL) {
            /* "c{n,}" with c a char that stands for itself, n >= 1: a run of c */
            size_t len;
            ucs4 *regex = ucs4_copy(a, &len);
            if (regex == NULL) {
                goto done;
            }
            size_t digits = 0, least = 0;
            while (3 + digits < len && regex[2 + digits] >= '0' && regex[2 + digits] <= '9'
                   && least < 1000000) {
                least = least * 10 + (regex[2 + digits] - '0');
                digits++;
            }
            int run = len >= 5 && len == 4 + digits && digits && regex[1] == '{'
                      && regex[len - 2] == ',' && regex[len - 1] == '}' && least >= 1
                      && !strchr("\\^$.|?*+()[]{}", regex[0] < 128 ? (int)regex[0] : 'a');
            if (!run) {
                PyMem_Free(regex);
                unigram_unsupported("this Replace regex (only 'c{n,}', a run of one char)");
                goto done;
            }
            out->kind = STEP_REPLACE_RUN;
            out->pattern = regex; /* its first char is the one that runs */
            out->pattern_len = least;
            if ((out->content = ucs4_copy(b, &out->content_len)) == NULL) {
                goto done;
            }
        }
        else {
            PyErr_Format(PyExc_ValueError, "unknown normalizer step %R", step);
            goto done;
        }
        u->n_steps++;
    }
    status = 0;
done:
    Py_DECREF(seq);
    return status;
}

/* The pieces: their chars, scores and table; id_objects; the unk score. */
static int
uni_pieces(Uni *u, PyObject *pieces_arg)
{
    PyObject *pieces = PySequence_List(pieces_arg);
    if (pieces == NULL) {
        return -1;
    }
    int status = -1;
    Py_ssize_t count = PyList_GET_SIZE(pieces), total = 0;
    if (count >= MAX_BPE_ID) {
        PyErr_SetString(PyExc_ValueError, "too many pieces");
        goto done;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *entry = PyList_GET_ITEM(pieces, i);
        if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 2
            || !PyUnicode_Check(PyTuple_GET_ITEM(entry, 0))) {
            PyErr_Format(PyExc_ValueError, "pieces[%zd] is %R; expected (piece, score)", i,
                         entry);
            goto done;
        }
        total += PyUnicode_GET_LENGTH(PyTuple_GET_ITEM(entry, 0));
    }
    size_t slots = 8;
    while (slots < 2 * (size_t)count) {
        slots *= 2;
    }
    u->n_ids = (uint32_t)count;
    u->id_objects = PyMem_Calloc(count ? count : 1, sizeof(PyObject *));
    u->piece_chars = PyMem_Malloc((total ? total : 1) * sizeof(ucs4));
    u->piece_at = PyMem_Calloc(count + 1, sizeof(size_t));
    u->scores = PyMem_Calloc(count ? count : 1, sizeof(double));
    u->slots = PyMem_Calloc(slots, sizeof(PieceSlot));
    u->lengths = PyMem_Calloc(count + 1, sizeof(size_t));
    if (u->id_objects == NULL || u->piece_chars == NULL || u->piece_at == NULL
        || u->scores == NULL || u->slots == NULL || u->lengths == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    u->slot_mask = slots - 1;
    double lowest = 0.0;
    size_t at = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *entry = PyList_GET_ITEM(pieces, i), *text = PyTuple_GET_ITEM(entry, 0);
        double score = PyFloat_AsDouble(PyTuple_GET_ITEM(entry, 1));
        if (score == -1.0 && PyErr_Occurred()) {
            goto done;
        }
        if ((u->id_objects[i] = PyLong_FromSsize_t(i)) == NULL) {
            goto done;
        }
        Py_ssize_t length = PyUnicode_GET_LENGTH(text);
        if (length && PyUnicode_AsUCS4(text, u->piece_chars + at, length, 0) == NULL) {
            goto done;
        }
        u->piece_at[i] = at;
        u->scores[i] = score;
        lowest = i == 0 || score < lowest ? score : lowest;
        size_t k = 0; /* keep the distinct lengths sorted (few: 1 to 16 or so) */
        while (k < u->n_lengths && u->lengths[k] < (size_t)length) {
            k++;
        }
        if (length > 0 && (k == u->n_lengths || u->lengths[k] != (size_t)length)) {
            memmove(u->lengths + k + 1, u->lengths + k, (u->n_lengths - k) * sizeof(size_t));
            u->lengths[k] = (size_t)length;
            u->n_lengths++;
        }
        uint64_t h = HASH_BASIS;
        for (Py_ssize_t j = 0; j < length; j++) {
            h = hash_step(h, u->piece_chars[at + j]);
        }
        at += (size_t)length;
        u->piece_at[i + 1] = at;
        size_t slot = slot_of(h, u->slot_mask);
        while (u->slots[slot].index) {
            slot = (slot + 1) & u->slot_mask;
        }
        u->slots[slot] = (PieceSlot){h, (uint32_t)i + 1};
    }
    u->unk_score = lowest - 10.0; /* HF's K_UNK_PENALTY */
    u->longest = u->n_lengths ? u->lengths[u->n_lengths - 1] : 0;
    u->is_length = PyMem_Calloc(u->longest + 1, 1);
    int filter_log2 = 9; /* bits: 512 at least, 8 per prefix, a power of 2 */
    while (((size_t)1 << filter_log2) < 8 * (size_t)total && filter_log2 < 40) {
        filter_log2++;
    }
    u->prefix_shift = 64 - filter_log2;
    u->prefixes = PyMem_Calloc((size_t)1 << (filter_log2 - 6), sizeof(uint64_t));
    if (u->is_length == NULL || u->prefixes == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (size_t k = 0; k < u->n_lengths; k++) {
        u->is_length[u->lengths[k]] = 1;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        uint64_t h = HASH_BASIS;
        for (size_t j = u->piece_at[i]; j < u->piece_at[i + 1]; j++) {
            h = hash_step(h, u->piece_chars[j]);
            size_t bit = filter_bit(h, u->prefix_shift);
            u->prefixes[bit >> 6] |= UINT64_C(1) << (bit & 63);
        }
    }
    status = 0;
done:
    Py_DECREF(pieces);
    return status;
}

static void
Uni_dealloc(PyObject *self)
{
    Uni *u = (Uni *)self;
    PyTypeObject *type = Py_TYPE(self);
    for (uint32_t i = 0; u->id_objects != NULL && i < u->n_ids; i++) {
        Py_XDECREF(u->id_objects[i]);
    }
    PyMem_Free(u->id_objects);
    PyMem_Free(u->piece_chars);
    PyMem_Free(u->piece_at);
    PyMem_Free(u->scores);
    PyMem_Free(u->slots);
    PyMem_Free(u->lengths);
    PyMem_Free(u->is_length);
    PyMem_Free(u->prefixes);
    PyMem_Free(u->units);
    PyMem_Free(u->pool);
    for (int k = 0; k < UNI_MAX_STEPS; k++) {
        PyMem_Free(u->steps[k].pattern);
        PyMem_Free(u->steps[k].content);
    }
    added_set_clear(&u->raw_added);
    added_set_clear(&u->normalized_added);
    word_cache_free(&u->cache);
    type->tp_free(self);
    Py_DECREF(type);
}

static PyObject *
Uni_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"pieces",           "unk_id",        "normalizers",
                               "prepend",          "split",         "whitespace_split",
                               "byte_fallback",    "added_tokens",  NULL};
    PyObject *pieces, *unk_id = NULL, *normalizers = NULL, *prepend = NULL,
                      *added_tokens = NULL;
    int split = -1, whitespace_split = 0, byte_fallback = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|$OOUpppO:UnigramEncoder", keywords,
                                     &pieces, &unk_id, &normalizers, &prepend, &split,
                                     &whitespace_split, &byte_fallback, &added_tokens)) {
        return NULL;
    }
    const char *missing = unk_id == NULL        ? "unk_id"
                          : normalizers == NULL ? "normalizers"
                          : prepend == NULL     ? "prepend"
                          : split < 0           ? "split"
                                                : NULL;
    if (missing != NULL) {
        PyErr_Format(PyExc_TypeError,
                     "UnigramEncoder() missing required keyword-only argument: '%s'", missing);
        return NULL;
    }
    int scheme = PyUnicode_CompareWithASCIIString(prepend, "always") == 0  ? PREPEND_ALWAYS
                 : PyUnicode_CompareWithASCIIString(prepend, "never") == 0 ? PREPEND_NEVER
                 : PyUnicode_CompareWithASCIIString(prepend, "first") == 0 ? PREPEND_FIRST
                                                                           : -1;
    if (scheme < 0) {
        PyErr_Format(PyExc_ValueError, "Unknown prepend %R. Available: always, first, never.",
                     prepend);
        return NULL;
    }
    if (scheme == PREPEND_FIRST) { /* needs where each char came from: the twin's */
        return unigram_unsupported("the prepend scheme \"first\"");
    }
    Uni *u = (Uni *)type->tp_alloc(type, 0);
    if (u == NULL) {
        return NULL;
    }
    u->prepend = scheme;
    u->split = split;
    u->whitespace_split = whitespace_split;
    for (int b = 0; b < 256; b++) {
        u->fallback_ids[b] = -2; /* -2: no byte_fallback at all */
    }
    if (word_cache_init(&u->cache) < 0 || uni_pieces(u, pieces) < 0
        || uni_steps(u, normalizers) < 0) {
        goto error;
    }
    long id = PyLong_AsLong(unk_id);
    if (id == -1 && PyErr_Occurred()) {
        goto error;
    }
    if (id < 0 || id >= (long)u->n_ids) {
        PyErr_Format(PyExc_ValueError, "unk_id %R is not the id of a piece", unk_id);
        goto error;
    }
    u->unk_id = (int32_t)id;
    if (byte_fallback) {
        for (int b = 0; b < 256; b++) {
            ucs4 name[6] = {'<', '0', 'x', "0123456789ABCDEF"[b >> 4],
                            "0123456789ABCDEF"[b & 15], '>'};
            uint64_t h = HASH_BASIS;
            for (int i = 0; i < 6; i++) {
                h = hash_step(h, name[i]);
            }
            u->fallback_ids[b] = piece_find(u, h, name, 6);
        }
    }
    if (added_tokens != NULL
        && build_added_tokens(&u->raw_added, &u->normalized_added, NULL, added_tokens) < 0) {
        goto error;
    }
    return (PyObject *)u;
error:
    Py_DECREF(u);
    return NULL;
}

static PyObject *
Uni_encode(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    return encode_call(self, &((Uni *)self)->cache, 0, args, nargs, kwnames, uni_text, 1);
}

static PyObject *
Uni_encode_batch(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    return encode_call(self, &((Uni *)self)->cache, 1, args, nargs, kwnames, uni_text, 1);
}

static PyMethodDef Uni_methods[] = {
    {"encode", (PyCFunction)(void (*)(void))Uni_encode, METH_FASTCALL | METH_KEYWORDS,
     ENCODE_DOC},
    {"encode_batch", (PyCFunction)(void (*)(void))Uni_encode_batch,
     METH_FASTCALL | METH_KEYWORDS,
     ENCODE_BATCH_DOC},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Uni_slots[] = {
    {Py_tp_new, Uni_new},
    {Py_tp_dealloc, Uni_dealloc},
    {Py_tp_methods, Uni_methods},
    {Py_tp_doc,
     PyDoc_STR("UnigramEncoder(pieces, *, unk_id, normalizers, prepend, split, "
               "whitespace_split=False, byte_fallback=False, added_tokens=())\n--\n\n"
               "Text to content ids for Unigram files (XLM-R, T5); the C twin of "
               "runtime._tokenizer_py.UnigramEncoder. A layout it does not run raises "
               "NotImplementedError.")},
    {0, NULL},
};

static PyType_Spec Uni_spec = {
    .name = "runtime._tokenizer_c.UnigramEncoder",
    .basicsize = sizeof(Uni),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Uni_slots,
};

/* ---------------------------------------------------------------- the module */

static PyMethodDef Encoder_methods[] = {
    {"encode", (PyCFunction)(void (*)(void))Encoder_encode, METH_FASTCALL | METH_KEYWORDS,
     ENCODE_DOC},
    {"encode_batch", (PyCFunction)(void (*)(void))Encoder_encode_batch,
     METH_FASTCALL | METH_KEYWORDS,
     ENCODE_BATCH_DOC},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Encoder_slots[] = {
    {Py_tp_new, Encoder_new},
    {Py_tp_dealloc, Encoder_dealloc},
    {Py_tp_methods, Encoder_methods},
    {Py_tp_doc,
     PyDoc_STR("WordPieceEncoder(vocab, *, unk_token, continuing_subword_prefix, "
               "max_input_chars_per_word, clean_text, handle_chinese_chars, strip_accents, "
               "lowercase, added_tokens=())\n--\n\n"
               "Text to content ids with BERT normalization and WordPiece; the C twin of "
               "runtime._tokenizer_py.WordPieceEncoder.")},
    {0, NULL},
};

static PyType_Spec Encoder_spec = {
    .name = "runtime._tokenizer_c.WordPieceEncoder",
    .basicsize = sizeof(Encoder),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Encoder_slots,
};

static int
module_exec(PyObject *module)
{
    /* The tables hold this Python's NFD and lowercase (as the twin uses them);
     * under another Unicode version the twin would give other ids. */
    PyObject *unicodedata = PyImport_ImportModule("unicodedata");
    if (unicodedata == NULL) {
        return -1;
    }
    PyObject *version = PyObject_GetAttrString(unicodedata, "unidata_version");
    Py_DECREF(unicodedata);
    if (version == NULL) {
        return -1;
    }
    int same = PyUnicode_Check(version)
               && PyUnicode_CompareWithASCIIString(version, TOK_UNIDATA_VERSION) == 0;
    if (!same) {
        PyErr_Format(PyExc_ImportError,
                     "runtime._tokenizer_c was built with Unicode %s tables, this Python has "
                     "%R; rebuild it (pip install .)",
                     TOK_UNIDATA_VERSION, version);
    }
    Py_DECREF(version);
    if (!same) {
        return -1;
    }
    PyType_Spec *specs[] = {&Encoder_spec, &Bpe_spec, &Sp_spec, &Uni_spec};
    for (size_t i = 0; i < N_ROWS(specs); i++) {
        PyObject *type = PyType_FromModuleAndSpec(module, specs[i], NULL);
        if (type == NULL) {
            return -1;
        }
        int status = PyModule_AddType(module, (PyTypeObject *)type);
        Py_DECREF(type);
        if (status < 0) {
            return -1;
        }
    }
    return 0;
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
#if PY_VERSION_HEX >= 0x030C0000
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
#if PY_VERSION_HEX >= 0x030D0000
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

/* batch_threads for Python: how many threads encode_batch would use. */
static PyObject *
module_batch_threads(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        return PyErr_Format(PyExc_TypeError, "batch_threads() takes 2 arguments (%zd given)",
                            nargs);
    }
    Py_ssize_t chars = PyLong_AsSsize_t(args[0]), count = PyLong_AsSsize_t(args[1]);
    if ((chars == -1 || count == -1) && PyErr_Occurred()) {
        return NULL;
    }
    if (chars < 0 || count < 0) {
        return PyErr_Format(PyExc_ValueError, "batch_threads() takes counts >= 0");
    }
    return PyLong_FromLong(batch_threads((size_t)chars, count));
}

static PyMethodDef module_methods[] = {
    {"batch_threads", (PyCFunction)(void (*)(void))module_batch_threads, METH_FASTCALL,
     PyDoc_STR("batch_threads(chars, texts, /)\n--\n\n"
               "Threads encode_batch uses for `texts` texts of `chars` chars in all here.")},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "runtime._tokenizer_c",
    .m_doc = "C twin of runtime._tokenizer_py: WordPiece, byte-level and SentencePiece-style "
              "BPE, Unigram; text in, ids out.",
    .m_size = 0,
    .m_methods = module_methods,
    .m_slots = module_slots,
};

PyMODINIT_FUNC
PyInit__tokenizer_c(void)
{
    return PyModuleDef_Init(&module_def);
}
