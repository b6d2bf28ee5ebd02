"""AMD specifics that need no AMD GPU: the fp8 format of each target (see also test_numerics.py
and the fnuz cases of test_ep.py)."""

import pytest
import torch

import moe_ep
from moe_ep import _platform


@pytest.mark.parametrize("arch, dtype", [("gfx942:sramecc+:xnack-", torch.float8_e4m3fnuz),
                                         ("gfx942", torch.float8_e4m3fnuz), ("gfx940", torch.float8_e4m3fnuz),
                                         ("gfx950", torch.float8_e4m3fn),
                                         ("gfx950:sramecc+:xnack-", torch.float8_e4m3fn), ("90", torch.float8_e4m3fn)])
def test_fp8_dtype_of_each_target(arch, dtype):
    assert _platform.fp8_dtype_for_arch(arch) == dtype


def test_native_fp8_on_the_cpu_is_ocp():
    assert moe_ep.native_fp8_dtype() == torch.float8_e4m3fn
    assert moe_ep.native_fp8_dtype("cpu") == torch.float8_e4m3fn


def test_fnuz_travels_as_bytes_where_triton_lacks_the_type():
    """Under the interpreter (and on NVIDIA) a float8_e4m3fnuz tensor reaches kernels as a uint8
    view of the same memory; other tensors as they are."""
    q = torch.zeros(2, 128, dtype=torch.float8_e4m3fnuz)
    arg = _platform.kernel_arg(q)
    assert arg.dtype == torch.uint8 and arg.data_ptr() == q.data_ptr() and arg.shape == q.shape
    for t in (torch.zeros(2, 128, dtype=torch.float8_e4m3fn), torch.zeros(3, dtype=torch.bfloat16)):
        assert _platform.kernel_arg(t) is t


def test_config_takes_both_fp8_formats():
    for dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
        cfg = moe_ep.EpConfig(hidden=256, num_experts=8, topk=2, max_tokens_per_rank=4, dispatch_dtype=dtype)
        assert cfg.fp8 and cfg.num_scales == 2
    with pytest.raises(ValueError, match="dispatch_dtype"):
        moe_ep.EpConfig(hidden=256, num_experts=8, topk=2, max_tokens_per_rank=4, dispatch_dtype=torch.float8_e5m2)


# Release ordering (moe_ep.kernels.release_check): the run-time guard's decision, on assembly text.
_ORDERED = "\tglobal_store_dword v[0:1], v2, off\n\tbuffer_wbl2 sc0 sc1\n\ts_waitcnt vmcnt(0) lgkmcnt(0)\n" \
           "\tglobal_atomic_swap v[4:5], v2, off sc1\n"
_UNORDERED = _ORDERED.replace("vmcnt(0) lgkmcnt(0)", "lgkmcnt(0)")


def test_release_guard_decides_from_the_assembly():
    from moe_ep.kernels.release_check import release_ordering_error

    assert release_ordering_error(_ORDERED, "3.6.0", "gfx942") is None
    why = release_ordering_error(_UNORDERED, "3.6.0", "gfx942")
    assert why is not None and "Triton 3.6.0" in why and "gfx942" in why and "s_waitcnt vmcnt(0)" in why, why


def test_release_guard_refuses_at_the_first_buffer_on_amd(monkeypatch):
    """check_release_ordering on a (pretended) MI300X: it compiles the probe once for the device's
    target and refuses with a RuntimeError naming the card, the target and the Triton version when
    the assembly lacks the wait; on a CPU it does nothing."""
    import types

    import triton

    from moe_ep.kernels import release_check

    release_check.check_release_ordering(torch.device("cpu"))  # not AMD: nothing compiled, nothing raised
    compiled = []

    def fake_compile(spec, backend, arch, warp_size):
        compiled.append((spec.name, backend, arch, warp_size))
        return types.SimpleNamespace(asm={"amdgcn": _UNORDERED if arch == "gfx942" else _ORDERED})

    monkeypatch.setattr(_platform, "vendor", lambda: "amd")
    monkeypatch.setattr(release_check, "compile_kernel", fake_compile)
    monkeypatch.setattr(release_check, "_VERDICTS", {})
    props = {0: types.SimpleNamespace(name="AMD Instinct MI300X", gcnArchName="gfx942:sramecc+:xnack-", warp_size=64),
             1: types.SimpleNamespace(name="AMD Instinct MI355X", gcnArchName="gfx950:sramecc+:xnack-", warp_size=64)}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props[device.index])
    for _ in range(2):
        with pytest.raises(RuntimeError, match=rf"MI300X \(gfx942\).*Triton {triton.__version__}.*vmcnt\(0\)"):
            release_check.check_release_ordering(torch.device("cuda", 0))
    release_check.check_release_ordering(torch.device("cuda", 1))
    assert compiled == [("_release_probe_kernel", "hip", "gfx942", 64), ("_release_probe_kernel", "hip", "gfx950", 64)]


