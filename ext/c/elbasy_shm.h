/* elbasy quota: every bucket's clocks in one shared-memory table, for the
 * worker processes of `elbasy --workers N` (docs/design.md, "The shm table").
 *
 * The arithmetic is elbasy/quota.py's LocalStore, line for line, so the two
 * stores give the same results on the same inputs (tests/test_quota.py runs
 * its store tests on both). What LocalStore keeps in dicts lives here in
 * fixed records:
 *
 *   header   a robust process-shared mutex, the counters a step changes, the
 *            undo journal, the ring of moved buckets, one eventfd per slot
 *   index    open addressing (linear probing) of 64-bit key hashes to record
 *            numbers, at most half full; deletion shifts back (no tombstones)
 *   records  one per bucket (one limit of one account): a GCRA bucket's
 *            clocks and its queued units per worker slot, or a window
 *            limit's counts of ELB_SHM_WINDOW_SLOTS windows
 *   facts    learned hints (a plan's capacity, a query shape's cost) in an
 *            8-way set-associative table, least recently used replaced
 *
 * One step (a reserve over up to ELB_SHM_MAX_LIMITS limits, a confirm, a give
 * back...) is one function here: it takes the lock, changes records, and lets
 * go. No system call happens under the lock (the eventfd writes come after
 * it), and no Python runs inside it.
 *
 * A worker killed inside a step must leave every account as it was before
 * the step. Before a step changes any byte it copies the bytes into the
 * journal (offset, length, old bytes); the step's last act before unlocking
 * empties the journal. A process that takes the lock and gets EOWNERDEAD
 * copies the journal back, newest first, and marks the mutex consistent.
 * The journal is also how a step that cannot finish (no bucket to evict)
 * takes back what it had done.
 *
 * Keys are FNV-1a 64-bit hashes of the key strings; two keys with one hash
 * share a bucket (about one pair in 2^64 / n^2: accepted, never checked).
 */
#ifndef ELBASY_SHM_H
#define ELBASY_SHM_H

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <limits.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#define ELB_SHM_SLOTS 32         /* worker slots: queued units per slot, one eventfd each */
#define ELB_SHM_WINDOW_SLOTS 13  /* elbasy.quota.WINDOW_SLOTS */
#define ELB_SHM_MAX_LIMITS 8     /* limits one step covers */
#define ELB_SHM_MOVED 256        /* the ring of moved bucket hashes */
#define ELB_SHM_FACT_WAYS 8
#define ELB_SHM_JOURNAL 65536    /* bytes of undo journal */
#define ELB_SHM_SCAN 4096        /* records the eviction hand visits at most per insert */
#define ELB_SHM_MAGIC 0x656c6273686d3031ULL
#define ELB_EPS 1e-9             /* elbasy.quota._EPS */
#define ELB_ROUNDS 32            /* elbasy.quota._ROUNDS */

enum { ELB_BUCKET = 0, ELB_WINDOW = 1, ELB_ROLLING = 2 };

/* Step results. The negative ones are failures; a failed step changed nothing. */
#define ELB_OK 0
#define ELB_SHED 1     /* reserve: no departure within the max wait, or no window place */
#define ELB_LATER 1    /* confirm: not yet; the time is in *later */
#define ELB_FULL (-2)  /* no record free and none idle to evict */
#define ELB_ELOCK (-3) /* the mutex is unusable (ENOTRECOVERABLE) */
#define ELB_EJOURNAL (-4)
#define ELB_EARG (-5)

/* Python's max() and min() for two floats: the first one on a tie. */
#define ELB_MAX(a, b) ((b) > (a) ? (b) : (a))
#define ELB_MIN(a, b) ((b) < (a) ? (b) : (a))

/* What the arithmetic needs of a limit, made once in Python (elbasy.quota.derived). */
typedef struct {
    int kind;
    int span;         /* windows a rolling window sums (1 for the others) */
    double interval;  /* bucket: seconds per unit at the rate aimed for */
    double room;      /* bucket: units elbasy lets itself fill */
    double quota;     /* window: units per window */
    double period;    /* window: seconds of one window (or sub-window) */
    double guard;     /* fixed window: no departure this close to its end */
    double capacity;  /* the limit's capacity (a 429 marks it full) */
} elb_limit;

typedef struct {
    int64_t tag;  /* the window this place holds */
    double reserved, departed, extra;
} elb_wslot;

typedef struct {
    double sent, interval, queued, enq, deq;
    /* units sent whose answer has not come: they take room, and do not
     * restore until they land (LocalStore's _State.flying) */
    double flying;
    double q[ELB_SHM_SLOTS];  /* queued units per worker slot */
    double f[ELB_SHM_SLOTS];  /* flying units per worker slot */
} elb_bstate;

typedef struct {
    uint64_t hash;
    double blocked;  /* nothing departs before (a 429) */
    double live;     /* window: no count matters from this time on */
    uint32_t kind;
    uint32_t ref;    /* CLOCK's second chance: set on every use (a hint, not journaled) */
    union {
        elb_bstate b;
        elb_wslot w[ELB_SHM_WINDOW_SLOTS];
    } u;
} elb_rec;

typedef struct {
    uint64_t seq, hash;
    uint32_t slot, pad;
} elb_moved;

typedef struct {
    uint64_t hash;
    double a, b;
    uint64_t stamp;
} elb_fact;

/* The header's counters a step changes, journaled as one block. */
typedef struct {
    uint64_t used;       /* records handed out (they are never handed back: evicted ones are reused) */
    uint64_t evictions;
    uint64_t moved_seq;  /* entries ever written to the moved ring */
} elb_counters;

