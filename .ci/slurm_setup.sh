#!/usr/bin/env bash
# A real one-node SLURM on this machine, so CI runs the slurm/ sbatch scripts for real
# (tests/test_slurm.py). Debian bookworm's slurm-wlm 22.05: munged + slurmdbd (MariaDB, so
# that `sacct` works) + slurmctld + slurmd, all started as plain daemons (no systemd in CI
# containers; policy-rc.d usually forbids apt from starting services anyway).
#
#   sudo .ci/slurm_setup.sh          # root; idempotent: re-running leaves a healthy cluster alone
#
# No cgroups in CI sandboxes: proctrack/linuxproc + task/none. CPU-only: no gres, no GPUs.
# Memory is not a consumable (CR_CPU), so jobs need no --mem. Logs: /var/log/slurm/.
set -euo pipefail

[ "$(id -u)" -eq 0 ] || { echo "slurm_setup: run as root" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
HOST=$(hostname -s)
CLUSTER=megapuzzle
CONF=/etc/slurm/slurm.conf
DBDCONF=/etc/slurm/slurmdbd.conf
LOG=/var/log/slurm

say() { echo "slurm_setup: $*"; }

# ---------------------------------------------------------------- packages (fresh machine)
need=()
for cmd in sbatch slurmctld slurmd slurmdbd munged mariadbd pgrep; do
  command -v "$cmd" >/dev/null || need+=("$cmd")
done
if [ ${#need[@]} -gt 0 ]; then
  say "installing slurm-wlm, slurmdbd, munge, mariadb-server (missing: ${need[*]})"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm slurmdbd munge mariadb-server procps >/dev/null
fi

# slurmctld/slurmd talk to each other by name: make sure this host's name resolves
# (CI containers do not always list it in /etc/hosts).
getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >> /etc/hosts

# ---------------------------------------------------------------- configuration
# Rewritten on every run; daemons are restarted only when it changed.
node_line=$(slurmd -C | head -n1)   # NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..
mkdir -p /etc/slurm "$LOG" /var/spool/slurmctld /var/spool/slurmd /run/munge
new_conf=$(cat <<EOF
# written by .ci/slurm_setup.sh: one-node CI cluster (do not edit; re-run the script)
ClusterName=$CLUSTER
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# no cgroups in CI sandboxes
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
SelectType=select/cons_tres
# CPUs are the only consumable: jobs need no --mem
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
# a node that was down (daemon restart) comes back by itself
ReturnToService=2
# give SIGTERM'd jobs time to exit before SIGKILL; keep finished jobs visible to scontrol a while
KillWait=15
MinJobAge=600
MaxArraySize=1001
$node_line State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
)
new_dbd=$(cat <<EOF
# written by .ci/slurm_setup.sh
DbdHost=localhost
SlurmUser=root
AuthType=auth/munge
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
LogFile=$LOG/slurmdbd.log
PidFile=/run/slurmdbd.pid
EOF
)
changed=0
if [ "$(cat "$CONF" 2>/dev/null)" != "$new_conf" ]; then echo "$new_conf" > "$CONF"; changed=1; fi
if [ "$(cat "$DBDCONF" 2>/dev/null)" != "$new_dbd" ]; then echo "$new_dbd" > "$DBDCONF"; changed=1; fi
chmod 600 "$DBDCONF"   # slurmdbd refuses a config others can read (it holds the DB password)

# stop_daemon NAME PIDFILE: only the daemon whose pid file we wrote, never by name
stop_daemon() {
  local pid
  pid=$(cat "$2" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    say "restarting $1 (config changed)"
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  fi
}
running() { pgrep -x "$1" >/dev/null; }

if [ "$changed" -eq 1 ]; then
  stop_daemon slurmd /run/slurmd.pid
  stop_daemon slurmctld /run/slurmctld.pid
  stop_daemon slurmdbd /run/slurmdbd.pid
fi

# ---------------------------------------------------------------- munge (auth)
[ -s /etc/munge/munge.key ] || mungekey --create --force
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge && chmod 0600 /etc/munge/munge.key
if ! running munged; then
  say "starting munged"
  runuser -u munge -- /usr/sbin/munged
fi
for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
munge -n | unmunge >/dev/null || { echo "slurm_setup: munge does not work; see /var/log/munge" >&2; exit 1; }

# ---------------------------------------------------------------- MariaDB + slurmdbd (sacct)
if ! mysqladmin ping >/dev/null 2>&1; then
  say "starting mariadb"
  /etc/init.d/mariadb start >/dev/null
fi
mysql -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
          GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
if ! running slurmdbd; then
  say "starting slurmdbd"
  slurmdbd
fi
# slurmdbd creates its tables on first start: wait until it answers
for _ in $(seq 120); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.5; done
sacctmgr -n list cluster >/dev/null || { echo "slurm_setup: slurmdbd does not answer; see $LOG/slurmdbd.log" >&2; exit 1; }
sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null

# ---------------------------------------------------------------- slurmctld + slurmd
if ! running slurmctld; then say "starting slurmctld"; slurmctld; fi
if ! running slurmd; then say "starting slurmd"; slurmd -N "$HOST"; fi

# wait for the node to come up idle (or already busy running CI jobs)
state=""
for _ in $(seq 120); do
  state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n1 || true)
  case "$state" in
    idle|mixed|allocated|completing) break ;;
    down*|drain*) scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
  esac
  sleep 0.5
done
case "$state" in
  idle|mixed|allocated|completing) ;;
  *) echo "slurm_setup: node $HOST is '${state:-not reported}'; see $LOG/slurmctld.log and $LOG/slurmd.log" >&2
     exit 1 ;;
esac
say "up: $(sinfo -h -o '%P %D %T %c CPUs' | head -n1) on $HOST; sacct works"
