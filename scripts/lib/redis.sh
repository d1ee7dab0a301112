# shellcheck shell=bash
# Sourced by scripts/test, scripts/bench and scripts/mutants. The tests and benches start their
# own redis-server processes on free loopback ports (never the machine's 6379); this makes sure
# the binary is there.
#
#   ensure_redis_server NAME
#
# Uses $REDIS_SERVER when set (a command on PATH, or a path: a relative one is taken from where
# the calling script was started, before it changed to the repository root), else the
# redis-server on PATH, else installs one (apt-get, dnf or apk, when run as root), else explains
# and exits 1. A $REDIS_SERVER that is not an executable redis-server is an error too, never
# skipped over. Exports REDIS_SERVER (the absolute path of the binary the test harness runs) and
# prints its version. NAME (the calling script) prefixes the messages.
ensure_redis_server() {
  local name="$1" resolved
  if [ -n "${REDIS_SERVER:-}" ]; then
    case "$REDIS_SERVER" in
      /*) ;;
      */*) REDIS_SERVER="${OLDPWD:-$PWD}/$REDIS_SERVER" ;;
    esac
    if ! resolved="$(command -v "$REDIS_SERVER")" || [ ! -f "$resolved" ] ||
      ! "$resolved" --version >/dev/null 2>&1; then
      echo "$name: REDIS_SERVER=$REDIS_SERVER is not a redis-server I can run." >&2
      echo "Point it at the redis-server binary, or unset it to use the one on PATH." >&2
      exit 1
    fi
    REDIS_SERVER="$resolved"
  else
    if ! command -v redis-server >/dev/null 2>&1; then
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "$name: installing redis-server (apt-get)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
      elif [ "$(id -u)" = 0 ] && command -v dnf >/dev/null 2>&1; then
        echo "$name: installing redis (dnf)"
        dnf install -y -q redis
      elif [ "$(id -u)" = 0 ] && command -v apk >/dev/null 2>&1; then
        echo "$name: installing redis (apk)"
        apk add --quiet redis
      else
        echo "$name: redis-server is not installed and I cannot install it here." >&2
        echo "Install it (e.g. 'sudo apt-get install redis-server' or 'brew install redis'), or set" >&2
        echo "REDIS_SERVER=/path/to/redis-server, then run $name again." >&2
        exit 1
      fi
    fi
    REDIS_SERVER="$(command -v redis-server)"
  fi
  export REDIS_SERVER
  echo "$name: using $REDIS_SERVER ($("$REDIS_SERVER" --version))"
}
