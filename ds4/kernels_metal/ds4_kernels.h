// Fused kernel bodies of ds4, one source for Metal, CUDA and the CPU (ds4_prelude.h first).
//
// Every kernel is one function per GPU thread, `ds4_<name>(i, buffers...)`, where i is the
// thread's index in a 1-D grid; the Metal and CUDA wrappers (ds4/fused_kernels.py) are just
// that call with the thread index, and the CPU build loops i over the grid. A thread computes
// one output element over a fixed loop: no shared memory, no barriers, so a row's result is
// the same whatever the number of rows (row invariance by construction). Grids may be padded
// (CUDA rounds up to whole blocks), so each function checks i against its element count.
// Offsets are 32-bit: an expert tensor's blocks and an output must stay under 4 GiB / 2^32
// elements (DS4 Flash's largest, 256 Q4_K experts of 4096 x 2048, is 2.4 GB).
//
// Quant block layouts (GGML; see ds4/quant.py for the MLX-op decoders these are tested against):
//   IQ2_XXS  66 B / 256: d f16 | 8 groups x (a0 a1 a2 a3 | u32 s)
//   Q2_K     84 B / 256: scales[16] (mmmm ssss) | qs[64] | d f16 | dmin f16
//   Q4_K    144 B / 256: d f16 | dmin f16 | scales[12] | qs[128]

#ifndef DS4_KERNELS_H
#define DS4_KERNELS_H

#define DS4_HC_MAX 8  // most HC streams the HC kernels hold in registers (DS4 Flash has 4)

// f16 bits -> float32, exact, with integer ops only (the same on every backend).
DS4_FN float ds4_f16(uint32_t h) {
    uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0) {
        float v = float(m) * 5.9604644775390625e-8f;  // subnormal: m * 2^-24
        return sign ? -v : v;
    }
    uint32_t bits = e == 31 ? (sign | 0x7F800000u | (m << 13)) : (sign | ((e + 112u) << 23) | (m << 13));
    return ds4_bits_f32(bits);
}

DS4_FN float ds4_f16_at(DS4_DEV const uint8_t* b) { return ds4_f16(uint32_t(b[0]) | (uint32_t(b[1]) << 8)); }

DS4_FN float ds4_sigmoid(float z) { return 1.0f / (1.0f + ds4_exp(-z)); }

// ---------------------------------------------------------------------------------------------
// One 256-element block dotted with x[0..255].

// IQ2_XXS: w(32g + 8t + j) = d * (0.5 + ls) * 0.25 * grid[a_t][j] * (-1 if ksigns[sign_t] bit j)
DS4_FN float ds4_dot_iq2_xxs(DS4_DEV const uint8_t* b, DS4_DEV const float* x, DS4_DEV const uint8_t* grid,
                             DS4_DEV const uint8_t* ksigns) {
    float d = ds4_f16_at(b), sum = 0.0f;
    for (uint32_t g = 0; g < 8; ++g) {
        DS4_DEV const uint8_t* q = b + 2 + 8 * g;
        uint32_t s = uint32_t(q[4]) | (uint32_t(q[5]) << 8) | (uint32_t(q[6]) << 16) | (uint32_t(q[7]) << 24);
        float db = d * (0.5f + float(s >> 28)) * 0.25f;
        float part = 0.0f;
        for (uint32_t t = 0; t < 4; ++t) {
            uint32_t signs = ksigns[(s >> (7 * t)) & 127];
            DS4_DEV const uint8_t* level = grid + 8 * uint32_t(q[t]);
            DS4_DEV const float* xs = x + 32 * g + 8 * t;
            for (uint32_t j = 0; j < 8; ++j) {  // +-level exactly, without a branch
                float w = float(level[j]) * (1.0f - 2.0f * float((signs >> j) & 1));
                part += w * xs[j];
            }
        }
        sum += db * part;
    }
    return sum;
}

// Q2_K: qs[32n + l] holds element 128n + 32k + l in bits 2k..2k+1, sub-block 8n + 2k + l/16;
// w = d * (scale & 15) * q - dmin * (scale >> 4).
DS4_FN float ds4_dot_q2_k(DS4_DEV const uint8_t* b, DS4_DEV const float* x) {
    float d = ds4_f16_at(b + 80), dmin = ds4_f16_at(b + 82), sum = 0.0f;
    for (uint32_t n = 0; n < 2; ++n) {
        for (uint32_t k = 0; k < 4; ++k) {
            for (uint32_t h = 0; h < 2; ++h) {
                uint32_t sc = b[8 * n + 2 * k + h];
                float qx = 0.0f, sx = 0.0f;
                for (uint32_t l = 16 * h; l < 16 * h + 16; ++l) {
                    float xv = x[128 * n + 32 * k + l];
                    qx += float((b[16 + 32 * n + l] >> (2 * k)) & 3) * xv;
                    sx += xv;
                }
                sum += d * float(sc & 15) * qx - dmin * float(sc >> 4) * sx;
            }
        }
    }
    return sum;
}

