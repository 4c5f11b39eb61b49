# Augments context.py when setup.py compiles it with Cython (pure Python ignores this
# file): the two classes become extension types whose attributes are struct fields,
# not dict entries. Every attribute the classes set must be declared here; the hot
# methods are cpdef (called directly from C) with the signatures below.
cdef class ContextScorer:
    cdef public object _nlp, _positions, _covered, tokenizer, _is_stop, _is_punct
    cdef public dict _blocks, _status, _chunk_pieces, _unit_keys, zone_uses
    cdef public object _pairs, _plain_specials, _alnum_plain, _pair_index, _rules
    cdef public object _pair_tokens, _adjacent, skip_words, skip_units, _word_punct_ok
    cdef public object scanner, small_scanner, colon_words

    cpdef bint single_token(self, str chunk)
    cpdef bint filtered(self, str word)
    cpdef tuple status(self, str word)
    cpdef tuple tokenize(self, str block)
    cpdef tuple unit_keys(self, str unit)
    cpdef bint covered(self, tuple context)

cdef class DocContext:
    cdef public ContextScorer s
    cdef public str text
    cdef public Py_ssize_t n, lo, hi
    cdef public bint small
    cdef public dict _blocks, _pieces, _memo, _outer_memo, _bounds, _present, _before
    cdef public dict _zones, _queries, _expected
    cdef public list _starts
    cdef public object _low, _all_pieces, _colon_pieces, _skipping, _found, _data

    cpdef Py_ssize_t _unit_start(self, Py_ssize_t p)
    cpdef Py_ssize_t _unit_end(self, Py_ssize_t u)
    cpdef bint _safe(self, Py_ssize_t c)
    cpdef Py_ssize_t _chunk_end(self, Py_ssize_t c)
    cpdef bint _pair_fits(self, str left, str right, str a, str b)
    cpdef tuple bounds(self, Py_ssize_t p)
    cpdef tuple _compute_bounds(self, Py_ssize_t p)
    cpdef tuple block(self, Py_ssize_t p)
    cpdef bint is_piece(self, str piece)
    cpdef object _keyword(self, str tok)
    cpdef bint _straddles(self, str left, str right)
    cpdef bint _take(self, str block, list out, Py_ssize_t need, bint backward)
    cpdef list _keywords_before(self, Py_ssize_t end, Py_ssize_t need)
    cpdef list _keywords_after(self, Py_ssize_t start, Py_ssize_t need)
    cpdef tuple words(self, Py_ssize_t start)
    cpdef tuple _words(self, Py_ssize_t start)
    cpdef tuple _outer(self, Py_ssize_t b0, Py_ssize_t b1)
    cpdef bint present(self, object context)
    cpdef tuple _six_before(self, Py_ssize_t b0)
    cpdef bint any_supported(self, Py_ssize_t x, Py_ssize_t y, object context)
    cpdef bint _leads_keyword(self, Py_ssize_t x)
