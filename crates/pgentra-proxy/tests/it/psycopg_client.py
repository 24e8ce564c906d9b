"""psycopg 3 through the proxy in transaction pooling, with server-side prepared statements.

Usage: python3 psycopg_client.py PORT USER CLIENTS ROUNDS

Each of CLIENTS threads has a connection of its own and, ROUNDS times: runs a statement psycopg
prepares on the server from its first execution (prepare_threshold=0), a transaction of several
statements, an executemany (psycopg sends it as a pipeline), and a COPY. Prints one line per
check; exits 1 on the first failure.
"""

import sys
import threading

import psycopg

port, user, clients, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
conninfo = f"host=127.0.0.1 port={port} dbname=postgres user={user} sslmode=disable"
table = f"psycopg_{port}"
failures = []
backends = set()


def client(n):
    try:
        with psycopg.connect(conninfo, prepare_threshold=0, autocommit=True) as conn:
            for r in range(rounds):
                row = conn.execute("select %s::int * 2, pg_backend_pid()", (n,)).fetchone()
                assert row[0] == n * 2, row
                backends.add(row[1])
                with conn.transaction():
                    conn.execute(f"insert into {table} values (%s, %s)", (n, r))
                    (count,) = conn.execute(
                        f"select count(*) from {table} where client = %s", (n,)
                    ).fetchone()
                    assert count == r + 1, (count, r)
                with conn.cursor() as cur:
                    cur.executemany("select %s::int", [(i,) for i in range(5)])
                with conn.cursor() as cur:
                    with cur.copy(f"copy (select client from {table} where client = %s) to stdout", (n,)) as copy:
                        rows = list(copy.rows())
                    assert len(rows) == r + 1, rows
    except Exception as error:  # reported below, the test fails on it
        failures.append(f"client {n}: {error!r}")


with psycopg.connect(conninfo, autocommit=True) as setup:
    setup.execute(f"create table {table} (client int, round int)")
threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
with psycopg.connect(conninfo, autocommit=True) as setup:
    (rows,) = setup.execute(f"select count(*) from {table}").fetchone()
    setup.execute(f"drop table {table}")
for failure in failures:
    print(failure)
print(f"rows {rows}")
print(f"backends {len(backends)}")
sys.exit(1 if failures else 0)
