// AOTInductor packages (pop-export --format aoti) through torch's AOTIModelPackageLoader.
//
// weights.bin is memory-mapped once; every tensor in the manifest's index becomes an
// at::Tensor over those bytes and goes to both packages with load_constants(user_managed),
// so prefill and decode, and every session of a Model, use the same memory.  A package
// returns fresh output tensors; they are copied into the session's views: the logits and
// the new tokens' K/V slots (strided views of the buffer), never the cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/headeronly/version.h>
#include <unistd.h>

#include <unordered_map>

#include "backend.hpp"
#include "pop/pop.hpp"

namespace pop {

static at::ScalarType scalar_type(const std::string& dtype) {
  if (dtype == "float32") return at::kFloat;
  if (dtype == "float16") return at::kHalf;
  if (dtype == "bfloat16") return at::kBFloat16;
  if (dtype == "int64") return at::kLong;
  if (dtype == "int32") return at::kInt;
  if (dtype == "bool") return at::kBool;
  throw Error(Status::bad_artifacts, "unsupported dtype " + dtype);
}

static std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

class AotiBackend : public Backend {
 public:
  AotiBackend(const Manifest& m, int threads) {
    device_ = m.graphs.at("decode").device == "cuda" ? at::Device(at::kCUDA, 0) : at::Device(at::kCPU);
    if (device_.is_cuda() && !at::hasCUDA())
      throw Error(Status::bad_artifacts, "these AOTI packages were compiled for CUDA, and libtorch sees no GPU here");
    const std::string mine = TORCH_VERSION;
    for (const auto& [name, g] : m.graphs)
      if (!g.torch.empty() && g.torch.substr(0, g.torch.find('+')) != mine)
        throw Error(Status::bad_artifacts, g.file + " was compiled with torch " + g.torch + ", this libpop with " + mine +
                                               ": AOTInductor packages run only with the torch that built them");
    if (m.tensors.empty())
      throw Error(Status::bad_artifacts, "the manifest has no weights.tensors index: not an AOTI export");
    if (threads > 0) at::set_num_threads(threads);
    map_weights(m);
    for (const auto& [name, g] : m.graphs) {
      Graph graph{nullptr, g.inputs, g.outputs};
      try {
        graph.loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(m.path(g.file), "model", false, 1,
                                                                                  device_.is_cuda() ? 0 : -1);
        std::unordered_map<std::string, at::Tensor> constants;
        for (const auto& fqn : graph.loader->get_constant_fqns()) {
          auto it = weights_.find(fqn);
          if (it == weights_.end()) throw Error(Status::bad_artifacts, g.file + " needs " + fqn + ", which weights.bin does not index");
          constants.emplace(fqn, it->second);
        }
        graph.loader->load_constants(constants, false, true, true);
      } catch (const Error&) {
        throw;
      } catch (const std::exception& e) {
        throw Error(Status::bad_artifacts, g.file + " cannot be loaded by AOTInductor: " + first_line(e.what()));
      }
      graphs_.emplace(name, std::move(graph));
    }
  }

  ~AotiBackend() override {
    graphs_.clear();
    weights_.clear();
    if (mapped_) munmap(mapped_, mapped_bytes_);
  }

  std::string name() const override { return "aoti"; }
  bool device_memory() const override { return device_.is_cuda(); }

  void* alloc(size_t bytes) override {
    at::Tensor t;
    if (device_.is_cuda()) {
      t = at::zeros({int64_t(bytes)}, at::TensorOptions().dtype(at::kByte).device(device_));
    } else {
      // Zero pages of 4 KiB, resident only where written: at::zeros writes every byte, and the KV buffer is
      // sized for max_seq_len while a prompt writes a few slots of each row (as the Python runtime's lazy_zeros).
      size_t length = bytes ? bytes : 1;
      void* pages = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (pages == MAP_FAILED) throw std::bad_alloc();
      madvise(pages, length, MADV_NOHUGEPAGE);
      t = at::from_blob(pages, {int64_t(bytes)}, [length](void* p) { munmap(p, length); },
                        at::TensorOptions().dtype(at::kByte));
    }
    void* p = t.data_ptr();
    owned_.emplace(p, std::move(t));
    return p;
  }
  void release(void* data) override { owned_.erase(data); }

  void run(const std::string& name, const std::vector<View>& inputs, const std::vector<View>& outputs) override {
    Graph& g = graphs_.at(name);
    std::vector<at::Tensor> args;
    args.reserve(g.inputs.size());
    for (const auto& n : g.inputs) {
      const View& v = find(inputs, n);
      at::Tensor t = wrap(v);
      args.push_back(v.on_device == device_.is_cuda() ? t : t.to(device_));
    }
    std::vector<at::Tensor> results;
    try {
      results = g.loader->run(args);
    } catch (const std::exception& e) {
      throw Error(Status::backend, "the " + name + " package failed: " + first_line(e.what()));
    }
    for (size_t i = 0; i < g.outputs.size() && i < results.size(); ++i)
      for (const auto& v : outputs)
        if (g.outputs[i] == v.name) wrap(v).copy_(results[i]);
  }

 private:
  struct Graph {
    std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
    std::vector<std::string> inputs, outputs;
  };

  static const View& find(const std::vector<View>& views, const std::string& name) {
    for (const auto& v : views)
      if (name == v.name) return v;
    throw Error(Status::backend, "the session bound no tensor for the graph's input " + name);
  }

  at::Tensor wrap(const View& v) const {
    auto options = at::TensorOptions().dtype(scalar_type(v.dtype)).device(v.on_device ? device_ : at::Device(at::kCPU));
    return v.strides.empty() ? at::from_blob(v.data, v.shape, options) : at::from_blob(v.data, v.shape, v.strides, options);
  }

  void map_weights(const Manifest& m) {
    const std::string path = m.path(m.weights_file);
    int fd = open(path.c_str(), O_RDONLY);
    if (fd < 0) throw Error(Status::bad_artifacts, path + " cannot be opened");
    mapped_bytes_ = size_t(m.weights_bytes);
    void* p = mmap(nullptr, mapped_bytes_, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (p == MAP_FAILED) throw Error(Status::bad_artifacts, path + " cannot be memory-mapped");
    mapped_ = p;
    for (const auto& t : m.tensors) {
      // const_cast: the packages read their constants and never write them
      at::Tensor w = at::from_blob(static_cast<char*>(mapped_) + t.offset, t.shape,
                                   at::TensorOptions().dtype(scalar_type(t.dtype)));
      if (int64_t(w.nbytes()) != t.bytes) throw Error(Status::bad_artifacts, "the manifest's index of " + t.name + " is inconsistent");
      weights_.emplace(t.name, device_.is_cuda() ? w.to(device_) : w);
    }
  }

  at::Device device_{at::kCPU};
  void* mapped_ = nullptr;
  size_t mapped_bytes_ = 0;
  std::unordered_map<std::string, at::Tensor> weights_;
  std::unordered_map<std::string, Graph> graphs_;
  std::unordered_map<void*, at::Tensor> owned_;
};

std::unique_ptr<Backend> open_aoti(const Manifest& manifest, int threads) {
  return std::make_unique<AotiBackend>(manifest, threads);
}

}  // namespace pop
