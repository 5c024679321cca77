#!/bin/sh
# fio with verify=crc32c over a protected volume on null_blk: fio writes the whole volume, bad
# sectors appear on the main disk in several regions, reads through the volume make the agent
# remap their chunks, and then fio reads the whole volume back and verifies every block:
#   - no block verifies wrong (every block that was readable reads back identical, at the
#     right place: fio's header carries the block's offset);
#   - the blocks holding unreadable sectors fail reads, exactly those (6.12: dm-flakey
#     error_reads; 6.1: the default `--unreadable error` policy);
#   - on 6.12 a rewrite of the whole volume by the same fio job makes the pending blocks
#     readable with the new data, and then everything verifies;
#   - `--unreadable zero`: on 6.1 the unreadable sectors read as zeros (fio sees exactly the
#     affected blocks fail verification, no read error); on 6.12 the policy does not apply
#     (the kernel can fail reads and pass writes) and the blocks fail reads as before.
# fio: the write job writes 4 KiB blocks with a crc32c header; the check job is the same job
# with rw=read, which verifies each block as it is read. `continue_on_error=all` makes fio go
# on past read errors (EIO) and past verify failures, counting both in total_err: read errors
# are the 4 KiB blocks missing from the read io_bytes, verify failures are fio's messages.
#vm: cases create auto-remap verify-readable read-errors-exact sectors-exact rewrite zero-policy
#vm: needs remapd remapctl
#vm: timeout 300
. /vm/lib.sh

VOL=vol0
MIB=1048576
SIZE=$((64 * MIB))
main=$(nullb create --size 64)
sp1=$(nullb create --size 24)
sp2=$(nullb create --size 24)
sp3=$(nullb create --size 24)
sp4=$(nullb create --size 24)

remapd >/tmp/remapd.out 2>/tmp/remapd.log &
agent=$!
wait_for /tmp/remapd.log "remapd ready" 90 || { fail create "remapd not ready: $(tail -5 /tmp/remapd.log)"; exit 1; }

status() { remapctl status "$1" --json; }
num() { json_num "$(status "$1")" "$2"; }

# Bad sectors (inclusive ranges) in all four 16 MiB regions (32768 sectors each): single
# sectors at the start, middle and end of a 4 KiB block, two in one block, four across two
# blocks, and two whole blocks.
RANGES="1001-1001 40003-40004 50006-50009 70000-70000 100000-100015 120007-120007"
BAD_SECTORS=25
# The 4 KiB blocks (= chunks) holding them; the trigger reads below read each once.
BLOCKS="125 5000 6250 6251 8750 12500 12501 15000"
NBLOCKS=8
bad_sectors=$(for r in $RANGES; do seq "${r%-*}" "${r#*-}"; done | tr '\n' ' ')
[ "$(echo $bad_sectors | wc -w)" = $BAD_SECTORS ] || { fail create "script: sector list"; exit 1; }

job() { # job FILE DEV RW [extra option lines]
    f=$1 dev=$2 rw=$3
    shift 3
    {
        echo "[global]"
        echo "filename=$dev"
        echo "size=64M"
        echo "bs=4k"
        echo "direct=1"
        echo "ioengine=psync"
        echo "verify=crc32c"
        echo "rw=$rw"
        for o in "$@"; do echo "$o"; done
        echo "[data]"
    } >"$f"
}

# check DEV: the read-and-verify job. Sets RD_ERR (blocks whose read failed), VF_ERR (blocks
# that failed verification), VF_OFFS (their byte offsets), TOTAL_ERR (fio's count of both).
check() {
    job /tmp/check.fio "$1" read continue_on_error=all
    fio /tmp/check.fio --output-format=json >/tmp/check.json 2>/tmp/check.err
    rd=$(grep -m1 '"io_bytes"' /tmp/check.json | tr -dc 0-9)
    RD_ERR=$(((SIZE - rd) / 4096))
    TOTAL_ERR=$(grep -m1 '"total_err"' /tmp/check.json | tr -dc 0-9)
    VF_OFFS=$(sed -n 's/.* at file [^ ]* offset \([0-9]*\), length.*/\1/p' /tmp/check.err | sort -n | tr '\n' ' ')
    VF_ERR=$(echo $VF_OFFS | wc -w)
    info "fio check of $1: read errors $RD_ERR, verify failures $VF_ERR, total_err ${TOTAL_ERR:-none}" \
        "(read io_bytes $rd)"
}

offsets_of() { for b in $1; do echo $((b * 4096)); done | sort -n | tr '\n' ' '; }