typedef struct {
    uint64_t magic;
    uint64_t size;
    uint32_t capacity, index_size, fact_sets, window_slots;
    uint64_t off_ihash, off_irec, off_recs, off_facts, off_journal;
    pthread_mutex_t lock;
    elb_counters c;
    uint64_t facts_gen;  /* read without the lock; moves after a fact is written */
    uint64_t fact_clock; /* LRU stamps of facts (a hint) */
    uint64_t hand;       /* the CLOCK hand (a hint) */
    uint64_t recovered;  /* steps undone after their process died */
    uint64_t dropped;    /* updates lost for want of room (scratch records) */
    uint32_t attached;   /* bit per slot with a live worker */
    uint32_t jn;         /* journal entries of the step under way */
    uint32_t jbytes;
    int efd[ELB_SHM_SLOTS];
    elb_moved moved[ELB_SHM_MOVED];
} elb_shm;

#define ELB_AT(t, off, type) ((type *)((char *)(t) + (off)))

/* ------------------------------------------------------------------ hashing */

/* FNV-1a, 64 bit; 0 is kept for "empty", so it reads as 1. */
static inline uint64_t elb_fnv1a(const char *p, size_t n)
{
    uint64_t h = 14695981039346656037ULL;
    size_t i;
    for (i = 0; i < n; i++) {
        h ^= (unsigned char)p[i];
        h *= 1099511628211ULL;
    }
    return h ? h : 1;
}

/* Spread a hash over the index (FNV's low bits alone cluster). */
static inline uint64_t elb_mix(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    return h;
}

/* ------------------------------------------------------------------ tests: death inside a step */

/* Tests only: this process SIGKILLs itself after that many record updates of
 * its next steps (0: never). Process-local; the tests set it in a child. */
static int elb_shm_die_countdown = 0;

static inline void elb_shm_test_die_inside(int after)
{
    elb_shm_die_countdown = after;
}

static inline void elb_die_point(void)
{
    if (elb_shm_die_countdown > 0 && --elb_shm_die_countdown == 0)
        kill(getpid(), SIGKILL);
}

/* ------------------------------------------------------------------ the journal */

/* Keep a copy of [p, p+len) before the step changes it. 0, or -1 when full. */
static inline int elb_jsave(elb_shm *t, const void *p, uint32_t len)
{
    uint32_t off = (uint32_t)((const char *)p - (const char *)t);
    uint32_t need = 8 + ((len + 7u) & ~7u);
    char *j;
    if (t->jbytes + need > ELB_SHM_JOURNAL)
        return -1;
    j = ELB_AT(t, t->off_journal, char) + t->jbytes;
    memcpy(j, &off, 4);
    memcpy(j + 4, &len, 4);
    memcpy(j + 8, p, len);
    /* the copy is whole before it counts, and it counts before the change:
     * a process dies between two instructions, so the compiler's order is
     * the order another process finds (the CPU's stores are all visible
     * once the dead owner's lock is taken) */
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    t->jbytes += need;
    __atomic_store_n(&t->jn, t->jn + 1, __ATOMIC_RELAXED);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    return 0;
}

/* Put back every byte the step under way changed, newest copy first. */
static inline void elb_jundo(elb_shm *t)
{
    uint32_t starts[ELB_SHM_JOURNAL / 8];
    uint32_t n = t->jn, k, at = 0, off, len;
    char *base = ELB_AT(t, t->off_journal, char);
    for (k = 0; k < n && at + 8 <= ELB_SHM_JOURNAL; k++) {
        starts[k] = at;
        memcpy(&len, base + at + 4, 4);
        at += 8 + ((len + 7u) & ~7u);
    }
    n = k;
    while (n-- > 0) {
        memcpy(&off, base + starts[n], 4);
        memcpy(&len, base + starts[n] + 4, 4);
        memcpy((char *)t + off, base + starts[n] + 8, len);
    }
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    t->jn = 0;
    t->jbytes = 0;
}

/* The step is done: nothing to undo any more. */
static inline void elb_jcommit(elb_shm *t)
{
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    t->jn = 0;
    t->jbytes = 0;
}

/* 0, or ELB_ELOCK. A dead owner's step is undone first. */
static inline int elb_lock(elb_shm *t)
{
    int rc = pthread_mutex_lock(&t->lock);
    if (rc == EOWNERDEAD) {
        elb_jundo(t);
        t->recovered++;
        if (pthread_mutex_consistent(&t->lock) != 0)
            return ELB_ELOCK;
        return 0;
    }
    if (rc != 0)
        return ELB_ELOCK;
    if (t->jn)  /* cannot happen: every step commits or undoes before unlocking */
        elb_jundo(t);
    return 0;
}

static inline void elb_unlock(elb_shm *t)
{
    pthread_mutex_unlock(&t->lock);
}

/* ------------------------------------------------------------------ a step's context */

typedef struct {
    elb_shm *t;
    double now;
    int err;
    int evicted;
    int counters_saved;
    uint32_t notify;  /* slots to tell after unlocking */
    int nheld;
    uint32_t held[ELB_SHM_MAX_LIMITS];  /* records this step uses: never evicted under it */
    int dropped;                         /* records that found no room: scratch ones used */
    elb_rec scratch[ELB_SHM_MAX_LIMITS];
} elb_step;

static inline void elb_step_init(elb_step *s, elb_shm *t, double now)
{
    s->t = t;
    s->now = now;
    s->err = 0;
    s->evicted = 0;
    s->counters_saved = 0;
    s->notify = 0;
    s->nheld = 0;
    s->dropped = 0;
}

static inline int elb_save_counters(elb_step *s)
{
    if (s->counters_saved)
        return 0;
    if (elb_jsave(s->t, &s->t->c, sizeof(elb_counters)) < 0)
        return -1;
    s->counters_saved = 1;
    return 0;
}

static inline uint64_t *elb_ihash(elb_shm *t) { return ELB_AT(t, t->off_ihash, uint64_t); }
static inline uint32_t *elb_irec(elb_shm *t) { return ELB_AT(t, t->off_irec, uint32_t); }
static inline elb_rec *elb_recs(elb_shm *t) { return ELB_AT(t, t->off_recs, elb_rec); }
static inline elb_fact *elb_facts(elb_shm *t) { return ELB_AT(t, t->off_facts, elb_fact); }

