#!/bin/sh
# Issue #7 on real device-mapper: hot spares, migration off a spare under load, and the health
# forecast of pool exhaustion.
#   hot-spare-joins: a hot spare waits in standby, holding nothing, while the pool has room; the
#     remap that takes free space below the threshold (20 %) makes it an active member of the
#     pool (spare list, log), and later remaps land on it.
#   migrate-under-load: `spare remove --migrate` moves 910 chunks (four batches) off a spare while
#     a write-then-read-compare loop and a reader run on the volume; the spare is released, no
#     remap points at it, every pass of the workload compared equal, and the whole volume reads
#     back as expected (reference plus the workload's last pass).
#   forecast: a disk grows a bad block every T seconds, each read through the volume so the
#     agent remaps it; `remapctl health --json` forecasts the pool's exhaustion within 25 % of
#     the time computed from the remaps' own timestamps (remapd's log) and the pool's free
#     chunks, with reasons; when the rate triples, a rising-rate alert appears once.
#vm: cases hot-spare-joins migrate-under-load forecast
#vm: needs remapd remapctl
#vm: timeout 420
. /vm/lib.sh

MIB=1048576
remapd >/tmp/remapd.out 2>/tmp/remapd.log &
agent=$!
wait_for /tmp/remapd.log "remapd ready" 90 || {
    for c in hot-spare-joins migrate-under-load forecast; do fail $c "remapd not ready: $(tail -5 /tmp/remapd.log)"; done
    exit 1
}

# spare_rows VOL: one line per pool device and hot spare: PATH STATE USED CHUNKS (USED is - for
# a hot spare in standby: it is not in the pool).
spare_rows() {
    remapctl spare list "$1" --json | sed 's/"chunks":/\n&/g' | sed 1d | while read -r l; do
        u=$(json_num "$l" used)
        echo "$(json_str "$l" path) $(json_str "$l" state) ${u:--} $(json_num "$l" chunks)"
    done
}
row() { spare_rows "$1" | grep "^$2 "; } # row VOL DEV
# pool_num VOL total|available: the pool's own figures (keys are sorted: available comes before
# the devices, total after the hot spares).
pool_num() {
    case $2 in
    available) json_num "$(remapctl spare list "$1" --json | sed 's/"devices".*//')" available ;;
    *) json_num "$(remapctl spare list "$1" --json | sed 's/.*"standby"//')" "$2" ;;
    esac
}
on_spare() { remapctl remap list "$1" --json | grep -o "\"spare\":\"$2\"" | wc -l; }
json_float() { printf '%s\n' "$1" | sed -n "s/.*\"$2\":\(-\{0,1\}[0-9][0-9.eE+-]*\).*/\1/p"; }
now() { cut -d' ' -f1 /proc/uptime; }

