# Reaction, flat-table reloads, assembly and metadata cost, as the remaps accumulate.
# Parameters (from the header xtask writes): SIZES, SCALE_SIZES, RUNS, INJECT, FLAT_REPS,
# FLAT_SCATTERED_MAX, META_N, META_BURSTS, READER_IOPS, BASELINE_S, SCATTER, REGION_SEGMENTS.
#
# SCATTER=1: the background is scattered remaps, no two adjacent (two segments each): the odd
# chunks of 8 MiB windows, one request of 1,024 chunks per window, the windows taken in an
# order that spreads them over the volume; injections and the metadata remaps take even
# chunks (of region 1 and region 5), the metadata bursts one request of spaced chunks each.
#
# One volume of 8 GiB (2 Mi chunks of 4 KiB, 8 regions of 1 GiB) over a null_blk disk without
# memory, two 8 GiB spares. For each size in SIZES the background grows to that many remaps,
# then:
# - INJECT errors, one at a time: a bad sector on the main disk, one O_DIRECT read of it through
#   the volume; the kernel trace gives the failing request's block_rq_error and the region's
#   dm_suspend and dm_resume (reaction = resume return - error), remapd's log its own timings;
# - meanwhile two readers, rate-limited, of another region and of the injected region;
# - a flat table with the volume's segment count, and one with 2N+1 segments (N scattered
#   remaps), loaded, suspended and resumed with dmsetup (wall time, and the kernel's own time);
# - metadata bytes written per remap, for remaps one per commit and in bursts of META_BURSTS;
# - at sizes in SCALE_SIZES: the agent is restarted and assembles the volume (timed, memory),
#   next to creating the same tables with dmsetup.
emit_guest

MAIN_MB=8192
CHUNKS=$((MAIN_MB * 256))
STRIDE=$((CHUNKS / RUNS))
REGION_CHUNKS=262144
INJ_REGION=1
OTHER_REGION=5

# Stride offsets the background will use, so injections and single remaps go elsewhere.
used=0 prev=0
for s in $SIZES; do
    add=$((s - prev))
    if [ $add -gt 0 ]; then
        l=$((add / RUNS))
        [ $l -ge 1 ] || l=1
        used=$((used + l + 1))
    fi
    prev=$s
done
INJ_OFF=$((used + 8))
MISC_OFF=$((INJ_OFF + 256))
[ "$SCATTER" = 1 ] || [ $((MISC_OFF + 256)) -lt $STRIDE ] || { echo "layout does not fit: stride $STRIDE" >&2; exit 1; }
# Injection i goes to stride INJ_S0 + i % INJ_NS of the injected region (after the first 32 MiB,
# which the same-region reader reads), at offset INJ_OFF + i / INJ_NS.
INJ_S0=$(((INJ_REGION * REGION_CHUNKS + 8192 + STRIDE - 1) / STRIDE))
INJ_NS=$((((INJ_REGION + 1) * REGION_CHUNKS) / STRIDE - INJ_S0))
INJ_I=0
MISC_I=0

progress "main $MAIN_MB MiB, $RUNS runs per step, stride $STRIDE chunks"
main=/dev/nullb0
nb_create 0 $MAIN_MB 0
# The spares a little larger than the main: a main with no WWN or serial is told apart from
# them by its size when the volume is assembled at start (remap does not guess by path).
SPARE_MB=$((MAIN_MB + 64))
# REGION_SEGMENTS: remapd's bound on a region table (empty: its default), to compare bounds.
[ -n "$REGION_SEGMENTS" ] && export REMAPD_REGION_SEGMENTS=$REGION_SEGMENTS
sp0=$(hybrid_spare bsp0 1 2 $SPARE_MB)
sp1=$(hybrid_spare bsp1 3 4 $SPARE_MB)
META_DEVS="/dev/nullb1 /dev/nullb3"
DATA_DEVS="/dev/nullb2 /dev/nullb4"
trace_setup

# The agent's fixed start cost (detector load and attach), without volumes.
agent_start --no-assemble || exit 1
emit agent-start "{\"ready_micros\":$READY_US}"
agent_stop
agent_start || exit 1
remapctl --json create --in-place $VOL --main $main --spare "$sp0" --spare "$sp1" >/tmp/create.json ||
    { echo "create failed: $(cat /tmp/create.json)" >&2; exit 1; }