trigger() { # trigger DEV: one failing O_DIRECT read per affected block
    for b in $BLOCKS; do dio-read "$1" $((b * 8)) 8 2>/dev/null && info "read of block $b did not fail"; done
}

wait_remaps() { # wait_remaps VOL N
    n=0
    while [ "$(num "$1" remaps)" != "$2" ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
}

# sectors_exact DEV CASE MODE: every bad sector reads as MODE says (fail | zero), every other
# sector of the affected blocks reads back as written (512-byte O_DIRECT reads).
sectors_exact() {
    ok=1 nf=0 nz=0 ng=0
    dd if=/dev/zero of=/tmp/zero bs=512 count=1 status=none
    for b in $BLOCKS; do
        s=$((b * 8))
        while [ $s -lt $((b * 8 + 8)) ]; do
            dd if=/tmp/golden of=/tmp/want bs=512 skip=$s count=1 status=none
            if dio-read "$1" $s 1 /tmp/got 2>/dev/null; then r=ok; else r=fail; fi
            case " $bad_sectors " in
            *" $s "*)
                if [ "$3" = fail ]; then
                    [ $r = fail ] && nf=$((nf + 1)) || { fail "$2" "bad sector $s read"; ok=0; }
                elif [ $r = ok ] && cmp -s /tmp/zero /tmp/got; then
                    nz=$((nz + 1))
                else
                    fail "$2" "bad sector $s: $r, not zeros"
                    ok=0
                fi
                ;;
            *)
                if [ $r = ok ] && cmp -s /tmp/want /tmp/got; then
                    ng=$((ng + 1))
                else
                    fail "$2" "sector $s (block $b): $r or differs"
                    ok=0
                fi
                ;;
            esac
            s=$((s + 1))
        done
    done
    info "$2: $ng readable sectors identical, $nf bad sectors fail, $nz read as zeros"
    [ $ok = 1 ] && [ $ng = $((NBLOCKS * 8 - BAD_SECTORS)) ]
}

# --- create, write everything with fio, keep a golden copy
if out=$(remapctl create --in-place "$VOL" --main "$main" --spare "$sp1" --spare "$sp2" --region-size 16MiB 2>&1) &&
    [ -b "/dev/mapper/$VOL" ]; then
    expect_eq create regions 4 "$(num $VOL regions)" &&
        expect_eq create size $SIZE "$(num $VOL size_bytes)" && pass create
else
    fail create "$out"
    exit 1
fi
job /tmp/write.fio "/dev/mapper/$VOL" write do_verify=0
t0=$(date +%s)
fio /tmp/write.fio --output-format=json >/tmp/write.json 2>/tmp/write.err ||
    { fail verify-readable "fio write failed: $(tail -3 /tmp/write.err)"; exit 1; }
sync
info "fio wrote 64 MiB in $(($(date +%s) - t0)) s"
dd if="/dev/mapper/$VOL" of=/tmp/golden bs=1M iflag=direct status=none

# --- bad sectors appear; reads through the volume make the agent remap their chunks
for r in $RANGES; do nullb bad add "$main" "$r"; done
trigger "/dev/mapper/$VOL"
wait_remaps $VOL $NBLOCKS
st=$(status $VOL)
mode=$(json_str "$st" pending_mode)
used=$(remapctl spare list $VOL --json | grep -o '"used":[0-9]*' | tr -dc '0-9\n' | awk '{ s += $1 } END { print s }')
expect_eq auto-remap remaps $NBLOCKS "$(json_num "$st" remaps)" &&
    expect_eq auto-remap pending $BAD_SECTORS "$(json_num "$st" pending)" &&
    expect_eq auto-remap "pool extents used" $NBLOCKS "$used" &&
    expect_eq auto-remap "remapped chunks" "$(echo $BLOCKS)" \
        "$(remapctl remap list $VOL --json | grep -o '"chunk":[0-9]*' | tr -dc '0-9\n' | sort -n | tr '\n' ' ' | sed 's/ $//')" &&
    pass auto-remap "mode $mode; $(grep -c 'chunk remapped' /tmp/remapd.log) remaps logged"

