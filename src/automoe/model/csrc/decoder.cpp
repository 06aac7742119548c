// The compiled decoder (model/compiled.py): beam search over a compact model in its CPU
// serving layout, the incremental step and the beam bookkeeping in one C++ loop.
//
// The products are the serving layout's own kernels (model/inference.py), called through
// the dispatcher with the same choice: fp32 PyTorch's default GEMM up to `small` input
// elements, else oneDNN on the packed weight; int8 FBGEMM's dynamic int8 product. What
// Python ran as ~560 operator calls per step (attention, layer norms, residuals, cache
// writes and reorders, log-softmax, top-k, finished hypotheses) are loops over the rows
// here. The architecture is data: one Engine per model, built from its weights in
// milliseconds; nothing is compiled per arch.
//
// A step, for N = batch x beam rows (d: embedding width, qkv: attention width):
//     x = E'[token] + P[t]                                         (N, d)
//     per decoder layer (post-LN; pre-LN normalises each sublayer's input instead):
//         q, k, v = W_qkv x;  kv[layer, row, t] = k, v             (N, 3 qkv)
//         x = LN(x + W_o attend(q, kv[layer, row, :t + 1]))
//         x = LN(x + W_o' attend(W_q' x, encoder keys/values))
//         x = LN(x + FFN(x))      dense: fc2(relu(fc1 x)); MoE: softmax router, top-k, experts
//     logits = W_emb x                                              (N, V)
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

namespace {

using at::Tensor;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// One serving-layout product: PackedLinear or Int8Linear (model/inference.py).
struct Linear {
  Tensor weight, packed, bias;  // fp32: the weight as it is (default GEMM), packed for oneDNN
  int64_t small = 0;            // up to this many input elements the default GEMM runs
  bool relu = false;            // fused activation
  bool int8 = false;
  c10::IValue int8_packed;      // FBGEMM's packed int8 weight (per-channel scales)
  bool reduce_range = true;     // the input in 7 bits (CPUs whose int8 kernel sums in int16)

  Tensor operator()(const Tensor& x) const {
    if (int8) {
      static const auto plain = c10::Dispatcher::singleton().findSchemaOrThrow("quantized::linear_dynamic", "");
      static const auto with_relu =
          c10::Dispatcher::singleton().findSchemaOrThrow("quantized::linear_relu_dynamic", "");
      torch::jit::Stack stack{x, int8_packed, reduce_range};
      (relu ? with_relu : plain).callBoxed(&stack);
      return stack[0].toTensor();
    }
    if (x.numel() <= small) {
      Tensor y = at::linear(x, weight, bias);
      return relu ? y.relu_() : y;
    }
    static const auto onednn = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
    torch::jit::Stack stack{x,
                            packed,
                            bias.defined() ? c10::IValue(bias) : c10::IValue(),
                            std::string(relu ? "relu" : "none"),
                            c10::List<std::optional<at::Scalar>>(),
                            std::string("")};
    onednn.callBoxed(&stack);
    return stack[0].toTensor();
  }
};

struct Norm {
  Tensor weight, bias;
  double eps = 1e-5;
};

struct Layer {
  Linear qkv, self_out, ende_q, ende_out;
  int64_t self_heads = 1, ende_heads = 1;
  Norm norms[3];  // self-attention, encoder-decoder attention, FFN
  std::vector<Linear> fc1, fc2;  // one expert: the dense FFN
  Tensor router;  // (n, d) fp32; undefined for a dense layer
};

// LN over each row of x (N, d) into out (may alias x).
void layer_norm(const float* x, float* out, int64_t rows, int64_t d, const Norm& p) {
  const float* w = p.weight.data_ptr<float>();
  const float* b = p.bias.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    float* yr = out + r * d;
    double mean = 0, var = 0;
    for (int64_t j = 0; j < d; ++j) mean += xr[j];
    mean /= d;
    for (int64_t j = 0; j < d; ++j) var += (xr[j] - mean) * (xr[j] - mean);
    const float inv = static_cast<float>(1.0 / std::sqrt(var / d + p.eps));
    const float m = static_cast<float>(mean);
    for (int64_t j = 0; j < d; ++j) yr[j] = (xr[j] - m) * inv * w[j] + b[j];
  }
}

