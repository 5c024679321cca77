#!/bin/sh
# Boot 2: the same disks after the power cut.
. /vm/scenario/_lib.sh

start_agent || { fail assembled "remapd not ready: $(tail -5 /tmp/remapd.log)"; exit 1; }
if [ -b "$DEV" ] && grep -q "assembled (created)" /tmp/remapd.log; then
    pass assembled "$(grep 'assembled (created)' /tmp/remapd.log | head -1 | sed 's/.*assembled/assembled/')"
else
    fail assembled "$(grep -E 'assembled|refused' /tmp/remapd.log | tail -3 | tr '\n' ' ')"
    exit 1
fi
ev=$(evac)
at=$(json_num "$ev" done_bytes)
if [ "$(json_str "$ev" state)" = copying ] && [ "${at:-0}" -gt 0 ]; then
    pass resumed "resumed at $at bytes"
else
    fail resumed "evacuation after the cut: $ev"
fi
# Acknowledged before the cut: every block holds its last acknowledged write or a later one.
records $ACK_REC 4000 ACK | awk '{ if ($2 > m[$1]) m[$1] = $2 } END { for (b in m) print b, m[b] }' >/tmp/acked
check_acked() {
    bad=""
    while read -r b want; do
        got=$(seqblock read "$DEV" "$b" 2>&1) || { bad="$bad $got;"; continue; }
        [ "$got" -ge "$want" ] || bad="$bad block $b holds $got, $want was acknowledged;"
    done </tmp/acked
    [ -z "$bad" ] && pass acked-writes "$1: $(wc -l </tmp/acked) blocks hold their last acknowledged write" ||
        fail acked-writes "$1:$(printf '%s' "$bad" | head -c 500)"
}
check_acked "before the resume"
n=0
while [ "$(json_str "$(evac)" state)" != done ] && [ $n -lt 1800 ]; do sleep 0.1; n=$((n + 1)); done
st=$(status)
expect_eq new-main main "$(readlink -f "$NEW")" "$(readlink -f "$(json_str "$st" main)")" &&
    expect_eq new-main evacuation done "$(json_str "$(evac)" state)" &&
    pass new-main "main $(json_str "$st" main)"
check_acked "after the evacuation"
ok=1 n=0
records $SUMS_REC 100 SUM >/tmp/sums
while read -r m want; do
    case " $WRITER_MIBS " in *" $m "*) continue ;; esac
    got=$(dd if=$DEV bs=1M skip="$m" count=1 iflag=direct status=none | sha256sum | cut -c1-64)
    [ "$got" = "$want" ] || { fail data-intact "MiB $m differs"; ok=0; break; }
    n=$((n + 1))
done </tmp/sums
[ $ok = 1 ] && [ $n -gt 50 ] && pass data-intact "$n MiB identical to what boot 1 wrote"
kill -TERM $agent
wait $agent
exit 0
