    Finished `release` profile [optimized + debuginfo] target(s) in 0.03s
