// Hadamard rotation rows (kernel_table.h, hadamard_rows) and RoPE rows (rope_rows) for the
// SIMD tables. Included after
// the ISA's simd header (kL float lanes, vhadamard_lanes for the stages below kL).
// The operations are the scalar reference's: the same products by pre/post, and for every
// stage the same a + b, a - b pairs, stage by stage in increasing h, so the results are
// bit-identical to it. Blocks below kL lanes (the tail blocks of a d that is not a power of
// two, or a d below kL) take the scalar stages.

inline void hadamard_block_scalar(float* b, int blk) noexcept {
  for (int h = 1; h < blk; h *= 2)
    for (int i = 0; i < blk; i += 2 * h)
      for (int j = i; j < i + h; ++j) {
        const float a = b[j], c = b[j + h];
        b[j] = a + c;
        b[j + h] = a - c;
      }
}

inline void scale_row_k(float* row, const float* f, int d) noexcept {
  int c = 0;
  for (; c + kL <= d; c += kL) vstore(row + c, vmul(vload(row + c), vload(f + c)));
  for (; c < d; ++c) row[c] *= f[c];
}

void hadamard_rows_k(float* x, int n, int d, const float* pre, const float* post) noexcept {
  for (int r = 0; r < n; ++r) {
    float* row = x + static_cast<std::ptrdiff_t>(r) * d;
    if (pre) scale_row_k(row, pre, d);
    for (int base = 0, rest = d; rest > 0;) {
      int blk = 1;
      while (blk * 2 <= rest) blk *= 2;
      float* b = row + base;
      if (blk < kL) {
        hadamard_block_scalar(b, blk);
      } else {
        for (int i = 0; i < blk; i += kL) vstore(b + i, vhadamard_lanes(vload(b + i)));
        for (int h = kL; h < blk; h *= 2)
          for (int i = 0; i < blk; i += 2 * h)
            for (int j = i; j < i + h; j += kL) {
              const VF a = vload(b + j), c = vload(b + j + h);
              vstore(b + j, vadd(a, c));
              vstore(b + j + h, vsub(a, c));
            }
      }
      base += blk;
      rest -= blk;
    }
    if (post) scale_row_k(row, post, d);
  }
}

// RoPE of pre-RoPE keys. Half-split pairs are two contiguous halves: vectors of kL pairs.
// Interleaved pairs are adjacent channels; they take the scalar loop (the angles are the
// same arithmetic), as do a half that is not a multiple of kL and the tail of one.
void rope_rows_k(float* x, int n, int d, int half, bool interleaved, const float* cb, const float* sb,
                 const float* oc, const float* os, const int* off) noexcept {
  for (int j = 0; j < n; ++j) {
    if (off[j] < 0) continue;
    const float* c = oc + static_cast<std::ptrdiff_t>(off[j]) * half;
    const float* s = os + static_cast<std::ptrdiff_t>(off[j]) * half;
    float* r = x + static_cast<std::ptrdiff_t>(j) * d;
    int i = 0;
    if (!interleaved)
      for (; i + kL <= half; i += kL) {
        const VF vcb = vload(cb + i), vsb = vload(sb + i), vc = vload(c + i), vs = vload(s + i);
        const VF ci = vsub(vmul(vcb, vc), vmul(vsb, vs)), si = vadd(vmul(vsb, vc), vmul(vcb, vs));
        const VF a = vload(r + i), b = vload(r + i + half);
        vstore(r + i, vsub(vmul(a, ci), vmul(b, si)));
        vstore(r + i + half, vadd(vmul(a, si), vmul(b, ci)));
      }
    for (; i < half; ++i) {
      const float ci = cb[i] * c[i] - sb[i] * s[i], si = sb[i] * c[i] + cb[i] * s[i];
      float& a = r[interleaved ? 2 * i : i];
      float& b = r[interleaved ? 2 * i + 1 : i + half];
      const float a0 = a, b0 = b;
      a = a0 * ci - b0 * si;
      b = a0 * si + b0 * ci;
    }
  }
}
