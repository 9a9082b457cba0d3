#!/bin/bash
# slurm/cluster/stop.sh [DAEMON...] -- stop the daemons started by start.sh, by their PID files
# (never by name). With no arguments: slurmd, slurmctld and munged. A PID file that names no live
# process of that command is reported as stale and removed.
set -u
pidfile_of() { case "$1" in slurmd) echo /run/slurmd.pid ;; slurmctld) echo /run/slurmctld.pid ;;
                            munged) echo /run/munge/munged.pid ;; *) return 1 ;; esac; }
stop() {
    local comm=$1 pidfile pid
    pidfile=$(pidfile_of "$comm") || { echo "unknown daemon $comm" >&2; return 1; }
    pid=$(cat "$pidfile" 2>/dev/null) || { echo "$comm: no PID file"; return 0; }
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ]; then
        kill -TERM "$pid"
        for _ in $(seq 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
        if [ -d "/proc/$pid" ]; then kill -KILL "$pid"; echo "$comm ($pid) killed after 10 s"; fi
        echo "stopped: $comm $pid"
    else
        echo "$comm: stale PID file ($pid)"
    fi
    rm -f "$pidfile"
}
if [ $# -eq 0 ]; then set -- slurmd slurmctld munged; fi
for daemon in "$@"; do stop "$daemon"; done
