# Augments engine.py when setup.py compiles it with Cython (pure Python ignores this
# file): Engine becomes an extension type whose attributes are struct fields. Every
# attribute it sets must be declared here.
cdef class Engine:
    cdef public list recognizers, kinds, patterns, global_patterns
    cdef public object context, prefilter
    cdef public Py_ssize_t margin
    cdef public object _gate_mins, _gate
    cdef public dict _phone_cache
    cdef public object _phone_shapes
    cdef public list _phone_order, _phone_wins, _phone_idx, _phone_contexts, _other_idx
    cdef public object _phone_fwd, _phone_rev
