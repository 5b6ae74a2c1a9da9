#!/bin/sh
# Refresh the ConfigMap sources: kustomize reads files only under deploy/base, so the base keeps
# copies of configs/*.yaml. tests/deploy fails when they differ; run this after editing configs/.
set -eu
cd "$(dirname "$0")/.."
cp configs/encode.yaml configs/language.yaml deploy/base/configs/
