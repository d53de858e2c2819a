// Autograd for the mod_ext ops, in C++ (torch::autograd::Function registered for the
// Autograd dispatch key), and the version-counter bump of the in-place scatter
// (ADInplaceOrView key). Registering these in C++ instead of with
// torch.library.register_autograd from Python saves the Python round trip on every
// forward and backward call.
//
// Each Function's forward calls the op below the autograd keys (the backend kernel, or
// the fake kernel while tracing); each backward calls mod_ext ops through the dispatcher
// with autograd on, so gradients of gradients are recorded (double backward is exact:
// gather_tokens_backward is linear in its input and its adjoint is a gather; the scatter
// backward's adjoint is written out below). Gradients that no input needs are not
// computed (needs_input_grad).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "mod_ext/checks.h"

namespace mod_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// Dispatcher entry points (autograd included when the caller's grad mode is on).
Tensor gather_tokens(const Tensor& x, const Tensor& indices) {
  static const auto op = op_handle<Tensor(const Tensor&, const Tensor&)>("mod_ext::gather_tokens");
  return op.call(x, indices);
}

Tensor gather_tokens_backward(const Tensor& grad, const Tensor& indices, c10::SymInt seq_len) {
  static const auto op = op_handle<Tensor(const Tensor&, const Tensor&, c10::SymInt)>(
      "mod_ext::gather_tokens_backward");
  return op.call(grad, indices, std::move(seq_len));
}

using ScatterSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&);
using ScatterBwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                 const Tensor&);
using ScatterInplaceSig = void(Tensor&, const Tensor&, const Tensor&, const Tensor&);
using RouterSig = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&);

Tensor scatter_add_weighted(const Tensor& x, const Tensor& y, const Tensor& idx, const Tensor& w) {
  static const auto op = op_handle<ScatterSig>("mod_ext::scatter_add_weighted");
  return op.call(x, y, idx, w);
}

std::tuple<Tensor, Tensor> scatter_add_weighted_backward(const Tensor& g, const Tensor& y,
                                                         const Tensor& idx, const Tensor& w) {
  static const auto op = op_handle<ScatterBwdSig>("mod_ext::scatter_add_weighted_backward");
  return op.call(g, y, idx, w);
}

Tensor router_logits(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  static const auto op = op_handle<RouterSig>("mod_ext::router_logits");
  return op.call(x, weight, bias);
}

// The backward formulas call mod_ext ops through the dispatcher. With grad mode off
// inside backward (a plain .backward(), no create_graph) no graph of the gradient is
// recorded, so the call goes straight below the autograd keys: this skips the autograd
// kernel, which would otherwise build (and throw away) a Function node per call.
struct BelowAutogradUnlessGradMode {
  std::optional<at::AutoDispatchBelowADInplaceOrView> guard;
  BelowAutogradUnlessGradMode() {
    if (!at::GradMode::is_enabled()) guard.emplace();
  }
};

// True when the call records nothing for autograd: grad mode off, or no input that
// requires grad (nor a forward-mode tangent, so forward AD still reaches Function::apply
// and its "jvp is not implemented" error instead of dropping the tangent).
template <typename... Ts>
bool no_autograd_needed(const Ts&... ts) {
  if (!at::GradMode::is_enabled()) return !(... || (ts._fw_grad(/*level=*/0).defined()));
  return !(... || (ts.requires_grad() || ts._fw_grad(/*level=*/0).defined()));
}

at::ScalarType acc_type(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// ---------------------------------------------------------------------------
// gather_tokens(x, indices): grad_x = gather_tokens_backward(grad, indices, S).
// ---------------------------------------------------------------------------
struct GatherTokens : torch::autograd::Function<GatherTokens> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& indices) {
    ctx->saved_data["seq_len"] = x.sym_size(1);
    ctx->save_for_backward({indices});
    at::AutoDispatchBelowADInplaceOrView guard;
    return gather_tokens(x, indices);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    Tensor grad_x;
    if (ctx->needs_input_grad(0)) {
      const auto saved = ctx->get_saved_variables();
      BelowAutogradUnlessGradMode below;
      grad_x = gather_tokens_backward(grads[0], saved[0], ctx->saved_data["seq_len"].toSymInt());
    }
    return {grad_x, Tensor()};
  }
};

