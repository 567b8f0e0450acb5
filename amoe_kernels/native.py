"""CPU kernels in C (csrc/*.c, one library), built on first use with the system's C compiler and
called by ctypes.

Why C and not more PyTorch ops: on CPU the data plane's attention is paced by host work per op
(2-10 µs each here) and by copies (the reference gathers each sequence's whole KV context per
block), not by FLOPs. A plain C function needs no torch headers, so it builds in about a second
(`cc -O3 -march=native`) instead of a C++ extension's minutes, on the machine that runs it.

The library is cached under $AMOE_NATIVE_CACHE (default ~/.cache/amoe-serve/native), keyed by
the source, the compiler flags and this CPU's flags, so a shared home on a cluster of mixed CPUs
never runs code built for another CPU. No compiler, or a failed build: `available()` is False
and the dispatcher keeps the PyTorch reference (the reason is in `unavailable_reason()`).
AMOE_NATIVE=0 turns the native kernels off.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

_SRCS = sorted((Path(__file__).with_name("csrc")).glob("*.c"))
_HEADERS = sorted((Path(__file__).with_name("csrc")).glob("*.h"))  # in the cache key, not on the command line
# -ffp-contract=off: no fused multiply-adds, so elementwise code rounds as torch's ops do.
_FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-pthread"]
_reason: str | None = None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return os.uname().machine


def _cache_dir() -> Path:
    return Path(os.environ.get("AMOE_NATIVE_CACHE") or Path.home() / ".cache" / "amoe-serve" / "native")


def _build(cc: str, out: Path) -> None:
    """Compile into a temporary file and rename it into place: concurrent ranks never load a
    half-written library, and the lock keeps them from compiling it several times."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists():
            return
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            r = subprocess.run([cc, *_FLAGS, "-o", tmp, *map(str, _SRCS), "-lm"], capture_output=True, text=True,
                               timeout=120)
            if r.returncode != 0:
                raise RuntimeError(f"{cc} failed: {r.stderr.strip()[:500]}")
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


@functools.lru_cache(maxsize=None)
def _lib() -> ctypes.CDLL | None:
    global _reason
    if os.environ.get("AMOE_NATIVE", "1") == "0":
        _reason = "AMOE_NATIVE=0"
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        _reason = "no C compiler (cc or gcc) on PATH"
        return None
    h = hashlib.sha256(" ".join(_FLAGS).encode() + _cpu_flags().encode())
    for src in _SRCS + _HEADERS:
        h.update(src.name.encode() + src.read_bytes())
    out = _cache_dir() / f"amoe-cpu-{h.hexdigest()[:16]}.so"
    try:
        if not out.exists():
            _build(cc, out)
        lib = ctypes.CDLL(str(out))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _reason = f"native kernels did not build: {e}"
        return None
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    lib.amoe_paged_decode_f32.argtypes = [ptr, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i64, i64, f32, ptr]
    lib.amoe_paged_decode_f32.restype = ctypes.c_int
    lib.amoe_rms_norm_f32.argtypes = [ptr, ptr, i64, i64, f32, ptr]
    lib.amoe_rms_norm_f32.restype = None
    lib.amoe_moe_combine_f32.argtypes = [ptr, ptr, ptr, i64, i64, i64, ptr]
    lib.amoe_moe_combine_f32.restype = None
    lib.amoe_dispatch_rows.argtypes = [ptr, i64, i64, i64, ctypes.c_int32, ptr, i64, ptr, ptr, ptr]
    lib.amoe_dispatch_rows.restype = ctypes.c_int
    lib.amoe_rope_kv_write_f32.argtypes = [ptr, i64, ptr, ptr, i64, i64, i64, i64, ptr, i64, ptr, ptr, ptr]
    lib.amoe_rope_kv_write_f32.restype = ctypes.c_int
    lib.amoe_grouped_swiglu_f32.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, i64, ptr, ptr, i64, ptr, ptr, ptr]
    lib.amoe_grouped_swiglu_f32.restype = ctypes.c_int
    lib.amoe_grouped_swiglu_bf16w.argtypes = lib.amoe_grouped_swiglu_f32.argtypes
    lib.amoe_grouped_swiglu_bf16w.restype = ctypes.c_int
    lib.amoe_pool_scatter.argtypes = [ptr, ptr, i64, i64, i64, i64, ptr, ptr, i64, ptr]
    lib.amoe_pool_scatter.restype = i64
    lib.amoe_topk_gating_f32.argtypes = [ptr, i64, i64, i64, ctypes.c_int, ptr, ptr]
    lib.amoe_topk_gating_f32.restype = ctypes.c_int
    lib.amoe_attn_decode_block_f32.argtypes = [
        ptr, i64, i64, ptr, ptr, ptr, ptr, ptr, f32, i64, i64, i64, ptr, ptr,  # x .. sin
        ptr, ptr, ptr, ptr, i64, ptr, i64, i64, f32, i64, i64, ctypes.c_int, ctypes.c_int, ptr, i64,  # .. X
        ctypes.c_int32, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr]  # seg .. counts
    lib.amoe_attn_decode_block_f32.restype = ctypes.c_int
    lib.amoe_attn_pre_f32.argtypes = [ptr, i64, i64, ptr, ptr, f32, i64, i64, i64, ptr, ptr, ptr, i64, ptr, ptr,
                                      ptr, ptr, ptr]
    lib.amoe_attn_pre_f32.restype = ctypes.c_int
    lib.amoe_attn_post_f32.argtypes = [ptr, ptr, i64, i64, i64, ptr, ptr, ptr, f32, i64, i64, ctypes.c_int,
                                       ctypes.c_int, ptr, i64, ctypes.c_int32, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr,
                                       ptr, ptr]
    lib.amoe_attn_post_f32.restype = ctypes.c_int
    lib.amoe_linear_f32.argtypes = [ptr, i64, i64, ptr, i64, ptr]
    lib.amoe_linear_f32.restype = ctypes.c_int
    lib.amoe_set_linear_threads.argtypes = [ctypes.c_int]
    lib.amoe_set_linear_threads.restype = None
    return lib


