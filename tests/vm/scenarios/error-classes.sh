#!/bin/sh
# Field safety: only the medium spends the pool; volumes come up when their disks appear;
# alerts reach a person; a disk that goes away is a path fault.
#   Part 1: the main is a file-backed virtio disk with two QEMU blkdebug injections: sector
#   8000 fails one read only (a transient: the block reads fine when located), sector 20000
#   fails every read (a bad sector). A read of the first through the volume moves nothing and
#   is counted as transient; a read of the second moves its chunk at once, with the sector
#   pending. (A MEDIUM error, -ENODATA, is ext4-scsi's; errors that are not the medium's, and
#   a chunk that keeps failing while it reads fine when located, have no injector here: unit
#   tests prove them.)
#   Part 2: a volume on null_blk disks is stopped, its spare powered off, remapd restarted
#   with --notify-exec: the volume is down with the reason in status; the spare powered on,
#   it comes up with no command. A bad block read through it runs the hook once (a pending
#   alert with its variables and JSON), a second read of the same block does not. The main
#   powered off under a reader: one path-fault alert, nothing moved. The region device that
#   alert's remap made does not make remapd scan every disk (only a disk it did not make does).
#vm: cases transient-moves-nothing bad-sector-moves-at-once down-until-its-spare-appears spare-powered-on-assembles notify-exec-once-per-alert own-device-no-scan member-powered-off-is-one-path-fault
#vm: disk flaky 64M inject=read_aio:5:8000:once inject=read_aio:5:20000
#vm: needs remapd remapctl
#vm: timeout 420
. /vm/lib.sh

VOL=vol0
main=$(vmdisk flaky)
sp1=$(nullb create --size 24)
remapd >/tmp/remapd.out 2>/tmp/remapd.log &
agent=$!
wait_for /tmp/remapd.log "remapd ready" 90 || { fail transient-moves-nothing "remapd not ready: $(tail -5 /tmp/remapd.log)"; exit 1; }
if ! out=$(remapctl create --in-place "$VOL" --main "$main" --spare "$sp1" --region-size 16MiB 2>&1); then
    fail transient-moves-nothing "create: $out"
    exit 1
fi
health() { remapctl health "$VOL" --json; }
remaps() { json_num "$(remapctl status "$VOL" --json)" remaps; }

# The transient: one failed read, then the block reads fine (the agent's locate finds so).
dio-read "/dev/mapper/$VOL" 8000 8 2>/dev/null && echo "note: the once-injection did not fire"
n=0
while [ "$(json_num "$(health)" transient_errors_seen)" = 0 ] && [ $n -lt 100 ]; do
    sleep 0.1
    n=$((n + 1))
done
h=$(health)
if [ "$(json_num "$h" transient_errors_seen)" -ge 1 ] && [ "$(remaps)" = 0 ] &&
    dio-read "/dev/mapper/$VOL" 8000 8 2>/dev/null; then
    pass transient-moves-nothing "errors $(json_num "$h" errors_seen), transient $(json_num "$h" transient_errors_seen), remaps 0; the block reads fine"
else
    fail transient-moves-nothing "remaps $(remaps); health: $(printf '%s' "$h" | cut -c1-400)"
fi

# The bad sector: moved at once, pending.
dio-read "/dev/mapper/$VOL" 20000 8 2>/dev/null
n=0
while [ "$(remaps)" != 1 ] && [ $n -lt 100 ]; do
    sleep 0.1
    n=$((n + 1))
done
st=$(remapctl status "$VOL" --json)
if [ "$(json_num "$st" remaps)" = 1 ] && [ "$(json_num "$st" pending)" -ge 1 ]; then
    pass bad-sector-moves-at-once "remaps 1, pending $(json_num "$st" pending) after one failed read"
else
    fail bad-sector-moves-at-once "status: $(printf '%s' "$st" | cut -c1-400); log: $(tail -3 /tmp/remapd.log | tr '\n' ' ')"
fi

# --- Part 2: boot and hotplug, the alert hook, path faults.
HP=hp0
hmain=$(nullb create --size 64)
hsp=$(nullb create --size 24)
# The metadata lives on the spares: the one that stays names the one that is missing.
hsp2=$(nullb create --size 24)
part2() {
    for c in down-until-its-spare-appears spare-powered-on-assembles notify-exec-once-per-alert own-device-no-scan member-powered-off-is-one-path-fault; do
        fail $c "$1"
    done
    exit 1
}
out=$(remapctl create --in-place "$HP" --main "$hmain" --spare "$hsp" --spare "$hsp2" --region-size 16MiB 2>&1) || part2 "create: $out"
out=$(remapctl stop "$HP" 2>&1) || part2 "stop: $out"
kill "$agent"
wait "$agent"
nullb power "$hsp" off
printf '%s\n' '#!/bin/sh' \
    'printf "%s|%s|%s|%s|%s|" "$REMAP_ALERT_KIND" "$REMAP_VOLUME" "$REMAP_SCORE" "$REMAP_SUPPRESSED" "$REMAP_ALERT" >>/tmp/hook.log' \
    'cat >>/tmp/hook.log' >/tmp/hook