/* The index place of `h`: where it is (*found 1) or where it would go. */
static inline uint32_t elb_find(elb_shm *t, uint64_t h, int *found)
{
    uint32_t mask = t->index_size - 1, p = (uint32_t)(elb_mix(h) & mask);
    uint64_t *ih = elb_ihash(t);
    uint32_t *ir = elb_irec(t);
    for (;;) {
        if (ir[p] == 0) {
            *found = 0;
            return p;
        }
        if (ih[p] == h) {
            *found = 1;
            return p;
        }
        p = (p + 1) & mask;
    }
}

static inline int elb_index_save(elb_shm *t, uint32_t p)
{
    if (elb_jsave(t, &elb_ihash(t)[p], sizeof(uint64_t)) < 0)
        return -1;
    return elb_jsave(t, &elb_irec(t)[p], sizeof(uint32_t));
}

/* Take index place p out, shifting back the entries that probed past it. */
static inline int elb_index_delete(elb_shm *t, uint32_t p)
{
    uint32_t mask = t->index_size - 1, i = p, j = p, home;
    uint64_t *ih = elb_ihash(t);
    uint32_t *ir = elb_irec(t);
    for (;;) {
        j = (j + 1) & mask;
        if (ir[j] == 0)
            break;
        home = (uint32_t)(elb_mix(ih[j]) & mask);
        /* j stays when its home lies cyclically in (i, j] */
        if (i <= j ? (i < home && home <= j) : (i < home || home <= j))
            continue;
        if (elb_index_save(t, i) < 0)
            return -1;
        ih[i] = ih[j];
        ir[i] = ir[j];
        i = j;
    }
    if (elb_index_save(t, i) < 0)
        return -1;
    ih[i] = 0;
    ir[i] = 0;
    return 0;
}

/* ------------------------------------------------------------------ records */

static inline int64_t elb_slot_of(double t, double period)
{
    return (int64_t)floor(t / period + ELB_EPS);
}

static inline elb_wslot *elb_wat(elb_rec *r, int64_t j)
{
    int64_t k = j % ELB_SHM_WINDOW_SLOTS;
    return &r->u.w[k < 0 ? k + ELB_SHM_WINDOW_SLOTS : k];
}

static inline int elb_wheld(const elb_wslot *e)
{
    return e->reserved > 0 || e->departed > 0 || e->extra > 0;
}

/* What window j counts: booked (reserved + outside) or seen (departed + outside). */
static inline double elb_wcount(elb_rec *r, int64_t j, int seen)
{
    elb_wslot *e = elb_wat(r, j);
    if (e->tag != j)
        return 0.0;
    return seen ? e->departed + e->extra : e->reserved + e->extra;
}

static inline int64_t elb_oldest(const elb_limit *l, double now)
{
    return elb_slot_of(now, l->period) - l->span + 1;
}

/* May window s hold counts (elbasy.quota._claimable)? */
static inline int elb_claimable(elb_rec *r, const elb_limit *l, int64_t s, double now)
{
    elb_wslot *e = elb_wat(r, s);
    return e->tag == s || !(e->tag >= elb_oldest(l, now) && elb_wheld(e));
}

/* A bucket's units leave its queue (sent, or given back): out of the total
 * and the slot's column, and counted as out for the positions behind them. */
static inline void elb_unqueue(elb_bstate *b, int slot, double units)
{
    b->queued = ELB_MAX(0.0, b->queued - units);
    b->deq += units;
    b->q[slot] = ELB_MAX(0.0, b->q[slot] - units);
}

/* Window s's place, taken for it (elbasy.quota._claim), or NULL. */
static inline elb_wslot *elb_claim(elb_rec *r, const elb_limit *l, int64_t s, double now)
{
    elb_wslot *e = elb_wat(r, s);
    double live;
    if (!elb_claimable(r, l, s, now))
        return NULL;
    if (e->tag != s) {
        e->tag = s;
        e->reserved = e->departed = e->extra = 0.0;
    }
    live = (double)(s + l->span) * l->period;
    if (live > r->live)
        r->live = live;
    return e;
}

/* quota._take on the reserved count of window j */
static inline void elb_wtake(elb_rec *r, int64_t j, double units)
{
    elb_wslot *e = elb_wat(r, j);
    double left;
    if (e->tag != j)
        return;
    left = e->reserved - units;
    e->reserved = left > ELB_EPS ? left : 0.0;
}

/* Would a fresh bucket at `now` behave the same? Then evicting it loses nothing. */
static inline int elb_idle(const elb_rec *r, double now)
{
    if (r->blocked > now)
        return 0;
    if (r->kind == ELB_BUCKET)
        return r->u.b.queued <= 0 && r->u.b.flying <= 0 && r->u.b.sent <= now;
    return r->live <= now;
}

static inline void elb_rec_fresh(elb_rec *r, uint64_t h, int kind)
{
    memset(r, 0, sizeof(*r));
    r->hash = h;
    r->kind = (uint32_t)kind;
}

static inline int elb_is_held(const elb_step *s, uint32_t i)
{
    int k;
    for (k = 0; k < s->nheld; k++)
        if (s->held[k] == i)
            return 1;
    return 0;
}

/* CLOCK: the first idle record whose second chance is used up; failing
 * that, the first idle one seen; -1 if none among ELB_SHM_SCAN. */
static inline int64_t elb_victim(elb_step *s)
{
    elb_shm *t = s->t;
    elb_rec *recs = elb_recs(t);
    uint64_t visits = (uint64_t)t->capacity * 2, k;
    int64_t fallback = -1;
    uint32_t i;
    if (visits > ELB_SHM_SCAN)
        visits = ELB_SHM_SCAN;
    for (k = 0; k < visits; k++) {
        i = (uint32_t)(t->hand % t->capacity);
        t->hand = i + 1;
        if (elb_is_held(s, i) || !elb_idle(&recs[i], s->now))
            continue;
        if (recs[i].ref) {
            recs[i].ref = 0;
            if (fallback < 0)
                fallback = i;
            continue;
        }
        return i;
    }
    return fallback;
}

#define ELB_GET_FOUND 0    /* only a record that is there */
#define ELB_GET_MAKE 1     /* made when missing (evicting an idle one), or ELB_FULL */
#define ELB_GET_SCRATCH 2  /* made when missing, or a fresh one outside the table */

