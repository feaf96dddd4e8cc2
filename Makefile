# The C++ runtime (runtime/cpp/README.md).  `make cpp` is the one build command:
# libtorch comes from the installed torch wheel, nlohmann/json from PyPI (pinned,
# header-only, installed into the venv only when missing).  pip install needs neither.
PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
JSON_PIN := nlohmann-json==3.12.0
BUILD ?= build/cpp
CMAKE_ARGS ?=

TORCH_CMAKE = $$($(PYTHON) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
# located, not imported: the package's __init__ needs importlib_resources, which --no-deps leaves out
JSON_FIND = import importlib.util as u; s = u.find_spec("nlohmann_json"); print(s.submodule_search_locations[0] + "/include")
JSON_INCLUDE = $$($(PYTHON) -c '$(JSON_FIND)')

.PHONY: cpp cpp-asan cpp-leakcheck json

json:
	@$(PYTHON) -c '$(JSON_FIND)' >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet --no-deps $(JSON_PIN)

cpp: json
	@mkdir -p $(BUILD)
	cmake -S runtime/cpp -B $(BUILD) -DCMAKE_PREFIX_PATH="$(TORCH_CMAKE)" -DPOP_JSON_INCLUDE="$(JSON_INCLUDE)" $(CMAKE_ARGS) > $(BUILD).configure.log 2>&1 || (cat $(BUILD).configure.log; exit 1)
	@grep '^-- pop:' $(BUILD).configure.log
	cmake --build $(BUILD) -j2

# AddressSanitizer build; `make cpp-leakcheck ARTIFACTS=DIR` runs the generate loop under its leak checker
cpp-asan:
	$(MAKE) cpp BUILD=build/cpp-asan CMAKE_ARGS="-DPOP_ASAN=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo"

cpp-leakcheck: cpp-asan
	@test -n "$(ARTIFACTS)" || (echo "make cpp-leakcheck ARTIFACTS=<an aoti export>"; exit 2)
	bash runtime/cpp/leakcheck.sh build/cpp-asan $(ARTIFACTS)
