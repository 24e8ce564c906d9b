// node-postgres and Sequelize through the proxy, with their default settings.
//
// Usage: node clients.js PORT USER CLIENTS ROUNDS pg-client|pg-pool|sequelize
//
// Each of CLIENTS clients (a pg.Client each, or a pool of CLIENTS connections shared by CLIENTS
// tasks), ROUNDS times: a parameterized query, and a transaction that inserts a row and counts
// its own. Prints "rows N" and "backends N"; exits 1 on the first failure.

"use strict";
const { Client, Pool } = require("pg");
const { Sequelize, DataTypes, QueryTypes } = require("sequelize");

const [port, user, clients, rounds, mode] = process.argv.slice(2);
const config = { host: "127.0.0.1", port: Number(port), user, database: "postgres" };
const table = `node_${mode.replace("-", "_")}_${port}`;
const backends = new Set();
let rows = 0;

function check(actual, expected, what) {
  if (Number(actual) !== expected) throw new Error(`${what}: ${actual}, not ${expected}`);
}

// One client's rounds on `query(sql, params)` with `transaction(body)`.
async function rounds_of(n, query, transaction) {
  for (let round = 0; round < Number(rounds); round++) {
    const [row] = await query("select $1::int * 2 as double, pg_backend_pid() as pid", [n]);
    check(row.double, n * 2, "double");
    backends.add(row.pid);
    await transaction(async (query) => {
      await query(`insert into ${table} (client, round) values ($1, $2)`, [n, round]);
      const [count] = await query(`select count(*) as count from ${table} where client = $1`, [n]);
      check(count.count, round + 1, "count");
    });
    rows++;
  }
}

async function with_pg(n, client) {
  const query = async (sql, params) => (await client.query(sql, params)).rows;
  await rounds_of(n, query, async (body) => {
    await client.query("begin");
    await body(query);
    await client.query("commit");
  });
}

async function main() {
  const ids = [...Array(Number(clients)).keys()];
  if (mode === "sequelize") {
    const sequelize = new Sequelize("postgres", user, "", {
      ...config, dialect: "postgres", logging: false, pool: { max: Number(clients) },
    });
    const Row = sequelize.define("row", { client: DataTypes.INTEGER, round: DataTypes.INTEGER },
      { tableName: table, timestamps: false });
    await Row.sync();
    const query = (options) => async (sql, params) => sequelize.query(sql,
      { bind: params, type: sql.startsWith("select") ? QueryTypes.SELECT : QueryTypes.RAW, ...options });
    await Promise.all(ids.map((n) => rounds_of(n, query({}), (body) =>
      sequelize.transaction(async (t) => body(query({ transaction: t }))))));
    await sequelize.close();
  } else if (mode === "pg-pool") {
    const pool = new Pool({ ...config, max: Number(clients) });
    await pool.query(`create table ${table} (id serial, client int, round int)`);
    await Promise.all(ids.map(async (n) => {
      const client = await pool.connect();
      try { await with_pg(n, client); } finally { client.release(); }
    }));
    await pool.end();
  } else {
    const setup = new Client(config);
    await setup.connect();
    await setup.query(`create table ${table} (id serial, client int, round int)`);
    await setup.end();
    await Promise.all(ids.map(async (n) => {
      const client = new Client(config);
      await client.connect();
      try { await with_pg(n, client); } finally { await client.end(); }
    }));
  }
  console.log(`rows ${rows}`);
  console.log(`backends ${backends.size}`);
}

main().catch((error) => {
  const cause = error.original ? `${error.original.message} in ${error.sql}\n` : "";
  console.log(`failed: ${cause}${error.stack}`);
  process.exit(1);
});