/* The record of bucket h for limit l, journaled, and rescaled to the
 * limit's interval as LocalStore._state does. `create` says what happens
 * when it is missing (ELB_GET_*). With ELB_GET_SCRATCH and no room, a fresh
 * record on the step's stack stands in (what LocalStore would make; its
 * changes are lost, and s->dropped counts it): for steps that must not fail
 * (a confirm whose bucket went idle while it waited and was evicted, a
 * server's view). NULL: not there (s->err 0) or a failure (s->err). */
static inline elb_rec *elb_get(elb_step *s, uint64_t h, const elb_limit *l, int create)
{
    elb_shm *t = s->t;
    elb_rec *recs = elb_recs(t), *r;
    int found;
    uint32_t p = elb_find(t, h, &found), i;
    int64_t v;
    double scale;
    if (found) {
        i = elb_irec(t)[p] - 1;
        r = &recs[i];
        if (elb_jsave(t, r, sizeof(*r)) < 0)
            goto journal_full;
        if (r->kind != (uint32_t)l->kind)
            elb_rec_fresh(r, h, l->kind);  /* a limit that changed its kind starts over */
    } else {
        if (!create)
            return NULL;
        if (elb_save_counters(s) < 0)
            goto journal_full;
        if (t->c.used < t->capacity) {
            i = (uint32_t)t->c.used++;
        } else {
            v = elb_victim(s);
            if (v < 0 && create == ELB_GET_SCRATCH && s->dropped < ELB_SHM_MAX_LIMITS) {
                r = &s->scratch[s->dropped++];
                elb_rec_fresh(r, h, l->kind);
                goto rescale;
            }
            if (v < 0) {
                s->err = ELB_FULL;
                return NULL;
            }
            i = (uint32_t)v;
            p = elb_find(t, recs[i].hash, &found);
            if (found && elb_index_delete(t, p) < 0)
                goto journal_full;
            t->c.evictions++;
            s->evicted++;
        }
        r = &recs[i];
        if (elb_jsave(t, r, sizeof(*r)) < 0)
            goto journal_full;
        elb_rec_fresh(r, h, l->kind);
        p = elb_find(t, h, &found);
        if (elb_index_save(t, p) < 0)
            goto journal_full;
        elb_ihash(t)[p] = h;
        elb_irec(t)[p] = i + 1;
    }
    r->ref = 1;
    if (s->nheld < ELB_SHM_MAX_LIMITS)
        s->held[s->nheld++] = i;
rescale:
    if (l->kind == ELB_BUCKET && r->u.b.interval != l->interval) {
        /* a plan learned (or changed): the bucket keeps its level in units */
        if (r->u.b.interval) {
            scale = l->interval / r->u.b.interval;
            r->u.b.sent = s->now + ELB_MAX(0.0, r->u.b.sent - s->now) * scale;
        }
        r->u.b.interval = l->interval;
    }
    return r;
journal_full:
    s->err = ELB_EJOURNAL;
    return NULL;
}

/* Fetch every record of a step; on failure everything is undone and unlocked. */
static inline int elb_get_all(elb_step *s, int n, const uint64_t *h, const elb_limit *l,
                              int create, elb_rec **r)
{
    int k;
    for (k = 0; k < n; k++) {
        r[k] = elb_get(s, h[k], &l[k], create);
        if (r[k] == NULL && s->err) {
            elb_jundo(s->t);
            elb_unlock(s->t);
            return s->err;
        }
    }
    return 0;
}

/* A step of no worker's own (earliest, throttled): elb_begin checks no slot. */
#define ELB_NO_SLOT INT_MIN

/* The start of every step on an account's limits: the arguments checked
 * (n limits; the worker's slot, unless ELB_NO_SLOT), the table locked, the
 * step begun. Nothing is held when it fails. */
static inline int elb_begin(elb_shm *t, elb_step *s, int slot, int n, double now)
{
    int rc;
    if (n < 1 || n > ELB_SHM_MAX_LIMITS)
        return ELB_EARG;
    if (slot != ELB_NO_SLOT && (slot < 0 || slot >= ELB_SHM_SLOTS))
        return ELB_EARG;
    if ((rc = elb_lock(t)) != 0)
        return rc;
    elb_step_init(s, t, now);
    return 0;
}

/* elb_begin, then every record of the account fetched (elb_get_all). */
static inline int elb_begin_get(elb_shm *t, elb_step *s, int slot, int n, double now,
                                const uint64_t *h, const elb_limit *l, int create, elb_rec **r)
{
    int rc;
    if ((rc = elb_begin(t, s, slot, n, now)) != 0)
        return rc;
    return elb_get_all(s, n, h, l, create, r);
}

/* Unlock, then wake every slot told to look at the moved ring. */
static inline void elb_finish(elb_step *s)
{
    uint64_t one = 1;
    int k;
    ssize_t rc;
    if (s->dropped)
        s->t->dropped += (uint64_t)s->dropped;
    elb_jcommit(s->t);
    elb_unlock(s->t);
    for (k = 0; k < ELB_SHM_SLOTS; k++)
        if (s->notify & (1u << k)) {
            rc = write(s->t->efd[k], &one, sizeof(one));
            (void)rc;  /* EAGAIN: it is readable already */
        }
}

/* A bucket moved (its line may go sooner): into the ring, for every other slot. */
static inline int elb_moved_push(elb_step *s, uint64_t h, int slot)
{
    elb_shm *t = s->t;
    elb_moved *e;
    uint64_t seq;
    if (elb_save_counters(s) < 0)
        return -1;
    seq = ++t->c.moved_seq;
    e = &t->moved[seq % ELB_SHM_MOVED];
    if (elb_jsave(t, e, sizeof(*e)) < 0)
        return -1;
    e->seq = seq;
    e->hash = h;
    e->slot = (uint32_t)slot;
    s->notify |= __atomic_load_n(&t->attached, __ATOMIC_RELAXED) & ~(1u << slot);
    return 0;
}

