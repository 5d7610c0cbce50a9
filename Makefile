# `make demo` and `make test` work on a fresh machine: both run `make setup` first, which is idempotent.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# MinIO for the tests' local S3 server, built from source with Go (the version `@latest` gave on 2026-11-23).
MINIO_VERSION ?= v0.0.0-20260212201848-7aac2a2c5b7c
MINIO  := .tools/bin/minio

.PHONY: setup demo test lint clean bench dist

# The environments, MinIO and the jars are independent steps: built side by side.
setup:
	@$(MAKE) --no-print-directory -j3 $(VENV)/.installed $(MINIO) .cache/ivy/.warm .venv-airflow/.installed \
		.venv-airflow3/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

$(MINIO):
	@command -v go >/dev/null || { echo "Go is needed to build the local S3 server (MinIO)"; exit 1; }
	GOBIN=$(CURDIR)/.tools/bin go install github.com/minio/minio@$(MINIO_VERSION)

# Resolve Delta, hadoop-aws and the AWS SDK bundle from Maven Central once; later runs start offline.
.cache/ivy/.warm: $(VENV)/.installed conf/local.yaml
	$(PY) scripts/warm_jars.py --config conf/local.yaml
	touch $@

# Separate environments with Airflow 2 and 3 and their Amazon and Databricks providers, to load and run the DAG in
# tests; moto's server stands in for S3, EMR and EMR Serverless there (tests/airflow_probe.py).
AIRFLOW_PROVIDERS := "apache-airflow-providers-amazon>=9,<10" "apache-airflow-providers-databricks>=7,<8" \
	"moto[server]>=5.1,<6"
.venv-airflow/.installed: pyproject.toml
	test -x .venv-airflow/bin/python || $(PYTHON) -m venv .venv-airflow
	.venv-airflow/bin/python -m pip install --quiet --upgrade pip
	.venv-airflow/bin/python -m pip install --quiet "apache-airflow==2.11.2" $(AIRFLOW_PROVIDERS) -e .
	touch $@

.venv-airflow3/.installed: pyproject.toml
	test -x .venv-airflow3/bin/python || $(PYTHON) -m venv .venv-airflow3
	.venv-airflow3/bin/python -m pip install --quiet --upgrade pip
	.venv-airflow3/bin/python -m pip install --quiet "apache-airflow==3.3.2" $(AIRFLOW_PROVIDERS) -e .
	touch $@

# The wheel and the environments packed for spark-submit --archives (EMBED=1 adds the torch one).
dist: setup
	PY=$(PY) bash scripts/build_dist.sh

demo: setup
	$(PY) scripts/demo.py --config conf/local.yaml

# Two pytest workers: much of a test's time is spent waiting on Spark's scheduling, JVM starts and subprocesses.
# (Three ran out of memory on 24 GiB: each worker's Spark driver grows to about 4.7 GB, beside the tests' own JVMs.)
# The two tests that kill or time Python workers (cluster, notebook) share one worker, the two that run whole pipelines
# in processes of their own (demo, spark-submit) another (xdist_group): neither pair overlaps itself.
test: setup
	$(PY) -m pytest -n 2 --dist loadgroup

lint: setup
	$(VENV)/bin/ruff check src tests jobs scripts
	$(VENV)/bin/mypy src

clean:
	rm -rf demo .pytest_cache .mypy_cache .ruff_cache

# Benchmarks against the article's pipelines (prints a Markdown table, writes bench/results/latest.md): our two
# functions against the article's UDF bodies, then the whole pipeline on 2,000 and on 600 photos, three peers each in
# a fresh process (the article's two Spark scripts, ours, the article's Daft pipeline; Daft's output checked against
# ours) and each of our stages' rate inside Spark against its function's on the same 2 cores. Then the
# nightly-scale benchmark (N=1,000 and 4,000 photos, 20 changed; appends to bench/results/nightly.md; 12-15 min idle),
# then similarity search on 300,000 synthetic embeddings: the index against exact search (bench/results/similarity.md).
bench: setup $(VENV)/.bench-installed
	$(PY) bench/run.py
	$(PY) bench/nightly.py
	$(PY) bench/similarity.py

# Daft and deltalake for the benchmark's Daft peer (the `bench` extra): not installed for `make test`. After
# `setup` (order only: a phony target), so the two pip installs never run at once, even with -j.
$(VENV)/.bench-installed: pyproject.toml | setup
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $@

# On a machine with a GPU (torch, torchvision, Pillow; no Spark needed): PYTHONPATH=src python bench/gpu.py