# --- fio reads and verifies the whole volume
case "$mode" in
error-reads | error)
    check "/dev/mapper/$VOL"
    expect_eq verify-readable "verify failures" 0 "$VF_ERR" &&
        expect_eq verify-readable "total_err (read errors only)" "$RD_ERR" "$TOTAL_ERR" &&
        pass verify-readable "$((SIZE / 4096 - RD_ERR)) blocks verified"
    ok=1
    for b in $BLOCKS; do dio-read "/dev/mapper/$VOL" $((b * 8)) 8 2>/dev/null && { ok=0; fail read-errors-exact "block $b read"; }; done
    [ $ok = 1 ] && expect_eq read-errors-exact "fio read errors" $NBLOCKS "$RD_ERR" &&
        pass read-errors-exact "$RD_ERR blocks fail reads, exactly the $NBLOCKS holding the $BAD_SECTORS bad sectors ($mode)"
    sectors_exact "/dev/mapper/$VOL" sectors-exact fail && pass sectors-exact
    ;;
*)
    fail verify-readable "pending_mode '$mode' (default policy is error)"
    fail read-errors-exact "pending_mode '$mode'"
    fail sectors-exact "pending_mode '$mode'"
    ;;
esac

# --- a rewrite makes pending blocks readable with the new data (6.12)
if [ "$mode" = error-reads ]; then
    job /tmp/rewrite.fio "/dev/mapper/$VOL" write do_verify=0 continue_on_error=write
    fio /tmp/rewrite.fio --output-format=json >/tmp/rewrite.json 2>/tmp/rewrite.err
    sync
    n=0
    while [ "$(num $VOL pending)" != 0 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
    werr=$(grep -m1 '"total_err"' /tmp/rewrite.json | tr -dc 0-9)
    check "/dev/mapper/$VOL"
    expect_eq rewrite "write errors" 0 "${werr:-0}" &&
        expect_eq rewrite "pending after rewrite" 0 "$(num $VOL pending)" &&
        expect_eq rewrite "read errors" 0 "$RD_ERR" &&
        expect_eq rewrite "verify failures" 0 "$VF_ERR" &&
        expect_eq rewrite "total_err" 0 "$TOTAL_ERR" &&
        pass rewrite "all $((SIZE / 4096)) blocks verify after the rewrite"
else
    skip rewrite "kernel $VM_KERNEL: no dm-flakey error_reads; under policy '$mode' pending blocks refuse writes too"
fi

# --- --unreadable zero: a second volume over the same main (its data is fio's, its bad
# sectors are still there) with spares of its own (vol0's keep vol0's metadata).
if remapctl stop $VOL >/tmp/out 2>&1; then
    VOL=vol1
    if out=$(remapctl create --in-place $VOL --main "$main" --spare "$sp3" --spare "$sp4" --region-size 16MiB \
        --unreadable zero 2>&1); then
        trigger "/dev/mapper/$VOL"
        wait_remaps $VOL $NBLOCKS
        st=$(status $VOL)
        zmode=$(json_str "$st" pending_mode)
        check "/dev/mapper/$VOL"
        if expect_eq zero-policy remaps $NBLOCKS "$(json_num "$st" remaps)" &&
            expect_eq zero-policy pending $BAD_SECTORS "$(json_num "$st" pending)"; then
            case "$VM_KERNEL" in
            6.1)
                # Zero: the unreadable sectors read as zeros, so exactly the affected blocks
                # fail fio's verification, and nothing fails to read.
                expect_eq zero-policy pending_mode zero "$zmode" &&
                    expect_eq zero-policy "read errors" 0 "$RD_ERR" &&
                    expect_eq zero-policy "verify failures at" "$(offsets_of "$BLOCKS")" "$VF_OFFS" &&
                    expect_eq zero-policy total_err $NBLOCKS "$TOTAL_ERR" &&
                    sectors_exact "/dev/mapper/$VOL" zero-policy zero &&
                    pass zero-policy "mode zero: $VF_ERR blocks fail verification (their bad sectors read as zeros), 0 read errors"
                ;;
            *)
                # dm-flakey error_reads exists: unreadable blocks fail reads whatever the
                # policy; --unreadable only chooses the fallback of kernels without it.
                expect_eq zero-policy pending_mode error-reads "$zmode" &&
                    expect_eq zero-policy "read errors" $NBLOCKS "$RD_ERR" &&
                    expect_eq zero-policy "verify failures" 0 "$VF_ERR" &&
                    sectors_exact "/dev/mapper/$VOL" zero-policy fail &&
                    pass zero-policy "kernel $VM_KERNEL has error_reads: --unreadable zero does not apply; $RD_ERR blocks fail reads, 0 verify failures"
                ;;
            esac
        fi
        remapctl stop $VOL >/dev/null
    else
        fail zero-policy "create --unreadable zero: $out"
    fi
else
    fail zero-policy "stop $VOL: $(cat /tmp/out)"
fi
kill -TERM $agent
wait $agent
exit 0