/* ------------------------------------------------------------------ the arithmetic (quota.py) */

/* LocalStore._window_earliest: (time, found) for `cost` more units from t. */
static inline double elb_window_earliest(elb_rec *r, const elb_limit *l, double cost, double t,
                                         double now, int seen, int *found)
{
    double period = l->period, room = l->quota - ELB_MIN(cost, l->quota), sum;
    int span = l->span, visit, ok;
    int64_t i, k, j, hi, last = INT64_MIN;
    for (visit = 0; visit < ELB_SHM_WINDOW_SLOTS; visit++)
        if (elb_wheld(&r->u.w[visit]) && r->u.w[visit].tag > last)
            last = r->u.w[visit].tag;
    for (visit = 0; visit < ELB_SHM_WINDOW_SLOTS; visit++) {
        i = elb_slot_of(t, period);
        if (l->guard && t > (double)(i + 1) * period - l->guard) {
            t = (double)(i + 1) * period;
            continue;
        }
        hi = ELB_MAX(i, ELB_MIN(last, i + span - 1));
        ok = elb_claimable(r, l, i, now);
        for (k = i; ok && k <= hi; k++) {
            sum = 0.0;
            for (j = k - span + 1; j <= k; j++)
                sum += elb_wcount(r, j, seen);
            if (!(sum <= room + ELB_EPS))
                ok = 0;
        }
        if (ok) {
            *found = 1;
            return t;
        }
        t = (double)(i + 1) * period;
    }
    *found = 0;
    return t;
}

/* LocalStore._earliest. units/pos NULL: behind everything queued (a
 * newcomer); else for a reservation at the head of its line. Returns found. */
static inline int elb_earliest_in(elb_step *s, int n, elb_rec **r, const elb_limit *l,
                                  const double *cost, const double *units, const double *pos,
                                  double *out, int *which)
{
    double t = s->now, start, clock, ahead, c, e;
    int round, k, moved, found;
    elb_bstate *b;
    *which = 0;
    for (round = 0; round < ELB_ROUNDS; round++) {
        moved = 0;
        for (k = 0; k < n; k++) {
            start = ELB_MAX(t, r[k]->blocked);
            if (l[k].kind == ELB_BUCKET) {
                b = &r[k]->u.b;
                if (pos == NULL) {
                    clock = ELB_MAX(b->sent, s->now) + (b->flying + b->queued) * b->interval;
                } else {
                    ahead = ELB_MAX(0.0, ELB_MIN(pos[k] - b->deq, b->queued - units[k]));
                    clock = ELB_MAX(b->sent, s->now) + (b->flying + ahead) * b->interval;
                }
                c = ELB_MIN(cost[k], l[k].room);
                e = ELB_MAX(start, clock + (c - l[k].room) * l[k].interval);
            } else {
                e = elb_window_earliest(r[k], &l[k], cost[k], start, s->now, pos != NULL, &found);
                if (!found) {
                    *out = e;
                    *which = k;
                    return 0;
                }
            }
            if (e > t + ELB_EPS) {
                t = e;
                *which = k;
                moved = 1;
            }
        }
        if (!moved)
            break;
    }
    *out = t;
    return 1;
}

/* ------------------------------------------------------------------ the steps */

/* LocalStore.reserve. ELB_OK (slots, pos filled), ELB_SHED (*depart, *which
 * say when and why), or a failure. *evicted: idle buckets evicted for it. */
static inline int elb_shm_reserve(elb_shm *t, int slot, int n, const uint64_t *h,
                                  const elb_limit *l, const double *cost, double now,
                                  double max_wait, double *depart, int *which, double *slots,
                                  double *pos, int *evicted)
{
    elb_step s;
    elb_rec *r[ELB_SHM_MAX_LIMITS];
    elb_wslot *e;
    elb_bstate *b;
    double units;
    int k, rc, found;
    int64_t i;
    *evicted = 0;
    if ((rc = elb_begin_get(t, &s, slot, n, now, h, l, ELB_GET_MAKE, r)) != 0)
        return rc;
    *evicted = s.evicted;
    found = elb_earliest_in(&s, n, r, l, cost, NULL, NULL, depart, which);
    if (!found || *depart - now > max_wait + ELB_EPS) {
        elb_finish(&s);
        return ELB_SHED;
    }
    for (k = 0; k < n; k++) {
        if (l[k].kind == ELB_BUCKET) {
            b = &r[k]->u.b;
            units = ELB_MIN(cost[k], l[k].room);
            pos[k] = b->enq;
            b->enq += units;
            b->queued += units;
            b->q[slot] += units;
            slots[k] = units;
        } else {
            i = elb_slot_of(*depart, l[k].period);
            e = elb_claim(r[k], &l[k], i, now);
            if (e != NULL)
                e->reserved += cost[k];
            slots[k] = (double)i;
            pos[k] = 0.0;
        }
        elb_die_point();
    }
    elb_finish(&s);
    return ELB_OK;
}

/* LocalStore.earliest for a reservation not sent yet: *out. */
static inline int elb_shm_earliest(elb_shm *t, int n, const uint64_t *h, const elb_limit *l,
                                   const double *cost, const double *slots, const double *pos,
                                   double now, double *out)
{
    elb_step s;
    elb_rec *r[ELB_SHM_MAX_LIMITS];
    int rc, which;
    if ((rc = elb_begin_get(t, &s, ELB_NO_SLOT, n, now, h, l, ELB_GET_SCRATCH, r)) != 0)
        return rc;
    elb_earliest_in(&s, n, r, l, cost, slots, pos, out, &which);
    elb_finish(&s);
    return ELB_OK;
}

/* LocalStore.confirm: ELB_OK (sent; a window booking that moved is in
 * slots), ELB_LATER (*later), or a failure. */
