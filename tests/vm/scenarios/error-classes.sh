#!/bin/sh
# Only the medium spends the pool. The main is a file-backed virtio disk with two QEMU blkdebug
# injections: sector 8000 fails one read only (a transient: the block reads fine when located),
# sector 20000 fails every read (a bad sector). A read of the first through the volume moves
# nothing and is counted as transient; a read of the second moves its chunk at once, with the
# sector pending. (Errors that are not the medium's, and a chunk that keeps failing while it
# reads fine when located, have no injector here: unit tests prove them.)
#vm: cases transient-moves-nothing bad-sector-moves-at-once
#vm: disk flaky 64M inject=read_aio:5:8000:once inject=read_aio:5:20000
#vm: needs remapd remapctl
#vm: timeout 300
. /vm/lib.sh

VOL=vol0
main=$(vmdisk flaky)
sp1=$(nullb create --size 24)
remapd >/tmp/remapd.out 2>/tmp/remapd.log &
wait_for /tmp/remapd.log "remapd ready" 90 || { fail transient-moves-nothing "remapd not ready: $(tail -5 /tmp/remapd.log)"; exit 1; }
if ! out=$(remapctl create "$VOL" --main "$main" --spare "$sp1" --region-size 16MiB 2>&1); then
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
