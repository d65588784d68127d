/* C twin of runtime/_tokenizer_py.py: the WordPiece hot loop, text in, ids out.
 *
 * Same surface as the Python twin, `WordPieceEncoder(vocab, **options)` with
 * `.encode(text) -> list[int]`, plus `.encode_batch(texts)`. Same steps, in the
 * same order, and the same ids for every str (tests/test_tokenizer_c.py):
 *
 *     added tokens -> clean, CJK spacing, NFD + drop Mn, lowercase
 *                  -> split on whitespace and punctuation -> WordPiece -> ids
 *
 * The Unicode tables come from the twin itself: runtime/_gen_tables.py writes
 * _tokenizer_tables.h at build time (setup.py), and the module refuses to load
 * under another Unicode version than the one they were made with.
 *
 * Each call copies the text to a UCS4 buffer and then works without the GIL
 * (but for texts under RELEASE_GIL_CHARS); an encoder is read-only after
 * construction, so threads may share one. Allocation in the GIL-free part uses
 * PyMem_Raw*, the only allocator that allows it. Python objects in there are
 * borrowed id ints owned by the encoder, touched again only with the GIL.
 *
 * Module layout follows pallets/markupsafe's _speedups.c: multi-phase init
 * (PEP 489), a heap type, no global mutable state.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#include "_tokenizer_tables.h"

typedef Py_UCS4 ucs4;

/* ------------------------------------------------------------ Unicode tables */

static inline unsigned
char_flags(ucs4 c)
{
    /* c < 0x110000: Python strs hold nothing else. */
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

/* Scratch space of one encode call: never shared between threads. */
typedef struct {
    TextBuf norm, tmp, sorted;
    HashBuf hashes;
} Scratch;

static void
scratch_free(Scratch *s)
{
    PyMem_RawFree(s->norm.data);
    PyMem_RawFree(s->tmp.data);
    PyMem_RawFree(s->sorted.data);
    PyMem_RawFree(s->hashes.data);
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
    PyObject *id;
} VocabEntry;

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
    Py_ssize_t vocab_count;
    uint32_t *slots; /* open addressing; entry index + 1, 0 = empty */
    size_t slot_mask;
    ucs4 *vocab_chars;
    ucs4 *prefix;
    Py_ssize_t prefix_length;
    uint64_t prefix_hash;
    Py_ssize_t longest_token;
    long long max_word_chars;
    PyObject *unk_id;
    int clean_text, handle_chinese_chars, strip_accents, lowercase;
    AddedSet raw_added, normalized_added;
} Encoder;

