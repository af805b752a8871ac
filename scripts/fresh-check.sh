#!/bin/bash
# `make fresh-check`: the README's two commands on a really fresh machine.
#
# Builds a minimal Debian 12 root (debootstrap --variant=minbase, plus only python3, make, git and
# ca-certificates), puts a clean clone of this project's HEAD at /root/pyproxy inside it (root's
# home, mode 0700, where a root clone lands by default), and runs `make demo` then `make test` in
# it with CI=true, in a private mount and PID namespace (host network, as a container with host
# networking would). Fails on a failed command, any failed or skipped test, or a demo that ran
# without the native module. The log is kept in $FRESH_DIR/fresh-check.log.
set -euo pipefail
cd "$(dirname "$0")/.."
project=$(pwd -P)
suite=${FRESH_SUITE:-bookworm}
mirror=${FRESH_MIRROR:-http://deb.debian.org/debian}
dir=${FRESH_DIR:-$project/build/fresh-check}
log=$dir/fresh-check.log
root=$dir/root

[ "$(id -u)" = 0 ] || { echo "fresh-check: needs root (debootstrap, chroot, namespaces)" >&2; exit 1; }
command -v debootstrap >/dev/null || make --no-print-directory apt PKGS=debootstrap

cleanup() { if [ -d "$root" ]; then rm -rf --one-file-system "$root"; fi; }
trap cleanup EXIT
cleanup
mkdir -p "$dir"
: >"$log"
step() { echo "== fresh-check: $* ($(date -u +%T))" | tee -a "$log"; }

step "debootstrap $suite (minbase + python3 make git ca-certificates)"
timeout 900 debootstrap --variant=minbase --include=python3,make,git,ca-certificates \
    "$suite" "$root" "$mirror" >>"$log" 2>&1 || { tail -n 20 "$log"; exit 1; }
cp /etc/resolv.conf "$root/etc/resolv.conf"
# This machine's network: certificate authorities the host added (an egress proxy's, say) are
# trusted inside too, and the host's CA-bundle settings pass through; nothing else of the host does.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >>"$log" 2>&1
fi
trust_env=()
for var in SSL_CERT_FILE PIP_CERT REQUESTS_CA_BUNDLE CURL_CA_BUNDLE PIP_DEFAULT_TIMEOUT; do
    [ -n "${!var:-}" ] && trust_env+=("$var=${!var}")
done

step "clean clone of $(git rev-parse --short HEAD) into /root/pyproxy"
git clone -q --no-local "$project" "$root/root/pyproxy"

# Inside: the README's two commands, exactly, then the checks on what they printed.
inner='set -euo pipefail
cd /root/pyproxy
echo "== make demo"; make demo 2>&1 | tee /tmp/demo.out
echo "== make test"; make test 2>&1 | tee /tmp/test.out
grep -q "native module available" /tmp/demo.out || { echo "fresh-check: the demo ran without the native module"; exit 1; }
# make test runs pytest twice (parallel workers, then the host-wide modules alone): every
# summary must pass, none fail or skip.
summaries=$(grep -E "^=+ .* in [0-9.]+s" /tmp/test.out)
[ "$(printf "%s\n" "$summaries" | grep -c passed)" = 2 ] || { echo "fresh-check: expected two passing test summaries, got: $summaries"; exit 1; }
case "$summaries" in
  *failed*|*error*) echo "fresh-check: test failures: $summaries"; exit 1 ;;
  *skipped*) echo "fresh-check: skipped tests (CI forbids skips): $summaries"; exit 1 ;;
esac
echo "fresh-check: passed:" $summaries'

step "make demo && make test inside the fresh root"
# A private mount namespace drops every mount below when it ends; the PID namespace ends every
# process the run left behind.
set +e
timeout --kill-after=30 3600 unshare --mount --propagation private --pid --fork \
    env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 CI=true "${trust_env[@]}" ROOT="$root" INNER="$inner" /bin/sh -c '
        set -e
        mount --bind "$ROOT" "$ROOT"  # / inside must be a mount point (ip netns exec remounts it)
        mount --rbind /dev "$ROOT/dev"
        mount --rbind /sys "$ROOT/sys"
        mount -t proc proc "$ROOT/proc"
        mount -t tmpfs tmpfs "$ROOT/run"
        mount -t tmpfs tmpfs "$ROOT/tmp"
        exec chroot "$ROOT" /bin/bash -c "$INNER"' 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
set -e
step "done: exit $status; log kept in $log"
exit "$status"