# ---------------------------------------------------------------- hot-spare-joins
case1() {
    m=$(nullb create --size 16)
    s=$(nullb create --size 9)
    h=$(nullb create --size 9)
    out=$(remapctl create --in-place vol1 --main "$m" --spare "$s" 2>&1) || { fail hot-spare-joins "create: $out"; return; }
    dd if=/dev/urandom of=/dev/mapper/vol1 bs=1M count=16 oflag=direct status=none
    dd if=/dev/mapper/vol1 of=/tmp/golden1 bs=1M iflag=direct status=none
    out=$(remapctl spare add vol1 "$h" --hot 2>&1) || { fail hot-spare-joins "spare add --hot: $out"; return; }
    total=$(pool_num vol1 total)
    info "vol1 pool after spare add --hot: $(spare_rows vol1 | tr '\n' ';') total $total"
    expect_eq hot-spare-joins "hot spare row" "$h standby - " "$(row vol1 "$h" | cut -d' ' -f1-3) " || return
    hchunks=$(row vol1 "$h" | cut -d' ' -f4)
    # Up to just above the threshold: the hot spare stays in standby and holds nothing.
    n1=$((total * 8 / 10 - 4))
    remapctl remap add vol1 0 --count $((n1 * 8)) >/dev/null || { fail hot-spare-joins "remap add of $n1 chunks failed"; return; }
    avail=$(pool_num vol1 available)
    expect_eq hot-spare-joins "standby after $n1 remaps (available $avail of $total)" "$h standby -" \
        "$(row vol1 "$h" | cut -d' ' -f1-3)" &&
        expect_eq hot-spare-joins "pool total before the threshold" "$total" "$(pool_num vol1 total)" &&
        expect_eq hot-spare-joins "remaps on the hot spare before the threshold" 0 "$(on_spare vol1 "$h")" &&
        expect_eq hot-spare-joins "hot spares in health" 1 "$(json_num "$(remapctl health vol1 --json)" hot_spares)" || return
    if grep -q "hot spare joined" /tmp/remapd.log; then
        fail hot-spare-joins "joined above the threshold (available $avail of $total)"
        return
    fi
    # Below it: the hot spare joins.
    remapctl remap add vol1 $((2048 * 8)) --count 80 >/dev/null || { fail hot-spare-joins "remap add of 10 chunks failed"; return; }
    avail=$(pool_num vol1 available)
    info "vol1 pool after $((n1 + 10)) remaps: $(spare_rows vol1 | tr '\n' ';') available $avail"
    expect_eq hot-spare-joins "hot spare after the threshold" "$h active 0 $hchunks" "$(row vol1 "$h")" &&
        expect_eq hot-spare-joins "pool total" $((total + hchunks)) "$(pool_num vol1 total)" &&
        expect_eq hot-spare-joins "hot spares in health" 0 "$(json_num "$(remapctl health vol1 --json)" hot_spares)" || return
    logged=$(grep "hot spare joined the pool" /tmp/remapd.log | grep vol1)
    [ -n "$logged" ] || { fail hot-spare-joins "no 'hot spare joined the pool' line in the log"; return; }
    # It takes remaps: fill the first spare and go beyond.
    first=$(row vol1 "$s" | cut -d' ' -f4)
    used=$(row vol1 "$s" | cut -d' ' -f3)
    more=$((first - used + 14))
    remapctl remap add vol1 $((3000 * 8)) --count $((more * 8)) >/dev/null || { fail hot-spare-joins "remap add of $more chunks failed"; return; }
    dd if=/dev/mapper/vol1 of=/tmp/after1 bs=1M iflag=direct status=none
    expect_eq hot-spare-joins "chunks on the joined spare" 14 "$(on_spare vol1 "$h")" &&
        expect_eq hot-spare-joins "used on the joined spare" "$h active 14" "$(row vol1 "$h" | cut -d' ' -f1-3)" &&
        { cmp -s /tmp/golden1 /tmp/after1 || { fail hot-spare-joins "volume data changed"; false; }; } &&
        pass hot-spare-joins "standby until $n1 of $total chunks used; joined at $((n1 + 10)) ($avail free of $((total + hchunks))); 14 chunks on it, data identical; log: $(echo "$logged" | sed 's/.*WARN //' | head -1)"
    remapctl stop vol1 >/dev/null
}

# ---------------------------------------------------------------- migrate-under-load
# The workload: pass after pass, write the first 4 MiB of the volume (64 KiB O_DIRECT writes)
# from file A or B in turn, read it back and compare; a reader compares 1 MiB holding remapped
# chunks with the reference. Both run until /tmp/mig.done exists, then one more pass.
WL_MIB=4
NMIG=910
writer() {
    p=0
    while :; do
        [ -e /tmp/mig.done ] && stop=1 || stop=0
        f=/tmp/wl$((p % 2))
        if ! dd if=$f of=/dev/mapper/vol2 bs=64k count=$((WL_MIB * 16)) oflag=direct conv=notrunc status=none 2>/tmp/wl.err; then
            echo "pass $p: write failed: $(cat /tmp/wl.err)" >>/tmp/wl.fail
        fi
        dd if=/dev/mapper/vol2 of=/tmp/wl.got bs=64k count=$((WL_MIB * 16)) iflag=direct status=none 2>>/tmp/wl.err
        cmp -s $f /tmp/wl.got || echo "pass $p: read back differs from what was written" >>/tmp/wl.fail
        p=$((p + 1))
        echo $p >/tmp/wl.passes
        echo $f >/tmp/wl.last
        [ $stop = 1 ] && break
    done
}
reader() {
    r=0
    while :; do
        [ -e /tmp/mig.done ] && stop=1 || stop=0
        dd if=/dev/mapper/vol2 of=/tmp/rd.got bs=64k skip=320 count=16 iflag=direct status=none 2>/dev/null
        cmp -s /tmp/rd.want /tmp/rd.got || echo "read $r of MiB 20 differs from the reference" >>/tmp/wl.fail
        r=$((r + 1))
        echo $r >/tmp/rd.passes
        [ $stop = 1 ] && break
    done
}

