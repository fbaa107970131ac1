// The LSTM recurrence over one window with each time step's element-wise work in one C++ loop.
//
// An experiment for benchmarks/cpp_recurrence.py, not used by the notebooks. The notebook's
// LSTMRecurrence makes one matrix product and ten element-wise PyTorch calls per forward step,
// each with its own call overhead on matrices of 64 rows. Here the products stay PyTorch
// operators (oneDNN's, as in the notebook, or addmm) and the rest of a step is a single pass
// over the batch. So its timing shows how much of the gap to torch.nn.LSTM the element-wise calls
// cause.
//
// Layouts as in LSTMRecurrence: gates are (T, B, 4H) in the order i, f, g, o, and weight_hh (4H, H).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace {

// x W^T + other through oneDNN's linear operator, the one the notebook's linear() calls.
at::Tensor onednn_linear_add(const at::Tensor& x, const at::Tensor& other, const at::Tensor& weight) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "binary")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, c10::string_view)>();
  return op.call(x, other, weight, std::nullopt, "add");
}

// -ffast-math lets the compiler assume that no value is infinite, but exp overflows float32 above
// 88.7. Without the clamp, pre-activations of a few hundred gave NaN hidden states. Within +-88 the
// sigmoid is already 0 or 1 to float32 precision, apart from subnormal values.
inline float sigmoid(float x) {
  x = x < -88.f ? -88.f : (x > 88.f ? 88.f : x);
  return 1.f / (1.f + std::exp(-x));
}

inline float tanh_via_sigmoid(float x) { return 2.f * sigmoid(2.f * x) - 1.f; }

void check_float_cpu(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.device().is_cpu() && tensor.scalar_type() == at::kFloat && tensor.is_contiguous(),
              name, " must be a contiguous float32 CPU tensor, got ", tensor.scalar_type(), " on ",
              tensor.device(), tensor.is_contiguous() ? "" : " (not contiguous)");
}

// The loops below read and write through raw pointers, so every shape is checked first.
void check_shape(const at::Tensor& tensor, const char* name, const std::vector<int64_t>& expected) {
  TORCH_CHECK(tensor.sizes() == at::IntArrayRef(expected), name, " must have shape ", at::IntArrayRef(expected),
              ", got ", tensor.sizes());
}

// Return (steps, batch, hidden) from gates (T, B, 4H) and weight_hh (4H, H), after checking both.
std::tuple<int64_t, int64_t, int64_t> window_sizes(const at::Tensor& gates, const at::Tensor& weight_hh) {
  TORCH_CHECK(gates.dim() == 3 && weight_hh.dim() == 2, "gates must be (T, B, 4H) and weight_hh (4H, H), got ",
              gates.sizes(), " and ", weight_hh.sizes());
  const int64_t steps = gates.size(0), batch = gates.size(1), hidden = weight_hh.size(1);
  TORCH_CHECK(steps >= 1 && batch >= 1 && hidden >= 1, "the window needs at least one time step, batch row and ",
              "hidden unit, got gates ", gates.sizes(), " and weight_hh ", weight_hh.sizes());
  check_shape(weight_hh, "weight_hh", {4 * hidden, hidden});
  check_shape(gates, "gates", {steps, batch, 4 * hidden});
  return {steps, batch, hidden};
}

constexpr int64_t kRowsPerTask = 16;  // rows of the batch per parallel task

}  // namespace

// gates contains x2h(x_t) plus both biases for every step and is overwritten with the activations
// i, f, g, o. `packed` is weight_hh in oneDNN's layout (the notebook's prepack) or undefined, in
// which case each step calls addmm. Returns hs (T+1, B, H) and cells (T+1, B, H), both from
// step 0, and tanh(c_t) (T, B, H).
std::vector<at::Tensor> forward(at::Tensor gates, at::Tensor weight_hh, at::Tensor h0, at::Tensor c0,
                                std::optional<at::Tensor> packed) {
  for (auto [tensor, name] : {std::pair{gates, "gates"}, {weight_hh, "weight_hh"}, {h0, "h0"}, {c0, "c0"}}) {
    check_float_cpu(tensor, name);
  }
  int64_t steps, batch, hidden;  // plain variables, because lambdas capture structured bindings only from C++20
  std::tie(steps, batch, hidden) = window_sizes(gates, weight_hh);
  check_shape(h0, "h0", {batch, hidden});
  check_shape(c0, "c0", {batch, hidden});
  auto hs = at::empty({steps + 1, batch, hidden}, gates.options());
  auto cells = at::empty({steps + 1, batch, hidden}, gates.options());
  auto tanh_cells = at::empty({steps, batch, hidden}, gates.options());
  hs[0].copy_(h0);
  cells[0].copy_(c0);
  const bool use_packed = packed.has_value() && packed->defined();
  if (use_packed) {
    check_shape(*packed, "packed (weight_hh in oneDNN's layout)", {4 * hidden, hidden});
  }
  const auto weight_t = weight_hh.t();
  for (int64_t t = 0; t < steps; ++t) {
    auto gates_t = gates[t];
    at::Tensor pre;  // x2h(x_t) + biases + h_{t-1} W_hh^T
    if (use_packed) {
      pre = onednn_linear_add(hs[t], gates_t, *packed);
    } else {
      pre = at::addmm_out(gates_t, gates_t, hs[t], weight_t);
    }
    const float* pre_p = pre.data_ptr<float>();
    float* gates_p = gates_t.data_ptr<float>();
    const float* c_prev = cells[t].data_ptr<float>();
    float* c_next = cells[t + 1].data_ptr<float>();
    float* tanh_c = tanh_cells[t].data_ptr<float>();
    float* h_next = hs[t + 1].data_ptr<float>();
    at::parallel_for(0, batch, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const float* z = pre_p + b * 4 * hidden;
        float* a = gates_p + b * 4 * hidden;
        const int64_t row = b * hidden;
#pragma omp simd
        for (int64_t j = 0; j < hidden; ++j) {
          const float i = sigmoid(z[j]), f = sigmoid(z[hidden + j]);
          const float g = tanh_via_sigmoid(z[2 * hidden + j]), o = sigmoid(z[3 * hidden + j]);
          const float c = f * c_prev[row + j] + i * g;
          const float tc = tanh_via_sigmoid(c);
          a[j] = i;
          a[hidden + j] = f;
          a[2 * hidden + j] = g;
          a[3 * hidden + j] = o;
          c_next[row + j] = c;
          tanh_c[row + j] = tc;
          h_next[row + j] = o * tc;
        }
      }
    });
  }
  return {hs, cells, tanh_cells};
}

