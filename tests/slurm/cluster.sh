#!/usr/bin/env bash
# A local two-node Slurm cluster for the Slurm tests: each node (and the controller) runs in
# its own network namespace (ip netns + veth on a bridge) with its own address and hostname
# (unshare --uts), so a job's ranks really talk across "nodes" over TCP.
#
#   tests/slurm/cluster.sh up STATE_DIR     # start munged, slurmctld, slurmd node1 + node2
#   tests/slurm/cluster.sh down STATE_DIR   # stop them and remove the namespaces
#
# Needs root and Debian's slurm-wlm + munge (make slurm-test installs them).
set -euo pipefail
ACTION=$1
STATE=$(realpath -m "$2")
NET=10.77.0
NODES=(node1 node2)
CPUS=${SLURM_TEST_CPUS:-2}

ns_exec() {  # ns hostname cmd...: run cmd in the namespace with its own hostname
    local ns=$1 host=$2; shift 2
    ip netns exec "$ns" unshare --uts -- sh -c 'hostname "$0"; exec "$@"' "$host" "$@"
}

down() {
    for pid in "$STATE"/*.pid; do
        [ -e "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true
    done
    sleep 1
    for ns in seesaw-ctl seesaw-node1 seesaw-node2; do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
        rm -rf "/etc/netns/$ns"
    done
    ip link del seesaw-br 2>/dev/null || true
}

up() {
    down
    mkdir -p "$STATE"/{spool,log,munge}
    chmod 755 "$STATE" "$STATE/munge"  # clients reach munged's socket through it
    # --- network: a bridge in the root namespace, one veth per host
    ip link add seesaw-br type bridge
    ip addr add "$NET.1/24" dev seesaw-br
    ip link set seesaw-br up
    local hosts="$NET.10 ctl"
    local i=11
    for n in "${NODES[@]}"; do hosts+=$'\n'"$NET.$i $n"; i=$((i + 1)); done
    i=10
    for n in ctl "${NODES[@]}"; do
        local ns=seesaw-$n
        ip netns add "$ns"
        ip link add "v-$n" type veth peer name eth0 netns "$ns"
        ip link set "v-$n" master seesaw-br up
        ip netns exec "$ns" ip addr add "$NET.$i/24" dev eth0
        ip netns exec "$ns" ip link set eth0 up
        ip netns exec "$ns" ip link set lo up
        mkdir -p "/etc/netns/$ns"  # ip netns exec bind-mounts this over /etc/hosts
        printf '127.0.0.1 localhost\n%s\n' "$hosts" > "/etc/netns/$ns/hosts"
        i=$((i + 1))
    done
    # --- munge: one key, one daemon; its socket is a file, reachable from every namespace
    dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$STATE/munge/munge.key"
    munged --force --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/socket" \
        --pid-file="$STATE/munged.pid" --log-file="$STATE/log/munged.log" \
        --seed-file="$STATE/munge/seed"
    # --- slurm.conf
    local nodelist
    nodelist=$(IFS=,; echo "${NODES[*]}")
    cat > "$STATE/slurm.conf" <<CONF
ClusterName=seesawtest
SlurmctldHost=ctl($NET.10)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/socket
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
KillWait=5
InactiveLimit=0
MinJobAge=300
NodeName=DEFAULT CPUs=$CPUS State=UNKNOWN
CONF
    # slurmd loads a cgroup plugin even with proctrack/linuxproc; autodetect fails where
    # /sys/fs/cgroup is a tmpfs of v1 mounts (a hybrid host), so name the version mounted.
    local cg=cgroup/v1
    [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ] && cg=cgroup/v2
    printf 'CgroupPlugin=%s\nCgroupAutomount=no\n' "$cg" > "$STATE/cgroup.conf"
    i=11
    for n in "${NODES[@]}"; do
        echo "NodeName=$n NodeAddr=$NET.$i" >> "$STATE/slurm.conf"
        i=$((i + 1))
    done
    echo "PartitionName=debug Nodes=$nodelist Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES" \
        >> "$STATE/slurm.conf"
    export SLURM_CONF=$STATE/slurm.conf
    mkdir -p "$STATE/spool/ctld"
    ns_exec seesaw-ctl ctl slurmctld -f "$SLURM_CONF" -i
    for n in "${NODES[@]}"; do
        mkdir -p "$STATE/spool/$n"
        ns_exec "seesaw-$n" "$n" slurmd -f "$SLURM_CONF" -N "$n"
    done
    for _ in $(seq 60); do  # both nodes idle
        if [ "$(sinfo -h -t idle -o %D 2>/dev/null | paste -sd+ | bc 2>/dev/null)" = "${#NODES[@]}" ]; then
            return 0
        fi
        sleep 1
    done
    echo "slurm test cluster did not come up; logs in $STATE/log" >&2
    sinfo -N >&2 || true
    return 1
}

"$ACTION"
