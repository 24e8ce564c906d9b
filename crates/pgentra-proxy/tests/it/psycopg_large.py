"""psycopg 3 sending large values through the proxy in transaction pooling.

Usage: python3 psycopg_large.py PORT USER

Inserts three 3 MB bytea values (server-side prepared from the first execution), then ten rows
of 300 KB with executemany (which psycopg sends as one pipeline), and prints what arrived:
"bytea COUNT x LENGTH" and "rows COUNT x LENGTH". Exits 1 on the first failure.
"""

import sys

import psycopg

port, user = sys.argv[1], sys.argv[2]
conninfo = f"host=127.0.0.1 port={port} dbname=postgres user={user} sslmode=disable"
table = f"psycopg_large_{port}"

with psycopg.connect(conninfo, autocommit=True, prepare_threshold=0) as conn:
    conn.execute(f"create table {table} (kind text, value bytea)")
    try:
        for _ in range(3):
            conn.execute(f"insert into {table} values ('bytea', %s)", (b"\x01" * 3_000_000,))
        with conn.cursor() as cur:
            cur.executemany(
                f"insert into {table} values ('rows', %s)",
                [(bytes([n]) * 300_000,) for n in range(10)],
            )
        for kind in ("bytea", "rows"):
            count, length = conn.execute(
                f"select count(*), max(length(value)) from {table} where kind = %s", (kind,)
            ).fetchone()
            print(f"{kind} {count} x {length}")
    finally:
        conn.execute(f"drop table {table}")
