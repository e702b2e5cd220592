#!/usr/bin/env bash
# One `accelerate launch` per node, for tools/slurm/train.sbatch and train_single_node.sbatch.
# Run it once per node inside an srun task (srun --ntasks-per-node=1 ... tools/slurm/launch.sh), so
# that SLURM_NODEID is this node's own (Accelerate's own Slurm example omits --machine_rank and crashes).
#
# Environment:
#   RECIPE           the recipe (required), e.g. recipes/imagenet_rn34_rn18.toml
#   RUN_DIR          optional: passed to the trainer as run.dir=$RUN_DIR
#   OVERRIDES        optional: space-separated section.key=value overrides (no spaces inside a value)
#   MODULE           quest.train (default) or quest.codebook
#   GPUS_PER_NODE    default: SLURM_GPUS_ON_NODE, else the GPUs nvidia-smi lists, else 1
#   MAIN_PORT        default: 20000 + SLURM_JOB_ID % 20000 (a requeued job keeps its id and port)
#   MACHINE_RANK     this node's rank; default SLURM_NODEID (read inside the task, never in the
#                    batch shell, where it is always 0)
#   QUEST_DRY_RUN=1  print the exact command instead of running it (testable without Slurm)
#   SLURM_NODEID, SLURM_JOB_NODELIST, SLURM_NNODES, SLURM_JOB_ID: set by Slurm.
# The head node (--main_process_ip) is the first host of SLURM_JOB_NODELIST, resolved with
# `scontrol show hostnames` when scontrol exists, else by a small parser for simple lists
# (`gpu[07-08]`, `gpu[01,03-04]`, `a,b`).
set -euo pipefail

# Expand a Slurm node list with at most one bracket group per comma-separated item.
expand_nodelist() {
    local list=$1 cur="" ch depth=0 i item prefix body suffix range lo hi n
    local -a items=() ranges=()
    for ((i = 0; i < ${#list}; i++)); do
        ch=${list:i:1}
        case $ch in
            "[") depth=$((depth + 1)) ;;
            "]") depth=$((depth - 1)) ;;
        esac
        if [[ $ch == "," && $depth -eq 0 ]]; then
            items+=("$cur")
            cur=""
        else
            cur+=$ch
        fi
    done
    items+=("$cur")
    for item in "${items[@]}"; do
        [[ -n $item ]] || continue
        if [[ $item =~ ^([^][]*)\[([^][]*)\](.*)$ ]]; then
            prefix=${BASH_REMATCH[1]} body=${BASH_REMATCH[2]} suffix=${BASH_REMATCH[3]}
            IFS=, read -ra ranges <<<"$body"
            for range in "${ranges[@]}"; do
                if [[ $range == *-* ]]; then
                    lo=${range%-*} hi=${range#*-}
                    for ((n = 10#$lo; n <= 10#$hi; n++)); do
                        printf '%s%0*d%s\n' "$prefix" "${#lo}" "$n" "$suffix"
                    done
                else
                    printf '%s%s%s\n' "$prefix" "$range" "$suffix"
                fi
            done
        else
            printf '%s\n' "$item"
        fi
    done
}

hostnames() {
    if command -v scontrol >/dev/null 2>&1; then
        scontrol show hostnames "$1"
    else
        expand_nodelist "$1"
    fi
}

count_gpus() {
    if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        nvidia-smi -L | grep -c '^GPU'
    else
        echo 1
    fi
}

: "${RECIPE:?set RECIPE to a recipe file, e.g. RECIPE=recipes/imagenet_rn34_rn18.toml}"
MODULE=${MODULE:-quest.train}
NODE_RANK=${MACHINE_RANK:-${SLURM_NODEID:-0}}
NODELIST=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-$(hostname)}}
NNODES=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(count_gpus)}
GPUS_PER_NODE=${GPUS_PER_NODE%%(*}  # "4(x2)" style values: keep the count
JOB_ID=${SLURM_JOB_ID:-0}
MAIN_PORT=${MAIN_PORT:-$((20000 + JOB_ID % 20000))}
mapfile -t HOSTS < <(hostnames "$NODELIST") # no `| head -1`: SIGPIPE under pipefail
HEAD=${HOSTS[0]:?cannot resolve the node list $NODELIST}
TOTAL=$((NNODES * GPUS_PER_NODE))

cmd=(accelerate launch)
if ((TOTAL > 1)); then
    cmd+=(--multi_gpu --num_machines "$NNODES" --num_processes "$TOTAL"
        --machine_rank "$NODE_RANK" --main_process_ip "$HEAD" --main_process_port "$MAIN_PORT"
        --rdzv_backend c10d)
else
    cmd+=(--num_processes 1)
fi
cmd+=(-m "$MODULE" "$RECIPE")
if [[ -n ${RUN_DIR:-} ]]; then
    cmd+=("run.dir=$RUN_DIR")
fi
if [[ -n ${OVERRIDES:-} ]]; then
    read -ra extra <<<"$OVERRIDES"
    cmd+=("${extra[@]}")
fi

if [[ ${QUEST_DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    exit 0
fi
echo "node $NODE_RANK/$NNODES ($(hostname)), head $HEAD:$MAIN_PORT: ${cmd[*]}" >&2
exec "${cmd[@]}"
