#!/bin/sh
# The operator's surface: remapd started as its systemd unit starts it (settings from the
# environment file, NOTIFY_SOCKET and WATCHDOG_USEC set) reaches READY with a STATUS line and
# keeps the watchdog fed; the socket is 0660 for the configured group; a group member may read
# but not change; the metrics endpoint answers and its counters move after an injected error;
# `status` draws the map and the pool table; `events --follow` streams what happened; SIGTERM
# sends STOPPING and leaves the volume up; a restarted remapd assembles it again, and bpftool
# shows its pool and every remap in the pinned maps.
#
# No systemd in the guest: `remapctl debug notify-listen` plays the notify socket's receiver.
#vm: cases ready status-line watchdog socket-modes group-reads group-cannot-change outsider-refused metrics-up metrics-move status-map events-follow stopping restart-assembles bpftool-mirror
#vm: needs remapd remapctl
#vm: timeout 420
. /vm/lib.sh

VOL=vol0
METRICS=127.0.0.1:9687
SOCK=/run/remap/remapd.sock

# Users: `op` is in the socket group, `nobody` is not.
cat >/etc/passwd <<'EOF'
root:x:0:0:root:/root:/bin/sh
op:x:1000:1000:operator:/tmp:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/sh
EOF
cat >/etc/group <<'EOF'
root:x:0:
remap:x:990:op
op:x:1000:
nogroup:x:65534:
EOF
as() { u=$1; shift; su "$u" -s /bin/sh -c "$*"; }

ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up

main=$(nullb create --size 64)
sp1=$(nullb create --size 24)
sp2=$(nullb create --size 24)

# The unit's settings file, as an operator would write it.
mkdir -p /etc/remap
cat >/etc/remap/remapd.conf <<EOF
REMAPD_SOCKET_GROUP=remap
REMAPD_METRICS=$METRICS
REMAP_LOG=info
EOF

remapctl debug notify-listen /run/notify.sock --until STOPPING=1 --timeout 400 >/tmp/notify.log 2>&1 &
listener=$!
wait_for_socket() { n=0; while [ ! -S "$1" ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done; }
wait_for_socket /run/notify.sock

# ExecStart=remapd with EnvironmentFile=/etc/remap/remapd.conf, Type=notify, WatchdogSec=6s.
(
    set -a
    . /etc/remap/remapd.conf
    set +a
    NOTIFY_SOCKET=/run/notify.sock WATCHDOG_USEC=6000000 exec remapd
) >/tmp/remapd.out 2>/tmp/remapd.log &
agent=$!

if wait_for /tmp/notify.log '^READY=1$' 90; then
    pass ready "$(grep -c . /tmp/notify.log) notify lines; log: $(grep -m1 'remapd ready' /tmp/remapd.log | cut -c1-120)"
else
    fail ready "no READY=1: $(tail -5 /tmp/remapd.log | tr '\n' ' ')"
    exit 1
fi
st=$(grep -m1 '^STATUS=' /tmp/notify.log)
case "$st" in
"STATUS=0 volumes, 0 remapped chunks, 0 pending blocks"*) pass status-line "$st" ;;
*) fail status-line "first STATUS line: '$st'" ;;
esac

if out=$(remapctl create --in-place "$VOL" --main "$main" --spare "$sp1" --spare "$sp2" --region-size 16MiB 2>&1); then
    info "created $VOL"
else
    fail group-reads "setup: create: $out"
    exit 1
fi

# --- socket: 0660 root:remap in a 0750 root:remap folder
s=$(stat -c '%a %U:%G' "$SOCK")
d=$(stat -c '%a %U:%G' "$(dirname "$SOCK")")
expect_eq socket-modes socket "660 root:remap" "$s" &&
    expect_eq socket-modes folder "750 root:remap" "$d" &&
    pass socket-modes "socket $s, folder $d"

before=$(remapctl status "$VOL" --json)

# --- a group member reads
ok=1
for c in "status" "status $VOL" "spare list $VOL" "remap list $VOL" "pending $VOL" "events"; do
    if ! out=$(as op "remapctl --json $c" 2>&1); then
        fail group-reads "as op: remapctl $c: $out"
        ok=0
    fi
done
[ $ok = 1 ] && pass group-reads "uid $(as op id -u), groups $(as op id -G)"

