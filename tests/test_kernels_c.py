"""The fused kernel bodies (ds4/kernels_metal/ds4_kernels.h) compiled for the CPU and run over
the same thread grid the Metal and CUDA wrappers launch, against the MLX-op references.

Tolerances: the gathered matvecs decode weights exactly but sum in their own order (per
sub-block, then per block), so they are held to float32 rounding of the exact product:
|y - y64| <= 2e-6 * sum|w x| (a float32 sum of n terms errs by ~n * 6e-8 of that at worst; the
observed error is far smaller). HC post and the mixed input of HC pre sum in the reference's
order and are bit-exact; the HC pre mix columns (a 16K-term RMS-normed dot) and Sinkhorn are
held to 1e-5 relative; dequant is bit-exact. Row invariance is bitwise. Also here: the CUDA
wrappers compiled with nvcc as MLX generates them, the Metal wrappers and the Metal branch of the
prelude parsed as C++ against a metal_stdlib shim (no Metal compiler here), the table entries and
the census stand-ins.
"""

import io
import re
import shutil
import subprocess
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from ds4 import codecs, fused_kernels, kernels, kernels_c, quant
from ds4.model import _hc_post_reference, _hc_pre_reference, _sinkhorn_reference
from ds4.moe import _expert_swiglu_reference

GATHER_TYPES = (QT.IQ2_XXS, QT.Q2_K, QT.Q4_K)


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    if kernels_c.compiler() is None:
        pytest.skip("no C++ compiler on PATH: the kernel bodies cannot be built for the CPU")
    return kernels_c.CKernels(tmp_path_factory.mktemp("ds4_kernels_c"))


def expert_blocks(qtype, n_expert, n_out, n_in, seed):
    rng = np.random.default_rng(seed)
    nb = n_expert * n_out * n_in // 256
    return codecs.random_blocks(rng, qtype, nb, 0.05).reshape(n_expert, n_out, -1)


def run_gather(ck, qtype, x, blocks, ids, pad=0):
    """The C body over the grid (plus `pad` idle threads, as CUDA rounds the grid up); returns
    y [M, k, n_out] and the NaN-filled tail past it."""
    inputs, n, shape = fused_kernels.gather_inputs(qtype.name, mx.array(x), mx.array(blocks), mx.array(ids))
    (flat,) = ck.run("gather_matvec", [np.array(a) for a in inputs], n + pad, [(n + pad + 3,)])
    return flat[:n].reshape(shape), flat[n:]


@pytest.mark.parametrize("qtype", GATHER_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("raw", [False, True], ids=["valid", "raw-bytes"])
def test_dequant_bit_exact(ck, qtype, raw):
    """The dequant bodies against the MLX-op decoders, float32 bits (NaN-aware: raw bytes give
    NaN and inf scales)."""
    rng = np.random.default_rng(3)
    rows, n = 5, 768
    if raw:
        data = rng.integers(0, 256, (rows, codecs.row_bytes(qtype, n)), dtype=np.uint8)
    else:
        data = codecs.random_blocks(rng, qtype, rows * n // 256, 1.0).reshape(rows, -1)
    inputs, threads, shape = fused_kernels.dequant_inputs(qtype.name, mx.array(data), n)
    (flat,) = ck.run(f"dequant_{qtype.name.lower()}", [np.array(a) for a in inputs], threads + 5, [(rows * n + 40,)])
    assert np.isnan(flat[rows * n:]).all(), "a padding thread wrote past the output"
    got, want = flat[:rows * n].reshape(shape), np.array(quant.dequantize(mx.array(data), qtype, n))
    nan = np.isnan(want)
    assert np.array_equal(nan, np.isnan(got)) and (raw or not nan.any())
    assert np.array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan])


