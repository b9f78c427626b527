#!/bin/bash
# CI of the packages (`make check-packages`), as root on Debian 12 with the repo's .venv (make install):
#   1. build the .debs (make deb) and check their contents (tests/packaging/test_packages.py)
#   2. lintian: no errors (warnings are listed)
#   2b. the RPMs for Slurm 22.05 and for each release root (/opt/slurm/RELEASE, `make slurm`): rpmbuild, rpmlint
#      (packaging/build-rpm.sh: no errors, no warning but those packaging/rpm/slinfer.rpmlintrc accepts), and
#      their contents (tests/packaging/test_rpms.py)
#   2c. each release root's slinfer-spank .deb installed with dpkg into an overlay of that root, where its plugin
#      loads in that release's sbatch (tests/packaging/test_release_debs.py)
#   3. install them on this machine with apt-get: the postinst generates [controller].token, and an upgrade
#      (dpkg -i of the same version again, which runs postinst as an upgrade from it) keeps it
#   4. systemd-analyze verify the installed units
#   5. a Slurm bed on the INSTALLED files: /usr/bin/slinfer dev-cluster with the installed spank_slinfer.so and
#      /usr/libexec/slinfer/slinfer-hook; agent and controller from /opt/slinfer; only the engine's Python
#      (the catalog's [agent].python) is the repo's .venv, because vLLM is not part of the package
#   6. slinfer doctor on that bed: every line OK
#   7. one sbatch --inference=tiny job that gets a chat completion from its engine
#   8. stop the bed, apt-get purge, and check that nothing of the packages is left
# A package that was not built fails the run; so does a missing release root where SLINFER_REQUIRE_ARTEFACTS=1 (CI),
# which also turns the package tests' skips for missing artefacts into failures (tests/packaging/artefacts.py).
# State in /tmp/slinfer-pkgtest, ports from 36800 (other beds use other folders and ports).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
STATE=${SLINFER_PKGTEST_STATE:-/tmp/slinfer-pkgtest}
PORT_BASE=${SLINFER_PKGTEST_PORT_BASE:-36800}
VENV_PY=$REPO/.venv/bin/python
TINY=${SLINFER_TINY_MODEL:-$REPO/.venv/share/slinfer/models/tiny}
# The real model is built by `make model` into the checkout's venv: the package's Python has no torch to build it.
SMOLLM2=${SLINFER_SMOLLM2_MODEL:-$REPO/.venv/share/slinfer/models/smollm2}
APT=(apt-get -y -q -o DPkg::Lock::Timeout=300)
export DEBIAN_FRONTEND=noninteractive
began=$(date +%s)
step_began=$began

step() {
  local now; now=$(date +%s)
  echo "== [$((now - began))s, previous step $((now - step_began))s] $*"
  step_began=$now
}
die() { echo "ci-packages: FAILED: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs packages and runs Slurm's daemons)"
[ -x "$VENV_PY" ] || die "$VENV_PY is missing: run make install"
[ -f "$TINY/config.json" ] || die "no tiny model in $TINY: run make install"
for p in lintian debhelper rpm rpmlint; do
  dpkg -s "$p" >/dev/null 2>&1 || "${APT[@]}" install "$p" >/dev/null
done
command -v systemd-analyze >/dev/null || "${APT[@]}" install systemd >/dev/null
for p in slinfer slinfer-spank; do
  if dpkg -s "$p" >/dev/null 2>&1; then die "$p is already installed on this machine: apt-get purge it first"; fi
done
user_existed=0
getent passwd slinfer >/dev/null && user_existed=1

bed_up=0
installed=0
cleanup() {
  local code=$?
  set +e
  if [ $bed_up = 1 ]; then
    step "stopping the bed"
    env "${BED_ENV[@]}" /usr/bin/slinfer dev-cluster down --state-dir "$STATE" || code=1
  fi
  if [ $installed = 1 ]; then
    step "apt-get purge slinfer slinfer-spank"
    "${APT[@]}" purge slinfer slinfer-spank >/dev/null || code=1
    [ $user_existed = 1 ] || userdel slinfer 2>/dev/null
    left=$(ls -d /opt/slinfer /usr/libexec/slinfer /etc/slinfer /var/lib/slinfer /usr/bin/slinfer* \
      /etc/slurm/plugstack.conf.d/slinfer.conf /usr/lib/sysusers.d/slinfer.conf \
      /lib/systemd/system/slinfer-*.service /usr/lib/x86_64-linux-gnu/slurm-wlm/spank_slinfer.so 2>/dev/null)
    if [ -n "$left" ]; then echo "ci-packages: left after purge: $left" >&2; code=1; fi
    if dpkg-statoverride --list /etc/slinfer/slinfer.toml >/dev/null; then
      echo "ci-packages: the statoverride of /etc/slinfer/slinfer.toml survived the purge" >&2; code=1
    fi
  fi
  echo "== ci-packages: $([ $code = 0 ] && echo PASSED || echo FAILED) in $(( $(date +%s) - began ))s"
  exit $code
}
trap cleanup EXIT
# Interrupted: clean up, and report the failure (the EXIT trap alone would see status 0).
trap 'exit 130' INT TERM

step "make deb"
packaging/build-deb.sh
version=$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)
debs=("dist/slinfer_${version}_amd64.deb" "dist/slinfer-spank_${version}_amd64.deb")
for deb in "${debs[@]}"; do
  [ -f "$deb" ] || die "make deb built no $deb"
