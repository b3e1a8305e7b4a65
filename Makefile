# `make test` and `make bench` each do the whole set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# A CPU build of torch is on disk on the project machines; users get their own build
# through the package's own range (torch>=2.4).
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: test bench bench-quick bench-pytest train install clean

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
test: $(STAMP)
	FASTATTN_REQUIRE_REDIS=1 FASTATTN_REQUIRE_BACKENDS=cpp,numba,triton \
		.ci/with-redis $(PY) -m pytest -q -p no:cacheprovider tests

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
# then BAHE's ablation rows over item token strings at text lengths 1,024 and 2,048.
train: $(STAMP)
	$(VENV)/bin/fastattn-train --out bench/results
	$(VENV)/bin/fastattn-train --models llm_ctr,fp,fp_abe,bahe --lengths 64,128 --users 160 \
		--items 2000 --cats 100 --candidates 8 --max-history 512 --behaviour-types 3 \
		--epochs 1 --batch-size 64 --embed-dim 32 --threads 1 --out bench/results/train_bahe

clean:
	rm -rf build $(VENV) src/fastattn/*.so src/*.egg-info
