    Finished `release` profile [optimized + debuginfo] target(s) in 0.04s
target=command start=2026-11-30T20:03:02Z minutes=31 execs=3531824 execs_per_sec=19497.44 corpus=520 edges=1267 crashes=0 hangs=0
