#!/usr/bin/env bash
# Installs what OneProtect needs from the system package manager, only when missing.
#
#   scripts/prereqs.sh build   # cmake, make and a C compiler (pingora's zlib-ng, ring)
#   scripts/prereqs.sh test    # build + PostgreSQL, Redis, openssl, curl, nginx, haproxy, python3, promtool
#
# Sourced by scripts/run.sh, scripts/test.sh and .ci/run; runnable on its own.
#
# Package managers: apt-get (Debian/Ubuntu), dnf (Fedora/RHEL), brew (macOS). As root it
# installs at once; otherwise through `sudo -n` when that works without a password;
# otherwise it stops and prints the exact command to run. On apt, no service is started by
# the install (a temporary policy-rc.d), so installing PostgreSQL or Redis never brings up
# a system instance: the test command starts private ones.

# Every prerequisite: <command it provides> <debian pkg> <fedora pkg> <brew pkg> <why>.
# PostgreSQL is checked by its server binaries, which Debian keeps off PATH.
_PREREQ_BUILD=(
  "cc gcc gcc - a C compiler (ring, zlib-ng)"
  "make make make make make (cmake's generator)"
  "cmake cmake cmake cmake cmake (pingora's zlib-ng)"
)
_PREREQ_TEST=(
  "initdb postgresql postgresql-server postgresql@16 PostgreSQL server (private test instance)"
  "redis-server redis-server redis redis Redis server (private test instance)"
  "redis-cli redis-tools redis redis redis-cli (the Sentinel and Cluster tests)"
  "openssl openssl openssl openssl the openssl CLI (an independent TLS client in tests)"
  "curl curl curl curl curl (an independent HTTP client in tests)"
  "nginx nginx nginx nginx nginx (CRL interoperability test, bench baseline)"
  "haproxy haproxy haproxy haproxy haproxy (bench baseline)"
  "python3 python3 python3 python python3 (independent h2/raw-socket clients in tests)"
  "promtool prometheus golang-github-prometheus prometheus promtool (checks deploy/prometheus alert rules)"
)

prereq_say() { printf '==> %s\n' "$*" >&2; }

# The directory holding initdb, postgres, pg_isready and createdb together, or nothing.
# Debian keeps them off PATH (/usr/lib/postgresql/<v>/bin); a symlink on PATH is followed.
pg_bin_dir() {
  local d cands=()
  if command -v initdb >/dev/null 2>&1; then
    cands+=("$(dirname "$(readlink -f "$(command -v initdb)")")")
  fi
  cands+=($(ls -d /usr/lib/postgresql/*/bin /usr/pgsql-*/bin 2>/dev/null | sort -V -r))
  if command -v brew >/dev/null 2>&1; then
    cands+=("$(brew --prefix 2>/dev/null)"/opt/postgresql@*/bin)
  fi
  for d in "${cands[@]}"; do
    if [ -x "$d/initdb" ] && [ -x "$d/postgres" ] && [ -x "$d/pg_isready" ] && [ -x "$d/createdb" ]; then
      echo "$d"
      return
    fi
  done
}

_prereq_have() { # _prereq_have <command>
  if [ "$1" = initdb ]; then
    [ -n "$(pg_bin_dir)" ]
  elif [ "$1" = cc ]; then
    command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || command -v clang >/dev/null 2>&1
  else
    command -v "$1" >/dev/null 2>&1
  fi
}

_prereq_manager() {
  if command -v apt-get >/dev/null 2>&1; then echo apt
  elif command -v dnf >/dev/null 2>&1; then echo dnf
  elif command -v brew >/dev/null 2>&1; then echo brew
  else echo none
  fi
}