static inline int elb_shm_confirm(elb_shm *t, int slot, int n, const uint64_t *h,
                                  const elb_limit *l, const double *cost, double *slots,
                                  const double *pos, double now, double *later)
{
    elb_step s;
    elb_rec *r[ELB_SHM_MAX_LIMITS];
    elb_bstate *b;
    elb_wslot *e;
    int rc, which, k;
    int64_t i, booked;
    if ((rc = elb_begin_get(t, &s, slot, n, now, h, l, ELB_GET_SCRATCH, r)) != 0)
        return rc;
    elb_earliest_in(&s, n, r, l, cost, slots, pos, later, &which);
    if (*later > now + ELB_EPS) {
        elb_finish(&s);
        return ELB_LATER;
    }
    for (k = 0; k < n; k++) {
        if (l[k].kind == ELB_BUCKET) {
            b = &r[k]->u.b;
            elb_unqueue(b, slot, slots[k]);
            b->flying += slots[k];
            if (slot >= 0)
                b->f[slot] += slots[k];
        } else {
            i = elb_slot_of(now, l[k].period);
            e = elb_claim(r[k], &l[k], i, now);
            if (e == NULL)
                continue;
            e->departed += cost[k];
            booked = (int64_t)slots[k];
            if (booked != i) {
                elb_wtake(r[k], booked, cost[k]);
                e->reserved += cost[k];
                slots[k] = (double)i;
            }
        }
        elb_die_point();
    }
    elb_finish(&s);
    return ELB_OK;
}

/* A bucket's flying units land: they restore from now on (LocalStore.landed's
 * arithmetic; the release of a dead worker's slot lands them too). */
static inline void elb_land(elb_bstate *b, int slot, double units, double interval, double now)
{
    b->flying = ELB_MAX(0.0, b->flying - units);
    if (slot >= 0)
        b->f[slot] = ELB_MAX(0.0, b->f[slot] - units);
    b->sent = ELB_MAX(b->sent, now) + units * interval;
}

/* LocalStore.landed: a sent reservation's answer came (or its exchange
 * ended): its units on every bucket limit restore from now on. */
static inline int elb_shm_landed(elb_shm *t, int slot, int n, const uint64_t *h,
                                 const elb_limit *l, const double *slots, double now)
{
    elb_step s;
    elb_rec *r[ELB_SHM_MAX_LIMITS];
    int rc, k;
    /* not made when missing: a bucket with units flying is never evicted */
    if ((rc = elb_begin_get(t, &s, slot, n, now, h, l, ELB_GET_FOUND, r)) != 0)
        return rc;
    for (k = 0; k < n; k++) {
        if (r[k] == NULL || l[k].kind != ELB_BUCKET)
            continue;
        elb_land(&r[k]->u.b, slot, slots[k], l[k].interval, now);
        elb_die_point();
    }
    elb_finish(&s);
    return ELB_OK;
}

/* LocalStore.give_back (the caller checked it was neither sent nor given back). */
static inline int elb_shm_give_back(elb_shm *t, int slot, int n, const uint64_t *h,
                                    const elb_limit *l, const double *cost, const double *slots,
                                    double now)
{
    elb_step s;
    elb_rec *r[ELB_SHM_MAX_LIMITS];
    int rc, k;
    /* not made when missing: a bucket with units queued is never evicted */
    if ((rc = elb_begin_get(t, &s, slot, n, now, h, l, ELB_GET_FOUND, r)) != 0)
        return rc;
    for (k = 0; k < n; k++) {
        if (r[k] == NULL)
            continue;
        if (l[k].kind == ELB_BUCKET) {
            elb_unqueue(&r[k]->u.b, slot, slots[k]);
        } else {
            elb_wtake(r[k], (int64_t)slots[k], cost[k]);
        }
        if (elb_moved_push(&s, h[k], slot) < 0) {
            elb_jundo(t);
            elb_unlock(t);
            return ELB_EJOURNAL;
        }
        elb_die_point();
    }
    elb_finish(&s);
    return ELB_OK;
}

/* LocalStore.settle: refund[k] units back on each bucket limit (0: none). */
static inline int elb_shm_settle(elb_shm *t, int slot, int n, const uint64_t *h,
                                 const elb_limit *l, const double *refund, double now)
{
    elb_step s;
    elb_rec *r[ELB_SHM_MAX_LIMITS];
    int rc, k;
    if ((rc = elb_begin(t, &s, slot, n, now)) != 0)
        return rc;
    for (k = 0; k < n; k++) {
        if (l[k].kind != ELB_BUCKET || !(refund[k] > 0))
            continue;
        /* not made when missing: an idle bucket's clock is before now already */
        r[k] = elb_get(&s, h[k], &l[k], ELB_GET_FOUND);
        if (r[k] == NULL) {
            if (s.err) {
                elb_jundo(t);
                elb_unlock(t);
                return s.err;
            }
            continue;
        }
        r[k]->u.b.sent = ELB_MAX(now, r[k]->u.b.sent - refund[k] * l[k].interval);
        if (elb_moved_push(&s, h[k], slot) < 0) {
            elb_jundo(t);
            elb_unlock(t);
            return ELB_EJOURNAL;
        }
    }
    elb_finish(&s);
    return ELB_OK;
}

/* LocalStore.observe, one view per entry: limit index idx[v]; val[v] the
 * bucket level in units or the window's used count (NAN: none); block[v]
 * nothing departs before (NAN: none). Returns the views dropped (no room). */
