'use strict';
// Migrations: migrations/NNN_name.js, each {up(client), down(client)}, applied in name order
// inside one transaction each, recorded in the table schema_migrations.
//   node migrate.js up      apply every migration not applied yet
//   node migrate.js down    revert, newest first, the applied migrations this release has and
//                           the release in TARGET_RELEASE_DIR lacks (what a rollback undoes)
const fs = require('fs');
const path = require('path');
const { pool } = require('./db');

function names(dir) {
  try {
    return fs.readdirSync(path.join(dir, 'migrations')).filter((f) => /^\d+_.*\.js$/.test(f)).sort();
  } catch (e) {
    return [];
  }
}

async function main(direction) {
  const db = pool();
  if (!db) {
    throw new Error('PGHOST is not set: no database to migrate');
  }
  const client = await db.connect();
  try {
    await client.query('CREATE TABLE IF NOT EXISTS schema_migrations (name text PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())');
    const applied = new Set((await client.query('SELECT name FROM schema_migrations')).rows.map((r) => r.name));
    let todo;
    if (direction === 'up') {
      todo = names(__dirname).filter((n) => !applied.has(n));
    } else if (direction === 'down') {
      if (!process.env.TARGET_RELEASE_DIR) {
        throw new Error('TARGET_RELEASE_DIR is not set: the release to go back to');
      }
      const keep = new Set(names(process.env.TARGET_RELEASE_DIR));
      todo = names(__dirname).filter((n) => applied.has(n) && !keep.has(n)).reverse();
    } else {
      throw new Error(`unknown direction ${direction}: up or down`);
    }
    for (const name of todo) {
      const migration = require(path.join(__dirname, 'migrations', name));
      await client.query('BEGIN');
      await migration[direction](client);
      if (direction === 'up') {
        await client.query('INSERT INTO schema_migrations (name) VALUES ($1)', [name]);
      } else {
        await client.query('DELETE FROM schema_migrations WHERE name = $1', [name]);
      }
      await client.query('COMMIT');
      console.log(`${direction} ${name}`);
    }
    if (!todo.length) {
      console.log(`nothing to migrate ${direction}`);
    }
  } finally {
    client.release();
    await db.end();
  }
}

main(process.argv[2]).catch((e) => {
  console.error(`migrate: ${e.message}`);
  process.exit(1);
});
