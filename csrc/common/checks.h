// Argument checks of the C++ ops (CPU, CUDA and the test build's work-list
// executor): the rules of fastperturb/ops/validation.py, with the same exception types (TORCH_CHECK_VALUE ->
// ValueError, TORCH_CHECK_TYPE -> TypeError) and messages naming the argument and index. Every op runs its check_*
// function before it writes any tensor.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace fastperturb {
namespace checks {

// The Python spellings, so messages read the same from every backend.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kComplexHalf: return "torch.complex32";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline std::string layout_name(at::Layout l) {
  switch (l) {
    case at::kStrided: return "torch.strided";
    case at::kSparse: return "torch.sparse_coo";
    case at::kSparseCsr: return "torch.sparse_csr";
    case at::kSparseCsc: return "torch.sparse_csc";
    case at::kSparseBsr: return "torch.sparse_bsr";
    case at::kSparseBsc: return "torch.sparse_bsc";
    case at::kMkldnn: return "torch._mkldnn";
    default: {
      std::ostringstream os;
      os << l;
      return os.str();
    }
  }
}

// A Python tuple: (), (4,), (4, 3).
inline std::string tuple_str(at::IntArrayRef v) {
  std::ostringstream os;
  os << '(';
  for (size_t i = 0; i < v.size(); ++i) os << (i ? ", " : "") << v[i];
  if (v.size() == 1) os << ',';
  os << ')';
  return os.str();
}

// Python's repr of a float, close enough for messages (inf, nan, 2.0).
inline std::string float_str(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  std::ostringstream os;
  os << x;
  std::string s = os.str();
  if (s.find_first_of(".e") == std::string::npos) s += ".0";
  return s;
}

// Non-overlapping and dense: the elements fill one block of memory in some order.
inline bool is_dense(const at::Tensor& t) {
  if (t.is_contiguous()) return true;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of dims with size != 1
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) != 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t expected = 1;
  for (const auto& [stride, size] : dims) {
    if (stride != expected) return false;
    expected *= size;
  }
  return true;
}

inline void check_list(const char* name, at::TensorList ts) {
  for (size_t i = 0; i < ts.size(); ++i) {
    const at::Tensor& t = ts[i];
    TORCH_CHECK_TYPE(t.defined(), name, "[", i, "] is undefined; pass a tensor");
    TORCH_CHECK_TYPE(t.layout() == at::kStrided, name, "[", i, "] is a ", layout_name(t.layout()),
                     " tensor; only dense (strided) tensors are supported");
    TORCH_CHECK_TYPE(!t.is_complex(), name, "[", i, "] is complex (", dtype_name(t.scalar_type()),
                     "); only real floating tensors are supported");
    const auto st = t.scalar_type();
    TORCH_CHECK_TYPE(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble, name, "[", i,
                     "] has dtype ", dtype_name(st), "; supported: float16, bfloat16, float32, float64");
    TORCH_CHECK_VALUE(is_dense(t), name, "[", i, "] must be dense and non-overlapping (e.g. contiguous)");
  }
}

struct NamedList {
  const char* name;
  at::TensorList tensors;
};

inline void check_same_device(std::initializer_list<NamedList> lists) {
  bool have = false;
  at::Device device(at::kCPU);
  std::string first;
  for (const auto& l : lists) {
    for (size_t i = 0; i < l.tensors.size(); ++i) {
      const at::Device d = l.tensors[i].device();
      if (!have) {
        have = true;
        device = d;
        first = std::string(l.name) + "[" + std::to_string(i) + "]";
      } else {
        TORCH_CHECK_VALUE(d == device, l.name, "[", i, "] is on ", d, " but ", first, " is on ", device,
                          "; move them to one device");
      }
    }
  }
}

// Whether two tensors of shape `sizes` with these strides lay their elements out in the same order, so that one
// walk of each memory block meets the same elements: equal strides wherever a dimension's size is not 1 (a size-1
// dimension's stride is never used; autograd hands such gradients back as they come, e.g. a depthwise conv's
// weight gradient under channels_last input), any strides when there is at most one element.
inline bool same_memory_order(at::IntArrayRef sizes, at::IntArrayRef a, at::IntArrayRef b) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  if (numel <= 1) return true;
  for (size_t d = 0; d < sizes.size(); ++d)
    if (sizes[d] != 1 && a[d] != b[d]) return false;
  return true;
}

