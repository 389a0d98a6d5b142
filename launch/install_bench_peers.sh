#!/usr/bin/env bash
# Install launch/bench.py's peers (learn2learn, higher, TorchOpt) into the active Python
# environment, beside the torch that is already there, without letting pip replace that torch.
#
#   bash launch/install_bench_peers.sh
#
# Why not just `pip install -e '.[bench]'`: learn2learn 0.2.0's sdist ships Cython-generated C
# files that no longer compile on Python >= 3.11 (`fatal error: longintrepr.h`), and the peers'
# own requirements would pull other torch builds. So the peers go in with --no-deps, learn2learn
# is built from its .pyx sources with a current Cython, and only the modules they import at
# `import` time are added. Needs a C compiler and the Python headers (python3-dev).
set -euo pipefail

PY="${PYTHON:-python}"
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

if ! "$PY" -c "import learn2learn, higher, torchopt" 2>/dev/null; then
    # Pure-Python peers, and what the three import at module load (gym and scipy for learn2learn;
    # optree and graphviz for TorchOpt; numpy is torch's).
    pip_install --no-deps "higher>=0.2.1,<0.3" "torchopt>=0.7,<0.8"
    pip_install "optree>=0.9" "typing-extensions" "graphviz" "scipy" "gym" "tqdm" "requests"

    if ! "$PY" -c "import learn2learn" 2>/dev/null; then
        pip_install "cython>=3" "setuptools" "wheel"
        work="$(mktemp -d)"
        trap 'rm -rf "$work"' EXIT
        # The sdist only (--no-binary names learn2learn alone), its metadata prepared with the
        # Cython just installed: with --no-binary :all: pip built Cython itself from source for
        # the metadata step first, about 6 minutes of a cold CI run against 2 s.
        "$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary learn2learn \
            --no-build-isolation "learn2learn==0.2.0" -d "$work"
        tar -xzf "$work"/learn2learn-0.2.0.tar.gz -C "$work"
        src="$work/learn2learn-0.2.0"
        # Regenerate the C files for this Python from the shipped .pyx sources.
        for pyx in "$src"/learn2learn/data/*.pyx; do
            "$PY" -m cython -3 "$pyx" >/dev/null
        done
        pip_install --no-deps --no-build-isolation "$src"
    fi
fi

"$PY" - <<'EOF'
import learn2learn, higher, torchopt, torch
print(f"bench peers: learn2learn {learn2learn.__version__}, higher, "
      f"torchopt {torchopt.__version__}, beside torch {torch.__version__}")
EOF
