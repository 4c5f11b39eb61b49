"""Static analysis of a recognizer regex, so that it only runs where it can match.

Why: presidio runs ~35 regexes over the whole text (several times slower than the text
can be read). We derive, from the parsed pattern itself, a hyperscan expression whose
matches are a superset of the prefixes of every possible match, plus bounds on how far a
match can extend around such a prefix. The real regex then runs only inside those
bounded intervals, from safe restart points, which yields exactly the matches of
`finditer` over the whole text (see `engine.py`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from re import _constants as C  # type: ignore[attr-defined]
from re import _parser as P  # type: ignore[attr-defined]

import regex

# Non-ASCII characters are mapped to one of these bytes before hyperscan sees the text.
NONWORD_PLACEHOLDER = 0x1A
WORD_PLACEHOLDER = ord("_")

_CATEGORY = {
    C.CATEGORY_DIGIT: r"\d",
    C.CATEGORY_NOT_DIGIT: r"\D",
    C.CATEGORY_SPACE: r"\s",
    C.CATEGORY_NOT_SPACE: r"\S",
    C.CATEGORY_WORD: r"\w",
    C.CATEGORY_NOT_WORD: r"\W",
}
_REPEATS = (C.MAX_REPEAT, C.MIN_REPEAT, C.POSSESSIVE_REPEAT)
_CASE_FLAGS = re.IGNORECASE | re.DOTALL


class Unsupported(Exception):
    """The pattern uses a construct we cannot bound; it is then run over the whole text."""


# Internal nodes: ("c", bytes_set, nonascii) | ("seq", [n]) | ("alt", [n])
# | ("rep", lo, hi|None, n) | ("b", "b"|"B") | ("z",)
Node = tuple


@dataclass(frozen=True)
class PatternPlan:
    """What the engine needs to run one regex exactly but only where it can match."""

    hs_ascii: bytes  # prefilter expression for texts whose non-ASCII chars are unambiguous
    hs_nob: bytes  # same without word boundaries, for any text
    pmin: int  # width range of a prefilter match
    pmax: int | None  # None: unbounded
    wmax: int | None  # max width of a real match; None: unbounded
    guard: int | None  # chars a match may peek at past its end; None: unbounded
    consumable: frozenset[str]  # ASCII chars some match may contain


@lru_cache(maxsize=4096)
def _members(text: str, flags: int) -> frozenset[int]:
    """ASCII code points matched by a one-character regex under `re` or `regex` rules."""
    f = flags & _CASE_FLAGS
    a, b = re.compile(text, f), regex.compile(text, f)
    return frozenset(c for c in range(128) if a.fullmatch(chr(c)) or b.fullmatch(chr(c)))


def _char_node(op: int, av: object, flags: int) -> Node:
    nonascii = op in (C.NOT_LITERAL, C.ANY)
    if op == C.LITERAL:
        text = re.escape(chr(av))  # type: ignore[arg-type]
        nonascii = av >= 128  # type: ignore[operator]
    elif op == C.NOT_LITERAL:
        text = "[^" + re.escape(chr(av)) + "]"  # type: ignore[arg-type]
    elif op == C.ANY:
        text = "."
    else:  # IN
        parts, neg = [], False
        for iop, iav in av:  # type: ignore[attr-defined]
            if iop == C.NEGATE:
                neg = nonascii = True
            elif iop == C.LITERAL:
                parts.append(re.escape(chr(iav)))
                nonascii |= iav >= 128
            elif iop == C.RANGE:
                parts.append(re.escape(chr(iav[0])) + "-" + re.escape(chr(iav[1])))
                nonascii |= iav[1] >= 128
            elif iop == C.CATEGORY:
                parts.append(_CATEGORY[iav])
                nonascii = True
            else:
                raise Unsupported(f"class item {iop}")
        text = "[" + ("^" if neg else "") + "".join(parts) + "]"
    # Non-ASCII letters that fold to ASCII ones (KELVIN SIGN ~ k) are mapped to those
    # letters before scanning (prefilter.FOLDS), so case-insensitive letters need no more.
    return ("c", _members(text, flags), nonascii)


def _convert(sub: P.SubPattern, flags: int, groups: dict[int, Node], info: dict) -> Node:
    items: list[Node] = []
    for op, av in sub:
        if op in (C.LITERAL, C.NOT_LITERAL, C.ANY, C.IN):
            node = _char_node(op, av, flags)
            info["consumable"] |= node[1]
            if node[2]:
                info["nonascii_consumable"] = True
            items.append(node)
        elif op == C.BRANCH:
            items.append(("alt", [_convert(alt, flags, groups, info) for alt in av[1]]))
        elif op == C.SUBPATTERN:
            group, add, delete, body = av
            node = _convert(body, (flags | add) & ~delete, groups, info)
            if group:
                groups[group] = node
            items.append(node)
        elif op == C.ATOMIC_GROUP:
            items.append(_convert(av, flags, groups, info))
        elif op in _REPEATS:
            lo, hi, body = av
            items.append(
                ("rep", lo, None if hi == C.MAXREPEAT else hi, _convert(body, flags, groups, info))
            )
        elif op == C.GROUPREF:
            if av not in groups:
                raise Unsupported("forward group reference")
            items.append(groups[av])  # a backreference matches a string of its group
        elif op == C.AT:
            if av == C.AT_BOUNDARY:
                items.append(("b", "b"))
            elif av == C.AT_NON_BOUNDARY:
                items.append(("b", "B"))
            else:
                items.append(("z",))
        elif op in (C.ASSERT, C.ASSERT_NOT):
            direction, body = av
            if direction == 1:  # lookahead: how far past the current position it peeks
                w = body.getwidth()[1]
                info["guard"] = max(info["guard"], w if w < C.MAXREPEAT else 1 << 62)
            items.append(("z",))
        else:
            raise Unsupported(f"opcode {op}")
    return ("seq", items)


def _width(node: Node) -> tuple[int, int | None]:
    kind = node[0]
    if kind == "c":
        return 1, 1
    if kind in ("b", "z"):
        return 0, 0
    if kind == "rep":
        lo, hi, body = node[1], node[2], node[3]
        bmin, bmax = _width(body)
        top = None if hi is None or bmax is None else hi * bmax
        return lo * bmin, (0 if hi == 0 else top)
    widths = [_width(n) for n in node[1]]
    if kind == "seq":
        tops = [w[1] for w in widths]
        return sum(w[0] for w in widths), (None if None in tops else sum(tops))  # type: ignore[arg-type]
    if not widths:  # empty alternation cannot happen from the parser
        return 0, 0
    tops = [w[1] for w in widths]
    return min(w[0] for w in widths), (None if None in tops else max(tops))  # type: ignore[type-var]


def _trim(node: Node) -> Node:
    """A node matching a prefix of every match of `node`, ending as early as possible.

    Why: hyperscan reports every end offset of every match; trimming trailing variable
    repetitions to their minimum collapses those reports to about one per candidate.
    """
    kind = node[0]
    if kind == "seq":
        items = list(node[1])
        while items:
            last = _trim(items[-1])
            if _width(last)[1] == 0:
                items.pop()
                continue
            items[-1] = last
            break
        return ("seq", items)
    if kind == "alt":
        return ("alt", [_trim(n) for n in node[1]])
    if kind == "rep":
        lo, body = node[1], node[3]
        if lo == 0:
            return ("seq", [])
        head = [("rep", lo - 1, lo - 1, body)] if lo > 1 else []
        return ("seq", head + [_trim(body)])
    if kind in ("b", "z"):
        return ("seq", [])
    return node


def _byte(c: int, in_class: bool) -> str:
    ch = chr(c)
    if ch.isalnum() and ch.isascii():
        return ch
    if 32 < c < 127 and not in_class and ch not in "\\^$.|?*+()[]{}/#":
        return ch
    return f"\\x{c:02x}"


def _loosen(node: Node, level: int) -> Node:
    """A superset that hyperscan can compile: level 1 unbounds long counted repeats,
    level 2 also turns large alternations into a repeated union class."""
    kind = node[0]
    if kind == "seq":
        return ("seq", [_loosen(n, level) for n in node[1]])
    if kind == "rep":
        hi = node[2]
        hi = None if hi is not None and hi > 16 else hi
        return ("rep", node[1], hi, _loosen(node[3], level))
    if kind == "alt":
        alts = [_loosen(n, level) for n in node[1]]
        if level >= 2 and len(alts) > 8:
            members: set[int] = set()
            nonascii = False
            for leaf in _leaves(("alt", alts)):
                members |= leaf[1]
                nonascii |= leaf[2]
            lo, hi = _width(("alt", alts))
            return ("rep", lo, hi, ("c", frozenset(members), nonascii))
        return ("alt", alts)
    return node


def _leaves(node: Node):
    kind = node[0]
    if kind == "c":
        yield node
    elif kind in ("seq", "alt"):
        for n in node[1]:
            yield from _leaves(n)
    elif kind == "rep":
        yield from _leaves(node[3])


def _class_expr(members: frozenset[int], nonascii: bool) -> str:
    codes = set(members)
    if nonascii:
        codes |= {NONWORD_PLACEHOLDER, WORD_PLACEHOLDER}
    if not codes:
        raise Unsupported("empty character class")
    ordered = sorted(codes)
    if len(ordered) == 1:
        return _byte(ordered[0], False)
    ranges: list[str] = []
    start = prev = ordered[0]
    for c in ordered[1:] + [-1]:
        if c == prev + 1:
            prev = c
            continue
        if start == prev:
            ranges.append(_byte(start, True))
        elif prev == start + 1:
            ranges.append(_byte(start, True) + _byte(prev, True))
        else:
            ranges.append(_byte(start, True) + "-" + _byte(prev, True))
        start = prev = c
    return "[" + "".join(ranges) + "]"


def _emit(node: Node, keep_b: bool) -> str:
    kind = node[0]
    if kind == "c":
        return _class_expr(node[1], node[2])
    if kind == "b":
        return ("\\" + node[1]) if keep_b else ""
    if kind == "z":
        return ""
    if kind == "seq":
        return "".join(_emit(n, keep_b) for n in node[1])
    if kind == "alt":
        return "(?:" + "|".join(_emit(n, keep_b) for n in node[1]) + ")"
    lo, hi, body = node[1], node[2], node[3]
    inner = _emit(body, keep_b)
    if lo == 1 and hi == 1:
        return inner
    if not inner:
        return ""
    return f"(?:{inner}){{{lo},{'' if hi is None else hi}}}"


def plan(pattern: str, flags: int, loosen: int = 0) -> PatternPlan:
    """Analyse one presidio regex (as compiled with `flags`); raises Unsupported.

    `loosen` > 0 trades prefilter precision for a smaller hyperscan program.
    """
    try:
        parsed = P.parse(pattern, flags)
    except re.error as exc:  # regex-module-only syntax
        raise Unsupported(str(exc)) from exc
    info: dict = {"consumable": frozenset(), "nonascii_consumable": False, "guard": 0}
    tree = _convert(parsed, parsed.state.flags, {}, info)
    wmin, wmax = parsed.getwidth()
    if wmin == 0:
        raise Unsupported("pattern can match the empty string")
    prefix = _trim(tree)
    pmin, pmax = _width(prefix)
    if pmin == 0:
        prefix = tree
        pmin, pmax = _width(prefix)
        if pmin == 0:
            raise Unsupported("prefilter would match the empty string")
    if loosen:
        # trimmed again: loosening turns a trailing alternation (a TLD list, say) into a
        # variable repeat, whose every length hyperscan would report
        prefix = _trim(_loosen(prefix, loosen))
        pmin, pmax = _width(prefix)
    guard = info["guard"]
    return PatternPlan(
        hs_ascii=_emit(prefix, True).encode(),
        hs_nob=_emit(prefix, False).encode(),
        pmin=pmin,
        pmax=pmax,
        wmax=None if wmax >= C.MAXREPEAT else wmax,
        # +2: \b, $ and similar assertions look one character past the position.
        guard=None if guard >= (1 << 62) else guard + 2,
        consumable=frozenset(chr(c) for c in info["consumable"]),
    )


def expression(pattern: str, flags: int = 0) -> tuple[bytes, bytes]:
    """A whole pattern as hyperscan expressions (with and without word boundaries),
    untrimmed, with the same character mapping as `plan`'s."""
    parsed = P.parse(pattern, flags)
    info: dict = {"consumable": frozenset(), "nonascii_consumable": False, "guard": 0}
    tree = _convert(parsed, parsed.state.flags, {}, info)
    return _emit(tree, True).encode(), _emit(tree, False).encode()


def consumable_ascii(pattern: str, flags: int) -> frozenset[str]:
    """ASCII characters that some match of `pattern` may contain (for span separators)."""
    parsed = P.parse(pattern, flags)
    info: dict = {"consumable": frozenset(), "nonascii_consumable": False, "guard": 0}
    _convert(parsed, parsed.state.flags, {}, info)
    return frozenset(chr(c) for c in info["consumable"])
