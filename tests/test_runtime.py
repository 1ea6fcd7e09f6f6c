"""Process settings poft-mlx makes at import on Linux: OpenBLAS thread timeout, glibc malloc."""

import json
import os
import platform
import subprocess
import sys

import pytest

linux_glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                 reason="glibc on Linux only")

# Allocates 300 MB with malloc after importing poft_mlx and reports how glibc served it:
# hblks counts the chunks served by mmap (mallinfo2, glibc >= 2.33).
PROBE = """
import ctypes, json, os
import poft_mlx
from poft_mlx.runtime import malloc as _malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
before = libc.mallinfo2().hblks
p = libc.malloc(300 << 20)
served_by_mmap = libc.mallinfo2().hblks - before
libc.free(p)
kept = libc.mallinfo2().fordblks  # free bytes the heap keeps for reuse
print(json.dumps({"applied": _malloc.APPLIED, "mmap_chunks": served_by_mmap, "kept_free": kept,
                  "timeout": os.environ.get("OPENBLAS_THREAD_TIMEOUT")}))
"""


def probe(**env) -> dict:
    full = {k: v for k, v in os.environ.items() if k not in ("POFT_MLX_MALLOC", "GLIBC_TUNABLES", "OPENBLAS_THREAD_TIMEOUT")}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE], env=full, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@linux_glibc
def test_freed_memory_is_kept_for_reuse():
    r = probe()
    assert r["applied"] and r["mmap_chunks"] == 0  # served from the heap, not a fresh mmap
    assert r["kept_free"] >= 300 << 20  # and kept after free, not trimmed


@linux_glibc
@pytest.mark.parametrize("env", [{"POFT_MLX_MALLOC": "off"}, {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}])
def test_malloc_settings_can_be_left_alone(env):
    r = probe(**env)
    assert not r["applied"] and r["mmap_chunks"] == 1  # glibc's default: a large block is an mmap


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS preload is Linux-only")
def test_openblas_thread_timeout_defaults_to_short_and_respects_the_user():
    assert probe()["timeout"] == "4"
    assert probe(OPENBLAS_THREAD_TIMEOUT="20")["timeout"] == "20"


def test_training_wires_metals_recommended_working_set_and_gives_it_back(monkeypatch):
    """As mlx-lm's trainer (maybe_set_recommended_wired_limit): on Metal the run wires the device's
    recommended working set and restores the previous limit after it, an error included; on the
    CPU (this machine) it sets nothing."""
    import mlx.core as mx

    from poft_mlx.training.loop import wired_limit

    calls = []
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: calls.append(n) or 7)
    with wired_limit():
        pass
    assert calls == [] if not mx.metal.is_available() else calls[-1] == 7
    calls.clear()
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 12345})
    with pytest.raises(RuntimeError):
        with wired_limit():
            assert calls == [12345]
            raise RuntimeError("a failed step")
    assert calls == [12345, 7]
