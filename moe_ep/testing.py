"""Run a function on N ranks as real processes: the multi-rank harness of tests and demos.

``RankPool(world_size, device)`` spawns one process per rank, each with a torch.distributed
group (gloo over CPU tensors, with Triton's interpreter; nccl over one GPU per rank; or, with
``share_device``, every rank on GPU 0 over gloo — correctness on real GPU memory with fewer GPUs
than ranks, slowly: the ranks' kernels share one GPU), and keeps
them for many ``run(fn, *args)`` calls. ``fn(ctx, *args)`` runs on every rank; ``run`` returns
the per-rank results, re-raises the first failure with its rank and traceback, and kills every
process when the time runs out instead of hanging. After a failure the pool is closed (its
ranks may disagree about the state of the group), so the next ``run`` needs a new pool.
CPU ranks run kernels in Triton's interpreter: their processes start with
``TRITON_INTERPRET=1`` (``env`` changes what they start with).
A test that kills a rank on purpose names it in ``run(..., may_die=(rank,))``: that rank's
death is then a result (``RankDied``) and the survivors run on to their own results; the pool
is closed afterwards (its group has lost a member).
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass(frozen=True)
class RankContext:
    """What a function running on one rank gets."""

    rank: int
    world_size: int
    device: torch.device
    group: dist.ProcessGroup


class RankError(RuntimeError):
    """A rank raised; carries the rank and its traceback."""

    def __init__(self, rank: int, message: str):
        self.rank = rank
        super().__init__(f"rank {rank} failed:\n{message}")


class RankTimeout(TimeoutError):
    """Some ranks did not finish in time; all processes were killed."""


@dataclass(frozen=True)
class RankDied:
    """The result of a rank that ``run(..., may_die=...)`` allowed to die, and that did."""

    rank: int
    exitcode: int | None  # negative: killed by that signal (-9: SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, device_type: str, port: int, tasks, results, share_device: bool = False) -> None:
    if device_type == "cpu":
        torch.set_num_threads(1)
        device = torch.device("cpu")
        backend = "gloo"
    else:
        # The ranks share the host's cores: torch's default (all of them in every process)
        # oversubscribes them world_size times, and the CPU-side references of the tests crawl.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        device = torch.device(device_type, 0 if share_device else rank)
        torch.cuda.set_device(device)
        backend = "gloo" if share_device else "nccl"  # NCCL refuses two ranks on one GPU
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size,
                                device_id=device if backend == "nccl" else None)
        ctx = RankContext(rank, world_size, device, dist.group.WORLD)
        results.put(("ready", rank, None))
    except BaseException:
        results.put(("error", rank, traceback.format_exc()))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put(("ok", rank, fn(ctx, *args, **kwargs)))
        except BaseException:
            results.put(("error", rank, traceback.format_exc()))
    dist.destroy_process_group()


def _set_environ(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


class RankPool:
    """``world_size`` rank processes on ``device`` ('cpu' or 'cuda'), reused across runs."""

    def __init__(self, world_size: int, device: str = "cpu", start_timeout: float = 300.0, share_device: bool = False,
                 env: dict[str, str | None] | None = None):
        """``env``: environment variables the rank processes start with, over the defaults
        (CPU: ``TRITON_INTERPRET=1``); None removes one."""
        if device != "cpu" and not share_device and torch.cuda.device_count() < world_size:
            raise RuntimeError(f"{world_size} ranks need {world_size} GPUs; "
                               f"{torch.cuda.device_count()} are visible")
        self.world_size = world_size
        self.device = device
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        port = free_port()
        self._procs = [ctx.Process(target=_worker, daemon=True,
                                   args=(r, world_size, device, port, self._tasks[r], self._results, share_device))
                       for r in range(world_size)]
        # Children inherit the environment when started: CPU ranks must interpret kernels before
        # anything (the pickled function's module, say) imports a kernel module.
        env = dict({"TRITON_INTERPRET": "1"} if device == "cpu" else {}, **(env or {}))
        saved = {name: os.environ.get(name) for name in env}
        try:
            _set_environ(env)
            for p in self._procs:
                p.start()
        finally:
            _set_environ(saved)
        self.closed = False
        self.pids = [p.pid for p in self._procs]  # of the rank processes, in rank order
        self._collect("start", start_timeout)

    def run(self, fn, *args, timeout: float = 300.0, may_die: tuple = (), **kwargs) -> list:
        """Run ``fn(ctx, *args, **kwargs)`` on every rank; returns the results in rank order.
        ``may_die``: ranks whose process may end during the run (killed by the test): the result of
        one that does is a ``RankDied``; the pool is closed after such a run."""
        if self.closed:
            raise RuntimeError("this RankPool is closed (an earlier run failed); make a new one")
        for q in self._tasks:
            q.put((fn, args, kwargs))
        try:
            return self._collect(getattr(fn, "__name__", "task"), timeout, may_die)
        finally:
            if may_die:
                self.kill()

    def _collect(self, what: str, timeout: float, may_die: tuple = ()) -> list:
        deadline = time.monotonic() + timeout
        results: dict[int, object] = {}
        while len(results) < self.world_size:
            try:
                kind, rank, value = self._results.get(timeout=min(1.0, max(deadline - time.monotonic(), 0.01)))
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in results]
                for r in [r for r in dead if r in may_die]:
                    results[r] = RankDied(r, self._procs[r].exitcode)
                dead = [r for r in dead if r not in may_die]
                if dead or time.monotonic() > deadline:
                    self.kill()
                    missing = sorted(set(range(self.world_size)) - set(results))
                    why = f"ranks {dead} died" if dead else f"no answer in {timeout:.0f} s"
                    raise RankTimeout(f"{what}: ranks {missing} did not finish ({why}); "
                                      f"all {self.world_size} processes were killed")
                continue
            if kind == "error":
                self.kill()
                raise RankError(rank, value)
            results[rank] = value
        return [results[r] for r in range(self.world_size)]

    def kill(self) -> None:
        """Stop every rank process now."""
        self.closed = True
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(timeout=10)

    def close(self) -> None:
        """Let every rank leave its group and exit."""
        if self.closed:
            return
        self.closed = True
        for q in self._tasks:
            q.put(None)
        for p in self._procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_ranks(fn, world_size: int, *args, device: str = "cpu", timeout: float = 300.0, **kwargs) -> list:
    """Run ``fn(ctx, *args, **kwargs)`` once on ``world_size`` fresh rank processes."""
    with RankPool(world_size, device) as pool:
        return pool.run(fn, *args, timeout=timeout, **kwargs)