void add_(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

// One query row against `len` keys: out = softmax(q k^T / sqrt(dh), masked) v.
// Keys/values of position j at k + j * stride, v + j * stride.
inline void attend_one(const float* q, const float* k, const float* v, int64_t stride, int64_t len, int64_t dh,
                       const bool* mask, float* scores, float* out) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
  float top = kNegInf;
  for (int64_t j = 0; j < len; ++j) {
    if (mask != nullptr && !mask[j]) {
      scores[j] = kNegInf;
      continue;
    }
    const float* kj = k + j * stride;
    float s = 0;
    for (int64_t c = 0; c < dh; ++c) s += q[c] * kj[c];
    scores[j] = s * scale;
    top = std::max(top, scores[j]);
  }
  float total = 0;
  for (int64_t j = 0; j < len; ++j) {
    scores[j] = scores[j] == kNegInf ? 0.0f : std::exp(scores[j] - top);
    total += scores[j];
  }
  std::fill(out, out + dh, 0.0f);
  for (int64_t j = 0; j < len; ++j) {
    if (scores[j] == 0.0f) continue;
    const float w = scores[j] / total;
    const float* vj = v + j * stride;
    for (int64_t c = 0; c < dh; ++c) out[c] += w * vj[c];
  }
}

// Work per parallel task large enough to be worth a thread.
int64_t grain(int64_t work_per_task) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_task)); }

struct Hyp {
  std::vector<int64_t> tokens;
  double score;
};

class Engine {
 public:
  Engine(Tensor table, Tensor positions, Linear logits, std::vector<Tensor> final_norm, double final_eps,
         int64_t qkv_dim, bool pre_norm, int64_t top_k)
      : table_(table.contiguous()),
        positions_(positions.contiguous()),
        logits_(std::move(logits)),
        qkv_dim_(qkv_dim),
        pre_norm_(pre_norm),
        top_k_(top_k) {
    if (!final_norm.empty()) final_norm_ = Norm{final_norm.at(0).contiguous(), final_norm.at(1).contiguous(), final_eps};
  }

  void add_layer(Linear qkv, Linear self_out, int64_t self_heads, Linear ende_q, Linear ende_out, int64_t ende_heads,
                 std::vector<Tensor> norms, std::vector<double> eps, std::vector<Linear> fc1, std::vector<Linear> fc2,
                 std::optional<Tensor> router) {
    Layer l;
    l.qkv = std::move(qkv);
    l.self_out = std::move(self_out);
    l.self_heads = self_heads;
    l.ende_q = std::move(ende_q);
    l.ende_out = std::move(ende_out);
    l.ende_heads = ende_heads;
    for (int i = 0; i < 3; ++i) l.norms[i] = Norm{norms.at(2 * i).contiguous(), norms.at(2 * i + 1).contiguous(), eps.at(i)};
    l.fc1 = std::move(fc1);
    l.fc2 = std::move(fc2);
    if (router.has_value()) l.router = router->contiguous();
    layers_.push_back(std::move(l));
  }