// `other` must mirror `ref` tensor by tensor (or be empty if optional).
inline void check_parallel(const char* ref_name, at::TensorList ref, const char* name, at::TensorList other,
                           bool optional = false) {
  if (optional && other.empty()) return;
  TORCH_CHECK_VALUE(other.size() == ref.size(), name, " has ", other.size(), " tensors but ", ref_name, " has ",
                    ref.size(), "; the lists must be parallel");
  for (size_t i = 0; i < ref.size(); ++i) {
    const at::Tensor& a = ref[i];
    const at::Tensor& b = other[i];
    TORCH_CHECK_VALUE(b.sizes() == a.sizes(), name, "[", i, "] has shape ", tuple_str(b.sizes()), " but ", ref_name,
                      "[", i, "] has shape ", tuple_str(a.sizes()));
    TORCH_CHECK_TYPE(b.scalar_type() == a.scalar_type(), name, "[", i, "] has dtype ", dtype_name(b.scalar_type()),
                     " but ", ref_name, "[", i, "] has dtype ", dtype_name(a.scalar_type()));
    TORCH_CHECK_VALUE(same_memory_order(a.sizes(), a.strides(), b.strides()), name, "[", i, "] has strides ",
                      tuple_str(b.strides()), " but ", ref_name, "[", i, "] has strides ", tuple_str(a.strides()),
                      "; use the same memory format");
  }
}

inline void check_coef(const char* name, const at::Tensor& coef, size_t n, at::TensorList like) {
  TORCH_CHECK_TYPE(coef.defined(), name, " must be a float32 tensor of shape [", n, "], got None");
  TORCH_CHECK_VALUE(coef.layout() == at::kStrided && coef.scalar_type() == at::kFloat && coef.dim() == 1 &&
                        static_cast<size_t>(coef.numel()) == n,
                    name, " must be a float32 tensor of shape [", n, "], got ", dtype_name(coef.scalar_type()), " ",
                    tuple_str(coef.sizes()));
  if (!like.empty()) {
    TORCH_CHECK_VALUE(coef.device() == like[0].device(), name, " is on ", coef.device(), " but the tensors are on ",
                      like[0].device());
  }
}

inline void check_finite(const char* name, double value) {
  TORCH_CHECK_VALUE(std::isfinite(value), name, " must be finite, got ", float_str(value));
}

// No tensor of a written list shares memory with any other tensor of the call (read or written); empty and
// meta tensors have no memory to share. The tensors are on one device (check_same_device runs first). `alias_ok`
// names a (written, read) pair of lists whose tensors at the same index may be one and the same memory (the fused
// steps' backups[i] is params[i] where a tensor was not perturbed); any other overlap is refused. Sorted by
// start (then list, then index: written lists come first), a span overlaps an earlier one iff that one ends after
// it starts: the sweep keeps the furthest-reaching earlier span overall (for written spans) and among the written
// ones (for read spans). A span skipped as the allowed twin has the same bytes as its partner, so any third span
// overlapping it overlaps the partner too and is found there. This runs on every call of a plain op: plain spans,
// one sort, labels built only for the message (named as fastperturb/ops/validation.py names them).
// `lists`: the written lists first (`n_written` of them), then the read ones.
inline void check_no_overlap(const std::vector<const NamedList*>& lists, size_t n_written,
                             std::pair<const char*, const char*> alias_ok = {nullptr, nullptr}) {
  struct Span {
    uintptr_t start, end;
    uint32_t list, index;  // list: into `lists`
  };
  size_t total = 0;
  for (const NamedList* l : lists) total += l->tensors.size();
  std::vector<Span> spans;
  spans.reserve(total);
  int64_t twin_w = -1, twin_r = -1;
  for (size_t k = 0; k < lists.size(); ++k) {
    if (alias_ok.first != nullptr && std::strcmp(lists[k]->name, alias_ok.first) == 0) twin_w = static_cast<int64_t>(k);
    if (alias_ok.second != nullptr && std::strcmp(lists[k]->name, alias_ok.second) == 0)
      twin_r = static_cast<int64_t>(k);
    const at::TensorList ts = lists[k]->tensors;
    for (size_t i = 0; i < ts.size(); ++i) {
      const at::Tensor& t = ts[i];
      if (t.numel() == 0 || t.device().is_meta()) continue;
      const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
      const auto bytes = static_cast<uintptr_t>(t.numel()) * static_cast<uintptr_t>(t.element_size());
      spans.push_back({start, start + bytes, static_cast<uint32_t>(k), static_cast<uint32_t>(i)});
    }
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    if (a.start != b.start) return a.start < b.start;
    return a.list != b.list ? a.list < b.list : a.index < b.index;
  });
  auto label = [&](const Span& s) { return std::string(lists[s.list]->name) + "[" + std::to_string(s.index) + "]"; };
  auto twins = [&](const Span& a, const Span& b) {
    const int64_t la = a.list, lb = b.list;
    const bool pair = (la == twin_w && lb == twin_r) || (la == twin_r && lb == twin_w);
    return pair && a.index == b.index && a.start == b.start && a.end == b.end;
  };
  const Span* reach_any = nullptr;
  const Span* reach_written = nullptr;
  for (const Span& s : spans) {
    const bool s_written = s.list < n_written;
    const Span* other = s_written ? reach_any : reach_written;
    if (other != nullptr && other->end > s.start && !twins(s, *other)) {
      const std::string w = s_written ? label(s) : label(*other);
      const std::string r = s_written ? label(*other) : label(s);
      TORCH_CHECK_VALUE(false, w, " shares memory with ", r, "; ", w.substr(0, w.find('[')),
                        " is written in place, so pass tensors that do not overlap (e.g. a clone)");
    }
    if (reach_any == nullptr || s.end > reach_any->end) reach_any = &s;
    if (s_written && (reach_written == nullptr || s.end > reach_written->end)) reach_written = &s;
  }
}

