#!/usr/bin/env node
// softgate from Node.js: load proto/softgate/v1/softgate.proto with @grpc/proto-loader, call
// ComputeLoss with @grpc/grpc-js for every case of a conformance vector file and check the
// loss and gradient against it, within the file's tolerance.
//
//   node tests/node/loss_test.js <port> <tests/vectors/sapo.json> [case-name-substring] [host]
//
// Tensors travel as raw little-endian bytes (a Buffer), written with DataView so that the
// byte order is explicit whatever the host's. Exit code 0 and a closing line
// "N passed, 0 failed" when the service agrees with every case.
'use strict';

const path = require('path');
const fs = require('fs');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const REPO = path.resolve(__dirname, '..', '..');
const PROTO = path.join(REPO, 'proto', 'softgate', 'v1', 'softgate.proto');

const DTYPE = { float32: 'DTYPE_FLOAT32', float64: 'DTYPE_FLOAT64', int64: 'DTYPE_INT64', bool: 'DTYPE_BOOL' };

// ---------------------------------------------------------------- little-endian tensors

function tensor(values, dtype) {
  const n = values.length;
  let buf;
  if (dtype === 'float32' || dtype === 'float64') {
    const size = dtype === 'float32' ? 4 : 8;
    buf = Buffer.alloc(n * size);
    const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
    for (let i = 0; i < n; i++) {
      const v = Number(values[i]);
      if (size === 4) dv.setFloat32(i * 4, v, true);
      else dv.setFloat64(i * 8, v, true);
    }
  } else if (dtype === 'int64') {
    buf = Buffer.alloc(n * 8);
    const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
    for (let i = 0; i < n; i++) dv.setBigInt64(i * 8, BigInt(values[i]), true);
  } else if (dtype === 'bool') {
    buf = Buffer.alloc(n);
    for (let i = 0; i < n; i++) buf[i] = values[i] ? 1 : 0;
  } else {
    throw new Error(`unsupported dtype ${dtype}`);
  }
  return { dtype: DTYPE[dtype], shape: [String(n)], data: buf };
}

function readTensor(t) {
  if (!t || !t.data) return null;
  const b = t.data;
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const out = [];
  if (t.dtype === 'DTYPE_FLOAT32') for (let i = 0; i < b.length / 4; i++) out.push(dv.getFloat32(i * 4, true));
  else if (t.dtype === 'DTYPE_FLOAT64') for (let i = 0; i < b.length / 8; i++) out.push(dv.getFloat64(i * 8, true));
  else if (t.dtype === 'DTYPE_BOOL') for (let i = 0; i < b.length; i++) out.push(b[i] !== 0);
  else throw new Error(`unexpected dtype ${t.dtype}`);
  return out;
}

// ---------------------------------------------------------------- vector -> request
// Schema: tests/vectors/README.md ("softgate-conformance/1"): float64 inputs, a Config that
// mirrors the engine's LossConfig, the expected loss and per-token gradient.

const drop = (o) => Object.fromEntries(Object.entries(o).filter(([, v]) => v !== null && v !== undefined));
const enumName = (prefix, v) => (v === null || v === undefined ? undefined : `${prefix}_${String(v).toUpperCase()}`);

function lossConfig(c) {
  const { name, ...params } = c.objective;
  const out = { objective: { [name]: drop(params) } };
  if (c.advantages) {
    const a = c.advantages;
    out.advantages = drop({
      estimator: enumName('ADVANTAGE_ESTIMATOR', a.estimator),
      scale: enumName('ADVANTAGE_SCALE', a.scale),
      eps: a.eps,
      min_group_std: a.min_group_std,
      gamma: a.gamma,
      skip_nan_components: a.skip_nan_components,
      position: enumName('TOKEN_POSITION', a.position),
      zero_tail: a.zero_tail,
    });
  }
  if (c.aggregation) {
    const g = c.aggregation;
    out.aggregation = drop({
      mode: enumName('AGGREGATION_MODE', g.mode),
      num_tokens: g.num_tokens,
      num_seqs: g.num_seqs,
      constant: g.constant,
    });
  }
  if (c.kl) {
    out.kl = drop({
      estimator: enumName('KL_ESTIMATOR', c.kl.estimator),
      beta: c.kl.beta,
      aggregation: enumName('AGGREGATION_MODE', c.kl.aggregation),
      value_clamp: c.kl.value_clamp,
      weight: enumName('KL_WEIGHT', c.kl.weight),
    });
  }
  if (c.mismatch) {
    const m = c.mismatch;
    out.mismatch = drop({
      level: enumName('MISMATCH_LEVEL', m.level),
      mode: enumName('MISMATCH_MODE', m.mode),
      cap: m.cap,
      lo: m.lo,
      hi: m.hi,
      floor: m.floor,
      batch_normalize: m.batch_normalize,
    });
  }
  if (c.reward_kl) {
    out.reward_kl = drop({
      beta: c.reward_kl.beta,
      estimator: enumName('KL_ESTIMATOR', c.reward_kl.estimator),
      level: enumName('REWARD_KL_LEVEL', c.reward_kl.level),
      value_clamp: c.reward_kl.value_clamp,
    });
  }
  if (c.log_ratio_clamp !== null && c.log_ratio_clamp !== undefined) out.log_ratio_clamp = c.log_ratio_clamp;
  if (c.saturation_threshold !== null && c.saturation_threshold !== undefined) {
    out.saturation_threshold = c.saturation_threshold;
  }
  if (c.off_policy_mask_threshold !== null && c.off_policy_mask_threshold !== undefined) {
    out.off_policy_mask_threshold = c.off_policy_mask_threshold;
  }
  if (c.off_policy_mask_reference) {
    out.off_policy_mask_reference = enumName('OFF_POLICY_MASK_REFERENCE', c.off_policy_mask_reference);
  }
  if (c.rejection) {
    out.rejection = c.rejection.map((r) => drop({
      statistic: enumName('REJECTION_STATISTIC', r.statistic),
      level: enumName('REJECTION_LEVEL', r.level),
      upper: r.upper,
      lower: r.lower,
    }));
  }
  return out;
}