# ensure_prereqs build|test: installs every missing prerequisite of that set, or exits 1
# with the exact command to run.
ensure_prereqs() {
  local set=$1 entry cmd deb fed brew why mgr col pkgs=() whys=()
  local list=("${_PREREQ_BUILD[@]}")
  [ "$set" = test ] && list+=("${_PREREQ_TEST[@]}")
  mgr=$(_prereq_manager)
  case $mgr in apt) col=2 ;; dnf) col=3 ;; brew) col=4 ;; *) col=2 ;; esac
  for entry in "${list[@]}"; do
    read -r cmd deb fed brew why <<<"$entry"
    _prereq_have "$cmd" && continue
    local pkg
    pkg=$(echo "$entry" | awk -v c="$col" '{print $c}')
    if [ "$pkg" = - ]; then
      prereq_say "missing: $why (install Xcode's command line tools: xcode-select --install)"
      exit 1
    fi
    case " ${pkgs[*]} " in *" $pkg "*) ;; *) pkgs+=("$pkg") ;; esac
    whys+=("$why")
  done
  [ ${#pkgs[@]} -eq 0 ] && return 0

  prereq_say "missing: $(IFS=,; echo "${whys[*]}" | sed 's/,/, /g')"
  local sudo=""
  if [ "$(id -u)" -ne 0 ] && [ "$mgr" != brew ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      sudo="sudo -n"
    else
      local how
      case $mgr in
        apt) how="sudo apt-get install -y ${pkgs[*]}" ;;
        dnf) how="sudo dnf install -y ${pkgs[*]}" ;;
        *) how="install: ${pkgs[*]}" ;;
      esac
      prereq_say "not root and no password-less sudo: run this, then start again:"
      echo "    $how" >&2
      exit 1
    fi
  fi
  case $mgr in
    apt)
      prereq_say "installing with apt-get: ${pkgs[*]}"
      # No service may start during the install: PostgreSQL's and Redis's packages
      # would otherwise bring up system instances on the standard ports.
      local policy=/usr/sbin/policy-rc.d made_policy=""
      if [ ! -e "$policy" ]; then
        $sudo sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy" && made_policy=1
      fi
      if [ -z "${_PREREQ_APT_UPDATED:-}" ]; then
        prereq_say "apt-get update"
        $sudo apt-get update -qq || true
        _PREREQ_APT_UPDATED=1
      fi
      local rc=0
      $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${pkgs[@]}" >/dev/null || rc=$?
      [ -n "$made_policy" ] && $sudo rm -f "$policy"
      if [ $rc -ne 0 ]; then
        prereq_say "apt-get install ${pkgs[*]} failed (exit $rc)"
        exit 1
      fi
      ;;
    dnf)
      prereq_say "installing with dnf: ${pkgs[*]}"
      $sudo dnf install -y -q "${pkgs[@]}" || { prereq_say "dnf install failed"; exit 1; }
      ;;
    brew)
      prereq_say "installing with brew: ${pkgs[*]}"
      brew install "${pkgs[@]}" || { prereq_say "brew install failed"; exit 1; }
      ;;
    *)
      prereq_say "no known package manager (apt-get, dnf, brew); install: ${pkgs[*]}"
      exit 1
      ;;
  esac
  for entry in "${list[@]}"; do
    read -r cmd deb fed brew why <<<"$entry"
    if ! _prereq_have "$cmd"; then
      prereq_say "still missing after the install: $why"
      exit 1
    fi
  done
  prereq_say "installed: ${pkgs[*]}"
}

# The Python example upstream's dependencies (examples/upstream-python), in a
# project-local virtual environment: .venv/upstream-python. The suite runs the
# example with that interpreter. Created, or completed, only when missing.
PYTHON_EXAMPLE_VENV=.venv/upstream-python
ensure_python_example() {
  local root venv req
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  venv="$root/$PYTHON_EXAMPLE_VENV"
  req="$root/examples/upstream-python/requirements.txt"
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import jwt, cryptography' 2>/dev/null; then
    return 0
  fi
  prereq_say "creating $PYTHON_EXAMPLE_VENV for the Python example upstream (pip install -r examples/upstream-python/requirements.txt)"
  python3 -m venv "$venv" || { prereq_say "python3 -m venv failed (Debian: apt-get install python3-venv)"; exit 1; }
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req" ||
    { prereq_say "pip install into $PYTHON_EXAMPLE_VENV failed"; exit 1; }
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  ensure_prereqs "${1:-test}"
  [ "${1:-test}" = test ] && ensure_python_example
  prereq_say "prerequisites (${1:-test}) present"
fi
