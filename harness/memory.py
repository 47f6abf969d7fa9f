"""Peak resident memory of a callable, measured in a fresh child process.

The child is spawned, never forked: a forked child shares the parent's pages and, like ru_maxrss of a child,
inherits the parent's peak. The child reads its own VmHWM (Linux /proc/self/status). With a `setup`, the
child resets VmHWM to its current resident size after setup (writing 5 to /proc/self/clear_refs, Linux >= 4.0;
see proc(5)) so the peak covers `fn` alone, on top of what setup left resident.

In the child, glibc's mmap threshold is fixed at 64 KiB (mallopt M_MMAP_THRESHOLD, see mallopt(3)): every
block from 64 KiB up is its own mapping and leaves the resident set when freed. Left dynamic, glibc raises
the threshold as large blocks are freed and then serves them from a heap that keeps freed pages resident,
which made repeated measurements of one workload differ by up to 50%.
"""
from __future__ import annotations

import ctypes
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


class MemoryMeasurementError(RuntimeError):
    """The child failed or the platform cannot report peak memory; the message says which."""


@dataclass(frozen=True)
class ChildPeak:
    peak_bytes: int  # the child's VmHWM: its highest resident set (since the reset after setup, if any)
    baseline_bytes: int  # VmRSS when fn started: what the interpreter, imports and setup hold

    @property
    def extra_bytes(self) -> int:
        """Peak above the baseline: the memory fn itself needed at its highest."""
        return self.peak_bytes - self.baseline_bytes


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise MemoryMeasurementError(f"/proc/self/status has no {field} line")


M_MMAP_THRESHOLD = -3  # glibc malloc.h
MMAP_THRESHOLD_BYTES = 64 * 1024


def _child(conn, fn: Callable, setup: Callable | None, args: tuple) -> None:
    try:
        if not ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES):
            raise MemoryMeasurementError("mallopt(M_MMAP_THRESHOLD) was refused")
        if setup is not None:
            state = setup(*args)
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current VmRSS
            baseline = _status_bytes("VmRSS")
            fn(state)
        else:
            baseline = _status_bytes("VmRSS")
            fn(*args)
        # plain text over the pipe: nothing is unpickled on the way back
        conn.send_bytes(f"{_status_bytes('VmHWM')} {baseline}".encode())
    except BaseException as error:
        conn.send_bytes(f"error {type(error).__name__}: {error}".encode())
        raise
    finally:
        conn.close()


def peak_rss_in_child(fn: Callable[..., Any], *args: Any, setup: Callable[..., Any] | None = None,
                      timeout_s: float = 600.0) -> ChildPeak:
    """Run fn(*args), or fn(setup(*args)), in a spawned child; return its peak resident memory.

    fn, setup and args must be picklable (module-level functions, plain values): the child imports them.
    """
    if not Path("/proc/self/status").exists():
        raise MemoryMeasurementError("peak memory needs Linux /proc/self/status (VmHWM)")
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(send, fn, setup, args), daemon=True)
    child.start()
    send.close()
    name = getattr(fn, "__name__", repr(fn))
    try:
        if not receive.poll(timeout_s):
            child.kill()
            raise MemoryMeasurementError(f"child measuring {name} ran past {timeout_s} s")
        message = receive.recv_bytes().decode()
    except EOFError:
        message = None
    finally:
        child.join(timeout=30)
        receive.close()
    if message is None:
        raise MemoryMeasurementError(f"child measuring {name} exited with code {child.exitcode} before reporting "
                                     "(killed for memory?)")
    if message.startswith("error"):
        raise MemoryMeasurementError(f"child measuring {name} failed: {message.removeprefix('error ')}")
    peak, baseline = (int(part) for part in message.split())
    return ChildPeak(peak, baseline)
