"""Write the C header of Unicode tables for `_tokenizer_c.c` from the Python twin.

    python runtime/_gen_tables.py OUT.h

setup.py runs this at build time, with the interpreter the extension is built
for, so the C tables are those of the twin on that very interpreter:

- the frozen HF sets (control, whitespace, punctuation, non-spacing marks, CJK)
  are read from `_tokenizer_py`'s own character classes;
- what the twin takes from the running Python (NFD, `str.lower` with the
  twin's fixes, `_is_word_char`, combining classes) is read from that Python's
  `unicodedata`, whose version is written into the header; the C module
  refuses to import under a different one, so `runtime.tokenizer` falls back
  to the twin instead of giving different ids.

The output is deterministic: same interpreter and same twin, same bytes.
It imports only the standard library and loads `_tokenizer_py.py` by path, so
it runs in a build environment without numpy or onnxruntime.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import unicodedata
from pathlib import Path

# Flag bits of the per-code-point table (same names, prefixed F_, in the C file).
FLAGS = (
    # name       what the twin does with the code point
    ("CONTROL", "clean_text removes it (_CONTROL)"),
    ("CLEAN_WS", "clean_text maps it to ' ' (_CLEAN_WHITESPACE)"),
    ("WS", "pre-tokenization splits on it: Rust char::is_whitespace (_WHITESPACE)"),
    ("PUNCT", "pre-tokenization isolates it (_PUNCTUATION)"),
    ("MN", "strip_accents drops it after NFD (_NONSPACING_MARK)"),
    ("CJK", "handle_chinese_chars puts spaces around it (_CJK)"),
    ("WORD", "a word char for single_word added tokens (_is_word_char)"),
    ("DECOMP", "NFD changes it: see tok_decomp, or Hangul (computed)"),
    ("LOWER", "lowercasing changes it: see tok_lower"),
    ("CCC", "non-zero canonical combining class: see tok_ccc"),
    ("LETTER", "byte-level split regexes: \\p{L} (byte_level_classes()['letter'])"),
    ("NUMBER", "byte-level split regexes: \\p{N} (byte_level_classes()['number'])"),
    ("NUMERIC", "Digits pre-tokenizer: Rust is_numeric (byte_level_classes()['numeric'])"),
)
BIT = {name: 1 << i for i, (name, _) in enumerate(FLAGS)}

HANGUL_FIRST, HANGUL_LAST = 0xAC00, 0xD7A3
N_CODE_POINTS = 0x110000


def load_twin():
    path = Path(__file__).with_name("_tokenizer_py.py")
    spec = importlib.util.spec_from_file_location("_tokenizer_py_for_tables", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # NamedTuple wants its module importable
    spec.loader.exec_module(module)
    return module


def hangul_nfd(cp: int) -> str:
    # Unicode 3.12, "Hangul Syllable Decomposition", as the C code computes it.
    s = cp - HANGUL_FIRST
    lv = chr(0x1100 + s // 588) + chr(0x1161 + (s % 588) // 28)
    return lv + chr(0x11A7 + s % 28) if s % 28 else lv


def build(twin) -> dict:
    all_chars = "".join(map(chr, range(N_CODE_POINTS)))  # surrogates included
    flags = [0] * N_CODE_POINTS
    classes = twin.byte_level_classes()
    for name, body in [
        ("LETTER", classes["letter"]),
        ("NUMBER", classes["number"]),
        ("NUMERIC", classes["numeric"]),
        ("CONTROL", twin._CONTROL),
        ("CLEAN_WS", twin._CLEAN_WHITESPACE),
        ("WS", twin._WHITESPACE),
        ("PUNCT", twin._PUNCTUATION),
        ("MN", twin._NONSPACING_MARK),
        ("CJK", twin._CJK),
    ]:
        for match in re.finditer(f"[{body}]+", all_chars):
            for cp in range(match.start(), match.end()):
                flags[cp] |= BIT[name]

    decomp, lower, ccc = {}, {}, {}
    for cp, char in enumerate(all_chars):
        if twin._is_word_char(char):
            flags[cp] |= BIT["WORD"]
        nfd = unicodedata.normalize("NFD", char)
        if nfd != char:
            flags[cp] |= BIT["DECOMP"]
            if HANGUL_FIRST <= cp <= HANGUL_LAST:
                assert nfd == hangul_nfd(cp), hex(cp)
            else:
                decomp[cp] = nfd
        # Exactly what the twin's normalize() does to a lone char: str.lower
        # is per char except the final-sigma rule, and 'Σ' is fixed first.
        lowered = char.translate(twin._LOWERCASE_FIXES).lower()
        if lowered != char:
            flags[cp] |= BIT["LOWER"]
            lower[cp] = lowered
        if unicodedata.combining(char):
            flags[cp] |= BIT["CCC"]
            ccc[cp] = unicodedata.combining(char)

    check_assumptions(flags, decomp, lower)
    # Grapheme cluster break classes, as runs of code points of one class (the twin's
    # own function, so the C code reads exactly its classes).
    grapheme_class = twin._grapheme_class.__wrapped__
    runs: list[list[int]] = []
    for cp in range(N_CODE_POINTS):
        kind = grapheme_class(chr(cp))
        if runs and runs[-1][2] == kind and runs[-1][1] == cp - 1:
            runs[-1][1] = cp
        else:
            runs.append([cp, cp, kind])
    graphemes = {"runs": [run for run in runs if run[2] != twin._GB_OTHER],
                 "names": {name: getattr(twin, name) for name in dir(twin)
                           if name.startswith("_GB_") and isinstance(getattr(twin, name), int)}}
    return {"flags": flags, "decomp": decomp, "lower": lower, "ccc": ccc,
            "graphemes": graphemes}


def check_assumptions(flags, decomp, lower) -> None:
    """What the C code relies on to do in one pass what the twin does in several."""
    ws = BIT["WS"]
    # The twin splits on str.split() after clean_text and on Rust whitespace
    # without it; the C code always uses Rust whitespace. Same thing, since the
    # only chars where they differ are removed by clean_text ...
    for cp in range(N_CODE_POINTS):
        if chr(cp).isspace() != bool(flags[cp] & ws):
            assert flags[cp] & BIT["CONTROL"], hex(cp)
    # ... and NFD or lowercasing never make whitespace out of anything else.
    for source in (decomp, lower):
        for cp, out in source.items():
            for char in out:
                assert char.isspace() == bool(flags[ord(char)] & ws) == bool(flags[cp] & ws)
    assert all(
        not 0xD800 <= ord(c) < 0xE000 for out in [*decomp.values(), *lower.values()] for c in out
    )


def two_level(values: list[int], shift: int) -> tuple[list[int], list[int]]:
    """(index, blocks): values[cp] == blocks[(index[cp >> shift] << shift) + low bits]."""
    size = 1 << shift
    index, blocks, seen = [], [], {}
    for start in range(0, len(values), size):
        block = tuple(values[start : start + size])
        if block not in seen:
            seen[block] = len(seen)
            blocks.extend(block)
        index.append(seen[block])
    return index, blocks


def c_array(ctype: str, name: str, values, per_line: int = 16) -> str:
    items = [str(v) for v in values]
    lines = [", ".join(items[i : i + per_line]) for i in range(0, len(items), per_line)]
    body = ",\n    ".join(lines)
    return f"static const {ctype} {name}[{len(items)}] = {{\n    {body}\n}};\n"


def mapping(name: str, table: dict[int, str]) -> str:
    """Sorted (cp, offset, length) rows into one pool of code points."""
    rows, pool = [], []
    for cp in sorted(table):
        out = [ord(c) for c in table[cp]]
        rows.append(f"{{0x{cp:X}, {len(pool)}, {len(out)}}}")
        pool.extend(out)
    assert len(pool) < 1 << 16 and max(len(v) for v in table.values()) < 1 << 8
    return c_array("uint32_t", f"{name}_pool", [f"0x{c:X}" for c in pool], 10) + c_array(
        "tok_map", name, rows, 4
    )


def render(tables: dict) -> str:
    # The shift with the smallest tables; ties go to the smaller shift.
    shift = min(range(4, 10), key=lambda s: _size(tables["flags"], s))
    index, blocks = two_level(tables["flags"], shift)
    flag_lines = "".join(
        f"#define F_{name} 0x{BIT[name]:03X}  /* {what} */\n" for name, what in FLAGS
    )
    ccc_rows = [f"{{0x{cp:X}, {c}}}" for cp, c in sorted(tables["ccc"].items())]
    graphemes = tables["graphemes"]
    return (
        "/* Generated by runtime/_gen_tables.py from runtime/_tokenizer_py.py and Python's\n"
        f" * unicodedata {unicodedata.unidata_version}. Do not edit; rebuild instead. */\n\n"
        f'#define TOK_UNIDATA_VERSION "{unicodedata.unidata_version}"\n\n'
        + flag_lines
        + "\n/* Flags of code point c: tok_flags[(tok_index[c >> TOK_SHIFT] << TOK_SHIFT)\n"
        " *                               | (c & ((1 << TOK_SHIFT) - 1))] */\n"
        f"#define TOK_SHIFT {shift}\n"
        + c_array("uint16_t", "tok_index", index)
        + c_array("uint16_t", "tok_flags", [f"0x{f:X}" for f in blocks])
        + "\n/* The flags of ASCII again, one load away: most text is ASCII. */\n"
        + c_array("uint16_t", "tok_ascii_flags", [f"0x{f:X}" for f in tables["flags"][:128]])
        + "\n/* Rows of (code point, offset into the pool, length), sorted by code point. */\n"
        "typedef struct { uint32_t cp; uint16_t offset; uint8_t length; } tok_map;\n\n"
        "/* NFD of each code point with F_DECOMP (Hangul syllables are computed). */\n"
        + mapping("tok_decomp", tables["decomp"])
        + "\n/* The twin's lowercase of each code point with F_LOWER. */\n"
        + mapping("tok_lower", tables["lower"])
        + "\n/* Canonical combining class of each code point with F_CCC. */\n"
        "typedef struct { uint32_t cp; uint8_t ccc; } tok_ccc_row;\n"
        + c_array("tok_ccc_row", "tok_ccc", ccc_rows, 6)
        + "\n/* Grapheme cluster break classes (the twin's _GB_* numbers); a code point in\n"
        " * no run is TOK_GB_OTHER. Runs of one class, sorted, disjoint. */\n"
        + "".join(f"#define TOK{name} {value}\n"
                  for name, value in sorted(graphemes["names"].items(), key=lambda kv: kv[1]))
        + "typedef struct { uint32_t first, last; uint8_t kind; } tok_gb_run;\n"
        + c_array("tok_gb_run", "tok_gb",
                  [f"{{0x{a:X}, 0x{b:X}, {k}}}" for a, b, k in graphemes["runs"]], 4)
    )


def _size(values: list[int], shift: int) -> int:
    index, blocks = two_level(values, shift)
    return 2 * (len(index) + len(blocks))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} OUT.h", file=sys.stderr)
        return 2
    text = render(build(load_twin()))
    out = Path(argv[1])
    if not out.exists() or out.read_text(encoding="ascii") != text:  # keep mtime if unchanged
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="ascii")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