def available() -> bool:
    return _lib() is not None


def unavailable_reason() -> str | None:
    _lib()
    return _reason


def supports(*ts: torch.Tensor, any_dtype: bool = False) -> bool:
    """Contiguous fp32 (or, for pure data movement, any dtype) CPU tensors, and the library
    built; anything else stays on the reference."""
    for t in ts:  # is_cpu, not device.type: a fifth of the cost, on every kernel call
        if not (t.is_cpu and (any_dtype or t.dtype == torch.float32) and t.is_contiguous()):
            return False
    return available()


def paged_decode_attention(q_SHd: torch.Tensor, k_NbGd: torch.Tensor, v_NbGd: torch.Tensor,
                           tables_SM: torch.Tensor, lens_S: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per sequence over positions 0..lens[s]-1 of its paged context (the query's own
    K/V already written). Returns [S, H*d] fp32. Same result as reference.paged_attention with
    n = 1 and qpos = lens - 1, up to the order of fp32 sums."""
    S, H, d = q_SHd.shape
    N, bs, G, _ = k_NbGd.shape
    q = q_SHd.contiguous()  # the query rows of a fused qkv projection are a strided view
    tables = tables_SM.to(torch.int64).contiguous()
    lens = lens_S.to(torch.int64).contiguous()
    out = torch.empty(S, H * d, dtype=torch.float32)
    rc = _lib().amoe_paged_decode_f32(q.data_ptr(), k_NbGd.data_ptr(), v_NbGd.data_ptr(), tables.data_ptr(),
                                      tables.shape[1], lens.data_ptr(), S, H, G, d, bs, N, scale, out.data_ptr())
    if rc != 0:
        raise ValueError("paged_decode_attention: a block id is outside the cache, a length is outside its "
                         f"table ({tables.shape[1]} blocks of {bs}), or H={H} is not a multiple of G={G}")
    return out


def linear(x_TD: torch.Tensor, w_OD: torch.Tensor) -> torch.Tensor:
    """csrc/linear.c: x @ w.T in fp32 (D a multiple of 8, which the caller checks)."""
    T, D = x_TD.shape
    O = w_OD.shape[0]
    y_TO = torch.empty(T, O, dtype=torch.float32)
    if _lib().amoe_linear_f32(x_TD.data_ptr(), T, D, w_OD.data_ptr(), O, y_TO.data_ptr()) != 0:
        raise ValueError(f"linear: D={D} must be a multiple of 8")
    return y_TO


def set_linear_threads(n: int) -> None:
    """Threads of this process's large linear.c calls (projections, LM head) and paged_decode.c
    calls: 1 by default."""
    if _lib() is not None:
        _lib().amoe_set_linear_threads(int(n))


def pool_scatter(tok_R: torch.Tensor, slot_R: torch.Tensor, done_X, out_RD: torch.Tensor,
                 dst_TKD: torch.Tensor) -> int:
    """csrc/dispatch_rows.c amoe_pool_scatter: int32 index columns sharing one stride, done_X a
    uint8/bool numpy array of T*K marks; returns its code (rows, -1 out of range, -2 repeated)."""
    T, K, D = dst_TKD.shape
    return _lib().amoe_pool_scatter(tok_R.data_ptr(), slot_R.data_ptr(), tok_R.stride(0), tok_R.shape[0], T, K,
                                    done_X.ctypes.data, out_RD.data_ptr(), D * out_RD.element_size(),
                                    dst_TKD.data_ptr())


def topk_gating(logits_TE: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    T, E = logits_TE.shape
    w_TK = torch.empty(T, k, dtype=torch.float32)
    ids_TK = torch.empty(T, k, dtype=torch.int64)
    if _lib().amoe_topk_gating_f32(logits_TE.data_ptr(), T, E, k, int(renormalize), w_TK.data_ptr(),
                                   ids_TK.data_ptr()) != 0:
        raise ValueError(f"topk_gating: k={k} must be in [1, E={E}]")
    return w_TK, ids_TK


def attn_decode_block(x_TD, ln1_D, w_qkv_QD, w_o_DX, ln2_D, w_gate_ED, eps: float, H: int, G: int, d: int,
                      cos_Td, sin_Td, slots_T, k_XGd, v_XGd, tables_TM, lens_T, block_size: int, scale: float,
                      top_k: int, renormalize: bool, key_E, num_keys: int, seg: int, route=None):
    """csrc/attn_block.c: (h_TD, y_TD, w_TK, ids_TK, meta_R3, y_RD, counts_X) of one block for
    an all-decode batch. route: (ids_TK, w_TK) chosen by the caller (synthetic skew), or None for
    the model's router. Every tensor contiguous fp32 / int64 on CPU (the caller checks)."""
    T, D = x_TD.shape
    E, K = w_gate_ED.shape[0], top_k
    X = k_XGd.shape[0]
    Q = w_qkv_QD.shape[0]
    scratch = torch.empty(T * (D + Q + 2 * H * d + E), dtype=torch.float32)
    key_R = torch.empty(T * K, dtype=torch.int64)
    outs = _post_outputs(T, D, K, num_keys, route)
    h_TD, y_TD, w_TK, ids_TK, meta_R3, y_RD, counts_X = outs
    rc = _lib().amoe_attn_decode_block_f32(
        x_TD.data_ptr(), T, D, ln1_D.data_ptr(), w_qkv_QD.data_ptr(), w_o_DX.data_ptr(), ln2_D.data_ptr(),
        w_gate_ED.data_ptr(), eps, H, G, d, cos_Td.data_ptr(), sin_Td.data_ptr(), slots_T.data_ptr(), k_XGd.data_ptr(),
        v_XGd.data_ptr(), tables_TM.data_ptr(), tables_TM.shape[1], lens_T.data_ptr(), block_size,
        X // block_size, scale, E, K, int(renormalize), int(route is not None), key_E.data_ptr(), num_keys, seg,
        scratch.data_ptr(), key_R.data_ptr(), h_TD.data_ptr(), y_TD.data_ptr(), w_TK.data_ptr(), ids_TK.data_ptr(),
        meta_R3.data_ptr(), y_RD.data_ptr(), counts_X.data_ptr())
    if rc == -1:
        raise ValueError("attn_decode_block: a KV slot, block id or length is outside the cache or its table, "
                         f"or H={H} is not a multiple of G={G}")
    _post_check(rc, E, K, num_keys, "attn_decode_block")
    return outs


def attn_pre(x_TD, ln1_D, w_qkv_QD, eps: float, H: int, G: int, d: int, cos_Td, sin_Td, slots_T, k_XGd, v_XGd):
    """csrc/attn_block.c amoe_attn_pre_f32: q [T, H, d] (K/V written); any rows."""
    T, D = x_TD.shape
    Q = w_qkv_QD.shape[0]
    scratch = torch.empty(T * (D + Q), dtype=torch.float32)
    q_THd = torch.empty(T, H, d, dtype=torch.float32)
    rc = _lib().amoe_attn_pre_f32(x_TD.data_ptr(), T, D, ln1_D.data_ptr(), w_qkv_QD.data_ptr(), eps, H, G, d,
                                  cos_Td.data_ptr(), sin_Td.data_ptr(), slots_T.data_ptr(), k_XGd.shape[0],
                                  k_XGd.data_ptr(), v_XGd.data_ptr(), scratch.data_ptr(), scratch.data_ptr() + 4 * T * D,
                                  q_THd.data_ptr())
    if rc != 0:
        raise ValueError(f"attn_pre: a KV slot is outside the cache's {k_XGd.shape[0]} or the head dim {d} is odd")
    return q_THd


def _post_outputs(T: int, D: int, K: int, num_keys: int, route):
    if route is None:
        ids_TK, w_TK = torch.empty(T, K, dtype=torch.int64), torch.empty(T, K, dtype=torch.float32)
    else:
        ids_TK, w_TK = route
    return (torch.empty(T, D), torch.empty(T, D), w_TK, ids_TK, torch.empty(T * K, 3, dtype=torch.int32),
            torch.empty(T * K, D), torch.empty(num_keys, dtype=torch.int64))


def _post_check(rc: int, E: int, K: int, num_keys: int, op: str) -> None:
    if rc == -2:
        raise ValueError(f"{op}: an expert id is outside [0, {E}) or a key outside [0, {num_keys})")
    if rc != 0:
        raise ValueError(f"{op}: top_k={K} must be in [1, E={E}]")


def attn_post(x_TD, o_TX, w_o_DX, ln2_D, w_gate_ED, eps: float, top_k: int, renormalize: bool, key_E, num_keys: int,
              seg: int, route=None):
    """csrc/attn_block.c amoe_attn_post_f32: (h_TD, y_TD, w_TK, ids_TK, meta_R3, y_RD, counts_X)."""
    T, D = x_TD.shape
    E, K, Hd = w_gate_ED.shape[0], top_k, o_TX.shape[1]
    scratch = torch.empty(T * (D + E), dtype=torch.float32)
    key_R = torch.empty(T * K, dtype=torch.int64)
    outs = _post_outputs(T, D, K, num_keys, route)
    h_TD, y_TD, w_TK, ids_TK, meta_R3, y_RD, counts_X = outs
    rc = _lib().amoe_attn_post_f32(
        x_TD.data_ptr(), o_TX.data_ptr(), T, D, Hd, w_o_DX.data_ptr(), ln2_D.data_ptr(), w_gate_ED.data_ptr(),
        eps, E, K, int(renormalize), int(route is not None), key_E.data_ptr(), num_keys, seg, scratch.data_ptr(),
        scratch.data_ptr() + 4 * T * D, key_R.data_ptr(), h_TD.data_ptr(), y_TD.data_ptr(), w_TK.data_ptr(),
        ids_TK.data_ptr(), meta_R3.data_ptr(), y_RD.data_ptr(), counts_X.data_ptr())
    _post_check(rc, E, K, num_keys, "attn_post")
    return outs


def rms_norm(x_TD: torch.Tensor, w_D: torch.Tensor, eps: float) -> torch.Tensor:
    T, D = x_TD.shape
    y_TD = torch.empty_like(x_TD)
    _lib().amoe_rms_norm_f32(x_TD.data_ptr(), w_D.data_ptr(), T, D, eps, y_TD.data_ptr())
    return y_TD


def moe_combine(h_TD: torch.Tensor, out_TKD: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
    T, K, D = out_TKD.shape
    y_TD = torch.empty_like(h_TD)
    _lib().amoe_moe_combine_f32(h_TD.data_ptr(), out_TKD.data_ptr(), w_TK.data_ptr(), T, K, D, y_TD.data_ptr())
    return y_TD


def grouped_swiglu(x_TD: torch.Tensor, counts_G: list[int], w1_EFD: torch.Tensor, w3_EFD: torch.Tensor,
                   w2_EDF: torch.Tensor, experts_G: list[int]) -> torch.Tensor | None:
    """SwiGLU of each group's rows with its expert's stacked weights, in one call; fp32 rows over
    fp32 or bf16 weights (widened in registers). None when this build has no AVX2/FMA path (the
    caller keeps torch's)."""
    T, D = x_TD.shape
    E, F, _ = w1_EFD.shape
    fn = _lib().amoe_grouped_swiglu_bf16w if w1_EFD.dtype == torch.bfloat16 else _lib().amoe_grouped_swiglu_f32
    counts = torch.tensor(counts_G, dtype=torch.int64)
    experts = torch.tensor(experts_G, dtype=torch.int64)
    h1_TF = torch.empty(T, F, dtype=torch.float32)
    h3_TF = torch.empty(T, F, dtype=torch.float32)
    y_TD = torch.empty(T, D, dtype=torch.float32)
    rc = fn(x_TD.data_ptr(), T, D, F, w1_EFD.data_ptr(), w3_EFD.data_ptr(), w2_EDF.data_ptr(), E, counts.data_ptr(),
            experts.data_ptr(), len(counts_G), h1_TF.data_ptr(), h3_TF.data_ptr(), y_TD.data_ptr())
    if rc == -2:
        return None
    if rc != 0:
        raise ValueError(f"grouped_swiglu: counts {counts_G} / experts {experts_G} do not fit x {tuple(x_TD.shape)} "
                         f"and {E} stacked experts, or D={D} / F={F} is not a multiple of 8")
    return y_TD


def dispatch_rows(y_TD: torch.Tensor, key_R: torch.Tensor, k: int, seg: int, num_keys: int):
    T, D = y_TD.shape
    R = key_R.shape[0]
    key = key_R.to(torch.int64).contiguous()
    meta_R3 = torch.empty(R, 3, dtype=torch.int32)
    y_RD = torch.empty(R, D, dtype=y_TD.dtype)
    counts_X = torch.empty(num_keys, dtype=torch.int64)
    rc = _lib().amoe_dispatch_rows(key.data_ptr(), R, k, num_keys, seg, y_TD.data_ptr(), D * y_TD.element_size(),
                                   meta_R3.data_ptr(), y_RD.data_ptr(), counts_X.data_ptr())
    if rc != 0:
        raise ValueError(f"dispatch_rows: a key is outside [0, {num_keys})")
    return meta_R3, y_RD, counts_X


def rope_kv_write(qkv_TX: torch.Tensor, cos_Td: torch.Tensor, sin_Td: torch.Tensor, H: int, G: int,
                  slots_T: torch.Tensor, k_XGd: torch.Tensor, v_XGd: torch.Tensor) -> torch.Tensor:
    T, X = qkv_TX.shape[0], k_XGd.shape[0]
    d = k_XGd.shape[2]
    slots = slots_T.to(torch.int64).contiguous()
    q_THd = torch.empty(T, H, d, dtype=torch.float32)
    rc = _lib().amoe_rope_kv_write_f32(qkv_TX.data_ptr(), qkv_TX.stride(0), cos_Td.data_ptr(), sin_Td.data_ptr(), T, H,
                                       G, d, slots.data_ptr(), X, k_XGd.data_ptr(), v_XGd.data_ptr(), q_THd.data_ptr())
    if rc != 0:
        raise ValueError(f"rope_kv_write: a slot is outside the cache's {X} or the head dim {d} is odd")
    return q_THd
