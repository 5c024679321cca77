#!/bin/sh
# Slow I/O: a main disk whose every request takes 300 ms (null_blk completing on a timer)
# under an agent that calls 150 ms slow. The eBPF programs on block_rq_issue/complete report
# each slow request with its latency; a chunk read slowly three times is weak and moves to the
# pool with all its data while it still reads; a chunk read slowly twice stays; health and the
# counters show the slow I/O.
#vm: cases detected weak-moved data-identical not-weak-yet health counters
#vm: needs remapd remapctl
#vm: timeout 420
. /vm/lib.sh

VOL=vol0
main=$(nullb create --size 64 --delay-ms 300)
sp1=$(nullb create --size 24)
sp2=$(nullb create --size 24)

remapd --socket /run/remap/remapd.sock --slow-ms 150 >/tmp/remapd.out 2>/tmp/remapd.log &
agent=$!
wait_for /tmp/remapd.log "remapd ready" 90 || { fail detected "remapd not ready: $(tail -5 /tmp/remapd.log)"; exit 1; }
# Debian's kernels publish BTF: the completion watch reads the request itself.
grep -q 'completions="raw tracepoint' /tmp/remapd.log ||
    fail detected "completions not watched through the raw tracepoint: $(grep 'remapd ready' /tmp/remapd.log)"
status() { remapctl status "$VOL" --json; }

if ! out=$(remapctl create --in-place "$VOL" --main "$main" --spare "$sp1" --spare "$sp2" --region-size 16MiB 2>&1); then
    fail detected "create: $out"
    exit 1
fi
remapctl events --follow --json >/tmp/events 2>&1 &
follower=$!

# Known data in the first MiB, written and read back in 64 KiB requests: slow, but spanning
# many chunks, so no chunk is blamed for them. (Not 1 MiB: null_blk splits those at 255
# sectors, and the 8-sector tail is one chunk, read slowly on every pass.)
dd if=/dev/urandom of=/tmp/golden bs=64k count=16 status=none
dd if=/tmp/golden of="/dev/mapper/$VOL" bs=64k oflag=direct status=none
dd if="/dev/mapper/$VOL" of=/tmp/back bs=64k count=16 iflag=direct status=none
cmp -s /tmp/golden /tmp/back || info "read-back differs before any remap"

# Chunk 100 (LBA 800) read three times, chunk 200 (LBA 1600) twice, 4 KiB each, further apart
# than the detector's one-second de-duplication window.
for i in 1 2 3; do
    dio-read "/dev/mapper/$VOL" 800 8 || info "read $i of chunk 100 failed"
    [ $i = 3 ] || dio-read "/dev/mapper/$VOL" 1600 8 || info "read $i of chunk 200 failed"
    sleep 1.2
done

n=0
until grep -q '"lbas":\[800\]' /tmp/events || [ $n -ge 200 ]; do sleep 0.1; n=$((n + 1)); done

# --- detected: slow events name the sector and carry a latency of at least the delay
ev=$(grep '"event":"slow"' /tmp/events | grep '"sector":800,' | head -1)
lat=$(json_num "$ev" latency_ms)
if [ -n "$ev" ] && [ "${lat:-0}" -ge 290 ] && [ "$lat" -lt 5000 ]; then
    pass detected "$(grep -c '"event":"slow"' /tmp/events) slow events; chunk 100 took $lat ms"
else
    fail detected "no slow event for sector 800 with latency >= 290 ms: $(grep -m3 '"event":"slow"' /tmp/events | tr '\n' ' ')"
fi

# --- weak-moved: chunk 100 moved, nothing pending (it still read), logged as weak
list=$(remapctl remap list "$VOL" --json)
if printf '%s' "$list" | grep -q '"chunk":100,' && [ "$(json_num "$(status)" pending)" = 0 ] &&
    grep -q "weak chunk" /tmp/remapd.log; then
    pass weak-moved "$(grep -m1 'weak chunk' /tmp/remapd.log | sed 's/.*weak chunk/weak chunk/')"
else
    fail weak-moved "remap list: $list; log: $(grep -E 'weak|slow' /tmp/remapd.log | tail -3 | tr '\n' ' ')"
fi

# --- data-identical: the first MiB reads back as written (chunk 100 now from the spare)
dd if="/dev/mapper/$VOL" of=/tmp/after bs=64k count=16 iflag=direct status=none
if cmp /tmp/golden /tmp/after >/tmp/cmp 2>&1; then
    pass data-identical
else
    fail data-identical "$(head -2 /tmp/cmp)"
fi

# --- not-weak-yet: two slow reads are not enough
if printf '%s' "$list" | grep -q '"chunk":200,'; then
    fail not-weak-yet "chunk 200 was moved after two slow reads"
else
    n=$(json_num "$(status)" remaps)
    if [ "$n" = 1 ]; then
        pass not-weak-yet
    else
        fail not-weak-yet "$n remaps: $list; $(grep 'weak chunk' /tmp/remapd.log | sed 's/.*chunk=\([0-9]*\).*/\1/' | tr '\n' ' ')"
    fi
fi

# --- health: slow I/O counted
h=$(remapctl health "$VOL" --json)
seen=$(json_num "$h" slow_io_seen)
if [ "${seen:-0}" -ge 5 ] && printf '%s' "$h" | grep -q 'slow requests'; then
    pass health "slow_io_seen $seen"
else
    fail health "slow_io_seen ${seen:-missing}: $h"
fi

# --- counters: the kernel side counted them too
c=$(remapctl counters --json)
slow=$(json_num "$c" slow)
if [ "${slow:-0}" -ge 5 ]; then
    pass counters "$c"
else
    fail counters "$c"
fi

kill $follower 2>/dev/null
kill -TERM $agent
wait $agent
