#!/usr/bin/env bash
# local_slurm.sh -- a REAL Slurm cluster on this machine, for tests and CI: one node on loopback,
# or several nodes, each a network namespace with its own slurmd, hostname and address.
#
# Usage
#   bash scripts/local_slurm.sh install
#   bash scripts/local_slurm.sh start  [--nodes 1] [--state-dir DIR]
#   bash scripts/local_slurm.sh stop   [--state-dir DIR]
#   bash scripts/local_slurm.sh status [--state-dir DIR]
#   bash scripts/local_slurm.sh env    [--state-dir DIR]   # print the export line(s) only
#   bash scripts/local_slurm.sh crash-node   node2 [--state-dir DIR]  # several nodes: SIGKILL the node
#   bash scripts/local_slurm.sh restart-node node2 [--state-dir DIR]  # its slurmd again; waits until up
#
#   eval "$(bash scripts/local_slurm.sh start)"   # starts (or reuses) the cluster and
#                                                 # exports SLURM_CONF in this shell
#   sbatch --wrap hostname; squeue; sacct -j <id> -n -P -o JobID,State,ExitCode
#   bash scripts/local_slurm.sh stop
#
#   `start` prints ONLY `export VAR=value` lines on stdout (everything else goes to
#   stderr), so its stdout can be eval'ed.  It is idempotent: if the cluster of that
#   state dir is already up and healthy it says so (stderr), prints the exports and
#   exits 0; a half-running cluster is stopped and started afresh.  Configs are
#   regenerated only when daemons are (re)started: to change the shape below
#   (LOCAL_SLURM_*), run `stop` first.
#   The same lines are written to DIR/env.sh (`source DIR/env.sh`).
#
# What it runs (all as root, all private to the state dir, default /tmp/prunetune-slurm;
# the machine's own /etc/munge, /etc/slurm, /etc/mysql are never read or changed):
#   munged     key DIR/munge/munge.key (dir 700), socket DIR/munge-run/munge.socket.2
#              (dir 755).  munged requires every directory above its socket to be
#              searchable by all ("Socket is inaccessible: execute permissions for all
#              required on ..."); pytest's tmp_path is under /tmp/pytest-of-root (700),
#              so for such a DIR the socket dir is /tmp/prunetune-munge-<hash of DIR>.
#   mariadbd   own datadir DIR/mysql (mysql_install_db on first start), TCP 127.0.0.1 only
#   slurmdbd   accounting daemon: `sacct` (and so submitit) needs it; without accounting
#              every job state reads UNKNOWN.  The cluster registers itself on first
#              contact, no sacctmgr needed.
#   slurmctld  controller, SlurmctldHost=<hostname -s>(127.0.0.1)
#   slurmd     one per node: `--nodes 1`: one node named `hostname -s`, NodeAddr 127.0.0.1;
#              `--nodes N`: node1..nodeN, see "Several nodes" below
#   Logs: DIR/log/*.log   Pid files: DIR/run/*.pid   Configs: DIR/etc/*
#
# Client tools (sbatch, srun, squeue, sacct, scancel, scontrol, sinfo) work from any
# shell once SLURM_CONF is exported: slurm.conf carries
#   AuthInfo=socket=DIR/munge-run/munge.socket.2,cred_expire=10
# so every Slurm component (clients included) talks to the private munged, and
#   AccountingStoragePass=DIR/munge-run/munge.socket.2
# which is how Slurm 22.05 picks the munge socket for slurmctld/sacct -> slurmdbd traffic
# (without it: `sacct: error: Munge encode failed: Failed to access
# "/run/munge/munge.socket.2": No such file or directory (Did you start munged?)`).
# slurmdbd reads slurmdbd.conf from the directory of $SLURM_CONF (must be mode 600,
# owned by SlurmUser=root), which is why both files live in DIR/etc.
# Jobs inherit SLURM_CONF from the submitting shell (sbatch --export=ALL, the default),
# so `srun` inside a batch script (submitit does that) finds the cluster too.  A job
# submitted with --export=NONE would not.
#
# Cluster shape (override with environment variables when starting):
#   LOCAL_SLURM_CPUS=8        CPUs declared per node (the machine has fewer real cores;
#                             SlurmdParameters=config_overrides makes slurmd accept it),
#                             so several small jobs run at once.
#   LOCAL_SLURM_MEM_MB=16000  RealMemory per node.  Memory is NOT a consumable
#                             (SelectTypeParameters=CR_CPU): --mem only has to fit it.
#   LOCAL_SLURM_GPUS=4        fake GPUs per node: Gres=gpu:N, gres.conf File= points at
#                             symlinks to /dev/null in DIR/dev (a count without File= is
#                             dropped, regular files are rejected).  `--gpus-per-node=2`
#                             works and jobs see CUDA_VISIBLE_DEVICES.
#   LOCAL_SLURM_PORT_BASE=16817  slurmctld=BASE, slurmd=BASE+1, slurmdbd=BASE+2,
#                                mariadb=BASE+3 (all on 127.0.0.1; with several nodes each
#                                slurmd listens on BASE+1 of its own namespace)
#   LOCAL_SLURM_STATE_DIR     default for --state-dir
#   LOCAL_SLURM_TIMEOUT=60    seconds to wait for each daemon to come up
# One partition `debug` (Default=YES, MaxTime=INFINITE) with all nodes.
#
# Behaviour worth knowing (Slurm 22.05.8 from Debian 12):
#   * No cgroups here: ProctrackType=proctrack/linuxproc, TaskPlugin=task/none,
#     JobAcctGatherType=jobacct_gather/none -- nothing limits a job's CPU or memory.
#   * Speed: SchedulerParameters=batch_sched_delay=0 (the default waits ~3 s per round),
#     sched_interval=1 and bf_interval=1 (a job that becomes eligible by time alone, such
#     as a requeued one, is otherwise picked up only by a later scheduling pass),
#     cred_expire=10: a requeued job is held until requeue time + cred_expire + 1 s, so
#     it runs again after ~11-12 s (with the default 120 s, after ~2 min).  KillWait=5.
#   * MinJobAge=300: finished jobs stay in slurmctld's memory 5 min.  Once purged, a
#     dependency on them is treated as SATISFIED (afterok:<failed, purged job> runs!),
#     so submit dependents while their parents are still known (squeue -t all).
#   * DependencyParameters=kill_invalid_depend: a job whose dependency can never be
#     satisfied (e.g. aftercorr on a failed array element) is CANCELLED rather than
#     left pending forever.
#   * A *pending* array element that is cancelled leaves no sacct record at all (it was
#     never split off the array's meta record): `scancel 31_2` on a pending element makes
#     31_2 vanish from sacct; cancelling the whole array leaves one meta record such as
#     `31_[5-20] CANCELLED`.  Elements cancelled by kill_invalid_depend did get their
#     own CANCELLED record in our tests (aftercorr, 6 elements, array limit %2).
#   * The logs show "mpi/pmix_v4: ... can not load PMIx library" errors: harmless (the
#     libpmix2 package is only recommended, MpiDefault=none).
#   * submitit adds `--signal=USR2@90` by default; the signal reaches the job steps
#     (Slurm may send it up to 60 s early, as its docs say).
#   * `stop` cancels all jobs first (so no slurmstepd/job processes survive), then stops
#     the daemons by pid file and kills leftovers that belong to this state dir (with several
#     nodes, then removes the namespaces, veths and bridge).  The
#     controller state and the database are kept in DIR, so job ids keep counting up
#     across stop/start and sacct keeps its history.  `rm -rf DIR` after `stop` gives a
#     completely fresh cluster.
#
# Several nodes (`start --nodes N`, 2 <= N <= 64; the other commands read N from DIR/etc/nodes):
#   * Network: a bridge ptbr<tag> with $SUBNET.1/24 on the host (LOCAL_SLURM_SUBNET, default 10.200.0),
#     one veth pair per node whose peer sits in the network namespace pt<tag>-nodeI with address
#     $SUBNET.(10+I); <tag> is a hash of DIR, so clusters of other state dirs keep their own names.
#     munged, MariaDB, slurmdbd and slurmctld stay on the host (SlurmctldHost=<hostname>($SUBNET.1),
#     AccountingStorageHost=$SUBNET.1); munge works across namespaces through its socket file.
#   * Each slurmd runs as `nsenter --net=/run/netns/pt<tag>-nodeI unshare --uts --mount sh -c "mount
#     --bind DIR/etc/hosts /etc/hosts && hostname nodeI && exec slurmd -N nodeI"`.  Not `ip netns exec`:
#     it remounts /sys and hides /sys/fs/cgroup ("Unable to initialize cgroup plugin").  The private
#     hosts file (the controller and every node) resolves node names for slurmd and for the jobs
#     (MASTER_ADDR=node1), and the machine's /etc/hosts is never changed.  Spool, pid and log files
#     are per node (slurmd-%n).  Start-up takes 3-5 s.
#   * Failure detection: MessageTimeout=2, SlurmdTimeout=4 (LOCAL_SLURM_MESSAGE_TIMEOUT,
#     LOCAL_SLURM_SLURMD_TIMEOUT; one node keeps 5/30).  Detection is bounded by MessageTimeout more than
#     by SlurmdTimeout: with these a crashed node is DOWN and its job NODE_FAIL after ~8-11 s (with
#     10/10, 25-32 s).  ReturnToService=2: a restarted slurmd makes its node usable at once.
#   * `crash-node NODE` SIGKILLs every process in the node's namespace (slurmd, slurmstepd and the job
#     itself; killing slurmd alone would leave the job steps running).  The other nodes' part of a job
#     is killed by slurmctld once the job is NODE_FAIL.  `restart-node NODE` starts its slurmd again.
#   * `stop` also kills whatever still runs in the namespaces and deletes them, the veths and the bridge.
#   * Requeue: nothing is set, so SLURM's defaults hold (JobRequeue=1, no RequeueExit): a batch job is
#     requeueable.  When a node dies, slurmctld requeues its running batch jobs at once, under the same job
#     id (`sacct --duplicates`: the NODE_FAIL record, then a new PENDING one ~2-4 s later, Submit = the
#     requeue time); the job waits for cred_expire + 1 s and for nodes enough, then runs again with
#     SLURM_RESTART_COUNT=1.  Only a job submitted with --no-requeue ends NODE_FAIL for good.
#
# Exit codes: 0 ok, 1 failure (the tail of the relevant log is printed; a failed
# `start` stops whatever it had started), 2 usage error, 3 `status`: not (fully) running.
# The error `sbatch: fatal: Could not establish a configuration source` means
# SLURM_CONF is not set in that shell (Slurm then looks for /etc/slurm/slurm.conf).