// Q4_K's 6-bit (scale, min) of sub-block `sub` from its 12 scale bytes, as scale | min << 8:
//   bytes 0..3 hh SSSSSS (sc 0..3, top bits of sc 4..7), 4..7 hh MMMMMM (m 0..3, top bits of
//   m 4..7), 8..11 mmmm ssss (low bits of m and sc 4..7).
DS4_FN uint32_t ds4_q4_k_scale_min(DS4_DEV const uint8_t* s, uint32_t sub) {
    if (sub < 4) return (s[sub] & 63) | ((s[sub + 4] & 63) << 8);
    return ((s[sub + 4] & 15) | ((s[sub - 4] >> 6) << 4)) | (((s[sub + 4] >> 4) | ((s[sub] >> 6) << 4)) << 8);
}

// Q4_K: 8 sub-blocks of 32 with 6-bit (scale, min); qs[32i + l] holds element 64i + l in the
// low nibble and 64i + 32 + l in the high one; w = d * sc * q - dmin * m.
DS4_FN float ds4_dot_q4_k(DS4_DEV const uint8_t* b, DS4_DEV const float* x) {
    float d = ds4_f16_at(b), dmin = ds4_f16_at(b + 2), sum = 0.0f;
    DS4_DEV const uint8_t* s = b + 4;
    for (uint32_t sub = 0; sub < 8; ++sub) {
        uint32_t sm = ds4_q4_k_scale_min(s, sub), sc = sm & 255, m = sm >> 8;
        DS4_DEV const uint8_t* qs = b + 16 + 32 * (sub / 2);
        uint32_t shift = 4 * (sub % 2);
        float qx = 0.0f, sx = 0.0f;
        for (uint32_t l = 0; l < 32; ++l) {
            float xv = x[32 * sub + l];
            qx += float((qs[l] >> shift) & 15) * xv;
            sx += xv;
        }
        sum += d * float(sc) * qx - dmin * float(m) * sx;
    }
    return sum;
}

// ---------------------------------------------------------------------------------------------
// Dequantization to float32 rows (the large-M path: decode each chosen expert once, then one
// matmul). Every product is exact in float32 and only the K types' final `- dmin * m` rounds,
// once, as in the MLX-op decoders, so results are bit-exact (an FMA cannot change them either).
//   blocks uint8 [n_blocks * block_bytes]   dims uint32 {threads}   out float32 [n_blocks * 256]

// IQ2_XXS: one thread per 8-element sub-group (block * 32 + g * 4 + t).
DS4_FN void ds4_dequant_iq2_xxs(uint32_t i, DS4_DEV const uint8_t* blocks, DS4_DEV const uint8_t* grid,
                                DS4_DEV const uint8_t* ksigns, DS4_DEV const uint32_t* dims, DS4_DEV float* out) {
    if (i >= dims[0]) return;
    DS4_DEV const uint8_t* b = blocks + (i / 32) * 66;
    uint32_t g = (i / 4) % 8, t = i % 4;
    DS4_DEV const uint8_t* q = b + 2 + 8 * g;
    uint32_t s = uint32_t(q[4]) | (uint32_t(q[5]) << 8) | (uint32_t(q[6]) << 16) | (uint32_t(q[7]) << 24);
    float db = ds4_f16_at(b) * (0.5f + float(s >> 28)) * 0.25f;
    uint32_t signs = ksigns[(s >> (7 * t)) & 127];
    DS4_DEV const uint8_t* level = grid + 8 * uint32_t(q[t]);
    for (uint32_t j = 0; j < 8; ++j) {
        float w = db * float(level[j]);
        out[i * 8 + j] = ((signs >> j) & 1) ? -w : w;
    }
}

