"""Device-side primitives over the symmetric heap, as Triton ``@jit`` helpers.

They hide where a peer's bytes live (a mapped file, CUDA/HIP IPC, NVSHMEM): a kernel gets the
table of peer arena addresses and an offset, and works with plain pointers. They use only
vendor-neutral Triton (int-to-pointer casts, system-scope atomics), so the same code compiles
for NVIDIA and AMD and runs in Triton's interpreter across CPU processes.

Ordering rules the kernels rely on:
- data stores to a peer, then ``_signal`` (release, system scope) of a flag in that peer's
  arena; the peer ``_wait_*`` (acquire, system scope) on the flag before it reads the data;
- every release (and acq_rel) atomic takes its ``sem`` from ``_release_sem``, which on AMD
  targets issues the release fence itself (the LLVM of Triton 3.6 leaves out its wait for the
  earlier stores) and leaves the atomic relaxed; NVIDIA's code is Triton's own;
- every flag has one writer, so a flag is written with an exchange, never an add that two
  ranks could race on;
- flags carry epochs (per-call sequence numbers kept on the device), so no flag is ever reset
  and a CUDA-graph replay sees fresh values;
- a wait polls a bounded number of times; on timeout it records who was missing in the
  rank's local status words instead of hanging. A wait that begins after such a record gives
  up at once, so a failed call ends about one timeout after its first wait gave up, not one
  timeout per program that waits in turn (the interpreter runs programs one after another).
"""

import triton
import triton.language as tl
from triton.language import core

from moe_ep import _platform

# Status words (int32, local to each rank): [code, peer, phase, epoch] of a timeout, then
# [code, value, detail, epoch] of a bad call (input the kernels refused, see ``_record_input_error``),
# then the address (low, high word) of the host's alert word (0: none; see ``_alert_host``).
STATUS_WORDS = 10
ALERT_ADDRESS = tl.constexpr(8)
STATUS_OK = tl.constexpr(0)
STATUS_TIMEOUT = tl.constexpr(1)
STATUS_PATH_MISMATCH = tl.constexpr(2)  # peer, (peer's path << 8) | this rank's path, dispatch call number
INPUT_STATUS = tl.constexpr(4)  # the first word of a bad call's record
INPUT_BAD_EXPERT_ID = tl.constexpr(1)  # value: the id, detail: the token
INPUT_SLOTS_OVERFLOW = tl.constexpr(2)  # value: the global expert, detail: its pairs this call
# The paths a dispatch call can take, as its kernels announce them to the peers (``_announce_call``):
# a call word is (the Buffer's dispatch call number << CALL_PATH_BITS) | path.
CALL_PATH_BITS = tl.constexpr(3)
CALL_PATH_MASK = tl.constexpr(7)  # (1 << CALL_PATH_BITS) - 1
ANNOUNCE_EVERY = tl.constexpr(16)  # a wait that did not succeed at once reads the announcements every this many polls (_wait_geq)
PATH_CODES = {"ll": 1, "ht": 2, "expert": 3, "inter": 4, "inter_ht": 5}
# Phases a wait can time out in; the host turns them into words.
PHASE_BARRIER = tl.constexpr(1)
PHASE_DISPATCH_CREDIT = tl.constexpr(2)
PHASE_DISPATCH_RECV = tl.constexpr(3)
PHASE_COMBINE_CREDIT = tl.constexpr(4)
PHASE_COMBINE_RECV = tl.constexpr(5)
PHASE_COPY_CREDIT = tl.constexpr(6)
PHASE_COPY_RECV = tl.constexpr(7)
PHASE_DISPATCH_COUNTS = tl.constexpr(8)
PHASE_NAMES = {
    PHASE_BARRIER.value: "barrier",
    PHASE_DISPATCH_CREDIT.value: "dispatch (waiting for the peer to release its receive region)",
    PHASE_DISPATCH_RECV.value: "dispatch (waiting for the peer's tokens)",
    PHASE_COMBINE_CREDIT.value: "combine (waiting for the peer to release its receive region)",
    PHASE_COMBINE_RECV.value: "combine (waiting for the peer's expert outputs)",
    PHASE_COPY_CREDIT.value: "peer copy (waiting for the peer to release its receive region)",
    PHASE_COPY_RECV.value: "peer copy (waiting for the peer's bytes)",
    PHASE_DISPATCH_COUNTS.value: "dispatch (waiting for the peer's expert counts)",
}


