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
#include <ATen/record_function.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
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

// Vector loops: AVX2 + FMA where the CPU has them (chosen at run time, so one build serves
// every x86 CPU), plain loops elsewhere.
#if defined(__x86_64__) && defined(__GNUC__)
#define AUTOMOE_AVX2 1
#define AVX2_FN __attribute__((target("avx2,fma")))

AVX2_FN inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

AVX2_FN float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  float s = hsum(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

AVX2_FN void axpy_avx2(float* y, float w, const float* x, int64_t n) {  // y += w x
  const __m256 wv = _mm256_set1_ps(w);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += w * x[i];
}

AVX2_FN void add_avx2(float* y, const float* x, int64_t n) {  // y += x
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_loadu_ps(x + i)));
  for (; i < n; ++i) y[i] += x[i];
}

AVX2_FN void norm_row_avx2(const float* x, float* y, int64_t d, const float* w, const float* b, float eps) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(x + i));
  float sum = hsum(acc);
  for (; i < d; ++i) sum += x[i];
  const float mean = sum / d;
  const __m256 mv = _mm256_set1_ps(mean);
  acc = _mm256_setzero_ps();
  for (i = 0; i + 8 <= d; i += 8) {
    const __m256 c = _mm256_sub_ps(_mm256_loadu_ps(x + i), mv);
    acc = _mm256_fmadd_ps(c, c, acc);
  }
  float var = hsum(acc);
  for (; i < d; ++i) var += (x[i] - mean) * (x[i] - mean);
  const float inv = 1.0f / std::sqrt(var / d + eps);
  const __m256 iv = _mm256_set1_ps(inv);
  for (i = 0; i + 8 <= d; i += 8) {
    const __m256 c = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv), iv);
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(c, _mm256_loadu_ps(w + i), _mm256_loadu_ps(b + i)));
  }
  for (; i < d; ++i) y[i] = (x[i] - mean) * inv * w[i] + b[i];
}

// AUTOMOE_DECODER_SCALAR (tests): the plain loops on any CPU
const bool kAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                   std::getenv("AUTOMOE_DECODER_SCALAR") == nullptr;
#else
constexpr bool kAvx2 = false;
#endif

inline float dot(const float* a, const float* b, int64_t n) {
#ifdef AUTOMOE_AVX2
  if (kAvx2) return dot_avx2(a, b, n);
#endif
  float s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float* y, float w, const float* x, int64_t n) {
#ifdef AUTOMOE_AVX2
  if (kAvx2) return axpy_avx2(y, w, x, n);
#endif
  for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
}

void add_(float* y, const float* x, int64_t n) {
#ifdef AUTOMOE_AVX2
  if (kAvx2) return add_avx2(y, x, n);
#endif
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

// LN over each row of x (N, d) into out (may alias x).
void layer_norm(const float* x, float* out, int64_t rows, int64_t d, const Norm& p) {
  RECORD_FUNCTION("automoe::layer_norm", std::vector<c10::IValue>());
  const float* w = p.weight.data_ptr<float>();
  const float* b = p.bias.data_ptr<float>();
  const float eps = static_cast<float>(p.eps);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    float* yr = out + r * d;
#ifdef AUTOMOE_AVX2
    if (kAvx2) {
      norm_row_avx2(xr, yr, d, w, b, eps);
      continue;
    }
#endif
    float mean = 0, var = 0;
    for (int64_t j = 0; j < d; ++j) mean += xr[j];
    mean /= d;
    for (int64_t j = 0; j < d; ++j) var += (xr[j] - mean) * (xr[j] - mean);
    const float inv = 1.0f / std::sqrt(var / d + eps);
    for (int64_t j = 0; j < d; ++j) yr[j] = (xr[j] - mean) * inv * w[j] + b[j];
  }
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
    scores[j] = dot(q, k + j * stride, dh) * scale;
    top = std::max(top, scores[j]);
  }
  float total = 0;
  for (int64_t j = 0; j < len; ++j) {
    scores[j] = scores[j] == kNegInf ? 0.0f : std::exp(scores[j] - top);
    total += scores[j];
  }
  std::fill(out, out + dh, 0.0f);
  const float inv = 1.0f / total;
  for (int64_t j = 0; j < len; ++j)
    if (scores[j] != 0.0f) axpy(out, scores[j] * inv, v + j * stride, dh);
}

#ifdef AUTOMOE_AVX2
// e^x for x <= 0 (Cephes' polynomial, as avx_mathfun): about 1e-7 relative error.
AVX2_FN inline __m256 exp_avx2(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.0f));
  const __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(0x7f)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