case2() {
    m=$(nullb create --size 64)
    a=$(nullb create --size 24)
    b=$(nullb create --size 24)
    out=$(remapctl create --in-place vol2 --main "$m" --spare "$a" --spare "$b" --region-size 16MiB 2>&1) ||
        { fail migrate-under-load "create: $out"; return; }
    dd if=/dev/urandom of=/dev/mapper/vol2 bs=1M count=64 oflag=direct status=none
    dd if=/dev/mapper/vol2 of=/tmp/golden2 bs=1M iflag=direct status=none
    dd if=/tmp/golden2 of=/tmp/rd.want bs=64k skip=320 count=16 status=none
    head -c $((WL_MIB * MIB)) /dev/urandom >/tmp/wl0
    head -c $((WL_MIB * MIB)) /dev/urandom >/tmp/wl1
    # 910 chunks on the first spare (first-fit): 500 under the writer, 400 from the start of
    # the reader's MiB (sector 40960 = MiB 20), ten scattered over the other regions.
    ok=1
    remapctl remap add vol2 800 --count 4000 >/dev/null || ok=0
    remapctl remap add vol2 40960 --count 3200 >/dev/null || ok=0
    for c in 5000 6001 7002 8003 9004 10005 11006 12007 13008 14009; do
        remapctl remap add vol2 $((c * 8)) >/dev/null || ok=0
    done
    held=$(on_spare vol2 "$a")
    [ $ok = 1 ] && expect_eq migrate-under-load "chunks on $a before" $NMIG "$held" || {
        fail migrate-under-load "setup: remaps on $a: $held"
        return
    }
    rm -f /tmp/mig.done /tmp/wl.fail /tmp/wl.passes /tmp/rd.passes
    writer &
    wpid=$!
    reader &
    rpid=$!
    wait_for /tmp/wl.passes . 60
    p0=$(cat /tmp/wl.passes) r0=$(cat /tmp/rd.passes 2>/dev/null)
    t0=$(now)
    out=$(remapctl spare remove vol2 "$a" --migrate --json 2>&1)
    rc=$?
    t1=$(now)
    p1=$(cat /tmp/wl.passes) r1=$(cat /tmp/rd.passes 2>/dev/null)
    alive=0
    kill -0 $wpid 2>/dev/null && kill -0 $rpid 2>/dev/null && alive=1
    touch /tmp/mig.done
    wait $wpid
    wait $rpid
    info "migration: rc $rc in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s: $out;" \
        "workload passes $p0 -> $p1 -> $(cat /tmp/wl.passes), reads $r0 -> $r1 -> $(cat /tmp/rd.passes)"
    expect_eq migrate-under-load "exit code of spare remove --migrate" 0 "$rc" &&
        expect_eq migrate-under-load "chunks moved" $NMIG "$(json_num "$out" moved)" &&
        expect_eq migrate-under-load "batches" 4 "$(json_num "$out" batches)" &&
        expect_eq migrate-under-load "workload running throughout the migration" 1 "$alive" || return
    expect_eq migrate-under-load "$a in spare list" "" "$(row vol2 "$a")" &&
        expect_eq migrate-under-load "spares left" "$b" "$(spare_rows vol2 | cut -d' ' -f1 | tr '\n' ' ' | sed 's/ $//')" &&
        expect_eq migrate-under-load "remaps on $a" 0 "$(on_spare vol2 "$a")" &&
        expect_eq migrate-under-load "remaps on $b" $NMIG "$(on_spare vol2 "$b")" &&
        expect_eq migrate-under-load "remaps" $NMIG "$(json_num "$(remapctl status vol2 --json)" remaps)" &&
        expect_eq migrate-under-load "chunks_remapped in health (moves are not new remaps)" $NMIG \
            "$(json_num "$(remapctl health vol2 --json)" chunks_remapped)" || return
    if [ -s /tmp/wl.fail ]; then
        fail migrate-under-load "workload: $(head -3 /tmp/wl.fail | tr '\n' ';')"
        return
    fi
    # The whole volume: the reference, with the workload's last pass over its first 4 MiB.
    cp /tmp/golden2 /tmp/expect2
    dd if="$(cat /tmp/wl.last)" of=/tmp/expect2 bs=1M conv=notrunc status=none
    dd if=/dev/mapper/vol2 of=/tmp/after2 bs=1M iflag=direct status=none
    d=$(cmp -l /tmp/expect2 /tmp/after2 2>/dev/null | awk '{ print int(($1 - 1) / 4096) }' | uniq | head -5 | tr '\n' ' ')
    expect_eq migrate-under-load "4 KiB blocks differing from the expected data" "" "$d" &&
        pass migrate-under-load "$NMIG chunks moved in $(json_num "$out" batches) batches with the workload running" \
            "(write-read-compare passes $p0 -> $p1, reads ${r0:-0} -> $r1 during it), every compare equal; $a released; whole volume as expected"
    remapctl stop vol2 >/dev/null
}

