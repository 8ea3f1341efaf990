// Eigen bridge: the only kvslim header that includes Eigen. Used by calibration code
// (k-means codebooks, PCA) and by engines that keep weights in Eigen matrices. Never include
// it from ISA-flagged kernel files (see docs/architecture.md, "Dispatch").
#pragma once

#include <Eigen/Core>

#include "kvslim/tensor/tensor.h"

namespace kvslim {

using RowMatrixXf = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Map a rank-2 view (any strides) as an Eigen matrix without copying.
inline Eigen::Map<const RowMatrixXf, Eigen::Unaligned, Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>>
as_eigen(TensorView<const float> v) {
  using S = Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>;
  return {v.data(), static_cast<Eigen::Index>(v.dim(0)), static_cast<Eigen::Index>(v.dim(1)),
          S(static_cast<Eigen::Index>(v.stride(0)), static_cast<Eigen::Index>(v.stride(1)))};
}

/// Map a rank-2 mutable view as an Eigen matrix without copying.
inline Eigen::Map<RowMatrixXf, Eigen::Unaligned, Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>>
as_eigen(TensorView<float> v) {
  using S = Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>;
  return {v.data(), static_cast<Eigen::Index>(v.dim(0)), static_cast<Eigen::Index>(v.dim(1)),
          S(static_cast<Eigen::Index>(v.stride(0)), static_cast<Eigen::Index>(v.stride(1)))};
}

/// Copy an Eigen matrix into a new owning Tensor [rows][cols].
template <class Derived>
Tensor<float> to_tensor(const Eigen::MatrixBase<Derived>& m) {
  Tensor<float> t({static_cast<std::int64_t>(m.rows()), static_cast<std::int64_t>(m.cols())});
  for (Eigen::Index i = 0; i < m.rows(); ++i)
    for (Eigen::Index j = 0; j < m.cols(); ++j) t[i * m.cols() + j] = m(i, j);
  return t;
}

}  // namespace kvslim