done

step "the packages' contents (tests/packaging/test_packages.py)"
SLINFER_DEB_DIR=$REPO/dist "$REPO/.venv/bin/pytest" -q -p no:cacheprovider tests/packaging/test_packages.py

step "lintian"
lint=$(lintian --pedantic "${debs[@]}" 2>&1 || true)
echo "$lint" | grep -E '^[WIP]:' | sed 's/^/  /' || true
if echo "$lint" | grep -q '^E:'; then
  echo "$lint" | grep '^E:' >&2
  die "lintian reports errors"
fi
echo "  lintian: no errors, $(echo "$lint" | grep -c '^W:' || true) warning(s) (listed above)"

step "RPMs for Slurm 22.05 and each release root (rpmbuild, rpmlint)"
releases=()
for stamp in /opt/slurm/*/.complete; do
  [ -e "$stamp" ] && releases+=("$(basename "$(dirname "$stamp")")")
done
# In CI (SLINFER_REQUIRE_ARTEFACTS=1, set by .ci/run) the release roots were built by make test-release: none
# found means a step before this one failed, and the per-release checks below would pass by checking nothing.
if [ ${#releases[@]} = 0 ] && [ "${SLINFER_REQUIRE_ARTEFACTS:-}" = 1 ]; then
  die "no Slurm release root under /opt/slurm (make slurm SLURM_RELEASE=...), and SLINFER_REQUIRE_ARTEFACTS=1"
fi
rm -f dist/*.rpm
packaging/build-rpm.sh
for release in "${releases[@]}"; do
  packaging/build-rpm.sh "$release"
done
SLINFER_RPM_DIR=$REPO/dist "$REPO/.venv/bin/pytest" -q -p no:cacheprovider tests/packaging/test_rpms.py
[ "$(ls dist/slinfer-spank-*.rpm | wc -l)" = $(( ${#releases[@]} + 1 )) ] || die "not one slinfer-spank RPM per release"

step "each release's slinfer-spank .deb in its root (${releases[*]:-none})"
for release in "${releases[@]}"; do
  packaging/build-spank-deb.sh "$release"
  ls dist/slinfer-spank_*+slurm"$release"_amd64.deb >/dev/null 2>&1 \
    || die "make deb-spank SLURM_RELEASE=$release built no dist/slinfer-spank_*+slurm${release}_amd64.deb"
done
SLINFER_DEB_DIR=$REPO/dist "$REPO/.venv/bin/pytest" -q -p no:cacheprovider tests/packaging/test_release_debs.py \
  "tests/packaging/test_doctor.py::test_plugin_built_for_another_release_fails_with_the_fix"

step "apt-get install ${debs[*]}"
installed=1
"${APT[@]}" install "${debs[@]/#/./}" >/dev/null
getent passwd slinfer >/dev/null || die "the package did not create the slinfer user"
[ "$(stat -c '%U:%G %a' /etc/slinfer/slinfer.toml)" = "root:slinfer 640" ] || die "slinfer.toml owner/mode"
token_of() { sed -n -E 's/^token = "([0-9a-f]{64})".*/\1/p' /etc/slinfer/slinfer.toml; }
token=$(token_of)
[ -n "$token" ] || die "the postinst generated no [controller].token: $(grep -n token /etc/slinfer/slinfer.toml)"
/opt/slinfer/bin/python3 -c 'import sys; from slinfer import config; config.require_token(config.load(sys.argv[1]))' \
  /etc/slinfer/slinfer.toml || die "the installed config does not pass the controller's token check"
echo "  install generated a token (${#token} hex digits) into /etc/slinfer/slinfer.toml"
dpkg -i "${debs[@]/#/./}" >/dev/null || die "dpkg -i over the installed packages (an upgrade) failed"
[ "$(token_of)" = "$token" ] || die "the upgrade changed or lost the token: $(grep -n token /etc/slinfer/slinfer.toml)"
[ "$(grep -c '^token = ' /etc/slinfer/slinfer.toml)" = 1 ] || die "the upgrade added a second token line"
[ "$(stat -c '%U:%G %a' /etc/slinfer/slinfer.toml)" = "root:slinfer 640" ] || die "slinfer.toml owner/mode after upgrade"
echo "  the upgrade kept the token and the config's root:slinfer 0640"
/usr/bin/slinfer --version
# Every entry point imports all it needs from the private environment (a dependency missing from pyproject
# shows here, not as a daemon that never comes up).
for cmd in /usr/bin/slinfer-agent /usr/bin/slinfer-controller /usr/bin/slinfer-gateway /usr/libexec/slinfer/slinfer-hook; do
  "$cmd" --help >/dev/null || die "$cmd --help failed: the package misses a dependency"
done