_BARRIER_VERDICTS = """
import os
import triton
from moe_ep import _platform
from moe_ep.kernels.cross_compile import compile_kernel, import_all_kernels
from moe_ep.kernels.registry import KERNELS
from moe_ep.kernels.release_check import release_ordering_error

import_all_kernels()
spec = next(k for k in KERNELS if k.name == "_barrier_kernel")
fence = _platform.release_fence_asm
for own_fence in (True, False):  # moe_ep's release fence, then Triton's own release sequences
    _platform.release_fence_asm = fence if own_fence else (lambda arch, scope: None)
    triton.knobs.cache.dir = os.path.join(os.environ["TRITON_CACHE_DIR"], str(own_fence))  # not in the cache key
    gcn = compile_kernel(spec, "hip", "gfx942", 64).asm["amdgcn"]
    print(repr(release_ordering_error(gcn, triton.__version__, "gfx942")))
"""


def test_release_guard_on_real_gfx942_assembly(tmp_path):
    """The guard's verdict on the barrier kernel as this machine's Triton compiles it for gfx942:
    with moe_ep's release fence, accepted; with Triton's own release sequences, refused under
    Triton 3.6.0 (its LLVM leaves out the wait), another Triton's verdict printed. Fresh Triton
    caches: the fence is not part of Triton's cache key."""
    import os
    import subprocess
    import sys

    import triton

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _BARRIER_VERDICTS], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fenced, triton_own = proc.stdout.strip().splitlines()[-2:]
    assert fenced == "None", fenced
    if triton.__version__ == "3.6.0":
        assert "Triton 3.6.0" in triton_own and "vmcnt(0)" in triton_own, triton_own
    else:
        print(f"Triton {triton.__version__}, gfx942, its own release sequences: {triton_own}")


def test_poll_sleep_defaults_and_the_poll_budget(monkeypatch):
    """AMD waits sleep between polls by default, NVIDIA ones do not, $MOE_EP_POLL_SLEEP_NS sets both;
    the poll budget of a timeout shrinks by the sleep so the timeout stays about the same."""
    assert _platform.poll_sleep_ns("gfx942") == _platform.AMD_POLL_SLEEP_NS > 0
    assert _platform.poll_sleep_ns("gfx950") == _platform.AMD_POLL_SLEEP_NS
    assert _platform.poll_sleep_ns(90) == 0
    assert _platform.poll_sleep_ns(90, override=300) == 300 and _platform.poll_sleep_ns("gfx942", override=0) == 0
    assert "s_sleep 4" in _platform.poll_sleep_asm("gfx942", _platform.AMD_POLL_SLEEP_NS)[0]
    budgets = {}
    for vendor in ("nvidia", "amd"):
        monkeypatch.setattr(_platform, "vendor", lambda vendor=vendor: vendor)
        budgets[vendor] = _platform.max_polls(10.0)
    per_poll_s = 1 / _platform._POLLS_PER_SECOND["amd"]
    assert budgets["nvidia"] == 10 * _platform._POLLS_PER_SECOND["nvidia"]
    assert abs(budgets["amd"] - 10 / (per_poll_s + _platform.AMD_POLL_SLEEP_NS * 1e-9)) < 100, budgets


# The ROCm heap (moe_ep.transport.hip_heap): selection, and the arena protocol over real rank
# processes, with a stand-in for the HIP runtime on CPU ranks (the real one on ROCm GPU ranks).
def test_rocm_gpus_get_the_hip_heap_by_default():
    from moe_ep.transport import BACKENDS, default_backend

    assert "hip" in BACKENDS
    assert default_backend(torch.device("cuda", 0), rocm=True) == "hip"
    assert default_backend(torch.device("cuda", 0), rocm=False) == "cuda"
    assert default_backend(torch.device("cpu"), rocm=True) == "host"
    assert default_backend(torch.device("cpu")) == "host"


