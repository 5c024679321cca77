#!/bin/sh
# Damaged metadata. A volume with two spares (two copies of its metadata) and remaps made
# before and after a checkpoint is stopped; then, one case at a time on a fresh copy of that
# state, one copy gets flipped bytes in its newest superblock, a torn newest checkpoint, a torn
# newest journal block, an older generation (a stale snapshot), a zeroed newest superblock or
# a zeroed superblock pair. (The journal is in 512-byte blocks here, the disks' physical
# block; journal-unit checks that and the move to 4 KiB when a 4Kn spare joins.)
# Assembly must bring the volume up from the valid newest copy (same remaps, same tables,
# every byte as written) or refuse with a message and create nothing. With every copy damaged
# it must refuse: the newest state they held is gone, and an older one is not the volume
# (checked with two copies, and with three after a spare was added, where each copy still has
# an older valid superblock to fall back to). Offsets follow docs/METADATA.md.
#vm: cases setup checkpoint-slots-alternate flip-sb-s1 flip-sb-s2 zero-newest-sb-s1 zero-newest-sb-s2 torn-ckpt-s1 torn-ckpt-s2 torn-journal-s1 torn-journal-s2 stale-s1 stale-s2 zero-sb-s1 zero-sb-s2 both-zero-sb both-flip-sb both-torn-ckpt both-flip-newest-sb both-zero-newest-sb rollback-torn-ckpt rollback-flip-sb rollback-zero-newest-sb clone-member journal-unit foreign-host-waits foreign-host-explicit
#vm: needs remapd remapctl
#vm: timeout 900
. /vm/lib.sh

VOL=vol0
DEV=/dev/mapper/$VOL
main=$(nullb create --size 64)
sp1=$(nullb create --size 24)
sp2=$(nullb create --size 24)
sp3=$(nullb create --size 24)
sp4=$(nullb create --size 24)

start_agent() {
    touch /tmp/remapd.log
    _n=$(grep -c "remapd ready" /tmp/remapd.log)
    remapd >>/tmp/remapd.out 2>>/tmp/remapd.log &
    agent=$!
    _k=0
    while [ "$(grep -c "remapd ready" /tmp/remapd.log)" -le "$_n" ]; do
        [ $_k -ge 600 ] && return 1
        sleep 0.1
        _k=$((_k + 1))
    done
}
status() { timeout 60 remapctl status "$VOL" --json 2>/dev/null; }
remap() { timeout 120 remapctl remap add "$VOL" "$1" --count "$2" >/dev/null 2>>/tmp/setup.err; }
new_data() {
    /usr/bin/dd if=/dev/urandom of=$DEV bs=1M count=64 oflag=direct status=none &&
        /usr/bin/dd if=$DEV of=/tmp/golden bs=1M iflag=direct status=none
}