step "systemd-analyze verify"
# Offline: it parses the units, resolves their binaries and users, and needs no running systemd.
# It exits 0 on directives it ignores (a misspelt KillMode=, say) and only prints them: any output fails.
verify=$(systemd-analyze verify /lib/systemd/system/slinfer-agent.service \
  /lib/systemd/system/slinfer-controller.service /lib/systemd/system/slinfer-gateway.service 2>&1) \
  || die "systemd-analyze verify: $verify"
[ -z "$verify" ] || die "systemd-analyze verify complains: $verify"
grep -qx 'KillMode=process' /lib/systemd/system/slinfer-agent.service || die "the agent unit lacks KillMode=process"
echo "  the three units verify"

step "a Slurm bed on the installed files ($STATE, ports from $PORT_BASE)"
BED_ENV=(SLINFER_SPANK_PLUGIN=/usr/lib/x86_64-linux-gnu/slurm-wlm/spank_slinfer.so
         SLINFER_HOOK=/usr/libexec/slinfer/slinfer-hook SLINFER_ENGINE_PYTHON="$VENV_PY" SLINFER_TINY_MODEL="$TINY"
         SLINFER_SMOLLM2_MODEL="$SMOLLM2")
env "${BED_ENV[@]}" /usr/bin/slinfer dev-cluster down --state-dir "$STATE" >/dev/null 2>&1 || true
rm -rf "$STATE"
bed_up=1
env "${BED_ENV[@]}" /usr/bin/slinfer dev-cluster up --state-dir "$STATE" --port-base "$PORT_BASE"
grep -q "hook=/usr/libexec/slinfer/slinfer-hook" "$STATE/plugstack.conf" || die "the bed does not use the installed hook"
for daemon in agent controller; do
  pid=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[0])" "$STATE/pids/$daemon.pid")
  tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q '^/opt/slinfer/bin/' || die "$daemon does not run from /opt/slinfer"
done
export SLURM_CONF=$STATE/slurm.conf

step "slinfer doctor --config $STATE/slinfer.toml"
doctor_out=$(/usr/bin/slinfer doctor --config "$STATE/slinfer.toml" 2>&1) || { echo "$doctor_out"; die "doctor"; }
echo "$doctor_out" | sed 's/^/  /'
for check in config plugin plugin-version hook agent tls controller "engine tiny" munge; do
  echo "$doctor_out" | grep -q "^OK   $check: " || die "doctor printed no OK line for $check"
done
echo "$doctor_out" | grep -q "^NOTE engine-hop: the gateway-to-engine hop is PLAINTEXT" \
  || die "doctor did not say that the bed's engine hop is plaintext"

step "sbatch --inference=tiny (the installed plugin, hook, agent)"
mkdir -p "$STATE/jobs"
chmod 1777 "$STATE/jobs"
ask='curl -sS --max-time 60 "$OPENAI_BASE_URL/chat/completions" -H "Authorization: Bearer $OPENAI_API_KEY"'
ask+=" -H 'Content-Type: application/json' -d '{\"model\": \"tiny\", \"max_tokens\": 8, \"messages\": "
ask+="[{\"role\": \"user\", \"content\": \"hello\"}]}'"
job=$(sbatch --parsable --inference=tiny --gres=gpu:1 -o "$STATE/jobs/job-%j.out" --wrap \
  "/usr/bin/slinfer wait-ready --timeout 300 && echo READY && $ask && echo && echo DONE")
job=${job%%;*}
deadline=$(( $(date +%s) + 400 ))
state=""
while [ "$(date +%s)" -lt $deadline ]; do
  state=$(scontrol -o show job "$job" | grep -o 'JobState=[A-Z_]*' | cut -d= -f2)
  case $state in COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY) break ;; esac
  sleep 2
done
out=$(cat "$STATE/jobs/job-$job.out" 2>/dev/null || true)
echo "$out" | sed 's/^/  job: /'
[ "$state" = COMPLETED ] || die "job $job ended $state"
echo "$out" | grep -q '"completion_tokens":[1-9]' || die "job $job got no chat completion"
# sinfo reads the select plugin's per-node counts, which on 22.05 can say "mixed" for a minute after the last
# job while slurmctld's node record already says IDLE with no CPU allocated (seen in CI): the record decides,
# as in the bed tests (tests/fakes/slurmbed.py, wait_node_idle).
node_record_idle() {
  local record; record=$(scontrol -o show node)
  echo "$record" | grep -q ' State=IDLE ' && echo "$record" | grep -q ' CPUAlloc=0 '
}
node=""
idle_deadline=$(( $(date +%s) + 60 ))
while [ "$(date +%s)" -lt $idle_deadline ]; do
  node=$(sinfo -h -N -o %T)
  [ "$node" = idle ] && break
  if [ "$node" = mixed ] && node_record_idle; then
    echo "  sinfo says mixed; slurmctld's node record: IDLE, no CPU allocated"
    node=idle
    break
  fi
  sleep 1
done
if [ "$node" != idle ]; then
  scontrol show node || true
  squeue --all --states=all --format='%i %u %T %r %M %N' || true
  scontrol show job --details || true
  die "the node is $node 60 s after the job"
fi
echo "  job $job COMPLETED with a chat completion; node $node"