set -euo pipefail
umask 022 # directories we create must be world-searchable (munged checks that)

# ----------------------------------------------------------------------------- settings
PKGS=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server iproute2)  # iproute2: --nodes > 1 (netns)

STATE_DIR="${LOCAL_SLURM_STATE_DIR:-/tmp/prunetune-slurm}"
NODES=1
NODES_GIVEN=""
CPUS="${LOCAL_SLURM_CPUS:-8}"
MEM_MB="${LOCAL_SLURM_MEM_MB:-16000}"
GPUS="${LOCAL_SLURM_GPUS:-4}"
PORT_BASE="${LOCAL_SLURM_PORT_BASE:-16817}"
TIMEOUT="${LOCAL_SLURM_TIMEOUT:-60}"
CLUSTER_NAME="prunetune"
PARTITION="debug"
CTLD_HOST="$(hostname -s)"
LOOPBACK="127.0.0.1"
# Several nodes only: the bridge's /24 (the controller is .1, node i is .(10+i)) and the failure
# detection timers (see the header).
SUBNET="${LOCAL_SLURM_SUBNET:-10.200.0}"
MULTI_SLURMD_TIMEOUT="${LOCAL_SLURM_SLURMD_TIMEOUT:-4}"
MULTI_MESSAGE_TIMEOUT="${LOCAL_SLURM_MESSAGE_TIMEOUT:-2}"