# --- bytes on disk, always with O_DIRECT (the agent reads that way; no page cache between)
u64() { od -An -t u8 -j "$2" -N 8 "$1" | tr -d ' '; } # FILE OFFSET
u32() { od -An -t u4 -j "$2" -N 4 "$1" | tr -d ' '; }
dump() { /usr/bin/dd if="$1" of="$2" bs=1M count=$((AREA_BYTES >> 20)) iflag=direct status=none; }
restore() { /usr/bin/dd if="$2" of="$1" bs=1M oflag=direct conv=notrunc,fsync status=none; }
# flip DEV OFFSET LEN: inverts LEN bytes (read, modify, write back the 4 KiB block around them)
flip() {
    _blk=$(($2 / 4096 * 4096)) _o=$(($2 % 4096))
    dio-read "$1" $((_blk / 512)) 8 /tmp/blk &&
        _esc=$(od -An -v -t u1 -j $_o -N "$3" /tmp/blk | awk '{ for (i = 1; i <= NF; i++) printf "\\%03o", 255 - $i }') &&
        printf "$_esc" | /usr/bin/dd of=/tmp/blk bs=1 seek=$_o conv=notrunc status=none &&
        dio-write "$1" $((_blk / 512)) 8 /tmp/blk
}
# zero DEV START END: zeros bytes [START, END), widened to whole 512-byte sectors
zero() {
    _s=$((($2 + 511) / 512)) _e=$((($3 + 511) / 512))
    dio-write "$1" $_s $((_e - _s))
}
# layout FILE P: where things are in a saved area (docs/METADATA.md), as variables prefixed P:
# the newest superblock (highest ckpt_gen) P_SB and its generation P_GEN, the checkpoint it
# names P_CKOFF (P_CKLEN bytes), the journal's block size P_UNIT (the superblock's unit at 88,
# 0 for 4 KiB), the journal block with the highest generation P_JOFF (P_JGEN), and what each
# superblock says, P_SBS.
layout() {
    _f=$1 _p=$2
    _sbs="" _sb=0 _best=-1
    for _i in 0 1; do
        if [ "$(/usr/bin/dd if=$_f bs=8 skip=$((_i * 512)) count=1 status=none)" = REMAPSB2 ]; then
            _g=$(u64 $_f $((_i * 4096 + 48)))
            _sbs="$_sbs superblock $_i: generation $_g in slot $(u32 $_f $((_i * 4096 + 68)));"
            [ "$_g" -gt "$_best" ] && _best=$_g _sb=$_i
        else
            _sbs="$_sbs superblock $_i: empty;"
        fi
    done
    _base=$((_sb * 4096))
    _jb=$(u32 $_f $((_base + 76)))
    _unit=$(u32 $_f $((_base + 88)))
    [ "$_unit" = 0 ] && _unit=4096
    _slot=$(u32 $_f $((_base + 68)))
    _slot_bytes=$(((AREA_BYTES - 8192 - _jb * _unit) / 2 / 4096 * 4096))
    # Journal blocks: magic REMAPJNL at 0, generation (u64 LE) at 24.
    set -- $(od -A d -v -t x1 -j 8192 -N $((_jb * _unit)) $_f | awk -v u=$_unit '
        function h(x,  a) { a = "0123456789abcdef"; return (index(a, substr(x, 1, 1)) - 1) * 16 + index(a, substr(x, 2, 1)) - 1 }
        ($1 - 8192) % u == 0 { blk = ($1 - 8192) / u; magic = ($2 $3 $4 $5 $6 $7 $8 $9 == "52454d41504a4e4c") }
        ($1 - 8192) % u == 16 && magic { g = 0; for (i = 17; i >= 10; i--) g = g * 256 + h($i); if (g > best) { best = g; bi = blk } }
        END { print bi + 0, best + 0 }')
    eval "${_p}_SB=$_sb ${_p}_GEN=$_best ${_p}_UNIT=$_unit ${_p}_CKOFF=$((8192 + _jb * _unit + _slot * _slot_bytes)) ${_p}_CKLEN=$(u64 $_f $((_base + 56))) ${_p}_JOFF=$((8192 + $1 * _unit)) ${_p}_JGEN=$2"
    eval "${_p}_SBS=\"\$_sbs\""
}

# --- setup
start_agent || { fail setup "remapd not ready: $(tail -5 /tmp/remapd.log)"; exit 1; }
if ! out=$(timeout 120 remapctl create --in-place "$VOL" --main "$main" --spare "$sp1" --spare "$sp2" --region-size 16MiB 2>&1); then
    fail setup "create: $out"
    exit 1
fi
AREA_BYTES=$(/usr/bin/dd if="$sp1" bs=4096 count=1 iflag=direct status=none | od -An -t u8 -j 80 -N 8 | tr -d ' ')
new_data
# Remaps, one commit each; then a snapshot of both areas (the stale copies of later cases).
remap 800 64 && remap 40000 16 && remap 70000 8 && remap 100000 24 || { fail setup "remap: $(cat /tmp/setup.err)"; exit 1; }
dump "$sp1" /tmp/old.s1
dump "$sp2" /tmp/old.s2
OLD_GEN=$(json_num "$(status)" generation)
remap 1600 8 && remap 60000 8 || { fail setup "remap: $(cat /tmp/setup.err)"; exit 1; }
# A hot spare added and removed: two checkpoints (a configuration change writes the whole
# state), one in each slot; the newest superblock names the second. (The hot spare held a
# copy meanwhile; its removal wiped it.)
if ! out=$(timeout 60 remapctl spare add "$VOL" "$sp3" --hot 2>&1) || ! out=$(timeout 60 remapctl spare remove "$VOL" "$sp3" 2>&1); then
    fail setup "hot spare add/remove: $out"
    exit 1
fi
CK_GEN=$(json_num "$(status)" generation)
# A restarted agent adopts the volume; every copy is current, so it writes no checkpoint and
# its commits go on in the journal where the last agent's stopped.
kill -TERM $agent
wait $agent
start_agent || { fail setup "remapd not ready after restart: $(tail -5 /tmp/remapd.log)"; exit 1; }
# Then one commit of 100 chunks: 100 records, one 4 KiB journal block or eight of 512 bytes.
remap 110000 800 || { fail setup "remap: $(cat /tmp/setup.err)"; exit 1; }
# New data everywhere: a table that lost a remap would read the old data from the main.
new_data
st=$(status)
R=$(json_num "$st" remaps)
G=$(json_num "$st" generation)
dm_tables >/tmp/tables.want
if ! out=$(timeout 60 remapctl stop "$VOL" 2>&1) || [ "$(dmsetup ls)" != "No devices found" ]; then
    fail setup "stop: $out $(dmsetup ls)"
    exit 1
fi
dump "$sp1" /tmp/cur.s1
dump "$sp2" /tmp/cur.s2
layout /tmp/cur.s1 S1
layout /tmp/cur.s2 S2
note="remaps $R, generation $G, area $AREA_BYTES bytes; newest superblock $S1_SB/$S2_SB (generation $S1_GEN/$S2_GEN; the hot spare's removal wrote $CK_GEN), its checkpoint at $S1_CKOFF/$S2_CKOFF ($S1_CKLEN/$S2_CKLEN bytes), newest journal block at $S1_JOFF/$S2_JOFF (unit $S1_UNIT, generation $S1_JGEN/$S2_JGEN); stale snapshot at generation $OLD_GEN"
if [ "$S1_JGEN" = "$G" ] && [ "$S2_JGEN" = "$G" ] && [ "$S1_GEN" = $((G - 1)) ] && [ "$S2_GEN" = $((G - 1)) ] &&
    [ "$S1_GEN" = "$CK_GEN" ] &&
    [ "$OLD_GEN" -lt "$S1_GEN" ] && [ "$R" = 116 ]; then
    pass setup "$note"
else
    fail setup "unexpected metadata state: $note"
    exit 1
fi

# Two checkpoints were written after the create (when the hot spare came and went):
# "the full state goes to the idle checkpoint slot", so both superblocks of each copy are valid
# and name different slots; a damaged newest superblock or checkpoint then leaves the older
# one to read.
bad=""
for s in 1 2; do
    eval "sbs=\$S${s}_SBS"
    case "$sbs" in
    *"superblock 0: generation "*" in slot 0;"*"superblock 1: generation "*" in slot 1;"*) ;;
    *) bad="$bad s$s:$sbs" ;;
    esac
