#!/usr/bin/env python3
"""Print the comparison table of bench/run from its RESULT lines.

usage: bench/table.py RESULTS.txt
Medians over the repetitions; ratios are inboxd's delivered messages/s over the other's.
"""
import statistics
import sys


def parse(path):
    rows = []
    with open(path) as f:
        for line in f:
            if line.startswith("RESULT "):
                rows.append(dict(t.partition("=")[::2] for t in line.split()[1:]))
    return rows


def med(rows, key):
    vals = [float(r[key]) for r in rows if key in r]
    return statistics.median(vals) if vals else None


def main():
    rows = parse(sys.argv[1])
    deliver = [r for r in rows if r.get("kind") == "deliver" and r.get("complete") == "1"]
    sink = [r for r in rows if r.get("kind") == "sink"]
    groups = sorted({(int(r["sessions"]), int(r["rcpts"])) for r in deliver})
    print("| sessions | rcpts | inboxd msg/s | Postfix msg/s | Dovecot LMTP msg/s | inboxd/Postfix "
          "| inboxd/Dovecot | inboxd/smtp-sink | CPU ms/msg inboxd / Postfix / Dovecot |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s, n in groups:
        g = [r for r in deliver if int(r["sessions"]) == s and int(r["rcpts"]) == n]
        by = {t: [r for r in g if r["target"] == t] for t in ("inboxd", "postfix", "dovecot-lmtp")}
        rate = {t: med(v, "msgs_per_s") for t, v in by.items()}
        cpu = {t: med(v, "server_cpu_ms_per_msg") for t, v in by.items()}
        # smtp-sink driven by smtpload, the load generator that drives the servers (the
        # smtp-source runs beside them are for reference only: a different client).
        snk = med([r for r in sink if int(r["sessions"]) == s
                   and r.get("driver", "smtpload") == "smtpload"], "msgs_per_s")

        def ratio(a, b):
            return "%.2f" % (a / b) if a and b else "-"

        def num(x, f="%.0f"):
            return f % x if x is not None else "-"

        print("| %d | %d | %s | %s | %s | %s | %s | %s | %s / %s / %s |" % (
            s, n, num(rate["inboxd"]), num(rate["postfix"]), num(rate["dovecot-lmtp"]),
            ratio(rate["inboxd"], rate["postfix"]), ratio(rate["inboxd"], rate["dovecot-lmtp"]),
            ratio(rate["inboxd"], snk) if n == 1 else "-",
            num(cpu["inboxd"], "%.2f"), num(cpu["postfix"], "%.2f"), num(cpu["dovecot-lmtp"], "%.2f")))
    skipped = sum(1 for r in rows if r.get("kind") == "deliver" and r.get("complete") != "1")
    if skipped:
        print("\n%d incomplete deliver runs left out" % skipped)


if __name__ == "__main__":
    main()
