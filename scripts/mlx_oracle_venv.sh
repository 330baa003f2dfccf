#!/usr/bin/env bash
# The MLX oracle for tests/engine/test_mlx_format.py: Kyutai's moshi_mlx on MLX's Linux CPU build, in a
# venv of its own (.venv-mlx, or the folder given), since moshi-mlx pins its own mlx and numpy.
set -euo pipefail
venv="${1:-$(dirname "$0")/../.venv-mlx}"
python3 -m venv "$venv"
"$venv/bin/pip" install -q "mlx==0.26.5" "mlx-cpu==0.26.5" "numpy>=2.1,<2.3"
# Only moshi_mlx.models is used: its audio and server dependencies are left out.
"$venv/bin/pip" install -q --no-deps "moshi-mlx==0.3.0"
