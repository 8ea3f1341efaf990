// TensorView strides (both engine layouts map to the same logical element), Tensor ownership
// and 64-byte alignment, and the Eigen bridge (maps without copying, honours strides).
#include <gtest/gtest.h>

#include <cstdint>

#include "kvslim/tensor/eigen.h"
#include "kvslim/tensor/tensor.h"

using namespace kvslim;

TEST(Tensor, LayoutsAddressTheSameLogicalElement) {
  const int H = 3, T = 5, D = 4;
  std::vector<float> htd(H * T * D), thd(H * T * D);
  for (int h = 0; h < H; ++h)
    for (int t = 0; t < T; ++t)
      for (int d = 0; d < D; ++d) {
        const float val = static_cast<float>(h * 100 + t * 10 + d);
        htd[(h * T + t) * D + d] = val;
        thd[(t * H + h) * D + d] = val;
      }
  auto a = TensorView<const float>::heads_tokens_dim(htd.data(), H, T, D);
  auto b = TensorView<const float>::tokens_heads_dim(thd.data(), T, H, D);
  ASSERT_EQ(a.dim(0), b.dim(0));
  ASSERT_EQ(a.dim(1), b.dim(1));
  for (int h = 0; h < H; ++h)
    for (int t = 0; t < T; ++t) {
      for (int d = 0; d < D; ++d) EXPECT_EQ(a(h, t, d), b(h, t, d));
      EXPECT_EQ(b.row(h, t)[2], static_cast<float>(h * 100 + t * 10 + 2));
    }
  EXPECT_EQ(b.layout().describe(), "[3, 5, 4] strides [4, 12, 1]");
}

TEST(Tensor, OwningIsAlignedZeroedAndCopyable) {
  Tensor<float> t({7, 13});
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(t.data()) % 64, 0u);
  EXPECT_EQ(t.numel(), 91);
  for (int i = 0; i < 91; ++i) EXPECT_EQ(t[i], 0.0f);
  t[5] = 3.0f;
  Tensor<float> c = t;
  EXPECT_EQ(c[5], 3.0f);
  EXPECT_NE(c.data(), t.data());
  Tensor<float> m = std::move(c);
  EXPECT_EQ(m[5], 3.0f);
  EXPECT_EQ(c.data(), nullptr);
  TensorView<const float> v = m.view();
  EXPECT_EQ(v(0, 5), 3.0f);
}

TEST(Tensor, EigenBridgeMapsStridedViews) {
  std::vector<float> buf(4 * 6);
  for (int i = 0; i < 24; ++i) buf[i] = static_cast<float>(i);
  // Every other column of a 4x6 matrix: shape [4][3], strides [6][2].
  Layout l;
  l.rank = 2;
  l.shape = {4, 3, 0, 0};
  l.strides = {6, 2, 0, 0};
  auto m = as_eigen(TensorView<const float>(buf.data(), l));
  EXPECT_EQ(m.rows(), 4);
  EXPECT_EQ(m.cols(), 3);
  EXPECT_EQ(m(2, 1), 14.0f);
  auto t = to_tensor(m * 2.0f);
  EXPECT_EQ(t[2 * 3 + 1], 28.0f);
  auto w = as_eigen(TensorView<float>(buf.data(), l));
  w(0, 0) = -1.0f;
  EXPECT_EQ(buf[0], -1.0f);
}
