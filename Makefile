# modelcast: `make demo` runs the main job on the embedded default; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# Debian tools some tests drive as real peers or readers (skipped, with the reason printed, without them).
# Debian's prometheus package ships promtool too; chromium is the console test's browser.
# postgresql: the registry's PostgreSQL tests run initdb and pg_ctl from /usr/lib/postgresql/*/bin
# (not on PATH); pg_ctlcluster, from the same install, says whether it is there.
SYSTEM_TOOLS := aria2c:aria2 skopeo:skopeo tc:iproute2 opentracker:opentracker prometheus:prometheus \
	promtool:prometheus chromium:chromium pg_ctlcluster:postgresql redis-server:redis-server

.PHONY: install system-tools demo test bench runtime-cuda-full clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,ray]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

install: $(STAMP)

# Best effort: installs what is missing when we are root with apt; never fails the build.
system-tools:
	@missing=""; for pair in $(SYSTEM_TOOLS); do cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing$$missing"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) >/dev/null 2>&1 \
	    || echo "could not install$$missing; the tests that need them will say so and skip"; \
	  case "$$missing" in *opentracker*) \
	    command -v systemctl >/dev/null 2>&1 && systemctl disable --now opentracker >/dev/null 2>&1 || true;; esac; \
	  case "$$missing" in *prometheus*) \
	    command -v systemctl >/dev/null 2>&1 \
	      && systemctl disable --now prometheus prometheus-node-exporter >/dev/null 2>&1 || true;; esac; \
	  case "$$missing" in *postgresql*) \
	    command -v systemctl >/dev/null 2>&1 && systemctl disable --now postgresql >/dev/null 2>&1 || true;; esac; \
	fi

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP) system-tools
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: $(STAMP) system-tools
	$(BIN)/python benchmarks/publish.py
	$(BIN)/python benchmarks/node_cache.py
	$(BIN)/python benchmarks/dataplane.py
	$(BIN)/python benchmarks/fanout.py
	$(BIN)/python benchmarks/fanout.py --nodes 16 --no-baseline
	$(BIN)/python benchmarks/fanout.py --zones 2 --no-baseline
	$(BIN)/python benchmarks/serve_start.py
	$(BIN)/python benchmarks/tracker_load.py
	$(BIN)/python benchmarks/heartbeat_reports.py

# The full CUDA variant: onnxruntime-gpu with its CUDA 13 / cuDNN wheels (~1.5 GB download,
# 2.6 GB layer), outside `make test`; runs the model on CUDAExecutionProvider where a GPU is.
runtime-cuda-full: $(STAMP)
	$(BIN)/python -m runtime_builder.check_cuda $(if $(WHEELHOUSE),--wheelhouse $(WHEELHOUSE))

clean:
	rm -rf $(VENV) demo-data .pytest_cache
