# cython: language_level=3
"""The shared-memory quota table (ext/c/elbasy_shm.h) as Python objects.

``ShmTable`` owns the mapping and the slots' eventfds: the supervisor makes
it before forking, every worker inherits it and attaches with its slot
(``elbasy.shm.ShmStore``, which speaks the QuotaStore interface over it).
``Account`` holds one account's key hashes and limit numbers as C arrays,
made once per account and limit tuple.

Every method here is one C call, one lock hold. Results come back as
tuples; the C step codes are mapped to exceptions in ``check`` below:

* ``check`` returns the step's own result (``ELB_OK`` 0, ``ELB_SHED`` or
  ``ELB_LATER`` 1, or a count) and is declared ``except -1``. The C steps'
  failures are -2 and below, so -1 is never a value it returns on purpose
  (the convention of ext/loop/loop.pyx): it raises ``StoreFull`` for a full
  table and ``RuntimeError`` for the others.
"""

import time

from libc.math cimport NAN
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memset

from shm cimport (
    ELB_BUCKET, ELB_EARG, ELB_EJOURNAL, ELB_ELOCK, ELB_FULL, ELB_LATER, ELB_ROLLING, ELB_SHED,
    ELB_SHM_MAX_LIMITS, ELB_SHM_MOVED, ELB_SHM_SLOTS, ELB_SHM_WINDOW_SLOTS, ELB_WINDOW, elb_fnv1a,
    elb_limit, elb_rec, elb_shm, elb_shm_attach, elb_shm_bytes_per_bucket, elb_shm_confirm,
    elb_shm_create, elb_shm_drain, elb_shm_earliest, elb_shm_fact, elb_shm_facts_generation,
    elb_shm_give_back, elb_shm_landed, elb_shm_moved, elb_shm_moved_seq, elb_shm_observe,
    elb_shm_peek, elb_shm_put_fact, elb_shm_release_slot, elb_shm_reserve, elb_shm_settle,
    elb_shm_test_die_inside, elb_shm_throttled, elb_shm_unmap,
)

from elbasy.quota import StoreFull

SLOTS = ELB_SHM_SLOTS
WINDOW_SLOTS = ELB_SHM_WINDOW_SLOTS
MAX_LIMITS = ELB_SHM_MAX_LIMITS
MOVED_RING = ELB_SHM_MOVED
SHED = ELB_SHED
LATER = ELB_LATER
KINDS = {"bucket": ELB_BUCKET, "window": ELB_WINDOW, "rolling": ELB_ROLLING}


cdef int check(int rc) except -1:
    """rc itself when it is a result, else the exception it stands for."""
    if rc >= 0:
        return rc
    if rc == ELB_FULL:
        raise StoreFull("the quota table is full: every bucket in it is in use")
    if rc == ELB_ELOCK:
        raise RuntimeError("the quota table's lock is unusable")
    if rc == ELB_EJOURNAL:
        raise RuntimeError("a quota step outgrew the table's undo journal")
    if rc == ELB_EARG:
        raise ValueError("bad arguments to a quota table step")
    raise RuntimeError(f"quota table step failed ({rc})")


def key_hash(bytes data):
    """The 64-bit FNV-1a hash the table knows a key by (never 0)."""
    return elb_fnv1a(data, len(data))


cdef int fill(double *out, tuple values, int n) except -1:
    """n floats of ``values`` into out; 0."""
    cdef int k
    if len(values) != n:
        raise ValueError(f"{len(values)} values for {n} limits")
    for k in range(n):
        out[k] = values[k]
    return 0


cdef tuple as_tuple(const double *values, int n):
    return tuple([values[k] for k in range(n)])


cdef class Account:
    """One account's buckets as the C steps take them: hashes and limit numbers."""

    cdef int n
    cdef uint64_t h[ELB_SHM_MAX_LIMITS]
    cdef elb_limit lim[ELB_SHM_MAX_LIMITS]

    def __cinit__(self, tuple hashes, tuple params):
        cdef int k
        if not 1 <= len(hashes) <= ELB_SHM_MAX_LIMITS or len(params) != len(hashes):
            raise ValueError(f"an account has 1 to {ELB_SHM_MAX_LIMITS} limits, one hash each")
        self.n = len(hashes)
        memset(self.lim, 0, sizeof(self.lim))
        for k in range(self.n):
            self.h[k] = hashes[k]
            kind, span, interval, room, quota, period, guard, capacity = params[k]
            self.lim[k].kind = KINDS[kind]
            self.lim[k].span = span
            self.lim[k].interval = interval
            self.lim[k].room = room
            self.lim[k].quota = quota
            self.lim[k].period = period
            self.lim[k].guard = guard
            self.lim[k].capacity = capacity

    @property
    def hashes(self):
        return tuple([self.h[k] for k in range(self.n)])