function batch(inp, dtype) {
  const b = { offsets: tensor(inp.offsets, 'int64'), logp: tensor(inp.logp, dtype) };
  for (const k of ['old_logp', 'ref_logp', 'rollout_logp', 'sum_pi_squared']) if (inp[k]) b[k] = tensor(inp[k], dtype);
  if (inp.mask) b.mask = tensor(inp.mask, 'bool');
  if (inp.rewards) b.rewards = tensor(inp.rewards, dtype);
  if (inp.group_ids) b.group_ids = tensor(inp.group_ids, 'int64');
  if (inp.advantages) {
    b.advantages = tensor(inp.advantages, dtype);
    if (inp.advantage_level) b.advantage_level = enumName('ADVANTAGE_LEVEL', inp.advantage_level);
  }
  return b;
}

function caseRequest(kase, dtype = 'float64') {
  return { config: lossConfig(kase.config), batch: batch(kase.inputs, dtype), outputs: { gradient: true } };
}

// ---------------------------------------------------------------- main

function close(a, b, tol) {
  return Math.abs(a - b) <= tol.atol + tol.rtol * Math.abs(b);
}

function check(kase, resp, tol) {
  const want = kase.outputs;
  const failures = [];
  for (const k of ['loss', 'policy_loss', 'kl_loss']) {
    if (!close(resp[k] || 0, want[k], tol)) failures.push(`${k} ${resp[k]} != ${want[k]}`);
  }
  const grad = readTensor(resp.outputs && resp.outputs.gradient) || [];
  if (grad.length !== want.grad.length) failures.push(`gradient length ${grad.length} != ${want.grad.length}`);
  else {
    for (let i = 0; i < grad.length && failures.length < 8; i++) {
      if (!close(grad[i], want.grad[i], tol)) failures.push(`grad[${i}] ${grad[i]} != ${want.grad[i]}`);
    }
  }
  return failures;
}

function computeLoss(client, request) {
  const md = new grpc.Metadata();
  md.set('softgate-run', 'node-conformance');
  return new Promise((resolve, reject) => {
    client.ComputeLoss(request, md, { deadline: new Date(Date.now() + 30000) }, (err, resp) =>
      err ? reject(err) : resolve(resp),
    );
  });
}

async function main() {
  const [port, vectorPath, only, host = '127.0.0.1'] = process.argv.slice(2);
  if (!port || !vectorPath) {
    console.error('usage: node loss_test.js <port> <vector.json> [case-name-substring] [host]');
    process.exit(2);
  }
  const file = JSON.parse(fs.readFileSync(vectorPath, 'utf8'));
  if (file.schema !== 'softgate-conformance/1') throw new Error(`unknown schema ${file.schema}`);
  const tol = file.tolerance || { rtol: 1e-9, atol: 1e-12 };
  const def = protoLoader.loadSync(PROTO, {
    keepCase: true,
    longs: String,
    enums: String,
    defaults: false,
    oneofs: true,
    includeDirs: [path.join(REPO, 'proto')],
  });
  const pkg = grpc.loadPackageDefinition(def).softgate.v1;
  const client = new pkg.LossService(`${host}:${port}`, grpc.credentials.createInsecure(), {
    'grpc.max_receive_message_length': 64 << 20,
    'grpc.max_send_message_length': 64 << 20,
  });
  let passed = 0;
  let failed = 0;
  for (const kase of file.cases) {
    if (only && !kase.name.includes(only)) continue;
    let failures;
    try {
      failures = check(kase, await computeLoss(client, caseRequest(kase)), tol);
    } catch (err) {
      failures = [`ComputeLoss failed: ${err.code} ${err.details}`];
    }
    if (failures.length) {
      failed++;
      console.error(`FAIL ${kase.name}: ${failures.join('; ')}`);
    } else {
      passed++;
      console.log(`ok   ${kase.name}`);
    }
  }
  client.close();
  console.log(`${path.basename(vectorPath)}: ${passed} cases agree with the service (rtol ${tol.rtol}, atol ${tol.atol})`);
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed === 0 && passed > 0 ? 0 : 1);
}

if (require.main === module) {
  main().catch((e) => {
    console.error(e);
    console.log('0 passed, 1 failed');
    process.exit(1);
  });
}

module.exports = { tensor, readTensor, caseRequest, lossConfig };