done
if [ -z "$bad" ]; then
    pass checkpoint-slots-alternate "s1:$S1_SBS s2:$S2_SBS"
else
    fail checkpoint-slots-alternate "after two checkpoints:$bad (a checkpoint went to the slot the newest checkpoint was in)"
fi

# --- the cases
fresh() { restore "$sp1" /tmp/cur.s1 && restore "$sp2" /tmp/cur.s2; }
assemble() {
    timeout 120 remapctl assemble "$VOL" >/tmp/asm.out 2>/tmp/asm.err
    rc=$?
    msg=$(cat /tmp/asm.err /tmp/asm.out | tr '\n' ' ' | tr -s ' ')
}
# What came up, compared with what was stopped.
describe() {
    st=$(status)
    dd if=$DEV of=/tmp/now bs=1M iflag=direct status=none 2>/dev/null
    diff_chunks=$(cmp -l /tmp/golden /tmp/now 2>/dev/null | awk '{ print int(($1 - 1) / 4096) }' | uniq | wc -l)
    got="generation $(json_num "$st" generation) remaps $(json_num "$st" remaps), $diff_chunks chunks differ from what was written"
}
refused() { [ $rc != 0 ] && [ -n "$msg" ] && [ "$(dmsetup ls)" = "No devices found" ]; }
cleanup() {
    timeout 60 remapctl stop "$VOL" >/dev/null 2>&1
    for d in $(dmsetup ls | awk '$1 != "No" { print $1 }'); do dmsetup remove "$d" 2>/dev/null; done
}
# One copy damaged: the valid copy wins and the stopped volume comes back exactly (the
# assembly's own checkpoint makes the generation G + 1), or assembly refuses with a message
# and creates nothing.
expect_valid_or_refused() {
    c=$1
    assemble
    if [ $rc = 0 ]; then
        describe
        dm_tables >/tmp/tables.got
        if [ "$(json_num "$st" remaps)" = "$R" ] && [ "$(json_num "$st" generation)" = $((G + 1)) ] &&
            [ "$diff_chunks" = 0 ] && cmp -s /tmp/tables.want /tmp/tables.got; then
            pass "$c" "assembled from the valid copy: $msg"
        else
            fail "$c" "want generation $((G + 1)) remaps $R, identical tables and data; got $got; tables $(cmp -s /tmp/tables.want /tmp/tables.got && echo same || echo differ); $msg"
        fi
    elif refused; then
        pass "$c" "refused (exit $rc): $msg"
    else
        describe
        fail "$c" "exit $rc, message '$msg', devices: $(dmsetup ls | tr '\n' ' '); $got"
    fi
    cleanup
}
# Every copy damaged: refused, a message, no device.
expect_refused() {
    c=$1
    assemble
    if refused; then
        pass "$c" "exit $rc: $msg"
    elif [ "$(dmsetup ls)" != "No devices found" ]; then
        describe
        fail "$c" "assembled anyway (exit $rc): $got; $msg"
    else
        fail "$c" "exit $rc, message '$msg'"
    fi
    cleanup
}

