// A Leasehold agent in Node.js. It proves its identity with its X.509 SVID
// (mTLS), acquires a lease on a credential for a task, uses it, and
// releases it. The protos are the repository's own (proto/leasehold/v1).
//
//   LEASEHOLD_ADDR=localhost:8443 LEASEHOLD_DEV_DIR=.leasehold-dev LEASEHOLD_AS=agent-1 \
//   node agent.js crm/salesforce read ticket-4711
//
// It prints the lease id and a fingerprint of the secret, never the secret.
'use strict';

const crypto = require('crypto');
const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const protoDir = path.join(__dirname, '..', '..', 'proto');
const def = protoLoader.loadSync('leasehold/v1/broker.proto', {
  includeDirs: [protoDir], keepCase: true, longs: String, enums: String, defaults: true,
});
const leasehold = grpc.loadPackageDefinition(def).leasehold.v1;

function credentials() {
  const dir = process.env.LEASEHOLD_DEV_DIR;
  const as = process.env.LEASEHOLD_AS || 'agent-1';
  const read = (f) => fs.readFileSync(path.join(dir, f));
  // The broker's SVID names localhost and 127.0.0.1; the bundle is the trust domain's CA.
  return grpc.credentials.createSsl(read('bundle.pem'), read(`${as}-key.pem`), read(`${as}.pem`));
}

function call(client, method, req) {
  return new Promise((resolve, reject) => {
    client[method](req, { deadline: Date.now() + 10000 }, (err, res) => (err ? reject(err) : resolve(res)));
  });
}

async function main() {
  const [credential, scope, task] = process.argv.slice(2);
  const client = new leasehold.BrokerService(process.env.LEASEHOLD_ADDR, credentials());
  const who = await call(client, 'WhoAmI', {});
  console.log(`spiffe_id=${who.spiffe_id}`);
  const res = await call(client, 'AcquireLease', {
    credential, scopes: [scope], task: { id: task, purpose: 'node agent example' },
    ttl: { seconds: 120, nanos: 0 },
  });
  const secret = JSON.stringify(res.secret, Object.keys(res.secret).sort());
  const fingerprint = crypto.createHash('sha256').update(secret).digest('hex').slice(0, 16);
  console.log(`lease_id=${res.lease.id} state=${res.lease.state} secret_sha256=${fingerprint}`);
  const rel = await call(client, 'ReleaseLease', { lease_id: res.lease.id });
  console.log(`released state=${rel.lease.state}`);
  client.close();
}

main().catch((err) => {
  console.error(`error code=${err.code} ${err.details || err.message}`);
  process.exit(1);
});
