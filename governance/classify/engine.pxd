# Augments engine.py when setup.py compiles it with Cython (pure Python ignores this
# file): Engine becomes an extension type whose attributes are struct fields. Every
# attribute it sets must be declared here; the hot methods are cpdef (called directly
# from C) with the signatures below.
from .context cimport DocContext

cdef class Engine:
    cdef public list recognizers, kinds, patterns, global_patterns
    cdef public object context, prefilter
    cdef public Py_ssize_t margin
    cdef public object _gate_mins, _gate
    cdef public dict _phone_cache
    cdef public object _phone_shapes
    cdef public list _phone_order, _phone_wins, _phone_idx, _phone_contexts, _other_idx
    cdef public object _phone_fwd, _phone_rev

    cpdef list analyze_range(self, str text, Py_ssize_t lo, Py_ssize_t hi, object mins=*)
    cpdef object _gates(self, object mins)
    cpdef list _window(
        self, str text, Py_ssize_t lo, Py_ssize_t hi, DocContext doc, double phone_min,
        object gate=*
    )
    cpdef list _intervals(self, object p, str text, list ends)
    cpdef list _matches(self, object p, str text, list ivs, Py_ssize_t lo, Py_ssize_t hi)
    cpdef list _results(self, object p, str text, list spans)
    cpdef list _phones(
        self, str text, Py_ssize_t lo, Py_ssize_t hi, list ends, DocContext doc,
        double phone_min
    )
