#!/bin/sh
# Bad input at the control socket and on remapctl's command line (bad-input.sh covers the
# create/spare/remap arguments remapd checks): garbage and hostile requests written straight to
# the socket, oversized ones, wrong types and huge numbers, callers without root or outside the
# socket's group, remapd unreachable, and conflicting calls at once. Each is refused with its
# exact exit code and message, and changes nothing: `status --json`, the device-mapper tables
# and every device's metadata area are identical before and after. remapd serves on.
#
# `remapctl debug raw` writes its standard input to the socket unchanged (there is no socat
# or nc -U in the guest) and exits with the code of the last answer.
#vm: cases sock-garbage sock-empty-line sock-no-cmd sock-cmd-type sock-unknown-cmd sock-unknown-field sock-wrong-type sock-negative sock-float sock-u64-overflow sock-u64-max-lba sock-u64-max-count sock-non-utf8 sock-control-bytes sock-two-in-one sock-deep-nesting sock-oversized sock-oversized-valid sock-half-request sock-map-width sock-unknown-volume sock-nonroot-change sock-nonroot-assemble sock-flood cli-unknown-command cli-lba-not-number cli-lba-negative cli-lba-overflow cli-bad-size cli-bad-policy cli-missing-spare cli-width-range cli-bad-shell cli-no-agent cli-not-a-socket cli-json-error cli-nonroot-change cli-outsider second-agent concurrent-stop concurrent-remap still-serving
#vm: needs remapd remapctl
#vm: timeout 600
. /vm/lib.sh

cat >/etc/passwd <<'EOF'
root:x:0:0:root:/root:/bin/sh
op:x:1000:1000:operator:/tmp:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/sh
EOF
cat >/etc/group <<'EOF'
root:x:0:
remap:x:990:op
op:x:1000:
nogroup:x:65534:
EOF

m0=$(nullb create --size 64)
s1=$(nullb create --size 24)
s2=$(nullb create --size 24)
m1=$(nullb create --size 32)
s3=$(nullb create --size 24)

remapd --socket-group remap >/tmp/remapd.out 2>/tmp/remapd.log &
agent=$!
wait_for /tmp/remapd.log "remapd ready" 90 || { fail still-serving "remapd not ready: $(tail -5 /tmp/remapd.log)"; exit 1; }
if ! out=$(remapctl create --in-place vol0 --main "$m0" --spare "$s1" --spare "$s2" --region-size 16MiB 2>&1) ||
    ! out=$(remapctl remap add vol0 0 2>&1); then
    fail still-serving "setup: $out"
    exit 1
fi

snapshot() {
    echo "== status"
    remapctl status --json 2>&1
    echo "== tables"
    dmsetup table | sort
    for d in $m0 $s1 $s2 $m1 $s3; do
        echo "== $d $(dd if="$d" bs=1M count=8 iflag=direct status=none | crc32)"
    done
}

# check CASE CODE PHRASE RC OUTPUT: the exit code, the message, and that nothing changed since
# /tmp/before. Records nothing on success (the caller passes), the failure otherwise.
check() {
    c=$1 want=$2 phrase=$3 rc=$4 msg=$5
    snapshot >/tmp/after
    if [ "$rc" != "$want" ]; then
        fail "$c" "exit $rc, expected $want: $(printf '%s' "$msg" | cut -c1-300)"
        return 1
    fi
    if ! printf '%s' "$msg" | grep -qF -- "$phrase"; then
        fail "$c" "message lacks '$phrase': $(printf '%s' "$msg" | cut -c1-300)"
        return 1
    fi
    if ! cmp -s /tmp/before /tmp/after; then
        fail "$c" "state changed: $(diff /tmp/before /tmp/after | grep '^[-+][^-+]' | head -4 | tr '\n' ' ')"
        return 1
    fi
    if ! kill -0 "$agent" 2>/dev/null; then
        fail "$c" "remapd died: $(tail -3 /tmp/remapd.log | tr '\n' ' ')"
        exit 1
    fi
    LAST="exit $rc: $(printf '%s' "$msg" | head -3 | cut -c1-200)"
}

# sock CASE CODE PHRASE [USER]: standard input goes to the socket as it is.
sock() {
    c=$1 want=$2 phrase=$3 user=${4:-root}
    snapshot >/tmp/before
    cat >/tmp/req
    if [ "$user" = root ]; then
        remapctl debug raw </tmp/req >/tmp/out 2>&1
    else
        su "$user" -s /bin/sh -c "remapctl debug raw" </tmp/req >/tmp/out 2>&1
    fi
    rc=$?
    check "$c" "$want" "$phrase" "$rc" "$(cat /tmp/out)" && pass "$c" "$LAST"
}

# cli CASE CODE PHRASE [--as USER] ARGS...
cli() {
    c=$1 want=$2 phrase=$3
    shift 3
    user=root
    [ "$1" = --as ] && { user=$2; shift 2; }
    snapshot >/tmp/before
    if [ "$user" = root ]; then
        remapctl "$@" >/tmp/out 2>&1
    else
        su "$user" -s /bin/sh -c "remapctl $*" >/tmp/out 2>&1
    fi
    rc=$?
    check "$c" "$want" "$phrase" "$rc" "$(cat /tmp/out)" && pass "$c" "$LAST"
}

