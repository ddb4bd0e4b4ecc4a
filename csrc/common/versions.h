// Version counters of the tensors an op writes in place. torch's own in-place
// ops bump them, and autograd compares them with the version it saved for
// backward: a weight perturbed after being saved then raises in backward
// instead of silently feeding the wrong value into the gradient. Every backend
// bumps the counters of what it writes (the (a!) arguments of schemas.h) after
// the argument checks and before the first write.
#pragma once

#include <ATen/ATen.h>

namespace fastperturb {

inline void bump_versions(at::TensorList ts) {
  for (const at::Tensor& t : ts) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace fastperturb
