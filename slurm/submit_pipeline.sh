#!/usr/bin/env bash
# The whole Puzzle pipeline as a chain of SLURM jobs, each starting when the one before it
# succeeded (--dependency=afterok); a failure cancels everything after it.
#
#   slurm/submit_pipeline.sh CONFIG RUN_DIR
#   e.g. slurm/submit_pipeline.sh examples/debug.yaml runs/debug                       # CPU, defaults
#   MP_ACCOUNT=llm MP_PARTITION=batch MP_GPUS_PER_NODE=8 MP_CPUS_PER_TASK=96 MP_GKD_NODES=4 \
#   MP_BLD_SHARDS=16 MP_SCORE_SHARDS=8 MP_TIME_BLD=1-00:00:00 \
#   MP_CONTAINER_IMAGE=nvcr.io#nvidia/pytorch:25.04-py3 MP_CONTAINER_MOUNTS=/lustre:/lustre \
#   MP_TASK_PROLOGUE='source /lustre/venvs/mp/bin/activate' \
#     slurm/submit_pipeline.sh my_llama.yaml /lustre/runs/l8b                                      # H100 cluster
#
# Chain (each job waits for the one before it; RUN/manifest.json records every stage):
#   parent -> bld[0..B-1] -> bld (verify) -> score[0..S-1] -> score (merge) -> measure -> mip
#          -> realize -> gkd -> evaluate -> export
# The manifest-writing jobs run one at a time (two `megapuzzle run --only` jobs at once would
# race on RUN/manifest.json); only the array tasks run side by side.
#
# Settings: every MP_* variable of slurm/common.sh, plus
#   MP_BLD_SHARDS (2), MP_SCORE_SHARDS (2)  array sizes (layer shards / library shards)
#   MP_BLD_NODES (1)  nodes per BLD task (a teacher larger than one node: TP x PP over several nodes)
#   MP_SCORE_NODES (1)  nodes per score task and for the merge (a parent larger than one node:
#              score.tensor_parallel x score.pipeline_parallel over several nodes)
#   MP_EVALUATE_NODES (1)  nodes of the evaluate job when the config splits it (evaluate.tensor_parallel x
#              pipeline_parallel > 1: whole nodes, TP x PP x DP ranks); else evaluate takes one GPU
#   MP_STAGES  the stages to submit (default: all, in the order above), e.g. MP_STAGES="mip realize gkd
#              evaluate export" to redo the end of a run whose earlier stages are done
#   MP_TIME_<STAGE>  time limit of that stage's jobs (default MP_TIME)
# Prints "<stage> <job id>" per job and writes the same to RUN/slurm/jobs.tsv; job logs go to
# RUN/slurm/logs/<job name>_<job id>[_<task>].out.
set -euo pipefail

if [ $# -ne 2 ]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export MP_SLURM_DIR=$here
# shellcheck source=common.sh
source "$here/common.sh"
CONFIG=$(realpath "$1")   # jobs may start in another directory: absolute paths only
RUN=$(realpath -m "$2")
[ -f "$CONFIG" ] || { echo "submit_pipeline: config $1 does not exist" >&2; exit 2; }
BLD_SHARDS=${MP_BLD_SHARDS:-2}
BLD_NODES=${MP_BLD_NODES:-1}
SCORE_SHARDS=${MP_SCORE_SHARDS:-2}
SCORE_NODES=${MP_SCORE_NODES:-1}
STAGES=${MP_STAGES:-parent bld score measure mip realize gkd evaluate export}
LOGS=$RUN/slurm/logs
mkdir -p "$LOGS"
: > "$RUN/slurm/jobs.tsv"

prev=""   # job id the next job waits for
# submit STAGE_NAME SCRIPT NODES GPUS_PER_NODE [sbatch options...] -- [script args...]
submit() {
  local stage=$1 script=$2 nodes=$3 gpus=$4; shift 4
  local opts=() args=() out="$LOGS/%x_%j.out" tvar
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do opts+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  args=("$@")
  tvar="MP_TIME_$(echo "${script%%.*}" | tr '[:lower:]' '[:upper:]')"   # bld.sbatch -> MP_TIME_BLD
  [[ " ${opts[*]} " == *" --array="* ]] && out="$LOGS/%x_%A_%a.out"
  opts+=(--parsable --export=ALL --kill-on-invalid-dep=yes --nodes="$nodes" --ntasks-per-node=1
         --cpus-per-task="$MP_CPUS_PER_TASK" --time="${!tvar:-$MP_TIME}" --output="$out")
  [ -n "$MP_ACCOUNT" ] && opts+=(--account="$MP_ACCOUNT")
  [ -n "$MP_PARTITION" ] && opts+=(--partition="$MP_PARTITION")
  [ "$gpus" -gt 0 ] && opts+=(--gpus-per-node="$gpus")
  [ -n "$prev" ] && opts+=(--dependency="afterok:$prev")
  # shellcheck disable=SC2206  # word splitting intended: a list of options
  opts+=($MP_SBATCH_ARGS)
  prev=$(sbatch "${opts[@]}" "$here/$script" "$CONFIG" "$RUN" "${args[@]}")
  prev=${prev%%;*}   # --parsable prints "id[;cluster]"
  printf '%s\t%s\n' "$stage" "$prev" | tee -a "$RUN/slurm/jobs.tsv"
}

G=$MP_GPUS_PER_NODE
ONE=$(( G > 0 ? 1 : 0 ))   # single-process stages take one GPU
# evaluate split over TP x PP ranks (read here with the submitting shell's python3 + PyYAML)
EVAL_MP=$(( $(python3 "$here/helpers.py" get "$CONFIG" evaluate.tensor_parallel 1) * \
            $(python3 "$here/helpers.py" get "$CONFIG" evaluate.pipeline_parallel 1) ))
EVAL_NODES=$(( EVAL_MP > 1 ? ${MP_EVALUATE_NODES:-1} : 1 ))
EVAL_GPUS=$(( EVAL_MP > 1 ? G : ONE ))
for stage in $STAGES; do
  case $stage in
    parent)   submit parent parent.sbatch 1 "$ONE" ;;
    bld)      submit bld bld.sbatch "$BLD_NODES" "$G" --array="0-$((BLD_SHARDS - 1))" -- "$BLD_SHARDS"
              submit bld-verify bld.sbatch "$BLD_NODES" "$G" --job-name=mp-bld-verify ;;
    score)    submit score score.sbatch "$SCORE_NODES" "$G" --array="0-$((SCORE_SHARDS - 1))" -- "$SCORE_SHARDS"
              # the merge runs the parent's forward (its metrics): split like the tasks' parent
              submit score-merge score.sbatch "$SCORE_NODES" "$G" --job-name=mp-score-merge ;;
    measure)  submit measure measure.sbatch 1 "$ONE" ;;
    mip)      submit mip mip.sbatch 1 0 ;;
    realize)  submit realize realize.sbatch 1 0 ;;
    gkd)      submit gkd gkd.sbatch "$MP_GKD_NODES" "$G" ;;
    evaluate) submit evaluate evaluate.sbatch "$EVAL_NODES" "$EVAL_GPUS" ;;
    export)   submit export export.sbatch 1 0 ;;
    *) echo "submit_pipeline: unknown stage '$stage' in MP_STAGES" >&2; exit 2 ;;
  esac
done
echo "submitted; watch: squeue -u ${USER:-$(id -un)}   logs: $LOGS"
echo "afterwards: sacct -j $(cut -f2 "$RUN/slurm/jobs.tsv" | paste -sd,)"