# --- the socket, written to directly
echo 'not json' | sock sock-garbage 2 "malformed request"
printf '\n' | sock sock-empty-line 2 "empty line"
echo '{"name":"vol0"}' | sock sock-no-cmd 2 "missing field \`cmd\`"
echo '{"cmd":5}' | sock sock-cmd-type 2 "malformed request: invalid type: integer"
echo '{"cmd":"format-disk","dev":"/dev/nullb0"}' | sock sock-unknown-cmd 2 "unknown command \`format-disk\`"
echo '{"cmd":"stop","name":"vol0","force":true}' | sock sock-unknown-field 2 "unknown field \`force\`"
echo '{"cmd":"remap-add","name":"vol0","lba":"eight","count":1}' | sock sock-wrong-type 2 "invalid type: string"
echo '{"cmd":"remap-add","name":"vol0","lba":-1,"count":1}' | sock sock-negative 2 "malformed \`remap-add\` request"
echo '{"cmd":"remap-add","name":"vol0","lba":1e30,"count":1}' | sock sock-float 2 "malformed \`remap-add\` request"
echo '{"cmd":"remap-add","name":"vol0","lba":18446744073709551616,"count":1}' | sock sock-u64-overflow 2 "malformed \`remap-add\` request"
echo '{"cmd":"remap-add","name":"vol0","lba":18446744073709551615,"count":1}' | sock sock-u64-max-lba 2 "past the end"
echo '{"cmd":"remap-add","name":"vol0","lba":8,"count":18446744073709551615}' | sock sock-u64-max-count 2 "past the end"
printf '{"cmd":"stop","name":"vol0\377\376"}\n' | sock sock-non-utf8 2 "not UTF-8"
printf '{"cmd":"stop","name":"vol0\001\033[2J"}\n' | sock sock-control-bytes 2 "control character"
echo '{"cmd":"status"}{"cmd":"stop","name":"vol0"}' | sock sock-two-in-one 2 "trailing characters"
# 20000 levels deep (no stack to overflow: serde_json skips unknown values without recursing).
awk 'BEGIN { printf "{\"cmd\":\"status\",\"x\":"; for (i = 0; i < 20000; i++) printf "["; print "" }' |
    sock sock-deep-nesting 2 "malformed request: EOF while parsing a list"
# 100 KiB without a newline, then a valid request padded past 64 KiB.
head -c 102400 /dev/zero | tr '\0' 'a' | sock sock-oversized 2 "request larger than 65536 bytes refused"
{ printf '{"cmd":"stop","name":"vol0"'; head -c 70000 /dev/zero | tr '\0' ' '; echo '}'; } |
    sock sock-oversized-valid 2 "request larger than 65536 bytes refused"
# Half a request, then the peer ends its stream: that last line is parsed (and refused).
printf '{"cmd":"stop","name":"vo' | sock sock-half-request 2 "EOF while parsing"
echo '{"cmd":"map","name":"vol0","width":0}' | sock sock-map-width 2 "map width must be 1 to 1024 cells"
echo '{"cmd":"stop","name":"nosuch"}' | sock sock-unknown-volume 3 "no volume named \`nosuch\`"
echo '{"cmd":"stop","name":"vol0"}' | sock sock-nonroot-change 4 "\`stop\` changes volumes and needs root (caller uid 1000)" op
echo '{"cmd":"assemble"}' | sock sock-nonroot-assemble 4 "needs root" op

# 60 connections at once, garbage and real requests mixed, root and group member: all answered.
snapshot >/tmp/before
i=0
pids=
while [ $i -lt 60 ]; do
    case $((i % 3)) in
    0) echo 'garbage' | remapctl debug raw >/tmp/flood.$i 2>&1 & ;;
    1) echo '{"cmd":"status","name":"vol0"}' | remapctl debug raw >/tmp/flood.$i 2>&1 & ;;
    2) echo '{"cmd":"stop","name":"vol0"}' | su op -s /bin/sh -c "remapctl debug raw" >/tmp/flood.$i 2>&1 & ;;
    esac
    pids="$pids $!"
    i=$((i + 1))
done
for p in $pids; do wait "$p"; done
answered=$(cat /tmp/flood.* | grep -c '"code":')
check sock-flood 60 "" "$answered" "$(cat /tmp/flood.0 /tmp/flood.2)" && pass sock-flood "60 of 60 answered"
rm -f /tmp/flood.*

# --- the command line
cli cli-unknown-command 2 "unrecognized subcommand 'frobnicate'" frobnicate
cli cli-lba-not-number 2 "invalid value 'eight' for '<LBA>...'" remap add vol0 eight
cli cli-lba-negative 2 "unexpected argument '-5'" remap add vol0 -5
cli cli-lba-overflow 2 "invalid value '18446744073709551616' for '<LBA>...'" remap add vol0 18446744073709551616
cli cli-bad-size 2 "unknown size unit \`MB\`" create x --main "$m1" --spare "$s3" --chunk-size 4MB
cli cli-bad-policy 2 "unknown allocation policy \`random\`" create x --main "$m1" --spare "$s3" --policy random
cli cli-missing-spare 2 "the following required arguments were not provided" create x --main "$m1"
cli cli-width-range 2 "invalid value '0' for '--width <WIDTH>'" status vol0 --width 0
cli cli-bad-shell 2 "invalid value 'tcsh'" completions tcsh