static inline size_t
slot_of(uint64_t hash, size_t mask)
{
    return (size_t)((hash * UINT64_C(0x9E3779B97F4A7C15)) >> 32) & mask;
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

static PyObject *
vocab_get(const Encoder *e, uint64_t hash, const ucs4 *prefix, Py_ssize_t prefix_length,
          const ucs4 *piece, Py_ssize_t piece_length)
{
    for (size_t slot = slot_of(hash, e->slot_mask);; slot = (slot + 1) & e->slot_mask) {
        uint32_t index = e->slots[slot];
        if (index == 0) {
            return NULL;
        }
        const VocabEntry *entry = &e->vocab[index - 1];
        if (entry->hash == hash && entry->length == prefix_length + piece_length) {
            const ucs4 *key = e->vocab_chars + entry->offset;
            if (same_chars(key, prefix, prefix_length)
                && same_chars(key + prefix_length, piece, piece_length)) {
                return entry->id;
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
        else if (c >= 0xAC00 && c <= 0xD7A3) { /* Hangul syllable, Unicode 3.12 */
            if (text_reserve(dst, 3) < 0) {
                return -1;
            }
            ucs4 s = c - 0xAC00;
            dst->data[dst->len++] = 0x1100 + s / 588;
            dst->data[dst->len++] = 0x1161 + (s % 588) / 28;
            if (s % 28) {
                dst->data[dst->len++] = 0x11A7 + s % 28;
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

/* BertNormalizer in the twin's order: clean, CJK spacing, accents, lowercase.
 * Replaces the contents of `out`; uses s->tmp and s->sorted. */
static int
normalize(const Encoder *e, const ucs4 *text, size_t n, Scratch *s, TextBuf *out)
{
    /* Without a mark or a decomposable char, NFD + drop Mn changes nothing
     * (cleaning and CJK spacing add neither), so most text skips it. */
    int strip = 0;
    for (size_t i = 0; e->strip_accents && !strip && i < n; i++) {
        strip = text[i] >= 0x80 && (char_flags(text[i]) & (F_DECOMP | F_CCC | F_MN));
    }
    TextBuf *first = strip ? &s->tmp : out;
    first->len = 0;
    /* Room for the common case, ' ' c ' ' at most; longer lowercases reserve more. */
    if (n > PY_SSIZE_T_MAX / 3 / sizeof(ucs4) || text_reserve(first, 3 * n) < 0) {
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        ucs4 c = text[i];
        unsigned flags = char_flags(c);
        if (e->clean_text && (flags & (F_CONTROL | F_CLEAN_WS))) {
            if (flags & F_CONTROL) {
                continue;
            }
            c = ' ';
            flags = char_flags(c);
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

/* Greedy longest-match-first; any miss makes the whole piece unk. */
static int
word_piece(const Encoder *e, const ucs4 *piece, Py_ssize_t n, Scratch *s, IdBuf *out)
{
    if ((long long)n > e->max_word_chars) {
        return ids_push(out, e->unk_id);
    }
    size_t mark = out->len;
    for (Py_ssize_t start = 0; start < n;) {
        const ucs4 *prefix = start ? e->prefix : NULL;
        Py_ssize_t prefix_length = start ? e->prefix_length : 0;
        /* No vocab key is longer than longest_token. */
        Py_ssize_t most = e->longest_token - prefix_length;
        if (most > n - start) {
            most = n - start;
        }
        if (most > 0 && grow((void **)&s->hashes.data, &s->hashes.cap, (size_t)most + 1,
                             sizeof(uint64_t)) < 0) {
            return -1;
        }
        uint64_t h = start ? e->prefix_hash : HASH_BASIS;
        for (Py_ssize_t k = 1; k <= most; k++) {
            h = hash_step(h, piece[start + k - 1]);
            s->hashes.data[k] = h;
        }
        PyObject *id = NULL;
        Py_ssize_t k = most;
        for (; k > 0; k--) {
            id = vocab_get(e, s->hashes.data[k], prefix, prefix_length, piece + start, k);
            if (id != NULL) {
                break;
            }
        }
        if (id == NULL) {
            out->len = mark;
            return ids_push(out, e->unk_id);
        }
        if (ids_push(out, id) < 0) {
            return -1;
        }
        start += k;
    }
    return 0;
}

/* BertPreTokenizer + WordPiece: words split on whitespace, punctuation alone. */
static int
encode_words(const Encoder *e, const ucs4 *text, size_t n, Scratch *s, IdBuf *out)
{
    size_t run = 0; /* start of the current run of word chars */
    for (size_t i = 0; i <= n; i++) {
        unsigned flags = i < n ? char_flags(text[i]) : F_WS;
        if (!(flags & (F_WS | F_PUNCT))) {
            continue;
        }
        if (run < i && word_piece(e, text + run, (Py_ssize_t)(i - run), s, out) < 0) {
            return -1;
        }
        if ((flags & F_PUNCT) && !(flags & F_WS)
            && word_piece(e, text + i, 1, s, out) < 0) {
            return -1;
        }
        run = i + 1;
    }
    return 0;
}

/* -------------------------------------------------------------- added tokens */

/* Leftmost-longest match of `set` in text[pos:n]: the token, its start in *at. */
static const AddedEntry *
find_added(const AddedSet *set, const ucs4 *text, size_t n, size_t pos, size_t *at)
{
    for (size_t i = pos; i < n; i++) {
        ucs4 c = text[i];
        if (!(set->first_bits[(c & 255) >> 6] >> (c & 63) & 1)) {
            continue;
        }
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
            if ((size_t)token->length <= n - i
                && memcmp(content, text + i, token->length * sizeof(ucs4)) == 0) {
                *at = i;
                return token;
            }
        }
    }
    return NULL;
}

typedef int (*piece_fn)(const Encoder *, const ucs4 *, size_t, Scratch *, IdBuf *);

/* _AddedTokenSplitter.split: ids of the tokens found, `between` on the rest.
 * Like Python's finditer, the search resumes where the match ended, even
 * when single_word rejects it or rstrip took whitespace beyond it. */
static int
split_added(const Encoder *e, const AddedSet *set, const ucs4 *text, size_t n, piece_fn between,
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
encode_raw_piece(const Encoder *e, const ucs4 *text, size_t n, Scratch *s, IdBuf *out)
{
    if (normalize(e, text, n, s, &s->norm) < 0) {
        return -1;
    }
    return split_added(e, &e->normalized_added, s->norm.data, s->norm.len, encode_words, s,
                       out);
}

/* The whole hot loop; runs without the GIL. */
static int
encode_text(const Encoder *e, const ucs4 *text, size_t n, Scratch *s, IdBuf *out)
{
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
    e->slots = PyMem_Calloc(slots, sizeof(uint32_t));
    e->vocab_chars = PyMem_Malloc((total ? total : 1) * sizeof(ucs4));
    if (e->vocab == NULL || e->slots == NULL || e->vocab_chars == NULL) {
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
        entry->id = id_object(value, key);
        if (entry->id == NULL) {
            return -1;
        }
        e->vocab_count++; /* owns entry->id from here: dealloc frees it */
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
        while (e->slots[slot]) {
            slot = (slot + 1) & e->slot_mask;
        }
        e->slots[slot] = (uint32_t)e->vocab_count;
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
    int single_word, lstrip, rstrip, normalized;
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

/* An AddedSet of the specs whose `normalized` equals `normalized`; later
 * specs with the same content replace earlier ones, as in the twin's dict. */
static int
build_added(AddedSet *set, AddedSpec *specs, Py_ssize_t n, int normalized)
{
    PyObject *by_content = PyDict_New(); /* content -> index into specs */
    if (by_content == NULL) {
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (specs[i].normalized != normalized || PyUnicode_GET_LENGTH(specs[i].content) == 0) {
            continue;
        }
        PyObject *index = PyLong_FromSsize_t(i);
        if (index == NULL || PyDict_SetItem(by_content, specs[i].content, index) < 0) {
            Py_XDECREF(index);
            Py_DECREF(by_content);
            return -1;
        }
        Py_DECREF(index);
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

static int
build_added_tokens(Encoder *e, PyObject *added_tokens)
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
            || flag_attr(token, "normalized", &spec->normalized) < 0) {
            goto done;
        }
        if (spec->normalized) {
            /* HF matches normalized tokens by their own normalized form. */
            Py_SETREF(spec->content, normalize_str(e, spec->content));
            if (spec->content == NULL) {
                goto done;
            }
        }
    }
    if (build_added(&e->raw_added, specs, n, 0) < 0
        || build_added(&e->normalized_added, specs, n, 1) < 0) {
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
        Py_DECREF(e->vocab[i].id);
    }
    PyMem_Free(e->vocab);
    PyMem_Free(e->slots);
    PyMem_Free(e->vocab_chars);
    PyMem_Free(e->prefix);
    Py_XDECREF(e->unk_id);
    added_set_clear(&e->raw_added);
    added_set_clear(&e->normalized_added);
    type->tp_free(self);
    Py_DECREF(type);
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
    if (added_tokens != NULL && build_added_tokens(e, added_tokens) < 0) {
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

/* Ids as a new list; the ids are borrowed from the encoder. */
static PyObject *
id_list(PyObject *const *ids, size_t n)
{
    PyObject *list = PyList_New((Py_ssize_t)n);
    if (list == NULL) {
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        PyList_SET_ITEM(list, (Py_ssize_t)i, Py_NewRef(ids[i]));
    }
    return list;
}

/* Below this many chars (about a microsecond of work) the GIL is kept: giving
 * it up costs ~50 ns alone, and getting it back from a busy thread can take
 * the whole switch interval (5 ms). encode_batch always releases it. */
#define RELEASE_GIL_CHARS 256

static PyObject *
Encoder_encode(PyObject *self, PyObject *text)
{
    if (!PyUnicode_Check(text)) {
        return PyErr_Format(PyExc_TypeError, "encode() expects str, got %s",
                            Py_TYPE(text)->tp_name);
    }
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    ucs4 *chars = PyMem_RawMalloc((n ? n : 1) * sizeof(ucs4));
    if (chars == NULL) {
        return PyErr_NoMemory();
    }
    if (n && PyUnicode_AsUCS4(text, chars, n, 0) == NULL) {
        PyMem_RawFree(chars);
        return NULL;
    }
    Scratch s = {0};
    IdBuf ids = {0};
    int status;
    if (n >= RELEASE_GIL_CHARS) {
        Py_BEGIN_ALLOW_THREADS
        status = encode_text((Encoder *)self, chars, (size_t)n, &s, &ids);
        Py_END_ALLOW_THREADS
    }
    else {
        status = encode_text((Encoder *)self, chars, (size_t)n, &s, &ids);
    }
    PyObject *result = status < 0 ? PyErr_NoMemory() : id_list(ids.data, ids.len);
    PyMem_RawFree(chars);
    PyMem_RawFree(ids.data);
    scratch_free(&s);
    return result;
}

static PyObject *
Encoder_encode_batch(PyObject *self, PyObject *texts)
{
    if (PyUnicode_Check(texts)) {
        return PyErr_Format(PyExc_TypeError,
                            "encode_batch() expects a list of str, got a single str");
    }
    PyObject *seq = PySequence_Fast(texts, "encode_batch() expects a list of str");
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
    /* All texts in one buffer; ends[i] is where text i stops, in chars and in ids. */
    ucs4 *chars = PyMem_RawMalloc((total ? total : 1) * sizeof(ucs4));
    size_t *char_ends = PyMem_RawMalloc((count ? count : 1) * sizeof(size_t));
    size_t *id_ends = PyMem_RawMalloc((count ? count : 1) * sizeof(size_t));
    PyObject *result = NULL;
    Scratch s = {0};
    IdBuf ids = {0};
    if (chars == NULL || char_ends == NULL || id_ends == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    size_t offset = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *text = PySequence_Fast_GET_ITEM(seq, i);
        Py_ssize_t n = PyUnicode_GET_LENGTH(text);
        if (n && PyUnicode_AsUCS4(text, chars + offset, n, 0) == NULL) {
            goto done;
        }
        offset += n;
        char_ends[i] = offset;
    }
    int status = 0;
    Py_BEGIN_ALLOW_THREADS
    size_t start = 0;
    for (Py_ssize_t i = 0; i < count && status == 0; i++) {
        status = encode_text((Encoder *)self, chars + start, char_ends[i] - start, &s, &ids);
        id_ends[i] = ids.len;
        start = char_ends[i];
    }
    Py_END_ALLOW_THREADS
    if (status < 0) {
        PyErr_NoMemory();
        goto done;
    }
    if ((result = PyList_New(count)) == NULL) {
        goto done;
    }
    size_t first = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *list = id_list(ids.data + first, id_ends[i] - first);
        if (list == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, list);
        first = id_ends[i];
    }
done:
    PyMem_RawFree(chars);
    PyMem_RawFree(char_ends);
    PyMem_RawFree(id_ends);
    PyMem_RawFree(ids.data);
    scratch_free(&s);
    Py_DECREF(seq);
    return result;
}

/* ---------------------------------------------------------------- the module */

static PyMethodDef Encoder_methods[] = {
    {"encode", Encoder_encode, METH_O,
     PyDoc_STR("encode(text, /)\n--\n\nContent ids of `text` (no special tokens).")},
    {"encode_batch", Encoder_encode_batch, METH_O,
     PyDoc_STR("encode_batch(texts, /)\n--\n\n"
               "encode() of each str in `texts`, in one call without the GIL.")},
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
    PyObject *type = PyType_FromModuleAndSpec(module, &Encoder_spec, NULL);
    if (type == NULL) {
        return -1;
    }
    int status = PyModule_AddType(module, (PyTypeObject *)type);
    Py_DECREF(type);
    return status;
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

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "runtime._tokenizer_c",
    .m_doc = "C twin of runtime._tokenizer_py: the WordPiece hot loop, text in, ids out.",
    .m_size = 0,
    .m_slots = module_slots,
};

PyMODINIT_FUNC
PyInit__tokenizer_c(void)
{
    return PyModuleDef_Init(&module_def);
}
