"""psycopg2 and SQLAlchemy through the proxy, with their default settings.

Usage: python3 clients.py PORT USER CLIENTS ROUNDS psycopg2|sqlalchemy-psycopg2|sqlalchemy-psycopg

Each of CLIENTS threads (a psycopg2 connection each, or sessions of one SQLAlchemy engine whose
pool holds CLIENTS connections), ROUNDS times: a parameterized query, and a transaction that
inserts a row and counts its own. Prints "rows N" and "backends N"; exits 1 on the first
failure.
"""

import sys
import threading

port, user, clients, rounds, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
table = f"python_{mode.replace('-', '_')}_{port}"
failures, backends, rows = [], set(), []


def rounds_of(n, query, commit):
    for r in range(rounds):
        double, pid = query("select %(n)s * 2, pg_backend_pid()", {"n": n})
        assert double == n * 2, double
        backends.add(pid)
        query(f"insert into {table} (client, round) values (%(n)s, %(r)s)", {"n": n, "r": r}, rows=False)
        (count,) = query(f"select count(*) from {table} where client = %(n)s", {"n": n})
        assert count == r + 1, (count, r)
        commit()
        rows.append(1)


if mode == "psycopg2":
    import psycopg2

    def connect():
        return psycopg2.connect(host="127.0.0.1", port=port, dbname="postgres", user=user)

    def client(n):
        with connect() as conn:
            cur = conn.cursor()

            def query(sql, params, rows=True):
                cur.execute(sql, params)
                return cur.fetchone() if rows else None

            rounds_of(n, query, conn.commit)
        conn.close()

    setup = connect()
    setup.cursor().execute(f"create table {table} (client int, round int)")
    setup.commit()
    setup.close()
else:
    from sqlalchemy import create_engine, text

    driver = "psycopg2" if mode == "sqlalchemy-psycopg2" else "psycopg"
    engine = create_engine(f"postgresql+{driver}://{user}@127.0.0.1:{port}/postgres", pool_size=clients)

    def client(n):
        with engine.connect() as conn:

            def query(sql, params, rows=True):
                result = conn.execute(text(sql.replace("%(n)s", ":n").replace("%(r)s", ":r")), params)
                return result.one() if rows else None

            rounds_of(n, query, conn.commit)

    with engine.begin() as conn:
        conn.execute(text(f"create table {table} (client int, round int)"))


def run(n):
    try:
        client(n)
    except Exception as error:  # reported below, the test fails on it
        failures.append(f"client {n}: {error!r}")


threads = [threading.Thread(target=run, args=(n,)) for n in range(clients)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(f"rows {len(rows)}")
print(f"backends {len(backends)}")
for failure in failures:
    print(failure)
sys.exit(1 if failures else 0)