// gather_tokens_backward(grad_output, indices, S) is linear in grad_output; its adjoint
// is the gather.
struct GatherTokensBackward : torch::autograd::Function<GatherTokensBackward> {
  static Tensor forward(AutogradContext* ctx, const Tensor& grad, const Tensor& indices,
                        c10::SymInt seq_len) {
    ctx->save_for_backward({indices});
    at::AutoDispatchBelowADInplaceOrView guard;
    return gather_tokens_backward(grad, indices, std::move(seq_len));
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    Tensor grad_grad;
    if (ctx->needs_input_grad(0)) {
      BelowAutogradUnlessGradMode below;
      grad_grad = gather_tokens(grads[0], ctx->get_saved_variables()[0]);
    }
    return {grad_grad, Tensor(), Tensor()};
  }
};

// ---------------------------------------------------------------------------
// scatter_add_weighted(x, y, indices, weights): grad_x = grad (identity); grad_y and
// grad_weights from the fused backward op.
// ---------------------------------------------------------------------------
struct ScatterAddWeighted : torch::autograd::Function<ScatterAddWeighted> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& y,
                        const Tensor& indices, const Tensor& weights) {
    ctx->save_for_backward({y, indices, weights});
    at::AutoDispatchBelowADInplaceOrView guard;
    return scatter_add_weighted(x, y, indices, weights);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& g = grads[0];
    const bool need_x = ctx->needs_input_grad(0), need_y = ctx->needs_input_grad(1),
               need_w = ctx->needs_input_grad(3);
    Tensor grad_y, grad_w;
    if (need_y || need_w) {
      const auto saved = ctx->get_saved_variables();
      BelowAutogradUnlessGradMode below;
      auto [gy, gw] = scatter_add_weighted_backward(g, saved[0], saved[1], saved[2]);
      if (need_y) grad_y = std::move(gy);
      if (need_w) grad_w = std::move(gw);
    }
    return {need_x ? g : Tensor(), grad_y, Tensor(), grad_w};
  }
};

// Double backward of the scatter. With g = grad_output, g_sel = g[b, idx] and incoming
// gradients (a, c) of (grad_y = w * g_sel, grad_w = <g_sel, y>):
//   d/dg = scatter of (w * a + c * y) to idx,  d/dy = c * g_sel,  d/dw = <a, g_sel>.
struct ScatterAddWeightedBackward : torch::autograd::Function<ScatterAddWeightedBackward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& g, const Tensor& y,
                               const Tensor& indices, const Tensor& w) {
    ctx->save_for_backward({g, y, indices, w});
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [gy, gw] = scatter_add_weighted_backward(g, y, indices, w);
    return {gy, gw};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &g = saved[0], &y = saved[1], &indices = saved[2], &w = saved[3];
    const Tensor &a = grads[0], &c = grads[1];  // materialised: zeros when unused
    const bool need_g = ctx->needs_input_grad(0), need_y = ctx->needs_input_grad(1),
               need_w = ctx->needs_input_grad(3);
    const auto acc = acc_type(g);
    Tensor grad_g, grad_y, grad_w;
    if (need_g) {
      const auto upd = w.to(acc).unsqueeze(-1) * a.to(acc) + c.to(acc).unsqueeze(-1) * y.to(acc);
      grad_g = gather_tokens_backward(upd.to(g.scalar_type()), indices, g.sym_size(1));
    }
    if (need_y || need_w) {
      const auto g_sel = gather_tokens(g, indices).to(acc);  // (B, C, D)
      if (need_y) grad_y = (c.to(acc).unsqueeze(-1) * g_sel).to(y.scalar_type());
      if (need_w) grad_w = (a.to(acc) * g_sel).sum(-1).to(w.scalar_type());
    }
    return {grad_g, grad_y, Tensor(), grad_w};
  }
};

