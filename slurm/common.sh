# Sourced by every slurm/*.sbatch script and by slurm/submit_pipeline.sh.
#
# Site settings: export any MP_* variable before submitting to override its default. sbatch
# passes the submitting shell's environment to the job (--export=ALL, the default), so the
# job sees the same values, and the python / megapuzzle on the submitting shell's PATH (an
# activated venv) unless a container is used. The defaults run without a container and
# without GPUs (CI's one-node CPU SLURM).

export MP_ACCOUNT=${MP_ACCOUNT:-}                 # sbatch --account (empty: your default)
export MP_PARTITION=${MP_PARTITION:-}             # sbatch --partition (empty: the cluster's default)
export MP_TIME=${MP_TIME:-04:00:00}               # time limit of every job; per stage: MP_TIME_BLD=2-00:00:00 ...
export MP_GPUS_PER_NODE=${MP_GPUS_PER_NODE:-0}    # 0: CPU only; 8 on a DGX H100
export MP_CPUS_PER_TASK=${MP_CPUS_PER_TASK:-1}    # CPUs per node-task (one task per node; e.g. 96 on a DGX H100)
export MP_GKD_NODES=${MP_GKD_NODES:-1}            # GKD is the one multi-node stage
export MP_CPU_PROCS_PER_NODE=${MP_CPU_PROCS_PER_NODE:-}  # CPU only: processes per node (default: TP x PP of the stage)
export MP_CONTAINER_IMAGE=${MP_CONTAINER_IMAGE:-} # pyxis image, e.g. nvcr.io#nvidia/pytorch:25.04-py3 (empty: none)
export MP_CONTAINER_MOUNTS=${MP_CONTAINER_MOUNTS:-}  # pyxis mounts, e.g. /lustre:/lustre (the run dir must be visible)
export MP_TASK_PROLOGUE=${MP_TASK_PROLOGUE:-}     # shell run before python in every task, e.g.
                                                  # 'source /lustre/venvs/mp/bin/activate' or 'export PYTHONPATH=/repo'
export MP_SBATCH_ARGS=${MP_SBATCH_ARGS:-}         # extra sbatch options for every job (e.g. --qos=high --exclusive)
export MP_SRUN_ARGS=${MP_SRUN_ARGS:-}             # extra srun options for every step
export MP_PYTHON=${MP_PYTHON:-python3}            # the interpreter with megapuzzle installed

if [ "$MP_GPUS_PER_NODE" -gt 0 ]; then
  # Megatron-core: one CUDA work queue keeps TP communication ordered before dependent compute.
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  # Surface NCCL hangs as errors instead of jobs that sit until their time limit.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-19}
  # Fabric-specific ones (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...) depend on the site: export them yourself.
fi

# Job logs are files: a progress bar redrawn 10x a second would bury the log lines.
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-60}

# ----------------------------------------------------------------------------- inside a job

