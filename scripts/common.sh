# Sourced by every script that starts glmtune's Python code. The scripts do not change folder: paths you give
# (MODEL, TRAIN_FILE, OUTPUT_DIR, CHECKPOINT, ...) are relative to the folder you run them from, and the
# repository's own files (the defaults: models/tiny-glm, data/adgen-toy/...) are reached through $REPO.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
# glmtune's Python code is this checkout's, whichever one pip installed (an editable install points at one only).
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# CUDA: memory grows in expandable segments rather than fixed blocks, so that training's varying batch shapes do
# not fragment it (the memory plan of --max_memory_gib counts on what is reserved staying close to what is used).
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

# The default output folder's name for a training file: its folder and stem, so that runs on different data
# do not share a folder (data/adgen-toy/train.json -> adgen-toy-train, AdvertiseGen/train.json -> AdvertiseGen-train).
data_name() {
    local folder name
    folder=$(cd "$(dirname -- "$1")" 2>/dev/null && pwd) || folder=$(dirname -- "$1")
    name=$(basename -- "$1")
    echo "$(basename -- "$folder")-${name%.*}"
}

# Build the embedded tiny model when MODEL points at it and it is not there yet.
ensure_model() {
    if [ "$(realpath -m -- "$1")" = "$REPO/models/tiny-glm" ] && [ ! -f "$1/config.json" ]; then
        echo "Building the embedded tiny model in $1 (first run only, about 30 s) ..."
        "${PYTHON:-python3}" "$REPO/scripts/build_tiny_model.py" --out "$1"
    fi
}