for s in 1 2; do
    eval "d=\$sp$s sb=\$S${s}_SB ckoff=\$S${s}_CKOFF cklen=\$S${s}_CKLEN joff=\$S${s}_JOFF unit=\$S${s}_UNIT"
    # (a) flipped bytes in the newest superblock (the volume UUID field)
    fresh && flip "$d" $((sb * 4096 + 16)) 8
    expect_valid_or_refused flip-sb-s$s
    # ... or zeroed (a lost write or a discard reads back as zeros)
    fresh && zero "$d" $((sb * 4096)) $((sb * 4096 + 4096))
    expect_valid_or_refused zero-newest-sb-s$s
    # (b) torn writes: the second half of the newest checkpoint, of the newest journal commit
    fresh && zero "$d" $((ckoff + cklen / 2)) $((ckoff + cklen))
    expect_valid_or_refused torn-ckpt-s$s
    # (a 512-byte block is written whole by the disk: there the commit's later blocks are lost)
    fresh && zero "$d" $((joff + unit / 2)) $((joff + 4096))
    expect_valid_or_refused torn-journal-s$s
    # (d) a stale generation: an older snapshot of this copy's area
    fresh && restore "$d" /tmp/old.s$s
    expect_valid_or_refused stale-s$s
    # (c) both superblocks zeroed
    fresh && zero "$d" 0 8192
    expect_valid_or_refused zero-sb-s$s
done

# (e) both copies bad
fresh && zero "$sp1" 0 8192 && zero "$sp2" 0 8192
expect_refused both-zero-sb
fresh && for d in "$sp1" "$sp2"; do flip "$d" 16 8 && flip "$d" $((4096 + 16)) 8; done
expect_refused both-flip-sb
fresh && zero "$sp1" $((S1_CKOFF + S1_CKLEN / 2)) $((S1_CKOFF + S1_CKLEN)) &&
    zero "$sp2" $((S2_CKOFF + S2_CKLEN / 2)) $((S2_CKOFF + S2_CKLEN))
