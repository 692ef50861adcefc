// The classic Node cluster: the primary forks one worker per CPU and forks a new one on
// every 'exit'. For a fair comparison WORKERS sets the count (default os.cpus().length).
// Each worker answers the same 43-byte hello page with an x-worker-pid header.
'use strict';
const cluster = require('node:cluster');
const http = require('node:http');
const os = require('node:os');

const workers = parseInt(process.env.WORKERS || String(os.cpus().length), 10);
const port = parseInt(process.env.PORT || '8086', 10);
const host = process.env.HOST || '127.0.0.1';
const body = '<h1>Hello Python!</h1><p>Hello Cluster!</p>';

if (cluster.isPrimary) {
  for (let i = 0; i < workers; i++) cluster.fork();
  cluster.on('exit', () => cluster.fork());
  process.on('SIGTERM', () => {
    cluster.removeAllListeners('exit');
    for (const id in cluster.workers) cluster.workers[id].kill();
    process.exit(0);
  });
} else {
  const headers = {
    'content-type': 'text/html; charset=utf-8',
    'content-length': Buffer.byteLength(body),
    'x-worker-pid': String(process.pid),
  };
  http.createServer((req, res) => {
    res.writeHead(200, headers);
    res.end(req.method === 'HEAD' ? undefined : body);
  }).listen(port, host);
}
