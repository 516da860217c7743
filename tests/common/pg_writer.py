#!/usr/bin/env python3
"""A PostgreSQL client that writes through load-balancer hosts the way an application does: it
keeps one connection open and makes a new one when it is lost. tests/containers.rs runs it in a
client container (psycopg2 on Debian 12's libpq 15: multi-host strings and target_session_attrs are
libpq's own).

usage: pg_writer.py CONNINFO SECONDS INTERVAL_MS [STOP_FILE]

Every INTERVAL_MS, for SECONDS or until STOP_FILE exists, one attempt: connect first if there is no connection (libpq tries
the hosts in order, each for connect_timeout), then one INSERT on the leader's probe table that
returns the server's address and whether it is a replica. Any error closes the connection; the next
attempt connects anew. One line per attempt on stdout (times in seconds since the Unix epoch):

    <start> <end> ok <server address> <t|f: pg_is_in_recovery()>
    <start> <end> err <SQLSTATE or -> <first line of the error>

An INSERT that reaches a replica fails with SQLSTATE 25006 (read-only transaction).
"""
import os
import sys
import time

import psycopg2

WRITE = (
    "insert into lb_probe default values "
    "returning host(inet_server_addr()), pg_is_in_recovery()"
)


def main():
    conninfo, seconds, interval = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]) / 1000.0
    stop = sys.argv[4] if len(sys.argv) > 4 else None
    end = time.time() + seconds
    conn = None
    # Bounded: at most SECONDS / INTERVAL_MS attempts, each bounded by the connection string's
    # connect_timeout and tcp_user_timeout.
    for _ in range(int(seconds / interval) + 1):
        start = time.time()
        if start >= end or (stop and os.path.exists(stop)):
            break
        try:
            if conn is None:
                conn = psycopg2.connect(conninfo)
                conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(WRITE)
                addr, recovery = cur.fetchone()
            line = "ok %s %s" % (addr, "t" if recovery else "f")
        except psycopg2.Error as e:
            first = (str(e).strip().splitlines() or ["?"])[0]
            line = "err %s %s" % (e.pgcode or "-", first)
            if conn is not None:
                try:
                    conn.close()
                except psycopg2.Error:
                    pass
            conn = None
        print("%.3f %.3f %s" % (start, time.time(), line), flush=True)
        time.sleep(max(0.0, start + interval - time.time()))
    if conn is not None:
        conn.close()


if __name__ == "__main__":
    main()