log() { printf '[local_slurm] %s\n' "$*" >&2; }
now_ms() { local t; t="$(date +%s%N)"; printf '%s\n' "$((t / 1000000))"; }
T0_MS="$(now_ms)"
step() { local t; t="$(now_ms)"; log "$(printf '%6.2fs' "$((t - T0_MS))e-3") $*"; }
die() { log "ERROR: $*"; exit 1; }
usage_error() {
  log "$*"
  log "usage: $0 {install|start|stop|status|env|crash-node NODE|restart-node NODE} [--nodes N] [--state-dir DIR]"
  exit 2
}

# Derive every path from STATE_DIR (called after argument parsing).
set_paths() {
  case "$STATE_DIR" in /*) ;; *) STATE_DIR="$(pwd)/$STATE_DIR" ;; esac
  STATE_DIR="${STATE_DIR%/}"
  ETC="$STATE_DIR/etc"
  LOGDIR="$STATE_DIR/log"
  RUNDIR="$STATE_DIR/run"
  SPOOL="$STATE_DIR/spool"
  DEVDIR="$STATE_DIR/dev"
  MUNGE_KEYDIR="$STATE_DIR/munge"
  MUNGE_RUNDIR="$(munge_rundir)"
  MUNGE_KEY="$MUNGE_KEYDIR/munge.key"
  MUNGE_SOCKET="$MUNGE_RUNDIR/munge.socket.2"
  MYSQL_DIR="$STATE_DIR/mysql"
  MYSQL_SOCKET="$RUNDIR/mysqld.sock"
  SLURM_CONF_PATH="$ETC/slurm.conf"
  SLURMDBD_CONF="$ETC/slurmdbd.conf"
  GRES_CONF="$ETC/gres.conf"
  PORT_CTLD=$((PORT_BASE))
  PORT_SLURMD=$((PORT_BASE + 1))
  PORT_DBD=$((PORT_BASE + 2))
  PORT_MYSQL=$((PORT_BASE + 3))
  HOSTS_FILE="$ETC/hosts"
  # Network names are global to the machine: a tag from the state dir keeps two clusters apart, and
  # keeps interface names within Linux's 15 characters.
  NET_TAG="$(printf '%s' "$STATE_DIR" | md5sum | cut -c1-6)"
  BRIDGE="ptbr$NET_TAG"
  CTLD_ADDR="$LOOPBACK"
  ((NODES == 1)) || CTLD_ADDR="$SUBNET.1"
  # A unix socket path must fit in sun_path (108 bytes incl. NUL).
  if ((${#MYSQL_SOCKET} > 100)); then
    usage_error "state dir path too long for a unix socket: $MYSQL_SOCKET"
  fi
}

# munged insists that every directory above its socket is searchable by everyone
# ("Socket is inaccessible: execute permissions for all required on ...") and the path
# must fit a unix socket.  pytest's tmp_path lives under /tmp/pytest-of-root (mode 700),
# so for such state dirs the socket goes to /tmp/prunetune-munge-<hash of state dir>.
munge_rundir() {
  local dir="$STATE_DIR/munge-run" p="$STATE_DIR"
  while [[ -n "$p" && "$p" != / ]]; do
    # others' permission bits end in x, or t for a sticky searchable dir such as /tmp
    if [[ -d "$p" ]] && [[ "$(stat -c %A "$p")" != *[xt] ]]; then dir=""; break; fi
    p="$(dirname "$p")"
  done
  if [[ -z "$dir" ]] || ((${#dir} > 80)); then
    dir="/tmp/prunetune-munge-$(printf '%s' "$STATE_DIR" | md5sum | cut -c1-12)"
  fi
  printf '%s\n' "$dir"
}

# ------------------------------------------------------------------------------ helpers
alive() { # alive PID -> 0 if the process exists and is not a zombie
  local state
  kill -0 "$1" 2>/dev/null || return 1
  # Daemons are reparented to pid 1, which may reap them late: a zombie is dead.
  state="$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null)"
  [[ "$state" != Z ]]
}

pid_of() { # pid_of NAME -> prints pid from RUNDIR/NAME.pid if that process is alive
  local f="$RUNDIR/$1.pid" pid
  [[ -s "$f" ]] || return 1
  pid="$(tr -dc '0-9' <"$f")"
  [[ -n "$pid" ]] && alive "$pid" || return 1
  printf '%s\n' "$pid"
}

port_open() { # port_open PORT -> 0 if something accepts TCP connections on 127.0.0.1:PORT
  (exec 3<>"/dev/tcp/$LOOPBACK/$1") 2>/dev/null
}

wait_for() { # wait_for DESCRIPTION LOGFILE CMD... -> polls CMD until it succeeds
  local what="$1" logfile="$2" deadline=$((SECONDS + TIMEOUT))
  shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      log "timed out after ${TIMEOUT}s waiting for $what; last lines of $logfile:"
      tail -n 25 "$logfile" >&2 2>/dev/null || true
      return 1
    fi
    sleep 0.2
  done
}

# The commands for the daemons and clients all see this cluster's config.
slurm_env() { env SLURM_CONF="$SLURM_CONF_PATH" "$@"; }

print_env() {
  printf 'export SLURM_CONF=%q\n' "$SLURM_CONF_PATH"
}

# ------------------------------------------------------------------------------ install
installed() { [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]; }

cmd_install() {
  local missing=() p
  for p in "${PKGS[@]}"; do installed "$p" || missing+=("$p"); done
  if ((${#missing[@]} == 0)); then
    log "all packages already installed: ${PKGS[*]}"
    return 0
  fi
  log "installing: ${missing[*]}"

  # Keep apt/dpkg from starting the system's munge/slurm/mariadb services:
  # invoke-rc.d obeys /usr/sbin/policy-rc.d exiting 101.  Restore whatever was there.
  local policy=/usr/sbin/policy-rc.d backup=""
  if [[ -e "$policy" ]]; then
    backup="$(mktemp)"
    cp -p "$policy" "$backup"
  fi
  # shellcheck disable=SC2064  # expand now: restore exactly this state on exit
  trap "if [[ -n '$backup' ]]; then cp -p '$backup' '$policy'; rm -f '$backup'; else rm -f '$policy'; fi" EXIT
  printf '#!/bin/sh\n# written by local_slurm.sh install: do not start services\nexit 101\n' >"$policy"
  chmod 755 "$policy"

  export DEBIAN_FRONTEND=noninteractive
  local apt_opts=(-y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold
                  --no-install-recommends)
  if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
    log "apt lists are empty: apt-get update"
    apt-get update -q >&2
  fi
  if ! apt-get install "${apt_opts[@]}" "${missing[@]}" >&2; then
    log "apt-get install failed; retrying after apt-get update"
    apt-get update -q >&2
    apt-get install "${apt_opts[@]}" "${missing[@]}" >&2
  fi
  for p in "${PKGS[@]}"; do installed "$p" || die "package $p is still not installed"; done
  log "installed: ${missing[*]}"
}

need_tools() {
  local t
  for t in munged munge unmunge slurmctld slurmd slurmdbd sinfo sacct scontrol squeue \
    mysql_install_db mysqladmin; do
    command -v "$t" >/dev/null 2>&1 || die "$t not found; run: bash $0 install"
  done
  command -v mariadbd >/dev/null 2>&1 || command -v mysqld >/dev/null 2>&1 \
    || die "mariadbd not found; run: bash $0 install"
}

# -------------------------------------------------------------------------------- nodes
# Everything that depends on the number of nodes lives here.
node_names() { # one node name per line
  if ((NODES == 1)); then
    printf '%s\n' "$CTLD_HOST"
  else
    local i
    for ((i = 1; i <= NODES; i++)); do printf 'node%d\n' "$i"; done
  fi
}

node_addr() { # node_addr NODE -> the address slurmctld uses to reach its slurmd
  if ((NODES == 1)); then printf '%s\n' "$LOOPBACK"; else printf '%s.%d\n' "$SUBNET" "$((10 + ${1#node}))"; fi
}

node_netns() { printf 'pt%s-%s\n' "$NET_TAG" "$1"; } # the network namespace of NODE (several nodes)

node_exec() { # node_exec NODE CMD... -> run CMD "on" NODE
  local node="$1"
  shift
  if ((NODES == 1)); then
    "$@"
    return
  fi
  # Not `ip netns exec`: it remounts /sys, which hides /sys/fs/cgroup from slurmd ("Unable to initialize
  # cgroup plugin").  nsenter joins only the network namespace; unshare gives the node its own hostname
  # and a private mount namespace in which the cluster's hosts file covers /etc/hosts, so node names
  # resolve for slurmd and for its jobs (MASTER_ADDR=node1) without touching the machine's /etc/hosts.
  nsenter --net="/run/netns/$(node_netns "$node")" unshare --uts --mount \
    sh -c 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"' sh "$HOSTS_FILE" "$node" "$@"
}

node_known() { # node_known NODE -> 0 if NODE is one of this cluster's nodes
  local n
  while read -r n; do [[ "$n" == "$1" ]] && return 0; done < <(node_names)
  return 1
}

net_up() { # bridge + one veth pair and network namespace per node (several nodes only)
  ((NODES > 1)) || return 0
  local n ns host_if peer_if
  net_down
  if ip -o -4 addr show | grep -qF " $CTLD_ADDR/"; then
    die "address $CTLD_ADDR is already in use (another multi-node cluster?); stop it or set LOCAL_SLURM_SUBNET"
  fi
  ip link add "$BRIDGE" type bridge
  ip addr add "$CTLD_ADDR/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  while read -r n; do
    ns="$(node_netns "$n")" host_if="pv${NET_TAG}h${n#node}" peer_if="pv${NET_TAG}p${n#node}"
    ip netns add "$ns"
    ip link add "$host_if" type veth peer name "$peer_if"
    ip link set "$host_if" master "$BRIDGE" up
    ip link set "$peer_if" netns "$ns"
    ip -n "$ns" addr add "$(node_addr "$n")/24" dev "$peer_if"
    ip -n "$ns" link set "$peer_if" up
    ip -n "$ns" link set lo up
  done < <(node_names)
  {
    printf '%s\tlocalhost\n' "$LOOPBACK"
    printf '%s\t%s\n' "$CTLD_ADDR" "$CTLD_HOST"
    while read -r n; do printf '%s\t%s\n' "$(node_addr "$n")" "$n"; done < <(node_names)
  } >"$HOSTS_FILE"
  step "network: bridge $BRIDGE ($CTLD_ADDR), namespaces $(node_netns 'node*')"
}

net_down() { # kill what runs in this cluster's namespaces, delete them, their veths and the bridge
  local ns pid link
  for ns in $(ip netns list 2>/dev/null | awk -v p="pt$NET_TAG-" 'index($1, p) == 1 {print $1}'); do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  # Deleting a namespace deletes its veth end and so the pair; these are what a failed start left.
  for link in $(ip -o link show 2>/dev/null | awk -F': ' -v p="pv$NET_TAG" 'index($2, p) == 1 {sub(/@.*/, "", $2); print $2}'); do
    ip link del "$link" 2>/dev/null || true
  done
  if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE" 2>/dev/null || true; fi
}