expect_refused both-torn-ckpt
fresh && flip "$sp1" $((S1_SB * 4096 + 16)) 8 && flip "$sp2" $((S2_SB * 4096 + 16)) 8
expect_refused both-flip-newest-sb
fresh && zero "$sp1" $((S1_SB * 4096)) $((S1_SB * 4096 + 4096)) && zero "$sp2" $((S2_SB * 4096)) $((S2_SB * 4096 + 4096))
expect_refused both-zero-newest-sb

# --- every copy damaged where an older superblock is still valid on each: the volume is
# assembled, a third spare added (a checkpoint in the other slot), 10 more chunks remapped
# (a journal commit) and new data written; then the newest superblock or the newest checkpoint
# of all three copies is damaged. Falling back to the older superblocks would bring up an older
# generation that misses the last remaps and the third spare: it must be refused. (A zeroed
# superblock looks like one never written; the journal still holds the newer generations.)
fresh
assemble
if [ $rc = 0 ] && timeout 60 remapctl spare add "$VOL" "$sp3" >/tmp/out 2>&1 && remap 20000 80 && new_data; then
    st=$(status)
    R3=$(json_num "$st" remaps) G3=$(json_num "$st" generation)
    timeout 60 remapctl stop "$VOL" >/dev/null 2>&1
    for s in 1 2 3; do
        eval "dump \$sp$s /tmp/cur3.s$s"
        layout /tmp/cur3.s$s T$s
    done
    info "three copies: remaps $R3, generation $G3; s1:$T1_SBS s2:$T2_SBS s3:$T3_SBS"
    fresh3() { restore "$sp1" /tmp/cur3.s1 && restore "$sp2" /tmp/cur3.s2 && restore "$sp3" /tmp/cur3.s3; }
    fresh3 && zero "$sp1" $((T1_CKOFF + T1_CKLEN / 2)) $((T1_CKOFF + T1_CKLEN)) &&
        zero "$sp2" $((T2_CKOFF + T2_CKLEN / 2)) $((T2_CKOFF + T2_CKLEN)) &&
        zero "$sp3" $((T3_CKOFF + T3_CKLEN / 2)) $((T3_CKOFF + T3_CKLEN))
    expect_refused rollback-torn-ckpt
    fresh3 && flip "$sp1" $((T1_SB * 4096 + 16)) 8 && flip "$sp2" $((T2_SB * 4096 + 16)) 8 && flip "$sp3" $((T3_SB * 4096 + 16)) 8
    expect_refused rollback-flip-sb
    fresh3 && zero "$sp1" $((T1_SB * 4096)) $((T1_SB * 4096 + 4096)) && zero "$sp2" $((T2_SB * 4096)) $((T2_SB * 4096 + 4096)) &&
        zero "$sp3" $((T3_SB * 4096)) $((T3_SB * 4096 + 4096))
    expect_refused rollback-zero-newest-sb
else
    fail rollback-torn-ckpt "setup: assemble exit $rc: $msg; $(cat /tmp/out /tmp/setup.err)"
    fail rollback-flip-sb "setup failed"
    fail rollback-zero-newest-sb "setup failed"
fi

# --- a disk that carries a copy of a member's metadata (a cloned disk, a second path): which
# one is the member cannot be told, so nothing is assembled.
fresh && restore "$sp4" /tmp/cur.s1
assemble
if refused && printf '%s' "$msg" | grep -q "same member"; then
    pass clone-member "exit $rc: $msg"
else
    fail clone-member "exit $rc: $msg; devices: $(dmsetup ls | tr '\n' ' ')"
fi
cleanup
zero "$sp4" 0 $AREA_BYTES