// The backward loop: from the activations, cells and tanh(c_t) of forward() and the gradients of
// hs (T, B, H), h_T and c_T, return the gradient of the gates' pre-activations (T, B, 4H), of h0
// and of c0. `onednn` sends dz_t W_hh to oneDNN's operator, as the notebook's linear() does.
std::vector<at::Tensor> backward(at::Tensor gates, at::Tensor cells, at::Tensor tanh_cells, at::Tensor weight_hh,
                                 at::Tensor grad_hs, at::Tensor grad_h_last, at::Tensor grad_c_last, bool onednn) {
  for (auto [tensor, name] : {std::pair{gates, "gates"}, {cells, "cells"}, {tanh_cells, "tanh_cells"},
                              {weight_hh, "weight_hh"}, {grad_hs, "grad_hs"}, {grad_h_last, "grad_h_last"},
                              {grad_c_last, "grad_c_last"}}) {
    check_float_cpu(tensor, name);
  }
  int64_t steps, batch, hidden;  // plain variables, because lambdas capture structured bindings only from C++20
  std::tie(steps, batch, hidden) = window_sizes(gates, weight_hh);
  check_shape(cells, "cells", {steps + 1, batch, hidden});
  check_shape(tanh_cells, "tanh_cells", {steps, batch, hidden});
  check_shape(grad_hs, "grad_hs", {steps, batch, hidden});
  check_shape(grad_h_last, "grad_h_last", {batch, hidden});
  check_shape(grad_c_last, "grad_c_last", {batch, hidden});
  auto grad_gates = at::empty_like(gates);
  auto grad_c = grad_c_last.clone();
  const auto weight_hh_t = weight_hh.t();  // (H, 4H): linear() computes x W^T
  at::Tensor grad_h;
  for (int64_t t = steps - 1; t >= 0; --t) {
    if (t == steps - 1) {
      grad_h = grad_hs[t] + grad_h_last;
    } else if (onednn) {
      grad_h = onednn_linear_add(grad_gates[t + 1], grad_hs[t], weight_hh_t);  // + dz_{t+1} W_hh
    } else {
      grad_h = at::addmm(grad_hs[t], grad_gates[t + 1], weight_hh);
    }
    const float* a = gates[t].data_ptr<float>();
    const float* c_prev = cells[t].data_ptr<float>();
    const float* tanh_c = tanh_cells[t].data_ptr<float>();
    const float* dh = grad_h.data_ptr<float>();
    float* dc = grad_c.data_ptr<float>();
    float* dz = grad_gates[t].data_ptr<float>();
    at::parallel_for(0, batch, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const float* act = a + b * 4 * hidden;
        float* d = dz + b * 4 * hidden;
        const int64_t row = b * hidden;
#pragma omp simd
        for (int64_t j = 0; j < hidden; ++j) {
          const float i = act[j], f = act[hidden + j], g = act[2 * hidden + j], o = act[3 * hidden + j];
          const float tc = tanh_c[row + j];
          const float grad_cell = dc[row + j] + dh[row + j] * o * (1.f - tc * tc);  // dL/dc_t
          d[j] = grad_cell * g * i * (1.f - i);
          d[hidden + j] = grad_cell * c_prev[row + j] * f * (1.f - f);
          d[2 * hidden + j] = grad_cell * i * (1.f - g * g);
          d[3 * hidden + j] = dh[row + j] * tc * o * (1.f - o);
          dc[row + j] = grad_cell * f;  // carried to step t-1
        }
      }
    });
  }
  auto grad_h0 = at::mm(grad_gates[0], weight_hh);
  return {grad_gates, grad_h0, grad_c};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "the forward loop over a window");
  m.def("backward", &backward, "the backward loop over a window");
}
