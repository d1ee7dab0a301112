#!/usr/bin/env bash
# Instructions per lock + unlock pair, counted by callgrind (load on the machine does not change
# them, unlike wall time): each mode of benches/instructions.rs runs N and 3N pairs, and the
# difference divided by 2N is one pair's cost, start-up cancelled.
#
#   benches/instructions.sh [MODE...]     default: every mode of benches/instructions.rs
#   N=2000 C=1 SERVER=1 benches/instructions.sh layer-off
#
# C: concurrency (tasks on one current-thread runtime). SERVER=1 also runs each redis-server under
# callgrind and prints its instructions per pair, less its timer (`serverCron`, whose count follows
# wall time, which load stretches). ANNOTATE=1 keeps the 3N run's callgrind file
# and prints its top functions (inclusive of the start-up, which is small at N >= 2000).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-2000}
C=${C:-1}
modes=("$@")
[ ${#modes[@]} -gt 0 ] || modes=(raw naive engine engine-off layer-on layer-off bare memory http-unlocked http-memory http-redis)
cargo bench --bench instructions --no-run >/dev/null 2>&1 || cargo bench --bench instructions --no-run
bin=$(ls -t target/release/deps/instructions-* | grep -v '\.d$' | head -1)
out=${OUT:-target/instructions}
mkdir -p "$out"
if [ "${SERVER:-0}" = 1 ]; then
  wrapper="$PWD/$out/redis-under-callgrind"
  cat >"$wrapper" <<WRAP
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$PWD/$out/server.%p.out $(command -v redis-server) "\$@"
WRAP
  chmod +x "$wrapper"
  export REDIS_SERVER="$wrapper" INSTRUCTIONS_SHUTDOWN=1
fi
count() { # FILE -> total instructions
  grep -E '^(summary|totals):' "$1" | head -1 | awk '{print $2}'
}
server_count() { # FILE -> redis-server's instructions without its timer (serverCron runs `hz`
  # times a second of wall time, so its share grows with how slowly a loaded machine runs the
  # server under callgrind, not with the pairs)
  local total cron
  total=$(count "$1")
  cron=$(callgrind_annotate --inclusive=yes "$1" 2>/dev/null | awk '/:serverCron /{gsub(",","",$1); print $1; exit}')
  echo $((total - ${cron:-0}))
}
printf '%-11s %14s %14s %12s\n' mode client/pair server/pair allocs/pair
for mode in "${modes[@]}"; do
  declare -A client server
  for n in "$N" "$((3 * N))"; do
    rm -f "$out"/server.*.out
    valgrind --tool=callgrind --callgrind-out-file="$out/client.$mode.$n.out" \
      "$bin" --bench "$mode" "$n" "$C" >"$out/$mode.$n.log" 2>"$out/$mode.$n.err"
    client[$n]=$(count "$out/client.$mode.$n.out")
    server[$n]=0
    if [ "${SERVER:-0}" = 1 ] && ls "$out"/server.*.out >/dev/null 2>&1; then
      server[$n]=$(server_count "$(ls -t "$out"/server.*.out | head -1)")
    fi
  done
  big=$((3 * N))
  allocs=$(sed -n 's/.*failed; \([0-9.]*\) allocations.*/\1/p' "$out/$mode.$big.log")
  printf '%-11s %14.0f %14.0f %12s\n' "$mode" \
    "$(echo "(${client[$big]} - ${client[$N]}) / (2 * $N)" | bc -l)" \
    "$(echo "(${server[$big]} - ${server[$N]}) / (2 * $N)" | bc -l)" "$allocs"
  grep -h 'failed' "$out/$mode.$big.log" | grep -v ' 0 failed' || true
  if [ "${ANNOTATE:-0}" = 1 ]; then
    callgrind_annotate --inclusive=no "$out/client.$mode.$big.out" 2>/dev/null | sed -n '1,40p' \
      >"$out/top.$mode.txt" || true
  fi
done