cdef class ShmTable:
    """Every bucket's clocks in shared memory, for up to SLOTS worker processes."""

    cdef elb_shm *t
    cdef readonly int capacity
    cdef readonly int facts

    def __cinit__(self, int capacity=65536, int facts=4096):
        cdef int err = 0
        if capacity < 1 or facts < 0:
            raise ValueError("capacity must be >= 1 and facts >= 0")
        self.t = elb_shm_create(capacity, facts, &err)
        if self.t == NULL:
            raise OSError(err, "cannot make the shared quota table")
        self.capacity = capacity
        self.facts = facts

    def __dealloc__(self):
        if self.t != NULL:
            elb_shm_unmap(self.t, 1)
            self.t = NULL

    def close(self):
        """Unmap the table and close its eventfds (in this process only)."""
        if self.t != NULL:
            elb_shm_unmap(self.t, 1)
            self.t = NULL

    cdef inline elb_shm *table(self) except NULL:
        if self.t == NULL:
            raise ValueError("the quota table is closed")
        return self.t

    cdef inline int slot_ok(self, int slot) except -1:
        if not 0 <= slot < ELB_SHM_SLOTS:
            raise ValueError(f"slot must be in 0..{ELB_SHM_SLOTS - 1}, got {slot}")
        return 0

    # ------------------------------------------------------------------ the table

    @property
    def bytes_per_bucket(self):
        """Shared bytes per bucket of capacity (its record and its index share)."""
        return elb_shm_bytes_per_bucket(self.table())

    @property
    def size(self):
        return self.table().size

    @property
    def used(self):
        """Records handed out (at most the capacity)."""
        return self.table().c.used

    @property
    def evictions(self):
        return self.table().c.evictions

    @property
    def recovered(self):
        """Steps undone because their process died inside them."""
        return self.table().recovered

    @property
    def dropped(self):
        """Updates lost for want of room (a full table of buckets all in use)."""
        return self.table().dropped

    @property
    def facts_generation(self):
        return elb_shm_facts_generation(self.table())

    @property
    def moved_seq(self):
        return elb_shm_moved_seq(self.table())

    @property
    def attached(self):
        """The slots attached, as a bit mask."""
        return self.table().attached

    def attach(self, int slot):
        """A worker takes ``slot``: returns its eventfd."""
        self.slot_ok(slot)
        elb_shm_attach(self.table(), slot)
        return self.table().efd[slot]

    def fileno(self, int slot):
        self.slot_ok(slot)
        return self.table().efd[slot]

    def release_slot(self, int slot, now=None):
        """The worker of ``slot`` is gone: its queued units leave every bucket,
        its flying ones land at ``now`` (the wall clock if None). Returns the
        buckets changed."""
        cdef int64_t rc
        self.slot_ok(slot)
        rc = elb_shm_release_slot(self.table(), slot, time.time() if now is None else now)
        if rc < 0:
            check(<int>rc)
        return rc

    def drain(self, int slot):
        self.slot_ok(slot)
        elb_shm_drain(self.table(), slot)

    def moved(self, int slot, uint64_t last):
        """(sequence now, hashes other slots moved since ``last``, or None when lost)."""
        cdef uint64_t out[ELB_SHM_MOVED]
        cdef uint64_t seq = last
        self.slot_ok(slot)
        n = elb_shm_moved(self.table(), slot, &seq, out)
        if n == -1:
            return seq, None
        check(n)
        return seq, [out[k] for k in range(n)]

    def test_die_inside(self, int after):
        """Tests only: SIGKILL this process after ``after`` record updates inside steps."""
        elb_shm_test_die_inside(after)

    # ------------------------------------------------------------------ facts

    def fact(self, uint64_t h):
        cdef double a = 0, b = 0
        if check(elb_shm_fact(self.table(), h, &a, &b)):
            return (a, b)
        return None

    def put_fact(self, uint64_t h, double a, double b):
        return bool(check(elb_shm_put_fact(self.table(), h, a, b)))

    # ------------------------------------------------------------------ the steps

    def reserve(self, int slot, Account acct, tuple costs, double now, double max_wait):
        """(SHED or 0, depart, index of the limit that set it, slots, positions, evicted)."""
        cdef double c[ELB_SHM_MAX_LIMITS]
        cdef double slots[ELB_SHM_MAX_LIMITS]
        cdef double pos[ELB_SHM_MAX_LIMITS]
        cdef double depart = 0
        cdef int which = 0, evicted = 0, n = acct.n
        fill(c, costs, n)
        rc = check(elb_shm_reserve(self.table(), slot, n, acct.h, acct.lim, c, now, max_wait,
                                   &depart, &which, slots, pos, &evicted))
        if rc == ELB_SHED:
            return rc, depart, which, (), (), evicted
        return rc, depart, which, as_tuple(slots, n), as_tuple(pos, n), evicted

    def earliest(self, Account acct, tuple costs, tuple slots, tuple positions, double now):
        cdef double c[ELB_SHM_MAX_LIMITS]
        cdef double s[ELB_SHM_MAX_LIMITS]
        cdef double p[ELB_SHM_MAX_LIMITS]
        cdef double out = 0
        cdef int n = acct.n
        fill(c, costs, n)
        fill(s, slots, n)
        fill(p, positions, n)
        check(elb_shm_earliest(self.table(), n, acct.h, acct.lim, c, s, p, now, &out))
        return out

    def confirm(self, int slot, Account acct, tuple costs, tuple slots, tuple positions,
                double now):
        """(LATER, the time) or (0, the slots after it left)."""
        cdef double c[ELB_SHM_MAX_LIMITS]
        cdef double s[ELB_SHM_MAX_LIMITS]
        cdef double p[ELB_SHM_MAX_LIMITS]
        cdef double later = 0
        cdef int n = acct.n
        fill(c, costs, n)
        fill(s, slots, n)
        fill(p, positions, n)
        rc = check(elb_shm_confirm(self.table(), slot, n, acct.h, acct.lim, c, s, p, now, &later))
        if rc == ELB_LATER:
            return rc, later
        return rc, as_tuple(s, n)

    def give_back(self, int slot, Account acct, tuple costs, tuple slots, double now):
        cdef double c[ELB_SHM_MAX_LIMITS]
        cdef double s[ELB_SHM_MAX_LIMITS]
        cdef int n = acct.n
        fill(c, costs, n)
        fill(s, slots, n)
        check(elb_shm_give_back(self.table(), slot, n, acct.h, acct.lim, c, s, now))

    def landed(self, int slot, Account acct, tuple slots, double now):
        cdef double s[ELB_SHM_MAX_LIMITS]
        cdef int n = acct.n
        fill(s, slots, n)
        check(elb_shm_landed(self.table(), slot, n, acct.h, acct.lim, s, now))

    def settle(self, int slot, Account acct, tuple refunds, double now):
        cdef double r[ELB_SHM_MAX_LIMITS]
        cdef int n = acct.n
        fill(r, refunds, n)
        check(elb_shm_settle(self.table(), slot, n, acct.h, acct.lim, r, now))

    def observe(self, Account acct, list views, double now):
        """``views``: (limit index, value or None, block-until or None). Returns views dropped."""
        cdef int idx[16]
        cdef double val[16]
        cdef double block[16]
        cdef int m = 0
        dropped = 0
        for v in views:
            idx[m] = v[0]
            val[m] = NAN if v[1] is None else v[1]
            block[m] = NAN if v[2] is None else v[2]
            m += 1
            if m == 16:
                dropped += check(elb_shm_observe(self.table(), acct.n, acct.h, acct.lim, m, idx,
                                                 val, block, now))
                m = 0
        if m:
            dropped += check(elb_shm_observe(self.table(), acct.n, acct.h, acct.lim, m, idx, val,
                                             block, now))
        return dropped

    def throttled(self, Account acct, double now, double until):
        """Returns the limits dropped (no room for their bucket)."""
        return check(elb_shm_throttled(self.table(), acct.n, acct.h, acct.lim, now, until))

    def peek(self, uint64_t h):
        """A bucket's record as a dict (tests), or None."""
        cdef elb_rec r
        if not check(elb_shm_peek(self.table(), h, &r)):
            return None
        out = {"blocked": r.blocked, "kind": r.kind}
        if r.kind == ELB_BUCKET:
            out.update(sent=r.u.b.sent, interval=r.u.b.interval, queued=r.u.b.queued,
                       enq=r.u.b.enq, deq=r.u.b.deq, flying=r.u.b.flying,
                       per_slot=tuple([r.u.b.q[k] for k in range(ELB_SHM_SLOTS)]),
                       flying_per_slot=tuple([r.u.b.f[k] for k in range(ELB_SHM_SLOTS)]))
        else:
            out["windows"] = {
                r.u.w[k].tag: (r.u.w[k].reserved, r.u.w[k].departed, r.u.w[k].extra)
                for k in range(ELB_SHM_WINDOW_SLOTS)
                if r.u.w[k].reserved > 0 or r.u.w[k].departed > 0 or r.u.w[k].extra > 0
            }
        return out
