# Sourced by train.sbatch and sweep.sbatch: the environment, `srun torchrun` on every node, and
# preemption. Reads CONFIG and OVERRIDES (set by the sbatch file) and these, all optional:
#   REPO           the project checkout (default: the folder sbatch was called from)
#   VENV           the virtual environment to activate (default: $REPO/.venv)
#   SETUP          shell code run first, e.g. SETUP="module load cuda/12.4 nccl"
#   GPUS_PER_NODE  worker processes per node (default: the job's GPUs on the node, SLURM_GPUS_ON_NODE, else
#                  those CUDA_VISIBLE_DEVICES names, else those nvidia-smi lists, which ignores both, else 1)
#   RDZV_PORT      torchrun's rendezvous port on the first node (default: derived from the job id)
#
# Time limits: #SBATCH --signal=B:USR1@180 sends USR1 to this batch shell 180 s before the end (and so does
# preemption where the site sets PreemptParameters=send_user_signal). The trap passes it to srun, which
# passes it to torchrun on every node; torchrun 2.15 passes on only the signals named in
# --signals-to-handle, so USR1 is added there. The trap also writes a file that the ranks take as the signal
# (train.stop_request), as srun passes nothing on to tasks it has not yet heard start. The ranks agree to stop
# at their next logging boundary (train.log_every_steps; validation and evaluation stop early too), save a
# checkpoint (seconds) and exit 0; only then does this script requeue the job, which resumes from that
# checkpoint with the same wandb run (a job started again goes on from its run's newest checkpoint, whatever
# train.resume says: pipeline/checkpoint.py). Ranks that fail instead are not requeued.
# SIGTERM to this shell (scancel --batch --signal=TERM, or a site's preemption that signals the batch shell)
# stops the ranks the same way, and the shell waits for their checkpoint instead of dying at once, but does not
# requeue (it may be a person's scancel; PreemptMode=REQUEUE requeues a job itself) and exits 143, so that
# `afterok` dependents do not start. A TERM that Slurm sends to the whole job (a plain scancel, the end of the
# time limit, preemption's GraceTime) also reaches srun, which ends its tasks itself: ask sites for
# PreemptParameters=send_user_signal, and stop a job cleanly with `scancel --batch --signal=USR1 <job>`.
#
# NCCL settings worth knowing (export them in SETUP or before sbatch): NCCL_DEBUG=WARN (INFO to debug
# hangs), NCCL_SOCKET_IFNAME=<the fabric's interface> when nodes have several, NCCL_IB_HCA=<mlx5 ports>
# on InfiniBand, NCCL_IB_DISABLE=1 where there is none, TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (set here)
# so that a dead rank ends the job instead of hanging it, TORCH_NCCL_BLOCKING_WAIT=0.
set -uo pipefail

REPO=${REPO:-$SLURM_SUBMIT_DIR}
cd "$REPO" || exit 1

# The traps come first: a signal during SETUP or the environment's activation (a preemption soon after a start or a
# requeue) would otherwise end this shell, and the job with it, unrequeued.
preempted=0
srun_pid=
# Rank 0 writes this file only after every rank saved and stopped on the signal (train.stop_marker): the
# one sign of a clean stop, as torchrun itself exits non-zero whenever it passed a signal on.
marker=${STOP_MARKER:-$REPO/.stopped-$SLURM_JOB_ID}
# And this one once every rank has started, before the first step (train.start_marker).
started=${START_MARKER:-$REPO/.started-$SLURM_JOB_ID}
# And the ranks read this one as the signal itself (train.stop_request): srun drops a signal while it is still starting
# the tasks (it passes signals on only to tasks it knows have started), and the ranks then trained on, unstopped.
request=${STOP_REQUEST:-$REPO/.stop-$SLURM_JOB_ID}
rm -f "$marker" "$started" "$request"
trap 'rm -f "$request"' EXIT  # (in place of any EXIT trap of the sbatch file that sources this one)
terminated=0
ask_to_stop() {
  echo "$1" >"$request"
  [ -n "$srun_pid" ] && kill -USR1 "$srun_pid"  # the ranks' clean stop (Slurm may also send TERM to them itself)
}
on_usr1() {
  preempted=1
  echo "$(date +%T) job $SLURM_JOB_ID: USR1 (time limit or preemption): asking every rank to checkpoint and stop"
  ask_to_stop USR1
}
on_term() {
  terminated=1
  echo "$(date +%T) job $SLURM_JOB_ID: SIGTERM: asking every rank to checkpoint and stop; the job will not be requeued"
  ask_to_stop TERM
}
trap on_usr1 USR1
trap on_term TERM