AVX2_FN float log_sum_exp_avx2(const float* x, int64_t n) {
  __m256 m8 = _mm256_set1_ps(kNegInf);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(x + i));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  float top = std::max(_mm_cvtss_f32(m4), _mm_cvtss_f32(_mm_shuffle_ps(m4, m4, 1)));
  for (; i < n; ++i) top = std::max(top, x[i]);
  const __m256 t8 = _mm256_set1_ps(top);
  __m256 acc = _mm256_setzero_ps();
  for (i = 0; i + 8 <= n; i += 8) acc = _mm256_add_ps(acc, exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i), t8)));
  double total = hsum(acc);
  for (; i < n; ++i) total += std::exp(x[i] - top);
  return top + static_cast<float>(std::log(total));
}

// Calls take(tok) for every tok in [from, n) whose x[tok] + offset > threshold, in order;
// take returns the new threshold. Returns n.
template <typename Take>
AVX2_FN int64_t skip_scan_avx2(const float* x, int64_t from, int64_t n, float offset, float threshold, Take&& take) {
  int64_t i = from;
  for (; i < n && (i & 7); ++i)
    if (x[i] + offset > threshold) threshold = take(i);
  const __m256 off = _mm256_set1_ps(offset);
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_add_ps(_mm256_loadu_ps(x + i), off);
    int mask = _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(threshold), _CMP_GT_OQ));
    while (mask) {
      const int bit = __builtin_ctz(mask);
      mask &= mask - 1;
      if (x[i + bit] + offset > threshold) threshold = take(i + bit);
    }
  }
  for (; i < n; ++i)
    if (x[i] + offset > threshold) threshold = take(i);
  return n;
}
#endif

// log(sum(exp(x))) of a row: the log-softmax's normaliser.
float log_sum_exp(const float* x, int64_t n) {
#ifdef AUTOMOE_AVX2
  if (kAvx2) return log_sum_exp_avx2(x, n);
#endif
  const float top = *std::max_element(x, x + n);
  double total = 0;
  for (int64_t i = 0; i < n; ++i) total += std::exp(x[i] - top);
  return top + static_cast<float>(std::log(total));
}

template <typename Take>
int64_t skip_scan(const float* x, int64_t from, int64_t n, float offset, float threshold, Take&& take) {
#ifdef AUTOMOE_AVX2
  if (kAvx2) return skip_scan_avx2(x, from, n, offset, threshold, take);
#endif
  for (int64_t i = from; i < n; ++i)
    if (x[i] + offset > threshold) threshold = take(i);
  return n;
}