write_node_lines() { # the NodeName= lines of slurm.conf
  local n gres=""
  ((GPUS > 0)) && gres=" Gres=gpu:$GPUS"
  while read -r n; do
    printf 'NodeName=%s NodeAddr=%s NodeHostname=%s CPUs=%s RealMemory=%s%s State=UNKNOWN\n' \
      "$n" "$(node_addr "$n")" "$n" "$CPUS" "$MEM_MB" "$gres"
  done < <(node_names)
}

write_gres_lines() { # the lines of gres.conf: fake GPU "devices" (symlinks to /dev/null)
  local n files="$DEVDIR/nvidia0"
  ((GPUS > 0)) || return 0
  ((GPUS > 1)) && files="$DEVDIR/nvidia[0-$((GPUS - 1))]"
  while read -r n; do
    printf 'NodeName=%s Name=gpu File=%s\n' "$n" "$files"
  done < <(node_names)
}

start_slurmd() { # start_slurmd NODE
  local node="$1" pid
  if pid="$(pid_of "slurmd-$node")"; then
    log "slurmd ($node) already running (pid $pid)"
    return 0
  fi
  mkdir -p "$SPOOL/slurmd-$node"
  # -N: which NodeName= line this slurmd is; -f: config; it daemonizes itself.
  node_exec "$node" env SLURM_CONF="$SLURM_CONF_PATH" \
    slurmd -f "$SLURM_CONF_PATH" -N "$node" >>"$LOGDIR/slurmd-$node.out" 2>&1 \
    || { tail -n 25 "$LOGDIR/slurmd-$node.log" >&2 2>/dev/null; die "slurmd ($node) failed to start"; }
  wait_for "slurmd ($node) pid file" "$LOGDIR/slurmd-$node.log" pid_of "slurmd-$node"
  step "slurmd ($node) up"
}