# --- ... and cannot change anything: exit 4, a clear message, state unchanged
ok=1
for c in "stop $VOL" "remap add $VOL 8" "spare remove $VOL $sp2" "assemble" \
    "create v2 --main $sp2 --spare $sp1"; do
    out=$(as op "remapctl $c" 2>&1)
    rc=$?
    if [ $rc != 4 ] || ! printf '%s' "$out" | grep -q "needs root"; then
        fail group-cannot-change "as op: remapctl $c: exit $rc: $out"
        ok=0
    fi
done
after=$(remapctl status "$VOL" --json)
[ "$before" = "$after" ] || { fail group-cannot-change "state changed"; ok=0; }
[ $ok = 1 ] && pass group-cannot-change "$out"

# --- someone outside the group cannot even connect
out=$(as nobody "remapctl status" 2>&1)
rc=$?
if [ $rc = 4 ] && printf '%s' "$out" | grep -q "permission denied"; then
    pass outsider-refused "$out"
else
    fail outsider-refused "as nobody: exit $rc: $out"
fi

# --- metrics
scrape() { wget -q -O- "http://$METRICS/metrics" 2>/dev/null; }
metric() { scrape | grep -E "^$1 " | awk '{ print $2 }'; }
m=$(scrape)
if printf '%s\n' "$m" | grep -q '^remap_volumes 1$' &&
    printf '%s\n' "$m" | grep -q "^remap_pool_capacity_bytes{volume=\"$VOL\",slot=\"0\",device=\"$sp1\"} " &&
    printf '%s\n' "$m" | grep -q '^# EOF$'; then
    pass metrics-up "$(printf '%s\n' "$m" | grep -c '^remap_') samples"
else
    fail metrics-up "scrape: $(printf '%s\n' "$m" | head -5 | tr '\n' ' ')"
fi
e0=$(metric remap_errors_seen_total)
k0=$(metric remap_ebpf_errors_total)

# --- inject an error; watch it stream, get remapped and counted
as op "remapctl events --follow --json" >/tmp/events.json 2>/tmp/events.err &
follower=$!
sleep 1
nullb bad add "$main" 1001-1001
dio-read "/dev/mapper/$VOL" 1000 8 2>/dev/null && info "read of sector 1000 did not fail"
n=0
while [ "$(json_num "$(remapctl status "$VOL" --json)" remaps)" != 1 ] && [ $n -lt 300 ]; do
    sleep 0.1
    n=$((n + 1))
done
e1=$(metric remap_errors_seen_total)
k1=$(metric remap_ebpf_errors_total)
r1=$(metric "remap_remapped_chunks_total\\{volume=\"$VOL\"\\}")
h1=$(metric "remap_remap_duration_seconds_count\\{volume=\"$VOL\"\\}")
p1=$(metric "remap_pending_blocks\\{volume=\"$VOL\"\\}")
if [ "${e1:-0}" -gt "${e0:-0}" ] && [ "${k1:-0}" -gt "${k0:-0}" ] && [ "$r1" = 1 ] && [ "$h1" = 1 ] && [ "$p1" = 1 ]; then
    pass metrics-move "errors_seen $e0→$e1, ebpf_errors $k0→$k1, remapped $r1, latency samples $h1, pending $p1"
else
    fail metrics-move "errors_seen $e0→$e1, ebpf_errors $k0→$k1, remapped '$r1', latency samples '$h1', pending '$p1'"
fi