// ---------------------------------------------------------------------------
// router_logits(x, weight, bias): z = x @ weight (+ bias) in acc = float32 (float64).
//   grad_x = grad[..., None] * weight   (acc math, rounded once to x.dtype)
//   grad_weight = sum_{b,s} grad[b, s] * x[b, s, :]   (acc), grad_bias = sum grad
// With grad mode on (create_graph) every formula is made of differentiable ATen ops, so
// double backward is exact; otherwise the low-precision grad_x is written straight into
// an x.dtype tensor and grad_weight is summed over chunks of rows, so no float32 copy of
// a bfloat16 / float16 x is made.
// ---------------------------------------------------------------------------
constexpr int64_t kChunkElems = int64_t(1) << 20;  // x elements converted at a time

Tensor router_grad_weight(const Tensor& g, const Tensor& x, at::ScalarType acc) {
  // Symbolic sizes (torch.compile(dynamic=True), torch.export with a Dim) must stay
  // symbolic: reading them as ints would specialise the graph to one length, and the
  // chunk loop below cannot run over a symbolic length, so a traced graph gets the
  // one-product form (the compiler fuses the conversion).
  const bool symbolic = x.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
  if (x.scalar_type() == acc || symbolic) {  // float32 / float64: one matrix-vector product
    const c10::SymInt D = x.sym_size(2);
    return at::matmul(g.reshape({1, -1}).to(acc), x.reshape_symint({-1, D}).to(acc)).reshape_symint({D});
  }
  const int64_t B = x.size(0), S = x.size(1), D = x.size(2);
  Tensor sum = at::zeros({D}, x.options().dtype(acc));
  const int64_t rows = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(1, D));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t s0 = 0; s0 < S; s0 += rows) {
      const int64_t n = std::min(rows, S - s0);
      const Tensor xs = x.select(0, b).narrow(0, s0, n).to(acc);        // (n, D)
      const Tensor gs = g.select(0, b).narrow(0, s0, n).unsqueeze(0);   // (1, n)
      sum = at::GradMode::is_enabled() ? sum + at::matmul(gs, xs).reshape({D})
                                       : sum.addmv_(xs.t(), gs.reshape({n}));
    }
  }
  return sum;
}

struct RouterLogits : torch::autograd::Function<RouterLogits> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                        const std::optional<Tensor>& bias) {
    ctx->save_for_backward({x, weight});
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->saved_data["has_bias"] = has_bias;
    if (has_bias) {
      ctx->saved_data["bias_dtype"] = bias->scalar_type();
      ctx->saved_data["bias_shape"] = bias->sizes().vec();
    }
    at::AutoDispatchBelowADInplaceOrView guard;
    return router_logits(x, weight, bias);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1];
    const Tensor& g = grads[0];  // (B, S), acc dtype
    const auto acc = acc_type(x);
    Tensor grad_x, grad_w, grad_b;
    if (ctx->needs_input_grad(0)) {
      const auto w = weight.to(acc);
      if (x.scalar_type() == acc || at::GradMode::is_enabled()) {
        grad_x = (g.unsqueeze(-1) * w).to(x.scalar_type());
      } else {  // acc math, rounded once into an x.dtype tensor: no float32 (B, S, D) temporary
        grad_x = at::empty_symint(x.sym_sizes(), x.options());
        at::mul_out(grad_x, g.unsqueeze(-1), w);
      }
    }
    if (ctx->needs_input_grad(1)) grad_w = router_grad_weight(g, x, acc).to(weight.scalar_type());
    // bias is an autograd input (edge 2) only when it was given
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) {
      grad_b = g.sum()
                   .reshape(ctx->saved_data["bias_shape"].toIntVector())
                   .to(ctx->saved_data["bias_dtype"].toScalarType());
    }
    return {grad_x, grad_w, grad_b};
  }
};