chmod 700 /tmp/hook
: >/tmp/hook.log
remapd --notify-exec /tmp/hook --notify-interval 2 >/tmp/remapd2.out 2>/tmp/remapd2.log &
agent=$!
wait_for /tmp/remapd2.log "remapd ready" 90 || part2 "remapd (second start) not ready: $(tail -5 /tmp/remapd2.log)"
hstatus() { remapctl status "$HP" --json 2>&1; }
st=$(hstatus)
if [ "$(json_str "$st" state)" = down ] && printf '%s' "$st" | grep -q 'spare slot 0.*missing'; then
    pass down-until-its-spare-appears "status: $(json_str "$st" reason | cut -c1-160)"
else
    fail down-until-its-spare-appears "status: $(printf '%s' "$st" | cut -c1-400)"
fi
uptime_cs() { cut -d' ' -f1 /proc/uptime | tr -d .; }
t0=$(uptime_cs)
nullb power "$hsp" on
n=0
while [ "$(json_str "$(hstatus)" state)" != up ] && [ $n -lt 200 ]; do
    sleep 0.05
    n=$((n + 1))
done
ms=$(( ($(uptime_cs) - t0) * 10 ))
if [ "$(json_str "$(hstatus)" state)" = up ] && [ -b "/dev/mapper/$HP" ]; then
    pass spare-powered-on-assembles "up ${ms} ms after the spare was powered on, with no command ($(grep -c 'a device it waited for appeared' /tmp/remapd2.log) assembly logged)"
else
    fail spare-powered-on-assembles "after ${ms} ms: $(hstatus | cut -c1-300); log: $(tail -3 /tmp/remapd2.log | tr '\n' ' ')"
fi

# The hook: one run per new alert, none for a stable count.
hook_lines() { grep -c "^$1|$HP|" /tmp/hook.log; }
scans() { grep -c "scanning for volumes" /tmp/remapd2.log; }
sleep 2 # the power-on's uevents settled
scans0=$(scans) regions0=$(dmsetup ls | grep -c "^$HP-remap-r")
nullb bad add "$hmain" 4000-4007
dio-read "/dev/mapper/$HP" 4000 8 2>/dev/null && info "sector 4000 read fine"
wait_for /tmp/hook.log "^pending\|$HP\|" 20
dio-read "/dev/mapper/$HP" 4000 8 2>/dev/null && info "sector 4000 read fine the second time"
sleep 5
line=$(grep "^pending|$HP|" /tmp/hook.log | head -1)
if [ "$(hook_lines pending)" = 1 ] && printf '%s' "$line" | grep -q '"kind":"pending"' &&
    printf '%s' "$line" | grep -q "\"volume\":\"$HP\""; then
    pass notify-exec-once-per-alert "ran once for the new pending block, not again for the same count: $(printf '%s' "$line" | cut -c1-200)"
else
    fail notify-exec-once-per-alert "pending runs $(hook_lines pending); hook log: $(tr '\n' ' ' </tmp/hook.log | cut -c1-600)"
fi
# The remap made its region's device (a kernel uevent like any disk's, 5 s ago): no scan.
regions1=$(dmsetup ls | grep -c "^$HP-remap-r")
if [ "$scans0" -ge 1 ] && [ "$(scans)" = "$scans0" ] && [ "$regions1" -gt "$regions0" ]; then
    pass own-device-no-scan "region devices $regions0 -> $regions1, scans for volumes still $scans0 (the spare's power-on made one)"
else
    fail own-device-no-scan "scans $scans0 -> $(scans) (want the same, and at least 1), region devices $regions0 -> $regions1 (want more)"
fi

# The main powered off under a reader: one path fault, nothing moved.
remaps_before=$(json_num "$(hstatus)" remaps)
(while :; do /usr/bin/dd if="/dev/mapper/$HP" of=/dev/null bs=64k count=64 iflag=direct 2>/dev/null; done) &
reader=$!
sleep 1
nullb power "$hmain" off
wait_for /tmp/hook.log "^path-fault\|$HP\|" 20
sleep 5
kill "$reader" 2>/dev/null
wait "$reader" 2>/dev/null
h=$(remapctl health "$HP" --json)
remaps_after=$(json_num "$(hstatus)" remaps)
if [ "$(hook_lines path-fault)" = 1 ] && [ "$remaps_after" = "$remaps_before" ] &&
    [ "$(json_num "$h" path_faults_seen)" -ge 1 ]; then
    pass member-powered-off-is-one-path-fault "one path-fault alert, remaps $remaps_before -> $remaps_after, path faults $(json_num "$h" path_faults_seen), errors seen $(json_num "$h" errors_seen)"
else
    fail member-powered-off-is-one-path-fault "path-fault runs $(hook_lines path-fault), remaps $remaps_before -> $remaps_after; health $(printf '%s' "$h" | cut -c1-300); hook log: $(tr '\n' ' ' </tmp/hook.log | cut -c1-400)"
fi
