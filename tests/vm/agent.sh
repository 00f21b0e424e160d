#!/bin/sh
# Guest side of the test bed's control channel.  busybox `nc -ll -e` runs
# this once per TCP connection with the socket on stdin/stdout.
#
# Request: one line "VERB TIMEOUT B64ARG [SIZE]".
#   RUN    run `sh -c ARG` (killed after TIMEOUT s); reply "RC <rc>", the
#          base64 of stdout, a line "--", the base64 of stderr.
#   SPAWN  start `sh -c ARG` in the background in its own session; reply
#          "PID <pid> <id>"; output goes to /tmp/bed/spawn.<id>.log and the
#          exit status to /tmp/bed/spawn.<id>.rc.
#   FETCH  reply "OK <size>" and the base64 of file ARG, or "ERR <reason>".
#   PUT    read SIZE raw bytes after the request line into file ARG; "OK".
read -r verb tmo arg size
mkdir -p /tmp/bed
decoded=$(printf '%s' "$arg" | base64 -d)
case "$verb" in
RUN)
    out=/tmp/bed/run.$$.out
    err=/tmp/bed/run.$$.err
    timeout -s KILL "$tmo" sh -c "$decoded" >"$out" 2>"$err" </dev/null
    rc=$?
    echo "RC $rc"
    base64 "$out"
    echo "--"
    base64 "$err"
    rm -f "$out" "$err"
    ;;
SPAWN)
    id=$$
    log=/tmp/bed/spawn.$id.log
    rcf=/tmp/bed/spawn.$id.rc
    pidf=/tmp/bed/spawn.$id.pid
    rm -f "$rcf" "$pidf"
    export BED_CMD="$decoded" BED_LOG="$log" BED_RC="$rcf" BED_PID="$pidf"
    setsid sh -c 'sh -c "$BED_CMD" >"$BED_LOG" 2>&1 </dev/null & c=$!; echo $c >"$BED_PID"; wait $c; echo $? >"$BED_RC"' \
        >/dev/null 2>&1 </dev/null &
    n=0
    while [ ! -s "$pidf" ] && [ $n -lt 500 ]; do usleep 10000; n=$((n + 1)); done
    echo "PID $(cat "$pidf" 2>/dev/null || echo -1) $id"
    ;;
FETCH)
    if [ -f "$decoded" ] && [ -r "$decoded" ]; then
        echo "OK $(stat -c %s "$decoded")"
        base64 "$decoded"
    else
        echo "ERR not a readable file"
    fi
    ;;
PUT)
    mkdir -p "$(dirname "$decoded")"
    head -c "$size" | base64 -d >"$decoded" && echo "OK" || echo "ERR write failed"
    ;;
*)
    echo "ERR unknown verb"
    ;;
esac
