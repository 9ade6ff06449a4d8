#!/usr/bin/env bash
# Snakemake runs this inside the new environment, from the workflow's working directory (the
# repository root): install the project and the pipeline tools its stages use (DVCLive, plots),
# pinned in pyproject.toml.
set -euo pipefail
python -m pip install --quiet --editable '.[pipeline]'