  // Beam search from the first step's logits and cache (the module path ran step 0: it
  // projected the encoder keys/values). Returns (tokens, score) per sentence, as
  // model/decode.py's beam_search.
  std::vector<std::pair<std::vector<int64_t>, double>> beam_search(
      Tensor first_logits, Tensor self_kv, std::vector<Tensor> ende_k, std::vector<Tensor> ende_v,
      std::vector<std::optional<Tensor>> ende_mask, std::vector<int64_t> limits, int64_t beam, double length_penalty,
      int64_t min_len, int64_t bos, int64_t eos, int64_t pad) {
    const int64_t batch = static_cast<int64_t>(limits.size());
    const int64_t n = batch * beam;
    const int64_t layers = static_cast<int64_t>(layers_.size());
    TORCH_CHECK(first_logits.dim() == 2 && first_logits.size(0) == n, "first logits: expected (batch x beam, V)");
    TORCH_CHECK(self_kv.dim() == 5 && self_kv.size(0) == layers && self_kv.size(2) == n, "cache: unexpected shape");
    const int64_t max_limit = *std::max_element(limits.begin(), limits.end());
    const int64_t first_limit = *std::min_element(limits.begin(), limits.end());
    const int64_t positions = max_limit + 1;
    TORCH_CHECK(positions <= positions_.size(0), "more target positions than the position table holds");
    const int64_t kv_row = positions * 2 * qkv_dim_;  // one row's keys and values of one layer

    // keys/values, [layer][row][position][k | v]; reorder gathers into the second buffer
    std::vector<float> kv(layers * n * kv_row), spare(kv.size());
    {
      Tensor first = self_kv.select(3, 0).to(at::kFloat).contiguous();  // (L, 2, N, qkv): position 0
      const float* src = first.data_ptr<float>();
      for (int64_t l = 0; l < layers; ++l)
        for (int64_t s = 0; s < 2; ++s)
          for (int64_t r = 0; r < n; ++r)
            std::memcpy(kv.data() + (l * n + r) * kv_row + s * qkv_dim_, src + ((l * 2 + s) * n + r) * qkv_dim_,
                        qkv_dim_ * sizeof(float));
    }
    std::vector<Tensor> ek(layers), ev(layers), em(layers);
    for (int64_t l = 0; l < layers; ++l) {
      ek[l] = ende_k.at(l).to(at::kFloat).contiguous();  // (N, H, S', Dh)
      ev[l] = ende_v.at(l).to(at::kFloat).contiguous();
      if (ende_mask.at(l).has_value()) em[l] = ende_mask[l]->to(at::kBool).reshape({n, -1}).contiguous();  // (N, S')
    }

    std::vector<float> scores(n, kNegInf);
    for (int64_t b = 0; b < batch; ++b) scores[b * beam] = 0.0f;  // all beams start identical: one alive
    std::vector<std::vector<int64_t>> chosen, came_from;          // back-pointers per step
    struct Ended {
      int64_t sentence, step, row;
      double score;
    };
    std::vector<Ended> ended;
    std::vector<int64_t> n_ended(batch, 0), last(n, bos);
    const int64_t k2 = 2 * beam;
    std::vector<float> top_scores(batch * k2);
    std::vector<int64_t> top_idx(batch * k2);

    Tensor logits = first_logits.to(at::kFloat).contiguous();
    for (int64_t step = 0; step < positions; ++step) {
      if (step > 0) logits = decode_step(last, step, kv, positions, ek, ev, em);
      const int64_t vocab = logits.size(1);
      Tensor lse = at::logsumexp(logits, {1}).contiguous();  // (N,)
      const float* lg = logits.data_ptr<float>();
      const float* ls = lse.data_ptr<float>();
      // per sentence: the best 2 x beam of beam x vocabulary candidates, best first
      at::parallel_for(0, batch, grain(beam * vocab), [&](int64_t lo, int64_t hi) {
        std::vector<std::pair<float, int64_t>> best;
        for (int64_t b = lo; b < hi; ++b) {
          const bool at_limit = step >= limits[b];
          best.clear();
          for (int64_t j = 0; j < beam; ++j) {
            const int64_t row = b * beam + j;
            const float offset = scores[row] - ls[row];
            const float* x = lg + row * vocab;
            auto offer = [&](int64_t tok, float value) {
              if (static_cast<int64_t>(best.size()) == k2 && !(value > best.back().first)) return;
              auto place = std::upper_bound(best.begin(), best.end(), value,
                                            [](float v, const std::pair<float, int64_t>& e) { return v > e.first; });
              best.insert(place, {value, j * vocab + tok});
              if (static_cast<int64_t>(best.size()) > k2) best.pop_back();
            };
            if (at_limit) {  // at the length limit only EOS, at its own log-probability
              for (int64_t tok = 0; tok < vocab; ++tok) offer(tok, tok == eos ? x[tok] + offset : kNegInf);
              continue;
            }
            for (int64_t tok = 0; tok < vocab; ++tok) {
              float value = x[tok] + offset;
              if (tok == pad || tok == bos || (tok == eos && step < min_len)) value = kNegInf;
              offer(tok, value);
            }
          }
          for (int64_t i = 0; i < k2; ++i) {
            top_scores[b * k2 + i] = best[i].first;
            top_idx[b * k2 + i] = best[i].second;
          }
        }
      });

      // hypotheses ending here: EOS among the first `beam` candidates
      if (step >= min_len) {
        for (int64_t b = 0; b < batch; ++b)
          for (int64_t j = 0; j < beam; ++j) {
            const float s = top_scores[b * k2 + j];
            const int64_t idx = top_idx[b * k2 + j];
            if (idx % vocab == eos && s > kNegInf && n_ended[b] < beam) {
              ++n_ended[b];
              ended.push_back({b, step, b * beam + idx / vocab, s / std::pow(step + 1.0, length_penalty)});
            }
          }
        if (*std::min_element(n_ended.begin(), n_ended.end()) >= beam) break;
      }

      // continue with the best `beam` candidates that are not EOS (then the rest, dead)
      std::vector<int64_t> origin(n), tokens(n);
      for (int64_t b = 0; b < batch; ++b) {
        int64_t j = 0;
        for (int pass = 0; pass < 2 && j < beam; ++pass)
          for (int64_t i = 0; i < k2 && j < beam; ++i) {
            const int64_t idx = top_idx[b * k2 + i];
            const bool is_eos = idx % vocab == eos && top_scores[b * k2 + i] > kNegInf;
            if (is_eos != (pass == 1)) continue;
            scores[b * beam + j] = pass == 0 ? top_scores[b * k2 + i] : kNegInf;
            origin[b * beam + j] = b * beam + idx / vocab;
            tokens[b * beam + j] = idx % vocab;
            ++j;
          }
      }
      // row r continues row origin[r]: gather the keys/values of positions 0..step
      const int64_t used = (step + 1) * 2 * qkv_dim_;
      for (int64_t l = 0; l < layers; ++l)
        for (int64_t r = 0; r < n; ++r)
          std::memcpy(spare.data() + (l * n + r) * kv_row, kv.data() + (l * n + origin[r]) * kv_row,
                      used * sizeof(float));
      kv.swap(spare);
      last = tokens;
      chosen.push_back(std::move(tokens));
      came_from.push_back(std::move(origin));
    }

    // the best ended hypothesis per sentence, read back along the back-pointers
    std::vector<std::pair<std::vector<int64_t>, double>> out(batch);
    std::vector<const Ended*> best(batch, nullptr);
    for (const auto& e : ended)
      if (best[e.sentence] == nullptr || e.score > best[e.sentence]->score) best[e.sentence] = &e;
    for (int64_t b = 0; b < batch; ++b) {
      TORCH_CHECK(best[b] != nullptr, "no hypothesis ended");
      std::vector<int64_t> prefix;
      int64_t row = best[b]->row;
      for (int64_t i = best[b]->step - 1; i >= 0; --i) {
        prefix.push_back(chosen[i][row]);
        row = came_from[i][row];
      }
      std::reverse(prefix.begin(), prefix.end());
      out[b] = {std::move(prefix), best[b]->score};
    }
    return out;
  }