# mp_args CONFIG RUN_DIR: check the two arguments every stage script takes
mp_args() {
  if [ $# -lt 2 ]; then
    echo "usage: sbatch slurm/<stage>.sbatch CONFIG RUN_DIR [...]" >&2
    exit 2
  fi
  CONFIG=$1 RUN=$2
  [ -f "$CONFIG" ] || { echo "[slurm] config $CONFIG does not exist (paths are relative to $PWD)" >&2; exit 2; }
  mkdir -p "$RUN"
  local id=${SLURM_JOB_ID:-?}
  [ -n "${SLURM_ARRAY_TASK_ID:-}" ] && id=${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID   # as sacct names it
  echo "[slurm] job $id on ${SLURM_JOB_NODELIST:-$(hostname)}: config $CONFIG, run $RUN"
}

# mp_nproc [CONFIG_SECTION]: processes per node: every GPU of the node, or on CPU
# MP_CPU_PROCS_PER_NODE, else tensor_parallel x pipeline_parallel of that config section.
mp_nproc() {
  if [ "${SLURM_GPUS_ON_NODE:-0}" -gt 0 ]; then echo "$SLURM_GPUS_ON_NODE"; return; fi
  if [ -n "$MP_CPU_PROCS_PER_NODE" ]; then echo "$MP_CPU_PROCS_PER_NODE"; return; fi
  if [ -z "${1:-}" ]; then echo 1; return; fi
  local tp pp
  tp=$(mp_helper get "$CONFIG" "$1.tensor_parallel" 1)
  pp=$(mp_helper get "$CONFIG" "$1.pipeline_parallel" 1)
  echo $((tp * pp))
}

# mp_launch NAME NPROC PYTHON_ARGS...: `python PYTHON_ARGS` (e.g. -m megapuzzle.cli bld ...) on
# every node of the job, as job step NAME (what sacct shows). One srun task per node; several
# processes per node (or several nodes) go through torchrun with the first node as master,
# else one plain process (no port, no rendezvous).
mp_launch() {
  local name=$1 nproc=$2; shift 2
  local nodes=${SLURM_JOB_NUM_NODES:-1}
  # shellcheck disable=SC2016  # expanded by the bash of each srun task, not here
  local run_py='exec "$MP_PYTHON" "$@"'
  local srun_args=(--job-name="$name" --nodes="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 "${MP_STEP_ARGS[@]}")
  if [ "$nodes" -gt 1 ] || [ "$nproc" -gt 1 ]; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    export MASTER_ADDR
    export MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 20000))}  # job-unique: array tasks may share a node
    # single quotes: SLURM_NODEID differs per node, so each srun task expands it itself
    # shellcheck disable=SC2016
    run_py='exec "$MP_PYTHON" -m torch.distributed.run --nnodes="$SLURM_NNODES" --node-rank="$SLURM_NODEID" \
      --nproc-per-node='"$nproc"' --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" "$@"'
  fi
  if [ "${SLURM_GPUS_ON_NODE:-0}" -eq 0 ]; then
    # CPU: split the task's CPUs between its processes instead of every process taking them all
    local t=$(( ${SLURM_CPUS_PER_TASK:-1} / nproc ))
    export OMP_NUM_THREADS=$(( t > 0 ? t : 1 ))
  fi
  echo "[slurm] $(date +%T) $nodes node(s) x $nproc process(es): python $*"
  srun "${srun_args[@]}" bash -c "${MP_TASK_PROLOGUE:+$MP_TASK_PROLOGUE; }$run_py" mp-task "$@"
}

# mp_helper ARGS...: slurm/helpers.py ARGS (python3 + PyYAML): in the container when there is one
mp_helper() {
  # shellcheck disable=SC2016  # expanded by the inner bash
  local py='exec "$MP_PYTHON" "$@"'
  if [ -n "$MP_CONTAINER_IMAGE" ]; then
    srun --nodes=1 --ntasks=1 "${MP_STEP_ARGS[@]}" bash -c "${MP_TASK_PROLOGUE:+$MP_TASK_PROLOGUE; }$py" \
      mp-helper "$MP_SLURM_DIR/helpers.py" "$@"
  else
    bash -c "${MP_TASK_PROLOGUE:+$MP_TASK_PROLOGUE; }$py" mp-helper "$MP_SLURM_DIR/helpers.py" "$@"
  fi
}

# mp_stage STAGE [NPROC]: one pipeline stage, recorded in RUN/manifest.json
mp_stage() {
  mp_launch "$1" "${2:-1}" -m megapuzzle.cli run "$CONFIG" --run-dir "$RUN" --only "$1"
  echo "[slurm] $(date +%T) stage $1 done"
}

# Where the slurm/ scripts live. sbatch runs a copy of the script from its spool directory,
# so it cannot find its siblings by its own path: submit_pipeline.sh exports MP_SLURM_DIR;
# a script submitted by hand falls back to slurm/ under the submit directory (the repo root).
export MP_SLURM_DIR=${MP_SLURM_DIR:-${SLURM_SUBMIT_DIR:-$PWD}/slurm}

# srun options of every step of a job
MP_STEP_ARGS=()
# Slurm 22.05's srun does not inherit the job's --cpus-per-task: pass it, or a step gets 1 CPU.
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && MP_STEP_ARGS+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
if [ -n "$MP_CONTAINER_IMAGE" ]; then
  # --container-name: the image is imported once per job, later steps reuse it
  MP_STEP_ARGS+=(--container-image="$MP_CONTAINER_IMAGE" --container-name=megapuzzle --container-workdir="$PWD")
  [ -n "$MP_CONTAINER_MOUNTS" ] && MP_STEP_ARGS+=(--container-mounts="$MP_CONTAINER_MOUNTS")
fi
# shellcheck disable=SC2206  # word splitting intended: a list of options
MP_STEP_ARGS+=($MP_SRUN_ARGS)
