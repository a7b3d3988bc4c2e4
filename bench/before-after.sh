#!/usr/bin/env bash
# Two revisions side by side: launch-latency, accept-to-running and
# allocator-cycle, release builds of each, run in ABBA order with the page
# cache and slab dropped before every run (on this VM they move launch
# latency by 2x between back-to-back runs). Prints every run's figures.
#
#   sudo bench/before-after.sh BEFORE_REV [AFTER_REV] [ROUNDS]
#
# Both sides use AFTER_REV's accept-to-running driver (it starts the side's own
# master and agent binaries): older drivers wait for ever on a task that ends
# without TASK_RUNNING, which older agents could send.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "before-after: run as root (cgroups, namespaces)" >&2; exit 1; }
before=${1:?usage: bench/before-after.sh BEFORE_REV [AFTER_REV] [ROUNDS]}
after=${2:-HEAD}
rounds=${3:-3}
work=/var/lib/butte-bench/before-after
mkdir -p "$work"

build() { # REV SIDE
  local src="$work/src-$2"
  rm -rf "$src"
  git worktree prune
  git worktree add --force --detach "$src" "$1" >/dev/null
  echo "before-after: building $2 ($1)" >&2
  (cd "$src" && CARGO_TARGET_DIR="$work/target" cargo build --release --locked --workspace --bins -q)
  mkdir -p "$work/bin-$2"
  for bin in launch-latency accept-to-running allocator-cycle butte-agent butte-master; do
    cp "$work/target/release/$bin" "$work/bin-$2/"
  done
  git worktree remove --force "$src"
}
build "$before" before
build "$after" after
cp "$work/bin-after/accept-to-running" "$work/bin-before/accept-to-running"

quiet() { sync; echo 3 > /proc/sys/vm/drop_caches; sleep 2; }
run() { # SIDE ROUND
  local bin="$work/bin-$1"
  quiet; echo "=== launch-latency $1 round $2"
  "$bin/launch-latency" 500 | grep -E "median|held"
  quiet; echo "=== accept-to-running $1 round $2"
  timeout 300 "$bin/accept-to-running" 500 | grep -E "median|without"
  echo "=== allocator-cycle $1 round $2"
  "$bin/allocator-cycle" 21 | grep -E "^(fresh|roles|declines)"
}
for round in $(seq 1 "$rounds"); do
  if [ $((round % 2)) = 1 ]; then run before "$round"; run after "$round"
  else run after "$round"; run before "$round"; fi
done