check_meta_window $SPARE_MB "$(cat /tmp/create.json)" || exit 1
emit volume "$(cat /tmp/create.json)"

# readers_start: two rate-limited 4 KiB random readers, one on another region and one on the
# first 32 MiB of the injected region; readers_stop sets READERS_TERSE to their terse lines.
READERS=
READERS_TERSE=
readers_start() {
    fio --output-format=terse --terse-version=3 --disk_util=0 --direct=1 --randrepeat=0 --norandommap \
        --ioengine=psync --bs=4k --rw=randread --time_based --runtime=100000 \
        --rate_iops="$READER_IOPS" --filename=/dev/mapper/$VOL \
        --name=other --offset=$((OTHER_REGION * REGION_CHUNKS * 4096)) --size=1G \
        --name=same --offset=$((INJ_REGION * REGION_CHUNKS * 4096)) --size=32M \
        >/tmp/readers.out 2>/dev/null &
    READERS=$!
    sleep 1
}
readers_stop() {
    kill -INT $READERS 2>/dev/null
    wait $READERS 2>/dev/null
    READERS_TERSE=$(grep '^3;' /tmp/readers.out | tr '\n' '|')
}

# The readers alone: what their latency looks like when nothing is remapped.
readers_start
sleep "$BASELINE_S"
readers_stop
emit readers-baseline "{\"terse\":$(jstr "$READERS_TERSE")}"

# inject_one: one error, waits for its batch; sets INJ to "REACTION SUSPENDED LOG_MICROS
# LOG_SUSPENDED" (microseconds), or "- - - -" when it could not be timed, and PHASES to
# remapd's own "locate prepare load commit" times of the batch.
INJ=
inject_one() {
    local c s n=0 e u r line k2
    if [ "$SCATTER" = 1 ]; then
        c=$((INJ_REGION * REGION_CHUNKS + 8192 + 2 * ((INJ_I * 4099) % 120000)))
    else
        c=$(((INJ_S0 + INJ_I % INJ_NS) * STRIDE + INJ_OFF + INJ_I / INJ_NS))
    fi
    INJ_I=$((INJ_I + 1))
    s=$((c * 8))
    echo >$T/trace
    nb_bad + $main "$s-$s"
    dio-read /dev/mapper/$VOL $s 8 2>/dev/null
    # Done when the log has this error and then a finished batch (logged after the resume).
    # The trace is read only then: the kernel stops recording while its trace file is read.
    while [ $n -lt 3000 ]; do
        line=$(awk -v s="sector=$s " 'index($0, s) && /I\/O error/ { f = 1 } f && /remap batch done/ { print; exit }' "$LOG")
        [ -n "$line" ] && break
        sleep 0.01
        n=$((n + 1))
    done
    nb_bad - $main "$s-$s"
    # A read of the trace file can miss events already logged by remapd's batch (seen at
    # a million remaps: the suspend and resume were there a few reads later): read again for
    # up to 2 s before calling the error untimed.
    for ((k2 = 0; k2 < 40; k2++)); do
        read -r e u r <<<"$(trace_times $s)"
        [ "$r" != "-" ] && break
        sleep 0.05
    done
    if [ -z "$line" ] || [ "$e" = "-" ] || [ "$r" = "-" ]; then
        echo "bench: an error at sector $s was not timed (e=$e u=$u r=$r, waited $n, trace read $k2 times)"
        grep -v '^#' $T/trace | tail -20
        INJ="- - - -"
        return
    fi
    INJ="$((r - e)) $((r - u)) $(echo "$line" | sed -n 's/.* micros=\([0-9]*\).*/\1/p') $(echo "$line" | sed -n 's/.*suspended_micros=\([0-9]*\).*/\1/p')"
    PHASES=
    for k2 in locate prepare load commit; do
        PHASES="$PHASES $(echo "$line" | sed -n "s/.*${k2}_micros=\([0-9]*\).*/\1/p")"
    done
}