# ------------------------------------------------------------------------------ configs
write_configs() {
  mkdir -p "$ETC" "$LOGDIR" "$RUNDIR" "$SPOOL/ctld" "$DEVDIR"
  chmod 755 "$ETC" "$LOGDIR" "$RUNDIR"

  # Fake GPU device files: gres.conf needs File=, and it must not be a regular file.
  local i message_timeout=5 slurmd_timeout=30
  for ((i = 0; i < GPUS; i++)); do ln -sfn /dev/null "$DEVDIR/nvidia$i"; done
  # Several nodes exist to test node failure: detect a dead node in ~10 s instead of ~30 s.
  if ((NODES > 1)); then message_timeout="$MULTI_MESSAGE_TIMEOUT" slurmd_timeout="$MULTI_SLURMD_TIMEOUT"; fi
  printf '%s\n' "$NODES" >"$ETC/nodes" # what stop/status/crash-node read when --nodes is not given

  cat >"$SLURM_CONF_PATH" <<EOF
# Generated by scripts/local_slurm.sh -- edits are overwritten on the next start.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$CTLD_HOST($CTLD_ADDR)
SlurmctldPort=$PORT_CTLD
SlurmdPort=$PORT_SLURMD
SlurmUser=root
SlurmdUser=root

# Private munge daemon for everything (clients read this file too).
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10

StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/slurmd-%n
SlurmctldPidFile=$RUNDIR/slurmctld.pid
SlurmdPidFile=$RUNDIR/slurmd-%n.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info

# No cgroups in this container.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true

# Scheduling: fast, several small jobs share a node.
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=1,sched_min_interval=0,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
PriorityType=priority/basic
DependencyParameters=kill_invalid_depend
SlurmdParameters=config_overrides
ReturnToService=2
MaxArraySize=10001

# Timers (seconds).
MinJobAge=300
KillWait=5
MessageTimeout=$message_timeout
SlurmdTimeout=$slurmd_timeout
SlurmctldTimeout=30
InactiveLimit=0
Waittime=0

# Accounting through slurmdbd (sacct).  The "password" is the munge socket to use.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$CTLD_ADDR
AccountingStoragePort=$PORT_DBD
AccountingStoragePass=$MUNGE_SOCKET
AccountingStorageTRES=gres/gpu
JobCompType=jobcomp/none

GresTypes=gpu
$(write_node_lines)
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

  {
    echo "# Generated by scripts/local_slurm.sh"
    echo "AutoDetect=off"
    write_gres_lines
  } >"$GRES_CONF"

  # slurmdbd.conf: read from dirname($SLURM_CONF); mode 600, owned by SlurmUser.
  (
    umask 077
    cat >"$SLURMDBD_CONF" <<EOF
# Generated by scripts/local_slurm.sh
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=$CTLD_ADDR
DbdPort=$PORT_DBD
SlurmUser=root
LogFile=$LOGDIR/slurmdbd.log
PidFile=$RUNDIR/slurmdbd.pid
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=$LOOPBACK
StoragePort=$PORT_MYSQL
StorageUser=root
StorageLoc=slurm_acct_db
EOF
  )
  chown root:root "$SLURMDBD_CONF"
  chmod 600 "$SLURMDBD_CONF"
}

