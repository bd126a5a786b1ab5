#!/usr/bin/env bash
# The GPU checks of issue 20 in one call of a lent GPU machine, whose image has PyTorch, Lightning and
# an older transformers but no internet (benchmarks/README.md, "On a GPU").
#
#   bash benchmarks/gpu_checks.sh prepare       # here, once: wheels the GPU image lacks into .whl/, the
#                                               # bundled model's tokenizer and config into .carry/ (both ignored)
#   bash benchmarks/gpu_checks.sh run OUT       # there: one call carrying .whl and .carry, 600 s limit
#   bash benchmarks/gpu_checks.sh smoke OUT     # here: the same steps on the CPU at the bundled size
#
# run writes to OUT: bench_1b.json and .log (step seconds, MFU and peak memory of a random-weight 1.07B
# Llama on 128 persona pairs in bf16, each RM type, ours and ours-compiled), fit_<rm>.log (each persona
# config on that backbone: wall time and its phases only, since random weights learn nothing) and
# tests.log (the packed-pair tests, whose CUDA cases never run on a CPU). Each step has its own time
# limit, so one that hangs leaves the others their time; every log comes back.
set -uo pipefail
cd "$(dirname "$0")/.."

mode=${1:-}
out=${2:-}
python=${PYTHON:-python3}

# transformers at this project's floor or later, and what it needs newer than the image has (huggingface-hub 2.x
# and its HTTP stack, regex); jsonargparse for LightningCLI: the versions installed here
CARRIED="transformers huggingface-hub httpx2 httpcore2 h11 truststore hf-xet click regex jsonargparse docstring-parser
typeshed-client"

prepare() {
    set -e
    local versions
    versions=$(.venv/bin/python -c "import sys; from importlib.metadata import version as v; \
print(' '.join(f'{p}=={v(p)}' for p in sys.argv[1:]))" $CARRIED)
    rm -rf .whl .carry && mkdir -p .whl .carry
    # the GPU image's Python is 3.12; --no-deps: everything else these need is in the image
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $versions
    local model
    model=$(.venv/bin/python -c "from rm_lightning.models.backbones import ensure_bundled_model_cached as c; print(c())")
    mkdir -p .carry/tokenizer
    find "$model" -maxdepth 1 -type f ! -name model.safetensors -exec cp {} .carry/tokenizer/ \;
    du -sh .whl .carry
}

step() {  # step NAME SECONDS COMMAND...: run with a time limit, output to OUT/NAME.log, say how it ended
    local name=$1 seconds=$2
    shift 2
    local start=$SECONDS
    timeout "$seconds" "$@" > "$out/$name.log" 2>&1
    echo "$name: exit $? after $((SECONDS - start)) s"
}

checks() {  # checks DEVICE SHAPE PAIRS STEPS [extra fit arguments]: about 530 s of limits in all
    local device=$1 shape=$2 pairs=$3 steps=$4 accelerator=gpu backbone=/tmp/rm-gpu-checks/backbone
    shift 4
    [ "$device" = cpu ] && accelerator=cpu
    mkdir -p "$out"
    step backbone 60 $python benchmarks/random_backbone.py --shape "$shape" --tokenizer .carry/tokenizer \
        --out "$backbone"
    step bench_1b 260 $python benchmarks/bench_step.py --device "$device" --backbone "$backbone" --pairs "$pairs" \
        --batches persona --rm exrm imrm exgrm --variants ours ours-compiled --precision bf16 --steps "$steps" \
        --warmup 2 --skip-trl --timeout 80 --out "$out/bench_1b.json"
    for rm in exrm imrm exgrm; do  # no checkpoint: a 1B model's weights and Adam moments are 13 GB
        step "fit_$rm" 50 $python cli.py fit --config "configs/${rm}_persona.yaml" --trainer.accelerator "$accelerator" \
            --model.init_args.backbone "$backbone" --trainer.enable_checkpointing false \
            --trainer.default_root_dir /tmp/rm-gpu-checks/runs "$@"
    done
    step tests 60 $python -m pytest -q -p no:cacheprovider tests/test_pair_packing.py
}

case "$mode" in
    prepare)
        prepare ;;
    run)
        [ -n "$out" ] || { echo "usage: $0 run OUT" >&2; exit 2; }
        $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site
        mkdir -p "$out" && nvidia-smi -L > "$out/gpu.txt" 2>&1
        checks cuda llama-1b 128 10 ;;
    smoke)
        [ -n "$out" ] || { echo "usage: $0 smoke OUT" >&2; exit 2; }
        python=.venv/bin/python checks cpu as-is 8 2 --trainer.max_steps 2 --data.init_args.num_train 16 \
            --data.init_args.num_test 8 ;;
    *)
        echo "usage: $0 prepare | run OUT | smoke OUT" >&2
        exit 2 ;;
esac