// Each autograd kernel goes straight below autograd when nothing would be recorded
// (Function::apply builds a node even then, ~1 us).
Tensor gather_tokens_autograd(const Tensor& x, const Tensor& indices) {
  if (no_autograd_needed(x)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return gather_tokens(x, indices);
  }
  return GatherTokens::apply(x, indices);
}
Tensor gather_tokens_backward_autograd(const Tensor& grad, const Tensor& indices,
                                       c10::SymInt seq_len) {
  if (no_autograd_needed(grad)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return gather_tokens_backward(grad, indices, std::move(seq_len));
  }
  return GatherTokensBackward::apply(grad, indices, std::move(seq_len));
}
Tensor scatter_add_weighted_autograd(const Tensor& x, const Tensor& y, const Tensor& indices,
                                     const Tensor& weights) {
  if (no_autograd_needed(x, y, weights)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return scatter_add_weighted(x, y, indices, weights);
  }
  return ScatterAddWeighted::apply(x, y, indices, weights);
}
std::tuple<Tensor, Tensor> scatter_add_weighted_backward_autograd(const Tensor& g,
                                                                  const Tensor& y,
                                                                  const Tensor& indices,
                                                                  const Tensor& w) {
  if (no_autograd_needed(g, y, w)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return scatter_add_weighted_backward(g, y, indices, w);
  }
  auto out = ScatterAddWeightedBackward::apply(g, y, indices, w);
  return {out[0], out[1]};
}
Tensor router_logits_autograd(const Tensor& x, const Tensor& weight,
                              const std::optional<Tensor>& bias) {
  return RouterLogits::apply(x, weight, bias);
}

// ---------------------------------------------------------------------------
// scatter_add_weighted_ (in place, not differentiable). Autograd key: refuse to run when
// the call would need a gradient (grad mode on and an input requires grad), instead of
// silently cutting the graph; otherwise go on below autograd. ADInplaceOrView key: run
// the kernel, then bump x's version counter like PyTorch's in-place ops, so a graph that
// saved x before it was overwritten fails at backward with autograd's usual error.
// ---------------------------------------------------------------------------
void scatter_add_weighted__autograd(c10::DispatchKeySet ks, Tensor& x, const Tensor& y,
                                    const Tensor& indices, const Tensor& weights) {
  if (at::GradMode::is_enabled()) {
    MOD_CHECK(!x.requires_grad() && !y.requires_grad() && !weights.requires_grad(),
              "scatter_add_weighted_ is not differentiable, but grad mode is on and ",
              x.requires_grad() ? "x" : (y.requires_grad() ? "y" : "weights"),
              " requires grad; use scatter_add_weighted (out of place) for training, or call "
              "it under torch.no_grad() / torch.inference_mode()");
  }
  static const auto op = op_handle<ScatterInplaceSig>("mod_ext::scatter_add_weighted_");
  op.redispatch(ks & c10::after_autograd_keyset, x, y, indices, weights);
}

void scatter_add_weighted__inplace_or_view(c10::DispatchKeySet ks, Tensor& x, const Tensor& y,
                                           const Tensor& indices, const Tensor& weights) {
  static const auto op = op_handle<ScatterInplaceSig>("mod_ext::scatter_add_weighted_");
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatch(ks & c10::after_ADInplaceOrView_keyset, x, y, indices, weights);
  }
  torch::autograd::impl::bump_version(x);  // what VariableTypeUtils' increment_version does
}

}  // namespace

TORCH_LIBRARY_IMPL(mod_ext, Autograd, m) {
  m.impl("gather_tokens", &gather_tokens_autograd);
  m.impl("gather_tokens_backward", &gather_tokens_backward_autograd);
  m.impl("scatter_add_weighted", &scatter_add_weighted_autograd);
  m.impl("scatter_add_weighted_backward", &scatter_add_weighted_backward_autograd);
  m.impl("router_logits", &router_logits_autograd);
  m.impl("scatter_add_weighted_", &scatter_add_weighted__autograd);
}

TORCH_LIBRARY_IMPL(mod_ext, ADInplaceOrView, m) {
  m.impl("scatter_add_weighted_", &scatter_add_weighted__inplace_or_view);
}

}  // namespace mod_ext
