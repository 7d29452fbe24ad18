#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests and CI (Debian/Ubuntu, as root):
#   sudo scripts/slurm-local-cluster.sh          install (apt) if needed, configure, start, wait until the node is idle
#   scripts/slurm-local-cluster.sh --check       exit 0 if a cluster answers (sinfo shows an idle/mixed node)
# It writes /etc/munge/munge.key (if missing) and /etc/slurm/slurm.conf (this host, its CPUs and memory, one
# partition "debug"), then starts munged, slurmctld and slurmd. Safe to run again: daemons already up are kept.
set -euo pipefail

answers() { timeout 10 sinfo -h -o '%T' 2>/dev/null | grep -Eq 'idle|mixed|allocated'; }

if [[ "${1:-}" == "--check" ]]; then
    answers
    exit $?
fi
if answers; then
    echo "slurm-local-cluster: a cluster already answers"; sinfo
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "slurm-local-cluster: needs root (apt-get, /etc/slurm, daemons)" >&2
    exit 77
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
        || ! command -v sbatch >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || true
    apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi

# munge: a key only the munge user reads
if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged

host=$(hostname -s)
# nproc obeys OMP_NUM_THREADS, which `make test` sets to 1 for its processes: the node's real CPUs
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
mem_mb=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 1024 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > /etc/slurm/slurm.conf <<CONF
# written by rlhf scripts/slurm-local-cluster.sh: one node, this machine
ClusterName=local
SlurmctldHost=${host}
AuthType=auth/munge
CryptoType=crypto/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
SchedulerType=sched/backfill
MpiDefault=none
NodeName=${host} CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
CONF

pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
for _ in $(seq 60); do
    if answers; then
        echo "slurm-local-cluster: up"; sinfo
        exit 0
    fi
    scontrol update nodename="${host}" state=resume >/dev/null 2>&1 || true
    sleep 1
done
echo "slurm-local-cluster: the node did not come up; see /var/log/slurm/" >&2
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
