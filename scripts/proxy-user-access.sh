#!/bin/sh
# The sidecar runs as uid 1337 (the capture rules exclude that uid, so it never captures itself).
# Tests and `pyproxy run --sidecar` start it from this checkout's venv, so that uid must be able to
# reach the interpreter, the venv and the checkout. A checkout in root's home (mode 0700) is not
# reachable; this grants uid 1337 traverse-only access (ACL u:1337:x, no listing) to each directory
# on the way that blocks it, and fails with what to do when that is not enough.
# PROXY_UID names another uid that runs code from this checkout (the pod bench's app, uid 1000).
# Usage: [PROXY_UID=N] scripts/proxy-user-access.sh VENV_PYTHON
set -eu
py=$1
uid=${PROXY_UID:-1337}
# Only root starts processes as another uid, so only root needs (and can grant) this.
[ "$(id -u)" = 0 ] || exit 0

as_proxy() { setpriv --reuid "$uid" --regid "$uid" --clear-groups "$@"; }
can_run() { as_proxy "$py" -c 'import pyproxy.cli' >/dev/null 2>&1; }

can_run && exit 0
# Top down, so a directory is only opened when a parent was what blocked it.
for start in "$(pwd -P)" "$(dirname "$(readlink -f "$py")")"; do
    path=""
    for part in $(echo "$start" | tr / ' '); do
        path="$path/$part"
        if ! as_proxy test -x "$path"; then
            setfacl -m "u:$uid:x" "$path"
            echo "set-up: granted uid $uid traverse-only access (setfacl -m u:$uid:x) to $path"
        fi
    done
done
can_run && exit 0
cat >&2 <<MSG
set-up: uid $uid (the sidecar's user) cannot run $py -c 'import pyproxy.cli':
$(as_proxy "$py" -c 'import pyproxy.cli' 2>&1 | tail -n 3)
The sidecar tests run pyproxy as uid $uid from this checkout. Either make the checkout and its
files readable by that uid (for example: chmod -R o+rX $(pwd -P)), or clone the project into a
directory every user can reach (for example /opt or /srv) and run make there.
MSG
exit 1