// Q2_K: one thread per 16-element sub-block sub = 8n + 2k + h (elements 128n + 32k + 16h + l).
DS4_FN void ds4_dequant_q2_k(uint32_t i, DS4_DEV const uint8_t* blocks, DS4_DEV const uint32_t* dims,
                             DS4_DEV float* out) {
    if (i >= dims[0]) return;
    DS4_DEV const uint8_t* b = blocks + (i / 16) * 84;
    uint32_t sub = i % 16, n = sub / 8, k = (sub / 2) % 4, h = sub % 2;
    float dl = ds4_f16_at(b + 80) * float(b[sub] & 15), ml = ds4_f16_at(b + 82) * float(b[sub] >> 4);
    DS4_DEV float* o = out + (i / 16) * 256 + 128 * n + 32 * k + 16 * h;
    for (uint32_t l = 0; l < 16; ++l) o[l] = dl * float((b[16 + 32 * n + 16 * h + l] >> (2 * k)) & 3) - ml;
}

// Q4_K: one thread per 32-element sub-block.
DS4_FN void ds4_dequant_q4_k(uint32_t i, DS4_DEV const uint8_t* blocks, DS4_DEV const uint32_t* dims,
                             DS4_DEV float* out) {
    if (i >= dims[0]) return;
    DS4_DEV const uint8_t* b = blocks + (i / 8) * 144;
    DS4_DEV const uint8_t* s = b + 4;
    uint32_t sub = i % 8, sm = ds4_q4_k_scale_min(s, sub), sc = sm & 255, m = sm >> 8;
    float dl = ds4_f16_at(b) * float(sc), ml = ds4_f16_at(b + 2) * float(m);
    DS4_DEV const uint8_t* qs = b + 16 + 32 * (sub / 2);
    uint32_t shift = 4 * (sub % 2);
    for (uint32_t l = 0; l < 32; ++l) out[i * 32 + l] = dl * float((qs[l] >> shift) & 15) - ml;
}

// ---------------------------------------------------------------------------------------------
// Gathered-expert matvec: y[m, j, o] = x[m or (m, j)] . W[ids[m, j], o], one thread per output.
//   x     float32 [M, kx, n_in] (kx = 1: one input shared by the row's experts; kx = k: one each)
//   w     uint8 [n_expert, n_out, row_bytes]
//   ids   uint32 [M, k]
//   dims  uint32 {M, k, n_in, n_out, kx, qtype}   (qtype: 0 IQ2_XXS, 1 Q2_K, 2 Q4_K)
//   grid, ksigns  the IQ2_XXS tables (unread for the other types)
//   y     float32 [M, k, n_out]

struct ds4_gather_pos {
    uint32_t row_offset;  // byte offset of the weight row
    uint32_t x_offset;    // float offset of the input row
    bool live;            // false for the padding threads past M * k * n_out
};

DS4_FN ds4_gather_pos ds4_gather_locate(uint32_t i, DS4_DEV const uint32_t* ids, DS4_DEV const uint32_t* dims,
                                        uint32_t block_bytes) {
    ds4_gather_pos p;
    uint32_t M = dims[0], k = dims[1], n_in = dims[2], n_out = dims[3], kx = dims[4];
    p.live = i < M * k * n_out;
    if (!p.live) {
        p.row_offset = p.x_offset = 0;
        return p;
    }
    uint32_t o = i % n_out, mj = i / n_out, j = mj % k, m = mj / k;
    p.row_offset = (ids[mj] * n_out + o) * (n_in / 256) * block_bytes;
    p.x_offset = (m * kx + (kx == 1 ? 0 : j)) * n_in;
    return p;
}

DS4_FN uint32_t ds4_block_bytes(uint32_t qtype) {
    return qtype == 0 ? 66 : (qtype == 1 ? 84 : 144);
}

// One weight row times one input row, block after block (the fixed order every row of every
// call uses: the row invariance).
DS4_FN float ds4_row_dot(uint32_t qtype, DS4_DEV const uint8_t* row, DS4_DEV const float* x, uint32_t n_blocks,
                         DS4_DEV const uint8_t* grid, DS4_DEV const uint8_t* ksigns) {
    float acc = 0.0f;
    for (uint32_t blk = 0; blk < n_blocks; ++blk) {
        if (qtype == 0)
            acc += ds4_dot_iq2_xxs(row + 66 * blk, x + 256 * blk, grid, ksigns);
        else if (qtype == 1)
            acc += ds4_dot_q2_k(row + 84 * blk, x + 256 * blk);
        else
            acc += ds4_dot_q4_k(row + 144 * blk, x + 256 * blk);
    }
    return acc;
}