# flat_cmp SIZE LABEL SEGMENTS REPS: a flat table of SEGMENTS 4 KiB linear segments alternating
# between the main disk and a spare's, loaded into a device and swapped in with dmsetup load,
# suspend and resume: wall times, the kernel's own time in each call, and what one dmsetup
# process costs by itself (a query that touches no table).
flat_cmp() {
    local size=$1 label=$2 n=$3 reps=$4 i t0 t1 t2 t3 err="" kl ks kr
    local loads=() sus=() res=() noop=() kload=() ksus=() kres=() avail
    # A table file of millions of lines and dmsetup's copy of it live in the guest's RAM.
    avail=$(awk '/^MemAvailable/ {print $2}' /proc/meminfo)
    if [ $((n / 8)) -gt $((avail / 2)) ]; then
        emit flat "{\"remaps\":$size,\"label\":\"$label\",\"segments\":$n,\"load\":[],\"suspend\":[],\"resume\":[],\"kernel_load\":[],\"kernel_suspend\":[],\"kernel_resume\":[],\"noop\":[],\"error\":\"not tried: the table would need more than half of the guest's available memory ($((avail / 1024)) MiB)\"}"
        return
    fi
    awk -v n="$n" -v a="$(majmin $main)" -v b="$(majmin /dev/nullb2)" 'BEGIN {
        for (i = 0; i < n; i++) printf "%d 8 linear %s %d\n", i * 8, (i % 2 ? b : a), (i % 1000000) * 8 + 4096 }' \
        >/tmp/flat.table
    dmsetup create bench-flat --table "0 8 linear $(majmin $main) 0" || return
    for ((i = 0; i < reps; i++)); do
        echo >$T/trace
        t0=$(now_us)
        if ! err=$(dmsetup load bench-flat /tmp/flat.table 2>&1); then
            break
        fi
        t1=$(now_us)
        dmsetup suspend bench-flat
        t2=$(now_us)
        dmsetup resume bench-flat
        t3=$(now_us)
        err=""
        loads+=($((t1 - t0)))
        sus+=($((t2 - t1)))
        res+=($((t3 - t2)))
        read -r kl _ _ <<<"$(trace_pairs bench_tl bench_tlr)"
        read -r ks _ _ <<<"$(trace_pairs bench_sus bench_susr)"
        read -r kr _ _ <<<"$(trace_pairs bench_resp bench_res)"
        kload+=("$kl")
        ksus+=("$ks")
        kres+=("$kr")
    done
    for ((i = 0; i < 3; i++)); do
        t0=$(now_us)
        dmsetup info bench-flat >/dev/null
        noop+=($(($(now_us) - t0)))
    done
    dmsetup remove bench-flat
    rm -f /tmp/flat.table
    emit flat "{\"remaps\":$size,\"label\":\"$label\",\"segments\":$n,\"load\":$(jlist "${loads[@]}"),\"suspend\":$(jlist "${sus[@]}"),\"resume\":$(jlist "${res[@]}"),\"kernel_load\":$(jlist "${kload[@]}"),\"kernel_suspend\":$(jlist "${ksus[@]}"),\"kernel_resume\":$(jlist "${kres[@]}"),\"noop\":$(jlist "${noop[@]}"),\"error\":$(jstr "$(echo "$err" | head -3)")}"
}

# meta_cost SIZE N BURST: N remaps in bursts of BURST adjacent chunks, one batch (one commit)
# per burst; sectors written to the metadata and data parts of the spares.
meta_cost() {
    local n=$2 k=$3 i c m0 m1 d0 d1 t0 us fails
    : >/tmp/meta.req
    for ((i = 0; i < n / k; i++)); do
        if [ "$SCATTER" = 1 ]; then
            c=$((5 * REGION_CHUNKS + 2 * (MISC_I + i) * k))
            req_add_spaced "$c" "$k" 2 >>/tmp/meta.req
        else
            c=$((((MISC_I + i) % RUNS) * STRIDE + MISC_OFF + (MISC_I + i) / RUNS * 64))
            req_add $((c * 8)) $((k * 8)) >>/tmp/meta.req
        fi
    done
    MISC_I=$((MISC_I + n / k))
    local g0 g1
    g0=$(superblock 48 8)
    m0=$(nb_wsect $META_DEVS)
    d0=$(nb_wsect $DATA_DEVS)
    t0=$(now_us)
    fails=$(raw_remaps /tmp/meta.req)
    us=$(($(now_us) - t0))
    m1=$(nb_wsect $META_DEVS)
    d1=$(nb_wsect $DATA_DEVS)
    g1=$(superblock 48 8)
    # A checkpoint that fell in the window is reported apart (its size from the superblock).
    emit meta "{\"size\":$1,\"remaps\":$(status_num remaps),\"n\":$((n / k * k)),\"burst\":$k,\"failed\":$((fails * k)),\"micros\":$us,\"meta_sectors\":$((m1 - m0)),\"data_sectors\":$((d1 - d0)),\"spares\":2,\"checkpointed\":$([ "$g1" != "$g0" ] && echo true || echo false),\"ckpt_bytes\":$(superblock 56 8)}"
}

