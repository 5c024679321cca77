# Storm: STORM_CHUNKS distinct bad chunks, hit within seconds by STORM_READERS sequential
# readers of the volume (GNU dd, O_DIRECT, 1 MiB requests, going on after read errors).
# Parameters: STORM_CHUNKS, STORM_RANGES, STORM_READERS, STORM_TIMEOUT.
#
# null_blk keeps at most 512 bad ranges, so the bad chunks come as STORM_RANGES ranges of
# STORM_CHUNKS / STORM_RANGES chunks, each followed by a good gap as long. A volume of 2 GiB
# over a null_blk disk without memory, two memory-backed spares of 512 MiB.

emit_guest
per=$((STORM_CHUNKS / STORM_RANGES))
base=2048
span=$((STORM_RANGES * 2 * per))
main=/dev/nullb0
nb_create 0 2048 0
nb_create 1 512 1
nb_create 2 512 1
agent_start || exit 1
remapctl --json create --in-place $VOL --main $main --spare /dev/nullb1 --spare /dev/nullb2 >/tmp/create.json ||
    { echo "create failed: $(cat /tmp/create.json)" >&2; exit 1; }
hwm0=$(proc_kb $AGENT_PID VmHWM)
: >/tmp/expected
for ((k = 0; k < STORM_RANGES; k++)); do
    first=$((base + k * 2 * per))
    nb_bad + $main "$((first * 8))-$(((first + per) * 8 - 1))"
    seq $first $((first + per - 1)) >>/tmp/expected
done
progress "$((per * STORM_RANGES)) bad chunks in $STORM_RANGES ranges, $STORM_READERS readers"

t0=$(now_us)
part=$((span * 4096 / 1048576 / STORM_READERS + 1))
pids=()
for ((i = 0; i < STORM_READERS; i++)); do
    dd if=/dev/mapper/$VOL of=/dev/null bs=1M iflag=direct conv=noerror \
        skip=$((base * 4096 / 1048576 + i * part)) count=$part status=none 2>/dev/null &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
readers_us=$(($(now_us) - t0))
n=0
want=$((per * STORM_RANGES))
while :; do
    got=$(status_num remaps)
    [ "${got:-0}" -ge "$want" ] && break
    [ $n -ge $((STORM_TIMEOUT * 5)) ] && break
    sleep 0.2
    n=$((n + 1))
done
total_us=$(($(now_us) - t0))
# Let the batches still queued (stale reports of located chunks) drain before counting.
sleep 2
remapctl --json remap list $VOL | grep -o '"chunk":[0-9]*' | cut -d: -f2 >/tmp/remapped
missed=$(awk 'NR == FNR { r[$1] = 1; next } !($1 in r)' /tmp/remapped /tmp/expected | wc -l)
extra=$(awk 'NR == FNR { e[$1] = 1; next } !($1 in e)' /tmp/expected /tmp/remapped | wc -l)
batches=$(grep "remap batch done" "$LOG" | awk '
    { for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
      n++; c += v["chunks"]; m += v["micros"]; s += v["suspended_micros"]
      if (v["suspended_micros"] > ms) ms = v["suspended_micros"]
      if (v["chunks"] > mc) mc = v["chunks"] }
    END { printf "{\"batches\":%d,\"chunks\":%d,\"micros\":%d,\"suspended_micros\":%d,\"max_suspended_micros\":%d,\"max_chunks\":%d}", n, c, m, s, ms, mc }')
counters=$(remapctl --json counters 2>/dev/null | tr -d '\n')
emit storm "{\"bad_chunks\":$want,\"ranges\":$STORM_RANGES,\"readers\":$STORM_READERS,\"remaps\":$(status_num remaps),\"pending\":$(status_num pending),\"missed\":$missed,\"extra\":$extra,\"readers_micros\":$readers_us,\"total_micros\":$total_us,\"hwm_kb_before\":$hwm0,\"hwm_kb\":$(proc_kb $AGENT_PID VmHWM),\"rss_kb\":$(proc_kb $AGENT_PID VmRSS),\"log\":$batches,\"counters\":${counters:-null}}"
progress "$(status_num remaps) of $want remapped, $missed missed, in $((total_us / 1000)) ms"
agent_stop
emit done "{\"section\":\"storm\"}"