DS4_FN void ds4_gather_matvec(uint32_t i, DS4_DEV const float* x, DS4_DEV const uint8_t* w,
                              DS4_DEV const uint32_t* ids, DS4_DEV const uint32_t* dims,
                              DS4_DEV const uint8_t* grid, DS4_DEV const uint8_t* ksigns, DS4_DEV float* y) {
    uint32_t qtype = dims[5];
    ds4_gather_pos p = ds4_gather_locate(i, ids, dims, ds4_block_bytes(qtype));
    if (p.live) y[i] = ds4_row_dot(qtype, w + p.row_offset, x + p.x_offset, dims[2] / 256, grid, ksigns);
}

// Route-weighted SwiGLU of the gate and up experts in one launch: one thread per (m, j, o)
// computes both products exactly as ds4_gather_matvec does, then
//   mid[m, j, o] = silu(min(g, clamp)) * clip(u, -clamp, clamp) * weight[m, j]
//   x      float32 [M, n_in]             wg, wu  uint8 [n_expert, n_ff, row_bytes]
//   ids    uint32 [M, k]                 weight  float32 [M, k]
//   dims   uint32 {M, k, n_in, n_ff, 1, qtype}   (qtype: 0 IQ2_XXS, 1 Q2_K, 2 Q4_K)
//   clamp  float32 {clamp}               mid     float32 [M, k, n_ff]

DS4_FN void ds4_gather_swiglu(uint32_t i, DS4_DEV const float* x, DS4_DEV const uint8_t* wg,
                              DS4_DEV const uint8_t* wu, DS4_DEV const uint32_t* ids, DS4_DEV const float* weight,
                              DS4_DEV const uint32_t* dims, DS4_DEV const float* clamp, DS4_DEV const uint8_t* grid,
                              DS4_DEV const uint8_t* ksigns, DS4_DEV float* mid) {
    uint32_t qtype = dims[5];
    ds4_gather_pos p = ds4_gather_locate(i, ids, dims, ds4_block_bytes(qtype));
    if (!p.live) return;
    uint32_t n_blocks = dims[2] / 256;
    float g = ds4_row_dot(qtype, wg + p.row_offset, x + p.x_offset, n_blocks, grid, ksigns);
    float u = ds4_row_dot(qtype, wu + p.row_offset, x + p.x_offset, n_blocks, grid, ksigns);
    float c = clamp[0];
    g = g > c ? c : g;  // written so that a NaN passes through, as in mx.minimum / mx.clip
    u = u > c ? c : (u < -c ? -c : u);
    mid[i] = g * ds4_sigmoid(g) * u * weight[i / dims[3]];
}

// ---------------------------------------------------------------------------------------------
// Hyper-connection pre, kernel 1 of 2: the mix columns. One thread per (token t, column c) of
// the C = 2M + M*M columns: the RMS-normed streams dotted with fn[c], scaled, offset, and
// gated (pre: sigmoid + eps; post: 2 sigmoid; combine logits: as they are).
//   X     float32 [T, M, E]      fn  float32 [C, M*E]    scale float32 [3]    base float32 [C]
//   dims  uint32 {T, M, E}       eps float32 {rms_eps, hc_eps}
//   mix   float32 [T, C]
// It is a kernel of its own because every element of the mixed input needs the pre gates, which
// are reductions over all M*E inputs of the token: fusing them into kernel 2 would repeat those
// reductions per element (or need a grid-wide barrier).

DS4_FN void ds4_hc_pre_mix(uint32_t i, DS4_DEV const float* X, DS4_DEV const float* fn, DS4_DEV const float* scale,
                           DS4_DEV const float* base, DS4_DEV const uint32_t* dims, DS4_DEV const float* eps,
                           DS4_DEV float* mix) {
    uint32_t T = dims[0], M = dims[1], E = dims[2], C = 2 * M + M * M, n = M * E;
    if (i >= T * C) return;
    uint32_t t = i / C, c = i % C;
    DS4_DEV const float* xt = X + t * n;
    DS4_DEV const float* f = fn + c * n;
    float ss = 0.0f;
    for (uint32_t e = 0; e < n; ++e) ss += xt[e] * xt[e];
    float r = ds4_rsqrt(ss / float(n) + eps[0]);
    float acc = 0.0f;
    for (uint32_t e = 0; e < n; ++e) acc += (xt[e] * r) * f[e];
    uint32_t kind = c < M ? 0 : (c < 2 * M ? 1 : 2);
    float z = acc * scale[kind] + base[c];
    mix[i] = kind == 0 ? ds4_sigmoid(z) * 1.0f + eps[1] : (kind == 1 ? ds4_sigmoid(z) * 2.0f : z);
}