# ---------------------------------------------------------------- forecast
T=3
N1=15
N2=8
inject() { # one new bad sector in a new chunk of the main disk, read through the volume
    c=$((64 + 17 * nb))
    nullb bad add "$m3" "$((c * 8 + 5))-$((c * 8 + 5))"
    dio-read /dev/mapper/vol3 $((c * 8)) 8 2>/dev/null && info "read of chunk $c did not fail"
    nb=$((nb + 1))
}
# Times (seconds of the day, from remapd's log) of vol3's chunk remaps, one a line.
remap_times() {
    grep 'chunk remapped' /tmp/remapd.log | grep -E 'volume="?vol3' |
        sed -n 's/^[0-9-]*T\([0-9]*\):\([0-9]*\):\([0-9.]*\).*/\1 \2 \3/p' |
        awk '{ t = $1 * 3600 + $2 * 60 + $3; if (t < p) t += 86400; p = t; printf "%.6f\n", t }'
}
pause() { # pause SINCE: sleep what is left of T since uptime SINCE
    sleep "$(awk -v a="$1" -v b="$(now)" -v t=$T 'BEGIN { d = t - (b - a); printf "%.2f", d < 0 ? 0 : d }')"
}

case3() {
    m3=$(nullb create --size 16)
    s3a=$(nullb create --size 9)
    s3b=$(nullb create --size 9)
    out=$(remapctl create --in-place vol3 --main "$m3" --spare "$s3a" --spare "$s3b" 2>&1) || { fail forecast "create: $out"; return; }
    nb=0
    : >/tmp/health3.steady
    : >/tmp/health3.rising
    # Steady: one bad block every T seconds (health asked after each, as a dashboard would).
    k=0
    while [ $k -lt $N1 ]; do
        s=$(now)
        inject
        remapctl health vol3 --json >>/tmp/health3.steady
        k=$((k + 1))
        [ $k -lt $N1 ] && pause "$s"
    done
    n=0
    while [ "$(remap_times | wc -l)" -lt $N1 ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
    h=$(remapctl health vol3 --json)
    wall=$(date -u +%H:%M:%S | awk -F: '{ print $1 * 3600 + $2 * 60 + $3 }')
    free=$(pool_num vol3 available)
    remap_times >/tmp/times3
    nt=$(wc -l </tmp/times3)
    # The true rate, from the remaps' own times; the time since the last remap at the question.
    rate=$(awk 'NR == 1 { a = $1 } { b = $1 } END { printf "%.6f", (NR - 1) / (b - a) }' /tmp/times3)
    since=$(awk -v w="$wall" -v l="$(tail -1 /tmp/times3)" 'BEGIN { d = w - l; if (d < -43200) d += 86400; printf "%.3f", d < 0 ? 0 : d }')
    truth=$(awk -v f="$free" -v r="$rate" -v s="$since" 'BEGIN { printf "%.1f", f / r - s }')
    fc=$(json_float "$h" exhausted_in_secs | awk '{ printf "%.1f", $1 }')
    rph=$(json_float "$h" rate_per_hour | awk '{ printf "%.1f", $1 }')
    samples=$(json_num "$h" samples)
    info "forecast: $nt remaps at $rate/s measured ($(awk -v r="$rate" 'BEGIN { printf "%.0f", r * 3600 }')/h), $free chunks free," \
        "${since}s since the last: true exhaustion in ${truth}s; health says ${fc}s at ${rph}/h from $samples samples"
    info "health: $h"
    ok=1
    expect_eq forecast "remaps logged" $N1 "$nt" || ok=0
    if [ -z "$fc" ] || [ -z "$samples" ]; then
        fail forecast "no forecast in health: $h"
        ok=0
    elif ! awk -v f="$fc" -v t="$truth" 'BEGIN { e = (f - t) / t; exit !(e <= 0.25 && e >= -0.25) }'; then
        fail forecast "forecast ${fc}s is not within 25 % of ${truth}s"
        ok=0
    fi
    [ "${samples:-0}" -ge $N1 ] || { fail forecast "only ${samples:-0} samples"; ok=0; }
    # Reasons, not just a number: the forecast's own reason among them, and a score below 100.
    printf '%s' "$h" | grep -q '"reasons":\[{"penalty":[0-9]*,"why":"' || { fail forecast "no reasons: $h"; ok=0; }
    printf '%s' "$h" | grep -q '"why":"at [0-9.]* remaps per hour the pool runs out in ' ||
        { fail forecast "no forecast reason: $h"; ok=0; }
    [ "$(json_num "$h" score)" -lt 100 ] || { fail forecast "score 100 with a forecast: $h"; ok=0; }
    grep -q 'rising' /tmp/health3.steady && info "a rising alert appeared at the steady rate: $(grep -o '"alerts":\[[^]]*\]' /tmp/health3.steady | grep rising | head -1)"
    # Rising: three bad blocks every T seconds.
    k=0
    while [ $k -lt $N2 ]; do
        s=$(now)
        inject
        inject
        inject
        remapctl health vol3 --json >>/tmp/health3.rising
        k=$((k + 1))
        pause "$s"
    done
    n=0
    while [ "$(remap_times | wc -l)" -lt $((N1 + 3 * N2)) ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
    remapctl health vol3 --json >>/tmp/health3.rising
    alert=$(grep -o '"alerts":\[[^]]*\]' /tmp/health3.rising | grep 'remap rate rising' | head -1)
    nalert=$(grep -o 'remap rate rising' /tmp/health3.rising | wc -l)
    info "after the rate tripled: $(remap_times | wc -l) remaps; $(tail -1 /tmp/health3.rising)"
    if [ -z "$alert" ]; then
        fail forecast "no rising-rate alert after the rate tripled"
        ok=0
    else
        expect_eq forecast "rising alerts (once, not at every question)" 1 "$nalert" || ok=0
    fi
    [ $ok = 1 ] && pass forecast "exhaustion forecast ${fc}s, true ${truth}s ($free free at $rate/s);" \
        "reasons and score $(json_num "$h" score); $alert"
    remapctl stop vol3 >/dev/null
}

case1
case2
case3

kill -TERM $agent
wait $agent
exit 0
