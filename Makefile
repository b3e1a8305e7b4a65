# `make test` and `make bench` each do the whole set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# A CPU build of torch is on disk on the project machines; users get their own build
# through the package's own range (torch>=2.4).
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: test bench bench-quick bench-pytest train install clean gpu-check gpu-install gpu-test gpu-bench

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,bench]"
	$(PY) -c "import fastattn; print(fastattn.backends())"
	touch $@

install: $(STAMP)

# Every backend must be present in the test run: a broken C++ build fails here, not skips.
# The serving tests need a real Redis: .ci/with-redis installs redis-server if missing,
# starts one on a free loopback port and stops it however pytest ends;
# FASTATTN_REQUIRE_REDIS=1 turns a missing or unreachable Redis into failed tests.
# OMP_WAIT_POLICY=passive: the tests alternate between three OpenMP thread teams (torch's,
# the C++ extension's and numba's); spinning idle teams take the cores the next kernel needs
# (measured: tests/test_gather.py 41 -> 30 CPU-s on a busy 2-core machine).
# TEST_JOBS pytest-xdist workers, one test file each at a time (module fixtures stay in one
# process; the Redis tests each use their own key prefix): much of the suite is single-threaded
# (the Triton interpreter, numba compiles, subprocesses): on 2 cores, clean clones measured
# 7:02 and 8:49 of tests on 2 workers against 12:41 on one within the same hour.
TEST_JOBS ?= 2
test: $(STAMP)
	OMP_WAIT_POLICY=passive FASTATTN_REQUIRE_REDIS=1 FASTATTN_REQUIRE_BACKENDS=cpp,numba,triton \
		.ci/with-redis $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_JOBS) --dist loadfile tests

# The UIC sweep also measures the Redis store (skipped, with the reason, without one).
bench: $(STAMP)
	.ci/with-redis $(VENV)/bin/fastattn-bench --out bench/results

bench-quick: $(STAMP)
	$(VENV)/bin/fastattn-bench --quick --out bench/results

# pytest-benchmark suites, grouped per op and size (compare runs with --benchmark-compare).
bench-pytest: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider bench --benchmark-only \
		--benchmark-json=bench/results/pytest_benchmark.json --benchmark-columns=median,iqr,rounds

# The reference CTR models trained on the planted long-history set (a few minutes on CPU),
# with test AUC per epoch and the retrieval-quality table (retrieval.{csv,json}); then the
# two variants of the set (long-term interests / the recent window dominate the clicks) at
# L=200 and 1,000; then BAHE's ablation rows over item token strings at text lengths 1,024
# and 2,048 (time and memory per sample), then all four rows (LLM-CTR, +FP, +ABE, BAHE)
# trained to convergence at 2,048 on the text variant in one run (time, memory and AUC: 16
# whole users a step, 20,480 test samples),
# then EdgeRec's ablation rows (3 seeds each) and its exported re-ranker's latency.
train: $(STAMP)
	$(VENV)/bin/fastattn-train --epoch-auc --retrieval --out bench/results
	$(VENV)/bin/fastattn-train --variant long --lengths 200,1000 --out bench/results/train_variant_long
	$(VENV)/bin/fastattn-train --variant recent --lengths 200,1000 --out bench/results/train_variant_recent
	$(VENV)/bin/fastattn-train --models llm_ctr,fp,fp_abe,bahe --lengths 64,128 --users 160 \
		--items 2000 --cats 100 --candidates 8 --max-history 512 --behaviour-types 3 \
		--epochs 1 --batch-size 64 --embed-dim 32 --threads 1 --out bench/results/train_bahe
	$(VENV)/bin/fastattn-train --models llm_ctr,fp,fp_abe,bahe --lengths 128 --variant text --users 400 \
		--items 1000 --cats 5 --candidates 256 --max-history 512 --behaviour-types 3 \
		--batch-size 4096 --lr 5e-3 --embed-dim 32 --share-histories --epochs 10 --epoch-auc \
		--threads 1 --out bench/results/train_bahe_auc
	$(PY) -m fastattn.bench.edgerec_sweeps --seeds 3 --epochs 3 --threads 1 --out bench/results

# One command for a machine with one NVIDIA GPU (H100/H200): install, run the Triton tests on
# CUDA tensors, the quick sweeps on the GPU (bench/results/*_cuda.*), and fill the README's
# GPU block. `gpu-test` and `gpu-bench` are its two halves (each under 10 minutes, for a
# session that runs them as separate commands; each installs first unless fastattn
# imports). A python3 that already has a CUDA torch (a GPU image with no package registry)
# is used as it is, fastattn installed into it without dependencies; otherwise a CUDA
# torch and fastattn go into .venv-gpu. Each step runs even
# if an earlier one failed (a failing test must not cost the figures); the target fails if
# any did. The tests selected are those with a triton parameter or a Triton/CUDA subject,
# the fuzz tests and the property test, on 8 xdist workers (Triton compiles in parallel:
# the MIMN scan's backward takes ~2 minutes to compile on one core).
GPU_TORCH_SPEC ?= torch>=2.8
GPU_VENV       ?= .venv-gpu
GPU_PICK        = if python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
                  2>/dev/null; then py=python3; else py=$(GPU_VENV)/bin/python; fi
GPU_TESTS      := tests/test_gpu_readiness.py tests/test_fuzz.py tests/test_hamming.py \
                  tests/test_gather.py tests/test_attention.py tests/test_indexed.py \
                  tests/test_library.py tests/test_simhash.py tests/test_mimn.py \
                  tests/test_nn_attention.py
gpu-install:
	@$(GPU_PICK); \
	if $$py -c "import fastattn" 2>/dev/null; then \
		echo "fastattn is installed in $$py"; \
	elif [ "$$py" = python3 ]; then \
		python3 -m pip install -q --no-deps --no-build-isolation -e .; \
	else \
		test -x $$py || $(PYTHON) -m venv $(GPU_VENV); \
		$$py -m pip install -q --upgrade pip && $$py -m pip install -q "$(GPU_TORCH_SPEC)" && \
		$$py -m pip install -q -e ".[test,bench]"; \
	fi; \
	$$py -c "import torch, fastattn; assert torch.cuda.is_available(), 'no CUDA device'; \
		print(torch.cuda.get_device_name(), fastattn.backends())"

gpu-test: gpu-install
	$(GPU_PICK); FASTATTN_TEST_DEVICE=cuda FASTATTN_REQUIRE_BACKENDS=triton timeout -s INT -k 30 420 \
		$$py -m pytest -q -n 8 -p no:cacheprovider -k "triton or cuda or fuzz or property" \
		$(GPU_TESTS)

gpu-bench: gpu-install
	$(GPU_PICK); status=0; \
	timeout -s INT -k 30 300 $$py -m fastattn.bench.cli --device cuda --quick --out bench/results || status=1; \
	$$py -m fastattn.bench.cli --markdown --device cuda --out bench/results --readme README.md \
		|| status=1; \
	exit $$status

gpu-check: gpu-install
	status=0; $(MAKE) gpu-test || status=1; $(MAKE) gpu-bench || status=1; exit $$status

clean:
	rm -rf build $(VENV) src/fastattn/*.so src/*.egg-info