 private:
  // One incremental step for every row: writes position t's keys/values, returns (N, V) logits.
  Tensor decode_step(const std::vector<int64_t>& tokens, int64_t t, std::vector<float>& kv, int64_t positions,
                     const std::vector<Tensor>& ek, const std::vector<Tensor>& ev, const std::vector<Tensor>& em) {
    const int64_t n = static_cast<int64_t>(tokens.size());
    const int64_t d = table_.size(1), qkv = qkv_dim_;
    const int64_t kv_row = positions * 2 * qkv;
    const auto opts = at::TensorOptions().dtype(at::kFloat);
    Tensor x = at::empty({n, d}, opts);
    float* xp = x.data_ptr<float>();
    const float* table = table_.data_ptr<float>();
    const float* pos = positions_.data_ptr<float>() + t * d;
    for (int64_t r = 0; r < n; ++r)
      for (int64_t j = 0; j < d; ++j) xp[r * d + j] = table[tokens[r] * d + j] + pos[j];
    Tensor h = at::empty({n, d}, opts), a = at::empty({n, qkv}, opts);
    float* hp = h.data_ptr<float>();
    float* ap = a.data_ptr<float>();
    auto sublayer_input = [&](const Norm& p) -> const Tensor& {
      if (!pre_norm_) return x;
      layer_norm(xp, hp, n, d, p);
      return h;
    };
    auto residual = [&](const Tensor& y, const Norm& p) {  // x = x + y, then LN (post-LN)
      Tensor yc = y.contiguous();
      add_(xp, yc.data_ptr<float>(), n * d);
      if (!pre_norm_) layer_norm(xp, xp, n, d, p);
    };

    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& L = layers_[i];
      float* layer_kv = kv.data() + static_cast<int64_t>(i) * n * kv_row;
      // self-attention over the cached positions and this one
      Tensor qkv_out = L.qkv(sublayer_input(L.norms[0])).contiguous();  // (N, 3 qkv)
      const float* qp = qkv_out.data_ptr<float>();
      for (int64_t r = 0; r < n; ++r)
        std::memcpy(layer_kv + r * kv_row + t * 2 * qkv, qp + r * 3 * qkv + qkv, 2 * qkv * sizeof(float));
      {
        const int64_t heads = L.self_heads, dh = qkv / heads;
        at::parallel_for(0, n * heads, grain((t + 1) * dh * 2), [&](int64_t lo, int64_t hi) {
          std::vector<float> sc(t + 1);
          for (int64_t task = lo; task < hi; ++task) {
            const int64_t r = task / heads, hd = task % heads;
            const float* keys = layer_kv + r * kv_row + hd * dh;
            attend_one(qp + r * 3 * qkv + hd * dh, keys, keys + qkv, 2 * qkv, t + 1, dh, nullptr, sc.data(),
                       ap + r * qkv + hd * dh);
          }
        });
      }
      residual(L.self_out(a), L.norms[0]);
      // encoder-decoder attention over the encoder's keys/values
      Tensor q = L.ende_q(sublayer_input(L.norms[1])).contiguous();  // (N, qkv)
      {
        const float* qe = q.data_ptr<float>();
        const int64_t heads = L.ende_heads, dh = qkv / heads, len = ek[i].size(2);
        const float* kp = ek[i].data_ptr<float>();
        const float* vp = ev[i].data_ptr<float>();
        const bool* mp = em[i].defined() ? em[i].data_ptr<bool>() : nullptr;
        at::parallel_for(0, n * heads, grain(len * dh * 2), [&](int64_t lo, int64_t hi) {
          std::vector<float> sc(len);
          for (int64_t task = lo; task < hi; ++task) {
            const int64_t r = task / heads, hd = task % heads;
            const int64_t off = (r * heads + hd) * len * dh;  // (N, H, S', Dh)
            attend_one(qe + r * qkv + hd * dh, kp + off, vp + off, dh, len, dh, mp ? mp + r * len : nullptr,
                       sc.data(), ap + r * qkv + hd * dh);
          }
        });
      }
      residual(L.ende_out(a), L.norms[1]);
      // FFN: the dense expert, or the router and its experts
      const Tensor& in = sublayer_input(L.norms[2]);
      if (L.fc1.size() == 1) {
        residual(L.fc2[0](L.fc1[0](in)), L.norms[2]);
      } else {
        residual(moe(L, in), L.norms[2]);
      }
    }
    if (final_norm_.weight.defined()) layer_norm(xp, xp, n, d, final_norm_);
    return logits_(x).contiguous();  // (N, V)
  }

  // Softmax router over the layer's experts, top-k, each expert on its rows (in expert
  // order, rows ascending), outputs scaled by their gate and summed (model/moe.py).
  Tensor moe(const Layer& L, const Tensor& in) {
    const int64_t n = in.size(0), d = in.size(1), experts = static_cast<int64_t>(L.fc1.size());
    const int64_t k = std::min<int64_t>(top_k_, experts);
    Tensor logits = at::linear(in, L.router).contiguous();  // (N, n)
    const float* lp = logits.data_ptr<float>();
    std::vector<std::vector<int64_t>> rows(experts);
    std::vector<std::vector<float>> gates(experts);
    std::vector<float> probs(experts);
    std::vector<int64_t> order(experts);
    for (int64_t r = 0; r < n; ++r) {
      const float* z = lp + r * experts;
      const float top = *std::max_element(z, z + experts);
      float total = 0;
      for (int64_t e = 0; e < experts; ++e) total += probs[e] = std::exp(z[e] - top);
      for (int64_t e = 0; e < experts; ++e) probs[e] /= total;
      for (int64_t e = 0; e < experts; ++e) order[e] = e;
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return probs[a] > probs[b]; });
      for (int64_t j = 0; j < k; ++j) {
        rows[order[j]].push_back(r);
        gates[order[j]].push_back(probs[order[j]]);
      }
    }
    Tensor out = at::zeros({n, d}, in.options());
    float* op = out.data_ptr<float>();
    const Tensor src = in.contiguous();
    for (int64_t e = 0; e < experts; ++e) {
      if (rows[e].empty()) continue;
      const int64_t m = static_cast<int64_t>(rows[e].size());
      Tensor idx = at::from_blob(rows[e].data(), {m}, at::TensorOptions().dtype(at::kLong));
      Tensor y = L.fc2[e](L.fc1[e](src.index_select(0, idx))).contiguous();  // (m, d)
      const float* yp = y.data_ptr<float>();
      for (int64_t j = 0; j < m; ++j) {
        float* o = op + rows[e][j] * d;
        const float g = gates[e][j];
        for (int64_t c = 0; c < d; ++c) o[c] += yp[j * d + c] * g;
      }
    }
    return out;
  }

  Tensor table_, positions_;  // (V, d) pre-scaled by sqrt(d); (P, d)
  Linear logits_;
  Norm final_norm_;
  int64_t qkv_dim_;
  bool pre_norm_;
  int64_t top_k_;
  std::vector<Layer> layers_;
};