// Work per parallel task large enough to be worth a thread.
int64_t grain(int64_t work_per_task) { return std::max<int64_t>(1, 262144 / std::max<int64_t>(1, work_per_task)); }

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

  // Beam search from the encoder's keys/values, per layer (B, H, S', Dh) and the padding
  // masks (B, 1, 1, S') or none. Returns (tokens, score) per sentence, as
  // model/decode.py's beam_search.
  std::vector<std::pair<std::vector<int64_t>, double>> beam_search(
      std::vector<Tensor> ende_k, std::vector<Tensor> ende_v, std::vector<std::optional<Tensor>> ende_mask,
      std::vector<int64_t> limits, int64_t beam, double length_penalty, int64_t min_len, int64_t bos, int64_t eos,
      int64_t pad) const {
    const int64_t batch = static_cast<int64_t>(limits.size());
    const int64_t n = batch * beam;
    const int64_t layers = static_cast<int64_t>(layers_.size());
    const int64_t max_limit = *std::max_element(limits.begin(), limits.end());
    const int64_t positions = max_limit + 1;
    TORCH_CHECK(positions <= positions_.size(0), "more target positions than the position table holds");
    const int64_t kv_row = positions * 2 * qkv_dim_;  // one row's keys and values of one layer

    // keys/values, [layer][row][position][k | v]; reorder gathers into the second buffer
    std::vector<float> kv(layers * n * kv_row), spare(kv.size());
    std::vector<Tensor> ek(layers), ev(layers), em(layers);
    for (int64_t l = 0; l < layers; ++l) {
      ek[l] = ende_k.at(l).to(at::kFloat).contiguous();  // (B, H, S', Dh): one per sentence, its beams share it
      ev[l] = ende_v.at(l).to(at::kFloat).contiguous();
      TORCH_CHECK(ek[l].dim() == 4 && ek[l].size(0) == batch, "encoder keys: expected (batch, H, S', Dh)");
      if (ende_mask.at(l).has_value()) em[l] = ende_mask[l]->to(at::kBool).reshape({batch, -1}).contiguous();
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

    for (int64_t step = 0; step < positions; ++step) {
      const Tensor logits = decode_step(last, beam, step, kv, positions, ek, ev, em);
      const int64_t vocab = logits.size(1);
      const float* lg = logits.data_ptr<float>();
      // per sentence: the best 2 x beam of beam x vocabulary candidates by score + log-softmax,
      // best first (the log-softmax's normaliser per row, then one scan that skips what
      // cannot enter the list)
      at::parallel_for(0, batch, grain(beam * vocab * 8), [&](int64_t lo, int64_t hi) {
        RECORD_FUNCTION("automoe::beam_topk", std::vector<c10::IValue>());
        std::vector<std::pair<float, int64_t>> best;
        for (int64_t b = lo; b < hi; ++b) {
          const bool at_limit = step >= limits[b];
          best.clear();
          for (int64_t j = 0; j < beam; ++j) {
            const int64_t row = b * beam + j;
            const float* x = lg + row * vocab;
            const float offset = scores[row] - log_sum_exp(x, vocab);
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
            auto consider = [&](int64_t tok) {
              offer(tok, tok == pad || tok == bos || (tok == eos && step < min_len) ? kNegInf : x[tok] + offset);
            };
            int64_t tok = 0;
            while (static_cast<int64_t>(best.size()) < k2 && tok < vocab) consider(tok++);
            // most tokens cannot enter: skip them 8 at a time against the list's last score
            tok = skip_scan(x, tok, vocab, offset, best.back().first, [&](int64_t t) {
              consider(t);
              return best.back().first;
            });
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
      // row r continues row origin[r]: its keys/values of positions 0..step become origin[r]'s.
      // In place: only rows that move are written, from a saved copy where their source is
      // itself overwritten (the spare buffer holds those copies)
      {
        RECORD_FUNCTION("automoe::cache_reorder", std::vector<c10::IValue>());
        const int64_t used = (step + 1) * 2 * qkv_dim_;
        std::vector<int64_t> moved, saved, slot(n, -1);
        std::vector<char> overwritten(n, 0);
        for (int64_t r = 0; r < n; ++r)
          if (origin[r] != r) moved.push_back(r), overwritten[r] = 1;
        for (int64_t r : moved)
          if (overwritten[origin[r]] && slot[origin[r]] < 0) slot[origin[r]] = static_cast<int64_t>(saved.size()), saved.push_back(origin[r]);
        const int64_t n_saved = static_cast<int64_t>(saved.size()), n_moved = static_cast<int64_t>(moved.size());
        at::parallel_for(0, layers * n_saved, grain(used), [&](int64_t lo, int64_t hi) {
          for (int64_t i = lo; i < hi; ++i) {
            const int64_t l = i / n_saved, j = i % n_saved;
            std::memcpy(spare.data() + (l * n + j) * kv_row, kv.data() + (l * n + saved[j]) * kv_row, used * sizeof(float));
          }
        });
        at::parallel_for(0, layers * n_moved, grain(used), [&](int64_t lo, int64_t hi) {
          for (int64_t i = lo; i < hi; ++i) {
            const int64_t l = i / n_moved, r = moved[i % n_moved], from = origin[r];
            const float* src = slot[from] >= 0 ? spare.data() + (l * n + slot[from]) * kv_row : kv.data() + (l * n + from) * kv_row;
            std::memcpy(kv.data() + (l * n + r) * kv_row, src, used * sizeof(float));
          }
        });
      }
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
  // (No state on the engine: searches may run in several threads at once.)
  Tensor decode_step(const std::vector<int64_t>& tokens, int64_t beam, int64_t t, std::vector<float>& kv,
                     int64_t positions, const std::vector<Tensor>& ek, const std::vector<Tensor>& ev,
                     const std::vector<Tensor>& em) const {
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
        RECORD_FUNCTION("automoe::self_attention", std::vector<c10::IValue>());
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
        RECORD_FUNCTION("automoe::ende_attention", std::vector<c10::IValue>());
        const float* qe = q.data_ptr<float>();
        const int64_t heads = L.ende_heads, dh = qkv / heads, len = ek[i].size(2);
        const float* kp = ek[i].data_ptr<float>();
        const float* vp = ev[i].data_ptr<float>();
        const bool* mp = em[i].defined() ? em[i].data_ptr<bool>() : nullptr;
        at::parallel_for(0, n * heads, grain(len * dh * 2), [&](int64_t lo, int64_t hi) {
          std::vector<float> sc(len);
          for (int64_t task = lo; task < hi; ++task) {
            const int64_t r = task / heads, hd = task % heads;
            const int64_t sentence = r / beam;
            const int64_t off = (sentence * heads + hd) * len * dh;  // (B, H, S', Dh)
            attend_one(qe + r * qkv + hd * dh, kp + off, vp + off, dh, len, dh, mp ? mp + sentence * len : nullptr,
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
  Tensor moe(const Layer& L, const Tensor& in) const {
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
      for (int64_t j = 0; j < m; ++j) axpy(op + rows[e][j] * d, gates[e][j], yp + j * d, d);
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