// Hyper-connection pre, kernel 2 of 2: one thread per (token t, r) with r < E + M + M*M:
//   r < E          y[t, r] = sum_m pre[t, m] * X[t, m, r]   (m in order, as ds4.model sums)
//   r < E + M      post[t, r - E]  = mix[t, M + r - E]
//   else           comb[t, (r - E - M)] from Sinkhorn of the M x M logits (each such thread
//                  runs the whole tiny iteration in registers and keeps its own entry)
//   dims  uint32 {T, M, E, sinkhorn_iters}     eps float32 {rms_eps, hc_eps}

DS4_FN void ds4_hc_pre_apply(uint32_t i, DS4_DEV const float* X, DS4_DEV const float* mix,
                             DS4_DEV const uint32_t* dims, DS4_DEV const float* eps, DS4_DEV float* y,
                             DS4_DEV float* post, DS4_DEV float* comb) {
    uint32_t T = dims[0], M = dims[1], E = dims[2], iters = dims[3], C = 2 * M + M * M, W = E + M + M * M;
    if (i >= T * W) return;
    uint32_t t = i / W, r = i % W;
    DS4_DEV const float* mt = mix + t * C;
    if (r < E) {
        DS4_DEV const float* xt = X + t * M * E + r;
        float acc = mt[0] * xt[0];
        for (uint32_t m = 1; m < M; ++m) acc = acc + mt[m] * xt[m * E];
        y[t * E + r] = acc;
        return;
    }
    if (r < E + M) {
        post[t * M + (r - E)] = mt[M + (r - E)];
        return;
    }
    float c[DS4_HC_MAX * DS4_HC_MAX];
    float h = eps[1];
    for (uint32_t a = 0; a < M; ++a) {  // row softmax + eps
        DS4_DEV const float* l = mt + 2 * M + a * M;
        float top = l[0];
        for (uint32_t b = 1; b < M; ++b) top = l[b] > top ? l[b] : top;
        float s = 0.0f;
        for (uint32_t b = 0; b < M; ++b) {
            c[a * M + b] = ds4_exp(l[b] - top);
            s += c[a * M + b];
        }
        for (uint32_t b = 0; b < M; ++b) c[a * M + b] = c[a * M + b] / s + h;
    }
    for (uint32_t it = 0; it < iters; ++it) {
        if (it > 0) {  // rows, then columns; the first round normalises the columns only
            for (uint32_t a = 0; a < M; ++a) {
                float s = 0.0f;
                for (uint32_t b = 0; b < M; ++b) s += c[a * M + b];
                for (uint32_t b = 0; b < M; ++b) c[a * M + b] = c[a * M + b] / (s + h);
            }
        }
        for (uint32_t b = 0; b < M; ++b) {
            float s = 0.0f;
            for (uint32_t a = 0; a < M; ++a) s += c[a * M + b];
            for (uint32_t a = 0; a < M; ++a) c[a * M + b] = c[a * M + b] / (s + h);
        }
    }
    comb[t * M * M + (r - E - M)] = c[r - E - M];
}

// ---------------------------------------------------------------------------------------------
// Hyper-connection post: X'[t, j, e] = post[t, j] * out[t, e] + sum_i comb[t, i, j] * X[t, i, e],
// one thread per (t, j, e), the sum in stream order as ds4.model writes it.
//   out float32 [T, E]   X float32 [T, M, E]   post float32 [T, M]   comb float32 [T, M, M]
//   dims uint32 {T, M, E}                      Y float32 [T, M, E]

DS4_FN void ds4_hc_post(uint32_t i, DS4_DEV const float* out, DS4_DEV const float* X, DS4_DEV const float* post,
                        DS4_DEV const float* comb, DS4_DEV const uint32_t* dims, DS4_DEV float* Y) {
    uint32_t T = dims[0], M = dims[1], E = dims[2];
    if (i >= T * M * E) return;
    uint32_t e = i % E, tj = i / E, j = tj % M, t = tj / M;
    DS4_DEV const float* ct = comb + t * M * M;
    DS4_DEV const float* xt = X + t * M * E + e;
    float moved = ct[j] * xt[0];
    for (uint32_t s = 1; s < M; ++s) moved = moved + ct[s * M + j] * xt[s * E];
    Y[i] = post[t * M + j] * out[t * E + e] + moved;
}

#endif  // DS4_KERNELS_H
