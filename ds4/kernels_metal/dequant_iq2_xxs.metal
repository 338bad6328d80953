// IQ2_XXS block dequant: the body of an mx.fast.metal_kernel (ds4/quant.py builds the
// signature). One thread decodes one 8-element sub-group; the MLX-op `_dequant_iq2_xxs`
// is the reference and every product here is exact in float32, so results match bit for bit.
//
//   inputs:  blocks    uint8 [n_blocks * 66]   d: f16, then 8 groups x (a0 a1 a2 a3 | u32 s)
//            iq2_grid  uint8 [256 * 8]         levels 8, 25, 43
//            ksigns    uint8 [128]             7 sign bits + parity bit
//   output:  out       float32 [n_blocks * 256]
//
//   w(32g + 8t + j) = d * (0.5 + ls) * 0.25 * iq2_grid[a_t][j] * (-1 if ksigns[sign_t] bit j else 1)
//   where s = ls << 28 | sign_3 << 21 | sign_2 << 14 | sign_1 << 7 | sign_0.

uint sub = thread_position_in_grid.x;   // sub-group: block * 32 + g * 4 + t
uint blk = sub / 32;
uint g = (sub / 4) % 8;
uint t = sub % 4;

device const uint8_t* b = blocks + blk * 66;
float d = float(as_type<half>(ushort(b[0] | (b[1] << 8))));
device const uint8_t* q = b + 2 + 8 * g;
uint s = uint(q[4]) | (uint(q[5]) << 8) | (uint(q[6]) << 16) | (uint(q[7]) << 24);

float db = d * (0.5f + float(s >> 28)) * 0.25f;
uint signs = ksigns[(s >> (7 * t)) & 127];
device const uint8_t* row = iq2_grid + 8 * uint(q[t]);
for (uint j = 0; j < 8; ++j) {
    float w = db * float(row[j]);
    out[sub * 8 + j] = ((signs >> j) & 1) ? -w : w;
}