static inline int elb_shm_observe(elb_shm *t, int n, const uint64_t *h, const elb_limit *l,
                                  int m, const int *idx, const double *val, const double *block,
                                  double now)
{
    elb_step s;
    elb_rec *r;
    const elb_limit *lk;
    elb_wslot *e;
    int rc, v, dropped = 0;
    int64_t i, j;
    double ours, clock;
    if (n < 1 || n > ELB_SHM_MAX_LIMITS || m < 0)
        return ELB_EARG;
    if ((rc = elb_lock(t)) != 0)
        return rc;
    elb_step_init(&s, t, now);
    for (v = 0; v < m; v++) {
        if (idx[v] < 0 || idx[v] >= n)
            continue;
        lk = &l[idx[v]];
        s.nheld = 0;
        s.dropped = 0;
        r = elb_get(&s, h[idx[v]], lk, ELB_GET_SCRATCH);
        if (r == NULL) {
            elb_jundo(t);
            elb_unlock(t);
            return s.err;
        }
        dropped += s.dropped;
        if (!isnan(val[v])) {
            if (lk->kind == ELB_BUCKET) {
                /* the units in flight are part of the server's count, or soon will be */
                clock = now + (val[v] - r->u.b.flying) * lk->interval;
                if (clock > r->u.b.sent)
                    r->u.b.sent = clock;
            } else {
                i = elb_slot_of(now, lk->period);
                ours = 0.0;
                for (j = i - lk->span + 1; j <= i; j++)
                    ours += elb_wcount(r, j, 1);
                if (val[v] > ours + ELB_EPS) {
                    e = elb_claim(r, lk, i, now);
                    if (e != NULL)
                        e->extra += val[v] - ours;
                }
            }
        }
        if (!isnan(block[v]))
            r->blocked = ELB_MAX(r->blocked, block[v]);
    }
    elb_finish(&s);
    return dropped;
}

/* LocalStore.throttled with `until` worked out. Returns the limits dropped (no room). */
static inline int elb_shm_throttled(elb_shm *t, int n, const uint64_t *h, const elb_limit *l,
                                    double now, double until)
{
    elb_step s;
    elb_rec *r;
    elb_wslot *e;
    int rc, k;
    int64_t i;
    double seen;
    if ((rc = elb_begin(t, &s, ELB_NO_SLOT, n, now)) != 0)
        return rc;
    for (k = 0; k < n; k++) {
        r = elb_get(&s, h[k], &l[k], ELB_GET_SCRATCH);
        if (r == NULL) {
            elb_jundo(t);
            elb_unlock(t);
            return s.err;
        }
        r->blocked = ELB_MAX(r->blocked, until);
        if (l[k].kind == ELB_BUCKET) {
            r->u.b.sent = ELB_MAX(
                r->u.b.sent, now + ELB_MAX(0.0, l[k].capacity - r->u.b.flying) * l[k].interval);
        } else if (l[k].kind == ELB_WINDOW) {
            i = elb_slot_of(now, l[k].period);
            seen = elb_wcount(r, i, 1);
            if (seen < l[k].capacity) {
                e = elb_claim(r, &l[k], i, now);
                if (e != NULL)
                    e->extra += l[k].capacity - seen;
            }
        }
    }
    elb_finish(&s);
    return s.dropped;
}

/* A worker died: its queued units leave every bucket (they count as out of
 * the queue) and its flying ones land at `now` (the server may have counted
 * them), a few records per lock hold. Returns the buckets changed, or a
 * failure. Its window bookings stay until their windows pass. */
static inline int64_t elb_shm_release_slot(elb_shm *t, int slot, double now)
{
    elb_step s;
    elb_rec *r;
    uint64_t i = 0, end;
    int rc, k;
    int64_t changed = 0;
    double u;
    if (slot < 0 || slot >= ELB_SHM_SLOTS)
        return ELB_EARG;
    __atomic_and_fetch(&t->attached, ~(1u << slot), __ATOMIC_RELAXED);
    for (;;) {
        if ((rc = elb_lock(t)) != 0)
            return rc;
        elb_step_init(&s, t, 0.0);
        end = t->c.used;
        for (k = 0; k < 8 && i < end; k++, i++) {
            r = &elb_recs(t)[i];
            if (r->kind != ELB_BUCKET || !(r->u.b.q[slot] > 0 || r->u.b.f[slot] > 0))
                continue;
            if (elb_jsave(t, r, sizeof(*r)) < 0 || elb_moved_push(&s, r->hash, slot) < 0) {
                elb_jundo(t);
                elb_unlock(t);
                return ELB_EJOURNAL;
            }
            u = r->u.b.q[slot];
            r->u.b.queued = ELB_MAX(0.0, r->u.b.queued - u);
            r->u.b.deq += u;
            r->u.b.q[slot] = 0.0;
            if (r->u.b.f[slot] > 0)
                elb_land(&r->u.b, slot, r->u.b.f[slot], r->u.b.interval, now);
            changed++;
        }
        elb_finish(&s);
        if (i >= end)
            return changed;
    }
}

/* The moved ring since *last for `slot`: hashes others moved into out (at
 * most ELB_SHM_MOVED), their count, or -1 when some were overwritten. */
static inline int elb_shm_moved(elb_shm *t, int slot, uint64_t *last, uint64_t *out)
{
    uint64_t seq, q;
    elb_moved *e;
    int n = 0, rc;
    if ((rc = elb_lock(t)) != 0)
        return rc;
    seq = t->c.moved_seq;
    if (seq - *last > ELB_SHM_MOVED) {
        *last = seq;
        elb_unlock(t);
        return -1;
    }
    for (q = *last + 1; q <= seq; q++) {
        e = &t->moved[q % ELB_SHM_MOVED];
        if (e->slot != (uint32_t)slot)
            out[n++] = e->hash;
    }
    *last = seq;
    elb_unlock(t);
    return n;
}

/* ------------------------------------------------------------------ facts */

static inline elb_fact *elb_fact_set(elb_shm *t, uint64_t h)
{
    return &elb_facts(t)[(elb_mix(h) % t->fact_sets) * ELB_SHM_FACT_WAYS];
}

/* 1 and the fact in *a, *b; 0 when not known; or a failure. */
static inline int elb_shm_fact(elb_shm *t, uint64_t h, double *a, double *b)
{
    elb_fact *set;
    int k, rc, got = 0;
    if ((rc = elb_lock(t)) != 0)
        return rc;
    set = elb_fact_set(t, h);
    for (k = 0; k < ELB_SHM_FACT_WAYS; k++)
        if (set[k].hash == h) {
            *a = set[k].a;
            *b = set[k].b;
            set[k].stamp = ++t->fact_clock;
            got = 1;
            break;
        }
    elb_unlock(t);
    return got;
}