if [ -n "${SETUP:-}" ]; then eval "$SETUP"; fi
# shellcheck disable=SC1091
source "${VENV:-$REPO/.venv}/bin/activate" || exit 1
if [ -z "${GPUS_PER_NODE:-}" ]; then
  # nvidia-smi lists every GPU of the node, allocated to this job or not: the last resort only.
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then GPUS_PER_NODE=$SLURM_GPUS_ON_NODE
  elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then GPUS_PER_NODE=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
  else GPUS_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
  fi
  [ "$GPUS_PER_NODE" -ge 1 ] || GPUS_PER_NODE=1
fi
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
# Below Linux's ephemeral ports (32768-60999), which a busy node's outgoing connections hold.
RDZV_PORT=${RDZV_PORT:-$((10000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# A fresh rendezvous store for every torchrun restart: the shared default can hand a restarted worker the
# dead workers' addresses (pytorch/pytorch#135712; README, "Several nodes without SLURM").
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

echo "$(date +%T) job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES node(s) x $GPUS_PER_NODE," \
     "rendezvous $HEAD_NODE:$RDZV_PORT, config $CONFIG ${OVERRIDES:-}"
# One torchrun a node, whatever tasks the job asked for (sbatch --ntasks-per-node=8 would otherwise start 8),
# with every CPU the job has on the node (the fewest, where nodes differ): since Slurm 22.05 srun no longer
# takes sbatch's --cpus-per-task (its man page), and a step that does not ask again may get one CPU a task
# (reported on 23.x; 22.05.8 still gives it all), where torchrun, its workers and DALI's threads share one core.
cpus_per_node=$(tr ',' '\n' <<<"${SLURM_JOB_CPUS_PER_NODE:-}" | sed 's/(.*//' | grep -E '^[0-9]+$' | sort -n | head -n1)
# OVERRIDES is a list of key=value words: split on spaces, never expanded as file names (train.betas=[0.5,0.99]
# is a glob that a file named train.betas=5 would match).
set -f
# The workers' grace between the signal torchrun passes on and its SIGKILL, 30 s by default: the variable, which torchrun
# before its --shutdown-timeout flag (early 2026) ignores, where the flag would stop it with "unrecognized arguments".
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=150
if [ "$preempted" = 1 ] || [ "$terminated" = 1 ]; then
  # Stopped before the ranks started (below): srun would pass the signal on to torchruns that have no handler for it
  # yet (they install theirs once their rendezvous is done), killing them.
  status=0
else
  # shellcheck disable=SC2086
  srun --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 ${cpus_per_node:+--cpus-per-task=$cpus_per_node} \
    --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_NNODES" --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_backend c10d --rdzv_endpoint "$HEAD_NODE:$RDZV_PORT" --rdzv_id "$SLURM_JOB_ID" \
    --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    launch/train.py --config "$CONFIG" ${OVERRIDES:-} "train.stop_marker=$marker" "train.start_marker=$started" \
    "train.stop_request=$request" &
  srun_pid=$!
  while :; do  # `wait` returns early whenever the trap runs; wait again until srun has really ended
    wait "$srun_pid"
    status=$?
    kill -0 "$srun_pid" 2>/dev/null || break
  done
fi
if { [ "$preempted" = 1 ] || [ "$terminated" = 1 ]; } && [ ! -f "$marker" ] && [ ! -f "$started" ]; then
  # No rank had trained: the stop came before srun, or before torchrun's rendezvous, which it handles signals only
  # after (it killed torchrun then, or the ranks before their own handlers).
  echo "$(date +%T) job $SLURM_JOB_ID: the stop came before the ranks started: nothing new to save"
  echo "the run's newest checkpoint, as before this job" >"$marker"
fi
rm -f "$started"
if [ "$terminated" = 1 ] && [ -f "$marker" ]; then
  echo "$(date +%T) job $SLURM_JOB_ID: ranks stopped cleanly on SIGTERM; newest checkpoint: $(cat "$marker"); not requeued" \
       "(submit the job again to resume from it: train.resume auto, the default, finds it)"
  rm -f "$marker"
  exit 143  # 128 + SIGTERM: stopped, not finished
elif [ "$preempted" = 1 ] && [ -f "$marker" ]; then
  echo "$(date +%T) job $SLURM_JOB_ID: ranks stopped cleanly; requeueing to resume from $(cat "$marker")"
  rm -f "$marker"
  trap '' TERM  # the requeue itself ends this job: its TERM must not read as a person's
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    echo "$(date +%T) job $SLURM_JOB_ID: scontrol requeue failed: submit the same job again to resume (sbatch --requeue is needed)"
    exit 1
  fi
  exit 0
elif [ "$preempted" = 1 ] || [ "$terminated" = 1 ]; then
  # A rank failed (the save, or anything else): a requeue would loop on the fault or lose work silently.
  echo "$(date +%T) job $SLURM_JOB_ID: ranks failed after the stop signal (status $status): not requeued; read the log above"
  exit $((status == 0 ? 1 : status))
fi
echo "$(date +%T) job $SLURM_JOB_ID: training ended with status $status"
exit "$status"
