#!/bin/sh
# nsrsh.sh -- ssh replacement for Open MPI's rsh launcher on an emulated cluster (hvdcomp/netns.py).
#   mpirun --mca plm rsh --mca plm_rsh_agent .../nsrsh.sh ...
# Open MPI calls:  nsrsh.sh [options] <host> <daemon command words...>
# and this runs the daemon command inside the network namespace that owns <host>, with its own
# UTS namespace and hostname so the ranks there look like another node.
# HVDCOMP_NSRSH_MAP (set by hvdcomp.netns.EmulatedLink) maps hosts:  addr=namespace=hostname,...
while [ $# -gt 0 ]; do          # skip ssh-style options Open MPI may pass (-x, -o X, ...)
  case $1 in
    -o|-l|-p|-i) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
host=$1; shift
ns=; name=
old_ifs=$IFS; IFS=,
for entry in ${HVDCOMP_NSRSH_MAP:-}; do
  case $entry in
    "$host="*) rest=${entry#*=}; ns=${rest%%=*}; name=${rest#*=} ;;
  esac
done
IFS=$old_ifs
if [ -z "$ns" ]; then
  echo "nsrsh.sh: host '$host' is not in HVDCOMP_NSRSH_MAP='${HVDCOMP_NSRSH_MAP:-}'" >&2
  exit 1
fi
exec ip netns exec "$ns" unshare --uts sh -c "hostname $name; $*"