/* 1 when the fact changed (the generation moved), 0 when it was kept already. */
static inline int elb_shm_put_fact(elb_shm *t, uint64_t h, double a, double b)
{
    elb_fact *set, *f = NULL;
    int k, rc;
    if ((rc = elb_lock(t)) != 0)
        return rc;
    set = elb_fact_set(t, h);
    for (k = 0; k < ELB_SHM_FACT_WAYS; k++)
        if (set[k].hash == h) {
            f = &set[k];
            break;
        }
    if (f != NULL && f->a == a && f->b == b) {
        f->stamp = ++t->fact_clock;
        elb_unlock(t);
        return 0;
    }
    if (f == NULL) {
        f = &set[0];
        for (k = 1; k < ELB_SHM_FACT_WAYS; k++)
            if (set[k].stamp < f->stamp)
                f = &set[k];  /* empty ones have stamp 0 */
    }
    if (elb_jsave(t, f, sizeof(*f)) < 0) {
        elb_jundo(t);
        elb_unlock(t);
        return ELB_EJOURNAL;
    }
    f->hash = h;
    f->a = a;
    f->b = b;
    f->stamp = ++t->fact_clock;
    elb_die_point();
    /* after the write: a death before it leaves the generation where it was;
     * a death after it moved only makes readers look once more */
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    __atomic_add_fetch(&t->facts_gen, 1, __ATOMIC_RELEASE);
    elb_jcommit(t);
    elb_unlock(t);
    return 1;
}

/* ------------------------------------------------------------------ the table */

static inline uint64_t elb_align(uint64_t n)
{
    return (n + 63) & ~(uint64_t)63;
}

/* A new table (before fork: it is shared with every child), or NULL and *err. */
static inline elb_shm *elb_shm_create(uint32_t capacity, uint32_t facts, int *err)
{
    uint64_t isz = 16, off, size;
    uint32_t sets;
    elb_shm *t;
    pthread_mutexattr_t attr;
    int k;
    if (capacity < 1 || capacity > (1u << 30) || facts > (1u << 24)) {
        *err = EINVAL;
        return NULL;
    }
    while (isz < (uint64_t)capacity * 2)
        isz *= 2;
    sets = (facts + ELB_SHM_FACT_WAYS - 1) / ELB_SHM_FACT_WAYS;
    if (sets < 1)
        sets = 1;
    off = elb_align(sizeof(elb_shm));
    size = off;
    size += elb_align(isz * 8);
    size += elb_align(isz * 4);
    size += elb_align((uint64_t)capacity * sizeof(elb_rec));
    size += elb_align((uint64_t)sets * ELB_SHM_FACT_WAYS * sizeof(elb_fact));
    size += ELB_SHM_JOURNAL;
    t = (elb_shm *)mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (t == MAP_FAILED) {
        *err = errno;
        return NULL;
    }
    t->size = size;
    t->capacity = capacity;
    t->index_size = (uint32_t)isz;
    t->fact_sets = sets;
    t->window_slots = ELB_SHM_WINDOW_SLOTS;
    t->off_ihash = off;
    t->off_irec = t->off_ihash + elb_align(isz * 8);
    t->off_recs = t->off_irec + elb_align(isz * 4);
    t->off_facts = t->off_recs + elb_align((uint64_t)capacity * sizeof(elb_rec));
    t->off_journal = t->off_facts + elb_align((uint64_t)sets * ELB_SHM_FACT_WAYS * sizeof(elb_fact));
    for (k = 0; k < ELB_SHM_SLOTS; k++)
        t->efd[k] = -1;
    if (pthread_mutexattr_init(&attr) != 0
        || pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED) != 0
        || pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST) != 0
        || pthread_mutex_init(&t->lock, &attr) != 0) {
        *err = EINVAL;
        munmap(t, size);
        return NULL;
    }
    pthread_mutexattr_destroy(&attr);
    for (k = 0; k < ELB_SHM_SLOTS; k++) {
        t->efd[k] = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (t->efd[k] < 0) {
            *err = errno;
            while (k-- > 0)
                close(t->efd[k]);
            munmap(t, size);
            return NULL;
        }
    }
    t->magic = ELB_SHM_MAGIC;
    return t;
}

/* This process lets go of the table (and, with close_fds, of its eventfds). */
static inline void elb_shm_unmap(elb_shm *t, int close_fds)
{
    int k;
    if (close_fds)
        for (k = 0; k < ELB_SHM_SLOTS; k++)
            if (t->efd[k] >= 0)
                close(t->efd[k]);
    munmap(t, t->size);
}

/* A worker takes its slot: other workers' moves wake its eventfd from now on. */
static inline void elb_shm_attach(elb_shm *t, int slot)
{
    __atomic_or_fetch(&t->attached, 1u << slot, __ATOMIC_RELAXED);
}

static inline uint64_t elb_shm_facts_generation(elb_shm *t)
{
    return __atomic_load_n(&t->facts_gen, __ATOMIC_ACQUIRE);
}

static inline uint64_t elb_shm_moved_seq(elb_shm *t)
{
    return __atomic_load_n(&t->c.moved_seq, __ATOMIC_ACQUIRE);
}

/* Read a slot's eventfd empty (nonblocking). */
static inline void elb_shm_drain(elb_shm *t, int slot)
{
    uint64_t v;
    ssize_t rc = read(t->efd[slot], &v, sizeof(v));
    (void)rc;
}

/* Bytes of shared memory per bucket of capacity: its record and its index share. */
static inline uint64_t elb_shm_bytes_per_bucket(const elb_shm *t)
{
    return sizeof(elb_rec) + ((uint64_t)t->index_size * 12 + t->capacity - 1) / t->capacity;
}

/* The record of h for tests and /healthz, copied under the lock: 1, 0 (none), or a failure. */
static inline int elb_shm_peek(elb_shm *t, uint64_t h, elb_rec *out)
{
    int found, rc;
    uint32_t p;
    if ((rc = elb_lock(t)) != 0)
        return rc;
    p = elb_find(t, h, &found);
    if (found)
        memcpy(out, &elb_recs(t)[elb_irec(t)[p] - 1], sizeof(*out));
    elb_unlock(t);
    return found;
}

#endif
