# Shared by the benchmark sections (bash, not dash). `cargo xtask bench` writes one guest script
# per section: a header with the run's parameters (BENCH_QUICK, ...), this file, the section.
# Records go to the results channel as `INFO BENCH KEY {json}`; lines starting `bench:` on the
# console are progress, which xtask echoes.
. /vm/lib.sh

# Kernel I/O error messages on the serial console cost more than the I/O under TCG.
dmesg -n 1 2>/dev/null
CFG=/sys/kernel/config/nullb
T=/sys/kernel/tracing
LOG=/tmp/remapd.log
VOL=vol
# The engine logs one line per chunk moved; a million of them would fill the guest's RAM.
export REMAP_LOG="info,remap_user::engine=warn"

emit_guest() {
    emit guest "{\"release\":\"$(uname -r)\",\"cpus\":$(grep -c ^processor /proc/cpuinfo),\"mem_kb\":$(awk '/^MemTotal/ {print $2}' /proc/meminfo)}"
}

now_us() {
    local t=${EPOCHREALTIME/./}
    echo $((10#$t))
}
progress() { echo "bench: $*"; }
# emit KEY JSON: one record for xtask.
emit() { result info "BENCH $1 $2"; }
# jstr TEXT: TEXT as a JSON string (no newlines; quotes and backslashes escaped).
jstr() {
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    printf '"%s"' "$(printf '%s' "$s" | tr '\n\r\t' '   ')"
}
# jlist A B C: [A,B,C]
jlist() {
    local IFS=,
    printf '[%s]' "$*"
}

# nb_create INDEX SIZE_MB MEMORY_BACKED: a null_blk disk /dev/nullbINDEX. Without memory
# backing, reads return whatever the buffer held and writes vanish: the fastest disk there is,
# so every cost of the layers above shows. Bad blocks work either way.
nb_create() {
    local d=$CFG/nullb$1
    [ -d $CFG ] || modprobe null_blk nr_devices=0
    mkdir "$d"
    echo "$2" >"$d/size"
    echo "$3" >"$d/memory_backed"
    echo 512 >"$d/blocksize"
    echo 1 >"$d/power"
    local n=0
    while [ ! -b "/dev/nullb$1" ] && [ $n -lt 100 ]; do
        sleep 0.1
        n=$((n + 1))
    done
}
nb_bad() { echo "$1$3" >"$CFG/${2##*/}/badblocks"; } # nb_bad +|- DEV START-END
# Sectors written to a disk so far (field 7 of /sys/block/X/stat).
wsect() { awk '{print $7}' "/sys/block/${1##*/}/stat"; }
majmin() { cat "/sys/block/${1##*/}/dev"; }
# nb_wsect DEVS...: sectors written to all of them.
nb_wsect() {
    local d n=0
    for d in "$@"; do n=$((n + $(wsect "$d"))); done
    echo $n
}

# hybrid_spare NAME META_INDEX DATA_INDEX SIZE_MB: a spare of SIZE_MB whose first 128 MiB (the
# metadata area of a spare of 8 GiB or more: 1/64 of it, at most 128 MiB) live on a
# memory-backed null_blk, 1 MiB into it, and the rest on one without memory. Metadata survives
# an agent restart, a million copied chunks cost no RAM, and the writes to the memory-backed
# disk are metadata only (check_meta_window verifies where the data area starts). The 1 MiB
# offset keeps the memory-backed disk itself from looking like a second copy.
META_WINDOW=262144
hybrid_spare() {
    local s=$(($4 * 2048))
    nb_create "$2" 256 1
    nb_create "$3" "$4" 0
    printf '0 %d linear /dev/nullb%d 2048\n%d %d linear /dev/nullb%d %d\n' \
        $META_WINDOW "$2" $META_WINDOW $((s - META_WINDOW)) "$3" $META_WINDOW |
        dmsetup create "$1"
    echo "/dev/mapper/$1"
}

# check_meta_window SPARE_MB CREATE_JSON: the first spare's data area starts where its
# hybrid's memory-backed part ends (size - chunks x 8 sectors).
check_meta_window() {
    local chunks
    chunks=$(printf '%s' "$2" | grep -o '"chunks":[0-9]*' | head -1 | cut -d: -f2)
    [ $(($1 * 2048 - chunks * 8)) -eq $META_WINDOW ] ||
        { echo "metadata area is $(($1 * 2048 - chunks * 8)) sectors, not $META_WINDOW" >&2; return 1; }
}

# agent_start [ARGS...]: remapd in the background; sets AGENT_PID and READY_US (start to
# "remapd ready").
AGENT_PID=
READY_US=0
agent_start() {
    local before t0 n=0
    before=$(grep -c "remapd ready" "$LOG" 2>/dev/null)
    t0=$(now_us)
    remapd --socket /run/remap/remapd.sock "$@" >>/tmp/remapd.out 2>>"$LOG" &
    AGENT_PID=$!
    while [ "$(grep -c "remapd ready" "$LOG" 2>/dev/null)" -le "${before:-0}" ]; do
        if ! kill -0 $AGENT_PID 2>/dev/null || [ $n -gt 60000 ]; then
            echo "remapd did not start: $(tail -5 "$LOG")" >&2
            return 1
        fi
        sleep 0.01
        n=$((n + 1))
    done
    READY_US=$(($(now_us) - t0))
}
agent_stop() {
    [ -n "$AGENT_PID" ] || return 0
    kill -TERM $AGENT_PID 2>/dev/null
    wait $AGENT_PID 2>/dev/null
    AGENT_PID=
}
# proc_kb PID FIELD: VmHWM, VmRSS, ... in kB.
proc_kb() { awk -v f="$2:" '$1 == f {print $2}' "/proc/$1/status"; }

status_num() { json_num "$(remapctl --json status $VOL)" "$1"; }

# raw_remaps FILE: sends the remap-add requests in FILE (one JSON line each) over one control
# connection; returns the number of requests that failed.
raw_remaps() {
    remapctl debug raw <"$1" >/tmp/raw.out
    grep -vc '"code":0' /tmp/raw.out
}
# req_add LBA COUNT: one remap-add request line.
req_add() { printf '{"cmd":"remap-add","name":"%s","lba":%d,"count":%d}\n' "$VOL" "$1" "$2"; }

# req_add_spaced CHUNK N GAP: one remap-add request for N chunks from CHUNK, GAP chunks apart.
req_add_spaced() {
    awk -v v="$VOL" -v c="$1" -v n="$2" -v g="$3" 'BEGIN {
        printf "{\"cmd\":\"remap-add\",\"name\":\"%s\",\"lba\":%d,\"count\":8,\"more\":[", v, c * 8
        for (i = 1; i < n; i++) printf "%s%d", (i > 1 ? "," : ""), (c + i * g) * 8
        print "]}" }'
}

# Background remaps, built in steps that only add: step k puts RUNS runs of L_k contiguous chunks
# at the same offset OFF_k of each of RUNS equal strides of the volume, one gap chunk apart,
# so the runs never merge into one table segment. One request (one batch) per run.
# bg_grow TARGET: grows the background to TARGET remaps; emits a `build` record.
BG=0
BG_OFF=0
bg_grow() {
    local target=$1 add=$(($1 - BG)) len r t0 fails
    [ $add -gt 0 ] || return 0
    if [ "$SCATTER" = 1 ]; then
        bg_grow_scattered "$target"
        return
    fi
    len=$((add / RUNS))
    [ $len -ge 1 ] || len=1
    local runs=$((add / len))
    : >/tmp/bg.req
    for ((r = 0; r < runs; r++)); do
        req_add $(((r * STRIDE + BG_OFF) * 8)) $((len * 8)) >>/tmp/bg.req
    done
    t0=$(now_us)
    fails=$(raw_remaps /tmp/bg.req)
    local us=$(($(now_us) - t0))
    BG_OFF=$((BG_OFF + len + 1))
    BG=$((BG + runs * len))
    emit build "{\"target\":$target,\"remaps\":$BG,\"actual\":$(status_num remaps),\"runs\":$runs,\"run_chunks\":$len,\"micros\":$us,\"failed\":$fails}"
    progress "background: $BG remaps ($runs runs of $len chunks) in $((us / 1000)) ms"
}

# bg_grow_scattered TARGET: remap j is odd chunk 2 (j % 1024) + 1 of 8 MiB window
# (389 (j / 1024)) % (windows): no two adjacent, one request per window's share.
bg_grow_scattered() {
    local target=$1 j=$BG w n t0 us fails windows=$((CHUNKS / 2048))
    : >/tmp/bg.req
    while [ $j -lt "$target" ]; do
        w=$(((389 * (j / 1024)) % windows))
        n=$((1024 - j % 1024))
        [ $((j + n)) -le "$target" ] || n=$((target - j))
        req_add_spaced $((w * 2048 + 2 * (j % 1024) + 1)) $n 2 >>/tmp/bg.req
        j=$((j + n))
    done
    t0=$(now_us)
    fails=$(raw_remaps /tmp/bg.req)
    us=$(($(now_us) - t0))
    local runs
    runs=$(wc -l </tmp/bg.req)
    BG=$target
    emit build "{\"target\":$target,\"remaps\":$BG,\"actual\":$(status_num remaps),\"runs\":$runs,\"run_chunks\":1,\"scattered\":true,\"regions\":$(status_num regions),\"micros\":$us,\"failed\":$fails}"
    progress "background: $BG scattered remaps ($runs requests) in $((us / 1000)) ms, $(status_num regions) regions"
}

# The most segments one region device's table has (one dmsetup for all: thousands of
# regions at a million scattered remaps).
longest_region() {
    dmsetup table | awk -v v="$VOL-remap-r" 'index($1, v) == 1 { n[$1]++ }
        END { m = 0; for (r in n) if (n[r] > m) m = n[r]; print m }'
}

# Region tables: total segments of the volume's regions.
region_segments() {
    dmsetup table | awk -v v="$VOL-remap-r" 'index($1, v) == 1 { n++ } END { print n + 0 }'
}

# trace_setup: kprobes on dm_suspend (entry) and dm_resume (return), and block_rq_error, on the
# CLOCK_MONOTONIC trace clock (the clock of the eBPF event's timestamp, bpf_ktime_get_ns).
trace_setup() {
    echo 0 >$T/tracing_on
    echo mono >$T/trace_clock
    local k
    # Entry (p) and return (r) of the device-mapper calls; table_load and dm_ctl_ioctl may not
    # be probe-able on every kernel (then the kernel-only columns stay empty).
    for k in 'p:bench_sus dm_suspend' 'r:bench_susr dm_suspend' 'p:bench_resp dm_resume' \
        'r:bench_res dm_resume' 'p:bench_tl table_load' 'r:bench_tlr table_load' \
        'p:bench_io dm_ctl_ioctl' 'r:bench_ior dm_ctl_ioctl'; do
        echo "$k" >>$T/kprobe_events 2>/dev/null || continue
        k=${k#*:}
        echo 1 >"$T/events/kprobes/${k%% *}/enable"
    done
    echo 1 >$T/events/block/block_rq_error/enable
    echo 8192 >$T/buffer_size_kb
    echo 1 >$T/tracing_on
}
# trace_times SECTOR: "ERROR SUSPEND RESUME" in microseconds of the trace clock: the first
# block_rq_error of a request starting at SECTOR, then the first dm_suspend entry and the last
# dm_resume return after it ("-" for what is not there).
trace_times() {
    awk -v s=" $1 + " '
        { ts = ""; for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+\.[0-9]+:$/) { ts = substr($i, 1, length($i) - 1); break } }
        ts == "" { next }
        { split(ts, p, "."); us = p[1] * 1000000 + p[2] }
        /block_rq_error:/ && e == "" && index($0, s) { e = us }
        e == "" { next }
        /bench_sus:/ && u == "" && us >= e { u = us }
        /bench_res:/ && u != "" && us >= u { r = us }
        END { printf "%s %s %s\n", (e == "" ? "-" : e), (u == "" ? "-" : u), (r == "" ? "-" : r) }' $T/trace
}

# trace_pairs ENTRY RETURN: "SUM COUNT MAX" in microseconds of the durations between each
# ENTRY event and the next RETURN event of the same task, over the trace buffer.
trace_pairs() {
    awk -v a="$1:" -v b="$2:" '
        { ts = ""; for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+\.[0-9]+:$/) { ts = substr($i, 1, length($i) - 1); ev = $(i + 1); break } }
        ts == "" { next }
        { split(ts, p, "."); us = p[1] * 1000000 + p[2]; task = $1 }
        ev == a { start[task] = us }
        ev == b && (task in start) { d = us - start[task]; s += d; n++; if (d > m) m = d; delete start[task] }
        END { printf "%d %d %d\n", s, n, m }' $T/trace
}

# fio_terse ARGS...: one fio run, its terse (v3) lines on stdout.
fio_terse() {
    fio --output-format=terse --terse-version=3 --disk_util=0 --direct=1 --randrepeat=0 --norandommap "$@" 2>/dev/null |
        grep '^3;'
}
