#!/usr/bin/env bash
# Submit the nightly steps (ingest, embed, neighbours, maintain; image_embeddings.ops.deploy.emr_steps) to a running
# EMR cluster:
#   deploy/emr/submit.sh CLUSTER_ID S3_PREFIX RUN_DATE
# S3_PREFIX holds what `make dist` built and the repo's jobs/ and conf/ (upload them first, e.g.
#   aws s3 cp dist/ S3_PREFIX/dist/ --recursive; aws s3 cp jobs/ S3_PREFIX/jobs/ --recursive;
#   aws s3 cp conf/emr.yaml S3_PREFIX/conf/). Credentials come from the AWS CLI's default chain.
set -euo pipefail
if [ $# -ne 3 ]; then
    echo "usage: $0 CLUSTER_ID S3_PREFIX RUN_DATE" >&2
    exit 2
fi
cluster_id=$1 s3_prefix=$2 run_date=$3
python=${PYTHON:-$(dirname "$0")/../../.venv/bin/python}
steps=$(mktemp)
trap 'rm -f "$steps"' EXIT
"$python" -m image_embeddings.ops.deploy emr-steps --s3-prefix "$s3_prefix" --run-date "$run_date" > "$steps"
${AWS:-aws} emr add-steps --cluster-id "$cluster_id" --steps "file://$steps"