# --- status: the map and the pool table
out=$(COLUMNS=74 remapctl status "$VOL")
map=$(printf '%s\n' "$out" | sed -n 's/^  map |\(.*\)|$/\1/p')
if [ ${#map} = 64 ] && printf '%s' "$map" | grep -q '^!\.*$' &&
    printf '%s\n' "$out" | grep -q "SLOT DEVICE" &&
    printf '%s\n' "$out" | grep -q "^    0    $sp1 "; then
    pass status-map "$(printf '%s\n' "$out" | tr '\n' '~')"
else
    fail status-map "$(printf '%s\n' "$out" | tr '\n' '~')"
fi
info "$(remapctl status "$VOL" --width 32 | sed -n '/map/p' | tr '\n' '~')"

# --- the follower saw the error and the remap
n=0
while ! grep -q '"event":"remap"' /tmp/events.json && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
if grep -q "\"event\":\"error\",.*\"volume\":\"$VOL\",\"device\":\"$main\".*\"sector\":100[0-9]" /tmp/events.json &&
    grep -q "\"event\":\"remap\",.*\"volume\":\"$VOL\",\"chunks\":1,\"lbas\":\[1000\]" /tmp/events.json; then
    pass events-follow "$(wc -l </tmp/events.json) events"
else
    fail events-follow "$(cat /tmp/events.json /tmp/events.err | head -5 | tr '\n' ' ')"
fi
info "$(remapctl events | tail -3 | tr '\n' '~')"

# --- watchdog: WatchdogSec=6s → WATCHDOG=1 at least every 3 s (wait up to 15 s for 3 of them,
# so a fast run up to here does not count against it)
n=0
w=$(grep -c '^WATCHDOG=1$' /tmp/notify.log)
while [ "$w" -lt 3 ] && [ $n -lt 150 ]; do
    sleep 0.1
    n=$((n + 1))
    w=$(grep -c '^WATCHDOG=1$' /tmp/notify.log)
done
if [ "$w" -ge 3 ]; then
    pass watchdog "$w WATCHDOG=1 so far"
else
    fail watchdog "$w WATCHDOG=1 lines"
fi

# --- stop: STOPPING=1, exit 0, the volume stays up, the follower is told
kill -TERM "$agent"
wait "$agent"
rc=$?
wait "$listener"
lrc=$?
if [ $rc = 0 ] && [ $lrc = 0 ] && grep -q '^STOPPING=1$' /tmp/notify.log && [ -b "/dev/mapper/$VOL" ] &&
    dmsetup info "$VOL" >/dev/null 2>&1; then
    pass stopping "remapd exit $rc; last notify: $(tail -2 /tmp/notify.log | tr '\n' ' ')"
else
    fail stopping "remapd exit $rc, listener exit $lrc, notify: $(tail -3 /tmp/notify.log | tr '\n' ' ')"
fi
wait "$follower" 2>/dev/null
[ ! -S "$SOCK" ] || info "socket left behind"

# --- a restarted remapd finds the volume by its metadata and takes it back
remapd >/tmp/remapd2.out 2>/tmp/remapd2.log &
agent=$!
if wait_for /tmp/remapd2.log "remapd ready" 90; then
    st=$(remapctl status "$VOL" --json 2>&1)
    expect_eq restart-assembles remaps 1 "$(json_num "$st" remaps)" &&
        expect_eq restart-assembles pending 1 "$(json_num "$st" pending)" &&
        pass restart-assembles "$(grep -m1 'assembled' /tmp/remapd2.log | cut -c1-160)"
else
    fail restart-assembles "$(tail -5 /tmp/remapd2.log | tr '\n' ' ')"
fi
# What `remapctl status` looks like with remaps spread over the disk (shown in the docs).
for r in "30000 --count 64" "70000" "70100" "110000 --count 8" "130000"; do
    # shellcheck disable=SC2086 # word splitting intended
    remapctl remap add "$VOL" $r >/dev/null
done
COLUMNS=80 remapctl status "$VOL" >/tmp/status.txt
while IFS= read -r l; do info "| $l"; done </tmp/status.txt
# bpftool: every remap (those assembly mirrors after "ready", and those made since) and the
# pool's usage, in the pinned maps.
want=$(json_num "$(remapctl status "$VOL" --json)" remaps)
n=0
while :; do
    got=$(bpftool -j map dump pinned /sys/fs/bpf/remap/REMAPS 2>/dev/null | grep -o '"chunk":' | wc -l)
    [ "$got" = "$want" ] || [ $n -ge 50 ] && break
    sleep 0.2
    n=$((n + 1))
done
used=$(bpftool -j map dump pinned /sys/fs/bpf/remap/POOL_DEVS 2>/dev/null | grep -o '"used":[0-9]*' | awk -F: '{ s += $2 } END { print s + 0 }')
if [ "$got" = "$want" ] && [ "${used:-0}" = "$want" ]; then
    pass bpftool-mirror "REMAPS holds $got entries, POOL_DEVS used $used, status remaps $want"
else
    fail bpftool-mirror "REMAPS holds $got entries, POOL_DEVS used ${used:-?}, status remaps $want"
fi
kill -TERM "$agent"
wait "$agent"
exit 0
