#!/bin/bash
# Experiment (kept with its results, not a tool): does a second receiver and agent lift the
# 20-session rate? Runs, interleaved, one inboxd with 20 sessions against two inboxd (two
# receivers, two agents) with 10 sessions each, all to alice, and prints the rate over the
# whole run (messages / wall time of both loads together). As root; loopback only.
# usage: bash bench/results/two-servers.sh INBOXD_BINARY SMTPLOAD_BINARY [MSGS] [ROUNDS]
set -u
B=$1 L=$2 M=${3:-10000} R=${4:-3}
al=$(mktemp); echo 'root: alice' >"$al"
trash=/var/tmp/inboxd-ab-trash; mkdir -p $trash
clean() { find /home/alice/Maildir/new -type f -exec mv -t $trash/ {} + 2>/dev/null; sync; }
start() { $B --listen 127.0.0.1:$1 -d localhost --aliases "$al" >/dev/null 2>/dev/shm/two-servers-log-$1 & echo $!; }
port=2840
for round in $(seq $R); do
  clean
  p=$(start $port); sleep 0.5
  $L -s 20 -m 300 -r alice@localhost 127.0.0.1:$port >/dev/null 2>&1; sync
  t0=$(date +%s.%N)
  $L -s 20 -m $M -r alice@localhost 127.0.0.1:$port >/dev/null 2>&1
  t1=$(date +%s.%N)
  kill $p; wait $p 2>/dev/null
  echo "round=$round servers=1 sessions=20 msgs=$M msgs_per_s=$(echo "$M/($t1-$t0)" | bc -l | cut -c1-7)"
  port=$((port + 1)); clean
  p1=$(start $port); p2=$(start $((port + 1))); sleep 0.5
  $L -s 10 -m 150 -r alice@localhost 127.0.0.1:$port >/dev/null 2>&1
  $L -s 10 -m 150 -r alice@localhost 127.0.0.1:$((port + 1)) >/dev/null 2>&1; sync
  t0=$(date +%s.%N)
  $L -s 10 -m $((M / 2)) -r alice@localhost 127.0.0.1:$port >/dev/null 2>&1 &
  q=$!
  $L -s 10 -m $((M / 2)) -r alice@localhost 127.0.0.1:$((port + 1)) >/dev/null 2>&1
  wait $q
  t1=$(date +%s.%N)
  kill $p1 $p2; wait 2>/dev/null
  echo "round=$round servers=2 sessions=10+10 msgs=$M msgs_per_s=$(echo "$M/($t1-$t0)" | bc -l | cut -c1-7)"
  port=$((port + 2))
done
clean; rm -f "$al" /dev/shm/two-servers-log-*
