#!/usr/bin/env node
// The rest of the contract from Node.js, beyond loss_test.js's unary values: StreamLoss gives
// the unary results bit for bit, a bad request's google.rpc.BadRequest decodes from
// `grpc-status-details-bin` with messages defined here (as a client without Google's protos
// would), an unset objective is SAPO with its defaults, and float32 tensors give a float32
// gradient (loss_test.js sends float64 only).
//
//   node tests/node/contract_test.js <port> <tests/vectors/sapo.json> [host]
//
// Prints one "ok   <check>" line per check and exits 0 when all pass.
'use strict';

const path = require('path');
const fs = require('fs');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');
const { tensor, readTensor, caseRequest } = require('./loss_test');

const REPO = path.resolve(__dirname, '..', '..');
const PROTO = path.join(REPO, 'proto', 'softgate', 'v1', 'softgate.proto');

// google.rpc.Status and BadRequest, as https://github.com/googleapis/googleapis defines them
const RPC = protobuf.parse(`
  syntax = "proto3";
  package google.rpc;
  message Any { string type_url = 1; bytes value = 2; }
  message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
  message BadRequest {
    message FieldViolation { string field = 1; string description = 2; string reason = 3; }
    repeated FieldViolation field_violations = 1;
  }
`, { keepCase: true }).root;

function call(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: new Date(Date.now() + 30000) }, (err, resp) => (err ? reject(err) : resolve(resp)));
  });
}

function stream(client, messages) {
  return new Promise((resolve, reject) => {
    const out = [];
    const s = client.StreamLoss({ deadline: new Date(Date.now() + 30000) });
    s.on('data', (r) => out.push(r));
    s.on('error', reject);
    s.on('end', () => resolve(out));
    for (const m of messages) s.write(m);
    s.end();
  });
}

// the case's batch as two chunks, cut after the first sequence k that leaves tokens on both
// sides: offsets rebased, per-token tensors cut at offsets[k], per-sequence ones at k, group
// ids global to the stream
function chunks(inputs) {
  const off = inputs.offsets.map(Number);
  const b = off.length - 1;
  const k = off.findIndex((t) => t > 0 && t < off[b]);
  if (k < 0) throw new Error('the case has no cut with tokens on both sides');
  const parts = [];
  for (const [s0, s1] of [[0, k], [k, b]]) {
    const t0 = off[s0];
    const t1 = off[s1];
    const part = { offsets: off.slice(s0, s1 + 1).map((x) => x - t0) };
    for (const [key, v] of Object.entries(inputs)) {
      if (key === 'offsets' || v === null || v === undefined || !Array.isArray(v)) continue;
      part[key] = v.length === b && v.length !== off[b] ? v.slice(s0, s1) : v.slice(t0, t1);
    }
    if (inputs.advantage_level) part.advantage_level = inputs.advantage_level;
    parts.push(part);
  }
  return parts;
}

function same(a, b) {
  return a.length === b.length && a.every((x, i) => Object.is(x, b[i]));
}