@pytest.mark.parametrize("qtype", GATHER_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("M", [1, 2, 5, 17])
@pytest.mark.parametrize("per_expert_x", [False, True])
def test_gather_matvec_matches_reference(ck, qtype, M, per_expert_x):
    n_expert, n_out, n_in, k = 5, 7, 256 * 3, 3
    blocks = expert_blocks(qtype, n_expert, n_out, n_in, seed=M)
    rng = np.random.default_rng(100 + M)
    ids = rng.integers(0, n_expert, size=(M, k))
    ids[-1, :2] = ids[0, 0]  # repeated experts, within a row and across rows
    x = rng.standard_normal((M, k, n_in) if per_expert_x else (M, n_in)).astype(np.float32)
    ids = ids.astype(np.int32 if per_expert_x else np.uint32)  # routers hand over either

    y, tail = run_gather(ck, qtype, x, blocks, ids, pad=5)
    assert np.isnan(tail).all(), "a padding thread wrote past the output"
    assert np.isfinite(y).all(), "an output element was not written"

    w = codecs.dequantize(blocks, qtype).astype(np.float64)[ids]  # [M, k, n_out, n_in], exact weights
    xs = (x if per_expert_x else np.broadcast_to(x[:, None], (M, k, n_in))).astype(np.float64)
    exact = np.einsum("mkoi,mki->mko", w, xs)
    bound = 2e-6 * np.einsum("mkoi,mki->mko", np.abs(w), np.abs(xs))
    assert (np.abs(y - exact) <= bound).all()

    experts = quant.QuantExperts(blocks, qtype, (n_expert, n_out, n_in))
    ref = np.array(kernels.reference("gather_matmul", qtype.name)(experts, mx.array(x), mx.array(ids)))
    assert (np.abs(y - ref) <= 2 * bound).all()


@pytest.mark.parametrize("qtype", GATHER_TYPES, ids=lambda t: t.name)
def test_gather_matvec_is_row_invariant(ck, qtype):
    """Row m of a 17-row call is bitwise the 1-row call on row m (verify == decode)."""
    M, n_expert, n_out, n_in, k = 17, 6, 5, 512, 4
    blocks = expert_blocks(qtype, n_expert, n_out, n_in, seed=7)
    rng = np.random.default_rng(8)
    ids = np.stack([rng.choice(n_expert, k, replace=False) for _ in range(M)]).astype(np.uint32)
    x = rng.standard_normal((M, n_in)).astype(np.float32)
    y, _ = run_gather(ck, qtype, x, blocks, ids)
    for m in range(M):
        alone, _ = run_gather(ck, qtype, x[m:m + 1], blocks, ids[m:m + 1])
        assert np.array_equal(alone[0].view(np.uint32), y[m].view(np.uint32)), f"row {m}"


def run_swiglu(ck, qtype, x, gate_blocks, up_blocks, ids, weights, clamp):
    inputs, n, shape = fused_kernels.swiglu_inputs(qtype.name, *(mx.array(a) for a in (x, gate_blocks, up_blocks, ids,
                                                                                         weights)), clamp)
    (flat,) = ck.run("gather_swiglu", [np.array(a) for a in inputs], n + 3, [(n + 3,)])
    assert np.isnan(flat[n:]).all(), "a padding thread wrote past the output"
    return flat[:n].reshape(shape)


@pytest.mark.parametrize("qtype", GATHER_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("M", [1, 5, 17])
def test_gather_swiglu_matches_reference(ck, qtype, M):
    """Gate, up, SwiGLU and route weight in one body: against the MLX ops (with the clamp biting
    on both sides), its gate/up products the matvec body's bit for bit, and row-invariant."""
    n_expert, n_ff, n_in, k, clamp = 6, 7, 768, 3, 1.0
    gate_blocks = expert_blocks(qtype, n_expert, n_ff, n_in, seed=M)
    up_blocks = expert_blocks(qtype, n_expert, n_ff, n_in, seed=M + 50)
    rng = np.random.default_rng(200 + M)
    ids = np.stack([rng.choice(n_expert, k, replace=False) for _ in range(M)]).astype(np.uint32)
    ids[-1, 0] = ids[0, 0]
    x = rng.standard_normal((M, n_in)).astype(np.float32)
    weights = rng.uniform(0.1, 1.0, (M, k)).astype(np.float32)
    mid = run_swiglu(ck, qtype, x, gate_blocks, up_blocks, ids, weights, clamp)
    assert np.isfinite(mid).all()

    gate = quant.QuantExperts(gate_blocks, qtype, (n_expert, n_ff, n_in))
    up = quant.QuantExperts(up_blocks, qtype, (n_expert, n_ff, n_in))
    ref = np.array(_expert_swiglu_reference(gate, up, mx.array(x), mx.array(ids), mx.array(weights), clamp))
    np.testing.assert_allclose(mid, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())

    g, _ = run_gather(ck, qtype, x, gate_blocks, ids)
    u, _ = run_gather(ck, qtype, x, up_blocks, ids)
    assert (g > clamp).any() and (u < -clamp).any() and (u > clamp).any()  # the clamp is exercised
    gc = np.minimum(g, np.float32(clamp))
    same = gc * (np.float32(1) / (np.float32(1) + np.exp(-gc))) * np.clip(u, -clamp, clamp) * weights[..., None]
    np.testing.assert_allclose(mid, same, rtol=1e-6, atol=1e-7)
    for m in range(M):
        alone = run_swiglu(ck, qtype, x[m:m + 1], gate_blocks, up_blocks, ids[m:m + 1], weights[m:m + 1], clamp)
        assert np.array_equal(alone[0].view(np.uint32), mid[m].view(np.uint32)), f"row {m}"


def hc_case(T, M=4, E=320, seed=0, iters=20):
    rng = np.random.default_rng(seed)
    C = 2 * M + M * M
    X = rng.standard_normal((T, M, E)).astype(np.float32)
    fn16 = (rng.standard_normal((C, M * E)) * 0.02).astype(np.float16)
    fn = quant.QuantWeight(fn16, QT.F16, (C, M * E))
    scale = rng.uniform(0.5, 2.0, 3).astype(np.float32)
    base = (rng.standard_normal(C) * 0.5).astype(np.float32)
    config = SimpleNamespace(rms_eps=1e-6, hc_eps=1e-6, hc_sinkhorn_iters=iters)
    return X, fn, scale, base, config


def run_hc_pre(ck, X, fn, scale, base, config):
    T, M, E = X.shape
    C = 2 * M + M * M
    eps = np.array([config.rms_eps, config.hc_eps], np.float32)
    (mix,) = ck.run("hc_pre_mix", [X, np.array(fn.dense), scale, base, np.array([T, M, E]), eps], T * C + 3, [(T, C)])
    outs = ck.run("hc_pre_apply", [X, mix, np.array([T, M, E, config.hc_sinkhorn_iters]), eps],
                  T * (E + M + M * M) + 3, [(T, E), (T, M), (T, M, M)])
    return mix, outs


@pytest.mark.parametrize("T, iters", [(1, 20), (3, 20), (2, 3)])  # few iterations: far from converged
def test_hc_pre_matches_reference(ck, T, iters):
    X, fn, scale, base, config = hc_case(T, seed=T, iters=iters)
    M = X.shape[1]
    mix, (y, post, comb) = run_hc_pre(ck, X, fn, scale, base, config)
    ref = [np.array(a) for a in _hc_pre_reference(mx.array(X), fn, mx.array(scale), mx.array(base), config)]
    for got, want in zip((y, post, comb), ref, strict=True):
        assert got.shape == want.shape and np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # given the kernel's own mix columns, the mixed input sums in the reference's order: bit-exact
    mixed = sum((mx.array(mix[:, m:m + 1]) * mx.array(X[:, m]) for m in range(1, M)),
                mx.array(mix[:, 0:1]) * mx.array(X[:, 0]))
    assert np.array_equal(np.array(mixed).view(np.uint32), y.view(np.uint32))
    assert np.array_equal(post, mix[:, M:2 * M])
    sink = np.array(_sinkhorn_reference(mx.array(mix[:, 2 * M:].reshape(T, M, M)), config.hc_sinkhorn_iters,
                                        config.hc_eps))
    np.testing.assert_allclose(comb, sink, rtol=2e-6, atol=1e-7)


def test_hc_pre_is_row_invariant(ck):
    X, fn, scale, base, config = hc_case(5, seed=9)
    _, whole = run_hc_pre(ck, X, fn, scale, base, config)
    for t in range(5):
        _, alone = run_hc_pre(ck, X[t:t + 1], fn, scale, base, config)
        for a, b in zip(alone, whole, strict=True):
            assert np.array_equal(a[0].view(np.uint32), b[t].view(np.uint32))


@pytest.mark.parametrize("T", [1, 2, 5])
def test_hc_post_bit_exact(ck, T):
    rng = np.random.default_rng(T)
    M, E = 4, 300
    out = rng.standard_normal((T, E)).astype(np.float32)
    X = rng.standard_normal((T, M, E)).astype(np.float32)
    post = rng.uniform(0, 2, (T, M)).astype(np.float32)
    comb = rng.uniform(0, 1, (T, M, M)).astype(np.float32)
    (got,) = ck.run("hc_post", [out, X, post, comb, np.array([T, M, E])], T * M * E + 7, [(T, M, E)])
    want = np.array(_hc_post_reference(*(mx.array(a) for a in (out, X, post, comb))))
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def mlx_like_cuda_source() -> str:
    """Every body's CUDA wrapper as mx.fast.cuda_kernel generates it (mlx/backend/cuda/
    custom_kernel.cpp: its default header, our header, then a __global__ function per kernel in
    mlx::core::cu whose body is the wrapper source); MLX's device utils header, which is not
    here, is replaced by the fixed-width integer types it provides."""
    parts = ["#include <cstdint>", "#include <cooperative_groups.h>", fused_kernels.header(),
             "namespace mlx::core::cu {", "namespace cg = cooperative_groups;"]
    for spec in fused_kernels.SPECS.values():
        params = [f"const {t}* {n}" for n, t in spec.inputs] + [f"float* {o}" for o in spec.outputs]
        parts.append(f"__global__ void custom_kernel_ds4_{spec.name}(\n    " + ",\n    ".join(params) + ") {\n"
                     + spec.call(fused_kernels.THREAD_INDEX["cuda"]) + "\n}\n")
    parts.append("}  // namespace mlx::core::cu")
    return "\n".join(parts)


def test_cuda_wrappers_compile_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH: the CUDA wrappers are not compile-checked")
    src = tmp_path / "ds4_kernels.cu"
    src.write_text(mlx_like_cuda_source())
    r = subprocess.run([nvcc, "-std=c++17", "-c", "-Werror", "all-warnings", str(src), "-o", str(tmp_path / "k.o")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def test_table_entries_and_reference_override(monkeypatch):
    for device in ("metal", "cuda"):
        for qt in ("IQ2_XXS", "Q2_K", "Q4_K"):
            assert kernels.lookup("dequant", qt, device) is not kernels.reference("dequant", qt)
        for qt in ("IQ2_XXS", "Q2_K"):
            assert kernels.lookup("gather_matmul", qt, device) is fused_kernels.gather_matmul
            assert kernels.lookup("expert_swiglu", qt, device) is fused_kernels.expert_swiglu
        assert kernels.lookup("expert_swiglu", None, device) is kernels.reference("expert_swiglu", None)
        assert kernels.lookup("hc_pre", None, device) is fused_kernels.hc_pre
        assert kernels.lookup("hc_post", None, device) is fused_kernels.hc_post
        assert kernels.lookup("gather_matmul", "Q4_K", device) is kernels.reference("gather_matmul", "Q4_K")
    assert kernels.lookup("hc_pre", None, "cpu") is kernels.reference("hc_pre")
    monkeypatch.setenv("DS4_KERNELS", "reference")
    assert kernels.lookup("hc_post", None, "cuda") is kernels.reference("hc_post")


def test_absent_backend_raises_and_census_stand_in_is_one_node():
    X, fn, scale, base, config = hc_case(2)
    args = (mx.array(X), fn, mx.array(scale), mx.array(base), config)
    with kernels.as_device("cuda"):
        with pytest.raises(RuntimeError, match="needs the cuda backend"):
            kernels.lookup("hc_pre")(*args)
        with kernels.stand_ins():
            y, post, comb = kernels.lookup("hc_pre")(*args)
    assert (y.shape, post.shape, comb.shape) == ((2, 320), (2, 4), (2, 4, 4))
    buf = io.StringIO()
    mx.export_to_dot(buf, y, post, comb)
    labels = re.findall(r'label ="([^"]+)", shape=rectangle', buf.getvalue())
    assert labels.count("Depends") == 2  # the two launches of HC pre


def test_census_counts_each_launch_site_once():
    """speed-bench/census.py: under --as cuda on the CPU, a compiled HC pre + HC post is three
    custom-kernel sites and nothing else."""
    import importlib.util
    from pathlib import Path

    from ds4.model import hc_post, hc_pre

    path = Path(__file__).resolve().parents[1] / "speed-bench" / "census.py"
    spec = importlib.util.spec_from_file_location("census", path)
    census = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(census)
    X, fn, scale, base, config = hc_case(2)
    X, out = mx.array(X), mx.array(np.ones((2, 320), np.float32))

    def step(X, out):
        return hc_post(out, X, hc_pre(X, fn, mx.array(scale), mx.array(base), config))

    with kernels.as_device("cuda"), kernels.stand_ins():
        y = mx.compile(step)(X, out)
    assert census.kernel_counts([y]) == {"custom kernel": 3}


def test_prefill_widths_decode_each_expert_once():
    """Above the verify widths the fused gathered products take the dequant path: one dequant
    launch and MLX's gather_mm, instead of re-decoding weight rows for every row."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "speed-bench" / "census.py"
    spec = importlib.util.spec_from_file_location("census", path)
    census = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(census)
    blocks = expert_blocks(QT.Q2_K, 4, 8, 256, seed=1)
    experts = quant.QuantExperts(blocks, QT.Q2_K, (4, 8, 256))
    for M in (fused_kernels.MATVEC_MAX_ROWS, fused_kernels.MATVEC_MAX_ROWS + 1):
        ids = mx.array(np.zeros((M, 2), np.uint32))
        with kernels.as_device("cuda"), kernels.stand_ins():
            y = experts.gather_matmul(mx.ones((M, 256)), ids)
        counts = census.kernel_counts([y])
        assert counts["custom kernel"] == 1
        assert counts["GatherMM"] == (M > fused_kernels.MATVEC_MAX_ROWS)


METAL_SHIM = """// Stand-ins for what the Metal compiler provides, enough for a C++ syntax check of the Metal
// branch of ds4_prelude.h and of wrappers shaped like mx.fast.metal_kernel's.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#define device
#define kernel
struct uint3 { uint32_t x, y, z; };
namespace metal {
inline float exp(float v) { return std::exp(v); }
inline float rsqrt(float v) { return 1.0f / std::sqrt(v); }
template <class T, class U> T as_type(U u) { T t; std::memcpy(&t, &u, sizeof t); return t; }
}
"""


def test_metal_wrappers_parse_with_a_shim(tmp_path):
    """The Metal branch of the prelude and every wrapper as mx.fast.metal_kernel lays it out
    (buffers, then thread_position_in_grid), parsed as C++ against a shim of metal_stdlib. Not a
    Metal compile: address spaces and Metal's own rules are checked only on a Mac."""
    cxx = kernels_c.compiler()
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    (tmp_path / "metal_stdlib").write_text(METAL_SHIM)
    parts = ["#include <metal_stdlib>", "using namespace metal;", fused_kernels.header()]
    for spec in fused_kernels.SPECS.values():
        params = [f"const device {t}* {n} [[buffer({i})]]" for i, (n, t) in enumerate(spec.inputs)]
        params += [f"device float* {o} [[buffer({len(spec.inputs) + i})]]" for i, o in enumerate(spec.outputs)]
        params.append("uint3 thread_position_in_grid [[thread_position_in_grid]]")
        parts.append(f"[[kernel]] void custom_kernel_ds4_{spec.name}(\n    " + ",\n    ".join(params) + ") {\n"
                     + spec.call(fused_kernels.THREAD_INDEX["metal"]) + "\n}\n")
    src = tmp_path / "ds4_kernels_metal.cpp"
    src.write_text("\n".join(parts))
    r = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-Wno-attributes", "-D__METAL_VERSION__=310",
                        f"-I{tmp_path}", str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def test_model_steps_through_the_fused_entries(ck, tiny_paths, monkeypatch):
    """The tiny model's prefill (20 rows: the dequant path), decode and 4-row verify with the
    CUDA table entries, every launch run by the CPU build of its body: the wrappers' arguments,
    shapes and fallbacks end to end, against the reference table."""
    import collections

    from ds4.loader import open_model
    from ds4.model import Model
    from ds4.numerics import Numerics

    model = Model.load(open_model(str(tiny_paths[0])), Numerics(qat=False))  # plain weights: no fallbacks
    calls = collections.Counter()

    def launch(name, inputs, n_threads, output_shapes):
        calls[name] += 1
        return [mx.array(a) for a in ck.run(name, [np.array(a) for a in inputs], n_threads, output_shapes)]

    monkeypatch.setattr(fused_kernels, "launch", launch)
    tokens = [int(t) for t in np.random.default_rng(0).integers(3, model.config.n_vocab, 24)]

    def logits(device):
        with kernels.as_device(device):
            state = model.empty_state(256, 20)
            out = model.step(tokens[:20], state, compiled=False)
            mx.eval(out.arrays())
            state.store.record(state.pos, tokens[:20])
            rows = [out.logits]
            for width in (1, 4):
                rows.append(model.step(tokens[20:20 + width], out.state, all_logits=True, compiled=False).logits)
            return [np.array(r) for r in rows]

    want = logits("cpu")
    assert not calls
    got = logits("cuda")
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-5 * np.abs(w).max())  # seen: 1.6e-6
        assert np.array_equal(g.argmax(-1), w.argmax(-1))
    n_layer = model.config.n_layer
    assert calls["hc_pre_mix"] == calls["hc_pre_apply"] == calls["hc_post"] == 2 * n_layer * 3
    assert calls["gather_swiglu"] == calls["gather_matvec"] == 2 * n_layer  # decode and verify
    assert calls["dequant_iq2_xxs"] == 2 * n_layer and calls["dequant_q2_k"] == n_layer  # prefill