inline void check_no_overlap(std::initializer_list<NamedList> written, std::initializer_list<NamedList> read,
                             std::pair<const char*, const char*> alias_ok = {nullptr, nullptr}) {
  std::vector<const NamedList*> lists;
  for (const auto& l : written) lists.push_back(&l);
  for (const auto& l : read) lists.push_back(&l);
  check_no_overlap(lists, written.size(), alias_ok);
}

// One check per op, mirroring fastperturb/ops/validation.py.

inline void check_norms(at::TensorList tensors, double ord) {
  check_list("tensors", tensors);
  check_same_device({{"tensors", tensors}});
  TORCH_CHECK_VALUE(ord == 2.0 || ord == INFINITY, "ord must be 2 or inf, got ", float_str(ord));
}

inline void check_grad_stats(at::TensorList grads, at::TensorList accum, at::TensorList params, at::TensorList backups,
                             double accum_weight, double adaptive_eta) {
  check_list("grads", grads);
  check_list("accum", accum);
  check_list("params", params);
  check_list("backups", backups);
  check_parallel("grads", grads, "accum", accum, true);
  check_parallel("grads", grads, "params", params, true);
  check_parallel("grads", grads, "backups", backups, true);
  TORCH_CHECK_VALUE(backups.empty() || !params.empty(),
                    "backups given without params: the perturbation d = params - backups needs both");
  // (an empty list of grads needs nothing: there is no layer to scale or perturb)
  TORCH_CHECK_VALUE(!(adaptive_eta >= 0) || grads.empty() || !params.empty(),
                    "adaptive_eta >= 0 needs params (the adaptive scale is |params| + eta)");
  check_same_device({{"grads", grads}, {"accum", accum}, {"params", params}, {"backups", backups}});
  check_finite("accum_weight", accum_weight);
  check_finite("adaptive_eta", adaptive_eta);
  check_no_overlap({{"accum", accum}}, {{"grads", grads}, {"params", params}, {"backups", backups}});
}

inline void check_ascent_step(at::TensorList params, at::TensorList grads, at::TensorList backups,
                              const at::Tensor& step_coef, const at::Tensor& proj, c10::string_view norm,
                              double adaptive_eta, bool first, bool zero_grads) {
  check_list("params", params);
  check_list("grads", grads);
  check_list("backups", backups);
  check_parallel("params", params, "grads", grads);
  check_parallel("params", params, "backups", backups);
  check_same_device({{"params", params}, {"grads", grads}, {"backups", backups}});
  check_coef("step_coef", step_coef, params.size(), params);
  check_coef("proj", proj, params.size(), params);
  TORCH_CHECK_VALUE(norm == "l2" || norm == "linf", "norm must be 'l2' or 'linf', got '", std::string(norm), "'");
  check_finite("adaptive_eta", adaptive_eta);
  // backups is written by the first step (the old weights) and read after; grads is cleared by zero_grads.
  const NamedList p{"params", params}, g{"grads", grads}, b{"backups", backups};
  if (first && zero_grads) {
    check_no_overlap({p, g, b}, {});
  } else if (first) {
    check_no_overlap({p, b}, {g});
  } else if (zero_grads) {
    check_no_overlap({p, g}, {b});
  } else {
    check_no_overlap({p}, {g, b});
  }
}

