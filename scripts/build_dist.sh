#!/usr/bin/env bash
# `make dist`: the wheel, and Python environments packed for `spark-submit --archives ENV.tar.gz#environment`
# (Spark's Python packaging guide, venv-pack):
#   dist/spark_image_embeddings-*.whl
#   dist/env-ingest.tar.gz   the package and its base dependencies: enough for stage 1 (no torch)
#   dist/env-embed.tar.gz    the package with [embed] (torch, torchvision; several GB): only with EMBED=1
# venv-pack keeps a link to the interpreter the environment was made from, so build on a machine whose
# Python sits at the same path as on the cluster nodes (or use conda-pack for a fully relocatable one).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BASE_PYTHON=$("$PY" -c 'import sys; print(sys._base_executable)')
rm -rf dist build/env-ingest build/env-embed
"$PY" -m build --wheel --outdir dist . >/dev/null
wheel=$(ls dist/spark_image_embeddings-*.whl)
pack() {  # pack NAME REQUIREMENT
    "$BASE_PYTHON" -m venv "build/env-$1"
    "build/env-$1/bin/pip" install --quiet "$2"
    "$PY" -m venv_pack --quiet --prefix "build/env-$1" --output "dist/env-$1.tar.gz"
    echo "dist/env-$1.tar.gz ($(du -h "dist/env-$1.tar.gz" | cut -f1))"
}
pack ingest "$wheel"
if [ "${EMBED:-0}" = "1" ]; then
    pack embed "$wheel[embed]"
fi
echo "$wheel"