@triton.jit
def _peer_ptr(peer_bases_ptr, rank, byte_offset, DTYPE: tl.constexpr):
    """Pointer of type DTYPE* to ``byte_offset`` in ``rank``'s arena (scalar or block)."""
    base = tl.load(peer_bases_ptr + rank)
    return (base + byte_offset).to(tl.pointer_type(DTYPE))


@triton.jit
def _row(base_ptr, row, row_len, ALIGNED: tl.constexpr):
    """Pointer to row ``row`` of ``row_len`` elements from ``base_ptr``, declared 16-byte aligned when
    ALIGNED (the caller's rows are 16-byte multiples in a 16-aligned region). An address made from
    an integer (a peer pointer) has no alignment the compiler can see, and then every access of
    the row is split into element-sized ones. The pointer is computed here because
    ``tl.multiple_of`` on a function's argument is lost when the function is inlined."""
    ptr = base_ptr + tl.cast(row, tl.int64) * row_len
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _copy_span(src_ptr, dst_ptr, count, part, PARTS, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """Copy part ``part`` of ``PARTS`` of the ``count`` contiguous elements at ``src_ptr`` to
    ``dst_ptr`` (parts are contiguous and BLOCK-aligned); 16-byte aligned ends when ALIGNED."""
    per_part = tl.cdiv(tl.cdiv(count, PARTS), BLOCK) * BLOCK
    start = part * per_part
    end = tl.minimum(start + per_part, count)
    for block in range(start, end, BLOCK):
        # Declared on pointers computed here, as in transport.primitives._row (an argument's
        # declaration is lost when the function is inlined).
        src = src_ptr + block
        dst = dst_ptr + block
        if ALIGNED:
            src = tl.multiple_of(src, 16)
            dst = tl.multiple_of(dst, 16)
        offs = tl.arange(0, BLOCK)
        mask = offs < end - block
        tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


if _platform.interpreting():
    def _release_sem(sem, scope):
        """Under the interpreter: ``sem`` itself (the interpreter orders every access)."""
        return sem

    def _fences_own_releases():
        return False
else:
    @core.extern
    def _fences_own_releases(_semantic=None):
        """Whether the compile target's releases take ``_release_sem``'s own fence (AMD)."""
        arch = getattr(_semantic.builder.options, "arch", "")
        return core.constexpr(_platform.release_fence_asm(arch, "sys") is not None)

    @core.extern
    def _release_sem(sem, scope, _semantic=None):
        """The ``sem`` of a release ("release" or "acq_rel") atomic at ``scope`` ("sys", "gpu"),
        passed as its argument: ``tl.atomic_xchg(p, v, sem=_release_sem("release", "sys"), scope="sys")``.

        On AMD targets of the GFX942 memory model it first emits the release fence in the compile
        target's assembly (``_platform.release_fence_asm``: write-back, then a wait for every
        earlier memory operation) and returns what is left for the atomic: "relaxed" for a
        release, "acquire" for acq_rel. Elsewhere it emits nothing and returns ``sem``."""
        sem, scope = core._unwrap_if_constexpr(sem), core._unwrap_if_constexpr(scope)
        fence = _platform.release_fence_asm(getattr(_semantic.builder.options, "arch", ""), scope)
        if fence is None:
            return core.constexpr(sem)
        core.inline_asm_elementwise(fence[0], fence[1], [], dtype=core.int32, is_pure=False, pack=1,
                                    _semantic=_semantic)
        return core.constexpr({"release": "relaxed", "acq_rel": "acquire"}[sem])


@triton.jit
def _mask_if(mask, cond):
    """``mask`` where the scalar ``cond`` holds, else all false. Never ``mask & cond``: Triton's
    interpreter types a scalar comparison like its operands, so broadcasting ``cond`` makes an
    int32 array, which Triton 3.9's interpreter refuses as a load, store or atomic mask. Compared
    at the block's shape it is a bool array; compiled, it is the same ``and``."""
    return mask & ((tl.zeros(mask.shape, tl.int32) + cond) != 0)


@triton.jit
def _signal(ptr, value):
    """Publish ``value`` at ``ptr`` after every earlier store of this program (release, sys)."""
    tl.atomic_xchg(ptr, value, sem=_release_sem("release", "sys"), scope="sys")


@triton.jit
def _poll(ptrs, mask):
    """Read flags with acquire semantics at system scope (an atomic add of zero)."""
    return tl.atomic_add(ptrs, 0, mask=mask, sem="acquire", scope="sys")


@core.extern
def _sleep_between_polls(override_ns, _semantic=None):
    """A GPU pause between two polls, in the compile target's assembly: ``_platform.poll_sleep_ns``
    nanoseconds for that target (``override_ns`` >= 0: that many instead), or nothing for 0."""
    arch = getattr(_semantic.builder.options, "arch", "")
    override_ns = core._unwrap_if_constexpr(override_ns)
    ns = _platform.poll_sleep_ns(arch, override_ns if override_ns >= 0 else None)
    if ns == 0:
        return core.constexpr(0)
    asm, constraints = _platform.poll_sleep_asm(arch, ns)
    return core.inline_asm_elementwise(asm, constraints, [], dtype=core.int32, is_pure=False, pack=1,
                                       _semantic=_semantic)


# $MOE_EP_POLL_SLEEP_NS (-1: unset), a global of the jit code so that it is part of Triton's cache key.
_POLL_SLEEP_OVERRIDE = tl.constexpr(-1 if _platform.POLL_SLEEP_NS_ENV is None else _platform.POLL_SLEEP_NS_ENV)

if _platform.interpreting():
    @triton.jit
    def _pause():
        """Between two polls, under the interpreter: give the CPU to the ranks that have work
        (several rank processes share few cores)."""
        _platform.yield_cpu()
else:
    @triton.jit
    def _pause():
        """Between two polls on a GPU: a bounded sleep on AMD, nothing on NVIDIA, unless
        $MOE_EP_POLL_SLEEP_NS says otherwise (``_platform.poll_sleep_ns``)."""
        _sleep_between_polls(_POLL_SLEEP_OVERRIDE)


@triton.jit
def _wait_geq(ptrs, targets, mask, max_polls, words, call_word, BLOCK: tl.constexpr):
    """Poll the ``[BLOCK]`` flags ``ptrs`` until each (where ``mask``) is >= ``targets``.

    With a nonzero ``call_word`` (a dispatch's number and path, see ``_announce_call``) a wait that
    did not succeed at once also reads, one poll in ANNOUNCE_EVERY (the loop's period stays a
    single poll's), the announcement word ``words`` of each flag still short, and stops as soon as
    one announces the same call on another path. Nothing more is read while the flags are on time.

    Returns ``(values, missing, other)``: the last values read, the lowest index of the block
    that never reached its target (-1 when all did), and per index the other path its writer
    announced (0: none). Gives up after ``max_polls`` polls.
    """
    values = tl.where(mask, _poll(ptrs, mask), targets)
    mine = tl.zeros_like(values) + call_word
    other = tl.zeros_like(values)
    polls = 0
    while (tl.max((values < targets).to(tl.int32), axis=0) > 0) & (polls < max_polls) & (tl.max(other, axis=0) == 0):
        _pause()
        waiting = mask & (values < targets)
        values = tl.where(waiting, _poll(ptrs, waiting), values)
        polls += 1
        if polls % ANNOUNCE_EVERY == 0:
            announced = _poll(words, waiting & (mine != 0))
            differs = waiting & (mine != 0) & ((announced >> CALL_PATH_BITS) == (mine >> CALL_PATH_BITS)) \
                & (announced != mine)
            other = tl.where(differs, announced & CALL_PATH_MASK, other)
    offs = tl.arange(0, BLOCK)
    missing = tl.min(tl.where(values < targets, offs, BLOCK), axis=0)
    missing = tl.where(missing == BLOCK, -1, missing)
    return values, missing, other


@triton.jit
def _alert_host(status_ptr):
    """Tell the host that this rank's status words changed: a store of 1 to the host word whose
    address the status words hold (pinned host memory mapped into the GPU's address space, which
    the host reads before each call without a copy or a synchronisation; address 0: no such word,
    the host copies the status words after each launch instead). Error paths only: a normal call
    never touches host memory."""
    low = tl.load(status_ptr + ALERT_ADDRESS).to(tl.uint32).to(tl.int64)
    high = tl.load(status_ptr + ALERT_ADDRESS + 1).to(tl.int64)
    address = (high << 32) | low
    if address != 0:
        tl.store(address.to(tl.pointer_type(tl.int32)), 1)


@triton.jit
def _record_failure(status_ptr, code, peer, detail, epoch):
    """Record in the local status words that a wait for ``peer`` failed (``code``: STATUS_TIMEOUT,
    ``detail`` the phase; STATUS_PATH_MISMATCH, ``detail`` the two paths; the first failure of the
    launch wins: its program takes the code from OK to ``code``; the word keeps a later exchange's
    code where two race on AMD, whose record is then the winner's in every other word)."""
    if _fences_own_releases():  # Triton's AMD compare-and-swap is acq_rel whatever its sem: an exchange
        first = tl.atomic_xchg(status_ptr, code, sem="acquire", scope="gpu") == STATUS_OK
    else:
        first = tl.atomic_cas(status_ptr, STATUS_OK, code) == STATUS_OK
    if first:
        tl.store(status_ptr + 1, peer)
        tl.store(status_ptr + 2, detail)
        tl.store(status_ptr + 3, epoch)
        _alert_host(status_ptr)


@triton.jit
def _record_timeout(status_ptr, peer, phase, epoch):
    """Record in the local status words that a wait for ``peer`` timed out in ``phase``."""
    _record_failure(status_ptr, STATUS_TIMEOUT, peer, phase, epoch)


@triton.jit
def _record_input_error(status_ptr, code, value, detail, epoch):
    """Record in the local status words that this call got input the kernel refused (``code``:
    INPUT_*; the first one of a call wins). The kernel carries on without it, so the ranks stay
    in step; the host raises at its next check and the Buffer stays usable."""
    if _fences_own_releases():  # Triton's AMD compare-and-swap is acq_rel whatever its sem: an exchange
        earlier = tl.atomic_xchg(status_ptr + INPUT_STATUS, code, sem="acquire", scope="gpu")
        first = earlier == STATUS_OK
        if not first:  # put the first record's code back
            tl.atomic_xchg(status_ptr + INPUT_STATUS, earlier, sem="relaxed", scope="gpu")
    else:
        first = tl.atomic_cas(status_ptr + INPUT_STATUS, STATUS_OK, code) == STATUS_OK
    if first:
        tl.store(status_ptr + INPUT_STATUS + 1, value)
        tl.store(status_ptr + INPUT_STATUS + 2, detail)
        tl.store(status_ptr + INPUT_STATUS + 3, epoch)
        _alert_host(status_ptr)


@triton.jit
def _check_wait(status_ptr, missing, phase, epoch):
    """Record a timeout when ``_wait_geq`` reports a missing peer (``missing`` >= 0)."""
    if missing >= 0:
        _record_timeout(status_ptr, missing, phase, epoch)


@triton.jit
def _launch_epoch(epoch_ptr):
    """The epoch of the current call of an op: one more than the last finished call's."""
    return tl.load(epoch_ptr, volatile=True) + 1


@triton.jit
def _finish_launch(done_ptr, epoch_ptr, epoch, NUM_PROGRAMS: tl.constexpr):
    """Count this program out; the last program of the launch publishes ``epoch`` as done.

    Every program read the epoch before it arrives here, so the last one may advance it.
    """
    arrived = tl.atomic_add(done_ptr, 1, sem=_release_sem("acq_rel", "gpu"), scope="gpu")
    if arrived == NUM_PROGRAMS - 1:
        tl.atomic_xchg(done_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(epoch_ptr, epoch, sem=_release_sem("release", "gpu"), scope="gpu")


# Per-op counters of a rank (local, int32): [epoch, programs finished, arrivals per peer on the
# send side (MAX_RANKS), arrivals per peer on the receive side (MAX_RANKS), the epoch of the
# last call that used each half of a host-alternated double buffer (2)].
MAX_RANKS = tl.constexpr(64)
SEND_ARRIVALS = tl.constexpr(2)
RECV_ARRIVALS = tl.constexpr(2 + 64)
HALF_EPOCHS = tl.constexpr(2 + 2 * 64)
COUNTER_WORDS = 2 + 2 * 64 + 2


@triton.jit
def _arrive(counter_ptrs, mask, expected):
    """Count this program in at each (masked) local counter; returns where it arrived last of
    ``expected`` (those counters are reset for the next call). Everything this program stored
    before is visible, at system scope, to whoever the last arriver then signals."""
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptrs, 1, mask=mask, sem=_release_sem("acq_rel", "sys"), scope="sys")
    last = mask & (arrived == expected - 1)
    # Every other program has arrived already, and the next use is the next launch: a plain store.
    tl.store(counter_ptrs, tl.zeros_like(arrived), mask=last)
    return last


@triton.jit
def _signal_peers(peer_bases_ptr, flags_offset, rank, offs_r, mask, epoch):
    """Write ``epoch`` into slot ``rank`` of the ``[world_size]`` int32 flags of each masked peer."""
    ptrs = _peer_ptr(peer_bases_ptr, offs_r, flags_offset + rank * 4, tl.int32)
    tl.debug_barrier()
    tl.atomic_xchg(ptrs, tl.zeros_like(offs_r) + epoch, mask=mask, sem=_release_sem("release", "sys"), scope="sys")


@triton.jit
def _announce_call(peer_bases_ptr, announce_offset, rank, offs_r, mask_r, call_word):
    """Write this dispatch's ``call_word`` (its call number and path) into slot ``rank`` of every
    peer's announcement words, which a peer's waits read only to find ranks on another path."""
    ptrs = _peer_ptr(peer_bases_ptr, offs_r, announce_offset + rank * 4, tl.int32)
    tl.atomic_xchg(ptrs, tl.zeros_like(offs_r) + call_word, mask=mask_r, sem="relaxed", scope="sys")


@triton.jit
def _wait_peers(peer_bases_ptr, flags_offset, status_ptr, rank, offs_r, peers, mask, target, epoch,
                phase, max_polls, announce_offset, call_word, BLOCK_R: tl.constexpr):
    """Wait until each masked slot ``offs_r`` of this rank's flags holds at least ``target``;
    record a timeout naming the rank (``peers``, the writer of each slot) that never got there.
    A dispatch kernel passes its ``call_word`` and the ``dispatch_calls`` region's offset: then a
    wait that a peer would leave waiting because it announced this same call on another path (the
    ranks disagree: a different ``num_tokens_hint``, or layout) gives up at once and records the
    mismatch instead (``_wait_geq``). Every other wait passes 0, 0: no announcements."""
    ptrs = _peer_ptr(peer_bases_ptr, rank, flags_offset, tl.int32) + offs_r
    words = _peer_ptr(peer_bases_ptr, rank, announce_offset, tl.int32) + offs_r
    # One poll only once this rank has recorded a failure (this call, or an earlier one, failed).
    polls = tl.where(tl.load(status_ptr, volatile=True) == STATUS_OK, max_polls, 0)
    _, missing, other = _wait_geq(ptrs, target, mask, polls, words, call_word, BLOCK_R)
    offs = tl.arange(0, BLOCK_R)
    mismatch = tl.min(tl.where(other != 0, offs, BLOCK_R), axis=0)
    if mismatch < BLOCK_R:
        theirs = tl.sum(tl.where(offs == mismatch, other, 0), axis=0)
        word = tl.max(tl.zeros_like(offs_r) + call_word, axis=0)
        _record_failure(status_ptr, STATUS_PATH_MISMATCH, tl.sum(tl.where(offs == mismatch, peers, 0), axis=0),
                        (theirs << 8) | (word & CALL_PATH_MASK), word >> CALL_PATH_BITS)
    else:
        peer = tl.sum(tl.where(offs == missing, peers, 0), axis=0)
        _check_wait(status_ptr, tl.where(missing >= 0, peer, -1), phase, epoch)
    tl.debug_barrier()


# Flow control between calls: a receive region that ``src_rank`` writes in call e must not be
# overwritten by its call e + 1 before ``dst_rank`` has consumed it. Each rank's arena holds a
# ``[world_size]`` int32 credit region: slot ``dst_rank`` is written only by ``dst_rank``, with the
# epoch of the last call whose data it consumed; a sender waits for ``epoch - 1`` there before
# its first store (``_wait_peers``), a receiver's last part releases it (``_signal_peers``).


@triton.jit
def _barrier(peer_bases_ptr, flags_offset, status_ptr, rank, world_size, epoch, max_polls,
             BLOCK_R: tl.constexpr):
    """Cross-rank barrier of one program: tell every peer this rank reached ``epoch``, then wait
    until every peer has told this rank the same.

    ``flags_offset`` is a ``[world_size]`` int32 region; slot ``src_rank`` of ``dst_rank``'s copy
    is written only by ``src_rank``. Epochs only grow, so no slot is ever reset.
    """
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < world_size
    _signal_peers(peer_bases_ptr, flags_offset, rank, offs_r, mask_r, epoch)
    _wait_peers(peer_bases_ptr, flags_offset, status_ptr, rank, offs_r, offs_r, mask_r, epoch, epoch,
                PHASE_BARRIER, max_polls, 0, 0, BLOCK_R)