# ------------------------------------------------------------------------------ daemons
munge_ok() { munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET"; }

start_munged() {
  local pid
  if pid="$(pid_of munged)" && munge_ok >/dev/null 2>&1; then
    log "munged already running (pid $pid)"
    return 0
  fi
  mkdir -p "$MUNGE_KEYDIR" "$MUNGE_RUNDIR"
  chmod 700 "$MUNGE_KEYDIR"
  chmod 755 "$MUNGE_RUNDIR"
  if [[ ! -s "$MUNGE_KEY" ]]; then
    (umask 077 && dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none)
  fi
  chmod 400 "$MUNGE_KEY"
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
  munged --key-file="$MUNGE_KEY" --socket="$MUNGE_SOCKET" --pid-file="$RUNDIR/munged.pid" \
    --seed-file="$MUNGE_KEYDIR/munged.seed" --log-file="$LOGDIR/munged.log" \
    >>"$LOGDIR/munged.out" 2>&1 \
    || { cat "$LOGDIR/munged.out" >&2; die "munged failed to start"; }
  wait_for munged "$LOGDIR/munged.log" munge_ok
  step "munged up"
}

mariadbd_bin() { command -v mariadbd || command -v mysqld; }

mysql_ok() { mysqladmin --no-defaults --socket="$MYSQL_SOCKET" -uroot ping; }

start_mariadb() {
  local pid
  if pid="$(pid_of mysqld)" && mysql_ok >/dev/null 2>&1; then
    log "mariadb already running (pid $pid)"
    return 0
  fi
  if [[ ! -d "$MYSQL_DIR/mysql" ]]; then
    log "initialising mariadb datadir $MYSQL_DIR"
    rm -rf "$MYSQL_DIR"
    mkdir -p "$MYSQL_DIR"
    # normal auth: root@localhost/127.0.0.1 without password (loopback only).
    mysql_install_db --no-defaults --user=root --datadir="$MYSQL_DIR" \
      --auth-root-authentication-method=normal --skip-test-db \
      >"$LOGDIR/mysql_install_db.log" 2>&1 \
      || { tail -n 25 "$LOGDIR/mysql_install_db.log" >&2; rm -rf "$MYSQL_DIR"; die "mysql_install_db failed"; }
    step "mariadb datadir initialised"
  fi
  # Small, durable-enough-for-tests settings: fast start, little memory.
  setsid "$(mariadbd_bin)" --no-defaults --user=root --datadir="$MYSQL_DIR" \
    --bind-address="$LOOPBACK" --port="$PORT_MYSQL" --socket="$MYSQL_SOCKET" \
    --pid-file="$RUNDIR/mysqld.pid" --log-error="$LOGDIR/mysqld.log" \
    --skip-name-resolve --skip-log-bin --performance-schema=OFF \
    --innodb-buffer-pool-size=64M --innodb-log-file-size=32M \
    --innodb-flush-log-at-trx-commit=0 --innodb-doublewrite=0 \
    --innodb-lock-wait-timeout=900 --max-connections=100 \
    </dev/null >>"$LOGDIR/mysqld.out" 2>&1 &
  wait_for mariadb "$LOGDIR/mysqld.log" mysql_ok
  step "mariadb up"
}

start_slurmdbd() {
  local pid
  if pid="$(pid_of slurmdbd)" && port_open "$PORT_DBD"; then
    log "slurmdbd already running (pid $pid)"
    return 0
  fi
  slurm_env slurmdbd >>"$LOGDIR/slurmdbd.out" 2>&1 \
    || { tail -n 25 "$LOGDIR/slurmdbd.log" >&2 2>/dev/null; die "slurmdbd failed to start"; }
  wait_for "slurmdbd on port $PORT_DBD" "$LOGDIR/slurmdbd.log" port_open "$PORT_DBD"
  step "slurmdbd up"
}

ctld_ok() { slurm_env scontrol ping | grep -q 'is UP'; }

start_slurmctld() {
  local pid
  if pid="$(pid_of slurmctld)" && ctld_ok >/dev/null 2>&1; then
    log "slurmctld already running (pid $pid)"
    return 0
  fi
  slurm_env slurmctld -f "$SLURM_CONF_PATH" >>"$LOGDIR/slurmctld.out" 2>&1 \
    || { tail -n 25 "$LOGDIR/slurmctld.log" >&2 2>/dev/null; die "slurmctld failed to start"; }
  wait_for slurmctld "$LOGDIR/slurmctld.log" ctld_ok
  step "slurmctld up"
}

nodes_idle() { # every node is up: idle, or busy with jobs (mix/alloc/comp)
  local n st
  while read -r n; do
    st="$(slurm_env sinfo -h -N -n "$n" -o '%t' 2>/dev/null | head -n1)"
    [[ "$st" =~ ^(idle|mix|alloc|comp)$ ]] || return 1
  done < <(node_names)
}

sacct_ok() { slurm_env sacct -n -X -a -S now-1minutes -o JobID >/dev/null; }

all_daemons_alive() {
  local n
  pid_of munged && pid_of mysqld && pid_of slurmdbd && pid_of slurmctld || return 1
  while read -r n; do pid_of "slurmd-$n" || return 1; done < <(node_names)
}

healthy() {
  all_daemons_alive >/dev/null 2>&1 && munge_ok >/dev/null 2>&1 && ctld_ok >/dev/null 2>&1 \
    && nodes_idle && sacct_ok >/dev/null 2>&1
}

# Another cluster (other state dir) on the same ports would make our clients talk to
# it (and fail on munge), so refuse early instead of timing out later.
check_ports_free() {
  local port
  for port in "$PORT_CTLD" "$PORT_SLURMD" "$PORT_DBD" "$PORT_MYSQL"; do
    if port_open "$port"; then
      die "port $port on $LOOPBACK is already in use (another cluster?); stop it or set LOCAL_SLURM_PORT_BASE"
    fi
  done
}

# ----------------------------------------------------------------------------- commands
cmd_start() {
  need_tools
  if [[ -f "$SLURM_CONF_PATH" ]] && healthy; then
    log "cluster in $STATE_DIR is already running and healthy"
    print_env | tee "$STATE_DIR/env.sh"
    return 0
  fi
  # Anything half-alive from a previous run is stopped so we start from a known state.
  if [[ -d "$RUNDIR" ]]; then stop_daemons quiet; fi
  # If anything below fails, stop what was started (the logs stay in DIR/log).
  trap start_failed EXIT
  check_ports_free
  mkdir -p "$STATE_DIR"
  write_configs
  net_up
  start_munged
  start_mariadb
  start_slurmdbd
  start_slurmctld
  local n
  while read -r n; do start_slurmd "$n"; done < <(node_names)
  wait_for "nodes to become idle" "$LOGDIR/slurmctld.log" nodes_idle
  step "node(s) idle"
  wait_for "sacct to answer" "$LOGDIR/slurmdbd.log" sacct_ok
  trap - EXIT
  step "sacct answers: cluster up (state dir $STATE_DIR)"
  slurm_env sinfo >&2
  print_env | tee "$STATE_DIR/env.sh"
}

start_failed() {
  local rc=$?
  ((rc != 0)) || return 0
  log "start failed (logs in $LOGDIR); stopping the daemons that did start"
  stop_daemons quiet || true
  exit "$rc"
}

# Pids of leftover processes of this cluster, found through /proc:
#   * daemons (munged, mariadbd, slurm*) whose command line names the state dir or
#     whose environment carries our SLURM_CONF (we start them all with it);
#   * slurmstepd/slurmscriptd with our SLURM_CONF (inherited from slurmd/slurmctld);
#   * job processes: our SLURM_CONF plus a SLURM_JOB_ID (jobs inherit the submitter's
#     environment) -- these survive when slurmd died before it could kill them.
# This script and its ancestors are never listed (a caller may itself be a job here).
leftover_pids() {
  local pid comm f
  local -A skip=() by_env=() by_cmd=()
  pid="$BASHPID"
  while [[ "$pid" =~ ^[0-9]+$ ]] && ((pid > 1)); do
    skip[$pid]=1
    pid="$(awk '/^PPid:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)"
  done
  # One grep over all of /proc (NUL-separated records) instead of a fork per process.
  while IFS= read -r f; do f="${f#/proc/}"; by_env[${f%%/*}]=1; done \
    < <(grep -lzxF -- "SLURM_CONF=$SLURM_CONF_PATH" /proc/[0-9]*/environ 2>/dev/null || true)
  while IFS= read -r f; do f="${f#/proc/}"; by_cmd[${f%%/*}]=1; done \
    < <(grep -lzF -- "$STATE_DIR/" /proc/[0-9]*/cmdline 2>/dev/null || true)
  for pid in "${!by_env[@]}" "${!by_cmd[@]}"; do
    [[ -z "${skip[$pid]:-}" ]] || continue
    skip[$pid]=1 # report each pid once
    comm="$({ cat "/proc/$pid/comm"; } 2>/dev/null)" || continue
    case "$comm" in
      munged | mariadbd | mysqld | slurmdbd | slurmctld | slurmd) ;;
      slurmstepd | slurmscriptd) [[ -n "${by_env[$pid]:-}" ]] || continue ;;
      *)
        [[ -n "${by_env[$pid]:-}" ]] || continue
        grep -qz '^SLURM_JOB_ID=' "/proc/$pid/environ" 2>/dev/null || continue
        ;;
    esac
    alive "$pid" && echo "$pid"
  done
  return 0
}

