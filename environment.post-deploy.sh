#!/usr/bin/env bash
# Run by Snakemake (--sdm conda) inside the environment it has just built from environment.yml: installs this
# checkout, which the workflow names in LLAMA_ADAPTER_SOURCE (workflow/rules/common.smk), since a `-e .` in
# environment.yml would be read where Snakemake copied the file, not here. --no-deps: environment.yml pins the
# dependencies already.
set -euo pipefail
: "${LLAMA_ADAPTER_SOURCE:?not set: run this through the workflow (snakemake --sdm conda), or pip install -e . yourself}"
python -m pip install --quiet --no-deps -e "$LLAMA_ADAPTER_SOURCE"
