// Index builders for the GPT dataset, compiled into ascendspeed._C.
//
// build_sample_idx and build_blending_indices compute exactly what Megatron's helpers.cpp computes
// (see docs/data.md), with every position held in int64. legacy_shuffle reproduces
// numpy.random.RandomState.shuffle on a 1-D array bit for bit (MT19937 + numpy's
// random_interval rejection sampler), several times faster, so the start-up of a
// 10^10-token corpus is not spent shuffling.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

// ---------------------------------------------------------------- MT19937, numpy's legacy stream
constexpr int kStateLen = 624;

struct MT19937 {
  uint32_t* key;  // numpy RandomState key (624 words), updated in place
  int64_t pos;

  void reload() {
    constexpr int kM = 397;
    constexpr uint32_t kMatrixA = 0x9908b0dfU, kUpper = 0x80000000U, kLower = 0x7fffffffU;
    int i = 0;
    for (; i < kStateLen - kM; ++i) {
      uint32_t y = (key[i] & kUpper) | (key[i + 1] & kLower);
      key[i] = key[i + kM] ^ (y >> 1) ^ (-(y & 1U) & kMatrixA);
    }
    for (; i < kStateLen - 1; ++i) {
      uint32_t y = (key[i] & kUpper) | (key[i + 1] & kLower);
      key[i] = key[i + (kM - kStateLen)] ^ (y >> 1) ^ (-(y & 1U) & kMatrixA);
    }
    uint32_t y = (key[kStateLen - 1] & kUpper) | (key[0] & kLower);
    key[kStateLen - 1] = key[kM - 1] ^ (y >> 1) ^ (-(y & 1U) & kMatrixA);
    pos = 0;
  }

  inline uint32_t next32() {
    if (pos >= kStateLen) reload();
    uint32_t y = key[pos++];
    y ^= (y >> 11);
    y ^= (y << 7) & 0x9d2c5680U;
    y ^= (y << 15) & 0xefc60000U;
    y ^= (y >> 18);
    return y;
  }

  inline uint64_t next64() {
    uint64_t hi = next32();
    return (hi << 32) | next32();
  }

  // numpy's random_interval: uniform in [0, max] by masked rejection.
  inline uint64_t interval(uint64_t max) {
    if (max == 0) return 0;
    uint64_t mask = max;
    mask |= mask >> 1;
    mask |= mask >> 2;
    mask |= mask >> 4;
    mask |= mask >> 8;
    mask |= mask >> 16;
    mask |= mask >> 32;
    uint64_t value;
    if (max <= 0xffffffffULL) {
      while ((value = (next32() & mask)) > max) {
      }
    } else {
      while ((value = (next64() & mask)) > max) {
      }
    }
    return value;
  }
};

template <typename T>
int64_t shuffle_impl(py::array_t<T, py::array::c_style> values, py::array_t<uint32_t, py::array::c_style> key,
                     int64_t pos) {
  if (values.ndim() != 1) throw std::invalid_argument("legacy_shuffle: values must be 1-D");
  if (key.ndim() != 1 || key.shape(0) != kStateLen)
    throw std::invalid_argument("legacy_shuffle: key must hold 624 uint32 words");
  if (pos < 0 || pos > kStateLen) throw std::invalid_argument("legacy_shuffle: pos must be in [0, 624]");
  auto v = values.template mutable_unchecked<1>();
  T* data = v.mutable_data(0);
  MT19937 rng{key.mutable_data(), pos};
  const int64_t n = values.shape(0);
  {
    py::gil_scoped_release release;
    // The swap partners j come from the RNG alone, so they are drawn kLookahead steps ahead and
    // their cache lines prefetched: the shuffle is bound by memory latency, not by the RNG.
    constexpr int64_t kLookahead = 64;
    int64_t ahead[kLookahead];
    int64_t next_i = n - 1;  // next i whose partner is to be drawn
    for (int64_t k = 0; k < kLookahead && next_i >= 1; ++k, --next_i) {
      ahead[k] = static_cast<int64_t>(rng.interval(static_cast<uint64_t>(next_i)));
      __builtin_prefetch(data + ahead[k], 1);
    }
    int64_t slot = 0;
    for (int64_t i = n - 1; i >= 1; --i) {
      const int64_t j = ahead[slot];
      if (next_i >= 1) {
        ahead[slot] = static_cast<int64_t>(rng.interval(static_cast<uint64_t>(next_i--)));
        __builtin_prefetch(data + ahead[slot], 1);
      }
      slot = (slot + 1 == kLookahead) ? 0 : slot + 1;
      std::swap(data[i], data[j]);
    }
  }
  return rng.pos;
}

