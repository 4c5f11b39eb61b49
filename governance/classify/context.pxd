# Augments context.py when setup.py compiles it with Cython (pure Python ignores this
# file): the two classes become extension types whose attributes are struct fields,
# not dict entries. Every attribute the classes set must be declared here.
cdef class ContextScorer:
    cdef public object _nlp, _positions, _covered, tokenizer, _is_stop, _is_punct
    cdef public dict _blocks, _status, _chunk_pieces, _unit_keys, zone_uses
    cdef public object _pairs, _plain_specials, _alnum_plain, _pair_index, _rules
    cdef public object _pair_tokens, _adjacent, skip_words, skip_units, _word_punct_ok
    cdef public object scanner, small_scanner, colon_words

cdef class DocContext:
    cdef public ContextScorer s
    cdef public str text
    cdef public Py_ssize_t n, lo, hi
    cdef public bint small
    cdef public dict _blocks, _pieces, _memo, _outer_memo, _bounds, _present, _before
    cdef public dict _zones, _queries, _expected
    cdef public list _starts
    cdef public object _low, _all_pieces, _colon_pieces, _skipping, _found, _data