# --- the journal is written in the spares' physical block: on these 512-byte disks a lone
# remap writes its chunk (8 sectors) and one 512-byte block per copy. A 4Kn spare joining
# moves the journal to 4 KiB blocks (a checkpoint), its leaving back to 512; the volume
# assembles with every byte as written in between.
wsect() {
    _t=0
    for _d in "$@"; do _t=$((_t + $(awk '{ print $7 }' /sys/block/${_d#/dev/}/stat))); done
    echo $_t
}
unit_now() { json_num "$(status)" journal_unit; }
sp5=$(nullb create --size 24 --bs 4096)
fresh
assemble
u=""
if [ $rc = 0 ]; then
    u="$u$(unit_now)"
    w0=$(wsect "$sp1" "$sp2") && remap 30000 8 && w1=$(wsect "$sp1" "$sp2")
    u="$u $((w1 - w0))"
    timeout 60 remapctl spare add "$VOL" "$sp5" >/tmp/out 2>&1 && u="$u $(unit_now)"
    w0=$(wsect "$sp1" "$sp2" "$sp5") && remap 31000 8 && w1=$(wsect "$sp1" "$sp2" "$sp5")
    u="$u $((w1 - w0))"
    new_data
    R5=$(json_num "$(status)" remaps)
    timeout 60 remapctl stop "$VOL" >/dev/null 2>&1
    assemble
    describe
    u="$u $(unit_now) $(json_num "$st" remaps)/$R5 $diff_chunks"
    timeout 60 remapctl spare remove "$VOL" "$sp5" >>/tmp/out 2>&1 && u="$u $(unit_now)"
fi
# unit, sectors for a lone remap, unit with the 4Kn spare, sectors then, unit after a
# restart, remaps, chunks that differ, unit once the 4Kn spare left.
if [ "$u" = "512 10 4096 32 4096 $R5/$R5 0 512" ]; then
    pass journal-unit "512-byte journal: a lone remap wrote 10 sectors to the two spares (8 of data); with a 4Kn spare 32 sectors to three (4 KiB blocks); assembled identical; back to 512 once it left"
else
    fail journal-unit "want '512 10 4096 32 4096 R/R 0 512', got '$u'; exit $rc: $msg; $(cat /tmp/out /tmp/setup.err 2>/dev/null | tail -3)"
fi
cleanup
zero "$sp5" 0 8192

# --- a volume belongs to the machine that made it (its machine id): after a move to another
# machine it is not assembled at start, only when asked for by name, which takes it over.
fresh
kill -TERM $agent
wait $agent
echo 0123456789abcdef0123456789abcdef >/etc/machine-id
start_agent || fail foreign-host-waits "remapd not ready: $(tail -3 /tmp/remapd.log)"
# The volume had no owner: this machine took it over at start. What it reads now is what it
# must read on the next machine.
R_HOST=$(json_num "$(status)" remaps)
/usr/bin/dd if=$DEV of=/tmp/host.golden bs=1M iflag=direct status=none
timeout 60 remapctl stop "$VOL" >/dev/null 2>&1
kill -TERM $agent
wait $agent
echo fedcba9876543210fedcba9876543210 >/etc/machine-id
start_agent || fail foreign-host-waits "remapd not ready: $(tail -3 /tmp/remapd.log)"
if [ "$(dmsetup ls)" = "No devices found" ] && tail -20 /tmp/remapd.log | grep -q "another machine"; then
    pass foreign-host-waits "$(grep "another machine" /tmp/remapd.log | tail -1 | cut -c1-200)"
else
    fail foreign-host-waits "devices: $(dmsetup ls | tr '\n' ' '); log: $(tail -3 /tmp/remapd.log)"
fi
assemble
st=$(status)
if [ $rc = 0 ] && [ "$(json_num "$st" remaps)" = "$R_HOST" ] && /usr/bin/dd if=$DEV bs=1M iflag=direct status=none | cmp -s - /tmp/host.golden; then
    pass foreign-host-explicit "remapctl assemble $VOL: remaps $R_HOST, every byte as on the first machine; $msg"
else
    fail foreign-host-explicit "exit $rc: $msg; remaps $(json_num "$st" remaps) (want $R_HOST)"
fi
rm -f /etc/machine-id

kill -TERM $agent
wait $agent
exit 0
