'use strict';
// A tiny HTTP app: GET /health answers {"status": "ok", "version", "release", "database"}.
// PORT comes from the environment (pm2's ecosystem file sets it); APP_VERSION overrides the
// version from package.json. `invoke deploy` writes the release id into ./RELEASE: the health
// gate waits for /health to name the new release.
const fs = require('fs');
const http = require('http');
const path = require('path');
const { version } = require('./package.json');
const db = require('./db').pool();

let release = null;
try {
  release = fs.readFileSync(path.join(__dirname, 'RELEASE'), 'utf8').trim();
} catch (e) {
  release = null;               // run from a checkout, not a release
}

const port = Number(process.env.PORT || 3000);
const host = process.env.HOST || '0.0.0.0';
const appVersion = process.env.APP_VERSION || version;

let closing = false;

const server = http.createServer((req, res) => {
  if (closing) {
    res.setHeader('Connection', 'close');   // a proxy's keep-alive connection ends with this answer
  }
  const url = req.url.split('?')[0];
  if (req.method === 'GET' && url === '/health') {
    // the database answers (when there is one), or the app is not healthy: 503
    const check = db ? db.query('SELECT 1').then(() => 'ok', (e) => `down: ${e.message}`)
      : Promise.resolve('none');
    check.then((database) => {
      const ok = database === 'ok' || database === 'none';
      const body = JSON.stringify({ status: ok ? 'ok' : 'unhealthy', version: appVersion, release, database });
      res.writeHead(ok ? 200 : 503, { 'Content-Type': 'application/json', 'Cache-Control': 'no-store' });
      res.end(body + '\n');
    });
    return;
  }
  if (req.method === 'GET' && url === '/') {
    res.writeHead(200, { 'Content-Type': 'text/plain; charset=utf-8' });
    res.end(`sample-app ${appVersion}\n`);
    return;
  }
  res.writeHead(404, { 'Content-Type': 'application/json' });
  res.end(JSON.stringify({ error: 'not found' }) + '\n');
});

server.listen(port, host, () => {
  console.log(`sample-app ${appVersion} listening on ${host}:${port} (pid ${process.pid})`);
});

// A proxy keeps idle connections to the app for up to a minute (nginx: keepalive_timeout 60 s):
// the app must not close them sooner, or the proxy may send a request into a closing socket.
server.keepAliveTimeout = 65000;
server.headersTimeout = 66000;

// pm2 sends SIGINT on stop/reload (once the new instance listens), and SIGKILL 1.6 s later.
// For one second this instance still answers, each answer with `Connection: close`, so the
// proxy retires its keep-alive connections itself, after an answer, never mid-request; then it
// stops accepting (close() also drops the connections still idle) and exits.
function shutdown(signal) {
  if (closing) {
    return;
  }
  closing = true;
  console.log(`sample-app: ${signal}, closing`);
  setTimeout(() => server.close(() => process.exit(0)), 1000).unref();
  setTimeout(() => process.exit(0), 1500).unref();
}
process.on('SIGINT', () => shutdown('SIGINT'));
process.on('SIGTERM', () => shutdown('SIGTERM'));