// ---------------------------------------------------------------- sample_idx
// Row i is (position in doc_idx, offset in that sequence) of stream token i*seq_length.
template <typename Out>
py::array build_sample_idx_impl(const int32_t* sizes, int64_t n_sizes, const int32_t* doc_idx, int64_t n_doc_idx,
                                int32_t seq_length, int64_t num_samples) {
  py::array_t<Out> result({num_samples + 1, static_cast<int64_t>(2)});
  Out* out = result.mutable_data();
  bool bad_doc = false, ran_out = false;
  {
    py::gil_scoped_release release;
    int64_t doc_idx_index = 0;
    int64_t doc_offset = 0;
    out[0] = 0;
    out[1] = 0;
    for (int64_t sample = 1; sample <= num_samples && !bad_doc && !ran_out; ++sample) {
      int64_t remaining = static_cast<int64_t>(seq_length) + 1;
      while (remaining != 0) {
        if (doc_idx_index >= n_doc_idx) {
          ran_out = true;
          break;
        }
        // doc_idx is walked in order but sizes is hit at random: fetch ahead to hide the misses.
        if (doc_idx_index + 32 < n_doc_idx) {
          const int32_t ahead = doc_idx[doc_idx_index + 32];
          if (ahead >= 0 && ahead < n_sizes) __builtin_prefetch(sizes + ahead);
        }
        const int32_t doc_id = doc_idx[doc_idx_index];
        if (doc_id < 0 || doc_id >= n_sizes) {
          bad_doc = true;
          break;
        }
        const int64_t doc_length = static_cast<int64_t>(sizes[doc_id]) - doc_offset;
        remaining -= doc_length;
        if (remaining <= 0) {
          doc_offset += remaining + doc_length - 1;
          remaining = 0;
        } else {
          ++doc_idx_index;
          doc_offset = 0;
        }
      }
      out[2 * sample] = static_cast<Out>(doc_idx_index);
      out[2 * sample + 1] = static_cast<Out>(doc_offset);
    }
  }
  if (bad_doc) throw std::out_of_range("build_sample_idx: doc_idx holds a sequence id outside sizes");
  if (ran_out) throw std::out_of_range("build_sample_idx: doc_idx holds fewer tokens than num_samples needs");
  return result;
}

py::array build_sample_idx(py::array_t<int32_t, py::array::c_style | py::array::forcecast> sizes,
                           py::array_t<int32_t, py::array::c_style | py::array::forcecast> doc_idx,
                           int32_t seq_length, int64_t num_samples, bool int64_rows) {
  if (seq_length <= 0) throw std::invalid_argument("build_sample_idx: seq_length must be positive");
  if (num_samples < 0) throw std::invalid_argument("build_sample_idx: num_samples must be >= 0");
  if (int64_rows)
    return build_sample_idx_impl<int64_t>(sizes.data(), sizes.size(), doc_idx.data(), doc_idx.size(), seq_length,
                                          num_samples);
  if (doc_idx.size() > INT32_MAX)
    throw std::overflow_error("build_sample_idx: doc_idx too long for int32 rows; pass int64_rows=True");
  return build_sample_idx_impl<int32_t>(sizes.data(), sizes.size(), doc_idx.data(), doc_idx.size(), seq_length,
                                        num_samples);
}

// ---------------------------------------------------------------- blending
// Greedy: each position goes to the dataset furthest behind its target share (first on ties).
void build_blending_indices(py::array_t<uint8_t, py::array::c_style> dataset_index,
                            py::array_t<int64_t, py::array::c_style> dataset_sample_index,
                            py::array_t<double, py::array::c_style | py::array::forcecast> weights,
                            int32_t num_datasets, int64_t size, bool verbose) {
  if (num_datasets <= 0 || num_datasets > 255 || weights.size() != num_datasets)
    throw std::invalid_argument("build_blending_indices: need 1..255 datasets with one weight each");
  if (dataset_index.size() < size || dataset_sample_index.size() < size)
    throw std::invalid_argument("build_blending_indices: output arrays are shorter than size");
  auto index = dataset_index.mutable_data();
  auto sample_index = dataset_sample_index.mutable_data();
  const double* w = weights.data();
  std::vector<int64_t> current(num_datasets, 0);
  {
    py::gil_scoped_release release;
    for (int64_t s = 0; s < size; ++s) {
      const double x = std::max(static_cast<double>(s), 1.0);
      int64_t best = 0;
      double best_error = w[0] * x - static_cast<double>(current[0]);
      for (int64_t d = 1; d < num_datasets; ++d) {
        const double error = w[d] * x - static_cast<double>(current[d]);
        if (error > best_error) {
          best_error = error;
          best = d;
        }
      }
      index[s] = static_cast<uint8_t>(best);
      sample_index[s] = current[best];
      current[best] += 1;
    }
  }
  if (verbose) {
    py::print(" > sample ratios:");
    for (int64_t d = 0; d < num_datasets; ++d) {
      const double ratio = size ? static_cast<double>(current[d]) / static_cast<double>(size) : 0.0;
      py::print("   dataset", d, ", input:", w[d], ", achieved:", ratio);
    }
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "AscendSpeed native helpers (dataset index building)";
  m.def("legacy_shuffle", &shuffle_impl<int32_t>, py::arg("values"), py::arg("key"), py::arg("pos"));
  m.def("legacy_shuffle", &shuffle_impl<uint32_t>, py::arg("values"), py::arg("key"), py::arg("pos"));
  m.def("legacy_shuffle", &shuffle_impl<int64_t>, py::arg("values"), py::arg("key"), py::arg("pos"),
        "Shuffle a 1-D int32/uint32/int64 array in place exactly as numpy's RandomState.shuffle does, "
        "from MT19937 state (key, pos); returns the new pos (key is updated in place).");
  m.def("build_sample_idx", &build_sample_idx, py::arg("sizes"), py::arg("doc_idx"), py::arg("seq_length"),
        py::arg("num_samples"), py::arg("int64_rows") = false);
  m.def("build_blending_indices", &build_blending_indices, py::arg("dataset_index"),
        py::arg("dataset_sample_index"), py::arg("weights"), py::arg("num_datasets"), py::arg("size"),
        py::arg("verbose") = false);
}