class _SharedMemoryHip:
    """Stand-in for HipRuntime on CPU ranks: "device memory" is a /dev/shm file mapped into the
    process, its IPC handle the file's name; every call is recorded."""

    def __init__(self, fail_open: bool = False):
        self.maps = {}  # address -> (mmap, path, owned)
        self.calls = []
        self.fail_open = fail_open

    def _map(self, path, nbytes, owned):
        import mmap
        import os

        fd = os.open(path, os.O_RDWR)
        try:
            m = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        ptr = torch.frombuffer(m, dtype=torch.uint8).data_ptr()
        self.maps[ptr] = (m, path, owned)
        return ptr

    def malloc(self, nbytes, kind):
        import os
        import secrets

        path = f"/dev/shm/moe_ep-test-hip-{secrets.token_hex(6)}"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.ftruncate(fd, nbytes)
        os.close(fd)
        self.calls.append(("malloc", kind))
        return self._map(path, nbytes, True)

    def ipc_handle(self, ptr):
        return self.maps[ptr][1].encode().ljust(64, b"\0")

    def open_ipc_handle(self, handle):
        import os

        path = handle.rstrip(b"\0").decode()
        if self.fail_open:
            raise RuntimeError("hipIpcOpenMemHandle failed: HIP error 1 (stand-in)")
        self.calls.append(("open", path))
        return self._map(path, os.path.getsize(path), False)

    def _unmap(self, ptr, call):
        import os

        m, path, owned = self.maps.pop(ptr)
        self.calls.append((call, path))
        try:
            m.close()
        except BufferError:
            pass  # a tensor view still exports it; it goes with the view
        if owned:
            os.unlink(path)

    def close_ipc_handle(self, ptr):
        self._unmap(ptr, "close")

    def free(self, ptr):
        self._unmap(ptr, "free")

    def tensor(self, ptr, nbytes, device):
        return torch.frombuffer(self.maps[ptr][0], dtype=torch.uint8)[:nbytes]

    def synchronize(self, device):
        pass


def _hip_arena_on_ranks(ctx):
    import os

    import torch.distributed as dist

    from moe_ep.transport.hip_heap import HipArena

    if ctx.device.type != "cpu" and not torch.version.hip:
        return "not ROCm"
    fake = _SharedMemoryHip() if ctx.device.type == "cpu" else None
    for _ in range(2):  # twice: nothing of the first arena is left to disturb the second
        arena = HipArena(ctx.group, 4096, ctx.device, runtime=fake)
        assert len(arena.bases) == ctx.world_size and arena.bases[ctx.rank] == arena.own
        assert len(set(arena.bases)) == ctx.world_size
        assert bool((arena.local == 0).all()), "the arena starts zeroed"
        arena.local[:8] = torch.arange(8, dtype=torch.uint8, device=ctx.device) + 16 * ctx.rank
        arena.runtime.synchronize(ctx.device)
        dist.barrier(group=ctx.group)
        for peer, base in enumerate(arena.bases):  # every rank's bytes, read through this rank's address of them
            seen = arena.runtime.tensor(base, 8, ctx.device).cpu()
            assert seen.tolist() == [16 * peer + i for i in range(8)], (peer, seen)
        arena.close()
    if fake is None:
        return "ok"
    opens = [c for c in fake.calls if c[0] == "open"]
    peers = ctx.world_size - 1
    assert [c[0] for c in fake.calls] == (["malloc"] + ["open"] * peers + ["close"] * peers + ["free"]) * 2, fake.calls
    assert fake.calls[0] == ("malloc", "finegrained") and len({path for _, path in opens}) == 2 * (ctx.world_size - 1)
    assert not any(os.path.exists(path) for call, path in fake.calls if call == "free"), "an arena outlived close()"
    # A peer's handle that cannot be opened: a clear error, and this rank's arena is freed.
    failing = _SharedMemoryHip(fail_open=True)
    try:
        HipArena(ctx.group, 4096, ctx.device, runtime=failing)
    except RuntimeError as err:
        assert "hipIpcOpenMemHandle" in str(err), err
    else:
        raise AssertionError("an unopenable handle was accepted")
    assert [c[0] for c in failing.calls] == ["malloc", "free"] and not failing.maps, failing.calls
    return "ok"


def test_hip_arena_exchanges_handles_and_maps_every_peer(ranks):
    results = ranks.run(_hip_arena_on_ranks)
    if results[0] == "not ROCm":
        pytest.skip("the HIP heap needs a ROCm build of torch on GPU ranks")
    assert results == ["ok"] * ranks.world_size
