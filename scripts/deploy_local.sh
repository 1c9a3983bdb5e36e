#!/usr/bin/env bash
# A real Flower deployment on this machine: a SuperLink and one SuperNode per client on 127.0.0.1, with TLS
# and SuperNode authentication (certificates and node keys are generated into <out>/flwr/). Every process it
# starts is stopped by its own id when the run ends, fails or is interrupted.
#
#   scripts/deploy_local.sh [--insecure] [fedmml deploy options...]
#   scripts/deploy_local.sh --preset tiny --method lw --set data.root="$PWD/data/emoji" --out runs/deploy
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${FEDMML_BIN:-$here/.venv/bin}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
exec "$bin/fedmml" deploy "$@"