inline void check_restore(at::TensorList params, at::TensorList backups) {
  check_list("params", params);
  check_list("backups", backups);
  check_parallel("params", params, "backups", backups);
  check_same_device({{"params", params}, {"backups", backups}});
  check_no_overlap({{"params", params}}, {{"backups", backups}});
}

inline void check_combine_grads(at::TensorList grads, at::TensorList accum, double weight) {
  check_list("grads", grads);
  check_list("accum", accum);
  check_parallel("grads", grads, "accum", accum);
  check_same_device({{"grads", grads}, {"accum", accum}});
  check_finite("weight", weight);
  check_no_overlap({{"grads", grads}}, {{"accum", accum}});
}

// The SAM-family ops (dot_stats, lincomb_, ema_residual_).

inline void check_coef_rows(const char* name, const at::Tensor& coef, size_t n, int64_t cols, at::TensorList like) {
  TORCH_CHECK_TYPE(coef.defined(), name, " must be a float32 tensor of shape [", n, ", ", cols, "], got None");
  TORCH_CHECK_VALUE(coef.layout() == at::kStrided && coef.scalar_type() == at::kFloat && coef.dim() == 2 &&
                        static_cast<size_t>(coef.size(0)) == n && coef.size(1) == cols,
                    name, " must be a float32 tensor of shape [", n, ", ", cols, "], got ",
                    dtype_name(coef.scalar_type()), " ", tuple_str(coef.sizes()));
  if (!like.empty()) {
    TORCH_CHECK_VALUE(coef.device() == like[0].device(), name, " is on ", coef.device(), " but the tensors are on ",
                      like[0].device());
  }
}

inline void check_dot_stats(at::TensorList x, at::TensorList y) {
  check_list("x", x);
  check_list("y", y);
  check_parallel("x", x, "y", y);
  check_same_device({{"x", x}, {"y", y}});
}

inline void check_lincomb(at::TensorList out, at::TensorList x, at::TensorList y, const at::Tensor& coef) {
  check_list("out", out);
  check_list("x", x);
  check_list("y", y);
  check_parallel("out", out, "x", x);
  check_parallel("out", out, "y", y, true);
  check_same_device({{"out", out}, {"x", x}, {"y", y}});
  check_coef_rows("coef", coef, out.size(), 3, out);
  check_no_overlap({{"out", out}}, {{"x", x}, {"y", y}});
}

inline void check_ema_residual(at::TensorList grads, at::TensorList ema, at::TensorList params, double sigma,
                               double lmbda, double grad_scale, double adaptive_eta) {
  check_list("grads", grads);
  check_list("ema", ema);
  check_list("params", params);
  check_parallel("grads", grads, "ema", ema);
  check_parallel("grads", grads, "params", params, true);
  TORCH_CHECK_VALUE(!(adaptive_eta >= 0) || grads.empty() || !params.empty(),
                    "adaptive_eta >= 0 needs params (the adaptive scale is |params| + eta)");
  check_same_device({{"grads", grads}, {"ema", ema}, {"params", params}});
  check_finite("sigma", sigma);
  check_finite("lmbda", lmbda);
  check_finite("grad_scale", grad_scale);
  check_finite("adaptive_eta", adaptive_eta);
  check_no_overlap({{"grads", grads}, {"ema", ema}}, {{"params", params}});
}

// The fused restore + base steps: params, backups and grads parallel; the state lists parallel or
// (where allowed) empty; hyperparameters finite.
inline void check_step_lists(at::TensorList params, at::TensorList backups, at::TensorList grads) {
  check_list("params", params);
  check_list("backups", backups);
  check_list("grads", grads);
  check_parallel("params", params, "backups", backups);
  check_parallel("params", params, "grads", grads);
}

