#!/bin/bash
# slurm/cluster/start.sh -- a single-node Slurm cluster on this machine, for tests and demos.
#
# Idempotent. As root it installs the Debian packages it needs (slurmctld slurmd slurm-client, and
# munge when HVDCOMP_SLURM_AUTH=munge), writes /etc/slurm/slurm.conf for this host (loopback only),
# starts the daemons in the background -- each writes a PID file that stop.sh uses, nothing is
# ever stopped by name -- and waits until the node is IDLE. Without systemd.
#
# Knobs (environment):
#   HVDCOMP_SLURM_AUTH=none|munge   authentication (default none: auth/none + cred/none)
#   HVDCOMP_SLURM_PARTITION=debug   the one partition (default debug)
#   HVDCOMP_SLURM_REALMEM=1024      RealMemory of the node in MB
#
# Prints "started: <daemon> ..." for each daemon this run started, so a caller can stop only those.
set -euo pipefail

AUTH=${HVDCOMP_SLURM_AUTH:-none}
PARTITION=${HVDCOMP_SLURM_PARTITION:-debug}
REALMEM=${HVDCOMP_SLURM_REALMEM:-1024}
HOST=$(hostname -s)
CONF=/etc/slurm/slurm.conf
log() { echo "[slurm/cluster/start $(date +%T)] $*"; }
die() { echo "[slurm/cluster/start] error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts slurmctld/slurmd)"

# --- 1. packages -------------------------------------------------------------------------------
packages=(slurmctld slurmd slurm-client)
[ "$AUTH" = munge ] && packages+=(munge)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get to install them"
    log "installing ${missing[*]}"
    # The packages' postinst scripts try to start the services; a policy-rc.d that exits 101
    # stops that. Create it only when there is none and remove only the one made here.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}"; then
        apt-get update -q
        apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
fi

# --- 2. the short host name must resolve (some Slurm code paths look it up) --------------------
getent hosts "$HOST" >/dev/null || echo "127.0.1.1 $HOST" >> /etc/hosts

# --- 3. slurm.conf -----------------------------------------------------------------------------
# The node's topology comes from `slurmd -C` so that slurmd does not drain itself for a mismatch.
topology=$(slurmd -C | head -1 | grep -o 'CPUs=[0-9]* .*ThreadsPerCore=[0-9]*')
install -d -o slurm -g slurm -m 0755 /var/lib/slurm/slurmctld /var/log/slurm
install -d -o root -g root -m 0755 /var/lib/slurm/slurmd /etc/slurm
if [ "$AUTH" = munge ]; then auth_lines=$'AuthType=auth/munge\nCredType=cred/munge'
else auth_lines=$'AuthType=auth/none\nCredType=cred/none'; fi

# JobCompType=jobcomp/filetxt lets `sacct -c` report finished jobs without slurmdbd;
# MinJobAge keeps finished jobs visible to squeue/scontrol for an hour; cred_expire (default 120 s)
# is also how long a requeued job waits before it may start again: 30 s keeps requeue tests short.
new_conf="# written by hvdcomp slurm/cluster/start.sh -- one node, loopback only
ClusterName=hvdcomp
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
${auth_lines}
AuthInfo=cred_expire=30
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
MinJobAge=3600
InactiveLimit=0
KillWait=5
Waittime=0
NodeName=${HOST} NodeAddr=127.0.0.1 ${topology} RealMemory=${REALMEM} State=UNKNOWN
PartitionName=${PARTITION} Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP"
conf_changed=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$new_conf" ]; then
    printf '%s\n' "$new_conf" > "$CONF"
    chmod 644 "$CONF"
    conf_changed=1
    log "wrote $CONF"
fi

# --- 4. daemons --------------------------------------------------------------------------------
# alive PIDFILE COMM: the PID file names a live process whose command is COMM.
alive() { local pid; pid=$(cat "$1" 2>/dev/null) || return 1
          [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]; }
stop_pidfile() { local pid; pid=$(cat "$1" 2>/dev/null) || return 0
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 0
    kill -TERM "$pid"
    for _ in $(seq 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    rm -f "$1"; }

if [ "$AUTH" = munge ]; then
    install -d -o munge -g munge -m 0755 /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key; chmod 600 /etc/munge/munge.key
    fi
    if ! alive /run/munge/munged.pid munged; then
        runuser -u munge -- /usr/sbin/munged      # forks, writes /run/munge/munged.pid
        echo "started: munged $(cat /run/munge/munged.pid)"
    fi
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

# A changed configuration (e.g. another AuthType) needs both daemons restarted.
if [ "$conf_changed" = 1 ]; then
    stop_pidfile /run/slurmd.pid slurmd
    stop_pidfile /run/slurmctld.pid slurmctld
fi
if ! alive /run/slurmctld.pid slurmctld; then
    /usr/sbin/slurmctld                            # daemonizes, writes /run/slurmctld.pid
    for _ in $(seq 50); do alive /run/slurmctld.pid slurmctld && break; sleep 0.1; done
    echo "started: slurmctld $(cat /run/slurmctld.pid)"
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
scontrol ping | grep -q UP || { tail -20 /var/log/slurm/slurmctld.log >&2; die "slurmctld does not answer"; }
if ! alive /run/slurmd.pid slurmd; then
    /usr/sbin/slurmd -N "$HOST"                    # daemonizes, writes /run/slurmd.pid
    for _ in $(seq 50); do alive /run/slurmd.pid slurmd && break; sleep 0.1; done
    echo "started: slurmd $(cat /run/slurmd.pid)"
fi

# --- 5. wait until the node takes jobs ---------------------------------------------------------
state=""
for _ in $(seq 150); do
    state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null || true)
    case "$state" in
        idle|mix|alloc) break ;;
        down*|drain*|drng*) scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.2
done
case "$state" in
    idle|mix|alloc) log "cluster up: $(sinfo -h -o '%P %a %D %t %N %c CPUs')" ;;
    *) tail -20 /var/log/slurm/slurmd.log >&2; die "node $HOST is '$state'" ;;
esac
