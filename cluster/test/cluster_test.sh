#!/bin/bash
# `make cluster-test`: both lab cluster paths, executed for real on this one machine (needs root).
#
#   1. Slurm: a single-node Slurm (Debian's slurm-wlm + munge, this machine's CPUs) runs
#      cluster/slurm/sweep.sbatch on sweeps/quickstart.yaml; the same job again (nothing may re-run); then a
#      fresh sweep cancelled with scancel while trials run and submitted again (no row lost or duplicated).
#   2. On-prem: an SSH server on 127.0.0.1 (Debian's openssh-server, a key made for the test, a test account),
#      `ray up` of a copy of cluster/onprem.yaml pointed at 127.0.0.1, `ray exec` of the quickstart sweep,
#      `ray rsync-down` of its results and `ray down`.
# Ends with one JSON line (see ledger_check.py report) and exit 0, or names the failed step and exits 1.
#
# Everything it starts (munged, slurmctld, slurmd, sshd, the jobs' Ray, the test account's processes) runs
# from a temp folder of its own, on free ports, bound to 127.0.0.1 where the daemon allows it, and is
# stopped by process id on exit; no system config is written. Debian packages it installs stay installed
# (their services are not started). The on-prem head's Ray runs as the test account, so the `ray stop`
# that `ray down` runs there cannot touch anyone else's Ray on this machine.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PY:-$REPO/.venv/bin/python}
RAY_CLI=$(dirname "$PY")/ray
SPEC=sweeps/quickstart.yaml
TEST_USER=grnnct
PACKAGES=(slurm-wlm munge openssh-server rsync netcat-openbsd python3-venv)
JOB_TIMEOUT_S=${CLUSTER_TEST_JOB_TIMEOUT_S:-3600}
started=$(date +%s)