stop_pid() { # stop_pid NAME PID -> TERM, wait up to 15 s, then KILL
  local name="$1" pid="$2" i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 150; i++)); do
    alive "$pid" || { log "stopped $name (pid $pid)"; return 0; }
    sleep 0.1
  done
  log "$name (pid $pid) did not stop; killing it"
  kill -KILL "$pid" 2>/dev/null || true
}

conf_munge_socket() { # the munge socket named in an existing slurm.conf
  sed -n 's/^AuthInfo=socket=\([^,]*\).*/\1/p' "$SLURM_CONF_PATH" 2>/dev/null | head -n1
}

any_slurmd_alive() {
  local f
  for f in "$RUNDIR"/slurmd-*.pid; do
    [[ -e "$f" ]] && pid_of "$(basename "$f" .pid)" >/dev/null && return 0
  done
  return 1
}

stop_daemons() { # stop_daemons [quiet]
  local pid name f
  # Cancel all jobs first so their processes end cleanly (slurmstepd kills them).
  local jobs i
  if pid_of slurmctld >/dev/null && [[ -f "$SLURM_CONF_PATH" ]]; then
    jobs="$(slurm_env squeue -h -o %F 2>/dev/null | sort -u | tr '\n' ' ')"
    if [[ -n "${jobs// /}" ]]; then
      log "cancelling all jobs: $jobs"
      # shellcheck disable=SC2086  # a list of job ids
      slurm_env scancel --quiet $jobs 2>/dev/null || true
      # Wait (at most KillWait + a bit) for the steps to end, while a slurmd can end them.
      for ((i = 0; i < 40; i++)); do
        any_slurmd_alive || break
        [[ -z "$(slurm_env squeue -h -t R,CG,S -o %i 2>/dev/null)" ]] && break
        sleep 0.2
      done
    fi
  fi
  # Reverse start order: slurmd(s), slurmctld, slurmdbd, mariadb, munged.
  for f in "$RUNDIR"/slurmd-*.pid; do
    [[ -e "$f" ]] || continue
    name="$(basename "$f" .pid)"
    if pid="$(pid_of "$name")"; then stop_pid "$name" "$pid"; fi
  done
  for name in slurmctld slurmdbd mysqld munged; do
    if pid="$(pid_of "$name")"; then stop_pid "$name" "$pid"; fi
  done
  # Leftovers (stale pid files, slurmstepd of killed jobs, ...).
  local left
  left="$(leftover_pids)"
  if [[ -n "$left" ]]; then
    for pid in $left; do
      log "killing leftover $({ cat "/proc/$pid/comm"; } 2>/dev/null) (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
    done
    sleep 1
    for pid in $(leftover_pids); do kill -KILL "$pid" 2>/dev/null || true; done
  fi
  net_down
  rm -f "$RUNDIR"/*.pid "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock" 2>/dev/null || true
  # A munge socket dir outside DIR (see munge_rundir), also the one the last start used.
  local d
  for d in "$MUNGE_RUNDIR" "$(dirname "$(conf_munge_socket)")"; do
    if [[ "$d" == /tmp/prunetune-munge-* ]]; then rm -rf "$d"; fi
  done
  [[ "${1:-}" == quiet ]] || log "cluster in $STATE_DIR stopped"
}

cmd_stop() {
  if [[ ! -d "$STATE_DIR" ]]; then
    log "no state dir $STATE_DIR: nothing to stop"
    return 0
  fi
  stop_daemons
}

cmd_status() {
  local name pid n rc=0
  if [[ ! -f "$SLURM_CONF_PATH" ]]; then
    log "not running (no $SLURM_CONF_PATH)"
    return 3
  fi
  for name in munged mysqld slurmdbd slurmctld; do
    if pid="$(pid_of "$name")"; then echo "$name: running (pid $pid)"; else echo "$name: not running"; rc=3; fi
  done
  while read -r n; do
    if pid="$(pid_of "slurmd-$n")"; then echo "slurmd ($n): running (pid $pid)"; else echo "slurmd ($n): not running"; rc=3; fi
  done < <(node_names)
  if pid_of slurmctld >/dev/null; then slurm_env sinfo || rc=3; fi
  if ((rc == 0)) && healthy; then
    echo "cluster is running and healthy; use: export SLURM_CONF=$SLURM_CONF_PATH"
  else
    echo "cluster is NOT (fully) running"
    rc=3
  fi
  return "$rc"
}

node_argument() { # node_argument COMMAND NODE -> checks NODE names a node of a multi-node cluster
  ((NODES > 1)) || usage_error "$1 needs a cluster started with --nodes 2 or more (this one has 1 node)"
  [[ -n "$2" ]] || usage_error "$1 needs a node name, e.g. $1 node2"
  node_known "$2" || usage_error "$1 $2: no such node; this cluster has $(node_names | tr '\n' ' ')"
}

# A realistic crash: SIGKILL every process in the node's network namespace -- slurmd, slurmstepd and
# the job's own processes.  Killing slurmd alone would leave its job steps running.
cmd_crash_node() {
  local node="$1" ns pids
  node_argument crash-node "$node"
  ns="$(node_netns "$node")"
  pids="$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')"
  [[ -n "${pids// /}" ]] || { log "nothing runs on $node"; return 0; }
  # shellcheck disable=SC2086  # a list of pids
  kill -KILL $pids 2>/dev/null || true
  log "crashed $node: SIGKILL to $(wc -w <<<"$pids") process(es)"
}

node_up() { # node_up NODE -> 0 once slurmctld counts NODE as up again
  local st
  st="$(slurm_env sinfo -h -N -n "$1" -o '%t' 2>/dev/null | head -n1)"
  [[ "$st" =~ ^(idle|mix|alloc|comp)$ ]]
}

# Start a crashed node's slurmd again; with ReturnToService=2 the node is usable as soon as it registers.
cmd_restart_node() {
  local node="$1"
  node_argument restart-node "$node"
  [[ -e "/run/netns/$(node_netns "$node")" ]] || die "no namespace for $node: start the cluster first"
  start_slurmd "$node"
  wait_for "$node to be up again" "$LOGDIR/slurmctld.log" node_up "$node"
  step "$node is up"
}

# ------------------------------------------------------------------------------- main
main() {
  (($# >= 1)) || usage_error "missing command"
  local cmd="$1" node=""
  shift
  while (($#)); do
    case "$1" in
      --nodes) (($# >= 2)) || usage_error "--nodes needs a value"; NODES="$2" NODES_GIVEN=1; shift 2 ;;
      --nodes=*) NODES="${1#*=}" NODES_GIVEN=1; shift ;;
      --state-dir) (($# >= 2)) || usage_error "--state-dir needs a value"; STATE_DIR="$2"; shift 2 ;;
      --state-dir=*) STATE_DIR="${1#*=}"; shift ;;
      -h | --help) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
      -*) usage_error "unknown argument: $1" ;;
      *)
        [[ "$cmd" == crash-node || "$cmd" == restart-node ]] && [[ -z "$node" ]] || usage_error "unknown argument: $1"
        node="$1"
        shift
        ;;
    esac
  done
  # Commands other than start act on the cluster as it was started.
  if [[ -z "$NODES_GIVEN" && "$cmd" != start && -s "$STATE_DIR/etc/nodes" ]]; then
    NODES="$(tr -dc '0-9' <"$STATE_DIR/etc/nodes")"
  fi
  [[ "$NODES" =~ ^[1-9][0-9]*$ ]] || usage_error "--nodes must be a positive integer, got '$NODES'"
  ((NODES <= 64)) || usage_error "--nodes $NODES: at most 64 nodes (addresses .11-.74 of $SUBNET.0/24)"
  if ((NODES > 1)) && ! { command -v nsenter && command -v unshare && command -v ip; } >/dev/null; then
    die "--nodes $NODES needs ip (iproute2) and nsenter/unshare (util-linux)"
  fi
  [[ $EUID -eq 0 ]] || die "must run as root"
  set_paths
  case "$cmd" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) print_env ;;
    crash-node) cmd_crash_node "$node" ;;
    restart-node) cmd_restart_node "$node" ;;
    -h | --help | help) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//' >&2 ;;
    *) usage_error "unknown command: $cmd" ;;
  esac
}

main "$@"
