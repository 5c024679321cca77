#!/bin/sh
# The error detector (remapd watch) on each injector and each tracepoint program: every
# failed O_DIRECT read is reported with its exact device, sector, size and errno, and the
# program attached is the one asked for.
#vm: cases nullb-error nullb-complete scsi-error scsi-complete blkdebug-error blkdebug-complete auto-detector
#vm: needs remapd
#vm: disk bad 16M inject=read_aio:5:1000
#vm: timeout 300
. /vm/lib.sh

# detect CASE DEV DETECTOR TRACEPOINT SECTOR NR ERRNO
detect() {
    c=$1 dev=$2 det=$3 tp=$4 sector=$5 nr=$6 errno=$7
    rm -f /tmp/ev /tmp/err
    remapd watch --device "$dev" --detector "$det" --pin-dir "/sys/fs/bpf/remap-$c" >/tmp/ev 2>/tmp/err &
    pid=$!
    if ! wait_for /tmp/err "attached block:block_rq_" 60; then
        fail "$c" "remapd not attached after 60 s: $(tail -3 /tmp/err | tr '\n' ' ')"
        kill "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
        return
    fi
    got_tp=$(grep -o 'attached block:block_rq_[a-z]*' /tmp/err | head -1)
    if dio-read "$dev" "$sector" "$nr" 2>/dev/null; then
        fail "$c" "O_DIRECT read of sector $sector succeeded: injector not armed"
    fi
    wait_for /tmp/ev "\"sector\":$sector[,}]" 20
    kill -TERM "$pid"
    wait "$pid"
    rc=$?
    ev=$(grep "\"sector\":$sector[,}]" /tmp/ev | head -1)
    mm=$(cat "/sys/block/${dev##*/}/dev")
    [ -n "$ev" ] || { fail "$c" "no event for sector $sector; stdout: $(head -c 300 /tmp/ev); stderr: $(tail -3 /tmp/err | tr '\n' ' ')"; return; }
    expect_eq "$c" tracepoint "attached block:$tp" "$got_tp" &&
        expect_eq "$c" device "$dev" "$(json_str "$ev" device)" &&
        expect_eq "$c" major:minor "$mm" "$(json_num "$ev" major):$(json_num "$ev" minor)" &&
        expect_eq "$c" sector "$sector" "$(json_num "$ev" sector)" &&
        expect_eq "$c" nr_sector "$nr" "$(json_num "$ev" nr_sector)" &&
        expect_eq "$c" errno "$errno" "$(json_num "$ev" errno)" &&
        expect_eq "$c" op read "$(json_str "$ev" op)" &&
        expect_eq "$c" "exit status after SIGTERM" 0 "$rc" &&
        pass "$c" "$ev"
}

nb=$(nullb create --size 16 --bad 2048-2055)
detect nullb-error "$nb" error block_rq_error 2048 8 5
detect nullb-complete "$nb" complete block_rq_complete 2048 8 5
detect auto-detector "$nb" auto block_rq_error 2048 8 5

sd=$(scsi-debug create --size 16 --bad 4096 8)
detect scsi-error "$sd" error block_rq_error 4096 8 61
detect scsi-complete "$sd" complete block_rq_complete 4096 8 61

vd=$(vmdisk bad)
detect blkdebug-error "$vd" error block_rq_error 1000 8 5
detect blkdebug-complete "$vd" complete block_rq_complete 1000 8 5
exit 0