# superblock FIELD_OFFSET BYTES: a field of the newer superblock (higher checkpoint generation)
# of the first spare (its superblocks are 1 MiB into its metadata disk; read with O_DIRECT, as
# remapd wrote them).
sb_field() {
    dd if=/dev/nullb1 bs=4096 skip="$1" count=1 iflag=direct status=none 2>/dev/null |
        od -An -tu"$3" -j"$2" -N"$3" | tr -d ' '
}
superblock() {
    local b=256
    [ "$(sb_field 257 48 8)" -gt "$(sb_field 256 48 8)" ] && b=257
    sb_field $b "$1" "$2"
}
# journal_unit: the journal's block size (the superblock's field at 88; 0 in version 2: 4 KiB).
journal_unit() {
    local u
    u=$(superblock 88 4)
    [ "${u:-0}" -gt 0 ] && echo "$u" || echo 4096
}
# ckpt_field OFFSET LEN: a field of the header of the checkpoint the newest superblock names
# (config_len at 12, count at 40; docs/METADATA.md).
ckpt_field() {
    local jb area slot slot_bytes unit
    jb=$(superblock 76 4) area=$(superblock 80 8) slot=$(superblock 68 4) unit=$(journal_unit)
    slot_bytes=$(((area - 8192 - jb * unit) / 2 / 4096 * 4096))
    sb_field $((256 + (8192 + jb * unit + slot * slot_bytes) / 4096)) "$1" "$2"
}

# scale_at SIZE: the volume's tables saved; the volume stopped and the agent restarted (it
# assembles at start); the same tables created with dmsetup (regions, the groups over them,
# the volume over both: each device of the volume named by its stand-in's path).
scale_at() {
    local r t0 floor_us m0 m1 kfloor kasm regions=() groups=()
    rm -rf /tmp/floor && mkdir /tmp/floor
    # One dmsetup each for every table and every device number: thousands of regions.
    dmsetup table | awk -v v="$VOL-remap-" -v d=/tmp/floor 'index($1, v) == 1 {
        n = substr($1, 1, length($1) - 1)
        if (n != last) { if (last != "") close(d "/" last); last = n }
        $1 = ""; sub(/^ /, ""); print > (d "/" n) }'
    dmsetup info -c --noheadings -o major,minor,name --separator : |
        awk -F: -v v="$VOL-remap-" '{ gsub(/ /, "") } index($3, v) == 1 { print $1 ":" $2, $3 }' >/tmp/floor/devnos
    for r in $(awk '{ print $2 }' /tmp/floor/devnos | sort); do
        case $r in
        "$VOL"-remap-g*) groups+=("$r") ;;
        *) regions+=("$r") ;;
        esac
    done
    dmsetup table "$VOL" >/tmp/floor/top
    for r in "${groups[@]}" top; do
        awk 'NR == FNR { m[$1] = $2; next } ($4 in m) { $4 = "/dev/mapper/bench-" m[$4] } { print }' \
            /tmp/floor/devnos "/tmp/floor/$r" >"/tmp/floor/$r.named"
    done
    remapctl --json stop $VOL >/dev/null || { echo "stop failed" >&2; return 1; }
    agent_stop
    # The kernel floor: the same tables, with dmsetup.
    echo >$T/trace
    t0=$(now_us)
    for r in "${regions[@]}"; do
        dmsetup create "bench-$r" <"/tmp/floor/$r"
    done
    for r in "${groups[@]}"; do
        dmsetup create "bench-$r" <"/tmp/floor/$r.named"
    done
    dmsetup create bench-floor </tmp/floor/top.named
    floor_us=$(($(now_us) - t0))
    read -r kfloor _ _ <<<"$(trace_pairs bench_io bench_ior)"
    dmsetup remove bench-floor
    for r in "${groups[@]}" "${regions[@]}"; do dmsetup remove "bench-$r"; done
    # The agent's start without assembly, right before: the part of "ready" that is not assembly.
    agent_start --no-assemble || return 1
    local base=$READY_US
    agent_stop
    m0=$(nb_wsect $META_DEVS)
    echo >$T/trace
    agent_start || return 1
    read -r kasm _ _ <<<"$(trace_pairs bench_io bench_ior)"
    m1=$(nb_wsect $META_DEVS)
    local line remaps
    line=$(grep "assembled" "$LOG" | tail -1)
    remaps=$(status_num remaps)
    emit scale "{\"size\":$1,\"remaps\":$remaps,\"regions\":${#regions[@]},\"segments\":$(region_segments),\"ready_micros\":$READY_US,\"start_micros\":$base,\"floor_micros\":$floor_us,\"floor_processes\":$((${#regions[@]} + ${#groups[@]} + 1)),\"kernel_floor_micros\":${kfloor:-0},\"kernel_assembly_micros\":${kasm:-0},\"hwm_kb\":$(proc_kb $AGENT_PID VmHWM),\"rss_kb\":$(proc_kb $AGENT_PID VmRSS),\"checkpoint_sectors\":$((m1 - m0)),\"ckpt_bytes\":$(superblock 56 8),\"config_bytes\":$(ckpt_field 12 4),\"journal_blocks\":$(superblock 76 4),\"journal_unit\":$(journal_unit),\"log\":$(jstr "$line")}"
    progress "scale: $remaps remaps assembled, ready in $((READY_US / 1000)) ms, dmsetup floor $((floor_us / 1000)) ms"
}

