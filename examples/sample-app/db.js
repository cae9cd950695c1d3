'use strict';
// The database, when the environment names one (PGHOST, PGDATABASE, PGUSER and
// DATABASE_PASSWORD, from pm2's ecosystem file): a pg Pool, or null without PGHOST.
// PostgreSQL requires TLS from other hosts (role postgresql: hostssl with Debian's self-signed
// certificate, which no CA vouches for): the connection is encrypted, the certificate unchecked.
function pool() {
  if (!process.env.PGHOST) {
    return null;
  }
  const { Pool } = require('pg');
  const local = ['127.0.0.1', 'localhost', '::1'].includes(process.env.PGHOST);
  return new Pool({
    password: process.env.DATABASE_PASSWORD,
    ssl: local ? false : { rejectUnauthorized: false },
    max: 4,
    connectionTimeoutMillis: 3000,
  });
}

module.exports = { pool };
