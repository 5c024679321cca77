#!/bin/sh
# One spare's metadata area fails every write (a dm-flakey error_writes segment over it; its
# data area is fine). A bad sector is remapped all the same: the commit is durable on the other
# copy, the volume goes on with the new table, and the failed copy is no longer written (the
# pool shows it, its spare takes nothing new). A write made through the volume to a readable
# neighbour of the bad sector survives a crash (SIGKILL) and a "reboot" (every volume device
# removed) because what assembly reads is what the volume served. Remapping goes on afterwards.
# remapd's memory is locked (no page fault may wait on a region it holds suspended).
#vm: cases memory-locked remapped-anyway copy-marked-failed neighbour-write-survives remapping-goes-on
#vm: needs remapd remapctl
#vm: timeout 300
. /vm/lib.sh

VOL=vol0
main=$(nullb create --size 64)
sp1=$(nullb create --size 24)
raw=$(nullb create --size 28)
# The second spare: 24 MiB of $raw from 4 MiB on (so that $raw itself shows no metadata).
SP_SECTORS=49152
AREA=16384 # the 8 MiB metadata area of a 24 MiB spare
dmsetup create sp2 --table "0 $SP_SECTORS linear $raw 8192" || { fail remapped-anyway "setup: dmsetup"; exit 1; }
sp2=/dev/mapper/sp2

boots=0
start_agent() {
    boots=$((boots + 1))
    remapd >>/tmp/remapd.out 2>/tmp/remapd.$boots.log &
    agent=$!
    ln -sf /tmp/remapd.$boots.log /tmp/remapd.log
    wait_for /tmp/remapd.$boots.log "remapd ready" 90
}
status() { remapctl status "$VOL" --json; }

start_agent || { fail remapped-anyway "remapd not ready: $(tail -5 /tmp/remapd.log)"; exit 1; }
if ! out=$(remapctl create --in-place "$VOL" --main "$main" --spare "$sp1" --spare "$sp2" --region-size 16MiB 2>&1); then
    fail remapped-anyway "create: $out"
    exit 1
fi
lck=$(awk '/^VmLck:/ { print $2 }' /proc/$agent/status)
if [ "${lck:-0}" -gt 0 ]; then
    pass memory-locked "VmLck $lck kB"
else
    fail memory-locked "VmLck ${lck:-?} kB: $(grep -i 'lock' /tmp/remapd.log | head -2)"
fi
dd if=/dev/urandom of="/dev/mapper/$VOL" bs=1M count=64 oflag=direct status=none
dd if="/dev/mapper/$VOL" of=/tmp/golden bs=1M iflag=direct status=none

# From now on every write to sp2's metadata area fails.
dmsetup suspend sp2 &&
    printf '0 %s flakey %s 8192 0 1 1 error_writes\n%s %s linear %s %s\n' \
        $AREA "$raw" $AREA $((SP_SECTORS - AREA)) "$raw" $((8192 + AREA)) | dmsetup load sp2 &&
    dmsetup resume sp2 || { fail remapped-anyway "setup: flakey"; exit 1; }

# A bad sector in chunk 125 (sectors 1000-1007); read through the volume.
nullb bad add "$main" 1001-1001
dio-read "/dev/mapper/$VOL" 1000 8 2>/dev/null
n=0
while [ "$(json_num "$(status)" remaps)" != 1 ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
st=$(status)
if [ "$(json_num "$st" remaps)" = 1 ]; then
    pass remapped-anyway "$(grep -m1 'metadata write to spare' /tmp/remapd.log | cut -c1-240)"
else
    fail remapped-anyway "remaps $(json_num "$st" remaps); log: $(tail -4 /tmp/remapd.log | tr '\n' ' ')"
fi
if printf '%s' "$st" | grep -q '"metadata":"failed"'; then
    pass copy-marked-failed "pool: $(printf '%s' "$st" | grep -o '"metadata":"[a-z]*"' | tr '\n' ' ')"
else
    fail copy-marked-failed "status: $(printf '%s' "$st" | cut -c1-400)"
fi

# A write to the readable neighbour (sector 1003) through the volume, then a crash.
head -c 512 /dev/urandom >/tmp/fresh
dio-write "/dev/mapper/$VOL" 1003 1 /tmp/fresh
kill -KILL $agent
wait $agent 2>/dev/null
# A reboot, as far as the volume knows: its device-mapper devices are gone.
dmsetup remove "$VOL"
for d in $(dmsetup ls | awk '{ print $1 }' | grep "^$VOL-remap-r"); do dmsetup remove "$d"; done
start_agent || { fail neighbour-write-survives "remapd not ready after the crash: $(tail -5 /tmp/remapd.log)"; exit 1; }
dio-read "/dev/mapper/$VOL" 1003 1 /tmp/back 2>/dev/null
if cmp -s /tmp/fresh /tmp/back && [ "$(json_num "$(status)" remaps)" = 1 ]; then
    pass neighbour-write-survives "the sector written after the remap reads back after a crash and assembly"
else
    fail neighbour-write-survives "read back $(cmp /tmp/fresh /tmp/back 2>&1); remaps $(json_num "$(status)" remaps); $(grep -i assembl /tmp/remapd.log | tail -2 | tr '\n' ' ')"
fi

# Another bad sector: remapped too (onto the healthy spare).
nullb bad add "$main" 40003-40003
dio-read "/dev/mapper/$VOL" 40000 8 2>/dev/null
n=0
while [ "$(json_num "$(status)" remaps)" != 2 ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
dd if="/dev/mapper/$VOL" of=/tmp/now bs=512 skip=40000 count=3 iflag=direct status=none
dd if=/tmp/golden of=/tmp/want bs=512 skip=40000 count=3 status=none
if [ "$(json_num "$(status)" remaps)" = 2 ] && cmp -s /tmp/now /tmp/want; then
    pass remapping-goes-on "second remap made, its readable blocks identical"
else
    fail remapping-goes-on "remaps $(json_num "$(status)" remaps); $(tail -3 /tmp/remapd.log | tr '\n' ' ')"
fi
kill -TERM $agent
wait $agent
exit 0