log() { echo "cluster-test [$(date -u +%H:%M:%S)]: $*" >&2; }
die() { echo "cluster-test: FAILED: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "setup: must run as root (installs Debian packages, starts munge, Slurm and sshd, adds an account)"
[ -x "$PY" ] || die "setup: no Python at $PY (run through 'make cluster-test', which creates .venv)"
command -v apt-get >/dev/null && command -v dpkg-query >/dev/null || die "setup: needs a Debian machine (apt-get)"
unset RAY_ADDRESS RAY_AUTH_MODE RAY_AUTH_TOKEN RAY_AUTH_TOKEN_PATH
export RAY_USAGE_STATS_ENABLED=0

T=$(mktemp -d /tmp/grnn-ct.XXXXXX) || die "setup: cannot make a temp folder in /tmp"   # short: Ray's socket paths
chmod 755 "$T"
mkdir -p "$T/snap" "$T/results" "$T/rt"

pids=()            # daemons started here, stopped in reverse order
chain_pids=()      # the on-prem steps, run in a background subshell
created_user=0
created_run_sshd=0
ssh_control_dir=""
ssh_control_parent_existed=0

# ------------------------------------------------------------------------------------------------
# Cleanup: every process by id, the test account, the temp folder.
descendants_of_temp() {  # pids whose command line names $T, and all their children (Ray's workers)
    "$PY" - "$T" "$$" <<'EOF'
import os, sys
root, skip = sys.argv[1], {int(sys.argv[2]), os.getpid()}
cmdline, children = {}, {}
for entry in os.listdir("/proc"):
    if not entry.isdigit():
        continue
    try:
        with open(f"/proc/{entry}/cmdline", "rb") as f:
            cmdline[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        continue
    children.setdefault(ppid, []).append(int(entry))
found, todo = set(), [p for p, c in cmdline.items() if root in c and p not in skip]
while todo:
    pid = todo.pop()
    if pid not in found and pid not in skip:
        found.add(pid)
        todo.extend(children.get(pid, []))
print(" ".join(str(p) for p in sorted(found)))
EOF
}

stop_pids() {  # TERM, up to 20 s, then KILL
    local list=("$@") p alive
    [ ${#list[@]} -gt 0 ] || return 0
    kill -TERM "${list[@]}" 2>/dev/null
    for _ in $(seq 20); do
        alive=0
        for p in "${list[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && return 0
        sleep 1
    done
    kill -KILL "${list[@]}" 2>/dev/null
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    log "cleaning up"
    if [ -n "${SLURM_CONF:-}" ] && [ -f "$SLURM_CONF" ]; then
        jobs_left=$(squeue -h -o %i 2>/dev/null)
        if [ -n "$jobs_left" ]; then
            scancel $jobs_left 2>/dev/null
            for _ in $(seq 60); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 1; done
        fi
    fi
    stop_pids "${chain_pids[@]}"
    if [ "$created_user" = 1 ]; then
        mapfile -t user_pids < <(ps -o pid= -u "$TEST_USER" 2>/dev/null | tr -d ' ')
        stop_pids "${user_pids[@]}"
    fi
    for (( i=${#pids[@]}-1; i>=0; i-- )); do stop_pids "${pids[$i]}"; done
    read -r -a rest <<< "$(descendants_of_temp)"
    stop_pids "${rest[@]}"
    if [ "$created_user" = 1 ]; then
        userdel -r "$TEST_USER" 2>/dev/null || userdel "$TEST_USER"
        rm -rf "/tmp/ray-$TEST_USER"
    fi
    [ "$created_run_sshd" = 1 ] && rmdir /run/sshd 2>/dev/null
    if [ -n "$ssh_control_dir" ]; then
        rm -rf "$ssh_control_dir"
        [ "$ssh_control_parent_existed" = 1 ] || rmdir "$(dirname "$ssh_control_dir")" 2>/dev/null
    fi
    if [ "$rc" != 0 ]; then
        for f in "$T"/slurm/job-*.out "$T"/slurm/*.log "$T"/onprem/*.log "$T"/ssh/sshd.log; do
            [ -f "$f" ] && { echo "----- tail of $f" >&2; tail -n 25 "$f" >&2; }
        done
    fi
    rm -rf "$T"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {  # a TCP port nobody listens on
    "$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1]); s.close()"
}
port_busy() {
    "$PY" -c "import socket, sys; s = socket.socket(); sys.exit(s.connect_ex(('127.0.0.1', int(sys.argv[1]))) != 0)" "$1"
}
ledger() { (cd "$REPO" && "$PY" cluster/test/ledger_check.py "$@"); }
rows() {  # finished trials so far: parts/<key>.parquet (temporaries are hidden files)
    find "$1/parts" -maxdepth 1 -name '[!.]*.parquet' 2>/dev/null | wc -l
}

# ------------------------------------------------------------------------------------------------
log "step install: Debian packages ${PACKAGES[*]}"
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    # Installing must not start the packages' own daemons (sshd on port 22, munged, slurmd): policy-rc.d
    # says no to every service start while apt runs, unless the machine already has such a policy.
    created_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && created_policy=1
    fi
    apt-get update -qq >"$T/apt.log" 2>&1 \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            -o DPkg::Lock::Timeout=600 "${missing[@]}" >>"$T/apt.log" 2>&1
    apt_rc=$?
    [ "$created_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    [ "$apt_rc" = 0 ] || { tail -n 20 "$T/apt.log" >&2; die "step install: apt-get install ${missing[*]} failed (see above)"; }
fi
for c in munged mungekey slurmctld slurmd sbatch squeue scancel sshd ssh-keygen rsync nc; do
    command -v "$c" >/dev/null || [ -x "/usr/sbin/$c" ] || die "step install: '$c' is missing after installing ${PACKAGES[*]}"
done
export PATH="$PATH:/usr/sbin:/sbin"

# ------------------------------------------------------------------------------------------------
log "step munge: a key and a daemon of the test's own"
mkdir -p "$T/munge/run"
chown -R munge:munge "$T/munge" && chmod 711 "$T/munge" && chmod 755 "$T/munge/run" \
    || die "step munge: the Debian 'munge' account is missing"
runuser -u munge -- mungekey -c -k "$T/munge/munge.key" || die "step munge: mungekey could not make a key"
runuser -u munge -- munged -F --socket="$T/munge/run/munge.socket" --key-file="$T/munge/munge.key" \
    --pid-file="$T/munge/run/munged.pid" --log-file="$T/munge/munged.log" --seed-file="$T/munge/munged.seed" \
    >"$T/munge/out.log" 2>&1 &
pids+=($!)
for _ in $(seq 20); do [ -S "$T/munge/run/munge.socket" ] && break; sleep 0.5; done
[ -S "$T/munge/run/munge.socket" ] || { cat "$T/munge/out.log" >&2; die "step munge: munged did not start"; }

# ------------------------------------------------------------------------------------------------
log "step slurm: slurmctld + slurmd for this machine ($(nproc) CPUs), on 127.0.0.1"
node=$(hostname -s)
cpus=$(nproc)
mkdir -p "$T/slurm/state" "$T/slurm/spool"
cat >"$T/slurm/slurm.conf" <<EOF
# Single-node Slurm of make cluster-test: every path in $T, nothing in /etc.
ClusterName=grnnct
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$T/munge/run/munge.socket
StateSaveLocation=$T/slurm/state
SlurmdSpoolDir=$T/slurm/spool
SlurmctldPidFile=$T/slurm/slurmctld.pid
SlurmdPidFile=$T/slurm/slurmd.pid
SlurmctldLogFile=$T/slurm/slurmctld.log
SlurmdLogFile=$T/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
KillWait=30
MinJobAge=86400
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=test Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$T/slurm/slurm.conf"
slurmctld -D -f "$SLURM_CONF" >"$T/slurm/slurmctld.out" 2>&1 &
pids+=($!)
slurmd -D -f "$SLURM_CONF" >"$T/slurm/slurmd.out" 2>&1 &
pids+=($!)
for _ in $(seq 60); do sinfo -h -o %t 2>/dev/null | grep -qx idle && break; sleep 1; done
sinfo -h -o %t 2>/dev/null | grep -qx idle \
    || { tail -n 20 "$T/slurm/slurmctld.out" "$T/slurm/slurmd.out" >&2; die "step slurm: the node did not become idle"; }

submit() {  # submit the sweep job; prints the job id
    (cd "$REPO" && GRNN_PYTHON="$PY" GRNN_RAY_TMPDIR="$T/rt" sbatch --parsable --cpus-per-task="$cpus" \
        --output="$T/slurm/job-%j.out" cluster/slurm/sweep.sbatch "$SPEC" --results "$1") \
        || die "step slurm: sbatch refused the job"
}
job_state() { scontrol show job "$1" -o 2>/dev/null | tr ' ' '\n' | sed -n 's/^JobState=//p'; }
wait_job() {  # until the job left the queue; dies after JOB_TIMEOUT_S
    local deadline=$(( $(date +%s) + JOB_TIMEOUT_S ))
    while [ -n "$(squeue -h -j "$1" 2>/dev/null)" ]; do
        [ "$(date +%s)" -lt "$deadline" ] || die "step slurm: job $1 still running after ${JOB_TIMEOUT_S}s"
        sleep 5
    done
}
no_ray_left() {  # the job's Ray processes are gone (the script stops them when the job ends or is cancelled)
    local left
    for _ in $(seq 30); do
        left=$(descendants_of_temp | tr ' ' '\n' | while read -r p; do
            [ -n "$p" ] && tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | grep -q "$T/rt/grnn-ray-$1" && echo "$p"; done)
        [ -z "$left" ] && return 0
        sleep 1
    done
    die "step $2: Ray processes of job $1 still run after the job ended (pids $left)"
}
expect_state() {
    local state
    state=$(job_state "$1")
    [ "$state" = "$2" ] || { tail -n 30 "$T/slurm/job-$1.out" >&2; die "step $3: job $1 ended $state, expected $2"; }
}

# ------------------------------------------------------------------------------------------------
log "step sshd: an SSH server on 127.0.0.1 for a test account ($TEST_USER), key login only"
if getent passwd "$TEST_USER" >/dev/null; then
    case "$(getent passwd "$TEST_USER" | cut -d: -f6)" in
        /tmp/grnn-ct.*) userdel -r "$TEST_USER" 2>/dev/null || userdel "$TEST_USER" ;;  # an earlier run's
        *) die "step sshd: an account '$TEST_USER' exists and is not this test's; remove it or rename TEST_USER" ;;
    esac
fi
for _ in $(seq 30); do  # /etc/passwd may be locked a moment by another account change
    useradd --create-home --home-dir "$T/home" --shell /bin/bash "$TEST_USER" 2>"$T/useradd.log" && break
    sleep 2
done
getent passwd "$TEST_USER" >/dev/null || { cat "$T/useradd.log" >&2; die "step sshd: useradd $TEST_USER failed"; }
created_user=1
usermod -p '*' "$TEST_USER"   # no password, but not locked: sshd (without PAM) refuses locked accounts
mkdir -p "$T/ssh" "$T/onprem" "$T/launcher"
ssh-keygen -q -t ed25519 -N '' -f "$T/ssh/host_key" && ssh-keygen -q -t ed25519 -N '' -f "$T/ssh/client_key" \
    || die "step sshd: ssh-keygen failed"
install -d -m 700 -o "$TEST_USER" -g "$TEST_USER" "$T/home/.ssh"
install -m 600 -o "$TEST_USER" -g "$TEST_USER" "$T/ssh/client_key.pub" "$T/home/.ssh/authorized_keys"
[ -d /run/sshd ] || { mkdir -m 755 /run/sshd && created_run_sshd=1; }
ssh_port=$(free_port)
cat >"$T/ssh/sshd_config" <<EOF
Port $ssh_port
ListenAddress 127.0.0.1
HostKey $T/ssh/host_key
PidFile $T/ssh/sshd.pid
AllowUsers $TEST_USER
PermitRootLogin no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
UsePAM no
X11Forwarding no
Subsystem sftp internal-sftp
EOF
/usr/sbin/sshd -t -f "$T/ssh/sshd_config" || die "step sshd: sshd rejects its config"
/usr/sbin/sshd -D -e -f "$T/ssh/sshd_config" >"$T/ssh/sshd.log" 2>&1 &
pids+=($!)
for _ in $(seq 20); do port_busy "$ssh_port" && break; sleep 0.5; done
ssh -i "$T/ssh/client_key" -o IdentitiesOnly=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
    -o BatchMode=yes -p "$ssh_port" "$TEST_USER@127.0.0.1" true 2>"$T/onprem/ssh-check.log" \
    || { cat "$T/onprem/ssh-check.log" >&2; die "step sshd: key login to $TEST_USER@127.0.0.1:$ssh_port failed"; }

# ------------------------------------------------------------------------------------------------
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "step onprem cannot run here: the machine's python3 is older than 3.11 (cluster/onprem.yaml builds its venv with it)"
log "step onprem: ray up / exec / rsync-down / down of a copy of cluster/onprem.yaml pointed at 127.0.0.1"
for p in 6379 8076 8265; do
    ! port_busy "$p" || die "step onprem cannot run here: port $p (cluster/onprem.yaml's Ray head) is in use on this machine"
done
"$PY" -c "import secrets; print(secrets.token_hex(32), end='')" >"$T/onprem/auth_token" && chmod 600 "$T/onprem/auth_token"
cluster_name="grnnct-$(basename "$T" | cut -d. -f2 | tr 'A-Z' 'a-z')"
config="$T/onprem/onprem.yaml"
"$PY" - "$REPO/cluster/onprem.yaml" "$config" "$cluster_name" "$TEST_USER" "$T" "$ssh_port" <<'EOF' \
    || die "step onprem: could not write the test's copy of cluster/onprem.yaml"
import sys
import yaml
src, dst, name, user, tmp, port = sys.argv[1:]
config = yaml.safe_load(open(src, encoding="utf-8"))
config["cluster_name"] = name
config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
# The test's sshd listens on a free port on 127.0.0.1, not 22: ssh reaches it through nc.
config["auth"] = {"ssh_user": user, "ssh_private_key": f"{tmp}/ssh/client_key",
                  "ssh_proxy_command": f"nc 127.0.0.1 {port}"}
# The token made for this test, not the developer's ~/.ray/auth_token.
config["file_mounts"]["~/.ray/auth_token"] = f"{tmp}/onprem/auth_token"
yaml.safe_dump(config, open(dst, "w", encoding="utf-8"), sort_keys=False)
EOF
# Where Ray's ssh keeps its control sockets for this cluster (ray/autoscaler/_private/command_runner.py).
ssh_control_dir=$("$PY" -c "import getpass, hashlib, sys; h = lambda s: hashlib.sha256(s.encode()).hexdigest()[:10]
print(f'/tmp/ray_ssh_{h(getpass.getuser())}/{h(sys.argv[1])}')" "$cluster_name")
[ -d "$(dirname "$ssh_control_dir")" ] && ssh_control_parent_existed=1
# The launcher's local-provider state and config cache go to the temp folder, not /tmp/ray.
ray_cli() { (cd "$REPO" && RAY_TMPDIR="$T/launcher" timeout "$JOB_TIMEOUT_S" "$RAY_CLI" "$@"); }
onprem_chain() {
    ray_cli up -y --no-config-cache "$config" >"$T/onprem/up.log" 2>&1 || die "step onprem: ray up failed"
    log "onprem: ray up done; ray exec of the quickstart sweep"
    ray_cli exec "$config" "cd ~/grnn-sweep && python -m orchestrator.sweep $SPEC --address auto" \
        >"$T/onprem/exec.log" 2>&1 || die "step onprem: ray exec of the sweep failed"
    ray_cli rsync-down "$config" "~/grnn-sweep/results/quickstart" "$T/results/onprem/" \
        >"$T/onprem/rsync.log" 2>&1 || die "step onprem: ray rsync-down failed"
    ray_cli down -y "$config" >"$T/onprem/down.log" 2>&1 || die "step onprem: ray down failed"
    sleep 3
    left=$(ps -o pid=,args= -u "$TEST_USER" | grep -v -e sshd -e 'ps -o' || true)
    [ -z "$left" ] || die "step onprem: processes of $TEST_USER still run after ray down: $left"
    log "onprem: ray rsync-down and ray down done: $(rows "$T/results/onprem/quickstart") rows fetched"
}

slurm_chain() {
    # One sweep, three jobs: cancelled while trials run, resumed to the end, resubmitted (nothing may run).
    local results="$T/results/slurm" job n deadline
    log "step slurm-cancel: sbatch cluster/slurm/sweep.sbatch $SPEC --results $results; scancel while trials run"
    job=$(submit "$results") || exit 1
    deadline=$(( $(date +%s) + JOB_TIMEOUT_S ))
    while :; do
        n=$(rows "$results/quickstart")
        [ "$n" -ge 3 ] && break
        [ -n "$(squeue -h -j "$job")" ] || die "step slurm-cancel: job $job ended before 3 trials finished"
        [ "$(date +%s)" -lt "$deadline" ] || die "step slurm-cancel: no 3 trials finished in ${JOB_TIMEOUT_S}s"
        sleep 1
    done
    [ "$(job_state "$job")" = RUNNING ] || die "step slurm-cancel: job $job is $(job_state "$job"), not RUNNING"
    log "scancel $job at $n rows"
    scancel "$job"
    wait_job "$job"
    expect_state "$job" CANCELLED slurm-cancel
    no_ray_left "$job" slurm-cancel
    ledger snapshot "$results/quickstart" >"$T/snap/cancel-at.json" || die "step slurm-cancel: no ledger"

    log "step slurm-run: job $job cancelled with $(rows "$results/quickstart") rows; the same sbatch again runs the rest"
    job=$(submit "$results") || exit 1
    wait_job "$job"
    expect_state "$job" COMPLETED slurm-run
    no_ray_left "$job" slurm-run
    ledger snapshot "$results/quickstart" >"$T/snap/slurm-1.json"
    log "job $job done: $(rows "$results/quickstart") rows"

    log "step slurm-rerun: the same sbatch once more; nothing may run"
    job=$(submit "$results") || exit 1
    wait_job "$job"
    expect_state "$job" COMPLETED slurm-rerun
    no_ray_left "$job" slurm-rerun
    grep -q "nothing to run" "$T/slurm/job-$job.out" || die "step slurm-rerun: the sweep did not report 'nothing to run'"
    ledger snapshot "$results/quickstart" >"$T/snap/slurm-2.json"
}

# The on-prem path in the background (its venv install mostly waits on the network), the Slurm path here.
onprem_chain &
onprem_pid=$!
chain_pids+=("$onprem_pid")
slurm_chain
wait "$onprem_pid" || die "step onprem failed (see above)"

# ------------------------------------------------------------------------------------------------
log "step report"
ledger report --slurm "$T/results/slurm/quickstart" --onprem "$T/results/onprem/quickstart" --snapshots "$T/snap" --seconds $(( $(date +%s) - started ))