# A second agent, with its own pin folder and socket, must not start beside the first: it would
# adopt and write the same volumes. Refused before it pins, binds or assembles anything.
snapshot >/tmp/before
remapd --pin-dir /sys/fs/bpf/remap-second --socket /run/second.sock >/tmp/out 2>&1
rc=$?
if [ -e /sys/fs/bpf/remap-second ] || [ -e /run/second.sock ]; then
    fail second-agent "the refused agent left $(ls -d /sys/fs/bpf/remap-second /run/second.sock 2>/dev/null)"
else
    check second-agent 1 "another remapd (pid $agent) manages this machine's volumes" "$rc" "$(cat /tmp/out)" &&
        pass second-agent "$LAST"
fi
cli cli-no-agent 1 "cannot reach remapd at /run/nope.sock" --socket /run/nope.sock status
cli cli-not-a-socket 1 "cannot reach remapd at /etc/passwd" --socket /etc/passwd status
snapshot >/tmp/before
out=$(remapctl --json stop nosuch 2>/dev/null)
rc=$?
check cli-json-error 3 '{"code":3,"error":"no volume named `nosuch`"}' "$rc" "$out" && pass cli-json-error "$out"
ok=1
for c in "stop vol0" "remap add vol0 8" "spare add vol0 $s3" "spare remove vol0 $s2" \
    "create x --main $m1 --spare $s3" "assemble vol0"; do
    snapshot >/tmp/before
    out=$(su op -s /bin/sh -c "remapctl $c" 2>&1)
    rc=$?
    check cli-nonroot-change 4 "needs root" "$rc" "$out" || { ok=0; break; }
done
[ $ok = 1 ] && pass cli-nonroot-change "$LAST"
cli cli-outsider 4 "permission denied on /run/remap/remapd.sock" --as nobody status

# --- conflicting calls at once
# Two stops of one volume: exactly one succeeds, the other finds no volume.
if out=$(remapctl create --in-place vol1 --main "$m1" --spare "$s3" --region-size 16MiB 2>&1); then
    remapctl stop vol1 >/tmp/stop.a 2>&1 &
    a=$!
    remapctl stop vol1 >/tmp/stop.b 2>&1 &
    b=$!
    wait $a
    ra=$?
    wait $b
    rb=$?
    if [ "$(echo "$ra $rb" | tr ' ' '\n' | sort | tr '\n' ' ')" = "0 3 " ] && ! dmsetup info vol1 >/dev/null 2>&1 &&
        [ "$(dmsetup ls | grep -c '^vol1-remap-r')" = 0 ]; then
        pass concurrent-stop "exits $ra $rb: $(cat /tmp/stop.a /tmp/stop.b | tr '\n' ' ')"
    else
        fail concurrent-stop "exits $ra $rb: $(cat /tmp/stop.a /tmp/stop.b | tr '\n' ' ')"
    fi
else
    fail concurrent-stop "setup: $out"
fi
# Eight remaps of the same chunk at once: all succeed, one after the other; the chunk has one
# extent and the pool counts one more chunk in use.
r0=$(json_num "$(remapctl status vol0 --json)" remaps)
i=0
pids=
while [ $i -lt 8 ]; do
    remapctl remap add vol0 4096 >/tmp/remap.$i 2>&1 &
    pids="$pids $!"
    i=$((i + 1))
done
for p in $pids; do wait "$p"; done
oks=$(grep -l '^remapped 1 chunks' /tmp/remap.* | wc -l)
st=$(remapctl status vol0 --json)
used=$(remapctl spare list vol0 --json | grep -o '"used":[0-9]*' | cut -d: -f2 | awk '{ s += $1 } END { print s }')
if [ "$oks" = 8 ] && [ "$(json_num "$st" remaps)" = $((r0 + 1)) ] && [ "$used" = $((r0 + 1)) ]; then
    pass concurrent-remap "8 of 8 done; remaps $r0 → $((r0 + 1)), pool used $used"
else
    fail concurrent-remap "$oks of 8 ok; remaps $r0 → $(json_num "$st" remaps), pool used $used: $(cat /tmp/remap.0)"
fi

# --- after all that, remapd serves as before
if kill -0 "$agent" 2>/dev/null && out=$(remapctl status vol0 2>&1) &&
    printf '%s' "$out" | grep -q "remapped 2 chunks"; then
    pass still-serving "$(printf '%s\n' "$out" | head -3 | tr '\n' '~')"
else
    fail still-serving "$(tail -3 /tmp/remapd.log | tr '\n' ' '): $out"
fi
kill -TERM "$agent"
wait "$agent"
exit 0
