// Which backend runs a manifest's graphs: the artifacts' own unless the caller names one.
#include "backend.hpp"

#include "pop/pop.hpp"

namespace pop {

std::unique_ptr<Backend> open_backend(const std::string& name, const Manifest& manifest, int threads) {
  const std::string chosen = name.empty() ? (manifest.graph_format() == "aoti" ? "aoti" : "ort") : name;
  if ((chosen == "aoti") != (manifest.graph_format() == "aoti"))
    throw Error(Status::invalid_argument, "these artifacts hold " + manifest.graph_format() +
                                              " graphs, which the " + chosen + " backend cannot run");
  if (chosen == "aoti") return open_aoti(manifest, threads);
  if (chosen == "ort") {
#ifdef POP_WITH_ONNXRUNTIME
    return open_ort(manifest, threads);
#else
    throw Error(Status::invalid_argument,
                "this libpop was built without ONNX Runtime: rebuild with -DPOP_ONNXRUNTIME_ROOT=<ONNX Runtime SDK>");
#endif
  }
  throw Error(Status::invalid_argument, "unknown backend " + chosen + "; this libpop has: aoti"
#ifdef POP_WITH_ONNXRUNTIME
                                            ", ort"
#endif
  );
}

}  // namespace pop