inline void check_restore_sgd_step(at::TensorList params, at::TensorList backups, at::TensorList grads,
                                   at::TensorList momentum_buffers, double lr, double weight_decay, double momentum,
                                   double dampening) {
  check_step_lists(params, backups, grads);
  check_list("momentum_buffers", momentum_buffers);
  if (momentum != 0.0) {
    check_parallel("params", params, "momentum_buffers", momentum_buffers);
  } else {
    TORCH_CHECK_VALUE(momentum_buffers.empty(), "momentum_buffers must be empty when momentum is 0, got ",
                      momentum_buffers.size(), " tensors");
  }
  check_same_device(
      {{"params", params}, {"backups", backups}, {"grads", grads}, {"momentum_buffers", momentum_buffers}});
  check_finite("lr", lr);
  check_finite("weight_decay", weight_decay);
  check_finite("momentum", momentum);
  check_finite("dampening", dampening);
  check_no_overlap({{"params", params}, {"momentum_buffers", momentum_buffers}},
                   {{"backups", backups}, {"grads", grads}}, {"params", "backups"});
}

inline void check_restore_adam_step(at::TensorList params, at::TensorList backups, at::TensorList grads,
                                    at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                                    double lr, double beta1, double beta2, double eps, double step,
                                    double weight_decay) {
  check_step_lists(params, backups, grads);
  check_list("exp_avgs", exp_avgs);
  check_list("exp_avg_sqs", exp_avg_sqs);
  check_list("max_exp_avg_sqs", max_exp_avg_sqs);
  check_parallel("params", params, "exp_avgs", exp_avgs);
  check_parallel("params", params, "exp_avg_sqs", exp_avg_sqs);
  check_parallel("params", params, "max_exp_avg_sqs", max_exp_avg_sqs, true);
  check_same_device({{"params", params},
                     {"backups", backups},
                     {"grads", grads},
                     {"exp_avgs", exp_avgs},
                     {"exp_avg_sqs", exp_avg_sqs},
                     {"max_exp_avg_sqs", max_exp_avg_sqs}});
  check_finite("lr", lr);
  check_finite("beta1", beta1);
  check_finite("beta2", beta2);
  check_finite("eps", eps);
  check_finite("weight_decay", weight_decay);
  TORCH_CHECK_VALUE(std::isfinite(step) && step >= 1.0, "step must be a finite count >= 1 (after its increment), got ",
                    float_str(step));
  // torch.optim.Adam's range: 1 - beta^step of a negative beta is 0 or a root of a negative number at some steps
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0 && beta2 >= 0.0 && beta2 < 1.0,
                    "beta1 and beta2 must be in [0, 1) (the bias corrections divide by 1 - beta^step), got ",
                    float_str(beta1), " and ", float_str(beta2));
  check_no_overlap(
      {{"params", params}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}, {"max_exp_avg_sqs", max_exp_avg_sqs}},
      {{"backups", backups}, {"grads", grads}}, {"params", "backups"});
}

// ascent_coefficients: stats float32/float64 [n, 3] (grad_stats_'s rows), step_size and radius float64 [n], all dense
// and on stats's device.
inline void check_ascent_coefficients(const at::Tensor& stats, const at::Tensor& step_size, const at::Tensor& radius) {
  TORCH_CHECK_TYPE(stats.dtype() == at::kFloat || stats.dtype() == at::kDouble,
                   "ascent_coefficients: stats must be torch.float32 or torch.float64, got ",
                   dtype_name(stats.scalar_type()));
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(1) == 3,
                    "ascent_coefficients: stats must have shape (n, 3) (grad_stats_'s rows), got ",
                    tuple_str(stats.sizes()));
  TORCH_CHECK_VALUE(stats.layout() == at::kStrided, "ascent_coefficients: stats must be a dense tensor");
  const int64_t n = stats.size(0);
  auto check_vector = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK_TYPE(t.dtype() == at::kDouble, "ascent_coefficients: ", name, " must be torch.float64, got ",
                     dtype_name(t.scalar_type()));
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, "ascent_coefficients: ", name, " must have shape (", n,
                      ",) (one value per row of stats), got ", tuple_str(t.sizes()));
    TORCH_CHECK_VALUE(t.layout() == at::kStrided && t.device() == stats.device(), "ascent_coefficients: ", name,
                      " must be a dense tensor on stats's device (", stats.device(), "), got ", t.device());
  };
  check_vector("step_size", step_size);
  check_vector("radius", radius);
}

}  // namespace checks
}  // namespace fastperturb