for size in $SIZES; do
    bg_grow "$size"
    start_remaps=$(status_num remaps)
    segs=$(region_segments)
    inj_segs=$(longest_region)
    progress "reaction at $size remaps ($segs segments): $INJECT errors"
    readers_start
    # One error first, not counted: the first of a series pays for cold caches.
    inject_one
    rs=() ss=() lm=() ls=() pl=() pp=() pd=() pc=() misses=0
    for ((k = 0; k < INJECT; k++)); do
        inject_one
        read -r a b c d <<<"$INJ"
        if [ "$a" = "-" ]; then
            misses=$((misses + 1))
            continue
        fi
        rs+=("$a")
        ss+=("$b")
        lm+=("${c:-0}")
        ls+=("${d:-0}")
        read -r a b c d <<<"$PHASES"
        pl+=("${a:-0}")
        pp+=("${b:-0}")
        pd+=("${c:-0}")
        pc+=("${d:-0}")
    done
    readers_stop
    emit reaction "{\"remaps\":$size,\"actual\":$start_remaps,\"segments\":$segs,\"region_segments\":$inj_segs,\"reaction\":$(jlist "${rs[@]}"),\"suspended\":$(jlist "${ss[@]}"),\"log_micros\":$(jlist "${lm[@]}"),\"log_suspended\":$(jlist "${ls[@]}"),\"log_locate\":$(jlist "${pl[@]}"),\"log_prepare\":$(jlist "${pp[@]}"),\"log_load\":$(jlist "${pd[@]}"),\"log_commit\":$(jlist "${pc[@]}"),\"missed\":$misses,\"readers\":$(jstr "$READERS_TERSE")}"
    progress "flat tables at $size remaps"
    flat_cmp "$size" same $((segs + 8)) "$FLAT_REPS"
    if [ "$size" -gt 0 ] && [ "$size" -le "$FLAT_SCATTERED_MAX" ]; then
        flat_cmp "$size" scattered $((2 * size + 1)) "$FLAT_REPS"
    fi
    if [ "$size" -gt 0 ]; then
        for burst in $META_BURSTS; do meta_cost "$size" "$META_N" "$burst"; done
    fi
    case " $SCALE_SIZES " in *" $size "*) scale_at "$size" ;; esac
done
agent_stop
emit done "{\"section\":\"reaction\"}"