async function main() {
  const [port, vectorPath, host = '127.0.0.1'] = process.argv.slice(2);
  if (!port || !vectorPath) {
    console.error('usage: node contract_test.js <port> <vector.json> [host]');
    process.exit(2);
  }
  const file = JSON.parse(fs.readFileSync(vectorPath, 'utf8'));
  const def = protoLoader.loadSync(PROTO, { keepCase: true, longs: String, enums: String, defaults: false, oneofs: true });
  const pkg = grpc.loadPackageDefinition(def).softgate.v1;
  const client = new pkg.LossService(`${host}:${port}`, grpc.credentials.createInsecure());
  const failures = [];
  const check = (name, ok, why) => {
    if (ok) console.log(`ok   ${name}`);
    else failures.push(`${name}: ${why}`);
  };

  // 1. StreamLoss in two chunks == ComputeLoss, bit for bit
  const kase = file.cases.find((c) => c.inputs.offsets.length >= 4 && c.inputs.rewards && c.outputs.loss !== 0);
  const unary = await call(client, 'ComputeLoss', caseRequest(kase));
  const parts = chunks(kase.inputs);
  const msgs = parts.map((p, j) => {
    const req = caseRequest({ config: kase.config, inputs: p });
    return j === 0 ? req : { chunk: req.batch };
  });
  msgs[0] = { config: msgs[0].config, outputs: msgs[0].outputs, chunk: msgs[0].batch };
  const responses = await stream(client, msgs);
  const summary = responses[responses.length - 1].summary;
  const grad = responses.flatMap((r) => readTensor(r.outputs.gradient));
  check('StreamLoss: one response per chunk, in order', responses.length === 2 && responses.every((r, j) => Number(r.chunk_index || 0) === j), JSON.stringify(responses.map((r) => r.chunk_index)));
  check('StreamLoss: loss equals ComputeLoss bit for bit', summary && Object.is(summary.loss, unary.loss) && unary.loss !== 0, `${summary && summary.loss} != ${unary.loss}`);
  check('StreamLoss: gradient equals ComputeLoss bit for bit', same(grad, readTensor(unary.outputs.gradient)), 'gradients differ');
  check('StreamLoss: metrics equal', summary && Object.keys(unary.metrics).length > 20 && Object.keys(unary.metrics).every((k) => Object.is(summary.metrics[k], unary.metrics[k])), 'metrics differ');

  // 2. a NaN in logp: INVALID_ARGUMENT, BadRequest naming batch.logp[1] NON_FINITE
  const bad = caseRequest(kase);
  const logp = kase.inputs.logp.slice();
  logp[1] = NaN;
  bad.batch.logp = tensor(logp, 'float64');
  try {
    await call(client, 'ComputeLoss', bad);
    check('bad input refused', false, 'the call succeeded');
  } catch (err) {
    const raw = err.metadata && err.metadata.get('grpc-status-details-bin')[0];
    const status = raw ? RPC.lookupType('google.rpc.Status').decode(raw) : null;
    const detail = status && status.details.find((d) => d.type_url === 'type.googleapis.com/google.rpc.BadRequest');
    const br = detail ? RPC.lookupType('google.rpc.BadRequest').decode(detail.value) : null;
    const v = br ? br.field_violations : [];
    check('bad input: INVALID_ARGUMENT', err.code === grpc.status.INVALID_ARGUMENT && status && status.code === 3, `code ${err.code}`);
    check(
      'bad input: BadRequest names batch.logp[1], reason NON_FINITE',
      v.length === 1 && v[0].field === 'batch.logp[1]' && v[0].reason === 'NON_FINITE' && v[0].description.startsWith('non_finite:'),
      JSON.stringify(v),
    );
  }

  // 3. no objective set: SAPO with its defaults, as the proto says (off-policy, with trained
  // tokens of both advantage signs, so that tau_pos and tau_neg each shape the result)
  const both = file.cases.find(
    (c) => c.inputs.old_logp && c.outputs.metrics.tokens_pos > 0 && c.outputs.metrics.tokens_neg > 0,
  );
  const plain = caseRequest(both);
  const unset = { ...plain, config: { ...plain.config } };
  delete unset.config.objective;
  const sapo = { ...plain, config: { ...plain.config, objective: { sapo: {} } } };
  // ... and SAPO's defaults are the proto's documented ones (not merely the server's own)
  const given = { ...plain, config: { ...plain.config, objective: { sapo: { tau_pos: 1.0, tau_neg: 1.05 } } } };
  const [a, b, c] = [unset, sapo, given].map((r) => call(client, 'ComputeLoss', r));
  const [ra, rb, rc] = [await a, await b, await c];
  const alike = (x, y) => Object.is(x.loss, y.loss) && same(readTensor(x.outputs.gradient), readTensor(y.outputs.gradient));
  check('unset objective: SAPO with tau_pos 1, tau_neg 1.05', alike(ra, rb) && alike(rb, rc), `${ra.loss}, ${rb.loss}, ${rc.loss}`);

  // 4. float32 tensors (Float32 little-endian bytes): a float32 gradient, equal to the float64
  // vector's within float32's rounding of the inputs
  const f32 = await call(client, 'ComputeLoss', caseRequest(both, 'float32'));
  const g32 = f32.outputs.gradient;
  const want = both.outputs.grad;
  const near = (x, y) => Math.abs(x - y) <= 1e-6 + 1e-4 * Math.abs(y);
  const got = readTensor(g32);
  check(
    'float32 inputs: a float32 gradient near the float64 vector',
    g32.dtype === 'DTYPE_FLOAT32' && got.length === want.length && got.every((x, i) => near(x, want[i])) && near(f32.loss, both.outputs.loss),
    `${g32.dtype}, loss ${f32.loss} vs ${both.outputs.loss}`,
  );

  client.close();
  for (const f of failures) console.error(`FAIL ${f}`);
  console.log(`${8 - failures.length} passed, ${failures.length} failed`);
  process.exit(failures.length === 0 ? 0 : 1);
}

main().catch((e) => {
  console.error(e);
  console.log('0 passed, 1 failed');
  process.exit(1);
});