Linear fp32_linear(Tensor weight, Tensor packed, std::optional<Tensor> bias, int64_t small, bool relu) {
  Linear l;
  l.weight = weight.contiguous();
  l.packed = packed;
  if (bias.has_value()) l.bias = bias->contiguous();
  l.small = small;
  l.relu = relu;
  return l;
}

// The int8 weight (per-channel qint8, as linear_unpack gives it back) packed again for FBGEMM here.
Linear int8_linear(Tensor qweight, std::optional<Tensor> bias, bool relu, bool reduce_range) {
  static const auto prepack = c10::Dispatcher::singleton().findSchemaOrThrow("quantized::linear_prepack", "");
  torch::jit::Stack stack{qweight, bias.has_value() ? c10::IValue(*bias) : c10::IValue()};
  prepack.callBoxed(&stack);
  Linear l;
  l.int8 = true;
  l.int8_packed = stack[0];
  l.relu = relu;
  l.reduce_range = reduce_range;
  return l;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "automoe's compiled beam-search decoder (model/compiled.py)";
  py::class_<Linear>(m, "Linear");
  m.def("fp32_linear", &fp32_linear);
  m.def("int8_linear", &int8_linear);
  py::class_<Engine>(m, "Engine")
      .def(py::init<Tensor, Tensor, Linear, std::vector<Tensor>, double, int64_t, bool, int64_t>())
      .def("add_layer", &Engine::add_layer)
      .def("beam_search", &Engine::beam_search, py::call_guard<py::gil_scoped_release>());
}
